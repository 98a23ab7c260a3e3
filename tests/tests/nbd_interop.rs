//! NBD interoperability: stratad's NBD server driven by the real clients Debian ships
//! (qemu-io and qemu-img from qemu-utils, nbdinfo and nbdcopy from libnbd-bin, fio's
//! `nbd` engine). Every check compares what a client reads with what the test wrote,
//! never with output recorded from the server.
//!
//! ```text
//!   test --spawn--> stratad --blockdev ... --nbd-server unix|inet --export type=nbd,...
//!    | \                 ^ NBD: unix socket or 127.0.0.1:PORT              ^
//!    |  \--spawn--> qemu-io, qemu-img, nbdinfo, nbdcopy, fio               |
//!    \---- JSON-RPC: nbd-server-start/-stop, block-export-add/-del/query --/
//! ```
//!
//! The server is `strata_tests::nbd::Server`: with `STRATA_NBD_SERVER=qemu-storage-daemon`
//! the same tests run against QEMU's daemon, the reference the expectations were checked
//! against.

use serde_json::{Value, json};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_tests::nbd::{Addr, Listen, Server};
use strata_tests::{
    ChildGuard, Ran, TempDir, collect, first_cpus, require_tool, run_limited, wait_output,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The size of every test disk.
const SIZE: u64 = 64 * MIB;
/// How long one client command may take before the test kills it and fails.
const CLIENT_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// Running clients

/// Runs `program args`, killing it (and failing) after [`CLIENT_LIMIT`].
fn exec(program: &str, args: &[&str]) -> Ran {
    run_limited(Command::new(program).args(args), CLIENT_LIMIT)
}

/// qemu-io on a raw image (a file or an NBD URI), one `-c` per command.
fn qemu_io(image: &str, commands: &[String]) -> Ran {
    qemu_io_with(&[], image, commands)
}

/// qemu-io with extra options (`-r`) before the image.
fn qemu_io_with(options: &[&str], image: &str, commands: &[String]) -> Ran {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend_from_slice(options);
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(image);
    exec("qemu-io", &args)
}

/// nbdinfo with `args`, its JSON output parsed.
fn nbdinfo_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let ran = exec("nbdinfo", &all).success();
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {ran}"))
}

// ---------------------------------------------------------------------------------------
// The server

/// `--blockdev` of a memory node `name` of [`SIZE`].
fn memory_node(name: &str) -> String {
    format!("driver=memory,node-name={name},size={}M", SIZE / MIB)
}

/// A server on `reactors` reactors (the harness's one on CPU 0, else the first ones this
/// process may use) exporting memory node `n0` as `disk`, writable.
fn memory_disk(reactors: usize, listen: Listen) -> Server {
    let node = memory_node("n0");
    let export = "type=nbd,id=e0,node-name=n0,name=disk,writable=on";
    let cpus = first_cpus(reactors);
    let mut args = vec!["--blockdev", &node, "--export", export];
    if reactors > 1 {
        args.extend(["-m", &cpus]);
    }
    Server::start(Some(listen), "", &args)
}

// ---------------------------------------------------------------------------------------
// What the tests write, and the model of what the disk then holds

/// One qemu-io write and its effect.
#[derive(Debug, Clone, Copy)]
struct Io {
    /// The qemu-io command: `write`, `write -f` (FUA), `aio_write`, `write -z` (write
    /// zeroes, no hole), `write -z -u` (write zeroes, may unmap), `discard` (trim: the
    /// model forgets nothing, so a later write must cover it).
    cmd: &'static str,
    /// The byte written (`None` for zeroes and discard).
    pattern: Option<u8>,
    offset: u64,
    len: u64,
}

impl Io {
    const fn data(cmd: &'static str, pattern: u8, offset: u64, len: u64) -> Io {
        Io {
            cmd,
            pattern: Some(pattern),
            offset,
            len,
        }
    }

    const fn zero(cmd: &'static str, offset: u64, len: u64) -> Io {
        Io {
            cmd,
            pattern: None,
            offset,
            len,
        }
    }

    const fn discard(offset: u64, len: u64) -> Io {
        Io::zero("discard", offset, len)
    }

