//! The persistent bitmap directory (read to list bitmaps; the bitmaps themselves are preserved,
//! not interpreted).
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

use super::{be_u16, be_u32, be_u64};
use crate::error::Corruption;

/// Flag bit 0: the bitmap was in use and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: the bitmap tracks writes automatically.
pub const FLAG_AUTO: u32 = 2;

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
}

impl BitmapEntry {
    /// Flag names as qemu-img prints them.
    pub fn flag_names(&self) -> Vec<&'static str> {
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
pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapEntry>, Corruption> {
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
        });
        off = (off + total).next_multiple_of(8);
    }
    Ok(out)
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
    }
}
