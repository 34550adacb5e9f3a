//! `qcow2kit amend` side by side with `qemu-img amend` (qemu 10.x).
//!
//! Every case builds the same image twice with qemu-img / qemu-io (in `q/` and `k/`), runs the
//! same command line through qemu-img in `q/` and through qcow2kit in `k/`, and requires:
//! - the same exit code, standard output, and standard error once `qcow2kit` reads as
//!   `qemu-img`;
//! - `qemu-img info --output json` of both images the same (sizes of the file aside),
//!   `qemu-img check` of ours clean and `qemu-img compare` of the two identical;
//! - for the cases marked so, the two image files byte for byte the same.
//!
//! Cases where qcow2kit refuses what qemu-img does (downgrade of an image with bitmaps) or
//! refuses before changing anything (qemu-img may upgrade first) are tested apart.
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::{exec, tool};
use serde_json::Value;
use std::path::Path;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// How a case's image is made: `qemu-img create` options, then qemu-io commands.
struct Setup {
    create: &'static str,
    io: &'static [&'static str],
}

const DATA: &[&str] = &[
    "write -P 1 0 1M",
    "write -z 1M 1M",
    "write -P 2 2M 64k",
    "write -z 2M 64k",
    "write -z -u 3M 128k",
];

fn build(dir: &Path, s: &Setup) {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        dir,
    );
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !s.create.is_empty() {
        args.extend(["-o", s.create]);
    }
    args.extend(["a.qcow2", "64M"]);
    tool("qemu-img", &args, dir);
    if !s.io.is_empty() {
        let mut args = Vec::new();
        for c in s.io {
            args.extend(["-c", c]);
        }
        args.push("a.qcow2");
        tool("qemu-io", &args, dir);
    }
}

fn info(dir: &Path) -> Value {
    let out = exec("qemu-img", &["info", "--output", "json", "a.qcow2"], dir);
    assert!(out.status.success(), "qemu-img info failed");
    let mut v: Value = serde_json::from_slice(&out.stdout).expect("info json");
    fn strip(v: &mut Value) {
        if let Value::Array(a) = v {
            a.iter_mut().for_each(strip);
        }
        if let Value::Object(m) = v {
            for k in ["actual-size", "filename", "virtual-size", "dirty-flag"] {
                // The image's size matters; the file's length is the layout's (compared
                // byte for byte where the layouts must match).
                if k == "virtual-size"
                    && m.contains_key("format-specific")
                    && m.get("format").and_then(Value::as_str) != Some("file")
                {
                    continue;
                }
                m.remove(k);
            }
            for (_, x) in m.iter_mut() {
                strip(x);
            }
        }
    }
    strip(&mut v);
    v
}

/// Runs one case; `identical`: the image files must be byte-identical afterwards.
fn case(setup: &Setup, args: &[&str], identical: bool) {
    let root = tempfile::Builder::new()
        .prefix("qcow2kit-cli-amend-")
        .tempdir()
        .expect("temporary directory");
    let (q, k) = (root.path().join("q"), root.path().join("k"));
    for d in [&q, &k] {
        std::fs::create_dir(d).expect("mkdir");
        build(d, setup);
    }
    let mut full = vec!["amend"];
    full.extend(args);
    let qo = exec("qemu-img", &full, &q);
    let ko = exec(QCOW2KIT, &full, &k);
    let what = format!("amend {} on -o {}", args.join(" "), setup.create);
    assert_eq!(ko.status.code(), qo.status.code(), "{what}: exit status");
    assert_eq!(
        String::from_utf8_lossy(&ko.stdout),
        String::from_utf8_lossy(&qo.stdout),
        "{what}: stdout"
    );
    assert_eq!(
        String::from_utf8_lossy(&ko.stderr).replace("qcow2kit", "qemu-img"),
        String::from_utf8_lossy(&qo.stderr),
        "{what}: stderr"
    );
    assert_eq!(info(&k), info(&q), "{what}: qemu-img info");
    let check = exec("qemu-img", &["check", "a.qcow2"], &k);
    assert!(
        check.status.success(),
        "{what}: qemu-img check of ours: {check:?}"
    );
    let cmp = exec(
        "qemu-img",
        &[
            "compare",
            "-q",
            &q.join("a.qcow2").to_string_lossy(),
            "a.qcow2",
        ],
        &k,
    );
    assert!(cmp.status.success(), "{what}: contents differ");
    if identical {
        let a = std::fs::read(q.join("a.qcow2")).expect("read");
        let b = std::fs::read(k.join("a.qcow2")).expect("read");
        assert!(a == b, "{what}: the image files differ");
    }
}

const V3: Setup = Setup {
    create: "compat=1.1",
    io: DATA,
};
const V2: Setup = Setup {
    create: "compat=0.10",
    io: &["write -P 1 0 1M", "write -z 1M 64k"],
};
const V3_4K: Setup = Setup {
    create: "cluster_size=4k",
    io: DATA,
};
const LAZY: Setup = Setup {
    create: "lazy_refcounts=on",
    io: DATA,
};
const BACKED: Setup = Setup {
    create: "backing_file=base.qcow2,backing_fmt=qcow2",
    io: DATA,
};

