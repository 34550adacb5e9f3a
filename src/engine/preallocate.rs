//! Preallocation of a new image's clusters (`create -o preallocation=metadata|falloc|full`).

use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::COPIED;

impl Qcow2Image {
    /// Allocates every cluster of the device (preallocation=metadata/falloc/full): L2 tables
    /// and data clusters, contiguous per L2 table; with `write_zeros` the data is written.
    pub(crate) fn preallocate(&self, write_zeros: bool) -> Result<()> {
        let _g = self.lock_everything()?;
        let r = self
            .preallocate_range(0, self.size(), write_zeros)
            .and_then(|()| self.flush_impl());
        self.guard(r)
    }

    /// [`preallocate`](Self::preallocate) of the clusters covering `start..end`, with the range
    /// lock held. With extended L2 entries the subclusters stay unallocated (as in QEMU), so a
    /// backing file still shows through.
    pub(crate) fn preallocate_range(&self, start: u64, end: u64, write_zeros: bool) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let per_table = 1u64 << (g.cluster_bits + g.l2_bits);
        let mut guest = start & !(cs - 1);
        while guest < end {
            let mut m = self.lock_meta();
            self.mark_dirty_if_lazy(&mut m)?;
            let l1_index = (guest / per_table) as usize;
            self.ensure_l2_writable(&mut m, l1_index)?;
            let table_end = ((l1_index as u64 + 1) * per_table).min(end);
            let n = (table_end - guest).div_ceil(cs);
            let host = self.reserve(&mut m, guest, n)?;
            for i in 0..n {
                let gi = guest + i * cs;
                let (old, _) = self.entry_at(&mut m, gi)?;
                self.check_replace(&mut m, gi, old)?;
                self.set_entry(&mut m, gi, (host + i * cs) | COPIED, 0)?;
                self.queue_free(&mut m, old);
            }
            self.note_file_growth(&mut m, host + n * cs);
            drop(m);
            let target = self.data_target();
            if write_zeros {
                let zeros = vec![0u8; (cs * 64).min(n * cs) as usize];
                let mut p = 0;
                while p < n * cs {
                    let k = (n * cs - p).min(zeros.len() as u64) as usize;
                    self.write_data(target, &zeros[..k], host + p, guest + p)?;
                    p += k as u64;
                }
            } else if target.len().map_err(|e| Error::io("preallocating", e))? < host + n * cs {
                target
                    .set_len(host + n * cs)
                    .map_err(|e| Error::io("preallocating", e))?;
            }
            guest = table_end;
        }
        Ok(())
    }
}
