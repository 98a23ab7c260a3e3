//! Crate-level tests: `open_node` as the graph's opener (raw over file in a real graph,
//! with image locks), the standalone context of `open`, and the options schemas against
//! what serde accepts.

use crate::conformance::REACTORS;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use strata_engine::graph::{Opener, drain};
use strata_engine::{
    Buffer, CpuSet, Engine, EngineConfig, ErrorKind, Graph, Perm, ReqFlags, Request,
};

// ---- open_node and the standalone context -------------------------------------------

#[test]
fn open_node_is_the_graphs_opener() {
    let _: Arc<Opener> = Arc::new(crate::open_node);
}

#[test]
fn inline_children_open_recursively_outside_a_graph() {
    let node = crate::open_keyval(
        "driver=raw,offset=4k,file.driver=raw,file.size=1M,file.file.driver=memory,file.file.size=2M",
    )
    .expect("open");
    assert_eq!(node.driver_name(), "raw");
    assert_eq!(node.info().size, (1 << 20) - 4096);
}

#[test]
fn a_child_named_by_reference_needs_a_graph() {
    let e = crate::open_keyval("driver=raw,file=disk0").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(
        e.message.contains("'disk0'") && e.message.contains("inline"),
        "{e}"
    );
}

#[test]
fn unknown_and_missing_drivers_say_which_exist() {
    let e = crate::open_keyval("driver=qcow3").unwrap_err();
    assert!(
        e.message.contains("qcow3") && e.message.contains("raw"),
        "{e}"
    );
    let e = crate::open_keyval("size=1M").unwrap_err();
    assert!(e.message.contains("driver"), "{e}");
    let e = crate::open(&json!({"driver": 1})).unwrap_err();
    assert!(e.message.contains("driver"), "{e}");
    assert_eq!(crate::DRIVERS, ["file", "memory", "null-co", "raw"]);
}

// ---- in a graph -----------------------------------------------------------------------

/// An image file next to the test binary, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(size: u64) -> Image {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::current_exe()
            .expect("test binary path")
            .parent()
            .expect("test binary directory")
            .join("strata-test-files");
        std::fs::create_dir_all(&dir).expect("create the test file directory");
        let path = dir.join(format!(
            "graph-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create the image");
        Image(path)
    }

    fn name(&self) -> &str {
        self.0.to_str().expect("test paths are UTF-8")
    }

    /// The lock bytes held on the image, from `/proc/locks` (every OFD lock of every
    /// process on this inode).
    fn locked_bytes(&self) -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.0).expect("stat the image");
        // How /proc/locks names a file: "MAJOR:MINOR:INODE", the device numbers in hex.
        let id = format!(
            "{:02x}:{:02x}:{}",
            libc::major(meta.dev()),
            libc::minor(meta.dev()),
            meta.ino()
        );
        let locks = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
        let mut bytes: Vec<u64> = locks
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // "1: OFDLCK ADVISORY READ -1 fe:00:<ino> <start> <end>"
                let on_image = f.len() == 8 && f[1] == "OFDLCK" && f[5] == id;
                on_image.then(|| {
                    let start: u64 = f[6].parse().expect("lock start");
                    let end: u64 = f[7].parse().expect("lock end");
                    start..=end
                })
            })
            .flatten()
            .collect();
        bytes.sort();
        bytes
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn graph() -> Graph {
    let engine = Engine::start(EngineConfig {
        cores: CpuSet::first_allowed(REACTORS).unwrap_or_else(|e| panic!("{e}")),
        pin: false,
        ..Default::default()
    })
    .expect("engine start");
    Graph::new(engine, Arc::new(crate::open_node))
}

/// Runs `req` on node `name` on reactor 1 (through its children there); returns the
/// result and the buffer.
fn io(g: &Graph, name: &str, req: Request) -> (Result<(), strata_engine::Errno>, Vec<u8>) {
    let id = g.state().find(name).expect("node").id;
    g.engine()
        .spawn(1, move || async move {
            let node = drain::node(id).expect("the node's queue on this reactor");
            let c = node.submit(req).await;
            (c.result, c.req.buf.map(|b| b.to_vec()).unwrap_or_default())
        })
        .wait()
        .expect("the I/O task")
}

