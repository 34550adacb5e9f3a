//! `qcow2kit amend [-f FMT] [-t CACHE] [--force] [-p] [-q] -o OPTIONS FILE`: what qemu-img
//! amend does ([`qcow2kit::ops::amend`]), with its messages and exit statuses; `-o help` lists
//! the options.
//!
//! Where qcow2kit differs: refusals are decided before anything is written (qemu-img may
//! upgrade or rewrite the header before it refuses the backing file or a downgrade); a
//! downgrade of an image with persistent bitmaps is refused (qemu-img drops them, leaving them
//! inconsistent and their clusters leaked); a change of refcount width, a downgrade of an
//! image with internal snapshots and `encrypt.*` options are not supported.
//!
//! Not covered: `--object`, `--image-opts`.

use crate::args::{opt, Spec};
use crate::common::{
    exit_code, open_error_text, parse_args, parse_format, parse_size, qemu_options, try_help,
};
use crate::create::{parse_bool, parse_number, SIZE_HINT};
use crate::image_opts::{image_arg, load_secrets};
use crate::option_help::{
    accumulate, amend_refused, has_help_option, parse_list, print_amend_help,
};
use crate::progress::Meter;
use crate::rebase::check_cache_mode;
use qcow2kit::chain::{open, probe_file};
use qcow2kit::crypto::keyslots::KeySlotChange;
use qcow2kit::crypto::secret::Secrets;
use qcow2kit::crypto::Passphrase;
use qcow2kit::error::strerror;
use qcow2kit::ops::amend::{amend, AmendOptions, Compat, BACKING_CHANGE};
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('o'), Some("options"), true, "o"),
    opt(Some('p'), Some("progress"), false, "p"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(None, Some("force"), false, "force"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
];

const HELP: &str = "Usage:
Update format-specific options of the image.  Usage:

  qcow2kit amend [-f FMT] [-t CACHE] [--force] [-p] [-q] -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

";

/// Options of qcow2 creation that amend does not take (QEMU adds a hint for them).
const CREATE_ONLY: &[&str] = &[
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
];

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    exit_code(amend_cmd(args))
}

fn amend_cmd(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "amend")?;
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    let list = accumulate(p.all("o"))?;
    let secrets = load_secrets(p.all("object").iter().map(|s| s.as_str()))?;
    let Some(list) = list else {
        return Err(format!("Must specify options (-o)\n{}", try_help("amend")));
    };
    // From here on, qemu-img ends the progress line whatever happens.
    let meter = std::sync::Mutex::new(Meter::new(p.has("p") && !p.has("q")));
    let r = amend_image(&p, &list, &secrets, &meter);
    meter.lock().unwrap_or_else(|e| e.into_inner()).end();
    r
}

fn amend_image(
    p: &crate::args::Parsed,
    list: &str,
    secrets: &Secrets,
    meter: &std::sync::Mutex<Meter>,
) -> Result<(), String> {
    let wants_help = has_help_option(list);
    // With a format named, help needs no image (nor exactly one file name).
    if let (true, Some(fmt)) = (wants_help, p.last("f")) {
        return print_amend_help(fmt);
    }
    let pairs = parse_list(list);
    let [file] = p.operands.as_slice() else {
        return Err("Expecting one image file name".into());
    };
    let file = file.as_str();
    if let Some(mode) = p.last("t") {
        check_cache_mode(mode)?;
    }
    let arg = image_arg(file, p.has("image-opts"), p.last("f"), secrets)?;
    if let Some(e) = &arg.secret_error {
        return Err(format!("Could not open '{file}': {e}"));
    }
    let path = Path::new(&arg.path);
    let format = match arg.format.as_deref() {
        Some(f) => parse_format(f)?,
        None => probe_file(path).map_err(|e| open_failure(file, e))?,
    };
    let mut o = qemu_options();
    arg.apply(&mut o);
    o.writable = true;
    let image = open(path, format, &o).map_err(|e| match e {
        qcow2kit::Error::Io { source, .. } => {
            format!(
                "Could not open '{file}': Could not open '{file}': {}",
                strerror(&source)
            )
        }
        other => format!("Could not open '{file}': {}", open_error_text(&other)),
    })?;
    if wants_help {
        return print_amend_help(format.name());
    }
    let Some(qcow2) = image.qcow2.clone() else {
        return Err(amend_refused(format.name()));
    };
    let (opts, keys) = parse_amend_options(&pairs, &qcow2, secrets, p.has("force"))?;
    if let Some(change) = keys {
        qcow2.amend_key_slots(&change).map_err(|e| match e {
            qcow2kit::Error::InvalidArgument(m) => m,
            other => open_error_text(&other),
        })?;
    }
    let lock = || meter.lock().unwrap_or_else(|e| e.into_inner());
    lock().advance(0.0);
    let report = |done: u64, total: u64| {
        lock().set(100.0 * done as f32 / total.max(1) as f32);
        true
    };
    let result = amend(&qcow2, &opts, Some(&report));
    lock().advance(100.0);
    result.map_err(|e| match e {
        qcow2kit::Error::InvalidArgument(m) if m == BACKING_CHANGE => {
            format!("{m}\nYou can use 'qemu-img rebase' instead.")
        }
        qcow2kit::Error::InvalidArgument(m) | qcow2kit::Error::Unsupported(m) => m,
        // QEMU's error_setg_errno: "WHAT: STRERROR".
        qcow2kit::Error::Io { context, source } if context.starts_with("Failed to ") => {
            format!("{context}: {}", qcow2kit::error::strerror(&source))
        }
        other => open_error_text(&other),
    })?;
    qcow2
        .close()
        .map_err(|e| format!("Could not close '{file}': {e}"))
}

