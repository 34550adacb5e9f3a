//! The bits of one dirty bitmap in memory: bit `i` says whether guest bytes
//! `i × granularity .. (i + 1) × granularity` were written. Stored as QEMU serializes them: bit
//! `i` is bit `i % 8` of byte `i / 8` (here: bit `i % 64` of little-endian word `i / 64`).
//!
//! Invariant: no bit at or past `bits()` is set.

use crate::error::{Error, Result};

/// The dirty bits of one persistent bitmap (see the module docs).
///
/// ```
/// use qcow2kit::engine::DirtyBitmap;
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use qcow2kit::BlockDevice;
/// # use std::sync::Arc;
/// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
/// # img.add_bitmap("b", 65536, true)?;
/// # img.write_at(&[1; 512], 70_000)?;
/// let bits: DirtyBitmap = img.bitmap("b")?;
/// assert_eq!(bits.extents(), vec![(65536, 65536)]);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity_bits: u8,
    size: u64,
    words: Vec<u64>,
}

/// Words needed for a bitmap of `size` bytes at `granularity_bits`.
pub(crate) fn words_for(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(64)
}

impl DirtyBitmap {
    /// An all-clean bitmap covering `size` bytes at a granularity of `2^granularity_bits`
    /// bytes (9..=31). Refuses one needing more memory than `limit` bytes.
    pub(crate) fn new(size: u64, granularity_bits: u8, limit: u64) -> Result<Self> {
        if !(9..=31).contains(&granularity_bits) {
            return Err(Error::InvalidArgument(format!(
                "bitmap granularity of 2^{granularity_bits} bytes is outside 512 B..2 GiB"
            )));
        }
        let words = words_for(size, granularity_bits);
        if words.saturating_mul(8) > limit {
            return Err(Error::Unsupported(format!(
                "a dirty bitmap of {size} bytes at a granularity of {} bytes needs {} bytes of \
                 memory, more than the {limit} bytes allowed",
                1u64 << granularity_bits,
                words.saturating_mul(8)
            )));
        }
        Ok(DirtyBitmap {
            granularity_bits,
            size,
            words: vec![0; words as usize],
        })
    }