#[test]
fn version_changes_match_qemu_img_byte_for_byte() {
    case(&V2, &["-o", "compat=1.1", "a.qcow2"], true);
    case(&V2, &["-o", "compat=v3", "a.qcow2"], true);
    case(&V3, &["-o", "compat=0.10", "a.qcow2"], true);
    case(&V3_4K, &["-o", "compat=0.10", "a.qcow2"], true);
    case(&BACKED, &["-o", "compat=0.10", "a.qcow2"], true);
    case(&V3, &["-p", "-o", "compat=0.10", "a.qcow2"], true);
    case(&V2, &["-p", "-o", "compat=1.1", "a.qcow2"], true);
    case(&V3, &["-q", "-o", "compat=1.1", "a.qcow2"], true);
    case(
        &LAZY,
        &["-o", "compat=0.10,lazy_refcounts=off", "a.qcow2"],
        true,
    );
}

#[test]
fn header_options_match_qemu_img() {
    case(&V3, &["-o", "lazy_refcounts=on", "a.qcow2"], true);
    case(&LAZY, &["-o", "lazy_refcounts=off", "a.qcow2"], true);
    case(
        &V2,
        &["-o", "compat=1.1,lazy_refcounts=on", "a.qcow2"],
        true,
    );
    case(&V3, &["-o", "lazy_refcounts", "a.qcow2"], true);
    case(&V3, &["-o", "refcount_bits=16", "a.qcow2"], true);
    // A new refcount structure: the same result, laid out differently.
    case(&V3, &["-o", "refcount_bits=64", "a.qcow2"], false);
    case(&V3, &["-o", "refcount_bits=1", "a.qcow2"], false);
    case(&V3, &["-o", "data_file_raw=off", "a.qcow2"], true);
    case(&V3, &["-o", "size=128M", "a.qcow2"], false);
    case(&V3, &["-o", "size=32M", "a.qcow2"], false);
    case(&V3, &["-o", "size=0", "a.qcow2"], true);
    case(
        &BACKED,
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
        true,
    );
    case(&V3, &["-o", "help", "a.qcow2"], true);
    case(&V3, &["-f", "qcow2", "-o", "?", "a.qcow2"], true);
}

#[test]
fn refusals_match_qemu_img() {
    for o in [
        "cluster_size=4k",
        "extended_l2=on",
        "compression_type=zstd",
        "preallocation=full",
        "encryption=on",
        "foo=1",
        "compat=1.2",
        "compat",
        "refcount_bits=3",
        "refcount_bits=128",
        "refcount_bits=abc",
        "lazy_refcounts=maybe",
        "size=abc",
        "size=-1",
        "size=100",
        "data_file=x",
        "data_file_raw=on",
        "backing_file=x",
        "backing_fmt=qcow2",
        "encrypt.new-secret=x",
        "compat=1.1,,x",
        "compat=1.1,",
        ",compat=1.1",
        "",
    ] {
        case(&V3, &["-o", o, "a.qcow2"][..], true);
    }
    case(&V2, &["-o", "lazy_refcounts=on", "a.qcow2"], true);
    case(&V2, &["-o", "refcount_bits=8", "a.qcow2"], true);
    case(
        &V3,
        &["-o", "compat=0.10,lazy_refcounts=on", "a.qcow2"],
        true,
    );
    case(&BACKED, &["-o", "backing_file=base.qcow2", "a.qcow2"], true);
    case(&BACKED, &["-o", "backing_file=", "a.qcow2"], true);
    case(
        &Setup {
            create: "extended_l2=on,cluster_size=64k",
            io: &[],
        },
        &["-o", "compat=0.10", "a.qcow2"],
        true,
    );
    case(
        &Setup {
            create: "refcount_bits=8",
            io: &[],
        },
        &["-o", "compat=0.10", "a.qcow2"],
        true,
    );
    case(&V3, &["a.qcow2"], true);
    case(&V3, &["-o", "compat=1.1"], true);
    case(&V3, &["-o", "compat=1.1", "a.qcow2", "b"], true);
    case(&V3, &["-o", "compat=1.1", "nonexistent"], true);
    case(&V3, &["-t", "foo", "-o", "compat=1.1", "a.qcow2"], true);
    case(&V3, &["-p", "-o", "foo=1", "a.qcow2"], true);
    case(&V3, &["-p", "-o", "compat=1.1"], true);
    case(&V3, &["-p", "a.qcow2"], true);
    case(&V3, &["-p", "-o", "backing_file=x", "a.qcow2"], true);
    case(&V3, &["-p", "-o", "help", "a.qcow2"], true);
    case(&V3, &["-x", "a.qcow2"], true);
    case(&V3, &["-o", "help", "a.qcow2", "b"], true);
}

/// qemu-img downgrades an image with persistent bitmaps, leaving them inconsistent and their
/// clusters leaked; qcow2kit refuses, and leaves the image as it was.
#[test]
fn downgrade_with_bitmaps_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    build(d, &V3);
    tool("qemu-img", &["bitmap", "--add", "a.qcow2", "b0"], d);
    let before = std::fs::read(d.join("a.qcow2")).expect("read");
    let out = exec(QCOW2KIT, &["amend", "-o", "compat=0.10", "a.qcow2"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("persistent bitmaps"));
    assert!(
        std::fs::read(d.join("a.qcow2")).expect("read") == before,
        "image changed"
    );
}

/// qemu-img upgrades the image before it refuses a backing file change; qcow2kit refuses
/// first, with the same message and status.
#[test]
fn refusal_leaves_the_image_unchanged() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    build(d, &V2);
    let before = std::fs::read(d.join("a.qcow2")).expect("read");
    let out = exec(
        QCOW2KIT,
        &["amend", "-o", "compat=1.1,backing_file=x", "a.qcow2"],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot amend the backing file"));
    assert!(
        std::fs::read(d.join("a.qcow2")).expect("read") == before,
        "image changed"
    );
}
