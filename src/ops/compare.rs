//! Comparing the guest contents of two devices, with qemu-img compare's semantics.
//!
//! Both devices are walked together by allocation status through their backing chains (QEMU's
//! `bdrv_block_status_above`): ranges that both read as zeros are skipped without reading,
//! ranges allocated in both are read (in large chunks, the two devices in parallel) and compared,
//! and a range allocated in only one of them must read as zeros there. When the sizes differ, the
//! common part is compared first and the extra part of the larger device must read as zeros.
//!
//! Offsets of mismatches are reported at 512-byte sector granularity, counted from the start of
//! the run being compared, exactly as qemu-img reports them. In strict mode a size difference or
//! any difference in the allocation status of the two devices (QEMU's status bits: data, zero,
//! allocated, host offset known, compressed, end of image) is a mismatch too.
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::ops::compare::{compare, CompareResult};
//! use qcow2kit::RawImage;
//! use std::sync::Arc;
//! let a = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 4096])), false)?;
//! let b = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 4096])), false)?;
//! assert_eq!(compare(&a, &b, false)?, CompareResult::Identical);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::map::{flags, layer_status, LayerStatus};
use crate::device::BlockDevice;
use crate::error::Error;

/// Bytes read from each device at once (qemu-img's `IO_BUF_SIZE`, so that progress advances in
/// the same steps).
const IO_CHUNK: u64 = 2 << 20;
/// Mismatches are located to this granularity.
const SECTOR: usize = 512;

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// The guest contents are the same (non-strict: any size difference is an all-zero tail).
    Identical,
    /// The contents differ at this offset (the start of the first differing 512-byte sector).
    ContentMismatch {
        /// Guest offset of the first difference.
        offset: u64,
    },
    /// Strict mode: the devices have different sizes.
    SizeMismatch,
    /// Strict mode: the allocation status differs at this offset.
    StatusMismatch {
        /// Guest offset where the status first differs.
        offset: u64,
    },
}

/// What a comparison was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareStage {
    /// Querying the allocation status (qemu-img exits with 3).
    BlockStatus,
    /// Reading data (qemu-img exits with 4).
    Read,
    /// Reporting progress: the caller's callback stopped the comparison
    /// ([`Error::Cancelled`]).
    Progress,
}

/// A comparison that could not be completed.
#[derive(Debug, thiserror::Error)]
#[error("{} of image {image} failed at offset {offset}: {source}", match .stage {
    CompareStage::BlockStatus => "block status query",
    CompareStage::Read => "read",
    CompareStage::Progress => "progress report",
})]
pub struct CompareError {
    /// Which device failed: 1 (the first argument) or 2; 0 when neither did (a cancel).
    pub image: u8,
    /// What was being done.
    pub stage: CompareStage,
    /// Guest offset of the failed request.
    pub offset: u64,
    /// The underlying error.
    #[source]
    pub source: Error,
}

impl From<CompareError> for Error {
    fn from(e: CompareError) -> Error {
        e.source
    }
}

/// Compares the guest contents of `a` and `b` (see the module documentation).
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::compare::{compare, CompareResult};
/// use qcow2kit::RawImage;
/// use std::sync::Arc;
/// let mut other = vec![1; 4096];
/// other[1000] = 2;
/// let a = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 4096])), false)?;
/// let b = RawImage::open(Arc::new(MemoryStorage::from_bytes(other)), false)?;
/// // As qemu-img, the first differing sector is named.
/// assert_eq!(compare(&a, &b, false)?, CompareResult::ContentMismatch { offset: 512 });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn compare(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    strict: bool,
) -> Result<CompareResult, CompareError> {
    compare_with_progress(a, b, strict, &mut |_, _| true)
}

