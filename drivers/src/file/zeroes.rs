//! Write-zeroes and discard: `fallocate` on the ring, with a fallback to writing zero
//! buffers where the file system cannot zero ranges itself.
//!
//! Write-zeroes with `MAY_UNMAP` first tries `PUNCH_HOLE|KEEP_SIZE` (deallocates; reads
//! back zeroes on regular files, and on block devices the kernel only succeeds if the
//! device guarantees zeroes), then `ZERO_RANGE`, then zero buffers. A file system that
//! answers `EOPNOTSUPP` is remembered per queue, so later requests skip the doomed call.
//! `EINVAL` also falls back (block devices refuse unaligned ranges, some file systems
//! refuse the mode) but is not remembered, since it may be about this request only.
//!
//! Alignment: the request checks do not require it for zeroes and discard. `fallocate` on
//! a regular file takes any byte range; on a block device it takes whole logical blocks
//! only, so write-zeroes sends the aligned middle to `fallocate` and writes the ragged
//! head and tail as zero buffers, and discard drops them. Writing zero buffers on an
//! `O_DIRECT` file needs aligned ranges: an unaligned one fails with `EINVAL` rather than
//! doing a read-modify-write of the edge blocks, which would race with concurrent writes
//! to the same blocks (nothing here serialises overlapping requests).

use super::queue::QueueState;
use strata_engine::reactor::ring;
use strata_engine::{Buffer, Errno, ReqFlags};

/// Largest zero buffer the fallback writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Whether `fallocate` failed because this file cannot do it (as opposed to an I/O error).
fn unsupported(e: Errno) -> bool {
    e == Errno::ENOTSUP || e == Errno::EINVAL || e.0 == libc::ENOSYS
}

/// `fallocate(mode, offset, len)` on the ring, retrying `EINTR`.
async fn fallocate(state: &QueueState, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    loop {
        let (res, ()) = ring::fallocate(state.target, mode, offset, len).await;
        match ring::cqe_result(res) {
            Err(e) if e.0 == libc::EINTR => continue,
            r => return r.map(drop),
        }
    }
}

/// Runs `fallocate` unless `enabled` says the file system cannot; `Ok(true)` if it did
/// the job, `Ok(false)` if the caller should try something else.
async fn try_fallocate(
    state: &QueueState,
    enabled: &std::cell::Cell<bool>,
    mode: i32,
    offset: u64,
    len: u64,
) -> Result<bool, Errno> {
    if !enabled.get() {
        return Ok(false);
    }
    match fallocate(state, mode, offset, len).await {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => {
            if e != Errno::EINVAL {
                enabled.set(false);
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Makes `len` bytes at `offset` read as zeroes. On a block device, whose `fallocate`
/// needs whole logical blocks, the unaligned head and tail (less than a block each) are
/// written as zero buffers and only the aligned middle goes to `fallocate`.
pub(super) async fn write_zeroes(
    state: &QueueState,
    offset: u64,
    len: u64,
    flags: ReqFlags,
) -> Result<(), Errno> {
    let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
    // Too short to hold a whole block: all of it is head.
    let (start, mid_end) = inner(offset, end, state.host.fallocate_align).unwrap_or((end, end));
    if (start != offset || mid_end != end) && flags.contains(ReqFlags::NO_FALLBACK) {
        return Err(Errno::ENOTSUP);
    }
    if start > offset {
        write_zero_buffers(state, offset, start - offset).await?;
    }
    if mid_end > start {
        zero_range(state, start, mid_end - start, flags).await?;
    }
    if end > mid_end {
        write_zero_buffers(state, mid_end, end - mid_end).await?;
    }
    Ok(())
}

/// The aligned part `start..end` of `offset..end`, if it is not empty.
fn inner(offset: u64, end: u64, align: u32) -> Option<(u64, u64)> {
    let align = u64::from(align.max(1));
    let start = offset.checked_next_multiple_of(align)?;
    let end = end - end % align;
    (start < end).then_some((start, end))
}

/// Zeroes an aligned range: `fallocate` if the file system can, else zero buffers.
async fn zero_range(
    state: &QueueState,
    offset: u64,
    len: u64,
    flags: ReqFlags,
) -> Result<(), Errno> {
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
    if flags.contains(ReqFlags::MAY_UNMAP)
        && try_fallocate(state, &state.punch_hole, PUNCH, offset, len).await?
    {
        return Ok(());
    }
    if try_fallocate(state, &state.zero_range, ZERO, offset, len).await? {
        return Ok(());
    }
    if flags.contains(ReqFlags::NO_FALLBACK) {
        return Err(Errno::ENOTSUP);
    }
    write_zero_buffers(state, offset, len).await
}

/// The fallback: plain writes of zero buffers, up to [`ZERO_CHUNK`] bytes each.
async fn write_zero_buffers(state: &QueueState, offset: u64, len: u64) -> Result<(), Errno> {
    let align = u64::from(state.host.align);
    if state.host.direct && (offset % align != 0 || len % align != 0) {
        return Err(Errno::EINVAL);
    }
    let mut buf = Buffer::zeroed(len.min(ZERO_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        buf.set_len(n as usize);
        let (result, b) =
            super::transfer::write(state.target, buf, offset + done, 0, state.host.direct).await;
        buf = b;
        result?;
        done += n;
    }
    Ok(())
}

/// Deallocates what it can of `len` bytes at `offset`: the part `fallocate` accepts
/// (whole logical blocks on a block device). Discard is advisory, so a file system that
/// cannot punch holes, or a range too small to hold a block, is success.
pub(super) async fn discard(state: &QueueState, offset: u64, len: u64) -> Result<(), Errno> {
    let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
    let Some((start, end)) = inner(offset, end, state.host.fallocate_align) else {
        return Ok(());
    };
    if !state.punch_hole.get() {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(state, mode, start, end - start).await {
        Err(e) if e == Errno::ENOTSUP || e.0 == libc::ENOSYS => {
            state.punch_hole.set(false);
            Ok(())
        }
        r => r,
    }
}
