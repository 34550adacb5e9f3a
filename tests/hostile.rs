//! A corpus of hostile and damaged qcow2 images.
//!
//! Every case starts from a real image made by `qemu-img` / `qemu-io`, breaks one rule by patching
//! bytes at their documented offsets (layout at the top of `src/format/header.rs`), and checks that
//! qcow2kit refuses it with the exact, named error, in well under a second, without panicking.
//! Cases print `[hostile] <case> | <time> | <error>` to stderr (`--nocapture` shows them).

use flate2::write::DeflateEncoder;
use flate2::Compression;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use qcow2kit::chain::{self, OpenOptions};
use qcow2kit::format::header;
use qcow2kit::io::{FileStorage, MemoryStorage, Storage};
use qcow2kit::Format;
use qcow2kit::{BlockDevice, Corruption, Error, Qcow2Image, Qcow2Options, SnapshotRef};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Every open (and read) of a hostile image must finish within this.
const LIMIT: Duration = Duration::from_secs(1);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Default qemu-img cluster size.
const CS: u64 = 64 * KIB;

// Header field offsets (big-endian).
const VERSION: u64 = 4;
const BACKING_FILE_OFFSET: u64 = 8;
const BACKING_FILE_SIZE: u64 = 16;
const CLUSTER_BITS: u64 = 20;
const SIZE: u64 = 24;
const CRYPT_METHOD: u64 = 32;
const L1_SIZE: u64 = 36;
const L1_TABLE_OFFSET: u64 = 40;
const REFCOUNT_TABLE_OFFSET: u64 = 48;
const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const NB_SNAPSHOTS: u64 = 60;
const SNAPSHOTS_OFFSET: u64 = 64;
const INCOMPATIBLE: u64 = 72;
const REFCOUNT_ORDER: u64 = 96;
const HEADER_LENGTH: u64 = 100;
const COMPRESSION_TYPE: u64 = 104;

// Header extension types.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

// Entry bits.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

// ---------------------------------------------------------------------------------------------
// Building images
// ---------------------------------------------------------------------------------------------

