//! `qcow2kit measure` side by side with qemu-img 10.x: for every source (none with `--size`,
//! raw, qcow2, a backing chain, a snapshot, a metadata-preallocated image, extended L2, v2, a
//! sparse 16 TiB image, persistent bitmaps) and every target option set, stdout, stderr (the
//! program name aside) and exit status must be qemu-img's, byte for byte, in both output formats.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::exec;
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

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

/// What a run printed and returned, with our program name replaced by qemu-img's.
fn outcome(prog: &str, args: &[&str], dir: &Path) -> String {
    let o = exec(prog, args, dir);
    let text = format!(
        "stdout:\n{}stderr:\n{}status: {:?}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        o.status.code()
    );
    text.replace("qcow2kit", "qemu-img")
}

/// Compares `measure ARGS` of both tools; returns a description of the difference.
fn differs(args: &[&str], dir: &Path) -> Option<String> {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let want = outcome("qemu-img", &full, dir);
    let got = outcome(QCOW2KIT, &full, dir);
    (want != got).then(|| {
        format!(
            "measure {}:\nqemu-img {want}\nqcow2kit {got}",
            args.join(" ")
        )
    })
}

fn sources() -> TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    sh(
        "qemu-img create -q -f qcow2 a.qcow2 100M
         qemu-io -c 'write -P 1 0 1M' -c 'write -z 10M 1M' -c 'write -P 2 50M 3k' a.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2
         qemu-io -c 'write -P 3 20M 100k' top.qcow2 >/dev/null
         qemu-img create -q -f qcow2 snap.qcow2 1G
         qemu-io -c 'write 512 512' -c 'write 64k 64k' snap.qcow2 >/dev/null
         qemu-img snapshot -c s1 snap.qcow2
         qemu-io -c 'write 128M 63k' snap.qcow2 >/dev/null
         qemu-img create -q -f raw r.raw 1G
         qemu-io -f raw -c 'write 512 512' -c 'write 64k 64k' -c 'write 128M 63k' r.raw >/dev/null
         qemu-img create -q -f qcow2 -o preallocation=metadata pm.qcow2 50M
         qemu-io -c 'write 1M 64k' pm.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 50M
         qemu-io -c 'write 0 1M' v2.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k el2.qcow2 50M
         qemu-io -c 'write 0 4k' -c 'write 100k 4k' -c 'write 1M 200k' el2.qcow2 >/dev/null
         qemu-img create -q -f qcow2 sparse.qcow2 16T
         qemu-io -c 'write 8T 1M' sparse.qcow2 >/dev/null
         qemu-img create -q -f qcow2 bm.qcow2 1G
         qemu-img bitmap --add bm.qcow2 b1
         qemu-img bitmap --add -g 4k bm.qcow2 a-long-bitmap-name-xyz
         qemu-img bitmap --add -g 2M bm.qcow2 c
         truncate -s 1000 odd.raw",
        t.path(),
    );
    t
}

const SOURCES: &[&str] = &[
    "a.qcow2",
    "top.qcow2",
    "snap.qcow2",
    "-l s1 snap.qcow2",
    "-l snapshot.id=1 snap.qcow2",
    "-f raw r.raw",
    "pm.qcow2",
    "v2.qcow2",
    "el2.qcow2",
    "sparse.qcow2",
    "bm.qcow2",
    "-f raw odd.raw",
    "--size 0",
    "--size 5000",
    "--size 1G",
    "--size 64G",
    "--size 2P",
    "--size 9223372036854775807",
];

const TARGETS: &[&str] = &[
    "",
    "-O raw",
    "-O qcow2",
    "-O qcow2 -o cluster_size=512",
    "-O qcow2 -o cluster_size=2M",
    "-O qcow2 -o extended_l2=on",
    "-O qcow2 -o extended_l2=on,cluster_size=16k",
    "-O qcow2 -o refcount_bits=1",
    "-O qcow2 -o refcount_bits=64,cluster_size=4k",
    "-O qcow2 -o compat=0.10",
    "-O qcow2 -o preallocation=metadata",
    "-O qcow2 -o preallocation=falloc",
    "-O qcow2 -o preallocation=full,extended_l2=on",
    "-O qcow2 -o backing_file=x",
    "-O qcow2 -o size=5G",
    "-O qcow2 -o cluster_size=4k -o lazy_refcounts=on",
];

