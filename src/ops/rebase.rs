//! Changing an image's backing file: safe rebase, flatten and pull (`qemu-img rebase`), and the
//! unsafe, header-only rebase (`-u`).
//!
//! A safe rebase keeps what the guest sees. For every range the image does not allocate itself,
//! where its old chain reads differently from the new backing file, the old chain's data is
//! written into the image; only then is the header's backing link switched (one flushed write).
//! Flatten (no new backing file) and pull (a new backing file that is already in the chain,
//! libvirt's `blockRebase` with a base) are the same operation: ranges whose data comes from the
//! new base or below it are skipped without being read.
//!
//! Cost: ranges are visited by block status. A range the image allocates is never read; a range
//! where both the old chain and the new backing read zeros by their metadata is never read; a
//! range served at or below the new base (pull) is never read. Only the rest is read, a bounded
//! chunk at a time from both sides, and compared at the image's write granularity (its cluster,
//! or subcluster with extended L2 entries).
//!
//! Crash safety: until the header switch the image reads exactly as before through its old
//! chain (the copied clusters hold what the old chain held), so a crash or an I/O error at any
//! point leaves it with either its old link and old content, or its new link and the same
//! content; clusters copied before a failure are kept (they are correct under both links).
//!
//! ```no_run
//! use qcow2kit::chain::{open, OpenOptions};
//! use qcow2kit::Format;
//! use qcow2kit::ops::rebase::{pull, rebase, BackingLink, RebaseOptions};
//!
//! let mut o = OpenOptions::qemu_compatible();
//! o.writable = true;
//! let top = open("top.qcow2".as_ref(), Format::Qcow2, &o)?;
//! // libvirt's blockRebase with a base: copy what the layers above base.qcow2 hold.
//! let base = BackingLink { name: b"base.qcow2".to_vec(), format: Format::Qcow2 };
//! pull(&top, Some(&base), &RebaseOptions::default())?;
//! // Flatten: the whole chain into the image, no backing file left.
//! let stats = rebase(&top, None, &RebaseOptions::default())?;
//! println!("{} bytes copied", stats.copied);
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use crate::chain::{open, resolve_relative, OpenOptions, Opened};
use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::engine::Qcow2Image;
use crate::error::{Error, Result};
use crate::ops::convert::{is_zero, Progress};
use crate::ops::pool::for_each_region;
use crate::Format;
use std::sync::Arc;

/// Most bytes compared per step (per side).
const CHUNK_BYTES: u64 = 2 << 20;

/// The backing file an image is rebased onto.
///
/// ```
/// use qcow2kit::ops::rebase::BackingLink;
/// use qcow2kit::Format;
/// // What -b base.qcow2 -F qcow2 names (relative to the image).
/// let link = BackingLink { name: b"base.qcow2".to_vec(), format: Format::Qcow2 };
/// # let _ = link;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingLink {
    /// The name stored in the header, exactly as given. A relative name is resolved against
    /// the directory of the image for reading.
    pub name: Vec<u8>,
    /// Its format, recorded in the backing-format extension.
    pub format: Format,
}

/// Options of [`rebase`] and [`pull`].
///
/// ```
/// use qcow2kit::ops::rebase::RebaseOptions;
/// let report = |done: u64, total: u64| { let _ = (done, total); true };
/// let opts = RebaseOptions { progress: Some(&report), ..RebaseOptions::default() };
/// # let _ = opts;
/// ```
#[derive(Clone, Default)]
pub struct RebaseOptions<'a> {
    /// Write the copied clusters compressed (`qemu-img rebase -c`).
    pub compress: bool,
    /// How the new backing file's own chain is opened when it is not part of the image's chain
    /// (read-only; `writable` and `writable_layer` are ignored).
    /// `None` opens it as qemu-img does ([`OpenOptions::qemu_compatible`]).
    pub backing_open: Option<OpenOptions>,
    /// Called after each step with (bytes of the image visited, image size).
    pub progress: Option<Progress<'a>>,
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
}

impl std::fmt::Debug for RebaseOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebaseOptions")
            .field("compress", &self.compress)
            .field("backing_open", &self.backing_open)
            .field("progress", &self.progress.is_some())
            .field("workers", &self.workers)
            .finish()
    }
}

