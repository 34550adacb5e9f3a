//! The write engine judged by a model and by qemu.
//!
//! 1. Model tests (proptest): random streams of writes (aligned and unaligned, crossing clusters
//!    and L2 tables, random bytes), zero writes, discards, flushes, reopens and grows are applied
//!    through qcow2kit and to a `Vec<u8>`; every op's neighbourhood is read back at once, and
//!    after the stream the whole device is read back, `qemu-img check` must be clean (no leaks
//!    either: the image was closed), and `qemu-img compare` with the model as a raw file must
//!    report identical. The matrix covers cluster sizes 512 B..2 MiB, every refcount width,
//!    compat 0.10 and 1.1, extended L2, lazy refcounts, qcow2 and raw backing files (with data,
//!    shorter than the overlay), a 3-deep chain, external data files (raw and not),
//!    preallocation, images created by qemu-img, refcount-table growth and L1 growth.
//! 2. The same kind of streams (one-byte patterns) through qemu-io on an image qemu-img created
//!    with the same options: `qemu-img compare` of qemu's image and ours must say identical.
//! 3. Concurrency: four threads writing at once (disjoint byte ranges sharing clusters, and
//!    overlapping ranges).
//! 4. Crash-ish: unflushed writes, then the image is leaked (`mem::forget`, no close); qemu-img
//!    check finds no corruption and every flushed byte reads back. With lazy refcounts the image
//!    is dirty and its refcounts stale (as qemu's after `qemu-io … abort`): only lagging
//!    refcounts may be reported, and both `check -r all` and qcow2kit's reopen repair it.
//! 5. Shrinking (`resize(…, true)`), in its own configurations.
//!
//! The end of the file holds deterministic reproductions of the bugs these tests found.
//!
//! Knobs (environment): `QCOW2KIT_MODEL_CASES` cases per configuration (default 5, fewer for
//! the slow ones, to keep the file under ~90 s in debug); `QCOW2KIT_MODEL_SEED` the proptest
//! seed (default fixed per test); `QCOW2KIT_MODEL_VERBOSE` prints what each stream does;
//! `QCOW2KIT_MINIMISE=<part of the failure message>` delta-debugs a failing model stream to a
//! short op list (run one test at a time); `QCOW2KIT_SHRINK_ITERS` proptest shrinking (default
//! 0); `QCOW2KIT_KEEP` keeps the scratch directories (in /dev/shm) for inspection.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use qcow2kit::ops::create::Preallocation;
use qcow2kit::BlockDevice;
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use write_helpers::*;

// ---------------------------------------------------------------------------------------------
// Running streams
// ---------------------------------------------------------------------------------------------

fn seed_of(raws: &[RawOp]) -> u64 {
    raws.first().map_or(7, |r| r.a ^ r.c.rotate_left(17))
}

/// Re-raises a panic from `f` with the op list appended.
fn with_ops<T>(what: &str, ops: &[Op], f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            match msg {
                Some(m) => panic!(
                    "{m}\n{what}: stream of {} ops:\n{}",
                    ops.len(),
                    describe_ops(ops)
                ),
                None => resume_unwind(e),
            }
        }
    }
}

/// Applies `ops` to `img` in `dir` through qcow2kit and to `model`, checking every op.
fn apply_ours(dir: &Path, img: &str, cfg: &Cfg, model: &mut Model, ops: &[Op]) {
    let mut live = Live::open_cache(&dir.join(img), cfg.l2_cache_bytes);
    for (i, op) in ops.iter().enumerate() {
        live.apply(op, i);
        model.apply(op);
        spot_check(live.dev(), model, op, i);
    }
    let all = read_all(live.dev());
    assert_same(&all, &model.data, 0, "full read-back before close");
    live.close();
}

/// The checks after a stream: qemu-img check clean, compare with the model identical, the data
/// file (raw) equal to the model, and a read-only reopen through qcow2kit equal too.
fn judge(dir: &Path, img: &str, cfg: &Cfg, model: &Model) {
    fs::write(dir.join("model.raw"), &model.data).expect("writing model");
    assert_check_clean(dir, img, "after the stream and close");
    assert_compare_identical(dir, img, "qcow2", "model.raw", "raw", "image vs model");
    if cfg.data_file == Some(true) {
        let df = data_file_name(img);
        assert_compare_identical(
            dir,
            &df,
            "raw",
            "model.raw",
            "raw",
            "raw data file vs model",
        );
    }
    let ro = open_ro(&dir.join(img));
    let all = read_all(ro.device.as_ref());
    assert_same(&all, &model.data, 0, "read-back after reopening read-only");
}

/// With `QCOW2KIT_MODEL_VERBOSE` set, prints what a stream does.
fn log_stream(what: &str, ops: &[Op], model: &Model) {
    if std::env::var_os("QCOW2KIT_MODEL_VERBOSE").is_none() {
        return;
    }
    let mut n = [0usize; 7];
    let mut bytes = 0u64;
    let mut size = model.data.len() as u64;
    for op in ops {
        let k = match op {
            Op::Write { len, .. } => {
                bytes += len;
                0
            }
            Op::Zero { .. } => 1,
            Op::Discard { .. } => 2,
            Op::Flush => 3,
            Op::Reopen => 4,
            Op::Grow { new_size } => {
                size = *new_size;
                5
            }
            Op::Shrink { new_size } => {
                size = *new_size;
                6
            }
        };
        n[k] += 1;
    }
    eprintln!(
        "{what}: {} ops (write {} / {} KiB, zero {}, discard {}, flush {}, reopen {}, grow {}, \
         shrink {}); size {} -> {}",
        ops.len(),
        n[0],
        bytes >> 10,
        n[1],
        n[2],
        n[3],
        n[4],
        n[5],
        n[6],
        model.data.len(),
        size
    );
}

