//! A bounded cache of L2 table slices: least-recently-used order for lookups under the metadata
//! lock, plus a CLOCK-style second chance for slices hit by lock-free readers.
//!
//! The slices' words live in the published [`SlotTable`](super::shared::SlotTable), which
//! readers use without the lock (see [`super::shared`]); this type is the writer's side of it
//! and is only used with the metadata lock held.
//!
//! Invariants:
//! - At most `capacity` slices are held; memory is `capacity × slice size` at most (words are
//!   allocated per slot on first use and reused after eviction).
//! - Lookup, insertion and eviction are O(1) amortised: a hash map finds the slot, an intrusive
//!   doubly linked list over the slots keeps recency order (head = most recent, tail = victim).
//!   Lock-free hits cannot reorder the list; they set the slot's reference bit, and before an
//!   eviction [`SliceCache::insert_would_evict_dirty`] moves referenced slots from the tail to the
//!   head, clearing their bits (each bit set pays for one move, hence amortised O(1)).
//! - [`SliceCache::insert`] evicts exactly the tail. Between `insert_would_evict_dirty` and the
//!   insertion nothing under the lock reorders the list, and readers only set reference bits, so
//!   the slot whose dirtiness was reported is the slot evicted: a dirty slice is never dropped.
//! - A slice is keyed by its host offset, which is unique for every slice of every L2 table.
//! - Every change readers can see (a slot's key or words, the index) is made inside a write
//!   section of the published sequence counter.

use super::shared::{Shared, MAX_SLOTS, NO_KEY};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

const NIL: u32 = u32::MAX;

/// A hasher for integer keys (host offsets, table indices): one multiplication (Fibonacci
/// hashing), whose high bits — the ones the hash table uses — mix every bit of the key. Keys
/// come from the image, but a colliding set of keys costs time only within the cache's bounded
/// size, never correctness.
#[derive(Default, Clone, Copy)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A hash map keyed by integers, with [`IntHasher`].
pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Writer-side bookkeeping of one slot.
struct Link {
    /// Host offset of the slice held, or [`NO_KEY`] for an emptied slot.
    key: u64,
    prev: u32,
    next: u32,
    /// Modified in memory and not yet written back to the image.
    dirty: bool,
}

