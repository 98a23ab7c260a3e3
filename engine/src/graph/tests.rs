//! Graph tests on real reactors, with small test drivers: `tmem` (a RAM disk with an
//! optional latency, so requests stay in flight), `tfilter` (a pass-through filter) and
//! `tcow` (a node with an image child and an optional backing child).

use super::*;
use crate::CpuSet;
use crate::buffer::Buffer;
use crate::driver::{DriverInfo, IoFuture, Queue};
use crate::reactor::{self, EngineConfig};
use crate::request::{Completion, Op, OpSet, ReqFlags};
use serde_json::json;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

// ---- test drivers --------------------------------------------------------------------

#[derive(Debug)]
struct Store {
    bytes: Vec<AtomicU8>,
}

#[derive(Debug)]
struct TMem {
    store: Arc<Store>,
    latency: Duration,
    read_only: bool,
    fail_open: bool,
    perm_log: Mutex<Vec<(Perm, Perm)>>,
}

impl Driver for TMem {
    fn driver_name(&self) -> &'static str {
        "tmem"
    }
    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.store.bytes.len() as u64,
            request_alignment: 1,
            max_transfer: 1 << 20,
            ops: OpSet::empty()
                .with(Op::Read)
                .with(Op::Write)
                .with(Op::Flush),
            read_only: self.read_only,
        }
    }
    fn open_queue(&self, _: &Children) -> Result<Box<dyn Queue>, Errno> {
        if self.fail_open && reactor::id() == 1 {
            return Err(Errno::EIO);
        }
        Ok(Box::new(TMemQueue {
            store: self.store.clone(),
            latency: self.latency,
        }))
    }
    fn set_perm(&self, perm: Perm, shared: Perm) {
        self.perm_log.lock().unwrap().push((perm, shared));
    }
}

struct TMemQueue {
    store: Arc<Store>,
    latency: Duration,
}

fn do_io(store: &Store, mut req: Request) -> Completion {
    let off = req.offset as usize;
    match req.op {
        Op::Read => {
            let buf = req.buf.as_mut().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = store.bytes[off + i].load(Ordering::Relaxed);
            }
        }
        Op::Write => {
            for (i, b) in req.buf.as_ref().unwrap().iter().enumerate() {
                store.bytes[off + i].store(*b, Ordering::Relaxed);
            }
        }
        _ => {}
    }
    Completion::ok(req)
}

impl Queue for TMemQueue {
    fn submit(&self, req: Request) -> IoFuture {
        if self.latency.is_zero() {
            let c = do_io(&self.store, req);
            return IoFuture::Ready(Some(c));
        }
        let (store, latency) = (self.store.clone(), self.latency);
        IoFuture::pending(async move {
            reactor::sleep(latency).await;
            do_io(&store, req)
        })
    }
}

#[derive(Debug)]
struct TFilter {
    child: Mutex<Arc<dyn Driver>>,
}

impl Driver for TFilter {
    fn driver_name(&self) -> &'static str {
        "tfilter"
    }
    fn info(&self) -> DriverInfo {
        self.child.lock().unwrap().info()
    }
    fn open_queue(&self, children: &Children) -> Result<Box<dyn Queue>, Errno> {
        let child = self.child.lock().unwrap().clone();
        Ok(Box::new(Forward(children.get_or_open("file", &*child)?)))
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn replace_child(&self, name: &str, child: &Arc<dyn Driver>) -> Result<(), Error> {
        assert_eq!(name, "file");
        *self.child.lock().unwrap() = child.clone();
        Ok(())
    }
}

struct Forward(Child);

impl Queue for Forward {
    fn submit(&self, req: Request) -> IoFuture {
        self.0.submit(req)
    }
}

#[derive(Debug)]
struct TCow {
    file: Arc<dyn Driver>,
}

impl Driver for TCow {
    fn driver_name(&self) -> &'static str {
        "tcow"
    }
    fn info(&self) -> DriverInfo {
        self.file.info()
    }
    fn open_queue(&self, children: &Children) -> Result<Box<dyn Queue>, Errno> {
        Ok(Box::new(Forward(
            children.get_or_open("file", &*self.file)?,
        )))
    }
}

fn num(opts: &Map<String, Value>, key: &str, default: u64) -> u64 {
    opts.get(key).and_then(Value::as_u64).unwrap_or(default)
}

