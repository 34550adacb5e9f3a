//! Helpers for the write-engine tests (`tests/write_model.rs`, `tests/write_snapshots.rs`):
//! running qemu-img / qemu-io, random operation streams, the `Vec<u8>` model they are checked
//! against, and applying a stream through qcow2kit or through qemu-io.
//!
//! Every helper panics with a message naming the command, image and offset involved: a missing
//! or failing qemu tool is a test failure, never a silent skip.

#![allow(dead_code)]

use qcow2kit::chain::{open, OpenOptions, Opened};
use qcow2kit::ops::create::{create_qcow2, Compat, CreateOptions, Preallocation};
use qcow2kit::BlockDevice;
use qcow2kit::Format;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tempfile::TempDir;

pub(crate) const QEMU_IMG: &str = "/usr/bin/qemu-img";
pub(crate) const QEMU_IO: &str = "/usr/bin/qemu-io";

pub(crate) const K: u64 = 1 << 10;
pub(crate) const M: u64 = 1 << 20;

/// Panics unless qemu-img and qemu-io are installed where the tests expect them.
pub(crate) fn require_qemu() {
    for p in [QEMU_IMG, QEMU_IO] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: these tests need qemu-img and qemu-io 10.x \
             (Debian package qemu-utils) at /usr/bin; they never skip"
        );
    }
}

/// A scratch directory, in tmpfs when there is one (flushes are `fdatasync`s). With
/// `QCOW2KIT_KEEP` set it is kept (its path is in every tool failure message).
pub(crate) fn scratch() -> TempDir {
    require_qemu();
    let shm = Path::new("/dev/shm");
    let mut d = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("qcow2kit-w")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("qcow2kit-w").tempdir()
    }
    .or_else(|_| tempfile::Builder::new().prefix("qcow2kit-w").tempdir())
    .expect("creating a scratch directory");
    if std::env::var_os("QCOW2KIT_KEEP").is_some() {
        d.disable_cleanup(true);
    }
    d
}

