//! Committing an image into a file of its backing chain (`qemu-img commit`).
//!
//! What the layers from the image down to (not including) the base hold is written into the
//! base: data as data, ranges that read as zeros by the layers' metadata as zeros (the zero flag
//! where the base is qcow2 version 3, a hole in a raw base). The base grows first when the image
//! is larger (it never shrinks). Then, unless asked to keep it, the image is emptied: every
//! cluster deallocated, so it reads from the base again (`-d` keeps it; a base given with `-b`
//! implies keeping, as in qemu-img).
//!
//! Crash safety: the base is written and flushed before the image is emptied. A crash while the
//! base is written leaves the image reading as before (its own clusters shadow the base); a
//! crash while it is emptied leaves every deallocated range reading the committed data from the
//! base. The base itself holds a mix of old and new data until the commit completes.
//!
//! ```no_run
//! use qcow2kit::chain::OpenOptions;
//! use qcow2kit::Format;
//! use qcow2kit::ops::commit::{commit, open_for_commit, CommitOptions};
//!
//! let path = "top.qcow2".as_ref();
//! let img = open_for_commit(path, Format::Qcow2, None, &OpenOptions::qemu_compatible())?;
//! let stats = commit(&img, &CommitOptions::default())?;
//! assert!(stats.emptied);
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use crate::chain::{open, OpenOptions, Opened};
use crate::device::{BlockDevice, ExtentKind};
use crate::engine::Qcow2Image;
use crate::error::{Error, Result};
use crate::ops::convert::Progress;
use crate::ops::pool::for_each_region;
use crate::Format;
use std::path::Path;
use std::sync::Arc;

/// Most bytes copied per step.
const CHUNK_BYTES: u64 = 2 << 20;

/// Options of [`commit`].
///
/// ```
/// use qcow2kit::ops::commit::CommitOptions;
/// // qemu-img commit -d: keep the image's data after committing it.
/// let opts = CommitOptions { keep: true, ..CommitOptions::default() };
/// # let _ = opts;
/// ```
#[derive(Clone, Default)]
pub struct CommitOptions<'a> {
    /// The base to commit into; `None` is the image's immediate backing file.
    pub base: Option<std::path::PathBuf>,
    /// Leave the image as it is afterwards (`qemu-img commit -d`); implied by `base`.
    pub keep: bool,
    /// Called after each step with (bytes visited, image size).
    pub progress: Option<Progress<'a>>,
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
}

impl std::fmt::Debug for CommitOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitOptions")
            .field("base", &self.base)
            .field("keep", &self.keep)
            .field("progress", &self.progress.is_some())
            .field("workers", &self.workers)
            .finish()
    }
}

/// What a commit reports.
///
/// ```
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use qcow2kit::{BlockDevice, RawImage};
/// # use std::sync::Arc;
/// # let base: Arc<dyn BlockDevice> = Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![7; 1 << 20])), false)?);
/// # let with_base = CreateOptions { backing_file: Some("base.raw".into()), backing_format: Some("raw".into()), ..Default::default() };
/// # let mut top = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &with_base)?;
/// # top.set_backing(Some(base));
/// use qcow2kit::ops::commit::commit_chain;
/// # let mut top = top;
/// # let writable_base: Arc<dyn BlockDevice> = Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![7; 1 << 20])), true)?);
/// # top.set_backing(Some(writable_base));
/// top.write_at(&[9; 65536], 0)?;
/// let stats = commit_chain(&top, 1, false, 1, None)?;
/// assert_eq!(stats.copied, 65536);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Bytes written into the base as data.
    pub copied: u64,
    /// Bytes made to read as zeros in the base.
    pub zeroed: u64,
    /// The base was grown to the image's size.
    pub grown: bool,
    /// The image was emptied.
    pub emptied: bool,
}

