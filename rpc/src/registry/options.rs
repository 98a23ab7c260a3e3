//! A node's options as they stand: what it was opened with (`Node::options`, which
//! holds neither its name nor its children) plus its current children, so the options
//! reflect re-parenting. Used by `save-config` (children by reference or inline) and by
//! `query-named-block-nodes` (QEMU's `json:{...}` filenames, children inline).

use serde_json::{Map, Value};
use strata_engine::NodeId;
use strata_engine::graph::State;

/// Options that do not change what a node is, only how it is used. QEMU leaves such
/// options out of a node's `json:` filename (they are not "strong" options).
const WEAK_OPTIONS: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache",
    "locking",
    "aio",
    "latency-ns",
];

/// `id`'s options with each child edge set to `child(child_id)`.
pub fn with_children(
    state: &State,
    id: NodeId,
    child: &mut dyn FnMut(NodeId) -> Value,
) -> Map<String, Value> {
    let node = state.node(id);
    let mut options = node.options.clone();
    for e in &node.children {
        insert_path(&mut options, &e.name, child(e.child));
    }
    options
}

/// `id`'s strong options with every child inline (QEMU's `full_open_options`).
pub fn full(state: &State, id: NodeId) -> Map<String, Value> {
    let mut options = with_children(state, id, &mut |c| Value::Object(full(state, c)));
    options.retain(|k, _| !WEAK_OPTIONS.contains(&k.as_str()));
    options
}

/// Whether `id` has options of its own beyond its driver, its children and weak ones.
pub fn has_strong_options(state: &State, id: NodeId) -> bool {
    state
        .node(id)
        .options
        .keys()
        .any(|k| k != "driver" && !WEAK_OPTIONS.contains(&k.as_str()))
}

/// Sets `path` (an edge name: `file`, or dotted for nested children such as
/// `children.0`) in `map`; numeric parts index arrays.
pub fn insert_path(map: &mut Map<String, Value>, path: &str, value: Value) {
    let Some((head, rest)) = path.split_once('.') else {
        map.insert(path.to_string(), value);
        return;
    };
    let numeric = rest
        .split('.')
        .next()
        .is_some_and(|p| p.parse::<usize>().is_ok());
    let slot = map.entry(head.to_string()).or_insert_with(|| {
        if numeric {
            Value::Array(Vec::new())
        } else {
            Value::Object(Map::new())
        }
    });
    insert_value(slot, rest, value);
}

fn insert_value(slot: &mut Value, path: &str, value: Value) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    match slot {
        Value::Array(items) => {
            let i: usize = head.parse().unwrap_or(items.len());
            if items.len() <= i {
                items.resize(i + 1, Value::Null);
            }
            match rest {
                None => items[i] = value,
                Some(r) => {
                    if !items[i].is_object() {
                        items[i] = Value::Object(Map::new());
                    }
                    insert_value(&mut items[i], r, value);
                }
            }
        }
        Value::Object(map) => match rest {
            None => {
                map.insert(head.to_string(), value);
            }
            Some(_) => insert_path(map, path, value),
        },
        other => {
            *other = Value::Object(Map::new());
            insert_value(other, path, value);
        }
    }
}

/// `v` as QEMU prints JSON in `json:` filenames: `{"driver": "raw", "offset": 512}`.
pub fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn edge_names_become_nested_options_and_array_items() {
        let mut m = Map::new();
        insert_path(&mut m, "file", json!("f"));
        insert_path(&mut m, "children.1", json!("b"));
        insert_path(&mut m, "children.0", json!("a"));
        insert_path(&mut m, "x.y", json!(1));
        assert_eq!(
            Value::Object(m),
            json!({"file": "f", "children": ["a", "b"], "x": {"y": 1}})
        );
    }

    #[test]
    fn json_filenames_are_printed_as_qemu_does() {
        let v = json!({"driver": "raw", "file": {"driver": "null-co"}, "offset": 512});
        assert_eq!(
            qemu_json(&v),
            r#"{"driver": "raw", "file": {"driver": "null-co"}, "offset": 512}"#
        );
    }
}
