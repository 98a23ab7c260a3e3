//! The driver conformance suite: one set of checks every driver runs.
//!
//! ```text
//!   #[test] fn file_passes_the_conformance_suite() {
//!       conformance::run("file", &|| open_node(), Expect::stores_data().read_only(&|| ...));
//!   }
//!            |
//!            v
//!   Engine (2 reactors, real io_uring) --spawn--> task: Handle::open(&*driver) -> checks
//! ```
//!
//! [`run`] starts a real [`Engine`] with two reactors (the first two CPUs this process may
//! use; with fewer the suite fails, it never skips) and runs each check as a task on a
//! reactor, through a [`Handle`] opened there, exactly as the rest of Strata uses a node.
//! Each check gets a node from the caller's `make`; for a node backed by a file, `make`
//! may open the same file every time: each check writes before it reads.
//!
//! The checks (see the submodules): read-after-write at several sizes and offsets,
//! unaligned I/O, write-zeroes with and without `MAY_UNMAP`, discard, flush, FUA,
//! out-of-range and overflowing requests, read-only nodes, block-status, and concurrent
//! I/O from every reactor at once. The node must be at least [`MIN_SIZE`] bytes and its
//! request alignment must divide 4096.
//!
//! Regions of the node each check uses (so checks never read each other's data):
//!
//! ```text
//!   0      2M       3M       4M       5M              7M       MIN_SIZE-4K  MIN_SIZE
//!   | data | unalign| zeroes | discard| concurrent (1M per reactor) | ...  | last block |
//! ```

mod concurrent;
mod data;
mod limits;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use strata_engine::reactor::Canceled;
use strata_engine::{
    Buffer, Completion, CpuSet, Driver, DriverInfo, Engine, EngineConfig, Errno, Handle,
};

/// Smallest node the suite works on.
pub const MIN_SIZE: u64 = 8 << 20;
/// Reactors the suite runs on.
pub const REACTORS: usize = 2;
/// How long one check may take before the suite calls it hung.
const TIMEOUT: Duration = Duration::from_secs(120);

const MIB: u64 = 1 << 20;
const DATA: u64 = 0;
const UNALIGNED: u64 = 2 * MIB;
const ZEROES: u64 = 3 * MIB;
const DISCARD: u64 = 4 * MIB;
const CONCURRENT: u64 = 5 * MIB;

/// What the driver under test promises.
#[derive(Clone, Copy)]
pub struct Expect<'a> {
    /// Reads return what was written (false for null-co, which stores nothing).
    pub stores_data: bool,
    /// Opens a read-only node of the same driver, if the driver can be opened read-only.
    pub read_only: Option<&'a dyn Fn() -> Arc<dyn Driver>>,
}

impl Expect<'static> {
    /// A driver that stores what is written.
    pub fn stores_data() -> Expect<'static> {
        Expect {
            stores_data: true,
            read_only: None,
        }
    }

    /// A driver that stores nothing: data checks only check that requests succeed.
    pub fn stores_nothing() -> Expect<'static> {
        Expect {
            stores_data: false,
            read_only: None,
        }
    }
}

impl<'a> Expect<'a> {
    /// Also checks that a node made by `make` (read-only) refuses writes.
    pub fn read_only(self, make: &'a dyn Fn() -> Arc<dyn Driver>) -> Expect<'a> {
        Expect {
            read_only: Some(make),
            ..self
        }
    }
}

impl std::fmt::Debug for Expect<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expect")
            .field("stores_data", &self.stores_data)
            .field("read_only", &self.read_only.is_some())
            .finish()
    }
}

/// Runs every check against nodes made by `make`; panics naming the driver and the
/// check that failed.
pub fn run(name: &str, make: &dyn Fn() -> Arc<dyn Driver>, expect: Expect<'_>) {
    let suite = Suite::start(name, make, expect.stores_data);
    let info = suite.info;
    assert!(
        info.size >= MIN_SIZE,
        "{name}: the conformance suite needs a node of at least {MIN_SIZE} bytes"
    );
    let align = info.request_alignment.max(1);
    assert!(
        4096 % align == 0,
        "{name}: the conformance suite needs a request alignment dividing 4096, not {align}"
    );
    data::run(&suite);
    limits::run(&suite, expect.read_only);
    concurrent::run(&suite);
}

/// Runs the future `make` builds as a task on a one-reactor engine and returns its
/// output; panics if the task panics or takes longer than two minutes. For a driver's
/// own tests that need a reactor but not the whole suite.
pub fn on_reactor<T, F, Fut>(make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let cpu = CpuSet::allowed().cpus().first().copied().unwrap_or(0);
    let engine = Engine::start(EngineConfig {
        cores: CpuSet::from_cpus([cpu]),
        pin: false,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("cannot start the engine: {e}"));
    match engine.spawn(0, make).wait_timeout(TIMEOUT) {
        Ok(v) => v,
        Err(None) => panic!("the task did not finish within {TIMEOUT:?}"),
        Err(Some(Canceled)) => panic!("the task failed (its panic message is printed above)"),
    }
}

/// What a check needs to know, `Copy` so it can move into reactor tasks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx {
    pub info: DriverInfo,
    pub stores_data: bool,
}

