//! `-o help` / `-o ?` and option-list parsing of `create`, `convert` and `amend`, side by side
//! with qemu-img 10: every case of iotest 082's help sections, and more (raw, the file protocol
//! merged in by a target name, devices, protocol prefixes, formats that cannot be created,
//! `,,` escapes, invalid lists, the checks qemu-img makes before it prints help).
//!
//! qcow2kit runs through a symlink named `qemu-img`, so that its messages carry that program
//! name as qemu-img's do. Each tool works in its own folder holding the same image (made by
//! qemu-img); standard output, standard error and exit status must be equal, and so must the
//! files each run leaves behind.

use std::path::{Path, PathBuf};
use std::process::Command;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// Exit status, standard output and standard error of a command.
#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(prog: &Path, args: &[&str], dir: &Path) -> Res {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (qemu-utils 10 must be installed)",
                prog.display()
            )
        });
    Res {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The two tools, each in its own folder with `t.qcow2` (128 MiB, made by qemu-img).
struct Pair {
    _tmp: tempfile::TempDir,
    qemu: (PathBuf, PathBuf),
    ours: (PathBuf, PathBuf),
}

fn pair() -> Pair {
    let tmp = tempfile::tempdir().expect("scratch directory");
    let (q, k, bin) = (
        tmp.path().join("q"),
        tmp.path().join("k"),
        tmp.path().join("bin"),
    );
    for d in [&q, &k, &bin] {
        std::fs::create_dir(d).expect("scratch directory");
    }
    let ours = bin.join("qemu-img");
    std::os::unix::fs::symlink(QCOW2KIT, &ours).expect("symlink named qemu-img");
    let qemu = PathBuf::from("qemu-img");
    for d in [&q, &k] {
        let made = run(
            &qemu,
            &["create", "-q", "-f", "qcow2", "t.qcow2", "128M"],
            d,
        );
        assert_eq!(made.code, Some(0), "{made:?}");
    }
    Pair {
        _tmp: tmp,
        qemu: (qemu, q),
        ours: (ours, k),
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("listing")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs every case with both tools; returns the differences, one paragraph each.
fn compare(cases: &[&[&str]]) -> Vec<String> {
    compare_in(&pair(), cases, true)
}

/// [`compare`] in `p`; `files` also compares the files each run leaves.
fn compare_in(p: &Pair, cases: &[&[&str]], files: bool) -> Vec<String> {
    let mut diffs = Vec::new();
    for args in cases {
        let theirs = run(&p.qemu.0, args, &p.qemu.1);
        let ours = run(&p.ours.0, args, &p.ours.1);
        if theirs != ours {
            diffs.push(format!(
                "{args:?}:\n  qemu-img: {theirs:?}\n  qcow2kit: {ours:?}"
            ));
        }
        let (a, b) = (listing(&p.qemu.1), listing(&p.ours.1));
        if files && a != b {
            diffs.push(format!(
                "{args:?}: files left: qemu-img {a:?}, qcow2kit {b:?}"
            ));
        }
    }
    diffs
}

/// A help case must show help with one tool at least, so that a case cannot pass by both
/// refusing the command the same way.
fn assert_shows_help(args: &[&str]) {
    let p = pair();
    let r = run(&p.qemu.0, args, &p.qemu.1);
    assert!(
        r.code == Some(0) && r.stdout.contains("options"),
        "{args:?} is not a help case for qemu-img: {r:?}"
    );
}

const CREATE_HELP: &[&[&str]] = &[
    &["create", "-f", "qcow2", "-o", "help", "t.qcow2", "128M"],
    &["create", "-f", "qcow2", "-o", "?", "t.qcow2", "128M"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,help",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,?",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "help,cluster_size=4k",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "?,cluster_size=4k",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "help",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "?",
        "t.qcow2",
        "128M",
    ],
    &["create", "-f", "qcow2", "-o", "help"],
    &["create", "-o", "help"],
    &["create", "-f", "raw", "-o", "?", "t.raw"],
    &["create", "-f", "qcow2", "-o", "help", "/dev/null"],
    &["create", "-f", "raw", "-o", "help", "/dev/null"],
    &["create", "-f", "raw", "-o", "help", "file:t.raw"],
    &["create", "-f", "raw", "-o", "help", "./a:b"],
    &["create", "-f", "qcow2", "-o", "help,,x"],
    &["create", "-f", "qcow2", "-o", "x,,help"],
    &[
        "create",
        "-f",
        "qcow2",
        "-q",
        "-o",
        "size=foo,help",
        "-b",
        "nowhere",
        "-u",
    ],
    &["create", "-o", "help", "-f", "qcow2", "a", "b", "c", "d"],
];

const CREATE_REFUSED: &[&[&str]] = &[
    // Looks like help, but is part of the backing file name.
    &[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-o",
        "backing_file=t.qcow2,,help",
        "-F",
        "qcow2",
        "o.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-o",
        "backing_file=t.qcow2,,?",
        "-F",
        "qcow2",
        "o.qcow2",
        "128M",
    ],
    // Escaped commas cannot be made by joining lists.
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2,",
        "-o",
        "help",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",help",
        "t.qcow2",
        "128M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",,",
        "-o",
        "help",
        "t.qcow2",
        "128M",
    ],
    &["create", "-f", "bochs", "-o", "help"],
    &["create", "-f", "foo", "-o", "help"],
    &["create", "-f", "bochs", "n.img", "1M"],
    &["create", "-f", "raw", "-o", "help", "http://h/x"],
    &["create", "-f", "raw", "-o", "help", "json:{}"],
    &["create", "-f", "raw", "-o", "help", "bogus:x"],
    &["create", "-f", "qcow2", "-o", "help=on", "n.qcow2", "1M"],
    &["create", "-f", "qcow2", "-o", "nohelp", "n.qcow2", "1M"],
    &["create", "-f", "raw", "-o", "nocow", "n.raw", "1M"],
    &[
        "create",
        "--object",
        "secret,id=s0",
        "-f",
        "qcow2",
        "-o",
        "help",
    ],
    &["create"],
    // Values as QemuOpts reads numbers and sizes (each case names a new file: qemu-img
    // deletes an image whose creation failed after the file was made; qcow2kit refuses
    // before it touches the file).
    &["create", "-f", "qcow2", "-o", "size=-1024", "v1.qcow2"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "size=18446744073709551616",
        "v2.qcow2",
    ],
    &["create", "-f", "qcow2", "-o", "size=1.5", "v3.qcow2"],
    &["create", "-f", "qcow2", "-o", "size=0x100000", "v4.qcow2"],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=0x10000",
        "v5.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=.5k",
        "v6.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1e3",
        "v7.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536 ",
        "v8.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=-0x10",
        "v9.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=0x10",
        "v10.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=-1",
        "v11.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=99999999999999999999",
        "v12.qcow2",
        "1M",
    ],
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "encrypt.key-secret=s0",
        "v13.qcow2",
        "1M",
    ],
    // 2^64 - 1 is QEMU's "no size".
    &[
        "create",
        "-f",
        "qcow2",
        "-o",
        "size=18446744073709551615",
        "v14.qcow2",
    ],
    &[
        "create",
        "-f",
        "raw",
        "-o",
        "size=18446744073709551615",
        "v15.raw",
    ],
];

