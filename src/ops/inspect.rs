//! Examining an untrusted file before anything else touches it.
//!
//! [`inspect`] reads a file's first bytes and its tail and reports every format whose signature it
//! carries (more than one is a *polyglot*, a file that different tools would read differently),
//! and, for qcow2, the header facts that decide whether the image is safe to hand to a reader:
//! backing and data file names, feature bits (known and unknown), encryption, snapshot count,
//! dirty/corrupt bits. Nothing the file names is opened, nothing is sized by an unvalidated field,
//! and a damaged header never makes inspection fail: its problems are collected.
//!
//! [`Inspection::check`] then applies a [`Policy`] and returns the named [`Violation`]s:
//! [`Policy::strict`] for untrusted uploads, [`Policy::openstack`] mirroring the qcow2 rules of
//! OpenStack's `format_inspector` (oslo.utils), and [`Policy::trusted_local`] for images a user
//! made themselves.
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::ops::inspect::{inspect, Format, Policy};
//!
//! // Eight sectors of zeros: raw, nothing detected, no violation.
//! let ins = inspect(&MemoryStorage::from_bytes(vec![0; 4096]))?;
//! assert_eq!(ins.format(), Format::Raw);
//! assert!(ins.check(&Policy::strict().declared(Format::Raw)).is_empty());
//! // Declared as qcow2, it is refused.
//! assert!(!ins.check(&Policy::strict().declared(Format::Qcow2)).is_empty());
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use crate::error::{Corruption, Error, Result};
use crate::format::extension::{CryptoHeaderExtension, Extensions};
use crate::format::features::{
    AutoclearFeatures, CompatibleFeatures, FeatureKind, IncompatibleFeatures,
};
use crate::format::header::{Header, V2_HEADER_LENGTH};
use crate::format::probe::{detect, is_hybrid_iso};
pub use crate::format::probe::{Format, HEAD_BYTES, TAIL_BYTES};
use crate::format::{
    be_u32, be_u64, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW2_MAGIC,
};
use crate::io::{FileStorage, Storage, StorageExt};
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// One feature field of a qcow2 header, split into the bits qcow2kit knows and the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureField {
    /// The whole field.
    pub bits: u64,
    /// Bits qcow2kit knows.
    pub known: u64,
    /// Bits it does not.
    pub unknown: u64,
}

impl FeatureField {
    fn new(bits: u64, known_mask: u64) -> Self {
        FeatureField {
            bits,
            known: bits & known_mask,
            unknown: bits & !known_mask,
        }
    }
}

/// The encryption method of a qcow2 header (bytes 32..36).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Not encrypted (0).
    None,
    /// Legacy AES-128-CBC (1): a weak, deprecated scheme.
    Aes,
    /// LUKS (2).
    Luks,
    /// Any other value (invalid).
    Unknown(u32),
}

/// What a qcow2 header says, read leniently: fields are reported even when the header does not
/// validate (see [`problems`](Qcow2Facts::problems)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Facts {
    /// Format version (bytes 4..8).
    pub version: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size, as stored.
    pub cluster_bits: u32,
    /// Cluster size, when `cluster_bits` is in 9..=21.
    pub cluster_size: Option<u64>,
    /// Offset of the backing file name (0: none). Non-zero means the image names a backing file,
    /// as OpenStack reads it.
    pub backing_file_offset: u64,
    /// The backing file name as stored (raw bytes, at most 1023 of them).
    pub backing_file: Option<Vec<u8>>,
    /// The backing format extension (raw bytes).
    pub backing_format: Option<Vec<u8>>,
    /// The external data file name extension (raw bytes).
    pub data_file: Option<Vec<u8>>,
    /// Incompatible feature bits.
    pub incompatible: FeatureField,
    /// Compatible feature bits.
    pub compatible: FeatureField,
    /// Autoclear feature bits.
    pub autoclear: FeatureField,
    /// Names the image's feature-name table gives to its bits: (field, bit, name).
    pub feature_names: Vec<(FeatureKind, u8, String)>,
    /// Encryption method.
    pub encryption: Encryption,
    /// The full-disk-encryption (LUKS) header extension.
    pub crypto_header: Option<CryptoHeaderExtension>,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Incompatible bit 0: refcounts may be stale.
    pub dirty: bool,
    /// Incompatible bit 1: marked corrupt.
    pub corrupt: bool,
    /// Incompatible bit 4: extended L2 entries.
    pub extended_l2: bool,
    /// Compression type byte (104); 0 (zlib) when the header is shorter.
    pub compression_type: u8,
    /// Refcount width in bits, when `refcount_order` ≤ 6.
    pub refcount_bits: Option<u32>,
    /// Why the header (or its extensions) does not validate; empty when it does. Unknown
    /// incompatible features are not listed here (see [`Violation::UnknownFeatures`]).
    pub problems: Vec<Corruption>,
}

