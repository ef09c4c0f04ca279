//! I/O faults at every call of a fixed workload: a simulated disk (`idemstore::testkit::SimDisk`)
//! fails the N-th `write`, `set_len` or `sync_data`, once or from then on, for every N that a
//! clean run of the workload makes (open and close included). Each faulty run checks:
//!
//! - the first error is one of the storage errors the API documents for it (never a panic,
//!   never success): `CommitOutcomeUnknown` when the commit itself failed, `Io` when the batch
//!   failed before committing (and the open's own errors for a fault during open);
//! - from then on the store refuses every write with `Poisoned` (nothing more is acknowledged)
//!   while reads of committed state keep working;
//! - after "reopen" — a new store over the durable image, and over the written image, of the
//!   disk — every record is exactly in the state before or after the failed operation (before,
//!   when the engine said the batch did not commit), every acknowledged operation is there, the
//!   fencing counter did not go back, and writes work again.
//!
//! A full disk is covered too: writes and length changes past a byte budget fail with
//! `io::ErrorKind::StorageFull`, which the engine reports as `Error::StorageFull` (failed while
//! the batch was being built) or `CommitOutcomeUnknown` with a `StorageFull` source (failed in
//! the commit); reads keep working, nothing acknowledged is lost, and after raising the budget a
//! reopened store writes again.
//!
//! Default run: one workload seed; `IDEMSTORE_LONG=1` runs more seeds and a longer workload.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use idemstore::testkit::{Call, Counts, Fault, SimDisk};
use idemstore::{Claim, ClaimOptions, Error, ManualClock, Record, RecordState, Store};
use support::workload::{self, Driver, Effect, Id, Step};

fn builder(clock: ManualClock) -> idemstore::StoreBuilder {
    Store::builder().clock(clock).sweep_interval(None)
}

/// With a write-ahead log: small segments, no checkpoint before close.
fn wal_builder(clock: ManualClock) -> idemstore::StoreBuilder {
    builder(clock)
        .write_ahead_log(true)
        .wal_segment_bytes(1 << 20)
        .wal_segments(2)
        .checkpoint_interval(Duration::from_secs(3600))
}

/// The disks of one store: the database file, and the log when there is one. Faults go to
/// the log when there is one (its writes and syncs acknowledge), else to the database file.
struct Disks {
    redb: SimDisk,
    log: Option<SimDisk>,
}

impl Disks {
    fn new(wal: bool) -> Disks {
        Disks {
            redb: SimDisk::new(),
            log: wal.then(SimDisk::new),
        }
    }

    /// The disk faults are planned on.
    fn faulty(&self) -> &SimDisk {
        self.log.as_ref().unwrap_or(&self.redb)
    }

    fn open(&self, clock: ManualClock) -> idemstore::Result<Store> {
        match &self.log {
            None => builder(clock).open_with_backend(self.redb.clone()),
            Some(log) => wal_builder(clock).open_with_backends(self.redb.clone(), log.clone()),
        }
    }

    /// New disks holding the durable (`durable`) or the written images of these.
    fn images(&self, durable: bool) -> Disks {
        let image = |d: &SimDisk| {
            SimDisk::from_image(if durable {
                d.durable_image()
            } else {
                d.live_image()
            })
        };
        Disks {
            redb: image(&self.redb),
            log: self.log.as_ref().map(image),
        }
    }
}

/// The clean run: per boundary (0 = open, i = after step i) the physical state, the next
/// token and what each step did; and how many calls of each kind the disk saw.
struct Clean {
    steps: Vec<Step>,
    effects: Vec<Effect>,
    snapshots: Vec<BTreeMap<Id, Record>>,
    next_tokens: Vec<u64>,
    counts: Counts,
    /// The calls made before `close`: a fault after these is one only the close could see.
    counts_before_close: Counts,
}

