//! The NBD wire protocol: magic numbers, option, command and reply codes, and the fixed-size
//! headers as pure encode/decode functions (no I/O). Values are those of the protocol document
//! (`doc/proto.md` of the NetworkBlockDevice project); every integer is big-endian.

/// `NBDMAGIC`: the first eight bytes a server sends.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: starts the newstyle handshake and every client option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const FLAG_NO_ZEROES: u16 = 2;

/// Option codes.
pub(crate) mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub(crate) const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub(crate) const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub(crate) const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub(crate) const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub(crate) const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub(crate) const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub(crate) const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub(crate) const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub(crate) const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub(crate) mod rep {
    /// `NBD_REP_ACK`.
    pub(crate) const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub(crate) const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub(crate) const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub(crate) const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP`.
    pub(crate) const ERR_UNSUP: u32 = 0x8000_0001;
    /// `NBD_REP_ERR_POLICY`.
    pub(crate) const ERR_POLICY: u32 = 0x8000_0002;
    /// `NBD_REP_ERR_INVALID`.
    pub(crate) const ERR_INVALID: u32 = 0x8000_0003;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub(crate) const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub(crate) const ERR_TOO_BIG: u32 = 0x8000_0009;
}

/// Information types of `NBD_REP_INFO`.
pub(crate) mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub(crate) const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub(crate) const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub(crate) const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub(crate) const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub(crate) mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub(crate) const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub(crate) const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub(crate) const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub(crate) const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`.
    pub(crate) const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub(crate) const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub(crate) const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub(crate) const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`.
    pub(crate) const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub(crate) const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub(crate) mod cmd {
    /// `NBD_CMD_READ`.
    pub(crate) const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub(crate) const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub(crate) const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub(crate) const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub(crate) const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub(crate) const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub(crate) const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub(crate) const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub(crate) mod cflag {
    /// `NBD_CMD_FLAG_FUA`.
    pub(crate) const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub(crate) const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub(crate) const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub(crate) const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub(crate) const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub(crate) mod chunk {
    /// `NBD_REPLY_FLAG_DONE`.
    pub(crate) const FLAG_DONE: u16 = 1;
    /// `NBD_REPLY_TYPE_NONE`.
    pub(crate) const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub(crate) const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub(crate) const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub(crate) const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub(crate) const ERROR: u16 = 0x8001;
}

/// Error values carried in replies (the protocol's own numbering).
pub(crate) mod errno {
    /// `NBD_EPERM`.
    pub(crate) const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub(crate) const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub(crate) const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub(crate) const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub(crate) const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub(crate) const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub(crate) const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub(crate) const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` state flag: the range is a hole.
pub(crate) const STATE_HOLE: u32 = 1;
/// `base:allocation` state flag: the range reads as zeros.
pub(crate) const STATE_ZERO: u32 = 2;

/// The context names the server offers.
pub(crate) const CTX_BASE_ALLOCATION: &str = "base:allocation";
/// qemu's allocation depth context: 0 unallocated, 1 the top layer, 2 its backing file, …
pub(crate) const CTX_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of qemu's dirty-bitmap contexts, `qemu:dirty-bitmap:NAME`.
pub(crate) const CTX_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// A dirty-bitmap context's flag: the range was written since the bitmap was created or cleared.
pub(crate) const STATE_DIRTY: u32 = 1;

/// Largest request payload (read or write) either side handles: qemu-nbd's 32 MiB.
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload the server reads into memory (longer ones are drained and refused).
pub(crate) const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest name or query string accepted (qemu's `NBD_MAX_STRING_SIZE`).
pub(crate) const MAX_STRING: u32 = 4096;

/// Length of a request header.
pub(crate) const REQUEST_LEN: usize = 28;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    /// Command flags.
    pub(crate) flags: u16,
    /// Command type.
    pub(crate) kind: u16,
    /// The client's cookie, echoed in the reply.
    pub(crate) cookie: u64,
    /// Offset in the export.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u32,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Request {
    /// Decodes a request header; `None` when the magic is wrong.
    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(b, 0) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        })
    }

    /// Encodes the header.
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header.
pub(crate) fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub(crate) fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply header for a payload of `len` bytes.
pub(crate) fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Reads big-endian fields off the front of a byte slice, refusing to run past its end.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `b`.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Cursor { rest: b }
    }

    /// The next `n` bytes, or `None` past the end.
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    /// The next `u16`.
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| be16(b, 0))
    }

    /// The next `u32`.
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| be32(b, 0))
    }

    /// The next `u64`.
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| be64(b, 0))
    }

    /// A string prefixed by its `u32` length, at most [`MAX_STRING`] bytes.
    pub(crate) fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        if n > MAX_STRING {
            return None;
        }
        self.bytes(n as usize)
    }

    /// Whether every byte was consumed.
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn cursor_stops_at_end_and_caps_strings() {
        let mut c = Cursor::new(&[0, 0, 0, 2, b'a']);
        assert_eq!(c.string(), None);
        let big = (MAX_STRING + 1).to_be_bytes();
        assert_eq!(Cursor::new(&big).string(), None);
        let mut c = Cursor::new(&[0, 1, 0, 0, 0, 7]);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u32(), Some(7));
        assert!(c.is_empty());
        assert_eq!(c.u16(), None);
    }
}
