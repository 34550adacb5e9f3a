//! Writes on damaged or hostile images, from the attacker's side: refcounts that call metadata
//! free, entries that point into metadata, misaligned refcount blocks and entries, oversized
//! compressed descriptors. Each case starts from an image made by qemu-img / qemu-io, damages it
//! the way a hostile guest or a bad disk would, then writes through qcow2kit. Afterwards:
//!
//! - the write was refused with a corruption error (or, where QEMU only reports and leaks, it
//!   went elsewhere);
//! - every byte of the file is what it was, except the corrupt bit (incompatible bit 1), which
//!   is set where QEMU sets it: the header and every metadata structure are intact;
//! - `qemu-img check` finds nothing it did not find before;
//! - a writable open is refused until `qemu-img check -r all` clears the bit.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::chain::{self, OpenOptions};
use qcow2kit::engine::{CorruptionEvent, CorruptionReporter};
use qcow2kit::Format;
use qcow2kit::{Corruption, Error};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use write_helpers::{qemu_img, qemu_io, scratch, tool, QEMU_IMG};

const CS: u64 = 65536;
/// Layout of `qemu-img create -f qcow2 t.qcow2 64M` after one written cluster at guest 0.
const REFTABLE: u64 = CS;
const REFBLOCK: u64 = 2 * CS;
const L1: u64 = 3 * CS;
const L2: u64 = 4 * CS;
const DATA: u64 = 5 * CS;
/// Byte of the header holding the corrupt bit (incompatible features are bytes 72..80).
const CORRUPT_BYTE: usize = 79;

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening image to damage it");
    f.write_all_at(bytes, offset).expect("damaging image");
}

fn peek_u64(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(path)
        .expect("opening image")
        .read_exact_at(&mut b, offset)
        .expect("reading image");
    u64::from_be_bytes(b)
}

/// `qemu-img create … 64M` and one cluster written at guest 0 (extra `-o` options appended).
fn base_image(dir: &Path, opts: &str) -> std::path::PathBuf {
    written_image(dir, opts, "64M", "write -P 0x11 0 64k")
}

/// `qemu-img create -f qcow2 [-o opts] t.qcow2 size`, then `write` through qemu-io.
fn written_image(dir: &Path, opts: &str, size: &str, write: &str) -> std::path::PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["t.qcow2", size]);
    qemu_img(&args, dir);
    qemu_io(&["-c", write, "t.qcow2"], dir);
    dir.join("t.qcow2")
}

/// The errors and leaks `qemu-img check` reports (on stderr), one per line; a check that
/// could not run at all (exit 1) is one finding, its message.
fn check_findings(dir: &Path) -> BTreeSet<String> {
    let o = tool(QEMU_IMG, &["check", "-f", "qcow2", "t.qcow2"], dir);
    assert!(matches!(o.code, 0..=3), "qemu-img check crashed: {o}");
    if o.code == 1 {
        return BTreeSet::from([format!("check failed: {}", o.stderr.trim())]);
    }
    o.stderr
        .lines()
        .filter(|l| l.starts_with("ERROR") || l.starts_with("Leaked"))
        .map(str::to_string)
        .collect()
}

/// Opens the image writable through the chain API, collecting corruption events.
fn open_rw(path: &Path) -> (chain::Opened, Arc<Mutex<Vec<CorruptionEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut opts = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    opts.qcow2.on_corruption = Some(CorruptionReporter::new(move |e| {
        sink.lock().expect("event list").push(e.clone())
    }));
    let img = chain::open(path, Format::Qcow2, &opts)
        .unwrap_or_else(|e| panic!("opening {} writable: {e}", path.display()));
    (img, events)
}

