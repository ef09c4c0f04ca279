//! Power loss at every sync point: a fixed workload runs on simulated disks that keep
//! written-but-unsynced data apart from the durable image (`idemstore::testkit::SimDisk`). The
//! store's disks (the database file, and the write-ahead log in the log modes) share one
//! `Recorder`, which puts every write, length change and sync of either disk, from the first
//! open to the close, in one global order (the log is written by the writer thread, the
//! database file by the checkpointer). For every sync of either disk, the image a power cut
//! during it leaves is rebuilt — for each disk, its durable image as of that point plus each of
//! its then-pending operations applied in full, dropped, or torn at 512-byte sector
//! granularity (seeded) — and a store is opened on it:
//!
//! - it opens (no failed recovery; a refused open, `Error::Corrupt` included, is a failure,
//!   except for a database file redb never finished creating before the first open returned)
//!   and answers within 20 s (a hang, e.g. a deadlock, is a failure, as is a clean run that
//!   hangs);
//! - every operation acknowledged before the cut (its return recorded at an earlier position
//!   of the global order) is present, exactly;
//! - the store holds exactly the state of some operation boundary between the last
//!   acknowledged operation and the one in progress (the workload is sequential, so no later
//!   one has started): atomic commits, nothing forgotten or swept before comes back, no
//!   acknowledged change half there;
//! - the fencing counter did not go back (the next token is above every acknowledged one) and
//!   the recovered store accepts writes.
//!
//! Four commit paths are covered: redb's default one-phase commit (checksums + one fsync),
//! `two_phase_commit(true)`, the write-ahead log with no checkpoint until the close
//! (`write_ahead_log(true)`, interval 3600 s: cuts during every sync of the log, torn chunks
//! and batch headers included), and the write-ahead log with checkpoints: a checkpoint after
//! every commit (`checkpoint_interval(Duration::ZERO)`), two 1 MiB segments, the smallest map
//! budget (`MAP_BUDGET_MIN`) and outcomes of 512 KiB to 1000 KiB, so that batches span
//! segments, the log wraps and recycles its segments (asserted: at least one recycled segment
//! and three checkpoints per run), commits wait for running checkpoints (back-pressure) or
//! for a full log, and power is cut during every sync of the checkpoints' redb transactions
//! (quick repair, two phases) as well as of the log. Default run: 3 seeds per mode (1 with
//! checkpoints, whose images are the largest); `IDEMSTORE_LONG=1` runs 24 seeds of 120 steps
//! with 3 torn variants per sync point (`IDEMSTORE_SEEDS=n` overrides the count,
//! `IDEMSTORE_SEED=s` the first seed, `IDEMSTORE_MODE=WalCheckpoints` runs only the modes whose
//! name contains it). With checkpoints the recording depends on thread timing, so a seed fixes
//! the workload and the draws but not the exact interleaving of the two disks.
//!
//! A targeted test, `a_batch_spanning_two_segments_survives_the_recycling_of_the_first`, slows
//! the database disk's syncs (30 ms) so that the log recycles the segment where a batch of
//! 700 KiB began while that batch's checkpoint still runs, and cuts power at every log sync.
//!
//! Simplification, documented: each disk is one file whose length changes (`set_len`) are
//! pending like writes until a sync, and a sync makes everything pending durable at once.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use idemstore::testkit::{self, DiskOp, Event, Fates, Recorded, Recorder, SimDisk};
use idemstore::{
    Claim, ClaimOptions, Error, ManualClock, ReadOnlyStore, Record, RecordState, Store,
};
use support::rng::Rng;
use support::workload::{self, Divergence, Driver, Effect, Id, Step};

/// The disks of a store: the database file, and its write-ahead log (the log modes).
const REDB: usize = 0;
const LOG: usize = 1;
const DISK_NAMES: [&str; 2] = ["database", "log"];

/// The log's geometry in the log modes: the smallest allowed, so that a workload fills the ring.
const SEGMENT_BYTES: u64 = 1 << 20;
const SEGMENTS: u64 = 2;

/// One clean run of the workload, with everything needed to judge a crash at any sync.
struct Recording {
    /// Every successful write, length change and sync of the store's disks, from before the
    /// first open to after the store was dropped, in the order they happened (one
    /// [`Recorder`] shared by both disks, written by the writer and the checkpointer threads).
    events: Vec<Event>,
    /// Per acknowledged boundary (0 = the open, i = after step i): the events recorded by then.
    acked_at: Vec<usize>,
    /// The physical state at each boundary.
    snapshots: Vec<BTreeMap<Id, Record>>,
    /// The store's next fencing token at each boundary.
    next_tokens: Vec<u64>,
    steps: Vec<Step>,
    /// With a log: checkpoints completed before the store was dropped.
    checkpoints: u64,
}