/// LRU cache of decoded L2 slices (64-bit words, already converted from big-endian).
pub(crate) struct SliceCache {
    shared: Arc<Shared>,
    map: IntMap<u64, u32>,
    links: Vec<Link>,
    head: u32,
    tail: u32,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl SliceCache {
    /// A cache of at most `capacity` slices (at least one) whose words are published in
    /// `shared` (built for the same capacity).
    pub(crate) fn new(shared: Arc<Shared>, capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_SLOTS);
        SliceCache {
            shared,
            map: IntMap::default(),
            links: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.links[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.links[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.links[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.links[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.links[o as usize].prev = i,
        }
        self.head = i;
    }

    fn push_back(&mut self, i: u32) {
        let old = self.tail;
        {
            let s = &mut self.links[i as usize];
            s.next = NIL;
            s.prev = old;
        }
        match old {
            NIL => self.head = i,
            o => self.links[o as usize].next = i,
        }
        self.tail = i;
    }

    fn move_to_front(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// The words of slot `i`.
    #[inline]
    fn words(&self, i: u32) -> &[AtomicU64] {
        self.shared.slots.words_init(i)
    }

    /// The slot holding `key`, marking it most recently used (one hash probe on the hot path).
    /// A slot the lock-free index does not list (its group was full) is listed now if there is
    /// room, so later hits need no lock.
    #[inline]
    pub(crate) fn touch(&mut self, key: u64) -> Option<u32> {
        let i = *self.map.get(&key)?;
        self.hits += 1;
        self.move_to_front(i);
        let slots = &self.shared.slots;
        if !slots.indexed(key, i) && slots.has_room(key) {
            self.shared.seq.write(|| slots.index_insert(key, i, false));
        }
        Some(i)
    }

    /// The entries of a slot returned by [`touch`](Self::touch) or
    /// [`load_slot`](Self::load_slot).
    #[inline]
    pub(crate) fn entries(&self, slot: u32) -> &[AtomicU64] {
        self.words(slot)
    }

    /// The slice under `key`, marked most recently used, loading it with `load` (which fills
    /// the slice's big-endian bytes) on a miss. The caller has made sure a dirty victim was
    /// written back (see [`insert_would_evict_dirty`](Self::insert_would_evict_dirty)).
    pub(crate) fn get_or_load<'b, E>(
        &mut self,
        key: u64,
        load: impl FnOnce() -> Result<&'b [u8], E>,
    ) -> Result<&[AtomicU64], E> {
        let i = match self.touch(key) {
            Some(i) => i,
            None => self.load_slot(key, load)?,
        };
        Ok(self.words(i))
    }

    /// Inserts the slice `load` produces (its big-endian bytes) for `key`; returns its slot.
    pub(crate) fn load_slot<'b, E>(
        &mut self,
        key: u64,
        load: impl FnOnce() -> Result<&'b [u8], E>,
    ) -> Result<u32, E> {
        let bytes = load()?;
        Ok(self.insert_with(key, |w| {
            for (a, c) in w.iter().zip(bytes.chunks_exact(8)) {
                a.store(crate::format::be_u64(c, 0), Relaxed);
            }
        }))
    }

    /// Inserts the slice `fill` writes for `key`, evicting the tail if full; returns its slot.
    /// `fill` runs inside a write section and must not do I/O.
    fn insert_with(&mut self, key: u64, fill: impl FnOnce(&[AtomicU64])) -> u32 {
        self.misses += 1;
        let (i, old_key) = if let Some(&i) = self.map.get(&key) {
            self.move_to_front(i);
            (i, key)
        } else if self.links.len() < self.capacity {
            self.links.push(Link {
                key,
                prev: NIL,
                next: NIL,
                dirty: false,
            });
            let i = (self.links.len() - 1) as u32;
            self.push_front(i);
            self.map.insert(key, i);
            (i, NO_KEY)
        } else {
            let victim = self.tail;
            debug_assert!(
                !self.links[victim as usize].dirty,
                "a dirty slice must be written back before eviction"
            );
            let old_key = self.links[victim as usize].key;
            if old_key != NO_KEY {
                self.map.remove(&old_key);
            }
            self.map.insert(key, victim);
            self.move_to_front(victim);
            (victim, old_key)
        };
        let link = &mut self.links[i as usize];
        link.key = key;
        link.dirty = false;
        let slots = &self.shared.slots;
        let words = slots.words_init(i);
        if let Some(r) = slots.referenced(i) {
            r.store(false, Relaxed);
        }
        self.shared.seq.write(|| {
            if old_key != key && old_key != NO_KEY {
                slots.index_remove(old_key, i);
            }
            fill(words);
            if !slots.indexed(key, i) {
                slots.index_insert(key, i, true);
            }
        });
        i
    }

    /// Inserts a slice of plain words (tests).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, key: u64, entries: &[u64]) {
        self.insert_with(key, |w| {
            for (a, e) in w.iter().zip(entries) {
                a.store(*e, Relaxed);
            }
        });
    }

    /// The first word of the slice under `key`, marking it most recently used (tests).
    #[cfg(test)]
    pub(crate) fn get(&mut self, key: u64) -> Option<u64> {
        let i = self.touch(key)?;
        Some(self.words(i)[0].load(Relaxed))
    }

    /// Whether inserting a new key now would evict a dirty slice (which must first be written
    /// back, in dependency order, by the caller). First gives referenced slots at the tail a
    /// second chance (moves them to the head, clearing their bit), so the tail is the slot
    /// [`insert`](Self::load_slot) will evict.
    pub(crate) fn insert_would_evict_dirty(&mut self, key: u64) -> bool {
        if self.map.contains_key(&key) || self.links.len() < self.capacity {
            return false;
        }
        for _ in 0..self.links.len() {
            let t = self.tail;
            if t == NIL || self.links[t as usize].key == NO_KEY {
                break;
            }
            let Some(r) = self.shared.slots.referenced(t) else {
                break;
            };
            if !r.load(Relaxed) {
                break;
            }
            r.store(false, Relaxed);
            self.move_to_front(t);
        }
        self.tail != NIL && self.links[self.tail as usize].dirty
    }

    /// Sets `words` at word index `at` of the slice under `key`, marking it dirty and most
    /// recently used. Returns false if the slice is not cached.
    pub(crate) fn store(&mut self, key: u64, at: usize, words: &[u64]) -> bool {
        let Some(&i) = self.map.get(&key) else {
            return false;
        };
        self.move_to_front(i);
        self.links[i as usize].dirty = true;
        let w = self.shared.slots.words_init(i);
        self.shared.seq.write(|| {
            for (a, v) in w[at..at + words.len()].iter().zip(words) {
                a.store(*v, Relaxed);
            }
        });
        true
    }

    /// Keys of all dirty slices, in ascending order (so write-back is sequential).
    pub(crate) fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .links
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.key)
            .collect();
        v.sort_unstable();
        v
    }