/// Runs `act` on the damaged image at `dir/t.qcow2` and judges the result: the request fails
/// with an inconsistency naming `expect`, the file is unchanged but for the corrupt bit, a fatal
/// event was reported, `qemu-img check` finds nothing new, and writable opens are refused until
/// `qemu-img check -r all`.
fn assert_refused(
    dir: &Path,
    what: &str,
    expect: &str,
    act: impl FnOnce(&chain::Opened) -> qcow2kit::Result<()>,
) {
    let path = dir.join("t.qcow2");
    let before = fs::read(&path).expect("reading image");
    let findings = check_findings(dir);
    let (img, events) = open_rw(&path);
    let r = act(&img);
    match &r {
        Err(Error::Corrupt(Corruption::Inconsistent(m))) if m.contains(expect) => {}
        other => panic!("{what}: expected a refusal naming '{expect}', got {other:?}"),
    }
    // Every later write is refused too.
    assert!(
        img.device.write_at(&[0u8; 512], 32 << 20).is_err(),
        "{what}: a write after the corruption was accepted"
    );
    drop(img);
    let ev = events.lock().expect("event list").clone();
    assert!(
        ev.iter().any(|e| e.fatal && e.message.contains(expect)),
        "{what}: no fatal event naming '{expect}': {ev:?}"
    );

    let after = fs::read(&path).expect("reading image");
    assert_eq!(after.len(), before.len(), "{what}: the file changed size");
    let changed: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    assert_eq!(
        changed,
        vec![CORRUPT_BYTE],
        "{what}: bytes other than the corrupt bit changed (first {:?})",
        &changed[..changed.len().min(8)]
    );
    assert_eq!(
        after[CORRUPT_BYTE],
        before[CORRUPT_BYTE] | 2,
        "{what}: corrupt bit"
    );

    let now = check_findings(dir);
    assert!(
        now.is_subset(&findings),
        "{what}: qemu-img check finds new problems: {:?}",
        now.difference(&findings).collect::<Vec<_>>()
    );
    let mut opts = OpenOptions::qemu_compatible();
    opts.writable = true;
    match chain::open(&path, Format::Qcow2, &opts) {
        Err(Error::Corrupt(Corruption::MarkedCorrupt)) => {}
        other => panic!(
            "{what}: writable open of a corrupt image: {:?}",
            other.map(|_| ())
        ),
    }
    // qemu-img agrees, and its repair clears the bit.
    let o = tool("/usr/bin/qemu-io", &["-c", "write 0 512", "t.qcow2"], dir);
    assert!(
        o.stderr
            .contains("Image is corrupt; cannot be opened read/write"),
        "{what}: qemu-io opened the marked image writable: {o}"
    );
    // Where the repair leaves the image clean, the bit is gone and writes are accepted again.
    let repaired = tool(QEMU_IMG, &["check", "-q", "-r", "all", "t.qcow2"], dir);
    let reopened = chain::open(&path, Format::Qcow2, &opts);
    assert_eq!(
        repaired.code == 0,
        reopened.is_ok(),
        "{what}: after qemu-img check -r all ({repaired}), writable open: {:?}",
        reopened.map(|_| ())
    );
}

fn write_at(
    offset: u64,
    len: usize,
    byte: u8,
) -> impl FnOnce(&chain::Opened) -> qcow2kit::Result<()> {
    move |img| img.device.write_at(&vec![byte; len], offset)
}

/// Finding 1: the header's refcount is 0, so the allocator would hand out cluster 0.
#[test]
fn header_refcount_zero() {
    let d = scratch();
    base_image(d.path(), "");
    poke(&d.path().join("t.qcow2"), REFBLOCK, &[0, 0]);
    assert_refused(
        d.path(),
        "header refcount 0",
        "overlaps with qcow2_header",
        write_at(CS, 65536, 0xcd),
    );
}

/// Finding 1, second form: a whole refcount block zeroed (every cluster looks free).
#[test]
fn refcount_block_zeroed() {
    let d = scratch();
    base_image(d.path(), "");
    poke(&d.path().join("t.qcow2"), REFBLOCK, &vec![0u8; CS as usize]);
    assert_refused(
        d.path(),
        "refcount block zeroed",
        "overlaps with qcow2_header",
        write_at(9 << 20, 65536, 0xcd),
    );
}

