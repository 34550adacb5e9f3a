//! The write engine on images with internal snapshots, judged by qemu-img.
//!
//! qemu-io writes data (plain, zero and compressed clusters), `qemu-img snapshot -c` takes
//! snapshots, and qcow2kit then writes, zero-writes and discards over clusters shared with the
//! snapshots, partial clusters and compressed clusters. Afterwards `qemu-img check` must be
//! clean, `qemu-img convert -l snapshot.name=…` must still return each snapshot's content as
//! exported before our writes, and the active image must equal the model. Then more rounds:
//! a snapshot taken by qemu-img after our writes, our writes again; a snapshot deleted; a
//! snapshot applied (reverted to); each followed by our writes and the same checks. Our streams
//! grow the image too (and, in the `snapshots_with_shrink_*` configurations, shrink it).
//! Also: four threads writing at once over shared clusters; crashes (unflushed writes, image
//! leaked without close) over shared clusters must leave no corruption, the flushed data and
//! every snapshot intact; a crashed lazy-refcounts image (ours, or qemu's after `abort`) is
//! rebuilt by qcow2kit's writable open.
//!
//! A snapshot is compared over its own virtual size only: qemu reads it at the image's current
//! size, and past the snapshot's size shows whatever its tables hold.
//!
//! Seeds per configuration: `QCOW2KIT_MODEL_CASES` (default 2). `QCOW2KIT_KEEP` keeps the
//! scratch directories.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::Format;
use qcow2kit::{BlockDevice, SnapshotRef};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use write_helpers::*;

const IMG: &str = "img.qcow2";

/// One configuration of the snapshot matrix.
#[derive(Debug, Clone, Copy)]
struct SnapCfg {
    cluster: u64,
    refcount_bits: u32,
    v2: bool,
    extended_l2: bool,
    zstd: bool,
    lazy: bool,
    size: u64,
    /// Our streams shrink the image too (not only grow it).
    shrink: bool,
}

impl Default for SnapCfg {
    fn default() -> Self {
        SnapCfg {
            cluster: 64 * K,
            refcount_bits: 16,
            v2: false,
            extended_l2: false,
            zstd: false,
            lazy: false,
            size: 4 * M + 1536,
            shrink: false,
        }
    }
}

impl SnapCfg {
    fn options(&self) -> String {
        let mut o = vec![
            format!("cluster_size={}", self.cluster),
            format!("compat={}", if self.v2 { "0.10" } else { "1.1" }),
        ];
        if !self.v2 {
            o.push(format!("refcount_bits={}", self.refcount_bits));
        }
        if self.extended_l2 {
            o.push("extended_l2=on".into());
        }
        if self.zstd {
            o.push("compression_type=zstd".into());
        }
        if self.lazy {
            o.push("lazy_refcounts=on".into());
        }
        o.join(",")
    }

    /// Discard works on whole clusters, extended L2 or not (as in QEMU).
    fn semantics(&self) -> Semantics {
        Semantics {
            discard_gran: self.cluster,
            discard_noop: false,
        }
    }

    fn shape(&self) -> StreamShape {
        let cfg = Cfg {
            cluster: self.cluster,
            extended_l2: self.extended_l2,
            size: self.size,
            ..Cfg::default()
        };
        let mut s = StreamShape::for_cfg(&cfg);
        s.pct_grow = 0;
        s
    }
}

