//! Feature bits of the version 3 header (bytes 72..96).

use bitflags::bitflags;

bitflags! {
    /// Incompatible features (header bytes 72..80): an implementation that does not know a set
    /// bit must refuse the image.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct IncompatibleFeatures: u64 {
        /// Bit 0: refcounts may be stale (lazy refcounts); rebuild before writing.
        const DIRTY = 1 << 0;
        /// Bit 1: the image is known to be corrupt; no writes allowed.
        const CORRUPT = 1 << 1;
        /// Bit 2: guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// Bit 3: the compression type field (byte 104) is not zlib.
        const COMPRESSION_TYPE = 1 << 3;
        /// Bit 4: L2 entries are 128 bits wide with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags! {
    /// Compatible features (header bytes 80..88): safe to ignore when unknown.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CompatibleFeatures: u64 {
        /// Bit 0: refcount updates may be postponed; the dirty bit guards them.
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// Autoclear features (header bytes 88..96): cleared by a writer that does not know them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AutoclearFeatures: u64 {
        /// Bit 0: the bitmaps extension is consistent with the image.
        const BITMAPS = 1 << 0;
        /// Bit 1: the external data file is a valid raw image (guest offset = host offset).
        const DATA_FILE_RAW = 1 << 1;
    }
}

/// Which of the three feature fields a feature-name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Type 0.
    Incompatible,
    /// Type 1.
    Compatible,
    /// Type 2.
    Autoclear,
}

impl FeatureKind {
    /// Decodes the type byte of a feature-name table entry.
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }

    /// The type byte.
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        }
    }
}

/// Names of the incompatible bits qcow2kit knows, for messages.
pub(crate) fn known_incompatible_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bits_are_retained() {
        let f = IncompatibleFeatures::from_bits_retain(1 << 9 | 1);
        assert!(f.contains(IncompatibleFeatures::DIRTY));
        assert_eq!(f.bits() & !IncompatibleFeatures::all().bits(), 1 << 9);
    }

    #[test]
    fn kind_round_trip() {
        for b in 0..3u8 {
            assert_eq!(FeatureKind::from_byte(b).map(FeatureKind::to_byte), Some(b));
        }
        assert_eq!(FeatureKind::from_byte(3), None);
    }
}
