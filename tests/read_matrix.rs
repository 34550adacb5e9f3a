//! Differential read tests judged by qemu-img.
//!
//! Every test builds images with `qemu-img` / `qemu-io` (qemu-utils 10.x) in a temporary
//! directory, reads the whole device through qcow2kit (`chain::open` + `BlockDevice::read_at` in
//! chunks of varying size) and compares it byte for byte with `qemu-img convert -O raw` of the
//! same image. Missing or failing qemu tools make the tests fail, never skip.
//!
//! Data is written with `qemu-io write -s FILE` (a 4093-byte random pattern file, so every
//! misplaced byte shows) and `write -P` patterns, at offsets that straddle cluster, subcluster
//! and L2-table boundaries, and in an order that makes host clusters non-contiguous.

#[path = "support/read_helpers.rs"]
mod read_helpers;

use qcow2kit::chain::OpenOptions;
use qcow2kit::Format;
use qcow2kit::{BlockDevice, Error, SnapshotRef};
use read_helpers::{
    assert_same_bytes, check_chain_status, compare_device, compressed_extent, hide_backing_format,
    mixed_bytes, open_image, Rng, Work,
};
use std::fs;
use std::path::Path;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

use Format::{Qcow2, Raw};

/// Guest bytes mapped by one standard L2 table.
fn l2_span(cs: u64) -> u64 {
    cs * (cs / 8)
}

/// qemu-io writes that straddle cluster and L2 boundaries, issued high offsets first so host
/// clusters are allocated out of guest order. All ranges lie inside `size`.
fn scatter_writes(cs: u64, size: u64) -> Vec<String> {
    let span = l2_span(cs);
    let mut cmds = Vec::new();
    let mut w = |kind: &str, off: u64, len: u64| {
        if off >= size {
            return;
        }
        let len = len.min(size - off);
        if len > 0 {
            cmds.push(format!("write {kind} {off} {len}"));
        }
    };
    // Tail of the device, ending exactly at its end.
    w("-s rand.pat", size - 3 * cs - 100, 3 * cs + 100);
    // Every L2 boundary inside the device (at most 6 of them), straddled.
    let mut b = span;
    let mut n = 0;
    while b < size && n < 6 {
        w(&format!("-P 0x{:02x}", 0x11 + n), b - cs - 7, 2 * cs + 14);
        w("-s rand.pat", b - 3, 6);
        b += span;
        n += 1;
    }
    // Cluster boundaries near the start.
    w("-P 0xa5", 3 * cs + 5, 2 * cs);
    w("-s rand.pat", cs - cs / 2 - 1, cs + 3);
    w("-s text.pat", 5 * cs / 2, cs);
    // Explicit zero data (not a zero write).
    w("-P 0x00", 7 * cs, cs + 1);
    // Partial overwrites of clusters written above.
    w("-s rand.pat", 0, cs / 3 + 1);
    w("-P 0x3c", 3 * cs + cs / 2, 9);
    cmds
}

/// Cluster sizes × refcount widths × compat levels, with writes across boundaries.
#[test]
fn cluster_refcount_compat_matrix() {
    let w = Work::new();
    // (cluster size, refcount_bits, compat, virtual size). v2 (0.10) only has 16-bit refcounts.
    let configs: [(u64, u32, &str, u64); 8] = [
        (512, 1, "1.1", 2 * M),
        (512, 16, "0.10", 2 * M + 3 * 512),
        (4 * K, 64, "1.1", 6 * M),
        (4 * K, 16, "0.10", 5 * M - 512),
        (64 * K, 16, "1.1", 512 * M + 2 * M),
        (64 * K, 1, "1.1", 4 * M),
        (2 * M, 16, "0.10", 8 * M),
        (2 * M, 64, "1.1", 10 * M - 4 * K),
    ];
    for (i, &(cs, rb, compat, size)) in configs.iter().enumerate() {
        let name = format!("m{i}.qcow2");
        let o = format!("cluster_size={cs},refcount_bits={rb},compat={compat}");
        w.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            &name,
            &size.to_string(),
        ]);
        w.io("qcow2", &name, &scatter_writes(cs, size));
        let opened = w.check(&name, Qcow2);
        let q = opened.qcow2.expect("qcow2 image");
        assert_eq!(q.cluster_size(), cs);
        assert_eq!(q.header().refcount_bits(), rb, "{name}: refcount_bits");
        let version = if compat == "0.10" { 2 } else { 3 };
        assert_eq!(q.header().version, version, "{name}: version");
        check_chain_status(opened.device.as_ref(), &w.qemu_map(&name, "qcow2"), &name);
    }
}

