//! Internal snapshots made, applied and deleted through the library, judged by qemu-img, in
//! both directions: ours read, applied and deleted by qemu-img, qemu-img's by us, interleaved
//! with writes from both tools. After every step `qemu-img check` must find the image clean and
//! every snapshot must read what the image held when it was made.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::{BlockDevice, NewSnapshot, Qcow2Image, SnapshotRef};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use write_helpers::{open_rw, scratch, QEMU_IMG, QEMU_IO};

const SIZE: u64 = 4 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

/// `qemu-img check` must exit 0 (clean: no corruption, no leak).
fn qemu_clean(path: &Path) {
    let out = Command::new(QEMU_IMG)
        .args(["check", "-f", "qcow2", p(path)])
        .output()
        .expect("qemu-img must be installed");
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What qemu-img reads: the active image, or a snapshot (`convert -l`).
fn qemu_read(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let dir = path.parent().expect("scratch file");
    let raw = dir.join("read.raw");
    let mut args = vec!["convert", "-U", "-f", "qcow2", "-O", "raw"];
    let l = snapshot.map(|s| format!("snapshot.name={s}"));
    if let Some(l) = &l {
        args.extend(["-l", l.as_str()]);
    }
    args.extend([p(path), p(&raw)]);
    run(QEMU_IMG, &args);
    std::fs::read(&raw).expect("reading converted image")
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).expect("read the image");
    buf
}

/// A few writes, zeroings and discards through qemu-io (tag `tag`), applied to `model` too.
fn qemu_scribble(path: &Path, tag: u8, model: &mut [u8]) {
    let mut cmds = Vec::new();
    for i in 0..6u64 {
        let off = (i * 613 * 1024 + u64::from(tag) * 4096) % (SIZE - 200 * 1024);
        let len = 3 * 1024 + i * 37 * 1024;
        let (o, l) = (off as usize, len as usize);
        match i % 3 {
            2 => {
                cmds.push(format!("write -z {off} {len}"));
                model[o..o + l].fill(0);
            }
            _ => {
                cmds.push(format!("write -P {tag} {off} {len}"));
                model[o..o + l].fill(tag);
            }
        }
    }
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p(path));
    run(QEMU_IO, &args);
}

/// The same kind of changes through the library (tag `tag`).
fn our_scribble(img: &Qcow2Image, tag: u8, model: &mut [u8]) {
    for i in 0..6u64 {
        let off = (i * 701 * 1024 + u64::from(tag) * 8192 + 512) % (SIZE - 200 * 1024);
        let len = 5 * 1024 + i * 29 * 1024;
        let (o, l) = (off as usize, len as usize);
        match i % 3 {
            1 => {
                img.write_zeroes(off, len).expect("zero");
                model[o..o + l].fill(0);
            }
            2 => {
                img.discard(off, len).expect("discard");
                model[o..o + l].fill(0);
            }
            _ => {
                let buf = vec![tag; l];
                img.write_at(&buf, off).expect("write");
                model[o..o + l].fill(tag);
            }
        }
    }
    img.flush().expect("flush");
}

fn create(path: &Path, opts: &str) {
    run(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p(path),
            &SIZE.to_string(),
        ],
    );
}

fn qcow2(o: &qcow2kit::Opened) -> Arc<Qcow2Image> {
    o.qcow2.clone().expect("a qcow2 image")
}

/// Checks every snapshot in `snaps` reads as recorded, by qemu-img, and the active image too.
fn judge(path: &Path, active: &[u8], snaps: &BTreeMap<String, Vec<u8>>) {
    qemu_clean(path);
    assert!(qemu_read(path, None) == active, "active image differs");
    for (name, content) in snaps {
        assert!(
            qemu_read(path, Some(name)) == *content,
            "snapshot {name} differs"
        );
    }
}

