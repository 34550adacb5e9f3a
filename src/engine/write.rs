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

use super::allocate::{RunPool, MAX_RUN_CLUSTERS};
use super::meta::Meta;
use super::Qcow2Image;
use crate::device::{check_range, BlockDevice};
use crate::error::{Error, Result};
use crate::format::entry::{classify, ClusterKind, SubclusterBitmap, SubclusterState, COPIED};
use crate::io::blkdebug::DebugEvent;

/// Bitmap with every subcluster reading as zeros.
pub(crate) const ALL_ZERO: u64 = 0xffff_ffff << 32;

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
