//! The reactor's single-threaded executor.
//!
//! Tasks are `!Send` futures stored in a slab owned by one reactor. A task's waker is not
//! a heap object: its data word encodes `(reactor, generation, slot)`, so cloning and
//! dropping wakers costs nothing and waking from the owning thread is a push onto a
//! `VecDeque` behind a `RefCell`: no atomics. Waking from any other thread (another
//! reactor, the admin thread, a completion callback) sends a `Wake` message through the
//! owning reactor's inbox, which is where the only atomics are.
//!
//! The generation guards slot reuse: a stale waker whose task has finished either finds
//! a different generation (ignored) or, after 65,536 reuses of the same slot, wakes an
//! unrelated task spuriously, which futures must tolerate anyway.
//!
//! A panic inside a task is caught, reported on stderr and ends that task only: the
//! reactor and its other tasks keep running.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

struct Slot {
    generation: u16,
    scheduled: bool,
    /// `None` while free, and while the task is being polled.
    future: Option<LocalFuture>,
    live: bool,
}

/// Tasks and the ready queue of one reactor.
pub(crate) struct Executor {
    gid: u16,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    ready: RefCell<VecDeque<u32>>,
    live: Cell<usize>,
}

impl Executor {
    pub(crate) fn new(gid: u16) -> Executor {
        Executor {
            gid,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            ready: RefCell::new(VecDeque::new()),
            live: Cell::new(0),
        }
    }

    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + 'static) {
        let fut: LocalFuture = Box::pin(fut);
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(Slot {
                    generation: 0,
                    scheduled: false,
                    future: None,
                    live: false,
                });
                u32::try_from(slots.len() - 1).expect("BUG: more than 2^32 tasks")
            }
        };
        let slot = &mut slots[index as usize];
        slot.future = Some(fut);
        slot.live = true;
        slot.scheduled = true;
        self.live.set(self.live.get() + 1);
        self.ready.borrow_mut().push_back(index);
    }

    /// Queues a task to be polled (from the owning thread).
    pub(crate) fn schedule(&self, index: u32, generation: u16) {
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.get_mut(index as usize)
            && slot.live
            && slot.generation == generation
            && !slot.scheduled
        {
            slot.scheduled = true;
            self.ready.borrow_mut().push_back(index);
        }
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn live_tasks(&self) -> usize {
        self.live.get()
    }

    /// Polls every task that was ready when called (tasks woken meanwhile wait for the
    /// next round, so a self-waking task cannot starve the loop). Returns how many ran.
    pub(crate) fn run_ready(&self) -> usize {
        let n = self.ready.borrow().len();
        for _ in 0..n {
            let Some(index) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            self.poll_task(index);
        }
        n
    }

    fn poll_task(&self, index: u32) {
        let (generation, mut fut) = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.scheduled = false;
            match slot.future.take() {
                Some(f) => (slot.generation, f),
                None => return,
            }
        };
        let waker = self.waker(index, generation);
        let mut cx = Context::from_waker(&waker);
        coop::reset();
        let result = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
        let done = match result {
            Ok(Poll::Pending) => false,
            Ok(Poll::Ready(())) => true,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                eprintln!(
                    "strata: a task on reactor gid {} panicked and was ended: {what}",
                    self.gid
                );
                true
            }
        };
        if done {
            // Drop the future before touching the slab: its destructor may spawn or wake,
            // and may panic, which must not take the reactor down.
            if catch_unwind(AssertUnwindSafe(move || drop(fut))).is_err() {
                eprintln!(
                    "strata: a task's destructor panicked on reactor gid {}",
                    self.gid
                );
            }
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.live = false;
            slot.scheduled = false;
            slot.generation = slot.generation.wrapping_add(1);
            self.free.borrow_mut().push(index);
            self.live.set(self.live.get() - 1);
        } else {
            self.slots.borrow_mut()[index as usize].future = Some(fut);
        }
    }

    /// Drops every task (reactor shutdown). Their destructors run on this thread.
    pub(crate) fn clear(&self) {
        let futures: Vec<_> = {
            let mut slots = self.slots.borrow_mut();
            slots
                .iter_mut()
                .filter_map(|s| {
                    s.live = false;
                    s.generation = s.generation.wrapping_add(1);
                    s.future.take()
                })
                .collect()
        };
        for fut in futures {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
        self.ready.borrow_mut().clear();
        self.live.set(0);
    }

    fn waker(&self, index: u32, generation: u16) -> Waker {
        let data = encode(self.gid, generation, index);
        // SAFETY: VTABLE's functions treat the data word as a plain integer and never
        // dereference it, so any value is valid and the waker is trivially Send + Sync.
        unsafe { Waker::from_raw(RawWaker::new(data as *const (), &VTABLE)) }
    }
}

fn encode(gid: u16, generation: u16, index: u32) -> usize {
    ((gid as usize) << 48) | ((generation as usize) << 32) | index as usize
}

fn decode(data: *const ()) -> (u16, u16, u32) {
    let d = data as usize;
    ((d >> 48) as u16, (d >> 32) as u16, d as u32)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn clone_raw(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

fn wake_raw(data: *const ()) {
    let (gid, generation, index) = decode(data);
    super::wake_task(gid, generation, index);
}

fn drop_raw(_: *const ()) {}

/// Cooperative budget: a task that keeps completing work without ever waiting (memory or
/// null-co requests complete immediately) yields after [`coop::BUDGET`] such steps so the
/// loop can reap completions, read its inbox and run other tasks.
pub mod coop {
    use std::cell::Cell;
    use std::task::{Context, Poll};

    pub const BUDGET: u32 = 128;

    thread_local! {
        static LEFT: Cell<u32> = const { Cell::new(BUDGET) };
    }

    pub(crate) fn reset() {
        LEFT.with(|l| l.set(BUDGET));
    }

    /// Spends one unit of the running task's budget; when it is gone, schedules the task
    /// again and returns `Pending`.
    #[inline]
    pub fn poll_proceed(cx: &mut Context<'_>) -> Poll<()> {
        LEFT.with(|l| {
            let left = l.get();
            if left == 0 {
                l.set(BUDGET);
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                l.set(left - 1);
                Poll::Ready(())
            }
        })
    }
}

/// Yields once to the reactor loop.
pub fn yield_now() -> impl Future<Output = ()> {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waker_words_round_trip() {
        let d = encode(0xabcd, 0x1234, 0xdead_beef);
        assert_eq!(decode(d as *const ()), (0xabcd, 0x1234, 0xdead_beef));
    }
}
