//! Registry tests: every command called as a client would (`registry.call(name, params)`)
//! on a real engine with the real drivers. Every successful call is also checked against
//! the schemas `query-schema` publishes (params and result), so the schemas cannot drift
//! from what the commands do.

use super::*;
use crate::events::Event;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use strata_engine::{CpuSet, Engine, EngineConfig};

// ---- harness -------------------------------------------------------------------------

struct Harness {
    reg: Option<Registry>,
    events: Receiver<Event>,
    /// Per command: validators of its params and of its result.
    schemas: BTreeMap<String, (jsonschema::Validator, jsonschema::Validator)>,
}

fn harness(reactors: usize) -> Harness {
    let engine = Engine::start(EngineConfig {
        cores: CpuSet::first_allowed(reactors).unwrap_or_else(|e| panic!("{e}")),
        pin: false,
        ..Default::default()
    })
    .expect("engine start");
    let graph = Graph::new(engine, Arc::new(strata_drivers::open_node));
    let bus = EventBus::new();
    let events = bus.subscribe();
    let mut reg = Registry::new(graph, bus);
    let schema = reg.call("query-schema", Value::Null).expect("query-schema");
    let validator = |s: &Value| jsonschema::validator_for(s).expect("a valid JSON Schema");
    let schemas = schema["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            (name, (validator(&c["params"]), validator(&c["result"])))
        })
        .collect();
    Harness {
        reg: Some(reg),
        events,
        schemas,
    }
}

impl Harness {
    fn reg(&mut self) -> &mut Registry {
        self.reg.as_mut().expect("registry running")
    }

    /// A call that must succeed; its params and result must match the published schemas.
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let result = self
            .reg()
            .call(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params}: {e:?}"));
        let (p, r) = &self.schemas[method];
        let params = if params.is_null() { json!({}) } else { params };
        if let Err(e) = p.validate(&params) {
            panic!("{method}: params {params} do not match the params schema: {e}");
        }
        if let Err(e) = r.validate(&result) {
            panic!("{method}: result {result} does not match the result schema: {e}");
        }
        result
    }

    fn err(&mut self, method: &str, params: Value) -> CommandError {
        match self.reg().call(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded: {v}"),
            Err(e) => e,
        }
    }

    /// Events received so far, as (name, data).
    fn events(&self) -> Vec<(String, Value)> {
        self.events.try_iter().map(|e| (e.name, e.data)).collect()
    }

    fn shutdown(mut self) {
        self.reg.take().expect("registry running").shutdown();
    }
}

fn added(name: &str) -> (String, Value) {
    ("BLOCK_NODE_ADDED".to_string(), json!({"node-name": name}))
}

fn removed(name: &str) -> (String, Value) {
    ("BLOCK_NODE_REMOVED".to_string(), json!({"node-name": name}))
}

/// A scratch file of `len` bytes, removed when dropped.
struct ScratchFile(std::path::PathBuf);

