//! `qcow2kit measure [--output human|json] [-O FMT] [-o OPTIONS] (--size SIZE | [-f FMT]
//! [-l SNAPSHOT] [-U] FILE)`: the size a new image needs, as qemu-img measure prints it.
//!
//! The source is read only through its allocation map. Target formats raw and qcow2; every
//! check and message in qemu-img's order and words.

use crate::common::{
    exit_code, image_format, open_error_text, parse_args, parse_size, prog, qemu_options,
};
use qcow2kit::chain::{open, Opened};
use qcow2kit::ops::measure::{
    is_valid_option_list, measure, CreationOptions, MeasureFormat, MeasureSource, Measurement,
};
use qcow2kit::SnapshotRef;
use std::path::Path;

const SPECS: &[crate::args::Spec] = &[
    crate::args::opt(Some('f'), None, true, "f"),
    crate::args::opt(Some('O'), None, true, "O"),
    crate::args::opt(Some('o'), None, true, "o"),
    crate::args::opt(Some('l'), None, true, "l"),
    crate::args::opt(Some('U'), Some("force-share"), false, "U"),
    crate::args::opt(None, Some("object"), true, "object"),
    crate::args::opt(None, Some("image-opts"), false, "image-opts"),
    crate::args::opt(None, Some("size"), true, "size"),
    crate::args::opt(None, Some("output"), true, "output"),
    crate::args::opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit measure [--output human|json] [-O FMT] [-o OPTIONS] \
                    (--size SIZE | [-f FMT] [-l SNAPSHOT] [-U] FILE)

Prints the size a new image of format FMT (default raw) needs: for SIZE bytes, or to hold a
converted copy of FILE, as qemu-img measure does.
";

/// Formats qemu-img knows that cannot be measured.
const UNMEASURABLE: &[&str] = &[
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "qed",
    "qcow",
    "parallels",
    "cloop",
    "dmg",
    "bochs",
];

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    exit_code(run_measure(args))
}

/// `--size`: qemu-img's `cvtnum` and its two messages.
fn image_size(s: &str) -> Result<u64, String> {
    let range = || {
        format!(
            "Invalid image size specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    if s.trim_start().starts_with('-') {
        return Err(range());
    }
    match parse_size(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) => Err(range()),
        Err(_) => Err(format!("Invalid image size specified: '{s}'.")),
    }
}

/// `-l`: a snapshot reference, refused in qemu-img's words.
fn snapshot_arg(s: &str) -> Result<SnapshotRef, String> {
    if s.starts_with("snapshot.") {
        if let Some(part) = s
            .split(',')
            .find(|p| !p.starts_with("snapshot.id=") && !p.starts_with("snapshot.name="))
        {
            let key = part.split_once('=').map_or(part, |(k, _)| k);
            errln!("{}: Invalid parameter '{key}'", prog());
            return Err(format!("Failed in parsing snapshot param '{s}'"));
        }
    }
    SnapshotRef::parse(s).map_err(|e| e.to_string())
}

fn run_measure(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "measure")?;
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    for o in p.all("o") {
        if !is_valid_option_list(o) {
            return Err(format!("Invalid option list: {o}"));
        }
    }
    let snapshot = p.last("l").map(snapshot_arg).transpose()?;
    let json = match p.last("output") {
        None | Some("human") => false,
        Some("json") => true,
        Some(o) => {
            return Err(format!(
                "--output expects 'human' or 'json' not '{o}'\n{}",
                crate::common::try_help("measure")
            ))
        }
    };
    let size = p.last("size").map(image_size).transpose()?;
    let mut secrets = Vec::new();
    for o in p.all("object") {
        let id = o
            .strip_prefix("secret,")
            .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("id=")));
        match id {
            Some(id) => secrets.push(id.to_string()),
            None => return Err(format!("measure: --object {o} is not supported")),
        }
    }
    let filename = match p.operands.as_slice() {
        [] => None,
        [f] => Some(f.as_str()),
        _ => return Err("At most one filename argument is allowed.".into()),
    };
    if filename.is_none() && (p.has("image-opts") || p.has("f") || p.has("l")) {
        return Err("--image-opts, -f, and -l require a filename argument.".into());
    }
    if filename.is_some() && size.is_some() {
        return Err("--size N cannot be used together with a filename.".into());
    }
    if filename.is_none() && size.is_none() {
        return Err("Either --size N or one filename must be specified.".into());
    }
    if p.has("image-opts") {
        return Err("measure: --image-opts is not supported".into());
    }
    let opened = match filename {
        Some(f) => Some(open_source(f, p.last("f"), snapshot, p.has("U"))?),
        None => None,
    };
    let out_fmt = p.last("O").unwrap_or("raw");
    let format = match out_fmt {
        "raw" => MeasureFormat::Raw,
        "qcow2" => MeasureFormat::Qcow2,
        f if UNMEASURABLE.contains(&f) => {
            return Err(format!(
                "Block driver '{f}' does not support size measurement"
            ))
        }
        f => return Err(format!("Unknown file format '{f}'")),
    };
    let mut opts = CreationOptions::new(format);
    opts.set_secrets(secrets);
    let all = p.all("o").join(",");
    if !all.is_empty() {
        opts.add(&all, |v| parse_size(v).ok()).map_err(|e| {
            errln!("{}: {}", prog(), text(e));
            format!("Invalid options for file format '{out_fmt}'")
        })?;
    }
    let source = opened.as_ref().map(|o| MeasureSource {
        device: o.device.as_ref(),
        bitmaps: o
            .qcow2
            .as_ref()
            .filter(|q| q.header().version >= 3)
            .map(|q| q.bitmaps()),
        data_files: o
            .layers
            .iter()
            .map(|l| {
                l.qcow2
                    .as_ref()
                    .filter(|q| !q.has_data_file())
                    .map(|q| q.storage().clone())
            })
            .collect(),
    });
    let m = measure(format, &opts, size, source.as_ref()).map_err(text)?;
    out!("{}", render(&m, json));
    Ok(())
}

/// Opens the source read-only as qemu-img measure does, its failures in qemu-img's words.
fn open_source(
    path: &str,
    format: Option<&str>,
    snapshot: Option<SnapshotRef>,
    force_share: bool,
) -> Result<Opened, String> {
    if let Err(e) = std::fs::File::open(path) {
        return Err(format!(
            "Could not open '{path}': Could not open '{path}': {}",
            qcow2kit::error::strerror(&e)
        ));
    }
    let fmt = image_format(path, format)?;
    let mut opts = qemu_options();
    opts.snapshot = snapshot;
    opts.locking = crate::common::locking(force_share);
    open(Path::new(path), fmt, &opts).map_err(|e| match e {
        qcow2kit::Error::SnapshotNotFound(_) => {
            "Failed to load snapshot: Can't find snapshot".to_string()
        }
        e => format!("Could not open '{path}': {}", open_error_text(&e)),
    })
}

/// A library error in qemu-img's words.
fn text(e: qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

/// The figures as qemu-img prints them.
fn render(m: &Measurement, json: bool) -> String {
    if json {
        // QEMU's JSON output writes the figures as signed 64-bit integers.
        let mut s = String::from("{\n");
        if let Some(b) = m.bitmaps {
            s.push_str(&format!("    \"bitmaps\": {},\n", b as i64));
        }
        s.push_str(&format!(
            "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
            m.required as i64, m.fully_allocated as i64
        ));
        s
    } else {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            m.required, m.fully_allocated
        );
        if let Some(b) = m.bitmaps {
            s.push_str(&format!("bitmaps size: {b}\n"));
        }
        s
    }
}
