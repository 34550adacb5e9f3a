//! `qcow2kit check` judged by `qemu-img check` (qemu 10.x).
//!
//! Every test builds images with `qemu-img` / `qemu-io` in a temporary directory — clean ones
//! over a matrix of cluster sizes, refcount widths, versions, compression, snapshots, bitmaps,
//! extended L2, data files, and damaged ones made by patching bytes — runs the same command line
//! through qemu-img and through qcow2kit from that directory, and requires:
//! - the same exit code;
//! - the same standard output, byte for byte (human report, and JSON compared both as values
//!   and as text, key order included);
//! - the same lines on standard error (the program-name prefix aside), except the wording of
//!   "Could not open" errors, which only has to be present on both sides.
//!
//! A missing or failing qemu-img / qemu-io fails the tests; it never skips them.

use qcow2kit_testsupport::{exec, tool};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

const QCOW2KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// A scratch directory of images.
struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("qcow2kit-cli-check-")
            .tempdir()
            .expect("creating a temporary directory");
        Work { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn img(&self, args: &[&str]) {
        tool("qemu-img", args, self.dir.path());
    }

    /// `qemu-img create -q -f qcow2 -o OPTS NAME SIZE`.
    fn create(&self, name: &str, opts: &str, size: &str) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size]);
        self.img(&args);
    }

    /// `qemu-io -c CMD… NAME`.
    fn io(&self, name: &str, cmds: &[&str]) {
        let mut args = Vec::new();
        for c in cmds {
            args.extend(["-c", *c]);
        }
        args.push(name);
        tool("qemu-io", &args, self.dir.path());
    }

    fn copy(&self, from: &str, to: &str) {
        fs::copy(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("copying {from} to {to}: {e}"));
    }

    fn write_file(&self, name: &str, bytes: &[u8]) {
        fs::write(self.path(name), bytes).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }

    fn open(&self, name: &str) -> Img {
        Img::open(&self.path(name))
    }
}

/// Exit code, standard output and standard error of one run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(prog: &str, args: &[&str], dir: &Path) -> Run {
    let out = exec(prog, args, dir);
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Standard error without the program-name prefix of error_report() lines.
fn stderr_lines(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("qcow2kit: "))
                .unwrap_or(l)
                .replace("'qemu-img check --help'", "'qcow2kit check --help'")
        })
        .collect()
}

/// Runs `check ARGS…` through both tools and requires the same result; returns qemu-img's.
fn same(w: &Work, args: &[&str]) -> Run {
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    let q = run("qemu-img", &full, w.dir.path());
    let k = run(QCOW2KIT, &full, w.dir.path());
    let what = format!("check {}", args.join(" "));
    assert_eq!(
        k.code, q.code,
        "{what}: exit code\n--- qemu-img stderr ---\n{}\n--- qcow2kit stderr ---\n{}",
        q.stderr, k.stderr
    );
    assert_eq!(k.stdout, q.stdout, "{what}: standard output");
    if args.contains(&"--output=json") && !q.stdout.is_empty() {
        let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON");
        let kv: Value = serde_json::from_str(&k.stdout).expect("qcow2kit JSON");
        assert_eq!(kv, qv, "{what}: JSON values");
    }
    let (qe, ke) = (stderr_lines(&q.stderr), stderr_lines(&k.stderr));
    let opens = |v: &[String]| v.iter().any(|l| l.starts_with("Could not open"));
    if opens(&qe) || opens(&ke) {
        assert!(
            opens(&qe) && opens(&ke),
            "{what}: only one side could not open the image\nqemu-img: {qe:?}\nqcow2kit: {ke:?}"
        );
    } else {
        assert_eq!(ke, qe, "{what}: standard error");
    }
    q
}

/// Checks `name` in human and JSON output; returns qemu-img's JSON (Null if it printed none).
fn judge_any(w: &Work, name: &str) -> Value {
    same(w, &[name]);
    let q = same(w, &["--output=json", name]);
    if q.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&q.stdout).expect("qemu-img JSON")
    }
}

/// [`judge_any`] for images qemu-img does report on.
fn judge(w: &Work, name: &str) -> Value {
    let v = judge_any(w, name);
    assert!(v.is_object(), "{name}: qemu-img printed no report");
    v
}

