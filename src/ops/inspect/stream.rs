//! Inspecting an upload as it streams in, with a fixed cap on the bytes kept.
//!
//! [`StreamInspector`] is fed the upload's bytes in order, in chunks of any size, and keeps:
//! - the first [`FACTS_HEAD_BYTES`] (2 MiB): every format's header, a qcow2 header cluster and
//!   its extensions, a VMDK descriptor, a VHDX region table, an ISO volume descriptor;
//! - up to [`MAX_REGIONS`] regions of at most [`REGION_BYTES`] each past the head, which facts in
//!   the head point to: a qcow2 backing file name, a VHDX metadata table and the items it lists.
//!   Once the head is complete, the inspector works out which regions it will need and keeps them
//!   as the stream passes them, following pointers from one region to the next;
//! - the last [`FACTS_TAIL_BYTES`] (1536) in a ring.
//!
//! That is at most [`MAX_KEPT_BYTES`] (2.5 MiB), whatever the upload's length. At the end of the
//! stream the same analysis as [`inspect`](super::inspect) runs over what was kept and gives the
//! same [`Inspection`].
//!
//! Facts that need the tail, or the length, are known only at the end: a fixed VHD's footer
//! (its only copy is the last 512 bytes: format, virtual size and disk type), a DMG trailer, a
//! stream-optimized VMDK's footer, a LUKS volume's size (the length less the payload offset), a
//! raw or partitioned disk's size, and the qcow2 checks of tables against the file's end. So the
//! inspection exists only once the stream has ended: [`InspectReader::inspection`] is `None`
//! until then. A region a fact needs that lies behind the stream when its pointer is found, and
//! not in the kept head (a hostile file can point backwards), or a region that does not fit the
//! cap, is not guessed at: the inspection is then marked incomplete
//! ([`Inspection::complete`] false) and every policy refuses it ([`Violation::Incomplete`]).
//!
//! [`Violation::Incomplete`]: super::Violation::Incomplete

use super::source::Source;
use super::{analyze, Inspection, FACTS_HEAD_BYTES, FACTS_TAIL_BYTES};
use crate::error::Result;
use std::collections::VecDeque;
use std::io::{self, Read};

/// Most regions past the head kept at once.
pub const MAX_REGIONS: usize = 8;
/// Largest region past the head kept (a VHDX metadata table).
pub const REGION_BYTES: usize = 64 << 10;
/// The cap on the bytes a [`StreamInspector`] keeps.
pub const MAX_KEPT_BYTES: usize = FACTS_HEAD_BYTES + MAX_REGIONS * REGION_BYTES + FACTS_TAIL_BYTES;

/// Bytes at `offset` the inspector keeps as they stream past.
#[derive(Debug)]
struct Region {
    offset: u64,
    len: usize,
    data: Vec<u8>,
}

impl Region {
    fn complete(&self) -> bool {
        self.data.len() == self.len
    }

    /// Takes what the region still lacks from `chunk`, which holds the stream's bytes from
    /// `start`.
    fn capture(&mut self, chunk: &[u8], start: u64) {
        let next = self.offset + self.data.len() as u64;
        let end = start + chunk.len() as u64;
        if self.complete() || next < start || next >= end {
            return;
        }
        let from = (next - start) as usize;
        let n = (self.len - self.data.len()).min(chunk.len() - from);
        self.data.extend_from_slice(&chunk[from..from + n]);
    }
}

/// A push-style streaming inspector: [`feed`](StreamInspector::feed) every byte of the upload
/// in order, then [`finish`](StreamInspector::finish).
#[derive(Debug, Default)]
pub struct StreamInspector {
    pos: u64,
    head: Vec<u8>,
    regions: Vec<Region>,
    tail: VecDeque<u8>,
    /// A region a fact needed was not kept.
    lost: bool,
}

impl StreamInspector {
    /// An inspector at the start of a stream.
    pub fn new() -> Self {
        StreamInspector::default()
    }

    /// Bytes seen so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes kept now (never more than [`MAX_KEPT_BYTES`]).
    pub fn kept_bytes(&self) -> usize {
        self.head.len() + self.regions.iter().map(|r| r.data.len()).sum::<usize>() + self.tail.len()
    }

