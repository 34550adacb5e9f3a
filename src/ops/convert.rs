//! Converting a device (any chain) into a raw image.
//!
//! Cost is proportional to allocated data: the source's extents are resolved through its whole
//! backing chain first, only ranges some layer holds data for are read, and the output is a
//! sparse file whose unallocated and all-zero ranges are never written. Ranges are split into
//! chunks that a pool of workers reads and writes in parallel; every chunk is one coalesced read
//! when the source's clusters are contiguous on the host.

use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::error::{Error, Result};
use crate::io::Storage;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Largest range one worker reads and writes at a time.
pub const CHUNK_BYTES: u64 = 256 << 10;

/// A progress callback: `(bytes done, bytes total)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Options of [`convert_to_raw`].
#[derive(Clone, Copy)]
pub struct RawConvertOptions<'a> {
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    /// Zero detection granularity in bytes (qemu-img `-S`): aligned blocks of this size that
    /// read as zeros are not written. 0 writes every allocated byte.
    pub zero_granularity: u64,
    /// The target already reads as zeros everywhere (freshly created): ranges of zeros need no
    /// writes at all. Otherwise they are zeroed explicitly (qemu-img `-n`).
    pub target_is_zero: bool,
    /// Called after each chunk.
    pub progress: Option<Progress<'a>>,
}

impl Default for RawConvertOptions<'_> {
    fn default() -> Self {
        RawConvertOptions {
            workers: 0,
            zero_granularity: 4096,
            target_is_zero: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for RawConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConvertOptions")
            .field("workers", &self.workers)
            .field("zero_granularity", &self.zero_granularity)
            .field("target_is_zero", &self.target_is_zero)
            .finish_non_exhaustive()
    }
}

/// One unit of work: a range that holds data (read and copy) or zeros (zero the target).
#[derive(Debug, Clone, Copy)]
struct Job {
    offset: u64,
    len: u64,
    data: bool,
}

/// The number of workers to use when the caller says 0.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Splits the device into jobs: data ranges in chunks of at most [`CHUNK_BYTES`] aligned to
/// chunk boundaries, and zero ranges (only when the target needs them written).
fn plan(src: &dyn BlockDevice, need_zero_jobs: bool) -> Result<(Vec<Job>, u64)> {
    let size = src.size();
    let mut jobs = Vec::new();
    let mut data_bytes = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let e = chain_status(src, pos, size - pos)?;
        let data = e.kind == ExtentKind::Data;
        if data || need_zero_jobs {
            let end = pos + e.len;
            let mut p = pos;
            while p < end {
                let chunk_end = ((p / CHUNK_BYTES) + 1) * CHUNK_BYTES;
                let n = chunk_end.min(end) - p;
                // Merge with the previous job when it ends here in the same chunk.
                match jobs.last_mut() {
                    Some(Job {
                        offset,
                        len,
                        data: d,
                    }) if *d == data
                        && *offset + *len == p
                        && *offset / CHUNK_BYTES == p / CHUNK_BYTES =>
                    {
                        *len += n
                    }
                    _ => jobs.push(Job {
                        offset: p,
                        len: n,
                        data,
                    }),
                }
                p += n;
            }
        }
        if data {
            data_bytes += e.len;
        }
        pos += e.len;
    }
    Ok((jobs, data_bytes))
}

/// Whether every byte of `b` is zero.
#[inline]
pub fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.split_at(b.len() - b.len() % 64);
    chunks
        .chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Writes `buf` (guest data at `offset`) to `dst`, skipping aligned all-zero blocks of
