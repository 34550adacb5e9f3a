//! Crash safety and I/O-error handling, by fault injection at every operation.
//!
//! Each workload (allocating writes, copy-on-write over qcow2 and raw backing files, zero writes
//! and discards on v3 and v2, refcount-table growth, L1 growth, resizes, lazy refcounts with the
//! rebuild of a dirty image, compressed writes, extended L2, sub-sector guest writes, convert
//! into a fresh image,
//! copy-on-write over clusters shared with internal snapshots, an external data file, raw or
//! not) is a fixed list of guest operations on an image whose storage is a test double
//! (`qcow2kit::io::testing`). It is run once to count the storage operations it makes, then:
//!
//! - **Crash points**: once per write-type operation index and once per flush index, on a
//!   [`CrashStorage`] that loses power there. From each crash, several post-crash media are
//!   built (the flushed state plus none, all, each single one — for short unflushed sets — and
//!   seeded random subsets of the unflushed writes, some torn at 512-byte boundaries, some
//!   reduced to a random subset of their 512-byte sectors; writes into one sector reach the
//!   medium in order, see [`CrashStorage::crash_image`]).
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
//!   a guest write that covers only part of a sector gives it a composite content (the old
//!   content with those bytes replaced, one per content the sector may read before it), so
//!   two unflushed partial writes into one sector leave it as before, with the first, or with
//!   both — never with the second alone;
//! - for failures: the error reaches the caller (no panic, no silently swallowed write or flush
//!   error), the open image keeps reading what the model allows, and it either refuses later
//!   writes or keeps working;
//! - on a sample of points, `qemu-img check` of the post-crash file finds no corruption (exit 0
//!   or 3).
//! - with internal snapshots: every snapshot, opened read-only on the post-crash image (and
//!   again after the writable open), reads exactly its content when it was taken;
//! - with an external data file: the image and the data file are two [`CrashStorage`]s on one
//!   power supply ([`CrashStorage::sibling`]), so the crash points index the operations of both
//!   and each file keeps its own unflushed writes (chosen independently in a post-crash state);
//!   the failure points target each file in turn. The image is judged with its data file
//!   attached (and beside it for `qemu-img check`).
//!
//! Every workload prints how many crash and failure points it tried and how many passed (run
//! with `--nocapture`). Debug builds run shorter workloads and fewer random crash images.

#[path = "support/crash_helpers.rs"]
mod crash_helpers;
#[path = "support/write_helpers.rs"]
mod write_helpers;

use crash_helpers::{crash_points, crash_seed, failure_points, no_corruption, summary, Tally};
use qcow2kit::crypto::luks::{KdfCost, LuksCreateOptions};
use qcow2kit::crypto::{EncryptionFormat, Passphrase};
use qcow2kit::io::testing::{
    Choice, CrashPoint, CrashStorage, FailingStorage, Fault, OpCounts, OpKind,
};
use qcow2kit::io::{MemoryStorage, Storage};
use qcow2kit::ops::check::check;
use qcow2kit::ops::convert::{self as copy, ConvertOptions, TargetFormat};
use qcow2kit::ops::create::{create_qcow2_on, Compat, CreateEncryption, CreateOptions};
use qcow2kit::{BlockDevice, Error, Qcow2Image, Qcow2Options, RawImage, SnapshotRef};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use write_helpers::{scratch, tool, ToolOut, K, M, QEMU_IMG};

const SECTOR: u64 = 512;
/// Content tag: all zeros.
const ZERO: u32 = 0;
/// Content tag: the backing file's data.
const BACKING: u32 = 1;
/// Tags of the convert source's data start here.
const SOURCE_TAGS: u32 = 1 << 28;
/// Tags of composite contents (see [`composite`]) start here.
const COMPOSITE_TAGS: u32 = 1 << 30;

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

/// Fills `buf` (guest bytes from byte `off`, any alignment) with the content of `tag`: each
/// byte as in the sector it falls in, so a partial write leaves the rest of a sector alone.
fn fill_bytes(buf: &mut [u8], off: u64, tag: u32) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = word(tag, x / SECTOR).to_be_bytes()[(x % 8) as usize];
    }
}

/// A composite content: `under` with bytes `start..end` of the sector from `over`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Composite {
    under: u32,
    over: u32,
    start: u16,
    end: u16,
}

/// The composite contents made so far; tag `COMPOSITE_TAGS + i` is the `i`-th. Shared by the
/// runs (interned, so a replayed workload finds its tags again).
static COMPOSITES: Mutex<Vec<Composite>> = Mutex::new(Vec::new());

