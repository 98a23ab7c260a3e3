//! Data checks: what is written reads back, byte-granular where the node allows it,
//! zeroes read as zeroes, discard leaves its neighbours alone, flush and FUA succeed.

use super::{
    Ctx, DATA, DISCARD, Suite, UNALIGNED, ZEROES, fails, ok, pattern, read, same_bytes, write,
};
use strata_engine::{Buffer, Errno, Handle, ReqFlags, Request};

pub(super) fn run(suite: &Suite<'_>) {
    suite.check("read after write", 0, read_after_write);
    suite.check("read after write (other reactor)", 1, read_after_write);
    suite.check("unaligned I/O", 0, unaligned);
    suite.check("write-zeroes", 1, write_zeroes);
    suite.check("discard then write-zeroes", 0, discard);
    suite.check("flush and FUA", 1, flush_and_fua);
}

async fn read_after_write(h: Handle, ctx: Ctx) {
    let size = ctx.info.size;
    let cases: [(u64, usize); 6] = [
        (DATA, 4096),
        (DATA + 3 * 4096, 8192),
        (DATA + 64 * 1024, 128 * 1024),
        (DATA + 1024 * 1024, 512 * 1024),
        (DATA + ctx.align() * 5, ctx.align() as usize),
        (size - 4096, 4096),
    ];
    for (round, (offset, len)) in cases.into_iter().enumerate() {
        let data = pattern(round as u64 + 1, offset, len);
        let what = format!("read after write of {len} bytes at {offset}");
        write(&h, offset, &data, &what).await;
        let got = read(&h, offset, len, &what).await;
        if ctx.stores_data {
            same_bytes(&got, &data, offset, &what);
        }
    }
    // Rewriting part of a written range changes just that part.
    let (offset, len) = (DATA + 64 * 1024, 128 * 1024);
    let mut model = pattern(3, offset, len);
    let patch = pattern(99, offset + 8192, 4096);
    write(&h, offset + 8192, &patch, "overwrite").await;
    model[8192..8192 + 4096].copy_from_slice(&patch);
    let got = read(&h, offset, len, "read after overwrite").await;
    if ctx.stores_data {
        same_bytes(&got, &model, offset, "read after overwrite");
    }
}

async fn unaligned(h: Handle, ctx: Ctx) {
    let base = UNALIGNED;
    let align = ctx.align();
    if align > 1 {
        let a = align as usize;
        let c = h.submit(Request::read(base + 1, Buffer::new(a))).await;
        fails(&c, Errno::EINVAL, "read at a misaligned offset");
        let c = h.submit(Request::read(base, Buffer::new(a + 1))).await;
        fails(&c, Errno::EINVAL, "read of a misaligned length");
        let c = h
            .submit(Request::write(
                base + align / 2,
                Buffer::new(a),
                ReqFlags::NONE,
            ))
            .await;
        fails(&c, Errno::EINVAL, "write at a misaligned offset");
        let c = h
            .submit(Request::write(base, Buffer::new(a / 2), ReqFlags::NONE))
            .await;
        fails(&c, Errno::EINVAL, "write of a misaligned length");
        return;
    }
    let span = 3 * 4096;
    let mut model = pattern(1, base, span);
    write(&h, base, &model, "background for unaligned writes").await;
    let cases: [(usize, usize); 8] = [
        (1, 1),
        (7, 2),
        (13, 3),
        (15, 17),
        (100, 1000),
        (4093, 7),
        (4095, 4098),
        (span - 1, 1),
    ];
    for (round, (at, len)) in cases.into_iter().enumerate() {
        let data = pattern(round as u64 + 10, base + at as u64, len);
        write(
            &h,
            base + at as u64,
            &data,
            &format!("write of {len} bytes at +{at}"),
        )
        .await;
        model[at..at + len].copy_from_slice(&data);
    }
    let got = read(&h, base, span, "read back after unaligned writes").await;
    if ctx.stores_data {
        same_bytes(
            &got,
            &model,
            base,
            "unaligned writes left their neighbours intact",
        );
    }
    for (at, len) in [(3, 1), (9, 30), (4090, 10), (5000, 3000)] {
        let got = read(
            &h,
            base + at as u64,
            len,
            &format!("read of {len} bytes at +{at}"),
        )
        .await;
        if ctx.stores_data {
            same_bytes(
                &got,
                &model[at..at + len],
                base + at as u64,
                "unaligned read",
            );
        }
    }
}

