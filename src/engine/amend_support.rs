//! What `amend` needs of an open image beyond the write path: rewriting cluster 0 with edited
//! header fields and extensions (version, feature bits, data file name), and turning zero
//! clusters into what a version 2 image can express.
//!
//! Ordering of a header rewrite: everything written before is flushed first; when the new
//! header drops the dirty bit, the refcounts a lazy-refcounts image kept in memory are written
//! and flushed before it (rule 5: the dirty bit goes only once the counts on disk are right);
//! then cluster 0 is replaced so that a crash or a torn write leaves the old area or the new
//! one (see `switch_area`).

use super::mapping::Mapped;
use super::write::ZeroMode;
use super::{HeaderArea, Qcow2Image};
use crate::device::BlockDevice;
use crate::engine::HEADER_FULL;
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED};
use crate::format::extension::Extensions;
use crate::format::features::IncompatibleFeatures;
use crate::format::header::Header;
use crate::format::header_area::{
    encode_header_area, normalized_for_rewrite, qemu_feature_table_for,
};

impl Qcow2Image {
    /// Rewrites cluster 0 with the header and extensions `edit` makes of the current ones
    /// (the header as QEMU rewrites it: a version 3 header at its current length). The
    /// backing file name is kept; the feature name table becomes QEMU's for the resulting
    /// version and cluster size.
    pub(crate) fn rewrite_header(
        &self,
        edit: impl FnOnce(&mut Header, &mut Extensions) -> Result<()>,
    ) -> Result<()> {
        self.guard(self.rewrite_header_impl(edit))
    }

    fn rewrite_header_impl(
        &self,
        edit: impl FnOnce(&mut Header, &mut Extensions) -> Result<()>,
    ) -> Result<()> {
        let _all = self.lock_everything()?;
        let mut m = self.lock_meta();
        self.flush_locked(&mut m)?;
        let mut header = normalized_for_rewrite(&m.header);
        let (mut ext, name) = {
            let area = self.area();
            (area.extensions.clone(), area.backing_name.clone())
        };
        edit(&mut header, &mut ext)?;
        let cs = self.geo.cluster_size;
        ext.feature_names = qemu_feature_table_for(header.version, cs);
        let (header, area) = encode_header_area(&header, &ext, name.as_deref(), cs)
            .ok_or_else(|| Error::InvalidArgument(HEADER_FULL.into()))?;
        let cleans = m.header.incompatible.contains(IncompatibleFeatures::DIRTY)
            && !header.incompatible.contains(IncompatibleFeatures::DIRTY);
        if cleans {
            let s = self.storage.as_ref();
            let r = (|| {
                m.refs()?.write_blocks(s)?;
                s.flush().map_err(|e| Error::io("flushing refcounts", e))?;
                if m.refs()?.write_table_entries(s)? {
                    s.flush()
                        .map_err(|e| Error::io("flushing refcount table", e))?;
                }
                Ok::<_, Error>(())
            })();
            if let Err(e) = r {
                m.broken = true;
                return Err(e);
            }
        }
        if let Err(e) = self.switch_area(&m, &area) {
            // The header may be torn: nothing more may be written through this handle.
            m.broken = true;
            return Err(e);
        }
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset as usize
        } else {
            area.len()
        };
        let written = Extensions::parse(&area[header.header_length as usize..ext_end])
            .map_err(Error::from)?;
        // The compression type is part of the geometry fixed at open: a handle whose images
        // now name another one must not write compressed clusters; it takes no more writes.
        if header.compression_type != self.geo.compression {
            m.broken = true;
        }
        m.header = header;
        *self.header_area.write().unwrap_or_else(|e| e.into_inner()) = HeaderArea {
            extensions: written,
            backing_name: name,
        };
        Ok(())
    }

    /// Makes every zero cluster of the active image readable by a version 2 reader, as QEMU's
    /// `qcow2_expand_zero_clusters` does: without a backing file a zero cluster with no host
    /// cluster becomes unallocated (it reads as zeros either way); every other zero cluster
    /// becomes a data cluster holding zeros (its own host cluster when it has one). Then flushes.
    /// `progress` gets (L2 tables' worth of guest range visited, their number), as QEMU counts.
    ///
    /// Internal snapshots' tables are not visited: the caller refuses images with snapshots.
    pub(crate) fn expand_zero_clusters(&self, progress: &dyn Fn(u64, u64)) -> Result<()> {
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
            let run = self.map(pos, size - pos)?;
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
                progress(done, tables);
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
        self.data()?
            .write_at(zeros, host)
            .map_err(|e| Error::io("writing zeros into a zero cluster", e))?;
        let mut m = self.lock_meta();
        self.set_entry(&mut m, c0, host | COPIED, 0)?;
        Ok(true)
    }
}