impl Recording {
    /// Log segments started (segment headers written) during the recording.
    fn segments_started(&self) -> u64 {
        self.events
            .iter()
            .filter(|e| match &e.call {
                Recorded::Op(DiskOp::Write { offset, data }) => {
                    e.disk == LOG && offset % SEGMENT_BYTES == 0 && data.starts_with(b"IDEMWAL\x01")
                }
                _ => false,
            })
            .count() as u64
    }

    /// Syncs of each disk.
    fn syncs(&self) -> [u64; 2] {
        let mut syncs = [0; 2];
        for e in &self.events {
            if e.call == Recorded::Sync {
                syncs[e.disk] += 1;
            }
        }
        syncs
    }
}

/// The commit paths covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// redb alone, with one-phase or two-phase commits.
    Redb { two_phase: bool },
    /// The write-ahead log, no checkpoint during the workload (the one at the close aside):
    /// crashes at every sync of the log.
    Wal,
    /// The write-ahead log, a checkpoint after every commit, two 1 MiB segments recycled, the
    /// smallest map budget, large outcomes: crashes at every sync of either disk.
    WalCheckpoints,
}

impl Mode {
    fn builder(self, clock: ManualClock) -> idemstore::StoreBuilder {
        let builder = Store::builder().clock(clock).sweep_interval(None);
        let wal = |interval| {
            builder
                .clone()
                .write_ahead_log(true)
                .wal_segment_bytes(SEGMENT_BYTES)
                .wal_segments(SEGMENTS)
                .checkpoint_interval(interval)
        };
        match self {
            Mode::Redb { two_phase } => builder.two_phase_commit(two_phase),
            Mode::Wal => wal(Duration::from_secs(3600)),
            Mode::WalCheckpoints => wal(Duration::ZERO).map_budget(idemstore::MAP_BUDGET_MIN),
        }
    }

    fn has_log(self) -> bool {
        !matches!(self, Mode::Redb { .. })
    }

    /// Opens a store of this mode on `disks` (the log disk is unused without a log).
    fn open(self, clock: ManualClock, [redb, log]: [SimDisk; 2]) -> idemstore::Result<Store> {
        if self.has_log() {
            self.builder(clock).open_with_backends(redb, log)
        } else {
            self.builder(clock).open_with_backend(redb)
        }
    }

    /// Mixed into the seed of the crash-image draws.
    fn salt(self) -> u64 {
        match self {
            Mode::Redb { two_phase } => u64::from(two_phase),
            Mode::Wal => 2,
            Mode::WalCheckpoints => 3,
        }
    }

    /// The workload of this mode: with checkpoints, outcomes of 160 KiB and more (up to 1 MiB),
    /// so that the log fills its two segments and recycles them, batches span segments, and
    /// every batch is over half the map budget (a commit during a checkpoint waits for it).
    fn steps(self, seed: u64, n: usize) -> Vec<Step> {
        let mut steps = workload::generate(seed, n);
        if self == Mode::WalCheckpoints {
            for step in &mut steps {
                if let Step::Complete { len, .. } = step {
                    *len = (512 * 1024 + *len * 32).min(1000 * 1024);
                }
            }
        }
        steps
    }
}

/// How long a recording may take before its store counts as hung (it takes about a second).
const RECORDING_HANG: Duration = Duration::from_secs(120);

/// [`record`] on a thread of its own: a store that deadlocks during the clean run is reported
/// (with the step it was running) rather than stopping the test.
fn record_or_hang(seed: u64, n_steps: usize, mode: Mode) -> Result<Recording, String> {
    let progress = Arc::new(AtomicUsize::new(0));
    let (send, receive) = std::sync::mpsc::channel();
    let progress_ = Arc::clone(&progress);
    std::thread::spawn(move || {
        let _ = send.send(record(seed, n_steps, mode, &progress_));
    });
    match receive.recv_timeout(RECORDING_HANG) {
        Ok(rec) => Ok(rec),
        Err(RecvTimeoutError::Timeout) => {
            let step = progress.load(Ordering::SeqCst);
            Err(format!(
                "the clean run hung (no end in {RECORDING_HANG:?}) at step {step} of {n_steps}"
            ))
        }
        Err(RecvTimeoutError::Disconnected) => Err("the clean run panicked (see above)".into()),
    }
}

