//! The transmission phase of one connection: requests in, replies out, many in flight.
//!
//! ```text
//!          recv (batched)                     requests                 sendmsg (batched)
//!   socket ------------> reader loop --Blk::submit--> node --complete--> reply queue --> writer task --> socket
//!                          | decode, check            (immediate or     (in completion       (one gather of
//!                          | read write payloads       a task per        order: replies       every queued
//!                          v                           pending request)  may pass each        reply)
//!                     backpressure: stop reading                         other)
//!                     while too much is in flight
//! ```
//!
//! - **Reader** (the connection's task): decodes request headers from a large receive
//!   buffer, reads write payloads (copied from the buffer, the rest received straight
//!   into the request's buffer), checks the request against the export, and starts it.
//!   A request that completes immediately (RAM nodes) is answered without a task; one
//!   that is pending runs as its own task, so requests complete out of order.
//! - **Writer** (a second task): sends every queued reply with one `sendmsg` (headers of
//!   the batch in one buffer, read data as further segments, no copy).
//! - **Backpressure**: the reader stops reading while [`MAX_IN_FLIGHT`] requests are in
//!   flight or [`MAX_HELD_BYTES`] of request data are held (read data not yet sent,
//!   write payloads not yet written), so a client that never reads its replies, or
//!   floods a slow node with writes, holds a bounded amount of memory and nothing else.
//! - **Ending**: end-of-file, `NBD_CMD_DISC`, a broken frame (bad magic, a write payload
//!   beyond [`MAX_PAYLOAD`]) or a failed send stop the reader. Requests in flight always
//!   finish (a write that started is never cut short); their replies are sent if the
//!   socket still works; then the connection closes.
//! - Read buffers are zeroed before the node fills them: buffers are pooled per reactor,
//!   and a node that may leave them untouched (`null-co` without `read-zeroes`) must not
//!   hand one client the bytes another client wrote.
//! - Requests larger than the node's `max_transfer` are split into sequential pieces;
//!   the whole request is checked first, so a request that fails its checks touches
//!   nothing.

use super::connection::{BASE_ALLOCATION_ID, Session};
use super::proto::*;
use super::socket::{Reader, send_all};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use strata_engine::graph::Blk;
use strata_engine::reactor::{self, ring::Gather};
use strata_engine::{Buffer, Completion, DriverInfo, Errno, IoFuture, Op, ReqFlags, Request};

/// Most requests per connection that are running or whose replies wait to be sent
/// before the reader pauses.
pub const MAX_IN_FLIGHT: usize = 512;
/// Most bytes of request data held per connection (read data in flight or waiting to be
/// sent, write payloads in flight) before the reader pauses.
pub const MAX_HELD_BYTES: usize = 64 << 20;
/// Largest reply header: a structured chunk header plus the longest fixed part (an
/// error chunk's error, message length and message).
const HEADER_MAX: usize = 64;

/// A reply waiting to be sent.
struct OutReply {
    header: [u8; HEADER_MAX],
    header_len: u8,
    data: Data,
    /// Bytes of read data this reply accounts for in `held` (released once sent).
    held: usize,
}

enum Data {
    None,
    One(Buffer, usize),
    Many(Vec<Buffer>),
}

struct Conn {
    /// The socket, held so its descriptor number stays this connection's while any of
    /// its tasks (writer, requests) lives.
    fd: Arc<OwnedFd>,
    blk: Blk,
    structured: bool,
    extended: bool,
    base_allocation: bool,
    writable: bool,
    queue: RefCell<VecDeque<OutReply>>,
    writer: RefCell<Option<Waker>>,
    reader: RefCell<Option<Waker>>,
    in_flight: Cell<usize>,
    held: Cell<usize>,
    /// The reader has stopped: the writer ends once nothing is in flight or queued.
    closing: Cell<bool>,
    /// Sending failed: replies are dropped from now on.
    dead: Cell<bool>,
}