impl ScratchFile {
    fn new(name: &str, len: u64) -> ScratchFile {
        let path =
            std::env::temp_dir().join(format!("strata-registry-{name}-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).expect("create scratch file");
        f.set_len(len).expect("size scratch file");
        ScratchFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The generated name of `parent`'s child `edge`.
fn child_name(h: &mut Harness, parent: &str, edge: &str) -> String {
    let s = h.reg().graph().state();
    let p = s.find(parent).unwrap();
    let e = p.children.iter().find(|e| e.name == edge).unwrap();
    s.node(e.child).name.clone()
}

// ---- dispatch and params -------------------------------------------------------------

#[test]
fn an_unknown_command_is_method_not_found_with_qemus_text() {
    let mut h = harness(1);
    let e = h.err("foo", Value::Null);
    assert_eq!(e.code, ErrorCode::MethodNotFound);
    assert_eq!(e.message, "The command foo has not been found");
    assert_eq!(e.code.qmp_class(), "CommandNotFound");
    h.shutdown();
}

#[test]
fn params_errors_are_invalid_params_with_serdes_message() {
    // Booleans also come as strings from `strata-rpc key=value`.
    let mut h0 = harness(1);
    assert_eq!(
        h0.ok("query-named-block-nodes", json!({"flat": "on"})),
        json!([])
    );
    h0.shutdown();
    let mut h = harness(1);
    let cases = [
        (
            "blockdev-del",
            json!({}),
            "Invalid parameters for 'blockdev-del': missing field `node-name`",
        ),
        (
            "blockdev-del",
            Value::Null,
            "Invalid parameters for 'blockdev-del': missing field `node-name`",
        ),
        (
            "blockdev-del",
            json!({"node-name": "a", "force": true}),
            "Invalid parameters for 'blockdev-del': unknown field `force`, expected `node-name`",
        ),
        (
            "blockdev-del",
            json!({"node-name": 7}),
            "Invalid parameters for 'blockdev-del': 'node-name': invalid type: integer `7`, expected a string",
        ),
        (
            "query-named-block-nodes",
            json!({"flat": "maybe"}),
            "Invalid parameters for 'query-named-block-nodes': 'flat': invalid boolean 'maybe': use on or off",
        ),
        (
            "quit",
            json!({"now": true}),
            "Invalid parameters for 'quit': unknown field `now`, there are no fields",
        ),
        (
            "blockdev-del",
            json!(["a"]),
            "Invalid parameters for 'blockdev-del': expected an object (or no params), got an array",
        ),
        (
            "query-version",
            json!("x"),
            "Invalid parameters for 'query-version': expected an object (or no params), got a string",
        ),
        (
            "x-debug-block-user-add",
            json!({"id": "u", "node-name": "n", "perm": ["graph-mod"]}),
            "Invalid parameters for 'x-debug-block-user-add': 'perm[0]': unknown variant `graph-mod`, \
             expected one of `consistent-read`, `write`, `write-unchanged`, `resize`",
        ),
    ];
    for (method, params, message) in cases {
        let e = h.err(method, params.clone());
        assert_eq!(e.code, ErrorCode::InvalidParams, "{method} {params}");
        assert_eq!(e.message, message, "{method} {params}");
        assert_eq!(e.code.jsonrpc_code(), -32602);
    }
    // An alias names itself in its errors.
    let e = h.err("x-debug-query-block-graph", json!({"x": 1}));
    assert!(
        e.message
            .starts_with("Invalid parameters for 'x-debug-query-block-graph'"),
        "{e}"
    );
    h.shutdown();
}

#[test]
fn commands_without_required_params_take_null_or_an_empty_object() {
    let mut h = harness(1);
    for method in [
        "query-named-block-nodes",
        "query-block-graph",
        "x-debug-query-block-graph",
        "save-config",
        "query-schema",
        "rpc_get_methods",
        "query-commands",
        "query-version",
    ] {
        assert_eq!(
            h.ok(method, Value::Null),
            h.ok(method, json!({})),
            "{method}"
        );
    }
    h.shutdown();
}

// ---- blockdev-add / blockdev-del -----------------------------------------------------

#[test]
fn blockdev_add_and_del_emit_node_events_for_inline_children_too() {
    let mut h = harness(2);
    assert_eq!(
        h.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r", "offset": 4096,
                   "file": {"driver": "memory", "size": "1M"}})
        ),
        json!({})
    );
    let child = child_name(&mut h, "r", "file");
    assert!(child.starts_with("#block"), "{child}");
    assert_eq!(h.events(), [added(&child), added("r")]);
    assert_eq!(h.ok("blockdev-del", json!({"node-name": "r"})), json!({}));
    assert_eq!(h.events(), [removed("r"), removed(&child)]);
    assert!(h.reg().graph().state().nodes.is_empty());
    h.shutdown();
}

#[test]
fn blockdev_add_needs_a_unique_node_name_and_valid_driver_options() {
    let mut h = harness(1);
    let e = h.err("blockdev-add", json!({"driver": "null-co"}));
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert_eq!(e.message, "'node-name' must be specified for the root node");
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    let e = h.err(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert_eq!(e.message, "Duplicate nodes with node-name='n'");
    let e = h.err("blockdev-add", json!({"driver": "nope", "node-name": "x"}));
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert!(e.message.contains("unknown driver 'nope'"), "{e}");
    let e = h.err(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "x", "bogus": 1}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert!(e.message.contains("unknown field `bogus`"), "{e}");
    let e = h.err(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "x", "file": "missing"}),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = h.err("blockdev-add", json!(42));
    assert_eq!(e.code, ErrorCode::InvalidParams);
    let e = h.err(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "x", "detect-zeroes": "on"}),
    );
    assert_eq!(e.code, ErrorCode::Unsupported);
    // Only the first node was added.
    assert_eq!(h.events(), [added("n")]);
    h.shutdown();
}

#[test]
fn blockdev_del_refuses_missing_used_and_generated_nodes() {
    let mut h = harness(1);
    let e = h.err("blockdev-del", json!({"node-name": "nope"}));
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.message, "Failed to find node with node-name='nope'");
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": "m"}),
    );
    let e = h.err("blockdev-del", json!({"node-name": "m"}));
    assert_eq!(e.code, ErrorCode::Busy);
    assert_eq!(e.message, "Block device m is in use");
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "r", "perm": ["consistent-read"]}),
    );
    assert_eq!(
        h.err("blockdev-del", json!({"node-name": "r"})).code,
        ErrorCode::Busy
    );
    h.ok("x-debug-block-user-del", json!({"id": "u"}));
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": {"driver": "null-co"}}),
    );
    let child = child_name(&mut h, "r2", "file");
    let e = h.err("blockdev-del", json!({"node-name": child}));
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert_eq!(
        e.message,
        format!("Node {child} is not owned by the monitor")
    );
    h.ok("blockdev-del", json!({"node-name": "r"}));
    h.ok("blockdev-del", json!({"node-name": "m"}));
    h.shutdown();
}

// ---- users and permissions -----------------------------------------------------------

