//! Encrypted images (LUKS and legacy AES) through the library, judged by qemu-img and qemu-io:
//! what qemu-io wrote reads back decrypted; what we write (unaligned, copy-on-write, zeroed,
//! discarded) reads back in qemu-img, `qemu-img check` clean; images we create open in QEMU;
//! keys are checked; and the encryption header is guarded against writes even when the
//! refcounts say its clusters are free.

#[allow(dead_code)]
#[path = "support/read_helpers.rs"]
mod read_helpers;

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::crypto::luks::{KdfCost, LuksCreateOptions};
use qcow2kit::crypto::{CryptoError, EncryptionFormat, Passphrase};
use qcow2kit::device::BlockDevice;
use qcow2kit::engine::EncryptionOptions;
use qcow2kit::ops::create::{create_qcow2, CreateEncryption, CreateOptions};
use qcow2kit::Error;
use qcow2kit::Format;
use read_helpers::{run_tool, Rng, Work};
use std::path::Path;

const PW: &str = "correct horse";

fn key(pw: &str) -> EncryptionOptions {
    EncryptionOptions {
        passphrase: Some(Passphrase::new(pw)),
        ..Default::default()
    }
}

fn opts(enc: EncryptionOptions, writable: bool) -> OpenOptions {
    let mut o = OpenOptions::qemu_compatible();
    o.qcow2.encryption = enc;
    o.writable = writable;
    o
}

/// qemu-img/qemu-io arguments naming `path` with the key.
fn qemu_args(path: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=k,data={PW}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=k",
            path.display()
        ),
    ]
}

fn qemu(w: &Work, prog: &str, pre: &[&str], path: &Path, post: &[&str]) -> String {
    let mut args: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
    args.extend(qemu_args(path));
    args.extend(post.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool(prog, &refs, w.dir.path())
}

/// The image's content as qemu-img decrypts it.
fn qemu_content(w: &Work, path: &Path) -> Vec<u8> {
    let out = w.path("qemu.raw");
    qemu(
        w,
        "qemu-img",
        &["convert", "-O", "raw"],
        path,
        &[out.to_str().unwrap()],
    );
    std::fs::read(out).expect("reading qemu-img's raw copy")
}

fn qemu_check_clean(w: &Work, path: &Path) {
    let out = qemu(w, "qemu-img", &["check"], path, &[]);
    assert!(out.contains("No errors were found"), "{out}");
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).expect("reading the image");
    buf
}

/// `qemu-img create` of an encrypted image (`extra`: more `-o` options).
fn qemu_create(w: &Work, name: &str, format: &str, extra: &str, size: &str) -> std::path::PathBuf {
    let mut o = format!("encrypt.format={format},encrypt.key-secret=k");
    if format == "luks" {
        o.push_str(",encrypt.iter-time=10");
    }
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    let sec = format!("secret,id=k,data={PW}");
    w.img(&[
        "create", "-q", "-f", "qcow2", "--object", &sec, "-o", &o, name, size,
    ]);
    w.path(name)
}

const KINDS: [(&str, &str); 5] = [
    ("luks", ""),
    ("luks", "cluster_size=512"),
    (
        "luks",
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    ),
    ("luks", "cluster_size=16384,extended_l2=on"),
    ("aes", ""),
];

#[test]
fn qemu_written_data_reads_decrypted() {
    let w = Work::new();
    for (i, (format, extra)) in KINDS.iter().enumerate() {
        let path = qemu_create(&w, &format!("q{i}.qcow2"), format, extra, "2M");
        qemu(
            &w,
            "qemu-io",
            &[
                "-c",
                "write -P 0x5a 1000 70000",
                "-c",
                "write -P 0xa5 300001 7",
                "-c",
                "write -z 131072 65536",
            ],
            &path,
            &[],
        );
        let opened = open(&path, Format::Qcow2, &opts(key(PW), false)).expect("open");
        assert_eq!(
            read_all(opened.device.as_ref()),
            qemu_content(&w, &path),
            "{format} {extra}"
        );
        // Unaligned reads inside sectors.
        let mut b = vec![0u8; 3];
        opened.device.read_at(&mut b, 300002).unwrap();
        assert_eq!(b, [0xa5; 3]);
    }
}

