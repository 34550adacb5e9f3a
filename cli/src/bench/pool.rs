//! The requests of a bench run, on a pool of worker threads.
//!
//! Each worker owns one buffer and runs one request at a time, so the number of workers is the
//! number of requests really in flight. Request `i` goes to a fixed offset ([`Job::offset_of`]),
//! whichever worker takes it. Flushes (`--flush-interval F`) come where qemu-img bench issues
//! them: when the number of requests not yet started is a multiple of F. Draining (the
//! default), no request starts until every earlier one has finished and the flush is done
//! ([`run_drained`]); with `--no-drain` the worker that finished the request before the mark
//! flushes while the others carry on ([`run_free`]).
//!
//! Invariants: request indices are handed out exactly once, in ascending order; the first
//! failure stops every worker before its next request and is the run's outcome.

use qcow2kit::BlockDevice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

/// A run's requests, on one device.
pub(super) struct Job<'a> {
    pub(super) device: &'a dyn BlockDevice,
    /// The device's size (requests wrap at it).
    pub(super) size: u64,
    pub(super) count: u64,
    pub(super) bufsize: usize,
    pub(super) step: u64,
    /// Where the first request goes.
    pub(super) offset: u64,
    pub(super) pattern: u8,
    pub(super) write: bool,
    /// Flush after every write.
    pub(super) writethrough: bool,
    /// 0: no flushes.
    pub(super) flush_interval: u64,
    pub(super) drain: bool,
}

/// How a run ended.
pub(super) enum Outcome {
    Done,
    /// qemu-img bench's message (without the program name).
    Failed(String),
}

/// The errno text of a library error, as qemu-img's block layer would report it.
pub(super) fn error_text(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => qcow2kit::error::strerror(source),
        qcow2kit::Error::ReadOnly => "Operation not permitted".into(),
        qcow2kit::Error::Unsupported(_) => "Not supported".into(),
        _ => "Input/output error".into(),
    }
}

impl Job<'_> {
    /// The offset of request `i`: the start offset, then each next one `step` further, taken
    /// modulo the size (qemu-img 10.0's `offset %= image_size`; 0 for an empty image).
    fn offset_of(&self, i: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if self.size == 0 {
            return 0;
        }
        let at = u128::from(self.offset) + u128::from(i) * u128::from(self.step);
        // The remainder is below `size`, a u64.
        (at % u128::from(self.size)) as u64
    }

    /// Whether a flush is due once `started` requests have been started (and, draining,
    /// finished).
    fn flush_due(&self, started: u64) -> bool {
        self.flush_interval > 0 && started > 0 && (self.count - started) % self.flush_interval == 0
    }

    /// Runs request `i` with `buf`.
    fn request(&self, i: u64, buf: &mut [u8]) -> Result<(), String> {
        let offset = self.offset_of(i);
        // The block layer refuses a request that does not fit in the image with EIO.
        let fits = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.size);
        let r = if !fits {
            Err(qcow2kit::Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            })
        } else if self.write {
            self.device.write_at(buf, offset).and_then(|()| {
                if self.writethrough {
                    self.device.flush()
                } else {
                    Ok(())
                }
            })
        } else {
            self.device.read_at(buf, offset)
        };
        r.map_err(|e| format!("Failed request: {}", error_text(&e)))
    }

    fn flush(&self, what: &str) -> Result<(), String> {
        self.device
            .flush()
            .map_err(|e| format!("{what}: {}", error_text(&e)))
    }

    /// A worker's buffer, filled with the pattern for writes.
    fn buffer(&self) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(self.bufsize)
            .map_err(|_| "Could not allocate the request buffers".to_string())?;
        buf.resize(self.bufsize, if self.write { self.pattern } else { 0 });
        Ok(buf)
    }
}