    fn command(&self) -> String {
        match self.pattern {
            Some(p) => format!("{} -P {p:#04x} {} {}", self.cmd, self.offset, self.len),
            None => format!("{} {} {}", self.cmd, self.offset, self.len),
        }
    }

    fn apply(&self, model: &mut [u8]) {
        if self.cmd == "discard" {
            return;
        }
        let range = self.offset as usize..(self.offset + self.len) as usize;
        model[range].fill(self.pattern.unwrap_or(0));
    }
}

/// Writes at offsets aligned and unaligned to 512 bytes and to 64 KiB clusters,
/// crossing cluster boundaries, zeroes inside data, FUA, async writes, a discard that a
/// later write covers, and the last block of the disk.
const WRITES: &[Io] = &[
    Io::data("write", 0xab, 0, 64 * KIB),
    Io::data("write", 0xcd, 100_000, 12_345),
    Io::zero("write -z", 32 * KIB, 4 * KIB),
    Io::data("write", 0x5a, MIB - 512, 1536),
    Io::data("write -f", 0x42, 2 * MIB, 64 * KIB),
    Io::data("write", 0x77, 3 * MIB + 1, 131_071),
    Io::zero("write -z", 3 * MIB + 65_536, 100),
    Io::zero("write -z -u", 3 * MIB + 98_304, 8 * KIB),
    Io::data("aio_write", 0x11, 5 * MIB, 64 * KIB),
    Io::data("aio_write", 0x22, 5 * MIB + 64 * KIB, 64 * KIB + 3),
    Io::data("write", 0x99, 6 * MIB, MIB),
    Io::discard(6 * MIB, MIB),
    Io::data("write", 0x21, 6 * MIB, MIB),
    Io::data("write", 0xee, SIZE - 4 * KIB, 4 * KIB),
];

/// The qemu-io commands for `ios` (async writes are followed by `aio_flush`), then a
/// `flush`.
fn write_commands(ios: &[Io]) -> Vec<String> {
    let mut cmds = Vec::new();
    for io in ios {
        cmds.push(io.command());
        if io.cmd == "aio_write" {
            cmds.push("aio_flush".into());
        }
    }
    cmds.push("flush".into());
    cmds
}

/// A fresh disk of [`SIZE`] zeroes with `ios` applied.
fn model_of(ios: &[Io]) -> Vec<u8> {
    let mut model = vec![0; SIZE as usize];
    for io in ios {
        io.apply(&mut model);
    }
    model
}

/// `read -P` commands that check every byte of `model`, one per run of equal bytes.
fn read_commands(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let byte = model[start];
        let end = model[start..]
            .iter()
            .position(|&b| b != byte)
            .map_or(model.len(), |n| start + n);
        cmds.push(format!("read -P {byte:#04x} {start} {}", end - start));
        start = end;
    }
    cmds
}

