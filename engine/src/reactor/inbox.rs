//! Inboxes: how reactors and other threads talk to a reactor.
//!
//! Each reactor has one bounded multi-producer queue ([`crossbeam_queue::ArrayQueue`]) of
//! typed [`Message`]s and an eventfd whose read is always armed in the reactor's ring, so a
//! reactor sleeping in `io_uring_enter` wakes when a message arrives. Senders write the
//! eventfd only when the reactor said it is going to sleep (`sleeping`), so a busy reactor
//! costs its senders one queue push and no system call.
//!
//! # A full inbox
//!
//! SPDK aborts the process when a message cannot be queued. We never drop a message and
//! never abort:
//! - a **reactor** sending to a full inbox parks the message in its own outbox for that
//!   target and retries on every loop iteration, keeping per-target order (later messages
//!   queue behind parked ones). A reactor never blocks on another, so two reactors
//!   flooding each other cannot deadlock;
//! - **any other thread** (the admin thread, a test) waits for room, backing off from
//!   spinning to short sleeps: back-pressure on the control plane.

use crossbeam_queue::ArrayQueue;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A message to a reactor. Later subsystems (graph drain, publish) add their variants.
pub enum Message {
    /// Poll a task of this reactor (a cross-thread waker fired).
    Wake { index: u32, generation: u16 },
    /// Run a closure on the reactor (it may spawn tasks there).
    Run(Box<dyn FnOnce() + Send>),
    /// Apply a step of a graph change (see `graph::drain`).
    Graph(crate::graph::Update),
    /// Leave the loop: drop all tasks, wait for in-flight I/O, exit the thread.
    Stop,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Wake { index, generation } => write!(f, "Wake({index}#{generation})"),
            Message::Run(_) => f.write_str("Run(..)"),
            Message::Graph(u) => write!(f, "Graph({u:?})"),
            Message::Stop => f.write_str("Stop"),
        }
    }
}

/// The receiving side of a reactor's messages, shared with every sender.
pub(crate) struct Inbox {
    queue: ArrayQueue<Message>,
    eventfd: OwnedFd,
    sleeping: AtomicBool,
    /// Set when the reactor has stopped (or died): messages are dropped on arrival, so
    /// their reply senders cancel and nobody waits on a reactor that will never answer.
    closed: AtomicBool,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> std::io::Result<Inbox> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inbox {
            queue: ArrayQueue::new(capacity.max(2)),
            eventfd,
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Queues `msg` if there is room, waking the reactor if it sleeps.
    pub(crate) fn try_push(&self, msg: Message) -> Result<(), Message> {
        if self.closed.load(Ordering::Acquire) {
            drop(msg);
            return Ok(());
        }
        self.queue.push(msg)?;
        self.kick();
        Ok(())
    }

    /// Queues `msg`, waiting for room (for threads that are not reactors).
    pub(crate) fn push_blocking(&self, mut msg: Message) {
        let mut spins = 0u32;
        loop {
            match self.try_push(msg) {
                Ok(()) => return,
                Err(back) => msg = back,
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn kick(&self) {
        // Pairs with the fence in `prepare_sleep`: either the reactor sees our message,
        // or we see its `sleeping` flag (Dekker).
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            let n =
                unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            // EAGAIN means the counter is saturated: the reactor is being woken anyway.
            debug_assert!(
                n == 8 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
            );
        }
    }

    /// Marks the reactor gone and drops what is queued (their repliers cancel).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        while let Some(msg) = self.queue.pop() {
            drop(msg);
        }
    }

    pub(crate) fn pop(&self) -> Option<Message> {
        self.queue.pop()
    }

    /// Announces that the reactor is about to sleep. Returns false (and withdraws the
    /// announcement) if a message arrived meanwhile.
    pub(crate) fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() {
            true
        } else {
            self.sleeping.store(false, Ordering::Relaxed);
            false
        }
    }

    pub(crate) fn woke(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }
}

// ---- replies ---------------------------------------------------------------------------

/// The sender was dropped without replying (the reactor stopped, or the work panicked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canceled;

impl fmt::Display for Canceled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reactor dropped the request without replying")
    }
}

impl std::error::Error for Canceled {}

struct ReplyState<T> {
    value: Option<T>,
    closed: bool,
    waker: Option<Waker>,
}

struct ReplyShared<T> {
    state: Mutex<ReplyState<T>>,
    cond: Condvar,
}

/// The receiving half of a one-shot reply: `.wait()` from a plain thread, `.await` from
/// a reactor task. Control-path only (it uses a mutex).
pub struct Reply<T> {
    shared: Arc<ReplyShared<T>>,
}

/// The sending half of a [`Reply`]. Dropping it unsent cancels the reply.
pub struct Replier<T> {
    shared: Arc<ReplyShared<T>>,
    sent: bool,
}

/// A connected reply pair.
pub fn reply_pair<T>() -> (Replier<T>, Reply<T>) {
    let shared = Arc::new(ReplyShared {
        state: Mutex::new(ReplyState {
            value: None,
            closed: false,
            waker: None,
        }),
        cond: Condvar::new(),
    });
    (
        Replier {
            shared: shared.clone(),
            sent: false,
        },
        Reply { shared },
    )
}

impl<T> Replier<T> {
    pub fn send(mut self, value: T) {
        self.sent = true;
        self.finish(Some(value));
    }

    fn finish(&self, value: Option<T>) {
        let waker = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.value = value;
            st.closed = true;
            st.waker.take()
        };
        self.shared.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Replier<T> {
    fn drop(&mut self) {
        if !self.sent {
            self.finish(None);
        }
    }
}

impl<T> Reply<T> {
    /// Blocks the calling thread until the reply arrives. Must not be called on a reactor
    /// thread (it would stop that reactor): use `.await` there.
    pub fn wait(self) -> Result<T, Canceled> {
        assert!(
            !super::on_reactor(),
            "BUG: Reply::wait on a reactor thread; await it instead"
        );
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.closed {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.value.take().ok_or(Canceled)
    }

    /// Like [`Reply::wait`] with a limit; `Err(None)` on timeout.
    pub fn wait_timeout(self, limit: Duration) -> Result<T, Option<Canceled>> {
        assert!(
            !super::on_reactor(),
            "BUG: Reply::wait_timeout on a reactor thread"
        );
        let deadline = Instant::now() + limit;
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.closed {
            let now = Instant::now();
            if now >= deadline {
                return Err(None);
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.value.take().ok_or(Some(Canceled))
    }
}

impl<T> std::future::Future for Reply<T> {
    type Output = Result<T, Canceled>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return Poll::Ready(st.value.take().ok_or(Canceled));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reply")
    }
}

impl<T> fmt::Debug for Replier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Replier")
    }
}
