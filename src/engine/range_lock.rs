//! Guest range locks: a request holds the clusters it allocates, zeroes or frees, so that two
//! requests never change the same guest cluster at once; a read that keeps racing frees takes
//! one too.

use super::Qcow2Image;
use crate::device::{check_range, BlockDevice};
use crate::error::{Error, Result};

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

    /// Locks the whole guest range (no write, zeroing or discard runs concurrently).
    pub(crate) fn lock_everything(&self) -> Result<RangeGuard<'_>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.ensure_open()?;
        Ok(self.lock_range(0, u64::MAX))
    }
}