fn round_trip(opts: &str) {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, opts);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = BTreeMap::new();

    // qemu-img makes q1; we make s1 and s2 through one open handle, writing in between.
    qemu_scribble(&path, 1, &mut model);
    run(QEMU_IMG, &["snapshot", "-c", "q1", p(&path)]);
    snaps.insert("q1".to_string(), model.clone());
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        our_scribble(&img, 2, &mut model);
        let s1 = img
            .create_snapshot(&NewSnapshot::now("s1"))
            .expect("create s1");
        assert_eq!(s1.id, "2", "QEMU's next id");
        snaps.insert("s1".to_string(), model.clone());
        our_scribble(&img, 3, &mut model);
        assert!(read_all(o.device.as_ref()) == model, "handle after create");
        img.create_snapshot(&NewSnapshot::now("s2"))
            .expect("create s2");
        snaps.insert("s2".to_string(), model.clone());
        our_scribble(&img, 4, &mut model);
        assert!(read_all(o.device.as_ref()) == model);
        img.close().expect("close");
    }
    judge(&path, &model, &snaps);

    // qemu-img applies ours, writes, and makes q2.
    run(QEMU_IMG, &["snapshot", "-a", "s1", p(&path)]);
    model = snaps["s1"].clone();
    qemu_scribble(&path, 5, &mut model);
    run(QEMU_IMG, &["snapshot", "-c", "q2", p(&path)]);
    snaps.insert("q2".to_string(), model.clone());
    judge(&path, &model, &snaps);

    // We apply qemu-img's and ours, delete both kinds, write after each step.
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        img.apply_snapshot(&SnapshotRef::IdOrName("q1".into()))
            .expect("apply q1");
        model = snaps["q1"].clone();
        assert!(read_all(o.device.as_ref()) == model, "after apply q1");
        our_scribble(&img, 6, &mut model);
        img.delete_snapshot(&SnapshotRef::Name("s2".into()))
            .expect("delete s2");
        snaps.remove("s2");
        our_scribble(&img, 7, &mut model);
        img.delete_snapshot(&SnapshotRef::Name("q2".into()))
            .expect("delete q2");
        snaps.remove("q2");
        assert!(read_all(o.device.as_ref()) == model, "after deletes");
        img.apply_snapshot(&SnapshotRef::IdOrName("2".into()))
            .expect("apply s1 by id");
        model = snaps["s1"].clone();
        our_scribble(&img, 8, &mut model);
        assert!(read_all(o.device.as_ref()) == model);
        img.close().expect("close");
    }
    judge(&path, &model, &snaps);

    // qemu-img deletes ours and qemu-io writes; we delete the last one.
    run(QEMU_IMG, &["snapshot", "-d", "s1", p(&path)]);
    snaps.remove("s1");
    qemu_scribble(&path, 9, &mut model);
    judge(&path, &model, &snaps);
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        img.delete_snapshot(&SnapshotRef::Name("q1".into()))
            .expect("delete q1");
        assert!(img.snapshots().is_empty());
        our_scribble(&img, 10, &mut model);
        img.close().expect("close");
    }
    judge(&path, &model, &BTreeMap::new());
}

#[test]
fn round_trips_64k_clusters() {
    round_trip("cluster_size=65536");
}

#[test]
fn round_trips_512_byte_clusters() {
    round_trip("cluster_size=512");
}

#[test]
fn round_trips_extended_l2() {
    round_trip("cluster_size=16384,extended_l2=on");
}

#[test]
fn round_trips_v2() {
    round_trip("compat=0.10,cluster_size=4096");
}

#[test]
fn round_trips_lazy_refcounts() {
    round_trip("lazy_refcounts=on,cluster_size=4096");
}

