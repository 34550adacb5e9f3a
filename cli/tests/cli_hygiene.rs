//! Process hygiene and parity fixes, each judged against what qemu-img / qemu-io 10 do on the
//! same input: output that cannot be written, resize over hostile refcount tables and raw data
//! files, preallocation, thick converts, bounded reads of `write -s`, shrinking refcount
//! tables, autoclear bits left by `check -r all`, and stale temporary files of killed converts.
//!
//! A missing qemu-img or qemu-io fails the tests; it never skips them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// Where a command's standard output goes.
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// Captured.
    Pipe,
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe whose reading end is closed before the command writes: EPIPE.
    Closed,
}

fn spawn(prog: &str, args: &[&str], dir: &Path, sink: Sink) -> Output {
    let mut c = Command::new(prog);
    c.args(args).current_dir(dir).stdin(Stdio::null());
    c.stderr(Stdio::piped());
    c.stdout(match sink {
        Sink::Pipe | Sink::Closed => Stdio::piped(),
        Sink::Full => Stdio::from(
            fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("open /dev/full"),
        ),
    });
    let mut child = c.spawn().unwrap_or_else(|e| {
        panic!("cannot run `{prog}` ({e}); these tests need qemu-img and qemu-io 10.x in PATH")
    });
    if let Sink::Closed = sink {
        drop(child.stdout.take());
    }
    child.wait_with_output().expect("wait")
}

fn run(prog: &str, args: &[&str], dir: &Path) -> Output {
    spawn(prog, args, dir, Sink::Pipe)
}

/// Runs a qemu tool that must succeed (building images); returns its standard output.
fn tool(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = run(prog, args, dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stdout.contains(" failed") || stderr.contains("qemu-io:") {
        panic!(
            "`{prog} {}` failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args.join(" "),
            out.status
        );
    }
    stdout
}

/// Exit code and standard error (with the program names made equal) of a run.
fn outcome(o: &Output) -> (Option<i32>, String) {
    let err = String::from_utf8_lossy(&o.stderr)
        .replace("qemu-img:", "qcow2kit:")
        .replace("qemu-io:", "qcow2kit:");
    (o.status.code(), err)
}

/// Two directories with the same inputs: `q/` for the qemu tools, `k/` for qcow2kit.
struct Pair {
    _tmp: TempDir,
    q: PathBuf,
    k: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = tmp.path().join("q");
        let k = tmp.path().join("k");
        fs::create_dir(&q).expect("mkdir");
        fs::create_dir(&k).expect("mkdir");
        Pair { _tmp: tmp, q, k }
    }

    /// Runs a qemu tool in both directories (setting up inputs); it must succeed.
    fn setup(&self, prog: &str, args: &[&str]) {
        tool(prog, args, &self.q);
        tool(prog, args, &self.k);
    }

    fn img(&self, args: &[&str]) {
        self.setup("qemu-img", args);
    }

    /// Patches both copies of `file` at `offset`.
    fn poke(&self, file: &str, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        for d in [&self.q, &self.k] {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(d.join(file))
                .expect("open");
            f.write_all_at(bytes, offset).expect("poke");
        }
    }

    /// Runs `qemu` (qemu-img or qemu-io) in `q/` and qcow2kit in `k/` with the same arguments
    /// (after `prefix`, the qcow2kit subcommand standing for the qemu tool) and output sink.
    fn both(&self, qemu: &str, prefix: &[&str], args: &[&str], sink: Sink) -> (Output, Output) {
        let q = spawn(qemu, args, &self.q, sink);
        let kargs: Vec<&str> = prefix.iter().chain(args).copied().collect();
        let k = spawn(QCOW2KIT, &kargs, &self.k, sink);
        (q, k)
    }

    /// As [`Pair::both`] with qemu-img, asserting the same exit code and standard error.
    fn same(&self, args: &[&str]) -> (Output, Output) {
        let (q, k) = self.both("qemu-img", &[], args, Sink::Pipe);
        assert_eq!(outcome(&q), outcome(&k), "qemu-img {args:?}");
        (q, k)
    }
}