fn field(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Raw access to a qcow2 file for building damaged images (an independent reading of the spec).
struct Img {
    f: fs::File,
    cb: u32,
    cs: u64,
    l1_off: u64,
    l1_size: u64,
    rt_off: u64,
    order: u32,
    entry_size: u64,
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Img {
    fn open(path: &Path) -> Img {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let mut h = [0u8; 104];
        f.read_exact_at(&mut h, 0).expect("reading header");
        let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let be64 = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[o..o + 8]);
            u64::from_be_bytes(a)
        };
        let v3 = be32(4) >= 3;
        let cb = be32(20);
        Img {
            cb,
            cs: 1 << cb,
            l1_off: be64(40),
            l1_size: u64::from(be32(36)),
            rt_off: be64(48),
            order: if v3 { be32(96) } else { 4 },
            entry_size: if v3 && be64(72) & 16 != 0 { 16 } else { 8 },
            f,
        }
    }

    fn u64_at(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.f.read_exact_at(&mut b, off).expect("reading image");
        u64::from_be_bytes(b)
    }

    fn put_u64(&self, off: u64, v: u64) {
        self.f
            .write_all_at(&v.to_be_bytes(), off)
            .expect("patching");
    }

    fn u32_at(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f.read_exact_at(&mut b, off).expect("reading image");
        u32::from_be_bytes(b)
    }

    fn put_u32(&self, off: u64, v: u32) {
        self.f
            .write_all_at(&v.to_be_bytes(), off)
            .expect("patching");
    }

    fn len(&self) -> u64 {
        self.f.metadata().expect("stat").len()
    }

    /// `n` bytes at `off`; zeros past the end of the file.
    fn bytes_at(&self, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        let inside = self.len().saturating_sub(off).min(n as u64) as usize;
        self.f
            .read_exact_at(&mut b[..inside], off)
            .expect("reading image");
        b
    }

    fn put_bytes(&self, off: u64, b: &[u8]) {
        self.f.write_all_at(b, off).expect("patching");
    }

    fn set_len(&self, len: u64) {
        self.f.set_len(len).expect("truncating");
    }

    /// Length of the snapshot table entry at `off`, padding included.
    fn snapshot_entry_len(&self, off: u64) -> u64 {
        let h = self.bytes_at(off, 40);
        let be16 = |o: usize| u64::from(u16::from_be_bytes([h[o], h[o + 1]]));
        let extra = u64::from(u32::from_be_bytes([h[36], h[37], h[38], h[39]]));
        (40 + extra + be16(12) + be16(14)).next_multiple_of(8)
    }

    /// Offset of the L2 entry of guest offset `guest`, if its L2 table exists.
    fn l2_entry_addr(&self, guest: u64) -> Option<u64> {
        let l2_bits = self.cb - if self.entry_size == 16 { 4 } else { 3 };
        let ci = guest >> self.cb;
        let l1i = ci >> l2_bits;
        if l1i >= self.l1_size {
            return None;
        }
        let l2 = self.u64_at(self.l1_off + 8 * l1i) & OFFSET_MASK;
        (l2 != 0).then(|| l2 + (ci & ((1 << l2_bits) - 1)) * self.entry_size)
    }

    /// The first guest cluster mapped to a normal (uncompressed) host cluster: (entry address,
    /// entry).
    fn first_data(&self) -> (u64, u64) {
        let mut g = 0;
        while let Some(a) = self.l2_entry_addr(g) {
            let e = self.u64_at(a);
            if e & (1 << 62) == 0 && e & OFFSET_MASK != 0 {
                return (a, e);
            }
            g += self.cs;
        }
        panic!("image has no data cluster");
    }

    /// The first compressed L2 entry: (entry address, entry).
    fn first_compressed(&self) -> (u64, u64) {
        let mut g = 0;
        while let Some(a) = self.l2_entry_addr(g) {
            let e = self.u64_at(a);
            if e & (1 << 62) != 0 {
                return (a, e);
            }
            g += self.cs;
        }
        panic!("image has no compressed cluster");
    }

    /// The refcount block covering `cluster` (0: none).
    fn refcount_block(&self, cluster: u64) -> u64 {
        let per_block = (self.cs * 8) >> self.order;
        self.u64_at(self.rt_off + 8 * (cluster / per_block)) & !0x1ff
    }

    /// (refcount block offset, bit position of the entry) of `cluster`.
    fn refcount_loc(&self, cluster: u64) -> (u64, u64) {
        let bits = 1u64 << self.order;
        let per_block = self.cs * 8 / bits;
        let block = self.refcount_block(cluster);
        assert_ne!(block, 0, "cluster {cluster} has no refcount block");
        (block, (cluster % per_block) * bits)
    }

    fn refcount(&self, cluster: u64) -> u64 {
        let (block, bit) = self.refcount_loc(cluster);
        let bits = 1u64 << self.order;
        if bits < 8 {
            let mut b = [0u8; 1];
            self.f.read_exact_at(&mut b, block + bit / 8).expect("read");
            u64::from(b[0] >> (bit % 8)) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let mut b = [0u8; 8];
            self.f
                .read_exact_at(&mut b[8 - n..], block + bit / 8)
                .expect("read");
            u64::from_be_bytes(b)
        }
    }

    fn set_refcount(&self, cluster: u64, v: u64) {
        let (block, bit) = self.refcount_loc(cluster);
        let bits = 1u64 << self.order;
        if bits < 8 {
            let mut b = [0u8; 1];
            self.f.read_exact_at(&mut b, block + bit / 8).expect("read");
            let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
            b[0] = (b[0] & !mask) | (((v as u8) << (bit % 8)) & mask);
            self.f.write_all_at(&b, block + bit / 8).expect("write");
        } else {
            let n = (bits / 8) as usize;
            self.f
                .write_all_at(&v.to_be_bytes()[8 - n..], block + bit / 8)
                .expect("write");
        }
    }

    fn snapshot_table(&self) -> u64 {
        self.u64_at(64)
    }
}

/// Deterministic pseudo-random bytes (splitmix64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.extend_from_slice(&(z ^ (z >> 31)).to_be_bytes());
    }
    v.truncate(len);
    v
}

/// `clusters` clusters of `cs` bytes, each partly random and partly constant, so that each
/// compresses to a different size and compressed clusters straddle host cluster boundaries.
fn half_compressible(cs: usize, clusters: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(cs * clusters);
    for i in 0..clusters {
        let n = cs / 16 + (i * 7919) % (cs * 3 / 4);
        v.extend_from_slice(&random_bytes(n, i as u64));
        v.resize(v.len() + cs - n, b'A');
    }
    v
}

#[test]
fn clean_matrix_of_cluster_sizes_and_refcount_widths() {
    let w = Work::new();
    for cs in ["512", "4k", "64k", "2M"] {
        for rb in ["1", "16", "64"] {
            let name = format!("m-{cs}-{rb}.qcow2");
            w.create(
                &name,
                &format!("cluster_size={cs},refcount_bits={rb}"),
                "40M",
            );
            w.io(
                &name,
                &[
                    "write -P 1 0 300k",
                    "write -P 2 5M 70k",
                    "write -z 8M 64k",
                    "write -P 3 38M 2M",
                    "write -P 4 20M 3k",
                ],
            );
            let v = judge(&w, &name);
            assert_eq!(
                field(&v, "check-errors") + field(&v, "corruptions"),
                0,
                "{name}"
            );
            assert!(field(&v, "allocated-clusters") > 0, "{name}");
        }
    }
    // Version 2, with and without a snapshot.
    w.create("v2.qcow2", "compat=0.10", "32M");
    w.io("v2.qcow2", &["write -P 1 0 300k", "write -P 2 9M 1M"]);
    judge(&w, "v2.qcow2");
    w.create("v2s.qcow2", "compat=0.10,cluster_size=4k", "32M");
    w.io("v2s.qcow2", &["write -P 1 0 300k"]);
    w.img(&["snapshot", "-c", "s1", "v2s.qcow2"]);
    w.io("v2s.qcow2", &["write -P 2 0 100k"]);
    judge(&w, "v2s.qcow2");
    // Empty images, quiet mode.
    w.create("empty.qcow2", "", "0");
    judge(&w, "empty.qcow2");
    w.create("blank.qcow2", "", "1T");
    judge(&w, "blank.qcow2");
    same(&w, &["-q", "v2.qcow2"]);
    same(&w, &["-q", "--output=json", "v2.qcow2"]);
    same(&w, &["-U", "-T", "none", "v2.qcow2"]);
}

#[test]
fn compressed_clusters_spanning_host_clusters() {
    let w = Work::new();
    for (cs, csn) in [("512", 512usize), ("4k", 4096), ("64k", 65536)] {
        let clusters = (4 << 20) / csn.max(16384) * (csn.max(16384) / csn);
        w.write_file("data.raw", &half_compressible(csn, clusters.min(512)));
        for ct in ["zlib", "zstd"] {
            let name = format!("c-{cs}-{ct}.qcow2");
            w.img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cs},compression_type={ct}"),
                "data.raw",
                &name,
            ]);
            // Some compressed cluster's bytes must cross a host cluster boundary.
            let img = w.open(&name);
            let x = 62 - (img.cb - 8);
            let mut spans = 0;
            let mut g = 0;
            while let Some(a) = img.l2_entry_addr(g) {
                let e = img.u64_at(a);
                if e & (1 << 62) != 0 {
                    let host = e & ((1u64 << x) - 1);
                    let sectors = ((e >> x) & ((1u64 << (img.cb - 8)) - 1)) + 1;
                    let end = (host & !511) + sectors * 512;
                    if host >> img.cb != (end - 1) >> img.cb {
                        spans += 1;
                    }
                }
                g += img.cs;
            }
            assert!(
                spans > 0,
                "{name}: no compressed cluster spans two host clusters"
            );
            let v = judge(&w, &name);
            assert!(field(&v, "compressed-clusters") > 0, "{name}");
        }
    }
    // Compressed and plain clusters mixed, then overwritten (freed compressed space).
    w.create("mix.qcow2", "cluster_size=4k", "16M");
    w.io(
        "mix.qcow2",
        &[
            "write -c -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -c -P 3 1M 8k",
            "write -P 4 4k 4k",
        ],
    );
    judge(&w, "mix.qcow2");
}

