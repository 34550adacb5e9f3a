//! `ops::inspect` on images made by qemu-img (qemu 10.x): what it detects and which rules each
//! policy preset reports.
//!
//! Every image is made with `qemu-img` / `qemu-io` in a temporary directory (a missing or failing
//! tool fails the test; it never skips it), some then patched at documented header offsets: legacy
//! AES, unknown feature bits, and polyglots made by writing another format's signature into the
//! unused parts of a qcow2 header cluster — which qemu-img still reads as qcow2.

use qcow2kit::chain::probe_file;
use qcow2kit::format::features::FeatureKind;
use qcow2kit::io::MemoryStorage;
use qcow2kit::ops::inspect::stream::MAX_KEPT_BYTES;
use qcow2kit::ops::inspect::{
    inspect, inspect_path, Encryption, InspectReader, Inspection, Policy, Violation,
};
use qcow2kit::Format;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Runs a qemu tool that must succeed, in `dir`; returns its standard output.
fn tool(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}); these tests need qemu-img and qemu-io (Debian \
                 package qemu-utils, 10.x) in PATH"
            )
        });
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

struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("qcow2kit-inspect-")
            .tempdir()
            .expect("creating a temporary directory");
        Work { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn img(&self, args: &[&str]) -> String {
        tool("qemu-img", args, self.dir.path())
    }

    /// `qemu-img create -f fmt [-o opts] name size`, with a secret `s0` for LUKS options.
    fn create(&self, name: &str, fmt: &str, opts: &str, size: &str) {
        let mut args = vec![
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            fmt,
        ];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size]);
        self.img(&args);
    }

    fn io(&self, name: &str, cmd: &str) {
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", cmd, name],
            self.dir.path(),
        );
    }

    fn copy(&self, from: &str, to: &str) {
        fs::copy(self.path(from), self.path(to)).expect("copying an image");
    }

    /// Writes `bytes` at `offset` of `name`.
    fn patch(&self, name: &str, offset: u64, bytes: &[u8]) {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .expect("opening an image to patch");
        f.write_all_at(bytes, offset).expect("patching");
    }

    fn inspect(&self, name: &str) -> Inspection {
        inspect_path(&self.path(name)).unwrap_or_else(|e| panic!("inspecting {name}: {e}"))
    }

    /// The format qemu-img reads `name` as (`qemu-img info`, probing unless `fmt` is given),
    /// or its error message.
    fn qemu_reads_as(&self, name: &str, fmt: Option<&str>) -> Result<String, String> {
        let mut args = vec!["info", "--output=json"];
        if let Some(f) = fmt {
            args.extend(["-f", f]);
        }
        args.push(name);
        let out = Command::new("qemu-img")
            .args(&args)
            .current_dir(self.dir.path())
            .output()
            .expect("cannot run qemu-img (Debian package qemu-utils, 10.x)");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
        Ok(v["format"].as_str().expect("format").to_string())
    }
}

fn rules(ins: &Inspection, p: Policy) -> Vec<&'static str> {
    ins.check(&p).iter().map(Violation::rule).collect()
}

/// The rules each preset reports, with the declared format `declared`.
fn per_preset(ins: &Inspection, declared: Format) -> [Vec<&'static str>; 3] {
    [
        rules(ins, Policy::strict().declared(declared)),
        rules(ins, Policy::openstack().declared(declared)),
        rules(ins, Policy::trusted_local().declared(declared)),
    ]
}

const NONE: Vec<&str> = Vec::new();