fn clean_run(seed: u64, n_steps: usize, wal: bool) -> Clean {
    let disks = Disks::new(wal);
    let disk = disks.faulty().clone();
    let clock = ManualClock::new(workload::T0_MS);
    let store = disks.open(clock.clone()).expect("a clean open");
    let steps = workload::generate(seed, n_steps);
    let mut driver = Driver::new(seed, clock.clone());
    let mut clean = Clean {
        steps: steps.clone(),
        effects: Vec::new(),
        snapshots: vec![workload::snapshot(&store, &clock).expect("snapshot")],
        next_tokens: vec![store.stats().expect("stats").next_token],
        counts: Counts::default(),
        counts_before_close: Counts::default(),
    };
    for step in &steps {
        let effect = driver
            .run(&store, step)
            .expect("the clean run has no errors");
        clean.effects.push(effect);
        clean
            .snapshots
            .push(workload::snapshot(&store, &clock).expect("snapshot"));
        clean
            .next_tokens
            .push(store.stats().expect("stats").next_token);
    }
    workload::check_prelude(&clean.effects, &clean.snapshots);
    clean.counts_before_close = disk.counts();
    store.close().expect("a clean close");
    clean.counts = disk.counts();
    clean
}

#[derive(Debug, Default)]
struct Tally {
    runs: u64,
    faults_injected: u64,
    /// First errors by kind, e.g. "CommitOutcomeUnknown(Io)".
    first_errors: BTreeMap<String, u64>,
    /// Runs where the injected fault never reached the caller (e.g. during close).
    silent: u64,
    reopened_images: u64,
    recovered_before: u64,
    recovered_after: u64,
    refused_before_first_open: u64,
    failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.runs += other.runs;
        self.faults_injected += other.faults_injected;
        for (k, v) in other.first_errors {
            *self.first_errors.entry(k).or_default() += v;
        }
        self.silent += other.silent;
        self.reopened_images += other.reopened_images;
        self.recovered_before += other.recovered_before;
        self.recovered_after += other.recovered_after;
        self.refused_before_first_open += other.refused_before_first_open;
        for f in other.failures {
            self.fail(f);
        }
    }
}

fn error_kind(e: &Error) -> String {
    match e {
        Error::CommitOutcomeUnknown { source } => {
            format!("CommitOutcomeUnknown({})", error_kind(source))
        }
        Error::Io(_) => "Io".into(),
        Error::StorageFull(_) => "StorageFull".into(),
        Error::Poisoned { .. } => "Poisoned".into(),
        Error::Backend { .. } => "Backend".into(),
        Error::Internal(_) => "Internal".into(),
        Error::Corrupt { .. } => "Corrupt".into(),
        other => format!("{other:?}"),
    }
}

/// The first error a failed operation may report: the commit failed (outcome unknown), or the
/// batch failed before its commit with the I/O error itself.
fn allowed_first_error(e: &Error) -> bool {
    match e {
        Error::CommitOutcomeUnknown { source } => matches!(**source, Error::Io(_)),
        Error::Io(_) => true,
        _ => false,
    }
}