/// Opens `path` for a commit: the image and its base writable, the layers between read-only.
/// `opts` gives the policy (backing depth, probing, locking); its `writable` and
/// `writable_layer` are set here.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # use qcow2kit::{open, BlockDevice, Format, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
/// # create_qcow2(&base, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
/// # create_qcow2(&top, &CreateOptions { backing_file: Some("base.qcow2".into()), backing_format: Some("qcow2".into()), ..Default::default() })?;
/// # let rw = OpenOptions { writable: true, ..OpenOptions::default() };
/// # let b = open(&base, Format::Qcow2, &rw)?; b.device.write_at(&[7; 65536], 0)?; b.close()?;
/// use qcow2kit::ops::commit::open_for_commit;
/// let img = open_for_commit(&top, Format::Qcow2, None, &OpenOptions::qemu_compatible())?;
/// assert!(img.layers[1].writable); // the base, for the commit to write into
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_for_commit(
    path: &Path,
    format: Format,
    base: Option<&Path>,
    opts: &OpenOptions,
) -> Result<Opened> {
    let depth = match base {
        None => 1,
        Some(b) => {
            // Find the base's depth by file identity in the chain opened read-only, then open
            // again with it writable (the locks of the first open are released before).
            let probe = open(path, format, opts)?;
            let d = probe.depth_of(b)?;
            match d {
                Some(d) if d > 0 => d,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "Did not find '{}' in the backing chain of '{}'",
                        b.display(),
                        path.display()
                    )))
                }
            }
        }
    };
    let mut o = opts.clone();
    o.writable = true;
    o.writable_layer = Some(depth);
    let opened = open(path, format, &o)?;
    if opened.layers.len() <= depth {
        return Err(Error::InvalidArgument(
            "Image does not have a backing file".into(),
        ));
    }
    Ok(opened)
}

/// Commits `image` (opened by [`open_for_commit`]) into its base.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # use qcow2kit::{open, BlockDevice, Format, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
/// # create_qcow2(&base, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
/// # create_qcow2(&top, &CreateOptions { backing_file: Some("base.qcow2".into()), backing_format: Some("qcow2".into()), ..Default::default() })?;
/// # let rw = OpenOptions { writable: true, ..OpenOptions::default() };
/// # let b = open(&base, Format::Qcow2, &rw)?; b.device.write_at(&[7; 65536], 0)?; b.close()?;
/// use qcow2kit::ops::commit::{commit, open_for_commit, CommitOptions};
/// # let t = open(&top, Format::Qcow2, &OpenOptions { writable: true, ..OpenOptions::qemu_compatible() })?;
/// # t.device.write_at(&[9; 512], 0)?; t.close()?;
/// let img = open_for_commit(&top, Format::Qcow2, None, &OpenOptions::qemu_compatible())?;
/// commit(&img, &CommitOptions::default())?; // qemu-img commit top.qcow2
/// img.close()?;
/// let b = open(&base, Format::Qcow2, &OpenOptions::default())?;
/// let mut buf = [0u8; 512];
/// b.device.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [9u8; 512]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn commit(image: &Opened, opts: &CommitOptions<'_>) -> Result<CommitStats> {
    let depth = match &opts.base {
        None => 1,
        Some(b) => match image.depth_of(b)? {
            Some(d) if d > 0 => d,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Did not find '{}' in the backing chain of '{}'",
                    b.display(),
                    image.path.display()
                )))
            }
        },
    };
    let Some(base) = image.layers.get(depth) else {
        return Err(Error::InvalidArgument(
            "Image does not have a backing file".into(),
        ));
    };
    if !base.writable {
        return Err(Error::ReadOnly);
    }
    let top = image
        .qcow2
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("Image does not have a backing file".into()))?;
    commit_chain(
        top,
        depth,
        opts.keep || opts.base.is_some(),
        opts.workers,
        opts.progress,
    )
}

