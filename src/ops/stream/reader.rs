//! The streamed qcow2 reader: an image read once, front to back, from any [`std::io::Read`].
//!
//! Accepted are images whose every reference points forward: the L1 table lies after cluster 0,
//! each L2 table after the L1 table, each data cluster after the L2 table that maps it, as
//! [`write_qcow2_stream`](super::write_qcow2_stream) lays them out; or wholly inside the
//! cluster just before that table, where QEMU packs compressed clusters into what is left of
//! the last one after allocating their table (the reader keeps that cluster when it reads an L2
//! table). Images made by qemu-img 10 qualify when every L2 table was allocated before the data
//! it maps and after the L1 table: `qemu-img convert -O qcow2` (plain, `-c` zlib or zstd, any
//! cluster size, extended L2), `qemu-img create` (also with `preallocation=metadata`) followed
//! by writes in any order, discards and rewrites, persistent bitmaps added. Refused:
//! `preallocation=full` (QEMU puts the L2 tables before the L1 table), an L2 table copied after
//! an internal snapshot (it maps older data), an L1 table moved by a resize. The error names the
//! first reference found pointing back into what was already read; nothing is buffered beyond
//! two clusters (or one cluster and one compressed cluster's sectors).
//!
//! Memory: the L1 table (with the order of its L2 tables when they are not in ascending order
//! already), and the queue of what the L2 tables read so far point to and the stream has not
//! reached yet; never the data. The queue takes 32 bytes per entry, and clusters that follow
//! each other both in the guest and in the file (with the same subcluster bitmap) share one
//! entry. With the streamed writer's layout (each L2 table just before the data it maps) it
//! holds one L2 table's worth at most. An image with every L2 table first holds everything
//! those tables map: one entry per table for contiguous data, one per cluster for compressed
//! or scattered data. The queue is capped ([`StreamReader::set_max_pending`], default
//! [`DEFAULT_MAX_PENDING`]): a stream that maps more entries ahead of their data is refused
//! with an error saying so, so that a hostile stream cannot grow it without bound.

use crate::codec::decompress_cluster;
use crate::error::{Corruption, Error, Result};
use crate::format::bytes::{be_u32, be_u64};
use crate::format::entry::{classify, ClusterKind, SubclusterBitmap, SubclusterState};
use crate::format::header::{CryptMethod, Header};
use crate::format::{parse_first_cluster, MAX_CLUSTER_BITS, MAX_HOST_OFFSET, MIN_CLUSTER_BITS};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;

/// Default cap on the entries queued ahead of the stream position: 512 Ki, 16 MiB of queue
/// (issue 16 bounds a convert's peak memory at 32 MiB). That is more than one L2 table of any
/// cluster size maps, and, for an image with every L2 table first, 32 GiB of compressed data
/// in 64 KiB clusters.
pub const DEFAULT_MAX_PENDING: usize = 512 << 10;

/// What lies at a host offset the reader still has to reach (besides the L2 tables, which the
/// L1 table lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// `count` data clusters one after the other, of guest clusters `guest..guest + count`,
    /// with their subcluster bitmap (extended L2).
    Data { guest: u64, bitmap: u64, count: u32 },
    /// A compressed cluster of guest cluster `guest`, `len` bytes at most.
    Compressed { guest: u64, len: u64 },
}

/// The L2 tables of an L1 table in the order of their host offsets.
struct Tables {
    /// Host offset of the L2 table of each L1 index (0: none).
    l1: Vec<u64>,
    /// The L1 indices with a table, by ascending host offset (`None`: the L1 table's order).
    order: Option<Vec<u32>>,
    /// Next position in that order.
    next: usize,
}

