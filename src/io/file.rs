//! A file on the host as [`Storage`].

use super::lock::{acquire, release, LockRequest};
use super::Storage;
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A host file accessed with positioned I/O (`pread`/`pwrite`), shareable between threads.
///
/// Opened by [`open`](Self::open), [`open_with`](Self::open_with) or [`create`](Self::create),
/// it holds QEMU's image locks ([`super::lock`]) for as long as it lives.
///
/// ```
/// use qcow2kit::io::{FileStorage, Storage};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("f");
/// let s = FileStorage::create(&path)?;
/// s.write_at(b"qcow", 0)?;
/// s.flush()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    locked: bool,
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        if self.locked {
            // Nothing to report to: at worst the locks go when the descriptor closes.
            let _ = release(&self.file);
        }
    }
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write, with the locks QEMU's qcow2 driver
    /// takes on its image file ([`LockRequest::image`]): it refuses (with a
    /// [`LockError`](super::lock::LockError) inside the I/O error) when another open of the file,
    /// in this process or another, writes it, or when this open writes and another one
    /// refuses to share that.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// std::fs::write(&path, [5u8; 512])?;
    /// let s = FileStorage::open(&path, false)?; // read-only
    /// assert_eq!(s.len()?, 512);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        Self::open_with(path, writable, Some(LockRequest::image(writable)))
    }

    /// Opens an existing file, read-only or read-write, taking the locks of `lock` (none when
    /// `None`, for callers that lock by themselves).
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// std::fs::write(&path, [5u8; 512])?;
    /// let s = FileStorage::open_with(&path, true, None)?; // no image lock
    /// assert!(s.is_writable());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_with(
        path: impl AsRef<Path>,
        writable: bool,
        lock: Option<LockRequest>,
    ) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        if let Some(request) = lock {
            acquire(&file, path, request)?;
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            locked: lock.is_some(),
        })
    }

    /// Creates a file for writing, or empties an existing one, as qemu-img create does: the
    /// file is locked ([`LockRequest::create`]) before it is truncated, so an image another
    /// open is using is refused, not destroyed.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// let s = FileStorage::create(&path)?; // truncated if it existed
    /// assert_eq!(s.len()?, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        acquire(&file, path, LockRequest::create())?;
        file.set_len(0)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            locked: true,
        })
    }

    /// Wraps an already open file; no lock is taken.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// let file = std::fs::File::create(&path)?;
    /// let s = FileStorage::from_file(file, path.clone(), true);
    /// assert_eq!(s.path(), path.as_path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_file(file: File, path: PathBuf, writable: bool) -> Self {
        FileStorage {
            file,
            path,
            writable,
            locked: false,
        }
    }

    /// The path this storage was opened from.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// let s = FileStorage::create(&path)?;
    /// assert_eq!(s.path(), path.as_path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// let s = FileStorage::create(&path)?;
    /// assert!(s.file().metadata()?.is_file());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file was opened for writing.
    ///
    /// ```
    /// use qcow2kit::io::{FileStorage, Storage};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("f");
    /// let s = FileStorage::create(&path)?;
    /// assert!(s.is_writable());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    // End of file: the rest reads as zeros.
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Clipped to the file, so that no hole extends it.
        let end = offset.saturating_add(len).min(self.len()?);
        if end <= offset {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, end - offset) {
            Ok(()) => return Ok(()),
            // File systems without hole punching: write zeros, the range reads the same.
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        // lseek(SEEK_DATA/SEEK_HOLE) moves the shared file position, which nothing here uses
        // (all I/O is positioned).
        let len = self.len()?;
        if offset >= len {
            return Ok(Some((false, u64::MAX)));
        }
        match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) if d == offset => {
                let hole = rustix::fs::seek(&self.file, SeekFrom::Hole(offset))?;
                Ok(Some((true, hole.min(len))))
            }
            Ok(d) => Ok(Some((false, d))),
            // No data at or after `offset`: a hole up to the end.
            Err(e) if e == Errno::NXIO => Ok(Some((false, len))),
            Err(e) if e == Errno::INVAL || e == Errno::OPNOTSUPP => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}
