//! What a client checks in a server's replies, as pure functions of bytes: the ranges structured
//! read chunks cover, the payloads of error and hole chunks, and block status extents.
//!
//! Invariants: every range a chunk names is checked against its request (checked arithmetic)
//! before a byte lands in the caller's buffer; the ranges one reply covers never overlap; memory
//! per request is bounded ([`MAX_PIECES`] ranges, [`MAX_EXTENTS`] extents) whatever the server
//! sends.

use super::proto::{self, errno};
use std::io;

/// Most disjoint pieces one read reply may arrive in before the client gives up on it (a server
/// sending its chunks in order needs one).
pub(crate) const MAX_PIECES: usize = 4096;
/// Most block status extents kept from one reply (the rest are read and dropped).
pub(crate) const MAX_EXTENTS: usize = 1024;
/// Largest payload of a chunk that carries no read data: an error chunk's header, a message of
/// at most `u16::MAX` bytes and an offset.
pub(crate) const MAX_META_CHUNK: u32 = 4 + 2 + u16::MAX as u32 + 8;

/// A protocol violation by the server: the connection can no longer be trusted.
pub(crate) fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The `io::Error` for an error number of the protocol (an OS error, so the caller can tell a
/// refused request from a broken connection).
pub(crate) fn errno_error(e: u32) -> io::Error {
    let os = match e {
        errno::EPERM => 1,
        errno::ENOMEM => 12,
        errno::EINVAL => 22,
        errno::ENOSPC => 28,
        errno::EOVERFLOW => 75,
        errno::ENOTSUP => 95,
        errno::ESHUTDOWN => 108,
        _ => 5,
    };
    io::Error::from_raw_os_error(os)
}

/// The parts of a read request that structured reply chunks have filled, as sorted, disjoint,
/// non-adjacent `[start, end)` ranges relative to the request's offset.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    runs: Vec<(u64, u64)>,
}

impl Coverage {
    /// Where in the request buffer the chunk for `offset..offset+n` goes, after checking that it
    /// lies inside the request `req_offset..req_offset+req_len`, is not empty and overlaps no
    /// earlier chunk; the range is then counted as covered.
    pub(crate) fn claim(
        &mut self,
        req_offset: u64,
        req_len: u64,
        offset: u64,
        n: u64,
    ) -> io::Result<std::ops::Range<usize>> {
        let start = offset
            .checked_sub(req_offset)
            .ok_or_else(|| proto_err("NBD server sent a chunk before the requested range"))?;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= req_len)
            .ok_or_else(|| proto_err("NBD server sent a chunk past the requested range"))?;
        if n == 0 {
            return Err(proto_err("NBD server sent an empty chunk"));
        }
        // The first run ending after `start`: the only one that could overlap or touch from the
        // right; its predecessor ends at or before `start` and is the only one touching the left.
        let i = self.runs.partition_point(|r| r.1 <= start);
        if let Some(r) = self.runs.get(i) {
            if r.0 < end && start < r.1 {
                return Err(proto_err("NBD server sent overlapping chunks"));
            }
        }
        let joins_left = i > 0 && self.runs[i - 1].1 == start;
        let joins_right = self.runs.get(i).is_some_and(|r| r.0 == end);
        match (joins_left, joins_right) {
            (true, true) => {
                self.runs[i - 1].1 = self.runs[i].1;
                self.runs.remove(i);
            }
            (true, false) => self.runs[i - 1].1 = end,
            (false, true) => self.runs[i].0 = start,
            (false, false) => {
                if self.runs.len() >= MAX_PIECES {
                    return Err(proto_err("NBD server split a read into too many pieces"));
                }
                self.runs.insert(i, (start, end));
            }
        }
        // Both ends fit in usize: they are within a request buffer of `req_len` bytes.
        Ok(start as usize..end as usize)
    }

    /// Whether the chunks cover all `len` bytes of the request.
    pub(crate) fn is_full(&self, len: u64) -> bool {
        len == 0 || self.runs.as_slice() == [(0, len)]
    }
}

