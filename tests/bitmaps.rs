//! Persistent dirty bitmaps kept current by qcow2kit, judged by QEMU.
//!
//! The same guest operations go through qemu-io on one image and through qcow2kit on a twin,
//! both made by `qemu-img create` + `qemu-img bitmap --add` (enabled bitmaps at several
//! granularities, a disabled one). After close:
//! - `qemu-img info` lists the same bitmaps with the same flags (none in use);
//! - `qemu-img check` finds both clean;
//! - the bits of every bitmap, read by the library from both files, are equal, and equal to the
//!   bits the operations' ranges set (enabled bitmaps) or to what they held (disabled ones);
//! - QEMU reads our bitmaps as we wrote them: `qemu-img convert --bitmaps` of our image gives a
//!   copy whose bits (written by QEMU) are the same.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::engine::{DirtyBitmap, Qcow2Image};
use qcow2kit::BlockDevice;
use std::path::Path;
use write_helpers::*;

/// (name, granularity, enabled) of the bitmaps every test image carries.
const BITMAPS: &[(&str, u64, bool)] = &[
    ("b64k", 65536, true),
    ("b512", 512, true),
    ("b4k", 4096, true),
    ("off", 4096, false),
];

fn make_image(dir: &Path, name: &str, size: u64, cluster: u64) {
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            name,
            &size.to_string(),
        ],
        dir,
    );
    for (b, g, enabled) in BITMAPS {
        let g = g.to_string();
        let mut args = vec!["bitmap", "--add", "-g", &g];
        if !enabled {
            args.push("--disable");
        }
        args.extend([name, b]);
        qemu_img(&args, dir);
    }
}

fn bitmap_section(dir: &Path, img: &str) -> String {
    let info = qemu_img(&["info", "-U", "-f", "qcow2", img], dir);
    let start = info.find("bitmaps:").unwrap_or(info.len());
    let end = info[start..]
        .find("refcount bits")
        .map_or(info.len(), |e| start + e);
    info[start..end].to_string()
}

fn read_bits(dir: &Path, img: &str, name: &str) -> DirtyBitmap {
    let o = open_ro(&dir.join(img));
    let q = o.qcow2.as_ref().expect("qcow2");
    q.bitmap(name)
        .unwrap_or_else(|e| panic!("reading bitmap {name} of {img}: {e}"))
}

fn expected(size: u64, granularity: u64, ops: &[Op]) -> Vec<(u64, u64)> {
    let mut b = vec![false; size.div_ceil(granularity) as usize];
    for op in ops {
        if let Some((off, len)) = op.range() {
            if len > 0 {
                for i in off / granularity..=(off + len - 1) / granularity {
                    b[i as usize] = true;
                }
            }
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &d) in b.iter().enumerate() {
        if !d {
            continue;
        }
        let start = i as u64 * granularity;
        let end = (start + granularity).min(size);
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l = end - *s,
            _ => out.push((start, end - start)),
        }
    }
    out
}

fn run_twins(cluster: u64, size: u64, first: &[Op], second: &[Op]) {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "q.qcow2", size, cluster);
    make_image(dir, "k.qcow2", size, cluster);
    // Both start from the same bits: some written by QEMU, stored by QEMU.
    apply_qemu_io(dir, "q.qcow2", first);
    apply_qemu_io(dir, "k.qcow2", first);
    apply_qemu_io(dir, "q.qcow2", second);
    let mut live = Live::open(&dir.join("k.qcow2"));
    for (i, op) in second.iter().enumerate() {
        live.apply(op, i);
    }
    live.close();
    drop(live);
    let ctx = format!("cluster {cluster}, ops {}", describe_ops(second));
    assert_eq!(
        bitmap_section(dir, "k.qcow2"),
        bitmap_section(dir, "q.qcow2"),
        "qemu-img info bitmaps ({ctx})"
    );
    assert!(
        !bitmap_section(dir, "k.qcow2").contains("in-use"),
        "bitmaps left in use ({ctx})"
    );
    assert_check_clean(dir, "k.qcow2", &ctx);
    assert_compare_identical(dir, "q.qcow2", "qcow2", "k.qcow2", "qcow2", &ctx);
    qemu_img(
        &["convert", "-O", "qcow2", "--bitmaps", "k.qcow2", "kc.qcow2"],
        dir,
    );
    let all: Vec<Op> = first.iter().chain(second).copied().collect();
    for (name, g, enabled) in BITMAPS {
        let q = read_bits(dir, "q.qcow2", name);
        let k = read_bits(dir, "k.qcow2", name);
        let kc = read_bits(dir, "kc.qcow2", name);
        assert_eq!(k.extents(), q.extents(), "bitmap {name} ({ctx})");
        assert_eq!(
            kc.extents(),
            k.extents(),
            "bitmap {name} read by QEMU ({ctx})"
        );
        let want = if *enabled {
            expected(size, *g, &all)
        } else {
            Vec::new()
        };
        assert_eq!(k.extents(), want, "bitmap {name} against the ops ({ctx})");
    }
}