/// What a rebase reports.
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
/// use qcow2kit::ops::rebase::{pull, RebaseOptions};
/// let img = open(&top, Format::Qcow2, &OpenOptions { writable: true, ..OpenOptions::qemu_compatible() })?;
/// let stats = pull(&img, None, &RebaseOptions::default())?; // flatten: take the base's data in
/// assert!(stats.copied > 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebaseStats {
    /// Bytes read from both sides and compared.
    pub compared: u64,
    /// Bytes written into the image as data.
    pub copied: u64,
    /// Bytes made to read as zeros in the image.
    pub zeroed: u64,
}

/// Safe rebase of `image` (opened writable, with its chain) onto `to` (`None`: no backing file,
/// which flattens the chain into the image). The guest content of the image is unchanged; see
/// the module documentation. When `to` names a file of the image's current chain it is a
/// [`pull`]; otherwise the new backing file is opened read-only with
/// [`RebaseOptions::backing_open`].
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
/// use qcow2kit::ops::rebase::{rebase, RebaseOptions};
/// let img = open(&top, Format::Qcow2, &OpenOptions { writable: true, ..OpenOptions::qemu_compatible() })?;
/// // qemu-img rebase -b "" top.qcow2: the image keeps reading the same, standing alone.
/// rebase(&img, None, &RebaseOptions::default())?;
/// assert!(img.qcow2.as_ref().map(|q| q.backing_file_name().is_none()).unwrap_or(false));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn rebase(
    image: &Opened,
    to: Option<&BackingLink>,
    opts: &RebaseOptions<'_>,
) -> Result<RebaseStats> {
    let top = writable_qcow2(image)?;
    let new = match to {
        None => NewBase::None,
        Some(link) => {
            let path = resolve_relative(&image.path, &link.name)?;
            match image.depth_of(&path) {
                Ok(Some(0)) => {
                    return Err(Error::InvalidArgument(
                        "an image cannot be its own backing file".into(),
                    ))
                }
                Ok(Some(depth)) if image.layers[depth].format == link.format => {
                    NewBase::InChain(depth)
                }
                _ => {
                    let mut o = opts
                        .backing_open
                        .clone()
                        .unwrap_or_else(OpenOptions::qemu_compatible);
                    o.writable = false;
                    o.writable_layer = None;
                    NewBase::Device(open(&path, link.format, &o)?.device)
                }
            }
        }
    };
    rebase_chain(&top, new, to, opts)
}

/// The device an image reads through after a rebase, for [`rebase_chain`].
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
/// use qcow2kit::ops::rebase::{rebase_chain, NewBase, RebaseOptions};
/// rebase_chain(&top, NewBase::None, None, &RebaseOptions::default())?;
/// let mut buf = [0u8; 512];
/// top.read_at(&mut buf, 0)?; // copied in before the link was dropped
/// assert_eq!(buf, [7u8; 512]);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Clone)]
pub enum NewBase {
    /// No backing file: the chain is flattened into the image.
    None,
    /// The file this many layers below the image in its current chain (1 = its backing
    /// file): a pull.
    InChain(usize),
    /// Another device (with its own chain attached).
    Device(Arc<dyn BlockDevice>),
}

impl std::fmt::Debug for NewBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewBase::None => f.write_str("None"),
            NewBase::InChain(d) => write!(f, "InChain({d})"),
            NewBase::Device(d) => write!(f, "Device({})", d.format_name()),
        }
    }
}

