//! The write-ahead-log implementation of the storage seam (format 2): a log file in front of
//! the redb tables, a record map in memory, and a checkpointer thread.
//!
//! - **Write**: a batch collects its changes in a [`Layer`]; the commit appends the layer to
//!   the log ([`log`]: one write, and one `sync_data` for a durable batch), then lays it over
//!   the map's *active* layer. Readers see a batch only after that, so never before its sync.
//! - **Read**: the active layer, then the *frozen* one (being checkpointed), then redb.
//! - **Checkpoint**: the active layer is frozen (under the writer's lock, so between batches),
//!   written into redb in one durable transaction that records the last LSN it covers, and
//!   then dropped; only then are the log segments it covered recycled. It runs every
//!   `checkpoint_interval`, when the active layer passes half the memory budget, and when the
//!   log has no free segment. When the active layer reaches half the budget while a checkpoint
//!   is still running, the writer waits for it (back-pressure): the map stays within the
//!   budget, plus one batch.
//! - **Recovery**: open redb, replay the log's batches after the checkpoint LSN into the active
//!   layer ([`log::Log::recover`]), resume tokens above both.
//! - **Sweep**: due records only redb holds are removed from it directly, in a transaction of
//!   the sweep's own ([`Inner::sweep_base`]); the log carries the removed keys and their
//!   scopes' counts, the map only marks the keys removed until redb shows them gone. Due
//!   records the map holds (not yet checkpointed) are swept by the writer like any change.
//!
//! A failed log write or sync fails its batch as outcome unknown and the store stops writing
//! (no retried fsync); a failed checkpoint loses nothing (the log still holds every batch, and
//! the frozen layer stays readable) and also stops writes until the store is reopened, which
//! replays the log.

pub(crate) mod cache;
pub(crate) mod layer;
pub(crate) mod log;
pub(crate) mod sync_times;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::core::admin::Swept;
use crate::core::record::Record;
use crate::engine::apply::scope_of;
use crate::engine::codec;
use crate::engine::storage::redb::{RedbStorage, SweepStart};
use crate::engine::storage::{Batch, Counts, Storage, Stored};
use crate::engine::telemetry::Telemetry;
use crate::error::{Error, Input, Result};
use cache::ReadCache;
use layer::{Layer, Lookup};
use log::{AppendError, Geometry, Log, Recovered};
use sync_times::SyncTimes;

/// How a store's write-ahead log behaves.
#[derive(Debug, Clone)]
pub(crate) struct WalConfig {
    /// The longest time a change stays in the map before a checkpoint writes it into redb
    /// (zero: a checkpoint after every batch).
    pub checkpoint_interval: Duration,
    /// The map's memory budget in bytes: a checkpoint starts at half of it, and writers wait
    /// past it.
    pub memory_budget: usize,
    /// How often the checkpointer verifies every page checksum of the database file (`None`:
    /// never; the first one comes one interval after open).
    pub scrub_interval: Option<Duration>,
    /// The read cache's budget in bytes (0: no cache).
    pub read_cache_bytes: usize,
    /// Where checkpoints, scrubs, the log's syncs and its figures are reported.
    pub telemetry: Telemetry,
}

/// The write-ahead log's figures in [`Stats::wal`](crate::Stats::wal): how far checkpoints
/// trail the log, and the memory and log space that takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalStats {
    /// Bytes of records and index entries held in memory until a checkpoint writes them,
    /// and the room the next layer keeps reserved for as many records as the last one held
    /// (so it stays above zero on an idle store that has written anything).
    pub map_bytes: u64,
    /// Bytes held by the read cache of records checkpointed or read recently
    /// ([`StoreBuilder::read_cache`](crate::StoreBuilder::read_cache)).
    pub cache_bytes: u64,
    /// Bytes of log segments holding batches no checkpoint covers yet.
    pub log_bytes: u64,
    /// Batches committed since the last completed checkpoint (the checkpoint lag).
    pub checkpoint_lag_batches: u64,
    /// Log bytes appended since what the last completed checkpoint covers.
    pub checkpoint_lag_bytes: u64,
    /// Milliseconds since the map last held nothing to checkpoint (a checkpoint completed, or
    /// the checkpointer, which looks every `checkpoint_interval`, found nothing waiting): at
    /// most how long the oldest change not yet in the database file has waited. An idle store
    /// shows up to one interval.
    pub checkpoint_lag_ms: u64,
    /// Checkpoints completed since open.
    pub checkpoints: u64,
    /// How long the last checkpoint took, in milliseconds.
    pub last_checkpoint_ms: u64,
    /// Background verifications of every page checksum of the database file (the scrub,
    /// [`StoreBuilder::scrub_interval`](crate::StoreBuilder::scrub_interval)) completed since
    /// open, damaged files included.
    pub scrubs: u64,
    /// Scrubs that found the database file damaged (each is also logged as an error).
    pub scrubs_failed: u64,
    /// How long the last scrub took, in milliseconds.
    pub last_scrub_ms: u64,
    /// Syncs of the log since open (one per durable batch, and one per flush of `Relaxed`
    /// batches).
    pub log_syncs: u64,
    /// The 99th percentile of the log's sync durations since open, in microseconds (the upper
    /// bound of a histogram bucket: within 19 % above the true value). Checkpoints write into
    /// the database file beside the log; this shows whether that slows the syncs callers wait
    /// for.
    pub log_sync_p99_us: u64,
    /// The longest sync of the log since open, in microseconds.
    pub log_sync_max_us: u64,
    /// Sweeps committed beside the writer since open: [`Store::sweep`](crate::Store::sweep)
    /// calls and rounds of the background sweeper that removed records from the database
    /// file directly, in a transaction of their own. The others found a due record still in
    /// the map (written since the last checkpoint) and went through the writer.
    pub detached_sweeps: u64,
}

