//! Rewriting cluster 0 of an open image: the backing file link (rebase), and emptying an
//! image back to its backing file (commit).
//!
//! Ordering: everything written before is made durable first (a full flush), then cluster 0 is
//! written in one request and flushed. A crash before the header write leaves the old link with
//! all new data clusters (which, for a safe rebase, read as the old chain did); after it, the
//! new link.

use super::write::ZeroMode;
use super::{HeaderArea, Qcow2Image};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::header_area::{encode_header_area, normalized_for_rewrite, qemu_feature_table};
use crate::format::MAX_BACKING_NAME;

/// Longest backing format name the header extension holds (QEMU's limit: under 16 bytes).
const MAX_BACKING_FORMAT: usize = 15;

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
    pub fn set_backing_link(&self, name: Option<&[u8]>, format: Option<&[u8]>) -> Result<()> {
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
        let _all = self.lock_everything()?;
        self.flush_impl()?;
        let mut m = self.lock_meta();
        let header = normalized_for_rewrite(&m.header);
        let mut ext = self.area().extensions.clone();
        ext.backing_format = format.map(<[u8]>::to_vec);
        ext.feature_names = if header.version >= 3 {
            qemu_feature_table()
        } else {
            Vec::new()
        };
        let cs = self.geo.cluster_size;
        let (header, mut area) = encode_header_area(&header, &ext, name, cs).ok_or_else(|| {
            Error::InvalidArgument(
                "the header, its extensions and the backing file name do not fit in one cluster"
                    .into(),
            )
        })?;
        area.resize(cs as usize, 0);
        let s = self.storage.as_ref();
        let r = s.write_at(&area, 0).and_then(|()| s.flush());
        if let Err(e) = r {
            // The header may be torn: nothing more may be written through this handle.
            m.broken = true;
            return Err(Error::io("writing the image header", e));
        }
        // The written feature table is not kept: the header area stays as QEMU parses it.
        let written_ext = crate::format::extension::Extensions::parse(
            &area[header.header_length as usize..(if header.backing_file_offset != 0 {
                header.backing_file_offset as usize
            } else {
                area.len()
            })],
        )
        .map_err(Error::from)?;
        m.header = header;
        *self.header_area.write().unwrap_or_else(|e| e.into_inner()) = HeaderArea {
            extensions: written_ext,
            backing_name: name.map(<[u8]>::to_vec),
        };
        Ok(())
    }

    /// Deallocates every cluster of the image, so that all of it reads from the backing file
    /// again (what `qemu-img commit` does to the committed image), flushes, and cuts the file
    /// after its last cluster in use. Internal snapshots keep their clusters; L2 tables stay
    /// (empty).
    pub fn make_empty(&self) -> Result<()> {
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
