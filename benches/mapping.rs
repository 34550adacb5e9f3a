//! Guest → host mapping: `BlockDevice::block_status` of one cluster on an L2-cache hit and on a
//! miss, and extent-by-extent walks over a sparse 1 TiB image.
//!
//! Run: `cargo bench --bench mapping`. Groups: `lookup/l2_hit`, `lookup/l2_hit_batched`,
//! `lookup/l2_miss`,
//! `extent_walk/sparse_1tib`.

mod support;

use criterion::{black_box, Criterion, Throughput};
use qcow2kit::{BlockDevice, ExtentKind};
use support::{Rng, Scratch, CLUSTER, IMAGE_SIZE};

/// Lookups per iteration of `lookup/l2_hit_batched`.
const BATCH: usize = 64;

/// Entries in one cached L2 slice (4 KiB of 8-byte entries).
const SLICE_ENTRIES: u64 = 512;

fn lookup(c: &mut Criterion) {
    let scratch = Scratch::new("qcow2kit-bench-mapping-");
    scratch.text_raw("full.raw", IMAGE_SIZE, 1);
    let full = scratch.convert_qcow2("full.raw", "full.qcow2", "", false);

    let mut g = c.benchmark_group("lookup");
    support::short(&mut g);
    g.throughput(Throughput::Elements(1));

    // Hit: default cache (32 MiB) holds every slice of the 256 MiB image after one pass.
    {
        let img = support::open_qcow2(&full, None);
        let dev = img.device.clone();
        let offs = support::random_offsets(1 << 16, IMAGE_SIZE, CLUSTER, 11);
        for &o in &offs {
            let e = dev.block_status(o, CLUSTER).expect("warming the cache");
            assert_eq!((e.kind, e.len), (ExtentKind::Data, CLUSTER));
        }
        let mut i = 0usize;
        g.bench_function("l2_hit", |b| {
            b.iter(|| {
                i = (i + 1) & (offs.len() - 1);
                black_box(dev.block_status(black_box(offs[i]), CLUSTER))
            })
        });
        // The same lookups in batches of 64 whose results are folded into one word: the cost
        // of a lookup without criterion's per-iteration overhead and without forcing each
        // 56-byte `Result<Extent>` through memory for `black_box`.
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut j = 0usize;
        g.bench_function("l2_hit_batched", |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for _ in 0..BATCH {
                    j = (j + 1) & (offs.len() - 1);
                    if let Ok(e) = dev.block_status(offs[j], CLUSTER) {
                        acc ^= e.host_offset.unwrap_or(0) ^ e.len;
                    }
                }
                black_box(acc)
            })
        });
        g.throughput(Throughput::Elements(1));
        let q = img.qcow2.as_ref().expect("qcow2 image");
        let (hits, misses) = q.cache_stats();
        eprintln!("lookup/l2_hit: cache hits {hits}, misses {misses}");
    }

    // Miss: a cache of 4 slices, lookups cycling through all slices of the image in a fixed
    // random order (reuse distance = number of slices > 4), so every lookup misses.
    {
        let img = support::open_qcow2(&full, Some(1));
        let dev = img.device.clone();
        let slices = (IMAGE_SIZE / CLUSTER / SLICE_ENTRIES) as usize;
        assert!(
            slices > 4,
            "the image must have more slices than the cache holds"
        );
        let mut r = Rng(12);
        let order = r.permutation(slices);
        let offs: Vec<u64> = (0..1usize << 12)
            .map(|k| {
                let slice = order[k % slices] as u64;
                (slice * SLICE_ENTRIES + r.below(SLICE_ENTRIES)) * CLUSTER
            })
            .collect();
        assert_eq!(offs.len() % slices, 0);
        let q = img.qcow2.clone().expect("qcow2 image");
        let before = q.cache_stats();
        for &o in &offs {
            dev.block_status(o, CLUSTER).expect("lookup");
        }
        let after = q.cache_stats();
        assert_eq!(
            after.1 - before.1,
            offs.len() as u64,
            "every lookup of the miss bench must miss (stats {before:?} → {after:?})"
        );
        let mut i = 0usize;
        g.bench_function("l2_miss", |b| {
            b.iter(|| {
                i = (i + 1) & (offs.len() - 1);
                black_box(dev.block_status(black_box(offs[i]), CLUSTER))
            })
        });
        let (hits, misses) = q.cache_stats();
        eprintln!("lookup/l2_miss: cache hits {hits}, misses {misses}");
    }
    g.finish();
}

/// Walks the whole device extent by extent; returns the number of extents.
fn walk(dev: &dyn BlockDevice) -> u64 {
    let size = dev.size();
    let mut pos = 0;
    let mut n = 0;
    while pos < size {
        let e = dev.block_status(pos, size - pos).expect("block_status");
        pos += e.len;
        n += 1;
    }
    n
}

fn extent_walk(c: &mut Criterion) {
    let scratch = Scratch::new("qcow2kit-bench-walk-");
    let sparse = scratch.sparse_1tib(32);
    let img = support::open_qcow2(&sparse, None);
    let dev = img.device.clone();
    let extents = walk(dev.as_ref());
    eprintln!("extent_walk/sparse_1tib: {extents} extents per walk");

    let mut g = c.benchmark_group("extent_walk");
    support::short(&mut g);
    g.throughput(Throughput::Elements(extents));
    g.bench_function("sparse_1tib", |b| b.iter(|| walk(black_box(dev.as_ref()))));
    g.finish();
}

fn main() {
    // What criterion_main! does, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    lookup(&mut c);
    extent_walk(&mut c);
    c.final_summary();
}
