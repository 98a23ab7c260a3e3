//! The QMP front end of a real stratad: greeting, negotiation, QEMU's error texts,
//! events, the qemu-storage-daemon `--chardev`/`--monitor` form, and `quit`.

use serde_json::{Value, json};
use std::time::Duration;
use strata_tests::{Daemon, Qmp, TempDir};

fn err(v: &Value) -> (String, String) {
    (
        v["error"]["class"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error: {v}"))
            .to_string(),
        v["error"]["desc"].as_str().unwrap().to_string(),
    )
}

#[test]
fn the_greeting_then_capabilities_negotiation_exactly_once() {
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    assert_eq!(
        q.greeting,
        json!({"QMP": {
            "version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                        "package": format!("strata {}", env!("CARGO_PKG_VERSION"))},
            "capabilities": ["oob"]}})
    );
    let v = q.execute("query-version", Value::Null);
    assert_eq!(
        err(&v),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    q.send(br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "c1"}"#);
    q.send(b"\n");
    assert_eq!(q.reply(), json!({"return": {}, "id": "c1"}));
    let v = q.execute("qmp_capabilities", Value::Null);
    assert_eq!(
        err(&v),
        (
            "CommandNotFound".into(),
            "Capabilities negotiation is already complete, command ignored".into()
        )
    );
    let v = q.execute("query-version", Value::Null);
    assert_eq!(v["return"]["qemu"]["major"], 10, "{v}");
}

#[test]
fn malformed_input_gets_qemus_texts_and_the_connection_keeps_working() {
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    q.negotiate();
    for (raw, class, desc) in [
        (
            r#"{"execute": "query-version",}"#,
            "GenericError",
            "JSON parse error, expecting value",
        ),
        ("[1, 2]", "GenericError", "QMP input must be a JSON object"),
        (
            r#"{"arguments": {}}"#,
            "GenericError",
            "QMP input lacks member 'execute'",
        ),
        (
            r#"{"execute": "query-version", "x": 1}"#,
            "GenericError",
            "QMP input member 'x' is unexpected",
        ),
        (
            r#"{"execute": "no-such-command"}"#,
            "CommandNotFound",
            "The command no-such-command has not been found",
        ),
    ] {
        q.send(format!("{raw}\n").as_bytes());
        let v = q.reply();
        assert_eq!(err(&v), (class.to_string(), desc.to_string()), "{raw}");
        assert_eq!(
            q.execute("query-version", Value::Null)["return"]["qemu"]["major"],
            10
        );
    }
    // The id comes back verbatim, on errors too.
    q.send(b"{\"execute\": \"blockdev-del\", \"arguments\": {}, \"id\": [7, {\"x\": null}]}\n");
    let v = q.reply();
    assert_eq!(v["id"], json!([7, {"x": null}]), "{v}");
    assert_eq!(err(&v).0, "GenericError");
}

#[test]
fn events_reach_every_negotiated_client_and_no_other() {
    let d = Daemon::start(&[]);
    let mut a = d.qmp();
    a.negotiate();
    let mut b = d.qmp();
    b.negotiate();
    let mut waiting = d.qmp(); // greeting read, not negotiated
    a.send(b"{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"null-co\", \"node-name\": \"q0\"}}\n");
    // `a` gets its reply and the event, in either order; `b` gets just the event.
    let (m1, m2) = (a.recv(), a.recv());
    let (reply, ev) = if m1.get("event").is_some() {
        (m2, m1)
    } else {
        (m1, m2)
    };
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(ev["event"], "BLOCK_NODE_ADDED", "{ev}");
    assert_eq!(ev["data"]["node-name"], "q0");
    let ev = b.recv();
    assert_eq!(ev["event"], "BLOCK_NODE_ADDED", "{ev}");
    assert_eq!(ev["data"], json!({"node-name": "q0"}));
    assert!(ev["timestamp"]["seconds"].is_u64() && ev["timestamp"]["microseconds"].is_u64());
    // The client still negotiating got no event: its next message is a reply.
    let v = waiting.execute("qmp_capabilities", Value::Null);
    assert_eq!(v, json!({"return": {}}));
}

#[test]
fn the_qsd_chardev_and_monitor_form_serves_qmp() {
    let dir = TempDir::new("chardev");
    let mon = dir.path("mon.sock");
    let pretty = dir.path("pretty.sock");
    let chardev = format!("socket,id=m0,path={},server=on,wait=off", mon.display());
    let chardev2 = format!("socket,id=m1,path={},server=on,wait=off", pretty.display());
    let d = Daemon::start_in(
        dir,
        &[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
            "--chardev",
            &chardev2,
            "--monitor",
            "chardev=m1,mode=control,pretty=on",
        ],
    );
    let mut q = Qmp::connect(&mon);
    q.negotiate();
    assert_eq!(
        q.execute("query-version", Value::Null)["return"]["qemu"]["major"],
        10
    );
    // pretty=on: each message over several lines, as QEMU prints it.
    let mut p = std::os::unix::net::UnixStream::connect(&pretty).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let g: Value = serde_json::Deserializer::from_reader(&mut p)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert!(g.get("QMP").is_some(), "{g}");
    drop(d);
}

#[test]
fn quit_over_qmp_is_answered_then_the_daemon_exits_cleanly() {
    let mut d = Daemon::start(&["--blockdev", "driver=null-co,node-name=n0"]);
    let mut q = d.qmp();
    q.negotiate();
    let mut other = d.rpc();
    q.send(b"{\"execute\": \"quit\", \"id\": 1}\n");
    assert_eq!(q.reply(), json!({"return": {}, "id": 1}));
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", d.stderr());
    assert!(
        !d.rpc.exists() && !d.qmp.exists(),
        "socket files are removed"
    );
    assert!(other.closed(), "other clients are disconnected");
}
