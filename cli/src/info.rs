//! `qcow2kit info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE`: what qemu-img info
//! prints, byte for byte.
//!
//! qemu-img builds QAPI objects and prints them through QEMU's `QDict`, whose iteration order is
//! that of a 512-bucket hash table (`tdb_hash` of the key; later insertions first within a
//! bucket). [`qdict`] reproduces that order, [`write_json`] QEMU's pretty JSON writer and
//! [`dump_value`] the human dump of format-specific data. Snapshot dates are printed in local
//! time, read from `TZ` or `/etc/localtime` as the C library does (see [`crate::localtime`]).

use crate::args::{opt, Spec};
use crate::common::{fail, parse_format};
use crate::qjson::{qdict, write_json};
use qcow2kit::chain::probe_file;
use qcow2kit::ops::info::{backing_chain_info, image_info, ImageInfo, Qcow2Info, SnapshotInfo};
use serde_json::Value;
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('f'), Some("format"), true, "f"),
    opt(None, Some("output"), true, "output"),
    opt(Some('b'), Some("backing-chain"), false, "backing-chain"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("object"), true, "object"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE

Shows what qemu-img info shows about an image (and, with --backing-chain, every image below it).
";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match crate::common::parse_args(args, SPECS, "info") {
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
        other => return fail(format!("--output expects 'human' or 'json' not '{other}'")),
    };
    let [operand] = p.operands.as_slice() else {
        return fail("Expecting one image file name");
    };
    let arg = match crate::common::image_operand_for_info(&p, operand, p.last("f")) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let path = &arg.path;
    let fmt = match arg.format.as_deref() {
        Some(f) => match parse_format(f) {
            Ok(f) => Some(f),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let could_not_open = |e: qcow2kit::Error| {
        fail(format!(
            "Could not open '{path}': {}",
            crate::common::open_error_text(&e)
        ))
    };
    let locking = crate::common::locking(p.has("U"));
    let infos = if p.has("backing-chain") {
        match backing_chain_info(Path::new(path), fmt, locking) {
            Ok(v) => v,
            // qemu-img opens each image of the chain by itself and names the one refused.
            Err(qcow2kit::Error::Locked { source, .. }) => {
                return fail(format!(
                    "Could not open '{}': {source}",
                    source.path.display()
                ))
            }
            Err(e @ qcow2kit::Error::BackingLoop(_)) => {
                return fail(crate::common::open_error_text(&e))
            }
            Err(e) => return fail(e),
        }
    } else {
        let fmt = match fmt {
            Some(f) => f,
            None => match probe_file(Path::new(path)) {
                Ok(f) => f,
                Err(e) => return could_not_open(e),
            },
        };
        match crate::common::open_for_info(Path::new(path), fmt, locking, &arg.encryption)
            .and_then(|o| image_info(&o))
        {
            Ok(mut i) => {
                if let Some(name) = json_name(&arg) {
                    i.filename = name;
                }
                vec![i]
            }
            Err(e) => {
                return fail(format!(
                    "Could not open '{operand}': {}",
                    crate::common::open_error_text(&e)
                ))
            }
        }
    };

    let mut out = String::new();
    if json {
        let v = if p.has("backing-chain") {
            Value::Array(infos.iter().map(node_value).collect())
        } else {
            node_value(&infos[0])
        };
        write_json(&mut out, &v, 0);
        out.push('\n');
    } else {
        let tz = crate::localtime::Zone::load();
        for (i, info) in infos.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            dump_human(&mut out, info, &tz);
        }
    }
    crate::stdio::print_out(&out);
    0
}

