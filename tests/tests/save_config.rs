//! Options reflect state: the graph that `save-config` describes is the graph a new
//! daemon builds from it (`--config`).

use serde_json::{Value, json};
use std::collections::BTreeMap;
use strata_tests::{Daemon, JsonRpc, TempDir};

/// Nodes by name (generated `#block` names replaced by their parent's name and edge),
/// and edges as (parent, child, name, perm, shared-perm).
fn snapshot(rpc: &mut JsonRpc) -> (BTreeMap<String, Value>, Vec<Value>) {
    let graph = rpc.ok("query-block-graph", Value::Null);
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for n in graph["nodes"].as_array().unwrap() {
        names.insert(
            n["id"].as_u64().unwrap(),
            n["name"].as_str().unwrap().to_string(),
        );
    }
    // Give generated nodes a stable name: "<parent>.<edge>".
    let mut stable = names.clone();
    for e in graph["edges"].as_array().unwrap() {
        let child = e["child"].as_u64().unwrap();
        if names[&child].starts_with('#') {
            let parent = &names[&e["parent"].as_u64().unwrap()];
            stable.insert(child, format!("{parent}.{}", e["name"].as_str().unwrap()));
        }
    }
    let mut edges: Vec<Value> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            json!([
                stable[&e["parent"].as_u64().unwrap()],
                stable[&e["child"].as_u64().unwrap()],
                e["name"],
                e["perm"],
                e["shared-perm"]
            ])
        })
        .collect();
    edges.sort_by_key(|e| e.to_string());
    let rename: BTreeMap<String, String> = names
        .values()
        .cloned()
        .zip(stable.values().cloned())
        .collect();
    let mut nodes = BTreeMap::new();
    for mut n in rpc
        .ok("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .unwrap()
        .clone()
    {
        let name = rename[n["node-name"].as_str().unwrap()].clone();
        n["node-name"] = json!(name);
        // `file` may embed generated names of children in json:{...} strings.
        let file = n["file"].as_str().unwrap_or_default().to_string();
        let mut fixed = file.clone();
        for (old, new) in &rename {
            if old.starts_with('#') {
                fixed = fixed.replace(old, new);
            }
        }
        n["file"] = json!(fixed);
        nodes.insert(name, n);
    }
    (nodes, edges)
}

#[test]
fn a_daemon_restarted_from_save_config_has_the_same_graph() {
    let dir = TempDir::new("save-config");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let daemon = Daemon::start(&[]);
    let mut rpc = daemon.rpc();
    let adds = [
        json!({"driver": "file", "node-name": "f", "filename": img, "cache": {"direct": false, "no-flush": true}}),
        json!({"driver": "raw", "node-name": "win", "file": "f", "offset": 1048576, "size": 2097152}),
        json!({"driver": "raw", "node-name": "whole", "file": {"driver": "memory", "size": "1M"}}),
        json!({"driver": "null-co", "node-name": "nul", "size": 4096, "read-zeroes": true}),
        json!({"driver": "raw", "node-name": "ro", "read-only": true, "file": {"driver": "null-co", "read-only": true}}),
    ];
    for a in &adds {
        rpc.ok("blockdev-add", a.clone());
    }
    rpc.ok(
        "x-debug-block-user-add",
        json!({"id": "u", "node-name": "win", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged"]}),
    );
    let before = snapshot(&mut rpc);
    let config = rpc.ok("save-config", Value::Null);
    let calls = config
        .as_array()
        .expect("save-config returns a list of calls");
    assert!(
        calls
            .iter()
            .all(|c| c["method"].is_string() && c.get("params").is_some()),
        "{config}"
    );
    let path = dir.path("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let out = daemon.terminate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let again = Daemon::start(&["--config", path.to_str().unwrap()]);
    let mut rpc = again.rpc();
    let after = snapshot(&mut rpc);
    assert_eq!(
        before.0, after.0,
        "query-named-block-nodes differs after the restart"
    );
    assert_eq!(before.1, after.1, "the edges differ after the restart");
    // And the restored graph saves the same way.
    assert_eq!(
        rpc.ok("save-config", Value::Null).as_array().unwrap().len(),
        calls.len()
    );
}
