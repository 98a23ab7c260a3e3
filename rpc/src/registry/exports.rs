//! NBD exports: `nbd-server-start`, `nbd-server-stop`, `block-export-add`,
//! `block-export-del`, `query-block-exports` (QEMU's names, arguments and messages),
//! plus `query-nbd-server` (Strata's: where the server listens, for a TCP port 0).
//!
//! An export is a graph user taking QEMU's export permissions: consistent-read, plus
//! write when writable, sharing everything but resize. While it exists its node cannot
//! be deleted. The server itself ([`strata_drivers::nbd`]) runs on the reactors; these
//! commands only start and stop it and change its export table.

use super::command::Empty;
use super::context::{Ctx, ExportRecord, NbdRecord};
use super::events::ExportDeletedEvent;
use crate::error::{CommandError, ErrorCode};
use crate::server::listener::{Endpoint, Listener};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use strata_drivers::nbd::{ExportSpec, NbdServer, ServerConfig};
use strata_drivers::options;
use strata_engine::Perm;

/// A socket address in either QAPI shape: `SocketAddressLegacy` (QMP's
/// `nbd-server-start`: `{"type": "unix", "data": {"path": ...}}`) or the flat
/// `SocketAddress` (qemu-storage-daemon's `--nbd-server addr.type=unix,addr.path=...`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SocketAddress {
    #[serde(rename = "type")]
    pub kind: SocketType,
    /// The legacy form's wrapper around the fields below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<SocketData>,
    /// Unix socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// TCP host (default 127.0.0.1: loopback unless told otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port (a string in QAPI; a number is accepted). 0 picks a free port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SocketData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SocketType {
    Unix,
    Inet,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Port {
    Number(u16),
    Text(String),
}