/// Writes qemu data into the image: plain pattern writes (some unaligned), zero writes and
/// compressed clusters. Returns the guest offsets of the clusters written compressed.
///
/// qemu refuses a compressed write over a cluster that has a host offset (EIO), so compressed
/// runs only go to clusters nothing has written yet (`used`, kept across calls).
fn qemu_scribble(
    dir: &Path,
    cfg: &SnapCfg,
    rng: &mut Rng,
    n: usize,
    used: &mut Vec<bool>,
) -> Vec<u64> {
    let cs = cfg.cluster;
    let size = cfg.size;
    let full_clusters = size / cs;
    used.resize(size.div_ceil(cs) as usize, false);
    let mut cmds = Vec::new();
    let mut compressed = Vec::new();
    let mark = |used: &mut Vec<bool>, off: u64, len: u64| {
        for c in off / cs..(off + len).div_ceil(cs) {
            used[c as usize] = true;
        }
    };
    for _ in 0..n {
        let pat = rng.range(1, 255);
        match rng.below(6) {
            0 | 1 => {
                // Compressed: whole clusters, a run of 1..=3 never written before.
                let c = rng.below(full_clusters);
                let mut k = 0;
                while k < 3 && c + k < full_clusters && !used[(c + k) as usize] {
                    k += 1;
                }
                if k > 0 {
                    cmds.push(format!("write -c -P {pat} {} {}", c * cs, k * cs));
                    compressed.extend((c..c + k).map(|i| i * cs));
                    mark(used, c * cs, k * cs);
                }
            }
            2 => {
                let off = rng.below(size);
                let len = rng.range(1, 3 * cs).min(size - off);
                cmds.push(format!("write -z {off} {len}"));
                mark(used, off, len);
            }
            _ => {
                let off = if rng.below(2) == 0 {
                    rng.below(size)
                } else {
                    rng.below(size) & !(cs - 1)
                };
                let len = rng.range(1, 3 * cs).min(size - off);
                cmds.push(format!("write -P {pat} {off} {len}"));
                mark(used, off, len);
            }
        }
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(IMG);
    qemu_io(&args, dir);
    compressed
}

fn take_snapshot(dir: &Path, name: &str) {
    qemu_img(&["snapshot", "-c", name, IMG], dir);
}

/// A random stream biased towards `hot` clusters (compressed or shared ones): a third of the
/// ranged ops are moved to start inside one of them.
///
/// With `grow`, about one op in a hundred grows the image (up to twice its created size) and,
/// if the configuration says so, one in a hundred shrinks it; `size` tracks the device size.
fn snap_ops(
    cfg: &SnapCfg,
    rng: &mut Rng,
    hot: &[u64],
    n: usize,
    reopen: bool,
    grow: bool,
    size: &mut u64,
) -> Vec<Op> {
    let mut shape = cfg.shape();
    if !reopen {
        shape.pct_reopen = 0;
    }
    if grow {
        shape.pct_grow = 1;
        shape.pct_shrink = u8::from(cfg.shrink);
        shape.max_size = 2 * cfg.size;
    }
    (0..n)
        .map(|_| {
            let raw = RawOp {
                kind: rng.next_u64() as u8,
                a: rng.next_u64(),
                b: rng.next_u64(),
                c: rng.next_u64(),
            };
            let op = shape.realize(&raw, *size);
            if let Op::Grow { new_size } | Op::Shrink { new_size } = op {
                *size = new_size;
            }
            let size = *size;
            if hot.is_empty() || rng.below(3) != 0 {
                return op;
            }
            let h = hot[rng.below(hot.len() as u64) as usize];
            let off = (h + match rng.below(3) {
                0 => 0,
                1 => rng.below(cfg.cluster),
                _ => rng.below(cfg.cluster) & !511,
            })
            .min(size - 1);
            let len = match rng.below(3) {
                0 => rng.range(1, 700),
                1 => cfg.cluster,
                _ => rng.range(1, 2 * cfg.cluster),
            }
            .min(size - off);
            match op {
                Op::Write { fill, .. } => Op::Write { off, len, fill },
                Op::Zero { .. } => Op::Zero { off, len },
                Op::Discard { .. } => Op::Discard { off, len },
                other => other,
            }
        })
        .collect()
}

/// Applies `ops` through qcow2kit and to the model (reading each op's neighbourhood back).
fn ours(dir: &Path, model: &mut Model, ops: &[Op]) {
    let mut live = Live::open(&dir.join(IMG));
    for (i, op) in ops.iter().enumerate() {
        live.apply(op, i);
        model.apply(op);
        spot_check(live.dev(), model, op, i);
    }
    let all = read_all(live.dev());
    assert_same(&all, &model.data, 0, "active image before close");
    live.close();
}

/// check clean, every snapshot as exported before, the active image equal to the model.
fn judge(dir: &Path, snaps: &BTreeMap<String, Vec<u8>>, model: &Model, context: &str) {
    assert_check_clean(dir, IMG, context);
    for (name, want) in snaps {
        let got = export_raw(dir, IMG, Some(name), "snap-now.raw");
        // qemu reads a snapshot at the image's current size: a snapshot larger than the image
        // is cut short, and past the snapshot's own size qemu shows whatever the snapshot's
        // tables hold (after a shrink to a size inside a cluster, the stale rest of that
        // cluster: qemu-img resize --shrink, snapshot -c, resize, convert -l shows the same).
        // Only the snapshot's own size is compared.
        let n = got.len().min(want.len());
        let (got, want) = (&got[..n], &want[..n]);
        assert_same(
            got,
            want,
            0,
            &format!("{context}: snapshot {name} (qemu-img convert -l)"),
        );
        // Our reader of the snapshot agrees.
        let o = open(
            &dir.join(IMG),
            Format::Qcow2,
            &OpenOptions {
                snapshot: Some(SnapshotRef::Name(name.clone())),
                ..OpenOptions::qemu_compatible()
            },
        )
        .unwrap_or_else(|e| panic!("{context}: opening snapshot {name}: {e}"));
        let ours = read_all(o.device.as_ref());
        let n = ours.len().min(want.len());
        assert_same(
            &ours[..n],
            &want[..n],
            0,
            &format!("{context}: snapshot {name} read by qcow2kit"),
        );
    }
    fs::write(dir.join("model.raw"), &model.data).unwrap();
    assert_compare_identical(
        dir,
        IMG,
        "qcow2",
        "model.raw",
        "raw",
        &format!("{context}: active"),
    );
}

fn with_ops<T>(what: &str, ops: &[Op], f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let m = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{m}\n{what}: {} ops:\n{}", ops.len(), describe_ops(ops))
        }
    }
}

