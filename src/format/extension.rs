//! Header extensions (between the header and the backing file name, in cluster 0).
//!
//! Each extension is `type: u32, length: u32, data[length]`, padded to a multiple of 8 bytes; the
//! list ends with type 0 or at the end of the area. Unknown extensions are kept verbatim so a
//! rewrite preserves them.

use super::bytes::{put_u32, put_u64};
use super::features::FeatureKind;
use super::{be_u32, be_u64};
use crate::error::Corruption;

/// End of the extension list.
pub(crate) const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer (LUKS).
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One entry of the feature name table (48 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which feature field the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes, NUL-padded on disk).
    pub name: String,
}

/// The bitmaps extension (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full disk encryption header extension (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeaderExtension {
    /// Offset of the encryption header (e.g. LUKS) in the image.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// All header extensions of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format (`qcow2`, `raw`, …), as bytes.
    pub backing_format: Option<Vec<u8>>,
    /// Feature names.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
    /// Encryption header pointer, if present.
    pub crypto: Option<CryptoHeaderExtension>,
    /// External data file name, as bytes.
    pub data_file: Option<Vec<u8>>,
    /// Extensions this implementation does not interpret, in order: (type, data).
    pub unknown: Vec<(u32, Vec<u8>)>,
}

/// Largest bitmap directory QEMU accepts.
pub(crate) const MAX_BITMAP_DIRECTORY_SIZE: u64 = 64 << 20;
/// Most bitmaps QEMU accepts.
pub(crate) const MAX_BITMAPS: u32 = 65_535;

/// Rule of an extension whose type and length run past the extension area (QEMU: "Header
/// extension too large").
pub const EXTENSION_HEADER_CROSSES_END: &str =
    "extension header crosses the end of the header area";
/// Rule of an extension whose data runs past the extension area (QEMU: "Header extension too
/// large").
pub const EXTENSION_TOO_LARGE: &str = "extension is larger than the header area";
/// Rule of a backing format name of 16 bytes or more (QEMU: "ERROR: ext_backing_format: …").
pub(crate) const BACKING_FORMAT_TOO_LONG: &str = "backing format name must be under 16 bytes";

fn bad(kind: u32, rule: &'static str) -> Corruption {
    Corruption::BadExtension { kind, rule }
}

