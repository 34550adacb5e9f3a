//! Damaged images refused at open, side by side with QEMU: each case pokes bytes into an
//! image made by qemu-img, then runs `qemu-io -c 'read 0 512'`, `qemu-img info`, `check` and
//! `map` and the same commands of qcow2kit on copies of it. Standard output, standard error
//! (program name aside) and exit status must match: QEMU's message, from QEMU's first failing
//! check (`qcow2_do_open`'s order).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// Exit status, standard output and standard error of a command.
#[derive(Debug, PartialEq, Eq)]
struct Res {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(prog: &str, args: &[&str], dir: &Path) -> Res {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e} (qemu-utils 10 must be installed)"));
    Res {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A damaged image: `offset` and the bytes written there.
struct Case {
    name: &'static str,
    pokes: &'static [(u64, &'static [u8])],
    /// QEMU's message, checked to be in qemu-io's output so that the case tests what it says.
    qemu_says: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "huge header length",
        pokes: &[(100, b"\xff\xff\xff\xff")],
        qemu_says: "qcow2 header exceeds cluster size",
    },
    Case {
        name: "header length over the cluster, not a multiple of 8",
        pokes: &[(100, b"\x7f\xff\xff\xff")],
        qemu_says: "qcow2 header exceeds cluster size",
    },
    Case {
        name: "short header",
        pokes: &[(100, b"\x00\x00\x00\x40")],
        qemu_says: "qcow2 header too short",
    },
    Case {
        name: "version 4",
        pokes: &[(4, b"\x00\x00\x00\x04")],
        qemu_says: "Unsupported qcow2 version 4",
    },
    Case {
        name: "cluster bits 22",
        pokes: &[(20, b"\x00\x00\x00\x16")],
        qemu_says: "Unsupported cluster size: 2^22",
    },
    Case {
        name: "backing file offset past cluster 0, huge extension",
        pokes: &[
            (8, b"\xff\xff\xff\xff\xff\xff\xff\xff"),
            (112, b"\x12\x34\x56\x78\x7f\xff\xff\xff"),
        ],
        qemu_says: "Invalid backing file offset",
    },
    Case {
        name: "extension header cut by the backing file name",
        pokes: &[
            (8, b"\x00\x00\x00\x00\x00\x00\x00\x74"),
            (112, b"\x12\x34\x56\x78\x7f\xff\xff\xff"),
        ],
        qemu_says: "Header extension too large",
    },
    Case {
        name: "huge extension",
        pokes: &[(112, b"\x12\x34\x56\x78\x7f\xff\xff\xff")],
        qemu_says: "Header extension too large",
    },
    Case {
        name: "huge extension and a misaligned L1 table (tables first)",
        pokes: &[
            (112, b"\x12\x34\x56\x78\x7f\xff\xff\xff"),
            (40, b"\x00\x00\x00\x00\x00\x03\x00\x08"),
        ],
        qemu_says: "Active L1 table offset invalid",
    },
    Case {
        name: "huge refcount table",
        pokes: &[(56, b"\xff\xff\xff\xff")],
        qemu_says: "Reference count table too large",
    },
    Case {
        name: "misaligned refcount table",
        pokes: &[(48, b"\x12\x34\x56\x78\x90\xab\xcd\xef")],
        qemu_says: "Reference count table offset invalid",
    },
    Case {
        name: "refcount table ending past 2^63",
        pokes: &[
            (48, b"\xff\xff\xff\xff\xff\xff\x00\x00"),
            (56, b"\x00\x00\x00\x7f"),
        ],
        qemu_says: "Reference count table offset invalid",
    },
    Case {
        name: "no refcount table",
        pokes: &[(56, b"\x00\x00\x00\x00")],
        qemu_says: "Image does not contain a reference count table",
    },
    Case {
        name: "refcount order 7",
        pokes: &[(96, b"\x00\x00\x00\x07")],
        qemu_says: "Reference count entry width too large; may not exceed 64 bits",
    },
    Case {
        name: "too many snapshots",
        pokes: &[(60, b"\xff\xff\xff\xff")],
        qemu_says: "Snapshot table too large",
    },
    Case {
        name: "misaligned snapshot table, no snapshots",
        pokes: &[(64, b"\x12\x34\x56\x78\x90\xab\xcd\xef")],
        qemu_says: "Snapshot table offset invalid",
    },
    Case {
        name: "huge L1 table",
        pokes: &[(36, b"\xff\xff\xff\xff")],
        qemu_says: "Active L1 table too large",
    },
    Case {
        name: "L1 table ending past 2^63",
        pokes: &[
            (40, b"\x7f\xff\xff\xff\xff\xff\x00\x00"),
            (36, b"\x00\x00\xff\xff"),
        ],
        qemu_says: "Active L1 table offset invalid",
    },
    Case {
        name: "L1 table too small",
        pokes: &[(36, b"\x00\x00\x00\x00")],
        qemu_says: "L1 table is too small",
    },
    Case {
        name: "virtual size needing over 2^31 L1 entries",
        pokes: &[(24, b"\x40\x00\x00\x00\x00\x00\x00\x00")],
        qemu_says: "Image is too big",
    },
    Case {
        name: "backing file name too long",
        pokes: &[
            (8, b"\x00\x00\x00\x00\x00\x00\x10\x00"),
            (16, b"\xff\xff\xff\xff"),
        ],
        qemu_says: "Backing file name too long",
    },
    Case {
        name: "unknown compression type",
        pokes: &[(104, b"\x05")],
        qemu_says: "qcow2: unknown compression type: 5",
    },
    Case {
        name: "compression bit with zlib",
        pokes: &[(79, b"\x08")],
        qemu_says: "qcow2: Compression type incompatible feature bit must not be set",
    },
];

