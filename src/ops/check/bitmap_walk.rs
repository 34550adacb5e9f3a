//! Persistent bitmaps in a check (QEMU's `qcow2_check_bitmaps_refcounts`): the directory and
//! every bitmap table counted, and QEMU's findings for a broken one.

use super::report::{CheckFailure, Finding};
use super::walk::{Step, Stop, Walk};
use super::CHUNK;
use crate::format::entry::OFFSET_MASK;
use crate::format::header::Header;
use crate::format::{be_u16, be_u32, be_u64};

/// Reserved bits of a bitmap table entry.
pub(super) const BME_TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Largest bitmap table QEMU accepts, in entries.
pub(super) const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap QEMU accepts, in bytes of bitmap data.
pub(super) const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bitmap directory flags other than in_use and auto.
pub(super) const BME_RESERVED_FLAGS: u32 = !3;

impl Walk<'_, '_> {
    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    pub(super) fn check_bitmaps(&mut self, h: &Header, offset: u64, size: u64, count: u32) -> Step {
        self.inc(offset, size, 1);
        let invalid = |w: &mut Self, reason: String| {
            w.corrupt(
                Finding::BitmapDirectory {
                    reason: reason.clone(),
                },
                1,
            );
            Err(Stop::Failed(CheckFailure::Invalid(reason)))
        };
        if size == 0 {
            return invalid(self, "Requested bitmap directory size is zero".into());
        }
        // Entries past the end of the file read as zeros, and an all-zero entry is invalid:
        // one zeroed entry's worth past the end is all the loop below can look at.
        let avail = self.in_file(offset, size).saturating_add(4096).min(size);
        let dir = self.read(offset, avail)?;
        let at = |p: u64, n: u64| dir.get(p as usize..(p + n) as usize);
        let disk_len = h.size.div_ceil(512).saturating_mul(512);
        let mut bitmaps = Vec::new();
        let mut p = 0u64;
        while p < size {
            if size - p < 24 {
                return invalid(self, "Broken bitmap directory".into());
            }
            if bitmaps.len() as u32 >= count {
                return invalid(
                    self,
                    "More bitmaps found than specified in header extension".into(),
                );
            }
            let Some(e) = at(p, 24) else {
                return invalid(self, "Broken bitmap directory".into());
            };
            let table_offset = be_u64(e, 0);
            let table_size = be_u32(e, 8);
            let flags = be_u32(e, 12);
            let (kind, gran) = (e[16], e[17]);
            let name_len = u64::from(be_u16(e, 18));
            let extra_len = u64::from(be_u32(e, 20));
            let next = p + (24 + name_len + extra_len).next_multiple_of(8);
            if next > size {
                return invalid(self, "Broken bitmap directory".into());
            }
            if extra_len != 0 {
                return invalid(self, "Bitmap extra data is not supported".into());
            }
            let name = at(p + 24, name_len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let phys = u64::from(table_size) * self.cs;
            let ok = table_size != 0
                && table_offset != 0
                && table_offset % self.cs == 0
                && u64::from(table_size) <= BME_MAX_TABLE_SIZE
                && (9..=31).contains(&gran)
                && flags & BME_RESERVED_FLAGS == 0
                && name_len <= 1023
                && kind == 1
                && phys <= BME_MAX_PHYS_SIZE
                && (flags & 1 != 0 || disk_len <= (phys * 8) << gran);
            if !ok {
                return invalid(
                    self,
                    format!("Bitmap '{name}' doesn't satisfy the constraints"),
                );
            }
            bitmaps.push((name, table_offset, table_size));
            p = next;
        }
        if (bitmaps.len() as u32) != count {
            return invalid(
                self,
                "Less bitmaps found than specified in header extension".into(),
            );
        }
        for (name, table_offset, table_size) in bitmaps {
            let bytes = u64::from(table_size) * 8;
            self.inc(table_offset, bytes, 1);
            // bitmap_table_load() refuses the whole table if any entry is invalid.
            let inside = self.in_file(table_offset, bytes) / 8 * 8;
            let cs = self.cs;
            let valid = |e: u64| {
                let off = e & OFFSET_MASK;
                e & BME_TABLE_RESERVED == 0 && (off == 0 || (e & 1 == 0 && off % cs == 0))
            };
            let mut pos = 0;
            while pos < inside {
                let n = (inside - pos).min(CHUNK);
                let chunk = self.read(table_offset + pos, n)?;
                if !chunk.chunks_exact(8).all(|b| valid(be_u64(b, 0))) {
                    self.corrupt(Finding::BitmapTable { name: name.clone() }, 1);
                    return Err(Stop::Failed(CheckFailure::Invalid(format!(
                        "bitmap '{name}' has an invalid table entry"
                    ))));
                }
                pos += n;
            }
            let mut pos = 0;
            while pos < inside {
                let n = (inside - pos).min(CHUNK);
                let chunk = self.read(table_offset + pos, n)?;
                for e in chunk.chunks_exact(8).map(|b| be_u64(b, 0)) {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        self.inc(off, self.cs, 1);
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }
}