/// Runs the workload with `fault` injected and checks everything; returns a label for failures.
fn faulty_run(seed: u64, clean: &Clean, fault: Fault, wal: bool, tally: &mut Tally) {
    tally.runs += 1;
    let label = format!(
        "seed {seed} {fault:?}{}",
        if wal { " on the log" } else { "" }
    );
    let disks = Disks::new(wal);
    let disk = disks.faulty().clone();
    disk.set_fault(Some(fault));
    let clock = ManualClock::new(workload::T0_MS);
    // `first_failure`: the boundary index of the failed operation (0 = the open).
    let mut first_failure: Option<(usize, String, bool)> = None;
    match disks.open(clock.clone()) {
        Err(e) => {
            // A failed open acknowledged nothing; it must say so with a storage error.
            let kind = error_kind(&e);
            if !matches!(e, Error::Io(_) | Error::CommitOutcomeUnknown { .. }) {
                tally.fail(format!("{label}: open failed with {e:?}"));
            }
            *tally
                .first_errors
                .entry(format!("open: {kind}"))
                .or_default() += 1;
            first_failure = Some((0, kind, true));
        }
        Ok(store) => {
            let mut driver = Driver::new(seed, clock.clone());
            for (i, step) in clean.steps.iter().enumerate() {
                let result = driver.run(&store, step);
                match (&first_failure, result) {
                    (None, Ok(effect)) => {
                        if effect != clean.effects[i] {
                            tally.fail(format!(
                                "{label}: step {i} {step:?} did {effect:?}, the clean run {:?}",
                                clean.effects[i]
                            ));
                            return;
                        }
                    }
                    (None, Err(e)) => {
                        if !allowed_first_error(&e) {
                            tally.fail(format!("{label}: step {i} {step:?} failed with {e:?}"));
                        }
                        if !store.stats().is_ok_and(|s| s.poisoned) {
                            tally.fail(format!("{label}: {e:?} did not stop writes"));
                        }
                        let kind = error_kind(&e);
                        *tally.first_errors.entry(kind.clone()).or_default() += 1;
                        let unknown = matches!(e, Error::CommitOutcomeUnknown { .. });
                        first_failure = Some((i + 1, kind, unknown));
                    }
                    (Some(_), Ok(Effect::Committed)) => {
                        tally.fail(format!(
                            "{label}: step {i} {step:?} acknowledged a write after the store \
                             was poisoned"
                        ));
                    }
                    (Some(_), Ok(_) | Err(Error::Poisoned { .. })) => {}
                    (Some(_), Err(e)) => {
                        tally.fail(format!(
                            "{label}: step {i} {step:?} after the failure returned {e:?}, not \
                             Poisoned"
                        ));
                    }
                }
            }
            if first_failure.is_some() {
                // Reads of committed state keep working.
                for (scope, key) in workload::ids() {
                    if let Err(e) = store.get(&scope, &key) {
                        tally.fail(format!("{label}: a read after the failure: {e:?}"));
                        break;
                    }
                }
                let closed = store.close();
                if !matches!(closed, Err(Error::Poisoned { .. })) {
                    tally.fail(format!(
                        "{label}: close of a poisoned store said {closed:?}"
                    ));
                }
            } else {
                drop(store);
            }
        }
    }
    if disk.injected() == 0 {
        tally.fail(format!("{label}: the fault was never reached"));
        return;
    }
    tally.faults_injected += disk.injected();
    if first_failure.is_none() {
        // Only a fault while closing may go unreported (redb's shutdown runs in a destructor):
        // everything was durable before, so the reopened state must be the final one.
        tally.silent += 1;
        if fault.nth <= clean.counts_before_close.of(fault.on) {
            tally.fail(format!("{label}: a fault before close reached no caller"));
        }
    }
    // Reopen: the durable image (a power cut now) and the written image (everything written
    // reached the disk). Both must hold the state before or after the failed operation.
    for (which, durable) in [("durable", true), ("written", false)] {
        check_reopen(
            clean,
            &first_failure,
            disks.images(durable),
            &format!("{label} {which}"),
            tally,
        );
    }
}

fn check_reopen(
    clean: &Clean,
    first_failure: &Option<(usize, String, bool)>,
    images: Disks,
    label: &str,
    tally: &mut Tally,
) {
    tally.reopened_images += 1;
    let last = clean.snapshots.len() - 1;
    let (before, after, unknown) = match first_failure {
        Some((f, _, unknown)) => (f.saturating_sub(1), *f, *unknown || *f == 0),
        None => (last, last, false),
    };
    let store = match images.open(ManualClock::new(0)) {
        Ok(store) => store,
        Err(e)
            if matches!(first_failure, Some((0, ..)))
                && e.to_string().contains("Not a redb database") =>
        {
            // The very first open failed before redb wrote its magic number: nothing was ever
            // acknowledged, and the file is refused (see power_loss.rs).
            tally.refused_before_first_open += 1;
            return;
        }
        Err(e) => {
            tally.fail(format!("{label}: reopen failed: {e:?}"));
            return;
        }
    };
    let found = match workload::physical(&store) {
        Ok(found) => found,
        Err(e) => {
            tally.fail(format!(
                "{label}: a record does not read back after reopen: {e:?}"
            ));
            return;
        }
    };
    if found == clean.snapshots[before] {
        tally.recovered_before += 1;
    } else if found == clean.snapshots[after] && unknown {
        tally.recovered_after += 1;
    } else {
        let failed_step = after.checked_sub(1).and_then(|i| clean.steps.get(i));
        tally.fail(format!(
            "{label}: reopened state is neither before nor after the failed step {failed_step:?} \
             (boundaries {before}/{after}, outcome unknown: {unknown}): {:?}",
            workload::classify(&found, &clean.snapshots, before, after)
        ));
        return;
    }
    let floor = clean.next_tokens[before];
    match store.claim(
        "probe",
        "p",
        "fp",
        &ClaimOptions::default().lease(Duration::from_secs(1)),
    ) {
        Ok(Claim::Acquired(lease)) if lease.token() >= floor => {
            if let Err(e) = store.complete(&lease, b"ok", Duration::from_secs(60)) {
                tally.fail(format!("{label}: no writes after reopen: {e:?}"));
            }
        }
        other => tally.fail(format!(
            "{label}: probe claim after reopen (floor {floor}): {other:?}"
        )),
    }
}

