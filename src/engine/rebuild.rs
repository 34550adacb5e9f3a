//! Rebuilding the refcounts of a dirty image (write-ordering rule 5).
//!
//! A lazy-refcounts image carries the dirty bit while its refcounts may be stale; after a crash
//! they must be recomputed from **all** metadata before anything is written: the header, the
//! active and every snapshot's L1 and L2 tables and the clusters they map (a compressed cluster
//! counts once on every host cluster its bytes touch), the snapshot table, the refcount table and
//! blocks, the bitmap directory, tables and data, and the encryption header. Each L1 table that reaches a cluster
//! counts one reference, as QEMU counts them.
//!
//! The new counts are written into the existing refcount blocks (blocks missing for used
//! clusters are placed past every used cluster), flushed, and only then is the dirty bit
//! cleared, so a crash during the rebuild leaves an image that is rebuilt again next time.

use super::refcount::Refcounts;
use crate::error::{Corruption, Error, Result};
use crate::format::bitmap::BitmapEntry;
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::Header;
use crate::format::snapshot::Snapshot;
use crate::format::{be_u64, extension::Extensions, refcount, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::io::{Storage, StorageExt};

/// References counted per host cluster, from the metadata walked so far.
pub(crate) struct Counter<'a> {
    storage: &'a dyn Storage,
    /// The count of every host cluster of the file.
    pub(crate) counts: Vec<u64>,
    cb: u32,
    /// Bytes of metadata still allowed to be read (bounds the work on hostile images).
    budget: u64,
}

fn past_eof(what: &'static str, offset: u64, size: u64) -> Error {
    Corruption::BadTable {
        table: what,
        offset,
        size,
        rule: "lies past the end of the file",
    }
    .into()
}

impl<'a> Counter<'a> {
    /// A counter over the first `clusters` clusters of `storage` (clusters of `1 << cb` bytes),
    /// allowed to read metadata in proportion to the file's length.
    pub(crate) fn new(storage: &'a dyn Storage, cb: u32, clusters: u64, file_len: u64) -> Self {
        Counter {
            storage,
            counts: vec![0; clusters as usize],
            cb,
            budget: file_len.saturating_mul(4).saturating_add(256 << 20),
        }
    }

    /// Counts one reference to every cluster `offset..offset + size` touches.
    pub(crate) fn inc(&mut self, what: &'static str, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let first = offset >> self.cb;
        let last = offset
            .checked_add(size - 1)
            .ok_or_else(|| past_eof(what, offset, size))?
            >> self.cb;
        if last >= self.counts.len() as u64 {
            return Err(past_eof(what, offset, size));
        }
        for c in first..=last {
            self.counts[c as usize] += 1;
        }
        Ok(())
    }

    fn read_words(&mut self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let bytes = entries * 8;
        if bytes > self.budget {
            return Err(Error::Unsupported(
                "refcount rebuild would read more metadata than the image can hold".into(),
            ));
        }
        self.budget -= bytes;
        let raw = self
            .storage
            .read_vec(offset, bytes as usize)
            .map_err(|e| Error::io("reading metadata for refcount rebuild", e))?;
        Ok(raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect())
    }

