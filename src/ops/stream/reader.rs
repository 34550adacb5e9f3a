//! The streamed qcow2 reader: an image read once, front to back, from any [`std::io::Read`].
//!
//! Accepted are images whose every reference points forward: the L1 table lies after cluster 0,
//! each L2 table after the L1 table, each data cluster after the L2 table that maps it — as
//! [`write_qcow2_stream`](super::write_qcow2_stream) lays them out. Images made by qemu-img
//! 10 qualify when every L2 table was allocated before the data it maps and after the L1
//! table: `qemu-img convert -O qcow2` (plain, `-c` zlib or zstd, extended L2),
//! `qemu-img create` (also with `preallocation=metadata`) followed by writes in any order,
//! discards and rewrites, persistent bitmaps added. Refused: `preallocation=full` (QEMU puts
//! the L2 tables before the L1 table), an L2 table copied after an internal snapshot (it maps
//! older data), an L1 table moved by a resize. The error names the first reference found
//! pointing back into what was already read; nothing is buffered beyond one cluster (or one
//! compressed cluster's sectors).
//!
//! Memory: the L1 table, and the queue of what the L2 tables read so far point to and the
//! stream has not reached yet (32 bytes per mapped cluster, a few times the tables
//! themselves); never the data. The queue is capped ([`StreamReader::set_max_pending`],
//! default [`DEFAULT_MAX_PENDING`]): a stream that maps more clusters ahead of their data is
//! refused, so a hostile stream cannot grow it without bound.

use crate::codec::decompress_cluster;
use crate::error::{Corruption, Error, Result};
use crate::format::bytes::{be_u32, be_u64};
use crate::format::entry::{classify, ClusterKind, SubclusterBitmap, SubclusterState};
use crate::format::header::{CryptMethod, Header};
use crate::format::{parse_first_cluster, MAX_CLUSTER_BITS, MAX_HOST_OFFSET, MIN_CLUSTER_BITS};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;

/// Default cap on the references queued ahead of the stream position: 16 Mi (512 MiB of
/// queue; every cluster of a 1 TiB image of 64 KiB clusters mapped before its data).
pub const DEFAULT_MAX_PENDING: usize = 16 << 20;

/// What lies at a host offset the reader still has to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// An L2 table, mapping the guest clusters from this L1 index on.
    L2 { l1_index: u64 },
    /// A data cluster of guest cluster `guest`, with its subcluster bitmap (extended L2).
    Data { guest: u64, bitmap: u64 },
    /// A compressed cluster of guest cluster `guest`, `len` bytes at most.
    Compressed { guest: u64, len: u64 },
}

fn stream_error(msg: String) -> Error {
    Error::Corrupt(Corruption::Inconsistent(msg))
}

/// A forward-only window over the input: bytes before the last range handed out are gone.
struct Window<'a> {
    inner: &'a mut dyn Read,
    /// Host offset of `buf[0]`.
    start: u64,
    buf: Vec<u8>,
    eof: bool,
}

impl Window<'_> {
    /// Host offset up to which the input has been consumed.
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// The bytes `off..off + len` (fewer when the input ends first and `short_ok`). `off` must
    /// not lie before the last range handed out.
    fn range(&mut self, off: u64, len: u64, short_ok: bool) -> Result<&[u8]> {
        if off < self.start {
            return Err(stream_error(format!(
                "the image stream would have to go back to byte {off} from {}",
                self.start
            )));
        }
        if off >= self.end() {
            // Skip the gap without keeping it.
            let mut gap = off - self.end();
            let mut scratch = [0u8; 64 << 10];
            self.start = self.end();
            self.buf.clear();
            while gap > 0 && !self.eof {
                let n = gap.min(scratch.len() as u64) as usize;
                let got = self.fill(&mut scratch[..n])?;
                gap -= got as u64;
                self.start += got as u64;
            }
        } else {
            let drop = (off - self.start) as usize;
            self.buf.drain(..drop);
            self.start = off;
        }
        let want = len as usize;
        while self.buf.len() < want && !self.eof {
            let have = self.buf.len();
            self.buf.resize(want, 0);
            let got = {
                let (_, tail) = self.buf.split_at_mut(have);
                Self::read_some(self.inner, tail, &mut self.eof)?
            };
            self.buf.truncate(have + got);
        }
        if self.buf.len() < want && !short_ok {
            return Err(stream_error(format!(
                "the image stream ends at byte {} inside a structure at {off} of {len} bytes",
                self.end()
            )));
        }
        let n = want.min(self.buf.len());
        Ok(&self.buf[..n])
    }

    fn fill(&mut self, b: &mut [u8]) -> Result<usize> {
        Self::read_some(self.inner, b, &mut self.eof)
    }

    fn read_some(inner: &mut dyn Read, b: &mut [u8], eof: &mut bool) -> Result<usize> {
        loop {
            match inner.read(b) {
                Ok(0) => {
                    *eof = true;
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("reading the image stream", e)),
            }
        }
    }
}

/// A qcow2 image being read from a stream: its header read, its clusters still to come.
pub struct StreamReader<'a> {
    window: Window<'a>,
    header: Header,
    max_pending: usize,
}

impl std::fmt::Debug for StreamReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("header", &self.header)
            .field("position", &self.window.end())
            .finish()
    }
}

