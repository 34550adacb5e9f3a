//! The metadata map: where every qcow2 metadata structure of a writable image lies, kept in
//! memory and current as metadata moves, so that no host write lands on metadata it is not an
//! update of (write-ordering rule 7, QEMU's `qcow2_pre_write_overlap_check`).
//!
//! Invariants:
//! - Every structure the image's header, refcount table, L1 tables, snapshot table and bitmap
//!   directory name is in the map while it is in use: the header cluster, the active L1 table,
//!   every active L2 table, the refcount table and every refcount block (these two are kept by
//!   [`Refcounts`](super::refcount::Refcounts) itself), the whole snapshot table, every
//!   snapshot's L1 table, every snapshot's L2 tables (unless there are too many to read at open;
//!   see [`INACTIVE_L1_READ_BUDGET`]), the bitmap directory and every bitmap table.
//! - A structure leaves the map only when nothing on disk or in memory references it any more.
//! - The map is consulted before a data, copy-on-write, compressed or L2-entry write, before the
//!   allocator hands out a cluster its refcounts call free, before a cluster is freed, and before
//!   metadata is written back; a hit is a corruption, never a write.
//!
//! The checks cost a few comparisons and two hash lookups per cluster: ranges that are few
//! (header, L1, refcount table, snapshot table, bitmap directory) are compared directly, many
//! small ranges (snapshot L1 tables, bitmap tables) live in a sorted set of disjoint ranges, and
//! single clusters (L2 tables) in hash maps or a sorted vector.

use super::cache::IntMap;
use crate::error::{Corruption, Error, Result};
use std::collections::BTreeMap;

/// A kind of metadata structure, named as QEMU's overlap check names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Structure {
    /// The header cluster (header, extensions, backing file name).
    Header,
    /// The active L1 table.
    ActiveL1,
    /// The refcount table.
    RefcountTable,
    /// The snapshot table (all of its clusters).
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
    /// An L2 table the active L1 table points to.
    ActiveL2,
    /// A refcount block.
    RefcountBlock,
    /// An L2 table only snapshots point to.
    InactiveL2,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap's table.
    BitmapTable,
    /// The encryption (LUKS) header and its key material. QEMU's overlap check does not know
    /// it (its refcounts alone protect it there); guarding it too is never less safe.
    EncryptionHeader,
}

impl Structure {
    /// The name QEMU gives the structure in "Preventing invalid write on metadata (overlaps
    /// with …)".
    pub(crate) fn name(self) -> &'static str {
        match self {
            Structure::Header => "qcow2_header",
            Structure::ActiveL1 => "active L1 table",
            Structure::RefcountTable => "refcount table",
            Structure::SnapshotTable => "snapshot table",
            Structure::InactiveL1 => "inactive L1 table",
            Structure::ActiveL2 => "active L2 table",
            Structure::RefcountBlock => "refcount block",
            Structure::InactiveL2 => "inactive L2 table",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::BitmapTable => "bitmap table",
            Structure::EncryptionHeader => "encryption header",
        }
    }
}

/// Snapshot L1 tables are read at open to find the snapshots' L2 tables; past this many bytes
/// (after merging overlapping and shared tables) they are not, and snapshot L2 tables are then
/// protected by their refcounts only, as QEMU's default overlap check ("cached") does.
pub(crate) const INACTIVE_L1_READ_BUDGET: u64 = 32 << 20;

/// Disjoint byte ranges, merged on insertion: start → end.
#[derive(Debug, Default, Clone)]
pub(crate) struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Adds `start..end` (merging with neighbours it touches).
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // A range starting at or before `start` may reach into the new one.
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.0.remove(&ps);
            }
        }
        let inside: Vec<u64> = self.0.range(s..=e).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some(ke) = self.0.remove(&k) {
                e = e.max(ke);
            }
        }
        self.0.insert(s, e);
    }

    /// Whether `start..end` meets any range.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.0
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// The ranges, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    /// Total bytes covered.
    pub(crate) fn bytes(&self) -> u64 {
        self.iter().map(|(s, e)| e - s).sum()
    }
}

/// Where the metadata other than the refcount structures lies (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct MetadataMap {
    cluster_size: u64,
    /// Active L1 table: offset and bytes.
    active_l1: (u64, u64),
    /// Refcount table: offset and bytes.
    refcount_table: (u64, u64),
    /// Refcount blocks (cluster offsets).
    refcount_blocks: IntMap<u64, ()>,
    /// Snapshot table: offset and bytes (all its entries).
    snapshot_table: (u64, u64),
    /// Snapshots' L1 tables.
    inactive_l1: RangeSet,
    /// Active L2 tables: cluster offset → number of active L1 entries naming it.
    active_l2: IntMap<u64, u32>,
    /// Snapshots' L2 tables (cluster offsets, sorted, without duplicates).
    inactive_l2: Vec<u64>,
    /// Bitmap directory: offset and bytes.
    bitmap_directory: (u64, u64),
    /// Bitmap tables.
    bitmap_tables: RangeSet,
    /// Encryption header: offset and bytes.
    encryption_header: (u64, u64),
}

