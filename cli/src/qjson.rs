//! QEMU's JSON output: QDict key order and the pretty printer (`qobject_to_json_pretty`), so
//! that `--output json` is byte-identical to qemu-img's.

use serde_json::{Map, Value};

/// QEMU's `tdb_hash` bucket of a QDict key (`qobject/qdict.c`).
pub(crate) fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// A JSON object whose keys iterate as a QDict filled in `entries` order iterates.
pub(crate) fn qdict(entries: Vec<(&str, Value)>) -> Value {
    let mut e: Vec<(usize, &str, Value)> = entries
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| (i, k, v))
        .collect();
    e.sort_by_key(|&(i, k, _)| (qdict_bucket(k), std::cmp::Reverse(i)));
    let mut m = Map::new();
    for (_, k, v) in e {
        m.insert(k.to_string(), v);
    }
    Value::Object(m)
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    out.push_str(&" ".repeat(level * 4));
}

/// QEMU's pretty JSON (`qobject_to_json_pretty`): four spaces per level, empty containers still
/// broken over two lines.
pub(crate) fn write_json(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => quote(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_json(out, x, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                quote(out, k);
                out.push_str(": ");
                write_json(out, x, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// QEMU's one-line JSON (`qobject_to_json`): `{"key": value, …}`, as in `json:` file names.
pub(crate) fn write_json_compact(out: &mut String, v: &Value) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_compact(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quote(out, k);
                out.push_str(": ");
                write_json_compact(out, x);
            }
            out.push('}');
        }
        other => write_json(out, other, 0),
    }
}

/// QEMU's JSON string quoting: control characters and everything outside printable ASCII as
/// `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP).
pub(crate) fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