#[test]
fn plain_qcow2_images() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "v3.qcow2", "1G"]);
    w.io("v3.qcow2", "write -P 1 0 1M");
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "64M",
    ]);
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4k,lazy_refcounts=on",
        "z.qcow2",
        "64M",
    ]);
    w.img(&["snapshot", "-c", "s1", "z.qcow2"]);
    w.img(&["snapshot", "-c", "s2", "z.qcow2"]);

    let ins = w.inspect("v3.qcow2");
    assert_eq!(ins.detected, vec![Format::Qcow2]);
    assert_eq!(ins.format(), Format::Qcow2);
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.version, 3);
    assert_eq!(q.virtual_size, 1 << 30);
    assert_eq!(q.cluster_size, Some(65536));
    assert_eq!(q.backing_file, None);
    assert_eq!(q.encryption, Encryption::None);
    assert_eq!((q.dirty, q.corrupt, q.extended_l2), (false, false, false));
    assert_eq!(q.compression_name(), Some("zlib"));
    assert_eq!(q.refcount_bits, Some(16));
    assert!(q.problems.is_empty(), "{:?}", q.problems);
    // qemu-img 10 names its feature bits in the header.
    assert!(q
        .feature_names
        .iter()
        .any(|(k, b, n)| *k == FeatureKind::Incompatible && *b == 4 && n.contains("extended")));
    assert_eq!(per_preset(&ins, Format::Qcow2), [NONE, NONE, NONE]);
    assert_eq!(
        per_preset(&ins, Format::Raw),
        [
            vec!["format_mismatch"],
            vec!["format_mismatch"],
            vec!["format_mismatch"]
        ]
    );

    let ins = w.inspect("v2.qcow2");
    assert_eq!(ins.qcow2.as_ref().map(|q| q.version), Some(2));
    assert_eq!(per_preset(&ins, Format::Qcow2), [NONE, NONE, NONE]);

    let ins = w.inspect("z.qcow2");
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.compression_name(), Some("zstd"));
    assert_eq!(q.snapshot_count, 2);
    assert_eq!(q.cluster_size, Some(4096));
    assert_eq!(q.incompatible.bits, 1 << 3);
    assert_eq!(q.compatible.known, 1);
    assert_eq!(per_preset(&ins, Format::Qcow2), [NONE, NONE, NONE]);
}

#[test]
fn backing_files_data_files_and_extended_l2() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let ins = w.inspect("top.qcow2");
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
    assert_eq!(q.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert!(q.backing_file_offset != 0);
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [vec!["backing_file"], vec!["backing_file"], NONE]
    );
    assert_eq!(
        ins.check(&Policy::strict())[0].to_string(),
        "backing_file: image has a backing file 'base.qcow2'"
    );
    // Nothing the image names is opened: inspecting works with the backing file gone.
    fs::remove_file(w.path("base.qcow2")).expect("removing the backing file");
    assert_eq!(w.inspect("top.qcow2"), ins);

    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.raw",
        "df.qcow2",
        "64M",
    ]);
    let ins = w.inspect("df.qcow2");
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.data_file.as_deref(), Some(&b"data.raw"[..]));
    assert!(q.has_data_file());
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [vec!["data_file"], vec!["data_file"], NONE]
    );

    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "xl.qcow2",
        "64M",
    ]);
    let ins = w.inspect("xl.qcow2");
    assert!(ins.qcow2.as_ref().is_some_and(|q| q.extended_l2));
    // Extended L2 is known to qcow2kit but not to OpenStack's inspector.
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [NONE, vec!["unknown_features"], NONE]
    );
    assert_eq!(
        ins.check(&Policy::openstack()),
        vec![Violation::UnknownFeatures {
            kind: FeatureKind::Incompatible,
            bits: 1 << 4
        }]
    );
}

#[test]
fn encryption_luks_and_legacy_aes() {
    let w = Work::new();
    w.img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "luks.qcow2",
        "64M",
    ]);
    let ins = w.inspect("luks.qcow2");
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.encryption, Encryption::Luks);
    let c = q.crypto_header.expect("LUKS header extension");
    assert!(c.offset > 0 && c.length > 0);
    assert_eq!(per_preset(&ins, Format::Qcow2), [NONE, NONE, NONE]);

    // A raw LUKS volume.
    w.img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "luks",
        "-o",
        "key-secret=s0,iter-time=10",
        "v.luks",
        "16M",
    ]);
    let ins = w.inspect("v.luks");
    assert_eq!(ins.detected, vec![Format::Luks]);
    assert!(ins.qcow2.is_none());
    assert_eq!(per_preset(&ins, Format::Luks), [NONE, NONE, NONE]);
    assert_eq!(
        rules(&ins, Policy::strict().declared(Format::Raw)),
        ["format_mismatch"]
    );

    // Legacy AES: a plain image with crypt_method patched to 1.
    w.img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "64M"]);
    w.copy("plain.qcow2", "aes.qcow2");
    w.patch("aes.qcow2", 32, &1u32.to_be_bytes());
    let ins = w.inspect("aes.qcow2");
    assert_eq!(
        ins.qcow2.as_ref().map(|q| q.encryption),
        Some(Encryption::Aes)
    );
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [vec!["legacy_aes"], NONE, NONE]
    );
    assert_eq!(
        ins.check(&Policy::strict())[0].to_string(),
        "legacy_aes: image uses legacy AES encryption"
    );
}