const CONVERT_HELP: &[&[&str]] = &[
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "?",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,?",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "help,cluster_size=4k",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "?,cluster_size=4k",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "?",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &["convert", "-O", "qcow2", "-o", "help"],
    &["convert", "-o", "help"],
    &["convert", "-O", "qcow2", "-o", "help", "t.qcow2"],
    &["convert", "-O", "qcow2", "-c", "-o", "help", "a", "b", "c"],
    &["convert", "-o", "help,preallocation=x", "t.qcow2", "t.raw"],
    &[
        "convert",
        "-m",
        "0x10",
        "-S",
        "16M",
        "-l",
        "snapshot.name=a,,b",
        "-O",
        "qcow2",
        "-o",
        "help",
    ],
];

const CONVERT_REFUSED: &[&[&str]] = &[
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_file=t.qcow2,",
        "-o",
        "help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",,",
        "-o",
        "help",
        "t.qcow2",
        "t.qcow2.base",
    ],
    &["convert", "-O", "bochs", "-o", "help"],
    &["convert", "-O", "foo", "-o", "help"],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "help",
        "t.qcow2",
        "http://h/x",
    ],
    // The checks qemu-img makes before it looks for help.
    &["convert", "-C", "-S", "4k", "-O", "qcow2", "-o", "help"],
    &["convert", "-C", "-c", "-O", "qcow2", "-o", "help"],
    &["convert", "--skip-broken-bitmaps", "-C", "-c", "-o", "help"],
    &["convert", "--target-image-opts", "-o", "help"],
    &["convert", "-n", "-o", "help", "t.qcow2", "t.raw"],
    &[
        "convert",
        "-n",
        "-o",
        "cluster_size=4k",
        "-O",
        "qcow2",
        "t.qcow2",
        "t.qcow2",
    ],
    &["convert", "t.qcow2"],
    // Values checked in qemu-img's option loop, before help.
    &["convert", "-O", "qcow2", "-o", "help", "-S", "1x"],
    &["convert", "-O", "qcow2", "-o", "help", "-S", "513"],
    &["convert", "-O", "qcow2", "-o", "help", "-S", "17M"],
    &["convert", "-O", "qcow2", "-o", "help", "-S", "-1"],
    &["convert", "-O", "qcow2", "-o", "help", "-m", "17"],
    &["convert", "-O", "qcow2", "-o", "help", "-m", "16k"],
    &["convert", "-O", "qcow2", "-o", "help", "-m", "1", "-m", "0"],
    &["convert", "-o", "help", "-l", "snapshot.foo=x"],
    &["convert", "--object", "secret,id=s0", "-o", "help"],
    &["convert", "-C", "-S", "1x", "-o", "help"],
    &[
        "convert", "-O", "qcow2", "-o", "foo=bar", "t.qcow2", "n.qcow2",
    ],
    &["convert", "-O", "raw", "-o", "foo", "t.qcow2", "n.raw"],
];

