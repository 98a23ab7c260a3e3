//! The block graph: named nodes joined by named, permission-carrying edges, changed only
//! by the admin thread through the drain protocol.
//!
//! ```text
//!   admin thread: Graph                         reactor N: drain::TABLE
//!   +---------------------------------+          +-------------------------+
//!   | State { nodes, users }          |  Update  | LocalNode per node:     |
//!   |   Node: name, Arc<dyn Driver>,  | -------> |   Handle (checked queue)|
//!   |         options, children[Edge] |          |   in-flight, drained    |
//!   |   Edge: name, role, perm/shared |          +-------------------------+
//!   |   User: desc, node, perm/shared |              ^ users submit here;
//!   +---------------------------------+              | parents reach children
//!     every change: clone State -> change -> refresh_perms -> drivers check_perm
//!                   -> drain::Prepare -> commit (set_perm, swap) -> drain::Commit
//! ```
//!
//! - [`perm`]: permission bits, child roles, QEMU's default child permissions.
//! - [`state`]: the authoritative graph, the permission refresh, filter helpers.
//! - [`local`]: a reactor's view of a node ([`LocalNode`]), [`Child`], [`Children`].
//! - [`drain`]: the messages that publish a change to the reactors.
//! - [`blk`]: a user's entry to its node on a reactor ([`Blk`]), with I/O error reports.

pub mod blk;
pub mod drain;
pub mod local;
pub mod perm;
pub mod state;

#[cfg(test)]
mod tests;

pub use blk::{Blk, IoErrorReport, take_io_errors};
pub use drain::Update;
pub use local::{Child, Children, LocalNode, NodeId};
pub use perm::{ChildRole, Perm, default_child_perm};
pub use state::{Edge, Node, State, User, UserId};

use crate::error::{Error, ErrorKind};
use crate::reactor::{Engine, Message, reply_pair};
use crate::request::Request;
use crate::{Driver, Errno};
use drain::OpenSpec;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What opens a driver from its options: `strata_drivers::open_node`. Drivers with
/// children open them through the [`OpenContext`].
pub type Opener = dyn Fn(&Map<String, Value>, &mut dyn OpenContext) -> Result<Arc<dyn Driver>, Error>
    + Send
    + Sync;

/// How a driver being opened gets its children (QEMU's `bdrv_open_child`).
pub trait OpenContext {
    /// Opens child `name` from `spec` (an options object opens a new node; a string
    /// references an existing node by name) and links it with `role`.
    fn open_child(
        &mut self,
        name: &str,
        spec: &Value,
        role: ChildRole,
    ) -> Result<Arc<dyn Driver>, Error>;
}

/// Options every node takes, handled by the graph rather than the driver. They are kept
/// in the node's options so that what is reported recreates the node.
const COMMON_OPTIONS: &[&str] = &["discard", "detect-zeroes", "auto-read-only", "force-share"];

/// The graph and the engine it runs on. Owned by the admin thread.
pub struct Graph {
    engine: Engine,
    opener: Arc<Opener>,
    state: State,
    next_id: u64,
    longest_pause: Duration,
    /// When the change being published first drained nodes.
    pause_start: Option<Instant>,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graph")
            .field("nodes", &self.state.nodes.len())
            .field("users", &self.state.users.len())
            .finish_non_exhaustive()
    }
}

/// What a change publishes to the reactors.
#[derive(Default)]
struct Plan {
    /// Nodes whose queues to open, children first.
    open: Vec<NodeId>,
    /// Nodes to drain (sorted parents first when published).
    drain: Vec<NodeId>,
    /// Nodes that leave the graph.
    remove: Vec<NodeId>,
}

