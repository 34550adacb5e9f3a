//! qemu-io's `open`, `close`, `reopen`, `sigraise`, `--image-opts` and qemu-io started without
//! a FILE, judged by qemu-io 10.x side by side.
//!
//! Every case runs twice on identical inputs: qemu-io in one directory (`q/`), qcow2kit (called
//! as `qemu-io` through argv[0], so that its messages carry that name) in another (`k/`). Then
//! the exit status (or the signal that ended the process), standard output (the timing of the
//! I/O reports blanked) and standard error must be the same, and the images the runs leave
//! must hold the same data (`qemu-img compare`) and be clean (`qemu-img check`).
//!
//! Known differences, normalised here: QEMU names an anonymous node `#blockNNN` with a number
//! that changes from run to run (`reopen -o read-only=on`); both are read as `#blockN`. Left
//! out: `host_device`/`host_cdrom` on a character device (QEMU opens it; qcow2kit refuses
//! anything but regular files and block devices), `reopen -o l2-cache-size=1T` on a huge image
//! (QEMU fails to allocate the cache; qcow2kit bounds its cache and succeeds).
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::{exec_as, tool};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// The images every case starts with: an empty 64 MiB qcow2 image, a chain (`top.qcow2` over
/// `base.qcow2`, whose first 4 KiB are 0x07), a raw file, a qcow2 image with 256 KiB
/// clusters and a 32 PiB guest size, an image with an external data file (`dd.qcow2` on
/// `dd.data`, its first 64 KiB 0x03) and one that needs a data file but names none
/// (`nn.qcow2`, its data in `nn.data`).
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create case directory");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
        dir,
    );
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        dir,
    );
    tool("qemu-io", &["-c", "write -q -P 7 0 4k", "base.qcow2"], dir);
    let top = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    tool("qemu-img", &top, dir);
    let big = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=256k",
        "big.qcow2",
        "32P",
    ];
    tool("qemu-img", &big, dir);
    std::fs::write(dir.join("r.raw"), vec![0u8; 1 << 20]).expect("write raw file");
    std::fs::create_dir(dir.join("dirx")).expect("create a directory");
    let dd = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=dd.data",
        "dd.qcow2",
        "64M",
    ];
    tool("qemu-img", &dd, dir);
    tool("qemu-io", &["-c", "write -q -P 3 0 64k", "dd.qcow2"], dir);
    let nn = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=nn.data",
        "nn.qcow2",
        "64M",
    ];
    tool("qemu-img", &nn, dir);
    tool(
        "qemu-img",
        &["amend", "-q", "-o", "data_file=", "nn.qcow2"],
        dir,
    );
}

/// What a run printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The timing of qemu-io's reports and QEMU's anonymous node numbers blanked.
fn normalised(out: &std::process::Output) -> Res {
    let stdout = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; TIME", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = match stderr.find("'#block") {
        Some(i) => {
            let rest = &stderr[i + 7..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            format!("{}'#blockN{}", &stderr[..i], &rest[digits..])
        }
        None => stderr.into_owned(),
    };
    Res {
        code: out.status.code(),
        signal: out.status.signal(),
        stdout,
        stderr,
    }
}

/// Runs qemu-io and qcow2kit with `args` on fresh copies of [`images`]; asserts they print and
/// end the same and leave the same, clean images. Returns qcow2kit's result.
fn same(args: &[&str]) -> Res {
    let tmp = TempDir::new().expect("temporary directory");
    let (q, k) = (tmp.path().join("q"), tmp.path().join("k"));
    images(&q);
    images(&k);
    let want = normalised(&exec_as("qemu-io", "qemu-io", args, &q));
    let mut kit_args = vec!["io"];
    kit_args.extend_from_slice(args);
    let got = normalised(&exec_as(QCOW2KIT, "qemu-io", &kit_args, &k));
    assert_eq!(got, want, "qemu-io {args:?}");
    // QEMU finds `dd.qcow2`'s data file relative to its working directory: each image is
    // checked from its own directory, and the data file compared as raw.
    for img in ["a.qcow2", "top.qcow2", "base.qcow2", "dd.data"] {
        let (qi, ki) = (q.join(img), k.join(img));
        let (qi, ki) = (qi.to_str().expect("utf-8"), ki.to_str().expect("utf-8"));
        let fmt = if img.ends_with(".data") {
            "raw"
        } else {
            "qcow2"
        };
        let cmp = ["compare", "-q", "-f", fmt, "-F", fmt, qi, ki];
        let cmp = exec_as("qemu-img", "qemu-img", &cmp, tmp.path());
        assert_eq!(cmp.status.code(), Some(0), "{img} differs after {args:?}");
    }
    for img in ["a.qcow2", "top.qcow2", "base.qcow2", "dd.qcow2"] {
        let check = exec_as("qemu-img", "qemu-img", &["check", "-q", img], &k);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{img} is not clean after {args:?}"
        );
    }
    got
}

