//! Image locking between stratad and QEMU's own tools: the same OFD lock bytes, so each
//! side sees the other.

use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use strata_tests::{ChildGuard, Daemon, TempDir, require_tool, run};

/// A qcow2 image made by qemu-img. Strata opens it as a plain `file` node; QEMU opens
/// it as qcow2, whose metadata child needs the file unshared for writing, so the two
/// see each other's locks. (On a raw image `qemu-img info` asks for no permission at
/// all and never conflicts: checked with QEMU 10.0.)
fn image(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path("disk.qcow2");
    let out = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("4M"));
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn qemu_img_info(path: &Path) -> (bool, String) {
    let out = run(Command::new("qemu-img").arg("info").arg(path));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// OFD lock lines in /proc/locks on `path`'s inode.
fn locks_on(path: &Path) -> Vec<String> {
    let ino = std::fs::metadata(path).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
        .map(str::to_string)
        .collect()
}

/// Every byte covered by an OFD lock on `path` (the kernel merges adjacent ranges).
fn locked_bytes(path: &Path) -> Vec<u64> {
    let mut bytes: Vec<u64> = locks_on(path)
        .iter()
        .flat_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (start, end): (u64, u64) = (
                f[f.len() - 2].parse().unwrap(),
                f[f.len() - 1].parse().unwrap(),
            );
            start..=end
        })
        .collect();
    bytes.sort_unstable();
    bytes.dedup();
    bytes
}

/// stratad with a `file` node `f` on `img` and a `raw` node `disk` over it.
fn daemon_with_disk(img: &Path) -> Daemon {
    let file = format!("driver=file,node-name=f,filename={}", img.display());
    Daemon::start(&[
        "--blockdev",
        &file,
        "--blockdev",
        "driver=raw,node-name=disk,file=f",
    ])
}

#[test]
fn qemu_img_cannot_open_an_image_stratad_writes() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("lock-held");
    let img = image(&dir);
    let daemon = daemon_with_disk(&img);
    let mut rpc = daemon.rpc();
    // As in QEMU, nodes without users take no permissions, so no locks yet.
    assert_eq!(qemu_img_info(&img), (true, String::new()));
    assert!(locks_on(&img).is_empty(), "{:?}", locks_on(&img));
    // A writer of the raw node (what an export will be) makes the file node take write
    // and unshare it: QEMU's tools now see the image as in use.
    rpc.ok(
        "x-debug-block-user-add",
        json!({"id": "w", "node-name": "disk", "perm": ["consistent-read", "write"],
               "shared-perm": ["consistent-read", "write-unchanged"]}),
    );
    let (ok, err) = qemu_img_info(&img);
    assert!(
        !ok,
        "qemu-img info must fail while stratad writes the image"
    );
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(err.contains("Is another process using the image"), "{err}");
    // Lock bytes exactly as QEMU takes them: 100 (consistent read) and 101 (write) held;
    // 201 (write) and 203 (resize) unshared, since the user shares only consistent read
    // and write-unchanged.
    let locked = locked_bytes(&img);
    assert_eq!(locked, [100, 101, 201, 203], "{:?}", locks_on(&img));
    rpc.ok("x-debug-block-user-del", json!({"id": "w"}));
    assert!(qemu_img_info(&img).0, "locks are released with the user");
    drop(daemon);
}

#[test]
fn stratad_cannot_write_an_image_qemu_io_holds() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("lock-qemu-io");
    let img = image(&dir);
    // qemu-io holding the image open for writing (until killed).
    let holder = ChildGuard(Some(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 600000"])
            .arg(&img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io"),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while locks_on(&img).is_empty() {
        assert!(Instant::now() < deadline, "qemu-io never locked the image");
        std::thread::sleep(Duration::from_millis(20));
    }
    let daemon = daemon_with_disk(&img);
    let mut rpc = daemon.rpc();
    let err = rpc
        .call(
            "x-debug-block-user-add",
            json!({"id": "w", "node-name": "disk", "perm": ["consistent-read", "write"],
                   "shared-perm": ["consistent-read", "write-unchanged"]}),
        )
        .expect_err("writing an image qemu-io writes must be refused");
    assert!(err.1.contains("Failed to get \"write\" lock"), "{err:?}");
    assert!(
        err.1.contains("Is another process using the image"),
        "{err:?}"
    );
    // A reader that lets others write fits next to qemu-io's writer (its qcow2 node
    // shares consistent read of the file).
    rpc.ok(
        "x-debug-block-user-add",
        json!({"id": "r", "node-name": "disk", "perm": ["consistent-read"],
               "shared-perm": ["consistent-read", "write", "write-unchanged", "resize"]}),
    );
    // The refused change left nothing behind: after qemu-io exits, the writer fits.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = rpc.call(
            "x-debug-block-user-add",
            json!({"id": "w", "node-name": "disk", "perm": ["consistent-read", "write"],
                   "shared-perm": ["consistent-read", "write-unchanged"]}),
        );
        if r.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lock stayed after qemu-io exited: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
