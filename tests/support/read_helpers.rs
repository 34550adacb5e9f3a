//! Helpers for `tests/read_matrix.rs`: running qemu-img / qemu-io in a scratch directory,
//! reading whole devices through qcow2kit, and comparing them with qemu-img's raw output.
//!
//! Every helper panics with a message naming the command, image and offset involved: a missing
//! or failing qemu tool is a test failure, never a silent skip.

use qcow2kit::chain::{open, OpenOptions, Opened};
use qcow2kit::device::chain_status;
use qcow2kit::Format;
use qcow2kit::{BlockDevice, ExtentKind};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use tempfile::TempDir;

/// Runs `prog args…` in `cwd`; panics (with its output) if it cannot start or fails.
pub(crate) fn run_tool(prog: &str, args: &[&str], cwd: &Path) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}); these tests need qemu-img and qemu-io \
             (Debian package qemu-utils, 10.x) in PATH"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // qemu-io exits non-zero when a command fails, but also say so if only the text does.
    let failed_text = prog == "qemu-io"
        && (stdout.contains(" failed")
            || stderr.contains(" failed")
            || stderr.contains("qemu-io:"));
    if !out.status.success() || failed_text {
        panic!(
            "`{prog} {}` (cwd {}) failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args.join(" "),
            cwd.display(),
            out.status
        );
    }
    stdout
}

/// Deterministic pseudo-random numbers.
pub(crate) use qcow2kit::io::testing::SplitMix as Rng;

/// Compressible text-like bytes (for clusters that really get compressed).
pub(crate) fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "backing ",
        "snapshot ",
        "L2 ",
        "table ",
        "zero ",
        "data ",
        "compressed ",
        "guest ",
        "host\n",
    ];
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[r.below(WORDS.len() as u64) as usize].as_bytes());
    }
    v.truncate(len);
    v
}

/// `len` bytes mixing, per 4 KiB block: random, text, zeros, offset labels and a constant.
/// Labels (each 8-byte word holds its own offset) make any misplaced byte visible.
pub(crate) fn mixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len);
    let mut block = 0u64;
    while v.len() < len {
        let start = v.len();
        let n = (len - start).min(4096);
        match r.below(5) {
            0 => v.extend_from_slice(&r.bytes(n)),
            1 => v.extend_from_slice(&text_bytes(n, seed ^ block)),
            2 => v.resize(start + n, 0),
            3 => {
                for i in 0..n {
                    let word = ((start + i) as u64 / 8 * 8) ^ seed;
                    v.push(word.to_be_bytes()[i % 8]);
                }
            }
            _ => v.resize(start + n, (block as u8) | 1),
        }
        block += 1;
    }
    v
}

/// A scratch directory in which images are made with qemu-img / qemu-io.
pub(crate) struct Work {
    pub(crate) dir: TempDir,
    judged: AtomicUsize,
}

