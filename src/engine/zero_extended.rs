//! Zero writes on images with extended L2 entries, in QEMU's order, so that the subcluster
//! bitmaps and the allocation order match what qemu-io leaves (iotest 271).
//!
//! QEMU's block layer splits a zero write at subcluster boundaries into an unaligned head, an
//! aligned middle and an unaligned tail. An unaligned piece becomes a whole zero subcluster
//! when the rest of that subcluster already reads as zeros and the subcluster is unallocated or
//! zero; otherwise it is written as data. The aligned middle sets zero bits: partial clusters
//! at its edges get zero bits (their allocation bits cleared, nothing freed), whole clusters
//! become all-zero (their host cluster kept without `may_unmap`, freed with it, always freed
//! when compressed). An edge cluster that is compressed cannot take zero bits: the whole piece
//! is then written as data.

use super::meta::Meta;
use super::write::ALL_ZERO;
use super::zero_write::ZeroMode;
use super::Qcow2Image;
use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::error::Result;
use crate::format::entry::{classify, ClusterKind, SubclusterBitmap, SubclusterState};

impl Qcow2Image {
    /// Makes guest `offset..end` read as zeros (a zeroing `mode`) on an extended-L2 image; the
    /// range lock is held.
    pub(crate) fn zero_extended(&self, offset: u64, end: u64, mode: ZeroMode) -> Result<()> {
        let ss = 1u64 << self.geo.subcluster_bits;
        let head_end = if offset % ss == 0 {
            offset
        } else {
            end.min(offset.next_multiple_of(ss))
        };
        let tail_start = head_end.max(end & !(ss - 1));
        for (a, b) in [
            (offset, head_end),
            (head_end, tail_start),
            (tail_start, end),
        ] {
            if a < b {
                self.apply_frees()?;
                self.zero_piece(a, b, mode)?;
            }
        }
        Ok(())
    }

    /// Makes the clusters freed so far reusable (a metadata flush), as QEMU's immediate frees
    /// are before its next allocation. Only when some are queued: the zero paths that free
    /// (unmapping, compressed clusters replaced) are the rare ones.
    fn apply_frees(&self) -> Result<()> {
        let mut m = self.lock_meta();
        if m.pending_free.is_empty() {
            return Ok(());
        }
        self.flush_locked(&mut m)
    }

    /// One piece of the block layer's split: unaligned (within one subcluster) or aligned.
    fn zero_piece(&self, o: u64, e: u64, mode: ZeroMode) -> Result<()> {
        let ss = 1u64 << self.geo.subcluster_bits;
        let size = self.size();
        let head = o % ss;
        let tail = if e == size {
            0
        } else {
            e.next_multiple_of(ss) - e
        };
        if head == 0 && tail == 0 {
            if !self.zeroize(o, e, mode)? {
                self.apply_frees()?;
                self.write_zero_data(o, e)?;
            }
            return Ok(());
        }
        let start = o - head;
        let widen = self.reads_zero(start, head)?
            && self.reads_zero(e, tail)?
            && self.subcluster_reads_no_data(start)?;
        if widen && self.zeroize(start, (start + ss).min(size), mode)? {
            return Ok(());
        }
        self.write_zero_data(o, e)
    }

    /// Sets zero bits over `o..e` (subcluster-aligned, or ending at the end of the device) in
    /// QEMU's order: the partial cluster at the head, the whole clusters, the partial cluster
    /// at the tail. A compressed partial cluster stops it there and returns false (what was
    /// done stays done: the caller then writes the whole piece as data, as QEMU does).
    fn zeroize(&self, o: u64, e: u64, mode: ZeroMode) -> Result<bool> {
        let cs = self.geo.cluster_size;
        let size = self.size();
        let head_end = e.min(o.next_multiple_of(cs));
        let tail_start = if e >= size {
            e
        } else {
            head_end.max(e & !(cs - 1))
        };
        let mut m = self.lock_meta();
        if o < head_end && !self.zero_bits(&mut m, o, head_end)? {
            return Ok(false);
        }
        let mut c = head_end;
        while c < tail_start {
            self.zero_whole_cluster(&mut m, c, mode)?;
            c += cs;
        }
        if tail_start < e && !self.zero_bits(&mut m, tail_start, e)? {
            return Ok(false);
        }
        Ok(true)
    }

