//! qemu-io's `aio_read`, `aio_write`, `aio_flush`, `truncate`, `length`, `info`, `help`,
//! `sleep` and the write flags `-s`, `-u`, `-n`, judged by qemu-io 10.x side by side.
//!
//! Every case runs twice on identical inputs: qemu-io in one directory (`q/`), qcow2kit (called
//! as `qemu-io` through argv[0], so that its messages carry that name) in another (`k/`). Then
//! the exit status, standard output (the timing of the I/O reports blanked) and standard error
//! must be the same, and the images the runs leave must hold the same data (`qemu-img
//! compare`) and virtual size, and be clean (`qemu-img check`).
//!
//! Requests in flight together complete in an order neither tool promises: cases with more
//! than one compare their reports as sorted lines ([`Order::Any`]).
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// Runs `prog args…` in `dir` with argv[0] `name`, `input` on its standard input.
fn exec(prog: &str, name: &str, args: &[&str], dir: &Path, input: &str) -> std::process::Output {
    let mut child = Command::new(prog)
        .arg0(name)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}); these tests need qemu-img and qemu-io (Debian \
                 package qemu-utils, 10.x) in PATH"
            )
        });
    let mut stdin = child.stdin.take().expect("piped standard input");
    stdin
        .write_all(input.as_bytes())
        .expect("write standard input");
    drop(stdin);
    child.wait_with_output().expect("wait for the tool")
}

/// A qemu tool that must succeed (building images).
fn tool(prog: &str, args: &[&str], dir: &Path) {
    let out = exec(prog, prog, args, dir, "");
    assert!(
        out.status.success(),
        "`{prog} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The images every case starts with: a 4 MiB qcow2 image whose first 64 KiB are 0x05, a
/// version 2 image with 512-byte clusters, one with extended L2 entries, a chain (`top.qcow2`
/// over `base.qcow2`, whose first 4 KiB are 0x07), a 1 MiB raw file and a pattern file.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create case directory");
    let create = |args: &[&str]| {
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        a.extend_from_slice(args);
        tool("qemu-img", &a, dir);
    };
    create(&["a.qcow2", "4M"]);
    tool("qemu-io", &["-c", "write -q -P 5 0 64k", "a.qcow2"], dir);
    create(&["-o", "compat=0.10,cluster_size=512", "v2.qcow2", "1M"]);
    create(&["-o", "extended_l2=on", "x.qcow2", "3G"]);
    create(&["base.qcow2", "4M"]);
    tool("qemu-io", &["-c", "write -q -P 7 0 4k", "base.qcow2"], dir);
    create(&["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    std::fs::write(dir.join("r.raw"), vec![1u8; 1 << 20]).expect("write raw file");
    std::fs::write(dir.join("pat"), b"0123456789abcdefXYZ").expect("write pattern file");
}

/// How reports of requests in flight together are compared.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// Line by line.
    Exact,
    /// As sorted lines: the requests may complete in any order.
    Any,
}

/// What a run printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The timing of qemu-io's reports blanked (both its forms); lines sorted with [`Order::Any`].
fn normalised(out: &std::process::Output, order: Order) -> Res {
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            if let Some(i) = l.find(" ops; ") {
                return format!("{} ops; TIME", &l[..i]);
            }
            // `-C`: bytes,ops,time,bytes/sec,ops/sec
            let f: Vec<&str> = l.split(',').collect();
            if f.len() == 5 && f[..2].iter().all(|x| x.parse::<u64>().is_ok()) {
                return format!("{},{},TIME", f[0], f[1]);
            }
            l.to_string()
        })
        .collect();
    let mut err: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    if order == Order::Any {
        lines.sort();
        err.sort();
    }
    Res {
        code: out.status.code(),
        stdout: lines.join("\n"),
        stderr: err.join("\n"),
    }
}

/// Runs qemu-io and qcow2kit with `args` (and `input` on standard input) on fresh copies of
/// [`images`]; asserts they print and end the same and leave the same, clean images.
fn run_both(args: &[&str], input: &str, order: Order) -> Res {
    let tmp = TempDir::new().expect("temporary directory");
    let (q, k) = (tmp.path().join("q"), tmp.path().join("k"));
    images(&q);
    images(&k);
    let want = normalised(&exec("qemu-io", "qemu-io", args, &q, input), order);
    let mut kit_args = vec!["io"];
    kit_args.extend_from_slice(args);
    let got = normalised(&exec(QCOW2KIT, "qemu-io", &kit_args, &k, input), order);
    assert_eq!(got, want, "qemu-io {args:?} (input {input:?})");
    for img in [
        "a.qcow2",
        "v2.qcow2",
        "x.qcow2",
        "top.qcow2",
        "base.qcow2",
        "r.raw",
    ] {
        let (qi, ki) = (q.join(img), k.join(img));
        let (qi, ki) = (qi.to_str().expect("utf-8"), ki.to_str().expect("utf-8"));
        let fmt = if img.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        let cmp = ["compare", "-q", "-f", fmt, "-F", fmt, qi, ki];
        let cmp = exec("qemu-img", "qemu-img", &cmp, tmp.path(), "");
        assert_eq!(cmp.status.code(), Some(0), "{img} differs after {args:?}");
        assert_eq!(
            virtual_size(qi, fmt),
            virtual_size(ki, fmt),
            "{img}'s size differs after {args:?}"
        );
        if fmt == "qcow2" {
            let check = exec("qemu-img", "qemu-img", &["check", "-q", img], &k, "");
            assert_eq!(check.status.code(), Some(0), "{img} unclean after {args:?}");
        }
    }
    got
}

