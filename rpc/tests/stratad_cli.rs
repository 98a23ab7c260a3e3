//! stratad as a process: its sockets, signals, `--config`, `--blockdev`, start errors
//! and exit codes.

use serde_json::{Value, json};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;
use strata_tests::{Daemon, JsonRpc, TempDir, node_names, stratad_exit};

#[test]
fn socket_files_are_private_to_the_user() {
    let d = Daemon::start(&[]);
    for path in [&d.rpc, &d.qmp] {
        let md = std::fs::symlink_metadata(path).unwrap();
        assert!(md.file_type().is_socket(), "{}", path.display());
        assert_eq!(md.permissions().mode() & 0o777, 0o600, "{}", path.display());
    }
    assert!(
        d.banner.contains(&d.rpc.display().to_string()),
        "{}",
        d.banner
    );
    assert!(
        d.banner.contains(&d.qmp.display().to_string()),
        "{}",
        d.banner
    );
}

#[test]
fn sigterm_and_sigint_flush_exit_0_and_remove_sockets_and_pidfile() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = TempDir::new("signal");
        let image = dir.path("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let pidfile = dir.path("stratad.pid");
        let mut d = Daemon::start_in(
            dir,
            &[
                "--pidfile",
                pidfile.to_str().unwrap(),
                "--blockdev",
                &format!("driver=file,node-name=f0,filename={}", image.display()),
            ],
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, d.pid());
        let mut idle = d.rpc();
        let status = d.signal_and_wait(signal);
        assert!(
            status.success(),
            "signal {signal}: {status}: {}",
            d.stderr()
        );
        assert!(!d.rpc.exists(), "the JSON-RPC socket is removed");
        assert!(!d.qmp.exists(), "the QMP socket is removed");
        assert!(!pidfile.exists(), "the pid file is removed");
        assert!(idle.closed(), "connected clients are disconnected");
    }
}

#[test]
fn an_idle_daemon_sleeps() {
    let d = Daemon::start(&["--rpc-tcp", "0"]);
    let _clients: Vec<JsonRpc> = (0..4).map(|_| d.rpc()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = d.cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = d.cpu_ticks() - before;
    // Clock ticks are 10 ms: a busy loop anywhere would burn about 200 of them.
    assert!(used <= 10, "an idle stratad used {used} ticks in 2 s");
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused_and_a_stale_socket_is_replaced() {
    let d = Daemon::start(&[]);
    let other_qmp = d.dir.path("other-qmp.sock");
    let (code, _, err) = stratad_exit(&[
        "--rpc-socket",
        d.rpc.to_str().unwrap(),
        "--qmp-socket",
        other_qmp.to_str().unwrap(),
        "-m",
        "[0]",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "another stratad is listening on {}",
            d.rpc.display()
        )),
        "{err}"
    );
    assert!(
        !other_qmp.exists(),
        "a failed start leaves no socket behind"
    );
    // The first daemon is untouched.
    d.rpc().ok("query-version", Value::Null);

    // A daemon killed with SIGKILL leaves its socket files behind: the next one takes
    // the path over.
    let dir = TempDir::new("stale");
    let mut d = Daemon::start_in(dir, &[]);
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    let _ = d.wait_exit(Duration::from_secs(10));
    assert!(d.rpc.exists(), "SIGKILL leaves the socket file");
    let dir = std::mem::replace(&mut d.dir, TempDir::new("unused"));
    let d2 = Daemon::start_in(dir, &[]);
    d2.rpc().ok("query-version", Value::Null);
}

#[test]
fn config_replays_save_config_output_in_order() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    rpc.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m0", "size": 1048576}),
    );
    rpc.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0", "file": "m0", "offset": 4096}),
    );
    let calls = rpc.ok("save-config", Value::Null);
    let before = node_names(&mut rpc);
    drop(d);

    let dir = TempDir::new("config");
    let config = dir.path("config.json");
    std::fs::write(&config, serde_json::to_vec_pretty(&calls).unwrap()).unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--config",
            config.to_str().unwrap(),
            "--blockdev",
            "driver=raw,node-name=r1,file=m0",
        ],
    );
    let mut rpc = d.rpc();
    let mut want = before.clone();
    want.push("r1".to_string());
    want.sort();
    assert_eq!(node_names(&mut rpc), want);
    let nodes = rpc.ok("query-named-block-nodes", json!({"flat": true}));
    let r0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "r0")
        .unwrap();
    assert_eq!(r0["image"]["virtual-size"], 1048576 - 4096, "{r0}");
}

#[test]
fn a_failing_config_call_aborts_the_start_naming_the_call() {
    let dir = TempDir::new("bad-config");
    let config = dir.path("config.json");
    std::fs::write(
        &config,
        r#"[{"method": "blockdev-add", "params": {"driver": "null-co", "node-name": "ok"}},
            {"method": "blockdev-add", "params": {"driver": "raw", "node-name": "bad", "file": "missing"}}]"#,
    )
    .unwrap();
    let rpc = dir.path("rpc.sock");
    let (code, _, err) = stratad_exit(&[
        "--rpc-socket",
        rpc.to_str().unwrap(),
        "-m",
        "[0]",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("call 2 of 2 (blockdev-add node-name=bad)"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
    assert!(!rpc.exists(), "no socket is left behind");

    std::fs::write(&config, "{\"not\": \"a list\"}").unwrap();
    let (code, _, err) = stratad_exit(&[
        "--rpc-socket",
        rpc.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("JSON array"), "{err}");
    let (code, _, err) = stratad_exit(&["--config", dir.path("nope.json").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn blockdevs_in_keyval_and_json_form_open_in_order() {
    let d = Daemon::start(&[
        "--blockdev",
        "driver=memory,node-name=m0,size=64k",
        "--blockdev",
        r#"{"driver": "raw", "node-name": "r0", "file": "m0"}"#,
        "--blockdev",
        "driver=raw,node-name=r1,file.driver=null-co,file.size=1M",
    ]);
    let mut rpc = d.rpc();
    let names = node_names(&mut rpc);
    assert_eq!(names.len(), 4, "{names:?}"); // r1's inline child has a generated name
    for n in ["m0", "r0", "r1"] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
}

#[test]
fn bad_flags_exit_2_and_failing_blockdevs_exit_1() {
    let dir = TempDir::new("flags");
    let rpc = dir.path("rpc.sock");
    let rpc = rpc.to_str().unwrap();
    for (args, part) in [
        (vec!["--no-such-flag"], "--no-such-flag"),
        (vec!["--poll-mode", "lazy"], "lazy"),
        (vec!["-m", "0x0"], "selects no CPU"),
        (vec!["--blockdev", "{\"driver\":"], "not valid JSON"),
        (
            vec!["--chardev", "stdio,id=x"],
            "backend 'stdio' is not supported",
        ),
        (vec!["--monitor", "chardev=x"], "chardev 'x' not found"),
        (vec!["--rpc-tcp", "not-a-port"], "--rpc-tcp"),
    ] {
        let mut full = vec!["--rpc-socket", rpc];
        full.extend(args.iter().copied());
        let (code, _, err) = stratad_exit(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(part), "{args:?}: {err}");
    }
    let (code, _, err) = stratad_exit(&[
        "--rpc-socket",
        rpc,
        "-m",
        "[0]",
        "--blockdev",
        "driver=nonesuch,node-name=x",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--blockdev 'driver=nonesuch,node-name=x'"),
        "{err}"
    );
    assert!(!std::path::Path::new(rpc).exists());
}
