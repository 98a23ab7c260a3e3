//! Requests: the unit of work on the data path.
//!
//! A [`Request`] is owned and moved: the caller builds it, hands it to a node's
//! [`Handle`](crate::driver::Handle), and gets it back exactly once inside a
//! [`Completion`], together with the result. The request carries its buffer, so a
//! buffer given to the kernel is owned by the in-flight request and comes back with it.

use crate::buffer::Buffer;
use crate::errno::Errno;
use std::fmt;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read `len` bytes at `offset` into `buf`.
    Read,
    /// Write `buf` (`len` bytes) at `offset`.
    Write,
    /// Make `len` bytes at `offset` read as zeroes; with [`ReqFlags::MAY_UNMAP`] the
    /// driver may deallocate them.
    WriteZeroes,
    /// Deallocate `len` bytes at `offset` (contents afterwards are unspecified).
    Discard,
    /// Make every completed write durable.
    Flush,
    /// Describe `len` bytes at `offset` as extents (allocated / zero / data).
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::WriteZeroes,
        Op::Discard,
        Op::Flush,
        Op::BlockStatus,
    ];

    /// Whether the op changes the node's contents (refused on read-only nodes).
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write | Op::WriteZeroes | Op::Discard)
    }

    /// Wire-style name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
            Op::Discard => "discard",
            Op::Flush => "flush",
            Op::BlockStatus => "block-status",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Request flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReqFlags(u8);

impl ReqFlags {
    pub const NONE: ReqFlags = ReqFlags(0);
    /// Force unit access: the write is durable when it completes.
    pub const FUA: ReqFlags = ReqFlags(1);
    /// Write-zeroes may deallocate the range.
    pub const MAY_UNMAP: ReqFlags = ReqFlags(2);
    /// Write-zeroes must fail with `ENOTSUP` rather than fall back to writing zero buffers.
    pub const NO_FALLBACK: ReqFlags = ReqFlags(4);

    pub fn contains(self, other: ReqFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ReqFlags {
    type Output = ReqFlags;
    fn bitor(self, rhs: ReqFlags) -> ReqFlags {
        ReqFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for ReqFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (ReqFlags::FUA, "FUA"),
            (ReqFlags::MAY_UNMAP, "MAY_UNMAP"),
            (ReqFlags::NO_FALLBACK, "NO_FALLBACK"),
        ] {
            if self.contains(flag) {
                names.push(name);
            }
        }
        write!(f, "ReqFlags({})", names.join("|"))
    }
}

/// The set of ops (and FUA) a driver supports.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct OpSet {
    ops: u8,
    fua: bool,
}

impl OpSet {
    /// Every op, with FUA.
    pub fn all() -> OpSet {
        OpSet {
            ops: Op::ALL.iter().fold(0, |m, op| m | op.bit()),
            fua: true,
        }
    }

    pub fn empty() -> OpSet {
        OpSet::default()
    }

    pub fn with(mut self, op: Op) -> OpSet {
        self.ops |= op.bit();
        self
    }

    pub fn without(mut self, op: Op) -> OpSet {
        self.ops &= !op.bit();
        self
    }

    pub fn with_fua(mut self, fua: bool) -> OpSet {
        self.fua = fua;
        self
    }

    pub fn supports(self, op: Op) -> bool {
        self.ops & op.bit() != 0
    }

    pub fn fua(self) -> bool {
        self.fua
    }
}

impl fmt::Debug for OpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<_> = Op::ALL
            .iter()
            .filter(|op| self.supports(**op))
            .map(|op| op.name())
            .collect();
        write!(
            f,
            "OpSet({}{})",
            ops.join(","),
            if self.fua { ",fua" } else { "" }
        )
    }
}

/// State of an extent reported by block-status (QEMU's BDRV_BLOCK_* bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentState {
    /// Reads return data stored in this node or a file below it (not a backing image).
    pub allocated: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// The range is backed by real storage (not a hole).
    pub data: bool,
}

/// One run of equal state from a block-status request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub state: ExtentState,
}

/// An owned I/O request. Build it with the constructors; read `buf` and `extents` back
/// from the [`Completion`].
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub flags: ReqFlags,
    /// Destination of a read, source of a write; `None` for the other ops.
    pub buf: Option<Buffer>,
    /// Filled by block-status: contiguous extents covering `offset` onwards (they may end
    /// before `offset + len`; callers ask again for the rest).
    pub extents: Vec<Extent>,
}

impl Request {
    fn new(op: Op, offset: u64, len: u64, flags: ReqFlags, buf: Option<Buffer>) -> Request {
        Request {
            op,
            offset,
            len,
            flags,
            buf,
            extents: Vec::new(),
        }
    }

    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub fn read(offset: u64, buf: Buffer) -> Request {
        Request::new(
            Op::Read,
            offset,
            buf.len() as u64,
            ReqFlags::NONE,
            Some(buf),
        )
    }

    /// Write `buf` at `offset`.
    pub fn write(offset: u64, buf: Buffer, flags: ReqFlags) -> Request {
        Request::new(Op::Write, offset, buf.len() as u64, flags, Some(buf))
    }

    pub fn write_zeroes(offset: u64, len: u64, flags: ReqFlags) -> Request {
        Request::new(Op::WriteZeroes, offset, len, flags, None)
    }

    pub fn discard(offset: u64, len: u64) -> Request {
        Request::new(Op::Discard, offset, len, ReqFlags::NONE, None)
    }

    pub fn flush() -> Request {
        Request::new(Op::Flush, 0, 0, ReqFlags::NONE, None)
    }

    pub fn block_status(offset: u64, len: u64) -> Request {
        Request::new(Op::BlockStatus, offset, len, ReqFlags::NONE, None)
    }

    /// The end of the byte range (`offset + len`), or `None` if it overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// A finished request: the request itself (with its buffer) and how it ended.
#[derive(Debug)]
pub struct Completion {
    pub req: Request,
    pub result: Result<(), Errno>,
}

impl Completion {
    pub fn ok(req: Request) -> Completion {
        Completion {
            req,
            result: Ok(()),
        }
    }

    pub fn err(req: Request, errno: Errno) -> Completion {
        Completion {
            req,
            result: Err(errno),
        }
    }
}