/// Bytes from a fixed-seed xorshift, with zeroed stretches (so copies exercise zero
/// detection, write-zeroes and block status).
fn random_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut bytes = Vec::with_capacity(SIZE as usize);
    while bytes.len() < SIZE as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    for (off, len) in [
        (4 * MIB, 4 * MIB),
        (20 * MIB + 4096, 64 * KIB),
        (SIZE - MIB, MIB),
    ] {
        bytes[off as usize..(off + len) as usize].fill(0);
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Asserts that `path` holds exactly `expected`, naming the first differing offset.
fn assert_file_is(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), expected.len(), "size of {}", path.display());
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{} differs at offset {at}: {:#04x}, expected {:#04x}",
            path.display(),
            got[at],
            expected[at]
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. qemu-io

/// Writes [`WRITES`] through `uri` in one qemu-io run, reads every byte back in another
/// (a new connection), and checks that a wrong pattern is caught.
fn qemu_io_round_trip(uri: &str) {
    let ran = qemu_io(uri, &write_commands(WRITES)).success();
    for io in WRITES.iter().filter(|io| io.cmd != "discard") {
        let done = format!("wrote {}/{} bytes at offset {}", io.len, io.len, io.offset);
        assert!(ran.stdout.contains(&done), "{done}: {ran}");
    }
    assert!(ran.stderr.is_empty(), "{ran}");

    let model = model_of(WRITES);
    let reads = read_commands(&model);
    let ran = qemu_io(uri, &reads).success();
    assert!(!ran.stdout.contains("verification failed"), "{ran}");
    assert_eq!(
        ran.stdout.matches("read ").count(),
        reads.len(),
        "one line per read: {ran}"
    );

    // The check can fail: a wrong pattern is reported and qemu-io exits 1.
    let ran = qemu_io(uri, &["read -P 0xab 65536 4096".into()]).failure();
    assert!(
        ran.stdout
            .contains("Pattern verification failed at offset 65536"),
        "{ran}"
    );
}

#[test]
fn qemu_io_patterns_read_back_over_a_unix_socket() {
    require_tool("qemu-io", "qemu-utils");
    let s = memory_disk(1, Listen::Unix);
    qemu_io_round_trip(&s.uri("disk"));
}

#[test]
fn qemu_io_patterns_read_back_over_tcp() {
    require_tool("qemu-io", "qemu-utils");
    let s = memory_disk(1, Listen::Tcp);
    let uri = s.uri("disk");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    qemu_io_round_trip(&uri);
}

// ---------------------------------------------------------------------------------------
// 2. qemu-img compare

#[test]
fn qemu_img_compare_finds_the_export_equal_to_a_file_with_the_same_writes() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let s = memory_disk(1, Listen::Unix);
    let uri = s.uri("disk");
    let reference = s.dir().join("reference.img");
    File::create(&reference).unwrap().set_len(SIZE).unwrap();
    let reference = reference.to_str().unwrap();
    qemu_io(&uri, &write_commands(WRITES)).success();
    qemu_io(reference, &write_commands(WRITES)).success();

    for (a, b) in [(reference, uri.as_str()), (uri.as_str(), reference)] {
        let ran = exec("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b]).success();
        assert!(ran.stdout.contains("Images are identical."), "{ran}");
    }
    // The NBD side as --image-opts: export name and socket as the nbd driver's options.
    let Addr::Unix(sock) = s.addr() else {
        unreachable!("a Unix socket")
    };
    let nbd_opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk",
        sock.display()
    );
    let file_opts = format!("driver=file,filename={reference}");
    let ran = exec(
        "qemu-img",
        &["compare", "--image-opts", &file_opts, &nbd_opts],
    )
    .success();
    assert!(ran.stdout.contains("Images are identical."), "{ran}");

    // One differing write, not aligned to anything: found, at its 512-byte sector.
    let off = 5 * MIB + 333;
    qemu_io(&uri, &[format!("write -P 0x3c {off} 10")]).success();
    let ran = exec(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", reference, &uri],
    );
    assert_eq!(ran.code, 1, "1 means the images differ: {ran}");
    let at: u64 = ran
        .stdout
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|r| r.split('!').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no mismatch offset: {ran}"));
    assert!(
        at <= off && off - at < 512,
        "mismatch at {at}, wrote at {off}: {ran}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. qemu-img convert

#[test]
fn qemu_img_convert_copies_a_file_to_the_export_and_back() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let s = memory_disk(1, Listen::Unix);
    let uri = s.uri("disk");
    let src = s.dir().join("src.img");
    let bytes = random_image(&src, 0x5eed_0001);
    // Non-zero everywhere first, so the zeroed stretches of the source must be written.
    qemu_io(&uri, &[format!("write -P 0xee 0 {SIZE}")]).success();

    let src = src.to_str().unwrap();
    exec(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .success();
    let dst = s.dir().join("dst.img");
    let dst_s = dst.to_str().unwrap();
    exec(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, dst_s],
    )
    .success();
    assert_file_is(&dst, &bytes);
    let ran = exec(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .success();
    assert!(ran.stdout.contains("Images are identical."), "{ran}");
}

// ---------------------------------------------------------------------------------------
// 4. nbdinfo

/// Where `sparse_file` wrote data: (offset, length).
const SPARSE_DATA: &[(u64, u64)] = &[
    (128 * KIB, 64 * KIB),
    (6400 * KIB, 192 * KIB),
    (10 * MIB + 5000, 100),
    (SPARSE_SIZE - 64 * KIB, 64 * KIB),
];
const SPARSE_SIZE: u64 = 16 * MIB;

/// A sparse file of [`SPARSE_SIZE`] with data only at [`SPARSE_DATA`] (written in
/// place, as `dd conv=notrunc` does); returns the filesystem's block size.
fn sparse_file(path: &Path) -> u64 {
    let f = File::create(path).unwrap();
    f.set_len(SPARSE_SIZE).unwrap();
    for (i, &(off, len)) in SPARSE_DATA.iter().enumerate() {
        f.write_all_at(&vec![0x41 + i as u8; len as usize], off)
            .unwrap();
    }
    f.sync_all().unwrap();
    f.metadata().unwrap().blksize()
}

/// The map a server should report for [`sparse_file`]: data where it wrote (rounded
/// out to the filesystem's blocks), holes that read as zero elsewhere; as nbdinfo's
/// (offset, length, type) with type 0 for data and 3 for hole,zero.
fn expected_map(block: u64) -> Vec<(u64, u64, u64)> {
    let mut map: Vec<(u64, u64, u64)> = Vec::new();
    let mut at = 0;
    for &(off, len) in SPARSE_DATA {
        let (start, end) = (off / block * block, (off + len).div_ceil(block) * block);
        if start > at {
            map.push((at, start - at, 3));
        }
        map.push((start, end - start, 0));
        at = end;
    }
    if at < SPARSE_SIZE {
        map.push((at, SPARSE_SIZE - at, 3));
    }
    map
}

/// `nbdinfo --map --json` as (offset, length, type), adjacent extents of one type
/// merged (a server may split its answer anywhere).
fn map_of(uri: &str) -> Vec<(u64, u64, u64)> {
    let extents = nbdinfo_json(&["--map", uri]);
    let mut map: Vec<(u64, u64, u64)> = Vec::new();
    for e in extents.as_array().expect("a list of extents") {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        match map.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == off => last.1 += len,
            _ => map.push((off, len, ty)),
        }
    }
    map
}

#[test]
fn nbdinfo_shows_size_flags_names_descriptions_and_the_map_of_a_sparse_file() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbd-sparse");
    let sparse = dir.path("sparse.img");
    let block = sparse_file(&sparse);
    let file_node = format!("driver=file,node-name=f,filename={}", sparse.display());
    let mem = memory_node("n0");
    let s = Server::start(
        Some(Listen::Unix),
        "",
        &[
            "--blockdev",
            &mem,
            "--blockdev",
            "driver=null-co,node-name=null,size=1073741824",
            "--blockdev",
            &file_node,
            "--blockdev",
            "driver=raw,node-name=r,file=f",
            "--export",
            "type=nbd,id=e0,node-name=n0,name=disk,writable=on,description=Strata test disk",
            "--export",
            "type=nbd,id=e1,node-name=null,name=null,writable=off",
            "--export",
            "type=nbd,id=e2,node-name=f,name=file",
            "--export",
            "type=nbd,id=e3,node-name=r,name=raw",
        ],
    );

    let disk = nbdinfo_json(&[&s.uri("disk")]);
    assert_eq!(disk["structured"], json!(true), "{disk:#}");
    let e = &disk["exports"][0];
    assert_eq!(e["export-name"], json!("disk"), "{disk:#}");
    assert_eq!(e["description"], json!("Strata test disk"), "{disk:#}");
    assert_eq!(e["export-size"], json!(SIZE), "{disk:#}");
    assert_eq!(e["is_read_only"], json!(false), "{disk:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
    ] {
        assert_eq!(e[flag], json!(true), "{flag}: {disk:#}");
    }
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .contains(&json!("base:allocation")),
        "{disk:#}"
    );
    let null = nbdinfo_json(&[&s.uri("null")]);
    let e = &null["exports"][0];
    assert_eq!(e["export-size"], json!(1u64 << 30), "{null:#}");
    assert_eq!(e["is_read_only"], json!(true), "writable=off: {null:#}");
    assert!(e.get("description").is_none(), "{null:#}");
    exec("nbdinfo", &["--is", "read-only", &s.uri("null")]).success();
    let list = nbdinfo_json(&["--list", &s.list_uri()]);
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    // In the order the exports were added, as qemu-storage-daemon lists them.
    assert_eq!(names, ["disk", "null", "file", "raw"], "{list:#}");
    let described: Vec<&Value> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("description").is_some())
        .collect();
    assert_eq!(described.len(), 1, "{list:#}");
    assert_eq!(described[0]["description"], json!("Strata test disk"));

    // Block status through the file node and through raw over it.
    let expected = expected_map(block);
    for name in ["file", "raw"] {
        assert_eq!(
            map_of(&s.uri(name)),
            expected,
            "{name}: map of a sparse file with data at {SPARSE_DATA:?} \
             (filesystem block {block})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. nbdcopy

/// nbdcopy spreads its requests over several connections (the export allows
/// multi-conn), here served by two reactors.
#[test]
fn nbdcopy_copies_to_and_from_the_export_over_four_connections() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let s = memory_disk(2, Listen::Unix);
    let uri = s.uri("disk");
    let src = s.dir().join("src.img");
    let bytes = random_image(&src, 0x5eed_0002);
    qemu_io(&uri, &[format!("write -P 0xee 0 {SIZE}")]).success();

    let src = src.to_str().unwrap();
    exec("nbdcopy", &["--connections=4", "--flush", src, &uri]).success();
    let dst = s.dir().join("dst.img");
    exec("nbdcopy", &["--connections=4", &uri, dst.to_str().unwrap()]).success();
    assert_file_is(&dst, &bytes);
}

// ---------------------------------------------------------------------------------------
// 6. fio

/// Runs fio's `nbd` engine on `uri` with `args`; asserts exit 0, no job error, no
/// verify complaint, and that every job read back (verified) all it wrote. Returns the
/// number of jobs.
fn fio_verify(uri: &str, args: &[&str]) -> usize {
    let uri_arg = format!("--uri={uri}");
    let mut all = vec![
        "--name=verify",
        "--ioengine=nbd",
        &uri_arg,
        "--rw=randwrite",
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
        // No verify-state files left in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ];
    all.extend_from_slice(args);
    let ran = exec("fio", &all);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(!ran.stderr.contains("verify:"), "{ran}");
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    let json_at = match ran.stdout.find("\n{") {
        _ if ran.stdout.starts_with('{') => 0,
        Some(n) => n + 1,
        None => panic!("no JSON from fio: {ran}"),
    };
    let report: Value = serde_json::from_str(&ran.stdout[json_at..])
        .unwrap_or_else(|e| panic!("fio's JSON ({e}): {ran}"));
    let jobs = report["jobs"].as_array().expect("jobs");
    for job in jobs {
        assert_eq!(job["error"], json!(0), "{ran}");
        let written = job["write"]["io_bytes"].as_u64().unwrap();
        let read = job["read"]["io_bytes"].as_u64().unwrap();
        assert!(written > 0, "{ran}");
        assert_eq!(read, written, "verify reads all it wrote: {ran}");
    }
    jobs.len()
}

#[test]
fn fio_nbd_engine_verifies_random_writes() {
    require_tool("fio", "fio");
    let s = memory_disk(1, Listen::Unix);
    let size = format!("--size={}M", SIZE / MIB);
    fio_verify(&s.uri("disk"), &["--bs=4k", &size]);
    fio_verify(&s.uri("disk"), &["--bsrange=4k-64k", &size]);
}

#[test]
fn fio_two_jobs_verify_on_two_reactors() {
    require_tool("fio", "fio");
    let s = memory_disk(2, Listen::Unix);
    let half = format!("{}M", SIZE / MIB / 2);
    let jobs = fio_verify(
        &s.uri("disk"),
        &[
            "--bsrange=4k-64k",
            "--numjobs=2",
            &format!("--size={half}"),
            &format!("--offset_increment={half}"),
        ],
    );
    assert_eq!(jobs, 2);
}

// ---------------------------------------------------------------------------------------
// 7. A read-only export

#[test]
fn a_read_only_export_refuses_writes_and_serves_reads() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbd-ro");
    let img = dir.path("ro.img");
    let f = File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&vec![0x5a; MIB as usize], 0).unwrap();
    drop(f);
    let node = format!("driver=file,node-name=f,filename={}", img.display());
    let s = Server::start(
        Some(Listen::Unix),
        "",
        &[
            "--blockdev",
            &node,
            "--export",
            "type=nbd,id=e0,node-name=f,name=disk,writable=off",
        ],
    );
    let uri = s.uri("disk");
    exec("nbdinfo", &["--is", "read-only", &uri]).success();

    // qemu-io opens read-write unless told -r: the open is refused.
    let ran = qemu_io(&uri, &["write -P 0x01 0 4096".into()]).failure();
    assert!(ran.stderr.contains("Permission denied"), "{ran}");
    assert!(!ran.stdout.contains("wrote"), "{ran}");

    let reads = [
        format!("read -P 0x5a 0 {MIB}"),
        format!("read -P 0 {MIB} {}", SIZE - MIB),
    ];
    qemu_io_with(&["-r"], &uri, &reads).success();
    let mut head = vec![0; MIB as usize + 1];
    File::open(&img).unwrap().read_exact(&mut head).unwrap();
    assert!(head[..MIB as usize].iter().all(|&b| b == 0x5a) && head[MIB as usize] == 0);
}