fn blocks(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks()
}

#[test]
fn output_that_cannot_be_written_is_dropped_as_qemu_does() {
    let p = Pair::new();
    p.img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    p.img(&["create", "-q", "-f", "qcow2", "b.qcow2", "2M"]);
    let cases: &[&[&str]] = &[
        &["info", "a.qcow2"],
        &["info", "--output=json", "a.qcow2"],
        &["check", "a.qcow2"],
        &["map", "a.qcow2"],
        &["map", "--output=json", "a.qcow2"],
        &["compare", "a.qcow2", "b.qcow2"],
        &["compare", "-p", "a.qcow2", "a.qcow2"],
        &["convert", "-p", "-O", "raw", "a.qcow2", "c.raw"],
        &["create", "-f", "qcow2", "d.qcow2", "1M"],
        &["resize", "b.qcow2", "+1M"],
        &["--help"],
        &["info", "missing.qcow2"],
    ];
    for sink in [Sink::Full, Sink::Closed] {
        for args in cases {
            let (q, k) = p.both("qemu-img", &[], args, sink);
            let (qc, qe) = outcome(&q);
            let (kc, ke) = outcome(&k);
            assert!(!ke.contains("panicked"), "{args:?} {sink:?}: {ke}");
            assert_eq!(qc, kc, "exit code of {args:?} with stdout {sink:?}: {ke}");
            // The messages themselves are compared elsewhere; here only whether there is one.
            assert_eq!(
                qe.is_empty(),
                ke.is_empty(),
                "{args:?} {sink:?}: {qe} / {ke}"
            );
        }
        for args in [
            &["-c", "read -v 0 512", "a.qcow2"][..],
            &["-c", "write 0 512", "-c", "read 0 512", "a.qcow2"],
            &["--help"],
        ] {
            let (q, k) = p.both("qemu-io", &["io"], args, sink);
            let (kc, ke) = outcome(&k);
            assert!(!ke.contains("panicked"), "io {args:?} {sink:?}: {ke}");
            assert_eq!(
                q.status.code(),
                kc,
                "exit code of io {args:?} with stdout {sink:?}"
            );
        }
    }
}

/// Runs `prog args` in `dir` with `write -s` reading from a FIFO that yields `data` and then
/// stays open without ending (as an endless source would); the command must finish within
/// 30 s, having read only what it needs.
fn with_endless_source(prog: &str, args: &[&str], dir: &Path, fifo: &Path, data: &[u8]) -> Output {
    use std::io::Write;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let path = fifo.to_path_buf();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || {
        // Opening blocks until the command opens the FIFO for reading.
        let mut w = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open fifo");
        let _ = w.write_all(&data);
        // Held open until the command is done: a reader that waits for the end never sees it.
        let _ = done_rx.recv();
    });
    let mut child = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = done_tx.send(());
            // Unblock a feeder still waiting for a reader.
            let _ = fs::File::open(fifo);
            panic!("`{prog} {args:?}` still reads its endless source after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait");
    let _ = done_tx.send(());
    feeder.join().expect("feeder");
    out
}

