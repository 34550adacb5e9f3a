//! Replacing the internal snapshot table (QEMU's `qcow2_write_snapshots`), as a repair does
//! once it has dropped or completed entries.
//!
//! Write ordering (docs/design.md §3): the new table is written into free clusters and flushed, then
//! counted and the counts flushed, before the header names it; the header (count and offset in
//! one 12-byte write) is flushed before the old table's clusters are freed (not punched: a
//! repair leaves freed space in place, as elsewhere).
//! A crash at any point leaves either the old table or the new one in use, and at worst leaks
//! the other.

use super::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::format::snapshot::{encode_table, Snapshot};
use crate::format::MAX_SNAPSHOT_TABLE_BYTES;
use crate::io::Storage;

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Writes `snapshots` as the snapshot table of the image on `storage`, whose header is `header`
/// (its refcount fields must be the ones on disk), then frees the clusters of `old`, the old
/// table's offset and length, if its refcounts count it. Entries without a recorded disk size
/// get the image's current size, as QEMU's do. Returns the new table's offset (0 when there are
/// no snapshots left).
///
/// `avoid` is a byte range that metadata references without its refcounts saying so (regions
/// past the end of the file, which may include the old table): the new table is never placed
/// there, where QEMU's overlap check would refuse the write.
pub(crate) fn write_snapshot_table(
    storage: &dyn Storage,
    header: &Header,
    snapshots: &[Snapshot],
    old: Option<(u64, u64)>,
    avoid: Option<(u64, u64)>,
) -> Result<u64> {
    let table = encode_table(snapshots, header.size);
    if table.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(Error::Unsupported(
            "the snapshot table would exceed 64 MiB".into(),
        ));
    }
    let count = u32::try_from(snapshots.len())
        .map_err(|_| Error::InvalidArgument("too many snapshots".into()))?;
    let cb = header.cluster_bits;
    let cs = header.cluster_size();
    let mut refs = Refcounts::load(storage, header)?;
    let mut file_end = storage
        .len()
        .map_err(io_err("reading image size"))?
        .next_multiple_of(cs);

    let offset = if table.is_empty() {
        0
    } else {
        let clusters = (table.len() as u64).div_ceil(cs);
        let mut at = refs.alloc(storage, clusters, &mut file_end)?;
        if let Some((start, end)) = avoid.filter(|&(s, e)| at < e && s < at + clusters * cs) {
            // Give the clusters back (only counted in memory so far) and allocate past the
            // range, if that stays within reason.
            for c in 0..clusters {
                refs.add(storage, at + c * cs, -1)?;
            }
            let limit = file_end
                .saturating_mul(2)
                .max(file_end.saturating_add(1 << 30));
            if end > limit {
                return Err(Error::Unsupported(format!(
                    "no room for the snapshot table: metadata references {start:#x}..{end:#x}, \
                     past the end of the file"
                )));
            }
            refs.cursor = end.div_ceil(cs);
            at = refs.alloc(storage, clusters, &mut file_end)?;
        }
        // The table goes to disk before its clusters are counted: nothing references them
        // yet, and a count must never reach the disk for a cluster past the end of the file
        // (a check cannot see it there, so a crash would leave a leak no repair frees).
        storage
            .write_at(&table, at)
            .map_err(io_err("writing snapshot table"))?;
        storage.flush().map_err(io_err("flushing snapshot table"))?;
        refs.write_blocks(storage)?;
        storage
            .flush()
            .map_err(io_err("flushing snapshot table refcounts"))?;
        if refs.write_table_entries(storage)? {
            storage.flush().map_err(io_err("flushing refcount table"))?;
        }
        at
    };

    let mut pointer = [0u8; 12];
    pointer[..4].copy_from_slice(&count.to_be_bytes());
    pointer[4..].copy_from_slice(&offset.to_be_bytes());
    storage
        .write_at(&pointer, 60)
        .and_then(|()| storage.flush())
        .map_err(io_err("switching snapshot table"))?;

    // The old table is unreferenced now. A cluster whose count is already 0 is left alone, as
    // QEMU's free reports and skips it.
    if let Some((old_offset, old_len)) = old.filter(|&(_, len)| len > 0) {
        let first = old_offset >> cb;
        let last = (old_offset + old_len - 1) >> cb;
        for c in first..=last {
            if refs.get(storage, c)? > 0 {
                refs.add(storage, c << cb, -1)?;
            }
        }
        refs.write_blocks(storage)?;
        storage
            .flush()
            .map_err(io_err("flushing freed snapshot table"))?;
    }
    Ok(offset)
}