// ---------------------------------------------------------------------------------------
// 8. Exports over RPC

#[test]
fn exports_are_added_listed_and_removed_over_rpc() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let node = memory_node("n0");
    let mut s = Server::start(None, "", &["--blockdev", &node]);
    let sock = s.dir().join("nbd.sock");
    s.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    s.nbd = Some(Addr::Unix(sock));
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk",
               "description": "added over RPC", "writable": true}),
    );
    let exports = s.ok("query-block-exports", Value::Null);
    let listed = exports
        .as_array()
        .expect("a list of exports")
        .iter()
        .find(|e| e["id"] == json!("e0"))
        .unwrap_or_else(|| panic!("e0 is not listed: {exports}"));
    assert_eq!(listed["type"], json!("nbd"), "{exports}");
    assert_eq!(listed["node-name"], json!("n0"), "{exports}");
    assert_eq!(listed["shutting-down"], json!(false), "{exports}");
    let info = nbdinfo_json(&[&s.uri("disk")]);
    assert_eq!(info["exports"][0]["description"], json!("added over RPC"));
    assert_eq!(info["exports"][0]["is_read_only"], json!(false));

    // A connected client keeps a safe removal from happening; a hard one cuts it off.
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &s.uri("disk")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = client.stdin.take().unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let (out_thread, lines) = collect(client.stdout.take().unwrap(), out.clone());
    let mut client = ChildGuard(Some(client));
    writeln!(stdin, "read 0 512").unwrap();
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("qemu-io did not read");
    assert!(line.contains("read 512/512 bytes at offset 0"), "{line}");
    let busy = s.call("block-export-del", json!({"id": "e0", "mode": "safe"}));
    assert!(
        busy.is_err(),
        "safe removal with a client connected: {busy:?}"
    );
    s.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    writeln!(stdin, "read 0 512").unwrap();
    drop(stdin);
    let done = wait_output(client.0.take().unwrap(), Duration::from_secs(30));
    out_thread.join().unwrap();
    let out = out.lock().unwrap().clone() + &String::from_utf8_lossy(&done.stderr);
    assert!(out.contains("read failed"), "the cut-off client: {out}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exports = s.ok("query-block-exports", Value::Null);
        if exports.as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "e0 stays listed: {exports}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ran = exec("nbdinfo", &[&s.uri("disk")]).failure();
    assert!(ran.stderr.contains("disk"), "{ran}");
    let gone = s.call("block-export-del", json!({"id": "e0"}));
    assert!(gone.is_err(), "removing it twice: {gone:?}");

    // Defaults: the node name as export name, read-only.
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "n0"}),
    );
    let list = nbdinfo_json(&["--list", &s.list_uri()]);
    let e = &list["exports"][0];
    assert_eq!(e["export-name"], json!("n0"), "{list:#}");
    assert_eq!(e["is_read_only"], json!(true), "{list:#}");

    // Stopping the server removes its exports, as in QEMU.
    s.ok("nbd-server-stop", Value::Null);
    exec("nbdinfo", &[&s.uri("n0")]).failure();
    let exports = s.ok("query-block-exports", Value::Null);
    assert_eq!(exports, json!([]), "{exports}");
}