/// The `json:` name qemu-img shows for an image given with options beyond its file name and
/// format (here: an encryption key); `None` when the plain name stands for it.
fn json_name(arg: &crate::image_opts::ImageArg) -> Option<String> {
    let id = arg.key_secret_id.as_ref()?;
    let mut e: Vec<(&str, Value)> = vec![
        ("driver", "qcow2".into()),
        ("encrypt.key-secret", id.clone().into()),
    ];
    e.push((
        "file",
        qdict(vec![
            ("driver", "file".into()),
            ("filename", arg.path.clone().into()),
        ]),
    ));
    let mut out = String::from("json:");
    crate::qjson::write_json_compact(&mut out, &qdict(e));
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// The QAPI objects qemu-img prints

/// The `BlockGraphInfo` of an image and its `file` child, in QAPI member order.
fn node_value(info: &ImageInfo) -> Value {
    let mut e: Vec<(&str, Value)> = vec![
        ("filename", info.filename.clone().into()),
        ("format", info.format.name().into()),
    ];
    // QEMU knows no dirty flag of a raw image over NBD (its driver has no image info).
    if info.qcow2.is_some() || info.file.protocol == "file" {
        e.push(("dirty-flag", info.dirty.into()));
    }
    if let Some(a) = info.actual_size {
        e.push(("actual-size", a.into()));
    }
    e.push(("virtual-size", info.virtual_size.into()));
    if let Some(c) = info.cluster_size {
        e.push(("cluster-size", c.into()));
    }
    if info.qcow2.as_ref().is_some_and(|q| q.encrypt.is_some()) {
        e.push(("encrypted", true.into()));
    }
    if let Some(b) = &info.backing_filename {
        e.push(("backing-filename", b.clone().into()));
        if let Some(f) = &info.full_backing_filename {
            e.push(("full-backing-filename", f.clone().into()));
        }
        if let Some(f) = &info.backing_format {
            e.push(("backing-filename-format", f.clone().into()));
        }
    }
    if !info.snapshots.is_empty() {
        let list = info
            .snapshots
            .iter()
            .map(|s| {
                let mut f: Vec<(&str, Value)> = vec![
                    ("id", s.id.clone().into()),
                    ("name", s.name.clone().into()),
                    ("vm-state-size", (s.vm_state_size as i64).into()),
                    ("date-sec", s.date_sec.into()),
                    ("date-nsec", s.date_nsec.into()),
                    (
                        "vm-clock-sec",
                        ((s.vm_clock_nsec / 1_000_000_000) as i64).into(),
                    ),
                    ("vm-clock-nsec", (s.vm_clock_nsec % 1_000_000_000).into()),
                ];
                if let Some(i) = s.icount {
                    f.push(("icount", (i as i64).into()));
                }
                qdict(f)
            })
            .collect();
        e.push(("snapshots", Value::Array(list)));
    }
    if let Some(q) = &info.qcow2 {
        e.push((
            "format-specific",
            qdict(vec![("type", "qcow2".into()), ("data", qcow2_data(q))]),
        ));
    }
    let file = if info.file.protocol == "file" {
        qdict(vec![
            ("filename", info.file.filename.clone().into()),
            ("format", "file".into()),
            ("dirty-flag", false.into()),
            (
                "actual-size",
                info.file.actual_size.map_or(Value::Null, Value::from),
            ),
            ("virtual-size", info.file.length.into()),
            (
                "format-specific",
                qdict(vec![("type", "file".into()), ("data", qdict(vec![]))]),
            ),
            ("children", Value::Array(vec![])),
        ])
    } else {
        // A protocol node without image info (nbd): its name, size and children only.
        qdict(vec![
            ("filename", info.file.filename.clone().into()),
            ("format", info.file.protocol.into()),
            ("virtual-size", info.file.length.into()),
            ("children", Value::Array(vec![])),
        ])
    };
    let file = drop_nulls(file);
    e.push((
        "children",
        Value::Array(vec![qdict(vec![("name", "file".into()), ("info", file)])]),
    ));
    qdict(e)
}

fn drop_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, x)| !x.is_null()).collect()),
        v => v,
    }
}

