//! The qcow2 image at run time: open and validation, the L2 cache, guest → host mapping, the
//! read path and the copy-on-write write path.
//!
//! Locking: all metadata (`meta::Meta`: L1, L2 slice cache, refcounts, allocator) sits behind
//! one mutex that is held while entries are changed (and, on a miss, while one slice is read
//! from the image). It is never held during guest data I/O, so readers and writers of different
//! clusters proceed in parallel. A lookup whose L2 slices are cached takes no lock at all: the
//! L1 table and the cached slices are published under a sequence counter (see `shared.rs`) that
//! every change bumps, and a lookup that overlapped a change retries under the mutex. Writers
//! additionally hold a range lock on the guest clusters they touch, so two requests never
//! allocate or free the same guest cluster at once. Because a read holds no lock during its data
//! I/O, a cluster it mapped can be freed and reused meanwhile; frees are counted, and a read that
//! overlapped some is done again (see `read_at`).

mod allocate;
mod amend_support;
mod bitmap_api;
mod bitmaps;
mod cache;
mod compressed;
mod corrupt;
mod dirty_bitmap;
mod encryption;
mod flush;
mod grow_prealloc;
mod header_update;
mod l2_update;
mod mapping;
mod meta;
mod open;
mod overlap;
mod preallocate;
mod range_lock;
pub(crate) mod rebuild;
mod refcount;
mod resize;
mod shared;
mod snapshot_create;
mod snapshot_ops;
pub(crate) mod snapshot_table;
mod write;
mod write_checks;
mod zero_extended;
mod zero_write;

pub use bitmaps::MAX_BITMAP_MEMORY;
pub use corrupt::{CorruptionEvent, CorruptionReporter};
pub use dirty_bitmap::DirtyBitmap;
pub use encryption::{EncryptionInfo, EncryptionOptions};
pub use header_update::HEADER_FULL;
pub use open::{Qcow2Options, SnapshotRef, DEFAULT_L2_CACHE_BYTES};
pub use snapshot_ops::NewSnapshot;

use crate::codec::decompress_cluster;
use crate::device::{check_range, BlockDevice, DiscardMode, Extent, ExtentKind};
use crate::error::{Corruption, Error, Result};
use crate::format::bitmap::BitmapEntry;
use crate::format::entry::CompressedDescriptor;
use crate::format::extension::Extensions;
use crate::format::header::{CompressionType, Header};
use crate::format::snapshot::Snapshot;
use crate::io::Storage;
use mapping::Mapped;
use meta::Meta;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Sizes derived from the header, computed once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    /// log2 of L2 entries per table.
    pub(crate) l2_bits: u32,
    /// 64-bit words per L2 entry (1 standard, 2 extended).
    pub(crate) words_per_entry: usize,
    /// Bytes of one cached L2 slice.
    pub(crate) slice_bytes: u64,
    /// log2 of L2 entries per slice.
    pub(crate) slice_entry_bits: u32,
    pub(crate) extended: bool,
    pub(crate) subcluster_bits: u32,
    pub(crate) data_file: bool,
    pub(crate) compression: CompressionType,
}

/// Largest slice of an L2 table read and cached at once.
const MAX_SLICE_BYTES: u64 = 4096;

impl Geometry {
    fn new(h: &Header) -> Self {
        let cluster_size = h.cluster_size();
        let slice_bytes = cluster_size.min(MAX_SLICE_BYTES);
        let entry_bytes = h.l2_entry_size();
        let extended = h.has_extended_l2();
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_bits: h.l2_bits(),
            words_per_entry: (entry_bytes / 8) as usize,
            slice_bytes,
            slice_entry_bits: (slice_bytes / entry_bytes).trailing_zeros(),
            extended,
            subcluster_bits: if extended {
                h.cluster_bits - 5
            } else {
                h.cluster_bits
            },
            data_file: h.has_data_file(),
            compression: h.compression_type,
        }
    }
}

/// The header extensions and the backing file name, as on disk.
#[derive(Debug, Clone)]
pub(crate) struct HeaderArea {
    pub(crate) extensions: Extensions,
    pub(crate) backing_name: Option<Vec<u8>>,
}