impl Graph {
    pub fn new(engine: Engine, opener: Arc<Opener>) -> Graph {
        Graph {
            engine,
            opener,
            state: State::default(),
            next_id: 1,
            longest_pause: Duration::ZERO,
            pause_start: None,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The committed graph.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The longest time any change so far kept nodes drained (an upper bound on the I/O
    /// pause it caused: from the drain request to the undrain reply).
    pub fn longest_pause(&self) -> Duration {
        self.longest_pause
    }

    /// `blockdev-add`: opens a node (and inline children) from its options.
    pub fn add(&mut self, options: &Value) -> Result<NodeId, Error> {
        let mut cand = self.state.clone();
        let mut opened = Vec::new();
        let id = {
            let mut ctx = Ctx {
                opener: &self.opener,
                next_id: &mut self.next_id,
                cand: &mut cand,
                opened: &mut opened,
                edges: Vec::new(),
                parents: Vec::new(),
            };
            ctx.open_node(options)?
        };
        self.apply(
            cand,
            Plan {
                open: opened,
                ..Plan::default()
            },
            None,
        )?;
        Ok(id)
    }

    /// `blockdev-del`: removes a node nobody uses, with the inline children only it had.
    pub fn del(&mut self, name: &str) -> Result<(), Error> {
        let node = self.state.find(name)?;
        if node.generated {
            return Err(Error::invalid(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        let id = node.id;
        if self.state.parents(id).next().is_some() || self.state.users_of(id).next().is_some() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("Block device {name} is in use"),
            ));
        }
        let mut cand = self.state.clone();
        let removed = remove_cascade(&mut cand, id);
        self.apply(
            cand,
            Plan {
                drain: removed.clone(),
                remove: removed,
                ..Plan::default()
            },
            None,
        )
    }

    /// Points `parent`'s child `child` at node `new` (re-parenting, as `blockdev-reopen`
    /// does for `file` and `backing`). An inline child left without parents goes away.
    pub fn replace_child(&mut self, parent: &str, child: &str, new: &str) -> Result<(), Error> {
        let p = self.state.find(parent)?;
        let new_node = self.state.find(new)?;
        let (pid, new_id, new_driver) = (p.id, new_node.id, new_node.driver.clone());
        let edge = p.children.iter().find(|e| e.name == child).ok_or_else(|| {
            Error::invalid(format!("Node '{parent}' has no child named '{child}'"))
        })?;
        let old_id = edge.child;
        if old_id == new_id {
            return Ok(());
        }
        let old_driver = self.state.node(old_id).driver.clone();
        let mut cand = self.state.clone();
        let p = cand.nodes.get_mut(&pid).expect("BUG: parent exists");
        p.children
            .iter_mut()
            .find(|e| e.name == child)
            .expect("BUG: edge exists")
            .child = new_id;
        let mut removed = Vec::new();
        if cand.node(old_id).generated
            && cand.parents(old_id).next().is_none()
            && cand.users_of(old_id).next().is_none()
        {
            removed = remove_cascade(&mut cand, old_id);
        }
        // The parent and everything above it may change size or limits: each is
        // re-checked against its children and gets a fresh queue (with fresh limits).
        let above = cand.ancestors_bottom_up(pid)?;
        let parent_driver = cand.node(pid).driver.clone();
        parent_driver.replace_child(child, &new_driver)?;
        let name = child.to_string();
        let undo = move || {
            // Restoring the previous child cannot fail: the driver had it before.
            let _ = parent_driver.replace_child(&name, &old_driver);
        };
        for id in &above {
            if let Err(e) = cand.node(*id).driver.check_children() {
                undo();
                return Err(e);
            }
        }
        let undo: Option<Box<dyn FnOnce()>> = Some(Box::new(undo));
        let mut drain = above.clone();
        drain.extend(&removed);
        self.apply(
            cand,
            Plan {
                open: above,
                drain,
                remove: removed,
            },
            undo,
        )
    }

    /// Adds a user of node `name` taking `perm` and sharing `shared`. `desc` names it in
    /// conflict messages (`block export 'e0'`).
    pub fn attach_user(
        &mut self,
        desc: impl Into<String>,
        name: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<(UserId, NodeId), Error> {
        let node = self.state.find(name)?.id;
        let id = self.next_id;
        self.next_id += 1;
        let mut cand = self.state.clone();
        cand.users.insert(
            id,
            User {
                id,
                desc: desc.into(),
                node,
                perm,
                shared,
            },
        );
        self.apply(cand, Plan::default(), None)?;
        Ok((id, node))
    }

    /// Removes a user; its permissions are released.
    pub fn detach_user(&mut self, id: UserId) -> Result<(), Error> {
        let mut cand = self.state.clone();
        if cand.users.remove(&id).is_none() {
            return Err(Error::new(ErrorKind::NotFound, format!("no user {id}")));
        }
        self.apply(cand, Plan::default(), None)
    }

    /// Flushes every node, parents before children, on reactor 0. Returns the nodes whose
    /// flush failed.
    pub fn flush_all(&self) -> Vec<(String, Errno)> {
        let Ok(order) = self.state.topological() else {
            return Vec::new();
        };
        let ids = order.clone();
        let results = self
            .engine
            .spawn(0, move || async move {
                let mut failed = Vec::new();
                for id in ids {
                    if let Some(node) = drain::node(id)
                        && let Err(e) = node.submit(Request::flush()).await.result
                    {
                        failed.push((id, e));
                    }
                }
                failed
            })
            .wait()
            .unwrap_or_default();
        results
            .into_iter()
            .map(|(id, e)| (self.state.node(id).name.clone(), e))
            .collect()
    }

    /// Flushes and closes every node, then stops the reactors.
    pub fn shutdown(mut self) {
        for (name, e) in self.flush_all() {
            eprintln!("strata: flushing node '{name}' at shutdown failed: {e}");
        }
        let all: Vec<NodeId> = self.state.topological().unwrap_or_default();
        let cand = State::default();
        let plan = Plan {
            drain: all.clone(),
            remove: all,
            ..Plan::default()
        };
        if let Err(e) = self.apply(cand, plan, None) {
            eprintln!("strata: closing the graph failed: {e}");
        }
        self.engine.shutdown();
    }

    /// Runs a change: permissions, drivers' locks, then the drain protocol. On any error
    /// the committed graph is untouched and `undo` (restoring driver state the change
    /// already touched) runs.
    fn apply(
        &mut self,
        mut cand: State,
        plan: Plan,
        undo: Option<Box<dyn FnOnce()>>,
    ) -> Result<(), Error> {
        let fail = |e: Error, undo: Option<Box<dyn FnOnce()>>| {
            if let Some(u) = undo {
                u();
            }
            Err(e)
        };
        let changed = match cand.refresh_perms(&self.state) {
            Ok(c) => c,
            Err(e) => return fail(e, undo),
        };
        let mut checked: Vec<Arc<dyn Driver>> = Vec::new();
        for &id in &changed {
            let n = cand.node(id);
            if let Err(e) = n.driver.check_perm(n.perm, n.shared) {
                for d in checked {
                    Driver::abort_perm(&*d);
                }
                return fail(e, undo);
            }
            checked.push(n.driver.clone());
        }
        if let Err(e) = self.publish_prepare(&cand, &plan) {
            for d in checked {
                Driver::abort_perm(&*d);
            }
            return fail(e, undo);
        }
        for &id in &changed {
            let n = cand.node(id);
            n.driver.set_perm(n.perm, n.shared);
        }
        let old = std::mem::replace(&mut self.state, cand);
        self.publish_commit(plan.remove);
        // Removed nodes' drivers close here, after every reactor dropped their queues.
        drop(old);
        Ok(())
    }

    fn has_work(plan: &Plan) -> bool {
        !(plan.open.is_empty() && plan.drain.is_empty() && plan.remove.is_empty())
    }

    fn publish_prepare(&mut self, cand: &State, plan: &Plan) -> Result<(), Error> {
        if !Graph::has_work(plan) {
            return Ok(());
        }
        let open: Vec<OpenSpec> = plan
            .open
            .iter()
            .map(|&id| {
                let n = cand.node(id);
                OpenSpec {
                    id,
                    driver: n.driver.clone(),
                    children: n
                        .children
                        .iter()
                        .map(|e| (e.name.clone(), e.child))
                        .collect(),
                }
            })
            .collect();
        let order = self.state.topological()?;
        let drain: Vec<NodeId> = order
            .into_iter()
            .filter(|id| plan.drain.contains(id))
            .collect();
        self.pause_start = Some(Instant::now());
        let replies: Vec<_> = (0..self.engine.reactors())
            .map(|n| {
                let (tx, rx) = reply_pair();
                self.engine.send(
                    n,
                    Message::Graph(Update::prepare(open.clone(), drain.clone(), tx)),
                );
                rx
            })
            .collect();
        let mut error = None;
        for rx in replies {
            match rx.wait() {
                Ok(Ok(())) => {}
                Ok(Err(errno)) => {
                    error = Some(Error::io("opening a node's queue on a reactor", errno))
                }
                Err(_) => error = Some(Error::io("a reactor", Errno::EIO)),
            }
        }
        if let Some(e) = error {
            self.broadcast(Update::abort);
            self.pause_start = None;
            return Err(e);
        }
        Ok(())
    }

    fn publish_commit(&mut self, remove: Vec<NodeId>) {
        let Some(start) = self.pause_start.take() else {
            return;
        };
        self.broadcast(|tx| Update::commit(remove.clone(), tx));
        self.longest_pause = self.longest_pause.max(start.elapsed());
    }

    /// Sends one update to every reactor and waits for all of them.
    fn broadcast(&self, make: impl Fn(crate::reactor::Replier<()>) -> Update) {
        let replies: Vec<_> = (0..self.engine.reactors())
            .map(|n| {
                let (tx, rx) = reply_pair();
                self.engine.send(n, Message::Graph(make(tx)));
                rx
            })
            .collect();
        for rx in replies {
            // A dead reactor has no table to update.
            let _ = rx.wait();
        }
    }
}

/// Removes `id` from `state`, then every inline child left without parents; returns the
/// removed nodes, parents first.
fn remove_cascade(state: &mut State, id: NodeId) -> Vec<NodeId> {
    let mut removed = vec![id];
    let mut i = 0;
    while i < removed.len() {
        let node = state.nodes.remove(&removed[i]).expect("BUG: removed twice");
        for e in node.children {
            let orphan = state.nodes.get(&e.child).is_some_and(|c| c.generated)
                && state.parents(e.child).next().is_none()
                && state.users_of(e.child).next().is_none()
                && !removed.contains(&e.child);
            if orphan {
                removed.push(e.child);
            }
        }
        i += 1;
    }
    removed
}

/// Opening nodes into a candidate state.
struct Ctx<'a> {
    opener: &'a Arc<Opener>,
    next_id: &'a mut u64,
    cand: &'a mut State,
    /// Nodes opened by this change, children first.
    opened: &'a mut Vec<NodeId>,
    /// Children the node being opened linked so far.
    edges: Vec<Edge>,
    /// Options of the nodes being opened, innermost last (inline children inherit).
    parents: Vec<Map<String, Value>>,
}

impl Ctx<'_> {
    fn open_node(&mut self, options: &Value) -> Result<NodeId, Error> {
        let obj = options
            .as_object()
            .ok_or_else(|| Error::invalid("node options must be a JSON object"))?;
        let name = match obj.get("node-name") {
            None => None,
            Some(Value::String(s)) => Some(check_node_name(s)?),
            Some(_) => {
                return Err(Error::invalid(
                    "Invalid parameter type for 'node-name', expected: string",
                ));
            }
        };
        if let Some(name) = &name
            && self.cand.by_name(name).is_some()
        {
            return Err(Error::invalid(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        check_common_options(obj)?;
        let mut driver_opts = obj.clone();
        driver_opts.remove("node-name");
        for key in COMMON_OPTIONS {
            driver_opts.remove(*key);
        }
        let outer = std::mem::take(&mut self.edges);
        self.parents.push(obj.clone());
        let opened = (self.opener)(&driver_opts, self);
        self.parents.pop();
        let edges = std::mem::replace(&mut self.edges, outer);
        let driver = opened?;
        let mut options = obj.clone();
        options.remove("node-name");
        for e in &edges {
            options.remove(&e.name);
        }
        if options.get("force-share").is_some_and(state::is_on) && !driver.info().read_only {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        // A child given inline may have taken the name meanwhile.
        if let Some(name) = &name
            && self.cand.by_name(name).is_some()
        {
            return Err(Error::invalid(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        let id = *self.next_id;
        *self.next_id += 1;
        let (name, generated) = match name {
            Some(n) => (n, false),
            None => (format!("#block{id:03}"), true),
        };
        self.cand.nodes.insert(
            id,
            Node {
                id,
                name,
                generated,
                implicit: false,
                driver,
                options,
                children: edges,
                perm: Perm::NONE,
                shared: Perm::ALL,
            },
        );
        self.opened.push(id);
        Ok(id)
    }
}

impl OpenContext for Ctx<'_> {
    fn open_child(
        &mut self,
        name: &str,
        spec: &Value,
        role: ChildRole,
    ) -> Result<Arc<dyn Driver>, Error> {
        let id = match spec {
            Value::String(r) => {
                self.cand
                    .by_name(r)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!("Cannot find device='' nor node-name='{r}' (child '{name}')"),
                        )
                    })?
                    .id
            }
            Value::Object(child) => {
                let spec = inherit(self.parents.last(), child, role);
                self.open_node(&spec)?
            }
            _ => {
                return Err(Error::invalid(format!(
                    "Invalid parameter type for '{name}', expected: a node name or an options object"
                )));
            }
        };
        self.edges.push(Edge {
            name: name.to_string(),
            child: id,
            role,
            perm: Perm::NONE,
            shared: Perm::ALL,
        });
        Ok(self.cand.node(id).driver.clone())
    }
}

/// The options of a child given inline, with what it inherits from its parent where
/// it does not say otherwise (QEMU's `bdrv_inherited_options`): `read-only`,
/// `auto-read-only`, `discard` and each `cache.*` option; a backing child defaults to
/// read-only. Inherited values become the child's own options, so what is reported
/// recreates it.
fn inherit(
    parent: Option<&Map<String, Value>>,
    child: &Map<String, Value>,
    role: ChildRole,
) -> Value {
    let mut child = child.clone();
    if let Some(parent) = parent {
        for key in ["read-only", "auto-read-only", "discard"] {
            if let (Some(v), false) = (parent.get(key), child.contains_key(key)) {
                child.insert(key.to_string(), v.clone());
            }
        }
        if let Some(Value::Object(cache)) = parent.get("cache") {
            if let Value::Object(own) = child
                .entry("cache")
                .or_insert_with(|| Value::Object(Map::new()))
            {
                for (k, v) in cache {
                    own.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    if role.contains(ChildRole::COW) && !child.contains_key("read-only") {
        child.insert("read-only".to_string(), Value::Bool(true));
    }
    Value::Object(child)
}

/// QEMU's node-name rule: a letter first, then letters, digits, `-`, `.` and `_`, at
/// most 31 characters.
fn check_node_name(name: &str) -> Result<String, Error> {
    let ok = name.len() <= 31
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(Error::invalid(format!(
            "Invalid node-name: '{name}' (use a letter first, then letters, digits, '-', '.' or '_', at most 31 characters)"
        )))
    }
}

fn check_common_options(obj: &Map<String, Value>) -> Result<(), Error> {
    let boolean = |key: &str| match obj.get(key) {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(Value::String(s))
            if matches!(s.as_str(), "on" | "off" | "true" | "false" | "yes" | "no") =>
        {
            Ok(())
        }
        Some(_) => Err(Error::invalid(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        ))),
    };
    boolean("auto-read-only")?;
    boolean("force-share")?;
    match obj.get("discard") {
        None => {}
        Some(Value::String(s)) if matches!(s.as_str(), "ignore" | "off" | "unmap" | "on") => {}
        Some(_) => {
            return Err(Error::invalid(
                "Parameter 'discard' does not accept value (use ignore or unmap)",
            ));
        }
    }
    match obj.get("detect-zeroes") {
        None => {}
        Some(Value::String(s)) if s == "off" => {}
        Some(Value::String(s)) if s == "on" || s == "unmap" => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "detect-zeroes is not supported yet (only 'off')",
            ));
        }
        Some(_) => {
            return Err(Error::invalid(
                "Parameter 'detect-zeroes' does not accept value (use off, on or unmap)",
            ));
        }
    }
    Ok(())
}