/// qemu-img's words for an image that cannot be opened.
fn open_failure(file: &str, e: qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => {
            format!(
                "Could not open '{file}': Could not open '{file}': {}",
                strerror(&source)
            )
        }
        other => format!("Could not open '{file}': {}", open_error_text(&other)),
    }
}

/// QemuOpts parsing of qcow2's amend options (the last value of a repeated name wins), then
/// what qcow2's amend checks while reading them.
fn parse_amend_options(
    pairs: &[(String, String)],
    image: &qcow2kit::engine::Qcow2Image,
    secrets: &Secrets,
    force: bool,
) -> Result<(AmendOptions, Option<KeySlotChange>), String> {
    let mut o = AmendOptions::default();
    let mut encrypt = false;
    let mut state = None;
    let (mut new_id, mut old_id) = (None, None);
    let mut keys = KeySlotChange {
        activate: false,
        keyslot: None,
        new_secret: None,
        old_secret: None,
        iter_time: None,
        force,
    };
    let secret = |id: &str| {
        secrets
            .get(id)
            .map(Passphrase::new)
            .map_err(|e| e.to_string())
    };
    let mut compat = None;
    for (k, v) in pairs {
        let bool_of = || parse_bool(v).ok_or(format!("Parameter '{k}' expects 'on' or 'off'"));
        match k.as_str() {
            "compat" => compat = Some(v.as_str()),
            "lazy_refcounts" => o.lazy_refcounts = Some(bool_of()?),
            "data_file_raw" => o.data_file_raw = Some(bool_of()?),
            "refcount_bits" => {
                o.refcount_bits =
                    Some(parse_number(v).ok_or(format!("Parameter '{k}' expects a number"))?)
            }
            "size" => {
                if v.starts_with('-') {
                    return Err(format!("Value '{v}' is out of range for parameter 'size'"));
                }
                o.size = Some(parse_size(v).map_err(|_| {
                    format!("Parameter '{k}' expects a non-negative number below 2^64\n{SIZE_HINT}")
                })?)
            }
            "backing_file" => o.backing_file = Some(v.as_bytes().to_vec()),
            "backing_fmt" => o.backing_fmt = Some(v.as_bytes().to_vec()),
            "data_file" => o.data_file = Some(v.as_bytes().to_vec()),
            "encrypt.state" => {
                encrypt = true;
                state = Some(match v.as_str() {
                    "active" => true,
                    "inactive" => false,
                    _ => return Err(format!("Parameter 'state' does not accept value '{v}'")),
                })
            }
            "encrypt.keyslot" => {
                encrypt = true;
                keys.keyslot = Some(
                    v.parse()
                        .map_err(|_| "Parameter 'keyslot' expects an integer".to_string())?,
                )
            }
            "encrypt.iter-time" => {
                encrypt = true;
                let ms = parse_number(v).ok_or(format!("Parameter '{k}' expects a number"))?;
                keys.iter_time = Some(std::time::Duration::from_millis(ms));
            }
            "encrypt.new-secret" => {
                encrypt = true;
                new_id = Some(v.as_str());
            }
            "encrypt.old-secret" => {
                encrypt = true;
                old_id = Some(v.as_str());
            }
            name if CREATE_ONLY.contains(&name) => {
                return Err(format!(
                    "Invalid parameter '{name}'\nThis option is only supported for image creation"
                ))
            }
            name => return Err(format!("Invalid parameter '{name}'")),
        }
    }
    let keys = if encrypt {
        match image.header().crypt_method {
            qcow2kit::format::header::CryptMethod::None => {
                return Err("Can't amend encryption options - encryption not present".into())
            }
            qcow2kit::format::header::CryptMethod::Aes => {
                return Err("Only LUKS encryption options can be amended".into())
            }
            qcow2kit::format::header::CryptMethod::Luks => {}
        }
        keys.activate = state.ok_or("Parameter 'state' is missing")?;
        keys.new_secret = new_id.map(secret).transpose()?;
        keys.old_secret = old_id.map(secret).transpose()?;
        Some(keys)
    } else {
        None
    };
    o.compat = compat.map(compat_of).transpose()?;
    Ok((o, keys))
}

fn compat_of(v: &str) -> Result<Compat, String> {
    Compat::parse(v).map_err(|e| match e {
        qcow2kit::Error::InvalidArgument(m) => m,
        other => other.to_string(),
    })
}
