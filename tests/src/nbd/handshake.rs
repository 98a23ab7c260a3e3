//! The fixed newstyle handshake (doc/proto.md "Handshake"): greeting and client flags,
//! options and their replies, and what NBD_OPT_INFO, NBD_OPT_GO and NBD_OPT_EXPORT_NAME
//! say about an export.

use super::*;
use std::io;

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// `REP_*`.
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }

    /// An ACK or an error ends the replies to one option.
    pub fn is_final(&self) -> bool {
        self.kind == REP_ACK || self.is_error()
    }

    /// An error reply's message (any data it carries), lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What NBD_OPT_INFO / NBD_OPT_GO (or NBD_OPT_EXPORT_NAME) said about an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// (id, name) of an NBD_REP_META_CONTEXT reply.
pub fn meta_context(reply: &OptReply) -> (u32, String) {
    assert_eq!(reply.kind, REP_META_CONTEXT, "{reply:?}");
    assert!(reply.data.len() >= 4, "short META_CONTEXT reply: {reply:?}");
    (
        be32(&reply.data),
        String::from_utf8(reply.data[4..].to_vec()).expect("context names are UTF-8"),
    )
}

/// (name, description) of an NBD_REP_SERVER reply.
pub fn server_entry(reply: &OptReply) -> (String, String) {
    assert_eq!(reply.kind, REP_SERVER, "{reply:?}");
    let d = &reply.data;
    assert!(d.len() >= 4, "short REP_SERVER: {reply:?}");
    let n = be32(d) as usize;
    assert!(
        n <= d.len() - 4,
        "REP_SERVER name length {n} > {}",
        d.len() - 4
    );
    (
        String::from_utf8(d[4..4 + n].to_vec()).expect("export names are UTF-8"),
        String::from_utf8(d[4 + n..].to_vec()).expect("descriptions are UTF-8"),
    )
}

impl Client {
    /// Connects, completes the handshake and NBD_OPT_GO on `name` (after
    /// NBD_OPT_STRUCTURED_REPLY if `structured`); panics if any of it fails.
    pub fn connect_go(addr: &Addr, name: &str, structured: bool) -> (Client, Export) {
        let mut c = Client::connect(addr);
        c.handshake();
        if structured {
            c.structured_reply();
        }
        let export = c
            .go(name, &[INFO_BLOCK_SIZE])
            .unwrap_or_else(|r| panic!("NBD_OPT_GO {name:?}: {r:?} {}", r.text()));
        (c, export)
    }