/// Safe rebase at the device level: `top` (writable, its current chain attached) gets what it
/// needs of its old chain to read the same over `new`, then its header names `link`. What
/// [`rebase`] and [`pull`] do after resolving names; usable on images over any
/// [`Storage`](crate::io::Storage).
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
/// use qcow2kit::ops::rebase::{rebase_chain, NewBase, RebaseOptions};
/// let stats = rebase_chain(&top, NewBase::None, None, &RebaseOptions::default())?;
/// assert_eq!(stats.copied, 1 << 20);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn rebase_chain(
    top: &Qcow2Image,
    new: NewBase,
    link: Option<&BackingLink>,
    opts: &RebaseOptions<'_>,
) -> Result<RebaseStats> {
    if !top.is_writable() {
        return Err(Error::ReadOnly);
    }
    let old = top.backing().cloned();
    let (device, base_depth) = match new {
        NewBase::None => (None, None),
        NewBase::Device(d) => (Some(d), None),
        NewBase::InChain(depth) => {
            let mut dev = old.clone();
            for _ in 1..depth {
                dev = dev.and_then(|d| d.backing().cloned());
            }
            let dev = dev.filter(|_| depth > 0).ok_or_else(|| {
                Error::InvalidArgument(format!("the chain has no layer {depth} deep"))
            })?;
            (Some(dev), Some(depth))
        }
    };
    let stats = copy_differences(top, old, device.as_ref(), base_depth, opts)?;
    top.set_backing_link(
        link.map(|l| l.name.as_slice()),
        link.map(|l| l.format.name().as_bytes()),
    )?;
    Ok(stats)
}

/// Pulls the layers above `base` into `image`: `base` must be a file of the image's backing
/// chain (`None`: the whole chain, which flattens it). Only ranges the layers between the image
/// and the base provide are read and copied; the header then names `base` (as given).
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
/// use qcow2kit::ops::rebase::{pull, RebaseOptions};
/// let img = open(&top, Format::Qcow2, &OpenOptions { writable: true, ..OpenOptions::qemu_compatible() })?;
/// pull(&img, None, &RebaseOptions::default())?; // blockRebase with no base: a full pull
/// img.close()?;
/// let alone = open(&top, Format::Qcow2, &OpenOptions::default())?; // no backing file any more
/// let mut buf = [0u8; 512];
/// alone.device.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [7u8; 512]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pull(
    image: &Opened,
    base: Option<&BackingLink>,
    opts: &RebaseOptions<'_>,
) -> Result<RebaseStats> {
    if let Some(link) = base {
        let path = resolve_relative(&image.path, &link.name)?;
        match image.depth_of(&path)? {
            Some(d) if d > 0 => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "'{}' is not in the backing chain of '{}'",
                    String::from_utf8_lossy(&link.name),
                    image.path.display()
                )))
            }
        }
    }
    rebase(image, base, opts)
}

/// Unsafe rebase (`qemu-img rebase -u`): only the header's backing link changes, to `to`
/// (`None`: no backing file). Nothing is copied, so the guest content changes unless the new
/// backing file reads as the old one; the new file need not exist.
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
/// use qcow2kit::ops::rebase::{rebase_unsafe, BackingLink};
/// use qcow2kit::Format;
/// // qemu-img rebase -u -b moved.raw -F raw: only the header changes.
/// let link = BackingLink { name: b"moved.raw".to_vec(), format: Format::Raw };
/// rebase_unsafe(&top, Some(&link))?;
/// assert_eq!(top.backing_file_name().as_deref(), Some(&b"moved.raw"[..]));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn rebase_unsafe(image: &Qcow2Image, to: Option<&BackingLink>) -> Result<()> {
    if !image.is_writable() {
        return Err(Error::ReadOnly);
    }
    image.set_backing_link(
        to.map(|l| l.name.as_slice()),
        to.map(|l| l.format.name().as_bytes()),
    )
}

fn writable_qcow2(image: &Opened) -> Result<Arc<Qcow2Image>> {
    let top = image.qcow2.clone().ok_or_else(|| {
        Error::Unsupported("only qcow2 images have a backing file to change".into())
    })?;
    if !top.is_writable() {
        return Err(Error::ReadOnly);
    }
    Ok(top)
}

/// How one side reads over a run: zeros by its metadata, or possibly data.
#[derive(Debug, Clone, Copy)]
struct SideStatus {
    /// The run reads as zeros without reading any data.
    zero: bool,
    /// Layers below the image that answered (1 = its immediate backing file); `usize::MAX`
    /// when no layer holds the run.
    depth: usize,
    len: u64,
}

