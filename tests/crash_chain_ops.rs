//! Crash safety of the chain operations: flatten, pull, rebase onto another image, and commit
//! (emptying the image or keeping it), with a power loss at every write and every flush index
//! of the files they change (post-crash states drawn with [`CrashStorage::choice_sets`]), and
//! with an EIO or a sticky ENOSPC at every write and flush index.
//!
//! The invariant (issue 11, item 5): after any crash or failure, every image is free of
//! corruption by `ops::check` (leaks allowed) and by `qemu-img check` on a sample, and the top
//! image, opened over whatever chain its header names, reads exactly what it read before the
//! operation: either the old link with the old content or the new link with the same content.

use qcow2kit::device::BlockDevice;
use qcow2kit::engine::{Qcow2Image, Qcow2Options};
use qcow2kit::io::testing::{
    CrashPoint, CrashStorage, FailingStorage, Fault, FaultError, OpKind, SplitMix,
};
use qcow2kit::io::{MemoryStorage, Storage, StorageExt};
use qcow2kit::ops::check::check;
use qcow2kit::ops::commit::commit_chain;
use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
use qcow2kit::ops::rebase::{rebase_chain, BackingLink, NewBase, RebaseOptions};
use qcow2kit::Format;
use std::collections::HashMap;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 4096;
/// Post-crash images tried per crash point and storage, beyond the fixed choice sets.
const RANDOM_CHOICES: usize = 2;
/// Every this many-th post-crash state is also judged by `qemu-img check`.
const QEMU_SAMPLE: usize = 40;