#[test]
fn snapshots_bitmaps_extended_l2_and_data_files() {
    let w = Work::new();
    w.create("snap.qcow2", "", "32M");
    w.io("snap.qcow2", &["write -P 1 0 1M"]);
    w.img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    w.io("snap.qcow2", &["write -P 2 0 128k", "write -P 3 4M 64k"]);
    w.img(&["snapshot", "-c", "s2", "snap.qcow2"]);
    w.io(
        "snap.qcow2",
        &["write -P 4 64k 64k", "write -c -P 5 8M 64k"],
    );
    judge(&w, "snap.qcow2");

    w.create("bm.qcow2", "", "32M");
    w.img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    w.img(&["bitmap", "--add", "-g", "512", "bm.qcow2", "b1"]);
    w.io("bm.qcow2", &["write -P 1 0 1M", "write -P 2 17M 4k"]);
    judge(&w, "bm.qcow2");

    for cs in ["16k", "64k", "2M"] {
        let name = format!("xl-{cs}.qcow2");
        w.create(&name, &format!("extended_l2=on,cluster_size={cs}"), "32M");
        w.io(
            &name,
            &[
                "write -P 1 0 1M",
                "write -P 2 2M 4k",
                "write -z 4M 128k",
                "write -P 3 6M 68k",
            ],
        );
        judge(&w, &name);
    }

    w.create("df.qcow2", "data_file=df.raw", "32M");
    w.io("df.qcow2", &["write -P 1 0 1M", "write -P 2 3M 4k"]);
    judge(&w, "df.qcow2");
    w.create("dfr.qcow2", "data_file=dfr.raw,data_file_raw=on", "32M");
    w.io("dfr.qcow2", &["write -P 1 0 1M"]);
    judge(&w, "dfr.qcow2");

    w.create("pre.qcow2", "preallocation=metadata", "32M");
    judge(&w, "pre.qcow2");
    w.create("full.qcow2", "preallocation=full,cluster_size=4k", "8M");
    judge(&w, "full.qcow2");

    w.create("base.qcow2", "", "32M");
    w.io("base.qcow2", &["write -P 9 0 2M"]);
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ]);
    w.io("ov.qcow2", &["write -P 1 64k 64k"]);
    judge(&w, "ov.qcow2");
}

#[test]
fn dirty_image_with_lazy_refcounts() {
    let w = Work::new();
    for cs in ["64k", "4k"] {
        let name = format!("dirty-{cs}.qcow2");
        w.create(
            &name,
            &format!("lazy_refcounts=on,cluster_size={cs}"),
            "32M",
        );
        // qemu-io dies on `abort` (as a crash would): the image stays dirty.
        let out = exec(
            "qemu-io",
            &[
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 8 9M 4k",
                "-c",
                "abort",
                &name,
            ],
            w.dir.path(),
        );
        assert!(
            !out.status.success(),
            "qemu-io abort should not exit cleanly"
        );
        let mut b = [0u8; 8];
        w.open(&name).f.read_exact_at(&mut b, 72).expect("read");
        assert_eq!(u64::from_be_bytes(b) & 1, 1, "{name} is not dirty");
        let v = judge(&w, &name);
        assert!(
            field(&v, "corruptions") > 0,
            "{name}: stale refcounts not found"
        );
        same(&w, &["-r", "all", "-U", &name]);
    }
}

/// Damages a copy of `base` named `name` with `f`, then compares both tools on it.
fn damaged(w: &Work, base: &str, name: &str, f: impl FnOnce(&Img)) -> Value {
    w.copy(base, name);
    f(&w.open(name));
    judge(w, name)
}

/// [`damaged`] for damage that may keep qemu-img from reporting (it fails to open or to
/// check); returns the exit code.
fn hostile(w: &Work, base: &str, name: &str, f: impl FnOnce(&Img)) -> Option<i32> {
    w.copy(base, name);
    f(&w.open(name));
    judge_any(w, name);
    same(w, &[name]).code
}