fn w(off: u64, len: u64) -> Op {
    Op::Write {
        off,
        len,
        fill: Fill::Byte(0x5a),
    }
}

#[test]
fn writes_zeroes_and_discards_mark_what_qemu_marks() {
    let first = [w(0, 65536), w(3 * M + 100, 700)];
    let second = [
        w(M, 4097),
        w(5 * M - 1, 2),
        Op::Zero {
            off: 2 * M + 512,
            len: 1536,
        },
        Op::Discard { off: 8 * M, len: M },
        Op::Flush,
        w(16 * M - 512, 512),
        Op::Zero {
            off: 10 * M,
            len: 3 * M,
        },
    ];
    for cluster in [512, 4096, 65536] {
        run_twins(cluster, 16 * M, &first, &second);
    }
}

#[test]
fn reopen_keeps_the_bits_of_every_session() {
    let first = [w(3 * M, 3 * K)];
    let second = [
        w(0, 512),
        Op::Reopen,
        w(M + 512, 512),
        Op::Reopen,
        w(2 * M, 64 * K),
    ];
    run_twins(65536, 4 * M, &first, &second);
}

#[test]
fn the_first_write_flags_enabled_bitmaps_in_use_and_close_clears_them() {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 4 * M, 65536);
    let before = std::fs::read(dir.join("k.qcow2")).expect("read image");
    // Opened writable and closed without a write: the file is untouched.
    drop(Live::open(&dir.join("k.qcow2")));
    assert!(std::fs::read(dir.join("k.qcow2")).expect("read image") == before);
    let mut live = Live::open(&dir.join("k.qcow2"));
    let in_use = || {
        let o = tool(QEMU_IMG, &["info", "-U", "-f", "qcow2", "k.qcow2"], dir);
        o.stdout.matches("in-use").count()
    };
    assert_eq!(in_use(), 0);
    live.apply(&w(0, 512), 0);
    // Before the write's data: every enabled bitmap is flagged (a crash now leaves them
    // inconsistent); the disabled one is left as it is.
    assert_eq!(in_use(), 3);
    live.close();
    drop(live);
    assert!(!bitmap_section(dir, "k.qcow2").contains("in-use"));
    assert_check_clean(dir, "k.qcow2", "after close");
}

#[test]
fn bitmaps_left_in_use_stay_inconsistent_and_untouched() {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 4 * M, 65536);
    // A writer that dies leaves its bitmaps in use.
    let _ = tool(
        QEMU_IO,
        &["-c", "write 0 64k", "-c", "abort", "k.qcow2"],
        dir,
    );
    let before = bitmap_section(dir, "k.qcow2");
    assert_eq!(before.matches("in-use").count(), BITMAPS.len(), "{before}");
    let mut live = Live::open(&dir.join("k.qcow2"));
    live.apply(&w(M, 512), 0);
    let q = live
        .opened
        .as_ref()
        .and_then(|o| o.qcow2.clone())
        .expect("qcow2");
    let e = q
        .bitmap("b64k")
        .expect_err("an inconsistent bitmap is refused");
    assert!(e.to_string().contains("is inconsistent"), "{e}");
    assert!(q.clear_bitmap("b64k").is_err());
    assert!(q.resize(8 * M, false).is_err(), "QEMU refuses a resize");
    drop(q);
    live.close();
    drop(live);
    assert_eq!(bitmap_section(dir, "k.qcow2"), before);
    assert_check_clean(dir, "k.qcow2", "after writes over in-use bitmaps");
    // QEMU agrees they are unusable, and removes them as it would its own.
    let o = tool(QEMU_IMG, &["bitmap", "--clear", "k.qcow2", "b64k"], dir);
    assert_eq!(o.code, 1, "{o}");
    let opened = open_rw(&dir.join("k.qcow2"));
    let q = opened.qcow2.clone().expect("qcow2");
    for (name, _, _) in BITMAPS {
        q.remove_bitmap(name)
            .expect("removing an inconsistent bitmap");
    }
    drop(q);
    drop(opened);
    assert!(!qemu_img(&["info", "k.qcow2"], dir).contains("bitmaps:"));
    assert_check_clean(dir, "k.qcow2", "after removing the bitmaps");
}

