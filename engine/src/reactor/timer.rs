//! Timers: a min-heap of deadlines per reactor, checked once per loop iteration and used
//! as the timeout of the reactor's sleep.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

struct Entry {
    deadline: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

impl Timers {
    pub(crate) fn add(&mut self, deadline: Instant, waker: Waker) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            deadline,
            seq: self.seq,
            waker,
        }));
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.0.deadline)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Removes the timers due at `now`, returning their wakers.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<Waker>) {
        while self.heap.peek().is_some_and(|e| e.0.deadline <= now) {
            out.push(self.heap.pop().expect("BUG: peeked timer vanished").0.waker);
        }
    }
}

/// Future returned by [`sleep`](super::sleep) and [`sleep_until`](super::sleep_until).
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    /// The waker registered last; a poll with a different one registers again (a stale
    /// entry only causes a spurious wake).
    registered: Option<Waker>,
}

impl Sleep {
    pub(crate) fn new(deadline: Instant) -> Sleep {
        Sleep {
            deadline,
            registered: None,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.registered = Some(cx.waker().clone());
            let deadline = self.deadline;
            super::with_core(|core| core.timers.borrow_mut().add(deadline, cx.waker().clone()));
        }
        Poll::Pending
    }
}

/// How long until `deadline`, zero if past.
pub(crate) fn until(deadline: Instant, now: Instant) -> Duration {
    deadline.saturating_duration_since(now)
}
