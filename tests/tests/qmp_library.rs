//! stratad driven by the `qemu.qmp` Python library (from PyPI), unmodified: the client
//! QEMU's own tooling uses.

use std::process::Command;
use std::time::Duration;
use strata_tests::{Daemon, TempDir, require_tool, run, wait_output};

fn require_qemu_qmp() {
    require_tool("python3", "python3");
    let out = run(Command::new("python3").args(["-c", "import qemu.qmp"]));
    assert!(
        out.status.success(),
        "the qemu.qmp Python library is missing: run scripts/install-deps.sh \
         (pip install qemu.qmp)"
    );
}

#[test]
fn the_qemu_qmp_library_adds_queries_conflicts_and_deletes_nodes() {
    require_qemu_qmp();
    let dir = TempDir::new("qmp-lib");
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut daemon = Daemon::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/qmp_session.py");
    let child = Command::new("python3")
        .arg(script)
        .arg(&daemon.qmp)
        .arg(&image)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let out = wait_output(child, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "the qemu.qmp session failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("qmp session ok"));
    // The session ended with `quit`: the daemon exits by itself, cleanly.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while daemon.alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "stratad did not exit after quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = daemon.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "stratad exit status after quit: {status}");
    assert!(
        !daemon.qmp.exists(),
        "the QMP socket file is removed at exit"
    );
}
