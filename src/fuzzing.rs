//! Entry points for the cargo-fuzz targets in `fuzz/` (not a stable API).
//!
//! Each function takes arbitrary bytes and must never panic, hang or allocate beyond a bound
//! proportional to its input; errors are the expected outcome for most inputs.

mod damaged;

pub use damaged::write_damaged;

use crate::codec::decompress_cluster;
use crate::device::BlockDevice;
use crate::engine::{Qcow2Image, Qcow2Options};
use crate::format::header::CompressionType;
use crate::io::MemoryStorage;
use std::sync::Arc;

/// Opens `data` as a qcow2 image held in memory and reads what its metadata maps: up to 256
/// extents found by `block_status`, at most 256 KiB of each.
pub fn open_and_read(data: &[u8]) {
    let storage = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    if let Some(img) = open_small_cache(storage, None) {
        walk_extents(&img, 256, 256 << 10, |_, _| {});
    }
}

/// The passphrase fuzzed encrypted images are opened with (the seeds' key), and a bound on
/// the PBKDF2 work of a hostile LUKS header that keeps each run short.
fn fuzz_key() -> crate::engine::EncryptionOptions {
    crate::engine::EncryptionOptions {
        passphrase: Some(crate::crypto::Passphrase::new("fuzz")),
        luks_limits: crate::crypto::LuksLimits {
            max_iterations: 2000,
        },
        ..Default::default()
    }
}

/// Opens `storage` read-only with a 64 KiB L2 cache: the active image, or the internal snapshot
/// with id `snapshot`; an encrypted image with the seeds' passphrase.
fn open_small_cache(storage: Arc<MemoryStorage>, snapshot: Option<&str>) -> Option<Qcow2Image> {
    let opts = Qcow2Options {
        l2_cache_bytes: 64 << 10,
        encryption: fuzz_key(),
        ..Default::default()
    };
    let snapshot = snapshot.map(|id| crate::engine::SnapshotRef::Id(id.into()));
    Qcow2Image::open_as(storage, false, snapshot.as_ref(), &opts).ok()
}

/// Walks up to `max_extents` extents of `img` from `block_status` (each must lie inside the
/// requested range) and reads at most `max_bytes` of each, handing `(offset, bytes)` of every
/// successful read to `f`. Stops at the first `block_status` error.
fn walk_extents(
    img: &Qcow2Image,
    max_extents: usize,
    max_bytes: usize,
    mut f: impl FnMut(u64, &[u8]),
) {
    let size = img.size();
    let mut buf = vec![0u8; max_bytes];
    let mut pos = 0u64;
    for _ in 0..max_extents {
        if pos >= size {
            break;
        }
        let Ok(e) = img.block_status(pos, size - pos) else {
            break;
        };
        assert!(
            e.len > 0 && e.len <= size - pos,
            "extent out of the requested range"
        );
        let n = e.len.min(max_bytes as u64) as usize;
        if img.read_at(&mut buf[..n], pos).is_ok() {
            f(pos, &buf[..n]);
        }
        pos += e.len;
    }
}