impl<'a> StreamReader<'a> {
    /// Reads and checks the header (cluster 0). Refused: encrypted images, external data
    /// files and backing files (nothing can be opened beside a stream).
    pub fn open(input: &'a mut dyn Read) -> Result<Self> {
        let mut window = Window {
            inner: input,
            start: 0,
            buf: Vec::new(),
            eof: false,
        };
        let first = window.range(0, 512, false)?;
        let bits = be_u32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            // Let the header parser name what is wrong (magic first).
            parse_first_cluster(first)?;
            return Err(stream_error(format!("invalid cluster_bits {bits}")));
        }
        let cluster0 = window.range(0, 1 << bits, false)?;
        let (header, _ext) = parse_first_cluster(cluster0)?;
        header.validate(MAX_HOST_OFFSET)?;
        if header.crypt_method != CryptMethod::None {
            return Err(Error::Unsupported("encrypted images in a stream".into()));
        }
        if header.has_data_file() {
            return Err(Error::Unsupported(
                "images with an external data file in a stream".into(),
            ));
        }
        if header.backing_file_offset != 0 {
            return Err(Error::Unsupported(
                "images with a backing file in a stream".into(),
            ));
        }
        Ok(StreamReader {
            window,
            header,
            max_pending: DEFAULT_MAX_PENDING,
        })
    }

    /// Caps the references queued ahead of the stream position (see the module's notes).
    pub fn set_max_pending(&mut self, max: usize) {
        self.max_pending = max;
    }

    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Reads the rest of the stream and hands every guest cluster holding data to `put`
    /// (guest offset, bytes; the last cluster cut at the virtual size), in the order of the
    /// stream. Clusters not handed out read as zeros.
    pub fn copy_to(mut self, mut put: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let h = &self.header;
        let cs = h.cluster_size();
        let bits = h.cluster_bits;
        let size = h.size;
        let extended = h.has_extended_l2();
        let entry_size = h.l2_entry_size() as usize;
        let l2_entries = cs / entry_size as u64;
        let compression = h.compression_type;
        let l1_off = h.l1_table_offset;
        let l1_len = u64::from(h.l1_size) * 8;
        let mut queue: BinaryHeap<Reverse<(u64, Item)>> = BinaryHeap::new();
        if l1_len > 0 {
            if l1_off < cs {
                return Err(backward("the L1 table", l1_off, "cluster 0", 0));
            }
            let l1 = self.window.range(l1_off, l1_len, false)?.to_vec();
            for i in 0..u64::from(h.l1_size) {
                let e = be_u64(&l1, i as usize * 8) & crate::format::entry::OFFSET_MASK;
                if e == 0 || i * l2_entries * cs >= size {
                    continue;
                }
                if e < l1_off + l1_len {
                    return Err(backward(
                        &format!("the L2 table of L1 entry {i}"),
                        e,
                        "the L1 table",
                        l1_off,
                    ));
                }
                queue.push(Reverse((e, Item::L2 { l1_index: i })));
            }
        }
        let mut out = vec![0u8; cs as usize];
        while let Some(Reverse((off, item))) = queue.pop() {
            match item {
                Item::L2 { l1_index } => {
                    let table = self.window.range(off, cs, false)?;
                    for j in 0..l2_entries {
                        let guest = l1_index * l2_entries + j;
                        if guest * cs >= size {
                            break;
                        }
                        let at = j as usize * entry_size;
                        let raw = be_u64(table, at);
                        let bitmap = if extended { be_u64(table, at + 8) } else { 0 };
                        let (host, next) = match classify(raw, bits, extended, false) {
                            ClusterKind::Unallocated | ClusterKind::Zero { .. } => continue,
                            ClusterKind::Normal { host } => {
                                if extended && bitmap & 0xffff_ffff == 0 {
                                    continue;
                                }
                                (host, Item::Data { guest, bitmap })
                            }
                            ClusterKind::Compressed(d) => (
                                d.host_offset,
                                Item::Compressed {
                                    guest,
                                    len: d.stored_len(),
                                },
                            ),
                        };
                        if host < off + cs {
                            return Err(backward(
                                &format!("the data of guest offset {}", guest * cs),
                                host,
                                "its L2 table",
                                off,
                            ));
                        }
                        if queue.len() >= self.max_pending {
                            return Err(Error::Unsupported(format!(
                                "streams that map more than {} clusters ahead of their data",
                                self.max_pending
                            )));
                        }
                        queue.push(Reverse((host, next)));
                    }
                }
                Item::Data { guest, bitmap } => {
                    let data = self.window.range(off, cs, false)?;
                    out.copy_from_slice(data);
                    if extended {
                        let sub = cs / 32;
                        let b = SubclusterBitmap(bitmap);
                        for i in 0..32u32 {
                            if b.state(i) != SubclusterState::Allocated {
                                let s = (u64::from(i) * sub) as usize;
                                out[s..s + sub as usize].fill(0);
                            }
                        }
                    }
                    let n = cs.min(size - guest * cs) as usize;
                    put(guest * cs, &out[..n])?;
                }
                Item::Compressed { guest, len } => {
                    let data = self.window.range(off, len, true)?;
                    decompress_cluster(compression, data, &mut out).map_err(|e| {
                        stream_error(format!(
                            "compressed cluster of guest offset {} at host offset {off}: {e}",
                            guest * cs
                        ))
                    })?;
                    let n = cs.min(size - guest * cs) as usize;
                    put(guest * cs, &out[..n])?;
                }
            }
        }
        Ok(())
    }
}

/// The error for a reference to `what` at host offset `at`, which lies before (or inside)
/// `from` at `from_at`, already read.
fn backward(what: &str, at: u64, from: &str, from_at: u64) -> Error {
    stream_error(format!(
        "the image is not laid out for streaming: {what} lies at host offset {at:#x}, before \
         the end of {from} at {from_at:#x}, which the stream has already passed"
    ))
}
