//! Crash safety of the snapshot operations: create, apply and delete, with a power loss at
//! every write and every flush index (post-crash states drawn with
//! [`CrashStorage::choice_sets`]), and with an EIO or a sticky ENOSPC at every write and flush
//! index; at 4 KiB, 512-byte and extended-L2 (16 KiB) clusters, over images holding compressed
//! clusters, zeroed and discarded ranges.
//!
//! The invariant (issue 12, item 4): after any crash or failure the image has no corruption by
//! `ops::check` (leaks allowed; `qemu-img check` on a sample) — for an image a snapshot create
//! left dirty (it works in place, as QEMU lays it out), once a writable open has repaired it —
//! and it is in the old state or the new one: every snapshot it lists reads what it held when it was made, and the active image
//! reads the old content or the new one (the applied snapshot's).

use qcow2kit::device::BlockDevice;
use qcow2kit::engine::{Qcow2Image, Qcow2Options};
use qcow2kit::io::testing::{
    CrashPoint, CrashStorage, FailingStorage, Fault, FaultError, OpKind, SplitMix,
};
use qcow2kit::io::{MemoryStorage, Storage, StorageExt};
use qcow2kit::ops::check::check;
use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
use qcow2kit::{NewSnapshot, SnapshotRef};
use std::collections::BTreeMap;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
/// Post-crash images tried per crash point, beyond the fixed choice sets.
const RANDOM_CHOICES: usize = 2;
/// Every this many-th post-crash state is also judged by `qemu-img check`.
const QEMU_SAMPLE: usize = 40;

#[derive(Debug, Clone, Copy)]
enum Layout {
    Clusters4k,
    Clusters512,
    ExtendedL2,
}

