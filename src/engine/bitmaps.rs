//! Persistent dirty bitmaps of a writable image, kept current as QEMU keeps them
//! (`block/qcow2-bitmap.c`).
//!
//! Life cycle:
//! - Writable open ([`Qcow2Image::activate_bitmaps`]): the data of every bitmap not flagged in
//!   use is read into memory (all of it bounded by [`MAX_BITMAP_MEMORY`]) and those bitmaps are
//!   flagged in use on disk, enabled and disabled alike, as QEMU flags them. A bitmap flagged in
//!   use at open was left so by a writer that did not close the image: it is inconsistent, kept
//!   as it is on disk, and refused for every use but removal, as in QEMU.
//! - Every write, zero write and discard marks the bits of its range dirty in every enabled
//!   bitmap, before the data is written ([`Qcow2Image::track_write`]).
//! - Close ([`Qcow2Image::store_bitmaps`]): each loaded bitmap is written to new clusters with
//!   a new table (a data cluster only where a bit is set), a new directory with the in-use flags
//!   cleared is written elsewhere and counted, the header is switched to it, and only then are
//!   the old directory, tables and data freed. A crash before the switch leaves the old
//!   directory, whose bitmaps are flagged in use (inconsistent); after it, the new one: never a
//!   clean-looking bitmap with wrong bits. After a close, writes are refused (the stored bitmaps
//!   would no longer describe them).
//!
//! Every directory change is written elsewhere and switched to with the header (QEMU flags
//! bitmaps in use at open by clearing the autoclear bit, rewriting the directory in place and
//! setting the bit again, which loses every bitmap to a crash in between; this is safer).

use super::dirty_bitmap::DirtyBitmap;
use super::meta::Meta;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::be_u64;
use crate::format::bitmap::{
    bytes_per_data_cluster, encode_directory, entry_size, table_entries, BitmapEntry, TableEntry,
    FLAG_AUTO, FLAG_IN_USE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE,
    MIN_GRANULARITY_BITS, TYPE_DIRTY_TRACKING,
};
use crate::format::extension::{BitmapsExtension, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use crate::format::features::AutoclearFeatures;
use crate::io::StorageExt;
use std::sync::MutexGuard;

/// Most memory the bits of all bitmaps of one image may take: twice the most one bitmap may
/// take in QEMU (512 MiB, a 2 TiB disk tracked at 512 bytes). The bits are allocated zeroed
/// (pages the system hands out on first touch).
pub const MAX_BITMAP_MEMORY: u64 = 1 << 30;

/// The hint QEMU appends to "is inconsistent and cannot be used".
pub const INCONSISTENT_HINT: &str = "Try block-dirty-bitmap-remove to delete this bitmap from disk";

/// Where the bitmaps of an open image stand.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Read-only, or no bitmaps loaded: nothing to track.
    #[default]
    Inactive,
    /// Loaded and flagged in use on disk: writes are tracked.
    Active,
    /// Stored by a close: writes are refused.
    Closed,
}

/// One bitmap of a writable image.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The directory entry as on disk (table offset 0 for a bitmap added since open).
    entry: BitmapEntry,
    /// The bits; `None` for a bitmap that was in use at open (inconsistent, kept as it is).
    bits: Option<DirtyBitmap>,
    /// Tracks writes.
    enabled: bool,
    /// Host offsets of the data clusters the on-disk table names.
    data_clusters: Vec<u64>,
}

/// The bitmaps of an open image (behind their own lock, taken before the metadata lock).
#[derive(Debug, Default)]
pub(crate) struct BitmapState {
    pub(crate) phase: Phase,
    list: Vec<Tracked>,
}

fn inconsistent(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n{INCONSISTENT_HINT}"
    ))
}

fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

fn corrupt(name: &str, rule: &str) -> Error {
    Error::Corrupt(Corruption::Inconsistent(format!(
        "Could not read bitmap '{name}' from image: {rule}"
    )))
}

