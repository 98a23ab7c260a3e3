//! One client connection on its reactor: the fixed newstyle handshake (option haggling),
//! then the transmission phase ([`super::transmission`]).
//!
//! Every reply the handshake sends is built in full and sent whole; options are read
//! whole (at most [`MAX_OPTION_LEN`] bytes, longer ones end the connection after an
//! `NBD_REP_ERR_TOO_BIG`). Malformed options get `NBD_REP_ERR_INVALID` and the
//! haggling goes on; anything that breaks the framing (wrong magic, unknown client
//! flags) ends the connection, as the protocol says.

use super::proto::*;
use super::server::{ExportSpec, Shared};
use super::socket::{Reader, send_bytes};
use super::transmission;
use std::cell::Cell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use strata_engine::graph::Blk;
use strata_engine::reactor;
use strata_engine::{DriverInfo, Op};

/// Context id of `base:allocation` in this server.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled.
pub struct Session {
    pub export: Arc<ExportSpec>,
    pub blk: Blk,
    pub structured: bool,
    /// Extended headers (implies structured replies).
    pub extended: bool,
    pub base_allocation: bool,
}

/// Serves one accepted connection until it ends, then deregisters it.
pub(super) async fn serve(shared: Arc<Shared>, id: u64, fd: Arc<OwnedFd>) {
    let raw = fd.as_raw_fd();
    let negotiated = Rc::new(Cell::new(false));
    let limit = shared.config.handshake_max;
    if !limit.is_zero() {
        // Holds the socket weakly: a connection that ended closes at once, not when
        // the deadline passes.
        let (done, fd) = (negotiated.clone(), Arc::downgrade(&fd));
        reactor::spawn(async move {
            reactor::sleep(limit).await;
            if let Some(fd) = fd.upgrade()
                && !done.get()
            {
                // SAFETY: shutdown(2) on a socket the upgraded Arc keeps open.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        });
    }
    // Deregisters however the task ends (a panic included: the executor drops it), so
    // the socket closes and nobody waits for this connection forever.
    let _registered = Registered(shared.clone(), id);
    let mut reader = Reader::new(raw);
    let session = negotiate(&shared, id, raw, &mut reader).await;
    negotiated.set(true);
    if let Some(session) = session {
        transmission::run(session, reader, fd).await;
    }
}

struct Registered(Arc<Shared>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.unregister(self.1);
    }
}

/// Why the handshake ended without a session.
enum End {
    /// The connection is to be closed (the peer left, aborted, or broke the protocol).
    Close,
}

async fn negotiate(shared: &Shared, id: u64, fd: RawFd, r: &mut Reader) -> Option<Session> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send_bytes(fd, &hello).await.ok()?;
    r.fill(4).await.ok()?;
    let client_flags = be32(r.take(4));
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        || client_flags & FLAG_C_FIXED_NEWSTYLE == 0
    {
        // Unknown flags must end the connection; plain (unfixed) newstyle clients are
        // not served: every client in use today speaks fixed newstyle.
        return None;
    }
    let mut h = Haggle {
        shared,
        id,
        fd,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        extended: false,
        meta: None,
    };
    loop {
        match h.option(r).await {
            Ok(Some(session)) => return Some(session),
            Ok(None) => {}
            Err(End::Close) => return None,
        }
    }
}

struct Haggle<'a> {
    shared: &'a Shared,
    id: u64,
    fd: RawFd,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// The export name `base:allocation` was selected for, if it was.
    meta: Option<String>,
}

