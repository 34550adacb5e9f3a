//! `commit`: the top's data written into its backing (or a deeper base with `-b`), the top
//! emptied unless `-d` (or `-b`) is given, a smaller base grown, a raw base, and the refusals.

use super::harness::{every, qcow2, Layer, Work};

/// A top with data, zero flags over data below, a compressed cluster and a discard.
const TOP_STEPS: &[&str] = &[
    "write -P 0x22 512k 512k",
    "write -z 1M 128k",
    "write -c -P 0x23 3M 64k",
    "discard 2M 64k",
];

/// `base (4 KiB clusters) <- top`, the top's content recorded; `top_size` may exceed the base.
fn two_deep(case: &str, base_size: &str, top_opts: &str) -> Work {
    let w = Work::new(case);
    w.chain(&[
        qcow2(
            "base",
            base_size,
            "cluster_size=4k",
            &["write -P 0x11 0 2M", "write -z 1536k 64k"],
        ),
        qcow2("top", "4M", top_opts, TOP_STEPS),
    ]);
    w.record("top");
    w
}

/// Bytes allocated in `name` itself, in `q/` and in `k/`.
fn allocated(w: &Work, name: &str) -> (u64, u64) {
    (w.allocated(&w.q, name), w.allocated(&w.k, name))
}

/// Commit judged: the base and the top both read as the top did before, every image clean,
/// infos equal.
fn committed(w: &Work, args: &[&str], base: &str) {
    w.judge(args, true, &[(base, "top"), ("top", "top")]);
}

#[test]
fn empties_the_top() {
    let w = two_deep("commit", "4M", "");
    w.split();
    committed(&w, &["commit", "top"], "base");
    assert_eq!(allocated(&w, "top"), (0, 0), "the top is not empty");
}

#[test]
fn keeps_the_top_with_d() {
    let w = two_deep("commit -d", "4M", "cluster_size=512");
    w.split();
    let before = w.allocated(&w.src, "top");
    assert!(before > 0);
    committed(&w, &["commit", "-d", "top"], "base");
    assert_eq!(allocated(&w, "top"), (before, before), "the top changed");
}

#[test]
fn into_a_smaller_base_grows_it() {
    let w = two_deep("commit into a smaller base", "2M", "extended_l2=on");
    w.split();
    committed(&w, &["commit", "top"], "base");
    assert_eq!(allocated(&w, "top"), (0, 0), "the top is not empty");
}

#[test]
fn into_a_raw_base() {
    let w = Work::new("commit into a raw base");
    w.chain(&[
        Layer {
            name: "base.raw",
            size: "4M",
            opts: "",
            steps: &["write -P 0x11 0 4M"],
        },
        qcow2("top", "4M", "cluster_size=16k", TOP_STEPS),
    ]);
    w.record("top");
    w.split();
    committed(&w, &["commit", "top"], "base.raw");
    assert_eq!(allocated(&w, "top"), (0, 0), "the top is not empty");
}

#[test]
fn into_a_v2_base_from_an_extended_l2_top() {
    // Zero flags of the top over data of a v2 base must land as zero data.
    let w = Work::new("commit into a v2 base");
    w.chain(&[
        qcow2(
            "base",
            "4M",
            "compat=0.10,cluster_size=512",
            &["write -P 0x11 0 4M"],
        ),
        qcow2("top", "4M", "extended_l2=on,cluster_size=64k", TOP_STEPS),
    ]);
    w.record("top");
    w.split();
    committed(&w, &["commit", "top"], "base");
    assert_eq!(allocated(&w, "top"), (0, 0), "the top is not empty");
}

#[test]
fn from_a_shorter_top() {
    // The base keeps its size and its data past the top's end, so it is compared between the
    // two sides only.
    let w = Work::new("commit of a top shorter than its base");
    w.chain(&[
        qcow2("base", "4M", "", &["write -P 0x11 0 4M"]),
        qcow2("top", "2M", "cluster_size=4k", TOP_STEPS[..2].as_ref()),
    ]);
    w.record("top");
    w.split();
    w.judge(&["commit", "top"], true, &[("top", "top")]);
    w.assert_same_content("base", false);
    assert_eq!(allocated(&w, "top"), (0, 0), "the top is not empty");
}

