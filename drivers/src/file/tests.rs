//! `file` driver tests: the conformance suite buffered and with `O_DIRECT`, plus what is
//! particular to files (open errors, end of file, holes).

use crate::conformance::{self, Expect, on_reactor};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use strata_engine::{Buffer, Driver, ErrorKind, Extent, Handle, ReqFlags, Request};

/// A file for one test, in a directory next to the test binary (under `target/`, on the
/// disk's file system: tmpfs may lack `O_DIRECT`), removed on drop.
pub(super) struct TestFile {
    pub path: PathBuf,
}

impl TestFile {
    pub fn new(size: u64) -> TestFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let exe = std::env::current_exe().expect("test binary path");
        let dir = exe
            .parent()
            .expect("test binary directory")
            .join("strata-test-files");
        std::fs::create_dir_all(&dir).expect("create the test file directory");
        let name = format!(
            "file-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let f = std::fs::File::create(&path).expect("create test file");
        f.set_len(size).expect("size test file");
        TestFile { path }
    }

    pub fn name(&self) -> &str {
        self.path.to_str().expect("test paths are UTF-8")
    }

    /// Opens a node on this file with extra keyval options.
    pub fn open(&self, opts: &str) -> Arc<dyn Driver> {
        let spec = format!(
            "driver=file,filename={}{}{opts}",
            self.name(),
            if opts.is_empty() { "" } else { "," }
        );
        crate::open_keyval(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn suite(opts: &'static str) {
    let file = TestFile::new(conformance::MIN_SIZE);
    let ro = format!(
        "{opts}{}read-only=on",
        if opts.is_empty() { "" } else { "," }
    );
    conformance::run(
        &format!("file {opts}"),
        &|| file.open(opts),
        Expect::stores_data().read_only(&|| file.open(&ro)),
    );
}

#[test]
fn buffered_file_passes_the_conformance_suite() {
    suite("");
}

#[test]
fn direct_file_passes_the_conformance_suite() {
    suite("cache.direct=on");
}

#[test]
fn no_flush_file_passes_the_conformance_suite() {
    suite("cache.no-flush=on");
}

#[test]
fn keyval_options_reach_the_node() {
    let file = TestFile::new(1 << 20);
    let buffered = file.open("");
    assert_eq!(buffered.info().request_alignment, 1);
    assert_eq!(buffered.info().size, 1 << 20);
    let direct = file.open("cache.direct=on,aio=io_uring,locking=off");
    let align = direct.info().request_alignment;
    assert!(
        align > 1 && align.is_power_of_two() && align <= 4096,
        "O_DIRECT alignment {align}"
    );
    assert!(file.open("read-only=on").info().read_only);
}

#[test]
fn missing_file_is_not_found_and_names_the_file() {
    let e = crate::open_keyval("driver=file,filename=/nonexistent/strata-test").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("/nonexistent/strata-test"), "{e}");
}

#[test]
fn bad_options_are_invalid_and_name_the_option() {
    let file = TestFile::new(4096);
    for (opts, needle) in [
        ("cache.direct=maybe", "cache.direct"),
        (
            "aio=threads",
            "aio=threads is not supported; Strata uses io_uring",
        ),
        ("locking=perhaps", "locking"),
        ("cache.size=1", "size"),
    ] {
        let spec = format!("driver=file,filename={},{opts}", file.name());
        let e = crate::open_keyval(&spec).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{spec}: {e}");
        assert!(
            e.message.contains(needle),
            "{spec}: '{e}' should mention '{needle}'"
        );
    }
    let e = crate::open_keyval("driver=file").unwrap_err();
    assert!(e.message.contains("filename"), "{e}");
}

#[test]
fn a_directory_is_refused_with_a_message() {
    let dir = std::env::temp_dir();
    let e = crate::open_keyval(&format!(
        "driver=file,filename={},read-only=on",
        dir.display()
    ))
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.message
            .contains("neither a regular file nor a block device"),
        "{e}"
    );
}

#[test]
fn a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer() {
    let path = std::env::temp_dir().join(format!("strata-fifo-{}", std::process::id()));
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let spec = format!("driver=file,filename={},read-only=on", path.display());
    // A blocking open would wait for a writer forever: run it on a thread we can abandon.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(crate::open_keyval(&spec).map(|_| ())).ok());
    let res = rx.recv_timeout(std::time::Duration::from_secs(10));
    std::fs::remove_file(&path).ok();
    let e = res.expect("opening a FIFO must not block").unwrap_err();
    assert!(
        e.message
            .contains("neither a regular file nor a block device"),
        "{e}"
    );
}

/// Bytes `0..len` of the test pattern used below.
fn ramp(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

fn reads_past_a_shrunk_end_are_zero_filled(opts: &str) {
    const LEN: usize = 1 << 20;
    const NEW_END: u64 = 100_000;
    let file = TestFile::new(0);
    std::fs::write(&file.path, ramp(LEN)).expect("fill the file");
    let node = file.open(opts);
    // Shrink the file under the open node: its size stays, reads past the new end of
    // file get 0 bytes from the kernel and must come back zero-filled.
    std::fs::File::options()
        .write(true)
        .open(&file.path)
        .unwrap()
        .set_len(NEW_END)
        .unwrap();
    let (across, past, extents) = on_reactor(move || async move {
        let h = Handle::open(&*node).expect("queue");
        let read = |offset| {
            let mut buf = Buffer::new(128 << 10);
            buf.fill(0xee);
            h.submit(Request::read(offset, buf))
        };
        let across = read(64 << 10).await;
        let past = read(512 << 10).await;
        let status = h.submit(Request::block_status(512 << 10, 4096)).await;
        assert_eq!(
            (across.result, past.result, status.result),
            (Ok(()), Ok(()), Ok(()))
        );
        (
            across.req.buf.unwrap().to_vec(),
            past.req.buf.unwrap().to_vec(),
            status.req.extents,
        )
    });
    let split = NEW_END as usize - (64 << 10);
    assert_eq!(
        across[..split],
        ramp(LEN)[64 << 10..NEW_END as usize],
        "data before the new end"
    );
    assert!(
        across[split..].iter().all(|&b| b == 0),
        "bytes after the new end read as zeroes"
    );
    assert!(
        past.iter().all(|&b| b == 0),
        "a read wholly past the end reads zeroes"
    );
    assert!(
        extents[0].state.zero && !extents[0].state.data,
        "past the end is a hole: {extents:?}"
    );
}

#[test]
fn buffered_reads_past_a_shrunk_end_are_zero_filled() {
    reads_past_a_shrunk_end_are_zero_filled("");
}

#[test]
fn direct_reads_past_a_shrunk_end_are_zero_filled() {
    reads_past_a_shrunk_end_are_zero_filled("cache.direct=on");
}

/// The extent containing `offset`, asking block-status from there.
async fn extent_at(h: &Handle, offset: u64, len: u64) -> Extent {
    let c = h.submit(Request::block_status(offset, len)).await;
    assert_eq!(c.result, Ok(()), "block-status at {offset}");
    c.req.extents[0]
}

#[test]
fn block_status_reports_holes_as_zero_and_written_data_as_data() {
    const MIB: u64 = 1 << 20;
    let file = TestFile::new(4 * MIB);
    let node = file.open("");
    let (hole, data, after, zeroed) = on_reactor(move || async move {
        let h = Handle::open(&*node).expect("queue");
        let c = h
            .submit(Request::write(
                MIB,
                Buffer::from_slice(&ramp(64 << 10)),
                ReqFlags::NONE,
            ))
            .await;
        assert_eq!(c.result, Ok(()));
        assert_eq!(h.submit(Request::flush()).await.result, Ok(()));
        let hole = extent_at(&h, 0, 4 * MIB).await;
        let data = extent_at(&h, MIB, 3 * MIB).await;
        let after = extent_at(&h, MIB + (64 << 10), MIB).await;
        // Write-zeroes with MAY_UNMAP punches a hole where there was data.
        let z = h
            .submit(Request::write_zeroes(MIB, 64 << 10, ReqFlags::MAY_UNMAP))
            .await;
        assert_eq!(z.result, Ok(()));
        let zeroed = extent_at(&h, MIB, 64 << 10).await;
        (hole, data, after, zeroed)
    });
    let zero = |e: &Extent| e.state.allocated && e.state.zero && !e.state.data;
    let data_state = |e: &Extent| e.state.allocated && e.state.data && !e.state.zero;
    assert!(
        zero(&hole) && hole.offset == 0 && hole.len == MIB,
        "leading hole: {hole:?}"
    );
    assert!(
        data_state(&data) && data.len == 64 << 10,
        "written data: {data:?}"
    );
    assert!(
        zero(&after) && after.len == MIB,
        "hole after the data: {after:?}"
    );
    assert!(zero(&zeroed), "punched range: {zeroed:?}");
}

#[test]
fn continuations_move_only_the_rest_of_the_buffer() {
    use std::os::fd::AsRawFd;
    use strata_engine::reactor::ring::Target;
    use strata_engine::reactor::ring::{read_at_from as read_part, write_at_from as write_part};
    let file = TestFile::new(0);
    let data = ramp(8192);
    std::fs::write(&file.path, &data).expect("fill the file");
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&file.path)
        .unwrap();
    let fd = f.as_raw_fd();
    let read = on_reactor(move || async move {
        let mut buf = Buffer::new(4096);
        buf.fill(0xee);
        // Read into buf[100..] from file offset 1000.
        let (res, buf) = read_part(Target::Fd(fd), buf, 100, 1000).await;
        assert_eq!(res, 4096 - 100);
        // Write buf[4000..] (file bytes 4900..4996) at offset 0.
        let (res, buf) = write_part(Target::Fd(fd), buf, 4000, 0, 0).await;
        assert_eq!(res, 96);
        buf.to_vec()
    });
    drop(f);
    assert!(
        read[..100].iter().all(|&b| b == 0xee),
        "bytes before the continuation are untouched"
    );
    assert_eq!(read[100..], data[1000..1000 + 3996]);
    let now = std::fs::read(&file.path).unwrap();
    assert_eq!(
        now[..96],
        data[4900..4996],
        "the write took only the rest of the buffer"
    );
    assert_eq!(now[96..], data[96..], "and nothing more");
}

#[test]
fn a_full_fixed_file_table_falls_back_to_the_descriptor() {
    use super::queue::FileQueue;
    use strata_engine::Queue;
    use strata_engine::reactor::ring::{FIXED_FILES, Target};
    let file = TestFile::new(1 << 20);
    let opts = crate::parse_options("file", serde_json::json!({"filename": file.name()})).unwrap();
    let node = Arc::new(super::FileDriver::open(opts).expect("open"));
    let (targets, data) = on_reactor(move || async move {
        // Fill this reactor's file table with the file, then open one more queue.
        let queues: Vec<_> = (0..FIXED_FILES)
            .map(|_| FileQueue::open(node.host.clone()))
            .collect();
        let last = FileQueue::open(node.host.clone());
        let targets = (queues[0].target(), last.target());
        drop(queues);
        // The queue on the plain descriptor does I/O all the same.
        let w = last
            .submit(Request::write(
                4096,
                Buffer::from_slice(&ramp(4096)),
                ReqFlags::FUA,
            ))
            .await;
        assert_eq!(w.result, Ok(()));
        let c = last.submit(Request::read(4096, Buffer::new(4096))).await;
        assert_eq!(c.result, Ok(()));
        (targets, c.req.buf.unwrap().to_vec())
    });
    assert!(matches!(targets.0, Target::Fixed(_)), "{targets:?}");
    assert!(matches!(targets.1, Target::Fd(_)), "{targets:?}");
    assert_eq!(data, ramp(4096));
}

/// A loop device over a test file, detached on drop.
struct LoopDevice {
    path: String,
    _backing: TestFile,
}

impl LoopDevice {
    fn new(size: u64) -> LoopDevice {
        let backing = TestFile::new(size);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", backing.name()])
            .output()
            .unwrap_or_else(|e| {
                panic!("this test needs losetup (util-linux) to attach a loop device: {e}")
            });
        assert!(
            out.status.success(),
            "this test needs root to attach a loop device: losetup said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let path = String::from_utf8(out.stdout)
            .expect("losetup prints a path")
            .trim()
            .to_string();
        LoopDevice {
            path,
            _backing: backing,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.path])
            .status();
    }
}

#[test]
fn block_device_passes_the_conformance_suite() {
    let dev = LoopDevice::new(conformance::MIN_SIZE);
    for opts in ["", ",cache.direct=on"] {
        let spec = format!("driver=file,filename={}{opts}", dev.path);
        let read_only = format!("{spec},read-only=on");
        let node = crate::open_keyval(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(node.info().size, conformance::MIN_SIZE, "BLKGETSIZE64");
        if !opts.is_empty() {
            assert_eq!(
                node.info().request_alignment,
                512,
                "BLKSSZGET of a loop device"
            );
        }
        conformance::run(
            &spec,
            &|| crate::open_keyval(&spec).expect("open"),
            Expect::stores_data().read_only(&|| crate::open_keyval(&read_only).expect("open")),
        );
    }
}