#[test]
fn commands_without_a_file() {
    same(&["-c", "read 0 512"]);
    let r = same(&[
        "-c",
        "length",
        "-c",
        "flush",
        "-c",
        "close",
        "-c",
        "reopen -r",
    ]);
    assert_eq!(r.stderr.matches("no file open, try 'help open'").count(), 4);
    same(&["-c", "write 0 1", "-c", "quit", "-c", "read 0 1"]);
    same(&["-c", "open", "-c", "open a b"]);
}

#[test]
fn open_and_close() {
    let r = same(&[
        "-c",
        "open a.qcow2",
        "-c",
        "write -P 3 0 64k",
        "-c",
        "open a.qcow2",
        "-c",
        "close",
        "-c",
        "read 0 512",
        "-c",
        "o -r a.qcow2",
        "-c",
        "read -P 3 0 64k",
        "-c",
        "c",
    ]);
    assert!(r.stderr.contains("file open already, try 'help close'"));
    same(&["-c", "close", "-c", "close", "a.qcow2"]);
    same(&["-c", "open top.qcow2", "-c", "read -P 7 0 4k"]);
    same(&[
        "-c",
        "open -o driver=qcow2,file.filename=a.qcow2",
        "-c",
        "length",
    ]);
    same(&["-c", "open -o file.filename=a.qcow2", "-c", "length"]);
    same(&["-c", "open -o driver=qcow2 a.qcow2", "-c", "write 0 1"]);
    same(&["-c", "open r.raw", "-c", "length"]);
    same(&["-f", "raw", "-c", "open a.qcow2", "-c", "length"]);
    same(&[
        "-c",
        "open -o driver=qcow2 -o driver=raw a.qcow2",
        "-c",
        "length",
    ]);
    same(&["-c", "open -r a.qcow2", "-c", "write 0 1", "-c", "read 0 1"]);
    same(&["-c", "open -rU a.qcow2", "-c", "write 0 1"]);
    same(&["-c", "open -r -o read-only=off a.qcow2", "-c", "write 0 1"]);
    same(&["-c", "open -o backing= top.qcow2", "-c", "read -P 0 0 4k"]);
    same(&["-c", "open -o file.locking=off a.qcow2", "-c", "length"]);
    same(&[
        "-c",
        "open -n -t writeback -d ignore a.qcow2",
        "-c",
        "write 0 64k",
        "-c",
        "discard 0 64k",
    ]);
    same(&[
        "-c",
        "open -o overlap-check=all,lazy-refcounts=on a.qcow2",
        "-c",
        "write 0 1",
    ]);
    same(&[
        "-c",
        "open -o l2-cache-size=1M,cache-clean-interval=0 a.qcow2",
        "-c",
        "write 0 1",
    ]);
}

#[test]
fn open_errors() {
    for cmd in [
        "open nope.qcow2",
        "open -o driver=qcow2",
        "open -o file.filename=nope",
        "open -o driver=qcow2,file.filename=nope",
        "open -o driver=nope a.qcow2",
        "open -o driver=qcow2 r.raw",
        "open -o foo=bar a.qcow2",
        "open -o foo=bar,driver=qcow2 a.qcow2",
        "open -o file.foo=1 a.qcow2",
        "open -o file.filename=a.qcow2 top.qcow2",
        "open -o file.locking=maybe a.qcow2",
        "open -o read-only=maybe a.qcow2",
        "open -o read-only=on a.qcow2",
        "open -o force-share=on a.qcow2",
        "open -U -o force-share=off -r a.qcow2",
        "open -U a.qcow2",
        "open -o discard=bogus a.qcow2",
        "open -o cache.direct=maybe a.qcow2",
        "open -o backing=null top.qcow2",
        "open -r -o driver=raw,lazy-refcounts=on,foo=1 a.qcow2",
        "open -o driver=qcow2,foo=1,lazy-refcounts=x a.qcow2",
        "open -o lazy-refcounts=on,overlap-check=blubb a.qcow2",
        "open -o ,,, a.qcow2",
        "open -o =x a.qcow2",
        "open -o id=x a.qcow2",
        "open -o nolazy-refcounts,x a.qcow2",
        "open -t bogus a.qcow2",
        "open -d bogus a.qcow2",
        "open -i bogus a.qcow2",
        "open -x a.qcow2",
    ] {
        same(&["-c", cmd, "-c", "read 0 1"]);
    }
}