/// The tag of `under` with bytes `start..end` of each sector replaced by `over`'s.
fn composite(under: u32, over: u32, start: u64, end: u64) -> u32 {
    if under == over {
        return under;
    }
    let c = Composite {
        under,
        over,
        start: start as u16,
        end: end as u16,
    };
    let mut all = COMPOSITES.lock().unwrap_or_else(|e| e.into_inner());
    let i = all.iter().position(|x| *x == c).unwrap_or_else(|| {
        all.push(c);
        all.len() - 1
    });
    COMPOSITE_TAGS + i as u32
}

/// The 512 bytes of sector `sector` with content `tag`.
fn content(tag: u32, sector: u64) -> Vec<u8> {
    if tag < COMPOSITE_TAGS {
        return word(tag, sector)
            .to_be_bytes()
            .repeat((SECTOR / 8) as usize);
    }
    let c = COMPOSITES.lock().unwrap_or_else(|e| e.into_inner())[(tag - COMPOSITE_TAGS) as usize];
    let (a, b) = (usize::from(c.start), usize::from(c.end));
    let mut v = content(c.under, sector);
    v[a..b].copy_from_slice(&content(c.over, sector)[a..b]);
    v
}

/// Which of `candidates` the sector holds, if any.
fn identify(buf: &[u8], sector: u64, candidates: &[u32]) -> Option<u32> {
    let w = u64::from_be_bytes(buf[..8].try_into().ok()?);
    let uniform = buf.chunks(8).all(|c| c == &w.to_be_bytes()[..c.len()]);
    let plain = candidates.iter().copied().filter(|&t| t < COMPOSITE_TAGS);
    let mut composites = candidates.iter().copied().filter(|&t| t >= COMPOSITE_TAGS);
    (if uniform {
        plain.into_iter().find(|&t| word(t, sector) == w)
    } else {
        None
    })
    .or_else(|| composites.find(|&t| content(t, sector) == buf))
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

    /// The step completed: the open image reads its new content (one of them, for a sector
    /// listed more than once: a partial write over a sector that may read as several).
    fn commit(&mut self, effect: &[(u64, u32)]) {
        for &(s, _) in effect {
            self.live[s as usize].clear();
        }
        for &(s, t) in effect {
            add(&mut self.live[s as usize], t);
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
    /// A write at any byte offset and of any length: the sectors it covers only in part get
    /// composite contents.
    WriteBytes {
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
    /// Internal snapshots taken (by `qemu-img snapshot -c`) after the setup, each followed by
    /// steps that change the active image, so that the snapshots and the active image share
    /// clusters that the workload's steps then copy on write.
    snapshots: Vec<(&'static str, Vec<Step>)>,
    /// An external data file (`Some(data_file_raw)`).
    data_file: Option<bool>,
}

/// The name the image records for its external data file.
const DATA_FILE: &str = "data.raw";

/// The storages of an image: the image file and its external data file, if any.
#[derive(Clone)]
struct Media {
    image: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
}

impl Media {
    fn new(image: Arc<dyn Storage>, data: Option<Arc<dyn Storage>>) -> Self {
        Media { image, data }
    }

    /// In-memory storages holding `bytes`.
    fn memory(
        bytes: &(Vec<u8>, Option<Vec<u8>>),
    ) -> (Arc<MemoryStorage>, Option<Arc<MemoryStorage>>) {
        (
            Arc::new(MemoryStorage::from_bytes(bytes.0.clone())),
            bytes
                .1
                .clone()
                .map(|d| Arc::new(MemoryStorage::from_bytes(d))),
        )
    }
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
    /// The starting content of the external data file.
    data_initial: Option<Vec<u8>>,
    /// Each snapshot's name and the content of its sectors (exact: a snapshot never changes).
    snapshots: Vec<(String, Vec<u32>)>,
    /// The image is encrypted under [`PW`].
    encrypted: bool,
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

/// The passphrase of the encrypted workloads' images.
const PW: &str = "crash pass";

/// Options opening the image of `p`: with the passphrase when it is encrypted.
fn image_options(p: &Prepared) -> Qcow2Options {
    let mut o = Qcow2Options::default();
    if p.encrypted {
        o.encryption.passphrase = Some(Passphrase::new(PW));
    }
    o
}

/// LUKS (aes-256-xts-plain64, cheap key slots) or legacy AES encryption under [`PW`].
fn encryption(format: EncryptionFormat) -> Option<CreateEncryption> {
    Some(CreateEncryption {
        format,
        passphrase: Passphrase::new(PW),
        luks: LuksCreateOptions {
            kdf: KdfCost::Iterations {
                master: 1000,
                slot: 1000,
            },
            ..LuksCreateOptions::default()
        },
    })
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
        Step::WriteBytes { off, len, tag } => {
            let end = off + len;
            (off / SECTOR..end.div_ceil(SECTOR))
                .flat_map(|s| {
                    let a = off.max(s * SECTOR) - s * SECTOR;
                    let b = end.min((s + 1) * SECTOR) - s * SECTOR;
                    if b - a == SECTOR {
                        return vec![(s, tag)];
                    }
                    let under = &model.live[s as usize];
                    under
                        .iter()
                        .map(|&u| (s, composite(u, tag, a, b)))
                        .collect()
                })
                .collect()
        }
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

fn open_image(media: &Media, p: &Prepared) -> Result<Qcow2Image, Error> {
    let mut img = Qcow2Image::open_writable(media.image.clone(), &image_options(p))?;
    img.set_backing(p.backing.clone());
    if let Some(d) = &media.data {
        img.set_data_file(d.clone());
    }
    Ok(img)
}

/// Runs one step on `img`, updating the model. Errors are returned after the model has
/// recorded the step as failed.
fn run_step(
    img: &mut Option<Qcow2Image>,
    storage: &Media,
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
        *img = Some(open_image(storage, p)?);
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
        Step::WriteBytes { off, len, tag } => {
            let mut buf = vec![0u8; len as usize];
            fill_bytes(&mut buf, off, tag);
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
            // As the old default of the qcow2 copy: a thick copy (every cluster written).
            let opts = ConvertOptions {
                format: TargetFormat::Qcow2(CreateOptions::default()),
                workers: 1,
                compress,
                zero_granularity: 0,
                ..ConvertOptions::default()
            };
            copy::convert(src.as_ref(), copy::Target::Image(dev), &opts)
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
    storage: Media,
    steps: &[Step],
    model: &mut Model,
    p: &Prepared,
    stop_on_error: bool,
    keep_open: bool,
    probe: &mut DropProbe<'_>,
) -> RunOutcome {
    let mut out = RunOutcome::default();
    let mut img = match open_image(&storage, p) {
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
            data_initial: None,
            snapshots: Vec::new(),
            encrypted: false,
        };
        let out = run_steps(
            Media::new(mem.clone(), None),
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
    let data_mem = w.data_file.map(|raw| {
        create.data_file = Some(DATA_FILE.into());
        create.data_file_raw = raw;
        Arc::new(MemoryStorage::new())
    });
    let data_dyn = data_mem.clone().map(|d| d as Arc<dyn Storage>);
    drop(create_qcow2_on(mem.clone(), data_dyn.clone(), w.size, &create).expect("create"));
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
        data_initial: None,
        snapshots: Vec::new(),
        encrypted: w.create.encryption.is_some(),
    };
    let mut model = p.model.clone();
    let out = run_steps(
        Media::new(mem.clone(), data_dyn.clone()),
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
    for (name, steps) in &w.snapshots {
        let dir = scratch();
        let path = dir.path().join("img.qcow2");
        std::fs::write(&path, &p.initial).expect("write image");
        let o = qemu_img_on_image(&["snapshot", "-c", name], p.encrypted, dir.path());
        assert_eq!(o.code, 0, "qemu-img snapshot -c {name}: {o}");
        let bytes = std::fs::read(&path).expect("read image");
        let tags = model.live[..(w.size / SECTOR) as usize]
            .iter()
            .map(|s| s[0])
            .collect();
        p.snapshots.push((name.to_string(), tags));
        let mem = Arc::new(MemoryStorage::from_bytes(bytes));
        let out = run_steps(
            Media::new(mem.clone(), None),
            steps,
            &mut model,
            &p,
            true,
            false,
            &mut DropProbe::none(),
        );
        assert!(
            out.errors.is_empty(),
            "after snapshot {name}: {:?}",
            out.errors
        );
        p.initial = mem.to_bytes();
    }
    p.data_initial = data_mem.map(|d| d.to_bytes());
    p.model = model;
    p
}

// ---------------------------------------------------------------------------------------------
// Judging an image.

/// Runs `qemu-img ARGS… img.qcow2` in `dir`, with the key when the image is encrypted.
fn qemu_img_on_image(args: &[&str], encrypted: bool, dir: &std::path::Path) -> ToolOut {
    let secret = format!("secret,id=k,data={PW}");
    let image = "driver=qcow2,file.filename=img.qcow2,encrypt.key-secret=k";
    let mut all = args.to_vec();
    if encrypted {
        all.extend(["--object", &secret, "--image-opts", image]);
    } else {
        all.extend(["-f", "qcow2", "img.qcow2"]);
    }
    tool(QEMU_IMG, &all, dir)
}

/// Runs `qemu-img check` on `bytes` (with the backing file beside it).
fn qemu_check(bytes: &[u8], data: Option<&[u8]>, p: &Prepared, w: &Workload) -> Result<(), String> {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    if let Some(d) = data {
        std::fs::write(dir.path().join(DATA_FILE), d).map_err(|e| e.to_string())?;
    }
    if let (Some((kind, _)), Some(b)) = (w.backing, &p.backing_bytes) {
        std::fs::write(dir.path().join(backing_file_name(kind)), b).map_err(|e| e.to_string())?;
    }
    let o = qemu_img_on_image(&["check"], p.encrypted, dir.path());
    if o.code == 0 || o.code == 3 {
        Ok(())
    } else {
        Err(format!("qemu-img check finds corruption: {o}"))
    }
}

/// Judges a medium after a crash or failure against the model's durable state.
fn judge(
    bytes: (Vec<u8>, Option<Vec<u8>>),
    model: &Model,
    p: &Prepared,
    w: &Workload,
    qemu: bool,
) -> Result<(), String> {
    let (mem, data) = Media::memory(&bytes);
    let media = Media::new(mem.clone(), data.clone().map(|d| d as Arc<dyn Storage>));
    let data_bytes = || data.as_ref().map(|d| d.to_bytes());
    let before = check(mem.as_ref()).map_err(|e| format!("check failed: {e}"))?;
    if before.dirty && !p.lazy {
        return Err("image is dirty without lazy refcounts".into());
    }
    if !before.dirty {
        if !no_corruption(&before) {
            return Err(format!("check finds corruption: {}", summary(&before)));
        }
        if qemu {
            qemu_check(&mem.to_bytes(), data_bytes().as_deref(), p, w)?;
        }
        check_snapshots(&mem, p).map_err(|e| format!("post-crash image: {e}"))?;
    }
    let img = open_image(&media, p).map_err(|e| format!("open fails: {e}"))?;
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
    check_snapshots(&mem, p).map_err(|e| format!("after reopen: {e}"))?;
    if qemu && before.dirty {
        qemu_check(&mem.to_bytes(), data_bytes().as_deref(), p, w)?;
    }
    Ok(())
}

/// Every snapshot reads exactly its content when it was taken.
fn check_snapshots(mem: &Arc<MemoryStorage>, p: &Prepared) -> Result<(), String> {
    for (name, tags) in &p.snapshots {
        let snapshot = SnapshotRef::Name(name.clone());
        let mut img = Qcow2Image::open_snapshot(mem.clone(), &snapshot, &image_options(p))
            .map_err(|e| format!("snapshot {name} does not open: {e}"))?;
        img.set_backing(p.backing.clone());
        let size = tags.len() as u64 * SECTOR;
        if img.size() != size {
            return Err(format!(
                "snapshot {name} has size {}, not {size}",
                img.size()
            ));
        }
        let mut buf = vec![0u8; size as usize];
        img.read_at(&mut buf, 0)
            .map_err(|e| format!("reading snapshot {name} fails: {e}"))?;
        let sets: Vec<Vec<u32>> = tags.iter().map(|&t| vec![t]).collect();
        check_sectors(&buf, 0, &sets).map_err(|e| format!("snapshot {name}: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The drivers.

/// Crash storages holding the starting image (and data file), on one power supply.
fn crash_media(
    p: &Prepared,
    point: Option<CrashPoint>,
) -> (Arc<CrashStorage>, Option<Arc<CrashStorage>>, Media) {
    let s = Arc::new(CrashStorage::new(p.initial.clone(), point));
    let d = p.data_initial.clone().map(|b| Arc::new(s.sibling(b)));
    let media = Media::new(s.clone(), d.clone().map(|d| d as Arc<dyn Storage>));
    (s, d, media)
}

/// The media as of the last completed flush of each storage.
fn durable(s: &CrashStorage, d: &Option<Arc<CrashStorage>>) -> (Vec<u8>, Option<Vec<u8>>) {
    (s.durable(), d.as_ref().map(|d| d.durable()))
}

/// Which storage a failure point targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Image,
    DataFile,
}

/// Counts the storage operations of one clean run: of both storages together (the crash
/// points), and of each one (the failure points).
fn count_ops(w: &Workload, p: &Prepared) -> (OpCounts, OpCounts, OpCounts) {
    // One run of the workload on `media` that must see no error; returns its model.
    let clean_run = |media: Media| {
        let mut model = p.model.clone();
        let out = run_steps(
            media,
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
        model
    };
    let (s, d, media) = crash_media(p, None);
    let model = clean_run(media);
    // The clean run's result is itself judged (everything flushed: exact).
    judge(durable(&s, &d), &model, p, w, true)
        .unwrap_or_else(|e| panic!("{}: clean run: {e}", w.name));
    let total = s.counts();
    // Per storage: the same run on failing storages that never fail.
    let fs = Arc::new(FailingStorage::new(Arc::new(MemoryStorage::from_bytes(
        p.initial.clone(),
    ))));
    let fd = p
        .data_initial
        .clone()
        .map(|b| Arc::new(FailingStorage::new(Arc::new(MemoryStorage::from_bytes(b)))));
    clean_run(Media::new(
        fs.clone(),
        fd.clone().map(|d| d as Arc<dyn Storage>),
    ));
    let data = fd.map_or_else(OpCounts::default, |d| d.counts());
    (total, fs.counts(), data)
}

/// Post-crash states of the image and its data file: the data file's choices are drawn
/// independently (a flush of one file says nothing of the other's writes) and paired with the
/// image's, both none and both all included, and each all with the other none.
fn paired_sets(
    s: &CrashStorage,
    d: &Option<Arc<CrashStorage>>,
    seed: u64,
) -> Vec<(Vec<Choice>, Vec<Choice>)> {
    let a = s.choice_sets(seed, RANDOM_IMAGES);
    let Some(d) = d else {
        return a.into_iter().map(|c| (c, Vec::new())).collect();
    };
    let b = d.choice_sets(seed ^ 0x5eed, RANDOM_IMAGES);
    let mut v: Vec<(Vec<Choice>, Vec<Choice>)> = (0..a.len().max(b.len()))
        .map(|i| (a[i % a.len()].clone(), b[i % b.len()].clone()))
        .collect();
    // choice_sets starts with none, then all.
    v.push((a[0].clone(), b[1 % b.len()].clone()));
    v.push((a[1 % a.len()].clone(), b[0].clone()));
    let mut seen = std::collections::HashSet::new();
    v.retain(|c| seen.insert(c.clone()));
    v
}

fn crash_point(
    w: &Workload,
    p: &Prepared,
    point: CrashPoint,
    qemu: bool,
    tally: &mut Tally,
) -> bool {
    let (s, d, media) = crash_media(p, Some(point));
    let mut model = p.model.clone();
    let out = run_steps(
        media,
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
    let sets = paired_sets(&s, &d, seed);
    let last = sets.len() - 1;
    for (i, (choices, data_choices)) in sets.iter().enumerate() {
        tally.crash_images += 1;
        let q = qemu && i == last;
        tally.qemu_checks += usize::from(q);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let bytes = (
                s.crash_image(choices),
                d.as_ref().map(|d| d.crash_image(data_choices)),
            );
            judge(bytes, &model, p, w, q)
        }));
        ok &= tally.record(format!("{point:?} images {choices:?}"), r);
    }
    ok
}

fn failure_point(
    w: &Workload,
    p: &Prepared,
    (target, fault): (Target, Fault),
    qemu: bool,
    tally: &mut Tally,
) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let (mem, data) = Media::memory(&(p.initial.clone(), p.data_initial.clone()));
        let fault_on = |t: Target| Some(fault).filter(|_| t == target);
        let s = Arc::new(FailingStorage::with_fault(
            mem.clone(),
            fault_on(Target::Image),
        ));
        let fd = data
            .clone()
            .map(|d| Arc::new(FailingStorage::with_fault(d, fault_on(Target::DataFile))));
        let media = Media::new(s.clone(), fd.clone().map(|d| d as Arc<dyn Storage>));
        let s: Arc<FailingStorage> = match (target, &fd) {
            (Target::DataFile, Some(d)) => d.clone(),
            _ => s,
        };
        let mut model = p.model.clone();
        let injected = || s.injected();
        let mut probe = DropProbe {
            injected: Some(&injected),
            faults_in_drop: 0,
        };
        let out = run_steps(media, &w.steps, &mut model, p, false, true, &mut probe);
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
        let bytes = (mem.to_bytes(), data.map(|d| d.to_bytes()));
        judge(bytes, &model, p, w, qemu).map_err(|e| format!("{e}; errors: {errors:?}"))
    }));
    tally.qemu_checks += usize::from(qemu);
    tally.record(format!("{target:?} {fault:?}"), r)
}

fn run(w: Workload) {
    let p = prepare(&w);
    let (counts, image_counts, data_counts) = count_ops(&w, &p);
    let mut tally = Tally::default();
    let points = crash_points(&counts);
    let faults: Vec<(Target, Fault)> = failure_points(&image_counts)
        .into_iter()
        .map(|f| (Target::Image, f))
        .chain(
            failure_points(&data_counts)
                .into_iter()
                .map(|f| (Target::DataFile, f)),
        )
        .collect();
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
/// Where the sub-sector workloads' setup allocates clusters (32 KiB of them).
const SUB_SECTOR_ALLOCATED: u64 = 160 * K;

/// Guest writes of odd lengths at odd offsets over an image of `size` (clusters of `cs`) whose
/// first 128 KiB come from a backing file and whose [`SUB_SECTOR_ALLOCATED`] range is
/// allocated: fixed ones, then `n` random ones, a flush every few.
fn sub_sector_steps(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<Step> {
    let w = |off: u64, len: u64, tag: u32| Step::WriteBytes { off, len, tag };
    let at = SUB_SECTOR_ALLOCATED;
    let mut v = vec![
        // Over the backing file: copy-on-write of the head and tail.
        w(7, 100, 2000),
        // Across a cluster boundary, over the backing file.
        w(2 * cs - 333, 777, 2001),
        // In place over allocated clusters.
        w(at + 1001, 4097, 2002),
        // Two partial writes into one sector, no flush between: after a crash the sector holds
        // neither, the first, or both (never the second alone).
        w(at + 5000, 10, 2003),
        w(at + 5020, 30, 2004),
        Step::Flush,
        // An unallocated cluster past the backing file's end (reads as zeros), one byte, then
        // across a sector boundary of the cluster just allocated.
        w(size - 40 * K + 3, 1, 2005),
        w(size - 40 * K + 450, 100, 2006),
        w(3 * cs - 2000, 4097, 2007),
        Step::Flush,
    ];
    for i in 0..n {
        let len = [1, 100, 777, 4097, 1 + rng.below(3000)][rng.below(5) as usize];
        let off = rng.below(size - len) | 1;
        v.push(w(off, len, 2100 + i as u32));
        if rng.below(3) == 0 {
            v.push(Step::Flush);
        }
    }
    v
}

fn workload_sub_sector(name: &'static str, create: CreateOptions, seed: u64) -> Workload {
    let size = 256 * K;
    let cs = create.cluster_size;
    Workload {
        name,
        create,
        size,
        max_size: size,
        backing: Some((BackingKind::Qcow2, 128 * K)),
        setup: vec![Step::Write {
            off: SUB_SECTOR_ALLOCATED,
            len: 32 * K,
            tag: 999,
        }],
        setup_dirty: false,
        steps: sub_sector_steps(&mut Rng(seed), size, cs, scaled(6)),
        source: None,
        snapshots: Vec::new(),
        data_file: None,
    }
}

#[test]
fn sub_sector_writes() {
    run(workload_sub_sector(
        "sub_sector_writes",
        opts(4 * K, Compat::V3),
        8,
    ));
}

#[test]
fn sub_sector_writes_extended_l2() {
    let mut o = opts(16 * K, Compat::V3);
    o.extended_l2 = true;
    run(workload_sub_sector("sub_sector_extended_l2", o, 9));
}

/// The header field at `offset` (big-endian, `N` bytes) before and after a clean run.
fn header_field_change<const N: usize>(w: &Workload, offset: usize) -> (u64, u64) {
    let p = prepare(w);
    let (s, _, media) = crash_media(&p, None);
    let mut model = p.model.clone();
    let out = run_steps(
        media,
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
        snapshots: Vec::new(),
        data_file: None,
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
    let (s, d, media) = crash_media(&p, None);
    let mut model = p.model.clone();
    let out = run_steps(
        media,
        &w.steps,
        &mut model,
        &p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty());
    judge(durable(&s, &d), &model, &p, &w, false).expect("the finished image is sound");
    // The starting image lacks every flushed write of the workload.
    let r = judge((p.initial.clone(), None), &model, &p, &w, false);
    assert!(r.is_err(), "a stale image passed the judge");
}

/// Writes, zero writes and discards, each either of whole clusters (one or two, aligned) or of
/// a random sector range (partial clusters, crossing clusters); a flush every few steps.
fn cluster_steps(rng: &mut Rng, size: u64, cs: u64, n: usize, base: u32) -> Vec<Step> {
    let clusters = size / cs;
    let mut v = Vec::new();
    for i in 0..n {
        let (off, len) = if rng.below(2) == 0 {
            let c = rng.below(clusters);
            (c * cs, (1 + rng.below(2.min(clusters - c))) * cs)
        } else {
            rng.range(size, (2 * cs / SECTOR).min(160))
        };
        v.push(match rng.below(5) {
            0..=2 => Step::Write {
                off,
                len,
                tag: base + i as u32,
            },
            3 => Step::Zero { off, len },
            _ => Step::Discard { off, len },
        });
        if rng.below(3) == 0 {
            v.push(Step::Flush);
        }
    }
    v
}

/// An image whose clusters are all shared with one or two internal snapshots (taken by
/// `qemu-img snapshot -c`), then writes, zero writes and discards over them: every cluster
/// the workload touches has a refcount above 1 and must be copied on write, never written in
/// place (rule 6); a freed cluster's refcount drops to the snapshots' count only. Judged also:
/// every snapshot reads its original content on every post-crash image.
fn workload_snapshots(
    name: &'static str,
    create: CreateOptions,
    size: u64,
    two: bool,
    seed: u64,
) -> Workload {
    let cs = create.cluster_size;
    let mut rng = Rng(seed);
    let setup = vec![Step::Write {
        off: 0,
        len: size,
        tag: 600,
    }];
    let mut snapshots = vec![("s1", cluster_steps(&mut rng, size, cs, 3, 610))];
    if two {
        snapshots.push(("s2", cluster_steps(&mut rng, size, cs, 3, 620)));
    }
    Workload {
        name,
        create,
        size,
        max_size: size,
        backing: None,
        setup,
        setup_dirty: false,
        steps: cluster_steps(&mut rng, size, cs, scaled(6), 700),
        source: None,
        snapshots,
        data_file: None,
    }
}

#[test]
fn cow_over_snapshots_v3_64k() {
    run(workload_snapshots(
        "snapshots_64k",
        opts(64 * K, Compat::V3),
        512 * K,
        true,
        10,
    ));
}

#[test]
fn cow_over_snapshots_512b_refcount16() {
    let mut o = opts(512, Compat::V3);
    o.refcount_bits = 16;
    run(workload_snapshots("snapshots_512b", o, 32 * K, true, 11));
}

#[test]
fn cow_over_snapshots_extended_l2() {
    let mut o = opts(32 * K, Compat::V3);
    o.extended_l2 = true;
    run(workload_snapshots(
        "snapshots_ext_l2",
        o,
        256 * K,
        false,
        12,
    ));
}

/// An image with an external data file: allocating writes, zero writes and discards (whole
/// clusters and partial) over a fully written image, with flushes. One power supply for the
/// two files ([`CrashStorage::sibling`]): every operation of either is a crash point, and a
/// post-crash state picks the unflushed writes of each file independently.
fn workload_data_file(name: &'static str, raw: bool, seed: u64) -> Workload {
    let size = 256 * K;
    let cs = 4 * K;
    let mut rng = Rng(seed);
    let mut setup = cluster_steps(&mut rng, size, cs, 3, 800);
    // Half the image allocated, so that the workload both allocates and frees.
    setup.insert(
        0,
        Step::Write {
            off: 0,
            len: size / 2,
            tag: 799,
        },
    );
    Workload {
        name,
        create: opts(cs, Compat::V3),
        size,
        max_size: size,
        backing: None,
        setup,
        setup_dirty: false,
        steps: cluster_steps(&mut rng, size, cs, scaled(7), 900),
        source: None,
        snapshots: Vec::new(),
        data_file: Some(raw),
    }
}

#[test]
fn external_data_file_raw() {
    run(workload_data_file("data_file_raw", true, 13));
}

#[test]
fn external_data_file_not_raw() {
    run(workload_data_file("data_file", false, 14));
}

/// The judge catches what it must on the new workloads: a snapshot that does not read its
/// original content, and a data file missing flushed writes.
#[test]
fn the_judge_rejects_changed_snapshots_and_stale_data_files() {
    let mut o = opts(512, Compat::V3);
    o.refcount_bits = 16;
    let w = workload_snapshots("judge_snapshots", o, 32 * K, true, 11);
    let mut p = prepare(&w);
    assert_eq!(p.snapshots.len(), 2);
    let bytes = (p.initial.clone(), None);
    judge(bytes.clone(), &p.model, &p, &w, false).expect("the starting image is sound");
    // s1 and s2 differ (the steps between them wrote): s1's content is not s2's.
    assert_ne!(p.snapshots[0].1, p.snapshots[1].1);
    p.snapshots[0].1 = p.snapshots[1].1.clone();
    assert!(judge(bytes, &p.model, &p, &w, false).is_err());

    let w = workload_data_file("judge_data_file", false, 14);
    let p = prepare(&w);
    let (s, d, media) = crash_media(&p, None);
    let mut model = p.model.clone();
    let out = run_steps(
        media,
        &w.steps,
        &mut model,
        &p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty());
    let (image, data) = durable(&s, &d);
    assert_ne!(data, p.data_initial, "the workload writes to the data file");
    judge((image.clone(), data), &model, &p, &w, false).expect("the finished image is sound");
    assert!(judge((image, p.data_initial.clone()), &model, &p, &w, false).is_err());
}

// ---------------------------------------------------------------------------------------------
// Encrypted images: the same judge, opening with the key (the sectors it checks are the
// decrypted ones; `qemu-img check` and `snapshot -c` get the key too).

/// `w` on an image encrypted with `format`. Debug builds keep the first [`DEBUG_LUKS_STEPS`]
/// steps of a LUKS workload: every judged open unlocks a key slot, which unoptimised code
/// takes tens of milliseconds to do.
fn encrypted(mut w: Workload, format: EncryptionFormat) -> Workload {
    w.create.encryption = encryption(format);
    if DEBUG && format == EncryptionFormat::Luks {
        w.steps.truncate(DEBUG_LUKS_STEPS);
    }
    w
}

/// See [`encrypted`].
const DEBUG_LUKS_STEPS: usize = 6;

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow unoptimised (a key-slot unlock per judged open): run with --release"
)]
fn luks_writes_zero_writes_and_discards() {
    run(encrypted(
        workload_plain("luks_zero_discard", opts(4 * K, Compat::V3), true, 21),
        EncryptionFormat::Luks,
    ));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow unoptimised (a key-slot unlock per judged open): run with --release"
)]
fn luks_cow_over_plain_qcow2_backing() {
    run(encrypted(
        workload_backing("luks_cow_backing", Compat::V3, BackingKind::Qcow2, 22),
        EncryptionFormat::Luks,
    ));
}

/// Sub-sector guest writes are widened to whole sectors of ciphertext (read, decrypt, merge,
/// encrypt): a crash leaves each sector old or new, never a torn mix of plaintexts.
#[test]
fn luks_sub_sector_writes() {
    run(encrypted(
        workload_sub_sector("luks_sub_sector", opts(4 * K, Compat::V3), 23),
        EncryptionFormat::Luks,
    ));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow unoptimised (a key-slot unlock per judged open): run with --release"
)]
fn luks_cow_over_snapshots() {
    run(encrypted(
        workload_snapshots(
            "luks_snapshots",
            opts(4 * K, Compat::V3),
            128 * K,
            false,
            24,
        ),
        EncryptionFormat::Luks,
    ));
}

#[test]
fn legacy_aes_writes_zero_writes_and_discards() {
    run(encrypted(
        workload_plain("aes_zero_discard", opts(4 * K, Compat::V3), true, 25),
        EncryptionFormat::Aes,
    ));
}

/// The judge of the encrypted workloads reads decrypted data: the finished image holds none of
/// the workload's plaintext sectors, does not open without the key, and passes the judge with it.
#[test]
fn the_encrypted_judge_decrypts() {
    let w = encrypted(
        workload_plain("judge_luks", opts(4 * K, Compat::V3), false, 26),
        EncryptionFormat::Luks,
    );
    let p = prepare(&w);
    let (s, d, media) = crash_media(&p, None);
    let mut model = p.model.clone();
    let out = run_steps(
        media,
        &w.steps,
        &mut model,
        &p,
        true,
        false,
        &mut DropProbe::none(),
    );
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let bytes = durable(&s, &d);
    let words: std::collections::HashSet<[u8; 8]> = model
        .durable
        .iter()
        .enumerate()
        .filter(|(_, set)| set[0] != ZERO)
        .map(|(sector, set)| word(set[0], sector as u64).to_be_bytes())
        .collect();
    assert!(words.len() > 50, "the workload writes data");
    let plain = bytes
        .0
        .chunks(8)
        .filter(|c| c.len() == 8 && words.contains(*c))
        .count();
    assert_eq!(
        plain, 0,
        "plaintext words of the guest data are in the file"
    );
    let mem = Arc::new(MemoryStorage::from_bytes(bytes.0.clone()));
    let plain_opts = Qcow2Options::default();
    assert!(matches!(
        Qcow2Image::open(mem, &plain_opts),
        Err(Error::EncryptedNoKey { method: "luks" })
    ));
    judge(bytes, &model, &p, &w, true).expect("the finished image is sound");
    // The starting image lacks every flushed write: the decrypting judge rejects it.
    let r = judge((p.initial.clone(), None), &model, &p, &w, false);
    assert!(r.is_err(), "a stale encrypted image passed the judge");
}
