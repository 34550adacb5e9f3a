//! The copy engines behind [`convert`](super::convert): into raw storage, into a new qcow2 file,
//! into an open qcow2 image.
//!
//! Cost is proportional to allocated data: the source's extents are resolved through its whole
//! backing chain first (or, when the target keeps a backing file, through the source's top layer
//! only), only ranges some layer holds data for are read, and ranges of zeros are never written
//! to a fresh target. Ranges are split into chunks that a pool of workers reads and writes in
//! parallel; every chunk is one coalesced read when the source's clusters are contiguous on the
//! host. A qcow2 target is built in a temporary file beside the target, flushed, and renamed
//! into place, so a failed convert never leaves a half image under the target's name.

use super::{ConvertOptions, Progress};
use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::engine::Qcow2Image;
use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage};
use crate::ops::create::{create_qcow2_on, CreateOptions};
use crate::ops::pool::run_pool;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest range one worker reads and writes at a time.
pub(crate) const CHUNK_BYTES: u64 = 256 << 10;

/// One unit of work: a range that holds data (read and copy) or zeros (zero the target).
#[derive(Debug, Clone, Copy)]
struct Job {
    offset: u64,
    len: u64,
    data: bool,
}

/// The number of workers to use when the caller says 0.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Which extents of the source are copied.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The whole chain, flattened; zero ranges become jobs only when the target needs them.
    Flatten { zero_jobs: bool },
    /// The source's top layer only (the target keeps a backing file with the rest): its data
    /// is copied, its zero ranges zeroed, unallocated ranges left to the backing file.
    TopLayer,
}