impl Work {
    /// A new scratch directory with the pattern files `rand.pat` (4093 random bytes, prime so
    /// data never repeats at cluster granularity) and `text.pat` (1021 compressible bytes).
    pub(crate) fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("qcow2kit-read-matrix-")
            .tempdir()
            .expect("creating a temporary directory");
        let w = Work {
            dir,
            judged: AtomicUsize::new(0),
        };
        w.write_file("rand.pat", &Rng(0x5eed).bytes(4093));
        w.write_file("text.pat", &text_bytes(1021, 7));
        w
    }

    /// Absolute path of `name` inside the scratch directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a directory (and parents) inside the scratch directory.
    pub(crate) fn mkdir(&self, name: &str) {
        fs::create_dir_all(self.path(name)).expect("creating a directory");
    }

    /// Writes a file inside the scratch directory.
    pub(crate) fn write_file(&self, name: &str, bytes: &[u8]) {
        fs::write(self.path(name), bytes)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.path(name).display()));
    }

    /// `qemu-img args…`, run in `subdir` of the scratch directory ("" for the top).
    pub(crate) fn img_in(&self, subdir: &str, args: &[&str]) -> String {
        run_tool("qemu-img", args, &self.path(subdir))
    }

    /// `qemu-img args…`, run in the scratch directory.
    pub(crate) fn img(&self, args: &[&str]) -> String {
        self.img_in("", args)
    }

    /// `qemu-io -f fmt -c cmd… image`, run in the scratch directory. Pattern files named by
    /// `-s` are relative to it.
    pub(crate) fn io<S: AsRef<str>>(&self, fmt: &str, image: &str, cmds: &[S]) {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c.as_ref());
        }
        args.push(image);
        run_tool("qemu-io", &args, self.dir.path());
    }

    /// `qemu-img convert -f fmt extra… -O raw image` into a fresh file; returns its path.
    /// Runs from `/` with absolute paths, so relative backing names must resolve against the
    /// image's own directory.
    pub(crate) fn qemu_raw(&self, image: &str, fmt: &str, extra: &[&str]) -> PathBuf {
        self.qemu_raw_in(Path::new("/"), image, fmt, extra)
    }

    /// `qemu_raw` run from `cwd`.
    pub(crate) fn qemu_raw_in(
        &self,
        cwd: &Path,
        image: &str,
        fmt: &str,
        extra: &[&str],
    ) -> PathBuf {
        let n = self.judged.fetch_add(1, Ordering::Relaxed);
        let out = self.path(&format!("judge-{n}.raw"));
        let src = self.path(image);
        let (src, out_s) = (
            src.to_str().expect("utf-8 path"),
            out.to_str().expect("utf-8 path"),
        );
        let mut args = vec!["convert", "-f", fmt];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-O", "raw", src, out_s]);
        run_tool("qemu-img", &args, cwd);
        out
    }

    /// `qemu-img map --output=json` of the image (with its chain).
    pub(crate) fn qemu_map(&self, image: &str, fmt: &str) -> Vec<MapEntry> {
        let src = self.path(image);
        let out = run_tool(
            "qemu-img",
            &[
                "map",
                "--output=json",
                "-f",
                fmt,
                src.to_str().expect("utf-8 path"),
            ],
            Path::new("/"),
        );
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("qemu-img map output is not JSON ({e}): {out}"));
        let arr = v
            .as_array()
            .expect("qemu-img map --output=json gives an array");
        arr.iter()
            .map(|e| {
                let u = |k: &str| {
                    e[k].as_u64()
                        .unwrap_or_else(|| panic!("map entry {e}: {k}"))
                };
                let b = |k: &str| {
                    e[k].as_bool()
                        .unwrap_or_else(|| panic!("map entry {e}: {k}"))
                };
                MapEntry {
                    start: u("start"),
                    length: u("length"),
                    depth: u("depth") as u32,
                    data: b("data"),
                    zero: b("zero"),
                    compressed: b("compressed"),
                }
            })
            .collect()
    }

    /// Opens `image` (relative to the scratch directory, given to qcow2kit as an absolute path
    /// while the process's cwd is elsewhere) and checks every byte against qemu-img's raw
    /// conversion with `judge_args` (e.g. `-l snapshot.name=s1`). Returns the opened image.
    pub(crate) fn check_reads(
        &self,
        image: &str,
        fmt: Format,
        opts: &OpenOptions,
        judge_args: &[&str],
    ) -> Opened {
        self.check_reads_in(Path::new("/"), image, fmt, opts, judge_args)
    }

    /// `check_reads` with qemu-img run from `cwd`.
    pub(crate) fn check_reads_in(
        &self,
        cwd: &Path,
        image: &str,
        fmt: Format,
        opts: &OpenOptions,
        judge_args: &[&str],
    ) -> Opened {
        let opened = open_image(&self.path(image), fmt, opts);
        let raw = self.qemu_raw_in(cwd, image, fmt.name(), judge_args);
        let what = format!("{image} {judge_args:?}");
        compare_device(opened.device.as_ref(), &raw, &what);
        fs::remove_file(&raw).ok();
        opened
    }

    /// `check_reads` with `OpenOptions::qemu_compatible()` and no judge arguments.
    pub(crate) fn check(&self, image: &str, fmt: Format) -> Opened {
        self.check_reads(image, fmt, &OpenOptions::qemu_compatible(), &[])
    }
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MapEntry {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) depth: u32,
    pub(crate) data: bool,
    pub(crate) zero: bool,
    pub(crate) compressed: bool,
}

/// Opens an image through qcow2kit, panicking with the error.
pub(crate) fn open_image(path: &Path, fmt: Format, opts: &OpenOptions) -> Opened {
    match open(path, fmt, opts) {
        Ok(o) => o,
        Err(e) => panic!(
            "qcow2kit cannot open {} as {}: {e}",
            path.display(),
            fmt.name()
        ),
    }
}

