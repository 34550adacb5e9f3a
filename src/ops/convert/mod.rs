//! Converting a device (any chain) into a raw or qcow2 image: one entry point, [`convert`],
//! from a source device to a [`Target`] in a [`TargetFormat`], with [`ConvertOptions`].
//!
//! Cost is proportional to allocated data: the source's extents are resolved through its whole
//! backing chain first (or, when the target keeps a backing file, through the source's top layer
//! only), only ranges some layer holds data for are read, and ranges of zeros are never written
//! to a fresh target. Ranges are split into chunks that a pool of workers reads and writes in
//! parallel; every chunk is one coalesced read when the source's clusters are contiguous on the
//! host. A new file is built in a temporary file beside the target, flushed, and renamed into
//! place, so a failed or cancelled convert never leaves a half image under the target's name.

mod copy;

use crate::device::BlockDevice;
use crate::engine::Qcow2Image;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::ops::create::{create_qcow2_on, CreateOptions};
use std::path::Path;
use std::sync::Arc;

pub(crate) use copy::default_workers;
pub use copy::{bitmaps_to_copy, copy_bitmaps, is_zero};
use copy::{convert_into, convert_to_qcow2, convert_to_raw};

/// A progress-and-cancel callback: called with `(work done, work total)` as an operation
/// advances (bytes for copies), from any of its worker threads; it returns whether to go on.
/// Returning `false` stops the operation with [`Error::Cancelled`], and its target is left as a
/// failed operation leaves it (a new file is never created; a copy into existing storage or an
/// open image may be partly done).
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// use qcow2kit::ops::convert::{convert, ConvertOptions, Target};
/// use qcow2kit::{Error, RawImage};
/// use std::sync::Arc;
///
/// let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 8 << 20])), false)?;
/// let dst: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
/// // Stop once half of the bytes are copied.
/// let half = |done: u64, total: u64| done < total / 2;
/// let opts = ConvertOptions { progress: Some(&half), workers: 1, ..Default::default() };
/// assert!(matches!(convert(&src, Target::Storage(dst), &opts), Err(Error::Cancelled)));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub type Progress<'a> = &'a (dyn Fn(u64, u64) -> bool + Sync);

/// The format a convert writes.
///
/// ```
/// use qcow2kit::ops::convert::TargetFormat;
/// use qcow2kit::ops::create::CreateOptions;
///
/// // qemu-img convert -O qcow2 -o cluster_size=2M
/// let big = TargetFormat::Qcow2(CreateOptions { cluster_size: 2 << 20, ..Default::default() });
/// assert!(matches!(TargetFormat::default(), TargetFormat::Raw));
/// # let _ = big;
/// ```
#[derive(Debug, Clone, Default)]
pub enum TargetFormat {
    /// Raw: the source's guest bytes, `src.size()` of them (qemu-img `-O raw`).
    #[default]
    Raw,
    /// qcow2, laid out as these options say; the size is the source's (qemu-img `-O qcow2 -o
    /// …`). A backing file here (qemu-img `-B`) makes the target keep it: only the source's top
    /// layer is copied.
    Qcow2(CreateOptions),
}

