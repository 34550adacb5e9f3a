//! The write-model streams of `tests/write_model.rs` on encrypted images.
//!
//! Random streams of writes (unaligned, partial sectors, crossing clusters), zero writes,
//! discards, flushes, reopens and grows go through qcow2kit and into a `Vec<u8>` model, on LUKS
//! images (aes-256-xts-plain64) created by qcow2kit and by qemu-img, with 512-byte and 64 KiB
//! clusters and extended L2, with a qcow2 backing file (an encrypted overlay on a plain base,
//! and a plain overlay on an encrypted base), and on one legacy-AES image. Each stream is
//! judged as the plain ones: every op's neighbourhood and then the whole device read back
//! equal to the model, `qemu-img check` (with the key) is clean, `qemu-img compare` of the
//! image (decrypted by qemu with the key) and the model says identical, and a read-only reopen
//! reads the model again. The keys reach qemu-img as `--object secret` and `--image-opts …
//! encrypt.key-secret` (`backing.encrypt.key-secret` for an encrypted backing file).
//!
//! Knobs as in `tests/write_model.rs`: `QCOW2KIT_MODEL_CASES` (default 2 per configuration),
//! `QCOW2KIT_MODEL_SEED`, `QCOW2KIT_KEEP`.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use qcow2kit::chain::OpenOptions;
use qcow2kit::crypto::luks::{KdfCost, LuksCreateOptions};
use qcow2kit::crypto::{EncryptionFormat, Passphrase};
use qcow2kit::engine::EncryptionOptions;
use qcow2kit::ops::create::{create_qcow2, CreateEncryption, CreateOptions};
use qcow2kit::Format;
use std::fs;
use std::path::Path;
use write_helpers::*;

const PW: &str = "model-pass";
const SECRET: &str = "secret,id=k,data=model-pass";

/// Which layer of a two-image chain is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encrypted {
    /// The image under test (over a plain backing file, if any).
    Top,
    /// Only its backing file (the image under test is plain).
    Base,
}

/// The images `qemu-img create` made, by their options: every LUKS create calibrates PBKDF2
/// for about a second, so each configuration's image is made once and copied for each stream
/// (the copies share their master key, which the tests do not mind).
static CREATED: std::sync::Mutex<Vec<(String, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());

/// `qemu-img create -f qcow2 -o OPTIONS BACKING… NAME SIZE` in `dir` (with the secret
/// defined), or a copy of the image an identical command made before.
fn qemu_create(dir: &Path, options: &str, backing: &[&str], name: &str, size: &str) {
    let key = format!("{options} {backing:?} {size}");
    let mut made = CREATED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, bytes)) = made.iter().find(|(k, _)| *k == key) {
        fs::write(dir.join(name), bytes).expect("copying a created image");
        return;
    }
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", options,
    ];
    args.extend(backing);
    args.extend([name, size]);
    qemu_img(&args, dir);
    let bytes = fs::read(dir.join(name)).expect("reading a created image");
    made.push((key, bytes));
}

#[derive(Debug, Clone)]
struct EncCfg {
    /// `luks` or `aes`.
    format: &'static str,
    cluster: u64,
    extended_l2: bool,
    size: u64,
    /// Created by qemu-img (else by qcow2kit).
    qemu_create: bool,
    /// A qcow2 backing file (64 KiB clusters, 3/4 of the size, data written by qemu-io).
    backing: bool,
    which: Encrypted,
    /// More `-o` options of qemu-img create for the encrypted layer (cipher choices).
    cipher_options: &'static str,
}

impl EncCfg {
    fn top_encrypted(&self) -> bool {
        self.which == Encrypted::Top
    }

    fn base_encrypted(&self) -> bool {
        self.backing && self.which == Encrypted::Base
    }

    /// The plain configuration with the same geometry (stream shape, discard semantics).
    fn plain(&self) -> Cfg {
        Cfg {
            cluster: self.cluster,
            extended_l2: self.extended_l2,
            size: self.size,
            ..Cfg::default()
        }
    }

    /// qemu's `--image-opts` of `img` with the keys the chain needs.
    fn image_opts(&self, img: &str) -> String {
        let mut s = format!("driver=qcow2,file.filename={img}");
        if self.top_encrypted() {
            s.push_str(",encrypt.key-secret=k");
        }
        if self.base_encrypted() {
            s.push_str(",backing.encrypt.key-secret=k");
        }
        s
    }

