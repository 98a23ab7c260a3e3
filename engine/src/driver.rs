//! The driver interface: one shared [`Driver`] object per node, one [`Queue`] per reactor.
//!
//! ```text
//!   admin thread                          reactor N (pinned)
//!   ------------                          ------------------
//!   Arc<dyn Driver>  --open_queue()-->    Box<dyn Queue>   (!Send, per-reactor state)
//!   (options, size,                       wrapped in a Handle that checks every
//!    shared state)                        Request before the driver sees it
//! ```
//!
//! The driver object is opened once (on the admin thread) and is `Send + Sync`; the hot
//! path only touches the queue, which lives on one reactor and needs no locks. Queues are
//! opened on the reactor that will use them, so they can register files with that
//! reactor's ring.
//!
//! Every request goes through [`Handle::submit`], which fails out-of-range, misaligned,
//! oversized, unsupported and read-only-violating requests with an errno before the
//! driver sees them. Drivers may therefore assume a checked request.
//!
//! Drivers complete either immediately ([`IoFuture::ready`], no allocation: memory and
//! null-co) or with a boxed future ([`IoFuture::pending`]: ring I/O, timers).

use crate::errno::Errno;
use crate::error::Error;
use crate::graph::{ChildRole, Children, Perm, default_child_perm};
use crate::reactor::coop;
use crate::request::{Completion, Op, OpSet, ReqFlags, Request};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What a driver reports about itself. Lengths in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// Size of the node.
    pub size: u64,
    /// Offsets and lengths of reads and writes must be multiples of this (1: any).
    pub request_alignment: u32,
    /// Largest request (read, write, write-zeroes, discard, block-status) in bytes.
    pub max_transfer: u64,
    /// Supported ops and whether FUA writes are supported.
    pub ops: OpSet,
    /// Whether the node refuses writes.
    pub read_only: bool,
}

/// A block driver instance (one per node): shared, opened on the admin thread.
pub trait Driver: Send + Sync + fmt::Debug {
    /// The driver's name as users write it (`"null-co"`, `"file"`).
    fn driver_name(&self) -> &'static str;

    /// Current size, alignment, limits and supported ops.
    fn info(&self) -> DriverInfo;

    /// Opens this reactor's queue. Called on the reactor thread that will use it, with
    /// the node's children on that reactor (empty outside a graph: see
    /// [`Children::get_or_open`]).
    fn open_queue(&self, children: &Children) -> Result<Box<dyn Queue>, Errno>;

    /// A filter passes requests to one FILTERED|PRIMARY child unchanged (QEMU's
    /// `is_filter`). The graph's filter helpers skip such nodes.
    fn is_filter(&self) -> bool {
        false
    }

    /// What this node needs from child `name` (in `role`) and what it lets others do
    /// with it, given the node's own cumulative parent permissions. QEMU's default
    /// rules unless a driver knows better.
    fn child_perm(&self, name: &str, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let _ = name;
        default_child_perm(role, !self.info().read_only, perm, shared)
    }

    /// Prepares to hold `perm` while sharing only `shared` (the union and intersection
    /// over the node's parents). File nodes take their image locks here. Either
    /// [`Driver::set_perm`] or [`Driver::abort_perm`] follows. Admin thread.
    fn check_perm(&self, perm: Perm, shared: Perm) -> Result<(), Error> {
        let _ = (perm, shared);
        Ok(())
    }

    /// Commits the permissions of the last [`Driver::check_perm`].
    fn set_perm(&self, perm: Perm, shared: Perm) {
        let _ = (perm, shared);
    }

    /// Rolls back the last [`Driver::check_perm`].
    fn abort_perm(&self) {}

    /// Checks the node still fits its children after a change below it (a `raw` window
    /// must lie inside its child). Called on the admin thread on every ancestor of a
    /// re-parented child before the change commits.
    fn check_children(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Points child `name` at another node (re-parenting). The graph calls this on the
    /// admin thread while preparing the change, and again with the old child if the
    /// change is rolled back; queues are reopened afterwards. Drivers without children
    /// refuse.
    fn replace_child(&self, name: &str, child: &Arc<dyn Driver>) -> Result<(), Error> {
        let _ = child;
        Err(Error::new(
            crate::ErrorKind::Unsupported,
            format!(
                "driver '{}' has no child '{name}' that can be replaced",
                self.driver_name()
            ),
        ))
    }
}

/// A driver's per-reactor queue: all the data path touches.
pub trait Queue {
    /// Starts a request that [`Handle`] has already checked.
    fn submit(&self, req: Request) -> IoFuture;
}

/// The future of one request: either already complete (no allocation) or pending.
pub enum IoFuture {
    Ready(Option<Completion>),
    Pending(Pin<Box<dyn Future<Output = Completion>>>),
}

impl IoFuture {
    pub fn ready(req: Request, result: Result<(), Errno>) -> IoFuture {
        IoFuture::Ready(Some(Completion { req, result }))
    }

