//! The registration mechanism: a typed handler becomes a [`CommandSpec`] that decodes its
//! params, runs, encodes its result and can describe both as JSON Schema.
//!
//! ```text
//!   Table::register::<P, R>("blockdev-del", doc, handler)
//!        handler: fn(&mut Ctx, P) -> Result<R, CommandError>
//!                      |
//!   CommandSpec { name, doc, params_schema: schema::<P>, result_schema: schema::<R>,
//!                 invoke: Value --serde--> P --handler--> R --serde--> Value }
//! ```
//!
//! Params are decoded with serde, so every command rejects unknown fields, wrong types
//! and missing fields the same way, with serde's message behind
//! `Invalid parameters for '<command>': `.

use super::context::Ctx;
use crate::error::{CommandError, ErrorCode};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// A command's type-erased body.
/// Called with the name the client used, for messages.
type Invoke = Arc<dyn Fn(&mut Ctx, &str, Value) -> Result<Value, CommandError> + Send + Sync>;

/// One command.
pub struct CommandSpec {
    pub name: &'static str,
    /// One paragraph for a person: what it does, what it returns, its errors.
    pub doc: &'static str,
    /// The command this one is another name for (`x-debug-query-block-graph`).
    pub alias_of: Option<&'static str>,
    /// JSON Schema of the params object (for deserialization).
    pub params_schema: fn() -> Schema,
    /// JSON Schema of the result (for serialization).
    pub result_schema: fn() -> Schema,
    invoke: Invoke,
}

impl CommandSpec {
    pub fn invoke(&self, ctx: &mut Ctx, params: Value) -> Result<Value, CommandError> {
        (self.invoke)(ctx, self.name, params)
    }
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name)
            .field("alias_of", &self.alias_of)
            .finish_non_exhaustive()
    }
}

/// Every command, in registration order.
#[derive(Debug, Default)]
pub struct Table {
    specs: Vec<CommandSpec>,
}

impl Table {
    /// Adds command `name` run by `handler`.
    pub fn register<P, R>(
        &mut self,
        name: &'static str,
        doc: &'static str,
        handler: fn(&mut Ctx, P) -> Result<R, CommandError>,
    ) where
        P: DeserializeOwned + JsonSchema + 'static,
        R: Serialize + JsonSchema + 'static,
    {
        assert!(
            self.get(name).is_none(),
            "BUG: command {name} registered twice"
        );
        self.specs.push(CommandSpec {
            name,
            doc,
            alias_of: None,
            params_schema: params_schema::<P>,
            result_schema: result_schema::<R>,
            invoke: Arc::new(move |ctx, name, params| {
                let params = decode::<P>(name, params)?;
                let result = handler(ctx, params)?;
                serde_json::to_value(result).map_err(|e| {
                    CommandError::new(
                        ErrorCode::Internal,
                        format!("encoding the result of '{name}': {e}"),
                    )
                })
            }),
        });
    }

    /// Adds `alias` as another name for the registered command `target`.
    pub fn alias(&mut self, alias: &'static str, target: &'static str) {
        assert!(
            self.get(alias).is_none(),
            "BUG: command {alias} registered twice"
        );
        let t = self
            .get(target)
            .expect("BUG: alias of an unregistered command");
        let spec = CommandSpec {
            name: alias,
            doc: t.doc,
            alias_of: Some(target),
            params_schema: t.params_schema,
            result_schema: t.result_schema,
            invoke: t.invoke.clone(),
        };
        self.specs.push(spec);
    }

    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CommandSpec> {
        self.specs.iter()
    }
}

/// Decodes `params` (an object, or null/absent for none) into `P`.
fn decode<P: DeserializeOwned>(name: &str, params: Value) -> Result<P, CommandError> {
    let params = match params {
        Value::Null => Value::Object(Map::new()),
        v @ Value::Object(_) => v,
        other => {
            return Err(CommandError::invalid_params(format!(
                "Invalid parameters for '{name}': expected an object (or no params), got {}",
                kind_of(&other)
            )));
        }
    };
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names unknown and missing fields itself; a bad value gets its field.
        let msg = if path == "." || inner.starts_with("unknown field") {
            inner
        } else {
            format!("'{path}': {inner}")
        };
        CommandError::invalid_params(format!("Invalid parameters for '{name}': {msg}"))
    })
}

/// What kind of JSON value `v` is, for messages ("expected an object, got a string").
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The schema of what a command accepts.
pub fn params_schema<P: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<P>()
}

/// The schema of what a command (or an event) produces.
pub fn result_schema<R: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<R>()
}

/// `{}`: the params of a command that takes none, and the result of a command that has
/// nothing to return (as QEMU's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}