/// `qemu-img convert -c` of mixed data: zlib and zstd, several cluster sizes, v2 and v3.
#[test]
fn compressed_by_convert() {
    let w = Work::new();
    // Not a multiple of any cluster size ≥ 4 KiB: the last cluster is partial.
    let data = mixed_bytes((3 * M + 7 * 512) as usize, 42);
    w.write_file("src.raw", &data);
    let configs = [
        ("zlib", 512, "1.1"),
        ("zlib", 4 * K, "1.1"),
        ("zlib", 64 * K, "0.10"),
        ("zstd", 64 * K, "1.1"),
        ("zstd", 2 * M, "1.1"),
    ];
    for (ct, cs, compat) in configs {
        let name = format!("c-{ct}-{cs}-{compat}.qcow2");
        let o = if compat == "0.10" {
            format!("cluster_size={cs},compat=0.10")
        } else {
            format!("cluster_size={cs},compat={compat},compression_type={ct}")
        };
        w.img(&[
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &o, "src.raw", &name,
        ]);
        let opened = w.check(&name, Qcow2);
        // qcow2kit also reproduces the original raw bytes.
        let mut all = vec![0u8; data.len()];
        opened.device.read_at(&mut all, 0).expect("read_at");
        assert_same_bytes(&all, &data, 0, &format!("{name} vs its raw source"));
        let q = opened.qcow2.as_ref().expect("qcow2");
        assert_eq!(
            q.header().compression_type.name(),
            ct,
            "{name}: compression type"
        );
        let map = w.qemu_map(&name, "qcow2");
        assert!(
            map.iter().any(|m| m.compressed),
            "{name}: qemu-img compressed nothing"
        );
        check_chain_status(opened.device.as_ref(), &map, &name);
    }
}

/// `qemu-io write -c` (cluster-aligned compressed writes) mixed with normal writes, partial
/// overwrites of compressed clusters, and a last compressed cluster that the file ends inside.
#[test]
fn compressed_by_qemu_io_and_at_end_of_file() {
    let w = Work::new();
    // (compression type, cluster size, virtual size); the last cluster may be partial.
    let configs = [
        ("zlib", 64 * K, 4 * M),
        ("zstd", 4 * K, M + 1536),
        ("zlib", 512, 256 * K),
    ];
    for (ct, cs, size) in configs {
        let name = format!("wc-{ct}-{cs}.qcow2");
        let o = format!("cluster_size={cs},compression_type={ct}");
        w.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            &name,
            &size.to_string(),
        ]);
        let last = (size - 1) / cs * cs;
        // qemu only writes compressed clusters into unallocated ones.
        let cmds = [
            format!("write -c -s text.pat {cs} {}", 2 * cs),
            format!("write -c -s rand.pat {} {cs}", 8 * cs),
            format!("write -c -P 0x33 {} {}", 10 * cs, 3 * cs),
            format!("write -c -s text.pat {} {}", 20 * cs, 5 * cs),
            format!("write -s text.pat 0 {}", 2 * cs + 1),
            format!("write -s rand.pat {} {cs}", 3 * cs + 17),
            // Partial overwrites of compressed clusters (qemu decompresses and rewrites them).
            format!("write -s rand.pat {} 100", 21 * cs + cs / 2 + 3),
            format!("write -P 0x34 {} 3", 11 * cs - 1),
        ];
        w.io("qcow2", &name, &cmds);
        // The final write, in a new process so qemu starts a fresh host cluster for compressed
        // data at the end of the file: a compressed (possibly partial) last guest cluster.
        w.io(
            "qcow2",
            &name,
            &[format!("write -c -s text.pat {last} {}", size - last)],
        );
        let path = w.path(&name);
        let file_len = fs::metadata(&path).expect("stat").len();
        let (host, stored_end) = compressed_extent(&path, last);
        assert!(
            host < file_len && file_len < stored_end,
            "{name}: the file (len {file_len}) should end inside the last compressed cluster \
             [{host}, {stored_end})"
        );
        let opened = w.check(&name, Qcow2);
        check_chain_status(opened.device.as_ref(), &w.qemu_map(&name, "qcow2"), &name);
    }
}