fn test_opener(
    opts: &Map<String, Value>,
    ctx: &mut dyn OpenContext,
) -> Result<Arc<dyn Driver>, Error> {
    match opts.get("driver").and_then(Value::as_str) {
        Some("tmem") => Ok(Arc::new(TMem {
            store: Arc::new(Store {
                bytes: (0..num(opts, "size", 1 << 20))
                    .map(|_| AtomicU8::new(0))
                    .collect(),
            }),
            latency: Duration::from_micros(num(opts, "latency-us", 0)),
            read_only: opts.get("read-only") == Some(&Value::Bool(true)),
            fail_open: opts.get("fail-open") == Some(&Value::Bool(true)),
            perm_log: Mutex::new(Vec::new()),
        })),
        Some("tfilter") => {
            let spec = opts
                .get("file")
                .ok_or_else(|| Error::invalid("tfilter needs file"))?;
            let child = ctx.open_child("file", spec, ChildRole::FILTERED | ChildRole::PRIMARY)?;
            Ok(Arc::new(TFilter {
                child: Mutex::new(child),
            }))
        }
        Some("tcow") => {
            let spec = opts
                .get("file")
                .ok_or_else(|| Error::invalid("tcow needs file"))?;
            let file = ctx.open_child("file", spec, ChildRole::IMAGE)?;
            if let Some(b) = opts.get("backing") {
                ctx.open_child("backing", b, ChildRole::COW)?;
            }
            Ok(Arc::new(TCow { file }))
        }
        other => Err(Error::invalid(format!("unknown test driver {other:?}"))),
    }
}

fn graph(reactors: usize) -> Graph {
    let engine = Engine::start(EngineConfig {
        cores: CpuSet::first_allowed(reactors).unwrap_or_else(|e| panic!("{e}")),
        pin: false,
        ..Default::default()
    })
    .expect("engine start");
    Graph::new(engine, Arc::new(test_opener))
}

fn id(g: &Graph, name: &str) -> NodeId {
    g.state().find(name).unwrap().id
}

/// Runs one request on reactor `r` against node `name` and returns its result and data.
fn io(g: &Graph, r: usize, name: &str, req: Request) -> (Result<(), Errno>, Option<Vec<u8>>) {
    let node = id(g, name);
    g.engine()
        .spawn(r, move || async move {
            let local = drain::node(node).expect("node on reactor");
            let c = local.submit(req).await;
            (c.result, c.req.buf.map(|b| b.to_vec()))
        })
        .wait()
        .unwrap()
}

fn write(g: &Graph, name: &str, offset: u64, byte: u8) {
    let req = Request::write(offset, Buffer::from_slice(&[byte; 512]), ReqFlags::NONE);
    assert_eq!(io(g, 0, name, req).0, Ok(()));
}

fn read(g: &Graph, r: usize, name: &str, offset: u64) -> Vec<u8> {
    let (res, data) = io(g, r, name, Request::read(offset, Buffer::new(512)));
    assert_eq!(res, Ok(()));
    data.unwrap()
}

// ---- building and removing -----------------------------------------------------------

#[test]
fn an_inline_child_gets_a_generated_name_and_goes_with_its_parent() {
    let mut g = graph(2);
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": {"driver": "tmem"}}))
        .unwrap();
    let s = g.state();
    assert_eq!(s.nodes.len(), 2);
    let child = s.node(s.find("f").unwrap().children[0].child);
    assert!(
        child.generated && child.name.starts_with("#block"),
        "{}",
        child.name
    );
    assert!(!s.find("f").unwrap().options.contains_key("file"));
    let e = g.del(&child.name.clone()).unwrap_err();
    assert!(e.message.contains("is not owned by the monitor"), "{e}");
    g.del("f").unwrap();
    assert!(g.state().nodes.is_empty());
    g.shutdown();
}

