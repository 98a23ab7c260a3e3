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
//! The server is `strata_tests::nbd::Server`: `STRATA_NBD_SERVER=qemu-storage-daemon` runs
//! the same tests against QEMU's server, to check the expectations against a reference
//! implementation.
//!
//! - `handshake`: client flags, options, exports, metadata contexts.
//! - `requests`: bad requests, NBD_CMD_DISC with requests in flight, replies out of order.
//! - `connections`: clients that leave, stall, never read, or come one too many.

mod connections;
mod handshake;
mod requests;

use std::sync::atomic::{AtomicU64, Ordering};
use strata_tests::nbd::*;

const SIZE: u64 = 64 << 20;
const EXPORT: &str = "disk";
const DESCRIPTION: &str = "strata-test-disk";
/// The read-only export of the same node, when a test asks for it.
const RO_EXPORT: &str = "ro";
/// The largest request the server accepts (advertised in NBD_INFO_BLOCK_SIZE).
const MAX_BLOCK: u32 = 32 << 20;
/// Where [`still_serving`] writes; tests keep their own data elsewhere.
const SERVING_AREA: u64 = 60 << 20;

/// The daemon under test, with one writable export `disk` of a 64 MiB memory node, on a
/// Unix socket, with `nbd_opts` appended to `--nbd-server`.
fn start(nbd_opts: &str) -> Server {
    start_with(Listen::Unix, nbd_opts, &[])
}

/// Like [`start`], listening as `listen` says, with `more` arguments (another export).
fn start_with(listen: Listen, nbd_opts: &str, more: &[&str]) -> Server {
    let node = format!("driver=memory,node-name=n0,size={SIZE}");
    let export =
        format!("type=nbd,id=e0,node-name=n0,name={EXPORT},description={DESCRIPTION},writable=on");
    let mut args = vec!["--blockdev", &node, "--export", &export];
    args.extend_from_slice(more);
    Server::start(Some(listen), nbd_opts, &args)
}

/// The `--export` of the same node as [`RO_EXPORT`], writable=off.
fn ro_export() -> String {
    format!("type=nbd,id=e1,node-name=n0,name={RO_EXPORT},writable=off")
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
    let (mut c, export) = Client::connect_go(server.addr(), EXPORT, n % 2 == 1);
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
    let mut c = Client::connect(server.addr());
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
