//! The read cache: envelopes of records a checkpoint wrote into redb or a caller's read found
//! there, so that a replay of a recently completed or recently read key is served from memory
//! after its layer of the map is gone. A commit's own reads (the writer's, a sweep's) do not
//! fill it: what they read is about to change or go.
//!
//! Readers look at the map's layers first, so a cached envelope is only ever seen for a key no
//! newer layer changed. A checkpoint replaces the cached envelopes of every key it wrote (and
//! drops the removed ones) after redb serves them and before it drops the frozen layer. A read
//! that found a record in redb caches it only if no checkpoint started since the read began
//! (the generation), so an envelope read before a checkpoint never replaces a newer one.
//!
//! Bounded by a byte budget split over shards; each shard evicts in insertion order. While a
//! shard has room, every record a caller reads from redb is admitted to it (nothing is evicted
//! for it, so a cache that is still filling, after open, fills at the rate of reads); once it
//! is full, a record is admitted on one read in [`FILL_EVERY`] (per thread), so a key read
//! again and again gets in soon, while a stream of one-off reads of a store much larger than
//! the cache does not pay for churning it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// A cached envelope and the key it is stored under.
struct Entry {
    key: Box<[u8]>,
    value: Arc<[u8]>,
}

/// A hasher for keys that are already hashes: the map of a shard is keyed by the cache's keyed
/// hash of each storage key, so a lookup hashes the key once (choosing the shard with it too)
/// and compares the key itself only on a match.
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed with it; this folds anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Shard {
    /// Entries by the hash of their key. Two keys with one hash share a slot: the later insert
    /// replaces the earlier entry, which then is only a miss.
    map: HashMap<u64, Entry, BuildHasherDefault<HashIsKey>>,
    /// Hashes in insertion order; may hold ones removed since (skipped when evicting).
    order: VecDeque<u64>,
    bytes: usize,
}

impl Shard {
    fn charge(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }

    fn get(&self, hash: u64, key: &[u8]) -> Option<Arc<[u8]>> {
        let entry = self.map.get(&hash)?;
        (*entry.key == *key).then(|| Arc::clone(&entry.value))
    }

    fn insert(&mut self, hash: u64, key: &[u8], value: Arc<[u8]>, budget: usize) {
        let charge = Shard::charge(key, &value);
        if charge > budget {
            self.remove(hash, key);
            return;
        }
        let entry = Entry {
            key: key.into(),
            value,
        };
        match self.map.insert(hash, entry) {
            Some(old) => {
                self.bytes = self.bytes - Shard::charge(&old.key, &old.value) + charge;
            }
            None => {
                self.bytes += charge;
                self.order.push_back(hash);
            }
        }
        while self.bytes > budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&oldest) {
                self.bytes -= Shard::charge(&old.key, &old.value);
            }
        }
        if self.order.len() > 2 * self.map.len() + 1024 {
            self.compact();
        }
    }

    fn remove(&mut self, hash: u64, key: &[u8]) {
        if self.map.get(&hash).is_some_and(|e| *e.key == *key)
            && let Some(old) = self.map.remove(&hash)
        {
            self.bytes -= Shard::charge(&old.key, &old.value);
        }
    }

    /// Drops the hashes of `order` that are no longer cached, and repeats.
    fn compact(&mut self) {
        let mut seen = HashSet::new();
        let map = &self.map;
        self.order
            .retain(|h| map.contains_key(h) && seen.insert(*h));
    }
}

/// One shard and whether it has room for a typical entry (kept beside its lock, so that a read
/// can decide on admission without taking it).
#[derive(Default)]
struct Slot {
    shard: RwLock<Shard>,
    /// The shard's bytes are below its budget less [`ROOM`]: an admission evicts nothing.
    has_room: AtomicBool,
}

/// The room a shard must have left for reads to be admitted without [`FILL_EVERY`]'s sampling.
const ROOM: usize = 4096;

/// The cache; see the module documentation.
pub(crate) struct ReadCache {
    shards: Box<[Slot]>,
    hasher: std::hash::RandomState,
    shard_budget: usize,
    generation: AtomicU64,
}

impl ReadCache {
    /// A cache of at most about `budget` bytes (0: caches nothing).
    pub(crate) fn new(budget: usize) -> ReadCache {
        ReadCache {
            shards: (0..SHARDS)
                .map(|_| Slot {
                    shard: RwLock::default(),
                    has_room: AtomicBool::new(budget / SHARDS > ROOM),
                })
                .collect(),
            hasher: std::hash::RandomState::new(),
            shard_budget: budget / SHARDS,
            generation: AtomicU64::new(0),
        }
    }

    /// The hash of `key` and its shard. The shard is chosen by bits of the hash that the
    /// shard's table does not use to place it (its low bits) or to tell entries apart (its
    /// top seven).
    fn shard(&self, key: &[u8]) -> Option<(u64, &Slot)> {
        let hash = self.hasher.hash_one(key);
        let index = usize::try_from(hash >> 32).unwrap_or(0) % SHARDS;
        Some((hash, self.shards.get(index)?))
    }