#[test]
fn debug_users_conflict_with_qemus_message() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "n", "size": 65536}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u1", "node-name": "n", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged", "resize"]}),
    );
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "u2", "node-name": "n", "perm": ["consistent-read", "write"]}),
    );
    assert_eq!(e.code, ErrorCode::PermissionConflict);
    assert_eq!(e.code.jsonrpc_code(), -1);
    assert_eq!(
        e.message,
        "Permission conflict on node 'n': permissions 'write' are both required by block \
         device 'u2' and unshared by block device 'u1'."
    );
    // The other way round: a reader that does not share write, after a writer.
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "u3", "node-name": "n", "perm": ["consistent-read"],
               "shared-perm": ["consistent-read"]}),
    );
    assert_eq!(
        e.message,
        "Permission conflict on node 'n': permissions 'write' are both required by block \
         device 'u1' and unshared by block device 'u3'."
    );
    // A failed attach leaves no user behind: u2 can be added once u1 is gone.
    h.ok("x-debug-block-user-del", json!({"id": "u1"}));
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u2", "node-name": "n", "perm": ["consistent-read", "write"]}),
    );
    h.shutdown();
}

#[test]
fn debug_user_ids_are_unique_and_must_exist() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "n", "perm": []}),
    );
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "n", "perm": []}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert_eq!(e.message, "A block device user with id 'u' already exists");
    let e = h.err("x-debug-block-user-del", json!({"id": "v"}));
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.message, "No block device user with id 'v'");
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "w", "node-name": "nope", "perm": []}),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.message, "Cannot find device='' nor node-name='nope'");
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "w", "node-name": "n"}),
    );
    assert_eq!(
        e.message,
        "Invalid parameters for 'x-debug-block-user-add': missing field `perm`"
    );
    h.ok("x-debug-block-user-del", json!({"id": "u"}));
    // The id is free again.
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "n", "perm": []}),
    );
    h.shutdown();
}

#[test]
fn a_read_only_node_refuses_a_writing_user() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "read-only": true}),
    );
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "n", "perm": ["write"]}),
    );
    assert_eq!(e.code, ErrorCode::PermissionConflict);
    assert_eq!(
        e.message,
        "Read-only block node 'n' cannot support read-write users"
    );
    h.shutdown();
}

#[test]
fn a_writing_user_makes_the_image_lock_visible_to_a_second_node() {
    let img = ScratchFile::new("lock", 1 << 20);
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "a", "filename": img.path()}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "writer", "node-name": "a", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged"]}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "b", "filename": img.path()}),
    );
    let e = h.err(
        "x-debug-block-user-add",
        json!({"id": "second", "node-name": "b", "perm": ["consistent-read", "write"]}),
    );
    assert!(e.message.contains("Failed to get \"write\" lock"), "{e}");
    assert!(e.message.contains(img.path()), "{e}");
    // Once the writer goes, the second node may write.
    h.ok("x-debug-block-user-del", json!({"id": "writer"}));
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "second", "node-name": "b", "perm": ["consistent-read", "write"]}),
    );
    h.shutdown();
}

// ---- queries -------------------------------------------------------------------------

#[test]
fn query_named_block_nodes_reports_qemus_block_device_info() {
    let img = ScratchFile::new("info", 1 << 20);
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null"}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img.path(),
               "read-only": true}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "plain", "file": "f"}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "window", "offset": 512, "size": 1024,
               "file": {"driver": "memory", "size": 4096}}),
    );
    let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
    let by_name: BTreeMap<&str, &Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node-name"].as_str().unwrap(), n))
        .collect();
    assert_eq!(
        *by_name["null"],
        json!({
            "node-name": "null", "drv": "null-co", "file": "null-co://", "ro": false,
            "backing_file_depth": 0, "active": true, "encrypted": false,
            "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": {"filename": "null-co://", "format": "null-co",
                      "virtual-size": 1u64 << 30},
            "cache": {"writeback": true, "direct": false, "no-flush": false},
            "write_threshold": 0,
        })
    );
    let f = by_name["f"];
    assert_eq!(f["file"], img.path());
    assert_eq!(f["ro"], true);
    assert_eq!(f["image"]["virtual-size"], 1 << 20);
    assert!(f["image"]["actual-size"].is_u64(), "{f}");
    // A raw node without a window is its file.
    let plain = by_name["plain"];
    assert_eq!(
        (&plain["drv"], &plain["file"]),
        (&json!("raw"), &json!(img.path()))
    );
    assert_eq!(plain["ro"], true, "a read-only child makes raw read-only");
    assert_eq!(plain["image"]["format"], "raw");
    assert_eq!(plain["image"]["dirty-flag"], false);
    // A window is described by its options, the child inline, as QEMU's json: names.
    let window = by_name["window"];
    assert_eq!(
        window["file"],
        r#"json:{"driver": "raw", "file": {"driver": "memory", "size": 4096}, "offset": 512, "size": 1024}"#
    );
    assert_eq!(window["image"]["virtual-size"], 1024);
    let child = child_name(&mut h, "window", "file");
    assert_eq!(by_name[child.as_str()]["drv"], "memory");
    assert_eq!(by_name.len(), 5);
    // Without backing nodes, flat or not gives the same answer.
    assert_eq!(h.ok("query-named-block-nodes", json!({})), nodes);
    h.shutdown();
}

