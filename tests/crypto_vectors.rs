//! Known answers for the encryption layer, from images qemu-img 10 makes: our unlock of the LUKS
//! header qemu-img wrote gives a master key that decrypts the data clusters qemu-io wrote (host
//! sector numbers for LUKS, guest sector numbers for legacy AES), for every cipher, mode, IV
//! generator and hash qemu-img offers; a wrong passphrase gets QEMU's error; hostile headers get
//! QEMU's errors (compared with qemu-io's own) before any key-derivation work; and a header we
//! create, put into a qemu-img image with data we encrypted, is opened and read by qemu-io.

use qcow2kit::crypto::luks::{self, KdfCost, LuksCreateOptions, LuksHeader, LuksLimits};
use qcow2kit::crypto::{
    CipherAlg, CipherMode, CipherSpec, CryptoError, HashAlg, IvGenAlg, SectorCipher,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PW: &str = "pw";

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret(pw: &str) -> String {
    format!("secret,id=s,data={pw}")
}

fn image_opts(path: &Path, format: &str) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.format={format},encrypt.key-secret=s",
        path.display()
    )
}

/// qemu-io on `path` opened with passphrase `pw`: (success, stdout + stderr).
fn qemu_io(path: &Path, format: &str, pw: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec![
        "--object".to_string(),
        secret(pw),
        "--image-opts".into(),
        image_opts(path, format),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("running qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io reports a failed read-back check in its output but still exits 0.
    let ok = out.status.success() && !text.contains("Pattern verification failed");
    (ok, text)
}

/// An image qemu-img made with `-o encrypt.format=FORMAT,...,EXTRA` and qemu-io wrote: 0x5a over
/// guest [0, 64k) and 0xa5 over guest [64k, 68k).
fn qemu_image(dir: &Path, name: &str, format: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    let mut o = format!("encrypt.format={format},encrypt.key-secret=s");
    if format == "luks" {
        o.push_str(",encrypt.iter-time=10");
    }
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    let p = path.to_str().expect("utf-8 path");
    let sec = secret(PW);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", &sec, "-o", &o, p, "1M",
        ],
    );
    let (ok, text) = qemu_io(
        &path,
        format,
        PW,
        &["write -P 0x5a 0 64k", "write -P 0xa5 64k 4k"],
    );
    assert!(ok, "qemu-io write on {name}: {text}");
    path
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The (offset, length) of the full-disk-encryption header extension.
fn crypto_extension(file: &[u8]) -> (usize, usize) {
    let mut at = be32(file, 100) as usize;
    loop {
        let (kind, len) = (be32(file, at), be32(file, at + 4) as usize);
        assert_ne!(kind, 0, "no crypto header extension");
        if kind == 0x0537_be77 {
            return (be64(file, at + 8) as usize, be64(file, at + 16) as usize);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// The host offset of guest cluster `index`, from the L1 and L2 tables.
fn host_cluster(file: &[u8], index: u64) -> usize {
    let cluster_bits = be32(file, 20);
    let l2_entries = 1u64 << (cluster_bits - 3);
    let l1 = be64(file, 40) as usize;
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let l2 = (be64(file, l1 + 8 * (index / l2_entries) as usize) & mask) as usize;
    let entry = be64(file, l2 + 8 * (index % l2_entries) as usize) & mask;
    assert_ne!(entry, 0, "guest cluster {index} is not allocated");
    entry as usize
}

fn limits() -> LuksLimits {
    LuksLimits::default()
}

/// Checks a qemu-img LUKS image: unlock with PW, data decrypts with host sector numbers (and
/// not with guest ones), re-encrypting gives qemu's ciphertext back, a wrong passphrase fails.
fn check_luks_image(path: &Path, expect: &CipherSpec, hash: HashAlg) {
    let file = std::fs::read(path).unwrap();
    let (off, len) = crypto_extension(&file);
    let area = &file[off..off + len];
    let header = LuksHeader::parse(area).unwrap();
    assert_eq!(&header.cipher, expect, "{}", path.display());
    assert_eq!(header.hash, hash);
    assert_eq!(header.payload_offset() as usize, len);
    let key = header.unlock(area, PW.as_bytes(), &limits()).unwrap();
    assert_eq!(key.as_bytes().len(), expect.key_len());
    let cipher = header.sector_cipher(&key).unwrap();
    let cluster = 65536;
    for (guest, pattern) in [(0u64, 0x5au8), (1, 0xa5)] {
        let host = host_cluster(&file, guest);
        let n = if guest == 0 { cluster } else { 4096 };
        let ciphertext = &file[host..host + n];
        let mut buf = ciphertext.to_vec();
        cipher.decrypt(host as u64 / 512, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == pattern),
            "{}: guest cluster {guest} does not decrypt",
            path.display()
        );
        cipher.encrypt(host as u64 / 512, &mut buf).unwrap();
        assert_eq!(buf, ciphertext);
        if expect.mode != CipherMode::Ecb {
            let mut wrong = ciphertext.to_vec();
            cipher.decrypt(guest * 128, &mut wrong).unwrap();
            assert!(
                wrong.iter().any(|&b| b != pattern),
                "guest numbering works too?"
            );
        }
    }
    let err = header.unlock(area, b"pw2", &limits()).unwrap_err();
    assert!(matches!(err, CryptoError::WrongPassphrase));
    assert_eq!(
        err.to_string(),
        "Invalid password, cannot unlock any keyslot"
    );
}

fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg, h: Option<HashAlg>) -> CipherSpec {
    CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash: h,
    }
}

#[test]
fn every_cipher_alg_qemu_img_offers() {
    let dir = tempfile::tempdir().unwrap();
    for alg in [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
    ] {
        let name = format!("{}.qcow2", alg.name());
        let extra = format!("encrypt.cipher-alg={}", alg.name());
        let path = qemu_image(dir.path(), &name, "luks", &extra);
        let want = spec(alg, CipherMode::Xts, IvGenAlg::Plain64, None);
        check_luks_image(&path, &want, HashAlg::Sha256);
    }
}

/// CAST5 (64-bit blocks): every mode and IV generator qemu-img accepts with it (not XTS, not
/// ESSIV).
#[test]
fn cast5_in_the_modes_qemu_img_offers() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, ivgen) in [
        (CipherMode::Cbc, IvGenAlg::Plain64),
        (CipherMode::Cbc, IvGenAlg::Plain),
        (CipherMode::Ctr, IvGenAlg::Plain64),
        (CipherMode::Ecb, IvGenAlg::Plain64),
    ] {
        let name = format!("cast5-{}-{}.qcow2", mode.name(), ivgen.name());
        let extra = format!(
            "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode={},encrypt.ivgen-alg={}",
            mode.name(),
            ivgen.name()
        );
        let path = qemu_image(dir.path(), &name, "luks", &extra);
        let want = spec(CipherAlg::Cast5_128, mode, ivgen, None);
        check_luks_image(&path, &want, HashAlg::Sha256);
    }
}

