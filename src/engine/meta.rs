//! Mutable metadata of an open image, behind the image's one metadata lock: the active L1
//! table, the L2 slice cache, refcounts (writable images), clusters waiting to be freed, and the
//! header as currently on disk.

use super::cache::SliceCache;
use super::refcount::Refcounts;
use super::shared::L1Table;
use super::Geometry;
use crate::error::{Corruption, Error, Result};
use crate::format::header::Header;
use crate::io::Storage;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;

/// Everything the metadata lock protects.
pub(crate) struct Meta {
    /// Active L1 table (or the viewed snapshot's), published for lock-free readers.
    pub(crate) l1: L1Table,
    /// Indices of L1 entries changed in memory, not yet written.
    pub(crate) l1_dirty: BTreeSet<usize>,
    /// L2 slices, keyed by host offset, published for lock-free readers.
    pub(crate) l2: SliceCache,
    /// One slice's bytes as read from the image (reused: no allocation per miss).
    pub(crate) slice_buf: Vec<u8>,
    /// Refcounts and allocator (writable images only).
    pub(crate) refs: Option<Refcounts>,
    /// Host clusters whose refcount drops by one once the L1/L2 entries that stopped
    /// referencing them are durable (write-ordering rule 3).
    pub(crate) pending_free: Vec<u64>,
    /// Cluster-aligned end of everything allocated or in the file: tables must lie below it.
    pub(crate) file_end: u64,
    /// Length of the image file as far as this process knows.
    pub(crate) file_len: u64,
    /// Where the next compressed cluster may be packed (0: start a new host cluster). Reset at
    /// every flush.
    pub(crate) compressed_cursor: u64,
    /// The header as on disk.
    pub(crate) header: Header,
    /// A metadata write failed: further writes are refused, the in-memory state may be ahead
    /// of the disk.
    pub(crate) broken: bool,
    /// [`Qcow2Image::close`](super::Qcow2Image::close) succeeded: nothing more is written.
    pub(crate) closed: bool,
}

impl Meta {
    /// The error every later request gets once [`Meta::broken`] is set: an image marked corrupt
    /// by a corruption event is [`Corruption::MarkedCorrupt`] (QEMU drops the image's driver
    /// then, and every request fails with `ENOMEDIUM`); one whose metadata write failed asks
    /// to be reopened.
    pub(crate) fn broken_error(&self) -> Error {
        if self
            .header
            .incompatible
            .contains(crate::format::features::IncompatibleFeatures::CORRUPT)
        {
            Corruption::MarkedCorrupt.into()
        } else {
            Error::Unsupported(
                "an earlier metadata write failed; the image must be reopened".into(),
            )
        }
    }

    /// The slice of the L2 table at `l2_offset` that holds entry `l2_index`, from the cache or
    /// the image. Returns the slice's key (its host offset).
    pub(crate) fn slice_key(g: &Geometry, l2_offset: u64, l2_index: u64) -> u64 {
        l2_offset + (l2_index >> g.slice_entry_bits) * g.slice_bytes
    }

    /// Loads (if needed) the slice under `key`. The caller makes sure a dirty victim is written
    /// back first (see [`Meta::would_evict_dirty`]).
    pub(crate) fn load_slice(
        &mut self,
        storage: &dyn Storage,
        g: &Geometry,
        key: u64,
    ) -> Result<&[AtomicU64]> {
        let Meta { l2, slice_buf, .. } = self;
        l2.get_or_load(key, || read_slice(storage, g, key, slice_buf))
    }

    /// Reads the slice under `key` into the cache (the caller knows it is absent and has made
    /// sure no dirty slice gets evicted); returns its slot.
    pub(crate) fn load_slot(
        &mut self,
        storage: &dyn Storage,
        g: &Geometry,
        key: u64,
    ) -> Result<u32> {
        let Meta { l2, slice_buf, .. } = self;
        l2.load_slot(key, || read_slice(storage, g, key, slice_buf))
    }

    /// Whether loading `key` would evict a dirty slice.
    pub(crate) fn would_evict_dirty(&mut self, key: u64) -> bool {
        self.l2.insert_would_evict_dirty(key)
    }

    /// The refcount state; an error for read-only images.
    pub(crate) fn refs(&mut self) -> Result<&mut Refcounts> {
        self.refs.as_mut().ok_or(Error::ReadOnly)
    }

    /// Makes the header's refcount table fields name the table where it is now: a growth of
    /// the table switches the header on disk from inside the allocator, which cannot reach
    /// this copy. Every rewrite of the header from this copy must come after this.
    pub(crate) fn sync_refcount_table(&mut self) {
        if let Some(r) = &self.refs {
            let (offset, clusters) = r.table_location();
            self.header.refcount_table_offset = offset;
            self.header.refcount_table_clusters = clusters as u32;
        }
    }
}

/// Reads the slice at `key` into `buf`.
fn read_slice<'b>(
    storage: &dyn Storage,
    g: &Geometry,
    key: u64,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8]> {
    buf.resize(g.slice_bytes as usize, 0);
    storage
        .read_at(buf, key)
        .map_err(|e| Error::io("reading L2 table", e))?;
    Ok(buf)
}
