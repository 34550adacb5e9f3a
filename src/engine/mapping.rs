//! Guest offset → host extent.
//!
//! [`Qcow2Image::map`] answers "what backs the guest range starting here" with the longest run
//! of one kind it can prove from the L1/L2 tables: data runs grow while host offsets stay
//! contiguous (so one I/O serves many clusters), zero and unallocated runs grow across clusters,
//! whole unallocated L1 entries and subclusters. A compressed cluster is always its own run.

use super::meta::Meta;
use super::shared::Shared;
use super::Qcow2Image;
use crate::error::{Corruption, Error, Result};
use crate::format::entry::OFFSET_MASK;
use crate::format::entry::{
    classify, ClusterKind, CompressedDescriptor, SubclusterBitmap, SubclusterState,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What backs a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Data at this host offset (in the data file, if the image has one).
    Data { host: u64 },
    /// Reads as zeros; host offset of a preallocated cluster if any.
    Zero { host: Option<u64> },
    /// Falls through to the backing device.
    Unallocated,
    /// Part of a compressed cluster, starting `in_cluster` bytes into it.
    Compressed {
        desc: CompressedDescriptor,
        in_cluster: u64,
    },
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) mapped: Mapped,
    pub(crate) len: u64,
}

impl Run {
    /// Extends this run by `next` if the two read as one.
    fn absorb(&mut self, next: Run) -> bool {
        let ok = match (self.mapped, next.mapped) {
            (Mapped::Data { host: a }, Mapped::Data { host: b }) => a + self.len == b,
            (Mapped::Zero { host: None }, Mapped::Zero { host: None }) => true,
            (Mapped::Zero { host: Some(a) }, Mapped::Zero { host: Some(b) }) => a + self.len == b,
            (Mapped::Unallocated, Mapped::Unallocated) => true,
            _ => false,
        };
        if ok {
            self.len += next.len;
        }
        ok
    }
}

fn bad_entry(table: &'static str, guest_offset: u64, entry: u64, rule: &'static str) -> Error {
    Corruption::BadEntry {
        table,
        guest_offset,
        entry,
        rule,
    }
    .into()
}

/// Where [`Qcow2Image::map_with`] finds the L1 and L2 tables.
trait Tables {
    /// Why a mapping failed: an [`Error`], or, without the lock, only that it gave up (a
    /// zero-sized value keeps the lock-free path's results small).
    type Fail: From<Error>;
    /// L1 entry `index` (0 past the end of the table).
    fn l1_entry(&self, index: usize) -> std::result::Result<u64, Self::Fail>;
    /// Where L2 tables must end.
    fn file_end(&self) -> u64;
    /// The slice of an L2 table under `key`.
    fn slice(
        &mut self,
        img: &Qcow2Image,
        key: u64,
    ) -> std::result::Result<&[AtomicU64], Self::Fail>;
}

/// The lock-free path gave up: the answer needs the lock (a slice is not cached, a write
/// section overlapped, or the tables are corrupt and the error must be reported).
struct GaveUp;

impl From<Error> for GaveUp {
    #[inline]
    fn from(_: Error) -> Self {
        GaveUp
    }
}

/// The tables with the metadata lock held: a missing slice is read from the image.
struct Locked<'a>(&'a mut Meta);

impl Tables for Locked<'_> {
    type Fail = Error;

    #[inline]
    fn l1_entry(&self, index: usize) -> Result<u64> {
        Ok(self.0.l1.get_or_zero(index))
    }

    #[inline]
    fn file_end(&self) -> u64 {
        self.0.file_end
    }

    #[inline]
    fn slice(&mut self, img: &Qcow2Image, key: u64) -> Result<&[AtomicU64]> {
        let m = &mut *self.0;
        let g = img.geo;
        let slot = match m.l2.touch(key) {
            Some(slot) => slot,
            None => {
                if m.would_evict_dirty(key) {
                    img.flush_locked(m)?;
                }
                m.load_slot(img.storage.as_ref(), &g, key)?
            }
        };
        Ok(m.l2.entries(slot))
    }
}

/// The published tables, without the lock: gives up on a slice that is not cached. The caller
/// validates everything read against the sequence counter (see [`super::shared`]).
struct LockFree<'a>(&'a Shared);

impl Tables for LockFree<'_> {
    type Fail = GaveUp;

    #[inline(always)]
    fn l1_entry(&self, index: usize) -> std::result::Result<u64, GaveUp> {
        self.0.l1_entry(index).ok_or(GaveUp)
    }

    /// No bound: a slice is cached only after its L2 table passed the locked path's check
    /// against `Meta::file_end`, which never decreases; a table that would fail the check has no
    /// cached slice, so the lock-free path gives up on it and the locked path reports it.
    #[inline]
    fn file_end(&self) -> u64 {
        u64::MAX
    }

    #[inline(always)]
    fn slice(&mut self, _img: &Qcow2Image, key: u64) -> std::result::Result<&[AtomicU64], GaveUp> {
        self.0.find_slice(key).ok_or(GaveUp)
    }
}