/// What a tool printed and how it exited.
#[derive(Debug)]
pub(crate) struct ToolOut {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl fmt::Display for ToolOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `prog args…` in `cwd`, whatever its exit status.
pub(crate) fn tool(prog: &str, args: &[&str], cwd: &Path) -> ToolOut {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{prog}` ({e}); these tests need qemu-utils 10.x at /usr/bin")
        });
    ToolOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn short_args(args: &[&str]) -> String {
    let s = args.join(" ");
    if s.len() > 600 {
        format!("{} … ({} args)", &s[..600], args.len())
    } else {
        s
    }
}

/// Runs `prog args…` and panics unless it succeeds (for qemu-io: and reports no failure).
pub(crate) fn tool_ok(prog: &str, args: &[&str], cwd: &Path) -> String {
    let o = tool(prog, args, cwd);
    let failed_text = prog.ends_with("qemu-io")
        && (o.stdout.contains(" failed") || o.stderr.contains(" failed") || !o.stderr.is_empty());
    if o.code != 0 || failed_text {
        panic!(
            "`{prog} {}` (cwd {}) failed: {o}",
            short_args(args),
            cwd.display()
        );
    }
    o.stdout
}

pub(crate) fn qemu_img(args: &[&str], cwd: &Path) -> String {
    tool_ok(QEMU_IMG, args, cwd)
}

pub(crate) fn qemu_io(args: &[&str], cwd: &Path) -> String {
    tool_ok(QEMU_IO, args, cwd)
}

/// `qemu-img check` must exit 0 and find no errors and no leaks.
pub(crate) fn assert_check_clean(dir: &Path, img: &str, context: &str) {
    let o = tool(QEMU_IMG, &["check", "-f", "qcow2", img], dir);
    if o.code != 0 || !o.stdout.contains("No errors were found") {
        panic!("qemu-img check {img} is not clean ({context}): {o}");
    }
}

/// `qemu-img check` must find no corruption: exit 0, or 3 (leaked clusters only).
pub(crate) fn assert_check_no_corruption(dir: &Path, img: &str, context: &str) -> ToolOut {
    let o = tool(QEMU_IMG, &["check", "-f", "qcow2", img], dir);
    if !(o.code == 0 || o.code == 3) || o.stdout.contains("ERROR") || o.stderr.contains("ERROR") {
        panic!("qemu-img check {img} finds corruption ({context}): {o}");
    }
    o
}

/// `qemu-img compare` must report the two images identical.
pub(crate) fn assert_compare_identical(
    dir: &Path,
    a: &str,
    fa: &str,
    b: &str,
    fb: &str,
    context: &str,
) {
    let o = tool(QEMU_IMG, &["compare", "-f", fa, "-F", fb, a, b], dir);
    if o.code != 0 || !o.stdout.contains("Images are identical") {
        panic!("qemu-img compare {a} {b} does not report identical ({context}): {o}");
    }
}

/// `qemu-img convert -O raw` of `img` (or of one of its internal snapshots) into `out`.
pub(crate) fn export_raw(dir: &Path, img: &str, snapshot: Option<&str>, out: &str) -> Vec<u8> {
    let l;
    let mut args = vec!["convert", "-f", "qcow2"];
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.push("-l");
        args.push(&l);
    }
    args.extend(["-O", "raw", img, out]);
    qemu_img(&args, dir);
    fs::read(dir.join(out)).expect("reading raw export")
}

/// Opens `path` writable with the qemu-compatible policy.
pub(crate) fn open_rw(path: &Path) -> Opened {
    open_rw_cache(path, None)
}

/// [`open_rw`] with an L2 cache of `l2_cache_bytes` (the engine keeps at least 4 slices).
pub(crate) fn open_rw_cache(path: &Path, l2_cache_bytes: Option<usize>) -> Opened {
    let mut o = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    if let Some(b) = l2_cache_bytes {
        o.qcow2.l2_cache_bytes = b;
    }
    open(path, Format::Qcow2, &o)
        .unwrap_or_else(|e| panic!("opening {} writable: {e}", path.display()))
}

/// Opens `path` writable with the qemu-compatible policy but without locks, for a handle the test
/// leaks (`mem::forget`) to stand for a crashed process: a crashed process's locks die with it.
pub(crate) fn open_rw_crashing(path: &Path, l2_cache_bytes: Option<usize>) -> Opened {
    let mut o = OpenOptions {
        writable: true,
        locking: qcow2kit::chain::Locking::Off,
        ..OpenOptions::qemu_compatible()
    };
    if let Some(b) = l2_cache_bytes {
        o.qcow2.l2_cache_bytes = b;
    }
    open(path, Format::Qcow2, &o)
        .unwrap_or_else(|e| panic!("opening {} writable: {e}", path.display()))
}

/// Opens `path` read-only with the qemu-compatible policy.
pub(crate) fn open_ro(path: &Path) -> Opened {
    open(path, Format::Qcow2, &OpenOptions::qemu_compatible())
        .unwrap_or_else(|e| panic!("opening {} read-only: {e}", path.display()))
}

/// Reads the whole device in chunks of an awkward size.
pub(crate) fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = dev.size();
    let mut out = vec![0u8; size as usize];
    let chunk = (256 * K - 1536) as usize;
    let mut p = 0usize;
    while p < out.len() {
        let n = chunk.min(out.len() - p);
        dev.read_at(&mut out[p..p + n], p as u64)
            .unwrap_or_else(|e| panic!("reading {n} bytes at {p}: {e}"));
        p += n;
    }
    out
}

/// Panics with the first differing offset (and a few bytes around it) unless equal.
pub(crate) fn assert_same(got: &[u8], want: &[u8], base: u64, context: &str) {
    if got == want {
        return;
    }
    if got.len() != want.len() {
        panic!(
            "{context}: length {} but the model has {}",
            got.len(),
            want.len()
        );
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap_or(i);
    let n = got[i..=last]
        .iter()
        .zip(&want[i..=last])
        .filter(|(a, b)| a != b)
        .count();
    let e = (i + 16).min(got.len());
    panic!(
        "{context}: {n} bytes differ in guest range {:#x}..={:#x}; at {:#x} got {:02x?} want {:02x?}",
        base + i as u64,
        base + last as u64,
        base + i as u64,
        &got[i..e],
        &want[i..e]
    );
}

/// Deterministic pseudo-random numbers.
pub(crate) use qcow2kit::io::testing::SplitMix as Rng;

// ---------------------------------------------------------------------------------------------
// Operations and the model
// ---------------------------------------------------------------------------------------------

/// The bytes a write stores.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// One byte repeated (what `qemu-io write -P` writes).
    Byte(u8),
    /// Pseudo-random bytes from a seed (every misplaced byte shows).
    Random(u64),
}

impl Fill {
    pub(crate) fn bytes(self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        match self {
            Fill::Byte(b) => v.fill(b),
            Fill::Random(s) => Rng(s).fill(&mut v),
        }
        v
    }
}

impl fmt::Debug for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fill::Byte(b) => write!(f, "Fill::Byte({b:#04x})"),
            Fill::Random(s) => write!(f, "Fill::Random({s:#x})"),
        }
    }
}

/// One guest operation (offsets and lengths already fitted to the device).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Write {
        off: u64,
        len: u64,
        fill: Fill,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    /// Close (drop, which flushes) and open again.
    Reopen,
    /// `Qcow2Image::resize(new_size, false)`.
    Grow {
        new_size: u64,
    },
    /// `Qcow2Image::resize(new_size, true)` to a smaller size.
    Shrink {
        new_size: u64,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Write { off, len, fill } => {
                write!(
                    f,
                    "Op::Write {{ off: {off:#x}, len: {len:#x}, fill: {fill:?} }}"
                )
            }
            Op::Zero { off, len } => write!(f, "Op::Zero {{ off: {off:#x}, len: {len:#x} }}"),
            Op::Discard { off, len } => {
                write!(f, "Op::Discard {{ off: {off:#x}, len: {len:#x} }}")
            }
            Op::Flush => write!(f, "Op::Flush"),
            Op::Reopen => write!(f, "Op::Reopen"),
            Op::Grow { new_size } => write!(f, "Op::Grow {{ new_size: {new_size:#x} }}"),
            Op::Shrink { new_size } => write!(f, "Op::Shrink {{ new_size: {new_size:#x} }}"),
        }
    }
}

impl Op {
    /// The guest range the operation touches, if any.
    pub(crate) fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => {
                Some((off, len))
            }
            _ => None,
        }
    }

    /// The qemu-io command doing the same (None for Reopen, which splits batches).
    pub(crate) fn qemu_io(&self) -> Option<String> {
        Some(match *self {
            Op::Write {
                off,
                len,
                fill: Fill::Byte(b),
            } => format!("write -P {b} {off} {len}"),
            Op::Write { .. } => panic!("qemu-io writes take one pattern byte: {self:?}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Flush => "flush".into(),
            Op::Reopen => return None,
            Op::Grow { new_size } | Op::Shrink { new_size } => format!("truncate {new_size}"),
        })
    }
}

/// What a discard does on this image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Semantics {
    /// Discard granularity (the cluster size: blocks of it wholly inside the range, and a short
    /// last one when the range reaches the end of the device, read as zeros afterwards).
    pub(crate) discard_gran: u64,
    /// v2 image with a backing file: discard changes nothing.
    pub(crate) discard_noop: bool,
}

/// The guest content as it must be.
#[derive(Clone)]
pub(crate) struct Model {
    pub(crate) data: Vec<u8>,
    pub(crate) sem: Semantics,
}

impl Model {
    pub(crate) fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, fill } => {
                self.data[off as usize..(off + len) as usize].copy_from_slice(&fill.bytes(len))
            }
            Op::Zero { off, len } => self.data[off as usize..(off + len) as usize].fill(0),
            Op::Discard { off, len } => {
                if self.sem.discard_noop {
                    return;
                }
                let size = self.data.len() as u64;
                let g = self.sem.discard_gran;
                let end = off + len;
                let mut b = off.next_multiple_of(g);
                while b < end {
                    let be = b + g;
                    if be <= end {
                        self.data[b as usize..be as usize].fill(0);
                    } else if end == size {
                        // A range reaching the end of the device covers its short last block.
                        self.data[b as usize..].fill(0);
                    }
                    b = be;
                }
            }
            Op::Flush | Op::Reopen => {}
            Op::Grow { new_size } | Op::Shrink { new_size } => {
                self.data.resize(new_size as usize, 0)
            }
        }
    }
}

/// An image opened through qcow2kit, reopened on demand.
pub(crate) struct Live {
    pub(crate) path: PathBuf,
    pub(crate) opened: Option<Opened>,
    pub(crate) l2_cache_bytes: Option<usize>,
    /// Options of every (re)open instead of [`open_rw_cache`]'s (keys of encrypted images).
    pub(crate) options: Option<OpenOptions>,
}

impl Live {
    /// Opens `path` (and reopens it) with `options`.
    pub(crate) fn open_with(path: &Path, options: OpenOptions) -> Live {
        let mut live = Live {
            path: path.to_path_buf(),
            opened: None,
            l2_cache_bytes: None,
            options: Some(options),
        };
        live.opened = Some(live.reopen());
        live
    }

    fn reopen(&self) -> Opened {
        match &self.options {
            Some(o) => open(&self.path, Format::Qcow2, o)
                .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display())),
            None => open_rw_cache(&self.path, self.l2_cache_bytes),
        }
    }

    pub(crate) fn open(path: &Path) -> Live {
        Live::open_cache(path, None)
    }

    pub(crate) fn open_cache(path: &Path, l2_cache_bytes: Option<usize>) -> Live {
        Live {
            path: path.to_path_buf(),
            opened: Some(open_rw_cache(path, l2_cache_bytes)),
            l2_cache_bytes,
            options: None,
        }
    }

    pub(crate) fn dev(&self) -> &dyn BlockDevice {
        self.opened.as_ref().expect("image is open").device.as_ref()
    }

    pub(crate) fn close(&mut self) {
        if let Some(o) = self.opened.take() {
            if let Some(q) = &o.qcow2 {
                q.close()
                    .unwrap_or_else(|e| panic!("closing {}: {e}", self.path.display()));
            }
        }
    }

    /// Applies `op`; panics naming the op on an error.
    pub(crate) fn apply(&mut self, op: &Op, index: usize) {
        let r = match *op {
            Op::Write { off, len, fill } => self.dev().write_at(&fill.bytes(len), off),
            Op::Zero { off, len } => self.dev().write_zeroes(off, len),
            Op::Discard { off, len } => self.dev().discard(off, len),
            Op::Flush => self.dev().flush(),
            Op::Reopen => {
                self.close();
                self.opened = Some(self.reopen());
                Ok(())
            }
            Op::Grow { new_size } => self
                .opened
                .as_ref()
                .and_then(|o| o.qcow2.as_ref())
                .expect("qcow2 image")
                .resize(new_size, false),
            Op::Shrink { new_size } => self
                .opened
                .as_ref()
                .and_then(|o| o.qcow2.as_ref())
                .expect("qcow2 image")
                .resize(new_size, true),
        };
        if let Err(e) = r {
            panic!("op #{index} {op:?} failed on {}: {e}", self.path.display());
        }
    }
}

/// Reads back the neighbourhood of an op's range and compares it with the model.
pub(crate) fn spot_check(dev: &dyn BlockDevice, model: &Model, op: &Op, index: usize) {
    let Some((off, len)) = op.range() else { return };
    let size = dev.size();
    assert_eq!(
        size,
        model.data.len() as u64,
        "device size after op #{index}"
    );
    let a = off.saturating_sub(4 * K);
    let b = (off + len + 4 * K).min(size);
    let mut buf = vec![0u8; (b - a) as usize];
    dev.read_at(&mut buf, a)
        .unwrap_or_else(|e| panic!("reading back {a:#x}..{b:#x} after op #{index} {op:?}: {e}"));
    assert_same(
        &buf,
        &model.data[a as usize..b as usize],
        a,
        &format!("read-back after op #{index} {op:?}"),
    );
}

/// Runs ops through qemu-io on `img`, one process per run between `Reopen`s (batched).
pub(crate) fn apply_qemu_io(dir: &Path, img: &str, ops: &[Op]) {
    let mut batch: Vec<String> = Vec::new();
    let run = |batch: &mut Vec<String>| {
        if batch.is_empty() {
            return;
        }
        let mut args: Vec<&str> = vec!["-f", "qcow2"];
        for c in batch.iter() {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        qemu_io(&args, dir);
        batch.clear();
    };
    for op in ops {
        match op.qemu_io() {
            Some(c) => {
                batch.push(c);
                if batch.len() >= 400 {
                    run(&mut batch);
                }
            }
            None => run(&mut batch),
        }
    }
    run(&mut batch);
}

/// Formats an op list for a failure message (all of it when short).
pub(crate) fn describe_ops(ops: &[Op]) -> String {
    let mut s = String::new();
    let show = |s: &mut String, i: usize, op: &Op| s.push_str(&format!("  #{i}: {op:?},\n"));
    if ops.len() <= 60 {
        for (i, op) in ops.iter().enumerate() {
            show(&mut s, i, op);
        }
    } else {
        for (i, op) in ops.iter().enumerate().take(20) {
            show(&mut s, i, op);
        }
        s.push_str(&format!("  … {} more …\n", ops.len() - 40));
        for (i, op) in ops.iter().enumerate().skip(ops.len() - 20) {
            show(&mut s, i, op);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Image configurations
// ---------------------------------------------------------------------------------------------

/// What the image under test sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    None,
    /// A qcow2 backing file of this size (64 KiB clusters) with data written by qemu-io.
    Qcow2 {
        size: u64,
    },
    /// A raw backing file of this length in bytes (need not be a multiple of 512).
    Raw {
        len: u64,
    },
    /// base.qcow2 ← mid.qcow2 ← image, both lower layers with data.
    Chain3,
}

/// The external data file of image `img` (in the same directory).
pub(crate) fn data_file_name(img: &str) -> String {
    format!("{img}.data")
}

/// An image configuration of the matrix.
#[derive(Debug, Clone)]
pub(crate) struct Cfg {
    pub(crate) cluster: u64,
    pub(crate) refcount_bits: u32,
    pub(crate) v2: bool,
    pub(crate) extended_l2: bool,
    pub(crate) lazy: bool,
    pub(crate) prealloc: Preallocation,
    pub(crate) size: u64,
    pub(crate) backing: Backing,
    /// External data file: None, Some(data_file_raw).
    pub(crate) data_file: Option<bool>,
    /// Create the image with qemu-img instead of qcow2kit.
    pub(crate) qemu_create: bool,
    /// L2 cache size to open with (None: the default); tiny caches evict dirty slices mid-write.
    pub(crate) l2_cache_bytes: Option<usize>,
    /// Before the stream, qemu-io writes compressed clusters (and some plain data) into it.
    pub(crate) prefill_compressed: bool,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            cluster: 64 * K,
            refcount_bits: 16,
            v2: false,
            extended_l2: false,
            lazy: false,
            prealloc: Preallocation::Off,
            size: 4 * M + 1536,
            backing: Backing::None,
            data_file: None,
            qemu_create: false,
            l2_cache_bytes: None,
            prefill_compressed: false,
        }
    }
}

impl Cfg {
    pub(crate) fn has_backing(&self) -> bool {
        self.backing != Backing::None
    }

    /// Discard works on whole clusters, with extended L2 too (as in QEMU, whose discard
    /// granularity is the cluster: partial clusters, even whole subclusters, are kept).
    pub(crate) fn semantics(&self) -> Semantics {
        Semantics {
            discard_gran: self.cluster,
            discard_noop: self.v2 && self.has_backing(),
        }
    }

    /// qemu-img's `-o` string for these options (backing given separately).
    pub(crate) fn qemu_options(&self, img: &str) -> String {
        let mut o = vec![
            format!("cluster_size={}", self.cluster),
            format!("compat={}", if self.v2 { "0.10" } else { "1.1" }),
        ];
        if !self.v2 {
            o.push(format!("refcount_bits={}", self.refcount_bits));
        }
        if self.lazy {
            o.push("lazy_refcounts=on".into());
        }
        if self.extended_l2 {
            o.push("extended_l2=on".into());
        }
        let p = match self.prealloc {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        };
        o.push(format!("preallocation={p}"));
        if let Some(raw) = self.data_file {
            o.push(format!("data_file={}", data_file_name(img)));
            o.push(format!("data_file_raw={}", if raw { "on" } else { "off" }));
        }
        o.join(",")
    }

    /// Builds the backing files (with data, through qemu) in `dir`; returns (name, format).
    pub(crate) fn make_backing(&self, dir: &Path, seed: u64) -> Option<(String, String)> {
        let mut rng = Rng(seed ^ 0xb4c0);
        let scribble = |img: &str, size: u64, rng: &mut Rng, n: usize| {
            let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
            for _ in 0..n {
                let off = rng.below(size);
                let len = rng.range(1, 200 * K).min(size - off);
                let cmd = if rng.below(5) == 0 {
                    format!("write -z {off} {len}")
                } else {
                    format!("write -P {} {off} {len}", rng.range(1, 255))
                };
                args.push("-c".into());
                args.push(cmd);
            }
            args.push(img.into());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            qemu_io(&a, dir);
        };
        match self.backing {
            Backing::None => None,
            Backing::Qcow2 { size } => {
                qemu_img(
                    &[
                        "create",
                        "-f",
                        "qcow2",
                        "-q",
                        "base.qcow2",
                        &size.to_string(),
                    ],
                    dir,
                );
                scribble("base.qcow2", size, &mut rng, 24);
                Some(("base.qcow2".into(), "qcow2".into()))
            }
            Backing::Raw { len } => {
                let mut v = vec![0u8; len as usize];
                rng.fill(&mut v);
                // Some holes of zeros too.
                for _ in 0..4 {
                    let a = rng.below(len) as usize;
                    let b = (a + rng.below(128 * K) as usize).min(len as usize);
                    v[a..b].fill(0);
                }
                fs::write(dir.join("base.raw"), v).expect("writing raw backing file");
                Some(("base.raw".into(), "raw".into()))
            }
            Backing::Chain3 => {
                let bsize = 3 * M + 512;
                qemu_img(
                    &[
                        "create",
                        "-f",
                        "qcow2",
                        "-q",
                        "-o",
                        "cluster_size=4096",
                        "base.qcow2",
                        &bsize.to_string(),
                    ],
                    dir,
                );
                scribble("base.qcow2", bsize, &mut rng, 24);
                let msize = self.size - 64 * K;
                qemu_img(
                    &[
                        "create",
                        "-f",
                        "qcow2",
                        "-q",
                        "-o",
                        "cluster_size=16384",
                        "-b",
                        "base.qcow2",
                        "-F",
                        "qcow2",
                        "mid.qcow2",
                        &msize.to_string(),
                    ],
                    dir,
                );
                scribble("mid.qcow2", msize, &mut rng, 24);
                Some(("mid.qcow2".into(), "qcow2".into()))
            }
        }
    }

    /// qemu-io writes runs of compressed clusters over about a third of the image (pattern
    /// data, so several compressed clusters share a host cluster) and some plain data.
    fn prefill(&self, dir: &Path, img: &str) {
        let cs = self.cluster;
        let clusters = self.size / cs;
        let mut rng = Rng(self.size ^ cs);
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
        let mut c = rng.below(3);
        while c < clusters {
            let k = rng.range(1, 4).min(clusters - c);
            args.push("-c".into());
            args.push(format!(
                "write -c -P {} {} {}",
                rng.range(1, 255),
                c * cs,
                k * cs
            ));
            c += k + rng.range(1, 8);
        }
        for _ in 0..8 {
            let off = rng.below(self.size);
            let len = rng.range(1, 2 * cs).min(self.size - off);
            args.push("-c".into());
            args.push(format!("write -P {} {off} {len}", rng.range(1, 255)));
        }
        args.push(img.into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_io(&a, dir);
    }

    /// Creates `img` (and its backing files) in `dir`, returning the model of its initial
    /// content (qemu-img's raw export of it).
    pub(crate) fn create(&self, dir: &Path, img: &str, seed: u64) -> Model {
        let backing = self.make_backing(dir, seed);
        self.create_image(dir, img, &backing, self.qemu_create)
    }

    /// Creates `img` over already built backing files, with qemu-img (`qemu`) or qcow2kit.
    pub(crate) fn create_image(
        &self,
        dir: &Path,
        img: &str,
        backing: &Option<(String, String)>,
        qemu: bool,
    ) -> Model {
        if qemu {
            let opts = self.qemu_options(img);
            let size = self.size.to_string();
            let mut args = vec!["create", "-f", "qcow2", "-q", "-o", &opts];
            if let Some((b, f)) = &backing {
                args.extend(["-b", b, "-F", f]);
            }
            args.extend([img, &size]);
            qemu_img(&args, dir);
        } else {
            let o = CreateOptions {
                size: Some(self.size),
                cluster_size: self.cluster,
                compat: if self.v2 { Compat::V2 } else { Compat::V3 },
                refcount_bits: self.refcount_bits,
                lazy_refcounts: self.lazy,
                extended_l2: self.extended_l2,
                preallocation: self.prealloc,
                backing_file: backing.as_ref().map(|b| b.0.clone()),
                backing_format: backing.as_ref().map(|b| b.1.clone()),
                data_file: self.data_file.map(|_| data_file_name(img)),
                data_file_raw: self.data_file == Some(true),
                ..CreateOptions::default()
            };
            create_qcow2(&dir.join(img), &o)
                .unwrap_or_else(|e| panic!("create_qcow2 {img} with {self:?}: {e}"));
            // A fresh image is clean for qemu before anything is written to it.
            assert_check_clean(dir, img, "right after create_qcow2");
        }
        if self.prefill_compressed {
            self.prefill(dir, img);
        }
        let data = export_raw(dir, img, None, "initial.raw");
        let _ = fs::remove_file(dir.join("initial.raw"));
        assert_eq!(data.len() as u64, self.size, "initial export size");
        Model {
            data,
            sem: self.semantics(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random streams
// ---------------------------------------------------------------------------------------------

/// Unfitted random operation: interpreted against the device as it is when the op runs, so a
/// shrunk stream stays valid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawOp {
    pub(crate) kind: u8,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) c: u64,
}

/// How raw ops are fitted to an image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamShape {
    pub(crate) cluster: u64,
    /// Subcluster size (the cluster size without extended L2).
    pub(crate) sub: u64,
    /// Guest bytes one L2 table maps.
    pub(crate) l2_span: u64,
    pub(crate) max_len: u64,
    /// Largest size grows may reach (no grow when ≤ the current size).
    pub(crate) max_size: u64,
    /// Percentages (cumulative order: write, zero, discard, flush, reopen, grow).
    pub(crate) pct_zero: u8,
    pub(crate) pct_discard: u8,
    pub(crate) pct_flush: u8,
    pub(crate) pct_reopen: u8,
    pub(crate) pct_grow: u8,
    pub(crate) pct_shrink: u8,
    /// Writes use one pattern byte (qemu-io comparable).
    pub(crate) byte_patterns: bool,
    /// Discards cover whole clusters (or reach the end of the device).
    pub(crate) cluster_discards: bool,
    /// Lengths uniform in `1..=max_len` (instead of mostly small ones).
    pub(crate) big_writes: bool,
    /// Shrinks go to a multiple of the cluster size. (qemu leaves the stale rest of a partial
    /// last cluster in place on shrink and shows it again on a later grow; qcow2kit zeroes it.)
    pub(crate) aligned_shrinks: bool,
}

impl StreamShape {
    pub(crate) fn for_cfg(cfg: &Cfg) -> StreamShape {
        let cs = cfg.cluster;
        let entry = if cfg.extended_l2 { 16 } else { 8 };
        let l2_span = cs / entry * cs;
        StreamShape {
            cluster: cs,
            sub: if cfg.extended_l2 { cs / 32 } else { cs },
            l2_span,
            max_len: (4 * cs)
                .max(if l2_span <= 64 * K { 2 * l2_span } else { 0 })
                .min(4 * M),
            max_size: cfg.size,
            pct_zero: 14,
            pct_discard: 14,
            pct_flush: 8,
            pct_reopen: 2,
            pct_grow: 0,
            pct_shrink: 0,
            byte_patterns: false,
            cluster_discards: false,
            big_writes: false,
            aligned_shrinks: false,
        }
    }

    fn pick_off(&self, v: u64, size: u64) -> u64 {
        let mode = v % 8;
        let x = v >> 3;
        let cs = self.cluster;
        let near = |unit: u64, x: u64| {
            let n = size.div_ceil(unit).max(1);
            let k = (x % (n + 1)) * unit;
            let d = (x >> 20) % 1100;
            if (x >> 40) & 1 == 0 {
                k.saturating_sub(d)
            } else {
                k + d
            }
        };
        let off = match mode {
            0 | 7 => x % size,
            1 => (x % size) & !511,
            2 => (x % size) & !(cs - 1),
            3 => (x % size) & !(self.sub - 1),
            4 => near(cs, x),
            5 => near(self.l2_span, x),
            _ => size.saturating_sub(1 + x % (2 * cs + 1024)),
        };
        off.min(size - 1)
    }

    fn pick_len(&self, v: u64) -> u64 {
        let mode = if self.big_writes { 6 } else { v % 8 };
        let x = v >> 3;
        let cs = self.cluster;
        let len = match mode {
            0 => 1 + x % 16,
            1 => 1 + x % 600,
            2 => 512 * (1 + x % 8),
            3 => cs,
            4 => cs * (1 + x % 4),
            5 => self.sub * (1 + x % 5),
            6 => 1 + x % self.max_len,
            _ => 1 + x % (cs + cs / 2),
        };
        len.min(self.max_len)
    }

    fn pick_range(&self, a: u64, b: u64, size: u64) -> (u64, u64) {
        let off = self.pick_off(a, size);
        let len = self.pick_len(b).min(size - off).max(1);
        (off, len)
    }

    /// Fits `r` to a device of `size` bytes.
    pub(crate) fn realize(&self, r: &RawOp, size: u64) -> Op {
        let k = r.kind % 100;
        let z = 100
            - self.pct_zero
            - self.pct_discard
            - self.pct_flush
            - self.pct_reopen
            - self.pct_grow
            - self.pct_shrink;
        let zd = z + self.pct_zero;
        let dd = zd + self.pct_discard;
        let fd = dd + self.pct_flush;
        let rd = fd + self.pct_reopen;
        if k < z {
            let (off, len) = self.pick_range(r.a, r.b, size);
            let fill = if self.byte_patterns {
                Fill::Byte((r.c % 255 + 1) as u8)
            } else if r.c % 16 == 0 {
                Fill::Byte((r.c >> 8) as u8) // includes literal zero writes
            } else {
                Fill::Random(r.c)
            };
            Op::Write { off, len, fill }
        } else if k < zd {
            let (off, len) = self.pick_range(r.a, r.b, size);
            Op::Zero { off, len }
        } else if k < dd {
            let (mut off, mut len) = self.pick_range(r.a, r.b, size);
            if self.cluster_discards {
                let cs = self.cluster;
                let end = (off + len).next_multiple_of(cs).min(size);
                off &= !(cs - 1);
                len = end - off;
            }
            Op::Discard { off, len }
        } else if k < fd {
            Op::Flush
        } else if k < rd {
            Op::Reopen
        } else if k >= rd + self.pct_grow {
            // Shrink, to a multiple of 512 bytes, at most halving the device.
            let step = match r.a % 3 {
                0 => 512 * (1 + r.b % 16),
                1 => self.cluster * (1 + r.b % 4) + 512 * (r.c % 4),
                _ => self.l2_span * (1 + r.b % 3),
            };
            let unit = if self.aligned_shrinks {
                self.cluster
            } else {
                512
            };
            let new_size = size.saturating_sub(step).max(size / 2).max(unit) & !(unit - 1);
            if new_size < size {
                Op::Shrink { new_size }
            } else {
                Op::Flush
            }
        } else if size < self.max_size {
            let step = match r.a % 3 {
                0 => 512 * (1 + r.b % 16),
                1 => self.cluster * (1 + r.b % 4) + 512 * (r.c % 4),
                _ => self.l2_span * (1 + r.b % 3),
            };
            Op::Grow {
                new_size: (size + step).min(self.max_size),
            }
        } else {
            Op::Flush
        }
    }

    /// Fits a whole stream, tracking the device size.
    pub(crate) fn realize_all(&self, raws: &[RawOp], mut size: u64) -> Vec<Op> {
        raws.iter()
            .map(|r| {
                let op = self.realize(r, size);
                if let Op::Grow { new_size } | Op::Shrink { new_size } = op {
                    size = new_size;
                }
                op
            })
            .collect()
    }
}

/// The proptest strategy of raw streams of `lo..hi` ops.
pub(crate) fn raw_ops(
    lo: usize,
    hi: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<RawOp>> {
    use proptest::prelude::*;
    proptest::collection::vec(
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(kind, a, b, c)| RawOp {
            kind,
            a,
            b,
            c,
        }),
        lo..hi,
    )
}

/// Cases per configuration: `default`, or `QCOW2KIT_MODEL_CASES`.
pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("QCOW2KIT_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A proptest configuration for slow (process-spawning) cases: no regression files, bounded
/// shrinking (`QCOW2KIT_SHRINK_ITERS`, default 0: failing streams are minimised with
/// `QCOW2KIT_MINIMISE=<message part>` instead, see `minimise`).
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let shrink = std::env::var("QCOW2KIT_SHRINK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    proptest::test_runner::Config {
        cases,
        max_shrink_iters: shrink,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// Delta debugging: the smallest sublist of `ops` (removing chunks, then single ops) on which
/// `run` still panics with a message containing `key`. Used when `QCOW2KIT_MINIMISE=<key>` is
/// set (run one test at a time: the panic hook is silenced meanwhile).
pub(crate) fn minimise(ops: &[Op], key: &str, run: &dyn Fn(&[Op])) -> Vec<Op> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let fails = |o: &[Op]| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(o))) {
        Ok(()) => false,
        Err(e) => e
            .downcast_ref::<String>()
            .map(|m| m.contains(key))
            .or_else(|| e.downcast_ref::<&str>().map(|m| m.contains(key)))
            .unwrap_or(false),
    };
    let mut cur = ops.to_vec();
    let mut n = 2usize;
    while cur.len() >= 2 {
        let chunk = cur.len().div_ceil(n);
        let mut reduced = false;
        let mut i = 0;
        while i < cur.len() {
            let mut cand = cur[..i].to_vec();
            cand.extend_from_slice(&cur[(i + chunk).min(cur.len())..]);
            if !cand.is_empty() && fails(&cand) {
                cur = cand;
                reduced = true;
            } else {
                i += chunk;
            }
        }
        if !reduced {
            if chunk == 1 {
                break;
            }
            n = (n * 2).min(cur.len());
        }
    }
    std::panic::set_hook(hook);
    cur
}

/// Four threads at once on `dev`, each owning stripes of the device whose boundaries are
/// unaligned (so neighbouring threads share clusters): writes, zero writes, discards and flushes
/// inside a thread's own stripes. Short stripes fill a hot first eighth of the device (two ops
/// in three go there), longer ones the rest. Each thread's result is deterministic, so the
/// whole is: returns the model of the device afterwards (`model0` before).
pub(crate) fn concurrent_disjoint_writers(
    dev: &Arc<dyn BlockDevice>,
    model0: &Model,
    cluster: u64,
    seed: u64,
    ops_per_thread: usize,
) -> Model {
    let size = model0.data.len() as u64;
    let sem = model0.sem;
    let mut rng = Rng(seed);
    let mut cuts = vec![0u64];
    while *cuts.last().unwrap() < size {
        let last = *cuts.last().unwrap();
        let max = if last < size / 8 {
            cluster
        } else {
            3 * cluster
        };
        cuts.push((last + rng.range(1, max)).min(size));
    }
    let hot = cuts
        .iter()
        .copied()
        .find(|&c| c >= size / 8)
        .unwrap_or(size);
    let stripes: Vec<(u64, u64)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
    let start = std::sync::Barrier::new(4);
    let models: Vec<Model> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let dev = dev.clone();
                let mine: Vec<(u64, u64)> = stripes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i as u64 % 4 == t)
                    .map(|(_, r)| *r)
                    .collect();
                let hot_mine = mine.iter().filter(|r| r.1 <= hot).count().max(1) as u64;
                let mut model = model0.clone();
                let start = &start;
                s.spawn(move || {
                    let mut rng = Rng(seed ^ ((t + 1) * 0x1234_5678));
                    start.wait();
                    for i in 0..ops_per_thread {
                        let pick = if rng.below(3) == 0 {
                            rng.below(mine.len() as u64)
                        } else {
                            rng.below(hot_mine)
                        };
                        let (a, b) = mine[pick as usize];
                        let off = rng.range(a, b - 1);
                        let len = rng.range(1, b - off);
                        let op = match rng.below(10) {
                            0 => Op::Zero { off, len },
                            1 => Op::Discard { off, len },
                            2 => Op::Flush,
                            _ => Op::Write {
                                off,
                                len,
                                fill: Fill::Random(rng.next_u64()),
                            },
                        };
                        let r = match op {
                            Op::Write { off, len, fill } => dev.write_at(&fill.bytes(len), off),
                            Op::Zero { off, len } => dev.write_zeroes(off, len),
                            Op::Discard { off, len } => dev.discard(off, len),
                            _ => dev.flush(),
                        };
                        r.unwrap_or_else(|e| panic!("thread {t} op {i} {op:?}: {e}"));
                        // A discard only zeroes whole clusters inside the range, which lie in
                        // this thread's stripe.
                        model.apply(&op);
                    }
                    model
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let mut want = model0.data.clone();
    for (i, &(a, b)) in stripes.iter().enumerate() {
        let m = &models[i % 4];
        want[a as usize..b as usize].copy_from_slice(&m.data[a as usize..b as usize]);
    }
    Model { data: want, sem }
}