/// Checks and then repairs (`check -r all`) `data` as an image held in memory. Neither may
/// panic; the repair must not change what the guest reads: every range that read successfully
/// before, in the active image and in its first four internal snapshots, reads the same
/// afterwards (when the image, or the snapshot, still opens). Exempt from that comparison,
/// because repairing their metadata rewrites what the guest reads (as QEMU's repair does):
/// images that map clusters past the end of the file (they read as zeros until a rebuilt
/// refcount structure is placed there) and images where a cluster is referenced twice but
/// counted less (a data cluster that is also an L2 table or a refcount block).
pub fn check_repair(data: &[u8]) {
    use crate::ops::check::{check, repair, Finding, RepairMode};
    // A repair may grow the file (a refcount block past its end, a rebuilt structure): allow
    // what a real repair needs, not the gigabyte a hostile image can ask for.
    let capacity = (data.len() as u64).saturating_mul(4).max(8 << 20);
    let storage = Arc::new(MemoryStorage::with_capacity_limit(data.to_vec(), capacity));
    let Ok(report) = check(storage.as_ref()) else {
        return;
    };
    // Repair legitimately changes what the guest reads where a cluster holds guest data and
    // metadata at once (fixing the metadata rewrites the data; QEMU's repair does the same) or
    // where an entry maps past the end of the file. Any cluster referenced twice or more that is
    // miscounted may be such a cluster, so those images are only checked for not panicking.
    let overlapping = report.findings_omitted > 0
        || report.findings.iter().any(|f| {
            matches!(
                f,
                Finding::RegionPastEof { .. }
                    | Finding::RefblockShared { .. }
                    | Finding::RefcountOverflow { .. }
                    | Finding::RefcountTooLow { reference: 2.., .. }
                    | Finding::Leaked { reference: 2.., .. }
            )
        });
    // What the active image and each snapshot read, by snapshot id (None: the active image).
    let mut before: Vec<(Option<String>, Reads)> = Vec::new();
    // Images that do not open are still repaired; there is just nothing to compare.
    if !overlapping {
        if let Some(img) = open_small_cache(storage.clone(), None) {
            let ids: Vec<String> = img.snapshots().iter().map(|s| s.id.clone()).collect();
            before.push((None, read_view(&img)));
            for id in ids.into_iter().take(4) {
                if let Some(view) = open_small_cache(storage.clone(), Some(&id)) {
                    before.push((Some(id), read_view(&view)));
                }
            }
        }
    }
    // The repair runs whatever the image holds; the comparison only when something was read.
    if repair(storage.as_ref(), RepairMode::All).is_err() || before.is_empty() {
        return;
    }
    for (id, ranges) in before {
        // A snapshot the repair dropped (past QEMU's limits) has nothing left to compare.
        let Some(img) = open_small_cache(storage.clone(), id.as_deref()) else {
            continue;
        };
        for (pos, old) in ranges {
            let mut now = vec![0u8; old.len()];
            if img.read_at(&mut now, pos).is_ok() {
                assert!(
                    now == old,
                    "repair changed guest data at {pos} (snapshot {id:?})"
                );
            }
        }
    }
}

/// Guest offsets and the bytes read there.
type Reads = Vec<(u64, Vec<u8>)>;

/// The ranges a view of an image reads (see [`walk_extents`]).
fn read_view(img: &Qcow2Image) -> Reads {
    let mut out = Vec::new();
    walk_extents(img, 64, 64 << 10, |pos, bytes| {
        out.push((pos, bytes.to_vec()))
    });
    out
}

/// Decompresses `data` (first byte picks zlib or zstd, second the cluster size) into one
/// cluster; the output must never exceed the cluster.
pub fn decompress(data: &[u8]) {
    let [kind, bits, rest @ ..] = data else {
        return;
    };
    let kind = if kind & 1 == 0 {
        CompressionType::Zlib
    } else {
        CompressionType::Zstd
    };
    let cluster = 1usize << (9 + u32::from(*bits) % 13);
    let mut out = vec![0u8; cluster];
    let _ = decompress_cluster(kind, rest, &mut out);
}

/// Runs `inspect` and every policy preset over arbitrary bytes.
pub fn inspect(data: &[u8]) {
    use crate::ops::inspect::{inspect, Policy};
    let storage = MemoryStorage::from_bytes(data.to_vec());
    if let Ok(i) = inspect(&storage) {
        for p in [
            Policy::strict(),
            Policy::openstack(),
            Policy::trusted_local(),
        ] {
            let _ = i.check(&p);
        }
    }
}

