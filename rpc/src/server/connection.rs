//! One client connection: a reader thread that runs the protocol and a writer thread.
//!
//! ```text
//!   socket --read--> Splitter --Frame--> Protocol::frame --AdminHandle::call--> admin
//!                                              | Session::send
//!                                              v
//!   socket <--write-- writer thread <-- bounded queue <-- Fanout (events, try_send)
//! ```
//!
//! The reader runs one request at a time, waiting for the admin thread's reply, so
//! replies on a connection come in request order. Replies go through the same queue as
//! events, so a client that stops reading blocks only its own reader; the event fanout
//! never waits for it (see [`super::fanout`]).
//!
//! A connection ends when the client closes it (a truncated message is dropped
//! unanswered), when the protocol says so (a message over the size limit), or when the
//! server stops: [`Hub::close_all`] shuts the read side of every socket, readers finish,
//! writers flush what was queued (the reply to `quit`) and exit.

use super::admin::AdminHandle;
use super::fanout::{EventFormat, Fanout};
use super::framing::{Frame, Splitter};
use serde::Serialize;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Largest message a client may send (one JSON value).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 128;
/// Messages queued for a client that is not reading before it is disconnected.
const QUEUE_DEPTH: usize = 4096;
/// How long stopping waits for queued replies to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// A serialized message, newline included.
pub(crate) type Outgoing = Vec<u8>;

/// `value` as one line (or pretty-printed lines for QMP's `pretty=on`).
pub(crate) fn encode(value: &impl Serialize, pretty: bool) -> Outgoing {
    let mut out = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    }
    .expect("BUG: a reply always serializes (string keys, finite numbers)");
    out.push(b'\n');
    out
}

/// A client socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown_how(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    /// Ends the connection both ways (its threads see EOF or write errors).
    pub(crate) fn shutdown(&self) {
        self.shutdown_how(Shutdown::Both);
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => (&*s).write_all(buf),
            Stream::Tcp(s) => (&*s).write_all(buf),
        }
    }
}

/// What a protocol handler may do to its connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) admin: AdminHandle,
    out: SyncSender<Outgoing>,
    pretty: bool,
    pub(super) subscribe: Option<EventFormat>,
}

impl Session {
    pub(crate) fn new(admin: AdminHandle, out: SyncSender<Outgoing>, pretty: bool) -> Session {
        Session {
            admin,
            out,
            pretty,
            subscribe: None,
        }
    }

    /// Queues `value` for the client. A client that has gone away loses it silently.
    pub(crate) fn send(&self, value: &impl Serialize) {
        let _ = self.out.send(encode(value, self.pretty));
    }

    /// Starts event delivery once the replies to the current message are queued, so a
    /// client sees the reply to its subscription before the first event.
    pub(crate) fn subscribe_events(&mut self, format: EventFormat) {
        self.subscribe = Some(format);
    }
}

/// What a protocol says after a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// Close the connection once what is queued is written.
    Close,
}

/// A wire protocol: JSON-RPC 2.0 or QMP.
pub(crate) trait Protocol: Send {
    /// Sent when a client connects (QMP's greeting).
    fn greeting(&mut self, _session: &mut Session) {}
    /// One message (a complete JSON value's bytes, or "too large").
    fn frame(&mut self, frame: Frame, session: &mut Session) -> Flow;
}

/// What every connection of a server shares.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) admin: AdminHandle,
    pub(crate) fanout: Arc<Fanout>,
    conns: Mutex<HashMap<u64, Stream>>,
    gone: Condvar,
    next_id: AtomicU64,
    /// Set by [`Hub::close_all`]: new connections are refused.
    closing: AtomicBool,
}

impl Hub {
    pub(crate) fn new(admin: AdminHandle, fanout: Arc<Fanout>) -> Hub {
        Hub {
            admin,
            fanout,
            conns: Mutex::new(HashMap::new()),
            gone: Condvar::new(),
            next_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stream>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection; `None` if the server is full.
    fn register(&self, stream: &Stream) -> Option<u64> {
        let mut conns = self.lock();
        if conns.len() >= MAX_CONNECTIONS || self.closing.load(Ordering::Relaxed) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, stream.try_clone().ok()?);
        Some(id)
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
        self.gone.notify_all();
    }

    /// Ends every connection: no more requests are read, replies already queued are
    /// written (waiting at most [`FLUSH_TIMEOUT`]), then the sockets are closed.
    pub(crate) fn close_all(&self) {
        {
            let conns = self.lock();
            self.closing.store(true, Ordering::Relaxed);
            for s in conns.values() {
                s.shutdown_how(Shutdown::Read);
            }
        }
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut conns = self.lock();
        while !conns.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                for s in conns.values() {
                    s.shutdown();
                }
                break;
            }
            conns = self
                .gone
                .wait_timeout(conns, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Serves one client until it goes away. Runs on a thread of its own.
pub(crate) fn serve(hub: Arc<Hub>, stream: Stream, mut proto: Box<dyn Protocol>, pretty: bool) {
    let Some(id) = hub.register(&stream) else {
        if !hub.closing.load(Ordering::Relaxed) {
            eprintln!(
                "stratad: refusing a connection: {MAX_CONNECTIONS} clients already connected"
            );
        }
        stream.shutdown();
        return;
    };
    let (tx, rx) = sync_channel::<Outgoing>(QUEUE_DEPTH);
    let writer = match stream.try_clone().and_then(|w| {
        std::thread::Builder::new()
            .name(format!("client-{id}-out"))
            .spawn(move || write_loop(w, rx))
    }) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("stratad: cannot serve a client: {e}");
            stream.shutdown();
            hub.unregister(id);
            return;
        }
    };
    let mut session = Session::new(hub.admin.clone(), tx, pretty);
    proto.greeting(&mut session);
    read_loop(&hub, id, &stream, proto.as_mut(), &mut session);
    hub.fanout.remove(id);
    drop(session);
    // The writer ends once the queue is drained (its last sender just went away).
    let _ = writer.join();
    stream.shutdown();
    hub.unregister(id);
}

fn read_loop(hub: &Hub, id: u64, stream: &Stream, proto: &mut dyn Protocol, s: &mut Session) {
    let mut splitter = Splitter::new(MAX_MESSAGE);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        splitter.feed(&buf[..n]);
        while let Some(frame) = splitter.next_frame() {
            if handle(hub, id, stream, proto, s, frame) == Flow::Close {
                return;
            }
        }
    }
    // End of input: a bare scalar ends here; a truncated object is dropped unanswered.
    if let Some(frame) = splitter.finish() {
        handle(hub, id, stream, proto, s, frame);
    }
}

fn handle(
    hub: &Hub,
    id: u64,
    stream: &Stream,
    proto: &mut dyn Protocol,
    s: &mut Session,
    frame: Frame,
) -> Flow {
    let flow = proto.frame(frame, s);
    if let Some(format) = s.subscribe.take()
        && let Ok(events_stream) = stream.try_clone()
    {
        hub.fanout
            .add(id, s.out.clone(), format, s.pretty, events_stream);
    }
    flow
}

fn write_loop(stream: Stream, rx: Receiver<Outgoing>) {
    for msg in rx {
        if stream.write_all(&msg).is_err() {
            // The client is gone: stop its reader too; later messages are dropped.
            stream.shutdown();
            return;
        }
    }
}
