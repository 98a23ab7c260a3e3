//! Option value parsing shared by every driver's options struct.
//!
//! Options arrive either as JSON (RPC, `--blockdev '{...}'`) or as keyval strings
//! (`size=1G,read-zeroes=on`). These serde helpers accept both: numbers as JSON numbers
//! or strings with QEMU's size suffixes, booleans as JSON booleans or `on`/`off`/`true`/
//! `false`.
//!
//! Each helper has a JSON Schema twin (`size_schema`, `boolean_schema`, ...) that the
//! options structs name with `#[schemars(schema_with = ...)]`, so the schema the RPC layer
//! publishes accepts exactly the value shapes serde accepts. Strings are only typed, not
//! patterned: the driver checks their spelling and names the option in its error.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

/// Parses a size with an optional binary suffix (`512`, `4k`, `1M`, `2G`, `1T`), as QEMU.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected e.g. 4096, 4k, 1G"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("invalid size suffix in '{s}': use k, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses QEMU's boolean spellings.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid boolean '{s}': use on or off")),
    }
}

/// A number or a string, with an error that says what was expected (serde's untagged
/// enums only say that nothing matched).
fn num_or_str<'de, D: Deserializer<'de>>(
    d: D,
    what: &str,
) -> Result<Result<u64, String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .map(Ok)
            .ok_or_else(|| de::Error::custom(format_args!("expected {what}, got {n}"))),
        Value::String(s) => Ok(Err(s)),
        other => Err(de::Error::custom(format_args!(
            "expected {what}, got {other}"
        ))),
    }
}

/// `#[serde(deserialize_with = "options::size")]` for byte sizes.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match num_or_str(d, "a size (a number of bytes, or a string like 4k or 1G)")? {
        Ok(n) => Ok(n),
        Err(s) => parse_size(&s).map_err(de::Error::custom),
    }
}

/// `#[serde(deserialize_with = "options::opt_size")]` for optional byte sizes.
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

/// `#[serde(deserialize_with = "options::number")]` for plain integers (no suffixes).
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match num_or_str(d, "a non-negative integer")? {
        Ok(n) => Ok(n),
        Err(s) => s
            .trim()
            .parse()
            .map_err(|_| de::Error::custom(format!("invalid number '{s}'"))),
    }
}

/// `#[serde(deserialize_with = "options::opt_number")]` for optional plain integers.
pub fn opt_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    number(d).map(Some)
}

/// `#[serde(deserialize_with = "options::opt_boolean")]` for optional booleans.
pub fn opt_boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    boolean(d).map(Some)
}

/// `#[serde(deserialize_with = "options::boolean")]`.
pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) => parse_bool(&s).map_err(de::Error::custom),
        other => Err(de::Error::custom(format_args!(
            "expected a boolean (true/false or on/off), got {other}"
        ))),
    }
}

/// `#[serde(deserialize_with = "options::read_only")]`: the `read-only` option every
/// driver takes (QEMU's common `read-only`).
pub fn read_only<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    named("read-only", d, boolean)
}

/// `#[serde(deserialize_with = "options::child")]` for a child given as a node name or
/// as an options object (QEMU's `BlockdevRef`); the driver opens it through its
/// `OpenContext`.
pub fn child<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    match Value::deserialize(d)? {
        v @ (Value::String(_) | Value::Object(_)) => Ok(v),
        other => Err(de::Error::custom(format_args!(
            "expected a node name or an options object, got {other}"
        ))),
    }
}

/// Schema of [`size`] and [`opt_size`]: a byte count or a string such as `4k` or `1G`.
pub fn size_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "a size in bytes: a number, or a string with an optional suffix k, M, G or T (binary)",
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string"}
        ]
    })
}

/// Schema of [`number`]: a non-negative integer, as a number or a decimal string.
pub fn number_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string"}
        ]
    })
}

/// Schema of [`boolean`]: a JSON boolean or one of QEMU's spellings.
pub fn boolean_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "anyOf": [
            {"type": "boolean"},
            {"type": "string", "enum": ["on", "off", "true", "false", "yes", "no"]}
        ]
    })
}

/// Schema of [`child`]: a node name or an options object.
pub fn child_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "the child node: the node-name of an existing node, or the options of a new one",
        "anyOf": [
            {"type": "string"},
            {"type": "object"}
        ]
    })
}

/// `cache.*` options (QEMU's common options: every driver accepts them; only `file`
/// has a host page cache to bypass and flushes to skip; a format or filter node's
/// `cache` is inherited by children given inline).
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheOptions {
    /// Bypass the host page cache (`O_DIRECT`); requests must then be aligned.
    #[serde(default, deserialize_with = "direct")]
    #[schemars(schema_with = "boolean_schema")]
    pub direct: bool,
    /// Ignore flushes (and FUA): fast and unsafe, for scratch images.
    #[serde(default, deserialize_with = "no_flush")]
    #[schemars(schema_with = "boolean_schema")]
    pub no_flush: bool,
}

fn direct<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    named("cache.direct", d, boolean)
}

fn no_flush<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    named("cache.no-flush", d, boolean)
}

/// Runs `parse` on an option's value and names the option in its error, so a person
/// reads `option 'cache.direct': invalid boolean 'maybe'` rather than just the value.
/// Drivers wrap their fields' parsers with it (serde does not name the field itself).
pub fn named<'de, D, T>(
    option: &str,
    d: D,
    parse: impl FnOnce(D) -> Result<T, D::Error>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    parse(d).map_err(|e| de::Error::custom(format_args!("option '{option}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_booleans_in_qemu_spelling() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_bool("on"), Ok(true));
        assert!(parse_bool("maybe").is_err());
    }
}