    /// Takes the stream's next bytes.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let start = self.pos;
        self.pos += chunk.len() as u64;
        let head_was_full = self.head.len() == FACTS_HEAD_BYTES;
        let take = (FACTS_HEAD_BYTES - self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        let mut completed = false;
        for r in &mut self.regions {
            let was = r.complete();
            r.capture(chunk, start);
            completed |= !was && r.complete();
        }
        let keep = chunk.len().min(FACTS_TAIL_BYTES);
        self.tail.extend(&chunk[chunk.len() - keep..]);
        let excess = self.tail.len().saturating_sub(FACTS_TAIL_BYTES);
        self.tail.drain(..excess);
        let head_now_full = !head_was_full && self.head.len() == FACTS_HEAD_BYTES;
        let mut replan = head_now_full || completed;
        // Each round either registers a region or stops; the region count bounds the rounds.
        while replan {
            replan = self.plan(chunk, start);
        }
    }

    /// Ends the stream: the inspection of everything fed.
    pub fn finish(&self) -> Inspection {
        let mut src = Kept {
            s: self,
            at_end: true,
            wanted: Vec::new(),
        };
        // A kept-bytes source never fails: reads it cannot serve are `None`.
        let mut ins = match analyze(&mut src) {
            Ok(i) => i,
            Err(_) => unreachable_analysis(self.pos),
        };
        ins.complete = !self.lost && src.wanted.is_empty();
        ins
    }

    /// Runs the analysis over what is kept and registers the regions it asks for that are not;
    /// returns whether a newly registered region is already complete (its pointer came late, or
    /// it lies in this chunk), so that the analysis must run again.
    fn plan(&mut self, chunk: &[u8], start: u64) -> bool {
        let mut src = Kept {
            s: self,
            at_end: false,
            wanted: Vec::new(),
        };
        let _ = analyze(&mut src);
        let wanted = src.wanted;
        let mut again = false;
        for (offset, len) in wanted {
            if self
                .regions
                .iter()
                .any(|r| r.offset == offset && r.len >= len)
            {
                continue;
            }
            if len > REGION_BYTES || self.regions.len() >= MAX_REGIONS {
                self.lost = true;
                continue;
            }
            let mut r = Region {
                offset,
                len,
                data: Vec::new(),
            };
            // Bytes of the region the stream has already passed must still be at hand.
            let passed = self.pos.min(offset + len as u64).saturating_sub(offset) as usize;
            if passed > 0 {
                match self.kept(offset, passed, chunk, start) {
                    Some(d) => r.data = d,
                    None => {
                        self.lost = true;
                        continue;
                    }
                }
            }
            again |= r.complete();
            self.regions.push(r);
        }
        again
    }

    /// `len` bytes at `offset` from the head, a region, or the current chunk.
    fn kept(&self, offset: u64, len: usize, chunk: &[u8], start: u64) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?;
        if end <= self.head.len() as u64 {
            return Some(self.head[offset as usize..end as usize].to_vec());
        }
        for r in &self.regions {
            if r.offset <= offset && end <= r.offset + r.data.len() as u64 {
                let from = (offset - r.offset) as usize;
                return Some(r.data[from..from + len].to_vec());
            }
        }
        // From the head and then the chunk, or from the chunk alone.
        let head_len = self.head.len() as u64;
        let from_head = if offset < head_len {
            &self.head[offset as usize..]
        } else {
            &[][..]
        };
        let rest = offset + from_head.len() as u64;
        if start <= rest && end <= start + chunk.len() as u64 {
            let mut v = from_head.to_vec();
            v.extend_from_slice(&chunk[(rest - start) as usize..(end - start) as usize]);
            return Some(v);
        }
        None
    }
}

/// The analysis only fails on I/O errors, which a kept-bytes source never returns; should it
/// ever, the inspection is of an empty, incomplete file rather than a panic.
fn unreachable_analysis(pos: u64) -> Inspection {
    Inspection {
        file_size: pos,
        detected: Vec::new(),
        qcow2: None,
        formats: Vec::new(),
        complete: false,
    }
}

