//! `qcow2kit bitmap` side by side with `qemu-img bitmap` (qemu 10.x).
//!
//! Every case builds the same image twice with qemu-img (in `q/` and `k/`) and runs the same
//! steps in both: `bitmap` command lines through qemu-img in `q/` and through qcow2kit in `k/`,
//! and writes through qemu-io in `q/` and `qcow2kit io` in `k/`. After each step:
//! - the same exit code, standard output and standard error (once `qcow2kit` reads as
//!   `qemu-img` and QEMU's generated node names `#blockNNN` are set aside);
//! - the same bitmap listing in `qemu-img info`, and `qemu-img check` of ours clean;
//! - the same bits in every bitmap (read by the library from both images).
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::Format;
use qcow2kit_testsupport::exec;
use std::path::Path;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// The text with `qcow2kit` read as `qemu-img` and `#blockNNN` node names as `NODE`.
fn norm(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b).replace("qcow2kit", "qemu-img");
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i]);
        out.push_str("NODE");
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn bitmap_listing(dir: &Path) -> String {
    listing(dir, "qemu-img")
}

fn listing(dir: &Path, prog: &str) -> String {
    let o = exec(prog, &["info", "-f", "qcow2", "a.qcow2"], dir);
    assert!(o.status.success(), "qemu-img info: {o:?}");
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    match (s.find("bitmaps:"), s.find("refcount bits")) {
        (Some(a), Some(b)) => s[a..b].to_string(),
        _ => String::new(),
    }
}

/// Each bitmap's name and dirty extents (or why they cannot be read).
type Bits = Vec<(String, Result<Vec<(u64, u64)>, String>)>;

fn bits(dir: &Path) -> Bits {
    let o = open(
        &dir.join("a.qcow2"),
        Format::Qcow2,
        &OpenOptions::qemu_compatible(),
    )
    .expect("open read-only");
    let q = o.qcow2.clone().expect("qcow2");
    q.bitmaps()
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                q.bitmap_dirty_extents(&b.name).map_err(|e| e.to_string()),
            )
        })
        .collect()
}

/// One step of a case.
enum Step<'a> {
    /// `bitmap` with these arguments (the image is `a.qcow2`).
    Bitmap(&'a [&'a str]),
    /// qemu-io / `qcow2kit io` commands on `a.qcow2`.
    Io(&'a [&'a str]),
    /// A qemu-io session that dies without closing (bitmaps left in use), in both.
    Crash(&'a str),
}