fn run_stream(cfg: &Cfg, shape: &StreamShape, raws: &[RawOp], after: &dyn Fn(&Path)) {
    let seed = seed_of(raws);
    let ops = shape.realize_all(raws, cfg.size);
    let one = |ops: &[Op]| {
        let dir = scratch();
        let d = dir.path();
        let mut model = cfg.create(d, "img.qcow2", seed);
        log_stream("model stream", ops, &model);
        apply_ours(d, "img.qcow2", cfg, &mut model, ops);
        judge(d, "img.qcow2", cfg, &model);
        after(d);
    };
    if let Ok(key) = std::env::var("QCOW2KIT_MINIMISE") {
        if catch_unwind(AssertUnwindSafe(|| one(&ops))).is_err() {
            let min = minimise(&ops, &key, &|o: &[Op]| one(o));
            panic!(
                "minimised stream ({} ops) failing with {key:?}:\n{}",
                min.len(),
                describe_ops(&min)
            );
        }
        return;
    }
    with_ops("model stream", &ops, || one(&ops));
}

fn runner(name: &str, default_cases: u32) -> TestRunner {
    let seed = match std::env::var("QCOW2KIT_MODEL_SEED") {
        Ok(s) => s.parse::<u64>().expect("QCOW2KIT_MODEL_SEED is a number"),
        Err(_) => {
            let mut h = DefaultHasher::new();
            name.hash(&mut h);
            h.finish()
        }
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_be_bytes());
    bytes[8..16].copy_from_slice(&(name.len() as u64).to_be_bytes());
    TestRunner::new_with_rng(
        proptest_config(cases(default_cases)),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Runs the model property for `cfg`.
fn model_test(name: &str, cfg: Cfg, tweak: impl Fn(&mut StreamShape), ops: (usize, usize)) {
    model_test_then(name, cfg, tweak, ops, 5, |_| {});
}

/// [`model_test`], with `after` run on the scratch directory once a stream passed.
fn model_test_then(
    name: &str,
    cfg: Cfg,
    tweak: impl Fn(&mut StreamShape),
    ops: (usize, usize),
    default_cases: u32,
    after: impl Fn(&Path),
) {
    let mut shape = StreamShape::for_cfg(&cfg);
    tweak(&mut shape);
    let mut r = runner(name, default_cases);
    if let Err(e) = r.run(&raw_ops(ops.0, ops.1), |raws| {
        run_stream(&cfg, &shape, &raws, &after);
        Ok(())
    }) {
        panic!("{name} ({cfg:?}): {e}");
    }
}

/// The header of the image as qcow2kit reads it.
fn header_of(path: &Path) -> qcow2kit::format::header::Header {
    open_ro(path).qcow2.expect("qcow2").header()
}

fn no_tweak(_: &mut StreamShape) {}

/// Grows and shrinks.
fn resizes(s: &mut StreamShape) {
    grows(s);
    s.pct_shrink = 2;
}

fn grows(s: &mut StreamShape) {
    s.pct_grow = 2;
    s.max_size = s.max_size * 2 + 3 * s.cluster;
}

// ---------------------------------------------------------------------------------------------
// 1. Model tests
// ---------------------------------------------------------------------------------------------

#[test]
fn model_default_64k_rb16() {
    model_test("model_default_64k_rb16", Cfg::default(), grows, (200, 900));
}

#[test]
fn model_512_rb1() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 1,
        size: M + 1024,
        ..Cfg::default()
    };
    model_test("model_512_rb1", cfg, grows, (300, 1500));
}

#[test]
fn model_4k_rb2() {
    let cfg = Cfg {
        cluster: 4 * K,
        refcount_bits: 2,
        size: 3 * M + 512,
        ..Cfg::default()
    };
    model_test("model_4k_rb2", cfg, grows, (300, 1200));
}

#[test]
fn model_64k_rb4() {
    let cfg = Cfg {
        refcount_bits: 4,
        ..Cfg::default()
    };
    model_test("model_64k_rb4", cfg, no_tweak, (200, 800));
}

#[test]
fn model_512_rb8() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 8,
        size: 2 * M,
        ..Cfg::default()
    };
    model_test("model_512_rb8", cfg, no_tweak, (300, 1500));
}

#[test]
fn model_4k_rb32() {
    let cfg = Cfg {
        cluster: 4 * K,
        refcount_bits: 32,
        size: 2 * M + 3584,
        ..Cfg::default()
    };
    model_test("model_4k_rb32", cfg, grows, (300, 1200));
}

#[test]
fn model_512_rb64() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 64,
        size: M + 512,
        ..Cfg::default()
    };
    model_test("model_512_rb64", cfg, grows, (300, 1500));
}

#[test]
fn model_2m_clusters() {
    let cfg = Cfg {
        cluster: 2 * M,
        size: 12 * M + 3584,
        ..Cfg::default()
    };
    model_test_then("model_2m_clusters", cfg, grows, (60, 200), 3, |_| {});
}

#[test]
fn model_qemu_created_64k() {
    let cfg = Cfg {
        qemu_create: true,
        ..Cfg::default()
    };
    model_test("model_qemu_created_64k", cfg, grows, (200, 900));
}

#[test]
fn model_qemu_created_512_rb4() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 4,
        size: M + 1536,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test("model_qemu_created_512_rb4", cfg, grows, (300, 1500));
}

#[test]
fn model_v2_64k() {
    let cfg = Cfg {
        v2: true,
        ..Cfg::default()
    };
    model_test("model_v2_64k", cfg, grows, (200, 900));
}

#[test]
fn model_v2_512_qemu_created() {
    let cfg = Cfg {
        v2: true,
        cluster: 512,
        size: M + 512,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test("model_v2_512_qemu_created", cfg, grows, (300, 1500));
}

#[test]
fn model_v2_over_qcow2_backing() {
    let cfg = Cfg {
        v2: true,
        cluster: 4 * K,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        ..Cfg::default()
    };
    model_test("model_v2_over_qcow2_backing", cfg, no_tweak, (300, 1200));
}

#[test]
fn model_extended_l2_16k() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M + 1536,
        ..Cfg::default()
    };
    model_test("model_extended_l2_16k", cfg, grows, (300, 1200));
}

