//! Zero writes and discards: whole clusters change only their L2 entries (the zero flag, or
//! unallocated, their host clusters freed after the next flush), partial clusters are written
//! as zeros; with extended L2 entries, subcluster bits (see `zero_extended`).

use super::write::ALL_ZERO;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK, ZERO};

/// What `zero_impl` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// The range must read as zeros afterwards.
    WriteZeroes,
    /// Whole clusters (subclusters) in the range read as zeros afterwards and free their space;
    /// partial clusters at the edges are left as they are.
    Discard,
    /// Whole clusters in the range become unallocated (they read from the backing file again)
    /// and free their space; partial clusters at the edges are left as they are.
    Deallocate,
    /// As [`ZeroMode::WriteZeroes`], and an unallocated cluster is never left unallocated, even
    /// without a backing file (the image is about to get one: rebase).
    Explicit,
    /// As [`ZeroMode::Explicit`], and a whole cluster this image alone owns keeps its host
    /// cluster (the zero flag on the entry, or zero subclusters): QEMU's zero write without
    /// `BDRV_REQ_MAY_UNMAP` (`qemu-io write -z` without `-u`).
    Keep,
}

impl ZeroMode {
    /// Whether the range must read as zeros afterwards (partial clusters included).
    pub(super) fn zeroes(self) -> bool {
        matches!(
            self,
            ZeroMode::WriteZeroes | ZeroMode::Explicit | ZeroMode::Keep
        )
    }
}

impl Qcow2Image {
    /// Zero writes and discards.
    pub(crate) fn zero_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let _g = self.begin_write(offset, len)?;
        self.zero_body(offset, len, mode)
    }

    /// [`zero_impl`](Self::zero_impl) with the range lock held.
    pub(crate) fn zero_body(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let size = self.size();
        let end = offset + len;
        let (v3, has_backing) = {
            let m = self.lock_meta();
            (
                m.header.version >= 3,
                self.backing.is_some()
                    || self.area().backing_name.is_some()
                    || matches!(mode, ZeroMode::Explicit | ZeroMode::Keep),
            )
        };
        if g.extended && mode.zeroes() {
            return self.zero_extended(offset, end, mode);
        }
        let zeros = vec![0u8; cs as usize];
        let mut pos = offset;
        while pos < end {
            let c0 = pos & !(cs - 1);
            let piece_end = end.min(c0 + cs);
            // A request that reaches the end of the device covers its short last cluster.
            let whole = pos == c0 && (piece_end == c0 + cs || piece_end == size);
            if g.extended {
                // As in QEMU, a discard drops whole clusters only, even with subclusters.
                if whole {
                    self.discard_extended_cluster(c0, mode)?;
                }
            } else if whole && (v3 || !has_backing || mode == ZeroMode::Deallocate) {
                let mut m = self.lock_meta();
                let (entry, _) = self.entry_at(&mut m, c0)?;
                let kind = classify(entry, g.cluster_bits, false, g.data_file);
                let deallocate = mode == ZeroMode::Deallocate;
                let keep = mode == ZeroMode::Keep
                    && v3
                    && matches!(kind, ClusterKind::Normal { .. })
                    && entry & COPIED != 0;
                let new = if v3 && !deallocate { ZERO } else { 0 };
                let untouched = match kind {
                    ClusterKind::Zero { host: 0 } => !deallocate,
                    ClusterKind::Zero { .. } => mode == ZeroMode::Keep,
                    ClusterKind::Unallocated => !has_backing || deallocate,
                    _ => false,
                };
                if keep {
                    let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
                    self.ensure_l2_writable(&mut m, l1_index)?;
                    self.set_entry(&mut m, c0, entry | ZERO, 0)?;
                    drop(m);
                    self.zero_raw_data_file(c0, piece_end - c0)?;
                } else if !untouched {
                    let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
                    self.check_release(&mut m, entry)?;
                    self.ensure_l2_writable(&mut m, l1_index)?;
                    self.set_entry(&mut m, c0, new, 0)?;
                    self.queue_free(&mut m, entry);
                    drop(m);
                    self.zero_raw_data_file(c0, piece_end - c0)?;
                }
            } else if mode.zeroes() {
                self.write_locked(&zeros[..(piece_end - pos) as usize], pos)?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Extended L2, discarding modes: the whole cluster at `c0` is dropped, its subclusters
    /// reading as zeros ([`ZeroMode::Discard`]) or from the backing file
    /// ([`ZeroMode::Deallocate`]).
    pub(super) fn discard_extended_cluster(&self, c0: u64, mode: ZeroMode) -> Result<()> {
        let bits = if mode == ZeroMode::Deallocate {
            0
        } else {
            ALL_ZERO
        };
        let mut m = self.lock_meta();
        let (entry, bitmap) = self.entry_at(&mut m, c0)?;
        let g = self.geo;
        // As QEMU's discard: a cluster that reads from nowhere is left as it is (its zero
        // subclusters stay zero, the others read zeros anyway).
        let unallocated = entry & OFFSET_MASK == 0
            && !matches!(
                classify(entry, g.cluster_bits, true, g.data_file),
                ClusterKind::Compressed(_)
            );
        let has_backing = self.backing.is_some() || self.area().backing_name.is_some();
        if (entry == 0 && bitmap == bits)
            || (mode == ZeroMode::Discard && unallocated && !has_backing)
        {
            return Ok(());
        }
        let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
        self.check_release(&mut m, entry)?;
        self.ensure_l2_writable(&mut m, l1_index)?;
        self.set_entry(&mut m, c0, 0, bits)?;
        self.queue_free(&mut m, entry);
        Ok(())
    }

    /// With a raw external data file, the data file itself must read as the guest does.
    pub(super) fn zero_raw_data_file(&self, offset: u64, len: u64) -> Result<()> {
        let raw = {
            let m = self.lock_meta();
            m.header
                .autoclear
                .contains(crate::format::features::AutoclearFeatures::DATA_FILE_RAW)
        };
        if self.geo.data_file && raw {
            self.data_target()
                .punch_hole(offset, len)
                .map_err(|e| Error::io("zeroing data file", e))?;
        }
        Ok(())
    }
}
