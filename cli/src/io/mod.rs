//! `qcow2kit io [-f FMT | --image-opts] [-r] [-c CMD]... [FILE]`: qemu-io's command language
//! over the qcow2kit engine, with qemu-io 10's output, messages and exit code.
//!
//! Commands (and their one-letter aliases; `help` lists them as qemu-io does):
//! - `read|r [-bCpqrv] [-P pattern [-s off] [-l len]] off len`, `readv`, `write|w
//!   [-bcCfnpqruz] [-P pattern | -s source_file] off len`, `writev`, `discard|d [-Cq] off len`
//! - `aio_read [-Ciqrv] [-P pattern] off len [len..]`, `aio_write [-Cfiqruz] [-P pattern] off
//!   len [len..]`, `aio_flush` (see [`aio`]: requests in flight together on worker threads)
//! - `truncate|t [-m prealloc_mode] off`, `length|l`, `info|i`, `alloc|a`, `map`, `flush|f`
//! - `open|o [-rnkU] [-t cache] [-d discard] [-i aio] [-o options] [path]`, `close|c`,
//!   `reopen [-r|-w] [-c cache] [-o options]` (see [`open`] for the options)
//! - `help|? [command]`, `sleep MS`, `sigraise SIGNAL`, `quit|q`, `abort`
//!
//! Offsets and lengths take qemu's size syntax (`4k`, `1.5M`, `0x1000`). Each `-c` runs in
//! order; without `-c`, commands are read from standard input after a `qemu-io> ` prompt. A
//! failing command does not stop the others; the exit code is 1 if any failed. Without FILE
//! no image is open: commands that need one fail with `no file open, try 'help open'` until
//! `open` opens one. The image is opened writable (`-r`: read-only) with its backing chain,
//! locked as QEMU locks it (`-U` with `-r`: sharing everything; `-U` alone is refused as by
//! qemu-io), and every write, zero write and discard is followed by a flush (qemu-io's default
//! writethrough cache mode; `-n` or a `-t` mode other than `writethrough`/`directsync` turn that
//! off). The image is flushed and closed at the end. `-d ignore` (or `off`) makes discards
//! succeed without effect, as in QEMU. `-i` is checked and has no effect. `--image-opts` takes
//! FILE (and `open`'s operand) as block options (`driver=qcow2,file.filename=PATH`).
//!
//! `reopen` closes the image and opens it again with the new mode and options when the mode or
//! the L2 cache size changes (the locks follow the mode); if that fails, the image is opened
//! again as it was. Other options are checked as QEMU checks them and kept for later reopens.
//!
//! `abort` ends the process with `SIGABRT` at once, without flushing or closing anything, as
//! qemu-io does: standard output not yet written is lost too (it is line-buffered on a
//! terminal and block-buffered otherwise, like C's stdio). `sigraise` flushes standard output
//! first, as qemu-io does.
//!
//! Not covered (refused with a message): the VM state (`read -b`, `write -b`: the library has
//! no access to the VM state area after the guest disk), qemu-io's blkdebug and zoned-device
//! commands (`break`, `resume`, `wait_break`, `remove_break`, `zone_*`), `-s` (snapshot mode),
//! `-C` (copy-on-read), `--object`, `truncate -m metadata|falloc|full` on qcow2. `write -z`
//! without `-u` may free clusters where QEMU keeps them allocated (the guest data is the same).

/// Prints formatted text through an [`output::Out`].
macro_rules! out {
    ($o:expr, $($arg:tt)*) => { $o.print(&format!($($arg)*)) };
}

mod aio;
mod alloc;
mod blkdebug;
mod commands;
mod getopt;
mod help;
mod image_cmds;
mod numbers;
mod open;
mod open_cmds;
mod output;
mod qcow2_opts;
mod qopts;
mod signal;
mod table;
mod vector;

use crate::args::{opt, parse, Spec};
use crate::common::fail;
use std::io::BufRead;

use commands::Session;
pub(crate) use numbers::{strtoll0, strtosz, NumError};
use open::{close_image, open_image, parse_cache, parse_discard, OpenError, OpenSpec};
use output::Out;
pub(crate) use qcow2_opts::is_runtime_key;
use qopts::Opts;
pub(crate) use qopts::{parse_bool, parse_number};

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