impl Tables {
    /// The next table to reach: its host offset and L1 index.
    fn peek(&mut self) -> Option<(u64, u64)> {
        loop {
            let i = match &self.order {
                Some(o) => u64::from(*o.get(self.next)?),
                None => self.next as u64,
            };
            let off = *self.l1.get(i as usize)?;
            if off != 0 {
                return Some((off, i));
            }
            self.next += 1;
        }
    }
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
    /// not lie before the first byte kept: the start of the last range handed out, or up to
    /// `behind` bytes before it when that range asked to keep them.
    fn range(&mut self, off: u64, len: u64, short_ok: bool, behind: u64) -> Result<&[u8]> {
        if off < self.start {
            return Err(stream_error(format!(
                "the image stream would have to go back to byte {off} from {}",
                self.start
            )));
        }
        let from = off.saturating_sub(behind).max(self.start);
        if from >= self.end() {
            // Skip the gap without keeping it.
            let mut gap = from - self.end();
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
            let drop = (from - self.start) as usize;
            self.buf.drain(..drop);
            self.start = from;
        }
        let skip = (off - self.start) as usize;
        let want = skip + len as usize;
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
        let n = want.min(self.buf.len()).max(skip);
        Ok(&self.buf[skip..n])
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
        let first = window.range(0, 512, false, 0)?;
        let bits = be_u32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            // Let the header parser name what is wrong (magic first).
            parse_first_cluster(first)?;
            return Err(stream_error(format!("invalid cluster_bits {bits}")));
        }
        let cluster0 = window.range(0, 1 << bits, false, 0)?;
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
        let size = h.size;
        let extended = h.has_extended_l2();
        let compression = h.compression_type;
        let mut tables = self.read_l1()?;
        let mut queue: BinaryHeap<Reverse<(u64, Item)>> = BinaryHeap::new();
        let mut out = vec![0u8; cs as usize];
        loop {
            let next = queue.peek().map(|r| r.0 .0);
            if let Some((t, l1_index)) = tables.peek().filter(|&(t, _)| next.is_none_or(|o| t <= o))
            {
                tables.next += 1;
                self.queue_table(t, l1_index, &mut queue)?;
                continue;
            }
            let Some(Reverse((off, item))) = queue.pop() else {
                return Ok(());
            };
            match item {
                Item::Data {
                    guest,
                    bitmap,
                    count,
                } => {
                    if count > 1 {
                        let rest = Item::Data {
                            guest: guest + 1,
                            bitmap,
                            count: count - 1,
                        };
                        queue.push(Reverse((off + cs, rest)));
                    }
                    let data = self.window.range(off, cs, false, 0)?;
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
                    let data = self.window.range(off, len, true, 0)?;
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
    }

    /// Reads the L2 table of `l1_index` at host offset `t` and queues the data it maps.
    fn queue_table(
        &mut self,
        t: u64,
        l1_index: u64,
        queue: &mut BinaryHeap<Reverse<(u64, Item)>>,
    ) -> Result<()> {
        let h = &self.header;
        let cs = h.cluster_size();
        let (bits, size, extended) = (h.cluster_bits, h.size, h.has_extended_l2());
        let entry_size = h.l2_entry_size() as usize;
        let l2_entries = cs / entry_size as u64;
        // The cluster before the table is kept (from `kept` on): QEMU packs compressed clusters
        // into what is left of the last one even after allocating the L2 table that maps them.
        let kept = t.saturating_sub(cs).max(self.window.start);
        let table = self.window.range(t, cs, false, cs)?;
        let mut runs = RunQueue {
            queue,
            max: self.max_pending,
            cs,
            run: None,
        };
        for j in 0..l2_entries {
            let guest = l1_index * l2_entries + j;
            if guest * cs >= size {
                break;
            }
            let at = j as usize * entry_size;
            let raw = be_u64(table, at);
            let bitmap = if extended { be_u64(table, at + 8) } else { 0 };
            let (host, len, next) = match classify(raw, bits, extended, false) {
                ClusterKind::Unallocated | ClusterKind::Zero { .. } => continue,
                ClusterKind::Normal { host } => {
                    if extended && bitmap & 0xffff_ffff == 0 {
                        continue;
                    }
                    let count = 1;
                    (
                        host,
                        cs,
                        Item::Data {
                            guest,
                            bitmap,
                            count,
                        },
                    )
                }
                ClusterKind::Compressed(d) => {
                    let len = d.stored_len();
                    (d.host_offset, len, Item::Compressed { guest, len })
                }
            };
            // Forward of the table, or wholly in the part of the stream kept before it.
            if host < kept || (host < t + cs && host.saturating_add(len) > t) {
                return Err(backward(
                    &format!("the data of guest offset {}", guest * cs),
                    host,
                    "its L2 table",
                    t,
                ));
            }
            runs.push(host, next)?;
        }
        runs.flush()
    }

    /// Reads the L1 table and orders its L2 tables by host offset.
    fn read_l1(&mut self) -> Result<Tables> {
        let h = &self.header;
        let cs = h.cluster_size();
        let span = cs * (cs / h.l2_entry_size());
        let l1_off = h.l1_table_offset;
        let l1_len = u64::from(h.l1_size) * 8;
        let mut l1 = Vec::new();
        if l1_len > 0 {
            if l1_off < cs {
                return Err(backward("the L1 table", l1_off, "cluster 0", 0));
            }
            let raw = self.window.range(l1_off, l1_len, false, 0)?;
            for i in 0..u64::from(h.l1_size) {
                let mut e = be_u64(raw, i as usize * 8) & crate::format::entry::OFFSET_MASK;
                if i.saturating_mul(span) >= h.size {
                    e = 0;
                }
                if e != 0 && e < l1_off + l1_len {
                    return Err(backward(
                        &format!("the L2 table of L1 entry {i}"),
                        e,
                        "the L1 table",
                        l1_off,
                    ));
                }
                l1.push(e);
            }
        }
        let ascending = l1
            .iter()
            .filter(|&&e| e != 0)
            .try_fold(0u64, |last, &e| (e > last).then_some(e))
            .is_some();
        let order = (!ascending).then(|| {
            let mut o: Vec<u32> = (0..l1.len() as u32)
                .filter(|&i| l1[i as usize] != 0)
                .collect();
            o.sort_by_key(|&i| (l1[i as usize], i));
            o
        });
        Ok(Tables { l1, order, next: 0 })
    }
}

/// Queues the data an L2 table maps, clusters that follow each other on both sides merged
/// into one run, and caps the queue.
struct RunQueue<'q> {
    queue: &'q mut BinaryHeap<Reverse<(u64, Item)>>,
    max: usize,
    cs: u64,
    /// The run being extended: its host offset and item.
    run: Option<(u64, Item)>,
}

impl RunQueue<'_> {
    fn push(&mut self, host: u64, item: Item) -> Result<()> {
        if let (
            Some((
                start,
                Item::Data {
                    guest,
                    bitmap,
                    count,
                },
            )),
            Item::Data {
                guest: g,
                bitmap: b,
                ..
            },
        ) = (&mut self.run, item)
        {
            let n = u64::from(*count);
            if g == *guest + n && b == *bitmap && host == *start + n * self.cs && *count < u32::MAX
            {
                *count += 1;
                return Ok(());
            }
        }
        self.flush()?;
        self.run = Some((host, item));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(x) = self.run.take() {
            if self.queue.len() >= self.max {
                return Err(Error::Unsupported(format!(
                    "streams that map more than {} clusters ahead of their data",
                    self.max
                )));
            }
            self.queue.push(Reverse(x));
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