impl Extensions {
    /// Parses the extension area `area` (header_length .. end of the area).
    pub fn parse(area: &[u8]) -> Result<Extensions, Corruption> {
        let mut ext = Extensions::default();
        let mut off = 0usize;
        while off < area.len() {
            if area.len() - off < 8 {
                return Err(bad(0, EXTENSION_HEADER_CROSSES_END));
            }
            let kind = be_u32(area, off);
            let len = be_u32(area, off + 4) as usize;
            off += 8;
            if len > area.len() - off {
                return Err(bad(kind, EXTENSION_TOO_LARGE));
            }
            let data = &area[off..off + len];
            match kind {
                EXT_END => return Ok(ext),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(bad(kind, BACKING_FORMAT_TOO_LONG));
                    }
                    ext.backing_format = Some(data.to_vec());
                }
                EXT_FEATURE_TABLE => {
                    // A short last entry reads as if padded with zeros, as in QEMU.
                    for e in data.chunks(48).filter(|e| e.len() >= 2) {
                        let Some(kind) = FeatureKind::from_byte(e[0]) else {
                            continue;
                        };
                        let name_bytes = &e[2..];
                        let end = name_bytes
                            .iter()
                            .position(|&b| b == 0)
                            .unwrap_or(name_bytes.len());
                        ext.feature_names.push(FeatureName {
                            kind,
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(bad(kind, "bitmaps extension must be 24 bytes"));
                    }
                    let b = BitmapsExtension {
                        nb_bitmaps: be_u32(data, 0),
                        directory_size: be_u64(data, 8),
                        directory_offset: be_u64(data, 16),
                    };
                    if be_u32(data, 4) != 0 {
                        return Err(bad(kind, "reserved field must be zero"));
                    }
                    if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
                        return Err(bad(kind, "number of bitmaps must be 1..=65535"));
                    }
                    if b.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(bad(kind, "bitmap directory is larger than 64 MiB"));
                    }
                    ext.bitmaps = Some(b);
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(bad(kind, "encryption header extension must be 16 bytes"));
                    }
                    ext.crypto = Some(CryptoHeaderExtension {
                        offset: be_u64(data, 0),
                        length: be_u64(data, 8),
                    });
                }
                EXT_DATA_FILE => ext.data_file = Some(data.to_vec()),
                _ => ext.unknown.push((kind, data.to_vec())),
            }
            off += len.next_multiple_of(8).min(area.len() - off);
        }
        Ok(ext)
    }

    /// The name of `bit` of `kind` from the feature table, if the image names it.
    pub(crate) fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }

    /// Encodes the extensions, ending with the end marker.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |kind: u32, data: &[u8]| {
            let start = out.len();
            out.resize(start + 8, 0);
            put_u32(&mut out, start, kind);
            put_u32(&mut out, start + 4, data.len() as u32);
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            push(EXT_BACKING_FORMAT, f);
        }
        if let Some(c) = &self.crypto {
            let mut d = [0u8; 16];
            put_u64(&mut d, 0, c.offset);
            put_u64(&mut d, 8, c.length);
            push(EXT_CRYPTO, &d);
        }
        if let Some(n) = &self.data_file {
            push(EXT_DATA_FILE, n);
        }
        if !self.feature_names.is_empty() {
            let mut d = vec![0u8; 48 * self.feature_names.len()];
            for (e, f) in d.chunks_exact_mut(48).zip(&self.feature_names) {
                e[0] = f.kind.to_byte();
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
            }
            push(EXT_FEATURE_TABLE, &d);
        }
        if let Some(b) = &self.bitmaps {
            let mut d = [0u8; 24];
            put_u32(&mut d, 0, b.nb_bitmaps);
            put_u64(&mut d, 8, b.directory_size);
            put_u64(&mut d, 16, b.directory_offset);
            push(EXT_BITMAPS, &d);
        }
        for (k, d) in &self.unknown {
            push(*k, d);
        }
        push(EXT_END, &[]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = Extensions {
            backing_format: Some(b"qcow2".to_vec()),
            feature_names: vec![
                FeatureName {
                    kind: FeatureKind::Incompatible,
                    bit: 0,
                    name: "dirty bit".into(),
                },
                FeatureName {
                    kind: FeatureKind::Autoclear,
                    bit: 1,
                    name: "raw".into(),
                },
            ],
            bitmaps: Some(BitmapsExtension {
                nb_bitmaps: 2,
                directory_size: 80,
                directory_offset: 0x30000,
            }),
            crypto: Some(CryptoHeaderExtension {
                offset: 0x10000,
                length: 0x200000,
            }),
            data_file: Some(b"data.raw".to_vec()),
            unknown: vec![(0x1234_5678, vec![1, 2, 3])],
        };
        let b = e.encode();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(Extensions::parse(&b).expect("valid test input"), e);
        assert_eq!(e.feature_name(FeatureKind::Autoclear, 1), Some("raw"));
    }

    #[test]
    fn rejects_oversized() {
        let mut b = vec![0u8; 16];
        put_u32(&mut b, 0, EXT_DATA_FILE);
        put_u32(&mut b, 4, 100);
        assert!(Extensions::parse(&b).is_err());
        let mut b = vec![0u8; 32];
        put_u32(&mut b, 0, EXT_BACKING_FORMAT);
        put_u32(&mut b, 4, 20);
        assert!(Extensions::parse(&b).is_err());
    }

    #[test]
    fn area_without_end_marker_is_fine() {
        assert_eq!(
            Extensions::parse(&[]).expect("valid test input"),
            Extensions::default()
        );
    }
}