    /// qcow2kit's open options with the keys the chain needs.
    fn open_options(&self, writable: bool) -> OpenOptions {
        let key = EncryptionOptions {
            passphrase: Some(Passphrase::new(PW)),
            ..Default::default()
        };
        let mut o = OpenOptions::qemu_compatible();
        o.writable = writable;
        if self.top_encrypted() {
            o.qcow2.encryption = key.clone();
        }
        if self.base_encrypted() {
            o.backing_encryption = vec![key];
        }
        o
    }

    /// `-o` of qemu-img create for an encrypted image of this format. One millisecond of
    /// PBKDF2 (about 4000 slot iterations here): unoptimised test builds unlock at a fraction
    /// of QEMU's speed, and every open unlocks.
    fn qemu_encrypt_options(&self) -> String {
        let mut o = format!("encrypt.format={},encrypt.key-secret=k", self.format);
        if self.format == "luks" {
            o.push_str(",encrypt.iter-time=1");
        }
        if !self.cipher_options.is_empty() {
            o = format!("{o},{}", self.cipher_options);
        }
        o
    }

    /// Builds the backing file with data, returning its size.
    fn make_backing(&self, dir: &Path, seed: u64) -> u64 {
        let bsize = (self.size / 4 * 3) & !511;
        let mut o = "cluster_size=65536".to_string();
        if self.base_encrypted() {
            o = format!("{o},{}", self.qemu_encrypt_options());
        }
        let size = bsize.to_string();
        qemu_create(dir, &o, &[], "base.qcow2", &size);
        let mut rng = Rng(seed ^ 0xba5e);
        let mut args: Vec<String> = vec!["--object".into(), SECRET.into(), "--image-opts".into()];
        for _ in 0..16 {
            let off = rng.below(bsize);
            let len = rng.range(1, 200 * K).min(bsize - off);
            args.push("-c".into());
            args.push(format!("write -P {} {off} {len}", rng.range(1, 255)));
        }
        let mut spec = "driver=qcow2,file.filename=base.qcow2".to_string();
        if self.base_encrypted() {
            spec.push_str(",encrypt.key-secret=k");
        }
        args.push(spec);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_io(&a, dir);
        bsize
    }

    /// Creates `img.qcow2` (and its backing file) in `dir`; returns the model of its content
    /// (qemu-img's decrypted raw export).
    fn create(&self, dir: &Path, seed: u64) -> Model {
        if self.backing {
            self.make_backing(dir, seed);
        }
        if self.qemu_create {
            let mut o = format!("cluster_size={}", self.cluster);
            if self.extended_l2 {
                o.push_str(",extended_l2=on");
            }
            if self.top_encrypted() {
                o = format!("{o},{}", self.qemu_encrypt_options());
            }
            let size = self.size.to_string();
            let backing: &[&str] = if self.backing {
                &["-b", "base.qcow2", "-F", "qcow2"]
            } else {
                &[]
            };
            qemu_create(dir, &o, backing, "img.qcow2", &size);
        } else {
            let format = match self.format {
                "luks" => EncryptionFormat::Luks,
                _ => EncryptionFormat::Aes,
            };
            let o = CreateOptions {
                size: Some(self.size),
                cluster_size: self.cluster,
                extended_l2: self.extended_l2,
                backing_file: self.backing.then(|| "base.qcow2".into()),
                backing_format: self.backing.then(|| "qcow2".into()),
                encryption: self.top_encrypted().then(|| CreateEncryption {
                    format,
                    passphrase: Passphrase::new(PW),
                    luks: LuksCreateOptions {
                        kdf: KdfCost::Iterations {
                            master: 1000,
                            slot: 1000,
                        },
                        ..LuksCreateOptions::default()
                    },
                }),
                ..CreateOptions::default()
            };
            create_qcow2(&dir.join("img.qcow2"), &o)
                .unwrap_or_else(|e| panic!("create_qcow2 with {self:?}: {e}"));
        }
        self.assert_encrypted(dir);
        let img_opts = self.image_opts("img.qcow2");
        qemu_img(
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &img_opts,
                "-O",
                "raw",
                "initial.raw",
            ],
            dir,
        );
        let data = fs::read(dir.join("initial.raw")).expect("reading the initial export");
        assert_eq!(data.len() as u64, self.size, "initial export size");
        Model {
            data,
            sem: self.plain().semantics(),
        }
    }

    /// qemu-img info names the method of each encrypted layer.
    fn assert_encrypted(&self, dir: &Path) {
        for (file, enc) in [
            ("img.qcow2", self.top_encrypted()),
            ("base.qcow2", self.base_encrypted()),
        ] {
            if !enc {
                continue;
            }
            let info = qemu_img(&["info", "-U", file], dir);
            assert!(
                info.contains("encrypted: yes")
                    && info.contains(&format!("format: {}", self.format)),
                "{file} is not {} encrypted: {info}",
                self.format
            );
            // `encrypt.cipher-alg=aes-128` shows as `cipher alg: aes-128`.
            for kv in self.cipher_options.split(',').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').expect("key=value");
                let line = format!(
                    "{}: {v}",
                    k.trim_start_matches("encrypt.").replace('-', " ")
                );
                assert!(info.contains(&line), "{file}: no `{line}` in {info}");
            }
        }
    }

    /// qemu-img check (with the keys) clean, qemu-img compare with the model identical, and a
    /// read-only reopen through qcow2kit equal to the model.
    fn judge(&self, dir: &Path, model: &Model) {
        fs::write(dir.join("model.raw"), &model.data).expect("writing the model");
        let img_opts = self.image_opts("img.qcow2");
        let key = ["--object", SECRET, "--image-opts"];
        let o = tool(
            QEMU_IMG,
            &[&["check"], &key[..], &[&img_opts]].concat(),
            dir,
        );
        assert!(
            o.code == 0 && o.stdout.contains("No errors were found"),
            "qemu-img check ({self:?}) is not clean: {o}"
        );
        let raw = "driver=raw,file.filename=model.raw";
        let o = tool(
            QEMU_IMG,
            &[&["compare"], &key[..], &[&img_opts, raw]].concat(),
            dir,
        );
        assert!(
            o.code == 0 && o.stdout.contains("Images are identical"),
            "qemu-img compare of the image ({self:?}) and the model: {o}"
        );
        let ro = qcow2kit::chain::open(
            &dir.join("img.qcow2"),
            Format::Qcow2,
            &self.open_options(false),
        )
        .expect("read-only reopen");
        assert_same(
            &read_all(ro.device.as_ref()),
            &model.data,
            0,
            "read-back after reopening read-only",
        );
    }
}

