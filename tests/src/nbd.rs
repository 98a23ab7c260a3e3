//! A raw NBD client for end-to-end tests: every message of the fixed newstyle handshake
//! and of the transmission phase as bytes on the wire, so a test can be a well-behaved
//! client or exactly the bad peer it wants to be.
//!
//! ```text
//!   Client::connect(addr) -> handshake(): greeting, client flags
//!     option(NBD_OPT_*, data) -> [OptReply]         (every reply up to the final one)
//!     go(name, infos) -> Export { size, flags, .. }  (transmission phase from here)
//!     send_request(req, payload) ... recv() -> Completion, matched by cookie
//!                                   (a simple reply, or structured chunks up to DONE)
//! ```
//!
//! The constants and the rules checked are those of the NBD protocol, doc/proto.md in
//! NetworkBlockDevice/nbd. What the server sends is checked as it is parsed: a wrong
//! magic, a reply to a cookie that is not in flight, a simple reply to a read once
//! structured replies were negotiated, a content chunk outside its request or a
//! successful read that left bytes uncovered is a panic that names the violation.
//! Every socket has read and write timeouts ([`TIMEOUT`]), so a server that hangs fails
//! the test instead of hanging it.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

// Handshake magics (proto.md "Newstyle negotiation", "Fixed newstyle negotiation").
/// `NBDMAGIC`, first in the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second in the greeting and first in every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission: magics, commands, command flags.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types; error chunks have bit 15 set.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Error values ("Error values").
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The longest structured chunk this client accepts (a 32 MiB read and some headroom).
pub const MAX_CHUNK: u32 = (32 << 20) + (64 << 10);

/// Read and write timeout of every client socket.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a server that is to close a connection (after NBD_CMD_DISC, NBD_OPT_ABORT or a
/// protocol violation) may take: a few seconds, not a hang.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Addr {
    /// A Unix socket path (starts with `/`) or `host:port`.
    pub fn parse(s: &str) -> Addr {
        if s.starts_with('/') {
            Addr::Unix(PathBuf::from(s))
        } else {
            Addr::Tcp(
                s.parse()
                    .unwrap_or_else(|e| panic!("NBD address {s:?}: {e}")),
            )
        }
    }

    /// The `nbd=<addr>` token of stratad's "listening" banner.
    pub fn from_banner(banner: &str) -> Option<Addr> {
        let token = banner
            .split_whitespace()
            .find_map(|t| t.strip_prefix("nbd="))?;
        Some(Addr::parse(
            token.trim_matches(|c| matches!(c, ',' | ';' | '"' | '\'')),
        ))
    }
}

/// A Unix or TCP stream.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// True for the errors a read or write gets once the peer has closed the connection.
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
    )
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// `REP_*`.
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }

    /// An ACK or an error ends the replies to one option.
    pub fn is_final(&self) -> bool {
        self.kind == REP_ACK || self.is_error()
    }

    /// An error reply's message (any data it carries), lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What NBD_OPT_INFO / NBD_OPT_GO (or NBD_OPT_EXPORT_NAME) said about an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub fn bytes(&self) -> [u8; 28] {
        request_bytes(REQUEST_MAGIC, self)
    }
}

/// A request header with any `magic` (a bad peer's).
pub fn request_bytes(magic: u32, r: &Request) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&magic.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// One structured reply chunk's header, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    pub flags: u16,
    pub kind: u16,
    pub len: u32,
}

/// The whole reply to one request: a simple reply, or every structured chunk up to the
/// one with `NBD_REPLY_FLAG_DONE`.
#[derive(Debug, Clone)]
pub struct Completion {
    pub request: Request,
    /// 0 on success, else the (first) error value.
    pub error: u32,
    /// The message of the first error chunk.
    pub message: String,
    /// True for a simple reply.
    pub simple: bool,
    /// The structured chunks in the order received (empty for a simple reply).
    pub chunks: Vec<ChunkHead>,
    /// A read's data, assembled from the content chunks (empty when it failed).
    pub data: Vec<u8>,
    /// Block status: (metadata context id, [(length, status flags)]) per chunk.
    pub extents: Vec<(u32, Vec<(u32, u32)>)>,
    /// Byte ranges [start, end) of the request that content chunks covered.
    covered: Vec<(u64, u64)>,
}

