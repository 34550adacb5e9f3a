//! `rebase`: safe (data copied so the top reads the same), unsafe (`-u`, header only), flatten
//! (`-b ""`), pull (a base further down), compressed (`-c`), and the refusals.

use super::harness::{every, qcow2, standalone, Layer, Work};
use std::fs;

/// A 4 KiB-cluster base with data, a zeroed and a discarded range.
const BASE: Layer = qcow2(
    "base",
    "4M",
    "cluster_size=4k",
    &[
        "write -P 0x11 0 4M",
        "write -z 1M 256k",
        "discard 3584k 256k",
    ],
);

/// A 64 KiB-cluster top over [`BASE`] with data, zero flags, a compressed cluster and a discard.
const TOP: Layer = qcow2(
    "top",
    "4M",
    "",
    &[
        "write -P 0x22 512k 512k",
        "write -z 2M 128k",
        "write -c -P 0x23 3M 64k",
        "discard 3200k 64k",
    ],
);

/// `base <- top`, the top's content recorded.
fn two_deep(case: &str) -> Work {
    let w = Work::new(case);
    w.chain(&[BASE, TOP]);
    w.record("top");
    w
}

/// Safe rebase judged: output, the top reading as before, every image clean, infos equal.
fn safe(w: &Work, args: &[&str]) {
    w.judge(args, true, &[("top", "top")]);
}

#[test]
fn onto_a_shorter_backing() {
    let w = two_deep("rebase onto a shorter backing");
    w.chain(&[qcow2(
        "other",
        "2M",
        "cluster_size=512",
        &["write -P 0x33 0 2M", "write -z 64k 64k"],
    )]);
    w.split();
    safe(&w, &["rebase", "-b", "other", "-F", "qcow2", "top"]);
}

#[test]
fn onto_a_longer_backing_under_a_larger_top() {
    // The top (6 MiB) is longer than its old backing (4 MiB): 4–6 MiB read as zeros before, and
    // the new backing has data there, so zeros must be written into the top.
    let w = Work::new("rebase onto a longer backing");
    w.chain(&[
        BASE,
        qcow2(
            "top",
            "6M",
            "cluster_size=2M,extended_l2=on",
            &[
                "write -P 0x22 0 64k",
                "write -P 0x24 4M 1k",
                "write -z 5M 4k",
            ],
        ),
    ]);
    w.record("top");
    w.chain(&[qcow2(
        "other",
        "8M",
        "extended_l2=on",
        &["write -P 0x33 0 8M", "discard 1M 1M"],
    )]);
    w.split();
    safe(&w, &["rebase", "-b", "other", "-F", "qcow2", "top"]);
}

#[test]
fn onto_a_raw_backing() {
    let w = two_deep("rebase onto a raw backing");
    w.chain(&[Layer {
        name: "other.raw",
        size: "3M",
        opts: "",
        steps: &["write -P 0x44 0 1M", "write -P 0x45 2M 512k"],
    }]);
    w.split();
    safe(&w, &["rebase", "-b", "other.raw", "-F", "raw", "top"]);
}

#[test]
fn onto_identical_data_copies_nothing() {
    // A copy of the old backing in another cluster size, and the old backing itself: nothing
    // differs, so nothing is written.
    every(["other", "base"], |other| {
        let w = two_deep(&format!("rebase onto identical data ({other})"));
        w.img(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "base",
            "other",
        ]);
        w.split();
        let before = w.len("top");
        safe(&w, &["rebase", "-b", other, "-F", "qcow2", "top"]);
        assert_eq!(
            w.len("top"),
            before,
            "the top grew (qemu-img's, qcow2kit's)"
        );
    });
}

#[test]
fn sizes_off_the_cluster_grid() {
    // Sizes that end inside a cluster of every layer: the last, partial clusters are compared
    // and copied as far as the image reaches.
    let w = Work::new("rebase with sizes off the cluster grid");
    w.chain(&[
        qcow2(
            "base",
            "3585k",
            "cluster_size=2M",
            &["write -P 0x11 0 3585k"],
        ),
        qcow2(
            "top",
            "3001k",
            "",
            &["write -P 0x22 64k 64k", "write -z 2944k 57k"],
        ),
    ]);
    w.record("top");
    w.chain(&[Layer {
        name: "other.raw",
        size: "2999k",
        opts: "",
        steps: &["write -P 0x33 0 2999k"],
    }]);
    w.split();
    safe(&w, &["rebase", "-b", "other.raw", "-F", "raw", "top"]);
}

#[test]
fn unsafe_changes_the_header_only() {
    let w = two_deep("rebase -u");
    w.chain(&[qcow2("other", "4M", "", &["write -P 0x55 0 4M"])]);
    w.split();
    let before = w.len("top");
    // The content changes (the new backing shows through): both sides read the same, and the
    // top's own data is what it was.
    w.judge(
        &["rebase", "-u", "-b", "other", "-F", "qcow2", "top"],
        true,
        &[],
    );
    w.assert_same_content("top", false);
    assert_own_data_kept(&w);
    assert_eq!(w.len("top"), before, "the top's length changed");
}

