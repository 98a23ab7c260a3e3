//! The reactor's io_uring and the rules for memory shared with the kernel.
//!
//! # Ownership essay
//!
//! io_uring lets the kernel read and write our memory *after* the system call that
//! submitted the operation has returned, until the operation's completion (CQE) is
//! reaped. Rust's borrow checker knows nothing of that window, so the rules are kept
//! here, by construction, rather than by callers' care:
//!
//! 1. **An in-flight operation owns everything the kernel may touch.** Submitting an
//!    operation moves its resources (a [`Buffer`](crate::buffer::Buffer), a path, an
//!    `iovec`) into a [`RingOp`]. Nothing else can reach them until the op's future
//!    resolves, and it resolves only after the CQE is reaped, handing the resources back
//!    with the result. No operation borrows memory.
//! 2. **Dropping the future does not end the operation.** If a [`RingOp`] is dropped while
//!    in flight (a task was cancelled, a connection closed), its resources move into the
//!    op's slot in the ring ("abandoned") and are freed when the CQE finally arrives. The
//!    ring also asks the kernel to cancel the op (a read on an idle socket would otherwise
//!    never end) and submits what is queued at once, so the op holds its own reference to
//!    its file before anyone closes it. Resources and wakers are released only after the
//!    ring's borrow ends: their destructors may use the ring.
//! 3. **Dropping the ring waits for every in-flight completion.** [`Ring`]'s `Drop` asks the
//!    kernel to cancel everything still in flight, then reaps until no operation is left,
//!    and only then frees slots and unmaps the ring. Memory the kernel may still write is
//!    never freed first.
//! 4. **A full queue never loses an op.** If the submission queue is full the ring first
//!    submits what is queued (and, if the completion queue is full too, moves completions
//!    into their slots) to make room; a slot is marked in flight only once its entry is
//!    queued. Unregistering a file submits queued entries first, so an entry never reaches
//!    a different file registered later under the same index.
//! 5. **One thread.** A ring belongs to the reactor thread that created it
//!    (`IORING_SETUP_SINGLE_ISSUER`); [`RingOp`] and [`FixedFile`] are `!Send`.
//!
//! Every `unsafe` push below relies on rule 1: the pointers in the submission entry point
//! into resources owned by the op, which rule 2 and 3 keep alive until the CQE.
//!
//! # Slots
//!
//! Each in-flight op has a slot; the slot index is the SQE's `user_data`. A slot is
//! `Waiting` (with the waker of the task that awaits it), `Done` (CQE reaped, result not
//! yet collected) or `Abandoned` (its future is gone; it keeps the resources alive).
//! Reserved `user_data` values above [`MAX_SLOTS`] mark the reactor's own operations:
//! the inbox eventfd read and cancellations.

use crate::buffer::Buffer;
use crate::errno::Errno;
use io_uring::{IoUring, opcode, squeue, types};
use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Most operations in flight on one ring.
pub const MAX_SLOTS: u64 = 1 << 32;
const EVENTFD_TOKEN: u64 = u64::MAX;
const CANCEL_TOKEN: u64 = u64::MAX - 1;
/// Registered-file table size per ring.
pub const FIXED_FILES: u32 = 1024;
/// Registered-buffer table size per ring.
pub const FIXED_BUFFERS: u32 = 1024;

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(i32),
    Abandoned(#[allow(dead_code)] Box<dyn Any>),
}

/// One reactor's io_uring plus its slot table.
pub(crate) struct Ring {
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    inflight: usize,
    /// Internal ops (eventfd read, cancels) in flight.
    internal: usize,
    eventfd: RawFd,
    /// Target of the armed eventfd read; boxed so its address is stable.
    eventfd_buf: Box<u64>,
    eventfd_armed: bool,
    /// Set by Drop: no more re-arming of the eventfd read.
    closing: bool,
    fixed_free: Vec<u32>,
    fixed_ok: bool,
    /// Free indices of the registered-buffer table (empty if the kernel refused one).
    fixed_buf_free: Vec<u32>,
    /// Wakers of ops completed by the last reap, to be woken once the ring is no longer
    /// borrowed (a waker may run code that uses the ring).
    woken: Vec<Waker>,
    /// Resources of abandoned ops whose completion arrived: dropped outside the borrow
    /// for the same reason (their destructors may use the ring).
    graveyard: Vec<Box<dyn Any>>,
}

