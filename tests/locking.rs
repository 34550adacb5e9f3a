//! Image locking (`qcow2kit::io::lock`): opens of one image exclude each other as QEMU's do,
//! within one process (two open file descriptions) and against a qemu-io process.
//!
//! Images are made by qemu-img; a missing qemu-img or qemu-io fails the tests.

use qcow2kit::chain::{self, Locking, OpenOptions, Opened};
use qcow2kit::io::lock::{LockTarget, Permissions};
use qcow2kit::io::FileStorage;
use qcow2kit::Error;
use qcow2kit::Format;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

#[path = "support/lock_helpers.rs"]
mod lock_helpers;
use lock_helpers::{make_images, Held};

/// The images of [`make_images`] in a new directory.
fn images() -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().to_path_buf();
    make_images(&d);
    (tmp, d)
}

fn open(path: &Path, writable: bool, locking: Locking) -> Result<Opened, Error> {
    let opts = OpenOptions {
        writable,
        locking,
        ..OpenOptions::qemu_compatible()
    };
    chain::open(path, Format::Qcow2, &opts)
}

/// The conflict an open was refused with: the file, the permission and whether it was about
/// sharing, and the backing depth.
fn conflict(r: Result<Opened, Error>) -> (PathBuf, Permissions, bool, usize, String) {
    match r {
        Err(e @ Error::Locked { .. }) => {
            let shown = e.to_string();
            let Error::Locked {
                backing_depth,
                source,
            } = e
            else {
                unreachable!()
            };
            let LockTarget::Permission { permission, shared } = source.target else {
                panic!("not a permission conflict: {shown}");
            };
            assert!(source.os_error.is_none(), "{shown}");
            (source.path, permission, shared, backing_depth, shown)
        }
        Err(e) => panic!("refused, but not for a lock: {e}"),
        Ok(_) => panic!("a conflicting open was allowed"),
    }
}

#[test]
fn the_same_image_opened_writable_twice_in_one_process_is_refused() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let first = open(&top, true, Locking::Qemu).expect("first writer");
    let (path, perm, shared, depth, shown) = conflict(open(&top, true, Locking::Qemu));
    assert_eq!(
        (path, perm, shared, depth),
        (top.clone(), Permissions::WRITE, false, 0)
    );
    assert_eq!(
        shown,
        format!(
            "Failed to get \"write\" lock\nIs another process using the image [{}]?",
            top.display()
        )
    );
    // A reader is refused too (it does not share writes), unless it forces sharing.
    let (_, perm, shared, _, _) = conflict(open(&top, false, Locking::Qemu));
    assert_eq!((perm, shared), (Permissions::WRITE, true));
    open(&top, false, Locking::ForceShare).expect("-U reads alongside a writer");
    // Writes through the first open still work, and the locks go with it.
    first.device.write_at(&[7u8; 512], 0).expect("write");
    drop(first);
    let again = open(&top, true, Locking::Qemu).expect("locks die with the open");
    let mut b = [0u8; 512];
    again.device.read_at(&mut b, 0).expect("read");
    assert_eq!(b, [7u8; 512]);
}

#[test]
fn close_flushes_and_releases_every_layer() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let base = d.join("base.qcow2");
    let first = open(&top, true, Locking::Qemu).expect("writer");
    let device = first.device.clone();
    device.write_at(&[9u8; 512], 4096).expect("write");
    drop(device);
    // The chain's layers hold the images too: the close reports and releases them all.
    first.close().expect("close");
    let again = open(&top, true, Locking::Qemu).expect("the top is free again");
    let mut b = [0u8; 512];
    again.device.read_at(&mut b, 4096).expect("read");
    assert_eq!(b, [9u8; 512]);
    again.close().expect("close");
    // The backing file was read-locked by the chain; nothing holds it any more.
    open(&base, true, Locking::Qemu).expect("the base is free too");
}

#[test]
fn readers_share_and_exclude_writers() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let r1 = open(&top, false, Locking::Qemu).expect("reader");
    let _r2 = open(&top, false, Locking::Qemu).expect("second reader");
    let (_, perm, shared, _, _) = conflict(open(&top, true, Locking::Qemu));
    assert_eq!((perm, shared), (Permissions::WRITE, false));
    drop(r1);
    let (_, perm, _, _, _) = conflict(open(&top, true, Locking::Qemu));
    assert_eq!(perm, Permissions::WRITE, "the second reader still holds it");
}

#[test]
fn backing_files_are_locked_and_named_with_their_depth() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let base = d.join("base.qcow2");
    let _writer = open(&top, true, Locking::Qemu).expect("writer of the top image");
    // The backing file is read by the writer of the top: no one may write it.
    let (path, perm, shared, depth, _) = conflict(open(&base, true, Locking::Qemu));
    assert_eq!(
        (path, perm, shared, depth),
        (base.clone(), Permissions::WRITE, false, 0)
    );
    open(&base, false, Locking::Qemu).expect("base may be read");
    drop(_writer);

    let _base_writer = open(&base, true, Locking::Qemu).expect("writer of the base");
    let (path, perm, shared, depth, shown) = conflict(open(&top, false, Locking::Qemu));
    assert_eq!(
        (path, perm, shared, depth),
        (base.clone(), Permissions::WRITE, true, 1)
    );
    assert!(
        shown.starts_with("Could not open backing file: Failed to get shared \"write\" lock\n"),
        "{shown}"
    );
}

