//! Where inspection reads a file's bytes: a random-access [`Storage`], or what the streaming
//! inspector kept of an upload. Every fact is computed from reads through [`Source`], so the two
//! inspectors run the same code and differ only in which bytes they can supply.

use crate::error::{Error, Result};
use crate::io::{Storage, StorageExt};

/// Bytes of a file, as far as they are available.
pub(super) trait Source {
    /// Length of the file; `u64::MAX` while a stream has not ended (facts computed then are
    /// provisional and only decide which bytes to keep).
    fn file_size(&self) -> u64;
    /// `len` bytes at `offset`, fewer where the file ends first (none past its end), or `None`
    /// when the source does not hold them.
    fn read(&mut self, offset: u64, len: usize) -> Result<Option<Vec<u8>>>;
    /// The file's last `len` bytes (all of it when shorter), or `None` while unknown.
    fn tail(&mut self, len: usize) -> Result<Option<Vec<u8>>>;
}

/// Reads a little-endian unsigned integer of `n` ≤ 8 bytes at `off`; `None` past the end.
pub(super) fn le(b: &[u8], off: usize, n: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(n)?)?;
    Some(
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
    )
}

/// Reads a big-endian unsigned integer of `n` ≤ 8 bytes at `off`; `None` past the end.
pub(super) fn be(b: &[u8], off: usize, n: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(n)?)?;
    Some(bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

/// A random-access storage: every byte is available.
pub(super) struct StorageSource<'a> {
    pub(super) storage: &'a dyn Storage,
    pub(super) size: u64,
}

impl Source for StorageSource<'_> {
    fn file_size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let avail = self.size.saturating_sub(offset);
        let n = (len as u64).min(avail) as usize;
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        self.storage
            .read_vec(offset, n)
            .map(Some)
            .map_err(|e| Error::io("reading for inspection", e))
    }

    fn tail(&mut self, len: usize) -> Result<Option<Vec<u8>>> {
        let n = (len as u64).min(self.size);
        self.read(self.size - n, n as usize)
    }
}
