//! The part of the metadata that readers see without taking the metadata lock: the active L1
//! table, the words of every cached L2 slice, and an index from slice key to cache slot.
//!
//! # Protocol (a sequence lock made of std atomics)
//!
//! Every value here is an atomic, so a reader can never cause undefined behaviour; what the
//! sequence counter [`Seq`] adds is *consistency*:
//!
//! - **Writers** hold the metadata mutex (so there is one writer at a time) and change the
//!   published state only inside [`Seq::write`]: the counter is made odd, a release fence
//!   follows, the changes are made with relaxed stores, and the counter is made even again with a
//!   release store. No I/O is done inside a write section (a slice read on a miss is read into a
//!   buffer first), so sections last nanoseconds.
//! - **Readers** ([`Seq::read_begin`] / [`Seq::read_validate`]) load the counter (acquire), give
//!   up if it is odd, read what they need with relaxed loads, then issue an acquire fence and load
//!   the counter again. If it is unchanged, no write section overlapped the reads (if a read had
//!   seen any store of a section, the section's release fence would synchronise with the
//!   reader's acquire fence and the second load would see the odd value or later), so the values
//!   read are exactly the state between two sections: the state a reader holding the mutex could
//!   have seen. Otherwise the reader discards everything it computed and takes the mutex.
//! - Under the mutex, relaxed loads see the latest values (the mutex orders critical sections).
//!
//! Why a consistent snapshot is enough: a write completes only after its L2 entry has been
//! stored inside a write section that ended (release) before `write_at` returned; a read that
//! starts after that loads the counter with acquire semantics, so it reads the new entry or a
//! newer one — never a stale mapping. A read overlapping a write sees the state before or after
//! each write section, as a reader under the lock would.
//!
//! A panic inside a write section leaves the counter odd: the lock-free path is then never taken
//! again (every reader falls back to the mutex) and the next write section makes it even again.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use Ordering::{Acquire, Relaxed, Release};

/// The sequence counter of the published state (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Seq(AtomicU64);

impl Seq {
    /// Runs `f` as one write section. The caller holds the metadata lock.
    #[inline]
    pub(crate) fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        // `| 1` keeps the protocol right even after a panic left the counter odd.
        let odd = self.0.load(Relaxed) | 1;
        self.0.store(odd, Relaxed);
        fence(Release);
        let r = f();
        self.0.store(odd + 1, Release);
        r
    }

    /// Starts a lock-free read: the version to validate against, or `None` while a write
    /// section is open.
    #[inline]
    pub(crate) fn read_begin(&self) -> Option<u64> {
        let v = self.0.load(Acquire);
        (v & 1 == 0).then_some(v)
    }

    /// Whether no write section overlapped the reads since [`read_begin`](Self::read_begin)
    /// returned `v`.
    #[inline]
    pub(crate) fn read_validate(&self, v: u64) -> bool {
        fence(Acquire);
        self.0.load(Relaxed) == v
    }
}

/// Rungs of the L1 ladder: rung `k` holds `base << k` entries, so 24 rungs cover any L1 table
/// (at most 4 Mi entries) from any base ≥ 1.
const L1_RUNGS: usize = 24;

/// The active L1 table (or the viewed snapshot's), readable without the lock.
///
/// A table that grows cannot be swapped atomically without `unsafe` or a lock, so the entries
/// live in a ladder of arrays of doubling capacity: growing past the current rung fills the next
/// rung that fits (once), copies the entries, and switches `rung` inside a write section. Old
/// rungs stay allocated, so the memory is at most twice the largest table's.
#[derive(Debug)]
pub(crate) struct L1Mirror {
    base: usize,
    rungs: [OnceLock<Box<[AtomicU64]>>; L1_RUNGS],
    rung: AtomicUsize,
    len: AtomicUsize,
}

impl L1Mirror {
    fn new(entries: &[u64]) -> Self {
        let base = entries.len().max(64);
        let m = L1Mirror {
            base,
            rungs: std::array::from_fn(|_| OnceLock::new()),
            rung: AtomicUsize::new(0),
            len: AtomicUsize::new(entries.len()),
        };
        let t = m.rungs[0].get_or_init(|| zeroed(base));
        for (a, &e) in t.iter().zip(entries) {
            a.store(e, Relaxed);
        }
        m
    }