#[test]
fn model_extended_l2_64k() {
    let cfg = Cfg {
        extended_l2: true,
        ..Cfg::default()
    };
    model_test("model_extended_l2_64k", cfg, grows, (200, 900));
}

#[test]
fn model_extended_l2_64k_qemu_created() {
    let cfg = Cfg {
        extended_l2: true,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_extended_l2_64k_qemu_created",
        cfg,
        no_tweak,
        (200, 900),
    );
}

#[test]
fn model_extended_l2_over_backing() {
    let cfg = Cfg {
        cluster: 32 * K,
        extended_l2: true,
        size: 4 * M,
        backing: Backing::Qcow2 { size: 3 * M + 512 },
        ..Cfg::default()
    };
    model_test("model_extended_l2_over_backing", cfg, grows, (200, 900));
}

#[test]
fn model_lazy_refcounts_4k() {
    let cfg = Cfg {
        cluster: 4 * K,
        lazy: true,
        size: 2 * M + 512,
        ..Cfg::default()
    };
    model_test("model_lazy_refcounts_4k", cfg, grows, (300, 1200));
}

#[test]
fn model_lazy_refcounts_64k_qemu_created() {
    let cfg = Cfg {
        lazy: true,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_lazy_refcounts_64k_qemu_created",
        cfg,
        no_tweak,
        (200, 900),
    );
}

#[test]
fn model_over_qcow2_backing() {
    let cfg = Cfg {
        backing: Backing::Qcow2 { size: 4 * M + 1536 },
        ..Cfg::default()
    };
    model_test("model_over_qcow2_backing", cfg, grows, (200, 900));
}

#[test]
fn model_over_shorter_qcow2_backing_512() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 8,
        size: 2 * M,
        backing: Backing::Qcow2 { size: M + 512 },
        // qcow2kit's create refuses 512-byte clusters with a backing file (see
        // create_512_byte_clusters_with_backing_file); the engine is tested on qemu's image.
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_over_shorter_qcow2_backing_512",
        cfg,
        grows,
        (300, 1500),
    );
}

/// The overlay is smaller than its backing file; growing it must not expose the backing data
/// past the old end (it reads as zeros, as in QEMU).
#[test]
fn model_over_longer_backing_grows() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M + 1536,
        backing: Backing::Qcow2 { size: 4 * M },
        ..Cfg::default()
    };
    model_test(
        "model_over_longer_backing_grows",
        cfg,
        |s| {
            s.pct_grow = 3;
            s.max_size = 5 * M;
        },
        (300, 1200),
    );
}

#[test]
fn model_over_raw_backing_shorter_odd_length() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 3 * M,
        backing: Backing::Raw { len: 2 * M + 1000 },
        ..Cfg::default()
    };
    model_test(
        "model_over_raw_backing_shorter_odd_length",
        cfg,
        grows,
        (300, 1200),
    );
}

#[test]
fn model_chain_of_3() {
    let cfg = Cfg {
        size: 4 * M + 512,
        backing: Backing::Chain3,
        ..Cfg::default()
    };
    model_test("model_chain_of_3", cfg, grows, (200, 900));
}

#[test]
fn model_chain_of_3_qemu_created_4k() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 4 * M,
        backing: Backing::Chain3,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_chain_of_3_qemu_created_4k",
        cfg,
        no_tweak,
        (300, 1200),
    );
}

#[test]
fn model_data_file() {
    let cfg = Cfg {
        data_file: Some(false),
        ..Cfg::default()
    };
    model_test("model_data_file", cfg, grows, (200, 900));
}

#[test]
fn model_data_file_raw() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M + 512,
        data_file: Some(true),
        ..Cfg::default()
    };
    model_test("model_data_file_raw", cfg, grows, (300, 1200));
}

#[test]
fn model_data_file_raw_qemu_created() {
    let cfg = Cfg {
        data_file: Some(true),
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_data_file_raw_qemu_created",
        cfg,
        no_tweak,
        (200, 900),
    );
}

#[test]
fn model_prealloc_metadata() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M + 512,
        prealloc: Preallocation::Metadata,
        ..Cfg::default()
    };
    model_test("model_prealloc_metadata", cfg, grows, (300, 1200));
}

#[test]
fn model_prealloc_full() {
    let cfg = Cfg {
        prealloc: Preallocation::Full,
        ..Cfg::default()
    };
    model_test("model_prealloc_full", cfg, grows, (200, 900));
}

#[test]
fn model_prealloc_metadata_qemu_created() {
    let cfg = Cfg {
        prealloc: Preallocation::Metadata,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_prealloc_metadata_qemu_created",
        cfg,
        no_tweak,
        (200, 900),
    );
}

/// Compressed clusters (written by qemu-io, several sharing one host cluster) overwritten,
/// partially overwritten, zeroed and discarded: their host clusters must be freed exactly.
#[test]
fn model_over_compressed_clusters_64k() {
    let cfg = Cfg {
        prefill_compressed: true,
        ..Cfg::default()
    };
    model_test("model_over_compressed_clusters_64k", cfg, grows, (200, 900));
}

#[test]
fn model_over_compressed_clusters_512_rb8() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 8,
        size: M,
        prefill_compressed: true,
        ..Cfg::default()
    };
    model_test(
        "model_over_compressed_clusters_512_rb8",
        cfg,
        no_tweak,
        (300, 1500),
    );
}

#[test]
fn model_over_compressed_clusters_extended_l2_over_backing() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 2 * M },
        prefill_compressed: true,
        ..Cfg::default()
    };
    model_test(
        "model_over_compressed_clusters_extended_l2_over_backing",
        cfg,
        no_tweak,
        (300, 1200),
    );
}

#[test]
fn model_over_compressed_clusters_v2() {
    let cfg = Cfg {
        v2: true,
        cluster: 4 * K,
        size: 2 * M,
        prefill_compressed: true,
        ..Cfg::default()
    };
    model_test(
        "model_over_compressed_clusters_v2",
        cfg,
        no_tweak,
        (300, 1200),
    );
}