/// Extended L2 entries: partial subcluster writes over a backing file, zero writes on
/// subclusters (aligned, unaligned, with unmap), discards, cluster sizes 16 KiB .. 2 MiB.
#[test]
fn extended_l2_subclusters_over_backing() {
    let w = Work::new();
    // (cluster size, backing format)
    let configs = [(16 * K, "qcow2"), (64 * K, "raw"), (2 * M, "qcow2")];
    for (i, (cs, bfmt)) in configs.into_iter().enumerate() {
        let sc = cs / 32;
        let size = (8 * cs).max(M);
        let base = format!("xb{i}.{bfmt}");
        let top = format!("x{i}.qcow2");
        if bfmt == "raw" {
            w.write_file(&base, &mixed_bytes(size as usize, i as u64));
        } else {
            w.img(&["create", "-q", "-f", "qcow2", &base, &size.to_string()]);
            w.io("qcow2", &base, &[format!("write -s rand.pat 0 {size}")]);
        }
        let o = format!("extended_l2=on,cluster_size={cs}");
        w.img(&[
            "create", "-q", "-f", "qcow2", "-o", &o, "-b", &base, "-F", bfmt, &top,
        ]);
        let cmds = [
            format!("write -P 0x21 {} {}", 3 * sc + 7, sc / 2),
            format!("write -s text.pat {} {}", cs - sc - 5, 2 * sc + 10),
            format!("write -s rand.pat {} {}", 2 * cs, 30 * sc),
            format!("write -z {} {}", 2 * cs + 4 * sc, 3 * sc),
            format!("write -z {} {}", 2 * cs + 9 * sc + 1, sc),
            format!("discard {} {}", 2 * cs + 20 * sc, 4 * sc),
            format!("write -z {} {}", 3 * cs + 5 * sc, 2 * sc),
            format!("write -z -u {} {}", 3 * cs + 10 * sc, 2 * sc),
            format!("write -z {} {cs}", 4 * cs),
            format!("write -P 0x44 {} {sc}", 5 * cs + 31 * sc),
            format!("write -P 0x45 {} {}", 6 * cs + 17 * sc + 3, sc + 11),
        ];
        w.io("qcow2", &top, &cmds);
        let opened = w.check(&top, Qcow2);
        assert!(opened
            .qcow2
            .as_ref()
            .expect("qcow2")
            .header()
            .has_extended_l2());
        let map = w.qemu_map(&top, "qcow2");
        // Subcluster granularity really is exercised: sub-cluster zero runs in this layer.
        assert!(
            map.iter()
                .any(|m| m.depth == 0 && m.zero && !m.data && m.length < cs),
            "{top}: no subcluster zero run in {map:?}"
        );
        check_chain_status(opened.device.as_ref(), &map, &top);
    }
}

/// Zero writes and discards in v3 overlays over backing data (zero flag), and zero writes on a
/// v2 overlay (real zeros).
#[test]
fn zero_writes_and_discards_in_overlays() {
    let w = Work::new();
    let size = 4 * M;
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "base.qcow2",
        "4M",
    ]);
    w.io(
        "qcow2",
        "base.qcow2",
        &[format!("write -s rand.pat 0 {size}")],
    );
    for (cs, compat) in [
        (64 * K, "1.1"),
        (4 * K, "1.1"),
        (512, "1.1"),
        (64 * K, "0.10"),
    ] {
        let top = format!("z-{cs}-{compat}.qcow2");
        let o = format!("cluster_size={cs},compat={compat}");
        w.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &top,
        ]);
        let cmds = [
            format!("write -P 0x61 0 {}", 6 * cs),
            // Zeros over data this layer wrote, and over backing data.
            format!("write -z {cs} {cs}"),
            format!("write -z {} {}", 8 * cs, 2 * cs),
            // Unaligned zero writes (partial clusters are written as data).
            format!("write -z {} {}", 3 * cs + 5, cs),
            format!("write -z {} {}", 12 * cs + cs / 2, cs / 4),
            // With unmap allowed.
            format!("write -z -u {} {}", 14 * cs, 3 * cs),
            // Discards: over data, over backing data, partial.
            format!("discard {} {}", 4 * cs, cs),
            format!("discard {} {}", 20 * cs, 4 * cs),
            format!("discard {} {}", 30 * cs + 100, cs),
            // Zeros at the very end of the device.
            format!("write -z {} {cs}", size - cs),
        ];
        w.io("qcow2", &top, &cmds);
        let opened = w.check(&top, Qcow2);
        check_chain_status(opened.device.as_ref(), &w.qemu_map(&top, "qcow2"), &top);
    }
}

