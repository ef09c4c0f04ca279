//! The read cache: envelopes of records a checkpoint wrote into redb or a read found there, so
//! that a replay of a recently completed or recently read key is served from memory after its
//! layer of the map is gone.
//!
//! Readers look at the map's layers first, so a cached envelope is only ever seen for a key no
//! newer layer changed. A checkpoint replaces the cached envelopes of every key it wrote (and
//! drops the removed ones) after redb serves them and before it drops the frozen layer. A read
//! that found a record in redb caches it only if no checkpoint started since the read began
//! (the generation), so an envelope read before a checkpoint never replaces a newer one.
//!
//! Bounded by a byte budget split over shards; each shard evicts in insertion order. A record
//! read from redb is admitted on one read in [`FILL_EVERY`] (per thread), so a key read again
//! and again gets in soon, while a stream of one-off reads of a store much larger than the
//! cache does not pay for churning it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::layer::Layer;

/// Shards (each with its own lock): readers on different keys rarely meet.
const SHARDS: usize = 16;
/// Bytes charged per entry on top of its key and envelope (the maps' and queue's overhead).
const ENTRY_OVERHEAD: usize = 96;
/// One read from redb in this many fills the cache.
const FILL_EVERY: u32 = 8;

thread_local! {
    static READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[derive(Default)]
struct Shard {
    map: HashMap<Vec<u8>, Arc<[u8]>>,
    /// Keys in insertion order; may hold keys removed since (skipped when evicting).
    order: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Shard {
    fn charge(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }

    fn insert(&mut self, key: &[u8], value: Arc<[u8]>, budget: usize) {
        let charge = Shard::charge(key, &value);
        if charge > budget {
            self.remove(key);
            return;
        }
        match self.map.insert(key.to_vec(), value) {
            Some(old) => self.bytes = self.bytes - Shard::charge(key, &old) + charge,
            None => {
                self.bytes += charge;
                self.order.push_back(key.to_vec());
            }
        }
        while self.bytes > budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(value) = self.map.remove(&oldest) {
                self.bytes -= Shard::charge(&oldest, &value);
            }
        }
        if self.order.len() > 2 * self.map.len() + 1024 {
            self.compact();
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(value) = self.map.remove(key) {
            self.bytes -= Shard::charge(key, &value);
        }
    }

    /// Drops the keys of `order` that are no longer cached, and repeats.
    fn compact(&mut self) {
        let mut seen = HashSet::new();
        let map = &self.map;
        self.order
            .retain(|k| map.contains_key(k) && seen.insert(k.clone()));
    }
}

/// The cache; see the module documentation.
pub(crate) struct ReadCache {
    shards: Box<[RwLock<Shard>]>,
    hasher: std::hash::RandomState,
    shard_budget: usize,
    generation: AtomicU64,
}

impl ReadCache {
    /// A cache of at most about `budget` bytes (0: caches nothing).
    pub(crate) fn new(budget: usize) -> ReadCache {
        ReadCache {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: std::hash::RandomState::new(),
            shard_budget: budget / SHARDS,
            generation: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8]) -> Option<&RwLock<Shard>> {
        let index = usize::try_from(self.hasher.hash_one(key)).unwrap_or(0) % SHARDS;
        self.shards.get(index)
    }

    /// The cached envelope of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        if self.shard_budget == 0 {
            return None;
        }
        self.shard(key)?.read().map.get(key).cloned()
    }

    /// The generation to pass to [`ReadCache::fill`], taken before reading redb.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches what a read found in redb (one read in [`FILL_EVERY`]), unless a checkpoint
    /// started since `generation`.
    pub(crate) fn fill(&self, key: &[u8], value: &[u8], generation: u64) {
        if self.shard_budget == 0 {
            return;
        }
        let admitted = READS.with(|n| {
            let next = n.get().wrapping_add(1);
            n.set(next);
            next.is_multiple_of(FILL_EVERY)
        });
        if admitted {
            self.fill_now(key, value, generation);
        }
    }

    /// [`ReadCache::fill`] without the admission.
    fn fill_now(&self, key: &[u8], value: &[u8], generation: u64) {
        let Some(shard) = self.shard(key) else {
            return;
        };
        let mut shard = shard.write();
        if self.generation.load(Ordering::SeqCst) == generation {
            shard.insert(key, Arc::from(value), self.shard_budget);
        }
    }

    /// Takes in the records a checkpoint just wrote into redb: their new envelopes replace
    /// the cached ones, removed records leave the cache.
    pub(crate) fn apply(&self, layer: &Layer) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.shard_budget == 0 {
            return;
        }
        for (key, value) in &layer.records {
            let Some(shard) = self.shard(key) else {
                continue;
            };
            let mut shard = shard.write();
            match value {
                Some(bytes) => shard.insert(key, Arc::clone(bytes), self.shard_budget),
                None => shard.remove(key),
            }
        }
    }

    /// Bytes held (keys, envelopes and overhead).
    pub(crate) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.read().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(changes: &[(&[u8], Option<&[u8]>)]) -> Layer {
        let mut layer = Layer::default();
        for (key, value) in changes {
            layer.set_record(key, value.map(Arc::from));
        }
        layer
    }

    #[test]
    fn a_checkpoint_replaces_and_removes_and_a_stale_fill_is_refused() {
        let cache = ReadCache::new(1 << 20);
        let g = cache.generation();
        cache.fill_now(b"a", b"old", g);
        assert_eq!(cache.get(b"a").as_deref(), Some(&b"old"[..]));
        // A read that began before this checkpoint must not bring "old" back.
        let before = cache.generation();
        cache.apply(&layer(&[(b"a", Some(b"new")), (b"b", Some(b"bee"))]));
        cache.fill_now(b"a", b"old", before);
        assert_eq!(cache.get(b"a").as_deref(), Some(&b"new"[..]));
        assert_eq!(cache.get(b"b").as_deref(), Some(&b"bee"[..]));
        cache.apply(&layer(&[(b"a", None)]));
        assert!(cache.get(b"a").is_none());
    }

    #[test]
    fn the_cache_stays_within_its_budget_and_evicts_the_oldest() {
        let budget = SHARDS * 4096;
        let cache = ReadCache::new(budget);
        let value = vec![7u8; 200];
        for i in 0..10_000u32 {
            let g = cache.generation();
            cache.fill_now(&i.to_be_bytes(), &value, g);
            assert!(cache.bytes() <= budget, "{} > {budget}", cache.bytes());
        }
        assert!(cache.get(&9_999u32.to_be_bytes()).is_some());
        assert!(cache.get(&0u32.to_be_bytes()).is_none());
        // Removals leave nothing behind that grows without bound.
        for i in 0..10_000u32 {
            cache.apply(&layer(&[(&i.to_be_bytes(), None)]));
            let g = cache.generation();
            cache.fill_now(&i.to_be_bytes(), &value, g);
        }
        for shard in cache.shards.iter() {
            let shard = shard.read();
            assert!(shard.order.len() <= 2 * shard.map.len() + 1024 + 1);
        }
        let off = ReadCache::new(0);
        off.fill_now(b"a", b"x", off.generation());
        assert!(off.get(b"a").is_none());
    }
}