#[test]
fn damaged_images() {
    let w = Work::new();
    let mut bases = Vec::new();
    for (cs, rb) in [("64k", "16"), ("512", "64"), ("4k", "1"), ("2M", "8")] {
        let name = format!("b-{cs}-{rb}.qcow2");
        w.create(
            &name,
            &format!("cluster_size={cs},refcount_bits={rb}"),
            "32M",
        );
        w.io(
            &name,
            &["write -P 1 0 300k", "write -P 2 5M 70k", "write -z 8M 64k"],
        );
        bases.push(name);
    }
    w.create("b-xl.qcow2", "extended_l2=on", "32M");
    w.io("b-xl.qcow2", &["write -P 1 0 300k", "write -P 2 5M 4k"]);
    bases.push("b-xl.qcow2".into());

    for base in &bases {
        let stem = base.trim_end_matches(".qcow2");
        // A leak: a cluster appended to the file, counted but unused (if a refcount block
        // covers it).
        let probe = w.open(base);
        let n = probe.len().div_ceil(probe.cs);
        if probe.refcount_block(n) != 0 {
            let v = damaged(&w, base, &format!("{stem}-leak.qcow2"), |i| {
                i.f.write_all_at(&vec![0u8; i.cs as usize], n * i.cs)
                    .expect("extend");
                i.set_refcount(n, 1);
            });
            assert_eq!(
                (field(&v, "leaks"), field(&v, "corruptions")),
                (1, 0),
                "{base}"
            );
        }
        // A leak of a used cluster (bump the header's refcount), where the width allows.
        if !base.contains("-1.") {
            let v = damaged(&w, base, &format!("{stem}-bump.qcow2"), |i| {
                i.set_refcount(0, 2)
            });
            assert_eq!(field(&v, "leaks"), 1, "{base}");
        }
        // A refcount error: a used data cluster with refcount 0 (and thus a COPIED error).
        let v = damaged(&w, base, &format!("{stem}-rc0.qcow2"), |i| {
            let (_, e) = i.first_data();
            i.set_refcount((e & OFFSET_MASK) >> i.cb, 0);
        });
        assert_eq!(field(&v, "corruptions"), 2, "{base}");
        // COPIED cleared in an L2 entry.
        let v = damaged(&w, base, &format!("{stem}-copied.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, e & !(1 << 63));
        });
        assert_eq!(field(&v, "corruptions"), 1, "{base}");
        // COPIED cleared in the L1 entry.
        damaged(&w, base, &format!("{stem}-l1copied.qcow2"), |i| {
            let e = i.u64_at(i.l1_off);
            i.put_u64(i.l1_off, e & !(1 << 63));
        });
        // An L2 entry far past the end of the file, and one just past it.
        damaged(&w, base, &format!("{stem}-eof.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, (e & !OFFSET_MASK) | 1 << 40);
        });
        damaged(&w, base, &format!("{stem}-eof1.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, (e & !OFFSET_MASK) | i.len().next_multiple_of(i.cs));
        });
        // Two L2 entries naming the same cluster.
        damaged(&w, base, &format!("{stem}-dup.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a + i.entry_size, e);
        });
        // Reserved bits in L1 and L2 entries; a misaligned data cluster.
        damaged(&w, base, &format!("{stem}-res.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, e | 1 << 57);
            let l1 = i.u64_at(i.l1_off);
            i.put_u64(i.l1_off, l1 | 2);
        });
        damaged(&w, base, &format!("{stem}-misaligned.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, e + 512);
        });
        // An L2 table that is not cluster-aligned.
        damaged(&w, base, &format!("{stem}-l2unaligned.qcow2"), |i| {
            let e = i.u64_at(i.l1_off);
            i.put_u64(i.l1_off, e + 512);
        });
        // An L2 table that is also a data cluster.
        damaged(&w, base, &format!("{stem}-overlap.qcow2"), |i| {
            let (a, e) = i.first_data();
            let l2 = i.u64_at(i.l1_off) & OFFSET_MASK;
            i.put_u64(a, (e & !OFFSET_MASK) | l2);
        });
    }

    // Snapshots: clusters shared between the active image and a snapshot.
    w.create("s.qcow2", "", "32M");
    w.io("s.qcow2", &["write -P 1 0 1M"]);
    w.img(&["snapshot", "-c", "s1", "s.qcow2"]);
    w.io("s.qcow2", &["write -P 2 0 64k"]);
    let shared = |i: &Img| {
        // Guest cluster 1 is still shared with the snapshot (refcount 2, COPIED clear).
        let a = i.l2_entry_addr(i.cs).expect("L2 table");
        let e = i.u64_at(a);
        assert_eq!(e >> 63, 0, "shared cluster has COPIED set");
        (a, e)
    };
    let v = damaged(&w, "s.qcow2", "s-copied.qcow2", |i| {
        let (a, e) = shared(i);
        i.put_u64(a, e | 1 << 63);
    });
    assert_eq!(field(&v, "corruptions"), 1);
    let v = damaged(&w, "s.qcow2", "s-rc1.qcow2", |i| {
        let (_, e) = shared(i);
        assert_eq!(i.refcount((e & OFFSET_MASK) >> i.cb), 2);
        i.set_refcount((e & OFFSET_MASK) >> i.cb, 1);
    });
    assert_eq!(field(&v, "corruptions"), 2);
    let v = damaged(&w, "s.qcow2", "s-rc3.qcow2", |i| {
        let (_, e) = shared(i);
        i.set_refcount((e & OFFSET_MASK) >> i.cb, 3);
    });
    assert_eq!(field(&v, "leaks"), 1);
    // A snapshot whose L1 table lies past the end of the file: its clusters leak.
    damaged(&w, "s.qcow2", "s-l1eof.qcow2", |i| {
        let t = i.snapshot_table();
        i.put_u64(t, 300 << 20);
    });

    // Compressed clusters: COPIED set on a compressed entry; a leaked compressed span.
    w.create("c.qcow2", "cluster_size=4k", "8M");
    w.io("c.qcow2", &["write -c -P 1 0 64k", "write -P 2 1M 8k"]);
    let v = damaged(&w, "c.qcow2", "c-copied.qcow2", |i| {
        let (a, e) = i.first_compressed();
        i.put_u64(a, e | 1 << 63);
    });
    assert_eq!(field(&v, "corruptions"), 1);
    damaged(&w, "c.qcow2", "c-gone.qcow2", |i| {
        let (a, _) = i.first_compressed();
        i.put_u64(a, 0);
    });
}

#[test]
fn hostile_tables_and_headers() {
    let w = Work::new();
    w.create("h.qcow2", "", "64M");
    w.io("h.qcow2", &["write -P 1 0 1M", "write -P 2 10M 64k"]);
    w.create("hs.qcow2", "", "64M");
    w.io("hs.qcow2", &["write -P 1 0 1M"]);
    w.img(&["snapshot", "-c", "s1", "hs.qcow2"]);
    w.img(&["snapshot", "-c", "s2", "hs.qcow2"]);

    // Refcount table: an unaligned block (internal errors, exit 1), a block outside the
    // image, reserved bits.
    let v = damaged(&w, "h.qcow2", "rt-unaligned.qcow2", |i| {
        let e = i.u64_at(i.rt_off);
        i.put_u64(i.rt_off, e + 512);
    });
    assert!(field(&v, "check-errors") > 0);
    damaged(&w, "h.qcow2", "rt-outside.qcow2", |i| {
        i.put_u64(i.rt_off + 8, 100 << 20)
    });
    damaged(&w, "h.qcow2", "rt-reserved.qcow2", |i| {
        i.put_u64(i.rt_off + 8, 1)
    });
    damaged(&w, "h.qcow2", "rt-l2.qcow2", |i| {
        // A refcount block that is also the L2 table.
        let l2 = i.u64_at(i.l1_off) & OFFSET_MASK;
        i.put_u64(i.rt_off + 8, l2);
    });
    // Tables past the end of the file (QEMU opens those and reads zeros).
    damaged(&w, "h.qcow2", "l1-eof.qcow2", |i| i.put_u64(40, 300 << 20));
    damaged(&w, "h.qcow2", "rt-eof.qcow2", |i| i.put_u64(48, 300 << 20));
    damaged(&w, "h.qcow2", "rt-none.qcow2", |i| i.put_u32(56, 0));
    // Headers QEMU cannot open (exit 1, "Could not open").
    // (A qcow2 file without its magic probes as raw: no check, 63.)
    for (name, off, v, want) in [
        ("l1-unaligned.qcow2", 40, (64 << 10) + 512, 1),
        ("incompat.qcow2", 72, 1 << 20, 1),
        ("magic.qcow2", 0, 0x1234_5678_0000_0003, 63),
    ] {
        let code = hostile(&w, "h.qcow2", name, |i| i.put_u64(off, v));
        assert_eq!(code, Some(want), "{name}");
    }
    same(&w, &["-f", "qcow2", "magic.qcow2"]);
    // Marked corrupt: still checked.
    damaged(&w, "h.qcow2", "corrupt-bit.qcow2", |i| i.put_u64(72, 2));

    // Snapshot table: offset invalid with no snapshots, too many snapshots, too much extra
    // data (all: "Check failed", exit 1); a table past the end of the file; an unaligned and
    // an oversized snapshot L1 table.
    let code = hostile(&w, "h.qcow2", "sn-offset.qcow2", |i| i.put_u64(64, 12345));
    assert_eq!(code, Some(1));
    let code = hostile(&w, "h.qcow2", "sn-count.qcow2", |i| i.put_u32(60, 70_000));
    assert_eq!(code, Some(1));
    let code = hostile(&w, "hs.qcow2", "sn-extra.qcow2", |i| {
        let t = i.snapshot_table();
        i.put_u32(t + 36, 5000);
    });
    assert_eq!(code, Some(1));
    damaged(&w, "hs.qcow2", "sn-eof.qcow2", |i| i.put_u64(64, 500 << 20));
    damaged(&w, "hs.qcow2", "sn-l1unaligned.qcow2", |i| {
        let t = i.snapshot_table();
        let e = i.u64_at(t);
        i.put_u64(t, e + 8);
    });
    damaged(&w, "hs.qcow2", "sn-l1big.qcow2", |i| {
        let t = i.snapshot_table();
        i.put_u32(t + 8, 5_000_000);
    });
    damaged(&w, "hs.qcow2", "sn-shared-l1.qcow2", |i| {
        // Both snapshots name the same L1 table: its clusters are counted twice.
        let t = i.snapshot_table();
        let first = i.u64_at(t);
        let len = 40
            + u64::from(i.u32_at(t + 36))
            + u64::from(i.u32_at(t + 12) >> 16)
            + u64::from(i.u32_at(t + 12) & 0xffff);
        i.put_u64((t + len).next_multiple_of(8), first);
    });
}

