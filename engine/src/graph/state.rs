//! The authoritative graph (admin thread only): nodes, edges, users, and the
//! permission refresh that every change runs before it may commit.
//!
//! A change works on a clone of [`State`] (nodes hold their driver by `Arc`, so a clone
//! is cheap) and replaces the live state only when every check passed, so an error at
//! any point leaves the old graph untouched.

use super::local::NodeId;
use super::perm::{ChildRole, Perm};
use crate::Driver;
use crate::error::{Error, ErrorKind};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The deepest a graph may be (nodes on one parent-to-child path). Requests recurse
/// through the levels on a reactor's stack; 256 levels use well under its 2 MiB.
pub const MAX_DEPTH: usize = 256;

/// Identity of a user of a node (an export, a benchmark job, a debugging user).
pub type UserId = u64;

/// One node.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// The name was generated (`#block123`): the node was given inline as a child and
    /// goes away with its last parent.
    pub generated: bool,
    /// Inserted by Strata itself (a job's filter); skipped by `skip_implicit_filters`.
    pub implicit: bool,
    pub driver: Arc<dyn Driver>,
    /// The options the node was opened with, minus `node-name` and its children (those
    /// come from [`Node::children`], so they always reflect re-parenting).
    pub options: Map<String, Value>,
    pub children: Vec<Edge>,
    /// Cumulative permissions of the node's parents and users, as applied.
    pub perm: Perm,
    pub shared: Perm,
}

impl Node {
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    pub fn read_only(&self) -> bool {
        self.driver.info().read_only
    }

    fn force_share(&self) -> bool {
        self.options.get("force-share").is_some_and(is_on)
    }
}

/// A named edge from a parent to a child.
#[derive(Clone, Debug)]
pub struct Edge {
    pub name: String,
    pub child: NodeId,
    pub role: ChildRole,
    pub perm: Perm,
    pub shared: Perm,
}

/// A user of a node that is not a node (QEMU's BlockBackend): it takes `perm` and
/// shares `shared` like a parent edge does.
#[derive(Clone, Debug)]
pub struct User {
    pub id: UserId,
    /// How conflict messages name the user (`block export 'exp0'`).
    pub desc: String,
    pub node: NodeId,
    pub perm: Perm,
    pub shared: Perm,
}

/// QEMU's spellings of a true boolean option.
pub(crate) fn is_on(v: &Value) -> bool {
    matches!(v, Value::Bool(true)) || matches!(v.as_str(), Some("on" | "true" | "yes"))
}

/// Nodes and users.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub nodes: BTreeMap<NodeId, Node>,
    pub users: BTreeMap<UserId, User>,
}

/// Who holds a claim on a node, for messages.
struct Claim {
    desc: String,
    perm: Perm,
    shared: Perm,
}

