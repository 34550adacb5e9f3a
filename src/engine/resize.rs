//! Changing the virtual size.
//!
//! Growing may need a larger L1 table, written elsewhere and switched in the header after a
//! flush (write-ordering rule 4), the old one freed afterwards. Growing never exposes stale
//! bytes: the tail of a partial last cluster and any range a longer backing file would show
//! through read as zeros, as in QEMU. Shrinking drops the active image's clusters past the new
//! end (entries cleared and flushed before their refcounts drop); tables and clusters shared
//! with snapshots only lose the active image's reference. An external data file grows with the
//! image, and a raw one has its new range mapped one to one, keeping what the file already
//! holds there.
//!
//! Shrinking then does what QEMU's `qcow2_shrink_reftable` does: refcount blocks left counting
//! nothing (but possibly themselves) leave the refcount table — entries cleared and flushed
//! before their own refcounts drop — and the file loses its tail of free clusters. Every
//! refcount table entry is validated before the shrink changes anything (QEMU finds a bad one
//! only once it is about to drop it, after dropping the data): an unaligned entry, or one
//! naming a block that no block counts exactly once, marks the image corrupt with QEMU's
//! message.

use super::meta::Meta;
use super::refcount::Refcounts;
use super::zero_write::ZeroMode;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::be_u64;
use crate::format::bytes::{put_u32, put_u64};
use crate::format::entry::{COPIED, OFFSET_MASK};
use crate::format::features::IncompatibleFeatures;
use crate::format::refcount;
use crate::format::MAX_L1_BYTES;
use crate::io::StorageExt;
use std::sync::atomic::Ordering;