#[test]
fn write_from_an_endless_source_reads_only_the_request() {
    let p = Pair::new();
    p.img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    // 3 MiB of a non-repeating pattern, then the source stays open: the write needs 2 MiB.
    let data: Vec<u8> = (0u32..3 << 18).flat_map(|i| i.to_le_bytes()).collect();
    for (prog, prefix, dir) in [("qemu-io", &[][..], &p.q), (QCOW2KIT, &["io"][..], &p.k)] {
        let fifo = dir.join("src.fifo");
        tool("mkfifo", &[fifo.to_str().expect("utf-8")], dir);
        let mut args: Vec<&str> = prefix.to_vec();
        args.extend(["-c", "write -s src.fifo 4096 2M", "a.qcow2"]);
        let out = with_endless_source(prog, &args, dir, &fifo, &data);
        assert!(
            out.status.success(),
            "{prog}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    p.same(&["compare", "a.qcow2", "../k/a.qcow2"]);
    // A short source is repeated to fill the request, as qemu-io does.
    for d in [&p.q, &p.k] {
        fs::write(d.join("short.bin"), b"0123456789").expect("write");
        fs::write(d.join("empty.bin"), b"").expect("write");
    }
    let (q, k) = p.both(
        "qemu-io",
        &["io"],
        &["-c", "write -s short.bin 1000 5000", "a.qcow2"],
        Sink::Pipe,
    );
    assert_eq!(q.status.code(), k.status.code());
    for bad in ["empty.bin", "missing.bin", "."] {
        let cmd = format!("write -s {bad} 0 512");
        let (q, k) = p.both("qemu-io", &["io"], &["-c", &cmd, "a.qcow2"], Sink::Pipe);
        assert_eq!(outcome(&q), outcome(&k), "{cmd}");
        assert_eq!(q.stdout, k.stdout, "{cmd}");
    }
    let (q, k) = p.both(
        "qemu-img",
        &[],
        &["compare", "a.qcow2", "../k/a.qcow2"],
        Sink::Pipe,
    );
    assert_eq!(
        q.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&q.stdout)
    );
    assert_eq!(outcome(&q), outcome(&k));
}

/// Asserts that qcow2kit's file holds as many blocks as qemu-img's, within `slack` 512-byte
/// blocks (qcow2kit lays metadata out in whole clusters).
fn same_allocation(p: &Pair, file: &str, slack: u64) {
    let (q, k) = (blocks(&p.q.join(file)), blocks(&p.k.join(file)));
    assert!(
        k + slack >= q && k <= q + slack,
        "{file}: qemu-img allocated {q} blocks, qcow2kit {k}"
    );
}

#[test]
fn falloc_preallocation_reserves_the_blocks() {
    // iotest 243: the data blocks of a falloc image are allocated, in the image file or in its
    // external data file.
    let p = Pair::new();
    let cases: &[(&str, &str, &[&str])] = &[
        ("a.qcow2", "preallocation=falloc", &["a.qcow2"]),
        (
            "b.qcow2",
            "preallocation=falloc,cluster_size=4096",
            &["b.qcow2"],
        ),
        (
            "c.qcow2",
            "preallocation=falloc,data_file=c.data",
            &["c.qcow2", "c.data"],
        ),
        ("d.raw", "preallocation=falloc", &["d.raw"]),
    ];
    for (file, opts, judged) in cases {
        let fmt = if file.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        p.same(&["create", "-q", "-f", fmt, "-o", opts, file, "24M"]);
        for j in *judged {
            // 24 MiB is 49152 blocks; the slack covers metadata laid out in whole clusters.
            same_allocation(&p, j, 512);
        }
        if fmt == "qcow2" {
            p.same(&["check", file]);
        }
    }
}

#[test]
fn convert_with_s_0_makes_a_thick_copy() {
    let p = Pair::new();
    p.img(&["create", "-q", "-f", "qcow2", "s.qcow2", "16M"]);
    p.setup(
        "qemu-io",
        &[
            "-c",
            "write -P 1 1M 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0 8M 1M",
            "s.qcow2",
        ],
    );
    for (fmt, out) in [("raw", "t.raw"), ("qcow2", "t.qcow2")] {
        p.same(&["convert", "-S", "0", "-O", fmt, "s.qcow2", out]);
        // Fully allocated: 16 MiB is 32768 blocks, plus the qcow2 metadata.
        same_allocation(&p, out, 512);
        assert!(blocks(&p.k.join(out)) >= 32768, "{out} is sparse");
        let (q, _) = p.same(&["compare", "-f", "qcow2", "-F", fmt, "s.qcow2", out]);
        assert_eq!(q.status.code(), Some(0));
    }
    // Without -S 0 both stay sparse.
    p.same(&["convert", "-O", "raw", "s.qcow2", "u.raw"]);
    same_allocation(&p, "u.raw", 64);
}

#[test]
fn growing_over_a_raw_data_file_keeps_its_data() {
    // iotest 244 ("Truncation (growing)"): data appended to the raw data file before the resize
    // becomes visible through the image, as in the data file itself.
    for data_len in ["2M", "3M"] {
        let p = Pair::new();
        p.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=t.data,data_file_raw=on",
            "t.qcow2",
            "1M",
        ]);
        p.setup(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 42 0 1M", "t.data"],
        );
        p.setup("truncate", &["-s", data_len, "t.data"]);
        p.setup(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 84 1M 1M", "t.data"],
        );
        let (q, k) = p.same(&["resize", "t.qcow2", "2M"]);
        assert_eq!(q.stdout, k.stdout);
        for d in [&p.q, &p.k] {
            let out = tool(
                "qemu-io",
                &["-c", "read -P 42 0 1M", "-c", "read -P 84 1M 1M", "t.qcow2"],
                d,
            );
            assert!(
                !out.contains("verification failed"),
                "{}: {out}",
                d.display()
            );
            assert_eq!(
                fs::metadata(d.join("t.data")).expect("stat").len(),
                fs::metadata(p.q.join("t.data")).expect("stat").len()
            );
        }
        p.same(&["check", "t.qcow2"]);
    }
}

