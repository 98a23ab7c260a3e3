//! The transmission phase (doc/proto.md "Transmission phase"): requests by cookie, and
//! their replies, simple or structured, assembled into one [`Completion`] each and
//! checked against the rules as they are parsed.

use super::*;
use std::io::{self, Write};

/// One structured reply chunk's header, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    pub flags: u16,
    pub kind: u16,
    pub len: u32,
}

/// The whole reply to one request: a simple reply, or every structured chunk up to the
/// one with `NBD_REPLY_FLAG_DONE`.
#[derive(Debug, Clone)]
pub struct Completion {
    pub request: Request,
    /// 0 on success, else the (first) error value.
    pub error: u32,
    /// The message of the first error chunk.
    pub message: String,
    /// True for a simple reply.
    pub simple: bool,
    /// The structured chunks in the order received (empty for a simple reply).
    pub chunks: Vec<ChunkHead>,
    /// A read's data, assembled from the content chunks (empty when it failed).
    pub data: Vec<u8>,
    /// Block status: (metadata context id, [(length, status flags)]) per chunk.
    pub extents: Vec<(u32, Vec<(u32, u32)>)>,
    /// Byte ranges [start, end) of the request that content chunks covered.
    covered: Vec<(u64, u64)>,
}

impl Completion {
    fn new(request: Request) -> Completion {
        Completion {
            request,
            error: 0,
            message: String::new(),
            simple: false,
            chunks: Vec::new(),
            data: Vec::new(),
            extents: Vec::new(),
            covered: Vec::new(),
        }
    }

    pub fn cookie(&self) -> u64 {
        self.request.cookie
    }

    /// `Ok(())` or `Err(error value)`.
    pub fn result(&self) -> Result<(), u32> {
        if self.error == 0 {
            Ok(())
        } else {
            Err(self.error)
        }
    }

    /// The final chunk of a structured reply.
    pub fn last_chunk(&self) -> Option<ChunkHead> {
        self.chunks.last().copied()
    }
}

impl Client {
    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Sends a request header and `payload` (the data of a write), remembering the
    /// request so that its reply can be parsed (NBD_CMD_DISC gets no reply).
    pub fn send_request(&mut self, req: Request, payload: &[u8]) {
        self.try_send_request(req, payload)
            .unwrap_or_else(|e| panic!("sending {req:?}: {e}"));
    }

    pub fn try_send_request(&mut self, req: Request, payload: &[u8]) -> io::Result<()> {
        if req.kind != CMD_DISC {
            self.track(req);
        }
        let mut m = req.bytes().to_vec();
        m.extend_from_slice(payload);
        self.try_send(&m)
    }

    /// Registers a request as in flight without sending it: for a test that sends from
    /// another thread (see [`Client::writer`]) while this one reads the replies.
    pub fn track(&mut self, req: Request) {
        let old = self.inflight.insert(req.cookie, req);
        assert!(old.is_none(), "cookie {:#x} already in flight", req.cookie);
    }

    /// A second handle on the connection for sending, e.g. from another thread.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(self.stream.try_clone().expect("clone the socket"))
    }

    /// Requests sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Reads messages until one request's reply is complete; returns it. An error
    /// (EOF, reset, timeout) is returned as is.
    pub fn try_recv(&mut self) -> io::Result<Completion> {
        loop {
            let magic = be32(&self.try_recv_exact(4)?);
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = self.try_recv_exact(12)?;
                    let (error, cookie) = (be32(&h), be64(&h[4..]));
                    let req = self.inflight.remove(&cookie).unwrap_or_else(|| {
                        panic!("simple reply for cookie {cookie:#x}, which is not in flight")
                    });
                    assert!(
                        self.partial.remove(&cookie).is_none(),
                        "simple reply after structured chunks for {req:?}"
                    );
                    assert!(
                        !(self.structured && req.kind == CMD_READ),
                        "structured replies were negotiated: a simple reply to a read is \
                         forbidden ({req:?}, error {error})"
                    );
                    let mut c = Completion::new(req);
                    c.simple = true;
                    c.error = error;
                    if req.kind == CMD_READ && error == 0 {
                        c.data = self.try_recv_exact(req.len as usize)?;
                    }
                    return Ok(c);
                }
                STRUCTURED_REPLY_MAGIC => {
                    assert!(
                        self.structured,
                        "a structured reply chunk although structured replies were not \
                         negotiated"
                    );
                    let h = self.try_recv_exact(16)?;
                    let head = ChunkHead {
                        flags: be16(&h),
                        kind: be16(&h[2..]),
                        len: be32(&h[12..]),
                    };
                    let cookie = be64(&h[4..]);
                    let req = *self.inflight.get(&cookie).unwrap_or_else(|| {
                        panic!("chunk {head:?} for cookie {cookie:#x}, which is not in flight")
                    });
                    assert!(
                        head.len <= MAX_CHUNK,
                        "chunk {head:?} for {req:?} is over {MAX_CHUNK} bytes"
                    );
                    let payload = self.try_recv_exact(head.len as usize)?;
                    let c = self
                        .partial
                        .entry(cookie)
                        .or_insert_with(|| Completion::new(req));
                    chunk(c, head, &payload);
                    if head.flags & REPLY_FLAG_DONE != 0 {
                        self.inflight.remove(&cookie);
                        let c = self.partial.remove(&cookie).expect("assembled above");
                        finish(&c);
                        return Ok(c);
                    }
                }
                m => panic!("reply magic {m:#010x} is neither simple nor structured"),
            }
        }
    }

    /// The next complete reply; panics on EOF, error or timeout.
    pub fn recv(&mut self) -> Completion {
        self.try_recv()
            .unwrap_or_else(|e| panic!("reading a reply ({} in flight): {e}", self.inflight.len()))
    }

    /// Sends one request with a fresh cookie and waits for its reply (nothing else may be
    /// in flight).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Completion {
        let req = Request {
            flags,
            kind,
            cookie: self.cookie(),
            offset,
            len,
        };
        self.send_request(req, payload);
        let c = self.recv();
        assert_eq!(c.cookie(), req.cookie, "reply to another request: {c:?}");
        c
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.call(CMD_READ, 0, offset, len, &[]);
        c.result().map(|()| c.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
            .result()
    }

    /// NBD_CMD_DISC, then waits for the server to close; panics if it does not.
    pub fn disconnect(mut self) {
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.cookie(),
            offset: 0,
            len: 0,
        };
        self.send_request(req, &[]);
        let n = self
            .wait_closed(CLOSE_WAIT)
            .unwrap_or_else(|e| panic!("after NBD_CMD_DISC: {e}"));
        assert_eq!(
            n, 0,
            "the server sent {n} bytes after NBD_CMD_DISC with nothing in flight"
        );
    }
}

