//! `qcow2kit convert -O qcow2 SRC -` (and to a FIFO): the image written through a pipe into a
//! file must be `qemu-img check` clean, `qemu-img compare` identical to the source, and the same
//! bytes on every run; sources from empty to a sparse 16 TiB disk, a backing chain flattened,
//! a top layer kept over `-B`, cluster sizes and refcount widths, v2, compressed (zlib and
//! zstd, incompressible and zero clusters, 1- and 2-bit refcounts that cap how many compressed
//! clusters share a host cluster), extended L2; and read back from a pipe (`convert - DST`),
//! with images that point backwards refused.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use std::path::Path;
use std::process::{Command, Stdio};

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

fn sh(script: &str, dir: &Path) -> String {
    let o = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `qcow2kit convert ARGS -` with its output piped into `out`.
fn stream_into(args: &[&str], out: &Path, dir: &Path) {
    let f = std::fs::File::create(out).expect("create");
    let o = Command::new(QCOW2KIT)
        .arg("convert")
        .args(args)
        .arg("-")
        .current_dir(dir)
        .stdout(Stdio::from(f))
        .output()
        .expect("qcow2kit");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn sources(dir: &Path) {
    sh(
        "qemu-img create -q -f qcow2 empty.qcow2 0
         qemu-img create -q -f qcow2 base.qcow2 64M
         qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 40M 5k' -c 'write -P 9 63M 1M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
         qemu-io -c 'write -P 3 1M 1M' -c 'write -z 40M 64k' -c 'write -P 4 50M 700' top.qcow2 >/dev/null
         qemu-img create -q -f qcow2 sparse.qcow2 16T
         qemu-io -c 'write -P 5 8T 1M' -c 'write -P 6 16383G 4k' sparse.qcow2 >/dev/null
         head -c 3000000 /dev/urandom > odd.raw
         head -c 2000000 /dev/urandom > mixed.raw
         head -c 1000000 /dev/zero >> mixed.raw
         yes 'qcow2 stream' | head -c 3000000 >> mixed.raw",
        dir,
    );
}

#[test]
fn streamed_images_are_valid_identical_and_reproducible() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    let cases: &[(&str, &[&str])] = &[
        ("empty.qcow2", &[]),
        ("base.qcow2", &[]),
        ("top.qcow2", &[]),
        ("top.qcow2", &["-o", "cluster_size=512"]),
        ("top.qcow2", &["-o", "cluster_size=2M,refcount_bits=1"]),
        ("top.qcow2", &["-o", "compat=0.10"]),
        ("top.qcow2", &["-o", "refcount_bits=64,cluster_size=4096"]),
        ("sparse.qcow2", &[]),
        ("odd.raw", &["-f", "raw"]),
        ("top.qcow2", &["-c"]),
        ("top.qcow2", &["-c", "-o", "compression_type=zstd"]),
        ("top.qcow2", &["-c", "-o", "compat=0.10"]),
        ("sparse.qcow2", &["-c"]),
        ("empty.qcow2", &["-c"]),
        ("mixed.raw", &["-f", "raw", "-c"]),
        (
            "mixed.raw",
            &["-f", "raw", "-c", "-o", "cluster_size=4096,refcount_bits=1"],
        ),
        (
            "mixed.raw",
            &["-f", "raw", "-c", "-o", "cluster_size=2M,refcount_bits=2"],
        ),
        ("mixed.raw", &["-f", "raw", "-c", "-m", "1"]),
        ("top.qcow2", &["-o", "extended_l2=on"]),
        (
            "top.qcow2",
            &["-c", "-o", "extended_l2=on,cluster_size=16k"],
        ),
        ("sparse.qcow2", &["-o", "extended_l2=on,cluster_size=2M"]),
        ("mixed.raw", &["-f", "raw", "-c", "-o", "extended_l2=on"]),
    ];
    for (src, opts) in cases {
        let mut args: Vec<&str> = vec!["-O", "qcow2"];
        args.extend_from_slice(opts);
        args.push(src);
        stream_into(&args, &d.join("s1.qcow2"), d);
        stream_into(&args, &d.join("s2.qcow2"), d);
        let a = std::fs::read(d.join("s1.qcow2")).expect("s1");
        let b = std::fs::read(d.join("s2.qcow2")).expect("s2");
        assert!(a == b, "{src} {opts:?}: two runs differ");
        let fmt = if src.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        sh("qemu-img check -q s1.qcow2", d);
        sh(
            &format!("qemu-img compare -q -f {fmt} -F qcow2 {src} s1.qcow2"),
            d,
        );
    }
}

#[test]
fn a_top_layer_streamed_over_its_backing_file_keeps_zeros_and_holes() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    stream_into(
        &[
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &d.join("over.qcow2"),
        d,
    );
    sh("qemu-img check -q over.qcow2", d);
    sh("qemu-img compare -q top.qcow2 over.qcow2", d);
    let info = sh("qemu-img info --output=json over.qcow2", d);
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    // Only the top layer's clusters: 1 MiB of data, one partial cluster, one zeroed cluster.
    let map = sh("qemu-img map --output=json over.qcow2", d);
    assert!(map.contains("\"zero\": true, \"data\": false"), "{map}");
}

#[test]
fn a_fifo_target_gets_the_same_bytes_as_standard_output() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    stream_into(&["-O", "qcow2", "top.qcow2"], &d.join("piped.qcow2"), d);
    sh(
        &format!(
            "mkfifo f.pipe
             cat f.pipe > fromfifo.qcow2 &
             {QCOW2KIT} convert -O qcow2 top.qcow2 f.pipe
             wait
             cmp piped.qcow2 fromfifo.qcow2"
        ),
        d,
    );
}