#[test]
fn open_with_a_data_file_option() {
    // The cases of qemu-iotests 244.
    for img in ["dd.qcow2", "nn.qcow2", "a.qcow2"] {
        for o in [
            "",
            "-o data-file.filename=dd.data ",
            "-o data-file.filename=inexistent ",
        ] {
            same(&["-c", &format!("open {o}{img}"), "-c", "read -P 0 64k 64k"]);
        }
    }
    same(&[
        "-c",
        "open -o data-file.filename=nn.data nn.qcow2",
        "-c",
        "write -P 5 0 4k",
    ]);
    same(&[
        "-c",
        "open -o data-file.filename=dd.data,data-file.driver=file dd.qcow2",
        "-c",
        "read -P 3 0 64k",
        "-c",
        "reopen -o data-file.filename=x",
        "-c",
        "reopen -r",
        "-c",
        "reopen -w",
        "-c",
        "write -P 4 0 4k",
        "-c",
        "read -P 4 0 4k",
    ]);
    same(&["-c", "open -o data-file=x dd.qcow2"]);
    same(&[
        "-c",
        "open -o data-file.filename=dd.data r.raw",
        "-c",
        "length",
    ]);
    same(&["-c", "open -o data-file.filename=dd.data,driver=raw r.raw"]);
    same(&[
        "-c",
        "reopen -o backing.file.filename=x",
        "-c",
        "reopen -o backing.driver=raw",
        "top.qcow2",
    ]);
}

#[test]
fn protocol_drivers_as_test_226() {
    let after = [
        "-c",
        "length",
        "-c",
        "read -v 0 4",
        "-c",
        "reopen -r",
        "-c",
        "reopen -w",
        "-c",
        "reopen -o driver=file",
        "-c",
        "reopen -o driver=raw",
        "-c",
        "write -P 1 4k 1",
    ];
    for c in [
        "open -o driver=file,filename=a.qcow2",
        "open -o driver=file a.qcow2",
        "open -o driver=file,filename=a.qcow2,foo=1",
        "open -o driver=file,filename=a.qcow2,locking=off,file.filename=x",
        "open -o driver=file,filename=a.qcow2,lazy-refcounts=on",
        "open -o driver=file,filename=nope",
        "open -o driver=file",
        "open -r -o driver=file,filename=/dev/null,locking=off",
        "open -o driver=file,filename=/dev/null,locking=off",
    ] {
        let mut args = vec!["-c", c];
        args.extend_from_slice(&after);
        same(&args);
    }
    for proto in ["file", "host_device", "host_cdrom"] {
        same(&["-c", &format!("open -r -o driver={proto},filename=dirx")]);
        same(&["-c", &format!("open -o driver={proto},filename=dirx")]);
    }
    same(&["-c", "open -r -o driver=host_device,filename=a.qcow2"]);
}

#[test]
fn image_opts() {
    same(&[
        "--image-opts",
        "driver=qcow2,file.filename=a.qcow2",
        "-c",
        "length",
    ]);
    same(&[
        "--image-opts",
        "file.filename=top.qcow2",
        "-c",
        "read -P 7 0 4k",
    ]);
    same(&["--image-opts", "a.qcow2", "-c", "length"]);
    same(&["--image-opts", "-f", "qcow2", "a.qcow2", "-c", "length"]);
    same(&["--image-opts", "-c", "open -o driver=qcow2 a.qcow2"]);
    same(&[
        "--image-opts",
        "-c",
        "open driver=qcow2,file.filename=a.qcow2",
        "-c",
        "length",
    ]);
}

