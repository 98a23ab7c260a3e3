//! The QMP front end: QEMU's monitor protocol, so QEMU tooling (the `qemu.qmp` library,
//! libvirt-style clients, iotests helpers) drives Strata unchanged.
//!
//! ```text
//!   connect            <- {"QMP": {"version": {...}, "capabilities": ["oob"]}}
//!   qmp_capabilities   -> {"return": {}}          (anything else before: CommandNotFound)
//!   {"execute", "arguments"?, "id"?}  -> {"return": R, "id"?} | {"error": {class, desc}, "id"?}
//!   events (after negotiation)        <- {"event", "data", "timestamp": {seconds, microseconds}}
//! ```
//!
//! Error texts follow QEMU 10.0 (qapi/qmp-dispatch.c, monitor/qmp.c,
//! monitor/qmp-cmds-control.c, qobject/json-parser.c) because clients match on them:
//! "QMP input must be a JSON object", "QMP input member 'x' is unexpected",
//! "QMP input lacks member 'execute'", "JSON parse error, ...". Like QEMU, a parse error
//! is answered and the connection goes on with the next value.

use super::connection::{Flow, MAX_MESSAGE, Protocol, Session};
use super::framing::Frame;
use crate::error::CommandError;
use crate::events::Event;
use crate::registry::introspect::QEMU_VERSION;
use serde_json::{Map, Value, json};

const GENERIC: &str = "GenericError";
const NOT_FOUND: &str = "CommandNotFound";