#[test]
fn check_repair_clears_unknown_autoclear_bits() {
    // iotest 036: qemu-img check -r opens the image writable, which clears the autoclear bits
    // QEMU does not know even when nothing needs repairing; the known ones stay.
    let p = Pair::new();
    p.img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "64M"]);
    p.img(&["create", "-q", "-f", "qcow2", "bitmap.qcow2", "64M"]);
    p.img(&["bitmap", "--add", "bitmap.qcow2", "b0"]);
    p.img(&["create", "-q", "-f", "qcow2", "leaky.qcow2", "64M"]);
    p.setup("qemu-io", &["-c", "write -P 7 0 1M", "leaky.qcow2"]);
    // A leaked cluster: the refcount of the cluster after the file's end (block 0 covers it).
    p.poke("leaky.qcow2", 0x20000 + 2 * 40, &1u16.to_be_bytes());
    for (file, bits) in [
        ("plain.qcow2", 0x8000_0000_0000_0020u64),
        ("bitmap.qcow2", 0x8000_0000_0000_0001),
        ("leaky.qcow2", 0x0000_0001_0000_0000),
    ] {
        p.poke(file, 88, &bits.to_be_bytes());
        for mode in ["all", "leaks"] {
            for d in [&p.q, &p.k] {
                fs::copy(d.join(file), d.join("t.qcow2")).expect("copy");
            }
            let (q, k) = p.same(&["check", "-r", mode, "t.qcow2"]);
            assert_eq!(q.stdout, k.stdout, "{file} -r {mode}");
            let (qb, kb) = (
                fs::read(p.q.join("t.qcow2")).expect("read"),
                fs::read(p.k.join("t.qcow2")).expect("read"),
            );
            assert_eq!(
                qb[88..96],
                kb[88..96],
                "autoclear bits of {file} after -r {mode}"
            );
            if file != "bitmap.qcow2" {
                // (QEMU also rewrites the bitmap directory of an image it opens writable.)
                let diff: Vec<usize> = (0..qb.len().max(kb.len()))
                    .filter(|&i| qb.get(i) != kb.get(i))
                    .take(8)
                    .collect();
                assert!(
                    diff.is_empty(),
                    "{file} after -r {mode} differs at {diff:?}"
                );
            }
        }
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The refcount table of the image at `path`, raw, and whether any entry names a block that
/// counts nothing (iotest 163's check).
fn reftable(path: &Path) -> (Vec<u64>, bool) {
    let b = fs::read(path).expect("read image");
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().expect("4 bytes"));
    let cs = 1usize << cluster_bits;
    let offset = be64(&b, 48) as usize;
    let clusters = u32::from_be_bytes(b[56..60].try_into().expect("4 bytes")) as usize;
    let table: Vec<u64> = (0..clusters * cs / 8)
        .map(|i| be64(&b, offset + i * 8))
        .collect();
    let empty = table.iter().any(|&e| {
        let o = (e & !0x1ff) as usize;
        o != 0 && b.get(o..o + cs).is_none_or(|c| c.iter().all(|&x| x == 0))
    });
    (table, empty)
}