impl Qcow2Facts {
    /// The compression type's name (`zlib`, `zstd`), if the byte is valid.
    pub fn compression_name(&self) -> Option<&'static str> {
        match self.compression_type {
            0 => Some("zlib"),
            1 => Some("zstd"),
            _ => None,
        }
    }

    /// Whether the image uses an external data file (incompatible bit 2 or a data file name).
    pub fn has_data_file(&self) -> bool {
        self.incompatible.bits & IncompatibleFeatures::EXTERNAL_DATA_FILE.bits() != 0
            || self.data_file.is_some()
    }
}

/// The result of [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Length of the file in bytes.
    pub file_size: u64,
    /// Every format whose signature was found: head signatures first, then the tail's (a VHD
    /// footer). Empty for raw data.
    pub detected: Vec<Format>,
    /// qcow2 header facts, when the file starts with `QFI\xfb`.
    pub qcow2: Option<Qcow2Facts>,
}

impl Inspection {
    /// The file's format: the one detected, [`Format::Raw`] if none; for a polyglot, the first
    /// detected (a probing reader may pick another: qemu-img takes a qcow2 image carrying a VDI
    /// signature for VDI).
    pub fn format(&self) -> Format {
        self.detected.first().copied().unwrap_or(Format::Raw)
    }

    /// Whether more than one format was detected (a hybrid ISO, `iso` + `gpt`, excepted).
    pub fn is_polyglot(&self) -> bool {
        self.detected.len() > 1 && !is_hybrid_iso(&self.detected)
    }

    /// Applies `policy` and returns every rule the file breaks (empty: acceptable).
    pub fn check(&self, policy: &Policy) -> Vec<Violation> {
        let mut v = Vec::new();
        if let Some(declared) = policy.declared_format {
            if !format_matches(declared, &self.detected) {
                v.push(Violation::FormatMismatch {
                    declared,
                    detected: self.detected.clone(),
                });
            }
        }
        if !policy.allow_polyglot && self.is_polyglot() {
            v.push(Violation::Polyglot(self.detected.clone()));
        }
        let Some(q) = &self.qcow2 else {
            return v;
        };
        if policy.require_valid_header {
            v.extend(q.problems.iter().cloned().map(Violation::InvalidHeader));
        }
        if q.version != 2 && q.version != 3 {
            // Nothing else in the header means anything.
            v.push(Violation::UnsupportedVersion(q.version));
            return v;
        }
        if !policy.allow_backing_file && q.backing_file_offset != 0 {
            v.push(Violation::BackingFile {
                name: q.backing_file.clone(),
            });
        }
        if !policy.allow_data_file && q.has_data_file() {
            v.push(Violation::DataFile {
                name: q.data_file.clone(),
            });
        }
        let unknown_incompat = q.incompatible.bits & !policy.known_incompatible;
        if unknown_incompat != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Incompatible,
                bits: unknown_incompat,
            });
        }
        if !policy.allow_unknown_compatible && q.compatible.unknown != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Compatible,
                bits: q.compatible.unknown,
            });
        }
        if !policy.allow_unknown_autoclear && q.autoclear.unknown != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Autoclear,
                bits: q.autoclear.unknown,
            });
        }
        if !policy.allow_legacy_aes && q.encryption == Encryption::Aes {
            v.push(Violation::LegacyAes);
        }
        v
    }
}

/// Whether a file with signatures `detected` is a `declared` image. A partition table (`gpt`) is
/// raw data, and a hybrid ISO carries one; anything else must be the one format detected.
fn format_matches(declared: Format, detected: &[Format]) -> bool {
    match declared {
        Format::Raw => detected.iter().all(|&f| f == Format::Gpt),
        Format::Iso => detected == [Format::Iso] || is_hybrid_iso(detected),
        d => detected == [d],
    }
}

