//! Events to the clients that asked for them.
//!
//! One thread subscribes to the [`EventBus`] and hands each event to every subscribed
//! connection's outgoing queue (a JSON-RPC client after `subscribe_events`, a QMP client
//! after `qmp_capabilities`). It never blocks on a client: a connection whose queue is
//! full (the client stopped reading) is disconnected rather than allowed to stall the
//! others. The thread ends when the bus goes away with the registry at shutdown.

use super::connection::{Outgoing, Stream, encode};
use crate::events::{Event, EventBus};
use serde_json::Value;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// How a protocol writes an event.
pub(crate) type EventFormat = fn(&Event) -> Value;

struct Subscriber {
    conn: u64,
    out: SyncSender<Outgoing>,
    format: EventFormat,
    pretty: bool,
    /// To disconnect a client that does not read.
    stream: Stream,
}

/// The subscribed connections.
#[derive(Default)]
pub(crate) struct Fanout {
    subs: Mutex<Vec<Subscriber>>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("subscribers", &self.lock().len())
            .finish()
    }
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        // Pushing to or filtering a Vec cannot be left half-done by a panic.
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts delivering events to connection `conn` (again: no duplicate).
    pub(crate) fn add(
        &self,
        conn: u64,
        out: SyncSender<Outgoing>,
        format: EventFormat,
        pretty: bool,
        stream: Stream,
    ) {
        let mut subs = self.lock();
        if subs.iter().any(|s| s.conn == conn) {
            return;
        }
        subs.push(Subscriber {
            conn,
            out,
            format,
            pretty,
            stream,
        });
    }

    pub(crate) fn remove(&self, conn: u64) {
        self.lock().retain(|s| s.conn != conn);
    }

    /// Hands `event` to every subscriber.
    pub(crate) fn deliver(&self, event: &Event) {
        self.lock().retain(|s| {
            let msg = encode(&(s.format)(event), s.pretty);
            match s.out.try_send(msg) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    eprintln!(
                        "stratad: disconnecting client {}: it does not read its events",
                        s.conn
                    );
                    s.stream.shutdown();
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Subscribes to `bus` and delivers its events on a thread of its own until the bus
    /// is gone.
    pub(crate) fn start(self: &Arc<Self>, bus: &EventBus) -> std::io::Result<()> {
        let rx: Receiver<Event> = bus.subscribe();
        let fanout = self.clone();
        std::thread::Builder::new()
            .name("events".to_string())
            .spawn(move || {
                for event in rx {
                    fanout.deliver(&event);
                }
            })
            .map(drop)
    }
}
