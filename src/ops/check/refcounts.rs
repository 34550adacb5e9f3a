//! The refcounts as stored: reading them (QEMU's `qcow2_get_refcount`), checking the refcount
//! blocks themselves (`check_refblocks`) and the COPIED flags of the active tables against
//! them (`check_oflag_copied`).

use super::report::{CheckFailure, Finding};
use super::stored::{CachedBlock, CopiedSummary, Lookup, RefcountReader};
use super::walk::{Step, Stop, Walk};
use super::{CHUNK, MAX_CACHED_FINDINGS};
use crate::error::Error;
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use crate::format::header::Header;
use crate::format::{be_u64, refcount};

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Bits 0..=8 of a refcount table entry: reserved.
const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Largest size a repair grows the file to when a refcount block lies past its end (QEMU grows
/// it to any size; a block far past the end is a hostile entry, rebuilt instead).
pub(super) fn max_growth(file_len: u64) -> u64 {
    file_len
        .saturating_mul(2)
        .max(file_len.saturating_add(1 << 30))
}

impl Walk<'_, '_> {
    /// Reads the in-file part of the refcount table.
    pub(super) fn read_refcount_table(&mut self, offset: u64, bytes: u64) -> Step<RefcountReader> {
        let inside = self.in_file(offset, bytes) / 8 * 8;
        let raw = self.read(offset, inside)?;
        Ok(RefcountReader {
            table: raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect(),
            block_bits: self.cb + 3 - self.order,
            cache: Vec::new(),
        })
    }

    /// QEMU's `check_refblocks`. A broken refcount table entry sets [`Walk::rebuild`]; a
    /// refcount block past the end of the file is repaired (errors mode) as QEMU repairs it, by
    /// growing the file to hold it, within [`max_growth`].
    pub(super) fn check_refblocks(&mut self, reader: &RefcountReader) -> Step {
        for (i, &raw) in reader.table.iter().enumerate() {
            let index = i as u64;
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.cb;
            if raw & REFT_RESERVED_MASK != 0 {
                self.corrupt(Finding::RefblockReservedBits { index }, 1);
                self.rebuild = true;
                continue;
            }
            if offset % self.cs != 0 {
                self.corrupt(Finding::RefblockUnaligned { index }, 1);
                self.rebuild = true;
                continue;
            }
            if cluster >= self.nb_clusters {
                if !self.fix.errors {
                    self.corrupt(Finding::RefblockOutside { index }, 1);
                    continue;
                }
                self.emit(
                    &Finding::Repairing(Box::new(Finding::RefblockOutside { index })),
                    1,
                );
                let new_len = offset
                    .checked_add(self.cs)
                    .filter(|&l| l <= i64::MAX as u64 && l <= max_growth(self.file_len));
                let Some(new_len) = new_len else {
                    self.report.corruptions += 1;
                    self.rebuild = true;
                    self.emit(
                        &Finding::ResizeFailed {
                            reason: "File too large".into(),
                        },
                        1,
                    );
                    continue;
                };
                self.storage.set_len(new_len).map_err(|e| {
                    Stop::Io(Error::io("growing the image to its refcount block", e))
                })?;
                self.file_len = new_len;
                self.nb_clusters = new_len.div_ceil(self.cs);
                self.report.corruptions_fixed += 1;
                self.inc(offset, self.cs, 1);
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs, 1);
                let refcount = self.expected.get(cluster);
                if refcount != 1 {
                    self.corrupt(Finding::RefblockShared { index, refcount }, 1);
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Sets the stored refcount of `cluster`, whose refcount block exists (it holds a non-zero
    /// count). The change stays in memory until [`write_back`](Walk::write_back).
    pub(super) fn set_stored(&mut self, r: &mut RefcountReader, cluster: u64, value: u64) -> Step {
        let index = cluster >> r.block_bits;
        let offset = r.table.get(index as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        let slot = self.cached_block(r, offset)?;
        let within = (cluster & ((1 << r.block_bits) - 1)) as usize;
        let block = &mut r.cache[slot];
        if !refcount::set(&mut block.data, self.order, within, value) {
            return Err(Stop::Io(Error::Unsupported(format!(
                "refcount {value} of cluster {cluster} does not fit the refcount width"
            ))));
        }
        block.dirty = true;
        Ok(())
    }

    /// Writes the refcount blocks a repair changed, and flushes them.
    pub(super) fn write_back(&mut self, r: &mut RefcountReader) -> Step {
        let mut wrote = false;
        for b in r.cache.iter_mut().filter(|b| b.dirty) {
            self.storage
                .write_at(&b.data, b.offset)
                .map_err(|e| Stop::Io(Error::io("writing a repaired refcount block", e)))?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            self.storage
                .flush()
                .map_err(|e| Stop::Io(Error::io("flushing repaired refcounts", e)))?;
        }
        Ok(())
    }

    /// The cache slot of the refcount block at `offset` (inside the file, aligned), reading it
    /// if needed; a changed block leaving the cache is written first.
    fn cached_block(&mut self, r: &mut RefcountReader, offset: u64) -> Step<usize> {
        if let Some(p) = r.cache.iter().position(|b| b.offset == offset) {
            return Ok(p);
        }
        let data = self.read(offset, self.cs)?;
        if r.cache.len() >= 8 {
            let old = r.cache.remove(0);
            if old.dirty {
                self.storage
                    .write_at(&old.data, old.offset)
                    .map_err(|e| Stop::Io(Error::io("writing a repaired refcount block", e)))?;
            }
        }
        r.cache.push(CachedBlock {
            offset,
            data,
            dirty: false,
        });
        Ok(r.cache.len() - 1)
    }

    /// The stored refcount of `cluster` (QEMU's `qcow2_get_refcount`).
    pub(super) fn stored(&mut self, r: &mut RefcountReader, cluster: u64) -> Step<Lookup> {
        let index = cluster >> r.block_bits;
        let Some(&raw) = r.table.get(index as usize) else {
            return Ok(Lookup::Value(0));
        };
        let offset = raw & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(Lookup::Value(0));
        }
        if offset % self.cs != 0 {
            return Ok(Lookup::Unaligned { offset, index });
        }
        if offset >= self.file_len {
            return Ok(Lookup::Value(0));
        }
        let slot = self.cached_block(r, offset)?;
        let within = (cluster & ((1 << r.block_bits) - 1)) as usize;
        Ok(Lookup::Value(refcount::get(
            &r.cache[slot].data,
            self.order,
            within,
        )))
    }

    /// QEMU's `check_oflag_copied` over the active L1 table, with stored refcounts.
    pub(super) fn check_copied(
        &mut self,
        h: &Header,
        r: &mut RefcountReader,
        is_one: &[u64],
        repair: bool,
    ) -> Step {
        let bytes = u64::from(h.l1_size) * 8;
        let inside = self.in_file(h.l1_table_offset, bytes) / 8 * 8;
        let mut pos = 0u64;
        while pos < inside {
            let n = (inside - pos).min(CHUNK);
            let chunk = self.read(h.l1_table_offset + pos, n)?;
            for (j, e) in chunk.chunks_exact(8).map(|b| be_u64(b, 0)).enumerate() {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let rc = match self.stored(r, l2 >> self.cb)? {
                    Lookup::Value(v) => v,
                    Lookup::Unaligned { .. } => continue,
                };
                if (rc == 1) != (e & COPIED != 0) {
                    let l1_index = pos / 8 + j as u64;
                    let finding = Finding::CopiedL2 {
                        l1_index,
                        l1_entry: e,
                        refcount: rc,
                    };
                    if repair {
                        self.emit(&Finding::Repairing(Box::new(finding)), 1);
                        let fixed = if rc == 1 { e | COPIED } else { e & !COPIED };
                        self.write_sync(h.l1_table_offset + l1_index * 8, &fixed.to_be_bytes())?;
                        self.report.corruptions_fixed += 1;
                    } else {
                        self.corrupt(finding, 1);
                    }
                }
                if !self.copied_cache.contains_key(&l2) {
                    let s = self.copied_l2(h, l2, r, is_one, repair)?;
                    self.copied_cache.insert(l2, s);
                }
                if let Some(s) = self.copied_cache.remove(&l2) {
                    self.report.corruptions += s.corruptions;
                    for f in &s.findings {
                        self.emit(f, 1);
                    }
                    self.copied_cache.insert(l2, s);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// The COPIED check of the data entries of one L2 table; with `repair`, the wrong flags are
    /// corrected and the table rewritten (the summary then holds nothing more to report).
    fn copied_l2(
        &mut self,
        h: &Header,
        l2: u64,
        r: &mut RefcountReader,
        is_one: &[u64],
        repair: bool,
    ) -> Step<CopiedSummary> {
        let mut table = self.read_l2(l2)?;
        let esz = if self.extended { 16 } else { 8 };
        let mut s = CopiedSummary::default();
        let mut fixes = Vec::new();
        for (i, e) in table.chunks_exact(esz).enumerate() {
            let entry = be_u64(e, 0);
            let host = match classify(entry, self.cb, self.extended, self.data_file) {
                ClusterKind::Normal { host } => host,
                ClusterKind::Zero { host } if host != 0 => host,
                _ => continue,
            };
            let copied = entry & COPIED != 0;
            let cluster = host >> self.cb;
            // Data file clusters count as one reference each (QEMU does not look them up).
            let one = self.data_file
                || (cluster < self.nb_clusters
                    && (is_one[(cluster / 64) as usize] >> (cluster % 64)) & 1 != 0);
            let rc = if one {
                1
            } else if !copied && cluster < self.nb_clusters {
                // Not one and not flagged: consistent whatever the value is.
                continue;
            } else {
                match self.stored(r, cluster)? {
                    Lookup::Value(v) => v,
                    Lookup::Unaligned { .. } => continue,
                }
            };
            if (rc == 1) != copied {
                if repair {
                    let fixed = if rc == 1 {
                        entry | COPIED
                    } else {
                        entry & !COPIED
                    };
                    self.emit(
                        &Finding::Repairing(Box::new(Finding::CopiedData {
                            l2_entry: entry,
                            refcount: rc,
                        })),
                        1,
                    );
                    fixes.push((i * esz, fixed));
                    continue;
                }
                s.corruptions += 1;
                if s.findings.len() < MAX_CACHED_FINDINGS {
                    s.findings.push(Finding::CopiedData {
                        l2_entry: entry,
                        refcount: rc,
                    });
                }
            }
        }
        if !fixes.is_empty() {
            if self.overlaps_metadata(h, r, l2) {
                self.report.check_errors += 1;
                self.emit(&Finding::L2WriteRefused, 1);
                return Err(Stop::Failed(CheckFailure::RepairFailed(
                    "an L2 table to repair overlaps other metadata".into(),
                )));
            }
            for &(at, fixed) in &fixes {
                table[at..at + 8].copy_from_slice(&fixed.to_be_bytes());
            }
            self.write_sync(l2, &table)?;
            self.report.corruptions_fixed += fixes.len() as u64;
        }
        Ok(s)
    }

    /// QEMU's overlap check before an L2 table is rewritten: whether the cluster at `l2` is the
    /// header, part of the active L1 table or the refcount table, or a refcount block.
    fn overlaps_metadata(&self, h: &Header, r: &RefcountReader, l2: u64) -> bool {
        let cs = self.cs;
        let within = |start: u64, len: u64| {
            len > 0 && l2 < start.saturating_add(len) && start < l2.saturating_add(cs)
        };
        l2 < cs
            || within(h.l1_table_offset, u64::from(h.l1_size) * 8)
            || within(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
            || r.table
                .iter()
                .any(|&e| e & REFT_OFFSET_MASK != 0 && within(e & REFT_OFFSET_MASK, cs))
    }
}