/// Splits the device into jobs: data ranges in chunks of at most `chunk` bytes aligned to chunk
/// boundaries, and zero ranges; every job boundary is rounded out to `align` (the target's
/// cluster size) so that no two jobs share a target cluster.
fn plan(src: &dyn BlockDevice, scope: Scope, align: u64, chunk: u64) -> Result<Vec<Job>> {
    let size = src.size();
    let mut jobs: Vec<Job> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let e = match scope {
            Scope::TopLayer => src.block_status(pos, size - pos)?,
            Scope::Flatten { .. } => chain_status(src, pos, size - pos)?,
        };
        let data = e.kind == ExtentKind::Data;
        let wanted = match scope {
            Scope::Flatten { zero_jobs } => data || zero_jobs,
            Scope::TopLayer => e.kind != ExtentKind::Unallocated,
        };
        if wanted {
            let start = pos - pos % align;
            let end = (pos + e.len).next_multiple_of(align).min(size);
            let mut p = start;
            if let Some(last) = jobs.last_mut() {
                // A data job absorbs the shared cluster; a zero job yields it.
                if last.offset + last.len > p {
                    if last.data || !data {
                        p = last.offset + last.len;
                    } else {
                        last.len = p - last.offset;
                    }
                }
            }
            while p < end {
                let chunk_end = ((p / chunk) + 1) * chunk;
                let n = chunk_end.min(end) - p;
                match jobs.last_mut() {
                    Some(Job {
                        offset,
                        len,
                        data: d,
                    }) if *d == data && *offset + *len == p && *offset / chunk == p / chunk => {
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
        pos += e.len;
    }
    jobs.retain(|j| j.len > 0);
    Ok(jobs)
}

/// Runs `handle` over `jobs` on a pool of `workers` threads, stopping at the first error. An
/// error names its job's request ([`Error::Request`]): a write unless the handler made it a
/// read.
fn run_jobs(
    jobs: &[Job],
    workers: usize,
    progress: Option<Progress<'_>>,
    handle: impl Fn(&mut Vec<u8>, &Job) -> Result<()> + Sync,
) -> Result<()> {
    let total: u64 = jobs.iter().map(|j| j.len).sum();
    run_pool(
        jobs.len(),
        workers,
        total,
        |i| jobs[i].len,
        progress,
        |buf, i| handle(buf, &jobs[i]).map_err(|e| e.in_request(true, jobs[i].offset)),
    )
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
pub(crate) fn convert_to_raw(
    src: &dyn BlockDevice,
    dst: &dyn Storage,
    opts: &ConvertOptions<'_>,
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
    let thick = opts.zero_granularity == 0;
    let jobs = plan(
        src,
        Scope::Flatten {
            zero_jobs: !opts.target_is_zero || thick,
        },
        1,
        CHUNK_BYTES,
    )?;
    run_jobs(&jobs, opts.workers, opts.progress, |buf, job| {
        if thick && !job.data {
            buf.clear();
            buf.resize(job.len as usize, 0);
            dst.write_at(buf, job.offset)
                .map_err(|e| Error::io("writing target", e))
        } else if job.data {
            buf.resize(job.len as usize, 0);
            src.read_at(buf, job.offset)
                .map_err(|e| e.in_request(false, job.offset))?;
            write_sparse(
                dst,
                buf,
                job.offset,
                opts.zero_granularity,
                opts.target_is_zero,
            )
            .map_err(|e| Error::io("writing target", e))
        } else {
            dst.punch_hole(job.offset, job.len)
                .map_err(|e| Error::io("zeroing target", e))
        }
    })
}

/// A temporary file beside the target, removed unless kept.
struct TempTarget {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempTarget {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The temporary file a convert by process `pid` writes beside a target named `name`:
/// `.NAME.qcow2kit-PID.tmp`.
fn temp_name(name: &OsStr, pid: u32) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".qcow2kit-{pid}.tmp"));
    t
}

/// The process id in `file` if it is a temporary file of a convert to `name` (see
/// [`temp_name`]).
fn temp_owner(file: &OsStr, name: &OsStr) -> Option<u32> {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".qcow2kit-");
    let rest = file.as_bytes().strip_prefix(prefix.as_bytes())?;
    let digits = rest.strip_suffix(b".tmp")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Removes the temporary files that earlier converts to `name` in `dir` left when they were
/// killed, best effort. A file goes only if all of these hold: it is named by our scheme for
/// this target, it is a regular file of user `uid`, the process its name gives is gone (no
/// `/proc/PID`; without `/proc` nothing is removed), and no one holds a lock on it — every
/// convert holds an exclusive `flock` on its temporary file while writing it, so a live writer
/// whose process id is not visible here (another PID namespace) keeps its file too. The lock
/// is taken on the file itself and the name checked to still point to it before the removal.
fn remove_stale_temps(dir: &Path, name: &OsStr, uid: u32) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = temp_owner(&file, name) else {
            continue;
        };
        if pid == own || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let _ = remove_if_unlocked(&path, uid);
    }
}

/// Removes the regular file of user `uid` at `path` if no one holds a lock on it (see
/// [`remove_stale_temps`]).
fn remove_if_unlocked(path: &Path, uid: u32) -> std::io::Result<()> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let before = std::fs::symlink_metadata(path)?;
    if !before.file_type().is_file() || before.uid() != uid {
        return Ok(());
    }
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
        return Ok(());
    }
    let locked = rustix::fs::fstat(&fd)?;
    let now = std::fs::symlink_metadata(path)?;
    if now.dev() == locked.st_dev && now.ino() == locked.st_ino {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Converts `src` into a new qcow2 image at `target` (see [`into_new_file`]).
pub(crate) fn convert_to_qcow2(
    src: &dyn BlockDevice,
    target: &Path,
    create: &CreateOptions,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    into_new_file(target, |storage| {
        let data: Option<Arc<dyn Storage>> = match &create.data_file {
            Some(d) => {
                let p = crate::chain::resolve_relative(target, d.as_bytes())?;
                Some(Arc::new(
                    FileStorage::create(&p).map_err(|e| Error::storage("creating data file", e))?,
                ))
            }
            None => None,
        };
        let size = src.size().next_multiple_of(512);
        let img = create_qcow2_on(storage, data, size, create)?;
        convert_into(src, &img, true, create, opts)?;
        img.close()
    })
}

/// Writes a new file at `target` with `write`, replacing any file there only when `write`
/// succeeded and the file is flushed. The file is written as a hidden temporary file beside the
/// target (`.NAME.qcow2kit-PID.tmp`), under an exclusive `flock`, then renamed into place; on
/// failure it is removed. Temporary files that killed converts to the same target left behind
/// are removed on the way: those of the same user whose process is gone and that no one holds
/// locked.
pub(crate) fn into_new_file(
    target: &Path,
    write: impl FnOnce(Arc<dyn Storage>) -> Result<()>,
) -> Result<()> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::InvalidArgument("target has no file name".into()))?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = TempTarget {
        path: dir.join(temp_name(name, std::process::id())),
        keep: false,
    };
    let file = FileStorage::create(&tmp.path)
        .map_err(|e| Error::storage("creating temporary target", e))?;
    // Held until the file is renamed or removed: tells later converts this one is alive.
    rustix::fs::flock(file.file(), rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io("locking temporary target", e.into()))?;
    if let Ok(ours) = file.file().metadata() {
        remove_stale_temps(&dir, name, ours.uid());
    }
    let storage: Arc<dyn Storage> = Arc::new(file);
    write(storage.clone())?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing target", e))?;
    std::fs::rename(&tmp.path, target).map_err(|e| Error::io("renaming target into place", e))?;
    let mut tmp = tmp;
    tmp.keep = true;
    // The rename itself is durable once the directory is.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Copies `src` into the open qcow2 image `dst` (qemu-img `convert -n` when `dst_is_zero` is
