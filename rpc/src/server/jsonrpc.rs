//! The JSON-RPC 2.0 front end (SPDK's transport: a stream of JSON values over a Unix
//! socket, no framing needed; one response per line out).
//!
//! | input                                           | answer                          |
//! |-------------------------------------------------|---------------------------------|
//! | not JSON                                        | -32700, id null; stream resyncs |
//! | not an object, bad `jsonrpc`, bad `method`/`id` | -32600 (id echoed when usable)  |
//! | `params` not an object, array or absent; `[x]`  | -32602                          |
//! | unknown method                                  | -32601 (from the registry)      |
//! | no `id` (a notification)                        | runs, never answered            |
//! | `[...]` batch                                   | array of the answers, or none   |
//! | `[]`                                            | -32600                          |
//! | over [`MAX_MESSAGE`] bytes                      | -32600, connection closed       |
//!
//! `subscribe_events` is answered here, not by the registry: it turns on notifications
//! `{"jsonrpc":"2.0","method":"event","params":{"event","data","timestamp"}}` for the
//! connection.

use super::connection::{Flow, MAX_MESSAGE, Protocol, Session};
use super::framing::Frame;
use crate::error::{CommandError, ErrorCode};
use crate::events::Event;
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The method that turns on event notifications for a connection.
pub const SUBSCRIBE_EVENTS: &str = "subscribe_events";

/// A JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
}

/// A JSON-RPC response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Response {
    pub jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
    /// `null` when the request's id could not be determined.
    pub id: Value,
}

impl Response {
    fn ok(id: Value, result: Value) -> Response {
        Response {
            jsonrpc: "2.0",
            result: Some(result),
            error: None,
            id,
        }
    }

    fn err(id: Value, code: i64, message: impl Into<String>) -> Response {
        Response {
            jsonrpc: "2.0",
            result: None,
            error: Some(ErrorObject {
                code,
                message: message.into(),
            }),
            id,
        }
    }

    fn from_error(id: Value, e: CommandError) -> Response {
        Response::err(id, e.code.jsonrpc_code(), e.message)
    }
}

fn invalid_request(id: Value, why: &str) -> Response {
    Response::err(
        id,
        ErrorCode::InvalidRequest.jsonrpc_code(),
        format!("Invalid request: {why}"),
    )
}

/// A JSON-RPC event notification's JSON.
pub fn event_notification(e: &Event) -> Value {
    json!({
        "jsonrpc": "2.0",
        "method": "event",
        "params": {
            "event": e.name,
            "data": e.data,
            "timestamp": {"seconds": e.seconds, "microseconds": e.microseconds},
        },
    })
}

/// One connection's JSON-RPC state.
#[derive(Debug, Default)]
pub(crate) struct JsonRpc;

impl Protocol for JsonRpc {
    fn frame(&mut self, frame: Frame, s: &mut Session) -> Flow {
        let bytes = match frame {
            Frame::Value(bytes) => bytes,
            Frame::TooLarge => {
                s.send(&Response::err(
                    Value::Null,
                    ErrorCode::InvalidRequest.jsonrpc_code(),
                    format!("message too large: the limit is {MAX_MESSAGE} bytes"),
                ));
                return Flow::Close;
            }
        };
        // The splitter found one value's extent; serde reads it (and must find nothing
        // after it: `{} x` inside one frame cannot happen, but stay strict).
        let mut stream = serde_json::Deserializer::from_slice(&bytes).into_iter::<Value>();
        let value = match stream.next() {
            Some(Ok(v)) if stream.next().is_none() => v,
            Some(Err(e)) => {
                s.send(&parse_error(&e.to_string()));
                return Flow::Continue;
            }
            _ => {
                s.send(&parse_error("trailing characters after a JSON value"));
                return Flow::Continue;
            }
        };
        if let Some(reply) = handle_message(value, s) {
            s.send(&reply);
        }
        Flow::Continue
    }
}

fn parse_error(detail: &str) -> Response {
    Response::err(
        Value::Null,
        ErrorCode::ParseError.jsonrpc_code(),
        format!("Parse error: {detail}"),
    )
}

/// The most requests one batch may hold. A batch's replies are built in memory before
/// any is sent, so an unbounded batch (hundreds of thousands of calls fit in a 16 MiB
/// message) could exhaust memory and hold the admin thread for everyone.
pub const MAX_BATCH: usize = 128;

