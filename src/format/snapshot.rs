//! The internal snapshot table.
//!
//! Each entry, 8-byte aligned:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | l1_table_offset                                    |
//! | 8..12  | l1_size (entries)                                  |
//! | 12..14 | id_str_size                                        |
//! | 14..16 | name_size                                          |
//! | 16..20 | date_sec                                           |
//! | 20..24 | date_nsec                                          |
//! | 24..32 | vm_clock_nsec                                      |
//! | 32..36 | vm_state_size                                      |
//! | 36..40 | extra_data_size (≤ 1024)                           |
//! | 40..   | extra data: vm_state_size_large u64, disk_size u64, icount u64 (each optional) |
//! | …      | id string, then name string, then padding to 8     |

use super::bytes::{put_u16, put_u32, put_u64};
use super::header::SNAPSHOT_HEADER_SIZE;
use super::{be_u16, be_u32, be_u64, MAX_SNAPSHOT_EXTRA_DATA};
use crate::error::Corruption;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (the 64-bit field when present).
    pub vm_state_size: u64,
    /// Virtual disk size at creation, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count at creation (`None` or `u64::MAX`: not recorded).
    pub icount: Option<u64>,
    /// Extra data bytes beyond the three known fields, preserved.
    pub extra_unknown: Vec<u8>,
}

/// The rule of the [`Corruption::BadSnapshot`] returned when an entry runs past the end of the
/// buffer given to [`parse_table`]: a caller that passed less than the whole table may retry with
/// more.
pub(crate) const ENTRY_PAST_END: &str = "entry lies past the end of the file or the 64 MiB limit";

/// The rule of the [`Corruption::BadSnapshot`] returned for an entry with over 1024 bytes of
/// extra data (QEMU: "Too much extra metadata in snapshot table entry N").
pub const EXTRA_DATA_TOO_LARGE: &str = "extra data is larger than 1024 bytes";

fn bad(index: u32, rule: &'static str) -> Corruption {
    Corruption::BadSnapshot { index, rule }
}

/// Parses `count` entries from `buf` (the table's bytes, however many the file holds).
/// Returns the snapshots and the table's length in bytes.
pub(crate) fn parse_table(buf: &[u8], count: u32) -> Result<(Vec<Snapshot>, u64), Corruption> {
    // Each entry takes at least 40 bytes, so `count` is bounded by the buffer, not trusted.
    let mut out = Vec::with_capacity((count as usize).min(buf.len() / 40));
    let mut off = 0usize;
    for index in 0..count {
        // Entries start 8-aligned; the table ends where its last entry does (QEMU's size).
        off = off.next_multiple_of(8);
        let fixed = SNAPSHOT_HEADER_SIZE as usize;
        if buf.len() < off + fixed {
            return Err(bad(index, ENTRY_PAST_END));
        }
        let e = &buf[off..off + fixed];
        let l1_table_offset = be_u64(e, 0);
        let l1_size = be_u32(e, 8);
        let id_len = be_u16(e, 12) as usize;
        let name_len = be_u16(e, 14) as usize;
        let extra_len = be_u32(e, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(bad(index, EXTRA_DATA_TOO_LARGE));
        }
        // The snapshot's L1 table (size limit, alignment, bounds) is validated only when the
        // snapshot is used, as QEMU does (qcow2_validate_table in qcow2_snapshot_load_tmp /
        // goto): a bad snapshot must not make the active image unreadable.
        let extra_len = extra_len as usize;
        let total = fixed + extra_len + id_len + name_len;
        if buf.len() < off + total {
            return Err(bad(index, ENTRY_PAST_END));
        }
        let extra = &buf[off + fixed..off + fixed + extra_len];
        let id_start = off + fixed + extra_len;
        let id = String::from_utf8_lossy(&buf[id_start..id_start + id_len]).into_owned();
        let name_start = id_start + id_len;
        let name = String::from_utf8_lossy(&buf[name_start..name_start + name_len]).into_owned();
        let field = |i: usize| (extra.len() >= (i + 1) * 8).then(|| be_u64(extra, i * 8));
        let vm_state_size = field(0).unwrap_or(u64::from(be_u32(e, 32)));
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be_u32(e, 16),
            date_nsec: be_u32(e, 20),
            vm_clock_nsec: be_u64(e, 24),
            vm_state_size,
            disk_size: field(1),
            icount: field(2),
            extra_unknown: extra.get(24..).unwrap_or(&[]).to_vec(),
        });
        off += total;
    }
    Ok((out, off as u64))
}

/// Encodes snapshots into table bytes (QEMU's layout: 24 bytes of extra data plus any unknown).
/// A snapshot without a recorded disk size gets `image_size`, as QEMU records it.
pub(crate) fn encode_table(snapshots: &[Snapshot], image_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snapshots {
        // Entries start 8-aligned; the last is not padded (QEMU writes no padding after it).
        out.resize(out.len().next_multiple_of(8), 0);
        let start = out.len();
        let extra_len = 24 + s.extra_unknown.len();
        out.resize(start + SNAPSHOT_HEADER_SIZE as usize + extra_len, 0);
        let e = &mut out[start..];
        put_u64(e, 0, s.l1_table_offset);
        put_u32(e, 8, s.l1_size);
        put_u16(e, 12, s.id.len() as u16);
        put_u16(e, 14, s.name.len() as u16);
        put_u32(e, 16, s.date_sec);
        put_u32(e, 20, s.date_nsec);
        put_u64(e, 24, s.vm_clock_nsec);
        put_u32(e, 32, u32::try_from(s.vm_state_size).unwrap_or(0));
        put_u32(e, 36, extra_len as u32);
        put_u64(e, 40, s.vm_state_size);
        put_u64(e, 48, s.disk_size.unwrap_or(image_size));
        put_u64(e, 56, s.icount.unwrap_or(u64::MAX));
        e[64..64 + s.extra_unknown.len()].copy_from_slice(&s.extra_unknown);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 8,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 77,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: Some(u64::MAX),
            extra_unknown: vec![],
        }
    }

    #[test]
    fn round_trip() {
        let s = vec![snap("1", "first"), snap("2", "second one")];
        let b = encode_table(&s, 1 << 30);
        let (p, len) = parse_table(&b, 2).expect("valid test input");
        assert_eq!(p, s);
        assert_eq!(len, b.len() as u64);
    }

    #[test]
    fn count_larger_than_table_is_refused() {
        let b = encode_table(&[snap("1", "a")], 1 << 30);
        assert!(matches!(
            parse_table(&b, 3),
            Err(Corruption::BadSnapshot { index: 1, .. })
        ));
    }

    #[test]
    fn huge_extra_data_is_refused() {
        let mut b = encode_table(&[snap("1", "a")], 1 << 30);
        put_u32(&mut b, 36, 5000);
        assert!(parse_table(&b, 1).is_err());
    }

    #[test]
    fn huge_snapshot_l1_is_left_to_the_snapshot_open() {
        // Validated when the snapshot is used, so that the active image still opens.
        let mut s = snap("1", "a");
        s.l1_size = u32::MAX;
        let b = encode_table(&[s.clone()], 1 << 30);
        assert_eq!(parse_table(&b, 1).expect("valid test input").0, vec![s]);
    }

    #[test]
    fn short_buffer_reports_entry_past_end() {
        let b = encode_table(&[snap("1", "a")], 1 << 30);
        assert_eq!(
            parse_table(&b[..b.len() - 8], 1),
            Err(Corruption::BadSnapshot {
                index: 0,
                rule: ENTRY_PAST_END
            })
        );
    }
}
