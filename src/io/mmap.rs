//! A host file read through a memory mapping: [`MmapStorage`].
//!
//! This is the crate's one module with `unsafe` code (the mapping itself); the crate's
//! `unsafe_code = "deny"` lint refuses it everywhere else.
//!
//! See [`MmapStorage`] for when it is safe to use.

use super::lock::LockRequest;
use super::{FileStorage, Storage};
use memmap2::{Mmap, MmapOptions};
use std::io;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

/// A read-only file under an image, read by copying from a memory mapping of it.
///
/// Writes, resizes and hole punching fail with [`io::ErrorKind::PermissionDenied`].
///
/// # When to choose it
///
/// For reading images (inspection, conversion sources, read-only backing layers served many
/// small reads) whose files nothing truncates while they are open: a read is a copy from the
/// page cache without a system call, 2-3 times the rate of [`FileStorage`]'s `pread` for 4 KiB
/// reads of a cached file (`qcow2kit bench --mmap`, see `scripts/bench-cmd`). Not for files
/// another, non-cooperating process may shrink (below), nor for writing.
///
/// # The truncation hazard
///
/// A mapping does not follow its file: if another process shrinks the file, touching a mapped
/// page past the new end raises `SIGBUS` and kills this process. Nothing in safe code can catch
/// that, so the storage is **opt-in**, for files no one truncates while they are read:
/// - it takes QEMU's image lock for reading ([`LockRequest::image`]), which keeps every
///   QEMU-cooperating writer (QEMU, qemu-img, qcow2kit) away for as long as it lives — they
///   refuse to open the file for writing;
/// - a process that ignores the locks can still truncate the file: choose [`FileStorage`]
///   wherever that cannot be excluded.
///
/// Growth is safe and handled: a read that reaches past the mapped length looks at the file's
/// length, re-maps it when it grew, and reads what still lies past the mapping with `pread`
/// (bytes past the end of the file read as zeros, as the [`Storage`] contract says).
///
/// ```
/// use qcow2kit::io::{MmapStorage, Storage};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("image");
/// std::fs::write(&path, vec![6u8; 8192])?;
/// let m = MmapStorage::open(&path)?; // read-only, QEMU's read lock taken
/// let mut b = [0u8; 4];
/// m.read_at(&mut b, 4096)?;
/// assert_eq!(b, [6; 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MmapStorage {
    /// The file, locked for reading; also the `pread` path past the mapping.
    file: FileStorage,
    /// The mapping of the file's first `map.len()` bytes; `None` while the file is empty.
    map: RwLock<Option<Mmap>>,
}

impl MmapStorage {
    /// Opens the file at `path` read-only, locked as a read-only image
    /// ([`FileStorage::open`]), and maps it.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("image");
    /// std::fs::write(&path, vec![6u8; 8192])?;
    /// let m = qcow2kit::io::MmapStorage::open(&path)?;
    /// assert_eq!(m.mapped_len(), 8192);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_file_storage(FileStorage::open_with(
            path,
            false,
            Some(LockRequest::image(false)),
        )?)
    }

    /// Maps an already opened file (its locks are the caller's; see the type's documentation
    /// for the hazard of a file truncated under the mapping).
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, MmapStorage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("image");
    /// std::fs::write(&path, vec![6u8; 8192])?;
    /// let m = MmapStorage::from_file_storage(FileStorage::open(&path, false)?)?;
    /// assert_eq!(m.mapped_len(), 8192);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_file_storage(file: FileStorage) -> io::Result<Self> {
        let s = MmapStorage {
            file,
            map: RwLock::new(None),
        };
        s.remap()?;
        Ok(s)
    }

    /// The length now mapped.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("image");
    /// std::fs::write(&path, vec![6u8; 100])?;
    /// assert_eq!(qcow2kit::io::MmapStorage::open(&path)?.mapped_len(), 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn mapped_len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |m| m.len())
    }

    /// Maps the file's current length (nothing when it is empty or too big to address).
    fn remap(&self) -> io::Result<()> {
        let len = self.file.len()?;
        let mut slot = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().map_or(0, |m| m.len() as u64) == len {
            return Ok(());
        }
        let Ok(len) = usize::try_from(len) else {
            return Ok(());
        };
        if len == 0 {
            *slot = None;
            return Ok(());
        }
        // SAFETY: the mapping stays valid only while no one truncates or writes the file (a
        // write changes bytes behind a shared slice; a truncation faults on access). The file
        // is open read-only; `open` holds it under QEMU's read lock, which makes every
        // QEMU-cooperating writer refuse to open it (`from_file_storage` leaves the lock to its
        // caller, as documented). A process ignoring the locks is the residual hazard the
        // type's documentation states, which is why the storage is opt-in.
        // The mapping is never handed out: reads copy from it under the `map` lock.
        let map = unsafe { MmapOptions::new().len(len).map(self.file.file())? };
        *slot = Some(map);
        Ok(())
    }

    fn read_only() -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the memory-mapped storage is read-only",
        )
    }
}

