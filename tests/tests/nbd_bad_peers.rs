//! Bad NBD peers over raw sockets: every malformed handshake or request gets its exact
//! protocol outcome (an option error, a request error, or a closed connection), and after
//! each one a well-behaved client on the same daemon still completes NBD_OPT_GO and a
//! write + read round trip, so other clients and the node are unaffected.
//!
//! The rules are those of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md); the
//! client is `strata_tests::nbd`. Every socket has a 10 s timeout, and a connection the
//! server is to close must be closed within 5 s (`CLOSE_WAIT`): a server that hangs fails
//! the test instead of hanging it. No other timing is asserted.
//!
//! Development aid: `STRATA_NBD_TEST_SERVER=qemu-storage-daemon` runs the same tests
//! against QEMU's server (same flags, a sparse file instead of a `memory` node) to check
//! the expectations against a reference implementation.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use strata_tests::nbd::*;
use strata_tests::{ChildGuard, Daemon, TempDir};

const SIZE: u64 = 64 << 20;
const EXPORT: &str = "disk";
const DESCRIPTION: &str = "strata-test-disk";
/// The read-only export of the same node, when a test asks for it.
const RO_EXPORT: &str = "ro";
/// The largest request the server accepts (advertised in NBD_INFO_BLOCK_SIZE).
const MAX_BLOCK: u32 = 32 << 20;
/// Where [`still_serving`] writes; tests keep their own data elsewhere.
const SERVING_AREA: u64 = 60 << 20;

/// The daemon under test, with one writable export `disk` of a 64 MiB node.
#[derive(Debug)]
struct Server {
    daemon: Option<Daemon>,
    qsd: Option<(ChildGuard, TempDir)>,
    addr: Addr,
}

impl Server {
    /// On a Unix socket, with `nbd_opts` appended to `--nbd-server`.
    fn start(nbd_opts: &str) -> Server {
        Server::start_with(false, nbd_opts, false)
    }

    /// `inet`: on 127.0.0.1 (any free port) instead of a Unix socket; `read_only`: also
    /// export the node as `ro`, writable=off.
    fn start_with(inet: bool, nbd_opts: &str, read_only: bool) -> Server {
        let qsd = std::env::var("STRATA_NBD_TEST_SERVER").is_ok_and(|v| v.contains("qemu"));
        let dir = TempDir::new("nbd");
        let sock = dir.path("nbd.sock");
        let port = if qsd { free_port() } else { 0 };
        let addr_opts = if inet {
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
        } else {
            format!("addr.type=unix,addr.path={}", sock.display())
        };
        let image = dir.path("disk.img");
        let blockdev = if qsd {
            std::fs::File::create(&image)
                .unwrap()
                .set_len(SIZE)
                .unwrap();
            format!("driver=file,node-name=n0,filename={}", image.display())
        } else {
            format!("driver=memory,node-name=n0,size={SIZE}")
        };
        let mut args = vec![
            "--blockdev".to_string(),
            blockdev,
            "--nbd-server".to_string(),
            format!("{addr_opts}{nbd_opts}"),
            "--export".to_string(),
            format!(
                "type=nbd,id=e0,node-name=n0,name={EXPORT},description={DESCRIPTION},writable=on"
            ),
        ];
        if read_only {
            args.push("--export".to_string());
            args.push(format!(
                "type=nbd,id=e1,node-name=n0,name={RO_EXPORT},writable=off"
            ));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if qsd {
            let child = Command::new("qemu-storage-daemon")
                .args(&args)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn qemu-storage-daemon");
            let addr = if inet {
                Addr::Tcp(format!("127.0.0.1:{port}").parse().unwrap())
            } else {
                Addr::Unix(sock)
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Client::try_connect(&addr).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "qemu-storage-daemon did not listen"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            return Server {
                daemon: None,
                qsd: Some((ChildGuard(Some(child)), dir)),
                addr,
            };
        }
        let daemon = Daemon::start_in(dir, &args);
        let addr = if inet {
            Addr::from_banner(&daemon.banner)
                .unwrap_or_else(|| panic!("no nbd=<addr> in the banner {:?}", daemon.banner))
        } else {
            let from_banner = Addr::from_banner(&daemon.banner);
            assert_eq!(
                from_banner,
                Some(Addr::Unix(sock.clone())),
                "banner {:?}",
                daemon.banner
            );
            Addr::Unix(sock)
        };
        Server {
            daemon: Some(daemon),
            qsd: None,
            addr,
        }
    }

    fn pid(&self) -> u32 {
        match (&self.daemon, &self.qsd) {
            (Some(d), _) => d.pid() as u32,
            (None, Some((c, _))) => c.0.as_ref().expect("running").id(),
            _ => unreachable!(),
        }
    }

    /// Asserts the daemon is still running.
    fn assert_alive(&mut self) {
        let alive = match (&mut self.daemon, &mut self.qsd) {
            (Some(d), _) => d.alive(),
            (None, Some((c, _))) => matches!(c.0.as_mut().map(|c| c.try_wait()), Some(Ok(None))),
            _ => unreachable!(),
        };
        let stderr = self.daemon.as_ref().map(Daemon::stderr).unwrap_or_default();
        assert!(alive, "the NBD server died: {stderr}");
    }

    /// Resident set size in bytes (VmRSS of /proc/PID/status).
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib << 10
    }
}

/// A TCP port nothing listens on right now (for qemu-storage-daemon, which cannot say
/// which port it took).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Bytes that differ with `seed` and along the buffer.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            ((seed.wrapping_mul(0x1000_0000_01b3) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56)
                as u8
        })
        .collect()
}

