//! The transmission phase: requests that break the rules, NBD_CMD_DISC with requests in
//! flight, and replies that come in any order.

use super::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;

#[test]
fn bad_requests_get_their_errors_and_the_connection_goes_on() {
    let mut server = start_with(Listen::Unix, "", &["--export", &ro_export()]);
    // Every wrong outcome, reported together at the end.
    let mut wrong = Vec::new();
    for structured in [false, true] {
        let (mut c, export) = Client::connect_go(server.addr(), EXPORT, structured);
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
        let (mut c, export) = Client::connect_go(server.addr(), RO_EXPORT, structured);
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
    let (mut c, _) = Client::connect_go(server.addr(), EXPORT, false);
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
        let (mut c, _) = Client::connect_go(server.addr(), EXPORT, structured);
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
fn disc_with_requests_in_flight_answers_them_first() {
    let mut server = start("");
    for structured in [false, true] {
        let (mut c, _) = Client::connect_go(server.addr(), EXPORT, structured);
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
        let (mut c, _) = Client::connect_go(server.addr(), EXPORT, false);
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
    let mut server = start("");
    let base = pattern(17, 8 << 20);
    {
        let (mut c, _) = Client::connect_go(server.addr(), EXPORT, false);
        for i in 0..8usize {
            assert_eq!(
                c.write((i << 20) as u64, &base[i << 20..(i + 1) << 20]),
                Ok(())
            );
        }
        c.disconnect();
    }
    for structured in [false, true] {
        let (mut c, _) = Client::connect_go(server.addr(), EXPORT, structured);
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
    let mut server = start("");
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

/// An extended (32-byte) request header.
fn extended(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut b = 0x21e4_1c71u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// An extended reply chunk header: (flags, type, cookie, offset, payload length).
fn extended_reply(c: &mut Client) -> (u16, u16, u64, u64, u64) {
    let r = c.recv_exact(32, "extended reply");
    let u16_at = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
    let u64_at = |i: usize| u64::from_be_bytes(r[i..i + 8].try_into().unwrap());
    assert_eq!(
        &r[0..4],
        &0x6e8a_278cu32.to_be_bytes(),
        "extended reply magic"
    );
    (u16_at(4), u16_at(6), u64_at(8), u64_at(16), u64_at(24))
}

#[test]
fn extended_headers_carry_64_bit_requests_and_replies() {
    let mut server = start("");
    let mut c = Client::connect(server.addr());
    c.handshake();
    let ack = c.option_final(11, &[]);
    assert_eq!(ack.kind, REP_ACK, "NBD_OPT_EXTENDED_HEADERS: {ack:?}");
    // They imply structured replies: asking again for those is refused.
    let again = c.option_final(OPT_STRUCTURED_REPLY, &[]);
    assert!(again.is_error(), "{again:?}");
    c.go(EXPORT, &[]).expect("GO");

    // A write, its payload marked with NBD_CMD_FLAG_PAYLOAD_LEN as the spec asks of
    // extended clients: one extended chunk, DONE, type NONE, echoing cookie and offset.
    let mut msg = extended(1 << 5, CMD_WRITE, 1, 8192, 4096);
    msg.extend_from_slice(&[0x5a; 4096]);
    c.send(&msg);
    assert_eq!(extended_reply(&mut c), (1, 0, 1, 8192, 0));
    // A read: OFFSET_DATA with the offset, then the data.
    c.send(&extended(0, CMD_READ, 2, 8192, 4096));
    assert_eq!(extended_reply(&mut c), (1, 1, 2, 8192, 8 + 4096));
    let payload = c.recv_exact(8 + 4096, "read payload");
    assert_eq!(&payload[..8], &8192u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x5a));
    // A trim whose 64-bit length runs past the end: an error chunk with EINVAL.
    c.send(&extended(0, CMD_TRIM, 3, 0, 1 << 40));
    let (flags, kind, cookie, offset, len) = extended_reply(&mut c);
    assert_eq!((flags, kind, cookie, offset), (1, 0x8001, 3, 0));
    let err = c.recv_exact(len as usize, "error payload");
    assert_eq!(&err[0..4], &EINVAL.to_be_bytes());
    // A compact header no longer frames a request: the connection ends.
    let compact = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 4,
        offset: 0,
        len: 512,
    };
    // (Padded to 32 bytes: the server reads a whole extended header before it can see
    // the wrong magic.)
    let mut bytes = compact.bytes().to_vec();
    bytes.extend_from_slice(&[0; 4]);
    c.send(&bytes);
    c.wait_closed(CLOSE_WAIT)
        .expect("a compact header on an extended connection closes it");
    still_serving(&mut server);
}