#[test]
fn names_are_checked_and_unique_and_references_must_exist() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m"})).unwrap();
    let e = g
        .add(&json!({"driver": "tmem", "node-name": "m"}))
        .unwrap_err();
    assert_eq!(e.message, "Duplicate nodes with node-name='m'");
    for bad in ["#x", "1abc", "a b", "", "abcdefghijabcdefghijabcdefghijab"] {
        let e = g
            .add(&json!({"driver": "tmem", "node-name": bad}))
            .unwrap_err();
        assert!(e.message.starts_with("Invalid node-name"), "{bad}: {e}");
    }
    let e = g
        .add(&json!({"driver": "tfilter", "node-name": "f", "file": "nope"}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    // A failed inline child leaves nothing behind.
    let e = g
        .add(&json!({"driver": "tfilter", "node-name": "f", "file": {"driver": "bogus"}}))
        .unwrap_err();
    assert!(e.message.contains("unknown test driver"), "{e}");
    assert_eq!(g.state().nodes.len(), 1);
    g.shutdown();
}

#[test]
fn a_name_given_twice_in_one_add_is_refused() {
    let mut g = graph(1);
    let e = g
        .add(&json!({"driver": "tfilter", "node-name": "a", "file": {"driver": "tmem", "node-name": "a"}}))
        .unwrap_err();
    assert_eq!(e.message, "Duplicate nodes with node-name='a'");
    assert!(g.state().nodes.is_empty());
    g.shutdown();
}

#[test]
fn force_share_in_any_spelling_needs_a_read_only_node() {
    let mut g = graph(1);
    for on in [json!(true), json!("on"), json!("true"), json!("yes")] {
        let e = g
            .add(&json!({"driver": "tmem", "node-name": "w", "force-share": on}))
            .unwrap_err();
        assert_eq!(
            e.message,
            "force-share=on can only be used with read-only images"
        );
    }
    g.add(&json!({"driver": "tmem", "node-name": "r", "read-only": true, "force-share": "on"}))
        .unwrap();
    g.shutdown();
}

#[test]
fn force_share_on_a_child_makes_its_parents_share_everything() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m", "read-only": true, "force-share": true}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": "m"}))
        .unwrap();
    g.attach_user(
        "block device 'u'",
        "f",
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ,
    )
    .unwrap();
    let f = g.state().find("f").unwrap();
    assert_eq!(
        f.shared,
        Perm::CONSISTENT_READ,
        "the filter's own users unshare"
    );
    assert_eq!(
        f.children[0].shared,
        Perm::ALL,
        "but its edge into m shares all"
    );
    g.shutdown();
}

#[test]
fn a_graph_deeper_than_the_limit_is_refused() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "c0", "size": 4096}))
        .unwrap();
    for i in 1..state::MAX_DEPTH {
        g.add(&json!({"driver": "tfilter", "node-name": format!("c{i}"), "file": format!("c{}", i - 1)}))
            .unwrap();
    }
    let top = format!("c{}", state::MAX_DEPTH - 1);
    let e = g
        .add(&json!({"driver": "tfilter", "node-name": "over", "file": top}))
        .unwrap_err();
    assert!(e.message.contains("levels deep"), "{e}");
    // The deepest allowed chain still works end to end (and flushes at shutdown).
    assert_eq!(read(&g, 0, &top, 0), vec![0; 512]);
    g.shutdown();
}

#[test]
fn a_node_in_use_cannot_be_deleted() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m"})).unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": "m"}))
        .unwrap();
    assert_eq!(g.del("m").unwrap_err().message, "Block device m is in use");
    let (user, _) = g
        .attach_user("block device 'u'", "f", Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    assert_eq!(g.del("f").unwrap_err().kind, ErrorKind::Busy);
    g.detach_user(user).unwrap();
    g.del("f").unwrap();
    g.del("m").unwrap();
    assert_eq!(g.del("m").unwrap_err().kind, ErrorKind::NotFound);
    g.shutdown();
}

// ---- permissions ---------------------------------------------------------------------

#[test]
fn conflicting_users_are_refused_with_qemus_message() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m"})).unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": "m"}))
        .unwrap();
    let rw = Perm::CONSISTENT_READ | Perm::WRITE;
    let no_write = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
    g.attach_user("block device 'u1'", "f", rw, no_write)
        .unwrap();
    let before = g.state().find("m").unwrap().perm;
    // The second writer conflicts on the filter (directly) ...
    let e = g
        .attach_user("block device 'u2'", "f", rw, Perm::ALL)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(
        e.message,
        "Permission conflict on node 'f': permissions 'write' are both required by \
         block device 'u2' and unshared by block device 'u1'."
    );
    // ... and below it, where the filter passes u1's claim down as its own.
    let e = g
        .attach_user("block device 'u3'", "m", rw, Perm::ALL)
        .unwrap_err();
    assert_eq!(
        e.message,
        "Permission conflict on node 'm': permissions 'write' are both required by \
         block device 'u3' and unshared by node 'f' (uses node 'm' as 'file' child)."
    );
    // Refused changes leave the committed graph as it was.
    assert_eq!(g.state().users.len(), 1);
    assert_eq!(g.state().find("m").unwrap().perm, before);
    assert_eq!(before, rw);
    g.shutdown();
}