/// Finding 2, the exploit: the guest writes a qcow2 header naming a host file as a raw backing
/// file, hoping it lands on the image's header. It must never do so, and no open of the image
/// afterwards may read a byte of the host file.
#[test]
fn guest_written_header_exposes_no_host_file() {
    let d = scratch();
    let path = base_image(d.path(), "");
    let secret = d.path().join("secret.txt");
    let marker = b"HOST-SECRET-0123456789-do-not-leak";
    fs::write(&secret, marker.repeat(2000)).expect("writing secret");
    // A complete v3 header naming the secret as a raw backing file.
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().expect("utf-8 path"),
            "-F",
            "raw",
            "evil.qcow2",
            "64M",
        ],
        d.path(),
    );
    let evil = fs::read(d.path().join("evil.qcow2")).expect("reading crafted header");
    let mut payload = evil[..CS as usize].to_vec();
    payload.resize(CS as usize, 0);
    poke(&path, REFBLOCK, &[0, 0]);
    let (img, _) = open_rw(&path);
    // Every guest cluster gets the payload: whichever the allocator would place at offset 0.
    for g in 1..8u64 {
        let _ = img.device.write_at(&payload, g * CS);
    }
    let _ = img.device.flush();
    drop(img);
    assert_eq!(
        peek_u64(&path, 0) >> 32,
        0x5146_49fb,
        "header magic destroyed"
    );
    let img = chain::open(&path, Format::Qcow2, &OpenOptions::qemu_compatible())
        .expect("reopening read-only");
    assert!(
        img.device.backing().is_none(),
        "the image gained a backing file"
    );
    let mut all = vec![0u8; img.device.size() as usize];
    img.device.read_at(&mut all, 0).expect("reading guest");
    assert!(
        !all.windows(marker.len()).any(|w| w == marker),
        "the guest reads the host file"
    );
    let info = tool(QEMU_IMG, &["info", "t.qcow2"], d.path());
    assert!(
        !info.stdout.contains("secret"),
        "qemu-img sees a backing file: {info}"
    );
}

/// Finding 3: the cluster of one metadata structure counted 0; a write that allocates must not
/// land on it.
#[test]
fn metadata_clusters_with_refcount_zero() {
    for (cluster, name) in [
        (1u64, "refcount table"),
        (2, "refcount block"),
        (3, "active L1 table"),
        (4, "active L2 table"),
    ] {
        let d = scratch();
        base_image(d.path(), "");
        // 16-bit refcounts: entry `cluster` of the first block.
        poke(&d.path().join("t.qcow2"), REFBLOCK + cluster * 2, &[0, 0]);
        assert_refused(
            d.path(),
            &format!("{name} refcount 0"),
            &format!("overlaps with {name}"),
            write_at(CS, 4096, 0xcd),
        );
    }
}

/// Finding 4: a refcount-table entry of 0, misaligned, or pointing into the refcount table
/// (iotest 305), and the header's count zeroed inside the block.
#[test]
fn damaged_refcount_table_entries() {
    let cases: [(&str, u64, Vec<u8>, &str); 4] = [
        (
            "reftable entry 0 zero",
            REFTABLE,
            vec![0; 8],
            "overlaps with qcow2_header",
        ),
        (
            "reftable entry 0 misaligned",
            REFTABLE,
            0x22a00u64.to_be_bytes().to_vec(),
            "Refblock offset 0x22a00 unaligned (reftable index: 0)",
        ),
        (
            "reftable entry 0 points at the refcount table",
            REFTABLE,
            REFTABLE.to_be_bytes().to_vec(),
            "Preventing invalid write on metadata",
        ),
        (
            "first refcounts zeroed",
            REFBLOCK,
            vec![0; 8],
            "overlaps with qcow2_header",
        ),
    ];
    for (what, at, bytes, expect) in cases {
        let d = scratch();
        base_image(d.path(), "");
        poke(&d.path().join("t.qcow2"), at, &bytes);
        assert_refused(d.path(), what, expect, |img| {
            img.device.write_at(&[0xcd; 4096], CS)?;
            img.device.flush()
        });
    }
}

/// The L2 entry of guest cluster 0 of `path` (64 KiB clusters, one L2 table at `L2`).
fn set_l2_entry(path: &Path, index: u64, entry: u64) {
    poke(path, L2 + index * 8, &entry.to_be_bytes());
}

