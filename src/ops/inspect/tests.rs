//! Unit tests of the inspector on hand-made qcow2 headers.

use super::*;
use crate::error::Corruption;
use crate::format::extension::Extensions;
use crate::format::extension::EXT_DATA_FILE;
use crate::format::features::{
    AutoclearFeatures, CompatibleFeatures, FeatureKind, IncompatibleFeatures,
};
use crate::format::header::Header;
use crate::io::MemoryStorage;

/// A minimal valid v3 image: header, refcount table, refcount block, L1 (64 KiB clusters).
fn image(ext: &Extensions, backing: Option<&[u8]>) -> Vec<u8> {
    let cs = 1usize << 16;
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 30,
        crypt_method: crate::format::header::CryptMethod::None,
        l1_size: 2,
        l1_table_offset: 3 << 16,
        refcount_table_offset: 1 << 16,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: IncompatibleFeatures::empty(),
        compatible: CompatibleFeatures::empty(),
        autoclear: AutoclearFeatures::empty(),
        refcount_order: 4,
        header_length: 112,
        compression_type: crate::format::header::CompressionType::Zlib,
        extra_bytes: vec![0; 7],
    };
    let exts = ext.encode();
    if let Some(b) = backing {
        h.backing_file_offset = 112 + exts.len() as u64;
        h.backing_file_size = b.len() as u32;
    }
    let mut img = vec![0u8; 4 * cs];
    let hb = h.encode();
    img[..hb.len()].copy_from_slice(&hb);
    img[112..112 + exts.len()].copy_from_slice(&exts);
    if let Some(b) = backing {
        let o = h.backing_file_offset as usize;
        img[o..o + b.len()].copy_from_slice(b);
    }
    img
}

fn run(bytes: Vec<u8>) -> Inspection {
    inspect(&MemoryStorage::from_bytes(bytes)).expect("in-memory inspection")
}

#[test]
fn plain_image_passes_every_preset() {
    let ins = run(image(&Extensions::default(), None));
    assert_eq!(ins.detected, vec![Format::Qcow2]);
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert!(q.problems.is_empty(), "{:?}", q.problems);
    assert_eq!(
        (q.version, q.virtual_size, q.cluster_size),
        (3, 1 << 30, Some(65536))
    );
    for p in [
        Policy::strict(),
        Policy::openstack(),
        Policy::trusted_local(),
    ] {
        assert!(ins.check(&p.declared(Format::Qcow2)).is_empty());
    }
    let v = ins.check(&Policy::strict().declared(Format::Raw));
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].rule(), "format_mismatch");
    assert!(v[0]
        .to_string()
        .contains("declared format raw but the content is qcow2"));
}

#[test]
fn backing_and_data_files() {
    let ext = Extensions {
        backing_format: Some(b"qcow2".to_vec()),
        data_file: Some(b"data.raw".to_vec()),
        ..Default::default()
    };
    let mut bytes = image(&ext, Some(b"/etc/passwd"));
    bytes[79] |= 4; // incompatible bit 2
    let ins = run(bytes);
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.backing_file.as_deref(), Some(&b"/etc/passwd"[..]));
    assert_eq!(q.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert_eq!(q.data_file.as_deref(), Some(&b"data.raw"[..]));
    let rules = |p: Policy| -> Vec<&str> { ins.check(&p).iter().map(|v| v.rule()).collect() };
    assert_eq!(rules(Policy::strict()), ["backing_file", "data_file"]);
    assert_eq!(rules(Policy::openstack()), ["backing_file", "data_file"]);
    assert!(rules(Policy::trusted_local()).is_empty());
    let shown = ins.check(&Policy::strict())[0].to_string();
    assert_eq!(
        shown,
        "backing_file: image has a backing file '/etc/passwd'"
    );
}

