//! Node lifecycle: `blockdev-add`, `blockdev-del`, `x-blockdev-replace-child`.
//!
//! `blockdev-add` takes free-form driver options: the drivers validate them (each with
//! its own serde options struct) when the graph opens the node, so the registry does not
//! parse them twice. Its schema is still exact: a `oneOf` with one branch per driver,
//! built from `strata_drivers::options_schemas()` plus the options every node takes.

use super::command::Empty;
use super::context::Ctx;
use crate::error::CommandError;
use schemars::generate::SchemaGenerator;
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// `blockdev-add` params: `{"driver": ..., "node-name": ..., <driver options>}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct BlockdevOptions(pub Map<String, Value>);

/// `blockdev-add`: opens a node (and its inline children). QEMU requires a node-name at
/// the top (inline children get generated `#blockNNN` names).
pub fn blockdev_add(ctx: &mut Ctx, options: BlockdevOptions) -> Result<Empty, CommandError> {
    if !options.0.contains_key("node-name") {
        return Err(CommandError::invalid_params(
            "'node-name' must be specified for the root node",
        ));
    }
    let options = Value::Object(options.0);
    ctx.change(|g| g.add(&options))?;
    Ok(Empty {})
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node to remove; it must have been added by blockdev-add and be unused.
    pub node_name: String,
}

/// `blockdev-del`: removes a monitor-owned node nobody uses, with the inline children
/// only it had.
pub fn blockdev_del(ctx: &mut Ctx, p: BlockdevDel) -> Result<Empty, CommandError> {
    if ctx.graph.state().by_name(&p.node_name).is_none() {
        return Err(CommandError::new(
            crate::ErrorCode::NotFound,
            format!("Failed to find node with node-name='{}'", p.node_name),
        ));
    }
    ctx.change(|g| g.del(&p.node_name))?;
    Ok(Empty {})
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplaceChild {
    /// The node whose child to replace.
    pub parent: String,
    /// The name of the child edge (`file`, `backing`).
    pub child: String,
    /// The node the edge points to afterwards.
    pub node: String,
}

/// `x-blockdev-replace-child` (Strata extension until `blockdev-reopen` lands).
pub fn replace_child(ctx: &mut Ctx, p: ReplaceChild) -> Result<Empty, CommandError> {
    ctx.change(|g| g.replace_child(&p.parent, &p.child, &p.node))?;
    Ok(Empty {})
}

// ---- the blockdev-add schema ---------------------------------------------------------

/// Options every node takes whatever its driver, handled by the graph (QEMU's
/// BlockdevOptions base), with the values the graph accepts. `read-only` and `cache`
/// are QEMU base options too, but in Strata each driver takes them or not, so they come
/// from the driver's schema.
fn common_options() -> Map<String, Value> {
    let flag = |description: &str| {
        serde_json::json!({
            "description": description,
            "anyOf": [
                {"type": "boolean"},
                {"type": "string", "enum": ["on", "off", "true", "false"]},
            ],
        })
    };
    let mut m = Map::new();
    m.insert(
        "node-name".into(),
        serde_json::json!({
            "description": "The node's name: a letter, then letters, digits, '-', '.' or '_' \
                            (at most 31). Required on the node blockdev-add opens; inline \
                            children without one get a generated name (#blockNNN).",
            "type": "string",
        }),
    );
    m.insert(
        "discard".into(),
        serde_json::json!({
            "description": "Whether discard requests are passed down: ignore (off) or unmap (on).",
            "type": "string",
            "enum": ["ignore", "unmap", "off", "on"],
        }),
    );
    m.insert(
        "detect-zeroes".into(),
        serde_json::json!({
            "description": "Detect writes of zeroes: only 'off' is supported so far.",
            "type": "string",
            "enum": ["off", "on", "unmap"],
        }),
    );
    m.insert(
        "auto-read-only".into(),
        flag("Fall back to read-only when read-write is not possible."),
    );
    m.insert(
        "force-share".into(),
        flag("Share every permission, even those this node's users would not (read-only nodes only)."),
    );
    m
}

impl JsonSchema for BlockdevOptions {
    fn schema_name() -> Cow<'static, str> {
        "BlockdevOptions".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let common_props = common_options();
        let drivers = strata_drivers::options_schemas();
        if drivers.is_empty() {
            return json_schema!({"type": "object", "required": ["driver", "node-name"]});
        }
        let branches: Vec<Value> = drivers
            .into_iter()
            .map(|(driver, schema)| branch(generator, driver, schema, &common_props))
            .collect();
        json_schema!({
            "description": "Node options: 'driver' selects the branch; the options every \
                            node takes (node-name, discard, detect-zeroes, auto-read-only, \
                            force-share) are in each branch.",
            "oneOf": branches,
        })
    }
}