/// Backing chains mixing raw and qcow2 layers with different virtual and cluster sizes, with
/// relative backing names resolved against each image's directory (the test process's cwd is
/// elsewhere, and the judge runs from `/`), plus a layer whose backing format must be probed.
#[test]
fn backing_chains_mixed_formats_relative_names() {
    let w = Work::new();
    w.mkdir("layers/mid");
    w.mkdir("top");
    // base.raw: 3 MiB, fully written (no holes, so qemu-img map reports it all as data).
    w.write_file("layers/base.raw", &mixed_bytes(3 * M as usize, 3));
    // mid: longer than its backing file, 4 KiB clusters.
    w.img_in(
        "layers/mid",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "../base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "5M",
        ],
    );
    let mut cmds = scatter_writes(4 * K, 5 * M);
    cmds.push(format!("write -s rand.pat {} {}", 3 * M - 5000, 10_000)); // straddles base's end
    cmds.push(format!("write -z {} {}", 2 * M, 64 * K));
    w.io("qcow2", "layers/mid/mid.qcow2", &cmds);
    // top: shorter than its backing file, 64 KiB clusters.
    w.img_in(
        "top",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../layers/mid/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    let cmds = [
        "write -P 0x71 100000 200000",
        "write -c -s text.pat 1048576 131072",
        "write -z 2162688 65536",
        "discard 3145728 65536",
        "write -s rand.pat 4128768 65536",
    ];
    w.io("qcow2", "top/top.qcow2", &cmds);
    // top2: longer than its backing file, 512-byte clusters, v2.
    w.img_in(
        "top",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,compat=0.10",
            "-b",
            "../layers/mid/mid.qcow2",
            "-F",
            "qcow2",
            "top2.qcow2",
            "7M",
        ],
    );
    let cmds = [
        "write -s rand.pat 5241000 2000", // straddles mid's end
        "write -P 0x72 6000000 70000",
        "write -z 1000448 4096",
    ];
    w.io("qcow2", "top/top2.qcow2", &cmds);
    // probe: a raw and a qcow2 backing file whose format is not recorded.
    w.img_in(
        "top",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../layers/base.raw",
            "-F",
            "raw",
            "p1.qcow2",
        ],
    );
    w.io("qcow2", "top/p1.qcow2", &["write -P 0x73 65536 65536"]);
    hide_backing_format(&w.path("top/p1.qcow2"));
    w.img_in(
        "top",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "p2.qcow2",
        ],
    );
    w.io("qcow2", "top/p2.qcow2", &["write -P 0x74 0 4096"]);
    hide_backing_format(&w.path("top/p2.qcow2"));

    // A raw backing file whose length is not a multiple of 512 (qemu rounds its size up).
    w.write_file("layers/odd.raw", &mixed_bytes(1_000_003, 4));
    w.img_in(
        "top",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "../layers/odd.raw",
            "-F",
            "raw",
            "o.qcow2",
            "2M",
        ],
    );
    w.io(
        "qcow2",
        "top/o.qcow2",
        &["write -P 0x75 995000 1000", "write -P 0x76 1003520 4096"],
    );

    let cwd = std::env::current_dir().expect("cwd");
    assert!(
        !cwd.starts_with(w.dir.path()),
        "the test must not run inside the image directory"
    );
    for (image, backing, depth) in [
        ("layers/mid/mid.qcow2", "../base.raw", 1),
        ("top/top.qcow2", "../layers/mid/mid.qcow2", 2),
        ("top/top2.qcow2", "../layers/mid/mid.qcow2", 2),
        ("top/p1.qcow2", "../layers/base.raw", 1),
        ("top/p2.qcow2", "top.qcow2", 3),
        ("top/o.qcow2", "../layers/odd.raw", 1),
    ] {
        let opened = w.check(image, Qcow2);
        let q = opened.qcow2.as_ref().expect("qcow2");
        assert_eq!(
            q.backing_file_name(),
            Some(backing.as_bytes().to_vec()),
            "{image}: backing name"
        );
        let mut n = 0;
        let mut d: &dyn BlockDevice = opened.device.as_ref();
        while let Some(b) = d.backing() {
            d = b.as_ref();
            n += 1;
        }
        assert_eq!(n, depth, "{image}: chain depth");
        check_chain_status(opened.device.as_ref(), &w.qemu_map(image, "qcow2"), image);
    }
    // The raw files on their own.
    for raw in ["layers/base.raw", "layers/odd.raw"] {
        let opened = w.check(raw, Raw);
        check_chain_status(opened.device.as_ref(), &w.qemu_map(raw, "raw"), raw);
    }
}

