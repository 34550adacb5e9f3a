//! The metadata walk of a check (QEMU's `calculate_refcounts`): the reference count every host
//! cluster should have, from the header, the active and snapshot L1/L2 tables, the snapshot
//! table, the refcount table, the encryption header and the bitmaps, with the findings of each
//! table on the way.

use super::refcounts::RefcountReader;
use super::refcounts::{CopiedSummary, Lookup};
use super::report::{CheckFailure, CheckReport, Finding};
use super::{work_limit, Checker, CHUNK, MAX_CACHED_FINDINGS, MAX_EMITTED_FINDINGS};
use crate::error::Error;
use crate::format::entry::{
    classify, ClusterKind, CompressedDescriptor, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK,
    ZERO,
};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::{Header, SNAPSHOT_HEADER_SIZE};
use crate::format::snapshot::{parse_table, Snapshot};
use crate::format::{
    be_u16, be_u32, be_u64, refcount, MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES,
};
use crate::io::Storage;
use std::collections::HashMap;

/// Reserved bits of a bitmap table entry.
const BME_TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Largest bitmap table QEMU accepts, in entries.
const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap QEMU accepts, in bytes of bitmap data.
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bitmap directory flags other than in_use and auto.
const BME_RESERVED_FLAGS: u32 = !3;

/// Why a walk stopped.
pub(super) enum Stop {
    Failed(CheckFailure),
    Io(Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(Error::io("reading metadata", e))
    }
}

pub(super) type Step<T = ()> = std::result::Result<T, Stop>;

/// Expected refcounts: two bytes per cluster, the rare larger counts in a map.
pub(super) struct Expected {
    counts: Vec<u16>,
    big: HashMap<u64, u64>,
    max: u64,
}

impl Expected {
    pub(super) fn new(len: usize, max: u64) -> Self {
        Expected {
            counts: vec![0; len],
            big: HashMap::new(),
            max,
        }
    }

    pub(super) fn get(&self, k: u64) -> u64 {
        match self.counts.get(k as usize) {
            None | Some(0) => 0,
            Some(&u16::MAX) => self.big.get(&k).copied().unwrap_or(0),
            Some(&c) => u64::from(c),
        }
    }

    /// Sets the count of cluster `k` (capped at the refcount width's maximum).
    pub(super) fn set(&mut self, k: u64, v: u64) {
        let i = k as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        let v = v.min(self.max);
        if v >= u64::from(u16::MAX) {
            self.counts[i] = u16::MAX;
            self.big.insert(k, v);
        } else {
            self.counts[i] = v as u16;
            self.big.remove(&k);
        }
    }

    /// Adds `n` references to cluster `k`; returns how many did not fit the refcount width.
    pub(super) fn add(&mut self, k: u64, n: u64) -> u64 {
        let i = k as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        let cur = self.get(k);
        let room = self.max - cur;
        let added = n.min(room);
        let new = cur + added;
        if new >= u64::from(u16::MAX) {
            self.counts[i] = u16::MAX;
            self.big.insert(k, new);
        } else {
            self.counts[i] = new as u16;
        }
        n - added
    }
}

/// What one visit of an L2 table contributes, replayed on later visits.
#[derive(Default)]
pub(super) struct L2Summary {
    corruptions: u64,
    findings: Vec<Finding>,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// What a pass may repair (QEMU's `BdrvCheckMode`): nothing, leaks, and/or errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fix {
    /// Lower refcounts that are higher than the references (`BDRV_FIX_LEAKS`).
    pub(super) leaks: bool,
    /// Repair corruptions (`BDRV_FIX_ERRORS`).
    pub(super) errors: bool,
}

impl Fix {
    /// A read-only pass.
    pub(super) const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
}

/// The snapshot table as read once per check (QEMU's `qcow2_check_read_snapshot_table`).
pub(super) struct Snapshots {
    /// The snapshots kept (with a repair, extra data past 1 KiB is already cut off).
    pub(super) list: Vec<Snapshot>,
    /// Entries the header names (fewer than its original count once a repair dropped some).
    pub(super) count: u32,
    /// Bytes of the table on disk, from its start to the end of the last entry kept.
    pub(super) size: u64,
}

/// What the comparison of stored and expected refcounts leaves for the COPIED check.
pub(super) struct Compared {
    /// The last cluster with a stored refcount or a reference.
    pub(super) highest: u64,
    /// One bit per cluster: its stored refcount is 1 (after any repair).
    pub(super) is_one: Vec<u64>,
}