/// Which rules [`Inspection::check`] applies. Build one from a preset and adjust its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The format the file claims to be (e.g. an upload's `disk_format`); when set, the detected
    /// signatures must match it ([`Violation::FormatMismatch`]).
    pub declared_format: Option<Format>,
    /// Accept qcow2 images that name a backing file.
    pub allow_backing_file: bool,
    /// Accept qcow2 images with an external data file.
    pub allow_data_file: bool,
    /// Incompatible feature bits considered known; any other set bit is a violation.
    pub known_incompatible: u64,
    /// Accept compatible feature bits qcow2kit does not know.
    pub allow_unknown_compatible: bool,
    /// Accept autoclear feature bits qcow2kit does not know.
    pub allow_unknown_autoclear: bool,
    /// Accept legacy AES encryption (crypt_method 1).
    pub allow_legacy_aes: bool,
    /// Refuse qcow2 headers that do not validate ([`Violation::InvalidHeader`]).
    pub require_valid_header: bool,
    /// Accept files carrying more than one format's signature.
    pub allow_polyglot: bool,
}

impl Policy {
    /// For untrusted images: no backing file, no data file, no feature bit qcow2kit does not
    /// know (in any field), no legacy AES, a valid header, not a polyglot, and — once
    /// [`declared`](Policy::declared) — the declared format.
    pub fn strict() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: false,
            allow_data_file: false,
            known_incompatible: IncompatibleFeatures::all().bits(),
            allow_unknown_compatible: false,
            allow_unknown_autoclear: false,
            allow_legacy_aes: false,
            require_valid_header: true,
            allow_polyglot: false,
        }
    }

    /// The qcow2 rules of OpenStack's `format_inspector` (`QcowInspector`): no backing file
    /// (a non-zero backing file offset), no data file (incompatible bit 2), version 2 or 3, and
    /// no incompatible bit beyond the four it knows (dirty, corrupt, data file, compression
    /// type — so extended L2 counts as unknown); plus its `InspectWrapper` rule that a file
    /// matching several formats is refused, and — once declared — the format match its callers
    /// (Glance, Nova) require. The rest of the header is not validated, as there.
    pub fn openstack() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: false,
            allow_data_file: false,
            known_incompatible: 0x0f,
            allow_unknown_compatible: true,
            allow_unknown_autoclear: true,
            allow_legacy_aes: true,
            require_valid_header: false,
            allow_polyglot: false,
        }
    }

    /// For images made locally by a trusted user: backing and data files and legacy AES are
    /// fine; invalid headers, unknown incompatible features and polyglots are still refused.
    pub fn trusted_local() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: true,
            allow_data_file: true,
            known_incompatible: IncompatibleFeatures::all().bits(),
            allow_unknown_compatible: true,
            allow_unknown_autoclear: true,
            allow_legacy_aes: true,
            require_valid_header: true,
            allow_polyglot: false,
        }
    }

    /// The same policy, requiring the file to be a `format` image.
    pub fn declared(mut self, format: Format) -> Self {
        self.declared_format = Some(format);
        self
    }
}

/// A rule an inspected file breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The qcow2 header or its extensions do not validate.
    InvalidHeader(Corruption),
    /// A `QFI\xfb` file whose version is neither 2 nor 3.
    UnsupportedVersion(u32),
    /// The image names a backing file (name as stored, if readable).
    BackingFile {
        /// The name's bytes.
        name: Option<Vec<u8>>,
    },
    /// The image keeps its data in an external file.
    DataFile {
        /// The data file name's bytes, if the image records one.
        name: Option<Vec<u8>>,
    },
    /// Feature bits the policy does not know.
    UnknownFeatures {
        /// Which field.
        kind: FeatureKind,
        /// The bits.
        bits: u64,
    },
    /// Legacy AES-CBC encryption.
    LegacyAes,
    /// The detected signatures do not match the declared format.
    FormatMismatch {
        /// What the file claims to be.
        declared: Format,
        /// What was found.
        detected: Vec<Format>,
    },
    /// The file carries the signatures of several formats.
    Polyglot(Vec<Format>),
}