#[test]
fn feature_bits_per_preset() {
    // Extended L2 (bit 4): known to qcow2kit, unknown to OpenStack.
    let mut bytes = image(&Extensions::default(), None);
    bytes[79] |= 0x10;
    bytes[39] = 4; // 16-byte L2 entries: four L1 entries map 1 GiB
    let ins = run(bytes);
    assert!(ins.qcow2.as_ref().is_some_and(|q| q.extended_l2));
    assert!(ins.check(&Policy::strict()).is_empty());
    let v = ins.check(&Policy::openstack());
    assert_eq!(
        v,
        vec![Violation::UnknownFeatures {
            kind: FeatureKind::Incompatible,
            bits: 0x10
        }]
    );
    // An unknown incompatible bit: refused everywhere.
    let mut bytes = image(&Extensions::default(), None);
    bytes[78] |= 0x01; // bit 8
    let ins = run(bytes);
    assert_eq!(
        ins.qcow2.as_ref().map(|q| q.incompatible.unknown),
        Some(1 << 8)
    );
    for p in [
        Policy::strict(),
        Policy::openstack(),
        Policy::trusted_local(),
    ] {
        assert!(ins.check(&p).iter().any(|v| v.rule() == "unknown_features"));
    }
    // An unknown compatible bit: only strict cares.
    let mut bytes = image(&Extensions::default(), None);
    bytes[87] |= 0x80;
    let ins = run(bytes);
    assert_eq!(ins.check(&Policy::strict()).len(), 1);
    assert!(ins.check(&Policy::openstack()).is_empty());
}

