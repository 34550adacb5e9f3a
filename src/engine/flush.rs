//! Writing metadata back in dependency order: the crash-safety contract.
//!
//! [`Qcow2Image::flush_locked`] is the only place dirty metadata reaches the image (apart from
//! refcount blocks trimmed from their cache, which only ever hold increases, and table growth,
//! which follows rule 4 on its own). The order, with a durability barrier (`fdatasync`) between
//! steps that have anything to write:
//!
//! 1. guest data and refcount blocks: every cluster an entry will point to is written and
//!    counted before the entry (rules 1 and 2);
//! 2. refcount table entries for new refcount blocks (the blocks are durable already);
//! 3. dirty L2 slices;
//! 4. dirty L1 entries (new L2 tables are durable already);
//! 5. queued frees: refcounts drop only now that no durable entry references the clusters
//!    (rule 3), and the freed clusters become allocatable only after this step's barrier.
//!
//! With `lazy_refcounts` the image carries the dirty bit while refcounts are stale, so steps 1
//! and 2 write no refcounts (they are written, and the dirty bit cleared, on close).

use super::corrupt::CHex;
use super::meta::Meta;
use super::overlap::Structure;
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::format::bytes::put_u64;
use crate::format::features::{CompatibleFeatures, IncompatibleFeatures};
use std::sync::atomic::Ordering::{self, Relaxed};

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl Qcow2Image {
    /// Flushes every dirty structure in dependency order (see the module docs).
    pub(crate) fn flush_impl(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.lock_meta();
        self.flush_locked(&mut m)
    }

    pub(crate) fn lazy_refcounts(m: &Meta) -> bool {
        m.header
            .compatible
            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }

    /// Flushes with the metadata lock held. A failure marks the image broken: further writes
    /// are refused, as the disk may now lag the memory.
    pub(crate) fn flush_locked(&self, m: &mut Meta) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if m.closed {
            return Err(Error::Closed);
        }
        if m.broken {
            return Err(m.broken_error());
        }
        let r = self.flush_steps(m);
        m.sync_refcount_table();
        if r.is_err() {
            m.broken = true;
        }
        r
    }

    fn flush_steps(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        m.compressed_cursor = 0;
        let lazy = Self::lazy_refcounts(m);
        // 1. Data (also in an external data file) and refcount increases.
        if let Some(d) = &self.data_storage {
            d.flush().map_err(io_err("flushing data file"))?;
        }
        if !lazy {
            m.refs()?.write_blocks(s)?;
        }
        s.flush().map_err(io_err("flushing data and refcounts"))?;
        // 2. Refcount table entries of new blocks.
        if !lazy && m.refs()?.write_table_entries(s)? {
            s.flush().map_err(io_err("flushing refcount table"))?;
        }
        // 3. L2 slices.
        let keys = m.l2.dirty_keys();
        if !keys.is_empty() {
            let mut buf = vec![0u8; self.geo.slice_bytes as usize];
            let sb = self.geo.slice_bytes;
            for key in &keys {
                m.refs()?.map.refuse(*key, sb, &[Structure::ActiveL2])?;
                if let Some(entries) = m.l2.peek(*key) {
                    for (i, e) in entries.iter().enumerate() {
                        put_u64(&mut buf, i * 8, e.load(Relaxed));
                    }
                    s.write_at(&buf, *key).map_err(io_err("writing L2 table"))?;
                }
                m.l2.mark_clean(*key);
            }
            s.flush().map_err(io_err("flushing L2 tables"))?;
        }
        // 4. L1 entries.
        if !m.l1_dirty.is_empty() {
            let l1_offset = m.header.l1_table_offset;
            let dirty = std::mem::take(&mut m.l1_dirty);
            for &i in &dirty {
                let mut b = [0u8; 8];
                put_u64(&mut b, 0, m.l1.get_or_zero(i));
                let at = l1_offset + i as u64 * 8;
                // An L1 whose clusters are also named as an L2 table (or counted as any other
                // structure) is refused, as QEMU's check of each L1 write refuses it.
                let r = m
                    .refs()?
                    .map
                    .refuse(at, 8, &[Structure::ActiveL1])
                    .and_then(|()| s.write_at(&b, at).map_err(io_err("writing L1 table")));
                if let Err(e) = r {
                    m.l1_dirty.extend(dirty.range(i..).copied());
                    return Err(e);
                }
            }
            s.flush().map_err(io_err("flushing L1 table"))?;
        }
        // 5. Queued frees. Counted first, so that a read whose data I/O overlaps the frees (a
        // freed cluster may be reallocated and rewritten at once) sees the count change and
        // reads again (see `read_at`).
        if !m.pending_free.is_empty() {
            self.frees_applied.fetch_add(1, Ordering::SeqCst);
            let frees = std::mem::take(&mut m.pending_free);
            let cs = self.geo.cluster_size;
            let mut zeroed = Vec::new();
            for host in frees {
                let refs = m.refs()?;
                if refs.get(s, host >> self.geo.cluster_bits)? == 0 {
                    // Counted as free already (the refcounts are damaged): leaked instead, as
                    // QEMU's free does.
                    let message = format!(
                        "Cannot free cluster {}: its refcount is already 0",
                        CHex(host)
                    );
                    self.signal_corruption(m, message, false);
                    continue;
                }
                if refs.add(s, host, -1)? == 0 {
                    // A freed L2 table is no longer metadata: the cluster may now hold data.
                    m.l2.forget_range(host, host + cs);
                    // Never punch what a structure still uses.
                    if m.refs()?.map.find(host, cs, &[]).is_none() {
                        zeroed.push(host);
                    }
                }
            }
            if !lazy {
                m.refs()?.write_blocks(s)?;
            }
            s.flush().map_err(io_err("flushing freed refcounts"))?;
            // Freed clusters no longer hold anything: give the space back where the file
            // system can (best effort; the refcount already says they are free).
            for host in zeroed {
                let _ = s.punch_hole(host, cs);
            }
        }
        Ok(())
    }

    /// Sets the dirty bit before the first write of a lazy-refcounts image (rule 5).
    pub(crate) fn mark_dirty_if_lazy(&self, m: &mut Meta) -> Result<()> {
        if !Self::lazy_refcounts(m) || m.header.incompatible.contains(IncompatibleFeatures::DIRTY) {
            return Ok(());
        }
        m.header.incompatible |= IncompatibleFeatures::DIRTY;
        self.write_incompatible(m)
    }

    pub(crate) fn write_incompatible(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        let r = s
            .write_at(&m.header.incompatible.bits().to_be_bytes(), 72)
            .and_then(|()| s.flush())
            .map_err(io_err("writing header feature bits"));
        if r.is_err() {
            m.broken = true;
        }
        r
    }

    /// Writes everything back and, for a lazy-refcounts image, the refcounts too, then clears
    /// the dirty bit. Called on drop; callers that want the error call it themselves.
    ///
    /// After a failed metadata write the image is broken: nothing more is written, and `close`
    /// says so (an `Ok` would claim that writes acknowledged since the last successful flush
    /// are durable). After a successful `close` every write and flush fails with
    /// [`Error::Closed`] (never a silent `Ok`); closing again is a no-op.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_at(&[1; 512], 0)?;
    /// img.close()?;
    /// assert!(matches!(img.write_at(&[1; 512], 0), Err(qcow2kit::Error::Closed)));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn close(&self) -> Result<()> {
        let r = self.settle().map(|()| self.lock_meta().closed = true);
        self.guard(r)
    }

    /// Everything [`close`](Self::close) writes (bitmaps stored, metadata flushed, lazy
    /// refcounts written back and the dirty bit cleared), leaving the image open: a
    /// checkpoint after which the file is a clean image on its own.
    /// Refuses a change to an image that was [`close`](Self::close)d.
    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.lock_meta().closed {
            return Err(Error::Closed);
        }
        Ok(())
    }

    pub(crate) fn checkpoint(&self) -> Result<()> {
        self.guard(self.settle())
    }

    fn settle(&self) -> Result<()> {
        if !self.writable || self.lock_meta().closed {
            return Ok(());
        }
        self.store_bitmaps()?;
        let mut m = self.lock_meta();
        self.flush_locked(&mut m)?;
        if m.header.incompatible.contains(IncompatibleFeatures::DIRTY) {
            let s = self.storage.as_ref();
            let r = (|| {
                m.refs()?.write_blocks(s)?;
                s.flush().map_err(io_err("flushing refcounts"))?;
                if m.refs()?.write_table_entries(s)? {
                    s.flush().map_err(io_err("flushing refcount table"))?;
                }
                Ok::<_, Error>(())
            })();
            if let Err(e) = r {
                m.broken = true;
                return Err(e);
            }
            m.header.incompatible.remove(IncompatibleFeatures::DIRTY);
            self.write_incompatible(&mut m)?;
        }
        Ok(())
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
