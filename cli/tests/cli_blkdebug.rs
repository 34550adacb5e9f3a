//! QEMU's blkdebug filter in `qcow2kit io`, side by side with qemu-io: the same script, on
//! copies of one image made by qemu-img, must print the same lines (timings masked) and exit
//! the same way; afterwards the guest data of both images must match.
//!
//! Covered: a request suspended at a breakpoint while other requests to the same cluster wait
//! for it and a synchronous write to another cluster goes on (iotests 060 and 271), breakpoint
//! commands' errors, `inject-error` rules from a config file (`blkdebug:CONF:FILE`) and from
//! `data-file.*` options (iotest 244's failing flush of the data file).
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::tool_output;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// Runs `script` (one command per line) on stdin of qemu-io (`qemu == true`) or qcow2kit io,
/// with `args` before it; returns (stdout with timings masked, stderr with the program name
/// masked, exit code).
fn io_script(dir: &Path, qemu: bool, args: &[&str], script: &str) -> (String, String, i32) {
    let mut cmd = if qemu {
        Command::new("qemu-io")
    } else {
        let mut c = Command::new(QCOW2KIT);
        c.arg("io");
        c
    };
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-io/qcow2kit: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write script");
    let o = child.wait_with_output().expect("wait");
    let out = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let l = l.trim_start_matches("qemu-io> ");
            if l.contains(" ops; ") {
                "TIMING".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let err = String::from_utf8_lossy(&o.stderr)
        .replace("qcow2kit io:", "qemu-io:")
        .replace("qcow2kit:", "qemu-io:");
    (out, err, o.status.code().unwrap_or(-1))
}

/// Makes `q.qcow2` and `k.qcow2` in a new temporary directory with `qemu-img create ARGS`.
fn images(create: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for name in ["q.qcow2", "k.qcow2"] {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.insert(4, name);
        tool_output("qemu-img", &args, d.path());
    }
    d
}

/// The guest content of `img` as raw bytes.
fn raw(dir: &Path, img: &str) -> Vec<u8> {
    let out = format!("{img}.raw");
    tool_output("qemu-img", &["convert", "-O", "raw", img, &out], dir);
    fs::read(dir.join(out)).expect("read raw")
}

/// Runs `script` (with `IMG` standing for the image's name) through both tools and asserts the
/// same output, the same exit status and the same guest data afterwards.
fn same(dir: &Path, args: &[&str], script: &str) -> String {
    let q = io_script(dir, true, args, &script.replace("IMG", "q.qcow2"));
    let k = io_script(dir, false, args, &script.replace("IMG", "k.qcow2"));
    assert_eq!(
        q.0.replace("q.qcow2", "IMG"),
        k.0.replace("k.qcow2", "IMG"),
        "stdout differs"
    );
    assert_eq!(
        q.1.replace("q.qcow2", "IMG"),
        k.1.replace("k.qcow2", "IMG"),
        "stderr differs"
    );
    assert_eq!(q.2, k.2, "exit status differs");
    assert!(
        raw(dir, "q.qcow2") == raw(dir, "k.qcow2"),
        "guest data differs"
    );
    k.0
}

#[test]
fn requests_to_a_suspended_allocation_wait_for_it() {
    let d = images(&["-o", "extended_l2=on", "1M"]);
    let script = "open -o driver=qcow2 blkdebug::IMG\n\
                  break write_aio A\n\
                  aio_write -P 10 30k 2k\n\
                  wait_break A\n\
                  aio_write -P 11 20k 2k\n\
                  aio_write -P 12 40k 2k\n\
                  resume A\n\
                  aio_flush\n";
    // The two waiting requests may finish in either order (iotest 271 masks their offsets).
    let q = io_script(d.path(), true, &[], &script.replace("IMG", "q.qcow2"));
    let k = io_script(d.path(), false, &[], &script.replace("IMG", "k.qcow2"));
    let mask = |s: &str| s.replace("20480", "OFFSET").replace("40960", "OFFSET");
    assert_eq!(mask(&q.0), mask(&k.0), "stdout differs");
    assert_eq!(
        (q.1.as_str(), q.2),
        (k.1.as_str(), k.2),
        "stderr or status differs"
    );
    assert!(
        raw(d.path(), "q.qcow2") == raw(d.path(), "k.qcow2"),
        "guest data differs"
    );
    let out = k.0;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..3],
        &[
            "blkdebug: Suspended request 'A'",
            "blkdebug: Resuming request 'A'",
            "wrote 2048/2048 bytes at offset 30720"
        ],
        "{out}"
    );
    for (p, off) in [(10, "30k"), (11, "20k"), (12, "40k")] {
        let o = tool_output(
            QCOW2KIT,
            &["io", "-c", &format!("read -P {p} {off} 2k"), "k.qcow2"],
            d.path(),
        );
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("verification failed"),
            "pattern {p} at {off} lost"
        );
    }
}