/// Panics with the first differing offset if `ours != theirs` (which start at guest `base`).
pub(crate) fn assert_same_bytes(ours: &[u8], theirs: &[u8], base: u64, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: buffer lengths");
    if ours == theirs {
        return;
    }
    let i = ours
        .iter()
        .zip(theirs)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let differing = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    let end = (i + 16).min(ours.len());
    panic!(
        "{what}: qcow2kit and qemu-img differ at guest offset {} (0x{:x}); {differing} of {} \
         bytes differ in this read of [{base}, {})\n  qcow2kit: {:02x?}\n  qemu-img: {:02x?}",
        base + i as u64,
        base + i as u64,
        ours.len(),
        base + ours.len() as u64,
        &ours[i..end],
        &theirs[i..end],
    );
}

/// Reads all of `dev` with `read_at` in chunks of varying, mostly unaligned sizes and compares
/// it with the raw file `raw` (same size required).
pub(crate) fn compare_device(dev: &dyn BlockDevice, raw: &Path, what: &str) {
    let f = fs::File::open(raw).unwrap_or_else(|e| panic!("opening {}: {e}", raw.display()));
    let raw_len = f.metadata().expect("stat").len();
    assert_eq!(
        dev.size(),
        raw_len,
        "{what}: qcow2kit's virtual size vs qemu-img's raw output"
    );
    const CHUNKS: [u64; 6] = [1 << 20, 12_305, (1 << 19) + 511, 4099, 3 << 16, 2 << 20];
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let (mut off, mut i) = (0u64, 0usize);
    while off < raw_len {
        let n = CHUNKS[i % CHUNKS.len()].min(raw_len - off) as usize;
        i += 1;
        ours.resize(n, 0xee);
        theirs.resize(n, 0);
        if let Err(e) = dev.read_at(&mut ours, off) {
            panic!("{what}: qcow2kit read_at({off}, {n}) failed: {e}");
        }
        f.read_exact_at(&mut theirs, off)
            .expect("reading qemu-img's raw output");
        assert_same_bytes(&ours, &theirs, off, what);
        off += n as u64;
    }
}

/// The layer `depth` levels below `dev`.
pub(crate) fn layer(dev: &dyn BlockDevice, depth: u32) -> &dyn BlockDevice {
    let mut l = dev;
    for _ in 0..depth {
        l = l
            .backing()
            .expect("chain_status reported a depth below the last layer")
            .as_ref();
    }
    l
}