/// Where a convert writes.
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// use qcow2kit::ops::convert::{convert, ConvertOptions, Target};
/// use qcow2kit::{BlockDevice, RawImage};
/// use std::sync::Arc;
///
/// let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![3; 65536])), false)?;
/// // Into storage the caller holds (here memory), in place.
/// let mem = Arc::new(MemoryStorage::new());
/// convert(&src, Target::Storage(mem.clone()), &ConvertOptions::default())?;
/// assert_eq!(mem.to_bytes(), vec![3; 65536]);
/// // Into a new file, which appears whole or not at all.
/// let dir = tempfile::tempdir()?;
/// convert(&src, Target::NewFile(&dir.path().join("copy.raw")), &ConvertOptions::default())?;
/// assert_eq!(std::fs::read(dir.path().join("copy.raw"))?, vec![3; 65536]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub enum Target<'a> {
    /// A new file at this path, replacing any file there only once the whole image is written
    /// and flushed: it is built in a hidden temporary file beside the target
    /// (`.NAME.qcow2kit-PID.tmp`, under an exclusive `flock`) and renamed into place.
    /// Temporary files that killed converts to the same target left behind are removed on the
    /// way (those of the same user whose process is gone and that no one holds locked).
    NewFile(&'a Path),
    /// Storage the caller holds, written in place from offset 0: a raw image's bytes, or a new
    /// qcow2 image laid out on it (without an external data file). Raw storage is sized to the
    /// source when [`ConvertOptions::target_is_zero`]; otherwise it must be large enough and its
    /// zero ranges are written as zeros (qemu-img `convert -n`).
    Storage(Arc<dyn Storage>),
    /// An open, writable qcow2 image written through, as `qemu-img convert -n` writes into an
    /// existing image: at least the source's size; the format must be
    /// [`TargetFormat::Qcow2`] (whose backing file, if any, is the `-B` of the copy).
    Image(&'a Qcow2Image),
}

/// How a convert copies.
///
/// ```
/// use qcow2kit::ops::convert::{ConvertOptions, TargetFormat};
///
/// // qemu-img convert -c -S 0 -O qcow2 (a thick, compressed copy) on two threads.
/// let opts = ConvertOptions {
///     format: TargetFormat::Qcow2(Default::default()),
///     compress: true,
///     zero_granularity: 0,
///     workers: 2,
///     ..ConvertOptions::default()
/// };
/// # let _ = opts;
/// ```
#[derive(Clone)]
pub struct ConvertOptions<'a> {
    /// The target's format.
    pub format: TargetFormat,
    /// Worker threads; 0 means one per available core (at most 8).
    pub workers: usize,
    /// Zero detection granularity in bytes (qemu-img `-S`, 4096 by default): aligned blocks of
    /// this size that read as zeros are not written (for qcow2, at least a cluster). 0 makes a
    /// thick copy: every byte is written, zeros included, so the target ends up fully allocated
    /// (unless a qcow2 target keeps a backing file).
    pub zero_granularity: u64,
    /// Write compressed clusters (qemu-img `-c`); qcow2 only.
    pub compress: bool,
    /// The target already reads as zeros everywhere (`true` by default; always so for
    /// [`Target::NewFile`]): ranges of zeros need no writes. `false` zeroes them explicitly.
    pub target_is_zero: bool,
    /// Called after each chunk; returning `false` cancels (see [`Progress`]).
    pub progress: Option<Progress<'a>>,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            format: TargetFormat::Raw,
            workers: 0,
            zero_granularity: 4096,
            compress: false,
            target_is_zero: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("format", &self.format)
            .field("workers", &self.workers)
            .field("zero_granularity", &self.zero_granularity)
            .field("compress", &self.compress)
            .field("target_is_zero", &self.target_is_zero)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Copies the guest content of `src` (its whole chain, flattened) into `target` as
/// `opts.format`, as `qemu-img convert` does.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::convert::{convert, ConvertOptions, Target, TargetFormat};
/// use qcow2kit::ops::create::CreateOptions;
/// use qcow2kit::{open, BlockDevice, Format, OpenOptions, RawImage};
/// use std::sync::Arc;
///
/// let dir = tempfile::tempdir()?;
/// let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![5; 1 << 20])), false)?;
/// let path = dir.path().join("out.qcow2");
/// let opts = ConvertOptions {
///     format: TargetFormat::Qcow2(CreateOptions::default()),
///     compress: true,
///     ..ConvertOptions::default()
/// };
/// convert(&src, Target::NewFile(&path), &opts)?;
///
/// let out = open(&path, Format::Qcow2, &OpenOptions::default())?;
/// let mut buf = vec![0; 4096];
/// out.device.read_at(&mut buf, 4096)?;
/// assert_eq!(buf, vec![5; 4096]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert(src: &dyn BlockDevice, target: Target<'_>, opts: &ConvertOptions<'_>) -> Result<()> {
    let create = match &opts.format {
        TargetFormat::Raw if opts.compress => {
            return Err(Error::InvalidArgument(
                "compression needs a qcow2 target".into(),
            ))
        }
        TargetFormat::Raw => None,
        TargetFormat::Qcow2(c) => Some(c),
    };
    match (target, create) {
        (Target::NewFile(path), Some(c)) => convert_to_qcow2(src, path, c, opts),
        (Target::NewFile(path), None) => copy::into_new_file(path, |storage| {
            let fresh = ConvertOptions {
                target_is_zero: true,
                ..opts.clone()
            };
            convert_to_raw(src, storage.as_ref(), &fresh)
        }),
        (Target::Storage(storage), None) => convert_to_raw(src, storage.as_ref(), opts),
        (Target::Storage(storage), Some(c)) => {
            if c.data_file.is_some() {
                return Err(Error::InvalidArgument(
                    "a qcow2 target on caller storage cannot have an external data file".into(),
                ));
            }
            let size = src.size().next_multiple_of(512);
            let img = create_qcow2_on(storage, None, size, c)?;
            convert_into(src, &img, true, c, opts)?;
            img.close()
        }
        (Target::Image(img), Some(c)) => convert_into(src, img, opts.target_is_zero, c, opts),
        (Target::Image(_), None) => Err(Error::InvalidArgument(
            "an open qcow2 image is written as qcow2 (TargetFormat::Qcow2)".into(),
        )),
    }
}