/// An error chunk's payload: the error number and, for `NBD_REPLY_TYPE_ERROR_OFFSET`, the offset
/// it names. The message is checked for length and otherwise ignored.
pub(crate) fn parse_error(payload: &[u8], with_offset: bool) -> io::Result<(u32, Option<u64>)> {
    let mut c = proto::Cursor::new(payload);
    let (Some(err), Some(msg_len)) = (c.u32(), c.u16()) else {
        return Err(proto_err("NBD server sent a short error chunk"));
    };
    if c.bytes(usize::from(msg_len)).is_none() {
        return Err(proto_err(
            "NBD server sent an error message longer than its chunk",
        ));
    }
    let offset = if with_offset {
        Some(
            c.u64()
                .ok_or_else(|| proto_err("NBD server sent a short error chunk"))?,
        )
    } else {
        None
    };
    if !c.is_empty() {
        return Err(proto_err(
            "NBD server sent an error chunk of the wrong size",
        ));
    }
    if err == 0 {
        return Err(proto_err("NBD server sent an error chunk without an error"));
    }
    Ok((err, offset))
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` payload: `(offset, length)`.
pub(crate) fn parse_hole(payload: &[u8]) -> io::Result<(u64, u64)> {
    let mut c = proto::Cursor::new(payload);
    match (c.u64(), c.u32(), c.is_empty()) {
        (Some(o), Some(n), true) => Ok((o, u64::from(n))),
        _ => Err(proto_err("NBD server sent a hole chunk of the wrong size")),
    }
}

/// Block status extents of one context, as `(length, flags)`, clipped to the `len` bytes asked
/// for and capped at [`MAX_EXTENTS`].
#[derive(Debug, Default)]
pub(crate) struct Extents {
    /// The extents kept.
    pub(crate) list: Vec<(u64, u32)>,
    covered: u64,
}

impl Extents {
    /// Adds one extent off the wire; a zero length is a protocol error.
    pub(crate) fn push(&mut self, len: u32, flags: u32, asked: u64) -> io::Result<()> {
        if len == 0 {
            return Err(proto_err("NBD server sent an empty extent"));
        }
        let n = u64::from(len).min(asked.saturating_sub(self.covered));
        if n == 0 || self.list.len() >= MAX_EXTENTS {
            return Ok(());
        }
        self.covered += n;
        match self.list.last_mut() {
            Some(last) if last.1 == flags => last.0 += n,
            _ => self.list.push((n, flags)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_refuses_overlap_and_range_errors() {
        let mut c = Coverage::default();
        assert_eq!(c.claim(100, 30, 110, 10).ok(), Some(10..20));
        assert_eq!(c.claim(100, 30, 100, 10).ok(), Some(0..10));
        assert!(c.claim(100, 30, 105, 10).is_err(), "overlap");
        assert!(c.claim(100, 30, 119, 2).is_err(), "overlap at the end");
        assert!(c.claim(100, 30, 99, 2).is_err(), "before");
        assert!(c.claim(100, 30, 125, 6).is_err(), "past");
        assert!(c.claim(100, 30, u64::MAX, 6).is_err(), "wrapping");
        assert!(c.claim(100, 30, 125, 0).is_err(), "empty");
        assert!(!c.is_full(30));
        assert_eq!(c.claim(100, 30, 120, 10).ok(), Some(20..30));
        assert!(c.is_full(30));
    }

    #[test]
    fn coverage_caps_scattered_pieces() {
        let mut c = Coverage::default();
        let len = 2 * MAX_PIECES as u64 + 2;
        for i in 0..MAX_PIECES as u64 {
            assert!(c.claim(0, len, 2 * i, 1).is_ok());
        }
        assert!(c.claim(0, len, len - 1, 1).is_err());
        // Filling a gap joins two pieces and needs no new one.
        assert!(c.claim(0, len, 1, 1).is_ok());
    }

    #[test]
    fn error_and_hole_payloads() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"no");
        assert_eq!(parse_error(&p, false).ok(), Some((5, None)));
        assert!(parse_error(&p[..7], false).is_err());
        let mut q = p.clone();
        q.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_error(&q, true).ok(), Some((5, Some(7))));
        assert!(parse_error(&q, false).is_err());
        let mut z = p;
        z[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_error(&z, false).is_err());
        let mut h = 9u64.to_be_bytes().to_vec();
        h.extend_from_slice(&4u32.to_be_bytes());
        assert_eq!(parse_hole(&h).ok(), Some((9, 4)));
        assert!(parse_hole(&h[..11]).is_err());
    }

    #[test]
    fn extents_clip_merge_and_cap() {
        let mut e = Extents::default();
        assert!(e.push(0, 0, 100).is_err());
        e.push(10, 3, 100).expect("ok");
        e.push(10, 3, 100).expect("ok");
        e.push(500, 0, 100).expect("ok");
        e.push(5, 3, 100).expect("ok");
        assert_eq!(e.list, vec![(20, 3), (80, 0)]);
        let mut e = Extents::default();
        for i in 0..(MAX_EXTENTS as u32 + 10) {
            e.push(1, i % 2, u64::MAX).expect("ok");
        }
        assert_eq!(e.list.len(), MAX_EXTENTS);
    }
}
