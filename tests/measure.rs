//! The library's `measure` against qemu-img 10.x's figures, on sources opened through the chain
//! layer: a backing chain, a metadata-preallocated image (data clusters over file holes need
//! no room), an image with persistent bitmaps; and hostile sizes refused without overflow.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::ops::measure::{measure, CreationOptions, MeasureFormat, MeasureSource};
use qcow2kit::Format;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn sh(script: &str, dir: &Path) {
    let o = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// qemu-img's figures for `-O qcow2 -o OPTS FILE`: (required, fully allocated, bitmaps).
fn qemu(file: &Path, opts: &str) -> (u64, u64, Option<u64>) {
    let o = Command::new("qemu-img")
        .args(["measure", "--output=json", "-O", "qcow2", "-o", opts])
        .arg(file)
        .output()
        .expect("qemu-img (qemu-utils) is needed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    (
        v["required"].as_u64().expect("required"),
        v["fully-allocated"].as_u64().expect("fully-allocated"),
        v["bitmaps"].as_u64(),
    )
}

fn ours(file: &Path, opts: &str) -> (u64, u64, Option<u64>) {
    let opened = open(file, Format::Qcow2, &OpenOptions::qemu_compatible()).expect("open");
    let src = MeasureSource {
        device: opened.device.as_ref(),
        bitmaps: opened.qcow2.as_ref().map(|q| q.bitmaps()),
        data_files: opened
            .layers
            .iter()
            .map(|l| l.qcow2.as_ref().map(|q| q.storage().clone()))
            .collect(),
    };
    let mut o = CreationOptions::new(MeasureFormat::Qcow2);
    o.add(opts, |v| v.parse().ok()).expect("options");
    let m = measure(MeasureFormat::Qcow2, &o, None, Some(&src)).expect("measure");
    (m.required, m.fully_allocated, m.bitmaps)
}

#[test]
fn library_figures_match_qemu_img() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 64M
         qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 40M 5k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
         qemu-io -c 'write -P 3 1M 1M' -c 'write -z 40M 64k' top.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o preallocation=metadata pm.qcow2 40M
         qemu-io -c 'write -P 4 8M 100k' pm.qcow2 >/dev/null
         qemu-img create -q -f qcow2 bm.qcow2 3G
         qemu-img bitmap --add -g 512 bm.qcow2 fine
         qemu-img bitmap --add bm.qcow2 coarse",
        d,
    );
    for f in ["top.qcow2", "pm.qcow2", "bm.qcow2"] {
        for opts in [
            "cluster_size=65536",
            "cluster_size=512",
            "cluster_size=2097152,refcount_bits=1",
            "extended_l2=on",
            "compat=0.10",
        ] {
            assert_eq!(ours(&d.join(f), opts), qemu(&d.join(f), opts), "{f} {opts}");
        }
    }
}

#[test]
fn sizes_past_the_limits_are_refused_not_wrapped() {
    let mut o = CreationOptions::new(MeasureFormat::Qcow2);
    o.add("cluster_size=2097152", |v| v.parse().ok()).unwrap();
    for size in [u64::MAX, u64::MAX - 511, 1 << 63, 7 << 60] {
        let r = measure(MeasureFormat::Qcow2, &o, Some(size), None);
        assert!(r.is_err(), "{size}: {r:?}");
    }
    let raw = CreationOptions::new(MeasureFormat::Raw);
    assert!(measure(MeasureFormat::Raw, &raw, Some(u64::MAX), None).is_err());
}
