//! `ops::resize` against `qemu-img resize` on the same images: qcow2 and raw, every
//! preallocation mode, shrinking; judged by `qemu-img check`, `compare` and `map`.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::ops::create::Preallocation;
use qcow2kit::ops::resize::{resize, ResizeOptions};
use qcow2kit::{open, Error, Format, OpenOptions};
use std::path::Path;
use write_helpers::{assert_check_clean, assert_compare_identical, qemu_img, qemu_io, scratch};

fn rw(path: &Path, format: Format) -> qcow2kit::Opened {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    open(path, format, &opts).expect("open writable")
}

/// The allocation `qemu-img map` reports: runs of (start, length, depth, zero, data), with
/// the host offsets left out (they may differ) and neighbours of the same kind merged.
fn allocation(d: &Path, img: &str, fmt: &str) -> Vec<(u64, u64, u64, bool, bool)> {
    let out = qemu_img(&["map", "--output=json", "-f", fmt, img], d);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut merged: Vec<(u64, u64, u64, bool, bool)> = Vec::new();
    for r in runs {
        let u = |k: &str| r[k].as_u64().expect("a number");
        let b = |k: &str| r[k].as_bool().expect("a boolean");
        let run = (u("start"), u("length"), u("depth"), b("zero"), b("data"));
        match merged.last_mut() {
            Some(last) if (last.2, last.3, last.4) == (run.2, run.3, run.4) => last.1 += run.1,
            _ => merged.push(run),
        }
    }
    merged
}

#[test]
fn qcow2_grows_as_qemu_img_grows_it_in_every_preallocation_mode() {
    let dir = scratch();
    let d = dir.path();
    for (mode, name) in [
        (Preallocation::Off, "off"),
        (Preallocation::Metadata, "metadata"),
        (Preallocation::Falloc, "falloc"),
        (Preallocation::Full, "full"),
    ] {
        for img in ["ours.qcow2", "theirs.qcow2"] {
            qemu_img(&["create", "-q", "-f", "qcow2", img, "1M"], d);
            qemu_io(&["-c", "write -P 0x5a 0 1M", img], d);
        }
        let ours = rw(&d.join("ours.qcow2"), Format::Qcow2);
        let opts = ResizeOptions {
            preallocation: mode,
            ..ResizeOptions::default()
        };
        resize(&ours, 5 << 20, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        ours.close().expect("close");
        qemu_img(
            &[
                "resize",
                "-q",
                &format!("--preallocation={name}"),
                "theirs.qcow2",
                "5M",
            ],
            d,
        );
        assert_check_clean(d, "ours.qcow2", name);
        assert_compare_identical(d, "ours.qcow2", "qcow2", "theirs.qcow2", "qcow2", name);
        assert_eq!(
            allocation(d, "ours.qcow2", "qcow2"),
            allocation(d, "theirs.qcow2", "qcow2"),
            "{name}: allocation differs from qemu-img's"
        );
    }
}

#[test]
fn shrinking_needs_the_callers_say_so_and_preallocation_needs_growth() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "img.qcow2", "4M"], d);
    qemu_io(&["-c", "write -P 0x11 0 4M", "img.qcow2"], d);
    let img = rw(&d.join("img.qcow2"), Format::Qcow2);
    let shrink = ResizeOptions {
        shrink: true,
        ..ResizeOptions::default()
    };
    assert!(resize(&img, 2 << 20, &ResizeOptions::default()).is_err());
    assert!(matches!(
        resize(&img, 1000, &shrink),
        Err(Error::InvalidArgument(m)) if m == "The new size must be a multiple of 512"
    ));
    let full = ResizeOptions {
        preallocation: Preallocation::Full,
        ..ResizeOptions::default()
    };
    assert!(matches!(
        resize(&img, 2 << 20, &full),
        Err(Error::InvalidArgument(m)) if m == "Preallocation can only be used for growing images"
    ));
    resize(&img, 2 << 20, &shrink).expect("shrink");
    assert_eq!(img.device.size(), 2 << 20);
    img.close().expect("close");
    assert_check_clean(d, "img.qcow2", "after a shrink");
    qemu_img(&["create", "-q", "-f", "qcow2", "want.qcow2", "2M"], d);
    qemu_io(&["-c", "write -P 0x11 0 2M", "want.qcow2"], d);
    assert_compare_identical(d, "img.qcow2", "qcow2", "want.qcow2", "qcow2", "shrunk");
}

#[test]
fn raw_grows_sparse_or_allocated_as_qemu_img_grows_it() {
    let dir = scratch();
    let d = dir.path();
    for (mode, name) in [(Preallocation::Off, "off"), (Preallocation::Full, "full")] {
        for img in ["ours.raw", "theirs.raw"] {
            qemu_img(&["create", "-q", "-f", "raw", img, "1M"], d);
            qemu_io(&["-f", "raw", "-c", "write -P 0x33 0 1M", img], d);
        }
        let ours = rw(&d.join("ours.raw"), Format::Raw);
        let opts = ResizeOptions {
            preallocation: mode,
            ..ResizeOptions::default()
        };
        resize(&ours, 3 << 20, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        ours.close().expect("close");
        qemu_img(
            &[
                "resize",
                "-q",
                "-f",
                "raw",
                &format!("--preallocation={name}"),
                "theirs.raw",
                "3M",
            ],
            d,
        );
        assert_compare_identical(d, "ours.raw", "raw", "theirs.raw", "raw", name);
        assert_eq!(
            allocation(d, "ours.raw", "raw"),
            allocation(d, "theirs.raw", "raw"),
            "{name}: allocation differs from qemu-img's"
        );
    }
    let ours = rw(&d.join("ours.raw"), Format::Raw);
    let metadata = ResizeOptions {
        preallocation: Preallocation::Metadata,
        ..ResizeOptions::default()
    };
    assert!(matches!(
        resize(&ours, 4 << 20, &metadata),
        Err(Error::Unsupported(m)) if m == "Unsupported preallocation mode: metadata"
    ));
}