#[test]
fn query_block_graph_lists_users_as_backends_and_every_edge_with_qemus_perm_names() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": "m", "offset": 4096}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "r", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged"]}),
    );
    let (m, r, u) = {
        let s = h.reg().graph().state();
        (
            s.find("m").unwrap().id,
            s.find("r").unwrap().id,
            *s.users.keys().next().unwrap(),
        )
    };
    let g = h.ok("query-block-graph", Value::Null);
    assert_eq!(
        g,
        json!({
            "nodes": [
                {"id": u, "type": "block-backend", "name": "u"},
                {"id": m, "type": "block-driver", "name": "m"},
                {"id": r, "type": "block-driver", "name": "r"},
            ],
            "edges": [
                {"parent": u, "child": r, "name": "root",
                 "perm": ["write", "consistent-read"],
                 "shared-perm": ["write-unchanged", "consistent-read"]},
                // raw with an offset: a DATA child, so resize is never shared; raw takes
                // write (and resize) only as its users do (QEMU's raw_child_perm).
                {"parent": r, "child": m, "name": "file",
                 "perm": ["write", "consistent-read"],
                 "shared-perm": ["write-unchanged", "consistent-read"]},
            ],
        })
    );
    assert_eq!(h.ok("x-debug-query-block-graph", Value::Null), g);
    h.shutdown();
}

#[test]
fn replace_child_reparents_and_drops_the_orphaned_inline_child() {
    let mut h = harness(2);
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": {"driver": "memory", "size": 65536}}),
    );
    let old = child_name(&mut h, "r", "file");
    h.events();
    h.ok(
        "x-blockdev-replace-child",
        json!({"parent": "r", "child": "file", "node": "m"}),
    );
    assert_eq!(child_name(&mut h, "r", "file"), "m");
    assert_eq!(h.events(), [removed(&old)]);
    let config = h.ok("save-config", Value::Null);
    assert_eq!(config[1]["params"]["file"], "m");
    let e = h.err(
        "x-blockdev-replace-child",
        json!({"parent": "r", "child": "backing", "node": "m"}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert_eq!(e.message, "Node 'r' has no child named 'backing'");
    let e = h.err(
        "x-blockdev-replace-child",
        json!({"parent": "r", "child": "file", "node": "nope"}),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    // A cycle is refused.
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "top", "file": "r"}),
    );
    let e = h.err(
        "x-blockdev-replace-child",
        json!({"parent": "r", "child": "file", "node": "top"}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert!(e.message.contains("cycle"), "{e}");
    h.shutdown();
}

// ---- save-config ---------------------------------------------------------------------

#[test]
fn save_config_writes_named_nodes_by_reference_and_generated_ones_inline() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": "1M"}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "offset": 4096, "size": 65536,
               "file": "m", "detect-zeroes": "off"}),
    );
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "two", "file": {"driver": "raw",
               "file": {"driver": "null-co", "read-zeroes": "on"}}}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "r", "perm": ["consistent-read"]}),
    );
    assert_eq!(
        h.ok("save-config", Value::Null),
        json!([
            {"method": "blockdev-add",
             "params": {"driver": "memory", "node-name": "m", "size": "1M"}},
            {"method": "blockdev-add",
             "params": {"driver": "raw", "node-name": "r", "offset": 4096, "size": 65536,
                        "file": "m", "detect-zeroes": "off"}},
            {"method": "blockdev-add",
             "params": {"driver": "raw", "node-name": "two",
                        "file": {"driver": "raw",
                                 "file": {"driver": "null-co", "read-zeroes": "on"}}}},
            {"method": "x-debug-block-user-add",
             "params": {"id": "u", "node-name": "r", "perm": ["consistent-read"],
                        "shared-perm": ["consistent-read", "write", "write-unchanged",
                                        "resize"]}},
        ])
    );
    h.shutdown();
}

#[test]
fn save_config_names_a_generated_node_that_is_used_twice() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "a", "file": {"driver": "null-co"}}),
    );
    let shared = child_name(&mut h, "a", "file");
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "b", "file": shared}),
    );
    let saved = shared.trim_start_matches('#');
    assert_eq!(
        h.ok("save-config", Value::Null),
        json!([
            {"method": "blockdev-add", "params": {"driver": "null-co", "node-name": saved}},
            {"method": "blockdev-add", "params": {"driver": "raw", "node-name": "a", "file": saved}},
            {"method": "blockdev-add", "params": {"driver": "raw", "node-name": "b", "file": saved}},
        ])
    );
    h.shutdown();
}