/// `ImageInfoSpecificQCow2`, in QAPI member order.
fn qcow2_data(q: &Qcow2Info) -> Value {
    let mut e: Vec<(&str, Value)> = vec![("compat", q.compat.into())];
    if let Some(d) = &q.data_file {
        e.push(("data-file", d.clone().into()));
    }
    if let Some(r) = q.data_file_raw {
        e.push(("data-file-raw", r.into()));
    }
    if let Some(x) = q.extended_l2 {
        e.push(("extended-l2", x.into()));
    }
    if let Some(l) = q.lazy_refcounts {
        e.push(("lazy-refcounts", l.into()));
    }
    if let Some(c) = q.corrupt {
        e.push(("corrupt", c.into()));
    }
    e.push(("refcount-bits", q.refcount_bits.into()));
    if let Some(enc) = &q.encrypt {
        e.push(("encrypt", encrypt_data(enc)));
    }
    if !q.bitmaps.is_empty() {
        let list = q
            .bitmaps
            .iter()
            .map(|b| {
                qdict(vec![
                    ("name", b.name.clone().into()),
                    ("granularity", b.granularity.into()),
                    (
                        "flags",
                        Value::Array(b.flags.iter().map(|&f| f.into()).collect()),
                    ),
                ])
            })
            .collect();
        e.push(("bitmaps", Value::Array(list)));
    }
    e.push(("compression-type", q.compression_type.name().into()));
    qdict(e)
}

/// `ImageInfoSpecificQCow2Encryption`: the format, and for LUKS `QCryptoBlockInfoLUKS` in
/// QAPI member order.
fn encrypt_data(enc: &qcow2kit::engine::EncryptionInfo) -> Value {
    let mut e: Vec<(&str, Value)> = vec![("format", enc.format.name().into())];
    if let Some(h) = &enc.luks {
        e.push(("cipher-alg", h.cipher.alg.name().into()));
        e.push(("cipher-mode", h.cipher.mode.name().into()));
        e.push(("ivgen-alg", h.cipher.ivgen.name().into()));
        if let Some(ih) = h.cipher.ivgen_hash {
            e.push(("ivgen-hash-alg", ih.name().into()));
        }
        e.push(("hash-alg", h.hash.name().into()));
        e.push(("detached-header", false.into()));
        e.push(("payload-offset", h.payload_offset().into()));
        e.push(("master-key-iters", h.master_key_iterations.into()));
        e.push(("uuid", h.uuid_str().into()));
        let slots = h
            .slots
            .iter()
            .map(|s| {
                let mut f: Vec<(&str, Value)> = vec![("active", s.active.into())];
                if s.active {
                    f.push(("iters", s.iterations.into()));
                    f.push(("stripes", s.stripes.into()));
                }
                f.push(("key-offset", (u64::from(s.key_offset_sector) * 512).into()));
                qdict(f)
            })
            .collect();
        e.push(("slots", Value::Array(slots)));
    }
    qdict(e)
}

// ---------------------------------------------------------------------------------------------
// Human output

