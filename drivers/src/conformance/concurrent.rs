//! Concurrent I/O: one node shared by every reactor, each writing its own region with
//! many requests in flight, then every reactor verifying every region.

use super::{CONCURRENT, Ctx, REACTORS, Suite, pattern, read, same_bytes, write};
use std::rc::Rc;
use strata_engine::Handle;
use strata_engine::reactor::spawn_with_reply;

/// Bytes each reactor writes.
const REGION: u64 = 1 << 20;
/// Tasks per reactor, each with one request in flight at a time.
const TASKS: u64 = 16;
/// Bytes per request.
const BLOCK: usize = 4096;

pub(super) fn run(suite: &Suite<'_>) {
    // One node, shared by every reactor, as a node of the graph is.
    let node = suite.node();
    let writers: Vec<_> = (0..REACTORS)
        .map(|n| suite.spawn(n, node.clone(), write_region))
        .collect();
    for w in writers {
        w.wait("concurrent writes from every reactor");
    }
    let readers: Vec<_> = (0..REACTORS)
        .map(|n| suite.spawn(n, node.clone(), verify_all))
        .collect();
    for r in readers {
        r.wait("every reactor reads what every reactor wrote");
    }
}

/// The region reactor `n` writes and the seed of its pattern.
fn region(n: usize) -> (u64, u64) {
    (CONCURRENT + n as u64 * REGION, 1000 + n as u64)
}

async fn write_region(h: Handle, _ctx: Ctx) {
    let n = strata_engine::reactor::id();
    let (base, seed) = region(n);
    let h = Rc::new(h);
    // TASKS tasks each write every TASKS-th block of the region, so the requests of all
    // tasks interleave over the whole region.
    let blocks = REGION / BLOCK as u64;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let h = h.clone();
            spawn_with_reply(async move {
                for b in (t..blocks).step_by(TASKS as usize) {
                    let offset = base + b * BLOCK as u64;
                    let data = pattern(seed, offset, BLOCK);
                    write(&h, offset, &data, &format!("reactor {n} concurrent write")).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap_or_else(|_| {
            panic!("a writer task on reactor {n} failed (its panic is printed above)")
        });
    }
}

async fn verify_all(h: Handle, ctx: Ctx) {
    let me = strata_engine::reactor::id();
    let h = Rc::new(h);
    let tasks: Vec<_> = (0..REACTORS)
        .flat_map(|n| (0..4).map(move |part| (n, part)))
        .map(|(n, part)| {
            let h = h.clone();
            spawn_with_reply(async move {
                let (base, seed) = region(n);
                let len = (REGION / 4) as usize;
                let offset = base + part * len as u64;
                let what = format!("reactor {me} reading the region of reactor {n}");
                let got = read(&h, offset, len, &what).await;
                if ctx.stores_data {
                    same_bytes(&got, &pattern(seed, offset, len), offset, &what);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap_or_else(|_| {
            panic!("a reader task on reactor {me} failed (its panic is printed above)")
        });
    }
}