    /// Zero bits for the subclusters of `a..b` (inside one cluster); their allocation bits are
    /// cleared and nothing is freed, as in QEMU. False, with nothing changed, for a compressed
    /// cluster.
    fn zero_bits(&self, m: &mut Meta, a: u64, b: u64) -> Result<bool> {
        let g = self.geo;
        let c0 = a & !(g.cluster_size - 1);
        let (entry, bitmap) = self.entry_at(m, c0)?;
        match classify(entry, g.cluster_bits, true, g.data_file) {
            ClusterKind::Compressed(_) => return Ok(false),
            // The entry stays: it must be sound to be kept.
            ClusterKind::Normal { host } => self.check_aligned(m, c0, host)?,
            _ => {}
        }
        let first = ((a - c0) >> g.subcluster_bits) as u32;
        let last = (b - c0).div_ceil(1 << g.subcluster_bits) as u32;
        let mut bm = SubclusterBitmap(bitmap);
        for sc in first..last {
            bm.set(sc, SubclusterState::Zero);
        }
        if bm.0 != bitmap {
            self.check_bitmap(m, c0, entry, bitmap)?;
            let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
            self.ensure_l2_writable(m, l1_index)?;
            self.set_entry(m, c0, entry, bm.0)?;
        }
        Ok(true)
    }

    /// A whole cluster reads as zeros: every zero bit set; its host cluster kept without
    /// `may_unmap` (the zero-write modes other than [`ZeroMode::Keep`] unmap), always dropped
    /// when compressed.
    fn zero_whole_cluster(&self, m: &mut Meta, c0: u64, mode: ZeroMode) -> Result<()> {
        let g = self.geo;
        let (entry, bitmap) = self.entry_at(m, c0)?;
        let kind = classify(entry, g.cluster_bits, true, g.data_file);
        let unmap = match kind {
            ClusterKind::Compressed(_) => true,
            ClusterKind::Unallocated | ClusterKind::Zero { host: 0 } => false,
            _ => mode != ZeroMode::Keep,
        };
        let new_entry = if unmap { 0 } else { entry };
        if new_entry == entry && bitmap == ALL_ZERO {
            return Ok(());
        }
        if let (false, ClusterKind::Normal { host }) = (unmap, kind) {
            self.check_aligned(m, c0, host)?;
        }
        if unmap {
            self.check_release(m, entry)?;
        }
        let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
        self.ensure_l2_writable(m, l1_index)?;
        self.set_entry(m, c0, new_entry, ALL_ZERO)?;
        if unmap {
            self.queue_free(m, entry);
        }
        Ok(())
    }

    /// Whether the subcluster at `guest` is unallocated or zero in this image (QEMU widens an
    /// unaligned zero write only over those).
    fn subcluster_reads_no_data(&self, guest: u64) -> Result<bool> {
        let g = self.geo;
        let c0 = guest & !(g.cluster_size - 1);
        let mut m = self.lock_meta();
        let (entry, bitmap) = self.entry_at(&mut m, c0)?;
        let kind = classify(entry, g.cluster_bits, true, g.data_file);
        if matches!(kind, ClusterKind::Compressed(_)) {
            return Ok(false);
        }
        let sc = ((guest - c0) >> g.subcluster_bits) as u32;
        Ok(matches!(
            SubclusterBitmap(bitmap).state(sc),
            SubclusterState::Unallocated | SubclusterState::Zero
        ))
    }

    /// Whether guest `offset..offset + len` reads as zeros by the metadata of the whole chain
    /// (zero subclusters, or unallocated down to a layer that ends or has none), as QEMU's
    /// `is_zero` decides without reading data.
    fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let end = offset.saturating_add(len).min(self.size());
        let mut pos = offset;
        while pos < end {
            let run = self.block_status(pos, end - pos)?;
            match run.kind {
                ExtentKind::Zero => {}
                ExtentKind::Data => return Ok(false),
                ExtentKind::Unallocated => {
                    if let Some(b) = &self.backing {
                        let mut p = pos;
                        let stop = pos + run.len;
                        while p < stop {
                            if p >= b.size() {
                                break;
                            }
                            let inner = chain_status(b.as_ref(), p, (stop - p).min(b.size() - p))?;
                            if inner.kind == ExtentKind::Data {
                                return Ok(false);
                            }
                            p += inner.len;
                        }
                    }
                }
            }
            pos += run.len;
        }
        Ok(true)
    }

    /// Writes zeros as data over `o..e` (QEMU's fallback when zero bits cannot express the
    /// request), in QEMU's bounce-buffer chunks so that one allocation covers a run of clusters.
    fn write_zero_data(&self, o: u64, e: u64) -> Result<()> {
        const CHUNK: u64 = 16 << 20;
        let zeros = vec![0u8; (e - o).min(CHUNK) as usize];
        let mut pos = o;
        while pos < e {
            let n = (e - pos).min(CHUNK);
            self.write_locked(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }
}