    /// The cached envelope of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        if self.shard_budget == 0 {
            return None;
        }
        let (hash, slot) = self.shard(key)?;
        slot.shard.read().get(hash, key)
    }

    /// The generation to pass to [`ReadCache::fill`], taken before reading redb.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches what a read found in redb (every read while its shard has room, then one read in
    /// [`FILL_EVERY`]), unless a checkpoint started since `generation`.
    pub(crate) fn fill(&self, key: &[u8], value: &[u8], generation: u64) {
        if self.shard_budget == 0 {
            return;
        }
        let Some((hash, slot)) = self.shard(key) else {
            return;
        };
        let admitted = slot.has_room.load(Ordering::Relaxed)
            || READS.with(|n| {
                let next = n.get().wrapping_add(1);
                n.set(next);
                next.is_multiple_of(FILL_EVERY)
            });
        if admitted {
            self.fill_slot(hash, slot, key, value, generation);
        }
    }

    /// [`ReadCache::fill`] without the admission.
    #[cfg(test)]
    fn fill_now(&self, key: &[u8], value: &[u8], generation: u64) {
        if let Some((hash, slot)) = self.shard(key) {
            self.fill_slot(hash, slot, key, value, generation);
        }
    }

    fn fill_slot(&self, hash: u64, slot: &Slot, key: &[u8], value: &[u8], generation: u64) {
        let mut shard = slot.shard.write();
        if self.generation.load(Ordering::SeqCst) == generation {
            shard.insert(hash, key, Arc::from(value), self.shard_budget);
            self.note_room(slot, &shard);
        }
    }

    fn note_room(&self, slot: &Slot, shard: &Shard) {
        let room = shard.bytes.saturating_add(ROOM) < self.shard_budget;
        slot.has_room.store(room, Ordering::Relaxed);
    }

    /// Takes in the records a checkpoint just wrote into redb: their new envelopes replace
    /// the cached ones, removed records leave the cache.
    pub(crate) fn apply(&self, layer: &Layer) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.shard_budget == 0 {
            return;
        }
        for (key, value) in &layer.records {
            let Some((hash, slot)) = self.shard(key) else {
                continue;
            };
            let mut shard = slot.shard.write();
            match value {
                Some(bytes) => shard.insert(hash, key, Arc::clone(bytes), self.shard_budget),
                None => shard.remove(hash, key),
            }
            self.note_room(slot, &shard);
        }
    }

    /// Drops the cached envelopes of `keys`, which a sweep removed from redb, once redb
    /// serves that: a read that began before caches nothing (the generation).
    pub(crate) fn forget<'k>(&self, keys: impl IntoIterator<Item = &'k Vec<u8>>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.shard_budget == 0 {
            return;
        }
        for key in keys {
            let Some((hash, slot)) = self.shard(key) else {
                continue;
            };
            let mut shard = slot.shard.write();
            shard.remove(hash, key);
            self.note_room(slot, &shard);
        }
    }

    /// Bytes held (keys, envelopes and overhead).
    pub(crate) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.shard.read().bytes).sum()
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
    fn reads_fill_a_cache_with_room_at_once_and_a_full_one_by_sampling() {
        let budget = SHARDS * 8 * ROOM;
        let cache = ReadCache::new(budget);
        let value = vec![7u8; 200];
        // While its shard has room, the first read of a key caches it.
        for i in 0..64u32 {
            cache.fill(&i.to_be_bytes(), &value, cache.generation());
            assert!(cache.get(&i.to_be_bytes()).is_some(), "{i}");
        }
        // Once every shard is full, most one-off reads are not admitted.
        for i in 64..100_000u32 {
            cache.fill(&i.to_be_bytes(), &value, cache.generation());
        }
        assert!(
            cache
                .shards
                .iter()
                .all(|s| !s.has_room.load(Ordering::Relaxed))
        );
        let admitted = (200_000..201_000u32)
            .filter(|i| {
                cache.fill(&i.to_be_bytes(), &value, cache.generation());
                cache.get(&i.to_be_bytes()).is_some()
            })
            .count();
        assert!(admitted < 1000 / 4, "{admitted}");
        assert!(cache.bytes() <= budget);
    }

    #[test]
    fn keys_sharing_a_hash_never_answer_for_each_other() {
        let mut shard = Shard::default();
        let budget = 1 << 20;
        shard.insert(42, b"a", Arc::from(&b"one"[..]), budget);
        assert_eq!(shard.get(42, b"a").as_deref(), Some(&b"one"[..]));
        assert!(shard.get(42, b"b").is_none());
        shard.insert(42, b"b", Arc::from(&b"two"[..]), budget);
        assert!(shard.get(42, b"a").is_none());
        assert_eq!(shard.get(42, b"b").as_deref(), Some(&b"two"[..]));
        assert_eq!(shard.bytes, Shard::charge(b"b", b"two"));
        // Removing a key the slot no longer holds leaves the other one.
        shard.remove(42, b"a");
        assert_eq!(shard.get(42, b"b").as_deref(), Some(&b"two"[..]));
        shard.remove(42, b"b");
        assert!(shard.get(42, b"b").is_none());
        assert_eq!(shard.bytes, 0);
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
        for slot in cache.shards.iter() {
            let shard = slot.shard.read();
            assert!(shard.order.len() <= 2 * shard.map.len() + 1024 + 1);
        }
        let off = ReadCache::new(0);
        off.fill_now(b"a", b"x", off.generation());
        assert!(off.get(b"a").is_none());
    }
}