#[test]
fn formats_arguments_and_missing_files() {
    let w = Work::new();
    w.create("a.qcow2", "", "16M");
    w.io("a.qcow2", &["write -P 1 0 64k"]);
    w.write_file("r.raw", &random_bytes(1 << 20, 3));
    // Raw images have no check (63), whether named or probed.
    same(&w, &["-f", "raw", "a.qcow2"]);
    same(&w, &["--output=json", "-f", "raw", "a.qcow2"]);
    same(&w, &["r.raw"]);
    same(&w, &["-q", "r.raw"]);
    // A qcow2 image carrying a VDI signature: qemu-img probes it as VDI (and fails); qcow2kit
    // refuses to probe a polyglot. Named as qcow2, both check it.
    w.copy("a.qcow2", "poly.qcow2");
    w.open("poly.qcow2")
        .put_u32(64, 0xbeda_107f_u32.swap_bytes());
    assert_eq!(same(&w, &["poly.qcow2"]).code, Some(1));
    same(&w, &["-f", "qcow2", "--output=json", "poly.qcow2"]);
    // Open failures.
    same(&w, &["missing.qcow2"]);
    same(&w, &["-f", "qcow2", "r.raw"]);
    // Bad arguments (qemu-img exits 1).
    same(&w, &["--output=xml", "a.qcow2"]);
    same(&w, &["-r", "bogus", "a.qcow2"]);
    same(&w, &[]);
    same(&w, &["-r", "leaks", "-U", "a.qcow2"]);

    // Backing and data files are opened first, as qemu-img does.
    w.create("base.qcow2", "", "16M");
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ]);
    judge(&w, "ov.qcow2");
    fs::rename(w.path("base.qcow2"), w.path("moved.qcow2")).expect("rename");
    same(&w, &["ov.qcow2"]);
    w.create("df.qcow2", "data_file=df.raw", "16M");
    judge(&w, "df.qcow2");
    fs::remove_file(w.path("df.raw")).expect("remove");
    same(&w, &["df.qcow2"]);
}

#[test]
fn encrypted_images_need_a_key() {
    let w = Work::new();
    for fmt in ["luks", "aes"] {
        let name = format!("{fmt}.qcow2");
        let mut opts = format!("encrypt.format={fmt},encrypt.key-secret=s0");
        if fmt == "luks" {
            opts.push_str(",encrypt.iter-time=10");
        }
        w.img(&[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "qcow2",
            "-o",
            &opts,
            &name,
            "16M",
        ]);
        // Without a key both fail to open; with one both check (LUKS header area included).
        same(&w, &[&name]);
        let spec = format!("driver=qcow2,file.filename={name},encrypt.key-secret=s0");
        let v = {
            let q = same(
                &w,
                &[
                    "--object",
                    "secret,id=s0,data=pw",
                    "--image-opts",
                    &spec,
                    "--output=json",
                ],
            );
            serde_json::from_str::<Value>(&q.stdout).expect("JSON")
        };
        assert_eq!(field(&v, "corruptions") + field(&v, "leaks"), 0, "{name}");
        same(&w, &["--image-opts", &spec]);
    }
}

