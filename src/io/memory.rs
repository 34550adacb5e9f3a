//! An in-memory [`Storage`], for tests and fuzzing.

use super::Storage;
use std::io;
use std::sync::RwLock;

/// A growable byte vector behind a lock, optionally with a capacity (like a small disk).
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// let m = MemoryStorage::new();
/// m.write_at(b"abc", 10)?; // grows, the gap reads as zeros
/// assert_eq!(m.to_bytes(), b"\0\0\0\0\0\0\0\0\0\0abc");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct MemoryStorage {
    data: RwLock<Vec<u8>>,
    /// Writes and resizes past this length fail with "no space left on device".
    capacity: u64,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::from_bytes(Vec::new())
    }
}

impl MemoryStorage {
    /// Empty storage.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// assert_eq!(MemoryStorage::new().len()?, 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding `bytes`.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let m = MemoryStorage::from_bytes(vec![7; 512]);
    /// let mut b = [0u8; 4];
    /// m.read_at(&mut b, 508)?;
    /// assert_eq!(b, [7; 4]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            data: RwLock::new(bytes),
            capacity: u64::MAX,
        }
    }

    /// Storage holding `bytes` that cannot grow past `capacity` bytes: a write or resize beyond
    /// it fails with [`io::ErrorKind::StorageFull`] (ENOSPC) and changes nothing. Bounds the
    /// memory a hostile image can make a writer allocate.
    ///
    /// ```
    /// use qcow2kit::io::{MemoryStorage, Storage};
    /// let m = MemoryStorage::with_capacity_limit(Vec::new(), 4096);
    /// assert!(m.write_at(&[1; 512], 4000).is_err()); // ENOSPC, nothing changed
    /// assert_eq!(m.len()?, 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_capacity_limit(bytes: Vec<u8>, capacity: u64) -> Self {
        MemoryStorage {
            data: RwLock::new(bytes),
            capacity,
        }
    }

    fn check_capacity(&self, end: u64) -> io::Result<()> {
        if end > self.capacity {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }

    /// A copy of the current contents.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// assert_eq!(MemoryStorage::from_bytes(vec![1, 2]).to_bytes(), vec![1, 2]);
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "offset beyond addressable memory",
    )
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        if offset >= len {
            buf.fill(0);
            return Ok(());
        }
        let start = offset as usize;
        let avail = (data.len() - start).min(buf.len());
        buf[..avail].copy_from_slice(&data[start..start + avail]);
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| too_large())?;
        let end = start.checked_add(buf.len()).ok_or_else(too_large)?;
        self.check_capacity(end as u64)?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_capacity(len)?;
        let len = usize::try_from(len).map_err(|_| too_large())?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        // Everything stored is data; past the end is a hole.
        let len = self.len()?;
        Ok(Some(if offset >= len {
            (false, u64::MAX)
        } else {
            (true, len)
        }))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let dlen = data.len() as u64;
        let start = offset.min(dlen) as usize;
        let end = offset.saturating_add(len).min(dlen) as usize;
        data[start..end].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_are_zero() {
        let s = MemoryStorage::from_bytes(vec![1, 2, 3]);
        let mut b = [9u8; 5];
        s.read_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3, 0, 0, 0]);
        s.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn capacity_limit_refuses_growth() {
        let m = MemoryStorage::with_capacity_limit(vec![1; 10], 16);
        assert!(m.write_at(&[2; 6], 10).is_ok());
        let e = m.write_at(&[3], 16).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        assert!(m.set_len(17).is_err());
        assert_eq!(m.len().unwrap(), 16);
    }

    #[test]
    fn write_extends() {
        let s = MemoryStorage::new();
        s.write_at(&[7, 7], 4).unwrap();
        assert_eq!(s.to_bytes(), vec![0, 0, 0, 0, 7, 7]);
        s.punch_hole(3, 10).unwrap();
        assert_eq!(s.to_bytes(), vec![0; 6]);
    }
}
