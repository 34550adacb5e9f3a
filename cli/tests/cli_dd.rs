//! `qcow2kit dd`, judged by qemu-img dd 10.x side by side.
//!
//! Every case runs twice on identical inputs: qemu-img in one directory (`q/`), qcow2kit
//! (called as `qemu-img` through argv[0], so that its messages carry that name) in another
//! (`k/`). The exit status, standard output and standard error must be the same, and so must
//! the files the runs leave: raw outputs byte for byte, qcow2 outputs by content and virtual
//! size (`qemu-img compare`, `qemu-img info`), and clean (`qemu-img check`).
//!
//! A missing qemu-img fails the tests; it never skips them.

use qcow2kit_testsupport::{exec_as, tool};
use std::path::Path;
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// The inputs: a 3 MiB qcow2 image with data at 0 (64 KiB of 0x07) and 1 MiB (100 KiB of
/// 0x09), an overlay on it with 4 KiB of 0x0a at 32 KiB, and a raw file of 1000 bytes that
/// are not all alike.
fn inputs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create case directory");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "3M"],
        dir,
    );
    let w = ["-c", "write -q -P 7 0 64k", "-c", "write -q -P 9 1M 100k"];
    let mut args = w.to_vec();
    args.push("a.qcow2");
    tool("qemu-io", &args, dir);
    let top = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    tool("qemu-img", &top, dir);
    tool(
        "qemu-io",
        &["-c", "write -q -P 10 32k 4k", "top.qcow2"],
        dir,
    );
    let raw: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("r.raw"), raw).expect("write raw input");
}

