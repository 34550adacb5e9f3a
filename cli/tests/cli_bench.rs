//! `qcow2kit bench` side by side with qemu-img bench 10.x: the output lines (the elapsed time
//! masked), the messages and exit statuses for good and bad options, what `-w` writes (the
//! image left as qemu-img bench and qemu-io leave it), refusals of writes to read-only opens,
//! and the image locks.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use std::path::Path;
use std::process::Command;

#[path = "../../tests/support/lock_helpers.rs"]
mod lock_helpers;
use lock_helpers::{make_images, Held};
use qcow2kit_testsupport::exec;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

fn sh(script: &str, dir: &Path) {
    let o = exec("sh", &["-ec", script], dir);
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Replaces the number in `Run completed in N seconds.` by `T`; panics on a malformed line.
fn mask_time(stdout: &str) -> String {
    stdout
        .lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) => {
                let n = rest
                    .strip_suffix(" seconds.")
                    .unwrap_or_else(|| panic!("malformed line {l:?}"));
                let (int, frac) = n.split_once('.').unwrap_or_else(|| panic!("{l:?}"));
                assert!(
                    !int.is_empty()
                        && int.bytes().all(|b| b.is_ascii_digit())
                        && frac.len() == 3
                        && frac.bytes().all(|b| b.is_ascii_digit()),
                    "malformed time in {l:?}"
                );
                "Run completed in T seconds.\n".to_string()
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// `bench ARGS` of `prog`: status, stdout (time masked), stderr, program names as qemu-img.
fn outcome(prog: &str, args: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    let o = exec(prog, &full, dir);
    let norm = |b: &[u8]| String::from_utf8_lossy(b).replace("qcow2kit", "qemu-img");
    (
        o.status.code(),
        mask_time(&norm(&o.stdout)),
        norm(&o.stderr),
    )
}

/// Both tools' `bench ARGS` in `dir`, asserted equal; returns qemu-img's.
fn same(args: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let want = outcome("qemu-img", args, dir);
    let got = outcome(QCOW2KIT, args, dir);
    assert_eq!(got, want, "bench {}", args.join(" "));
    want
}

#[test]
fn output_and_messages_match_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sh(
        "qemu-img create -q -f qcow2 a.qcow2 1M
         qemu-img create -q -f raw r.raw 1M
         qemu-img create -q -f raw z.raw 0",
        dir,
    );
    let cases: &[&[&str]] = &[
        &["-c", "2000", "a.qcow2"],
        &["-c", "0x10", "-d", "010", "a.qcow2"],
        &["-c", "+3", "-d", "1", "-s", "64k", "-S", "0", "a.qcow2"],
        &[
            "-c", "300", "-s", "1.5k", "-S", "512", "-o", "0x1000", "a.qcow2",
        ],
        &["-c", "3", "-o", "1020k", "a.qcow2"],
        &[
            "-c",
            "10",
            "-d",
            "2",
            "-w",
            "--flush-interval",
            "4",
            "a.qcow2",
        ],
        &[
            "-c",
            "10",
            "-d",
            "2",
            "-w",
            "--flush-interval=4",
            "--no-drain",
            "a.qcow2",
        ],
        &[
            "-c",
            "100",
            "-w",
            "--pattern",
            "0x41",
            "-t",
            "writethrough",
            "a.qcow2",
        ],
        &[
            "-c", "5", "-t", "unsafe", "-i", "threads", "-q", "-U", "a.qcow2",
        ],
        &["-c", "5", "-n", "-t", "none", "-f", "raw", "r.raw"],
        &["-c", "5", "-w", "r.raw"],
        &[
            "-c",
            "5",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
        ],
        // Requests that cross the end of the image fail mid-run.
        &["-o", "1k", "a.qcow2"],
        &["-c", "1", "-o", "1M", "a.qcow2"],
        &["-c", "2", "z.raw"],
        &["-c", "2", "-w", "-f", "raw", "z.raw"],
        // Bad values.
        &["-c", "x", "a.qcow2"],
        &["-c", "1k", "a.qcow2"],
        &["-c", "0", "a.qcow2"],
        &["-c", "-1", "a.qcow2"],
        &["-c", "2147483648", "a.qcow2"],
        &["-c", "99999999999999999999", "a.qcow2"],
        &["-d", "0", "a.qcow2"],
        &["-d", "x", "a.qcow2"],
        &["-s", "0", "a.qcow2"],
        &["-s", "2G", "a.qcow2"],
        &["-s", "1.5", "a.qcow2"],
        &["-S", "-1", "a.qcow2"],
        &["-S", "x", "a.qcow2"],
        &["-o", "-1", "a.qcow2"],
        &["-o", "8E", "a.qcow2"],
        &["-o", "x", "a.qcow2"],
        &["--pattern", "256", "a.qcow2"],
        &["--pattern", "1k", "a.qcow2"],
        &["--flush-interval", "x", "a.qcow2"],
        &["--flush-interval", "-1", "a.qcow2"],
        &["-t", "foo", "a.qcow2"],
        &["-i", "foo", "a.qcow2"],
        &["-c", "1", "-i", "native", "a.qcow2"],
        &["-c", "1", "-n", "a.qcow2"],
        &["-f", "foo", "a.qcow2"],
        &["-c", "1", "missing.qcow2"],
        &[
            "-f",
            "qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
        ],
        &["-x", "a.qcow2"],
        &["-c"],
        &[],
        &["a.qcow2", "r.raw"],
        // Option checks that need -w.
        &["-c", "10", "--flush-interval", "4", "a.qcow2"],
        &[
            "-c",
            "10",
            "-d",
            "8",
            "-w",
            "--flush-interval",
            "4",
            "a.qcow2",
        ],
    ];
    let mut failed = 0;
    for args in cases {
        if same(args, dir).0 != Some(0) {
            failed += 1;
        }
    }
    // The first 12 cases succeed; every other one fails.
    assert_eq!(failed, cases.len() - 12);
}

/// The offsets qemu-img bench 10.0 writes: OFFSET, then each next STEP further modulo SIZE.
fn offsets(count: u64, offset: u64, step: u64, size: u64) -> Vec<u64> {
    (0..count)
        .map(|i| {
            if i == 0 {
                offset
            } else {
                (offset + i * step) % size
            }
        })
        .collect()
}

/// `-w` with each option set leaves the image as qemu-img bench leaves a copy and as qemu-io
/// leaves one after writing the pattern at the same offsets: on a qcow2 image, on an overlay
/// over a backing file with data, and on a raw image.
#[test]
fn writes_leave_the_image_qemu_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (size, count, offset, step, len) = (1u64 << 20, 150u64, 64u64 << 10, 8u64 << 10, 4096u64);
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 1M
         qemu-io -c 'write -P 7 0 1M' base.qcow2 >/dev/null",
        dir,
    );
    let writes: String = offsets(count, offset, step, size)
        .iter()
        .map(|o| format!(" -c 'write -P 0x5a {o} {len}'"))
        .collect();
    let variants: &[(&str, &[&str])] = &[
        ("-f qcow2", &["-d", "16"]),
        ("-f qcow2 -b base.qcow2 -F qcow2", &["-d", "1"]),
        ("-f qcow2", &["-d", "4", "--flush-interval", "8"]),
        (
            "-f qcow2",
            &["-d", "4", "--flush-interval", "8", "--no-drain"],
        ),
        ("-f raw", &["-d", "16", "-f", "raw", "-t", "directsync"]),
    ];
    for (i, (create, opts)) in variants.iter().enumerate() {
        let fmt = if create.contains("raw") {
            "raw"
        } else {
            "qcow2"
        };
        let [ours, theirs, io] = ["ours", "theirs", "io"].map(|n| format!("{n}{i}.{fmt}"));
        sh(
            &format!(
                "for f in {ours} {theirs} {io}; do qemu-img create -q {create} $f 1M; done
                 qemu-io -f {fmt}{writes} {io} >/dev/null"
            ),
            dir,
        );
        let mut args = vec![
            "-w",
            "-c",
            "150",
            "-o",
            "64k",
            "-S",
            "8k",
            "-s",
            "4k",
            "--pattern",
            "0x5a",
        ];
        args.extend_from_slice(opts);
        for (prog, img) in [(QCOW2KIT, &ours), ("qemu-img", &theirs)] {
            let mut a = args.clone();
            a.push(img);
            let (code, _, err) = outcome(prog, &a, dir);
            assert_eq!((code, err.as_str()), (Some(0), ""), "{prog} bench {a:?}");
        }
        for other in [&theirs, &io] {
            let o = exec(
                "qemu-img",
                &["compare", "-f", fmt, "-F", fmt, &ours, other],
                dir,
            );
            assert!(
                o.status.success(),
                "{opts:?}: {ours} differs from {other}: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        if fmt == "qcow2" {
            let o = exec("qemu-img", &["check", &ours], dir);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        }
    }
}