/// Answers a parsed message (a request or a batch); `None` when nothing is to be sent.
pub(crate) fn handle_message(message: Value, s: &mut Session) -> Option<Value> {
    match message {
        Value::Array(batch) if batch.is_empty() => to_value(invalid_request(
            Value::Null,
            "an empty batch is not a request",
        )),
        Value::Array(batch) if batch.len() > MAX_BATCH => to_value(invalid_request(
            Value::Null,
            &format!(
                "a batch of {} requests is too large (at most {MAX_BATCH})",
                batch.len()
            ),
        )),
        Value::Array(batch) => {
            let replies: Vec<Value> = batch
                .into_iter()
                .filter_map(|request| handle_request(request, s))
                .filter_map(to_value)
                .collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        request => handle_request(request, s).and_then(to_value),
    }
}

fn to_value(r: Response) -> Option<Value> {
    Some(serde_json::to_value(r).expect("BUG: a response always serializes"))
}

/// One request of a batch or alone; `None` for a notification.
fn handle_request(request: Value, s: &mut Session) -> Option<Response> {
    let Value::Object(mut req) = request else {
        return Some(invalid_request(
            Value::Null,
            "a request must be a JSON object",
        ));
    };
    let id = req.remove("id");
    let reply_id = match &id {
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => v.clone(),
        Some(_) => {
            return Some(invalid_request(
                Value::Null,
                "'id' must be a string, a number or null",
            ));
        }
        None => Value::Null,
    };
    if req.get("jsonrpc") != Some(&Value::String("2.0".to_string())) {
        return Some(invalid_request(reply_id, "'jsonrpc' must be \"2.0\""));
    }
    let method = match req.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return Some(invalid_request(reply_id, "'method' must be a string")),
        None => return Some(invalid_request(reply_id, "'method' is missing")),
    };
    if let Some(key) = req.keys().find(|k| *k != "jsonrpc" && *k != "params") {
        return Some(invalid_request(
            reply_id,
            &format!("unexpected member '{key}'"),
        ));
    }
    let notification = id.is_none();
    let result = params(req.remove("params")).and_then(|params| call(&method, params, s));
    if notification {
        return None;
    }
    Some(match result {
        Ok(v) => Response::ok(reply_id, v),
        Err(e) => Response::from_error(reply_id, e),
    })
}

/// The registry's params: an object, or `null` for none (absent or `[]`).
fn params(p: Option<Value>) -> Result<Value, CommandError> {
    match p {
        None => Ok(Value::Null),
        Some(Value::Object(m)) => Ok(Value::Object(m)),
        Some(Value::Array(a)) if a.is_empty() => Ok(Value::Null),
        Some(Value::Array(_)) => Err(CommandError::invalid_params(
            "positional params are not supported: pass an object of named params",
        )),
        Some(other) => Err(CommandError::invalid_params(format!(
            "'params' must be an object or an array, not {}",
            crate::registry::command::kind_of(&other)
        ))),
    }
}