    /// The entries under `key` without touching recency.
    pub(crate) fn peek(&self, key: u64) -> Option<&[AtomicU64]> {
        self.map.get(&key).map(|&i| self.words(i))
    }

    /// Marks the slice under `key` as written back.
    pub(crate) fn mark_clean(&mut self, key: u64) {
        if let Some(&i) = self.map.get(&key) {
            self.links[i as usize].dirty = false;
        }
    }

    /// Drops every slice whose key lies in `start..end` (a freed L2 table), dirty or not.
    pub(crate) fn forget_range(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self
            .map
            .keys()
            .copied()
            .filter(|k| (start..end).contains(k))
            .collect();
        for k in keys {
            if let Some(i) = self.map.remove(&k) {
                self.unlink(i);
                let s = &mut self.links[i as usize];
                s.dirty = false;
                s.key = NO_KEY;
                let slots = &self.shared.slots;
                self.shared.seq.write(|| slots.index_remove(k, i));
                // Park the emptied slot at the tail so it is reused first.
                self.push_back(i);
            }
        }
    }

    /// (hits, misses) since creation, counting hits under the lock only.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Number of slices held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> SliceCache {
        SliceCache::new(Arc::new(Shared::new(&[], capacity, 4)), capacity)
    }

    fn s(v: u64) -> [u64; 4] {
        [v; 4]
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut c = cache(2);
        c.insert(512, &s(1));
        c.insert(1024, &s(2));
        assert_eq!(c.get(512), Some(1)); // 512 is now most recent
        c.insert(1536, &s(3)); // evicts 1024
        assert!(c.get(1024).is_none());
        assert_eq!(c.get(512), Some(1));
        assert_eq!(c.get(1536), Some(3));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn bounded_under_churn() {
        let mut c = cache(8);
        for k in 0..1000u64 {
            c.insert(k * 512, &s(k));
            assert!(c.len() <= 8);
            // Recently inserted keys stay.
            assert!(c.get(k * 512).is_some());
        }
        for k in 992..1000 {
            assert_eq!(c.get(k * 512), Some(k));
            assert_eq!(
                c.shared.find_slice(k * 512).map(|w| w[0].load(Relaxed)),
                Some(k)
            );
        }
        assert!(c.get(0).is_none());
        assert!(c.shared.find_slice(0).is_none());
    }

    #[test]
    fn dirty_tracking_and_forget() {
        let mut c = cache(2);
        c.insert(10 << 9, &s(1));
        c.insert(20 << 9, &s(2));
        assert!(c.store(10 << 9, 0, &[7]));
        assert_eq!(c.dirty_keys(), vec![10 << 9]);
        // 20 is now the LRU victim and clean; 10 is dirty and most recent.
        assert!(!c.insert_would_evict_dirty(30 << 9));
        assert!(c.store(20 << 9, 0, &[8]));
        c.get(10 << 9);
        assert!(c.insert_would_evict_dirty(30 << 9));
        c.mark_clean(20 << 9);
        assert!(!c.insert_would_evict_dirty(30 << 9));
        c.forget_range(5 << 9, 15 << 9);
        assert!(c.peek(10 << 9).is_none());
        assert!(c.shared.find_slice(10 << 9).is_none());
        c.insert(30 << 9, &s(3));
        c.insert(40 << 9, &s(4));
        assert!(c.peek(20 << 9).is_none() || c.peek(30 << 9).is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reinsert_replaces() {
        let mut c = cache(2);
        c.insert(512, &s(1));
        c.insert(512, &s(9));
        assert_eq!(c.get(512), Some(9));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn referenced_slices_get_a_second_chance() {
        let mut c = cache(2);
        c.insert(512, &s(1));
        c.insert(1024, &s(2));
        // 512 is the LRU victim, but a lock-free reader hits it.
        assert!(c.shared.find_slice(512).is_some());
        assert!(!c.insert_would_evict_dirty(1536));
        c.insert(1536, &s(3));
        assert_eq!(c.get(512), Some(1));
        assert!(c.get(1024).is_none());
    }

    #[test]
    fn lock_free_view_follows_stores() {
        let mut c = cache(4);
        c.insert(4096, &[1, 2, 3, 4]);
        assert!(c.store(4096, 2, &[30, 40]));
        let w = c.shared.find_slice(4096).unwrap();
        let got: Vec<u64> = w.iter().map(|a| a.load(Relaxed)).collect();
        assert_eq!(got, vec![1, 2, 30, 40]);
    }
}