#[test]
fn a_read_only_node_refuses_writers_and_drivers_see_committed_permissions() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "ro", "read-only": true}))
        .unwrap();
    let e = g
        .attach_user("block device 'w'", "ro", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert_eq!(
        e.message,
        "Read-only block node 'ro' cannot support read-write users"
    );
    g.attach_user(
        "block device 'r'",
        "ro",
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ,
    )
    .unwrap();
    let n = g.state().find("ro").unwrap();
    assert_eq!(
        (n.perm, n.shared),
        (Perm::CONSISTENT_READ, Perm::CONSISTENT_READ)
    );
    g.shutdown();
}

#[test]
fn format_nodes_take_write_on_their_image_and_only_read_their_backing() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "img"}))
        .unwrap();
    g.add(&json!({"driver": "tmem", "node-name": "base"}))
        .unwrap();
    g.add(&json!({"driver": "tcow", "node-name": "top", "file": "img", "backing": "base"}))
        .unwrap();
    let s = g.state();
    let top = s.find("top").unwrap();
    let file = &top.children[0];
    assert_eq!(
        file.perm,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    );
    assert_eq!(file.shared, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    let backing = &top.children[1];
    assert_eq!(backing.perm, Perm::NONE);
    // A second writer of the image is refused: the format node does not share write.
    let e = g
        .attach_user("block device 'x'", "img", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert!(
        e.message
            .contains("unshared by node 'top' (uses node 'img' as 'file' child)"),
        "{e}"
    );
    // The backing node stays writable by others only if top's users share write: none do.
    g.attach_user("block device 'b'", "base", Perm::WRITE, Perm::ALL)
        .unwrap();
    g.shutdown();
}

// ---- filter helpers ------------------------------------------------------------------

#[test]
fn filter_helpers_follow_filters_and_backing_chains() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "base-img"}))
        .unwrap();
    g.add(&json!({"driver": "tcow", "node-name": "base", "file": "base-img"}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "bf", "file": "base"}))
        .unwrap();
    g.add(&json!({"driver": "tmem", "node-name": "top-img"}))
        .unwrap();
    g.add(&json!({"driver": "tcow", "node-name": "top", "file": "top-img", "backing": "bf"}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f1", "file": "top"}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f2", "file": "f1"}))
        .unwrap();
    let mut s = g.state().clone();
    let n = |name: &str| s.find(name).unwrap().id;
    let (f1, f2, top, bf, base) = (n("f1"), n("f2"), n("top"), n("bf"), n("base"));
    assert_eq!(s.filtered_child(f2), Some(f1));
    assert_eq!(s.filtered_child(top), None, "a format node is not a filter");
    assert_eq!(s.cow_child(top), Some(bf));
    assert_eq!(s.skip_filters(f2), top);
    assert_eq!(s.backing_chain(f2), vec![top, base]);
    assert_eq!(s.skip_implicit_filters(f2), f2);
    s.nodes.get_mut(&f2).unwrap().implicit = true;
    assert_eq!(
        s.skip_implicit_filters(f2),
        f1,
        "stops at the first explicit filter"
    );
    g.shutdown();
}

// ---- the drain protocol ----------------------------------------------------------------