    /// Bytes of the disk each bit covers.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert_eq!(bits.granularity(), 65536);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of [`granularity`](Self::granularity).
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert_eq!(bits.granularity_bits(), 16);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// Bytes of the disk the bitmap covers.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert_eq!(bits.size(), 1 << 20);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert_eq!(bits.bits(), 16); // 1 MiB in 64 KiB granules
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Bytes of memory the bits take.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert!(bits.memory() >= 2);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn memory(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Whether bit `i` is set.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert!(bits.get(1) && !bits.get(0));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 != 0)
    }

    /// Number of dirty bits.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// assert_eq!(bits.count(), 1);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Sets bits `first..end` (bit indices, clipped to the bitmap).
    pub(crate) fn set_bits(&mut self, first: u64, end: u64) {
        let end = end.min(self.bits());
        let mut i = first;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w] |= mask;
            i += hi - lo;
        }
    }

    /// Marks guest bytes `offset..offset + len` dirty (every bit they touch).
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// let mut b = bits;
    /// b.mark(0, 1); // a byte dirties its whole granule
    /// assert_eq!(b.count(), 2);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let g = self.granularity_bits;
        let last = (offset.saturating_add(len - 1)).min(self.size - 1);
        self.set_bits(offset >> g, (last >> g) + 1);
    }

    /// Clears every bit.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// let mut b = bits;
    /// b.clear();
    /// assert_eq!(b.count(), 0);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Marks dirty every range `other` has dirty (the granularities may differ). Refused, in
    /// QEMU's words, when the two cover different sizes.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// let mut b = bits.clone();
    /// b.clear();
    /// b.merge(&bits)?;
    /// assert_eq!(b.count(), 1);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        if other.size != self.size {
            return Err(Error::InvalidArgument(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) \
                 and can't be merged",
                self.size, other.size
            )));
        }
        for (offset, len) in other.extents() {
            self.mark(offset, len);
        }
        Ok(())
    }

    /// The dirty ranges of the disk as (offset, length) byte ranges, in order, each as long as
    /// possible, clipped to the disk size: what an incremental backup copies.
    ///
    /// ```
    /// use qcow2kit::engine::DirtyBitmap;
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
    /// # img.add_bitmap("b", 65536, true)?;
    /// # img.write_at(&[1; 512], 70_000)?;
    /// let bits: DirtyBitmap = img.bitmap("b")?;
    /// // What an incremental backup copies: (offset, length) runs.
    /// assert_eq!(bits.extents(), vec![(65536, 65536)]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let g = self.granularity_bits;
        let mut out = Vec::new();
        let mut run: Option<u64> = None;
        for (wi, &w) in self.words.iter().enumerate() {
            if w == 0 && run.is_none() {
                continue;
            }
            if w == u64::MAX && run.is_some() {
                continue;
            }
            for b in 0..64 {
                let i = wi as u64 * 64 + b;
                match (w >> b & 1 != 0, run) {
                    (true, None) => run = Some(i),
                    (false, Some(start)) => {
                        out.push(self.range(start, i, g));
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(start) = run {
            out.push(self.range(start, self.bits(), g));
        }
        out
    }

    fn range(&self, first: u64, end: u64, g: u8) -> (u64, u64) {
        let start = first << g;
        let stop = (end << g).min(self.size);
        (start, stop - start)
    }

    /// Changes the size covered: new bits are clean, bits past the new end are dropped.
    pub(crate) fn resize(&mut self, size: u64) {
        self.size = size;
        let words = words_for(size, self.granularity_bits) as usize;
        self.words.resize(words, 0);
        let bits = self.bits();
        if bits % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
    }

    /// The little-endian bytes of words `first..first + n` (clipped), for storing.
    pub(crate) fn chunk_bytes(&self, first: usize, n: usize, out: &mut [u8]) -> bool {
        out.fill(0);
        let mut any = false;
        let end = (first + n).min(self.words.len());
        for (k, w) in self.words[first.min(end)..end].iter().enumerate() {
            for (j, byte) in out[k * 8..k * 8 + 8].iter_mut().enumerate() {
                *byte = (w >> (8 * j)) as u8;
            }
            any |= *w != 0;
        }
        any
    }

    /// Loads words starting at `first` from little-endian `bytes` (clipped to the bitmap; bits
    /// past its end are dropped).
    pub(crate) fn load_bytes(&mut self, first: usize, bytes: &[u8]) {
        for (k, c) in bytes.chunks_exact(8).enumerate() {
            let Some(w) = self.words.get_mut(first + k) else {
                break;
            };
            // Byte j holds bits 8j..8j + 7 of the word.
            *w = c.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b));
        }
        self.resize(self.size);
    }

    /// Sets every bit of words `first..first + n` (clipped).
    pub(crate) fn fill_words(&mut self, first: u64, n: u64) {
        self.set_bits(
            first.saturating_mul(64),
            first.saturating_add(n).saturating_mul(64),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_reports_extents() {
        let mut b = DirtyBitmap::new(1 << 20, 16, 1 << 20).expect("small bitmap");
        b.mark(65535, 2);
        b.mark(5 << 16, 1 << 16);
        assert_eq!(b.extents(), vec![(0, 2 << 16), (5 << 16, 1 << 16)]);
        assert_eq!(b.count(), 3);
        let mut c = DirtyBitmap::new((1 << 20) - 512, 9, 1 << 20).expect("small bitmap");
        c.mark((1 << 20) - 1024, 4096);
        assert_eq!(c.extents(), vec![((1 << 20) - 1024, 512)]);
        c.merge(&b).expect_err("sizes differ");
        let mut all = DirtyBitmap::new(200 * 512, 9, 1 << 20).expect("small bitmap");
        all.fill_words(0, 4);
        assert_eq!(all.count(), 200);
        assert_eq!(all.extents(), vec![(0, 200 * 512)]);
        all.resize(100 * 512);
        assert_eq!(all.count(), 100);
        all.resize(300 * 512);
        assert_eq!(all.extents(), vec![(0, 100 * 512)]);
    }

    #[test]
    fn refuses_more_memory_than_allowed() {
        assert!(DirtyBitmap::new(1 << 40, 9, 1 << 20).is_err());
        assert!(DirtyBitmap::new(1 << 20, 8, 1 << 20).is_err());
    }
}
