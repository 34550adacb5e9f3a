//! The guest's view of a disk: the [`BlockDevice`] trait and raw images.

use crate::error::{Error, Result};
use crate::io::Storage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a range of a device holds, as seen by one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
/// All methods take `&self` and may be called from several threads at once. Requests must lie
/// inside `0..size()`; reads of unallocated ranges return the backing device's data or zeros.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the guest data at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tells the device the range's content is no longer needed; it reads as zeros afterwards
    /// (never as backing data where the guest had written).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// The status of the run starting at `offset`, at most `len` bytes, in this layer alone.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// The backing device, if this device has one attached.
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        None
    }

    /// Short name of the format (`"qcow2"`, `"raw"`).
    fn format_name(&self) -> &'static str;

    /// Changes the virtual size to `new_size` bytes (a multiple of 512). Growing makes the new
    /// range read as zeros; shrinking is refused unless `allow_shrink`. Devices that cannot
    /// change size return [`Error::Unsupported`].
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        let _ = (new_size, allow_shrink);
        Err(Error::Unsupported(format!(
            "resizing {} devices",
            self.format_name()
        )))
    }
}

/// Checks that `offset..offset+len` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// The status of the run at `offset` resolved through the whole backing chain: the first layer
/// that has data or zeros answers; a range no layer allocates is `Unallocated` at the depth of the
/// last layer consulted. Past the end of a shorter backing device the answer is `Zero`.
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
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    writable: bool,
}

impl RawImage {
    /// A raw image over `storage`; its size is the storage's length rounded up to a multiple
    /// of 512 bytes.
    ///
    /// Invariant: the virtual size is what QEMU sees. QEMU's block layer counts whole 512-byte
    /// sectors (`total_sectors` is the length rounded up), so a 1000-byte raw file is a
    /// 1024-byte disk for qemu-img (`info`, `convert`, and as a backing file). The bytes past
    /// the end of the storage read as zeros (the [`Storage`] contract).
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
        })
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
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
        self.storage
            .flush()
            .map_err(|e| Error::io("flushing raw image", e))
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
