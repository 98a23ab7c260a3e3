//! NBD wire constants and message layouts, from the protocol specification
//! (`doc/proto.md` of NetworkBlockDevice/nbd). Shared by the server ([`super::server`])
//! and, later, the client driver. Everything on the wire is big-endian.

use strata_engine::Errno;

/// "NBDMAGIC": the first eight bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, also the start of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

// Information types (NBD_REP_INFO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_LEN: usize = 28;
/// Extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests with a 64-bit length.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the request's length is the length of a payload that follows.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Extended reply chunks: magic, flags, type, cookie, request offset, 64-bit length.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const EXTENDED_REPLY_LEN: usize = 32;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Block status (base:allocation).
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values (the protocol's own numbering, equal to Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest request payload the server accepts (32 MiB, what QEMU's server and most
/// clients use); advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload the server reads; longer options are refused with
/// `NBD_REP_ERR_TOO_BIG` and the connection is closed (the bytes are not worth reading).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest export name or description (the spec's limit for names).
pub const MAX_STRING: usize = 4096;

/// The protocol's error for a failed request: the errno values NBD defines pass
/// through, everything else becomes `EIO` (`ENODEV` of a node deleted under a request
/// becomes `ESHUTDOWN`).
pub fn wire_error(e: Errno) -> u32 {
    match e.0 {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EFBIG | libc::EDQUOT => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN | libc::ENODEV => ESHUTDOWN,
        _ => EIO,
    }
}

/// A transmission request header, decoded (compact or extended: the length is 64 bits
/// either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl RequestHeader {
    /// Decodes a compact (28-byte) header; `None` if the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: u64::from(be32(&b[24..28])),
        })
    }

    /// Decodes an extended (32-byte) header; `None` if the magic is wrong.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<RequestHeader> {
        if be32(&b[0..4]) != EXTENDED_REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be64(&b[24..32]),
        })
    }

    /// The compact encoding (the length must fit in 32 bits).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        let len = u32::try_from(self.len).expect("BUG: compact request over 4 GiB");
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[0..8].try_into().expect("BUG: be64 of fewer than 8 bytes"))
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk with `message`.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize - 8)];
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends an option reply header plus `data`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_and_checks_its_magic() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&b), Some(h));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(RequestHeader::decode(&bad), None);
        let mut ext = [0u8; EXTENDED_REQUEST_LEN];
        ext[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        ext[6..8].copy_from_slice(&CMD_TRIM.to_be_bytes());
        ext[24..32].copy_from_slice(&(5u64 << 32).to_be_bytes());
        let e = RequestHeader::decode_extended(&ext).unwrap();
        assert_eq!((e.kind, e.len), (CMD_TRIM, 5 << 32));
        assert_eq!(RequestHeader::decode(&b[..].try_into().unwrap()), Some(h));
    }

    #[test]
    fn errors_map_to_the_protocol_values() {
        assert_eq!(wire_error(Errno::EINVAL), EINVAL);
        assert_eq!(wire_error(Errno::ENOSPC), ENOSPC);
        assert_eq!(wire_error(Errno::EPERM), EPERM);
        assert_eq!(wire_error(Errno::ENOTSUP), ENOTSUP);
        assert_eq!(wire_error(Errno::ENODEV), ESHUTDOWN);
        assert_eq!(wire_error(Errno(libc::EBADF)), EIO);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        error_chunk(&mut out, 7, EINVAL, "bad");
        assert_eq!(out.len(), STRUCTURED_REPLY_LEN + 6 + 3);
        assert_eq!(be32(&out[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&out[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&out[6..8]), REPLY_TYPE_ERROR);
        assert_eq!(be64(&out[8..16]), 7);
        assert_eq!(be32(&out[16..20]), 9);
        assert_eq!(be32(&out[20..24]), EINVAL);
        assert_eq!(be16(&out[24..26]), 3);
        assert_eq!(&out[26..], b"bad");
    }
}
