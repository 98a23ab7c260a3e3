//! A connected socket as the reactors use it: buffered receiving and whole sends, both
//! through the ring (no blocking system call on a reactor).

use std::os::fd::RawFd;
use strata_engine::Buffer;
use strata_engine::Errno;
use strata_engine::reactor::ring::{self, Gather, Target};

/// Receive buffer size: many request headers (and small writes) per `recv`.
const RECV_BUFFER: usize = 256 << 10;

/// Why a connection stopped reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed its side (or the server shut the socket down).
    Eof,
    /// The socket failed.
    Error(Errno),
}

/// Buffered receiving on one socket.
pub struct Reader {
    fd: RawFd,
    buf: Option<Buffer>,
    start: usize,
    end: usize,
}

impl Reader {
    pub fn new(fd: RawFd) -> Reader {
        let mut buf = Buffer::new(RECV_BUFFER);
        buf.set_len(RECV_BUFFER);
        Reader {
            fd,
            buf: Some(buf),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Receives until at least `n` bytes (at most the buffer's size) are buffered.
    pub async fn fill(&mut self, n: usize) -> Result<(), Closed> {
        assert!(n <= RECV_BUFFER, "BUG: fill({n}) beyond the receive buffer");
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        while self.buffered() < n {
            let mut buf = self.buf.take().expect("BUG: reader without its buffer");
            if self.start + n > buf.len() {
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let (res, buf) = ring::recv(Target::Fd(self.fd), buf, self.end).await;
            self.buf = Some(buf);
            match ring::cqe_result(res) {
                Ok(0) => return Err(Closed::Eof),
                Ok(got) => self.end += got,
                Err(e) if e == Errno::EINTR || e == Errno::EAGAIN => {}
                Err(e) => return Err(Closed::Error(e)),
            }
        }
        Ok(())
    }

    /// The next `n` buffered bytes (after [`Reader::fill`]), consumed.
    pub fn take(&mut self, n: usize) -> &[u8] {
        assert!(
            n <= self.buffered(),
            "BUG: take({n}) beyond what is buffered"
        );
        let start = self.start;
        self.start += n;
        &self.buf.as_ref().expect("BUG: reader without its buffer")[start..start + n]
    }

    /// Fills `dst` entirely: buffered bytes first, then received straight into `dst`.
    pub async fn read_into(&mut self, mut dst: Buffer) -> Result<Buffer, Closed> {
        let want = dst.len();
        let have = self.buffered().min(want);
        dst[..have].copy_from_slice(self.take(have));
        let mut done = have;
        while done < want {
            let (res, back) = ring::recv(Target::Fd(self.fd), dst, done).await;
            dst = back;
            match ring::cqe_result(res) {
                Ok(0) => return Err(Closed::Eof),
                Ok(got) => done += got,
                Err(e) if e == Errno::EINTR || e == Errno::EAGAIN => {}
                Err(e) => return Err(Closed::Error(e)),
            }
        }
        Ok(dst)
    }

    /// Consumes and drops `n` bytes.
    pub async fn skip(&mut self, mut n: u64) -> Result<(), Closed> {
        while n > 0 {
            if self.buffered() == 0 {
                self.fill(1).await?;
            }
            let step = (self.buffered() as u64).min(n) as usize;
            self.take(step);
            n -= step as u64;
        }
        Ok(())
    }
}

/// Sends everything `g` holds; gives `g` back emptied (for reuse). What the socket
/// takes at once is sent with a direct non-blocking `sendmsg` (no ring round trip: on a
/// loaded connection this saved a reactor loop iteration and a third of the
/// `io_uring_enter` calls per request); the rest goes through the ring, which waits for
/// room without blocking the reactor.
pub async fn send_all(fd: RawFd, mut g: Gather) -> Result<Gather, Errno> {
    loop {
        match g.send_now(fd) {
            Ok(_) => break,
            Err(e) if e == Errno::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    while g.segments() > 0 {
        let (res, back) = ring::send_gather(Target::Fd(fd), g).await;
        g = back;
        match ring::cqe_result(res) {
            Ok(0) => return Err(Errno(libc::EPIPE)),
            Ok(sent) => g.advance(sent),
            Err(e) if e == Errno::EINTR || e == Errno::EAGAIN => {}
            Err(e) => return Err(e),
        }
    }
    g.clear();
    Ok(g)
}

/// Sends `bytes` (a handshake message).
pub async fn send_bytes(fd: RawFd, bytes: &[u8]) -> Result<(), Errno> {
    let mut g = Gather::new();
    let i = g.add(Buffer::from_slice(bytes));
    g.segment(i, 0..bytes.len());
    send_all(fd, g).await.map(drop)
}
