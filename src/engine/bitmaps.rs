//! Persistent dirty bitmaps of a writable image, kept current as QEMU keeps them
//! (`block/qcow2-bitmap.c`).
//!
//! Life cycle:
//! - Writable open ([`Qcow2Image::activate_bitmaps`]): the data of every bitmap not flagged in
//!   use is read into memory (all of it bounded by [`MAX_BITMAP_MEMORY`]). A bitmap flagged in
//!   use at open was left so by a writer that did not close the image: it is inconsistent, kept
//!   as it is on disk, and refused for every use but removal, as in QEMU.
//! - Before the guest content changes (the first write, zero write or discard, a resize) every
//!   enabled bitmap is flagged in use on disk ([`Qcow2Image::flag_bitmaps_in_use`]); a bitmap
//!   whose bits an operation is about to set (merge) is flagged first too. Invariant: while a
//!   bitmap's stored bits may be short of what the image holds, the directory on disk flags it
//!   in use. QEMU flags every bitmap at open; flagging lazily leaves an image opened writable
//!   and not written byte for byte as it was.
//! - Every write, zero write and discard marks the bits of its range dirty in every enabled
//!   bitmap, before the data is written ([`Qcow2Image::lock_range_tracked`]).
//! - Close ([`Qcow2Image::store_bitmaps`]): each loaded bitmap is written to new clusters with
//!   a new table (a data cluster only where a bit is set), a new directory with the in-use flags
//!   cleared is written elsewhere and counted, the header is switched to it, and only then are
//!   the old directory, tables and data freed. A crash before the switch leaves the old
//!   directory, whose bitmaps are flagged in use (inconsistent); after it, the new one: never a
//!   clean-looking bitmap with wrong bits. Writes after a close flag the bitmaps again.
//!
//! Every directory change is written elsewhere and switched to with the header (QEMU flags
//! bitmaps in use at open by clearing the autoclear bit, rewriting the directory in place and
//! setting the bit again, which loses every bitmap to a crash in between; this is safer).
//!
//! Locks: `bitmap_ops` serializes directory rewrites and is taken first, with no range lock
//! held; the state lock is held only for in-memory work (never across a directory rewrite,
//! which waits for writes in flight, and those take it).

use super::dirty_bitmap::DirtyBitmap;
use super::meta::Meta;
use super::range_lock::RangeGuard;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::be_u64;
use crate::format::bitmap::{
    bytes_per_data_cluster, encode_directory, table_entries, BitmapEntry, TableEntry, FLAG_AUTO,
    FLAG_IN_USE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE,
    MIN_GRANULARITY_BITS, TYPE_DIRTY_TRACKING,
};
use crate::format::extension::BitmapsExtension;
use crate::format::features::AutoclearFeatures;
use crate::io::StorageExt;
use std::sync::MutexGuard;

/// Most memory the bits of all bitmaps of one image may take: twice the most one bitmap may
/// take in QEMU (512 MiB, a 2 TiB disk tracked at 512 bytes). The bits are allocated zeroed
/// (pages the system hands out on first touch).
pub const MAX_BITMAP_MEMORY: u64 = 1 << 30;

/// The hint QEMU appends to "is inconsistent and cannot be used".
pub(crate) const INCONSISTENT_HINT: &str =
    "Try block-dirty-bitmap-remove to delete this bitmap from disk";

/// Which bitmaps [`Qcow2Image::flag_bitmaps_in_use`] flags.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flag<'a> {
    /// Every enabled bitmap (before a write).
    Enabled,
    /// Every bitmap (before a resize, which changes them all).
    All,
    /// Every enabled bitmap and this one (before its bits change).
    Also(&'a str),
}

/// One bitmap of a writable image.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The directory entry as on disk (table offset 0 for a bitmap added since open).
    pub(crate) entry: BitmapEntry,
    /// The bits; `None` for a bitmap that was in use at open (inconsistent, kept as it is).
    pub(crate) bits: Option<DirtyBitmap>,
    /// Tracks writes.
    pub(crate) enabled: bool,
    /// Host offsets of the data clusters the on-disk table names.
    pub(crate) data_clusters: Vec<u64>,
}