#[test]
fn raw_nodes_over_a_file_in_the_graph_share_it_and_lock_it_for_their_users() {
    let image = Image::new(1 << 20);
    let mut g = graph();
    g.add(&json!({"driver": "file", "node-name": "f0", "filename": image.name()}))
        .expect("add the file node");
    // A raw node over it by reference: filtered, it passes its parents' (no) needs on.
    g.add(&json!({"driver": "raw", "node-name": "whole", "file": "f0"}))
        .expect("add raw");
    assert_eq!(image.locked_bytes(), [0u64; 0], "no users, no locks");
    // One with a window: a data child is never resized by others, users or not (QEMU
    // does the same: byte 203 from the moment the node exists).
    g.add(
        &json!({"driver": "raw", "node-name": "win", "file": "f0", "offset": 4096, "size": "64k"}),
    )
    .expect("add the window");
    assert_eq!(image.locked_bytes(), [203]);

    // A writer through the filtered raw: its permissions reach the file unchanged.
    let (e0, _) = g
        .attach_user(
            "block export 'e0'",
            "whole",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .expect("writer");
    assert_eq!(image.locked_bytes(), [100, 101, 203]);
    let (e1, _) = g
        .attach_user("block export 'e1'", "win", Perm::CONSISTENT_READ, Perm::ALL)
        .expect("reader");
    assert_eq!(image.locked_bytes(), [100, 101, 203]);

    // I/O through both, on a reactor, through the graph's children.
    let (res, _) = io(
        &g,
        "whole",
        Request::write(4096 + 512, Buffer::from_slice(&[0x5a; 512]), ReqFlags::NONE),
    );
    assert_eq!(res, Ok(()));
    let (res, data) = io(&g, "win", Request::read(512, Buffer::new(512)));
    assert_eq!(res, Ok(()));
    assert!(data.iter().all(|&b| b == 0x5a), "the window starts at 4096");
    let (res, _) = io(&g, "win", Request::read(64 << 10, Buffer::new(512)));
    assert_eq!(res, Err(strata_engine::Errno::EINVAL), "past the window");

    // A second file node on the same image, in this process, conflicts like a second
    // QEMU would: it may not refuse to share the write that f0 holds.
    g.add(&json!({"driver": "file", "node-name": "f1", "filename": image.name()}))
        .expect("a second node on the image");
    let e = g
        .attach_user(
            "block export 'e2'",
            "f1",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(
        e.message,
        format!(
            "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
            image.name()
        )
    );
    assert_eq!(
        image.locked_bytes(),
        [100, 101, 203],
        "the failed change left nothing"
    );

    g.detach_user(e0).expect("detach the writer");
    assert_eq!(image.locked_bytes(), [100, 203]);
    g.detach_user(e1).expect("detach the reader");
    assert_eq!(image.locked_bytes(), [203]);
    g.del("win").expect("del");
    assert_eq!(image.locked_bytes(), [0u64; 0], "the window's node is gone");
    g.del("whole").expect("del");
    g.del("f1").expect("del");
    g.del("f0").expect("del");
    g.shutdown();
}

#[test]
fn two_writable_raw_windows_over_one_node_coexist_as_in_qemu() {
    let mut g = graph();
    g.add(&json!({"node-name": "m", "driver": "memory", "size": 2 << 20}))
        .unwrap();
    for (name, offset) in [("p1", 0), ("p2", 1 << 20)] {
        g.add(&json!({"node-name": name, "driver": "raw", "file": "m", "offset": offset, "size": 1 << 20}))
            .unwrap();
    }
    // Users like block exports: they write and share everything but resize.
    let w = Perm::CONSISTENT_READ | Perm::WRITE;
    let shared = !Perm::RESIZE;
    g.attach_user("block device 'u1'", "p1", w, shared).unwrap();
    g.attach_user("block device 'u2'", "p2", w, shared).unwrap();
    // Each window writes its child but takes resize only if its users do (QEMU's
    // raw_child_perm; the default rules would take it and conflict); neither lets
    // anyone resize the child under it.
    let m = g.state().find("m").unwrap();
    assert_eq!(m.perm, w);
    assert!(!m.shared.contains(Perm::RESIZE));
    let e = g
        .attach_user("block device 'grow'", "m", Perm::RESIZE, Perm::ALL)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict, "{e}");
    g.shutdown();
}

#[test]
fn re_parenting_below_a_window_rechecks_and_reopens_every_ancestor() {
    let mut g = graph();
    g.add(&json!({"driver": "memory", "node-name": "big", "size": 65536}))
        .unwrap();
    g.add(&json!({"driver": "memory", "node-name": "small", "size": 8192}))
        .unwrap();
    g.add(&json!({"driver": "memory", "node-name": "tiny", "size": 512}))
        .unwrap();
    g.add(&json!({"driver": "raw", "node-name": "q", "file": "big"}))
        .unwrap();
    g.add(&json!({"driver": "raw", "node-name": "p", "file": "q", "offset": 4096}))
        .unwrap();
    // p's window starts at 4096: a 512-byte child below q would leave it outside.
    let e = g.replace_child("q", "file", "tiny").unwrap_err();
    assert!(e.message.contains("Offset (4096)"), "{e}");
    let q = g.state().find("q").unwrap();
    assert_eq!(q.children[0].child, g.state().find("big").unwrap().id);
    assert_eq!(q.driver.info().size, 65536, "the refused change was undone");
    // A child that fits: p follows the new size on every reactor.
    g.replace_child("q", "file", "small").unwrap();
    let p = g.state().find("p").unwrap().id;
    for r in 0..REACTORS {
        let size = g
            .engine()
            .call(r, move || {
                drain::node(p).and_then(|n| n.info()).map(|i| i.size)
            })
            .wait()
            .unwrap();
        assert_eq!(size, Some(8192 - 4096), "reactor {r}");
    }
    g.shutdown();
}

#[test]
fn an_inline_file_child_in_the_graph_follows_its_raw_parent() {
    let image = Image::new(1 << 20);
    let mut g = graph();
    g.add(&json!({
        "driver": "raw", "node-name": "disk", "read-only": true,
        "file": {"driver": "file", "filename": image.name(), "read-only": "on"}
    }))
    .expect("add raw with an inline file");
    let (_, _) = g
        .attach_user(
            "reader",
            "disk",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        )
        .expect("reader");
    // A read-only reader that does not share write: QEMU's read-only qcow2 pattern.
    assert_eq!(image.locked_bytes(), [100, 201, 202, 203]);
    let e = g
        .attach_user("writer", "disk", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict, "{e}");
    g.shutdown();
    assert_eq!(image.locked_bytes(), [0u64; 0], "shutdown closes the image");
}

#[test]
fn inline_children_inherit_read_only_discard_and_cache_as_in_qemu() {
    let image = Image::new(1 << 20);
    let mut g = graph();
    g.add(&json!({
        "driver": "raw", "node-name": "disk", "read-only": true, "discard": "unmap",
        "cache": {"direct": true},
        "file": {"driver": "file", "filename": image.name(), "cache": {"no-flush": "on"}}
    }))
    .expect("add raw with an inline file");
    let s = g.state();
    let disk = s.find("disk").unwrap();
    let file = s.node(disk.children[0].child);
    assert_eq!(file.options["read-only"], json!(true));
    assert_eq!(file.options["discard"], json!("unmap"));
    // Each cache.* key the child does not give comes from the parent.
    assert_eq!(
        file.options["cache"],
        json!({"direct": true, "no-flush": "on"})
    );
    let info = file.driver.info();
    assert!(info.read_only);
    assert!(
        info.request_alignment > 1,
        "the file was opened O_DIRECT: {info:?}"
    );
    // Drivers without a page cache accept cache.* too, as QEMU's do.
    g.add(&json!({"driver": "null-co", "node-name": "n", "cache": {"direct": "off"}}))
        .expect("null-co with cache");
    g.shutdown();
}

// ---- option schemas ---------------------------------------------------------------------

/// Whether `v` is valid against `schema` (the subset of JSON Schema the drivers' schemas
/// use; any other keyword fails the test rather than being ignored).
fn valid(schema: &Value, root: &Value, v: &Value) -> bool {
    const KNOWN: &[&str] = &[
        "$schema",
        "$defs",
        "$ref",
        "title",
        "description",
        "default",
        "type",
        "enum",
        "anyOf",
        "properties",
        "required",
        "additionalProperties",
        "minimum",
        "minLength",
    ];
    let Value::Object(s) = schema else {
        return schema
            .as_bool()
            .expect("a schema is an object or a boolean");
    };
    if let Some(k) = s.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        panic!("the test's validator does not know keyword '{k}' in {schema}");
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("local references only");
        if !valid(&root["$defs"][name], root, v) {
            return false;
        }
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            other => panic!("type {other}"),
        };
        if !ok {
            return false;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        return false;
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array)
        && !any.iter().any(|a| valid(a, root, v))
    {
        return false;
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        return false;
    }
    if let (Some(min), Some(text)) = (s.get("minLength").and_then(Value::as_u64), v.as_str())
        && (text.chars().count() as u64) < min
    {
        return false;
    }
    if let Value::Object(obj) = v {
        let none = serde_json::Map::new();
        let props = s
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&none);
        if let Some(req) = s.get("required").and_then(Value::as_array)
            && req
                .iter()
                .any(|k| !obj.contains_key(k.as_str().expect("key")))
        {
            return false;
        }
        for (k, val) in obj {
            match props.get(k) {
                Some(p) if !valid(p, root, val) => return false,
                Some(_) => {}
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return false;
                }
                None => {}
            }
        }
    }
    true
}