/// Runs `qcow2kit convert -O FMT - DST` with `input` on standard input.
fn from_stream(input: &Path, fmt: &str, dst: &str, dir: &Path) -> std::process::Output {
    Command::new(QCOW2KIT)
        .args(["convert", "-O", fmt, "-", dst])
        .current_dir(dir)
        .stdin(Stdio::from(std::fs::File::open(input).expect("input")))
        .output()
        .expect("qcow2kit")
}

#[test]
fn streamed_images_and_fresh_qemu_img_converts_read_back_from_a_pipe() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    sh(
        "qemu-img convert -O qcow2 -f raw mixed.raw qemu.qcow2
         qemu-img convert -c -O qcow2 -f raw mixed.raw qemuc.qcow2
         qemu-img convert -c -O qcow2 -o cluster_size=512 -f raw mixed.raw qemuc512.qcow2",
        d,
    );
    // (qemuc512: QEMU packs compressed clusters into the rest of the cluster before the L2
    // table it has just allocated for them.)
    let mut inputs: Vec<String> = ["qemu.qcow2", "qemuc.qcow2", "qemuc512.qcow2"]
        .map(String::from)
        .into();
    for (i, extra) in [
        &[][..],
        &["-c"],
        &["-c", "-o", "compression_type=zstd"],
        &["-o", "extended_l2=on"],
    ]
    .iter()
    .enumerate()
    {
        for src in ["top.qcow2", "mixed.raw"] {
            let name = format!("in{i}-{src}.qcow2");
            let mut args = vec!["-O", "qcow2"];
            args.extend_from_slice(extra);
            if src.ends_with(".raw") {
                args.extend(["-f", "raw"]);
            }
            args.push(src);
            stream_into(&args, &d.join(&name), d);
            inputs.push(name);
        }
    }
    for input in &inputs {
        for fmt in ["raw", "qcow2"] {
            let o = from_stream(&d.join(input), fmt, &format!("back.{fmt}"), d);
            assert!(
                o.status.success(),
                "{input} -> {fmt}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            sh(
                &format!("qemu-img compare -q -F {fmt} {input} back.{fmt}"),
                d,
            );
            if fmt == "qcow2" {
                sh("qemu-img check -q back.qcow2", d);
            }
        }
    }
}

