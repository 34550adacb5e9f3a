//! The library's `ops::amend` against `qemu-img amend` on copies of the same image: for every
//! option pair (from → to), `qemu-img info --output json` of both the same (file sizes aside),
//! `qemu-img check` of ours clean, the contents identical by `qemu-img compare`, and the files
//! byte for byte the same where QEMU's layout is the one expected.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit::engine::{Qcow2Image, Qcow2Options};
use qcow2kit::io::FileStorage;
use qcow2kit::ops::amend::{amend, AmendOptions, Compat};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn run(prog: &str, args: &[&str], dir: &Path) -> std::process::Output {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{prog}` ({e}); these tests need qemu-img 10.x"));
    assert!(
        out.status.success(),
        "`{prog} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn info(dir: &Path, name: &str) -> Value {
    let out = run("qemu-img", &["info", "--output", "json", name], dir);
    let mut v: Value = serde_json::from_slice(&out.stdout).expect("info json");
    v.as_object_mut().expect("object").remove("children");
    for k in ["actual-size", "filename"] {
        v.as_object_mut().expect("object").remove(k);
    }
    v
}

/// Builds `a.qcow2` with `create` options and data, amends a copy with qemu-img (`-o qemu`)
/// and another with the library (`ours`), and compares them.
fn pair(create: &str, qemu: &str, ours: AmendOptions) {
    let dir = tempfile::Builder::new()
        .prefix("qcow2kit-amend-ops-")
        .tempdir()
        .expect("temporary directory");
    let d = dir.path();
    // The backing file some cases name (raw, reads as zeros).
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", "q.qcow2.base", "64M"],
        d,
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", "64M",
        ],
        d,
    );
    let v3 = !create.contains("compat=0.10");
    let mut io = vec![
        "-c",
        "write -P 7 0 1M",
        "-c",
        "write -P 9 2M 64k",
        "-c",
        "write -z 2M 64k",
    ];
    if v3 {
        io.extend(["-c", "write -z 1M 1M", "-c", "write -z -u 3M 128k"]);
    }
    io.push("q.qcow2");
    run("qemu-io", &io, d);
    std::fs::copy(d.join("q.qcow2"), d.join("k.qcow2")).expect("copy");
    run("qemu-img", &["amend", "-o", qemu, "q.qcow2"], d);

    let storage = FileStorage::open(d.join("k.qcow2"), true).expect("open our copy");
    let opts = Qcow2Options {
        ..Qcow2Options::default()
    };
    let img = Qcow2Image::open_writable(Arc::new(storage), &opts).expect("open our copy");
    amend(&img, &ours, None).unwrap_or_else(|e| panic!("amend {qemu} of {create}: {e}"));
    img.close().expect("close");
    drop(img);

    let what = format!("{create} → {qemu}");
    assert_eq!(
        info(d, "k.qcow2"),
        info(d, "q.qcow2"),
        "{what}: qemu-img info"
    );
    run("qemu-img", &["check", "k.qcow2"], d);
    run("qemu-img", &["compare", "-q", "q.qcow2", "k.qcow2"], d);
    let (a, b) = (
        std::fs::read(d.join("q.qcow2")).expect("read"),
        std::fs::read(d.join("k.qcow2")).expect("read"),
    );
    assert!(a == b, "{what}: the files differ");
}

#[test]
fn every_option_pair_matches_qemu_img() {
    let v2 = |o: AmendOptions| AmendOptions {
        compat: Some(Compat::V2),
        ..o
    };
    let v3 = |o: AmendOptions| AmendOptions {
        compat: Some(Compat::V3),
        ..o
    };
    let lazy = |on: bool| AmendOptions {
        lazy_refcounts: Some(on),
        ..AmendOptions::default()
    };
    for cs in ["512", "4k", "64k", "2M"] {
        let c2 = format!("compat=0.10,cluster_size={cs}");
        let c3 = format!("compat=1.1,cluster_size={cs}");
        let l3 = format!("compat=1.1,lazy_refcounts=on,cluster_size={cs}");
        pair(&c2, "compat=1.1", v3(AmendOptions::default()));
        pair(&c2, "compat=1.1,lazy_refcounts=on", v3(lazy(true)));
        pair(&c3, "compat=0.10", v2(AmendOptions::default()));
        pair(&l3, "compat=0.10", v2(AmendOptions::default()));
        pair(&c3, "lazy_refcounts=on", lazy(true));
        pair(&l3, "lazy_refcounts=off", lazy(false));
        pair(&c3, "compat=1.1", v3(AmendOptions::default()));
        pair(&c2, "compat=0.10", v2(AmendOptions::default()));
    }
    pair(
        "compat=1.1,backing_file=q.qcow2.base,backing_fmt=raw",
        "compat=0.10",
        v2(AmendOptions::default()),
    );
}