/// An open qcow2 image: reads, copy-on-write writes, zero writes, discards, resizes,
/// snapshots, bitmaps and key slots, through [`BlockDevice`] and its own methods.
///
/// Created by [`Qcow2Image::open`] (read-only), [`Qcow2Image::open_writable`],
/// [`Qcow2Image::open_snapshot`], [`create_qcow2_on`](crate::ops::create::create_qcow2_on) or,
/// with backing and data files resolved under a policy, by [`crate::chain::open`]. Shared
/// between threads as an `Arc` (see the threading contract of [`BlockDevice`]); a writable
/// image is closed with [`close`](Qcow2Image::close), which reports what dropping it cannot.
pub struct Qcow2Image {
    storage: Arc<dyn Storage>,
    data_storage: Option<Arc<dyn Storage>>,
    /// The parts of cluster 0 a rebase rewrites while the image is open.
    header_area: std::sync::RwLock<HeaderArea>,
    /// Internal snapshots as on disk (replaced whole by snapshot operations).
    snapshots: std::sync::RwLock<Vec<Snapshot>>,
    /// The bitmap directory as on disk.
    bitmaps: std::sync::RwLock<Vec<BitmapEntry>>,
    /// Persistent bitmaps kept current while the image is writable (see [`bitmaps`]).
    bitmap_state: Mutex<bitmaps::BitmapState>,
    /// Serializes rewrites of the bitmap directory.
    bitmap_ops: Mutex<()>,
    backing: Option<Arc<dyn BlockDevice>>,
    geo: Geometry,
    size: AtomicU64,
    /// Length of the image file as far as this process knows (bounds compressed reads).
    file_len: AtomicU64,
    meta: Mutex<Meta>,
    /// What readers see of `meta` without its lock (L1, cached L2 slices); changed only by
    /// holders of the lock (see [`shared`]).
    shared: Arc<shared::Shared>,
    /// L2 cache hits of lock-free lookups.
    fast_hits: shared::HitCounter,
    /// Times queued cluster frees were applied (see [`BlockDevice::read_at`] for why).
    frees_applied: AtomicU64,
    writable: bool,
    /// Guest byte ranges (cluster-aligned) that a write, zeroing or discard is working on.
    inflight: Mutex<Vec<(u64, u64)>>,
    inflight_done: Condvar,
    /// The snapshot a read-only view shows.
    view: Option<Snapshot>,
    /// Where corruption events go.
    reporter: Option<CorruptionReporter>,
    /// The cipher of an encrypted image (see [`encryption`]).
    encryption: Option<encryption::Encryption>,
    /// A corruption event has been reported (later ones are suppressed, see [`corrupt`]).
    corruption_signaled: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("storage", &self.storage)
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("writable", &self.writable)
            .field("cluster_size", &self.geo.cluster_size)
            .field("backing", &self.backing.is_some())
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// The header as currently on disk.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert_eq!(img.header().version, 3);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn header(&self) -> Header {
        self.lock_meta().header.clone()
    }

    /// Whether the image was opened for writing.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.is_writable());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The header extensions, as on disk now.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.extensions().bitmaps.is_none());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn extensions(&self) -> Extensions {
        self.area().extensions.clone()
    }

    /// The backing file name as stored (bytes), if the image names one.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.backing_file_name().is_none());
    /// img.set_backing_link(Some(b"base.raw"), Some(b"raw"))?;
    /// assert_eq!(img.backing_file_name().as_deref(), Some(&b"base.raw"[..]));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn backing_file_name(&self) -> Option<Vec<u8>> {
        self.area().backing_name.clone()
    }

    /// The backing file format from the header extension, if recorded.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.set_backing_link(Some(b"base.raw"), Some(b"raw"))?;
    /// assert_eq!(img.backing_format().as_deref(), Some(&b"raw"[..]));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn backing_format(&self) -> Option<Vec<u8>> {
        self.area().extensions.backing_format.clone()
    }

    /// The external data file name from the header extension, if recorded.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.data_file_name().is_none());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn data_file_name(&self) -> Option<Vec<u8>> {
        self.area().extensions.data_file.clone()
    }

    fn area(&self) -> std::sync::RwLockReadGuard<'_, HeaderArea> {
        // Writers replace the whole value in one assignment: a poisoned lock still holds a
        // consistent one.
        self.header_area.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the image keeps its data in an external data file.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(!img.has_data_file());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn has_data_file(&self) -> bool {
        self.geo.data_file
    }

    /// Internal snapshots, as on disk now.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::NewSnapshot;
    /// img.create_snapshot(&NewSnapshot::now("s1"))?;
    /// assert_eq!(img.snapshots()[0].name, "s1");
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn snapshots(&self) -> Vec<Snapshot> {
        // Writers replace the whole list in one assignment: a poisoned lock still holds a
        // consistent one.
        self.snapshots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Persistent bitmaps listed in the bitmap directory, as on disk now (while a writable
    /// open tracks them, flagged in use; bitmaps added since open are stored on close).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b0", 65536, true)?;
    /// img.close()?; // the bitmap is stored
    /// assert_eq!(img.bitmaps()[0].name, "b0");
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn bitmaps(&self) -> Vec<BitmapEntry> {
        self.bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The snapshot being viewed, if the image was opened on one.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.snapshot_view().is_none()); // the active image
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn snapshot_view(&self) -> Option<&Snapshot> {
        self.view.as_ref()
    }

    /// Cluster size in bytes.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert_eq!(img.cluster_size(), 65536);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }

    /// The storage under the image.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::io::Storage;
    /// assert!(img.storage().len().map_err(|e| qcow2kit::Error::io("len", e))? > 0);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Attaches the backing device that unallocated clusters read from.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::RawImage;
    /// let mut top = img;
    /// top.set_backing_link(Some(b"base.raw"), Some(b"raw"))?;
    /// let base = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![4; 1 << 20])), false)?;
    /// top.set_backing(Some(Arc::new(base)));
    /// let mut buf = [0u8; 512];
    /// top.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [4u8; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn set_backing(&mut self, backing: Option<Arc<dyn BlockDevice>>) {
        self.backing = backing;
    }

    /// Attaches the storage of the external data file.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// // An image without an external data file never reads from one.
    /// let mut img = img;
    /// img.set_data_file(Arc::new(MemoryStorage::new()));
    /// assert!(!img.has_data_file());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn set_data_file(&mut self, storage: Arc<dyn Storage>) {
        self.data_storage = Some(storage);
    }

    /// L2 cache (hits, misses) since open. Hits made without the metadata lock are counted
    /// per thread without atomic read-modify-writes, so under concurrency the hit count is a
    /// lower bound.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_at(&[1; 512], 0)?;
    /// let mut buf = [0u8; 512];
    /// img.read_at(&mut buf, 0)?;
    /// let (hits, misses) = img.cache_stats();
    /// assert!(hits + misses > 0);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn cache_stats(&self) -> (u64, u64) {
        let (hits, misses) = self.lock_meta().l2.stats();
        (hits + self.fast_hits.total(), misses)
    }

    fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock cannot leave a half-updated cache list (each operation
        // completes its list updates before returning); metadata changes are published in one
        // step each. A poisoned lock is therefore still usable.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data(&self) -> Result<&Arc<dyn Storage>> {
        if self.geo.data_file {
            self.data_storage.as_ref().ok_or_else(|| {
                Error::Unsupported("image has an external data file that is not attached".into())
            })
        } else {
            Ok(&self.storage)
        }
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        if offset >= bsize {
            buf.fill(0);
            return Ok(());
        }
        let n = (bsize - offset).min(buf.len() as u64) as usize;
        b.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn read_compressed(
        &self,
        desc: CompressedDescriptor,
        in_cluster: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if desc.host_offset >= self.file_len.load(Ordering::Relaxed) {
            return Err(Corruption::BadCompressedCluster {
                host_offset: desc.host_offset,
                rule: "compressed data lies past the end of the file".into(),
            }
            .into());
        }
        // stored_len ≤ 2 × cluster size by construction of the descriptor.
        let stored = desc.stored_len() as usize;
        let mut input = vec![0u8; stored];
        self.storage
            .read_at(&mut input, desc.host_offset)
            .map_err(|e| Error::io("reading compressed cluster", e))?;
        let cs = self.geo.cluster_size as usize;
        let fail = |rule| {
            Error::Corrupt(Corruption::BadCompressedCluster {
                host_offset: desc.host_offset,
                rule,
            })
        };
        if in_cluster == 0 && out.len() == cs {
            decompress_cluster(self.geo.compression, &input, out).map_err(fail)?;
        } else {
            let mut tmp = vec![0u8; cs];
            decompress_cluster(self.geo.compression, &input, &mut tmp).map_err(fail)?;
            let s = in_cluster as usize;
            out.copy_from_slice(&tmp[s..s + out.len()]);
        }
        Ok(())
    }
}