#[derive(Default)]
struct Layers {
    active: Layer,
    frozen: Option<Arc<Layer>>,
    /// The keys of records a sweep of redb removes, by sweep, from just before its commit
    /// until redb and the read cache show them removed: read as removed, below the layers.
    swept: Vec<(u64, Arc<HashSet<Vec<u8>>>)>,
}

#[derive(Default)]
struct Control {
    /// A frozen layer waits to be written.
    requested: bool,
    /// The log's appended bytes when the pending frozen layer was frozen, and as of what the
    /// last completed checkpoint covers.
    frozen_at_bytes: u64,
    checkpointed_bytes: u64,
    stop: bool,
    checkpoints: u64,
    last_checkpoint_ms: u64,
    scrubs: u64,
    scrubs_failed: u64,
    last_scrub_ms: u64,
}

struct Inner {
    base: RedbStorage,
    /// Records checkpointed or read recently, below the map's layers.
    cache: ReadCache,
    /// The log and the writer's lock: held for a whole batch, and to freeze the active layer.
    /// Released fairly (to the longest waiter) by the writer and by sweeps of redb.
    log: Mutex<Log>,
    layers: RwLock<Layers>,
    /// Held (write) by a checkpoint from its redb commit until it drops the frozen layer, and
    /// (read) by whole-store reads that combine the map with redb.
    gate: RwLock<()>,
    control: Mutex<Control>,
    /// Signalled when a checkpoint is requested, ends, or the store stops.
    changed: Condvar,
    checkpoint_lsn: AtomicU64,
    next_token: AtomicU64,
    last_checkpoint_at: Mutex<Instant>,
    last_scrub_at: Mutex<Instant>,
    /// The log's live segments, next LSN and appended bytes after the last batch, for
    /// `Stats` while the writer holds the log.
    log_figures: Mutex<(u64, u64, u64)>,
    failed: Mutex<Option<Error>>,
    /// How long the log's syncs took (shared with the log).
    sync_times: Arc<SyncTimes>,
    /// Sweeps of redb committed since open ([`Inner::sweep_base`]).
    base_sweeps: AtomicU64,
    /// Names each sweep's keys in [`Layers::swept`].
    sweep_ids: AtomicU64,
    /// The sweep's floor: every expiry-index entry at or below it is removed, in the map or in
    /// redb, so the next sweep starts its walk of the index after it instead of stepping over
    /// everything earlier sweeps removed since the last checkpoint. `None`: from the start.
    sweep_floor: Mutex<Option<ExpiryEntry>>,
    config: WalConfig,
    geometry: Geometry,
}

/// The log file of the store whose database file is at `path`: `<path>.wal`.
pub(crate) fn log_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

/// The error for a format-2 store whose log file at `log` is missing: the batches its last
/// checkpoint did not cover may have been in it, so the store is not read without it.
pub(crate) fn missing_log(log: &Path) -> Error {
    Error::corrupt(
        "write-ahead log",
        format!(
            "{} is missing: the store's latest batches may be in it",
            log.display()
        ),
    )
}

/// The batches a recovery found, laid over each other in LSN order into one layer (whose
/// `last_lsn` is the last batch's), and the next fencing token: the larger of `next_token`
/// (the database file's) and the highest one a batch carried.
pub(crate) fn replay(
    recovered: &Recovered,
    next_token: u64,
    in_base: &dyn Fn(u64, &[u8]) -> Result<bool>,
) -> Result<(Layer, u64)> {
    let mut active = Layer::default();
    for (lsn, payload) in &recovered.batches {
        let mut batch = Layer::decode(payload)?;
        batch.last_lsn = *lsn;
        // A batch that only removes (a sweep of redb's, or forgets) may have been made in
        // redb already by a sweep's commit that a later checkpoint made durable: an index
        // entry it removes that is neither in redb nor added by an earlier batch is not
        // counted as removed again.
        if batch.records.values().all(Option::is_none) {
            for ((at, key), present) in &batch.expiry {
                if !*present
                    && active.expiry.get(&(*at, key.clone())) != Some(&true)
                    && !in_base(*at, key)?
                {
                    batch.expiry_delta += 1;
                }
            }
        }
        active.absorb(batch);
    }
    let next_token = next_token.max(recovered.next_token.unwrap_or(0));
    // The batches' payloads do not carry the next token (their chunk headers do): the replayed
    // layer takes it over, so that the checkpoint that moves these batches into redb also
    // records it there.
    if !recovered.batches.is_empty() {
        active.next_token = Some(next_token);
    }
    Ok((active, next_token))
}

