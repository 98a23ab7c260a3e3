//! strata-perf: a bdevperf-class benchmark running the Strata engine in-process.
//!
//! ```text
//!   main thread                          reactor N (one job each by default)
//!   -----------                          -----------------------------------
//!   parse flags, open the node   --->    Handle::open(node)
//!   start engine, one job per            queue_depth worker tasks, each:
//!   reactor, progress each second          loop { submit; await; record latency }
//!   Ctrl-C / time up -> stop flag        job result (counts, histogram, CPU time)
//!   summary table or --json      <---
//! ```

mod job;
mod report;
mod workload;

use clap::Parser;
use job::{JobResult, JobSpec, Progress};
use report::RowInfo;
use serde_json::{Value, json};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use strata_drivers::options::parse_size;
use strata_engine::{CpuSet, Engine, EngineConfig, Op, PollMode};
use workload::Workload;

#[derive(Parser, Debug)]
#[command(
    name = "strata-perf",
    version,
    about = "Benchmark a Strata block node in-process (bdevperf-style flags)",
    after_help = "Examples:\n  strata-perf -q 32 -o 4k -w randread -t 5\n  strata-perf --node driver=memory,size=1G -w randrw -M 70\n  strata-perf --node driver=file,filename=/var/tmp/img,cache.direct=on -w verify -t 10"
)]
struct Args {
    /// Requests in flight per job.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    queue_depth: usize,
    /// I/O size in bytes (suffixes k, M, G).
    #[arg(short = 'o', long = "io-size", default_value = "4k", value_parser = parse_size)]
    io_size: u64,
    /// read, write, randread, randwrite, rw, randrw, verify, flush, unmap, write_zeroes.
    #[arg(short = 'w', long = "workload", default_value = "randread")]
    workload: Workload,
    /// Percentage of reads for rw and randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50)]
    rwmixread: u64,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    time: f64,
    /// Reactor CPUs: a mask (0x3) or a list (0,1 or [0-1]). Default: every CPU this
    /// process may run on.
    #[arg(short = 'm', long = "cpumask", visible_alias = "cores")]
    cores: Option<String>,
    /// The node under test, as keyval (driver=file,filename=/x,cache.direct=on) or JSON.
    #[arg(long, default_value = "driver=null-co,size=1G")]
    node: String,
    /// busy, hybrid or interrupt.
    #[arg(long = "poll-mode", default_value = "hybrid")]
    poll_mode: PollMode,
    /// Hybrid mode: microseconds a reactor spins without work before it sleeps.
    #[arg(long = "idle-budget-us", default_value_t = strata_engine::reactor::DEFAULT_IDLE_BUDGET_US)]
    idle_budget_us: u64,
    /// Interrupt mode: microseconds a busy reactor lets new work gather between passes
    /// (interrupt coalescing; 0: none). Fewer system calls per request for NBD clients.
    #[arg(long = "coalesce-us", value_name = "US", default_value_t = 0)]
    coalesce_us: u64,
    /// Print the results as one JSON document on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Seconds between progress lines (0: none).
    #[arg(short = 'S', long = "stats-interval", default_value_t = 1.0)]
    stats_interval: f64,
    /// First byte of the region to exercise.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Length of the region to exercise (default: to the end of the node).
    #[arg(long, value_parser = parse_size)]
    length: Option<u64>,
    /// Seed for offsets and verify data (default: a new one each run, printed, so data left
    /// by an earlier run never passes for this run's writes).
    #[arg(long)]
    seed: Option<u64>,
    /// Do not pin reactors to their CPUs.
    #[arg(long)]
    no_pin: bool,
}

/// Set by Ctrl-C.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("strata-perf: {msg}");
            ExitCode::from(2)
        }
    }
}

fn node_options(spec: &str) -> Result<Value, String> {
    if spec.trim_start().starts_with('{') {
        serde_json::from_str(spec).map_err(|e| format!("--node is not valid JSON: {e}"))
    } else {
        strata_drivers::keyval::parse(spec).map_err(|e| format!("--node: {e}"))
    }
}

