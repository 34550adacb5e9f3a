//! `qcow2kit dd [-f FMT | --image-opts] [-O OUTPUT_FMT] [-U] [bs=SIZE] [count=N] [skip=N]
//! if=INPUT of=OUTPUT`: what qemu-img dd does. OUTPUT is created (raw by default, or qcow2)
//! with the size of what is copied: the input from block `skip` on, `count` blocks of `bs`
//! bytes at most (the size rounded up to whole sectors, as QEMU's drivers round it), then the
//! input is copied into it block by block, every block written (zeros included), as by
//! qemu-img. A `skip` past the end of the input is reported and leaves OUTPUT empty, with exit
//! status 0, as in qemu-img.
//!
//! Numbers as qemu-img takes them: `bs` in qemu's size syntax (`4k`, `0x200`), 1 to
//! 2147483647; `count` and `skip` as C integers (`010` is octal), 0 to 2^63 − 1.
//!
//! Not covered: `--object`; output formats other than raw and qcow2.

use crate::args::{opt, Spec};
use crate::common::{exit_code, open_error_text, open_image, parse_args, prog};
use qcow2kit::chain::{open, Locking};
use qcow2kit::ops::create::{create_qcow2, create_raw, CreateOptions, Preallocation};
use qcow2kit::BlockDevice;
use qcow2kit::Format;
use std::path::Path;
use std::sync::Arc;

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('O'), Some("output-format"), true, "O"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
];

const HELP: &str = "Usage:
Copy input to output with optional format conversion.  Usage:

  qcow2kit dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT
";

/// QEMU's image formats qcow2kit cannot write (named, so that they are not "unknown").
const OTHER_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Most bytes copied in one read and write: whole blocks, at least one.
const CHUNK: u64 = 1 << 20;

/// The operands, as given.
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    exit_code(dd(args))
}

fn dd(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "dd")?;
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    if p.has("image-opts") && p.has("f") {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    if p.has("object") {
        return Err("dd: --object is not supported".into());
    }
    let ops = operands(&p.operands)?;
    let (Some(input), Some(output)) = (&ops.input, &ops.output) else {
        return Err("Must specify both input and output files".into());
    };
    let src: Arc<dyn BlockDevice> = if p.has("image-opts") {
        crate::io::open_image_opts(input, p.has("U"))
            .map_err(|e| format!("Could not open '{input}': {e}"))?
    } else {
        open_image(input, p.last("f"), |o| {
            o.locking = crate::common::locking(p.has("U"));
        })?
        .device
    };
    let out_fmt = p.last("O").unwrap_or("raw");
    let format = match Format::openable(out_fmt.as_bytes()) {
        Ok(f) => f,
        Err(_) if OTHER_FORMATS.contains(&out_fmt) => {
            return Err(format!("dd: output format '{out_fmt}' is not supported"))
        }
        Err(_) => return Err("Unknown file format".into()),
    };
    let size = src.size();
    let bs = ops.bs;
    let end = match ops.count.and_then(|c| c.checked_mul(bs)) {
        Some(n) if n < size => n,
        _ => size,
    };
    let start = ops.skip.map_or(Some(0), |s| s.checked_mul(bs));
    let start = match start {
        Some(s) if s <= end => s,
        _ => {
            create(output, format, 0)?;
            errln!("{}: {input}: cannot skip to specified offset", prog());
            return Ok(());
        }
    };
    let dst = create(output, format, end - start)?;
    copy(src.as_ref(), dst.as_ref(), start, end, bs)?;
    dst.flush()
        .map_err(|e| format!("error while writing to output image file: {e}"))
}

/// Parses `key=value` operands as qemu-img dd does (the last of a key counts).
fn operands(args: &[String]) -> Result<Operands, String> {
    let mut o = Operands {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for a in args {
        let unknown = || format!("unrecognized operand {a}");
        let (k, v) = a.split_once('=').ok_or_else(unknown)?;
        match k {
            "bs" => o.bs = block_size(v)?,
            "count" => o.count = Some(blocks("count", v)?),
            "skip" => o.skip = Some(blocks("skip", v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    Ok(o)
}

/// `bs=`: a size in qemu's syntax, 1..=INT_MAX.
fn block_size(v: &str) -> Result<u64, String> {
    let n = crate::io::strtosz(v).map_err(|_| format!("Invalid bs specified: '{v}'."))?;
    if !(1..=i32::MAX as u64).contains(&n) {
        return Err(format!(
            "Invalid bs specified. Must be between 1 and {}.",
            i32::MAX
        ));
    }
    Ok(n)
}

/// `count=`, `skip=`: a C integer (`strtoll` base 0) in 0..=INT64_MAX.
fn blocks(name: &str, v: &str) -> Result<u64, String> {
    let range = || {
        format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    match crate::io::strtoll0(v) {
        Ok(n) => u64::try_from(n).map_err(|_| range()),
        Err(crate::io::NumError::Range) => Err(range()),
        Err(crate::io::NumError::Invalid) => Err(format!("Invalid {name} specified: '{v}'.")),
    }
}

/// Creates OUTPUT as `format` with `size` bytes (rounded up to whole sectors) and opens it.
fn create(path: &str, format: Format, size: u64) -> Result<Arc<dyn BlockDevice>, String> {
    let p = Path::new(path);
    let size = size.div_ceil(512).saturating_mul(512);
    let created = match format {
        Format::Qcow2 => create_qcow2(
            p,
            &CreateOptions {
                size: Some(size),
                ..CreateOptions::default()
            },
        ),
        _ => create_raw(p, size, Preallocation::Off),
    };
    created.map_err(|e| {
        format!(
            "{path}: error while creating output image: {}",
            create_error(path, &e)
        )
    })?;
    let mut opts = crate::common::qemu_options();
    opts.writable = true;
    opts.locking = Locking::Qemu;
    open(p, format, &opts)
        .map(|o| o.device)
        .map_err(|e| format!("Could not open '{path}': {}", open_error_text(&e)))
}

/// QEMU's words for a failed creation of `path`.
fn create_error(path: &str, e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => format!(
            "Could not create '{path}': {}",
            qcow2kit::error::strerror(source)
        ),
        other => other.to_string(),
    }
}

/// Copies the input's bytes `start..end` to the output's offset 0 on, whole blocks of `bs`
/// bytes at a time (the last one short).
fn copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    start: u64,
    end: u64,
    bs: u64,
) -> Result<(), String> {
    let chunk = (CHUNK / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk.min(end - start) as usize];
    let mut pos = start;
    while pos < end {
        let n = chunk.min(end - pos) as usize;
        src.read_at(&mut buf[..n], pos).map_err(|e| {
            format!(
                "error while reading from input image file: {}",
                lib_errno_text(&e)
            )
        })?;
        dst.write_at(&buf[..n], pos - start).map_err(|e| {
            format!(
                "error while writing to output image file: {}",
                lib_errno_text(&e)
            )
        })?;
        pos += n as u64;
    }
    Ok(())
}

/// The `strerror` text of a library I/O error, or the error itself.
fn lib_errno_text(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => qcow2kit::error::strerror(source),
        other => other.to_string(),
    }
}
