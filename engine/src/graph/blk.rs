//! [`Blk`]: a user's entry to a node on one reactor (QEMU's BlockBackend on the data
//! path). Exports and benchmark jobs submit through it; it reports failed requests so
//! the control plane can emit `BLOCK_IO_ERROR`.
//!
//! Reports go into one bounded lock-free queue that the admin thread empties
//! ([`take_io_errors`]). A reactor never waits on it: when it is full, reports are
//! counted as dropped instead (an error storm must not slow the data path).

use super::drain;
use super::local::{LocalNode, NodeId};
use super::state::UserId;
use crate::driver::IoFuture;
use crate::errno::Errno;
use crate::request::{Completion, Op, ReqFlags, Request};
use crossbeam_queue::ArrayQueue;
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed user request, for `BLOCK_IO_ERROR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoErrorReport {
    pub user: UserId,
    pub node: NodeId,
    pub op: Op,
    pub errno: Errno,
}

const REPORT_CAPACITY: usize = 1024;

static REPORTS: OnceLock<ArrayQueue<IoErrorReport>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn reports() -> &'static ArrayQueue<IoErrorReport> {
    REPORTS.get_or_init(|| ArrayQueue::new(REPORT_CAPACITY))
}

/// Takes the queued I/O error reports and the number dropped since the last call.
pub fn take_io_errors() -> (Vec<IoErrorReport>, u64) {
    let q = reports();
    let mut out = Vec::with_capacity(q.len());
    while let Some(r) = q.pop() {
        out.push(r);
    }
    (out, DROPPED.swap(0, Ordering::Relaxed))
}

/// A user's handle to its node on the current reactor.
#[derive(Debug)]
pub struct Blk {
    node: Rc<LocalNode>,
    user: UserId,
}

impl Blk {
    /// The handle of user `user` (attached with `Graph::attach_user`) to node `node`, on
    /// this reactor; `None` if the node is not in the graph.
    pub fn open(user: UserId, node: NodeId) -> Option<Blk> {
        Some(Blk {
            node: drain::node(node)?,
            user,
        })
    }

    pub fn node(&self) -> &Rc<LocalNode> {
        &self.node
    }

    /// Runs `req`; a failure is also reported for `BLOCK_IO_ERROR`.
    pub async fn io(&self, req: Request) -> Completion {
        // Awaiting even an immediate completion spends the task's cooperative budget,
        // so a loop over a RAM node still lets the reactor read its inbox.
        self.submit(req).await
    }

    /// Starts `req` and returns its future, reporting a failure like [`Blk::io`]. An
    /// immediate completion comes back as [`IoFuture::Ready`], which a caller that runs
    /// many requests (an export's connection) can take without a task per request.
    pub fn submit(&self, req: Request) -> IoFuture {
        let op = req.op;
        // A write-zeroes that must not fall back fails with ENOTSUP by design: that is
        // an answer for the caller, not an I/O error.
        let expected = req
            .flags
            .contains(ReqFlags::NO_FALLBACK)
            .then_some(Errno::ENOTSUP);
        match self.node.submit(req) {
            IoFuture::Ready(Some(c)) => {
                if let Err(errno) = c.result {
                    report(self.user, self.node.id(), op, errno, expected);
                }
                IoFuture::Ready(Some(c))
            }
            IoFuture::Ready(None) => IoFuture::Ready(None),
            IoFuture::Pending(inner) => {
                let (user, node) = (self.user, self.node.id());
                IoFuture::pending(async move {
                    let c = inner.await;
                    if let Err(errno) = c.result {
                        report(user, node, op, errno, expected);
                    }
                    c
                })
            }
        }
    }
}

fn report(user: UserId, node: NodeId, op: Op, errno: Errno, expected: Option<Errno>) {
    if expected == Some(errno) {
        return;
    }
    let report = IoErrorReport {
        user,
        node,
        op,
        errno,
    };
    if reports().push(report).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}