/// Runs the workload on new disks, recording both; `progress` counts the steps done.
fn record(seed: u64, n_steps: usize, mode: Mode, progress: &AtomicUsize) -> Recording {
    let disks = [SimDisk::new(), SimDisk::new()];
    let recorder = Recorder::new();
    for (i, disk) in disks.iter().enumerate() {
        disk.record_into(&recorder, i);
    }
    let clock = ManualClock::new(workload::T0_MS);
    let store = mode
        .open(clock.clone(), disks.clone())
        .expect("a store opens on empty disks");
    let steps = mode.steps(seed, n_steps);
    let mut driver = Driver::new(seed, clock.clone());
    let mut rec = Recording {
        events: Vec::new(),
        acked_at: Vec::new(),
        snapshots: Vec::new(),
        next_tokens: Vec::new(),
        steps: steps.clone(),
        checkpoints: 0,
    };
    let boundary = |store: &Store, rec: &mut Recording| {
        rec.acked_at.push(recorder.position());
        rec.snapshots
            .push(workload::snapshot(store, &clock).expect("snapshot reads"));
        rec.next_tokens
            .push(store.stats().expect("stats read").next_token);
    };
    boundary(&store, &mut rec);
    let mut effects = Vec::new();
    for step in &steps {
        match driver.run(&store, step) {
            Ok(effect) => effects.push(effect),
            Err(e) => panic!("the clean run has no storage errors: {step:?} -> {e:?}"),
        }
        boundary(&store, &mut rec);
        progress.fetch_add(1, Ordering::SeqCst);
    }
    let effects: Vec<Effect> = effects.into_iter().collect();
    workload::check_prelude(&effects, &rec.snapshots);
    rec.checkpoints = store
        .stats()
        .expect("stats read")
        .wal
        .map_or(0, |w| w.checkpoints);
    // The close (a last checkpoint with a log) is recorded too: a power cut during it must
    // leave the state of the last step.
    drop(store);
    rec.events = recorder.finish();
    rec
}
#[derive(Debug, Default)]
struct Tally {
    images: u64,
    before_first_open: u64,
    refused_before_first_open: u64,
    failed_recoveries: u64,
    lost_acks: u64,
    resurrected: u64,
    other: u64,
    token_regressions: u64,
    hangs: u64,
    /// Images of a store with a log also read by the read-only view, and those whose view
    /// differed from the recovered store.
    views: u64,
    view_mismatches: u64,
    fates: Fates,
    failures: Vec<String>,
    open_time: Duration,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.images += other.images;
        self.before_first_open += other.before_first_open;
        self.refused_before_first_open += other.refused_before_first_open;
        self.failed_recoveries += other.failed_recoveries;
        self.lost_acks += other.lost_acks;
        self.resurrected += other.resurrected;
        self.other += other.other;
        self.token_regressions += other.token_regressions;
        self.hangs += other.hangs;
        self.views += other.views;
        self.view_mismatches += other.view_mismatches;
        self.fates.applied += other.fates.applied;
        self.fates.dropped += other.fates.dropped;
        self.fates.torn += other.fates.torn;
        self.open_time += other.open_time;
        for f in other.failures {
            self.fail(f);
        }
    }
}

/// How long a check of one image may take before the recovered store counts as hung (a
/// check takes milliseconds).
const HANG: Duration = Duration::from_secs(20);

/// [`check_image`] on a thread of its own, so that a recovered store that hangs (a deadlock)
/// is reported as a failure rather than stopping the test. Returns false if it hung; its
/// threads are then left blocked until the test process ends.
fn check_image_or_hang(
    images: [Vec<u8>; 2],
    rec: &Arc<Recording>,
    lo: Option<usize>,
    hi: usize,
    mode: Mode,
    tally: &mut Tally,
    label: &str,
) -> bool {
    let (send, receive) = std::sync::mpsc::channel();
    let (rec_, label_) = (Arc::clone(rec), label.to_string());
    std::thread::spawn(move || {
        let mut tally = Tally::default();
        check_image(images, &rec_, lo, hi, mode, &mut tally, &label_);
        let _ = send.send(tally);
    });
    match receive.recv_timeout(HANG) {
        Ok(t) => {
            tally.merge(t);
            true
        }
        Err(RecvTimeoutError::Timeout) => {
            tally.images += 1;
            tally.hangs += 1;
            tally.fail(format!(
                "{label}: the recovered store hung (no answer in {HANG:?}); the rest of this \
                 recording is not checked"
            ));
            false
        }
        Err(RecvTimeoutError::Disconnected) => {
            tally.images += 1;
            tally.failed_recoveries += 1;
            tally.fail(format!("{label}: the check panicked (see above)"));
            true
        }
    }
}