impl Violation {
    /// The rule's short name (OpenStack's check names where it has one).
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::InvalidHeader(_) => "invalid_header",
            Violation::UnsupportedVersion(_) => "unsupported_version",
            Violation::BackingFile { .. } => "backing_file",
            Violation::DataFile { .. } => "data_file",
            Violation::UnknownFeatures { .. } => "unknown_features",
            Violation::LegacyAes => "legacy_aes",
            Violation::FormatMismatch { .. } => "format_mismatch",
            Violation::Polyglot(_) => "polyglot",
        }
    }
}

fn names(formats: &[Format]) -> String {
    if formats.is_empty() {
        return "raw".into();
    }
    formats
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.rule())?;
        match self {
            Violation::InvalidHeader(c) => write!(f, "invalid qcow2 header: {c}"),
            Violation::UnsupportedVersion(v) => write!(f, "unsupported qcow2 version {v}"),
            Violation::BackingFile { name } => match name {
                Some(n) => write!(
                    f,
                    "image has a backing file '{}'",
                    String::from_utf8_lossy(n)
                ),
                None => write!(f, "image has a backing file"),
            },
            Violation::DataFile { name } => match name {
                Some(n) => write!(
                    f,
                    "image has an external data file '{}'",
                    String::from_utf8_lossy(n)
                ),
                None => write!(f, "image has an external data file"),
            },
            Violation::UnknownFeatures { kind, bits } => {
                let field = match kind {
                    FeatureKind::Incompatible => "incompatible",
                    FeatureKind::Compatible => "compatible",
                    FeatureKind::Autoclear => "autoclear",
                };
                write!(f, "unknown {field} feature bits {bits:#x}")
            }
            Violation::LegacyAes => write!(f, "image uses legacy AES encryption"),
            Violation::FormatMismatch { declared, detected } => write!(
                f,
                "declared format {declared} but the content is {}",
                names(detected)
            ),
            Violation::Polyglot(d) => write!(f, "multiple formats detected: {}", names(d)),
        }
    }
}

/// Inspects the file at `path`, refusing anything but a regular file or a block device before
/// opening it (opening a FIFO would block).
pub fn inspect_path(path: &Path) -> Result<Inspection> {
    let ctx = || format!("opening '{}'", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(ctx(), e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::Unsupported(format!(
            "'{}' is not a regular file or block device",
            path.display()
        )));
    }
    let storage = FileStorage::open(path, false).map_err(|e| Error::io(ctx(), e))?;
    inspect(&storage)
}

/// Inspects the bytes of `storage`: at most the first 2 MiB (the largest qcow2 header cluster),
/// the last 512 bytes and a backing file name are read. Fails only on I/O errors.
pub fn inspect(storage: &dyn Storage) -> Result<Inspection> {
    let io = |what: &'static str| move |e| Error::io(what, e);
    let file_size = storage.len().map_err(io("reading file size"))?;
    let head_len = file_size.min(1 << MAX_CLUSTER_BITS) as usize;
    let head = storage
        .read_vec(0, head_len)
        .map_err(io("reading file head"))?;
    let probe_area = &head[..head.len().min(HEAD_BYTES as usize)];
    let tail = if file_size >= TAIL_BYTES {
        Some(
            storage
                .read_vec(file_size - TAIL_BYTES, TAIL_BYTES as usize)
                .map_err(io("reading file tail"))?,
        )
    } else {
        None
    };
    let detected = detect(probe_area, tail.as_deref());
    let qcow2 = if head.len() >= 4 && be_u32(&head, 0) == QCOW2_MAGIC {
        Some(qcow2_facts(storage, &head, file_size)?)
    } else {
        None
    };
    Ok(Inspection {
        file_size,
        detected,
        qcow2,
    })
}

