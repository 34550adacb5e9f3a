//! `qcow2kit bitmap (--add [-g GRANULARITY] [--disable] | --remove | --clear | --enable |
//! --disable | --merge SOURCE [-b SRC_FILE] [-F SRC_FMT])... [-f FMT] FILE BITMAP`: what
//! qemu-img bitmap does, with its messages and exit statuses.
//!
//! The actions run in command-line order on the image opened writable and stop at the first
//! failure ("Operation ACTION on bitmap NAME failed: …"); the image is closed either way, which
//! stores what the actions before changed, as in qemu-img. qemu-img names the block node in two
//! messages by a generated name (`#blockNNN`, different on every run); qcow2kit prints one of
//! the same form.
//!
//! The image may be named by `--image-opts driver=FMT,file.driver=file,file.filename=PATH`;
//! the source of a merge (`-b`) is opened without its backing file, as qemu-img opens it.
//!
//! Not covered: `--object`, other `--image-opts` options.

use crate::args::{opt, parse, Spec};
use crate::common::{open_error_text, parse_format, parse_size, prog, qemu_options};
use qcow2kit::chain::{open, probe_file, BackingPolicy, Opened};
use qcow2kit::error::strerror;
use qcow2kit::ops::bitmap::{run as run_actions, BitmapAction};
use qcow2kit::Format;
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("add"), false, "add"),
    opt(None, Some("remove"), false, "remove"),
    opt(None, Some("clear"), false, "clear"),
    opt(None, Some("enable"), false, "enable"),
    opt(None, Some("disable"), false, "disable"),
    opt(None, Some("merge"), true, "merge"),
    opt(Some('g'), Some("granularity"), true, "g"),
    opt(Some('b'), Some("source-file"), true, "b"),
    opt(Some('F'), Some("source-format"), true, "F"),
];

const HELP: &str = "Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    match bitmap(args) {
        Ok(()) => 0,
        Err(msg) => {
            if !msg.is_empty() {
                errln!("{}: {msg}", prog());
            }
            1
        }
    }
}

/// The actions in command-line order (GNU getopt permutes operands, never options).
fn actions(args: &[String], granularity: Option<u64>) -> Vec<BitmapAction> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        i += 1;
        if a == "--" {
            break;
        }
        let (name, inline) = match a.strip_prefix("--") {
            Some(l) => match l.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (l, None),
            },
            None => {
                // A short option taking an argument consumes the next one when not attached.
                if matches!(a, "-f" | "-g" | "-b" | "-F") {
                    i += 1;
                }
                continue;
            }
        };
        match name {
            "add" => out.push(BitmapAction::Add {
                granularity,
                disabled: false,
            }),
            "remove" => out.push(BitmapAction::Remove),
            "clear" => out.push(BitmapAction::Clear),
            "enable" => out.push(BitmapAction::Enable),
            "disable" => out.push(BitmapAction::Disable),
            "merge" => {
                let source = match inline {
                    Some(v) => v.to_string(),
                    None => {
                        i += 1;
                        args.get(i - 1).cloned().unwrap_or_default()
                    }
                };
                out.push(BitmapAction::Merge { source });
            }
            "format" | "granularity" | "source-file" | "source-format" | "object"
                if inline.is_none() =>
            {
                i += 1
            }
            _ => {}
        }
    }
    out
}

/// qemu-img's `cvtnum("granularity", …)`.
fn granularity_arg(v: &str) -> Result<u64, String> {
    let range = || "Invalid granularity specified. Must be between 0 and 9223372036854775807.";
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => parse_size(v).ok(),
    };
    // A well-formed number that is negative or too large is out of range; anything else is
    // not a number.
    let number = v.trim_start_matches('-');
    let digits = number.trim_end_matches(|c: char| "bkmgtpeBKMGTPE".contains(c));
    let well_formed = number.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.');
    match parsed {
        Some(n) if n <= i64::MAX as u64 && !v.starts_with('-') => Ok(n),
        _ if well_formed => Err(range().into()),
        _ => Err(format!("Invalid granularity specified: '{v}'.")),
    }
}

/// qemu-img's words for an image that cannot be opened.
fn open_error(file: &str, e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => {
            format!(
                "Could not open '{file}': Could not open '{file}': {}",
                strerror(source)
            )
        }
        qcow2kit::Error::Locked { .. } => format!("Could not open '{file}': {e}"),
        other => format!("Could not open '{file}': {}", open_error_text(other)),
    }
}