/// The greeting every QMP client reads first.
pub fn greeting() -> Value {
    json!({
        "QMP": {
            "version": {
                "qemu": {
                    "micro": QEMU_VERSION.micro,
                    "minor": QEMU_VERSION.minor,
                    "major": QEMU_VERSION.major,
                },
                "package": format!("strata {}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": ["oob"],
        }
    })
}

/// A QMP event's JSON.
pub fn event_message(e: &Event) -> Value {
    json!({
        "event": e.name,
        "data": e.data,
        "timestamp": {"seconds": e.seconds, "microseconds": e.microseconds},
    })
}

fn error(class: &str, desc: impl Into<String>, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": class, "desc": desc.into()}));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn ok(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// One QMP connection's state.
#[derive(Debug, Default)]
pub(crate) struct Qmp {
    negotiated: bool,
    oob: bool,
}

impl Protocol for Qmp {
    fn greeting(&mut self, s: &mut Session) {
        s.send(&greeting());
    }

    fn frame(&mut self, frame: Frame, s: &mut Session) -> Flow {
        let bytes = match frame {
            Frame::Value(bytes) => bytes,
            Frame::TooLarge => {
                // QEMU's streamer limit message; the rest of the value is skipped.
                s.send(&error(
                    GENERIC,
                    format!("JSON token size limit exceeded (the limit is {MAX_MESSAGE} bytes)"),
                    None,
                ));
                return Flow::Continue;
            }
        };
        let value = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => v,
            Err(e) => {
                s.send(&error(GENERIC, parse_error_text(&bytes, &e), None));
                return Flow::Continue;
            }
        };
        let reply = self.execute(value, s);
        s.send(&reply);
        Flow::Continue
    }
}

impl Qmp {
    fn execute(&mut self, request: Value, s: &mut Session) -> Value {
        let Value::Object(mut req) = request else {
            return error(GENERIC, "QMP input must be a JSON object", None);
        };
        let id = req.remove("id");
        let (command, oob) = match check_request(&req, self.oob) {
            Ok(c) => c,
            Err(desc) => return error(GENERIC, desc, id),
        };
        let args = match req.remove("arguments") {
            Some(a) => a,
            None => Value::Null,
        };
        if !self.negotiated {
            if command != "qmp_capabilities" {
                return error(
                    NOT_FOUND,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                    id,
                );
            }
            return match capabilities(&args) {
                Ok(oob) => {
                    self.negotiated = true;
                    self.oob = oob;
                    s.subscribe_events(event_message);
                    ok(json!({}), id)
                }
                Err(desc) => error(GENERIC, desc, id),
            };
        }
        if command == "qmp_capabilities" {
            return error(
                NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored",
                id,
            );
        }
        if oob {
            // No Strata command runs out of band; QEMU says so after the lookup.
            return match exists(s, &command) {
                Ok(true) => error(
                    GENERIC,
                    format!("The command {command} does not support OOB"),
                    id,
                ),
                Ok(false) => error(
                    NOT_FOUND,
                    format!("The command {command} has not been found"),
                    id,
                ),
                Err(e) => reply(Err(e), id),
            };
        }
        reply(s.admin.call(&command, args), id)
    }
}

/// Whether the registry knows `command` (from `query-commands`).
fn exists(s: &Session, command: &str) -> Result<bool, CommandError> {
    let list = s.admin.call("query-commands", Value::Null)?;
    Ok(list
        .as_array()
        .is_some_and(|l| l.iter().any(|c| c["name"] == command)))
}

fn reply(result: Result<Value, CommandError>, id: Option<Value>) -> Value {
    match result {
        Ok(v) => ok(v, id),
        Err(e) => error(e.code.qmp_class(), e.message, id),
    }
}

/// QEMU's `qmp_dispatch_check_obj`: returns the command name and whether it came as
/// `exec-oob`.
fn check_request(req: &Map<String, Value>, allow_oob: bool) -> Result<(String, bool), String> {
    let mut exec: Option<(&str, &str)> = None;
    for (key, value) in req {
        match key.as_str() {
            k @ ("execute" | "exec-oob") if k == "execute" || allow_oob => {
                let Value::String(name) = value else {
                    return Err(format!("QMP input member '{k}' must be a string"));
                };
                if let Some((other, _)) = exec {
                    return Err(format!("QMP input member '{k}' clashes with '{other}'"));
                }
                exec = Some((k, name));
            }
            "arguments" => {
                if !value.is_object() {
                    return Err("QMP input member 'arguments' must be an object".to_string());
                }
            }
            other => return Err(format!("QMP input member '{other}' is unexpected")),
        }
    }
    match exec {
        Some((key, name)) => Ok((name.to_string(), key == "exec-oob")),
        None => Err("QMP input lacks member 'execute'".to_string()),
    }
}

/// `qmp_capabilities` arguments: `enable` may list `oob`, the one capability offered.
/// Returns whether OOB is enabled.
fn capabilities(args: &Value) -> Result<bool, String> {
    let Value::Object(args) = args else {
        return Ok(false);
    };
    let mut oob = false;
    for (key, value) in args {
        if key != "enable" {
            return Err(format!("Parameter '{key}' is unexpected"));
        }
        let Value::Array(caps) = value else {
            return Err("Invalid parameter type for 'enable', expected: array".to_string());
        };
        for (i, cap) in caps.iter().enumerate() {
            match cap.as_str() {
                Some("oob") => oob = true,
                Some(other) => {
                    return Err(format!(
                        "Parameter 'enable[{i}]' does not accept value '{other}'"
                    ));
                }
                None => {
                    return Err(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    ));
                }
            }
        }
    }
    Ok(oob)
}

/// "JSON parse error, ..." in QEMU's words where serde's error has a QEMU twin.
fn parse_error_text(bytes: &[u8], e: &serde_json::Error) -> String {
    let text = e.to_string();
    let msg = text.split(" at line ").next().unwrap_or(&text);
    let first = bytes.first().copied().unwrap_or(b' ');
    let detail = if first.is_ascii_alphabetic() && bytes.iter().all(u8::is_ascii_alphanumeric) {
        // A bare word: QEMU's lexer makes it a keyword token.
        format!("invalid keyword '{}'", String::from_utf8_lossy(bytes))
    } else if !first.is_ascii_graphic() {
        format!(
            "stray '{}'",
            String::from_utf8_lossy(&bytes[..1]).escape_default()
        )
    } else if msg.starts_with("EOF while parsing") {
        "premature EOI".to_string()
    } else if msg == "expected value" || msg == "trailing comma" {
        "expecting value".to_string()
    } else if msg == "key must be a string" {
        "key is not a string in object".to_string()
    } else if msg == "expected `:`" {
        "missing : in object pair".to_string()
    } else if msg == "expected `,` or `}`" {
        "expected separator in dict".to_string()
    } else if msg == "expected `,` or `]`" {
        "expected separator in list".to_string()
    } else {
        msg.to_string()
    };
    format!("JSON parse error, {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admin::Admin;
    use crate::server::admin::tests::fake_admin;
    use crate::server::connection::Outgoing;
    use std::sync::mpsc::{Receiver, sync_channel};

    struct Harness {
        proto: Qmp,
        session: Session,
        rx: Receiver<Outgoing>,
        _admin: Admin,
    }

    impl Harness {
        fn new() -> Harness {
            let (admin, _) = fake_admin();
            let (tx, rx) = sync_channel(64);
            let mut h = Harness {
                proto: Qmp::default(),
                session: Session::new(admin.handle(), tx, false),
                rx,
                _admin: admin,
            };
            h.proto.greeting(&mut h.session);
            h
        }

        fn negotiated() -> Harness {
            let mut h = Harness::new();
            h.recv();
            assert_eq!(
                h.send(r#"{"execute":"qmp_capabilities"}"#),
                json!({"return": {}})
            );
            h
        }

        fn recv(&mut self) -> Value {
            let line = self.rx.try_recv().expect("a message");
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            serde_json::from_slice(&line).unwrap()
        }

        fn send(&mut self, raw: &str) -> Value {
            let flow = self
                .proto
                .frame(Frame::Value(raw.as_bytes().to_vec()), &mut self.session);
            assert_eq!(flow, Flow::Continue);
            let v = self.recv();
            assert!(self.rx.try_recv().is_err(), "one reply per request");
            v
        }
    }

    fn err(v: &Value) -> (&str, &str) {
        (
            v["error"]["class"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}")),
            v["error"]["desc"].as_str().unwrap(),
        )
    }

    #[test]
    fn the_greeting_names_qemu_10_and_strata_and_offers_oob() {
        let mut h = Harness::new();
        let g = h.recv();
        assert_eq!(
            g["QMP"]["version"]["qemu"],
            json!({"major":10,"minor":0,"micro":0})
        );
        assert_eq!(
            g["QMP"]["version"]["package"],
            format!("strata {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    }

    #[test]
    fn commands_before_negotiation_are_not_found_and_negotiation_happens_once() {
        let mut h = Harness::new();
        h.recv();
        for cmd in ["echo", "no-such-command", "quit"] {
            let v = h.send(&format!(r#"{{"execute":"{cmd}","id":1}}"#));
            assert_eq!(
                err(&v),
                (
                    NOT_FOUND,
                    "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            );
            assert_eq!(v["id"], 1);
        }
        assert!(
            h.session.subscribe.is_none(),
            "no events before negotiation"
        );
        let v =
            h.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"c1"}"#);
        assert_eq!(v, json!({"return": {}, "id": "c1"}));
        assert!(
            h.session.subscribe.take().is_some(),
            "events after negotiation"
        );
        let v = h.send(r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            err(&v),
            (
                NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored"
            )
        );
        assert_eq!(
            h.send(r#"{"execute":"echo","arguments":{"a":1}}"#),
            json!({"return": {"a": 1}})
        );
    }

    #[test]
    fn bad_capabilities_are_rejected_and_negotiation_can_be_retried() {
        let mut h = Harness::new();
        h.recv();
        let v = h.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["fly"]}}"#);
        assert_eq!(
            err(&v),
            (GENERIC, "Parameter 'enable[0]' does not accept value 'fly'")
        );
        let v = h.send(r#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#);
        assert_eq!(err(&v), (GENERIC, "Parameter 'x' is unexpected"));
        assert_eq!(
            h.send(r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
    }

    #[test]
    fn malformed_input_gets_qemus_texts_and_the_id_back() {
        let mut h = Harness::negotiated();
        let cases = [
            ("[1, 2]", "QMP input must be a JSON object", None),
            ("42", "QMP input must be a JSON object", None),
            (
                r#"{"arguments": {}, "id": 3}"#,
                "QMP input lacks member 'execute'",
                Some(json!(3)),
            ),
            (
                r#"{"execute": "echo", "bogus": 1}"#,
                "QMP input member 'bogus' is unexpected",
                None,
            ),
            (
                r#"{"execute": 42}"#,
                "QMP input member 'execute' must be a string",
                None,
            ),
            (
                r#"{"execute": "echo", "arguments": [1], "id": {"t": [1]}}"#,
                "QMP input member 'arguments' must be an object",
                Some(json!({"t": [1]})),
            ),
            (
                r#"{"exec-oob": "echo"}"#,
                "QMP input member 'exec-oob' is unexpected",
                None,
            ),
        ];
        for (raw, desc, id) in cases {
            let v = h.send(raw);
            assert_eq!(err(&v), (GENERIC, desc), "{raw}");
            assert_eq!(v.get("id"), id.as_ref(), "{raw}: {v}");
        }
    }

    #[test]
    fn parse_errors_are_generic_errors_in_qemus_words_without_id() {
        let mut h = Harness::negotiated();
        for (raw, desc) in [
            (
                r#"{"execute": "echo",}"#,
                "JSON parse error, expecting value",
            ),
            ("garbage", "JSON parse error, invalid keyword 'garbage'"),
            ("\u{0}\u{ff}", "JSON parse error, stray '\\u{0}'"),
            (
                r#"{"execute" "echo"}"#,
                "JSON parse error, missing : in object pair",
            ),
            (
                r#"{1: 2}"#,
                "JSON parse error, key is not a string in object",
            ),
            (r#"[1 2]"#, "JSON parse error, expected separator in list"),
        ] {
            let v = h.send(raw);
            assert_eq!(err(&v), (GENERIC, desc), "{raw}: {v}");
            assert!(v.get("id").is_none());
        }
        assert_eq!(h.send(r#"{"execute":"echo"}"#), json!({"return": null}));
    }

    #[test]
    fn command_errors_map_to_classes_and_ids_come_back_verbatim() {
        let mut h = Harness::negotiated();
        let v = h.send(r#"{"execute":"fail","id":[1,"two"]}"#);
        assert_eq!(err(&v), (GENERIC, "Parameter 'x' is missing"));
        assert_eq!(v["id"], json!([1, "two"]));
        let v = h.send(r#"{"execute":"nope"}"#);
        assert_eq!(err(&v), (NOT_FOUND, "The command nope has not been found"));
    }

    #[test]
    fn exec_oob_is_refused_for_every_command_once_oob_is_on() {
        let mut h = Harness::new();
        h.recv();
        h.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#);
        let v = h.send(r#"{"exec-oob":"echo","id":1}"#);
        assert_eq!(err(&v), (GENERIC, "The command echo does not support OOB"));
        let v = h.send(r#"{"exec-oob":"nope"}"#);
        assert_eq!(err(&v).0, NOT_FOUND);
        let v = h.send(r#"{"exec-oob":"echo","execute":"echo"}"#);
        assert_eq!(err(&v).0, GENERIC);
    }

    #[test]
    fn a_too_large_message_is_an_error_and_the_connection_goes_on() {
        let mut h = Harness::negotiated();
        assert_eq!(
            h.proto.frame(Frame::TooLarge, &mut h.session),
            Flow::Continue
        );
        let v = h.recv();
        assert!(
            err(&v).1.starts_with("JSON token size limit exceeded"),
            "{v}"
        );
    }

    #[test]
    fn events_have_qemus_shape() {
        let e = Event {
            name: "BLOCK_NODE_REMOVED".into(),
            data: json!({"node-name": "n"}),
            seconds: 1,
            microseconds: 2,
        };
        assert_eq!(
            event_message(&e),
            json!({"event":"BLOCK_NODE_REMOVED","data":{"node-name":"n"},
                   "timestamp":{"seconds":1,"microseconds":2}})
        );
    }
}
