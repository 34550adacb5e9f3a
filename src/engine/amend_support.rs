//! What `amend` needs of an open image beyond the write path and the header rewrite
//! (`header_update.rs`): turning zero clusters into what a version 2 image can express, in
//! the active image and in internal snapshots.

use super::mapping::Mapped;
use super::meta::Meta;
use super::open::read_table_words;
use super::overlap::Structure;
use super::zero_write::ZeroMode;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::bytes::put_u64;
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use crate::format::header::check_table;
use crate::format::MAX_L1_BYTES;
use std::collections::BTreeSet;

impl Qcow2Image {
    /// Makes every zero cluster of the active image readable by a version 2 reader, as QEMU's
    /// `qcow2_expand_zero_clusters` does: without a backing file a zero cluster with no host
    /// cluster becomes unallocated (it reads as zeros either way); every other zero cluster
    /// becomes a data cluster holding zeros (its own host cluster when it has one). Then flushes.
    /// `progress` gets (L2 tables' worth of guest range visited, their number), as QEMU counts.
    ///
    /// Internal snapshots' tables are [`Self::expand_snapshot_zero_clusters`]'s.
    /// `progress` returning `false` stops the expansion with [`Error::Cancelled`] (what was
    /// expanded stays expanded: the image reads the same either way).
    pub(crate) fn expand_zero_clusters(&self, progress: &dyn Fn(u64, u64) -> bool) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.geo.extended {
            return Err(Error::Unsupported(
                "zero clusters of extended L2 entries cannot be expanded".into(),
            ));
        }
        let size = self.size();
        let cs = self.geo.cluster_size;
        let backed = self.backing.is_some() || self.area().backing_name.is_some();
        let zeros = vec![0u8; cs as usize];
        let per_table = cs << self.geo.l2_bits;
        let tables = size.div_ceil(per_table);
        let mut reported = 0;
        let mut pos = 0;
        while pos < size {
            let run = self.guard(self.map(pos, size - pos))?;
            let run_end = pos + run.len;
            if let Mapped::Zero { host } = run.mapped {
                // Cluster by cluster: each step takes the range lock of one cluster.
                let mut c = pos;
                while c < run_end {
                    let n = cs.min(size - c);
                    if host.is_none() && !backed {
                        self.guard(self.zero_impl(c, n, ZeroMode::Deallocate))?;
                    } else if !(host.is_some() && self.guard(self.zero_fill_in_place(c, &zeros))?) {
                        self.write_at(&zeros[..n as usize], c)?;
                    }
                    c += n;
                }
            }
            pos = run_end;
            // Reported once per L2 table's range done, as QEMU reports each L1 entry.
            let done = if pos == size { tables } else { pos / per_table };
            if done != reported {
                reported = done;
                if !progress(done, tables) {
                    self.flush()?;
                    return Err(Error::Cancelled);
                }
            }
        }
        self.flush()
    }

    /// Turns the zero cluster with a host cluster at guest offset `c0` into a data cluster
    /// holding zeros in that same host cluster, as QEMU does, when the active image alone
    /// references it. Returns false (nothing done) otherwise. The zeros are written before the
    /// entry changes (rule 1: the entry reaches the disk after the data, at the next flush).
    fn zero_fill_in_place(&self, c0: u64, zeros: &[u8]) -> Result<bool> {
        let g = self.geo;
        let _range = self.begin_write(c0, 1)?;
        let mut m = self.lock_meta();
        let (entry, _) = self.entry_at(&mut m, c0)?;
        let ClusterKind::Zero { host } = classify(entry, g.cluster_bits, false, g.data_file) else {
            return Ok(false);
        };
        let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
        let l2_private = m.l1.get_or_zero(l1_index) & COPIED != 0;
        if host == 0
            || !l2_private
            || m.refs()?
                .get(self.storage.as_ref(), host >> g.cluster_bits)?
                != 1
        {
            return Ok(false);
        }
        m.refs()?.map.refuse(host, g.cluster_size, &[])?;
        drop(m);
        self.write_data(self.data()?.as_ref(), zeros, host, c0)?;
        let mut m = self.lock_meta();
        self.set_entry(&mut m, c0, host | COPIED, 0)?;
        Ok(true)
    }

    /// Makes every zero cluster of the internal snapshots readable by a version 2 reader, as
    /// QEMU's `qcow2_expand_zero_clusters` does for snapshot L1 tables; call it after
    /// [`Self::expand_zero_clusters`], which leaves no zero cluster in an L2 table the active
    /// image uses (a shared one is copied by the write path), so every table changed here
    /// belongs to snapshots only. In a table referenced `r` times, a zero cluster becomes
    /// unallocated when the image has no backing file, else a new cluster holding zeros with a
    /// refcount of `r`; a host cluster the zero entry kept loses those `r` references.
    ///
    /// Unlike QEMU, a zero entry's host cluster is never written: QEMU writes zeros over it,
    /// while an entry of another table (the active image's, after a zero write over shared
    /// data) may still read its data (qemu-img 10 destroys that snapshot data, and leaves
    /// COPIED flags `check` reports).
    ///
    /// Order per table: new clusters (counted, zeroed, flushed), the table written in place,
    /// flushed, then the old host clusters released. A crash leaves each entry old or new (both
    /// read zeros) and at worst leaked clusters.
    pub(crate) fn expand_snapshot_zero_clusters(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let _all = self.lock_everything()?;
        let mut m = self.lock_meta();
        self.flush_locked(&mut m)?;
        m.l2.forget_range(0, u64::MAX);
        let r = self.expand_snapshot_tables(&mut m);
        if r.is_err() {
            m.broken = true;
        }
        r
    }

    fn expand_snapshot_tables(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        let g = self.geo;
        let cs = g.cluster_size;
        let mut tables = BTreeSet::new();
        for sn in self.snapshots() {
            let bytes = u64::from(sn.l1_size) * 8;
            if bytes > MAX_L1_BYTES {
                return Err(Corruption::BadTable {
                    table: "snapshot L1 table",
                    offset: sn.l1_table_offset,
                    size: bytes,
                    rule: "larger than 32 MiB",
                }
                .into());
            }
            check_table(
                "snapshot L1 table",
                sn.l1_table_offset,
                bytes,
                cs,
                m.file_end,
            )?;
            let l1 = read_table_words(s, sn.l1_table_offset, sn.l1_size as usize)?;
            tables.extend(l1.iter().map(|e| e & OFFSET_MASK).filter(|&o| o != 0));
        }
        let backed = self.backing.is_some() || self.area().backing_name.is_some();
        for l2 in tables {
            if l2 % cs != 0 || l2.checked_add(cs).is_none_or(|end| end > m.file_end) {
                return Err(Corruption::Inconsistent(format!(
                    "snapshot L2 table offset {l2:#x} unaligned or past the end of the file"
                ))
                .into());
            }
            self.expand_snapshot_table(m, l2, backed)?;
        }
        self.trim_free_tail(m)
    }

    /// Expands the zero clusters of the snapshot-only L2 table at `l2` (see
    /// [`Self::expand_snapshot_zero_clusters`]).
    fn expand_snapshot_table(&self, m: &mut Meta, l2: u64, backed: bool) -> Result<()> {
        let s = self.storage.as_ref();
        let g = self.geo;
        let cs = g.cluster_size;
        let mut words = read_table_words(s, l2, (cs / 8) as usize)?.into_vec();
        let mut released = Vec::new();
        let mut changed = false;
        let refs_of_table = m.refs()?.get(s, l2 >> g.cluster_bits)?;
        let zeros = vec![0u8; cs as usize];
        for w in words.iter_mut() {
            let ClusterKind::Zero { host } = classify(*w, g.cluster_bits, false, false) else {
                continue;
            };
            if refs_of_table == 0 {
                return Err(Corruption::Inconsistent(format!(
                    "snapshot L2 table at {l2:#x} has a refcount of 0"
                ))
                .into());
            }
            if host != 0 {
                released.push(host);
            }
            if backed && self.is_encrypted() {
                // The zeros would have to be written through the cipher, whose IV (legacy
                // AES: the guest sector) a snapshot-only table does not give.
                return Err(Error::Unsupported(
                    "expanding zero clusters of snapshots of an encrypted image with a backing \
                     file"
                        .into(),
                ));
            }
            *w = if backed {
                let at = {
                    let Meta { refs, file_end, .. } = &mut *m;
                    refs.as_mut()
                        .ok_or(Error::ReadOnly)?
                        .alloc(s, 1, file_end)?
                };
                m.refs()?.add(s, at, refs_of_table as i64 - 1)?;
                m.refs()?.map.refuse(at, cs, &[])?;
                s.write_at(&zeros, at)
                    .map_err(|e| Error::io("writing a zeroed cluster", e))?;
                self.note_file_growth(m, at + cs);
                if refs_of_table == 1 {
                    at | COPIED
                } else {
                    at
                }
            } else {
                0
            };
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io("flushing new clusters"))?;
        let mut raw = vec![0u8; cs as usize];
        for (i, w) in words.iter().enumerate() {
            put_u64(&mut raw, i * 8, *w);
        }
        m.refs()?.map.refuse(l2, cs, &[Structure::InactiveL2])?;
        s.write_at(&raw, l2)
            .and_then(|()| s.flush())
            .map_err(io("writing a snapshot L2 table"))?;
        // Freed clusters only snapshots used: no read of the active image meets them.
        for host in released {
            m.refs()?.add(s, host, -(refs_of_table as i64))?;
        }
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io("flushing released clusters"))?;
        Ok(())
    }
}