/// Runs every request of `job` on `workers` threads (at least one).
pub(super) fn run(job: &Job<'_>, workers: usize) -> Outcome {
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let fail = |msg: String| {
        failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(msg);
    };
    let drained = job.flush_interval > 0 && job.drain;
    let gate = Gate::new(job);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let r = job.buffer().and_then(|mut buf| {
                    if drained {
                        run_drained(job, &gate, &mut buf)
                    } else {
                        run_free(job, &next, &stop, &mut buf)
                    }
                });
                if let Err(msg) = r {
                    stop.store(true, Ordering::Relaxed);
                    gate.stop();
                    fail(msg);
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(msg) => Outcome::Failed(msg),
        None => Outcome::Done,
    }
}

/// Without draining: take the next index, run it; with `--no-drain`, flush after a request
/// that completes an interval.
fn run_free(
    job: &Job<'_>,
    next: &AtomicU64,
    stop: &AtomicBool,
    buf: &mut [u8],
) -> Result<(), String> {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= job.count || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        job.request(i, buf)?;
        if job.flush_due(i + 1) {
            job.flush("Failed flush request")?;
        }
    }
}

/// Where a draining run is: requests start only below `end`, the next flush mark.
struct Progress {
    next: u64,
    finished: u64,
    end: u64,
    stopped: bool,
}

/// The shared state of a draining run.
struct Gate {
    progress: Mutex<Progress>,
    moved: Condvar,
}

