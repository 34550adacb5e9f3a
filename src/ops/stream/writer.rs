//! The streamed qcow2 writer: plan from the allocation map, then one forward pass.

use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::error::{Error, Result};
use crate::format::bytes::put_u64;
use crate::format::entry::{COPIED, ZERO};
use crate::format::refcount;
use crate::format::MAX_L1_BYTES;
use crate::ops::convert::default_workers;
use crate::ops::create::{new_cluster0, Compat, CreateOptions, Preallocation};
use crate::ops::stream::chunks::{for_each_chunk, ZeroMap};
use crate::ops::stream::spool::{Placed, Spool, Zeros};
use crate::ops::stream::walk::{entry_of, Piece, Stored, Walk};
use std::io::Write;

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
    order: u32,
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    l1: u64,
    l1_entries: u64,
    l1_clusters: u64,
    /// The first cluster of the area: the L2 tables, each followed by the data it maps.
    area: u64,
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

impl DataArea {
    /// A fresh walk of the area after the L1 table.
    fn walk<'a>(&'a self, runs: &'a [Run], lay: (u64, u64)) -> Walk<'a> {
        let stored = match self {
            DataArea::Plain(zeros) => Stored::Plain {
                zeros,
                rank: 0,
                pos: 0,
            },
            DataArea::Packed(spool) => Stored::Packed(spool.placements()),
        };
        Walk::new(runs, lay.0, lay.1, stored)
    }
}