#[test]
fn reparenting_waits_for_in_flight_requests_and_later_ones_see_the_new_child() {
    let mut g = graph(2);
    g.add(&json!({"driver": "tmem", "node-name": "a", "latency-us": 50_000}))
        .unwrap();
    g.add(&json!({"driver": "tmem", "node-name": "b"})).unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": "a"}))
        .unwrap();
    write(&g, "b", 0, 0xbb);
    // A slow write through f to a is in flight when f is re-pointed at b.
    let f = id(&g, "f");
    let slow = g.engine().spawn(1, move || async move {
        let local = drain::node(f).unwrap();
        let req = Request::write(0, Buffer::from_slice(&[0xaa; 512]), ReqFlags::NONE);
        local.submit(req).await.result
    });
    std::thread::sleep(Duration::from_millis(10));
    g.replace_child("f", "file", "b").unwrap();
    // The change could only commit after the slow write finished, on the old child.
    assert_eq!(slow.wait_timeout(Duration::ZERO).ok(), Some(Ok(())));
    assert_eq!(read(&g, 0, "a", 0), vec![0xaa; 512]);
    for r in 0..2 {
        assert_eq!(
            read(&g, r, "f", 0),
            vec![0xbb; 512],
            "reactor {r} sees the new child"
        );
    }
    assert_eq!(g.state().find("f").unwrap().children[0].child, id(&g, "b"));
    assert!(
        g.longest_pause() >= Duration::from_millis(20),
        "{:?}",
        g.longest_pause()
    );
    g.shutdown();
}

#[test]
fn a_failed_queue_open_on_one_reactor_leaves_the_old_graph() {
    let mut g = graph(2);
    g.add(&json!({"driver": "tmem", "node-name": "a"})).unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f", "file": "a"}))
        .unwrap();
    write(&g, "a", 0, 0x11);
    let e = g
        .add(&json!({"driver": "tmem", "node-name": "bad", "fail-open": true}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(g.state().by_name("bad").is_none());
    g.add(&json!({"driver": "tmem", "node-name": "bad2", "fail-open": true, "size": 4096}))
        .unwrap_err();
    // The node was opened on reactor 0 but never published there either.
    let gone = g
        .engine()
        .call(0, || drain::node(3).is_none() && drain::node(4).is_none());
    assert!(gone.wait().unwrap());
    assert_eq!(read(&g, 1, "f", 0), vec![0x11; 512]);
    g.shutdown();
}

#[test]
fn a_cycle_is_refused_and_the_filter_keeps_its_child() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m"})).unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f1", "file": "m"}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "f2", "file": "f1"}))
        .unwrap();
    let e = g.replace_child("f1", "file", "f2").unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
    assert_eq!(g.state().find("f1").unwrap().children[0].child, id(&g, "m"));
    let e = g.replace_child("f1", "backing", "m").unwrap_err();
    assert_eq!(e.message, "Node 'f1' has no child named 'backing'");
    g.shutdown();
}

#[test]
fn requests_to_a_deleted_node_fail_with_enodev() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m"})).unwrap();
    let m = id(&g, "m");
    let held = g.engine().spawn(0, move || async move {
        let local = drain::node(m).unwrap();
        // Keep the node object past its deletion.
        crate::reactor::sleep(Duration::from_millis(50)).await;
        local
            .submit(Request::read(0, Buffer::new(512)))
            .await
            .result
    });
    std::thread::sleep(Duration::from_millis(5));
    g.del("m").unwrap();
    assert_eq!(held.wait().unwrap(), Err(Errno::ENODEV));
    g.shutdown();
}

// ---- stress: verify load on every reactor while the graph changes under it ------------

#[derive(Default)]
struct LoadStats {
    ops: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    max_latency_us: AtomicU64,
}

