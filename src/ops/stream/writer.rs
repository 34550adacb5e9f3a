//! The streamed qcow2 writer: plan from the allocation map, then one forward pass.

use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::error::{Error, Result};
use crate::format::bytes::put_u64;
use crate::format::entry::{encode_normal, COPIED, ZERO};
use crate::format::refcount;
use crate::format::MAX_L1_BYTES;
use crate::ops::convert::default_workers;
use crate::ops::create::{new_cluster0, Compat, CreateOptions, Preallocation};
use crate::ops::stream::chunks::{for_each_chunk, ZeroMap};
use crate::ops::stream::spool::{Placed, Spool, Zeros};
use std::io::Write;

/// Subcluster bitmap of an extended L2 entry: every subcluster allocated.
const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Subcluster bitmap of an extended L2 entry: every subcluster reads as zeros.
const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// Options of [`write_qcow2_stream`].
#[derive(Debug, Clone, Default)]
pub struct StreamWriteOptions {
    /// Options of the new image (its size is the source's, rounded up to 512 bytes). A backing
    /// file here (qemu-img `-B`) is recorded and only the source's top layer is copied: its
    /// data, and its zeroed clusters as zero-flagged entries.
    pub create: CreateOptions,
    /// Compress the data clusters (qemu-img `-c`), with the image's compression type. The
    /// compressed clusters are spooled to an unlinked temporary file (in `TMPDIR`) first: see
    /// the `spool` module.
    pub compress: bool,
    /// Threads compressing; 0 means one per available core.
    pub workers: usize,
    /// Copy data clusters that hold only zeros as they are (qemu-img `-S 0`). By default they
    /// are found by reading the source once before the stream starts (or while compressing)
    /// and take no room: unallocated, or zero entries over a kept backing file (v2 images over
    /// a backing file keep them, having no zero entries).
    pub keep_zeros: bool,
}

/// What the new image holds for a run of guest clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Data clusters, copied from the source.
    Data,
    /// Zero-flagged entries without a cluster (over a backing file).
    Zero,
}

/// A run of guest clusters `start..end` of one kind.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) fill: Fill,
}

/// Adds clusters `start..end` to the sorted `runs`: data wins a cluster shared with the last
/// run, adjacent runs of one kind merge.
fn push_run(runs: &mut Vec<Run>, mut start: u64, end: u64, fill: Fill) {
    if let Some(last) = runs.last_mut() {
        if start < last.end {
            if last.fill == Fill::Data || fill == Fill::Zero {
                start = last.end;
            } else {
                last.end = start;
            }
        }
    }
    if runs.last().is_some_and(|l| l.start >= l.end) {
        runs.pop();
    }
    if start >= end {
        return;
    }
    match runs.last_mut() {
        Some(l) if l.fill == fill && l.end == start => l.end = end,
        _ => runs.push(Run { start, end, fill }),
    }
}

/// The runs of guest clusters (of `cs` bytes) the new image allocates: clusters holding data
/// anywhere in the chain (or, with `top_only`, in the top layer, whose zeroed clusters become
/// zero entries when `zero_flag`).
fn plan(src: &dyn BlockDevice, cs: u64, top_only: bool, zero_flag: bool) -> Result<Vec<Run>> {
    let size = src.size();
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let e = if top_only {
            src.block_status(pos, size - pos)?
        } else {
            chain_status(src, pos, size - pos)?
        };
        if e.len == 0 {
            return Err(Error::InvalidArgument(format!(
                "block status of the source made no progress at offset {pos}"
            )));
        }
        let end = pos.saturating_add(e.len).min(size);
        match e.kind {
            ExtentKind::Data => push_run(&mut runs, pos / cs, end.div_ceil(cs), Fill::Data),
            ExtentKind::Zero if top_only => {
                // Whole clusters take a zero entry; a cluster the zeros cover in part is copied.
                let (first, last) = (pos.div_ceil(cs), end / cs);
                let fill = if zero_flag { Fill::Zero } else { Fill::Data };
                if pos % cs != 0 {
                    push_run(&mut runs, pos / cs, pos / cs + 1, Fill::Data);
                }
                if first < last {
                    push_run(&mut runs, first, last, fill);
                }
                if end % cs != 0 && end / cs >= first {
                    push_run(&mut runs, end / cs, end / cs + 1, Fill::Data);
                }
            }
            _ => {}
        }
        pos = end;
    }
    Ok(runs)
}

