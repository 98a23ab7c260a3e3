//! strata-graph-churn: how long graph changes pause I/O.
//!
//! Runs a verify load (write a unique pattern, read it back, compare) from every reactor
//! through a `raw` node, first undisturbed, then while the admin thread changes the graph
//! as fast as it can: inserts `raw` filters between the top node and its backend,
//! re-parents through them, removes them, and adds and deletes unrelated nodes with
//! inline children. Prints both phases side by side: IOPS, latency percentiles, the
//! longest drain (from the first drain request to the last undrain), errors and verify
//! mismatches (both must be zero).
//!
//! ```text
//! strata-graph-churn [-m CPUS] [--node KEYVAL] [-q WORKERS] [-o SIZE] [-t SECONDS]
//! ```

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use strata_drivers::options::parse_size;
use strata_engine::graph::{Blk, Graph, NodeId, Perm, UserId};
use strata_engine::{Buffer, CpuSet, Engine, EngineConfig, ReqFlags, Request};

#[derive(Parser, Debug)]
#[command(
    name = "strata-graph-churn",
    about = "Measure the I/O pause graph changes cause"
)]
struct Args {
    /// Reactor CPUs (mask or list). Default: every CPU this process may use.
    #[arg(short = 'm', long = "cpumask", visible_alias = "cores")]
    cores: Option<String>,
    /// The backend node (keyval or JSON); a `raw` node on top of it takes the load.
    #[arg(long, default_value = "driver=memory,size=256M")]
    node: String,
    /// Verify workers (requests in flight) per reactor.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 16)]
    queue_depth: u64,
    /// I/O size.
    #[arg(short = 'o', long = "io-size", default_value = "4k", value_parser = parse_size)]
    io_size: u64,
    /// Seconds per phase.
    #[arg(short = 't', long = "time", default_value_t = 3.0)]
    time: f64,
}

impl Args {
    /// null-co stores nothing, so reading back cannot verify.
    fn verify(&self) -> bool {
        !self.node.contains("null-co")
    }
}