impl Qcow2Image {
    /// [`BlockDevice::read_at`] after the range check: see there for the retries.
    fn read_checked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for _ in 0..3 {
            let frees = self.frees_applied.load(Ordering::SeqCst);
            self.read_unchecked(buf, offset)?;
            if self.frees_applied.load(Ordering::SeqCst) == frees {
                return Ok(());
            }
        }
        let cs = self.geo.cluster_size;
        let end = (offset + buf.len() as u64).next_multiple_of(cs);
        let _g = self.lock_range(offset & !(cs - 1), end);
        self.read_unchecked(buf, offset)
    }

    /// [`BlockDevice::read_at`] without the range check and without the check against
    /// concurrent frees.
    pub(crate) fn read_unchecked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let run = self.map(pos, (buf.len() - done) as u64)?;
            let n = run.len as usize;
            let chunk = &mut buf[done..done + n];
            match run.mapped {
                Mapped::Data { host } => self.read_data(self.data()?.as_ref(), chunk, host, pos)?,
                Mapped::Zero { .. } => chunk.fill(0),
                Mapped::Unallocated => self.read_backing(chunk, pos)?,
                Mapped::Compressed { desc, in_cluster } => {
                    self.read_compressed(desc, in_cluster, chunk)?
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Reads run without any lock during their data I/O, so a cluster mapped for a read may be
    /// freed (its guest cluster rewritten, zeroed or discarded, then a flush) and reallocated to
    /// another guest cluster while the read is in flight. Frees are counted before they are
    /// applied (under the metadata lock, before any reallocation); a read that sees the count
    /// change across its mapping and I/O may hold another cluster's bytes and is done again.
    /// After a few such retries the read holds the range lock on its guest clusters: no write,
    /// zeroing or discard of them can then queue the clusters it maps for freeing.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.guard(self.read_checked(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.guard(self.write_impl(buf, offset))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.guard(self.zero_impl(offset, len, zero_write::ZeroMode::WriteZeroes))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.guard(self.zero_impl(offset, len, zero_write::ZeroMode::Discard))
    }

    fn flush(&self) -> Result<()> {
        self.guard(self.flush_impl())
    }

    fn close(&self) -> Result<()> {
        Qcow2Image::close(self)
    }

    /// [`DiscardMode::Backing`] drops whole clusters (subclusters) from this layer, so that
    /// they read from the backing file again; partial clusters at the edges are left as they
    /// are, as with [`discard`](BlockDevice::discard).
    fn discard_with(&self, offset: u64, len: u64, mode: DiscardMode) -> Result<()> {
        let mode = match mode {
            DiscardMode::Backing => zero_write::ZeroMode::Deallocate,
            _ => zero_write::ZeroMode::Discard,
        };
        self.guard(self.zero_impl(offset, len, mode))
    }

    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        Qcow2Image::resize(self, new_size, allow_shrink)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Err(Error::InvalidArgument(
                "block_status of an empty range".into(),
            ));
        }
        let first = self.map(offset, len)?;
        let (kind, host_offset, compressed) = match first.mapped {
            Mapped::Data { host } => (ExtentKind::Data, Some(host), false),
            Mapped::Zero { host } => (ExtentKind::Zero, host, false),
            Mapped::Unallocated => (ExtentKind::Unallocated, None, false),
            Mapped::Compressed { .. } => (ExtentKind::Data, None, true),
        };
        let mut total = first.len;
        if compressed {
            // Report a run of compressed clusters as one extent, as qemu-img map does.
            while total < len {
                let next = self.map(offset + total, len - total)?;
                if !matches!(next.mapped, Mapped::Compressed { .. }) {
                    break;
                }
                total += next.len;
            }
        }
        Ok(Extent {
            offset,
            len: total,
            kind,
            depth: 0,
            // As QEMU: no host offset for an encrypted image (its clusters hold ciphertext).
            host_offset: host_offset.filter(|_| !self.is_encrypted()),
            compressed,
        })
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.as_ref()
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }
}