impl Ring {
    pub(crate) fn new(entries: u32, eventfd: RawFd) -> std::io::Result<Ring> {
        let cq = entries.saturating_mul(4);
        // SINGLE_ISSUER | DEFER_TASKRUN: completions are processed only when the reactor
        // enters the kernel, in batches, with no inter-processor interrupts. Older kernels
        // get a plain ring.
        let uring = match IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_clamp()
            .build(entries)
        {
            Ok(u) => u,
            Err(_) => IoUring::builder()
                .setup_cqsize(cq)
                .setup_clamp()
                .build(entries)?,
        };
        let fixed_ok = uring.submitter().register_files_sparse(FIXED_FILES).is_ok();
        let bufs_ok = uring
            .submitter()
            .register_buffers_sparse(FIXED_BUFFERS)
            .is_ok();
        let mut ring = Ring {
            uring,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            internal: 0,
            eventfd,
            eventfd_buf: Box::new(0),
            eventfd_armed: false,
            closing: false,
            fixed_free: if fixed_ok {
                (0..FIXED_FILES).rev().collect()
            } else {
                Vec::new()
            },
            fixed_ok,
            woken: Vec::new(),
            graveyard: Vec::new(),
            fixed_buf_free: if bufs_ok {
                (0..FIXED_BUFFERS).rev().collect()
            } else {
                Vec::new()
            },
        };
        ring.arm_eventfd();
        Ok(ring)
    }

