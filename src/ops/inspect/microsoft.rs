//! VHD (qemu's `vpc`) and VHDX.
//!
//! A VHD's footer is its last 512 bytes; a dynamic VHD also copies it at the head, which is where
//! qemu (and OpenStack) read it. A fixed VHD has only the tail copy, so a streaming inspector
//! knows its facts only at the end of the upload. A VHDX's virtual size lies in its metadata
//! region, found through the region table at 192 KiB; OpenStack follows the same chain.

use super::source::{be, le, Source};
use super::{FormatFacts, Violation};
use crate::error::Result;
use crate::format::probe::Format;

/// The most sectors qemu's `vpc` driver accepts (`VHD_MAX_SECTORS`).
const VHD_MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry a VHD footer records (`65535 * 16 * 255` sectors).
const VHD_MAX_GEOMETRY: u64 = 65535 * 16 * 255;

/// VHD facts from the head copy of the footer, or else the tail's.
pub(super) fn vhd_facts(src: &mut dyn Source, head: &[u8]) -> Result<FormatFacts> {
    let mut f = FormatFacts::new(Format::Vpc);
    let footer = if head.starts_with(b"conectix") {
        head.get(..512).map(<[u8]>::to_vec)
    } else {
        src.tail(512)?
    };
    let Some(ft) = footer.filter(|t| t.len() == 512 && t.starts_with(b"conectix")) else {
        return Ok(f);
    };
    let (Some(current), Some(cyls), Some(disk_type)) =
        (be(&ft, 48, 8), be(&ft, 56, 2), be(&ft, 60, 4))
    else {
        return Ok(f);
    };
    let chs = cyls * u64::from(ft[58]) * u64::from(ft[59]);
    // qemu's vpc_open: the CHS geometry, except for creators known to use the current size
    // and for the maximal geometry.
    let by_size = matches!(
        &ft[28..32],
        b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
    );
    let sectors = if by_size || chs == VHD_MAX_GEOMETRY {
        current / 512
    } else {
        chs
    };
    f.virtual_size = Some(sectors * 512);
    f.subformat = Some(
        match disk_type {
            2 => "fixed",
            3 => "dynamic",
            4 => "differencing",
            _ => "unknown",
        }
        .into(),
    );
    if sectors > VHD_MAX_SECTORS {
        f.findings.push(Violation::Malformed {
            format: Format::Vpc,
            reason: format!("{sectors} sectors is more than qemu accepts"),
        });
    }
    if disk_type == 4 {
        // A differencing disk reads through to a parent its header names.
        f.findings.push(Violation::BackingFile { name: None });
    }
    Ok(f)
}

/// The metadata region's GUID (`8B7CA206-4790-4B9A-B8FE-575F050F886E`), as stored.
const META_REGION: [u8; 16] = guid(0x8B7CA206, 0x4790, 0x4B9A, 0xB8FE_575F_050F_886E);
/// The virtual disk size item (`2FA54224-CD1B-4876-B211-5DBED83BF4B8`).
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(0x2FA54224, 0xCD1B, 0x4876, 0xB211_5DBE_D83B_F4B8);
/// The file parameters item (`CAA16737-FA36-4D43-B3B6-33F0AA44E76B`).
const FILE_PARAMETERS: [u8; 16] = guid(0xCAA16737, 0xFA36, 0x4D43, 0xB3B6_33F0_AA44_E76B);
/// Where the (first) region table lies.
const REGION_TABLE: u64 = 192 << 10;
/// Entries in a region or metadata table: fewer than 2048.
const MAX_ENTRIES: u64 = 2047;
/// Bytes of a metadata table: a 32-byte header and up to 2047 entries of 32 bytes.
pub(super) const META_TABLE_BYTES: usize = 2048 * 32;

/// A GUID's on-disk bytes: the first three fields little-endian, the rest as written.
const fn guid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_be_bytes();
    let b = b.to_be_bytes();
    let c = c.to_be_bytes();
    let d = d.to_be_bytes();
    [
        a[3], a[2], a[1], a[0], b[1], b[0], c[1], c[0], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// VHDX facts: the virtual size and whether the disk has a parent, through region table →
/// metadata table → items.
pub(super) fn vhdx_facts(src: &mut dyn Source, head: &[u8]) -> Result<FormatFacts> {
    let mut f = FormatFacts::new(Format::Vhdx);
    if let Err(why) = vhdx_walk(src, head, &mut f)? {
        f.findings.push(Violation::Malformed {
            format: Format::Vhdx,
            reason: why.into(),
        });
    }
    Ok(f)
}

type Walk = std::result::Result<(), &'static str>;

fn vhdx_walk(src: &mut dyn Source, head: &[u8], f: &mut FormatFacts) -> Result<Walk> {
    let table = head
        .get(REGION_TABLE as usize..)
        .map_or(&[][..], |t| &t[..t.len().min(64 << 10)]);
    if !table.starts_with(b"regi") {
        return Ok(Err("region table signature not found"));
    }
    let count = le(table, 8, 4).unwrap_or(0);
    if count > MAX_ENTRIES {
        return Ok(Err("more than 2047 region table entries"));
    }
    let meta = (0..count as usize).find_map(|i| {
        let e = table.get(16 + 32 * i..16 + 32 * (i + 1))?;
        (e[..16] == META_REGION).then(|| le(e, 16, 8)).flatten()
    });
    let Some(meta) = meta else {
        return Ok(Err("no metadata region"));
    };
    let Some(mt) = src.read(meta, META_TABLE_BYTES)? else {
        return Ok(Ok(()));
    };
    if !mt.starts_with(b"metadata") {
        return Ok(Err("metadata table signature not found"));
    }
    let count = le(&mt, 10, 2).unwrap_or(0);
    if count > MAX_ENTRIES {
        return Ok(Err("more than 2047 metadata entries"));
    }
    let item = |id: &[u8; 16]| {
        (0..count as usize).find_map(|i| {
            let e = mt.get(32 + 32 * i..32 + 32 * (i + 1))?;
            (e[..16] == *id).then(|| le(e, 16, 4)).flatten()
        })
    };
    let (vds, params) = (item(&VIRTUAL_DISK_SIZE), item(&FILE_PARAMETERS));
    let Some(vds) = vds else {
        return Ok(Err("no virtual disk size item"));
    };
    if let Some(b) = src.read(meta.saturating_add(vds), 8)? {
        match le(&b, 0, 8) {
            Some(size) => f.virtual_size = Some(size),
            None => return Ok(Err("virtual disk size item past the end of the file")),
        }
    }
    if let Some(p) = params {
        if let Some(b) = src.read(meta.saturating_add(p), 8)? {
            // File parameters flags, bit 1: the disk has a parent (a differencing disk).
            if le(&b, 4, 4).is_some_and(|flags| flags & 2 != 0) {
                f.findings.push(Violation::BackingFile { name: None });
            }
        }
    }
    Ok(Ok(()))
}