/// A well-behaved client still completes NBD_OPT_GO and a write + read round trip, and
/// the daemon runs.
fn still_serving(server: &mut Server) {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (mut c, export) = Client::connect_go(&server.addr, EXPORT, n % 2 == 1);
    assert_eq!(export.size, SIZE, "{export:?}");
    assert_eq!(export.flags & FLAG_READ_ONLY, 0, "{export:?}");
    round_trip(&mut c, SERVING_AREA + (n % 256) * 4096, n);
    c.disconnect();
    server.assert_alive();
}

/// Writes 4 KiB at `offset` on `c` and reads them back.
fn round_trip(c: &mut Client, offset: u64, seed: u64) {
    let data = pattern(seed, 4096);
    assert_eq!(c.write(offset, &data), Ok(()), "write at {offset}");
    assert!(
        c.read(offset, 4096) == Ok(data),
        "read at {offset} did not return what was written"
    );
}

/// A connection that has read the greeting and sent fixed-newstyle client flags.
fn negotiating(server: &Server) -> Client {
    let mut c = Client::connect(&server.addr);
    c.handshake();
    c
}

/// Asserts that the server closed `c` without sending anything more.
fn assert_closed_silently(c: &mut Client, what: &str) {
    match c.wait_closed(CLOSE_WAIT) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: the server sent {n} bytes before closing"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The single error reply `c` gets for `option` with `data`.
fn option_error(c: &mut Client, option: u32, data: &[u8]) -> OptReply {
    let r = c.option_final(option, data);
    assert!(
        r.is_error(),
        "option {option}: expected an error, got {r:?}"
    );
    r
}

/// Checks that `r` failed with one of `errors`, in a simple reply, or with structured
/// replies in exactly one NBD_REPLY_TYPE_ERROR chunk with NBD_REPLY_FLAG_DONE; adds what
/// is wrong to `wrong`.
fn check_error(
    wrong: &mut Vec<String>,
    what: &str,
    r: &Completion,
    errors: &[u32],
    structured: bool,
) {
    if !errors.contains(&r.error) {
        wrong.push(format!(
            "{what}: expected error {errors:?}, got {}",
            r.error
        ));
    }
    if r.error != 0 && !r.data.is_empty() {
        wrong.push(format!("{what}: data with an error"));
    }
    let kinds: Vec<(u16, u16)> = r.chunks.iter().map(|h| (h.kind, h.flags)).collect();
    if structured && kinds != [(REPLY_TYPE_ERROR, REPLY_FLAG_DONE)] {
        wrong.push(format!(
            "{what}: expected one NBD_REPLY_TYPE_ERROR chunk with DONE, got {} (type, flags) \
             {kinds:?}",
            if r.simple { "a simple reply" } else { "chunks" }
        ));
    }
    if !structured && !r.simple {
        wrong.push(format!("{what}: not a simple reply"));
    }
}

#[test]
fn garbage_client_flags_or_option_magic_close_the_connection() {
    // Over TCP: the Unix socket is what every other test uses.
    let mut server = Server::start_with(true, "", false);
    // A bad peer that speaks another protocol: "GET " as client flags has unknown bits.
    let mut c = Client::connect(&server.addr);
    c.read_greeting();
    let _ = c.try_send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_closed_silently(&mut c, "HTTP request as client flags");
    still_serving(&mut server);
    // Four bytes of garbage where the client flags go.
    let mut c = Client::connect(&server.addr);
    c.read_greeting();
    let _ = c.try_send(&0xdead_beefu32.to_be_bytes());
    assert_closed_silently(&mut c, "garbage client flags");
    still_serving(&mut server);
    // Good flags, then an option whose magic is not IHAVEOPT.
    let mut c = negotiating(&server);
    let mut bad = Client::option_header(OPT_GO, 0);
    bad[..8].copy_from_slice(b"IHAVEOPX");
    let _ = c.try_send(&bad);
    assert_closed_silently(&mut c, "option with a wrong magic");
    still_serving(&mut server);
    // The magic of a request where an option is expected.
    let mut c = negotiating(&server);
    let req = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 512,
    };
    let _ = c.try_send(&req.bytes());
    assert_closed_silently(&mut c, "a request during the handshake");
    still_serving(&mut server);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut server = Server::start("");
    for flags in [
        FLAG_C_FIXED_NEWSTYLE | 1 << 2,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 31,
        1 << 7,
    ] {
        let mut c = Client::connect(&server.addr);
        c.read_greeting();
        c.send_client_flags(flags);
        assert_closed_silently(&mut c, &format!("client flags {flags:#x}"));
        still_serving(&mut server);
    }
}