/// The full scenario for one configuration and seed.
fn scenario(cfg: SnapCfg, seed: u64, n: usize) {
    let dir = scratch();
    let d = dir.path();
    let mut rng = Rng(seed);
    let ctx = |step: &str| format!("{cfg:?} seed {seed}: {step}");
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cfg.options(),
            IMG,
            &cfg.size.to_string(),
        ],
        d,
    );
    let mut used = Vec::new();
    let mut hot = qemu_scribble(d, &cfg, &mut rng, 40, &mut used);
    take_snapshot(d, "s1");
    hot.extend(qemu_scribble(d, &cfg, &mut rng, 30, &mut used));
    take_snapshot(d, "s2");
    // Compressed clusters only the active image has.
    hot.extend(qemu_scribble(d, &cfg, &mut rng, 12, &mut used));
    hot.sort_unstable();
    hot.dedup();

    let mut snaps = BTreeMap::new();
    for s in ["s1", "s2"] {
        snaps.insert(s.to_string(), export_raw(d, IMG, Some(s), "snap.raw"));
    }
    let mut model = Model {
        data: export_raw(d, IMG, None, "active.raw"),
        sem: cfg.semantics(),
    };
    assert_check_clean(d, IMG, &ctx("qemu's image before our writes"));

    // Round 1: our writes over shared, partial and compressed clusters (and grows).
    // Resizes with snapshots; qemu cannot resize v2 images with snapshots (see
    // v2_image_with_snapshots_is_not_resized).
    let grow = !cfg.v2;
    let mut size = cfg.size;
    let ops = snap_ops(&cfg, &mut rng, &hot, n, true, grow, &mut size);
    with_ops(&ctx("round 1"), &ops, || {
        ours(d, &mut model, &ops);
        judge(d, &snaps, &model, &ctx("after round 1"));
    });

    // Round 2: a snapshot taken by qemu-img after our writes, then our writes again.
    take_snapshot(d, "s3");
    snaps.insert("s3".into(), model.data.clone());
    let ops = snap_ops(&cfg, &mut rng, &hot, n, true, grow, &mut size);
    with_ops(
        &ctx("round 2 (after snapshot s3 of our writes)"),
        &ops,
        || {
            ours(d, &mut model, &ops);
            judge(d, &snaps, &model, &ctx("after round 2"));
        },
    );

    // Round 3: snapshot s1 deleted by qemu-img (refcounts drop, COPIED flags change), more
    // writes (now partly in place).
    qemu_img(&["snapshot", "-d", "s1", IMG], d);
    snaps.remove("s1");
    assert_check_clean(d, IMG, &ctx("after qemu-img snapshot -d s1"));
    let ops = snap_ops(&cfg, &mut rng, &hot, n / 2, false, false, &mut size);
    with_ops(&ctx("round 3 (after deleting s1)"), &ops, || {
        ours(d, &mut model, &ops);
        judge(d, &snaps, &model, &ctx("after round 3"));
    });

    // Round 4: revert to s2 (qemu-img snapshot -a), then write over it.
    qemu_img(&["snapshot", "-a", "s2", IMG], d);
    model.data = snaps["s2"].clone();
    size = model.data.len() as u64;
    let ops = snap_ops(&cfg, &mut rng, &hot, n / 2, true, false, &mut size);
    with_ops(&ctx("round 4 (after applying s2)"), &ops, || {
        ours(d, &mut model, &ops);
        judge(d, &snaps, &model, &ctx("after round 4"));
    });
}