fn call(method: &str, params: Value, s: &mut Session) -> Result<Value, CommandError> {
    if method == SUBSCRIBE_EVENTS {
        if !params.is_null() && params != Value::Object(Map::new()) {
            return Err(CommandError::invalid_params(format!(
                "{SUBSCRIBE_EVENTS} takes no params"
            )));
        }
        s.subscribe_events(event_notification);
        return Ok(json!({}));
    }
    s.admin.call(method, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admin::tests::fake_admin;
    use crate::server::connection::Outgoing;
    use std::sync::mpsc::{Receiver, sync_channel};

    struct Harness {
        proto: JsonRpc,
        session: Session,
        rx: Receiver<Outgoing>,
        _admin: crate::server::admin::Admin,
    }

    impl Harness {
        fn new() -> Harness {
            let (admin, _) = fake_admin();
            let (tx, rx) = sync_channel(64);
            Harness {
                proto: JsonRpc,
                session: Session::new(admin.handle(), tx, false),
                rx,
                _admin: admin,
            }
        }

        /// Sends raw bytes as one frame; returns every reply.
        fn send(&mut self, raw: &str) -> (Flow, Vec<Value>) {
            let flow = self
                .proto
                .frame(Frame::Value(raw.as_bytes().to_vec()), &mut self.session);
            let replies = self
                .rx
                .try_iter()
                .map(|m| serde_json::from_slice(&m).unwrap())
                .collect();
            (flow, replies)
        }

        fn one(&mut self, raw: &str) -> Value {
            let (flow, mut r) = self.send(raw);
            assert_eq!(flow, Flow::Continue);
            assert_eq!(r.len(), 1, "{raw}: {r:?}");
            r.pop().unwrap()
        }
    }

    fn code(v: &Value) -> i64 {
        v["error"]["code"].as_i64().unwrap_or_else(|| panic!("{v}"))
    }

    #[test]
    fn a_request_gets_its_result_with_its_id() {
        let mut h = Harness::new();
        let v = h.one(r#"{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":"x"}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","result":{"a":1},"id":"x"}));
        let v = h.one(r#"{"jsonrpc":"2.0","method":"echo","id":7}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","result":null,"id":7}));
        let v = h.one(r#"{"jsonrpc":"2.0","method":"echo","params":[],"id":null}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","result":null,"id":null}));
    }

    #[test]
    fn command_errors_carry_the_error_table_code() {
        let mut h = Harness::new();
        let v = h.one(r#"{"jsonrpc":"2.0","method":"fail","id":1}"#);
        assert_eq!(code(&v), -32602);
        assert_eq!(v["error"]["message"], "Parameter 'x' is missing");
        assert_eq!(v["id"], 1);
        let v = h.one(r#"{"jsonrpc":"2.0","method":"nope","id":2}"#);
        assert_eq!(code(&v), -32601);
    }

    #[test]
    fn parse_errors_answer_with_a_null_id_and_the_connection_goes_on() {
        let mut h = Harness::new();
        for raw in [r#"{"jsonrpc":"2.0","id":1,,}"#, "garbage", "\u{1}", "]"] {
            let v = h.one(raw);
            assert_eq!(code(&v), -32700, "{raw}: {v}");
            assert_eq!(v.get("id"), Some(&Value::Null), "{v}");
        }
        let v = h.one(r#"{"jsonrpc":"2.0","method":"echo","params":{},"id":3}"#);
        assert_eq!(v["result"], json!({}));
    }

    #[test]
    fn invalid_requests_get_32600() {
        let mut h = Harness::new();
        for (raw, id) in [
            ("42", Value::Null),
            (r#""echo""#, Value::Null),
            ("[]", Value::Null),
            (r#"{"jsonrpc":"1.0","method":"echo","id":1}"#, json!(1)),
            (r#"{"method":"echo","id":1}"#, json!(1)),
            (r#"{"jsonrpc":"2.0","id":1}"#, json!(1)),
            (r#"{"jsonrpc":"2.0","method":7,"id":"s"}"#, json!("s")),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":{"a":1}}"#,
                Value::Null,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":true}"#,
                Value::Null,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","x":1,"id":1}"#,
                json!(1),
            ),
            // Invalid requests are answered even without an id: they are no notification.
            (r#"{"jsonrpc":"2.0","method":1}"#, Value::Null),
        ] {
            let v = h.one(raw);
            assert_eq!(code(&v), -32600, "{raw}: {v}");
            assert_eq!(v["id"], id, "{raw}: {v}");
            assert_eq!(v["jsonrpc"], "2.0");
        }
    }

    #[test]
    fn params_must_be_an_object_or_an_empty_array() {
        let mut h = Harness::new();
        for raw in [
            r#"{"jsonrpc":"2.0","method":"echo","params":"x","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"echo","params":3,"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"echo","params":null,"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"echo","params":[1,2],"id":1}"#,
        ] {
            let v = h.one(raw);
            assert_eq!(code(&v), -32602, "{raw}: {v}");
            assert_eq!(v["id"], 1);
        }
    }

    #[test]
    fn notifications_run_but_are_never_answered() {
        let (admin, log) = fake_admin();
        let (tx, rx) = sync_channel(64);
        let mut s = Session::new(admin.handle(), tx, false);
        let mut p = JsonRpc;
        for raw in [
            r#"{"jsonrpc":"2.0","method":"echo"}"#,
            r#"{"jsonrpc":"2.0","method":"fail"}"#,
            r#"{"jsonrpc":"2.0","method":"echo","params":5}"#,
            r#"[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"nope"}]"#,
        ] {
            p.frame(Frame::Value(raw.as_bytes().to_vec()), &mut s);
        }
        assert_eq!(rx.try_iter().count(), 0);
        // The bad-params one never reached the admin thread.
        assert_eq!(*log.lock().unwrap(), ["echo", "fail", "echo", "nope"]);
    }

    #[test]
    fn a_batch_is_answered_with_an_array_in_order() {
        let mut h = Harness::new();
        let v = h.one(
            r#"[{"jsonrpc":"2.0","method":"echo","params":{"n":1},"id":"a"},
                {"jsonrpc":"2.0","method":"nope","id":"b"},
                {"jsonrpc":"2.0","method":"echo"},
                7]"#,
        );
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 3, "{v}");
        assert_eq!(a[0]["result"], json!({"n": 1}));
        assert_eq!(a[1]["id"], "b");
        assert_eq!(code(&a[1]), -32601);
        assert_eq!(code(&a[2]), -32600);
        // Only notifications: nothing at all.
        let (_, r) = h.send(r#"[{"jsonrpc":"2.0","method":"echo"}]"#);
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn a_too_large_message_is_answered_and_closes_the_connection() {
        let mut h = Harness::new();
        let flow = h.proto.frame(Frame::TooLarge, &mut h.session);
        assert_eq!(flow, Flow::Close);
        let v: Value = serde_json::from_slice(&h.rx.try_recv().unwrap()).unwrap();
        assert_eq!(code(&v), -32600);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("message too large")
        );
        assert_eq!(v["id"], Value::Null);
    }

    #[test]
    fn subscribe_events_is_answered_by_the_server_and_turns_on_notifications() {
        let mut h = Harness::new();
        let v = h.one(r#"{"jsonrpc":"2.0","method":"subscribe_events","id":1}"#);
        assert_eq!(v["result"], json!({}));
        let format = h.session.subscribe.take().expect("subscription requested");
        let e = Event {
            name: "BLOCK_NODE_ADDED".into(),
            data: json!({"node-name": "n0"}),
            seconds: 5,
            microseconds: 6,
        };
        assert_eq!(
            format(&e),
            json!({"jsonrpc":"2.0","method":"event","params":{
                "event":"BLOCK_NODE_ADDED","data":{"node-name":"n0"},
                "timestamp":{"seconds":5,"microseconds":6}}})
        );
        let v = h.one(r#"{"jsonrpc":"2.0","method":"subscribe_events","params":{"x":1},"id":2}"#);
        assert_eq!(code(&v), -32602);
    }
}