#[test]
fn a_fault_at_every_io_call_never_acknowledges_a_lost_write() {
    every_io_call(false);
}

/// The same on a store with a write-ahead log: a fault at every write and sync of the log
/// (its preallocation, segment headers, batches), once and for good.
#[test]
fn a_fault_at_every_log_call_never_acknowledges_a_lost_write() {
    every_io_call(true);
}

fn every_io_call(wal: bool) {
    let long = support::long_run();
    let seeds = support::env_u64("IDEMSTORE_SEEDS", if long { 6 } else { 1 });
    let first_seed = support::env_u64("IDEMSTORE_SEED", 1);
    let steps = if long { 80 } else { 30 };
    let started = Instant::now();
    let cleans: Vec<(u64, Clean)> = (first_seed..first_seed + seeds)
        .map(|seed| (seed, clean_run(seed, steps, wal)))
        .collect();
    let mut per_call = BTreeMap::new();
    let mut jobs = Vec::new();
    for (c, (_, clean)) in cleans.iter().enumerate() {
        for call in Call::ALL {
            let n = clean.counts.of(call);
            *per_call.entry(format!("{call:?}")).or_insert(0u64) += n;
            for nth in 1..=n {
                for persistent in [false, true] {
                    jobs.push((
                        c,
                        Fault {
                            on: call.into(),
                            nth,
                            persistent,
                            full: false,
                        },
                    ));
                }
            }
        }
    }
    let points = jobs.len();
    let mut tally = Tally::default();
    for t in support::parallel_map(jobs, |(c, fault)| {
        let mut tally = Tally::default();
        faulty_run(cleans[c].0, &cleans[c].1, fault, wal, &mut tally);
        tally
    }) {
        tally.merge(t);
    }
    println!(
        "io faults{}: {seeds} seed(s) x {steps} steps; calls per clean run {per_call:?}; \
         {points} injection points (one-shot + persistent), {} runs, {} faults injected; first \
         errors {:?}; {} runs where no caller saw the fault; {} reopened images: {} in the state \
         before the failed operation, {} after it, {} refused (fault before the first open wrote \
         redb's magic); {} failures; {:?}",
        if wal { " (write-ahead log)" } else { "" },
        tally.runs,
        tally.faults_injected,
        tally.first_errors,
        tally.silent,
        tally.reopened_images,
        tally.recovered_before,
        tally.recovered_after,
        tally.refused_before_first_open,
        tally.failures.len(),
        started.elapsed(),
    );
    assert!(
        tally.failures.is_empty(),
        "first failures:\n{}",
        tally.failures.join("\n")
    );
}

