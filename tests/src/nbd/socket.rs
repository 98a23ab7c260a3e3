//! The connection under a [`Client`]: where the server listens ([`Addr`]), a Unix or TCP
//! stream with read and write timeouts on every operation, and the byte-level sends,
//! reads and waits for a close that the handshake and transmission code build on.

use super::Client;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

    /// The NBD URI of export `name` (doc/uri.md): `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://HOST:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Addr::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }

    /// The URI of the server itself, without an export (what `nbdinfo --list` takes).
    pub fn list_uri(&self) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix://?socket={}", p.display()),
            Addr::Tcp(a) => format!("nbd://{a}"),
        }
    }
}

/// The path or `host:port`, as stratad announces it.
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A Unix or TCP stream.
#[derive(Debug)]
pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(super) fn set_timeouts(&self, t: Duration) -> io::Result<()> {
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

    pub(super) fn try_clone(&self) -> io::Result<Stream> {
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
}