#[test]
fn aes_and_bad_headers() {
    let mut bytes = image(&Extensions::default(), None);
    bytes[35] = 1;
    let ins = run(bytes);
    assert_eq!(
        ins.qcow2.as_ref().map(|q| q.encryption),
        Some(Encryption::Aes)
    );
    assert_eq!(ins.check(&Policy::strict()), vec![Violation::LegacyAes]);
    assert!(ins.check(&Policy::trusted_local()).is_empty());

    // cluster_bits out of range: facts still read, header invalid.
    let mut bytes = image(&Extensions::default(), None);
    bytes[23] = 30;
    bytes[79] |= 4;
    let ins = run(bytes);
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!((q.cluster_bits, q.cluster_size), (30, None));
    let rules: Vec<_> = ins
        .check(&Policy::strict())
        .iter()
        .map(|v| v.rule())
        .collect();
    assert_eq!(rules, ["invalid_header", "data_file"]);
    // OpenStack does not validate the header.
    let rules: Vec<_> = ins
        .check(&Policy::openstack())
        .iter()
        .map(|v| v.rule())
        .collect();
    assert_eq!(rules, ["data_file"]);

    // Version 1 (qcow): detected as qcow, unsupported for every preset.
    let mut bytes = image(&Extensions::default(), None);
    bytes[7] = 1;
    let ins = run(bytes);
    assert_eq!(ins.detected, vec![Format::Qcow]);
    assert!(ins
        .check(&Policy::openstack())
        .contains(&Violation::UnsupportedVersion(1)));

    // A malformed extension is an invalid header, and never a failure of inspect.
    let mut bytes = image(&Extensions::default(), None);
    bytes[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
    bytes[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
    let ins = run(bytes);
    assert!(matches!(
        ins.check(&Policy::strict()).as_slice(),
        [Violation::InvalidHeader(Corruption::BadExtension { .. })]
    ));
}

#[test]
fn polyglots_and_tails() {
    let mut bytes = image(&Extensions::default(), None);
    bytes[32769..32774].copy_from_slice(b"CD001");
    let ins = run(bytes);
    assert_eq!(ins.detected, vec![Format::Qcow2, Format::Iso]);
    assert!(ins.is_polyglot());
    let v = ins.check(&Policy::openstack().declared(Format::Qcow2));
    let rules: Vec<_> = v.iter().map(|v| v.rule()).collect();
    assert_eq!(rules, ["format_mismatch", "polyglot"]);
    assert_eq!(
        v[1].to_string(),
        "polyglot: multiple formats detected: qcow2,iso"
    );

    // A VHD footer at the end of a raw file.
    let mut raw = vec![0u8; 8192];
    raw[8192 - 512..8192 - 504].copy_from_slice(b"conectix");
    let ins = run(raw);
    assert_eq!(ins.detected, vec![Format::Vpc]);
    assert!(ins
        .check(&Policy::strict().declared(Format::Vpc))
        .is_empty());

    // An MBR is raw data; an ISO with one is a hybrid ISO, not a polyglot. Without a partition
    // it breaks OpenStack's MBR rule.
    let mut raw = vec![0u8; 40000];
    raw[510] = 0x55;
    raw[511] = 0xaa;
    let ins = run(raw.clone());
    assert_eq!(ins.detected, vec![Format::Gpt]);
    assert_eq!(
        ins.check(&Policy::strict().declared(Format::Raw))
            .iter()
            .map(Violation::rule)
            .collect::<Vec<_>>(),
        ["partition_table"]
    );
    raw[446 + 4] = 0x83;
    let ins = run(raw.clone());
    assert_eq!(ins.virtual_size(), Some(40000));
    assert!(ins
        .check(&Policy::strict().declared(Format::Raw))
        .is_empty());
    raw[32769..32774].copy_from_slice(b"NSR03");
    let ins = run(raw);
    assert!(!ins.is_polyglot());
    assert!(ins
        .check(&Policy::strict().declared(Format::Iso))
        .is_empty());
}

#[test]
fn tiny_and_truncated_files_never_fail() {
    for len in [0usize, 3, 4, 50, 100, 104, 111] {
        let mut b = image(&Extensions::default(), None);
        b.truncate(len);
        let ins = run(b);
        if let Some(q) = &ins.qcow2 {
            assert!(!q.problems.is_empty(), "length {len}");
        }
    }
    // A backing name far past the end of the file.
    let mut b = image(&Extensions::default(), None);
    b[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let ins = run(b);
    let q = ins.qcow2.as_ref().expect("qcow2 facts");
    assert_eq!(q.backing_file, None);
    assert!(!q.problems.is_empty());
}

#[test]
fn format_names_round_trip() {
    for f in [
        Format::Raw,
        Format::Qcow2,
        Format::Qcow,
        Format::Vmdk,
        Format::Vhdx,
        Format::Vdi,
        Format::Qed,
        Format::Luks,
        Format::Vpc,
        Format::Parallels,
        Format::Iso,
        Format::Gpt,
    ] {
        assert_eq!(Format::from_name(f.name()), Some(f));
    }
    assert_eq!(Format::from_name("vhd"), Some(Format::Vpc));
    assert_eq!(Format::from_name("nope"), None);
}

/// Streams `bytes` through the inspector in chunks of `chunk` bytes.
fn streamed(bytes: &[u8], chunk: usize) -> Inspection {
    let mut s = stream::StreamInspector::new();
    for c in bytes.chunks(chunk) {
        s.feed(c);
    }
    assert!(s.kept_bytes() <= stream::MAX_KEPT_BYTES);
    s.finish()
}

#[test]
fn streaming_agrees_and_follows_pointers_past_the_head() {
    // A qcow2 image with 2 MiB clusters whose backing name lies past the kept head.
    let mut b = image(&Extensions::default(), None);
    b.resize(3 << 20, 0);
    b[8..16].copy_from_slice(&((5u64 << 19) + 7).to_be_bytes());
    b[16..20].copy_from_slice(&4u32.to_be_bytes());
    b[(5 << 19) + 7..(5 << 19) + 11].copy_from_slice(b"base");
    let whole = run(b.clone());
    assert_eq!(
        whole.qcow2.as_ref().and_then(|q| q.backing_file.clone()),
        Some(b"base".to_vec())
    );
    for chunk in [1, 511, 4096, 1 << 20, 3 << 20] {
        let s = streamed(&b, chunk);
        assert_eq!(s, whole, "chunk {chunk}");
    }
    // A VHDX whose metadata table, and the item it points to, lie past the kept head.
    let mut v = vec![0u8; 4 << 20];
    v[..8].copy_from_slice(b"vhdxfile");
    let rt = 192 << 10;
    v[rt..rt + 4].copy_from_slice(b"regi");
    v[rt + 8] = 1;
    v[rt + 16..rt + 32].copy_from_slice(&[
        0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88,
        0x6E,
    ]);
    let meta = 3usize << 20;
    for i in 0..8 {
        v[rt + 32 + i] = ((meta as u64) >> (8 * i)) as u8;
    }
    v[meta..meta + 8].copy_from_slice(b"metadata");
    v[meta + 10] = 1;
    v[meta + 32..meta + 48].copy_from_slice(&[
        0x24, 0x42, 0xA5, 0x2F, 0x1B, 0xCD, 0x76, 0x48, 0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4,
        0xB8,
    ]);
    v[meta + 48] = 0x00;
    v[meta + 49] = 0x00;
    v[meta + 50] = 0x01; // item at meta + 64 KiB
    v[meta + 0x10000] = 0x40; // 64 bytes of virtual disk
    let whole = run(v.clone());
    assert_eq!(whole.virtual_size(), Some(64));
    assert!(
        whole.check(&Policy::strict()).is_empty(),
        "{:?}",
        whole.check(&Policy::strict())
    );
    for chunk in [1000, 65536, 4 << 20] {
        assert_eq!(streamed(&v, chunk), whole, "chunk {chunk}");
    }
}