/// The storage: redb behind a write-ahead log and a record map.
pub(crate) struct WalStorage {
    inner: Arc<Inner>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

impl WalStorage {
    /// Replays `log_file` over `base` (whose checkpoint LSN is `checkpoint_lsn`) and starts
    /// the checkpointer. Returns the storage and the next fencing token to use.
    pub(crate) fn open(
        base: RedbStorage,
        log_file: Box<dyn redb::StorageBackend>,
        geometry: Geometry,
        store_id: u64,
        checkpoint_lsn: u64,
        next_token: u64,
        config: WalConfig,
    ) -> Result<(WalStorage, u64)> {
        let (mut log, recovered) = Log::recover(log_file, geometry, store_id, checkpoint_lsn)?;
        log.report_to(config.telemetry.clone());
        let (active, next_token) = replay(&recovered, next_token, &|at, key| {
            base.has_expiry_entry(at, key)
        })?;
        if !recovered.batches.is_empty() {
            tracing::info!(
                batches = recovered.batches.len(),
                checkpoint_lsn,
                "replayed the write-ahead log"
            );
        }
        let log_figures = log.figures(checkpoint_lsn);
        let sync_times = log.sync_times();
        let inner = Arc::new(Inner {
            base,
            cache: ReadCache::new(config.read_cache_bytes),
            log: Mutex::new(log),
            layers: RwLock::new(Layers {
                active,
                frozen: None,
                swept: Vec::new(),
            }),
            gate: RwLock::new(()),
            control: Mutex::new(Control::default()),
            changed: Condvar::new(),
            checkpoint_lsn: AtomicU64::new(checkpoint_lsn),
            next_token: AtomicU64::new(next_token),
            last_checkpoint_at: Mutex::new(Instant::now()),
            last_scrub_at: Mutex::new(Instant::now()),
            log_figures: Mutex::new(log_figures),
            failed: Mutex::new(None),
            sync_times,
            base_sweeps: AtomicU64::new(0),
            sweep_ids: AtomicU64::new(0),
            sweep_floor: Mutex::new(None),
            config,
            geometry,
        });
        let worker = Arc::clone(&inner);
        let checkpointer = std::thread::Builder::new()
            .name("idemstore-checkpointer".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(Error::from_io)?;
        Ok((
            WalStorage {
                inner,
                checkpointer: Mutex::new(Some(checkpointer)),
            },
            next_token,
        ))
    }

    /// Figures for `Stats`.
    pub(crate) fn figures(&self) -> WalStats {
        self.inner.figures()
    }
}

impl Drop for WalStorage {
    /// Stops the checkpointer after a last checkpoint, so that the next open replays nothing.
    fn drop(&mut self) {
        self.inner.control.lock().stop = true;
        self.inner.changed.notify_all();
        if let Some(handle) = self.checkpointer.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Inner {
    fn failure(&self) -> Option<Error> {
        self.failed.lock().clone()
    }

    fn fail(&self, e: &Error) {
        let mut failed = self.failed.lock();
        if failed.is_none() {
            *failed = Some(e.clone());
        }
        drop(failed);
        self.changed.notify_all();
    }

    /// The record under `key` in the map, the read cache or, failing those, in redb. `fill`:
    /// what is found in redb may enter the read cache (see [`Inner::read_below_map`]).
    fn read(&self, key: &[u8], fill: bool) -> Result<Option<Stored>> {
        match self.map_lookup(key) {
            Lookup::Found(bytes) => Ok(Some(codec::decode(key, &bytes))),
            Lookup::Removed => Ok(None),
            Lookup::Unknown => self.read_below_map(key, fill),
        }
    }

    /// What the map's layers (active, then frozen) say about `key`.
    fn map_lookup(&self, key: &[u8]) -> Lookup {
        let layers = self.layers.read();
        let frozen = layers.frozen.as_deref();
        for layer in std::iter::once(&layers.active).chain(frozen) {
            match layer.lookup(key) {
                Lookup::Unknown => {}
                found => return found,
            }
        }
        if layers.swept.iter().any(|(_, keys)| keys.contains(key)) {
            return Lookup::Removed;
        }
        Lookup::Unknown
    }

    /// Whether a layer of the map (active or frozen) changed the record under `key`.
    fn map_holds(&self, key: &[u8]) -> bool {
        let layers = self.layers.read();
        let frozen = layers.frozen.as_deref();
        std::iter::once(&layers.active)
            .chain(frozen)
            .any(|l| l.holds(key))
    }

    /// Whether a layer of the map holds an expiry-index entry due at `now_ms`.
    fn map_has_due(&self, now_ms: u64) -> bool {
        let upto = (now_ms.saturating_add(1), Vec::new());
        let layers = self.layers.read();
        let frozen = layers.frozen.as_deref();
        std::iter::once(&layers.active)
            .chain(frozen)
            .any(|l| l.expiry.range(..&upto).any(|(_, present)| *present))
    }

    /// The record under `key` in the read cache or redb, for a key the map does not hold.
    /// `fill`: a record found in redb may enter the cache. Callers' reads fill it; a commit's
    /// own reads do not: the key is about to change (its new version reaches the cache with
    /// the checkpoint that writes it) or, for a sweep, to go, and caching it would only evict
    /// records that replays read.
    fn read_below_map(&self, key: &[u8], fill: bool) -> Result<Option<Stored>> {
        // A frozen layer is dropped only after redb serves its changes and the cache holds
        // them, so a key it held is found there now.
        if let Some(bytes) = self.cache.get(key) {
            return Ok(Some(codec::decode(key, &bytes)));
        }
        let generation = fill.then(|| self.cache.generation());
        self.base.read_with(key, |bytes| {
            let stored = codec::decode(key, bytes);
            if let Some(generation) = generation
                && stored.is_ok()
            {
                self.cache.fill(key, bytes, generation);
            }
            stored
        })
    }

    fn scope_records(&self, scope: &[u8]) -> Result<u64> {
        {
            let layers = self.layers.read();
            if let Some(count) = layers.active.scopes.get(scope) {
                return Ok(*count);
            }
            if let Some(count) = layers.frozen.as_ref().and_then(|f| f.scopes.get(scope)) {
                return Ok(*count);
            }
        }
        self.base.scope_records(scope)
    }

    /// Freezes the active layer if it holds anything and no checkpoint is pending; with the
    /// writer's lock held (`_log`), so between batches. `more`: writes go on, so the next
    /// active layer starts with room for as many records (not when the store closes).
    fn freeze(&self, log: &Log, more: bool) -> bool {
        let mut layers = self.layers.write();
        if layers.frozen.is_some() || layers.active.is_empty() {
            return false;
        }
        let next = if more {
            Layer::sized_like(&layers.active)
        } else {
            Layer::default()
        };
        let mut active = std::mem::replace(&mut layers.active, next);
        // Earlier layers are all in redb by now, so below the floor redb holds only entries
        // this layer removes.
        active.swept_upto = self.sweep_floor.lock().clone();
        layers.frozen = Some(Arc::new(active));
        drop(layers);
        let mut control = self.control.lock();
        control.requested = true;
        control.frozen_at_bytes = log.appended_bytes();
        drop(control);
        self.changed.notify_all();
        true
    }

    /// Waits until no frozen layer is pending (the checkpoint ended) or the store failed.
    fn wait_for_checkpoint(&self) -> Result<()> {
        let mut control = self.control.lock();
        loop {
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if self.layers.read().frozen.is_none() {
                return Ok(());
            }
            self.changed
                .wait_for(&mut control, Duration::from_millis(100));
        }
    }

    /// Makes room in the log, with the writer's lock held: the log has none. First waits for a
    /// running checkpoint (the segments it covers are then free, which is often enough);
    /// with `all`, also checkpoints everything written since.
    fn make_room(&self, log: &Log, all: bool) -> Result<()> {
        self.wait_for_checkpoint()?;
        if all && self.freeze(log, true) {
            self.wait_for_checkpoint()?;
        }
        Ok(())
    }

    fn write(
        &self,
        durable: bool,
        apply: &mut dyn FnMut(&mut dyn Batch) -> Result<()>,
    ) -> Result<bool> {
        let mut log = self.log.lock();
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let floor = self.sweep_floor.lock().clone();
        let mut batch = WalBatch::new(self, floor);
        apply(&mut batch)?;
        let new_floor = batch.floor_after();
        let wrote = !batch.layer.is_empty();
        let committed = self
            .commit_locked(&mut log, batch.layer, durable, new_floor)
            .map(|()| wrote);
        // Handed straight to a sweep of redb waiting to mark its keys, if there is one: the
        // writer takes the lock back for its next batch so fast that a plain unlock lets it
        // win again and again, and the sweep would give up.
        MutexGuard::unlock_fair(log);
        committed
    }

    /// Appends `layer` to the log and lays it over the map, with the writer's lock held
    /// (`log`); `new_floor` replaces the sweep floor once it is logged.
    fn commit_locked(
        &self,
        log: &mut Log,
        mut layer: Layer,
        durable: bool,
        new_floor: Option<ExpiryEntry>,
    ) -> Result<()> {
        if layer.is_empty() {
            // Nothing to log: a durable empty batch is a flush of what was written unsynced.
            if durable {
                log.sync().map_err(|e| {
                    self.fail(&e);
                    outcome_unknown(e)
                })?;
            }
            return Ok(());
        }
        let payload = layer.encode();
        // More than the log always takes: refused before anything is written, so the store
        // goes on (the writer fills batches within this bound, so only a lone command can
        // get here: one keeping a record stored earlier under larger limits, say).
        let max = self.geometry.batch_bytes_max();
        if payload.len() as u64 > max {
            return Err(Error::TooLarge {
                what: Input::Record,
                actual: payload.len() as u64,
                limit: max,
            });
        }
        let token = layer
            .next_token
            .unwrap_or_else(|| self.next_token.load(Ordering::SeqCst));
        // Tries: 0 as is, 1 after the running checkpoint, 2 after one of everything.
        let mut tries = 0;
        let lsn = loop {
            let checkpoint_lsn = self.checkpoint_lsn.load(Ordering::SeqCst);
            match log.append(&payload, token, durable, checkpoint_lsn) {
                Ok(lsn) => break lsn,
                Err(AppendError::Full) if tries < 2 => {
                    self.make_room(log, tries == 1)?;
                    tries += 1;
                }
                Err(AppendError::Full) => {
                    let e = Error::Internal(format!(
                        "a batch of {} bytes does not fit in the write-ahead log",
                        payload.len()
                    ));
                    self.fail(&e);
                    return Err(e);
                }
                Err(AppendError::Failed(e)) => {
                    self.fail(&e);
                    return Err(outcome_unknown(e));
                }
            }
        };
        self.next_token.store(token, Ordering::SeqCst);
        *self.sweep_floor.lock() = new_floor;
        *self.log_figures.lock() = log.figures(self.checkpoint_lsn.load(Ordering::SeqCst));
        layer.last_lsn = lsn;
        let (bytes, frozen) = {
            let mut layers = self.layers.write();
            layers.active.absorb(layer);
            (layers.active.bytes, layers.frozen.is_some())
        };
        // Each layer is frozen once it holds half the budget, so the two together stay within
        // it (plus one batch): past that, the writer waits for the running checkpoint.
        let half = self.config.memory_budget / 2;
        if bytes >= half || self.config.checkpoint_interval.is_zero() {
            if frozen && bytes >= half {
                // Back-pressure: the checkpointer is behind; wait for it before taking more.
                self.wait_for_checkpoint()?;
            }
            self.freeze(log, true);
        }
        Ok(())
    }

    /// Removes up to `limit` records due at `now_ms` that only redb holds, from redb itself
    /// (see `storage::redb::sweep`); `None` if the map holds a due record (or the writer's lock
    /// could not be had at once): the writer sweeps then.
    ///
    /// A batch decides whether a record exists, and counts its scope, from what it reads:
    /// the map, then the read cache, then redb. So that none sees a record the sweep removes
    /// with its scope counted as of after the removal (one record short), the removed keys are
    /// marked removed in the map under the writer's lock, between two batches, before the
    /// commit; they leave the map only after redb shows them gone and the read cache dropped
    /// them. A record a batch changed meanwhile (the map holds it) is put back first.
    fn sweep_base(&self, now_ms: u64, limit: usize) -> Result<Option<Swept>> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if self.map_has_due(now_ms) {
            return Ok(None);
        }
        let floor = self.sweep_floor.lock().clone();
        // As a checkpoint: no whole-store read combines the map with redb meanwhile, and no
        // checkpoint commits between this one's start and its keys leaving the map.
        let gate = self.gate.write();
        let held = |key: &[u8]| self.map_holds(key);
        let mut sweep = match self
            .base
            .sweep_begin(now_ms, floor.as_ref(), limit, &held)?
        {
            SweepStart::Nothing { more } => {
                return Ok(Some(Swept {
                    visited: 0,
                    removed: 0,
                    more,
                }));
            }
            SweepStart::Held => return Ok(None),
            SweepStart::Open(sweep) => sweep,
        };
        // Never wait long for the writer's lock: the writer may hold it while it waits for a
        // checkpoint, which waits for this transaction.
        let Some(mut log) = self.log.try_lock_for(Duration::from_millis(5)) else {
            sweep.abort()?;
            return Ok(None);
        };
        if let Some(e) = self.failure() {
            drop(log);
            sweep.abort()?;
            return Err(e);
        }
        if let Err(e) = sweep.put_back(&held) {
            drop(log);
            sweep.abort()?;
            return Err(e);
        }
        // The removals go into the log too (not into the map: the marks below stand for them
        // until redb shows them). A batch logged after them was decided with them made, so
        // a replay must see them made, whether or not the sweep's commit (not durable)
        // survived a crash. So do the counts of their scopes, taken with the records present
        // (from the map, or from redb, which no commit changes meanwhile): they lose them, in
        // the log and in the active layer, as redb's will at the commit.
        let mut logged = Layer::default();
        let mut gone: HashMap<&[u8], u64> = HashMap::new();
        for (key, at) in sweep.removals() {
            logged.set_record(key, None);
            logged.set_expiry(at, key, false);
            *gone.entry(scope_of(key)).or_default() += 1;
        }
        for (scope, n) in gone {
            let count = match self.scope_records(scope) {
                Ok(count) => count,
                Err(e) => {
                    drop(log);
                    sweep.abort()?;
                    return Err(e);
                }
            };
            logged.set_scope(scope, count.saturating_sub(n));
        }
        let keys: Arc<HashSet<Vec<u8>>> =
            Arc::new(sweep.removals().map(|(key, _)| key.to_vec()).collect());
        if !keys.is_empty() {
            let checkpoint_lsn = self.checkpoint_lsn.load(Ordering::SeqCst);
            let token = self.next_token.load(Ordering::SeqCst);
            // Not synced: the next durable batch's sync covers it, before anything decided
            // with it is acknowledged.
            match log.append(&logged.encode(), token, false, checkpoint_lsn) {
                Ok(lsn) => {
                    *self.log_figures.lock() = log.figures(checkpoint_lsn);
                    logged.last_lsn = lsn;
                }
                Err(AppendError::Full) => {
                    // Making room waits for a checkpoint, which waits for this sweep.
                    drop(log);
                    sweep.abort()?;
                    return Ok(None);
                }
                Err(AppendError::Failed(e)) => {
                    self.fail(&e);
                    drop(log);
                    sweep.abort()?;
                    return Err(outcome_unknown(e));
                }
            }
        }
        let id = self.sweep_ids.fetch_add(1, Ordering::Relaxed);
        {
            let mut layers = self.layers.write();
            if !logged.scopes.is_empty() {
                // As a batch's counts: the checkpoint of the active layer then covers this
                // batch too (its removals are in redb before that checkpoint commits).
                let active = &mut layers.active;
                for (scope, count) in &logged.scopes {
                    active.set_scope(scope, *count);
                }
                active.last_lsn = active.last_lsn.max(logged.last_lsn);
            }
            layers.swept.push((id, Arc::clone(&keys)));
        }
        MutexGuard::unlock_fair(log);
        let swept = sweep.commit();
        if let Err(e) = &swept {
            // The keys stay marked removed: their records are expired, whatever redb holds.
            self.fail(e);
        }
        let swept = swept?;
        self.cache.forget(keys.iter());
        self.layers.write().swept.retain(|(i, _)| *i != id);
        drop(gate);
        self.base_sweeps.fetch_add(1, Ordering::Relaxed);
        Ok(Some(swept))
    }

    fn run_checkpointer(&self) {
        loop {
            let stop = {
                let mut control = self.control.lock();
                if !control.requested && !control.stop {
                    let timeout = self
                        .config
                        .checkpoint_interval
                        .max(Duration::from_millis(1));
                    self.changed.wait_for(&mut control, timeout);
                }
                control.requested = false;
                control.stop
            };
            if self.failure().is_some() {
                if stop {
                    return;
                }
                continue;
            }
            if self.layers.read().frozen.is_none() {
                let due =
                    self.last_checkpoint_at.lock().elapsed() >= self.config.checkpoint_interval;
                // Never wait for the writer's lock here: the writer may hold it while it waits
                // for this thread (back-pressure, or a full log), having frozen a layer since
                // the check above. Without the lock, the loop comes round and checkpoints
                // whatever the writer froze.
                if (due || stop) && !self.layers.read().active.is_empty() {
                    match self.log.try_lock_for(Duration::from_millis(5)) {
                        Some(log) => {
                            self.freeze(&log, !stop);
                        }
                        // Try again at once rather than after another interval.
                        None => self.control.lock().requested = true,
                    }
                }
            }
            let frozen = self.layers.read().frozen.clone();
            if let Some(frozen) = frozen {
                self.checkpoint(&frozen);
            } else if self.layers.read().active.is_empty() {
                // Nothing waits to be checkpointed: no lag to report, and the interval restarts.
                *self.last_checkpoint_at.lock() = Instant::now();
            }
            self.config.telemetry.wal_figures(&self.figures());
            if stop && self.layers.read().frozen.is_none() && self.layers.read().active.is_empty() {
                // Sweeps since the last checkpoint reach the disk before the store closes.
                // (The writer has stopped: the log's lock is free.)
                let synced = {
                    let mut log = self.log.lock();
                    log.sync().map(|()| log.next_lsn().saturating_sub(1))
                };
                if let Err(e) = synced.and_then(|lsn| self.base.sync_sweeps(lsn)) {
                    tracing::error!(error = %e, "idemstore: the sweeps since the last checkpoint could not be made durable; they will be swept again");
                    self.fail(&e);
                }
                return;
            }
            if !stop {
                self.scrub_if_due();
            }
        }
    }

    /// Verifies every page checksum of the database file when a scrub is due. It runs on the
    /// checkpointer's thread, so no checkpoint runs meanwhile: commits go on into the map,
    /// and wait only if it fills (see `StoreBuilder::scrub_interval`).
    fn scrub_if_due(&self) {
        let Some(interval) = self.config.scrub_interval else {
            return;
        };
        if self.last_scrub_at.lock().elapsed() < interval {
            return;
        }
        let started = Instant::now();
        let result = self.base.verify_pages();
        let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        *self.last_scrub_at.lock() = Instant::now();
        let failed = match &result {
            Ok(_) => {
                self.config.telemetry.scrubbed("ok");
                false
            }
            Err(e @ Error::Corrupt { .. }) => {
                tracing::error!(error = %e, "idemstore: the scrub found the database file damaged; restore it from a backup or inspect it (`idemstore verify`)");
                self.config.telemetry.scrubbed("damaged");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "idemstore: the scrub could not read the database file");
                self.config.telemetry.scrubbed("unreadable");
                true
            }
        };
        let mut control = self.control.lock();
        control.scrubs += 1;
        control.scrubs_failed += u64::from(failed);
        control.last_scrub_ms = elapsed;
    }

