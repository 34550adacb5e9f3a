//! Deterministic reproductions of the crash-safety and I/O-error bugs that `crash_points.rs`
//! found, one test per bug, each with what went wrong.

use qcow2kit::io::testing::{CrashPoint, CrashStorage, FailingStorage, Fault, FaultError, OpKind};
use qcow2kit::io::{MemoryStorage, Storage};
use qcow2kit::ops::check::{check, CheckReport};
use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
use qcow2kit::{BlockDevice, Qcow2Image, Qcow2Options};
use std::sync::Arc;

const K: u64 = 1024;

/// A new image's bytes.
fn new_image(size: u64, o: &CreateOptions) -> Vec<u8> {
    let mem = Arc::new(MemoryStorage::new());
    drop(create_qcow2_on(mem.clone(), None, size, o).expect("create"));
    mem.to_bytes()
}

fn sound(r: &CheckReport) -> bool {
    r.corruptions == 0 && r.check_errors == 0 && r.failure.is_none()
}

/// Runs `work` once per crash point (every write-type operation and every flush it makes) on
/// an image starting as `initial`, and hands every post-crash medium to `judge`.
fn every_crash(
    initial: &[u8],
    work: &dyn Fn(&Qcow2Image) -> qcow2kit::Result<()>,
    judge: &dyn Fn(&str, Vec<u8>),
) {
    let run = |point: Option<CrashPoint>| {
        let s = Arc::new(CrashStorage::new(initial.to_vec(), point));
        if let Ok(img) = Qcow2Image::open_writable(s.clone(), &Qcow2Options::default()) {
            let _ = work(&img).and_then(|()| img.close());
        }
        s
    };
    let counts = run(None).counts();
    let points = (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush));
    for point in points {
        let s = run(Some(point));
        for choices in s.choice_sets(1, 8) {
            judge(&format!("{point:?} {choices:?}"), s.crash_image(&choices));
        }
    }
}

/// Two refcount blocks created between flushes, the second placed in a cluster the first one
/// counts: their table entries were written together before one flush, so a crash could keep
/// the second entry without the first — a reachable refcount block with refcount 0 (`qemu-img
/// check`: "ERROR cluster 72 refcount=0 reference=1"), which the allocator could hand out
/// again. Fixed by writing table entries in rounds, an entry only once the entry of the block
/// that counts its cluster is durable.
#[test]
fn new_refcount_blocks_counted_by_another_new_block() {
    // 512-byte clusters and 64-bit refcounts: a block covers 64 clusters.
    let o = CreateOptions {
        cluster_size: 512,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    let initial = new_image(4 << 20, &o);
    let work = |img: &Qcow2Image| {
        for i in 0..4u64 {
            img.write_at(&[i as u8 + 1; 64 * 1024], i * 64 * K)?;
        }
        img.flush()
    };
    every_crash(&initial, &work, &|what, bytes| {
        let r = check(&MemoryStorage::from_bytes(bytes)).expect("check");
        assert!(sound(&r), "{what}: {r:?}");
    });
}

/// Growing an image whose last cluster is partial (after a shrink to 302.5 KiB it still holds
/// the old bytes past the end): the new size was written and flushed before the stale tail was
/// zeroed, so a crash in between left the larger image showing the old bytes at 302.5 KiB..304
/// KiB. Fixed by zeroing (and flushing) first, then writing the size.
#[test]
fn grow_never_shows_stale_tail_after_a_crash() {
    let o = CreateOptions {
        cluster_size: 4 * K,
        ..CreateOptions::default()
    };
    let mem = Arc::new(MemoryStorage::from_bytes(new_image(512 * K, &o)));
    {
        let img = Qcow2Image::open_writable(mem.clone(), &Qcow2Options::default()).expect("open");
        img.write_at(&vec![0xaa; 512 * 1024], 0).expect("write");
        img.resize(302 * K + 512, true).expect("shrink");
        img.close().expect("close");
    }
    let initial = mem.to_bytes();
    let work = |img: &Qcow2Image| img.resize(400 * K, false);
    every_crash(&initial, &work, &|what, bytes| {
        let img = Qcow2Image::open_writable(
            Arc::new(MemoryStorage::from_bytes(bytes)),
            &Qcow2Options::default(),
        )
        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        if img.size() == 400 * K {
            let mut tail = vec![0u8; 1536];
            img.read_at(&mut tail, 302 * K + 512).expect("read");
            assert!(
                tail.iter().all(|&b| b == 0),
                "{what}: stale bytes past the old end"
            );
        }
    });
}

/// A flush failed (the image is then broken: it refuses writes), yet `close` returned `Ok`
/// without writing anything, telling the caller that the writes since the last successful
/// flush were durable when they were not. Fixed: `close` of a broken image returns the error.
#[test]
fn close_after_a_failed_flush_reports_the_failure() {
    let mem = Arc::new(MemoryStorage::from_bytes(new_image(
        1 << 20,
        &CreateOptions::default(),
    )));
    let fault = Fault {
        kind: OpKind::Flush,
        index: 0,
        error: FaultError::Eio,
        sticky: false,
    };
    let s = Arc::new(FailingStorage::with_fault(mem, Some(fault)));
    let img = Qcow2Image::open_writable(s, &Qcow2Options::default()).expect("open");
    img.write_at(&[1; 4096], 0).expect("write");
    assert!(
        img.flush().is_err(),
        "the injected flush failure is reported"
    );
    assert!(
        img.write_at(&[2; 4096], 0).is_err(),
        "a broken image refuses writes"
    );
    assert!(
        img.close().is_err(),
        "close of a broken image claimed the unflushed write durable"
    );
}

/// A write failing while the refcount table grew (the new table, the flush or the header
/// switch) left the in-memory table switched to the new one while the header still named the
/// old; the image kept accepting writes and later flushes wrote the new blocks' table entries
/// past the end of the old table, so the closed image had clusters referenced with refcount 0
/// (2234 corruptions). Fixed: such a failure poisons the refcounts, and the image refuses
/// further allocations and flushes until reopened.
#[test]
fn failed_refcount_table_growth_refuses_further_writes() {
    let o = CreateOptions {
        cluster_size: 512,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    let initial = new_image(4 << 20, &o);
    // 2.5 MiB of data: more than the first refcount table (one cluster, 2 MiB) covers.
    let work = |s: Arc<dyn Storage>| {
        let img = Qcow2Image::open_writable(s, &Qcow2Options::default()).expect("open");
        for i in 0..40u64 {
            let _ = img.write_at(&[i as u8 + 1; 64 * 1024], i * 64 * K);
        }
        let _ = img.close();
    };
    let counter = Arc::new(FailingStorage::new(Arc::new(MemoryStorage::from_bytes(
        initial.clone(),
    ))));
    work(counter.clone());
    for index in 0..counter.counts().writes {
        let mem = Arc::new(MemoryStorage::from_bytes(initial.clone()));
        let fault = Fault {
            kind: OpKind::Write,
            index,
            error: FaultError::Eio,
            sticky: false,
        };
        work(Arc::new(FailingStorage::with_fault(
            mem.clone(),
            Some(fault),
        )));
        let r = check(mem.as_ref()).expect("check");
        assert!(sound(&r), "write {index} failed: {r:?}");
    }
}
