//! The admin thread and the front ends (JSON-RPC 2.0 and QMP over sockets).
//!
//! ```text
//!   Server::bind(listens)           sockets exist (0600) but nobody is served yet
//!     .serve(admin, events)         one accept thread per socket,
//!        |                          one reader + one writer thread per client
//!        v
//!   Running  --stop()-->  accepts end, clients get their queued replies, files removed
//!
//!   client --frames--> JsonRpc | Qmp --AdminHandle::call--> admin thread (Registry)
//!   EventBus --> Fanout --> every subscribed client's queue
//! ```
//!
//! - [`admin`]: the admin thread, which owns the registry and runs one command at a time.
//! - [`framing`]: splitting a byte stream into JSON values.
//! - [`jsonrpc`], [`qmp`]: the two protocols.
//! - [`connection`]: a client's threads and queue; [`fanout`]: events to clients.
//! - [`listener`]: Unix (private, stale-file aware) and TCP listening sockets.
//! - [`replay`]: `--config` files (the output of `save-config`) run at start.

pub mod admin;
mod connection;
mod fanout;
pub mod framing;
pub mod jsonrpc;
pub mod listener;
pub mod qmp;
pub mod replay;

pub use admin::{Admin, AdminHandle, Commands};
pub use connection::{MAX_CONNECTIONS, MAX_MESSAGE};
pub use listener::{Endpoint, Listener};

use crate::events::EventBus;
use connection::{Hub, Protocol};
use fanout::Fanout;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The protocol a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    JsonRpc,
    /// QMP; `pretty` prints each message over several lines (QEMU's `pretty=on`).
    Qmp {
        pretty: bool,
    },
}

/// One socket to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub endpoint: Endpoint,
    pub wire: Wire,
}

/// Bound sockets, not yet served. Dropping it removes the socket files.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<(Listener, Wire)>,
}

impl Server {
    /// Binds every socket, or none: on an error the ones already bound are removed.
    /// Clients that connect before [`Server::serve`] wait in the backlog.
    pub fn bind(listens: &[Listen]) -> Result<Server, String> {
        let mut listeners = Vec::new();
        for l in listens {
            listeners.push((Listener::bind(&l.endpoint)?, l.wire));
        }
        Ok(Server { listeners })
    }

    /// Where each socket listens, with its protocol.
    pub fn endpoints(&self) -> Vec<(Endpoint, Wire)> {
        self.listeners
            .iter()
            .map(|(l, w)| (l.endpoint().clone(), *w))
            .collect()
    }

    /// Starts serving: commands go to `admin`, events come from `events`.
    pub fn serve(self, admin: AdminHandle, events: &EventBus) -> Result<Running, String> {
        let fanout = Arc::new(Fanout::default());
        fanout
            .start(events)
            .map_err(|e| format!("cannot start the event thread: {e}"))?;
        let hub = Arc::new(Hub::new(admin, fanout));
        let mut running = Running {
            hub: hub.clone(),
            acceptors: Vec::new(),
        };
        for (listener, wire) in self.listeners {
            let listener = Arc::new(listener);
            let (l, h) = (listener.clone(), hub.clone());
            let thread = std::thread::Builder::new()
                .name(format!("accept {}", listener.endpoint()))
                .spawn(move || accept_loop(&l, wire, &h))
                .map_err(|e| format!("cannot start an accept thread: {e}"))?;
            running.acceptors.push((listener, thread));
        }
        Ok(running)
    }
}

/// Sockets being served.
#[derive(Debug)]
pub struct Running {
    hub: Arc<Hub>,
    acceptors: Vec<(Arc<Listener>, JoinHandle<()>)>,
}

impl Running {
    /// Stops accepting, lets every client receive the replies already queued (the
    /// answer to `quit`), closes the connections and removes the socket files.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for (l, _) in &self.acceptors {
            l.shut();
        }
        for (_, t) in self.acceptors.drain(..) {
            let _ = t.join();
        }
        self.hub.close_all();
        // The listeners (and their files) go when the last Arc does: here.
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn protocol(wire: Wire) -> (Box<dyn Protocol>, bool) {
    match wire {
        Wire::JsonRpc => (Box::new(jsonrpc::JsonRpc), false),
        Wire::Qmp { pretty } => (Box::new(qmp::Qmp::default()), pretty),
    }
}

fn accept_loop(listener: &Listener, wire: Wire, hub: &Arc<Hub>) {
    let mut warned = false;
    loop {
        match listener.accept() {
            Ok(stream) => {
                let hub = hub.clone();
                let (proto, pretty) = protocol(wire);
                let spawned = std::thread::Builder::new()
                    .name("client".to_string())
                    .spawn(move || connection::serve(hub, stream, proto, pretty));
                if let Err(e) = spawned {
                    eprintln!("stratad: cannot start a thread for a client: {e}");
                }
            }
            // Shut down by Running::stop: EINVAL from now on.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return,
            Err(e) => {
                // Out of file descriptors or memory: wait instead of spinning.
                if !warned {
                    eprintln!(
                        "stratad: accepting on {} failed: {e} (retrying)",
                        listener.endpoint()
                    );
                    warned = true;
                }
                std::thread::sleep(listener::ACCEPT_BACKOFF);
            }
        }
    }
}
