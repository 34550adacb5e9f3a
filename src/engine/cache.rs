//! A bounded least-recently-used cache of L2 table slices.
//!
//! Invariants:
//! - At most `capacity` slices are held; memory is `capacity × slice size` at most.
//! - Lookup, insertion and eviction are O(1): a hash map finds the slot, an intrusive doubly
//!   linked list over the slot vector keeps recency order (head = most recent, tail = victim).
//! - A slice is keyed by its host offset, which is unique for every slice of every L2 table.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

/// A set of host offsets.
pub(crate) type OffsetSet = IntMap<u64, ()>;

struct Slot {
    key: u64,
    prev: u32,
    next: u32,
    /// Modified in memory and not yet written back to the image.
    dirty: bool,
    entries: Box<[u64]>,
}

/// LRU cache of decoded L2 slices (raw 64-bit words, big-endian already converted).
pub(crate) struct SliceCache {
    map: IntMap<u64, u32>,
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl SliceCache {
    /// A cache of at most `capacity` slices (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, NIL as usize - 1);
        SliceCache {
            map: IntMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    /// The slice stored under `key`, loading and inserting it with `load` on a miss.
    #[inline]
    pub(crate) fn get_or_load<E>(
        &mut self,
        key: u64,
        load: impl FnOnce() -> Result<Box<[u64]>, E>,
    ) -> Result<&[u64], E> {
        if let Some(&i) = self.map.get(&key) {
            self.hits += 1;
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return Ok(&self.slots[i as usize].entries);
        }
        let entries = load()?;
        Ok(self.insert(key, entries))
    }

    /// The slot holding `key`, marking it most recently used (one hash probe on the hot path).
    #[inline]
    pub(crate) fn touch(&mut self, key: u64) -> Option<u32> {
        let i = *self.map.get(&key)?;
        self.hits += 1;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(i)
    }

    /// The entries of a slot returned by [`touch`](Self::touch) or
    /// [`load_slot`](Self::load_slot).
    #[inline]
    pub(crate) fn entries(&self, slot: u32) -> &[u64] {
        &self.slots[slot as usize].entries
    }

    /// Inserts the slice `load` produces for `key` (which must be absent); returns its slot.
    pub(crate) fn load_slot<E>(
        &mut self,
        key: u64,
        load: impl FnOnce() -> Result<Box<[u64]>, E>,
    ) -> Result<u32, E> {
        let entries = load()?;
        self.insert(key, entries);
        Ok(self.map.get(&key).copied().unwrap_or(self.head))
    }

    /// The slice stored under `key`, marking it most recently used.
    #[cfg(test)]
    pub(crate) fn get(&mut self, key: u64) -> Option<&[u64]> {
        let i = *self.map.get(&key)?;
        self.hits += 1;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(&self.slots[i as usize].entries)
    }

    /// Inserts a slice, evicting the least recently used one if full; returns it.
    pub(crate) fn insert(&mut self, key: u64, entries: Box<[u64]>) -> &[u64] {
        self.misses += 1;
        if let Some(&i) = self.map.get(&key) {
            self.slots[i as usize].entries = entries;
            self.slots[i as usize].dirty = false;
            self.unlink(i);
            self.push_front(i);
            return &self.slots[i as usize].entries;
        }
        let i = if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                key,
                prev: NIL,
                next: NIL,
                dirty: false,
                entries,
            });
            (self.slots.len() - 1) as u32
        } else {
            let victim = self.tail;
            self.unlink(victim);
            let old_key = self.slots[victim as usize].key;
            self.map.remove(&old_key);
            let s = &mut self.slots[victim as usize];
            debug_assert!(
                !s.dirty,
                "a dirty slice must be written back before eviction"
            );
            s.key = key;
            s.dirty = false;
            s.entries = entries;
            victim
        };
        self.map.insert(key, i);
        self.push_front(i);
        &self.slots[i as usize].entries
    }

    /// Whether inserting a new key now would evict a dirty slice (which must first be written
    /// back, in dependency order, by the caller).
    pub(crate) fn insert_would_evict_dirty(&self, key: u64) -> bool {
        !self.map.contains_key(&key)
            && self.slots.len() >= self.capacity
            && self.tail != NIL
            && self.slots[self.tail as usize].dirty
    }

    /// The slice under `key` for modification, marked dirty and most recently used.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut [u64]> {
        let i = *self.map.get(&key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        let s = &mut self.slots[i as usize];
        s.dirty = true;
        Some(&mut s.entries)
    }

    /// Keys of all dirty slices, in ascending order (so write-back is sequential).
    pub(crate) fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.key)
            .collect();
        v.sort_unstable();
        v
    }

    /// The entries under `key` without touching recency.
    pub(crate) fn peek(&self, key: u64) -> Option<&[u64]> {
        self.map
            .get(&key)
            .map(|&i| &*self.slots[i as usize].entries)
    }

    /// Marks the slice under `key` as written back.
    pub(crate) fn mark_clean(&mut self, key: u64) {
        if let Some(&i) = self.map.get(&key) {
            self.slots[i as usize].dirty = false;
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
                let s = &mut self.slots[i as usize];
                s.dirty = false;
                s.key = u64::MAX;
                s.entries = Box::new([]);
                // Park the emptied slot at the tail so it is reused first.
                self.push_back(i);
            }
        }
    }

    fn push_back(&mut self, i: u32) {
        let old = self.tail;
        {
            let s = &mut self.slots[i as usize];
            s.next = NIL;
            s.prev = old;
        }
        match old {
            NIL => self.head = i,
            o => self.slots[o as usize].next = i,
        }
        self.tail = i;
    }

    /// (hits, misses) since creation.
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

    fn s(v: u64) -> Box<[u64]> {
        vec![v; 4].into_boxed_slice()
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut c = SliceCache::new(2);
        c.insert(1, s(1));
        c.insert(2, s(2));
        assert_eq!(c.get(1).map(|e| e[0]), Some(1)); // 1 is now most recent
        c.insert(3, s(3)); // evicts 2
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).map(|e| e[0]), Some(1));
        assert_eq!(c.get(3).map(|e| e[0]), Some(3));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn bounded_under_churn() {
        let mut c = SliceCache::new(8);
        for k in 0..1000u64 {
            c.insert(k, s(k));
            assert!(c.len() <= 8);
            // Recently inserted keys stay.
            assert!(c.get(k).is_some());
        }
        for k in 992..1000 {
            assert!(c.get(k).is_some());
        }
        assert!(c.get(0).is_none());
    }

    #[test]
    fn dirty_tracking_and_forget() {
        let mut c = SliceCache::new(2);
        c.insert(10, s(1));
        c.insert(20, s(2));
        c.get_mut(10).unwrap()[0] = 7;
        assert_eq!(c.dirty_keys(), vec![10]);
        // 20 is now the LRU victim and clean; 10 is dirty and most recent.
        assert!(!c.insert_would_evict_dirty(30));
        c.get_mut(20).unwrap();
        c.get(10);
        assert!(c.insert_would_evict_dirty(30));
        c.mark_clean(20);
        assert!(!c.insert_would_evict_dirty(30));
        c.forget_range(5, 15);
        assert!(c.peek(10).is_none());
        c.insert(30, s(3));
        c.insert(40, s(4));
        assert!(c.peek(20).is_none() || c.peek(30).is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reinsert_replaces() {
        let mut c = SliceCache::new(2);
        c.insert(1, s(1));
        c.insert(1, s(9));
        assert_eq!(c.get(1).map(|e| e[0]), Some(9));
        assert_eq!(c.len(), 1);
    }
}