/// The command lines compared: qemu-io's read and qemu-img's info, check and map.
const COMMANDS: &[(&str, &[&str])] = &[
    ("qemu-io", &["-c", "read 0 512", "t.qcow2"]),
    ("qemu-img", &["info", "t.qcow2"]),
    ("qemu-img", &["check", "t.qcow2"]),
    ("qemu-img", &["map", "t.qcow2"]),
];

fn qcow2kit_args<'a>(prog: &str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = if prog == "qemu-io" {
        vec!["io"]
    } else {
        vec![]
    };
    v.extend_from_slice(args);
    v
}

/// Makes `dir/q/t.qcow2` and `dir/k/t.qcow2`: one qemu-img image with a written cluster,
/// damaged as `case` says.
fn damaged_pair(dir: &Path, case: &Case) {
    let made = run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"],
        dir,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let w = run("qemu-io", &["-c", "write -P 0x11 0 64k", "t.qcow2"], dir);
    assert_eq!(w.code, Some(0), "{w:?}");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("t.qcow2"))
        .expect("opening the image");
    for (offset, bytes) in case.pokes {
        f.write_all_at(bytes, *offset).expect("damaging the image");
    }
    for sub in ["q", "k"] {
        fs::create_dir_all(dir.join(sub)).expect("scratch directory");
        fs::copy(dir.join("t.qcow2"), dir.join(sub).join("t.qcow2")).expect("copying");
    }
}

#[test]
fn damaged_images_are_refused_in_qemus_words() {
    let mut mismatches = Vec::new();
    for case in CASES {
        let d = tempfile::tempdir().expect("scratch directory");
        damaged_pair(d.path(), case);
        let (q, k) = (d.path().join("q"), d.path().join("k"));
        for (prog, args) in COMMANDS {
            let theirs = run(prog, args, &q);
            if *prog == "qemu-io" {
                assert!(
                    theirs.stderr.contains(case.qemu_says),
                    "{}: qemu-io says {:?}",
                    case.name,
                    theirs.stderr
                );
            }
            let mut ours = run(QCOW2KIT, &qcow2kit_args(prog, args), &k);
            ours.stderr = ours.stderr.replace("qcow2kit", prog);
            if ours != theirs {
                mismatches.push(format!(
                    "{} / {prog} {args:?}:\n  qemu:     {theirs:?}\n  qcow2kit: {ours:?}",
                    case.name
                ));
            }
        }
        // Neither tool changed the refused image.
        let (a, b) = (
            fs::read(q.join("t.qcow2")).expect("reading"),
            fs::read(k.join("t.qcow2")).expect("reading"),
        );
        assert!(
            a == b,
            "{}: the images differ after the commands",
            case.name
        );
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// A snapshot whose L1 table offset is not cluster-aligned (iotest 080): `amend` and
/// `convert -l` refuse it in QEMU's words. (qemu-img then prints a second line of its own
/// about the amend it abandoned; the first line, QEMU's reason, is compared.)
#[test]
fn snapshot_l1_table_refused_in_qemus_words() {
    let d = tempfile::tempdir().expect("scratch directory");
    let dir = d.path();
    let made = run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"],
        dir,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    assert_eq!(
        run("qemu-io", &["-c", "write 0 512", "t.qcow2"], dir).code,
        Some(0)
    );
    assert_eq!(
        run("qemu-img", &["snapshot", "-c", "test", "t.qcow2"], dir).code,
        Some(0)
    );
    // The first snapshot table entry starts with its L1 table's offset.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("t.qcow2"))
        .expect("opening the image");
    f.write_all_at(&0x40_0200u64.to_be_bytes(), 0x70000)
        .expect("damaging the image");
    let first_line = |r: &Res| {
        r.stderr
            .lines()
            .next()
            .unwrap_or("")
            .replace("qcow2kit", "qemu-img")
    };
    for args in [
        &["amend", "-o", "compat=0.10", "t.qcow2"][..],
        &["convert", "-l", "test", "t.qcow2", "out.img"][..],
    ] {
        let theirs = run("qemu-img", args, dir);
        let ours = run(QCOW2KIT, args, dir);
        assert_eq!(ours.code, theirs.code, "{args:?}: {ours:?} / {theirs:?}");
        let (q, k) = (first_line(&theirs), first_line(&ours));
        assert!(
            q.ends_with("Snapshot L1 table offset invalid"),
            "{args:?}: {q}"
        );
        assert!(
            k.ends_with("Snapshot L1 table offset invalid"),
            "{args:?}: {k}"
        );
    }
}
