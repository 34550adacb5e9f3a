//! Crash safety of persistent bitmaps: a writable session (open, which flags the bitmaps in
//! use; writes, zero writes and discards; close, which stores them) on an image made by
//! qemu-img with enabled and disabled bitmaps, with a power loss at every write and flush
//! index (post-crash states drawn with [`CrashStorage::choice_sets`]), and with an EIO or a
//! sticky ENOSPC at every write and flush index.
//!
//! The session stores the bitmaps twice: it writes again after a first close.
//!
//! The invariant (issue 12, item 4): after any crash or failure the image has no corruption
//! (`ops::check`, and `qemu-img check` on a sample: leaks allowed), and every bitmap is either
//! flagged in use (inconsistent: QEMU discards it) or exactly right: the bits it held before
//! the session while the guest content is the old one, or those bits plus every range the
//! session wrote (enabled bitmaps) once the content is the new one. A disabled bitmap that is
//! not in use always holds its old bits.

use qcow2kit::engine::{Qcow2Image, Qcow2Options};
use qcow2kit::io::testing::{CrashPoint, CrashStorage, FailingStorage, Fault, FaultError, OpKind};
use qcow2kit::io::{MemoryStorage, Storage, StorageExt};
use qcow2kit::ops::check::check;
use qcow2kit::BlockDevice;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
/// Post-crash images tried per crash point, beyond the fixed choice sets.
const RANDOM_CHOICES: usize = 2;
/// Every this many-th post-crash state is also judged by `qemu-img check`.
const QEMU_SAMPLE: usize = 25;

/// Bitmap name → dirty extents.
type Bits = BTreeMap<String, Vec<(u64, u64)>>;

fn qemu(prog: &str, args: &[&str], dir: &std::path::Path) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed (qemu-utils 10.x): {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image with bitmaps at 4 KiB and 512 B granularity, enabled, and one disabled, each
/// holding bits from earlier writes by qemu-io.
fn build(cluster: u64) -> Vec<u8> {
    let d = tempfile::tempdir().expect("scratch directory");
    let dir = d.path();
    let o = format!("cluster_size={cluster}");
    qemu(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", &o, "i.qcow2", "1M"],
        dir,
    );
    qemu(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", "i.qcow2", "a"],
        dir,
    );
    qemu(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "i.qcow2", "b"],
        dir,
    );
    qemu(
        "qemu-img",
        &["bitmap", "--add", "--disable", "i.qcow2", "off"],
        dir,
    );
    qemu(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 700k 3k",
            "i.qcow2",
        ],
        dir,
    );
    std::fs::read(dir.join("i.qcow2")).expect("read image")
}

/// The session: open writable, write, zero, discard, flush, write, close.
fn session(s: Arc<dyn Storage>) -> Result<(), String> {
    let e = |e: qcow2kit::Error| e.to_string();
    let img = Qcow2Image::open_writable(s, &Qcow2Options::default()).map_err(e)?;
    img.write_at(&[7; 5000], 100_000).map_err(e)?;
    img.write_zeroes(300 * 1024, 8192).map_err(e)?;
    img.discard(0, 32 * 1024).map_err(e)?;
    img.flush().map_err(e)?;
    img.write_at(&[9; 512], SIZE - 512).map_err(e)?;
    img.flush().map_err(e)?;
    img.write_at(&[3; 1024], 600 * 1024).map_err(e)?;
    img.close().map_err(e)
}

const RANGES: &[(u64, u64)] = &[
    (600 * 1024, 1024),
    (100_000, 5000),
    (300 * 1024, 8192),
    (0, 32 * 1024),
    (SIZE - 512, 512),
];

/// What a read-only open finds: content, and bits of every bitmap not in use.
fn observe(bytes: &[u8]) -> Result<(Vec<u8>, Bits, usize), String> {
    let img = Qcow2Image::open(
        Arc::new(MemoryStorage::from_bytes(bytes.to_vec())),
        &Qcow2Options::default(),
    )
    .map_err(|e| format!("open: {e}"))?;
    let mut data = vec![0u8; img.size() as usize];
    img.read_at(&mut data, 0)
        .map_err(|e| format!("read: {e}"))?;
    let mut bits = Bits::new();
    let mut in_use = 0;
    for b in img.bitmaps() {
        if b.flags & qcow2kit::format::bitmap::FLAG_IN_USE != 0 {
            in_use += 1;
            continue;
        }
        let x = img
            .bitmap_dirty_extents(&b.name)
            .map_err(|e| format!("bitmap {}: {e}", b.name))?;
        bits.insert(b.name.clone(), x);
    }
    Ok((data, bits, in_use))
}

fn merge(mut v: Vec<(u64, u64)>, add: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for &(o, l) in v.iter().chain(add) {
        for i in o / g..(o + l).div_ceil(g) {
            set.insert(i);
        }
    }
    v.clear();
    for i in set {
        let (s, e) = (i * g, ((i + 1) * g).min(SIZE));
        match v.last_mut() {
            Some((o, l)) if *o + *l == s => *l = e - *o,
            _ => v.push((s, e - s)),
        }
    }
    v
}

struct Expect {
    old: (Vec<u8>, Bits),
    new: (Vec<u8>, Bits),
}

