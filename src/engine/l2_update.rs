//! Changing L2 entries under the metadata lock: finding a guest cluster's entry, making its L2
//! table writable (allocated or copied, never one shared with a snapshot, every L1 change
//! checked against the metadata map), setting entries, and queueing the clusters they stop
//! naming to be freed after the next flush (write-ordering rule 3).

use super::meta::Meta;
use super::overlap::Structure;
use super::Qcow2Image;
use crate::error::{Corruption, Error, Result};
use crate::format::entry::{classify, ClusterKind, COPIED, OFFSET_MASK};
use std::sync::atomic::Ordering::{self, Relaxed};

impl Qcow2Image {
    /// The L2 entry (and bitmap) of the cluster holding `guest`.
    pub(crate) fn entry_at(&self, m: &mut Meta, guest: u64) -> Result<(u64, u64)> {
        let g = self.geo;
        let l1_index = (guest >> (g.cluster_bits + g.l2_bits)) as usize;
        let l2_offset = m.l1.get_or_zero(l1_index) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((0, 0));
        }
        if l2_offset % g.cluster_size != 0 || l2_offset + g.cluster_size > m.file_end {
            return Err(Corruption::BadEntry {
                table: "L1",
                guest_offset: guest,
                entry: m.l1.get_or_zero(l1_index),
                rule: "L2 table offset is misaligned or past the end of the file",
            }
            .into());
        }
        let l2_index = (guest >> g.cluster_bits) & ((1 << g.l2_bits) - 1);
        let key = Meta::slice_key(&g, l2_offset, l2_index);
        if m.would_evict_dirty(key) {
            self.flush_locked(m)?;
        }
        let slice = m.load_slice(self.storage.as_ref(), &g, key)?;
        let i = (l2_index & ((1 << g.slice_entry_bits) - 1)) as usize * g.words_per_entry;
        let word = |j: usize| slice[j].load(Relaxed);
        Ok((word(i), if g.extended { word(i + 1) } else { 0 }))
    }

    /// Sets the L2 entry of the cluster holding `guest`; its L2 table must be writable.
    pub(crate) fn set_entry(
        &self,
        m: &mut Meta,
        guest: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let g = self.geo;
        let l1_index = (guest >> (g.cluster_bits + g.l2_bits)) as usize;
        let l1e = m.l1.get_or_zero(l1_index);
        if l1e & COPIED == 0 || l1e & OFFSET_MASK == 0 {
            return Err(Error::InvalidArgument("L2 table is not writable".into()));
        }
        let l2_index = (guest >> g.cluster_bits) & ((1 << g.l2_bits) - 1);
        let l2_offset = l1e & OFFSET_MASK;
        // The entry is written back into the table's cluster: it must hold nothing else.
        m.refs()?
            .map
            .refuse(l2_offset, g.cluster_size, &[Structure::ActiveL2])?;
        let key = Meta::slice_key(&g, l2_offset, l2_index);
        if m.would_evict_dirty(key) {
            self.flush_locked(m)?;
        }
        m.load_slice(self.storage.as_ref(), &g, key)?;
        let i = (l2_index & ((1 << g.slice_entry_bits) - 1)) as usize * g.words_per_entry;
        let words = [entry, bitmap];
        if !m.l2.store(key, i, &words[..g.words_per_entry]) {
            return Err(Error::InvalidArgument("L2 slice vanished".into()));
        }
        Ok(())
    }

    /// Makes the L2 table of L1 entry `l1_index` private to the active image: allocates an
    /// empty one, or copies one shared with a snapshot (whose reference is then dropped).
    pub(crate) fn ensure_l2_writable(&self, m: &mut Meta, l1_index: usize) -> Result<u64> {
        let cs = self.geo.cluster_size;
        let e =
            m.l1.get(l1_index)
                .ok_or_else(|| Error::InvalidArgument("guest offset beyond the L1 table".into()))?;
        let old = e & OFFSET_MASK;
        if old != 0 && e & COPIED != 0 {
            return Ok(old);
        }
        Self::refuse_l1_entry_write(m, l1_index)?;
        let s = self.storage.as_ref();
        let new = {
            let Meta { refs, file_end, .. } = &mut *m;
            refs.as_mut()
                .ok_or(Error::ReadOnly)?
                .alloc_named(s, 1, file_end, Some("L2 table"))?
        };
        let mut content = vec![0u8; cs as usize];
        if old != 0 {
            // Copy through the cache: a shared table is never modified, so its slices on disk
            // are current, but read via the cache anyway.
            let sb = self.geo.slice_bytes;
            for j in 0..cs / sb {
                let key = old + j * sb;
                let words: Vec<u64> = match m.l2.peek(key) {
                    Some(w) => w.iter().map(|a| a.load(Relaxed)).collect(),
                    None => {
                        let mut b = vec![0u8; sb as usize];
                        s.read_at(&mut b, key)
                            .map_err(|e| Error::io("reading L2 table", e))?;
                        b.chunks_exact(8)
                            .map(|c| crate::format::be_u64(c, 0))
                            .collect()
                    }
                };
                for (i, w) in words.iter().enumerate() {
                    let at = (j * sb) as usize + i * 8;
                    content[at..at + 8].copy_from_slice(&w.to_be_bytes());
                }
            }
            m.l2.forget_range(old, old + cs);
            m.pending_free.push(old);
        }
        // The new table is complete on disk before any L1 entry can point to it.
        s.write_at(&content, new)
            .map_err(|e| Error::io("writing new L2 table", e))?;
        self.note_file_growth(m, new + cs);
        m.l2.forget_range(new, new + cs);
        m.l1.set(l1_index, new | COPIED);
        m.l1_dirty.insert(l1_index);
        let map = &mut m.refs()?.map;
        map.remove_active_l2(old);
        map.add_active_l2(new);
        Ok(new)
    }

    /// Refuses to change L1 entry `l1_index` when the bytes that hold it also hold another
    /// structure (an L1 named as its own L2 table, say): the entry is written back there.
    pub(crate) fn refuse_l1_entry_write(m: &mut Meta, l1_index: usize) -> Result<()> {
        let at = (l1_index as u64)
            .checked_mul(8)
            .and_then(|o| o.checked_add(m.header.l1_table_offset))
            .ok_or_else(|| Error::InvalidArgument("L1 index out of range".into()))?;
        m.refs()?.map.refuse(at, 8, &[Structure::ActiveL1])
    }

    pub(crate) fn note_file_growth(&self, m: &mut Meta, end: u64) {
        m.file_len = m.file_len.max(end);
        self.file_len.fetch_max(end, Ordering::Relaxed);
    }

    /// Queues the release of whatever host clusters `entry` holds.
    pub(crate) fn queue_free(&self, m: &mut Meta, entry: u64) {
        if self.geo.data_file {
            return; // Data clusters in an external data file are not refcounted.
        }
        let cs = self.geo.cluster_size;
        match classify(entry, self.geo.cluster_bits, self.geo.extended, false) {
            // An unaligned offset is leaked (see `check_release`).
            ClusterKind::Normal { host } | ClusterKind::Zero { host }
                if host != 0 && host % cs == 0 =>
            {
                m.pending_free.push(host)
            }
            ClusterKind::Compressed(d) => {
                let (first, last) = self.compressed_release_span(d);
                let mut c = first;
                while c <= last {
                    m.pending_free.push(c);
                    c += cs;
                }
            }
            _ => {}
        }
    }
}
