//! Test doubles for crash-safety testing (feature `testing`): storages that inject I/O errors
//! and that simulate power loss.
//!
//! - [`FailingStorage`] wraps any [`Storage`](super::Storage), counts its mutating operations by
//!   kind and fails a chosen one (the Nth write, flush, `set_len` or `punch_hole`) with `EIO` or
//!   `ENOSPC`, once or from then on. Run a workload once with no fault to learn the totals
//!   ([`FailingStorage::counts`]), then once per index.
//! - [`CrashStorage`] is an in-memory storage that keeps what a disk with a volatile write cache
//!   would: the state as of the last completed flush, plus the writes, truncations and hole
//!   punches made since. At a chosen [`CrashPoint`] it freezes (every later mutation and flush
//!   fails) and produces post-crash images: the flushed state plus any subset of the unflushed
//!   operations, each whole, torn at a 512-byte boundary, or reduced to any subset of its
//!   512-byte sectors ([`CrashStorage::crash_image`], [`CrashStorage::choice_sets`]). Storages made with
//!   [`CrashStorage::sibling`] share one power supply (operation indices and the crash) but
//!   flush separately, like two files on one machine: an image and its external data file.
//!
//! They live in the library (not in `tests/`) so that the fuzz targets in `fuzz/`, which call
//! into [`crate::fuzzing`], and users testing their own crash handling can use them too.

mod crash;
mod failing;

pub use crash::{Choice, CrashPoint, CrashStorage, PendingOp};
pub use failing::{FailingStorage, Fault, FaultError};

use std::io;

/// The kinds of operation a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`Storage::write_at`](super::Storage::write_at).
    Write,
    /// [`Storage::flush`](super::Storage::flush).
    Flush,
    /// [`Storage::set_len`](super::Storage::set_len).
    SetLen,
    /// [`Storage::punch_hole`](super::Storage::punch_hole).
    PunchHole,
}

impl OpKind {
    /// Every kind, in a fixed order.
    pub const ALL: [OpKind; 4] = [
        OpKind::Write,
        OpKind::Flush,
        OpKind::SetLen,
        OpKind::PunchHole,
    ];
}

/// How many operations of each mutating kind a storage has seen (attempts, failed ones
/// included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// `write_at` calls.
    pub writes: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// `set_len` calls.
    pub set_lens: u64,
    /// `punch_hole` calls.
    pub punch_holes: u64,
}

impl OpCounts {
    /// The count of one kind.
    pub fn get(&self, kind: OpKind) -> u64 {
        match kind {
            OpKind::Write => self.writes,
            OpKind::Flush => self.flushes,
            OpKind::SetLen => self.set_lens,
            OpKind::PunchHole => self.punch_holes,
        }
    }

    /// Write-type operations (writes, `set_len`s and hole punches), the ones a
    /// [`CrashPoint::Write`] counts.
    pub fn mutations(&self) -> u64 {
        self.writes + self.set_lens + self.punch_holes
    }

    /// Counts one more operation of `kind` and returns its index (from 0) among its kind.
    pub(crate) fn bump(&mut self, kind: OpKind) -> u64 {
        let c = match kind {
            OpKind::Write => &mut self.writes,
            OpKind::Flush => &mut self.flushes,
            OpKind::SetLen => &mut self.set_lens,
            OpKind::PunchHole => &mut self.punch_holes,
        };
        *c += 1;
        *c - 1
    }
}

/// A small deterministic pseudo-random generator (SplitMix64): seeded choices here, and the
/// workloads and data of the tests and benches. The seed is the public state, so
/// `SplitMix(seed)` builds one.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A value in `lo..=hi` (`lo <= hi < u64::MAX`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Fills `buf` with random bytes (each 64-bit draw big-endian).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_be_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// `len` random bytes, as [`fill`](Self::fill) makes them.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// The error a crashed storage returns for everything it refuses.
fn crashed() -> io::Error {
    io::Error::other("storage crashed (simulated power loss)")
}