/// The bitmaps of an open image (behind their own lock, taken before the metadata lock).
#[derive(Debug, Default)]
pub(crate) struct BitmapState {
    /// The bitmaps were loaded (writable open): they are kept current.
    pub(crate) loaded: bool,
    /// Every enabled bitmap in the directory is flagged in use on disk: writes may proceed.
    pub(crate) marked: bool,
    /// Bits, flags or bitmaps changed since the last store.
    pub(crate) changed: bool,
    pub(crate) list: Vec<Tracked>,
}

pub(crate) fn inconsistent(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n{INCONSISTENT_HINT}"
    ))
}

pub(crate) fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

fn corrupt(name: &str, rule: &str) -> Error {
    Error::Corrupt(Corruption::Inconsistent(format!(
        "Could not read bitmap '{name}' from image: {rule}"
    )))
}

impl Qcow2Image {
    /// Serializes the operations that rewrite the bitmap directory.
    pub(crate) fn bitmap_ops(&self) -> MutexGuard<'_, ()> {
        self.bitmap_ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bitmap_state(&self) -> MutexGuard<'_, BitmapState> {
        // Every change to the state is one assignment or one in-memory bit operation.
        self.bitmap_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the bits of the bitmap `e` from the image (data clusters, all-zero and all-one
    /// table entries) and the host offsets of its data clusters. `budget` is the memory still
    /// allowed.
    pub(crate) fn read_bitmap(
        &self,
        e: &BitmapEntry,
        budget: u64,
    ) -> Result<(DirtyBitmap, Vec<u64>)> {
        let cs = self.geo.cluster_size;
        let size = self.size();
        if e.kind != TYPE_DIRTY_TRACKING || e.extra_data_size != 0 {
            return Err(Error::Unsupported(format!(
                "bitmap '{}' has a type or extra data qcow2kit does not know",
                e.name
            )));
        }
        if table_entries(size, e.granularity_bits, cs) != u64::from(e.table_size) {
            return Err(corrupt(&e.name, "table size does not match the disk size"));
        }
        let mut bits = DirtyBitmap::new(size, e.granularity_bits, budget)?;
        let raw = self
            .storage
            .read_vec(e.table_offset, e.table_size as usize * 8)
            .map_err(|err| Error::io("reading bitmap table", err))?;
        let words_per_cluster = cs / 8;
        let file_end = self.lock_meta().file_end;
        let mut data = Vec::new();
        let mut buf = vec![0u8; cs as usize];
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let first = i as u64 * words_per_cluster;
            match TableEntry::decode(be_u64(c, 0), cs) {
                None => return Err(corrupt(&e.name, "invalid bitmap table entry")),
                Some(TableEntry::Zeros) => {}
                Some(TableEntry::Ones) => bits.fill_words(first, words_per_cluster),
                Some(TableEntry::Data(host)) => {
                    if host.checked_add(cs).is_none_or(|end| end > file_end) {
                        return Err(corrupt(
                            &e.name,
                            "data cluster lies past the end of the file",
                        ));
                    }
                    let meta_hit = self
                        .lock_meta()
                        .refs
                        .as_ref()
                        .and_then(|r| r.map.find(host, cs, &[]));
                    if let Some(s) = meta_hit {
                        return Err(corrupt(
                            &e.name,
                            &format!("a data cluster overlaps the {}", s.name()),
                        ));
                    }
                    self.storage
                        .read_at(&mut buf, host)
                        .map_err(|err| Error::io("reading bitmap data", err))?;
                    bits.load_bytes(first as usize, &buf);
                    data.push(host);
                }
            }
        }
        Ok((bits, data))
    }

    /// Loads every bitmap of a writable image (see the module docs). Called once, at open.
    pub(crate) fn activate_bitmaps(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let entries = self.bitmaps();
        let mut budget = MAX_BITMAP_MEMORY;
        let mut list = Vec::with_capacity(entries.len());
        for e in &entries {
            let (bits, data_clusters) = if e.flags & FLAG_IN_USE != 0 {
                (None, Vec::new())
            } else {
                let (b, d) = self.read_bitmap(e, budget).map_err(|err| match err {
                    Error::Unsupported(m) if m.starts_with("a dirty bitmap of") => {
                        Error::Unsupported(format!(
                            "the image's persistent bitmaps need more than {MAX_BITMAP_MEMORY} \
                             bytes of memory"
                        ))
                    }
                    other => other,
                })?;
                budget -= b.memory();
                (Some(b), d)
            };
            list.push(Tracked {
                entry: e.clone(),
                bits,
                enabled: e.flags & FLAG_AUTO != 0,
                data_clusters,
            });
        }
        let mut st = self.bitmap_state();
        st.list = list;
        st.loaded = true;
        Ok(())
    }