/// false: zero ranges are then written as zeros); a backing file in `create` (qemu-img `-B`)
/// makes it copy the source's top layer only.
pub(crate) fn convert_into(
    src: &dyn BlockDevice,
    dst: &Qcow2Image,
    dst_is_zero: bool,
    create: &CreateOptions,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    if dst.size() < src.size() {
        return Err(Error::InvalidArgument(
            "target is smaller than the source".into(),
        ));
    }
    let cs = dst.cluster_size();
    let keeps_backing = create.backing_file.is_some() || dst.backing_file_name().is_some();
    let top_layer = keeps_backing && create.backing_file.is_some();
    // A thick copy writes zeros as data; with a backing file kept, what the top layer does not
    // allocate must stay unallocated.
    let thick = opts.zero_granularity == 0 && !top_layer;
    let scope = if top_layer {
        Scope::TopLayer
    } else {
        Scope::Flatten {
            zero_jobs: !dst_is_zero || thick,
        }
    };
    // Zeros inside data may stay unallocated only when nothing shows through.
    let zeros_free = dst_is_zero && !keeps_backing;
    let gran = opts.zero_granularity.max(cs).next_multiple_of(cs);
    let chunk = CHUNK_BYTES.max(gran).next_multiple_of(gran);
    let jobs = plan(src, scope, cs, chunk)?;
    let size = src.size();
    run_jobs(&jobs, opts.workers, opts.progress, |buf, job| {
        if !job.data && !thick {
            return dst.write_zeroes(job.offset, job.len);
        }
        buf.clear();
        buf.resize(job.len as usize, 0);
        if job.data {
            src.read_at(buf, job.offset)
                .map_err(|e| e.in_request(false, job.offset))?;
        }
        let end = job.offset + job.len;
        let mut p = job.offset;
        let mut run: Option<u64> = None;
        let write_run = |s: u64, e: u64| -> Result<()> {
            let b = &buf[(s - job.offset) as usize..(e - job.offset) as usize];
            if opts.compress {
                let mut c = s;
                while c < e {
                    let n = cs.min(e - c);
                    let piece = &b[(c - s) as usize..(c - s + n) as usize];
                    if n == cs || c + n == size {
                        dst.write_compressed(c, piece)?;
                    } else {
                        dst.write_at(piece, c)?;
                    }
                    c += n;
                }
                Ok(())
            } else {
                dst.write_at(b, s)
            }
        };
        if thick {
            return write_run(job.offset, end);
        }
        while p < end {
            let block_end = ((p / gran) + 1).saturating_mul(gran).min(end);
            let zero = is_zero(&buf[(p - job.offset) as usize..(block_end - job.offset) as usize]);
            if zero {
                if let Some(s) = run.take() {
                    write_run(s, p)?;
                }
                if !zeros_free {
                    dst.write_zeroes(p, block_end - p)?;
                }
            } else if run.is_none() {
                run = Some(p);
            }
            p = block_end;
        }
        if let Some(s) = run {
            write_run(s, end)?;
        }
        Ok(())
    })
}