/// Option sets (without `driver`) per driver: accepted by serde; refused by serde and by
/// the schema (a wrong type, an unknown or a missing option); refused by serde only (a
/// string with a bad spelling: the schema types strings, the driver parses them and
/// names the option in its error).
struct Examples {
    accepted: Vec<Value>,
    refused: Vec<Value>,
    misspelled: Vec<Value>,
}

fn examples(driver: &str) -> Examples {
    match driver {
        "file" => Examples {
            accepted: vec![
                json!({"filename": "/x"}),
                json!({"filename": "/x", "cache": {"direct": "on", "no-flush": false},
                       "read-only": "off", "aio": "io_uring", "locking": "auto"}),
                json!({"filename": "/x", "read-only": true, "locking": "off", "cache": {}}),
                json!({"filename": "/x", "cache": {"direct": "yes"}, "locking": "on"}),
            ],
            refused: vec![
                json!({}),
                json!({"filename": ""}),
                json!({"filename": 3}),
                json!({"filename": "/x", "read-only": 1}),
                json!({"filename": "/x", "read-only": "maybe"}),
                json!({"filename": "/x", "cache": {"direct": 1}}),
                json!({"filename": "/x", "cache": {"writeback": true}}),
                json!({"filename": "/x", "aio": "threads"}),
                json!({"filename": "/x", "locking": "sometimes"}),
                json!({"filename": "/x", "locking": true}),
                json!({"filename": "/x", "discard": "unmap"}),
            ],
            misspelled: vec![],
        },
        "memory" => Examples {
            accepted: vec![
                json!({"size": 4096}),
                json!({"size": "64M"}),
                json!({"size": "1G", "read-only": "on"}),
                json!({"size": 0, "read-only": false}),
            ],
            refused: vec![
                json!({}),
                json!({"size": -1}),
                json!({"size": true}),
                json!({"size": 1.5}),
                json!({"size": "1M", "read-only": 0}),
                json!({"size": "1M", "colour": "red"}),
            ],
            misspelled: vec![json!({"size": "1X"}), json!({"size": "lots"})],
        },
        "null-co" => Examples {
            accepted: vec![
                json!({}),
                json!({"size": "1G", "read-zeroes": "on", "latency-ns": "1000"}),
                json!({"size": 512, "read-zeroes": true, "latency-ns": 0, "read-only": "yes"}),
            ],
            refused: vec![
                json!({"size": null}),
                json!({"read-zeroes": 1}),
                json!({"latency-ns": true}),
                json!({"read-only": "sometimes"}),
                json!({"latency": 5}),
            ],
            misspelled: vec![json!({"latency-ns": "fast"})],
        },
        "raw" => Examples {
            accepted: vec![
                json!({"file": "disk0"}),
                json!({"file": {"driver": "memory", "size": "1M"}}),
                json!({"file": "disk0", "offset": "4k", "size": 65536, "read-only": "on"}),
                json!({"file": "disk0", "offset": 0, "read-only": false}),
            ],
            refused: vec![
                json!({}),
                json!({"file": 7}),
                json!({"file": ["disk0"]}),
                json!({"file": "disk0", "offset": null}),
                json!({"file": "disk0", "size": false}),
                json!({"file": "disk0", "backing": "b"}),
            ],
            misspelled: vec![json!({"file": "disk0", "offset": "1X"})],
        },
        other => panic!("no examples for driver {other}: add some"),
    }
}