    /// Flags in use on disk the bitmaps `which` names that are in the directory, consistent
    /// and not flagged yet (see the module docs). Takes no range lock: call it before any.
    pub(crate) fn flag_bitmaps_in_use(&self, which: Flag<'_>) -> Result<()> {
        let wanted = |t: &Tracked| {
            t.bits.is_some()
                && t.entry.table_offset != 0
                && t.entry.flags & FLAG_IN_USE == 0
                && match which {
                    Flag::Enabled => t.enabled,
                    Flag::All => true,
                    Flag::Also(n) => t.enabled || t.entry.name == n,
                }
        };
        {
            let st = self.bitmap_state();
            if !st.loaded || (st.marked && matches!(which, Flag::Enabled)) {
                return Ok(());
            }
        }
        let _ops = self.bitmap_ops();
        let entries = {
            let mut st = self.bitmap_state();
            if !st.list.iter().any(wanted) {
                st.marked = true;
                return Ok(());
            }
            st.list
                .iter()
                .filter(|t| t.entry.table_offset != 0)
                .map(|t| BitmapEntry {
                    flags: t.entry.flags | if wanted(t) { FLAG_IN_USE } else { 0 },
                    ..t.entry.clone()
                })
                .collect::<Vec<_>>()
        };
        // The state lock is not held here: committing waits for writes in flight.
        self.commit_directory(&entries, Vec::new())?;
        let mut st = self.bitmap_state();
        for t in st.list.iter_mut() {
            if let Some(e) = entries.iter().find(|e| e.name == t.entry.name) {
                t.entry = e.clone();
            }
        }
        st.marked = true;
        Ok(())
    }