/// Offset bits of a refcount table entry (bits 9..63, as QEMU reads them).
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl Qcow2Image {
    /// Resizes the image to `new_size` bytes (a multiple of 512). A smaller size is refused
    /// unless `allow_shrink` (qemu-img `--shrink`).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.resize(2 << 20, false)?;
    /// assert_eq!(img.size(), 2 << 20);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.ensure_open()?;
        self.guard(self.resize_impl(new_size, allow_shrink))
    }

    fn resize_impl(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.flag_bitmaps_in_use(super::bitmaps::Flag::All)?;
        let _g = self.lock_everything()?;
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(
                "image size must be a multiple of 512 bytes".into(),
            ));
        }
        let old_size = self.size();
        if new_size != old_size {
            self.check_bitmaps_resize(new_size)?;
        }
        if new_size != old_size && !self.snapshots().is_empty() {
            let v2 = self.lock_meta().header.version < 3;
            if v2 {
                // A v2 snapshot records no disk size: QEMU could not restore it afterwards.
                return Err(Error::Unsupported(
                    "Can't resize a v2 image which has snapshots".into(),
                ));
            }
        }
        if new_size < old_size {
            if !allow_shrink {
                return Err(Error::InvalidArgument(
                    "use the shrink option to make the image smaller; shrinking discards data"
                        .into(),
                ));
            }
            self.shrink(new_size)?;
        } else if new_size > old_size {
            self.grow(old_size, new_size)?;
        }
        self.resize_bitmaps(new_size);
        Ok(())
    }

    fn write_size(&self, new_size: u64) -> Result<()> {
        let mut m = self.lock_meta();
        let s = self.storage.as_ref();
        let r = s
            .write_at(&new_size.to_be_bytes(), 24)
            .and_then(|()| s.flush())
            .map_err(io_err("writing virtual size"));
        if r.is_err() {
            m.broken = true;
        }
        r?;
        m.header.size = new_size;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn grow(&self, old_size: u64, new_size: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        {
            let mut m = self.lock_meta();
            self.mark_dirty_if_lazy(&mut m)?;
            let needed = m
                .header
                .l1_entries_for(new_size)
                .filter(|n| *n <= MAX_L1_BYTES / 8)
                .ok_or_else(|| Error::Unsupported("size needs an L1 table over 32 MiB".into()))?
                as usize;
            if needed > m.l1.len() {
                // Everything clean first, so the in-memory L1 equals the one on disk plus
                // entries whose L2 tables are durable.
                self.flush_locked(&mut m)?;
                // Exactly the entries the size needs, as QEMU's truncate grows it: the
                // table's last cluster is only written as far as the table goes.
                let new_len = needed;
                let clusters = ((new_len * 8) as u64).div_ceil(cs);
                let s = self.storage.as_ref();
                let new_off = {
                    let super::meta::Meta { refs, file_end, .. } = &mut *m;
                    refs.as_mut()
                        .ok_or(Error::ReadOnly)?
                        .alloc(s, clusters, file_end)?
                };
                let mut raw = vec![0u8; new_len * 8];
                for (i, e) in m.l1.to_vec().into_iter().enumerate() {
                    put_u64(&mut raw, i * 8, e);
                }
                s.write_at(&raw, new_off)
                    .map_err(io_err("writing new L1 table"))?;
                self.note_file_growth(&mut m, new_off + raw.len() as u64);
                // New table and its refcounts durable, then the header switch, then a flush.
                self.flush_locked(&mut m)?;
                if !Self::lazy_refcounts(&m) {
                    m.refs()?.write_blocks(s)?;
                }
                s.flush().map_err(io_err("flushing new L1 table"))?;
                let mut hdr = [0u8; 12];
                put_u32(&mut hdr, 0, new_len as u32);
                put_u64(&mut hdr, 4, new_off);
                let r = s
                    .write_at(&hdr, 36)
                    .and_then(|()| s.flush())
                    .map_err(io_err("switching L1 table"));
                if r.is_err() {
                    m.broken = true;
                }
                r?;
                let (old_off, old_len) = (m.header.l1_table_offset, m.l1.len());
                m.header.l1_table_offset = new_off;
                m.header.l1_size = new_len as u32;
                m.refs()?.map.set_active_l1(new_off, (new_len * 8) as u64);
                m.l1.grow(new_len);
                if old_off != 0 && old_len > 0 {
                    for c in 0..((old_len * 8) as u64).div_ceil(cs) {
                        m.pending_free.push(old_off + c * cs);
                    }
                }
                self.flush_locked(&mut m)?;
            }
        }
        let raw_data_file = g.data_file
            && self
                .lock_meta()
                .header
                .autoclear
                .contains(crate::format::features::AutoclearFeatures::DATA_FILE_RAW);
        if !raw_data_file {
            // Stale bytes past the old end inside its last cluster, and backing data the new
            // range would expose, read as zeros — durably so before the new size is: a crash
            // between the two must not leave the larger size showing the stale bytes.
            let mut zero_end = old_size.next_multiple_of(cs).min(new_size);
            if let Some(b) = &self.backing {
                zero_end = zero_end.max(b.size().min(new_size));
            }
            if zero_end > old_size {
                // The range lies past the device's end: zero it with the new size in memory
                // only (writers are excluded by the range lock held; the header still says
                // the old size until `write_size`).
                self.size.store(new_size, Ordering::Release);
                let r = self
                    .zero_body(old_size, zero_end - old_size, ZeroMode::WriteZeroes)
                    .and_then(|()| self.flush_impl());
                self.size.store(old_size, Ordering::Release);
                r?;
            }
        }
        self.write_size(new_size)?;
        if let Some(d) = self.data_storage.as_ref().filter(|_| g.data_file) {
            let len = d.len().map_err(io_err("sizing data file"))?;
            // A raw data file is the guest's content: what it holds past the old end becomes
            // guest data as it is (as in QEMU, iotest 244); only a shorter file is extended.
            if len < new_size {
                d.set_len(new_size).map_err(io_err("growing data file"))?;
            }
        }
        if raw_data_file {
            // A raw data file is the guest's content: the new range is mapped one to one.
            self.preallocate_range(old_size, new_size, false)?;
        }
        self.flush_impl()
    }

    fn shrink(&self, new_size: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let per_table = 1u64 << (g.cluster_bits + g.l2_bits);
        let first_gone = new_size.next_multiple_of(cs);
        {
            let mut m = self.lock_meta();
            self.validate_reftable(&mut m)?;
            self.mark_dirty_if_lazy(&mut m)?;
            let old_size = self.size();
            let mut c = first_gone;
            while c < old_size {
                let l1_index = (c / per_table) as usize;
                let table_start = l1_index as u64 * per_table;
                let l1e = m.l1.get_or_zero(l1_index);
                if l1e & OFFSET_MASK == 0 {
                    c = table_start + per_table;
                    continue;
                }
                if c == table_start {
                    // The whole table goes. An owned table takes its entries' references with
                    // it; a table shared with a snapshot keeps them (the snapshot still uses it).
                    Self::refuse_l1_entry_write(&mut m, l1_index)?;
                    if l1e & COPIED != 0 {
                        let mut p = table_start;
                        while p < table_start + per_table {
                            let (e, _) = self.entry_at(&mut m, p)?;
                            self.check_release(&mut m, e)?;
                            self.queue_free(&mut m, e);
                            p += cs;
                        }
                    }
                    let l2 = l1e & OFFSET_MASK;
                    m.l2.forget_range(l2, l2 + cs);
                    m.pending_free.push(l2);
                    m.refs()?.map.remove_active_l2(l2);
                    m.l1.set(l1_index, 0);
                    m.l1_dirty.insert(l1_index);
                    c = table_start + per_table;
                } else {
                    self.ensure_l2_writable(&mut m, l1_index)?;
                    let (e, bitmap) = self.entry_at(&mut m, c)?;
                    // A full discard: zero subclusters are cleared too.
                    if e != 0 || bitmap != 0 {
                        self.check_release(&mut m, e)?;
                        self.set_entry(&mut m, c, 0, 0)?;
                        self.queue_free(&mut m, e);
                    }
                    c += cs;
                }
            }
            // Entries past the new end are cleared and durable before their clusters are freed.
            self.flush_locked(&mut m)?;
            self.drop_unused_refblocks(&mut m)?;
            self.trim_free_tail(&mut m)?;
        }
        self.write_size(new_size)?;
        if let Some(d) = self.data_storage.as_ref().filter(|_| self.geo.data_file) {
            // As QEMU does, the data file ends where the guest does (data clusters map one to
            // one onto it, so nothing past the new end is referenced).
            d.set_len(new_size)
                .map_err(io_err("truncating data file"))?;
        }
        self.flush_impl()
    }

    /// Makes every refcount block and table entry durable and returns the table's raw entries
    /// as on disk.
    fn durable_reftable(&self, m: &mut Meta) -> Result<Vec<u64>> {
        let s = self.storage.as_ref();
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io_err("flushing refcount blocks"))?;
        if m.refs()?.write_table_entries(s)? {
            s.flush().map_err(io_err("flushing refcount table"))?;
        }
        let h = &m.header;
        let bytes = u64::from(h.refcount_table_clusters) << self.geo.cluster_bits;
        let raw = s
            .read_vec(h.refcount_table_offset, bytes as usize)
            .map_err(io_err("reading refcount table"))?;
        Ok(raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect())
    }

    /// Refuses a refcount table whose entries the shrink could not use or drop (see the module
    /// docs), before anything changes.
    fn validate_reftable(&self, m: &mut Meta) -> Result<()> {
        let table = self.durable_reftable(m)?;
        let cs = self.geo.cluster_size;
        for &e in &table {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off & (cs - 1) != 0 {
                let msg = format!(
                    "Cannot get entry from refcount block cache: Offset {off:#x} is unaligned"
                );
                return Err(self.refblock_corrupt(m, off, msg, false));
            }
            if off.checked_add(cs).is_none_or(|end| end > i64::MAX as u64) {
                // Past any offset a file can have: unreadable (QEMU: EIO, image left alone).
                return Err(Corruption::RefblockDiscard {
                    offset: off,
                    corrupt: None,
                    bad_count: false,
                }
                .into());
            }
        }
        // Every block is counted exactly once, by a block in the table: the shrink may drop
        // any of them (QEMU checks a block only once it is about to drop it, after the data is
        // gone; a block that is not counted so is a corruption either way).
        for &e in &table {
            let off = e & REFTABLE_OFFSET_MASK;
            if off != 0 {
                self.check_counted_once(m, &table, off)?;
            }
        }
        Ok(())
    }

    /// A refcount block must be covered by a block that counts it exactly once (its own
    /// reference), or the image is corrupt.
    fn check_counted_once(&self, m: &mut Meta, table: &[u64], off: u64) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let (_, block_bits) = m.refs()?.shape();
        let ri = off >> cb >> block_bits;
        let covering = usize::try_from(ri)
            .ok()
            .and_then(|i| table.get(i))
            .map_or(0, |e| e & REFTABLE_OFFSET_MASK);
        if covering == 0 {
            let msg = format!("Refblock at {off:#x} is not covered by the refcount structures");
            return Err(self.refblock_corrupt(m, off, msg, false));
        }
        let count = m.refs()?.get(self.storage.as_ref(), off >> cb)?;
        if count != 1 {
            // C's "%#" PRIx64 prints zero as "0".
            let shown = if count == 0 {
                "0".to_string()
            } else {
                format!("{count:#x}")
            };
            let msg = format!(
                "Invalid refcount: refblock offset {covering:#x}, reftable index {ri}, \
                 block offset {off:#x}, refcount {shown}"
            );
            return Err(self.refblock_corrupt(m, off, msg, true));
        }
        Ok(())
    }

    /// Marks the image corrupt (one flushed header write, best effort; version 3 only, as the
    /// bit does not exist before) and refuses further writes; returns the error to report.
    fn refblock_corrupt(
        &self,
        m: &mut Meta,
        offset: u64,
        message: String,
        bad_count: bool,
    ) -> Error {
        m.broken = true;
        if m.header.version >= 3 {
            m.header.incompatible |= IncompatibleFeatures::CORRUPT;
            let s = self.storage.as_ref();
            let _ = s
                .write_at(&m.header.incompatible.bits().to_be_bytes(), 72)
                .and_then(|()| s.flush());
        }
        Corruption::RefblockDiscard {
            offset,
            corrupt: Some(message),
            bad_count,
        }
        .into()
    }

    /// Drops refcount blocks that count nothing but themselves from the refcount table: the
    /// entries are cleared and flushed first, then the blocks' own refcounts drop (a crash in
    /// between leaks them, nothing worse), then the in-memory refcounts are reloaded.
    fn drop_unused_refblocks(&self, m: &mut Meta) -> Result<()> {
        m.sync_refcount_table();
        let table = self.durable_reftable(m)?;
        let s = self.storage.as_ref();
        let (cb, cs) = (self.geo.cluster_bits, self.geo.cluster_size);
        let (_, block_bits) = m.refs()?.shape();
        let order = m.header.refcount_order;
        let self_counting = |ri: usize, off: u64| off >> cb >> block_bits == ri as u64;
        let mut unused = Vec::new();
        for (ri, &e) in table.iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let mut block = s
                .read_vec(off, cs as usize)
                .map_err(io_err("reading refcount block"))?;
            if self_counting(ri, off) {
                let own = ((off >> cb) & ((1 << block_bits) - 1)) as usize;
                refcount::set(&mut block, order, own, 0);
            }
            if block.iter().all(|&b| b == 0) {
                unused.push((ri, off));
            }
        }
        if unused.is_empty() {
            return Ok(());
        }
        for &(_, off) in &unused {
            self.check_counted_once(m, &table, off)?;
        }
        let table_offset = m.header.refcount_table_offset;
        for &(ri, _) in &unused {
            let r = s.write_at(&[0u8; 8], table_offset + ri as u64 * 8);
            if r.is_err() {
                m.broken = true;
            }
            r.map_err(io_err("clearing refcount table entry"))?;
        }
        s.flush().map_err(io_err("flushing refcount table"))?;
        let cursor = m.refs()?.cursor;
        for &(ri, off) in &unused {
            if !self_counting(ri, off) {
                m.refs()?.add(s, off, -1)?;
            }
        }
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io_err("flushing refcounts"))?;
        let mut fresh = Refcounts::load(s, &m.header)?;
        // The metadata map carries over, less the blocks dropped.
        fresh.map = std::mem::take(&mut m.refs()?.map);
        for &(_, off) in &unused {
            fresh.map.remove_refcount_block(off);
        }
        let lowest = unused
            .iter()
            .map(|&(_, off)| off >> cb)
            .min()
            .unwrap_or(cursor);
        fresh.cursor = cursor.min(lowest);
        m.refs = Some(fresh);
        Ok(())
    }

    /// Cuts the file after its last cluster in use, as QEMU does after a shrink. A failure is
    /// reported (QEMU only warns): it leaves free clusters at the end, nothing worse, and the
    /// old virtual size.
    pub(crate) fn trim_free_tail(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let len = s.len().map_err(io_err("sizing image file"))?;
        let mut clusters = len.div_ceil(cs);
        while clusters > 0 && m.refs()?.get(s, clusters - 1)? == 0 {
            clusters -= 1;
        }
        let end = clusters * cs;
        if end < len {
            s.set_len(end)
                .map_err(io_err("truncating the free tail of the image"))?;
            m.file_len = end;
            m.file_end = end;
            self.file_len.store(end, Ordering::Relaxed);
        }
        Ok(())
    }
}
