//! Host clusters for new data: contiguous runs reserved under the metadata lock (never a
//! cluster the metadata map holds), and given back when a write fails before its entries name
//! them.

use super::meta::Meta;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED};

/// Most clusters one allocation covers.
pub(super) const MAX_RUN_CLUSTERS: u64 = 1024;

/// Host clusters reserved for the rest of an extended-L2 write's allocating run: as QEMU does,
/// the clusters of a run that all need a new host cluster get one contiguous allocation, which
/// the run's clusters then take in guest order.
#[derive(Default)]
pub(super) struct RunPool {
    pub(super) next: u64,
    pub(super) left: u64,
}

impl Qcow2Image {
    /// Reserves `n` host clusters for guest clusters starting at `guest`: contiguous new clusters
    /// in the image, or, with an external data file, the guest offsets themselves.
    pub(crate) fn reserve(&self, m: &mut Meta, guest: u64, n: u64) -> Result<u64> {
        if self.geo.data_file {
            return Ok(guest);
        }
        let s = self.storage.as_ref();
        let Meta { refs, file_end, .. } = m;
        refs.as_mut().ok_or(Error::ReadOnly)?.alloc(s, n, file_end)
    }

    /// The host cluster for the extended-L2 cluster at `c0`, which needs a new one: the next of
    /// `pool`, or the first of a new contiguous reservation covering every cluster from `c0`
    /// to the write's end (`end`, within the L2 table) that needs a new host cluster too.
    pub(super) fn reserve_in_run(
        &self,
        m: &mut Meta,
        c0: u64,
        end: u64,
        pool: &mut RunPool,
    ) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size;
        if pool.left > 0 {
            let host = pool.next;
            pool.next += cs;
            pool.left -= 1;
            return Ok(host);
        }
        let l1_index = c0 >> (g.cluster_bits + g.l2_bits);
        let table_end = ((l1_index + 1) << (g.cluster_bits + g.l2_bits)).min(self.size());
        let end = end.min(table_end);
        let mut n = 1;
        let mut c = c0 + cs;
        while c < end && n < MAX_RUN_CLUSTERS {
            let (e, _) = self.entry_at(m, c)?;
            let in_place = e & COPIED != 0
                && matches!(
                    classify(e, g.cluster_bits, true, g.data_file),
                    ClusterKind::Normal { .. }
                );
            if in_place {
                break;
            }
            n += 1;
            c += cs;
        }
        let host = self.reserve(m, c0, n)?;
        pool.next = host + cs;
        pool.left = n - 1;
        Ok(host)
    }

    /// Gives back clusters reserved by [`reserve`](Self::reserve) that were never published.
    pub(crate) fn unreserve(&self, host: u64, n: u64) {
        if self.geo.data_file {
            return;
        }
        let mut m = self.lock_meta();
        let s = self.storage.as_ref();
        for i in 0..n {
            if let Some(r) = m.refs.as_mut() {
                let _ = r.add(s, host + i * self.geo.cluster_size, -1);
            }
        }
    }
}