/// What a run printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn res(out: &std::process::Output) -> Res {
    Res {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qemu-img dd ARGS` and `qcow2kit dd ARGS` on fresh copies of [`inputs`]; asserts they
/// print, end and leave files the same. Returns qcow2kit's result.
fn same(args: &[&str]) -> Res {
    let tmp = TempDir::new().expect("temporary directory");
    let (q, k) = (tmp.path().join("q"), tmp.path().join("k"));
    inputs(&q);
    inputs(&k);
    let mut a = vec!["dd"];
    a.extend_from_slice(args);
    let want = res(&exec_as("qemu-img", "qemu-img", &a, &q));
    let got = res(&exec_as(QCOW2KIT, "qemu-img", &a, &k));
    assert_eq!(got, want, "qemu-img dd {args:?}");
    let mut names: Vec<_> = std::fs::read_dir(&q)
        .expect("list case directory")
        .map(|e| e.expect("directory entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let (qf, kf) = (q.join(&name), k.join(&name));
        assert!(kf.exists(), "{name:?} missing after {args:?}");
        let head = std::fs::read(&qf).expect("read output");
        if head.starts_with(b"QFI\xfb") {
            let (qs, ks) = (qf.to_str().expect("utf-8"), kf.to_str().expect("utf-8"));
            let cmp = ["compare", "-q", "-f", "qcow2", "-F", "qcow2", qs, ks];
            let cmp = exec_as("qemu-img", "qemu-img", &cmp, tmp.path());
            assert_eq!(
                cmp.status.code(),
                Some(0),
                "{name:?} differs after {args:?}"
            );
            let size = |p: &str| {
                let o = exec_as("qemu-img", "qemu-img", &["info", "-U", p], tmp.path());
                let o = String::from_utf8_lossy(&o.stdout).into_owned();
                o.lines()
                    .find(|l| l.starts_with("virtual size:"))
                    .map(str::to_string)
            };
            assert_eq!(size(ks), size(qs), "{name:?}'s size after {args:?}");
            let check = exec_as("qemu-img", "qemu-img", &["check", "-q", ks], tmp.path());
            assert_eq!(
                check.status.code(),
                Some(0),
                "{name:?} unclean after {args:?}"
            );
        } else {
            let mine = std::fs::read(&kf).expect("read output");
            assert!(mine == head, "{name:?} differs after {args:?}");
        }
    }
    got
}

#[test]
fn copies_whole_images_and_parts() {
    let r = same(&["if=a.qcow2", "of=o.raw"]);
    assert_eq!(
        r,
        Res {
            code: Some(0),
            stdout: String::new(),
            stderr: String::new()
        }
    );
    same(&["-O", "qcow2", "if=a.qcow2", "of=o.qcow2"]);
    same(&["if=top.qcow2", "of=o.raw", "bs=4k", "skip=8", "count=2"]);
    same(&[
        "-f",
        "qcow2",
        "if=top.qcow2",
        "of=o.qcow2",
        "-O",
        "qcow2",
        "bs=64k",
    ]);
    same(&["if=a.qcow2", "of=o.raw", "bs=1000", "count=1"]);
    same(&[
        "-O",
        "qcow2",
        "if=a.qcow2",
        "of=o.qcow2",
        "bs=1000",
        "count=1",
    ]);
    same(&["if=r.raw", "of=o.raw", "bs=7", "skip=3", "count=010"]);
    same(&["-f", "raw", "if=r.raw", "of=o.raw", "bs=0x200", "skip=1"]);
    same(&["if=a.qcow2", "of=o.raw", "bs=1.5k", "skip=0x3"]);
    same(&["if=a.qcow2", "of=o.raw", "count=0"]);
    same(&["if=a.qcow2", "of=o.raw", "if=r.raw"]);
    same(&["if=a.qcow2", "of=o.raw", "count=9223372036854775807"]);
    same(&["if=a.qcow2", "of=o.raw", "bs=2147483647", "count=1"]);
    same(&["-U", "if=a.qcow2", "of=o.raw", "bs=4k", "count=3", "skip=2"]);
    same(&[
        "--image-opts",
        "if=driver=qcow2,file.filename=a.qcow2",
        "of=o.raw",
        "bs=64k",
        "skip=16",
    ]);
    same(&["if=a.qcow2", "of=a2.qcow2", "-O", "qcow2", "count=2048"]);
}

#[test]
fn skip_past_the_end_leaves_an_empty_output() {
    let r = same(&["if=a.qcow2", "of=o.raw", "skip=100000"]);
    assert_eq!(r.code, Some(0));
    same(&[
        "if=a.qcow2",
        "of=o.qcow2",
        "-O",
        "qcow2",
        "skip=9223372036854775807",
    ]);
}

#[test]
fn bad_operands_and_options() {
    for args in [
        &["if=a.qcow2"][..],
        &["of=x"],
        &[],
        &["if=a.qcow2", "of=o.raw", "bs=0"],
        &["if=a.qcow2", "of=o.raw", "bs=3G"],
        &["if=a.qcow2", "of=o.raw", "bs=1x"],
        &["if=a.qcow2", "of=o.raw", "bs="],
        &["if=a.qcow2", "of=o.raw", "count=-1"],
        &["if=a.qcow2", "of=o.raw", "count=1k"],
        &["if=a.qcow2", "of=o.raw", "count=99999999999999999999"],
        &["if=a.qcow2", "of=o.raw", "skip=1x"],
        &["if=a.qcow2", "of=o.raw", "skip="],
        &["if=a.qcow2", "of=o.raw", "foo=1"],
        &["if=a.qcow2", "of=o.raw", "junk"],
        &["-x", "if=a.qcow2", "of=o.raw"],
        &["--foo"],
        &["-O"],
        &["-O", "bogus", "if=a.qcow2", "of=o.b"],
        &[
            "-f",
            "qcow2",
            "--image-opts",
            "if=driver=qcow2,file.filename=a.qcow2",
            "of=o.raw",
        ],
    ] {
        same(args);
    }
}

#[test]
fn errors_opening_and_creating() {
    same(&["if=nope", "of=o.raw"]);
    same(&["-f", "qcow2", "if=r.raw", "of=o.raw"]);
    same(&["if=a.qcow2", "of=nodir/o.raw"]);
    same(&[
        "--image-opts",
        "if=driver=qcow2,file.filename=nope",
        "of=o.raw",
    ]);
}