impl Qcow2Image {
    /// Maps the guest range `offset..offset+max_len` (inside the device, `max_len > 0`) to the
    /// longest leading run of one kind.
    ///
    /// When every slice the answer needs is cached, it is computed from the published tables
    /// without the metadata lock; the answer is then the one a reader holding the lock would
    /// have got at the moment the sequence counter was read (see [`super::shared`]). Otherwise,
    /// or if a write section overlapped, the lock is taken.
    #[inline(always)]
    pub(crate) fn map(&self, offset: u64, max_len: u64) -> Result<Run> {
        match self.map_lock_free(offset, max_len) {
            Some(run) => Ok(run),
            None => self.map_locked(offset, max_len),
        }
    }

    /// [`map`](Self::map) without the lock, if every slice needed is cached and no write section
    /// overlapped. Inlined into the callers so that the run stays in registers (returned through
    /// memory it costs a store-forwarding stall per lookup).
    #[inline(always)]
    fn map_lock_free(&self, offset: u64, max_len: u64) -> Option<Run> {
        let shared = &*self.shared;
        let v = shared.seq.read_begin()?;
        let r = self.map_with(&mut LockFree(shared), offset, max_len);
        match (r, shared.seq.read_validate(v)) {
            (Ok(run), true) => {
                self.fast_hits.bump();
                Some(run)
            }
            _ => None,
        }
    }

    /// [`map`](Self::map) under the lock.
    #[inline(never)]
    fn map_locked(&self, offset: u64, max_len: u64) -> Result<Run> {
        let mut m = self.lock_meta();
        self.map_in(&mut m, offset, max_len)
    }

    /// [`map`](Self::map) with the metadata lock held.
    pub(crate) fn map_in(&self, m: &mut Meta, offset: u64, max_len: u64) -> Result<Run> {
        self.map_with(&mut Locked(m), offset, max_len)
    }