// Shrinking (`resize(…, true)`): the clusters past the new end are dropped, and a later grow
// reads zeros there (never the old data or a longer backing file's).

#[test]
fn model_shrink_64k() {
    model_test("model_shrink_64k", Cfg::default(), resizes, (200, 900));
}

#[test]
fn model_shrink_512_rb2_qemu_created() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 2,
        size: M + 1536,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_shrink_512_rb2_qemu_created",
        cfg,
        resizes,
        (300, 1500),
    );
}

#[test]
fn model_shrink_over_longer_backing() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 4 * M },
        ..Cfg::default()
    };
    model_test(
        "model_shrink_over_longer_backing",
        cfg,
        resizes,
        (300, 1200),
    );
}

#[test]
fn model_shrink_extended_l2_compressed() {
    let cfg = Cfg {
        cluster: 32 * K,
        extended_l2: true,
        size: 3 * M,
        prefill_compressed: true,
        ..Cfg::default()
    };
    model_test(
        "model_shrink_extended_l2_compressed",
        cfg,
        resizes,
        (300, 1200),
    );
}

#[test]
fn model_shrink_data_file_raw() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        data_file: Some(true),
        ..Cfg::default()
    };
    model_test("model_shrink_data_file_raw", cfg, resizes, (300, 1200));
}

#[test]
fn model_prealloc_falloc_qemu_created() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        prealloc: Preallocation::Falloc,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_prealloc_falloc_qemu_created",
        cfg,
        grows,
        (300, 1200),
    );
}

/// Preallocated clusters whose subclusters stay unallocated, so the backing file shows through
/// them until written.
#[test]
fn model_prealloc_metadata_extended_l2_over_backing() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        prealloc: Preallocation::Metadata,
        ..Cfg::default()
    };
    model_test(
        "model_prealloc_metadata_extended_l2_over_backing",
        cfg,
        grows,
        (300, 1200),
    );
}

#[test]
fn model_prealloc_metadata_extended_l2_over_backing_qemu_created() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        prealloc: Preallocation::Metadata,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_prealloc_metadata_extended_l2_over_backing_qemu_created",
        cfg,
        grows,
        (300, 1200),
    );
}

/// The smallest L2 cache (4 slices): dirty slices are evicted, and so flushed, in the middle of
/// writes and allocations.
#[test]
fn model_tiny_l2_cache_512() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 16,
        size: 2 * M + 512,
        l2_cache_bytes: Some(0),
        ..Cfg::default()
    };
    model_test("model_tiny_l2_cache_512", cfg, grows, (300, 1500));
}

#[test]
fn model_tiny_l2_cache_extended_l2_over_backing() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        l2_cache_bytes: Some(0),
        ..Cfg::default()
    };
    model_test(
        "model_tiny_l2_cache_extended_l2_over_backing",
        cfg,
        grows,
        (300, 1200),
    );
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB of the file and the
/// first refcount table 2 MiB, so scattered writes over a 64 MiB image grow the table again and
/// again.
#[test]
fn model_refcount_table_growth() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 64,
        size: 64 * M,
        ..Cfg::default()
    };
    model_test_then(
        "model_refcount_table_growth",
        cfg,
        |s| {
            s.pct_zero = 3;
            s.pct_discard = 3;
            s.pct_flush = 3;
            s.pct_reopen = 1;
            s.max_len = 16 * K;
        },
        (1500, 3000),
        3,
        |d| {
            let h = header_of(&d.join("img.qcow2"));
            assert!(
                h.refcount_table_clusters >= 2,
                "the refcount table did not grow: {} clusters",
                h.refcount_table_clusters
            );
        },
    );
}

/// Big scattered writes over a 64 MiB image with 512-byte clusters and 64-bit refcounts: the
/// file passes 16 MiB, more refcount blocks than the engine caches (512), so dirty blocks are
/// written back and dropped mid-stream, while the refcount table grows several times.
#[test]
fn model_refcount_block_cache_trim() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 64,
        size: 64 * M,
        ..Cfg::default()
    };
    model_test_then(
        "model_refcount_block_cache_trim",
        cfg,
        |s| {
            s.pct_zero = 4;
            s.pct_discard = 4;
            s.pct_flush = 2;
            s.pct_reopen = 1;
            s.max_len = 64 * K;
            s.big_writes = true;
        },
        (1000, 1600),
        2,
        |d| {
            let len = fs::metadata(d.join("img.qcow2")).unwrap().len();
            assert!(len > 16 * M, "the image file stayed small: {len}");
        },
    );
}

/// Start tiny (one L1 entry) and grow often, past several L1 clusters.
#[test]
fn model_l1_growth() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 16,
        size: 16 * K,
        ..Cfg::default()
    };
    model_test_then(
        "model_l1_growth",
        cfg,
        |s| {
            s.pct_grow = 8;
            s.max_size = 6 * M;
        },
        (300, 1200),
        5,
        |d| {
            // 64 L1 entries fit in one cluster (2 MiB of guest): past that the table moved.
            let h = header_of(&d.join("img.qcow2"));
            if h.size > 2 * M {
                assert!(h.l1_size > 64, "L1 did not grow: {h:?}");
            }
        },
    );
}

/// qemu-img sizes the L1 table to exactly the entries needed, so every L2 span a grow crosses
/// needs a larger L1 table (4 KiB clusters: one L2 table maps 2 MiB).
#[test]
fn model_l1_growth_4k_v2_qemu_created() {
    let cfg = Cfg {
        v2: true,
        cluster: 4 * K,
        size: 64 * K,
        qemu_create: true,
        ..Cfg::default()
    };
    model_test(
        "model_l1_growth_4k_v2_qemu_created",
        cfg,
        |s| {
            s.pct_grow = 6;
            s.max_size = 12 * M + 3 * 512;
        },
        (200, 800),
    );
}

// ---------------------------------------------------------------------------------------------
// 2. qemu-io does the same: qemu's image and ours must be identical
// ---------------------------------------------------------------------------------------------