impl Storage for MmapStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let copied = {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            copy_from(map.as_deref().unwrap_or(&[]), buf, offset)
        };
        if copied == buf.len() {
            return Ok(());
        }
        // Past the mapping: the file may have grown since it was mapped.
        let start = offset.saturating_add(copied as u64);
        if self.file.len()? > start {
            self.remap()?;
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            let more = copy_from(map.as_deref().unwrap_or(&[]), &mut buf[copied..], start);
            if copied + more == buf.len() {
                return Ok(());
            }
            let start = start.saturating_add(more as u64);
            return self.file.read_at(&mut buf[copied + more..], start);
        }
        // At or past the end of the file: zeros.
        buf[copied..].fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(Self::read_only())
    }

    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(Self::read_only())
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is ever written.
        Ok(())
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(Self::read_only())
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        self.file.data_run(offset)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }
}

/// Copies what `map` holds from `offset` on into the front of `buf`; returns how many bytes.
fn copy_from(map: &[u8], buf: &mut [u8], offset: u64) -> usize {
    let Ok(start) = usize::try_from(offset) else {
        return 0;
    };
    let Some(avail) = map.len().checked_sub(start) else {
        return 0;
    };
    let n = avail.min(buf.len());
    buf[..n].copy_from_slice(&map[start..start + n]);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, MmapStorage) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let s = MmapStorage::open(f.path()).unwrap();
        (f, s)
    }

    #[test]
    fn reads_like_the_file_with_zeros_past_the_end() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (_f, s) = file_with(&data);
        let mut buf = vec![0xffu8; 300];
        s.read_at(&mut buf, 9_900).unwrap();
        assert_eq!(&buf[..100], &data[9_900..]);
        assert!(buf[100..].iter().all(|&b| b == 0));
        s.read_at(&mut buf, 20_000).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        s.read_at(&mut buf[..10], 17).unwrap();
        assert_eq!(&buf[..10], &data[17..27]);
    }

    #[test]
    fn growth_is_remapped() {
        let (mut f, s) = file_with(&[1u8; 4096]);
        assert_eq!(s.mapped_len(), 4096);
        f.write_all(&[2u8; 8192]).unwrap();
        f.flush().unwrap();
        let mut buf = vec![0u8; 8192];
        s.read_at(&mut buf, 2048).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 1));
        assert!(buf[2048..].iter().all(|&b| b == 2));
        assert_eq!(s.mapped_len(), 12288);
    }

    #[test]
    fn empty_file_and_writes_refused() {
        let (_f, s) = file_with(&[]);
        let mut buf = [7u8; 16];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert_eq!(
            s.write_at(&[1], 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(s.set_len(0).is_err() && s.punch_hole(0, 1).is_err());
    }
}