impl Haggle<'_> {
    async fn send(&self, bytes: &[u8]) -> Result<(), End> {
        send_bytes(self.fd, bytes).await.map_err(|_| End::Close)
    }

    async fn reply(&self, option: u32, kind: u32, data: &[u8]) -> Result<(), End> {
        let mut out = Vec::with_capacity(20 + data.len());
        option_reply(&mut out, option, kind, data);
        self.send(&out).await
    }

    async fn error(&self, option: u32, kind: u32, message: &str) -> Result<(), End> {
        self.reply(option, kind, message.as_bytes()).await
    }

    /// Handles one option; a session when the client moves to transmission.
    async fn option(&mut self, r: &mut Reader) -> Result<Option<Session>, End> {
        r.fill(16).await.map_err(|_| End::Close)?;
        let head = r.take(16);
        let (magic, option, len) = (be64(&head[0..8]), be32(&head[8..12]), be32(&head[12..16]));
        if magic != IHAVEOPT {
            return Err(End::Close);
        }
        if len > MAX_OPTION_LEN {
            self.error(option, REP_ERR_TOO_BIG, "option too long")
                .await?;
            return Err(End::Close);
        }
        let len = len as usize;
        r.fill(len).await.map_err(|_| End::Close)?;
        let data = r.take(len).to_vec();
        match option {
            OPT_EXPORT_NAME => self.export_name(&data).await.map(Some),
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = self.reply(option, REP_ACK, &[]).await;
                Err(End::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return self
                        .error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await
                        .map(|_| None);
                }
                for e in self.shared.list() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    self.reply(option, REP_SERVER, &d).await?;
                }
                self.reply(option, REP_ACK, &[]).await.map(|_| None)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, &data).await,
            OPT_STRUCTURED_REPLY if self.extended => self
                .error(
                    option,
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers are negotiated already",
                )
                .await
                .map(|_| None),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if self.structured {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    )
                    .await?;
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]).await?;
                }
                Ok(None)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )
                    .await?;
                } else if self.extended {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    // Extended headers carry structured replies.
                    self.extended = true;
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]).await?;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, &data).await.map(|_| None)
            }
            OPT_STARTTLS => self
                .error(option, REP_ERR_UNSUP, "TLS is not supported by this server")
                .await
                .map(|_| None),
            _ => self
                .error(option, REP_ERR_UNSUP, "unknown option")
                .await
                .map(|_| None),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists; an unknown name closes.
    async fn export_name(&mut self, data: &[u8]) -> Result<Session, End> {
        let name = std::str::from_utf8(data).map_err(|_| End::Close)?;
        let (session, info) = self.open(name).map_err(|_| End::Close)?;
        let mut out = Vec::with_capacity(10 + 124);
        out.extend_from_slice(&info.size.to_be_bytes());
        out.extend_from_slice(&transmission_flags(&session, &info).to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        self.send(&out).await?;
        Ok(session)
    }

    /// Opens export `name` on this reactor and attaches the connection to it; on
    /// failure, the option error to send.
    fn open(&self, name: &str) -> Result<(Session, DriverInfo), u32> {
        let (export, blk, info) = self.look(name)?;
        self.shared.attach(self.id, &export)?;
        let base_allocation = self.meta.as_deref() == Some(name);
        Ok((
            Session {
                export,
                blk,
                structured: self.structured,
                extended: self.extended,
                base_allocation,
            },
            info,
        ))
    }

    /// Export `name` and its node on this reactor, without attaching.
    fn look(&self, name: &str) -> Result<(Arc<ExportSpec>, Blk, DriverInfo), u32> {
        if self.shared.stopping() {
            return Err(REP_ERR_SHUTDOWN);
        }
        let export = self.shared.find(name).ok_or(REP_ERR_UNKNOWN)?;
        let blk = Blk::open(export.user, export.node).ok_or(REP_ERR_UNKNOWN)?;
        let info = blk.node().info().ok_or(REP_ERR_UNKNOWN)?;
        Ok((export, blk, info))
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, End> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
                .await?;
            return Ok(None);
        };
        // INFO only looks; GO attaches the connection to the export.
        let found = if option == OPT_GO {
            self.open(&name).map(|(s, info)| {
                let spec = s.export.clone();
                (Some(s), info, spec)
            })
        } else {
            self.look(&name).map(|(spec, _, info)| (None, info, spec))
        };
        let (session, info, spec) = match found {
            Ok(found) => found,
            Err(REP_ERR_SHUTDOWN) => {
                self.error(option, REP_ERR_SHUTDOWN, "server shutting down")
                    .await?;
                return Ok(None);
            }
            Err(_) => return self.unknown(option, &name).await,
        };
        let flags = flags_for(&spec, &info, self.structured);
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&info.size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &d).await?;
        if requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(spec.name.as_bytes());
            self.reply(option, REP_INFO, &d).await?;
        }
        if requests.contains(&INFO_DESCRIPTION) && !spec.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(spec.description.as_bytes());
            self.reply(option, REP_INFO, &d).await?;
        }
        // Always sent (as QEMU does), with the node's alignment as the minimum: requests
        // that ignore it are refused (Strata does not pad them yet).
        let (min, preferred, max) = block_sizes(&info);
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&min.to_be_bytes());
        d.extend_from_slice(&preferred.to_be_bytes());
        d.extend_from_slice(&max.to_be_bytes());
        self.reply(option, REP_INFO, &d).await?;
        self.reply(option, REP_ACK, &[]).await?;
        Ok(session)
    }

    async fn unknown(&self, option: u32, name: &str) -> Result<Option<Session>, End> {
        let msg = format!("export '{}' not present", truncate(name));
        self.error(option, REP_ERR_UNKNOWN, &msg).await?;
        Ok(None)
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), End> {
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return self
                .error(
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_SET_META_CONTEXT needs structured replies first",
                )
                .await;
        }
        if option == OPT_SET_META_CONTEXT {
            // A SET replaces the selection, also when it fails.
            self.meta = None;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self
                .error(option, REP_ERR_INVALID, "malformed meta context request")
                .await;
        };
        if self.shared.find(&name).is_none() {
            self.unknown(option, &name).await?;
            return Ok(());
        }
        let selected = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
            true
        } else {
            queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:"))
        };
        if option == OPT_SET_META_CONTEXT {
            self.meta = selected.then(|| name.clone());
        }
        if selected {
            // LIST answers with id 0, as the protocol asks; SET with the id replies use.
            let id = if option == OPT_SET_META_CONTEXT {
                BASE_ALLOCATION_ID
            } else {
                0
            };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &d).await?;
        }
        self.reply(option, REP_ACK, &[]).await
    }
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string with a 32-bit length in front, at `d[at..]`: the string and the offset
/// after it. `None` if it is cut short, too long or not UTF-8.
fn parse_string(d: &[u8], at: usize) -> Option<(String, usize)> {
    let len = be32(d.get(at..at + 4)?) as usize;
    if len > MAX_STRING {
        return None;
    }
    let text = std::str::from_utf8(d.get(at + 4..at + 4 + len)?).ok()?;
    Some((text.to_string(), at + 4 + len))
}

