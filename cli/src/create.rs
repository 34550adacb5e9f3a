//! `qcow2kit create [-f qcow2|raw] [-o OPTIONS] [-b BACKING] [-F BACKING_FMT] [-u] [-q] FILE
//! [SIZE]`: what qemu-img create does, with its output and its errors.
//!
//! The steps follow qemu-img 10's `bdrv_img_create`:
//! 1. `-o` lists (several are joined with commas) are parsed as QemuOpts: `key=value` with `,,`
//!    escaping a comma, a bare `key` meaning `key=on` and `nokey` `key=off`; each key is checked
//!    against the format's option list and its value against the option's type (size, number,
//!    bool, string). A `size` given both ways is an error.
//! 2. `-b`/`-F` become `backing_file`/`backing_fmt`. Unless `-u`, the backing file is opened
//!    (relative to the new image) for its format and, without a size, for its size; a backing
//!    file without a format is refused, as qemu-img 10 does, naming the format it detected.
//! 3. `Formatting 'FILE', fmt=FMT …` lists the options in the order and the notation of QEMU's
//!    `qemu_opts_print` (`-q` suppresses it).
//! 4. The qcow2 driver's checks (in its order, with its messages), then the library creates the
//!    image: [`CreateOptions::apply_qemu_options`] and [`create_qcow2`], or [`create_raw`].
//!
//! Sizes are rounded up to a multiple of 512 bytes, as QEMU's qcow2 and file drivers do.
//! Encryption (`encrypt.*` with a `--object secret`) creates LUKS or legacy AES images.
//! `-o help` / `-o ?` lists the options ([`crate::option_help`]).

