//! `qcow2kit resize [-f FMT] [--shrink] [--preallocation MODE] [-q] FILE [+|-]SIZE`: what
//! qemu-img resize does.
//!
//! As in qemu-img, the size is taken from the last argument before options are parsed (so
//! `FILE -1G` works without `--`); `+SIZE`/`-SIZE` are relative to the current virtual size.
//! A result that is not positive, or smaller than the current size without `--shrink`, is
//! refused with qemu-img's messages. qcow2 images are resized by [`Qcow2Image::resize`] (the
//! size must be a multiple of 512 bytes), or grown with preallocation by
//! [`Qcow2Image::resize_preallocated`]; raw images by changing the file's length (any length;
//! `--preallocation=falloc|full` writes zeros over the new range).
//!
//! An external data file is resized with the image, as QEMU does (by the library).
//!
//! [`Qcow2Image::resize`]: qcow2kit::Qcow2Image::resize
//! [`Qcow2Image::resize_preallocated`]: qcow2kit::Qcow2Image::resize_preallocated

use crate::args::{opt, Spec};
use crate::common::{fail, parse_format, parse_size, try_help};
use qcow2kit::chain::{open, probe_file, FileRole, Locking, OpenOptions};
use qcow2kit::error::{strerror, Corruption};
use qcow2kit::io::lock::{acquire, Permissions};
use qcow2kit::ops::create::Preallocation;
use qcow2kit::ops::resize::{resize as resize_image, ResizeOptions};
use qcow2kit::Format;
use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

const EIO: i32 = 5;
const EINVAL: i32 = 22;

const SPECS: &[Spec] = &[
    opt(Some('f'), None, true, "f"),
    opt(Some('q'), None, false, "q"),
    opt(None, Some("shrink"), false, "shrink"),
    opt(None, Some("preallocation"), true, "preallocation"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str =
    "usage: qcow2kit resize [-f FMT] [--shrink] [--preallocation MODE] [-q] FILE [+|-]SIZE

Changes the virtual size of an image as qemu-img resize does.
";

const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
and exabytes, respectively.";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    match resize(args) {
        Ok(()) => 0,
        Err(msg) if msg.is_empty() => 1,
        Err(msg) => fail(msg),
    }
}

