//! The JSON-RPC 2.0 front end over the real Unix socket of a real stratad: framing, the
//! standard error codes, batches, notifications, hostile clients, events.

use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use strata_tests::{Daemon, JsonRpc, node_names};

fn serving(rpc: &mut JsonRpc) {
    let v = rpc.ok("query-version", Value::Null);
    assert_eq!(v["qemu"]["major"], 10, "{v}");
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error reply: {v}"))
}

#[test]
fn requests_back_to_back_without_newlines_are_each_answered_in_order() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    // SPDK's framing: a stream of JSON values, split across writes anywhere.
    let stream = concat!(
        r#"{"jsonrpc":"2.0","method":"query-version","id":1}"#,
        r#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":"two"}"#,
        r#"  {"jsonrpc":"2.0","method":"query-version","id":3}"#
    );
    let (a, b) = stream.as_bytes().split_at(61);
    rpc.send(a);
    std::thread::sleep(Duration::from_millis(50));
    rpc.send(b);
    let ids: Vec<Value> = (0..3).map(|_| rpc.recv()["id"].clone()).collect();
    assert_eq!(ids, vec![json!(1), json!("two"), json!(3)]);
}

#[test]
fn a_parse_error_is_answered_with_a_null_id_and_the_connection_goes_on() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    for raw in [
        r#"{"jsonrpc": "2.0", "method": "query-version", "id": 1,,}"#,
        r#"{"jsonrpc": "2.0" "method"}"#,
        "nonsense",
        "]",
    ] {
        rpc.send(format!("{raw}\n").as_bytes());
        let v = rpc.recv();
        assert_eq!(error_code(&v), -32700, "{raw}: {v}");
        assert_eq!(v.get("id"), Some(&Value::Null), "{raw}: {v}");
        assert_eq!(v["jsonrpc"], "2.0");
        serving(&mut rpc);
    }
}

#[test]
fn invalid_requests_get_32600() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    for raw in [
        "42",
        r#""query-version""#,
        "true",
        "[]",
        r#"{"jsonrpc": "1.0", "method": "query-version", "id": 1}"#,
        r#"{"method": "query-version", "id": 1}"#,
        r#"{"jsonrpc": "2.0", "id": 1}"#,
        r#"{"jsonrpc": "2.0", "method": ["x"], "id": 1}"#,
        r#"{"jsonrpc": "2.0", "method": "query-version", "id": [1]}"#,
    ] {
        rpc.send(format!("{raw}\n").as_bytes());
        let v = rpc.recv();
        assert_eq!(error_code(&v), -32600, "{raw}: {v}");
        serving(&mut rpc);
    }
}

#[test]
fn params_must_be_an_object_absent_or_an_empty_array() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    for params in [json!("x"), json!(7), json!(null), json!([1])] {
        let raw = json!({"jsonrpc": "2.0", "method": "query-version", "params": params, "id": 9});
        rpc.send(format!("{raw}\n").as_bytes());
        let v = rpc.recv();
        assert_eq!(error_code(&v), -32602, "{raw}: {v}");
        assert_eq!(v["id"], 9);
    }
    let raw = json!({"jsonrpc": "2.0", "method": "query-version", "params": [], "id": 10});
    rpc.send(format!("{raw}\n").as_bytes());
    assert_eq!(rpc.recv()["result"]["qemu"]["major"], 10);
    assert_eq!(
        error_code(&rpc.call_raw("no-such-method", Value::Null)),
        -32601
    );
}

