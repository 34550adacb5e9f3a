//! qemu-io's asynchronous requests: `aio_read`, `aio_write` and `aio_flush`.
//!
//! A request is parsed and checked when the command runs (its errors are the command's), then
//! handed to a pool of worker threads: several requests are in flight together, on the image
//! shared by the session (the library serialises overlapping writes itself). Completions are
//! reported as qemu-io reports them from its event loop, in the order the requests finish:
//! all of them by `aio_flush`, by a command that does I/O on the image (qemu-io's synchronous
//! I/O runs the event loop until it is done; here it waits for every request in flight first,
//! so it never overlaps them), by `close` and at exit; in interactive mode also those that
//! finished by the time the next prompt is printed.
//!
//! Invariants: at most [`MAX_WORKERS`] threads; every submitted request is reported exactly
//! once (the queue counts the requests not yet reported and waits for them when draining).

use super::commands::{zero_write, CmdInfo, Session};
use super::getopt::{getopt, Opt};
use super::numbers::{cvtnum, parse_pattern, print_cvtnum_err};
use super::open::Image;
use super::output::*;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most worker threads (qemu's thread pool has 64 too); more requests wait in the queue.
const MAX_WORKERS: usize = 64;

/// What the request does, and how its completion is reported.
enum Kind {
    /// `aio_read`: the pattern to verify and whether to dump the data.
    Read { pattern: Option<u8>, verbose: bool },
    /// `aio_write` (with data, or zeros with `-z`).
    Write,
}

/// A finished request.
struct Done {
    kind: Kind,
    offset: i64,
    count: i64,
    quiet: bool,
    csv: bool,
    /// From the submission to the completion, as qemu-io times it.
    elapsed: Duration,
    /// The data read (empty for a write), or the errno.
    result: Result<Vec<u8>, i32>,
    /// Its place in the order of submission.
    seq: u64,
}

type Job = Box<dyn FnOnce() -> Done + Send>;

/// What a worker sends back: the finished request, or `None` when running it panicked (a bug:
/// reported, and counted as done so that draining never waits for it).
type Finished = Option<Done>;

/// The requests in flight and the threads that run them.
pub(super) struct Queue {
    jobs: Option<Sender<Job>>,
    jobs_rx: Arc<Mutex<Receiver<Job>>>,
    done_tx: Sender<Finished>,
    done_rx: Receiver<Finished>,
    workers: Vec<JoinHandle<()>>,
    /// Submitted and not yet reported.
    pending: usize,
    /// Requests submitted so far.
    submitted: u64,
}

impl Queue {
    pub(super) fn new() -> Self {
        let (jobs, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel();
        Queue {
            jobs: Some(jobs),
            jobs_rx: Arc::new(Mutex::new(jobs_rx)),
            done_tx,
            done_rx,
            workers: Vec::new(),
            pending: 0,
            submitted: 0,
        }
    }

    fn submit(&mut self, job: Job) {
        let seq = self.submitted;
        self.submitted += 1;
        let job: Job = Box::new(move || Done { seq, ..job() });
        self.pending += 1;
        if self.workers.len() < self.pending.min(MAX_WORKERS) {
            let rx = Arc::clone(&self.jobs_rx);
            let tx = self.done_tx.clone();
            self.workers.push(std::thread::spawn(move || loop {
                // The lock is held only to take a job, never while running one.
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).ok();
                if tx.send(done).is_err() {
                    return;
                }
            }));
        }
        if let Some(jobs) = &self.jobs {
            // The receiver lives as long as the queue: sending cannot fail.
            let _ = jobs.send(job);
        }
    }

    /// The next finished request: waiting for one when `block`, unless every request in
    /// flight is one of the `suspended()` held at a blkdebug breakpoint.
    fn next(&mut self, block: bool, suspended: impl Fn() -> usize) -> Option<Finished> {
        if self.pending == 0 {
            return None;
        }
        let d = if block {
            loop {
                match self.done_rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(d) => break Some(d),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        if self.pending > suspended() => {}
                    Err(_) => break None,
                }
            }
        } else {
            self.done_rx.try_recv().ok()
        };
        if d.is_some() {
            self.pending -= 1;
        }
        d
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Session {
    /// Reports the finished requests; with `all`, waits for every request in flight.
    ///
    /// Waiting for all, a request is never reported before an earlier one whose clusters it
    /// shares: the library runs such requests one after the other, as QEMU does, but the later
    /// one's thread may get to report first.
    pub(super) fn complete_aio(&mut self, all: bool) {
        let filters = self.img.as_ref().map(|i| i.filters.clone());
        let suspended = || filters.as_ref().map_or(0, |f| f.suspended());
        let mut done = Vec::new();
        while let Some(d) = self.aio.next(all, suspended) {
            match d {
                Some(d) if all => done.push(d),
                Some(d) => self.report(d),
                None => errln!(
                    "{}: an asynchronous request failed unexpectedly",
                    crate::common::prog()
                ),
            }
        }
        let cluster = self
            .img
            .as_ref()
            .and_then(|i| i.qcow2.as_ref())
            .map_or(512, |q| q.cluster_size()) as i64;
        let span = |d: &Done| {
            let start = d.offset.div_euclid(cluster);
            (start, (d.offset + d.count.max(1) - 1).div_euclid(cluster))
        };
        while !done.is_empty() {
            let blocked = |d: &Done| {
                let (a, b) = span(d);
                done.iter().any(|e| {
                    let (c, f) = span(e);
                    e.seq < d.seq && c <= b && a <= f
                })
            };
            let i = done.iter().position(|d| !blocked(d)).unwrap_or(0);
            let d = done.remove(i);
            self.report(d);
        }
    }

    /// qemu-io's `aio_read_done` / `aio_write_done`.
    fn report(&mut self, d: Done) {
        let name = match d.kind {
            Kind::Read { .. } => "readv",
            Kind::Write => "aio_write",
        };
        let buf = match d.result {
            Ok(b) => b,
            Err(e) => {
                out!(self.out, "{name} failed: {}\n", strerror(e));
                return;
            }
        };
        let (op, verbose) = match d.kind {
            Kind::Read { pattern, verbose } => {
                if let Some(p) = pattern {
                    if buf.iter().any(|&b| b != p) {
                        out!(
                            self.out,
                            "Pattern verification failed at offset {}, {} bytes\n",
                            d.offset,
                            d.count
                        );
                    }
                }
                ("read", verbose)
            }
            Kind::Write => ("wrote", false),
        };
        if d.quiet {
            return;
        }
        if verbose {
            dump_buffer(&mut self.out, &buf, d.offset);
        }
        print_report(&mut self.out, op, d.elapsed, d.offset, d.count, d.csv);
    }

    /// `aio_read [-Ciqrv] [-P pattern] off len [len..]`.
    pub(super) fn aio_read(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "CiP:qrv");
        let (mut csv, mut quiet, mut verbose) = (false, false, false);
        let mut pattern = None;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('C', _) => csv = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = Some(p),
                    Err(e) => return -e,
                },
                Opt::Flag('i', _) => {
                    out!(self.out, "injecting invalid read request\n");
                    return 0;
                }
                Opt::Flag('q', _) => quiet = true,
                Opt::Flag('v', _) => verbose = true,
                Opt::Flag(_, _) => {} // -r: no effect
            }
        }
        let (offset, count) = match self.vector_operands(ci, &operands) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let img = img.clone();
        let t0 = Instant::now();
        self.aio.submit(Box::new(move || {
            let mut buf = vec![0xabu8; count as usize];
            let result = if !Session::in_range(&img, offset, count) {
                Err(EIO)
            } else {
                img.dev
                    .read_at(&mut buf, offset as u64)
                    .map(|()| buf)
                    .map_err(|e| errno_of(&e))
            };
            Done {
                kind: Kind::Read { pattern, verbose },
                offset,
                count,
                quiet,
                csv,
                elapsed: t0.elapsed(),
                result,
                seq: 0,
            }
        }));
        0
    }

    /// `aio_write [-Cfiqruz] [-P pattern] off len [len..]`.
    pub(super) fn aio_write(
        &mut self,
        ci: &CmdInfo,
        name: &str,
        img: &Image,
        args: &[&str],
    ) -> i32 {
        let (opts, operands) = getopt(name, args, "CfiP:qruz");
        let (mut csv, mut fua, mut quiet) = (false, false, false);
        let (mut registered, mut unmap, mut zeros) = (false, false, false);
        let mut pattern = 0xcdu8;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('C', _) => csv = true,
                Opt::Flag('f', _) => fua = true,
                Opt::Flag('q', _) => quiet = true,
                Opt::Flag('r', _) => registered = true,
                Opt::Flag('u', _) => unmap = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = p,
                    Err(e) => return -e,
                },
                Opt::Flag('i', _) => {
                    out!(self.out, "injecting invalid write request\n");
                    return 0;
                }
                Opt::Flag(_, _) => zeros = true,
            }
        }
        if operands.len() < 2 {
            return self.usage(ci);
        }
        if zeros && operands.len() != 2 {
            out!(self.out, "-z supports only a single length parameter\n");
            return -EINVAL;
        }
        if unmap && !zeros {
            out!(self.out, "-u requires -z to be specified\n");
            return -EINVAL;
        }
        // qemu-io never rejects `-z` with `-P` here (the pattern is ignored).
        if zeros && registered {
            out!(
                self.out,
                "cannot combine zero write with registered I/O buffer\n"
            );
            return -EINVAL;
        }
        let (offset, count) = if zeros {
            let mut n = [0i64; 2];
            for (v, arg) in n.iter_mut().zip(&operands) {
                match cvtnum(arg) {
                    Ok(x) => *v = x,
                    Err(e) => {
                        print_cvtnum_err(&mut self.out, e, arg);
                        return -e;
                    }
                }
            }
            (n[0], n[1])
        } else {
            match self.vector_operands(ci, &operands) {
                Ok(r) => r,
                Err(e) => return e,
            }
        };
        let img = img.clone();
        let t0 = Instant::now();
        self.aio.submit(Box::new(move || {
            let r = if count > REQUEST_MAX || !Session::in_range(&img, offset, count) {
                Err(EIO)
            } else if zeros {
                zero_write(&img, offset as u64, count as u64, unmap)
            } else {
                let buf = vec![pattern; count as usize];
                img.dev
                    .write_at(&buf, offset as u64)
                    .map_err(|e| errno_of(&e))
            };
            let r = Session::complete_write(&img, r, fua);
            Done {
                kind: Kind::Write,
                offset,
                count,
                quiet,
                csv,
                elapsed: t0.elapsed(),
                result: r.map(|()| Vec::new()),
                seq: 0,
            }
        }));
        0
    }
}

impl Session {
    /// `sleep MS`: waits, letting requests in flight complete (qemu-io runs its event loop).
    pub(super) fn sleep_cmd(&mut self, arg: &str) -> i32 {
        match super::numbers::strtol0(arg) {
            Some(ms) if ms >= 0 => {
                std::thread::sleep(Duration::from_millis(ms as u64));
                self.complete_aio(false);
                0
            }
            _ => {
                out!(self.out, "{arg} is not a valid number\n");
                -EINVAL
            }
        }
    }
}
