//! Rewriting cluster 0 of an open image: the backing file link (rebase), and emptying an
//! image back to its backing file (commit).
//!
//! Ordering: everything written before is made durable first (a full flush), then cluster 0 is
//! written in one request and flushed. A crash before the header write leaves the old link with
//! all new data clusters (which, for a safe rebase, read as the old chain did); after it, the
//! new link.

use super::zero_write::ZeroMode;
use super::{HeaderArea, Qcow2Image};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::extension::Extensions;
use crate::format::features::IncompatibleFeatures;
use crate::format::header::Header;
use crate::format::header_area::{
    area_end, encode_header_area, normalized_for_rewrite, qemu_feature_table_for,
};
use crate::format::MAX_BACKING_NAME;
use crate::io::StorageExt;

/// Longest backing format name the header extension holds (QEMU's limit: under 16 bytes).
const MAX_BACKING_FORMAT: usize = 15;

/// The error text (QEMU's) when the header, its extensions and the backing file name do not
/// fit in the first cluster.
///
/// ```
/// assert_eq!(qcow2kit::engine::HEADER_FULL, "No space left in the file header");
/// ```
pub const HEADER_FULL: &str = "No space left in the file header";

/// The unit a storage writes atomically (a torn write keeps or drops whole sectors).
const SECTOR: usize = 512;

/// Largest range one step of [`Qcow2Image::make_empty`] deallocates.
const EMPTY_STEP: u64 = 1 << 30;