#[test]
fn unknown_options_get_unsup_and_the_handshake_goes_on() {
    let mut server = Server::start("");
    let mut c = negotiating(&server);
    for (option, data) in [
        (0x4242u32, &b"some option data"[..]),
        (0x7fff_ffff, &[][..]),
        (OPT_PEEK_EXPORT, &[][..]),
    ] {
        let r = option_error(&mut c, option, data);
        assert_eq!(
            r.kind,
            REP_ERR_UNSUP,
            "option {option:#x}: {r:?} {}",
            r.text()
        );
    }
    // No TLS: NBD_OPT_STARTTLS MUST get NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP.
    let r = option_error(&mut c, OPT_STARTTLS, &[]);
    assert!(
        r.kind == REP_ERR_UNSUP || r.kind == REP_ERR_POLICY,
        "NBD_OPT_STARTTLS without TLS: {r:?}"
    );
    let export = c.go(EXPORT, &[]).expect("NBD_OPT_GO after unknown options");
    assert_eq!(export.size, SIZE);
    round_trip(&mut c, 0, 1);
    c.disconnect();
    still_serving(&mut server);
}

#[test]
fn oversized_option_length_gets_too_big_or_a_disconnect() {
    let mut server = Server::start("");
    for option in [OPT_GO, OPT_LIST_META_CONTEXT, 0x4242] {
        let mut c = negotiating(&server);
        // Announce 2 GiB of option data and send none of it.
        c.send(&Client::option_header(option, 0x7fff_ffff));
        match c.try_recv_option_reply() {
            Ok(r) => {
                assert_eq!(r.option, option, "{r:?}");
                assert_eq!(
                    r.kind,
                    REP_ERR_TOO_BIG,
                    "option {option:#x} of 2 GiB: {r:?} {}",
                    r.text()
                );
                // Its data was never read: the server cannot go on with this client.
                c.wait_closed(CLOSE_WAIT)
                    .unwrap_or_else(|e| panic!("after NBD_REP_ERR_TOO_BIG: {e}"));
            }
            Err(e) => assert!(
                is_disconnect(&e),
                "option {option:#x} of 2 GiB: neither NBD_REP_ERR_TOO_BIG nor a \
                 disconnect: {e}"
            ),
        }
        still_serving(&mut server);
    }
}

#[test]
fn unknown_exports_and_inconsistent_go_lengths() {
    let mut server = Server::start("");
    let mut c = negotiating(&server);
    for option in [OPT_GO, OPT_INFO] {
        let replies = c.option(option, &go_data("nonesuch", &[INFO_BLOCK_SIZE]));
        assert_eq!(
            replies.len(),
            1,
            "no NBD_REP_INFO for an unknown export: {replies:?}"
        );
        assert_eq!(
            replies[0].kind, REP_ERR_UNKNOWN,
            "option {option}: {replies:?}"
        );
    }
    // Lengths inside the option data that contradict the option length.
    let mut name_too_long = go_data(EXPORT, &[]);
    name_too_long[..4].copy_from_slice(&1000u32.to_be_bytes());
    let mut too_many_infos = go_data(EXPORT, &[INFO_EXPORT]);
    let n = too_many_infos.len();
    too_many_infos[n - 4..n - 2].copy_from_slice(&3u16.to_be_bytes());
    let mut trailing = go_data(EXPORT, &[]);
    trailing.extend_from_slice(b"xyz");
    let cases: [(&str, Vec<u8>); 5] = [
        ("name length past the data", name_too_long),
        ("more info requests than sent", too_many_infos),
        ("bytes after the info requests", trailing),
        ("shorter than a name length", vec![0, 0]),
        ("no info request count", b"\0\0\0\x04disk".to_vec()),
    ];
    for option in [OPT_GO, OPT_INFO] {
        for (what, data) in &cases {
            let r = option_error(&mut c, option, data);
            assert_eq!(
                r.kind,
                REP_ERR_INVALID,
                "option {option}, {what}: {r:?} {}",
                r.text()
            );
        }
    }
    // The connection is still negotiating: INFO then GO on the real export work.
    let info = c.info(EXPORT, &[]).expect("NBD_OPT_INFO disk");
    let export = c.go(EXPORT, &[]).expect("NBD_OPT_GO disk");
    assert_eq!(info.size, SIZE);
    assert_eq!(
        (info.size, info.flags),
        (export.size, export.flags),
        "INFO then GO with the same parameters MUST give the same information"
    );
    round_trip(&mut c, 4096, 2);
    c.disconnect();
    still_serving(&mut server);
    // NBD_OPT_EXPORT_NAME cannot fail with an error: the server MUST close.
    let mut c = negotiating(&server);
    c.send_option(OPT_EXPORT_NAME, b"nonesuch");
    assert_closed_silently(&mut c, "NBD_OPT_EXPORT_NAME of an unknown export");
    still_serving(&mut server);
    // The same option on the real export enters the transmission phase.
    let mut c = negotiating(&server);
    let export = c.export_name(EXPORT).expect("NBD_OPT_EXPORT_NAME disk");
    assert_eq!(export.size, SIZE);
    assert!(export.flags & FLAG_HAS_FLAGS != 0, "{export:?}");
    round_trip(&mut c, 8192, 3);
    c.disconnect();
    // Without NBD_FLAG_C_NO_ZEROES the reply carries the 124 zeroes.
    let mut c = Client::connect(&server.addr);
    c.read_greeting();
    c.send_client_flags(FLAG_C_FIXED_NEWSTYLE);
    let export = c
        .export_name(EXPORT)
        .expect("NBD_OPT_EXPORT_NAME with zeroes");
    assert_eq!(export.size, SIZE);
    round_trip(&mut c, 8192, 3);
    c.disconnect();
    still_serving(&mut server);
}