const AMEND_HELP: &[&[&str]] = &[
    &["amend", "-f", "qcow2", "-o", "help", "t.qcow2"],
    &["amend", "-f", "qcow2", "-o", "?", "t.qcow2"],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,help",
        "t.qcow2",
    ],
    &["amend", "-f", "qcow2", "-o", "cluster_size=4k,?", "t.qcow2"],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "help,cluster_size=4k",
        "t.qcow2",
    ],
    &["amend", "-f", "qcow2", "-o", "?,cluster_size=4k", "t.qcow2"],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "help",
        "t.qcow2",
    ],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "?",
        "t.qcow2",
    ],
    &["amend", "-f", "qcow2", "-o", "help"],
    &["amend", "-f", "qcow2", "-o", "help", "x", "y"],
    &["amend", "-o", "help", "t.qcow2"],
];

const AMEND_REFUSED: &[&[&str]] = &[
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2,",
        "-o",
        "help",
        "t.qcow2",
    ],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",help",
        "t.qcow2",
    ],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "-o",
        ",,",
        "-o",
        "help",
        "t.qcow2",
    ],
    &["amend", "-o", "help"],
    &[
        "amend",
        "--object",
        "secret,id=s0",
        "-f",
        "qcow2",
        "-o",
        "help",
    ],
    &["amend", "-f", "bochs", "-o", "help"],
    &["amend", "-f", "raw", "-o", "help"],
    &["amend", "-f", "foo", "-o", "help"],
    // Looks like help, but is part of the backing file name.
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2,,help",
        "t.qcow2",
    ],
    &[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "backing_file=t.qcow2,,?",
        "t.qcow2",
    ],
];