/// Opens a store on `images` (database, log) and checks it against the boundaries `lo..=hi`
/// of `rec`. `lo` is `None` when the crash came before the first open was acknowledged.
fn check_image(
    images: [Vec<u8>; 2],
    rec: &Recording,
    lo: Option<usize>,
    hi: usize,
    mode: Mode,
    tally: &mut Tally,
    label: &str,
) {
    tally.images += 1;
    if lo.is_none() {
        tally.before_first_open += 1;
    }
    let view = (mode.has_log()
        && VIEWED
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(VIEW_EVERY))
    .then(|| read_only_view(&images));
    let started = Instant::now();
    let opened = mode.open(ManualClock::new(0), images.map(SimDisk::from_image));
    tally.open_time += started.elapsed();
    let store = match opened {
        Ok(store) => store,
        Err(e) if lo.is_none() && e.to_string().contains("Not a redb database") => {
            // redb writes its magic number last when it creates a database, so a power cut
            // during the very first open leaves a file redb (and idemstore) refuses. Nothing was
            // acknowledged yet; counted and reported, not a lost write.
            tally.refused_before_first_open += 1;
            return;
        }
        Err(e) => {
            tally.failed_recoveries += 1;
            tally.fail(format!("{label}: recovery failed: {e:?}"));
            return;
        }
    };
    let found = match workload::physical(&store) {
        Ok(found) => found,
        Err(e) => {
            tally.failed_recoveries += 1;
            tally.fail(format!("{label}: a record does not read back: {e:?}"));
            return;
        }
    };
    let lo_index = lo.unwrap_or(0);
    if let Some(divergence) = workload::classify(&found, &rec.snapshots, lo_index, hi) {
        match divergence {
            Divergence::LostAck => tally.lost_acks += 1,
            Divergence::Resurrected => tally.resurrected += 1,
            Divergence::Other => tally.other += 1,
        }
        tally.fail(format!(
            "{label}: {divergence:?}: recovered {}\nallowed boundaries {lo_index}..={hi}, \
             steps {:?}",
            summarize(&found),
            rec.steps
                .get(lo_index.saturating_sub(1)..hi.min(rec.steps.len()))
        ));
        return;
    }
    // Fencing tokens never go back: the next acquisition is above every acknowledged token.
    let floor = rec.next_tokens[lo_index].max(workload::max_token(&found) + 1);
    let stats = store.stats().expect("stats");
    if let Some(view) = view {
        tally.views += 1;
        let store_sees = (stats.records, stats.next_token);
        // No store in the image (a cut during the first open): the recovered one is new.
        let agrees = match &view {
            Ok(Some(seen)) => *seen == store_sees,
            Ok(None) => lo.is_none() && stats.records == 0,
            Err(_) => false,
        };
        if !agrees {
            tally.view_mismatches += 1;
            tally.fail(format!(
                "{label}: the read-only view read (records, next token) {view:?}, the \
                 recovered store {store_sees:?}"
            ));
        }
    }
    let probe = store.claim(
        "probe",
        "p",
        "fp",
        &ClaimOptions::default().lease(Duration::from_secs(1)),
    );
    match probe {
        Ok(Claim::Acquired(lease)) if lease.token() >= floor && stats.next_token >= floor => {
            if let Err(e) = store.complete(&lease, b"ok", Duration::from_secs(60)) {
                tally.failed_recoveries += 1;
                tally.fail(format!(
                    "{label}: the recovered store refuses a write: {e:?}"
                ));
            }
        }
        Ok(Claim::Acquired(lease)) => {
            tally.token_regressions += 1;
            tally.fail(format!(
                "{label}: token {} / next_token {} after acknowledged next_token {floor}",
                lease.token(),
                stats.next_token
            ));
        }
        other => {
            tally.failed_recoveries += 1;
            tally.fail(format!(
                "{label}: probe claim on the recovered store: {other:?}"
            ));
        }
    }
}

/// One image in this many of a store with a log is also read by the read-only view.
const VIEW_EVERY: u64 = 4;
static VIEWED: AtomicU64 = AtomicU64::new(0);