impl Completion {
    fn new(request: Request) -> Completion {
        Completion {
            request,
            error: 0,
            message: String::new(),
            simple: false,
            chunks: Vec::new(),
            data: Vec::new(),
            extents: Vec::new(),
            covered: Vec::new(),
        }
    }

    pub fn cookie(&self) -> u64 {
        self.request.cookie
    }

    /// `Ok(())` or `Err(error value)`.
    pub fn result(&self) -> Result<(), u32> {
        if self.error == 0 {
            Ok(())
        } else {
            Err(self.error)
        }
    }

    /// The final chunk of a structured reply.
    pub fn last_chunk(&self) -> Option<ChunkHead> {
        self.chunks.last().copied()
    }
}

/// A client connection.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    /// The handshake flags of the greeting, once read.
    pub handshake_flags: u16,
    /// The client flags sent.
    pub client_flags: u32,
    /// Whether NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    next_cookie: u64,
    inflight: HashMap<u64, Request>,
    partial: HashMap<u64, Completion>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: name, then the information requests.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// (id, name) of an NBD_REP_META_CONTEXT reply.
pub fn meta_context(reply: &OptReply) -> (u32, String) {
    assert_eq!(reply.kind, REP_META_CONTEXT, "{reply:?}");
    assert!(reply.data.len() >= 4, "short META_CONTEXT reply: {reply:?}");
    (
        be32(&reply.data),
        String::from_utf8(reply.data[4..].to_vec()).expect("context names are UTF-8"),
    )
}

/// (name, description) of an NBD_REP_SERVER reply.
pub fn server_entry(reply: &OptReply) -> (String, String) {
    assert_eq!(reply.kind, REP_SERVER, "{reply:?}");
    let d = &reply.data;
    assert!(d.len() >= 4, "short REP_SERVER: {reply:?}");
    let n = be32(d) as usize;
    assert!(
        n <= d.len() - 4,
        "REP_SERVER name length {n} > {}",
        d.len() - 4
    );
    (
        String::from_utf8(d[4..4 + n].to_vec()).expect("export names are UTF-8"),
        String::from_utf8(d[4 + n..].to_vec()).expect("descriptions are UTF-8"),
    )
}

