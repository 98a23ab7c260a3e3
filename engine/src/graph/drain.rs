//! The drain protocol: how a graph change reaches the reactors without a lock on the
//! data path.
//!
//! ```text
//!  admin thread                         every reactor (in parallel)
//!  ------------                         ---------------------------
//!  prepare: validate, open drivers,
//!  compute and check permissions
//!  Prepare{open, drain} ------------->  open the queues the change needs (staged, not
//!                                       yet visible); then drain the affected nodes,
//!                                       parents first: park new requests, wait until
//!                                       none is in flight
//!                       <-------------  Ok (or the errno of a failed queue open)
//!  any error: Abort ----------------->  drop staged queues, undrain: old graph intact
//!  commit: set permissions,
//!  swap the authoritative graph
//!  Commit{remove} ------------------->  install staged queues, remove deleted nodes,
//!                                       undrain: parked requests run on the new graph
//!                       <-------------  done (old queues are dropped by now)
//!  drop deleted drivers (closing files)
//! ```
//!
//! Ownership: the admin thread owns the authoritative graph and is the only sender of
//! [`Update`]s, one transaction at a time, so a reactor never sees two changes
//! interleave. Each reactor owns its [`LocalNode`]s in a thread-local table; only that
//! reactor's thread touches them. Drain order matters: a node's in-flight requests may
//! be waiting on its children, so parents are drained (and become idle) before their
//! children are drained, which keeps drain from waiting on itself.
//!
//! Which nodes a change drains: those whose queue or children change (a re-parented
//! node, a deleted node). Adding a node changes no existing queue, so it pauses no I/O.

use super::local::{Child, Children, LocalNode, NodeId};
use crate::Driver;
use crate::driver::Handle;
use crate::errno::Errno;
use crate::reactor::{self, Replier};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

/// A queue a reactor must open for a change: for a new node, or a node whose children
/// changed.
#[derive(Clone)]
pub(crate) struct OpenSpec {
    pub id: NodeId,
    pub driver: Arc<dyn Driver>,
    /// Child name and node, as the queue is to see them.
    pub children: Vec<(String, NodeId)>,
}

/// A graph message to one reactor (see the module docs).
pub struct Update(Kind);

enum Kind {
    Prepare {
        open: Vec<OpenSpec>,
        drain: Vec<NodeId>,
        reply: Replier<Result<(), Errno>>,
    },
    Commit {
        remove: Vec<NodeId>,
        reply: Replier<()>,
    },
    Abort {
        reply: Replier<()>,
    },
}

impl fmt::Debug for Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Prepare { open, drain, .. } => {
                let open: Vec<_> = open.iter().map(|o| o.id).collect();
                write!(f, "Prepare(open {open:?}, drain {drain:?})")
            }
            Kind::Commit { remove, .. } => write!(f, "Commit(remove {remove:?})"),
            Kind::Abort { .. } => f.write_str("Abort"),
        }
    }
}

impl Update {
    pub(crate) fn prepare(
        open: Vec<OpenSpec>,
        drain: Vec<NodeId>,
        reply: Replier<Result<(), Errno>>,
    ) -> Update {
        Update(Kind::Prepare { open, drain, reply })
    }

    pub(crate) fn commit(remove: Vec<NodeId>, reply: Replier<()>) -> Update {
        Update(Kind::Commit { remove, reply })
    }

    pub(crate) fn abort(reply: Replier<()>) -> Update {
        Update(Kind::Abort { reply })
    }
}

/// A reactor's view of the graph.
#[derive(Default)]
struct Table {
    nodes: HashMap<NodeId, Rc<LocalNode>>,
    /// Queues opened by a prepared change, installed on commit.
    staged: Vec<Staged>,
    /// Nodes drained by the prepared change.
    drained: Vec<Rc<LocalNode>>,
}

enum Staged {
    /// A node that does not exist yet.
    New(Rc<LocalNode>),
    /// A new queue for an existing node.
    Reopen(NodeId, Handle),
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// This reactor's node `id`, if the graph has it. Users (exports, benchmark jobs) call
/// this once and then submit through the node.
pub fn node(id: NodeId) -> Option<Rc<LocalNode>> {
    TABLE.with(|t| t.borrow().nodes.get(&id).cloned())
}

/// Handles a graph message on the current reactor (called by the reactor loop).
pub(crate) fn handle(update: Update) {
    match update.0 {
        Kind::Prepare { open, drain, reply } => {
            if let Err(e) = stage(&open) {
                TABLE.with(|t| t.borrow_mut().staged.clear());
                reply.send(Err(e));
                return;
            }
            let nodes: Vec<_> = TABLE.with(|t| {
                let t = t.borrow();
                drain
                    .iter()
                    .filter_map(|id| t.nodes.get(id).cloned())
                    .collect()
            });
            reactor::spawn(async move {
                for node in &nodes {
                    node.drain().await;
                }
                TABLE.with(|t| t.borrow_mut().drained = nodes);
                reply.send(Ok(()));
            });
        }
        Kind::Commit { remove, reply } => {
            let (old, drained) = TABLE.with(|t| {
                let mut t = t.borrow_mut();
                let mut old = Vec::new();
                for staged in std::mem::take(&mut t.staged) {
                    match staged {
                        Staged::New(node) => {
                            t.nodes.insert(node.id(), node);
                        }
                        Staged::Reopen(id, handle) => {
                            let node = t.nodes.get(&id).expect("BUG: reopened node exists");
                            old.push(node.replace_handle(Some(handle)));
                        }
                    }
                }
                for id in &remove {
                    if let Some(node) = t.nodes.remove(id) {
                        old.push(node.replace_handle(None));
                    }
                }
                (old, std::mem::take(&mut t.drained))
            });
            // Old queues go before anyone runs again, outside the table borrow.
            drop(old);
            for node in drained {
                node.undrain();
            }
            reply.send(());
        }
        Kind::Abort { reply } => {
            let drained = TABLE.with(|t| {
                let mut t = t.borrow_mut();
                t.staged.clear();
                std::mem::take(&mut t.drained)
            });
            for node in drained {
                node.undrain();
            }
            reply.send(());
        }
    }
}

/// Opens the queues of a change, children before parents, without making them visible.
fn stage(open: &[OpenSpec]) -> Result<(), Errno> {
    for spec in open {
        let children = TABLE.with(|t| {
            let t = t.borrow();
            let mut children = Children::none();
            for (name, id) in &spec.children {
                let staged = t.staged.iter().find_map(|s| match s {
                    Staged::New(n) if n.id() == *id => Some(n.clone()),
                    _ => None,
                });
                let node = staged
                    .or_else(|| t.nodes.get(id).cloned())
                    .ok_or(Errno::ENODEV)?;
                children.push(name.clone(), Child::from_node(node));
            }
            Ok::<_, Errno>(children)
        })?;
        let handle = Handle::open_with(&*spec.driver, &children)?;
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let staged = if t.nodes.contains_key(&spec.id) {
                Staged::Reopen(spec.id, handle)
            } else {
                Staged::New(LocalNode::new(spec.id, handle))
            };
            t.staged.push(staged);
        });
    }
    Ok(())
}
