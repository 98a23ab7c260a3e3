//! Events: emitted by the admin thread (node added/removed, later jobs, quorum, I/O
//! errors), delivered to every subscribed client as a JSON-RPC notification or a QMP
//! event with its timestamp.

use serde_json::Value;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// QEMU-style name: `BLOCK_NODE_ADDED`, `JOB_STATUS_CHANGE`.
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QMP's `timestamp`.
    pub seconds: u64,
    pub microseconds: u32,
}

impl Event {
    pub fn now(name: impl Into<String>, data: Value) -> Event {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Event {
            name: name.into(),
            data,
            seconds: t.as_secs(),
            microseconds: t.subsec_micros(),
        }
    }
}

/// Fans events out to subscribers. Cloning shares the subscriber list.
#[derive(Clone, Debug, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<Sender<Event>>>>,
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::default()
    }

    /// A new subscriber; it receives every event emitted from now on until the receiver
    /// is dropped.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.lock().push(tx);
        rx
    }

    /// Sends `name` with `data` to every live subscriber.
    pub fn emit(&self, name: &str, data: Value) {
        let event = Event::now(name, data);
        self.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<Event>>> {
        // A panic while holding this lock cannot leave the list inconsistent.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_each_event_and_dropped_ones_are_forgotten() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.emit("BLOCK_NODE_ADDED", serde_json::json!({"node-name": "n0"}));
        assert_eq!(a.recv().unwrap().name, "BLOCK_NODE_ADDED");
        drop(a);
        bus.emit("X", Value::Null);
        assert_eq!(b.recv().unwrap().name, "BLOCK_NODE_ADDED");
        assert_eq!(b.recv().unwrap().name, "X");
        assert_eq!(bus.lock().len(), 1);
    }
}