    /// Ops in flight (not counting the reactor's own eventfd read).
    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }

    fn arm_eventfd(&mut self) {
        if self.eventfd_armed || self.closing {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.eventfd),
            (&mut *self.eventfd_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        // SAFETY: eventfd_buf is a Box owned by the ring; Drop cancels and reaps this read
        // before the box is freed (ownership rule 3).
        unsafe { self.push(&entry) };
        self.eventfd_armed = true;
        self.internal += 1;
    }

    /// Queues an entry, submitting what is queued first if the queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: forwarded to our caller.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return;
            }
            // Queue full: hand what is queued to the kernel to make room.
            match self.uring.submit() {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    // Completion queue full: move completions into their slots (their
                    // wakers run later, from the loop) to make room, then retry.
                    if self.reap_cqes().0 == 0 {
                        self.enter(1, Some(Duration::from_millis(1)));
                    }
                }
                Err(e) => panic!("BUG: io_uring_enter failed while submitting: {e}"),
            }
        }
    }

    /// Starts an op: pushes `entry` tagged with a fresh slot.
    ///
    /// # Safety
    /// `entry`'s pointers must stay valid until the CQE: they must point into the
    /// resources the returned slot's [`RingOp`] owns, or into memory that lives longer.
    pub(crate) unsafe fn start(&mut self, entry: squeue::Entry) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::Free);
                u32::try_from(self.slots.len() - 1).expect("BUG: slot table overflow")
            }
        };
        // SAFETY: forwarded to our caller.
        unsafe { self.push(&entry.user_data(u64::from(slot))) };
        // Marked only once queued: a push that panicked leaves no phantom op in flight.
        self.slots[slot as usize] = Slot::Waiting(None);
        self.inflight += 1;
        slot
    }

    /// Collects a finished op's result, or records the waker to call when it finishes.
    fn poll_slot(&mut self, slot: u32, waker: &Waker) -> Poll<i32> {
        let s = &mut self.slots[slot as usize];
        match s {
            Slot::Done(res) => {
                let res = *res;
                *s = Slot::Free;
                self.free.push(slot);
                Poll::Ready(res)
            }
            Slot::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *w = Some(waker.clone());
                }
                Poll::Pending
            }
            Slot::Free | Slot::Abandoned(_) => {
                panic!("BUG: polled ring slot {slot} in a wrong state")
            }
        }
    }

    /// The op's future was dropped: keep `keep` alive until the CQE (rule 2), and ask the
    /// kernel to cancel the op (a read on an idle socket would otherwise never end). The
    /// queued entries are submitted first, so the op holds its own reference to its file
    /// before the caller may close or unregister it. Returns `keep` when the op had
    /// already completed, for the caller to drop outside the ring's borrow.
    fn abandon(&mut self, slot: u32, keep: Box<dyn Any>) -> Option<Box<dyn Any>> {
        let s = &mut self.slots[slot as usize];
        match s {
            Slot::Done(_) => {
                *s = Slot::Free;
                self.free.push(slot);
                Some(keep)
            }
            Slot::Waiting(_) => {
                *s = Slot::Abandoned(keep);
                let cancel = opcode::AsyncCancel::new(u64::from(slot))
                    .build()
                    .user_data(CANCEL_TOKEN);
                // SAFETY: a cancel carries no pointers.
                unsafe { self.push(&cancel) };
                self.internal += 1;
                self.enter(0, None);
                None
            }
            Slot::Free | Slot::Abandoned(_) => panic!("BUG: abandoned ring slot {slot} twice"),
        }
    }

    /// Whether the kernel holds deferred completions that need an enter to be posted.
    fn needs_enter(&mut self) -> bool {
        let mut sq = self.uring.submission();
        sq.sync();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
    }

    /// Submits queued entries (if any or if completions are pending in the kernel).
    pub(crate) fn submit(&mut self) {
        if self.needs_enter() {
            self.enter(0, None);
        }
    }

    /// Submits and waits until `want` completions are available, or `timeout`.
    pub(crate) fn wait_for(&mut self, want: usize, timeout: Duration) {
        self.enter(want, Some(timeout));
    }

    /// Submits and sleeps until at least one completion, or `timeout`.
    pub(crate) fn submit_and_wait(&mut self, timeout: Option<Duration>) {
        self.enter(1, timeout);
    }

    fn enter(&mut self, want: usize, timeout: Option<Duration>) {
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(want, &args)
            }
            None => self.uring.submitter().submit_and_wait(want),
        };
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => panic!("BUG: io_uring_enter failed: {e}"),
            }
        }
    }

    /// Moves every available completion into its slot. Wakers go to `woken` and the
    /// resources of abandoned ops to `graveyard`, both for [`Ring::take_woken`]'s caller to
    /// handle once the ring is no longer borrowed. Returns the number of completions and
    /// whether the inbox eventfd fired.
    pub(crate) fn reap_cqes(&mut self) -> (usize, bool) {
        let mut n = 0;
        let mut eventfd_fired = false;
        {
            let cq = self.uring.completion();
            for cqe in cq {
                n += 1;
                match cqe.user_data() {
                    EVENTFD_TOKEN => {
                        self.internal -= 1;
                        self.eventfd_armed = false;
                        eventfd_fired = true;
                    }
                    CANCEL_TOKEN => self.internal -= 1,
                    slot => {
                        let s = &mut self.slots[slot as usize];
                        self.inflight -= 1;
                        match std::mem::replace(s, Slot::Done(cqe.result())) {
                            Slot::Waiting(Some(w)) => self.woken.push(w),
                            Slot::Waiting(None) => {}
                            Slot::Abandoned(keep) => {
                                *s = Slot::Free;
                                self.free.push(slot as u32);
                                self.graveyard.push(keep);
                            }
                            Slot::Free | Slot::Done(_) => {
                                panic!("BUG: completion for idle slot {slot}")
                            }
                        }
                    }
                }
            }
        }
        if eventfd_fired {
            self.arm_eventfd();
        }
        (n, eventfd_fired)
    }

    /// Hands out what the last reaps left to do outside the borrow: wakers to wake and
    /// resources to drop. `into` is a reused vector (no allocation per loop iteration).
    pub(crate) fn take_woken(&mut self, into: &mut Vec<Waker>, dead: &mut Vec<Box<dyn Any>>) {
        into.append(&mut self.woken);
        dead.append(&mut self.graveyard);
    }

    /// Registers `fd` in this ring's file table.
    pub(crate) fn register_file(&mut self, fd: RawFd) -> Result<u32, Errno> {
        if !self.fixed_ok {
            return Err(Errno::ENOTSUP);
        }
        let index = self.fixed_free.pop().ok_or(Errno::ENOSPC)?;
        match self.uring.submitter().register_files_update(index, &[fd]) {
            Ok(_) => Ok(index),
            Err(e) => {
                self.fixed_free.push(index);
                Err(e.into())
            }
        }
    }

    /// Registers `buf`'s memory in this ring's buffer table.
    ///
    /// # Safety
    /// The memory must stay allocated until [`Ring::unregister_buffer`] and until every op
    /// that used the index has completed.
    unsafe fn register_buffer(&mut self, buf: &mut crate::buffer::Buffer) -> Result<u32, Errno> {
        let index = self.fixed_buf_free.pop().ok_or(Errno::ENOSPC)?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.capacity(),
        };
        // SAFETY: forwarded to our caller.
        match unsafe {
            self.uring
                .submitter()
                .register_buffers_update(index, &[iov], None)
        } {
            Ok(()) => Ok(index),
            Err(e) => {
                self.fixed_buf_free.push(index);
                Err(e.into())
            }
        }
    }

    fn unregister_buffer(&mut self, index: u32) {
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec clears the slot; it points at no memory.
        if unsafe {
            self.uring
                .submitter()
                .register_buffers_update(index, &[iov], None)
        }
        .is_ok()
        {
            self.fixed_buf_free.push(index);
        }
    }

    pub(crate) fn unregister_file(&mut self, index: u32) {
        // Ops already submitted hold their own reference to the file, but queued entries
        // look the index up only when submitted: submit them first, so none of them can
        // reach a file registered later under the same index.
        self.enter(0, None);
        if self
            .uring
            .submitter()
            .register_files_update(index, &[-1])
            .is_ok()
        {
            self.fixed_free.push(index);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.closing = true;
        // Complete the armed eventfd read by giving it something to read; cancel every op
        // still in flight one by one (`AsyncCancel` by user_data works on every kernel with
        // io_uring cancel; the "cancel any" form needs 5.19).
        if self.eventfd_armed {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.eventfd, (&one as *const u64).cast(), 8) };
        }
        let pending: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| {
                matches!(
                    self.slots[i as usize],
                    Slot::Waiting(_) | Slot::Abandoned(_)
                )
            })
            .collect();
        for slot in pending {
            let cancel = opcode::AsyncCancel::new(u64::from(slot))
                .build()
                .user_data(CANCEL_TOKEN);
            // SAFETY: a cancel carries no pointers.
            unsafe { self.push(&cancel) };
            self.internal += 1;
        }
        let mut rounds = 0u32;
        while self.inflight + self.internal > 0 {
            self.enter(1, Some(Duration::from_millis(100)));
            self.reap_cqes();
            rounds += 1;
            if rounds % 100 == 0 {
                eprintln!(
                    "strata: reactor shutdown still waits for {} io_uring completion(s) after {} s",
                    self.inflight + self.internal,
                    rounds / 10
                );
            }
        }
        // Every CQE is reaped: nothing the kernel may touch is left. The tasks are gone, so
        // the wakers are dropped unwoken; the abandoned resources are freed with the ring.
        self.woken.clear();
    }
}

