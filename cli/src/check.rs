//! `qcow2kit check [-f FMT] [--output human|json] [-r leaks|all] [-q] [-U] [-T CACHE]
//! [--object secret,id=ID,...] [--image-opts] FILE`: what qemu-img check prints and returns.
//!
//! Exit codes as qemu-img: 0 clean, 2 corruptions, 3 leaks only, 1 the check could not be
//! done (or found internal errors), 63 the format has no check (raw). Standard output is
//! qemu-img's report (human, or JSON with QEMU's key order and layout); the lines describing
//! each problem go to standard error, worded as qemu-img words them.
//!
//! With `-r leaks|all` the image is opened for writing and repaired as qemu-img repairs it
//! (`ops::check::repair`); when something was fixed, qemu-img's "The following inconsistencies
//! were found and repaired" block is printed and the image checked again, whose report (with
//! the fixed counts) and exit code are the result. As qemu-img does, the check first
//! opens what the image names — its backing chain and external data file — and fails if they
//! are missing, and an encrypted image needs `--image-opts …,encrypt.key-secret=ID` with a
//! matching `--object secret,id=ID,…` (the key is not needed for the metadata check, so it is
//! not verified). Without `-f`, a file carrying the signatures of several formats (a polyglot,
//! see `ops::inspect`) is refused rather than probed.

