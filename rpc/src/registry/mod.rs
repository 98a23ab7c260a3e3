//! The command registry: every command Strata answers, typed, with its JSON Schema.
//!
//! ```text
//!   Registry::call("blockdev-del", {"node-name": "n0"})
//!        |  Table: name -> CommandSpec (decode params, run, encode result, schemas)
//!        v
//!   handler(&mut Ctx, BlockdevDel) -> Result<Empty, CommandError>
//!        |  Ctx::change: Graph::add/del/replace_child/attach_user/detach_user
//!        v                      then BLOCK_NODE_ADDED / BLOCK_NODE_REMOVED --> EventBus
//!   Graph (strata-engine)
//! ```
//!
//! Adding a command is one function and one `register` line in [`table`]. Every command
//! has a params type (serde, unknown fields rejected) and a result type, both with a
//! JSON Schema; `query-schema` lists them.
//!
//! | command                     | params                                   | result |
//! |-----------------------------|------------------------------------------|--------|
//! | `blockdev-add`              | node options (`driver`, `node-name`, ...)| `{}` |
//! | `blockdev-del`              | `node-name`                              | `{}` |
//! | `x-blockdev-replace-child`  | `parent`, `child`, `node`                | `{}` |
//! | `query-named-block-nodes`   | `flat?`                                  | `[BlockDeviceInfo]` |
//! | `query-block-graph`, `x-debug-query-block-graph` | none                | `XDbgBlockGraph` |
//! | `save-config`               | none                                     | `[{method, params}]` |
//! | `x-debug-block-user-add`    | `id`, `node-name`, `perm`, `shared-perm?`| `{}` |
//! | `x-debug-block-user-del`    | `id`                                     | `{}` |
//! | `nbd-server-start`          | `addr`, `max-connections?`, `handshake-max-seconds?` | `{}` |
//! | `nbd-server-stop`           | none                                     | `{}` |
//! | `block-export-add`          | `type: nbd`, `id`, `node-name`, `name?`, `description?`, `writable?` | `{}` |
//! | `block-export-del`          | `id`, `mode?` (`safe`/`hard`)            | `{}` |
//! | `query-block-exports`       | none                                     | `[BlockExportInfo]` |
//! | `query-nbd-server`          | none                                     | `{running, addr?, connections}` |
//! | `query-schema`              | none                                     | `{commands, events}` |
//! | `rpc_get_methods`           | `current?`, `include_aliases?`           | `[name]` |
//! | `query-commands`            | none                                     | `[{name}]` |
//! | `query-version`             | none                                     | `{qemu{major,minor,micro}, package}` |
//! | `quit`                      | none                                     | `{}` |
//!
//! - [`command`]: the registration mechanism and param decoding.
//! - [`context`]: what handlers work on; graph changes and their events.
//! - [`events`]: the events the registry emits.
//! - [`nodes`], [`info`], [`block_graph`], [`config`], [`users`], [`exports`],
//!   [`introspect`]: the commands.
//! - [`options`]: a node's current options (for `save-config` and filenames).

pub mod block_graph;
pub mod command;
pub mod config;
pub mod context;
pub mod events;
pub mod exports;
pub mod info;
pub mod introspect;
pub mod nodes;
pub mod options;
pub mod users;

#[cfg(test)]
mod tests;

pub use command::{CommandSpec, Empty, Table};
pub use context::Ctx;

use crate::error::{CommandError, ErrorCode};
use crate::events::EventBus;
use events::IoErrorEvent;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use strata_engine::Graph;

/// Every command, in the order `query-schema` and `rpc_get_methods` list them.
pub fn table() -> Table {
    let mut t = Table::default();
    t.register(
        "blockdev-add",
        "Opens a node from its options (QEMU's blockdev-add). Inline children get \
         generated names. Returns {}. Emits BLOCK_NODE_ADDED per new node.",
        nodes::blockdev_add,
    );
    t.register(
        "blockdev-del",
        "Removes a node added by blockdev-add that nothing uses, with the inline children \
         only it had. Returns {}. Emits BLOCK_NODE_REMOVED per removed node.",
        nodes::blockdev_del,
    );
    t.register(
        "x-blockdev-replace-child",
        "Strata extension until blockdev-reopen lands: points child edge `child` of node \
         `parent` at node `node` (the old child goes away if it was inline and unused).",
        nodes::replace_child,
    );
    t.register(
        "query-named-block-nodes",
        "One QEMU BlockDeviceInfo per node; the backing chain nests in image.backing-image \
         unless `flat`.",
        info::query_named_block_nodes,
    );
    t.register(
        "query-block-graph",
        "Every node, user and edge with its permissions, in the shape of QEMU's \
         x-debug-query-block-graph.",
        block_graph::query_block_graph,
    );
    t.alias("x-debug-query-block-graph", "query-block-graph");
    t.register(
        "save-config",
        "The method calls that recreate the current graph: blockdev-add per named node \
         (children first, inline children inside their parent), then the debugging users.",
        config::save_config,
    );
    t.register(
        "x-debug-block-user-add",
        "Debugging aid: attaches user `id` to node `node-name` taking `perm` and sharing \
         `shared-perm` (default all), like a device or export would.",
        users::user_add,
    );
    t.register(
        "x-debug-block-user-del",
        "Debugging aid: detaches a user added by x-debug-block-user-add.",
        users::user_del,
    );
    t.register(
        "nbd-server-start",
        "Starts the NBD server on `addr` (unix socket, or TCP on 127.0.0.1 unless `host` \
         says otherwise), served by the reactors (QEMU's command).",
        exports::nbd_server_start,
    );
    t.register(
        "nbd-server-stop",
        "Stops the NBD server: disconnects every client and removes every export.",
        exports::nbd_server_stop,
    );
    t.register(
        "block-export-add",
        "Exports node `node-name` over NBD as `name` (default the node name); read-only \
         unless `writable`. The export holds consistent-read (and write) on the node.",
        exports::block_export_add,
    );
    t.register(
        "block-export-del",
        "Removes an export: `safe` (default) refuses while clients are connected, `hard` \
         disconnects them (requests already running finish, unanswered). Emits \
         BLOCK_EXPORT_DELETED once they have.",
        exports::block_export_del,
    );
    t.register(
        "query-block-exports",
        "Every export: type, id, node-name, shutting-down (QEMU's BlockExportInfo).",
        exports::query_block_exports,
    );
    t.register(
        "query-nbd-server",
        "Strata extension: whether the NBD server runs, where it listens (with the port \
         chosen for a TCP port 0) and how many clients are connected.",
        exports::query_nbd_server,
    );
    t.register(
        "query-schema",
        "JSON Schema of every command's params and result and of every event's data.",
        introspect::query_schema,
    );
    t.register(
        "rpc_get_methods",
        "SPDK's method list: every command name (aliases with include_aliases).",
        introspect::rpc_get_methods,
    );
    t.register(
        "query-commands",
        "QEMU's command list: [{name}] for every command and alias.",
        introspect::query_commands,
    );
    t.register(
        "query-version",
        "QEMU's VersionInfo: the QEMU release whose QMP Strata implements (10.0.0) and \
         `package` \"strata <version>\".",
        introspect::query_version,
    );
    t.register(
        "quit",
        "Asks the daemon to exit once it has answered; every node is flushed and closed.",
        introspect::quit,
    );
    t
}

