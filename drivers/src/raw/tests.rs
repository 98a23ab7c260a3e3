//! `raw` tests: the conformance suite over memory (whole child and a window), the
//! window's arithmetic, the checks at open and on child replacement, the child's role.

use super::queue::back;
use super::*;
use crate::conformance::{self, Expect, on_reactor};
use crate::memory::{Memory, MemoryOptions};
use serde_json::json;
use strata_engine::{
    Buffer, Completion, Errno, ErrorKind, Extent, ExtentState, Handle, Perm, ReqFlags, Request,
};

const MIB: u64 = 1 << 20;

fn open(spec: &str) -> Arc<dyn Driver> {
    crate::open_keyval(spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn memory(size: u64) -> Arc<dyn Driver> {
    Arc::new(
        Memory::new(MemoryOptions {
            size,
            read_only: false,
            cache: Default::default(),
        })
        .expect("memory node"),
    )
}

/// An `OpenContext` that hands out a given child and records the role asked for.
struct Given {
    child: Arc<dyn Driver>,
    role: Option<ChildRole>,
}

impl OpenContext for Given {
    fn open_child(
        &mut self,
        name: &str,
        _spec: &Value,
        role: ChildRole,
    ) -> Result<Arc<dyn Driver>, Error> {
        assert_eq!(name, "file");
        self.role = Some(role);
        Ok(self.child.clone())
    }
}

/// A raw node over `child` with extra options (`offset`, `size`, ...).
fn raw_over(child: &Arc<dyn Driver>, extra: Value) -> Result<(Raw, ChildRole), Error> {
    let mut opts = json!({"file": "child"});
    for (k, v) in extra.as_object().expect("options object") {
        opts[k] = v.clone();
    }
    let opts: RawOptions = crate::parse_options("raw", opts)?;
    let mut ctx = Given {
        child: child.clone(),
        role: None,
    };
    let raw = Raw::open(opts, &mut ctx)?;
    Ok((raw, ctx.role.expect("the child was opened")))
}

#[test]
fn raw_over_memory_passes_the_conformance_suite() {
    let spec = format!(
        "driver=raw,file.driver=memory,file.size={}",
        conformance::MIN_SIZE
    );
    let ro = format!("{spec},read-only=on");
    conformance::run(
        "raw over memory",
        &|| open(&spec),
        Expect::stores_data().read_only(&|| open(&ro)),
    );
}

#[test]
fn raw_window_over_memory_passes_the_conformance_suite() {
    // A window in the middle of a larger child, with data on both sides.
    let spec = format!(
        "driver=raw,offset=1M,size={},file.driver=memory,file.size={}",
        conformance::MIN_SIZE,
        conformance::MIN_SIZE + 3 * MIB
    );
    let ro = format!("{spec},read-only=on");
    conformance::run(
        "raw window over memory",
        &|| open(&spec),
        Expect::stores_data().read_only(&|| open(&ro)),
    );
}

#[test]
fn reads_and_writes_in_the_window_land_at_offset_in_the_child() {
    let child = memory(4 * MIB);
    let (raw, _) = raw_over(&child, json!({"offset": "1M", "size": "2M"})).unwrap();
    let raw: Arc<dyn Driver> = Arc::new(raw);
    let (through_child, through_raw, offsets) = on_reactor(move || async move {
        let r = Handle::open(&*raw).expect("raw queue");
        let c = Handle::open(&*child).expect("child queue");
        // Write through raw at 4k: the child sees it at 1M + 4k.
        let w = r
            .submit(Request::write(
                4096,
                Buffer::from_slice(&[0xab; 4096]),
                ReqFlags::NONE,
            ))
            .await;
        assert_eq!(w.result, Ok(()));
        let got = c.submit(Request::read(MIB + 4096, Buffer::new(4096))).await;
        // Write through the child at 1M + 64k: raw sees it at 64k.
        let w2 = c
            .submit(Request::write(
                MIB + 65536,
                Buffer::from_slice(&[0xcd; 512]),
                ReqFlags::NONE,
            ))
            .await;
        assert_eq!(w2.result, Ok(()));
        let back = r.submit(Request::read(65536, Buffer::new(512))).await;
        assert_eq!(back.result, Ok(()));
        (
            got.req.buf.unwrap().to_vec(),
            back.req.buf.unwrap().to_vec(),
            (w.req.offset, back.req.offset),
        )
    });
    assert!(through_child.iter().all(|&b| b == 0xab), "child at offset");
    assert!(through_raw.iter().all(|&b| b == 0xcd), "raw at 64k");
    assert_eq!(
        offsets,
        (4096, 65536),
        "completions carry the request's own offset"
    );
}

#[test]
fn requests_outside_the_window_are_refused_and_leave_the_child_alone() {
    let child = memory(4 * MIB);
    let (raw, _) = raw_over(&child, json!({"offset": "1M", "size": "1M"})).unwrap();
    assert_eq!(raw.info().size, MIB);
    let raw: Arc<dyn Driver> = Arc::new(raw);
    let after = on_reactor(move || async move {
        let r = Handle::open(&*raw).expect("raw queue");
        let c = Handle::open(&*child).expect("child queue");
        let res = |c: Completion| c.result;
        assert_eq!(
            res(r.submit(Request::read(MIB, Buffer::new(512))).await),
            Err(Errno::EINVAL),
            "read at the window's end"
        );
        assert_eq!(
            res(r
                .submit(Request::write(
                    MIB - 512,
                    Buffer::from_slice(&[1; 1024]),
                    ReqFlags::NONE
                ))
                .await),
            Err(Errno::ENOSPC),
            "write across the window's end"
        );
        assert_eq!(
            res(r
                .submit(Request::write_zeroes(MIB, 512, ReqFlags::NONE))
                .await),
            Err(Errno::ENOSPC),
            "write-zeroes past the window"
        );
        assert_eq!(
            res(r.submit(Request::block_status(MIB - 512, 1024)).await),
            Err(Errno::EINVAL),
            "block-status across the window's end"
        );
        // The child's bytes right after the window were never touched.
        let after = c.submit(Request::read(2 * MIB, Buffer::new(1024))).await;
        after.req.buf.unwrap().to_vec()
    });
    assert!(after.iter().all(|&b| b == 0));
}

#[test]
fn block_status_extents_come_back_in_window_coordinates() {
    let child = memory(4 * MIB);
    let (raw, _) = raw_over(&child, json!({"offset": 8192})).unwrap();
    let raw: Arc<dyn Driver> = Arc::new(raw);
    let extents = on_reactor(move || async move {
        let r = Handle::open(&*raw).expect("raw queue");
        let c = r.submit(Request::block_status(4096, 65536)).await;
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.req.offset, 4096);
        c.req.extents
    });
    assert_eq!(extents.len(), 1, "{extents:?}");
    assert_eq!((extents[0].offset, extents[0].len), (4096, 65536));
}

#[test]
fn extents_from_the_child_are_moved_back_and_clipped_to_the_request() {
    let state = |zero| ExtentState {
        allocated: true,
        zero,
        data: !zero,
    };
    // A request at 100..1100 in the window, sent to the child at 1100..2100.
    let mut req = Request::block_status(1100, 1000);
    req.extents = vec![
        // Starts before the request (a child may answer from an aligned start).
        Extent {
            offset: 1000,
            len: 300,
            state: state(true),
        },
        Extent {
            offset: 1300,
            len: 500,
            state: state(false),
        },
        // Runs past the request's end.
        Extent {
            offset: 1800,
            len: 1000,
            state: state(true),
        },
        // Wholly past it: dropped.
        Extent {
            offset: 2800,
            len: 10,
            state: state(false),
        },
    ];
    let c = back(Completion::ok(req), 1000);
    assert_eq!(c.req.offset, 100);
    let got: Vec<_> = c
        .req
        .extents
        .iter()
        .map(|e| (e.offset, e.len, e.state.zero))
        .collect();
    assert_eq!(got, [(100, 200, true), (300, 500, false), (800, 300, true)]);
}

#[test]
fn a_flush_is_passed_on_unshifted() {
    let c = back(Completion::ok(Request::flush()), 4096);
    assert_eq!((c.req.offset, c.req.len), (0, 0));
}

#[test]
fn size_defaults_to_the_rest_of_the_child_and_read_only_comes_from_either() {
    let child = memory(4 * MIB);
    let (raw, _) = raw_over(&child, json!({"offset": "1M"})).unwrap();
    let info = raw.info();
    assert_eq!(info.size, 3 * MIB);
    assert_eq!(info.request_alignment, child.info().request_alignment);
    assert_eq!(info.max_transfer, child.info().max_transfer);
    assert!(!info.read_only);
    let (raw, _) = raw_over(&child, json!({"read-only": "on"})).unwrap();
    assert!(raw.info().read_only, "raw's own read-only");
    let ro_child = open("driver=memory,size=1M,read-only=on");
    let (raw, _) = raw_over(&ro_child, json!({})).unwrap();
    assert!(raw.info().read_only, "a read-only child");
}

#[test]
fn the_window_is_checked_against_the_child_at_open() {
    let child = memory(4 * MIB);
    for (extra, needle) in [
        (
            json!({"offset": "5M"}),
            "Offset (5242880) cannot be greater than size of the containing file (4194304)",
        ),
        (
            json!({"offset": "3M", "size": "2M"}),
            "The sum of offset (3145728) and size (2097152) has to be smaller or equal to the actual size of the containing file (4194304)",
        ),
        (
            json!({"size": 1000}),
            "Specified size is not multiple of 512",
        ),
    ] {
        let e = raw_over(&child, extra.clone()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{extra}: {e}");
        assert!(
            e.message.contains(needle),
            "{extra}: '{e}' should say '{needle}'"
        );
    }
    // The whole child is a valid window, and so is an empty one at its end.
    assert!(raw_over(&child, json!({"offset": "1M", "size": "3M"})).is_ok());
    assert_eq!(
        raw_over(&child, json!({"offset": "4M"}))
            .unwrap()
            .0
            .info()
            .size,
        0
    );
    // Options name themselves in errors.
    for (extra, needle) in [
        (json!({"offset": "1X"}), "offset"),
        (json!({"size": true}), "size"),
        (json!({"read-only": "perhaps"}), "read-only"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let e = raw_over(&child, extra.clone()).unwrap_err();
        assert!(
            e.message.contains(needle),
            "{extra}: '{e}' should name '{needle}'"
        );
    }
    let e = crate::open(&json!({"driver": "raw", "file": 7})).unwrap_err();
    assert!(e.message.contains("file"), "{e}");
    let e = crate::open(&json!({"driver": "raw"})).unwrap_err();
    assert!(e.message.contains("file"), "{e}");
}

#[test]
fn an_offset_the_child_cannot_address_is_refused() {
    // An O_DIRECT file child needs aligned requests: a window starting mid-block could
    // never be read.
    let path = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join(format!("raw-direct-{}", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(MIB))
        .expect("create the test file");
    let spec = format!(
        "driver=file,filename={},cache.direct=on",
        path.to_str().unwrap()
    );
    let file = open(&spec);
    let align = file.info().request_alignment;
    assert!(align > 1, "O_DIRECT alignment {align}");
    let e = raw_over(&file, json!({"offset": u64::from(align) * 3 / 2})).unwrap_err();
    let ok = raw_over(&file, json!({"offset": u64::from(align)}));
    drop(file);
    std::fs::remove_file(&path).ok();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.message.contains(&format!(
            "not a multiple of the file's request alignment ({align})"
        )),
        "{e}"
    );
    assert!(ok.is_ok(), "an aligned offset is fine");
}

#[test]
fn the_child_is_filtered_without_a_window_and_data_with_one() {
    let child = memory(4 * MIB);
    let filtered = ChildRole::FILTERED | ChildRole::PRIMARY;
    let data = ChildRole::DATA | ChildRole::PRIMARY;
    for (extra, role) in [
        (json!({}), filtered),
        (json!({"read-only": true}), filtered),
        (json!({"offset": 0}), filtered),
        (json!({"offset": 512}), data),
        (json!({"size": "4M"}), data),
        (json!({"offset": "1M", "size": "1M"}), data),
    ] {
        let (raw, got) = raw_over(&child, extra.clone()).unwrap();
        assert_eq!(got, role, "{extra}");
        assert!(!raw.is_filter(), "raw is not formally a filter");
        // A writer above raw: a filtered child passes everything through, a data child
        // never lets anyone else resize it.
        let (perm, shared) =
            raw.child_perm("file", got, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        if role == filtered {
            assert_eq!(
                (perm, shared),
                (Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
            );
        } else {
            assert!(!shared.contains(Perm::RESIZE), "{extra}: {shared:?}");
            assert!(perm.contains(Perm::WRITE), "{extra}: {perm:?}");
        }
    }
}

#[test]
fn replace_child_swaps_the_child_and_refuses_one_too_small() {
    let a = memory(4 * MIB);
    let b = memory(8 * MIB);
    let small = memory(2 * MIB);
    let (raw, _) = raw_over(&a, json!({"offset": "1M", "size": "2M"})).unwrap();
    let raw: Arc<dyn Driver> = Arc::new(raw);

    let e = raw.replace_child("file", &small).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("has to be smaller or equal"), "{e}");
    let e = raw.replace_child("backing", &b).unwrap_err();
    assert!(e.message.contains("'backing'"), "{e}");

    raw.replace_child("file", &b).expect("a large enough child");
    let (raw2, b2) = (raw.clone(), b.clone());
    let seen = on_reactor(move || async move {
        // Queues opened after the swap reach the new child.
        let r = Handle::open(&*raw2).expect("raw queue");
        let w = r
            .submit(Request::write(
                0,
                Buffer::from_slice(&[7; 512]),
                ReqFlags::NONE,
            ))
            .await;
        assert_eq!(w.result, Ok(()));
        let c = Handle::open(&*b2).expect("child queue");
        let got = c.submit(Request::read(MIB, Buffer::new(512))).await;
        got.req.buf.unwrap().to_vec()
    });
    assert!(
        seen.iter().all(|&b| b == 7),
        "the write reached the new child"
    );
    assert_eq!(raw.info().size, 2 * MIB, "a fixed size stays");
}

#[test]
fn without_a_size_the_node_follows_a_new_childs_size() {
    let a = memory(4 * MIB);
    let b = memory(8 * MIB);
    let (raw, _) = raw_over(&a, json!({"offset": "1M"})).unwrap();
    assert_eq!(raw.info().size, 3 * MIB);
    raw.replace_child("file", &b).unwrap();
    assert_eq!(raw.info().size, 7 * MIB);
}
