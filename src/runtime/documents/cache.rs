//! The view cache of a document stage: typed views by key, bounded in bytes. Each view weighs
//! its encoded size (an estimate until it is first encoded); when the views weigh more than
//! the budget, the least recently used go, never a view the batch in flight or the one being
//! folded touches (those may weigh more than the budget: the batch needs them).
//!
//! Recency is the `lru` crate's list. Only `touch` and `put` move a view to the front, and
//! both mark it with the current tick, so the list runs in tick order: eviction pops from the
//! back and stops at the first pinned view, in time proportional to what it evicts.

use lru::LruCache;
use projectors::Doc;
use rustc_hash::FxBuildHasher;

/// What a cached view costs besides its encoded bytes: the key, the list node and the hash
/// table slot, the typed view's own headers.
const ENTRY_OVERHEAD: u64 = 128;
/// The weight of a view never encoded here (loaded, or new): a small document plus its guard,
/// until its first encoding gives the real size.
const UNENCODED_BASE: u64 = 512;
const UNENCODED_PER_STREAM: u64 = 48;

pub struct Entry<V> {
    pub doc: Doc<V>,
    /// The fold tick (batch number) that last used the view.
    pub used: u64,
    /// Bytes this view counts for; changed only through the cache, which keeps the total.
    weight: u64,
}

pub struct Cache<V> {
    map: LruCache<String, Entry<V>, FxBuildHasher>,
    /// What the cached views weigh, all told.
    bytes: u64,
    cap: u64,
}

fn estimate<V>(key: &str, doc: &Doc<V>) -> u64 {
    key.len() as u64
        + ENTRY_OVERHEAD
        + UNENCODED_BASE
        + UNENCODED_PER_STREAM * doc.guard.len() as u64
}

impl<V> Cache<V> {
    /// A cache whose views weigh `cap_bytes` at most (beyond what two batches pin).
    pub fn new(cap_bytes: usize) -> Cache<V> {
        Cache {
            map: LruCache::unbounded_with_hasher(FxBuildHasher),
            bytes: 0,
            cap: (cap_bytes as u64).max(1),
        }
    }

    /// Whether `now`'s batch or the one before it (in flight) touched the view.
    fn pinned(used: u64, now: u64) -> bool {
        used.saturating_add(1) >= now
    }

    /// Drop the least recently used views until they weigh at most the budget, never one
    /// touched at tick `now` (the batch being folded) or `now - 1` (the batch in flight).
    pub fn evict(&mut self, now: u64) {
        while self.bytes > self.cap {
            match self.map.peek_lru() {
                Some((_, e)) if !Self::pinned(e.used, now) => {}
                // Everything more recent is pinned too.
                _ => return,
            }
            if let Some((_, e)) = self.map.pop_lru() {
                self.bytes -= e.weight;
            }
        }
    }

    /// The view of `key`, made empty if absent, marked used at `tick` (most recently used).
    pub fn touch(&mut self, key: String, tick: u64) -> &mut Entry<V>
    where
        V: Default,
    {
        if !self.map.contains(key.as_str()) {
            let doc = Doc::default();
            let weight = estimate(&key, &doc);
            self.bytes += weight;
            self.map.put(
                key.clone(),
                Entry {
                    doc,
                    used: tick,
                    weight,
                },
            );
        }
        let e = self
            .map
            .get_mut(key.as_str())
            .unwrap_or_else(|| unreachable!("inserted above"));
        e.used = tick;
        e
    }

    /// Cache `doc` as the view of `key`, used at `tick` (most recently used).
    pub fn put(&mut self, key: String, doc: Doc<V>, tick: u64) {
        let weight = estimate(&key, &doc);
        self.bytes += weight;
        let old = self.map.put(
            key,
            Entry {
                doc,
                used: tick,
                weight,
            },
        );
        if let Some(old) = old {
            self.bytes -= old.weight;
        }
    }

    /// The view now weighs its encoding, `encoded` bytes.
    pub fn weigh(&mut self, key: &str, encoded: usize) {
        if let Some(e) = self.map.peek_mut(key) {
            let weight = key.len() as u64 + ENTRY_OVERHEAD + encoded as u64;
            self.bytes = self.bytes - e.weight + weight;
            e.weight = weight;
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.map.contains(key)
    }

    /// The view of `key`, as it is (neither its recency nor its tick change).
    pub fn get(&self, key: &str) -> Option<&Entry<V>> {
        self.map.peek(key)
    }

    /// The view of `key` to change in place (neither its recency nor its tick change).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Entry<V>> {
        self.map.peek_mut(key)
    }

