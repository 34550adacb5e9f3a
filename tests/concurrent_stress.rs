//! Readers and writers on one image at the same time, checked against a model: the lock-free
//! lookup path (L1 and cached L2 slices read under a sequence counter) must never return a torn
//! or stale mapping.
//!
//! The device is cut into units (a cluster or half of one); each unit belongs to one writer
//! thread, which writes versions 1, 2, … of it (data, or zeros by write-zeroes or discard) and
//! publishes, per unit, the last version it started and the last one it completed. Reader
//! threads read random spans of units; every 8-byte word of a unit must hold that unit's content
//! in some version between the last completed before the read started and the last started
//! before it ended. A stale mapping (an L2 entry older than a completed write) or a torn one (a
//! host offset from another cluster) shows as a word from an older version or another unit.
//! Half-cluster units put two writers' units in one cluster, so allocations copy a neighbour's
//! data (copy-on-write) while readers watch it. A tiny L2 cache (4 slices, far fewer than the
//! image has) makes nearly every lookup evict or load a slice, including dirty ones (written
//! back by a flush under the lock) while other threads look up without it; a flusher thread
//! frees discarded clusters for reuse. At the end the whole image must equal the model and
//! `qemu-img check` must find it clean.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::ops::create::{create_qcow2, CreateOptions};
use qcow2kit::BlockDevice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use write_helpers::*;

/// One stress configuration.
#[derive(Debug, Clone, Copy)]
struct Cfg {
    cluster: u64,
    extended_l2: bool,
    size: u64,
    /// Units per cluster (1 or 2).
    units_per_cluster: u64,
    /// `None`: the default cache.
    l2_cache_bytes: Option<usize>,
    writers: u64,
    readers: u64,
    /// Versions each writer writes of each of its units (in rounds over its units).
    rounds: u64,
}

/// What version `v` (≥ 1) of a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    WriteZeroes,
    Discard,
}

fn kind(cfg: &Cfg, unit: u64, v: u64) -> Kind {
    let h = unit
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(v.wrapping_mul(31));
    match h % 11 {
        // Discard drops whole clusters only (partial ones are left alone), so only whole-cluster
        // units are discarded.
        0 if cfg.units_per_cluster == 1 => Kind::Discard,
        1 => Kind::WriteZeroes,
        _ => Kind::Data,
    }
}

/// Word `idx` of version `v` (≥ 1) of `unit`, if that version holds data: the unit, the version
/// and the word's place, so a word from anywhere else is recognised.
fn word(unit: u64, v: u64, idx: u64) -> u64 {
    (unit << 40) | (v << 16) | idx
}

fn unit_bytes(unit: u64, v: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for (i, c) in b.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(unit, v, i as u64).to_be_bytes());
    }
    b
}

/// Whether `w` (word `idx` of `unit`) is the content of some version in `lo..=hi`.
fn word_ok(cfg: &Cfg, unit: u64, idx: u64, w: u64, lo: u64, hi: u64) -> bool {
    if w == 0 {
        // Zeros: the initial content (version 0) or a zeroing version.
        return (lo..=hi).any(|v| v == 0 || kind(cfg, unit, v) != Kind::Data);
    }
    let v = (w >> 16) & 0xff_ffff;
    w == word(unit, v, idx) && (lo..=hi).contains(&v) && kind(cfg, unit, v) == Kind::Data
}

