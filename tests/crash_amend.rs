//! Crash safety of `amend`: upgrade to version 3, downgrade to version 2 (zero clusters
//! expanded first), lazy refcounts turned on, and turned off on a dirty image — with a power
//! loss at every write and every flush index (post-crash states drawn with
//! [`CrashStorage::choice_sets`]), and with an EIO or a sticky ENOSPC at every write and flush
//! index.
//!
//! The invariant (issue 12, item 4): after any crash or failure the image is free of
//! corruption by `ops::check` (leaks allowed) and by `qemu-img check` on a sample, reads exactly
//! what it read before, and is either as it was or amended (its version one of the two).

use qcow2kit::device::BlockDevice;
use qcow2kit::engine::{Qcow2Image, Qcow2Options};
use qcow2kit::format::features::{CompatibleFeatures, IncompatibleFeatures};
use qcow2kit::io::testing::SplitMix;
use qcow2kit::io::testing::{CrashPoint, CrashStorage, FailingStorage, Fault, FaultError, OpKind};
use qcow2kit::io::{MemoryStorage, Storage, StorageExt};
use qcow2kit::ops::amend::{amend, AmendOptions, Compat};
use qcow2kit::ops::check::check;
use qcow2kit::ops::create::{self, create_qcow2_on, CreateOptions};
use qcow2kit::{NewSnapshot, SnapshotRef};
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 4096;
/// Post-crash images tried per crash point, beyond the fixed choice sets.
const RANDOM_CHOICES: usize = 2;
/// Every this many-th post-crash state is also judged by `qemu-img check`.
const QEMU_SAMPLE: usize = 25;

#[derive(Debug, Clone, Copy)]
enum Op {
    Upgrade,
    Downgrade,
    /// A downgrade of an image naming a backing file: zero clusters become zero-filled data.
    DowngradeBacked,
    /// A downgrade of an image with internal snapshots whose tables hold zero clusters (with
    /// and without a backing file).
    DowngradeSnapshots,
    DowngradeSnapshotsBacked,
    LazyOn,
    LazyOffDirty,
    /// Refcount width 16 → 1 (the image has no shared cluster) and 16 → 64.
    Narrower,
    Wider,
}

impl Op {
    fn options(self) -> AmendOptions {
        let mut o = AmendOptions::default();
        match self {
            Op::Upgrade => o.compat = Some(Compat::V3),
            Op::Downgrade
            | Op::DowngradeBacked
            | Op::DowngradeSnapshots
            | Op::DowngradeSnapshotsBacked => o.compat = Some(Compat::V2),
            Op::LazyOn => o.lazy_refcounts = Some(true),
            Op::LazyOffDirty => o.lazy_refcounts = Some(false),
            Op::Narrower => o.refcount_bits = Some(1),
            Op::Wider => o.refcount_bits = Some(64),
        }
        o
    }

    /// The image before the operation: data, zero clusters (with and without a host cluster
    /// on version 3) and, for `LazyOffDirty`, refcounts left stale under the dirty bit.
    fn build(self, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix::new(seed);
        let s = Arc::new(MemoryStorage::new());
        let backed = matches!(self, Op::DowngradeBacked | Op::DowngradeSnapshotsBacked);
        let snapshots = matches!(self, Op::DowngradeSnapshots | Op::DowngradeSnapshotsBacked);
        let o = CreateOptions {
            cluster_size: CLUSTER,
            compat: match self {
                Op::Upgrade => create::Compat::V2,
                _ => create::Compat::V3,
            },
            lazy_refcounts: matches!(self, Op::LazyOffDirty),
            // Never opened here: unallocated clusters read as zeros.
            backing_file: backed.then(|| "base.qcow2".into()),
            backing_format: backed.then(|| "qcow2".into()),
            ..CreateOptions::default()
        };
        let img = create_qcow2_on(s.clone(), None, SIZE, &o).expect("create test image");
        for i in 0..32 {
            if snapshots && i % 11 == 10 {
                img.create_snapshot(&NewSnapshot::now(&format!("s{i}")))
                    .expect("snapshot the test image");
            }
            let start = rng.below(SIZE / CLUSTER) * CLUSTER;
            let len = (rng.range(1, 6) * CLUSTER).min(SIZE - start);
            if i % 3 == 2 {
                img.write_zeroes(start, len).expect("zero test range");
            } else {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                img.write_at(&buf, start).expect("write test range");
            }
        }
        img.flush().expect("flush test image");
        let bytes = s.to_bytes();
        if matches!(self, Op::LazyOffDirty) {
            let h = Qcow2Image::open(
                Arc::new(MemoryStorage::from_bytes(bytes.clone())),
                &Default::default(),
            )
            .expect("open the dirty image")
            .header();
            assert!(
                h.incompatible.contains(IncompatibleFeatures::DIRTY),
                "test image not dirty"
            );
            // The handle's close would clean it; the dirty bytes are the test image.
            std::mem::forget(img);
        }
        bytes
    }