fn seeds(default: u32) -> u64 {
    u64::from(cases(default))
}

#[test]
fn snapshots_64k_rb16() {
    for s in 0..seeds(2) {
        scenario(SnapCfg::default(), 100 + s, 300);
    }
}

#[test]
fn snapshots_512_rb8_across_l2_tables() {
    let cfg = SnapCfg {
        cluster: 512,
        // Narrower refcounts overflow in qemu itself: up to ~20 pattern-compressed clusters
        // share one 512-byte host cluster, and each snapshot adds a reference to each.
        refcount_bits: 8,
        size: M + 512,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 200 + s, 500);
    }
}

#[test]
fn snapshots_4k_rb64_zstd() {
    let cfg = SnapCfg {
        cluster: 4 * K,
        refcount_bits: 64,
        zstd: true,
        size: 2 * M + 3584,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 300 + s, 400);
    }
}

#[test]
fn snapshots_v2_64k() {
    let cfg = SnapCfg {
        v2: true,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 400 + s, 300);
    }
}

#[test]
fn snapshots_extended_l2_32k() {
    let cfg = SnapCfg {
        cluster: 32 * K,
        extended_l2: true,
        size: 3 * M + 512,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 500 + s, 400);
    }
}

#[test]
fn snapshots_lazy_refcounts_16k() {
    let cfg = SnapCfg {
        cluster: 16 * K,
        lazy: true,
        size: 3 * M,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 600 + s, 300);
    }
}

/// Shrinks (and grows) between writes, with snapshots sharing the clusters and tables that
/// the shrink drops from the active image.
#[test]
fn snapshots_with_shrink_64k() {
    let cfg = SnapCfg {
        shrink: true,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 1000 + s, 300);
    }
}

#[test]
fn snapshots_with_shrink_4k_rb64() {
    let cfg = SnapCfg {
        cluster: 4 * K,
        refcount_bits: 64,
        size: 2 * M + 3584,
        shrink: true,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 1100 + s, 400);
    }
}

#[test]
fn snapshots_with_shrink_extended_l2_16k() {
    let cfg = SnapCfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 3 * M,
        shrink: true,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        scenario(cfg, 1200 + s, 400);
    }
}