impl Client {
    /// Connects (panics on failure), with [`TIMEOUT`] on reads and writes.
    pub fn connect(addr: &Addr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr:?}: {e}"))
    }

    pub fn try_connect(addr: &Addr) -> io::Result<Client> {
        let stream = match addr {
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        stream.set_timeouts(TIMEOUT)?;
        Ok(Client {
            stream,
            handshake_flags: 0,
            client_flags: 0,
            structured: false,
            next_cookie: 0x5354_5241_0000_0001,
            inflight: HashMap::new(),
            partial: HashMap::new(),
        })
    }

    /// Changes the read and write timeouts.
    pub fn set_timeout(&self, t: Duration) {
        self.stream.set_timeouts(t).expect("set socket timeouts");
    }

    /// Connects, completes the handshake and NBD_OPT_GO on `name` (after
    /// NBD_OPT_STRUCTURED_REPLY if `structured`); panics if any of it fails.
    pub fn connect_go(addr: &Addr, name: &str, structured: bool) -> (Client, Export) {
        let mut c = Client::connect(addr);
        c.handshake();
        if structured {
            c.structured_reply();
        }
        let export = c
            .go(name, &[INFO_BLOCK_SIZE])
            .unwrap_or_else(|r| panic!("NBD_OPT_GO {name:?}: {r:?} {}", r.text()));
        (c, export)
    }

    // --- bytes ---

    /// Sends raw bytes; panics if that fails.
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("send to the NBD server");
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn try_recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b)?;
        Ok(b)
    }

    /// Exactly `n` bytes; panics (naming `what`) on EOF, error or timeout.
    pub fn recv_exact(&mut self, n: usize, what: &str) -> Vec<u8> {
        self.try_recv_exact(n)
            .unwrap_or_else(|e| panic!("reading {what} ({n} bytes) from the NBD server: {e}"))
    }

    /// Stops sending (the server sees EOF) and keeps the read side open.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Waits up to `limit` for the server to close the connection, reading and
    /// discarding anything it sends first. `Ok(bytes discarded)` on EOF or reset, `Err`
    /// if it was still open when `limit` passed. The socket's timeouts are
    /// [`TIMEOUT`] again afterwards.
    pub fn wait_closed(&mut self, limit: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + limit;
        let mut discarded = 0;
        let mut buf = vec![0u8; 1 << 16];
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_timeouts(left).is_err() {
                break Err(format!(
                    "the server kept the connection open for {limit:?} ({discarded} bytes \
                     read)"
                ));
            }
            match self.stream.read(&mut buf) {
                Ok(0) => break Ok(discarded),
                Ok(n) => discarded += n,
                Err(e) if is_disconnect(&e) => break Ok(discarded),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("waiting for the server to close: {e}")),
            }
        };
        let _ = self.stream.set_timeouts(TIMEOUT);
        result
    }

    // --- handshake ---

    /// Reads the greeting (both magics) and returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let g = self.recv_exact(18, "the greeting");
        assert_eq!(be64(&g), NBDMAGIC, "greeting magic: {g:02x?}");
        assert_eq!(
            be64(&g[8..]),
            IHAVEOPT,
            "greeting: second magic is not IHAVEOPT (oldstyle?): {g:02x?}"
        );
        self.handshake_flags = be16(&g[16..]);
        self.handshake_flags
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        self.client_flags = flags;
        self.send(&flags.to_be_bytes());
    }

    /// Greeting and client flags: fixed newstyle, and no zeroes if the server offers it.
    pub fn handshake(&mut self) {
        let flags = self.read_greeting();
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "the server must set NBD_FLAG_FIXED_NEWSTYLE: {flags:#x}"
        );
        assert_eq!(
            flags & !(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            0,
            "the server MUST NOT set other handshake flags: {flags:#x}"
        );
        let mut c = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            c |= FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(c);
    }

    /// The 16-byte option header alone (a bad peer may announce data it never sends).
    pub fn option_header(option: u32, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..].copy_from_slice(&len.to_be_bytes());
        b
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Client::option_header(option, data.len() as u32).to_vec();
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn try_recv_option_reply(&mut self) -> io::Result<OptReply> {
        let h = self.try_recv_exact(20)?;
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic: {h:02x?}");
        let (option, kind, len) = (be32(&h[8..]), be32(&h[12..]), be32(&h[16..]));
        assert!(
            len <= 1 << 20,
            "option reply {kind:#x} to {option} claims {len} bytes"
        );
        let data = self.try_recv_exact(len as usize)?;
        Ok(OptReply { option, kind, data })
    }

    /// The next option reply; panics on EOF or timeout.
    pub fn recv_option_reply(&mut self) -> OptReply {
        self.try_recv_option_reply()
            .unwrap_or_else(|e| panic!("reading an option reply: {e}"))
    }

    /// Every reply up to the final one (ACK or error), each checked to answer `option`.
    pub fn recv_option_replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut replies = Vec::new();
        loop {
            let r = self.recv_option_reply();
            assert_eq!(r.option, option, "reply to the wrong option: {r:?}");
            let last = r.is_final();
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Sends an option and returns every reply up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        self.recv_option_replies(option)
    }

    /// The single final reply an option gets (panics if others came first).
    pub fn option_final(&mut self, option: u32, data: &[u8]) -> OptReply {
        let mut r = self.option(option, data);
        assert_eq!(r.len(), 1, "option {option}: more than one reply: {r:?}");
        r.pop().expect("one reply")
    }

    /// NBD_OPT_STRUCTURED_REPLY, which must be acknowledged.
    pub fn structured_reply(&mut self) {
        let r = self.option_final(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.kind, REP_ACK, "NBD_OPT_STRUCTURED_REPLY: {r:?}");
        self.structured = true;
    }

    /// NBD_OPT_INFO: the export's information, or the final error reply.
    pub fn info(&mut self, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        self.info_or_go(OPT_INFO, name, infos)
    }

    /// NBD_OPT_GO: on success the connection is in the transmission phase.
    pub fn go(&mut self, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        self.info_or_go(OPT_GO, name, infos)
    }

    fn info_or_go(&mut self, option: u32, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        let replies = self.option(option, &go_data(name, infos));
        let (last, infos) = replies.split_last().expect("at least one reply");
        if last.is_error() {
            return Err(last.clone());
        }
        let mut export = Export::default();
        let mut have_export = false;
        for r in infos {
            assert_eq!(r.kind, REP_INFO, "only NBD_REP_INFO before the ACK: {r:?}");
            assert!(r.data.len() >= 2, "NBD_REP_INFO without a type: {r:?}");
            let d = &r.data[2..];
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length: {r:?}");
                    export.size = be64(d);
                    export.flags = be16(&d[8..]);
                    have_export = true;
                }
                INFO_NAME => export.name = Some(String::from_utf8_lossy(d).into_owned()),
                INFO_DESCRIPTION => {
                    export.description = Some(String::from_utf8_lossy(d).into_owned())
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length: {r:?}");
                    export.block_size = Some((be32(d), be32(&d[4..]), be32(&d[8..])));
                }
                _ => {} // clients MUST ignore information types they do not know
            }
        }
        assert!(have_export, "success without NBD_INFO_EXPORT: {replies:?}");
        assert!(
            export.flags & FLAG_HAS_FLAGS != 0,
            "NBD_FLAG_HAS_FLAGS MUST always be 1: {:#x}",
            export.flags
        );
        Ok(export)
    }

    /// NBD_OPT_EXPORT_NAME: size and flags (then 124 zeroes unless the client sent
    /// NBD_FLAG_C_NO_ZEROES).
    pub fn export_name(&mut self, name: &str) -> io::Result<Export> {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes());
        let b = self.try_recv_exact(10)?;
        if self.client_flags & FLAG_C_NO_ZEROES == 0 {
            let z = self.try_recv_exact(124)?;
            assert!(
                z.iter().all(|&b| b == 0),
                "the 124 reserved bytes are not zero"
            );
        }
        Ok(Export {
            size: be64(&b),
            flags: be16(&b[8..]),
            ..Export::default()
        })
    }

    // --- transmission ---

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Sends a request header and `payload` (the data of a write), remembering the
    /// request so that its reply can be parsed (NBD_CMD_DISC gets no reply).
    pub fn send_request(&mut self, req: Request, payload: &[u8]) {
        self.try_send_request(req, payload)
            .unwrap_or_else(|e| panic!("sending {req:?}: {e}"));
    }

    pub fn try_send_request(&mut self, req: Request, payload: &[u8]) -> io::Result<()> {
        if req.kind != CMD_DISC {
            self.track(req);
        }
        let mut m = req.bytes().to_vec();
        m.extend_from_slice(payload);
        self.try_send(&m)
    }

    /// Registers a request as in flight without sending it: for a test that sends from
    /// another thread (see [`Client::writer`]) while this one reads the replies.
    pub fn track(&mut self, req: Request) {
        let old = self.inflight.insert(req.cookie, req);
        assert!(old.is_none(), "cookie {:#x} already in flight", req.cookie);
    }

    /// A second handle on the connection for sending, e.g. from another thread.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(self.stream.try_clone().expect("clone the socket"))
    }

    /// Requests sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Reads messages until one request's reply is complete; returns it. An error
    /// (EOF, reset, timeout) is returned as is.
    pub fn try_recv(&mut self) -> io::Result<Completion> {
        loop {
            let magic = be32(&self.try_recv_exact(4)?);
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = self.try_recv_exact(12)?;
                    let (error, cookie) = (be32(&h), be64(&h[4..]));
                    let req = self.inflight.remove(&cookie).unwrap_or_else(|| {
                        panic!("simple reply for cookie {cookie:#x}, which is not in flight")
                    });
                    assert!(
                        self.partial.remove(&cookie).is_none(),
                        "simple reply after structured chunks for {req:?}"
                    );
                    assert!(
                        !(self.structured && req.kind == CMD_READ),
                        "structured replies were negotiated: a simple reply to a read is \
                         forbidden ({req:?}, error {error})"
                    );
                    let mut c = Completion::new(req);
                    c.simple = true;
                    c.error = error;
                    if req.kind == CMD_READ && error == 0 {
                        c.data = self.try_recv_exact(req.len as usize)?;
                    }
                    return Ok(c);
                }
                STRUCTURED_REPLY_MAGIC => {
                    assert!(
                        self.structured,
                        "a structured reply chunk although structured replies were not \
                         negotiated"
                    );
                    let h = self.try_recv_exact(16)?;
                    let head = ChunkHead {
                        flags: be16(&h),
                        kind: be16(&h[2..]),
                        len: be32(&h[12..]),
                    };
                    let cookie = be64(&h[4..]);
                    let req = *self.inflight.get(&cookie).unwrap_or_else(|| {
                        panic!("chunk {head:?} for cookie {cookie:#x}, which is not in flight")
                    });
                    assert!(
                        head.len <= MAX_CHUNK,
                        "chunk {head:?} for {req:?} is over {MAX_CHUNK} bytes"
                    );
                    let payload = self.try_recv_exact(head.len as usize)?;
                    let c = self
                        .partial
                        .entry(cookie)
                        .or_insert_with(|| Completion::new(req));
                    chunk(c, head, &payload);
                    if head.flags & REPLY_FLAG_DONE != 0 {
                        self.inflight.remove(&cookie);
                        let c = self.partial.remove(&cookie).expect("assembled above");
                        finish(&c);
                        return Ok(c);
                    }
                }
                m => panic!("reply magic {m:#010x} is neither simple nor structured"),
            }
        }
    }

    /// The next complete reply; panics on EOF, error or timeout.
    pub fn recv(&mut self) -> Completion {
        self.try_recv()
            .unwrap_or_else(|e| panic!("reading a reply ({} in flight): {e}", self.inflight.len()))
    }

    /// Sends one request with a fresh cookie and waits for its reply (nothing else may be
    /// in flight).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Completion {
        let req = Request {
            flags,
            kind,
            cookie: self.cookie(),
            offset,
            len,
        };
        self.send_request(req, payload);
        let c = self.recv();
        assert_eq!(c.cookie(), req.cookie, "reply to another request: {c:?}");
        c
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.call(CMD_READ, 0, offset, len, &[]);
        c.result().map(|()| c.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
            .result()
    }

    /// NBD_CMD_DISC, then waits for the server to close; panics if it does not.
    pub fn disconnect(mut self) {
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.cookie(),
            offset: 0,
            len: 0,
        };
        self.send_request(req, &[]);
        let n = self
            .wait_closed(CLOSE_WAIT)
            .unwrap_or_else(|e| panic!("after NBD_CMD_DISC: {e}"));
        assert_eq!(
            n, 0,
            "the server sent {n} bytes after NBD_CMD_DISC with nothing in flight"
        );
    }
}

