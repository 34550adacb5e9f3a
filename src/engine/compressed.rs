//! Compressed writes (qemu-img `convert -c`, qemu-io `write -c`).
//!
//! Compressed clusters are packed back to back, byte-granular, into host clusters set aside for
//! them (as QEMU does): every host cluster a compressed cluster's bytes touch carries one
//! reference for it. The packing position lives in `Meta::compressed_cursor` and is forgotten at
//! every flush, because frees are applied there and the cluster under the cursor could be freed
//! and reused afterwards.

use super::meta::Meta;
use super::Qcow2Image;
use crate::codec::compress_cluster;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::entry::CompressedDescriptor;

impl Qcow2Image {
    /// Writes the cluster at `offset` (cluster-aligned) compressed. `data` is the cluster's
    /// content: a whole cluster, or, for the device's last cluster, up to the end of the device.
    /// Data whose compressed form is not smaller than a cluster is written uncompressed (QEMU's
    /// rule).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_compressed(0, &vec![b'a'; 65536])?;
    /// assert!(img.block_status(0, 65536)?.compressed);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.guard(self.write_compressed_impl(offset, data))
    }

    fn write_compressed_impl(&self, offset: u64, data: &[u8]) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let size = self.size();
        let len = data.len() as u64;
        if offset % cs != 0 || (len != cs && offset + len != size) || len > cs {
            return Err(Error::InvalidArgument(
                "a compressed write covers exactly one cluster (or the device's last one)".into(),
            ));
        }
        if self.is_encrypted() {
            // QEMU's qemu-io would store the cluster compressed but not encrypted: refused.
            return Err(Error::Unsupported(
                "Compression and encryption not supported at the same time".into(),
            ));
        }
        if g.data_file {
            return Err(Error::Unsupported(
                "compression is not supported with an external data file".into(),
            ));
        }
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let mut z = Vec::new();
        if !compress_cluster(g.compression, &full, &mut z) {
            return self.write_impl(data, offset);
        }
        let _g = self.begin_write(offset, len)?;
        // The range lock keeps the entry as it is read here until it is replaced below.
        let (host, old) = {
            let mut m = self.lock_meta();
            let (old, bitmap) = self.entry_at(&mut m, offset)?;
            if g.extended {
                self.check_bitmap(&mut m, offset, old, bitmap)?;
            }
            self.check_replace(&mut m, offset, old)?;
            // The L2 table first, then the data (QEMU's allocation order).
            let l1_index = (offset >> (g.cluster_bits + g.l2_bits)) as usize;
            self.ensure_l2_writable(&mut m, l1_index)?;
            (self.alloc_compressed(&mut m, z.len() as u64)?, old)
        };
        // Rule 1: the data is in place before the entry that points to it.
        if let Err(e) = self.storage.write_at(&z, host) {
            return Err(Error::io("writing compressed cluster", e));
        }
        let mut m = self.lock_meta();
        self.note_file_growth(&mut m, host + z.len() as u64);
        let desc = CompressedDescriptor::for_bytes(host, z.len() as u64);
        let entry = desc.encode(g.cluster_bits).ok_or_else(|| {
            Error::Unsupported("compressed cluster lies beyond what an L2 entry can address".into())
        })?;
        let l1_index = (offset >> (g.cluster_bits + g.l2_bits)) as usize;
        self.ensure_l2_writable(&mut m, l1_index)?;
        self.set_entry(&mut m, offset, entry, 0)?;
        self.queue_free(&mut m, old);
        Ok(())
    }

    /// Reserves `len` bytes for compressed data and counts a reference on every host cluster
    /// they touch. Returns the host byte offset.
    fn alloc_compressed(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size;
        let s = self.storage.as_ref();
        let cur = m.compressed_cursor;
        let Meta { refs, file_end, .. } = &mut *m;
        let refs = refs.as_mut().ok_or(Error::ReadOnly)?;
        if cur % cs != 0 {
            let cluster = cur & !(cs - 1);
            let room = cluster + cs - cur;
            if len <= room {
                refs.add(s, cluster, 1)?;
                m.compressed_cursor = cur + len;
                return Ok(cur);
            }
            // Continue into the next clusters if they are the next ones free.
            let k = (len - room).div_ceil(cs);
            let h = refs.alloc(s, k, file_end)?;
            if h == cluster + cs {
                refs.add(s, cluster, 1)?;
                m.compressed_cursor = cur + len;
                return Ok(cur);
            }
            for i in 0..k {
                refs.add(s, h + i * cs, -1)?;
            }
        }
        let n = len.div_ceil(cs);
        let h = refs.alloc(s, n, file_end)?;
        m.compressed_cursor = h + len;
        Ok(h)
    }
}