impl Gate {
    fn new(job: &Job<'_>) -> Self {
        // The first mark: the smallest k > 0 with (count - k) divisible by the interval.
        let first = match job.flush_interval {
            0 => job.count,
            f if job.count % f == 0 => f,
            f => job.count % f,
        };
        Gate {
            progress: Mutex::new(Progress {
                next: 0,
                finished: 0,
                end: first,
                stopped: false,
            }),
            moved: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.moved.notify_all();
    }
}

/// Draining: requests start only below the next flush mark; the worker that finishes the last
/// one before the mark flushes and moves the mark on.
fn run_drained(job: &Job<'_>, gate: &Gate, buf: &mut [u8]) -> Result<(), String> {
    let mut p = gate.lock();
    loop {
        if p.stopped || p.next >= job.count {
            return Ok(());
        }
        if p.next >= p.end {
            p = gate.moved.wait(p).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let i = p.next;
        p.next += 1;
        drop(p);
        job.request(i, buf)?;
        p = gate.lock();
        p.finished += 1;
        if p.finished == p.end {
            // Every started request has finished: nothing is in flight during the flush.
            job.flush("Failed request")?;
            p.end = p.end.saturating_add(job.flush_interval).min(job.count);
            gate.moved.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2kit::io::MemoryStorage;
    use qcow2kit::RawImage;
    use std::sync::Arc;

    fn job(dev: &dyn BlockDevice, count: u64, interval: u64, drain: bool) -> Job<'_> {
        Job {
            device: dev,
            size: dev.size(),
            count,
            bufsize: 512,
            step: 512,
            offset: 0,
            pattern: 0x5a,
            write: true,
            writethrough: false,
            flush_interval: interval,
            drain,
        }
    }

    #[test]
    fn offsets_wrap_like_qemu() {
        let dev =
            RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 4096])), false).unwrap();
        let mut j = job(&dev, 10, 0, true);
        j.offset = 1024;
        j.step = 1536;
        let offs: Vec<u64> = (0..4).map(|i| j.offset_of(i)).collect();
        assert_eq!(offs, [1024, 2560, 0, 1536]);
        // The start offset itself is not wrapped.
        j.offset = 8192;
        assert_eq!(j.offset_of(0), 8192);
    }

    #[test]
    fn flush_marks_count_from_the_end() {
        let dev =
            RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 4096])), false).unwrap();
        let j = job(&dev, 10, 4, true);
        let marks: Vec<u64> = (0..=10).filter(|&k| j.flush_due(k)).collect();
        assert_eq!(marks, [2, 6, 10]);
    }

    #[test]
    fn every_request_runs_once_drained_or_not() {
        for (interval, drain) in [(0, true), (4, true), (4, false)] {
            let storage = Arc::new(MemoryStorage::from_bytes(vec![0; 64 * 512]));
            let dev = RawImage::open(storage.clone(), true).unwrap();
            let j = job(&dev, 40, interval, drain);
            assert!(matches!(run(&j, 4), Outcome::Done));
            let mut all = vec![0u8; 64 * 512];
            dev.read_at(&mut all, 0).unwrap();
            assert!(all[..40 * 512].iter().all(|&b| b == 0x5a));
            assert!(all[40 * 512..].iter().all(|&b| b == 0));
        }
    }

    /// A raw device in memory that records how many requests were in flight at most, how many
    /// flushes came, and whether one came while a request was in flight.
    struct Probe {
        inner: RawImage,
        in_flight: AtomicU64,
        most: AtomicU64,
        flushes: AtomicU64,
        flushed_busy: AtomicBool,
    }

    impl Probe {
        fn new() -> Self {
            Probe {
                inner: RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 64 * 512])), true)
                    .unwrap(),
                in_flight: AtomicU64::new(0),
                most: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                flushed_busy: AtomicBool::new(false),
            }
        }

        fn busy(&self, io: impl FnOnce() -> qcow2kit::Result<()>) -> qcow2kit::Result<()> {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            // Long enough for every worker to have started its request.
            std::thread::sleep(std::time::Duration::from_millis(5));
            let r = io();
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        }
    }

    impl BlockDevice for Probe {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2kit::Result<()> {
            self.busy(|| self.inner.read_at(buf, offset))
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> qcow2kit::Result<()> {
            self.busy(|| self.inner.write_at(buf, offset))
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> qcow2kit::Result<()> {
            self.inner.write_zeroes(offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> qcow2kit::Result<()> {
            self.inner.discard(offset, len)
        }
        fn close(&self) -> qcow2kit::Result<()> {
            self.inner.close()
        }
        fn flush(&self) -> qcow2kit::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                self.flushed_busy.store(true, Ordering::SeqCst);
            }
            self.inner.flush()
        }
        fn block_status(&self, offset: u64, len: u64) -> qcow2kit::Result<qcow2kit::Extent> {
            self.inner.block_status(offset, len)
        }
        fn format_name(&self) -> &'static str {
            "raw"
        }
    }

    #[test]
    fn depth_requests_are_really_in_flight() {
        let dev = Probe::new();
        let j = job(&dev, 24, 0, true);
        assert!(matches!(run(&j, 8), Outcome::Done));
        assert_eq!(dev.most.load(Ordering::SeqCst), 8);
        assert_eq!(dev.flushes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn drained_flushes_wait_for_the_requests_in_flight() {
        let dev = Probe::new();
        let j = job(&dev, 40, 8, true);
        assert!(matches!(run(&j, 4), Outcome::Done));
        assert_eq!(dev.flushes.load(Ordering::SeqCst), 5);
        assert!(!dev.flushed_busy.load(Ordering::SeqCst));
        assert_eq!(dev.most.load(Ordering::SeqCst), 4);
        // Without draining, the flushes overlap the other workers' requests.
        let dev = Probe::new();
        let j = job(&dev, 40, 8, false);
        assert!(matches!(run(&j, 4), Outcome::Done));
        assert_eq!(dev.flushes.load(Ordering::SeqCst), 5);
        assert!(dev.flushed_busy.load(Ordering::SeqCst));
    }

    #[test]
    fn a_request_past_the_end_fails() {
        let dev =
            RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![0; 4096])), false).unwrap();
        let mut j = job(&dev, 3, 0, true);
        j.write = false;
        j.offset = 4096;
        match run(&j, 2) {
            Outcome::Failed(m) => assert_eq!(m, "Failed request: Input/output error"),
            Outcome::Done => panic!("a read past the end succeeded"),
        }
    }
}
