//! Graph changes under a busy NBD export go through the drain protocol: fio verifies
//! every block it wrote while the exported node's child is swapped back and forth as
//! fast as the admin thread can, on two reactors with a connection each. A request that
//! ran against a half-changed graph, or was lost in a drain, shows as a verify error or
//! an I/O error.

use serde_json::json;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use strata_tests::{ChildGuard, Daemon, TempDir, require_tool, wait_output};

#[test]
fn fio_verify_passes_while_the_exported_nodes_child_is_replaced() {
    let fio = require_tool("fio", "fio");
    let dir = TempDir::new("nbd-graph");
    let sock = dir.path("nbd.sock");
    let nbd_server = format!("addr.type=unix,addr.path={}", sock.display());
    let d = Daemon::start_in(
        dir,
        &[
            "-m",
            "[0,1]",
            "--no-pin",
            "--blockdev",
            "driver=memory,node-name=mem0,size=32M",
            "--blockdev",
            "driver=raw,node-name=mid,file=mem0",
            "--blockdev",
            "driver=raw,node-name=top,file=mem0",
            "--nbd-server",
            &nbd_server,
            "--export",
            "type=nbd,id=e0,node-name=top,name=disk,writable=on",
        ],
    );
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    // Two jobs, two connections (spread over the two reactors), each writing and then
    // verifying its own half, three times over.
    let child = Command::new(fio)
        .args([
            "--name=churn",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16M",
            "--offset_increment=16M",
            "--loops=3",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--group_reporting",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    let mut fio_guard = ChildGuard(Some(child));

    let done = Arc::new(AtomicBool::new(false));
    let changer = {
        let rpc = d.rpc.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut rpc = strata_tests::JsonRpc::connect(&rpc);
            let mut changes = 0u64;
            let mut target = "mid";
            while !done.load(Ordering::SeqCst) {
                rpc.ok(
                    "x-blockdev-replace-child",
                    json!({"parent": "top", "child": "file", "node": target}),
                );
                target = if target == "mid" { "mem0" } else { "mid" };
                changes += 1;
            }
            changes
        })
    };
    let out = wait_output(fio_guard.0.take().unwrap(), Duration::from_secs(240));
    done.store(true, Ordering::SeqCst);
    let changes = changer.join().expect("graph changer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = &stdout[stdout.find('{').expect("fio JSON output")..];
    let report: serde_json::Value = serde_json::from_str(text).expect("fio JSON");
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert_eq!(written, 3 * (32 << 20), "every block written, three times");
    assert_eq!(
        verified, written,
        "every written block read back and verified"
    );
    assert!(
        changes > 10,
        "only {changes} graph changes ran during the I/O"
    );
    eprintln!(
        "{changes} child replacements under {} MiB of verified I/O",
        written >> 20
    );
}