/// One driver's branch: its options, `driver` fixed to its name, the common options,
/// and its definitions moved into the generator (renamed if another driver has a
/// different definition of the same name).
fn branch(
    generator: &mut SchemaGenerator,
    driver: &str,
    schema: Schema,
    common: &Map<String, Value>,
) -> Value {
    let mut schema = schema.to_value();
    let mut defs: Vec<(String, Value)> = Vec::new();
    let mut renames: Vec<(String, String)> = Vec::new();
    if let Value::Object(obj) = &mut schema {
        obj.remove("$schema");
        for key in ["$defs", "definitions"] {
            let Some(Value::Object(found)) = obj.remove(key) else {
                continue;
            };
            for (name, def) in found {
                let mut target = name.clone();
                if generator
                    .definitions()
                    .get(&target)
                    .is_some_and(|d| *d != def)
                {
                    target = format!("{driver}.{name}");
                }
                renames.push((format!("#/{key}/{name}"), format!("#/$defs/{target}")));
                defs.push((target, def));
            }
        }
    }
    for (from, to) in &renames {
        rewrite_refs(&mut schema, from, to);
        for (_, def) in &mut defs {
            rewrite_refs(def, from, to);
        }
    }
    generator.definitions_mut().extend(defs);
    let driver_const = serde_json::json!({
        "description": "The driver that opens the node.",
        "type": "string",
        "const": driver,
    });
    match &mut schema {
        Value::Object(obj) if obj.get("properties").is_some_and(Value::is_object) => {
            let props = obj
                .get_mut("properties")
                .and_then(Value::as_object_mut)
                .expect("BUG: checked above");
            props.insert("driver".to_string(), driver_const);
            for (k, v) in common {
                props.entry(k.clone()).or_insert_with(|| v.clone());
            }
            let required = obj
                .entry("required")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(req) = required {
                for r in ["driver", "node-name"] {
                    if !req.iter().any(|x| x == r) {
                        req.push(r.into());
                    }
                }
            }
            obj.insert("title".to_string(), driver.into());
            schema
        }
        // A driver schema that is not a plain object schema: constrain `driver` beside
        // it rather than guess at its shape.
        _ => serde_json::json!({
            "title": driver,
            "allOf": [schema, {"properties": {"driver": driver_const}, "required": ["driver"]}],
        }),
    }
}

fn rewrite_refs(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(obj) => {
            for (k, child) in obj.iter_mut() {
                if k == "$ref" && child.as_str() == Some(from) {
                    *child = Value::String(to.to_string());
                } else {
                    rewrite_refs(child, from, to);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| rewrite_refs(c, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemars::generate::SchemaSettings;
    use serde_json::json;

    #[test]
    fn branches_share_equal_definitions_and_rename_clashing_ones() {
        let mut generator = SchemaSettings::draft2020_12().into_generator();
        let common = common_options();
        let driver_schema = |def: Value| {
            Schema::try_from(json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"cache": {"$ref": "#/$defs/Cache"}},
                "$defs": {"Cache": def},
            }))
            .unwrap()
        };
        let a = branch(
            &mut generator,
            "a",
            driver_schema(json!({"type": "boolean"})),
            &common,
        );
        let b = branch(
            &mut generator,
            "b",
            driver_schema(json!({"type": "boolean"})),
            &common,
        );
        let c = branch(
            &mut generator,
            "c",
            driver_schema(json!({"type": "string"})),
            &common,
        );
        assert_eq!(a["properties"]["cache"]["$ref"], "#/$defs/Cache");
        assert_eq!(b["properties"]["cache"]["$ref"], "#/$defs/Cache");
        assert_eq!(c["properties"]["cache"]["$ref"], "#/$defs/c.Cache");
        assert_eq!(
            generator.definitions()["c.Cache"],
            json!({"type": "string"})
        );
        assert_eq!(a["properties"]["driver"]["const"], "a");
        assert_eq!(a["required"], json!(["driver", "node-name"]));
        assert!(a.get("$schema").is_none() && a.get("$defs").is_none());
        // A schema that is not a plain object schema is constrained beside, not edited.
        let odd = branch(
            &mut generator,
            "odd",
            Schema::try_from(json!({"anyOf": [{"type": "object"}]})).unwrap(),
            &common,
        );
        assert_eq!(odd["allOf"][1]["properties"]["driver"]["const"], "odd");
    }
}