/// [`compare`], calling `progress(done, total)` as it advances (`total` is the larger size);
/// `progress` returning `false` stops the comparison with [`Error::Cancelled`].
pub fn compare_with_progress(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    strict: bool,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<CompareResult, CompareError> {
    let size1 = a.size();
    let size2 = b.size();
    let common = size1.min(size2);
    let total = size1.max(size2);
    let mut report = |done: u64| {
        if progress(done, total) {
            Ok(())
        } else {
            Err(CompareError {
                image: 0,
                stage: CompareStage::Progress,
                offset: done,
                source: Error::Cancelled,
            })
        }
    };
    report(0)?;
    if strict && size1 != size2 {
        return Ok(CompareResult::SizeMismatch);
    }
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let mut offset = 0u64;
    let mut cur1 = Cursor::new(a);
    let mut cur2 = Cursor::new(b);
    while offset < common {
        let s1 = cur1.status(offset).map_err(status_err(1, offset))?;
        let s2 = cur2.status(offset).map_err(status_err(2, offset))?;
        let mut chunk = s1.len.min(s2.len);
        if strict && s1.flags != s2.flags {
            return Ok(CompareResult::StatusMismatch { offset });
        }
        let alloc1 = s1.flags & flags::ALLOCATED != 0;
        let alloc2 = s2.flags & flags::ALLOCATED != 0;
        if s1.flags & s2.flags & flags::ZERO != 0 {
            // Both read as zeros: nothing to read.
        } else if alloc1 == alloc2 {
            if alloc1 {
                chunk = chunk.min(IO_CHUNK);
                let n = chunk as usize;
                resize(&mut buf1, n);
                resize(&mut buf2, n);
                read_both(a, b, &mut buf1[..n], &mut buf2[..n], offset)?;
                if let Some(i) = first_difference(&buf1[..n], &buf2[..n]) {
                    return Ok(CompareResult::ContentMismatch {
                        offset: offset + i as u64,
                    });
                }
            }
        } else {
            chunk = chunk.min(IO_CHUNK);
            let (dev, image) = if alloc1 { (a, 1) } else { (b, 2) };
            if let Some(at) = check_zero(dev, image, offset, chunk, &mut buf1)? {
                return Ok(CompareResult::ContentMismatch { offset: at });
            }
        }
        offset += chunk;
        report(offset)?;
    }

    if size1 != size2 {
        let (over, image, mut cur) = if size1 > size2 {
            (a, 1, cur1)
        } else {
            (b, 2, cur2)
        };
        while offset < total {
            let st = cur.status(offset).map_err(status_err(image, offset))?;
            let mut chunk = st.len;
            if st.flags & flags::ALLOCATED != 0 && st.flags & flags::ZERO == 0 {
                chunk = chunk.min(IO_CHUNK);
                if let Some(at) = check_zero(over, image, offset, chunk, &mut buf1)? {
                    return Ok(CompareResult::ContentMismatch { offset: at });
                }
            }
            offset += chunk;
            report(offset)?;
        }
    }
    Ok(CompareResult::Identical)
}

/// Walks one device by status runs. qemu-img asks for the status again after every chunk it
/// reads; the answer from inside a run is the rest of that run, so the run is remembered
/// instead of walking its mapping again (which would make long runs cost quadratic time).
struct Cursor<'a> {
    dev: &'a dyn BlockDevice,
    run: Option<(u64, u64, LayerStatus)>,
}

impl<'a> Cursor<'a> {
    fn new(dev: &'a dyn BlockDevice) -> Self {
        Cursor { dev, run: None }
    }

    /// The status of the run from `offset` to the end of its run (at most the device's end).
    fn status(&mut self, offset: u64) -> Result<LayerStatus, Error> {
        if let Some((start, end, st)) = self.run {
            if start <= offset && offset < end {
                return Ok(LayerStatus {
                    len: end - offset,
                    ..st
                });
            }
        }
        let size = self.dev.size();
        let st = status_above(self.dev, offset, size.saturating_sub(offset))?;
        self.run = Some((offset, offset + st.len, st));
        Ok(st)
    }
}

fn status_err(image: u8, offset: u64) -> impl FnOnce(Error) -> CompareError {
    move |source| CompareError {
        image,
        stage: CompareStage::BlockStatus,
        offset,
        source,
    }
}

fn read_err(image: u8, offset: u64) -> impl FnOnce(Error) -> CompareError {
    move |source| CompareError {
        image,
        stage: CompareStage::Read,
        offset,
        source,
    }
}