    /// Writes the frozen layer into redb, then drops it.
    fn checkpoint(&self, frozen: &Layer) {
        let started = Instant::now();
        let span = tracing::debug_span!("idemstore.checkpoint", bytes = frozen.bytes);
        let _entered = span.enter();
        let gate = self.gate.write();
        if let Err(e) = self.base.checkpoint(frozen, frozen.last_lsn) {
            drop(gate);
            tracing::error!(error = %e, "a checkpoint failed; the store accepts no more writes until reopened (the log keeps every acknowledged batch)");
            self.config.telemetry.checkpoint_failed();
            self.fail(&e);
            return;
        }
        self.cache.apply(frozen);
        self.layers.write().frozen = None;
        self.checkpoint_lsn.store(frozen.last_lsn, Ordering::SeqCst);
        drop(gate);
        *self.last_checkpoint_at.lock() = Instant::now();
        self.config.telemetry.checkpointed(started.elapsed());
        {
            let mut control = self.control.lock();
            control.checkpoints += 1;
            control.checkpointed_bytes = control.frozen_at_bytes;
            control.last_checkpoint_ms =
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        self.changed.notify_all();
    }

    fn figures(&self) -> WalStats {
        let map_bytes = {
            let layers = self.layers.read();
            layers.active.bytes + layers.frozen.as_ref().map_or(0, |f| f.bytes)
        };
        let checkpoint_lsn = self.checkpoint_lsn.load(Ordering::SeqCst);
        // Not waiting for the writer's lock, which it holds through a batch's sync and while it
        // waits for a checkpoint: the figures as of its last batch then do.
        let (live_segments, next_lsn, appended) = match self.log.try_lock() {
            Some(log) => log.figures(checkpoint_lsn),
            None => *self.log_figures.lock(),
        };
        let (log_syncs, log_sync_p99_us, log_sync_max_us) = self.sync_times.summary(0.99);
        let control = self.control.lock();
        WalStats {
            map_bytes: map_bytes as u64,
            cache_bytes: self.cache.bytes() as u64,
            log_bytes: live_segments * self.geometry.segment_bytes,
            checkpoint_lag_batches: next_lsn.saturating_sub(checkpoint_lsn + 1),
            checkpoint_lag_bytes: appended.saturating_sub(control.checkpointed_bytes),
            checkpoint_lag_ms: u64::try_from(self.last_checkpoint_at.lock().elapsed().as_millis())
                .unwrap_or(u64::MAX),
            checkpoints: control.checkpoints,
            last_checkpoint_ms: control.last_checkpoint_ms,
            scrubs: control.scrubs,
            scrubs_failed: control.scrubs_failed,
            last_scrub_ms: control.last_scrub_ms,
            log_syncs,
            log_sync_p99_us,
            log_sync_max_us,
            detached_sweeps: self.base_sweeps.load(Ordering::Relaxed),
        }
    }

    /// The map's changes (frozen, then active over it), for whole-store reads.
    fn overlay(&self) -> Layer {
        let layers = self.layers.read();
        let mut merged = layers.frozen.as_deref().cloned().unwrap_or_default();
        merged.absorb(layers.active.clone());
        merged
    }
}

fn outcome_unknown(e: Error) -> Error {
    match e {
        e @ Error::CommitOutcomeUnknown { .. } => e,
        e => Error::CommitOutcomeUnknown {
            source: Box::new(e),
        },
    }
}

impl Storage for WalStorage {
    fn read(&self, key: &[u8]) -> Result<Option<Stored>> {
        self.inner.read(key, true)
    }

