//! Encrypted images on the command line, side by side with qemu-img 10.x: `create -o
//! encrypt.*` with `--object secret` (output, errors, exit status; the image opened by
//! qemu-io), `info` without the key (the `encrypt` block), and `map`, `compare`, `convert`,
//! `check` with `--image-opts …,encrypt.key-secret=ID`.
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::exec;
use std::path::Path;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");
const SECRET: &str = "secret,id=s,data=pw";

/// Runs `args` through qemu-img in `q` and qcow2kit in `k`; requires the same exit status,
/// stdout and stderr (program name and directory aside). Returns the exit status.
fn same(q: &Path, k: &Path, args: &[&str]) -> i32 {
    let a = exec("qemu-img", args, q);
    let b = exec(QCOW2KIT, args, k);
    let norm = |o: &[u8]| String::from_utf8_lossy(o).replace("qcow2kit:", "qemu-img:");
    assert_eq!(a.status.code(), b.status.code(), "{args:?}");
    assert_eq!(norm(&a.stdout), norm(&b.stdout), "stdout of {args:?}");
    assert_eq!(norm(&a.stderr), norm(&b.stderr), "stderr of {args:?}");
    a.status.code().unwrap_or(-1)
}

fn ok(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = exec(prog, args, dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("qemu-io:"),
        "`{prog} {}`: {err}",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn opts(name: &str) -> String {
    format!("driver=qcow2,file.filename={name},encrypt.key-secret=s")
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let (q, k) = (t.path().join("q"), t.path().join("k"));
    std::fs::create_dir(&q).unwrap();
    std::fs::create_dir(&k).unwrap();
    (t, q, k)
}

#[test]
fn create_matches_qemu_img() {
    let cases = [
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "encrypt.format=aes,encrypt.key-secret=s",
        "encryption=on,encrypt.key-secret=s",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,\
         encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,preallocation=full",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,compat=0.10,cluster_size=512",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,data_file=d.raw",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,data_file=d.raw,\
         data_file_raw=on",
        "encrypt.format=luks",
        "encrypt.format=aes,encrypt.key-secret=s,encrypt.iter-time=10",
        "encrypt.format=foo,encrypt.key-secret=s",
        "encrypt.format=luks,encrypt.key-secret=nope",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=foo",
        "encrypt.format=luks,encryption=on,encrypt.key-secret=s",
    ];
    for o in cases {
        let (_t, q, k) = dirs();
        let code = same(
            &q,
            &k,
            &[
                "create",
                "-f",
                "qcow2",
                "--object",
                SECRET,
                "-o",
                o,
                "img.qcow2",
                "1M",
            ],
        );
        if code != 0 {
            assert!(!k.join("img.qcow2").exists() || o.contains("luks"), "{o}");
            continue;
        }
        // Same layout as qemu-img's: the file lengths agree.
        let len = |d: &Path| std::fs::metadata(d.join("img.qcow2")).unwrap().len();
        assert_eq!(len(&q), len(&k), "{o}: file length");
        // Ours opens in QEMU with the key, reads zeros, takes writes, checks clean.
        let spec = opts("img.qcow2");
        // A raw data file maps every cluster: its zeros decrypt to noise, in QEMU too.
        let first_read = if o.contains("data_file_raw=on") {
            "read 0 1M"
        } else {
            "read -P 0 0 1M"
        };
        let io = ok(
            "qemu-io",
            &[
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                "-c",
                first_read,
                "-c",
                "write -P 7 1000 70000",
                "-c",
                "read -P 7 1000 70000",
            ],
            &k,
        );
        assert!(!io.contains("failed"), "{o}: {io}");
        let check = ok(
            "qemu-img",
            &["check", "--object", SECRET, "--image-opts", &spec],
            &k,
        );
        assert!(check.contains("No errors were found"), "{o}: {check}");
    }
}

#[test]
fn info_map_compare_convert_check_with_keys() {
    let (_t, q, k) = dirs();
    for (name, o) in [
        (
            "l.qcow2",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        ),
        ("a.qcow2", "encrypt.format=aes,encrypt.key-secret=s"),
    ] {
        for d in [&q, &k] {
            ok(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, name, "4M",
                ],
                d,
            );
        }
        // The same LUKS header in both (uuid, salts): copy qemu's file over.
        ok(
            "cp",
            &["--sparse=always", "q/l.qcow2", "k/l.qcow2"]
                .map(|a| a.replace("l.qcow2", name))
                .each_ref()
                .map(String::as_str),
            q.parent().unwrap(),
        );
        let spec = opts(name);
        for d in [&q, &k] {
            ok(
                "qemu-io",
                &[
                    "--object",
                    SECRET,
                    "--image-opts",
                    &spec,
                    "-c",
                    "write -P 0x11 1000 70000",
                    "-c",
                    "write -z 131072 65536",
                ],
                d,
            );
        }
        // Read-only commands on the same file (disk sizes are the file system's).
        for args in [
            &["info", name][..],
            &["info", "--output=json", name],
            &["info", "--object", SECRET, "--image-opts", &spec],
            &[
                "info",
                "--output=json",
                "--object",
                "secret,id=s,data=bad",
                "--image-opts",
                &spec,
            ],
            &["info", "--image-opts", &opts(name).replace("=s", "=nosuch")],
            &["map", "--image-opts", &opts(name).replace("=s", "=nosuch")],
            &[
                "check",
                "--image-opts",
                &opts(name).replace("=s", "=nosuch"),
            ],
            &["map", name],
            &["map", "--object", SECRET, "--image-opts", &spec],
            &[
                "map",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
            ],
            &["check", "--object", SECRET, "--image-opts", &spec],
            &["check", name],
            &[
                "check",
                "--object",
                "secret,id=s,data=bad",
                "--image-opts",
                &spec,
            ],
        ] {
            same(&q, &q, args);
        }
        for args in [
            &["convert", "-O", "raw", name, "x.raw"][..],
            &[
                "convert",
                "-O",
                "raw",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                "o.raw",
            ],
        ] {
            same(&q, &k, args);
        }
        assert_eq!(
            std::fs::read(q.join("o.raw")).unwrap(),
            std::fs::read(k.join("o.raw")).unwrap()
        );
        let raw = "driver=raw,file.filename=o.raw";
        same(
            &q,
            &k,
            &["compare", "--object", SECRET, "--image-opts", &spec, raw],
        );
    }
}

#[test]
fn convert_to_an_encrypted_target() {
    let (_t, q, k) = dirs();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for d in [&q, &k] {
        std::fs::write(d.join("src.raw"), &data).unwrap();
    }
    for o in [
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "encrypt.format=aes,encrypt.key-secret=s,cluster_size=4096",
    ] {
        let code = same(
            &q,
            &k,
            &[
                "convert", "-f", "raw", "-O", "qcow2", "--object", SECRET, "-o", o, "src.raw",
                "e.qcow2",
            ],
        );
        assert_eq!(code, 0, "{o}");
        let spec = opts("e.qcow2");
        let cmp = ok(
            "qemu-img",
            &[
                "compare",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                "driver=raw,file.filename=src.raw",
            ],
            &k,
        );
        assert!(cmp.contains("Images are identical"), "{o}: {cmp}");
        let check = ok(
            "qemu-img",
            &["check", "--object", SECRET, "--image-opts", &spec],
            &k,
        );
        assert!(check.contains("No errors were found"), "{o}: {check}");
        let len = |d: &Path| std::fs::metadata(d.join("e.qcow2")).unwrap().len();
        assert_eq!(len(&q), len(&k), "{o}: file length");
        // No plaintext cluster of the source is in the file.
        let file = std::fs::read(k.join("e.qcow2")).unwrap();
        assert!(
            !file.windows(64).any(|w| w == &data[65536..65536 + 64]),
            "{o}: plaintext"
        );
    }
    let refused = [
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s",
        "src.raw",
        "c.qcow2",
    ];
    assert_eq!(same(&q, &k, &refused), 1);
}

/// Key-slot management through `amend`, step by step on two copies of one image: every
/// step's output and status as qemu-img's; then the same passphrases open both in qemu-io.
#[test]
fn amend_key_slots_match_qemu_img() {
    let (_t, q, k) = dirs();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "x.qcow2",
            "1M",
        ],
        &q,
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            "a.qcow2",
            "1M",
        ],
        &q,
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "p.qcow2", "1M"],
        &q,
    );
    for f in ["x.qcow2", "a.qcow2", "p.qcow2"] {
        std::fs::copy(q.join(f), k.join(f)).unwrap();
    }
    let spec = opts("x.qcow2");
    let aes = opts("a.qcow2");
    let steps: &[&[&str]] = &[
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=1,encrypt.iter-time=10",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.keyslot=1",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.keyslot=1",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.old-secret=s",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.old-secret=n",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.keyslot=9",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=0",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=0,encrypt.iter-time=10",
            "--force",
            "--image-opts",
            &spec,
        ],
        &["-o", "encrypt.format=luks", "--image-opts", &spec],
        &["-o", "encrypt.new-secret=n", "--image-opts", &spec],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10",
            "x.qcow2",
        ],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10",
            "--image-opts",
            &aes,
        ],
        &["-o", "encrypt.state=active,encrypt.new-secret=n", "p.qcow2"],
        &["-o", "encrypt.state=inactive", "--image-opts", &spec],
        &["-o", "encrypt.state=bogus", "--image-opts", &spec],
        &[
            "-o",
            "encrypt.state=active,encrypt.new-secret=zz",
            "--image-opts",
            &spec,
        ],
        &[
            "-o",
            "encrypt.state=inactive,encrypt.new-secret=n",
            "--image-opts",
            &spec,
        ],
    ];
    for step in steps {
        let mut args = vec![
            "amend",
            "--object",
            SECRET,
            "--object",
            "secret,id=n,data=new",
        ];
        args.extend_from_slice(step);
        same(&q, &k, &args);
    }
    // Slot 0 now holds "new" in both (the forced overwrite); "pw" opens neither.
    for (pw, opens) in [("pw", false), ("new", true)] {
        for d in [&q, &k] {
            let out = exec(
                "qemu-io",
                &[
                    "--object",
                    &format!("secret,id=s,data={pw}"),
                    "--image-opts",
                    &spec,
                    "-c",
                    "read 0 512",
                ],
                d,
            );
            assert_eq!(out.status.success(), opens, "{pw} in {}", d.display());
        }
    }
    let check = ok(
        "qemu-img",
        &[
            "check",
            "--object",
            "secret,id=s,data=new",
            "--image-opts",
            &spec,
        ],
        &k,
    );
    assert!(check.contains("No errors were found"), "{check}");
}