/// Adds one structured chunk to the completion it belongs to, checking it.
fn chunk(c: &mut Completion, head: ChunkHead, p: &[u8]) {
    let req = c.request;
    assert!(
        c.last_chunk()
            .is_none_or(|h| h.flags & REPLY_FLAG_DONE == 0),
        "chunk after the DONE chunk for {req:?}"
    );
    c.chunks.push(head);
    let (start, end) = (
        u128::from(req.offset),
        u128::from(req.offset) + u128::from(req.len),
    );
    match head.kind {
        REPLY_TYPE_NONE => {
            assert_eq!(head.len, 0, "NBD_REPLY_TYPE_NONE with a payload: {req:?}");
            assert!(
                head.flags & REPLY_FLAG_DONE != 0,
                "NBD_REPLY_TYPE_NONE MUST be the final chunk: {req:?}"
            );
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(req.kind, CMD_READ, "content chunk for {req:?}");
            let (off, n) = if head.kind == REPLY_TYPE_OFFSET_DATA {
                assert!(p.len() >= 9, "OFFSET_DATA shorter than 9 bytes: {req:?}");
                (be64(p), p.len() as u64 - 8)
            } else {
                assert_eq!(p.len(), 12, "OFFSET_HOLE length for {req:?}");
                let n = u64::from(be32(&p[8..]));
                assert!(n > 0, "OFFSET_HOLE of size 0 for {req:?}");
                (be64(p), n)
            };
            assert!(
                u128::from(off) >= start && u128::from(off) + u128::from(n) <= end,
                "content chunk [{off}, +{n}) outside {req:?}"
            );
            assert!(
                c.covered.iter().all(|&(s, e)| off + n <= s || off >= e),
                "content chunk [{off}, +{n}) overlaps an earlier one for {req:?}"
            );
            c.covered.push((off, off + n));
            if c.data.is_empty() {
                c.data = vec![0u8; req.len as usize];
            }
            let at = (off - req.offset) as usize;
            if head.kind == REPLY_TYPE_OFFSET_DATA {
                c.data[at..at + n as usize].copy_from_slice(&p[8..]);
            } else {
                c.data[at..at + n as usize].fill(0);
            }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert_eq!(req.kind, CMD_BLOCK_STATUS, "block status chunk for {req:?}");
            assert!(
                p.len() >= 12 && (p.len() - 4) % 8 == 0,
                "BLOCK_STATUS length {} for {req:?}",
                p.len()
            );
            let extents = p[4..]
                .chunks(8)
                .map(|d| {
                    let e = (be32(d), be32(&d[4..]));
                    assert!(e.0 > 0, "a zero-length extent for {req:?}");
                    e
                })
                .collect();
            c.extents.push((be32(p), extents));
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            assert!(p.len() >= 6, "error chunk shorter than 6 bytes for {req:?}");
            let (error, mlen) = (be32(p), be16(&p[4..]) as usize);
            assert!(error != 0, "error chunk with error 0 for {req:?}");
            assert!(
                mlen <= p.len() - 6,
                "error message length {mlen} > chunk for {req:?}"
            );
            if k == REPLY_TYPE_ERROR_OFFSET {
                assert_eq!(p.len(), 6 + mlen + 8, "ERROR_OFFSET length for {req:?}");
                let off = u128::from(be64(&p[6 + mlen..]));
                assert!(
                    off >= start && off < end.max(start + 1),
                    "ERROR_OFFSET {off} outside {req:?}"
                );
            }
            if c.error == 0 {
                c.error = error;
                c.message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
            }
        }
        k => panic!("unknown chunk type {k} (not an error) for {req:?}: a hard disconnect"),
    }
}

/// Checks a complete structured reply.
fn finish(c: &Completion) {
    let req = c.request;
    if c.error != 0 {
        return;
    }
    match req.kind {
        CMD_READ => {
            let mut cov = c.covered.clone();
            cov.sort_unstable();
            let mut at = req.offset;
            for (s, e) in cov {
                assert_eq!(s, at, "successful read left [{at}, {s}) uncovered: {req:?}");
                at = e;
            }
            assert_eq!(
                at,
                req.offset + u64::from(req.len),
                "successful read left its tail uncovered: {req:?}"
            );
        }
        CMD_BLOCK_STATUS => {
            assert!(
                !c.extents.is_empty(),
                "successful block status without extents: {req:?}"
            );
        }
        _ => {}
    }
}