#[test]
fn refcount_widths_match_qemu_img() {
    // An image with a snapshot (shared clusters, refcount 2) and a compressed cluster, amended
    // to every width by qemu-img and by the library: the same refusals (with QEMU's words), the
    // same `qemu-img info`, clean checks, the same content of the image and of its snapshot.
    for bits in [1u64, 2, 4, 8, 32, 64] {
        let dir = tempfile::Builder::new()
            .prefix("qcow2kit-amend-width-")
            .tempdir()
            .expect("temporary directory");
        let d = dir.path();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "q.qcow2",
                "8M",
            ],
            d,
        );
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 1M",
                "-c",
                "write -c -P 2 2M 64k",
                "-c",
                "write -z 3M 64k",
                "q.qcow2",
            ],
            d,
        );
        run("qemu-img", &["snapshot", "-c", "s", "q.qcow2"], d);
        run("qemu-io", &["-c", "write -P 3 512k 1M", "q.qcow2"], d);
        std::fs::copy(d.join("q.qcow2"), d.join("k.qcow2")).expect("copy");
        let o = format!("refcount_bits={bits}");
        let q = Command::new("qemu-img")
            .args(["amend", "-o", &o, "q.qcow2"])
            .current_dir(d)
            .output()
            .expect("qemu-img must be installed");
        let storage = FileStorage::open(d.join("k.qcow2"), true).expect("open our copy");
        let opts = Qcow2Options {
            ..Qcow2Options::default()
        };
        let img = Qcow2Image::open_writable(Arc::new(storage), &opts).expect("open our copy");
        let ours = amend(
            &img,
            &AmendOptions {
                refcount_bits: Some(bits),
                ..AmendOptions::default()
            },
            None,
        );
        img.close().expect("close");
        drop(img);
        match &ours {
            Ok(()) => assert!(
                q.status.success(),
                "{bits} bits: qemu-img refused, we did not"
            ),
            Err(e) => {
                let theirs = String::from_utf8_lossy(&q.stderr);
                assert!(!q.status.success(), "{bits} bits: we refused: {e}");
                assert_eq!(
                    theirs.trim_end().trim_start_matches("qemu-img: "),
                    e.to_string().trim_start_matches("invalid argument: "),
                    "{bits} bits"
                );
            }
        }
        assert_eq!(info(d, "k.qcow2"), info(d, "q.qcow2"), "{bits} bits: info");
        run("qemu-img", &["check", "k.qcow2"], d);
        run("qemu-img", &["compare", "-q", "q.qcow2", "k.qcow2"], d);
        for name in ["q", "k"] {
            let (src, dst) = (format!("{name}.qcow2"), format!("{name}.raw"));
            run(
                "qemu-img",
                &["convert", "-l", "s", "-O", "raw", &src, &dst],
                d,
            );
        }
        assert!(
            std::fs::read(d.join("q.raw")).expect("read")
                == std::fs::read(d.join("k.raw")).expect("read"),
            "{bits} bits: the snapshot differs"
        );
    }
}

