//! `qcow2kit rebase [-f FMT] [-t CACHE] [-T CACHE] [-q] [-U] [-p] [-c] [-u] -b BACKING
//! [-F BACKING_FMT] FILE`: what qemu-img rebase does, with its messages and exit statuses.
//!
//! Safe mode ([`qcow2kit::ops::rebase::rebase`]) keeps the guest content: the differences
//! between the old chain and the new backing file are copied into FILE first. `-b ""` flattens
//! the chain into FILE; a new backing file already in FILE's chain is a pull (only the layers
//! above it are read). `-u` rewrites the header only.
//!
//! Where qcow2kit differs: a missing `-F` is refused before anything is copied (qemu-img copies,
//! then fails to switch the header); ranges the old chain reads as zeros are written as zero
//! clusters on version 3 images, not as zero-filled data clusters.
//!
//! Not covered: `--object`, `--image-opts`, backing formats other than qcow2 and raw.

use crate::args::{opt, Spec};
use crate::common::{
    exit_code, image_format, open_error_text, parse_args, parse_format, qemu_options, try_help,
};
use crate::progress::Meter;
use qcow2kit::chain::{open, BackingPolicy, Opened};
use qcow2kit::ops::rebase::{rebase_unsafe, BackingLink, RebaseOptions};
use qcow2kit::Format;
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('F'), Some("backing-format"), true, "F"),
    opt(Some('b'), Some("backing"), true, "b"),
    opt(Some('u'), Some("backing-unsafe"), false, "u"),
    opt(Some('c'), Some("compress"), false, "c"),
    opt(Some('p'), Some("progress"), false, "p"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(Some('T'), Some("backing-cache"), true, "T"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
];

const HELP: &str = "Usage:
Change backing file of the image.  Usage:

  qcow2kit rebase [-f FMT] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]
        [-c] FILENAME
Rebases FILENAME on top of BACKING_FILENAME or no backing file
";

/// The cache modes qemu-img accepts (`-t`, `-T`); qcow2kit's I/O is the same for all of them.
pub fn check_cache_mode(mode: &str) -> Result<(), String> {
    match mode {
        "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe" => Ok(()),
        other => Err(format!("Invalid cache option: {other}")),
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    exit_code(rebase_cmd(args))
}

fn rebase_cmd(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "rebase")?;
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    let file = match p.operands.as_slice() {
        [f] => f.as_str(),
        _ => {
            return Err(format!(
                "Expecting one image file name\n{}",
                try_help("rebase")
            ))
        }
    };
    let unsafe_mode = p.has("u");
    let backing = p.last("b");
    if !unsafe_mode && backing.is_none() {
        return Err(format!(
            "Must specify backing file (-b) or use unsafe mode (-u)\n{}",
            try_help("rebase")
        ));
    }
    for mode in [p.last("t"), p.last("T")].into_iter().flatten() {
        check_cache_mode(mode)?;
    }
    let arg = crate::common::image_operand(&p, file, p.last("f"))?;
    let backing_format = match p.last("F") {
        Some(f) => Some(parse_format(f).map_err(|_| format!("Invalid format name: '{f}'"))?),
        None => None,
    };
    let quiet = p.has("q");
    let format = image_format(&arg.path, arg.format.as_deref())?;
    let path = Path::new(&arg.path);

    let mut o = qemu_options();
    arg.apply(&mut o);
    o.writable = true;
    if unsafe_mode {
        o.backing = BackingPolicy::Ignore;
    }
    let image = open(path, format, &o)
        .map_err(|e| format!("Could not open '{file}': {}", open_error_text(&e)))?;
    if p.has("c") && image.qcow2.is_none() {
        return Err("Compression not supported for this file format".into());
    }
    // The new backing link: none for `-b ""` (and for `-u` without `-b`).
    let name = backing.filter(|b| !b.is_empty());
    if let (Some(name), false) = (name, unsafe_mode) {
        check_new_backing(&image, name, backing_format, p.has("U"))?;
    }
    let cannot_change = |why: &str| {
        format!(
            "Could not change the backing file to '{}': {why}",
            name.unwrap_or("")
        )
    };
    let link = match (name, backing_format) {
        (None, _) => None,
        (Some(_), None) => return Err(cannot_change("backing format must be specified")),
        (Some(n), Some(f)) => Some(BackingLink {
            name: n.as_bytes().to_vec(),
            format: f,
        }),
    };
    let Some(top) = image.qcow2.clone() else {
        return Err(cannot_change("Operation not supported"));
    };
    let meter = std::sync::Mutex::new(Meter::new(p.has("p") && !quiet));
    let lock = || meter.lock().unwrap_or_else(|e| e.into_inner());
    lock().advance(0.0);
    if unsafe_mode {
        let r = rebase_unsafe(&top, link.as_ref()).map_err(|e| match e {
            qcow2kit::Error::InvalidArgument(m) if m == qcow2kit::engine::HEADER_FULL => {
                cannot_change(&m)
            }
            qcow2kit::Error::InvalidArgument(_) => cannot_change("Invalid argument"),
            other => cannot_change(&other.to_string()),
        });
        if r.is_ok() {
            lock().advance(100.0);
        }
        lock().end();
        return r;
    }
    let report = |done: u64, total: u64| {
        lock().bytes(done, total);
        true
    };
    let opts = RebaseOptions {
        compress: p.has("c"),
        progress: Some(&report),
        ..RebaseOptions::default()
    };
    let result = qcow2kit::ops::rebase::rebase(&image, link.as_ref(), &opts);
    if result.is_ok() {
        lock().advance(100.0);
    }
    lock().end();
    result
        .map(|_| ())
        .map_err(|e| format!("Could not rebase '{file}': {}", open_error_text(&e)))?;
    top.close()
        .map_err(|e| format!("Could not close '{file}': {e}"))
}

/// Opens the new backing file as the rebase will, for qemu-img's error message when it cannot
/// be opened.
fn check_new_backing(
    image: &Opened,
    name: &str,
    format: Option<Format>,
    force_share: bool,
) -> Result<(), String> {
    let shown = |e: String| format!("Could not open new backing file '{name}': {e}");
    let path = qcow2kit::chain::resolve_relative(&image.path, name.as_bytes())
        .map_err(|e| shown(e.to_string()))?;
    let format = match format {
        Some(f) => f,
        None => qcow2kit::chain::probe_file(&path).map_err(|e| shown(e.to_string()))?,
    };
    let mut o = qemu_options();
    o.locking = crate::common::locking(force_share);
    open(&path, format, &o)
        .map(drop)
        .map_err(|e| shown(open_error_text(&e)))
}
