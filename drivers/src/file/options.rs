//! `file` options, with QEMU's names (`blockdev-add driver=file`).

use crate::options;
pub use crate::options::CacheOptions;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer};

/// `file` options.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileOptions {
    /// Path of the host file or block device.
    #[serde(deserialize_with = "filename")]
    #[schemars(schema_with = "filename_schema")]
    pub filename: String,
    /// How the host page cache is used.
    #[serde(default)]
    pub cache: CacheOptions,
    /// Open the file read-only; the node refuses writes.
    #[serde(default, deserialize_with = "options::read_only")]
    #[schemars(schema_with = "options::boolean_schema")]
    pub read_only: bool,
    /// The I/O backend: only `io_uring` (the default).
    #[serde(default, deserialize_with = "aio")]
    #[schemars(schema_with = "aio_schema")]
    pub aio: Aio,
    /// Whether to take QEMU-compatible image locks (OFD locks on bytes 100-103 and
    /// 200-203): `auto` (default) if the kernel has OFD locks, `on` always, `off` never.
    #[serde(default, deserialize_with = "locking")]
    pub locking: Locking,
}

/// `aio`: how I/O is submitted. Strata always uses io_uring; QEMU's other values are
/// refused with a message rather than silently ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    #[default]
    IoUring,
}

/// `locking`: QEMU's `auto` / `on` / `off`.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Locking {
    #[default]
    Auto,
    On,
    Off,
}

fn filename<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    options::named("filename", d, |d| {
        let name = String::deserialize(d)?;
        if name.is_empty() {
            return Err(de::Error::custom("must not be empty"));
        }
        Ok(name)
    })
}

fn aio<'de, D: Deserializer<'de>>(d: D) -> Result<Aio, D::Error> {
    match String::deserialize(d)?.as_str() {
        "io_uring" => Ok(Aio::IoUring),
        other => Err(de::Error::custom(format_args!(
            "aio={other} is not supported; Strata uses io_uring"
        ))),
    }
}

fn locking<'de, D: Deserializer<'de>>(d: D) -> Result<Locking, D::Error> {
    options::named("locking", d, Locking::deserialize)
}

fn filename_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "minLength": 1})
}

fn aio_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["io_uring"]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<FileOptions, strata_engine::Error> {
        crate::parse_options("file", v)
    }

    #[test]
    fn defaults_are_buffered_flushing_read_write_io_uring() {
        let o = parse(json!({"filename": "/x"})).unwrap();
        assert_eq!(
            o.cache,
            CacheOptions {
                direct: false,
                no_flush: false
            }
        );
        assert!(!o.read_only);
        assert_eq!((o.aio, o.locking), (Aio::IoUring, Locking::Auto));
    }

    #[test]
    fn keyval_strings_and_json_values_both_parse() {
        let kv = crate::keyval::parse(
            "filename=/x,cache.direct=on,cache.no-flush=off,read-only=on,locking=off",
        )
        .unwrap();
        let o = parse(kv).unwrap();
        assert_eq!(
            o.cache,
            CacheOptions {
                direct: true,
                no_flush: false
            }
        );
        assert!(o.read_only);
        assert_eq!(o.locking, Locking::Off);
        let o =
            parse(json!({"filename": "/x", "cache": {"direct": true}, "aio": "io_uring"})).unwrap();
        assert!(o.cache.direct);
    }

    #[test]
    fn errors_name_the_option() {
        for (v, needle) in [
            (
                json!({"filename": "/x", "cache": {"direct": "maybe"}}),
                "cache.direct",
            ),
            (
                json!({"filename": "/x", "cache": {"no-flush": 3}}),
                "cache.no-flush",
            ),
            (
                json!({"filename": "/x", "read-only": "perhaps"}),
                "read-only",
            ),
            (json!({"filename": "/x", "locking": "sometimes"}), "locking"),
            (
                json!({"filename": "/x", "aio": "threads"}),
                "aio=threads is not supported; Strata uses io_uring",
            ),
            (json!({"filename": "/x", "aio": "native"}), "aio=native"),
            (json!({"filename": ""}), "filename"),
            (json!({}), "filename"),
            (
                json!({"filename": "/x", "cache": {"writeback": true}}),
                "writeback",
            ),
            (json!({"filename": "/x", "discard": "unmap"}), "discard"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.kind, strata_engine::ErrorKind::InvalidArgument);
            assert!(
                e.message.contains(needle),
                "{v}: '{e}' should mention '{needle}'"
            );
        }
    }
}
