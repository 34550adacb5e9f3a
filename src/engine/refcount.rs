//! Refcounts at run time: the refcount table, a cache of refcount blocks, and the cluster
//! allocator.
//!
//! Invariants:
//! - The in-memory table and blocks are the truth; dirty blocks and table entries reach the image
//!   only in [`flush`](super::flush) order (blocks, flush, table entries, flush) or, for blocks,
//!   on write-back when the cache is trimmed. Blocks only ever hold refcount *increases* between
//!   flushes: decreases are queued in `Meta::pending_free` and applied by the flush after the
//!   L2/L1 entries that dropped the references are durable (write-ordering rule 3).
//! - `cursor` is a cluster index below which no cluster is free, so the free-space search never
//!   rescans the image from the start; freeing a cluster lowers it.
//! - Growing the table (rule 4): the new table and the refcount blocks that describe it are
//!   written in a fresh area at the end of the file, flushed, then the header is switched and
//!   flushed; the old table's clusters are freed afterwards through `pending_free`.

use super::cache::IntMap;
use super::corrupt::CHex;
use super::overlap::{MetadataMap, Structure};
use crate::error::{Corruption, Error, Result};
use crate::format::bytes::{put_u32, put_u64};
use crate::format::header::Header;
use crate::format::refcount;
use crate::format::{be_u64, MAX_REFTABLE_BYTES};
use crate::io::{Storage, StorageExt};
use std::collections::hash_map::Entry;
use std::collections::BTreeSet;

/// Most refcount blocks kept in memory before clean ones are dropped.
const MAX_CACHED_BLOCKS: usize = 512;

/// Refcount mask of a table entry (bits 9..63).
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

struct Block {
    data: Box<[u8]>,
    dirty: bool,
}

/// The refcount structures of a writable image.
pub(crate) struct Refcounts {
    /// Refcount table entries (offsets of refcount blocks, 0 = none).
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    table_dirty: BTreeSet<usize>,
    blocks: IntMap<usize, Block>,
    /// Where all metadata lies, the refcount table and blocks included (kept current here):
    /// the allocator never hands out a cluster it names, and no refcount block is written over
    /// another structure.
    pub(crate) map: MetadataMap,
    order: u32,
    cluster_bits: u32,
    /// log2 of refcount entries per block.
    block_bits: u32,
    /// Cluster index below which nothing is free.
    pub(crate) cursor: u64,
    /// A table growth failed after the in-memory table was switched: memory and disk disagree
    /// on where the table is, so nothing more may be allocated or written.
    poisoned: bool,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl Refcounts {
    /// Loads the refcount table that `header` names.
    pub(crate) fn load(storage: &dyn Storage, header: &Header) -> Result<Self> {
        let (table_offset, table_clusters) =
            (header.refcount_table_offset, header.refcount_table_clusters);
        let (order, cluster_bits) = (header.refcount_order, header.cluster_bits);
        let bytes = u64::from(table_clusters) << cluster_bits;
        let raw = storage
            .read_vec(table_offset, bytes as usize)
            .map_err(io_err("reading refcount table"))?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| be_u64(c, 0) & REFTABLE_OFFSET_MASK)
            .collect();
        let cs = header.cluster_size();
        let mut map = MetadataMap::new(cs);
        map.set_active_l1(header.l1_table_offset, u64::from(header.l1_size) * 8);
        map.set_refcount_table(table_offset, bytes);
        for &o in table.iter().filter(|&&o| o != 0 && o % cs == 0) {
            map.add_refcount_block(o);
        }
        Ok(Refcounts {
            table,
            table_offset,
            table_clusters: table_clusters.into(),
            table_dirty: BTreeSet::new(),
            blocks: IntMap::default(),
            map,
            order,
            cluster_bits,
            block_bits: cluster_bits + 3 - order,
            cursor: 0,
            poisoned: false,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn refuse_if_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Unsupported(
                "an earlier refcount table growth failed; the image must be reopened".into(),
            ));
        }
        Ok(())
    }