/// How a full disk surfaced to the caller.
#[derive(Debug, Default)]
struct FullTally {
    storage_full: u64,
    outcome_unknown_storage_full: u64,
    reopen_while_full_ok: u64,
    reopen_while_full_refused: BTreeMap<String, u64>,
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing() {
    let budgets: &[u64] = if support::long_run() {
        &[
            0,
            512,
            4096,
            8192,
            16_384,
            40_000,
            65_536,
            200_000,
            1 << 20,
            3 << 20,
        ]
    } else {
        &[0, 4096, 16_384, 65_536, 1 << 20]
    };
    let mut tally = FullTally::default();
    for &extra in budgets {
        full_disk_scenario(extra, &mut tally);
    }
    println!("full disk: {} budgets: {tally:?}", budgets.len());
    assert_eq!(
        tally.storage_full + tally.outcome_unknown_storage_full,
        budgets.len() as u64
    );
}

fn full_disk_scenario(extra: u64, tally: &mut FullTally) {
    let disk = SimDisk::new();
    let clock = ManualClock::new(workload::T0_MS);
    let store = builder(clock.clone())
        .open_with_backend(disk.clone())
        .expect("open");
    let budget = disk.live_len() + extra;
    disk.set_budget(Some(budget));
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(10))
        .retention(Duration::from_secs(86_400));
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut in_flight: Option<String> = None;
    let error = (0..100_000u32)
        .find_map(|i| {
            let key = format!("k{i}");
            let lease = match store.claim("full", &key, "fp", &options) {
                Ok(Claim::Acquired(lease)) => lease,
                Ok(other) => panic!("claim of a new key: {other:?}"),
                Err(e) => return Some(e),
            };
            in_flight = Some(key.clone());
            let outcome = vec![(i % 251) as u8; 2_000 + (i as usize * 997) % 6_000];
            match store.complete(&lease, &outcome, Duration::from_secs(86_400)) {
                Ok(()) => {
                    in_flight = None;
                    acked.push((key, outcome));
                    None
                }
                Err(e) => Some(e),
            }
        })
        .expect("the disk fills up");
    let label = format!(
        "budget +{extra} B ({} completions acknowledged)",
        acked.len()
    );
    // The engine's exact answer: StorageFull when the batch failed before its commit (redb
    // grew the file while inserting), CommitOutcomeUnknown(StorageFull) when the commit failed.
    match &error {
        Error::StorageFull(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{label}");
            tally.storage_full += 1;
        }
        Error::CommitOutcomeUnknown { source } if matches!(**source, Error::StorageFull(_)) => {
            tally.outcome_unknown_storage_full += 1;
        }
        other => panic!("{label}: a full disk reported {other:?}"),
    }
    assert!(
        error.is_fatal() || matches!(error, Error::StorageFull(_)),
        "{label}"
    );
    assert!(error.is_storage_full(), "{label}");
    assert!(
        store.stats().expect("stats").poisoned,
        "{label}: writes must stop"
    );
    let refused = store.claim("full", "after", "fp", &options);
    assert!(
        matches!(refused, Err(Error::Poisoned { .. })),
        "{label}: {refused:?}"
    );
    // Reads keep working: every acknowledged completion replays.
    for (key, outcome) in &acked {
        match store.claim("full", key, "fp", &options) {
            Ok(Claim::Replay(r)) => assert_eq!(&r.outcome, outcome, "{label}: {key}"),
            other => panic!("{label}: replay of {key} on the full disk: {other:?}"),
        }
    }
    assert!(
        matches!(store.close(), Err(Error::Poisoned { .. })),
        "{label}"
    );

    // Reopen on the still-full disk: either it opens (and reads) or it is refused cleanly.
    let image = disk.durable_image();
    let full = SimDisk::from_image(image.clone());
    full.set_budget(Some(budget));
    match builder(ManualClock::new(workload::T0_MS)).open_with_backend(full) {
        Ok(store) => {
            tally.reopen_while_full_ok += 1;
            if let Some((key, outcome)) = acked.last() {
                let r = store.get("full", key).expect("read on a full disk");
                assert!(
                    matches!(r.map(|r| r.state), Some(RecordState::Completed { outcome: o }) if &o == outcome),
                    "{label}"
                );
            }
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    Error::StorageFull(_) | Error::Io(_) | Error::CommitOutcomeUnknown { .. }
                ),
                "{label}: reopen on a full disk: {e:?}"
            );
            *tally
                .reopen_while_full_refused
                .entry(error_kind(&e))
                .or_default() += 1;
        }
    }

    // Raise the budget and reopen: nothing acknowledged is lost, and writes work again.
    let store = builder(ManualClock::new(workload::T0_MS))
        .open_with_backend(SimDisk::from_image(image))
        .expect("reopen with space");
    for (key, outcome) in &acked {
        match store.claim("full", key, "fp", &options) {
            Ok(Claim::Replay(r)) => assert_eq!(&r.outcome, outcome, "{label}: {key}"),
            other => panic!("{label}: {key} after reopen: {other:?}"),
        }
    }
    if let Some(key) = &in_flight {
        // The failed operation left the record before or after it: in flight (its claim was
        // acknowledged) or, only if the commit's outcome was unknown, completed.
        let r = store
            .get("full", key)
            .expect("read")
            .expect("the acknowledged claim");
        let completed = matches!(r.state, RecordState::Completed { .. });
        assert!(
            !completed || matches!(error, Error::CommitOutcomeUnknown { .. }),
            "{label}: a completion reported as failed is durable"
        );
    }
    let lease = match store.claim("full", "after-reopen", "fp", &options) {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("{label}: claim after reopen: {other:?}"),
    };
    store
        .complete(&lease, &[7u8; 50_000], Duration::from_secs(60))
        .expect("writes work again");
    store.close().expect("close");
}