/// Runs a QEMU tool in `dir`; panics (never skips) when it is missing or fails.
fn run_tool(dir: &Path, tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!("{tool} is required by tests/hostile.rs but could not be run ({e}); install qemu-utils")
    });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary directory holding the images of one case.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("create temporary directory"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f qcow2 OPTS NAME SIZE` (run inside the directory, so that backing and
    /// data file names are stored relative).
    fn create(&self, name: &str, opts: &[&str], size: &str) -> PathBuf {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[name, size]);
        run_tool(self.dir.path(), "qemu-img", &args);
        self.path(name)
    }

    fn qemu_img(&self, args: &[&str]) {
        run_tool(self.dir.path(), "qemu-img", args);
    }

    /// Runs qemu-io commands on a qcow2 image.
    fn qemu_io(&self, name: &str, cmds: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(name);
        run_tool(self.dir.path(), "qemu-io", &args);
    }

    /// A 1 MiB image (64 KiB clusters) with guest clusters 0 and 1 allocated.
    fn data_image(&self, name: &str, opts: &[&str]) -> PathBuf {
        let p = self.create(name, opts, "1M");
        self.qemu_io(name, &["write -P 0xab 0 128k"]);
        p
    }

    /// A 1 MiB image with some data and one internal snapshot `s1`.
    fn snapshot_image(&self, name: &str, opts: &[&str]) -> PathBuf {
        let p = self.create(name, opts, "1M");
        self.qemu_io(name, &["write -P 0xab 0 4k"]);
        self.qemu_img(&["snapshot", "-c", "s1", name]);
        p
    }
}

// ---------------------------------------------------------------------------------------------
// Patching bytes
// ---------------------------------------------------------------------------------------------

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open image for patching");
    f.write_all_at(bytes, off).expect("patch image");
}

fn put_u8(p: &Path, off: u64, v: u8) {
    patch(p, off, &[v]);
}

fn put_u16(p: &Path, off: u64, v: u16) {
    patch(p, off, &v.to_be_bytes());
}

fn put_u32(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_be_bytes());
}

fn put_u64(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}

fn get_u32(p: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    fs::File::open(p)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read u32");
    u32::from_be_bytes(b)
}

fn get_u64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(p)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read u64");
    u64::from_be_bytes(b)
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).expect("stat image").len()
}

fn truncate(p: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

/// Writes `bytes` at the end of the file (512-byte aligned) and returns their offset.
fn append(p: &Path, bytes: &[u8]) -> u64 {
    let off = file_len(p).next_multiple_of(512);
    patch(p, off, bytes);
    off
}

/// Big-endian helpers over a byte slice.
fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Offset and length of the header extension `kind` (walking from header_length).
fn find_ext(p: &Path, kind: u32) -> (u64, u32) {
    let b = fs::read(p).expect("read image");
    let mut off = be32(&b, HEADER_LENGTH as usize) as usize;
    loop {
        let (k, len) = (be32(&b, off), be32(&b, off + 4));
        assert_ne!(k, 0, "extension {kind:#x} not found");
        if k == kind {
            return (off as u64, len);
        }
        off += 8 + (len as usize).next_multiple_of(8);
    }
}

/// Host offset of the L2 table that maps guest cluster 0.
fn l2_offset(p: &Path) -> u64 {
    let l1 = get_u64(p, L1_TABLE_OFFSET);
    let e = get_u64(p, l1) & OFFSET_MASK;
    assert_ne!(e, 0, "guest cluster 0 has no L2 table");
    e
}

/// Offset of snapshot table entry 0.
fn snapshot_entry0(p: &Path) -> u64 {
    assert_eq!(get_u32(p, NB_SNAPSHOTS), 1);
    get_u64(p, SNAPSHOTS_OFFSET)
}

/// Stores `name` as the backing file name (at the current backing_file_offset).
fn set_backing_name(p: &Path, name: &str) {
    let off = get_u64(p, BACKING_FILE_OFFSET);
    assert_ne!(off, 0, "image has no backing file name");
    patch(p, off, name.as_bytes());
    put_u32(p, BACKING_FILE_SIZE, name.len() as u32);
}

// ---------------------------------------------------------------------------------------------
// Opening, reading, timing
// ---------------------------------------------------------------------------------------------

fn open_image(p: &Path) -> qcow2kit::Result<Qcow2Image> {
    open_with(p, &View::default())
}

fn open_with(p: &Path, view: &View) -> qcow2kit::Result<Qcow2Image> {
    let storage =
        Arc::new(FileStorage::open(p, false).map_err(|e| Error::io("opening test image", e))?);
    match &view.snapshot {
        Some(s) => Qcow2Image::open_snapshot(storage, s, &view.opts),
        None => Qcow2Image::open(storage, &view.opts),
    }
}

/// How a test opens an image: the active image, or a snapshot view (by name).
#[derive(Default)]
struct View {
    opts: Qcow2Options,
    snapshot: Option<SnapshotRef>,
}

impl From<Qcow2Options> for View {
    fn from(opts: Qcow2Options) -> Self {
        View {
            opts,
            snapshot: None,
        }
    }
}

fn snapshot_opts(name: &str) -> View {
    View {
        snapshot: Some(SnapshotRef::Name(name.into())),
        ..View::default()
    }
}

/// Reads the whole device (1 MiB at a time) when it is small; otherwise walks it extent by extent
/// and reads the start of each (a hostile size may describe petabytes of unallocated space).
fn read_everything(dev: &dyn BlockDevice) -> qcow2kit::Result<()> {
    let size = dev.size();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    if size <= 16 * MIB {
        while off < size {
            let n = (size - off).min(MIB) as usize;
            dev.read_at(&mut buf[..n], off)?;
            off += n as u64;
        }
        return Ok(());
    }
    for _ in 0..4096 {
        if off >= size {
            break;
        }
        let e = dev.block_status(off, size - off)?;
        assert!(
            e.len > 0 && e.len <= size - off,
            "block_status returned a bad extent {e:?}"
        );
        let n = e.len.min(MIB) as usize;
        dev.read_at(&mut buf[..n], off)?;
        off += e.len;
    }
    Ok(())
}

/// Runs `f`, asserting it finishes within [`LIMIT`]; logs the time and the outcome.
fn timed<T, E: std::fmt::Display>(
    case: &str,
    f: impl FnOnce() -> Result<T, E>,
) -> (Result<T, E>, Duration) {
    let t = Instant::now();
    let r = f();
    let el = t.elapsed();
    let outcome = match &r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    eprintln!("[hostile] {case} | {el:.2?} | {outcome}");
    assert!(el < LIMIT, "{case}: took {el:?} (limit {LIMIT:?})");
    (r, el)
}

/// Asserts that opening fails (within the limit) and returns the error.
fn open_fails(case: &str, p: &Path) -> Error {
    match timed(case, || open_image(p)).0 {
        Ok(img) => panic!("{case}: image opened ({img:?}) but must be refused"),
        Err(e) => e,
    }
}

/// Asserts that opening succeeds and reading the whole device fails; returns the error.
fn read_fails(case: &str, p: &Path) -> Error {
    let r = timed(case, || {
        let img = open_image(p).unwrap_or_else(|e| panic!("{case}: open must succeed: {e}"));
        read_everything(&img)
    });
    match r.0 {
        Ok(()) => panic!("{case}: whole device read without error"),
        Err(e) => e,
    }
}

/// Asserts that the image opens and reads completely.
fn opens_and_reads(case: &str, p: &Path, opts: &View) -> Qcow2Image {
    let r = timed(case, || {
        let img = open_with(p, opts)?;
        read_everything(&img)?;
        Ok::<_, Error>(img)
    });
    r.0.unwrap_or_else(|e| panic!("{case}: must open and read: {e} ({e:?})"))
}

fn chain_open(case: &str, p: &Path, opts: &OpenOptions) -> Error {
    match timed(case, || chain::open(p, Format::Qcow2, opts)).0 {
        Ok(_) => panic!("{case}: chain opened but must be refused"),
        Err(e) => e,
    }
}

/// `assert!(matches!(..))` that shows the error it got.
macro_rules! assert_matches {
    ($e:expr, $($pat:tt)+) => {{
        let e = $e;
        assert!(matches!(&e, $($pat)+), "expected {}, got {e:?} ({e})", stringify!($($pat)+));
        e
    }};
}

// ---------------------------------------------------------------------------------------------
// The header
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_header() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    for len in [80u64, 50, 3, 0] {
        truncate(&p, len);
        let e = open_fails(&format!("truncated header ({len} bytes)"), &p);
        assert_matches!(
            e,
            Error::Corrupt(Corruption::Truncated { what: "header", .. })
        );
    }
}

#[test]
fn bad_magic() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    patch(&p, 0, b"QFI\xfa");
    let e = open_fails("bad magic", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadMagic(0x5146_49fa)));
}

#[test]
fn bad_version() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    for v in [1u32, 4] {
        put_u32(&p, VERSION, v);
        let e = open_fails(&format!("version {v}"), &p);
        assert_matches!(e, Error::Corrupt(Corruption::BadField { field: "version", value, .. }) if *value == u64::from(v));
    }
}

#[test]
fn bad_cluster_bits() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    for bits in [8u32, 22] {
        put_u32(&p, CLUSTER_BITS, bits);
        let e = open_fails(&format!("cluster_bits {bits}"), &p);
        assert_matches!(e, Error::Corrupt(Corruption::BadField { field: "cluster_bits", value, .. }) if *value == u64::from(bits));
    }
}

#[test]
fn bad_header_length() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    for (len, what) in [
        (96u32, "header_length < 104"),
        (108, "header_length not a multiple of 8"),
        (CS as u32 + 8, "header_length > cluster size"),
    ] {
        put_u32(&p, HEADER_LENGTH, len);
        let e = open_fails(what, &p);
        assert_matches!(e, Error::Corrupt(Corruption::BadField { field: "header_length", value, .. }) if *value == u64::from(len));
    }
}

#[test]
fn huge_header_extension_length() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    let (off, _) = find_ext(&p, EXT_FEATURE_TABLE);
    put_u32(&p, off + 4, 0xffff_fff0);
    let e = open_fails("huge extension length", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadExtension {
            kind: EXT_FEATURE_TABLE,
            ..
        })
    );
}

#[test]
fn extension_crossing_end_of_cluster_0() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    // An unknown extension filling cluster 0 up to its last 8 bytes, then one whose header fits
    // but whose 16 data bytes would lie in cluster 1 (which the file does hold).
    let first = get_u32(&p, HEADER_LENGTH) as u64;
    put_u32(&p, first, 0x1234_5678);
    put_u32(&p, first + 4, (CS - 8 - (first + 8)) as u32);
    patch(&p, first + 8, &vec![0u8; (CS - 8 - (first + 8)) as usize]);
    put_u32(&p, CS - 8, 0x0bad_cafe);
    put_u32(&p, CS - 4, 16);
    assert!(file_len(&p) > CS + 16);
    let e = open_fails("extension crossing the end of cluster 0", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadExtension {
            kind: 0x0bad_cafe,
            ..
        })
    );
}

#[test]
fn backing_format_extension_too_long() {
    let s = Scratch::new();
    s.create("base.qcow2", &[], "1M");
    let p = s.create(
        "top.qcow2",
        &["-u", "-b", "base.qcow2", "-F", "qcow2"],
        "1M",
    );
    let (off, len) = find_ext(&p, EXT_BACKING_FORMAT);
    assert_eq!(len, 5);
    put_u32(&p, off + 4, 16);
    patch(&p, off + 8, b"qcow2qcow2qcow2q");
    let e = open_fails("backing format extension of 16 bytes", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadExtension {
            kind: EXT_BACKING_FORMAT,
            ..
        })
    );
}

/// Adds an incompatible-feature entry for `bit` to the image's feature-name table.
fn name_incompatible_bit(p: &Path, bit: u8, name: &str) {
    let (off, len) = find_ext(p, EXT_FEATURE_TABLE);
    let mut entry = [0u8; 48];
    entry[0] = 0; // incompatible
    entry[1] = bit;
    entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
    // The new entry replaces the end marker; the zeros after it end the list.
    patch(p, off + 8 + u64::from(len), &entry);
    put_u32(p, off + 4, len + 48);
}

#[test]
fn unknown_incompatible_bits_are_named() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    name_incompatible_bit(&p, 5, "hostile feature five");

    put_u64(&p, INCOMPATIBLE, 1 << 5);
    let e = open_fails("incompatible bit 5 (named in the feature table)", &p);
    let Error::Corrupt(Corruption::UnknownIncompatibleFeatures { bits, names }) = &e else {
        panic!("expected UnknownIncompatibleFeatures, got {e:?}");
    };
    assert_eq!(*bits, 1 << 5);
    assert_eq!(names, &vec!["hostile feature five".to_string()]);
    assert!(e.to_string().contains("hostile feature five"), "{e}");

    put_u64(&p, INCOMPATIBLE, 1 << 63);
    let e = open_fails("incompatible bit 63 (unnamed)", &p);
    let Error::Corrupt(Corruption::UnknownIncompatibleFeatures { bits, names }) = &e else {
        panic!("expected UnknownIncompatibleFeatures, got {e:?}");
    };
    assert_eq!(*bits, 1 << 63);
    assert_eq!(names.len(), 1);
    assert!(names[0].contains("63"), "{names:?}");

    // Known bits alongside are not reported; both unknown ones are, in bit order.
    put_u64(&p, INCOMPATIBLE, 1 << 63 | 1 << 5 | 1);
    let e = open_fails("incompatible bits 0, 5 and 63", &p);
    let Error::Corrupt(Corruption::UnknownIncompatibleFeatures { bits, names }) = &e else {
        panic!("expected UnknownIncompatibleFeatures, got {e:?}");
    };
    assert_eq!(*bits, 1 << 63 | 1 << 5);
    assert_eq!(names.len(), 2);
    assert_eq!(names[0], "hostile feature five");
    assert!(names[1].contains("63"), "{names:?}");
}

#[test]
fn corrupt_bit_is_still_readable_read_only() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    put_u64(&p, INCOMPATIBLE, 1 << 1);
    let img = opens_and_reads("corrupt bit set, read-only", &p, &View::default());
    assert_eq!(img.header().incompatible.bits(), 1 << 1);
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|&x| x == 0xab));
}

#[test]
fn compression_type_rules() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    assert!(get_u32(&p, HEADER_LENGTH) > 104);

    put_u8(&p, COMPRESSION_TYPE, 2);
    let e = open_fails("compression_type 2", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "compression_type",
            value: 2,
            ..
        })
    );

    put_u8(&p, COMPRESSION_TYPE, 1);
    let e = open_fails("compression_type zstd without incompatible bit 3", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "compression_type",
            ..
        })
    );

    put_u8(&p, COMPRESSION_TYPE, 0);
    put_u64(&p, INCOMPATIBLE, 1 << 3);
    let e = open_fails("incompatible bit 3 with zlib", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "compression_type",
            ..
        })
    );

    // A real zstd image with bit 3 cleared.
    let z = s.create("z.qcow2", &["-o", "compression_type=zstd"], "1M");
    assert_eq!(get_u64(&z, INCOMPATIBLE) & 1 << 3, 1 << 3);
    put_u64(&z, INCOMPATIBLE, 0);
    let e = open_fails("zstd image with bit 3 cleared", &z);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "compression_type",
            ..
        })
    );
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &["-o", "cluster_size=4k"], "1M");
    put_u64(&p, INCOMPATIBLE, 1 << 4);
    let e = open_fails("extended L2 with 4 KiB clusters", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "cluster_bits",
            value: 12,
            ..
        })
    );
}

// ---------------------------------------------------------------------------------------------
// The L1 table and the virtual size
// ---------------------------------------------------------------------------------------------

#[test]
fn l1_larger_than_32_mib() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    put_u32(&p, L1_SIZE, (32 * MIB / 8) as u32 + 1);
    let e = open_fails("l1_size over 32 MiB", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "L1 table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );
    // The largest: 2^32 - 1 entries.
    put_u32(&p, L1_SIZE, u32::MAX);
    let e = open_fails("l1_size u32::MAX", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "L1 table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );
}

#[test]
fn l1_too_small_for_virtual_size() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1G");
    assert_eq!(get_u32(&p, L1_SIZE), 2);
    put_u32(&p, L1_SIZE, 1);
    let e = open_fails("l1_size 1 for 1 GiB", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "l1_size",
            value: 1,
            ..
        })
    );
    put_u32(&p, L1_SIZE, 0);
    let e = open_fails("l1_size 0 for 1 GiB", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "l1_size",
            value: 0,
            ..
        })
    );
}

#[test]
fn l1_offset_rules() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    let good = get_u64(&p, L1_TABLE_OFFSET);
    let cases: [(u64, u32, &str, &str); 4] = [
        (
            good + 512,
            1,
            "L1 offset misaligned",
            header::TABLE_OFFSET_INVALID,
        ),
        (
            1 << 40,
            1,
            "L1 offset past the end of the file",
            "lies past the end of the file",
        ),
        (
            0,
            1,
            "L1 offset 0 (overlaps the header)",
            "overlaps the image header",
        ),
        // 8192 entries = 64 KiB from the last cluster-aligned offset: end = 2^64.
        (
            !(CS - 1),
            8192,
            "L1 offset + size overflows u64",
            header::TABLE_OFFSET_INVALID,
        ),
    ];
    for (off, l1_size, what, want) in cases {
        put_u64(&p, L1_TABLE_OFFSET, off);
        put_u32(&p, L1_SIZE, l1_size);
        let e = open_fails(what, &p);
        assert_matches!(e, Error::Corrupt(Corruption::BadTable { table: "L1 table", rule, offset, .. }) if *rule == want && *offset == off);
    }
}

#[test]
fn virtual_size_too_large() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    for size in [1u64 << 63, u64::MAX] {
        put_u64(&p, SIZE, size);
        let e = open_fails(&format!("virtual size {size:#x}"), &p);
        assert_matches!(e, Error::Corrupt(Corruption::BadField { field: "size", value, .. }) if *value == size);
    }
}

// ---------------------------------------------------------------------------------------------
// The refcount table
// ---------------------------------------------------------------------------------------------

#[test]
fn refcount_table_rules() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &[], "1M");
    let good = get_u64(&p, REFCOUNT_TABLE_OFFSET);

    put_u32(&p, REFCOUNT_TABLE_CLUSTERS, 0);
    let e = open_fails("refcount table of 0 clusters", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "refcount_table_clusters",
            value: 0,
            ..
        })
    );

    put_u32(&p, REFCOUNT_TABLE_CLUSTERS, (8 * MIB / CS) as u32 + 1);
    let e = open_fails("refcount table over 8 MiB", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "refcount table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );
    put_u32(&p, REFCOUNT_TABLE_CLUSTERS, u32::MAX);
    let e = open_fails("refcount table of u32::MAX clusters", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "refcount table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );

    put_u32(&p, REFCOUNT_TABLE_CLUSTERS, 1);
    put_u64(&p, REFCOUNT_TABLE_OFFSET, good + 8);
    let e = open_fails("refcount table misaligned", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "refcount table",
            rule: header::TABLE_OFFSET_INVALID,
            ..
        })
    );

    put_u64(&p, REFCOUNT_TABLE_OFFSET, 1 << 40);
    let e = open_fails("refcount table past the end of the file", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "refcount table",
            rule: "lies past the end of the file",
            ..
        })
    );

    put_u64(&p, REFCOUNT_TABLE_OFFSET, good);
    put_u32(&p, REFCOUNT_ORDER, 7);
    let e = open_fails("refcount_order 7", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "refcount_order",
            value: 7,
            ..
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn too_many_snapshots() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    put_u32(&p, NB_SNAPSHOTS, 65_537);
    let e = open_fails("nb_snapshots 65537", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );
    put_u32(&p, NB_SNAPSHOTS, u32::MAX);
    let e = open_fails("nb_snapshots u32::MAX", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: header::TABLE_TOO_LARGE,
            ..
        })
    );
}

#[test]
fn snapshot_table_offset_rules() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    let good = get_u64(&p, SNAPSHOTS_OFFSET);
    put_u64(&p, SNAPSHOTS_OFFSET, good + 8);
    let e = open_fails("snapshot table misaligned", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: header::TABLE_OFFSET_INVALID,
            ..
        })
    );
    put_u64(&p, SNAPSHOTS_OFFSET, 1 << 40);
    let e = open_fails("snapshot table past the end of the file", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: "lies past the end of the file",
            ..
        })
    );
    // 2000 entries of at least 40 bytes from the last cluster-aligned offset: past 2^64.
    put_u64(&p, SNAPSHOTS_OFFSET, !(CS - 1));
    put_u32(&p, NB_SNAPSHOTS, 2000);
    let e = open_fails("snapshot table offset + size overflows", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: header::TABLE_OFFSET_INVALID,
            ..
        })
    );
}

#[test]
fn snapshot_table_bomb() {
    // A tiny file (512-byte clusters, ~7 KiB) claiming 65536 snapshots.
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &["-o", "cluster_size=512"]);
    assert!(file_len(&p) < 16 * KIB);
    put_u32(&p, NB_SNAPSHOTS, 65_536);
    let e = open_fails("snapshot table bomb: 65536 snapshots in a 7 KiB file", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            rule: "lies past the end of the file",
            ..
        })
    );

    // More entries than the rest of the file can hold, even at 40 bytes each.
    let left = file_len(&p).next_multiple_of(512) - get_u64(&p, SNAPSHOTS_OFFSET);
    put_u32(&p, NB_SNAPSHOTS, (left / 40) as u32 + 1);
    let e = open_fails("more snapshots than the file holds", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot table",
            ..
        })
    );
}

#[test]
fn snapshot_entry_past_end_of_file() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    let e0 = snapshot_entry0(&p);
    put_u16(&p, e0 + 12, 0xffff); // id_str_size
    put_u16(&p, e0 + 14, 0xffff); // name_size
    let e = open_fails(
        "snapshot entry whose names run past the end of the file",
        &p,
    );
    assert_matches!(e, Error::Corrupt(Corruption::BadSnapshot { index: 0, .. }));
}

#[test]
fn snapshot_extra_data_too_large() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    let e0 = snapshot_entry0(&p);
    put_u32(&p, e0 + 36, 1025);
    let e = open_fails("snapshot extra_data_size 1025", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadSnapshot {
            index: 0,
            rule: "extra data is larger than 1024 bytes"
        })
    );
    put_u32(&p, e0 + 36, u32::MAX);
    let e = open_fails("snapshot extra_data_size u32::MAX", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadSnapshot { index: 0, .. }));
}

#[test]
fn snapshot_l1_misaligned_only_fails_that_snapshot() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    opens_and_reads("intact snapshot view", &p, &snapshot_opts("s1"));
    let e0 = snapshot_entry0(&p);
    let l1 = get_u64(&p, e0);
    put_u64(&p, e0, l1 + 512);
    opens_and_reads(
        "active image beside a snapshot with a misaligned L1",
        &p,
        &View::default(),
    );
    let e = match timed("snapshot with a misaligned L1", || {
        open_with(&p, &snapshot_opts("s1"))
    })
    .0
    {
        Ok(_) => panic!("snapshot with a misaligned L1 opened"),
        Err(e) => e,
    };
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot L1 table",
            rule: "offset is not cluster-aligned",
            ..
        })
    );
}

#[test]
fn snapshot_l1_too_big_only_fails_that_snapshot() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    let e0 = snapshot_entry0(&p);
    put_u32(&p, e0 + 8, (32 * MIB / 8) as u32 + 1);
    opens_and_reads(
        "active image beside a snapshot with a 32 MiB+ L1",
        &p,
        &View::default(),
    );
    let e = match timed("snapshot with an L1 over 32 MiB", || {
        open_with(&p, &snapshot_opts("s1"))
    })
    .0
    {
        Ok(_) => panic!("snapshot with a huge L1 opened"),
        Err(e) => e,
    };
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot L1 table",
            rule: header::SNAPSHOT_L1_TOO_LARGE,
            ..
        })
    );

    // Within the limit but past the end of the file.
    put_u32(&p, e0 + 8, (32 * MIB / 8) as u32);
    let e = match timed("snapshot with an L1 past the end of the file", || {
        open_with(&p, &snapshot_opts("s1"))
    })
    .0
    {
        Ok(_) => panic!("snapshot with an L1 past the file opened"),
        Err(e) => e,
    };
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadTable {
            table: "snapshot L1 table",
            rule: "lies past the end of the file",
            ..
        })
    );
}

/// A [`Storage`] that counts the bytes read through it.
#[derive(Debug)]
struct CountingStorage {
    inner: FileStorage,
    read: std::sync::atomic::AtomicU64,
}

impl CountingStorage {
    fn open(p: &Path) -> Arc<Self> {
        Arc::new(CountingStorage {
            inner: FileStorage::open(p, false).expect("open image"),
            read: Default::default(),
        })
    }

    fn bytes_read(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Storage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only test storage"))
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only test storage"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only test storage"))
    }
}

#[test]
fn open_reads_in_proportion_to_the_tables_not_the_file() {
    // A snapshot table followed by 200 MiB of (sparse) file: the table holds one entry, so
    // opening must not read up to the 64 MiB table limit.
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    truncate(&p, 200 * MIB);
    let storage = CountingStorage::open(&p);
    let (r, _) = timed("open with a small snapshot table in a 200 MiB file", || {
        Qcow2Image::open(storage.clone(), &Qcow2Options::default())
    });
    let img = r.expect("open");
    assert_eq!(img.snapshots().len(), 1);
    let n = storage.bytes_read();
    eprintln!("[hostile] open read {n} bytes");
    assert!(n <= 4 * MIB, "opening read {n} bytes");

    // A table claiming 65536 snapshots in that file: the entries (zeros) parse, as in QEMU, and
    // reading stays within a few times the 65536 × 40 bytes they claim (reads double: 2.6 MB,
    // then 5.2 MB), plus the 2 MiB header read.
    put_u32(&p, NB_SNAPSHOTS, 65_536);
    let storage = CountingStorage::open(&p);
    let (r, _) = timed("65536 snapshots in a 200 MiB file", || {
        Qcow2Image::open(storage.clone(), &Qcow2Options::default())
    });
    let n = storage.bytes_read();
    eprintln!(
        "[hostile] open read {n} bytes ({:?})",
        r.as_ref().map(|i| i.snapshots().len())
    );
    assert!(
        n <= 2 * MIB + 3 * 65_536 * 40 + 64 * KIB,
        "opening read {n} bytes"
    );
}

#[test]
fn snapshot_disk_size_beyond_its_l1() {
    let s = Scratch::new();
    let p = s.snapshot_image("a.qcow2", &[]);
    let e0 = snapshot_entry0(&p);
    assert!(
        get_u32(&p, e0 + 36) >= 16,
        "qemu-img records the snapshot's disk size"
    );
    for (size, what) in [
        (u64::MAX, "snapshot disk size u64::MAX"),
        (1 << 40, "snapshot disk size 1 TiB with a 1-entry L1"),
    ] {
        put_u64(&p, e0 + 48, size);
        opens_and_reads(&format!("active image beside {what}"), &p, &View::default());
        // Like QEMU (qcow2_snapshot_load_tmp), the recorded disk size is not trusted: the
        // snapshot is read at the image's current size, past its L1 table as unallocated.
        let img = match timed(what, || open_with(&p, &snapshot_opts("s1"))).0 {
            Ok(img) => img,
            Err(e) => panic!("{what}: snapshot refused: {e}"),
        };
        let active = open_with(&p, &View::default()).expect("active image opens");
        assert_eq!(img.size(), active.size(), "{what}: snapshot view size");
        opens_and_reads(
            &format!("snapshot view with {what}"),
            &p,
            &snapshot_opts("s1"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The backing file name
// ---------------------------------------------------------------------------------------------

fn backed_image(s: &Scratch) -> PathBuf {
    s.create("base.qcow2", &[], "1M");
    s.create(
        "top.qcow2",
        &["-u", "-b", "base.qcow2", "-F", "qcow2"],
        "1M",
    )
}

#[test]
fn backing_name_too_long() {
    let s = Scratch::new();
    let p = backed_image(&s);
    put_u32(&p, BACKING_FILE_SIZE, 1024);
    let e = open_fails("backing name of 1024 bytes", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "backing_file_size",
            value: 1024,
            ..
        })
    );
}

#[test]
fn backing_file_offset_beyond_first_cluster() {
    let s = Scratch::new();
    let p = backed_image(&s);
    put_u64(&p, BACKING_FILE_OFFSET, CS + 512);
    let e = open_fails("backing_file_offset beyond cluster 0", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "backing_file_offset",
            ..
        })
    );
}

#[test]
fn backing_name_past_end_of_file() {
    let s = Scratch::new();
    let p = backed_image(&s);
    // The name starts 16 bytes before the end of cluster 0 and is 100 bytes long; the file ends
    // 40 bytes into cluster 1, where the tables now point (QEMU: "Backing file name too long").
    put_u64(&p, BACKING_FILE_OFFSET, CS - 16);
    put_u32(&p, BACKING_FILE_SIZE, 100);
    put_u64(&p, REFCOUNT_TABLE_OFFSET, CS);
    put_u64(&p, L1_TABLE_OFFSET, CS);
    truncate(&p, CS + 40);
    let e = open_fails("backing name running past the end of the file", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "backing_file_size",
            value: 100,
            ..
        })
    );

    // Same name, crossing into cluster 1 of a file that does hold it.
    let s = Scratch::new();
    let p = backed_image(&s);
    put_u64(&p, BACKING_FILE_OFFSET, CS - 16);
    put_u32(&p, BACKING_FILE_SIZE, 100);
    let e = open_fails("backing name running past cluster 0", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "backing_file_size",
            value: 100,
            ..
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile L1/L2 entries, found when reading
// ---------------------------------------------------------------------------------------------

#[test]
fn l1_entry_pointing_to_misaligned_l2() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    let l1 = get_u64(&p, L1_TABLE_OFFSET);
    put_u64(&p, l1, COPIED | (l2_offset(&p) + 512));
    let e = read_fails("L1 entry -> misaligned L2 table", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadEntry {
            table: "L1",
            rule: "L2 table offset is not cluster-aligned",
            ..
        })
    );
}

#[test]
fn l2_table_past_end_of_file() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    let l1 = get_u64(&p, L1_TABLE_OFFSET);
    put_u64(&p, l1, COPIED | 1 << 40);
    let e = read_fails("L2 table past the end of the file", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadEntry {
            table: "L1",
            rule: "L2 table lies past the end of the file",
            ..
        })
    );
}

#[test]
fn l2_entry_with_misaligned_data_offset() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    let l2 = l2_offset(&p);
    let data = get_u64(&p, l2) & OFFSET_MASK;
    put_u64(&p, l2, COPIED | (data + 512));
    let e = read_fails("L2 entry with a misaligned data offset", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadEntry {
            table: "L2",
            rule: "cluster offset is not cluster-aligned",
            guest_offset: 0,
            ..
        })
    );
}

/// An L2 entry for a compressed cluster at `host` spanning `sectors` 512-byte sectors (64 KiB
/// clusters: the sector count sits at bit 54).
fn compressed_entry(host: u64, sectors: u64) -> u64 {
    assert!((1..=256).contains(&sectors));
    COMPRESSED | (sectors - 1) << 54 | host
}

#[test]
fn compressed_descriptor_past_end_of_file() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    let l2 = l2_offset(&p);
    put_u64(&p, l2 + 8, compressed_entry(1 << 40, 1));
    let e = read_fails("compressed descriptor past the end of the file", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadCompressedCluster { host_offset, .. }) if *host_offset == 1 << 40);
}

#[test]
fn compressed_cluster_with_garbage_data() {
    let s = Scratch::new();
    let p = s.data_image("a.qcow2", &[]);
    let l2 = l2_offset(&p);

    // 0xff: a final block of the reserved type 3.
    let off = append(&p, &[0xffu8; 1024]);
    put_u64(&p, l2 + 8, compressed_entry(off, 2));
    let e = read_fails("compressed cluster of garbage", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadCompressedCluster { host_offset, .. }) if *host_offset == off);

    // A valid stream that ends after 100 bytes, well short of a cluster.
    let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
    enc.write_all(&[7u8; 100]).expect("deflate");
    let short = enc.finish().expect("deflate");
    let off = append(&p, &short);
    put_u64(&p, l2 + 8, compressed_entry(off, 1));
    let e = read_fails("compressed cluster that inflates to 100 bytes", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadCompressedCluster { host_offset, .. }) if *host_offset == off);

    // Garbage in a zstd image.
    let z = s.data_image("z.qcow2", &["-o", "compression_type=zstd"]);
    let l2 = l2_offset(&z);
    let off = append(&z, b"this is not a zstd frame at all, just text......");
    put_u64(&z, l2 + 8, compressed_entry(off, 1));
    let e = read_fails("zstd compressed cluster of garbage", &z);
    assert_matches!(e, Error::Corrupt(Corruption::BadCompressedCluster { host_offset, .. }) if *host_offset == off);
}

#[test]
fn extended_l2_bitmap_rules() {
    let s = Scratch::new();
    let p = s.create("a.qcow2", &["-o", "extended_l2=on"], "1M");
    s.qemu_io("a.qcow2", &["write -P 0xab 0 4k"]);
    let l2 = l2_offset(&p);
    let bitmap = get_u64(&p, l2 + 8);
    assert_eq!(bitmap, 0b11, "4 KiB written = subclusters 0 and 1 of 2 KiB");
    opens_and_reads("intact extended L2 image", &p, &View::default());

    put_u64(&p, l2 + 8, bitmap | 1 << 32);
    let e = read_fails("subcluster both allocated and zero", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadEntry {
            table: "L2",
            rule: "subcluster is both allocated and zero",
            ..
        })
    );

    put_u64(&p, l2 + 8, bitmap);
    assert_eq!(get_u64(&p, l2 + 16), 0, "guest cluster 1 is unallocated");
    put_u64(&p, l2 + 24, 1 << 3);
    let e = read_fails("unallocated cluster with allocated subclusters", &p);
    assert_matches!(e, Error::Corrupt(Corruption::BadEntry { table: "L2", rule: "unallocated cluster has allocated subclusters", guest_offset, .. }) if *guest_offset == CS);
}

// ---------------------------------------------------------------------------------------------
// Decompression bombs
// ---------------------------------------------------------------------------------------------

const BOMB_BYTES: usize = 16 << 20;

/// A 1 MiB image whose guest cluster 1 is a compressed cluster that inflates to 16 MiB of
/// zeros (`kind` is "zlib" or "zstd").
fn bomb_image(s: &Scratch, kind: &str) -> PathBuf {
    let zeros = vec![0u8; BOMB_BYTES];
    let (opts, bomb): (&[&str], Vec<u8>) = match kind {
        "zlib" => {
            let mut enc = DeflateEncoder::new(Vec::new(), Compression::best());
            enc.write_all(&zeros).expect("deflate");
            (&[], enc.finish().expect("deflate"))
        }
        "zstd" => (
            &["-o", "compression_type=zstd"],
            zstd::bulk::compress(&zeros, 1).expect("zstd compress"),
        ),
        "zstd-window" => {
            // A frame that declares a 128 MiB window (zstd's default decoder maximum) and no
            // content size, so a streaming decoder may size its buffers by the window.
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd");
            enc.include_contentsize(false).expect("zstd");
            enc.window_log(27).expect("zstd");
            enc.long_distance_matching(true).expect("zstd");
            enc.write_all(&zeros).expect("zstd");
            (
                &["-o", "compression_type=zstd"],
                enc.finish().expect("zstd"),
            )
        }
        _ => unreachable!("bomb kind {kind}"),
    };
    let p = s.data_image("bomb.qcow2", opts);
    let sectors = (bomb.len() as u64).div_ceil(512);
    assert!(
        sectors <= 256,
        "{kind} bomb of {} bytes does not fit a descriptor",
        bomb.len()
    );
    let off = append(&p, &bomb);
    put_u64(&p, l2_offset(&p) + 8, compressed_entry(off, sectors));
    p
}

fn check_bomb(case: &str, p: &Path) {
    let img = opens_and_reads(case, p, &View::default());
    let mut b = vec![1u8; CS as usize];
    img.read_at(&mut b, CS).expect("read the bomb cluster");
    assert!(
        b.iter().all(|&x| x == 0),
        "{case}: cluster 1 must read as zeros"
    );
    img.read_at(&mut b, 0).expect("read cluster 0");
    assert!(
        b.iter().all(|&x| x == 0xab),
        "{case}: cluster 0 must be intact"
    );
    // A read that starts inside the bomb cluster.
    let mut part = vec![1u8; 1000];
    img.read_at(&mut part, CS + 12_345).expect("partial read");
    assert!(part.iter().all(|&x| x == 0));
}

#[test]
fn decompression_bomb_zlib() {
    let s = Scratch::new();
    let p = bomb_image(&s, "zlib");
    check_bomb("zlib bomb: 16 MiB of zeros in one compressed cluster", &p);
}

#[test]
fn decompression_bomb_zstd() {
    let s = Scratch::new();
    let p = bomb_image(&s, "zstd");
    check_bomb("zstd bomb: 16 MiB of zeros in one compressed cluster", &p);
}

const BOMB_CHILD_ENV: &str = "QCOW2KIT_HOSTILE_BOMB_IMAGE";

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Measures memory in a child process (one test, one thread), so other tests don't disturb it.
#[test]
fn decompression_bomb_memory_is_bounded() {
    if proc_status_kib("VmHWM:").is_none() {
        panic!("/proc/self/status has no VmHWM: cannot measure peak memory here");
    }
    for kind in ["zlib", "zstd", "zstd-window"] {
        let s = Scratch::new();
        let p = bomb_image(&s, kind);
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(exe)
            .args([
                "--exact",
                "bomb_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(BOMB_CHILD_ENV, &p)
            .output()
            .expect("run the test binary as a child");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "[hostile] {kind} bomb child: {}",
            text.lines()
                .filter(|l| l.contains("[bomb]"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert!(out.status.success(), "{kind} bomb: child failed:\n{text}");
        assert!(
            text.contains("[bomb] measured"),
            "{kind} bomb: child did not run:\n{text}"
        );
    }
}

/// Child half of [`decompression_bomb_memory_is_bounded`]; does nothing unless that test runs it.
#[test]
fn bomb_child_process() {
    let Some(p) = std::env::var_os(BOMB_CHILD_ENV) else {
        return;
    };
    let p = PathBuf::from(p);
    let before = proc_status_kib("VmRSS:").expect("VmRSS");
    // Reset the peak to the current RSS (Linux ≥ 4.0); without it, the peak is since start-up.
    let reset = fs::write("/proc/self/clear_refs", "5").is_ok();
    let img = open_image(&p).expect("open bomb image");
    read_everything(&img).expect("read bomb image");
    let peak = proc_status_kib("VmHWM:").expect("VmHWM");
    let grown = peak.saturating_sub(before);
    println!("[bomb] measured: rss before {before} KiB, peak {peak} KiB, growth {grown} KiB (reset {reset})");
    // One cluster of output, a 1 MiB read buffer, the 2 MiB header read, an L2 slice, decoder
    // state: a few MiB. Inflating the bomb would add 16 MiB.
    assert!(
        grown < 8 * 1024,
        "peak memory grew by {grown} KiB while reading a bomb"
    );
}

// ---------------------------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------------------------

#[test]
fn encrypted_images_need_a_key() {
    let s = Scratch::new();
    let p = s.data_image("aes.qcow2", &[]);
    put_u32(&p, CRYPT_METHOD, 1);
    let e = open_fails("crypt_method 1 (AES)", &p);
    assert_matches!(e, Error::EncryptedNoKey { method: "aes" });

    let p = s.create(
        "luks.qcow2",
        &[
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ],
        "1M",
    );
    let e = open_fails("LUKS", &p);
    assert_matches!(e, Error::EncryptedNoKey { method: "luks" });

    put_u32(&p, CRYPT_METHOD, 3);
    let e = open_fails("crypt_method 3", &p);
    assert_matches!(
        e,
        Error::Corrupt(Corruption::BadField {
            field: "crypt_method",
            value: 3,
            ..
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Backing chains and external files
// ---------------------------------------------------------------------------------------------

#[test]
fn backing_loop_self() {
    let s = Scratch::new();
    s.create(
        "self.qcow2",
        &["-u", "-b", "xxxx.qcow2", "-F", "qcow2"],
        "1M",
    );
    let p = s.path("self.qcow2");
    set_backing_name(&p, "self.qcow2");
    let e = chain_open(
        "image naming itself as its backing file",
        &p,
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingLoop(_));
    // Absolute name, and a probed format (no backing format extension is consulted first).
    set_backing_name(&p, p.to_str().expect("utf-8 temp path"));
    let e = chain_open(
        "image naming itself by absolute path",
        &p,
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingLoop(_));
}

#[test]
fn backing_loop_two_images() {
    let s = Scratch::new();
    let a = s.create("a.qcow2", &["-u", "-b", "b.qcow2", "-F", "qcow2"], "1M");
    s.create("b.qcow2", &["-u", "-b", "a.qcow2", "-F", "qcow2"], "1M");
    let e = chain_open("a -> b -> a", &a, &OpenOptions::qemu_compatible());
    assert_matches!(e, Error::BackingLoop(_));
}

#[test]
fn backing_loop_through_links() {
    let s = Scratch::new();
    let a = s.create("a.qcow2", &["-u", "-b", "link.qcow2", "-F", "qcow2"], "1M");
    std::os::unix::fs::symlink("a.qcow2", s.path("link.qcow2")).expect("symlink");
    let e = chain_open(
        "loop through a symlink",
        &a,
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingLoop(_));

    let s = Scratch::new();
    let a = s.create("a.qcow2", &["-u", "-b", "hard.qcow2", "-F", "qcow2"], "1M");
    fs::hard_link(&a, s.path("hard.qcow2")).expect("hard link");
    let e = chain_open(
        "loop through a hard link",
        &a,
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingLoop(_));

    // a -> link(b) -> a: the loop closes on the second layer.
    let s = Scratch::new();
    let a = s.create("a.qcow2", &["-u", "-b", "lb.qcow2", "-F", "qcow2"], "1M");
    s.create("b.qcow2", &["-u", "-b", "a.qcow2", "-F", "qcow2"], "1M");
    std::os::unix::fs::symlink(s.path("b.qcow2"), s.path("lb.qcow2")).expect("symlink");
    let e = chain_open(
        "a -> symlink to b -> a",
        &a,
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingLoop(_));
}

#[test]
fn backing_chain_depth_limit() {
    let s = Scratch::new();
    s.create("img0.qcow2", &[], "1M");
    for i in 1..18 {
        let b = format!("img{}.qcow2", i - 1);
        s.create(
            &format!("img{i}.qcow2"),
            &["-u", "-b", &b, "-F", "qcow2"],
            "1M",
        );
    }
    // 17 images: 16 backing layers, the limit.
    let p = s.path("img16.qcow2");
    let r = timed("chain of 17 images", || {
        chain::open(&p, Format::Qcow2, &OpenOptions::qemu_compatible()).map(|_| ())
    });
    r.0.expect("a chain of 16 backing layers opens");
    let e = chain_open(
        "chain of 18 images",
        &s.path("img17.qcow2"),
        &OpenOptions::qemu_compatible(),
    );
    assert_matches!(e, Error::BackingTooDeep(16));
}

/// Runs `chain::open` on another thread, failing (instead of hanging the suite) if it blocks.
fn chain_open_no_hang(case: &str, p: &Path) -> Error {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = p.to_path_buf();
    let t = Instant::now();
    std::thread::spawn(move || {
        let r = chain::open(&path, Format::Qcow2, &OpenOptions::qemu_compatible());
        let _ = tx.send(r.map(|_| ()));
    });
    let r = rx
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("{case}: chain::open is still blocked after {LIMIT:?}"));
    let el = t.elapsed();
    eprintln!(
        "[hostile] {case} | {el:.2?} | {}",
        r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())
    );
    r.err()
        .map(Error::into_innermost)
        .unwrap_or_else(|| panic!("{case}: chain opened but must be refused"))
}

#[test]
fn backing_file_that_is_not_a_regular_file() {
    // Opening a FIFO for reading blocks until a writer appears: a hostile image naming one as
    // its backing (or data) file must be refused before it is opened, not hang.
    let s = Scratch::new();
    run_tool(s.dir.path(), "mkfifo", &["fifo"]);
    let p = s.create("a.qcow2", &["-u", "-b", "fifo", "-F", "raw"], "1M");
    let e = chain_open_no_hang("backing file is a FIFO", &p);
    assert_matches!(e, Error::Unsupported(m) if m.contains("not a regular file"));

    let p = s.create("b.qcow2", &["-u", "-b", "fifo", "-F", "qcow2"], "1M");
    let e = chain_open_no_hang("qcow2 backing file is a FIFO", &p);
    assert_matches!(e, Error::Unsupported(m) if m.contains("not a regular file"));

    // Unknown format: probing would read it.
    let p = s.create("c.qcow2", &["-u", "-b", "fifo", "-F", "raw"], "1M");
    let (off, _) = find_ext(&p, EXT_BACKING_FORMAT);
    put_u32(&p, off, 0x1234_5678); // no longer a backing format extension
    let e = chain_open_no_hang("FIFO backing file with a probed format", &p);
    assert_matches!(e, Error::Unsupported(m) if m.contains("not a regular file"));

    fs::create_dir(s.path("dir")).expect("mkdir");
    let p = s.create("d.qcow2", &["-u", "-b", "dir", "-F", "raw"], "1M");
    let e = chain_open_no_hang("backing file is a directory", &p);
    assert_matches!(e, Error::Unsupported(m) if m.contains("not a regular file"));

    // An external data file that is a FIFO.
    let p = s.create("e.qcow2", &["-o", "data_file=data.raw"], "1M");
    fs::remove_file(s.path("data.raw")).expect("rm data file");
    run_tool(s.dir.path(), "mkfifo", &["data.raw"]);
    let e = chain_open_no_hang("data file is a FIFO", &p);
    assert_matches!(e, Error::Unsupported(m) if m.contains("not a regular file"));
}

#[test]
fn default_policy_denies_external_files() {
    let s = Scratch::new();
    let p = backed_image(&s);
    let e = chain_open(
        "backing file under the default policy",
        &p,
        &OpenOptions::default(),
    );
    assert_matches!(e, Error::ExternalFileDenied { kind: "backing", name } if name == "base.qcow2");

    let p = s.create("d.qcow2", &["-o", "data_file=d.raw"], "1M");
    let e = chain_open(
        "external data file under the default policy",
        &p,
        &OpenOptions::default(),
    );
    assert_matches!(e, Error::ExternalFileDenied { kind: "data", name } if name == "d.raw");
}

// ---------------------------------------------------------------------------------------------
// Random damage
// ---------------------------------------------------------------------------------------------

/// A pristine image and the byte ranges worth damaging.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    /// Header (first 512 bytes), L1 table, L2 tables, snapshot table.
    regions: Vec<(u64, u64)>,
}

fn base_image(s: &Scratch, name: &'static str, opts: &[&str], io: &[&str], snapshot: bool) -> Base {
    let p = s.create(name, opts, "8M");
    s.qemu_io(name, io);
    if snapshot {
        s.qemu_img(&["snapshot", "-c", "s1", name]);
        // Diverge from the snapshot so that both L1 tables matter.
        s.qemu_io(name, &["write -P 0x5a 0 8k"]);
    }
    let bytes = fs::read(&p).expect("read base image");
    let cs = 1u64 << be32(&bytes, CLUSTER_BITS as usize);
    let l1 = be64(&bytes, L1_TABLE_OFFSET as usize);
    let l1_size = u64::from(be32(&bytes, L1_SIZE as usize));
    let mut regions = vec![(0, 512), (l1, l1_size * 8)];
    for i in 0..l1_size {
        let l2 = be64(&bytes, (l1 + i * 8) as usize) & OFFSET_MASK;
        if l2 != 0 {
            regions.push((l2, cs));
        }
    }
    if be32(&bytes, NB_SNAPSHOTS as usize) > 0 {
        regions.push((be64(&bytes, SNAPSHOTS_OFFSET as usize), 512));
    }
    Base {
        name,
        bytes,
        regions,
    }
}

/// A short name for an outcome of [`open_damaged`], for the summary.
fn outcome_kind(r: &qcow2kit::Result<()>) -> String {
    let cut = |s: String| {
        s.split(['(', ' ', '{'])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    match r {
        Ok(()) => "ok".into(),
        Err(Error::Corrupt(c)) => match c {
            Corruption::BadField { field, .. } => format!("BadField {field}"),
            Corruption::BadTable { table, .. } => format!("BadTable {table}"),
            Corruption::BadEntry { table, rule, .. } => format!("BadEntry {table}: {rule}"),
            other => cut(format!("{other:?}")),
        },
        Err(e) => cut(format!("{e:?}")),
    }
}

/// Opens the damaged bytes and reads everything (active image, then each snapshot).
fn open_damaged(bytes: Vec<u8>) -> qcow2kit::Result<()> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    let img = Qcow2Image::open(storage.clone(), &Qcow2Options::default())?;
    read_everything(&img)?;
    for snap in img.snapshots().iter().take(4) {
        let id = SnapshotRef::Id(snap.id.clone());
        if let Ok(view) = Qcow2Image::open_snapshot(storage.clone(), &id, &Qcow2Options::default())
        {
            let _ = read_everything(&view);
        }
    }
    Ok(())
}

#[test]
fn random_damage_never_panics() {
    let s = Scratch::new();
    let bases = [
        base_image(
            &s,
            "std.qcow2",
            &["-o", "cluster_size=4k"],
            &[
                "write -P 0xab 0 64k",
                "write -c -P 0xcd 1M 4k",
                "write -c -P 0xce 1028k 4k",
                "write -z 2M 64k",
                "write -P 0x11 6M 4k",
            ],
            true,
        ),
        base_image(
            &s,
            "ext.qcow2",
            &["-o", "extended_l2=on,cluster_size=64k"],
            &[
                "write -P 0xab 0 4k",
                "write -z 64k 8k",
                "write -c -P 0x33 1M 64k",
            ],
            false,
        ),
        base_image(
            &s,
            "zstd.qcow2",
            &["-o", "compression_type=zstd,cluster_size=16k"],
            &["write -c -P 0x44 0 64k", "write -P 0x55 1M 16k"],
            false,
        ),
    ];
    for b in &bases {
        open_damaged(b.bytes.clone()).unwrap_or_else(|e| panic!("pristine {} fails: {e}", b.name));
    }
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let outcomes = std::cell::RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    // QCOW2KIT_HOSTILE_CASES=N runs more cases (for a longer hunt).
    let cases = std::env::var("QCOW2KIT_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let cases = cases.unwrap_or(500);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let damage = (
        0..bases.len(),
        prop::collection::vec((any::<u32>(), any::<u32>(), 1u8..), 1..8),
    );
    runner
        .run(&damage, |(which, flips)| {
            let base = &bases[which];
            let mut bytes = base.bytes.clone();
            for (r, pos, xor) in &flips {
                let (start, len) = base.regions[*r as usize % base.regions.len()];
                let i = (start + u64::from(*pos) % len) as usize;
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= xor;
                }
            }
            let t = Instant::now();
            let r = open_damaged(bytes);
            let el = t.elapsed();
            *outcomes.borrow_mut().entry(outcome_kind(&r)).or_default() += 1;
            slowest.set(slowest.get().max(el));
            if el >= LIMIT {
                return Err(TestCaseError::fail(format!(
                    "{}: {flips:?} took {el:?}",
                    base.name
                )));
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("random damage: {e}"));
    eprintln!(
        "[hostile] random damage ({cases} cases) | slowest {:.2?} | no panic; outcomes {:?}",
        slowest.get(),
        outcomes.borrow()
    );
}