#[test]
fn list_names_the_export_and_abort_is_acknowledged() {
    let mut server = Server::start("");
    let mut c = negotiating(&server);
    let replies = c.option(OPT_LIST, &[]);
    let (last, entries) = replies.split_last().unwrap();
    assert_eq!(last.kind, REP_ACK, "{replies:?}");
    let entries: Vec<(String, String)> = entries.iter().map(server_entry).collect();
    assert_eq!(
        entries,
        vec![(EXPORT.to_string(), DESCRIPTION.to_string())],
        "NBD_OPT_LIST"
    );
    // NBD_OPT_INFO reports the description too when asked for it.
    let info = c
        .info(EXPORT, &[INFO_DESCRIPTION, INFO_NAME])
        .expect("NBD_OPT_INFO");
    assert_eq!(info.description.as_deref(), Some(DESCRIPTION), "{info:?}");
    let r = c.option_final(OPT_ABORT, &[]);
    assert_eq!(r.kind, REP_ACK, "NBD_OPT_ABORT: {r:?}");
    assert_closed_silently(&mut c, "after NBD_OPT_ABORT");
    still_serving(&mut server);
    // Data with NBD_OPT_ABORT SHOULD be ignored; a client that aborts and closes without
    // waiting for the reply is fine.
    let mut c = negotiating(&server);
    let r = c.option_final(OPT_ABORT, b"bye");
    assert_eq!(r.kind, REP_ACK, "NBD_OPT_ABORT with data: {r:?}");
    assert_closed_silently(&mut c, "after NBD_OPT_ABORT with data");
    let mut c = negotiating(&server);
    c.send_option(OPT_ABORT, &[]);
    drop(c);
    still_serving(&mut server);
}

#[test]
fn meta_contexts_need_structured_replies_and_unknown_ones_are_skipped() {
    let mut server = Server::start("");
    let mut c = negotiating(&server);
    let query = meta_context_data(EXPORT, &["base:allocation"]);
    let r = option_error(&mut c, OPT_SET_META_CONTEXT, &query);
    assert_eq!(
        r.kind,
        REP_ERR_INVALID,
        "SET_META_CONTEXT first: {r:?} {}",
        r.text()
    );
    c.structured_reply();
    // A query length past the option data MUST get NBD_REP_ERR_INVALID.
    let mut past_the_end = meta_context_data(EXPORT, &["base:allocation"]);
    let n = past_the_end.len();
    past_the_end[n - 19..n - 15].copy_from_slice(&100u32.to_be_bytes());
    let mut short_count = meta_context_data(EXPORT, &["base:allocation"]);
    short_count[8..12].copy_from_slice(&2u32.to_be_bytes());
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        for (what, data) in [
            ("query length past the data", &past_the_end),
            ("more queries than sent", &short_count),
        ] {
            let r = option_error(&mut c, option, data);
            assert_eq!(
                r.kind,
                REP_ERR_INVALID,
                "option {option}, {what}: {r:?} {}",
                r.text()
            );
        }
    }
    let replies = c.option(
        OPT_SET_META_CONTEXT,
        &meta_context_data(
            EXPORT,
            &[
                "x-nonesuch:thing",
                "base:allocation",
                "base:nonesuch",
                "base:",
            ],
        ),
    );
    assert_eq!(replies.len(), 2, "one context, then ACK: {replies:?}");
    assert_eq!(replies[1].kind, REP_ACK, "{replies:?}");
    let (id, name) = meta_context(&replies[0]);
    assert_eq!(name, "base:allocation");
    // Listing with no query gives every context, base:allocation among them.
    let listed = c.option(OPT_LIST_META_CONTEXT, &meta_context_data(EXPORT, &[]));
    let (last, contexts) = listed.split_last().unwrap();
    assert_eq!(last.kind, REP_ACK, "{listed:?}");
    assert!(
        contexts
            .iter()
            .any(|r| meta_context(r).1 == "base:allocation"),
        "{listed:?}"
    );
    // An unknown namespace alone selects nothing, without an error.
    let listed = c.option(
        OPT_LIST_META_CONTEXT,
        &meta_context_data(EXPORT, &["x-nonesuch:"]),
    );
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].kind, REP_ACK, "{listed:?}");
    // Select base:allocation again (the last SET counts), then use it.
    let replies = c.option(
        OPT_SET_META_CONTEXT,
        &meta_context_data(EXPORT, &["base:allocation"]),
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
    let (id2, _) = meta_context(&replies[0]);
    let _ = id;
    c.go(EXPORT, &[]).expect("NBD_OPT_GO");
    round_trip(&mut c, 0, 4);
    let st = c.call(CMD_BLOCK_STATUS, 0, 0, 1 << 20, &[]);
    assert_eq!(st.result(), Ok(()), "{st:?}");
    assert_eq!(st.extents.len(), 1, "one chunk per context: {st:?}");
    assert_eq!(st.extents[0].0, id2, "the id SET_META_CONTEXT gave: {st:?}");
    assert_eq!(
        st.last_chunk().map(|h| h.flags & REPLY_FLAG_DONE),
        Some(REPLY_FLAG_DONE),
        "{st:?}"
    );
    c.disconnect();
    still_serving(&mut server);
}