/// Repairs one copy of `name` with qemu-img and another with qcow2kit (`check -r MODE`, human
/// and JSON output, each on a fresh copy with the same file name) and requires the same
/// standard output, exit code and standard error. Afterwards the qcow2kit copy must hold the
/// same guest data as the image before the repair (`qemu-img compare` against a raw copy made
/// first) and `qemu-img check` must agree with the report: clean if the repair report said so.
/// Returns qemu-img's human run.
fn repair_same(w: &Work, name: &str, mode: &str) -> Run {
    let raw = format!("{name}.pre.raw");
    let convert = exec(
        "qemu-img",
        &["convert", "-U", "-f", "qcow2", "-O", "raw", name, &raw],
        w.dir.path(),
    );
    let mut human = None;
    for json in [false, true] {
        let mut args = vec!["check", "-r", mode];
        if json {
            args.push("--output=json");
        }
        args.push(name);
        let mut runs = Vec::new();
        for (prog, sub) in [("qemu-img", "q"), (QCOW2KIT, "k")] {
            let dir = w.path(sub);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::copy(w.path(name), dir.join(name)).expect("copy");
            runs.push(run(prog, &args, &dir));
        }
        let (q, k) = (&runs[0], &runs[1]);
        let what = args.join(" ");
        assert_eq!(
            k.code, q.code,
            "{what}: exit code\n--- qemu-img ---\n{}{}\n--- qcow2kit ---\n{}{}",
            q.stdout, q.stderr, k.stdout, k.stderr
        );
        assert_eq!(
            k.stdout, q.stdout,
            "{what}: standard output\n--- qemu-img stderr ---\n{}\n--- qcow2kit stderr ---\n{}",
            q.stderr, k.stderr
        );
        assert_eq!(
            stderr_lines(&k.stderr),
            stderr_lines(&q.stderr),
            "{what}: standard error"
        );
        // The repaired image: guest data unchanged, and as clean as the report says.
        let kdir = w.path("k");
        if convert.status.success() {
            let cmp = exec(
                "qemu-img",
                &[
                    "compare",
                    "-U",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    name,
                    &format!("../{raw}"),
                ],
                &kdir,
            );
            assert!(
                cmp.status.success(),
                "{what}: guest data changed by the repair: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
        let after = run("qemu-img", &["check", name], &kdir);
        if q.code == Some(0) {
            assert_eq!(
                after.code,
                Some(0),
                "{what}: not clean afterwards: {after:?}"
            );
        }
        if !json {
            human = Some(runs.swap_remove(0));
        }
    }
    human.expect("human run")
}

/// For damage qemu-img fails to repair with `-r all` (exit 1) and qcow2kit repairs: the
/// qcow2kit copy must then check clean with qemu-img and hold the same guest data.
fn repair_better(w: &Work, name: &str) {
    let raw = format!("{name}.pre.raw");
    w.img(&["convert", "-U", "-f", "qcow2", "-O", "raw", name, &raw]);
    let dir = w.path("k");
    fs::create_dir_all(&dir).expect("mkdir");
    for prog in ["qemu-img", QCOW2KIT] {
        fs::copy(w.path(name), dir.join(name)).expect("copy");
        let r = run(prog, &["check", "-r", "all", name], &dir);
        let want = if prog == "qemu-img" { 1 } else { 0 };
        assert_eq!(r.code, Some(want), "{prog} check -r all {name}: {r:?}");
    }
    let after = run("qemu-img", &["check", name], &dir);
    assert_eq!(
        after.code,
        Some(0),
        "{name} not clean after the repair: {after:?}"
    );
    let cmp = exec(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            name,
            &format!("../{raw}"),
        ],
        &dir,
    );
    assert!(
        cmp.status.success(),
        "{name}: guest data changed by the repair"
    );
}

/// Damages a copy of `base` named `name` with `f`, then repairs it with both tools in both
/// modes; returns qemu-img's human `-r all` run.
fn damaged_repair(w: &Work, base: &str, name: &str, f: impl FnOnce(&Img)) -> Run {
    w.copy(base, name);
    f(&w.open(name));
    repair_same(w, name, "leaks");
    repair_same(w, name, "all")
}

#[test]
fn repair_matrix_of_damage() {
    let w = Work::new();
    let mut bases = Vec::new();
    for (cs, rb) in [("64k", "16"), ("512", "64"), ("4k", "1"), ("64k", "64")] {
        let name = format!("r-{cs}-{rb}.qcow2");
        w.create(
            &name,
            &format!("cluster_size={cs},refcount_bits={rb}"),
            "32M",
        );
        w.io(
            &name,
            &["write -P 1 0 300k", "write -P 2 5M 70k", "write -z 8M 64k"],
        );
        bases.push(name);
    }
    w.create("r-xl.qcow2", "extended_l2=on", "32M");
    w.io("r-xl.qcow2", &["write -P 1 0 300k", "write -P 2 5M 4k"]);
    bases.push("r-xl.qcow2".into());

    for base in &bases {
        let stem = base.trim_end_matches(".qcow2");
        // Leaks only: a counted cluster appended to the file; a bumped header refcount.
        let probe = w.open(base);
        let n = probe.len().div_ceil(probe.cs);
        if probe.refcount_block(n) != 0 {
            let q = damaged_repair(&w, base, &format!("{stem}-leak.qcow2"), |i| {
                i.f.write_all_at(&vec![0u8; i.cs as usize], n * i.cs)
                    .expect("extend");
                i.set_refcount(n, 1);
            });
            assert!(q.stdout.contains("1 leaked clusters"), "{base}: {q:?}");
        }
        if !base.contains("-1.") {
            damaged_repair(&w, base, &format!("{stem}-bump.qcow2"), |i| {
                i.set_refcount(0, 2)
            });
        }
        // Refcount too low: 0 (needs a rebuild) and, with room, 1 for a cluster mapped twice.
        let q = damaged_repair(&w, base, &format!("{stem}-rc0.qcow2"), |i| {
            let (_, e) = i.first_data();
            i.set_refcount((e & OFFSET_MASK) >> i.cb, 0);
        });
        assert!(
            q.stderr.contains("Rebuilding refcount structure"),
            "{base}: {q:?}"
        );
        if !base.contains("-1.") {
            damaged_repair(&w, base, &format!("{stem}-dup.qcow2"), |i| {
                let (a, e) = i.first_data();
                i.put_u64(a + i.entry_size, e);
            });
        }
        // COPIED flags wrong in an L2 and in the L1 entry.
        damaged_repair(&w, base, &format!("{stem}-copied.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a, e & !(1 << 63));
        });
        damaged_repair(&w, base, &format!("{stem}-l1copied.qcow2"), |i| {
            let e = i.u64_at(i.l1_off);
            i.put_u64(i.l1_off, e & !(1 << 63));
        });
        // Refcount structure broken: a block that is also the L2 table; an unaligned block.
        damaged_repair(&w, base, &format!("{stem}-rt-l2.qcow2"), |i| {
            // The old first block is no longer referenced.
            let l2 = i.u64_at(i.l1_off) & OFFSET_MASK;
            i.put_u64(i.rt_off, l2);
        });
        // An unaligned block: qemu-img marks the image corrupt on the first lookup, after
        // which it cannot write the rebuilt structure ("ERROR writing refblock", exit 1) and
        // the image stays corrupt. qcow2kit rebuilds it (a legitimate improvement): judged by
        // qemu-img check and compare instead.
        let name = format!("{stem}-rt-unaligned.qcow2");
        w.copy(base, &name);
        let img = w.open(&name);
        let e = img.u64_at(img.rt_off);
        img.put_u64(img.rt_off, e + 512);
        repair_same(&w, &name, "leaks");
        if img.cs > 512 {
            repair_better(&w, &name);
        } else {
            // With 512-byte clusters the block is aligned, one cluster off: both rebuild.
            repair_same(&w, &name, "all");
        }
        // A misaligned preallocated zero cluster is not touched by -r leaks; -r all zeroes it.
        damaged_repair(&w, base, &format!("{stem}-misaligned.qcow2"), |i| {
            let (a, e) = i.first_data();
            i.put_u64(a + i.entry_size, ((e & OFFSET_MASK) + 512) | 1);
        });
    }
}

#[test]
fn repair_snapshots_compressed_and_flags() {
    let w = Work::new();
    w.create("s.qcow2", "", "32M");
    w.io("s.qcow2", &["write -P 1 0 1M"]);
    w.img(&["snapshot", "-c", "s1", "s.qcow2"]);
    w.io("s.qcow2", &["write -P 2 0 64k"]);
    let shared = |i: &Img| {
        let a = i.l2_entry_addr(i.cs).expect("L2 table");
        (a, i.u64_at(a))
    };
    damaged_repair(&w, "s.qcow2", "s-copied.qcow2", |i| {
        let (a, e) = shared(i);
        i.put_u64(a, e | 1 << 63);
    });
    damaged_repair(&w, "s.qcow2", "s-rc1.qcow2", |i| {
        let (_, e) = shared(i);
        i.set_refcount((e & OFFSET_MASK) >> i.cb, 1);
    });
    damaged_repair(&w, "s.qcow2", "s-rc3.qcow2", |i| {
        let (_, e) = shared(i);
        i.set_refcount((e & OFFSET_MASK) >> i.cb, 3);
    });
    damaged_repair(&w, "s.qcow2", "s-rc0.qcow2", |i| {
        let (_, e) = shared(i);
        i.set_refcount((e & OFFSET_MASK) >> i.cb, 0);
    });

    // Compressed clusters: a leaked compressed span; a lost refcount under one.
    w.create("c.qcow2", "cluster_size=4k", "8M");
    w.io("c.qcow2", &["write -c -P 1 0 64k", "write -P 2 1M 8k"]);
    damaged_repair(&w, "c.qcow2", "c-gone.qcow2", |i| {
        let (a, _) = i.first_compressed();
        i.put_u64(a, 0);
    });
    damaged_repair(&w, "c.qcow2", "c-rc0.qcow2", |i| {
        let (_, e) = i.first_compressed();
        let x = 62 - (i.cb - 8);
        i.set_refcount((e & ((1u64 << x) - 1)) >> i.cb, 0);
    });

    // Marked corrupt, with a leak: the repair clears the bit.
    w.create("cb.qcow2", "", "16M");
    w.io("cb.qcow2", &["write -P 1 0 256k"]);
    damaged_repair(&w, "cb.qcow2", "cb-leak.qcow2", |i| {
        i.put_u64(72, 2);
        i.set_refcount(0, 2);
    });
    damaged_repair(&w, "cb.qcow2", "cb-only.qcow2", |i| i.put_u64(72, 2));
    // A refcount block past the end of the file: qemu-img grows the file to hold it.
    damaged_repair(&w, "cb.qcow2", "rt-outside.qcow2", |i| {
        i.put_u64(i.rt_off + 8, 100 << 20)
    });

    // A dirty lazy-refcounts image after a crash: -r leaks needs a rebuild (fails), -r all
    // rebuilds and clears the dirty bit.
    w.create("dirty.qcow2", "lazy_refcounts=on,cluster_size=4k", "32M");
    let out = exec(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 1M",
            "-c",
            "write -P 8 9M 4k",
            "-c",
            "abort",
            "dirty.qcow2",
        ],
        w.dir.path(),
    );
    assert!(
        !out.status.success(),
        "qemu-io abort should not exit cleanly"
    );
    repair_same(&w, "dirty.qcow2", "leaks");
    let q = repair_same(&w, "dirty.qcow2", "all");
    assert_eq!(q.code, Some(0), "{q:?}");
    let mut b = [0u8; 8];
    Img::open(&w.path("k/dirty.qcow2"))
        .f
        .read_exact_at(&mut b, 72)
        .expect("read");
    assert_eq!(u64::from_be_bytes(b) & 1, 0, "dirty bit left set");
}