/// Finding 5: a compressed cluster whose descriptor points at host offset 0. Replacing it would
/// free the header's cluster.
#[test]
fn compressed_descriptor_at_header() {
    for compressed_write in [false, true] {
        let d = scratch();
        let path = base_image(d.path(), "");
        qemu_io(&["-c", "write -c -P 0x22 64k 64k", "t.qcow2"], d.path());
        let e = peek_u64(&path, L2 + 8);
        assert_ne!(e & (1 << 62), 0, "cluster 1 is not compressed");
        let x = 62 - (16 - 8);
        let sectors = e & !((1u64 << x) - 1);
        set_l2_entry(&path, 1, sectors);
        let what = format!("compressed descriptor at 0, write -c {compressed_write}");
        assert_refused(d.path(), &what, "overlaps with qcow2_header", move |img| {
            if compressed_write {
                let q = img.qcow2.as_ref().expect("qcow2 image");
                q.write_compressed(CS, &[0xcd; 65536])
            } else {
                img.device.write_at(&[0xcd; 65536], CS)
            }
        });
    }
}

/// iotest 305: 1 KiB clusters, 64-bit refcounts, a refcount-table entry pointing into the
/// table itself: refcounts must never be written into the table.
#[test]
fn refcount_block_inside_refcount_table() {
    let d = scratch();
    let path = written_image(
        d.path(),
        "cluster_size=1k,refcount_bits=64",
        "64M",
        "write 0 64k",
    );
    let reftable = peek_u64(&path, 48);
    poke(&path, reftable, &reftable.to_be_bytes());
    assert_refused(
        d.path(),
        "refblock inside the reftable",
        "Preventing invalid write on metadata",
        |img| {
            img.device.write_at(&[0xcd; 4096], 1 << 20)?;
            img.device.flush()
        },
    );
}

/// Finding 6: the L1 entry points at the refcount table, so "L2 entries" would be written over
/// refcount-table entries.
#[test]
fn l1_entry_pointing_at_refcount_table() {
    let d = scratch();
    let path = base_image(d.path(), "");
    poke(&path, L1, &((1u64 << 63) | REFTABLE).to_be_bytes());
    assert_refused(
        d.path(),
        "L1 entry at the refcount table",
        "Preventing invalid",
        |img| {
            img.device.write_at(&[0xcd; 65536], 0)?;
            img.device.flush()
        },
    );
}

/// Finding 7: an L2 entry pointing into the second cluster of a snapshot table that spans
/// several clusters.
#[test]
fn l2_entry_into_second_snapshot_table_cluster() {
    let d = scratch();
    let path = written_image(d.path(), "cluster_size=512", "1M", "write -P 0x11 0 512");
    for i in 0..24 {
        qemu_img(
            &[
                "snapshot",
                "-c",
                &format!("snapshot-number-{i:02}"),
                "t.qcow2",
            ],
            d.path(),
        );
    }
    let snapshots = peek_u64(&path, 64);
    let l1 = peek_u64(&path, 40);
    let l2 = peek_u64(&path, l1) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 0 becomes an owned cluster inside the table's second cluster.
    poke(&path, l2, &((1u64 << 63) | (snapshots + 512)).to_be_bytes());
    assert_refused(
        d.path(),
        "L2 entry into the snapshot table",
        "overlaps with snapshot table",
        |img| img.device.write_at(&[0xcd; 512], 0),
    );
}

/// An L1 entry naming the L1 table itself as an L2 table: a new L2 table for another L1 entry
/// would be recorded inside that "L2 table", turning a guest cluster into a pointer to metadata.
/// QEMU refuses the L1 write (and leaks the new table); qcow2kit refuses before allocating.
#[test]
fn l1_entry_naming_the_l1_table() {
    let d = scratch();
    let path = written_image(d.path(), "cluster_size=512", "1M", "write -P 0x11 0 512");
    let l1 = peek_u64(&path, 40);
    poke(&path, l1, &((1u64 << 63) | l1).to_be_bytes());
    // Guest cluster 29 * 64 has L1 entry 29, which is also entry 29 of the self-named table.
    assert_refused(
        d.path(),
        "L1 entry naming the L1",
        "overlaps with active L2 table",
        |img| {
            img.device.write_at(&[0xcd; 512], 29 * 64 * 512)?;
            img.device.flush()
        },
    );
}

