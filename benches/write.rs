//! The write path: 4 KiB allocating writes (each lands in a new cluster: allocation, refcount
//! update, copy-on-write of the rest of the cluster) and 4 KiB overwrites of owned clusters (in
//! place), on a qcow2kit-created image in the scratch directory; periodic flushes keep the
//! dirty metadata bounded as a guest's would.
//!
//! Run: `cargo bench --bench write`. Groups: `write_4k/allocating`, `write_4k/overwrite`.

mod support;

use criterion::{BatchSize, Criterion, Throughput};
use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::ops::create::{create_qcow2, CreateOptions};
use qcow2kit::BlockDevice;
use qcow2kit::Format;
use std::sync::Arc;
use support::{Scratch, CLUSTER};

/// Size of the images written to.
const SIZE: u64 = 1 << 30;
/// Writes between flushes.
const FLUSH_EVERY: u64 = 256;

fn fresh(scratch: &Scratch, name: &str) -> Arc<dyn BlockDevice> {
    let path = scratch.path(name);
    let _ = std::fs::remove_file(&path);
    let o = CreateOptions {
        size: Some(SIZE),
        ..CreateOptions::default()
    };
    create_qcow2(&path, &o).expect("creating the bench image");
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    open(&path, Format::Qcow2, &opts)
        .expect("opening the bench image")
        .device
}

fn write_4k(c: &mut Criterion) {
    let scratch = Scratch::new("qcow2kit-bench-write-");
    let buf = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("write_4k");
    support::short(&mut g);

    // Allocating: every write starts a new cluster, on a fresh image per iteration of 1024
    // writes (image creation is outside the measurement).
    g.throughput(Throughput::Bytes(4096 * 1024));
    g.bench_function("allocating", |b| {
        b.iter_batched_ref(
            || fresh(&scratch, "alloc.qcow2"),
            |dev| {
                for k in 0..1024u64 {
                    dev.write_at(&buf, k * CLUSTER).expect("write");
                    if (k + 1) % FLUSH_EVERY == 0 {
                        dev.flush().expect("flush");
                    }
                }
            },
            BatchSize::PerIteration,
        )
    });

    // Overwrite: clusters allocated once, then written in place.
    let dev = fresh(&scratch, "over.qcow2");
    let span = 4096 * CLUSTER;
    for i in 0..span / CLUSTER {
        dev.write_at(&buf, i * CLUSTER).expect("prefill");
    }
    dev.flush().expect("flush");
    let offs = support::random_offsets(1 << 14, span, 4096, 5);
    g.throughput(Throughput::Bytes(4096));
    let mut i = 0usize;
    g.bench_function("overwrite", |b| {
        b.iter(|| {
            dev.write_at(&buf, offs[i % offs.len()]).expect("write");
            i += 1;
        })
    });
    g.finish();
}

fn main() {
    // What criterion_main! does, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    write_4k(&mut c);
    c.final_summary();
}