#[test]
fn every_mode_and_iv_generator() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [
        CipherMode::Xts,
        CipherMode::Cbc,
        CipherMode::Ctr,
        CipherMode::Ecb,
    ] {
        for ivgen in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
            for alg in [CipherAlg::Aes128, CipherAlg::Aes256] {
                let name = format!("{}-{}-{}.qcow2", alg.name(), mode.name(), ivgen.name());
                let extra = format!(
                    "encrypt.cipher-alg={},encrypt.cipher-mode={},encrypt.ivgen-alg={}",
                    alg.name(),
                    mode.name(),
                    ivgen.name()
                );
                let path = qemu_image(dir.path(), &name, "luks", &extra);
                let h = (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256);
                check_luks_image(&path, &spec(alg, mode, ivgen, h), HashAlg::Sha256);
            }
        }
    }
}

#[test]
fn every_hash_and_ivgen_hash() {
    let dir = tempfile::tempdir().unwrap();
    for hash in qcow2kit::crypto::pbkdf::ALL_HASHES {
        let name = format!("hash-{}.qcow2", hash.name());
        let extra = format!("encrypt.hash-alg={}", hash.name());
        let path = qemu_image(dir.path(), &name, "luks", &extra);
        let want = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);
        check_luks_image(&path, &want, hash);
    }
    // ESSIV with each hash whose digest is an AES key length (qemu-img refuses the others).
    for (alg, ivhash) in [
        (CipherAlg::Aes128, HashAlg::Md5),
        (CipherAlg::Aes128, HashAlg::Sha256),
        (CipherAlg::Serpent128, HashAlg::Sm3),
        (CipherAlg::Twofish128, HashAlg::Sha256),
    ] {
        let name = format!("essiv-{}-{}.qcow2", alg.name(), ivhash.name());
        let extra = format!(
            "encrypt.cipher-alg={},encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.ivgen-hash-alg={}",
            alg.name(),
            ivhash.name()
        );
        let path = qemu_image(dir.path(), &name, "luks", &extra);
        let want = spec(alg, CipherMode::Cbc, IvGenAlg::Essiv, Some(ivhash));
        check_luks_image(&path, &want, HashAlg::Sha256);
    }
}