/// The state of one check.
pub(super) struct Walk<'a, 'b> {
    /// What this pass repairs.
    pub(super) fix: Fix,
    /// The refcount structure itself is broken: only a rebuild can repair it.
    pub(super) rebuild: bool,
    /// The image is open for a repair (QEMU then marks it corrupt where a read-only check only
    /// reports).
    pub(super) writable: bool,
    /// Clusters of the virtual disk.
    virtual_clusters: u64,
    pub(super) storage: &'a dyn Storage,
    pub(super) file_len: u64,
    pub(super) cb: u32,
    pub(super) cs: u64,
    pub(super) order: u32,
    pub(super) extended: bool,
    pub(super) data_file: bool,
    pub(super) report: &'b mut CheckReport,
    pub(super) sink: &'b mut dyn FnMut(&Finding),
    pub(super) emitted: u64,
    pub(super) budget: u64,
    pub(super) limit: u64,
    pub(super) expected: Expected,
    pub(super) nb_clusters: u64,
    pub(super) l2_cache: HashMap<u64, L2Summary>,
    /// L2 tables visited more than once, with the visits whose references are not yet counted.
    pub(super) pending: Vec<(u64, u64)>,
    pub(super) pending_index: HashMap<u64, usize>,
    pub(super) copied_cache: HashMap<u64, CopiedSummary>,
    /// The span (from the lowest start to the highest end) of the regions referenced but not
    /// counted because they lie past the end of the file: free by their refcounts, yet not
    /// free to allocate.
    pub(super) uncounted: Option<(u64, u64)>,
}

impl<'a, 'b> Walk<'a, 'b> {
    pub(super) fn emit(&mut self, f: &Finding, times: u64) {
        for _ in 0..times {
            if self.emitted < MAX_EMITTED_FINDINGS {
                (self.sink)(f);
            } else if self.emitted == MAX_EMITTED_FINDINGS {
                (self.sink)(&Finding::Suppressed);
            } else {
                return;
            }
            self.emitted += 1;
        }
    }

    pub(super) fn corrupt(&mut self, f: Finding, times: u64) {
        self.report.corruptions += times;
        self.emit(&f, times);
    }

    /// Reads `len` bytes at `offset` (zeros past the end of the file), charging the budget for
    /// the bytes that lie inside the file.
    pub(super) fn read(&mut self, offset: u64, len: u64) -> Step<Vec<u8>> {
        let inside = self.file_len.saturating_sub(offset).min(len);
        if inside > self.budget {
            return Err(Stop::Failed(CheckFailure::WorkLimit { limit: self.limit }));
        }
        self.budget -= inside;
        let mut buf = vec![0u8; len as usize];
        if inside > 0 {
            self.storage.read_at(&mut buf[..inside as usize], offset)?;
        }
        Ok(buf)
    }

    /// Writes `bytes` at `offset` and flushes them (a repair's single-entry update).
    pub(super) fn write_sync(&mut self, offset: u64, bytes: &[u8]) -> Step {
        self.storage
            .write_at(bytes, offset)
            .and_then(|()| self.storage.flush())
            .map_err(|e| Stop::Io(Error::io("writing repaired metadata", e)))
    }