/// Where everything of the new image lies, in clusters.
#[derive(Debug)]
struct Layout {
    cs: u64,
    /// Bytes of an L2 entry: 8, or 16 with extended L2 entries.
    l2_entry: u64,
    order: u32,
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    l1: u64,
    l1_entries: u64,
    l1_clusters: u64,
    l2: u64,
    /// The L1 indices that have an L2 table, ascending.
    l2_indices: Vec<u64>,
    data: u64,
    total: u64,
}

fn too_large() -> Error {
    Error::InvalidArgument("The image size is too large (try using a larger cluster size)".into())
}

/// The data area: the guest's data clusters copied one for one, or spooled compressed.
enum DataArea {
    Plain(ZeroMap),
    Packed(Spool),
}

fn layout(
    runs: &[Run],
    area: &DataArea,
    size: u64,
    cs: u64,
    order: u32,
    l2_entry: u64,
) -> Result<Layout> {
    let l2_entries = cs / l2_entry;
    let guest_clusters = size.div_ceil(cs);
    let l1_entries = guest_clusters.div_ceil(l2_entries);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(too_large());
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let mut l2_indices: Vec<u64> = Vec::new();
    let mut data_clusters = 0u64;
    for r in runs {
        if r.fill == Fill::Data {
            data_clusters += r.end - r.start;
        }
        for i in r.start / l2_entries..=(r.end - 1) / l2_entries {
            if l2_indices.last() != Some(&i) {
                l2_indices.push(i);
            }
        }
    }
    match area {
        DataArea::Packed(spool) => data_clusters = spool.clusters(),
        DataArea::Plain(zeros) => data_clusters -= zeros.zeros(),
    }
    let fixed = 1 + l1_clusters + l2_indices.len() as u64 + data_clusters;
    let per_block = refcount::entries_per_block(cs, order);
    let (mut table, mut blocks) = (1u64, 1u64);
    loop {
        let total = fixed + table + blocks;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, table) {
            break;
        }
        (blocks, table) = (b.max(blocks), t.max(table));
    }
    let reftable = 1;
    let refblocks = reftable + table;
    let l1 = refblocks + blocks;
    let l2 = l1 + l1_clusters;
    let data = l2 + l2_indices.len() as u64;
    Ok(Layout {
        cs,
        l2_entry,
        order,
        reftable,
        reftable_clusters: table,
        refblocks,
        l1,
        l1_entries,
        l1_clusters,
        l2,
        l2_indices,
        data,
        total: data + data_clusters,
    })
}

