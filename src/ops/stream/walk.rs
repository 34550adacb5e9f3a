//! The area after the L1 table of a streamed image, piece by piece in host order: each L2 table
//! directly followed by the data clusters it maps.
//!
//! Every pass of the writer (sizing, the L1 table, the refcounts, the L2 tables, the data)
//! replays the same walk from the plan, so they agree on every offset without holding a map of
//! the area. Offsets are relative to the start of the area, which is cluster-aligned.
//!
//! Invariants: an L2 table lies on a cluster boundary before every cluster it maps, and after
//! every cluster of the tables before it; with compression, the data of a table is padded to
//! the next cluster boundary before the next table. A reader front to back therefore holds at
//! most one L2 table's references ahead of their data.

use super::chunks::ZeroMap;
use super::spool::{Placed, Placements};
use super::writer::{Fill, Run};
use crate::error::{Error, Result};
use crate::format::entry::{encode_normal, CompressedDescriptor};

/// One piece of the area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Piece {
    /// The L2 table of L1 index `l1_index`, a whole cluster at `at`.
    Table { l1_index: u64, at: u64 },
    /// Guest cluster `guest` and where its data went ([`Placed::Zero`]: nowhere).
    Cluster { guest: u64, placed: Placed },
}

/// Where the data clusters go.
pub(super) enum Stored<'a> {
    /// One for one, but for those of zeros (by rank among the plan's data clusters).
    Plain {
        zeros: &'a ZeroMap,
        rank: u64,
        pos: u64,
    },
    /// As the compressed spool packs them.
    Packed(Placements<'a>),
}

/// A replay of the area from the plan's runs.
pub(super) struct Walk<'a> {
    runs: &'a [Run],
    /// The run of `next`.
    r: usize,
    /// The next guest cluster of the plan.
    next: u64,
    l2_entries: u64,
    cs: u64,
    /// The L1 index of the last table placed.
    table: Option<u64>,
    stored: Stored<'a>,
}

impl<'a> Walk<'a> {
    /// A walk over `runs` (sorted, disjoint, none empty) in clusters of `cs` bytes, with
    /// `l2_entries` entries per L2 table.
    pub(super) fn new(runs: &'a [Run], cs: u64, l2_entries: u64, stored: Stored<'a>) -> Self {
        Walk {
            runs,
            r: 0,
            next: runs.first().map_or(0, |r| r.start),
            l2_entries,
            cs,
            table: None,
            stored,
        }
    }

    /// The next piece, `None` after the last.
    pub(super) fn next_piece(&mut self) -> Result<Option<Piece>> {
        let Some(&run) = self.runs.get(self.r) else {
            return Ok(None);
        };
        let guest = self.next;
        let l1_index = guest / self.l2_entries;
        if self.table != Some(l1_index) {
            self.table = Some(l1_index);
            let at = match &mut self.stored {
                Stored::Plain { pos, .. } => {
                    *pos += self.cs;
                    *pos - self.cs
                }
                Stored::Packed(p) => p.table(),
            };
            return Ok(Some(Piece::Table { l1_index, at }));
        }
        self.next += 1;
        if self.next >= run.end {
            self.r += 1;
            if let Some(n) = self.runs.get(self.r) {
                self.next = n.start;
            }
        }
        let placed = match (run.fill, &mut self.stored) {
            (Fill::Zero, _) => Placed::Zero,
            (Fill::Data, Stored::Plain { zeros, rank, pos }) => {
                *rank += 1;
                if zeros.is_zero(*rank - 1) {
                    Placed::Zero
                } else {
                    *pos += self.cs;
                    Placed::Raw(*pos - self.cs)
                }
            }
            (Fill::Data, Stored::Packed(p)) => p
                .next_placed()?
                .ok_or_else(|| Error::InvalidArgument("spool index ended early".into()))?,
        };
        Ok(Some(Piece::Cluster { guest, placed }))
    }

    /// Bytes of the area placed so far (after the last piece, the area's size before its
    /// padding to a whole cluster).
    pub(super) fn end(&self) -> u64 {
        match &self.stored {
            Stored::Plain { pos, .. } => *pos,
            Stored::Packed(p) => p.end(),
        }
    }

    /// Replays the whole walk and returns the area's size in clusters.
    pub(super) fn clusters(mut self) -> Result<u64> {
        while self.next_piece()?.is_some() {}
        Ok(self.end().div_ceil(self.cs))
    }

    /// The refcount of every host cluster of the area, in order, to `emit`.
    pub(super) fn refcounts(mut self, mut emit: impl FnMut(u64) -> Result<()>) -> Result<()> {
        let cs = self.cs;
        let (mut cur, mut count) = (0u64, 0u64);
        while let Some(p) = self.next_piece()? {
            let (first, last) = match p {
                Piece::Table { at, .. }
                | Piece::Cluster {
                    placed: Placed::Raw(at),
                    ..
                } => (at / cs, at / cs),
                Piece::Cluster {
                    placed: Placed::Compressed(at, len),
                    ..
                } => (at / cs, (at + len - 1) / cs),
                Piece::Cluster {
                    placed: Placed::Zero,
                    ..
                } => continue,
            };
            for c in first..=last {
                while cur < c {
                    emit(count)?;
                    (cur, count) = (cur + 1, 0);
                }
                count += 1;
            }
        }
        let end = self.end().div_ceil(cs);
        while cur < end {
            emit(count)?;
            (cur, count) = (cur + 1, 0);
        }
        Ok(())
    }
}

/// The L2 entry (and extended-L2 bitmap) of a placement in an area starting at host offset
/// `start`; `zero` is what a cluster stored nowhere gets.
pub(super) fn entry_of(
    p: Placed,
    start: u64,
    cluster_bits: u32,
    zero: (u64, u64),
) -> Result<(u64, u64)> {
    /// Subcluster bitmap of an extended L2 entry: every subcluster allocated.
    const ALL_ALLOCATED: u64 = 0xffff_ffff;
    Ok(match p {
        Placed::Zero => zero,
        Placed::Raw(o) => (encode_normal(start + o, true), ALL_ALLOCATED),
        Placed::Compressed(o, len) => (
            CompressedDescriptor::for_bytes(start + o, len)
                .encode(cluster_bits)
                .ok_or_else(|| {
                    Error::Unsupported(
                        "compressed cluster lies beyond what an L2 entry can address".into(),
                    )
                })?,
            0,
        ),
    })
}