#[test]
fn reopen_switches_mode_and_locks() {
    let r = same(&[
        "-c",
        "reopen -r",
        "-c",
        "write -P 1 0 64k",
        "-c",
        "reopen -w",
        "-c",
        "write -P 2 0 64k",
        "-c",
        "reopen -r -c none",
        "-c",
        "read -P 2 0 64k",
        "-c",
        "reopen -w",
        "-c",
        "write -P 4 64k 64k",
        "a.qcow2",
    ]);
    assert_eq!(r.stderr, "qemu-io: Block node is read-only\n");
    same(&["-r", "-c", "reopen -w", "-c", "write 0 1", "a.qcow2"]);
    same(&[
        "-c",
        "reopen -o read-only=on",
        "-c",
        "write 0 1",
        "-c",
        "reopen -r",
        "-c",
        "write 0 1",
        "a.qcow2",
    ]);
    same(&[
        "-c",
        "reopen -r -o read-only=off",
        "-c",
        "write 0 1",
        "a.qcow2",
    ]);
    same(&[
        "-c",
        "reopen -r -w",
        "-c",
        "reopen -w -w",
        "-c",
        "reopen x",
        "-c",
        "reopen -q",
        "a.qcow2",
    ]);
    same(&[
        "-c",
        "reopen -c bogus",
        "-c",
        "reopen -c writeback",
        "-c",
        "write 0 1",
        "a.qcow2",
    ]);
    same(&[
        "-c",
        "reopen -o l2-cache-size=64k",
        "-c",
        "write -P 9 0 1M",
        "-c",
        "read -P 9 0 1M",
        "top.qcow2",
    ]);
}

/// Runs qemu-io interactively (commands on standard input) as `prog`, and after each of
/// `cmds` tries a read-only `qemu-io -r` of the same image from another process: whether that
/// one could open it, in order.
fn readers_beside(prog: &str, pre: &[&str], cmds: &[&str], dir: &Path) -> Vec<bool> {
    use std::io::{Read, Write};
    let mut child = Command::new(prog)
        .arg0("qemu-io")
        .args(pre)
        .arg("a.qcow2")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut prompts = 0;
    let mut wait_prompt = |n: usize| {
        let mut b = [0u8; 1];
        while prompts < n {
            let got = stdout.read(&mut b).expect("read qemu-io output");
            assert_eq!(got, 1, "qemu-io ended early");
            seen.push(b[0]);
            if seen.ends_with(b"qemu-io> ") {
                prompts += 1;
            }
        }
    };
    wait_prompt(1);
    let mut opened = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        writeln!(stdin, "{cmd}").expect("send command");
        wait_prompt(i + 2);
        let other = exec_as(
            "qemu-io",
            "qemu-io",
            &["-r", "-c", "read 0 1", "a.qcow2"],
            dir,
        );
        opened.push(other.status.success());
    }
    drop(stdin);
    assert!(child.wait().expect("wait").success());
    opened
}

#[test]
fn reopen_moves_the_write_lock() {
    // A reader is refused while the image is open for writing, let in after `reopen -r`, and
    // refused again after `reopen -w`: the write lock follows the mode.
    let tmp = TempDir::new().expect("temporary directory");
    images(tmp.path());
    let cmds = [
        "length",
        "reopen -r",
        "reopen -w",
        "close",
        "open -r a.qcow2",
    ];
    let want = readers_beside("qemu-io", &[], &cmds, tmp.path());
    assert_eq!(want, vec![false, true, false, true, true]);
    let got = readers_beside(QCOW2KIT, &["io"], &cmds, tmp.path());
    assert_eq!(got, want);
}