    fn scan(&self, visit: &mut dyn FnMut(&[u8], Stored) -> bool) -> Result<()> {
        let _gate = self.inner.gate.read();
        let overlay = self.inner.overlay();
        let mut changed: BTreeMap<&[u8], &Option<Arc<[u8]>>> = overlay
            .records
            .iter()
            .map(|(k, v)| (k.as_slice(), v))
            .collect();
        let mut go_on = true;
        // Emits the map's records ordered before `upto` (all of them for `None`).
        let emit_before = |upto: Option<&[u8]>,
                           changed: &mut BTreeMap<&[u8], &Option<Arc<[u8]>>>,
                           visit: &mut dyn FnMut(&[u8], Stored) -> bool|
         -> bool {
            while let Some((&k, _)) = changed.first_key_value() {
                if upto.is_some_and(|u| k >= u) {
                    break;
                }
                let (k, v) = changed.pop_first().expect("non-empty");
                if let Some(bytes) = v
                    && !visit(k, codec::decode(k, bytes))
                {
                    return false;
                }
            }
            true
        };
        self.inner.base.scan(&mut |key, stored| {
            if !emit_before(Some(key), &mut changed, visit) {
                go_on = false;
                return false;
            }
            match changed.remove(key) {
                Some(Some(bytes)) => {
                    go_on = visit(key, codec::decode(key, bytes));
                }
                Some(None) => {}
                None => go_on = visit(key, stored),
            }
            go_on
        })?;
        if go_on {
            emit_before(None, &mut changed, visit);
        }
        Ok(())
    }