/// The top's own clusters (backing not opened) read in `q/` and `k/` as in `src/`.
fn assert_own_data_kept(w: &Work) {
    let src = standalone(&w.src.join("top"));
    every([&w.q, &w.k], |d| {
        let now = standalone(&d.join("top"));
        let out = super::harness::exec("qemu-img", &["compare", &src, &now], d);
        assert_eq!(
            out.status.code(),
            Some(0),
            "the top's own data changed in {}: {}",
            d.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    });
}

#[test]
fn unsafe_onto_a_missing_file() {
    let w = two_deep("rebase -u onto a missing file");
    w.split();
    w.judge(
        &["rebase", "-u", "-b", "nowhere", "-F", "qcow2", "top"],
        true,
        &[],
    );
    w.assert_same_content("top", true);
    assert_own_data_kept(&w);
}

/// `base.raw <- mid (v2, 512-byte clusters) <- top (6 MiB, `top_opts`)`, the top's content
/// recorded; `top_steps` are run on the top.
fn three_deep(case: &str, top_opts: &str, top_steps: &[&str]) -> Work {
    let w = Work::new(case);
    w.chain(&[
        Layer {
            name: "base.raw",
            size: "4M",
            opts: "",
            steps: &["write -P 0x11 0 3M", "write -P 0x12 3584k 4k"],
        },
        qcow2(
            "mid",
            "5M",
            "compat=0.10,cluster_size=512",
            &[
                "write -P 0x21 1M 1M",
                "write -z 2M 3k",
                "write -c -P 0x22 4M 512",
                "write -P 0x23 4608k 4k",
            ],
        ),
        qcow2("top", "6M", top_opts, top_steps),
    ]);
    w.record("top");
    w
}

const MIXED_TOP: &[&str] = &[
    "write -P 0x31 0 4k",
    "write -z 1M 8k",
    "write -c -P 0x32 2M 64k",
    "discard 3M 64k",
    "write -P 0x33 5M 1M",
];

#[test]
fn flatten() {
    let w = three_deep("rebase -b \"\"", "extended_l2=on", MIXED_TOP);
    w.split();
    safe(&w, &["rebase", "-b", "", "top"]);
}

#[test]
fn flatten_with_an_internal_snapshot() {
    let mut steps = MIXED_TOP.to_vec();
    steps.push("snapshot -c s1");
    steps.push("write -P 0x34 64k 64k");
    let w = three_deep(
        "rebase -b \"\" of a top with a snapshot",
        "extended_l2=on",
        &steps,
    );
    w.split();
    safe(&w, &["rebase", "-b", "", "top"]);
}

#[test]
fn compressed_flatten() {
    // Not over an extended-L2 top: qemu-img 10.0.2 aborts there (assertion
    // `!bdrv_is_allocated(…)` in img_rebase, partly allocated clusters).
    let w = three_deep("rebase -c -b \"\"", "", MIXED_TOP);
    w.split();
    safe(&w, &["rebase", "-c", "-b", "", "top"]);
    // What qcow2kit copies it compresses too: its top is not much larger than qemu-img's.
    let (q, k) = w.len("top");
    assert!(
        k * 100 <= q * 115,
        "qcow2kit's compressed top {k} bytes vs qemu-img's {q}"
    );
}

#[test]
fn pull_from_further_down() {
    let w = Work::new("rebase to a base further down");
    w.chain(&[
        qcow2("l0", "4M", "cluster_size=2M", &["write -P 0x10 0 4M"]),
        qcow2("l1", "4M", "cluster_size=4k", &["write -P 0x11 1M 1M"]),
        qcow2("l2", "3M", "", &["write -z 0 1M", "write -P 0x12 2M 64k"]),
        qcow2("top", "4M", "cluster_size=512", &["write -P 0x13 1536k 4k"]),
    ]);
    w.record("top");
    w.split();
    safe(&w, &["rebase", "-b", "l1", "-F", "qcow2", "top"]);
}

#[test]
fn v2_top_over_zeros_onto_data() {
    // The old backing reads zeros where the new one has data; a v2 top has no zero flag, so
    // the zeros must be written as data.
    let w = Work::new("rebase of a v2 top");
    w.chain(&[
        qcow2("base", "4M", "compat=0.10", &["write -P 0x11 0 1M"]),
        qcow2(
            "top",
            "4M",
            "compat=0.10,cluster_size=4k",
            &["write -P 0x21 3M 4k"],
        ),
    ]);
    w.record("top");
    w.chain(&[qcow2("other", "4M", "", &["write -P 0x31 0 4M"])]);
    w.split();
    safe(&w, &["rebase", "-b", "other", "-F", "qcow2", "top"]);
}

#[test]
fn standalone_image_gets_a_backing() {
    // Its unallocated clusters read as zeros before: they must read so after.
    let w = Work::new("rebase of an image without backing");
    w.chain(&[qcow2(
        "lone",
        "4M",
        "",
        &["write -P 0x11 1M 1M", "write -z 3M 64k"],
    )]);
    w.record("lone");
    w.chain(&[qcow2("other", "4M", "", &["write -P 0x31 0 4M"])]);
    w.split();
    w.judge(
        &["rebase", "-b", "other", "-F", "qcow2", "lone"],
        true,
        &[("lone", "lone")],
    );
}

#[test]
fn options_progress_quiet_and_format() {
    every(
        [
            &["rebase", "-p", "-b", "other", "-F", "qcow2", "top"][..],
            &[
                "rebase", "-q", "-f", "qcow2", "-b", "other", "-F", "qcow2", "top",
            ],
            &["rebase", "-p", "-u", "-b", "other", "-F", "qcow2", "top"],
            // -u without -b drops the backing file, as -u -b "" does.
            &["rebase", "-u", "top"],
            &["rebase", "-c", "-u", "-b", "other", "-F", "qcow2", "top"],
        ],
        |args| {
            let w = two_deep(&format!("rebase {}", args.join(" ")));
            w.chain(&[qcow2("other", "4M", "", &["write -P 0x33 0 2M"])]);
            w.split();
            let reads: &[(&str, &str)] = if args.contains(&"-u") {
                &[]
            } else {
                &[("top", "top")]
            };
            w.judge(args, true, reads);
        },
    );
}

/// `base <- d/top` (backing name `../base`, relative to the top's directory) and `other` beside
/// `base`; the top's content recorded.
pub fn in_a_subdirectory(case: &str) -> Work {
    let w = Work::new(case);
    w.chain(&[BASE, qcow2("other", "4M", "", &["write -P 0x33 0 3M"])]);
    fs::create_dir(w.src.join("d")).expect("mkdir");
    w.img(&[
        "create", "-q", "-f", "qcow2", "-b", "../base", "-F", "qcow2", "d/top",
    ]);
    w.img(&["create", "-q", "-f", "qcow2", "d/other", "1M"]);
    w.io("d/top", "write -P 0x22 1M 64k");
    w.record("d/top");
    w.split();
    w
}

#[test]
fn names_relative_to_the_image_directory() {
    // `-b ../other` names the file beside `base`, from the top's directory, not from the
    // working directory (where `../other` does not exist); `-b other` names `d/other`.
    every(
        [
            &["rebase", "-b", "../other", "-F", "qcow2", "d/top"][..],
            &["rebase", "-b", "other", "-F", "qcow2", "d/top"],
            &["rebase", "-u", "-b", "../other", "-F", "qcow2", "d/top"],
        ],
        |args| {
            let w = in_a_subdirectory(&format!("{} in a subdirectory", args.join(" ")));
            let reads: &[(&str, &str)] = if args.contains(&"-u") {
                &[]
            } else {
                &[("d/top", "d/top")]
            };
            w.judge(args, true, reads);
        },
    );
}

#[test]
fn refusals() {
    // qemu-img without -F copies the data first, then refuses to write the header; qcow2kit
    // may refuse before copying (safer), so the top's length is not compared — its content,
    // backing fields and cleanliness are.
    let long = "a".repeat(1100);
    every(
        [
            &["rebase", "-b", "other", "top"][..],
            &["rebase", "-u", "-b", "other", "top"],
            &["rebase", "-b", "nowhere", "-F", "qcow2", "top"],
            &["rebase", "-u", "-b", &long, "-F", "qcow2", "top"],
            &[
                "rebase",
                "-f",
                "raw",
                "-b",
                "other",
                "-F",
                "qcow2",
                "other.raw",
            ],
            &["rebase", "top"],
            &["rebase", "-b", "other", "-F", "qcow2"],
            &["rebase", "-b", "other", "-F", "qcow2", "top", "top"],
            &["rebase", "-x", "-b", "other", "-F", "qcow2", "top"],
            &["rebase", "-b", "other", "-F", "nosuch", "top"],
            &[
                "rebase", "-f", "nosuch", "-b", "other", "-F", "qcow2", "top",
            ],
        ],
        |args| {
            let case = format!("rebase {}", args.join(" ")).replace(&long, "a×1100");
            let w = two_deep(&case);
            w.chain(&[qcow2("other", "4M", "", &["write -P 0x33 0 2M"])]);
            w.img(&["create", "-q", "-f", "raw", "other.raw", "1M"]);
            w.split();
            w.judge(args, false, &[("top", "top")]);
        },
    );
}