#[test]
fn shrink_drops_refcount_blocks_that_count_nothing() {
    // iotest 163: after a shrink no refcount table entry names a block that counts nothing,
    // the file ends after its last used cluster, and the image checks clean.
    let cases = [
        ("512", "64", 3u64 << 20, "1M", 256u64 << 10),
        ("64K", "16", 128 << 20, "10M", 16 << 20),
        ("1M", "1", 128 << 20, "10M", 16 << 20),
    ];
    for (cluster, bits, len, shrunk, chunk) in cases {
        let p = Pair::new();
        let opts = format!("cluster_size={cluster},refcount_bits={bits}");
        p.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "t.qcow2",
            &len.to_string(),
        ]);
        let mut writes = Vec::new();
        for off in (0..len).step_by(chunk as usize) {
            writes.push("-c".to_string());
            writes.push(format!("write -P 0xff {off} {chunk}"));
        }
        writes.push("t.qcow2".into());
        let args: Vec<&str> = writes.iter().map(String::as_str).collect();
        p.setup("qemu-io", &args);
        let (q, k) = p.same(&["resize", "--shrink", "t.qcow2", shrunk]);
        assert_eq!(q.stdout, k.stdout);
        let (qt, qe) = reftable(&p.q.join("t.qcow2"));
        let (kt, ke) = reftable(&p.k.join("t.qcow2"));
        assert!(
            !qe,
            "{cluster}: qemu-img left a refcount block that counts nothing"
        );
        assert!(
            !ke,
            "{cluster}: qcow2kit left a refcount block that counts nothing"
        );
        assert_eq!(qt, kt, "{cluster}/{bits}: refcount tables differ");
        assert_eq!(
            fs::metadata(p.q.join("t.qcow2")).expect("stat").len(),
            fs::metadata(p.k.join("t.qcow2")).expect("stat").len(),
            "{cluster}/{bits}: file lengths differ"
        );
        let (q, k) = p.same(&["check", "t.qcow2"]);
        assert_eq!(q.stdout, k.stdout);
        assert_eq!(k.status.code(), Some(0));
        let (q, _) = p.same(&["compare", "t.qcow2", "../k/t.qcow2"]);
        assert_eq!(q.status.code(), Some(0));
    }
}