/// `query-block-graph` and `query-named-block-nodes` with ids and generated names
/// replaced by stable labels (a generated node is `<parent label>/<edge>`), sorted.
fn normalized(h: &mut Harness) -> (Value, Value) {
    let graph = h.ok("query-block-graph", Value::Null);
    let s = h.reg().graph().state();
    let mut labels: BTreeMap<u64, String> = BTreeMap::new();
    for &id in s.topological().unwrap().iter() {
        let n = s.node(id);
        let label = if n.generated {
            let (p, e) = s.parents(id).next().expect("a generated node has a parent");
            format!("{}/{}", labels[&p.id], e.name)
        } else {
            n.name.clone()
        };
        labels.insert(id, label);
    }
    for n in graph["nodes"].as_array().unwrap() {
        if n["type"] == "block-backend" {
            labels.insert(
                n["id"].as_u64().unwrap(),
                n["name"].as_str().unwrap().into(),
            );
        }
    }
    let label = |v: &Value| Value::String(labels[&v.as_u64().unwrap()].clone());
    let mut nodes: Vec<Value> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| json!({"type": n["type"], "name": label(&n["id"])}))
        .collect();
    let mut edges: Vec<Value> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e["parent"] = label(&e["parent"]);
            e["child"] = label(&e["child"]);
            e
        })
        .collect();
    let by_name: BTreeMap<String, u64> = s.nodes.values().map(|n| (n.name.clone(), n.id)).collect();
    let mut infos: Vec<Value> = h
        .ok("query-named-block-nodes", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let mut i = i.clone();
            let id = by_name[i["node-name"].as_str().unwrap()];
            i["node-name"] = Value::String(labels[&id].clone());
            i
        })
        .collect();
    let key = |v: &Value| v.to_string();
    nodes.sort_by_key(key);
    edges.sort_by_key(key);
    infos.sort_by_key(key);
    (json!({"nodes": nodes, "edges": edges}), Value::Array(infos))
}

#[test]
fn save_config_replayed_on_a_fresh_graph_recreates_it() {
    let img = ScratchFile::new("replay", 1 << 20);
    let mut h = harness(2);
    let setup = [
        json!({"driver": "memory", "node-name": "m0", "size": "1M"}),
        json!({"driver": "memory", "node-name": "m1", "size": 65536, "read-only": "on"}),
        json!({"driver": "raw", "node-name": "r0", "offset": 4096, "size": 65536, "file": "m0"}),
        json!({"driver": "raw", "node-name": "r1", "file": {"driver": "memory", "size": 65536}}),
        json!({"driver": "raw", "node-name": "r2", "offset": 512, "size": 512,
               "file": {"driver": "raw", "file": {"driver": "null-co", "size": "1M",
                                                  "read-zeroes": true}}}),
        json!({"driver": "file", "node-name": "f0", "filename": img.path(),
               "cache": {"no-flush": "on"}, "discard": "unmap"}),
        json!({"driver": "raw", "node-name": "rf", "file": "f0"}),
        json!({"driver": "raw", "node-name": "r3", "file": {"driver": "null-co"}}),
        json!({"driver": "null-co", "node-name": "ro", "read-only": true,
               "force-share": true, "latency-ns": 1000}),
    ];
    for opts in setup {
        h.ok("blockdev-add", opts);
    }
    h.ok(
        "x-blockdev-replace-child",
        json!({"parent": "r3", "child": "file", "node": "m1"}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u1", "node-name": "r0", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged"]}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "u2", "node-name": "rf", "perm": ["consistent-read"]}),
    );
    let config = h.ok("save-config", Value::Null);
    let before = normalized(&mut h);
    h.shutdown();

    let mut fresh = harness(2);
    for call in config.as_array().unwrap() {
        fresh.ok(call["method"].as_str().unwrap(), call["params"].clone());
    }
    assert_eq!(normalized(&mut fresh), before);
    assert_eq!(fresh.ok("save-config", Value::Null), config);
    fresh.shutdown();
}

// ---- introspection -------------------------------------------------------------------

#[test]
fn query_schema_covers_every_command_and_event_with_valid_json_schemas() {
    let mut h = harness(1);
    let schema = h.ok("query-schema", Value::Null);
    let commands = schema["commands"].as_array().unwrap();
    let names: Vec<&str> = commands
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, h.reg().methods());
    for c in commands {
        assert!(!c["doc"].as_str().unwrap().is_empty(), "{}", c["name"]);
        for part in ["params", "result"] {
            let s = &c[part];
            assert!(s.is_object(), "{} {part}: {s}", c["name"]);
            if let Err(e) = jsonschema::meta::validate(s) {
                panic!("{} {part} is not a valid JSON Schema: {e}", c["name"]);
            }
        }
        // Params are always objects.
        let params = jsonschema::validator_for(&c["params"]).unwrap();
        assert!(!params.is_valid(&json!(1)), "{}", c["name"]);
    }
    let events: Vec<&str> = schema["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "BLOCK_NODE_ADDED",
            "BLOCK_NODE_REMOVED",
            "BLOCK_IO_ERROR",
            "BLOCK_EXPORT_DELETED"
        ]
    );
    for e in schema["events"].as_array().unwrap() {
        jsonschema::meta::validate(&e["data"]).unwrap();
    }
    let data = |i: usize| &schema["events"][i]["data"];
    assert!(jsonschema::is_valid(data(3), &json!({"id": "e0"})));
    assert!(jsonschema::is_valid(data(0), &json!({"node-name": "n"})));
    assert!(jsonschema::is_valid(
        data(2),
        &json!({"qom-path": "", "device": "d", "node-name": "n", "operation": "read",
                "action": "report", "nospace": false, "reason": "x"})
    ));
    assert!(!jsonschema::is_valid(data(2), &json!({"node-name": "n"})));
    let alias = commands
        .iter()
        .find(|c| c["name"] == "x-debug-query-block-graph")
        .unwrap();
    assert_eq!(alias["alias-of"], "query-block-graph");
    h.shutdown();
}

