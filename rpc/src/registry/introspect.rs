//! What the server is and can do: `query-schema`, `rpc_get_methods` (SPDK),
//! `query-commands` and `query-version` (QEMU), and `quit`.
//!
//! `query-schema` is Strata's introspection: plain JSON Schema (draft 2020-12) of every
//! command's params and result and of every event's data, generated from the same Rust
//! types the commands decode and encode, so it cannot drift from what they accept.
//! (QEMU's `query-qmp-schema` is a different, QAPI-specific format; Strata does not
//! offer it.)

use super::command::Empty;
use super::context::Ctx;
use super::events;
use crate::error::CommandError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct SchemaInfo {
    pub commands: Vec<CommandSchema>,
    pub events: Vec<EventSchema>,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CommandSchema {
    pub name: String,
    pub doc: String,
    /// The command this name is an alias of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
    /// JSON Schema of the params object.
    pub params: Value,
    /// JSON Schema of the result.
    pub result: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct EventSchema {
    pub name: String,
    pub doc: String,
    /// JSON Schema of the event's data.
    pub data: Value,
}

pub fn query_schema(ctx: &mut Ctx, _: Empty) -> Result<SchemaInfo, CommandError> {
    Ok(SchemaInfo {
        commands: ctx
            .table
            .iter()
            .map(|c| CommandSchema {
                name: c.name.to_string(),
                doc: c.doc.to_string(),
                alias_of: c.alias_of.map(str::to_string),
                params: (c.params_schema)().to_value(),
                result: (c.result_schema)().to_value(),
            })
            .collect(),
        events: events::all()
            .into_iter()
            .map(|e| EventSchema {
                name: e.name.to_string(),
                doc: e.doc.to_string(),
                data: (e.data_schema)().to_value(),
            })
            .collect(),
    })
}

/// SPDK's `rpc_get_methods` params (snake_case, as SPDK).
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetMethods {
    /// Only the methods callable now (SPDK's startup/runtime split; Strata has no
    /// startup-only methods, so this changes nothing).
    #[serde(default, deserialize_with = "strata_drivers::options::boolean")]
    #[schemars(schema_with = "strata_drivers::options::boolean_schema")]
    pub current: bool,
    /// Include alias names (`x-debug-query-block-graph`).
    #[serde(default, deserialize_with = "strata_drivers::options::boolean")]
    #[schemars(schema_with = "strata_drivers::options::boolean_schema")]
    pub include_aliases: bool,
}

pub fn rpc_get_methods(ctx: &mut Ctx, p: GetMethods) -> Result<Vec<String>, CommandError> {
    Ok(ctx
        .table
        .iter()
        .filter(|c| p.include_aliases || c.alias_of.is_none())
        .map(|c| c.name.to_string())
        .collect())
}

/// QEMU's `CommandInfo`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct CommandInfo {
    pub name: String,
}

/// QEMU's `query-commands`: every name, aliases included.
pub fn query_commands(ctx: &mut Ctx, _: Empty) -> Result<Vec<CommandInfo>, CommandError> {
    Ok(ctx
        .table
        .iter()
        .map(|c| CommandInfo {
            name: c.name.to_string(),
        })
        .collect())
}

/// QEMU's `VersionInfo`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct VersionInfo {
    /// The QEMU release whose QMP subset Strata implements (not Strata's version).
    pub qemu: VersionTriple,
    /// `strata <version>`.
    pub package: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The QEMU release whose block-layer QMP Strata follows.
pub const QEMU_VERSION: VersionTriple = VersionTriple {
    major: 10,
    minor: 0,
    micro: 0,
};

/// `query-version`. QEMU tooling (libvirt, the `qemu.qmp` scripts, iotests helpers)
/// checks the `qemu` triple to decide which commands and fields to expect, so Strata
/// reports the QEMU release whose QMP subset it implements (10.0) rather than its own
/// version, which would read as an ancient QEMU (0.1.0). Strata's own version is in
/// `package`.
pub fn query_version(_: &mut Ctx, _: Empty) -> Result<VersionInfo, CommandError> {
    Ok(VersionInfo {
        qemu: QEMU_VERSION,
        package: format!("strata {}", env!("CARGO_PKG_VERSION")),
    })
}

/// `quit`: the server answers, then shuts the daemon down (flushing every node).
pub fn quit(ctx: &mut Ctx, _: Empty) -> Result<Empty, CommandError> {
    ctx.quit = true;
    Ok(Empty {})
}