/// Checks `chain_status` over the whole device against the device itself and `qemu-img map`:
/// - extents tile the device (start where the previous ended, non-empty, inside the device);
/// - a Data extent at depth d is Data in layer d's own `block_status`, and every layer above
///   d leaves the range unallocated;
/// - Zero and Unallocated extents read back as zeros;
/// - wherever they overlap, qemu-img says "data" exactly where we say Data, at the same depth
///   and with the same compressed flag.
///
/// Raw layers must be fully allocated files (qemu reports holes in raw files as zeros).
pub(crate) fn check_chain_status(dev: &dyn BlockDevice, qmap: &[MapEntry], what: &str) {
    let size = dev.size();
    let covered: u64 = qmap.iter().map(|m| m.length).sum();
    assert_eq!(
        covered, size,
        "{what}: qemu-img map does not cover the device"
    );
    let mut off = 0u64;
    let mut zeros = Vec::new();
    let mut extents = 0;
    while off < size {
        let e = chain_status(dev, off, size - off)
            .unwrap_or_else(|err| panic!("{what}: chain_status({off}) failed: {err}"));
        extents += 1;
        assert_eq!(
            e.offset, off,
            "{what}: extent starts at the wrong offset: {e:?}"
        );
        assert!(
            e.len > 0 && e.len <= size - off,
            "{what}: bad extent length: {e:?}"
        );
        match e.kind {
            ExtentKind::Data => {
                let l = layer(dev, e.depth);
                let mut p = off;
                while p < off + e.len {
                    let own = l
                        .block_status(p, off + e.len - p)
                        .expect("layer block_status");
                    assert_eq!(
                        own.kind,
                        ExtentKind::Data,
                        "{what}: layer {} at {p}: {e:?}",
                        e.depth
                    );
                    p += own.len;
                }
                for d in 0..e.depth {
                    let above = layer(dev, d);
                    let mut p = off;
                    while p < off + e.len {
                        let own = above
                            .block_status(p, off + e.len - p)
                            .expect("block_status");
                        assert_eq!(
                            own.kind,
                            ExtentKind::Unallocated,
                            "{what}: {e:?} is Data at depth {} but layer {d} allocates {p}",
                            e.depth
                        );
                        p += own.len;
                    }
                }
            }
            ExtentKind::Zero | ExtentKind::Unallocated => {
                let mut p = off;
                while p < off + e.len {
                    let n = (off + e.len - p).min(4 << 20) as usize;
                    zeros.resize(n, 0xee);
                    dev.read_at(&mut zeros, p).expect("read_at");
                    if let Some(i) = zeros.iter().position(|&b| b != 0) {
                        panic!("{what}: {e:?} reads non-zero at {}", p + i as u64);
                    }
                    p += n as u64;
                }
            }
        }
        for m in qmap
            .iter()
            .filter(|m| m.start < off + e.len && off < m.start + m.length)
        {
            let ours_data = e.kind == ExtentKind::Data;
            assert_eq!(
                ours_data, m.data,
                "{what}: qcow2kit says {e:?}, qemu-img map says {m:?} (data flag)"
            );
            if ours_data {
                assert_eq!(
                    e.depth, m.depth,
                    "{what}: depth: qcow2kit {e:?}, qemu-img {m:?}"
                );
                assert_eq!(
                    e.compressed, m.compressed,
                    "{what}: compressed flag: qcow2kit {e:?}, qemu-img {m:?}"
                );
            } else {
                assert!(
                    m.zero,
                    "{what}: qemu-img says {m:?} is neither data nor zero"
                );
            }
        }
        off += e.len;
    }
    assert!(extents > 0);
}

/// Parses the qcow2 image at `path` by hand (independently of qcow2kit) and returns the
/// compressed descriptor of the cluster at guest offset `guest`: (host offset, host end of the
/// last 512-byte sector it may occupy). Panics if that cluster is not compressed.
pub(crate) fn compressed_extent(path: &Path, guest: u64) -> (u64, u64) {
    let f = fs::File::open(path).expect("opening image");
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).expect("reading image");
        u64::from_be_bytes(b)
    };
    let mut b4 = [0u8; 4];
    f.read_exact_at(&mut b4, 20).expect("reading header");
    let cluster_bits = u32::from_be_bytes(b4);
    let l1_offset = be64(40);
    // Standard (8-byte) L2 entries only.
    let l2_bits = cluster_bits - 3;
    let cluster_index = guest >> cluster_bits;
    let l1_entry = be64(l1_offset + (cluster_index >> l2_bits) * 8);
    let l2_offset = l1_entry & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2_offset, 0, "no L2 table for guest offset {guest}");
    let entry = be64(l2_offset + (cluster_index & ((1 << l2_bits) - 1)) * 8);
    assert_ne!(
        entry & (1 << 62),
        0,
        "cluster at guest offset {guest} is not compressed"
    );
    let x = 62 - (cluster_bits - 8);
    let host = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (host, (host & !511) + sectors * 512)
}

/// Turns the backing-format header extension of a v3 qcow2 image into an unknown extension
/// (which every reader ignores), so the backing file's format must be probed.
pub(crate) fn hide_backing_format(path: &Path) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening image");
    let mut b4 = [0u8; 4];
    f.read_exact_at(&mut b4, 4).expect("reading header");
    assert_eq!(
        u32::from_be_bytes(b4),
        3,
        "hide_backing_format needs a v3 image"
    );
    f.read_exact_at(&mut b4, 100).expect("reading header");
    let mut p = u64::from(u32::from_be_bytes(b4));
    loop {
        let mut h = [0u8; 8];
        f.read_exact_at(&mut h, p).expect("reading extension");
        let kind = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let len = u64::from(u32::from_be_bytes([h[4], h[5], h[6], h[7]]));
        assert_ne!(kind, 0, "image has no backing-format extension");
        if kind == 0xe279_2aca {
            f.write_all_at(&0x7e57_0000u32.to_be_bytes(), p)
                .expect("writing extension");
            return;
        }
        p += 8 + len.next_multiple_of(8);
    }
}