fn run_qemu_io_stream(cfg: &Cfg, shape: &StreamShape, raws: &[RawOp]) {
    let dir = scratch();
    let d = dir.path();
    let backing = cfg.make_backing(d, seed_of(raws));
    let mut model = cfg.create_image(d, "ours.qcow2", &backing, cfg.qemu_create);
    let qemu_model = cfg.create_image(d, "qemu.qcow2", &backing, true);
    assert!(model.data == qemu_model.data, "initial content differs");
    let ops = shape.realize_all(raws, cfg.size);
    log_stream("qemu-io stream", &ops, &model);
    with_ops("qemu-io stream", &ops, || {
        apply_qemu_io(d, "qemu.qcow2", &ops);
        apply_ours(d, "ours.qcow2", cfg, &mut model, &ops);
        judge(d, "ours.qcow2", cfg, &model);
        assert_check_clean(d, "qemu.qcow2", "qemu's own image");
        assert_compare_identical(
            d,
            "ours.qcow2",
            "qcow2",
            "qemu.qcow2",
            "qcow2",
            "ours vs qemu-io's",
        );
    });
}

fn qemu_io_test(name: &str, cfg: Cfg, grow: bool, ops: (usize, usize)) {
    let mut shape = StreamShape::for_cfg(&cfg);
    shape.byte_patterns = true;
    if grow {
        grows(&mut shape);
    }
    let mut r = runner(name, 5);
    if let Err(e) = r.run(&raw_ops(ops.0, ops.1), |raws| {
        run_qemu_io_stream(&cfg, &shape, &raws);
        Ok(())
    }) {
        panic!("{name} ({cfg:?}): {e}");
    }
}

#[test]
fn qemu_io_same_result_64k() {
    qemu_io_test("qemu_io_same_result_64k", Cfg::default(), true, (200, 700));
}

#[test]
fn qemu_io_same_result_512_rb1() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 1,
        size: M + 512,
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_512_rb1", cfg, true, (300, 1000));
}

#[test]
fn qemu_io_same_result_v2() {
    let cfg = Cfg {
        v2: true,
        cluster: 4 * K,
        size: 2 * M + 512,
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_v2", cfg, true, (300, 1000));
}

#[test]
fn qemu_io_same_result_extended_l2() {
    let cfg = Cfg {
        cluster: 32 * K,
        extended_l2: true,
        size: 3 * M + 512,
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_extended_l2", cfg, true, (300, 1000));
}

#[test]
fn qemu_io_same_result_lazy() {
    let cfg = Cfg {
        cluster: 4 * K,
        lazy: true,
        size: 2 * M,
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_lazy", cfg, true, (300, 1000));
}

#[test]
fn qemu_io_same_result_over_backing() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 2 * M + 512 },
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_over_backing", cfg, false, (300, 1000));
}

#[test]
fn qemu_io_same_result_over_compressed_clusters() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        prefill_compressed: true,
        ..Cfg::default()
    };
    qemu_io_test(
        "qemu_io_same_result_over_compressed_clusters",
        cfg,
        true,
        (300, 1000),
    );
}

#[test]
fn qemu_io_same_result_shrink() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M + 512,
        ..Cfg::default()
    };
    let mut shape = StreamShape::for_cfg(&cfg);
    shape.byte_patterns = true;
    resizes(&mut shape);
    // qemu shows a partial last cluster's stale rest again when it grows after a shrink.
    shape.aligned_shrinks = true;
    let mut r = runner("qemu_io_same_result_shrink", 4);
    if let Err(e) = r.run(&raw_ops(300, 1000), |raws| {
        run_qemu_io_stream(&cfg, &shape, &raws);
        Ok(())
    }) {
        panic!("qemu_io_same_result_shrink: {e}");
    }
}

#[test]
fn qemu_io_same_result_data_file_raw() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        data_file: Some(true),
        ..Cfg::default()
    };
    qemu_io_test("qemu_io_same_result_data_file_raw", cfg, true, (300, 1000));
}

#[test]
fn qemu_io_same_result_v2_over_backing() {
    let cfg = Cfg {
        v2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        ..Cfg::default()
    };
    qemu_io_test(
        "qemu_io_same_result_v2_over_backing",
        cfg,
        false,
        (200, 700),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency
// ---------------------------------------------------------------------------------------------

/// Four threads, each owning stripes of the device whose boundaries are unaligned (so
/// neighbouring threads share clusters): writes, zero writes and discards inside a thread's own
/// stripes, at the same time. Each thread's result is deterministic, so the whole is.
fn concurrent_disjoint(cfg: Cfg, seed: u64, ops_per_thread: usize) {
    let dir = scratch();
    let d = dir.path();
    let model0 = cfg.create(d, "img.qcow2", seed);
    let opened = open_rw_cache(&d.join("img.qcow2"), cfg.l2_cache_bytes);
    let dev: Arc<dyn BlockDevice> = opened.device.clone();
    let want = concurrent_disjoint_writers(&dev, &model0, cfg.cluster, seed, ops_per_thread);
    let got = read_all(dev.as_ref());
    assert_same(
        &got,
        &want.data,
        0,
        "concurrent disjoint writers, before close",
    );
    drop(dev);
    drop(opened);
    judge(d, "img.qcow2", &cfg, &want);
}

#[test]
fn concurrent_disjoint_unaligned_stripes_64k() {
    concurrent_disjoint(Cfg::default(), 11, 1500);
}

#[test]
fn concurrent_disjoint_unaligned_stripes_512_rb64() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 64,
        size: 2 * M,
        ..Cfg::default()
    };
    concurrent_disjoint(cfg, 12, 2000);
}

#[test]
fn concurrent_disjoint_unaligned_stripes_tiny_l2_cache_4k() {
    let cfg = Cfg {
        cluster: 4 * K,
        refcount_bits: 8,
        size: 3 * M,
        l2_cache_bytes: Some(0),
        ..Cfg::default()
    };
    concurrent_disjoint(cfg, 14, 1500);
}