/// Writes a pattern over `len` bytes at `base`, zeroes `zero_len` bytes at `base + at`
/// and checks the result.
async fn zero_and_check(
    h: &Handle,
    ctx: Ctx,
    base: u64,
    len: usize,
    at: usize,
    zero_len: usize,
    flags: ReqFlags,
) {
    let what = format!("write-zeroes ({flags:?}) of {zero_len} bytes at +{at}");
    let mut model = pattern(at as u64 + 7, base, len);
    write(h, base, &model, &what).await;
    let c = h
        .submit(Request::write_zeroes(
            base + at as u64,
            zero_len as u64,
            flags,
        ))
        .await;
    if flags.contains(ReqFlags::NO_FALLBACK) && c.result == Err(Errno::ENOTSUP) {
        // Allowed: the node cannot zero without writing and the caller said not to.
        return;
    }
    ok(&c, &what);
    model[at..at + zero_len].fill(0);
    let got = read(h, base, len, &what).await;
    if ctx.stores_data {
        same_bytes(&got, &model, base, &what);
    }
}

async fn write_zeroes(h: Handle, ctx: Ctx) {
    let len = 256 * 1024;
    for flags in [ReqFlags::NONE, ReqFlags::MAY_UNMAP, ReqFlags::NO_FALLBACK] {
        zero_and_check(&h, ctx, ZEROES, len, 64 * 1024, 128 * 1024, flags).await;
        zero_and_check(
            &h,
            ctx,
            ZEROES,
            len,
            4096,
            4096,
            flags | ReqFlags::MAY_UNMAP,
        )
        .await;
    }
    if ctx.align() == 1 {
        for (at, zero_len) in [
            (3, 10),
            (4000, 200),
            (5, 70_000),
            (9, 1),
            (4095, 2),
            (17, 15),
        ] {
            zero_and_check(&h, ctx, ZEROES, len, at, zero_len, ReqFlags::NONE).await;
            zero_and_check(&h, ctx, ZEROES, len, at, zero_len, ReqFlags::MAY_UNMAP).await;
        }
    }
}

async fn discard(h: Handle, ctx: Ctx) {
    let (base, len) = (DISCARD, 256 * 1024);
    let model = pattern(5, base, len);
    write(&h, base, &model, "data before discard").await;
    let c = h
        .submit(Request::discard(base + 64 * 1024, 64 * 1024))
        .await;
    ok(&c, "discard");
    // A discarded range reads back as anything, but its neighbours are untouched.
    let got = read(&h, base, len, "read after discard").await;
    if ctx.stores_data {
        same_bytes(
            &got[..64 * 1024],
            &model[..64 * 1024],
            base,
            "data before the discarded range",
        );
        let after = 128 * 1024;
        same_bytes(
            &got[after..],
            &model[after..],
            base + after as u64,
            "data after the discarded range",
        );
    }
    // Discard need not be aligned: it is advisory.
    let c = h.submit(Request::discard(base + 1, 1000)).await;
    ok(&c, "unaligned discard");
    // Write-zeroes over a discarded range reads back zeroes.
    let c = h
        .submit(Request::write_zeroes(
            base + 64 * 1024,
            64 * 1024,
            ReqFlags::MAY_UNMAP,
        ))
        .await;
    ok(&c, "write-zeroes after discard");
    let got = read(
        &h,
        base + 64 * 1024,
        64 * 1024,
        "read after discard and write-zeroes",
    )
    .await;
    if ctx.stores_data {
        same_bytes(
            &got,
            &vec![0; 64 * 1024],
            base + 64 * 1024,
            "discard then write-zeroes",
        );
    }
    // Discarding everything that was written, then zeroing it, leaves zeroes.
    ok(
        &h.submit(Request::discard(base, len as u64)).await,
        "discard of the whole range",
    );
    ok(
        &h.submit(Request::write_zeroes(base, len as u64, ReqFlags::NONE))
            .await,
        "write-zeroes of the whole range",
    );
    let got = read(&h, base, len, "read after discard of the whole range").await;
    if ctx.stores_data {
        same_bytes(
            &got,
            &vec![0; len],
            base,
            "discard then write-zeroes of the whole range",
        );
    }
}

async fn flush_and_fua(h: Handle, ctx: Ctx) {
    ok(&h.submit(Request::flush()).await, "flush");
    let data = pattern(77, DATA, 4096);
    let c = h
        .submit(Request::write(
            DATA,
            Buffer::from_slice(&data),
            ReqFlags::FUA,
        ))
        .await;
    if !ctx.info.ops.fua() {
        fails(&c, Errno::ENOTSUP, "FUA write on a node without FUA");
        return;
    }
    ok(&c, "FUA write");
    let got = read(&h, DATA, 4096, "read after FUA write").await;
    if ctx.stores_data {
        same_bytes(&got, &data, DATA, "read after FUA write");
    }
    ok(&h.submit(Request::flush()).await, "flush after a FUA write");
}
