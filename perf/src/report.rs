//! Results: per-job and total figures, printed as bdevperf's table (plus percentiles) or
//! as one JSON document.

use crate::job::{JobResult, new_histogram};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;

/// One row of the results (a job, or the total).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub job: String,
    pub core: Option<usize>,
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentage: Option<u64>,
    pub queue_depth: usize,
    pub io_size: u64,
    pub status: &'static str,
    pub runtime: f64,
    pub ios: u64,
    pub iops: f64,
    pub mibps: f64,
    pub io_failed: u64,
    pub fail_per_sec: f64,
    pub avg_latency_us: f64,
    pub min_latency_us: f64,
    pub max_latency_us: f64,
    pub p50_latency_us: f64,
    pub p99_latency_us: f64,
    pub p99_9_latency_us: f64,
    pub p99_99_latency_us: f64,
    pub verify_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_mismatch_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// CPU seconds the job's reactor thread used while the job ran.
    pub cpu_sec: f64,
}

/// Common description of the run.
#[derive(Clone, Debug)]
pub struct RowInfo {
    pub workload: String,
    pub percentage: Option<u64>,
    pub queue_depth: usize,
    pub io_size: u64,
    pub interrupted: bool,
}

/// Counts of a job or of the total.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub ios: u64,
    pub failed: u64,
    pub verify_errors: u64,
    pub runtime: f64,
    pub cpu: f64,
}

pub fn row(
    name: &str,
    core: Option<usize>,
    info: &RowInfo,
    t: &Tally,
    hist: &Histogram<u64>,
) -> Row {
    let Tally {
        ios,
        failed,
        verify_errors,
        runtime,
        cpu,
    } = *t;
    let secs = runtime.max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    let empty = hist.is_empty();
    let q = |p: f64| {
        if empty {
            0.0
        } else {
            us(hist.value_at_quantile(p))
        }
    };
    Row {
        job: name.to_string(),
        core,
        workload: info.workload.clone(),
        percentage: info.percentage,
        queue_depth: info.queue_depth,
        io_size: info.io_size,
        // A run that completed nothing (and was not cut short) did not measure anything.
        status: if failed > 0 || verify_errors > 0 || (ios == 0 && !info.interrupted) {
            "failed"
        } else if info.interrupted {
            "terminated"
        } else {
            "finished"
        },
        runtime,
        ios,
        iops: ios as f64 / secs,
        mibps: ios as f64 * info.io_size as f64 / secs / (1024.0 * 1024.0),
        io_failed: failed,
        fail_per_sec: failed as f64 / secs,
        avg_latency_us: if empty { 0.0 } else { hist.mean() / 1000.0 },
        min_latency_us: if empty { 0.0 } else { us(hist.min()) },
        max_latency_us: if empty { 0.0 } else { us(hist.max()) },
        p50_latency_us: q(0.5),
        p99_latency_us: q(0.99),
        p99_9_latency_us: q(0.999),
        p99_99_latency_us: q(0.9999),
        verify_errors,
        first_mismatch_offset: None,
        first_error: None,
        cpu_sec: cpu,
    }
}

/// Builds the job rows and the total row.
pub fn summarize(jobs: &[(String, usize, JobResult)], info: &RowInfo) -> (Vec<Row>, Row) {
    let mut rows = Vec::new();
    let mut total_hist = new_histogram();
    let mut sum = Tally::default();
    for (name, core, r) in jobs {
        let t = Tally {
            ios: r.ios,
            failed: r.failed,
            verify_errors: r.verify_errors,
            runtime: r.elapsed.as_secs_f64(),
            cpu: r.cpu.as_secs_f64(),
        };
        let mut row = row(name, Some(*core), info, &t, &r.hist);
        row.first_mismatch_offset = r.first_mismatch;
        row.first_error = r
            .error
            .clone()
            .or_else(|| r.first_errno.map(|e| e.to_string()));
        if r.error.is_some() {
            row.status = "failed";
        }
        rows.push(row);
        let _ = total_hist.add(&r.hist);
        sum.ios += t.ios;
        sum.failed += t.failed;
        sum.verify_errors += t.verify_errors;
        sum.runtime = sum.runtime.max(t.runtime);
        sum.cpu += t.cpu;
    }
    // Total IOPS is the sum of each job's rate (jobs run concurrently).
    let mut total = row("Total", None, info, &sum, &total_hist);
    total.iops = rows.iter().map(|r| r.iops).sum();
    total.mibps = rows.iter().map(|r| r.mibps).sum();
    total.fail_per_sec = rows.iter().map(|r| r.fail_per_sec).sum();
    total.first_mismatch_offset = rows.iter().find_map(|r| r.first_mismatch_offset);
    total.first_error = rows.iter().find_map(|r| r.first_error.clone());
    if rows.iter().any(|r| r.status == "failed") {
        total.status = "failed";
    }
    (rows, total)
}