#[test]
fn concurrent_disjoint_unaligned_stripes_extended_l2_over_backing() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        ..Cfg::default()
    };
    concurrent_disjoint(cfg, 13, 1000);
}

/// Four threads writing overlapping ranges, each with its own byte: afterwards the image is
/// check-clean and every byte a thread wrote holds one of the values of the threads that wrote
/// it (bytes nobody wrote keep the initial content).
fn concurrent_overlapping(cfg: Cfg, seed: u64, ops_per_thread: usize) {
    let dir = scratch();
    let d = dir.path();
    let model0 = cfg.create(d, "img.qcow2", seed);
    let size = cfg.size;
    let opened = open_rw_cache(&d.join("img.qcow2"), cfg.l2_cache_bytes);
    let dev: Arc<dyn BlockDevice> = opened.device.clone();
    // writers[b] = bit set of threads that wrote byte b.
    let start = std::sync::Barrier::new(4);
    let masks: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let dev = dev.clone();
                let start = &start;
                s.spawn(move || {
                    let mut rng = Rng(seed ^ ((t + 7) * 0x9876_5431));
                    start.wait();
                    let mut ranges = Vec::new();
                    // Everybody writes into the first few clusters a lot, and anywhere a bit.
                    let hot = (4 * cfg.cluster).min(size);
                    for i in 0..ops_per_thread {
                        let span = if rng.below(3) == 0 { size } else { hot };
                        let off = rng.below(span);
                        let len = rng.range(1, (2 * cfg.cluster + 777).min(span - off));
                        if rng.below(8) == 0 {
                            dev.flush()
                                .unwrap_or_else(|e| panic!("thread {t} flush: {e}"));
                        }
                        dev.write_at(&vec![0xa0 + t as u8; len as usize], off)
                            .unwrap_or_else(|e| panic!("thread {t} op {i} write {off}+{len}: {e}"));
                        ranges.push((off, len));
                    }
                    ranges
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let mut who = vec![0u8; size as usize];
    for (t, rs) in masks.iter().enumerate() {
        for &(off, len) in rs {
            for w in &mut who[off as usize..(off + len) as usize] {
                *w |= 1 << t;
            }
        }
    }
    let check = |got: &[u8], when: &str| {
        for (i, (&g, &w)) in got.iter().zip(&who).enumerate() {
            let ok = if w == 0 {
                g == model0.data[i]
            } else {
                (0xa0..0xa4).contains(&g) && w & (1 << (g - 0xa0)) != 0
            };
            assert!(
                ok,
                "{when}: byte {i:#x} is {g:#04x}; writers mask {w:#06b}, initial {:#04x}",
                model0.data[i]
            );
        }
    };
    let got = read_all(dev.as_ref());
    check(&got, "overlapping writers, before close");
    drop(dev);
    drop(opened);
    assert_check_clean(d, "img.qcow2", "after overlapping concurrent writers");
    fs::write(d.join("model.raw"), &got).unwrap();
    assert_compare_identical(
        d,
        "img.qcow2",
        "qcow2",
        "model.raw",
        "raw",
        "content after close",
    );
}

#[test]
fn concurrent_overlapping_64k() {
    concurrent_overlapping(Cfg::default(), 21, 300);
}

#[test]
fn concurrent_overlapping_4k_over_backing() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        backing: Backing::Qcow2 { size: 2 * M },
        ..Cfg::default()
    };
    concurrent_overlapping(cfg, 22, 400);
}

#[test]
fn concurrent_overlapping_tiny_l2_cache_512() {
    let cfg = Cfg {
        cluster: 512,
        size: M,
        l2_cache_bytes: Some(0),
        ..Cfg::default()
    };
    concurrent_overlapping(cfg, 24, 400);
}

#[test]
fn concurrent_overlapping_extended_l2() {
    let cfg = Cfg {
        cluster: 32 * K,
        extended_l2: true,
        size: 2 * M,
        ..Cfg::default()
    };
    concurrent_overlapping(cfg, 23, 300);
}

// ---------------------------------------------------------------------------------------------
// 4. Crash-ish: no close
// ---------------------------------------------------------------------------------------------

/// Writes, flush, more writes without flush, then the image is leaked (no close, no flush: its
/// Drop would flush). Returns (model at the flush, bytes touched after it, dir).
fn crash_after(
    cfg: &Cfg,
    seed: u64,
    before: usize,
    after: usize,
) -> (Model, Vec<bool>, tempfile::TempDir) {
    let dir = scratch();
    let d = dir.path();
    let mut model = cfg.create(d, "img.qcow2", seed);
    let mut shape = StreamShape::for_cfg(cfg);
    shape.pct_reopen = 0;
    shape.pct_flush = if cfg.lazy { 0 } else { 5 };
    let mut rng = Rng(seed);
    let raw = |rng: &mut Rng| RawOp {
        kind: rng.next_u64() as u8,
        a: rng.next_u64(),
        b: rng.next_u64(),
        c: rng.next_u64(),
    };
    let first: Vec<RawOp> = (0..before).map(|_| raw(&mut rng)).collect();
    let ops = shape.realize_all(&first, cfg.size);
    let opened = open_rw_crashing(&d.join("img.qcow2"), cfg.l2_cache_bytes);
    let dev = opened.device.clone();
    for op in &ops {
        if let Op::Flush = op {
            dev.flush().unwrap();
        } else if let Some((off, len)) = op.range() {
            match *op {
                Op::Write { fill, .. } => dev.write_at(&fill.bytes(len), off).unwrap(),
                Op::Zero { .. } => dev.write_zeroes(off, len).unwrap(),
                _ => dev.discard(off, len).unwrap(),
            }
        }
        model.apply(op);
    }
    dev.flush().expect("flush");
    let flushed = model.clone();
    let mut touched = vec![false; cfg.size as usize];
    shape.pct_flush = 0;
    let second: Vec<RawOp> = (0..after).map(|_| raw(&mut rng)).collect();
    for op in shape.realize_all(&second, cfg.size) {
        if let Some((off, len)) = op.range() {
            let r = match op {
                Op::Write { fill, .. } => dev.write_at(&fill.bytes(len), off),
                Op::Zero { .. } => dev.write_zeroes(off, len),
                _ => dev.discard(off, len),
            };
            r.unwrap_or_else(|e| panic!("unflushed {op:?}: {e}"));
            // A discard or a partial-cluster write can touch its whole cluster.
            let cs = cfg.cluster;
            let a = off & !(cs - 1);
            let b = (off + len).next_multiple_of(cs).min(cfg.size);
            touched[a as usize..b as usize].fill(true);
        }
    }
    // The crash: nothing more reaches the file, and Drop (which would flush) never runs.
    drop(dev);
    std::mem::forget(opened);
    (flushed, touched, dir)
}

