//! Guest offset → host extent.
//!
//! [`Qcow2Image::map`] answers "what backs the guest range starting here" with the longest run
//! of one kind it can prove from the L1/L2 tables: data runs grow while host offsets stay
//! contiguous (so one I/O serves many clusters), zero and unallocated runs grow across clusters,
//! whole unallocated L1 entries and subclusters. A compressed cluster is always its own run.

use super::meta::Meta;
use super::Qcow2Image;
use crate::error::{Corruption, Error, Result};
use crate::format::entry::OFFSET_MASK;
use crate::format::entry::{
    classify, ClusterKind, CompressedDescriptor, SubclusterBitmap, SubclusterState,
};

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

impl Qcow2Image {
    /// Maps the guest range `offset..offset+max_len` (inside the device, `max_len > 0`) to the
    /// longest leading run of one kind.
    pub(crate) fn map(&self, offset: u64, max_len: u64) -> Result<Run> {
        let mut m = self.lock_meta();
        self.map_in(&mut m, offset, max_len)
    }

    /// [`map`](Self::map) with the metadata lock held.
    pub(crate) fn map_in(&self, m: &mut Meta, offset: u64, max_len: u64) -> Result<Run> {
        let g = self.geo;
        let end = offset + max_len;
        let cs = g.cluster_size;
        let l1_shift = g.cluster_bits + g.l2_bits;
        let mut pos = offset;
        let mut run: Option<Run> = None;

        while pos < end {
            let l1_index = (pos >> l1_shift) as usize;
            // Past the end of the L1 table (only possible for a snapshot view, whose table may
            // be shorter than the current size requires) nothing is allocated.
            let l1_entry = m.l1.get(l1_index).copied().unwrap_or(0);
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
                ));
            }
            if l2_offset.checked_add(cs).is_none_or(|e| e > m.file_end) {
                return Err(bad_entry(
                    "L1",
                    pos,
                    l1_entry,
                    "L2 table lies past the end of the file",
                ));
            }

            // One slice of the L2 table at a time, entries walked without further lookups.
            let l2_index = (pos >> g.cluster_bits) & ((1 << g.l2_bits) - 1);
            let slice_index = l2_index >> g.slice_entry_bits;
            let key = l2_offset + slice_index * g.slice_bytes;
            let slot = match m.l2.touch(key) {
                Some(slot) => slot,
                None => {
                    if m.would_evict_dirty(key) {
                        self.flush_locked(m)?;
                    }
                    m.load_slot(self.storage.as_ref(), &g, key)?
                }
            };
            let slice = m.l2.entries(slot);
            let slice_mask = (1u64 << g.slice_entry_bits) - 1;
            let slice_end_guest = {
                let first_in_slice = (pos >> g.cluster_bits) & !slice_mask;
                ((first_in_slice + slice_mask + 1) << g.cluster_bits).min(l1_end)
            };
            let mut stop = false;
            while pos < slice_end_guest {
                let i = ((pos >> g.cluster_bits) & slice_mask) as usize * g.words_per_entry;
                let entry = slice[i];
                let bitmap = if g.extended { slice[i + 1] } else { 0 };
                let in_cluster = pos & (cs - 1);
                let cluster_end = (pos - in_cluster + cs).min(end);
                let piece = self.classify_piece(pos, in_cluster, cluster_end, entry, bitmap)?;
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
        run.ok_or_else(|| Error::InvalidArgument("map of an empty range".into()))
    }

    /// The leading run of one cluster's entry from `pos` (at most to `cluster_end`).
    #[inline]
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
