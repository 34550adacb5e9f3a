//! Rebuilding the refcounts of a dirty image (write-ordering rule 5).
//!
//! A lazy-refcounts image carries the dirty bit while its refcounts may be stale; after a crash
//! they must be recomputed from **all** metadata before anything is written: the header, the
//! active and every snapshot's L1 and L2 tables and the clusters they map (a compressed cluster
//! counts once on every host cluster its bytes touch), the snapshot table, the refcount table and
//! blocks, and the bitmap directory, tables and data. Each L1 table that reaches a cluster
//! counts one reference, as QEMU counts them.
//!
//! The new counts are written into the existing refcount blocks (blocks missing for used
//! clusters are placed past every used cluster), flushed, and only then is the dirty bit
//! cleared, so a crash during the rebuild leaves an image that is rebuilt again next time.

use super::refcount::Refcounts;
use crate::error::{Corruption, Error, Result};
use crate::format::bitmap::BitmapEntry;
use crate::format::entry::{classify, ClusterKind, OFFSET_MASK};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::Header;
use crate::format::snapshot::Snapshot;
use crate::format::{be_u64, extension::Extensions};
use crate::io::{Storage, StorageExt};

struct Counter<'a> {
    storage: &'a dyn Storage,
    counts: Vec<u64>,
    cb: u32,
    /// Bytes of metadata still allowed to be read (bounds the work on hostile images).
    budget: u64,
}

fn past_eof(what: &'static str, offset: u64, size: u64) -> Error {
    Corruption::BadTable {
        table: what,
        offset,
        size,
        rule: "lies past the end of the file",
    }
    .into()
}

impl Counter<'_> {
    fn inc(&mut self, what: &'static str, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let first = offset >> self.cb;
        let last = offset
            .checked_add(size - 1)
            .ok_or_else(|| past_eof(what, offset, size))?
            >> self.cb;
        if last >= self.counts.len() as u64 {
            return Err(past_eof(what, offset, size));
        }
        for c in first..=last {
            self.counts[c as usize] += 1;
        }
        Ok(())
    }

    fn read_words(&mut self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let bytes = entries * 8;
        if bytes > self.budget {
            return Err(Error::Unsupported(
                "refcount rebuild would read more metadata than the image can hold".into(),
            ));
        }
        self.budget -= bytes;
        let raw = self
            .storage
            .read_vec(offset, bytes as usize)
            .map_err(|e| Error::io("reading metadata for refcount rebuild", e))?;
        Ok(raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect())
    }

    /// Counts an L1 table and everything it reaches.
    fn l1(&mut self, h: &Header, offset: u64, entries: u32) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        let cs = h.cluster_size();
        self.inc("L1 table", offset, u64::from(entries) * 8)?;
        let l1 = self.read_words(offset, u64::from(entries))?;
        let words = (cs / 8) as usize;
        let extended = h.has_extended_l2();
        let step = if extended { 2 } else { 1 };
        for e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.inc("L2 table", l2, cs)?;
            let t = self.read_words(l2, words as u64)?;
            for i in (0..words).step_by(step) {
                match classify(t[i], h.cluster_bits, extended, h.has_data_file()) {
                    ClusterKind::Normal { host } | ClusterKind::Zero { host }
                        if host != 0 && !h.has_data_file() =>
                    {
                        self.inc("data cluster", host, cs)?
                    }
                    ClusterKind::Compressed(d) => {
                        self.inc("compressed cluster", d.host_offset, d.stored_len())?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Recomputes every refcount of a dirty image, writes them, and clears the dirty bit. Returns
/// the refcounts, ready for writing.
pub(crate) fn rebuild_refcounts(
    storage: &dyn Storage,
    header: &mut Header,
    extensions: &Extensions,
    snapshots: &[Snapshot],
    bitmaps: &[BitmapEntry],
) -> Result<Refcounts> {
    let cs = header.cluster_size();
    let cb = header.cluster_bits;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    let n = file_len.div_ceil(cs);
    let mut c = Counter {
        storage,
        counts: vec![0; n as usize],
        cb,
        budget: file_len.saturating_mul(4).saturating_add(256 << 20),
    };
    c.inc("header", 0, cs)?;
    c.l1(header, header.l1_table_offset, header.l1_size)?;
    if header.nb_snapshots > 0 {
        let table_len: u64 = snapshots
            .iter()
            .map(|s| (40 + 24 + s.extra_unknown.len() + s.id.len() + s.name.len()) as u64)
            .map(|l| l.next_multiple_of(8))
            .sum();
        c.inc("snapshot table", header.snapshots_offset, table_len.max(1))?;
        for s in snapshots {
            c.l1(header, s.l1_table_offset, s.l1_size)?;
        }
    }
    let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
    c.inc("refcount table", header.refcount_table_offset, rt_bytes)?;
    for e in c.read_words(header.refcount_table_offset, rt_bytes / 8)? {
        let b = e & !0x1ff;
        if b != 0 {
            c.inc("refcount block", b, cs)?;
        }
    }
    if let Some(b) = extensions.bitmaps {
        if header.autoclear.contains(AutoclearFeatures::BITMAPS) {
            c.inc("bitmap directory", b.directory_offset, b.directory_size)?;
            for bm in bitmaps {
                c.inc(
                    "bitmap table",
                    bm.table_offset,
                    u64::from(bm.table_size) * 8,
                )?;
                for e in c.read_words(bm.table_offset, u64::from(bm.table_size))? {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        c.inc("bitmap data", off, cs)?;
                    }
                }
            }
        }
    }

    let mut refs = Refcounts::load(
        storage,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.refcount_order,
        cb,
    )?;
    let (table_len, block_bits) = refs.shape();
    let per_block = 1u64 << block_bits;
    // Existing blocks take the new counts; clusters past the used ones are free.
    for ri in 0..table_len {
        if refs.has_block(ri) {
            let start = ri as u64 * per_block;
            for cl in start..start + per_block {
                let v = c.counts.get(cl as usize).copied().unwrap_or(0);
                refs.set_existing(storage, cl, v)?;
            }
        }
    }
    // Blocks missing for used clusters go past everything in use.
    refs.cursor = n;
    let mut file_end = n * cs;
    for ri in 0..n.div_ceil(per_block) as usize {
        let start = ri as u64 * per_block;
        let end = (start + per_block).min(n);
        let used = (start..end).any(|cl| c.counts[cl as usize] != 0);
        if used && !refs.has_block(ri) {
            refs.ensure_block(storage, ri, &mut file_end)?;
            for cl in start..end {
                refs.set_existing(storage, cl, c.counts[cl as usize])?;
            }
        }
    }
    refs.write_blocks(storage)?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing rebuilt refcounts", e))?;
    if refs.write_table_entries(storage)? {
        storage
            .flush()
            .map_err(|e| Error::io("flushing refcount table", e))?;
    }
    header.incompatible.remove(IncompatibleFeatures::DIRTY);
    storage
        .write_at(&header.incompatible.bits().to_be_bytes(), 72)
        .and_then(|()| storage.flush())
        .map_err(|e| Error::io("clearing the dirty bit", e))?;
    Ok(refs)
}
