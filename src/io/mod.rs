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
pub trait Storage: Send + Sync + Debug {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, releasing space where the backend can.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Whether the bytes at `offset` hold data (`true`) or lie in a hole that reads as zeros
    /// (`false`), and where that run ends; `None` when the backend cannot tell (then everything
    /// counts as data). Past the end of the storage it is a hole.
    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        let _ = offset;
        Ok(None)
    }

    /// Bytes actually allocated on the medium (for `info`'s "disk size"), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// Told by the engine just before the storage work QEMU names `event` (see [`blkdebug`]);
    /// storages other than fault-injection filters ignore it.
    fn debug_event(&self, event: blkdebug::DebugEvent) {
        let _ = event;
    }
}

/// Conveniences over [`Storage`] for big-endian integers.
pub trait StorageExt: Storage {
    /// Reads a big-endian `u64` at `offset`.
    fn read_u64_be(&self, offset: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_at(&mut b, offset)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads `len` bytes at `offset` into a new vector.
    ///
    /// Callers must have bounded `len` (by the file size or a format limit) beforehand.
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(&mut v, offset)?;
        Ok(v)
    }
}

impl<T: Storage + ?Sized> StorageExt for T {}
