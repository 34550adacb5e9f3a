//! The refcounts as stored: reading them (QEMU's `qcow2_get_refcount`), checking the refcount
//! blocks themselves (`check_refblocks`) and the COPIED flags of the active tables against
//! them (`check_oflag_copied`).

use super::report::Finding;
use super::walk::{Step, Walk};
use super::{CHUNK, MAX_CACHED_FINDINGS};
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use crate::format::header::Header;
use crate::format::{be_u64, refcount};

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Bits 0..=8 of a refcount table entry: reserved.
const REFT_RESERVED_MASK: u64 = 0x1ff;

/// What the COPIED check of one L2 table finds, replayed for every active L1 entry naming it.
#[derive(Default)]
pub(super) struct CopiedSummary {
    corruptions: u64,
    findings: Vec<Finding>,
}

/// Stored refcounts, read block by block with a small cache.
pub(super) struct RefcountReader {
    /// The in-file part of the refcount table (entries past the end of the file are zero).
    table: Vec<u64>,
    /// log2 of entries per refcount block.
    block_bits: u32,
    cache: Vec<(u64, Vec<u8>)>,
}

pub(super) enum Lookup {
    Value(u64),
    Unaligned { offset: u64, index: u64 },
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

    /// QEMU's `check_refblocks`.
    pub(super) fn check_refblocks(&mut self, reader: &RefcountReader) {
        for (i, &raw) in reader.table.iter().enumerate() {
            let index = i as u64;
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.cb;
            if raw & REFT_RESERVED_MASK != 0 {
                self.corrupt(Finding::RefblockReservedBits { index }, 1);
                continue;
            }
            if offset % self.cs != 0 {
                self.corrupt(Finding::RefblockUnaligned { index }, 1);
                continue;
            }
            if cluster >= self.nb_clusters {
                self.corrupt(Finding::RefblockOutside { index }, 1);
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs, 1);
                let refcount = self.expected.get(cluster);
                if refcount != 1 {
                    self.corrupt(Finding::RefblockShared { index, refcount }, 1);
                }
            }
        }
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
        let slot = match r.cache.iter().position(|(o, _)| *o == offset) {
            Some(p) => p,
            None => {
                let block = self.read(offset, self.cs)?;
                if r.cache.len() >= 8 {
                    r.cache.remove(0);
                }
                r.cache.push((offset, block));
                r.cache.len() - 1
            }
        };
        let within = (cluster & ((1 << r.block_bits) - 1)) as usize;
        Ok(Lookup::Value(refcount::get(
            &r.cache[slot].1,
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
                    self.corrupt(
                        Finding::CopiedL2 {
                            l1_index: pos / 8 + j as u64,
                            l1_entry: e,
                            refcount: rc,
                        },
                        1,
                    );
                }
                if !self.copied_cache.contains_key(&l2) {
                    let s = self.copied_l2(l2, r, is_one)?;
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

    /// The COPIED check of the data entries of one L2 table.
    fn copied_l2(
        &mut self,
        l2: u64,
        r: &mut RefcountReader,
        is_one: &[u64],
    ) -> Step<CopiedSummary> {
        let table = self.read_l2(l2)?;
        let esz = if self.extended { 16 } else { 8 };
        let mut s = CopiedSummary::default();
        for e in table.chunks_exact(esz) {
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
                s.corruptions += 1;
                if s.findings.len() < MAX_CACHED_FINDINGS {
                    s.findings.push(Finding::CopiedData {
                        l2_entry: entry,
                        refcount: rc,
                    });
                }
            }
        }
        Ok(s)
    }
}