/// External data files: `data_file=` (qcow2 metadata decides) and `data_file_raw=on`.
#[test]
fn external_data_file() {
    let w = Work::new();
    for (name, data, extra, cs) in [
        ("d1.qcow2", "d1.data", "", 64 * K),
        ("d2.qcow2", "d2.data", ",data_file_raw=on", 4 * K),
    ] {
        let o = format!("data_file={data},cluster_size={cs}{extra}");
        w.img(&["create", "-q", "-f", "qcow2", "-o", &o, name, "4M"]);
        let mut cmds = scatter_writes(cs, 4 * M);
        cmds.push(format!("write -z {} {}", 2 * cs, 2 * cs));
        cmds.push(format!("discard {} {}", 5 * cs, cs));
        w.io("qcow2", name, &cmds);
        // qemu-img resolves a relative data-file name against its cwd (not the image's
        // directory as it does for backing files), so it runs from the image's directory;
        // qcow2kit resolves it against the image's directory with the cwd elsewhere.
        let opts = OpenOptions::qemu_compatible();
        let opened = w.check_reads_in(w.dir.path(), name, Qcow2, &opts, &[]);
        let q = opened.qcow2.as_ref().expect("qcow2");
        assert!(q.has_data_file(), "{name}: data file flag");
        assert_eq!(
            q.data_file_name(),
            Some(data.as_bytes().to_vec()),
            "{name}: data file name"
        );
        if !extra.is_empty() {
            // With data_file_raw the data file is itself a valid raw image of the disk.
            let raw = w.qemu_raw_in(w.dir.path(), name, "qcow2", &[]);
            let r = open_image(&w.path(data), Raw, &OpenOptions::qemu_compatible());
            compare_device(r.device.as_ref(), &raw, "raw data file vs its qcow2 image");
        }
    }
}

/// A persistent dirty bitmap in the image does not change what reads return.
#[test]
fn persistent_bitmap_does_not_affect_reads() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "bm.qcow2", "4M"]);
    w.io("qcow2", "bm.qcow2", &scatter_writes(64 * K, 4 * M)[..4]);
    w.img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    w.img(&[
        "bitmap",
        "--add",
        "-g",
        "512k",
        "bm.qcow2",
        "b1",
        "--disable",
    ]);
    // Writes with the bitmaps loaded (b0 records them).
    w.io("qcow2", "bm.qcow2", &scatter_writes(64 * K, 4 * M)[4..]);
    let opened = w.check("bm.qcow2", Qcow2);
    let q = opened.qcow2.expect("qcow2");
    let bitmaps = q.bitmaps();
    let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b0", "b1"], "bitmap directory");
}

