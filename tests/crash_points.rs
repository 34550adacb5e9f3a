//! Crash safety and I/O-error handling, by fault injection at every operation.
//!
//! Each workload (allocating writes, copy-on-write over qcow2 and raw backing files, zero writes
//! and discards on v3 and v2, refcount-table growth, L1 growth, resizes, lazy refcounts with the
//! rebuild of a dirty image, compressed writes, extended L2, convert into a fresh image) is a
//! fixed list of guest operations on an image whose storage is a test double
//! (`qcow2kit::io::testing`). It is run once to count the storage operations it makes, then:
//!
//! - **Crash points**: once per write-type operation index and once per flush index, on a
//!   [`CrashStorage`] that loses power there. From each crash, several post-crash media are
//!   built (the flushed state plus none, all, each single one — for short unflushed sets — and
//!   seeded random subsets of the unflushed writes, some torn at 512-byte boundaries).
//! - **Failure points**: once per index of every kind of mutating operation (write, flush,
//!   `set_len`, `punch_hole`), with a one-shot `EIO` and with a sticky `ENOSPC`, on a
//!   [`FailingStorage`]. The workload goes on after the error.
//!
//! After each, the image must be judged sound:
//! - it opens writable (a dirty lazy-refcounts image is rebuilt by that open), and our `check`
//!   finds no corruption (leaks are allowed) before (unless dirty) and after the open;
//! - its virtual size is one the model allows, and every 512-byte sector reads as one of the
//!   contents the model allows. The model keeps, per sector, the set of contents the open image
//!   may read (`live`) and the set a post-crash image may hold (`durable`): a completed flush
//!   (or close, or resize, which flushes) makes `durable` equal `live`, so everything
//!   acknowledged by a flush must read back exactly; between flushes each write adds its new
//!   content to `durable`, so an unflushed write unit reads as its old or its new content;
//! - for failures: the error reaches the caller (no panic, no silently swallowed write or flush
//!   error), the open image keeps reading what the model allows, and it either refuses later
//!   writes or keeps working;
//! - on a sample of points, `qemu-img check` of the post-crash file finds no corruption (exit 0
//!   or 3).
//!
//! Every workload prints how many crash and failure points it tried and how many passed (run
//! with `--nocapture`). Debug builds run shorter workloads and fewer random crash images.

#[path = "support/crash_helpers.rs"]
mod crash_helpers;
#[path = "support/write_helpers.rs"]
mod write_helpers;

use crash_helpers::{crash_points, crash_seed, failure_points, no_corruption, summary, Tally};
use qcow2kit::io::testing::{CrashPoint, CrashStorage, FailingStorage, Fault, OpCounts, OpKind};
use qcow2kit::io::{MemoryStorage, Storage};
use qcow2kit::ops::check::check;
use qcow2kit::ops::convert::{convert_into, Qcow2ConvertOptions};
use qcow2kit::ops::create::{create_qcow2_on, Compat, CreateOptions};
use qcow2kit::{BlockDevice, Error, Qcow2Image, Qcow2Options, RawImage};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use write_helpers::{scratch, tool, K, M, QEMU_IMG};

const SECTOR: u64 = 512;
/// Content tag: all zeros.
const ZERO: u32 = 0;
/// Content tag: the backing file's data.
const BACKING: u32 = 1;
/// Tags of the convert source's data start here.
const SOURCE_TAGS: u32 = 1 << 28;

/// Debug builds run shorter workloads.
const DEBUG: bool = cfg!(debug_assertions);
/// Random post-crash images per crash point (besides none / all / each single one).
const RANDOM_IMAGES: usize = if DEBUG { 1 } else { 8 };
/// `qemu-img check` runs per workload (spread over the crash and failure points).
const QEMU_CHECKS: usize = if DEBUG { 3 } else { 24 };

// ---------------------------------------------------------------------------------------------
// Content: every 512-byte sector written by the workloads is one 8-byte word repeated, derived
// from a tag (which write) and the sector number, so a sector tells which write it came from.

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(tag: u32, sector: u64) -> u64 {
    if tag == ZERO {
        0
    } else {
        mix((u64::from(tag) << 40) ^ sector) | 1
    }
}

/// Fills `buf` (guest bytes from sector `first`) with the content of `tags[i]` per sector.
fn fill(buf: &mut [u8], first: u64, tag: impl Fn(u64) -> u32) {
    for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let sector = first + i as u64;
        let w = word(tag(sector), sector).to_be_bytes();
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&w[..c.len()]);
        }
    }
}

/// Which of `candidates` the sector holds, if any.
fn identify(buf: &[u8], sector: u64, candidates: &[u32]) -> Option<u32> {
    let w = u64::from_be_bytes(buf[..8].try_into().ok()?);
    if !buf.chunks(8).all(|c| c == &w.to_be_bytes()[..c.len()]) {
        return None;
    }
    candidates.iter().copied().find(|&t| word(t, sector) == w)
}