#[test]
fn bad_requests_get_their_errors_and_the_connection_goes_on() {
    let mut server = Server::start_with(false, "", true);
    // Every wrong outcome, reported together at the end.
    let mut wrong = Vec::new();
    for structured in [false, true] {
        let (mut c, export) = Client::connect_go(&server.addr, EXPORT, structured);
        let (min, preferred, max) = export.block_size.expect("NBD_INFO_BLOCK_SIZE");
        assert_eq!(max, MAX_BLOCK, "{export:?}");
        assert!(min.is_power_of_two() && min <= 1 << 16, "{export:?}");
        assert!(
            preferred.is_power_of_two() && preferred >= min.max(512),
            "{export:?}"
        );
        let kind = if structured { "structured" } else { "simple" };
        // (what, command, offset, length, accepted errors); writes carry their payload.
        let mut cases: Vec<(&str, u16, u64, u32, &[u32])> = vec![
            (
                "read across the end",
                CMD_READ,
                SIZE - 4096,
                8192,
                &[EINVAL],
            ),
            ("read at the end", CMD_READ, SIZE, 512, &[EINVAL]),
            (
                "read past the end",
                CMD_READ,
                SIZE + (1 << 20),
                512,
                &[EINVAL],
            ),
            (
                "write across the end",
                CMD_WRITE,
                SIZE - 512,
                1024,
                &[ENOSPC],
            ),
            (
                "read wrapping 2^64",
                CMD_READ,
                u64::MAX - 511,
                1024,
                &[EINVAL],
            ),
            (
                "read over the maximum block size",
                CMD_READ,
                0,
                MAX_BLOCK + 512,
                if structured {
                    &[EINVAL, EOVERFLOW]
                } else {
                    &[EINVAL]
                },
            ),
            ("unknown command 42", 42, 0, 512, &[EINVAL]),
        ];
        if export.flags & FLAG_SEND_TRIM != 0 {
            cases.push((
                "trim across the end",
                CMD_TRIM,
                SIZE - 4096,
                8192,
                &[EINVAL],
            ));
        }
        if export.flags & FLAG_SEND_WRITE_ZEROES != 0 {
            cases.push((
                "write zeroes across the end",
                CMD_WRITE_ZEROES,
                SIZE - 4096,
                8192,
                &[ENOSPC],
            ));
        }
        for (what, cmd, offset, len, errors) in cases {
            let payload = if cmd == CMD_WRITE {
                pattern(5, len as usize)
            } else {
                vec![]
            };
            let r = c.call(cmd, 0, offset, len, &payload);
            check_error(
                &mut wrong,
                &format!("{kind}: {what}"),
                &r,
                errors,
                structured,
            );
            // The next request on the same connection works (a failed write's payload
            // was consumed).
            round_trip(&mut c, 12288, 6);
        }
        c.disconnect();
        still_serving(&mut server);

        // Writes to a read-only export fail with EPERM; the connection goes on.
        let (mut c, export) = Client::connect_go(&server.addr, RO_EXPORT, structured);
        assert!(export.flags & FLAG_READ_ONLY != 0, "{export:?}");
        let r = c.call(CMD_WRITE, 0, 0, 4096, &pattern(7, 4096));
        let what = format!("{kind}: write to a read-only export");
        check_error(&mut wrong, &what, &r, &[EPERM], structured);
        for (flag, cmd, name) in [
            (FLAG_SEND_TRIM, CMD_TRIM, "trim"),
            (FLAG_SEND_WRITE_ZEROES, CMD_WRITE_ZEROES, "write zeroes"),
        ] {
            if export.flags & flag != 0 {
                let r = c.call(cmd, 0, 0, 4096, &[]);
                let what = format!("{kind}: {name} on a read-only export");
                check_error(&mut wrong, &what, &r, &[EPERM], structured);
            }
        }
        assert!(c.read(0, 4096).is_ok(), "{kind}: read after EPERM");
        c.disconnect();
        still_serving(&mut server);
    }
    assert!(wrong.is_empty(), "wrong outcomes:\n{}", wrong.join("\n"));

    // A request with a bad magic: the stream cannot be trusted any more.
    let (mut c, _) = Client::connect_go(&server.addr, EXPORT, false);
    let req = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 7,
        offset: 0,
        len: 512,
    };
    let _ = c.try_send(&request_bytes(0x2560_9514, &req));
    assert_closed_silently(&mut c, "a request with a bad magic");
    still_serving(&mut server);

    // A write over the maximum block size: its payload is not read, so the server must
    // disconnect (an error reply first is allowed).
    for structured in [false, true] {
        let (mut c, _) = Client::connect_go(&server.addr, EXPORT, structured);
        let req = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 8,
            offset: 0,
            len: MAX_BLOCK + 512,
        };
        let _ = c.try_send(&req.bytes());
        let _ = c.try_send(&pattern(8, 4096));
        c.wait_closed(CLOSE_WAIT)
            .unwrap_or_else(|e| panic!("write over the maximum block size: {e}"));
        still_serving(&mut server);
    }
}