/// The files of the test chain: top → mid → base, and another image to rebase onto.
#[derive(Clone)]
struct Files(HashMap<&'static str, Vec<u8>>);

/// Opens the image on `s` for writing.
fn rw(s: Arc<dyn Storage>) -> qcow2kit::Result<Qcow2Image> {
    Qcow2Image::open_writable(s, &Qcow2Options::default())
}

fn create(backing: Option<&str>) -> (Arc<MemoryStorage>, Qcow2Image) {
    let s = Arc::new(MemoryStorage::new());
    let o = CreateOptions {
        cluster_size: CLUSTER,
        backing_file: backing.map(str::to_string),
        backing_format: backing.map(|_| "qcow2".to_string()),
        ..CreateOptions::default()
    };
    let img = create_qcow2_on(s.clone(), None, SIZE, &o).expect("create test image");
    (s, img)
}

/// Fills random ranges of `img` with data (tag `tag`) and zeros.
fn scribble(img: &Qcow2Image, rng: &mut SplitMix, tag: u8, ranges: usize) {
    for i in 0..ranges {
        let start = rng.below(SIZE / 512) * 512;
        let len = (rng.range(1, 48) * 512).min(SIZE - start);
        if i % 4 == 3 {
            img.write_zeroes(start, len).expect("zero test range");
        } else {
            let mut buf = vec![tag; len as usize];
            rng.fill(&mut buf[..len as usize / 2]);
            img.write_at(&buf, start).expect("write test range");
        }
    }
    img.close().expect("close test image");
}

fn build(seed: u64) -> Files {
    let mut rng = SplitMix::new(seed);
    let (base_s, base) = create(None);
    scribble(&base, &mut rng, 1, 24);
    drop(base);
    let (mid_s, mid) = create(Some("base.qcow2"));
    scribble(&mid, &mut rng, 2, 12);
    drop(mid);
    let (top_s, top) = create(Some("mid.qcow2"));
    scribble(&top, &mut rng, 3, 8);
    drop(top);
    let (other_s, other) = create(None);
    scribble(&other, &mut rng, 1, 16);
    drop(other);
    Files(HashMap::from([
        ("base.qcow2", base_s.to_bytes()),
        ("mid.qcow2", mid_s.to_bytes()),
        ("top.qcow2", top_s.to_bytes()),
        ("other.qcow2", other_s.to_bytes()),
    ]))
}

/// Opens `name` over `storages`, with the chain its header names attached.
fn open_over(
    name: &str,
    storages: &HashMap<&'static str, Arc<dyn Storage>>,
    writable: bool,
    depth: usize,
) -> Result<Arc<Qcow2Image>, String> {
    if depth > 4 {
        return Err("backing chain too deep".into());
    }
    let s = storages.get(name).ok_or(format!("no file {name}"))?;
    let opened = if writable {
        rw(s.clone())
    } else {
        Qcow2Image::open(s.clone(), &Qcow2Options::default())
    };
    let mut img = opened.map_err(|e| format!("open {name}: {e}"))?;
    if let Some(b) = img.backing_file_name() {
        let b = String::from_utf8(b).map_err(|_| "backing name is not UTF-8".to_string())?;
        let dev: Arc<dyn BlockDevice> = open_over(&b, storages, false, depth + 1)?;
        img.set_backing(Some(dev));
    }
    Ok(Arc::new(img))
}

fn read_all(dev: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn memory(files: &Files) -> HashMap<&'static str, Arc<dyn Storage>> {
    files
        .0
        .iter()
        .map(|(k, v)| {
            (
                *k,
                Arc::new(MemoryStorage::from_bytes(v.clone())) as Arc<dyn Storage>,
            )
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Flatten,
    Pull,
    RebaseOther,
    CommitEmptying,
    CommitToBaseKeeping,
}

impl Op {
    /// The files the operation writes.
    fn written(self) -> &'static [&'static str] {
        match self {
            Op::Flatten | Op::Pull | Op::RebaseOther => &["top.qcow2"],
            Op::CommitEmptying => &["top.qcow2", "mid.qcow2"],
            Op::CommitToBaseKeeping => &["top.qcow2", "base.qcow2"],
        }
    }

    /// Runs the operation over `storages` (the written files writable).
    fn run(self, storages: &HashMap<&'static str, Arc<dyn Storage>>) -> Result<(), String> {
        let link = |name: &str| BackingLink {
            name: name.as_bytes().to_vec(),
            format: Format::Qcow2,
        };
        let opts = RebaseOptions {
            workers: 1,
            ..RebaseOptions::default()
        };
        let e = |e: qcow2kit::Error| e.to_string();
        match self {
            Op::Flatten | Op::Pull | Op::RebaseOther => {
                let top = open_over("top.qcow2", storages, true, 0)?;
                let r = match self {
                    Op::Flatten => rebase_chain(&top, NewBase::None, None, &opts),
                    Op::Pull => {
                        rebase_chain(&top, NewBase::InChain(2), Some(&link("base.qcow2")), &opts)
                    }
                    _ => {
                        let other: Arc<dyn BlockDevice> =
                            open_over("other.qcow2", storages, false, 0)?;
                        rebase_chain(
                            &top,
                            NewBase::Device(other),
                            Some(&link("other.qcow2")),
                            &opts,
                        )
                    }
                };
                r.map_err(e)?;
                top.close().map_err(e)
            }
            Op::CommitEmptying | Op::CommitToBaseKeeping => {
                // The base opened writable inside the chain, as `open_for_commit` does.
                let base_name = self.written()[1];
                let base = rw(storages[base_name].clone()).map_err(e)?;
                let base = Arc::new(base);
                let chain: Arc<dyn BlockDevice> = if base_name == "mid.qcow2" {
                    let mut mid = rw(storages["mid.qcow2"].clone()).map_err(e)?;
                    mid.set_backing(Some(open_over("base.qcow2", storages, false, 1)?));
                    drop(base);
                    Arc::new(mid)
                } else {
                    let mut mid =
                        Qcow2Image::open(storages["mid.qcow2"].clone(), &Qcow2Options::default())
                            .map_err(e)?;
                    mid.set_backing(Some(base.clone()));
                    Arc::new(mid)
                };
                let mut top = rw(storages["top.qcow2"].clone()).map_err(e)?;
                top.set_backing(Some(chain.clone()));
                let (depth, keep) = match self {
                    Op::CommitEmptying => (1, false),
                    _ => (2, true),
                };
                commit_chain(&top, depth, keep, 1, None).map_err(e)?;
                top.close().map_err(e)?;
                chain.flush().map_err(e)
            }
        }
    }
}

/// Judges one post-operation state: no corruption anywhere, and the top reads `expected`.
fn judge(files: &Files, expected: &[u8], qemu: bool) -> Result<(), String> {
    for (name, bytes) in &files.0 {
        let r = check(&MemoryStorage::from_bytes(bytes.clone()))
            .map_err(|e| format!("check {name}: {e}"))?;
        if r.corruptions > 0 {
            return Err(format!("{name}: {} corruptions", r.corruptions));
        }
    }
    let storages = memory(files);
    let top = open_over("top.qcow2", &storages, false, 0)?;
    if read_all(top.as_ref())? != expected {
        return Err(format!(
            "top reads differently over {:?}",
            top.backing_file_name()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
        ));
    }
    if qemu {
        qemu_check(files)?;
    }
    Ok(())
}

fn qemu_check(files: &Files) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!(
        "qcow2kit-crash-chain-{}-{}",
        std::process::id(),
        SplitMix::new(files.0["top.qcow2"].len() as u64).next_u64()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = (|| {
        for (name, bytes) in &files.0 {
            std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
        }
        for name in files.0.keys() {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2"])
                .arg(dir.join(name))
                .output()
                .map_err(|e| format!("qemu-img must be installed: {e}"))?;
            // 0: clean; 3: leaked clusters only.
            if !matches!(out.status.code(), Some(0 | 3)) {
                return Err(format!(
                    "qemu-img check {name}: {:?} {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The crash storages of the files an operation writes, by name.
type Crashed = Vec<(&'static str, Arc<CrashStorage>)>;

/// Runs `op` over `files` with crash storages for the written files, crashing at `at`.
/// Returns the crash storages.
fn run_crashing(op: Op, files: &Files, at: Option<CrashPoint>) -> (Crashed, Result<(), String>) {
    let mut storages = memory(files);
    let mut crashed: Crashed = Vec::new();
    for &name in op.written() {
        let s = match crashed.first() {
            None => CrashStorage::new(files.0[name].clone(), at),
            Some((_, first)) => first.sibling(files.0[name].clone()),
        };
        let s = Arc::new(s);
        storages.insert(name, s.clone());
        crashed.push((name, s));
    }
    let r = op.run(&storages);
    (crashed, r)
}

fn crash_all_points(op: Op, seed: u64) {
    let files = build(seed);
    let expected = read_all(
        open_over("top.qcow2", &memory(&files), false, 0)
            .unwrap()
            .as_ref(),
    )
    .expect("read the chain before the operation");
    // A clean run: the operation succeeds and leaves a sound chain; count its operations.
    let (crashed, r) = run_crashing(op, &files, None);
    r.unwrap_or_else(|e| panic!("{op:?} without faults: {e}"));
    let counts = crashed[0].1.counts();
    let mut after = files.clone();
    for (name, s) in &crashed {
        after.0.insert(name, s.durable());
    }
    judge(&after, &expected, true).unwrap_or_else(|e| panic!("{op:?} clean run: {e}"));
    assert!(counts.mutations() > 0, "{op:?} wrote nothing");

    let mut states = 0usize;
    let points = (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush));
    for (k, at) in points.enumerate() {
        let (crashed, _) = run_crashing(op, &files, Some(at));
        let sets: Vec<Vec<Vec<_>>> = crashed
            .iter()
            .map(|(_, s)| s.choice_sets(seed ^ k as u64, RANDOM_CHOICES))
            .collect();
        let n = sets.iter().map(Vec::len).max().unwrap_or(1);
        for i in 0..n {
            let mut state = files.clone();
            for ((name, s), set) in crashed.iter().zip(&sets) {
                state.0.insert(name, s.crash_image(&set[i % set.len()]));
            }
            states += 1;
            judge(&state, &expected, states % QEMU_SAMPLE == 0)
                .unwrap_or_else(|e| panic!("{op:?} crash at {at:?}, choice set {i}: {e}"));
        }
    }
    assert!(states > 0);
}

fn fail_all_points(op: Op, seed: u64) {
    let files = build(seed);
    let expected = read_all(
        open_over("top.qcow2", &memory(&files), false, 0)
            .unwrap()
            .as_ref(),
    )
    .expect("read the chain before the operation");
    let (crashed, _) = run_crashing(op, &files, None);
    let counts = crashed[0].1.counts();
    for kind in [OpKind::Write, OpKind::Flush] {
        for index in 0..counts.get(kind) {
            for (error, sticky) in [(FaultError::Eio, false), (FaultError::Enospc, true)] {
                let fault = Fault {
                    kind,
                    index,
                    error,
                    sticky,
                };
                // One injector over all written files, counting their operations together.
                let mut storages = memory(&files);
                let shared = Arc::new(std::sync::Mutex::new(0u64));
                let mut inners = Vec::new();
                for &name in op.written() {
                    let inner: Arc<dyn Storage> =
                        Arc::new(MemoryStorage::from_bytes(files.0[name].clone()));
                    inners.push((name, inner.clone()));
                    storages.insert(
                        name,
                        Arc::new(Shared {
                            inner: FailingStorage::new(inner),
                            fault,
                            seen: shared.clone(),
                        }),
                    );
                }
                let r = op.run(&storages);
                let mut state = files.clone();
                for (name, inner) in &inners {
                    let len = inner.len().expect("memory length");
                    state
                        .0
                        .insert(name, inner.read_vec(0, len as usize).expect("memory read"));
                }
                judge(&state, &expected, false).unwrap_or_else(|e| {
                    panic!("{op:?} {error:?} at {kind:?} {index} (result {r:?}): {e}")
                });
            }
        }
    }
}

/// A storage failing the `fault.index`-th operation of `fault.kind` counted over every storage
/// sharing `seen` (so one index space covers all files an operation writes).
#[derive(Debug)]
struct Shared {
    inner: FailingStorage,
    fault: Fault,
    seen: Arc<std::sync::Mutex<u64>>,
}

impl Shared {
    fn gate(&self, kind: OpKind) -> std::io::Result<()> {
        if kind != self.fault.kind {
            return Ok(());
        }
        let mut n = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let i = *n;
        *n += 1;
        if i == self.fault.index || (self.fault.sticky && i > self.fault.index) {
            return Err(self.fault.error.to_io());
        }
        Ok(())
    }
}

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.gate(OpKind::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.gate(OpKind::Flush)?;
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

#[test]
fn flatten_survives_every_crash_and_failure() {
    crash_all_points(Op::Flatten, 11);
    fail_all_points(Op::Flatten, 11);
}

#[test]
fn pull_survives_every_crash_and_failure() {
    crash_all_points(Op::Pull, 12);
    fail_all_points(Op::Pull, 12);
}

#[test]
fn rebase_onto_another_image_survives_every_crash_and_failure() {
    crash_all_points(Op::RebaseOther, 13);
    fail_all_points(Op::RebaseOther, 13);
}

#[test]
fn commit_emptying_survives_every_crash_and_failure() {
    crash_all_points(Op::CommitEmptying, 14);
    fail_all_points(Op::CommitEmptying, 14);
}

#[test]
fn commit_to_a_deeper_base_survives_every_crash_and_failure() {
    crash_all_points(Op::CommitToBaseKeeping, 15);
    fail_all_points(Op::CommitToBaseKeeping, 15);
}