    /// The current rung's entries (`None` only if a reader raced with growth; it then retries).
    #[inline]
    fn table(&self) -> Option<&[AtomicU64]> {
        self.rungs
            .get(self.rung.load(Relaxed))
            .and_then(|r| r.get())
            .map(|b| &**b)
    }

    /// Entry `i`, 0 past the end.
    #[inline]
    fn get(&self, i: usize) -> Option<u64> {
        if i >= self.len.load(Relaxed) {
            return Some(0);
        }
        Some(self.table()?.get(i)?.load(Relaxed))
    }
}

fn zeroed(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Marks an empty cache slot (writer side).
pub(crate) const NO_KEY: u64 = u64::MAX;

/// Bits of an index bucket that hold the slot number.
const SLOT_BITS: u32 = 17;

/// Most slots the index can name (one value is left out so that [`EMPTY`] is no bucket).
pub(crate) const MAX_SLOTS: usize = (1 << SLOT_BITS) - 1;

/// An empty index bucket.
const EMPTY: u64 = u64::MAX;

/// Slots whose words share one lazily allocated chunk.
const CHUNK_BITS: u32 = 4;

/// An index bucket naming `slot` for `key`: slice keys are host offsets below 2^56 and multiples
/// of 512, so `key >> 9` fits the 47 bits above the slot number, and the bucket names the key
/// exactly. `slot < MAX_SLOTS` keeps every bucket different from [`EMPTY`].
#[inline]
fn bucket(key: u64, slot: u32) -> u64 {
    debug_assert!(key % 512 == 0 && key < 1 << 56 && (slot as usize) < MAX_SLOTS);
    (key >> 9) << SLOT_BITS | u64::from(slot)
}

/// Cache slots' words and the key → slot index, readable without the lock.
///
/// Invariant (kept by writers inside write sections): a bucket `bucket(key, slot)` exists only
/// while slot `slot` holds the slice under `key`. A reader that finds the bucket and validates
/// the sequence counter has therefore read that slice's words.
#[derive(Debug)]
pub(crate) struct SlotTable {
    /// Words of `1 << CHUNK_BITS` slots each, allocated when one of them is first used.
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// CLOCK reference bits, set by lock-free hits; the cache gives such a slot a second chance
    /// before evicting it. Advisory only: not covered by the sequence counter.
    referenced: Box<[AtomicBool]>,
    /// Groups of 4 buckets (`bucket(key, slot)` or [`EMPTY`]).
    index: Box<[AtomicU64]>,
    /// `64 - log2(index.len())`.
    index_shift: u32,
    words_per_slice: usize,
}

impl SlotTable {
    fn new(capacity: usize, words_per_slice: usize) -> Self {
        let capacity = capacity.min(MAX_SLOTS);
        let chunks = capacity.div_ceil(1 << CHUNK_BITS);
        // Four buckets per slot keep groups about one quarter full: almost every slice finds a
        // free bucket in its group.
        let buckets = (capacity * 4).next_power_of_two().max(8);
        SlotTable {
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            referenced: (0..capacity).map(|_| AtomicBool::new(false)).collect(),
            index: (0..buckets).map(|_| AtomicU64::new(EMPTY)).collect(),
            index_shift: 64 - buckets.trailing_zeros(),
            words_per_slice,
        }
    }

    /// The words of slot `i` (allocating its chunk on first use: writer side).
    pub(crate) fn words_init(&self, i: u32) -> &[AtomicU64] {
        let n = self.words_per_slice;
        let chunk = self.chunks[(i >> CHUNK_BITS) as usize].get_or_init(|| zeroed(n << CHUNK_BITS));
        let at = (i as usize & ((1 << CHUNK_BITS) - 1)) * n;
        &chunk[at..at + n]
    }

    /// The words of slot `i` if its chunk exists.
    #[inline]
    fn words(&self, i: u32) -> Option<&[AtomicU64]> {
        let n = self.words_per_slice;
        let chunk = self.chunks.get((i >> CHUNK_BITS) as usize)?.get()?;
        let at = (i as usize & ((1 << CHUNK_BITS) - 1)) * n;
        chunk.get(at..at + n)
    }

    /// The reference bit of slot `i`.
    pub(crate) fn referenced(&self, i: u32) -> Option<&AtomicBool> {
        self.referenced.get(i as usize)
    }

    /// First bucket of the group of `key`.
    #[inline]
    fn group(&self, key: u64) -> &[AtomicU64] {
        let g =
            (((key >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.index_shift) as usize) & !3;
        &self.index[g..g + 4]
    }

    /// The words of the slice under `key` if the index finds it, marking it referenced.
    #[inline(always)]
    fn find(&self, key: u64) -> Option<&[AtomicU64]> {
        let want = key >> 9;
        for b in self.group(key) {
            let v = b.load(Relaxed);
            if v != EMPTY && v >> SLOT_BITS == want {
                let slot = (v & ((1 << SLOT_BITS) - 1)) as u32;
                if let Some(r) = self.referenced(slot) {
                    if !r.load(Relaxed) {
                        r.store(true, Relaxed);
                    }
                }
                return self.words(slot);
            }
        }
        None
    }

    /// Whether the index lists `slot` for `key` (writer side).
    pub(crate) fn indexed(&self, key: u64, slot: u32) -> bool {
        let v = bucket(key, slot);
        self.group(key).iter().any(|b| b.load(Relaxed) == v)
    }

    /// Whether the group of `key` has a free bucket (writer side).
    pub(crate) fn has_room(&self, key: u64) -> bool {
        self.group(key).iter().any(|b| b.load(Relaxed) == EMPTY)
    }

    /// Lists `slot` for `key`, in a free bucket of its group or, with `displace`, over one
    /// taken by another slot (which is then found under the lock only). Inside a write section.
    pub(crate) fn index_insert(&self, key: u64, slot: u32, displace: bool) {
        let group = self.group(key);
        let v = bucket(key, slot);
        if let Some(b) = group.iter().find(|b| b.load(Relaxed) == EMPTY) {
            b.store(v, Relaxed);
        } else if displace {
            group[((key >> 9) & 3) as usize].store(v, Relaxed);
        }
    }

    /// Unlists `slot` for `key`. Inside a write section.
    pub(crate) fn index_remove(&self, key: u64, slot: u32) {
        let v = bucket(key, slot);
        for b in self.group(key) {
            if b.load(Relaxed) == v {
                b.store(EMPTY, Relaxed);
            }
        }
    }
}

/// Everything readers may see without the metadata lock (see the module docs).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) seq: Seq,
    l1: L1Mirror,
    pub(crate) slots: SlotTable,
}

impl Shared {
    /// Published state for an L1 table and an L2 cache of `capacity` slices.
    pub(crate) fn new(l1: &[u64], capacity: usize, words_per_slice: usize) -> Self {
        Shared {
            seq: Seq::default(),
            l1: L1Mirror::new(l1),
            slots: SlotTable::new(capacity, words_per_slice),
        }
    }

    /// L1 entry `i` (0 past the end of the table); `None` if a racing growth hid the table.
    /// Lock-free; validate with the sequence counter.
    #[inline]
    pub(crate) fn l1_entry(&self, i: usize) -> Option<u64> {
        self.l1.get(i)
    }

    /// The cached words under `key` (lock-free; validate with the sequence counter).
    #[inline]
    pub(crate) fn find_slice(&self, key: u64) -> Option<&[AtomicU64]> {
        self.slots.find(key)
    }
}

/// The L1 table as the metadata lock's holder uses it: reads and writes go to the published
/// copy (the only copy), writes inside write sections.
#[derive(Debug)]
pub(crate) struct L1Table {
    shared: std::sync::Arc<Shared>,
}

impl L1Table {
    /// The L1 table published in `shared`.
    pub(crate) fn new(shared: std::sync::Arc<Shared>) -> Self {
        L1Table { shared }
    }

    fn table(&self) -> &[AtomicU64] {
        // The writer side always finds the current rung: it set it under the lock.
        self.shared.l1.table().unwrap_or(&[])
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.shared.l1.len.load(Relaxed)
    }

    /// Entry `i`, if inside the table.
    pub(crate) fn get(&self, i: usize) -> Option<u64> {
        (i < self.len()).then(|| self.table()[i].load(Relaxed))
    }

    /// Entry `i`, 0 past the end.
    pub(crate) fn get_or_zero(&self, i: usize) -> u64 {
        self.get(i).unwrap_or(0)
    }

    /// Sets entry `i` (inside the table).
    pub(crate) fn set(&self, i: usize, entry: u64) {
        assert!(i < self.len(), "L1 index {i} out of range");
        let t = self.table();
        self.shared.seq.write(|| t[i].store(entry, Relaxed));
    }

    /// All entries, in order.
    pub(crate) fn to_vec(&self) -> Vec<u64> {
        self.table()[..self.len()]
            .iter()
            .map(|a| a.load(Relaxed))
            .collect()
    }

    /// Grows the table to `new_len` entries (new entries are 0); never shrinks.
    pub(crate) fn grow(&self, new_len: usize) {
        let m = &self.shared.l1;
        let old_len = self.len();
        if new_len <= old_len {
            return;
        }
        let cur = m.rung.load(Relaxed);
        let fits = |k: usize| m.base.checked_shl(k as u32).is_some_and(|c| c >= new_len);
        let Some(k) = (cur..L1_RUNGS).find(|&k| fits(k)) else {
            // Unreachable for tables within the 32 MiB limit, which callers enforce.
            panic!("L1 table of {new_len} entries exceeds the mirror's capacity");
        };
        let old = self.table();
        let new = m.rungs[k].get_or_init(|| zeroed(m.base << k));
        self.shared.seq.write(|| {
            // Entries past the length are zero in every rung: rungs are filled only up to the
            // length, and the length never shrinks.
            if k != cur {
                for (n, o) in new.iter().zip(&old[..old_len]) {
                    n.store(o.load(Relaxed), Relaxed);
                }
                m.rung.store(k, Relaxed);
            }
            m.len.store(new_len, Relaxed);
        });
    }
}

/// Stripes of [`HitCounter`]; a thread uses one, chosen when it first counts.
const STRIPES: usize = 8;

/// One stripe on its own cache line, so threads counting hits do not share lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// Counts lock-free cache hits without a shared read-modify-write on every hit: each thread adds
/// to its own stripe with a plain load and store. Two threads that share a stripe may lose an
/// increment when they race, so the count is a lower bound (statistics only).
#[derive(Debug, Default)]
pub(crate) struct HitCounter([Stripe; STRIPES]);

thread_local! {
    /// This thread's stripe (`usize::MAX` until it first counts): a const initialiser keeps the
    /// access a plain thread-local load.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Hands out stripes round-robin.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

impl HitCounter {
    /// Adds one hit.
    #[inline]
    pub(crate) fn bump(&self) {
        let i = STRIPE.with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_STRIPE.fetch_add(1, Relaxed) % STRIPES;
                s.set(i);
            }
            i
        });
        let c = &self.0[i % STRIPES].0;
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// Hits counted so far.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn l1_grows_across_rungs_and_keeps_entries() {
        let shared = Arc::new(Shared::new(&[1, 2, 3], 4, 4));
        let l1 = L1Table::new(shared.clone());
        assert_eq!(l1.len(), 3);
        l1.grow(10);
        l1.set(9, 9);
        assert_eq!(l1.to_vec(), vec![1, 2, 3, 0, 0, 0, 0, 0, 0, 9]);
        l1.grow(1000);
        assert_eq!(l1.len(), 1000);
        assert_eq!(shared.l1_entry(2), Some(3));
        assert_eq!(shared.l1_entry(9), Some(9));
        assert_eq!(shared.l1_entry(999), Some(0));
        assert_eq!(shared.l1_entry(5000), Some(0));
    }

    #[test]
    fn seq_detects_overlapping_writes() {
        let s = Seq::default();
        let v = s.read_begin().unwrap();
        assert!(s.read_validate(v));
        s.write(|| ());
        assert!(!s.read_validate(v));
        let w = s.read_begin().unwrap();
        assert!(s.read_validate(w));
    }
}
