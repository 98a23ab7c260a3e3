//! The strata-rpc client against a real stratad: params from key=value pairs or JSON,
//! pretty results, error and connection exit codes, `--wait`.

use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use strata_tests::{ChildGuard, Daemon, TempDir, node_names, strata_rpc, workspace_bin};

#[test]
fn a_call_prints_the_result_as_pretty_json_and_exits_0() {
    let d = Daemon::start(&[]);
    let s = d.rpc.to_str().unwrap();
    let (code, out, err) = strata_rpc(&["-s", s, "query-version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\n  \"package\""), "pretty-printed: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["qemu"]["major"], 10);
}

#[test]
fn key_value_pairs_are_dotted_keyval_and_json_params_go_as_given() {
    let d = Daemon::start(&[]);
    let s = d.rpc.to_str().unwrap();
    let (code, out, err) = strata_rpc(&[
        "-s",
        s,
        "blockdev-add",
        "driver=raw",
        "node-name=r0",
        "file.driver=memory",
        "file.node-name=m0",
        "file.size=1M",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "{}");
    let (code, _, err) = strata_rpc(&[
        "-s",
        s,
        "blockdev-add",
        "--json",
        r#"{"driver": "null-co", "node-name": "n0", "size": 4096}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(node_names(&mut d.rpc()), ["m0", "n0", "r0"]);
    let (code, out, err) = strata_rpc(&[
        "-s",
        s,
        "query-named-block-nodes",
        "--json",
        r#"{"flat": true}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
}

#[test]
fn a_failing_command_prints_error_and_code_and_exits_1() {
    let d = Daemon::start(&[]);
    let s = d.rpc.to_str().unwrap();
    let (code, out, err) = strata_rpc(&["-s", s, "blockdev-del", "node-name=nope"]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("nope") && err.trim_end().ends_with("(code -19)"),
        "{err}"
    );
    let (code, _, err) = strata_rpc(&["-s", s, "no-such-method"]);
    assert_eq!(code, 1);
    assert!(err.contains("(code -32601)"), "{err}");
}

#[test]
fn no_daemon_exits_2_with_a_hint_and_bad_usage_exits_2() {
    let dir = TempDir::new("nodaemon");
    let (code, _, err) = strata_rpc(&[
        "-s",
        dir.path("missing.sock").to_str().unwrap(),
        "query-version",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(err.contains("is stratad running?"), "{err}");
    let (code, _, err) = strata_rpc(&[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = strata_rpc(&["-s", "/x", "m", "not-a-pair"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KEY=VALUE"), "{err}");
    let (code, _, err) = strata_rpc(&["m", "a=1", "--json", "{}"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn tcp_connects_to_the_rpc_tcp_port() {
    let d = Daemon::start(&["--rpc-tcp", "0"]);
    let port = d
        .banner
        .split("JSON-RPC tcp:127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("{}", d.banner))
        .to_string();
    let (code, out, err) = strata_rpc(&["--tcp", &port, "query-version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("strata"), "{out}");
}

#[test]
fn wait_prints_the_event_when_it_comes_and_times_out_with_1() {
    let d = Daemon::start(&[]);
    let s = d.rpc.to_str().unwrap();
    let mut waiter = ChildGuard(Some(
        Command::new(workspace_bin("strata-rpc"))
            .args(["-s", s, "--wait", "BLOCK_NODE_ADDED", "--timeout", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // Keep adding nodes until the waiter has seen one (it may subscribe after the
    // first few).
    let mut rpc = d.rpc();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    let out = loop {
        rpc.ok(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": format!("w{i}")}),
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
        if let Some(out) = waiter.try_output() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "strata-rpc --wait never saw the event"
        );
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["event"], "BLOCK_NODE_ADDED");
    assert!(ev["data"]["node-name"].as_str().unwrap().starts_with('w'));
    assert!(ev["timestamp"]["seconds"].is_u64());

    let started = Instant::now();
    let (code, _, err) = strata_rpc(&["-s", s, "--wait", "NEVER_HAPPENS", "--timeout", "0.3"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no NEVER_HAPPENS event within 0.3 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
