//! The guest's view of a disk: the [`BlockDevice`] trait and raw images.
//!
//! ```
//! use qcow2kit::device::{BlockDevice, RawImage};
//! use qcow2kit::io::MemoryStorage;
//! use std::sync::Arc;
//!
//! let disk: Arc<dyn BlockDevice> =
//!     Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 8192])), false)?);
//! assert_eq!((disk.size(), disk.format_name()), (8192, "raw"));
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::io::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Most bytes a vectored request gathers into one contiguous request (see
/// [`BlockDevice::write_vectored_at`]).
///
/// ```
/// use qcow2kit::device::MAX_GATHER_BYTES;
/// assert_eq!(MAX_GATHER_BYTES, 4 << 20);
/// ```
pub const MAX_GATHER_BYTES: usize = 4 << 20;

/// What a discarded range reads as afterwards (see [`BlockDevice::discard_with`]).
///
/// ```
/// use qcow2kit::DiscardMode;
/// assert_eq!(DiscardMode::default(), DiscardMode::Zeros);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DiscardMode {
    /// The range reads as zeros, whatever the backing device holds there: what a guest's
    /// discard does to a qcow2 v3 image in QEMU, and what [`BlockDevice::discard`] does.
    #[default]
    Zeros,
    /// The range reads from the backing device again (zeros where there is none): the layer
    /// drops what it held, as QEMU's `make_empty` and a full discard do.
    Backing,
}

/// What a range of a device holds, as seen by one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use qcow2kit::BlockDevice;
/// # use qcow2kit::io::MemoryStorage;
/// # use std::sync::Arc;
/// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
/// use qcow2kit::ExtentKind;
/// disk.write_at(&[1u8; 65536], 0)?;
/// disk.write_zeroes(0, 65536)?; // the zero flag replaces the data
/// assert_eq!(disk.block_status(0, 65536)?.kind, ExtentKind::Zero);
/// assert_eq!(disk.block_status(65536, 65536)?.kind, ExtentKind::Unallocated);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub enum ExtentKind {
    /// Data stored in this layer (possibly compressed).
    Data,
    /// Reads as zeros, decided by this layer (zero flag, or past the end of a backing file).
    Zero,
    /// Not allocated here: reads come from the backing device (or zeros without one).
    Unallocated,
}

/// A run of a device with one status: the answer of [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use qcow2kit::BlockDevice;
/// # use qcow2kit::io::MemoryStorage;
/// # use std::sync::Arc;
/// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
/// disk.write_at(&[1u8; 65536], 0)?;
/// let e = disk.block_status(0, 1 << 20)?;
/// assert_eq!((e.offset, e.len, e.depth, e.compressed), (0, 65536, 0, false));
/// assert!(e.host_offset.is_some());
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub struct Extent {
    /// Guest offset where the run starts.
    pub offset: u64,
    /// Length of the run in bytes (> 0).
    pub len: u64,
    /// What the run holds.
    pub kind: ExtentKind,
    /// Which layer answered: 0 is the device itself, 1 its backing device, …
    pub depth: u32,
    /// Host offset of the data in that layer's file, when it has one (not for compressed data).
    pub host_offset: Option<u64>,
    /// Whether the data is stored compressed.
    pub compressed: bool,
}