/// One stream: create, apply through qcow2kit with the model checked after every op, close,
/// judge.
fn run_stream(cfg: &EncCfg, shape: &StreamShape, raws: &[RawOp]) {
    let seed = raws.first().map_or(7, |r| r.a ^ r.c);
    let ops = shape.realize_all(raws, cfg.size);
    let dir = scratch();
    let d = dir.path();
    let mut model = cfg.create(d, seed);
    let mut live = Live::open_with(&d.join("img.qcow2"), cfg.open_options(true));
    for (i, op) in ops.iter().enumerate() {
        live.apply(op, i);
        model.apply(op);
        spot_check(live.dev(), &model, op, i);
    }
    assert_same(
        &read_all(live.dev()),
        &model.data,
        0,
        "full read-back before close",
    );
    live.close();
    cfg.judge(d, &model);
}

fn model_test(name: &str, cfg: EncCfg, ops: (usize, usize)) {
    let seed = match std::env::var("QCOW2KIT_MODEL_SEED") {
        Ok(s) => s.parse::<u64>().expect("QCOW2KIT_MODEL_SEED is a number"),
        Err(_) => name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_be_bytes());
    let mut runner = TestRunner::new_with_rng(
        proptest_config(cases(2)),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let mut shape = StreamShape::for_cfg(&cfg.plain());
    shape.pct_grow = 2;
    shape.max_size = cfg.size + 3 * cfg.cluster.max(64 * K);
    if let Err(e) = runner.run(&raw_ops(ops.0, ops.1), |raws| {
        let ops = shape.realize_all(&raws, cfg.size);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_stream(&cfg, &shape, &raws)
        })) {
            Ok(()) => Ok(()),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{msg}\nstream of {} ops:\n{}",
                    ops.len(),
                    describe_ops(&ops)
                )
            }
        }
    }) {
        panic!("{name} ({cfg:?}): {e}");
    }
}

fn luks(cluster: u64, qemu_create: bool) -> EncCfg {
    EncCfg {
        format: "luks",
        cluster,
        extended_l2: false,
        size: 2 * M + 1536,
        qemu_create,
        backing: false,
        which: Encrypted::Top,
        cipher_options: "",
    }
}

#[test]
fn luks_ours_64k() {
    model_test("luks_ours_64k", luks(64 * K, false), (80, 250));
}

#[test]
fn luks_qemu_created_64k() {
    model_test("luks_qemu_created_64k", luks(64 * K, true), (80, 250));
}