#[test]
fn figures_match_qemu_img_for_every_source_and_target() {
    let t = sources();
    let mut diffs = Vec::new();
    let mut n = 0;
    for src in SOURCES {
        for tgt in TARGETS {
            for out in ["--output=human", "--output=json"] {
                let mut args: Vec<&str> = vec![out];
                args.extend(tgt.split_whitespace());
                args.extend(src.split_whitespace());
                n += 1;
                diffs.extend(differs(&args, t.path()));
            }
        }
    }
    assert!(n > 500);
    assert!(
        diffs.is_empty(),
        "{} of {n} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn luks_targets_count_qemu_s_header_for_every_cipher() {
    let t = sources();
    let mut diffs = Vec::new();
    for extra in [
        "",
        ",encrypt.cipher-alg=aes-128",
        ",encrypt.cipher-alg=aes-192",
        ",encrypt.cipher-mode=cbc",
        ",encrypt.cipher-mode=cbc,encrypt.cipher-alg=aes-128",
        ",encrypt.cipher-alg=twofish-256",
        ",encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc",
        ",encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=ctr",
        ",cluster_size=512",
        ",cluster_size=2M",
        ",preallocation=full,extended_l2=on",
        ",encrypt.cipher-alg=foo",
        ",encrypt.cipher-mode=foo",
    ] {
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
        for src in ["--size 0", "--size 1G", "a.qcow2", "-f raw r.raw"] {
            let mut args = vec![
                "-O",
                "qcow2",
                "--object",
                "secret,id=sec0,data=base",
                "-o",
                &o,
            ];
            args.extend(src.split_whitespace());
            diffs.extend(differs(&args, t.path()));
        }
    }
    for args in [
        &[
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "--size",
            "0",
        ][..],
        &[
            "-O",
            "qcow2",
            "--object",
            "secret,id=sec1,data=base",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "--size",
            "0",
        ],
        &[
            "-O",
            "qcow2",
            "--object",
            "secret,id=sec0,data=base",
            "-o",
            "encrypt.format=luks",
            "--size",
            "0",
        ],
    ] {
        diffs.extend(differs(args, t.path()));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn usage_and_option_errors_match_qemu_img() {
    let t = sources();
    let cases: &[&[&str]] = &[
        &[],
        &["--size", "2G", "a.qcow2"],
        &["a.qcow2", "b"],
        &["--object", "secret,id=sec0,data=MTIzNDU2,format=base64"],
        &["--image-opts"],
        &["-f", "qcow2"],
        &["-l", "snap1"],
        &["-o", ","],
        &["-l", "snapshot.foo=bar"],
        &["--output", "foo"],
        &["--size", "-1"],
        &["--size", "1x"],
        &["--size", "8E"],
        &["-O", "foo", "a.qcow2"],
        &["-O", "vmdk", "--size", "1G"],
        &["-l", "nosuch", "snap.qcow2"],
        &["-l", "snapshot.name=nosuch", "snap.qcow2"],
        &["nonexist"],
        &["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
        &["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1G",
        ],
        &["-O", "qcow2", "-o", "compat=0.9", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        &["-O", "qcow2", "-o", "refcount_bits=x", "--size", "1G"],
        &["-O", "qcow2", "-o", "preallocation=foo", "--size", "1G"],
        &["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=64k,", "--size", "1G"],
        &["-O", "raw", "-o", "cluster_size=64k", "--size", "1G"],
        &["-O", "raw", "-o", "preallocation=foo", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "7E"],
        &["-f", "raw", "-O", "qcow2", "a.qcow2"],
        &["-x"],
        &["--size"],
    ];
    let diffs: Vec<String> = cases.iter().filter_map(|c| differs(c, t.path())).collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
