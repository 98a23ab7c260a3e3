//! One job: `queue_depth` worker tasks on one reactor, each keeping one request in flight
//! against the node under test, recording every latency in the job's histogram.
//!
//! Per-I/O cost is what this benchmark measures of the engine, so the loop does the
//! minimum: one clock read per I/O (a worker's completion time is its next submission
//! time), a histogram record, and plain stores to the counters the progress line reads.

use crate::workload::{Generator, Workload, check_pattern, fill_pattern};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use strata_engine::reactor;
use strata_engine::{Buffer, Driver, Handle, Op, ReqFlags, Request};

/// What a job does; built on the main thread, sent to its reactor.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub name: String,
    pub workload: Workload,
    pub read_pct: u64,
    pub queue_depth: usize,
    pub io_size: u64,
    /// First byte of the region the job covers.
    pub base: u64,
    /// Region length in `io_size` blocks.
    pub blocks: u64,
    /// Sequential workloads start at this block.
    pub start_block: u64,
    pub seed: u64,
    /// Verify: this job's workers are global workers `first_worker..+queue_depth` of
    /// `total_workers`, and each owns the blocks congruent to its number, so no two
    /// requests in the whole run ever touch the same block at once.
    pub first_worker: u64,
    pub total_workers: u64,
}

/// Counters the main thread reads for the live progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub ios: AtomicU64,
    pub failed: AtomicU64,
}

/// How a job ended.
#[derive(Debug)]
pub struct JobResult {
    pub ios: u64,
    pub failed: u64,
    pub verify_errors: u64,
    pub first_mismatch: Option<u64>,
    pub first_errno: Option<strata_engine::Errno>,
    pub elapsed: Duration,
    pub cpu: Duration,
    pub hist: Histogram<u64>,
    /// Set when the job could not start.
    pub error: Option<String>,
}

impl JobResult {
    /// A job that did no I/O, for the reason given.
    pub fn empty(error: String) -> JobResult {
        JobResult {
            ios: 0,
            failed: 0,
            verify_errors: 0,
            first_mismatch: None,
            first_errno: None,
            elapsed: Duration::ZERO,
            cpu: Duration::ZERO,
            hist: new_histogram(),
            error: Some(error),
        }
    }
}

struct State {
    spec: JobSpec,
    handle: Handle,
    generator: Generator,
    hist: RefCell<Histogram<u64>>,
    ios: Cell<u64>,
    failed: Cell<u64>,
    verify_errors: Cell<u64>,
    first_mismatch: Cell<Option<u64>>,
    first_errno: Cell<Option<strata_engine::Errno>>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
}