/// Counts bytes written and maps failures.
struct Out<'a> {
    w: &'a mut dyn Write,
    written: u64,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| Error::io("writing the image stream", e))?;
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Writes `src` as a complete qcow2 image to `out` in one forward pass and returns the bytes
/// written. Data clusters are those the source's allocation map shows data in (zeros inside
/// them are copied as they are, except when compressing); the source is read once, in
/// ascending order. Not supported here: extended L2 entries, external data files and
/// preallocation.
pub fn write_qcow2_stream(
    src: &dyn BlockDevice,
    out: &mut dyn Write,
    opts: &StreamWriteOptions,
) -> Result<u64> {
    let o = &opts.create;
    let size = src
        .size()
        .checked_next_multiple_of(512)
        .ok_or_else(too_large)?;
    let bits = o.validate(size)?;
    if o.data_file.is_some() || o.preallocation != Preallocation::Off {
        return Err(Error::Unsupported(
            "data files and preallocation in a streamed image".into(),
        ));
    }
    let cs = 1u64 << bits;
    let order = o.refcount_bits.trailing_zeros();
    let top_only = o.backing_file.is_some();
    let v3 = o.compat == Compat::V3;
    let runs = plan(src, cs, top_only, v3)?;
    let area = if opts.compress {
        let workers = if opts.workers == 0 {
            default_workers()
        } else {
            opts.workers
        };
        let zeros = if opts.keep_zeros || (top_only && !v3) {
            Zeros::Store
        } else {
            Zeros::Skip
        };
        let data = runs
            .iter()
            .filter(|r| r.fill == Fill::Data)
            .flat_map(|r| r.start..r.end);
        DataArea::Packed(Spool::build(
            src,
            data,
            cs,
            o.compression_type,
            order,
            workers,
            zeros,
        )?)
    } else if opts.keep_zeros || (top_only && !v3) {
        DataArea::Plain(ZeroMap::default())
    } else {
        DataArea::Plain(ZeroMap::scan(src, &runs, cs, size)?)
    };
    let l2_entry = if o.extended_l2 { 16 } else { 8 };
    let lay = layout(&runs, &area, size, cs, order, l2_entry)?;
    let l1_size = u32::try_from(lay.l1_entries).map_err(|_| too_large())?;
    let table_clusters = u32::try_from(lay.reftable_clusters).map_err(|_| too_large())?;
    let mut out = Out { w: out, written: 0 };
    out.put(&new_cluster0(
        o,
        bits,
        (lay.reftable * cs, table_clusters),
        (lay.l1 * cs, l1_size),
        size,
    )?)?;
    write_refcounts(&mut out, &lay, &area)?;
    write_tables(&mut out, &lay, &runs, &area, bits, top_only)?;
    match &area {
        DataArea::Plain(zeros) => write_data(&mut out, src, &runs, cs, size, zeros)?,
        DataArea::Packed(spool) => spool.copy_out(&mut |b| out.put(b))?,
    }
    if out.written != lay.total * cs {
        return Err(Error::InvalidArgument(format!(
            "streamed image has {} bytes, planned {}",
            out.written,
            lay.total * cs
        )));
    }
    Ok(out.written)
}

/// The refcount table and blocks: every metadata cluster counted once, the data area's
/// clusters as the data area says.
fn write_refcounts(out: &mut Out<'_>, lay: &Layout, area: &DataArea) -> Result<()> {
    let cs = lay.cs;
    let blocks = lay.l1 - lay.refblocks;
    let mut buf = vec![0u8; cs as usize];
    for c in 0..lay.reftable_clusters {
        buf.fill(0);
        for (i, b) in (c * cs / 8..((c + 1) * cs / 8).min(blocks)).enumerate() {
            put_u64(&mut buf, i * 8, (lay.refblocks + b) * cs);
        }
        out.put(&buf)?;
    }
    let per_block = refcount::entries_per_block(cs, lay.order) as usize;
    let mut filler = BlockFiller {
        out,
        buf,
        order: lay.order,
        per_block,
        next: 0,
        blocks_written: 0,
    };
    for _ in 0..lay.data {
        filler.push(1)?;
    }
    match area {
        DataArea::Plain(_) => {
            for _ in lay.data..lay.total {
                filler.push(1)?;
            }
        }
        DataArea::Packed(spool) => spool.refcounts(|v| filler.push(v))?,
    }
    while filler.blocks_written < blocks {
        filler.flush_block()?;
    }
    Ok(())
}

/// Fills refcount blocks entry by entry and writes each when full.
struct BlockFiller<'a, 'b> {
    out: &'a mut Out<'b>,
    buf: Vec<u8>,
    order: u32,
    per_block: usize,
    next: usize,
    blocks_written: u64,
}

