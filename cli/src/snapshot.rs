//! `qcow2kit snapshot [-l | -a NAME | -c NAME | -d NAME] [-f FMT] [-q] [-U] FILE`: what
//! qemu-img snapshot does, with its messages and exit statuses.
//!
//! - `-l` (the default) prints the snapshot table as `qemu-img info` does, nothing when there
//!   are no snapshots;
//! - `-c NAME` creates a snapshot (the name cut to 255 bytes, as qemu-img's fixed buffer does;
//!   names need not be unique);
//! - `-a NAME` applies the snapshot whose id, else whose name, is NAME;
//! - `-d NAME` deletes the first snapshot whose name is NAME (qemu-img 10 finds it by name
//!   only).
//!
//! The image is opened with its backing chain, as qemu-img opens it; writable for `-a`, `-c`
//! and `-d`, which refuse `-U`. Raw images have no snapshots.
//!
//! Not covered: `--object`, `--image-opts`.

use crate::args::{opt, Spec};
use crate::common::{fail, open_error_text, parse_args, parse_format, qemu_options, try_help};
use crate::info::dump_snapshots;
use qcow2kit::chain::{open, probe_file};
use qcow2kit::error::strerror;
use qcow2kit::ops::info::SnapshotInfo;
use qcow2kit::Format;
use qcow2kit::{NewSnapshot, Qcow2Image, SnapshotRef};
use std::path::Path;

const SPECS: &[Spec] = &[
    opt(Some('l'), None, false, "l"),
    opt(Some('a'), None, true, "a"),
    opt(Some('c'), None, true, "c"),
    opt(Some('d'), None, true, "d"),
    opt(Some('f'), None, true, "f"),
    opt(Some('q'), None, false, "q"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit snapshot [-f FMT] [-l | -a|-c|-d SNAPSHOT] [-q] [-U] FILE

Lists, creates, applies or deletes internal snapshots as qemu-img snapshot does.
";

/// Longest name qemu-img snapshot -c keeps.
const MAX_NAME: usize = 255;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    List,
    Create,
    Apply,
    Delete,
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let Ok(p) = parse_args(args, SPECS, "snapshot") else {
        return 1;
    };
    if p.has("help") {
        out!("{HELP}");
        return 0;
    }
    let given: Vec<(Action, &str)> = [
        (Action::List, "l"),
        (Action::Apply, "a"),
        (Action::Create, "c"),
        (Action::Delete, "d"),
    ]
    .iter()
    .flat_map(|&(a, k)| p.all(k).iter().map(move |v| (a, v.as_str())))
    .collect();
    if given.len() > 1 {
        return fail(format!(
            "Cannot mix '-l', '-a', '-c', '-d'\n{}",
            try_help("snapshot")
        ));
    }
    let (action, name) = given.first().copied().unwrap_or((Action::List, ""));
    let [operand] = p.operands.as_slice() else {
        return fail(format!(
            "Expecting one image file name\n{}",
            try_help("snapshot")
        ));
    };
    let arg = match crate::common::image_operand(&p, operand, p.last("f")) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let path = &arg.path;
    let write = action != Action::List;
    if write && p.has("U") {
        return fail(format!(
            "Could not open '{path}': force-share=on can only be used with read-only images"
        ));
    }
    if let Some(f) = arg.format.as_deref().filter(|f| parse_format(f).is_err()) {
        return fail(format!("Could not open '{path}': Unknown driver '{f}'"));
    }
    let could_not_open = |e: &qcow2kit::Error| match e {
        qcow2kit::Error::Io { source, .. } => format!(
            "Could not open '{path}': Could not open '{path}': {}",
            strerror(source)
        ),
        e => format!("Could not open '{path}': {}", open_error_text(e)),
    };
    let format = match arg.format.as_deref() {
        Some(f) => parse_format(f),
        None => probe_file(Path::new(path)).map_err(|e| could_not_open(&e)),
    };
    let format = match format {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let mut opts = qemu_options();
    arg.apply(&mut opts);
    opts.writable = write;
    opts.locking = crate::common::locking(p.has("U"));
    let opened = match open(Path::new(path), format, &opts) {
        Ok(o) => o,
        Err(e) => return fail(could_not_open(&e)),
    };
    let img = match (&opened.qcow2, opened.format) {
        (Some(q), Format::Qcow2) => Some(q.clone()),
        _ => None,
    };
    let r = match action {
        Action::List => {
            if let Some(img) = &img {
                let snaps: Vec<SnapshotInfo> =
                    img.snapshots().iter().map(SnapshotInfo::from).collect();
                let mut out = String::new();
                dump_snapshots(&mut out, &snaps, &crate::localtime::Zone::load());
                out!("{out}");
            }
            Ok(())
        }
        Action::Create => create(img.as_deref(), name),
        Action::Apply => apply(img.as_deref(), name),
        Action::Delete => delete(img.as_deref(), name),
    };
    let r = r.and_then(|()| match &img {
        Some(i) if write => i
            .close()
            .map_err(|e| format!("Could not close '{path}': {}", text(&e))),
        _ => Ok(()),
    });
    match r {
        Ok(()) => 0,
        Err(msg) => fail(msg),
    }
}

/// A library error as qemu-img words the errno behind it.
fn text(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => strerror(source),
        other => other.to_string(),
    }
}

fn create(img: Option<&Qcow2Image>, name: &str) -> Result<(), String> {
    let fail = |why: String| format!("Could not create snapshot '{name}': {why}");
    let img = img.ok_or_else(|| fail("Operation not supported".into()))?;
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    img.create_snapshot(&NewSnapshot::now(&name[..end]))
        .map(|_| ())
        .map_err(|e| fail(text(&e)))
}

fn apply(img: Option<&Qcow2Image>, name: &str) -> Result<(), String> {
    let fail = |why: String| format!("Could not apply snapshot '{name}': {why}");
    let img = img.ok_or_else(|| fail("Block driver does not support snapshots".into()))?;
    img.apply_snapshot(&SnapshotRef::IdOrName(name.to_string()))
        .map_err(|e| match e {
            qcow2kit::Error::SnapshotNotFound(_) => {
                fail("Failed to load snapshot: No such file or directory".into())
            }
            // QEMU refuses before the driver is asked: no "Failed to load snapshot".
            qcow2kit::Error::Unsupported(m) if m == Qcow2Image::APPLY_WITH_BITMAPS => fail(m),
            e => fail(format!("Failed to load snapshot: {}", text(&e))),
        })
}

fn delete(img: Option<&Qcow2Image>, name: &str) -> Result<(), String> {
    let fail = |why: String| format!("Could not delete snapshot '{name}': {why}");
    let img = img.ok_or_else(|| fail("snapshot not found".into()))?;
    img.delete_snapshot(&SnapshotRef::Name(name.to_string()))
        .map(|_| ())
        .map_err(|e| match e {
            qcow2kit::Error::SnapshotNotFound(_) => fail("snapshot not found".into()),
            e => fail(text(&e)),
        })
}