fn check(help: &[&[&str]], refused: &[&[&str]]) {
    for args in help {
        assert_shows_help(args);
    }
    let all: Vec<&[&str]> = help.iter().chain(refused).copied().collect();
    let diffs = compare(&all);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn create_option_help_as_qemu_img() {
    check(CREATE_HELP, CREATE_REFUSED);
}

#[test]
fn convert_option_help_as_qemu_img() {
    check(CONVERT_HELP, CONVERT_REFUSED);
}

#[test]
fn amend_option_help_as_qemu_img() {
    check(AMEND_HELP, AMEND_REFUSED);
}

/// The target's backing file given with `-o` (the 082 cases whose name ends in `,,help`) or
/// `-B`: its format must be named and the file must open. qemu-img creates the target before
/// it finds the backing file missing; qcow2kit creates nothing (checked apart).
const CONVERT_BACKING: &[&[&str]] = &[
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_fmt=qcow2,backing_file=t.qcow2,,help",
        "t.qcow2",
        "n.qcow2",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_fmt=qcow2,backing_file=t.qcow2,,?",
        "t.qcow2",
        "n.qcow2",
    ],
    &[
        "convert", "-O", "qcow2", "-B", "nowhere", "-F", "qcow2", "t.qcow2", "n.qcow2",
    ],
    &[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "backing_file=t.qcow2",
        "t.qcow2",
        "n.qcow2",
    ],
    &[
        "convert", "-O", "qcow2", "-B", "t.qcow2", "t.qcow2", "n.qcow2",
    ],
    &[
        "convert", "-O", "qcow2", "-B", "t.qcow2", "-F", "foo", "t.qcow2", "n.qcow2",
    ],
    &[
        "convert",
        "-C",
        "--salvage",
        "-O",
        "qcow2",
        "t.qcow2",
        "n.qcow2",
    ],
];

#[test]
fn convert_target_backing_checked_as_qemu_img() {
    let p = pair();
    let diffs = compare_in(&p, CONVERT_BACKING, false);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(
        !p.ours.1.join("n.qcow2").exists(),
        "qcow2kit made a target it refused"
    );
    // A backing file that opens, with its format named: converted by both.
    let ok: &[&str] = &[
        "convert", "-O", "qcow2", "-B", "t.qcow2", "-F", "qcow2", "t.qcow2", "n.qcow2",
    ];
    let diffs = compare_in(&p, &[ok], true);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// A size within 511 bytes of 2^64 cannot be rounded up to a sector: refused, never a panic.
/// (qemu-img reads it as a negative size and makes an image of a nonsensical size: qcow2kit
/// differs on purpose.)
#[test]
fn create_size_next_to_2_64_is_refused() {
    let p = pair();
    for (fmt, msg) in [
        (
            "qcow2",
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ),
        ("raw", "The image size is too large for file format 'raw'"),
    ] {
        let args = [
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            "size=18446744073709551614",
            "n.img",
        ];
        let r = run(&p.ours.0, &args, &p.ours.1);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (Some(1), format!("qemu-img: n.img: {msg}\n").as_str()),
            "{args:?}"
        );
        assert!(!p.ours.1.join("n.img").exists(), "{args:?} made a file");
    }
}

/// getopt_long's handling of options, as qemu-img's commands get it from glibc: unambiguous
/// abbreviations of long options accepted, ambiguous and unknown ones refused in getopt's words
/// with qemu-img's hint, and the operand checks' messages; stdout, stderr and exit status.
#[test]
fn options_are_parsed_as_getopt_long_parses_them() {
    let diffs = compare(&[
        &["info", "--out=json", "t.qcow2"],
        &["info", "--out", "json", "t.qcow2"],
        &["info", "--f", "t.qcow2"],
        &["info", "--force", "t.qcow2"],
        &["info", "--xyz", "t.qcow2"],
        &["map", "--out=json", "t.qcow2"],
        &["map", "--xyz", "t.qcow2"],
        &["check", "--out", "json", "t.qcow2"],
        &["check", "--xyz", "t.qcow2"],
        &["check"],
        &["check", "a", "b"],
        &["compare", "--xyz", "t.qcow2", "t.qcow2"],
        &["convert", "--xyz", "t.qcow2", "u.qcow2"],
        &["convert", "--target-is", "-n", "t.qcow2", "t.qcow2"],
        &["resize", "--xyz", "t.qcow2", "1M"],
        &["resize"],
        &["resize", "t.qcow2"],
        &["resize", "a", "b", "c"],
    ]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