#[test]
fn the_blockdev_add_schema_has_one_branch_per_driver_with_the_common_options() {
    let mut h = harness(1);
    let schema = h.ok("query-schema", Value::Null);
    let add = schema["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "blockdev-add")
        .unwrap()["params"]
        .clone();
    let branches = add["oneOf"].as_array().expect("oneOf");
    let drivers: Vec<&str> = branches
        .iter()
        .map(|b| b["properties"]["driver"]["const"].as_str().unwrap())
        .collect();
    assert_eq!(drivers, strata_drivers::DRIVERS);
    for b in branches {
        for common in [
            "node-name",
            "read-only",
            "discard",
            "detect-zeroes",
            "auto-read-only",
            "force-share",
        ] {
            assert!(b["properties"].get(common).is_some(), "{common} in {b}");
        }
    }
    let v = jsonschema::validator_for(&add).unwrap();
    let valid = [
        json!({"driver": "null-co", "node-name": "n", "size": "1G", "read-zeroes": "on"}),
        json!({"driver": "memory", "node-name": "n", "size": 4096, "force-share": true}),
        json!({"driver": "file", "node-name": "n", "filename": "/x",
               "cache": {"direct": true}, "detect-zeroes": "off"}),
        json!({"driver": "raw", "node-name": "n", "file": "f", "offset": 512}),
    ];
    for o in valid {
        assert!(v.is_valid(&o), "{o}");
    }
    let invalid = [
        json!({"driver": "null-co"}),
        json!({"driver": "nope", "node-name": "n"}),
        json!({"driver": "memory", "node-name": "n"}),
        json!({"driver": "null-co", "node-name": "n", "bogus": 1}),
        json!({"driver": "null-co", "node-name": "n", "discard": "maybe"}),
        json!({"driver": "null-co", "node-name": "n", "discard": null}),
        json!({"driver": "null-co", "node-name": null}),
    ];
    for o in invalid {
        assert!(!v.is_valid(&o), "{o}");
    }
    h.shutdown();
}

#[test]
fn method_lists_follow_spdk_and_qemu() {
    let mut h = harness(1);
    let methods = h.ok("rpc_get_methods", Value::Null);
    let list: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "blockdev-add",
        "blockdev-del",
        "x-blockdev-replace-child",
        "query-named-block-nodes",
        "query-block-graph",
        "save-config",
        "x-debug-block-user-add",
        "x-debug-block-user-del",
        "query-schema",
        "rpc_get_methods",
        "query-commands",
        "query-version",
        "quit",
    ] {
        assert!(list.contains(&m), "{m}");
    }
    assert!(!list.contains(&"x-debug-query-block-graph"));
    let with_aliases = h.ok(
        "rpc_get_methods",
        json!({"include_aliases": true, "current": true}),
    );
    assert_eq!(with_aliases.as_array().unwrap().len(), list.len() + 1);
    let commands = h.ok("query-commands", Value::Null);
    let expected: Vec<Value> = h
        .reg()
        .methods()
        .iter()
        .map(|m| json!({"name": m}))
        .collect();
    assert_eq!(commands, Value::Array(expected));
    h.shutdown();
}

#[test]
fn query_version_reports_the_qemu_release_implemented_and_strata_as_package() {
    let mut h = harness(1);
    assert_eq!(
        h.ok("query-version", Value::Null),
        json!({"qemu": {"major": 10, "minor": 0, "micro": 0},
               "package": format!("strata {}", env!("CARGO_PKG_VERSION"))})
    );
    h.shutdown();
}

#[test]
fn quit_answers_and_sets_the_flag() {
    let mut h = harness(1);
    assert!(!h.reg().quit_requested());
    assert_eq!(h.ok("quit", Value::Null), json!({}));
    assert!(h.reg().quit_requested());
    h.shutdown();
}

/// The server moves the registry to its admin thread.
#[test]
fn the_registry_can_move_to_the_admin_thread() {
    fn send<T: Send>() {}
    send::<Registry>();
}