/// `NBD_OPT_INFO`/`GO` data: name length, name, number of info requests, requests.
fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, at) = parse_string(d, 0)?;
    let rest = &d[at..];
    let n = be16(rest.get(0..2)?) as usize;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    let requests = rest[2..].chunks_exact(2).map(be16).collect();
    Some((name, requests))
}

/// Meta context data: name length, name, number of queries, queries (length + text).
fn parse_meta_request(d: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut at) = parse_string(d, 0)?;
    let n = be32(d.get(at..at + 4)?) as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let (query, next) = parse_string(d, at)?;
        queries.push(query);
        at = next;
    }
    (at == d.len()).then_some((name, queries))
}

/// Minimum, preferred and maximum block size for an export of a node with `info`.
fn block_sizes(info: &DriverInfo) -> (u32, u32, u32) {
    let align = info.request_alignment.max(1);
    let min = align;
    let preferred = align.max(4096);
    let max = u64::from(MAX_PAYLOAD).min(info.max_transfer.max(u64::from(align))) as u32;
    (min, preferred, max.max(preferred))
}

fn transmission_flags(s: &Session, info: &DriverInfo) -> u16 {
    flags_for(&s.export, info, s.structured)
}

/// The transmission flags of an export: what its node supports, minus writes for a
/// read-only export. Multi-conn is safe because every connection reaches the same
/// node, whose flush covers every completed write whichever reactor it came through.
fn flags_for(spec: &ExportSpec, info: &DriverInfo, structured: bool) -> u16 {
    let ops = info.ops;
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    if ops.supports(Op::Flush) {
        f |= FLAG_SEND_FLUSH;
    }
    if ops.fua() {
        // Advertised on read-only exports too, as QEMU does (it then has no effect).
        f |= FLAG_SEND_FUA;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if !spec.writable {
        return f | FLAG_READ_ONLY;
    }
    if ops.supports(Op::Discard) {
        f |= FLAG_SEND_TRIM;
    }
    if ops.supports(Op::WriteZeroes) {
        f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_reject_inconsistent_lengths() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("disk".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        let mut lying = 400u32.to_be_bytes().to_vec();
        lying.extend_from_slice(&d[4..]);
        assert_eq!(parse_info_request(&lying), None);
    }

    #[test]
    fn meta_requests_parse() {
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"e");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:b"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let (name, q) = parse_meta_request(&d).unwrap();
        assert_eq!(name, "e");
        assert_eq!(q, vec!["base:allocation", "qemu:dirty-bitmap:b"]);
        assert_eq!(parse_meta_request(&d[..d.len() - 2]), None);
    }
}
