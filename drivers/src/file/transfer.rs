//! Reads and writes that finish what they start: short transfers continue at the new
//! offset, `EINTR`/`EAGAIN` are retried, end of file reads as zeroes.
//!
//! The first attempt uses the engine's [`ring::read_at`] / [`ring::write_at`], which move
//! the whole buffer. A continuation must move only the rest of the buffer, which those
//! helpers cannot express, so [`read_part`] / [`write_part`] build the entry themselves
//! with a pointer into the buffer the op owns (see the `SAFETY` note in `start`).

use io_uring::{opcode, squeue, types};
use strata_engine::reactor::ring::{self, RingOp, Target};
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
        Err(e) if (e.0 == libc::EINTR || e == Errno::EAGAIN) && *retries < MAX_RETRIES => {
            *retries += 1;
            Ok(Step::Retry)
        }
        Err(e) => Err(e),
    }
}

/// Fills `buf` from `offset`. Bytes past the end of the file read as zeroes. With
/// `O_DIRECT` (`align > 1`), a transfer that stops at an unaligned length has reached
/// the end of the file (the kernel returns unaligned counts only there).
pub(super) async fn read(
    target: Target,
    mut buf: Buffer,
    offset: u64,
    align: u64,
) -> (Result<(), Errno>, Buffer) {
    let len = buf.len();
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        let (res, b) = if done == 0 {
            ring::read_at(target, buf, offset).await
        } else {
            read_part(target, buf, done, offset + done as u64).await
        };
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
) -> (Result<(), Errno>, Buffer) {
    let len = buf.len();
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        let (res, b) = if done == 0 {
            ring::write_at(target, buf, offset, rw_flags).await
        } else {
            write_part(target, buf, done, offset + done as u64, rw_flags).await
        };
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

/// Reads into `buf[from..]` at `offset` (one op; may be short).
pub(super) fn read_part(
    target: Target,
    mut buf: Buffer,
    from: usize,
    offset: u64,
) -> RingOp<Buffer> {
    let from = from.min(buf.len());
    let len = u32::try_from(buf.len() - from).unwrap_or(u32::MAX);
    let ptr = buf.as_mut_ptr().wrapping_add(from);
    let entry = match target {
        Target::Fd(fd) => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
        Target::Fixed(i) => opcode::Read::new(types::Fixed(i), ptr, len)
            .offset(offset)
            .build(),
    };
    start(entry, buf)
}

/// Writes `buf[from..]` at `offset` (one op; may be short).
pub(super) fn write_part(
    target: Target,
    buf: Buffer,
    from: usize,
    offset: u64,
    rw_flags: i32,
) -> RingOp<Buffer> {
    let from = from.min(buf.len());
    let len = u32::try_from(buf.len() - from).unwrap_or(u32::MAX);
    let ptr = buf.as_ptr().wrapping_add(from);
    let entry = match target {
        Target::Fd(fd) => opcode::Write::new(types::Fd(fd), ptr, len),
        Target::Fixed(i) => opcode::Write::new(types::Fixed(i), ptr, len),
    }
    .offset(offset)
    .rw_flags(rw_flags)
    .build();
    start(entry, buf)
}

/// Starts `entry`, which points into `buf`, giving `buf` to the op.
fn start(entry: squeue::Entry, buf: Buffer) -> RingOp<Buffer> {
    // SAFETY: the callers built `entry` with a pointer to `buf.as_ptr() + from` and a length
    // of at most `buf.len() - from`, with `from <= buf.len()`, so the kernel touches only
    // bytes inside `buf`'s allocation. `buf` moves into the op, which owns it until the CQE
    // is reaped (even if the future is dropped: ring ownership rules 1-3), and a Buffer's
    // heap allocation does not move when the Buffer value does. Queues and their requests
    // run only on reactor threads.
    unsafe { RingOp::start(entry, buf) }
}