/// A virtual disk as a guest sees it.
///
/// Requests must lie inside `0..size()` ([`Error::OutOfRange`] otherwise); reads of
/// unallocated ranges return the backing device's data or zeros.
///
/// # Threading and locking contract
///
/// - Every method takes `&self`; a device is `Send + Sync` and is meant to be shared as an
///   `Arc<dyn BlockDevice>` by any number of threads issuing requests at once.
/// - Requests on disjoint ranges proceed in parallel. Requests on overlapping ranges are
///   serialised by the device at cluster granularity: a write is never torn by another write,
///   and a read that overlaps a write in flight returns either the old or the new data of each
///   cluster, never a mix within one cluster of a qcow2 image.
/// - A write is acknowledged (`Ok`) once it is visible to every later read from any thread;
///   it is durable once a later [`flush`](Self::flush) returns `Ok`.
/// - Across processes, the files under a device opened through [`crate::chain::open`] carry
///   QEMU's image locks ([`crate::chain::Locking`]): a second writer, qcow2kit or QEMU, is
///   refused while the device is open for writing.
/// - [`close`](Self::close) ends the device's life for writing: every later change fails with
///   [`Error::Closed`], never a silent `Ok`. Dropping a device without closing it flushes what
///   it can but has no way to report an error.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::{BlockDevice, Error, RawImage};
/// use std::sync::Arc;
///
/// let disk: Arc<dyn BlockDevice> =
///     Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true)?);
/// let writers: Vec<_> = (0..4u8)
///     .map(|i| {
///         let disk = disk.clone();
///         std::thread::spawn(move || disk.write_at(&[i + 1; 4096], u64::from(i) * 4096))
///     })
///     .collect();
/// for w in writers {
///     w.join().expect("writer thread")?;
/// }
/// disk.close()?;
/// let mut buf = [0u8; 4096];
/// disk.read_at(&mut buf, 3 * 4096)?;
/// assert_eq!(buf, [4u8; 4096]);
/// assert!(matches!(disk.write_at(&buf, 0), Err(Error::Closed)));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    ///
    /// ```
    /// # use qcow2kit::{BlockDevice, RawImage};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true)?;
    /// assert_eq!(disk.size(), 1 << 20);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn size(&self) -> u64;

    /// Fills `buf` with the guest data at `offset`.
    ///
    /// ```
    /// # use qcow2kit::{BlockDevice, RawImage};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true)?;
    /// let mut buf = [1u8; 512];
    /// disk.read_at(&mut buf, 4096)?;
    /// assert_eq!(buf, [0u8; 512]);
    /// assert!(disk.read_at(&mut buf, (1 << 20) - 256).is_err()); // past the end
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.write_at(b"hello", 1000)?; // any offset and length
    /// let mut back = [0u8; 5];
    /// disk.read_at(&mut back, 1000)?;
    /// assert_eq!(&back, b"hello");
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.write_at(&[9u8; 65536], 0)?;
    /// disk.write_zeroes(0, 65536)?; // a whole cluster: only its entry changes
    /// let mut buf = [1u8; 512];
    /// disk.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [0u8; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tells the device the range's content is no longer needed; it reads as zeros afterwards
    /// (never as backing data where the guest had written).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.write_at(&[9u8; 131072], 0)?;
    /// disk.discard(0, 131072)?; // the clusters' space is freed
    /// let mut buf = [1u8; 512];
    /// disk.read_at(&mut buf, 65536)?;
    /// assert_eq!(buf, [0u8; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.write_at(&[1u8; 4096], 0)?;
    /// disk.flush()?; // the write survives a crash from here on
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn flush(&self) -> Result<()>;

    /// Flushes, then closes the device for changes: afterwards every write, zero write,
    /// discard, flush and resize fails with [`Error::Closed`]; reads still answer (what was
    /// written stays readable). Closing again is a no-op. An error means the device could not
    /// make its writes durable, and says why.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.write_at(&[1u8; 4096], 0)?;
    /// BlockDevice::close(&disk)?;
    /// assert!(matches!(disk.write_at(&[2u8; 512], 0), Err(qcow2kit::Error::Closed)));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn close(&self) -> Result<()>;

    /// Fills `bufs`, one after the other, with the guest data starting at `offset`.
    ///
    /// Runs of small buffers are read as one request of at most [`MAX_GATHER_BYTES`] and
    /// scattered, so that a guest's scatter-gather list costs as few requests as one buffer.
    ///
    /// ```
    /// # use qcow2kit::{BlockDevice, RawImage};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true)?;
    /// use std::io::IoSliceMut;
    /// disk.write_at(&[1u8; 1024], 0)?;
    /// let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
    /// disk.read_vectored_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 0)?;
    /// assert_eq!((a, b), ([1u8; 512], [1u8; 512]));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total = vectored_len(bufs.iter().map(|b| b.len()), offset, self.size())?;
        if let [one] = bufs {
            return self.read_at(one, offset);
        }
        let mut chunk = vec![0u8; total.min(MAX_GATHER_BYTES)];
        let mut pos = offset;
        let mut cursor = SliceCursor::default();
        while cursor.index < bufs.len() {
            let n = cursor
                .remaining(bufs.iter().map(|b| b.len()))
                .min(chunk.len());
            self.read_at(&mut chunk[..n], pos)?;
            cursor.scatter(bufs, &chunk[..n]);
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes `bufs`, one after the other, starting at `offset`.
    ///
    /// Runs of small buffers are gathered into one request of at most [`MAX_GATHER_BYTES`], so
    /// a list of sector-sized buffers costs one cluster write, not a copy-on-write per buffer;
    /// a single buffer is written as it is. A failure may leave a prefix of the list written.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// use std::io::IoSlice;
    /// // One cluster allocation for the whole list, not one per buffer.
    /// disk.write_vectored_at(&[IoSlice::new(&[1u8; 512]), IoSlice::new(&[2u8; 512])], 65536)?;
    /// let mut buf = [0u8; 1024];
    /// disk.read_at(&mut buf, 65536)?;
    /// assert_eq!((buf[0], buf[1023]), (1, 2));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total = vectored_len(bufs.iter().map(|b| b.len()), offset, self.size())?;
        if let [one] = bufs {
            return self.write_at(one, offset);
        }
        let mut chunk = Vec::with_capacity(total.min(MAX_GATHER_BYTES));
        let mut pos = offset;
        let mut cursor = SliceCursor::default();
        while cursor.index < bufs.len() {
            chunk.clear();
            cursor.gather(bufs, &mut chunk, MAX_GATHER_BYTES);
            self.write_at(&chunk, pos)?;
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset`, the range reading afterwards as `mode` says.
    /// [`DiscardMode::Zeros`] is [`discard`](Self::discard). Devices that cannot make a range
    /// read from their backing device again return [`Error::Unsupported`] for
    /// [`DiscardMode::Backing`] when they have one; without one it is a plain discard.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::DiscardMode;
    /// disk.write_at(&[3u8; 65536], 0)?;
    /// // Without a backing file both modes read zeros afterwards.
    /// disk.discard_with(0, 65536, DiscardMode::Backing)?;
    /// let mut buf = [1u8; 512];
    /// disk.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [0u8; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn discard_with(&self, offset: u64, len: u64, mode: DiscardMode) -> Result<()> {
        match mode {
            DiscardMode::Backing if self.backing().is_some() => Err(Error::Unsupported(format!(
                "discarding to the backing device on {} devices",
                self.format_name()
            ))),
            _ => self.discard(offset, len),
        }
    }

    /// The status of the run starting at `offset`, at most `len` bytes, in this layer alone.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::ExtentKind;
    /// disk.write_at(&[1u8; 65536], 65536)?;
    /// assert_eq!(disk.block_status(0, 1 << 20)?.kind, ExtentKind::Unallocated);
    /// let e = disk.block_status(65536, 1 << 19)?;
    /// assert_eq!((e.kind, e.len), (ExtentKind::Data, 65536));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// The backing device, if this device has one attached.
    ///
    /// ```
    /// # use qcow2kit::{BlockDevice, RawImage};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true)?;
    /// assert!(disk.backing().is_none()); // a raw image has none
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        None
    }

    /// Short name of the format (`"qcow2"`, `"raw"`).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// assert_eq!(disk.format_name(), "qcow2");
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn format_name(&self) -> &'static str;

    /// Changes the virtual size to `new_size` bytes (a multiple of 512). Growing makes the new
    /// range read as zeros; shrinking is refused unless `allow_shrink`. Devices that cannot
    /// change size return [`Error::Unsupported`].
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use std::sync::Arc;
    /// # let disk = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// disk.resize(4 << 20, false)?;
    /// assert_eq!(disk.size(), 4 << 20);
    /// assert!(disk.resize(1 << 20, false).is_err()); // shrinking needs allow_shrink
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        let _ = (new_size, allow_shrink);
        Err(Error::Unsupported(format!(
            "resizing {} devices",
            self.format_name()
        )))
    }
}

