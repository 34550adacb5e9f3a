//! `qcow2kit map [-f FMT] [--output human|json] [--start-offset OFF] [--max-length LEN] [-U]
//! FILE`: the allocation map of an image through its backing chain, printed as qemu-img map
//! prints it.
//!
//! JSON lists every run (merged as qemu-img merges them). The human format lists only runs
//! holding data, with the file they live in, and fails (exit 1) on data without a host offset
//! (compressed clusters), as qemu-img does.

use crate::args::{opt, Spec};
use crate::common::{fail, image_operand, locking, open_image_arg, parse_size};
use qcow2kit::ops::info::backing_chain_info;
use qcow2kit::ops::map::{for_each_extent, MapEntry};
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('f'), Some("format"), true, "f"),
    opt(None, Some("output"), true, "output"),
    opt(None, Some("start-offset"), true, "start-offset"),
    opt(None, Some("max-length"), true, "max-length"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("object"), true, "object"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit map [-f FMT] [--output human|json] [--start-offset OFF] \
                    [--max-length LEN] [-U] FILE

Prints the allocation map of an image through its backing chain, as qemu-img map does.
";

/// Why the walk stopped early.
enum Stop {
    /// The library failed.
    Lib(qcow2kit::Error),
    /// Human output met data it cannot show.
    Unmappable,
}

impl From<qcow2kit::Error> for Stop {
    fn from(e: qcow2kit::Error) -> Self {
        Stop::Lib(e)
    }
}

/// C's `%#-16x`: `0x` prefix except for zero, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

fn offset_arg(name: &str, v: Option<&str>) -> Result<Option<u64>, String> {
    let Some(v) = v else { return Ok(None) };
    match parse_size(v) {
        Ok(n) if n <= i64::MAX as u64 => Ok(Some(n)),
        _ => Err(format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )),
    }
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match crate::common::parse_args(args, SPECS, "map") {
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
    let start = match offset_arg("start offset", p.last("start-offset")) {
        Ok(v) => v.unwrap_or(0),
        Err(e) => return fail(e),
    };
    let max_length = match offset_arg("max length", p.last("max-length")) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let [path] = p.operands.as_slice() else {
        return fail("Expecting one image file name");
    };
    let opened = match image_operand(&p, path, p.last("f"))
        .and_then(|arg| open_image_arg(&arg, path, |o| o.locking = locking(p.has("U"))))
    {
        Ok(o) => o,
        Err(e) => return fail(e),
    };

    let mut out = crate::stdio::BufferedOut::new();
    // Names of the files data lives in, by depth (computed on first use).
    let mut files: Option<Vec<String>> = None;
    let mut count = 0usize;
    let head = if json {
        "[".to_string()
    } else {
        format!("{:<16}{:<16}{:<16}File\n", "Offset", "Length", "Mapped to")
    };
    out.write(&head);
    let dev = opened.device.as_ref();
    let result = for_each_extent(dev, start, max_length, |e: &MapEntry| -> Result<(), Stop> {
        let first = count == 0;
        count += 1;
        let line = if json {
            json_entry(e, first)
        } else {
            // qemu-img only keeps the flags of the first entry as they are; later entries that
            // hold no data are folded into zeros before they are checked.
            if e.data && e.offset.is_none() && (first || !e.zero) {
                return Err(Stop::Unmappable);
            }
            if !e.data || e.zero {
                return Ok(());
            }
            let names = match &files {
                Some(f) => f,
                // An NBD export is named as given: opening it again for its name would need a
                // second connection, which a server may refuse while this one is open.
                None if qcow2kit::nbd::NbdAddress::is_uri(path.as_bytes()) && e.depth == 0 => {
                    let name = qcow2kit::nbd::NbdAddress::parse(path)?.qemu_filename();
                    files.insert(vec![name])
                }
                None => files.insert(layer_files(
                    &opened.path,
                    opened.format,
                    locking(p.has("U")),
                )?),
            };
            let name = names
                .get(e.depth as usize)
                .map(String::as_str)
                .unwrap_or("");
            format!(
                "{}{}{}{}\n",
                hex16(e.start),
                hex16(e.length),
                hex16(e.offset.unwrap_or(0)),
                name
            )
        };
        out.write(&line);
        Ok(())
    });
    let code = match result {
        Ok(()) => {
            let tail = if !json {
                String::new()
            } else if count == 0 {
                // qemu-img prints its empty starting entry when there is nothing to map.
                let e = MapEntry {
                    start,
                    length: 0,
                    depth: 0,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                    offset: None,
                };
                format!("{}]\n", json_entry(&e, true))
            } else {
                "]\n".to_string()
            };
            out.write(&tail);
            0
        }
        Err(Stop::Unmappable) => {
            out.flush();
            fail("File contains external, encrypted or compressed clusters.")
        }
        Err(Stop::Lib(e)) => {
            out.flush();
            fail(format!("Could not read file metadata: {e}"))
        }
    };
    out.flush();
    code
}

fn json_entry(e: &MapEntry, first: bool) -> String {
    let mut s = String::new();
    if !first {
        s.push_str(",\n");
    }
    s.push_str(&format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \
         \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    ));
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// The file that holds the data of each layer, by depth, named as qemu-img names it: the
/// image's own name (backing files resolved against the image that names them), or for a qcow2
/// image with an external data file the data file's name as recorded.
fn layer_files(
    path: &Path,
    format: qcow2kit::Format,
    locking: qcow2kit::chain::Locking,
) -> Result<Vec<String>, qcow2kit::Error> {
    Ok(backing_chain_info(path, Some(format), locking)?
        .into_iter()
        .map(|i| {
            match i
                .qcow2
                .as_ref()
                .and_then(|q| q.data_file_raw.and(q.data_file.clone()))
            {
                Some(data_file) => data_file,
                None => i.filename,
            }
        })
        .collect())
}
