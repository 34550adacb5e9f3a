//! Creating an internal snapshot in place, as QEMU lays it out (version 3 images).
//!
//! QEMU's `qcow2_snapshot_create` copies the active L1 table for the snapshot, raises the
//! refcount of everything the active tables reach by one where it stands, clears the COPIED
//! flags of the active L1 and L2 entries where they stand, writes a new snapshot table and
//! points the header at it. The result here is the same, byte for byte in every structure's
//! place, so that images, offsets and later allocations match QEMU's (qemu-iotests 060 and 271
//! read host offsets after a snapshot).
//!
//! QEMU's order leaves refcounts and COPIED flags that disagree if it stops half-way. Here the
//! whole change runs under the dirty bit (incompatible bit 0), set and flushed first and
//! cleared last: an image left half-done is dirty, and the next writable open (ours, or
//! QEMU's) recomputes its refcounts and COPIED flags from the metadata before anything else.
//! The snapshot exists exactly when the header's 12-byte update of its count and table has
//! reached the disk. Version 2 images have no dirty bit: their snapshots are made by the
//! atomic switch of [`super::snapshot_ops`].

use super::meta::Meta;
use super::rebuild::Counter;
use super::snapshot_ops::{errno, io_err, EINVAL};
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::Result;
use crate::format::bytes::{put_u32, put_u64};
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use crate::format::features::IncompatibleFeatures;
use crate::format::snapshot::{encode_table, Snapshot};
use crate::format::{refcount, MAX_SNAPSHOT_TABLE_BYTES};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

/// `EFBIG`, QEMU's answer to too large a snapshot table.
const EFBIG: i32 = 27;

impl Qcow2Image {
    /// Creates the snapshot `new` in place (see the module docs). `m` is flushed and the
    /// image version 3.
    pub(super) fn create_snapshot_in_place(
        &self,
        m: &mut Meta,
        new: &super::NewSnapshot,
    ) -> Result<Snapshot> {
        let s = self.storage.as_ref();
        let g = self.geo;
        let (cb, cs) = (g.cluster_bits, g.cluster_size);
        let (mut t, mut snap) = self.plan_create(m, new)?;
        let l1 = m.l1.to_vec();

        // What the active tables reach, counted as QEMU raises it (one per reference).
        let file_len = s.len().map_err(io_err("sizing the image"))?;
        let mut c = Counter::new(s, cb, file_len.div_ceil(cs) + 1, file_len);
        c.l1_entries(&m.header, &l1)?;
        let raises: Vec<(u64, u64)> = c
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(cl, &n)| (cl as u64, n))
            .collect();
        let max = refcount::max_value(m.header.refcount_order);
        for &(cl, n) in &raises {
            let now = m.refs()?.get(s, cl)?;
            if now.checked_add(n).is_none_or(|v| v > max) {
                return Err(errno("refcount overflow", EINVAL));
            }
        }

        let was_dirty = m.header.incompatible.contains(IncompatibleFeatures::DIRTY);
        if !was_dirty {
            m.header.incompatible |= IncompatibleFeatures::DIRTY;
            self.write_incompatible(m)?;
        }

        // The snapshot's L1 table: a copy of the active one, flags and all (as QEMU writes it).
        let l1_bytes = l1.len() as u64 * 8;
        snap.l1_table_offset = if l1.is_empty() {
            0
        } else {
            let at = self.alloc_new(m, l1_bytes)?;
            let mut raw = vec![0u8; l1_bytes as usize];
            for (i, e) in l1.iter().enumerate() {
                put_u64(&mut raw, i * 8, *e);
            }
            self.write_new(m, &raw, at, "writing the snapshot L1 table")?;
            at
        };

        for &(cl, n) in &raises {
            m.refs()?.add(s, cl << cb, n as i64)?;
        }
        self.write_refcounts(m)?;
        s.flush().map_err(io_err("flushing raised refcounts"))?;