/// Compressed clusters are shared by snapshots and freed with the last of them.
#[test]
fn compressed_clusters_shared_and_freed() {
    let dir = scratch();
    let src = dir.path().join("src.qcow2");
    let path = dir.path().join("img.qcow2");
    create(&src, "cluster_size=4096");
    let mut model = vec![0u8; SIZE as usize];
    qemu_scribble(&src, 1, &mut model);
    run(
        QEMU_IMG,
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&src),
            p(&path),
        ],
    );
    let mut snaps = BTreeMap::new();
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        img.create_snapshot(&NewSnapshot::now("c")).expect("create");
        snaps.insert("c".to_string(), model.clone());
        our_scribble(&img, 2, &mut model);
        img.close().expect("close");
    }
    judge(&path, &model, &snaps);
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        img.apply_snapshot(&SnapshotRef::Name("c".into()))
            .expect("apply");
        model = snaps["c"].clone();
        img.delete_snapshot(&SnapshotRef::Name("c".into()))
            .expect("delete");
        our_scribble(&img, 3, &mut model);
        img.close().expect("close");
    }
    judge(&path, &model, &BTreeMap::new());
}

/// Apply takes the snapshot's virtual size, both ways.
#[test]
fn apply_follows_the_snapshot_disk_size() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=4096");
    let mut model = vec![0u8; SIZE as usize];
    qemu_scribble(&path, 1, &mut model);
    let o = open_rw(&path);
    let img = qcow2(&o);
    img.create_snapshot(&NewSnapshot::now("small"))
        .expect("create");
    img.resize(SIZE * 3, false).expect("grow");
    img.write_at(&[7u8; 4096], SIZE * 2)
        .expect("write past the old end");
    img.create_snapshot(&NewSnapshot::now("big"))
        .expect("create");
    img.apply_snapshot(&SnapshotRef::Name("small".into()))
        .expect("apply small");
    assert_eq!(img.size(), SIZE);
    assert!(read_all(img.as_ref()) == model);
    img.apply_snapshot(&SnapshotRef::Name("big".into()))
        .expect("apply big");
    assert_eq!(img.size(), SIZE * 3);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, SIZE * 2).expect("read");
    assert_eq!(buf, vec![7u8; 4096]);
    img.close().expect("close");
    drop(img);
    drop(o);
    qemu_clean(&path);
    let info = run(QEMU_IMG, &["info", "-f", "qcow2", p(&path)]);
    assert!(info.contains("virtual size: 12 MiB"), "{info}");
}

/// Missing snapshots are reported, nothing is written.
#[test]
fn missing_snapshot_is_an_error() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=65536");
    let before = std::fs::read(&path).expect("read");
    let o = open_rw(&path);
    let img = qcow2(&o);
    let e = img
        .apply_snapshot(&SnapshotRef::Name("nope".into()))
        .expect_err("no such snapshot");
    assert!(matches!(e, qcow2kit::Error::SnapshotNotFound(_)), "{e}");
    let e = img
        .delete_snapshot(&SnapshotRef::Name("nope".into()))
        .expect_err("no such snapshot");
    assert!(matches!(e, qcow2kit::Error::SnapshotNotFound(_)), "{e}");
    img.close().expect("close");
    drop(img);
    drop(o);
    assert!(std::fs::read(&path).expect("read") == before);
}

/// Runs HMP `commands` in a machine-less QEMU over `path`; returns the monitor's output with
/// escape sequences dropped.
fn monitor(path: &Path, commands: &str) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
        ])
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=qcow2", p(path)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (scripts/iotests/setup installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{commands}\nquit\n").as_bytes())
            .expect("monitor input");
    }
    let out = child.wait_with_output().expect("qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout).replace('\u{1b}', "")
        + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-system-x86_64: {text}");
    text
}

