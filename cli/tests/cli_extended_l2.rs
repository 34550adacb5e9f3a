//! Extended L2 entries written through `qcow2kit io`, entry for entry against qemu-io: the same
//! commands, each in its own process as QEMU's iotest 271 runs them, on copies of one image
//! made by qemu-img; after every command the L2 table (host offsets and subcluster bitmaps)
//! must be byte-identical, and the guest data the same.
//!
//! Covered: zero writes (aligned, subcluster-aligned, unaligned; with and without `-u`) over
//! unallocated, allocated and compressed clusters, with and without a backing file; writes and
//! zero writes into clusters shared with a snapshot (the copy-on-write span); discards;
//! `rebase -c` (whole clusters compressed, in guest order); and `resize --preallocation` (guest
//! data and `qemu-img check`).
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::tool_output;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// One qemu-io command on `img`, through qemu-io (`q.qcow2`) or qcow2kit io (`k.qcow2`).
fn io(dir: &Path, img: &str, cmd: &str) {
    if img == "q.qcow2" {
        tool_output("qemu-io", &["-c", cmd, img], dir);
    } else {
        tool_output(QCOW2KIT, &["io", "-c", cmd, img], dir);
    }
}

fn u64_at(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(path)
        .expect("open image")
        .read_exact_at(&mut b, offset)
        .expect("read image");
    u64::from_be_bytes(b)
}

/// The first L2 table of the image, as bytes.
fn l2_table(path: &Path) -> Vec<u8> {
    let cluster_bits = u64_at(path, 16) >> 32;
    let l1 = u64_at(path, 40);
    let l2 = u64_at(path, l1) & 0x00ff_ffff_ffff_fe00;
    let mut t = vec![0u8; 1 << cluster_bits];
    if l2 != 0 {
        fs::File::open(path)
            .expect("open image")
            .read_exact_at(&mut t, l2)
            .expect("read L2 table");
    }
    t
}

/// Differences between two L2 tables, entry by entry, for the message.
fn differing_entries(q: &[u8], k: &[u8]) -> Vec<String> {
    q.chunks(16)
        .zip(k.chunks(16))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("#{i}: qemu {a:02x?} qcow2kit {b:02x?}"))
        .collect()
}

/// Runs `cmds` on both copies of the image in `dir`, comparing the L2 tables after each.
fn same_after_each(dir: &Path, what: &str, cmds: &[String]) {
    for cmd in cmds {
        for img in ["q.qcow2", "k.qcow2"] {
            io(dir, img, cmd);
        }
        let (q, k) = (
            l2_table(&dir.join("q.qcow2")),
            l2_table(&dir.join("k.qcow2")),
        );
        let diff = differing_entries(&q, &k);
        assert!(diff.is_empty(), "{what}: after '{cmd}': {diff:#?}");
    }
    let c = Command::new("qemu-img")
        .args(["compare", "q.qcow2", "k.qcow2"])
        .current_dir(dir)
        .output()
        .expect("qemu-img compare");
    assert!(c.status.success(), "{what}: guest data differs");
    tool_output("qemu-img", &["check", "k.qcow2"], dir);
}

/// `qemu-img create` of the image (with a raw backing file of 0xff when `backing`), copied to
/// both names.
fn fresh(dir: &Path, size: &str, backing: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"];
    if backing {
        tool_output(
            "qemu-img",
            &["create", "-q", "-f", "raw", "base", size],
            dir,
        );
        tool_output(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -q -P 0xff 0 {size}"),
                "base",
            ],
            dir,
        );
        args.extend(["-F", "raw", "-b", "base"]);
    }
    args.extend(["q.qcow2", size]);
    tool_output("qemu-img", &args, dir);
    fs::copy(dir.join("q.qcow2"), dir.join("k.qcow2")).expect("copy image");
}

/// iotest 271's zero-write cases: cluster `c`, subcluster `sc`, `off` KiB in, `len`.
fn at(c: u64, sc: u64, off: u64) -> String {
    format!("{}k", c * 64 + sc * 2 + off)
}

#[test]
fn zero_writes_match_qemu_io() {
    for backing in [false, true] {
        for unmap in ["", "-u "] {
            let t = tempfile::tempdir().expect("tempdir");
            let d = t.path();
            fresh(d, "2112k", backing);
            let mut cmds = vec![
                // Unallocated clusters: aligned, subcluster-aligned, unaligned.
                format!("write -q -z {unmap}{} 192k", at(0, 0, 0)),
                format!("write -q -z {unmap}{} 128k", at(3, 16, 0)),
                format!("write -q -z {unmap}{} 128k", at(6, 15, 1)),
                // Allocated clusters.
                format!("write -q -P 1 {} 576k", at(9, 0, 0)),
                format!("write -q -z {unmap}{} 192k", at(9, 0, 0)),
                format!("write -q -z {unmap}{} 128k", at(12, 16, 0)),
                format!("write -q -z {unmap}{} 128k", at(15, 15, 1)),
            ];
            // Compressed clusters, one per process (as iotest 271 writes them).
            for c in 18..=28 {
                cmds.push(format!("write -q -c -P {c} {} 64k", at(c, 0, 0)));
            }
            cmds.extend([
                format!("write -q -z {unmap}{} 192k", at(18, 0, 0)),
                format!("write -q -z {unmap}{} 128k", at(21, 16, 0)),
                format!("write -q -z {unmap}{} 129k", at(24, 15, 1)),
                format!("write -q -z {unmap}{} 128k", at(27, 15, 1)),
                // Partial subclusters at the end of the device and a discard.
                format!("write -q -z {unmap}{} 35k", at(32, 0, 0)),
                format!("discard -q {} 64k", at(9, 0, 0)),
            ]);
            same_after_each(d, &format!("backing={backing} {unmap}"), &cmds);
        }
    }
}