    /// Reads the greeting (both magics) and returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let g = self.recv_exact(18, "the greeting");
        assert_eq!(be64(&g), NBDMAGIC, "greeting magic: {g:02x?}");
        assert_eq!(
            be64(&g[8..]),
            IHAVEOPT,
            "greeting: second magic is not IHAVEOPT (oldstyle?): {g:02x?}"
        );
        self.handshake_flags = be16(&g[16..]);
        self.handshake_flags
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        self.client_flags = flags;
        self.send(&flags.to_be_bytes());
    }

    /// Greeting and client flags: fixed newstyle, and no zeroes if the server offers it.
    pub fn handshake(&mut self) {
        let flags = self.read_greeting();
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "the server must set NBD_FLAG_FIXED_NEWSTYLE: {flags:#x}"
        );
        assert_eq!(
            flags & !(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            0,
            "the server MUST NOT set other handshake flags: {flags:#x}"
        );
        let mut c = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            c |= FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(c);
    }

    /// The 16-byte option header alone (a bad peer may announce data it never sends).
    pub fn option_header(option: u32, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..].copy_from_slice(&len.to_be_bytes());
        b
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Client::option_header(option, data.len() as u32).to_vec();
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn try_recv_option_reply(&mut self) -> io::Result<OptReply> {
        let h = self.try_recv_exact(20)?;
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic: {h:02x?}");
        let (option, kind, len) = (be32(&h[8..]), be32(&h[12..]), be32(&h[16..]));
        assert!(
            len <= 1 << 20,
            "option reply {kind:#x} to {option} claims {len} bytes"
        );
        let data = self.try_recv_exact(len as usize)?;
        Ok(OptReply { option, kind, data })
    }

    /// The next option reply; panics on EOF or timeout.
    pub fn recv_option_reply(&mut self) -> OptReply {
        self.try_recv_option_reply()
            .unwrap_or_else(|e| panic!("reading an option reply: {e}"))
    }

    /// Every reply up to the final one (ACK or error), each checked to answer `option`.
    pub fn recv_option_replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut replies = Vec::new();
        loop {
            let r = self.recv_option_reply();
            assert_eq!(r.option, option, "reply to the wrong option: {r:?}");
            let last = r.is_final();
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Sends an option and returns every reply up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        self.recv_option_replies(option)
    }

    /// The single final reply an option gets (panics if others came first).
    pub fn option_final(&mut self, option: u32, data: &[u8]) -> OptReply {
        let mut r = self.option(option, data);
        assert_eq!(r.len(), 1, "option {option}: more than one reply: {r:?}");
        r.pop().expect("one reply")
    }

    /// NBD_OPT_STRUCTURED_REPLY, which must be acknowledged.
    pub fn structured_reply(&mut self) {
        let r = self.option_final(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.kind, REP_ACK, "NBD_OPT_STRUCTURED_REPLY: {r:?}");
        self.structured = true;
    }

    /// NBD_OPT_INFO: the export's information, or the final error reply.
    pub fn info(&mut self, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        self.info_or_go(OPT_INFO, name, infos)
    }

    /// NBD_OPT_GO: on success the connection is in the transmission phase.
    pub fn go(&mut self, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        self.info_or_go(OPT_GO, name, infos)
    }

    fn info_or_go(&mut self, option: u32, name: &str, infos: &[u16]) -> Result<Export, OptReply> {
        let replies = self.option(option, &go_data(name, infos));
        let (last, infos) = replies.split_last().expect("at least one reply");
        if last.is_error() {
            return Err(last.clone());
        }
        let mut export = Export::default();
        let mut have_export = false;
        for r in infos {
            assert_eq!(r.kind, REP_INFO, "only NBD_REP_INFO before the ACK: {r:?}");
            assert!(r.data.len() >= 2, "NBD_REP_INFO without a type: {r:?}");
            let d = &r.data[2..];
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length: {r:?}");
                    export.size = be64(d);
                    export.flags = be16(&d[8..]);
                    have_export = true;
                }
                INFO_NAME => export.name = Some(String::from_utf8_lossy(d).into_owned()),
                INFO_DESCRIPTION => {
                    export.description = Some(String::from_utf8_lossy(d).into_owned())
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length: {r:?}");
                    export.block_size = Some((be32(d), be32(&d[4..]), be32(&d[8..])));
                }
                _ => {} // clients MUST ignore information types they do not know
            }
        }
        assert!(have_export, "success without NBD_INFO_EXPORT: {replies:?}");
        assert!(
            export.flags & FLAG_HAS_FLAGS != 0,
            "NBD_FLAG_HAS_FLAGS MUST always be 1: {:#x}",
            export.flags
        );
        Ok(export)
    }

    /// NBD_OPT_EXPORT_NAME: size and flags (then 124 zeroes unless the client sent
    /// NBD_FLAG_C_NO_ZEROES).
    pub fn export_name(&mut self, name: &str) -> io::Result<Export> {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes());
        let b = self.try_recv_exact(10)?;
        if self.client_flags & FLAG_C_NO_ZEROES == 0 {
            let z = self.try_recv_exact(124)?;
            assert!(
                z.iter().all(|&b| b == 0),
                "the 124 reserved bytes are not zero"
            );
        }
        Ok(Export {
            size: be64(&b),
            flags: be16(&b[8..]),
            ..Export::default()
        })
    }
}