fn closed() -> Error {
    Error::Unsupported(
        "the image was closed and its persistent bitmaps stored; reopen it to change them".into(),
    )
}

impl Qcow2Image {
    /// Serializes the operations that rewrite the bitmap directory.
    fn bitmap_ops(&self) -> MutexGuard<'_, ()> {
        self.bitmap_ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bitmap_state(&self) -> MutexGuard<'_, BitmapState> {
        // Every change to the state is one assignment or one in-memory bit operation.
        self.bitmap_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the bits of the bitmap `e` from the image (data clusters, all-zero and all-one
    /// table entries) and the host offsets of its data clusters. `budget` is the memory still
    /// allowed.
    fn read_bitmap(&self, e: &BitmapEntry, budget: u64) -> Result<(DirtyBitmap, Vec<u64>)> {
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

    /// Loads every bitmap of a writable image and flags those not yet in use so on disk (see
    /// the module docs). Called once, at open.
    pub(crate) fn activate_bitmaps(&self) -> Result<()> {
        let entries = self.bitmaps();
        if !self.writable || entries.is_empty() {
            return Ok(());
        }
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
        let _ops = self.bitmap_ops();
        if list.iter().any(|t| t.bits.is_some()) {
            let flagged: Vec<BitmapEntry> = entries
                .iter()
                .map(|e| BitmapEntry {
                    flags: e.flags | FLAG_IN_USE,
                    ..e.clone()
                })
                .collect();
            self.commit_directory(&flagged, Vec::new())?;
            for (t, e) in list.iter_mut().zip(flagged) {
                t.entry = e;
            }
        }
        let mut st = self.bitmap_state();
        st.list = list;
        st.phase = Phase::Active;
        Ok(())
    }

    /// Marks `offset..offset + len` dirty in every enabled bitmap; refused once the bitmaps
    /// were stored by a close. Called by every write, zero write and discard before it
    /// changes anything.
    pub(crate) fn track_write(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.bitmap_state();
        match st.phase {
            Phase::Inactive => Ok(()),
            Phase::Closed => Err(closed()),
            Phase::Active => {
                for t in st.list.iter_mut().filter(|t| t.enabled) {
                    if let Some(b) = &mut t.bits {
                        b.mark(offset, len);
                    }
                }
                Ok(())
            }
        }
    }

    /// Refuses a resize while a bitmap is inconsistent or would be too large at `new_size`
    /// (QEMU refuses the first; the second it finds only when storing, and loses the bitmaps).
    pub(crate) fn check_bitmaps_resize(&self, new_size: u64) -> Result<()> {
        let st = self.bitmap_state();
        if st.phase == Phase::Closed {
            return Err(closed());
        }
        for t in &st.list {
            if t.bits.is_none() {
                return Err(inconsistent(&t.entry.name));
            }
            self.check_constraints(&t.entry.name, t.entry.granularity_bits, new_size)?;
        }
        Ok(())
    }

    /// Follows a resize: new bits are clean, bits past the new end dropped.
    pub(crate) fn resize_bitmaps(&self, new_size: u64) {
        for t in self.bitmap_state().list.iter_mut() {
            if let Some(b) = &mut t.bits {
                b.resize(new_size);
            }
        }
    }

    /// QEMU's `check_constraints_on_bitmap`.
    fn check_constraints(&self, name: &str, granularity_bits: u8, size: u64) -> Result<()> {
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
    fn commit_directory(&self, entries: &[BitmapEntry], mut frees: Vec<u64>) -> Result<()> {
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
        let old = self.extensions().bitmaps;
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
    fn write_new_clusters(&self, m: &mut Meta, bytes: &[u8], what: &'static str) -> Result<u64> {
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
    fn write_bitmap(&self, m: &mut Meta, bits: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size;
        let n = table_entries(bits.size(), bits.granularity_bits(), cs);
        debug_assert_eq!(bytes_per_data_cluster(bits.granularity_bits(), cs) % 64, 0);
        let words_per_cluster = (cs / 8) as usize;
        let mut table = vec![0u8; (n * 8) as usize];
        let mut buf = vec![0u8; cs as usize];
        for i in 0..n as usize {
            if bits.chunk_bytes(i * words_per_cluster, words_per_cluster, &mut buf) {
                let host = self.write_new_clusters(m, &buf, "writing bitmap data")?;
                table[i * 8..i * 8 + 8].copy_from_slice(&host.to_be_bytes());
            }
        }
        let at = if table.is_empty() {
            0
        } else {
            self.write_new_clusters(m, &table, "writing bitmap table")?
        };
        Ok((at, n as u32))
    }

    /// Stores the bitmaps on close (see the module docs). Nothing happens unless the bitmaps
    /// are active.
    pub(crate) fn store_bitmaps(&self) -> Result<()> {
        let _ops = self.bitmap_ops();
        {
            let mut st = self.bitmap_state();
            if st.phase != Phase::Active {
                return Ok(());
            }
            st.phase = Phase::Closed;
        }
        // Writes that passed `track_write` before the phase changed are finished once the whole
        // range can be locked.
        drop(self.lock_everything()?);
        let st = self.bitmap_state();
        let mut entries = Vec::with_capacity(st.list.len());
        let mut frees = Vec::new();
        {
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
                    continue;
                };
                let (offset, size) = self.write_bitmap(&mut m, bits)?;
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
            }
        }
        drop(st);
        self.commit_directory(&entries, frees)
    }

    fn with_bitmap<T>(&self, name: &str, f: impl FnOnce(&mut Tracked) -> Result<T>) -> Result<T> {
        let mut st = self.bitmap_state();
        if st.phase == Phase::Closed {
            return Err(closed());
        }
        let t = st
            .list
            .iter_mut()
            .find(|t| t.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        if t.bits.is_none() {
            return Err(inconsistent(name));
        }
        f(t)
    }

    /// The bits of the persistent bitmap `name`: as tracked in memory on a writable image,
    /// else as stored. A bitmap flagged in use (inconsistent) is refused.
    pub fn bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        if self.bitmap_state().phase == Phase::Active {
            return self.with_bitmap(name, |t| t.bits.clone().ok_or_else(|| inconsistent(name)));
        }
        let e = self
            .bitmaps()
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| not_found(name))?;
        if e.flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        Ok(self.read_bitmap(&e, MAX_BITMAP_MEMORY)?.0)
    }

    /// The dirty ranges (offset, length) of the persistent bitmap `name`: what an incremental
    /// backup since the bitmap was created or cleared copies.
    pub fn bitmap_dirty_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        Ok(self.bitmap(name)?.extents())
    }

    /// Adds a persistent bitmap, clean, tracking writes if `enabled`, at a granularity of
    /// `granularity` bytes (a power of two, 512 B..2 GiB). Stored on close, as QEMU stores it.
    pub fn add_bitmap(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        if granularity < 512 || !granularity.is_power_of_two() || granularity > u64::from(u32::MAX)
        {
            return Err(Error::InvalidArgument(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let g = granularity.trailing_zeros() as u8;
        let mut st = self.bitmap_state();
        if st.phase != Phase::Active {
            if !self.writable {
                return Err(Error::ReadOnly);
            }
            if st.phase == Phase::Closed {
                return Err(closed());
            }
        }
        if st.list.iter().any(|t| t.entry.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        let persistent = |m: String| {
            Error::InvalidArgument(format!("Can't make bitmap '{name}' persistent: {m}"))
        };
        if self.header().version < 3 {
            return Err(persistent(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        self.check_constraints(name, g, self.size())
            .map_err(|e| match e {
                Error::InvalidArgument(m) => persistent(m),
                other => other,
            })?;
        let count = st.list.len() as u64 + 1;
        let dir: usize = st
            .list
            .iter()
            .map(|t| entry_size(t.entry.name.len(), 0))
            .sum::<usize>()
            + entry_size(name.len(), 0);
        if count > u64::from(MAX_BITMAPS) {
            return Err(persistent(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        if dir as u64 > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(persistent(
                "Not enough space in the bitmap directory".into(),
            ));
        }
        let used: u64 = st
            .list
            .iter()
            .filter_map(|t| t.bits.as_ref())
            .map(DirtyBitmap::memory)
            .sum();
        let bits = DirtyBitmap::new(self.size(), g, MAX_BITMAP_MEMORY - used)?;
        st.list.push(Tracked {
            entry: BitmapEntry {
                table_offset: 0,
                table_size: 0,
                flags: 0,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: g,
                name: name.to_string(),
                extra_data_size: 0,
            },
            bits: Some(bits),
            enabled,
            data_clusters: Vec::new(),
        });
        st.phase = Phase::Active;
        Ok(())
    }

    /// Removes the persistent bitmap `name` from the image at once (inconsistent ones too),
    /// freeing its clusters, as QEMU's `block-dirty-bitmap-remove` does.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.guard(self.remove_bitmap_impl(name))
    }

    fn remove_bitmap_impl(&self, name: &str) -> Result<()> {
        let _ops = self.bitmap_ops();
        let (entries, frees) = {
            let st = self.bitmap_state();
            if st.phase == Phase::Closed {
                return Err(closed());
            }
            let i = st
                .list
                .iter()
                .position(|t| t.entry.name == name)
                .ok_or_else(|| not_found(name))?;
            let t = &st.list[i];
            if t.entry.table_offset == 0 {
                (None, Vec::new())
            } else {
                let mut frees = if t.bits.is_some() {
                    t.data_clusters.clone()
                } else {
                    // Inconsistent: its table was not read at open.
                    self.data_clusters_of(&t.entry)?
                };
                frees.extend(self.table_clusters(&t.entry));
                let entries: Vec<BitmapEntry> = st
                    .list
                    .iter()
                    .enumerate()
                    .filter(|&(k, t)| k != i && t.entry.table_offset != 0)
                    .map(|(_, t)| t.entry.clone())
                    .collect();
                (Some(entries), frees)
            }
        };
        // The state lock is not held here: committing waits for writes in flight, which take it.
        if let Some(entries) = entries {
            self.commit_directory(&entries, frees)?;
        }
        self.bitmap_state().list.retain(|t| t.entry.name != name);
        Ok(())
    }

    /// The host clusters of the table of `e`.
    fn table_clusters(&self, e: &BitmapEntry) -> Vec<u64> {
        let cs = self.geo.cluster_size;
        let end = e.table_offset + u64::from(e.table_size) * 8;
        (e.table_offset..end).step_by(cs as usize).collect()
    }

    /// The data clusters the table of `e` names (entries that are not valid are skipped:
    /// leaked rather than freed).
    fn data_clusters_of(&self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size;
        let raw = self
            .storage
            .read_vec(e.table_offset, e.table_size as usize * 8)
            .map_err(|err| Error::io("reading bitmap table", err))?;
        Ok(raw
            .chunks_exact(8)
            .filter_map(|c| match TableEntry::decode(be_u64(c, 0), cs) {
                Some(TableEntry::Data(h)) => Some(h),
                _ => None,
            })
            .collect())
    }

    /// Clears every bit of the bitmap `name`.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.with_bitmap(name, |t| {
            if let Some(b) = &mut t.bits {
                b.clear();
            }
            Ok(())
        })
    }

    /// Enables or disables the tracking of writes by the bitmap `name`.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.with_bitmap(name, |t| {
            t.enabled = enabled;
            Ok(())
        })
    }

    /// Marks dirty in the bitmap `name` every range `source` has dirty.
    pub fn merge_into_bitmap(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.with_bitmap(name, |t| match &mut t.bits {
            Some(b) => b.merge(source),
            None => Err(inconsistent(name)),
        })
    }
}