impl Layout {
    fn options(self) -> CreateOptions {
        let (cluster_size, extended_l2) = match self {
            Layout::Clusters4k => (4096, false),
            Layout::Clusters512 => (512, false),
            Layout::ExtendedL2 => (16384, true),
        };
        CreateOptions {
            cluster_size,
            extended_l2,
            ..CreateOptions::default()
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Apply,
    /// Deletes `s1`, which `s2` and the active image share clusters with.
    DeleteShared,
    /// Deletes `s2`, the newest.
    DeleteNewest,
}

/// An image and what each of its states reads.
struct Fixture {
    bytes: Vec<u8>,
    active: Vec<u8>,
    snaps: BTreeMap<String, Vec<u8>>,
}

fn read_all(dev: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Random writes (tag `tag`), zeroings and discards.
fn scribble(img: &Qcow2Image, rng: &mut SplitMix, tag: u8, ranges: usize) {
    for i in 0..ranges {
        let start = rng.below(SIZE / 512) * 512;
        let len = (rng.range(1, 40) * 512).min(SIZE - start);
        match i % 5 {
            3 => img.write_zeroes(start, len).expect("zero test range"),
            4 => img.discard(start, len).expect("discard test range"),
            _ => {
                let mut buf = vec![tag; len as usize];
                rng.fill(&mut buf[..len as usize / 2]);
                img.write_at(&buf, start).expect("write test range");
            }
        }
    }
    img.flush().expect("flush test image");
}

/// An image with snapshots `s1` and `s2` (made by the library, with writes in between and
/// after) and some compressed clusters.
fn build(layout: Layout, seed: u64) -> Fixture {
    let mut rng = SplitMix::new(seed);
    let s = Arc::new(MemoryStorage::new());
    let img = create_qcow2_on(s.clone(), None, SIZE, &layout.options()).expect("create image");
    let cs = img.cluster_size();
    let mut block = vec![0x5a; cs as usize];
    rng.fill(&mut block[..8]);
    for k in 0..4u64 {
        img.write_compressed(k * 7 * cs, &block)
            .expect("compressed cluster");
    }
    scribble(&img, &mut rng, 1, 16);
    let mut snaps = BTreeMap::new();
    img.create_snapshot(&NewSnapshot::now("s1"))
        .expect("snapshot s1");
    snaps.insert("s1".to_string(), read_all(&img).expect("read"));
    scribble(&img, &mut rng, 2, 10);
    img.create_snapshot(&NewSnapshot::now("s2"))
        .expect("snapshot s2");
    snaps.insert("s2".to_string(), read_all(&img).expect("read"));
    scribble(&img, &mut rng, 3, 8);
    let active = read_all(&img).expect("read");
    img.close().expect("close");
    drop(img);
    Fixture {
        bytes: s.to_bytes(),
        active,
        snaps,
    }
}

impl Op {
    fn run(self, storage: Arc<dyn Storage>) -> Result<(), String> {
        let e = |e: qcow2kit::Error| e.to_string();
        let img = Qcow2Image::open_writable(storage, &Qcow2Options::default()).map_err(e)?;
        match self {
            Op::Create => img
                .create_snapshot(&NewSnapshot::now("new"))
                .map(|_| ())
                .map_err(e)?,
            Op::Apply => img
                .apply_snapshot(&SnapshotRef::Name("s1".into()))
                .map_err(e)?,
            Op::DeleteShared => img
                .delete_snapshot(&SnapshotRef::Name("s1".into()))
                .map(|_| ())
                .map_err(e)?,
            Op::DeleteNewest => img
                .delete_snapshot(&SnapshotRef::Name("s2".into()))
                .map(|_| ())
                .map_err(e)?,
        }
        img.close().map_err(e)
    }

    /// What the active image may read afterwards, and the snapshots' contents by name.
    fn outcomes(self, f: &Fixture) -> (Vec<&[u8]>, BTreeMap<String, Vec<u8>>) {
        let mut all = f.snaps.clone();
        match self {
            Op::Create => {
                all.insert("new".into(), f.active.clone());
                (vec![&f.active], all)
            }
            Op::Apply => (vec![&f.active, &f.snaps["s1"]], all),
            Op::DeleteShared | Op::DeleteNewest => (vec![&f.active], all),
        }
    }

    /// The snapshot lists the old and the new state hold.
    fn lists(self) -> [Vec<&'static str>; 2] {
        match self {
            Op::Create => [vec!["s1", "s2"], vec!["s1", "s2", "new"]],
            Op::Apply => [vec!["s1", "s2"], vec!["s1", "s2"]],
            Op::DeleteShared => [vec!["s1", "s2"], vec!["s2"]],
            Op::DeleteNewest => [vec!["s1", "s2"], vec!["s1"]],
        }
    }
}

/// Judges one post-operation image (see the module docs).
fn judge(op: Op, f: &Fixture, bytes: &[u8], qemu: bool) -> Result<(), String> {
    let repaired;
    let bytes = if is_dirty(bytes) {
        repaired = repair_dirty(bytes)?;
        repaired.as_slice()
    } else {
        bytes
    };
    let r = check(&MemoryStorage::from_bytes(bytes.to_vec())).map_err(|e| format!("check: {e}"))?;
    if r.corruptions > 0 {
        return Err(format!("{} corruptions", r.corruptions));
    }
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
    let img = Qcow2Image::open(storage.clone(), &Qcow2Options::default())
        .map_err(|e| format!("open: {e}"))?;
    let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
    if !op.lists().iter().any(|l| *l == names) {
        return Err(format!("snapshot list {names:?}"));
    }
    let (actives, contents) = op.outcomes(f);
    let active = read_all(&img)?;
    // Apply changes the active image only where the list stays: both contents are valid.
    if !actives.contains(&active.as_slice()) {
        return Err("the active image reads neither the old nor the new content".into());
    }
    for name in &names {
        let view = Qcow2Image::open_snapshot(
            storage.clone(),
            &SnapshotRef::Name(name.clone()),
            &Qcow2Options::default(),
        )
        .map_err(|e| format!("open snapshot {name}: {e}"))?;
        if read_all(&view)? != contents[name] {
            return Err(format!("snapshot {name} reads differently"));
        }
    }
    if qemu {
        qemu_check(bytes)?;
    }
    Ok(())
}

/// Whether the image carries the dirty bit (incompatible feature bit 0).
fn is_dirty(bytes: &[u8]) -> bool {
    bytes.len() >= 80 && bytes[79] & 1 != 0
}

/// A dirty image after a writable open, which recomputes its refcounts and COPIED flags (as
/// QEMU's open repairs it); the open must clear the dirty bit.
fn repair_dirty(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mem = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
    let img = Qcow2Image::open_writable(mem.clone(), &Qcow2Options::default())
        .map_err(|e| format!("repairing open: {e}"))?;
    img.close()
        .map_err(|e| format!("close after repair: {e}"))?;
    drop(img);
    let out = mem.read_vec(0, mem.len().map_err(|e| e.to_string())? as usize);
    let out = out.map_err(|e| e.to_string())?;
    if is_dirty(&out) {
        return Err("the writable open left the image dirty".into());
    }
    Ok(out)
}

fn qemu_check(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&path)
        .output()
        .map_err(|e| format!("qemu-img must be installed: {e}"))?;
    // 0: clean; 3: leaked clusters only.
    if !matches!(out.status.code(), Some(0 | 3)) {
        return Err(format!(
            "qemu-img check: {:?} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(())
}

fn crash_all_points(op: Op, layout: Layout, seed: u64) {
    let f = build(layout, seed);
    // A clean run: the operation succeeds and leaves the new state, clean for qemu-img.
    let clean = Arc::new(CrashStorage::new(f.bytes.clone(), None));
    op.run(clean.clone())
        .unwrap_or_else(|e| panic!("{op:?} {layout:?} without faults: {e}"));
    let after = clean.durable();
    judge(op, &f, &after, false).unwrap_or_else(|e| panic!("{op:?} {layout:?} clean run: {e}"));
    let names: Vec<String> = Qcow2Image::open(
        Arc::new(MemoryStorage::from_bytes(after.clone())),
        &Qcow2Options::default(),
    )
    .expect("open")
    .snapshots()
    .iter()
    .map(|s| s.name.clone())
    .collect();
    assert_eq!(names, op.lists()[1], "{op:?} {layout:?}: the new list");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, &after).expect("write image");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .expect("qemu-img must be installed");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{op:?} {layout:?}: qemu-img check after a clean run: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let counts = clean.counts();
    assert!(counts.mutations() > 0, "{op:?} wrote nothing");

    let mut states = 0usize;
    let points = (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush));
    for (k, at) in points.enumerate() {
        let s = Arc::new(CrashStorage::new(f.bytes.clone(), Some(at)));
        let _ = op.run(s.clone());
        for (i, set) in s
            .choice_sets(seed ^ k as u64, RANDOM_CHOICES)
            .iter()
            .enumerate()
        {
            states += 1;
            let bytes = s.crash_image(set);
            judge(op, &f, &bytes, states % QEMU_SAMPLE == 0).unwrap_or_else(|e| {
                panic!("{op:?} {layout:?} crash at {at:?}, choice set {i}: {e}")
            });
        }
    }
    assert!(states > 0);
}

fn fail_all_points(op: Op, layout: Layout, seed: u64) {
    let f = build(layout, seed);
    let probe = Arc::new(CrashStorage::new(f.bytes.clone(), None));
    op.run(probe.clone()).expect("clean run");
    let counts = probe.counts();
    for kind in [OpKind::Write, OpKind::Flush] {
        for index in 0..counts.get(kind) {
            for (error, sticky) in [(FaultError::Eio, false), (FaultError::Enospc, true)] {
                let fault = Fault {
                    kind,
                    index,
                    error,
                    sticky,
                };
                let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(f.bytes.clone()));
                let failing = Arc::new(FailingStorage::with_fault(inner.clone(), Some(fault)));
                let r = op.run(failing);
                let len = inner.len().expect("memory length");
                let bytes = inner.read_vec(0, len as usize).expect("memory read");
                judge(op, &f, &bytes, false).unwrap_or_else(|e| {
                    panic!("{op:?} {layout:?} {error:?} at {kind:?} {index} (result {r:?}): {e}")
                });
            }
        }
    }
}

fn survives(op: Op, seed: u64) {
    for layout in [Layout::Clusters4k, Layout::Clusters512, Layout::ExtendedL2] {
        crash_all_points(op, layout, seed);
        fail_all_points(op, layout, seed);
    }
}

#[test]
fn create_survives_every_crash_and_failure() {
    survives(Op::Create, 21);
}

#[test]
fn apply_survives_every_crash_and_failure() {
    survives(Op::Apply, 22);
}

#[test]
fn delete_of_a_shared_snapshot_survives_every_crash_and_failure() {
    survives(Op::DeleteShared, 23);
}

#[test]
fn delete_of_the_newest_snapshot_survives_every_crash_and_failure() {
    survives(Op::DeleteNewest, 24);
}