/// iotest 060's "cluster data reference into inactive L2 table", after `qemu-img check -r all`:
/// the active L2 entry names the snapshot's L2 table as data, counted twice. Replacing it only
/// lowers that count (the table keeps its own reference), so the write goes through, as in
/// QEMU, and the snapshot still reads its own data.
#[test]
fn repaired_reference_into_inactive_l2_table_is_released() {
    let d = scratch();
    let path = written_image(d.path(), "", "64M", "write -P 1 0 512");
    qemu_img(&["snapshot", "-c", "foo", "t.qcow2"], d.path());
    qemu_io(&["-c", "write -P 2 0 512", "t.qcow2"], d.path());
    let active_l2 = peek_u64(&path, peek_u64(&path, 40)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(active_l2, L2, "the active L2 table was copied by the write");
    poke(&path, active_l2, &((1u64 << 63) | L2).to_be_bytes());
    let repaired = tool(QEMU_IMG, &["check", "-q", "-r", "all", "t.qcow2"], d.path());
    assert_eq!(repaired.code, 0, "qemu-img check -r all: {repaired}");
    let (img, events) = open_rw(&path);
    img.device
        .write_at(&[4u8; 512], 0)
        .and_then(|()| img.device.flush())
        .expect("the write after the repair");
    drop(img);
    assert!(
        events.lock().expect("event list").iter().all(|e| !e.fatal),
        "a fatal corruption event"
    );
    assert!(
        check_findings(d.path()).is_empty(),
        "qemu-img check after the write"
    );
    let o = tool(
        "/usr/bin/qemu-io",
        &["-c", "read -P 4 0 512", "t.qcow2"],
        d.path(),
    );
    assert!(!o.stdout.contains("verification failed"), "{o}");
    qemu_img(&["snapshot", "-a", "foo", "t.qcow2"], d.path());
    let o = tool(
        "/usr/bin/qemu-io",
        &["-c", "read -P 1 0 512", "t.qcow2"],
        d.path(),
    );
    assert!(!o.stdout.contains("verification failed"), "{o}");
}

/// An owned L2 entry naming a cluster its refcount calls free (past the end of the file): the
/// first write through it counts the cluster (a non-fatal event), so that the next allocation
/// cannot hand the same cluster to other data and the acknowledged write survives.
#[test]
fn written_cluster_counted_free_is_not_handed_out_again() {
    let d = scratch();
    let path = base_image(d.path(), "");
    poke(&path, L2, &((1u64 << 63) | (DATA + CS)).to_be_bytes());
    let (img, events) = open_rw(&path);
    img.device
        .write_at(&[0xaa; 65536], 0)
        .expect("write through the entry");
    img.device
        .write_at(&[0xbb; 65536], 1 << 20)
        .expect("an allocating write");
    img.device.flush().expect("flush");
    drop(img);
    let o = tool(
        "/usr/bin/qemu-io",
        &["-c", "read -P 0xaa 0 64k", "t.qcow2"],
        d.path(),
    );
    assert!(
        !o.stdout.contains("verification failed"),
        "guest 0 lost: {o}"
    );
    let o = tool(
        "/usr/bin/qemu-io",
        &["-c", "read -P 0xbb 1M 64k", "t.qcow2"],
        d.path(),
    );
    assert!(
        !o.stdout.contains("verification failed"),
        "guest 1M lost: {o}"
    );
    assert!(
        events
            .lock()
            .expect("event list")
            .iter()
            .any(|e| !e.fatal && e.message.contains("refcount is 0; counting it")),
        "no event for the cluster counted free"
    );
    let errors: Vec<String> = check_findings(d.path())
        .into_iter()
        .filter(|f| f.starts_with("ERROR"))
        .collect();
    assert!(errors.is_empty(), "qemu-img check: {errors:?}");
}

/// Finding 8: a compressed descriptor covering two clusters, the second past the end of the
/// file and counted 0. Replacing it must not free the cluster the replacement itself gets: the
/// write is acknowledged (as by QEMU), reads back after reopening, and the image checks clean.
#[test]
fn oversized_compressed_descriptor() {
    let d = scratch();
    let path = base_image(d.path(), "");
    qemu_io(&["-c", "write -c -P 0x22 64k 64k", "t.qcow2"], d.path());
    let e = peek_u64(&path, L2 + 8);
    let x = 62 - (16 - 8);
    let host = e & ((1u64 << x) - 1);
    assert_eq!(
        fs::metadata(&path)
            .expect("stat")
            .len()
            .next_multiple_of(CS),
        (host & !(CS - 1)) + CS,
        "the compressed cluster is not the last one"
    );
    // 256 sectors from a cluster-aligned start: two whole clusters.
    let aligned = host & !(CS - 1);
    set_l2_entry(&path, 1, (1 << 62) | (255u64 << x) | aligned);
    let (img, events) = open_rw(&path);
    img.device.write_at(&[0xcd; 65536], CS).expect("write");
    img.device.flush().expect("flush");
    drop(img);
    let ev = events.lock().expect("event list").clone();
    assert!(
        ev.iter().all(|e| !e.fatal) && !ev.is_empty(),
        "expected a non-fatal event: {ev:?}"
    );
    let img =
        chain::open(&path, Format::Qcow2, &OpenOptions::qemu_compatible()).expect("reopening");
    let mut buf = vec![0u8; 65536];
    img.device.read_at(&mut buf, CS).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0xcd),
        "the acknowledged write was lost"
    );
    assert!(
        check_findings(d.path()).is_empty(),
        "qemu-img check finds errors"
    );
    assert_eq!(
        fs::read(&path).expect("read")[CORRUPT_BYTE] & 2,
        0,
        "marked corrupt"
    );
}