impl Qcow2Image {
    /// Replaces the backing file link in the header: `name` (stored exactly as given, `None`
    /// for no backing file) and its format (the backing-format extension; `None` removes it).
    /// Every other header field, extension and feature bit is kept (the feature name table
    /// becomes QEMU's, as QEMU rewrites it). Nothing else of the image changes: the guest
    /// content may change with it (that is an unsafe rebase; see [`crate::ops::rebase`] for the
    /// safe one).
    ///
    /// The backing device attached to this handle is not changed; reopen the image to read
    /// through the new chain.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.set_backing_link(Some(b"base.qcow2"), Some(b"qcow2"))?; // qemu-img rebase -u
    /// img.set_backing_link(None, None)?;
    /// assert!(img.backing_file_name().is_none());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn set_backing_link(&self, name: Option<&[u8]>, format: Option<&[u8]>) -> Result<()> {
        self.ensure_open()?;
        self.guard(self.set_backing_link_impl(name, format))
    }

    fn set_backing_link_impl(&self, name: Option<&[u8]>, format: Option<&[u8]>) -> Result<()> {
        if let Some(n) = name {
            if n.is_empty() || n.len() > MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument(format!(
                    "backing file name must be 1..={MAX_BACKING_NAME} bytes"
                )));
            }
        }
        if let Some(f) = format {
            if name.is_none() {
                return Err(Error::InvalidArgument(
                    "a backing format needs a backing file".into(),
                ));
            }
            if f.is_empty() || f.len() > MAX_BACKING_FORMAT || f.contains(&0) {
                return Err(Error::InvalidArgument(format!(
                    "backing format name must be 1..={MAX_BACKING_FORMAT} bytes"
                )));
            }
        }
        self.rewrite_header_impl(|_, ext, link| {
            ext.backing_format = format.map(<[u8]>::to_vec);
            *link = name.map(<[u8]>::to_vec);
            Ok(())
        })
    }

    /// Rewrites cluster 0 with the header, extensions and backing file name `edit` makes of
    /// the current ones (the header as QEMU rewrites it: a version 3 header at its current
    /// length); the feature name table becomes QEMU's for the resulting version and cluster
    /// size.
    ///
    /// Ordering: everything written before is flushed first; when the new header drops the
    /// dirty bit, the refcounts a lazy-refcounts image kept in memory are written and flushed
    /// before it (the dirty bit goes only once the counts on disk are right); then cluster 0
    /// is replaced so that a crash or a torn write leaves the old area or the new one (see
    /// [`switch_area`](Self::switch_area)).
    pub(crate) fn rewrite_header(
        &self,
        edit: impl FnOnce(&mut Header, &mut Extensions, &mut Option<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        self.ensure_open()?;
        self.guard(self.rewrite_header_impl(edit))
    }

    fn rewrite_header_impl(
        &self,
        edit: impl FnOnce(&mut Header, &mut Extensions, &mut Option<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        let _all = self.lock_everything()?;
        let mut m = self.lock_meta();
        self.flush_locked(&mut m)?;
        m.sync_refcount_table();
        let mut header = normalized_for_rewrite(&m.header);
        let (mut ext, mut name) = {
            let area = self.area();
            (area.extensions.clone(), area.backing_name.clone())
        };
        edit(&mut header, &mut ext, &mut name)?;
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

    /// Replaces the header area of cluster 0 with `new` so that a crash at any point, a write
    /// torn at any sector boundary included, leaves either the old area or the new one:
    ///
    /// - a new area within the first sector is one single-sector write;
    /// - otherwise its part past the first sector is written first, where the old area does
    ///   not reach (when the old area reaches past the first sector, it is first rewritten
    ///   without its optional feature name table, in one single-sector write, to free that
    ///   space), flushed, then the first sector is written.
    ///
    /// An old area that cannot be made to fit in one sector (a backing name over ~370 bytes)
    /// is replaced by one write of the whole area, as QEMU always does.
    pub(super) fn switch_area(&self, m: &super::meta::Meta, new: &[u8]) -> Result<()> {
        let s = self.storage.as_ref();
        let io = |what: &'static str| move |e| Error::io(what, e);
        let write_flushed = |buf: &[u8], at: u64| {
            s.write_at(buf, at)
                .and_then(|()| s.flush())
                .map_err(io("writing the image header"))
        };
        let cs = self.geo.cluster_size as usize;
        let old = s
            .read_vec(0, cs.min(s.len().map_err(io("sizing the image"))? as usize))
            .map_err(io("reading the image header"))?;
        let old_end = area_end(&old, &m.header);
        if new.len() <= SECTOR {
            write_flushed(new, 0)?;
            return self.clear_after(new.len(), old_end);
        }
        if old_end > SECTOR {
            let area = self.area();
            let ext = Extensions {
                feature_names: Vec::new(),
                ..area.extensions.clone()
            };
            let compact = encode_header_area(
                &normalized_for_rewrite(&m.header),
                &ext,
                area.backing_name.as_deref(),
                SECTOR as u64,
            );
            match compact {
                Some((_, c)) if c.len() <= SECTOR => write_flushed(&c, 0)?,
                _ => {
                    write_flushed(new, 0)?;
                    return self.clear_after(new.len(), old_end);
                }
            }
        }
        write_flushed(&new[SECTOR..], SECTOR as u64)?;
        write_flushed(&new[..SECTOR], 0)?;
        self.clear_after(new.len(), old_end)
    }

    /// Zeros `from..to` of cluster 0, past the end of the area just written (nothing reads
    /// it), as QEMU leaves the rest of the cluster.
    fn clear_after(&self, from: usize, to: usize) -> Result<()> {
        if to > from {
            let s = self.storage.as_ref();
            s.write_at(&vec![0u8; to - from], from as u64)
                .and_then(|()| s.flush())
                .map_err(|e| Error::io("clearing the image header", e))?;
        }
        Ok(())
    }

    /// As [`BlockDevice::write_zeroes`], and clusters the image leaves unallocated are marked
    /// zero too (the zero flag; real zeros on a version 2 image) even without a backing file,
    /// so that they still read as zeros once the image has one — what QEMU's zero writes do
    /// (`qemu-io write -z`), and what a rebase needs.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_zeroes_flagged(0, 65536)?;
    /// assert_eq!(img.block_status(0, 65536)?.kind, qcow2kit::ExtentKind::Zero);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn write_zeroes_flagged(&self, offset: u64, len: u64) -> Result<()> {
        self.guard(self.zero_impl(offset, len, ZeroMode::Explicit))
    }

    /// As [`write_zeroes_flagged`](Self::write_zeroes_flagged), but whole clusters this image
    /// alone owns keep their host cluster (marked zero): QEMU's zero write without
    /// `BDRV_REQ_MAY_UNMAP` (`qemu-io write -z` without `-u`), which keeps the space reserved.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_at(&[1; 65536], 0)?;
    /// img.write_zeroes_keeping_allocation(0, 65536)?;
    /// let e = img.block_status(0, 65536)?;
    /// assert!(e.kind == qcow2kit::ExtentKind::Zero && e.host_offset.is_some());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn write_zeroes_keeping_allocation(&self, offset: u64, len: u64) -> Result<()> {
        self.guard(self.zero_impl(offset, len, ZeroMode::Keep))
    }

    /// Deallocates every cluster of the image, so that all of it reads from the backing file
    /// again (what `qemu-img commit` does to the committed image), flushes, and cuts the file
    /// after its last cluster in use. Internal snapshots keep their clusters; L2 tables stay
    /// (empty).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_at(&[1; 65536], 0)?;
    /// img.make_empty()?; // as after qemu-img commit
    /// assert_eq!(img.block_status(0, 65536)?.kind, qcow2kit::ExtentKind::Unallocated);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn make_empty(&self) -> Result<()> {
        self.ensure_open()?;
        self.guard(self.make_empty_impl())
    }

    fn make_empty_impl(&self) -> Result<()> {
        let size = self.size();
        let mut pos = 0;
        while pos < size {
            let n = EMPTY_STEP.min(size - pos);
            self.zero_impl(pos, n, ZeroMode::Deallocate)?;
            pos += n;
        }
        self.flush_impl()?;
        let _all = self.lock_everything()?;
        let mut m = self.lock_meta();
        self.trim_free_tail(&mut m)
    }
}
