//! Corruption found while writing, side by side with qemu-io (iotest 060's cases): the same
//! `qcow2: Marking image as corrupt: …` line, the same failed request and exit status, the
//! same refusal of the next writable open, and the same `qemu-img check` findings afterwards.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");
const CS: u64 = 65536;

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

/// qemu-io's output as qcow2kit prints it: program name replaced, timings dropped.
fn normalised(r: &Res) -> Res {
    let untimed = |s: &str| {
        s.lines()
            .map(|l| match l.find(" ops; ") {
                Some(i) if l.ends_with("ops/sec)") => l[..i + 4].to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Res {
        code: r.code,
        stdout: untimed(&r.stdout),
        stderr: r.stderr.replace("qemu-io", "qcow2kit"),
    }
}

/// One damaged image per tool: `qemu-img create -f qcow2 64M` (plus `opts`), one written
/// cluster, then `bytes` at `offset`.
fn damaged_pair(dir: &Path, opts: &str, offset: u64, bytes: &[u8]) {
    for name in ["q.qcow2", "k.qcow2"] {
        let mut c = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            c.extend(["-o", opts]);
        }
        c.extend([name, "64M"]);
        assert_eq!(run("qemu-img", &c, dir).code, Some(0));
        let w = run("qemu-io", &["-c", "write -P 0x11 0 64k", name], dir);
        assert_eq!(w.code, Some(0), "{w:?}");
        fs::OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .and_then(|f| f.write_all_at(bytes, offset))
            .expect("damaging the image");
    }
}

/// Runs the same qemu-io commands on both images, then a second write, then `qemu-img check`:
/// every output must match.
fn same_as_qemu_io_in(dir: &Path, case: &str, cmds: &[&str]) {
    let run_both = |cmds: &[&str]| {
        let mut args: Vec<&str> = cmds.iter().flat_map(|c| ["-c", *c]).collect();
        args.push("q.qcow2");
        let q = normalised(&run("qemu-io", &args, dir));
        *args.last_mut().expect("file argument") = "k.qcow2";
        let mut io = vec!["io"];
        io.extend(args);
        let k = run(QCOW2KIT, &io, dir);
        let k = Res {
            stderr: k.stderr.replace("k.qcow2", "q.qcow2"),
            ..normalised(&k)
        };
        assert_eq!(q, k, "[{case}] {cmds:?}");
    };
    run_both(cmds);
    run_both(&["write -P 0x33 128k 4k"]);
    let check = |name: &str| {
        let r = run("qemu-img", &["check", name], dir);
        let named = |s: String| s.replace(name, "IMG");
        (r.code, named(r.stdout), named(r.stderr))
    };
    assert_eq!(
        check("q.qcow2"),
        check("k.qcow2"),
        "[{case}] qemu-img check"
    );
}

/// A case: its name, `-o` options, where to damage the image and with what, then the qemu-io
/// commands.
type Case = (
    &'static str,
    &'static str,
    u64,
    Vec<u8>,
    &'static [&'static str],
);

#[test]
fn corruption_events_match_qemu_io() {
    let cases: [Case; 6] = [
        (
            "header refcount 0",
            "",
            2 * CS,
            vec![0, 0],
            &["write 64k 64k"],
        ),
        (
            "refblock misaligned",
            "",
            CS,
            0x22a00u64.to_be_bytes().to_vec(),
            &["write 64k 64k"],
        ),
        (
            "preallocated zero cluster misaligned",
            "",
            4 * CS,
            0x8000_0000_0000_2a01u64.to_be_bytes().to_vec(),
            &["write -P 0x55 0 64k"],
        ),
        (
            "discard of a misaligned cluster",
            "",
            4 * CS,
            (0x8000_0000_0000_0000u64 | (5 * CS + 0x2a00))
                .to_be_bytes()
                .to_vec(),
            &["discard 0 64k", "write -P 0x44 64k 4k"],
        ),
        (
            "L2 entry into the L1 table",
            "",
            4 * CS,
            (0x8000_0000_0000_0000u64 | (3 * CS)).to_be_bytes().to_vec(),
            &["write -P 0x55 0 512"],
        ),
        (
            "invalid subcluster bitmap",
            "extended_l2=on",
            4 * CS + 8,
            0x0000_0001_0000_0001u64.to_be_bytes().to_vec(),
            &["write -P 0x55 4k 512"],
        ),
    ];
    for (case, opts, offset, bytes, cmds) in cases {
        let d = tempfile::tempdir().expect("scratch directory");
        damaged_pair(d.path(), opts, offset, &bytes);
        same_as_qemu_io_in(d.path(), case, cmds);
    }
}

#[test]
fn an_l2_table_placed_on_the_header_is_refused_as_qemu_io_refuses_it() {
    // iotest 137: a fresh image whose first refcounts read 0, then a write that needs an L2
    // table: the allocator's first free cluster is the header.
    let d = tempfile::tempdir().expect("scratch directory");
    for name in ["q.qcow2", "k.qcow2"] {
        let c = run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", name, "64M"],
            d.path(),
        );
        assert_eq!(c.code, Some(0), "{c:?}");
        fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(name))
            .and_then(|f| f.write_all_at(&[0u8; 8], 2 * CS))
            .expect("damaging the image");
    }
    same_as_qemu_io_in(d.path(), "L2 table at offset 0", &["write 64k 64k"]);
}

