//! Random 4 KiB reads from 1, 2 and 4 threads sharing one `Arc<dyn BlockDevice>`: do reads
//! scale with threads? The same on a raw image shows what the machine allows.
//!
//! Run: `cargo bench --bench concurrent`. Groups: `concurrent_rand_4k/{qcow2,raw_image}/{1,2,4}`.

mod support;

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use qcow2kit::BlockDevice;
use std::sync::Arc;
use support::{Scratch, IMAGE_SIZE};

const READ: usize = 4 << 10;
/// Reads each thread does per iteration.
const READS_PER_THREAD: usize = 2048;
/// Random offsets (a power of two); thread `t` starts at a different place in the vector.
const OFFSETS: usize = 1 << 16;

fn run(dev: &Arc<dyn BlockDevice>, offs: &[u64], threads: usize, start: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let dev = Arc::clone(dev);
            s.spawn(move || {
                let mut buf = vec![0u8; READ];
                let base = start + t * (OFFSETS / 4);
                for k in 0..READS_PER_THREAD {
                    let off = offs[(base + k) & (OFFSETS - 1)];
                    dev.read_at(&mut buf, off).expect("read_at");
                }
                black_box(&buf);
            });
        }
    });
}

fn concurrent(c: &mut Criterion) {
    let scratch = Scratch::new("qcow2kit-bench-concurrent-");
    let raw = scratch.text_raw("full.raw", IMAGE_SIZE, 1);
    let full = scratch.convert_qcow2("full.raw", "full.qcow2", "", false);
    let devices: Vec<(&str, Arc<dyn BlockDevice>)> = vec![
        ("qcow2", support::open_qcow2(&full, None).device),
        ("raw_image", support::open_raw(&raw).device),
    ];
    let offs = support::random_offsets(OFFSETS, IMAGE_SIZE, READ as u64, 31);
    // Warm the L2 cache and the page cache.
    for (_, d) in &devices {
        run(d, &offs, 1, 0);
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..IMAGE_SIZE).step_by(buf.len()) {
            d.read_at(&mut buf, off).expect("read_at");
        }
    }

    let mut g = c.benchmark_group("concurrent_rand_4k");
    support::short(&mut g);
    for (name, dev) in &devices {
        for threads in [1usize, 2, 4] {
            g.throughput(Throughput::Bytes(
                (threads * READS_PER_THREAD * READ) as u64,
            ));
            let mut start = 0usize;
            g.bench_with_input(BenchmarkId::new(*name, threads), &threads, |b, &n| {
                b.iter(|| {
                    run(dev, &offs, n, start);
                    start = (start + READS_PER_THREAD) & (OFFSETS - 1);
                })
            });
        }
    }
    g.finish();
}

fn main() {
    // What criterion_main! does, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    concurrent(&mut c);
    c.final_summary();
}
