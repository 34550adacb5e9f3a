//! The refcounts as a check reads them: the refcount table's in-file part with a small cache of
//! blocks (which a repair changes in memory until written back), and what a lookup and the COPIED
//! check of one L2 table find. Plain data: the reading and checking are `refcounts`'.

use super::report::Finding;

/// What the COPIED check of one L2 table finds, replayed for every active L1 entry naming it.
#[derive(Default)]
pub(super) struct CopiedSummary {
    pub(super) corruptions: u64,
    pub(super) findings: Vec<Finding>,
}

/// Stored refcounts, read block by block with a small cache.
pub(super) struct RefcountReader {
    /// The in-file part of the refcount table (entries past the end of the file are zero).
    pub(super) table: Vec<u64>,
    /// log2 of entries per refcount block.
    pub(super) block_bits: u32,
    pub(super) cache: Vec<CachedBlock>,
}

/// A refcount block read by the check; a repair changes it in memory until written back.
pub(super) struct CachedBlock {
    pub(super) offset: u64,
    pub(super) data: Vec<u8>,
    pub(super) dirty: bool,
}

pub(super) enum Lookup {
    Value(u64),
    Unaligned { offset: u64, index: u64 },
}