/// A snapshot with VM state (`savevm` keeps it in clusters past the disk in the snapshot's
/// L1 table) survives our create, apply and delete of other snapshots intact (QEMU loads it),
/// and deleting it frees its VM-state clusters (`qemu-img check` finds no leak).
#[test]
fn vm_state_snapshots_kept_and_freed() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=4096");
    let mut model = vec![0u8; SIZE as usize];
    qemu_scribble(&path, 1, &mut model);
    let saved = monitor(&path, "savevm vs1");
    assert!(!saved.contains("Error"), "{saved}");
    let vm_state = {
        let o = open_rw(&path);
        let img = qcow2(&o);
        let s = img.snapshots();
        assert!(s.len() == 1 && s[0].vm_state_size > 0, "savevm made {s:?}");
        our_scribble(&img, 2, &mut model);
        img.create_snapshot(&NewSnapshot::now("ours"))
            .expect("create");
        img.apply_snapshot(&SnapshotRef::Name("vs1".into()))
            .expect("apply vs1");
        our_scribble(&img, 3, &mut model);
        img.delete_snapshot(&SnapshotRef::Name("ours".into()))
            .expect("delete ours");
        img.close().expect("close");
        s[0].vm_state_size
    };
    qemu_clean(&path);
    let listed = run(QEMU_IMG, &["snapshot", "-l", p(&path)]);
    assert!(listed.contains("vs1"), "{listed}");
    let loaded = monitor(&path, "loadvm vs1");
    assert!(
        !loaded.contains("Error"),
        "loadvm after our operations: {loaded}"
    );
    // A second VM-state snapshot, of the state just loaded, deleted by us: its VM-state
    // clusters are referenced by it alone (QEMU drops them from the active table after
    // savevm), so a check without leaks shows they were freed.
    let saved = monitor(&path, "savevm vs2");
    assert!(!saved.contains("Error"), "{saved}");
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        let gone = img
            .delete_snapshot(&SnapshotRef::Name("vs2".into()))
            .expect("delete vs2");
        assert!(gone.vm_state_size > 0 && vm_state > 0);
        img.close().expect("close");
    }
    qemu_clean(&path);
    let loaded = monitor(&path, "loadvm vs1");
    assert!(
        !loaded.contains("Error"),
        "loadvm after deleting vs2: {loaded}"
    );
}

/// One step of a random stream.
#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: u64,
        tag: u8,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Create,
    /// Applies the `k % n`-th snapshot (nothing when there is none).
    Apply(usize),
    /// Deletes the `k % n`-th snapshot.
    Delete(usize),
    /// Closes the handle and opens the image again.
    Reopen,
}

const STREAM_SIZE: u64 = 256 << 10;

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let range = (0..STREAM_SIZE / 512, 1u64..64).prop_map(|(o, l)| {
        let off = o * 512;
        (off, (l * 512).min(STREAM_SIZE - off))
    });
    // Writes at any byte, of any length up to 64 KiB.
    let bytes = (0..STREAM_SIZE, 1u64..=65536).prop_map(|(off, l)| (off, l.min(STREAM_SIZE - off)));
    prop_oneof![
        2 => (range.clone(), any::<u8>()).prop_map(|((off, len), tag)| Step::Write { off, len, tag }),
        2 => (bytes, any::<u8>()).prop_map(|((off, len), tag)| Step::Write { off, len, tag }),
        1 => range.clone().prop_map(|(off, len)| Step::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Step::Discard { off, len }),
        2 => Just(Step::Create),
        1 => any::<usize>().prop_map(Step::Apply),
        1 => any::<usize>().prop_map(Step::Delete),
        1 => Just(Step::Reopen),
    ]
}

/// The bytes a [`Step::Write`] of `len` bytes tagged `tag` writes (they differ along the
/// range, so a misplaced piece shows).
fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add((i / 509) as u8))
        .collect()
}