/// Parses `opts` with the driver's options type.
fn parse(driver: &str, opts: &Value) -> Result<(), strata_engine::Error> {
    let v = opts.clone();
    match driver {
        "file" => crate::parse_options::<crate::file::FileOptions>(driver, v).map(drop),
        "memory" => crate::parse_options::<crate::memory::MemoryOptions>(driver, v).map(drop),
        "null-co" => crate::parse_options::<crate::null_co::NullOptions>(driver, v).map(drop),
        "raw" => crate::parse_options::<crate::raw::RawOptions>(driver, v).map(drop),
        other => panic!("no options type for driver {other}"),
    }
}

#[test]
fn every_driver_has_an_options_schema_that_accepts_what_serde_accepts() {
    let schemas = crate::options_schemas();
    let names: Vec<&str> = schemas.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        crate::DRIVERS,
        "one schema per driver, in DRIVERS order"
    );
    for (driver, schema) in schemas {
        let schema = schema.as_value();
        let ex = examples(driver);
        for opts in &ex.accepted {
            assert!(
                valid(schema, schema, opts),
                "{driver}: the schema refuses {opts}, which the driver accepts"
            );
            if let Err(e) = parse(driver, opts) {
                panic!("{driver}: serde refuses {opts}: {e}");
            }
        }
        for opts in &ex.refused {
            assert!(
                !valid(schema, schema, opts),
                "{driver}: the schema accepts {opts}, which the driver refuses"
            );
            assert!(
                parse(driver, opts).is_err(),
                "{driver}: serde accepts {opts}"
            );
        }
        for opts in &ex.misspelled {
            assert!(valid(schema, schema, opts), "{driver}: {opts}");
            let e = parse(driver, opts).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{driver}: {opts}: {e}");
        }
    }
}