/// Every L2 entry of the active image and of every snapshot of the version 2 image `path`:
/// none may carry the zero flag (bit 0), which version 2 readers do not know.
fn zero_flagged_entries(path: &Path) -> usize {
    let b = std::fs::read(path).expect("read image");
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let cs = 1usize << be32(20);
    let mut l1s = vec![(be64(40) as usize, be32(36) as usize)];
    let mut at = be64(64) as usize;
    for _ in 0..be32(60) {
        l1s.push((be64(at) as usize, be32(at + 8) as usize));
        let (id_len, name_len) = (
            u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize,
            u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize,
        );
        let extra = be32(at + 36) as usize;
        at = (at + 40 + extra + id_len + name_len).next_multiple_of(8);
    }
    let mut n = 0;
    for (l1, size) in l1s {
        for i in 0..size {
            let l2 = (be64(l1 + i * 8) & 0x00ff_ffff_ffff_fe00) as usize;
            if l2 != 0 {
                n += (0..cs / 8).filter(|j| be64(l2 + j * 8) & 1 != 0).count();
            }
        }
    }
    n
}

/// A downgrade of an image with internal snapshots: qemu-img's header and snapshot list, a
/// clean check, no zero flag left in any table, and the active image and every snapshot
/// reading what they read before, with and without a backing file whose data a zero cluster
/// hides; then back to version 3. (qemu-img 10 writes zeros over a host cluster a snapshot
/// still reads as data and leaves COPIED flags `check` reports: its image is not the judge of
/// the content.)
#[test]
fn downgrade_with_snapshots_keeps_every_snapshot() {
    for (create, backed) in [
        ("compat=1.1,cluster_size=65536", false),
        ("compat=1.1,cluster_size=512", false),
        (
            "compat=1.1,cluster_size=65536,backing_file=base.raw,backing_fmt=raw",
            true,
        ),
    ] {
        let dir = tempfile::Builder::new()
            .prefix("qcow2kit-amend-snap-")
            .tempdir()
            .expect("temporary directory");
        let d = dir.path();
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", "base.raw", "4M"],
            d,
        );
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 5 0 4M", "base.raw"],
            d,
        );
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", create, "q.qcow2", "4M"],
            d,
        );
        let io = |cmds: &[&str]| {
            let mut a = vec!["-f", "qcow2"];
            for c in cmds {
                a.extend(["-c", c]);
            }
            a.push("q.qcow2");
            run("qemu-io", &a, d);
        };
        io(&[
            "write -P 1 0 256k",
            "write -z 64k 64k",
            "write -z -u 1M 128k",
        ]);
        run("qemu-img", &["snapshot", "-c", "s1", "q.qcow2"], d);
        io(&["write -z 0 64k", "write -P 3 2M 64k", "write -z 192k 64k"]);
        run("qemu-img", &["snapshot", "-c", "s2", "q.qcow2"], d);
        io(&[
            "write -z 2M 64k",
            "write -z -u 128k 64k",
            "write -P 4 3M 4k",
        ]);
        let read = |file: &str, snap: Option<&str>| {
            let mut args = vec!["convert", "-U", "-f", "qcow2", "-O", "raw"];
            let l = snap.map(|s| format!("snapshot.name={s}"));
            if let Some(l) = &l {
                args.extend(["-l", l.as_str()]);
            }
            args.extend([file, "out.raw"]);
            run("qemu-img", &args, d);
            std::fs::read(d.join("out.raw")).expect("read raw")
        };
        let views = [None, Some("s1"), Some("s2")];
        let before: Vec<Vec<u8>> = views.iter().map(|s| read("q.qcow2", *s)).collect();
        std::fs::copy(d.join("q.qcow2"), d.join("k.qcow2")).expect("copy");
        run("qemu-img", &["amend", "-o", "compat=0.10", "q.qcow2"], d);

        let open = || {
            let storage = FileStorage::open(d.join("k.qcow2"), true).expect("open our copy");
            let opts = Qcow2Options {
                ..Qcow2Options::default()
            };
            Qcow2Image::open_writable(Arc::new(storage), &opts).expect("open our copy")
        };
        let img = open();
        let v2 = AmendOptions {
            compat: Some(Compat::V2),
            ..AmendOptions::default()
        };
        amend(&img, &v2, None).unwrap_or_else(|e| panic!("{create}: {e}"));
        img.close().expect("close");
        drop(img);
        assert_eq!(info(d, "k.qcow2"), info(d, "q.qcow2"), "{create}: info");
        run("qemu-img", &["check", "k.qcow2"], d);
        assert_eq!(zero_flagged_entries(&d.join("k.qcow2")), 0, "{create}");
        for (s, want) in views.iter().zip(&before) {
            assert!(read("k.qcow2", *s) == *want, "{create}: {s:?} differs");
        }
        assert!(backed == info(d, "k.qcow2").get("backing-filename").is_some());

        let img = open();
        let v3 = AmendOptions {
            compat: Some(Compat::V3),
            ..AmendOptions::default()
        };
        amend(&img, &v3, None).unwrap_or_else(|e| panic!("{create} back to v3: {e}"));
        img.close().expect("close");
        drop(img);
        run("qemu-img", &["check", "k.qcow2"], d);
        for (s, want) in views.iter().zip(&before) {
            assert!(
                read("k.qcow2", *s) == *want,
                "{create} (v3 again): {s:?} differs"
            );
        }
    }
}