#[test]
fn an_image_rewritten_after_a_snapshot_is_refused_naming_the_backward_reference() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    sh(
        "qemu-img convert -O qcow2 -f raw mixed.raw re.qcow2
         qemu-img snapshot -c s re.qcow2
         qemu-io -c 'write -P 9 0 4k' re.qcow2 >/dev/null
         cp mixed.raw grown.qcow2 && qemu-img convert -O qcow2 -f raw mixed.raw grown.qcow2
         qemu-img resize -q grown.qcow2 100G",
        d,
    );
    for (input, what) in [
        ("re.qcow2", "the data of guest offset 65536"),
        ("grown.qcow2", "the L2 table of L1 entry 0"),
    ] {
        let o = from_stream(&d.join(input), "raw", "back.raw", d);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{input}: {err}");
        assert!(
            err.contains(what) && err.contains("not laid out for streaming"),
            "{input}: {err}"
        );
    }
}

#[test]
fn zero_clusters_take_no_room_unless_s0_asks_for_a_thick_copy() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sh(
        "(head -c 1048576 /dev/urandom; head -c 3145728 /dev/zero; head -c 100000 /dev/urandom;
          head -c 2000000 /dev/zero) > zeros.raw
         qemu-img convert -O qcow2 -f raw zeros.raw qemu.qcow2",
        d,
    );
    let qemu = std::fs::metadata(d.join("qemu.qcow2")).expect("qemu").len();
    for (extra, same_as_qemu) in [(&[][..], true), (&["-S", "0"], false)] {
        let mut args = vec!["-O", "qcow2", "-f", "raw"];
        args.extend_from_slice(extra);
        args.push("zeros.raw");
        stream_into(&args, &d.join("z.qcow2"), d);
        sh("qemu-img check -q z.qcow2", d);
        sh("qemu-img compare -q -f raw zeros.raw z.qcow2", d);
        let ours = std::fs::metadata(d.join("z.qcow2")).expect("z").len();
        assert_eq!(
            ours == qemu,
            same_as_qemu,
            "{extra:?}: {ours} against {qemu}"
        );
    }
}

#[test]
fn progress_never_mixes_into_a_stream_on_standard_output() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sources(d);
    stream_into(&["-O", "qcow2", "top.qcow2"], &d.join("plain.qcow2"), d);
    stream_into(&["-p", "-O", "qcow2", "top.qcow2"], &d.join("p.qcow2"), d);
    sh("cmp plain.qcow2 p.qcow2", d);
    let o = Command::new(QCOW2KIT)
        .args(["convert", "--bitmaps", "-O", "qcow2", "top.qcow2", "-"])
        .current_dir(d)
        .output()
        .expect("qcow2kit");
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
}

#[test]
fn small_clusters_compress_as_qemu_img_compresses_them() {
    // With 512-byte clusters no cluster can save a whole sector; QEMU keeps every cluster that
    // compresses to fewer bytes than a cluster, and so must both of our `convert -c` paths.
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    sh(
        "i=0; while [ $i -lt 3000 ]; do echo \"line $i of a qcow2 stream, compressed\"; i=$((i+1)); done > text.raw
         qemu-img convert -f raw -c -O qcow2 -o cluster_size=512 text.raw q.qcow2",
        d,
    );
    let args = ["-f", "raw", "-c", "-O", "qcow2", "-o", "cluster_size=512"];
    stream_into(&[&args[..], &["text.raw"]].concat(), &d.join("s.qcow2"), d);
    sh(
        &format!("{QCOW2KIT} convert {} text.raw k.qcow2", args.join(" ")),
        d,
    );
    let qemu_map = sh("qemu-img map --output=json q.qcow2", d);
    assert!(qemu_map.contains("\"compressed\": true"), "{qemu_map}");
    let qemu_size = std::fs::metadata(d.join("q.qcow2")).expect("q").len();
    for ours in ["s.qcow2", "k.qcow2"] {
        sh(&format!("qemu-img check -q {ours}"), d);
        sh(&format!("qemu-img compare -q -f raw text.raw {ours}"), d);
        let map = sh(&format!("qemu-img map --output=json {ours}"), d);
        assert_eq!(map, qemu_map, "{ours}");
        let size = std::fs::metadata(d.join(ours)).expect("ours").len();
        assert!(
            size * 10 <= qemu_size * 11,
            "{ours}: {size} against {qemu_size}"
        );
    }
}
