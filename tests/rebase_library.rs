//! The library's rebase and commit against qemu-img on files: the header an unsafe rebase
//! writes is byte-identical to qemu-img's (cluster sizes 512 B–64 KiB, v2 and v3, names added,
//! changed, removed, and too long), and a safe rebase through the library keeps the content
//! (judged by `qemu-img compare`) while a rebase onto identical data copies nothing.

#[allow(dead_code)]
#[path = "support/read_helpers.rs"]
mod read_helpers;

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::ops::rebase::{rebase, rebase_unsafe, BackingLink, RebaseOptions};
use qcow2kit::Format;
use read_helpers::Work;

/// A new backing link for the library, and the same as qemu-img arguments.
type Step<'a> = (Option<(&'a str, Format)>, &'a [&'a str]);

fn link(name: &str, format: Format) -> BackingLink {
    BackingLink {
        name: name.as_bytes().to_vec(),
        format,
    }
}

fn first_cluster(w: &Work, name: &str, cs: usize) -> Vec<u8> {
    let mut b = std::fs::read(w.path(name)).expect("read image");
    b.truncate(cs);
    b
}

#[test]
fn unsafe_rebase_writes_qemus_header() {
    let w = Work::new();
    let long = "y".repeat(600);
    for cs in [512usize, 4096, 8192, 65536] {
        for compat in ["0.10", "1.1"] {
            let o = format!("cluster_size={cs},compat={compat}");
            w.img(&["create", "-q", "-f", "qcow2", "-o", &o, "b.qcow2", "1M"]);
            let ob = format!("{o},backing_file=b.qcow2,backing_fmt=qcow2");
            w.img(&["create", "-q", "-f", "qcow2", "-o", &ob, "q.qcow2"]);
            std::fs::copy(w.path("q.qcow2"), w.path("k.qcow2")).expect("copy");
            let steps: [Step; 4] = [
                (
                    Some(("dir/new.img", Format::Raw)),
                    &["-b", "dir/new.img", "-F", "raw"],
                ),
                (None, &["-b", ""]),
                (Some((&long, Format::Qcow2)), &["-b", &long, "-F", "qcow2"]),
                (
                    Some(("b.qcow2", Format::Qcow2)),
                    &["-b", "b.qcow2", "-F", "qcow2"],
                ),
            ];
            for (to, args) in steps {
                let mut a = vec!["rebase", "-u"];
                a.extend_from_slice(args);
                a.push("q.qcow2");
                let qemu_ok = std::process::Command::new("qemu-img")
                    .args(&a)
                    .current_dir(w.dir.path())
                    .output()
                    .expect("qemu-img must be installed")
                    .status
                    .success();
                let mut opts = OpenOptions::qemu_compatible();
                opts.writable = true;
                opts.backing = qcow2kit::BackingPolicy::Ignore;
                let img = open(&w.path("k.qcow2"), Format::Qcow2, &opts).expect("open");
                let q = img.qcow2.clone().expect("qcow2");
                let to = to.map(|(n, f)| link(n, f));
                let ours = rebase_unsafe(&q, to.as_ref());
                assert_eq!(
                    ours.is_ok(),
                    qemu_ok,
                    "cs {cs} compat {compat} {args:?}: {ours:?}"
                );
                q.close().expect("close");
                drop((img, q));
                assert!(
                    first_cluster(&w, "q.qcow2", cs) == first_cluster(&w, "k.qcow2", cs),
                    "cs {cs} compat {compat} {args:?}: cluster 0 differs from qemu-img's"
                );
            }
            // The last step names an existing backing file again.
            let info = w.img(&["check", "k.qcow2"]);
            assert!(info.contains("No errors"), "{info}");
        }
    }
}

#[test]
fn safe_rebase_keeps_content_and_copies_nothing_onto_identical_data() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    w.io(
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 3M", "write -z 3M 512k"],
    );
    w.img(&["convert", "-O", "qcow2", "base.qcow2", "same.qcow2"]);
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    w.io("qcow2", "top.qcow2", &["write -P 2 1M 64k"]);
    w.img(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    let grown_by = |target: &str| {
        let before = std::fs::metadata(w.path("top.qcow2")).expect("stat").len();
        let mut opts = OpenOptions::qemu_compatible();
        opts.writable = true;
        let img = open(&w.path("top.qcow2"), Format::Qcow2, &opts).expect("open");
        let to = (!target.is_empty()).then(|| link(target, Format::Qcow2));
        let stats = rebase(&img, to.as_ref(), &RebaseOptions::default()).expect("rebase");
        drop(img);
        let after = std::fs::metadata(w.path("top.qcow2")).expect("stat").len();
        let cmp = w.img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            "before.raw",
        ]);
        assert!(cmp.contains("Images are identical"), "{target}: {cmp}");
        let check = w.img(&["check", "top.qcow2"]);
        assert!(check.contains("No errors"), "{target}: {check}");
        (after - before, stats)
    };
    let (grown, stats) = grown_by("same.qcow2");
    assert_eq!(grown, 0, "rebase onto identical data grew the image");
    assert_eq!((stats.copied, stats.zeroed), (0, 0));
    let (grown, stats) = grown_by("");
    assert!(
        grown > 0 && stats.copied > 0,
        "flatten copied nothing: {stats:?}"
    );
    let info = w.img(&["info", "top.qcow2"]);
    assert!(!info.contains("backing file"), "{info}");
}

#[test]
fn header_switch_after_the_refcount_table_grew_names_the_new_table() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB, so flattening 16 MiB of data
    // grows the table while the image is open; the header switch afterwards must name the new
    // table (it named the old one, and every refcount then read 0).
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "base.qcow2", "24M"]);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 16M"]);
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    w.img(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    let mut opts = OpenOptions::qemu_compatible();
    opts.writable = true;
    let img = open(&w.path("top.qcow2"), Format::Qcow2, &opts).expect("open");
    rebase(&img, None, &RebaseOptions::default()).expect("flatten");
    img.close().expect("close");
    let check = w.img(&["check", "top.qcow2"]);
    assert!(check.contains("No errors"), "{check}");
    let cmp = w.img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "top.qcow2",
        "before.raw",
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
}