/// Writes through the library (unaligned, partial sectors, overwrites of allocated clusters,
/// zeroes and discards), modelled in a buffer; qemu-img must read the model back.
fn write_and_judge(w: &Work, path: &Path, what: &str) {
    let size = 2 << 20;
    let mut model = qemu_content(w, path);
    assert_eq!(model.len(), size);
    let opened = open(path, Format::Qcow2, &opts(key(PW), true)).expect("open rw");
    let dev = opened.device.as_ref();
    let mut rng = Rng(0xc0ffee);
    let writes: [(u64, usize); 7] = [
        (0, 512),
        (513, 511),
        (1000, 70_000),
        (65_530, 20),
        (300_001, 7),
        (1_048_575, 131_074),
        (size as u64 - 3, 3),
    ];
    for (off, len) in writes {
        let data = rng.bytes(len);
        dev.write_at(&data, off).expect("write");
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    dev.write_zeroes(4096, 8192).expect("write zeroes");
    model[4096..4096 + 8192].fill(0);
    // Unaligned zeroes (found by the write_sequence fuzz target): partial sectors.
    dev.write_zeroes(28_896, 65_072)
        .expect("unaligned write zeroes");
    model[28_896..28_896 + 65_072].fill(0);
    dev.discard(1 << 20, 65536).expect("discard");
    model[1 << 20..(1 << 20) + 65536].fill(0);
    dev.write_at(&[7u8; 100], (1 << 20) + 10)
        .expect("write after discard");
    model[(1 << 20) + 10..(1 << 20) + 110].fill(7);
    assert_eq!(read_all(dev), model, "{what}: our own read-back");
    opened.close().expect("close");
    assert_eq!(qemu_content(w, path), model, "{what}: qemu-img's read-back");
    qemu_check_clean(w, path);
}

#[test]
fn our_writes_read_back_in_qemu() {
    let w = Work::new();
    for (i, (format, extra)) in KINDS.iter().enumerate() {
        let path = qemu_create(&w, &format!("w{i}.qcow2"), format, extra, "2M");
        qemu(&w, "qemu-io", &["-c", "write -P 0x33 0 1M"], &path, &[]);
        write_and_judge(&w, &path, &format!("{format} {extra}"));
    }
}

#[test]
fn images_we_create_open_in_qemu() {
    let w = Work::new();
    let quick = LuksCreateOptions {
        kdf: KdfCost::Iterations {
            master: 1000,
            slot: 1000,
        },
        ..Default::default()
    };
    for (i, format) in [EncryptionFormat::Luks, EncryptionFormat::Aes]
        .into_iter()
        .enumerate()
    {
        for cs in [512u64, 65536] {
            let path = w.path(&format!("c{i}-{cs}.qcow2"));
            let o = CreateOptions {
                size: Some(2 << 20),
                cluster_size: cs,
                encryption: Some(CreateEncryption {
                    format,
                    passphrase: Passphrase::new(PW),
                    luks: quick,
                }),
                ..Default::default()
            };
            create_qcow2(&path, &o).expect("create");
            qemu_check_clean(&w, &path);
            let info = run_tool("qemu-img", &["info", path.to_str().unwrap()], w.dir.path());
            assert!(info.contains("encrypted: yes"), "{info}");
            assert!(
                info.contains(&format!("format: {}", format.name())),
                "{info}"
            );
            assert_eq!(qemu_content(&w, &path), vec![0u8; 2 << 20]);
            write_and_judge(&w, &path, &format!("{} {cs}", format.name()));
        }
    }
}

#[test]
fn keys_are_checked_and_refusals_are_clear() {
    let w = Work::new();
    let luks = qemu_create(&w, "l.qcow2", "luks", "", "1M");
    let aes = qemu_create(&w, "a.qcow2", "aes", "", "1M");
    let err = |p: &Path, enc: EncryptionOptions| {
        open(p, Format::Qcow2, &opts(enc, false))
            .err()
            .expect("open must fail")
    };
    assert!(matches!(
        err(&luks, EncryptionOptions::default()),
        Error::EncryptedNoKey { method: "luks" }
    ));
    assert!(matches!(
        err(&aes, EncryptionOptions::default()),
        Error::EncryptedNoKey { method: "aes" }
    ));
    assert!(matches!(
        err(&luks, key("wrong")),
        Error::Crypto(CryptoError::WrongPassphrase)
    ));
    let mut mismatch = key(PW);
    mismatch.format = Some(EncryptionFormat::Luks);
    assert_eq!(
        err(&aes, mismatch).to_string(),
        "Header reported 'aes' encryption format but options specify 'luks'"
    );
    qemu(&w, "qemu-io", &["-c", "write -P 1 0 4k"], &luks, &[]);
    // Metadata only: the image opens, guest data does not read.
    let meta = EncryptionOptions {
        metadata_only: true,
        ..Default::default()
    };
    let opened = open(&luks, Format::Qcow2, &opts(meta, false)).expect("metadata open");
    let q = opened.qcow2.as_ref().expect("qcow2");
    let info = q.encryption().expect("encrypted");
    assert!(!info.unlocked);
    assert_eq!(info.format, EncryptionFormat::Luks);
    let mut b = [0u8; 512];
    assert!(matches!(
        opened.device.read_at(&mut b, 0),
        Err(Error::EncryptedNoKey { .. })
    ));
    drop(opened);
    // Compressed clusters would be stored in the clear: refused.
    let opened = open(&luks, Format::Qcow2, &opts(key(PW), true)).expect("open rw");
    let q = opened.qcow2.as_ref().expect("qcow2");
    let e = q.write_compressed(65536, &vec![3u8; 65536]).unwrap_err();
    assert!(e.to_string().contains("Compression and encryption"), "{e}");
    // Host offsets of encrypted data are not shown (as QEMU).
    let ext = opened.device.block_status(0, 4096).unwrap();
    assert_eq!(ext.host_offset, None);
    opened.close().unwrap();
}

/// The top image's key is never used for a backing file: each layer takes its own.
#[test]
fn backing_layers_take_their_own_keys() {
    let w = Work::new();
    let base = qemu_create(&w, "base.qcow2", "aes", "", "1M");
    qemu(&w, "qemu-io", &["-c", "write -P 0x42 0 64k"], &base, &[]);
    let top = w.path("top.qcow2");
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
    let e = open(&top, Format::Qcow2, &opts(key(PW), false))
        .err()
        .expect("backing without its key");
    assert!(
        matches!(e.into_innermost(), Error::EncryptedNoKey { method: "aes" }),
        "the top's key must not open the backing file"
    );
    let mut o = opts(EncryptionOptions::default(), false);
    o.backing_encryption = vec![key(PW)];
    let opened = open(&top, Format::Qcow2, &o).expect("open with the backing key");
    let mut b = vec![0u8; 65536];
    opened.device.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x42));
}