/// An image left dirty (lazy refcounts, qemu-io aborted without closing) reads like qemu-img.
#[test]
fn dirty_image_with_lazy_refcounts() {
    let w = Work::new();
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "4M",
    ]);
    let out = std::process::Command::new("qemu-io")
        .current_dir(w.dir.path())
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -s rand.pat 1500000 300000",
        ])
        .args([
            "-c",
            "flush",
            "-c",
            "write -P 0x5b 3M 65536",
            "-c",
            "abort",
            "dirty.qcow2",
        ])
        .output()
        .expect("cannot run qemu-io (Debian package qemu-utils)");
    // abort() kills qemu-io with SIGABRT (its buffered stdout is lost); anything else means
    // a command failed before it.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(6),
        "qemu-io should die of SIGABRT: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let info = w.img(&["info", "--output", "json", "-f", "qcow2", "dirty.qcow2"]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(
        v["dirty-flag"],
        serde_json::Value::Bool(true),
        "image should be dirty: {info}"
    );
    let opened = w.check("dirty.qcow2", Qcow2);
    // The flushed write is there (so the comparison is not between two empty disks).
    let mut head = vec![0u8; 4096];
    opened.device.read_at(&mut head, 0).expect("read_at");
    assert!(
        head.iter().all(|&b| b == 0x5a),
        "data written before the flush"
    );
    check_chain_status(
        opened.device.as_ref(),
        &w.qemu_map("dirty.qcow2", "qcow2"),
        "dirty",
    );
}

/// Internal snapshots read by name, id, and id-or-name, against `qemu-img convert -l`.
#[test]
fn internal_snapshots() {
    let w = Work::new();
    for compat in ["1.1", "0.10"] {
        let name = format!("snap-{compat}.qcow2");
        let o = format!("compat={compat},cluster_size=4k");
        w.img(&["create", "-q", "-f", "qcow2", "-o", &o, &name, "3M"]);
        w.io("qcow2", &name, &scatter_writes(4 * K, 3 * M));
        w.img(&["snapshot", "-c", "s1", &name]); // id 1
        w.io(
            "qcow2",
            &name,
            &[
                "write -P 0x81 0 100000",
                "write -z 200704 8192",
                "discard 1048576 65536",
            ],
        );
        // A snapshot whose *name* is another snapshot's id: id 2, name "1".
        w.img(&["snapshot", "-c", "1", &name]);
        w.io(
            "qcow2",
            &name,
            &[
                "write -s rand.pat 50000 1000000",
                "write -c -s text.pat 2621440 8192",
            ],
        );

        let with = |s: SnapshotRef| OpenOptions {
            snapshot: Some(s),
            ..OpenOptions::qemu_compatible()
        };
        let cases = [
            (SnapshotRef::Name("s1".into()), "snapshot.name=s1"),
            (SnapshotRef::Id("1".into()), "snapshot.id=1"),
            (SnapshotRef::IdOrName("s1".into()), "s1"),
            (SnapshotRef::Name("1".into()), "snapshot.name=1"),
            (SnapshotRef::Id("2".into()), "snapshot.id=2"),
            // Id first: "1" is snapshot id 1 (s1), not the snapshot named "1".
            (SnapshotRef::IdOrName("1".into()), "1"),
        ];
        for (r, l) in cases {
            let opened = w.check_reads(&name, Qcow2, &with(r.clone()), &["-l", l]);
            let view = opened
                .qcow2
                .as_ref()
                .and_then(|q| q.snapshot_view().cloned());
            assert!(view.is_some(), "{name} {r:?}: no snapshot view");
        }
        // The snapshots differ from each other and from the active image.
        let read = |o: &OpenOptions| {
            let d = open_image(&w.path(&name), Qcow2, o).device;
            let mut v = vec![0u8; d.size() as usize];
            d.read_at(&mut v, 0).expect("read_at");
            v
        };
        let s1 = read(&with(SnapshotRef::Id("1".into())));
        let s2 = read(&with(SnapshotRef::Id("2".into())));
        let active = read(&OpenOptions::qemu_compatible());
        assert!(
            s1 != s2 && s2 != active && s1 != active,
            "{name}: views should differ"
        );
        w.check(&name, Qcow2);

        for missing in [
            SnapshotRef::Name("nope".into()),
            SnapshotRef::Id("9".into()),
        ] {
            match qcow2kit::chain::open(&w.path(&name), Qcow2, &with(missing.clone())) {
                Err(Error::SnapshotNotFound(s)) => assert!(!s.is_empty()),
                Err(e) => panic!("{name} {missing:?}: expected SnapshotNotFound, got {e}"),
                Ok(_) => panic!("{name} {missing:?}: opened a snapshot that does not exist"),
            }
        }
    }
}