#[derive(Default)]
struct Counters {
    ios: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

struct Phase {
    ios: u64,
    errors: u64,
    mismatches: u64,
    hist: Histogram<u64>,
    seconds: f64,
    changes: u64,
}

fn open_graph(args: &Args) -> Result<Graph, String> {
    let cores = match &args.cores {
        Some(c) => CpuSet::parse(c)?,
        None => CpuSet::allowed(),
    };
    let engine = Engine::start(EngineConfig {
        cores,
        ..Default::default()
    })
    .map_err(|e| format!("starting reactors: {e}"))?;
    Ok(Graph::new(engine, Arc::new(strata_drivers::open_node)))
}

fn backend_options(spec: &str) -> Result<Value, String> {
    let mut v = if spec.trim_start().starts_with('{') {
        serde_json::from_str(spec).map_err(|e| format!("--node: {e}"))?
    } else {
        strata_drivers::keyval::parse(spec)?
    };
    v["node-name"] = json!("base");
    Ok(v)
}

/// One reactor's workers; returns the latency histogram (µs) of write+read pairs.
#[allow(clippy::too_many_arguments)]
async fn reactor_load(
    user: UserId,
    node: NodeId,
    first_slot: u64,
    workers: u64,
    io_size: u64,
    verify: bool,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Histogram<u64> {
    let hist = Rc::new(RefCell::new(Histogram::<u64>::new(3).expect("histogram")));
    let blk = Rc::new(Blk::open(user, node).expect("load node on this reactor"));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (blk, hist, stop, counters) =
            (blk.clone(), hist.clone(), stop.clone(), counters.clone());
        let slot = first_slot + w;
        tasks.push(strata_engine::reactor::spawn_with_reply(async move {
            let mut pass = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pass += 1;
                let pattern: Vec<u8> = (0..io_size)
                    .map(|i| (slot as u8).wrapping_mul(7) ^ (pass as u8) ^ (i as u8).rotate_left(3))
                    .collect();
                let offset = slot * io_size;
                let t = Instant::now();
                let w = blk
                    .io(Request::write(
                        offset,
                        Buffer::from_slice(&pattern),
                        ReqFlags::NONE,
                    ))
                    .await;
                let r = blk
                    .io(Request::read(offset, Buffer::new(io_size as usize)))
                    .await;
                hist.borrow_mut()
                    .record(t.elapsed().as_micros() as u64)
                    .ok();
                counters.ios.fetch_add(2, Ordering::Relaxed);
                if w.result.is_err() || r.result.is_err() {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                } else if verify && r.req.buf.as_deref() != Some(&pattern[..]) {
                    counters.mismatches.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.ok();
    }
    hist.replace(Histogram::new(3).expect("histogram"))
}

/// Runs the load for `seconds`; `churn` runs on this (admin) thread meanwhile and
/// returns how many changes it made.
fn phase(
    graph: &mut Graph,
    args: &Args,
    user: UserId,
    node: NodeId,
    churn: &mut dyn FnMut(&mut Graph, Instant) -> Result<u64, String>,
) -> Result<Phase, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut replies = Vec::new();
    for r in 0..graph.engine().reactors() {
        let (stop, counters) = (stop.clone(), counters.clone());
        let (q, o, verify) = (args.queue_depth, args.io_size, args.verify());
        let first = r as u64 * q;
        replies.push(graph.engine().spawn(r, move || {
            reactor_load(user, node, first, q, o, verify, stop, counters)
        }));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.time);
    let changes = churn(graph, deadline)?;
    let now = Instant::now();
    if now < deadline {
        std::thread::sleep(deadline - now);
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for r in replies {
        hist.add(r.wait().map_err(|_| "a reactor died")?).ok();
    }
    Ok(Phase {
        ios: counters.ios.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        mismatches: counters.mismatches.load(Ordering::Relaxed),
        hist,
        seconds: start.elapsed().as_secs_f64(),
        changes,
    })
}

/// One round of changes around the loaded `top` node; returns how many it made.
fn churn_round(g: &mut Graph, i: u64) -> Result<u64, String> {
    let e = |e: strata_engine::Error| e.message;
    let f = format!("f{i}");
    g.add(&json!({"driver": "raw", "node-name": f, "file": "base"}))
        .map_err(e)?;
    g.replace_child("top", "file", &f).map_err(e)?;
    let x = format!("x{i}");
    g.add(&json!({"driver": "raw", "node-name": x, "file": {"driver": "null-co", "size": 4096}}))
        .map_err(e)?;
    g.del(&x).map_err(e)?;
    g.replace_child("top", "file", "base").map_err(e)?;
    g.del(&f).map_err(e)?;
    Ok(6)
}

fn row(name: &str, p: &Phase) {
    let iops = p.ios as f64 / p.seconds;
    println!(
        "{name:<10} {:>10.0} {:>8} {:>8} {:>8} {:>9} {:>9.0} {:>7} {:>10}",
        iops,
        p.hist.value_at_quantile(0.5),
        p.hist.value_at_quantile(0.99),
        p.hist.value_at_quantile(0.9999),
        p.hist.max(),
        p.changes as f64 / p.seconds,
        p.errors,
        p.mismatches
    );
}

fn run(args: Args) -> Result<bool, String> {
    let mut graph = open_graph(&args)?;
    graph
        .add(&backend_options(&args.node)?)
        .map_err(|e| e.message)?;
    graph
        .add(&json!({"driver": "raw", "node-name": "top", "file": "base"}))
        .map_err(|e| e.message)?;
    let (user, node) = graph
        .attach_user(
            "block device 'load'",
            "top",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
        .map_err(|e| e.message)?;
    let reactors = graph.engine().reactors();
    let quiet = phase(&mut graph, &args, user, node, &mut |_, _| Ok(0))?;
    let mut i = 0;
    let churned = phase(&mut graph, &args, user, node, &mut |g, deadline| {
        let mut n = 0;
        while Instant::now() < deadline {
            n += churn_round(g, i)?;
            i += 1;
        }
        Ok(n)
    })?;
    println!(
        "strata-graph-churn: {reactors} reactors x {} workers, write+read pairs of {} bytes on raw over {} (verify {})",
        args.queue_depth,
        args.io_size,
        args.node,
        if args.verify() {
            "on"
        } else {
            "off: null-co stores nothing"
        }
    );
    println!(
        "{:<10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>10}",
        "phase",
        "IOPS",
        "p50 us",
        "p99 us",
        "p99.99",
        "max us",
        "changes/s",
        "errors",
        "mismatches"
    );
    row("quiet", &quiet);
    row("churn", &churned);
    println!(
        "longest drain (first drain request to last undrain): {:.1} us over {} changes",
        graph.longest_pause().as_secs_f64() * 1e6,
        churned.changes
    );
    let clean = quiet.errors + quiet.mismatches + churned.errors + churned.mismatches == 0;
    graph.detach_user(user).map_err(|e| e.message)?;
    graph.shutdown();
    Ok(clean && churned.ios > 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("strata-graph-churn: I/O errors, verify mismatches or no I/O (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("strata-graph-churn: {e}");
            ExitCode::FAILURE
        }
    }
}