/// The records stored and the next token that `ReadOnlyStore` reads in `images` (database,
/// log) written to files; `Ok(None)` if it finds no store there (a cut during the first open).
/// It replays the log in memory: it must see what the recovered store sees.
fn read_only_view(images: &[Vec<u8>; 2]) -> Result<Option<(u64, u64)>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("image.redb");
    std::fs::write(&path, &images[0]).map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("image.redb.wal"), &images[1]).map_err(|e| e.to_string())?;
    match ReadOnlyStore::open(&path) {
        Ok(view) => {
            let summary = view.summary().map_err(|e| e.to_string())?;
            Ok(Some((summary.records, summary.next_token)))
        }
        Err(Error::NotAnIdemstoreFile { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// A recovered state for a failure report: each record with its outcome's length rather than
/// its bytes (outcomes of the checkpoint mode run to hundreds of KiB).
fn summarize(found: &BTreeMap<Id, Record>) -> String {
    let lines: Vec<String> = found
        .iter()
        .map(|(id, r)| {
            let mut r = r.clone();
            if let RecordState::Completed { outcome } = &mut r.state {
                let len = outcome.len();
                outcome.truncate(24);
                return format!("{id:?}: {r:?} (outcome of {len} bytes, first 24 shown)");
            }
            format!("{id:?}: {r:?}")
        })
        .collect();
    lines.join("\n")
}

/// Checks a power cut during every sync of every disk of one recording, and one after the
/// last event. A cut during event `p` (a sync) leaves each disk its durable image as of `p`
/// plus each operation then pending on it applied, dropped or torn; every operation
/// acknowledged at a position up to `p` must be there, and the state must be a boundary
/// between the last of them and the next one (the step in progress: the workload is
/// sequential, so no later step has started).
fn sweep_sync_points(
    seed: u64,
    rec: &Arc<Recording>,
    mode: Mode,
    variants: u64,
    tally: &mut Tally,
) {
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(mode.salt()));
    let mut durable: [Vec<u8>; 2] = Default::default();
    let mut pending: [Vec<DiskOp>; 2] = Default::default();
    let mut syncs = [0u64; 2];
    let last = rec.acked_at.len() - 1;
    let mut cut = |p: usize,
                   during: Option<usize>,
                   syncs: [u64; 2],
                   durable: &[Vec<u8>; 2],
                   pending: &[Vec<DiskOp>; 2],
                   tally: &mut Tally|
     -> bool {
        let lo = rec.acked_at.iter().rposition(|&at| at <= p);
        let hi = lo.map_or(0, |lo| (lo + 1).min(last));
        let at = match during {
            Some(d) => format!(
                "event {p} (sync {} of the {} disk)",
                syncs[d] + 1,
                DISK_NAMES[d]
            ),
            None => format!("event {p} (after the last)"),
        };
        let pending_ops = [pending[REDB].len(), pending[LOG].len()];
        for v in 0..variants {
            let images = [REDB, LOG].map(|d| {
                testkit::crash_image(
                    &durable[d],
                    &pending[d],
                    &mut |n| rng.below(n),
                    &mut tally.fates,
                )
            });
            let label = format!(
                "seed {seed} {mode:?} {at} variant {v} (pending ops: database {}, log {})",
                pending_ops[REDB], pending_ops[LOG]
            );
            if !check_image_or_hang(images, rec, lo, hi, mode, tally, &label) {
                return false;
            }
        }
        // Everything pending reached the disks, just before the sync returned.
        let full = [REDB, LOG].map(|d| {
            let mut image = durable[d].clone();
            for op in &pending[d] {
                op.apply_to(&mut image);
            }
            image
        });
        let label = format!("seed {seed} {mode:?} {at} fully written");
        check_image_or_hang(full, rec, lo, hi, mode, tally, &label)
    };
    for (p, event) in rec.events.iter().enumerate() {
        let d = event.disk;
        match &event.call {
            Recorded::Op(op) => pending[d].push(op.clone()),
            Recorded::Sync => {
                if !cut(p, Some(d), syncs, &durable, &pending, tally) {
                    return;
                }
                for op in pending[d].drain(..) {
                    op.apply_to(&mut durable[d]);
                }
                syncs[d] += 1;
            }
        }
    }
    cut(rec.events.len(), None, syncs, &durable, &pending, tally);
}

/// How many seeds and steps each mode runs, and the torn variants per sync point.
struct Sizes {
    seeds: u64,
    steps: usize,
    checkpoint_seeds: u64,
    checkpoint_steps: usize,
    variants: u64,
}

#[test]
fn every_sync_point_of_a_workload_recovers_with_every_acknowledged_write() {
    let long = support::long_run();
    let sizes = Sizes {
        seeds: support::env_u64("IDEMSTORE_SEEDS", if long { 24 } else { 3 }),
        steps: if long { 120 } else { 60 },
        checkpoint_seeds: support::env_u64("IDEMSTORE_SEEDS", if long { 24 } else { 1 }),
        checkpoint_steps: if long { 120 } else { 60 },
        variants: if long { 3 } else { 1 },
    };
    let first_seed = support::env_u64("IDEMSTORE_SEED", 1);
    // `IDEMSTORE_MODE=WalCheckpoints` (any part of a mode's name) runs only the matching modes.
    let only = std::env::var("IDEMSTORE_MODE").unwrap_or_default();
    let started = Instant::now();
    let modes = [
        Mode::Redb { two_phase: false },
        Mode::Redb { two_phase: true },
        Mode::Wal,
        Mode::WalCheckpoints,
    ];
    let jobs: Vec<(Mode, u64)> = modes
        .into_iter()
        .filter(|mode| format!("{mode:?}").contains(&only))
        .flat_map(|mode| {
            let seeds = if mode == Mode::WalCheckpoints {
                sizes.checkpoint_seeds
            } else {
                sizes.seeds
            };
            (first_seed..first_seed + seeds).map(move |seed| (mode, seed))
        })
        .collect();
    // The checkpoint mode's recordings are the longest: started first.
    let jobs: Vec<(Mode, u64)> = jobs
        .iter()
        .filter(|(m, _)| *m == Mode::WalCheckpoints)
        .chain(jobs.iter().filter(|(m, _)| *m != Mode::WalCheckpoints))
        .copied()
        .collect();
    let mut tally = Tally::default();
    let mut sync_points = 0u64;
    let mut acked_ops = 0u64;
    let mut checkpoint_mode = CheckpointFigures::default();
    for (mode, seed, t, figures) in support::parallel_map(jobs, |(mode, seed)| {
        let steps = if mode == Mode::WalCheckpoints {
            sizes.checkpoint_steps
        } else {
            sizes.steps
        };
        let mut tally = Tally::default();
        let rec = match record_or_hang(seed, steps, mode) {
            Ok(rec) => Arc::new(rec),
            Err(what) => {
                tally.hangs += 1;
                tally.fail(format!("seed {seed} {mode:?}: {what}"));
                return (mode, seed, (tally, 0), CheckpointFigures::default());
            }
        };
        sweep_sync_points(seed, &rec, mode, sizes.variants, &mut tally);
        let syncs = rec.syncs();
        let figures = CheckpointFigures {
            recordings: 1,
            redb_syncs: syncs[REDB],
            log_syncs: syncs[LOG],
            segments_recycled: rec.segments_started().saturating_sub(SEGMENTS),
            checkpoints: rec.checkpoints,
            images: tally.images,
        };
        (mode, seed, (tally, rec.acked_at.len() as u64 - 1), figures)
    }) {
        let (t, ops) = t;
        tally.merge(t);
        sync_points += figures.redb_syncs + figures.log_syncs;
        acked_ops += ops;
        if mode == Mode::WalCheckpoints && figures.recordings == 1 {
            // The mode is there to cut power during checkpoints and after the log wrapped: a
            // run where neither happened checks nothing it should.
            assert!(
                figures.checkpoints >= 3 && figures.segments_recycled >= 1,
                "seed {seed}: the checkpoint mode ran {} checkpoints and recycled {} log \
                 segments",
                figures.checkpoints,
                figures.segments_recycled
            );
            checkpoint_mode.add(&figures);
        }
    }
    println!(
        "power loss: {} seeds x 3 commit modes (redb one-phase, redb two-phase, write-ahead log) \
         x {} steps + {} seeds x {} steps of the write-ahead log with checkpoints (cut during \
         {} database syncs and {} log syncs, {} checkpoints, {} log segments recycled, {} \
         images): {sync_points} sync points, {} images checked ({} torn variant(s) + 1 fully \
         written per sync point and after the last event; {} before the first open was \
         acknowledged, of which {} refused as \"not a redb database\"), {acked_ops} operations; \
         pending ops applied {} / dropped {} / torn {}; failed recoveries {}, lost acks {}, \
         resurrected {}, other divergences {}, token regressions {}, hung recoveries {}; read-only views {} ({} differed); mean recovery open {:?}; \
         {:?} total",
        sizes.seeds,
        sizes.steps,
        sizes.checkpoint_seeds,
        sizes.checkpoint_steps,
        checkpoint_mode.redb_syncs,
        checkpoint_mode.log_syncs,
        checkpoint_mode.checkpoints,
        checkpoint_mode.segments_recycled,
        checkpoint_mode.images,
        tally.images,
        sizes.variants,
        tally.before_first_open,
        tally.refused_before_first_open,
        tally.fates.applied,
        tally.fates.dropped,
        tally.fates.torn,
        tally.failed_recoveries,
        tally.lost_acks,
        tally.resurrected,
        tally.other,
        tally.token_regressions,
        tally.hangs,
        tally.views,
        tally.view_mismatches,
        tally.open_time / u32::try_from(tally.images.max(1)).unwrap_or(u32::MAX),
        started.elapsed(),
    );
    assert!(
        tally.failures.is_empty(),
        "{} failing images, first ones:\n{}",
        tally.failed_recoveries
            + tally.lost_acks
            + tally.resurrected
            + tally.other
            + tally.token_regressions
            + tally.hangs
            + tally.view_mismatches,
        tally.failures.join("\n\n")
    );
}

/// What the checkpoint mode's recordings did.
#[derive(Debug, Default)]
struct CheckpointFigures {
    recordings: u64,
    redb_syncs: u64,
    log_syncs: u64,
    segments_recycled: u64,
    checkpoints: u64,
    images: u64,
}

impl CheckpointFigures {
    fn add(&mut self, other: &CheckpointFigures) {
        self.recordings += other.recordings;
        self.redb_syncs += other.redb_syncs;
        self.log_syncs += other.log_syncs;
        self.segments_recycled += other.segments_recycled;
        self.checkpoints += other.checkpoints;
        self.images += other.images;
    }
}

/// A sanity check of the simulated disk itself: unsynced writes are visible to reads but not
/// durable, a sync makes them durable, and a crash image never holds a write that was not
/// issued.
#[test]
fn the_simulated_disk_keeps_unsynced_writes_apart() {
    use redb::StorageBackend;
    let disk = SimDisk::new();
    disk.set_len(2048).expect("set_len");
    disk.write(0, &[1u8; 1024]).expect("write");
    let mut out = [0u8; 4];
    disk.read(0, &mut out).expect("read");
    assert_eq!(out, [1; 4]);
    assert!(disk.durable_image().is_empty());
    disk.sync_data().expect("sync");
    assert_eq!(disk.durable_image().len(), 2048);
    disk.start_recording();
    disk.write(512, &[2u8; 1024]).expect("write");
    let (windows, tail) = disk.take_windows();
    assert!(windows.is_empty());
    let mut rng = Rng::new(7);
    let mut fates = Fates::default();
    for _ in 0..64 {
        let image = testkit::crash_image(
            &disk.durable_image(),
            &tail,
            &mut |n| rng.below(n),
            &mut fates,
        );
        assert_eq!(image.len(), 2048);
        let before = disk.durable_image();
        for (sector, old) in image.chunks(512).zip(before.chunks(512)).skip(1).take(2) {
            assert!(
                sector == old || sector.iter().all(|&b| b == 2),
                "a torn sector"
            );
        }
    }
    assert!(fates.applied > 0 && fates.dropped > 0 && fates.torn > 0);
}

/// A database disk whose syncs take 30 ms, so that checkpoints last long enough for the writer
/// to append during them, as on a slow disk.
#[derive(Debug, Clone)]
struct SlowSyncs(SimDisk);

impl redb::StorageBackend for SlowSyncs {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.live_len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(30));
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, data)
    }
}