use crate::args::{opt, Spec};
use crate::common::fail;
use crate::image_opts::{image_arg, load_secrets};
use crate::qjson::{qdict, write_json};
use qcow2kit::chain::{open, probe_file, resolve_relative, FileRole, Locking, OpenOptions, Opened};
use qcow2kit::error::strerror;
use qcow2kit::format::header::CryptMethod;
use qcow2kit::io::lock::lock_error;
use qcow2kit::io::{FileStorage, Storage};
use qcow2kit::ops::check::{CheckReport, Checker, Finding, RepairMode};
use qcow2kit::Format;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SPECS: &[Spec] = &[
    opt(Some('f'), Some("format"), true, "f"),
    opt(None, Some("output"), true, "output"),
    opt(Some('r'), Some("repair"), true, "r"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(Some('T'), Some("cache"), true, "T"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit check [-f FMT | --image-opts] [-T CACHE_MODE] [-r leaks|all]
        [--output human|json] [--object OBJDEF] [-q] [-U] FILENAME

Checks the consistency of a qcow2 image's metadata, as qemu-img check does; -r leaks frees
leaked clusters, -r all also repairs corruptions (refcounts, COPIED flags, a broken refcount
structure is rebuilt). Exit status (after a repair: of the check that follows it): 0 clean,
2 corruptions, 3 leaked clusters only, 1 the check failed, 63 the format has no check.
";

/// qemu-img's exit code when the format has no check.
const NO_CHECKS: u8 = 63;

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match crate::common::parse_args(args, SPECS, "check") {
        Ok(p) => p,
        Err(_) => return 1,
    };
    if p.has("help") {
        out!("{HELP}");
        return 0;
    }
    let json = match p.last("output").unwrap_or("human") {
        "human" => false,
        "json" => true,
        other => return usage_error(format!("--output expects 'human' or 'json' not '{other}'")),
    };
    let repair = match p.last("r") {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(other) => {
            return usage_error(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{other}'"
            ))
        }
    };
    let [name] = p.operands.as_slice() else {
        return usage_error("Expecting one image file name");
    };
    let could_not_open =
        |msg: &dyn std::fmt::Display| fail(format!("Could not open '{name}': {msg}"));
    if repair.is_some() && p.has("U") {
        return could_not_open(&"force-share=on can only be used with read-only images");
    }
    let secrets = match load_secrets(p.all("object").iter().map(|s| s.as_str())) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // The file and its format: a plain name with -f or a probe, or --image-opts.
    let arg = match image_arg(name, p.has("image-opts"), p.last("f"), &secrets) {
        Ok(a) if a.secret_error.is_some() => {
            return could_not_open(&a.secret_error.unwrap_or_default())
        }
        Ok(a) => a,
        Err(e) if e.contains("mutually exclusive") => return fail(e),
        Err(e) => return could_not_open(&e),
    };
    let (path, format) = (PathBuf::from(&arg.path), arg.format.clone());
    let is_nbd = qcow2kit::nbd::NbdAddress::is_uri(path.as_os_str().as_encoded_bytes());
    if let Err(e) = usable_file(&path).or_else(|e| if is_nbd { Ok(()) } else { Err(e) }) {
        return could_not_open(&format!("Could not open '{}': {e}", path.display()));
    }
    let format = match format.as_deref() {
        Some("qcow2") => Format::Qcow2,
        Some("raw") => Format::Raw,
        Some(other) => return fail(format!("Unknown file format '{other}'")),
        None => {
            // Probing refuses a polyglot (signatures of several formats) rather than guess.
            match probe_file(&path) {
                Ok(f) => f,
                Err(e) => return could_not_open(&e),
            }
        }
    };
    if format == Format::Raw {
        return fail_with("This image format does not support checks", NO_CHECKS);
    }
    let writable = repair.is_some();
    let locking = crate::common::locking(p.has("U"));
    let nbd = match qcow2kit::nbd::open_uri(&path, writable) {
        Ok(n) => n,
        Err(e) => return could_not_open(&crate::common::open_error_text(&e)),
    };
    let storage: Arc<dyn Storage> = match nbd {
        Some((s, _)) => s,
        None => match FileStorage::open_with(
            &path,
            writable,
            locking.request(FileRole::Qcow2, writable),
        ) {
            Ok(s) => Arc::new(s),
            Err(e) if lock_error(&e).is_some() => return could_not_open(&strerror(&e)),
            Err(e) => {
                return could_not_open(&format!(
                    "Could not open '{}': {}",
                    path.display(),
                    strerror(&e)
                ))
            }
        },
    };
    let checker = match Checker::new(&*storage) {
        Ok(c) => c,
        Err(e) => return could_not_open(&crate::common::open_error_text(&e)),
    };

    // What qemu-img opens before it checks.
    if checker.header().crypt_method != CryptMethod::None {
        if let Err(e) = unlock(&path, &arg.encryption) {
            return could_not_open(&crate::common::open_error_text(&e));
        }
    }
    // The data file and backing chain stay open (locked) until the check ends, as in qemu-img.
    let mut _data_file = None;
    let mut _backing = None;
    if checker.header().has_data_file() {
        let Some(data) = checker.extensions().data_file.clone() else {
            return could_not_open(&"'data-file' is required for this image");
        };
        let shown = String::from_utf8_lossy(&data).into_owned();
        let opened = resolve_relative(&path, &data)
            .map_err(|e| e.to_string())
            .and_then(|d| usable_file(&d).map(|()| d));
        let dpath = match opened {
            Ok(d) => d,
            Err(e) => return could_not_open(&format!("Could not open '{shown}': {e}")),
        };
        let lock = locking.request(FileRole::DataFile, writable);
        match FileStorage::open_with(&dpath, writable, lock) {
            Ok(s) => _data_file = Some(s),
            Err(e) if lock_error(&e).is_some() => return could_not_open(&strerror(&e)),
            Err(e) => {
                return could_not_open(&format!("Could not open '{shown}': {}", strerror(&e)))
            }
        }
    }
    if let Some(backing) = checker.backing_file_name().map(<[u8]>::to_vec) {
        match open_backing(
            &path,
            &backing,
            checker.extensions().backing_format.as_deref(),
            locking,
        ) {
            Ok(chain) => _backing = Some(chain),
            Err(e) => return could_not_open(&format!("Could not open backing file: {e}")),
        }
    }

    let stderr = std::io::stderr();
    let mut err = std::io::BufWriter::new(stderr.lock());
    let mut print = |f: &Finding| {
        let prefix = if f.is_error_report() {
            format!("{}: ", crate::common::prog())
        } else {
            String::new()
        };
        let _ = writeln!(err, "{prefix}{f}");
    };
    let mut preamble = String::new();
    let result = match repair {
        None => checker.run(&mut print),
        Some(mode) => match checker.repair(mode, &mut print) {
            Ok(r) if r.fixed_anything() && r.report.failure.is_none() => {
                // qemu-img reports the repair, then checks the fixed image again.
                if !json {
                    preamble = format!(
                        "The following inconsistencies were found and repaired:\n\n    {} \
                         leaked clusters\n    {} corruptions\n\nDouble checking the fixed \
                         image now...\n",
                        r.report.leaks_fixed, r.report.corruptions_fixed
                    );
                }
                let again = Checker::new(&*storage).and_then(|c| c.run(&mut print));
                again.map(|mut c| {
                    c.leaks_fixed = r.report.leaks_fixed;
                    c.corruptions_fixed = r.report.corruptions_fixed;
                    c
                })
            }
            Ok(r) => Ok(r.report),
            Err(e) => Err(e),
        },
    };
    let _ = err.flush();
    drop(err);
    if !preamble.is_empty() && !p.has("q") {
        crate::stdio::print_out(&preamble);
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(format!("Check failed: {e}")),
    };
    if let Some(f) = &report.failure {
        return fail(format!("Check failed: {}", f.qemu_message()));
    }

    if !p.has("q") {
        let out = if json {
            let mut s = String::new();
            write_json(&mut s, &json_report(&report, name), 0);
            s.push('\n');
            s
        } else {
            human_report(&report)
        };
        crate::stdio::print_out(&out);
    }
    if report.check_errors > 0 {
        return fail("Check failed");
    }
    report.exit_code()
}

/// An argument error, followed by qemu-img's pointer to the help.
fn usage_error(msg: impl std::fmt::Display) -> u8 {
    errln!(
        "{p}: {msg}\nTry '{p} check --help' for more info",
        p = crate::common::prog()
    );
    1
}

fn fail_with(msg: &str, code: u8) -> u8 {
    errln!("{}: {msg}", crate::common::prog());
    code
}

/// Refuses what qemu's file driver refuses, before opening (a FIFO would block `open`).
fn usable_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| strerror(&e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err("not a regular file or block device".into());
    }
    std::fs::File::open(path).map_err(|e| strerror(&e))?;
    Ok(())
}

