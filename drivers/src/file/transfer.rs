//! Reads and writes that finish what they start: short transfers continue at the new
//! offset, `EINTR`/`EAGAIN` are retried, end of file reads as zeroes.
//!
//! The first attempt moves the whole buffer ([`ring::read_at`] / [`ring::write_at`]); a
//! continuation moves only the rest ([`ring::read_at_from`] / [`ring::write_at_from`]).

use strata_engine::reactor::ring::{self, Target};
use strata_engine::reactor::yield_now;
use strata_engine::{Buffer, Errno};

/// Consecutive `EINTR`/`EAGAIN` results before the request fails with that errno.
const MAX_RETRIES: u32 = 64;

/// What a retry loop should do with one CQE result.
enum Step {
    /// `n` bytes moved.
    Moved(usize),
    /// Try the same transfer again.
    Retry,
}

fn step(res: i32, retries: &mut u32) -> Result<Step, Errno> {
    match ring::cqe_result(res) {
        Ok(n) => {
            *retries = 0;
            Ok(Step::Moved(n))
        }
        Err(e) if (e == Errno::EINTR || e == Errno::EAGAIN) && *retries < MAX_RETRIES => {
            *retries += 1;
            Ok(Step::Retry)
        }
        Err(e) => Err(e),
    }
}

/// With `eager`, each op goes to the kernel as soon as it is queued (`O_DIRECT`: see
/// the module essay of the driver) instead of with the loop iteration's batch.
///
/// Fills `buf` from `offset`. Bytes past the end of the file read as zeroes. With
/// `O_DIRECT` (`align > 1`), a transfer that stops at an unaligned length has reached
/// the end of the file (the kernel returns unaligned counts only there).
pub(super) async fn read(
    target: Target,
    mut buf: Buffer,
    offset: u64,
    align: u64,
    eager: bool,
) -> (Result<(), Errno>, Buffer) {
    let len = buf.len();
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        let op = if done == 0 {
            ring::read_at(target, buf, offset)
        } else {
            ring::read_at_from(target, buf, done, offset + done as u64)
        };
        if eager {
            ring::submit_now();
        }
        let (res, b) = op.await;
        buf = b;
        match step(res, &mut retries) {
            Ok(Step::Moved(0)) => break,
            Ok(Step::Moved(n)) => {
                done += n.min(len - done);
                if align > 1 && done % align as usize != 0 {
                    break;
                }
            }
            Ok(Step::Retry) => yield_now().await,
            Err(e) => return (Err(e), buf),
        }
    }
    buf[done..].fill(0);
    (Ok(()), buf)
}

/// Writes all of `buf` at `offset`, with `rw_flags` (`RWF_DSYNC` for FUA) on every part.
pub(super) async fn write(
    target: Target,
    mut buf: Buffer,
    offset: u64,
    rw_flags: i32,
    eager: bool,
) -> (Result<(), Errno>, Buffer) {
    let len = buf.len();
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        let op = if done == 0 {
            ring::write_at(target, buf, offset, rw_flags)
        } else {
            ring::write_at_from(target, buf, done, offset + done as u64, rw_flags)
        };
        if eager {
            ring::submit_now();
        }
        let (res, b) = op.await;
        buf = b;
        match step(res, &mut retries) {
            // No progress and no error: the device takes no more (as pwrite(2) would).
            Ok(Step::Moved(0)) => return (Err(Errno::ENOSPC), buf),
            Ok(Step::Moved(n)) => done += n.min(len - done),
            Ok(Step::Retry) => yield_now().await,
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}
