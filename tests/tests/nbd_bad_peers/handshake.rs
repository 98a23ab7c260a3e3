//! The handshake: client flags, options, export names and metadata contexts.

use super::*;

#[test]
fn garbage_client_flags_or_option_magic_close_the_connection() {
    // Over TCP: the Unix socket is what every other test uses.
    let mut server = start_with(Listen::Tcp, "", &[]);
    // A bad peer that speaks another protocol: "GET " as client flags has unknown bits.
    let mut c = Client::connect(server.addr());
    c.read_greeting();
    let _ = c.try_send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_closed_silently(&mut c, "HTTP request as client flags");
    still_serving(&mut server);
    // Four bytes of garbage where the client flags go.
    let mut c = Client::connect(server.addr());
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
    let mut server = start("");
    for flags in [
        FLAG_C_FIXED_NEWSTYLE | 1 << 2,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 31,
        1 << 7,
    ] {
        let mut c = Client::connect(server.addr());
        c.read_greeting();
        c.send_client_flags(flags);
        assert_closed_silently(&mut c, &format!("client flags {flags:#x}"));
        still_serving(&mut server);
    }
}

#[test]
fn unknown_options_get_unsup_and_the_handshake_goes_on() {
    let mut server = start("");
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
    let mut server = start("");
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
    let mut server = start("");
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
    let mut c = Client::connect(server.addr());
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
    let mut server = start("");
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
    let mut server = start("");
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