/// Runs the transmission phase until the connection ends.
pub async fn run(session: Session, reader: Reader, fd: Arc<OwnedFd>) {
    let conn = Rc::new(Conn {
        fd,
        blk: session.blk,
        structured: session.structured,
        extended: session.extended,
        base_allocation: session.base_allocation,
        writable: session.export.writable,
        queue: RefCell::new(VecDeque::new()),
        writer: RefCell::new(None),
        reader: RefCell::new(None),
        in_flight: Cell::new(0),
        held: Cell::new(0),
        closing: Cell::new(false),
        dead: Cell::new(false),
    });
    let writer = reactor::spawn_with_reply(write_loop(conn.clone()));
    // If this task is dropped early (a driver panicked under the reader), the writer and
    // the requests still running must not go on sending: mark the connection dead.
    let _ended = Ended(conn.clone());
    read_loop(&conn, reader).await;
    conn.closing.set(true);
    conn.wake_writer();
    let _ = writer.await;
    // The writer ends early only if sending failed: wait for the requests still running.
    poll_fn(|cx| {
        if conn.in_flight.get() == 0 {
            Poll::Ready(())
        } else {
            *conn.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
}

/// Marks the connection dead when the transmission task goes, however it goes; after a
/// normal end the writer has already finished and this changes nothing.
struct Ended(Rc<Conn>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.dead.set(true);
        self.0.closing.set(true);
        self.0.wake_writer();
    }
}

/// The protocol error (and a message for structured replies) of a request that fails
/// its checks.
type Refusal = (u32, &'static str);

async fn read_loop(conn: &Rc<Conn>, mut r: Reader) {
    loop {
        // Backpressure: bounded work and memory per connection.
        poll_fn(|cx| {
            let unanswered = conn.in_flight.get() + conn.queue.borrow().len();
            if unanswered < MAX_IN_FLIGHT && conn.held.get() < MAX_HELD_BYTES {
                Poll::Ready(())
            } else {
                *conn.reader.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let header_len = if conn.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        if conn.dead.get() || r.fill(header_len).await.is_err() {
            return;
        }
        let bytes = r.take(header_len);
        let decoded = if conn.extended {
            RequestHeader::decode_extended(bytes.try_into().expect("BUG: header"))
        } else {
            RequestHeader::decode(bytes.try_into().expect("BUG: header"))
        };
        let Some(h) = decoded else {
            return;
        };
        let Some(info) = conn.blk.node().info() else {
            // The node is gone (deleted under a hard export removal): stop serving.
            return;
        };
        if h.kind == CMD_DISC {
            return;
        }
        // A write carries its payload; with extended headers a flag may announce one on
        // another command (block status with payload, which this server never offers).
        let payload = h.kind == CMD_WRITE || (conn.extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let checked = if payload && h.kind != CMD_WRITE {
            Err((EINVAL, "unexpected payload"))
        } else {
            check(conn, &h, &info)
        };
        if payload {
            if h.len > u64::from(MAX_PAYLOAD) {
                return;
            }
            if let Err((e, msg)) = checked {
                // The payload is read (and dropped) so the next request is found.
                if r.skip(h.len).await.is_err() {
                    return;
                }
                conn.refuse(&h, e, msg);
                continue;
            }
            let pieces = split(h.offset, h.len, chunk_size(&info, true));
            let mut bufs = Vec::new();
            for (_, len) in pieces {
                match r.read_into(Buffer::new(len as usize)).await {
                    Ok(b) => bufs.push(b),
                    Err(_) => return,
                }
            }
            conn.start_write(h, pieces, bufs);
            continue;
        }
        match checked {
            Ok(()) => conn.start(h, &info),
            Err((e, msg)) => conn.refuse(&h, e, msg),
        }
    }
}

/// Checks a request against the export before anything runs.
fn check(conn: &Conn, h: &RequestHeader, info: &DriverInfo) -> Result<(), Refusal> {
    // Each flag only where the protocol defines it (and where it was advertised).
    // FUA is valid on every command once advertised (the protocol says servers MUST
    // accept it, and ignore it where nothing is written).
    let fua = if info.ops.fua() { CMD_FLAG_FUA } else { 0 };
    let allowed = fua
        | match h.kind {
            CMD_READ if conn.structured => CMD_FLAG_DF,
            // Extended-header clients mark the payload of a write (the spec asks them to).
            CMD_WRITE if conn.extended => CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if h.flags & !allowed != 0 {
        return Err((EINVAL, "command flags not valid for this command"));
    }
    let ops = info.ops;
    let (op, is_write) = match h.kind {
        CMD_READ => (Some(Op::Read), false),
        CMD_WRITE => (Some(Op::Write), true),
        CMD_FLUSH => (Some(Op::Flush), false),
        CMD_TRIM => (Some(Op::Discard), true),
        CMD_WRITE_ZEROES => (Some(Op::WriteZeroes), true),
        CMD_BLOCK_STATUS => (Some(Op::BlockStatus), false),
        CMD_CACHE => (None, false),
        _ => return Err((EINVAL, "unknown command")),
    };
    if is_write && !conn.writable {
        return Err((EPERM, "export is read-only"));
    }
    if let Some(op) = op
        && !ops.supports(op)
    {
        return Err((EINVAL, "command not supported by this export"));
    }
    if h.kind == CMD_BLOCK_STATUS && !conn.base_allocation {
        return Err((EINVAL, "no meta context negotiated"));
    }
    if h.kind == CMD_FLUSH {
        return Ok(());
    }
    if h.len == 0 {
        return Err((EINVAL, "zero-length request"));
    }
    let end = h
        .offset
        .checked_add(h.len)
        .ok_or((EINVAL, "offset + length overflows"))?;
    if end > info.size {
        return Err(if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            (ENOSPC, "request beyond the end of the export")
        } else {
            (EINVAL, "request beyond the end of the export")
        });
    }
    if h.kind == CMD_READ && h.len > u64::from(MAX_PAYLOAD) {
        return Err((EINVAL, "read larger than the maximum block size"));
    }
    // The advertised minimum block size (the node's alignment): refused here, as a
    // client error, rather than by the node (which would report an I/O error).
    let align = u64::from(info.request_alignment.max(1));
    if matches!(h.kind, CMD_READ | CMD_WRITE) && (h.offset % align != 0 || h.len % align != 0) {
        return Err((EINVAL, "request not aligned to the minimum block size"));
    }
    Ok(())
}

/// The largest piece of one request for a node: its `max_transfer` in whole alignment
/// units, and for data (reads and writes, which hold buffers) at most [`MAX_PAYLOAD`].
fn chunk_size(info: &DriverInfo, data: bool) -> u64 {
    let align = u64::from(info.request_alignment.max(1));
    let cap = if data {
        u64::from(MAX_PAYLOAD)
    } else {
        u64::MAX
    };
    let max = info.max_transfer.min(cap).max(align);
    max / align * align
}

/// `(offset, len)` pieces of at most `chunk` bytes covering a range, made as they are
/// needed: with extended headers one trim may cover petabytes.
#[derive(Clone, Copy, Debug)]
struct Pieces {
    at: u64,
    end: u64,
    chunk: u64,
}

impl Iterator for Pieces {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.at >= self.end {
            return None;
        }
        let n = self.chunk.min(self.end - self.at);
        let piece = (self.at, n);
        self.at += n;
        Some(piece)
    }
}

/// The pieces of `len` bytes at `offset` (the range was checked not to overflow).
fn split(offset: u64, len: u64, chunk: u64) -> Pieces {
    Pieces {
        at: offset,
        end: offset + len,
        chunk,
    }
}

fn req_flags(h: &RequestHeader) -> ReqFlags {
    let mut f = ReqFlags::NONE;
    if h.flags & CMD_FLAG_FUA != 0 {
        f = f | ReqFlags::FUA;
    }
    if h.kind == CMD_WRITE_ZEROES {
        if h.flags & CMD_FLAG_NO_HOLE == 0 {
            f = f | ReqFlags::MAY_UNMAP;
        }
        if h.flags & CMD_FLAG_FAST_ZERO != 0 {
            f = f | ReqFlags::NO_FALLBACK;
        }
    }
    f
}

impl Conn {
    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.borrow_mut().take() {
            w.wake();
        }
    }

    fn push(&self, reply: OutReply) {
        if self.dead.get() {
            self.release(reply.held);
            return;
        }
        self.queue.borrow_mut().push_back(reply);
        self.wake_writer();
    }

    fn release(&self, held: usize) {
        if held > 0 {
            self.held.set(self.held.get() - held);
            self.wake_reader();
        }
    }

    /// A request ended (its reply is queued or dropped).
    fn finished(&self) {
        self.in_flight.set(self.in_flight.get() - 1);
        self.wake_reader();
        if self.closing.get() {
            self.wake_writer();
        }
    }

    /// Answers a request with an error: an error chunk once structured replies are
    /// negotiated (it carries a message; the protocol prefers it for every command),
    /// otherwise a simple reply.
    fn refuse(&self, h: &RequestHeader, error: u32, message: &str) {
        self.push(self.error_reply(h, error, message));
    }

    fn error_reply(&self, h: &RequestHeader, error: u32, message: &str) -> OutReply {
        let mut out = Header::new(self, h);
        out.error(error, message);
        out.reply(Data::None, 0)
    }

    /// Starts a checked request other than a write.
    fn start(self: &Rc<Self>, h: RequestHeader, info: &DriverInfo) {
        let len = h.len;
        let req = match h.kind {
            CMD_READ => {
                let chunk = chunk_size(info, true);
                if len > chunk {
                    return self.spawn_pieces(h, split(h.offset, len, chunk), Vec::new());
                }
                Request::read(h.offset, Buffer::zeroed(len as usize))
            }
            CMD_FLUSH => Request::flush(),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let chunk = chunk_size(info, false);
                let fua_after = h.kind == CMD_TRIM && h.flags & CMD_FLAG_FUA != 0;
                if len > chunk || fua_after {
                    return self.spawn_pieces(h, split(h.offset, len, chunk), Vec::new());
                }
                if h.kind == CMD_TRIM {
                    Request::discard(h.offset, len)
                } else {
                    Request::write_zeroes(h.offset, len, req_flags(&h))
                }
            }
            CMD_BLOCK_STATUS => {
                // One request per reply: at most what the node answers at once.
                let len = len.min(info.max_transfer).min(info.size - h.offset);
                Request::block_status(h.offset, len)
            }
            CMD_CACHE => {
                // A prefetch hint: the checks passed, nothing needs doing for the
                // drivers Strata has (their reads do not get faster for it).
                let mut out = Header::new(self, &h);
                out.done();
                return self.push(out.reply(Data::None, 0));
            }
            _ => unreachable!("BUG: unchecked command {}", h.kind),
        };
        self.submit(h, req);
    }

    fn start_write(self: &Rc<Self>, h: RequestHeader, pieces: Pieces, mut bufs: Vec<Buffer>) {
        if bufs.len() == 1 {
            let buf = bufs.pop().expect("BUG: one buffer");
            self.submit(h, Request::write(h.offset, buf, req_flags(&h)));
        } else {
            self.spawn_pieces(h, pieces, bufs);
        }
    }

    /// Counts a request as in flight (and the memory it holds); returns the bytes held.
    fn begin(&self, h: &RequestHeader) -> usize {
        let held = held_by(h);
        self.in_flight.set(self.in_flight.get() + 1);
        self.held.set(self.held.get() + held);
        held
    }

    /// Starts a one-piece request; an immediate completion is answered at once.
    fn submit(self: &Rc<Self>, h: RequestHeader, req: Request) {
        let held = self.begin(&h);
        match self.blk.submit(req) {
            IoFuture::Ready(Some(c)) => self.complete(h, c, held),
            fut => {
                let task = Answer::new(self, h, held);
                reactor::spawn(async move {
                    let c = fut.await;
                    task.conn().complete(h, c, held);
                    task.answered();
                });
            }
        }
    }

    /// Runs a request in sequential pieces in its own task.
    fn spawn_pieces(self: &Rc<Self>, h: RequestHeader, pieces: Pieces, bufs: Vec<Buffer>) {
        let held = self.begin(&h);
        let task = Answer::new(self, h, held);
        reactor::spawn(async move {
            let result = task.conn().run_pieces(&h, pieces, bufs).await;
            task.conn().answer(&h, result, held);
            task.answered();
        });
    }

    /// The pieces one after the other; a read's data is the pieces' buffers in order.
    async fn run_pieces(
        &self,
        h: &RequestHeader,
        pieces: Pieces,
        bufs: Vec<Buffer>,
    ) -> Result<Data, Errno> {
        let flags = req_flags(h);
        let mut out = Vec::new();
        let mut bufs = bufs.into_iter();
        for (offset, len) in pieces {
            let req = match h.kind {
                CMD_READ => Request::read(offset, Buffer::zeroed(len as usize)),
                CMD_WRITE => Request::write(offset, bufs.next().expect("BUG: piece buffer"), flags),
                CMD_TRIM => Request::discard(offset, len),
                CMD_WRITE_ZEROES => Request::write_zeroes(offset, len, flags),
                _ => unreachable!("BUG: command {} in pieces", h.kind),
            };
            let c = self.blk.submit(req).await;
            c.result?;
            if h.kind == CMD_READ {
                out.push(c.req.buf.expect("BUG: read without its buffer"));
            }
        }
        if h.kind == CMD_TRIM && h.flags & CMD_FLAG_FUA != 0 {
            self.blk.submit(Request::flush()).await.result?;
        }
        Ok(if h.kind == CMD_READ {
            Data::Many(out)
        } else {
            Data::None
        })
    }

    /// Answers a one-piece request from its completion.
    fn complete(&self, h: RequestHeader, mut c: Completion, held: usize) {
        let data = c.result.map(|()| match h.kind {
            CMD_READ => Data::One(
                c.req.buf.take().expect("BUG: read without its buffer"),
                h.len as usize,
            ),
            CMD_BLOCK_STATUS => {
                let one = h.flags & CMD_FLAG_REQ_ONE != 0;
                let descriptors = descriptors(&c.req, one, self.extended);
                let len = descriptors.len();
                Data::One(Buffer::from_slice(&descriptors), len)
            }
            _ => Data::None,
        });
        self.answer(&h, data, held);
    }

    /// Queues the reply of a finished request: `data` is what a successful read or
    /// block status returns. Write payloads are freed here, read data once sent.
    fn answer(&self, h: &RequestHeader, result: Result<Data, Errno>, held: usize) {
        let mut out = Header::new(self, h);
        let reply = match result {
            Err(e) => {
                self.release(held);
                self.error_reply(h, wire_error(e), e.name())
            }
            Ok(data) if h.kind == CMD_READ => {
                out.read_ok(h.len);
                out.reply(data, held)
            }
            Ok(data @ Data::One(_, len)) if h.kind == CMD_BLOCK_STATUS => {
                out.block_status(len);
                out.reply(data, 0)
            }
            Ok(_) => {
                self.release(held);
                out.done();
                out.reply(Data::None, 0)
            }
        };
        self.push(reply);
        self.finished();
    }
}

/// A request running as its own task. If the task ends without answering (a driver
/// panicked and the executor dropped the task), the request is answered with `EIO` so
/// the connection's counts stay right and it can still close.
struct Answer {
    conn: Rc<Conn>,
    h: RequestHeader,
    held: usize,
    done: bool,
}

impl Answer {
    fn new(conn: &Rc<Conn>, h: RequestHeader, held: usize) -> Answer {
        Answer {
            conn: conn.clone(),
            h,
            held,
            done: false,
        }
    }

    fn conn(&self) -> &Rc<Conn> {
        &self.conn
    }

    /// The request was answered normally.
    fn answered(mut self) {
        self.done = true;
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.done {
            self.conn.release(self.held);
            let reply = self.conn.error_reply(&self.h, EIO, "internal error");
            self.conn.push(reply);
            self.conn.finished();
        }
    }
}

/// Bytes of memory a request holds against [`MAX_HELD_BYTES`]: a read's data until its
/// reply is sent, a write's payload until it completes.
fn held_by(h: &RequestHeader) -> usize {
    match h.kind {
        // Both at most MAX_PAYLOAD (checked before they start).
        CMD_READ | CMD_WRITE => h.len as usize,
        _ => 0,
    }
}

/// `base:allocation` descriptors (length, flags) for a block-status result, merged
/// where neighbours are equal and clipped to the request: 32-bit fields, or 64-bit
/// ones with extended headers.
fn descriptors(req: &Request, one: bool, extended: bool) -> Vec<u8> {
    let end = req.offset + req.len;
    let mut merged: Vec<(u64, u32)> = Vec::new();
    let mut at = req.offset;
    for e in &req.extents {
        if at >= end {
            break;
        }
        let e_end = (e.offset + e.len).min(end);
        if e_end <= at {
            continue;
        }
        let mut flags = 0;
        if !e.state.data {
            flags |= STATE_HOLE;
        }
        if e.state.zero {
            flags |= STATE_ZERO;
        }
        match merged.last_mut() {
            Some((len, f)) if *f == flags => *len += e_end - at,
            _ => merged.push((e_end - at, flags)),
        }
        at = e_end;
    }
    if merged.is_empty() {
        // A driver that described nothing: report the range as plain data.
        merged.push((req.len, 0));
    }
    if one {
        merged.truncate(1);
    }
    let mut out = Vec::with_capacity(merged.len() * 16);
    for (len, flags) in merged {
        if extended {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&u64::from(flags).to_be_bytes());
        } else {
            // Lengths fit: a compact block-status request is at most 32 bits long.
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    out
}

/// A reply header being built for one request, in the form the connection negotiated:
/// simple replies, structured chunks, or extended chunks (which also carry the
/// request's offset and a 64-bit length, and replace simple replies altogether).
struct Header {
    bytes: [u8; HEADER_MAX],
    len: usize,
    structured: bool,
    extended: bool,
    cookie: u64,
    offset: u64,
}

impl Header {
    fn new(conn: &Conn, h: &RequestHeader) -> Header {
        Header {
            bytes: [0; HEADER_MAX],
            len: 0,
            structured: conn.structured,
            extended: conn.extended,
            cookie: h.cookie,
            offset: h.offset,
        }
    }

    fn put(&mut self, b: &[u8]) {
        self.bytes[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn simple(&mut self, error: u32) {
        self.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.put(&error.to_be_bytes());
        self.put(&self.cookie.to_be_bytes());
    }

    fn chunk(&mut self, flags: u16, kind: u16, payload: u64) {
        if self.extended {
            self.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            self.put(&flags.to_be_bytes());
            self.put(&kind.to_be_bytes());
            self.put(&self.cookie.to_be_bytes());
            self.put(&self.offset.to_be_bytes());
            self.put(&payload.to_be_bytes());
        } else {
            self.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            self.put(&flags.to_be_bytes());
            self.put(&kind.to_be_bytes());
            self.put(&self.cookie.to_be_bytes());
            // Structured payloads are at most MAX_PAYLOAD plus a small header.
            self.put(&(payload as u32).to_be_bytes());
        }
    }

    /// Success of a request without data: a simple reply where allowed (shorter).
    fn done(&mut self) {
        if self.extended {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        } else {
            self.simple(0);
        }
    }

    /// Failure: an error chunk once structured replies are negotiated.
    fn error(&mut self, error: u32, message: &str) {
        if !self.structured {
            return self.simple(error);
        }
        let header = if self.extended {
            EXTENDED_REPLY_LEN
        } else {
            STRUCTURED_REPLY_LEN
        };
        let room = HEADER_MAX - header - 6;
        let msg = &message.as_bytes()[..message.len().min(room)];
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
        self.put(&error.to_be_bytes());
        self.put(&(msg.len() as u16).to_be_bytes());
        self.put(msg);
    }

    /// A successful read of `len` bytes (the data follows the header).
    fn read_ok(&mut self, len: u64) {
        if self.structured {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + len);
            self.put(&self.offset.to_be_bytes());
        } else {
            self.simple(0);
        }
    }

    /// A `base:allocation` answer whose descriptors (`bytes` long) follow.
    fn block_status(&mut self, bytes: usize) {
        if self.extended {
            self.chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + bytes as u64,
            );
            self.put(&BASE_ALLOCATION_ID.to_be_bytes());
            self.put(&((bytes / 16) as u32).to_be_bytes());
        } else {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + bytes as u64);
            self.put(&BASE_ALLOCATION_ID.to_be_bytes());
        }
    }

    fn reply(self, data: Data, held: usize) -> OutReply {
        OutReply {
            header: self.bytes,
            header_len: self.len as u8,
            data,
            held,
        }
    }
}

/// Sends queued replies, all that are queued at once, until the connection closes.
async fn write_loop(conn: Rc<Conn>) {
    let mut g = Gather::new();
    let mut batch: Vec<OutReply> = Vec::new();
    loop {
        poll_fn(|cx| {
            let idle = conn.closing.get() && conn.in_flight.get() == 0;
            if !conn.queue.borrow().is_empty() || idle || conn.dead.get() {
                Poll::Ready(())
            } else {
                *conn.writer.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if conn.dead.get() {
            let dropped: usize = conn.queue.borrow_mut().drain(..).map(|r| r.held).sum();
            conn.release(dropped);
            return;
        }
        batch.extend(conn.queue.borrow_mut().drain(..));
        if batch.is_empty() {
            return;
        }
        let header_bytes: usize = batch.iter().map(|r| usize::from(r.header_len)).sum();
        let mut headers = Buffer::new(header_bytes);
        let mut at = 0;
        for r in &batch {
            let n = usize::from(r.header_len);
            headers[at..at + n].copy_from_slice(&r.header[..n]);
            at += n;
        }
        let hi = g.add(headers);
        let mut at = 0;
        let mut held = 0;
        for r in batch.drain(..) {
            let n = usize::from(r.header_len);
            g.segment(hi, at..at + n);
            at += n;
            held += r.held;
            match r.data {
                Data::None => {}
                Data::One(buf, len) => {
                    let i = g.add(buf);
                    g.segment(i, 0..len);
                }
                Data::Many(bufs) => {
                    for buf in bufs {
                        let len = buf.len();
                        let i = g.add(buf);
                        g.segment(i, 0..len);
                    }
                }
            }
        }
        match send_all(conn.fd.as_raw_fd(), g).await {
            Ok(back) => g = back,
            Err(_) => {
                conn.dead.set(true);
                // Wake a reader blocked in recv: the connection is over.
                // SAFETY: shutdown(2) on the connection's socket, still open.
                unsafe { libc::shutdown(conn.fd.as_raw_fd(), libc::SHUT_RDWR) };
                g = Gather::new();
            }
        }
        conn.release(held);
        // The queue shrank: a reader paused on it may go on.
        conn.wake_reader();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_engine::{Extent, ExtentState};

    #[test]
    fn split_covers_the_range_in_chunks() {
        let all = |p: Pieces| p.collect::<Vec<_>>();
        assert_eq!(all(split(10, 5, 4)), vec![(10, 4), (14, 1)]);
        assert_eq!(all(split(0, 8, 4)), vec![(0, 4), (4, 4)]);
        assert_eq!(all(split(0, 3, 4)), vec![(0, 3)]);
        // Lazily: a petabyte in 32 MiB pieces is not a list of 2^25 entries.
        let mut huge = split(0, 1 << 50, 32 << 20);
        assert_eq!(huge.next(), Some((0, 32 << 20)));
        assert_eq!(huge.last(), Some(((1 << 50) - (32 << 20), 32 << 20)));
    }

    #[test]
    fn descriptors_merge_clip_and_mark_holes_and_zeroes() {
        let mut req = Request::block_status(100, 300);
        let data = ExtentState {
            allocated: true,
            zero: false,
            data: true,
        };
        let hole = ExtentState {
            allocated: false,
            zero: true,
            data: false,
        };
        req.extents = vec![
            Extent {
                offset: 100,
                len: 50,
                state: data,
            },
            Extent {
                offset: 150,
                len: 50,
                state: data,
            },
            Extent {
                offset: 200,
                len: 500,
                state: hole,
            },
        ];
        let d = descriptors(&req, false, false);
        assert_eq!(d.len(), 16);
        assert_eq!((be32(&d[0..4]), be32(&d[4..8])), (100, 0));
        assert_eq!(
            (be32(&d[8..12]), be32(&d[12..16])),
            (200, STATE_HOLE | STATE_ZERO)
        );
        assert_eq!(descriptors(&req, true, false).len(), 8);
        let ext = descriptors(&req, false, true);
        assert_eq!(ext.len(), 32);
        assert_eq!((be64(&ext[16..24]), be64(&ext[24..32])), (200, 3));
    }
}
