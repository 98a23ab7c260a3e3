//! `query-named-block-nodes`: one QEMU `BlockDeviceInfo` per node, field names exactly as
//! QEMU 10.0 spells them (a mix of `node-name` and `backing_file_depth`).
//!
//! Filenames follow QEMU's `bdrv_refresh_filename`: a protocol node reports its
//! `filename`; a `null-co` (or `memory`) node without strong options `null-co://`; a
//! node with one primary child and no strong options of its own its child's filename
//! (a plain `raw` over a file is the file); anything else `json:{...}` of its strong
//! options with children inline.

use super::context::Ctx;
use super::options;
use crate::error::CommandError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use strata_engine::graph::State;
use strata_engine::{ChildRole, NodeId};

#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryNamedBlockNodes {
    /// Leave out `backing-image` (default false: the backing chain nests, as QEMU).
    /// Also `on`/`off` strings, as `strata-rpc key=value` sends them.
    #[serde(default, deserialize_with = "strata_drivers::options::boolean")]
    #[schemars(schema_with = "strata_drivers::options::boolean_schema")]
    pub flat: bool,
}

/// QEMU's `BlockDeviceInfo`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The driver.
    pub drv: String,
    /// The filename, or `json:{...}` when the options do not reduce to one.
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// The backing node's filename.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// How many backing nodes are below this one.
    pub backing_file_depth: u64,
    pub active: bool,
    pub encrypted: bool,
    /// off, on or unmap.
    pub detect_zeroes: String,
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
    pub image: ImageInfo,
    pub cache: BlockdevCacheInfo,
    pub write_threshold: u64,
}

/// QEMU's `ImageInfo`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the image takes on the host, where that is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing node's image, nested unless `flat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// QEMU's `BlockdevCacheInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCacheInfo {
    pub writeback: bool,
    pub direct: bool,
    pub no_flush: bool,
}

pub fn query_named_block_nodes(
    ctx: &mut Ctx,
    p: QueryNamedBlockNodes,
) -> Result<Vec<BlockDeviceInfo>, CommandError> {
    let state = ctx.graph.state();
    Ok(state
        .nodes
        .keys()
        .map(|&id| device_info(state, id, p.flat))
        .collect())
}

fn device_info(state: &State, id: NodeId, flat: bool) -> BlockDeviceInfo {
    let node = state.node(id);
    let backing = state.cow_child(id).map(|b| state.skip_filters(b));
    let flag = |key: &str| {
        node.options
            .get("cache")
            .and_then(|c| c.get(key))
            .is_some_and(is_on)
    };
    BlockDeviceInfo {
        node_name: node.name.clone(),
        drv: node.driver_name().to_string(),
        file: filename(state, id),
        ro: node.read_only(),
        backing_file: backing.map(|b| filename(state, b)),
        backing_file_depth: state.backing_chain(id).len().saturating_sub(1) as u64,
        active: true,
        encrypted: false,
        detect_zeroes: node
            .options
            .get("detect-zeroes")
            .and_then(Value::as_str)
            .unwrap_or("off")
            .to_string(),
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        image: image_info(state, id, flat),
        cache: BlockdevCacheInfo {
            writeback: true,
            direct: flag("direct"),
            no_flush: flag("no-flush"),
        },
        write_threshold: 0,
    }
}

fn image_info(state: &State, id: NodeId, flat: bool) -> ImageInfo {
    let node = state.node(id);
    let backing = state.cow_child(id).map(|b| state.skip_filters(b));
    let backing_name = backing.map(|b| filename(state, b));
    ImageInfo {
        filename: filename(state, id),
        format: node.driver_name().to_string(),
        virtual_size: node.driver.info().size,
        actual_size: actual_size(state, id),
        // QEMU reports the flag for formats (nodes with an image file), not protocols.
        dirty_flag: node
            .children
            .iter()
            .any(|e| e.role.contains(ChildRole::PRIMARY))
            .then_some(false),
        backing_filename: backing_name.clone(),
        full_backing_filename: backing_name,
        backing_image: match backing {
            Some(b) if !flat => Some(Box::new(image_info(state, b, flat))),
            _ => None,
        },
    }
}

/// QEMU's `bdrv_refresh_filename`, for the drivers Strata has.
pub fn filename(state: &State, id: NodeId) -> String {
    let node = state.node(id);
    if let Some(f) = node.options.get("filename").and_then(Value::as_str) {
        return f.to_string();
    }
    let strong = options::has_strong_options(state, id);
    if node.children.is_empty() && !strong {
        return format!("{}://", node.driver_name());
    }
    if !strong
        && let [edge] = node.children.as_slice()
        && edge.role.contains(ChildRole::PRIMARY)
    {
        return filename(state, edge.child);
    }
    format!(
        "json:{}",
        options::qemu_json(&Value::Object(options::full(state, id)))
    )
}

/// Bytes allocated on the host: a file's blocks, or the sum over a node's children.
fn actual_size(state: &State, id: NodeId) -> Option<u64> {
    let node = state.node(id);
    if node.driver_name() == "file" {
        let f = node.options.get("filename")?.as_str()?;
        return std::fs::metadata(f).ok().map(|m| m.blocks() * 512);
    }
    let mut children: Vec<NodeId> = node.children.iter().map(|e| e.child).collect();
    children.sort_unstable();
    children.dedup();
    children
        .into_iter()
        .filter_map(|c| actual_size(state, c))
        .reduce(|a, b| a + b)
}

fn is_on(v: &Value) -> bool {
    matches!(v, Value::Bool(true)) || matches!(v.as_str(), Some("on" | "true" | "yes"))
}