/// The status over `offset..offset+len` of a side: `dev` read as the image's backing file
/// (depths count from the image), zeros past its end.
fn side_status(dev: Option<&Arc<dyn BlockDevice>>, offset: u64, len: u64) -> Result<SideStatus> {
    let Some(dev) = dev else {
        return Ok(SideStatus {
            zero: true,
            depth: usize::MAX,
            len,
        });
    };
    let size = dev.size();
    if offset >= size {
        // Past the end of the side's top layer (the image's backing file): zeros decided there.
        return Ok(SideStatus {
            zero: true,
            depth: 1,
            len,
        });
    }
    let e = chain_status(dev.as_ref(), offset, len.min(size - offset))?;
    Ok(match e.kind {
        ExtentKind::Data => SideStatus {
            zero: false,
            depth: e.depth as usize + 1,
            len: e.len,
        },
        ExtentKind::Zero => SideStatus {
            zero: true,
            depth: e.depth as usize + 1,
            len: e.len,
        },
        ExtentKind::Unallocated => SideStatus {
            zero: true,
            depth: usize::MAX,
            len: e.len,
        },
    })
}

/// Reads `buf.len()` bytes at `offset` of a side, zeros past its end.
fn read_side(dev: Option<&Arc<dyn BlockDevice>>, buf: &mut [u8], offset: u64) -> Result<()> {
    buf.fill(0);
    let Some(dev) = dev else { return Ok(()) };
    let size = dev.size();
    if offset < size {
        let n = (buf.len() as u64).min(size - offset) as usize;
        dev.read_at(&mut buf[..n], offset)?;
    }
    Ok(())
}