/// A write test on an open qemu-img makes read-only is refused with its message, and the image
/// is left untouched.
#[test]
fn writes_to_read_only_opens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sh("qemu-img create -q -f qcow2 a.qcow2 1M", dir);
    let before = std::fs::read(dir.join("a.qcow2")).unwrap();
    for args in [
        &["-c", "5", "-w", "-U", "a.qcow2"][..],
        &[
            "-c",
            "5",
            "-w",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,read-only=on",
        ],
    ] {
        let (code, _, err) = same(args, dir);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.contains("Could not open"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(dir.join("a.qcow2")).unwrap(), before);
}

/// Starts `prog` (`qemu-io` or `qcow2kit io`) holding `img` open with `args`.
fn hold(qemu: bool, args: &[&str], dir: &Path) -> Held {
    let mut cmd = if qemu {
        Command::new("qemu-io")
    } else {
        let mut c = Command::new(QCOW2KIT);
        c.arg("io");
        c
    };
    cmd.args(args).current_dir(dir);
    Held::spawn(cmd)
}

/// While qemu-io or `qcow2kit io` holds the image (for writing, or read-only), each bench
/// answers as qemu-img bench answers.
#[test]
fn locks_exclude_as_qemu_img_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let cmds: &[&[&str]] = &[
        &["-c", "10", "top.qcow2"],
        &["-c", "10", "-U", "top.qcow2"],
        &["-c", "10", "-w", "top.qcow2"],
        &["-c", "10", "base.qcow2"],
        &["-c", "10", "-w", "base.qcow2"],
    ];
    for (held, refused) in [(&["top.qcow2"][..], 3), (&["-r", "top.qcow2"], 2)] {
        for qemu_holder in [true, false] {
            let _h = hold(qemu_holder, held, dir);
            let n = cmds.iter().filter(|c| same(c, dir).0 != Some(0)).count();
            assert_eq!(n, refused, "held {held:?} by qemu-io: {qemu_holder}");
        }
    }
}

/// `--mmap` (qcow2kit only) opens the image as a read test does: it answers as qemu-img bench
/// without it, locks included (a qemu-io writer refuses it, `-U` shares); writes are refused.
#[test]
fn mmap_reads_answer_and_lock_as_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let with_mmap = |args: &[&str]| {
        let want = outcome("qemu-img", args, dir);
        let mut ours = vec!["--mmap"];
        ours.extend_from_slice(args);
        let got = outcome(QCOW2KIT, &ours, dir);
        assert_eq!(got, want, "bench --mmap {args:?}");
        want.0
    };
    assert_eq!(
        with_mmap(&["-c", "100", "-s", "64k", "base.qcow2"]),
        Some(0)
    );
    {
        let _h = hold(true, &["base.qcow2"], dir);
        assert_eq!(with_mmap(&["-c", "10", "base.qcow2"]), Some(1));
        assert_eq!(with_mmap(&["-c", "10", "-U", "base.qcow2"]), Some(0));
    }
    let (code, _, err) = outcome(QCOW2KIT, &["--mmap", "-w", "base.qcow2"], dir);
    assert_eq!(code, Some(1));
    assert_eq!(err, "qemu-img: --mmap is only available in read tests\n");
}