#[test]
fn raw_files_and_other_formats() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "raw", "disk.raw", "8M"]);
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 1M", "disk.raw"],
        w.dir.path(),
    );
    let ins = w.inspect("disk.raw");
    assert!(ins.detected.is_empty());
    assert_eq!(ins.format(), Format::Raw);
    assert!(ins.qcow2.is_none());
    assert_eq!(per_preset(&ins, Format::Raw), [NONE, NONE, NONE]);
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [
            vec!["format_mismatch"],
            vec!["format_mismatch"],
            vec!["format_mismatch"]
        ]
    );

    for (fmt, opts, want) in [
        ("vmdk", "", Format::Vmdk),
        ("vhdx", "", Format::Vhdx),
        ("vdi", "", Format::Vdi),
        ("qed", "", Format::Qed),
        ("vpc", "subformat=dynamic", Format::Vpc),
        // A fixed VHD is raw data with a footer: found at the tail only.
        ("vpc", "subformat=fixed", Format::Vpc),
        ("parallels", "", Format::Parallels),
    ] {
        let name = format!("x-{fmt}-{}.img", opts.replace(['=', ','], "-"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), "16M"]);
        w.img(&args);
        let ins = w.inspect(&name);
        assert_eq!(ins.detected, vec![want], "{name}");
        assert!(ins.qcow2.is_none(), "{name}");
        // OpenStack bans QED and does not know parallels.
        let banned = if matches!(want, Format::Qed | Format::Parallels) {
            vec!["unsupported_format"]
        } else {
            NONE
        };
        assert_eq!(
            per_preset(&ins, want),
            [banned.clone(), banned, NONE],
            "{name}"
        );
        assert_eq!(
            rules(&ins, Policy::openstack().declared(Format::Qcow2))[0],
            "format_mismatch",
            "{name}"
        );
        assert_eq!(
            rules(&ins, Policy::strict().declared(Format::Raw))[0],
            "format_mismatch",
            "{name}"
        );
    }
}

#[test]
fn polyglots_are_flagged() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "q.qcow2", "64M"]);
    w.io("q.qcow2", "write -P 1 0 64k");

    // A VDI signature at byte 64 (snapshots_offset, unused without snapshots) and an ISO 9660
    // volume descriptor in the padding of the 64 KiB header cluster: a valid qcow2 image that
    // another reader (or qemu-img's own probe, for VDI) takes for something else.
    w.copy("q.qcow2", "vdi.qcow2");
    w.patch("vdi.qcow2", 64, &[0x7f, 0x10, 0xda, 0xbe]);
    w.copy("q.qcow2", "iso.qcow2");
    w.patch("iso.qcow2", 32769, b"CD001");
    // A fixed-VHD footer appended to a qcow2 image.
    w.copy("q.qcow2", "vhd.qcow2");
    let len = fs::metadata(w.path("vhd.qcow2")).expect("stat").len();
    let mut footer = vec![0u8; 512];
    footer[..8].copy_from_slice(b"conectix");
    w.patch("vhd.qcow2", len, &footer);

    // Told it is qcow2, qemu-img reads each as qcow2; probing, it takes the VDI one for VDI.
    assert!(w
        .qemu_reads_as("vdi.qcow2", None)
        .is_err_and(|e| e.contains("VDI")));
    assert_eq!(w.qemu_reads_as("iso.qcow2", None).as_deref(), Ok("qcow2"));
    for (name, other) in [
        ("vdi.qcow2", Format::Vdi),
        ("iso.qcow2", Format::Iso),
        ("vhd.qcow2", Format::Vpc),
    ] {
        assert_eq!(
            w.qemu_reads_as(name, Some("qcow2")).as_deref(),
            Ok("qcow2"),
            "{name}"
        );
        let ins = w.inspect(name);
        assert_eq!(ins.detected, vec![Format::Qcow2, other], "{name}");
        assert!(ins.is_polyglot());
        // The header itself is still valid.
        assert!(
            ins.qcow2.as_ref().is_some_and(|q| q.problems.is_empty()),
            "{name}"
        );
        let want = vec!["format_mismatch", "polyglot"];
        assert_eq!(
            per_preset(&ins, Format::Qcow2),
            [want.clone(), want.clone(), want],
            "{name}"
        );
        let v = ins.check(&Policy::openstack());
        assert_eq!(
            v.last().map(ToString::to_string),
            Some(format!(
                "polyglot: multiple formats detected: qcow2,{}",
                other.name()
            ))
        );
        let mut allowed = Policy::strict().declared(Format::Qcow2);
        allowed.allow_polyglot = true;
        assert_eq!(rules(&ins, allowed), ["format_mismatch"], "{name}");
    }
}