fn layout(area_clusters: u64, size: u64, cs: u64, order: u32, l2_entry: u64) -> Result<Layout> {
    let l2_entries = cs / l2_entry;
    let guest_clusters = size.div_ceil(cs);
    let l1_entries = guest_clusters.div_ceil(l2_entries);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(too_large());
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let fixed = 1 + l1_clusters + area_clusters;
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
    let area = l1 + l1_clusters;
    Ok(Layout {
        cs,
        order,
        reftable,
        reftable_clusters: table,
        refblocks,
        l1,
        l1_entries,
        l1_clusters,
        area,
        total: area + area_clusters,
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

    /// Zeros up to byte `to` of the image.
    fn pad_to(&mut self, to: u64) -> Result<()> {
        if to < self.written {
            return Err(out_of_step());
        }
        let zeros = [0u8; 4096];
        while self.written < to {
            let n = (to - self.written).min(zeros.len() as u64) as usize;
            self.put(&zeros[..n])?;
        }
        Ok(())
    }
}

fn out_of_step() -> Error {
    Error::InvalidArgument("the streamed image went out of step with its plan".into())
}

/// Writes `src` as a complete qcow2 image to `out` in one forward pass and returns the bytes
/// written. Data clusters are those the source's allocation map shows data in (zeros inside
/// them are copied as they are, except when compressing); the source is read once, in
/// ascending order. Not supported here: external data files and preallocation.
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
    let geometry = (cs, cs / l2_entry);
    let area_clusters = area.walk(&runs, geometry).clusters()?;
    let lay = layout(area_clusters, size, cs, order, l2_entry)?;
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
    write_refcounts(&mut out, &lay, area.walk(&runs, geometry))?;
    write_l1(&mut out, &lay, area.walk(&runs, geometry))?;
    // What a cluster stored nowhere gets: nothing without a backing file, else a zero entry.
    let zero = match (top_only, o.extended_l2) {
        (false, _) => (0, 0),
        (true, false) => (ZERO, 0),
        (true, true) => (0, ALL_ZERO),
    };
    let mut em = Emitter {
        out: &mut out,
        behind: area.walk(&runs, geometry),
        ahead: area.walk(&runs, geometry),
        peeked: None,
        table: vec![0u8; cs as usize],
        start: lay.area * cs,
        bits,
        l2_entry,
        zero,
    };
    match &area {
        DataArea::Plain(_) => write_data(&mut em, src, &runs, cs, size)?,
        DataArea::Packed(spool) => {
            let mut data = spool.data()?;
            let mut buf = vec![0u8; cs as usize];
            while let Some((_, placed)) = em.next_cluster()? {
                let (at, len) = match placed {
                    Placed::Zero => continue,
                    Placed::Raw(at) => (at, cs),
                    Placed::Compressed(at, len) => (at, len),
                };
                let b = buf.get_mut(..len as usize).ok_or_else(out_of_step)?;
                std::io::Read::read_exact(&mut data, b)
                    .map_err(|e| Error::io("reading the spool file", e))?;
                em.put_at(at, b)?;
            }
        }
    }
    if em.next_cluster()?.is_some() {
        return Err(out_of_step());
    }
    out.pad_to(lay.total * cs)?;
    Ok(out.written)
}

/// The refcount table and blocks: every cluster before the area counted once, the area's
/// clusters as its walk says.
fn write_refcounts(out: &mut Out<'_>, lay: &Layout, walk: Walk<'_>) -> Result<()> {
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
    for _ in 0..lay.area {
        filler.push(1)?;
    }
    walk.refcounts(|v| filler.push(v))?;
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

/// The L1 table: the host offset of every L2 table the walk places.
fn write_l1(out: &mut Out<'_>, lay: &Layout, mut walk: Walk<'_>) -> Result<()> {
    let mut buf = vec![0u8; (lay.l1_clusters * lay.cs) as usize];
    while let Some(p) = walk.next_piece()? {
        if let Piece::Table { l1_index, at } = p {
            put_u64(
                &mut buf,
                l1_index as usize * 8,
                (lay.area * lay.cs + at) | COPIED,
            );
        }
    }
    out.put(&buf)
}

/// Writes the area in order: `behind` walks what is written, `ahead` fills each L2 table from
/// the pieces that follow it before the table goes out.
struct Emitter<'w, 'o> {
    out: &'w mut Out<'o>,
    behind: Walk<'w>,
    ahead: Walk<'w>,
    /// The piece `ahead` read past the last table it filled.
    peeked: Option<Piece>,
    table: Vec<u8>,
    /// Host offset of the area.
    start: u64,
    bits: u32,
    l2_entry: u64,
    /// The entry of a cluster stored nowhere.
    zero: (u64, u64),
}

impl Emitter<'_, '_> {
    /// Writes the tables up to the next guest cluster of the plan and returns that cluster
    /// with its placement; `None` after the last.
    fn next_cluster(&mut self) -> Result<Option<(u64, Placed)>> {
        loop {
            match self.behind.next_piece()? {
                None => return Ok(None),
                Some(Piece::Cluster { guest, placed }) => return Ok(Some((guest, placed))),
                Some(Piece::Table { l1_index, at }) => self.write_table(l1_index, at)?,
            }
        }
    }

    fn write_table(&mut self, l1_index: u64, at: u64) -> Result<()> {
        let first = match self.peeked.take() {
            Some(p) => Some(p),
            None => self.ahead.next_piece()?,
        };
        if first != Some(Piece::Table { l1_index, at }) {
            return Err(out_of_step());
        }
        self.table.fill(0);
        let l2_entries = self.table.len() as u64 / self.l2_entry;
        loop {
            match self.ahead.next_piece()? {
                Some(Piece::Cluster { guest, placed }) => {
                    let (entry, bitmap) = entry_of(placed, self.start, self.bits, self.zero)?;
                    let i = guest
                        .checked_sub(l1_index * l2_entries)
                        .ok_or_else(out_of_step)?;
                    let at = (i * self.l2_entry) as usize;
                    put_u64(&mut self.table, at, entry);
                    if self.l2_entry == 16 {
                        put_u64(&mut self.table, at + 8, bitmap);
                    }
                }
                other => {
                    self.peeked = other;
                    break;
                }
            }
        }
        self.out.pad_to(self.start + at)?;
        self.out.put(&self.table)
    }

    /// Writes `data` at offset `at` of the area.
    fn put_at(&mut self, at: u64, data: &[u8]) -> Result<()> {
        self.out.pad_to(self.start + at)?;
        self.out.put(data)
    }
}

/// The data clusters copied one for one, read from the source in ascending order, those of
/// zeros skipped; the part of the last cluster past the end of the disk is zeros. Clusters that
/// follow each other in the chunk and in the image go out in one piece.
fn write_data(
    em: &mut Emitter<'_, '_>,
    src: &dyn BlockDevice,
    runs: &[Run],
    cs: u64,
    size: u64,
) -> Result<()> {
    let c = cs as usize;
    for_each_chunk(src, runs, cs, size, |off, buf| {
        // Clusters `a..b` of `buf` not written yet, going to area offset `at`.
        let mut pending: Option<(usize, usize, u64)> = None;
        let flush = |em: &mut Emitter<'_, '_>, p: &mut Option<(usize, usize, u64)>| match p.take() {
            Some((a, b, at)) => em.put_at(at, &buf[a * c..b * c]),
            None => Ok(()),
        };
        for k in 0..buf.len() / c {
            let guest = off / cs + k as u64;
            loop {
                match em.behind.next_piece()?.ok_or_else(out_of_step)? {
                    Piece::Table { l1_index, at } => {
                        flush(em, &mut pending)?;
                        em.write_table(l1_index, at)?;
                    }
                    // Zero entries without data (over a backing file) come between.
                    Piece::Cluster {
                        guest: g,
                        placed: Placed::Zero,
                    } if g < guest => {}
                    Piece::Cluster {
                        guest: g,
                        placed: Placed::Zero,
                    } if g == guest => {
                        flush(em, &mut pending)?;
                        break;
                    }
                    Piece::Cluster {
                        guest: g,
                        placed: Placed::Raw(at),
                    } if g == guest => {
                        match &mut pending {
                            Some((a, b, start))
                                if *b == k && *start + (k - *a) as u64 * cs == at =>
                            {
                                *b += 1
                            }
                            _ => {
                                flush(em, &mut pending)?;
                                pending = Some((k, k + 1, at));
                            }
                        }
                        break;
                    }
                    _ => return Err(out_of_step()),
                }
            }
        }
        flush(em, &mut pending)
    })
}
