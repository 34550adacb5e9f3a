//! Persistent bitmaps on disk: the bitmap directory, bitmap table entries and the layout of
//! bitmap data (pure functions of bytes).
//!
//! Directory entry, 8-byte aligned:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..8   | bitmap_table_offset                     |
//! | 8..12  | bitmap_table_size (entries)             |
//! | 12..16 | flags: bit 0 in_use, 1 auto, 2 extra_data_compatible |
//! | 16     | type (1: dirty tracking)                |
//! | 17     | granularity_bits                        |
//! | 18..20 | name_size                               |
//! | 20..24 | extra_data_size                         |
//! | 24..   | extra data, name, padding to 8          |

use super::bytes::{put_u16, put_u32, put_u64};
use super::{be_u16, be_u32, be_u64};
use crate::error::Corruption;

/// Flag bit 0: the bitmap was in use and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: the bitmap tracks writes automatically.
pub(crate) const FLAG_AUTO: u32 = 2;
/// The only bitmap type: dirty tracking.
pub(crate) const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest log2 granularity (512 bytes).
pub(crate) const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest log2 granularity (2 GiB).
pub(crate) const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name, in bytes.
pub(crate) const MAX_NAME_SIZE: usize = 1023;
/// Most entries of one bitmap table.
pub(crate) const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of bitmap data one bitmap may take (its table's entries × the cluster size).
pub(crate) const MAX_PHYS_SIZE: u64 = 0x2000_0000;

/// Bitmap table entry: reserved bits (must be zero).
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: host offset of the data cluster.
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry without an offset: the cluster reads as all ones.
pub(crate) const TABLE_ALL_ONES: u64 = 1;

/// What one bitmap table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Every bit of the cluster is 0.
    Zeros,
    /// Every bit of the cluster is 1.
    Ones,
    /// The bits are stored in the data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes a table entry of an image with clusters of `cluster_size` bytes, as QEMU's
    /// `check_table_entry` accepts them: no reserved bit, and with an offset, a cluster-aligned
    /// one and no all-ones bit. `None` for an invalid entry.
    pub(crate) fn decode(raw: u64, cluster_size: u64) -> Option<TableEntry> {
        if raw & TABLE_RESERVED != 0 {
            return None;
        }
        let offset = raw & TABLE_OFFSET;
        if offset == 0 {
            return Some(if raw & TABLE_ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            });
        }
        (raw & TABLE_ALL_ONES == 0 && offset % cluster_size == 0)
            .then_some(TableEntry::Data(offset))
    }
}

/// Bytes of the virtual disk one cluster of bitmap data covers.
pub(crate) fn bytes_per_data_cluster(granularity_bits: u8, cluster_size: u64) -> u64 {
    (cluster_size * 8) << granularity_bits
}

/// Entries of the table of a bitmap covering `disk_size` bytes.
pub(crate) fn table_entries(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    disk_size.div_ceil(bytes_per_data_cluster(granularity_bits, cluster_size))
}

/// Bytes one directory entry takes (8-byte aligned).
pub fn entry_size(name_len: usize, extra_len: usize) -> usize {
    (24 + extra_len + name_len).next_multiple_of(8)
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags.
    pub flags: u32,
    /// Bitmap type.
    pub kind: u8,
    /// log2 of the bytes each bit covers.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Size of the entry's extra data in bytes (QEMU writes none).
    pub extra_data_size: u32,
}

impl BitmapEntry {
    /// Flag names as qemu-img prints them.
    pub(crate) fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }
}

/// Parses `count` directory entries from `buf`.
pub(crate) fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapEntry>, Corruption> {
    let bad = |rule| Corruption::BadExtension {
        kind: super::extension::EXT_BITMAPS,
        rule,
    };
    let mut out = Vec::with_capacity((count as usize).min(buf.len() / 24));
    let mut off = 0usize;
    for _ in 0..count {
        if buf.len() < off + 24 {
            return Err(bad("bitmap directory entry lies past the directory"));
        }
        let e = &buf[off..off + 24];
        let name_len = be_u16(e, 18) as usize;
        let extra_len = be_u32(e, 20) as usize;
        let total = 24usize.saturating_add(extra_len).saturating_add(name_len);
        if buf.len() - off < total {
            return Err(bad("bitmap directory entry lies past the directory"));
        }
        let name_start = off + 24 + extra_len;
        out.push(BitmapEntry {
            table_offset: be_u64(e, 0),
            table_size: be_u32(e, 8),
            flags: be_u32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name: String::from_utf8_lossy(&buf[name_start..name_start + name_len]).into_owned(),
            extra_data_size: extra_len as u32,
        });
        off = (off + total).next_multiple_of(8);
    }
    Ok(out)
}

/// Encodes `entries` as a bitmap directory (without extra data, as QEMU writes it).
pub(crate) fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let name = e.name.as_bytes();
        let start = out.len();
        out.resize(start + entry_size(name.len(), 0), 0);
        let b = &mut out[start..];
        put_u64(b, 0, e.table_offset);
        put_u32(b, 8, e.table_size);
        put_u32(b, 12, e.flags);
        b[16] = e.kind;
        b[17] = e.granularity_bits;
        put_u16(b, 18, name.len() as u16);
        put_u32(b, 20, 0);
        b[24..24 + name.len()].copy_from_slice(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entry() {
        let mut b = vec![0u8; 32];
        b[0..8].copy_from_slice(&0x30000u64.to_be_bytes());
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        b[12..16].copy_from_slice(&FLAG_AUTO.to_be_bytes());
        b[16] = 1;
        b[17] = 16;
        b[18..20].copy_from_slice(&2u16.to_be_bytes());
        b[24..26].copy_from_slice(b"b0");
        let d = parse_directory(&b, 1).expect("valid test input");
        assert_eq!(d[0].name, "b0");
        assert_eq!(d[0].flag_names(), vec!["auto"]);
        assert!(parse_directory(&b, 2).is_err());
        assert_eq!(encode_directory(&d), b);
    }

    #[test]
    fn table_entries_decode_as_qemu_checks_them() {
        let cs = 65536;
        assert_eq!(TableEntry::decode(0, cs), Some(TableEntry::Zeros));
        assert_eq!(TableEntry::decode(1, cs), Some(TableEntry::Ones));
        assert_eq!(
            TableEntry::decode(0x30000, cs),
            Some(TableEntry::Data(0x30000))
        );
        assert_eq!(TableEntry::decode(0x30001, cs), None);
        assert_eq!(TableEntry::decode(0x30200, cs), None);
        assert_eq!(TableEntry::decode(2, cs), None);
        assert_eq!(TableEntry::decode(1 << 63, cs), None);
    }
}