/// Crash over shared clusters: after snapshots, our COW writes, a flush, more COW writes
/// without flush, and the image leaked (no close). qemu-img check must find no corruption
/// (leaks allowed), every snapshot must be intact and every flushed byte must read back.
fn crash_scenario(cfg: SnapCfg, seed: u64) {
    let dir = scratch();
    let d = dir.path();
    let mut rng = Rng(seed);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cfg.options(),
            IMG,
            &cfg.size.to_string(),
        ],
        d,
    );
    let mut used = Vec::new();
    let mut hot = qemu_scribble(d, &cfg, &mut rng, 40, &mut used);
    take_snapshot(d, "s1");
    hot.extend(qemu_scribble(d, &cfg, &mut rng, 10, &mut used));
    let mut snaps = BTreeMap::new();
    snaps.insert("s1".to_string(), export_raw(d, IMG, Some("s1"), "snap.raw"));
    let mut model = Model {
        data: export_raw(d, IMG, None, "active.raw"),
        sem: cfg.semantics(),
    };
    let opened = open_rw_crashing(&d.join(IMG), None);
    let dev = opened.device.clone();
    let run = |dev: &dyn BlockDevice, op: &Op| match *op {
        Op::Write { off, len, fill } => dev.write_at(&fill.bytes(len), off),
        Op::Zero { off, len } => dev.write_zeroes(off, len),
        Op::Discard { off, len } => dev.discard(off, len),
        _ => dev.flush(),
    };
    let mut size = cfg.size;
    for op in snap_ops(&cfg, &mut rng, &hot, 200, false, false, &mut size) {
        run(dev.as_ref(), &op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        model.apply(&op);
    }
    dev.flush().expect("flush");
    let flushed = model.clone();
    let mut touched = vec![false; cfg.size as usize];
    for op in snap_ops(&cfg, &mut rng, &hot, 150, false, false, &mut size) {
        if op == Op::Flush {
            continue;
        }
        run(dev.as_ref(), &op).unwrap_or_else(|e| panic!("unflushed {op:?}: {e}"));
        if let Some((off, len)) = op.range() {
            let cs = cfg.cluster;
            let a = off & !(cs - 1);
            let b = (off + len).next_multiple_of(cs).min(cfg.size);
            touched[a as usize..b as usize].fill(true);
        }
    }
    drop(dev);
    std::mem::forget(opened);

    let ctx = format!("crash over snapshots {cfg:?} seed {seed}");
    assert_check_no_corruption(d, IMG, &ctx);
    let got = export_raw(d, IMG, None, "after.raw");
    for (i, ((&g, &w), &t)) in got.iter().zip(&flushed.data).zip(&touched).enumerate() {
        if !t && g != w {
            panic!("{ctx}: flushed byte {i:#x} reads {g:#04x}, was {w:#04x} at the flush");
        }
    }
    for (name, want) in &snaps {
        let now = export_raw(d, IMG, Some(name), "snap-now.raw");
        assert_same(&now, want, 0, &format!("{ctx}: snapshot {name}"));
    }
    // After repairing the leaks the image is clean.
    qemu_img(&["check", "-q", "-r", "leaks", "-f", "qcow2", IMG], d);
    assert_check_clean(d, IMG, &format!("{ctx}: after check -r leaks"));
}

#[test]
fn crash_over_snapshots_64k() {
    for s in 0..seeds(2) {
        crash_scenario(SnapCfg::default(), 700 + s);
    }
}

#[test]
fn crash_over_snapshots_512_rb8() {
    let cfg = SnapCfg {
        cluster: 512,
        // Narrower refcounts overflow in qemu itself: up to ~20 pattern-compressed clusters
        // share one 512-byte host cluster, and each snapshot adds a reference to each.
        refcount_bits: 8,
        size: M,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        crash_scenario(cfg, 800 + s);
    }
}

#[test]
fn crash_over_snapshots_extended_l2() {
    let cfg = SnapCfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 2 * M,
        ..SnapCfg::default()
    };
    for s in 0..seeds(2) {
        crash_scenario(cfg, 900 + s);
    }
}

/// qemu refuses to resize a v2 (compat=0.10) image that has internal snapshots ("Can't resize
/// a v2 image which has snapshots"): v2 snapshots need not record their virtual size, so after a
/// resize a snapshot could no longer be applied (`qemu-img snapshot -a` fails exactly so).
/// qcow2kit must refuse the grow too.
#[test]
fn v2_image_with_snapshots_is_not_resized() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            IMG,
            "1M",
        ],
        d,
    );
    qemu_io(&["-c", "write -P 7 0 64k", IMG], d);
    take_snapshot(d, "s1");
    // qemu's own answer, on a copy.
    fs::copy(d.join(IMG), d.join("copy.qcow2")).unwrap();
    let q = tool(QEMU_IMG, &["resize", "-f", "qcow2", "copy.qcow2", "2M"], d);
    assert!(
        q.code != 0
            && q.stderr
                .contains("Can't resize a v2 image which has snapshots"),
        "qemu-img resize changed its mind: {q}"
    );
    let o = open_rw(&d.join(IMG));
    let r = o.qcow2.as_ref().expect("qcow2").resize(2 * M, false);
    drop(o);
    assert!(
        r.is_err(),
        "qcow2kit grew a v2 image with snapshots (qemu refuses); afterwards qemu-img snapshot \
         -a s1 gives: {}",
        tool(QEMU_IMG, &["snapshot", "-a", "s1", IMG], d)
    );
    assert_check_clean(d, IMG, "after the refused resize");
}

