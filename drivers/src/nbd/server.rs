//! The NBD server: a listening socket, its exports and its connections.
//!
//! ```text
//!   admin thread                      reactor 0                 reactor k
//!   ------------                      ---------                 ---------
//!   NbdServer::start(listener) --->   accept loop (ring accept)
//!                                       | new socket: register, then hand it to
//!                                       | reactor (i mod N) by message  --------->  serve(): handshake,
//!   add_export / remove_export                                                      then transmission
//!   stop: shut the listener down,                                                   (recv / send through
//!         shut every connection down,                                               that reactor's ring)
//!         wait until they are gone
//! ```
//!
//! Exports and connections live in one [`Shared`] table behind a mutex. Only the
//! control path touches it: the admin thread, the accept loop, and a connection when it
//! starts (handshake) and ends. Requests never do: once a connection has its export it
//! holds the export's [`Blk`](strata_engine::graph::Blk) on its own reactor.
//!
//! Stopping a connection from the admin thread is `shutdown(2)` on its socket: the
//! connection's pending `recv` returns end-of-file, it stops reading, lets its requests
//! in flight finish, and deregisters. The table holds each socket through an
//! `Arc<OwnedFd>`, so the descriptor number cannot be reused while the admin thread may
//! still shut it down.

use super::connection;
use super::proto::{REP_ERR_SHUTDOWN, REP_ERR_UNKNOWN};
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use strata_engine::graph::{NodeId, UserId};
use strata_engine::reactor::{self, Message, Reply, ring};
use strata_engine::{Engine, Error, ErrorKind};

/// One export: a node offered under a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// The `block-export-add` id.
    pub id: String,
    /// The name clients ask for.
    pub name: String,
    pub description: String,
    pub node: NodeId,
    /// The graph user that holds the export's permissions.
    pub user: UserId,
    pub writable: bool,
}

/// Server settings (`nbd-server-start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most simultaneous connections; 0 for no limit. Connections beyond it are closed
    /// as soon as they are accepted.
    pub max_connections: u32,
    /// Connections that have not finished the handshake by then are closed; zero for
    /// no limit.
    pub handshake_max: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 0,
            handshake_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct ConnEntry {
    fd: Arc<OwnedFd>,
    /// The export id, once the handshake chose one.
    export: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Exports by name.
    exports: BTreeMap<String, Arc<ExportSpec>>,
    /// When each export was added (a sequence number), for listing in that order.
    added: BTreeMap<String, u64>,
    next_added: u64,
    conns: BTreeMap<u64, ConnEntry>,
    next_conn: u64,
    stopping: bool,
}

