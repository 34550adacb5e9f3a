//! Operations stopped by their progress callback: they fail with `Error::Cancelled`, having
//! stopped early, and leave their targets as a failed operation leaves them, judged by
//! qemu-img.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::ops::commit::{commit, open_for_commit, CommitOptions};
use qcow2kit::ops::compare::{compare_with_progress, CompareStage};
use qcow2kit::ops::convert::{convert, ConvertOptions, Target, TargetFormat};
use qcow2kit::{Error, Format, OpenOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use write_helpers::{assert_check_clean, export_raw, open_ro, qemu_img, qemu_io, scratch};

/// A callback that goes on until `limit` bytes are done, counting its calls.
fn stop_after(limit: u64, calls: &AtomicU64) -> impl Fn(u64, u64) -> bool + Sync + '_ {
    move |done, _total| {
        calls.fetch_add(1, Ordering::SeqCst);
        done < limit
    }
}

#[test]
fn a_cancelled_qcow2_convert_leaves_no_target_and_no_temporary_file() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "64M"], d);
    qemu_io(&["-c", "write -P 0x33 0 64M", "src.qcow2"], d);
    let src = open_ro(&d.join("src.qcow2"));
    let calls = AtomicU64::new(0);
    let stop = stop_after(8 << 20, &calls);
    let opts = ConvertOptions {
        format: TargetFormat::Qcow2(Default::default()),
        workers: 1,
        progress: Some(&stop),
        ..Default::default()
    };
    let out = d.join("out.qcow2");
    let r = convert(src.device.as_ref(), Target::NewFile(&out), &opts);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    // One worker stops at the first report past the limit: well before the 64 MiB are copied.
    let n = calls.load(Ordering::SeqCst);
    assert!(n > 0 && n < 64, "{n} progress reports");
    let left: Vec<_> = std::fs::read_dir(d)
        .expect("scratch dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("src.qcow2")],
        "{left:?}"
    );
}

#[test]
fn a_cancelled_commit_leaves_both_images_clean_and_reading_as_before() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "32M"], d);
    qemu_io(&["-c", "write -P 0x11 0 32M", "base.qcow2"], d);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    qemu_io(&["-c", "write -P 0x22 0 32M", "top.qcow2"], d);
    let before = export_raw(d, "top.qcow2", None, "before.raw");

    let image = open_for_commit(
        &d.join("top.qcow2"),
        Format::Qcow2,
        None,
        &OpenOptions::qemu_compatible(),
    )
    .expect("open for commit");
    let calls = AtomicU64::new(0);
    let stop = stop_after(4 << 20, &calls);
    let r = commit(
        &image,
        &CommitOptions {
            base: None,
            keep: false,
            progress: Some(&stop),
            workers: 1,
        },
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    image.close().expect("close");
    assert_check_clean(d, "base.qcow2", "base after a cancelled commit");
    assert_check_clean(d, "top.qcow2", "top after a cancelled commit");
    // The top image was not emptied: the chain reads what it read before.
    assert!(export_raw(d, "top.qcow2", None, "after.raw") == before);
}

#[test]
fn a_cancelled_compare_says_so() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "16M"], d);
    qemu_io(&["-c", "write -P 0x44 0 16M", "a.qcow2"], d);
    let a = open_ro(&d.join("a.qcow2"));
    let mut reports = 0;
    let r = compare_with_progress(
        a.device.as_ref(),
        a.device.as_ref(),
        false,
        &mut |done, _| {
            reports += 1;
            done < (1 << 20)
        },
    );
    let e = r.expect_err("cancelled");
    assert_eq!(e.stage, CompareStage::Progress);
    assert!(matches!(e.source, Error::Cancelled));
    assert!(reports < 16, "{reports} reports");
}