/// All commands, dispatched by name. Owned by the admin thread.
#[derive(Debug)]
pub struct Registry {
    table: Arc<Table>,
    ctx: Ctx,
}

impl Registry {
    pub fn new(graph: Graph, events: EventBus) -> Registry {
        let table = Arc::new(table());
        Registry {
            ctx: Ctx {
                graph,
                events,
                users: BTreeMap::new(),
                nbd: None,
                stopped_nbd: Vec::new(),
                exports: BTreeMap::new(),
                quit: false,
                table: table.clone(),
            },
            table,
        }
    }

    /// Runs `method` with `params` (an object, or `null` for none).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CommandError> {
        let Some(spec) = self.table.get(method) else {
            return Err(CommandError::new(
                ErrorCode::MethodNotFound,
                format!("The command {method} has not been found"),
            ));
        };
        spec.invoke(&mut self.ctx, params)
    }

    /// Every command name, aliases included, in registration order.
    pub fn methods(&self) -> Vec<&'static str> {
        self.table.iter().map(|c| c.name).collect()
    }

    /// The graph, for front ends and tests that look at it directly.
    pub fn graph(&self) -> &Graph {
        &self.ctx.graph
    }

    /// The graph, for in-process users (`--blockdev` at startup, `strata-img`). Changes
    /// made through it emit no events; commands are the way that does.
    pub fn graph_mut(&mut self) -> &mut Graph {
        &mut self.ctx.graph
    }

    /// The bus events go out on.
    pub fn events(&self) -> &EventBus {
        &self.ctx.events
    }

    /// Emits `BLOCK_IO_ERROR` for every failed user request the reactors reported since
    /// the last call; returns how many. The admin thread calls this periodically.
    pub fn poll_io_errors(&mut self) -> usize {
        let (reports, dropped) = strata_engine::graph::take_io_errors();
        if dropped > 0 {
            eprintln!("strata: {dropped} I/O error reports dropped (too many at once)");
        }
        for r in &reports {
            let device = self
                .ctx
                .users
                .iter()
                .find(|(_, u)| u.user == r.user)
                .map(|(id, _)| id.clone())
                .or_else(|| {
                    self.ctx
                        .exports
                        .iter()
                        .find(|(_, e)| e.user == r.user)
                        .map(|(id, _)| id.clone())
                })
                .unwrap_or_default();
            let node_name = self
                .ctx
                .graph
                .state()
                .nodes
                .get(&r.node)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            let data = IoErrorEvent {
                qom_path: String::new(),
                device,
                node_name,
                operation: r.op.name().to_string(),
                action: "report".to_string(),
                nospace: r.errno == strata_engine::Errno::ENOSPC,
                reason: r.errno.to_string(),
            };
            self.ctx.events.emit(
                IoErrorEvent::NAME,
                serde_json::to_value(data).expect("BUG: event data serializes"),
            );
        }
        reports.len()
    }

    /// True once `quit` has run: the server answers it, then calls [`Registry::shutdown`].
    pub fn quit_requested(&self) -> bool {
        self.ctx.quit
    }

    /// Releases exports whose last connection has gone (after `block-export-del` or
    /// `nbd-server-stop`), emitting `BLOCK_EXPORT_DELETED`. The admin thread calls this
    /// periodically.
    pub fn poll_exports(&mut self) {
        exports::retire_finished(&mut self.ctx);
    }

    /// Stops the NBD server and waits until its clients are gone (after their requests
    /// in flight finish), then flushes and closes every node and stops the reactors.
    pub fn shutdown(mut self) {
        if let Some(mut nbd) = self.ctx.nbd.take() {
            nbd.server.shut_down();
            self.ctx.stopped_nbd.push(nbd.server);
        }
        for server in self.ctx.stopped_nbd.drain(..) {
            server.wait_idle();
        }
        self.ctx.graph.shutdown();
    }
}
