//! The events commands emit, with the schema of their data (listed by `query-schema`).
//!
//! `BLOCK_NODE_ADDED` and `BLOCK_NODE_REMOVED` are Strata's own: QEMU has no event for a
//! node coming or going. They are emitted for every node, including inline children
//! with generated names (`#block005`), so a client can keep a mirror of the node list
//! without polling `query-named-block-nodes`.

use super::command::result_schema;
use schemars::{JsonSchema, Schema};
use serde::Serialize;

/// Data of `BLOCK_NODE_ADDED` and `BLOCK_NODE_REMOVED`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct NodeEvent {
    /// The node's name (generated names included).
    pub node_name: String,
}

impl NodeEvent {
    pub const ADDED: &'static str = "BLOCK_NODE_ADDED";
    pub const REMOVED: &'static str = "BLOCK_NODE_REMOVED";
}

/// Data of `BLOCK_IO_ERROR` (QEMU's fields; `action` is always `report`: Strata reports
/// the error to the user of the node and carries on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IoErrorEvent {
    /// Always empty: Strata has no QOM tree.
    pub qom_path: String,
    /// The user whose request failed (an export id, a debugging user id).
    pub device: String,
    pub node_name: String,
    /// `read`, `write`, `write-zeroes`, `discard`, `flush` or `block-status`.
    pub operation: String,
    pub action: String,
    /// Whether the error was ENOSPC.
    pub nospace: bool,
    /// The error, as strerror and errno name.
    pub reason: String,
}

impl IoErrorEvent {
    pub const NAME: &'static str = "BLOCK_IO_ERROR";
}

/// Data of `BLOCK_EXPORT_DELETED` (QEMU's): an export is gone and its node released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ExportDeletedEvent {
    pub id: String,
}

impl ExportDeletedEvent {
    pub const NAME: &'static str = "BLOCK_EXPORT_DELETED";
}

/// One event kind.
#[derive(Debug)]
pub struct EventSpec {
    pub name: &'static str,
    pub doc: &'static str,
    pub data_schema: fn() -> Schema,
}

/// Every event the registry emits.
pub fn all() -> Vec<EventSpec> {
    vec![
        EventSpec {
            name: NodeEvent::ADDED,
            doc: "Strata extension: a node was added to the graph (by blockdev-add, \
                  including each inline child), children before parents.",
            data_schema: result_schema::<NodeEvent>,
        },
        EventSpec {
            name: NodeEvent::REMOVED,
            doc: "Strata extension: a node left the graph (blockdev-del, including the \
                  inline children that went with it, or an inline child dropped by \
                  x-blockdev-replace-child), parents before children.",
            data_schema: result_schema::<NodeEvent>,
        },
        EventSpec {
            name: IoErrorEvent::NAME,
            doc: "A request of a node's user failed (QEMU's event; action is always \
                  report). Emitted by the admin thread shortly after the failure.",
            data_schema: result_schema::<IoErrorEvent>,
        },
        EventSpec {
            name: ExportDeletedEvent::NAME,
            doc: "An export was removed (block-export-del, or nbd-server-stop for all of \
                  them); its clients are disconnected and its node released.",
            data_schema: result_schema::<ExportDeletedEvent>,
        },
    ]
}