/// What a [`StreamInspector`] kept, as a [`Source`]. Before the end the file's length is
/// unknown (`u64::MAX`), the tail is not yet known, and reads not served are recorded as wanted.
struct Kept<'a> {
    s: &'a StreamInspector,
    at_end: bool,
    wanted: Vec<(u64, usize)>,
}

impl Source for Kept<'_> {
    fn file_size(&self) -> u64 {
        if self.at_end {
            self.s.pos
        } else {
            u64::MAX
        }
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let end = offset.saturating_add(len as u64).min(self.file_size());
        if end <= offset {
            return Ok(Some(Vec::new()));
        }
        let n = (end - offset) as usize;
        if end <= self.s.head.len() as u64 {
            return Ok(Some(self.s.head[offset as usize..end as usize].to_vec()));
        }
        for r in &self.s.regions {
            if r.offset <= offset && end <= r.offset + r.data.len() as u64 {
                let from = (offset - r.offset) as usize;
                return Ok(Some(r.data[from..from + n].to_vec()));
            }
        }
        if self.at_end {
            let tail_start = self.s.pos - self.s.tail.len() as u64;
            if offset >= tail_start {
                let from = (offset - tail_start) as usize;
                return Ok(Some(self.s.tail.range(from..from + n).copied().collect()));
            }
        }
        self.wanted.push((offset, len));
        Ok(None)
    }

    fn tail(&mut self, len: usize) -> Result<Option<Vec<u8>>> {
        if !self.at_end {
            return Ok(None);
        }
        let n = len.min(self.s.tail.len());
        if n < len && (self.s.tail.len() as u64) < self.s.pos {
            self.wanted
                .push((self.s.pos.saturating_sub(len as u64), len));
            return Ok(None);
        }
        let from = self.s.tail.len() - n;
        Ok(Some(self.s.tail.range(from..).copied().collect()))
    }
}

/// A reader that hands every byte of `R` through unchanged and inspects them on the way, keeping
/// at most [`MAX_KEPT_BYTES`].
///
/// ```
/// use qcow2kit::ops::inspect::{InspectReader, Policy};
/// use qcow2kit::Format;
/// use std::io::Read;
///
/// let upload = vec![0u8; 1 << 20];
/// let mut r = InspectReader::new(&upload[..]);
/// let mut copy = Vec::new();
/// r.read_to_end(&mut copy)?;
/// assert_eq!(copy, upload);
/// let ins = r.inspection().expect("the stream has ended");
/// assert_eq!((ins.format(), ins.virtual_size()), (Format::Raw, Some(1 << 20)));
/// assert!(ins.check(&Policy::strict().declared(Format::Raw)).is_empty());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct InspectReader<R> {
    inner: R,
    inspector: StreamInspector,
    done: Option<Inspection>,
}

impl<R: Read> InspectReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        InspectReader {
            inner,
            inspector: StreamInspector::new(),
            done: None,
        }
    }

    /// The inspection, once a read has returned the end of the stream; `None` before.
    pub fn inspection(&self) -> Option<&Inspection> {
        self.done.as_ref()
    }

    /// Bytes handed through so far.
    pub fn position(&self) -> u64 {
        self.inspector.position()
    }

    /// Bytes the inspector keeps now (never more than [`MAX_KEPT_BYTES`]).
    pub fn kept_bytes(&self) -> usize {
        self.inspector.kept_bytes()
    }

    /// Ends inspection: the inspection of the whole stream if it was read to its end, else of
    /// the bytes read so far, as if the stream ended there; and the inner reader.
    pub fn finish(self) -> (Inspection, R) {
        let ins = self.done.unwrap_or_else(|| self.inspector.finish());
        (ins, self.inner)
    }
}

impl<R: Read> Read for InspectReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.inspector.feed(&buf[..n]);
        } else if !buf.is_empty() && self.done.is_none() {
            self.done = Some(self.inspector.finish());
        }
        Ok(n)
    }
}
