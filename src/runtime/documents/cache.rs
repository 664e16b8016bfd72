//! The view cache of a document stage: typed views by key, bounded by count. When full, the
//! least recently used quarter goes, never a view the batch in flight or the one being folded
//! touches.

use projectors::Doc;
use rustc_hash::FxHashMap as HashMap;

pub struct Entry<V> {
    pub doc: Doc<V>,
    /// The fold tick (batch number) that last used the view.
    pub used: u64,
}

pub struct Cache<V> {
    pub map: HashMap<String, Entry<V>>,
    cap: usize,
}

impl<V> Cache<V> {
    pub fn new(cap: usize) -> Cache<V> {
        Cache {
            map: HashMap::default(),
            cap: cap.max(1),
        }
    }

    /// Drop the least recently used quarter when over capacity; `now` is the current tick.
    pub fn evict(&mut self, now: u64) {
        if self.map.len() <= self.cap {
            return;
        }
        let mut used: Vec<u64> = self.map.values().map(|e| e.used).collect();
        let cut = used.len() / 4;
        let (_, threshold, _) = used.select_nth_unstable(cut);
        // Never what the batch in flight (tick now - 1) or the one being folded touches.
        let threshold = (*threshold).min(now.saturating_sub(2));
        self.map.retain(|_, e| e.used > threshold);
    }

    /// The view of `key`, made empty if absent, marked used at `tick`.
    pub fn touch(&mut self, key: String, tick: u64) -> &mut Entry<V>
    where
        V: Default,
    {
        let e = self.map.entry(key).or_insert_with(|| Entry {
            doc: Doc::default(),
            used: tick,
        });
        e.used = tick;
        e
    }

    pub fn put(&mut self, key: String, doc: Doc<V>, tick: u64) {
        self.map.insert(key, Entry { doc, used: tick });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_what_the_last_two_batches_touched() {
        let mut c: Cache<u32> = Cache::new(4);
        for (i, tick) in [1, 1, 2, 3, 9, 10].into_iter().enumerate() {
            c.put(format!("k{i}"), Doc::default(), tick);
        }
        c.evict(10);
        assert!(c.map.len() < 6, "over capacity: something goes");
        assert!(c.map.contains_key("k4") && c.map.contains_key("k5"));
        assert!(
            !c.map.contains_key("k0"),
            "the least recently used go first"
        );
    }

    #[test]
    fn under_capacity_nothing_goes() {
        let mut c: Cache<u32> = Cache::new(4);
        for i in 0..4 {
            c.put(format!("k{i}"), Doc::default(), 0);
        }
        c.evict(100);
        assert_eq!(c.map.len(), 4);
    }
}