#[test]
fn luks_ours_512() {
    model_test("luks_ours_512", luks(512, false), (80, 300));
}

#[test]
fn luks_qemu_created_512() {
    model_test("luks_qemu_created_512", luks(512, true), (80, 300));
}

#[test]
fn luks_extended_l2_16k_qemu_created() {
    let cfg = EncCfg {
        extended_l2: true,
        ..luks(16 * K, true)
    };
    model_test("luks_extended_l2_16k_qemu_created", cfg, (80, 300));
}

#[test]
fn luks_extended_l2_64k_ours() {
    let cfg = EncCfg {
        extended_l2: true,
        ..luks(64 * K, false)
    };
    model_test("luks_extended_l2_64k_ours", cfg, (80, 250));
}

/// LUKS with aes-128-cbc-essiv (sha256), qemu-img's other IV generator, on 4 KiB clusters.
#[test]
fn luks_aes128_cbc_essiv_qemu_created_4k() {
    let cfg = EncCfg {
        cipher_options:
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        ..luks(4 * K, true)
    };
    model_test("luks_aes128_cbc_essiv_qemu_created_4k", cfg, (80, 300));
}

/// An encrypted overlay on a plain qcow2 base: copy-on-write reads plaintext from the base
/// and writes ciphertext.
#[test]
fn luks_overlay_on_plain_base() {
    let cfg = EncCfg {
        backing: true,
        ..luks(4 * K, false)
    };
    model_test("luks_overlay_on_plain_base", cfg, (80, 300));
}

/// A plain overlay on a LUKS base opened with its own key: copy-on-write decrypts the base
/// and writes plaintext.
#[test]
fn plain_overlay_on_luks_base() {
    let cfg = EncCfg {
        backing: true,
        which: Encrypted::Base,
        ..luks(16 * K, true)
    };
    model_test("plain_overlay_on_luks_base", cfg, (80, 300));
}

/// Legacy AES-CBC (IV = guest sector), created by qemu-img, over a plain base.
#[test]
fn legacy_aes_qemu_created_over_plain_base() {
    let cfg = EncCfg {
        format: "aes",
        backing: true,
        ..luks(64 * K, true)
    };
    model_test("legacy_aes_qemu_created_over_plain_base", cfg, (80, 250));
}

// ---------------------------------------------------------------------------------------------
// Reproductions of the bugs the streams found.