fn assert_flushed_intact(d: &Path, flushed: &Model, touched: &[bool], context: &str) {
    assert_flushed_intact_in(d, "img.qcow2", flushed, touched, context)
}

fn assert_flushed_intact_in(d: &Path, img: &str, flushed: &Model, touched: &[bool], context: &str) {
    let ro = open_ro(&d.join(img));
    let got = read_all(ro.device.as_ref());
    for (i, ((&g, &w), &t)) in got.iter().zip(&flushed.data).zip(touched).enumerate() {
        if !t && g != w {
            panic!("{context}: flushed byte {i:#x} reads {g:#04x}, was {w:#04x} at the flush");
        }
    }
    // qemu agrees with us.
    let q = export_raw(d, img, None, "after-crash.raw");
    assert_same(
        &q,
        &got,
        0,
        &format!("{context}: qemu-img convert vs qcow2kit after the crash"),
    );
}

fn crash_test(cfg: Cfg, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let (flushed, touched, dir) = crash_after(&cfg, seed, 300, 200);
        let d = dir.path();
        let ctx = format!("crash seed {seed} {cfg:?}");
        assert_check_no_corruption(d, "img.qcow2", &ctx);
        assert_flushed_intact(d, &flushed, &touched, &ctx);
    }
}

#[test]
fn crash_unflushed_64k() {
    crash_test(Cfg::default(), 0..4);
}

#[test]
fn crash_unflushed_512_rb64_grows_refcount_table() {
    let cfg = Cfg {
        cluster: 512,
        refcount_bits: 64,
        size: 8 * M,
        ..Cfg::default()
    };
    crash_test(cfg, 10..13);
}

#[test]
fn crash_unflushed_over_backing_extended_l2() {
    let cfg = Cfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        backing: Backing::Qcow2 { size: 3 * M },
        ..Cfg::default()
    };
    crash_test(cfg, 20..23);
}

#[test]
fn crash_unflushed_tiny_l2_cache_512() {
    let cfg = Cfg {
        cluster: 512,
        size: 2 * M,
        l2_cache_bytes: Some(0),
        ..Cfg::default()
    };
    crash_test(cfg, 50..53);
}

#[test]
fn crash_unflushed_v2_4k() {
    let cfg = Cfg {
        v2: true,
        cluster: 4 * K,
        size: 2 * M,
        ..Cfg::default()
    };
    crash_test(cfg, 30..33);
}

/// With lazy refcounts a crash leaves the image dirty and its refcounts stale by design: qemu's
/// own image after `qemu-io … abort` shows exactly the same picture (refcount=0 reference=1
/// errors, exit 2, until `check -r all`). So: dirty flag set, every error qemu-img check reports
/// is a refcount lagging behind the references (never an overlap, a bad entry or a refcount
/// that is too high), `check -r all` repairs to a clean image, and the flushed data is intact.
/// A copy is instead opened writable by qcow2kit (which rebuilds the refcounts of a dirty
/// image), written to and closed: it must be check-clean, not dirty, and hold the data.
#[test]
fn crash_lazy_refcounts_dirty_and_repairable() {
    let cfg = Cfg {
        cluster: 4 * K,
        lazy: true,
        size: 2 * M,
        ..Cfg::default()
    };
    for seed in 40..43 {
        let (flushed, touched, dir) = crash_after(&cfg, seed, 300, 200);
        let d = dir.path();
        let ctx = format!("lazy crash seed {seed}");
        let info = qemu_img(&["info", "--output", "json", "-f", "qcow2", "img.qcow2"], d);
        let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
        assert_eq!(
            v["dirty-flag"],
            serde_json::Value::Bool(true),
            "{ctx}: the image must be dirty after a crash: {info}"
        );
        let o = tool(QEMU_IMG, &["check", "-f", "qcow2", "img.qcow2"], d);
        assert!(
            matches!(o.code, 0 | 2 | 3),
            "{ctx}: check failed to run: {o}"
        );
        for line in o.stdout.lines().chain(o.stderr.lines()) {
            if line.starts_with("ERROR") {
                let lagging = line.contains("refcount=0 reference=")
                    || (line.starts_with("ERROR OFLAG_COPIED") && line.ends_with("refcount=0"))
                    || refcount_below_reference(line);
                assert!(
                    lagging,
                    "{ctx}: unexpected error after a lazy crash: {line}\n{o}"
                );
            }
        }
        fs::copy(d.join("img.qcow2"), d.join("ours.qcow2")).unwrap();
        qemu_img(&["check", "-q", "-r", "all", "-f", "qcow2", "img.qcow2"], d);
        assert_check_clean(d, "img.qcow2", &format!("{ctx}: after check -r all"));
        assert_flushed_intact(d, &flushed, &touched, &ctx);

        // qcow2kit's own recovery: open (rebuild), write, close.
        let before = export_raw(d, "ours.qcow2", None, "ours-before.raw");
        let mut model = Model {
            data: before,
            sem: cfg.semantics(),
        };
        let shape = StreamShape::for_cfg(&cfg);
        let mut rng = Rng(seed ^ 0x5eed);
        let raws: Vec<RawOp> = (0..100)
            .map(|_| RawOp {
                kind: rng.next_u64() as u8,
                a: rng.next_u64(),
                b: rng.next_u64(),
                c: rng.next_u64(),
            })
            .collect();
        let ops = shape.realize_all(&raws, cfg.size);
        with_ops(
            &format!("{ctx}: writes after qcow2kit reopened the dirty image"),
            &ops,
            || {
                apply_ours(d, "ours.qcow2", &cfg, &mut model, &ops);
                let info = qemu_img(
                    &["info", "--output", "json", "-f", "qcow2", "ours.qcow2"],
                    d,
                );
                let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
                assert_eq!(
                    v["dirty-flag"],
                    serde_json::Value::Bool(false),
                    "{ctx}: still dirty: {info}"
                );
                judge(d, "ours.qcow2", &cfg, &model);
            },
        );
    }
}