/// The total length of a vectored request at `offset`, checked against a device of `size`.
fn vectored_len(lens: impl Iterator<Item = usize>, offset: u64, size: u64) -> Result<usize> {
    let mut total = 0usize;
    for l in lens {
        total = total.checked_add(l).ok_or(Error::OutOfRange {
            offset,
            len: u64::MAX,
            size,
        })?;
    }
    check_range(offset, total as u64, size)?;
    Ok(total)
}

/// A position inside a list of buffers: buffer `index`, byte `at` within it.
#[derive(Default)]
struct SliceCursor {
    index: usize,
    at: usize,
}

impl SliceCursor {
    /// Bytes left in the buffers from the cursor on.
    fn remaining(&self, mut lens: impl Iterator<Item = usize>) -> usize {
        let mut n = 0usize;
        for (i, l) in lens.by_ref().enumerate() {
            if i == self.index {
                n = l - self.at;
            } else if i > self.index {
                n = n.saturating_add(l);
            }
        }
        n
    }

    /// Copies `data` into the buffers from the cursor on, advancing it.
    fn scatter(&mut self, bufs: &mut [IoSliceMut<'_>], mut data: &[u8]) {
        while let Some(b) = bufs.get_mut(self.index) {
            let n = (b.len() - self.at).min(data.len());
            b[self.at..self.at + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.advance(b.len(), n);
            if data.is_empty() {
                break;
            }
        }
        self.skip_empty(bufs.iter().map(|b| b.len()));
    }

    /// Appends bytes from the cursor on to `out` until it holds `limit` bytes, advancing.
    fn gather(&mut self, bufs: &[IoSlice<'_>], out: &mut Vec<u8>, limit: usize) {
        while let Some(b) = bufs.get(self.index) {
            let n = (b.len() - self.at).min(limit - out.len());
            out.extend_from_slice(&b[self.at..self.at + n]);
            self.advance(b.len(), n);
            if out.len() == limit {
                break;
            }
        }
        self.skip_empty(bufs.iter().map(|b| b.len()));
    }

    fn advance(&mut self, len: usize, n: usize) {
        self.at += n;
        if self.at == len {
            self.index += 1;
            self.at = 0;
        }
    }

    /// Moves past empty buffers, so the cursor is at the end only when no byte is left.
    fn skip_empty(&mut self, lens: impl Iterator<Item = usize>) {
        for (i, l) in lens.enumerate() {
            if i == self.index && l == 0 && self.at == 0 {
                self.index += 1;
            }
        }
    }
}

/// Checks that `offset..offset+len` lies inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// The status of the run at `offset` resolved through the whole backing chain: the first layer
/// that has data or zeros answers; a range no layer allocates is `Unallocated` at the depth of the
/// last layer consulted. Past the end of a shorter backing device the answer is `Zero`.
///
/// ```
/// use qcow2kit::device::chain_status;
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::{BlockDevice, ExtentKind, RawImage};
/// use std::sync::Arc;
///
/// let base: Arc<dyn BlockDevice> =
///     Arc::new(RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 1 << 20])), false)?);
/// let mut top = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
/// top.set_backing(Some(base));
/// let e = chain_status(&top, 0, 1 << 20)?;
/// assert_eq!((e.kind, e.depth), (ExtentKind::Data, 1)); // answered by the backing file
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn chain_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Extent> {
    let mut e = dev.block_status(offset, len)?;
    let mut layer: &dyn BlockDevice = dev;
    let mut depth = 0;
    while e.kind == ExtentKind::Unallocated {
        let Some(b) = layer.backing() else { break };
        depth += 1;
        let bsize = b.size();
        if offset >= bsize {
            e = Extent {
                depth,
                kind: ExtentKind::Zero,
                ..e
            };
            break;
        }
        let l = e.len.min(bsize - offset);
        let mut inner = b.block_status(offset, l)?;
        inner.depth = depth;
        e = inner;
        layer = b.as_ref();
    }
    e.depth = depth.max(e.depth);
    Ok(e)
}

/// A raw image: guest offset = offset in the storage.
#[derive(Debug)]
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::{BlockDevice, RawImage};
/// use std::sync::Arc;
///
/// let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 1000])), true)?;
/// assert_eq!(disk.size(), 1024); // whole sectors, as QEMU counts them
/// disk.write_at(&[5; 24], 1000)?; // the storage grows to hold the tail
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    writable: bool,
    closed: AtomicBool,
}

impl RawImage {
    /// A raw image over `storage`; its size is the storage's length rounded up to a multiple
    /// of 512 bytes.
    ///
    /// Invariant: the virtual size is what QEMU sees. QEMU's block layer counts whole 512-byte
    /// sectors (`total_sectors` is the length rounded up), so a 1000-byte raw file is a
    /// 1024-byte disk for qemu-img (`info`, `convert`, and as a backing file). The bytes past
    /// the end of the storage read as zeros (the [`Storage`] contract).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::{BlockDevice, Error, RawImage};
    /// use std::sync::Arc;
    ///
    /// let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 4096])), false)?;
    /// assert!(matches!(disk.write_at(&[1], 0), Err(Error::ReadOnly)));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading raw image size", e))?;
        let size = len.checked_next_multiple_of(512).ok_or_else(|| {
            Error::InvalidArgument(format!("raw image length {len} is too large"))
        })?;
        Ok(RawImage {
            storage,
            size: AtomicU64::new(size),
            writable,
            closed: AtomicBool::new(false),
        })
    }

    /// The storage under the image.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// use qcow2kit::RawImage;
    /// use std::sync::Arc;
    ///
    /// let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 4096])), false)?;
    /// assert_eq!(disk.storage().len().map_err(|e| qcow2kit::Error::io("len", e))?, 4096);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn writable(&self) -> Result<()> {
        self.ensure_open()?;
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io("reading raw image", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size())?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io("writing raw image", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| Error::io("zeroing raw image", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.ensure_open()?;
        self.storage
            .flush()
            .map_err(|e| Error::io("flushing raw image", e))
    }

    fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.writable {
            self.flush()?;
        }
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        // Holes (and the sector-rounding tail past the end of the storage) read as zeros, and
        // qemu-img map reports them as zero at their offset, as it does data.
        let run = self
            .storage
            .data_run(offset)
            .map_err(|e| Error::io("reading raw image extents", e))?;
        let (data, run_end) = run.unwrap_or((true, u64::MAX));
        let len = len.min(run_end.saturating_sub(offset).max(1));
        Ok(Extent {
            offset,
            len,
            kind: if data {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            },
            depth: 0,
            host_offset: Some(offset),
            compressed: false,
        })
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    /// The file's length becomes `new_size` (a grown range is a hole and reads as zeros).
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.writable()?;
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(
                "image size must be a multiple of 512 bytes".into(),
            ));
        }
        if new_size < self.size() && !allow_shrink {
            return Err(Error::InvalidArgument(
                "shrinking needs allow_shrink (qemu-img --shrink)".into(),
            ));
        }
        self.storage
            .set_len(new_size)
            .map_err(|e| Error::io("resizing raw image", e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemoryStorage;

    #[test]
    fn raw_reads_and_bounds() {
        let s = Arc::new(MemoryStorage::from_bytes(vec![5; 1024]));
        let r = RawImage::open(s, false).unwrap();
        let mut b = [0u8; 10];
        r.read_at(&mut b, 1014).unwrap();
        assert_eq!(b, [5; 10]);
        assert!(matches!(
            r.read_at(&mut b, 1019),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(r.write_at(&b, 0), Err(Error::ReadOnly)));
    }

    #[test]
    fn raw_size_rounds_up_to_sectors_like_qemu() -> Result<()> {
        let s = Arc::new(MemoryStorage::from_bytes(vec![5; 1000]));
        let r = RawImage::open(s, false)?;
        assert_eq!(r.size(), 1024);
        let mut b = [1u8; 30];
        r.read_at(&mut b, 990)?;
        assert_eq!(b[..10], [5; 10]);
        assert_eq!(b[10..], [0; 20]);
        let e = r.block_status(0, 1024)?;
        assert_eq!((e.kind, e.len), (ExtentKind::Data, 1000));
        let e = r.block_status(1000, 24)?;
        assert_eq!((e.kind, e.len), (ExtentKind::Zero, 24));
        let empty = RawImage::open(Arc::new(MemoryStorage::new()), false)?;
        assert_eq!(empty.size(), 0);
        Ok(())
    }
}
