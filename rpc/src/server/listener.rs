//! Listening sockets: Unix sockets created private, TCP on request, accept loops that
//! sleep in `accept` and stop on demand.
//!
//! - A Unix socket file is created with mode 0600 before the socket listens, so there
//!   is no moment when another user could connect (the socket is bound, chmod-ed, then
//!   put in the listening state; a connection attempt before `listen` is refused).
//! - A socket file left by a daemon that died is replaced; one with a live listener
//!   behind it is an error; any other file at the path is left alone and is an error.
//! - The file is removed when the listener goes away, but only if it is still the one
//!   this listener created (same inode), never a successor's.
//! - Stopping shuts the listening socket down, which makes the blocked `accept` return
//!   (Linux: EINVAL), so an idle listener costs nothing and stops at once.

use super::connection::Stream;
use std::fmt;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a front end listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Parses `--rpc-tcp`: `PORT` (loopback), `HOST:PORT` or `[V6]:PORT`.
pub fn parse_tcp(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not PORT or HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// Keeps a Unix listener's socket file; removes it on drop (if it is still ours).
#[derive(Debug)]
pub struct SocketGuard(#[allow(dead_code)] Option<SocketFile>);

/// The socket file a Unix listener created; removed on drop if it is still ours.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path)
            && md.dev() == self.dev
            && md.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug)]
enum Socket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    endpoint: Endpoint,
    socket: Socket,
    /// Declared after `socket`: the file is removed after the socket is closed.
    _file: Option<SocketFile>,
}

impl Listener {
    /// Binds and listens on `endpoint`.
    pub fn bind(endpoint: &Endpoint) -> Result<Listener, String> {
        match endpoint {
            Endpoint::Unix(path) => {
                let (socket, file) = bind_unix(path)?;
                Ok(Listener {
                    endpoint: endpoint.clone(),
                    socket: Socket::Unix(socket),
                    _file: Some(file),
                })
            }
            Endpoint::Tcp(addr) => {
                let socket = TcpListener::bind(addr)
                    .map_err(|e| format!("cannot listen on TCP {addr}: {e}"))?;
                let local = socket
                    .local_addr()
                    .map_err(|e| format!("cannot listen on TCP {addr}: {e}"))?;
                Ok(Listener {
                    endpoint: Endpoint::Tcp(local),
                    socket: Socket::Tcp(socket),
                    _file: None,
                })
            }
        }
    }

    /// Where it listens (a TCP port 0 replaced by the port the kernel chose).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The listening socket, for a server that accepts by itself (the NBD server on the
    /// reactors), and the guard that removes the socket file once dropped.
    pub fn into_parts(self) -> (std::os::fd::OwnedFd, SocketGuard) {
        let fd = match self.socket {
            Socket::Unix(l) => std::os::fd::OwnedFd::from(l),
            Socket::Tcp(l) => std::os::fd::OwnedFd::from(l),
        };
        (fd, SocketGuard(self._file))
    }

    /// Waits for the next client. Errors other than an interrupted call are returned
    /// (after [`Listener::shut`], every call fails).
    pub(crate) fn accept(&self) -> std::io::Result<Stream> {
        loop {
            let r = match &self.socket {
                Socket::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Socket::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            match r {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Makes a blocked [`Listener::accept`] return and every later one fail.
    pub(crate) fn shut(&self) {
        let fd = match &self.socket {
            Socket::Unix(l) => l.as_raw_fd(),
            Socket::Tcp(l) => l.as_raw_fd(),
        };
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    }
}

/// How long a failing `accept` (out of file descriptors, ...) waits before retrying.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let shown = path.display();
    replace_stale(path)?;
    let addr = UnixAddr::new(path).map_err(|e| {
        format!(
            "cannot use {shown} as a socket path: {e} (at most {} bytes)",
            max_path_len()
        )
    })?;
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("cannot create a socket for {shown}: {e}"))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)
        .map_err(|e| format!("cannot bind {shown}: {e}"))?;
    let md = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot stat {shown} after binding it: {e}"))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: md.dev(),
        ino: md.ino(),
    };
    // Before listen(): nobody can connect yet, so nobody connects while it is open.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {shown} private (chmod 0600): {e}"))?;
    let backlog = Backlog::new(128).expect("BUG: 128 is a valid backlog");
    nix::sys::socket::listen(&fd, backlog).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    Ok((UnixListener::from(fd), file))
}

fn max_path_len() -> usize {
    // sun_path is 108 bytes on Linux, one of them the terminating NUL.
    107
}

/// Removes a socket file nothing listens on; fails if something does, or if the path is
/// not a socket.
fn replace_stale(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot check {shown}: {e}")),
    };
    if !md.file_type().is_socket() {
        return Err(format!(
            "{shown} exists and is not a socket: remove it or choose another path"
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "another stratad is listening on {shown}: stop it or choose another path"
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .or_else(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| format!("cannot remove the stale socket {shown}: {e}")),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot check whether {shown} is in use: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "strata-listener-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_unix_socket_is_private_and_removed_with_its_listener() {
        let dir = temp_dir("mode");
        let path = dir.join("s.sock");
        let l = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = temp_dir("stale");
        let path = dir.join("s.sock");
        let live = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        let e = Listener::bind(&Endpoint::Unix(path.clone())).unwrap_err();
        assert!(e.contains("another stratad is listening on"), "{e}");
        // A dead daemon's socket: bound, never removed, nobody listening.
        drop(live);
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let l = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(l);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_regular_file_at_the_path_is_left_alone() {
        let dir = temp_dir("file");
        let path = dir.join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let e = Listener::bind(&Endpoint::Unix(path.clone())).unwrap_err();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_file_of_a_successor_is_not_removed() {
        let dir = temp_dir("successor");
        let path = dir.join("s.sock");
        let old = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        std::fs::remove_file(&path).unwrap();
        let new = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        drop(old);
        assert!(
            path.exists(),
            "the old listener removed the new one's socket"
        );
        drop(new);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shut_wakes_a_blocked_accept() {
        let l = std::sync::Arc::new(
            Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap(),
        );
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.accept().is_err());
        std::thread::sleep(Duration::from_millis(50));
        l.shut();
        assert!(t.join().unwrap());
    }

    #[test]
    fn tcp_addresses_default_to_loopback() {
        assert_eq!(
            parse_tcp("5260").unwrap(),
            "127.0.0.1:5260".parse().unwrap()
        );
        assert_eq!(
            parse_tcp("0.0.0.0:1").unwrap(),
            "0.0.0.0:1".parse().unwrap()
        );
        assert_eq!(parse_tcp("[::1]:7").unwrap(), "[::1]:7".parse().unwrap());
        assert!(parse_tcp("nope").is_err());
        assert!(parse_tcp("99999").is_err());
    }

    #[test]
    fn a_too_long_path_is_a_clear_error() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let e = Listener::bind(&Endpoint::Unix(path)).unwrap_err();
        assert!(e.contains("socket path"), "{e}");
    }
}
