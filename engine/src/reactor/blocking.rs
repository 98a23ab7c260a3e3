//! A small pool of helper threads for the rare system calls io_uring cannot do
//! asynchronously (`lseek(SEEK_DATA)`, `ioctl`, image creation): a reactor hands the call
//! to the pool and awaits the [`Reply`], so the reactor itself never blocks.
//!
//! The pool's queue is behind a mutex: it is not on the data path of reads and writes,
//! only of these exceptional calls. Threads start on first use and stay (at most
//! [`MAX_THREADS`]); each waits on a condition variable when there is nothing to do.

use super::inbox::{Reply, reply_pair};
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// Most helper threads.
pub const MAX_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    queue: Mutex<(VecDeque<Job>, usize, usize)>, // jobs, threads, idle threads
    cond: Condvar,
}

static POOL: Pool = Pool {
    queue: Mutex::new((VecDeque::new(), 0, 0)),
    cond: Condvar::new(),
};

/// Runs `f` on a helper thread; await (on a reactor) or `wait()` (elsewhere) the result.
pub fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Reply<R> {
    let (tx, rx) = reply_pair();
    let job: Job = Box::new(move || tx.send(f()));
    let mut q = POOL.queue.lock().unwrap_or_else(|e| e.into_inner());
    q.0.push_back(job);
    if q.2 == 0 && q.1 < MAX_THREADS {
        q.1 += 1;
        let spawned = std::thread::Builder::new()
            .name("strata-blocking".into())
            .spawn(worker);
        if spawned.is_err() {
            q.1 -= 1;
        }
    }
    drop(q);
    POOL.cond.notify_one();
    rx
}

fn worker() {
    let mut q = POOL.queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = q.0.pop_front() {
            drop(q);
            // A panicking job drops its Replier: the caller sees Canceled.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            q = POOL.queue.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        q.2 += 1;
        q = POOL.cond.wait(q).unwrap_or_else(|e| e.into_inner());
        q.2 -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_the_call_elsewhere_and_replies() {
        let here = std::thread::current().id();
        let there = blocking(move || std::thread::current().id())
            .wait()
            .unwrap();
        assert_ne!(here, there);
        let rs: Vec<_> = (0..20).map(|i| blocking(move || i * 2)).collect();
        let sum: i32 = rs.into_iter().map(|r| r.wait().unwrap()).sum();
        assert_eq!(sum, (0..20).map(|i| i * 2).sum::<i32>());
    }
}
