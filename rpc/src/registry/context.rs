//! What commands work on: the graph, the event bus, the debugging users and the quit
//! flag. Graph changes go through [`Ctx::change`], which emits one event per node that
//! appeared or went away, so no command can forget to.

use super::command::Table;
use super::events::NodeEvent;
use crate::error::CommandError;
use crate::events::EventBus;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use strata_engine::graph::UserId;
use strata_engine::{Error, Graph, NodeId, Perm};

/// A user attached with `x-debug-block-user-add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugUser {
    pub user: UserId,
    pub node_name: String,
    pub perm: Perm,
    pub shared: Perm,
}

/// The running NBD server (`nbd-server-start`).
#[derive(Debug)]
pub struct NbdRecord {
    pub server: strata_drivers::nbd::NbdServer,
    /// Where it listens (a TCP port 0 resolved).
    pub endpoint: crate::server::listener::Endpoint,
    /// What started it, for `save-config`.
    pub params: super::exports::NbdServerStart,
    /// Removes the unix socket file once the server is gone.
    pub _file: crate::server::listener::SocketGuard,
}

/// An export (`block-export-add`).
#[derive(Debug)]
pub struct ExportRecord {
    /// The graph user holding its permissions.
    pub user: UserId,
    /// What added it, for `save-config`.
    pub params: super::exports::BlockExportAdd,
    /// Withdrawn from clients; its connections are finishing their requests. It is
    /// released (user detached, `BLOCK_EXPORT_DELETED`) once they are gone.
    pub removing: bool,
}

/// The state every handler gets.
#[derive(Debug)]
pub struct Ctx {
    /// The NBD server, if started. Declared before `graph`: dropped first.
    pub nbd: Option<NbdRecord>,
    /// Stopped NBD servers whose connections are still finishing their requests.
    pub stopped_nbd: Vec<strata_drivers::nbd::NbdServer>,
    /// Exports by id.
    pub exports: BTreeMap<String, ExportRecord>,
    pub graph: Graph,
    pub events: EventBus,
    /// `x-debug-block-user-add` users by their id.
    pub users: BTreeMap<String, DebugUser>,
    pub quit: bool,
    /// The command table, for introspection.
    pub table: Arc<Table>,
}

impl Ctx {
    /// Runs a graph change, then emits `BLOCK_NODE_REMOVED` for every node it removed
    /// (parents first) and `BLOCK_NODE_ADDED` for every node it added (children first).
    pub fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Graph) -> Result<T, Error>,
    ) -> Result<T, CommandError> {
        let before_order = self.graph.state().topological().unwrap_or_default();
        let before: BTreeMap<NodeId, String> = before_order
            .iter()
            .map(|&id| (id, self.graph.state().node(id).name.clone()))
            .collect();
        let out = f(&mut self.graph)?;
        let state = self.graph.state();
        let after: BTreeSet<NodeId> = state.nodes.keys().copied().collect();
        for id in before_order.iter().filter(|id| !after.contains(id)) {
            self.emit(NodeEvent::REMOVED, &before[id]);
        }
        // Node ids grow as nodes open and children open before their parents.
        let added: Vec<String> = state
            .nodes
            .values()
            .filter(|n| !before.contains_key(&n.id))
            .map(|n| n.name.clone())
            .collect();
        for name in added {
            self.emit(NodeEvent::ADDED, &name);
        }
        Ok(out)
    }

    fn emit(&self, event: &str, node_name: &str) {
        let data = serde_json::to_value(NodeEvent {
            node_name: node_name.to_string(),
        })
        .expect("BUG: a node event always encodes");
        self.events.emit(event, data);
    }
}