    /// Locks the guest range `start..end` for a write, zero write or discard of
    /// `offset..offset + len`, with the bits of the range marked dirty in every enabled bitmap
    /// and those bitmaps flagged in use on disk (see the module docs).
    pub(crate) fn lock_range_tracked(
        &self,
        start: u64,
        end: u64,
        offset: u64,
        len: u64,
    ) -> Result<RangeGuard<'_>> {
        loop {
            self.flag_bitmaps_in_use(Flag::Enabled)?;
            let g = self.lock_range(start, end);
            let mut st = self.bitmap_state();
            if !st.loaded {
                return Ok(g);
            }
            if !st.marked {
                // A store cleared the flags meanwhile: flag them again first.
                drop(st);
                drop(g);
                continue;
            }
            let mut any = false;
            for t in st.list.iter_mut().filter(|t| t.enabled) {
                if let Some(b) = &mut t.bits {
                    b.mark(offset, len);
                    any = true;
                }
            }
            st.changed |= any;
            return Ok(g);
        }
    }

    /// Refuses a resize while a bitmap is inconsistent or would be too large at `new_size`
    /// (QEMU refuses the first; the second it finds only when storing, and loses the bitmaps),
    /// or while the bitmaps are not flagged in use (a close storing them meanwhile). Called
    /// with the whole range locked, after [`Flag::All`] flagging.
    pub(crate) fn check_bitmaps_resize(&self, new_size: u64) -> Result<()> {
        let st = self.bitmap_state();
        for t in &st.list {
            if t.bits.is_none() {
                return Err(inconsistent(&t.entry.name));
            }
            if t.entry.table_offset != 0 && t.entry.flags & FLAG_IN_USE == 0 {
                return Err(Error::Unsupported(
                    "the persistent bitmaps are being stored; resize again".into(),
                ));
            }
            self.check_constraints(&t.entry.name, t.entry.granularity_bits, new_size)?;
        }
        Ok(())
    }

    /// Follows a resize: new bits are clean, bits past the new end dropped.
    pub(crate) fn resize_bitmaps(&self, new_size: u64) {
        let mut st = self.bitmap_state();
        for t in st.list.iter_mut() {
            if let Some(b) = &mut t.bits {
                b.resize(new_size);
            }
        }
        st.changed |= !st.list.is_empty();
    }

    /// QEMU's `check_constraints_on_bitmap`.
    pub(crate) fn check_constraints(
        &self,
        name: &str,
        granularity_bits: u8,
        size: u64,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if granularity_bits > MAX_GRANULARITY_BITS {
            return bad(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << MAX_GRANULARITY_BITS
            ));
        }
        if granularity_bits < MIN_GRANULARITY_BITS {
            return bad(format!(
                "Granularity is under minimum ({} bytes)",
                1u64 << MIN_GRANULARITY_BITS
            ));
        }
        let bytes = size.div_ceil(1 << granularity_bits).div_ceil(8);
        if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * self.geo.cluster_size {
            return bad(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            );
        }
        if name.len() > MAX_NAME_SIZE {
            return bad(format!(
                "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
            ));
        }
        Ok(())
    }

    /// Writes `entries` as a new bitmap directory in new clusters, switches the header to it
    /// (the autoclear `bitmaps` bit set, or cleared with the extension when there are none),
    /// then frees the old directory and the host clusters in `frees` (see the module docs).
    pub(crate) fn commit_directory(
        &self,
        entries: &[BitmapEntry],
        mut frees: Vec<u64>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let dir = encode_directory(entries);
        let new_dir = if entries.is_empty() {
            None
        } else {
            let mut m = self.lock_meta();
            let at = self.write_new_clusters(&mut m, &dir, "writing bitmap directory")?;
            self.flush_locked(&mut m)?;
            Some((at, dir.len() as u64))
        };
        // A directory the autoclear bit does not vouch for was left by a program that did not
        // keep bitmaps: its clusters may have been repaired away and reused. Never freed.
        {
            // The header is rewritten from the in-memory copy, which a refcount table growth
            // does not update (it switches the table on disk itself).
            let mut m = self.lock_meta();
            if let Some((offset, clusters)) = m.refs.as_ref().map(|r| r.table_location()) {
                m.header.refcount_table_offset = offset;
                m.header.refcount_table_clusters = u32::try_from(clusters)
                    .map_err(|_| Error::Unsupported("refcount table too large".into()))?;
            }
        }
        let old = self
            .extensions()
            .bitmaps
            .filter(|_| self.header().autoclear.contains(AutoclearFeatures::BITMAPS));
        let count = entries.len() as u32;
        self.rewrite_header(|h, ext, _| {
            match new_dir {
                Some((offset, size)) => {
                    ext.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: count,
                        directory_size: size,
                        directory_offset: offset,
                    });
                    h.autoclear |= AutoclearFeatures::BITMAPS;
                }
                None => {
                    ext.bitmaps = None;
                    h.autoclear.remove(AutoclearFeatures::BITMAPS);
                }
            }
            Ok(())
        })?;
        if let Some(o) = old.filter(|o| o.directory_size > 0) {
            let first = o.directory_offset & !(cs - 1);
            let mut c = first;
            while c < o.directory_offset + o.directory_size {
                frees.push(c);
                c += cs;
            }
        }
        let mut m = self.lock_meta();
        let map = &mut m.refs()?.map;
        let (offset, size) = new_dir.unwrap_or((0, 0));
        map.set_bitmap_directory(offset, size);
        map.set_bitmap_tables(
            entries
                .iter()
                .filter(|e| e.table_offset != 0)
                .map(|e| (e.table_offset, u64::from(e.table_size) * 8)),
        );
        m.pending_free.extend(frees);
        self.flush_locked(&mut m)?;
        drop(m);
        *self.bitmaps.write().unwrap_or_else(|e| e.into_inner()) = entries.to_vec();
        Ok(())
    }

    /// Allocates clusters for `bytes`, checks them against the metadata map and writes
    /// `bytes` there. Returns the host offset. Their refcounts reach the disk with the next
    /// flush, after the bytes.
    pub(crate) fn write_new_clusters(
        &self,
        m: &mut Meta,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<u64> {
        let cs = self.geo.cluster_size;
        self.mark_dirty_if_lazy(m)?;
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let s = self.storage.as_ref();
        let Meta { refs, file_end, .. } = m;
        let refs = refs.as_mut().ok_or(Error::ReadOnly)?;
        let at = refs.alloc(s, n, file_end)?;
        refs.map.refuse(at, n * cs, &[])?;
        if let Err(e) = s.write_at(bytes, at) {
            m.broken = true;
            return Err(Error::io(what, e));
        }
        self.note_file_growth(m, at + bytes.len() as u64);
        Ok(at)
    }

    /// Writes `bits` to new data clusters (one per cluster of bitmap data holding a set bit)
    /// and a new table. Returns the table's offset and entries, and the data clusters.
    fn write_bitmap(&self, m: &mut Meta, bits: &DirtyBitmap) -> Result<(u64, u32, Vec<u64>)> {
        let cs = self.geo.cluster_size;
        let n = table_entries(bits.size(), bits.granularity_bits(), cs);
        debug_assert_eq!(bytes_per_data_cluster(bits.granularity_bits(), cs) % 64, 0);
        let words_per_cluster = (cs / 8) as usize;
        let mut table = vec![0u8; (n * 8) as usize];
        let mut buf = vec![0u8; cs as usize];
        let mut data = Vec::new();
        for i in 0..n as usize {
            if bits.chunk_bytes(i * words_per_cluster, words_per_cluster, &mut buf) {
                let host = self.write_new_clusters(m, &buf, "writing bitmap data")?;
                table[i * 8..i * 8 + 8].copy_from_slice(&host.to_be_bytes());
                data.push(host);
            }
        }
        let at = if table.is_empty() {
            0
        } else {
            self.write_new_clusters(m, &table, "writing bitmap table")?
        };
        Ok((at, n as u32, data))
    }

    /// Stores the bitmaps on close (see the module docs), when anything changed since they
    /// were loaded or last stored.
    pub(crate) fn store_bitmaps(&self) -> Result<()> {
        let _ops = self.bitmap_ops();
        {
            let mut st = self.bitmap_state();
            let flagged = st
                .list
                .iter()
                .any(|t| t.bits.is_some() && t.entry.flags & FLAG_IN_USE != 0);
            // With no bitmap left the directory on disk is already what it must be (removals
            // commit at once).
            if !st.loaded || !(st.changed || flagged) || st.list.is_empty() {
                return Ok(());
            }
            // Writes that get their range lock from now on flag the bitmaps again first (and
            // wait for this store to finish).
            st.marked = false;
        }
        // Writes already past that point are finished once the whole range can be locked.
        drop(self.lock_everything()?);
        let mut entries = Vec::new();
        let mut frees = Vec::new();
        let mut data = Vec::new();
        {
            let st = self.bitmap_state();
            let mut m = self.lock_meta();
            if m.broken {
                // The disk may lag the memory: write nothing; the bitmaps stay in use.
                return Err(Error::Unsupported(
                    "an earlier metadata write failed; the persistent bitmaps stay in use".into(),
                ));
            }
            // The bitmaps in the directory keep their places; those added since open follow,
            // the newest first, as QEMU stores them.
            let (stored, added): (Vec<&Tracked>, Vec<&Tracked>) =
                st.list.iter().partition(|t| t.entry.table_offset != 0);
            for t in stored.into_iter().chain(added.into_iter().rev()) {
                let Some(bits) = &t.bits else {
                    entries.push(t.entry.clone());
                    data.push(Vec::new());
                    continue;
                };
                let (offset, size, clusters) = self.write_bitmap(&mut m, bits)?;
                if t.entry.table_offset != 0 {
                    frees.extend(t.data_clusters.iter().copied());
                    frees.extend(self.table_clusters(&t.entry));
                }
                entries.push(BitmapEntry {
                    table_offset: offset,
                    table_size: size,
                    flags: if t.enabled { FLAG_AUTO } else { 0 },
                    ..t.entry.clone()
                });
                data.push(clusters);
            }
        }
        // The state lock is not held here: committing waits for writes in flight.
        self.commit_directory(&entries, frees)?;
        let mut st = self.bitmap_state();
        for (e, clusters) in entries.into_iter().zip(data) {
            if let Some(t) = st.list.iter_mut().find(|t| t.entry.name == e.name) {
                t.entry = e;
                if t.bits.is_some() {
                    t.data_clusters = clusters;
                }
            }
        }
        st.changed = false;
        Ok(())
    }

    /// The host clusters of the table of `e`.
    pub(crate) fn table_clusters(&self, e: &BitmapEntry) -> Vec<u64> {
        let cs = self.geo.cluster_size;
        let end = e.table_offset + u64::from(e.table_size) * 8;
        (e.table_offset..end).step_by(cs as usize).collect()
    }
}
