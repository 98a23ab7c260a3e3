//! `raw`: the raw format, a window onto its `file` child (QEMU's `raw` format driver).
//!
//! ```text
//!   Raw (node, admin thread)                     RawQueue (one per reactor)
//!   options: offset, size, read-only             Child (the file node on this reactor)
//!   file: RwLock<Arc<dyn Driver>> --open_queue-->  request at o  ->  child at offset + o
//!         (replace_child swaps it)                 completion back at o, extents moved
//!                                                  back and clipped to the request
//! ```
//!
//! # Options
//!
//! - `file` (required): the child, a node-name (in a graph) or inline options.
//! - `offset` (default 0): where the window starts in the child.
//! - `size` (default: the child's size minus `offset`, following the child if it is
//!   resized): the window's length.
//! - `read-only` (default off): the node refuses writes. A read-only child makes the
//!   node read-only too.
//!
//! With neither `offset` (or `offset=0`) nor `size` the child is FILTERED|PRIMARY and permissions pass
//! straight through (QEMU: "behaves very much like a filter", though `is_filter` stays
//! false as in QEMU). With either, it is DATA|PRIMARY: the node never lets anyone else
//! resize the child, which would move the window's end under it.
//!
//! # Checks at open (and when the child is replaced)
//!
//! As QEMU: `offset` may not exceed the child's size, `offset + size` must fit in the
//! child, and `size` must be a multiple of 512. Strata adds one rule: `offset` must be a
//! multiple of the child's request alignment. QEMU accepts any offset because its block
//! layer turns misaligned child requests into read-modify-write cycles; Strata does no
//! such thing, so a misaligned window would make every aligned request misaligned at the
//! child (an `O_DIRECT` file with `offset=100` could never be read). Requests themselves
//! are checked against the window by [`Handle`](strata_engine::Handle) (out of range:
//! `EINVAL`, writes past the end `ENOSPC`, as QEMU's `raw_adjust_offset`), so nothing
//! outside the window ever reaches the child.
//!
//! # Cost
//!
//! The child is read under a lock only on the admin thread and when a queue opens, never
//! per request. Without an offset the queue hands requests to the child untouched;
//! with one it adds it on the way down and takes it off on the way up, allocating
//! nothing when the child completes at once.

use crate::options;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::{Arc, RwLock};
use strata_engine::graph::{ChildRole, Children, OpenContext, Perm, default_child_perm};
use strata_engine::{Driver, DriverInfo, Errno, Error, Queue};

mod queue;

#[cfg(test)]
mod tests;

/// QEMU's `BDRV_SECTOR_SIZE`: `size` must be a multiple of it.
const SECTOR: u64 = 512;

/// `raw` options.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOptions {
    /// The child: a node-name or the options of a new node.
    #[serde(deserialize_with = "file")]
    #[schemars(schema_with = "options::child_schema")]
    pub file: Value,
    /// QEMU's common `cache.*` options: accepted, and meaningless without a host file.
    #[serde(default)]
    pub cache: options::CacheOptions,
    /// Where the window starts in the child, in bytes.
    // (skip_serializing_if only keeps `"default": null` out of the schema: null is not
    // accepted.)
    #[serde(
        default,
        deserialize_with = "offset",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::size_schema")]
    pub offset: Option<u64>,
    /// Length of the window in bytes (default: to the end of the child).
    #[serde(
        default,
        deserialize_with = "size",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::size_schema")]
    pub size: Option<u64>,
    /// The node refuses writes.
    #[serde(default, deserialize_with = "options::read_only")]
    #[schemars(schema_with = "options::boolean_schema")]
    pub read_only: bool,
}

impl RawOptions {
    /// The child's role: a filtered child without a window, a data child with one. As
    /// QEMU's `raw_open`, `offset=0` is no window.
    pub fn child_role(&self) -> ChildRole {
        if self.offset.unwrap_or(0) == 0 && self.size.is_none() {
            ChildRole::FILTERED | ChildRole::PRIMARY
        } else {
            ChildRole::DATA | ChildRole::PRIMARY
        }
    }
}