/// bdevperf-style text table with percentile columns.
pub fn table(rows: &[Row], total: &Row, node: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>126}", "Latency(us)");
    let _ = writeln!(
        s,
        " {:<28}: {:>10} {:>12} {:>10} {:>8} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "Average",
        "min",
        "max",
        "p50",
        "p99",
        "p99.9",
        "p99.99"
    );
    for r in rows {
        let pct = r
            .percentage
            .map(|p| format!(", percentage: {p}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            " Job: {} (Core {}, workload: {}{}, depth: {}, IO size: {})",
            node,
            r.core.map(|c| c.to_string()).unwrap_or_default(),
            r.workload,
            pct,
            r.queue_depth,
            r.io_size
        );
        line(&mut s, &format!("    {}", r.job), r);
        if let Some(e) = &r.first_error {
            let _ = writeln!(s, "    first error: {e}");
        }
        if r.verify_errors > 0 {
            let _ = writeln!(
                s,
                "    verify: {} mismatches, first at offset {}",
                r.verify_errors,
                r.first_mismatch_offset.unwrap_or(0)
            );
        }
    }
    let _ = writeln!(s, " {}", "=".repeat(150));
    line(&mut s, "Total", total);
    s
}

fn line(s: &mut String, name: &str, r: &Row) {
    let _ = writeln!(
        s,
        " {:<28}: {:>10.2} {:>12.2} {:>10.2} {:>8.2} {:>10.2} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        name,
        r.runtime,
        r.iops,
        r.mibps,
        r.fail_per_sec,
        r.avg_latency_us,
        r.min_latency_us,
        r.max_latency_us,
        r.p50_latency_us,
        r.p99_latency_us,
        r.p99_9_latency_us,
        r.p99_99_latency_us
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn job(ios: u64, failed: u64, lat_ns: &[u64]) -> JobResult {
        let mut hist = new_histogram();
        for &l in lat_ns {
            hist.record(l).unwrap();
        }
        JobResult {
            ios,
            failed,
            verify_errors: 0,
            first_mismatch: None,
            first_errno: None,
            elapsed: Duration::from_secs(2),
            cpu: Duration::from_secs(1),
            hist,
            error: None,
        }
    }

    #[test]
    fn totals_add_rates_and_merge_latencies() {
        let info = RowInfo {
            workload: "randread".into(),
            percentage: None,
            queue_depth: 4,
            io_size: 4096,
            interrupted: false,
        };
        let jobs = vec![
            ("a".to_string(), 0, job(2000, 0, &[1000, 3000])),
            ("b".to_string(), 1, job(4000, 2, &[5000])),
        ];
        let (rows, total) = summarize(&jobs, &info);
        assert_eq!(rows[0].iops, 1000.0);
        assert_eq!(rows[1].fail_per_sec, 1.0);
        assert_eq!(rows[1].status, "failed");
        assert_eq!(total.iops, 3000.0);
        assert_eq!(total.ios, 6000);
        assert!((total.min_latency_us - 1.0).abs() < 0.01);
        assert!((total.max_latency_us - 5.0).abs() < 0.01);
        assert!((total.avg_latency_us - 3.0).abs() < 0.01);
        assert_eq!(total.status, "failed");
        let text = table(&rows, &total, "null-co");
        assert!(
            text.contains("Job: null-co (Core 1, workload: randread, depth: 4, IO size: 4096)")
        );
        assert!(
            text.lines()
                .last()
                .unwrap()
                .trim_start()
                .starts_with("Total")
        );
    }
}