/// Finding 9: a preallocated zero cluster at a misaligned offset (iotest 060's wording).
#[test]
fn preallocated_zero_cluster_misaligned() {
    let d = scratch();
    let path = base_image(d.path(), "");
    set_l2_entry(&path, 0, 0x8000_0000_0000_2a01);
    assert_refused(
        d.path(),
        "misaligned preallocated zero cluster",
        "Preallocated zero cluster offset 0x2a00 unaligned (guest offset: 0)",
        write_at(0, 65536, 0x55),
    );
}

/// Finding 10: a discard over a misaligned L2 entry is reported and the cluster leaked, as QEMU
/// does (a non-fatal event: the image is not marked corrupt); nothing is freed or punched.
#[test]
fn discard_of_misaligned_entry_leaks() {
    let d = scratch();
    let path = base_image(d.path(), "");
    set_l2_entry(&path, 0, (1u64 << 63) | (DATA + 0x2a00));
    let (img, events) = open_rw(&path);
    img.device.discard(0, CS).expect("discard");
    img.device.flush().expect("flush");
    drop(img);
    let ev = events.lock().expect("event list").clone();
    let got: Vec<(String, bool)> = ev.into_iter().map(|e| (e.message, e.fatal)).collect();
    assert_eq!(
        got,
        vec![(
            format!("Cannot free unaligned cluster {:#x}", DATA + 0x2a00),
            false
        )]
    );
    let bytes = fs::read(&path).expect("reading image");
    assert_eq!(bytes[CORRUPT_BYTE] & 2, 0, "marked corrupt");
    assert_eq!(
        &bytes[DATA as usize..(DATA + 16) as usize],
        &[0x11; 16],
        "punched"
    );
    let findings = check_findings(d.path());
    assert_eq!(
        findings.into_iter().collect::<Vec<_>>(),
        vec![format!(
            "Leaked cluster {} refcount=1 reference=0",
            DATA / CS
        )]
    );
}