/// Four threads writing at once (disjoint byte ranges, clusters shared between threads) over
/// clusters and L2 tables shared with two snapshots: the COW of shared clusters and tables
/// races with itself. Snapshots intact, image check-clean, content as the per-thread models.
fn concurrent_over_snapshots(cfg: SnapCfg, seed: u64, ops_per_thread: usize) {
    let dir = scratch();
    let d = dir.path();
    let mut rng = Rng(seed);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cfg.options(),
            IMG,
            &cfg.size.to_string(),
        ],
        d,
    );
    let mut used = Vec::new();
    qemu_scribble(d, &cfg, &mut rng, 60, &mut used);
    take_snapshot(d, "s1");
    qemu_scribble(d, &cfg, &mut rng, 30, &mut used);
    take_snapshot(d, "s2");
    let mut snaps = BTreeMap::new();
    for s in ["s1", "s2"] {
        snaps.insert(s.to_string(), export_raw(d, IMG, Some(s), "snap.raw"));
    }
    let model0 = Model {
        data: export_raw(d, IMG, None, "active.raw"),
        sem: cfg.semantics(),
    };
    let opened = open_rw(&d.join(IMG));
    let dev: Arc<dyn BlockDevice> = opened.device.clone();
    let want = concurrent_disjoint_writers(&dev, &model0, cfg.cluster, seed, ops_per_thread);
    let got = read_all(dev.as_ref());
    assert_same(
        &got,
        &want.data,
        0,
        "concurrent writers over snapshots, before close",
    );
    drop(dev);
    drop(opened);
    judge(
        d,
        &snaps,
        &want,
        &format!("concurrent writers over snapshots {cfg:?}"),
    );
}

#[test]
fn concurrent_over_snapshots_64k() {
    concurrent_over_snapshots(SnapCfg::default(), 1300, 1000);
}

#[test]
fn concurrent_over_snapshots_4k_rb64() {
    let cfg = SnapCfg {
        cluster: 4 * K,
        refcount_bits: 64,
        size: 2 * M,
        ..SnapCfg::default()
    };
    concurrent_over_snapshots(cfg, 1301, 1500);
}

#[test]
fn concurrent_over_snapshots_extended_l2() {
    let cfg = SnapCfg {
        cluster: 16 * K,
        extended_l2: true,
        size: 2 * M,
        ..SnapCfg::default()
    };
    concurrent_over_snapshots(cfg, 1302, 1000);
}

