//! The data clusters of a streamed image's plan, read in guest order ahead of their consumer,
//! and the map of those that hold only zeros.

use super::writer::{Fill, Run};
use crate::device::BlockDevice;
use crate::error::Result;
use crate::ops::convert::is_zero;

/// Largest piece of guest data read at once.
const DATA_CHUNK: u64 = 1 << 20;

/// Chunks read ahead of the consumer.
const READ_AHEAD: usize = 4;

/// Hands the data clusters of `runs` (clusters of `cs` bytes of a disk of `size` bytes) to
/// `f` in ascending order, in chunks of whole clusters (`f(guest offset, bytes)`; past the end
/// of the disk, zeros). A reader thread fills chunks ahead of `f`, so reading the source
/// overlaps what `f` does with them.
pub(super) fn for_each_chunk(
    src: &dyn BlockDevice,
    runs: &[Run],
    cs: u64,
    size: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let chunk = DATA_CHUNK.max(cs);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(READ_AHEAD);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let end_of_disk = size.min(src.size());
    std::thread::scope(|s| {
        s.spawn(move || {
            for run in runs.iter().filter(|r| r.fill == Fill::Data) {
                let mut p = run.start * cs;
                let end = run.end * cs;
                while p < end {
                    let n = chunk.min(end - p);
                    let mut buf = empty_rx.try_recv().unwrap_or_default();
                    buf.clear();
                    buf.resize(n as usize, 0);
                    let readable = n.min(end_of_disk.saturating_sub(p));
                    let r = if readable > 0 {
                        src.read_at(&mut buf[..readable as usize], p)
                            .map(|()| (p, buf))
                    } else {
                        Ok((p, buf))
                    };
                    let failed = r.is_err();
                    // The consumer gone (it failed) or this read failed: stop.
                    if full_tx.send(r).is_err() || failed {
                        return;
                    }
                    p += n;
                }
            }
        });
        for r in full_rx {
            let (off, buf) = r?;
            f(off, &buf)?;
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

/// Which data clusters of a plan hold only zeros, by their rank among the plan's data
/// clusters (one bit each).
#[derive(Debug, Default)]
pub(super) struct ZeroMap {
    bits: Vec<u64>,
}

impl ZeroMap {
    /// Reads the data clusters of `runs` once and notes those of zeros.
    pub(super) fn scan(src: &dyn BlockDevice, runs: &[Run], cs: u64, size: u64) -> Result<Self> {
        let mut map = ZeroMap::default();
        let mut rank = 0u64;
        for_each_chunk(src, runs, cs, size, |_, buf| {
            for cluster in buf.chunks(cs as usize) {
                if rank % 64 == 0 {
                    map.bits.push(0);
                }
                if is_zero(cluster) {
                    if let Some(w) = map.bits.last_mut() {
                        *w |= 1 << (rank % 64);
                    }
                }
                rank += 1;
            }
            Ok(())
        })?;
        Ok(map)
    }

    /// Whether the data cluster of rank `rank` holds only zeros.
    pub(super) fn is_zero(&self, rank: u64) -> bool {
        self.bits
            .get((rank / 64) as usize)
            .is_some_and(|w| w >> (rank % 64) & 1 != 0)
    }
}
