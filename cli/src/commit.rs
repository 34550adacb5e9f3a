//! `qcow2kit commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE`: what qemu-img commit
//! does ([`qcow2kit::ops::commit`]), with its messages and exit statuses: the data FILE's chain
//! holds above BASE (default: FILE's backing file) is written into BASE, which grows when FILE
//! is larger; FILE is emptied afterwards unless `-d` (or `-b`) is given. Prints
//! `Image committed.`.
//!
//! Not covered: `-r RATE` is accepted and not applied (qemu-img applies it); `--object`,
//! `--image-opts`.

use crate::args::{opt, Spec};
use crate::common::{exit_code, image_format, open_error_text, parse_args, qemu_options, try_help};
use crate::progress::Meter;
use crate::rebase::check_cache_mode;
use qcow2kit::ops::commit::{commit, open_for_commit, CommitOptions};
use std::path::{Path, PathBuf};

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(Some('b'), Some("base"), true, "b"),
    opt(Some('d'), Some("drop"), false, "d"),
    opt(Some('r'), Some("rate"), true, "r"),
    opt(Some('p'), Some("progress"), false, "p"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
];

const HELP: &str = "Usage:
Commit image to its backing file.  Usage:

  qcow2kit commit [-f FMT] [-t CACHE_MODE] [-b BASE_IMG] [-d]
        [-r RATE] FILENAME
";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    exit_code(commit_cmd(args))
}

fn commit_cmd(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "commit")?;
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    let file = match p.operands.as_slice() {
        [f] => f.as_str(),
        _ => {
            return Err(format!(
                "Expecting one image file name\n{}",
                try_help("commit")
            ))
        }
    };
    if let Some(mode) = p.last("t") {
        check_cache_mode(mode)?;
    }
    let arg = crate::common::image_operand(&p, file, p.last("f"))?;
    let quiet = p.has("q");
    let format = image_format(&arg.path, arg.format.as_deref())?;
    let path = Path::new(&arg.path);
    let base = p.last("b").map(|b| base_path(path, b));
    let mut o = qemu_options();
    arg.apply(&mut o);
    let image = open_for_commit(path, format, base.as_deref(), &o).map_err(|e| match e {
        qcow2kit::Error::InvalidArgument(m) => m,
        other => format!("Could not open '{file}': {}", open_error_text(&other)),
    })?;
    let meter = std::sync::Mutex::new(Meter::new(p.has("p") && !quiet));
    let lock = || meter.lock().unwrap_or_else(|e| e.into_inner());
    lock().advance(0.0);
    let report = |done: u64, total: u64| {
        lock().bytes(done, total);
        true
    };
    let opts = CommitOptions {
        base,
        keep: p.has("d"),
        progress: Some(&report),
        workers: 0,
    };
    let result = commit(&image, &opts);
    if result.is_ok() {
        lock().advance(100.0);
    }
    lock().end();
    result.map_err(|e| format!("Error while committing image: {}", open_error_text(&e)))?;
    image
        .close()
        .map_err(|e| format!("Could not close '{file}': {e}"))?;
    if !quiet {
        outln!("Image committed.");
    }
    Ok(())
}

/// The base named by `-b`: as given when it names a file, else relative to the image's
/// directory (how backing names are read).
fn base_path(image: &Path, base: &str) -> PathBuf {
    let given = PathBuf::from(base);
    if given.exists() {
        return given;
    }
    qcow2kit::chain::resolve_relative(image, base.as_bytes()).unwrap_or(given)
}