/// `l0 (2 MiB clusters) <- l1 (v2) <- l2 <- top (512-byte clusters)`, the top's and l1's
/// content recorded.
fn four_deep(case: &str) -> Work {
    let w = Work::new(case);
    w.chain(&[
        qcow2("l0", "3M", "cluster_size=2M", &["write -P 0x10 0 3M"]),
        qcow2(
            "l1",
            "4M",
            "compat=0.10,cluster_size=4k",
            &["write -P 0x11 1M 1M", "write -c -P 0x12 3M 4k"],
        ),
        qcow2("l2", "4M", "", &["write -z 0 1M", "write -P 0x12 2M 64k"]),
        qcow2(
            "top",
            "4M",
            "cluster_size=512",
            &["write -P 0x13 1536k 4k", "write -z 3M 512"],
        ),
    ]);
    w.record("top");
    w.record("l1");
    w
}

#[test]
fn to_a_deeper_base_with_b() {
    // -b implies -d: the top keeps its data; the layers between now sit on a changed base,
    // so they are compared between the two sides only.
    let w = four_deep("commit -b to a deeper base");
    w.split();
    let before = w.allocated(&w.src, "top");
    committed(&w, &["commit", "-b", "l0", "top"], "l0");
    every(["l1", "l2"], |mid| {
        w.assert_same_content(mid, false);
    });
    assert_eq!(allocated(&w, "top"), (before, before), "the top changed");
}

#[test]
fn a_middle_layer() {
    // Committing l1 into l0 empties l1; everything above reads as before.
    let w = four_deep("commit of a middle layer");
    w.split();
    w.judge(
        &["commit", "l1"],
        true,
        &[("l0", "l1"), ("l1", "l1"), ("top", "top")],
    );
    assert_eq!(allocated(&w, "l1"), (0, 0), "l1 is not empty");
}

#[test]
fn from_a_top_with_an_internal_snapshot() {
    let w = Work::new("commit of a top with a snapshot");
    let mut steps = TOP_STEPS.to_vec();
    steps.extend(["snapshot -c s1", "write -P 0x24 0 64k", "write -z 3M 64k"]);
    w.chain(&[
        qcow2("base", "4M", "", &["write -P 0x11 0 4M"]),
        qcow2("top", "4M", "", &steps),
    ]);
    w.record("top");
    w.split();
    committed(&w, &["commit", "top"], "base");
    let (q, k) = allocated(&w, "top");
    assert_eq!(q, k, "bytes allocated in the emptied top");
}

#[test]
fn options_progress_quiet_and_format() {
    every(
        [
            &["commit", "-p", "top"][..],
            &["commit", "-q", "-f", "qcow2", "top"],
            &["commit", "-p", "-d", "-b", "base", "top"],
        ],
        |args| {
            let w = two_deep(&format!("commit {}", args.join(" ")), "4M", "");
            w.split();
            committed(&w, args, "base");
        },
    );
}

#[test]
fn from_a_subdirectory() {
    // The backing name `../base` is resolved from the top's directory.
    let w = super::rebase::in_a_subdirectory("commit d/top");
    w.judge(
        &["commit", "d/top"],
        true,
        &[("base", "d/top"), ("d/top", "d/top")],
    );
    assert_eq!(allocated(&w, "d/top"), (0, 0), "the top is not empty");
}

#[test]
fn refusals() {
    every(
        [
            (&["commit", "base"][..], &[("base", "base")][..]),
            (&["commit", "-b", "nowhere", "top"], &[("top", "top")]),
            (&["commit", "-b", "top", "top"], &[("top", "top")]),
            (&["commit", "-f", "raw", "lone.raw"], &[]),
            (&["commit", "-f", "raw", "top"], &[]),
            (&["commit"], &[]),
            (&["commit", "top", "base"], &[("top", "top")]),
            (&["commit", "-x", "top"], &[("top", "top")]),
            (&["commit", "-f", "nosuch", "top"], &[("top", "top")]),
        ],
        |(args, reads)| {
            let w = two_deep(&format!("commit {}", args.join(" ")), "4M", "");
            w.record("base");
            w.img(&["create", "-q", "-f", "raw", "lone.raw", "1M"]);
            w.split();
            w.judge(args, false, reads);
        },
    );
}