#[test]
fn a_users_failed_request_becomes_a_block_io_error_event() {
    let mut h = harness(1);
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 4096}),
    );
    h.ok(
        "x-debug-block-user-add",
        json!({"id": "dev0", "node-name": "m", "perm": ["consistent-read", "write"]}),
    );
    let user = h.reg().ctx.users["dev0"].user;
    let node = h.reg().graph().state().find("m").unwrap().id;
    let results = h
        .reg()
        .graph()
        .engine()
        .spawn(0, move || async move {
            use strata_engine::{Buffer, ReqFlags, Request};
            let blk = strata_engine::graph::Blk::open(user, node).unwrap();
            let past_end = blk
                .io(Request::write(4096, Buffer::new(512), ReqFlags::NONE))
                .await;
            let fine = blk.io(Request::read(0, Buffer::new(512))).await;
            (past_end.result, fine.result)
        })
        .wait()
        .unwrap();
    assert_eq!(results, (Err(strata_engine::Errno::ENOSPC), Ok(())));
    h.events();
    assert_eq!(h.reg().poll_io_errors(), 1);
    assert_eq!(
        h.events(),
        [(
            "BLOCK_IO_ERROR".to_string(),
            json!({"qom-path": "", "device": "dev0", "node-name": "m", "operation": "write",
                   "action": "report", "nospace": true,
                   "reason": strata_engine::Errno::ENOSPC.to_string()})
        )]
    );
    assert_eq!(h.reg().poll_io_errors(), 0);
    h.shutdown();
}

// ---- NBD exports ---------------------------------------------------------------------

/// A unix socket path for an NBD server, removed (with its directory) when dropped.
struct SocketDir(std::path::PathBuf);

impl SocketDir {
    fn new(tag: &str) -> SocketDir {
        let dir = std::env::temp_dir().join(format!("strata-reg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket dir");
        SocketDir(dir)
    }

    fn sock(&self) -> String {
        self.0.join("nbd.sock").to_str().unwrap().to_string()
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects and completes an `NBD_OPT_GO` for `name`; returns the connected socket.
fn nbd_go(path: &str, name: &str) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        match kind {
            1 => return s,
            3 => {}
            other => panic!("NBD_OPT_GO for {name} got reply type {other:#x}"),
        }
    }
}

#[test]
fn an_export_holds_qemus_permissions_and_pins_its_node_until_deleted() {
    let mut h = harness(1);
    let dir = SocketDir::new("export-perm");
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 1 << 20}),
    );
    let e = h.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m"}),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (ErrorCode::InvalidParams, "NBD server not running")
    );
    // QMP's legacy address form.
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.sock()}}}),
    );
    let e = h.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": dir.sock()}}),
    );
    assert_eq!(e.message, "NBD server already running");
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m", "writable": true,
               "iothread": "iot0"}),
    );
    let g = h.ok("query-block-graph", Value::Null);
    let root = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "root")
        .expect("the export's edge")
        .clone();
    assert_eq!(root["perm"], json!(["write", "consistent-read"]));
    assert_eq!(
        root["shared-perm"],
        json!(["write-unchanged", "write", "consistent-read"]),
        "everything but resize is shared"
    );
    assert_eq!(
        g["nodes"][0]["name"], "block export 'e0'",
        "the export is the node's block-backend"
    );
    let e = h.err("blockdev-del", json!({"node-name": "m"}));
    assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
    // Same id, same name (the node name by default), unknown node, other types.
    for (params, code) in [
        (
            json!({"type": "nbd", "id": "e0", "node-name": "m", "name": "x"}),
            ErrorCode::InvalidParams,
        ),
        (
            json!({"type": "nbd", "id": "e1", "node-name": "m"}),
            ErrorCode::InvalidParams,
        ),
        (
            json!({"type": "nbd", "id": "e2", "node-name": "nope"}),
            ErrorCode::NotFound,
        ),
        (
            json!({"type": "fuse", "id": "e3", "node-name": "m"}),
            ErrorCode::Unsupported,
        ),
        (
            json!({"type": "nbd", "id": "e4", "node-name": "m", "name": "b", "bitmaps": ["b0"]}),
            ErrorCode::Unsupported,
        ),
    ] {
        let e = h.err("block-export-add", params.clone());
        assert_eq!(e.code, code, "{params}: {e:?}");
    }
    assert_eq!(
        h.ok("query-block-exports", Value::Null),
        json!([{"type": "nbd", "id": "e0", "node-name": "m", "shutting-down": false}])
    );
    // A read-only second export of the same node is fine alongside the writer.
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "m", "name": "m-ro"}),
    );
    h.events();
    h.ok("block-export-del", json!({"id": "e0"}));
    assert_eq!(
        h.events(),
        vec![("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "e0"}))]
    );
    let e = h.err("block-export-del", json!({"id": "e0"}));
    assert_eq!(e.code, ErrorCode::NotFound);
    h.ok("nbd-server-stop", Value::Null);
    assert_eq!(
        h.events(),
        vec![("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "ro"}))],
        "stopping the server removes its exports"
    );
    assert_eq!(h.ok("query-block-exports", Value::Null), json!([]));
    assert!(
        !std::path::Path::new(&dir.sock()).exists(),
        "the socket file goes with the server"
    );
    let e = h.err("nbd-server-stop", Value::Null);
    assert_eq!(e.message, "NBD server not running");
    h.ok("blockdev-del", json!({"node-name": "m"}));
    h.shutdown();
}

#[test]
fn a_writable_export_of_a_read_only_node_is_refused() {
    let mut h = harness(1);
    let dir = SocketDir::new("export-ro");
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536, "read-only": true}),
    );
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": dir.sock()}}),
    );
    let e = h.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m", "writable": "on"}),
    );
    assert_eq!(
        e.message,
        "Read-only block node 'm' cannot support read-write users"
    );
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m"}),
    );
    h.shutdown();
}

