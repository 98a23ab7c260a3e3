//! `save-config`: the method calls that recreate the current graph, as SPDK's
//! `save_config` (a list of `{method, params}`), replayable through `Registry::call`,
//! `--config FILE` or any client.
//!
//! - Every node a user named becomes one `blockdev-add`, children before parents, with
//!   its children by reference (their names).
//! - A node with a generated name (`#block005`) that only its one parent uses is written
//!   inline in that parent's options, without a name, as it was given; it gets a new
//!   generated name on replay.
//! - A generated node used more than once (referenced by name by a second parent, or
//!   by a user) cannot be inline twice; it is saved as its own `blockdev-add` under a
//!   derived name (`#block005` -> `block005`, with a suffix if that is taken).
//! - Debugging users become `x-debug-block-user-add` calls after the nodes.

use super::command::Empty;
use super::context::Ctx;
use super::options;
use crate::error::CommandError;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use strata_engine::NodeId;
use strata_engine::graph::State;

/// One replayable call.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct MethodCall {
    pub method: String,
    pub params: Value,
}

pub fn save_config(ctx: &mut Ctx, _: Empty) -> Result<Vec<MethodCall>, CommandError> {
    let state = ctx.graph.state();
    let names = saved_names(state);
    let mut calls = Vec::new();
    for id in children_first(state) {
        let Some(name) = names.get(&id) else {
            continue;
        };
        let mut params = saved_options(state, &names, id);
        params.insert("node-name".to_string(), Value::String(name.clone()));
        calls.push(MethodCall {
            method: "blockdev-add".to_string(),
            params: Value::Object(params),
        });
    }
    for (id, u) in &ctx.users {
        let node = state.find(&u.node_name)?.id;
        calls.push(MethodCall {
            method: "x-debug-block-user-add".to_string(),
            params: serde_json::json!({
                "id": id,
                "node-name": names[&node],
                "perm": u.perm.names(),
                "shared-perm": u.shared.names(),
            }),
        });
    }
    if let Some(nbd) = &ctx.nbd {
        calls.push(MethodCall {
            method: "nbd-server-start".to_string(),
            params: serde_json::to_value(&nbd.params).expect("BUG: params serialize"),
        });
        for e in ctx.exports.values() {
            calls.push(MethodCall {
                method: "block-export-add".to_string(),
                params: serde_json::to_value(&e.params).expect("BUG: params serialize"),
            });
        }
    }
    Ok(calls)
}

/// Every node after its children, otherwise in creation order (ids grow), so the saved
/// calls read in the order they were most likely given.
fn children_first(state: &State) -> Vec<NodeId> {
    fn visit(state: &State, id: NodeId, seen: &mut BTreeSet<NodeId>, out: &mut Vec<NodeId>) {
        if !seen.insert(id) {
            return;
        }
        for e in &state.node(id).children {
            visit(state, e.child, seen, out);
        }
        out.push(id);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(state.nodes.len());
    for &id in state.nodes.keys() {
        visit(state, id, &mut seen, &mut out);
    }
    out
}

/// The name each separately saved node is saved under; nodes written inline have none.
fn saved_names(state: &State) -> BTreeMap<NodeId, String> {
    let taken: BTreeSet<&str> = state.nodes.values().map(|n| n.name.as_str()).collect();
    let mut derived: BTreeSet<String> = BTreeSet::new();
    let mut names = BTreeMap::new();
    for n in state.nodes.values() {
        if !n.generated {
            names.insert(n.id, n.name.clone());
            continue;
        }
        let uses = state.parents(n.id).count() + state.users_of(n.id).count();
        if uses == 1 && state.users_of(n.id).next().is_none() {
            continue;
        }
        let base = n.name.trim_start_matches('#').to_string();
        let mut name = base.clone();
        let mut i = 1;
        while taken.contains(name.as_str()) || derived.contains(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        derived.insert(name.clone());
        names.insert(n.id, name);
    }
    names
}

/// `id`'s options with children by name, or inline when they have no saved name.
fn saved_options(
    state: &State,
    names: &BTreeMap<NodeId, String>,
    id: NodeId,
) -> Map<String, Value> {
    options::with_children(state, id, &mut |c| match names.get(&c) {
        Some(name) => Value::String(name.clone()),
        None => Value::Object(saved_options(state, names, c)),
    })
}
