//! strata-perf end to end: the real binary, real reactors, real nodes.

use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn perf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata-perf"))
}

fn run(args: &[&str]) -> Output {
    perf().args(args).output().expect("run strata-perf")
}

fn json_run(args: &[&str]) -> (Value, Output) {
    let mut all = vec!["--json", "-S", "0", "--no-pin"];
    all.extend_from_slice(args);
    let out = run(&all);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (doc, out)
}

#[test]
fn null_co_randread_reports_every_figure_per_job_and_total() {
    let (doc, out) = json_run(&[
        "-q", "8", "-o", "4k", "-w", "randread", "-t", "0.5", "-m", "0x1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "one job per reactor");
    let total = &doc["total"];
    for key in [
        "iops",
        "mibps",
        "fail_per_sec",
        "avg_latency_us",
        "min_latency_us",
        "max_latency_us",
        "p50_latency_us",
        "p99_latency_us",
        "p99_9_latency_us",
        "p99_99_latency_us",
        "runtime",
    ] {
        assert!(total[key].as_f64().is_some(), "total lacks {key}: {total}");
    }
    assert!(total["iops"].as_f64().unwrap() > 1000.0, "{total}");
    assert_eq!(total["io_failed"], 0);
    assert_eq!(total["status"], "finished");
    let p = |k: &str| total[k].as_f64().unwrap();
    assert!(
        p("min_latency_us") <= p("p50_latency_us") && p("p50_latency_us") <= p("p99_latency_us")
    );
    assert!(
        p("p99_latency_us") <= p("p99_99_latency_us")
            && p("p99_99_latency_us") <= p("max_latency_us")
    );
    assert_eq!(doc["config"]["queue_depth"], 8);
    assert_eq!(doc["config"]["node"]["driver"], "null-co");
}

#[test]
fn one_job_runs_on_each_selected_core() {
    let (doc, out) = json_run(&["-q", "4", "-t", "0.3", "--cores", "0,1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cores: Vec<u64> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["core"].as_u64().unwrap())
        .collect();
    assert_eq!(cores, vec![0, 1]);
}

#[test]
fn verify_on_a_node_that_stores_nothing_fails_with_the_offset() {
    // null-co discards writes: every read-back differs from the pattern.
    let (doc, out) = json_run(&[
        "-w",
        "verify",
        "-q",
        "2",
        "-t",
        "0.3",
        "-m",
        "0x1",
        "--node",
        "driver=null-co,size=1M,read-zeroes=on",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify mismatches must fail the run"
    );
    assert!(doc["total"]["verify_errors"].as_u64().unwrap() > 0);
    assert!(doc["total"]["first_mismatch_offset"].as_u64().is_some());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify mismatch"),
        "mismatches are reported with offsets"
    );
}

#[test]
fn verify_on_a_node_that_stores_data_passes_and_names_its_seed() {
    let (doc, out) = json_run(&[
        "-w",
        "verify",
        "-q",
        "4",
        "-t",
        "0.5",
        "-m",
        "0x1",
        "--node",
        "driver=memory,size=4M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(doc["total"]["verify_errors"], 0);
    assert!(
        doc["total"]["ios"].as_u64().unwrap() > 1000,
        "verify did I/O: {}",
        doc["total"]
    );
    assert!(doc["config"]["seed"].as_u64().is_some());
    // Runs differ by seed unless one is given.
    let (again, _) = json_run(&[
        "-w",
        "verify",
        "-q",
        "1",
        "-t",
        "0.1",
        "-m",
        "0x1",
        "--node",
        "driver=memory,size=4M",
    ]);
    assert_ne!(doc["config"]["seed"], again["config"]["seed"]);
}

#[test]
fn failed_requests_count_as_failures_not_as_iops() {
    // Writes past the process's file size limit fail with EFBIG (SIGXFSZ ignored).
    let dir = std::env::temp_dir().join(format!("strata-perf-efbig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("img");
    std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 1; exec '{}' --json -S 0 --no-pin -w randwrite -q 4 -t 0.3 -m 0x1 --node driver=file,filename={}",
        env!("CARGO_BIN_EXE_strata-perf"),
        f.display()
    );
    let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    std::fs::remove_dir_all(dir).ok();
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    let total = &doc["total"];
    assert_eq!(out.status.code(), Some(1), "failures fail the run");
    assert_eq!(total["status"], "failed");
    assert!(total["io_failed"].as_u64().unwrap() > 100, "{total}");
    assert_eq!(
        total["ios"], 0,
        "no write succeeded, so none counts: {total}"
    );
    assert_eq!(total["iops"].as_f64(), Some(0.0), "{total}");
    assert!(
        total["first_error"].as_str().unwrap().contains("EFBIG"),
        "{total}"
    );
}

#[test]
fn mixed_workload_reports_its_read_percentage() {
    let (doc, out) = json_run(&["-w", "randrw", "-M", "70", "-t", "0.2", "-m", "0x1"]);
    assert!(out.status.success());
    assert_eq!(doc["results"][0]["percentage"], 70);
}

#[test]
fn every_workload_runs_on_null_co() {
    for w in [
        "read",
        "write",
        "randread",
        "randwrite",
        "rw",
        "randrw",
        "flush",
        "unmap",
        "write_zeroes",
    ] {
        let (doc, out) = json_run(&["-w", w, "-q", "4", "-t", "0.1", "-m", "0x1"]);
        assert!(
            out.status.success(),
            "{w}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(doc["total"]["io_failed"], 0, "{w}");
        assert!(doc["total"]["ios"].as_u64().unwrap() > 0, "{w}");
    }
}

#[test]
fn latency_ns_shows_in_the_measured_latency() {
    let (doc, out) = json_run(&[
        "-q",
        "1",
        "-t",
        "0.3",
        "-m",
        "0x1",
        "--node",
        "driver=null-co,latency-ns=200000",
    ]);
    assert!(out.status.success());
    let min = doc["total"]["min_latency_us"].as_f64().unwrap();
    assert!(
        min >= 200.0,
        "a 200 us null-co latency measured as {min} us"
    );
}

#[test]
fn bad_flags_fail_with_a_message_and_no_run() {
    let cases: &[(&[&str], &str)] = &[
        (&["-w", "reset"], "unknown workload"),
        (&["-q", "0"], "queue depth"),
        (&["-o", "0"], "I/O size"),
        (&["-o", "12q"], "invalid size"),
        (&["-M", "101"], "percentage"),
        (&["-t=-1"], "positive"),
        (&["-t", "0"], "positive"),
        (&["-t", "1e20"], "positive"),
        (&["-S", "inf"], "-S"),
        (&["-q", "65536", "-o", "1G"], "memory"),
        (&["-m", "0x0"], "no CPU"),
        (&["--cores", "999"], "not available"),
        (&["--node", "driver=nope"], "unknown driver"),
        (
            &["--node", "driver=null-co,size=1k", "-o", "4k"],
            "smaller than one I/O",
        ),
        (&["--node", "driver=null-co,bogus=1"], "bogus"),
        (&["--node", "{not json"], "JSON"),
        (&["--poll-mode", "sometimes"], "poll mode"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should be a usage error"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: stderr lacks '{needle}': {err}"
        );
        assert!(
            out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("Total"),
            "{args:?} ran anyway"
        );
    }
}

#[test]
fn ctrl_c_stops_early_and_still_prints_the_summary() {
    let child = perf()
        .args(["-t", "60", "-q", "4", "-m", "0x1", "-S", "0", "--no-pin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20), "stopped promptly");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Total"),
        "summary printed after Ctrl-C: {text}"
    );
    assert!(
        out.status.success(),
        "an interrupted run with no failures exits 0"
    );
}

#[test]
fn progress_lines_appear_once_a_second() {
    let out = run(&["-t", "2.2", "-q", "2", "-m", "0x1", "--no-pin"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = text
        .lines()
        .filter(|l| l.contains("IOPS") && l.starts_with('['))
        .count();
    assert_eq!(lines, 2, "two progress lines in 2.2 s: {text}");
}
