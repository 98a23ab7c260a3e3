//! Bad input over both protocols: every malformed request gets its exact error code or
//! class, and the daemon keeps serving (the same connection where the protocol allows,
//! and always a new one).

use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::net::UnixStream;
use strata_tests::{Daemon, JsonRpc, Qmp, TempDir};

const PARSE: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const NOT_FOUND_METHOD: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const NO_NODE: i64 = -19;
const BUSY: i64 = -16;
const CONFLICT: i64 = -1;

/// The daemon answers a good request on `rpc`.
fn still_serving(rpc: &mut JsonRpc) {
    let v = rpc.ok("query-version", Value::Null);
    assert_eq!(v["qemu"]["major"], 10, "{v}");
}

/// Sends `raw` and returns the single reply's error code.
fn raw_error(rpc: &mut JsonRpc, raw: &str) -> (i64, Value) {
    rpc.send(raw.as_bytes());
    rpc.send(b"\n");
    let v = rpc.recv();
    let code = v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("{raw:?}: no error code in {v}"));
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    (code, v)
}

#[test]
fn malformed_json_rpc_messages_get_the_standard_codes() {
    let daemon = Daemon::start(&[]);
    let mut rpc = daemon.rpc();
    let cases: &[(&str, i64)] = &[
        (
            r#"{"jsonrpc": "2.0", "method": "query-version", "id": 1,,}"#,
            PARSE,
        ),
        (r#"{"jsonrpc": "2.0" "method"}"#, PARSE),
        ("42", INVALID_REQUEST),
        (r#""query-version""#, INVALID_REQUEST),
        ("[]", INVALID_REQUEST),
        (
            r#"{"jsonrpc": "1.0", "method": "query-version", "id": 1}"#,
            INVALID_REQUEST,
        ),
        (r#"{"method": "query-version", "id": 1}"#, INVALID_REQUEST),
        (r#"{"jsonrpc": "2.0", "id": 1}"#, INVALID_REQUEST),
        (
            r#"{"jsonrpc": "2.0", "method": 7, "id": 1}"#,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "query-version", "id": {"a": 1}}"#,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "no-such-method", "id": 1}"#,
            NOT_FOUND_METHOD,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "query-version", "params": "x", "id": 1}"#,
            INVALID_PARAMS,
        ),
        (
            r#"{"jsonrpc": "2.0", "method": "blockdev-del", "params": [1, 2], "id": 1}"#,
            INVALID_PARAMS,
        ),
    ];
    for (raw, code) in cases {
        let (got, v) = raw_error(&mut rpc, raw);
        assert_eq!(got, *code, "{raw}: {v}");
        if *code == PARSE || *code == INVALID_REQUEST {
            assert!(
                v.get("id").is_some(),
                "{raw}: error replies carry an id: {v}"
            );
        }
        still_serving(&mut rpc);
    }
    // Binary garbage is a parse error too; the connection may be dropped after it, but
    // the daemon serves a new one.
    let mut g = UnixStream::connect(&daemon.rpc).unwrap();
    g.write_all(&[0xff, 0xfe, 0x00, 0x01, b'\n']).ok();
    drop(g);
    still_serving(&mut daemon.rpc());
}

#[test]
fn wrong_arguments_get_invalid_params_and_state_errors_their_own_codes() {
    let daemon = Daemon::start(&[]);
    let dir = TempDir::new("bad-args");
    let image = dir.path("img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut rpc = daemon.rpc();
    rpc.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
    );
    rpc.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": "m"}),
    );
    let cases: Vec<(&str, Value, i64, &str)> = vec![
        ("blockdev-del", json!({}), INVALID_PARAMS, "node-name"),
        ("blockdev-del", json!({"node-name": 5}), INVALID_PARAMS, ""),
        (
            "blockdev-del",
            json!({"node-name": "r", "force": true}),
            INVALID_PARAMS,
            "force",
        ),
        (
            "blockdev-add",
            json!({"driver": "nonesuch", "node-name": "x"}),
            INVALID_PARAMS,
            "nonesuch",
        ),
        (
            "blockdev-add",
            json!({"node-name": "x"}),
            INVALID_PARAMS,
            "driver",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "x", "bogus": 1}),
            INVALID_PARAMS,
            "bogus",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "x", "size": true}),
            INVALID_PARAMS,
            "size",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "#x"}),
            INVALID_PARAMS,
            "node-name",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "m"}),
            INVALID_PARAMS,
            "Duplicate",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "x"}),
            INVALID_PARAMS,
            "filename",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": "m", "offset": 1 << 20}),
            INVALID_PARAMS,
            "",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": 3}),
            INVALID_PARAMS,
            "file",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": "nope"}),
            NO_NODE,
            "nope",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "x", "filename": dir.path("missing").to_str().unwrap()}),
            NO_NODE,
            "missing",
        ),
        ("blockdev-add", Value::Null, INVALID_PARAMS, ""),
        (
            "blockdev-del",
            json!({"node-name": "nope"}),
            NO_NODE,
            "nope",
        ),
        ("blockdev-del", json!({"node-name": "m"}), BUSY, "in use"),
        (
            "query-named-block-nodes",
            json!({"flat": "maybe"}),
            INVALID_PARAMS,
            "flat",
        ),
        (
            "x-debug-block-user-add",
            json!({"id": "u", "node-name": "r", "perm": ["fly"], "shared-perm": []}),
            INVALID_PARAMS,
            "fly",
        ),
    ];
    for (method, params, code, part) in &cases {
        let err = rpc
            .call(method, params.clone())
            .expect_err(&format!("{method} {params}"));
        assert_eq!(err.0, *code, "{method} {params}: {err:?}");
        assert!(
            err.1.contains(part),
            "{method} {params}: {err:?} lacks {part:?}"
        );
        still_serving(&mut rpc);
    }
    // A permission conflict between two users of the raw node.
    let rw = json!(["consistent-read", "write"]);
    rpc.ok(
        "x-debug-block-user-add",
        json!({"id": "u1", "node-name": "r", "perm": rw, "shared-perm": ["consistent-read"]}),
    );
    let err = rpc
        .call(
            "x-debug-block-user-add",
            json!({"id": "u2", "node-name": "r", "perm": ["write"], "shared-perm": []}),
        )
        .unwrap_err();
    assert_eq!(err.0, CONFLICT, "{err:?}");
    assert!(
        err.1.starts_with("Permission conflict on node 'r'"),
        "{err:?}"
    );
    // Nothing the bad requests did changed the graph.
    let nodes = rpc.ok("query-named-block-nodes", json!({"flat": true}));
    let names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert_eq!(names.len(), 2, "{nodes}");
}