/// A snapshot taken before the image grew: qemu-img reads it at the *current* virtual size
/// (qcow2_snapshot_load_tmp keeps bs->total_sectors), and so does qcow2kit; past the
/// snapshot's L1 table it reads as unallocated (zeros here: no backing file).
#[test]
fn snapshot_of_a_smaller_disk() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "grow.qcow2", "2M"]);
    w.io("qcow2", "grow.qcow2", &scatter_writes(64 * K, 2 * M));
    w.img(&["snapshot", "-c", "small", "grow.qcow2"]);
    w.img(&["resize", "-q", "grow.qcow2", "3M"]);
    w.io("qcow2", "grow.qcow2", &["write -P 0x91 2000000 200000"]);
    w.check("grow.qcow2", Qcow2);
    let opts = OpenOptions {
        snapshot: Some(SnapshotRef::Name("small".into())),
        ..OpenOptions::qemu_compatible()
    };
    let dev = open_image(&w.path("grow.qcow2"), Qcow2, &opts).device;
    let raw = fs::read(w.qemu_raw("grow.qcow2", "qcow2", &["-l", "snapshot.name=small"]))
        .expect("reading qemu-img output");
    // As qemu-img does, the snapshot is read at the image's current size (3 MiB); past the
    // snapshot's own 2 MiB nothing is allocated.
    assert_eq!(dev.size(), 3 * M, "snapshot view size");
    assert_eq!(raw.len() as u64, 3 * M);
    let mut ours = vec![0u8; raw.len()];
    dev.read_at(&mut ours, 0).expect("read_at");
    assert_same_bytes(&ours, &raw, 0, "snapshot 'small'");
    assert!(
        raw[2 * M as usize..].iter().all(|&b| b == 0),
        "qemu-img's bytes past the snapshot's size"
    );
}

/// A one-slice L2 cache (constant eviction) reads the same bytes as the default cache.
#[test]
fn tiny_l2_cache_reads_the_same() {
    let w = Work::new();
    // 512-byte clusters: one L2 table per 32 KiB, 128 tables. 16 KiB clusters, 48 MiB: several
    // 4 KiB slices per L2 table and two tables.
    for (cs, size, stride) in [(512, 4 * M, 20_011u64), (16 * K, 48 * M, 1_500_007)] {
        let name = format!("cache-{cs}.qcow2");
        let o = format!("cluster_size={cs}");
        w.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            &name,
            &size.to_string(),
        ]);
        let mut cmds: Vec<String> = Vec::new();
        let mut off = size - 1000;
        let mut i = 0u64;
        while off > 0 && cmds.len() < 400 {
            let src = if i % 2 == 0 {
                "-s rand.pat".to_string()
            } else {
                format!("-P {}", i % 255)
            };
            cmds.push(format!("write {src} {off} {}", 700.min(size - off)));
            off = off.saturating_sub(stride);
            i += 1;
        }
        w.io("qcow2", &name, &cmds);
        let mut tiny = OpenOptions::qemu_compatible();
        tiny.qcow2.l2_cache_bytes = 1;
        let raw = w.qemu_raw(&name, "qcow2", &[]);
        let d = open_image(&w.path(&name), Qcow2, &OpenOptions::qemu_compatible());
        let t = open_image(&w.path(&name), Qcow2, &tiny);
        let (dq, tq) = (d.qcow2.expect("qcow2"), t.qcow2.expect("qcow2"));
        for pass in 0..2 {
            let before = (dq.cache_stats().1, tq.cache_stats().1);
            compare_device(d.device.as_ref(), &raw, &format!("{name} default cache"));
            compare_device(t.device.as_ref(), &raw, &format!("{name} tiny cache"));
            let misses = (dq.cache_stats().1 - before.0, tq.cache_stats().1 - before.1);
            if pass == 1 {
                assert_eq!(misses.0, 0, "{name}: default cache should hold every slice");
                assert!(
                    misses.1 > 0,
                    "{name}: the tiny cache should have evicted slices"
                );
            }
        }
    }
}

