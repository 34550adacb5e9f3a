//! The snapshot table in a check (QEMU's `qcow2_check_read_snapshot_table`): its entries
//! read and validated, the findings QEMU reports for each, and their repair.

use super::report::{CheckFailure, Finding};
use super::walk::{Snapshots, Step, Stop, Walk};
use crate::error::Error;
use crate::format::header::{Header, SNAPSHOT_HEADER_SIZE};
use crate::format::snapshot::parse_table;
use crate::format::{
    be_u16, be_u32, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
};

impl Walk<'_, '_> {
    /// QEMU's `qcow2_check_read_snapshot_table` (and `qcow2_do_read_snapshots` in its repair
    /// mode): returns the snapshots, their count and the table's length.
    ///
    /// With [`Fix::errors`], what cannot be kept is dropped as QEMU drops it: snapshots past the
    /// 65 536th or past the 64 MiB table limit (the header's count is lowered at once, which
    /// leaks their clusters for the refcount repair to free), and extra data past 1 KiB
    /// (truncated in memory; the repair writes the table anew after the refcount repair,
    /// together with v3 entries lacking their 16 bytes of extra data).
    pub(super) fn read_snapshot_table(&mut self, h: &Header) -> Step<Snapshots> {
        let mut nb = h.nb_snapshots;
        let start = h.snapshots_offset;
        let fail = |w: &mut Self, message: String, hint: Option<String>, f: CheckFailure| {
            w.report.check_errors += 1;
            w.emit(&Finding::SnapshotTable { message, hint }, 1);
            Err(Stop::Failed(f))
        };
        let mut reduced = 0u64;
        let mut dropped = 0u64;
        if nb > MAX_SNAPSHOTS && self.fix.errors {
            self.emit(
                &Finding::SnapshotsDiscarded {
                    count: nb - MAX_SNAPSHOTS,
                    table_too_big: false,
                },
                1,
            );
            reduced += u64::from(nb - MAX_SNAPSHOTS);
            nb = MAX_SNAPSHOTS;
        }
        if nb > MAX_SNAPSHOTS {
            return fail(
                self,
                "ERROR snapshot table too large".into(),
                Some(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    nb - MAX_SNAPSHOTS
                )),
                CheckFailure::TooLarge("snapshot table too large".into()),
            );
        }
        let table_min = u64::from(nb) * SNAPSHOT_HEADER_SIZE;
        if i64::MAX as u64 - table_min < start || start % self.cs != 0 {
            return fail(
                self,
                "ERROR snapshot table offset invalid".into(),
                None,
                CheckFailure::Invalid("snapshot table offset invalid".into()),
            );
        }
        let read_fail = |w: &mut Self, what: String, hint: String| {
            fail(
                w,
                format!("ERROR failed to read the snapshot table: {what}"),
                Some(hint),
                CheckFailure::TooLarge(what),
            )
        };
        let mut list = Vec::new();
        let mut offset = start;
        let mut table_len = 0u64;
        let mut kept = nb;
        for i in 0..nb {
            let entry_start = offset;
            table_len = table_len.next_multiple_of(8);
            offset = offset.next_multiple_of(8);
            let fixed = self.read(offset, SNAPSHOT_HEADER_SIZE)?;
            let id_len = u64::from(be_u16(&fixed, 12));
            let name_len = u64::from(be_u16(&fixed, 14));
            let extra_len = be_u32(&fixed, 36);
            // The extra data kept: all of it, or its first 1 KiB when a repair truncates it.
            let kept_extra = if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
                if !self.fix.errors {
                    return read_fail(
                        self,
                        format!("Too much extra metadata in snapshot table entry {i}"),
                        "You can force-remove this extra metadata with qemu-img check -r all"
                            .into(),
                    );
                }
                self.emit(
                    &Finding::SnapshotExtraDiscarded {
                        index: i,
                        size: extra_len,
                    },
                    1,
                );
                dropped += 1;
                MAX_SNAPSHOT_EXTRA_DATA
            } else {
                extra_len
            };
            let (extra_len, kept_extra) = (u64::from(extra_len), u64::from(kept_extra));
            let strings_at = offset + SNAPSHOT_HEADER_SIZE + extra_len;
            // The fixed part as read, then the extra data kept, then the id and name.
            let mut entry = fixed;
            entry.extend(self.read(offset + SNAPSHOT_HEADER_SIZE, kept_extra)?);
            entry.extend(self.read(strings_at, id_len + name_len)?);
            entry[36..40].copy_from_slice(&(kept_extra as u32).to_be_bytes());
            let (parsed, _) = parse_table(&entry, 1)
                .map_err(|c| Stop::Failed(CheckFailure::Invalid(format!("snapshot table: {c}"))))?;
            offset = strings_at + id_len + name_len;
            table_len += SNAPSHOT_HEADER_SIZE + kept_extra + id_len + name_len;
            if table_len > MAX_SNAPSHOT_TABLE_BYTES || offset - start > i32::MAX as u64 {
                if !self.fix.errors {
                    return read_fail(
                        self,
                        "Snapshot table is too big".into(),
                        format!(
                            "You can force-remove all {} overhanging snapshots with qemu-img \
                             check -r all",
                            nb - i
                        ),
                    );
                }
                self.emit(
                    &Finding::SnapshotsDiscarded {
                        count: nb - i,
                        table_too_big: true,
                    },
                    1,
                );
                reduced += u64::from(nb - i);
                kept = i;
                offset = entry_start;
                break;
            }
            list.extend(parsed);
        }
        let nb = kept;
        self.report.corruptions += reduced + dropped;
        if reduced > 0 {
            // The header must name only the snapshots kept before the refcounts are counted.
            let write = self
                .storage
                .write_at(&nb.to_be_bytes(), 60)
                .and_then(|()| self.storage.flush());
            if let Err(e) = write {
                self.report.check_errors += 1;
                self.emit(
                    &Finding::SnapshotCountUpdateFailed {
                        reason: crate::error::strerror(&e),
                    },
                    1,
                );
                return Err(Stop::Io(Error::io("updating the snapshot count", e)));
            }
            self.report.corruptions_fixed += reduced;
            self.report.corruptions -= reduced;
        }
        // v3 entries without their 16 bytes of extra data, reported once the table is read.
        if h.version >= 3 {
            for (i, s) in list.iter().enumerate() {
                if s.disk_size.is_none() {
                    let f = Finding::SnapshotIncomplete { index: i as u32 };
                    if self.fix.errors {
                        self.corrupt(Finding::Repairing(Box::new(f)), 1);
                    } else {
                        self.corrupt(f, 1);
                    }
                }
            }
        }
        Ok(Snapshots {
            count: nb,
            list,
            size: offset - start,
        })
    }
}
