//! Image locking between processes, judged by qemu-img and qemu-io 10.x.
//!
//! A holder process keeps an image open: `qemu-io FILE` or `qcow2kit io FILE` reading commands
//! from a pipe (answering `length` shows that the open, and its locks, happened). Meanwhile each
//! command of a list runs once as qemu-img/qemu-io and once as qcow2kit. For every pair of
//! holder and tool, exit code, standard output and standard error (`qemu-img`/`qemu-io` read as
//! `qcow2kit`) must be what qemu-img/qemu-io answer with a qemu-io holder. So qcow2kit refuses
//! where QEMU refuses, with QEMU's message, whether QEMU or qcow2kit holds the image; and QEMU
//! refuses an image qcow2kit holds.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use std::path::Path;
use std::process::{Command, Output};

#[path = "../../tests/support/lock_helpers.rs"]
mod lock_helpers;
use lock_helpers::{make_images, Held};
use qcow2kit_testsupport::exec;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// The images of [`make_images`] in a new directory.
fn images() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_images(tmp.path());
    tmp
}

/// Who holds the image.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Qemu,
    Qcow2kit,
}

/// Starts `who` holding the image of `args` open.
fn hold(who: Holder, args: &[&str], dir: &Path) -> Held {
    let mut cmd = match who {
        Holder::Qemu => Command::new("qemu-io"),
        Holder::Qcow2kit => {
            let mut c = Command::new(QCOW2KIT);
            c.arg("io");
            c
        }
    };
    cmd.args(args).current_dir(dir);
    Held::spawn(cmd)
}

/// Exit code, stdout and stderr with the program names read as `qcow2kit`.
fn result(o: &Output) -> (Option<i32>, String, String) {
    let norm = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("qemu-img", "qcow2kit")
            .replace("qemu-io", "qcow2kit")
    };
    (o.status.code(), norm(&o.stdout), norm(&o.stderr))
}

/// Runs `cmd` (`img …` for qemu-img, `io …` for qemu-io) as QEMU or as qcow2kit.
fn tool(qemu: bool, cmd: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let o = if qemu {
        let prog = if cmd[0] == "img" {
            "qemu-img"
        } else {
            "qemu-io"
        };
        exec(prog, &cmd[1..], dir)
    } else {
        let mut args = cmd.to_vec();
        if args[0] == "img" {
            args.remove(0);
        }
        exec(QCOW2KIT, &args, dir)
    };
    result(&o)
}

/// For each command: QEMU's answer while qemu-io holds the image; then the same answer from
/// both tools while either holder holds it. Returns how many commands QEMU refused.
fn matrix(held: &[&str], cmds: &[&[&str]]) -> usize {
    let tmp = images();
    let dir = tmp.path();
    let expected: Vec<_> = {
        let _h = hold(Holder::Qemu, held, dir);
        cmds.iter().map(|c| tool(true, c, dir)).collect()
    };
    for holder in [Holder::Qemu, Holder::Qcow2kit] {
        let _h = hold(holder, held, dir);
        for (cmd, want) in cmds.iter().zip(&expected) {
            for qemu in [true, false] {
                let got = tool(qemu, cmd, dir);
                assert_eq!(
                    &got,
                    want,
                    "holder {holder:?} {held:?}, {} {cmd:?}",
                    if qemu { "QEMU" } else { "qcow2kit" }
                );
            }
        }
    }
    expected.iter().filter(|e| e.0 != Some(0)).count()
}

/// What qemu-img and qemu-io do to an image that one of them holds.
const ON_TOP: &[&[&str]] = &[
    &["io", "-c", "length", "top.qcow2"],
    &["io", "-r", "-c", "length", "top.qcow2"],
    &["io", "-r", "-U", "-c", "length", "top.qcow2"],
    &["io", "-U", "-c", "length", "top.qcow2"],
    &["io", "-c", "length", "base.qcow2"],
    &["io", "-r", "-c", "length", "base.qcow2"],
    &["img", "info", "top.qcow2"],
    &["img", "info", "-U", "--output", "json", "top.qcow2"],
    &["img", "info", "--backing-chain", "top.qcow2"],
    &["img", "check", "top.qcow2"],
    &["img", "check", "-U", "top.qcow2"],
    &["img", "check", "-r", "all", "top.qcow2"],
    &["img", "check", "-U", "-r", "all", "top.qcow2"],
    &["img", "check", "-r", "all", "base.qcow2"],
    &["img", "map", "--output", "json", "top.qcow2"],
    &["img", "map", "-U", "--output", "json", "top.qcow2"],
    &["img", "compare", "top.qcow2", "base.qcow2"],
    &["img", "compare", "-U", "top.qcow2", "base.qcow2"],
    &["img", "convert", "-O", "raw", "top.qcow2", "out.raw"],
    &["img", "convert", "-U", "-O", "raw", "top.qcow2", "out.raw"],
    &["img", "resize", "top.qcow2", "2M"],
    &["img", "resize", "base.qcow2", "2M"],
];

#[test]
fn a_writer_excludes_writers_and_readers_but_not_force_share() {
    let refused = matrix(&["top.qcow2"], ON_TOP);
    // Everything but the six -U readers (io, info, check, map, compare, convert) and the
    // reader of the backing file.
    assert_eq!(refused, ON_TOP.len() - 7);
}

#[test]
fn a_reader_excludes_writers_only() {
    let refused = matrix(&["-r", "top.qcow2"], ON_TOP);
    // io and check -r on the top and the base, resize of both, and io -U (refused anyway).
    assert_eq!(refused, 8);
}

#[test]
fn a_writer_holds_its_data_file_against_resizes() {
    let cmds: &[&[&str]] = &[
        &["io", "-c", "length", "dimg.qcow2"],
        &["io", "-r", "-c", "length", "dimg.qcow2"],
        &["img", "resize", "-f", "raw", "data.raw", "2M"],
        &["io", "-f", "raw", "-c", "length", "data.raw"],
        &["img", "info", "-f", "raw", "--output", "json", "data.raw"],
    ];
    let refused = matrix(&["dimg.qcow2"], cmds);
    assert_eq!(refused, 3);
}

#[test]
fn an_image_in_use_is_not_created_or_converted_over() {
    let cmds: &[&[&str]] = &[
        &["img", "create", "-f", "qcow2", "top.qcow2", "1M"],
        &["img", "create", "-f", "raw", "top.qcow2", "1M"],
        &["img", "convert", "-O", "qcow2", "base.qcow2", "top.qcow2"],
        &["img", "convert", "-O", "raw", "base.qcow2", "top.qcow2"],
        &[
            "img",
            "convert",
            "-n",
            "-O",
            "qcow2",
            "base.qcow2",
            "top.qcow2",
        ],
        &[
            "img",
            "convert",
            "-n",
            "-O",
            "raw",
            "base.qcow2",
            "top.qcow2",
        ],
    ];
    assert_eq!(matrix(&["top.qcow2"], cmds), cmds.len());
}
