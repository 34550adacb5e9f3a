//! qemu-img's `-o` option lists: the create and amend options of the formats qcow2kit writes
//! (with the file protocol's, merged in as qemu-img merges them), QemuOpts parsing of a list,
//! and `-o help` / `-o ?` printed as qemu-img 10 prints them.
//!
//! Invariants: each table is in its QEMU driver's declaration order (the order of the
//! `Formatting …` line); help lines are sorted as whole lines, as `qemu_opts_print_help` sorts
//! them. Formats and protocols QEMU knows but qcow2kit does not write are refused with a
//! message naming qcow2kit; those QEMU itself cannot create with, in QEMU's words.

use qcow2kit::format::qemu_opts::split_option_list;
use qcow2kit::ops::measure::is_valid_option_list;
use qcow2kit::Format;

/// The type of a QemuOpts option, which decides how its value is checked and printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Bool,
    Number,
    Size,
}

impl Kind {
    /// The type as `-o help` shows it.
    fn shown(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Bool => "bool (on/off)",
            Kind::Number => "num",
            Kind::Size => "size",
        }
    }
}

/// One option of a driver's option list.
pub(crate) struct Desc {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    /// The value `Formatting …` shows when the option is not given.
    pub(crate) default: Option<&'static str>,
    help: &'static str,
}

const fn d(
    name: &'static str,
    kind: Kind,
    default: Option<&'static str>,
    help: &'static str,
) -> Desc {
    Desc {
        name,
        kind,
        default,
        help,
    }
}

const SIZE_HELP: &str = "Virtual disk size";
const ITER_TIME_HELP: &str = "Time to spend in PBKDF in milliseconds";
const BACKING_FILE_HELP: &str = "File name of a base image";
const BACKING_FMT_HELP: &str = "Image format of the base image";
const COMPAT_HELP: &str = "Compatibility level (v2 [0.10] or v3 [1.1])";
const DATA_FILE_HELP: &str = "File name of an external data file";
const DATA_FILE_RAW_HELP: &str = "The external data file must stay valid as a raw image";
const LAZY_HELP: &str = "Postpone refcount updates";
const REFCOUNT_HELP: &str = "Width of a reference count entry in bits";