    fn run(self, storage: Arc<dyn Storage>) -> Result<(), String> {
        let e = |e: qcow2kit::Error| e.to_string();
        let img = Qcow2Image::open_writable(storage, &Qcow2Options::default()).map_err(e)?;
        if matches!(self, Op::LazyOffDirty) {
            // The open rebuilt the refcounts; allocating makes them stale on disk again, the
            // right ones only in memory, under the dirty bit.
            dirty_by_allocating(&img).map_err(e)?;
        }
        amend(&img, &self.options(), None).map_err(e)?;
        img.close().map_err(e)
    }

    /// Whether `h` is a state the image may be in: before or after.
    fn plausible(self, h: &qcow2kit::format::header::Header) -> bool {
        let lazy = h.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS);
        match self {
            Op::Upgrade
            | Op::Downgrade
            | Op::DowngradeBacked
            | Op::DowngradeSnapshots
            | Op::DowngradeSnapshotsBacked => h.version == 2 || h.version == 3,
            Op::LazyOn => h.version == 3,
            Op::LazyOffDirty => {
                h.version == 3 && (lazy || !h.incompatible.contains(IncompatibleFeatures::DIRTY))
            }
            Op::Narrower => h.refcount_order == 4 || h.refcount_order == 0,
            Op::Wider => h.refcount_order == 4 || h.refcount_order == 6,
        }
    }
}

/// Writes zeros into the first unallocated cluster (the guest content does not change).
fn dirty_by_allocating(img: &Qcow2Image) -> qcow2kit::Result<()> {
    let mut pos = 0;
    while pos < img.size() {
        let e = img.block_status(pos, img.size() - pos)?;
        if e.kind != qcow2kit::device::ExtentKind::Data {
            return img.write_at(&vec![0u8; CLUSTER as usize], pos);
        }
        pos += e.len;
    }
    panic!("the test image has no unallocated cluster");
}

/// The active image's content followed by every snapshot's (by id), and the header.
fn read_all(bytes: &[u8]) -> Result<(Vec<u8>, qcow2kit::format::header::Header), String> {
    let storage = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
    let img =
        Qcow2Image::open(storage.clone(), &Default::default()).map_err(|e| format!("open: {e}"))?;
    let mut out = vec![0u8; img.size() as usize];
    img.read_at(&mut out, 0).map_err(|e| e.to_string())?;
    for sn in img.snapshots() {
        let view = Qcow2Image::open_snapshot(
            storage.clone(),
            &SnapshotRef::Id(sn.id.clone()),
            &Qcow2Options::default(),
        )
        .map_err(|e| format!("open snapshot {}: {e}", sn.id))?;
        let mut buf = vec![0u8; view.size() as usize];
        view.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
        out.extend_from_slice(&buf);
    }
    Ok((out, img.header()))
}

fn judge(op: Op, bytes: &[u8], expected: &[u8], qemu: bool) -> Result<(), String> {
    let (_, h) = read_all(bytes)?;
    let rebuilt;
    let bytes = if h.incompatible.contains(IncompatibleFeatures::DIRTY) {
        if !h.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS) {
            return Err("dirty without lazy refcounts".into());
        }
        // Stale refcounts under the dirty bit are allowed: a writable open rebuilds them.
        let s = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
        let img = Qcow2Image::open_writable(s.clone(), &Qcow2Options::default())
            .map_err(|e| format!("reopen: {e}"))?;
        img.close()
            .map_err(|e| format!("close after rebuild: {e}"))?;
        drop(img);
        rebuilt = s.to_bytes();
        &rebuilt[..]
    } else {
        bytes
    };
    let r = check(&MemoryStorage::from_bytes(bytes.to_vec())).map_err(|e| format!("check: {e}"))?;
    if r.corruptions > 0 || r.check_errors > 0 || r.marked_corrupt {
        return Err(format!(
            "{} corruptions, {} check errors",
            r.corruptions, r.check_errors
        ));
    }
    let (data, h) = read_all(bytes)?;
    if data != expected {
        return Err("the image reads differently".into());
    }
    if !op.plausible(&h) {
        return Err(format!("unexpected header state: {h:?}"));
    }
    if qemu {
        qemu_check(bytes)?;
    }
    Ok(())
}

