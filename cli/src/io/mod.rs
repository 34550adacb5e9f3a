//! `qcow2kit io [-f FMT] [-r] [-c CMD]... FILE`: qemu-io's command language over the qcow2kit
//! engine, with qemu-io 10's output, messages and exit code.
//!
//! Commands (and their one-letter aliases):
//! - `read|r [-bCpqrv] [-P pattern [-s off] [-l len]] off len`
//! - `write|w [-bcCfnpqruz] [-P pattern | -s source_file] off len`
//! - `discard|d [-Cq] off len`
//! - `flush|f`, `length|l`, `quit|q`, `abort`
//!
//! Offsets and lengths take qemu's size syntax (`4k`, `1.5M`, `0x1000`). Each `-c` runs in
//! order; without `-c`, commands are read from standard input after a `qemu-io> ` prompt. A
//! failing command does not stop the others; the exit code is 1 if any failed. The image is
//! opened writable (`-r`: read-only) with its backing chain, locked as QEMU locks it (`-U` with
//! `-r`: sharing everything; `-U` alone is refused as by qemu-io), and every write, zero write and
//! discard is followed by a flush (qemu-io's default writethrough cache mode; `-n` or a `-t`
//! mode other than `writethrough`/`directsync` turn that off). The image is flushed and closed
//! at the end. `-d ignore` (or `off`) makes discards succeed without effect, as in QEMU.
//!
//! `abort` ends the process with `SIGABRT` at once, without flushing or closing anything, as
//! qemu-io does: standard output not yet written is lost too (it is line-buffered on a
//! terminal and block-buffered otherwise, like C's stdio).
//!
//! Not covered (refused with a message): the VM state (`-b`), the other qemu-io commands, `-s`
//! (snapshot mode), `-C` (copy-on-read), `--object`, `--image-opts`. `write -z` without `-u`
//! may free clusters where QEMU keeps them allocated (the guest data is the same).

/// Prints formatted text through an [`output::Out`].
macro_rules! out {
    ($o:expr, $($arg:tt)*) => { $o.print(&format!($($arg)*)) };
}

mod commands;
mod getopt;
mod numbers;
mod output;

use crate::args::{opt, parse, Spec};
use crate::common::{fail, locking, parse_format};
use qcow2kit::chain::{open, probe_file, ImageFormat, OpenOptions, Opened, FORCE_SHARE_WRITABLE};
use std::io::BufRead;
use std::path::Path;

use commands::Session;
use output::Out;

const SPECS: &[Spec] = &[
    opt(Some('c'), Some("cmd"), true, "c"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('r'), Some("read-only"), false, "r"),
    opt(Some('s'), Some("snapshot"), false, "s"),
    opt(Some('n'), Some("nocache"), false, "n"),
    opt(Some('C'), Some("copy-on-read"), false, "C"),
    opt(Some('m'), Some("misalign"), false, "m"),
    opt(Some('k'), Some("native-aio"), false, "k"),
    opt(Some('i'), Some("aio"), true, "i"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(Some('d'), Some("discard"), true, "d"),
    opt(Some('T'), Some("trace"), true, "T"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit io [-f FMT] [-r] [-U] [-n] [-t CACHE] [-c CMD]... FILE

Runs qemu-io commands on an image:
  read [-Cqv] [-P pattern [-s off] [-l len]] off len
  write [-Cfqz] [-u] [-P pattern | -s source_file] off len
  discard [-Cq] off len
  flush | length | quit | abort
";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match parse(args, SPECS) {
        Ok(p) => p,
        Err(e) => return fail(format!("io: {e}")),
    };
    if p.has("help") {
        crate::stdio::print_out(HELP);
        return 0;
    }
    if p.has("object") || p.has("image-opts") {
        return fail("io: --object and --image-opts are not supported");
    }
    if p.has("s") || p.has("C") {
        return fail("io: snapshot mode (-s) and copy-on-read (-C) are not supported");
    }
    let [file] = p.operands.as_slice() else {
        // qemu-io prints its usage on standard output.
        crate::stdio::print_out(HELP);
        return 1;
    };
    let mut writethrough = true;
    if p.has("n") {
        writethrough = false;
    }
    if let Some(t) = p.last("t") {
        writethrough = match t {
            "writethrough" | "directsync" => true,
            "none" | "off" | "writeback" | "unsafe" => false,
            other => return fail(format!("Invalid cache option: {other}")),
        };
    }
    let unmap = match p.last("d") {
        None | Some("on" | "unmap") => true,
        Some("off" | "ignore") => false,
        Some(other) => return fail(format!("Invalid discard option: {other}")),
    };
    let read_only = p.has("r");
    let opened = match open_image(file, p.last("f"), read_only, p.has("U")) {
        Ok(o) => o,
        Err(e) => return fail(format!("can't open device {file}: {e}")),
    };
    let mut s = Session {
        dev: opened.device.clone(),
        qcow2: opened.qcow2.clone(),
        read_only,
        writethrough,
        unmap,
        quit: false,
        out: Out::new(),
    };
    let mut failed = false;
    let cmds = p.all("c");
    if cmds.is_empty() {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        while !s.quit {
            s.out.print("qemu-io> ");
            s.out.flush();
            let Some(Ok(line)) = lines.next() else { break };
            failed |= s.command(&line) < 0;
        }
    } else {
        for c in cmds {
            if s.quit {
                break;
            }
            failed |= s.command(c) < 0;
        }
    }
    s.out.flush();
    drop(s);
    let closed = match &opened.qcow2 {
        Some(q) => q.close(),
        None => opened.device.flush(),
    };
    // An image marked corrupt while open is closed silently, as by qemu-io: the corruption
    // was reported when it was found, and nothing more is written.
    let marked = opened.qcow2.as_ref().is_some_and(|q| {
        q.header()
            .incompatible
            .contains(qcow2kit::format::features::IncompatibleFeatures::CORRUPT)
    });
    if let (Err(e), false) = (closed, marked) {
        return fail(format!("io: closing {file}: {e}"));
    }
    u8::from(failed)
}

/// Opens the image as qemu-io does: writable unless `read_only`, the chain followed, locked
/// as QEMU locks (`force_share`: read-only, sharing everything).
fn open_image(
    file: &str,
    format: Option<&str>,
    read_only: bool,
    force_share: bool,
) -> Result<Opened, String> {
    if force_share && !read_only {
        return Err(FORCE_SHARE_WRITABLE.into());
    }
    let path = Path::new(file);
    let lib = |e: qcow2kit::Error| match e {
        qcow2kit::Error::Io { source, .. } => {
            let s = source.to_string();
            let s = s
                .rfind(" (os error ")
                .map_or(s.as_str(), |i| &s[..i])
                .to_string();
            format!("Could not open '{file}': {s}")
        }
        other => crate::common::open_error_text(&other),
    };
    let fmt = match format {
        Some(f) => parse_format(f).map_err(|_| format!("Unknown driver '{f}'"))?,
        None => {
            let f = probe_file(path).map_err(lib)?;
            if f == ImageFormat::Raw {
                errln!(
                    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            f
        }
    };
    let opts = OpenOptions {
        writable: !read_only,
        locking: locking(force_share),
        ..crate::common::qemu_options()
    };
    open(path, fmt, &opts).map_err(lib)
}