/// The qcow2 driver's create options.
pub(crate) const QCOW2_CREATE: &[Desc] = &[
    d(
        "encryption",
        Kind::Bool,
        None,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    d(
        "encrypt.format",
        Kind::Str,
        None,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    d(
        "encrypt.key-secret",
        Kind::Str,
        None,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    d(
        "encrypt.cipher-alg",
        Kind::Str,
        None,
        "Name of encryption cipher algorithm",
    ),
    d(
        "encrypt.cipher-mode",
        Kind::Str,
        None,
        "Name of encryption cipher mode",
    ),
    d(
        "encrypt.ivgen-alg",
        Kind::Str,
        None,
        "Name of IV generator algorithm",
    ),
    d(
        "encrypt.ivgen-hash-alg",
        Kind::Str,
        None,
        "Name of IV generator hash algorithm",
    ),
    d(
        "encrypt.hash-alg",
        Kind::Str,
        None,
        "Name of encryption hash algorithm",
    ),
    d("encrypt.iter-time", Kind::Number, None, ITER_TIME_HELP),
    d(
        "cluster_size",
        Kind::Size,
        Some("65536"),
        "qcow2 cluster size",
    ),
    d("extended_l2", Kind::Bool, Some("off"), "Extended L2 tables"),
    d(
        "preallocation",
        Kind::Str,
        None,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    d(
        "compression_type",
        Kind::Str,
        Some("zlib"),
        "Compression method used for image cluster compression",
    ),
    d("size", Kind::Size, None, SIZE_HELP),
    d("compat", Kind::Str, None, COMPAT_HELP),
    d("backing_file", Kind::Str, None, BACKING_FILE_HELP),
    d("backing_fmt", Kind::Str, None, BACKING_FMT_HELP),
    d("data_file", Kind::Str, None, DATA_FILE_HELP),
    d("data_file_raw", Kind::Bool, None, DATA_FILE_RAW_HELP),
    d("lazy_refcounts", Kind::Bool, Some("off"), LAZY_HELP),
    d("refcount_bits", Kind::Number, Some("16"), REFCOUNT_HELP),
];

/// The raw driver's create options.
pub(crate) const RAW_CREATE: &[Desc] = &[d("size", Kind::Size, None, SIZE_HELP)];

/// The file protocol's create options.
pub(crate) const FILE_CREATE: &[Desc] = &[
    d("size", Kind::Size, None, SIZE_HELP),
    d(
        "nocow",
        Kind::Bool,
        None,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    d(
        "preallocation",
        Kind::Str,
        None,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    d(
        "extent_size_hint",
        Kind::Size,
        None,
        "Extent size hint for the image file, 0 to disable",
    ),
];

/// The host_device (and host_cdrom) protocol's create options.
const HOST_DEVICE_CREATE: &[Desc] = &[
    d("size", Kind::Size, None, SIZE_HELP),
    d(
        "preallocation",
        Kind::Str,
        None,
        "Preallocation mode (allowed values: off)",
    ),
];

/// The qcow2 driver's amend options.
pub(crate) const QCOW2_AMEND: &[Desc] = &[
    d(
        "encrypt.keyslot",
        Kind::Number,
        None,
        "Select a single keyslot to modify explicitly",
    ),
    d(
        "encrypt.state",
        Kind::Str,
        None,
        "Select new state of affected keyslots (active/inactive)",
    ),
    d(
        "encrypt.old-secret",
        Kind::Str,
        None,
        "Select all keyslots that match this password",
    ),
    d(
        "encrypt.new-secret",
        Kind::Str,
        None,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    d("encrypt.iter-time", Kind::Number, None, ITER_TIME_HELP),
    d("size", Kind::Size, None, SIZE_HELP),
    d("compat", Kind::Str, None, COMPAT_HELP),
    d("backing_file", Kind::Str, None, BACKING_FILE_HELP),
    d("backing_fmt", Kind::Str, None, BACKING_FMT_HELP),
    d("data_file", Kind::Str, None, DATA_FILE_HELP),
    d("data_file_raw", Kind::Bool, None, DATA_FILE_RAW_HELP),
    d("lazy_refcounts", Kind::Bool, None, LAZY_HELP),
    d("refcount_bits", Kind::Number, None, REFCOUNT_HELP),
];

/// `qemu_opts_append`: `format`'s options, then those of `protocol` not named already.
pub(crate) fn merged(format: &'static [Desc], protocol: &'static [Desc]) -> Vec<&'static Desc> {
    let mut all: Vec<&Desc> = format.iter().collect();
    for p in protocol {
        if !all.iter().any(|a| a.name == p.name) {
            all.push(p);
        }
    }
    all
}

/// The create options of `format` on the file protocol (what `create` and `convert` take).
pub(crate) fn create_options(format: Format) -> Vec<&'static Desc> {
    match format {
        Format::Raw => merged(RAW_CREATE, FILE_CREATE),
        _ => merged(QCOW2_CREATE, FILE_CREATE),
    }
}

/// `qemu_opts_print_help`: one line per option, `  NAME=<TYPE>` padded to 24 columns, then
/// ` - HELP`; lines sorted.
fn help_text<'a>(descs: impl IntoIterator<Item = &'a Desc>) -> String {
    let mut lines: Vec<String> = descs
        .into_iter()
        .map(|d| {
            let head = format!("  {}=<{}>", d.name, d.kind.shown());
            format!("{head:<24} - {}\n", d.help)
        })
        .collect();
    lines.sort();
    lines.concat()
}

/// Every driver qemu-img 10.0 knows (`qemu-img --help`): formats and protocols. A name outside
/// it is an unknown driver; one inside it that qcow2kit does not implement is refused as such.
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Whether QEMU has a format driver named `name`.
pub(crate) fn is_qemu_format(name: &str) -> bool {
    QEMU_FORMATS.contains(&name)
}

/// The formats qemu-img can create that qcow2kit does not.
const QEMU_ONLY_CREATE: &[&str] = &[
    "file",
    "gluster",
    "host_cdrom",
    "host_device",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "nvme",
    "parallels",
    "qcow",
    "qed",
    "rbd",
    "ssh",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
];

/// The format `-f`/`-O` names for a new image, or the refusal (qemu-img's words where QEMU
/// refuses too).
pub(crate) fn create_format(name: &str) -> Result<Format, String> {
    match name {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        n if QEMU_ONLY_CREATE.contains(&n) => Err(format!(
            "creating '{n}' images is not supported by qcow2kit (qcow2 and raw only)"
        )),
        n if QEMU_FORMATS.contains(&n) => Err(format!(
            "Format driver '{n}' does not support image creation"
        )),
        n => Err(format!("Unknown file format '{n}'")),
    }
}

/// Protocol prefixes (`NAME:`) QEMU takes but cannot create an image with.
const NO_CREATE_PROTOCOLS: &[(&str, &str)] = &[
    ("blkdebug", "blkdebug"),
    ("blkverify", "blkverify"),
    ("fat", "vvfat"),
    ("ftp", "ftp"),
    ("ftps", "ftps"),
    ("http", "http"),
    ("https", "https"),
    ("null-aio", "null-aio"),
    ("null-co", "null-co"),
];

/// Protocol prefixes QEMU creates images with and qcow2kit does not.
const QEMU_ONLY_PROTOCOLS: &[&str] = &[
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "host_cdrom",
    "host_device",
    "iscsi",
    "iser",
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "nfs",
    "nvme",
    "rbd",
    "ssh",
];

/// `bdrv_find_protocol` for a new image's name: the protocol's create options.
fn protocol_options(filename: &str) -> Result<&'static [Desc], String> {
    let is_device = std::fs::metadata(filename).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device() || m.file_type().is_char_device()
    });
    if is_device || filename.starts_with("/dev/cdrom") {
        return Ok(HOST_DEVICE_CREATE);
    }
    // A protocol prefix is a ':' before any '/'.
    let prefix = match filename.find([':', '/']) {
        Some(i) if filename.as_bytes()[i] == b':' => &filename[..i],
        _ => return Ok(FILE_CREATE),
    };
    if prefix == "file" {
        return Ok(FILE_CREATE);
    }
    if let Some((_, driver)) = NO_CREATE_PROTOCOLS.iter().find(|(p, _)| *p == prefix) {
        return Err(format!(
            "Protocol driver '{driver}' does not support image creation"
        ));
    }
    if QEMU_ONLY_PROTOCOLS.contains(&prefix) {
        return Err(format!(
            "creating images over the '{prefix}' protocol is not supported by qcow2kit"
        ));
    }
    Err(format!("Unknown protocol '{prefix}'"))
}

/// qemu-img's `print_block_option_help`: the create options of `fmt`, merged with those of the
/// protocol of `filename` when one is given.
pub(crate) fn print_create_help(filename: Option<&str>, fmt: &str) -> Result<(), String> {
    let format = create_format(fmt)?;
    let own = match format {
        Format::Raw => RAW_CREATE,
        _ => QCOW2_CREATE,
    };
    match filename {
        Some(f) => {
            let all = merged(own, protocol_options(f)?);
            out!("Supported options:\n{}", help_text(all));
        }
        None => out!(
            "Supported {fmt} options:\n{}\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
            help_text(own)
        ),
    }
    Ok(())
}

/// qemu-img's `print_amend_option_help` for `fmt`.
pub(crate) fn print_amend_help(fmt: &str) -> Result<(), String> {
    match fmt {
        "qcow2" => {
            out!("Amend options for 'qcow2':\n{}", help_text(QCOW2_AMEND));
            Ok(())
        }
        "luks" => Err("amending 'luks' images is not supported by qcow2kit (qcow2 only)".into()),
        f if is_qemu_format(f) => Err(amend_refused(f)),
        f => Err(format!("Unknown file format '{f}'")),
    }
}

/// QEMU's refusal to amend an image of format `fmt`.
pub(crate) fn amend_refused(fmt: &str) -> String {
    format!("Format driver '{fmt}' does not support option amendment")
}

/// qemu-img's `accumulate_options` over every `-o` in order: each must be a valid list
/// (`Invalid option list: …` names the first that is not); `None` when there is none.
pub(crate) fn accumulate(lists: &[String]) -> Result<Option<String>, String> {
    if let Some(bad) = lists.iter().find(|l| !is_valid_option_list(l)) {
        return Err(format!("Invalid option list: {bad}"));
    }
    Ok((!lists.is_empty()).then(|| lists.join(",")))
}

/// One element of an option list as QEMU's `get_opt_name_value` reads it: a name with a value,
/// or a bare name (a flag).
struct Token {
    name: String,
    value: Option<String>,
}

/// The tokens of `list`. A name ends at the first `=` or `,`; in a value `,,` is a comma. A part
/// of [`split_option_list`] holds a comma for each `,,`: before any `=`, that ends the name and
/// stands for an empty flag (so `help,,x` asks for help, as in QEMU).
fn tokens(list: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for part in split_option_list(list) {
        let mut rest = part.as_str();
        while !rest.is_empty() {
            let Some(i) = rest.find(['=', ',']) else {
                out.push(Token {
                    name: rest.to_string(),
                    value: None,
                });
                break;
            };
            let name = rest[..i].to_string();
            if rest.as_bytes()[i] == b'=' {
                out.push(Token {
                    name,
                    value: Some(rest[i + 1..].to_string()),
                });
                break;
            }
            out.push(Token { name, value: None });
            out.push(Token {
                name: String::new(),
                value: None,
            });
            rest = &rest[i + 1..];
        }
    }
    out
}

/// QEMU's `has_help_option`: a bare `help` or `?` anywhere in the list.
pub(crate) fn has_help_option(list: &str) -> bool {
    tokens(list)
        .iter()
        .any(|t| t.value.is_none() && (t.name == "help" || t.name == "?"))
}

/// The `(name, value)` pairs of `list` as QemuOpts sets them: a bare `name` is `name=on`, a bare
/// `noname` is `name=off`.
pub(crate) fn parse_list(list: &str) -> Vec<(String, String)> {
    tokens(list)
        .into_iter()
        .map(|t| match (t.value, t.name.strip_prefix("no")) {
            (Some(v), _) => (t.name, v),
            (None, Some(n)) => (n.to_string(), "off".to_string()),
            (None, None) => (t.name, "on".to_string()),
        })
        .collect()
}

/// Why a QemuOpts number or size was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadValue {
    /// Not a number (or text after it).
    Invalid,
    /// A number out of range (for sizes: negative, or 2^64 and above).
    Range,
}