/// An upgrade of a version 2 image whose snapshot table entries lack the version 3 extra data
/// (no extra data, and only the 8-byte VM state size) gives them QEMU's: the image's size as
/// their disk size and no instruction count, as `qemu-img amend -o compat=1.1` does.
#[test]
fn upgrade_completes_snapshot_extra_data_as_qemu_img() {
    let dir = tempfile::Builder::new()
        .prefix("qcow2kit-amend-upgrade-")
        .tempdir()
        .expect("temporary directory");
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "q.qcow2",
            "4M",
        ],
        d,
    );
    run("qemu-io", &["-c", "write -P 1 0 64k", "q.qcow2"], d);
    for s in ["a", "b"] {
        run("qemu-img", &["snapshot", "-c", s, "q.qcow2"], d);
    }
    // Rewrite the table in place: entry 1 without extra data, entry 2 with 8 bytes of it.
    let path = d.join("q.qcow2");
    let mut b = std::fs::read(&path).expect("read image");
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8"));
    let table = be64(&b, 64) as usize;
    let mut at = table;
    let mut out = Vec::new();
    for keep in [0usize, 8] {
        let id_len = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name_len = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = u32::from_be_bytes(b[at + 36..at + 40].try_into().expect("4")) as usize;
        assert_eq!(extra, 24, "qemu-img writes 24 bytes of extra data");
        let start = out.len();
        out.extend_from_slice(&b[at..at + 36]);
        out.extend_from_slice(&(keep as u32).to_be_bytes());
        out.extend_from_slice(&b[at + 40..at + 40 + keep]);
        out.extend_from_slice(&b[at + 64..at + 64 + id_len + name_len]);
        out.resize(start + (out.len() - start).next_multiple_of(8), 0);
        at = (at + 64 + id_len + name_len).next_multiple_of(8);
    }
    b[table..table + out.len()].copy_from_slice(&out);
    let end = at.min(b.len());
    b[table + out.len()..end].fill(0);
    std::fs::write(&path, &b).expect("write image");
    std::fs::copy(&path, d.join("k.qcow2")).expect("copy");
    run("qemu-img", &["amend", "-o", "compat=1.1", "q.qcow2"], d);
    let storage = FileStorage::open(d.join("k.qcow2"), true).expect("open our copy");
    let opts = Qcow2Options {
        ..Qcow2Options::default()
    };
    let img = Qcow2Image::open_writable(Arc::new(storage), &opts).expect("open our copy");
    let v3 = AmendOptions {
        compat: Some(Compat::V3),
        ..AmendOptions::default()
    };
    amend(&img, &v3, None).expect("upgrade");
    img.close().expect("close");
    drop(img);
    let (q, k) = (info(d, "q.qcow2"), info(d, "k.qcow2"));
    assert_eq!(k, q, "qemu-img info");
    assert_eq!(q["snapshots"][0]["icount"], Value::Null, "{q}");
    run("qemu-img", &["check", "k.qcow2"], d);
    run("qemu-img", &["compare", "-q", "q.qcow2", "k.qcow2"], d);
    // Each entry now carries 24 bytes of extra data with the image's size.
    let b = std::fs::read(d.join("k.qcow2")).expect("read image");
    let at = be64(&b, 64) as usize;
    assert_eq!(&b[at + 36..at + 40], &24u32.to_be_bytes());
    assert_eq!(be64(&b, at + 48), 4 << 20);
    assert_eq!(be64(&b, at + 56), u64::MAX);
}