// ---- ops offered to drivers ----------------------------------------------------------

/// A file as an op target: a plain descriptor or an index in the ring's file table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Fd(RawFd),
    Fixed(u32),
}

macro_rules! with_target {
    ($target:expr, |$t:ident| $body:expr) => {
        match $target {
            Target::Fd(fd) => {
                let $t = types::Fd(fd);
                $body
            }
            Target::Fixed(i) => {
                let $t = types::Fixed(i);
                $body
            }
        }
    };
}

/// The future of one ring operation. Resolves to the raw CQE result (`>= 0` or
/// `-errno`) and gives back the resources it owned.
pub struct RingOp<T: 'static> {
    slot: u32,
    keep: Option<T>,
    done: bool,
    _not_send: PhantomData<Rc<()>>,
}

impl<T: 'static> RingOp<T> {
    /// Starts an arbitrary operation on the current reactor's ring.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into `keep` (which the op owns until its
    /// completion) or into memory that outlives the completion. The caller must be on a
    /// reactor thread. The entry must produce exactly one completion: no multishot ops,
    /// no `IOSQE_CQE_SKIP_SUCCESS`, no `IOSQE_IO_LINK` chains (the ring may submit between
    /// two pushes).
    pub unsafe fn start(entry: squeue::Entry, keep: T) -> RingOp<T> {
        // SAFETY: forwarded to our caller.
        let slot = super::with_ring(|ring| unsafe { ring.start(entry) });
        RingOp {
            slot,
            keep: Some(keep),
            done: false,
            _not_send: PhantomData,
        }
    }
}