    pub fn remove(&mut self, key: &str) -> Option<Entry<V>> {
        let e = self.map.pop(key)?;
        self.bytes -= e.weight;
        Some(e)
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// What the cached views weigh, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight_of(key: &str, encoded: usize) -> u64 {
        key.len() as u64 + ENTRY_OVERHEAD + encoded as u64
    }

    /// A cache of views that each weigh 1,000 encoded bytes, put at the given ticks.
    fn filled(cap: u64, ticks: &[u64]) -> Cache<u32> {
        let mut c = Cache::new(cap as usize);
        for (i, tick) in ticks.iter().enumerate() {
            let k = format!("k{i}");
            c.put(k.clone(), Doc::default(), *tick);
            c.weigh(&k, 1_000);
        }
        c
    }

    #[test]
    fn views_weigh_their_encoding_once_encoded_and_an_estimate_before() {
        let mut c: Cache<u32> = Cache::new(1 << 20);
        let mut doc = Doc::default();
        doc.guard.insert("order/o-1".into(), 3);
        doc.guard.insert("order/o-2".into(), 1);
        c.put("cus-1".into(), doc, 1);
        let estimated = 5 + ENTRY_OVERHEAD + UNENCODED_BASE + 2 * UNENCODED_PER_STREAM;
        assert_eq!(c.bytes(), estimated);
        c.weigh("cus-1", 700);
        assert_eq!(c.bytes(), weight_of("cus-1", 700));
        // Weighed again (a later batch changed it): replaced, not added.
        c.weigh("cus-1", 900);
        assert_eq!(c.bytes(), weight_of("cus-1", 900));
        // A new view, touched: an empty document's estimate.
        c.touch("cus-2".into(), 1);
        assert_eq!(
            c.bytes(),
            weight_of("cus-1", 900) + 5 + ENTRY_OVERHEAD + UNENCODED_BASE
        );
        // Put over an existing view: the old weight goes.
        c.put("cus-2".into(), Doc::default(), 1);
        c.weigh("cus-2", 10);
        assert_eq!(c.bytes(), weight_of("cus-1", 900) + weight_of("cus-2", 10));
        assert_eq!(c.remove("cus-1").map(|e| e.used), Some(1), "removed whole");
        assert_eq!(c.bytes(), weight_of("cus-2", 10));
        c.clear();
        assert_eq!((c.bytes(), c.len()), (0, 0));
        // Weighing a view that is not cached changes nothing.
        c.weigh("gone", 5);
        assert!(c.is_empty());
    }

    #[test]
    fn over_budget_the_least_recently_used_go_first() {
        let one = weight_of("k0", 1_000);
        // Room for three views; six, put at ticks 1..=6.
        let mut c = filled(3 * one, &[1, 2, 3, 4, 5, 6]);
        // k1 used again at tick 7 (the batch now folded): the most recent.
        c.touch("k1".into(), 7);
        c.evict(7);
        assert_eq!(c.bytes(), 3 * one);
        for k in ["k0", "k2", "k3"] {
            assert!(!c.contains_key(k), "{k} was least recently used");
        }
        // k4 is the most recent of the rest; k5 (the batch in flight) and k1 are pinned.
        for k in ["k4", "k5", "k1"] {
            assert!(c.contains_key(k), "{k} stays");
        }
        // Next batch: k4 and k5 are no longer pinned, k1 still is; the budget shrinks to one.
        c.cap = one;
        c.evict(8);
        assert_eq!(c.len(), 1);
        assert!(c.contains_key("k1"));
    }

    #[test]
    fn a_view_the_last_two_batches_touched_is_never_evicted() {
        let one = weight_of("k0", 1_000);
        // Room for one view; five, all touched by the batch in flight (9) or this one (10).
        let mut c = filled(one, &[9, 9, 10, 10, 10]);
        c.evict(10);
        assert_eq!(c.len(), 5, "over budget, but all pinned");
        assert_eq!(c.bytes(), 5 * one);
        // Two batches on, nothing is pinned any more: down to the budget.
        c.evict(12);
        assert_eq!(c.len(), 1);
        assert!(c.contains_key("k4"), "the most recently used stays");
    }

    #[test]
    fn reading_a_view_neither_pins_it_nor_makes_it_recent() {
        let one = weight_of("k0", 1_000);
        let mut c = filled(2 * one, &[1, 2, 3]);
        assert!(c.get("k0").is_some());
        if let Some(e) = c.get_mut("k0") {
            e.doc.rev = 42;
        }
        c.evict(10);
        assert!(
            !c.contains_key("k0"),
            "read, not used: still the least recent"
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn under_budget_nothing_goes() {
        let one = weight_of("k0", 1_000);
        let mut c = filled(4 * one, &[0, 0, 0, 0]);
        c.evict(100);
        assert_eq!(c.len(), 4);
    }
}