/// A verify worker: writes a pattern unique to (slot, pass) and reads it back, until told
/// to stop.
async fn verify_worker(node: NodeId, slot: u64, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    const LEN: usize = 4096;
    let local = drain::node(node).expect("load node");
    let mut pass = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pass += 1;
        let offset = slot * LEN as u64;
        let pattern: Vec<u8> = (0..LEN)
            .map(|i| (slot as u8) ^ (pass as u8).wrapping_mul(31) ^ (i as u8))
            .collect();
        let t = Instant::now();
        let w = local
            .submit(Request::write(
                offset,
                Buffer::from_slice(&pattern),
                ReqFlags::NONE,
            ))
            .await;
        let r = local.submit(Request::read(offset, Buffer::new(LEN))).await;
        let us = t.elapsed().as_micros() as u64;
        stats.max_latency_us.fetch_max(us, Ordering::Relaxed);
        stats.ops.fetch_add(2, Ordering::Relaxed);
        if w.result.is_err() || r.result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        } else if r.req.buf.as_deref() != Some(&pattern[..]) {
            stats.mismatches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn verify_load_survives_hundreds_of_graph_changes_without_errors() {
    const WORKERS: u64 = 8;
    const ROUNDS: usize = 200;
    let mut g = graph(2);
    g.add(&json!({"driver": "tmem", "node-name": "m", "size": 4 << 20, "latency-us": 30}))
        .unwrap();
    g.add(&json!({"driver": "tfilter", "node-name": "top", "file": "m"}))
        .unwrap();
    let rw = Perm::CONSISTENT_READ | Perm::WRITE;
    let (_, top) = g
        .attach_user("block device 'load'", "top", rw, Perm::CONSISTENT_READ)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let mut load = Vec::new();
    for r in 0..g.engine().reactors() {
        for w in 0..WORKERS {
            let (stop, stats) = (stop.clone(), stats.clone());
            let slot = r as u64 * WORKERS + w;
            load.push(
                g.engine()
                    .spawn(r, move || verify_worker(top, slot, stop, stats)),
            );
        }
    }
    let mut mutations = 0;
    for i in 0..ROUNDS {
        // Insert a filter between top and m, sometimes two, then take them out again.
        let f = format!("f{i}");
        g.add(&json!({"driver": "tfilter", "node-name": f, "file": "m"}))
            .unwrap();
        g.replace_child("top", "file", &f).unwrap();
        mutations += 2;
        if i % 2 == 0 {
            let f2 = format!("g{i}");
            g.add(&json!({"driver": "tfilter", "node-name": f2, "file": "m"}))
                .unwrap();
            g.replace_child(&f, "file", &f2).unwrap();
            g.replace_child(&f, "file", "m").unwrap();
            g.del(&f2).unwrap();
            mutations += 4;
        }
        // Nodes elsewhere in the graph come and go (with inline children).
        let x = format!("x{i}");
        g.add(
            &json!({"driver": "tfilter", "node-name": x, "file": {"driver": "tmem", "size": 4096}}),
        )
        .unwrap();
        g.del(&x).unwrap();
        g.replace_child("top", "file", "m").unwrap();
        g.del(&f).unwrap();
        mutations += 4;
    }
    let ops_during = stats.ops.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.wait().unwrap();
    }
    let s = &stats;
    println!(
        "graph stress: {mutations} changes under load; {} I/Os, {} errors, {} mismatches; \
         longest drain pause {:?}; longest write+read {} us",
        s.ops.load(Ordering::Relaxed),
        s.errors.load(Ordering::Relaxed),
        s.mismatches.load(Ordering::Relaxed),
        g.longest_pause(),
        s.max_latency_us.load(Ordering::Relaxed),
    );
    assert_eq!(s.errors.load(Ordering::Relaxed), 0);
    assert_eq!(s.mismatches.load(Ordering::Relaxed), 0);
    assert!(
        ops_during > mutations as u64,
        "load made progress: {ops_during} I/Os"
    );
    assert_eq!(g.state().nodes.len(), 2);
    g.shutdown();
}

#[test]
fn a_users_failed_requests_are_reported_for_block_io_error() {
    let mut g = graph(1);
    g.add(&json!({"driver": "tmem", "node-name": "m", "size": 4096}))
        .unwrap();
    let (user, node) = g
        .attach_user("block device 'u'", "m", Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    take_io_errors();
    let results = g
        .engine()
        .spawn(0, move || async move {
            let blk = Blk::open(user, node).unwrap();
            let ok = blk.io(Request::read(0, Buffer::new(512))).await.result;
            let beyond = blk.io(Request::read(4096, Buffer::new(512))).await.result;
            let unsupported = blk.io(Request::discard(0, 512)).await.result;
            (ok, beyond, unsupported)
        })
        .wait()
        .unwrap();
    assert_eq!(results, (Ok(()), Err(Errno::EINVAL), Err(Errno::ENOTSUP)));
    let (reports, dropped) = take_io_errors();
    assert_eq!(dropped, 0);
    let got: Vec<_> = reports
        .iter()
        .map(|r| (r.user, r.node, r.op, r.errno))
        .collect();
    assert_eq!(
        got,
        [
            (user, node, Op::Read, Errno::EINVAL),
            (user, node, Op::Discard, Errno::ENOTSUP)
        ]
    );
    g.shutdown();
}
