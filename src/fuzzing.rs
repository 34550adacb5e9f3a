//! Entry points for the cargo-fuzz targets in `fuzz/` (not a stable API).
//!
//! Each function takes arbitrary bytes and must never panic, hang or allocate beyond a bound
//! proportional to its input; errors are the expected outcome for most inputs.

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
    let opts = Qcow2Options {
        l2_cache_bytes: 64 << 10,
        ..Default::default()
    };
    let Ok(img) = Qcow2Image::open(storage, &opts) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(e) = img.block_status(pos, size - pos) else {
            return;
        };
        assert!(
            e.len > 0 && e.len <= size - pos,
            "extent out of the requested range"
        );
        let n = e.len.min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], pos).is_err() {
            return;
        }
        pos += e.len;
    }
}

/// What the guest sees of the image on `storage`, as far as a bounded walk reads it: up to 64
/// extents from `block_status`, at most 64 KiB of each; `None` when the image does not open.
fn guest_sample(storage: Arc<MemoryStorage>) -> Option<Vec<(u64, Vec<u8>)>> {
    let opts = Qcow2Options {
        l2_cache_bytes: 64 << 10,
        ..Default::default()
    };
    let img = Qcow2Image::open(storage, &opts).ok()?;
    let size = img.size();
    let mut sample = Vec::new();
    let mut pos = 0u64;
    while pos < size && sample.len() < 64 {
        let Ok(e) = img.block_status(pos, size - pos) else {
            break;
        };
        let mut buf = vec![0u8; e.len.min(64 << 10) as usize];
        if img.read_at(&mut buf, pos).is_ok() {
            sample.push((pos, buf));
        }
        pos += e.len;
    }
    Some(sample)
}

/// Checks and then repairs (`check -r all`) `data` as an image held in memory. Neither may
/// panic; the repair must not change what the guest reads: every range that read successfully
/// before reads the same afterwards (when the image still opens). Exempt from that comparison,
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
    let overlapping = report.findings_omitted > 0
        || report.findings.iter().any(|f| {
            matches!(
                f,
                Finding::RegionPastEof { .. }
                    | Finding::RefblockShared { .. }
                    | Finding::RefcountTooLow { reference: 2.., .. }
            )
        });
    let before = if overlapping {
        None
    } else {
        guest_sample(storage.clone())
    };
    if repair(storage.as_ref(), RepairMode::All).is_err() {
        return;
    }
    let (Some(before), Some(_)) = (before, guest_sample(storage.clone())) else {
        return;
    };
    let opts = Qcow2Options::default();
    let Ok(img) = Qcow2Image::open(storage, &opts) else {
        return;
    };
    for (pos, old) in before {
        let mut now = vec![0u8; old.len()];
        if img.read_at(&mut now, pos).is_ok() {
            assert!(now == old, "repair changed guest data at {pos}");
        }
    }
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

/// Interprets `data` as a small image's creation options followed by a sequence of writes,
/// zero writes, discards, flushes and resizes on an in-memory image, checked against a model;
/// at the end the image is closed and must be clean for [`check`](crate::ops::check::check)
/// (no leak, no corruption) and read back as the model.
pub fn write_sequence(data: &[u8]) {
    use crate::ops::check::check;
    use crate::ops::create::{create_qcow2_on, Compat, CreateOptions};
    let [a, b, rest @ ..] = data else { return };
    let cluster_bits = 9 + u32::from(a & 7) % 8; // 512 B .. 64 KiB
    let opts = CreateOptions {
        cluster_size: 1 << cluster_bits,
        refcount_bits: 1 << (u32::from(a >> 3) % 7),
        compat: if b & 1 == 0 { Compat::V3 } else { Compat::V2 },
        lazy_refcounts: b & 2 != 0 && b & 1 == 0,
        extended_l2: b & 4 != 0 && b & 1 == 0 && cluster_bits >= 14,
        ..CreateOptions::default()
    };
    let size = 1u64 << 20;
    let mem = Arc::new(MemoryStorage::new());
    let Ok(img) = create_qcow2_on(mem.clone(), None, size, &opts) else {
        return;
    };
    let mut model = vec![0u8; size as usize];
    for op in rest.chunks_exact(6).take(64) {
        let off = u64::from(u16::from_be_bytes([op[1], op[2]])) * 16 % model.len() as u64;
        let max = model.len() as u64 - off;
        let len = (u64::from(u16::from_be_bytes([op[3], op[4]])) * 4 % 70_000).min(max);
        let (o, l) = (off as usize, len as usize);
        match op[0] % 6 {
            0 | 1 => {
                let buf = vec![op[5] | 1; l];
                assert!(img.write_at(&buf, off).is_ok(), "write failed");
                model[o..o + l].copy_from_slice(&buf);
            }
            2 => {
                assert!(img.write_zeroes(off, len).is_ok(), "write_zeroes failed");
                model[o..o + l].fill(0);
            }
            3 => {
                // Each byte reads as before or as zero (whole clusters are dropped): the model
                // takes what the image reads, after checking exactly that.
                assert!(img.discard(off, len).is_ok(), "discard failed");
                let mut back = vec![0u8; l];
                assert!(
                    img.read_at(&mut back, off).is_ok(),
                    "read after discard failed"
                );
                for (m, b) in model[o..o + l].iter_mut().zip(&back) {
                    if *b != *m {
                        assert_eq!(*b, 0, "discard produced data that is neither old nor zero");
                        *m = 0;
                    }
                }
            }
            4 => assert!(img.flush().is_ok(), "flush failed"),
            _ => {
                let grow = (u64::from(op[5]) * 4096).next_multiple_of(512);
                let new = (size + grow).min(4 << 20);
                if new > model.len() as u64 && img.resize(new, false).is_ok() {
                    model.resize(new as usize, 0);
                }
            }
        }
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