/// What the accept loop, the connections and the admin thread share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: ServerConfig,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Why the accept loop stopped on its own (an unexpected `accept` error), if it did.
    accept_error: Mutex<Option<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent maps (every update
        // is a single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection; `None` if the server is stopping or full.
    fn register(&self, fd: &Arc<OwnedFd>) -> Option<u64> {
        let mut inner = self.lock();
        let max = self.config.max_connections as usize;
        if inner.stopping || (max > 0 && inner.conns.len() >= max) {
            return None;
        }
        let id = inner.next_conn;
        inner.next_conn += 1;
        inner.conns.insert(
            id,
            ConnEntry {
                fd: fd.clone(),
                export: None,
            },
        );
        Some(id)
    }

    pub(super) fn unregister(&self, id: u64) {
        self.lock().conns.remove(&id);
        self.changed.notify_all();
    }

    /// The export named `name`, without attaching (`NBD_OPT_INFO`, meta contexts).
    pub(super) fn find(&self, name: &str) -> Option<Arc<ExportSpec>> {
        self.lock().exports.get(name).cloned()
    }

    /// Attaches connection `id` to export `spec` (`NBD_OPT_GO`, once the connection has
    /// opened it): from now on removing the export must deal with this connection.
    /// Fails with the option error to send if the export went away meanwhile.
    pub(super) fn attach(&self, id: u64, spec: &Arc<ExportSpec>) -> Result<(), u32> {
        let mut inner = self.lock();
        if inner.stopping {
            return Err(REP_ERR_SHUTDOWN);
        }
        if !inner
            .exports
            .get(&spec.name)
            .is_some_and(|e| Arc::ptr_eq(e, spec))
        {
            return Err(REP_ERR_UNKNOWN);
        }
        let conn = inner.conns.get_mut(&id).ok_or(REP_ERR_SHUTDOWN)?;
        conn.export = Some(spec.id.clone());
        Ok(())
    }

    /// Whether the server is stopping (options then get `NBD_REP_ERR_SHUTDOWN`).
    pub(super) fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Every export in the order they were added (as QEMU lists them), for
    /// `NBD_OPT_LIST`.
    pub(super) fn list(&self) -> Vec<Arc<ExportSpec>> {
        let inner = self.lock();
        let mut all: Vec<_> = inner.exports.values().cloned().collect();
        all.sort_by_key(|e| inner.added.get(&e.name).copied());
        all
    }

    /// Shuts down the sockets of the connections `pick` selects: each stops reading,
    /// lets its requests in flight finish, and deregisters.
    fn close(&self, pick: impl Fn(&ConnEntry) -> bool) {
        for c in self.lock().conns.values().filter(|c| pick(c)) {
            // SAFETY: shutdown(2) on a descriptor the entry keeps open.
            unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Waits until every connection has deregistered.
    fn wait_all(&self) {
        let mut inner = self.lock();
        let mut waited = 0u32;
        while !inner.conns.is_empty() {
            let (guard, timeout) = self
                .changed
                .wait_timeout(inner, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner());
            inner = guard;
            if timeout.timed_out() {
                waited += 1;
                if waited % 10 == 0 {
                    eprintln!(
                        "strata: NBD server still waits for {} connection(s) to finish \
                         their requests ({waited} s)",
                        inner.conns.len()
                    );
                }
            }
        }
    }
}

/// A running NBD server. Owned by the admin thread.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<OwnedFd>,
    accepting: Option<Reply<()>>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.shared.config)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Serves `listener` (a listening stream socket) on `engine`'s reactors: reactor 0
    /// accepts, connections are spread over all reactors.
    pub fn start(engine: &Engine, listener: OwnedFd, config: ServerConfig) -> NbdServer {
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            accept_error: Mutex::new(None),
        });
        let listener = Arc::new(listener);
        let reactors = engine.reactors();
        let (s, l) = (shared.clone(), listener.clone());
        let accepting = engine.spawn(0, move || accept_loop(s, l, reactors));
        NbdServer {
            shared,
            listener,
            accepting: Some(accepting),
        }
    }

    /// Offers `spec` to clients. Names are unique.
    pub fn add_export(&self, spec: ExportSpec) -> Result<(), Error> {
        let mut inner = self.shared.lock();
        if inner.exports.contains_key(&spec.name) {
            return Err(Error::invalid(format!(
                "Block export name '{}' is already in use",
                spec.name
            )));
        }
        let seq = inner.next_added;
        inner.next_added += 1;
        inner.added.insert(spec.name.clone(), seq);
        inner.exports.insert(spec.name.clone(), Arc::new(spec));
        Ok(())
    }

    /// Clients connected to export `id`.
    pub fn connections_of(&self, id: &str) -> usize {
        self.shared
            .lock()
            .conns
            .values()
            .filter(|c| c.export.as_deref() == Some(id))
            .count()
    }

    /// Why the server no longer accepts clients although it was not stopped (an
    /// unexpected `accept` failure); `None` while it accepts.
    pub fn accept_error(&self) -> Option<String> {
        self.shared
            .accept_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every connection, whether or not it has chosen an export yet.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Withdraws export `id`: no new client can open it. `hard` disconnects its clients
    /// (each finishes its requests in flight first; [`NbdServer::connections_of`] tells
    /// when they are gone); otherwise an export with clients is refused, as QEMU's
    /// `safe` mode. Does not wait.
    pub fn remove_export(&self, id: &str, hard: bool) -> Result<ExportSpec, Error> {
        let spec = {
            let mut inner = self.shared.lock();
            let Some(name) = inner
                .exports
                .values()
                .find(|e| e.id == id)
                .map(|e| e.name.clone())
            else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("Export '{id}' is not found"),
                ));
            };
            let busy = inner
                .conns
                .values()
                .any(|c| c.export.as_deref() == Some(id));
            if busy && !hard {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "export '{id}' still in use (use mode 'hard' to disconnect its clients)"
                    ),
                ));
            }
            // Removed first: no new client can attach while the old ones go.
            inner.added.remove(&name);
            inner.exports.remove(&name).expect("BUG: export vanished")
        };
        self.shared.close(|c| c.export.as_deref() == Some(id));
        Ok(Arc::unwrap_or_clone(spec))
    }

    /// Stops accepting (the listening socket is closed when this returns), disconnects
    /// every client and withdraws every export, returning them. Clients finish their
    /// requests in flight in the background: see [`NbdServer::wait_idle`] and
    /// [`NbdServer::connections_of`].
    pub fn shut_down(&mut self) -> Vec<ExportSpec> {
        self.stop_accepting();
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.wait();
        }
        self.shared.close(|_| true);
        let exports = {
            let mut inner = self.shared.lock();
            inner.added.clear();
            std::mem::take(&mut inner.exports)
        };
        exports.into_values().map(Arc::unwrap_or_clone).collect()
    }

    /// Waits until every connection is gone (after [`NbdServer::shut_down`]: when the
    /// daemon exits).
    pub fn wait_idle(&self) {
        self.shared.wait_all();
    }
}

impl NbdServer {
    /// Marks the server stopping and makes the pending accept fail.
    fn stop_accepting(&self) {
        self.shared.lock().stopping = true;
        // SAFETY: shutdown(2) on the listening socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.accepting.is_some() {
            self.stop_accepting();
        }
    }
}

/// How long accepting pauses after a failure such as running out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

async fn accept_loop(shared: Arc<Shared>, listener: Arc<OwnedFd>, reactors: usize) {
    let mut next = 0usize;
    loop {
        let (res, ()) = ring::accept(listener.as_raw_fd()).await;
        if shared.lock().stopping {
            if res >= 0 {
                // SAFETY: a descriptor accept just returned, owned by nobody else.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        }
        match ring::cqe_result(res) {
            Ok(fd) => {
                // SAFETY: as above.
                let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as i32) });
                set_nodelay(&fd);
                let Some(id) = shared.register(&fd) else {
                    // Over max-connections: the client sees the socket close.
                    continue;
                };
                let target = next % reactors;
                next = next.wrapping_add(1);
                let s = shared.clone();
                reactor::send(
                    target,
                    Message::Run(Box::new(move || {
                        reactor::spawn(connection::serve(s, id, fd));
                    })),
                );
            }
            Err(e) => match e.0 {
                libc::EINTR | libc::EAGAIN | libc::ECONNABORTED | libc::EPROTO => {}
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    eprintln!("strata: NBD server cannot accept a connection: {e}");
                    reactor::sleep(ACCEPT_BACKOFF).await;
                }
                _ => {
                    eprintln!("strata: NBD server stops accepting: {e}");
                    *shared
                        .accept_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(format!("accept failed: {e}"));
                    return;
                }
            },
        }
    }
}

/// TCP_NODELAY on TCP sockets (replies are whole messages; Nagle would only delay
/// them); harmless failure on Unix sockets.
fn set_nodelay(fd: &OwnedFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