#[test]
fn a_client_that_leaves_mid_request_does_not_hurt_the_data() {
    let mut server = Server::start("");
    let (mut a, _) = Client::connect_go(&server.addr, EXPORT, false);
    let data = pattern(9, 1 << 20);
    assert_eq!(a.write(1 << 20, &data), Ok(()), "write by the good client");

    // A write header and half its payload over the same range, then gone: a request
    // never received whole is never executed.
    let (mut b, _) = Client::connect_go(&server.addr, EXPORT, false);
    let req = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 1 << 20,
        len: 1 << 20,
    };
    b.send(&req.bytes());
    b.send(&pattern(10, 1 << 19));
    drop(b);
    // Half an option, then gone.
    let mut b = negotiating(&server);
    b.send(&Client::option_header(OPT_GO, 100));
    b.send(b"\0\0\0");
    drop(b);
    // Half a request header, then gone.
    let (mut b, _) = Client::connect_go(&server.addr, EXPORT, true);
    b.send(&req.bytes()[..13]);
    drop(b);
    // Big reads in flight, then gone before their replies: the server's sends fail.
    for structured in [false, true] {
        let (mut b, _) = Client::connect_go(&server.addr, EXPORT, structured);
        for i in 0..8 {
            let req = Request {
                flags: 0,
                kind: CMD_READ,
                cookie: i,
                offset: i << 20,
                len: 4 << 20,
            };
            b.send_request(req, &[]);
        }
        drop(b);
    }

    still_serving(&mut server);
    assert!(
        a.read(1 << 20, 1 << 20) == Ok(data.clone()),
        "the good client's data changed"
    );
    let (mut c, _) = Client::connect_go(&server.addr, EXPORT, true);
    assert!(
        c.read(1 << 20, 1 << 20) == Ok(data),
        "the good client's data changed (read on a new connection)"
    );
    c.disconnect();
    a.disconnect();
    server.assert_alive();
}

