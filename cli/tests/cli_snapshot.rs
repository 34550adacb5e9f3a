//! `qcow2kit snapshot` side by side with `qemu-img snapshot` 10.x: the same exit status,
//! standard output and standard error (qcow2kit runs under the name `qemu-img`, through a
//! symbolic link, so that its messages carry the same program name), then the images judged
//! by qemu-img: `check` clean, the active images and every snapshot reading the same.
//!
//! Each case runs in two directories holding identical images, `q/` for qemu-img and `k/` for
//! qcow2kit. Snapshot dates differ between the two runs (they are taken at different
//! moments): tables of snapshots made by the tools themselves are compared with the date
//! column masked; tables of the same image are compared byte for byte.
//!
//! A missing qemu-img fails the tests; it never skips them.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

fn exec(prog: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` ({e}); these tests need qemu-img 10.x (Debian package \
                 qemu-utils) in PATH",
                prog.display()
            )
        })
}

/// Two directories with a `qemu-img` each: QEMU's, and qcow2kit under that name.
struct Pair {
    _tmp: TempDir,
    q: PathBuf,
    k: PathBuf,
    ours: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let tmp = tempfile::tempdir().expect("temp dir");
        let q = tmp.path().join("q");
        let k = tmp.path().join("k");
        let bin = tmp.path().join("bin");
        for d in [&q, &k, &bin] {
            fs::create_dir(d).expect("mkdir");
        }
        let ours = bin.join("qemu-img");
        symlink(QCOW2KIT, &ours).expect("symlink qcow2kit as qemu-img");
        Pair {
            _tmp: tmp,
            q,
            k,
            ours,
        }
    }

    /// Runs a qemu tool in both directories (building identical inputs); it must succeed.
    fn both_qemu(&self, prog: &str, args: &[&str]) {
        for d in [&self.q, &self.k] {
            let out = exec(Path::new(prog), args, d);
            assert!(
                out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
                "{prog} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// `snapshot ARGS` by qemu-img in `q/` and by qcow2kit in `k/`; the results must match.
    fn same(&self, args: &[&str], mask_dates: bool) -> Res {
        let mut full = vec!["snapshot"];
        full.extend_from_slice(args);
        let a = Res::of(exec(Path::new("qemu-img"), &full, &self.q), mask_dates);
        let b = Res::of(exec(&self.ours, &full, &self.k), mask_dates);
        assert_eq!(
            a, b,
            "qemu-img snapshot {args:?}: qemu-img (left) vs qcow2kit"
        );
        a
    }

    /// qemu-img judges both images: check clean, same active content and same snapshots.
    fn judge(&self, file: &str, snaps: &[&str]) {
        for d in [&self.q, &self.k] {
            let out = exec(Path::new("qemu-img"), &["check", "-f", "qcow2", file], d);
            assert_eq!(
                out.status.code(),
                Some(0),
                "qemu-img check {}: {}",
                d.join(file).display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let read = |d: &Path, snap: Option<&str>| {
            let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
            let l = snap.map(|s| format!("snapshot.name={s}"));
            if let Some(l) = &l {
                args.extend(["-l", l.as_str()]);
            }
            args.extend([file, "out.raw"]);
            let out = exec(Path::new("qemu-img"), &args, d);
            assert!(
                out.status.success(),
                "qemu-img {args:?} in {}: {}",
                d.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            fs::read(d.join("out.raw")).expect("read raw")
        };
        assert!(
            read(&self.q, None) == read(&self.k, None),
            "active images differ"
        );
        for s in snaps {
            assert!(
                read(&self.q, Some(s)) == read(&self.k, Some(s)),
                "snapshot {s} differs"
            );
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `YYYY-MM-DD HH:MM:SS` replaced by a fixed mark.
fn mask(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let is_date = |w: &[u8]| {
        w.len() == 19
            && w.iter().enumerate().all(|(j, c)| match j {
                4 | 7 => *c == b'-',
                10 => *c == b' ',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            })
    };
    while i < b.len() {
        if i + 19 <= b.len() && is_date(&b[i..i + 19]) {
            out.push_str("<date>");
            i += 19;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

impl Res {
    fn of(o: Output, mask_dates: bool) -> Res {
        let f = |v: &[u8]| {
            let s = String::from_utf8_lossy(v).into_owned();
            if mask_dates {
                mask(&s)
            } else {
                s
            }
        };
        Res {
            code: o.status.code(),
            stdout: f(&o.stdout),
            stderr: f(&o.stderr),
        }
    }
}

fn build(p: &Pair, opts: &str) {
    p.both_qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "4M"],
    );
    p.both_qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 200k",
            "-c",
            "write -P 2 1M 64k",
            "a.qcow2",
        ],
    );
}

#[test]
fn list_of_the_same_image_is_identical() {
    let p = Pair::new();
    build(&p, "cluster_size=65536");
    // Snapshots by qemu-img, then the same file in both directories.
    let long = "n".repeat(300);
    for name in ["first", "first", "with space", long.as_str()] {
        let out = exec(
            Path::new("qemu-img"),
            &["snapshot", "-c", name, "a.qcow2"],
            &p.q,
        );
        assert!(out.status.success());
    }
    fs::copy(p.q.join("a.qcow2"), p.k.join("a.qcow2")).expect("copy");
    for args in [
        &["-l", "a.qcow2"][..],
        &["a.qcow2"],
        &["-q", "-l", "a.qcow2"],
        &["-U", "-l", "a.qcow2"],
        &["-l", "-f", "qcow2", "a.qcow2"],
    ] {
        let r = p.same(args, false);
        assert_eq!(r.code, Some(0));
        assert!(r.stdout.starts_with("Snapshot list:\nID"), "{}", r.stdout);
    }
    // Dates are local time: under another zone too.
    let run_tz = |prog: &Path, dir: &Path| {
        Command::new(prog)
            .args(["snapshot", "-l", "a.qcow2"])
            .env("TZ", "America/New_York")
            .current_dir(dir)
            .output()
            .expect("run")
            .stdout
    };
    assert_eq!(
        run_tz(Path::new("qemu-img"), &p.q),
        run_tz(&p.ours, &p.k),
        "TZ=America/New_York"
    );
}

#[test]
fn no_snapshots_lists_nothing() {
    let p = Pair::new();
    build(&p, "cluster_size=65536");
    let r = p.same(&["-l", "a.qcow2"], false);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
}

fn actions(opts: &str) {
    let p = Pair::new();
    build(&p, opts);
    let steps: &[&[&str]] = &[
        &["-c", "s1", "a.qcow2"],
        &["-q", "-c", "s1", "a.qcow2"],
        &["-c", "", "a.qcow2"],
        &["-l", "a.qcow2"],
    ];
    for s in steps {
        assert_eq!(p.same(s, true).code, Some(0), "{s:?}");
    }
    p.judge("a.qcow2", &["s1"]);
    p.both_qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 3 100k 300k", "a.qcow2"],
    );
    // By id, then by name: the first s1 (id 1) is deleted, the second stays.
    for s in [
        &["-a", "1", "a.qcow2"][..],
        &["-d", "s1", "a.qcow2"],
        &["-l", "a.qcow2"],
        &["-a", "s1", "a.qcow2"],
        &["-c", "after", "a.qcow2"],
        &["-d", "", "a.qcow2"],
        &["-l", "a.qcow2"],
    ] {
        assert_eq!(p.same(s, true).code, Some(0), "{s:?}");
    }
    p.judge("a.qcow2", &["s1", "after"]);
    for s in [&["-d", "s1", "a.qcow2"][..], &["-d", "after", "a.qcow2"]] {
        assert_eq!(p.same(s, true).code, Some(0), "{s:?}");
    }
    p.judge("a.qcow2", &[]);
    assert_eq!(p.same(&["-l", "a.qcow2"], false).stdout, "");
}

#[test]
fn actions_match_qemu_img_64k() {
    actions("cluster_size=65536");
}

#[test]
fn actions_match_qemu_img_512_byte_clusters() {
    actions("cluster_size=512");
}

#[test]
fn actions_match_qemu_img_extended_l2() {
    actions("cluster_size=32768,extended_l2=on");
}

#[test]
fn errors_match_qemu_img() {
    let p = Pair::new();
    build(&p, "cluster_size=65536");
    p.both_qemu("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    p.both_qemu("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let cases: &[&[&str]] = &[
        &["-a", "nope", "a.qcow2"],
        &["-d", "nope", "a.qcow2"],
        // Delete finds names only.
        &["-d", "1", "a.qcow2"],
        &["-l", "-c", "x", "a.qcow2"],
        &["-l", "-l", "a.qcow2"],
        &["-c", "x", "-U", "a.qcow2"],
        &["-x", "a.qcow2"],
        &["-a"],
        &["-l"],
        &["-l", "a.qcow2", "b.qcow2"],
        &["-l", "missing.qcow2"],
        &["-f", "foo", "-l", "a.qcow2"],
        &["-f", "raw", "-c", "x", "r.raw"],
        &["-f", "raw", "-a", "x", "r.raw"],
        &["-f", "raw", "-d", "x", "r.raw"],
        &["-f", "raw", "-l", "r.raw"],
    ];
    for c in cases {
        p.same(c, false);
    }
    // Nothing was changed by the failures.
    p.judge("a.qcow2", &["s1"]);
    assert!(fs::read(p.q.join("r.raw")).expect("raw") == fs::read(p.k.join("r.raw")).expect("raw"));
}

/// The table of snapshots qcow2kit made reads the same through qemu-img and qcow2kit.
#[test]
fn our_snapshots_listed_alike_by_both_tools() {
    let p = Pair::new();
    build(&p, "cluster_size=4096");
    for name in ["a", "b"] {
        let out = exec(&p.ours, &["snapshot", "-c", name, "a.qcow2"], &p.k);
        assert!(out.status.success());
    }
    let ours = exec(&p.ours, &["snapshot", "-l", "a.qcow2"], &p.k);
    let theirs = exec(Path::new("qemu-img"), &["snapshot", "-l", "a.qcow2"], &p.k);
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    let text = String::from_utf8_lossy(&ours.stdout).into_owned();
    assert!(
        text.contains("\n1       a ") && text.contains("\n2       b "),
        "{text}"
    );
}

/// A snapshot that records no instruction count (icount -1, as `savevm` leaves it) shows
/// `--` in the table.
#[test]
fn unrecorded_icount_listed_as_qemu_img_does() {
    let p = Pair::new();
    build(&p, "cluster_size=65536");
    let out = exec(
        Path::new("qemu-img"),
        &["snapshot", "-c", "vm", "a.qcow2"],
        &p.q,
    );
    assert!(out.status.success());
    let path = p.q.join("a.qcow2");
    let mut bytes = fs::read(&path).expect("read image");
    let mut off = [0u8; 8];
    off.copy_from_slice(&bytes[64..72]);
    // The third field of the extra data (after vm_state_size_large and disk_size).
    let icount = u64::from_be_bytes(off) as usize + 40 + 16;
    bytes[icount..icount + 8].fill(0xff);
    fs::write(&path, &bytes).expect("write image");
    fs::copy(&path, p.k.join("a.qcow2")).expect("copy");
    let r = p.same(&["-l", "a.qcow2"], false);
    assert!(r.stdout.trim_end().ends_with("--"), "{}", r.stdout);
}

/// With 1-bit refcounts no cluster can be shared: qemu-img's error, and (unlike qemu-img,
/// which leaks a cluster) a clean image.
#[test]
fn refcount_overflow_refused_like_qemu_img() {
    let p = Pair::new();
    build(&p, "cluster_size=65536,refcount_bits=1");
    let r = p.same(&["-c", "foo", "a.qcow2"], false);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.ends_with("Invalid argument\n"), "{}", r.stderr);
    let out = exec(Path::new("qemu-img"), &["check", "a.qcow2"], &p.k);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(p.same(&["-l", "a.qcow2"], false).stdout, "");
}

/// Appends a snapshot table of `count` entries (ids `1..=count`, no L1 table) to the image at
/// `path` and points the header at it.
fn add_table(path: &Path, count: u32) {
    let mut bytes = fs::read(path).expect("read image");
    let at = bytes.len().next_multiple_of(65536);
    bytes.resize(at, 0);
    for i in 1..=count {
        let id = i.to_string();
        let start = bytes.len();
        let mut e = vec![0u8; 40 + 24];
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[36..40].copy_from_slice(&24u32.to_be_bytes());
        e[40 + 8..40 + 16].copy_from_slice(&(4u64 << 20).to_be_bytes());
        bytes.extend_from_slice(&e);
        bytes.extend_from_slice(id.as_bytes());
        let end = (bytes.len() - start).next_multiple_of(8) + start;
        bytes.resize(end, 0);
    }
    bytes[60..64].copy_from_slice(&count.to_be_bytes());
    bytes[64..72].copy_from_slice(&(at as u64).to_be_bytes());
    fs::write(path, &bytes).expect("write image");
}

/// 65 536 snapshots is QEMU's limit: one more is refused with qemu-img's error, and the image
/// is left as it was.
#[test]
fn snapshot_count_limit_like_qemu_img() {
    let p = Pair::new();
    build(&p, "cluster_size=65536");
    add_table(&p.q.join("a.qcow2"), 65536);
    fs::copy(p.q.join("a.qcow2"), p.k.join("a.qcow2")).expect("copy");
    let before = fs::read(p.k.join("a.qcow2")).expect("read");
    let r = p.same(&["-c", "one-too-many", "a.qcow2"], false);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.ends_with("File too large\n"), "{}", r.stderr);
    assert!(fs::read(p.k.join("a.qcow2")).expect("read") == before);
}

/// qemu-img 10 refuses to apply a snapshot to an image with any persistent bitmap (enabled,
/// disabled or left in use), before it looks for the snapshot, and changes nothing.
#[test]
fn apply_with_bitmaps_refused_like_qemu_img() {
    let kinds: &[(&str, &[&str])] = &[
        ("enabled", &["--add"]),
        ("disabled", &["--add", "--disable"]),
        ("in-use", &["--add"]),
    ];
    for (kind, add) in kinds {
        let p = Pair::new();
        build(&p, "cluster_size=65536");
        p.both_qemu("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
        let mut args = vec!["bitmap"];
        args.extend_from_slice(add);
        args.extend(["a.qcow2", "b0"]);
        p.both_qemu("qemu-img", &args);
        p.both_qemu(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 5 0 64k", "a.qcow2"],
        );
        if *kind == "in-use" {
            // A writer that dies leaves the bitmap flagged in use.
            for d in [&p.q, &p.k] {
                let out = exec(
                    Path::new("qemu-io"),
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        "write 64k 64k",
                        "-c",
                        "abort",
                        "a.qcow2",
                    ],
                    d,
                );
                assert!(!out.status.success(), "qemu-io abort");
            }
        }
        let before = fs::read(p.k.join("a.qcow2")).expect("read image");
        for name in ["s1", "nope"] {
            let r = p.same(&["-a", name, "a.qcow2"], false);
            assert_eq!(r.code, Some(1), "{kind}: {r:?}");
            assert!(
                r.stderr.ends_with("Device has active dirty bitmaps\n"),
                "{kind}: {}",
                r.stderr
            );
        }
        assert!(
            fs::read(p.k.join("a.qcow2")).expect("read image") == before,
            "{kind}: the refused apply changed the image"
        );
    }
}

/// The host layout of an image outside its snapshot table (whose dates differ): the header up
/// to the snapshot table offset, and every cluster but the snapshot table's.
fn layout_without_snapshot_table(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).expect("read image");
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let cs = 1usize << u32::from_be_bytes(bytes[20..24].try_into().expect("4"));
    let table = be64(&bytes, 64) as usize;
    if table != 0 {
        let end = (table + cs).min(bytes.len());
        bytes[table..end].fill(0);
    }
    bytes
}

#[test]
fn snapshots_are_laid_out_where_qemu_img_lays_them_out() {
    for opts in ["cluster_size=65536", "extended_l2=on", "cluster_size=512"] {
        let p = Pair::new();
        build(&p, opts);
        p.same(&["-c", "s1", "a.qcow2"], true);
        // The first write after the snapshot copies an L2 table and a data cluster: QEMU
        // takes the first free clusters, which a different layout would move.
        p.both_qemu(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 3 4k 4k", "a.qcow2"],
        );
        p.same(&["-c", "s2", "a.qcow2"], true);
        assert!(
            layout_without_snapshot_table(&p.q.join("a.qcow2"))
                == layout_without_snapshot_table(&p.k.join("a.qcow2")),
            "{opts}: host layout differs from qemu-img's"
        );
        p.judge("a.qcow2", &["s1", "s2"]);
    }
}