/// QEMU's `size_to_str`: binary units, three significant digits (`%0.3g`).
fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: x = m · 2^e with m in [0.5, 1).
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%.3g`.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{}{:02}", strip(mant), sign, exp.abs())
    } else {
        let prec = (2 - exp) as usize;
        strip(&format!("{v:.prec$}"))
    }
}

/// Pads `s` with spaces to `width` bytes, on the right (`%-Ns`) or the left (`%Ns`).
fn pad(s: &str, width: usize, left_align: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(s.len()));
    if left_align {
        format!("{s}{fill}")
    } else {
        format!("{fill}{s}")
    }
}

/// At most `max - 1` bytes of `s` (QEMU's `pstrcpy` into a fixed buffer), on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() < max {
        return s;
    }
    let mut end = max - 1;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn dump_human(out: &mut String, info: &ImageInfo, tz: &crate::localtime::Zone) {
    let dsize = info
        .actual_size
        .map_or("unavailable".to_string(), size_to_str);
    out.push_str(&format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.filename,
        info.format.name(),
        size_to_str(info.virtual_size),
        info.virtual_size,
        dsize
    ));
    if info.qcow2.as_ref().is_some_and(|q| q.encrypt.is_some()) {
        out.push_str("encrypted: yes\n");
    }
    if let Some(c) = info.cluster_size {
        out.push_str(&format!("cluster_size: {c}\n"));
    }
    if info.dirty {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &info.backing_filename {
        out.push_str(&format!("backing file: {b}"));
        match &info.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(f) if f != b => out.push_str(&format!(" (actual path: {f})")),
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = &info.backing_format {
            out.push_str(&format!("backing file format: {f}\n"));
        }
    }
    dump_snapshots(out, &info.snapshots, tz);
    if let Some(q) = &info.qcow2 {
        out.push_str(&format_specific_text(q));
    }
    out.push_str(&format!(
        "Child node '/file':\n    filename: {}\n    protocol type: {}\n    file length: {} ({} \
         bytes)\n    disk size: {}\n",
        info.file.filename,
        info.file.protocol,
        size_to_str(info.file.length),
        info.file.length,
        info.file
            .actual_size
            .map_or("unavailable".to_string(), size_to_str)
    ));
}

/// The `Format specific information:` block of a qcow2 image, as qemu-img info and qemu-io's
/// `info` print it.
pub fn format_specific_text(q: &Qcow2Info) -> String {
    let mut out = String::from("Format specific information:\n");
    dump_value(&mut out, 1, &qcow2_data(q));
    out
}

/// qemu-img's `dump_snapshots`: the snapshot table, nothing when there are no snapshots.
pub fn dump_snapshots(out: &mut String, snaps: &[SnapshotInfo], tz: &crate::localtime::Zone) {
    if !snaps.is_empty() {
        out.push_str("Snapshot list:\n");
        out.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        ));
        for s in snaps {
            let date = tz.format(i64::from(s.date_sec));
            let ns = s.vm_clock_nsec;
            let secs = ns / 1_000_000_000;
            let clock = format!(
                "{:04}:{:02}:{:02}.{:03}",
                secs / 3600,
                (secs / 60) % 60,
                secs % 60,
                (ns / 1_000_000) % 1000
            );
            // QEMU prints "--" for a snapshot that records no instruction count.
            let icount = s
                .icount
                .map_or_else(|| "--".to_string(), |i| (i as i64).to_string());
            out.push_str(&format!(
                "{} {} {} {} {} {}\n",
                pad(truncate(&s.id, 128), 7, true),
                pad(truncate(&s.name, 256), 16, true),
                pad(&size_to_str(s.vm_state_size), 8, false),
                pad(&date, 19, false),
                pad(&clock, 15, false),
                pad(&icount, 10, false)
            ));
        }
    }
}

/// QEMU's `dump_qobject`: dicts as `key: value` (dashes in keys become spaces), lists as
/// `[i]: value`, composites on the following lines one level deeper.
fn dump_value(out: &mut String, level: usize, v: &Value) {
    let scalar = |out: &mut String, v: &Value| match v {
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        _ => {}
    };
    let ind = " ".repeat(level * 4);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let composite = x.is_object() || x.is_array();
                out.push_str(&format!(
                    "{ind}{}:{}",
                    k.replace('-', " "),
                    if composite { '\n' } else { ' ' }
                ));
                if composite {
                    dump_value(out, level + 1, x);
                } else {
                    scalar(out, x);
                    out.push('\n');
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let composite = x.is_object() || x.is_array();
                out.push_str(&format!(
                    "{ind}[{i}]:{}",
                    if composite { '\n' } else { ' ' }
                ));
                if composite {
                    dump_value(out, level + 1, x);
                } else {
                    scalar(out, x);
                    out.push('\n');
                }
            }
        }
        x => {
            scalar(out, x);
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_617_920), "1.54 MiB");
        assert_eq!(size_to_str(331_776), "324 KiB");
        assert_eq!(size_to_str(2_163_200), "2.06 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1023 * 1024 + 1000), "1 MiB");
        assert_eq!(format_g3(999.9), "1e+03");
    }

    #[test]
    fn qdict_order_matches_qemu() {
        let v = qdict(vec![
            ("type", Value::Null),
            ("data", Value::Null),
            ("backing-filename-format", Value::Null),
            ("children", Value::Null),
        ]);
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["children", "backing-filename-format", "type", "data"]
        );
    }

    #[test]
    fn json_like_qemu() {
        let mut s = String::new();
        let v = qdict(vec![
            ("children", Value::Array(vec![])),
            ("filename", "a\u{e9}\"".into()),
        ]);
        write_json(&mut s, &v, 0);
        assert_eq!(
            s,
            "{\n    \"children\": [\n    ],\n    \"filename\": \"a\\u00E9\\\"\"\n}"
        );
    }
}