const HELP: &str =
    "usage: qcow2kit io [-f FMT | --image-opts] [-r] [-U] [-n] [-t CACHE] [-c CMD]... [FILE]

Runs qemu-io commands on an image (the command `help` lists them all):
  read [-Cqv] [-P pattern [-s off] [-l len]] off len
  write [-Cfqz] [-u] [-P pattern | -s source_file] off len
  aio_read | aio_write ... off len [len..], aio_flush
  discard [-Cq] off len, truncate off, length, info, map, alloc off [len]
  open [-rnU] [-t cache] [-d discard] [-o options] [path]
  reopen [-r|-w] [-c cache] [-o options]
  close | flush | help [CMD] | sleep MS | sigraise SIGNAL | quit | abort
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
    match crate::image_opts::load_secrets(p.all("object").iter().map(|s| s.as_str())) {
        Ok(s) => open::set_secrets(s),
        Err(e) => return fail(e),
    }
    if p.has("s") || p.has("C") {
        return fail("io: snapshot mode (-s) and copy-on-read (-C) are not supported");
    }
    if p.operands.len() > 1 {
        // qemu-io prints its usage on standard output.
        crate::stdio::print_out(HELP);
        return 1;
    }
    let image_opts = p.has("image-opts");
    if image_opts && p.has("f") {
        return fail("--image-opts and -f are mutually exclusive");
    }
    let mut writethrough = !p.has("n");
    if let Some(t) = p.last("t") {
        writethrough = match parse_cache(t) {
            Ok(w) => w,
            Err(e) => return fail(e),
        };
    }
    let unmap = match p.last("d") {
        None => true,
        Some(d) => match parse_discard(d) {
            Some(u) => u,
            None => return fail(format!("Invalid discard option: {d}")),
        },
    };
    let mut s = Session {
        img: None,
        image_opts,
        quit: false,
        out: Out::new(),
        aio: aio::Queue::new(),
    };
    if let Some(file) = p.operands.first() {
        let mut spec = OpenSpec {
            name: Some(file.clone()),
            opts: Opts::default(),
            read_only: p.has("r"),
            force_share: p.has("U"),
        };
        if image_opts {
            spec.name = None;
            if let Err(e) = spec.opts.parse_into(file) {
                return fail(e);
            }
        } else if let Some(f) = p.last("f") {
            spec.opts.set("driver", f.to_string());
        }
        match open_image(&spec, writethrough, unmap) {
            Ok(img) => s.img = Some(img),
            Err(OpenError::Plain(m)) => return fail(m),
            Err(OpenError::Reason(r)) => {
                return match &spec.name {
                    Some(n) => fail(format!("can't open device {n}: {r}")),
                    None => fail(format!("can't open: {r}")),
                }
            }
        }
    }
    let mut failed = false;
    let cmds = p.all("c");
    if cmds.is_empty() {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        while !s.quit {
            s.complete_aio(false);
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
    s.complete_aio(true);
    s.out.flush();
    if let Some(img) = s.img.take() {
        let name = img.spec.name.clone().unwrap_or_default();
        match close_image(img) {
            // As qemu-io, silent about a failure a command already reported.
            Err(e) if failed && e.ends_with(qcow2kit::error::AFTER_FAILED_WRITE) => return 1,
            Err(e) => return fail(format!("io: closing {name}: {e}")),
            Ok(()) => {}
        }
    }
    u8::from(failed)
}

/// Opens, read-only, the image that the block options `text` describe
/// (`driver=qcow2,file.filename=PATH`) as qemu-io's `--image-opts` does; for subcommands that
/// take `--image-opts`. The error is qemu-img's reason (after `Could not open 'TEXT': `).
pub(crate) fn open_image_opts(
    text: &str,
    force_share: bool,
) -> Result<std::sync::Arc<dyn qcow2kit::BlockDevice>, String> {
    let mut spec = OpenSpec {
        name: None,
        opts: Opts::default(),
        read_only: true,
        force_share,
    };
    spec.opts.parse_into(text)?;
    match open_image(&spec, false, true) {
        Ok(img) => Ok(img.dev),
        Err(OpenError::Plain(m) | OpenError::Reason(m)) => Err(m),
    }
}