impl<T: 'static> Future for RingOp<T> {
    type Output = (i32, T);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, T)> {
        // SAFETY: RingOp is not structurally pinned: no field is ever pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // Checked first: a finished op's slot may already belong to another op.
        assert!(!this.done, "BUG: RingOp polled after completion");
        let res = std::task::ready!(super::with_ring(
            |ring| ring.poll_slot(this.slot, cx.waker())
        ));
        this.done = true;
        Poll::Ready((
            res,
            this.keep
                .take()
                .expect("BUG: RingOp polled after completion"),
        ))
    }
}

impl<T: 'static> Drop for RingOp<T> {
    fn drop(&mut self) {
        if !self.done {
            let mut keep = Some(Box::new(self.keep.take()) as Box<dyn Any>);
            let slot = self.slot;
            match super::try_with_ring(|ring| {
                ring.abandon(slot, keep.take().expect("BUG: keep taken twice"))
            }) {
                // Already complete: drop the resources now, outside the ring's borrow.
                Some(done) => drop(done),
                None => {
                    // The ring is out of reach, so nobody can tell when the kernel is done
                    // with these resources: leak them rather than free memory it may write.
                    std::mem::forget(keep);
                }
            }
        }
    }
}

impl<T> std::fmt::Debug for RingOp<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingOp")
            .field("slot", &self.slot)
            .field("done", &self.done)
            .finish()
    }
}

/// Converts a CQE result into a byte count or an errno.
pub fn cqe_result(res: i32) -> Result<usize, Errno> {
    if res < 0 {
        Err(Errno::from_cqe(res))
    } else {
        Ok(res as usize)
    }
}

/// Reads up to `buf.len()` bytes at `offset` (one `IORING_OP_READ`; may be short).
pub fn read_at(target: Target, buf: Buffer, offset: u64) -> RingOp<Buffer> {
    read_at_from(target, buf, 0, offset)
}

/// Reads into `buf[from..]` at `offset` (one op; may be short): continues a short read.
/// `from` beyond the buffer's length reads nothing.
pub fn read_at_from(target: Target, mut buf: Buffer, from: usize, offset: u64) -> RingOp<Buffer> {
    let from = from.min(buf.len());
    let len = u32::try_from(buf.len() - from).unwrap_or(u32::MAX);
    let ptr = buf.as_mut_ptr().wrapping_add(from);
    let entry = with_target!(target, |t| opcode::Read::new(t, ptr, len)
        .offset(offset)
        .build());
    // SAFETY: the entry covers buf[from..from + len], inside `buf`, which the op owns until
    // its completion; the allocation does not move when the Buffer value does.
    unsafe { RingOp::start(entry, buf) }
}

/// Writes `buf` at `offset` (one `IORING_OP_WRITE`; may be short). `rw_flags` are
/// `RWF_*` flags, e.g. `RWF_DSYNC` for a FUA write.
pub fn write_at(target: Target, buf: Buffer, offset: u64, rw_flags: i32) -> RingOp<Buffer> {
    write_at_from(target, buf, 0, offset, rw_flags)
}

/// Writes `buf[from..]` at `offset` (one op; may be short): continues a short write.
pub fn write_at_from(
    target: Target,
    buf: Buffer,
    from: usize,
    offset: u64,
    rw_flags: i32,
) -> RingOp<Buffer> {
    let from = from.min(buf.len());
    let len = u32::try_from(buf.len() - from).unwrap_or(u32::MAX);
    let ptr = buf.as_ptr().wrapping_add(from);
    let entry = with_target!(target, |t| opcode::Write::new(t, ptr, len)
        .offset(offset)
        .rw_flags(rw_flags)
        .build());
    // SAFETY: as in read_at_from.
    unsafe { RingOp::start(entry, buf) }
}