/// Streams arbitrary bytes through the streaming inspector in arbitrary chunks (the first two
/// bytes seed the chunk sizes) and checks that it never keeps more than its cap and, where it
/// vouches for its inspection, agrees with the random-access inspector.
pub fn inspect_stream(data: &[u8]) {
    use crate::ops::inspect::stream::{StreamInspector, MAX_KEPT_BYTES};
    use crate::ops::inspect::{inspect, Policy};
    let (seed, body) = match data {
        [a, b, rest @ ..] => (u64::from(*a) << 8 | u64::from(*b), rest),
        _ => (0, data),
    };
    // xorshift64 from the seed: chunk sizes 1..=4096.
    let mut x = seed | 1;
    let mut s = StreamInspector::new();
    let mut rest = body;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (1 + x % 4096).min(rest.len() as u64) as usize;
        s.feed(&rest[..n]);
        rest = &rest[n..];
        assert!(s.kept_bytes() <= MAX_KEPT_BYTES);
    }
    let streamed = s.finish();
    let whole = inspect(&MemoryStorage::from_bytes(body.to_vec())).expect("in-memory inspection");
    if streamed.complete {
        assert_eq!(streamed, whole);
    }
    for p in [
        Policy::strict(),
        Policy::openstack(),
        Policy::trusted_local(),
    ] {
        let _ = streamed.check(&p);
    }
}

/// Creation options of a small image, from two fuzz bytes: cluster size 512 B–64 KiB, every
/// refcount width, v2 or v3, lazy refcounts, extended L2.
fn fuzz_create_options(a: u8, b: u8) -> crate::ops::create::CreateOptions {
    use crate::crypto::luks::{KdfCost, LuksCreateOptions};
    use crate::crypto::EncryptionFormat;
    use crate::ops::create::{Compat, CreateOptions};
    let cluster_bits = 9 + u32::from(a & 7) % 8;
    let encryption = [
        None,
        Some(EncryptionFormat::Aes),
        Some(EncryptionFormat::Luks),
    ][usize::from(b >> 3) % 3]
        .map(|format| crate::ops::create::CreateEncryption {
            format,
            passphrase: crate::crypto::Passphrase::new("fuzz"),
            luks: LuksCreateOptions {
                kdf: KdfCost::Iterations {
                    master: 1000,
                    slot: 1000,
                },
                ..Default::default()
            },
        });
    CreateOptions {
        cluster_size: 1 << cluster_bits,
        refcount_bits: 1 << (u32::from(a >> 3) % 7),
        compat: if b & 1 == 0 { Compat::V3 } else { Compat::V2 },
        lazy_refcounts: b & 2 != 0 && b & 1 == 0,
        extended_l2: b & 4 != 0 && b & 1 == 0 && cluster_bits >= 14,
        encryption,
        ..CreateOptions::default()
    }
}

/// One guest operation of the write fuzz targets.
#[derive(Debug, Clone, Copy)]
enum GuestOp {
    /// Write `len` bytes of `byte` (never 0) at `off`.
    Write { off: u64, len: u64, byte: u8 },
    /// Write zeros.
    Zero { off: u64, len: u64 },
    /// Discard (whole clusters are dropped: bytes read as before or as zero).
    Discard { off: u64, len: u64 },
    /// Flush.
    Flush,
    /// Grow the disk by this many bytes.
    Grow(u64),
}

impl GuestOp {
    /// Decodes six fuzz bytes into an operation on a disk of `size` bytes.
    fn decode(op: &[u8], size: u64) -> GuestOp {
        let off = u64::from(u16::from_be_bytes([op[1], op[2]])) * 16 % size;
        let len = (u64::from(u16::from_be_bytes([op[3], op[4]])) * 4 % 70_000).min(size - off);
        match op[0] % 6 {
            0 | 1 => GuestOp::Write {
                off,
                len,
                byte: op[5] | 1,
            },
            2 => GuestOp::Zero { off, len },
            3 => GuestOp::Discard { off, len },
            4 => GuestOp::Flush,
            _ => GuestOp::Grow((u64::from(op[5]) * 4096).next_multiple_of(512)),
        }
    }