/// Legacy AES (crypt_method 1): the key is the passphrase, the IV the *guest* sector number.
#[test]
fn legacy_aes_uses_the_passphrase_and_guest_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "aes.qcow2", "aes", "");
    let file = std::fs::read(&path).unwrap();
    assert_eq!(be32(&file, 32), 1, "crypt_method");
    let cipher = SectorCipher::legacy_qcow(PW.as_bytes());
    for (guest, pattern) in [(0u64, 0x5au8), (1, 0xa5)] {
        let host = host_cluster(&file, guest);
        assert_ne!(host as u64, guest * 65536);
        let ciphertext = &file[host..host + 4096];
        let mut buf = ciphertext.to_vec();
        cipher.decrypt(guest * 128, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == pattern), "guest cluster {guest}");
        cipher.encrypt(guest * 128, &mut buf).unwrap();
        assert_eq!(buf, ciphertext);
        let mut wrong = ciphertext.to_vec();
        cipher.decrypt(host as u64 / 512, &mut wrong).unwrap();
        assert!(wrong.iter().any(|&b| b != pattern));
        let mut wrong = ciphertext.to_vec();
        SectorCipher::legacy_qcow(b"px")
            .decrypt(guest * 128, &mut wrong)
            .unwrap();
        assert!(wrong.iter().any(|&b| b != pattern));
    }
}

/// Passphrases longer than 16 bytes are cut to 16, shorter ones zero-padded (QEMU's rule):
/// qemu-io reads an image written under "0123456789abcdefXYZ" with "0123456789abcdef".
#[test]
fn legacy_aes_key_is_the_first_16_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.qcow2");
    let p = path.to_str().unwrap();
    let long = "0123456789abcdefXYZ";
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &secret(long),
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            p,
            "1M",
        ],
    );
    let (ok, text) = qemu_io(&path, "aes", long, &["write -P 0x11 0 4k"]);
    assert!(ok, "{text}");
    let file = std::fs::read(&path).unwrap();
    let host = host_cluster(&file, 0);
    let mut buf = file[host..host + 4096].to_vec();
    SectorCipher::legacy_qcow(b"0123456789abcdef")
        .decrypt(0, &mut buf)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
}

/// A header and key slot we create, with data we encrypt, replace qemu-img's in its own image:
/// qemu-io opens it with our passphrase (not with qemu-img's) and reads our data; qemu-img info
/// reports our parameters.
#[test]
fn qemu_opens_a_header_we_created() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None),
            HashAlg::Sha256,
        ),
        (
            spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv, None),
            HashAlg::Sha1,
        ),
        (
            spec(
                CipherAlg::Twofish256,
                CipherMode::Ctr,
                IvGenAlg::Plain,
                None,
            ),
            HashAlg::Sha512,
        ),
        (
            spec(
                CipherAlg::Cast5_128,
                CipherMode::Cbc,
                IvGenAlg::Plain64,
                None,
            ),
            HashAlg::Ripemd160,
        ),
    ];
    for (i, (cipher, hash)) in cases.into_iter().enumerate() {
        let mut q = format!(
            "encrypt.cipher-alg={},encrypt.cipher-mode={},encrypt.ivgen-alg={},encrypt.hash-alg={}",
            cipher.alg.name(),
            cipher.mode.name(),
            cipher.ivgen.name(),
            hash.name()
        );
        if cipher.ivgen == IvGenAlg::Essiv {
            q.push_str(",encrypt.ivgen-hash-alg=sha256");
        }
        let path = qemu_image(dir.path(), &format!("ours{i}.qcow2"), "luks", &q);
        let mut file = std::fs::read(&path).unwrap();
        let (off, len) = crypto_extension(&file);
        let opts = LuksCreateOptions {
            cipher,
            hash,
            kdf: KdfCost::Iterations {
                master: 1000,
                slot: 2000,
            },
        };
        let (header, area, key) =
            luks::create(b"ours", &opts, &mut qcow2kit::crypto::os_random).unwrap();
        assert_eq!(area.len(), len, "QEMU's layout gives the same area size");
        file[off..off + len].copy_from_slice(&area);
        let c = header.sector_cipher(&key).unwrap();
        let host = host_cluster(&file, 0);
        let mut data = vec![0x3cu8; 65536];
        c.encrypt(host as u64 / 512, &mut data).unwrap();
        file[host..host + 65536].copy_from_slice(&data);
        std::fs::write(&path, &file).unwrap();

        let (ok, text) = qemu_io(&path, "luks", "ours", &["read -P 0x3c 0 64k"]);
        assert!(ok, "case {i}: qemu-io cannot read our header/data: {text}");
        let (ok, text) = qemu_io(&path, "luks", PW, &["read 0 512"]);
        assert!(
            !ok && text.contains("Invalid password, cannot unlock any keyslot"),
            "{text}"
        );
        let info = run(
            "qemu-img",
            &["info", "--output", "json", path.to_str().unwrap()],
        );
        assert!(
            info.contains(&format!("\"cipher-alg\": \"{}\"", cipher.alg.name())),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"hash-alg\": \"{}\"", hash.name())),
            "{info}"
        );
        assert!(info.contains("\"iters\": 2000"), "{info}");
        assert!(
            info.contains(&format!("\"uuid\": \"{}\"", header.uuid_str())),
            "{info}"
        );
        // And we read back what we wrote.
        let back = LuksHeader::parse(&file[off..off + len]).unwrap();
        assert_eq!(back, header);
    }
}