fn qcow2_facts(storage: &dyn Storage, head: &[u8], file_size: u64) -> Result<Qcow2Facts> {
    // Fields read leniently: missing bytes read as zero.
    let u32_at = |off: usize| head.get(off..off + 4).map_or(0, |_| be_u32(head, off));
    let u64_at = |off: usize| head.get(off..off + 8).map_or(0, |_| be_u64(head, off));
    let version = u32_at(4);
    let cluster_bits = u32_at(20);
    let cluster_size = (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS)
        .contains(&cluster_bits)
        .then(|| 1u64 << cluster_bits);
    let v3 = version >= 3;
    let incompatible = if v3 { u64_at(72) } else { 0 };
    let compatible = if v3 { u64_at(80) } else { 0 };
    let autoclear = if v3 { u64_at(88) } else { 0 };
    let refcount_order = if v3 { u32_at(96) } else { 4 };
    let header_length = if v3 { u32_at(100) } else { V2_HEADER_LENGTH };
    let backing_file_offset = u64_at(8);
    let backing_file_size = u32_at(16);
    let mut problems = Vec::new();

    let header = match Header::parse(head) {
        Ok(h) => {
            if let Err(e) = h.validate(file_size) {
                problems.push(e);
            }
            Some(h)
        }
        Err(e) => {
            problems.push(e);
            None
        }
    };

    // Extensions lie between the header and the backing file name, inside cluster 0.
    let mut ext = Extensions::default();
    if let Some(h) = &header {
        let cs = h.cluster_size();
        let end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cs)
        } else {
            cs
        };
        let start = u64::from(h.header_length.max(V2_HEADER_LENGTH));
        let end = (end as usize).min(head.len());
        let area = head.get(start as usize..end).unwrap_or(&[]);
        match Extensions::parse(area) {
            Ok(e) => ext = e,
            Err(e) => problems.push(e),
        }
        if ext.crypto.is_some() && h.crypt_method != crate::format::header::CryptMethod::Luks {
            problems.push(Corruption::BadExtension {
                kind: crate::format::extension::EXT_CRYPTO,
                rule: "an encryption header extension needs LUKS encryption",
            });
        }
        if h.has_data_file()
            && h.backing_file_offset != 0
            && h.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW)
        {
            problems.push(Corruption::BadField {
                field: "autoclear_features",
                value: h.autoclear.bits(),
                rule: "a raw external data file cannot have a backing file",
            });
        }
    }

    let backing_file = if backing_file_offset != 0 && backing_file_offset < file_size {
        let len = backing_file_size.min(MAX_BACKING_NAME) as usize;
        let end = backing_file_offset.saturating_add(len as u64);
        if end > file_size {
            problems.push(Corruption::Truncated {
                what: "backing file name",
                needed: end,
                available: file_size,
            });
        }
        Some(
            storage
                .read_vec(backing_file_offset, len)
                .map_err(|e| Error::io("reading backing file name", e))?,
        )
    } else {
        None
    };

    let feature_names = ext
        .feature_names
        .iter()
        .map(|f| (f.kind, f.bit, f.name.clone()))
        .collect();
    Ok(Qcow2Facts {
        version,
        virtual_size: u64_at(24),
        cluster_bits,
        cluster_size,
        backing_file_offset,
        backing_file,
        backing_format: ext.backing_format,
        data_file: ext.data_file,
        incompatible: FeatureField::new(incompatible, IncompatibleFeatures::all().bits()),
        compatible: FeatureField::new(compatible, CompatibleFeatures::all().bits()),
        autoclear: FeatureField::new(autoclear, AutoclearFeatures::all().bits()),
        feature_names,
        encryption: match u32_at(32) {
            0 => Encryption::None,
            1 => Encryption::Aes,
            2 => Encryption::Luks,
            m => Encryption::Unknown(m),
        },
        crypto_header: ext.crypto,
        snapshot_count: u32_at(60),
        dirty: incompatible & IncompatibleFeatures::DIRTY.bits() != 0,
        corrupt: incompatible & IncompatibleFeatures::CORRUPT.bits() != 0,
        extended_l2: incompatible & IncompatibleFeatures::EXTENDED_L2.bits() != 0,
        compression_type: if v3 && header_length > 104 {
            head.get(104).copied().unwrap_or(0)
        } else {
            0
        },
        refcount_bits: (refcount_order <= 6).then(|| 1u32 << refcount_order),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extension::EXT_DATA_FILE;
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

        // An MBR is raw data; an ISO with one is a hybrid ISO, not a polyglot.
        let mut raw = vec![0u8; 40000];
        raw[510] = 0x55;
        raw[511] = 0xaa;
        let ins = run(raw.clone());
        assert_eq!(ins.detected, vec![Format::Gpt]);
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
}