/// The virtual size of the image at `path`, as qemu-img info prints it.
fn virtual_size(path: &str, fmt: &str) -> String {
    let out = exec(
        "qemu-img",
        "qemu-img",
        &["info", "-U", "-f", fmt, path],
        Path::new("/"),
        "",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size for {path}"))
        .to_string()
}

/// [`run_both`] with `-c` commands on `file` (the image operand with its options, or nothing),
/// compared line by line.
fn same(cmds: &[&str], file: &str) -> Res {
    same_in(cmds, file, Order::Exact)
}

/// [`run_both`] with `-c` commands on `file`.
fn same_in(cmds: &[&str], file: &str, order: Order) -> Res {
    let mut args = Vec::new();
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.extend(file.split_whitespace());
    run_both(&args, "", order)
}

#[test]
fn aio_requests_are_reported_when_flushed() {
    let r = same(
        &["aio_write -P 9 0 4k", "aio_flush", "read -P 9 0 4k"],
        "a.qcow2",
    );
    assert!(r.stdout.starts_with("wrote 4096/4096 bytes at offset 0"));
    same(&["aio_read -P 5 0 4k", "aio_flush"], "a.qcow2");
    same(&["aio_read -v 0 64", "aio_flush"], "a.qcow2");
    same(&["aio_read -P 6 0 512", "aio_flush"], "a.qcow2");
    same(&["aio_read -q -P 6 0 512", "aio_flush"], "a.qcow2");
    same(
        &["aio_read -C 0 512", "aio_write -C -q 1M 4k", "aio_flush"],
        "a.qcow2",
    );
    same(
        &[
            "aio_write -P 3 64k 512 1k 4k",
            "aio_flush",
            "read -P 3 64k 5632",
        ],
        "a.qcow2",
    );
    same(
        &["aio_write -z 0 64k", "aio_flush", "read -P 0 0 64k"],
        "a.qcow2",
    );
    same(&["aio_write -z -u 0 64k", "aio_flush", "map"], "a.qcow2");
    same(&["aio_write -f 0 4k", "aio_flush"], "a.qcow2");
    same(&["aio_write -P 4 0 512", "aio_flush"], "top.qcow2");
}

#[test]
fn aio_requests_in_flight_together() {
    // Overlapping requests of the same pattern: the result does not depend on their order.
    let mut cmds = Vec::new();
    for i in 0..40 {
        cmds.push(format!("aio_write -P 8 {}k 64k", i * 48));
    }
    cmds.push("aio_flush".to_string());
    cmds.push("read -P 8 0 1936k".to_string());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let r = same_in(&cmds, "a.qcow2", Order::Any);
    assert_eq!(r.stdout.matches("wrote 65536/65536").count(), 40);
    same_in(
        &["aio_read -P 5 0 64k", "aio_read -P 0 1M 4k", "aio_flush"],
        "a.qcow2",
        Order::Any,
    );
}

#[test]
fn aio_requests_complete_at_close_exit_and_io() {
    same(&["aio_write -P 2 0 1M", "close"], "a.qcow2");
    same(&["aio_write -P 2 0 1M"], "a.qcow2");
    // (Synchronous I/O right after an `aio_write` is left out: in qemu-io, whether the write's
    // report comes before or after the read's depends on which finishes first.)
    same(
        &["aio_write -P 2 0 4k", "aio_flush", "read -P 2 0 4k"],
        "a.qcow2",
    );
    same(&["aio_write -P 2 0 4k", "quit"], "a.qcow2");
    // Interactive: commands read from standard input.
    let r = run_both(
        &["a.qcow2"],
        "aio_write -P 4 0 4k\naio_flush\nread -P 4 0 4k\n",
        Order::Exact,
    );
    assert!(r.stdout.contains("qemu-io> "));
}

#[test]
fn aio_errors() {
    same(&["aio_read 4M 512", "aio_flush"], "a.qcow2");
    same(&["aio_write 4M 512", "aio_flush"], "a.qcow2");
    same(&["aio_write -z 3M 2M", "aio_flush"], "a.qcow2");
    same(&["aio_read -x 0 1", "aio_write -x 0 1"], "a.qcow2");
    same(
        &["aio_read 0", "aio_write 0", "aio_write -z 0 1 2"],
        "a.qcow2",
    );
    same(&["aio_write -u 0 1k", "aio_write -r -z 0 512"], "a.qcow2");
    same(
        &["aio_read 1x 1", "aio_read 0 1x", "aio_write -z 0 1x"],
        "a.qcow2",
    );
    same(&["aio_read -P 300 0 1", "aio_write -P -1 0 1"], "a.qcow2");
    // Too large to be one request: refused before any buffer is made.
    same(
        &["aio_read 0 3G", "aio_write 0 2G 2G", "aio_read 0 -1"],
        "a.qcow2",
    );
    same(&["aio_read -i", "aio_write -i 0 1"], "a.qcow2");
    same(&["aio_write 0 512"], "-r a.qcow2");
    same(&["aio_flush"], "");
}

#[test]
fn truncate_and_length() {
    let r = same(&["truncate 8M", "length", "truncate 1M", "l"], "a.qcow2");
    assert_eq!(r.stdout, "8 MiB\n1 MiB");
    same(&["t 3G", "length", "read -P 0 2G 512"], "a.qcow2");
    same(&["truncate 1000", "truncate 1 2", "truncate 1x"], "a.qcow2");
    same(
        &["truncate -m bogus 1M", "truncate -x 1M", "truncate"],
        "a.qcow2",
    );
    same(&["truncate -m off 8M", "truncate -m full 1M"], "a.qcow2");
    same(&["truncate -m full 512k"], "v2.qcow2");
    same(&["truncate 2M", "length"], "-r a.qcow2");
    same(&["truncate 2M", "length", "read -P 1 0 1M"], "-f raw r.raw");
    same(&["truncate -m falloc 3M", "length"], "-f raw r.raw");
    same(
        &["truncate -m full 3M", "truncate -m metadata 4M"],
        "-f raw r.raw",
    );
    same(&["truncate -m full 512k"], "-f raw r.raw");
    same(
        &["truncate 8M", "read -P 7 0 4k", "read -P 0 4M 4k"],
        "top.qcow2",
    );
}

#[test]
fn info_of_each_kind_of_image() {
    let r = same(&["info"], "a.qcow2");
    assert!(r.stdout.contains("vm state offset: 512 MiB"));
    same(&["info"], "v2.qcow2");
    same(&["i"], "x.qcow2");
    same(&["info"], "top.qcow2");
    same(&["info"], "-f raw r.raw");
    same(&["info"], "--image-opts driver=file,filename=r.raw");
    same(&["info x"], "a.qcow2");
}

#[test]
fn help_lists_commands_as_qemu_io() {
    let r = same(&["help"], "");
    assert!(r.stdout.contains("aio_write [-Cfiqruz]"));
    for cmd in [
        "read",
        "write",
        "aio_read",
        "aio_write",
        "aio_flush",
        "open",
        "reopen",
        "readv",
        "writev",
        "discard",
        "sigraise",
        "sleep",
        "map",
        "truncate",
        "r",
        "?",
    ] {
        same(&[&format!("help {cmd}")], "");
    }
    same(&["help nope", "help a b"], "a.qcow2");
    same(&["? ?"], "a.qcow2");
}

#[test]
fn sleep_waits_and_checks_its_argument() {
    same(&["sleep 10", "sleep 0x5", "sleep 010"], "");
    same(&["sleep x", "sleep -1", "sleep", "sleep 1 2"], "");
    same_in(
        &["aio_write 0 4k", "sleep 50", "aio_flush"],
        "a.qcow2",
        Order::Exact,
    );
}

#[test]
fn write_flags() {
    same(&["write -s pat 0 100", "read -v 0 100"], "a.qcow2");
    same(&["write -s nope 0 100", "write -s pat -P 1 0 1"], "a.qcow2");
    same(&["write -z -u 0 64k", "map"], "a.qcow2");
    same(
        &["write -z -n 0 4k", "write -z -n -u 64k 64k", "map"],
        "a.qcow2",
    );
    same(&["write -z -n 0 512"], "v2.qcow2");
    same(
        &["write -z -n 1M 4k", "write -z -n 0 64k", "map"],
        "a.qcow2",
    );
    same(
        &["write -z -n 32k 64k", "write -z -n 0 2k", "map"],
        "x.qcow2",
    );
    same(&["write -z -n 0 512", "write -z -n 8k 512"], "top.qcow2");
    same(&["write -n 0 512", "write -u 0 512"], "a.qcow2");
    same(&["discard -q 0 64k", "read -P 0 0 64k"], "a.qcow2");
}

#[test]
fn command_line_modes_apply_to_aio_requests() {
    let w = [
        "-c",
        "aio_write -P 1 0 4k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 1 0 4k",
    ];
    for t in ["none", "writeback", "unsafe", "directsync", "writethrough"] {
        let mut args = vec!["-t", t];
        args.extend_from_slice(&w);
        args.push("a.qcow2");
        run_both(&args, "", Order::Exact);
    }
    for d in ["ignore", "unmap"] {
        let args = [
            "-d",
            d,
            "-c",
            "aio_write -z -u 0 64k",
            "-c",
            "aio_flush",
            "-c",
            "map",
            "a.qcow2",
        ];
        run_both(&args, "", Order::Exact);
    }
    let args = ["-n", "-i", "threads", "-c", "aio_write 0 4k", "a.qcow2"];
    run_both(&args, "", Order::Exact);
}