fn case(create: &[&str], steps: &[Step<'_>]) {
    let root = tempfile::Builder::new()
        .prefix("qcow2kit-cli-bitmap-")
        .tempdir()
        .expect("temporary directory");
    let (q, k) = (root.path().join("q"), root.path().join("k"));
    for d in [&q, &k] {
        std::fs::create_dir(d).expect("mkdir");
        let o = exec(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"],
            d,
        );
        assert!(o.status.success(), "create: {o:?}");
        let o = exec("qemu-img", &["bitmap", "--add", "s.qcow2", "src"], d);
        assert!(o.status.success(), "bitmap: {o:?}");
        let o = exec("qemu-io", &["-c", "write 5M 64k", "s.qcow2"], d);
        assert!(o.status.success(), "qemu-io: {o:?}");
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        a.extend(create);
        let o = exec("qemu-img", &a, d);
        assert!(o.status.success(), "create: {o:?}");
    }
    for (i, step) in steps.iter().enumerate() {
        let what = format!("step {i} of case {create:?}");
        match step {
            Step::Bitmap(args) => {
                let mut full = vec!["bitmap"];
                full.extend(*args);
                let qo = exec("qemu-img", &full, &q);
                let ko = exec(QCOW2KIT, &full, &k);
                let what = format!("{what}: bitmap {}", args.join(" "));
                assert_eq!(
                    ko.status.code(),
                    qo.status.code(),
                    "{what}: exit status\n{ko:?}"
                );
                assert_eq!(norm(&ko.stdout), norm(&qo.stdout), "{what}: stdout");
                assert_eq!(norm(&ko.stderr), norm(&qo.stderr), "{what}: stderr");
            }
            Step::Io(cmds) => {
                let mut args = Vec::new();
                for c in *cmds {
                    args.extend(["-c", c]);
                }
                args.push("a.qcow2");
                let qo = exec("qemu-io", &args, &q);
                let mut kargs = vec!["io"];
                kargs.extend(&args);
                let ko = exec(QCOW2KIT, &kargs, &k);
                assert!(
                    qo.status.success() && ko.status.success(),
                    "{what}: io {qo:?} {ko:?}"
                );
            }
            Step::Crash(cmd) => {
                for d in [&q, &k] {
                    let _ = exec("qemu-io", &["-c", cmd, "-c", "abort", "a.qcow2"], d);
                }
            }
        }
        assert_eq!(
            bitmap_listing(&k),
            bitmap_listing(&q),
            "{what}: qemu-img info"
        );
        let check = exec("qemu-img", &["check", "a.qcow2"], &k);
        assert!(
            check.status.success(),
            "{what}: qemu-img check of ours: {check:?}"
        );
        assert_eq!(bits(&k), bits(&q), "{what}: bits");
    }
}

const IMG: &[&str] = &["a.qcow2", "64M"];

#[test]
fn actions_match_qemu_img() {
    use Step::*;
    case(
        IMG,
        &[
            Bitmap(&["--add", "a.qcow2", "a"]),
            Io(&["write 0 64k", "write 1M 512"]),
            Bitmap(&["--add", "-g", "512", "--disable", "a.qcow2", "b"]),
            Io(&["write 2M 4k"]),
            Bitmap(&["--enable", "a.qcow2", "b"]),
            Io(&["write -z 3M 512", "discard 4M 64k"]),
            Bitmap(&["--merge", "a", "a.qcow2", "b"]),
            Bitmap(&["--clear", "a.qcow2", "a"]),
            Bitmap(&["--merge", "src", "-b", "s.qcow2", "a.qcow2", "a"]),
            Bitmap(&[
                "--merge", "src", "-b", "s.qcow2", "-F", "qcow2", "a.qcow2", "b",
            ]),
            Bitmap(&["--add", "--remove", "a.qcow2", "c"]),
            Bitmap(&["--add", "--merge", "a", "a.qcow2", "d"]),
            Bitmap(&["--disable", "a.qcow2", "d"]),
            Bitmap(&["--remove", "a.qcow2", "a"]),
            Bitmap(&[
                "--remove",
                "--image-opts",
                "driver=qcow2,file.driver=file,file.filename=a.qcow2",
                "d",
            ]),
            Bitmap(&["-g", "0x200", "--add", "a.qcow2", "hex"]),
            Bitmap(&["--add", "-g", "2G", "a.qcow2", "huge"]),
            Bitmap(&["--add", "-g", "4294967808", "a.qcow2", "wrapped"]),
            Bitmap(&["--add", "-g", "0", "a.qcow2", "dflt"]),
        ],
    );
}

#[test]
fn errors_match_qemu_img() {
    use Step::*;
    let long = "n".repeat(1024);
    case(
        IMG,
        &[
            Bitmap(&["--add", "a.qcow2", "x"]),
            Bitmap(&["a.qcow2", "x"]),
            Bitmap(&["--add", "a.qcow2"]),
            Bitmap(&["--add", "a.qcow2", "x", "y"]),
            Bitmap(&["-g", "64k", "a.qcow2", "x"]),
            Bitmap(&["--remove", "-g", "4k", "a.qcow2", "x"]),
            Bitmap(&["--add", "-g", "100", "a.qcow2", "y"]),
            Bitmap(&["--add", "-g", "4G", "a.qcow2", "y"]),
            Bitmap(&["--add", "-g", "abc", "a.qcow2", "y"]),
            Bitmap(&["--add", "-g", "-1", "a.qcow2", "y"]),
            Bitmap(&["--add", "-g", "8x", "a.qcow2", "y"]),
            Bitmap(&["--add", "a.qcow2", ""]),
            Bitmap(&["--add", "a.qcow2", "x"]),
            Bitmap(&["--add", "a.qcow2", &long]),
            Bitmap(&["--remove", "a.qcow2", "nope"]),
            Bitmap(&["--clear", "a.qcow2", "nope"]),
            Bitmap(&["--enable", "a.qcow2", "nope"]),
            Bitmap(&["--disable", "--add", "a.qcow2", "nn"]),
            Bitmap(&["--merge", "nope", "a.qcow2", "x"]),
            Bitmap(&[
                "--merge", "src", "-b", "s.qcow2", "-F", "raw", "a.qcow2", "x",
            ]),
            Bitmap(&["-b", "s.qcow2", "--add", "a.qcow2", "z"]),
            Bitmap(&["-F", "qcow2", "--add", "a.qcow2", "z"]),
            Bitmap(&["--add", "nonexist.qcow2", "r"]),
            Bitmap(&["--remove", "a.qcow2", "x", "-q"]),
            Bitmap(&["--bogus", "a.qcow2", "x"]),
            Bitmap(&["--help"]),
            // The first action's change is kept when a later one fails.
            Bitmap(&["--add", "--clear", "--enable", "--add", "a.qcow2", "kept"]),
        ],
    );
}

#[test]
fn inconsistent_bitmaps_match_qemu_img() {
    use Step::*;
    case(
        IMG,
        &[
            Bitmap(&["--add", "a.qcow2", "bad"]),
            Bitmap(&["--add", "--disable", "a.qcow2", "off"]),
            Crash("write 0 4k"),
            Io(&["write 1M 4k"]),
            Bitmap(&["--enable", "a.qcow2", "bad"]),
            Bitmap(&["--clear", "a.qcow2", "off"]),
            Bitmap(&["--merge", "bad", "a.qcow2", "off"]),
            Bitmap(&["--add", "a.qcow2", "bad"]),
            Bitmap(&["--add", "a.qcow2", "fresh"]),
            Io(&["write 2M 4k"]),
            Bitmap(&["--remove", "a.qcow2", "bad"]),
            Bitmap(&["--remove", "a.qcow2", "off"]),
        ],
    );
}

#[test]
fn merge_from_an_overlay_into_its_backing_file() {
    use Step::*;
    case(
        &["-b", "s.qcow2", "-F", "qcow2", "a.qcow2", "64M"],
        &[
            Bitmap(&["--add", "a.qcow2", "top"]),
            Io(&["write 1M 64k"]),
            Bitmap(&[
                "--add", "--merge", "top", "-b", "a.qcow2", "-F", "qcow2", "-f", "qcow2",
                "s.qcow2", "b3",
            ]),
            Bitmap(&["--merge", "src", "-b", "s.qcow2", "a.qcow2", "top"]),
        ],
    );
}

#[test]
fn v2_and_sizes_match_qemu_img() {
    use Step::*;
    case(
        &["-o", "compat=0.10", "a.qcow2", "64M"],
        &[Bitmap(&["--add", "a.qcow2", "x"])],
    );
    case(
        &["a.qcow2", "4T"],
        &[
            Bitmap(&["--add", "-g", "512", "a.qcow2", "x"]),
            Bitmap(&["--add", "-g", "64k", "a.qcow2", "x"]),
        ],
    );
    case(
        &["a.qcow2", "32M"],
        &[
            Bitmap(&["--add", "a.qcow2", "x"]),
            Bitmap(&["--merge", "src", "-b", "s.qcow2", "a.qcow2", "x"]),
        ],
    );
    case(
        &["-o", "cluster_size=512", "a.qcow2", "64M"],
        &[
            Bitmap(&["--add", "a.qcow2", "x"]),
            Io(&["write 0 1M", "write 63M 4k"]),
            Bitmap(&["--add", "-g", "512", "a.qcow2", "y"]),
            Io(&["write 32M 512"]),
        ],
    );
}

/// `convert --bitmaps` of `src.qcow2` (made by `setup` in both folders) by both tools.
fn convert_case(setup: &[&[&str]], args: &[&str]) {
    let root = tempfile::Builder::new()
        .prefix("qcow2kit-cli-bitmap-convert-")
        .tempdir()
        .expect("temporary directory");
    let (q, k) = (root.path().join("q"), root.path().join("k"));
    for d in [&q, &k] {
        std::fs::create_dir(d).expect("mkdir");
        for cmd in setup {
            let _ = exec(cmd[0], &cmd[1..], d);
        }
    }
    let mut full = vec!["convert"];
    full.extend(args);
    let qo = exec("qemu-img", &full, &q);
    let ko = exec(QCOW2KIT, &full, &k);
    let what = format!("convert {} after {setup:?}", args.join(" "));
    assert_eq!(
        ko.status.code(),
        qo.status.code(),
        "{what}: exit status\n{ko:?}"
    );
    assert_eq!(norm(&ko.stdout), norm(&qo.stdout), "{what}: stdout");
    assert_eq!(norm(&ko.stderr), norm(&qo.stderr), "{what}: stderr");
    let out = args.last().expect("target");
    assert_eq!(
        q.join(out).exists(),
        k.join(out).exists(),
        "{what}: target created"
    );
    if out.ends_with(".qcow2") && q.join(out).exists() {
        for d in [&q, &k] {
            std::fs::copy(d.join(out), d.join("a.qcow2")).expect("copy");
        }
        assert_eq!(
            bitmap_listing(&k),
            bitmap_listing(&q),
            "{what}: qemu-img info"
        );
        let check = exec("qemu-img", &["check", "a.qcow2"], &k);
        assert!(
            check.status.success(),
            "{what}: qemu-img check of ours: {check:?}"
        );
        assert_eq!(bits(&k), bits(&q), "{what}: bits");
    }
}

#[test]
fn convert_bitmaps_matches_qemu_img() {
    let source: &[&[&str]] = &[
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "src.qcow2",
            "16M",
        ],
        &["qemu-img", "bitmap", "--add", "src.qcow2", "good"],
        &[
            "qemu-img",
            "bitmap",
            "--add",
            "-g",
            "512",
            "--disable",
            "src.qcow2",
            "off",
        ],
        &[
            "qemu-io",
            "-c",
            "write 0 4k",
            "-c",
            "write 9M 1k",
            "src.qcow2",
        ],
        &["qemu-img", "bitmap", "--enable", "src.qcow2", "off"],
        &["qemu-io", "-c", "write 1M 512", "src.qcow2"],
        &["qemu-img", "bitmap", "--add", "src.qcow2", "third"],
    ];
    convert_case(
        source,
        &["--bitmaps", "-O", "qcow2", "src.qcow2", "out.qcow2"],
    );
    convert_case(source, &["-O", "qcow2", "src.qcow2", "out.qcow2"]);
    convert_case(source, &["--bitmaps", "-O", "raw", "src.qcow2", "out.raw"]);
    convert_case(
        source,
        &[
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "out.qcow2",
        ],
    );
    convert_case(
        source,
        &[
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "src.qcow2",
            "out.qcow2",
        ],
    );
    let mut existing = source.to_vec();
    existing.push(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "out.qcow2",
        "16M",
    ]);
    convert_case(
        &existing,
        &["--bitmaps", "-n", "-O", "qcow2", "src.qcow2", "out.qcow2"],
    );
    existing.push(&["qemu-img", "bitmap", "--add", "out.qcow2", "good"]);
    convert_case(
        &existing,
        &["--bitmaps", "-n", "-O", "qcow2", "src.qcow2", "out.qcow2"],
    );
    let mut broken = source.to_vec();
    broken.push(&["qemu-io", "-c", "abort", "src.qcow2"]);
    broken.push(&["qemu-img", "bitmap", "--add", "src.qcow2", "fresh"]);
    convert_case(
        &broken,
        &["--bitmaps", "-O", "qcow2", "src.qcow2", "out.qcow2"],
    );
    convert_case(
        &broken,
        &[
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "out.qcow2",
        ],
    );
}
