//! `qcow2kit`: a qemu-img compatible command-line tool over the qcow2kit library.
//!
//! Subcommands, options, output and exit codes follow qemu-img for what they cover, so scripts
//! can swap the binary.

#[macro_use]
mod stdio;

mod amend;
mod args;
mod bench;
mod bitmap;
mod blkdebug_rules;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod image_opts;
mod info;
mod io;
mod json_name;
mod localtime;
mod map;
mod measure;
mod nbd;
mod option_help;
mod progress;
mod qemu_errors;
mod qjson;
mod rebase;
mod resize;
mod snapshot;

use std::process::ExitCode;

const USAGE: &str = "usage: qcow2kit COMMAND [OPTIONS]

Commands (qemu-img compatible):
  check [-f FMT] [--output human|json] [-r leaks|all] [-U] FILE
  info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE
  convert [-f FMT] [-O raw] [-U] [-C] [-p] [-S SIZE] [-m N] [-W] [-l SNAPSHOT] [-n] SRC DST
  map [-f FMT] [--output human|json] [-U] FILE
  measure [--output human|json] [-O FMT] [-o OPTIONS] (--size SIZE | [-f FMT] [-l SNAP] FILE)
  compare [-f FMT] [-F FMT] [-s] [-q] [-U] FILE1 FILE2
  create [-f qcow2|raw] [-o OPTIONS] [-b BACKING] [-F BACKING_FMT] [-u] [-q] FILE [SIZE]
  resize [-f FMT] [--shrink] [--preallocation MODE] [-q] FILE [+|-]SIZE
  snapshot [-f FMT] [-l | -a|-c|-d SNAPSHOT] [-q] [-U] FILE
  dd [-f FMT] [-O raw|qcow2] [-U] [bs=SIZE] [count=N] [skip=N] if=INPUT of=OUTPUT
  bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval N] [--no-drain] [-n] [-i AIO]
        [-o OFFSET] [--pattern P] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-w] [-U] [--mmap] FILE
  bitmap (--add [-g G] [--disable] | --remove | --clear | --enable | --disable |
          --merge SRC [-b SRC_FILE] [-F SRC_FMT])... [-f FMT] FILE BITMAP

qemu-nbd compatible (server):
  nbd [-f FMT] [-r] [-x NAME] [-p PORT] [-b ADDR] [-k SOCKET] [-t] [-e N] [-A] [-l SNAPSHOT]
      [--discard=unmap] [--fork] [--pid-file F] FILE      (no TLS)

qemu-io compatible:
  io [-f FMT] [-r] [-U] [-c CMD]... [FILE] (read, write, aio_read, aio_write, aio_flush,
                                           discard, truncate, info, open, reopen, help, ...)
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // Installed as qemu-nbd, the arguments are the nbd subcommand's.
    if common::prog() == "qemu-nbd" {
        return ExitCode::from(nbd::run(&argv));
    }
    let Some(cmd) = argv.first() else {
        err!("{USAGE}");
        return ExitCode::from(1);
    };
    let rest = &argv[1..];
    let code = match cmd.as_str() {
        "check" => check::run(rest),
        "info" => info::run(rest),
        "convert" => convert::run(rest),
        "map" => map::run(rest),
        "measure" => measure::run(rest),
        "compare" => compare::run(rest),
        "create" => create::run(rest),
        "resize" => resize::run(rest),
        "rebase" => rebase::run(rest),
        "commit" => commit::run(rest),
        "amend" => amend::run(rest),
        "snapshot" => snapshot::run(rest),
        "bitmap" => bitmap::run(rest),
        "dd" => dd::run(rest),
        "bench" => bench::run(rest),
        "io" => io::run(rest),
        "nbd" => nbd::run(rest),
        "-h" | "--help" | "help" => {
            out!("{USAGE}");
            0
        }
        "-V" | "--version" => {
            outln!("qcow2kit version {}", env!("CARGO_PKG_VERSION"));
            0
        }
        other => {
            errln!("{}: Command not found: {other}", crate::common::prog());
            1
        }
    };
    ExitCode::from(code)
}
