//! Connections that misbehave as a whole: clients that leave mid-request, never read
//! their replies, say nothing, or come one too many.

use super::*;
use std::time::{Duration, Instant};

#[test]
fn a_client_that_leaves_mid_request_does_not_hurt_the_data() {
    let mut server = start("");
    let (mut a, _) = Client::connect_go(server.addr(), EXPORT, false);
    let data = pattern(9, 1 << 20);
    assert_eq!(a.write(1 << 20, &data), Ok(()), "write by the good client");

    // A write header and half its payload over the same range, then gone: a request
    // never received whole is never executed.
    let (mut b, _) = Client::connect_go(server.addr(), EXPORT, false);
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
    let (mut b, _) = Client::connect_go(server.addr(), EXPORT, true);
    b.send(&req.bytes()[..13]);
    drop(b);
    // Big reads in flight, then gone before their replies: the server's sends fail.
    for structured in [false, true] {
        let (mut b, _) = Client::connect_go(server.addr(), EXPORT, structured);
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
    let (mut c, _) = Client::connect_go(server.addr(), EXPORT, true);
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
    let mut server = start("");
    let (mut bad, _) = Client::connect_go(server.addr(), EXPORT, false);
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
    let (mut good, _) = Client::connect_go(server.addr(), EXPORT, true);
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
fn a_flood_of_small_requests_whose_replies_are_never_read_stays_bounded() {
    // Replies without data (errors here) are cheap each, but half a million of them
    // owed to a client that reads none must not pile up in the daemon.
    let mut server = start("");
    let (mut bad, _) = Client::connect_go(server.addr(), EXPORT, false);
    bad.set_timeout(Duration::from_secs(2));
    let before = server.rss();
    let mut requests = Vec::new();
    for i in 0..500_000u64 {
        let req = Request {
            flags: 0,
            kind: 42,
            cookie: i,
            offset: 0,
            len: 4096,
        };
        requests.extend_from_slice(&req.bytes());
    }
    // Backpressure shows as a send that cannot finish.
    let _ = bad.try_send(&requests);
    let (mut good, _) = Client::connect_go(server.addr(), EXPORT, true);
    round_trip(&mut good, SERVING_AREA - 4096, 7);
    let grown = server.rss().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "VmRSS grew by {} MiB for a client that reads no replies",
        grown >> 20
    );
    good.disconnect();
    drop(bad);
    still_serving(&mut server);
}

#[test]
fn an_export_with_idle_clients_sleeps() {
    // Idle means idle: connected clients that send nothing cost no CPU (two reactors,
    // so the connections land on both, plus the accept loop on reactor 0).
    let mut server = start_with(Listen::Unix, "", &["-m", "[0,1]", "--no-pin"]);
    let clients: Vec<Client> = (0..4)
        .map(|_| Client::connect_go(server.addr(), EXPORT, true).0)
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = strata_tests::cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = strata_tests::cpu_ticks(server.pid()) - before;
    // Clock ticks are 10 ms: a spinning reactor would burn about 200 of them.
    assert!(used <= 10, "an idle NBD server used {used} ticks in 2 s");
    drop(clients);
    still_serving(&mut server);
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_limit_and_blocks_nobody() {
    let mut server = start(",handshake-max-seconds=1");
    // A client already in the transmission phase is not subject to the limit.
    let (mut idle_good, _) = Client::connect_go(server.addr(), EXPORT, false);
    // One says nothing at all; one stops after its client flags.
    let mut mute = Client::connect(server.addr());
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
    let mut server = start(",max-connections=2");
    let (mut a, _) = Client::connect_go(server.addr(), EXPORT, false);
    let (mut b, _) = Client::connect_go(server.addr(), EXPORT, true);
    // Accepted and closed (EOF or reset, a greeting first does not matter), or refused
    // outright.
    if let Ok(mut c) = Client::try_connect(server.addr()) {
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
        let mut c = Client::connect(server.addr());
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
    while Client::connect(server.addr()).try_recv_exact(18).is_err() {
        assert!(
            Instant::now() < deadline,
            "no place freed by two disconnects"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    still_serving(&mut server);
}