/// The status of the run at `offset` resolved through the chain as QEMU's
/// `bdrv_block_status_above` resolves it (down to the bottom of the chain).
fn status_above(dev: &dyn BlockDevice, offset: u64, bytes: u64) -> Result<LayerStatus, Error> {
    let mut st = layer_status(dev, offset, bytes)?;
    if st.len == 0 {
        return Err(Error::OutOfRange {
            offset,
            len: bytes,
            size: dev.size(),
        });
    }
    if st.flags & flags::ALLOCATED != 0 {
        return Ok(st);
    }
    let eof = (st.flags & flags::EOF != 0).then_some(offset + st.len);
    let mut bytes = st.len;
    let mut layer = dev;
    while let Some(p) = layer.backing() {
        let s = layer_status(p.as_ref(), offset, bytes)?;
        if s.len == 0 {
            // Past the end of a shorter backing layer: zeros, as if allocated here.
            st = LayerStatus {
                flags: flags::ZERO | flags::ALLOCATED,
                len: bytes,
                host_offset: None,
            };
            break;
        }
        if s.flags & flags::ALLOCATED != 0 {
            st = LayerStatus {
                flags: s.flags & !flags::EOF,
                ..s
            };
            break;
        }
        st = s;
        bytes = s.len;
        layer = p.as_ref();
    }
    if eof == Some(offset + st.len) {
        st.flags |= flags::EOF;
    }
    Ok(st)
}

fn resize(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// Reads the same range of both devices, in parallel.
fn read_both(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    buf1: &mut [u8],
    buf2: &mut [u8],
    offset: u64,
) -> Result<(), CompareError> {
    let (r1, r2) = std::thread::scope(|s| {
        let h = s.spawn(|| a.read_at(buf1, offset));
        let r2 = b.read_at(buf2, offset);
        let r1 = h
            .join()
            .unwrap_or_else(|_| Err(Error::InvalidArgument("reading thread panicked".into())));
        (r1, r2)
    });
    r1.map_err(read_err(1, offset))?;
    r2.map_err(read_err(2, offset))?;
    Ok(())
}

/// Reads `len` bytes of `dev` at `offset`; returns the offset of the first sector that is not
/// all zeros.
fn check_zero(
    dev: &dyn BlockDevice,
    image: u8,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<Option<u64>, CompareError> {
    let n = len as usize;
    resize(buf, n);
    dev.read_at(&mut buf[..n], offset)
        .map_err(read_err(image, offset))?;
    Ok(first_nonzero(&buf[..n]).map(|i| offset + i as u64))
}

const ZEROS: [u8; SECTOR] = [0; SECTOR];

/// Index of the first 512-byte sector of `buf` holding a non-zero byte.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR)
        .position(|c| c != &ZEROS[..c.len()])
        .map(|i| i * SECTOR)
}

/// Index of the first 512-byte sector where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RawImage;
    use crate::io::MemoryStorage;
    use std::sync::Arc;

    fn raw(bytes: Vec<u8>) -> RawImage {
        RawImage::open(Arc::new(MemoryStorage::from_bytes(bytes)), false).unwrap()
    }

    #[test]
    fn identical_and_different() {
        let a = raw(vec![7; 10_000]);
        let mut v = vec![7; 10_000];
        assert_eq!(
            compare(&a, &raw(v.clone()), false).unwrap(),
            CompareResult::Identical
        );
        v[1500] = 0;
        assert_eq!(
            compare(&a, &raw(v), false).unwrap(),
            CompareResult::ContentMismatch { offset: 1024 }
        );
    }

    #[test]
    fn size_differences() {
        let a = raw(vec![1; 4096]);
        let mut v = vec![1; 4096];
        v.extend_from_slice(&[0; 4096]);
        assert_eq!(
            compare(&a, &raw(v.clone()), false).unwrap(),
            CompareResult::Identical
        );
        assert_eq!(
            compare(&a, &raw(v.clone()), true).unwrap(),
            CompareResult::SizeMismatch
        );
        v[5000] = 1;
        assert_eq!(
            compare(&raw(v), &a, false).unwrap(),
            CompareResult::ContentMismatch { offset: 4608 }
        );
    }

    #[test]
    fn sector_search() {
        let z = vec![0u8; 2048];
        assert_eq!(first_nonzero(&z), None);
        let mut n = z.clone();
        n[2047] = 1;
        assert_eq!(first_nonzero(&n), Some(1536));
        assert_eq!(first_difference(&z, &n), Some(1536));
        assert_eq!(first_difference(&z, &z), None);
    }
}