#[test]
fn export_del_safe_refuses_while_a_client_is_connected_and_hard_disconnects_it() {
    use std::io::Read;
    let mut h = harness(2);
    let dir = SocketDir::new("export-del");
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "size": 1 << 20}),
    );
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": dir.sock()}}),
    );
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n", "name": "disk"}),
    );
    let mut client = nbd_go(&dir.sock(), "disk");
    assert_eq!(h.ok("query-nbd-server", Value::Null)["connections"], 1);
    let e = h.err("block-export-del", json!({"id": "e0", "mode": "safe"}));
    assert_eq!(e.code, ErrorCode::Busy);
    assert_eq!(
        e.message,
        "export 'e0' still in use (use mode 'hard' to disconnect its clients)"
    );
    h.events();
    h.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let mut rest = Vec::new();
    assert_eq!(
        client.read_to_end(&mut rest).expect("EOF, not an error"),
        0,
        "the client is disconnected"
    );
    // The export is released once its connection has finished, by the admin thread's
    // periodic poll (called by hand here); until then it is shutting down.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        h.reg().poll_exports();
        let list = h.ok("query-block-exports", Value::Null);
        if list == json!([]) {
            break;
        }
        assert_eq!(list[0]["shutting-down"], true, "{list}");
        let e = h.err("block-export-del", json!({"id": "e0", "mode": "hard"}));
        assert_eq!(e.message, "Export 'e0' is already shutting down");
        assert!(
            std::time::Instant::now() < deadline,
            "export never released"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        h.events(),
        vec![("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "e0"}))]
    );
    assert_eq!(h.ok("query-nbd-server", Value::Null)["connections"], 0);
    h.ok("blockdev-del", json!({"node-name": "n"}));
    h.shutdown();
}

#[test]
fn nbd_server_addresses_in_both_qapi_forms_and_their_errors() {
    let mut h = harness(1);
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
               "max-connections": 4}),
    );
    let info = h.ok("query-nbd-server", Value::Null);
    let addr = info["addr"].as_str().unwrap().to_string();
    let port: u16 = addr
        .strip_prefix("127.0.0.1:")
        .expect("loopback")
        .parse()
        .unwrap();
    assert_ne!(port, 0, "port 0 is resolved to the port in use");
    std::net::TcpStream::connect(&addr).expect("the server listens");
    h.ok("nbd-server-stop", Value::Null);
    // TCP defaults to loopback when no host is given.
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "port": 0}}),
    );
    let info = h.ok("query-nbd-server", Value::Null);
    assert!(
        info["addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{info}"
    );
    h.ok("nbd-server-stop", Value::Null);
    for (addr, msg) in [
        (json!({"type": "unix"}), "Parameter 'addr.path' is missing"),
        (
            json!({"type": "inet", "host": "127.0.0.1"}),
            "Parameter 'addr.port' is missing",
        ),
        (
            json!({"type": "inet", "port": "http"}),
            "addr.port: 'http' is not a port number",
        ),
        (
            json!({"type": "unix", "path": "/x", "data": {"path": "/y"}}),
            "addr: give the address fields either inside 'data' or beside 'type', not both",
        ),
    ] {
        let e = h.err("nbd-server-start", json!({"addr": addr}));
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::InvalidParams, msg)
        );
    }
    let e = h.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": "/x"}, "handshake-max-seconds": u64::MAX}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    let e = h.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": "/x"}, "tls-creds": "t0"}),
    );
    assert_eq!(e.code, ErrorCode::Unsupported);
    let e = h.err(
        "nbd-server-start",
        json!({"addr": {"type": "vsock", "cid": "3"}}),
    );
    assert_eq!(e.code, ErrorCode::InvalidParams);
    h.shutdown();
}

#[test]
fn save_config_recreates_the_nbd_server_and_its_exports() {
    let mut h = harness(1);
    let dir = SocketDir::new("export-save");
    h.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
    );
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": dir.sock()}}),
    );
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m", "name": "disk",
               "description": "the disk", "writable": true}),
    );
    let calls = h.ok("save-config", Value::Null);
    let methods: Vec<&str> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        ["blockdev-add", "nbd-server-start", "block-export-add"]
    );
    h.shutdown();
    let mut fresh = harness(1);
    for c in calls.as_array().unwrap() {
        fresh.ok(c["method"].as_str().unwrap(), c["params"].clone());
    }
    assert_eq!(
        fresh.ok("query-block-exports", Value::Null),
        json!([{"type": "nbd", "id": "e0", "node-name": "m", "shutting-down": false}])
    );
    nbd_go(&dir.sock(), "disk");
    fresh.shutdown();
}