#[test]
fn resize_follows_qemu() {
    let d = scratch();
    let dir = d.path();
    for img in ["q.qcow2", "k.qcow2"] {
        make_image(dir, img, 4 * M, 65536);
        qemu_io(&["-c", "write 3M 1M", img], dir);
    }
    qemu_img(&["resize", "q.qcow2", "8M"], dir);
    qemu_io(&["-c", "write 6M 512", "q.qcow2"], dir);
    qemu_img(&["resize", "--shrink", "q.qcow2", "3584K"], dir);
    let mut live = Live::open(&dir.join("k.qcow2"));
    live.apply(&Op::Grow { new_size: 8 * M }, 0);
    live.apply(&w(6 * M, 512), 1);
    live.apply(&Op::Shrink { new_size: 3584 * K }, 2);
    live.close();
    drop(live);
    assert_check_clean(dir, "k.qcow2", "after resizes");
    assert_eq!(
        bitmap_section(dir, "k.qcow2"),
        bitmap_section(dir, "q.qcow2")
    );
    for (name, _, _) in BITMAPS {
        let q = read_bits(dir, "q.qcow2", name);
        assert_eq!(q.size(), 3584 * K);
        assert_eq!(read_bits(dir, "k.qcow2", name), q, "bitmap {name}");
    }
}

#[test]
fn library_management_matches_qemu_img_bitmap() {
    let d = scratch();
    let dir = d.path();
    for img in ["q.qcow2", "k.qcow2"] {
        qemu_img(&["create", "-f", "qcow2", img, "4M"], dir);
        qemu_io(&["-c", "write 0 64k", img], dir);
    }
    let q = |a: &[&str]| qemu_img(a, dir);
    q(&["bitmap", "--add", "q.qcow2", "a"]);
    q(&["bitmap", "--add", "-g", "512", "--disable", "q.qcow2", "b"]);
    qemu_io(&["-c", "write 1M 4k", "q.qcow2"], dir);
    q(&["bitmap", "--enable", "q.qcow2", "b"]);
    qemu_io(&["-c", "write 2M 512", "q.qcow2"], dir);
    q(&["bitmap", "--merge", "a", "q.qcow2", "b"]);
    q(&["bitmap", "--clear", "q.qcow2", "a"]);
    q(&["bitmap", "--add", "q.qcow2", "gone"]);
    q(&["bitmap", "--remove", "q.qcow2", "gone"]);

    let step = |f: &dyn Fn(&Qcow2Image)| {
        let o = open_rw(&dir.join("k.qcow2"));
        f(o.qcow2.as_ref().expect("qcow2"));
    };
    step(&|i| i.add_bitmap("a", 65536, true).expect("add a"));
    step(&|i| i.add_bitmap("b", 512, false).expect("add b"));
    step(&|i| i.write_at(&[1; 4096], M).expect("write"));
    step(&|i| i.set_bitmap_enabled("b", true).expect("enable b"));
    step(&|i| i.write_at(&[1; 512], 2 * M).expect("write"));
    step(&|i| {
        let a = i.bitmap("a").expect("a");
        i.merge_into_bitmap("b", &a).expect("merge")
    });
    step(&|i| i.clear_bitmap("a").expect("clear a"));
    step(&|i| i.add_bitmap("gone", 65536, true).expect("add gone"));
    step(&|i| i.remove_bitmap("gone").expect("remove gone"));
    step(&|i| {
        assert!(i.add_bitmap("a", 65536, true).is_err());
        assert!(i.add_bitmap("c", 1000, true).is_err());
        assert!(i.remove_bitmap("nope").is_err());
    });
    assert_check_clean(dir, "k.qcow2", "after bitmap management");
    assert_eq!(
        bitmap_section(dir, "k.qcow2"),
        bitmap_section(dir, "q.qcow2")
    );
    for name in ["a", "b"] {
        assert_eq!(
            read_bits(dir, "k.qcow2", name),
            read_bits(dir, "q.qcow2", name),
            "bitmap {name}"
        );
    }
    assert_eq!(
        read_bits(dir, "k.qcow2", "b").extents(),
        vec![(M, 65536), (2 * M, 65536)],
        "b: its own bits and a's, merged at a's granularity"
    );
}

