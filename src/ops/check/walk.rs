//! The metadata walk of a check (QEMU's `calculate_refcounts`): the reference count every host
//! cluster should have, from the header, the active and snapshot L1/L2 tables, the snapshot
//! table, the refcount table, the encryption header and the bitmaps, with the findings of each
//! table on the way.

use super::report::{CheckFailure, CheckReport, Finding};
use super::stored::{CopiedSummary, Lookup, RefcountReader};
use super::{work_limit, Checker, MAX_EMITTED_FINDINGS};
use crate::error::Error;
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::snapshot::Snapshot;
use crate::format::{refcount, MAX_L1_BYTES};
use crate::io::Storage;
use std::collections::HashMap;

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
    pub(super) corruptions: u64,
    pub(super) findings: Vec<Finding>,
    pub(super) allocated: u64,
    pub(super) fragmented: u64,
    pub(super) compressed: u64,
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
    pub(super) fn inc_region(&mut self, offset: u64, size: u64, mult: u64) -> Option<Finding> {
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

    /// Reads the in-file part of the L2 table at `l2` (entries past the end are zero, which
    /// map nothing).
    pub(super) fn read_l2(&mut self, l2: u64) -> Step<Vec<u8>> {
        let esz = if self.extended { 16 } else { 8 };
        let inside = self.in_file(l2, self.cs).next_multiple_of(esz).min(self.cs);
        self.read(l2, inside)
    }
}