fn required_op(w: Workload) -> Vec<Op> {
    match w {
        Workload::Read | Workload::RandRead => vec![Op::Read],
        Workload::Write | Workload::RandWrite => vec![Op::Write],
        Workload::Rw | Workload::RandRw | Workload::Verify => vec![Op::Read, Op::Write],
        Workload::Flush => vec![Op::Flush],
        Workload::Unmap => vec![Op::Discard],
        Workload::WriteZeroes => vec![Op::WriteZeroes],
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    if args.queue_depth == 0 || args.queue_depth > 65536 {
        return Err(format!(
            "queue depth {} out of range 1..=65536",
            args.queue_depth
        ));
    }
    if args.io_size == 0 {
        return Err("I/O size must be at least 1 byte".into());
    }
    if args.rwmixread > 100 {
        return Err(format!("-M {} is not a percentage", args.rwmixread));
    }
    let run_time = seconds(args.time).ok_or_else(|| {
        format!(
            "-t {} must be a positive number of seconds (at most a year)",
            args.time
        )
    })?;
    let interval = if args.stats_interval == 0.0 {
        None
    } else {
        Some(seconds(args.stats_interval).ok_or_else(|| {
            format!(
                "-S {} must be 0 (no progress) or a positive number of seconds",
                args.stats_interval
            )
        })?)
    };
    let seed = args.seed.unwrap_or_else(random_seed);
    let cores = match &args.cores {
        Some(c) => CpuSet::parse(c)?,
        None => CpuSet::allowed(),
    };
    cores.check_allowed()?;

    let options = node_options(&args.node)?;
    let driver = strata_drivers::open(&options).map_err(|e| format!("cannot open node: {e}"))?;
    let info = driver.info();
    for op in required_op(args.workload) {
        if !info.ops.supports(op) {
            return Err(format!(
                "the {} node does not support {} (needed by -w {})",
                driver.driver_name(),
                op.name(),
                args.workload
            ));
        }
    }
    if args.workload.writes() && info.read_only {
        return Err(format!(
            "-w {} writes, but the node is read-only",
            args.workload
        ));
    }
    let align = u64::from(info.request_alignment.max(1));
    if args.io_size % align != 0 || args.offset % align != 0 {
        return Err(format!(
            "I/O size {} and offset {} must be multiples of the node's request alignment ({align} bytes)",
            args.io_size, args.offset
        ));
    }
    if args.io_size > info.max_transfer {
        return Err(format!(
            "I/O size {} exceeds the node's maximum transfer ({} bytes)",
            args.io_size, info.max_transfer
        ));
    }
    let length = args.length.unwrap_or(info.size.saturating_sub(args.offset));
    if args
        .offset
        .checked_add(length)
        .is_none_or(|end| end > info.size)
    {
        return Err(format!(
            "region {}+{} is beyond the node's size ({} bytes)",
            args.offset, length, info.size
        ));
    }
    let blocks = length / args.io_size;
    if blocks == 0 {
        return Err(format!(
            "the region ({length} bytes) is smaller than one I/O ({} bytes)",
            args.io_size
        ));
    }
    // Every worker holds its buffers for the whole run: refuse what the machine cannot hold.
    let buffers_per_worker = match args.workload {
        Workload::Verify | Workload::Rw | Workload::RandRw => 2,
        _ => 1,
    };
    let buffer_bytes = (args.queue_depth as u128)
        * u128::from(args.io_size)
        * buffers_per_worker
        * cores.len() as u128;
    let limit = physical_memory() / 2;
    if buffer_bytes > u128::from(limit) {
        return Err(format!(
            "-q {} x -o {} on {} reactor(s) needs {} MiB of buffers, more than half of this machine's memory ({} MiB)",
            args.queue_depth,
            args.io_size,
            cores.len(),
            buffer_bytes >> 20,
            limit >> 20
        ));
    }

    let engine = Engine::start(EngineConfig {
        cores: cores.clone(),
        poll_mode: args.poll_mode,
        idle_budget: Duration::from_micros(args.idle_budget_us),
        coalesce: Duration::from_micros(args.coalesce_us),
        pin: !args.no_pin,
        ..Default::default()
    })
    .map_err(|e| format!("cannot start reactors: {e}"))?;
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .map_err(|e| format!("cannot set the Ctrl-C handler: {e}"))?;

    let reactors = engine.reactors();
    let stop = Arc::new(AtomicBool::new(false));
    let node_name = driver.driver_name().to_string();
    let usage0 = process_cpu();
    let mut jobs = Vec::new();
    for n in 0..reactors {
        let spec = JobSpec {
            name: format!("{node_name}:{n}"),
            workload: args.workload,
            read_pct: args.rwmixread,
            queue_depth: args.queue_depth,
            io_size: args.io_size,
            base: args.offset,
            blocks,
            start_block: blocks * n as u64 / reactors as u64,
            seed: seed.wrapping_add(7919 * n as u64),
            first_worker: (n * args.queue_depth) as u64,
            total_workers: (reactors * args.queue_depth) as u64,
        };
        let progress = Arc::new(Progress::default());
        let (driver, stop, p) = (driver.clone(), stop.clone(), progress.clone());
        let reply = engine.spawn(n, move || job::run(driver, spec, stop, p));
        jobs.push((n, progress, reply));
    }

    let say = |line: String| {
        if args.json {
            eprintln!("{line}")
        } else {
            println!("{line}")
        }
    };
    say(format!(
        "Running {} I/O of {} bytes at queue depth {} for {} s on {} reactor(s) (cores {}, {} polling, seed {seed})",
        args.workload, args.io_size, args.queue_depth, args.time, reactors, cores, args.poll_mode
    ));
    let start = Instant::now();
    let deadline = start + run_time;
    let mut next_tick = interval.map(|i| start + i);
    let mut last = (start, 0u64, 0u64);
    while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
        std::thread::sleep(
            Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
        );
        if let (Some(tick), Some(iv)) = (next_tick, interval)
            && Instant::now() >= tick
        {
            let now = Instant::now();
            let ios: u64 = jobs.iter().map(|j| j.1.ios.load(Ordering::Relaxed)).sum();
            let failed: u64 = jobs
                .iter()
                .map(|j| j.1.failed.load(Ordering::Relaxed))
                .sum();
            let dt = (now - last.0).as_secs_f64();
            let iops = (ios - last.1) as f64 / dt;
            say(format!(
                "[{:6.1} s] {:>12.2} IOPS {:>10.2} MiB/s {:>8.2} failed/s",
                (now - start).as_secs_f64(),
                iops,
                iops * args.io_size as f64 / 1048576.0,
                (failed - last.2) as f64 / dt
            ));
            last = (now, ios, failed);
            next_tick = Some(tick + iv);
        }
    }
    let interrupted = INTERRUPTED.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);

    // One deadline for all jobs: a job still running 30 s after the stop has a request
    // that never completes. It is reported from its progress counters; the others keep
    // their full results.
    let grace = Instant::now() + Duration::from_secs(30);
    let mut results: Vec<(String, usize, JobResult)> = Vec::new();
    let mut hung = Vec::new();
    for (n, progress, reply) in jobs {
        let name = format!("{node_name}:{n}");
        match reply.wait_timeout(grace.saturating_duration_since(Instant::now())) {
            Ok(r) => results.push((name, cores.cpus()[n], r)),
            Err(_) => {
                hung.push(n);
                let mut r = job::JobResult::empty(format!(
                    "hung: a request did not complete within 30 s of the stop on reactor {n}"
                ));
                r.ios = progress.ios.load(Ordering::Relaxed);
                r.failed = progress.failed.load(Ordering::Relaxed);
                r.elapsed = start.elapsed();
                results.push((name, cores.cpus()[n], r));
            }
        }
    }
    let usage1 = process_cpu();
    if hung.is_empty() {
        drop(engine);
    } else {
        // Stopping a reactor waits for its in-flight requests, which may never end.
        std::mem::forget(engine);
    }

    let info_row = RowInfo {
        workload: args.workload.to_string(),
        percentage: matches!(args.workload, Workload::Rw | Workload::RandRw)
            .then_some(args.rwmixread),
        queue_depth: args.queue_depth,
        io_size: args.io_size,
        interrupted,
    };
    let (rows, total) = report::summarize(&results, &info_row);
    if args.json {
        let doc = json!({
            "config": {
                "workload": args.workload.name(),
                "queue_depth": args.queue_depth,
                "io_size": args.io_size,
                "time_in_sec": args.time,
                "rw_percentage": info_row.percentage,
                "seed": seed,
                "cores": cores.cpus(),
                "core_mask": cores.mask(),
                "poll_mode": args.poll_mode.to_string(),
                "node": options,
                "offset": args.offset,
                "length": length,
            },
            "results": rows,
            "total": total,
            "cpu": {"user_sec": usage1.0 - usage0.0, "sys_sec": usage1.1 - usage0.1},
            "core_count": reactors,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("BUG: results serialize")
        );
    } else {
        print!("{}", report::table(&rows, &total, &node_name));
        println!(
            " CPU: {:.2} s user, {:.2} s system ({:.1} ns of reactor CPU per I/O)",
            usage1.0 - usage0.0,
            usage1.1 - usage0.1,
            if total.ios > 0 {
                total.cpu_sec * 1e9 / total.ios as f64
            } else {
                0.0
            }
        );
    }
    Ok(if total.status == "failed" {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A positive duration of at most a year from a number of seconds (None for 0, negative,
/// NaN, infinite or absurd values).
fn seconds(secs: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(365 * 86400))
}

/// A seed that differs from run to run.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Physical memory in bytes.
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

/// (user, system) CPU seconds of the whole process.
fn process_cpu() -> (f64, f64) {
    // SAFETY: getrusage writes into the struct we own; all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}