    /// Counts an L1 table and everything it reaches.
    pub(crate) fn l1(&mut self, h: &Header, offset: u64, entries: u32) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        self.inc("L1 table", offset, u64::from(entries) * 8)?;
        let l1 = self.read_words(offset, u64::from(entries))?;
        self.l1_entries(h, &l1)
    }

    /// Counts what the L1 entries `l1` reach (not the L1 table itself).
    pub(crate) fn l1_entries(&mut self, h: &Header, l1: &[u64]) -> Result<()> {
        let cs = h.cluster_size();
        let words = (cs / 8) as usize;
        let extended = h.has_extended_l2();
        let step = if extended { 2 } else { 1 };
        for &e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.inc("L2 table", l2, cs)?;
            let t = self.read_words(l2, words as u64)?;
            for i in (0..words).step_by(step) {
                match classify(t[i], h.cluster_bits, extended, h.has_data_file()) {
                    ClusterKind::Normal { host } | ClusterKind::Zero { host }
                        if host != 0 && !h.has_data_file() =>
                    {
                        self.inc("data cluster", host, cs)?
                    }
                    ClusterKind::Compressed(d) => {
                        self.inc("compressed cluster", d.host_offset, d.stored_len())?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Counts the encryption (LUKS) header's clusters, when the image has one.
    pub(crate) fn encryption_header(&mut self, extensions: &Extensions) -> Result<()> {
        match extensions.crypto {
            Some(c) => self.inc("encryption header", c.offset, c.length.max(1)),
            None => Ok(()),
        }
    }

    /// Counts the bitmap directory, the bitmap tables and the bitmap data, when the image's
    /// bitmaps are in use.
    pub(crate) fn bitmaps(
        &mut self,
        h: &Header,
        extensions: &Extensions,
        bitmaps: &[BitmapEntry],
    ) -> Result<()> {
        let Some(b) = extensions.bitmaps else {
            return Ok(());
        };
        if !h.autoclear.contains(AutoclearFeatures::BITMAPS) {
            return Ok(());
        }
        self.inc("bitmap directory", b.directory_offset, b.directory_size)?;
        for bm in bitmaps {
            let entries = u64::from(bm.table_size);
            self.inc("bitmap table", bm.table_offset, entries * 8)?;
            for e in self.read_words(bm.table_offset, entries)? {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    self.inc("bitmap data", off, h.cluster_size())?;
                }
            }
        }
        Ok(())
    }
}

/// Recomputes every refcount of a dirty image, writes them, and clears the dirty bit. Returns
/// the refcounts, ready for writing.
pub(crate) fn rebuild_refcounts(
    storage: &dyn Storage,
    header: &mut Header,
    extensions: &Extensions,
    snapshots: &[Snapshot],
    bitmaps: &[BitmapEntry],
) -> Result<Refcounts> {
    let cs = header.cluster_size();
    let cb = header.cluster_bits;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    let n = file_len.div_ceil(cs);
    let mut c = Counter::new(storage, cb, n, file_len);
    c.inc("header", 0, cs)?;
    c.l1(header, header.l1_table_offset, header.l1_size)?;
    if header.nb_snapshots > 0 {
        let table_len: u64 = snapshots
            .iter()
            .map(|s| (40 + 24 + s.extra_unknown.len() + s.id.len() + s.name.len()) as u64)
            .map(|l| l.next_multiple_of(8))
            .sum();
        c.inc("snapshot table", header.snapshots_offset, table_len.max(1))?;
        for s in snapshots {
            c.l1(header, s.l1_table_offset, s.l1_size)?;
        }
    }
    let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
    c.inc("refcount table", header.refcount_table_offset, rt_bytes)?;
    for e in c.read_words(header.refcount_table_offset, rt_bytes / 8)? {
        let b = e & !0x1ff;
        if b != 0 {
            c.inc("refcount block", b, cs)?;
        }
    }
    c.bitmaps(header, extensions, bitmaps)?;
    c.encryption_header(extensions)?;

    let mut refs = Refcounts::load(storage, header)?;
    let (table_len, block_bits) = refs.shape();
    let per_block = 1u64 << block_bits;
    // Existing blocks take the new counts; clusters past the used ones are free.
    for ri in 0..table_len {
        if refs.has_block(ri) {
            let start = ri as u64 * per_block;
            for cl in start..start + per_block {
                let v = c.counts.get(cl as usize).copied().unwrap_or(0);
                refs.set_existing(storage, cl, v)?;
            }
        }
    }
    // Blocks missing for used clusters go past everything in use.
    refs.cursor = n;
    let mut file_end = n * cs;
    for ri in 0..n.div_ceil(per_block) as usize {
        let start = ri as u64 * per_block;
        let end = (start + per_block).min(n);
        let used = (start..end).any(|cl| c.counts[cl as usize] != 0);
        if used && !refs.has_block(ri) {
            refs.ensure_block(storage, ri, &mut file_end)?;
            for cl in start..end {
                refs.set_existing(storage, cl, c.counts[cl as usize])?;
            }
        }
    }
    refs.write_blocks(storage)?;
    fix_copied_flags(storage, header, &c.counts)?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing rebuilt refcounts", e))?;
    if refs.write_table_entries(storage)? {
        storage
            .flush()
            .map_err(|e| Error::io("flushing refcount table", e))?;
    }
    header.incompatible.remove(IncompatibleFeatures::DIRTY);
    storage
        .write_at(&header.incompatible.bits().to_be_bytes(), 72)
        .and_then(|()| storage.flush())
        .map_err(|e| Error::io("clearing the dirty bit", e))?;
    Ok(refs)
}

/// Sets the COPIED flag of every active L1 entry and every allocated active L2 entry exactly
/// when `counts` gives its cluster a count of 1 (as QEMU's repair of a dirty image does), and
/// writes the tables that change in place. Images with an external data file keep their L2
/// entries' flags (their data clusters are not counted).
fn fix_copied_flags(storage: &dyn Storage, header: &Header, counts: &[u64]) -> Result<()> {
    let cb = header.cluster_bits;
    let cs = header.cluster_size();
    let extended = header.has_extended_l2();
    let count = |host: u64| counts.get((host >> cb) as usize).copied().unwrap_or(0);
    let flag = |e: u64, host: u64| {
        if count(host) == 1 {
            e | COPIED
        } else {
            e & !COPIED
        }
    };
    let io = |what: &'static str| move |e| Error::io(what, e);
    let n = header.l1_size as usize;
    let raw = storage
        .read_vec(header.l1_table_offset, n * 8)
        .map_err(io("reading the L1 table"))?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
    let mut done = std::collections::BTreeSet::new();
    for &e in &l1 {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 || header.has_data_file() || !done.insert(l2) {
            continue;
        }
        let table = storage
            .read_vec(l2, cs as usize)
            .map_err(io("reading an L2 table"))?;
        let mut words: Vec<u64> = table.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
        if set_copied_flags(&mut words, cb, extended, count) {
            let t: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            storage
                .write_at(&t, l2)
                .map_err(io("repairing COPIED flags of an L2 table"))?;
        }
    }
    let fixed: Vec<u8> = l1
        .iter()
        .flat_map(|&e| {
            let l2 = e & OFFSET_MASK;
            let v = if l2 == 0 { e } else { flag(e, l2) };
            v.to_be_bytes()
        })
        .collect();
    if fixed != raw {
        storage
            .write_at(&fixed, header.l1_table_offset)
            .map_err(io("repairing COPIED flags of the L1 table"))?;
    }
    Ok(())
}

/// Sets the COPIED flag of every allocated entry of the L2 table `words` (clusters of
/// `1 << cluster_bits` bytes; extended entries when `extended`) exactly when `count` gives its
/// host cluster a count of 1; returns whether any entry changed.
pub(crate) fn set_copied_flags(
    words: &mut [u64],
    cluster_bits: u32,
    extended: bool,
    count: impl Fn(u64) -> u64,
) -> bool {
    let step = if extended { 2 } else { 1 };
    let mut changed = false;
    for w in words.iter_mut().step_by(step) {
        let host = match classify(*w, cluster_bits, extended, false) {
            ClusterKind::Normal { host } | ClusterKind::Zero { host } if host != 0 => host,
            _ => continue,
        };
        let fixed = if count(host) == 1 {
            *w | COPIED
        } else {
            *w & !COPIED
        };
        changed |= fixed != *w;
        *w = fixed;
    }
    changed
}

/// An in-memory refcount array (QEMU's "IMRT"): the refcount every host cluster should have,
/// computed from the metadata that references it. The rebuild below allocates in it.
pub(crate) trait RefcountArray {
    /// The count of `cluster` (0 past the end of the array).
    fn get(&self, cluster: u64) -> u64;
    /// Sets the count of `cluster`, growing the array if needed.
    fn set(&mut self, cluster: u64, value: u64);
}

/// Where [`write_refcount_structure`] put the new refcount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewRefcountTable {
    /// Host offset of the table.
    pub(crate) offset: u64,
    /// Its length in clusters.
    pub(crate) clusters: u32,
}

/// Writes a new refcount structure describing `counts` and switches the header to it, the way
/// QEMU's `rebuild_refcount_structure` does (qemu 7.1 and later), so that the result — and
/// what `qemu-img check` reports about it — is the same:
///
/// - every refcount block range holding a non-zero count gets a block, allocated first-fit in
///   `counts` (clusters that nothing references), never in the range of a block already
///   written; the block's bytes are that range of `counts`, its own allocation included;
/// - then the table is allocated first-fit, and the blocks covering its clusters are
///   rewritten; if that needed a larger table, again.
///
/// Write ordering (docs/design.md §3, rule 4): blocks and table are written only into clusters nothing
/// references, then flushed, and only then is the header switched (and flushed). A crash
/// before the switch leaves the old structure in place; after it, the old structure's
/// clusters are leaked (a leak repair frees them). `nb_clusters` is the size of `counts` in
/// clusters; allocations past it grow it (the file grows when the blocks are written).
pub(crate) fn write_refcount_structure(
    storage: &dyn Storage,
    cluster_bits: u32,
    refcount_order: u32,
    counts: &mut dyn RefcountArray,
    nb_clusters: &mut u64,
) -> Result<NewRefcountTable> {
    let t = place_refcount_structure(storage, cluster_bits, refcount_order, counts, nb_clusters)?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&t.offset.to_be_bytes());
    hdr[8..].copy_from_slice(&t.clusters.to_be_bytes());
    storage
        .write_at(&hdr, 48)
        .and_then(|()| storage.flush())
        .map_err(|e| Error::io("switching the header to the rebuilt refcount table", e))?;
    Ok(t)
}