/// One hostile change to qemu-img's header, our expected error (QEMU's message), and whether
/// qemu-io reports the same message when it opens the image.
struct Mutation {
    what: &'static str,
    edit: fn(&mut [u8]),
    message: &'static str,
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

const SLOT0: usize = 208;

fn mutations() -> Vec<Mutation> {
    vec![
        Mutation {
            what: "magic",
            edit: |h| h[0] = b'X',
            message: "Volume is not in LUKS format",
        },
        Mutation {
            what: "version",
            edit: |h| h[7] = 2,
            message: "LUKS version 2 is not supported",
        },
        Mutation {
            what: "cipher name without NUL",
            edit: |h| h[8..40].fill(b'a'),
            message: "LUKS header cipher name is not NUL terminated",
        },
        Mutation {
            what: "hash spec without NUL",
            edit: |h| h[72..104].fill(b's'),
            message: "LUKS header hash spec is not NUL terminated",
        },
        Mutation {
            what: "payload inside the header",
            edit: |h| put32(h, 104, 7),
            message: "LUKS payload is overlapping with the header",
        },
        Mutation {
            what: "stripes 0",
            edit: |h| put32(h, SLOT0 + 3 * 48 + 44, 0),
            message: "Keyslot 3 is corrupted (stripes 0 != 4000)",
        },
        Mutation {
            what: "huge stripes",
            edit: |h| put32(h, SLOT0 + 7 * 48 + 44, u32::MAX),
            message: "Keyslot 7 is corrupted (stripes -1 != 4000)",
        },
        Mutation {
            what: "master key iterations 0",
            edit: |h| put32(h, 164, 0),
            message: "LUKS key iteration count is zero",
        },
        Mutation {
            what: "active slot iterations 0",
            edit: |h| put32(h, SLOT0 + 4, 0),
            message: "Keyslot 0 iteration count is zero",
        },
        Mutation {
            what: "slot state",
            edit: |h| put32(h, SLOT0 + 48, 0x1234),
            message: "Keyslot 1 state (active/disable) is corrupted",
        },
        Mutation {
            what: "slot inside the header",
            edit: |h| put32(h, SLOT0 + 40, 1),
            message: "Keyslot 0 is overlapping with the LUKS header",
        },
        Mutation {
            what: "slot reaching into the payload",
            edit: |h| put32(h, SLOT0 + 7 * 48 + 40, 4000),
            message: "Keyslot 7 is overlapping with the encrypted payload",
        },
        Mutation {
            what: "slots overlapping",
            edit: |h| put32(h, SLOT0 + 2 * 48 + 40, 8 + 504 + 100),
            message: "Keyslots 1 and 2 are overlapping in the header",
        },
        Mutation {
            what: "unknown cipher",
            edit: |h| h[8..12].copy_from_slice(b"des\0"),
            message: "Algorithm 'des' with key size 32 bytes not supported",
        },
        Mutation {
            what: "key size",
            edit: |h| put32(h, 108, 40),
            message: "Algorithm 'aes' with key size 20 bytes not supported",
        },
        Mutation {
            what: "mode without ivgen",
            edit: |h| h[40..72].copy_from_slice(&[b"xts\0".as_slice(), &[0; 28]].concat()),
            message: "Unexpected cipher mode string format 'xts'",
        },
        Mutation {
            what: "unknown mode",
            edit: |h| h[40..43].copy_from_slice(b"ofb"),
            message: "Cipher mode 'ofb' not supported",
        },
        Mutation {
            what: "unknown ivgen",
            edit: |h| h[40..72].copy_from_slice(&[b"xts-tcw\0".as_slice(), &[0; 24]].concat()),
            message: "IV generator 'tcw' not supported",
        },
        Mutation {
            what: "essiv without hash",
            edit: |h| h[40..72].copy_from_slice(&[b"xts-essiv\0".as_slice(), &[0; 22]].concat()),
            message: "Missing IV generator hash specification",
        },
        Mutation {
            what: "unknown hash",
            edit: |h| h[72..104].copy_from_slice(&[b"whirlpool\0".as_slice(), &[0; 22]].concat()),
            message: "Hash algorithm 'whirlpool' not supported",
        },
        Mutation {
            what: "essiv hash with no AES key length",
            edit: |h| {
                h[40..72].copy_from_slice(&[b"xts-essiv:sha1\0".as_slice(), &[0; 17]].concat())
            },
            message: "No AES cipher with key size 20 available",
        },
    ]
}

#[test]
fn hostile_headers_get_qemus_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "base.qcow2", "luks", "");
    let base = std::fs::read(&path).unwrap();
    let (off, len) = crypto_extension(&base);
    for m in mutations() {
        let mut file = base.clone();
        (m.edit)(&mut file[off..off + 592]);
        let err = LuksHeader::parse(&file[off..off + len]).unwrap_err();
        assert_eq!(err.to_string(), m.message, "{}", m.what);
        let mutated = dir.path().join("mutated.qcow2");
        std::fs::write(&mutated, &file).unwrap();
        let (ok, text) = qemu_io(&mutated, "luks", PW, &["read 0 512"]);
        assert!(!ok, "{}: qemu-io opened it", m.what);
        assert!(text.contains(m.message), "{}: qemu-io says {text}", m.what);
    }
}

