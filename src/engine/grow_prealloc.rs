//! Growing an image with preallocation (`qemu-img resize --preallocation=metadata|falloc|full`).
//!
//! The image grows as [`Qcow2Image::resize`] grows it (the new range reading as zeros even over
//! a longer backing file), then every cluster wholly inside the new range that has no host
//! cluster gets one. The cluster holding the old end, when it is not cluster-aligned, is left as
//! it is: its head may still read from the backing file, which a fresh host cluster would hide.
//!
//! A preallocated cluster always reads as zeros: without data allocation its entry says so
//! (zero subclusters with extended L2, the zero flag on a cluster that had it); with data
//! allocation, or where the host cluster may hold stale bytes (a cluster freed earlier and
//! handed out again, an encrypted image, an external data file), zeros are written into it.

use super::write::ALL_ZERO;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED, ZERO};

impl Qcow2Image {
    /// Grows the image to `new_size` bytes (a multiple of 512, larger than the current size)
    /// and preallocates the clusters of the new range. With `allocate_data` (qemu-img's
    /// `falloc` and `full`) the new clusters hold zeros as data, their subclusters allocated;
    /// without it (`metadata`) they are allocated but read as zeros by their entries.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.resize_preallocated(2 << 20, false)?; // --preallocation=metadata
    /// assert!(img.block_status(1 << 20, 65536)?.host_offset.is_some()); // allocated
    /// let mut buf = [1u8; 512];
    /// img.read_at(&mut buf, 1 << 20)?;
    /// assert_eq!(buf, [0u8; 512]); // and reads as zeros
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn resize_preallocated(&self, new_size: u64, allocate_data: bool) -> Result<()> {
        let old_size = self.size();
        if new_size <= old_size {
            return Err(Error::InvalidArgument(
                "Preallocation can only be used for growing images".into(),
            ));
        }
        let r = self.resize(new_size, false).and_then(|()| {
            self.preallocate_grown(old_size, new_size, allocate_data)
                .and_then(|()| self.flush_impl())
        });
        self.guard(r)
    }

    fn preallocate_grown(&self, old_size: u64, new_size: u64, data: bool) -> Result<()> {
        let _g = self.lock_everything()?;
        let g = self.geo;
        let cs = g.cluster_size;
        let target = self.data_target();
        let zeros = vec![0u8; cs as usize];
        let mut c = old_size.next_multiple_of(cs);
        while c < new_size {
            let mut m = self.lock_meta();
            let (entry, _) = self.entry_at(&mut m, c)?;
            let zero_flag = match classify(entry, g.cluster_bits, g.extended, g.data_file) {
                ClusterKind::Unallocated => false,
                ClusterKind::Zero { host: 0 } => true,
                _ => {
                    c += cs;
                    continue;
                }
            };
            let l1_index = (c >> (g.cluster_bits + g.l2_bits)) as usize;
            self.ensure_l2_writable(&mut m, l1_index)?;
            let end_before = m.file_end;
            let host = self.reserve(&mut m, c, 1)?;
            let stale = g.data_file || host < end_before || self.is_encrypted();
            let (new_entry, new_bitmap) = match (g.extended, data) {
                (true, true) => (host | COPIED, 0xffff_ffff),
                (true, false) => (host | COPIED, ALL_ZERO),
                (false, _) if zero_flag && !data => (host | COPIED | ZERO, 0),
                (false, _) => (host | COPIED, 0),
            };
            drop(m);
            let reads_entry = (g.extended && !data) || new_entry & ZERO != 0;
            if data || (stale && !reads_entry) {
                if let Err(e) = self.write_data(target, &zeros, host, c) {
                    self.unreserve(host, 1);
                    return Err(e);
                }
            } else if target.len().map_err(|e| Error::io("preallocating", e))? < host + cs {
                target
                    .set_len(host + cs)
                    .map_err(|e| Error::io("preallocating", e))?;
            }
            let mut m = self.lock_meta();
            self.note_file_growth(&mut m, host + cs);
            self.set_entry(&mut m, c, new_entry, new_bitmap)?;
            c += cs;
        }
        Ok(())
    }
}