impl SocketAddress {
    /// Where to listen.
    pub fn endpoint(&self) -> Result<Endpoint, CommandError> {
        let (path, host, port) = match &self.data {
            Some(d) if self.path.is_none() && self.host.is_none() && self.port.is_none() => {
                (&d.path, &d.host, &d.port)
            }
            Some(_) => {
                return Err(CommandError::invalid_params(
                    "addr: give the address fields either inside 'data' or beside 'type', not both",
                ));
            }
            None => (&self.path, &self.host, &self.port),
        };
        match self.kind {
            SocketType::Unix => {
                if host.is_some() || port.is_some() {
                    return Err(CommandError::invalid_params(
                        "addr: a unix address takes 'path' only",
                    ));
                }
                let path = path.clone().ok_or_else(|| {
                    CommandError::invalid_params("Parameter 'addr.path' is missing")
                })?;
                Ok(Endpoint::Unix(path))
            }
            SocketType::Inet => {
                if path.is_some() {
                    return Err(CommandError::invalid_params(
                        "addr: an inet address takes 'host' and 'port'",
                    ));
                }
                let port = match port {
                    None => {
                        return Err(CommandError::invalid_params(
                            "Parameter 'addr.port' is missing",
                        ));
                    }
                    Some(Port::Number(n)) => *n,
                    Some(Port::Text(s)) => s.trim().parse().map_err(|_| {
                        CommandError::invalid_params(format!(
                            "addr.port: '{s}' is not a port number"
                        ))
                    })?,
                };
                let host = host.as_deref().unwrap_or("127.0.0.1");
                let spec = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                crate::server::listener::parse_tcp(&spec)
                    .map(Endpoint::Tcp)
                    .map_err(CommandError::invalid_params)
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerStart {
    /// Where to listen: a unix socket, or TCP (127.0.0.1 unless `host` says otherwise).
    pub addr: SocketAddress,
    /// Most simultaneous clients; 0 (the default) for no limit. Further clients are
    /// disconnected at once.
    #[serde(
        default,
        deserialize_with = "options::opt_number",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::number_schema")]
    pub max_connections: Option<u64>,
    /// Seconds a client has to finish the handshake (default 10; 0: no limit).
    #[serde(
        default,
        deserialize_with = "options::opt_number",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::number_schema")]
    pub handshake_max_seconds: Option<u64>,
    /// Not supported: Strata's NBD server has no TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Not supported (no TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

pub fn nbd_server_start(ctx: &mut Ctx, p: NbdServerStart) -> Result<Empty, CommandError> {
    if ctx.nbd.is_some() {
        return Err(CommandError::invalid_params("NBD server already running"));
    }
    if p.tls_creds.is_some() || p.tls_authz.is_some() {
        return Err(CommandError::new(
            ErrorCode::Unsupported,
            "TLS is not supported by Strata's NBD server",
        ));
    }
    let endpoint = p.addr.endpoint()?;
    let max_connections = u32::try_from(p.max_connections.unwrap_or(0))
        .map_err(|_| CommandError::invalid_params("max-connections is too large"))?;
    let handshake_secs = p.handshake_max_seconds.unwrap_or(10);
    if handshake_secs > u64::from(u32::MAX) {
        return Err(CommandError::invalid_params(
            "handshake-max-seconds is too large (at most 4294967295)",
        ));
    }
    let handshake_max = Duration::from_secs(handshake_secs);
    let listener = Listener::bind(&endpoint).map_err(|e| CommandError::new(ErrorCode::Io, e))?;
    let endpoint = listener.endpoint().clone();
    let (fd, file) = listener.into_parts();
    let server = NbdServer::start(
        ctx.graph.engine(),
        fd,
        ServerConfig {
            max_connections,
            handshake_max,
        },
    );
    ctx.nbd = Some(NbdRecord {
        server,
        endpoint,
        params: p,
        _file: file,
    });
    Ok(Empty {})
}

pub fn nbd_server_stop(ctx: &mut Ctx, _: Empty) -> Result<Empty, CommandError> {
    let Some(record) = ctx.nbd.take() else {
        return Err(CommandError::invalid_params("NBD server not running"));
    };
    let NbdRecord {
        mut server, _file, ..
    } = record;
    for spec in server.shut_down() {
        if let Some(e) = ctx.exports.get_mut(&spec.id) {
            e.removing = true;
        }
    }
    // The listening socket is closed and its file goes now, so a new server can take
    // the path at once; clients still finishing their requests keep the old server.
    drop(_file);
    ctx.stopped_nbd.push(server);
    retire_finished(ctx);
    Ok(Empty {})
}

/// Releases every withdrawn export none of whose clients is left: detaches its user and
/// emits `BLOCK_EXPORT_DELETED`. Also drops stopped servers with no clients left. Runs
/// after the commands that withdraw exports and periodically on the admin thread.
pub fn retire_finished(ctx: &mut Ctx) {
    let done: Vec<String> = {
        let servers: Vec<&NbdServer> = ctx
            .nbd
            .iter()
            .map(|r| &r.server)
            .chain(ctx.stopped_nbd.iter())
            .collect();
        ctx.exports
            .iter()
            .filter(|(id, e)| e.removing && servers.iter().all(|s| s.connections_of(id) == 0))
            .map(|(id, _)| id.clone())
            .collect()
    };
    for id in done {
        let record = ctx.exports.remove(&id).expect("BUG: export listed above");
        if let Err(e) = ctx.change(|g| g.detach_user(record.user)) {
            // Keep it listed (and retried) rather than forget a user that still holds
            // permissions.
            eprintln!("strata: releasing export '{id}' failed: {e}");
            ctx.exports.insert(id, record);
            continue;
        }
        ctx.events.emit(
            ExportDeletedEvent::NAME,
            serde_json::to_value(ExportDeletedEvent { id: id.clone() })
                .expect("BUG: event data serializes"),
        );
    }
    ctx.stopped_nbd.retain(|s| s.connections() > 0);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExportType {
    Nbd,
    Fuse,
    VhostUserBlk,
    VduseBlk,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportAdd {
    /// Only `nbd` is supported.
    #[serde(rename = "type")]
    pub kind: ExportType,
    /// The export's id, unique among exports.
    pub id: String,
    /// The node to export.
    pub node_name: String,
    /// The name clients ask for (default: the node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_OPT_INFO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether clients may write (default false).
    #[serde(
        default,
        deserialize_with = "options::opt_boolean",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::boolean_schema")]
    pub writable: Option<bool>,
    /// Not supported when true (flush after every write).
    #[serde(
        default,
        deserialize_with = "options::opt_boolean",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::boolean_schema")]
    pub writethrough: Option<bool>,
    /// Accepted for compatibility and ignored: every reactor serves exports, and
    /// connections are spread over them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread: Option<serde_json::Value>,
    /// Accepted for compatibility and ignored (see `iothread`).
    #[serde(
        default,
        deserialize_with = "options::opt_boolean",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::boolean_schema")]
    pub fixed_iothread: Option<bool>,
    /// Accepted for compatibility: Strata has no inactive nodes.
    #[serde(
        default,
        deserialize_with = "options::opt_boolean",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::boolean_schema")]
    pub allow_inactive: Option<bool>,
    /// Dirty bitmaps to export: not supported yet (must be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<serde_json::Value>>,
    /// `qemu:allocation-depth`: not supported yet (must be false).
    #[serde(
        default,
        deserialize_with = "options::opt_boolean",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "options::boolean_schema")]
    pub allocation_depth: Option<bool>,
}

pub fn block_export_add(ctx: &mut Ctx, p: BlockExportAdd) -> Result<Empty, CommandError> {
    if p.kind != ExportType::Nbd {
        let kind = serde_json::to_value(p.kind).expect("BUG: export type serializes");
        return Err(CommandError::new(
            ErrorCode::Unsupported,
            format!("Export type {kind} is not supported by Strata (only nbd)"),
        ));
    }
    let unsupported = |what: &str| {
        Err(CommandError::new(
            ErrorCode::Unsupported,
            format!("{what} is not supported by Strata's NBD server yet"),
        ))
    };
    if p.writethrough == Some(true) {
        return unsupported("writethrough");
    }
    if p.bitmaps.as_ref().is_some_and(|b| !b.is_empty()) {
        return unsupported("Exporting dirty bitmaps");
    }
    if p.allocation_depth == Some(true) {
        return unsupported("allocation-depth");
    }
    if ctx.nbd.is_none() {
        return Err(CommandError::invalid_params("NBD server not running"));
    }
    if ctx.exports.contains_key(&p.id) {
        return Err(CommandError::invalid_params(format!(
            "Block export id '{}' is already in use",
            p.id
        )));
    }
    let name = p.name.clone().unwrap_or_else(|| p.node_name.clone());
    if name.len() > strata_drivers::nbd::proto::MAX_STRING {
        return Err(CommandError::invalid_params(
            "export name too long to send to clients",
        ));
    }
    let description = p.description.clone().unwrap_or_default();
    if description.len() > strata_drivers::nbd::proto::MAX_STRING {
        return Err(CommandError::invalid_params(
            "export description too long to send to clients",
        ));
    }
    let writable = p.writable.unwrap_or(false);
    let perm = if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    let shared = Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED;
    let desc = format!("block export '{}'", p.id);
    let (user, node) = ctx.change(|g| g.attach_user(desc, &p.node_name, perm, shared))?;
    let nbd = ctx.nbd.as_ref().expect("BUG: checked above");
    let added = nbd.server.add_export(ExportSpec {
        id: p.id.clone(),
        name,
        description,
        node,
        user,
        writable,
    });
    if let Err(e) = added {
        let _ = ctx.change(|g| g.detach_user(user));
        return Err(e.into());
    }
    ctx.exports.insert(
        p.id.clone(),
        ExportRecord {
            user,
            params: p,
            removing: false,
        },
    );
    Ok(Empty {})
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExportDelMode {
    /// Refuse while clients are connected.
    #[default]
    Safe,
    /// Disconnect the clients at once (requests already running finish, unanswered).
    Hard,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportDel {
    pub id: String,
    #[serde(default)]
    pub mode: ExportDelMode,
}

/// Withdraws the export at once; it is released (its node's permissions dropped,
/// `BLOCK_EXPORT_DELETED` emitted) when its last client is gone: right away if it has
/// none, otherwise once their requests in flight have finished (`shutting-down` in
/// `query-block-exports` meanwhile), as QEMU does.
pub fn block_export_del(ctx: &mut Ctx, p: BlockExportDel) -> Result<Empty, CommandError> {
    let not_found = || {
        CommandError::new(
            ErrorCode::NotFound,
            format!("Export '{}' is not found", p.id),
        )
    };
    let record = ctx.exports.get(&p.id).ok_or_else(not_found)?;
    if record.removing {
        return Err(CommandError::invalid_params(format!(
            "Export '{}' is already shutting down",
            p.id
        )));
    }
    let nbd = ctx.nbd.as_ref().ok_or_else(not_found)?;
    nbd.server
        .remove_export(&p.id, p.mode == ExportDelMode::Hard)?;
    ctx.exports
        .get_mut(&p.id)
        .expect("BUG: looked up above")
        .removing = true;
    retire_finished(ctx);
    Ok(Empty {})
}

/// One entry of `query-block-exports` (QEMU's `BlockExportInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    #[serde(rename = "type")]
    pub kind: ExportType,
    pub id: String,
    pub node_name: String,
    /// Removed, waiting for its clients' requests in flight to finish.
    pub shutting_down: bool,
}

pub fn query_block_exports(ctx: &mut Ctx, _: Empty) -> Result<Vec<BlockExportInfo>, CommandError> {
    let state = ctx.graph.state();
    Ok(ctx
        .exports
        .iter()
        .map(|(id, r)| BlockExportInfo {
            kind: ExportType::Nbd,
            id: id.clone(),
            node_name: state
                .users
                .get(&r.user)
                .map(|u| state.node(u.node).name.clone())
                .unwrap_or_default(),
            shutting_down: r.removing,
        })
        .collect())
}

/// `query-nbd-server`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerInfo {
    pub running: bool,
    /// Where it listens (a TCP port 0 resolved): a unix path or `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Clients connected now.
    pub connections: usize,
    /// Set if the server stopped accepting clients by itself (an unexpected `accept`
    /// failure); existing clients are still served. `nbd-server-stop` and a new
    /// `nbd-server-start` recover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn query_nbd_server(ctx: &mut Ctx, _: Empty) -> Result<NbdServerInfo, CommandError> {
    Ok(match &ctx.nbd {
        None => NbdServerInfo {
            running: false,
            addr: None,
            connections: 0,
            error: None,
        },
        Some(r) => NbdServerInfo {
            running: true,
            addr: Some(match &r.endpoint {
                Endpoint::Unix(p) => p.display().to_string(),
                Endpoint::Tcp(a) => a.to_string(),
            }),
            connections: r.server.connections(),
            error: r.server.accept_error(),
        },
    })
}
