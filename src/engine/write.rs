//! The copy-on-write write path: writes, zero writes and discards.
//!
//! A write runs cluster run by cluster run. Under the metadata lock it decides, for the run at
//! the current position, between an in-place write (a normal cluster whose refcount is one, as
//! its COPIED flag says) and an allocation (anything else: unallocated, zero, compressed, or
//! shared with a snapshot — rule 6: a cluster with refcount > 1 is never written). For an
//! allocation it makes the L2 table writable, reserves contiguous host clusters, and releases the
//! lock; it then writes the data, filling a partial cluster's head and tail from the image's
//! current content (its backing file, zeros, the decompressed or shared old cluster); only then,
//! under the lock again, it publishes the new L2 entries (rule 1: data before the entry that
//! points to it) and queues the old clusters' references to be dropped after the next flush
//! makes the new entries durable (rule 3). Refcount increases are written before any L2 entry by
//! [`flush`](super::flush) (rule 2).
//!
//! With extended L2 entries, writes into a cluster that is unallocated or already owned are done
//! at subcluster granularity: only the touched subclusters are written (a partial subcluster's
//! head and tail from the current content) and their allocation bits set.

use super::meta::Meta;
use super::overlap::Structure;
use super::Qcow2Image;
use crate::device::{check_range, BlockDevice};
use crate::error::{Corruption, Error, Result};
use crate::format::entry::{
    classify, ClusterKind, SubclusterBitmap, SubclusterState, COPIED, OFFSET_MASK, ZERO,
};
use crate::io::blkdebug::DebugEvent;
use std::sync::atomic::Ordering::{self, Relaxed};

/// What `zero_impl` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// The range must read as zeros afterwards.
    WriteZeroes,
    /// Whole clusters (subclusters) in the range read as zeros afterwards and free their space;
    /// partial clusters at the edges are left as they are.
    Discard,
    /// Whole clusters in the range become unallocated (they read from the backing file again)
    /// and free their space; partial clusters at the edges are left as they are.
    Deallocate,
    /// As [`ZeroMode::WriteZeroes`], and an unallocated cluster is never left unallocated, even
    /// without a backing file (the image is about to get one: rebase).
    Explicit,
    /// As [`ZeroMode::Explicit`], and a whole cluster this image alone owns keeps its host
    /// cluster (the zero flag on the entry, or zero subclusters): QEMU's zero write without
    /// `BDRV_REQ_MAY_UNMAP` (`qemu-io write -z` without `-u`).
    Keep,
}

impl ZeroMode {
    /// Whether the range must read as zeros afterwards (partial clusters included).
    fn zeroes(self) -> bool {
        matches!(
            self,
            ZeroMode::WriteZeroes | ZeroMode::Explicit | ZeroMode::Keep
        )
    }
}

/// Bitmap with every subcluster reading as zeros.
pub(crate) const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Most clusters one allocation covers.
const MAX_RUN_CLUSTERS: u64 = 1024;

/// Host clusters reserved for the rest of an extended-L2 write's allocating run: as QEMU does,
/// the clusters of a run that all need a new host cluster get one contiguous allocation, which
/// the run's clusters then take in guest order.
#[derive(Default)]
struct RunPool {
    next: u64,
    left: u64,
}

/// Releases a guest range lock on drop.
pub(crate) struct RangeGuard<'a> {
    img: &'a Qcow2Image,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut v = self.img.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = v.iter().position(|r| *r == self.range) {
            v.swap_remove(i);
        }
        self.img.inflight_done.notify_all();
    }
}

