//! The L1 and L2 tables in a check (QEMU's `check_refcounts_l1` and `check_refcounts_l2`):
//! every entry's references counted and its flags and alignment checked, each L2 table walked
//! once however many L1 entries name it.

use super::report::Finding;
use super::walk::{L2Summary, Step, Walk};
use super::{CHUNK, MAX_CACHED_FINDINGS, MAX_EMITTED_FINDINGS};
use crate::format::be_u64;
use crate::format::entry::{
    classify, ClusterKind, CompressedDescriptor, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK,
    ZERO,
};

impl Walk<'_, '_> {
    /// QEMU's `check_refcounts_l1` for a table seen `mult` times.
    pub(super) fn walk_l1(&mut self, offset: u64, entries: u32, mult: u64, active: bool) -> Step {
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
    pub(super) fn visit_l2(&mut self, l2: u64, mult: u64, active: u64) -> Step {
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

    /// Reports one finding of an L2 table's first visit and remembers it for later visits.
    pub(super) fn note(&mut self, s: &mut L2Summary, f: Finding) {
        self.report.corruptions += 1;
        self.emit(&f, 1);
        s.corruptions += 1;
        if s.findings.len() < MAX_CACHED_FINDINGS {
            s.findings.push(f);
        }
    }

    /// QEMU's `check_refcounts_l2`: counts and reports one visit, and returns what a later
    /// visit of the same table reports (refcount overflows aside: they depend on the count).
    pub(super) fn walk_l2(&mut self, l2: u64) -> Step<L2Summary> {
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
    pub(super) fn count_l2_again(&mut self, l2: u64, times: u64) -> Step {
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
}
