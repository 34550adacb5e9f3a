//! Helpers shared by the subcommands: error printing, size parsing, opening images as qemu-img.

use qcow2kit::chain::{open, probe_file, Locking, OpenOptions, Opened};
use qcow2kit::Format;
use std::path::Path;

/// qemu-img's open policy ([`OpenOptions::qemu_compatible`]), with corruption found while an
/// image is in use printed as QEMU prints it (`qcow2: Marking image as corrupt: …`).
pub fn qemu_options() -> OpenOptions {
    let mut o = OpenOptions::qemu_compatible();
    o.qcow2.on_corruption = Some(qcow2kit::engine::CorruptionReporter::stderr());
    o
}

pub use crate::qemu_errors::open_error_text;

/// The program's name as invoked (the last part of `argv[0]`), which starts every error
/// message as in QEMU's tools: `qemu-img` when qcow2kit stands in under that name.
pub fn prog() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "qcow2kit".to_string())
    })
}

/// qemu-img's hint after a usage error of subcommand `sub`.
pub fn try_help(sub: &str) -> String {
    format!("Try '{} {sub} --help' for more info", prog())
}

/// Parses `args` for subcommand `sub`; an unknown or malformed option is printed in getopt's
/// words with qemu-img's hint, and comes back as `Err` of an empty message (see [`exit_code`]).
pub fn parse_args(
    args: &[String],
    specs: &[crate::args::Spec],
    sub: &str,
) -> Result<crate::args::Parsed, String> {
    crate::args::parse(args, specs).map_err(|e| {
        errln!("{} {sub}: {e}\n{}", prog(), try_help(sub));
        String::new()
    })
}

/// The exit code of a subcommand's result: 0, or 1 with the message printed as [`fail`] does
/// (an empty message: already printed).
pub fn exit_code(r: Result<(), String>) -> u8 {
    match r {
        Ok(()) => 0,
        Err(msg) if msg.is_empty() => 1,
        Err(msg) => fail(msg),
    }
}

/// Prints `PROG: MSG` to stderr (PROG as [`prog`] gives it) and returns exit code 1.
pub fn fail(msg: impl std::fmt::Display) -> u8 {
    errln!("{}: {msg}", crate::common::prog());
    1
}

/// Parses a size with an optional k/M/G/T/P/E suffix (binary units; `b` or none: bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(format!("invalid size suffix in '{s}'")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size '{s}' is too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    if f.is_nan() || f < 0.0 || f * mult as f64 >= u64::MAX as f64 {
        return Err(format!("invalid size '{s}'"));
    }
    Ok((f * mult as f64) as u64)
}

/// Parses a `-f`/`-O` format name.
pub fn parse_format(name: &str) -> Result<Format, String> {
    Format::openable(name.as_bytes()).map_err(|_| format!("Unknown file format '{name}'"))
}

/// The locking of a read-only open: `-U`/`--force-share` shares everything.
pub fn locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::Qemu
    }
}

/// The format of the image at `path`: `format` when given, else probed as qemu-img does.
pub fn image_format(path: &str, format: Option<&str>) -> Result<Format, String> {
    format_named(path, format, path)
}

/// [`image_format`] with errors naming the operand as `shown`.
fn format_named(path: &str, format: Option<&str>, shown: &str) -> Result<Format, String> {
    match format {
        // qemu-img's block layer: an input format is a driver name.
        Some(f) => {
            parse_format(f).map_err(|_| format!("Could not open '{shown}': Unknown driver '{f}'"))
        }
        None => probe_file(Path::new(path))
            .map_err(|e| format!("Could not open '{shown}': {}", open_error_text(&e))),
    }
}

/// qemu-img's warning when a probe guessed raw for an image opened for writing.
pub fn warn_probed_raw(file: &str) {
    errln!(
        "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions."
    );
}

/// Opens `path` the way qemu-img does: the given format or a probe, backing chains followed
/// relative to the image, data files allowed; a `json:{…}` name as its options describe it.
pub fn open_image(
    path: &str,
    format: Option<&str>,
    customize: impl FnOnce(&mut OpenOptions),
) -> Result<Opened, String> {
    let no_secrets = qcow2kit::crypto::secret::Secrets::new();
    let arg = crate::image_opts::image_arg(path, false, format, &no_secrets)
        .map_err(|e| format!("Could not open '{path}': {e}"))?;
    open_image_arg(&arg, path, customize)
}

/// [`open_image`] of an image operand with its keys; errors name the operand as `shown`
/// (the file name, or the `--image-opts` string as qemu-img shows it).
pub fn open_image_arg(
    arg: &crate::image_opts::ImageArg,
    shown: &str,
    customize: impl FnOnce(&mut OpenOptions),
) -> Result<Opened, String> {
    let fmt = format_named(&arg.path, arg.format.as_deref(), shown)?;
    let mut opts = qemu_options();
    arg.apply(&mut opts);
    customize(&mut opts);
    if arg.no_backing {
        opts.backing = qcow2kit::BackingPolicy::Ignore;
    }
    let opened = open(Path::new(&arg.path), fmt, &opts)
        .map_err(|e| format!("Could not open '{shown}': {}", open_error_text(&e)))?;
    let checked = crate::image_opts::check_backing(arg, &opened);
    match checked {
        Ok(()) => Ok(opened),
        Err(e) => {
            if let Some(q) = &opened.qcow2 {
                let _ = q.close();
            }
            Err(format!("Could not open '{shown}': {e}"))
        }
    }
}

/// The image operand `name` of a command with `--object` and `--image-opts` options (`format`
/// from `-f`).
pub fn image_operand(
    p: &crate::args::Parsed,
    name: &str,
    format: Option<&str>,
) -> Result<crate::image_opts::ImageArg, String> {
    let mut arg = image_operand_for_info(p, name, format)?;
    match arg.secret_error.take() {
        Some(e) => Err(format!("Could not open '{name}': {e}")),
        None => Ok(arg),
    }
}

/// [`image_operand`] that keeps an unknown key secret in [`crate::image_opts::ImageArg::secret_error`]
/// (qemu-img info does not look keys up).
pub fn image_operand_for_info(
    p: &crate::args::Parsed,
    name: &str,
    format: Option<&str>,
) -> Result<crate::image_opts::ImageArg, String> {
    let secrets = crate::image_opts::load_secrets(p.all("object").iter().map(|s| s.as_str()))?;
    crate::image_opts::image_arg(name, p.has("image-opts"), format, &secrets).map_err(|e| {
        if e.contains("mutually exclusive") {
            e
        } else {
            format!("Could not open '{name}': {e}")
        }
    })
}

/// qemu-img info's open ([`qcow2kit::ops::info::open_for_info`]); an NBD URI is opened
/// read-only without the files its image names (the server does the locking).
pub fn open_for_info(
    path: &Path,
    format: Format,
    locking: Locking,
    key: &qcow2kit::engine::EncryptionOptions,
) -> qcow2kit::Result<Opened> {
    use std::os::unix::ffi::OsStrExt;
    if qcow2kit::nbd::NbdAddress::is_uri(path.as_os_str().as_bytes()) {
        let opts = OpenOptions {
            backing: qcow2kit::BackingPolicy::Ignore,
            ..OpenOptions::default()
        };
        return open(path, format, &opts);
    }
    qcow2kit::ops::info::open_for_info_with_key(path, format, locking, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("12q").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