/// [`write_refcount_structure`] without the header switch: the new structure is written and
/// flushed, and nothing names it yet (the caller switches the header, possibly together with
/// other fields of the first sector).
pub(crate) fn place_refcount_structure(
    storage: &dyn Storage,
    cluster_bits: u32,
    refcount_order: u32,
    counts: &mut dyn RefcountArray,
    nb_clusters: &mut u64,
) -> Result<NewRefcountTable> {
    let mut w = StructureWriter {
        storage,
        cb: cluster_bits,
        order: refcount_order,
        block_bits: cluster_bits + 3 - refcount_order,
        counts,
        nb_clusters,
        table: Vec::new(),
    };
    w.write_blocks(0, *w.nb_clusters)?;
    // The table's own clusters need counts too; allocating them may need more blocks, and
    // more blocks a larger table (QEMU loops the same way). A handful of rounds always
    // suffices; more means something is wrong.
    let mut placed = None;
    for _ in 0..64 {
        let bytes = (w.table.len() as u64) * 8;
        let clusters = bytes.div_ceil(1 << w.cb).max(1);
        let mut first_free = 0;
        let offset = w.alloc(clusters, &mut first_free)?;
        let start = offset >> w.cb;
        if !w.write_blocks(start, start + clusters)? {
            placed = Some((offset, clusters));
            break;
        }
    }
    let Some((offset, clusters)) = placed else {
        return Err(Error::Unsupported(
            "refcount rebuild did not converge on a table size".into(),
        ));
    };
    let cs = 1u64 << w.cb;
    let mut raw = vec![0u8; (clusters * cs) as usize];
    for (i, e) in w.table.iter().enumerate() {
        raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    let io = |what: &'static str| move |e| Error::io(what, e);
    storage
        .write_at(&raw, offset)
        .map_err(io("writing the rebuilt refcount table"))?;
    storage
        .flush()
        .map_err(io("flushing the rebuilt refcount structure"))?;
    let clusters = u32::try_from(clusters)
        .map_err(|_| Error::Unsupported("rebuilt refcount table too large".into()))?;
    Ok(NewRefcountTable { offset, clusters })
}

/// The state of [`write_refcount_structure`].
struct StructureWriter<'a> {
    storage: &'a dyn Storage,
    cb: u32,
    order: u32,
    /// log2 of refcounts per block.
    block_bits: u32,
    counts: &'a mut dyn RefcountArray,
    nb_clusters: &'a mut u64,
    /// The new refcount table (host offsets of blocks, 0 = none).
    table: Vec<u64>,
}