/// Opens the encrypted image at `path` with `key` once, as qemu-img does before it checks (the
/// check itself does not decrypt anything).
fn unlock(path: &Path, key: &qcow2kit::engine::EncryptionOptions) -> qcow2kit::Result<()> {
    let storage = FileStorage::open_with(path, false, None)
        .map_err(|e| qcow2kit::Error::io(format!("opening '{}'", path.display()), e))?;
    let opts = qcow2kit::engine::Qcow2Options {
        encryption: key.clone(),
        ..Default::default()
    };
    qcow2kit::engine::Qcow2Image::open(std::sync::Arc::new(storage), &opts).map(drop)
}

/// Opens the backing chain as qemu-img would (recorded format, else a probe), locked under
/// `locking`.
fn open_backing(
    image: &Path,
    name: &[u8],
    format: Option<&[u8]>,
    locking: Locking,
) -> Result<Opened, String> {
    let path = resolve_relative(image, name).map_err(|e| e.to_string())?;
    let shown = || String::from_utf8_lossy(name).into_owned();
    usable_file(&path).map_err(|e| format!("Could not open '{}': {e}", shown()))?;
    let fmt = match format {
        Some(f) => Format::openable(f).map_err(|e| e.to_string())?,
        None => probe_file(&path).map_err(|e| e.to_string())?,
    };
    let opts = OpenOptions {
        locking,
        ..crate::common::qemu_options()
    };
    open(&path, fmt, &opts).map_err(|e| e.to_string())
}

/// qemu-img's `dump_human_image_check`.
fn human_report(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// The QAPI `ImageCheck` object, members in schema order (optional ones only when non-zero, as
/// qemu-img sets them), then laid out in QDict order.
fn json_report(r: &CheckReport, filename: &str) -> Value {
    let mut e: Vec<(&str, Value)> = vec![
        ("filename", Value::from(filename)),
        ("format", Value::from("qcow2")),
        ("check-errors", Value::from(r.check_errors)),
    ];
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    e.extend(
        optional
            .into_iter()
            .filter(|&(_, v)| v != 0)
            .map(|(k, v)| (k, Value::from(v))),
    );
    qdict(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_key_order_matches_qemu() {
        // Orders printed by qemu-img 10.0.2.
        let r = CheckReport {
            image_end_offset: 1,
            total_clusters: 1,
            corruptions: 1,
            leaks: 1,
            allocated_clusters: 1,
            fragmented_clusters: 1,
            compressed_clusters: 1,
            ..Default::default()
        };
        let v = json_report(&r, "x");
        let keys: Vec<&str> = v
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "corruptions",
                "check-errors",
                "leaks",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
    }

    #[test]
    fn human_report_layout() {
        let r = CheckReport {
            corruptions: 2,
            leaks: 1,
            total_clusters: 1024,
            allocated_clusters: 17,
            fragmented_clusters: 2,
            image_end_offset: 1441792,
            ..Default::default()
        };
        assert_eq!(
            human_report(&r),
            "\n2 errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.\n\n1 leaked clusters were found on the image.\nThis means \
             waste of disk space, but no harm to data.\n17/1024 = 1.66% allocated, 11.76% \
             fragmented, 0.00% compressed clusters\nImage end offset: 1441792\n"
        );
    }
}