/// Runs `steps` on a fresh image (clusters of `cluster` bytes, more `-o` options in `extra`)
/// against a model of the active image and of every snapshot, through one open handle
/// between [`Step::Reopen`]s; then qemu-img judges: check clean, `compare` of the active image
/// with the model, every snapshot as the model says.
fn stream(cluster: u64, extra: &str, steps: &[Step]) {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    let opts = format!("cluster_size={cluster},{extra}");
    run(
        QEMU_IMG,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            p(&path),
            &STREAM_SIZE.to_string(),
        ],
    );
    let mut active = vec![0u8; STREAM_SIZE as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut made = 0;
    {
        let mut o = open_rw(&path);
        let mut img = qcow2(&o);
        for s in steps {
            match *s {
                Step::Write { off, len, tag } => {
                    let buf = pattern(tag, len);
                    img.write_at(&buf, off).expect("write");
                    active[off as usize..(off + len) as usize].copy_from_slice(&buf);
                }
                Step::Reopen => {
                    img.close().expect("close");
                    drop(img);
                    drop(o);
                    o = open_rw(&path);
                    img = qcow2(&o);
                }
                Step::Zero { off, len } => {
                    img.write_zeroes(off, len).expect("zero");
                    active[off as usize..(off + len) as usize].fill(0);
                }
                Step::Discard { off, len } => {
                    // Only whole clusters are sure to read as zeros after a discard.
                    let (start, end) = (
                        off.next_multiple_of(cluster),
                        (off + len) / cluster * cluster,
                    );
                    if start < end {
                        img.discard(start, end - start).expect("discard");
                        active[start as usize..end as usize].fill(0);
                    }
                }
                Step::Create => {
                    made += 1;
                    let name = format!("p{made}");
                    img.create_snapshot(&NewSnapshot::now(&name))
                        .expect("create");
                    snaps.push((name, active.clone()));
                }
                Step::Apply(k) if !snaps.is_empty() => {
                    let (name, content) = &snaps[k % snaps.len()];
                    img.apply_snapshot(&SnapshotRef::Name(name.clone()))
                        .expect("apply");
                    active = content.clone();
                }
                Step::Delete(k) if !snaps.is_empty() => {
                    let (name, _) = snaps.remove(k % snaps.len());
                    img.delete_snapshot(&SnapshotRef::Name(name))
                        .expect("delete");
                }
                Step::Apply(_) | Step::Delete(_) => {}
            }
        }
        assert!(read_all(o.device.as_ref()) == active, "the open handle");
        img.close().expect("close");
    }
    let model = dir.path().join("model.raw");
    std::fs::write(&model, &active).expect("write the model");
    run(
        QEMU_IMG,
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&path),
            p(&model),
        ],
    );
    judge(&path, &active, &snaps.into_iter().collect());
}

