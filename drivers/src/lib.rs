//! strata-drivers: block drivers and the way nodes are described.
//!
//! ```text
//!   "driver=raw,file.driver=file,file.filename=/x"
//!        | keyval::parse
//!        v
//!   JSON object --open_node(options, ctx)--> Arc<dyn Driver>
//!                    |   each driver's options struct (serde + JSON Schema)
//!                    +-- ctx.open_child("file", spec, role) for drivers with children
//!                          in the graph: Graph's context (spec: options or a node-name)
//!                          open():       a standalone context (inline options only)
//! ```
//!
//! Drivers: [`null_co`] (`null-co`), [`memory`] (`memory`, a RAM disk), [`file`](mod@file)
//! (`file`, a host file or block device over io_uring, with QEMU's image locking),
//! [`raw`] (`raw`, a window onto its `file` child). Every driver runs the shared
//! [`conformance`] suite in its tests.
//!
//! [`nbd`]: the NBD protocol and the server that exports nodes over it, served by the
//! reactors (`nbd-server-start` / `block-export-add` in the daemon).

pub mod conformance;
pub mod file;
pub mod keyval;
pub mod memory;
pub mod nbd;
pub mod null_co;
pub mod options;
pub mod raw;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Arc;
use strata_engine::graph::{ChildRole, OpenContext};
use strata_engine::{Driver, Error};

/// Names of the drivers [`open_node`] knows.
pub const DRIVERS: &[&str] = &["file", "memory", "null-co", "raw"];

/// Opens a node from its options (`{"driver": ..., ...}`) on the calling (admin) thread,
/// opening its children through `ctx`. This is the graph's
/// [`Opener`](strata_engine::graph::Opener): `Arc::new(strata_drivers::open_node)`.
pub fn open_node(
    options: &Map<String, Value>,
    ctx: &mut dyn OpenContext,
) -> Result<Arc<dyn Driver>, Error> {
    let driver = match options.get("driver") {
        Some(Value::String(d)) => d.as_str(),
        Some(_) => {
            return Err(Error::invalid(
                "Invalid parameter type for 'driver', expected: string",
            ));
        }
        None => {
            return Err(Error::invalid(format!(
                "missing 'driver' (one of: {})",
                DRIVERS.join(", ")
            )));
        }
    };
    let mut rest = options.clone();
    rest.remove("driver");
    let rest = Value::Object(rest);
    match driver {
        "file" => Ok(Arc::new(file::FileDriver::open(parse_options(
            driver, rest,
        )?)?)),
        "memory" => Ok(Arc::new(memory::Memory::new(parse_options(driver, rest)?)?)),
        "null-co" => Ok(Arc::new(null_co::NullCo::new(parse_options(driver, rest)?))),
        "raw" => Ok(Arc::new(raw::Raw::open(parse_options(driver, rest)?, ctx)?)),
        other => Err(Error::invalid(format!(
            "unknown driver '{other}' (known: {})",
            DRIVERS.join(", ")
        ))),
    }
}

/// Opens a node outside any graph (strata-perf, tests): children must be given inline
/// (`file.driver=file,file.filename=/x`) and are opened with it.
pub fn open(options: &Value) -> Result<Arc<dyn Driver>, Error> {
    let obj = options
        .as_object()
        .ok_or_else(|| Error::invalid("node options must be an object"))?;
    open_node(obj, &mut Standalone)
}

/// Opens a node described in keyval syntax (`driver=null-co,size=1G`), outside any graph.
pub fn open_keyval(spec: &str) -> Result<Arc<dyn Driver>, Error> {
    open(&keyval::parse(spec).map_err(Error::invalid)?)
}

/// Deserializes a driver's options, naming the driver in the error.
pub fn parse_options<T: DeserializeOwned>(driver: &str, v: Value) -> Result<T, Error> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // Name the option unless the message already does (or the error is about the
        // whole object, such as an unknown or missing field).
        let msg =
            if path == "." || inner.starts_with("option '") || inner.starts_with("unknown field") {
                inner
            } else {
                format!("option '{path}': {inner}")
            };
        Error::invalid(format!("invalid options for driver '{driver}': {msg}"))
    })
}

/// The JSON Schema of each driver's options (everything but `driver`), by driver name,
/// in [`DRIVERS`] order. They accept the value shapes the drivers' serde types accept
/// (sizes as numbers or suffixed strings, booleans as booleans or `on`/`off`); the RPC
/// layer builds `blockdev-add`'s schema from them.
pub fn options_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("file", schemars::schema_for!(file::FileOptions)),
        ("memory", schemars::schema_for!(memory::MemoryOptions)),
        ("null-co", schemars::schema_for!(null_co::NullOptions)),
        ("raw", schemars::schema_for!(raw::RawOptions)),
    ]
}

/// The context of a node opened outside a graph: inline children are opened right away
/// (they belong to their parent alone); there are no other nodes to refer to.
struct Standalone;

impl OpenContext for Standalone {
    fn open_child(
        &mut self,
        name: &str,
        spec: &Value,
        _role: ChildRole,
    ) -> Result<Arc<dyn Driver>, Error> {
        match spec {
            Value::Object(options) => open_node(options, self),
            Value::String(node) => Err(Error::invalid(format!(
                "child '{name}' refers to node '{node}', but a node opened on its own (outside \
                 a daemon's graph) has no other nodes to refer to: give the child's options \
                 inline instead (e.g. {name}.driver=file,{name}.filename=...)"
            ))),
            _ => Err(Error::invalid(format!(
                "Invalid parameter type for '{name}', expected: a node name or an options object"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