    fn scope_records(&self, scope: &[u8]) -> Result<u64> {
        self.inner.scope_records(scope)
    }

    /// Records: the scopes' record counts (the map's over redb's), which the engine keeps
    /// exact. Expiry entries: redb's count plus what the map's layers add. No lookup per
    /// entry of the map, and no wait for a running checkpoint: a layer whose last batch the
    /// committed checkpoint LSN already covers is in redb's counts, and left out of the sum.
    fn counts(&self) -> Result<Counts> {
        let layers: Vec<(u64, HashMap<Vec<u8>, u64>, i64)> = {
            let layers = self.inner.layers.read();
            layers
                .frozen
                .as_deref()
                .into_iter()
                .chain(std::iter::once(&layers.active))
                .map(|l| (l.last_lsn, l.scopes.clone(), l.expiry_delta))
                .collect()
        };
        let (checkpoint_lsn, mut scopes, mut expiry_entries) =
            self.inner.base.committed_counts()?;
        for (last_lsn, layer_scopes, delta) in layers {
            if last_lsn <= checkpoint_lsn {
                continue;
            }
            scopes.extend(layer_scopes);
            expiry_entries = expiry_entries.saturating_add_signed(delta);
        }
        Ok(Counts {
            records: scopes.values().sum(),
            expiry_entries,
        })
    }

