//! Byte storage under an image.
//!
//! [`Storage`] is the small, synchronous contract every backend fulfils; it knows nothing of
//! qcow2. Backends: [`FileStorage`] (positioned `pread`/`pwrite`, never seek + read),
//! [`MemoryStorage`] (tests, fuzzing) and the opt-in, read-only [`MmapStorage`] (a memory
//! mapping; the crate's one module with `unsafe` code). With the `testing` feature, `testing`
//! holds storages that inject I/O errors and simulate power loss. [`lock`] takes QEMU's image locks on files.

pub mod blkdebug;
mod file;
pub mod lock;
mod memory;
#[allow(unsafe_code)]
mod mmap;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use file::FileStorage;
pub use memory::MemoryStorage;
pub use mmap::MmapStorage;

use std::fmt::Debug;
use std::io;

/// Positioned byte I/O under an image.
///
/// Contract:
/// - All methods take `&self`; implementations are safe to call from several threads at once.
///   Concurrent writes to overlapping ranges have unspecified interleaving; everything else is
///   independent.
/// - [`read_at`](Storage::read_at) fills the whole buffer. Bytes at or past the end of the
///   storage read as zeros (QEMU leaves the last cluster of an image short).
/// - [`write_at`](Storage::write_at) writes the whole buffer, extending the storage if needed.
/// - [`flush`](Storage::flush) returns once every completed write is durable.
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// use qcow2kit::{BlockDevice, RawImage};
/// use std::sync::Arc;
/// // Any Storage can hold an image: here memory, as a raw disk.
/// let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(vec![0; 1 << 20]));
/// let disk = RawImage::open(s, true)?;
/// disk.write_at(&[1; 512], 0)?;
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub trait Storage: Send + Sync + Debug {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// let mut b = [9u8; 8];
    /// s.read_at(&mut b, 4092)?; // the last 4 bytes lie past the end
    /// assert_eq!(b, [1, 1, 1, 1, 0, 0, 0, 0]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// s.write_at(&[2; 10], 5000)?; // extends the storage
    /// assert_eq!(s.len()?, 5010);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// The current length in bytes.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// assert_eq!(s.len()?, 4096);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// assert!(!s.is_empty()?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// s.set_len(100)?;
    /// assert_eq!(s.len()?, 100);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// s.write_at(&[3; 4], 0)?;
    /// s.flush()?; // durable from here on
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn flush(&self) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, releasing space where the backend can.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// s.punch_hole(0, 512)?;
    /// let mut b = [9u8; 4];
    /// s.read_at(&mut b, 0)?;
    /// assert_eq!(b, [0; 4]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Whether the bytes at `offset` hold data (`true`) or lie in a hole that reads as zeros
    /// (`false`), and where that run ends; `None` when the backend cannot tell (then everything
    /// counts as data). Past the end of the storage it is a hole.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// // Data from 0 (or `None`: a backend that cannot tell counts everything as data).
    /// assert!(matches!(s.data_run(0)?, None | Some((true, _))));
    /// // Past the end: a hole.
    /// assert!(matches!(s.data_run(8192)?, None | Some((false, _))));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        let _ = offset;
        Ok(None)
    }

    /// Bytes actually allocated on the medium (for `info`'s "disk size"), if known.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// assert_eq!(s.allocated_bytes(), None);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// Told by the engine just before the storage work QEMU names `event` (see [`blkdebug`]);
    /// storages other than fault-injection filters ignore it.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// s.debug_event(qcow2kit::io::blkdebug::DebugEvent::WriteAio); // ignored
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn debug_event(&self, event: blkdebug::DebugEvent) {
        let _ = event;
    }
}

/// Conveniences over [`Storage`] for big-endian integers.
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// let s = MemoryStorage::from_bytes(vec![1; 4096]);
/// use qcow2kit::io::StorageExt;
/// assert_eq!(s.read_u64_be(0)?, 0x0101_0101_0101_0101);
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait StorageExt: Storage {
    /// Reads a big-endian `u64` at `offset`.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// use qcow2kit::io::StorageExt;
    /// assert_eq!(s.read_u64_be(4090)?, 0x0101_0101_0101_0000); // zeros past the end
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn read_u64_be(&self, offset: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_at(&mut b, offset)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads `len` bytes at `offset` into a new vector.
    ///
    /// Callers must have bounded `len` (by the file size or a format limit) beforehand.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let s = MemoryStorage::from_bytes(vec![1; 4096]);
    /// use qcow2kit::io::StorageExt;
    /// assert_eq!(s.read_vec(4094, 4)?, vec![1, 1, 0, 0]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(&mut v, offset)?;
        Ok(v)
    }
}

impl<T: Storage + ?Sized> StorageExt for T {}