    fn block<'a>(
        blocks: &'a mut IntMap<usize, Block>,
        storage: &dyn Storage,
        table: &[u64],
        index: usize,
        cluster_size: u64,
    ) -> Result<&'a mut Block> {
        match blocks.entry(index) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                if table[index] % cluster_size != 0 {
                    return Err(Error::Corrupt(Corruption::Inconsistent(format!(
                        "Refblock offset {} unaligned (reftable index: {})",
                        CHex(table[index]),
                        CHex(index as u64)
                    ))));
                }
                let data = storage
                    .read_vec(table[index], cluster_size as usize)
                    .map_err(io_err("reading refcount block"))?
                    .into_boxed_slice();
                Ok(v.insert(Block { data, dirty: false }))
            }
        }
    }

    /// Refuses clusters `first..first + n` (by index) when any holds metadata: the refcounts
    /// call them free, so the refcounts or the structure's location are wrong.
    fn refuse_metadata(&self, first: u64, n: u64) -> Result<()> {
        self.map
            .refuse(first << self.cluster_bits, n << self.cluster_bits, &[])
    }

    /// The refcount of cluster `cluster` (by index).
    pub(crate) fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        let ri = (cluster >> self.block_bits) as usize;
        match self.table.get(ri) {
            None | Some(0) => Ok(0),
            Some(_) => {
                let cs = self.cluster_size();
                let b = Self::block(&mut self.blocks, storage, &self.table, ri, cs)?;
                let idx = (cluster & ((1 << self.block_bits) - 1)) as usize;
                Ok(refcount::get(&b.data, self.order, idx))
            }
        }
    }

    /// Sets the refcount of a cluster whose block exists.
    pub(crate) fn set_existing(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        let ri = (cluster >> self.block_bits) as usize;
        if self.table.get(ri).copied().unwrap_or(0) == 0 {
            return Err(Error::InvalidArgument(format!(
                "no refcount block covers cluster {cluster}"
            )));
        }
        let cs = self.cluster_size();
        let b = Self::block(&mut self.blocks, storage, &self.table, ri, cs)?;
        let idx = (cluster & ((1 << self.block_bits) - 1)) as usize;
        if !refcount::set(&mut b.data, self.order, idx, value) {
            return Err(Error::Unsupported(format!(
                "refcount of cluster {cluster} would exceed the {}-bit maximum",
                1u32 << self.order
            )));
        }
        b.dirty = true;
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at host offset `host`. The block covering it
    /// must exist (true of every cluster in use). Refuses overflow and underflow.
    pub(crate) fn add(&mut self, storage: &dyn Storage, host: u64, delta: i64) -> Result<u64> {
        let cluster = host >> self.cluster_bits;
        let old = self.get(storage, cluster)?;
        let new = old
            .checked_add_signed(delta)
            .ok_or(Error::Corrupt(Corruption::BadField {
                field: "refcount",
                value: old,
                rule: "refcount would drop below zero: cluster is referenced more than counted",
            }))?;
        if new > refcount::max_value(self.order) {
            return Err(Error::Unsupported(format!(
                "refcount of cluster at {host:#x} would exceed the {}-bit maximum",
                1u32 << self.order
            )));
        }
        self.set_existing(storage, cluster, new)?;
        if new == 0 && cluster < self.cursor {
            self.cursor = cluster;
        }
        Ok(new)
    }

    /// Allocates `n` contiguous free clusters, sets their refcounts to 1 and returns the host
    /// offset of the first. `file_end` (the allocation high-water mark) is raised to cover them.
    pub(crate) fn alloc(
        &mut self,
        storage: &dyn Storage,
        n: u64,
        file_end: &mut u64,
    ) -> Result<u64> {
        self.alloc_named(storage, n, file_end, None)
    }

    /// [`alloc`](Self::alloc) for a structure QEMU names when damaged refcounts would place
    /// it at offset 0 (the header): `Preventing invalid allocation of NAME at offset 0`, a
    /// corruption, instead of the overlap error.
    pub(crate) fn alloc_named(
        &mut self,
        storage: &dyn Storage,
        n: u64,
        file_end: &mut u64,
        name: Option<&str>,
    ) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidArgument("allocation of zero clusters".into()));
        }
        self.refuse_if_poisoned()?;
        'search: loop {
            // Find n consecutive clusters with refcount 0, from the cursor. Like QEMU's
            // free_cluster_index, the cursor then moves past the allocation whatever it skipped:
            // a gap too small for this request waits until a free lowers the cursor again.
            let mut start = self.cursor;
            let mut c = start;
            while c < start + n {
                if self.get(storage, c)? != 0 {
                    start = c + 1;
                }
                c += 1;
            }
            let end = start + n;
            if (end << self.cluster_bits) >> self.cluster_bits != end {
                return Err(Error::Unsupported(
                    "image would exceed the largest offset".into(),
                ));
            }
            if let (0, Some(what)) = (start, name) {
                return Err(super::corrupt::inconsistent(format!(
                    "Preventing invalid allocation of {what} at offset 0"
                )));
            }
            self.refuse_metadata(start, n)?;
            // Make sure blocks cover the run; creating one takes a cluster, so search again.
            let first = (start >> self.block_bits) as usize;
            let last = ((end - 1) >> self.block_bits) as usize;
            for ri in first..=last {
                if ri >= self.table.len() {
                    self.grow_table(storage, ri, file_end)?;
                    continue 'search;
                }
                if self.table[ri] == 0 {
                    // As QEMU does, the new block goes to the first free cluster after the run
                    // when block `ri` or an existing block covers it (so that, as in QEMU, a
                    // block usually describes itself and the run stays where it was found).
                    // Otherwise the run's first cluster takes it: it is free and covered by
                    // block `first` (which exists: blocks are created in this loop's order) or
                    // by block `ri` itself when `ri == first`. The search then starts again.
                    let after = self.first_free_from(storage, end)?;
                    let covered = |b: usize| b == ri || self.table.get(b).is_some_and(|&o| o != 0);
                    let at = if covered((after >> self.block_bits) as usize) {
                        after
                    } else {
                        start
                    };
                    self.refuse_metadata(at, 1)?;
                    self.create_block(storage, ri, at, file_end)?;
                    continue 'search;
                }
            }
            for c in start..end {
                self.set_existing(storage, c, 1)?;
            }
            self.cursor = end;
            *file_end = (*file_end).max(end << self.cluster_bits);
            self.trim(storage)?;
            return Ok(start << self.cluster_bits);
        }
    }

    /// The first cluster at or after `from` (by index) whose refcount is 0 (clusters no block
    /// covers count as 0). Bounded by the refcount table's reach plus one block.
    fn first_free_from(&mut self, storage: &dyn Storage, from: u64) -> Result<u64> {
        let limit = ((self.table.len() as u64 + 1) << self.block_bits).max(from + 1);
        let mut c = from;
        while c < limit && self.get(storage, c)? != 0 {
            c += 1;
        }
        Ok(c)
    }

    /// Makes sure refcount block `ri` exists, placing a new one in a free cluster from the
    /// allocator (used by the refcount rebuild, whose cursor lies past every used cluster).
    pub(crate) fn ensure_block(
        &mut self,
        storage: &dyn Storage,
        ri: usize,
        file_end: &mut u64,
    ) -> Result<()> {
        loop {
            if ri >= self.table.len() {
                self.grow_table(storage, ri, file_end)?;
                continue;
            }
            if self.table[ri] != 0 {
                return Ok(());
            }
            let h = self.alloc(storage, 1, file_end)?;
            if self.table[ri] != 0 {
                // The allocation created block `ri` itself; the spare cluster goes back.
                self.add(storage, h, -1)?;
                return Ok(());
            }
            return self.install_block(storage, ri, h);
        }
    }

    /// Number of refcount table entries, and entries per block as a shift.
    pub(crate) fn shape(&self) -> (usize, u32) {
        (self.table.len(), self.block_bits)
    }

    /// Whether table entry `ri` points to a block.
    pub(crate) fn has_block(&self, ri: usize) -> bool {
        self.table.get(ri).copied().unwrap_or(0) != 0
    }

    /// Makes the (already counted, or about to be) cluster at `host` refcount block `ri`: zeroed
    /// on disk first, so no table entry can ever point to garbage, then entered in the table.
    fn install_block(&mut self, storage: &dyn Storage, ri: usize, host: u64) -> Result<()> {
        let cs = self.cluster_size() as usize;
        storage
            .write_at(&vec![0u8; cs], host)
            .map_err(io_err("writing new refcount block"))?;
        let data = vec![0u8; cs].into_boxed_slice();
        self.blocks.insert(ri, Block { data, dirty: true });
        self.table[ri] = host;
        self.map.add_refcount_block(host);
        self.table_dirty.insert(ri);
        Ok(())
    }

    /// Creates refcount block `ri` in the free cluster `at` (which a block already covers, or
    /// which block `ri` itself covers) and counts it.
    fn create_block(
        &mut self,
        storage: &dyn Storage,
        ri: usize,
        at: u64,
        file_end: &mut u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let host = at << self.cluster_bits;
        self.install_block(storage, ri, host)?;
        self.set_existing(storage, at, 1)?;
        *file_end = (*file_end).max(host + cs);
        Ok(())
    }

    /// Grows the refcount table so that entry `needed` exists (write-ordering rule 4).
    fn grow_table(
        &mut self,
        storage: &dyn Storage,
        needed: usize,
        file_end: &mut u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let mut entries = (needed + 1).max(self.table.len() * 2).max(per_cluster);
        let area = (*file_end).div_ceil(cs);
        // Find a fixed point: the table and the new blocks live in [area, area + len), and every
        // cluster of that area must be covered by a block.
        let mut new_blocks: Vec<usize> = Vec::new();
        let table_clusters = loop {
            let tc = (entries * 8).div_ceil(cs as usize) as u64;
            let len = tc + new_blocks.len() as u64;
            let first = (area >> self.block_bits) as usize;
            let last = ((area + len - 1) >> self.block_bits) as usize;
            let missing: Vec<usize> = (first..=last)
                .filter(|&ri| self.table.get(ri).copied().unwrap_or(0) == 0)
                .collect();
            let need_entries = last + 1;
            if missing == new_blocks && need_entries <= entries {
                break tc;
            }
            new_blocks = missing;
            entries = entries.max(need_entries);
        };
        let bytes = table_clusters * cs;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(
                "refcount table would exceed 8 MiB (image too large for this cluster size)".into(),
            ));
        }
        self.refuse_metadata(area, table_clusters + new_blocks.len() as u64)?;
        let table_at = area << self.cluster_bits;
        let mut table = self.table.clone();
        table.resize((bytes / 8) as usize, 0);
        for (k, &ri) in new_blocks.iter().enumerate() {
            let host = (area + table_clusters + k as u64) << self.cluster_bits;
            table[ri] = host;
            self.map.add_refcount_block(host);
            self.blocks.insert(
                ri,
                Block {
                    data: vec![0u8; cs as usize].into_boxed_slice(),
                    dirty: true,
                },
            );
        }
        let old = (self.table_offset, self.table_clusters);
        self.table = table;
        // From here on the in-memory table is the new one while the header may still name the
        // old: a failure poisons the refcounts (the image must be reopened), or later writes
        // would put new entries past the end of the old table.
        let r = self.persist_grown_table(storage, area, table_clusters, new_blocks.len() as u64);
        if r.is_err() {
            self.poisoned = true;
        }
        r?;
        *file_end =
            (*file_end).max((area + table_clusters + new_blocks.len() as u64) << self.cluster_bits);
        self.table_offset = table_at;
        self.table_clusters = table_clusters;
        self.map.set_refcount_table(table_at, bytes);
        self.table_dirty.clear();
        // The old table's clusters drop their reference now that nothing points to them.
        for c in 0..old.1 {
            self.add(storage, old.0 + c * cs, -1)?;
        }
        Ok(())
    }

    /// Counts the grown table's area (`table_clusters` of table, then `new_blocks` blocks, from
    /// cluster `area`) and persists it: blocks (including the new ones), the whole new table,
    /// flush; then the header, flush.
    fn persist_grown_table(
        &mut self,
        storage: &dyn Storage,
        area: u64,
        table_clusters: u64,
        new_blocks: u64,
    ) -> Result<()> {
        for c in area..area + table_clusters + new_blocks {
            self.set_existing(storage, c, 1)?;
        }
        self.write_blocks(storage)?;
        let table_at = area << self.cluster_bits;
        let mut raw = vec![0u8; (table_clusters << self.cluster_bits) as usize];
        for (i, e) in self.table.iter().enumerate() {
            put_u64(&mut raw, i * 8, *e);
        }
        storage
            .write_at(&raw, table_at)
            .map_err(io_err("writing refcount table"))?;
        storage
            .flush()
            .map_err(io_err("flushing new refcount table"))?;
        let mut hdr = [0u8; 12];
        put_u64(&mut hdr, 0, table_at);
        put_u32(&mut hdr, 8, table_clusters as u32);
        storage
            .write_at(&hdr, 48)
            .map_err(io_err("switching refcount table"))?;
        storage.flush().map_err(io_err("flushing header"))
    }

    /// Where the refcount table is now (offset, clusters): once a growth has been persisted
    /// the header on disk says so, before the engine's copy of the header does.
    pub(crate) fn table_location(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// Writes every dirty block back (safe at any time: blocks hold only increases).
    pub(crate) fn write_blocks(&mut self, storage: &dyn Storage) -> Result<bool> {
        self.refuse_if_poisoned()?;
        let mut keys: Vec<usize> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        for ri in &keys {
            let off = self.table[*ri];
            self.map
                .refuse(off, self.cluster_size(), &[Structure::RefcountBlock])?;
            if let Some(b) = self.blocks.get_mut(ri) {
                storage
                    .write_at(&b.data, off)
                    .map_err(io_err("writing refcount block"))?;
                b.dirty = false;
            }
        }
        Ok(!keys.is_empty())
    }

    /// Writes dirty refcount table entries (after their blocks are durable); the caller
    /// flushes afterwards when this returns `true`.
    ///
    /// A new block's own cluster is counted in the block that covers it, which may be new as
    /// well: its table entry must be durable first, or a crash could leave the second entry
    /// without the first, a reachable refcount block whose refcount is 0 (rule 2). Entries are
    /// therefore written in rounds, each holding the entries whose covering block is already on
    /// disk (or is the block itself), with a flush between rounds.
    pub(crate) fn write_table_entries(&mut self, storage: &dyn Storage) -> Result<bool> {
        self.refuse_if_poisoned()?;
        let mut dirty = std::mem::take(&mut self.table_dirty);
        let wrote = !dirty.is_empty();
        while !dirty.is_empty() {
            let covering = |ri: usize| self.table[ri] >> self.cluster_bits >> self.block_bits;
            let mut round: BTreeSet<usize> = dirty
                .iter()
                .copied()
                .filter(|&ri| {
                    let c = covering(ri);
                    c == ri as u64 || !dirty.contains(&(c as usize))
                })
                .collect();
            if round.is_empty() {
                // A cycle cannot arise (a block is placed where an older block counts it);
                // should it anyway, write everything rather than loop.
                round = std::mem::take(&mut dirty);
            }
            for ri in &round {
                let mut b = [0u8; 8];
                put_u64(&mut b, 0, self.table[*ri]);
                let at = self.table_offset + *ri as u64 * 8;
                // The table's own clusters may hold nothing else (a hostile image may place an
                // L2 table or a refcount block inside them).
                let r = self
                    .map
                    .refuse(at, 8, &[Structure::RefcountTable])
                    .and_then(|()| {
                        storage
                            .write_at(&b, at)
                            .map_err(io_err("writing refcount table entry"))
                    });
                if let Err(e) = r {
                    self.table_dirty.extend(dirty.iter().copied());
                    return Err(e);
                }
                dirty.remove(ri);
            }
            if !dirty.is_empty() {
                if let Err(e) = storage.flush() {
                    self.table_dirty.extend(dirty.iter().copied());
                    return Err(io_err("flushing refcount table entries")(e));
                }
            }
        }
        Ok(wrote)
    }

    /// Keeps the block cache bounded: past the limit, dirty blocks are written back and every
    /// block is dropped (they are re-read on demand).
    fn trim(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.blocks.len() > MAX_CACHED_BLOCKS {
            if !self.table_dirty.is_empty() {
                // A block whose table entry is not yet written must stay in memory.
                self.write_blocks(storage)?;
                let keep: BTreeSet<usize> = self.table_dirty.clone();
                self.blocks.retain(|k, _| keep.contains(k));
            } else {
                self.write_blocks(storage)?;
                self.blocks.clear();
            }
        }
        Ok(())
    }
}
