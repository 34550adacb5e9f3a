//! Image building shared by the benches: a scratch directory (in /dev/shm when it exists, so
//! reads measure the library and not a disk), deterministic data, and qemu-img / qemu-io runs.
//!
//! Every helper panics with the command and its output when a qemu tool is missing or fails:
//! a bench never silently measures the wrong image.
// Each bench binary includes this module and uses only part of it.
#![allow(dead_code)]

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use qcow2kit::chain::{open, OpenOptions, Opened};
use qcow2kit::Format;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// Size of the fully allocated images.
pub(crate) const IMAGE_SIZE: u64 = 256 << 20;
/// Size of the compressed images (compressing is slow; keep setup short).
pub(crate) const COMPRESSED_SIZE: u64 = 64 << 20;
/// Cluster size of every qcow2 image built here.
pub(crate) const CLUSTER: u64 = 64 << 10;

/// Keeps a bench group short: the machine is shared and a full `cargo bench` must stay within
/// a few minutes.
pub(crate) fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
}

/// Runs `prog args…` in `cwd`; panics with its output if it cannot start or fails.
pub(crate) fn run(prog: &str, args: &[&str], cwd: &Path) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{prog}` ({e}); the benches need qemu-img and qemu-io in PATH")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // qemu-io may exit 0 after a failed command; its message says so.
    let failed_text = prog == "qemu-io" && (stdout.contains(" failed") || !stderr.is_empty());
    if !out.status.success() || failed_text {
        panic!(
            "`{prog} {}` (cwd {}) failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args.join(" "),
            cwd.display(),
            out.status
        );
    }
}

/// Deterministic pseudo-random numbers.
pub(crate) use qcow2kit::io::testing::SplitMix as Rng;

/// `n` random offsets in `0..size`, multiples of `align`.
pub(crate) fn random_offsets(n: usize, size: u64, align: u64, seed: u64) -> Vec<u64> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.below(size / align) * align).collect()
}

/// A scratch directory for one bench binary, removed when dropped.
pub(crate) struct Scratch {
    dir: TempDir,
}

impl Scratch {
    /// A new directory in /dev/shm if it exists, else in the system temporary directory.
    pub(crate) fn new(prefix: &str) -> Scratch {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .unwrap_or_else(|e| {
                panic!("creating a scratch directory in {}: {e}", parent.display())
            });
        Scratch { dir }
    }

    /// Path of `name` inside the directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img args…` in the directory.
    pub(crate) fn img(&self, args: &[&str]) {
        run("qemu-img", args, self.dir.path());
    }

    /// `qemu-io -f qcow2 -c cmd… image` in the directory.
    pub(crate) fn io(&self, image: &str, cmds: &[String]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        run("qemu-io", &args, self.dir.path());
    }

    /// A raw file `name` of `size` bytes of compressible pseudo-text (words drawn at random,
    /// about 3.5:1 under zlib) with no zero cluster, so qemu-img allocates every cluster.
    pub(crate) fn text_raw(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        const WORDS: [&[u8]; 16] = [
            b"qcow2 ",
            b"cluster ",
            b"refcount ",
            b"backing ",
            b"snapshot ",
            b"L2 ",
            b"table ",
            b"zero ",
            b"data ",
            b"compressed ",
            b"guest ",
            b"host\n",
            b"offset ",
            b"slice ",
            b"extent ",
            b"bitmap ",
        ];
        let path = self.path(name);
        let f = File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut r = Rng(seed);
        let mut written = 0u64;
        let mut line = Vec::with_capacity(4096);
        while written < size {
            line.clear();
            while line.len() < 4000 {
                let x = r.next_u64();
                for k in 0..4 {
                    line.extend_from_slice(WORDS[((x >> (k * 4)) & 15) as usize]);
                }
                // Some incompressible bytes, so the ratio is realistic, not extreme.
                line.extend_from_slice(&(x >> 16).to_be_bytes()[..5]);
            }
            let n = (size - written).min(line.len() as u64) as usize;
            w.write_all(&line[..n])
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            written += n as u64;
        }
        w.flush()
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// `qemu-img convert -O qcow2 -o cluster_size=64k[,extra] [-c] src dst`; returns dst.
    pub(crate) fn convert_qcow2(
        &self,
        src: &str,
        dst: &str,
        extra_opts: &str,
        compress: bool,
    ) -> PathBuf {
        let mut o = format!("cluster_size={CLUSTER}");
        if !extra_opts.is_empty() {
            o.push(',');
            o.push_str(extra_opts);
        }
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &o];
        if compress {
            args.push("-c");
        }
        args.push(src);
        args.push(dst);
        self.img(&args);
        self.path(dst)
    }

    /// Overlays `mid.qcow2` and `top.qcow2` on `base` (a fully allocated qcow2 image of
    /// `size` bytes): the chain top → mid → base is 3 images deep. Each overlay rewrites a
    /// quarter of the disk, in 256 KiB stripes chosen at random (disjoint between the two), so
    /// a random read is served by top, mid and base in proportions ¼, ¼, ½. Returns the top.
    pub(crate) fn chain3(&self, base: &str, size: u64) -> PathBuf {
        const STRIPE: u64 = 256 << 10;
        let cs = format!("cluster_size={CLUSTER}");
        self.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            base,
            "-F",
            "qcow2",
            "mid.qcow2",
        ]);
        self.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        let stripes = (size / STRIPE) as usize;
        let order = Rng(0xc4a1).permutation(stripes);
        let q = stripes / 4;
        let cmds = |set: &[usize], pattern: u8| -> Vec<String> {
            set.iter()
                .map(|&s| format!("write -P {pattern} {} {STRIPE}", s as u64 * STRIPE))
                .collect()
        };
        self.io("mid.qcow2", &cmds(&order[..q], 0x4d));
        self.io("top.qcow2", &cmds(&order[q..2 * q], 0x54));
        self.path("top.qcow2")
    }

    /// A sparse 1 TiB qcow2 image with `writes` pieces of 4–256 KiB written at random offsets
    /// (a few MiB in all). Returns its path.
    pub(crate) fn sparse_1tib(&self, writes: usize) -> PathBuf {
        let cs = format!("cluster_size={CLUSTER}");
        self.img(&["create", "-f", "qcow2", "-o", &cs, "sparse.qcow2", "1T"]);
        let mut r = Rng(0x5a45);
        let cmds: Vec<String> = (0..writes)
            .map(|_| {
                let len = (1 + r.below(64)) * 4096;
                let off = r.below(((1u64 << 40) - len) / 4096) * 4096;
                format!("write -P 0x33 {off} {len}")
            })
            .collect();
        self.io("sparse.qcow2", &cmds);
        self.path("sparse.qcow2")
    }
}

/// Opens a qcow2 image (and its chain) as qemu-img would; `l2_cache_bytes` overrides the L2
/// cache size.
pub(crate) fn open_qcow2(path: &Path, l2_cache_bytes: Option<usize>) -> Opened {
    let mut opts = OpenOptions::qemu_compatible();
    if let Some(b) = l2_cache_bytes {
        opts.qcow2.l2_cache_bytes = b;
    }
    open(path, Format::Qcow2, &opts)
        .unwrap_or_else(|e| panic!("opening {} as qcow2: {e}", path.display()))
}

/// Opens a raw image.
pub(crate) fn open_raw(path: &Path) -> Opened {
    open(path, Format::Raw, &OpenOptions::qemu_compatible())
        .unwrap_or_else(|e| panic!("opening {} as raw: {e}", path.display()))
}