        // Every cluster the active tables reach is now shared: no COPIED flag stays.
        let tables: BTreeSet<u64> = l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        for l2 in tables {
            let words = super::open::read_table_words(s, l2, (cs / 8) as usize)?;
            let mut raw = vec![0u8; cs as usize];
            let mut changed = false;
            for (i, &w) in words.iter().enumerate() {
                let shared = i % g.words_per_entry == 0
                    && w & COPIED != 0
                    && matches!(
                        classify(w, cb, g.extended, false),
                        ClusterKind::Normal { .. } | ClusterKind::Zero { .. }
                    );
                changed |= shared;
                put_u64(&mut raw, i * 8, if shared { w & !COPIED } else { w });
            }
            if changed {
                s.write_at(&raw, l2)
                    .map_err(io_err("clearing COPIED flags of an L2 table"))?;
            }
        }
        let active: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        if active != l1 {
            let mut raw = vec![0u8; l1_bytes as usize];
            for (i, e) in active.iter().enumerate() {
                put_u64(&mut raw, i * 8, *e);
            }
            s.write_at(&raw, m.header.l1_table_offset)
                .map_err(io_err("clearing COPIED flags of the L1 table"))?;
        }
        s.flush().map_err(io_err("flushing the active tables"))?;

        // The new snapshot table, then the header's count and offset in one write.
        if let Some(last) = t.snapshots.last_mut() {
            last.l1_table_offset = snap.l1_table_offset;
        }
        let table = encode_table(&t.snapshots, self.size());
        if table.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(errno("the snapshot table would exceed 64 MiB", EFBIG));
        }
        let table_at = self.alloc_new(m, table.len() as u64)?;
        self.write_new(m, &table, table_at, "writing the snapshot table")?;
        self.write_refcounts(m)?;
        s.flush().map_err(io_err("flushing the snapshot table"))?;
        let old_table = m.refs()?.map.snapshot_table();
        let mut head = [0u8; 12];
        put_u32(&mut head, 0, t.snapshots.len() as u32);
        put_u64(&mut head, 4, table_at);
        s.write_at(&head, 60)
            .and_then(|()| s.flush())
            .map_err(io_err(
                "updating the snapshot count and table in the header",
            ))?;

        // The old table is free (a crash before this leaks it).
        if old_table.0 != 0 && old_table.1 > 0 {
            let first = old_table.0 >> cb;
            let last = (old_table.0 + old_table.1 - 1) >> cb;
            self.frees_applied.fetch_add(1, Ordering::SeqCst);
            for cl in first..=last {
                m.refs()?.add(s, cl << cb, -1)?;
            }
            self.write_refcounts(m)?;
            s.flush()
                .map_err(io_err("flushing the freed snapshot table"))?;
            // QEMU discards the freed table (pass-discard-snapshot).
            for cl in first..=last {
                if m.refs()?.get(s, cl)? == 0 {
                    let _ = s.punch_hole(cl << cb, cs);
                }
            }
        }
        let mut header = m.header.clone();
        header.nb_snapshots = t.snapshots.len() as u32;
        header.snapshots_offset = table_at;
        if !was_dirty {
            header.incompatible.remove(IncompatibleFeatures::DIRTY);
            s.write_at(&header.incompatible.bits().to_be_bytes(), 72)
                .and_then(|()| s.flush())
                .map_err(io_err("clearing the dirty bit"))?;
        }
        t.l1 = active;
        self.reload(m, header, &t, table.len() as u64)?;
        Ok(snap)
    }
}

impl Qcow2Image {
    /// Writes the changed refcount blocks, flushes, then the refcount table entries of blocks
    /// allocated since (write-ordering rule 2: a block is on disk before the entry naming it).
    fn write_refcounts(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io_err("flushing refcount blocks"))?;
        if m.refs()?.write_table_entries(s)? {
            s.flush().map_err(io_err("flushing the refcount table"))?;
        }
        Ok(())
    }
}

/// Whether snapshots of an image with this header are made in place.
pub(super) fn in_place(version: u32) -> bool {
    version >= 3
}