#[test]
fn random_streams_against_a_model() {
    use proptest::test_runner::TestRunner;
    let config = proptest::test_runner::Config {
        cases: 64,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (
        proptest::sample::select(vec![
            (512u64, "compat=1.1"),
            (4096, "compat=1.1"),
            (65536, "compat=1.1"),
            (16384, "extended_l2=on"),
            (4096, "compat=0.10"),
            (65536, "lazy_refcounts=on"),
            (4096, "refcount_bits=64"),
        ]),
        proptest::collection::vec(step(), 1..40),
    );
    runner
        .run(&strategy, |((cluster, extra), steps)| {
            stream(cluster, extra, &steps);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A snapshot whose L1 table names an L2 table past the end of the file cannot be applied:
/// an error, never a panic, and the header still names the old state.
#[test]
fn hostile_snapshot_table_refused() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=4096");
    let mut model = vec![0u8; SIZE as usize];
    qemu_scribble(&path, 1, &mut model);
    run(QEMU_IMG, &["snapshot", "-c", "bad", p(&path)]);
    let mut bytes = std::fs::read(&path).expect("read");
    let be = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(w)
    };
    let table = be(&bytes, 64) as usize;
    let l1 = be(&bytes, table) as usize;
    bytes[l1..l1 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let header = bytes[..72].to_vec();
    {
        let o = open_rw(&path);
        let img = qcow2(&o);
        let e = img
            .apply_snapshot(&SnapshotRef::Name("bad".into()))
            .expect_err("an L2 table past the end of the file");
        assert!(e.to_string().contains("past the end"), "{e}");
        assert!(
            read_all(o.device.as_ref()) == model,
            "reads after the failure"
        );
    }
    let after = std::fs::read(&path).expect("read");
    assert!(after[..72] == header[..], "the header changed");
    assert!(qemu_read(&path, None) == model);
}

/// A snapshot is not applied to an image with persistent bitmaps, as QEMU refuses it: a bitmap
/// added through this handle and not stored yet counts too, and nothing changes.
#[test]
fn apply_refused_while_the_image_has_bitmaps() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=65536");
    let o = open_rw(&path);
    let img = qcow2(&o);
    img.write_at(&[7u8; 4096], 0).expect("write");
    img.create_snapshot(&NewSnapshot::now("s1"))
        .expect("create");
    img.write_at(&[8u8; 4096], 0).expect("write");
    img.add_bitmap("b0", 65536, false).expect("add bitmap");
    let e = img
        .apply_snapshot(&SnapshotRef::Name("s1".into()))
        .expect_err("bitmaps refuse the apply");
    assert!(
        matches!(&e, qcow2kit::Error::Unsupported(m) if m == Qcow2Image::APPLY_WITH_BITMAPS),
        "{e}"
    );
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).expect("read");
    assert_eq!(b, [8u8; 4096]);
    img.close().expect("close");
    drop(img);
    drop(o);
    qemu_clean(&path);
    // Stored now: a new handle refuses too.
    let o = open_rw(&path);
    let img = qcow2(&o);
    let e = img
        .apply_snapshot(&SnapshotRef::Name("s1".into()))
        .expect_err("bitmaps refuse the apply");
    assert!(matches!(&e, qcow2kit::Error::Unsupported(_)), "{e}");
    img.close().expect("close");
}

/// Nonzero entries of the refcount table of the qcow2 file at `path`: how many refcount blocks
/// the image's header names.
fn refcount_blocks_named(path: &Path) -> usize {
    let file = std::fs::read(path).expect("reading the image");
    let be64 = |at: usize| u64::from_be_bytes(file[at..at + 8].try_into().expect("8 bytes"));
    let table = be64(48) as usize;
    let clusters = u32::from_be_bytes(file[56..60].try_into().expect("4 bytes")) as usize;
    let cluster = 1usize << u32::from_be_bytes(file[20..24].try_into().expect("4 bytes"));
    (0..clusters * cluster / 8)
        .filter(|i| be64(table + i * 8) != 0)
        .count()
}

/// A snapshot create that needs a new refcount block must name it in the refcount table:
/// with 512-byte clusters a block counts 256 clusters, so growing the image one cluster and
/// one snapshot at a time makes some creates cross into a block not yet allocated. After each
/// create the file is closed and judged by qemu-img; the test also asserts that at least one
/// create did allocate a refcount block, so it keeps testing what it is named for.
#[test]
fn snapshot_create_allocating_a_refcount_block_names_it() {
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    create(&path, "cluster_size=512");
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = BTreeMap::new();
    let mut creates_that_grew = 0;
    for i in 0..60u64 {
        let before = refcount_blocks_named(&path);
        {
            let opened = open_rw(&path);
            let img = qcow2(&opened);
            let off = i * 4096;
            let buf = pattern(i as u8, 512);
            img.write_at(&buf, off).expect("write");
            model[off as usize..off as usize + 512].copy_from_slice(&buf);
            img.flush().expect("flush");
            let after_write = refcount_blocks_named(&path);
            let name = format!("s{i}");
            img.create_snapshot(&NewSnapshot::now(&name))
                .expect("create");
            img.close().expect("close");
            snaps.insert(name, model.clone());
            if refcount_blocks_named(&path) > after_write.max(before) {
                creates_that_grew += 1;
            }
        }
        qemu_clean(&path);
    }
    assert!(
        creates_that_grew > 0,
        "no snapshot create needed a new refcount block: the test no longer covers that case"
    );
    judge(&path, &model, &snaps);
}