#[test]
fn reopen_qcow2_options_as_test_137() {
    let mut valid = Vec::new();
    for o in [
        "lazy-refcounts=on,pass-discard-request=on",
        "lazy-refcounts=off,pass-discard-request=off",
        "pass-discard-snapshot=on,pass-discard-other=on",
        "overlap-check=all",
        "overlap-check=none",
        "overlap-check=constant",
        "overlap-check.template=cached",
        "overlap-check.main-header=on",
        "overlap-check.inactive-l2=off",
        "cache-size=1M",
        "l2-cache-size=512k",
        "l2-cache-entry-size=512",
        "l2-cache-entry-size=64k",
        "refcount-cache-size=128k",
        "cache-clean-interval=5",
        "cache-clean-interval=4294967295",
        "driver=qcow2",
        "file.driver=file",
        "file.filename=a.qcow2",
        "nolazy-refcounts",
    ] {
        valid.push("-c".to_string());
        valid.push(format!("reopen -o {o}"));
    }
    valid.extend(
        [
            "-c",
            "write -P 55 0 4M",
            "-c",
            "read -P 55 0 4M",
            "-c",
            "discard 0 4M",
        ]
        .map(String::from),
    );
    valid.push("a.qcow2".into());
    let args: Vec<&str> = valid.iter().map(String::as_str).collect();
    let r = same(&args);
    assert_eq!(r.code, Some(0));

    for o in [
        "lazy-refcounts=42",
        "cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-entry-size=33k",
        "l2-cache-entry-size=128k",
        "refcount-cache-size=256T",
        "overlap-check=constant,overlap-check.template=all",
        "overlap-check=blubb",
        "overlap-check.template=blubb",
        "overlap-check.foo=on",
        "cache-clean-interval=-1",
        "cache-clean-interval=x",
        "cache-size=x",
        "l2-cache-size=-1",
        "encrypt.format=aes",
        "driver=raw",
        "file.filename=./a.qcow2",
        "file.foo=1",
        "data-file=x",
        "node-name=x",
        "force-share=on",
        "foo=bar",
        "x",
    ] {
        let r = same(&[
            "-c",
            &format!("reopen -o {o}"),
            "-c",
            "write -q 0 1",
            "a.qcow2",
        ]);
        assert_eq!(r.code, Some(1), "reopen -o {o}");
    }
    same(&[
        "-c",
        "reopen -o l2-cache-entry-size=512,l2-cache-size=1T",
        "big.qcow2",
    ]);
    // A failed reopen changes nothing; options of successful ones are kept and joined.
    same(&[
        "-c",
        "reopen -o lazy-refcounts=on,overlap-check=blubb",
        "-c",
        "write -P 0x5a 0 512",
        "-c",
        "reopen -o overlap-check=constant",
        "-c",
        "reopen -o overlap-check.template=all",
        "-c",
        "reopen -o cache-size=1M",
        "-c",
        "reopen -o l2-cache-size=2M",
        "-c",
        "read -P 0x5a 0 512",
        "a.qcow2",
    ]);
}

#[test]
fn reopen_node_names_drivers_and_cache_options_as_test_133() {
    for img in ["top.qcow2", "a.qcow2"] {
        for c in [
            "reopen -o node-name=foo",
            "reopen -o file.node-name=foo",
            "reopen -o backing.node-name=foo",
            "reopen -o driver=raw",
            "reopen -o file.driver=qcow2",
            "reopen -o backing.driver=file",
            "reopen -o driver=qcow2",
            "reopen -o file.driver=file",
            "reopen -o backing.driver=qcow2",
            "reopen -r -o read-only=on",
            "reopen -w -o read-only=on",
            "reopen -c none -o cache.direct=on",
            "reopen -c writeback -o cache.direct=on",
            "reopen -c directsync -o cache.no-flush=on",
            "reopen -o read-only=foo",
            "reopen -o cache.no-flush=bar",
            "reopen -o cache.direct=baz",
            "reopen -o auto-read-only=qux",
            "reopen -o cache.no-flush=off,auto-read-only=off,cache.direct=on",
        ] {
            same(&["-c", c, img]);
        }
        for o in ["node-name", "file.node-name", "backing.node-name"] {
            let open = format!("open -o {o}=foo {img}");
            same(&["-c", &open, "-c", &format!("reopen -o {o}=foo")]);
            same(&["-c", &open, "-c", "reopen", "-c", "write 0 1"]);
        }
    }
    same(&[
        "-c",
        "open -o backing.driver=qcow2 top.qcow2",
        "-c",
        "read -P 7 0 4k",
    ]);
    same(&["-c", "open -o auto-read-only=x a.qcow2"]);
}

#[test]
fn reopen_on_raw_and_chains() {
    same(&[
        "-f",
        "raw",
        "-c",
        "reopen -o lazy-refcounts=on",
        "-c",
        "reopen -r",
        "-c",
        "write 0 1",
        "r.raw",
    ]);
    same(&[
        "-c",
        "reopen -r",
        "-c",
        "reopen -w",
        "-c",
        "write -P 8 4k 4k",
        "-c",
        "read -P 7 0 4k",
        "top.qcow2",
    ]);
}

#[test]
fn sigraise() {
    let r = same(&[
        "-c",
        "write -P 1 0 4k",
        "-c",
        "sigraise 9",
        "-c",
        "write -P 2 0 4k",
        "a.qcow2",
    ]);
    assert_eq!(r.signal, Some(9));
    assert!(r.stdout.starts_with("wrote 4096/4096 bytes at offset 0"));
    let r = same(&["-c", "sigraise 15"]);
    assert_eq!(r.signal, Some(15));
    same(&[
        "-c",
        "sigraise x",
        "-c",
        "sigraise 66",
        "-c",
        "sigraise 65",
        "-c",
        "sigraise 0",
    ]);
    same(&[
        "-c",
        "sigraise 17",
        "-c",
        "sigraise 13",
        "-c",
        "length",
        "a.qcow2",
    ]);
}