#[test]
fn batches_notifications_and_oversized_or_truncated_messages() {
    let daemon = Daemon::start(&[]);
    let mut rpc = daemon.rpc();
    // A batch: one reply per request with an id, errors in place.
    rpc.send(
        br#"[{"jsonrpc":"2.0","method":"query-version","id":"a"},{"jsonrpc":"2.0","method":"nope","id":"b"},{"jsonrpc":"2.0","method":"query-version"}]"#,
    );
    let v = rpc.recv();
    let replies = v
        .as_array()
        .unwrap_or_else(|| panic!("batch reply is an array: {v}"));
    assert_eq!(replies.len(), 2, "the notification gets no reply: {v}");
    let b = replies.iter().find(|r| r["id"] == "b").unwrap();
    assert_eq!(b["error"]["code"], NOT_FOUND_METHOD);
    // A batch over the limit (128) is refused whole, before anything runs.
    let big_batch: Vec<Value> = (0..129)
        .map(|i| json!({"jsonrpc": "2.0", "method": "query-schema", "id": i}))
        .collect();
    rpc.send(serde_json::to_string(&big_batch).unwrap().as_bytes());
    let v = rpc.recv();
    assert_eq!(v["error"]["code"], INVALID_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{v}"
    );
    // A notification alone gets no reply: the next reply is for the next request.
    rpc.send(br#"{"jsonrpc":"2.0","method":"query-version"}"#);
    still_serving(&mut rpc);

    // A message larger than the limit: an error (or a dropped connection), and the
    // daemon serves others.
    let mut big = UnixStream::connect(&daemon.rpc).unwrap();
    let filler = "x".repeat(1 << 20);
    let mut msg =
        String::from(r#"{"jsonrpc":"2.0","method":"query-version","id":1,"params":{"pad":""#);
    for _ in 0..20 {
        msg.push_str(&filler);
    }
    let _ = big.write_all(msg.as_bytes());
    drop(big);
    still_serving(&mut daemon.rpc());

    // Half a request, then the client goes away.
    let mut half = UnixStream::connect(&daemon.rpc).unwrap();
    half.write_all(br#"{"jsonrpc":"2.0","method":"blockdev-add","par"#)
        .unwrap();
    drop(half);
    // A complete command whose client disconnects before the reply still runs.
    let mut gone = UnixStream::connect(&daemon.rpc).unwrap();
    gone.write_all(
        br#"{"jsonrpc":"2.0","method":"blockdev-add","params":{"driver":"null-co","node-name":"late"},"id":1}"#,
    )
    .unwrap();
    drop(gone);
    let mut rpc = daemon.rpc();
    let mut found = false;
    for _ in 0..100 {
        let nodes = rpc.ok("query-named-block-nodes", Value::Null);
        if nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "late")
        {
            found = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(found, "the abandoned command completed");
}

/// QMP: reply `error.class` and a part of `error.desc`.
fn qmp_error(q: &mut Qmp, raw: &str) -> (String, String, Value) {
    q.send(raw.as_bytes());
    q.send(b"\n");
    let v = q.reply();
    let class = v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("{raw}: no error in {v}"))
        .to_string();
    let desc = v["error"]["desc"].as_str().unwrap_or_default().to_string();
    (class, desc, v)
}

fn qmp_serving(q: &mut Qmp) {
    let v = q.execute("query-version", Value::Null);
    assert_eq!(v["return"]["qemu"]["major"], 10, "{v}");
}

#[test]
fn malformed_qmp_input_gets_qemus_error_classes() {
    let daemon = Daemon::start(&[]);
    let mut q = daemon.qmp();
    assert!(
        q.greeting["QMP"]["version"]["qemu"]["major"].is_number(),
        "{}",
        q.greeting
    );
    let (class, desc, _) = qmp_error(&mut q, r#"{"execute": "query-version"}"#);
    assert_eq!(class, "CommandNotFound");
    assert!(
        desc.contains("Expecting capabilities negotiation"),
        "{desc}"
    );
    assert_eq!(
        q.execute("qmp_capabilities", Value::Null),
        json!({"return": {}})
    );
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"execute": "query-version",}"#, "GenericError", ""),
        ("[1, 2]", "GenericError", "JSON object"),
        (r#"{"arguments": {}}"#, "GenericError", "execute"),
        (
            r#"{"execute": "query-version", "bogus": 1}"#,
            "GenericError",
            "bogus",
        ),
        (r#"{"execute": 42}"#, "GenericError", "execute"),
        (
            r#"{"execute": "blockdev-del", "arguments": [1]}"#,
            "GenericError",
            "arguments",
        ),
        (
            r#"{"execute": "no-such-command"}"#,
            "CommandNotFound",
            "no-such-command",
        ),
        (
            r#"{"execute": "blockdev-del", "arguments": {"node-name": 1}}"#,
            "GenericError",
            "",
        ),
        (
            r#"{"execute": "blockdev-del", "arguments": {"node": "x"}}"#,
            "GenericError",
            "",
        ),
        (
            r#"{"execute": "blockdev-del", "arguments": {}}"#,
            "GenericError",
            "node-name",
        ),
        (
            r#"{"execute": "blockdev-add", "arguments": {"driver": "memory", "node-name": "m"}}"#,
            "GenericError",
            "size",
        ),
        (r#"{"execute": "qmp_capabilities"}"#, "CommandNotFound", ""),
    ];
    for (raw, class, part) in cases {
        let (got, desc, v) = qmp_error(&mut q, raw);
        assert_eq!(&got, class, "{raw}: {v}");
        assert!(desc.contains(part), "{raw}: {desc:?} lacks {part:?}");
        qmp_serving(&mut q);
    }
    // The id comes back verbatim, whatever its type, with errors too.
    q.send(br#"{"execute": "nope", "id": {"tag": [1, "two"]}}"#);
    q.send(b"\n");
    let v = q.reply();
    assert_eq!(v["id"], json!({"tag": [1, "two"]}), "{v}");
    // Garbage that is not JSON at all, on its own connection.
    let mut g = Qmp::negotiated(&daemon.qmp);
    g.send(b"\x00\xff garbage\n");
    drop(g);
    qmp_serving(&mut Qmp::negotiated(&daemon.qmp));
    qmp_serving(&mut q);
}