impl BlockFiller<'_, '_> {
    fn push(&mut self, v: u64) -> Result<()> {
        if !refcount::set(&mut self.buf, self.order, self.next, v) {
            return Err(Error::InvalidArgument(format!(
                "refcount {v} does not fit the refcount width"
            )));
        }
        self.next += 1;
        if self.next == self.per_block {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        self.out.put(&self.buf)?;
        self.buf.fill(0);
        self.next = 0;
        self.blocks_written += 1;
        Ok(())
    }
}

/// The L1 table, then the L2 tables in guest order.
fn write_tables(
    out: &mut Out<'_>,
    lay: &Layout,
    runs: &[Run],
    area: &DataArea,
    bits: u32,
    top_only: bool,
) -> Result<()> {
    let cs = lay.cs;
    let extended = lay.l2_entry == 16;
    let l2_entries = cs / lay.l2_entry;
    // What a cluster of zeros gets: nothing without a backing file, else a zero entry.
    let zero = match (top_only, extended) {
        (false, _) => (0, 0),
        (true, false) => (ZERO, 0),
        (true, true) => (0, ALL_ZERO),
    };
    let mut buf = vec![0u8; (lay.l1_clusters * cs) as usize];
    for (rank, &i) in lay.l2_indices.iter().enumerate() {
        put_u64(
            &mut buf,
            i as usize * 8,
            ((lay.l2 + rank as u64) * cs) | COPIED,
        );
    }
    out.put(&buf)?;
    buf = vec![0u8; cs as usize];
    let mut next_data = lay.data;
    let mut rank = 0u64;
    let (mut placements, zeros) = match area {
        DataArea::Packed(spool) => (Some((spool, spool.placements()?)), None),
        DataArea::Plain(z) => (None, Some(z)),
    };
    let mut r = 0usize;
    for &i in &lay.l2_indices {
        buf.fill(0);
        let (lo, hi) = (i * l2_entries, (i + 1) * l2_entries);
        while r < runs.len() && runs[r].start < hi {
            let run = runs[r];
            let (s, e) = (run.start.max(lo), run.end.min(hi));
            for c in s..e {
                let (entry, bitmap) = match (run.fill, &mut placements) {
                    (Fill::Data, None) => {
                        rank += 1;
                        if zeros.is_some_and(|z| z.is_zero(rank - 1)) {
                            zero
                        } else {
                            next_data += 1;
                            (encode_normal((next_data - 1) * cs, true), ALL_ALLOCATED)
                        }
                    }
                    (Fill::Data, Some((spool, pl))) => {
                        let p = pl.next_placed()?.ok_or_else(|| {
                            Error::InvalidArgument("spool index ended early".into())
                        })?;
                        match p {
                            Placed::Zero => zero,
                            Placed::Raw(_) => (spool.entry(p, lay.data * cs, bits)?, ALL_ALLOCATED),
                            Placed::Compressed(..) => (spool.entry(p, lay.data * cs, bits)?, 0),
                        }
                    }
                    (Fill::Zero, _) => zero,
                };
                let at = ((c - lo) * lay.l2_entry) as usize;
                put_u64(&mut buf, at, entry);
                if extended {
                    put_u64(&mut buf, at + 8, bitmap);
                }
            }
            if run.end > hi {
                break;
            }
            r += 1;
        }
        out.put(&buf)?;
    }
    Ok(())
}

/// The data clusters, in ascending guest order, but for those of zeros; the part of the last
/// cluster past the end of the disk is zeros.
fn write_data(
    out: &mut Out<'_>,
    src: &dyn BlockDevice,
    runs: &[Run],
    cs: u64,
    size: u64,
    zeros: &ZeroMap,
) -> Result<()> {
    let mut rank = 0u64;
    for_each_chunk(src, runs, cs, size, |_, buf| {
        if zeros.zeros() == 0 {
            rank += buf.len() as u64 / cs;
            return out.put(buf);
        }
        for cluster in buf.chunks(cs as usize) {
            if !zeros.is_zero(rank) {
                out.put(cluster)?;
            }
            rank += 1;
        }
        Ok(())
    })
}
