//! The read path: sequential 64 KiB and random 4 KiB reads from a fully allocated qcow2 image,
//! read through `FileStorage` and through the memory-mapped `MmapStorage` (`qcow2_mmap`), from a
//! 3-deep backing chain, and — as the reference — from a raw file of the same data, both through
//! `RawImage` and with plain `pread`; and 64 KiB reads of zlib / zstd compressed
//! clusters.
//!
//! Run: `cargo bench --bench read`. Groups: `seq_64k/{qcow2,chain3,qcow2_mmap,raw_image,raw_pread}`,
//! `rand_4k/{…same…}`, `compressed_64k/{zlib,zstd}`.

mod support;

use criterion::{black_box, Criterion, Throughput};
use qcow2kit::BlockDevice;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use support::{Scratch, CLUSTER, COMPRESSED_SIZE, IMAGE_SIZE};

const SEQ: usize = 64 << 10;
const RAND: usize = 4 << 10;
/// Random offsets per bench (a power of two; the benches cycle through them).
const RAND_OFFSETS: usize = 1 << 16;

/// What a bench reads from.
enum Source {
    Device(Arc<dyn BlockDevice>),
    File(File),
}

impl Source {
    fn read(&self, buf: &mut [u8], offset: u64) {
        match self {
            Source::Device(d) => d.read_at(buf, offset).expect("read_at"),
            Source::File(f) => f.read_exact_at(buf, offset).expect("pread"),
        }
    }
}

/// The qcow2 image at `path` over [`qcow2kit::io::MmapStorage`] instead of `FileStorage`.
fn mmap_qcow2(path: &std::path::Path) -> Arc<dyn BlockDevice> {
    let storage = qcow2kit::io::MmapStorage::open(path).expect("mapping the image");
    let opts = qcow2kit::OpenOptions::qemu_compatible().qcow2;
    let img =
        qcow2kit::Qcow2Image::open(Arc::new(storage), &opts).expect("opening the mapped image");
    Arc::new(img)
}

struct Images {
    _scratch: Scratch,
    sources: Vec<(&'static str, Source)>,
}

fn images() -> Images {
    let scratch = Scratch::new("qcow2kit-bench-read-");
    let raw = scratch.text_raw("full.raw", IMAGE_SIZE, 1);
    let full = scratch.convert_qcow2("full.raw", "full.qcow2", "", false);
    let top = scratch.chain3("full.qcow2", IMAGE_SIZE);
    let sources = vec![
        (
            "qcow2",
            Source::Device(support::open_qcow2(&full, None).device),
        ),
        (
            "chain3",
            Source::Device(support::open_qcow2(&top, None).device),
        ),
        ("qcow2_mmap", Source::Device(mmap_qcow2(&full))),
        ("raw_image", Source::Device(support::open_raw(&raw).device)),
        (
            "raw_pread",
            Source::File(File::open(&raw).expect("opening the raw file")),
        ),
    ];
    Images {
        _scratch: scratch,
        sources,
    }
}

fn uncompressed(c: &mut Criterion) {
    let im = images();
    let mut buf = vec![0u8; SEQ];
    // Warm every cache (page cache, L2 cache) with one whole pass, and check that the images
    // of the same data read the same (chain3 differs from them by design).
    let mut reference = vec![0u8; SEQ];
    for off in (0..IMAGE_SIZE).step_by(SEQ) {
        for (name, s) in &im.sources {
            s.read(&mut buf, off);
            if *name == "raw_pread" {
                reference.copy_from_slice(&buf);
            }
        }
        for (name, s) in &im.sources {
            if *name == "qcow2" || *name == "qcow2_mmap" || *name == "raw_image" {
                s.read(&mut buf, off);
                assert!(
                    buf == reference,
                    "{name} differs from the raw file at {off}"
                );
            }
        }
    }

    let mut g = c.benchmark_group("seq_64k");
    support::short(&mut g);
    g.throughput(Throughput::Bytes(SEQ as u64));
    for (name, s) in &im.sources {
        let mut off = 0u64;
        g.bench_function(*name, |b| {
            b.iter(|| {
                s.read(&mut buf, off);
                off = (off + SEQ as u64) % IMAGE_SIZE;
                black_box(&buf);
            })
        });
    }
    g.finish();

    let offs = support::random_offsets(RAND_OFFSETS, IMAGE_SIZE, RAND as u64, 21);
    let mut buf = vec![0u8; RAND];
    let mut g = c.benchmark_group("rand_4k");
    support::short(&mut g);
    g.throughput(Throughput::Bytes(RAND as u64));
    for (name, s) in &im.sources {
        let mut i = 0usize;
        g.bench_function(*name, |b| {
            b.iter(|| {
                i = (i + 1) & (RAND_OFFSETS - 1);
                s.read(&mut buf, offs[i]);
                black_box(&buf);
            })
        });
    }
    g.finish();
}

fn compressed(c: &mut Criterion) {
    let scratch = Scratch::new("qcow2kit-bench-compressed-");
    let raw = scratch.text_raw("text.raw", COMPRESSED_SIZE, 2);
    let raw_len = std::fs::metadata(&raw).expect("raw size").len();
    let mut g = c.benchmark_group("compressed_64k");
    support::short(&mut g);
    g.throughput(Throughput::Bytes(CLUSTER));
    for kind in ["zlib", "zstd"] {
        let name = format!("{kind}.qcow2");
        let path =
            scratch.convert_qcow2("text.raw", &name, &format!("compression_type={kind}"), true);
        let file_len = std::fs::metadata(&path).expect("image size").len();
        eprintln!(
            "compressed_64k/{kind}: {raw_len} bytes stored in {file_len} ({:.2}:1)",
            raw_len as f64 / file_len as f64
        );
        let dev = support::open_qcow2(&path, None).device;
        let e = dev.block_status(0, CLUSTER).expect("block_status");
        assert!(e.compressed, "{name} must hold compressed clusters");
        let mut buf = vec![0u8; CLUSTER as usize];
        let mut off = 0u64;
        g.bench_function(kind, |b| {
            b.iter(|| {
                dev.read_at(&mut buf, off).expect("read_at");
                off = (off + CLUSTER) % COMPRESSED_SIZE;
                black_box(&buf);
            })
        });
    }
    g.finish();
}

fn main() {
    // What criterion_main! does, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    uncompressed(&mut c);
    compressed(&mut c);
    c.final_summary();
}
