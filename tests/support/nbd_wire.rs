//! The NBD protocol's numbers, written out here from the protocol document
//! (`NetworkBlockDevice/nbd` `doc/proto.md`) rather than taken from the library, so that the
//! tests that speak the protocol to our server check it against the specification, not
//! against itself.

#![allow(dead_code)]

/// `NBDMAGIC`, the server's first eight bytes.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, before every option the client sends.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Before every option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Before every request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Before every simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Option types (`NBD_OPT_*`).
pub(crate) mod opt {
    pub(crate) const ABORT: u32 = 2;
    pub(crate) const LIST: u32 = 3;
    pub(crate) const GO: u32 = 7;
    pub(crate) const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub(crate) mod rep {
    pub(crate) const ACK: u32 = 1;
    pub(crate) const INFO: u32 = 3;
    pub(crate) const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub(crate) const ERR_INVALID: u32 = (1 << 31) + 3;
    pub(crate) const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Command types (`NBD_CMD_*`).
pub(crate) mod cmd {
    pub(crate) const READ: u16 = 0;
    pub(crate) const WRITE: u16 = 1;
    pub(crate) const FLUSH: u16 = 3;
    pub(crate) const TRIM: u16 = 4;
    pub(crate) const WRITE_ZEROES: u16 = 6;
    pub(crate) const BLOCK_STATUS: u16 = 7;
}

/// Error values of replies (`NBD_E*`).
pub(crate) mod errno {
    pub(crate) const EPERM: u32 = 1;
    pub(crate) const EINVAL: u32 = 22;
    pub(crate) const ENOSPC: u32 = 28;
}

/// A transmission request.
pub(crate) struct Request {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub(crate) fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}