#[test]
fn feature_bits_dirty_and_damaged_headers() {
    let w = Work::new();
    w.img(&["create", "-q", "-f", "qcow2", "q.qcow2", "64M"]);

    // An unknown incompatible bit (20): refused by every preset.
    w.copy("q.qcow2", "incompat.qcow2");
    w.patch("incompat.qcow2", 72, &(1u64 << 20).to_be_bytes());
    let ins = w.inspect("incompat.qcow2");
    assert_eq!(
        ins.qcow2.as_ref().map(|q| q.incompatible.unknown),
        Some(1 << 20)
    );
    let u = vec!["unknown_features"];
    assert_eq!(per_preset(&ins, Format::Qcow2), [u.clone(), u.clone(), u]);

    // Unknown compatible and autoclear bits: only the strict preset refuses them.
    w.copy("q.qcow2", "compat.qcow2");
    w.patch("compat.qcow2", 80, &(1u64 << 40).to_be_bytes());
    w.patch("compat.qcow2", 88, &(1u64 << 9).to_be_bytes());
    let ins = w.inspect("compat.qcow2");
    assert_eq!(
        per_preset(&ins, Format::Qcow2),
        [vec!["unknown_features", "unknown_features"], NONE, NONE]
    );

    // A dirty image left by a crash with lazy refcounts: fine to inspect, no rule broken.
    w.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "64M",
    ]);
    let crashed = Command::new("qemu-io")
        .args(["-c", "write 0 1M", "-c", "abort", "dirty.qcow2"])
        .current_dir(w.dir.path())
        .output()
        .expect("cannot run qemu-io (Debian package qemu-utils, 10.x)");
    assert!(!crashed.status.success());
    let ins = w.inspect("dirty.qcow2");
    assert!(ins.qcow2.as_ref().is_some_and(|q| q.dirty && !q.corrupt));
    assert_eq!(per_preset(&ins, Format::Qcow2), [NONE, NONE, NONE]);

    // Damaged headers: reported, never a failure of inspect.
    for (name, offset, bytes) in [
        ("cb.qcow2", 20u64, 30u32.to_be_bytes().to_vec()),
        ("l1.qcow2", 40, (300u64 << 20).to_be_bytes().to_vec()),
        ("version.qcow2", 4, 7u32.to_be_bytes().to_vec()),
    ] {
        w.copy("q.qcow2", name);
        w.patch(name, offset, &bytes);
        let ins = w.inspect(name);
        let q = ins.qcow2.as_ref().expect("qcow2 facts");
        assert!(!q.problems.is_empty(), "{name}");
        assert!(
            rules(&ins, Policy::strict()).contains(&"invalid_header"),
            "{name}"
        );
    }
    let ins = w.inspect("version.qcow2");
    assert!(ins
        .check(&Policy::openstack())
        .contains(&Violation::UnsupportedVersion(7)));

    // Truncations of a real header, byte by byte through the first 600 bytes.
    let full = fs::read(w.path("q.qcow2")).expect("read");
    for len in 0..600 {
        let ins = inspect(&MemoryStorage::from_bytes(full[..len].to_vec()))
            .expect("in-memory inspection");
        if len >= 4 {
            let q = ins.qcow2.as_ref().expect("qcow2 facts");
            assert!(!q.problems.is_empty(), "truncated to {len}");
            assert!(!ins.check(&Policy::strict()).is_empty());
        }
    }
}