fn lib_error(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => strerror(source),
        qcow2kit::Error::Corrupt(Corruption::RefblockDiscard {
            corrupt, bad_count, ..
        }) => {
            // QEMU's block layer logs the corruption, then qemu-img the failure.
            if let Some(m) = corrupt {
                errln!(
                    "qcow2: Marking image as corrupt: {m}; further corruption events will be \
                     suppressed"
                );
            }
            let errno = if *bad_count { EINVAL } else { EIO };
            format!(
                "Failed to discard unused refblocks: {}",
                strerror(&std::io::Error::from_raw_os_error(errno))
            )
        }
        // QEMU's refusals are its messages alone.
        qcow2kit::Error::Unsupported(m) | qcow2kit::Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

fn resize(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        out!("{HELP}");
        return Ok(());
    }
    // The size is the last argument, taken before option parsing (negative sizes).
    let Some((size_arg, rest)) = args.split_last() else {
        return Err(format!(
            "Expecting image file name and size\n{}",
            try_help("resize")
        ));
    };
    let p = crate::common::parse_args(rest, SPECS, "resize")?;
    let file = match p.operands.as_slice() {
        [f] => f.as_str(),
        [] => {
            return Err(format!(
                "Expecting image file name and size\n{}",
                try_help("resize")
            ))
        }
        _ => {
            return Err(format!(
                "Extra argument(s) in command line\n{}",
                try_help("resize")
            ))
        }
    };
    let arg = crate::common::image_operand(&p, file, p.last("f"))?;
    let prealloc = match p.last("preallocation").unwrap_or("off") {
        m @ ("off" | "metadata" | "falloc" | "full") => m,
        other => return Err(format!("Invalid preallocation mode '{other}'")),
    };
    let (relative, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = parse_size(digits).map_err(|_| {
        format!("Parameter 'size' expects a non-negative number below 2^64\n{SIZE_HINT}")
    })?;

    let path = Path::new(&arg.path);
    let could_not_open = |e: &qcow2kit::Error| match e {
        qcow2kit::Error::Locked { .. } => format!("Could not open '{file}': {e}"),
        _ => format!(
            "Could not open '{file}': Could not open '{file}': {}",
            lib_error(e)
        ),
    };
    let format = match arg.format.as_deref() {
        Some(f) => parse_format(f)?,
        None => {
            let f = probe_file(path).map_err(|e| could_not_open(&e))?;
            if f == Format::Raw {
                errln!(
                    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            f
        }
    };

    let quiet = p.has("q");
    let shrink = p.has("shrink");
    match format {
        Format::Qcow2 => {
            let mut opts = OpenOptions {
                writable: true,
                ..crate::common::qemu_options()
            };
            arg.apply(&mut opts);
            let opened = open(path, format, &opts).map_err(|e| could_not_open(&e))?;
            let current = opened.device.size();
            let total = new_size(current, n, relative, prealloc, shrink)?;
            if total % 512 != 0 {
                return Err("The new size must be a multiple of 512".into());
            }
            let how = ResizeOptions {
                shrink,
                preallocation: Preallocation::from_name(prealloc).map_err(|e| lib_error(&e))?,
            };
            resize_image(&opened, total, &how).map_err(|e| lib_error(&e))?;
            opened.close().map_err(|e| lib_error(&e))?;
        }
        Format::Raw => {
            let f = FileOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| {
                    format!(
                        "Could not open '{file}': Could not open '{file}': {}",
                        strerror(&e)
                    )
                })?;
            // A raw image shares everything with its other users, but not with a qcow2 image
            // whose data file it is (that one refuses resizes).
            if let Some(mut lock) = Locking::Qemu.request(FileRole::Raw, true) {
                lock.uses |= Permissions::RESIZE;
                acquire(&f, path, lock).map_err(|e| format!("Could not open '{file}': {e}"))?;
            }
            let len = f
                .metadata()
                .map_err(|e| format!("Failed to inquire current image length: {}", strerror(&e)))?
                .len();
            // QEMU counts whole sectors: a 1000-byte raw file is a 1024-byte disk.
            let current = len.next_multiple_of(512);
            let total = new_size(current, n, relative, prealloc, shrink)?;
            let io = |e: std::io::Error| format!("Could not resize file: {}", strerror(&e));
            match prealloc {
                "off" => f.set_len(total).map_err(io)?,
                "falloc" | "full" => {
                    // No fallocate binding: the new range is allocated by writing zeros.
                    let zeros = vec![0u8; 1 << 20];
                    let mut pos = len;
                    while pos < total {
                        let k = (total - pos).min(zeros.len() as u64) as usize;
                        f.write_all_at(&zeros[..k], pos).map_err(io)?;
                        pos += k as u64;
                    }
                    f.set_len(total).map_err(io)?;
                }
                _ => return Err(format!("Unsupported preallocation mode: {prealloc}")),
            }
            f.sync_all().map_err(io)?;
        }
        other => return Err(format!("Unknown file format '{other}'")),
    }
    if !quiet {
        outln!("Image resized.");
    }
    Ok(())
}

/// The new size and qemu-img's checks on it.
fn new_size(
    current: u64,
    n: u64,
    relative: i128,
    prealloc: &str,
    shrink: bool,
) -> Result<u64, String> {
    let total = if relative == 0 {
        n as i128
    } else {
        current as i128 + relative * n as i128
    };
    if total <= 0 {
        return Err("New image size must be positive".into());
    }
    if total > i64::MAX as i128 {
        return Err("New image size is too large".into());
    }
    let total = total as u64;
    if total <= current && prealloc != "off" {
        return Err("Preallocation can only be used for growing images".into());
    }
    if current > total && !shrink {
        return Err("Use the --shrink option to perform a shrink operation.\n\
                    qcow2kit: warning: Shrinking an image will delete all data beyond the \
                    shrunken image's end. Before performing such an operation, make sure there \
                    is no important data there."
            .into());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(new_size(1 << 20, 1 << 20, 1, "off", false), Ok(2 << 20));
        assert_eq!(new_size(2 << 20, 1 << 20, -1, "off", true), Ok(1 << 20));
        assert!(new_size(2 << 20, 1 << 20, -1, "off", false)
            .unwrap_err()
            .starts_with("Use the --shrink"));
        assert!(new_size(1 << 20, 1 << 20, -1, "off", true)
            .unwrap_err()
            .contains("positive"));
        assert!(new_size(1 << 20, 1 << 20, 0, "full", false)
            .unwrap_err()
            .contains("growing"));
    }
}