fn qemu_check(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("qcow2kit-crash-amend-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    // The backing file some test images name (empty: they read zeros where unallocated).
    let base = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.path().join("base.qcow2"))
        .arg(SIZE.to_string())
        .status()
        .map_err(|e| format!("qemu-img must be installed: {e}"))?;
    if !base.success() {
        return Err("qemu-img create of the backing file failed".into());
    }
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&path)
        .output()
        .map_err(|e| format!("qemu-img must be installed: {e}"))?;
    // 0: clean; 3: leaked clusters only.
    if !matches!(out.status.code(), Some(0 | 3)) {
        return Err(format!(
            "qemu-img check: {:?} {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn crash_all_points(op: Op, seed: u64) {
    let before = op.build(seed);
    let (expected, _) = read_all(&before).expect("read the image before the operation");
    let clean = Arc::new(CrashStorage::new(before.clone(), None));
    op.run(clean.clone())
        .unwrap_or_else(|e| panic!("{op:?} without faults: {e}"));
    let counts = clean.counts();
    let after = clean.durable();
    judge(op, &after, &expected, true).unwrap_or_else(|e| panic!("{op:?} clean run: {e}"));
    assert!(counts.mutations() > 0, "{op:?} wrote nothing");

    let mut states = 0usize;
    let points = (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush));
    for (k, at) in points.enumerate() {
        let s = Arc::new(CrashStorage::new(before.clone(), Some(at)));
        let _ = op.run(s.clone());
        for (i, set) in s
            .choice_sets(seed ^ k as u64, RANDOM_CHOICES)
            .iter()
            .enumerate()
        {
            states += 1;
            judge(
                op,
                &s.crash_image(set),
                &expected,
                states % QEMU_SAMPLE == 0,
            )
            .unwrap_or_else(|e| panic!("{op:?} crash at {at:?}, choice set {i}: {e}"));
        }
    }
    eprintln!(
        "{op:?}: {} writes, {} flushes, {states} post-crash states",
        counts.mutations(),
        counts.flushes
    );
    assert!(states > 0);
}

fn fail_all_points(op: Op, seed: u64) {
    let before = op.build(seed);
    let (expected, _) = read_all(&before).expect("read the image before the operation");
    let counter = Arc::new(FailingStorage::new(Arc::new(MemoryStorage::from_bytes(
        before.clone(),
    ))));
    op.run(counter.clone()).expect("counting run");
    let counts = counter.counts();
    for kind in [OpKind::Write, OpKind::Flush] {
        for index in 0..counts.get(kind) {
            for (error, sticky) in [(FaultError::Eio, false), (FaultError::Enospc, true)] {
                let fault = Fault {
                    kind,
                    index,
                    error,
                    sticky,
                };
                let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(before.clone()));
                let r = op.run(Arc::new(FailingStorage::with_fault(
                    inner.clone(),
                    Some(fault),
                )));
                let len = inner.len().expect("memory length");
                let state = inner.read_vec(0, len as usize).expect("memory read");
                judge(op, &state, &expected, false).unwrap_or_else(|e| {
                    panic!("{op:?} {error:?} at {kind:?} {index} (result {r:?}): {e}")
                });
            }
        }
    }
}

#[test]
fn upgrade_survives_crashes() {
    crash_all_points(Op::Upgrade, 11);
}

#[test]
fn downgrade_survives_crashes() {
    crash_all_points(Op::Downgrade, 12);
}

#[test]
fn backed_downgrade_survives_crashes() {
    crash_all_points(Op::DowngradeBacked, 15);
}

#[test]
fn backed_downgrade_survives_failures() {
    fail_all_points(Op::DowngradeBacked, 25);
}

#[test]
fn downgrade_with_snapshots_survives_crashes_and_failures() {
    for (op, seed) in [
        (Op::DowngradeSnapshots, 16),
        (Op::DowngradeSnapshotsBacked, 17),
    ] {
        crash_all_points(op, seed);
        fail_all_points(op, seed);
    }
}

#[test]
fn lazy_on_survives_crashes() {
    crash_all_points(Op::LazyOn, 13);
}

#[test]
fn lazy_off_on_a_dirty_image_survives_crashes() {
    crash_all_points(Op::LazyOffDirty, 14);
}

#[test]
fn refcount_width_changes_survive_crashes_and_failures() {
    for (op, seed) in [(Op::Narrower, 41), (Op::Wider, 42)] {
        crash_all_points(op, seed);
        fail_all_points(op, seed);
    }
}

#[test]
fn upgrade_survives_failures() {
    fail_all_points(Op::Upgrade, 21);
}

#[test]
fn downgrade_survives_failures() {
    fail_all_points(Op::Downgrade, 22);
}

#[test]
fn lazy_off_on_a_dirty_image_survives_failures() {
    fail_all_points(Op::LazyOffDirty, 24);
}
