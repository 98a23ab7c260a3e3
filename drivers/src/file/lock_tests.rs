//! Image locking tests: the bytes held for each (perm, shared), the transaction
//! (check / commit / abort), conflicts between two nodes of this process, and interop
//! with the real QEMU tools (`qemu-img`, `qemu-io` 10.0), which must be installed.

use super::lock::{PERM_BASE, SHARED_BASE, byte_is_locked};
use super::tests::TestFile;
use std::os::fd::AsFd;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata_engine::{Driver, ErrorKind, Perm};

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;
const RESIZE: Perm = Perm::RESIZE;

/// Every byte QEMU's protocol could touch, and the neighbours it must not.
const WATCHED: [i64; 13] = [0, 99, 100, 101, 102, 103, 104, 199, 200, 201, 202, 203, 204];

/// The watched bytes someone holds a lock on, seen through a new open file description
/// (so this process's nodes count as "someone").
fn held(file: &TestFile) -> Vec<i64> {
    let f = std::fs::File::open(&file.path).expect("open the image to test its locks");
    WATCHED
        .into_iter()
        .filter(|&b| byte_is_locked(f.as_fd(), b).expect("F_OFD_GETLK"))
        .collect()
}

/// The bytes QEMU's protocol locks for `perm` held and `shared` shared.
fn bytes_for(perm: Perm, shared: Perm) -> Vec<i64> {
    let mut v: Vec<i64> = perm.indexes().map(|i| PERM_BASE + i64::from(i)).collect();
    v.extend((!shared).indexes().map(|i| SHARED_BASE + i64::from(i)));
    v
}

/// Gives `node` permissions as the graph does: check, then commit.
fn take(node: &dyn Driver, perm: Perm, shared: Perm) {
    node.check_perm(perm, shared)
        .unwrap_or_else(|e| panic!("check_perm({perm:?}, {shared:?}): {e}"));
    node.set_perm(perm, shared);
}

/// The message QEMU gives when an image lock is busy.
fn busy(what: &str, file: &TestFile) -> String {
    format!(
        "Failed to get {what} lock\nIs another process using the image [{}]?",
        file.name()
    )
}

/// Runs a QEMU tool to completion; a missing tool fails the test with what to install.
fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| missing(tool, e))
}

fn missing(tool: &str, e: std::io::Error) -> ! {
    panic!(
        "this test runs QEMU's {tool} (10.0) against Strata's locks, but it cannot be run \
         ({e}): apt-get install qemu-utils"
    )
}

/// A `qemu-io` holding an image open (sleeping), killed and reaped on drop, also when the
/// test fails.
struct QemuIo {
    child: Child,
}