#[test]
fn a_synchronous_write_runs_while_a_copy_on_write_is_suspended() {
    let d = tempfile::tempdir().expect("tempdir");
    tool_output(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
        d.path(),
    );
    tool_output(
        "qemu-io",
        &["-c", "write -P 7 0 128k", "base.qcow2"],
        d.path(),
    );
    for name in ["q.qcow2", "k.qcow2"] {
        tool_output(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                name,
            ],
            d.path(),
        );
    }
    let script = "open -o file.driver=blkdebug IMG\n\
                  break cow_read 0\n\
                  aio_write -P 1 0k 1k\n\
                  wait_break 0\n\
                  write -P 2 64k 64k\n\
                  resume 0\n\
                  aio_flush\n\
                  read -P 1 0 1k\n\
                  read -P 7 1k 63k\n";
    let out = same(d.path(), &[], script);
    assert!(out.contains("blkdebug: Resuming request '0'"), "{out}");
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn breakpoint_commands_fail_as_qemu_io_fails_them() {
    let d = images(&["1M"]);
    // No blkdebug filter, an unknown event, an unknown tag.
    same(
        d.path(),
        &[],
        "open IMG\nbreak write_aio A\nresume A\nremove_break A\n",
    );
    same(
        d.path(),
        &[],
        "open blkdebug::IMG\nbreak no_such_event A\nresume A\nremove_break A\n\
         break write_aio B\nremove_break B\nwrite 0 4k\n",
    );
}

#[test]
fn config_file_rules_fail_requests_after_their_event() {
    let d = images(&["1M"]);
    fs::write(
        d.path().join("rules.conf"),
        "# fail the data write of the next allocation\n\
         [inject-error]\n\
         event = \"write_aio\"\n\
         errno = \"28\"\n\
         once = \"on\"\n",
    )
    .expect("config");
    let out = same(
        d.path(),
        &[],
        "open -o driver=qcow2 blkdebug:rules.conf:IMG\nwrite 0 64k\nwrite 64k 64k\n",
    );
    assert!(
        out.contains("write failed: No space left on device"),
        "{out}"
    );
    assert!(
        out.contains("wrote 65536/65536 bytes at offset 65536"),
        "{out}"
    );
}

#[test]
fn a_failing_flush_of_the_data_file_fails_the_flush() {
    let d = tempfile::tempdir().expect("tempdir");
    for name in ["q.qcow2", "k.qcow2"] {
        tool_output(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={name}.data"),
                name,
                "1M",
            ],
            d.path(),
        );
    }
    // As iotest 244: writeback, so that the write itself does not flush.
    let opts = "driver=qcow2,file.filename=IMG,data-file.driver=blkdebug,\
                data-file.image.filename=IMG.data,data-file.inject-error.0.event=none,\
                data-file.inject-error.0.iotype=flush";
    let args = |img: &str| {
        [
            "-t".to_string(),
            "writeback".to_string(),
            "--image-opts".to_string(),
            opts.replace("IMG", img),
        ]
    };
    let (qa, ka) = (args("q.qcow2"), args("k.qcow2"));
    let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
    let ka: Vec<&str> = ka.iter().map(String::as_str).collect();
    let script = "write 0 512\nflush\n";
    let q = io_script(d.path(), true, &qa, script);
    let k = io_script(d.path(), false, &ka, script);
    assert_eq!(q.0, k.0, "stdout differs");
    // qemu-io prints nothing for a failed flush: the exit status tells.
    assert_eq!(
        (q.2, k.2),
        (1, 1),
        "the flush of the data file did not fail"
    );
}

#[test]
fn qemu_img_opens_a_blkdebug_data_file_named_by_json() {
    let d = tempfile::tempdir().expect("tempdir");
    tool_output(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=t.qcow2.data",
            "t.qcow2",
            "4M",
        ],
        d.path(),
    );
    tool_output(
        "qemu-io",
        &["-c", "write -P 5 64k 128k", "t.qcow2"],
        d.path(),
    );
    tool_output(
        "qemu-img",
        &["convert", "-O", "qcow2", "t.qcow2", "src.qcow2"],
        d.path(),
    );
    let json = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 't.qcow2'}, \
                'data-file': {'driver': 'blkdebug', 'image': {'driver': 'file', \
                'filename': 't.qcow2.data'}}}";
    // A rule failing every read of the data file: the same image must then fail to compare.
    let failing = json.replace(
        "'driver': 'blkdebug',",
        "'driver': 'blkdebug', 'inject-error': [{'event': 'none', 'iotype': 'read'}],",
    );
    for (name, want) in [(json.to_string(), 0), (failing, 4)] {
        let q = Command::new("qemu-img")
            .args(["compare", "src.qcow2", &name])
            .current_dir(d.path())
            .output()
            .expect("qemu-img");
        let k = Command::new(QCOW2KIT)
            .args(["compare", "src.qcow2", &name])
            .current_dir(d.path())
            .output()
            .expect("qcow2kit");
        assert_eq!(q.status.code(), Some(want), "qemu-img compare {name}");
        assert_eq!(
            k.status.code(),
            q.status.code(),
            "exit status differs for {name}"
        );
        assert_eq!(
            String::from_utf8_lossy(&k.stdout),
            String::from_utf8_lossy(&q.stdout),
            "stdout differs for {name}"
        );
        assert_eq!(
            String::from_utf8_lossy(&k.stderr).replace("qcow2kit:", "qemu-img:"),
            String::from_utf8_lossy(&q.stderr),
            "stderr differs for {name}"
        );
    }
}