    /// [`map`](Self::map) over `tables`.
    #[inline(always)]
    fn map_with<T: Tables>(
        &self,
        t: &mut T,
        offset: u64,
        max_len: u64,
    ) -> std::result::Result<Run, T::Fail> {
        let g = self.geo;
        let end = offset + max_len;
        let cs = g.cluster_size;
        let l1_shift = g.cluster_bits + g.l2_bits;
        let wpe = g.words_per_entry;
        let mut pos = offset;
        let mut run: Option<Run> = None;

        while pos < end {
            let l1_index = (pos >> l1_shift) as usize;
            // Past the end of the L1 table (only possible for a snapshot view, whose table may
            // be shorter than the current size requires) nothing is allocated.
            let l1_entry = t.l1_entry(l1_index)?;
            let l2_offset = l1_entry & OFFSET_MASK;
            let l1_end = ((l1_index as u64 + 1) << l1_shift).min(end);
            if l2_offset == 0 {
                let piece = Run {
                    mapped: Mapped::Unallocated,
                    len: l1_end - pos,
                };
                match &mut run {
                    None if l1_end == end => return Ok(piece),
                    None => run = Some(piece),
                    Some(r) => {
                        if !r.absorb(piece) {
                            break;
                        }
                    }
                }
                pos = l1_end;
                continue;
            }
            if l2_offset & (cs - 1) != 0 {
                return Err(bad_entry(
                    "L1",
                    pos,
                    l1_entry,
                    "L2 table offset is not cluster-aligned",
                )
                .into());
            }
            if l2_offset.checked_add(cs).is_none_or(|e| e > t.file_end()) {
                return Err(bad_entry(
                    "L1",
                    pos,
                    l1_entry,
                    "L2 table lies past the end of the file",
                )
                .into());
            }

            // One slice of the L2 table at a time, entries walked without further lookups.
            let l2_index = (pos >> g.cluster_bits) & ((1 << g.l2_bits) - 1);
            let slice_index = l2_index >> g.slice_entry_bits;
            let key = l2_offset + slice_index * g.slice_bytes;
            let slice = t.slice(self, key)?;
            let slice_mask = (1u64 << g.slice_entry_bits) - 1;
            let slice_end_guest = {
                let first_in_slice = (pos >> g.cluster_bits) & !slice_mask;
                ((first_in_slice + slice_mask + 1) << g.cluster_bits).min(l1_end)
            };
            let mut stop = false;
            while pos < slice_end_guest {
                let i = ((pos >> g.cluster_bits) & slice_mask) as usize * wpe;
                let entry = slice[i].load(Relaxed);
                let bitmap = if g.extended {
                    slice[i + 1].load(Relaxed)
                } else {
                    0
                };
                let in_cluster = pos & (cs - 1);
                let piece = if entry == 0 && bitmap == 0 {
                    // Unallocated (what `classify_piece` says of an all-zero entry, standard or
                    // extended), and so are the all-zero entries after it: one piece for all,
                    // so a sparse table is walked at the speed of a scan for non-zero words.
                    let mut next = pos - in_cluster + cs;
                    let mut j = i + wpe;
                    while next < slice_end_guest
                        && slice[j..j + wpe].iter().all(|w| w.load(Relaxed) == 0)
                    {
                        next += cs;
                        j += wpe;
                    }
                    Run {
                        mapped: Mapped::Unallocated,
                        len: next.min(slice_end_guest) - pos,
                    }
                } else {
                    let cluster_end = (pos - in_cluster + cs).min(end);
                    self.classify_piece(pos, in_cluster, cluster_end, entry, bitmap)?
                };
                let compressed = matches!(piece.mapped, Mapped::Compressed { .. });
                match &mut run {
                    // The common case of a request inside one cluster: no run to build.
                    None if pos + piece.len == end || compressed => return Ok(piece),
                    None => run = Some(piece),
                    Some(r) => {
                        if !r.absorb(piece) {
                            stop = true;
                            break;
                        }
                    }
                }
                pos += piece.len;
                if compressed {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
        }
        run.ok_or_else(|| Error::InvalidArgument("map of an empty range".into()).into())
    }

    /// The leading run of one cluster's entry from `pos` (at most to `cluster_end`). Always
    /// inlined: a run returned through memory costs a store-forwarding stall per lookup.
    #[inline(always)]
    fn classify_piece(
        &self,
        pos: u64,
        in_cluster: u64,
        cluster_end: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<Run> {
        let g = self.geo;
        let cs = g.cluster_size;
        let whole = cluster_end - pos;
        let kind = classify(entry, g.cluster_bits, g.extended, g.data_file);
        let run = match kind {
            ClusterKind::Compressed(desc) => Run {
                mapped: Mapped::Compressed { desc, in_cluster },
                len: whole,
            },
            ClusterKind::Zero { host } => {
                if host & (cs - 1) != 0 {
                    return Err(bad_entry(
                        "L2",
                        pos,
                        entry,
                        "cluster offset is not cluster-aligned",
                    ));
                }
                let host = (host != 0).then_some(host + in_cluster);
                Run {
                    mapped: Mapped::Zero { host },
                    len: whole,
                }
            }
            ClusterKind::Normal { host } => {
                if host & (cs - 1) != 0 {
                    return Err(bad_entry(
                        "L2",
                        pos,
                        entry,
                        "cluster offset is not cluster-aligned",
                    ));
                }
                if !g.extended {
                    Run {
                        mapped: Mapped::Data {
                            host: host + in_cluster,
                        },
                        len: whole,
                    }
                } else {
                    if (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
                        return Err(bad_entry(
                            "L2",
                            pos,
                            bitmap,
                            "subcluster is both allocated and zero",
                        ));
                    }
                    let (state, len) = self.subcluster_run(bitmap, in_cluster, whole);
                    let mapped = match state {
                        SubclusterState::Allocated => Mapped::Data {
                            host: host + in_cluster,
                        },
                        SubclusterState::Zero => Mapped::Zero {
                            host: Some(host + in_cluster),
                        },
                        _ => Mapped::Unallocated,
                    };
                    Run { mapped, len }
                }
            }
            ClusterKind::Unallocated => {
                if !g.extended {
                    Run {
                        mapped: Mapped::Unallocated,
                        len: whole,
                    }
                } else {
                    if bitmap & 0xffff_ffff != 0 {
                        return Err(bad_entry(
                            "L2",
                            pos,
                            bitmap,
                            "unallocated cluster has allocated subclusters",
                        ));
                    }
                    let (state, len) = self.subcluster_run(bitmap, in_cluster, whole);
                    let mapped = match state {
                        SubclusterState::Zero => Mapped::Zero { host: None },
                        _ => Mapped::Unallocated,
                    };
                    Run { mapped, len }
                }
            }
        };
        Ok(run)
    }

    /// State of the subcluster at `in_cluster` and the bytes (≤ `max`) sharing that state.
    #[inline]
    fn subcluster_run(&self, bitmap: u64, in_cluster: u64, max: u64) -> (SubclusterState, u64) {
        let sb = self.geo.subcluster_bits;
        let sc = (in_cluster >> sb) as u32;
        let bm = SubclusterBitmap(bitmap);
        let n = bm.run_len(sc);
        let run_end = u64::from(sc + n) << sb;
        (bm.state(sc), (run_end - in_cluster).min(max))
    }
}
