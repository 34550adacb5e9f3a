//! A bounded least-recently-used cache of L2 table slices.
//!
//! Invariants:
//! - At most `capacity` slices are held; memory is `capacity × slice size` at most.
//! - Lookup, insertion and eviction are O(1): a hash map finds the slot, an intrusive doubly
//!   linked list over the slot vector keeps recency order (head = most recent, tail = victim).
//! - A slice is keyed by its host offset, which is unique for every slice of every L2 table.

use std::collections::HashMap;

const NIL: u32 = u32::MAX;

struct Slot {
    key: u64,
    prev: u32,
    next: u32,
    entries: Box<[u64]>,
}

/// LRU cache of decoded L2 slices (raw 64-bit words, big-endian already converted).
pub(crate) struct SliceCache {
    map: HashMap<u64, u32>,
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
            map: HashMap::new(),
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
            self.unlink(i);
            self.push_front(i);
            return &self.slots[i as usize].entries;
        }
        let i = if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                key,
                prev: NIL,
                next: NIL,
                entries,
            });
            (self.slots.len() - 1) as u32
        } else {
            let victim = self.tail;
            self.unlink(victim);
            let old_key = self.slots[victim as usize].key;
            self.map.remove(&old_key);
            let s = &mut self.slots[victim as usize];
            s.key = key;
            s.entries = entries;
            victim
        };
        self.map.insert(key, i);
        self.push_front(i);
        &self.slots[i as usize].entries
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
    fn reinsert_replaces() {
        let mut c = SliceCache::new(2);
        c.insert(1, s(1));
        c.insert(1, s(9));
        assert_eq!(c.get(1).map(|e| e[0]), Some(9));
        assert_eq!(c.len(), 1);
    }
}