/// A word not made by any tag the model allows: report what it is, for the failure message.
fn describe(buf: &[u8]) -> String {
    let w = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
    let uniform = buf.chunks(8).all(|c| c == &w.to_be_bytes()[..c.len()]);
    format!("{w:#018x}{}", if uniform { "" } else { " (mixed)" })
}

// ---------------------------------------------------------------------------------------------
// The model.

/// What each sector may read as, in the open image and after a crash.
#[derive(Debug, Clone)]
struct Model {
    live: Vec<Vec<u32>>,
    durable: Vec<Vec<u32>>,
    size: u64,
    durable_sizes: Vec<u64>,
}

fn add<T: PartialEq>(set: &mut Vec<T>, t: T) {
    if !set.contains(&t) {
        set.push(t);
    }
}

impl Model {
    fn new(max_size: u64, size: u64, initial: impl Fn(u64) -> u32) -> Self {
        let live: Vec<Vec<u32>> = (0..max_size / SECTOR)
            .map(|s| {
                if s < size / SECTOR {
                    vec![initial(s)]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Model {
            durable: live.clone(),
            live,
            size,
            durable_sizes: vec![size],
        }
    }

    /// Before a step runs: its new content may reach the medium from now on.
    fn begin(&mut self, effect: &[(u64, u32)]) {
        for &(s, t) in effect {
            add(&mut self.durable[s as usize], t);
        }
    }

    /// The step completed: the open image reads its new content.
    fn commit(&mut self, effect: &[(u64, u32)]) {
        for &(s, t) in effect {
            self.live[s as usize] = vec![t];
        }
    }

    /// The step failed: the open image reads the old or the new content.
    fn fail(&mut self, effect: &[(u64, u32)]) {
        for &(s, t) in effect {
            add(&mut self.live[s as usize], t);
        }
    }

    /// A completed flush: everything the open image reads is durable.
    fn flushed(&mut self) {
        self.durable.clone_from(&self.live);
        self.durable_sizes = vec![self.size];
    }
}

/// Checks `buf` (guest bytes from sector `first`) against `sets`.
fn check_sectors(buf: &[u8], first: u64, sets: &[Vec<u32>]) -> Result<(), String> {
    for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
        let sector = first + i as u64;
        let set = &sets[sector as usize];
        if identify(s, sector, set).is_none() {
            return Err(format!(
                "sector {sector} (guest offset {:#x}) reads {} which is none of the allowed \
                 contents {set:?}",
                sector * SECTOR,
                describe(s)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Workloads.

#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: u64,
        tag: u32,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Compressed {
        off: u64,
        tag: u32,
    },
    Flush,
    Resize {
        size: u64,
    },
    /// `close`, then open again.
    Reopen,
    /// `convert_into` from the workload's source (one worker, so the order is fixed).
    Convert {
        compress: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BackingKind {
    Qcow2,
    Raw,
}

struct Workload {
    name: &'static str,
    create: CreateOptions,
    size: u64,
    max_size: u64,
    backing: Option<(BackingKind, u64)>,
    /// Steps run before the storage is wrapped (the starting image).
    setup: Vec<Step>,
    /// Whether the starting image is left dirty (flushed, never closed).
    setup_dirty: bool,
    steps: Vec<Step>,
    /// The source of `Step::Convert`: its size and the steps that fill it.
    source: Option<(u64, Vec<Step>)>,
}

/// Everything derived from a workload once: the starting image, the model after setup, the
/// backing device and convert source.
struct Prepared {
    /// Cluster size of the image.
    cs: u64,
    initial: Vec<u8>,
    model: Model,
    backing: Option<Arc<dyn BlockDevice>>,
    backing_bytes: Option<Vec<u8>>,
    source: Option<(Arc<dyn BlockDevice>, Vec<u32>)>,
    lazy: bool,
}

/// Deterministic randomness for building workloads.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = mix(self.0);
        self.0 % n
    }

    /// A sector-aligned range inside `0..size` of 1..=`max_sectors` sectors.
    fn range(&mut self, size: u64, max_sectors: u64) -> (u64, u64) {
        let sectors = size / SECTOR;
        let s = self.below(sectors);
        let n = 1 + self.below(max_sectors.min(sectors - s));
        (s * SECTOR, n * SECTOR)
    }
}

fn rw() -> Qcow2Options {
    Qcow2Options {
        writable: true,
        ..Qcow2Options::default()
    }
}

/// The sectors a step changes and the content each gets (`None` for steps handled apart).
fn effect(step: &Step, model: &Model, source: Option<&[u32]>, cs: u64) -> Vec<(u64, u32)> {
    let range = |off: u64, len: u64, t: u32| -> Vec<(u64, u32)> {
        (off / SECTOR..(off + len) / SECTOR)
            .map(|s| (s, t))
            .collect()
    };
    match *step {
        Step::Write { off, len, tag } => range(off, len, tag),
        Step::Zero { off, len } | Step::Discard { off, len } => range(off, len, ZERO),
        Step::Compressed { off, tag } => range(off, cs.min(model.size - off), tag),
        Step::Convert { .. } => source
            .expect("convert needs a source")
            .iter()
            .enumerate()
            .map(|(s, t)| (s as u64, *t))
            .collect(),
        Step::Flush | Step::Resize { .. } | Step::Reopen => Vec::new(),
    }
}

/// Counts faults injected while an image that was closed successfully is dropped: its `Drop`
/// closes (and so flushes) once more and can only ignore an error there.
struct DropProbe<'a> {
    injected: Option<&'a dyn Fn() -> u64>,
    faults_in_drop: u64,
}

impl DropProbe<'_> {
    fn none() -> Self {
        DropProbe {
            injected: None,
            faults_in_drop: 0,
        }
    }

    fn drop_closed(&mut self, img: Qcow2Image) {
        let before = self.injected.map_or(0, |f| f());
        drop(img);
        self.faults_in_drop += self.injected.map_or(0, |f| f()) - before;
    }
}

/// The result of running a workload's steps.
#[derive(Default)]
struct RunOutcome {
    /// Steps (and the final close) that returned an error.
    errors: Vec<String>,
    /// The image, still open (if the last open succeeded and it was not closed).
    img: Option<Qcow2Image>,
}

fn open_image(
    storage: Arc<dyn Storage>,
    backing: &Option<Arc<dyn BlockDevice>>,
) -> Result<Qcow2Image, Error> {
    let mut img = Qcow2Image::open(storage, &rw())?;
    img.set_backing(backing.clone());
    Ok(img)
}

/// Runs one step on `img`, updating the model. Errors are returned after the model has
/// recorded the step as failed.
fn run_step(
    img: &mut Option<Qcow2Image>,
    storage: &Arc<dyn Storage>,
    step: &Step,
    model: &mut Model,
    p: &Prepared,
    probe: &mut DropProbe<'_>,
) -> Result<(), Error> {
    let cs = p.cs;
    if matches!(step, Step::Reopen) {
        let dev = img
            .take()
            .ok_or_else(|| Error::Unsupported("no open image".into()))?;
        dev.close()?;
        model.flushed();
        probe.drop_closed(dev);
        *img = Some(open_image(storage.clone(), &p.backing)?);
        return Ok(());
    }
    let Some(dev) = img.as_ref() else {
        return Err(Error::Unsupported("no open image".into()));
    };
    let eff = effect(step, model, p.source.as_ref().map(|s| s.1.as_slice()), cs);
    model.begin(&eff);
    let r = match *step {
        Step::Write { off, len, tag } => {
            let mut buf = vec![0u8; len as usize];
            fill(&mut buf, off / SECTOR, |_| tag);
            dev.write_at(&buf, off)
        }
        Step::Zero { off, len } => dev.write_zeroes(off, len),
        Step::Discard { off, len } => dev.discard(off, len).and_then(|()| {
            // Each sector reads as before or as zeros: the model takes what the image reads.
            let mut buf = vec![0u8; len as usize];
            dev.read_at(&mut buf, off)?;
            for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
                let sector = off / SECTOR + i as u64;
                let mut set = model.live[sector as usize].clone();
                add(&mut set, ZERO);
                let t = identify(s, sector, &set).unwrap_or_else(|| {
                    panic!("sector {sector} reads {} after a discard", describe(s))
                });
                model.live[sector as usize] = vec![t];
            }
            Ok(())
        }),
        Step::Compressed { off, tag } => {
            let len = cs.min(model.size - off);
            let mut buf = vec![0u8; len as usize];
            fill(&mut buf, off / SECTOR, |_| tag);
            dev.write_compressed(off, &buf)
        }
        Step::Flush => dev.flush(),
        Step::Resize { size } => {
            let old = model.size;
            let grown: Vec<(u64, u32)> = (old / SECTOR..size / SECTOR).map(|s| (s, ZERO)).collect();
            model.begin(&grown);
            // Shrinking drops the clusters past the new end before the size changes.
            let dropped: Vec<(u64, u32)> =
                (size / SECTOR..old / SECTOR).map(|s| (s, ZERO)).collect();
            model.begin(&dropped);
            add(&mut model.durable_sizes, size);
            let r = dev.resize(size, true);
            model.size = dev.size();
            if r.is_ok() && size != old {
                // A completed resize is durable (it flushes), as qemu-img resize's is. (One
                // to the same size does nothing, not even on an image broken by a fault.)
                model.commit(&grown);
                for s in size / SECTOR..old / SECTOR {
                    model.live[s as usize].clear();
                }
                model.flushed();
            } else if r.is_err() {
                // A failed shrink may have dropped clusters past the new end already.
                model.fail(&grown);
                model.fail(&dropped);
            }
            r
        }
        Step::Reopen => unreachable!("handled above"),
        Step::Convert { compress } => {
            let (src, _) = p.source.as_ref().expect("convert needs a source");
            let opts = Qcow2ConvertOptions {
                workers: 1,
                compress,
                ..Qcow2ConvertOptions::default()
            };
            convert_into(src.as_ref(), dev, true, &opts)
        }
    };
    match &r {
        Ok(()) => {
            if !matches!(step, Step::Discard { .. }) {
                // (A discard's outcome was read back above.)
                model.commit(&eff);
            }
            if matches!(step, Step::Flush) {
                model.flushed();
            }
        }
        Err(_) => model.fail(&eff),
    }
    r
}

/// Opens the image on `storage` and runs `steps`, then closes it unless `keep_open`. With
/// `stop_on_error` the first error ends the run (a crash); otherwise later steps still run.
fn run_steps(
    storage: Arc<dyn Storage>,
    steps: &[Step],
    model: &mut Model,
    p: &Prepared,
    stop_on_error: bool,
    keep_open: bool,
    probe: &mut DropProbe<'_>,
) -> RunOutcome {
    let mut out = RunOutcome::default();
    let mut img = match open_image(storage.clone(), &p.backing) {
        Ok(i) => Some(i),
        Err(e) => {
            out.errors.push(format!("open: {e}"));
            return out;
        }
    };
    for (i, step) in steps.iter().enumerate() {
        if let Err(e) = run_step(&mut img, &storage, step, model, p, probe) {
            out.errors.push(format!("step {i} {step:?}: {e}"));
            if stop_on_error || img.is_none() {
                out.img = img;
                return out;
            }
        }
    }
    if keep_open {
        out.img = img;
        return out;
    }
    if let Some(dev) = img {
        match dev.close() {
            Ok(()) => {
                model.flushed();
                probe.drop_closed(dev);
            }
            Err(e) => out.errors.push(format!("close: {e}")),
        }
    }
    out
}

fn make_backing(kind: BackingKind, size: u64) -> (Arc<dyn BlockDevice>, Vec<u8>) {
    let mut bytes = vec![0u8; size as usize];
    fill(&mut bytes, 0, |_| BACKING);
    match kind {
        BackingKind::Raw => {
            let dev = RawImage::open(Arc::new(MemoryStorage::from_bytes(bytes.clone())), false)
                .expect("raw backing");
            (Arc::new(dev), bytes)
        }
        BackingKind::Qcow2 => {
            let mem = Arc::new(MemoryStorage::new());
            let img = create_qcow2_on(mem.clone(), None, size, &CreateOptions::default())
                .expect("create backing");
            img.write_at(&bytes, 0).expect("fill backing");
            img.close().expect("close backing");
            drop(img);
            let dev = Qcow2Image::open(mem.clone(), &Qcow2Options::default()).expect("backing");
            (Arc::new(dev), mem.to_bytes())
        }
    }
}

fn backing_file_name(kind: BackingKind) -> &'static str {
    match kind {
        BackingKind::Qcow2 => "backing.qcow2",
        BackingKind::Raw => "backing.raw",
    }
}

fn prepare(w: &Workload) -> Prepared {
    let cs = w.create.cluster_size;
    let (backing, backing_bytes) = match w.backing {
        Some((kind, size)) => {
            let (d, b) = make_backing(kind, size);
            (Some(d), Some(b))
        }
        None => (None, None),
    };
    let mut create = w.create.clone();
    if let Some((kind, _)) = w.backing {
        create.backing_file = Some(backing_file_name(kind).into());
        create.backing_format = Some(
            if kind == BackingKind::Raw {
                "raw"
            } else {
                "qcow2"
            }
            .into(),
        );
    }
    let source = w.source.as_ref().map(|(size, steps)| {
        let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        create_qcow2_on(mem.clone(), None, *size, &CreateOptions::default()).expect("source");
        let mut model = Model::new(*size, *size, |_| ZERO);
        let p = Prepared {
            cs: 65536,
            initial: Vec::new(),
            model: model.clone(),
            backing: None,
            backing_bytes: None,
            source: None,
            lazy: false,
        };
        let out = run_steps(
            mem.clone(),
            steps,
            &mut model,
            &p,
            true,
            false,
            &mut DropProbe::none(),
        );
        assert!(out.errors.is_empty(), "source: {:?}", out.errors);
        let dev = Qcow2Image::open(mem, &Qcow2Options::default()).expect("source");
        let tags: Vec<u32> = model.live.iter().map(|s| s[0]).collect();
        (Arc::new(dev) as Arc<dyn BlockDevice>, tags)
    });
    let mem = Arc::new(MemoryStorage::new());
    drop(create_qcow2_on(mem.clone(), None, w.size, &create).expect("create"));
    let bsize = w.backing.map_or(0, |(_, s)| s);
    let model = Model::new(w.max_size, w.size, |s| {
        if s * SECTOR < bsize {
            BACKING
        } else {
            ZERO
        }
    });
    let mut p = Prepared {
        cs,
        initial: Vec::new(),
        model,
        backing,
        backing_bytes,
        source,
        lazy: w.create.lazy_refcounts,
    };
    let mut model = p.model.clone();
    let out = run_steps(
        mem.clone(),
        &w.setup,
        &mut model,
        &p,
        true,
        w.setup_dirty,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty(), "setup: {:?}", out.errors);
    if let Some(img) = out.img {
        // Left open: flushed, never closed — dirty with lazy refcounts.
        img.flush().expect("setup flush");
        model.flushed();
        p.initial = mem.to_bytes();
        drop(img);
    } else {
        p.initial = mem.to_bytes();
    }
    p.model = model;
    p
}

// ---------------------------------------------------------------------------------------------
// Judging an image.

/// Runs `qemu-img check` on `bytes` (with the backing file beside it).
fn qemu_check(bytes: &[u8], p: &Prepared, w: &Workload) -> Result<(), String> {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    if let (Some((kind, _)), Some(b)) = (w.backing, &p.backing_bytes) {
        std::fs::write(dir.path().join(backing_file_name(kind)), b).map_err(|e| e.to_string())?;
    }
    let o = tool(QEMU_IMG, &["check", "-f", "qcow2", "img.qcow2"], dir.path());
    if o.code == 0 || o.code == 3 {
        Ok(())
    } else {
        Err(format!("qemu-img check finds corruption: {o}"))
    }
}

/// Judges a medium after a crash or failure against the model's durable state.
fn judge(
    bytes: Vec<u8>,
    model: &Model,
    p: &Prepared,
    w: &Workload,
    qemu: bool,
) -> Result<(), String> {
    let mem = Arc::new(MemoryStorage::from_bytes(bytes));
    let before = check(mem.as_ref()).map_err(|e| format!("check failed: {e}"))?;
    if before.dirty && !p.lazy {
        return Err("image is dirty without lazy refcounts".into());
    }
    if !before.dirty {
        if !no_corruption(&before) {
            return Err(format!("check finds corruption: {}", summary(&before)));
        }
        if qemu {
            qemu_check(&mem.to_bytes(), p, w)?;
        }
    }
    let img = open_image(mem.clone(), &p.backing).map_err(|e| format!("open fails: {e}"))?;
    let size = img.size();
    if !model.durable_sizes.contains(&size) {
        return Err(format!("size {size} is none of {:?}", model.durable_sizes));
    }
    let mut buf = vec![0u8; size as usize];
    img.read_at(&mut buf, 0)
        .map_err(|e| format!("read fails: {e}"))?;
    check_sectors(&buf, 0, &model.durable)?;
    img.close().map_err(|e| format!("close fails: {e}"))?;
    drop(img);
    let after = check(mem.as_ref()).map_err(|e| format!("check failed: {e}"))?;
    if !no_corruption(&after) || after.dirty {
        return Err(format!(
            "check after reopen finds corruption: {}",
            summary(&after)
        ));
    }
    if qemu && before.dirty {
        qemu_check(&mem.to_bytes(), p, w)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The drivers.

/// Counts the storage operations of one clean run.
fn count_ops(w: &Workload, p: &Prepared) -> OpCounts {
    let s = Arc::new(CrashStorage::new(p.initial.clone(), None));
    let mut model = p.model.clone();
    let out = run_steps(
        s.clone(),
        &w.steps,
        &mut model,
        p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(
        out.errors.is_empty(),
        "{}: clean run: {:?}",
        w.name,
        out.errors
    );
    // The clean run's result is itself judged (everything flushed: exact).
    judge(s.durable(), &model, p, w, true).unwrap_or_else(|e| panic!("{}: clean run: {e}", w.name));
    s.counts()
}

fn crash_point(
    w: &Workload,
    p: &Prepared,
    point: CrashPoint,
    qemu: bool,
    tally: &mut Tally,
) -> bool {
    let s = Arc::new(CrashStorage::new(p.initial.clone(), Some(point)));
    let mut model = p.model.clone();
    let out = run_steps(
        s.clone(),
        &w.steps,
        &mut model,
        p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(
        s.is_crashed(),
        "{}: {point:?} not reached (the workload's I/O is not deterministic?)",
        w.name
    );
    // No error: the crash came after the last close returned (the flush of `Drop`), when
    // everything was acknowledged already.
    drop(out);
    let seed = crash_seed(point);
    let mut ok = true;
    let sets = s.choice_sets(seed, RANDOM_IMAGES);
    let last = sets.len() - 1;
    for (i, choices) in sets.iter().enumerate() {
        tally.crash_images += 1;
        let q = qemu && i == last;
        tally.qemu_checks += usize::from(q);
        let r = catch_unwind(AssertUnwindSafe(|| {
            judge(s.crash_image(choices), &model, p, w, q)
        }));
        ok &= tally.record(format!("{point:?} images {choices:?}"), r);
    }
    ok
}

fn failure_point(w: &Workload, p: &Prepared, fault: Fault, qemu: bool, tally: &mut Tally) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let mem = Arc::new(MemoryStorage::from_bytes(p.initial.clone()));
        let s = Arc::new(FailingStorage::with_fault(mem.clone(), Some(fault)));
        let mut model = p.model.clone();
        let injected = || s.injected();
        let mut probe = DropProbe {
            injected: Some(&injected),
            faults_in_drop: 0,
        };
        let out = run_steps(s.clone(), &w.steps, &mut model, p, false, true, &mut probe);
        let mut errors = out.errors;
        if let Some(img) = out.img {
            // The open image reads what the model allows, then is closed.
            let size = img.size();
            if size != model.size {
                return Err(format!("open image size {size}, model {}", model.size));
            }
            let mut buf = vec![0u8; size as usize];
            img.read_at(&mut buf, 0)
                .map_err(|e| format!("reading the open image after the fault: {e}"))?;
            check_sectors(&buf, 0, &model.live)
                .map_err(|e| format!("open image: {e}; errors: {errors:?}"))?;
            match img.close() {
                Ok(()) => {
                    model.flushed();
                    probe.drop_closed(img);
                }
                Err(e) => errors.push(format!("close: {e}")),
            }
        }
        // Faults in the flush of `Drop` after a successful close cannot be reported.
        let reportable = s.injected() > probe.faults_in_drop;
        // A failed write or flush must reach the caller; hole punching is best effort.
        if reportable && errors.is_empty() && fault.kind != OpKind::PunchHole {
            return Err(format!("{fault:?} was swallowed: every step succeeded"));
        }
        if s.injected() == 0 {
            return Err("the fault was never reached".into());
        }
        judge(mem.to_bytes(), &model, p, w, qemu).map_err(|e| format!("{e}; errors: {errors:?}"))
    }));
    tally.qemu_checks += usize::from(qemu);
    tally.record(format!("{fault:?}"), r)
}

fn run(w: Workload) {
    let p = prepare(&w);
    let counts = count_ops(&w, &p);
    let mut tally = Tally::default();
    let points = crash_points(&counts);
    let faults = failure_points(&counts);
    let qemu_every = ((points.len() + faults.len()) / QEMU_CHECKS).max(1);
    let mut n = 0usize;
    for &point in &points {
        tally.crash_points += 1;
        n += 1;
        if crash_point(&w, &p, point, n % qemu_every == 0, &mut tally) {
            tally.crash_passed += 1;
        }
    }
    for &fault in &faults {
        tally.failure_points += 1;
        n += 1;
        if failure_point(&w, &p, fault, n % qemu_every == 0, &mut tally) {
            tally.failure_passed += 1;
        }
    }
    eprintln!(
        "{:<22} ops: {} writes, {} flushes, {} set_len, {} punch_hole | crash points {}/{} \
         passed ({} post-crash images) | failure points {}/{} passed | qemu-img checks {}",
        w.name,
        counts.writes,
        counts.flushes,
        counts.set_lens,
        counts.punch_holes,
        tally.crash_passed,
        tally.crash_points,
        tally.crash_images,
        tally.failure_passed,
        tally.failure_points,
        tally.qemu_checks,
    );
    tally.assert_passed(w.name);
}

// ---------------------------------------------------------------------------------------------
// The workloads.

/// `n` steps in debug builds, twice as many in release builds.
fn scaled(n: usize) -> usize {
    if DEBUG {
        n
    } else {
        2 * n
    }
}

fn opts(cluster_size: u64, compat: Compat) -> CreateOptions {
    CreateOptions {
        cluster_size,
        compat,
        ..CreateOptions::default()
    }
}

/// Random writes (partial clusters, crossing clusters), a flush every few steps; `mix` adds
/// zero writes and discards.
fn mixed_steps(rng: &mut Rng, size: u64, n: usize, max_sectors: u64, mix: bool) -> Vec<Step> {
    let mut v = Vec::new();
    let base = 1000 + rng.below(1 << 16) as u32 * 64;
    for i in 0..n {
        let (off, len) = rng.range(size, max_sectors);
        let kind = if mix { rng.below(4) } else { 0 };
        v.push(match kind {
            0 | 1 => Step::Write {
                off,
                len,
                tag: base + i as u32,
            },
            // Half the zero writes and discards cover whole 16 KiB-aligned blocks (whole
            // clusters here), which free clusters; the rest cut clusters partially.
            2 | 3 if rng.below(2) == 0 => {
                let a = off & !(16 * K - 1);
                let len = (len.next_multiple_of(16 * K)).min(size - a);
                if kind == 2 {
                    Step::Zero { off: a, len }
                } else {
                    Step::Discard { off: a, len }
                }
            }
            2 => Step::Zero { off, len },
            _ => Step::Discard { off, len },
        });
        if rng.below(3) == 0 {
            v.push(Step::Flush);
        }
    }
    v
}

fn workload_plain(name: &'static str, create: CreateOptions, mix: bool, seed: u64) -> Workload {
    let size = 256 * K;
    let mut rng = Rng(seed);
    let mut setup = mixed_steps(&mut rng, size, 4, 16, false);
    if mix {
        // Everything allocated, so that zero writes and discards free clusters.
        setup.insert(
            0,
            Step::Write {
                off: 0,
                len: size,
                tag: 999,
            },
        );
    }
    Workload {
        name,
        create,
        size,
        max_size: size,
        backing: None,
        setup,
        setup_dirty: false,
        steps: mixed_steps(&mut rng, size, scaled(8), 20, mix),
        source: None,
    }
}

#[test]
fn allocating_writes() {
    run(workload_plain(
        "allocating_writes",
        opts(4 * K, Compat::V3),
        false,
        1,
    ));
}

#[test]
fn zero_writes_and_discards_v3() {
    run(workload_plain(
        "zero_discard_v3",
        opts(4 * K, Compat::V3),
        true,
        2,
    ));
}

#[test]
fn zero_writes_and_discards_v2() {
    run(workload_plain(
        "zero_discard_v2",
        opts(4 * K, Compat::V2),
        true,
        3,
    ));
}

#[test]
fn extended_l2_subclusters() {
    let mut o = opts(16 * K, Compat::V3);
    o.extended_l2 = true;
    run(workload_plain("extended_l2", o, true, 4));
}

fn workload_backing(name: &'static str, compat: Compat, kind: BackingKind, seed: u64) -> Workload {
    let size = 256 * K;
    let mut rng = Rng(seed);
    Workload {
        name,
        create: opts(4 * K, compat),
        size,
        max_size: size,
        // Shorter than the overlay: past its end the overlay reads zeros.
        backing: Some((kind, 192 * K)),
        setup: Vec::new(),
        setup_dirty: false,
        steps: mixed_steps(&mut rng, size, scaled(9), 12, true),
        source: None,
    }
}

#[test]
fn cow_over_qcow2_backing() {
    run(workload_backing(
        "cow_qcow2_backing_v3",
        Compat::V3,
        BackingKind::Qcow2,
        5,
    ));
}

#[test]
fn cow_over_raw_backing_v2() {
    run(workload_backing(
        "cow_raw_backing_v2",
        Compat::V2,
        BackingKind::Raw,
        6,
    ));
}

/// The header field at `offset` (big-endian, `N` bytes) before and after a clean run.
fn header_field_change<const N: usize>(w: &Workload, offset: usize) -> (u64, u64) {
    let p = prepare(w);
    let s = Arc::new(CrashStorage::new(p.initial.clone(), None));
    let mut model = p.model.clone();
    let out = run_steps(
        s.clone(),
        &w.steps,
        &mut model,
        &p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let field = |b: &[u8]| {
        b[offset..offset + N]
            .iter()
            .fold(0u64, |a, &x| a << 8 | u64::from(x))
    };
    (field(&p.initial), field(&s.durable()))
}

#[test]
fn refcount_table_growth() {
    // 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB and the
    // one-cluster refcount table 2 MiB of the file. The setup fills the file to ~1.8 MiB, so
    // the table grows during the workload.
    let size = 3 * M;
    let mut o = opts(512, Compat::V3);
    o.refcount_bits = 64;
    let chunk = 64 * K;
    let write = |i: u64| Step::Write {
        off: i * chunk,
        len: chunk,
        tag: 200 + i as u32,
    };
    let setup = (0..28).map(write).collect();
    let mut steps = Vec::new();
    for i in 28..if DEBUG { 34 } else { 36 } {
        steps.push(write(i));
        if i % 2 == 1 {
            steps.push(Step::Flush);
        }
    }
    let w = Workload {
        name: "refcount_growth",
        create: o,
        size,
        max_size: size,
        backing: None,
        setup,
        setup_dirty: false,
        steps,
        source: None,
    };
    // refcount_table_clusters (header bytes 56..60) grows during the workload.
    let (before, after) = header_field_change::<4>(&w, 56);
    assert!(
        after > before,
        "refcount table did not grow: {before} -> {after}"
    );
    run(w);
}

#[test]
fn l1_growth_while_writing() {
    // 512-byte clusters: an L2 table covers 32 KiB, one L1 cluster 2 MiB.
    let o = opts(512, Compat::V3);
    let mut steps = Vec::new();
    let sizes: &[u64] = if DEBUG {
        &[3 * M]
    } else {
        &[3 * M, 5 * M, 9 * M]
    };
    let mut prev = M;
    let mut tag = 300;
    for &s in sizes {
        steps.push(Step::Write {
            off: prev - 4 * K,
            len: 4 * K,
            tag,
        });
        steps.push(Step::Resize { size: s });
        steps.push(Step::Write {
            off: s - 6 * K,
            len: 6 * K,
            tag: tag + 1,
        });
        steps.push(Step::Write {
            off: prev + 8 * K,
            len: 2 * K,
            tag: tag + 2,
        });
        steps.push(Step::Flush);
        tag += 3;
        prev = s;
    }
    let w = Workload {
        name: "l1_growth",
        create: o,
        size: M,
        max_size: 9 * M,
        backing: None,
        setup: vec![Step::Write {
            off: 0,
            len: 8 * K,
            tag: 299,
        }],
        setup_dirty: false,
        steps,
        source: None,
    };
    // l1_size (header bytes 36..40) grows past what one L1 cluster holds.
    let (before, after) = header_field_change::<4>(&w, 36);
    assert!(
        after > 64 && after > before,
        "L1 did not grow: {before} -> {after}"
    );
    run(w);
}

#[test]
fn resize_grow_and_shrink() {
    let size = 512 * K;
    let o = opts(4 * K, Compat::V3);
    let w = |off: u64, len: u64, tag: u32| Step::Write { off, len, tag };
    let mut steps = vec![
        w(300 * K, 20 * K, 400),
        w(500 * K, 12 * K, 401),
        Step::Flush,
        // Not cluster-aligned: the last cluster is partial and keeps stale bytes past the end.
        Step::Resize {
            size: 302 * K + 512,
        },
        w(296 * K, 6 * K, 402),
        Step::Resize { size: 400 * K },
        w(390 * K, 10 * K, 403),
    ];
    if !DEBUG {
        steps.extend([
            Step::Flush,
            Step::Resize { size: 64 * K },
            Step::Resize { size: 512 * K },
            w(60 * K, 8 * K, 404),
            Step::Zero {
                off: 100 * K,
                len: 12 * K,
            },
        ]);
    }
    run(Workload {
        name: "resize",
        create: o,
        size,
        max_size: size,
        backing: None,
        setup: vec![w(0, size, 399)],
        setup_dirty: false,
        steps,
        source: None,
    });
}

#[test]
fn lazy_refcounts_dirty_reopen() {
    let size = 256 * K;
    let mut o = opts(4 * K, Compat::V3);
    o.lazy_refcounts = true;
    let mut rng = Rng(7);
    let setup = mixed_steps(&mut rng, size, 6, 16, false);
    let mut steps = mixed_steps(&mut rng, size, scaled(4), 16, true);
    steps.push(Step::Reopen);
    steps.extend(mixed_steps(&mut rng, size, scaled(3), 16, true));
    run(Workload {
        name: "lazy_refcounts",
        create: o,
        size,
        max_size: size,
        backing: None,
        setup,
        // The workload starts from a dirty image: its first open rebuilds the refcounts.
        setup_dirty: true,
        steps,
        source: None,
    });
}

#[test]
fn compressed_writes() {
    let size = 256 * K;
    let cs = 4 * K;
    let o = opts(cs, Compat::V3);
    let mut steps = Vec::new();
    let n = scaled(6) as u64;
    for i in 0..n {
        steps.push(Step::Compressed {
            off: (i * 5 % 64) * cs,
            tag: 500 + i as u32,
        });
        if i % 3 == 2 {
            steps.push(Step::Flush);
        }
    }
    // Partial overwrites of compressed clusters (copy-on-write from the compressed data),
    // discards and recompression over them.
    steps.extend([
        Step::Write {
            off: 5 * cs + 1024,
            len: 1024,
            tag: 550,
        },
        Step::Discard {
            off: 10 * cs,
            len: cs,
        },
        Step::Compressed {
            off: 15 * cs,
            tag: 551,
        },
        Step::Flush,
        Step::Zero {
            off: 20 * cs,
            len: 2 * cs,
        },
    ]);
    run(Workload {
        name: "compressed",
        create: o,
        size,
        max_size: size,
        backing: None,
        setup: Vec::new(),
        setup_dirty: false,
        steps,
        source: None,
    });
}

fn workload_convert(name: &'static str, compress: bool) -> Workload {
    let size = if DEBUG { 192 * K } else { 384 * K };
    // The source: data, zero ranges and unallocated ranges.
    let mut src = Vec::new();
    let mut rng = Rng(8);
    for i in 0..12 {
        let (off, len) = rng.range(size, 64);
        src.push(Step::Write {
            off,
            len,
            tag: SOURCE_TAGS + i,
        });
    }
    src.push(Step::Zero {
        off: 64 * K,
        len: 64 * K,
    });
    Workload {
        name,
        create: opts(4 * K, Compat::V3),
        size,
        max_size: size,
        backing: None,
        setup: Vec::new(),
        setup_dirty: false,
        steps: vec![Step::Convert { compress }],
        source: Some((size, src)),
    }
}

#[test]
fn convert_into_fresh_image() {
    run(workload_convert("convert", false));
}

#[test]
fn convert_compressed_into_fresh_image() {
    run(workload_convert("convert_compressed", true));
}

/// The judge catches what it must: a post-crash image missing flushed data fails.
#[test]
fn the_judge_rejects_lost_flushed_data() {
    let w = workload_plain("judge", opts(4 * K, Compat::V3), false, 9);
    let p = prepare(&w);
    let s = Arc::new(CrashStorage::new(p.initial.clone(), None));
    let mut model = p.model.clone();
    let out = run_steps(
        s.clone(),
        &w.steps,
        &mut model,
        &p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty());
    judge(s.durable(), &model, &p, &w, false).expect("the finished image is sound");
    // The starting image lacks every flushed write of the workload.
    let r = judge(p.initial.clone(), &model, &p, &w, false);
    assert!(r.is_err(), "a stale image passed the judge");
}