/// C's `strtoull` over the start of `s`: the value (wrapped for a leading `-`), the bytes
/// consumed (0: no conversion) and whether it overflowed. `base` 0 reads `0x` as hex and a
/// leading `0` as octal.
fn strtoull(s: &str, base: u32) -> (u64, usize, bool) {
    let b = s.as_bytes();
    let mut i = b
        .iter()
        .take_while(|c| c.is_ascii_whitespace() || **c == 0x0b)
        .count();
    let negative = b.get(i) == Some(&b'-');
    if matches!(b.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    let hex_digit_at = |j: usize| b.get(j).is_some_and(|c| c.is_ascii_hexdigit());
    let has_hex_prefix =
        b.get(i) == Some(&b'0') && matches!(b.get(i + 1), Some(b'x' | b'X')) && hex_digit_at(i + 2);
    let base = match base {
        0 if has_hex_prefix => 16,
        0 if b.get(i) == Some(&b'0') => 8,
        0 => 10,
        b => b,
    };
    if base == 16 && has_hex_prefix {
        i += 2;
    }
    let start = i;
    let (mut value, mut overflow) = (0u64, false);
    while let Some(d) = b.get(i).and_then(|c| (*c as char).to_digit(base)) {
        match value
            .checked_mul(base as u64)
            .and_then(|v| v.checked_add(d as u64))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return (0, 0, false);
    }
    if overflow {
        return (u64::MAX, i, true);
    }
    (
        if negative {
            value.wrapping_neg()
        } else {
            value
        },
        i,
        false,
    )
}

/// QEMU's `qemu_strtou64(s, NULL, 0)`, as QemuOpts reads a number: decimal, hex or octal, a
/// leading `-` wraps, nothing may follow.
pub(crate) fn qemu_number(s: &str) -> Result<u64, BadValue> {
    match strtoull(s, 0) {
        (_, 0, _) => Err(BadValue::Invalid),
        (_, n, _) if n < s.len() => Err(BadValue::Invalid),
        (_, _, true) => Err(BadValue::Range),
        (v, _, false) => Ok(v),
    }
}

/// QEMU's `qemu_strtosz(s, NULL)`, as QemuOpts reads a size: a decimal number (or `0x` hex,
/// without fraction or suffix) with an optional fraction and a `bkMGTPE` suffix (1024-based;
/// a fraction needs a suffix above `b`), nothing after it. A negative number is out of range.
pub(crate) fn qemu_size(s: &str) -> Result<u64, BadValue> {
    let (mut val, mut end, overflow) = strtoull(s, 10);
    let lead = s.len() - s.trim_start().len();
    // A negative number is out of range, as is one that overflows.
    let mut bad = (overflow || (end > 0 && s[lead..].starts_with('-'))).then_some(BadValue::Range);
    let rest = |end: usize| &s[end..];
    let mut frac = 0f64;
    let mut fraction_read = false;
    if bad.is_none() && end > 0 && val == 0 && rest(end).starts_with(['x', 'X']) {
        let (v, n, o) = strtoull(s, 16);
        (val, end) = (v, n);
        if o {
            bad = Some(BadValue::Range);
        } else if rest(end).starts_with('.') || rest(end).starts_with(|c| suffix(c).is_some()) {
            return Err(BadValue::Invalid);
        }
    } else if bad.is_none() && (rest(end).starts_with('.') || (end == 0 && s.contains('.'))) {
        let digits_follow = rest(end)[1..].starts_with(|c: char| c.is_ascii_digit());
        if end > 0 && rest(end).starts_with('.') && !digits_follow {
            end += 1;
        } else {
            // strtod over the fraction, with 'e' and 'E' left to be suffixes.
            let tail = rest(end);
            let text = tail.split(['e', 'E']).next().unwrap_or("");
            let lead_ws = text.len() - text.trim_start().len();
            let len = (lead_ws..=text.len())
                .rev()
                .find(|&l| text[lead_ws..l].parse::<f64>().is_ok_and(f64::is_finite))
                .filter(|&l| l > lead_ws && !text[lead_ws..l].contains(['i', 'I', 'n', 'N']));
            let Some(len) = len else {
                return Err(BadValue::Invalid);
            };
            frac = text[lead_ws..len].parse::<f64>().unwrap_or(0.0);
            end += len;
            fraction_read = true;
            if frac.is_sign_negative() {
                bad = Some(BadValue::Range);
            }
        }
    }
    if end == 0 && !fraction_read {
        return Err(BadValue::Invalid);
    }
    let mut valf = 0u64;
    if bad.is_none() {
        if frac == 1.0 {
            val = val.checked_add(1).ok_or(BadValue::Range)?;
        } else {
            valf = (frac * 18446744073709551616.0) as u64;
        }
        let mul = match rest(end).chars().next().and_then(suffix) {
            Some(m) => {
                end += 1;
                m
            }
            None => 1,
        };
        if mul == 1 && valf != 0 {
            return Err(BadValue::Invalid);
        }
        let f = valf as u128 * mul as u128;
        let total = val as u128 * mul as u128 + (f >> 64) + ((f >> 63) & 1);
        match u64::try_from(total) {
            Ok(v) => val = v,
            Err(_) => bad = Some(BadValue::Range),
        }
    }
    if end < s.len() {
        return Err(BadValue::Invalid);
    }
    match bad {
        Some(b) => Err(b),
        None => Ok(val),
    }
}

/// The multiplier of a size suffix.
fn suffix(c: char) -> Option<u64> {
    let shift = match c.to_ascii_lowercase() {
        'b' => 0,
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        'e' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &str) -> Vec<(String, String)> {
        parse_list(list)
    }

    fn p(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn lists_read_as_qemu_reads_them() {
        assert_eq!(
            pairs("a=1,b=x,,y,flag,noother,c="),
            vec![
                p("a", "1"),
                p("b", "x,y"),
                p("flag", "on"),
                p("other", "off"),
                p("c", "")
            ]
        );
        // `,,` before any `=` ends the name and stands for an empty flag.
        assert_eq!(
            pairs("a,,b=1"),
            vec![p("a", "on"), p("", "on"), p("b", "1")]
        );
        assert_eq!(pairs("a,,"), vec![p("a", "on"), p("", "on")]);
        assert_eq!(
            pairs("a,,,,b"),
            vec![
                p("a", "on"),
                p("", "on"),
                p("", "on"),
                p("", "on"),
                p("b", "on")
            ]
        );
    }

    #[test]
    fn help_is_a_bare_help_or_question_mark() {
        assert!(has_help_option("help"));
        assert!(has_help_option("cluster_size=4k,?"));
        assert!(has_help_option("help,,x"));
        assert!(has_help_option("x,,help"));
        assert!(!has_help_option("backing_file=t.qcow2,,help"));
        assert!(!has_help_option("help=on"));
        assert!(!has_help_option("nohelp"));
    }

    #[test]
    fn lists_are_checked_in_order() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(accumulate(&[]), Ok(None));
        assert_eq!(
            accumulate(&l(&["a=1", "b=x,,"])),
            Ok(Some("a=1,b=x,,".to_string()))
        );
        for bad in ["x,", ",help", ",,", ""] {
            assert_eq!(
                accumulate(&l(&["a=1", bad, "y,"])),
                Err(format!("Invalid option list: {bad}"))
            );
        }
    }

    #[test]
    fn help_lines_are_padded_and_sorted() {
        let text = help_text(merged(RAW_CREATE, FILE_CREATE));
        assert_eq!(
            text,
            "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n\
             \x20 nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n\
             \x20 preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n\
             \x20 size=<size>            - Virtual disk size\n"
        );
    }

    #[test]
    fn numbers_and_sizes_read_as_qemu_reads_them() {
        use BadValue::{Invalid, Range};
        for (text, want) in [
            ("16", Ok(16)),
            ("0x10", Ok(16)),
            ("010", Ok(8)),
            (" 7", Ok(7)),
            ("-1", Ok(u64::MAX)),
            ("-16", Ok(u64::MAX - 15)),
            ("1k", Err(Invalid)),
            ("08", Err(Invalid)),
            ("", Err(Invalid)),
            ("7 ", Err(Invalid)),
            ("99999999999999999999", Err(Range)),
        ] {
            assert_eq!(qemu_number(text), want, "{text:?}");
        }
        for (text, want) in [
            ("65536", Ok(65536)),
            ("64K", Ok(65536)),
            ("65536b", Ok(65536)),
            (" 1k", Ok(1024)),
            ("1.5k", Ok(1536)),
            (".5k", Ok(512)),
            ("1.k", Ok(1024)),
            ("1.", Ok(1)),
            ("1.0k", Ok(1024)),
            ("1e", Ok(1 << 60)),
            ("0x10000", Ok(65536)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("-1024", Err(Range)),
            ("-0", Err(Range)),
            ("18446744073709551616", Err(Range)),
            ("16E", Err(Range)),
            ("-1k", Err(Invalid)),
            ("-0x10", Err(Invalid)),
            ("0x1k", Err(Invalid)),
            ("0x1.8", Err(Invalid)),
            ("0x", Err(Invalid)),
            ("1.5", Err(Invalid)),
            ("0.5b", Err(Invalid)),
            ("1e3", Err(Invalid)),
            ("inf", Err(Invalid)),
            ("65536 ", Err(Invalid)),
            ("foobar", Err(Invalid)),
            ("", Err(Invalid)),
        ] {
            assert_eq!(qemu_size(text), want, "{text:?}");
        }
    }

    #[test]
    fn formats_and_protocols() {
        assert!(create_format("qcow2").is_ok());
        assert_eq!(
            create_format("bochs").unwrap_err(),
            "Format driver 'bochs' does not support image creation"
        );
        assert_eq!(
            create_format("foo").unwrap_err(),
            "Unknown file format 'foo'"
        );
        assert!(create_format("vmdk").unwrap_err().contains("qcow2kit"));
        assert_eq!(protocol_options("a/b:c").map(|d| d.len()), Ok(4));
        assert_eq!(protocol_options("file:x").map(|d| d.len()), Ok(4));
        assert_eq!(protocol_options("/dev/null").map(|d| d.len()), Ok(2));
        let refusal = |f: &str| protocol_options(f).err();
        assert_eq!(
            refusal("http://x").as_deref(),
            Some("Protocol driver 'http' does not support image creation")
        );
        assert_eq!(
            refusal("json:{}").as_deref(),
            Some("Unknown protocol 'json'")
        );
    }
}