impl State {
    /// Counts a completion: successes in `ios` and the latency histogram, failures apart
    /// (a request failing in nanoseconds must not inflate IOPS or lower the latencies).
    #[inline]
    fn record(&self, latency: Duration, result: Result<(), strata_engine::Errno>) {
        if result.is_ok() {
            self.hist
                .borrow_mut()
                .saturating_record(latency.as_nanos() as u64);
            let ios = self.ios.get() + 1;
            self.ios.set(ios);
            self.progress.ios.store(ios, Ordering::Relaxed);
        }
        if let Err(e) = result {
            let failed = self.failed.get() + 1;
            self.failed.set(failed);
            self.progress.failed.store(failed, Ordering::Relaxed);
            if self.first_errno.get().is_none() {
                self.first_errno.set(Some(e));
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("BUG: histogram bounds")
}

/// Runs a job on the calling reactor until `stop` is set.
pub async fn run(
    driver: Arc<dyn Driver>,
    spec: JobSpec,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> JobResult {
    let cpu0 = thread_cpu_time();
    let start = Instant::now();
    let handle = match Handle::open(&*driver) {
        Ok(h) => h,
        Err(e) => {
            return JobResult {
                ios: 0,
                failed: 0,
                verify_errors: 0,
                first_mismatch: None,
                first_errno: Some(e),
                elapsed: Duration::ZERO,
                cpu: Duration::ZERO,
                hist: new_histogram(),
                error: Some(format!(
                    "cannot open the node on reactor {}: {e}",
                    reactor::id()
                )),
            };
        }
    };
    let generator = Generator::new(
        spec.workload,
        spec.read_pct,
        spec.io_size,
        spec.base,
        spec.blocks,
        spec.start_block,
        spec.seed,
    );
    let st = Rc::new(State {
        spec,
        handle,
        generator,
        hist: RefCell::new(new_histogram()),
        ios: Cell::new(0),
        failed: Cell::new(0),
        verify_errors: Cell::new(0),
        first_mismatch: Cell::new(None),
        first_errno: Cell::new(None),
        stop,
        progress,
    });
    let workers: Vec<_> = (0..st.spec.queue_depth as u64)
        .map(|w| {
            let st = st.clone();
            if st.spec.workload == Workload::Verify {
                reactor::spawn_with_reply(verify_worker(st, w))
            } else {
                reactor::spawn_with_reply(worker(st))
            }
        })
        .collect();
    for w in workers {
        // A worker that panicked is reported by the executor; its requests are counted.
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    JobResult {
        ios: st.ios.get(),
        failed: st.failed.get(),
        verify_errors: st.verify_errors.get(),
        first_mismatch: st.first_mismatch.get(),
        first_errno: st.first_errno.get(),
        elapsed,
        cpu: thread_cpu_time().saturating_sub(cpu0),
        hist: st.hist.borrow().clone(),
        error: None,
    }
}

async fn worker(st: Rc<State>) {
    if st.stopped() {
        return; // started after the run ended: do not allocate buffers for nothing
    }
    let io_size = st.spec.io_size as usize;
    let reads = matches!(
        st.spec.workload,
        Workload::Read | Workload::RandRead | Workload::Rw | Workload::RandRw
    );
    // Separate buffers, so writes carry non-zero data whatever the reads returned (nothing
    // below can shortcut zero writes).
    let mut rbuf = reads.then(|| Buffer::new(io_size));
    let writes = matches!(
        st.spec.workload,
        Workload::Write | Workload::RandWrite | Workload::Rw | Workload::RandRw
    );
    let mut wbuf = writes.then(|| {
        let mut b = Buffer::new(io_size);
        fill_pattern(&mut b, 0, 1, st.spec.seed);
        b
    });
    let mut t0 = Instant::now();
    while !st.stopped() {
        let (op, offset) = st.generator.next();
        let req = match op {
            Op::Read => Request::read(offset, rbuf.take().expect("BUG: worker read buffer lost")),
            Op::Write => Request::write(
                offset,
                wbuf.take().expect("BUG: worker write buffer lost"),
                ReqFlags::NONE,
            ),
            Op::Flush => Request::flush(),
            Op::Discard => Request::discard(offset, io_size as u64),
            Op::WriteZeroes => Request::write_zeroes(offset, io_size as u64, ReqFlags::NONE),
            Op::BlockStatus => Request::block_status(offset, io_size as u64),
        };
        let done = st.handle.submit(req).await;
        let t1 = Instant::now();
        st.record(t1 - t0, done.result);
        t0 = t1;
        match (op, done.req.buf) {
            (Op::Read, b) => rbuf = b,
            (Op::Write, b) => wbuf = b,
            _ => {}
        }
    }
}

/// Writes the pattern to each of this worker's blocks, reads it back and compares; then
/// the next pass with a new generation.
async fn verify_worker(st: Rc<State>, worker: u64) {
    let spec = &st.spec;
    let me = spec.first_worker + worker;
    if me >= spec.blocks || st.stopped() {
        return; // more workers than blocks: nothing of our own to verify
    }
    let io_size = spec.io_size as usize;
    let mut wbuf = Some(Buffer::new(io_size));
    let mut rbuf = Some(Buffer::new(io_size));
    let mut generation = 1u64;
    let mut block = me;
    let mut t0 = Instant::now();
    while !st.stopped() {
        let offset = spec.base + block * spec.io_size;
        let mut w = wbuf.take().expect("BUG: verify buffer lost");
        fill_pattern(&mut w, offset, generation, spec.seed);
        let done = st
            .handle
            .submit(Request::write(offset, w, ReqFlags::NONE))
            .await;
        let t1 = Instant::now();
        st.record(t1 - t0, done.result);
        t0 = t1;
        let wrote = done.result.is_ok();
        wbuf = done.req.buf;

        let done = st
            .handle
            .submit(Request::read(
                offset,
                rbuf.take().expect("BUG: verify buffer lost"),
            ))
            .await;
        let t1 = Instant::now();
        st.record(t1 - t0, done.result);
        t0 = t1;
        if wrote && done.result.is_ok() {
            let r = done
                .req
                .buf
                .as_ref()
                .expect("BUG: read returned without its buffer");
            if let Some(bad) = check_pattern(r, offset, generation, spec.seed) {
                st.verify_errors.set(st.verify_errors.get() + 1);
                if st.first_mismatch.get().is_none() {
                    st.first_mismatch.set(Some(bad));
                }
                if st.verify_errors.get() <= 10 {
                    eprintln!(
                        "verify mismatch in job {}: block at offset {offset} (generation {generation}), first bad byte at offset {bad}",
                        spec.name
                    );
                }
            }
        }
        rbuf = done.req.buf;
        block += spec.total_workers;
        if block >= spec.blocks {
            block = me;
            generation += 1;
        }
    }
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
