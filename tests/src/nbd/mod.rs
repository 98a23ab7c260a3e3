//! NBD for end-to-end tests: a raw client that puts every message of the fixed newstyle
//! handshake and of the transmission phase on the wire as bytes, so a test can be a
//! well-behaved client or exactly the bad peer it wants to be; and the [`Server`] the
//! tests talk to.
//!
//! ```text
//!   Server::start(listen, opts, args) -> stratad (or qemu-storage-daemon) with --nbd-server
//!   Client::connect(server.addr()) -> handshake(): greeting, client flags
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
//!
//! - `proto`: the protocol's numbers and message encoders.
//! - `socket`: [`Addr`], the stream, the byte-level reads and writes.
//! - `handshake`, `transmission`: the two phases of a connection.
//! - `server`: the daemon under test; `qsd` swaps in QEMU's for reference runs.

mod handshake;
mod proto;
mod qsd;
mod server;
mod socket;
mod transmission;

pub use handshake::{Export, OptReply, meta_context, server_entry};
pub use proto::*;
pub use server::{Listen, Server};
pub use socket::{Addr, CLOSE_WAIT, TIMEOUT, is_disconnect};
pub use transmission::{ChunkHead, Completion};

use socket::Stream;
use std::collections::HashMap;

/// A client connection. Its methods are grouped by phase: `socket.rs` (connect, bytes),
/// `handshake.rs` (options), `transmission.rs` (requests and replies).
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