/// A log disk that notes, at each of its syncs, the image a power cut then may leave: the
/// database file's durable image (a running checkpoint's writes all lost) and everything
/// written to the log (its pending writes all on the platter).
#[derive(Debug, Clone)]
struct CutAtLogSyncs {
    db: SimDisk,
    log: SimDisk,
    images: Arc<parking_lot::Mutex<Vec<[Vec<u8>; 2]>>>,
}

impl redb::StorageBackend for CutAtLogSyncs {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.log.live_len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.log.read_at(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.log.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let image = [self.db.durable_image(), self.log.live_image()];
        self.images.lock().push(image);
        self.log.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.log.write_at(offset, data)
    }
}

/// Batches of 700 KiB in two 1 MiB segments: most start in one segment and end in the next,
/// and the next batch but one recycles the segment where the first began. Checkpoints (after
/// every commit) are slow, so that recycling comes while the checkpoint of the spanning batch
/// is still running. A power cut at every log sync must leave a store that opens with every
/// acknowledged completion.
#[test]
fn a_batch_spanning_two_segments_survives_the_recycling_of_the_first() {
    // On a thread of its own: a store that deadlocks fails the test instead of stopping it.
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        spanning_batches();
        let _ = send.send(());
    });
    match receive.recv_timeout(RECORDING_HANG) {
        Ok(()) => {}
        Err(RecvTimeoutError::Timeout) => panic!("a store hung (no end in {RECORDING_HANG:?})"),
        Err(RecvTimeoutError::Disconnected) => panic!("failed (see the panic above)"),
    }
}