impl Ctx {
    /// The node's request alignment (at least 1).
    pub fn align(&self) -> u64 {
        u64::from(self.info.request_alignment.max(1))
    }
}

/// A running engine plus the node maker.
pub(crate) struct Suite<'a> {
    name: &'a str,
    make: &'a dyn Fn() -> Arc<dyn Driver>,
    engine: Engine,
    info: DriverInfo,
    stores_data: bool,
}

impl<'a> Suite<'a> {
    fn start(name: &'a str, make: &'a dyn Fn() -> Arc<dyn Driver>, stores_data: bool) -> Suite<'a> {
        let cores = CpuSet::first_allowed(REACTORS)
            .unwrap_or_else(|e| panic!("{name}: the conformance suite: {e}"));
        let engine = Engine::start(EngineConfig {
            cores,
            pin: false,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{name}: cannot start the engine: {e}"));
        let info = make().info();
        Suite {
            name,
            make,
            engine,
            info,
            stores_data,
        }
    }

    pub fn ctx(&self) -> Ctx {
        Ctx {
            info: self.info,
            stores_data: self.stores_data,
        }
    }

    /// A fresh node from the caller's maker.
    pub fn node(&self) -> Arc<dyn Driver> {
        (self.make)()
    }

    /// Starts `check` as a task on reactor `n`, with a handle to `node` opened there.
    pub fn spawn<T, F, Fut>(&self, n: usize, node: Arc<dyn Driver>, check: F) -> Pending<'_, T>
    where
        F: FnOnce(Handle, Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let ctx = self.ctx();
        let reply = self.engine.spawn(n, move || async move {
            let handle = Handle::open(&*node)
                .unwrap_or_else(|e| panic!("opening the node's queue failed: {e}"));
            check(handle, ctx).await
        });
        Pending {
            suite_name: self.name,
            reactor: n,
            reply,
        }
    }

    /// Runs `check` on reactor `n` with a fresh node and waits for it.
    pub fn check<T, F, Fut>(&self, what: &str, n: usize, check: F) -> T
    where
        F: FnOnce(Handle, Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.spawn(n, self.node(), check).wait(what)
    }
}

/// A check running on a reactor.
pub(crate) struct Pending<'a, T> {
    suite_name: &'a str,
    reactor: usize,
    reply: strata_engine::reactor::Reply<T>,
}

impl<T> Pending<'_, T> {
    /// Waits for the check; panics naming it if it failed or hung.
    pub fn wait(self, what: &str) -> T {
        let (name, n) = (self.suite_name, self.reactor);
        match self.reply.wait_timeout(TIMEOUT) {
            Ok(v) => v,
            Err(None) => {
                panic!("{name}: check '{what}' on reactor {n} did not finish within {TIMEOUT:?}")
            }
            Err(Some(Canceled)) => {
                panic!(
                    "{name}: check '{what}' failed on reactor {n} (its panic message is printed above)"
                )
            }
        }
    }
}

// ---- helpers for checks -------------------------------------------------------------------

/// Bytes that differ by position and by `seed`, so misplaced or stale data shows.
pub(crate) fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Panics unless `c` succeeded.
pub(crate) fn ok(c: &Completion, what: &str) {
    assert_eq!(
        c.result,
        Ok(()),
        "{what}: {:?} at {} (+{}) failed",
        c.req.op,
        c.req.offset,
        c.req.len
    );
}

/// Panics unless `c` failed with `errno`.
pub(crate) fn fails(c: &Completion, errno: Errno, what: &str) {
    assert_eq!(
        c.result,
        Err(errno),
        "{what}: {:?} at {} (+{}) should fail",
        c.req.op,
        c.req.offset,
        c.req.len
    );
}

/// Panics at the first byte where `got` differs from `want`, naming the disk offset.
pub(crate) fn same_bytes(got: &[u8], want: &[u8], offset: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: byte at offset {} is {:#04x}, expected {:#04x} ({} bytes compared from offset {offset})",
            offset + i as u64,
            got[i],
            want[i],
            got.len()
        );
    }
}

/// Writes `data` at `offset` and checks that it succeeded.
pub(crate) async fn write(h: &Handle, offset: u64, data: &[u8], what: &str) {
    let c = h
        .submit(strata_engine::Request::write(
            offset,
            Buffer::from_slice(data),
            Default::default(),
        ))
        .await;
    ok(&c, what);
}

/// Reads `len` bytes at `offset` and checks that it succeeded.
pub(crate) async fn read(h: &Handle, offset: u64, len: usize, what: &str) -> Buffer {
    let c = h
        .submit(strata_engine::Request::read(offset, Buffer::new(len)))
        .await;
    ok(&c, what);
    c.req.buf.expect("BUG: a read completes with its buffer")
}