/// What to do with the run at the current position.
enum Plan {
    /// Write `len` bytes at `host` (standard L2, refcount one).
    InPlace { host: u64, len: usize },
    /// Write the clusters `guest..guest + n × cs` to new host clusters at `host`. With
    /// `zeros`, the clusters read as zeros now and so does their current guest content: only
    /// the written bytes need writing (see [`Qcow2Image::zeros_beyond_end`]).
    Allocate {
        guest: u64,
        host: u64,
        n: u64,
        olds: Vec<u64>,
        fresh: bool,
        zeros: bool,
    },
    /// Extended L2: write the touched subclusters of the cluster at `guest` at `host`; `bitmap` is
    /// the entry's bitmap before the write; `old` the entry of a cluster shared with a snapshot,
    /// whose reference is dropped (its allocated subclusters, and those between, are copied).
    Subclusters {
        guest: u64,
        host: u64,
        bitmap: u64,
        old: Option<u64>,
        fresh: bool,
    },
}

impl Qcow2Image {
    pub(crate) fn lock_range(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut v = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while v.iter().any(|&(s, e)| s < end && start < e) {
            v = self
                .inflight_done
                .wait(v)
                .unwrap_or_else(|e| e.into_inner());
        }
        v.push((start, end));
        RangeGuard {
            img: self,
            range: (start, end),
        }
    }