    fn write(
        &self,
        durable: bool,
        apply: &mut dyn FnMut(&mut dyn Batch) -> Result<()>,
    ) -> Result<bool> {
        self.inner.write(durable, apply)
    }

    fn release_reads(&self) {
        self.inner.base.release_reads();
    }

    fn batch_bytes_max(&self) -> Option<u64> {
        Some(self.inner.geometry.batch_bytes_max())
    }

    fn wal_figures(&self) -> Option<WalStats> {
        Some(self.figures())
    }

    fn verify_pages(&self) -> Result<Option<(u64, Duration)>> {
        self.inner.base.verify_pages()
    }

    fn sweep_base(&self, now_ms: u64, limit: usize) -> Result<Option<Swept>> {
        self.inner.sweep_base(now_ms, limit)
    }
}

/// An expiry-index entry: `(expires_at_ms, scoped key)`.
type ExpiryEntry = (u64, Vec<u8>);

/// One batch: its own changes over the map and redb.
struct WalBatch<'a> {
    inner: &'a Inner,
    layer: Layer,
    /// The sweep floor as of the batch's start (see `Inner::sweep_floor`).
    floor: Option<ExpiryEntry>,
    /// What `due` returned in this batch, in order.
    due_returned: Vec<ExpiryEntry>,
}

impl<'a> WalBatch<'a> {
    fn new(inner: &'a Inner, floor: Option<ExpiryEntry>) -> Self {
        WalBatch {
            inner,
            layer: Layer::default(),
            floor,
            due_returned: Vec::new(),
        }
    }