impl StructureWriter<'_> {
    /// QEMU's `alloc_clusters_imrt`: the first run of `n` clusters with count 0 at or after
    /// `*first_free` (which moves to the first gap seen), or appended past the array's end;
    /// their counts become 1.
    fn alloc(&mut self, n: u64, first_free: &mut u64) -> Result<u64> {
        let mut cluster = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while cluster < *self.nb_clusters && run < n {
            if self.counts.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < n {
            *self.nb_clusters = cluster + n - run;
        }
        let start = cluster - run;
        if (start + n)
            .checked_mul(1 << self.cb)
            .is_none_or(|e| e > MAX_HOST_OFFSET)
        {
            return Err(Error::Unsupported(
                "rebuilt refcounts would exceed the largest host offset".into(),
            ));
        }
        for c in start..start + n {
            self.counts.set(c, 1);
        }
        Ok(start << self.cb)
    }

    /// QEMU's `rebuild_refcounts_write_refblocks` over clusters `[first, end)`: writes the block
    /// of every range holding a non-zero count, allocating the blocks that do not exist yet.
    /// Returns whether the table had to grow.
    fn write_blocks(&mut self, first: u64, mut end: u64) -> Result<bool> {
        let cs = 1u64 << self.cb;
        let per_block = 1u64 << self.block_bits;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.counts.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let ri = cluster >> self.block_bits;
            let block_start = ri << self.block_bits;
            let existing = self.table.get(ri as usize).copied().unwrap_or(0);
            let offset = if existing != 0 {
                existing
            } else {
                first_free = first_free.max(block_start);
                let offset = self.alloc(1, &mut first_free)?;
                end = end.max((offset >> self.cb) + 1);
                if self.table.len() as u64 <= ri {
                    let entries = ((ri + 1) * 8).next_multiple_of(cs) / 8;
                    if entries * 8 > MAX_REFTABLE_BYTES {
                        return Err(Error::Unsupported(
                            "rebuilt refcount table would exceed 8 MiB".into(),
                        ));
                    }
                    self.table.resize(entries as usize, 0);
                    grown = true;
                }
                self.table[ri as usize] = offset;
                offset
            };
            let mut block = vec![0u8; cs as usize];
            let used = per_block.min((*self.nb_clusters).saturating_sub(block_start));
            for k in 0..used {
                let v = self.counts.get(block_start + k);
                if v != 0 && !refcount::set(&mut block, self.order, k as usize, v) {
                    return Err(Error::Unsupported(format!(
                        "refcount {v} does not fit the refcount width"
                    )));
                }
            }
            self.storage
                .write_at(&block, offset)
                .map_err(|e| Error::io("writing a rebuilt refcount block", e))?;
            cluster = block_start + per_block;
        }
        Ok(grown)
    }
}