/// Whether the byte range `a..a + alen` meets `b..b + blen` (empty ranges meet nothing).
fn meets(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl MetadataMap {
    /// A map of an image with clusters of `cluster_size` bytes, holding the header cluster only.
    pub(crate) fn new(cluster_size: u64) -> Self {
        MetadataMap {
            cluster_size,
            ..Default::default()
        }
    }

    /// Records where the active L1 table lies.
    pub(crate) fn set_active_l1(&mut self, offset: u64, bytes: u64) {
        self.active_l1 = (offset, bytes);
    }

    /// Records where the refcount table lies.
    pub(crate) fn set_refcount_table(&mut self, offset: u64, bytes: u64) {
        self.refcount_table = (offset, bytes);
    }

    /// Adds a refcount block.
    pub(crate) fn add_refcount_block(&mut self, offset: u64) {
        self.refcount_blocks.insert(offset, ());
    }

    /// Removes a refcount block no table entry names any more.
    pub(crate) fn remove_refcount_block(&mut self, offset: u64) {
        self.refcount_blocks.remove(&offset);
    }

    /// Records where the snapshot table lies.
    pub(crate) fn set_snapshot_table(&mut self, offset: u64, bytes: u64) {
        self.snapshot_table = (offset, bytes);
    }

    /// Where the snapshot table lies: offset and bytes.
    pub(crate) fn snapshot_table(&self) -> (u64, u64) {
        self.snapshot_table
    }

    /// The snapshots' L1 tables, merged where they overlap or are shared.
    pub(crate) fn inactive_l1(&self) -> &RangeSet {
        &self.inactive_l1
    }

    /// Adds a snapshot's L1 table.
    pub(crate) fn add_inactive_l1(&mut self, offset: u64, bytes: u64) {
        self.inactive_l1
            .insert(offset, offset.saturating_add(bytes));
    }

    /// Sets the snapshots' L2 tables (cluster offsets, any order, duplicates allowed).
    pub(crate) fn set_inactive_l2(&mut self, mut offsets: Vec<u64>) {
        offsets.sort_unstable();
        offsets.dedup();
        self.inactive_l2 = offsets;
    }

    /// Records where the bitmap directory lies.
    pub(crate) fn set_bitmap_directory(&mut self, offset: u64, bytes: u64) {
        self.bitmap_directory = (offset, bytes);
    }

    /// Records where the encryption header lies.
    pub(crate) fn set_encryption_header(&mut self, offset: u64, bytes: u64) {
        self.encryption_header = (offset, bytes);
    }

    /// Adds a bitmap table.
    pub(crate) fn add_bitmap_table(&mut self, offset: u64, bytes: u64) {
        self.bitmap_tables
            .insert(offset, offset.saturating_add(bytes));
    }

    /// Replaces every bitmap table by `tables` (offset, bytes).
    pub(crate) fn set_bitmap_tables(&mut self, tables: impl Iterator<Item = (u64, u64)>) {
        self.bitmap_tables = RangeSet::default();
        for (offset, bytes) in tables {
            self.add_bitmap_table(offset, bytes);
        }
    }

    /// An active L1 entry now names the L2 table at `offset`.
    pub(crate) fn add_active_l2(&mut self, offset: u64) {
        if offset != 0 {
            *self.active_l2.entry(offset).or_insert(0) += 1;
        }
    }

    /// An active L1 entry no longer names the L2 table at `offset`.
    pub(crate) fn remove_active_l2(&mut self, offset: u64) {
        if let Some(n) = self.active_l2.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.active_l2.remove(&offset);
            }
        }
    }

    /// The first structure (in QEMU's order) other than those in `ignore` that the byte range
    /// `offset..offset + len` meets.
    pub(crate) fn find(&self, offset: u64, len: u64, ignore: &[Structure]) -> Option<Structure> {
        if len == 0 {
            return None;
        }
        let cs = self.cluster_size.max(512);
        let checks = |s: Structure| !ignore.contains(&s);
        if checks(Structure::Header) && offset < cs {
            return Some(Structure::Header);
        }
        // Whole clusters, as QEMU compares them.
        let start = offset & !(cs - 1);
        let end = offset.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        let span = end - start;
        let hit = |s: Structure, (o, b): (u64, u64)| checks(s) && meets(start, span, o, b);
        if hit(Structure::ActiveL1, self.active_l1) {
            return Some(Structure::ActiveL1);
        }
        None.or_else(|| {
            hit(Structure::RefcountTable, self.refcount_table).then_some(Structure::RefcountTable)
        })
        .or_else(|| {
            hit(Structure::SnapshotTable, self.snapshot_table).then_some(Structure::SnapshotTable)
        })
        .or_else(|| {
            (checks(Structure::InactiveL1) && self.inactive_l1.overlaps(start, end))
                .then_some(Structure::InactiveL1)
        })
        .or_else(|| {
            (checks(Structure::ActiveL2) && self.any_cluster(start, end, |c| self.is_active_l2(c)))
                .then_some(Structure::ActiveL2)
        })
        .or_else(|| {
            (checks(Structure::RefcountBlock)
                && self.any_cluster(start, end, |c| self.refcount_blocks.contains_key(&c)))
            .then_some(Structure::RefcountBlock)
        })
        .or_else(|| {
            (checks(Structure::InactiveL2)
                && self.any_cluster(start, end, |c| self.inactive_l2.binary_search(&c).is_ok()))
            .then_some(Structure::InactiveL2)
        })
        .or_else(|| {
            hit(Structure::BitmapDirectory, self.bitmap_directory)
                .then_some(Structure::BitmapDirectory)
        })
        .or_else(|| {
            (checks(Structure::BitmapTable) && self.bitmap_tables.overlaps(start, end))
                .then_some(Structure::BitmapTable)
        })
        .or_else(|| {
            hit(Structure::EncryptionHeader, self.encryption_header)
                .then_some(Structure::EncryptionHeader)
        })
    }

    /// Refuses a write to `offset..offset + len` that meets a structure other than those in
    /// `ignore`, with the corruption QEMU reports ("Preventing invalid write on metadata
    /// (overlaps with …)").
    pub(crate) fn refuse(&self, offset: u64, len: u64, ignore: &[Structure]) -> Result<()> {
        match self.find(offset, len, ignore) {
            Some(s) => Err(Error::Corrupt(Corruption::Inconsistent(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                s.name()
            )))),
            None => Ok(()),
        }
    }

    /// Whether the cluster at `offset` is an active L2 table.
    pub(crate) fn is_active_l2(&self, offset: u64) -> bool {
        self.active_l2.contains_key(&offset)
    }

    /// Whether `f` holds for any cluster in `start..end` (cluster-aligned). Ranges longer than
    /// the tables are answered from the tables instead of cluster by cluster.
    fn any_cluster(&self, start: u64, end: u64, f: impl Fn(u64) -> bool) -> bool {
        let cs = self.cluster_size.max(512);
        let clusters = (end - start) / cs;
        let tables = self.active_l2.len() + self.inactive_l2.len() + self.refcount_blocks.len();
        if clusters as usize > tables {
            return self
                .active_l2
                .keys()
                .chain(self.inactive_l2.iter())
                .chain(self.refcount_blocks.keys())
                .any(|&c| c >= start && c < end && f(c));
        }
        (0..clusters).any(|i| f(start + i * cs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_and_finds() {
        let mut r = RangeSet::default();
        r.insert(100, 200);
        r.insert(300, 400);
        r.insert(150, 320);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(100, 400)]);
        r.insert(500, 600);
        assert!(r.overlaps(399, 401));
        assert!(!r.overlaps(400, 500));
        assert!(r.overlaps(0, 101));
        assert!(!r.overlaps(0, 100));
        assert!(r.overlaps(550, 551));
        assert_eq!(r.bytes(), 400);
    }

    #[test]
    fn finds_in_qemu_order_and_honours_ignore() {
        let cs = 65536;
        let mut m = MetadataMap::new(cs);
        m.set_active_l1(3 * cs, 8);
        m.set_snapshot_table(5 * cs, cs + 1);
        m.add_active_l2(8 * cs);
        m.add_active_l2(8 * cs);
        m.set_inactive_l2(vec![9 * cs, 9 * cs]);
        m.add_bitmap_table(11 * cs + 8, 16);
        assert_eq!(m.find(10, 1, &[]), Some(Structure::Header));
        assert_eq!(m.find(3 * cs + 4096, 1, &[]), Some(Structure::ActiveL1));
        assert_eq!(m.find(6 * cs + 10, 1, &[]), Some(Structure::SnapshotTable));
        assert_eq!(m.find(7 * cs, cs, &[]), None);
        assert_eq!(m.find(7 * cs, cs + 1, &[]), Some(Structure::ActiveL2));
        assert_eq!(m.find(8 * cs, 1, &[Structure::ActiveL2]), None);
        m.remove_active_l2(8 * cs);
        assert_eq!(m.find(8 * cs, 1, &[]), Some(Structure::ActiveL2));
        m.remove_active_l2(8 * cs);
        assert_eq!(m.find(8 * cs, 1, &[]), None);
        assert_eq!(m.find(9 * cs, 1, &[]), Some(Structure::InactiveL2));
        assert_eq!(m.find(11 * cs, 1, &[]), Some(Structure::BitmapTable));
        // A long range is answered from the tables.
        assert_eq!(
            m.find(
                cs,
                1 << 40,
                &[Structure::ActiveL1, Structure::SnapshotTable]
            ),
            Some(Structure::InactiveL2)
        );
    }
}