    pub fn pending(fut: impl Future<Output = Completion> + 'static) -> IoFuture {
        IoFuture::Pending(Box::pin(fut))
    }
}

impl Future for IoFuture {
    type Output = Completion;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        match self.get_mut() {
            IoFuture::Ready(done) => {
                // A chain of immediate completions must still let other tasks and the
                // reactor loop run: spend the task's cooperative budget.
                std::task::ready!(coop::poll_proceed(cx));
                Poll::Ready(done.take().expect("BUG: IoFuture polled after completion"))
            }
            IoFuture::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for IoFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoFuture::Ready(c) => f.debug_tuple("Ready").field(c).finish(),
            IoFuture::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Checks a request against a node's limits. The errno choices follow what the NBD
/// protocol and QEMU give for the same mistakes.
pub fn check(info: &DriverInfo, req: &Request) -> Result<(), Errno> {
    if !info.ops.supports(req.op) {
        return Err(Errno::ENOTSUP);
    }
    if req.op == Op::Flush {
        return Ok(());
    }
    if req.op.is_write() && info.read_only {
        return Err(Errno::EPERM);
    }
    if req.flags.contains(ReqFlags::FUA) && !info.ops.fua() {
        return Err(Errno::ENOTSUP);
    }
    let end = req.end().ok_or(Errno::EINVAL)?;
    if end > info.size {
        // Writing past the end of a device is "no space"; anything else is invalid.
        return Err(if matches!(req.op, Op::Write | Op::WriteZeroes) {
            Errno::ENOSPC
        } else {
            Errno::EINVAL
        });
    }
    if req.len > info.max_transfer {
        return Err(Errno::EINVAL);
    }
    if matches!(req.op, Op::Read | Op::Write) {
        let align = u64::from(info.request_alignment.max(1));
        if req.offset % align != 0 || req.len % align != 0 {
            return Err(Errno::EINVAL);
        }
        match &req.buf {
            Some(buf) if buf.len() as u64 == req.len => {}
            _ => return Err(Errno::EINVAL),
        }
    }
    Ok(())
}

/// A reactor's checked entry to a node: what the rest of the engine calls.
pub struct Handle {
    info: DriverInfo,
    queue: Box<dyn Queue>,
}

impl Handle {
    /// Opens `driver`'s queue on the current reactor, outside any graph.
    pub fn open(driver: &dyn Driver) -> Result<Handle, Errno> {
        Handle::open_with(driver, &Children::none())
    }

    /// Opens `driver`'s queue on the current reactor with its children.
    pub fn open_with(driver: &dyn Driver, children: &Children) -> Result<Handle, Errno> {
        Ok(Handle {
            info: driver.info(),
            queue: driver.open_queue(children)?,
        })
    }

    pub fn info(&self) -> &DriverInfo {
        &self.info
    }

    /// Submits `req`; bad requests complete at once with an errno.
    #[inline]
    pub fn submit(&self, req: Request) -> IoFuture {
        if let Err(e) = check(&self.info, &req) {
            return IoFuture::ready(req, Err(e));
        }
        if req.len == 0 && req.op != Op::Flush {
            return IoFuture::ready(req, Ok(()));
        }
        self.queue.submit(req)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    fn info() -> DriverInfo {
        DriverInfo {
            size: 1 << 20,
            request_alignment: 512,
            max_transfer: 1 << 16,
            ops: OpSet::all().without(Op::Discard).with_fua(false),
            read_only: false,
        }
    }

    #[test]
    fn check_rejects_each_bad_request_with_its_errno() {
        let i = info();
        assert_eq!(check(&i, &Request::read(0, Buffer::new(512))), Ok(()));
        assert_eq!(
            check(&i, &Request::read(1, Buffer::new(512))),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            check(&i, &Request::read(0, Buffer::new(100))),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            check(&i, &Request::read(1 << 20, Buffer::new(512))),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            check(
                &i,
                &Request::write((1 << 20) - 512, Buffer::new(1024), ReqFlags::NONE)
            ),
            Err(Errno::ENOSPC)
        );
        assert_eq!(
            check(&i, &Request::read(0, Buffer::new(1 << 17))),
            Err(Errno::EINVAL)
        );
        assert_eq!(check(&i, &Request::discard(0, 512)), Err(Errno::ENOTSUP));
        assert_eq!(
            check(&i, &Request::write(0, Buffer::new(512), ReqFlags::FUA)),
            Err(Errno::ENOTSUP)
        );
        assert_eq!(
            check(&i, &Request::write_zeroes(u64::MAX, 2, ReqFlags::NONE)),
            Err(Errno::EINVAL)
        );
        // Zeroes need no alignment: drivers handle byte ranges.
        assert_eq!(
            check(&i, &Request::write_zeroes(3, 5, ReqFlags::NONE)),
            Ok(())
        );
        let ro = DriverInfo {
            read_only: true,
            ..i
        };
        assert_eq!(
            check(&ro, &Request::write(0, Buffer::new(512), ReqFlags::NONE)),
            Err(Errno::EPERM)
        );
        assert_eq!(check(&ro, &Request::flush()), Ok(()));
    }

    #[test]
    fn a_request_without_its_buffer_is_refused_not_a_panic() {
        let mut req = Request::read(0, Buffer::new(512));
        req.buf = None;
        assert_eq!(check(&info(), &req), Err(Errno::EINVAL));
    }
}