/// The format of `file`: `format` when given, else probed (with qemu-img's warning for raw).
fn format_of(file: &str, format: Option<&str>) -> Result<Format, String> {
    match format {
        Some(f) => {
            parse_format(f).map_err(|_| format!("Could not open '{file}': Unknown driver '{f}'"))
        }
        None => {
            let f = probe_file(Path::new(file)).map_err(|e| open_error(file, &e))?;
            if f == Format::Raw {
                errln!(
                    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            Ok(f)
        }
    }
}

fn open_as(file: &str, format: Format, writable: bool) -> Result<Opened, String> {
    let mut o = qemu_options();
    o.writable = writable;
    open(Path::new(file), format, &o).map_err(|e| open_error(file, &e))
}

/// The source of a merge: read-only, its backing file not opened.
fn open_source(file: &str, format: Format) -> Result<Opened, String> {
    let mut o = qemu_options();
    o.backing = BackingPolicy::Ignore;
    open(Path::new(file), format, &o).map_err(|e| open_error(file, &e))
}

/// The file and format of an `--image-opts` specification (`driver=FMT,file.driver=file,
/// file.filename=PATH`).
fn image_opts(spec: &str) -> Result<(String, Format), String> {
    let mut path = None;
    let mut format = None;
    for (k, v) in crate::image_opts::split_opts(spec) {
        match k.as_str() {
            "driver" => format = Some(v),
            "file.filename" => path = Some(v),
            "file.driver" if v == "file" => {}
            _ => {
                return Err(format!(
                    "bitmap: --image-opts option '{k}={v}' is not supported"
                ))
            }
        }
    }
    let path =
        path.ok_or("Could not open: A block device must be specified for \"file\"".to_string())?;
    let format = format_of(&path, format.as_deref())?;
    Ok((path, format))
}

/// A generated node name of the form qemu-img prints.
fn node_name() -> String {
    format!("#block{}", 100 + std::process::id() % 900)
}

fn bitmap(args: &[String]) -> Result<(), String> {
    let p = match parse(args, SPECS) {
        Ok(p) => p,
        Err(e) => {
            errln!(
                "{} bitmap: {e}\nTry '{} bitmap --help' for more info",
                prog(),
                prog()
            );
            return Err(String::new());
        }
    };
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    let granularity = match p.last("g") {
        Some(v) => Some(granularity_arg(v)?),
        None => None,
    };
    // qemu-img passes the granularity on as 32 bits; 0 means its default.
    let acts = actions(
        args,
        granularity.filter(|&g| g != 0).map(|g| u64::from(g as u32)),
    );
    if acts.is_empty() {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        );
    }
    if granularity.is_some_and(|g| g != 0) && !p.has("add") {
        return Err("granularity only supported with --add".into());
    }
    if p.has("F") && !p.has("b") {
        return Err("-F only supported with -b".into());
    }
    if p.has("b") && !p.has("merge") {
        return Err("Merge bitmap source file only supported with --merge".into());
    }
    let [file, name] = p.operands.as_slice() else {
        return Err("Expecting filename and bitmap name".into());
    };
    if p.has("object") {
        return Err("bitmap: --object is not supported".into());
    }
    let (file, format) = if p.has("image-opts") {
        if p.has("f") {
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        image_opts(file)?
    } else {
        (file.clone(), format_of(file, p.last("f"))?)
    };
    let file = file.as_str();
    if format == Format::Raw {
        let first = &acts[0];
        return Err(format!(
            "Operation {} on bitmap {name} failed: Can't store persistent bitmaps to {}: \
             Operation not supported",
            first.name(),
            node_name()
        ));
    }
    let opened = open_as(file, format, true)?;
    let image = opened
        .qcow2
        .clone()
        .ok_or_else(|| format!("Could not open '{file}': not a qcow2 image"))?;
    let source = match p.last("b") {
        // As qemu-img, without its backing file (which may be the image being changed).
        Some(src) => Some(open_source(src, format_of(src, p.last("F"))?)?),
        None => None,
    };
    let source_image = source.as_ref().and_then(|s| s.qcow2.clone());
    let r = match (&source, &source_image) {
        // A source that is not qcow2 has no bitmaps.
        (Some(_), None) => acts
            .iter()
            .position(|a| matches!(a, BitmapAction::Merge { .. }))
            .map_or(Ok(()), |i| {
                let src = match &acts[i] {
                    BitmapAction::Merge { source } => source.clone(),
                    _ => String::new(),
                };
                run_actions(&image, name, &acts[..i], None).and_then(|()| {
                    Err(qcow2kit::ops::bitmap::ActionError {
                        index: i,
                        action: "merge",
                        error: qcow2kit::Error::InvalidArgument(format!(
                            "Dirty bitmap '{src}' not found"
                        )),
                    })
                })
            }),
        _ => run_actions(&image, name, &acts, source_image.as_deref()),
    };
    drop(source_image);
    drop(source);
    let closed = image.close();
    drop(image);
    drop(opened);
    if let Err(e) = r {
        let msg = match e.error {
            qcow2kit::Error::InvalidArgument(m) | qcow2kit::Error::Unsupported(m) => m,
            other => other.to_string(),
        };
        let persistent = format!("Can't make bitmap '{name}' persistent: ");
        let msg = match msg.strip_prefix(&persistent) {
            Some(rest) => format!(
                "Can't make bitmap '{name}' persistent in '{}': {rest}",
                node_name()
            ),
            None => msg,
        };
        return Err(format!(
            "Operation {} on bitmap {name} failed: {msg}",
            e.action
        ));
    }
    closed.map_err(|e| {
        format!(
            "Lost persistent bitmaps during inactivation of node '{}': {e}",
            node_name()
        )
    })
}