/// Zero writes that cover part of a 512-byte sector inside an allocated cluster of an encrypted
/// image. Found by the streams above (luks_ours_64k, luks_ours_512, legacy_aes…): the
/// partial-cluster branch of `zero_body` (src/engine/write.rs), and the partial-subcluster
/// edges of `zero_subclusters` with extended L2, hand the unaligned range straight to
/// `write_run`, bypassing the sector widening of `write_impl` (`sector_aligned_write`,
/// src/engine/encryption.rs), so a range ending inside a sector zeroes the rest of it (data
/// loss, silent), and one starting inside a sector of an allocated cluster fails with
/// "encrypted write at host offset … is not sector-aligned".
#[test]
fn unaligned_zero_writes_on_encrypted_images() {
    // Ends inside sector 3; starts inside sector 0; inside one sector of cluster 1.
    let ends_inside = Op::Zero { off: 0, len: 0x7a3 };
    let starts_inside = Op::Zero { off: 100, len: 50 };
    let within = Op::Zero {
        off: 64 * K + 700,
        len: 10,
    };
    let mut failures = Vec::new();
    for (format, extended_l2, zeros) in [
        ("luks", false, vec![ends_inside]),
        ("luks", false, vec![starts_inside]),
        ("luks", false, vec![within]),
        ("aes", false, vec![ends_inside]),
        ("aes", false, vec![starts_inside]),
        ("luks", true, vec![ends_inside, starts_inside, within]),
    ] {
        let cfg = EncCfg {
            format,
            extended_l2,
            ..luks(64 * K, false)
        };
        let r = std::panic::catch_unwind(|| unaligned_zero_writes(&cfg, &zeros));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{format} extended_l2={extended_l2} {zeros:?}: {msg}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn unaligned_zero_writes(cfg: &EncCfg, zeros: &[Op]) {
    let dir = scratch();
    let mut model = cfg.create(dir.path(), 1);
    let mut live = Live::open_with(&dir.path().join("img.qcow2"), cfg.open_options(true));
    let data = Op::Write {
        off: 0,
        len: 128 * K,
        fill: Fill::Random(5),
    };
    for (i, op) in std::iter::once(&data).chain(zeros).enumerate() {
        live.apply(op, i);
        model.apply(op);
        spot_check(live.dev(), &model, op, i);
    }
    live.close();
    cfg.judge(dir.path(), &model);
}

// ---------------------------------------------------------------------------------------------
// Operations on encrypted images, judged by qemu-img (what tests/encryption.rs and
// cli/tests/cli_encrypt.rs do not cover already): convert LUKS -> plain and plain -> LUKS
// through the library, resize (grow and shrink), an internal snapshot's content as qemu-img
// reads it, and `check -r leaks` of a LUKS image.

/// `qemu-img ARGS… --object … --image-opts SPEC…` in `dir`, which must succeed.
fn qemu_keyed(dir: &Path, args: &[&str], specs: &[&str]) -> String {
    let all = [args, &["--object", SECRET, "--image-opts"][..], specs].concat();
    qemu_img(&all, dir)
}

fn luks_spec(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=k")
}

#[test]
fn convert_resize_snapshot_and_repair_encrypted_images() {
    use qcow2kit::ops::check::{repair, RepairMode};
    use qcow2kit::ops::convert::{convert, ConvertOptions, Target, TargetFormat};
    let cfg = EncCfg {
        qemu_create: true,
        ..luks(64 * K, true)
    };
    let dir = scratch();
    let d = dir.path();
    cfg.create(d, 3);
    let spec = luks_spec("img.qcow2");
    let io = |cmds: &[&str]| {
        let mut a = vec!["--object", SECRET, "--image-opts"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(&spec);
        qemu_io(&a, d);
    };
    io(&[
        "write -P 0x11 0 300k",
        "write -P 0x22 1M 70k",
        "write -z 64k 64k",
    ]);
    let key = cfg.open_options(false);
    let convert = |src: &str, enc: &OpenOptions, dst: &str, encrypt: bool| {
        let s = qcow2kit::chain::open(&d.join(src), Format::Qcow2, enc).expect("source");
        let o = ConvertOptions {
            format: TargetFormat::Qcow2(CreateOptions {
                encryption: encrypt.then(|| CreateEncryption {
                    format: EncryptionFormat::Luks,
                    passphrase: Passphrase::new(PW),
                    luks: LuksCreateOptions {
                        kdf: KdfCost::Iterations {
                            master: 1000,
                            slot: 1000,
                        },
                        ..LuksCreateOptions::default()
                    },
                }),
                ..CreateOptions::default()
            }),
            workers: 2,
            ..ConvertOptions::default()
        };
        convert(s.device.as_ref(), Target::NewFile(&d.join(dst)), &o).expect("convert");
    };
    // LUKS -> plain, then plain -> LUKS: each equal to the original as qemu-img reads them.
    convert("img.qcow2", &key, "plain.qcow2", false);
    qemu_keyed(
        d,
        &["compare"],
        &[&spec, "driver=qcow2,file.filename=plain.qcow2"],
    );
    assert_check_clean(d, "plain.qcow2", "converted from LUKS");
    let info = qemu_img(&["info", "plain.qcow2"], d);
    assert!(!info.contains("encrypted"), "{info}");
    convert(
        "plain.qcow2",
        &OpenOptions::qemu_compatible(),
        "back.qcow2",
        true,
    );
    qemu_keyed(d, &["compare"], &[&spec, &luks_spec("back.qcow2")]);
    qemu_keyed(d, &["check"], &[&luks_spec("back.qcow2")]);
    let info = qemu_img(&["info", "back.qcow2"], d);
    assert!(info.contains("format: luks"), "{info}");
    // The plaintext of the first write is nowhere in the re-encrypted file.
    let file = fs::read(d.join("back.qcow2")).unwrap();
    assert!(!file.windows(512).any(|w| w.iter().all(|&b| b == 0x11)));

    // A snapshot, then changes, a grow and a shrink: qemu-img reads the snapshot as it was
    // and the active image as the model says.
    let before = qcow2kit::chain::open(&d.join("img.qcow2"), Format::Qcow2, &key)
        .map(|o| read_all(o.device.as_ref()))
        .expect("reading the image");
    {
        let o = qcow2kit::chain::open(&d.join("img.qcow2"), Format::Qcow2, &cfg.open_options(true))
            .expect("open rw");
        let q = o.qcow2.as_ref().expect("qcow2");
        q.create_snapshot(&qcow2kit::NewSnapshot::now("s1"))
            .expect("snapshot");
        o.device.write_at(&[0x33; 1000], 100).expect("write");
        q.resize(cfg.size + 3 * M + 512, false).expect("grow");
        o.device
            .write_at(&[0x44; 5000], cfg.size + 2 * M)
            .expect("write past the old end");
        q.resize(M + 512, true).expect("shrink");
        o.close().expect("close");
    }
    let mut model = before.clone();
    model[100..1100].fill(0x33);
    model.truncate((M + 512) as usize);
    qemu_keyed(d, &["convert", "-O", "raw"], &[&spec, "now.raw"]);
    assert_same(&fs::read(d.join("now.raw")).unwrap(), &model, 0, "resized");
    qemu_keyed(
        d,
        &["convert", "-l", "snapshot.name=s1", "-O", "raw"],
        &[&spec, "s1.raw"],
    );
    // qemu-img's `-l` export keeps the active image's (shrunk) size: the snapshot's data is
    // judged up to it.
    let s1 = fs::read(d.join("s1.raw")).unwrap();
    assert_eq!(s1.len(), model.len(), "qemu-img's export of the snapshot");
    assert_same(&s1, &before[..model.len()], 0, "snapshot");
    qemu_keyed(d, &["check"], &[&spec]);

    // A leaked cluster (one more at the end of the file, its refcount 1): qemu-img sees it,
    // the library's repair frees it, the data and the key material are untouched.
    let path = d.join("img.qcow2");
    let mut bytes = fs::read(&path).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let idx = bytes.len() / (64 * K) as usize;
    assert!(
        idx < 32 * K as usize,
        "the cluster is in the first refcount block"
    );
    bytes[block + 2 * idx..block + 2 * idx + 2].copy_from_slice(&1u16.to_be_bytes());
    bytes.resize(bytes.len() + (64 * K) as usize, 0);
    fs::write(&path, &bytes).unwrap();
    let o = tool(
        QEMU_IMG,
        &["check", "--object", SECRET, "--image-opts", &spec],
        d,
    );
    assert!(o.code == 3 && o.stdout.contains("1 leaked clusters"), "{o}");
    let storage = qcow2kit::io::FileStorage::open(&path, true).expect("open the file");
    repair(&storage, RepairMode::Leaks).expect("repair");
    drop(storage);
    qemu_keyed(d, &["check"], &[&spec]);
    qemu_keyed(d, &["convert", "-O", "raw"], &[&spec, "repaired.raw"]);
    assert_same(
        &fs::read(d.join("repaired.raw")).unwrap(),
        &model,
        0,
        "repaired",
    );
}

/// Four threads write disjoint byte ranges that share sectors (100-byte stripes, dealt round
/// robin): every unaligned write is widened to whole sectors of ciphertext with the sector's
/// current content, which must not lose a neighbour's bytes written at the same time.
#[test]
fn concurrent_writers_sharing_sectors() {
    let cfg = luks(4 * K, false);
    let dir = scratch();
    let d = dir.path();
    let mut model = cfg.create(d, 9);
    let opened =
        qcow2kit::chain::open(&d.join("img.qcow2"), Format::Qcow2, &cfg.open_options(true))
            .expect("open rw");
    let span = 96 * K;
    let stripe = 100u64;
    let stripes: Vec<(u64, u64)> = (0..span.div_ceil(stripe))
        .map(|i| (i * stripe, ((i + 1) * stripe).min(span)))
        .collect();
    let dev = opened.device.as_ref();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let mine: Vec<(u64, u64)> = stripes
                .iter()
                .copied()
                .skip(t as usize)
                .step_by(4)
                .collect();
            s.spawn(move || {
                // Two passes, the second over the first (overwrites of allocated sectors).
                for pass in 0..2u64 {
                    for &(a, b) in &mine {
                        let fill = Fill::Random(a * 8 + pass * 4 + t);
                        dev.write_at(&fill.bytes(b - a), a)
                            .unwrap_or_else(|e| panic!("thread {t} at {a}: {e}"));
                    }
                }
            });
        }
    });
    for (i, &(a, b)) in stripes.iter().enumerate() {
        let t = i as u64 % 4;
        let fill = Fill::Random(a * 8 + 4 + t);
        model.data[a as usize..b as usize].copy_from_slice(&fill.bytes(b - a));
    }
    assert_same(
        &read_all(dev),
        &model.data,
        0,
        "after the concurrent writers",
    );
    opened.close().expect("close");
    cfg.judge(d, &model);
}
