//! `query-block-graph` (QEMU's `x-debug-query-block-graph`): every node and user with
//! every edge and the permissions it carries, in QEMU's `XDbgBlockGraph` shape.
//!
//! Graph users (exports, `x-debug-block-user-add` users) are QEMU's BlockBackends: they
//! are listed first as `block-backend` nodes, each with one `root` edge to its node, as
//! QEMU lists backends before driver nodes. Ids are the graph's own (nodes and users
//! share one counter, so they never collide). Permission lists are in QEMU's order,
//! which is the reverse of the bit order (`[resize, write, consistent-read]`): QEMU
//! builds them by prepending.

use super::command::Empty;
use super::context::Ctx;
use crate::error::CommandError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use strata_engine::Perm;

/// QEMU's `BlockPermission`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BlockPermission {
    ConsistentRead,
    Write,
    WriteUnchanged,
    Resize,
}

impl BlockPermission {
    pub fn perm(self) -> Perm {
        match self {
            BlockPermission::ConsistentRead => Perm::CONSISTENT_READ,
            BlockPermission::Write => Perm::WRITE,
            BlockPermission::WriteUnchanged => Perm::WRITE_UNCHANGED,
            BlockPermission::Resize => Perm::RESIZE,
        }
    }

    /// The set of `list`.
    pub fn union(list: &[BlockPermission]) -> Perm {
        list.iter().fold(Perm::NONE, |p, b| p | b.perm())
    }

    /// `perm` as a list, in bit order.
    pub fn list(perm: Perm) -> Vec<BlockPermission> {
        perm.names()
            .into_iter()
            .map(|n| {
                serde_json::from_value(n.into()).expect("BUG: Perm::names are BlockPermissions")
            })
            .collect()
    }

    /// `perm` as QEMU's x-debug-query-block-graph lists it.
    fn qemu_list(perm: Perm) -> Vec<BlockPermission> {
        let mut l = BlockPermission::list(perm);
        l.reverse();
        l
    }
}

/// QEMU's `XDbgBlockGraph`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct XDbgBlockGraph {
    pub nodes: Vec<XDbgBlockGraphNode>,
    pub edges: Vec<XDbgBlockGraphEdge>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum XDbgBlockGraphNodeType {
    BlockBackend,
    Job,
    BlockDriver,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct XDbgBlockGraphNode {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: XDbgBlockGraphNodeType,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct XDbgBlockGraphEdge {
    pub parent: u64,
    pub child: u64,
    pub name: String,
    pub perm: Vec<BlockPermission>,
    pub shared_perm: Vec<BlockPermission>,
}

pub fn query_block_graph(ctx: &mut Ctx, _: Empty) -> Result<XDbgBlockGraph, CommandError> {
    let state = ctx.graph.state();
    let mut g = XDbgBlockGraph {
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    for u in state.users.values() {
        // A debugging user is named by its id; other users by their description.
        let name = ctx
            .users
            .iter()
            .find(|(_, d)| d.user == u.id)
            .map_or_else(|| u.desc.clone(), |(id, _)| id.clone());
        g.nodes.push(XDbgBlockGraphNode {
            id: u.id,
            kind: XDbgBlockGraphNodeType::BlockBackend,
            name,
        });
        g.edges.push(XDbgBlockGraphEdge {
            parent: u.id,
            child: u.node,
            name: "root".to_string(),
            perm: BlockPermission::qemu_list(u.perm),
            shared_perm: BlockPermission::qemu_list(u.shared),
        });
    }
    for n in state.nodes.values() {
        g.nodes.push(XDbgBlockGraphNode {
            id: n.id,
            kind: XDbgBlockGraphNodeType::BlockDriver,
            name: n.name.clone(),
        });
        for e in &n.children {
            g.edges.push(XDbgBlockGraphEdge {
                parent: n.id,
                child: e.child,
                name: e.name.clone(),
                perm: BlockPermission::qemu_list(e.perm),
                shared_perm: BlockPermission::qemu_list(e.shared),
            });
        }
    }
    Ok(g)
}