/// Attacker's side: the refcounts of the LUKS header's clusters are zeroed, so the allocator
/// sees them free. A guest write must not land on the key material.
#[test]
fn encryption_header_is_guarded_when_refcounts_lie() {
    let w = Work::new();
    let path = qemu_create(&w, "h.qcow2", "luks", "", "1M");
    let mut file = std::fs::read(&path).unwrap();
    // qemu-img's layout: header, refcount table, refcount block at 128 KiB, L1 at 192 KiB,
    // the LUKS header from 256 KiB (clusters 4 and up, 2-byte refcounts).
    let ext_off = u64::from_be_bytes(file[0x70 + 8..0x70 + 16].try_into().unwrap());
    assert_eq!(ext_off, 4 * 65536, "the LUKS header where qemu-img puts it");
    let block = 2 * 65536;
    for c in 4..40 {
        file[block + 2 * c] = 0;
        file[block + 2 * c + 1] = 0;
    }
    std::fs::write(&path, &file).unwrap();
    let opened = open(&path, Format::Qcow2, &opts(key(PW), true)).expect("open rw");
    let r = opened.device.write_at(&[0xeeu8; 65536], 0);
    let e = r.expect_err("the write must be refused");
    assert!(
        e.to_string()
            .contains("Preventing invalid write on metadata (overlaps with encryption header)"),
        "{e}"
    );
    drop(opened);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        &after[ext_off as usize..ext_off as usize + 0x1f9000],
        &file[ext_off as usize..ext_off as usize + 0x1f9000],
        "the key material is intact"
    );
}

/// Every operation that recounts the image's metadata (snapshot create/apply/delete, a new
/// refcount width) must count the LUKS header's clusters: `qemu-img check` stays clean and the
/// key still opens the image.
#[test]
fn metadata_operations_keep_the_encryption_header() {
    use qcow2kit::engine::{NewSnapshot, SnapshotRef};
    let w = Work::new();
    let path = qemu_create(&w, "m.qcow2", "luks", "", "1M");
    qemu(&w, "qemu-io", &["-c", "write -P 0x61 0 100k"], &path, &[]);
    let before = qemu_content(&w, &path);
    {
        let opened = open(&path, Format::Qcow2, &opts(key(PW), true)).expect("open rw");
        let q = opened.qcow2.as_ref().expect("qcow2");
        q.create_snapshot(&NewSnapshot::now("s1"))
            .expect("snapshot");
        opened.device.write_at(&[0x62; 4096], 0).expect("write");
        q.change_refcount_width(4).expect("refcount width");
        q.apply_snapshot(&SnapshotRef::parse("s1").unwrap())
            .expect("apply");
        q.delete_snapshot(&SnapshotRef::parse("s1").unwrap())
            .expect("delete");
        opened.close().expect("close");
    }
    qemu_check_clean(&w, &path);
    assert_eq!(qemu_content(&w, &path), before);
}
