//! What `amend` needs of an open image beyond the write path and the header rewrite
//! (`header_update.rs`): turning zero clusters into what a version 2 image can express.

use super::mapping::Mapped;
use super::write::ZeroMode;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED};

impl Qcow2Image {
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
        self.write_data(self.data()?.as_ref(), zeros, host, c0)?;
        let mut m = self.lock_meta();
        self.set_entry(&mut m, c0, host | COPIED, 0)?;
        Ok(true)
    }
}
