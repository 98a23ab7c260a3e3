//! Limit checks: requests outside the node fail with the right errno, read-only nodes
//! refuse writes, block-status answers from the requested start and never claims that
//! data reads as zeroes.

use super::{Ctx, DATA, Suite, fails, ok, pattern, read, same_bytes, write};
use std::sync::Arc;
use strata_engine::{Buffer, Driver, Errno, Handle, ReqFlags, Request};

pub(super) fn run(suite: &Suite<'_>, read_only: Option<&dyn Fn() -> Arc<dyn Driver>>) {
    suite.check("requests beyond the end", 0, beyond_the_end);
    suite.check("requests overflowing u64", 1, overflow);
    suite.check("block-status", 0, block_status);
    suite.check("block-status of written data", 1, block_status_of_data);
    if let Some(make) = read_only {
        suite
            .spawn(1, make(), read_only_node)
            .wait("read-only node");
    }
}

async fn beyond_the_end(h: Handle, ctx: Ctx) {
    let size = ctx.info.size;
    let a = ctx.align();
    let au = a as usize;
    fails(
        &h.submit(Request::read(size, Buffer::new(au))).await,
        Errno::EINVAL,
        "read at the end",
    );
    fails(
        &h.submit(Request::read(size - a, Buffer::new(2 * au))).await,
        Errno::EINVAL,
        "read across the end",
    );
    fails(
        &h.submit(Request::read(size + 4096, Buffer::new(au))).await,
        Errno::EINVAL,
        "read after the end",
    );
    let write = |offset, len| Request::write(offset, Buffer::new(len), ReqFlags::NONE);
    fails(
        &h.submit(write(size, au)).await,
        Errno::ENOSPC,
        "write at the end",
    );
    fails(
        &h.submit(write(size - a, 2 * au)).await,
        Errno::ENOSPC,
        "write across the end",
    );
    let zeroes = Request::write_zeroes(size - a, 2 * a, ReqFlags::NONE);
    fails(
        &h.submit(zeroes).await,
        Errno::ENOSPC,
        "write-zeroes across the end",
    );
    fails(
        &h.submit(Request::discard(size, a)).await,
        Errno::EINVAL,
        "discard at the end",
    );
    fails(
        &h.submit(Request::block_status(size, a)).await,
        Errno::EINVAL,
        "block-status at the end",
    );
    // The last block itself is fine.
    ok(
        &h.submit(Request::read(size - a, Buffer::new(au))).await,
        "read of the last block",
    );
    ok(
        &h.submit(Request::block_status(size - a, a)).await,
        "block-status of the last block",
    );
}

async fn overflow(h: Handle, _ctx: Ctx) {
    let near_max: u64 = !4095;
    fails(
        &h.submit(Request::read(near_max, Buffer::new(8192))).await,
        Errno::EINVAL,
        "read overflowing u64",
    );
    let w = Request::write(near_max, Buffer::new(8192), ReqFlags::NONE);
    fails(&h.submit(w).await, Errno::EINVAL, "write overflowing u64");
    let z = Request::write_zeroes(u64::MAX, 2, ReqFlags::NONE);
    fails(
        &h.submit(z).await,
        Errno::EINVAL,
        "write-zeroes overflowing u64",
    );
    fails(
        &h.submit(Request::discard(u64::MAX - 1, 4)).await,
        Errno::EINVAL,
        "discard overflowing u64",
    );
    let bs = Request::block_status(u64::MAX, u64::MAX);
    fails(
        &h.submit(bs).await,
        Errno::EINVAL,
        "block-status overflowing u64",
    );
}

/// Asks block-status at `offset` and checks the extents' shape; returns them.
async fn status(h: &Handle, ctx: Ctx, offset: u64, len: u64) -> Vec<strata_engine::Extent> {
    let what = format!("block-status of {len} bytes at {offset}");
    let c = h.submit(Request::block_status(offset, len)).await;
    ok(&c, &what);
    let extents = c.req.extents;
    assert!(!extents.is_empty(), "{what}: no extent");
    assert_eq!(
        extents[0].offset, offset,
        "{what}: the first extent must start at the requested offset"
    );
    let mut next = offset;
    for e in &extents {
        assert_eq!(
            e.offset, next,
            "{what}: extents must be contiguous: {extents:?}"
        );
        assert!(e.len > 0, "{what}: empty extent in {extents:?}");
        next = e.offset + e.len;
    }
    assert!(
        next <= offset + len,
        "{what}: extents go past the requested range: {extents:?}"
    );
    if ctx.stores_data {
        // An extent that says "reads as zeroes" must read as zeroes.
        for e in extents.iter().filter(|e| e.state.zero) {
            let n = e.len.min(256 * 1024) as usize;
            let got = read(h, e.offset, n, &what).await;
            same_bytes(
                &got,
                &vec![0; n],
                e.offset,
                &format!("{what}: extent {e:?} claims zeroes"),
            );
        }
    }
    extents
}

async fn block_status(h: Handle, ctx: Ctx) {
    let size = ctx.info.size;
    let a = ctx.align();
    for (offset, len) in [(0, size), (a, 1 << 20), (size / 2 + a, a), (size - a, a)] {
        status(&h, ctx, offset, len.min(ctx.info.max_transfer)).await;
    }
    // Walking the whole node extent by extent ends exactly at its size.
    let mut offset = 0;
    let mut asked = 0;
    while offset < size {
        let len = (size - offset).min(ctx.info.max_transfer);
        let extents = status(&h, ctx, offset, len).await;
        let last = extents
            .last()
            .expect("BUG: status checks that extents are not empty");
        offset = last.offset + last.len;
        asked += 1;
        assert!(
            asked < 100_000,
            "block-status walk does not make progress (at {offset})"
        );
    }
    assert_eq!(offset, size, "block-status walk ends at the node's size");
}

async fn block_status_of_data(h: Handle, ctx: Ctx) {
    let (offset, len) = (DATA + 256 * 1024, 64 * 1024);
    let data = pattern(42, offset, len);
    write(&h, offset, &data, "data for block-status").await;
    let extents = status(&h, ctx, offset, len as u64).await;
    if ctx.stores_data {
        assert!(
            !extents[0].state.zero,
            "block-status claims written data reads as zeroes: {extents:?}"
        );
    }
}

async fn read_only_node(h: Handle, ctx: Ctx) {
    assert!(
        h.info().read_only,
        "a node opened read-only reports read_only"
    );
    let a = ctx.align() as usize;
    let c = h
        .submit(Request::write(0, Buffer::new(a), ReqFlags::NONE))
        .await;
    fails(&c, Errno::EPERM, "write to a read-only node");
    let c = h
        .submit(Request::write_zeroes(0, a as u64, ReqFlags::NONE))
        .await;
    fails(&c, Errno::EPERM, "write-zeroes to a read-only node");
    fails(
        &h.submit(Request::discard(0, a as u64)).await,
        Errno::EPERM,
        "discard on a read-only node",
    );
    ok(
        &h.submit(Request::read(0, Buffer::new(a))).await,
        "read from a read-only node",
    );
    ok(
        &h.submit(Request::block_status(0, a as u64)).await,
        "block-status of a read-only node",
    );
    ok(
        &h.submit(Request::flush()).await,
        "flush of a read-only node",
    );
}