    /// Sets the corrupt bit of a version 3 image, as QEMU does when a refcount block it needs
    /// is unusable in an image open for writing.
    fn mark_corrupt(&mut self) -> Step {
        let io = |e| Stop::Io(Error::io("marking the image corrupt", e));
        let mut raw = [0u8; 8];
        self.storage.read_at(&mut raw[..4], 4).map_err(io)?;
        if u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) < 3 {
            return Ok(());
        }
        self.storage.read_at(&mut raw, 72).map_err(io)?;
        let bits = u64::from_be_bytes(raw) | IncompatibleFeatures::CORRUPT.bits();
        self.write_sync(72, &bits.to_be_bytes())
    }

    /// Bytes of `[offset, offset + len)` that lie inside the file (the rest reads as zeros).
    pub(super) fn in_file(&self, offset: u64, len: u64) -> u64 {
        self.file_len.saturating_sub(offset).min(len)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`, `mult` times: counts the clusters of a region, or
    /// reports it if it ends a cluster or more past the end of the file. Returns the finding
    /// and corruption count it produced (not yet emitted or counted) when `defer` is set.
    pub(super) fn inc(&mut self, offset: u64, size: u64, mult: u64) {
        if let Some(f) = self.inc_region(offset, size, mult) {
            self.corrupt(f, mult);
        }
    }

    /// Whether references to `size` bytes at `offset` are counted: not when the region ends a
    /// cluster or more past the end of the file (QEMU reports it instead).
    pub(super) fn is_countable(&self, offset: u64, size: u64) -> bool {
        match offset.checked_add(size) {
            Some(end) => offset <= i64::MAX as u64 && end < self.file_len.saturating_add(self.cs),
            None => false,
        }
    }

    /// The counting part of [`inc`](Walk::inc); returns the past-the-end finding instead of
    /// reporting it.
    fn inc_region(&mut self, offset: u64, size: u64, mult: u64) -> Option<Finding> {
        if size == 0 || mult == 0 || size > i64::MAX as u64 {
            return None;
        }
        if !self.is_countable(offset, size) {
            let end = offset.saturating_add(size);
            self.uncounted = Some(match self.uncounted {
                Some((s, e)) => (s.min(offset), e.max(end)),
                None => (offset, end),
            });
            return Some(Finding::RegionPastEof { offset, size });
        }
        let first = offset >> self.cb;
        let last = (offset + size - 1) >> self.cb;
        for k in first..=last {
            if k >= self.nb_clusters {
                self.nb_clusters = k + 1;
            }
            let over = self.expected.add(k, mult);
            if over > 0 {
                self.corrupt(
                    Finding::RefcountOverflow {
                        offset: k << self.cb,
                    },
                    over,
                );
            }
        }
        None
    }

    /// Starts a walk over the image `c` validated, reporting into `report` and `sink`.
    pub(super) fn new(
        c: &Checker<'a>,
        report: &'b mut CheckReport,
        sink: &'b mut dyn FnMut(&Finding),
        fix: Fix,
    ) -> Self {
        let h = &c.header;
        let cs = h.cluster_size();
        Walk {
            fix,
            rebuild: false,
            writable: false,
            virtual_clusters: h.size.div_ceil(512).saturating_mul(512).div_ceil(cs),
            storage: c.storage,
            file_len: c.file_len,
            cb: h.cluster_bits,
            cs,
            order: h.refcount_order,
            extended: h.has_extended_l2(),
            data_file: h.has_data_file(),
            report,
            sink,
            emitted: 0,
            budget: work_limit(c.file_len),
            limit: work_limit(c.file_len),
            expected: Expected::new(0, refcount::max_value(h.refcount_order)),
            nb_clusters: c.file_len.div_ceil(cs),
            l2_cache: HashMap::new(),
            pending: Vec::new(),
            pending_index: HashMap::new(),
            copied_cache: HashMap::new(),
            uncounted: None,
        }
    }

    /// The whole read-only check (QEMU's `qcow2_co_check` without a repair mode).
    pub(super) fn run(&mut self, c: &Checker<'_>) -> Step {
        let snapshots = self.start(c)?;
        let mut reader = self.calculate(c, &snapshots)?;
        let compared = self.compare(&mut reader)?;
        // The refcount array is no longer needed.
        self.expected = Expected::new(0, 0);
        self.check_copied(&c.header, &mut reader, &compared.is_one, false)?;
        self.report.image_end_offset = (compared.highest + 1) << self.cb;
        Ok(())
    }

    /// Sizes the expected-refcount array and reads the snapshot table.
    pub(super) fn start(&mut self, c: &Checker<'_>) -> Step<Snapshots> {
        self.prepare()?;
        self.read_snapshot_table(&c.header)
    }

    /// Sizes the expected-refcount array (QEMU refuses more than `INT_MAX` clusters).
    pub(super) fn prepare(&mut self) -> Step {
        // QEMU refuses more than INT_MAX clusters before allocating its table.
        if self.nb_clusters > i32::MAX as u64 {
            self.report.check_errors += 1;
            return Err(Stop::Failed(CheckFailure::TooLarge(
                "the image has more than 2^31 clusters".into(),
            )));
        }
        self.expected = Expected::new(
            self.nb_clusters as usize + 1,
            refcount::max_value(self.order),
        );
        self.report.total_clusters = self.virtual_clusters;
        Ok(())
    }

    /// QEMU's `calculate_refcounts`: counts the references of the header, the active L1 table,
    /// the snapshots, their table, the refcount table, the encryption header, the bitmaps and
    /// the refcount blocks. Returns the stored refcounts' reader.
    pub(super) fn calculate(
        &mut self,
        c: &Checker<'_>,
        snapshots: &Snapshots,
    ) -> Step<RefcountReader> {
        let h = &c.header;
        // calculate_refcounts(): header, active L1, snapshots, their table, refcount table,
        // encryption header, bitmaps, refcount blocks.
        self.inc(0, self.cs, 1);
        self.walk_l1(h.l1_table_offset, h.l1_size, 1, true)?;
        if self.data_file && snapshots.count > 0 {
            self.corrupt(
                Finding::SnapshotsWithDataFile {
                    count: snapshots.count,
                },
                1,
            );
        }
        let mut groups: Vec<((u64, u32), u64)> = Vec::new();
        let mut group_index: HashMap<(u64, u32), usize> = HashMap::new();
        for s in &snapshots.list {
            if s.l1_table_offset % self.cs != 0 {
                self.corrupt(
                    Finding::SnapshotL1Unaligned {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        offset: s.l1_table_offset,
                    },
                    1,
                );
                continue;
            }
            if u64::from(s.l1_size) > MAX_L1_BYTES / 8 {
                self.corrupt(
                    Finding::SnapshotL1TooLarge {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        l1_size: s.l1_size,
                    },
                    1,
                );
                continue;
            }
            let key = (s.l1_table_offset, s.l1_size);
            match group_index.get(&key) {
                Some(&g) => groups[g].1 += 1,
                None => {
                    group_index.insert(key, groups.len());
                    groups.push((key, 1));
                }
            }
        }
        for ((offset, size), mult) in groups {
            self.walk_l1(offset, size, mult, false)?;
        }
        for (l2, extra) in std::mem::take(&mut self.pending) {
            self.count_l2_again(l2, extra)?;
        }
        self.inc(h.snapshots_offset, snapshots.size, 1);
        let rt_bytes = u64::from(h.refcount_table_clusters) * self.cs;
        self.inc(h.refcount_table_offset, rt_bytes, 1);
        if let Some(cr) = &c.extensions.crypto {
            self.inc(cr.offset, cr.length, 1);
        }
        if h.autoclear.contains(AutoclearFeatures::BITMAPS) {
            if let Some(b) = c.extensions.bitmaps {
                self.check_bitmaps(h, b.directory_offset, b.directory_size, b.nb_bitmaps)?;
            }
        }
        let reader = self.read_refcount_table(h.refcount_table_offset, rt_bytes)?;
        self.check_refblocks(&reader)?;
        Ok(reader)
    }

    /// QEMU's `compare_refcounts`: compares every cluster's stored refcount with its
    /// references, repairing what [`Walk::fix`] allows. A referenced cluster whose refcount is
    /// zero sets [`Walk::rebuild`].
    pub(super) fn compare(&mut self, reader: &mut RefcountReader) -> Step<Compared> {
        let mut is_one = vec![0u64; (self.nb_clusters as usize).div_ceil(64)];
        let mut highest = 0u64;
        let mut signaled = false;
        for i in 0..self.nb_clusters {
            let stored = match self.stored(reader, i)? {
                Lookup::Value(v) => v,
                Lookup::Unaligned { offset, index } => {
                    if !signaled {
                        signaled = true;
                        if self.writable {
                            self.mark_corrupt()?;
                        }
                        let marked = self.writable;
                        self.emit(
                            &Finding::ImageCorrupt {
                                offset,
                                index,
                                marked,
                            },
                            1,
                        );
                    }
                    self.report.check_errors += 1;
                    self.emit(&Finding::RefcountUnreadable { cluster: i }, 1);
                    continue;
                }
            };
            let reference = self.expected.get(i);
            if stored > 0 || reference > 0 {
                highest = i;
            }
            let mut now = stored;
            if stored != reference {
                let finding = if stored < reference {
                    Finding::RefcountTooLow {
                        cluster: i,
                        refcount: stored,
                        reference,
                    }
                } else {
                    Finding::Leaked {
                        cluster: i,
                        refcount: stored,
                        reference,
                    }
                };
                let repair = if stored == 0 {
                    self.rebuild = true;
                    false
                } else if stored > reference {
                    self.fix.leaks
                } else {
                    self.fix.errors
                };
                if repair {
                    self.emit(&Finding::Repairing(Box::new(finding)), 1);
                    self.set_stored(reader, i, reference)?;
                    if stored > reference {
                        self.report.leaks_fixed += 1;
                    } else {
                        self.report.corruptions_fixed += 1;
                    }
                    now = reference;
                } else if stored < reference {
                    self.corrupt(finding, 1);
                } else {
                    self.report.leaks += 1;
                    self.emit(&finding, 1);
                }
            }
            if now == 1 {
                is_one[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
        self.write_back(reader)?;
        Ok(Compared { highest, is_one })
    }

    /// QEMU's `qcow2_check_read_snapshot_table` (and `qcow2_do_read_snapshots` in its repair
    /// mode): returns the snapshots, their count and the table's length.
    ///
    /// With [`Fix::errors`], what cannot be kept is dropped as QEMU drops it: snapshots past the
    /// 65 536th or past the 64 MiB table limit (the header's count is lowered at once, which
    /// leaks their clusters for the refcount repair to free), and extra data past 1 KiB
    /// (truncated in memory; the repair writes the table anew after the refcount repair,
    /// together with v3 entries lacking their 16 bytes of extra data).
    fn read_snapshot_table(&mut self, h: &Header) -> Step<Snapshots> {
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

    /// QEMU's `check_refcounts_l1` for a table seen `mult` times.
    fn walk_l1(&mut self, offset: u64, entries: u32, mult: u64, active: bool) -> Step {
        if entries == 0 {
            return Ok(());
        }
        let bytes = u64::from(entries) * 8;
        self.inc(offset, bytes, mult);
        let inside = self.in_file(offset, bytes) / 8 * 8;
        let mut pos = 0u64;
        while pos < inside {
            let n = (inside - pos).min(CHUNK);
            let chunk = self.read(offset + pos, n)?;
            for e in chunk.chunks_exact(8).map(|b| be_u64(b, 0)) {
                if e == 0 {
                    continue;
                }
                if e & L1_RESERVED != 0 {
                    self.corrupt(Finding::L1ReservedBits { entry: e }, mult);
                }
                let l2 = e & OFFSET_MASK;
                self.inc(l2, self.cs, mult);
                if l2 % self.cs != 0 {
                    self.corrupt(Finding::L2Unaligned { l2_offset: l2 }, mult);
                }
                self.visit_l2(l2, mult, if active { mult } else { 0 })?;
            }
            pos += n;
        }
        Ok(())
    }

    /// One L1 entry's visit of the L2 table at `l2`, `mult` times (`active` of them from the
    /// active L1 table, which count towards the allocation statistics).
    fn visit_l2(&mut self, l2: u64, mult: u64, active: u64) -> Step {
        let first = !self.l2_cache.contains_key(&l2);
        if first {
            let s = self.walk_l2(l2)?;
            self.l2_cache.insert(l2, s);
        }
        let Some(s) = self.l2_cache.remove(&l2) else {
            return Ok(());
        };
        // The first walk reported and counted one visit; the others are replayed here, and
        // their references counted later.
        let replays = if first { mult - 1 } else { mult };
        let mut k = 0;
        while k < replays && !s.findings.is_empty() && self.emitted <= MAX_EMITTED_FINDINGS {
            for f in &s.findings {
                self.emit(f, 1);
            }
            k += 1;
        }
        self.report.corruptions += s.corruptions * replays;
        self.report.allocated_clusters += s.allocated * active;
        self.report.fragmented_clusters += s.fragmented * active;
        self.report.compressed_clusters += s.compressed * active;
        self.l2_cache.insert(l2, s);
        let uncounted = replays;
        if uncounted > 0 {
            match self.pending_index.get(&l2) {
                Some(&p) => self.pending[p].1 += uncounted,
                None => {
                    self.pending_index.insert(l2, self.pending.len());
                    self.pending.push((l2, uncounted));
                }
            }
        }
        Ok(())
    }

    /// Reads the in-file part of the L2 table at `l2` (entries past the end are zero, which
    /// map nothing).
    pub(super) fn read_l2(&mut self, l2: u64) -> Step<Vec<u8>> {
        let esz = if self.extended { 16 } else { 8 };
        let inside = self.in_file(l2, self.cs).next_multiple_of(esz).min(self.cs);
        self.read(l2, inside)
    }

    /// Reports one finding of an L2 table's first visit and remembers it for later visits.
    fn note(&mut self, s: &mut L2Summary, f: Finding) {
        self.report.corruptions += 1;
        self.emit(&f, 1);
        s.corruptions += 1;
        if s.findings.len() < MAX_CACHED_FINDINGS {
            s.findings.push(f);
        }
    }

    /// QEMU's `check_refcounts_l2`: counts and reports one visit, and returns what a later
    /// visit of the same table reports (refcount overflows aside: they depend on the count).
    fn walk_l2(&mut self, l2: u64) -> Step<L2Summary> {
        let table = self.read_l2(l2)?;
        let mut s = L2Summary::default();
        let esz = if self.extended { 16 } else { 8 };
        let mut next_contiguous = 0u64;
        for (i, e) in table.chunks_exact(esz).enumerate() {
            let entry = be_u64(e, 0);
            let bitmap = if self.extended { be_u64(e, 8) } else { 0 };
            let kind = classify(entry, self.cb, self.extended, self.data_file);
            if !matches!(kind, ClusterKind::Compressed(_)) && entry & L2_RESERVED != 0 {
                self.note(&mut s, Finding::L2ReservedBits { entry });
            }
            match kind {
                ClusterKind::Compressed(d) => {
                    if entry & COPIED != 0 {
                        self.note(
                            &mut s,
                            Finding::CompressedCopied {
                                coffset: d.host_offset,
                            },
                        );
                    }
                    let entry = entry & !COPIED;
                    if self.data_file {
                        self.note(
                            &mut s,
                            Finding::CompressedWithDataFile {
                                index: i as u32,
                                entry,
                            },
                        );
                        continue;
                    }
                    if bitmap != 0 {
                        self.note(
                            &mut s,
                            Finding::CompressedWithBitmap {
                                index: i as u32,
                                entry,
                            },
                        );
                        continue;
                    }
                    let d = CompressedDescriptor::decode(entry, self.cb);
                    if let Some(f) = self.inc_region(d.host_offset, d.stored_len(), 1) {
                        self.note(&mut s, f);
                    }
                    s.allocated += 1;
                    s.compressed += 1;
                    s.fragmented += 1;
                }
                ClusterKind::Zero { host: 0 } => {}
                ClusterKind::Normal { host } | ClusterKind::Zero { host } => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.note(&mut s, Finding::BadSubclusterBitmap { offset: host });
                    }
                    if host % self.cs != 0 {
                        let data = if self.extended {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            entry & ZERO == 0
                        };
                        let finding = Finding::UnalignedCluster { offset: host, data };
                        if !data && self.fix.errors {
                            // QEMU turns the entry into a plain zero cluster (the bitmap of an
                            // extended entry stays) and no longer counts the cluster.
                            let repaired = if self.extended { 0 } else { ZERO };
                            let at = l2 + (i * esz) as u64;
                            self.emit(&Finding::Repairing(Box::new(finding)), 1);
                            self.write_sync(at, &repaired.to_be_bytes())?;
                            self.report.corruptions_fixed += 1;
                            continue;
                        }
                        self.note(&mut s, finding);
                    }
                    s.allocated += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        s.fragmented += 1;
                    }
                    next_contiguous = host.wrapping_add(self.cs);
                    if !self.data_file {
                        if let Some(f) = self.inc_region(host, self.cs, 1) {
                            self.note(&mut s, f);
                        }
                    }
                }
                ClusterKind::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        self.note(&mut s, Finding::UnallocatedWithBitmap);
                    }
                }
            }
        }
        Ok(s)
    }

    /// Counts `times` more visits' references of the L2 table at `l2` (their findings were
    /// already reported).
    fn count_l2_again(&mut self, l2: u64, times: u64) -> Step {
        let table = self.read_l2(l2)?;
        let esz = if self.extended { 16 } else { 8 };
        for e in table.chunks_exact(esz) {
            let entry = be_u64(e, 0);
            let bitmap = if self.extended { be_u64(e, 8) } else { 0 };
            match classify(entry, self.cb, self.extended, self.data_file) {
                ClusterKind::Compressed(_) if !self.data_file && bitmap == 0 => {
                    let d = CompressedDescriptor::decode(entry & !COPIED, self.cb);
                    self.inc_region(d.host_offset, d.stored_len(), times);
                }
                ClusterKind::Normal { host } if !self.data_file => {
                    self.inc_region(host, self.cs, times);
                }
                ClusterKind::Zero { host } if host != 0 && !self.data_file => {
                    self.inc_region(host, self.cs, times);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    fn check_bitmaps(&mut self, h: &Header, offset: u64, size: u64, count: u32) -> Step {
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