#[test]
fn repair_of_a_clean_image_changes_nothing() {
    let w = Work::new();
    for (name, opts) in [
        ("clean.qcow2", "cluster_size=64k"),
        ("clean512.qcow2", "cluster_size=512,refcount_bits=1"),
        ("cleanv2.qcow2", "compat=0.10"),
    ] {
        w.create(name, opts, "16M");
        w.io(name, &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
        let before = fs::read(w.path(name)).expect("read");
        for mode in ["leaks", "all"] {
            same(&w, &["-r", mode, name]);
            same(&w, &["-r", mode, "--output=json", name]);
            // qemu-img opened it too; compare qcow2kit's own run on a pristine copy.
            fs::write(w.path(name), &before).expect("restore");
            let k = run(QCOW2KIT, &["check", "-r", mode, name], w.dir.path());
            assert_eq!(k.code, Some(0), "{k:?}");
            assert_eq!(
                fs::read(w.path(name)).expect("read"),
                before,
                "{name} -r {mode}"
            );
        }
    }
    // Read-only file: both refuse to open it for a repair.
    w.copy("clean.qcow2", "ro.qcow2");
    let mut perm = fs::metadata(w.path("ro.qcow2"))
        .expect("stat")
        .permissions();
    perm.set_readonly(true);
    fs::set_permissions(w.path("ro.qcow2"), perm).expect("chmod");
    if fs::OpenOptions::new()
        .write(true)
        .open(w.path("ro.qcow2"))
        .is_err()
    {
        same(&w, &["-r", "leaks", "ro.qcow2"]);
    }
}

/// Snapshot tables a repair must fix as qemu-img 10 does (the cases of QEMU's iotest 261):
/// v3 entries without their 16 bytes of extra data, extra data past 1 KiB, more than 65 536
/// snapshots, and a table past 64 MiB. `-r all` drops or completes entries and writes the table
/// anew; `-r leaks` reports them.
#[test]
fn repair_snapshot_tables() {
    let w = Work::new();
    // A v2 image with three snapshots whose entries have 0, 42 (with unknown data) and 8 bytes
    // of extra data: valid for v2, incomplete for v3.
    w.create("v2.qcow2", "compat=0.10", "64M");
    w.io("v2.qcow2", &["write -P 3 0 256k"]);
    for sn in ["sn0", "sn1", "sn2"] {
        w.img(&["snapshot", "-c", sn, "v2.qcow2"]);
    }
    {
        let i = w.open("v2.qcow2");
        let mut off = i.snapshot_table();
        let mut table = Vec::new();
        for extra_len in [0usize, 42, 8] {
            let mut fixed = i.bytes_at(off, 40);
            let old_extra = u32::from_be_bytes([fixed[36], fixed[37], fixed[38], fixed[39]]);
            let strings = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]))
                + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let mut extra = i.bytes_at(off + 40, old_extra as usize);
            extra.resize(extra_len, 0);
            if extra_len == 42 {
                extra[16..35].copy_from_slice(b"very important data");
            }
            fixed[36..40].copy_from_slice(&(extra_len as u32).to_be_bytes());
            let names = i.bytes_at(off + 40 + u64::from(old_extra), strings);
            off += i.snapshot_entry_len(off);
            table.extend(fixed);
            table.extend(extra);
            table.extend(names);
            table.resize(table.len().next_multiple_of(8), 0);
        }
        i.put_bytes(i.snapshot_table(), &table);
    }
    repair_same(&w, "v2.qcow2", "all");
    // The same entries in an image forced to v3.
    w.copy("v2.qcow2", "botched.qcow2");
    {
        let i = w.open("botched.qcow2");
        i.put_u32(4, 3);
        i.put_u32(100, 104);
        i.put_u32(96, 4);
    }
    repair_same(&w, "botched.qcow2", "leaks");
    repair_same(&w, "botched.qcow2", "all");

    // 64 KiB of extra data in the last entry: cut to 1 KiB (and the table, which now spills
    // into an uncounted cluster, needs a refcount rebuild too).
    w.create("extra.qcow2", "", "64M");
    w.io("extra.qcow2", &["write -P 5 64k 128k"]);
    for sn in ["sn0", "sn1", "sn2", "sn3"] {
        w.img(&["snapshot", "-c", sn, "extra.qcow2"]);
    }
    {
        let i = w.open("extra.qcow2");
        let mut off = i.snapshot_table();
        for _ in 0..3 {
            off += i.snapshot_entry_len(off);
        }
        i.put_u32(off + 36, 65536);
    }
    repair_same(&w, "extra.qcow2", "leaks");
    repair_same(&w, "extra.qcow2", "all");

    // The 40-byte fixed part of a 131 KiB entry: 1 KiB of extra data, a 65 535-byte id and name.
    let big_entry = |l1: u64, l1_size: u32| {
        let mut e = vec![0u8; 40];
        e[..8].copy_from_slice(&l1.to_be_bytes());
        e[8..12].copy_from_slice(&l1_size.to_be_bytes());
        e[12..16].copy_from_slice(&[0xff; 4]);
        e[36..40].copy_from_slice(&1024u32.to_be_bytes());
        e
    };
    const BIG_ENTRY: u64 = 40 + 1024 + 65535 + 65535 + 2;
    // Marks clusters [from, to) of a 64 KiB-cluster image allocated in its first refcount block.
    let allocate = |i: &Img, from: u64, to: u64| {
        for c in from >> 16..to.div_ceil(1 << 16) {
            i.set_refcount(c, 1);
        }
    };

    // More than 65 536 snapshots (v2, whose all-zero entries are valid): the surplus is dropped;
    // one dropped snapshot has an L1 and an L2 table, which become leaks.
    w.create("many.qcow2", "compat=0.10", "64M");
    {
        let i = w.open("many.qcow2");
        let table = 1u64 << 20;
        i.put_u64(64, table);
        i.put_u32(60, 131072);
        i.set_len(table + 40 * 131072);
        i.put_bytes(table + 40 * 65536, &big_entry(0xe0000, 1)[..12]);
        i.put_u64(table - 2 * 65536, 0x8000_0000_000f_0000);
        allocate(&i, table - 2 * 65536, table + 40 * 131072);
    }
    repair_same(&w, "many.qcow2", "leaks");
    let q = repair_same(&w, "many.qcow2", "all");
    assert!(
        q.stderr.contains("Discarding 65536 overhanging snapshots"),
        "{q:?}"
    );

    // A table past 64 MiB: the entries from the first that crosses the limit are dropped.
    w.create("big.qcow2", "", "64M");
    {
        let i = w.open("big.qcow2");
        let table = 1u64 << 20;
        i.put_u64(64, table);
        let mut off = table;
        let mut count = 0u32;
        while off - table <= 64 << 20 {
            i.put_bytes(off, &big_entry(0, 0));
            off += BIG_ENTRY;
            count += 1;
        }
        i.set_len(off);
        // The last one (dropped) has an L1 and an L2 table.
        i.put_bytes(off - BIG_ENTRY, &big_entry(0xe0000, 1)[..12]);
        i.put_u64(table - 2 * 65536, 0x8000_0000_000f_0000);
        allocate(&i, table - 2 * 65536, off);
        i.put_u32(60, count);
    }
    repair_same(&w, "big.qcow2", "leaks");
    let q = repair_same(&w, "big.qcow2", "all");
    assert!(
        q.stderr
            .contains("Discarding 1 overhanging snapshots (snapshot table is too big)"),
        "{q:?}"
    );
    // An entry with 2000 bytes of extra data running past the end of the file, next to an
    // incomplete one: the old table is partly past the end, so its clusters are free by their
    // refcounts. qemu-img allocates the new table over the old one, which its overlap check
    // refuses (exit 1, image marked corrupt); qcow2kit places it elsewhere and ends clean.
    w.create("tail.qcow2", "cluster_size=512", "64k");
    w.io("tail.qcow2", &["write -P 1 0 4k"]);
    w.img(&["snapshot", "-c", "a", "tail.qcow2"]);
    w.io("tail.qcow2", &["write -P 2 1k 1k"]);
    w.img(&["snapshot", "-c", "b", "tail.qcow2"]);
    {
        let i = w.open("tail.qcow2");
        let t = i.snapshot_table();
        let first = i.snapshot_entry_len(t);
        let mut e0 = i.bytes_at(t, 40);
        let extra0 = u64::from(i.u32_at(t + 36));
        let names = usize::from(u16::from_be_bytes([e0[12], e0[13]]))
            + usize::from(u16::from_be_bytes([e0[14], e0[15]]));
        e0[36..40].copy_from_slice(&0u32.to_be_bytes());
        e0.extend(i.bytes_at(t + 40 + extra0, names));
        e0.resize(e0.len().next_multiple_of(8), 0);
        let mut e1 = i.bytes_at(t + first, 40);
        e1[36..40].copy_from_slice(&2000u32.to_be_bytes());
        e1.extend(i.bytes_at(t + first + 40, 64));
        i.put_bytes(t, &[e0, e1].concat());
    }
    let dir = w.path("k");
    for (prog, want) in [("qemu-img", 1), (QCOW2KIT, 0)] {
        w.copy("tail.qcow2", "k/tail.qcow2");
        let r = run(prog, &["check", "-r", "all", "tail.qcow2"], &dir);
        assert_eq!(r.code, Some(want), "{prog} check -r all tail.qcow2: {r:?}");
    }
    let after = run("qemu-img", &["check", "tail.qcow2"], &dir);
    assert_eq!(after.code, Some(0), "not clean after the repair: {after:?}");
    let l = run("qemu-img", &["snapshot", "-l", "tail.qcow2"], &dir);
    assert_eq!(l.stdout.lines().count(), 4, "{}", l.stdout);
    let read = run(
        "qemu-io",
        &[
            "-c",
            "read -P 1 0 1k",
            "-c",
            "read -P 2 1k 1k",
            "-c",
            "read -P 1 2k 2k",
            "-c",
            "read -P 0 4k 60k",
            "tail.qcow2",
        ],
        &dir,
    );
    assert!(
        read.code == Some(0) && !read.stdout.contains("Pattern verification failed"),
        "{read:?}"
    );

    let k = w.open("k/big.qcow2");
    let left = k.u32_at(60);
    let l = run("qemu-img", &["snapshot", "-l", "big.qcow2"], &w.path("k"));
    assert_eq!(l.stdout.lines().count(), left as usize + 2, "{}", l.stdout);
}
