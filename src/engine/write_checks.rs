//! The checks the write path makes before it changes anything (write-ordering rule 7): data
//! never lands on metadata, an entry is sound before a write goes through it or replaces it
//! (aligned offsets, valid extended-L2 bitmaps), and what a replaced entry held can be
//! released (no metadata, counted, a compressed descriptor no larger than any writer makes).
//! A failed check is a corruption: the caller's [`guard`](Qcow2Image::guard) marks the image.

use super::corrupt::{inconsistent, CHex};
use super::meta::Meta;
use super::Qcow2Image;
use crate::error::Result;
use crate::format::entry::{classify, ClusterKind, CompressedDescriptor, OFFSET_MASK};

impl Qcow2Image {
    /// Refuses a data write to host bytes `host..host + len` where they hold metadata (QEMU's
    /// overlap check); the caller's [`guard`](Qcow2Image::guard) marks the image corrupt.
    pub(crate) fn check_overlap(&self, m: &mut Meta, host: u64, len: u64) -> Result<()> {
        if self.geo.data_file {
            return Ok(()); // Host offsets refer to the data file, which holds no metadata.
        }
        m.refs()?.map.refuse(host, len, &[])
    }

    /// The L2 table holding the entry of guest offset `guest`, and the entry's index in it (for
    /// QEMU's messages).
    fn l2_position(&self, m: &Meta, guest: u64) -> (u64, u64) {
        let g = self.geo;
        let l1_index = (guest >> (g.cluster_bits + g.l2_bits)) as usize;
        let l2_offset = m.l1.get_or_zero(l1_index) & OFFSET_MASK;
        (
            l2_offset,
            (guest >> g.cluster_bits) & ((1 << g.l2_bits) - 1),
        )
    }

    /// Refuses to write through an L2 entry whose cluster offset is misaligned (QEMU's
    /// wording; the image is then marked corrupt).
    pub(crate) fn check_aligned(&self, m: &mut Meta, guest: u64, host: u64) -> Result<()> {
        let g = self.geo;
        if host & (g.cluster_size - 1) != 0 {
            let (l2_offset, l2_index) = self.l2_position(m, guest);
            let (host_h, l2_offset_h, l2_index_h) = (CHex(host), CHex(l2_offset), CHex(l2_index));
            return Err(inconsistent(format!(
                "Cluster allocation offset {host_h} unaligned (L2 offset: {l2_offset_h}, \
                 L2 index: {l2_index_h})"
            )));
        }
        Ok(())
    }

    /// Checks that a write may replace `entry`, the L2 entry of the guest cluster at `guest`,
    /// with a newly allocated cluster: a misaligned offset is a corruption (QEMU's wording),
    /// and the clusters it holds must be releasable ([`check_release`](Self::check_release)).
    pub(crate) fn check_replace(&self, m: &mut Meta, guest: u64, entry: u64) -> Result<()> {
        let g = self.geo;
        if !g.data_file {
            match classify(entry, g.cluster_bits, g.extended, false) {
                ClusterKind::Zero { host } if host % g.cluster_size != 0 => {
                    let (host_h, guest_h) = (CHex(host), CHex(guest));
                    return Err(inconsistent(format!(
                        "Preallocated zero cluster offset {host_h} unaligned (guest offset: {guest_h})"
                    )));
                }
                ClusterKind::Normal { host } => self.check_aligned(m, guest, host)?,
                _ => {}
            }
        }
        self.check_release(m, entry)
    }

    /// Extended L2: refuses an entry whose bitmap is invalid (a subcluster both allocated and
    /// zero, or allocated subclusters in an unallocated cluster), as QEMU does.
    pub(crate) fn check_bitmap(
        &self,
        m: &mut Meta,
        guest: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let g = self.geo;
        let alloc = bitmap & 0xffff_ffff;
        let invalid = match classify(entry, g.cluster_bits, true, g.data_file) {
            ClusterKind::Normal { .. } => alloc & (bitmap >> 32) != 0,
            ClusterKind::Unallocated => alloc != 0,
            _ => false,
        };
        if invalid {
            let (l2_offset, l2_index) = self.l2_position(m, guest);
            let (l2_offset_h, l2_index_h) = (CHex(l2_offset), CHex(l2_index));
            return Err(inconsistent(format!(
                "Invalid cluster entry found (L2 offset: {l2_offset_h}, L2 index: {l2_index_h})"
            )));
        }
        Ok(())
    }