    /// The sweep floor once this batch commits: raised over the entries `due` returned that
    /// the batch removed, in order (every entry below them was removed already, since `due`
    /// returns the earliest ones); dropped if the batch indexed an entry at or below it. (The
    /// engine's time never goes back within an open and every expiry lies ahead of it, so that
    /// takes a zero lease or retention; the floor starts over at each open.)
    fn floor_after(&self) -> Option<ExpiryEntry> {
        let mut floor = self.floor.clone();
        for entry in &self.due_returned {
            if self.layer.expiry.get(entry) != Some(&false) {
                break;
            }
            if floor.as_ref().is_none_or(|f| entry > f) {
                floor = Some(entry.clone());
            }
        }
        let floor = floor?;
        if self
            .layer
            .expiry
            .range(..=&floor)
            .any(|(_, present)| *present)
        {
            return None;
        }
        Some(floor)
    }

    /// Up to `limit` due entries after the floor, oldest first.
    fn due_after_floor(&mut self, now_ms: u64, limit: usize) -> Result<Vec<ExpiryEntry>> {
        use std::ops::Bound;
        let upto = (now_ms.saturating_add(1), Vec::new());
        let lower = match &self.floor {
            // The clock went back behind the floor: nothing below it is left to be due.
            Some(f) if *f >= upto => return Ok(Vec::new()),
            Some(f) => Bound::Excluded(f.clone()),
            None => Bound::Unbounded,
        };
        let range = (lower, Bound::Excluded(upto));
        // The map's and this batch's word on every due entry they changed, newest last.
        let mut marks: BTreeMap<ExpiryEntry, bool> = BTreeMap::new();
        {
            let layers = self.inner.layers.read();
            let frozen = layers.frozen.as_deref();
            for layer in frozen.into_iter().chain(std::iter::once(&layers.active)) {
                for (entry, present) in layer.expiry.range(range.clone()) {
                    marks.insert(entry.clone(), *present);
                }
            }
        }
        for (entry, present) in self.layer.expiry.range(range) {
            marks.insert(entry.clone(), *present);
        }
        let committed =
            self.inner
                .base
                .due_except(now_ms, self.floor.as_ref(), limit, &|at, key| {
                    marks.contains_key(&(at, key.to_vec()))
                })?;
        let mut due: Vec<ExpiryEntry> = marks
            .into_iter()
            .filter(|(_, present)| *present)
            .map(|(entry, _)| entry)
            .take(limit)
            .chain(committed)
            .collect();
        due.sort();
        due.truncate(limit);
        Ok(due)
    }
}

impl Batch for WalBatch<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>> {
        match self.layer.lookup(key) {
            Lookup::Found(bytes) => Ok(Some(codec::decode(key, &bytes))),
            Lookup::Removed => Ok(None),
            Lookup::Unknown => self.inner.read(key, false),
        }
    }

    fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        let bytes: Arc<[u8]> = Arc::from(codec::encode(key, record));
        self.layer.set_record(key, Some(bytes));
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        // A removal of a key that is not stored is harmless: the checkpoint's remove finds
        // nothing, and counts compare with what is below.
        self.layer.set_record(key, None);
        Ok(())
    }

    fn remove_if(&mut self, key: &[u8], goes: &mut dyn FnMut(&Stored) -> bool) -> Result<bool> {
        let Some(stored) = self.get(key)? else {
            return Ok(false);
        };
        if goes(&stored) {
            self.layer.set_record(key, None);
            return Ok(true);
        }
        Ok(false)
    }

    fn index(&mut self, at_ms: u64, key: &[u8]) -> Result<()> {
        // A new entry (the engine indexes a record's new expiry), unless this batch had
        // unindexed it.
        if self.layer.set_expiry(at_ms, key, true) != Some(true) {
            self.layer.expiry_delta += 1;
        }
        Ok(())
    }

    fn unindex(&mut self, at_ms: u64, key: &[u8]) -> Result<()> {
        if self.layer.set_expiry(at_ms, key, false) != Some(false) {
            self.layer.expiry_delta -= 1;
        }
        Ok(())
    }

    fn due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let due = self.due_after_floor(now_ms, limit)?;
        self.due_returned.extend(due.iter().cloned());
        // Room for a removal of each (the batch's layer would otherwise grow by rehashing).
        self.layer.records.reserve(due.len());
        Ok(due)
    }

    fn scope_records(&mut self, scope: &[u8]) -> Result<u64> {
        if let Some(count) = self.layer.scopes.get(scope) {
            return Ok(*count);
        }
        self.inner.scope_records(scope)
    }

    fn set_scope_records(&mut self, scope: &[u8], count: u64) -> Result<()> {
        self.layer.set_scope(scope, count);
        Ok(())
    }

    fn set_next_token(&mut self, token: u64) -> Result<()> {
        self.layer.next_token = Some(token);
        Ok(())
    }
}
