//! A `file` node's queue on one reactor: the descriptor registered in that reactor's
//! ring, and the dispatch of each op to its system call.

use super::open::Host;
use super::{status, transfer, zeroes};
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use strata_engine::reactor::ring::{self, FixedFile, Target};
use strata_engine::{Completion, Errno, IoFuture, Op, Queue, ReqFlags, Request};

/// One reactor's queue. Requests in flight hold an `Rc` of its state, so the registered
/// file (and the descriptor behind it) outlives every request that names it, even one
/// still continuing after the queue itself was dropped.
pub(super) struct FileQueue {
    state: Rc<QueueState>,
}

/// What requests on one reactor share.
pub(super) struct QueueState {
    /// How ops name the file: the fixed-file index if registration worked, else the fd.
    pub target: Target,
    /// Kept for its `Drop`, which removes the file from the ring's table. Declared before
    /// `host`, so the table entry goes before the descriptor may close.
    _fixed: Option<FixedFile>,
    pub host: Arc<Host>,
    /// Cleared when the file system answers `EOPNOTSUPP` to `fallocate(ZERO_RANGE)`.
    pub zero_range: Cell<bool>,
    /// Cleared when the file system answers `EOPNOTSUPP` to `fallocate(PUNCH_HOLE)`.
    pub punch_hole: Cell<bool>,
}

impl FileQueue {
    /// Opens the queue on the calling reactor: registers the file with its ring, or uses
    /// the plain descriptor if the ring cannot register it.
    pub fn open(host: Arc<Host>) -> FileQueue {
        let fixed = FixedFile::register(host.fd.as_raw_fd()).ok();
        let target = fixed
            .as_ref()
            .map_or(Target::Fd(host.fd.as_raw_fd()), FixedFile::target);
        let state = QueueState {
            target,
            _fixed: fixed,
            host,
            zero_range: Cell::new(true),
            punch_hole: Cell::new(true),
        };
        FileQueue {
            state: Rc::new(state),
        }
    }

    /// How this queue names the file (for tests of the fallback).
    #[cfg(test)]
    pub fn target(&self) -> Target {
        self.state.target
    }
}

impl Queue for FileQueue {
    fn submit(&self, req: Request) -> IoFuture {
        let state = self.state.clone();
        IoFuture::pending(async move {
            let mut req = req;
            let result = run(&state, &mut req).await;
            Completion { req, result }
        })
    }
}

/// Runs one checked request.
async fn run(state: &QueueState, req: &mut Request) -> Result<(), Errno> {
    let host = &state.host;
    match req.op {
        Op::Read => {
            let buf = req.buf.take().ok_or(Errno::EINVAL)?;
            let (result, buf) = transfer::read(
                state.target,
                buf,
                req.offset,
                u64::from(host.align),
                host.direct,
            )
            .await;
            req.buf = Some(buf);
            result
        }
        Op::Write => {
            let buf = req.buf.take().ok_or(Errno::EINVAL)?;
            let (result, buf) = transfer::write(
                state.target,
                buf,
                req.offset,
                rw_flags(host, req.flags),
                host.direct,
            )
            .await;
            req.buf = Some(buf);
            result
        }
        Op::Flush => flush(state).await,
        Op::WriteZeroes => {
            zeroes::write_zeroes(state, req.offset, req.len, req.flags).await?;
            if req.flags.contains(ReqFlags::FUA) {
                flush(state).await
            } else {
                Ok(())
            }
        }
        Op::Discard => zeroes::discard(state, req.offset, req.len).await,
        Op::BlockStatus => {
            req.extents = status::block_status(host.clone(), req.offset, req.len).await?;
            Ok(())
        }
    }
}

/// `RWF_*` flags for a write: `RWF_DSYNC` for FUA, unless flushes are off.
pub(super) fn rw_flags(host: &Host, flags: ReqFlags) -> i32 {
    if flags.contains(ReqFlags::FUA) && !host.no_flush {
        libc::RWF_DSYNC
    } else {
        0
    }
}

/// `fdatasync`, unless `cache.no-flush`.
async fn flush(state: &QueueState) -> Result<(), Errno> {
    if state.host.no_flush {
        return Ok(());
    }
    loop {
        let (res, ()) = ring::fsync(state.target, true).await;
        match ring::cqe_result(res) {
            Err(e) if e.0 == libc::EINTR => continue,
            r => return r.map(drop),
        }
    }
}