/// Hands every queued submission to the kernel now instead of at the end of the loop
/// iteration. For device I/O whose latency matters more than one system call: on the
/// virtio disks measured here, submitting each `O_DIRECT` request at once gave ~18% more
/// IOPS than batching them per iteration, while page-cache reads lose ~30% without
/// batching (see the `file` driver).
pub fn submit_now() {
    super::with_ring(|ring| ring.enter(0, None));
}

/// `fsync` (or `fdatasync` with `datasync`).
pub fn fsync(target: Target, datasync: bool) -> RingOp<()> {
    let flags = if datasync {
        types::FsyncFlags::DATASYNC
    } else {
        types::FsyncFlags::empty()
    };
    let entry = with_target!(target, |t| opcode::Fsync::new(t).flags(flags).build());
    // SAFETY: fsync carries no pointers.
    unsafe { RingOp::start(entry, ()) }
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(target: Target, mode: i32, offset: u64, len: u64) -> RingOp<()> {
    let entry = with_target!(target, |t| opcode::Fallocate::new(t, len)
        .offset(offset)
        .mode(mode)
        .build());
    // SAFETY: fallocate carries no pointers.
    unsafe { RingOp::start(entry, ()) }
}

/// Sleeps on the ring (an `IORING_OP_TIMEOUT`): used by tests of the ring itself.
pub fn timeout(d: Duration) -> RingOp<Box<types::Timespec>> {
    let ts = Box::new(types::Timespec::from(d));
    let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    // SAFETY: the entry points into the boxed timespec, which the op owns.
    unsafe { RingOp::start(entry, ts) }
}

/// A file registered in the current reactor's ring; unregistered on drop. `!Send`: the
/// index means nothing on another ring.
#[derive(Debug)]
pub struct FixedFile {
    index: u32,
    _not_send: PhantomData<Rc<()>>,
}

impl FixedFile {
    /// Registers `fd` with the current reactor's ring. `fd` must stay open while this
    /// lives (the ring holds its own reference to the open file, so an early close is not
    /// unsound, but the index would then name the old file).
    pub fn register(fd: RawFd) -> Result<FixedFile, Errno> {
        let index = super::with_ring(|ring| ring.register_file(fd))?;
        Ok(FixedFile {
            index,
            _not_send: PhantomData,
        })
    }

    pub fn target(&self) -> Target {
        Target::Fixed(self.index)
    }
}

impl Drop for FixedFile {
    fn drop(&mut self) {
        let _ = super::try_with_ring(|ring| ring.unregister_file(self.index));
    }
}

/// A set of buffers registered with the current reactor's ring (`IORING_REGISTER_BUFFERS`):
/// ops on them skip pinning the pages on every request. `!Send`: the indices belong to one
/// ring.
///
/// Ownership: the set owns the memory; a [`FixedBuf`] lent out keeps the set alive (an
/// `Rc`), and an op in flight owns its `FixedBuf`, so registered memory is unregistered and
/// freed only after the last op that used it has completed (ring rule 1).
#[derive(Debug, Clone)]
pub struct FixedBuffers {
    inner: Rc<FixedSet>,
}

#[derive(Debug)]
struct FixedSet {
    free: std::cell::RefCell<Vec<(u32, Buffer)>>,
    indices: Vec<u32>,
}

impl FixedBuffers {
    /// Allocates and registers `count` buffers of `size` bytes on the current reactor.
    pub fn new(count: usize, size: usize) -> Result<FixedBuffers, Errno> {
        let mut free = Vec::with_capacity(count);
        let mut indices = Vec::with_capacity(count);
        for _ in 0..count {
            let mut buf = Buffer::zeroed(size);
            // SAFETY: the buffer is kept in this set until FixedSet::drop unregisters it,
            // and lent-out FixedBufs (and so in-flight ops) hold the set alive.
            let index = match super::with_ring(|ring| unsafe { ring.register_buffer(&mut buf) }) {
                Ok(i) => i,
                Err(e) => {
                    // Unregister what we did register (FixedSet::drop does it).
                    drop(FixedSet {
                        free: std::cell::RefCell::new(free),
                        indices,
                    });
                    return Err(e);
                }
            };
            indices.push(index);
            free.push((index, buf));
        }
        Ok(FixedBuffers {
            inner: Rc::new(FixedSet {
                free: std::cell::RefCell::new(free),
                indices,
            }),
        })
    }

    /// Lends out a free buffer, if any.
    pub fn get(&self) -> Option<FixedBuf> {
        let (index, buf) = self.inner.free.borrow_mut().pop()?;
        Some(FixedBuf {
            set: self.inner.clone(),
            index,
            buf: Some(buf),
        })
    }
}

impl Drop for FixedSet {
    fn drop(&mut self) {
        for &index in &self.indices {
            // If the ring is out of reach the registration stays until the ring closes;
            // the kernel holds its own page references, so freeing our copy is sound.
            let _ = super::try_with_ring(|ring| ring.unregister_buffer(index));
        }
        // The buffers are freed after this (field drop), once unregistered.
    }
}

/// A registered buffer lent out by [`FixedBuffers`]; goes back to its set when dropped.
#[derive(Debug)]
pub struct FixedBuf {
    set: Rc<FixedSet>,
    index: u32,
    buf: Option<Buffer>,
}

impl FixedBuf {
    /// The buffer's index in the ring's table.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl FixedBuf {
    fn buffer(&self) -> &Buffer {
        self.buf.as_ref().expect("BUG: FixedBuf without its buffer")
    }

    fn buffer_mut(&mut self) -> &mut Buffer {
        self.buf.as_mut().expect("BUG: FixedBuf without its buffer")
    }

    /// Sets the length used by the next op (up to the registered capacity).
    pub fn set_len(&mut self, len: usize) {
        self.buffer_mut().set_len(len);
    }
}

// Deref to the bytes only: handing out `&mut Buffer` would let a caller swap the
// registered memory out of the set while it is registered.
impl std::ops::Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buffer()
    }
}