/// "ERROR cluster N refcount=R reference=F" with R < F.
fn refcount_below_reference(line: &str) -> bool {
    let num = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    matches!((num("refcount="), num("reference=")), (Some(r), Some(f)) if r < f)
}

/// Single requests larger than one allocation run (1024 clusters): 70 MiB writes and zero
/// writes with unaligned edges over a mix of unallocated, allocated, zero and discarded
/// clusters, on 64 KiB clusters.
#[test]
fn huge_requests_over_many_clusters() {
    use Op::*;
    let cfg = Cfg {
        size: 96 * M + 1536,
        ..Cfg::default()
    };
    replay(
        &cfg,
        &[
            Write {
                off: 5 * M + 777,
                len: 3 * M,
                fill: Fill::Random(1),
            },
            Zero {
                off: 20 * M,
                len: M,
            },
            Write {
                off: 12345,
                len: 70 * M,
                fill: Fill::Random(2),
            },
            Discard {
                off: 30 * M + 100,
                len: 10 * M,
            },
            Flush,
            Zero {
                off: 1000,
                len: 65 * M + 3,
            },
            Reopen,
            Write {
                off: 11 * M - 5,
                len: 80 * M,
                fill: Fill::Random(3),
            },
            Discard {
                off: 0,
                len: 96 * M + 1536,
            },
            Write {
                off: 64 * K - 1,
                len: 66 * M,
                fill: Fill::Random(4),
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Reproductions found by the tests above
// ---------------------------------------------------------------------------------------------

/// qemu-img creates a 512-byte-cluster v3 image with a backing file (it leaves out the
/// feature-name table, which no longer fits in the header cluster next to the backing-format
/// extension and the backing name); `create_qcow2` refuses with "header, extensions and backing
/// name do not fit in one cluster".
#[test]
fn create_512_byte_clusters_with_backing_file() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"], d);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "qemu.qcow2",
            "2M",
        ],
        d,
    );
    assert_check_clean(d, "qemu.qcow2", "qemu's image");
    let o = qcow2kit::ops::create::CreateOptions {
        size: Some(2 * M),
        cluster_size: 512,
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    qcow2kit::ops::create::create_qcow2(&d.join("ours.qcow2"), &o)
        .unwrap_or_else(|e| panic!("create_qcow2 refuses what qemu-img creates: {e}"));
    assert_check_clean(d, "ours.qcow2", "our image");
    assert_compare_identical(
        d,
        "ours.qcow2",
        "qcow2",
        "qemu.qcow2",
        "qcow2",
        "new images",
    );
}

/// Runs a fixed op list on a fresh image of `cfg` and judges it like a model stream.
fn replay(cfg: &Cfg, ops: &[Op]) {
    let dir = scratch();
    let d = dir.path();
    let mut model = cfg.create(d, "img.qcow2", 1);
    with_ops("replay", ops, || {
        apply_ours(d, "img.qcow2", cfg, &mut model, ops);
        judge(d, "img.qcow2", cfg, &model);
    });
}

/// A shrink frees a whole L2 table; the allocator later hands its cluster out as a data cluster
/// (correctly: its refcount is 0). The metadata overlap check still counts it as an L2 table,
/// so the next in-place write to that data cluster is refused and the image marked corrupt.
/// Expected: every write succeeds and the image is check-clean. Actual (op #4): "L2 entry
/// 0x0000000000000c00 for guest offset 0x200: data cluster overlaps metadata; image marked
/// corrupt", and qemu-img info then shows `corrupt: true`.
#[test]
fn shrink_then_write_into_a_reused_l2_table_cluster() {
    use Op::*;
    let f = Fill::Byte(0x6c);
    let cfg = Cfg {
        cluster: 512,
        size: 64 * K,
        ..Cfg::default()
    };
    replay(
        &cfg,
        &[
            Write {
                off: 0,
                len: 512,
                fill: f,
            }, // L2 table 0 and a data cluster
            Write {
                off: 32 * K,
                len: 512,
                fill: f,
            }, // L2 table 1 (cluster 0xc00) and data
            Shrink { new_size: 32 * K }, // table 1 and its data freed
            Write {
                off: 512,
                len: 512,
                fill: f,
            }, // new data cluster: 0xc00 again
            Write {
                off: 512,
                len: 512,
                fill: f,
            }, // in place: refused as "metadata"
        ],
    );
}

/// With `data_file_raw=on` the data file is the guest disk as a raw image. After a shrink qemu
/// truncates it to the new virtual size (qemu-io `truncate`: d.raw becomes 2077696 bytes,
/// `qemu-img compare d.raw a.qcow2` identical); qcow2kit leaves it at its old length with the
/// bytes written past the new end still in it, so `qemu-img compare -f raw -F raw data model`
/// reports "Content mismatch at offset 2085376".
#[test]
fn shrink_truncates_a_raw_data_file() {
    let cfg = Cfg {
        cluster: 4 * K,
        size: 2 * M,
        data_file: Some(true),
        ..Cfg::default()
    };
    replay(
        &cfg,
        &[
            Op::Write {
                off: 0x1fd36c,
                len: 0x694,
                fill: Fill::Byte(7),
            },
            Op::Shrink { new_size: 0x1fb400 },
        ],
    );
}