#[test]
fn a_client_that_never_reads_replies_does_not_grow_the_daemon() {
    let mut server = Server::start("");
    let (mut bad, _) = Client::connect_go(&server.addr, EXPORT, false);
    bad.set_timeout(Duration::from_secs(2));
    let mut requests = Vec::new();
    for i in 0..2000u64 {
        let req = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: i,
            offset: (i % 63) << 20,
            len: 1 << 20,
        };
        requests.extend_from_slice(&req.bytes());
    }
    // The server may stop reading requests once enough are in flight: a send that
    // times out is that backpressure, not a failure.
    let _ = bad.try_send(&requests);

    // Meanwhile another client works normally, and the daemon's memory stays bounded
    // (2000 MiB of replies are owed to the bad client).
    let (mut good, _) = Client::connect_go(&server.addr, EXPORT, true);
    let mut peak = server.rss();
    for i in 0..40 {
        round_trip(&mut good, SERVING_AREA - (1 << 20) + i * 4096, 100 + i);
        peak = peak.max(server.rss());
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!("peak VmRSS {} MiB", peak >> 20);
    assert!(
        peak < 1 << 30,
        "VmRSS reached {} MiB with a client that reads no replies",
        peak >> 20
    );
    good.disconnect();
    still_serving(&mut server);
    drop(bad);
    still_serving(&mut server);
    assert!(server.rss() < 1 << 30, "VmRSS {} MiB", server.rss() >> 20);
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_limit_and_blocks_nobody() {
    let mut server = Server::start(",handshake-max-seconds=1");
    // A client already in the transmission phase is not subject to the limit.
    let (mut idle_good, _) = Client::connect_go(&server.addr, EXPORT, false);
    // One says nothing at all; one stops after its client flags.
    let mut mute = Client::connect(&server.addr);
    let mut stalled = negotiating(&server);
    still_serving(&mut server);
    for (c, what) in [
        (&mut mute, "a client that sends nothing"),
        (&mut stalled, "a client stalled in the handshake"),
    ] {
        let n = c
            .wait_closed(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: not dropped within 10 s: {e}"));
        assert!(n <= 18, "{what}: {n} bytes besides the greeting");
    }
    round_trip(&mut idle_good, 16384, 11);
    idle_good.disconnect();
    still_serving(&mut server);
}

#[test]
fn max_connections_refuses_the_third_client() {
    let mut server = Server::start(",max-connections=2");
    let (mut a, _) = Client::connect_go(&server.addr, EXPORT, false);
    let (mut b, _) = Client::connect_go(&server.addr, EXPORT, true);
    // Accepted and closed (EOF or reset, a greeting first does not matter), or refused
    // outright.
    if let Ok(mut c) = Client::try_connect(&server.addr) {
        c.wait_closed(CLOSE_WAIT)
            .unwrap_or_else(|e| panic!("third connection with max-connections=2: {e}"));
    }
    round_trip(&mut a, 0, 12);
    round_trip(&mut b, 4096, 13);
    // Once one leaves, a new client gets its place (the server may notice the close a
    // moment later).
    a.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        let mut c = Client::connect(&server.addr);
        if c.try_recv_exact(18).is_ok() {
            c.send_client_flags(FLAG_C_FIXED_NEWSTYLE);
            break c;
        }
        assert!(Instant::now() < deadline, "no place freed by a disconnect");
        std::thread::sleep(Duration::from_millis(20));
    };
    c.go(EXPORT, &[]).expect("NBD_OPT_GO in the freed place");
    round_trip(&mut c, 8192, 14);
    c.disconnect();
    b.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Client::connect(&server.addr).try_recv_exact(18).is_err() {
        assert!(
            Instant::now() < deadline,
            "no place freed by two disconnects"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    still_serving(&mut server);
}

#[test]
fn disc_with_requests_in_flight_answers_them_first() {
    let mut server = Server::start("");
    for structured in [false, true] {
        let (mut c, _) = Client::connect_go(&server.addr, EXPORT, structured);
        let data = pattern(15, 4 << 20);
        for i in 0..4u64 {
            let at = (i << 20) as usize;
            assert_eq!(c.write(i << 20, &data[at..at + (1 << 20)]), Ok(()));
        }
        // 32 reads, a write and a flush, then NBD_CMD_DISC, all in one send.
        let mut wire = Vec::new();
        let mut expected = HashMap::new();
        for i in 0..32u64 {
            let req = Request {
                flags: 0,
                kind: CMD_READ,
                cookie: 1000 + i,
                offset: i * (128 << 10),
                len: 128 << 10,
            };
            c.track(req);
            wire.extend_from_slice(&req.bytes());
            expected.insert(req.cookie, req);
        }
        let written = pattern(16, 64 << 10);
        let write = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 2000,
            offset: 8 << 20,
            len: 64 << 10,
        };
        let flush = Request {
            flags: 0,
            kind: CMD_FLUSH,
            cookie: 2001,
            offset: 0,
            len: 0,
        };
        let disc = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: 2002,
            offset: 0,
            len: 0,
        };
        for (req, payload) in [(write, &written[..]), (flush, &[][..])] {
            c.track(req);
            wire.extend_from_slice(&req.bytes());
            wire.extend_from_slice(payload);
            expected.insert(req.cookie, req);
        }
        wire.extend_from_slice(&disc.bytes());
        c.send(&wire);
        while c.in_flight() > 0 {
            let r = c.try_recv().unwrap_or_else(|e| {
                panic!(
                    "structured={structured}: {} replies missing after NBD_CMD_DISC: {e}",
                    c.in_flight()
                )
            });
            assert_eq!(r.result(), Ok(()), "{r:?}");
            expected.remove(&r.cookie());
            if r.request.kind == CMD_READ {
                let at = r.request.offset as usize;
                assert!(
                    r.data == data[at..at + r.request.len as usize],
                    "read at {at}: wrong data"
                );
            }
        }
        assert!(expected.is_empty());
        assert_closed_silently(
            &mut c,
            "after the replies to the requests before NBD_CMD_DISC",
        );
        let (mut c, _) = Client::connect_go(&server.addr, EXPORT, false);
        assert!(
            c.read(8 << 20, 64 << 10) == Ok(written),
            "the write sent before NBD_CMD_DISC was not done"
        );
        c.disconnect();
        still_serving(&mut server);
    }
}

#[test]
fn replies_in_any_order_match_their_requests_by_cookie() {
    let mut server = Server::start("");
    let base = pattern(17, 8 << 20);
    {
        let (mut c, _) = Client::connect_go(&server.addr, EXPORT, false);
        for i in 0..8usize {
            assert_eq!(
                c.write((i << 20) as u64, &base[i << 20..(i + 1) << 20]),
                Ok(())
            );
        }
        c.disconnect();
    }
    for structured in [false, true] {
        let (mut c, _) = Client::connect_go(&server.addr, EXPORT, structured);
        // Reads of mixed sizes over the prepared 8 MiB, writes to separate slots from
        // 16 MiB, and flushes; cookies that are neither sequential nor small.
        let mut wire = Vec::new();
        let mut writes = HashMap::new();
        let mut order = Vec::new();
        for i in 0..160u64 {
            let cookie = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(structured);
            let req = match i % 5 {
                0..=2 => {
                    let len = [4096u32, 65536, 2 << 20, 512, 1 << 20][(i % 5 + i / 5) as usize % 5];
                    let offset = (i * 40960) % ((8 << 20) - u64::from(len));
                    Request {
                        flags: 0,
                        kind: CMD_READ,
                        cookie,
                        offset,
                        len,
                    }
                }
                3 => {
                    let req = Request {
                        flags: 0,
                        kind: CMD_WRITE,
                        cookie,
                        offset: (16 << 20) + i * (64 << 10),
                        len: 64 << 10,
                    };
                    writes.insert(cookie, pattern(cookie, 64 << 10));
                    req
                }
                _ => Request {
                    flags: 0,
                    kind: CMD_FLUSH,
                    cookie,
                    offset: 0,
                    len: 0,
                },
            };
            c.track(req);
            wire.extend_from_slice(&req.bytes());
            if let Some(p) = writes.get(&cookie) {
                wire.extend_from_slice(p);
            }
            order.push(cookie);
        }
        // Send from another thread: the server may apply backpressure until replies
        // are read.
        let mut w = c.writer();
        let sender = std::thread::spawn(move || w.write_all(&wire));
        let mut seen = HashSet::new();
        let mut replies = Vec::new();
        while c.in_flight() > 0 {
            let r = c.recv();
            assert!(
                seen.insert(r.cookie()),
                "two replies for cookie {:#x}",
                r.cookie()
            );
            assert_eq!(r.result(), Ok(()), "{r:?}");
            if r.request.kind == CMD_READ {
                let at = r.request.offset as usize;
                assert!(
                    r.data == base[at..at + r.request.len as usize],
                    "read {:?}: wrong data",
                    r.request
                );
            }
            replies.push(r.cookie());
        }
        sender.join().unwrap().expect("send the requests");
        assert_eq!(seen.len(), order.len());
        eprintln!(
            "structured={structured}: replies {} the order of the requests",
            if replies == order {
                "kept"
            } else {
                "did not keep"
            }
        );
        // Every write landed where its request said.
        for (cookie, data) in &writes {
            let i = order.iter().position(|c| c == cookie).unwrap() as u64;
            assert!(
                c.read((16 << 20) + i * (64 << 10), 64 << 10) == Ok(data.clone()),
                "write {i} did not land"
            );
        }
        c.disconnect();
        still_serving(&mut server);
    }
}

/// SHOULD rules of the spec beyond the cases above: options carrying data they must not
/// carry, block status without a metadata context, command flags a command does not
/// take, and zero-length requests (which SHOULD NOT disconnect).
#[test]
fn other_malformed_options_and_requests_fail_cleanly() {
    let mut server = Server::start("");
    let mut wrong = Vec::new();
    let mut c = negotiating(&server);
    for (option, what) in [
        (OPT_LIST, "NBD_OPT_LIST with data"),
        (OPT_STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY with data"),
    ] {
        let r = c.option_final(option, b"junk");
        if r.kind != REP_ERR_INVALID {
            wrong.push(format!(
                "{what}: expected NBD_REP_ERR_INVALID, got {:#x}",
                r.kind
            ));
        }
    }
    // Strings MUST be no longer than 4096 bytes: a longer export name is an error (which
    // one is not said), and the haggling goes on.
    let r = option_error(&mut c, OPT_GO, &go_data(&"n".repeat(5000), &[]));
    if ![REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN].contains(&r.kind) {
        wrong.push(format!(
            "NBD_OPT_GO with a 5000-byte name: got {:#x}",
            r.kind
        ));
    }
    c.structured_reply();
    c.go(EXPORT, &[]).expect("NBD_OPT_GO");
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]);
    check_error(
        &mut wrong,
        "block status without a metadata context",
        &r,
        &[EINVAL],
        true,
    );
    for (what, cmd, flags) in [
        ("read with an unknown flag", CMD_READ, 1 << 15),
        ("read with NBD_CMD_FLAG_REQ_ONE", CMD_READ, CMD_FLAG_REQ_ONE),
        ("write with an unknown flag", CMD_WRITE, 1 << 12),
    ] {
        let payload = if cmd == CMD_WRITE {
            pattern(20, 4096)
        } else {
            vec![]
        };
        let r = c.call(cmd, flags, 0, 4096, &payload);
        check_error(&mut wrong, what, &r, &[EINVAL], true);
        round_trip(&mut c, 0, 21);
    }
    for (what, cmd) in [
        ("zero-length read", CMD_READ),
        ("zero-length write", CMD_WRITE),
        ("zero-length flush", CMD_FLUSH),
    ] {
        match c.try_send_request(
            Request {
                flags: 0,
                kind: cmd,
                cookie: 0x4000 + u64::from(cmd),
                offset: 4096,
                len: 0,
            },
            &[],
        ) {
            Ok(()) => {
                if let Err(e) = c.try_recv() {
                    panic!("{what}: the server SHOULD NOT disconnect: {e}");
                }
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    round_trip(&mut c, 0, 22);
    c.disconnect();
    assert!(wrong.is_empty(), "wrong outcomes:\n{}", wrong.join("\n"));
    still_serving(&mut server);
}