#[test]
fn hostile_bitmaps_are_refused_at_writable_open() {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 4 * M, 65536);
    qemu_io(&["-c", "write 0 64k", "k.qcow2"], dir);
    // Point the first bitmap's first table entry at the header cluster, then at an invalid
    // entry: a writable open must refuse either, never free or trust them.
    let bytes = std::fs::read(dir.join("k.qcow2")).expect("read image");
    let o = open_ro(&dir.join("k.qcow2"));
    let e = o.qcow2.as_ref().expect("qcow2").bitmaps()[0].clone();
    drop(o);
    // 0x10000: the refcount table; then misaligned, offset with the all-ones bit, a reserved
    // bit, past the end of the file.
    for bad in [0x10000u64, 0x200, 0x30001, 1u64 << 63, 0x7fff_0000] {
        let mut b = bytes.clone();
        let t = e.table_offset as usize;
        b[t..t + 8].copy_from_slice(&bad.to_be_bytes());
        std::fs::write(dir.join("h.qcow2"), &b).expect("write image");
        let r = qcow2kit::chain::open(
            &dir.join("h.qcow2"),
            qcow2kit::Format::Qcow2,
            &qcow2kit::chain::OpenOptions {
                writable: true,
                ..qcow2kit::chain::OpenOptions::qemu_compatible()
            },
        );
        let err = r.err().unwrap_or_else(|| panic!("entry {bad:#x} accepted"));
        assert!(err.to_string().contains("bitmap"), "{err}");
        assert_eq!(
            std::fs::read(dir.join("h.qcow2")).expect("read"),
            b,
            "changed"
        );
    }
}

#[test]
fn memory_is_bounded() {
    // Huge disks tracked at 512 bytes (512 MiB of bits each, QEMU's largest bitmap): one or two
    // are kept, more memory than allowed is refused at writable open with a clear error, and
    // so is a bitmap added past it.
    let d = scratch();
    let dir = d.path();
    let make = |img: &str, bitmaps: &[&str]| {
        qemu_img(
            &["create", "-f", "qcow2", "-o", "cluster_size=2M", img, "2T"],
            dir,
        );
        for b in bitmaps {
            qemu_img(&["bitmap", "--add", "-g", "512", img, b], dir);
        }
    };
    make("one.qcow2", &["fine"]);
    make("big.qcow2", &["a", "b", "c"]);
    let one = open_rw(&dir.join("one.qcow2"));
    let q = one.qcow2.clone().expect("qcow2");
    q.add_bitmap("second", 512, true)
        .expect("a second 512 MiB bitmap");
    let e = q.add_bitmap("third", 512, true).expect_err("a third one");
    assert!(e.to_string().contains("memory"), "{e}");
    drop(q);
    drop(one);
    let r = qcow2kit::chain::open(
        &dir.join("big.qcow2"),
        qcow2kit::Format::Qcow2,
        &qcow2kit::chain::OpenOptions {
            writable: true,
            ..qcow2kit::chain::OpenOptions::qemu_compatible()
        },
    );
    let err = r.err().expect("refused");
    assert!(err.to_string().contains("memory"), "{err}");
    assert!(!qemu_img(&["info", "big.qcow2"], dir).contains("in-use"));
}

/// After `close` the bitmaps are stored and no longer in use; the handle then refuses every
/// change (a write or a resize that went through would leave the stored bitmaps stale).
#[test]
fn a_closed_image_refuses_changes_and_keeps_its_bitmaps() {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 4 * M, 65536);
    let o = open_rw(&dir.join("k.qcow2"));
    let q = o.qcow2.clone().expect("qcow2");
    q.write_at(&[1; 512], 0).expect("write");
    q.close().expect("close");
    assert!(!bitmap_section(dir, "k.qcow2").contains("in-use"));
    assert!(
        matches!(q.write_at(&[1; 512], M), Err(qcow2kit::Error::Closed)),
        "a write after close"
    );
    assert!(
        matches!(q.resize(8 * M, false), Err(qcow2kit::Error::Closed)),
        "a resize after close"
    );
    assert!(
        matches!(q.clear_bitmap("b64k"), Err(qcow2kit::Error::Closed)),
        "a bitmap change after close"
    );
    q.close().expect("close again");
    drop(q);
    drop(o);
    assert_check_clean(dir, "k.qcow2", "after close");
    assert!(!bitmap_section(dir, "k.qcow2").contains("in-use"));
    assert_eq!(
        read_bits(dir, "k.qcow2", "b64k").extents(),
        vec![(0, 65536)]
    );
    assert_eq!(read_bits(dir, "k.qcow2", "off").size(), 4 * M);
}