/// Finding 13 (iotest 271): extended-L2 entries with a subcluster both allocated and zero, or
/// allocated subclusters in an unallocated cluster.
#[test]
fn invalid_extended_l2_bitmaps() {
    for (what, entry, bitmap) in [
        (
            "allocated and zero",
            (1u64 << 63) | DATA,
            0x0000_0001_0000_0001u64,
        ),
        ("allocated bits without a cluster", 0, 0x0000_0000_0000_0003),
    ] {
        let d = scratch();
        let path = base_image(d.path(), "extended_l2=on");
        poke(&path, L2, &entry.to_be_bytes());
        poke(&path, L2 + 8, &bitmap.to_be_bytes());
        assert_refused(
            d.path(),
            what,
            &format!("Invalid cluster entry found (L2 offset: {L2:#x}, L2 index: 0)"),
            write_at(4096, 512, 0x55),
        );
    }
}

/// Finding 12: 65 536 snapshots sharing one sparse 32 MiB L1 table (a 37 MB file). A writable
/// open reads the table once, not once per snapshot (2 TiB), and a write that allocates lands
/// next to, never on, the snapshots' tables.
#[test]
fn writable_open_with_many_snapshots_sharing_one_l1() {
    let d = scratch();
    let path = base_image(d.path(), "");
    let l1_entries: u64 = 4 << 20; // 32 MiB
    let l1 = fs::metadata(&path)
        .expect("stat")
        .len()
        .next_multiple_of(CS);
    let table = l1 + l1_entries * 8;
    let count = 65536u32;
    let mut t = Vec::new();
    for i in 0..count {
        let (id, name) = ((i + 1).to_string(), format!("s{i}"));
        t.extend(l1.to_be_bytes());
        t.extend((l1_entries as u32).to_be_bytes());
        t.extend((id.len() as u16).to_be_bytes());
        t.extend((name.len() as u16).to_be_bytes());
        t.extend([0u8; 16]); // date, VM clock
        t.extend(0u32.to_be_bytes()); // VM state size
        t.extend(16u32.to_be_bytes()); // extra data size
        t.extend((64u64 << 20).to_be_bytes()); // disk size
        t.extend(0u64.to_be_bytes()); // icount
        t.extend(id.as_bytes());
        t.extend(name.as_bytes());
        t.resize(t.len().next_multiple_of(8), 0);
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(table).expect("sparse L1");
    f.write_all_at(&L2.to_be_bytes(), l1)
        .expect("shared L1 entry");
    f.write_all_at(&t, table).expect("snapshot table");
    let mut hdr = count.to_be_bytes().to_vec();
    hdr.extend(table.to_be_bytes());
    f.write_all_at(&hdr, 60).expect("header");
    // Count the new clusters (the shared ones as far as 16 bits go).
    let end = (table + t.len() as u64).next_multiple_of(CS);
    for c in (l1 / CS)..(end / CS) {
        let n: u16 = if c < table / CS { 0xffff } else { 1 };
        f.write_all_at(&n.to_be_bytes(), REFBLOCK + c * 2)
            .expect("refcount");
    }
    f.write_all_at(&0xffffu16.to_be_bytes(), REFBLOCK + (L2 / CS) * 2)
        .expect("refcount");
    // The active image shares its L2 table with the snapshots: not COPIED.
    f.write_all_at(&L2.to_be_bytes(), L1)
        .expect("active L1 entry");
    drop(f);

    let start = std::time::Instant::now();
    let (img, events) = open_rw(&path);
    img.device.write_at(&[0x5a; 4096], 8 << 20).expect("write");
    img.device.flush().expect("flush");
    drop(img);
    let took = start.elapsed();
    assert!(
        events.lock().expect("events").is_empty(),
        "corruption reported"
    );
    // Generous: the open reads 32 MiB of sparse table once (tens of milliseconds); reading it
    // once per snapshot took longer than 300 s.
    assert!(
        took.as_secs() < 20,
        "writable open and one write took {took:?}"
    );
    let o = tool(
        "/usr/bin/qemu-io",
        &["-r", "-c", "read -P 0x5a 8M 4k", "t.qcow2"],
        d.path(),
    );
    assert!(o.stdout.contains("read 4096/4096"), "{o}");
    assert!(!o.stdout.contains("Pattern verification failed"), "{o}");
}
