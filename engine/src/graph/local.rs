//! The graph as one reactor sees it: a [`LocalNode`] per node, holding that reactor's
//! checked [`Handle`] to the node's queue, an in-flight count and a drained flag.
//!
//! Requests enter a node through [`LocalNode::submit`], whether they come from a user
//! (an export, a benchmark job) or from a parent node's queue (a raw node forwards to
//! its `file` child through a [`Child`], which is an `Rc<LocalNode>`). Each entry counts
//! while it is in flight. A drained node parks new requests until it is undrained; the
//! admin thread swaps handles only while the node is drained and idle, so no request
//! ever runs against a half-changed graph, and the data path takes no lock: everything
//! here is `!Send` state of one reactor thread.
//!
//! Parents hold their children's `LocalNode`, not their handles, so replacing a child's
//! queue does not touch its parents; replacing the child itself (re-parenting) rebuilds
//! the parent's queue. See `drain.rs` for the protocol that drives these objects.

use crate::driver::{Handle, IoFuture};
use crate::errno::Errno;
use crate::request::{Completion, Request};
use crate::{Driver, DriverInfo};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A graph node's identity, stable for the node's life (names are for people).
pub type NodeId = u64;

/// One node on one reactor.
pub struct LocalNode {
    id: NodeId,
    handle: RefCell<Option<Handle>>,
    in_flight: Cell<usize>,
    drained: Cell<bool>,
    parked: RefCell<Vec<Waker>>,
    idle: RefCell<Option<Waker>>,
}

impl LocalNode {
    pub(crate) fn new(id: NodeId, handle: Handle) -> Rc<LocalNode> {
        Rc::new(LocalNode {
            id,
            handle: RefCell::new(Some(handle)),
            in_flight: Cell::new(0),
            drained: Cell::new(false),
            parked: RefCell::new(Vec::new()),
            idle: RefCell::new(None),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Size, limits and supported ops of the node as this reactor's handle sees them;
    /// `None` once the node has been deleted.
    pub fn info(&self) -> Option<DriverInfo> {
        self.handle.borrow().as_ref().map(|h| *h.info())
    }

    /// Requests of this node still running on this reactor.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Starts `req` on this node. While the node is drained the request waits; once the
    /// node is deleted it fails with `ENODEV`.
    pub fn submit(self: &Rc<Self>, req: Request) -> IoFuture {
        if self.drained.get() {
            let node = self.clone();
            return IoFuture::pending(async move {
                Undrained { node: &node }.await;
                node.submit(req).await
            });
        }
        let fut = match &*self.handle.borrow() {
            Some(handle) => handle.submit(req),
            None => return IoFuture::ready(req, Err(Errno::ENODEV)),
        };
        match fut {
            IoFuture::Ready(_) => fut,
            IoFuture::Pending(inner) => {
                self.in_flight.set(self.in_flight.get() + 1);
                IoFuture::pending(Counted {
                    node: self.clone(),
                    inner,
                    done: false,
                })
            }
        }
    }

    /// Parks new requests; returns once none is in flight here.
    pub(crate) async fn drain(&self) {
        self.drained.set(true);
        Idle { node: self }.await;
    }

    /// Lets parked and new requests run again.
    pub(crate) fn undrain(&self) {
        self.drained.set(false);
        for waker in self.parked.take() {
            waker.wake();
        }
    }

    /// Installs a new handle (or none: the node was deleted) and returns the old one.
    /// Only called on a drained, idle node.
    pub(crate) fn replace_handle(&self, handle: Option<Handle>) -> Option<Handle> {
        debug_assert!(self.drained.get() && self.in_flight.get() == 0);
        self.handle.replace(handle)
    }

    fn finished_one(&self) {
        let n = self.in_flight.get() - 1;
        self.in_flight.set(n);
        if n == 0
            && let Some(waker) = self.idle.take()
        {
            waker.wake();
        }
    }
}

impl fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalNode")
            .field("id", &self.id)
            .field("in_flight", &self.in_flight.get())
            .field("drained", &self.drained.get())
            .finish()
    }
}

/// Counts a request as in flight until it completes or its future is dropped.
struct Counted {
    node: Rc<LocalNode>,
    inner: Pin<Box<dyn Future<Output = Completion>>>,
    done: bool,
}

impl Future for Counted {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let c = std::task::ready!(self.inner.as_mut().poll(cx));
        self.done = true;
        self.node.finished_one();
        Poll::Ready(c)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if !self.done {
            // An abandoned request: its ring op is cancelled by the ring, the graph no
            // longer waits for it.
            self.node.finished_one();
        }
    }
}

struct Undrained<'a> {
    node: &'a LocalNode,
}

impl Future for Undrained<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.node.drained.get() {
            self.node.parked.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

struct Idle<'a> {
    node: &'a LocalNode,
}

impl Future for Idle<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.node.in_flight.get() == 0 {
            Poll::Ready(())
        } else {
            *self.node.idle.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A parent's reference to a child node on this reactor: what a filter or format
/// driver's queue submits its child requests to.
#[derive(Clone, Debug)]
pub struct Child(Rc<LocalNode>);

impl Child {
    /// A child outside any graph (strata-perf and tests opening a driver stack
    /// directly): opens `driver`'s queue on this reactor, never drained.
    pub fn standalone(driver: &dyn Driver) -> Result<Child, Errno> {
        Ok(Child(LocalNode::new(0, Handle::open(driver)?)))
    }

    pub(crate) fn from_node(node: Rc<LocalNode>) -> Child {
        Child(node)
    }

    /// Starts `req` on the child.
    pub fn submit(&self, req: Request) -> IoFuture {
        self.0.submit(req)
    }

    /// The child's current limits (`None` if it was deleted under us).
    pub fn info(&self) -> Option<DriverInfo> {
        self.0.info()
    }

    pub fn node(&self) -> &Rc<LocalNode> {
        &self.0
    }
}

/// The children a node's queue is opened with, by child name (`file`, `backing`).
#[derive(Debug, Default)]
pub struct Children {
    list: Vec<(String, Child)>,
}

impl Children {
    /// No children: leaf drivers, or a driver stack opened outside the graph (each
    /// driver then opens its children's queues itself with [`Child::standalone`]).
    pub fn none() -> Children {
        Children::default()
    }

    pub fn push(&mut self, name: impl Into<String>, child: Child) {
        self.list.push((name.into(), child));
    }

    pub fn get(&self, name: &str) -> Option<&Child> {
        self.list.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The child `name` from the graph, or, outside a graph, a standalone queue opened
    /// from `driver` (the driver object the parent was opened with).
    pub fn get_or_open(&self, name: &str, driver: &dyn Driver) -> Result<Child, Errno> {
        match self.get(name) {
            Some(c) => Ok(c.clone()),
            None => Child::standalone(driver),
        }
    }
}