#[test]
fn copy_on_write_into_snapshot_shared_clusters_matches_qemu_io() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    fresh(d, "1M", false);
    let mut cmds = Vec::new();
    for c in 0..10u64 {
        cmds.push(format!("write -q -z {}k 2k", 64 * c + 14));
        cmds.push(format!("write -q -P {} {}k 2k", 0xd0 + c, 64 * c + 26));
        cmds.push(format!("write -q -P {} {}k 2k", 0xe0 + c, 64 * c + 36));
    }
    same_after_each(d, "setup", &cmds);
    // The snapshot is taken by qemu-img on both, so that the layouts stay identical.
    for img in ["q.qcow2", "k.qcow2"] {
        tool_output("qemu-img", &["snapshot", "-c", "snap1", img], d);
    }
    let cmds: Vec<String> = [
        "write -q -P 0xf0 30k 1k",
        "write -q -P 0xf1 84k 1k",
        "write -q -P 0xf2 168k 1k",
        "write -q -P 0xf3 218k 1k",
        "write -q -P 0xf4 270k 1k",
        "write -q -P 0xf5 321k 1k",
        "write -q -z 414k 3k",
        "write -q -z 474k 2k",
        "write -q -z 538k 1k",
        "write -q -z 588k 1k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    same_after_each(d, "after snapshot", &cmds);
}

#[test]
fn resize_with_preallocation_reads_as_qemu_img_leaves_it() {
    for backing in [false, true] {
        for mode in ["metadata", "falloc", "full"] {
            let t = tempfile::tempdir().expect("tempdir");
            let d = t.path();
            fresh(d, "503k", backing);
            if !backing {
                for img in ["q.qcow2", "k.qcow2"] {
                    io(d, img, "write -q -P 0xff 0 503k");
                }
            }
            let prealloc = format!("--preallocation={mode}");
            tool_output("qemu-img", &["resize", &prealloc, "q.qcow2", "1013k"], d);
            let o = tool_output(QCOW2KIT, &["resize", &prealloc, "k.qcow2", "1013k"], d);
            assert_eq!(String::from_utf8_lossy(&o.stdout), "Image resized.\n");
            for img in ["q.qcow2", "k.qcow2"] {
                for read in ["read -P 0xff 0 503k", "read -P 0 503k 510k"] {
                    let o = tool_output("qemu-io", &["-c", read, img], d);
                    assert!(
                        !String::from_utf8_lossy(&o.stdout).contains("verification failed"),
                        "{mode} backing={backing} {img}: '{read}' fails"
                    );
                }
            }
            tool_output("qemu-img", &["check", "k.qcow2"], d);
            let c = Command::new("qemu-img")
                .args(["compare", "q.qcow2", "k.qcow2"])
                .current_dir(d)
                .output()
                .expect("qemu-img compare");
            assert!(c.status.success(), "{mode} backing={backing}: data differs");
        }
    }
}

#[test]
fn compressed_rebase_compresses_whole_clusters_as_qemu_img() {
    let t = tempfile::tempdir().expect("tempdir");
    let (q, k) = (t.path().join("q"), t.path().join("k"));
    for d in [&q, &k] {
        fs::create_dir(d).expect("mkdir");
        let o = "cluster_size=1M,extended_l2=on";
        tool_output(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, "base", "3M"],
            d,
        );
        for (img, back) in [("mid", "base"), ("top", "mid")] {
            tool_output(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-o", o, "-b", back, "-F", "qcow2", img, "3M",
                ],
                d,
            );
        }
        tool_output("qemu-io", &["-c", "write -q -P 0x11 1M 1M", "base"], d);
        tool_output(
            "qemu-io",
            &[
                "-c",
                "write -q -P 0x22 992k 32k",
                "-c",
                "write -q -P 0x33 2048k 32k",
                "mid",
            ],
            d,
        );
    }
    tool_output(
        "qemu-img",
        &["rebase", "-c", "-b", "base", "-F", "qcow2", "top"],
        &q,
    );
    tool_output(
        QCOW2KIT,
        &["rebase", "-c", "-b", "base", "-F", "qcow2", "top"],
        &k,
    );
    let (lq, lk) = (l2_table(&q.join("top")), l2_table(&k.join("top")));
    let diff = differing_entries(&lq, &lk);
    assert!(diff.is_empty(), "rebase -c: {diff:#?}");
    let map = |d: &Path| tool_output("qemu-img", &["map", "--output=json", "top"], d).stdout;
    assert_eq!(map(&q), map(&k), "rebase -c: maps differ");
    tool_output("qemu-img", &["check", "top"], &k);
}