/// Four threads reading random ranges of one chain concurrently get qemu-img's bytes.
#[test]
fn concurrent_random_reads() {
    let w = Work::new();
    let size = 4 * M;
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "cbase.qcow2",
        "4M",
    ]);
    w.io("qcow2", "cbase.qcow2", &scatter_writes(512, size));
    w.io(
        "qcow2",
        "cbase.qcow2",
        &["write -s rand.pat 1000000 1500000"],
    );
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "cbase.qcow2",
        "-F",
        "qcow2",
        "ctop.qcow2",
    ]);
    // Compressed clusters first (qemu compresses only into unallocated clusters), then
    // ordinary writes partly over them.
    let mut cmds: Vec<String> = (0..40)
        .map(|i| format!("write -c -s text.pat {} 4096", (i * 97 % 1024) * 4096))
        .collect();
    cmds.extend(scatter_writes(4 * K, size));
    cmds.push("write -z 1200000 300000".into());
    w.io("qcow2", "ctop.qcow2", &cmds);
    let expected = fs::read(w.qemu_raw("ctop.qcow2", "qcow2", &[])).expect("reading judge");
    let mut tiny = OpenOptions::qemu_compatible();
    tiny.qcow2.l2_cache_bytes = 1;
    for opts in [OpenOptions::qemu_compatible(), tiny] {
        let dev = open_image(&w.path("ctop.qcow2"), Qcow2, &opts).device;
        assert_eq!(dev.size(), expected.len() as u64);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (dev, expected) = (&dev, &expected);
                s.spawn(move || {
                    let mut r = Rng(0xc0ffee + t);
                    let mut buf = Vec::new();
                    for _ in 0..300 {
                        let max = if r.below(4) == 0 { 600 * K } else { 20 * K };
                        let len = 1 + r.below(max);
                        let off = r.below(size - len + 1);
                        buf.resize(len as usize, 0xee);
                        dev.read_at(&mut buf, off).expect("concurrent read_at");
                        let want = &expected[off as usize..(off + len) as usize];
                        assert_same_bytes(&buf, want, off, &format!("thread {t}"));
                    }
                });
            }
        });
    }
}

/// `chain_status` over a deep chain mixing every kind of extent: tiles the device, agrees with
/// each layer's own `block_status` and with `qemu-img map`, and non-data reads as zeros.
#[test]
fn chain_status_matches_layers_and_qemu_map() {
    let w = Work::new();
    // raw (2 MiB) <- qcow2 512 B clusters (3 MiB) <- extended L2 32 KiB (3 MiB) <- 4 KiB (4 MiB)
    w.write_file("s0.raw", &mixed_bytes(2 * M as usize, 9));
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "s0.raw",
        "-F",
        "raw",
        "s1.qcow2",
        "3M",
    ]);
    w.io("qcow2", "s1.qcow2", &scatter_writes(512, 3 * M));
    w.io(
        "qcow2",
        "s1.qcow2",
        &["write -z 500000 70000", "write -c 1048576 512"],
    );
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=32k,extended_l2=on",
        "-b",
        "s1.qcow2",
        "-F",
        "qcow2",
        "s2.qcow2",
        "3M",
    ]);
    w.io(
        "qcow2",
        "s2.qcow2",
        &[
            "write -P 0x22 1024 3000",
            "write -z 40960 2048",
            "write -s rand.pat 70000 100000",
            "discard 131072 32768",
            "write -c -s text.pat 2097152 65536",
        ],
    );
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "s2.qcow2",
        "-F",
        "qcow2",
        "s3.qcow2",
        "4M",
    ]);
    w.io(
        "qcow2",
        "s3.qcow2",
        &[
            "write -s rand.pat 4000 10000",
            "write -c -s text.pat 1220608 8192",
            "write -z 1300000 50000",
            "write -P 0x33 3200000 300000",
            "discard 3400000 8192",
        ],
    );
    let opened = w.check("s3.qcow2", Qcow2);
    check_chain_status(
        opened.device.as_ref(),
        &w.qemu_map("s3.qcow2", "qcow2"),
        "s3",
    );
    // Each layer on its own too.
    for name in ["s2.qcow2", "s1.qcow2"] {
        let o = w.check(name, Qcow2);
        check_chain_status(o.device.as_ref(), &w.qemu_map(name, "qcow2"), name);
    }
    let raw = open_image(&w.path("s0.raw"), Raw, &OpenOptions::qemu_compatible());
    check_chain_status(raw.device.as_ref(), &w.qemu_map("s0.raw", "raw"), "s0.raw");
    assert!(Path::new(&w.path("s0.raw")).exists());
}