/// Sets a field of the first bitmap directory entry of `path` (QEMU's constraints on it are
/// checked at every open).
fn damage_bitmap(path: &Path, field_offset: u64, bytes: &[u8]) {
    let data = fs::read(path).expect("reading image");
    let be32 = |o: usize| u32::from_be_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let be64 = |o: usize| u64::from_be_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    let mut o = be32(100) as usize;
    let directory = loop {
        let (kind, len) = (be32(o), be32(o + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            break be64(o + 24);
        }
        o += 8 + len.next_multiple_of(8);
    };
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, directory + field_offset))
        .expect("damaging the bitmap directory");
}

/// Open-time refusals of QEMU's: a bitmap breaking its constraints (for reading too), and the
/// data-file-raw bit without a data file (for writing).
#[test]
fn open_refusals_match_qemu() {
    let cases: [(&str, u64, Vec<u8>); 3] = [
        ("granularity 2^70", 17, vec![70]),
        ("granularity 256 bytes", 17, vec![8]),
        (
            "misaligned bitmap table",
            0,
            0x70001u64.to_be_bytes().to_vec(),
        ),
    ];
    for (case, field, bytes) in cases {
        let d = tempfile::tempdir().expect("scratch directory");
        let dir = d.path();
        damaged_pair(dir, "", 0, &[0x51]);
        for name in ["q.qcow2", "k.qcow2"] {
            let r = run(
                "qemu-img",
                &["bitmap", "--add", "--disable", name, "b0"],
                dir,
            );
            assert_eq!(r.code, Some(0), "{r:?}");
            damage_bitmap(&dir.join(name), field, &bytes);
        }
        let q = normalised(&run("qemu-img", &["info", "q.qcow2"], dir));
        let k = normalised(&run(QCOW2KIT, &["info", "k.qcow2"], dir));
        let k = Res {
            stderr: k.stderr.replace("k.qcow2", "q.qcow2"),
            ..k
        };
        assert_eq!(
            Res {
                stderr: q.stderr.replace("qemu-img", "qcow2kit"),
                ..q
            },
            k,
            "[{case}] info"
        );
        same_as_qemu_io_in(dir, case, &["write 0 4k"]);
    }
    let d = tempfile::tempdir().expect("scratch directory");
    // Autoclear bit 1 (data-file-raw) without a data file: readable, not writable.
    damaged_pair(d.path(), "", 95, &[0x02]);
    same_as_qemu_io_in(
        d.path(),
        "data-file-raw without a data file",
        &["write 0 4k"],
    );
}

/// Bad entries found by reads and by `amend -o compat=0.10` (iotest 060): QEMU's words for the
/// corruption event, no second message for the failed read, and amend's "Failed to turn zero
/// into data clusters".
#[test]
fn bad_entries_found_by_reads_and_amend_match_qemu() {
    let l1_unaligned = (0x8000_0000_0000_0000u64 | 0x42a00).to_be_bytes().to_vec();
    let l2_unaligned = (0x8000_0000_0000_0000u64 | 0x52a00).to_be_bytes().to_vec();
    let zero_unaligned = (0x8000_0000_0000_0000u64 | 0x52a01).to_be_bytes().to_vec();
    let read_cases: [Case; 3] = [
        (
            "L1 entry unaligned",
            "",
            3 * CS,
            l1_unaligned.clone(),
            &["read 0 64k"],
        ),
        (
            "L2 entry unaligned",
            "",
            4 * CS,
            l2_unaligned,
            &["read 0 64k"],
        ),
        (
            "subcluster both allocated and zero",
            "extended_l2=on",
            4 * CS + 8,
            0x0000_0001_0000_0001u64.to_be_bytes().to_vec(),
            &["read 0 64k"],
        ),
    ];
    for (case, opts, offset, bytes, cmds) in read_cases {
        let d = tempfile::tempdir().expect("scratch directory");
        damaged_pair(d.path(), opts, offset, &bytes);
        same_as_qemu_io_in(d.path(), case, cmds);
    }
    for (case, offset, bytes) in [
        ("amend over an unaligned L1 entry", 3 * CS, l1_unaligned),
        (
            "amend over an unaligned zero cluster",
            4 * CS,
            zero_unaligned,
        ),
    ] {
        let d = tempfile::tempdir().expect("scratch directory");
        damaged_pair(d.path(), "", offset, &bytes);
        let q = run(
            "qemu-img",
            &["amend", "-o", "compat=0.10", "q.qcow2"],
            d.path(),
        );
        let k = run(
            QCOW2KIT,
            &["amend", "-o", "compat=0.10", "k.qcow2"],
            d.path(),
        );
        let k = Res {
            stderr: k.stderr.replace("qcow2kit", "qemu-img"),
            ..k
        };
        assert_eq!(q, k, "[{case}]");
    }
}