#[test]
fn a_batch_gets_one_array_and_notifications_get_nothing() {
    let d = Daemon::start(&[]);
    let mut rpc = d.rpc();
    rpc.send(
        br#"[{"jsonrpc":"2.0","method":"query-version","id":"a"},
             {"jsonrpc":"2.0","method":"blockdev-add","params":{"driver":"null-co","node-name":"n1"}},
             {"jsonrpc":"2.0","method":"nope","id":"b"},
             17]
        "#,
    );
    let v = rpc.recv();
    let replies = v.as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(replies.len(), 3, "{v}");
    assert_eq!(replies[0]["id"], "a");
    assert_eq!(error_code(&replies[1]), -32601);
    assert_eq!(error_code(&replies[2]), -32600);
    // A notification alone: it runs, and the next thing read is the next reply.
    rpc.send(br#"{"jsonrpc":"2.0","method":"blockdev-add","params":{"driver":"null-co","node-name":"n2"}}"#);
    assert_eq!(node_names(&mut rpc), ["n1", "n2"]);
    // A batch of notifications only: no reply at all.
    rpc.send(br#"[{"jsonrpc":"2.0","method":"query-version"}]"#);
    serving(&mut rpc);
    // An empty batch is an invalid request.
    rpc.send(b"[]\n");
    assert_eq!(error_code(&rpc.recv()), -32600);
}

#[test]
fn a_message_over_16_mib_gets_32600_and_is_closed_while_others_are_served() {
    let d = Daemon::start(&[]);
    let mut big = d.rpc();
    let writer_stream = big.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = writer_stream;
        let _ =
            s.write_all(br#"{"jsonrpc":"2.0","method":"query-version","id":1,"params":{"pad":""#);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            if s.write_all(&chunk).is_err() {
                return; // closed by the daemon: expected
            }
        }
    });
    let v = big.recv();
    assert_eq!(error_code(&v), -32600, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message too large"),
        "{v}"
    );
    assert!(
        big.closed(),
        "the connection is closed after a too large message"
    );
    writer.join().unwrap();
    serving(&mut d.rpc());
}

#[test]
fn half_a_message_then_a_disconnect_leaves_the_daemon_serving() {
    let d = Daemon::start(&[]);
    let mut half = UnixStream::connect(&d.rpc).unwrap();
    half.write_all(br#"{"jsonrpc":"2.0","method":"blockdev-add","params":{"dri"#)
        .unwrap();
    drop(half);
    let mut rpc = d.rpc();
    serving(&mut rpc);
    assert!(node_names(&mut rpc).is_empty());
}

#[test]
fn garbage_on_one_connection_does_not_disturb_a_new_one() {
    let d = Daemon::start(&[]);
    let mut g = UnixStream::connect(&d.rpc).unwrap();
    g.write_all(&[0xff, 0xfe, 0x00, b'{', b'{', b'[', 0x01, b'\n'])
        .unwrap();
    drop(g);
    serving(&mut d.rpc());
}

#[test]
fn a_command_whose_client_disconnected_still_completes() {
    let d = Daemon::start(&[]);
    let mut gone = UnixStream::connect(&d.rpc).unwrap();
    gone.write_all(
        br#"{"jsonrpc":"2.0","method":"blockdev-add","params":{"driver":"null-co","node-name":"late"},"id":1}"#,
    )
    .unwrap();
    drop(gone);
    let mut rpc = d.rpc();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_names(&mut rpc) != ["late"] {
        assert!(Instant::now() < deadline, "the abandoned command never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn events_go_only_to_subscribed_clients_as_notifications() {
    let d = Daemon::start(&[]);
    let mut sub = d.rpc();
    assert_eq!(sub.ok("subscribe_events", Value::Null), json!({}));
    let mut other = d.rpc();
    other.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "e0"}),
    );
    let ev = sub.recv();
    assert_eq!(ev["jsonrpc"], "2.0");
    assert_eq!(ev["method"], "event");
    assert!(ev.get("id").is_none(), "a notification has no id: {ev}");
    assert_eq!(ev["params"]["event"], "BLOCK_NODE_ADDED");
    assert_eq!(ev["params"]["data"]["node-name"], "e0");
    assert!(ev["params"]["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(ev["params"]["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    // The client that did not subscribe got only its reply: its next message is the
    // reply to its next request.
    let v = other.call_raw("query-version", Value::Null);
    assert!(v.get("result").is_some(), "{v}");
}

#[test]
fn many_clients_at_once_each_get_their_own_replies() {
    let d = Daemon::start(&[]);
    let path = d.rpc.clone();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = JsonRpc::connect(&path);
                for i in 0..20 {
                    let name = format!("c{t}-{i}");
                    c.ok(
                        "blockdev-add",
                        json!({"driver": "null-co", "node-name": name}),
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(node_names(&mut d.rpc()).len(), 16 * 20);
}

#[test]
fn tcp_is_off_by_default_and_loopback_when_asked() {
    let d = Daemon::start(&[]);
    assert!(!d.banner.contains("tcp:"), "{}", d.banner);
    let d = Daemon::start(&["--rpc-tcp", "0"]);
    let addr = d
        .banner
        .split("JSON-RPC tcp:")
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("no TCP address in {:?}", d.banner))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(br#"{"jsonrpc":"2.0","method":"query-version","id":1}"#)
        .unwrap();
    let v: Value = serde_json::Deserializer::from_reader(&mut tcp)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(v["result"]["qemu"]["major"], 10, "{v}");
}