/// Writes into `top` every granule of its unallocated ranges where `old` and `new` differ.
fn copy_differences(
    top: &Qcow2Image,
    old: Option<Arc<dyn BlockDevice>>,
    new_dev: Option<&Arc<dyn BlockDevice>>,
    base_depth: Option<usize>,
    opts: &RebaseOptions<'_>,
) -> Result<RebaseStats> {
    let h = top.header();
    let cs = top.cluster_size();
    let align = if h.has_extended_l2() { cs / 32 } else { cs };
    let size = top.size();
    let old = old.as_ref();
    let total = std::sync::Mutex::new(RebaseStats::default());
    // Regions of the image are independent: workers take them in ascending order. Compressed
    // clusters are packed one after the other in the order they are written: one worker writes
    // them, in guest order, so that the layout is qemu-img's.
    let workers = if opts.compress { 1 } else { opts.workers };
    for_each_region(
        size,
        CHUNK_BYTES,
        workers,
        opts.progress,
        |(old_buf, new_buf): &mut (Vec<u8>, Vec<u8>), start, end| {
            let mut stats = RebaseStats::default();
            let mut pos = start;
            while pos < end {
                let e = top.block_status(pos, end - pos)?;
                if e.kind != ExtentKind::Unallocated {
                    pos += e.len;
                    continue;
                }
                let run_end = pos + e.len;
                let o = side_status(old, pos, e.len)?;
                let n = side_status(new_dev, pos, o.len)?;
                let mut len = n.len.min(o.len);
                // Steps end on granule boundaries (or the end of the run), so that every write
                // covers whole granules; a step stretched to one covers bytes whose status is
                // not known.
                let known = (pos + len) % align == 0 || pos + len == run_end;
                if !known {
                    len = (pos + len).next_multiple_of(align).min(run_end) - pos;
                }
                // Served by the new base or below it (pull): the same data either way. Or
                // zeros on both sides by their metadata.
                if known && (base_depth.is_some_and(|d| o.depth >= d) || (o.zero && n.zero)) {
                    pos += len;
                    continue;
                }
                old_buf.resize(len as usize, 0);
                read_side(old, old_buf, pos)?;
                // A new side of zeros by its metadata is not read.
                let new_is_zero = known && n.zero;
                if !new_is_zero {
                    new_buf.resize(len as usize, 0);
                    read_side(new_dev, new_buf, pos)?;
                }
                stats.compared += len;
                let sides = Sides {
                    old: old_buf,
                    new: (!new_is_zero).then_some(new_buf.as_slice()),
                    old_is_zero: known && o.zero,
                };
                write_differences(top, pos, &sides, align, opts.compress, &mut stats)?;
                pos += len;
            }
            let mut t = total.lock().unwrap_or_else(|e| e.into_inner());
            t.compared += stats.compared;
            t.copied += stats.copied;
            t.zeroed += stats.zeroed;
            Ok(())
        },
    )?;
    top.flush()?;
    Ok(total.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Writes `data` at `at` (a range the image does not allocate) compressed, a whole cluster at a
/// time as qemu-img does: a cluster the range covers only in part (only with extended L2
/// entries, whose granule is a subcluster) is read whole through the image as it reads now
/// (its own subclusters, the old backing file elsewhere), `data` laid over it, and the whole
/// cluster written compressed. Returns where the last cluster written ends.
///
/// Workers take regions of [`CHUNK_BYTES`], a multiple of every cluster size: no two of them
/// write the same cluster.
fn write_compressed_run(top: &Qcow2Image, at: u64, data: &[u8]) -> Result<u64> {
    let cs = top.cluster_size();
    let size = top.size();
    let end = at + data.len() as u64;
    let mut pos = at & !(cs - 1);
    let mut buf = Vec::new();
    while pos < end {
        let cluster_end = (pos + cs).min(size);
        if at <= pos && end >= cluster_end {
            top.write_compressed(pos, &data[(pos - at) as usize..(cluster_end - at) as usize])?;
        } else {
            buf.resize((cluster_end - pos) as usize, 0);
            top.read_at(&mut buf, pos)?;
            let (from, to) = (at.max(pos), end.min(cluster_end));
            buf[(from - pos) as usize..(to - pos) as usize]
                .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            top.write_compressed(pos, &buf)?;
        }
        pos = cluster_end;
    }
    Ok(pos)
}

/// What the two sides read over one step.
struct Sides<'a> {
    old: &'a [u8],
    /// `None`: the new side reads zeros.
    new: Option<&'a [u8]>,
    /// The old side reads zeros by its metadata.
    old_is_zero: bool,
}

/// Compares `old` and `new` (the two sides at `offset`) granule by granule and writes the old
/// side's data over each run of differing granules.
fn write_differences(
    top: &Qcow2Image,
    offset: u64,
    sides: &Sides<'_>,
    align: u64,
    compress: bool,
    stats: &mut RebaseStats,
) -> Result<()> {
    let old = sides.old;
    let differs = |s: usize, e: usize| match sides.new {
        Some(new) => old[s..e] != new[s..e],
        None => !is_zero(&old[s..e]),
    };
    let align = align as usize;
    // The run starts on a granule boundary of the image (unallocated ranges are granules).
    let first = (align - (offset as usize % align)) % align;
    let mut bounds = vec![0];
    let mut p = if first == 0 { align } else { first };
    while p < old.len() {
        bounds.push(p);
        p += align;
    }
    bounds.push(old.len());
    // With compression, where the clusters written so far end (a later run inside one of them
    // is already written).
    let mut compressed_to = 0;
    let mut i = 0;
    while i + 1 < bounds.len() {
        let (s, e) = (bounds[i], bounds[i + 1]);
        if compress && offset + e as u64 <= compressed_to {
            i += 1;
            continue;
        }
        if !differs(s, e) {
            i += 1;
            continue;
        }
        // Extend over following differing granules.
        let mut j = i + 1;
        while j + 1 < bounds.len() && differs(bounds[j], bounds[j + 1]) {
            j += 1;
        }
        let (s, e) = (bounds[i], bounds[j]);
        let at = offset + s as u64;
        let data = &old[s..e];
        if sides.old_is_zero || is_zero(data) {
            // Explicit zeros: a range the image leaves unallocated reads the new backing file.
            top.write_zeroes_flagged(at, data.len() as u64)?;
            stats.zeroed += data.len() as u64;
        } else if compress {
            compressed_to = write_compressed_run(top, at, data)?;
            stats.copied += data.len() as u64;
        } else {
            top.write_at(data, at)?;
            stats.copied += data.len() as u64;
        }
        i = j;
    }
    Ok(())
}