use crate::args::{opt, Parsed, Spec};
use crate::common::{parse_size, try_help};
use crate::image_opts::load_secrets;
use crate::option_help::{
    accumulate, create_format, create_options, has_help_option, parse_list, print_create_help,
    qemu_number, qemu_size, BadValue, Desc, Kind,
};
use qcow2kit::chain::{open, probe_file, resolve_relative};
use qcow2kit::crypto::luks::{KdfCost, LuksCreateOptions};
use qcow2kit::crypto::secret::Secrets;
use qcow2kit::crypto::{CipherAlg, CipherMode, EncryptionFormat, HashAlg, IvGenAlg, Passphrase};
use qcow2kit::error::strerror;
use qcow2kit::ops::create::{
    create_qcow2, create_raw, CreateEncryption, CreateOptions, Preallocation,
};
use qcow2kit::Format;
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('f'), None, true, "f"),
    opt(Some('o'), None, true, "o"),
    opt(Some('b'), None, true, "b"),
    opt(Some('F'), None, true, "F"),
    opt(Some('u'), None, false, "u"),
    opt(Some('q'), None, false, "q"),
    opt(None, Some("object"), true, "object"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit create [-f qcow2|raw] [-o OPTIONS] [-b BACKING] [-F BACKING_FMT] [-u] [-q] FILE [SIZE]

Creates an image as qemu-img create does. qcow2 options: size, compat, backing_file,
backing_fmt, data_file, data_file_raw, cluster_size, extended_l2, preallocation,
lazy_refcounts, refcount_bits, compression_type (nocow and extent_size_hint are accepted and
have no effect). raw options: size, preallocation (off, falloc, full).
";

/// Options that [`encryption`] reads rather than [`qcow2_options`].
fn is_encryption_option(key: &str) -> bool {
    key == "encryption" || key.starts_with("encrypt.")
}

/// The options of a new qcow2 image that `convert` makes, from its `-o` settings (already
/// checked by [`parse_settings`]); `convert` sets the size and the `-B`/`-F` backing itself.
pub(crate) fn target_options(set: &Settings, secrets: &Secrets) -> Result<CreateOptions, String> {
    let mut o = CreateOptions::default();
    apply_settings(&mut o, set)?;
    o.encryption = encryption(set, secrets)?;
    Ok(o)
}

/// The encryption the options ask for, checked as QEMU's qcow2 and crypto drivers check them
/// (with their messages); `None` for an unencrypted image.
fn encryption(set: &Settings, secrets: &Secrets) -> Result<Option<CreateEncryption>, String> {
    let alias = set.get("encryption").map(|_| set.flag("encryption"));
    let format = match (set.text("encrypt.format"), alias) {
        (Some(_), Some(true)) => {
            return Err(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            )
        }
        (Some(f), _) => EncryptionFormat::from_name(f)
            .ok_or_else(|| format!("Parameter 'format' does not accept value '{f}'"))?,
        (None, Some(true)) => EncryptionFormat::Aes,
        // Any other encrypt.* option asks for an encryption whose format is not named.
        (None, _) if set.0.iter().any(|s| s.name.starts_with("encrypt.")) => {
            return Err("Parameter 'encrypt.format' is missing".into())
        }
        (None, _) => return Ok(None),
    };
    const LUKS_ONLY: [&str; 6] = [
        "encrypt.cipher-alg",
        "encrypt.cipher-mode",
        "encrypt.ivgen-alg",
        "encrypt.ivgen-hash-alg",
        "encrypt.hash-alg",
        "encrypt.iter-time",
    ];
    if format == EncryptionFormat::Aes {
        if let Some(k) = LUKS_ONLY.iter().find(|k| set.get(k).is_some()) {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
    }
    let id = set
        .text("encrypt.key-secret")
        .ok_or("Parameter 'encrypt.key-secret' is required for cipher")?;
    let passphrase = Passphrase::new(secrets.get(id).map_err(|e| e.to_string())?);
    let mut luks = LuksCreateOptions::default();
    let bad = |key: &str, v: &str| format!("Parameter '{key}' does not accept value '{v}'");
    if let Some(v) = set.text("encrypt.cipher-alg") {
        luks.cipher.alg = CipherAlg::from_name(v).ok_or_else(|| bad("cipher-alg", v))?;
    }
    if let Some(v) = set.text("encrypt.cipher-mode") {
        luks.cipher.mode = CipherMode::from_name(v).ok_or_else(|| bad("cipher-mode", v))?;
    }
    if let Some(v) = set.text("encrypt.ivgen-alg") {
        luks.cipher.ivgen = IvGenAlg::from_name(v).ok_or_else(|| bad("ivgen-alg", v))?;
    }
    if let Some(v) = set.text("encrypt.ivgen-hash-alg") {
        luks.cipher.ivgen_hash =
            Some(HashAlg::from_name(v).ok_or_else(|| bad("ivgen-hash-alg", v))?);
    }
    if let Some(v) = set.text("encrypt.hash-alg") {
        luks.hash = HashAlg::from_name(v).ok_or_else(|| bad("hash-alg", v))?;
    }
    if let Some(ms) = set.get("encrypt.iter-time").and_then(|s| s.number) {
        luks.kdf = KdfCost::IterTime(std::time::Duration::from_millis(ms));
    }
    Ok(Some(CreateEncryption {
        format,
        passphrase,
        luks,
    }))
}

/// A parsed option: its name, the string as given (bools: `on`/`off` for bare flags) and, for
/// sizes and numbers, the value.
struct Setting {
    name: String,
    text: String,
    number: Option<u64>,
}

/// The options of the image being created, in the order given (the last of a name wins).
#[derive(Default)]
pub(crate) struct Settings(Vec<Setting>);

impl Settings {
    fn get(&self, name: &str) -> Option<&Setting> {
        self.0.iter().rev().find(|s| s.name == name)
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(|s| s.text.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.text(name).and_then(parse_bool) == Some(true)
    }

    fn set(&mut self, name: &str, text: String, number: Option<u64>) {
        self.0.push(Setting {
            name: name.to_string(),
            text,
            number,
        });
    }
}

/// QEMU's boolean spellings.
pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// `strtoull(v, NULL, 0)` as QEMU's number options parse: hex, octal or decimal.
pub(crate) fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

/// QemuOpts parsing of an option list against `descs`: each name must be one of them and each
/// value of its type (QEMU's messages). The list is valid ([`accumulate`]) or empty.
pub(crate) fn parse_settings(list: &str, descs: &[&Desc]) -> Result<Settings, String> {
    let mut set = Settings::default();
    if list.is_empty() {
        return Ok(set);
    }
    for (k, v) in parse_list(list) {
        let desc = descs
            .iter()
            .find(|d| d.name == k)
            .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
        let number = match desc.kind {
            Kind::Str => None,
            Kind::Bool => {
                parse_bool(&v).ok_or_else(|| format!("Parameter '{k}' expects 'on' or 'off'"))?;
                None
            }
            Kind::Number => Some(qemu_number(&v).map_err(|e| match e {
                BadValue::Invalid => format!("Parameter '{k}' expects a number"),
                BadValue::Range => format!("Value '{v}' is too large for parameter '{k}'"),
            })?),
            Kind::Size => Some(qemu_size(&v).map_err(|e| match e {
                BadValue::Invalid => {
                    format!("Parameter '{k}' expects a non-negative number below 2^64\n{SIZE_HINT}")
                }
                BadValue::Range => format!("Value '{v}' is out of range for parameter '{k}'"),
            })?),
        };
        set.set(&k, v, number);
    }
    Ok(set)
}

/// A library error as qemu-img would word it when opening `path`.
fn open_error(path: &Path, e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => {
            format!("Could not open '{}': {}", path.display(), strerror(source))
        }
        other => format!("Could not open '{}': {other}", path.display()),
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    crate::common::exit_code(
        crate::common::parse_args(args, SPECS, "create").and_then(|p| create(&p)),
    )
}

pub(crate) const SIZE_HINT: &str =
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
and exabytes, respectively.";

fn create(p: &Parsed) -> Result<(), String> {
    if p.has("help") {
        out!("{HELP}");
        return Ok(());
    }
    // qemu-img's option loop: every -o list must be valid, every --object must be defined.
    let options = accumulate(p.all("o"))?;
    let secrets = load_secrets(p.all("object").iter().map(|s| s.as_str()))?;
    let fmt_name = p.last("f").unwrap_or("raw");
    if options.as_deref().is_some_and(has_help_option) {
        return print_create_help(p.operands.first().map(String::as_str), fmt_name);
    }
    let (file, size_arg) = match p.operands.as_slice() {
        [] => return Err(format!("Expecting image file name\n{}", try_help("create"))),
        [f] => (f.as_str(), None),
        [f, s] => (f.as_str(), Some(s.as_str())),
        [_, _, extra, ..] => {
            return Err(format!(
                "Unexpected argument: {extra}\n{}",
                try_help("create")
            ))
        }
    };
    let size_pos = match size_arg {
        Some(s) => Some(parse_image_size(s)?),
        None => None,
    };

    let at = |msg: String| format!("{file}: {msg}");
    let format = create_format(fmt_name).map_err(at)?;
    let mut set =
        parse_settings(options.as_deref().unwrap_or(""), &create_options(format)).map_err(at)?;
    match (set.get("size"), size_pos) {
        (Some(_), Some(_)) => return Err(at("The image size must be specified only once".into())),
        (None, Some(s)) => set.set("size", s.to_string(), Some(s)),
        _ => {}
    }
    if let Some(b) = p.last("b") {
        if format == Format::Raw {
            return Err(at(format!(
                "Backing file not supported for file format '{fmt_name}'"
            )));
        }
        set.set("backing_file", b.to_string(), None);
    }
    if let Some(f) = p.last("F") {
        if format == Format::Raw {
            return Err(at(format!(
                "Backing file format not supported for file format '{fmt_name}'"
            )));
        }
        set.set("backing_fmt", f.to_string(), None);
    }
    let backing = set.text("backing_file").map(str::to_string);
    let backing_fmt = set.text("backing_fmt").map(str::to_string);
    if let Some(b) = &backing {
        if b == file {
            return Err(at(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            ));
        }
        if b.is_empty() {
            return Err(at("Expected backing file name, got empty string".into()));
        }
    }

    // The backing file: opened (unless -u) for its format and, without a size, its size.
    if let Some(b) = &backing {
        if p.has("u") {
            if backing_fmt.is_none() {
                return Err(at("Backing file specified without backing format".into()));
            }
        } else {
            let (detected, bsize) = open_backing(Path::new(file), b, backing_fmt.as_deref())
                .map_err(|e| at(format!("{e}\nCould not open backing image.")))?;
            if backing_fmt.is_none() {
                return Err(at(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    detected.name()
                )));
            }
            if set.get("size").is_none() {
                set.set("size", bsize.to_string(), Some(bsize));
            }
        }
    }
    // QEMU keeps sizes in an int64 where -1 (u64::MAX here) means "no size given".
    let Some(size) = set
        .get("size")
        .and_then(|s| s.number)
        .filter(|&n| n != u64::MAX)
    else {
        return Err(at("Image creation needs a size parameter".into()));
    };

    if !p.has("q") {
        let mut line = format!("Formatting '{file}', fmt={fmt_name}");
        for desc in create_options(format) {
            let given = set.get(desc.name);
            let Some(text) = given.map(|s| s.text.as_str()).or(desc.default) else {
                continue;
            };
            let shown = match (desc.kind, given.and_then(|s| s.number)) {
                (Kind::Str, _) => text.replace(',', ",,"),
                // QEMU prints them as int64.
                (Kind::Size | Kind::Number, Some(n)) => (n as i64).to_string(),
                _ => text.to_string(),
            };
            line.push_str(&format!(" {}={shown}", desc.name));
        }
        outln!("{line}");
    }

    // Sizes within 511 bytes of 2^64 cannot be rounded up (QEMU, reading them as negative,
    // makes an image of a nonsensical size; they are refused here).
    let size = size.checked_next_multiple_of(512).ok_or_else(|| {
        at(match format {
            Format::Raw => "The image size is too large for file format 'raw'".to_string(),
            _ => QCOW2_TOO_LARGE.to_string(),
        })
    })?;
    match format {
        Format::Raw => {
            let prealloc = match set.text("preallocation").unwrap_or("off") {
                "off" => Preallocation::Off,
                "falloc" => Preallocation::Falloc,
                "full" => Preallocation::Full,
                "metadata" => {
                    // QEMU's file driver has created (truncated) the file by then.
                    std::fs::File::create(file)
                        .map_err(|e| at(format!("Could not create '{file}': {e}")))?;
                    return Err(at("Unsupported preallocation mode: metadata".into()));
                }
                other => return Err(at(format!("invalid parameter value: {other}"))),
            };
            create_raw(Path::new(file), size, prealloc).map_err(|e| at(e.to_string()))
        }
        Format::Qcow2 => {
            let mut o = qcow2_options(&set, size).map_err(at)?;
            o.encryption = encryption(&set, &secrets).map_err(at)?;
            create_qcow2(Path::new(file), &o).map_err(|e| at(e.to_string()))
        }
        other => Err(at(format!("Unknown file format '{other}'"))),
    }
}

/// qemu-img's `cvtnum_full(name, value, is_size, min, max)`: a size (with a k/M/G/T/P/E
/// suffix) or a number (decimal, hex or octal) between `min` and `max`, with qemu-img's two
/// messages: a value that is no number, and a number out of range (negative ones included).
pub(crate) fn cvtnum(
    name: &str,
    s: &str,
    is_size: bool,
    min: u64,
    max: u64,
) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    let value = if is_size {
        parse_size(s).ok()
    } else {
        parse_number(s.trim())
    };
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(_) => Err(range()),
        None => {
            let (num, suffix) = match s.char_indices().last() {
                Some((i, c)) if is_size && c.is_ascii_alphabetic() => (&s[..i], Some(c)),
                _ => (s, None),
            };
            let suffix_ok = suffix.is_none_or(|c| "bkmgtpe".contains(c.to_ascii_lowercase()));
            let number = if is_size {
                num.trim().parse::<f64>().is_ok()
            } else {
                let n = num.trim();
                let digits = n.strip_prefix('-').unwrap_or(n);
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            };
            if suffix_ok && number {
                Err(range())
            } else {
                Err(format!("Invalid {name} specified: '{s}'."))
            }
        }
    }
}