    pub(crate) fn begin_write(&self, offset: u64, len: u64) -> Result<RangeGuard<'_>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        let cs = self.geo.cluster_size;
        let g = self.lock_range_tracked(
            offset & !(cs - 1),
            (offset + len).next_multiple_of(cs),
            offset,
            len,
        )?;
        let mut m = self.lock_meta();
        if m.closed {
            return Err(Error::Closed);
        }
        if m.broken {
            return Err(m.broken_error());
        }
        self.mark_dirty_if_lazy(&mut m)?;
        Ok(g)
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.begin_write(offset, buf.len() as u64)?;
        self.write_locked(buf, offset)
    }

    /// Writes `buf` at guest `offset` with the range lock held; for an encrypted image the
    /// write is first widened to whole sectors (the range lock covers whole clusters, so the
    /// widened sectors are locked too).
    pub(crate) fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let widened = self.sector_aligned_write(buf, offset)?;
        let (buf, offset) = match &widened {
            Some((wide, start)) => (&wide[..], *start),
            None => (buf, offset),
        };
        let mut done = 0usize;
        let mut pool = RunPool::default();
        while done < buf.len() {
            match self.write_run(&buf[done..], offset + done as u64, &mut pool) {
                Ok(n) => done += n,
                Err(e) => {
                    if pool.left > 0 {
                        self.unreserve(pool.next, pool.left);
                    }
                    return Err(e);
                }
            }
        }
        if pool.left > 0 {
            self.unreserve(pool.next, pool.left);
        }
        Ok(())
    }

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

    /// Reserves `n` host clusters for guest clusters starting at `guest`: contiguous new clusters
    /// in the image, or, with an external data file, the guest offsets themselves.
    pub(crate) fn reserve(&self, m: &mut Meta, guest: u64, n: u64) -> Result<u64> {
        if self.geo.data_file {
            return Ok(guest);
        }
        let s = self.storage.as_ref();
        let Meta { refs, file_end, .. } = m;
        refs.as_mut().ok_or(Error::ReadOnly)?.alloc(s, n, file_end)
    }

    /// The host cluster for the extended-L2 cluster at `c0`, which needs a new one: the next of
    /// `pool`, or the first of a new contiguous reservation covering every cluster from `c0`
    /// to the write's end (`end`, within the L2 table) that needs a new host cluster too.
    fn reserve_in_run(&self, m: &mut Meta, c0: u64, end: u64, pool: &mut RunPool) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size;
        if pool.left > 0 {
            let host = pool.next;
            pool.next += cs;
            pool.left -= 1;
            return Ok(host);
        }
        let l1_index = c0 >> (g.cluster_bits + g.l2_bits);
        let table_end = ((l1_index + 1) << (g.cluster_bits + g.l2_bits)).min(self.size());
        let end = end.min(table_end);
        let mut n = 1;
        let mut c = c0 + cs;
        while c < end && n < MAX_RUN_CLUSTERS {
            let (e, _) = self.entry_at(m, c)?;
            let in_place = e & COPIED != 0
                && matches!(
                    classify(e, g.cluster_bits, true, g.data_file),
                    ClusterKind::Normal { .. }
                );
            if in_place {
                break;
            }
            n += 1;
            c += cs;
        }
        let host = self.reserve(m, c0, n)?;
        pool.next = host + cs;
        pool.left = n - 1;
        Ok(host)
    }

    /// Gives back clusters reserved by [`reserve`](Self::reserve) that were never published.
    pub(crate) fn unreserve(&self, host: u64, n: u64) {
        if self.geo.data_file {
            return;
        }
        let mut m = self.lock_meta();
        let s = self.storage.as_ref();
        for i in 0..n {
            if let Some(r) = m.refs.as_mut() {
                let _ = r.add(s, host + i * self.geo.cluster_size, -1);
            }
        }
    }

    fn plan(&self, m: &mut Meta, pos: u64, len: u64, pool: &mut RunPool) -> Result<Plan> {
        let g = self.geo;
        let cs = g.cluster_size;
        let c0 = pos & !(cs - 1);
        let (entry, bitmap) = self.entry_at(m, c0)?;
        let kind = classify(entry, g.cluster_bits, g.extended, g.data_file);
        let owned = |e: u64| e & COPIED != 0;
        let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;

        if g.extended {
            self.check_bitmap(m, c0, entry, bitmap)?;
            return match kind {
                ClusterKind::Normal { host } if owned(entry) => {
                    self.check_aligned(m, c0, host)?;
                    self.check_overlap(m, host, cs)?;
                    self.count_if_free(m, host, "write", entry)?;
                    Ok(Plan::Subclusters {
                        guest: c0,
                        host,
                        bitmap,
                        old: None,
                        fresh: false,
                    })
                }
                ClusterKind::Unallocated | ClusterKind::Normal { .. } => {
                    // A new cluster for the written subclusters. A cluster shared with a
                    // snapshot (as QEMU) passes on every allocated subcluster too (the span
                    // between them copied as well); the others keep their state.
                    let shared = matches!(kind, ClusterKind::Normal { .. });
                    if shared {
                        self.check_replace(m, c0, entry)?;
                    }
                    self.ensure_l2_writable(m, l1_index)?;
                    let host = self.reserve_in_run(m, c0, pos + len, pool)?;
                    Ok(Plan::Subclusters {
                        guest: c0,
                        host,
                        bitmap,
                        old: shared.then_some(entry),
                        fresh: true,
                    })
                }
                _ => {
                    // Compressed: the whole cluster is copied.
                    self.check_replace(m, c0, entry)?;
                    self.ensure_l2_writable(m, l1_index)?;
                    let host = self.reserve_in_run(m, c0, pos + len, pool)?;
                    Ok(Plan::Allocate {
                        guest: c0,
                        host,
                        n: 1,
                        olds: vec![entry],
                        fresh: true,
                        zeros: false,
                    })
                }
            };
        }

        if let ClusterKind::Normal { host } = kind {
            if owned(entry) {
                self.check_aligned(m, c0, host)?;
                // Extend over following owned clusters that are contiguous on the host.
                let end = pos + len;
                let mut run_end = (c0 + cs).min(end);
                while run_end < end {
                    let (e, _) = self.entry_at(m, run_end)?;
                    let k = classify(e, g.cluster_bits, false, g.data_file);
                    let expect = host + (run_end - c0);
                    match k {
                        ClusterKind::Normal { host: h } if owned(e) && h == expect => {
                            run_end = (run_end + cs).min(end);
                        }
                        _ => break,
                    }
                }
                self.check_overlap(m, host, run_end - c0)?;
                let mut c = host;
                while c < host + (run_end - c0) {
                    self.count_if_free(m, c, "write", entry)?;
                    c += cs;
                }
                return Ok(Plan::InPlace {
                    host: host + (pos - c0),
                    len: (run_end - pos) as usize,
                });
            }
        }

        // Allocation: the clusters from c0 that need one, within this L2 table.
        let table_end = ((l1_index as u64 + 1) << (g.cluster_bits + g.l2_bits)).min(self.size());
        let write_end = (pos + len).min(table_end);
        let mut olds = vec![entry];
        let mut c = c0 + cs;
        while c < write_end && (olds.len() as u64) < MAX_RUN_CLUSTERS {
            let (e, _) = self.entry_at(m, c)?;
            if matches!(
                classify(e, g.cluster_bits, false, g.data_file),
                ClusterKind::Normal { .. }
            ) && owned(e)
            {
                break;
            }
            olds.push(e);
            c += cs;
        }
        for (i, &e) in olds.iter().enumerate() {
            self.check_replace(m, c0 + i as u64 * cs, e)?;
        }
        self.ensure_l2_writable(m, l1_index)?;
        let n = olds.len() as u64;
        let end_before = m.file_end;
        let host = self.reserve(m, c0, n)?;
        let zeros = self.zeros_beyond_end(&olds, host, end_before);
        Ok(Plan::Allocate {
            guest: c0,
            host,
            n,
            olds,
            fresh: true,
            zeros,
        })
    }

    /// Whether new clusters at `host` and the guest content they replace (`olds`) all read as
    /// zeros, so an allocating write need not copy or write the untouched head and tail of the
    /// clusters (as QEMU avoids it): true when the clusters lie at or past `end_before`, the
    /// allocation high-water mark before they were reserved (every cluster ever allocated or in
    /// the file lies below it, so nothing has written these: they read as zeros, past the end of
    /// the file or in a hole), and every old entry reads as zeros (unallocated without a
    /// backing device, or the zero flag). Not with an external data file, whose offsets are the
    /// guest's.
    fn zeros_beyond_end(&self, olds: &[u64], host: u64, end_before: u64) -> bool {
        let g = self.geo;
        // Encrypted zeros are not zeros on the host.
        !g.data_file
            && !self.is_encrypted()
            && host >= end_before
            && olds
                .iter()
                .all(|&e| match classify(e, g.cluster_bits, g.extended, false) {
                    ClusterKind::Zero { .. } => !g.extended,
                    ClusterKind::Unallocated => self.backing.is_none(),
                    _ => false,
                })
    }

    /// Fills `buf` (guest bytes at `guest`) with the image's current content, clipped to the
    /// device (bytes past the end read as zeros). The caller holds the range lock over `guest`,
    /// so the clusters mapped cannot be freed during the read (see `read_at`), and taking the
    /// range lock again would deadlock: the read goes straight to the mapping loop.
    pub(crate) fn read_current(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let size = self.size();
        let n = size.saturating_sub(guest).min(buf.len() as u64) as usize;
        check_range(guest, n as u64, size)?;
        self.read_unchecked(&mut buf[..n], guest)?;
        buf[n..].fill(0);
        Ok(())
    }

    pub(crate) fn data_target(&self) -> &dyn crate::io::Storage {
        match &self.data_storage {
            Some(d) if self.geo.data_file => d.as_ref(),
            _ => self.storage.as_ref(),
        }
    }

    /// Writes the run at `pos`; returns the bytes of `data` consumed.
    fn write_run(&self, data: &[u8], pos: u64, pool: &mut RunPool) -> Result<usize> {
        let g = self.geo;
        let cs = g.cluster_size;
        let plan = {
            let mut m = self.lock_meta();
            self.plan(&mut m, pos, data.len() as u64, pool)?
        };
        let target = self.data_target();
        let wio = |e| Error::io("writing guest data", e);
        match plan {
            Plan::InPlace { host, len } => {
                target.debug_event(DebugEvent::WriteAio);
                self.write_data(target, &data[..len], host, pos)?;
                Ok(len)
            }
            Plan::Allocate {
                guest,
                host,
                n,
                olds,
                fresh,
                zeros,
            } => {
                let region_end = guest + n * cs;
                let wend = (pos + data.len() as u64).min(region_end);
                let used = (wend - pos) as usize;
                let r = (|| -> Result<()> {
                    if pos == guest && wend == region_end {
                        target.debug_event(DebugEvent::WriteAio);
                        self.write_data(target, &data[..used], host, guest)?;
                    } else if zeros {
                        target.debug_event(DebugEvent::WriteAio);
                        // Head and tail already read as zeros: write the data only, then the
                        // clusters' last bytes so the file covers them (a write never shrinks
                        // the file, unlike a racing `set_len`).
                        let head = pos - guest;
                        target.write_at(&data[..used], host + head).map_err(wio)?;
                        let host_end = host + n * cs;
                        let data_end = host + head + used as u64;
                        if data_end < host_end {
                            let k = (host_end - data_end).min(512);
                            target
                                .write_at(&[0u8; 512][..k as usize], host_end - k)
                                .map_err(wio)?;
                        }
                    } else {
                        // Head and tail come from the current content (copy-on-write).
                        let mut buf = vec![0u8; (n * cs) as usize];
                        let head = (pos - guest) as usize;
                        self.storage.debug_event(DebugEvent::CowRead);
                        if head > 0 {
                            self.read_current(&mut buf[..head], guest)?;
                        }
                        buf[head..head + used].copy_from_slice(&data[..used]);
                        let tail = head + used;
                        if tail < buf.len() {
                            self.read_current(&mut buf[tail..], guest + tail as u64)?;
                        }
                        target.debug_event(DebugEvent::CowWrite);
                        self.write_data(target, &buf, host, guest)?;
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    if fresh {
                        self.unreserve(host, n);
                    }
                    return Err(e);
                }
                let mut m = self.lock_meta();
                self.note_file_growth(&mut m, host + n * cs);
                let bitmap = if g.extended { 0xffff_ffff } else { 0 };
                for (i, old) in olds.iter().enumerate() {
                    let gi = guest + i as u64 * cs;
                    self.set_entry(&mut m, gi, (host + i as u64 * cs) | COPIED, bitmap)?;
                    self.queue_free(&mut m, *old);
                }
                Ok(used)
            }
            Plan::Subclusters {
                guest,
                host,
                bitmap,
                old,
                fresh,
            } => {
                let sb = g.subcluster_bits;
                let ss = 1u64 << sb;
                let wend = (pos + data.len() as u64).min(guest + cs);
                let used = (wend - pos) as usize;
                let mut a = (pos - guest) & !(ss - 1);
                let mut b = (wend - guest).next_multiple_of(ss);
                let allocated = bitmap as u32;
                if old.is_some() && allocated != 0 {
                    a = a.min(u64::from(allocated.trailing_zeros()) << sb);
                    b = b.max(u64::from(32 - allocated.leading_zeros()) << sb);
                }
                let r = (|| -> Result<()> {
                    let mut buf = vec![0u8; (b - a) as usize];
                    let head = (pos - guest - a) as usize;
                    let tail = head + used;
                    let cow = head > 0 || tail < buf.len();
                    if cow {
                        self.storage.debug_event(DebugEvent::CowRead);
                    }
                    if head > 0 {
                        self.read_current(&mut buf[..head], guest + a)?;
                    }
                    buf[head..tail].copy_from_slice(&data[..used]);
                    if tail < buf.len() {
                        self.read_current(&mut buf[tail..], guest + a + tail as u64)?;
                    }
                    target.debug_event(if cow {
                        DebugEvent::CowWrite
                    } else {
                        DebugEvent::WriteAio
                    });
                    self.write_data(target, &buf, host + a, guest + a)
                })();
                if let Err(e) = r {
                    if fresh {
                        self.unreserve(host, 1);
                    }
                    return Err(e);
                }
                let mut bm = SubclusterBitmap(bitmap);
                for sc in (a >> sb) as u32..(b >> sb) as u32 {
                    bm.set(sc, SubclusterState::Allocated);
                }
                if bm.0 != bitmap || fresh {
                    let mut m = self.lock_meta();
                    self.note_file_growth(&mut m, host + cs);
                    self.set_entry(&mut m, guest, host | COPIED, bm.0)?;
                    if let Some(o) = old {
                        self.queue_free(&mut m, o);
                    }
                }
                Ok(used)
            }
        }
    }

    /// Zero writes and discards.
    pub(crate) fn zero_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let _g = self.begin_write(offset, len)?;
        self.zero_body(offset, len, mode)
    }

    /// [`zero_impl`](Self::zero_impl) with the range lock held.
    pub(crate) fn zero_body(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let size = self.size();
        let end = offset + len;
        let (v3, has_backing) = {
            let m = self.lock_meta();
            (
                m.header.version >= 3,
                self.backing.is_some()
                    || self.area().backing_name.is_some()
                    || matches!(mode, ZeroMode::Explicit | ZeroMode::Keep),
            )
        };
        if g.extended && mode.zeroes() {
            return self.zero_extended(offset, end, mode);
        }
        let zeros = vec![0u8; cs as usize];
        let mut pos = offset;
        while pos < end {
            let c0 = pos & !(cs - 1);
            let piece_end = end.min(c0 + cs);
            // A request that reaches the end of the device covers its short last cluster.
            let whole = pos == c0 && (piece_end == c0 + cs || piece_end == size);
            if g.extended {
                // As in QEMU, a discard drops whole clusters only, even with subclusters.
                if whole {
                    self.discard_extended_cluster(c0, mode)?;
                }
            } else if whole && (v3 || !has_backing || mode == ZeroMode::Deallocate) {
                let mut m = self.lock_meta();
                let (entry, _) = self.entry_at(&mut m, c0)?;
                let kind = classify(entry, g.cluster_bits, false, g.data_file);
                let deallocate = mode == ZeroMode::Deallocate;
                let keep = mode == ZeroMode::Keep
                    && v3
                    && matches!(kind, ClusterKind::Normal { .. })
                    && entry & COPIED != 0;
                let new = if v3 && !deallocate { ZERO } else { 0 };
                let untouched = match kind {
                    ClusterKind::Zero { host: 0 } => !deallocate,
                    ClusterKind::Zero { .. } => mode == ZeroMode::Keep,
                    ClusterKind::Unallocated => !has_backing || deallocate,
                    _ => false,
                };
                if keep {
                    let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
                    self.ensure_l2_writable(&mut m, l1_index)?;
                    self.set_entry(&mut m, c0, entry | ZERO, 0)?;
                    drop(m);
                    self.zero_raw_data_file(c0, piece_end - c0)?;
                } else if !untouched {
                    let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
                    self.check_release(&mut m, entry)?;
                    self.ensure_l2_writable(&mut m, l1_index)?;
                    self.set_entry(&mut m, c0, new, 0)?;
                    self.queue_free(&mut m, entry);
                    drop(m);
                    self.zero_raw_data_file(c0, piece_end - c0)?;
                }
            } else if mode.zeroes() {
                self.write_locked(&zeros[..(piece_end - pos) as usize], pos)?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Extended L2, discarding modes: the whole cluster at `c0` is dropped, its subclusters
    /// reading as zeros ([`ZeroMode::Discard`]) or from the backing file
    /// ([`ZeroMode::Deallocate`]).
    fn discard_extended_cluster(&self, c0: u64, mode: ZeroMode) -> Result<()> {
        let bits = if mode == ZeroMode::Deallocate {
            0
        } else {
            ALL_ZERO
        };
        let mut m = self.lock_meta();
        let (entry, bitmap) = self.entry_at(&mut m, c0)?;
        let g = self.geo;
        // As QEMU's discard: a cluster that reads from nowhere is left as it is (its zero
        // subclusters stay zero, the others read zeros anyway).
        let unallocated = entry & OFFSET_MASK == 0
            && !matches!(
                classify(entry, g.cluster_bits, true, g.data_file),
                ClusterKind::Compressed(_)
            );
        let has_backing = self.backing.is_some() || self.area().backing_name.is_some();
        if (entry == 0 && bitmap == bits)
            || (mode == ZeroMode::Discard && unallocated && !has_backing)
        {
            return Ok(());
        }
        let l1_index = (c0 >> (g.cluster_bits + g.l2_bits)) as usize;
        self.check_release(&mut m, entry)?;
        self.ensure_l2_writable(&mut m, l1_index)?;
        self.set_entry(&mut m, c0, 0, bits)?;
        self.queue_free(&mut m, entry);
        Ok(())
    }

    /// With a raw external data file, the data file itself must read as the guest does.
    fn zero_raw_data_file(&self, offset: u64, len: u64) -> Result<()> {
        let raw = {
            let m = self.lock_meta();
            m.header
                .autoclear
                .contains(crate::format::features::AutoclearFeatures::DATA_FILE_RAW)
        };
        if self.geo.data_file && raw {
            self.data_target()
                .punch_hole(offset, len)
                .map_err(|e| Error::io("zeroing data file", e))?;
        }
        Ok(())
    }

    /// Locks the whole guest range (no write, zeroing or discard runs concurrently).
    pub(crate) fn lock_everything(&self) -> Result<RangeGuard<'_>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.ensure_open()?;
        Ok(self.lock_range(0, u64::MAX))
    }

    /// Allocates every cluster of the device (preallocation=metadata/falloc/full): L2 tables
    /// and data clusters, contiguous per L2 table; with `write_zeros` the data is written.
    pub(crate) fn preallocate(&self, write_zeros: bool) -> Result<()> {
        let _g = self.lock_everything()?;
        let r = self
            .preallocate_range(0, self.size(), write_zeros)
            .and_then(|()| self.flush_impl());
        self.guard(r)
    }

    /// [`preallocate`](Self::preallocate) of the clusters covering `start..end`, with the range
    /// lock held. With extended L2 entries the subclusters stay unallocated (as in QEMU), so a
    /// backing file still shows through.
    pub(crate) fn preallocate_range(&self, start: u64, end: u64, write_zeros: bool) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size;
        let per_table = 1u64 << (g.cluster_bits + g.l2_bits);
        let mut guest = start & !(cs - 1);
        while guest < end {
            let mut m = self.lock_meta();
            self.mark_dirty_if_lazy(&mut m)?;
            let l1_index = (guest / per_table) as usize;
            self.ensure_l2_writable(&mut m, l1_index)?;
            let table_end = ((l1_index as u64 + 1) * per_table).min(end);
            let n = (table_end - guest).div_ceil(cs);
            let host = self.reserve(&mut m, guest, n)?;
            for i in 0..n {
                let gi = guest + i * cs;
                let (old, _) = self.entry_at(&mut m, gi)?;
                self.check_replace(&mut m, gi, old)?;
                self.set_entry(&mut m, gi, (host + i * cs) | COPIED, 0)?;
                self.queue_free(&mut m, old);
            }
            self.note_file_growth(&mut m, host + n * cs);
            drop(m);
            let target = self.data_target();
            if write_zeros {
                let zeros = vec![0u8; (cs * 64).min(n * cs) as usize];
                let mut p = 0;
                while p < n * cs {
                    let k = (n * cs - p).min(zeros.len() as u64) as usize;
                    self.write_data(target, &zeros[..k], host + p, guest + p)?;
                    p += k as u64;
                }
            } else if target.len().map_err(|e| Error::io("preallocating", e))? < host + n * cs {
                target
                    .set_len(host + n * cs)
                    .map_err(|e| Error::io("preallocating", e))?;
            }
            guest = table_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::device::BlockDevice;
    use crate::engine::{Qcow2Image, Qcow2Options};
    use crate::error::{Corruption, Error};
    use crate::format::features::IncompatibleFeatures;
    use crate::io::{MemoryStorage, Storage};
    use crate::ops::create::{create_qcow2_on, CreateOptions};
    use std::sync::Arc;

    #[test]
    fn a_closed_image_takes_no_more_writes() {
        let mem = Arc::new(MemoryStorage::new());
        let img =
            create_qcow2_on(mem.clone(), None, 1 << 20, &CreateOptions::default()).expect("create");
        img.write_at(&[7u8; 4096], 0).expect("write");
        img.close().expect("close");
        let closed = |r: crate::Result<()>| matches!(r, Err(Error::Closed));
        assert!(closed(img.write_at(&[1u8; 512], 0)), "write after close");
        assert!(closed(img.write_zeroes(0, 512)), "zero write after close");
        assert!(closed(img.discard(0, 65536)), "discard after close");
        assert!(closed(img.flush()), "flush after close");
        img.close().expect("closing again");
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 0).expect("read after close");
        assert_eq!(b, [7u8; 4096]);
    }

    /// An image with one written cluster: (storage, L1 offset, offset of the first L2 table).
    fn one_cluster_image() -> (Arc<MemoryStorage>, u64, u64) {
        let mem = Arc::new(MemoryStorage::new());
        let img = create_qcow2_on(mem.clone(), None, 1 << 20, &CreateOptions::default()).unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        let l1 = img.header().l1_table_offset;
        drop(img);
        let mut e = [0u8; 8];
        mem.read_at(&mut e, l1).unwrap();
        (mem, l1, u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00)
    }

    /// A write at guest offset 0 is refused as corrupt, and so is any write after it; on
    /// reopening, the image carries the corrupt bit.
    fn assert_write_refused_and_marked_corrupt(mem: Arc<MemoryStorage>) {
        let opts = Qcow2Options {
            ..Default::default()
        };
        let img = Qcow2Image::open_writable(mem.clone(), &opts).unwrap();
        let r = img.write_at(&[2u8; 512], 0);
        assert!(
            matches!(r, Err(Error::Corrupt(Corruption::Inconsistent(_)))),
            "{r:?}"
        );
        assert!(
            img.write_at(&[2u8; 512], 8192).is_err(),
            "further writes refused"
        );
        drop(img);
        let img = Qcow2Image::open(mem, &Qcow2Options::default()).unwrap();
        assert!(img
            .header()
            .incompatible
            .contains(IncompatibleFeatures::CORRUPT));
    }

    /// An L2 entry pointing into the L1 table: the write is refused, the image marked corrupt,
    /// and the L1 table is untouched.
    #[test]
    fn data_write_into_metadata_marks_corrupt() {
        let (mem, l1, l2) = one_cluster_image();
        mem.write_at(&((1u64 << 63) | l1).to_be_bytes(), l2)
            .unwrap();
        let before = mem.to_bytes();
        assert_write_refused_and_marked_corrupt(mem.clone());
        let after = mem.to_bytes();
        let table = l1 as usize..l1 as usize + 512;
        assert_eq!(after[table.clone()], before[table]);
    }

    /// A misaligned data cluster offset: the write is refused and the image marked corrupt.
    #[test]
    fn misaligned_cluster_offset_marks_corrupt() {
        let (mem, _, l2) = one_cluster_image();
        let mut e = [0u8; 8];
        mem.read_at(&mut e, l2).unwrap();
        let bad = u64::from_be_bytes(e) + 512;
        mem.write_at(&bad.to_be_bytes(), l2).unwrap();
        assert_write_refused_and_marked_corrupt(mem);
    }
}