    /// Applies the operation to `img` and to `model` (what the image must read afterwards);
    /// `Grow` is applied only while the disk stays within 4 MiB. A discard's effect is read
    /// back and checked to be old-or-zero byte by byte.
    fn apply(self, img: &Qcow2Image, model: &mut Vec<u8>) -> crate::Result<()> {
        match self {
            GuestOp::Write { off, len, byte } => {
                let buf = vec![byte; len as usize];
                img.write_at(&buf, off)?;
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            GuestOp::Zero { off, len } => {
                img.write_zeroes(off, len)?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            GuestOp::Discard { off, len } => {
                img.discard(off, len)?;
                let mut back = vec![0u8; len as usize];
                img.read_at(&mut back, off)?;
                for (m, b) in model[off as usize..(off + len) as usize]
                    .iter_mut()
                    .zip(&back)
                {
                    if *b != *m {
                        assert_eq!(*b, 0, "discard produced data that is neither old nor zero");
                        *m = 0;
                    }
                }
            }
            GuestOp::Flush => img.flush()?,
            GuestOp::Grow(by) => {
                let new = (model.len() as u64 + by).min(4 << 20);
                if new > model.len() as u64 {
                    img.resize(new, false)?;
                    model.resize(new as usize, 0);
                }
            }
        }
        Ok(())
    }
}

/// Interprets `data` as a small image's creation options followed by a sequence of writes,
/// zero writes, discards, flushes and resizes on an in-memory image, checked against a model;
/// at the end the image is closed and must be clean for [`check`](crate::ops::check::check)
/// (no leak, no corruption) and read back as the model.
pub fn write_sequence(data: &[u8]) {
    use crate::ops::check::check;
    use crate::ops::create::create_qcow2_on;
    let [a, b, rest @ ..] = data else { return };
    let opts = fuzz_create_options(*a, *b);
    let size = 1u64 << 20;
    let mem = Arc::new(MemoryStorage::new());
    let Ok(img) = create_qcow2_on(mem.clone(), None, size, &opts) else {
        return;
    };
    let mut model = vec![0u8; size as usize];
    for op in rest.chunks_exact(6).take(64) {
        let op = GuestOp::decode(op, model.len() as u64);
        let r = op.apply(&img, &mut model);
        assert!(r.is_ok(), "{op:?} failed: {r:?}");
    }
    let mut back = vec![0u8; model.len()];
    assert!(img.read_at(&mut back, 0).is_ok(), "final read failed");
    assert!(back == model, "image content differs from the model");
    assert!(img.close().is_ok(), "close failed");
    drop(img);
    let report = check(mem.as_ref());
    assert!(
        matches!(&report, Ok(r) if r.is_clean()),
        "check not clean: {report:?}"
    );
}

/// Interprets `data` as creation options, a crash point, a seed and a sequence of guest
/// operations (as [`write_sequence`], without resizes), runs the sequence on a storage that
/// loses power at that point (an index among all its writes and flushes), and judges up to four
/// post-crash images (flushed state plus subsets of the unflushed writes, torn at sector
/// boundaries): each opens writable (a dirty image is rebuilt), every byte reads as what the last
/// completed flush made durable or as what a later operation (the one in flight included) wrote,
/// and after close the image has no corruption (leaks are allowed). Needs the `testing` feature.
#[cfg(feature = "testing")]
pub fn crash_reopen(data: &[u8]) {
    use crate::io::testing::{CrashPoint, CrashStorage};
    use crate::io::Storage;
    use crate::ops::check::check;
    use crate::ops::create::create_qcow2_on;
    let [a, b, p0, p1, seed, rest @ ..] = data else {
        return;
    };
    let size = 1u64 << 20;
    let initial = {
        let mem = Arc::new(MemoryStorage::new());
        let Ok(img) = create_qcow2_on(mem.clone(), None, size, &fuzz_create_options(*a, *b)) else {
            return;
        };
        if img.close().is_err() {
            return;
        }
        drop(img);
        mem.to_bytes()
    };
    let ops: Vec<GuestOp> = rest
        .chunks_exact(6)
        .take(32)
        .map(|op| GuestOp::decode(op, size))
        .filter(|op| !matches!(op, GuestOp::Grow(_)))
        .collect();
    let rw = Qcow2Options {
        encryption: fuzz_key(),
        ..Default::default()
    };

    // A first run without a crash counts the storage operations.
    let counts = {
        let s = Arc::new(CrashStorage::new(initial.clone(), None));
        let Ok(img) = Qcow2Image::open_writable(s.clone(), &rw) else {
            return;
        };
        let mut model = vec![0u8; size as usize];
        for op in &ops {
            let r = op.apply(&img, &mut model);
            assert!(r.is_ok(), "{op:?} failed without a crash: {r:?}");
        }
        assert!(img.close().is_ok(), "close failed without a crash");
        s.counts()
    };
    let total = counts.mutations() + counts.flushes;
    if total == 0 {
        return;
    }
    let idx = u64::from(u16::from_be_bytes([*p0, *p1])) % total;
    let point = if idx < counts.mutations() {
        CrashPoint::Write(idx)
    } else {
        CrashPoint::Flush(idx - counts.mutations())
    };

    // The run that crashes: `durable` is the guest content as of the last completed flush,
    // `later` what each operation since may have written over it.
    let s = Arc::new(CrashStorage::new(initial, Some(point)));
    let Ok(img) = Qcow2Image::open_writable(s.clone(), &rw) else {
        return;
    };
    let mut model = vec![0u8; size as usize];
    let mut durable = model.clone();
    let mut later: Vec<(u64, u64, u8)> = Vec::new();
    let mut failed = false;
    for op in &ops {
        match *op {
            GuestOp::Write { off, len, byte } => later.push((off, len, byte)),
            GuestOp::Zero { off, len } | GuestOp::Discard { off, len } => later.push((off, len, 0)),
            GuestOp::Flush | GuestOp::Grow(_) => {}
        }
        if op.apply(&img, &mut model).is_err() {
            failed = true;
            break;
        }
        if matches!(op, GuestOp::Flush) {
            durable.clone_from(&model);
            later.clear();
        }
    }
    if !failed && img.close().is_ok() {
        durable.clone_from(&model);
        later.clear();
    }
    drop(img);
    assert!(
        s.is_crashed() || !failed,
        "an operation failed before the crash point"
    );

    for choices in s.choice_sets(u64::from(*seed), 1).into_iter().take(4) {
        let mem = Arc::new(MemoryStorage::from_bytes(s.crash_image(&choices)));
        let img = Qcow2Image::open_writable(mem.clone(), &rw);
        assert!(
            img.is_ok(),
            "post-crash image does not open ({point:?} {choices:?}): {img:?}"
        );
        let Ok(img) = img else { return };
        let mut back = vec![0u8; size as usize];
        assert!(img.read_at(&mut back, 0).is_ok(), "post-crash read failed");
        for (i, (&got, &old)) in back.iter().zip(&durable).enumerate() {
            let i = i as u64;
            let allowed = got == old
                || later
                    .iter()
                    .any(|&(off, len, v)| v == got && off <= i && i < off + len);
            assert!(
                allowed,
                "byte {i} reads {got:#x}: neither flushed ({old:#x}) nor written since \
                 ({point:?} {choices:?})"
            );
        }
        assert!(img.close().is_ok(), "close of the post-crash image failed");
        drop(img);
        let report = check(mem.as_ref() as &dyn Storage);
        assert!(
            matches!(&report, Ok(r) if r.corruptions == 0 && r.check_errors == 0),
            "post-crash image corrupt ({point:?} {choices:?}): {report:?}"
        );
    }
}
