//! A pool of worker threads over numbered units of work, shared by the whole-image operations
//! (convert's jobs, rebase's and commit's regions).

use crate::error::{Error, Result};
use crate::ops::convert::{default_workers, Progress};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `handle(scratch, i)` for every `i` in `0..count` on `workers` threads (0: one per
/// core, at most 8), each with its own `scratch`, stopping at the first error. Units are taken
/// in ascending order; of the errors of the units under way when it stops, the lowest unit's
/// is returned (so that the same failure is reported on every run). After each unit, `progress`
/// gets the bytes done so far (the sum of `len_of` of the finished units) and `total`; when it
/// returns `false` the pool stops as on an error, with [`Error::Cancelled`].
pub(crate) fn run_pool<S: Default>(
    count: usize,
    workers: usize,
    total: u64,
    len_of: impl Fn(usize) -> u64 + Sync,
    progress: Option<Progress<'_>>,
    handle: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<()> {
    let workers = match workers {
        0 => default_workers(),
        n => n,
    }
    .clamp(1, count.max(1));
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<(usize, Error)>> = Mutex::new(None);
    let work = || {
        let mut scratch = S::default();
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            let r = handle(&mut scratch, i).and_then(|()| {
                let n = len_of(i);
                let d = done.fetch_add(n, Ordering::Relaxed) + n;
                match progress {
                    Some(p) if !p(d, total) => Err(Error::Cancelled),
                    _ => Ok(()),
                }
            });
            if let Err(e) = r {
                stop.store(true, Ordering::Relaxed);
                let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                    *slot = Some((i, e));
                }
                break;
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
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// [`run_pool`] over the regions `[i * region, min((i + 1) * region, size))` of a device of
/// `size` bytes: `handle(scratch, start, end)`.
pub(crate) fn for_each_region<S: Default>(
    size: u64,
    region: u64,
    workers: usize,
    progress: Option<Progress<'_>>,
    handle: impl Fn(&mut S, u64, u64) -> Result<()> + Sync,
) -> Result<()> {
    let count = usize::try_from(size.div_ceil(region))
        .map_err(|_| Error::InvalidArgument("device too large".into()))?;
    let bounds = |i: usize| {
        let start = i as u64 * region;
        (start, (start + region).min(size))
    };
    run_pool(
        count,
        workers,
        size,
        |i| {
            let (s, e) = bounds(i);
            e - s
        },
        progress,
        |scratch, i| {
            let (s, e) = bounds(i);
            handle(scratch, s, e)
        },
    )
}