fn judge(bytes: &[u8], x: &Expect, qemu_too: bool) -> Result<(), String> {
    let r = check(&MemoryStorage::from_bytes(bytes.to_vec())).map_err(|e| format!("check: {e}"))?;
    if r.corruptions > 0 {
        return Err(format!("{} corruptions", r.corruptions));
    }
    let (data, bits, _) = observe(bytes)?;
    for (name, got) in &bits {
        let old = &x.old.1[name];
        let new = &x.new.1[name];
        if name == "off" {
            if got != old {
                return Err(format!("disabled bitmap changed: {got:?}, was {old:?}"));
            }
            continue;
        }
        // Old bits ⊆ stored bits ⊆ old bits + the session's ranges (a failed write may be
        // marked: more is safe), and every changed byte is covered.
        let covered = |v: &[(u64, u64)], at: u64| v.iter().any(|&(o, l)| o <= at && at < o + l);
        let inside = |a: &[(u64, u64)], b: &[(u64, u64)]| {
            a.iter()
                .all(|&(o, l)| (o..o + l).step_by(512).all(|p| covered(b, p)))
        };
        if !inside(old, got) || !inside(got, new) {
            return Err(format!(
                "bitmap {name} is not in use but holds {got:?} (old {old:?}, new {new:?})"
            ));
        }
        if let Some(p) = (0..data.len()).find(|&p| data[p] != x.old.0[p] && !covered(got, p as u64))
        {
            return Err(format!(
                "bitmap {name} is not in use and misses changed byte {p:#x}: {got:?}"
            ));
        }
    }
    if qemu_too {
        let d = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(d.path().join("c.qcow2"), bytes).map_err(|e| e.to_string())?;
        let out = Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2", "c.qcow2"])
            .current_dir(d.path())
            .output()
            .map_err(|e| format!("qemu-img must be installed: {e}"))?;
        if !matches!(out.status.code(), Some(0 | 3)) {
            return Err(format!(
                "qemu-img check: {:?} {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }
    Ok(())
}

fn expectations(initial: &[u8]) -> Expect {
    let (old_data, old_bits, in_use) = observe(initial).expect("initial image");
    assert_eq!(in_use, 0);
    let s = Arc::new(CrashStorage::new(initial.to_vec(), None));
    session(s.clone()).expect("session without faults");
    let after = s.durable();
    let (new_data, new_bits, in_use) = observe(&after).expect("image after the session");
    assert_eq!(in_use, 0, "bitmaps left in use by a clean session");
    // The stored bits are the old ones plus the session's ranges (enabled bitmaps).
    assert_eq!(new_bits["a"], merge(old_bits["a"].clone(), RANGES, 4096));
    assert_eq!(new_bits["b"], merge(old_bits["b"].clone(), RANGES, 512));
    assert_eq!(new_bits["off"], old_bits["off"]);
    let x = Expect {
        old: (old_data, old_bits),
        new: (new_data, new_bits),
    };
    judge(&after, &x, true).expect("clean session");
    x
}

fn crash_everywhere(cluster: u64, seed: u64) {
    let initial = build(cluster);
    let x = expectations(&initial);
    let probe = Arc::new(CrashStorage::new(initial.clone(), None));
    session(probe.clone()).expect("session");
    let counts = probe.counts();
    let points = (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush));
    let mut states = 0;
    for (k, at) in points.enumerate() {
        let s = Arc::new(CrashStorage::new(initial.clone(), Some(at)));
        let _ = session(s.clone());
        for set in s.choice_sets(seed ^ k as u64, RANDOM_CHOICES) {
            states += 1;
            judge(&s.crash_image(&set), &x, states % QEMU_SAMPLE == 0)
                .unwrap_or_else(|e| panic!("cluster {cluster}: crash at {at:?}, {set:?}: {e}"));
        }
    }
    assert!(states > 10, "only {states} crash states");
}

fn fail_everywhere(cluster: u64) {
    let initial = build(cluster);
    let x = expectations(&initial);
    let probe = Arc::new(FailingStorage::new(Arc::new(MemoryStorage::from_bytes(
        initial.clone(),
    ))));
    session(probe.clone()).expect("session");
    let counts = probe.counts();
    for kind in [OpKind::Write, OpKind::Flush] {
        for index in 0..counts.get(kind) {
            for (error, sticky) in [(FaultError::Eio, false), (FaultError::Enospc, true)] {
                let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(initial.clone()));
                let fault = Fault {
                    kind,
                    index,
                    error,
                    sticky,
                };
                let s = Arc::new(FailingStorage::with_fault(inner.clone(), Some(fault)));
                let r = session(s);
                let len = inner.len().expect("memory length");
                let bytes = inner.read_vec(0, len as usize).expect("memory read");
                judge(&bytes, &x, false).unwrap_or_else(|e| {
                    panic!("cluster {cluster}: {error:?} at {kind:?} {index} ({r:?}): {e}")
                });
            }
        }
    }
}

#[test]
fn bitmaps_survive_every_crash_4k_clusters() {
    crash_everywhere(4096, 21);
}

#[test]
fn bitmaps_survive_every_crash_512_byte_clusters() {
    crash_everywhere(512, 22);
}

#[test]
fn bitmaps_survive_every_failure() {
    fail_everywhere(4096);
    fail_everywhere(512);
}