impl std::ops::DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buffer_mut()
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.set.free.borrow_mut().push((self.index, buf));
        }
    }
}

/// `read_at` into a registered buffer (`IORING_OP_READ_FIXED`).
pub fn read_fixed(target: Target, mut buf: FixedBuf, offset: u64) -> RingOp<FixedBuf> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let ptr = buf.buffer_mut().as_mut_ptr();
    let index = buf.index as u16;
    let entry = with_target!(target, |t| opcode::ReadFixed::new(t, ptr, len, index)
        .offset(offset)
        .build());
    // SAFETY: the entry points into the registered buffer, which the op owns (and, through
    // it, the set that keeps the registration and the memory alive).
    unsafe { RingOp::start(entry, buf) }
}

/// `write_at` from a registered buffer (`IORING_OP_WRITE_FIXED`).
pub fn write_fixed(target: Target, buf: FixedBuf, offset: u64, rw_flags: i32) -> RingOp<FixedBuf> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let ptr = buf.buffer().as_ptr();
    let index = buf.index as u16;
    let entry = with_target!(target, |t| opcode::WriteFixed::new(t, ptr, len, index)
        .offset(offset)
        .rw_flags(rw_flags)
        .build());
    // SAFETY: as in read_fixed.
    unsafe { RingOp::start(entry, buf) }
}

// ---- sockets ---------------------------------------------------------------------------

/// Accepts a connection on the listening socket `fd` (`IORING_OP_ACCEPT`); the result is
/// the new descriptor (close-on-exec) or `-errno`.
pub fn accept(fd: RawFd) -> RingOp<()> {
    let entry = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build();
    // SAFETY: no peer address is asked for: the entry carries no pointers.
    unsafe { RingOp::start(entry, ()) }
}

/// Receives into `buf[from..]` (one `IORING_OP_RECV`; may be short; 0 means the peer
/// closed its side).
pub fn recv(target: Target, mut buf: Buffer, from: usize) -> RingOp<Buffer> {
    let from = from.min(buf.len());
    let len = u32::try_from(buf.len() - from).unwrap_or(u32::MAX);
    let ptr = buf.as_mut_ptr().wrapping_add(from);
    let entry = with_target!(target, |t| opcode::Recv::new(t, ptr, len).build());
    // SAFETY: as in read_at_from: the entry covers buf[from..from + len], owned by the op.
    unsafe { RingOp::start(entry, buf) }
}

/// Most segments one [`send_gather`] sends (Linux's `IOV_MAX`).
pub const GATHER_MAX_SEGMENTS: usize = 1024;