fn file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    options::named("file", d, options::child)
}

fn offset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    options::named("offset", d, options::opt_size)
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    options::named("size", d, options::opt_size)
}

/// A `raw` node.
#[derive(Debug)]
pub struct Raw {
    opts: RawOptions,
    offset: u64,
    /// The child's driver: read when a queue opens and by `info`, swapped by
    /// `replace_child`, all off the data path.
    file: RwLock<Arc<dyn Driver>>,
}

impl Raw {
    /// Opens the `file` child through `ctx`, then checks the window against it.
    pub fn open(opts: RawOptions, ctx: &mut dyn OpenContext) -> Result<Raw, Error> {
        let child = ctx.open_child("file", &opts.file, opts.child_role())?;
        check_window(&opts, &child.info())?;
        Ok(Raw {
            offset: opts.offset.unwrap_or(0),
            opts,
            file: RwLock::new(child),
        })
    }

    /// The options the node was opened with.
    pub fn options(&self) -> &RawOptions {
        &self.opts
    }

    fn child(&self) -> Arc<dyn Driver> {
        self.file
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// QEMU's `raw_apply_options` checks, plus the alignment of the offset.
fn check_window(opts: &RawOptions, child: &DriverInfo) -> Result<(), Error> {
    let offset = opts.offset.unwrap_or(0);
    if offset > child.size {
        return Err(Error::invalid(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({})",
            child.size
        )));
    }
    if let Some(size) = opts.size {
        if child.size - offset < size {
            return Err(Error::invalid(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to \
                 the actual size of the containing file ({})",
                child.size
            )));
        }
        if size % SECTOR != 0 {
            return Err(Error::invalid(format!(
                "Specified size is not multiple of {SECTOR}"
            )));
        }
    }
    let align = u64::from(child.request_alignment.max(1));
    if offset % align != 0 {
        return Err(Error::invalid(format!(
            "Offset ({offset}) is not a multiple of the file's request alignment ({align}): \
             Strata does not read-modify-write, so the window must start on an aligned \
             boundary (or open the file with cache.direct=off)"
        )));
    }
    Ok(())
}

impl Driver for Raw {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn info(&self) -> DriverInfo {
        let child = self.child().info();
        DriverInfo {
            size: self
                .opts
                .size
                .unwrap_or_else(|| child.size.saturating_sub(self.offset)),
            request_alignment: child.request_alignment,
            max_transfer: child.max_transfer,
            ops: child.ops,
            read_only: self.opts.read_only || child.read_only,
        }
    }

    fn open_queue(&self, children: &Children) -> Result<Box<dyn Queue>, Errno> {
        let child = children.get_or_open("file", &*self.child())?;
        Ok(Box::new(queue::RawQueue::new(child, self.offset)))
    }

    /// QEMU's `raw_child_perm`: the default rules, except that write and resize on the
    /// child are taken only when a parent needs them (a data child would otherwise
    /// always take resize with write), so two writable windows (partitions) over one
    /// file coexist.
    fn child_perm(&self, _name: &str, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let writable = !self.info().read_only;
        let (nperm, nshared) = default_child_perm(role, writable, perm, shared);
        let wr = Perm::WRITE | Perm::RESIZE;
        ((nperm & !wr) | (perm & wr), nshared)
    }

    fn check_children(&self) -> Result<(), Error> {
        check_window(&self.opts, &self.child().info())
    }

    fn replace_child(&self, name: &str, child: &Arc<dyn Driver>) -> Result<(), Error> {
        if name != "file" {
            return Err(Error::invalid(format!(
                "driver 'raw' has no child '{name}' (its only child is 'file')"
            )));
        }
        check_window(&self.opts, &child.info())?;
        *self
            .file
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = child.clone();
        Ok(())
    }
}