fn run(cfg: Cfg, seed: u64) {
    let dir = scratch();
    let path = dir.path().join("stress.qcow2");
    let o = CreateOptions {
        size: Some(cfg.size),
        cluster_size: cfg.cluster,
        extended_l2: cfg.extended_l2,
        ..CreateOptions::default()
    };
    create_qcow2(&path, &o).expect("creating the image");
    let opened = open_rw_cache(&path, cfg.l2_cache_bytes);
    let dev: &dyn BlockDevice = opened.device.as_ref();

    let unit_len = cfg.cluster / cfg.units_per_cluster;
    let units = cfg.size / unit_len;
    let started: Vec<AtomicU64> = (0..units).map(|_| AtomicU64::new(0)).collect();
    let done: Vec<AtomicU64> = (0..units).map(|_| AtomicU64::new(0)).collect();
    let writers_left = AtomicU64::new(cfg.writers);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let ctx = format!("{cfg:?} seed {seed}");

    std::thread::scope(|s| {
        for t in 0..cfg.writers {
            let (started, done, writers_left, ctx) = (&started, &done, &writers_left, &ctx);
            s.spawn(move || {
                // Writer t owns units u ≡ t (mod writers); with two units per cluster and an
                // odd writer count, neighbours in a cluster belong to different writers.
                let mine: Vec<u64> = (t..units).step_by(cfg.writers as usize).collect();
                let mut r = seed ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                for _ in 0..cfg.rounds {
                    for &u in &mine {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        if r % 3 == 0 {
                            continue; // Leave some units behind, so versions differ.
                        }
                        let v = started[u as usize].load(Ordering::Relaxed) + 1;
                        started[u as usize].store(v, Ordering::Release);
                        let off = u * unit_len;
                        let res = match kind(&cfg, u, v) {
                            Kind::Data => dev.write_at(&unit_bytes(u, v, unit_len as usize), off),
                            Kind::WriteZeroes => dev.write_zeroes(off, unit_len),
                            Kind::Discard => dev.discard(off, unit_len),
                        };
                        res.unwrap_or_else(|e| panic!("{ctx}: writing unit {u} v{v}: {e}"));
                        done[u as usize].store(v, Ordering::Release);
                    }
                }
                writers_left.fetch_sub(1, Ordering::Release);
            });
        }
        // Flushes apply queued frees (discarded clusters become reusable) and write back
        // dirty slices while the others run.
        s.spawn(|| {
            while writers_left.load(Ordering::Acquire) > 0 {
                dev.flush().unwrap_or_else(|e| panic!("{ctx}: flush: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        for t in 0..cfg.readers {
            let (started, done, stop, reads, ctx) = (&started, &done, &stop, &reads, &ctx);
            s.spawn(move || {
                let mut r = seed.rotate_left(7) ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut buf = Vec::new();
                let mut lo = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    let n = 1 + (r >> 32) % 3;
                    let first = r % (units - n + 1);
                    // Last versions completed before the read starts.
                    lo.clear();
                    lo.extend((first..first + n).map(|u| done[u as usize].load(Ordering::Acquire)));
                    buf.resize((n * unit_len) as usize, 0);
                    dev.read_at(&mut buf, first * unit_len)
                        .unwrap_or_else(|e| panic!("{ctx}: reading: {e}"));
                    for (k, u) in (first..first + n).enumerate() {
                        // Last version started before the read ended.
                        let hi = started[u as usize].load(Ordering::Acquire);
                        let bytes = &buf[k * unit_len as usize..(k + 1) * unit_len as usize];
                        for (i, c) in bytes.chunks_exact(8).enumerate() {
                            let w = u64::from_be_bytes(c.try_into().expect("8 bytes"));
                            assert!(
                                word_ok(&cfg, u, i as u64, w, lo[k], hi),
                                "{ctx}: unit {u} word {i} reads {w:#x}, expected a version in \
                                 {}..={hi} (stale or torn mapping)",
                                lo[k]
                            );
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Stop the readers once the writers are done.
        s.spawn(|| {
            while writers_left.load(Ordering::Acquire) > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            stop.store(true, Ordering::Release);
        });
    });
    let reads = reads.load(Ordering::Relaxed);
    eprintln!("{ctx}: {reads} reads checked");
    assert!(reads > 0, "{ctx}: no read ran");

    // Quiescent: the image holds exactly the last version of every unit.
    dev.flush().expect("final flush");
    let all = read_all(dev);
    for u in 0..units {
        let v = done[u as usize].load(Ordering::Relaxed);
        let want = if v == 0 || kind(&cfg, u, v) != Kind::Data {
            vec![0u8; unit_len as usize]
        } else {
            unit_bytes(u, v, unit_len as usize)
        };
        let at = (u * unit_len) as usize;
        assert_same(&all[at..at + unit_len as usize], &want, u * unit_len, &ctx);
    }
    drop(opened);
    assert_check_clean(dir.path(), "stress.qcow2", &ctx);
}

/// 512-byte clusters (64-entry slices: 128 of them) with a 4-slice cache: almost every lookup
/// misses and evicts, often a dirty slice; two writers share each cluster.
#[test]
fn tiny_clusters_tiny_cache_shared_clusters() {
    run(
        Cfg {
            cluster: 512,
            extended_l2: false,
            size: 4 * M,
            units_per_cluster: 2,
            l2_cache_bytes: Some(1),
            writers: 3,
            readers: 3,
            rounds: 6,
        },
        1,
    );
}

/// 4 KiB clusters, one writer per cluster, discards that free clusters for reuse, a 4-slice
/// cache over 8 L2 tables.
#[test]
fn discards_and_reuse_tiny_cache() {
    run(
        Cfg {
            cluster: 4 * K,
            extended_l2: false,
            size: 16 * M,
            units_per_cluster: 1,
            l2_cache_bytes: Some(1),
            writers: 3,
            readers: 3,
            rounds: 8,
        },
        2,
    );
}

/// Extended L2 entries (two words per entry, both read under the sequence counter), subcluster
/// writes of half clusters, the default cache (lookups mostly lock-free).
#[test]
fn extended_l2_default_cache() {
    run(
        Cfg {
            cluster: 16 * K,
            extended_l2: true,
            size: 16 * M,
            units_per_cluster: 2,
            l2_cache_bytes: None,
            writers: 3,
            readers: 3,
            rounds: 12,
        },
        3,
    );
}

/// 64 KiB clusters with the default cache: the benchmarks' geometry, lock-free hits racing
/// allocating writes.
#[test]
fn default_geometry_default_cache() {
    run(
        Cfg {
            cluster: 64 * K,
            extended_l2: false,
            size: 64 * M,
            units_per_cluster: 1,
            l2_cache_bytes: None,
            writers: 3,
            readers: 3,
            rounds: 40,
        },
        4,
    );
}