#[test]
fn shrink_refuses_hostile_refcount_table_entries() {
    // The second refcount table entry (the first names the real block at 0x20000) is made
    // unaligned, past 64 GiB (covered by no block), past the file's end (counted by no block),
    // out of any file's range, or the offset of a data cluster past the new end with junk in
    // its low bits: qemu-img refuses each with the same message, and marks the image corrupt
    // where QEMU does. qcow2kit refuses each before dropping anything (QEMU only after
    // dropping the data past the new end). A data cluster posing as a block is found by the
    // metadata map (the data cluster is a refcount block) before the shrink frees it, where
    // QEMU finds it only afterwards: that refusal has qcow2kit's own words.
    let entries: [(u64, Option<&str>); 5] = [
        (0x5_0200, None),
        (0x00ff_ffff_0000_0000, None),
        (0x20_0000, None),
        (0xff00_0000_0005_0000, None),
        (
            0x5_0010,
            Some("Preventing invalid free of cluster 0x50000 (overlaps with refcount block"),
        ),
    ];
    for (e, own_words) in entries {
        let p = Pair::new();
        p.img(&["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
        p.setup("qemu-io", &["-c", "write -P 7 40M 1M", "t.qcow2"]);
        p.poke("t.qcow2", 0x10000 + 8, &e.to_be_bytes());
        let args = ["resize", "--shrink", "t.qcow2", "32M"];
        let (q, k) = match own_words {
            None => p.same(&args),
            Some(words) => {
                let (q, k) = p.both("qemu-img", &[], &args, Sink::Pipe);
                let err = String::from_utf8_lossy(&k.stderr);
                assert!(err.contains(words), "{e:#x}: {err}");
                assert_eq!(k.status.code(), Some(1), "{e:#x}: {err}");
                (q, k)
            }
        };
        assert_eq!(
            q.status.code(),
            Some(1),
            "{e:#x}: {}",
            String::from_utf8_lossy(&q.stderr)
        );
        assert_eq!(q.stdout, k.stdout, "{e:#x}");
        let (qb, kb) = (
            fs::read(p.q.join("t.qcow2")).expect("read"),
            fs::read(p.k.join("t.qcow2")).expect("read"),
        );
        assert_eq!(be64(&qb, 24), be64(&kb, 24), "{e:#x}: virtual size");
        assert_eq!(be64(&qb, 72), be64(&kb, 72), "{e:#x}: incompatible bits");
        let read = |dir: &Path| {
            let o = run(
                "qemu-io",
                &["-r", "-U", "-c", "read -P 7 40M 1M", "t.qcow2"],
                dir,
            );
            String::from_utf8_lossy(&o.stdout).contains("verification failed")
        };
        assert!(
            read(&p.q),
            "{e:#x}: qemu-img kept the data past the new end"
        );
        assert!(
            !read(&p.k),
            "{e:#x}: qcow2kit dropped the data past the new end"
        );
    }
}

/// A process id that no longer exists: that of a child that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait");
    pid
}

fn temp_name(target: &str, pid: u32) -> String {
    format!(".{target}.qcow2kit-{pid}.tmp")
}

#[test]
fn stale_temporary_files_of_killed_converts_are_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "256M"],
        d,
    );
    tool("qemu-io", &["-c", "write -P 9 0 160M", "s.qcow2"], d);

    // A convert killed with SIGKILL while it writes leaves its temporary file behind.
    let mut child = Command::new(QCOW2KIT)
        .args(["convert", "-O", "qcow2", "s.qcow2", "t.qcow2"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn convert");
    let killed_tmp = d.join(temp_name("t.qcow2", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !killed_tmp.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no temporary file appeared"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "convert ended too soon"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    assert!(
        killed_tmp.exists(),
        "the killed convert's temporary file is gone already"
    );
    assert!(!d.join("t.qcow2").exists());

    // Other leftovers: one whose process is dead, one of a live process, one whose process id
    // is not visible but whose writer holds its lock, one of another target, one not ours.
    let dead = d.join(temp_name("t.qcow2", dead_pid()));
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let live = d.join(temp_name("t.qcow2", sleeper.id()));
    let locked = d.join(temp_name("t.qcow2", dead_pid()));
    let other = d.join(temp_name("u.qcow2", dead_pid()));
    let foreign = d.join(".t.qcow2.qcow2kit-12x.tmp");
    for f in [&dead, &live, &locked, &other, &foreign] {
        fs::write(f, b"partial image").expect("write leftover");
    }
    let mut holder = Command::new("flock")
        .args(["-x", locked.to_str().expect("utf-8"), "sleep", "60"])
        .spawn()
        .expect("spawn flock");
    // flock(1) takes the lock before running sleep: wait until it is held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let probe = run(
            "flock",
            &["-n", "-x", locked.to_str().expect("utf-8"), "true"],
            d,
        );
        if !probe.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let out = run(
        QCOW2KIT,
        &["convert", "-O", "qcow2", "s.qcow2", "t.qcow2"],
        d,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        run("qemu-img", &["compare", "s.qcow2", "t.qcow2"], d)
            .status
            .code(),
        Some(0)
    );
    assert!(
        !killed_tmp.exists(),
        "the killed convert's temporary file is still there"
    );
    assert!(
        !dead.exists(),
        "a dead convert's temporary file is still there"
    );
    assert!(live.exists(), "a live convert's temporary file was removed");
    assert!(locked.exists(), "a locked temporary file was removed");
    assert!(
        other.exists(),
        "another target's temporary file was removed"
    );
    assert!(
        foreign.exists(),
        "a file not named by the scheme was removed"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