fn spanning_batches() {
    let (db, log) = (SimDisk::new(), SimDisk::new());
    let images = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let cut = CutAtLogSyncs {
        db: db.clone(),
        log: log.clone(),
        images: Arc::clone(&images),
    };
    let store = Mode::WalCheckpoints
        .builder(ManualClock::new(workload::T0_MS))
        .open_with_backends(SlowSyncs(db), cut)
        .expect("a store opens on empty disks");
    let n = 12usize;
    let mut leases = Vec::new();
    for i in 0..n {
        match store.claim("a", format!("k{i}"), "fp", &ClaimOptions::default()) {
            Ok(Claim::Acquired(lease)) => leases.push(lease),
            other => panic!("claim k{i}: {other:?}"),
        }
    }
    // Per completion: the log syncs noted before it was acknowledged.
    let mut acked_at = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        store
            .complete(lease, &vec![i as u8; 700 * 1024], Duration::from_secs(60))
            .expect("complete");
        acked_at.push(images.lock().len());
    }
    let checkpoints = store
        .stats()
        .expect("stats")
        .wal
        .map_or(0, |w| w.checkpoints);
    drop(store);
    let images = std::mem::take(&mut *images.lock());
    assert!(checkpoints >= n as u64, "{checkpoints} checkpoints");
    let mut failures = Vec::new();
    for (k, image) in images.into_iter().enumerate() {
        let store = match Mode::WalCheckpoints.open(
            ManualClock::new(workload::T0_MS),
            image.map(SimDisk::from_image),
        ) {
            Ok(store) => store,
            Err(e) => {
                failures.push(format!("power cut at log sync {k}: {e}"));
                continue;
            }
        };
        for (i, _) in acked_at.iter().enumerate().filter(|(_, at)| **at <= k) {
            match store.get("a", format!("k{i}")) {
                Ok(Some(Record {
                    state: RecordState::Completed { outcome },
                    ..
                })) if outcome.len() == 700 * 1024 => {}
                other => failures.push(format!(
                    "power cut at log sync {k}: completion of k{i} acknowledged before, \
                     found {:?}",
                    other.map(|r| r.map(|r| r.attempt))
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Compaction (`Store::compact` runs redb's, on the file) on the simulated disk of a store whose
/// records mostly expired and were swept: a power cut at every sync point of it, with each write
/// pending there applied, dropped or torn at sector granularity, leaves a store that opens with
/// exactly the kept records and outcomes (none lost, no swept one back) and the same next token.
/// In both formats: a format-2 store's log (checkpointed at its close) is not touched.
#[test]
fn a_compaction_cut_at_every_sync_point_keeps_every_record()
-> Result<(), Box<dyn std::error::Error>> {
    compaction_cut_at_every_sync_point(false)?;
    compaction_cut_at_every_sync_point(true)
}

fn compaction_cut_at_every_sync_point(log: bool) -> Result<(), Box<dyn std::error::Error>> {
    const RECORDS: usize = 600;
    const KEEP_EVERY: usize = 3;
    const OUTCOME_LEN: usize = 2048;
    let variants: u64 = if std::env::var_os("IDEMSTORE_LONG").is_some() {
        24
    } else {
        4
    };
    let outcome = |i: usize| vec![(i % 251) as u8; OUTCOME_LEN];
    let disk = SimDisk::new();
    let log_disk = SimDisk::new();
    let clock = ManualClock::new(1_700_000_000_000);
    // The store on `disk` (and, in format 2, its log on `log_disk`).
    let open = |disk: SimDisk, log_disk: SimDisk| {
        let builder = Store::builder().clock(clock.clone()).sweep_interval(None);
        if log {
            builder
                .write_ahead_log(true)
                .wal_segment_bytes(1 << 20)
                .checkpoint_interval(Duration::ZERO)
                .open_with_backends(disk, log_disk)
        } else {
            builder.open_with_backend(disk)
        }
    };
    let store = open(disk.clone(), log_disk.clone())?;
    let options = ClaimOptions::default().retention(Duration::from_secs(86_400));
    let mut kept = Vec::new();
    for i in 0..RECORDS {
        let key = format!("k-{i}");
        let Claim::Acquired(lease) = store.claim("s", &key, key.as_bytes(), &options)? else {
            return Err(format!("{key} was not new").into());
        };
        let keep = i % KEEP_EVERY == 0;
        let retention = Duration::from_secs(if keep { 86_400 } else { 60 });
        store.complete(&lease, &outcome(i), retention)?;
        if keep {
            kept.push(i);
        }
    }
    clock.advance(Duration::from_secs(120));
    while store.sweep(64)?.more {}
    assert_eq!(store.stats()?.wal.is_some(), log, "the store's format");
    let next_token = store.stats()?.next_token;
    store.close()?;
    assert_eq!(disk.durable_image(), disk.live_image(), "the close synced");
    let len_before = disk.live_len();

    let mut durable = disk.durable_image();
    disk.start_recording();
    let mut db = redb::Builder::new().create_with_backend(disk.clone())?;
    assert!(db.compact()?, "there was something to compact");
    drop(db);
    let (mut windows, tail) = disk.take_windows();
    windows.push(tail);
    assert!(
        disk.live_len() < len_before,
        "{len_before} -> {}",
        disk.live_len()
    );

    let check = |image: Vec<u8>, at: &str| -> Result<(), String> {
        let store = open(
            SimDisk::from_image(image),
            SimDisk::from_image(log_disk.durable_image()),
        )
        .map_err(|e| format!("{at}: the store does not open: {e}"))?;
        let stats = store.stats().map_err(|e| e.to_string())?;
        if stats.wal.is_some() != log {
            return Err(format!("{at}: opened in the other format"));
        }
        if stats.records != kept.len() as u64 || stats.next_token != next_token {
            return Err(format!(
                "{at}: {} records (expected {}), next token {} (expected {next_token})",
                stats.records,
                kept.len(),
                stats.next_token
            ));
        }
        for &i in &kept {
            let key = format!("k-{i}");
            match store.claim("s", &key, key.as_bytes(), &options) {
                Ok(Claim::Replay(replay)) if replay.outcome == outcome(i) => {}
                other => return Err(format!("{at}: {key}: {other:?}")),
            }
        }
        store.close().map_err(|e| e.to_string())
    };
    let mut rng = Rng::new(0xC0_4AC7);
    let mut fates = Fates::default();
    let mut images = 0u64;
    for (w, window) in windows.iter().enumerate() {
        for v in 0..variants {
            let image = testkit::crash_image(&durable, window, &mut |n| rng.below(n), &mut fates);
            check(image, &format!("sync point {w} variant {v}"))?;
            images += 1;
        }
        for op in window {
            op.apply_to(&mut durable);
        }
        check(durable.clone(), &format!("sync point {w} fully written"))?;
        images += 1;
    }
    eprintln!(
        "compaction (log: {log}) {len_before} -> {} bytes: {} sync points, {images} crash \
         images, {fates:?}",
        disk.live_len(),
        windows.len() - 1
    );
    Ok(())
}