/// The persistent bitmaps of `src` that `convert --bitmaps` copies, in directory order, and
/// the names of the inconsistent ones skipped (`skip_broken`; in QEMU's order). Without
/// `skip_broken` an inconsistent bitmap refuses the copy, before anything is written.
pub fn bitmaps_to_copy(
    src: &Qcow2Image,
    skip_broken: bool,
) -> Result<(Vec<crate::format::bitmap::BitmapEntry>, Vec<String>)> {
    let all = src.bitmaps();
    let mut skipped = Vec::new();
    // QEMU meets the bitmaps in the reverse of their directory order.
    for b in all.iter().rev() {
        if b.flags & crate::format::bitmap::FLAG_IN_USE != 0 {
            if !skip_broken {
                return Err(Error::InvalidArgument(format!(
                    "Cannot copy inconsistent bitmap '{}'",
                    b.name
                )));
            }
            skipped.push(b.name.clone());
        }
    }
    let keep = all
        .into_iter()
        .filter(|b| b.flags & crate::format::bitmap::FLAG_IN_USE == 0)
        .collect();
    Ok((keep, skipped))
}

/// Copies the bitmaps `which` of `src` (see [`bitmaps_to_copy`]) into the writable qcow2 image
/// `dst`: same name, granularity, enabled state and bits. They are stored when `dst` closes
/// (in `src`'s order).
pub fn copy_bitmaps(
    src: &Qcow2Image,
    dst: &Qcow2Image,
    which: &[crate::format::bitmap::BitmapEntry],
) -> Result<()> {
    if dst.header().version < 3 {
        return Err(Error::InvalidArgument(
            "Format driver 'qcow2' does not support bitmaps".into(),
        ));
    }
    // In QEMU's order (the reverse of the directory's), stopping at the first failure: the
    // bitmaps added before it are kept.
    for b in which.iter().rev() {
        let bits = src.bitmap(&b.name)?;
        let enabled = b.flags & crate::format::bitmap::FLAG_AUTO != 0;
        dst.add_bitmap(&b.name, bits.granularity(), enabled)
            .and_then(|()| dst.merge_into_bitmap(&b.name, &bits))
            .map_err(|e| {
                let m = match e {
                    Error::InvalidArgument(m) | Error::Unsupported(m) => m,
                    other => other.to_string(),
                };
                Error::InvalidArgument(format!("Failed to create bitmap {}: {m}", b.name))
            })?;
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
            let opts = ConvertOptions {
                workers,
                ..Default::default()
            };
            convert_to_raw(&src, &dst, &opts).unwrap();
            assert_eq!(dst.to_bytes(), data);
        }
        // A target full of garbage is zeroed where the source is zero.
        let dst = MemoryStorage::from_bytes(vec![0xee; 7 << 20]);
        let opts = ConvertOptions {
            target_is_zero: false,
            ..Default::default()
        };
        convert_to_raw(&src, &dst, &opts).unwrap();
        assert_eq!(dst.to_bytes(), data);
    }

    #[test]
    fn temporary_names_round_trip_and_nothing_else_matches() {
        let name = OsStr::new("disk.qcow2");
        assert_eq!(temp_owner(&temp_name(name, 4242), name), Some(4242));
        for other in [
            ".disk.qcow2.qcow2kit-.tmp",
            ".disk.qcow2.qcow2kit-12a.tmp",
            ".disk.qcow2.qcow2kit-12.tmp.x",
            "disk.qcow2.qcow2kit-12.tmp",
            ".disk.qcow2x.qcow2kit-12.tmp",
            ".disk.qcow2.qcow2kit-99999999999.tmp",
        ] {
            assert_eq!(temp_owner(OsStr::new(other), name), None, "{other}");
        }
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