/// Adds one structured chunk to the completion it belongs to, checking it.
fn chunk(c: &mut Completion, head: ChunkHead, p: &[u8]) {
    let req = c.request;
    assert!(
        c.last_chunk()
            .is_none_or(|h| h.flags & REPLY_FLAG_DONE == 0),
        "chunk after the DONE chunk for {req:?}"
    );
    c.chunks.push(head);
    let (start, end) = (
        u128::from(req.offset),
        u128::from(req.offset) + u128::from(req.len),
    );
    match head.kind {
        REPLY_TYPE_NONE => {
            assert_eq!(head.len, 0, "NBD_REPLY_TYPE_NONE with a payload: {req:?}");
            assert!(
                head.flags & REPLY_FLAG_DONE != 0,
                "NBD_REPLY_TYPE_NONE MUST be the final chunk: {req:?}"
            );
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(req.kind, CMD_READ, "content chunk for {req:?}");
            let (off, n) = if head.kind == REPLY_TYPE_OFFSET_DATA {
                assert!(p.len() >= 9, "OFFSET_DATA shorter than 9 bytes: {req:?}");
                (be64(p), p.len() as u64 - 8)
            } else {
                assert_eq!(p.len(), 12, "OFFSET_HOLE length for {req:?}");
                let n = u64::from(be32(&p[8..]));
                assert!(n > 0, "OFFSET_HOLE of size 0 for {req:?}");
                (be64(p), n)
            };
            assert!(
                u128::from(off) >= start && u128::from(off) + u128::from(n) <= end,
                "content chunk [{off}, +{n}) outside {req:?}"
            );
            assert!(
                c.covered.iter().all(|&(s, e)| off + n <= s || off >= e),
                "content chunk [{off}, +{n}) overlaps an earlier one for {req:?}"
            );
            c.covered.push((off, off + n));
            if c.data.is_empty() {
                c.data = vec![0u8; req.len as usize];
            }
            let at = (off - req.offset) as usize;
            if head.kind == REPLY_TYPE_OFFSET_DATA {
                c.data[at..at + n as usize].copy_from_slice(&p[8..]);
            } else {
                c.data[at..at + n as usize].fill(0);
            }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert_eq!(req.kind, CMD_BLOCK_STATUS, "block status chunk for {req:?}");
            assert!(
                p.len() >= 12 && (p.len() - 4) % 8 == 0,
                "BLOCK_STATUS length {} for {req:?}",
                p.len()
            );
            let extents = p[4..]
                .chunks(8)
                .map(|d| {
                    let e = (be32(d), be32(&d[4..]));
                    assert!(e.0 > 0, "a zero-length extent for {req:?}");
                    e
                })
                .collect();
            c.extents.push((be32(p), extents));
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            assert!(p.len() >= 6, "error chunk shorter than 6 bytes for {req:?}");
            let (error, mlen) = (be32(p), be16(&p[4..]) as usize);
            assert!(error != 0, "error chunk with error 0 for {req:?}");
            assert!(
                mlen <= p.len() - 6,
                "error message length {mlen} > chunk for {req:?}"
            );
            if k == REPLY_TYPE_ERROR_OFFSET {
                assert_eq!(p.len(), 6 + mlen + 8, "ERROR_OFFSET length for {req:?}");
                let off = u128::from(be64(&p[6 + mlen..]));
                assert!(
                    off >= start && off < end.max(start + 1),
                    "ERROR_OFFSET {off} outside {req:?}"
                );
            }
            if c.error == 0 {
                c.error = error;
                c.message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
            }
        }
        k => panic!("unknown chunk type {k} (not an error) for {req:?}: a hard disconnect"),
    }
}

/// Checks a complete structured reply.
fn finish(c: &Completion) {
    let req = c.request;
    if c.error != 0 {
        return;
    }
    match req.kind {
        CMD_READ => {
            let mut cov = c.covered.clone();
            cov.sort_unstable();
            let mut at = req.offset;
            for (s, e) in cov {
                assert_eq!(s, at, "successful read left [{at}, {s}) uncovered: {req:?}");
                at = e;
            }
            assert_eq!(
                at,
                req.offset + u64::from(req.len),
                "successful read left its tail uncovered: {req:?}"
            );
        }
        CMD_BLOCK_STATUS => {
            assert!(
                !c.extents.is_empty(),
                "successful block status without extents: {req:?}"
            );
        }
        _ => {}
    }
}