#[test]
fn an_external_data_file_is_locked_with_its_image() {
    let (_t, d) = images();
    let data = d.join("data.raw");
    let _writer = open(&d.join("dimg.qcow2"), true, Locking::Qemu).expect("writer");
    // As in QEMU, the data file of a writer may not be resized by others (it may be written).
    let raw_resizer = Locking::Qemu
        .request(chain::FileRole::Raw, true)
        .map(|mut r| {
            r.uses |= Permissions::RESIZE;
            r
        });
    let err = FileStorage::open_with(&data, true, raw_resizer).expect_err("resize refused");
    let le = qcow2kit::io::lock::lock_error(&err).expect("a lock error");
    assert_eq!(
        le.target,
        LockTarget::Permission {
            permission: Permissions::RESIZE,
            shared: false
        }
    );
    let raw_writer = Locking::Qemu.request(chain::FileRole::Raw, true);
    FileStorage::open_with(&data, true, raw_writer).expect("a raw writer shares the data file");
}

#[test]
fn without_locking_nothing_is_taken_or_checked() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let _a = open(&top, true, Locking::Off).expect("first");
    let _b = open(&top, true, Locking::Off).expect("Locking::Off takes no lock");
    let _c = open(&top, true, Locking::Qemu).expect("nor does it check");
}

#[test]
fn force_share_is_read_only() {
    let (_t, d) = images();
    match open(&d.join("top.qcow2"), true, Locking::ForceShare) {
        Err(Error::InvalidArgument(m)) => assert_eq!(m, chain::FORCE_SHARE_WRITABLE),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a writable open with force-share was allowed"),
    }
}

#[test]
fn create_refuses_an_image_in_use_and_leaves_it_intact() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let len = std::fs::metadata(&top).expect("stat").len();
    let _writer = open(&top, true, Locking::Qemu).expect("writer");
    let err = FileStorage::create(&top).expect_err("create over an image in use");
    assert!(
        err.to_string().starts_with("Failed to get \"write\" lock"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&top).expect("stat").len(),
        len,
        "truncated"
    );
}

#[test]
fn a_qemu_io_writer_excludes_the_library_and_the_library_excludes_qemu_io() {
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    {
        let mut qemu_io = Command::new("qemu-io");
        qemu_io.arg("top.qcow2").current_dir(&d);
        let _q = Held::spawn(qemu_io);
        let (_, perm, shared, _, _) = conflict(open(&top, true, Locking::Qemu));
        assert_eq!((perm, shared), (Permissions::WRITE, false));
        let (_, perm, shared, _, _) = conflict(open(&top, false, Locking::Qemu));
        assert_eq!((perm, shared), (Permissions::WRITE, true));
        let (_, perm, _, depth, _) = conflict(open(&d.join("base.qcow2"), true, Locking::Qemu));
        assert_eq!((perm, depth), (Permissions::WRITE, 0));
        open(&top, false, Locking::ForceShare).expect("-U alongside qemu-io");
    }
    let _ours = open(&top, true, Locking::Qemu).expect("qemu-io has exited");
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512", "top.qcow2"])
        .current_dir(&d)
        .output()
        .expect("qemu-io");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qemu-io: can't open device top.qcow2: Failed to get \"write\" lock\n\
         Is another process using the image [top.qcow2]?\n"
    );
}

#[test]
fn locks_are_the_bytes_qemu_uses() {
    // Our lock bytes as /proc/locks shows them, against QEMU's for the same open (measured
    // with qemu-io 10.0.2: read-write qcow2 100,101,103,201,203; its backing file and a
    // read-only open 100,201,203; with -U 100).
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
    let bytes = |p: &Path| -> Vec<u64> {
        let want = format!(":{} ", ino(p));
        let locks = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
        let mut v: Vec<u64> = locks
            .lines()
            .filter(|l| l.contains("OFDLCK") && l.contains(&want))
            .flat_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (a, b) = (f[f.len() - 2], f[f.len() - 1]);
                let (a, b): (u64, u64) = (a.parse().expect("start"), b.parse().expect("end"));
                a..=b
            })
            .collect();
        v.sort();
        v
    };
    let w = open(&top, true, Locking::Qemu).expect("writer");
    assert_eq!(bytes(&top), [100, 101, 103, 201, 203]);
    assert_eq!(bytes(&d.join("base.qcow2")), [100, 201, 203]);
    drop(w);
    assert_eq!(bytes(&top), Vec::<u64>::new());
    let _r = open(&top, false, Locking::ForceShare).expect("-U");
    assert_eq!(bytes(&top), [100]);
}

#[test]
fn a_dropped_storage_releases_its_locks_while_its_descriptor_lives_on() {
    // A child spawned by another thread holds a copy of every descriptor until it calls exec
    // (here: a duplicate); the image must not look busy once its storage is dropped.
    let (_t, d) = images();
    let top = d.join("top.qcow2");
    let storage = FileStorage::open(&top, true).expect("writer");
    let inherited = storage.file().try_clone().expect("dup");
    drop(storage);
    FileStorage::open(&top, true).expect("the dropped writer's locks are gone");
    drop(inherited);
}