/// qcow2's refusal of a size its L1 table cannot map.
const QCOW2_TOO_LARGE: &str =
    "The image size is too large for file format 'qcow2' (try using a larger cluster size)";

/// The positional size, as qemu-img's `cvtnum("image size", …)` judges it.
fn parse_image_size(s: &str) -> Result<u64, String> {
    cvtnum("image size", s, true, 0, i64::MAX as u64)
}

/// Opens the backing file named `name` (relative to the new image `image`) as qemu-img does
/// before creating an overlay: in `fmt`, or probed. Returns its format and size.
pub(crate) fn open_backing(
    image: &Path,
    name: &str,
    fmt: Option<&str>,
) -> Result<(Format, u64), String> {
    let path = resolve_relative(image, name.as_bytes()).map_err(|e| e.to_string())?;
    let format = match fmt {
        Some(f) => Format::openable(f.as_bytes()).map_err(|_| format!("Unknown driver '{f}'"))?,
        None => probe_file(&path).map_err(|e| open_error(&path, &e))?,
    };
    let opened =
        open(&path, format, &crate::common::qemu_options()).map_err(|e| open_error(&path, &e))?;
    Ok((format, opened.device.size()))
}

/// The qcow2 driver's checks, in `qcow2_co_create`'s order and with its messages, then the
/// library's options. `size` is already rounded to 512 bytes.
fn qcow2_options(set: &Settings, size: u64) -> Result<CreateOptions, String> {
    // QAPI enum values first (the visitor's field order).
    let v3 = match set.text("compat") {
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(v) => return Err(format!("Parameter 'version' does not accept value '{v}'")),
    };
    let prealloc = set.text("preallocation").unwrap_or("off");
    if Preallocation::from_name(prealloc).is_err() {
        return Err(format!(
            "Parameter 'preallocation' does not accept value '{prealloc}'"
        ));
    }
    let compression = set.text("compression_type").unwrap_or("zlib");
    if !matches!(compression, "zlib" | "zstd") {
        return Err(format!(
            "Parameter 'compression-type' does not accept value '{compression}'"
        ));
    }

    let cluster_size = set
        .get("cluster_size")
        .and_then(|s| s.number)
        .unwrap_or(65536);
    let extended_l2 = set.flag("extended_l2");
    let backing = set.get("backing_file").is_some();
    if extended_l2 && !v3 {
        return Err(
            "Extended L2 entries are only supported with compatibility level 1.1 and \
                    above (use version=v3 or greater)"
                .into(),
        );
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if backing && prealloc != "off" && !extended_l2 {
        return Err(
            "Backing file and preallocation can only be used at the same time if \
                    extended_l2 is on"
                .into(),
        );
    }
    if set.get("backing_fmt").is_some() && !backing {
        return Err("Backing format cannot be used without backing file".into());
    }
    if !v3 && set.flag("lazy_refcounts") {
        return Err(
            "Lazy refcounts only supported with compatibility level 1.1 and above \
                    (use version=v3 or greater)"
                .into(),
        );
    }
    let refcount_bits = set
        .get("refcount_bits")
        .and_then(|s| s.number)
        .unwrap_or(16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if !v3 && refcount_bits != 16 {
        return Err(
            "Different refcount widths than 16 bits require compatibility level 1.1 \
                    or above (use version=v3 or greater)"
                .into(),
        );
    }
    let data_file = set.get("data_file").is_some();
    let data_file_raw = set.flag("data_file_raw");
    if data_file_raw && !data_file {
        return Err("data-file-raw requires data-file".into());
    }
    if data_file_raw && backing {
        return Err("Backing file and data-file-raw cannot be used at the same time".into());
    }
    if data_file && !v3 {
        return Err(
            "External data files are only supported with compatibility level 1.1 and \
                    above (use version=v3 or greater)"
                .into(),
        );
    }
    if compression != "zlib" && !v3 {
        return Err(
            "Non-zlib compression type is only supported with compatibility level 1.1 \
                    and above (use version=v3 or greater)"
                .into(),
        );
    }
    // qcow2_grow_l1_table's limit: an L1 table of at most 32 MiB.
    let entry = if extended_l2 { 16 } else { 8 };
    let per_l1 = cluster_size * (cluster_size / entry);
    if size.div_ceil(per_l1) > (32 << 20) / 8 {
        return Err(QCOW2_TOO_LARGE.into());
    }

    let mut o = CreateOptions::default();
    apply_settings(&mut o, set)?;
    o.size = Some(size);
    // qcow2_co_create: a raw data file needs L2 tables mapping it 1:1.
    if o.data_file_raw && o.preallocation == Preallocation::Off {
        o.preallocation = Preallocation::Metadata;
    }
    Ok(o)
}

/// Sets the library's options from the `-o` settings (size and encryption aside).
fn apply_settings(o: &mut CreateOptions, set: &Settings) -> Result<(), String> {
    let parse = |s: &str| parse_size(s).ok();
    for s in &set.0 {
        let value = match s.name.as_str() {
            "size" | "nocow" | "extent_size_hint" => continue,
            k if is_encryption_option(k) => continue,
            "lazy_refcounts" | "extended_l2" | "data_file_raw" => {
                if parse_bool(&s.text) == Some(true) {
                    "on".to_string()
                } else {
                    "off".to_string()
                }
            }
            "cluster_size" | "refcount_bits" => s.number.unwrap_or_default().to_string(),
            _ => s.text.clone(),
        };
        if value.contains(',') {
            // apply_qemu_options splits on every comma: names with commas are set directly.
            match s.name.as_str() {
                "backing_file" => o.backing_file = Some(value),
                "backing_fmt" => o.backing_format = Some(value),
                "data_file" => o.data_file = Some(value),
                _ => return Err(format!("Invalid parameter value '{value}'")),
            }
            continue;
        }
        o.apply_qemu_options(&format!("{}={value}", s.name), parse)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes() {
        assert_eq!(parse_number("16"), Some(16));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("010"), Some(8));
        assert_eq!(parse_number("x"), None);
        assert_eq!(parse_image_size("1k"), Ok(1024));
        assert!(parse_image_size("9E")
            .unwrap_err()
            .contains("Must be between"));
        assert!(parse_image_size("1x").unwrap_err().contains("'1x'"));
        let coroutines = |v: &str| cvtnum("number of coroutines", v, false, 1, 16);
        assert_eq!(coroutines("0x10"), Ok(16));
        assert_eq!(coroutines("010"), Ok(8));
        let range = "Invalid number of coroutines specified. Must be between 1 and 16.";
        for v in ["0", "17", "-1", "99999999999999999999"] {
            assert_eq!(coroutines(v).unwrap_err(), range, "{v}");
        }
        for v in ["x", "16k", "1e", ""] {
            assert_eq!(
                coroutines(v).unwrap_err(),
                format!("Invalid number of coroutines specified: '{v}'."),
                "{v}"
            );
        }
    }
}
