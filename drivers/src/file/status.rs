//! Block-status: which parts of the file hold data and which are holes, from
//! `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`.
//!
//! io_uring has no seek, and `lseek` on these whence values may wait for the file system
//! (extent trees, locks), so the calls run on the engine's blocking pool and the reactor
//! only awaits the reply. One request walks up to [`MAX_EXTENTS`] runs in one trip.
//!
//! Every extent is `allocated` (this node answers for all its bytes; there is no backing
//! file below a `file` node). A hole is `zero` and not `data`; a data run is `data` and not
//! `zero`. Past the end of the file (it shrank under the node) reads return zeroes, and
//! `SEEK_DATA` says `ENXIO` there: a hole. Where the file system cannot seek holes, or a
//! seek fails for another reason, the rest of the range is reported as data, the answer
//! that is never wrong.

use super::open::Host;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use strata_engine::reactor::blocking;
use strata_engine::{Errno, Extent, ExtentState};

/// Most extents one block-status request returns (callers ask again for the rest).
pub(super) const MAX_EXTENTS: usize = 64;

const DATA: ExtentState = ExtentState {
    allocated: true,
    zero: false,
    data: true,
};
const HOLE: ExtentState = ExtentState {
    allocated: true,
    zero: true,
    data: false,
};

/// Describes `len` bytes at `offset`, from `offset` onwards.
pub(super) async fn block_status(
    host: Arc<Host>,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>, Errno> {
    let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
    // Canceled only if the helper thread died: report it as an I/O error.
    blocking(move || scan(host.fd.as_raw_fd(), offset, end))
        .await
        .map_err(|_| Errno::EIO)
}

/// Walks `offset..end` run by run (blocking: runs on a helper thread).
fn scan(fd: RawFd, offset: u64, end: u64) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let (len, state) = run_at(fd, pos, end);
        match extents.last_mut() {
            Some(last) if last.state == state => last.len += len,
            _ => extents.push(Extent {
                offset: pos,
                len,
                state,
            }),
        }
        pos += len;
    }
    extents
}

/// The run starting at `pos`: its length (at least 1, at most `end - pos`) and state.
fn run_at(fd: RawFd, pos: u64, end: u64) -> (u64, ExtentState) {
    let rest = end - pos;
    match seek(fd, pos, libc::SEEK_DATA) {
        // No data at or after `pos`: a hole up to the end of the file, zeroes after it.
        Err(e) if e.0 == libc::ENXIO => (rest, HOLE),
        // Cannot tell (no SEEK_DATA here, or an error): data is the safe answer.
        Err(_) => (rest, DATA),
        Ok(data) if data > pos => ((data - pos).min(rest), HOLE),
        Ok(_) => match seek(fd, pos, libc::SEEK_HOLE) {
            Ok(hole) if hole > pos => ((hole - pos).min(rest), DATA),
            // The file changed between the two calls, or an error: data again.
            _ => (rest, DATA),
        },
    }
}

fn seek(fd: RawFd, pos: u64, whence: libc::c_int) -> Result<u64, Errno> {
    let pos = libc::off_t::try_from(pos).map_err(|_| Errno::EINVAL)?;
    // SAFETY: lseek takes plain integers; an invalid fd is reported as EBADF, not UB.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    u64::try_from(r).map_err(|_| Errno::last())
}