#[test]
fn concurrent_writers_are_all_tracked() {
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 16 * M, 4096);
    let o = open_rw(&dir.join("k.qcow2"));
    let q = o.qcow2.clone().expect("qcow2");
    let mut want = Vec::new();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let q = q.clone();
            s.spawn(move || {
                for i in 0..32u64 {
                    let off = (t * 32 + i) * 128 * K;
                    q.write_at(&[t as u8 + 1; 4096], off).expect("write");
                }
            });
        }
    });
    for i in 0..128u64 {
        want.push((i * 128 * K, 4096));
    }
    drop(q);
    drop(o);
    assert_check_clean(dir, "k.qcow2", "after concurrent writes");
    assert_eq!(read_bits(dir, "k.qcow2", "b4k").extents(), want);
    assert_eq!(read_bits(dir, "k.qcow2", "b512").extents(), want);
}

#[test]
fn a_stale_bitmap_directory_is_never_freed() {
    // A program without bitmap support cleared the autoclear bit; `check -r` then freed the
    // directory's clusters as leaks, and data reused them. Adding a bitmap must not free them.
    let d = scratch();
    let dir = d.path();
    make_image(dir, "k.qcow2", 4 * M, 65536);
    let mut b = std::fs::read(dir.join("k.qcow2")).expect("read image");
    b[88..96].copy_from_slice(&0u64.to_be_bytes());
    std::fs::write(dir.join("k.qcow2"), &b).expect("write image");
    // A repair that keeps the stale extension (QEMU's drops it) frees its clusters as leaks.
    let file = qcow2kit::io::FileStorage::open(dir.join("k.qcow2"), true).expect("open file");
    let r =
        qcow2kit::ops::check::repair(&file, qcow2kit::ops::check::RepairMode::All).expect("repair");
    assert!(
        r.fixed_anything(),
        "the stale directory and tables are leaks"
    );
    drop(file);
    // (qemu-io would drop the stale extension; qcow2kit keeps what it does not use.)
    let o = open_rw(&dir.join("k.qcow2"));
    let q = o.qcow2.clone().expect("qcow2");
    assert!(q.bitmaps().is_empty());
    q.write_at(&vec![7; (4 * M) as usize], 0).expect("fill");
    q.flush().expect("flush");
    q.add_bitmap("new", 65536, true).expect("add");
    q.write_at(&[8; 512], 0).expect("write");
    drop(q);
    drop(o);
    assert_check_clean(dir, "k.qcow2", "after adding a bitmap");
    let mut want = vec![7u8; (4 * M) as usize];
    want[..512].fill(8);
    qemu_img(&["convert", "-O", "raw", "k.qcow2", "k.raw"], dir);
    assert!(
        std::fs::read(dir.join("k.raw")).expect("raw") == want,
        "data changed"
    );
    assert_eq!(read_bits(dir, "k.qcow2", "new").extents(), vec![(0, 65536)]);
}

#[test]
fn a_grown_refcount_table_survives_the_store() {
    // 512-byte clusters with 64-bit refcounts: the refcount table outgrows its cluster after
    // a few MiB of writes, and the header rewrite of the store must name the new table.
    let d = scratch();
    let dir = d.path();
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            "k.qcow2",
            "16M",
        ],
        dir,
    );
    qemu_img(&["bitmap", "--add", "k.qcow2", "b"], dir);
    let mut live = Live::open(&dir.join("k.qcow2"));
    live.apply(&w(0, 12 * M), 0);
    live.close();
    drop(live);
    assert_check_clean(dir, "k.qcow2", "after the store");
    assert_eq!(read_bits(dir, "k.qcow2", "b").extents(), vec![(0, 12 * M)]);
}