    /// Checks, before anything changes, that the clusters `entry` (the L2 entry of a guest
    /// cluster, about to be replaced) holds can be released. None may hold metadata (its
    /// refcount belongs to the structure): that is a corruption. One counted 0 is counted now
    /// (reported as a non-fatal event), so that it cannot be handed out before its free is
    /// applied. A misaligned offset cannot be freed: as in QEMU it is reported and the cluster
    /// leaked ([`queue_free`](Self::queue_free) skips it).
    pub(crate) fn check_release(&self, m: &mut Meta, entry: u64) -> Result<()> {
        let g = self.geo;
        if g.data_file {
            return Ok(());
        }
        let cs = g.cluster_size;
        let (first, last) = match classify(entry, g.cluster_bits, g.extended, false) {
            ClusterKind::Normal { host } | ClusterKind::Zero { host } if host != 0 => {
                if host % cs != 0 {
                    self.signal_corruption(
                        m,
                        format!("Cannot free unaligned cluster {}", CHex(host)),
                        false,
                    );
                    return Ok(());
                }
                (host, host)
            }
            ClusterKind::Compressed(d) => {
                let span = self.compressed_release_span(d);
                if self.compressed_oversized(d) {
                    let message = format!(
                        "Compressed cluster at {} claims {} bytes, more than any compressed \
                         cluster needs; only its first cluster is freed",
                        CHex(d.host_offset),
                        d.stored_len()
                    );
                    self.signal_corruption(m, message, false);
                }
                span
            }
            _ => return Ok(()),
        };
        let mut refs = m.refs()?;
        let s = self.storage.as_ref();
        let mut c = first;
        let entry_h = CHex(entry);
        while c <= last {
            let c_h = CHex(c);
            if let Some(st) = refs.map.find(c, cs, &[]) {
                // A reference that only lowers the count of a structure's cluster (counted for
                // the structure and for this entry, as after a repair) may go; one that could
                // free it may not, the frees already queued included.
                let queued = m.pending_free.iter().filter(|&&h| h == c).count() as u64;
                let count = m.refs()?.get(s, c >> g.cluster_bits)?;
                if count > queued + 1 {
                    refs = m.refs()?;
                    c += cs;
                    continue;
                }
                return Err(inconsistent(format!(
                    "Preventing invalid free of cluster {c_h} (overlaps with {}; L2 entry {entry_h})",
                    st.name()
                )));
            }
            // Referenced but counted free: counted for this reference, which the queued free
            // then drops. Counted as free, it could be handed to the very write that replaces
            // `entry` and then freed under it.
            self.count_if_free(m, c, "free", entry)?;
            refs = m.refs()?;
            c += cs;
        }
        Ok(())
    }

    /// Counts the host cluster at `host`, which the L2 entry `entry` references, when its
    /// refcount says free (damaged refcounts): nothing else can have been given it (an
    /// allocation would have counted it), and counted free the allocator could hand it to
    /// other data. Reported as a non-fatal event. A cluster no refcount block covers cannot be
    /// counted: the `what` (write, free) is refused as a corruption.
    pub(crate) fn count_if_free(
        &self,
        m: &mut Meta,
        host: u64,
        what: &str,
        entry: u64,
    ) -> Result<()> {
        let g = self.geo;
        if g.data_file {
            return Ok(()); // Data file clusters are not refcounted.
        }
        let s = self.storage.as_ref();
        let refs = m.refs()?;
        if refs.get(s, host >> g.cluster_bits)? != 0 {
            return Ok(());
        }
        let (host_h, entry_h) = (CHex(host), CHex(entry));
        if !refs.has_block(((host >> g.cluster_bits) >> refs.shape().1) as usize) {
            return Err(inconsistent(format!(
                "Preventing invalid {what} of cluster {host_h} (no refcount block covers it, \
                 still referenced by L2 entry {entry_h})"
            )));
        }
        refs.set_existing(s, host >> g.cluster_bits, 1)?;
        self.signal_corruption(
            m,
            format!("Cluster {host_h} is referenced but its refcount is 0; counting it"),
            false,
        );
        Ok(())
    }

    /// The first and last host clusters whose references a compressed cluster releases. A
    /// compressed cluster is always smaller than a cluster, so its descriptor covers at most a
    /// cluster plus the sector rounding; one claiming more is damaged, and the clusters past its
    /// first one may belong to anything (past the end of the file, counted free, then handed to
    /// new data): only its first cluster is released, the rest leaked.
    pub(crate) fn compressed_release_span(&self, d: CompressedDescriptor) -> (u64, u64) {
        let cs = self.geo.cluster_size;
        let first = d.host_offset & !(cs - 1);
        if self.compressed_oversized(d) {
            return (first, first);
        }
        (first, (d.host_offset + d.stored_len() - 1) & !(cs - 1))
    }

    /// Whether a compressed descriptor covers more than any compressed cluster needs: the
    /// compressed data is smaller than a cluster, so with the sector rounding it spans at most a
    /// cluster plus 511 bytes.
    fn compressed_oversized(&self, d: CompressedDescriptor) -> bool {
        d.stored_len() > self.geo.cluster_size + 511
    }
}