/// `granularity` bytes (zeroing them instead when the target is not known to be zero).
fn write_sparse(
    dst: &dyn Storage,
    buf: &[u8],
    offset: u64,
    granularity: u64,
    target_is_zero: bool,
) -> std::io::Result<()> {
    if granularity == 0 {
        return dst.write_at(buf, offset);
    }
    let end = offset + buf.len() as u64;
    let mut p = offset;
    // Runs of equal zero-ness are written (or skipped) as one request.
    let mut run_start = offset;
    let mut run_zero: Option<bool> = None;
    let flush = |s: u64, e: u64, zero: bool| -> std::io::Result<()> {
        if s == e {
            return Ok(());
        }
        if !zero {
            dst.write_at(&buf[(s - offset) as usize..(e - offset) as usize], s)
        } else if !target_is_zero {
            dst.punch_hole(s, e - s)
        } else {
            Ok(())
        }
    };
    while p < end {
        let block_end = ((p / granularity) + 1).saturating_mul(granularity).min(end);
        let z = is_zero(&buf[(p - offset) as usize..(block_end - offset) as usize]);
        match run_zero {
            Some(rz) if rz == z => {}
            Some(rz) => {
                flush(run_start, p, rz)?;
                run_start = p;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
        p = block_end;
    }
    if let Some(rz) = run_zero {
        flush(run_start, end, rz)?;
    }
    Ok(())
}

/// Copies the guest content of `src` into `dst` as a raw image of `src.size()` bytes.
pub fn convert_to_raw(
    src: &dyn BlockDevice,
    dst: &dyn Storage,
    opts: &RawConvertOptions<'_>,
) -> Result<()> {
    let size = src.size();
    if opts.target_is_zero {
        dst.set_len(size)
            .map_err(|e| Error::io("sizing target", e))?;
    } else if dst.len().map_err(|e| Error::io("reading target size", e))? < size {
        return Err(Error::InvalidArgument(
            "target is smaller than the source".into(),
        ));
    }
    let (jobs, _data) = plan(src, !opts.target_is_zero)?;
    let total: u64 = jobs.iter().map(|j| j.len).sum();
    let workers = match opts.workers {
        0 => default_workers(),
        n => n,
    }
    .clamp(1, jobs.len().max(1));

    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let work = || {
        let mut buf = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { break };
            let r = (|| -> Result<()> {
                if job.data {
                    buf.resize(job.len as usize, 0);
                    src.read_at(&mut buf, job.offset)?;
                    write_sparse(
                        dst,
                        &buf,
                        job.offset,
                        opts.zero_granularity,
                        opts.target_is_zero,
                    )
                    .map_err(|e| Error::io("writing target", e))
                } else {
                    dst.punch_hole(job.offset, job.len)
                        .map_err(|e| Error::io("zeroing target", e))
                }
            })();
            if let Err(e) = r {
                stop.store(true, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                break;
            }
            let d = done.fetch_add(job.len, Ordering::Relaxed) + job.len;
            if let Some(p) = opts.progress {
                p(d, total);
            }
        }
    };
    if workers == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(work);
            }
        });
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RawImage;
    use crate::io::MemoryStorage;
    use std::sync::Arc;

    fn pattern(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i % 253) as u8 | 1).collect();
        v[4096..3 * 4096].fill(0);
        v[(5 << 20)..(5 << 20) + 100_000].fill(0);
        v
    }

    #[test]
    fn raw_to_raw_round_trip_and_sparse() {
        let data = pattern(7 << 20);
        let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(data.clone())), false).unwrap();
        for workers in [1, 3] {
            let dst = MemoryStorage::new();
            let opts = RawConvertOptions {
                workers,
                ..Default::default()
            };
            convert_to_raw(&src, &dst, &opts).unwrap();
            assert_eq!(dst.to_bytes(), data);
        }
        // A target full of garbage is zeroed where the source is zero.
        let dst = MemoryStorage::from_bytes(vec![0xee; 7 << 20]);
        let opts = RawConvertOptions {
            target_is_zero: false,
            ..Default::default()
        };
        convert_to_raw(&src, &dst, &opts).unwrap();
        assert_eq!(dst.to_bytes(), data);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000]));
        let mut b = vec![0u8; 1000];
        b[999] = 1;
        assert!(!is_zero(&b));
        b[999] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