impl QemuIo {
    /// Starts `qemu-io -f <format> -c 'sleep ...' <image>` and waits until its locks
    /// are on `byte`.
    fn start(file: &TestFile, format: &str, byte: i64) -> QemuIo {
        let child = Command::new("qemu-io")
            .args(["-f", format, "-c", "sleep 600000", file.name()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| missing("qemu-io", e));
        let mut q = QemuIo { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !held(file).contains(&byte) {
            if let Some(status) = q.child.try_wait().expect("poll qemu-io") {
                let mut err = String::new();
                if let Some(mut e) = q.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                panic!("qemu-io exited ({status}) before locking the image: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io did not lock byte {byte} of {} within 30 s",
                file.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        // Our own child, by its handle (its pid): never anyone else's process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lock_bytes_follow_perm_and_shared_exactly() {
    let file = TestFile::new(1 << 20);
    let node = file.open("");
    assert_eq!(held(&file), [0i64; 0], "opening locks nothing");
    for (perm, shared, want) in [
        // QEMU observed: a read/write qcow2 under a writable export...
        (CR | W, CR | WU, vec![100, 101, 201, 203]),
        // ...a read-only qcow2...
        (CR, CR | WU, vec![100, 201, 203]),
        // ...and a qcow2 node's file child.
        (CR | W | RESIZE, CR | WU, vec![100, 101, 103, 201, 203]),
        (
            Perm::ALL,
            Perm::NONE,
            vec![100, 101, 102, 103, 200, 201, 202, 203],
        ),
        (Perm::NONE, Perm::ALL, vec![]),
        (WU, Perm::ALL & !RESIZE, vec![102, 203]),
    ] {
        take(&*node, perm, shared);
        assert_eq!(held(&file), want, "perm {perm:?} shared {shared:?}");
        assert_eq!(bytes_for(perm, shared), want, "the table itself");
    }
}

#[test]
fn check_holds_old_and_new_bytes_until_commit_or_abort() {
    let file = TestFile::new(1 << 20);
    let node = file.open("");
    take(&*node, CR, CR | WU);
    assert_eq!(held(&file), [100, 201, 203]);

    // Growing: the union is held while the change is prepared...
    node.check_perm(CR | W, Perm::ALL).unwrap();
    assert_eq!(held(&file), [100, 101, 201, 203]);
    // ...and abort goes back to what was committed.
    node.abort_perm();
    assert_eq!(held(&file), [100, 201, 203]);

    node.check_perm(CR | W, Perm::ALL).unwrap();
    node.set_perm(CR | W, Perm::ALL);
    assert_eq!(
        held(&file),
        [100, 101],
        "commit drops what is no longer needed"
    );

    // Only shrinking: check takes nothing, commit drops.
    node.check_perm(CR, Perm::ALL).unwrap();
    assert_eq!(held(&file), [100, 101]);
    node.set_perm(CR, Perm::ALL);
    assert_eq!(held(&file), [100]);

    drop(node);
    assert_eq!(held(&file), [0i64; 0], "closing the node frees the image");
}

#[test]
fn two_nodes_on_one_image_in_one_process_conflict() {
    let file = TestFile::new(1 << 20);
    let a = file.open("");
    let b = file.open("");
    take(&*a, CR | W, CR | WU);

    // b wants to write, which a does not share.
    let e = b.check_perm(CR | W, CR | WU).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(e.message, busy("\"write\"", &file));
    assert_eq!(
        held(&file),
        [100, 101, 201, 203],
        "b's failed check left nothing"
    );

    // b only reads and lets a write: fine. b unsharing write is not: a writes.
    let e = b.check_perm(CR, CR | WU).unwrap_err();
    assert_eq!(e.message, busy("shared \"write\"", &file));
    take(&*b, CR, Perm::ALL);

    drop(a);
    take(&*b, CR | W, CR | WU);
    assert_eq!(held(&file), [100, 101, 201, 203]);
}

/// A qcow2 image of 1 MiB made by `qemu-img create`.
fn qcow2_image() -> TestFile {
    let file = TestFile::new(0);
    let out = run("qemu-img", &["create", "-f", "qcow2", file.name(), "1M"]);
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

#[test]
fn qemu_img_info_is_refused_while_we_hold_write_and_allowed_after() {
    // A qcow2 image: `qemu-img info` opens it without I/O, but the qcow2 driver still
    // reads its metadata child consistently and shares neither write nor resize on it
    // (of a raw image, whose child is merely filtered, info takes no permission at all
    // and is never refused).
    let file = qcow2_image();
    let node = file.open("");
    take(&*node, CR | W, CR | WU);

    // Its file child does not share write, and we hold write (byte 101).
    let out = run("qemu-img", &["info", file.name()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-img info should fail: {stderr}");
    assert!(
        stderr.contains("Failed to get shared \"write\" lock"),
        "qemu-img said: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "Is another process using the image [{}]?",
            file.name()
        )),
        "qemu-img said: {stderr}"
    );
    // qemu-img info -U (force-share) shares everything: allowed.
    let out = run("qemu-img", &["info", "-U", file.name()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    take(&*node, Perm::NONE, Perm::ALL);
    let out = run("qemu-img", &["info", file.name()]);
    assert!(
        out.status.success(),
        "qemu-img info after we dropped our permissions: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_qemu_io_writer_of_a_raw_image_keeps_us_from_unsharing_write() {
    let file = TestFile::new(1 << 20);
    let node = file.open("");
    // qemu-io on a raw image takes consistent read and write and shares everything:
    // bytes 100 and 101, nothing at 2xx.
    let qemu = QemuIo::start(&file, "raw", 101);
    assert_eq!(held(&file), [100, 101]);

    // Writing while refusing to share write conflicts with its write (byte 101), so the
    // shared-lock message, not the plain one: it does not refuse anything to us.
    let e = node.check_perm(CR | W, CR | WU).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(e.message, busy("shared \"write\"", &file));
    assert_eq!(held(&file), [100, 101], "the failed check took nothing");

    // Sharing write as qemu-io does, both may write.
    take(&*node, CR | W, Perm::ALL);

    drop(qemu);
    node.check_perm(CR | W, CR | WU)
        .expect("with qemu-io gone, nothing conflicts");
    node.set_perm(CR | W, CR | WU);
    assert_eq!(held(&file), [100, 101, 201, 203]);
}

#[test]
fn a_qemu_io_writer_of_a_qcow2_image_keeps_us_from_writing() {
    let file = qcow2_image();
    let node = file.open("");
    // qcow2 takes write and resize on its file and shares neither: bytes 201 and 203.
    let qemu = QemuIo::start(&file, "qcow2", 201);
    assert_eq!(held(&file), [100, 101, 103, 201, 203]);

    let e = node.check_perm(CR | W, Perm::ALL).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(e.message, busy("\"write\"", &file));

    // Reading and sharing everything is what qemu-img -U does: allowed.
    take(&*node, CR, Perm::ALL);
    drop(qemu);
    take(&*node, CR | W, CR | WU);
}

#[test]
fn locking_off_takes_no_locks() {
    let file = qcow2_image();
    let opts = crate::parse_options(
        "file",
        serde_json::json!({"filename": file.name(), "locking": "off"}),
    )
    .unwrap();
    let node = super::FileDriver::open(opts).expect("open");
    assert!(!node.lock.enabled());
    take(&node, Perm::ALL, Perm::NONE);
    assert_eq!(held(&file), [0i64; 0]);
    let out = run("qemu-img", &["info", file.name()]);
    assert!(
        out.status.success(),
        "qemu-img info next to a locking=off writer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // auto (the default) and on lock here: this kernel has OFD locks.
    for mode in ["auto", "on"] {
        let opts = crate::parse_options(
            "file",
            serde_json::json!({"filename": file.name(), "locking": mode}),
        )
        .unwrap();
        assert!(
            super::FileDriver::open(opts).unwrap().lock.enabled(),
            "{mode}"
        );
    }
}

#[test]
fn a_node_opened_outside_a_graph_locks_nothing() {
    // strata-perf and the conformance suites open the same image many times over.
    let file = qcow2_image();
    let _a = file.open("");
    let _b = file.open("");
    assert_eq!(held(&file), [0i64; 0]);
    let out = run("qemu-img", &["info", file.name()]);
    assert!(out.status.success());
}