/// Byte ranges of owned buffers to send as one stream, in order: the memory of one
/// [`send_gather`]. Buffers are moved in, so the op owns every byte the kernel reads;
/// [`Gather::clear`] empties it for reuse without freeing its lists.
pub struct Gather {
    bufs: Vec<Buffer>,
    iov: Vec<libc::iovec>,
    /// First segment not yet sent, and how much of it was.
    head: usize,
    msg: Box<libc::msghdr>,
}

impl Default for Gather {
    fn default() -> Gather {
        Gather::new()
    }
}

impl Gather {
    pub fn new() -> Gather {
        Gather {
            bufs: Vec::new(),
            iov: Vec::new(),
            head: 0,
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Moves `buf` in; returns its index for [`Gather::segment`].
    pub fn add(&mut self, buf: Buffer) -> usize {
        self.bufs.push(buf);
        self.bufs.len() - 1
    }

    /// Appends `bufs[index][range]` to the stream. Panics on a range outside the buffer
    /// (a caller bug).
    pub fn segment(&mut self, index: usize, range: std::ops::Range<usize>) {
        let buf = &self.bufs[index];
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "BUG: gather segment {range:?} outside a buffer of {}",
            buf.len()
        );
        if range.is_empty() {
            return;
        }
        self.iov.push(libc::iovec {
            // The heap memory of a Buffer does not move when the Buffer value does.
            iov_base: buf.as_ptr().wrapping_add(range.start) as *mut libc::c_void,
            iov_len: range.len(),
        });
    }

    /// Bytes not yet sent.
    pub fn remaining(&self) -> usize {
        self.iov[self.head..].iter().map(|v| v.iov_len).sum()
    }

    /// Segments not yet sent.
    pub fn segments(&self) -> usize {
        self.iov.len() - self.head
    }

    /// Records that the first `n` remaining bytes were sent.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.head < self.iov.len() {
            let v = &mut self.iov[self.head];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.head += 1;
            } else {
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Sends what it can right now with a non-blocking `sendmsg(2)` (`MSG_DONTWAIT`,
    /// `MSG_NOSIGNAL`) and records it as sent; returns the bytes sent (0 when the socket
    /// is full). A reply that fits in the socket buffer, the usual case, then needs no
    /// ring operation and no completion to wait for; [`send_gather`] sends the rest.
    pub fn send_now(&mut self, fd: RawFd) -> Result<usize, Errno> {
        let count = self.segments().min(GATHER_MAX_SEGMENTS);
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iov[self.head..].as_mut_ptr();
        msg.msg_iovlen = count;
        // SAFETY: the iovecs point into buffers `self` owns, valid for the call; the
        // kernel only reads them, and only during the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = Errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            );
            return if e == Errno::EAGAIN { Ok(0) } else { Err(e) };
        }
        self.advance(n as usize);
        Ok(n as usize)
    }

    /// Drops every buffer and segment, keeping the lists' capacity.
    pub fn clear(&mut self) {
        self.bufs.clear();
        self.iov.clear();
        self.head = 0;
    }
}

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gather")
            .field("buffers", &self.bufs.len())
            .field("segments", &self.segments())
            .field("remaining", &self.remaining())
            .finish()
    }
}

/// Sends what `g` has not sent yet (at most [`GATHER_MAX_SEGMENTS`] segments) with one
/// `IORING_OP_SENDMSG` (`MSG_NOSIGNAL`: a closed peer is `EPIPE`, not a signal). May be
/// short: [`Gather::advance`] by the result and send again.
pub fn send_gather(target: Target, mut g: Gather) -> RingOp<Gather> {
    let count = g.segments().min(GATHER_MAX_SEGMENTS);
    let iov = g.iov[g.head..].as_mut_ptr();
    g.msg.msg_iov = iov;
    g.msg.msg_iovlen = count;
    let msg: *const libc::msghdr = &*g.msg;
    let entry = with_target!(target, |t| opcode::SendMsg::new(t, msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build());
    // SAFETY: the entry points at the boxed msghdr, which points at `g.iov`'s heap array,
    // whose entries point into `g.bufs`' heap memory; the op owns `g`, and none of those
    // allocations moves or changes while it does.
    unsafe { RingOp::start(entry, g) }
}