#[test]
fn fifos_are_refused_without_blocking() {
    let w = Work::new();
    let fifo = w.path("fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("running mkfifo");
    assert!(made.success());
    let t = Instant::now();
    assert!(inspect_path(&fifo).is_err());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(inspect_path(&w.path("missing")).is_err());
}

/// `virtual-size` from `qemu-img info --output=json` (with `-f fmt`).
fn qemu_virtual_size(w: &Work, name: &str, fmt: &str) -> u64 {
    let out = w.img(&["info", "--output=json", "-f", fmt, name]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// The streaming inspector, fed `name` in chunks of several sizes, agrees with `inspect`.
fn assert_streaming_agrees(w: &Work, name: &str, ins: &Inspection) {
    let bytes = fs::read(w.path(name)).expect("reading an image");
    for chunk in [512usize, 65536, 1 << 20] {
        let mut r = InspectReader::new(ChunkedReader {
            data: &bytes,
            chunk,
        });
        let mut copy = Vec::new();
        r.read_to_end(&mut copy)
            .expect("reading through the inspector");
        assert!(copy == bytes, "{name}: the reader changed the bytes");
        assert!(r.kept_bytes() <= MAX_KEPT_BYTES);
        assert_eq!(r.inspection(), Some(ins), "{name}, chunks of {chunk}");
    }
}

/// Hands out at most `chunk` bytes per read.
struct ChunkedReader<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for ChunkedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Bochs, cloop and DMG files qemu-img cannot create, with the bytes QEMU's probes look at.
fn hand_made(w: &Work) {
    let mut b = vec![0u8; 1 << 20];
    b[..23].copy_from_slice(b"Bochs Virtual HD Image\0");
    b[32..40].copy_from_slice(b"Redolog\0");
    b[48..56].copy_from_slice(b"Growing\0");
    b[64..68].copy_from_slice(&[0, 0, 2, 0]); // version 2.0, little-endian
    for (off, v) in [(68, 512u32), (72, 512), (76, 512), (80, 4096)] {
        let le: Vec<u8> = v.to_be_bytes().into_iter().rev().collect();
        b[off..off + 4].copy_from_slice(&le);
    }
    b[88..96].copy_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // 1 MiB
    fs::write(w.path("x.bochs"), &b).expect("writing");
    let magic =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let mut c = vec![0u8; 65536];
    c[..magic.len()].copy_from_slice(magic);
    c[128..132].copy_from_slice(&65536u32.to_be_bytes());
    c[132..136].copy_from_slice(&4u32.to_be_bytes());
    fs::write(w.path("x.cloop"), &c).expect("writing");
    let mut d = vec![0u8; 65536];
    d[65536 - 512..65536 - 508].copy_from_slice(b"koly");
    d[65536 - 512 + 0x1ec..65536 - 512 + 0x1f4].copy_from_slice(&2048u64.to_be_bytes());
    fs::write(w.path("koly.img"), &d).expect("writing");
    fs::write(w.path("x.dmg"), &d).expect("writing");
}

#[test]
fn every_format_qemu_probes_is_named_never_raw() {
    let w = Work::new();
    for (fmt, opts) in [
        ("qcow", ""),
        ("qed", ""),
        ("vdi", ""),
        ("vhdx", ""),
        ("vmdk", ""),
        ("vpc", ""),
        ("parallels", ""),
        ("luks", "key-secret=s0,iter-time=10"),
    ] {
        let name = format!("p.{fmt}");
        w.create(name.as_str(), fmt, opts, "4M");
    }
    hand_made(&w);
    for (name, want) in [
        ("p.qcow", Format::Qcow),
        ("p.qed", Format::Qed),
        ("p.vdi", Format::Vdi),
        ("p.vhdx", Format::Vhdx),
        ("p.vmdk", Format::Vmdk),
        ("p.vpc", Format::Vpc),
        ("p.parallels", Format::Parallels),
        ("p.luks", Format::Luks),
        ("x.bochs", Format::Bochs),
        ("x.cloop", Format::Cloop),
        ("x.dmg", Format::Dmg),
        ("koly.img", Format::Dmg),
    ] {
        // qemu-img names each (the koly trailer alone it does not look at: qcow2kit is stricter).
        let qemu = w.qemu_reads_as(name, None);
        if name != "koly.img" {
            assert!(
                qemu.as_deref() == Ok(want.name()) || name == "x.dmg",
                "{name}: qemu-img says {qemu:?}"
            );
        }
        let err = probe_file(&w.path(name)).expect_err(name).to_string();
        assert!(
            err.contains(&format!("image format '{}'", want.name())),
            "{name}: {err}"
        );
        assert_eq!(w.inspect(name).detected, vec![want], "{name}");
    }
}

#[test]
fn benign_images_report_qemus_virtual_size_and_pass() {
    let w = Work::new();
    let made = [
        ("a.qcow2", "qcow2", "", "5G"),
        ("a.vmdk", "vmdk", "", "3M"),
        ("so.vmdk", "vmdk", "subformat=streamOptimized", "3M"),
        ("a.vhdx", "vhdx", "", "1G"),
        ("a.vdi", "vdi", "", "7M"),
        ("dyn.vhd", "vpc", "subformat=dynamic", "16M"),
        ("fixed.vhd", "vpc", "subformat=fixed", "16M"),
        (
            "forced.vhd",
            "vpc",
            "subformat=dynamic,force_size=on",
            "16M",
        ),
        ("a.luks", "luks", "key-secret=s0,iter-time=10", "9M"),
        ("a.qed", "qed", "", "11M"),
        ("a.parallels", "parallels", "", "13M"),
    ];
    for (name, fmt, opts, size) in made {
        w.create(name, fmt, opts, size);
        let ins = w.inspect(name);
        let want = Format::from_name(fmt).expect("format");
        assert_eq!(ins.detected, vec![want], "{name}");
        assert_eq!(
            ins.virtual_size(),
            Some(qemu_virtual_size(&w, name, fmt)),
            "{name}"
        );
        assert!(ins.complete);
        let expect: Vec<&str> = match want {
            Format::Qed | Format::Parallels => vec!["unsupported_format"],
            _ => vec![],
        };
        assert_eq!(
            rules(&ins, Policy::strict().declared(want)),
            expect,
            "{name}"
        );
        assert_eq!(
            rules(&ins, Policy::openstack().declared(want)),
            expect,
            "{name}"
        );
        assert_eq!(
            rules(&ins, Policy::trusted_local().declared(want)),
            NONE,
            "{name}"
        );
        assert_streaming_agrees(&w, name, &ins);
    }
}

/// Writes `text` as the descriptor of a sparse VMDK (at byte 512, NUL-padded to its end).
fn put_descriptor(w: &Work, name: &str, text: &str) {
    let mut area = text.as_bytes().to_vec();
    area.resize(1024, 0);
    w.patch(name, 512, &area);
}

#[test]
fn hostile_corpus_is_refused_with_the_named_rule() {
    let w = Work::new();
    let mk = |name: &str, fmt: &str, opts: &str, size: &str| w.create(name, fmt, opts, size);
    // VMDK: a monolithicFlat descriptor whose extent is /etc/shadow.
    mk("flat.vmdk", "vmdk", "subformat=monolithicFlat", "1M");
    let desc = fs::read_to_string(w.path("flat.vmdk")).expect("descriptor text");
    let hostile = desc.replace("\"flat-flat.vmdk\"", "\"/etc/shadow\"");
    assert_ne!(hostile, desc);
    fs::write(w.path("shadow.vmdk"), hostile).expect("writing");
    // A sparse VMDK whose embedded descriptor names another file.
    mk("s.vmdk", "vmdk", "", "1M");
    w.copy("s.vmdk", "extent.vmdk");
    put_descriptor(
        &w,
        "extent.vmdk",
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\nRW 2048 SPARSE \"extent.vmdk\"\nRW 2048 FLAT \"secret\" 0\n",
    );
    // A sparse VMDK with a parent.
    w.copy("s.vmdk", "parent.vmdk");
    put_descriptor(
        &w,
        "parent.vmdk",
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=2\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"/var/lib/images/base.vmdk\"\n\nRW 2048 SPARSE \"parent.vmdk\"\n",
    );
    // A descriptor line OpenStack does not understand.
    w.copy("s.vmdk", "junk.vmdk");
    put_descriptor(
        &w,
        "junk.vmdk",
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"junk.vmdk\"\nsomething odd\n",
    );
    // A stream-optimized VMDK whose header defers to a footer (grain directory offset all
    // ones), and whose footer names another descriptor; the same with a sound footer passes.
    mk("so.vmdk", "vmdk", "subformat=streamOptimized", "1M");
    let mut so = fs::read(w.path("so.vmdk")).expect("read");
    so[56..64].copy_from_slice(&[0xff; 8]);
    let mut footer = vec![0u8; 1536];
    footer[12] = 3; // footer marker
    footer[512..1024].copy_from_slice(&so[..512]);
    footer[512 + 56..512 + 64].copy_from_slice(&[0x1a, 0, 0, 0, 0, 0, 0, 0]);
    let mut good = so.clone();
    good.extend_from_slice(&footer);
    fs::write(w.path("goodfooter.vmdk"), &good).expect("writing");
    footer[512 + 36] ^= 9; // descriptor size
    so.extend_from_slice(&footer);
    fs::write(w.path("footer.vmdk"), &so).expect("writing");
    // VHDX without its region table.
    mk("a.vhdx", "vhdx", "", "64M");
    w.copy("a.vhdx", "regi.vhdx");
    w.patch("regi.vhdx", 192 << 10, b"XXXX");
    // QED with a backing file.
    mk("base.raw", "raw", "", "1M");
    w.img(&[
        "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "b.qed",
    ]);
    // LUKS version 2 header.
    mk("a.luks", "luks", "key-secret=s0,iter-time=10", "4M");
    w.copy("a.luks", "v2.luks");
    w.patch("v2.luks", 6, &[0, 2]);
    // A protective MBR with a second partition.
    let mut mbr = vec![0u8; 1 << 20];
    mbr[446 + 1..446 + 4].copy_from_slice(&[0, 2, 0]);
    mbr[446 + 4] = 0xee;
    mbr[446 + 8] = 1;
    mbr[462 + 4] = 0x83;
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    mbr[512..520].copy_from_slice(b"EFI PART");
    fs::write(w.path("mbr.raw"), &mbr).expect("writing");
    // A differencing VDI (parent UUID set) and a differencing VHD (disk type 4).
    mk("a.vdi", "vdi", "", "4M");
    w.copy("a.vdi", "diff.vdi");
    w.patch("diff.vdi", 0x1b8, &[0x42; 16]);
    mk("a.vhd", "vpc", "", "4M");
    w.copy("a.vhd", "diff.vhd");
    w.patch("diff.vhd", 60, &4u32.to_be_bytes());
    hand_made(&w);

    for (name, fmt, want) in [
        (
            "shadow.vmdk",
            Format::Vmdk,
            vec!["vmdk_subformat", "vmdk_extent"],
        ),
        ("extent.vmdk", Format::Vmdk, vec!["vmdk_extent"]),
        ("parent.vmdk", Format::Vmdk, vec!["backing_file"]),
        (
            "junk.vmdk",
            Format::Vmdk,
            vec!["vmdk_descriptor", "vmdk_subformat", "vmdk_descriptor"],
        ),
        ("footer.vmdk", Format::Vmdk, vec!["vmdk_footer"]),
        ("goodfooter.vmdk", Format::Vmdk, vec![]),
        ("regi.vhdx", Format::Vhdx, vec!["malformed"]),
        (
            "b.qed",
            Format::Qed,
            vec!["unsupported_format", "backing_file"],
        ),
        ("v2.luks", Format::Luks, vec!["luks_version"]),
        ("mbr.raw", Format::Raw, vec!["partition_table"]),
        ("diff.vdi", Format::Vdi, vec!["backing_file"]),
        ("diff.vhd", Format::Vpc, vec!["backing_file"]),
        ("x.bochs", Format::Bochs, vec!["unsupported_format"]),
        ("x.cloop", Format::Cloop, vec!["unsupported_format"]),
        ("x.dmg", Format::Dmg, vec!["unsupported_format"]),
    ] {
        let ins = w.inspect(name);
        assert_eq!(
            rules(&ins, Policy::openstack().declared(fmt)),
            want,
            "{name}"
        );
        assert_eq!(rules(&ins, Policy::strict().declared(fmt)), want, "{name}");
        assert_streaming_agrees(&w, name, &ins);
    }
    // The /etc/shadow descriptor breaks no rule a trusted local user cares about but its
    // create type is reported.
    let ins = w.inspect("shadow.vmdk");
    assert_eq!(
        ins.facts().and_then(|f| f.subformat.as_deref()),
        Some("monolithicflat")
    );
    assert_eq!(
        rules(&ins, Policy::trusted_local().declared(Format::Vmdk)),
        NONE
    );
}
