//! qcow2 (and qcow version 1) header facts, read leniently from the first cluster.

use super::source::Source;
use crate::error::{Corruption, Result};
use crate::format::extension::{CryptoHeaderExtension, Extensions};
use crate::format::features::{
    AutoclearFeatures, CompatibleFeatures, FeatureKind, IncompatibleFeatures,
};
use crate::format::header::{Header, V2_HEADER_LENGTH};
use crate::format::{be_u32, be_u64, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

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
    /// incompatible features are not listed here (see [`Violation::UnknownFeatures`](super::Violation::UnknownFeatures)).
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
/// The header facts of a file starting with `QFI\xfb`; `head` is its first cluster (up to 2 MiB).
/// Fails only on I/O errors.
pub(super) fn qcow2_facts(src: &mut dyn Source, head: &[u8]) -> Result<Qcow2Facts> {
    let file_size = src.file_size();
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
        src.read(backing_file_offset, len)?
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