/// A lazy-refcounts image with snapshots and compressed clusters crashes (our unflushed COW
/// writes, image leaked): it is dirty, and qcow2kit's writable open must rebuild refcounts from
/// all metadata (active and snapshot tables, compressed spans). After our open, more writes and
/// a close: check-clean, snapshots intact, data as the model (flushed bytes intact).
#[test]
fn crash_lazy_over_snapshots_then_qcow2kit_rebuilds() {
    let cfg = SnapCfg {
        cluster: 4 * K,
        lazy: true,
        size: 2 * M,
        ..SnapCfg::default()
    };
    for seed in 0..seeds(2) {
        let seed = 1400 + seed;
        let dir = scratch();
        let d = dir.path();
        let mut rng = Rng(seed);
        let ctx = format!("lazy crash over snapshots seed {seed}");
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &cfg.options(),
                IMG,
                &cfg.size.to_string(),
            ],
            d,
        );
        let mut used = Vec::new();
        let mut hot = qemu_scribble(d, &cfg, &mut rng, 40, &mut used);
        take_snapshot(d, "s1");
        hot.extend(qemu_scribble(d, &cfg, &mut rng, 20, &mut used));
        let mut snaps = BTreeMap::new();
        snaps.insert("s1".to_string(), export_raw(d, IMG, Some("s1"), "snap.raw"));
        let mut model = Model {
            data: export_raw(d, IMG, None, "active.raw"),
            sem: cfg.semantics(),
        };
        let mut size = cfg.size;
        {
            let opened = open_rw_crashing(&d.join(IMG), None);
            let dev = opened.device.clone();
            for op in snap_ops(&cfg, &mut rng, &hot, 250, false, false, &mut size) {
                let r = match op {
                    Op::Write { off, len, fill } => dev.write_at(&fill.bytes(len), off),
                    Op::Zero { off, len } => dev.write_zeroes(off, len),
                    Op::Discard { off, len } => dev.discard(off, len),
                    _ => dev.flush(),
                };
                r.unwrap_or_else(|e| panic!("{ctx}: {op:?}: {e}"));
                model.apply(&op);
            }
            dev.flush().expect("flush");
            drop(dev);
            std::mem::forget(opened);
        }
        let info = qemu_img(&["info", "--output", "json", "-f", "qcow2", IMG], d);
        assert!(
            info.contains("\"dirty-flag\": true"),
            "{ctx}: not dirty after the crash: {info}"
        );
        // Everything was flushed before the crash: the data is the model's.
        let got = export_raw(d, IMG, None, "after.raw");
        assert_same(
            &got,
            &model.data,
            0,
            &format!("{ctx}: content after the crash"),
        );
        let ops = snap_ops(&cfg, &mut rng, &hot, 150, true, false, &mut size);
        with_ops(
            &format!("{ctx}: qcow2kit opens the dirty image and writes"),
            &ops,
            || {
                ours(d, &mut model, &ops);
                judge(
                    d,
                    &snaps,
                    &model,
                    &format!("{ctx}: after qcow2kit's rebuild and writes"),
                );
            },
        );
    }
}

/// qemu's own crash (qemu-io … abort on a lazy-refcounts image with a snapshot) leaves a dirty
/// image with stale refcounts; qcow2kit opens it writable (rebuilding the refcounts), writes and
/// closes: check-clean, snapshot intact, content as the model.
#[test]
fn qemu_crashed_lazy_image_rebuilt_by_qcow2kit() {
    let cfg = SnapCfg {
        cluster: 16 * K,
        lazy: true,
        size: 3 * M,
        ..SnapCfg::default()
    };
    let dir = scratch();
    let d = dir.path();
    let mut rng = Rng(1500);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cfg.options(),
            IMG,
            &cfg.size.to_string(),
        ],
        d,
    );
    let mut used = Vec::new();
    let mut hot = qemu_scribble(d, &cfg, &mut rng, 30, &mut used);
    take_snapshot(d, "s1");
    hot.extend(qemu_scribble(d, &cfg, &mut rng, 10, &mut used));
    let mut snaps = BTreeMap::new();
    snaps.insert("s1".to_string(), export_raw(d, IMG, Some("s1"), "snap.raw"));
    // The crash: qemu-io writes (COW of shared clusters, new clusters), flushes, aborts.
    let o = tool(
        QEMU_IO,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x51 0 100k",
            "-c",
            "write -P 0x52 1M 300k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "flush",
            "-c",
            "abort",
            IMG,
        ],
        d,
    );
    assert!(o.code != 0, "qemu-io abort exits abnormally: {o}");
    let info = qemu_img(&["info", "--output", "json", "-f", "qcow2", IMG], d);
    assert!(
        info.contains("\"dirty-flag\": true"),
        "qemu's crash left a clean image: {info}"
    );
    let mut model = Model {
        data: export_raw(d, IMG, None, "active.raw"),
        sem: cfg.semantics(),
    };
    let mut size = cfg.size;
    let ops = snap_ops(&cfg, &mut rng, &hot, 200, true, false, &mut size);
    with_ops("writes on qemu's crashed lazy image", &ops, || {
        ours(d, &mut model, &ops);
        judge(
            d,
            &snaps,
            &model,
            "after qcow2kit rebuilt qemu's crashed image",
        );
    });
}