/// Key-derivation work is bounded before it starts: a slot or master digest asking for more
/// iterations than the caller allows is refused at once, as is key material past the area.
#[test]
fn unlock_work_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "bound.qcow2", "luks", "");
    let base = std::fs::read(&path).unwrap();
    let (off, len) = crypto_extension(&base);
    let mut area = base[off..off + len].to_vec();

    // Slot 0 asking for 4 billion iterations (hours of PBKDF2) is refused in no time.
    put32(&mut area, SLOT0 + 4, u32::MAX);
    let h = LuksHeader::parse(&area).unwrap();
    let start = Instant::now();
    let err = h.unlock(&area, PW.as_bytes(), &limits()).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(
            err,
            CryptoError::IterationsAboveLimit {
                iterations: u32::MAX,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("keyslot 0"), "{err}");

    // The master-key digest likewise.
    let mut area = base[off..off + len].to_vec();
    put32(&mut area, 164, u32::MAX);
    let h = LuksHeader::parse(&area).unwrap();
    let err = h.unlock(&area, PW.as_bytes(), &limits()).unwrap_err();
    assert!(err.to_string().contains("the master key digest"), "{err}");

    // A caller's tighter bound below qemu-img's count refuses a genuine slot.
    let area = base[off..off + len].to_vec();
    let h = LuksHeader::parse(&area).unwrap();
    let tight = LuksLimits {
        max_iterations: h.slots[0].iterations - 1,
    };
    assert!(matches!(
        h.unlock(&area, PW.as_bytes(), &tight),
        Err(CryptoError::IterationsAboveLimit { .. })
    ));

    // Key material cut off by a short area (the header claims more than the caller has).
    let short = &area[..4096 + 1000];
    let h = LuksHeader::parse(short).unwrap();
    let err = h.unlock(short, PW.as_bytes(), &limits()).unwrap_err();
    assert!(
        err.to_string().contains("outside the LUKS header area"),
        "{err}"
    );
}

/// A second key slot filled by us opens the image in qemu-io too, and any active slot unlocks.
#[test]
fn a_second_key_slot_we_store_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "slot.qcow2", "luks", "");
    let mut file = std::fs::read(&path).unwrap();
    let (off, len) = crypto_extension(&file);
    let area = &mut file[off..off + len];
    let mut header = LuksHeader::parse(area).unwrap();
    let key = header.unlock(area, PW.as_bytes(), &limits()).unwrap();
    header
        .store_key(
            area,
            5,
            b"second",
            &key,
            1500,
            &mut qcow2kit::crypto::os_random,
        )
        .unwrap();
    area[..592].copy_from_slice(&header.to_bytes());
    let again = header.unlock(area, b"second", &limits()).unwrap();
    assert_eq!(again.as_bytes(), key.as_bytes());
    std::fs::write(&path, &file).unwrap();
    let (ok, text) = qemu_io(&path, "luks", "second", &["read -P 0x5a 0 64k"]);
    assert!(ok, "{text}");
    let (ok, text) = qemu_io(&path, "luks", PW, &["read -P 0x5a 0 64k"]);
    assert!(ok, "{text}");
}