impl State {
    pub fn by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Looks up a node by name with QEMU's error.
    pub fn find(&self, name: &str) -> Result<&Node, Error> {
        self.by_name(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("Cannot find device='' nor node-name='{name}'"),
            )
        })
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .get(&id)
            .expect("BUG: edge to a node that is not in the graph")
    }

    /// `(parent, edge)` for every edge into `id`.
    pub fn parents(&self, id: NodeId) -> impl Iterator<Item = (&Node, &Edge)> {
        self.nodes.values().flat_map(move |p| {
            p.children
                .iter()
                .filter(move |e| e.child == id)
                .map(move |e| (p, e))
        })
    }

    pub fn users_of(&self, id: NodeId) -> impl Iterator<Item = &User> {
        self.users.values().filter(move |u| u.node == id)
    }

    /// `id` and every node above it, children before parents.
    pub fn ancestors_bottom_up(&self, id: NodeId) -> Result<Vec<NodeId>, Error> {
        let mut above = vec![id];
        let mut i = 0;
        while i < above.len() {
            let parents: Vec<NodeId> = self.parents(above[i]).map(|(p, _)| p.id).collect();
            for p in parents {
                if !above.contains(&p) {
                    above.push(p);
                }
            }
            i += 1;
        }
        let order = self.topological()?;
        Ok(order
            .into_iter()
            .rev()
            .filter(|n| above.contains(n))
            .collect())
    }

    /// All nodes, every parent before its children. Errors on a cycle.
    pub fn topological(&self) -> Result<Vec<NodeId>, Error> {
        let mut indegree: HashMap<NodeId, usize> = self.nodes.keys().map(|&id| (id, 0)).collect();
        for n in self.nodes.values() {
            for e in &n.children {
                *indegree.get_mut(&e.child).expect("BUG: dangling edge") += 1;
            }
        }
        let mut ready: Vec<NodeId> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(&id, _)| id)
            .collect();
        ready.sort_unstable_by(|a, b| b.cmp(a));
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(id) = ready.pop() {
            order.push(id);
            for e in &self.node(id).children {
                let d = indegree.get_mut(&e.child).expect("BUG: dangling edge");
                *d -= 1;
                if *d == 0 {
                    ready.push(e.child);
                }
            }
        }
        if order.len() != self.nodes.len() {
            return Err(Error::invalid(
                "the change would make a node its own descendant (a cycle in the graph)",
            ));
        }
        Ok(order)
    }

    /// Recomputes every node's cumulative permissions and every edge's permissions,
    /// parents first, and checks them: read-only nodes get no writers, and no claim on a
    /// node needs what another claim does not share. Returns the nodes whose cumulative
    /// permissions changed from `applied` (the committed graph), for the drivers to lock.
    pub fn refresh_perms(&mut self, applied: &State) -> Result<Vec<NodeId>, Error> {
        let order = self.topological()?;
        self.check_depth(&order)?;
        let mut changed = Vec::new();
        for id in order {
            let claims = self.claims(id);
            let node = self.node(id);
            let perm = claims.iter().fold(Perm::NONE, |p, c| p | c.perm);
            let shared = claims.iter().fold(Perm::ALL, |s, c| s & c.shared);
            if node.read_only() && perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) {
                return Err(Error::new(
                    ErrorKind::PermissionConflict,
                    format!(
                        "Read-only block node '{}' cannot support read-write users",
                        node.name
                    ),
                ));
            }
            check_conflicts(&node.name, &claims)?;
            // QEMU's bdrv_child_perm: a child opened with force-share is shared fully
            // by every parent.
            let force_shared: Vec<bool> = node
                .children
                .iter()
                .map(|e| self.node(e.child).force_share())
                .collect();
            let driver = node.driver.clone();
            let node = self.nodes.get_mut(&id).expect("BUG: node vanished");
            node.perm = perm;
            node.shared = shared;
            for (e, force) in node.children.iter_mut().zip(force_shared) {
                let (p, s) = driver.child_perm(&e.name, e.role, perm, shared);
                e.perm = p;
                e.shared = if force { Perm::ALL } else { s };
            }
            let before = applied.nodes.get(&id).map(|n| (n.perm, n.shared));
            if before != Some((perm, shared)) {
                changed.push(id);
            }
        }
        Ok(changed)
    }

    /// Refuses a graph with a path longer than [`MAX_DEPTH`] (`order`: parents first).
    fn check_depth(&self, order: &[NodeId]) -> Result<(), Error> {
        let mut depth: HashMap<NodeId, usize> = HashMap::new();
        for &id in order {
            let d = *depth.entry(id).or_insert(1);
            if d > MAX_DEPTH {
                return Err(Error::invalid(format!(
                    "the change would put node '{}' {d} levels deep; Strata allows at most {MAX_DEPTH}",
                    self.node(id).name
                )));
            }
            for e in &self.node(id).children {
                let c = depth.entry(e.child).or_insert(1);
                *c = (*c).max(d + 1);
            }
        }
        Ok(())
    }

    fn claims(&self, id: NodeId) -> Vec<Claim> {
        let name = &self.node(id).name;
        let mut claims: Vec<Claim> = self
            .parents(id)
            .map(|(p, e)| Claim {
                desc: format!(
                    "node '{}' (uses node '{name}' as '{}' child)",
                    p.name, e.name
                ),
                perm: e.perm,
                shared: e.shared,
            })
            .collect();
        claims.extend(self.users_of(id).map(|u| Claim {
            desc: u.desc.clone(),
            perm: u.perm,
            shared: u.shared,
        }));
        claims
    }

    // ---- filters and backing chains (QEMU's block_int-io.h helpers) -------------------

    /// The filtered child of a filter node.
    pub fn filtered_child(&self, id: NodeId) -> Option<NodeId> {
        let n = self.node(id);
        if !n.driver.is_filter() {
            return None;
        }
        n.children
            .iter()
            .find(|e| e.role.contains(ChildRole::FILTERED))
            .map(|e| e.child)
    }

    /// The backing (copy-on-write) child.
    pub fn cow_child(&self, id: NodeId) -> Option<NodeId> {
        self.node(id)
            .children
            .iter()
            .find(|e| e.role.contains(ChildRole::COW))
            .map(|e| e.child)
    }

    /// Follows filtered children through implicit filters only.
    pub fn skip_implicit_filters(&self, mut id: NodeId) -> NodeId {
        while self.node(id).implicit
            && let Some(c) = self.filtered_child(id)
        {
            id = c;
        }
        id
    }

    /// Follows filtered children through every filter.
    pub fn skip_filters(&self, mut id: NodeId) -> NodeId {
        while let Some(c) = self.filtered_child(id) {
            id = c;
        }
        id
    }

    /// The image chain below `id`: `id` without its filters, then each backing node
    /// without its filters.
    pub fn backing_chain(&self, id: NodeId) -> Vec<NodeId> {
        let mut chain = Vec::new();
        let mut cur = Some(self.skip_filters(id));
        while let Some(n) = cur {
            chain.push(n);
            cur = self.cow_child(n).map(|c| self.skip_filters(c));
        }
        chain
    }
}

/// QEMU's `bdrv_a_allow_b` over every pair of claims on one node.
fn check_conflicts(node: &str, claims: &[Claim]) -> Result<(), Error> {
    for (i, b) in claims.iter().enumerate() {
        for (j, a) in claims.iter().enumerate() {
            let denied = b.perm & !a.shared;
            if i != j && !denied.is_empty() {
                return Err(Error::new(
                    ErrorKind::PermissionConflict,
                    format!(
                        "Permission conflict on node '{node}': permissions '{}' are both \
                         required by {} and unshared by {}.",
                        denied.human(),
                        b.desc,
                        a.desc
                    ),
                ));
            }
        }
    }
    Ok(())
}