/// Commit at the device level: what the layers of `top`'s chain above the one `depth` layers
/// down (1 = its backing file, which must be writable) hold is written into that layer, which
/// is grown to `top`'s size if smaller; then `top` is emptied unless `keep`. `workers` threads
/// (0: one per core) copy regions of the image in parallel. Usable on images
/// over any [`Storage`](crate::io::Storage).
///
/// ```
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use qcow2kit::{BlockDevice, RawImage};
/// # use std::sync::Arc;
/// # let base: Arc<dyn BlockDevice> = Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![7; 1 << 20])), false)?);
/// # let with_base = CreateOptions { backing_file: Some("base.raw".into()), backing_format: Some("raw".into()), ..Default::default() };
/// # let mut top = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &with_base)?;
/// # top.set_backing(Some(base));
/// use qcow2kit::ops::commit::commit_chain;
/// # let mut top = top;
/// # let writable_base: Arc<dyn BlockDevice> = Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![7; 1 << 20])), true)?);
/// # top.set_backing(Some(writable_base));
/// top.write_at(&[9; 512], 0)?;
/// commit_chain(&top, 1, false, 1, None)?; // into the backing device, then emptied
/// assert_eq!(top.block_status(0, 65536)?.kind, qcow2kit::ExtentKind::Unallocated);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn commit_chain(
    top: &Qcow2Image,
    depth: usize,
    keep: bool,
    workers: usize,
    progress: Option<Progress<'_>>,
) -> Result<CommitStats> {
    let mut layers: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut next = top.backing().cloned();
    while let Some(d) = next {
        if layers.len() == depth {
            break;
        }
        next = d.backing().cloned();
        layers.push(d);
    }
    if depth == 0 || layers.len() < depth {
        return Err(Error::InvalidArgument(
            "Image does not have a backing file".into(),
        ));
    }
    let base = layers
        .pop()
        .ok_or_else(|| Error::InvalidArgument("Image does not have a backing file".into()))?;
    let above: Vec<&dyn BlockDevice> = std::iter::once(top as &dyn BlockDevice)
        .chain(layers.iter().map(|d| d.as_ref()))
        .collect();
    let size = top.size();
    let mut stats = CommitStats::default();
    if base.size() < size {
        base.resize(size, false)?;
        stats.grown = true;
    }
    let copied = std::sync::atomic::AtomicU64::new(0);
    let zeroed = std::sync::atomic::AtomicU64::new(0);
    let add = |c: &std::sync::atomic::AtomicU64, n: u64| {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    };
    // Regions are independent: workers take them in ascending order.
    for_each_region(
        size,
        CHUNK_BYTES,
        workers,
        progress,
        |buf: &mut Vec<u8>, start, end| {
            let mut pos = start;
            while pos < end {
                let (len, kind) = status_above(&above, pos, end - pos)?;
                match kind {
                    ExtentKind::Unallocated => {}
                    ExtentKind::Zero => {
                        base.write_zeroes(pos, len)?;
                        add(&zeroed, len);
                    }
                    ExtentKind::Data => {
                        buf.resize(len as usize, 0);
                        top.read_at(buf, pos)?;
                        base.write_at(buf, pos)?;
                        add(&copied, len);
                    }
                }
                pos += len;
            }
            Ok(())
        },
    )?;
    stats.copied = copied.into_inner();
    stats.zeroed = zeroed.into_inner();
    base.flush()?;
    if !keep {
        top.make_empty()?;
        stats.emptied = true;
    }
    Ok(stats)
}

/// The status of the run at `offset` in the layers `above` the base: the first layer that
/// allocates it (data or zeros) answers; `Unallocated` when none does. Past the end of a
/// backing layer shorter than the run's start, the run reads as zeros.
fn status_above(above: &[&dyn BlockDevice], offset: u64, len: u64) -> Result<(u64, ExtentKind)> {
    let mut len = len;
    for (i, dev) in above.iter().enumerate() {
        let size = dev.size();
        if offset >= size {
            if i == 0 {
                return Err(Error::OutOfRange { offset, len, size });
            }
            return Ok((len, ExtentKind::Zero));
        }
        let e = dev.block_status(offset, len.min(size - offset))?;
        len = e.len;
        if e.kind != ExtentKind::Unallocated {
            return Ok((len, e.kind));
        }
    }
    Ok((len, ExtentKind::Unallocated))
}
