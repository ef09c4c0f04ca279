//! The write-ahead log (format 2, `StoreBuilder::write_ahead_log`): what it acknowledges
//! survives reopen, a crash and a power cut; checkpoints move it into the database file and
//! recycle the log; damage that would lose an acknowledged batch is refused; a format-1 store
//! upgrades; failed log writes and syncs never acknowledge.

mod common;

use std::time::Duration;

use common::*;
use idemstore::testkit::{Call, Fault, SimDisk, Target};
use idemstore::{Claim, ClaimOptions, Error, ReadOnlyStore, RecordState, Store, StoreBuilder};

fn wal_builder(clock: &idemstore::ManualClock) -> StoreBuilder {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .write_ahead_log(true)
        .wal_segment_bytes(1 << 20)
}

/// Claims and completes `n` keys from `from`, each with an outcome of `size` bytes.
fn complete_keys(store: &Store, from: u32, n: u32, size: usize) -> TestResult {
    for i in from..from + n {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(60_000))?);
        let mut outcome = vec![(i % 251) as u8; size];
        outcome[..4].copy_from_slice(&i.to_le_bytes());
        store.complete(&lease, &outcome, DAY)?;
    }
    Ok(())
}

/// Asserts that keys `from..from + n` replay their outcomes.
fn assert_replays(store: &Store, from: u32, n: u32, size: usize) -> TestResult {
    for i in from..from + n {
        let r = replay(store.claim("s", format!("k{i}"), "fp", &opts(60_000))?);
        assert_eq!(r.outcome.len(), size, "key k{i}");
        assert_eq!(r.outcome[..4], i.to_le_bytes(), "key k{i}");
    }
    Ok(())
}

#[test]
fn acknowledged_writes_survive_reopen_and_a_format_2_store_opens_with_its_log() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = wal_builder(&clock).open(&path)?;
        complete_keys(&store, 0, 200, 100)?;
        assert!(store.forget("s", "k7")?);
        let stats = store.stats()?;
        assert_eq!(stats.records, 199);
        assert!(stats.wal.is_some());
        store.close()?;
    }
    assert!(dir.path().join("idem.redb.wal").exists());
    // Without the builder setting: a format-2 store always opens with its log.
    let store = file_store(&path, &clock);
    assert!(store.stats()?.wal.is_some());
    assert_replays(&store, 0, 7, 100)?;
    assert_replays(&store, 8, 192, 100)?;
    assert!(store.get("s", "k7")?.is_none());
    assert_eq!(store.stats()?.records, 199);
    drop(store);
    // After a clean close the log holds nothing past the checkpoint: the read-only view
    // replays nothing and sees what the store saw.
    let summary = ReadOnlyStore::open(&path)?.summary()?;
    assert_eq!(
        (summary.format_version, summary.log_batches, summary.records),
        (2, 0, 199)
    );
    assert!(summary.log_file_bytes > 0);
    Ok(())
}

/// A clock at the system's time: the read-only view decides expiry by the system clock.
fn clock_now() -> idemstore::ManualClock {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    idemstore::ManualClock::new(u64::try_from(now.as_millis()).expect("in range"))
}

/// The crash images of a store whose log holds everything since its open (no checkpoint ran):
/// 30 keys completed, `k3` forgotten, `k30` claimed and left in flight. Returns them with the
/// token of that last claim.
fn crash_images_with_a_log_to_replay(
    clock: &idemstore::ManualClock,
) -> idemstore::Result<(Vec<u8>, Vec<u8>, u64)> {
    let (store, disk, log) = on_simulated_disks(clock, Duration::from_secs(3600))?;
    complete_keys(&store, 0, 30, 200).map_err(|e| idemstore::Error::Internal(e.to_string()))?;
    assert!(store.forget("s", "k3")?);
    let last = acquired(store.claim("s", "k30", "fp", &opts(60_000))?).token();
    let mut images = (Vec::new(), Vec::new());
    drop_without_checkpoint(store, &disk, &log, |d, l| images = (d, l));
    Ok((images.0, images.1, last))
}

#[test]
fn a_read_only_view_replays_the_log_of_a_crashed_store_and_writes_nothing() -> TestResult {
    let clock = clock_now();
    let (disk_image, log_image, last_token) = crash_images_with_a_log_to_replay(&clock)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    std::fs::write(&path, &disk_image)?;
    std::fs::write(dir.path().join("idem.redb.wal"), &log_image)?;

    let view = ReadOnlyStore::open(&path)?;
    let summary = view.summary()?;
    assert_eq!(summary.format_version, 2);
    // The database file alone holds no record: every one comes from the log.
    assert!(summary.log_batches >= 61, "{summary:?}");
    assert_eq!(
        (summary.records, summary.completed, summary.in_flight),
        (30, 29, 1),
        "{summary:?}"
    );
    assert_eq!(summary.expiry_entries, 30, "{summary:?}");
    assert!(view.next_token() > last_token, "{summary:?}");
    let record = view.get("s", "k17")?.expect("k17 completed");
    match record.state {
        RecordState::Completed { outcome, .. } => {
            assert_eq!(outcome.len(), 200);
            assert_eq!(outcome[..4], 17u32.to_le_bytes());
        }
        other => panic!("k17: {other:?}"),
    }
    assert_eq!(view.get("s", "k3")?, None);
    let orphans = view.orphans(10)?;
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].key, b"k30");
    assert!(view.verify()?.is_clean());
    drop(view);
    // Neither file changed.
    assert!(std::fs::read(&path)? == disk_image);
    assert!(std::fs::read(dir.path().join("idem.redb.wal"))? == log_image);

    // The store opened for writing replays the same log and agrees with the view.
    let store = file_store(&path, &clock);
    assert_eq!(store.stats()?.records, 30);
    assert_eq!(store.stats()?.next_token, summary.next_token);
    assert_replays(&store, 0, 3, 200)?;
    assert_replays(&store, 4, 26, 200)?;
    Ok(())
}

#[test]
fn a_read_only_view_refuses_a_damaged_log_and_drops_a_torn_tail_in_memory_only() -> TestResult {
    let clock = clock_now();
    let (disk_image, log_image, _) = crash_images_with_a_log_to_replay(&clock)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let log_path = dir.path().join("idem.redb.wal");
    std::fs::write(&path, &disk_image)?;

    // A payload byte of the first batch flipped: acknowledged batches follow it.
    let mut damaged = log_image.clone();
    damaged[first_nonzero(&log_image) + 512 + 100] ^= 0x40;
    std::fs::write(&log_path, &damaged)?;
    match ReadOnlyStore::open(&path) {
        Err(Error::Corrupt { location, .. }) => assert!(location.contains("log"), "{location}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(std::fs::read(&log_path)? == damaged);

    // The last batch (the claim of k30) torn: the view drops it, as a writer's recovery would,
    // but erases nothing on disk.
    let mut torn = log_image.clone();
    let end = last_nonzero(&torn);
    let start = end.saturating_sub(1) / 512 * 512;
    torn[start..end].fill(0);
    std::fs::write(&log_path, &torn)?;
    let summary = ReadOnlyStore::open(&path)?.summary()?;
    assert_eq!((summary.records, summary.in_flight), (29, 0), "{summary:?}");
    assert!(std::fs::read(&log_path)? == torn);
    assert!(std::fs::read(&path)? == disk_image);

    // A missing log: the batches it held would be lost, so the view refuses.
    std::fs::remove_file(&log_path)?;
    match ReadOnlyStore::open(&path) {
        Err(Error::Corrupt { location, .. }) => assert!(location.contains("log"), "{location}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!log_path.exists());
    Ok(())
}

#[test]
fn checkpoints_move_the_log_into_the_database_and_recycle_its_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    // Two 1 MiB segments; 6 MiB of outcomes: the log must be recycled several times.
    let store = wal_builder(&clock)
        .wal_segment_bytes(1 << 20)
        .wal_segments(2)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&path)?;
    complete_keys(&store, 0, 96, 64 * 1024)?;
    let wal = store.stats()?.wal.expect("a log");
    assert!(wal.checkpoints >= 2, "{wal:?}");
    assert_replays(&store, 0, 96, 64 * 1024)?;
    store.close()?;
    let store = wal_builder(&clock).open(&path)?;
    assert_replays(&store, 0, 96, 64 * 1024)?;
    assert_eq!(store.stats()?.records, 96);
    Ok(())
}

#[test]
fn stats_count_one_log_sync_per_durable_commit_and_report_their_latency() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let store = wal_builder(&clock).open(dir.path().join("idem.redb"))?;
    let before = store.stats()?.wal.expect("a log");
    // One caller: each claim and each completion is its own `Immediate` commit.
    complete_keys(&store, 0, 20, 100)?;
    let stats = store.stats()?;
    let (after, commits) = (stats.wal.expect("a log"), stats.commits);
    assert_eq!(after.log_syncs - before.log_syncs, 40, "{after:?}");
    assert!(commits >= 40, "{commits} commits");
    assert!(after.log_sync_p99_us <= after.log_sync_max_us, "{after:?}");
    Ok(())
}

#[test]
fn reads_and_sweeps_see_the_map_and_the_database_as_one() -> TestResult {
    let clock = clock();
    let disk = SimDisk::new();
    let log = SimDisk::new();
    let store = wal_builder(&clock)
        .checkpoint_interval(Duration::ZERO)
        .map_budget(1 << 20)
        .open_with_backends(disk.clone(), log.clone())?;
    // Short retention: these expire.
    for i in 0..50u32 {
        let lease = acquired(store.claim("s", format!("old{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, b"old", Duration::from_secs(10))?;
    }
    complete_keys(&store, 0, 50, 10)?;
    clock.advance(Duration::from_secs(60));
    let swept = store.sweep(1_000)?;
    assert_eq!(swept.removed, 50);
    assert_eq!(store.stats()?.records, 50);
    assert_eq!(store.stats()?.expiry_entries, 50);
    assert_replays(&store, 0, 50, 10)?;
    assert!(store.get("s", "old3")?.is_none());
    Ok(())
}

/// The read cache holds what callers read from the database file, not what a commit reads on
/// its way to changing or removing it: a sweep of records that are only in the file leaves the
/// cache as it was (empty after the open), and replays of the file's records then fill it.
#[test]
fn a_sweep_leaves_the_read_cache_to_what_callers_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let store = wal_builder(&clock).open(&path)?;
    for i in 0..200u32 {
        let lease = acquired(store.claim("s", format!("old{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, &[7; 300], Duration::from_secs(10))?;
    }
    complete_keys(&store, 0, 20, 300)?;
    // The close checkpoints everything: after the open, every record is in the file only (and
    // no checkpoint runs during the test to take the cache's entries out again).
    store.close()?;
    let store = wal_builder(&clock)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&path)?;
    let cache = |store: &Store| -> Result<u64, Error> {
        Ok(store.stats()?.wal.expect("a log").cache_bytes)
    };
    assert_eq!(cache(&store)?, 0);
    clock.advance(Duration::from_secs(60));
    let mut removed = 0;
    loop {
        let swept = store.sweep(64)?;
        removed += swept.removed;
        if !swept.more {
            break;
        }
    }
    assert_eq!(removed, 200);
    assert_eq!(cache(&store)?, 0, "the sweep's reads were cached");
    assert_replays(&store, 0, 20, 300)?;
    assert!(
        cache(&store)? >= 20 * 300,
        "replays read from the file were not cached"
    );
    Ok(())
}

/// A sweep removes records from the database file on its own thread, beside the writer; here
/// two sweepers race two callers that claim expired keys again (so a key the sweep removed may
/// be rewritten before it commits, and must be put back) and new keys, with checkpoints every
/// few milliseconds. Afterwards every count is
/// exact: the records, the expiry entries, what replays, and the scope's quota, which admits
/// exactly the records that are missing to fill it, before and after a reopen.
#[test]
fn sweeps_beside_the_writer_race_its_writes_and_keep_every_count_exact() -> TestResult {
    const OLD: u32 = 1_200;
    const NEW: u32 = 300;
    const QUOTA: u64 = 2_000;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let open = || {
        wal_builder(&clock)
            .checkpoint_interval(Duration::from_millis(5))
            .limits(idemstore::Limits::default().max_records_per_scope(QUOTA))
            .open(&path)
    };
    let store = open()?;
    for i in 0..OLD {
        let lease = acquired(store.claim("s", format!("old{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, b"old", Duration::from_secs(10))?;
    }
    clock.advance(Duration::from_secs(20));
    let detached_before = store.stats()?.wal.expect("a log").detached_sweeps;
    std::thread::scope(|s| -> TestResult {
        let sweepers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<(), Error> {
                    while store.sweep(16)?.more {}
                    Ok(())
                })
            })
            .collect();
        let again = s.spawn(|| -> Result<(), Error> {
            for i in (0..OLD).step_by(3) {
                let lease = acquired(store.claim("s", format!("old{i}"), "fp2", &opts(1_000))?);
                store.complete(&lease, b"again", DAY)?;
            }
            Ok(())
        });
        let fresh = s.spawn(|| -> Result<(), Error> {
            for i in 0..NEW {
                let lease = acquired(store.claim("s", format!("new{i}"), "fp", &opts(1_000))?);
                store.complete(&lease, b"new", DAY)?;
            }
            Ok(())
        });
        for handle in sweepers.into_iter().chain([again, fresh]) {
            handle.join().map_err(|_| "a thread panicked")??;
        }
        Ok(())
    })?;
    while store.sweep(64)?.more {}
    let live = u64::from(OLD.div_ceil(3) + NEW);
    let stats = store.stats()?;
    assert_eq!((stats.records, stats.expiry_entries), (live, live));
    let detached = stats.wal.expect("a log").detached_sweeps - detached_before;
    assert!(detached > 0, "no sweep committed beside the writer");
    for i in 0..OLD {
        let record = store.get("s", format!("old{i}"))?;
        if i % 3 == 0 {
            let record = record.ok_or(format!("old{i} is missing"))?;
            assert_eq!(
                record.state,
                RecordState::Completed {
                    outcome: b"again".to_vec()
                }
            );
        } else {
            assert!(record.is_none(), "old{i} should be swept");
        }
    }
    // The scope's count is exact: the quota admits exactly the records missing to fill it.
    let mut admitted = 0u64;
    loop {
        match store.claim("s", format!("fill{admitted}"), "fp", &opts(1_000)) {
            Ok(Claim::Acquired(_)) => admitted += 1,
            Err(Error::QuotaExceeded { .. }) => break,
            other => return Err(format!("fill{admitted}: {other:?}").into()),
        }
    }
    assert_eq!(admitted, QUOTA - live);
    store.close()?;
    let store = open()?;
    assert_eq!(store.stats()?.records, QUOTA);
    assert!(matches!(
        store.claim("s", "one-more", "fp", &opts(1_000)),
        Err(Error::QuotaExceeded { .. })
    ));
    Ok(())
}

/// Sweeps in small steps start after what earlier sweeps removed (the sweep's floor), which
/// must never hide an entry: here a store with a log (checkpointed rarely, so the removals
/// pile up in the map, and after every commit) runs the same script as a format-1 store —
/// partial sweeps, a clock set back (which the engine's time does not follow until a reopen),
/// checkpoints, reopens — and both must hold the same records after every step.
#[test]
fn partial_sweeps_with_a_clock_set_back_remove_what_a_format_1_store_removes() -> TestResult {
    let dir = tempfile::tempdir()?;
    for interval in [Duration::from_secs(3600), Duration::ZERO] {
        let clock = clock();
        let wal_path = dir.path().join(format!("wal-{}.redb", interval.as_secs()));
        let plain_path = dir
            .path()
            .join(format!("plain-{}.redb", interval.as_secs()));
        let open_wal = || {
            wal_builder(&clock)
                .checkpoint_interval(interval)
                .open(&wal_path)
        };
        let open_plain = || {
            Store::builder()
                .clock(clock.clone())
                .sweep_interval(None)
                .open(&plain_path)
        };
        let (mut wal, mut plain) = (open_wal()?, open_plain()?);
        let mut rng = 0x5EED_u64 ^ interval.as_secs();
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut keys = Vec::new();
        for step in 0..400u32 {
            match next() % 10 {
                0..=4 => {
                    // A record whose retention ends within the next 10 s.
                    let key = format!("k{step}");
                    let retention = Duration::from_millis(1 + next() % 10_000);
                    for store in [&wal, &plain] {
                        let lease = acquired(store.claim("s", &key, "fp", &opts(500))?);
                        store.complete(&lease, key.as_bytes(), retention)?;
                    }
                    keys.push(key);
                }
                5 | 6 => {
                    let limit = (next() % 7) as usize;
                    let (a, b) = (wal.sweep(limit)?, plain.sweep(limit)?);
                    assert_eq!(a, b, "step {step}: sweep({limit})");
                }
                7 => clock.advance(Duration::from_millis(next() % 20_000)),
                8 => {
                    // Back by up to 30 s (a wall clock stepped back).
                    let now = idemstore::Clock::now_ms(&clock);
                    clock.set(now - next() % 30_000);
                }
                _ => {
                    if next() % 4 == 0 {
                        wal.close()?;
                        plain.close()?;
                        (wal, plain) = (open_wal()?, open_plain()?);
                    }
                }
            }
            for key in &keys {
                let (a, b) = (wal.get("s", key)?, plain.get("s", key)?);
                assert_eq!(a.is_some(), b.is_some(), "step {step}: key {key}");
            }
            let (a, b) = (wal.stats()?, plain.stats()?);
            assert_eq!(
                (a.records, a.expiry_entries),
                (b.records, b.expiry_entries),
                "step {step}"
            );
        }
        // Everything expires: both sweep it all, and the log store keeps nothing back.
        clock.advance(Duration::from_secs(3600));
        while wal.sweep(5)?.more {}
        while plain.sweep(5)?.more {}
        assert_eq!(wal.stats()?.records, 0);
        assert_eq!(plain.stats()?.records, 0);
        assert_eq!(wal.stats()?.expiry_entries, 0);
    }
    Ok(())
}

/// A store with a log on two new simulated disks (database file, log), checkpointed every
/// `interval`; returned with the disks.
fn on_simulated_disks(
    clock: &idemstore::ManualClock,
    interval: Duration,
) -> idemstore::Result<(Store, SimDisk, SimDisk)> {
    let (disk, log) = (SimDisk::new(), SimDisk::new());
    let store = wal_builder(clock)
        .checkpoint_interval(interval)
        .open_with_backends(disk.clone(), log.clone())?;
    Ok((store, disk, log))
}

/// A power cut right now: the durable images of both disks, each on a new disk.
fn power_cut(disk: &SimDisk, log: &SimDisk) -> (SimDisk, SimDisk) {
    (
        SimDisk::from_image(disk.durable_image()),
        SimDisk::from_image(log.durable_image()),
    )
}

#[test]
fn a_power_cut_keeps_every_acknowledged_batch_with_or_without_checkpoints() -> TestResult {
    for interval in [Duration::from_secs(3600), Duration::ZERO] {
        let clock = clock();
        let (store, disk, log) = on_simulated_disks(&clock, interval)?;
        let mut token = 0;
        for round in 0..5u32 {
            complete_keys(&store, round * 20, 20, 300)?;
            let (d, l) = power_cut(&disk, &log);
            let recovered = wal_builder(&clock).open_with_backends(d, l)?;
            assert_replays(&recovered, 0, (round + 1) * 20, 300)?;
            // Tokens never go back: a new lease is above every acknowledged one.
            let lease = acquired(recovered.claim("s", format!("new{round}"), "fp", &opts(1))?);
            assert!(lease.token() > token, "interval {interval:?}");
            token = lease.token();
        }
    }
    Ok(())
}

#[test]
fn a_failed_log_sync_acknowledges_nothing_and_stops_writes() -> TestResult {
    let clock = clock();
    let (store, disk, log) = on_simulated_disks(&clock, Duration::from_secs(3600))?;
    complete_keys(&store, 0, 10, 50)?;
    log.set_fault(Some(Fault {
        on: Target::Only(Call::Sync),
        nth: log.counts().syncs + 1,
        persistent: false,
        full: false,
    }));
    let lease = store.claim("s", "doomed", "fp", &opts(60_000));
    assert!(
        matches!(lease, Err(Error::CommitOutcomeUnknown { .. })),
        "{lease:?}"
    );
    // No retried fsync: the store refuses writes until reopened.
    assert!(matches!(
        store.claim("s", "after", "fp", &opts(60_000)),
        Err(Error::Poisoned { .. })
    ));
    assert_replays(&store, 0, 10, 50)?;
    drop(store);
    let (d, l) = power_cut(&disk, &log);
    let recovered = wal_builder(&clock).open_with_backends(d, l)?;
    assert_replays(&recovered, 0, 10, 50)?;
    // The failed batch was never acknowledged: either outcome is allowed, but the key works.
    match recovered.claim("s", "doomed", "fp", &opts(60_000))? {
        Claim::Acquired(_) | Claim::InProgress { .. } => {}
        other => panic!("unexpected {other:?}"),
    }
    Ok(())
}

/// A sweep of the database file commits in a transaction of its own, not durably: its pages
/// reach the file with the next checkpoint. When that write fails, the store stops writes,
/// and after a power cut every acknowledged record is there, the sweep's removals all there or
/// none, and the counts match what is.
#[test]
fn a_failed_write_after_a_sweep_of_the_database_file_loses_nothing() -> TestResult {
    let clock = clock();
    let (store, disk, log) = on_simulated_disks(&clock, Duration::ZERO)?;
    for i in 0..20u32 {
        let lease = acquired(store.claim("s", format!("old{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, b"old", Duration::from_secs(10))?;
    }
    complete_keys(&store, 0, 10, 50)?;
    // A checkpoint follows every commit: wait until redb holds everything, so that the
    // sweep's records are below the map and it sweeps the file itself.
    while store.stats()?.wal.expect("a log").checkpoint_lag_batches > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    clock.advance(Duration::from_secs(20));
    let writes = disk.counts().of(Call::Write);
    let before = store.stats()?.wal.expect("a log").detached_sweeps;
    let swept = store.sweep(100)?;
    assert_eq!((swept.removed, swept.more), (20, false));
    assert_eq!(
        store.stats()?.wal.expect("a log").detached_sweeps,
        before + 1
    );
    assert_eq!(
        disk.counts().of(Call::Write),
        writes,
        "a sweep's commit writes nothing"
    );
    disk.set_fault(Some(Fault {
        on: Target::Only(Call::Write),
        nth: writes + 1,
        persistent: true,
        full: false,
    }));
    // Acknowledged through the log; the checkpoint after it fails. The step that is refused
    // may have had its claim acknowledged before its completion was refused: that record
    // stays, claimed.
    let mut acknowledged = 10;
    let mut claimed_only = 0;
    let mut refused = None;
    for i in 10..2_000u32 {
        let lease = match store.claim("s", format!("k{i}"), "fp", &opts(60_000)) {
            Ok(claim) => acquired(claim),
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let mut outcome = vec![(i % 251) as u8; 50];
        outcome[..4].copy_from_slice(&i.to_le_bytes());
        match store.complete(&lease, &outcome, DAY) {
            Ok(()) => acknowledged += 1,
            Err(e) => {
                claimed_only = 1;
                refused = Some(e);
                break;
            }
        }
    }
    assert!(refused.is_some(), "a failed checkpoint stops writes");
    assert!(disk.injected() > 0);
    disk.set_fault(None);
    let (d, l) = power_cut(&disk, &log);
    drop(store);
    let recovered = wal_builder(&clock).open_with_backends(d, l)?;
    assert_replays(&recovered, 0, acknowledged, 50)?;
    let live = u64::from(acknowledged) + claimed_only;
    let stats = recovered.stats()?;
    assert!(
        [(live, live), (live + 20, live + 20)].contains(&(stats.records, stats.expiry_entries)),
        "{stats:?}"
    );
    while recovered.sweep(7)?.more {}
    let stats = recovered.stats()?;
    assert_eq!((stats.records, stats.expiry_entries), (live, live));
    Ok(())
}

#[test]
fn damage_before_synced_batches_is_refused_but_a_torn_tail_is_dropped() -> TestResult {
    let clock = clock();
    let (store, disk, log) = on_simulated_disks(&clock, Duration::from_secs(3600))?;
    complete_keys(&store, 0, 30, 200)?;
    drop_without_checkpoint(store, &disk, &log, |disk_image, mut log_image| {
        // The first batch: the segment's header sector, then its first chunk. Flip a payload
        // byte of it.
        let segment = first_nonzero(&log_image);
        log_image[segment + 512 + 100] ^= 0x40;
        let r = wal_builder(&clock).open_with_backends(
            SimDisk::from_image(disk_image),
            SimDisk::from_image(log_image),
        );
        match r {
            Err(Error::Corrupt { location, .. }) => assert!(location.contains("log"), "{location}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    });

    let (store, disk, log) = on_simulated_disks(&clock, Duration::from_secs(3600))?;
    complete_keys(&store, 0, 30, 200)?;
    drop_without_checkpoint(store, &disk, &log, |disk_image, mut log_image| {
        // The last batch written (the completion of k29): zero its sectors, as a torn write.
        let end = last_nonzero(&log_image);
        let start = end.saturating_sub(1) / 512 * 512;
        log_image[start..end].fill(0);
        let recovered = wal_builder(&clock)
            .open_with_backends(
                SimDisk::from_image(disk_image),
                SimDisk::from_image(log_image),
            )
            .expect("a torn tail is dropped");
        assert_replays(&recovered, 0, 29, 200).expect("all but the torn batch");
        let r = recovered
            .get("s", "k29")
            .expect("readable")
            .expect("claimed");
        assert!(
            matches!(r.state, RecordState::InFlight { .. }),
            "{:?}",
            r.state
        );
    });
    Ok(())
}

/// A damaged header of the newest segment, whose chunks show that it held synced batches, is
/// refused rather than read as the end of the log (which would drop every acknowledged batch
/// in the segment): damage to its magic, sequence, first LSN or checksum.
#[test]
fn a_damaged_header_of_a_segment_holding_synced_batches_is_refused() -> TestResult {
    let clock = clock();
    for at in [3, 17, 25, 41] {
        let (store, disk, log) = on_simulated_disks(&clock, Duration::from_secs(3600))?;
        complete_keys(&store, 0, 30, 200)?;
        drop_without_checkpoint(store, &disk, &log, |disk_image, mut log_image| {
            let segment = first_nonzero(&log_image);
            log_image[segment + at] ^= 0x40;
            let r = wal_builder(&clock).open_with_backends(
                SimDisk::from_image(disk_image),
                SimDisk::from_image(log_image),
            );
            match r {
                Err(Error::Corrupt { location, reason }) => {
                    assert!(location.contains("log"), "byte {at}: {location}");
                    assert!(reason.contains("header"), "byte {at}: {reason}");
                }
                other => panic!("byte {at}: expected Corrupt, got {other:?}"),
            }
        });
    }
    Ok(())
}

fn first_nonzero(image: &[u8]) -> usize {
    image.iter().position(|&b| b != 0).expect("a written log")
}

fn last_nonzero(image: &[u8]) -> usize {
    image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// The durable images as a crash would leave them (no final checkpoint), handed to `check`.
fn drop_without_checkpoint(
    store: Store,
    disk: &SimDisk,
    log: &SimDisk,
    check: impl FnOnce(Vec<u8>, Vec<u8>),
) {
    let (d, l) = (disk.durable_image(), log.durable_image());
    drop(store);
    check(d, l);
}

#[test]
fn a_log_with_batches_is_never_replaced_nor_read_over_a_new_database_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let log = dir.path().join("idem.redb.wal");
    let clock = clock();
    {
        let store = wal_builder(&clock).wal_segments(2).open(&path)?;
        complete_keys(&store, 0, 20, 10)?;
        store.close()?;
    }
    let batches = std::fs::read(&log)?;
    // The database file lost (or emptied): both formats refuse rather than start an empty
    // store (the log's batches lie on top of the records the file held).
    std::fs::remove_file(&path)?;
    for with_log in [true, false] {
        let opened = wal_builder(&clock).write_ahead_log(with_log).open(&path);
        assert!(matches!(opened, Err(Error::Corrupt { .. })), "{opened:?}");
        assert!(!path.exists());
    }
    std::fs::write(&path, b"")?;
    let opened = wal_builder(&clock).open(&path);
    assert!(matches!(opened, Err(Error::Corrupt { .. })), "{opened:?}");
    assert_eq!(std::fs::read(&log)?, batches, "the log is left as it was");
    // A format-1 store with that log beside it: upgrading would replace the log; refused.
    std::fs::remove_file(&path)?;
    std::fs::rename(&log, dir.path().join("kept.wal"))?;
    file_store(&path, &clock).close()?;
    std::fs::rename(dir.path().join("kept.wal"), &log)?;
    let Err(e) = wal_builder(&clock).wal_segments(2).open(&path) else {
        panic!("a log with batches is in the way of the upgrade");
    };
    let Error::Io(io) = &e else {
        panic!("an I/O error, not {e:?}");
    };
    assert_eq!(io.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(
        e.to_string().contains("idem.redb.wal"),
        "names the log: {e}"
    );
    assert_eq!(std::fs::read(&log)?, batches, "the log is left as it was");
    Ok(())
}

#[test]
fn a_log_creation_cut_short_is_cleaned_up_by_the_next_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let log = dir.path().join("idem.redb.wal");
    let clock = clock();
    file_store(&path, &clock).close()?;
    // What a process killed while creating the log leaves: its temporary file, or (killed
    // after the rename, before the upgrade was committed) a log of zeros under its name.
    let left = dir.path().join("idem.redb.wal.creating-4242");
    std::fs::write(&left, vec![0u8; 4096])?;
    std::fs::write(&log, vec![0u8; 1 << 20])?;
    let store = wal_builder(&clock).wal_segments(2).open(&path)?;
    complete_keys(&store, 0, 3, 10)?;
    store.close()?;
    assert!(!left.exists());
    let store = file_store(&path, &clock);
    assert!(store.stats()?.wal.is_some());
    assert_replays(&store, 0, 3, 10)?;
    Ok(())
}

#[test]
fn commits_stay_within_what_a_small_log_holds_and_larger_outcomes_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    // Two segments of 1 MiB: a batch of four 600 kB completions would not fit the log.
    let store = wal_builder(&clock).wal_segments(2).open(&path)?;
    let outcome = |i: u8| vec![i; 600_000];
    std::thread::scope(|s| -> TestResult {
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let store = &store;
                s.spawn(move || -> Result<(), Error> {
                    for round in 0..3u8 {
                        let key = format!("big{i}-{round}");
                        let lease = acquired(store.claim("s", &key, "fp", &opts(60_000))?);
                        store.complete(&lease, &outcome(i), DAY)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "a caller panicked")??;
        }
        Ok(())
    })?;
    assert!(!store.stats()?.poisoned);
    // An outcome within the limits but beyond what the log can hold is refused up front,
    // and the lease stays usable.
    let lease = acquired(store.claim("s", "huge", "fp", &opts(60_000))?);
    let refused = store.complete(&lease, &vec![1u8; 1 << 20], DAY);
    assert!(
        matches!(
            refused,
            Err(Error::TooLarge {
                what: idemstore::Input::Outcome,
                actual: 1_048_576,
                ..
            })
        ),
        "{refused:?}"
    );
    // One just below what a batch holds fits.
    let most = acquired(store.claim("s", "most", "fp", &opts(60_000))?);
    store.complete(&most, &vec![2u8; 1_040_000], DAY)?;
    store.complete(&lease, b"small", DAY)?;
    store.close()?;
    let store = file_store(&path, &clock);
    for i in 0..4u8 {
        for round in 0..3u8 {
            let r = replay(store.claim("s", format!("big{i}-{round}"), "fp", &opts(60_000))?);
            assert_eq!(r.outcome, outcome(i));
        }
    }
    assert_eq!(
        replay(store.claim("s", "huge", "fp", &opts(60_000))?).outcome,
        b"small"
    );
    assert_eq!(
        replay(store.claim("s", "most", "fp", &opts(60_000))?)
            .outcome
            .len(),
        1_040_000
    );
    Ok(())
}

/// Two segments of 1 MiB, nothing checkpointed by time: batches must fit what is left.
fn small_log(clock: &idemstore::ManualClock) -> StoreBuilder {
    wal_builder(clock)
        .wal_segments(2)
        .checkpoint_interval(Duration::from_secs(3600))
}

/// A sweep of records whose scopes and keys are as long as the limits allow, each in a scope
/// of its own, into a log with little room left: every removal also writes its scope's count,
/// and the sweep is bounded by all of it, so what was acknowledged after it survives a power
/// cut.
#[test]
fn a_sweep_of_long_keys_in_many_scopes_fits_the_log_and_loses_nothing() -> TestResult {
    let clock = clock();
    let (disk, log) = (SimDisk::new(), SimDisk::new());
    let store = small_log(&clock).open_with_backends(disk.clone(), log.clone())?;
    let key = "k".repeat(255);
    let short = ClaimOptions::default()
        .lease(Duration::from_millis(500))
        .retention(Duration::from_secs(1));
    for i in 0..1_000u32 {
        let lease = acquired(store.claim(format!("{i:0>255}"), &key, "fp", &short)?);
        store.complete(&lease, b"x", Duration::from_secs(1))?;
    }
    clock.advance(Duration::from_secs(10));
    let (disk, log) = power_cut(&disk, &log);
    drop(store);
    let store = small_log(&clock).open_with_backends(disk.clone(), log.clone())?;
    // Most of the fresh segment taken by one completion.
    let pad = acquired(store.claim("p", "pad", "fp", &opts(60_000))?);
    store.complete(&pad, &vec![7u8; 900_000], DAY)?;
    let mut removed = 0;
    loop {
        let swept = store.sweep(1_000)?;
        removed += swept.removed;
        if !swept.more {
            break;
        }
    }
    assert_eq!(removed, 1_000);
    let after = acquired(store.claim("p", "after", "fp", &opts(60_000))?);
    store.complete(&after, b"acknowledged", DAY)?;
    assert!(!store.stats()?.poisoned);
    let (disk, log) = power_cut(&disk, &log);
    drop(store);
    let store = small_log(&clock).open_with_backends(disk, log)?;
    assert_eq!(
        replay(store.claim("p", "after", "fp", &opts(60_000))?).outcome,
        b"acknowledged"
    );
    assert_eq!(store.stats()?.records, 2);
    Ok(())
}

/// Records keep checkpoints stored under larger limits than today's: the commands that keep
/// them (`extend` here) are batched as if each kept the longest checkpoint there is, so
/// concurrent ones never make a batch the log cannot hold.
#[test]
fn checkpoints_stored_under_larger_limits_are_kept_within_the_log() -> TestResult {
    let clock = clock();
    let (disk, log) = (SimDisk::new(), SimDisk::new());
    let larger = idemstore::Limits::default().max_checkpoint_len(1 << 20);
    let store = small_log(&clock)
        .limits(larger)
        .open_with_backends(disk.clone(), log.clone())?;
    for i in 0..6u8 {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(600_000))?);
        store.checkpoint(&lease, &vec![i; 400_000])?;
    }
    let (disk, log) = power_cut(&disk, &log);
    drop(store);
    // Reopened under the default limits (checkpoints up to 64 KiB).
    let store = small_log(&clock).open_with_backends(disk.clone(), log.clone())?;
    let leases = (0..6u8)
        .map(|i| {
            Ok(acquired(store.claim(
                "s",
                format!("k{i}"),
                "fp",
                &opts(600_000),
            )?))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    std::thread::scope(|s| -> TestResult {
        let handles: Vec<_> = leases
            .into_iter()
            .map(|mut lease| {
                let store = &store;
                s.spawn(move || -> Result<(), Error> {
                    for _ in 0..30 {
                        store.extend(&mut lease, Duration::from_secs(60))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "a caller panicked")??;
        }
        Ok(())
    })?;
    assert!(!store.stats()?.poisoned);
    let (disk, log) = power_cut(&disk, &log);
    drop(store);
    let store = small_log(&clock).open_with_backends(disk, log)?;
    for i in 0..6u8 {
        let record = store
            .get("s", format!("k{i}"))?
            .ok_or("a record is missing")?;
        match record.state {
            RecordState::InFlight { checkpoint, .. } => {
                assert_eq!(checkpoint, Some(vec![i; 400_000]));
            }
            other => panic!("k{i}: {other:?}"),
        }
    }
    Ok(())
}

/// A record no batch of the log can hold (its checkpoint was stored before the store had
/// this small a log) cannot be taken over: the claim is refused with `TooLarge` for the
/// record, nothing changes, and the store goes on.
#[test]
fn a_record_too_large_for_the_log_is_refused_and_the_store_goes_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let larger = idemstore::Limits::default().max_checkpoint_len(1 << 20);
    {
        // Format 1 (no log) under larger limits: a checkpoint of 1 MiB.
        let store = Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .limits(larger.clone())
            .open(&path)?;
        let lease = acquired(store.claim("s", "big", "fp", &opts(1_000))?);
        store.checkpoint(&lease, &vec![5u8; 1 << 20])?;
        store.close()?;
    }
    clock.advance(Duration::from_secs(2));
    // Upgraded to format 2 with a log whose batches hold about 1,040,000 bytes.
    let store = small_log(&clock).limits(larger).open(&path)?;
    let refused = store.claim("s", "big", "fp", &opts(60_000));
    assert!(
        matches!(
            refused,
            Err(Error::TooLarge {
                what: idemstore::Input::Record,
                ..
            })
        ),
        "{refused:?}"
    );
    let stats = store.stats()?;
    assert!(!stats.poisoned);
    let lease = acquired(store.claim("s", "other", "fp", &opts(60_000))?);
    store.complete(&lease, b"fine", DAY)?;
    store.close()?;
    let store = file_store(&path, &clock);
    match store.get("s", "big")?.ok_or("the record is gone")?.state {
        RecordState::InFlight { checkpoint, .. } => {
            assert_eq!(checkpoint.map(|c| c.len()), Some(1 << 20));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        replay(store.claim("s", "other", "fp", &opts(60_000))?).outcome,
        b"fine"
    );
    Ok(())
}

#[test]
fn a_format_1_store_upgrades_to_format_2() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v1.redb");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1.redb"),
        &path,
    )?;
    let before = ReadOnlyStore::open(&path)?.summary()?;
    assert_eq!(before.format_version, 1);
    let clock = clock();
    {
        let store = wal_builder(&clock).open(&path)?;
        assert_eq!(store.stats()?.records, before.records);
        complete_keys(&store, 0, 5, 10)?;
        store.close()?;
    }
    let store = file_store(&path, &clock);
    assert_eq!(store.stats()?.records, before.records + 5);
    assert_replays(&store, 0, 5, 10)?;
    Ok(())
}

#[test]
fn a_failed_checkpoint_loses_nothing_acknowledged_and_stops_writes() -> TestResult {
    let clock = clock();
    let (store, disk, log) = on_simulated_disks(&clock, Duration::ZERO)?;
    complete_keys(&store, 0, 20, 100)?;
    // Every later sync of the database file fails: the next checkpoint cannot commit.
    disk.set_fault(Some(Fault {
        on: Target::Only(Call::Sync),
        nth: disk.counts().syncs + 1,
        persistent: true,
        full: false,
    }));
    let mut acknowledged = 20;
    let mut refused = None;
    for i in 20..2_000u32 {
        match complete_keys(&store, i, 1, 100) {
            Ok(()) => acknowledged += 1,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("a failed checkpoint stops writes");
    assert!(disk.injected() > 0);
    // Reads keep working, from the map and the log.
    assert_replays(&store, 0, acknowledged, 100)?;
    let (d, l) = power_cut(&disk, &log);
    drop(store);
    let recovered = wal_builder(&clock).open_with_backends(d, l)?;
    assert_replays(&recovered, 0, acknowledged, 100)
        .map_err(|e| format!("after {refused}: {e}"))?;
    Ok(())
}

#[test]
fn stats_report_the_checkpoint_lag_and_a_clean_close_leaves_nothing_to_replay() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let store = wal_builder(&clock)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&path)?;
    complete_keys(&store, 0, 10, 100)?;
    let wal = store.stats()?.wal.expect("a log");
    // One batch per claim and per completion (one caller), none checkpointed yet.
    assert_eq!(wal.checkpoint_lag_batches, 20, "{wal:?}");
    assert!(wal.checkpoint_lag_bytes >= 20 * 512, "{wal:?}");
    assert!(wal.map_bytes >= 10 * 100, "{wal:?}");
    assert!(wal.log_bytes > 0, "{wal:?}");
    assert_eq!(wal.checkpoints, 0, "{wal:?}");
    store.close()?;
    // The close checkpointed everything: the next open replays nothing.
    let store = wal_builder(&clock).open(&path)?;
    let wal = store.stats()?.wal.expect("a log");
    assert_eq!(
        (wal.checkpoint_lag_batches, wal.map_bytes),
        (0, 0),
        "{wal:?}"
    );
    assert_replays(&store, 0, 10, 100)?;
    Ok(())
}

#[test]
fn the_map_stays_within_its_budget_under_a_steady_stream_of_writes() -> TestResult {
    let clock = clock();
    let budget = idemstore::MAP_BUDGET_MIN;
    let (disk, log) = (SimDisk::new(), SimDisk::new());
    // Checkpoints come from size alone: the budget, not the interval, bounds the map.
    let store = wal_builder(&clock)
        .checkpoint_interval(Duration::from_secs(3600))
        .map_budget(budget)
        .open_with_backends(disk, log)?;
    let outcome = 4 * 1024;
    let mut peak = 0;
    for i in 0..200u32 {
        complete_keys(&store, i, 1, outcome)?;
        let wal = store.stats()?.wal.expect("a log");
        peak = peak.max(wal.map_bytes);
    }
    let wal = store.stats()?.wal.expect("a log");
    assert!(wal.checkpoints >= 5, "{wal:?}");
    // Two layers of half the budget each, each past it by at most one batch.
    let slack = 2 * (outcome as u64 + 1024);
    assert!(
        peak <= budget as u64 + slack,
        "peak {peak} over budget {budget}"
    );
    assert_replays(&store, 0, 200, outcome)?;
    Ok(())
}

/// Finds `needle` in the file at `path`; returns its offset.
fn find_in_file(path: &std::path::Path, needle: &[u8]) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p as u64)
}

fn flip_byte_at(path: &std::path::Path, at: u64) -> TestResult {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&[b[0] ^ 0x40])?;
    f.sync_all()?;
    Ok(())
}

/// A store with a log opens without reading its whole file, and verifies its pages on demand
/// and in the background instead: an intact file passes, a damaged record page is found by
/// both (and the damaged record itself reads as corrupt, never as another answer).
#[test]
fn pages_are_verified_on_demand_and_by_the_background_scrub() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let marker = b"page-check-marker-0123456789";
    {
        let store = wal_builder(&clock).open(&path)?;
        complete_keys(&store, 0, 300, 200)?;
        let lease = acquired(store.claim("s", "marked", "fp", &opts(60_000))?);
        store.complete(&lease, marker, DAY)?;
        store.close()?;
    }
    let store = wal_builder(&clock)
        .scrub_interval(Some(Duration::from_millis(20)))
        .open(&path)?;
    let check = store.verify_pages()?;
    assert!(
        check.bytes >= std::fs::metadata(&path)?.len() / 2,
        "{check:?}"
    );
    // The scrub runs and finds nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.stats()?.wal.map_or(0, |w| w.scrubs) < 2 {
        assert!(std::time::Instant::now() < deadline, "no scrub ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(store.stats()?.wal.map(|w| w.scrubs_failed), Some(0));

    // Bit rot in the page that holds the marked record, under the open store.
    let at = find_in_file(&path, marker).ok_or("the record is in the database file")?;
    flip_byte_at(&path, at + 3)?;
    match store.verify_pages() {
        Err(Error::Corrupt { location, .. }) => assert_eq!(location, "database file"),
        other => panic!("a damaged page must be found: {other:?}"),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.stats()?.wal.map_or(0, |w| w.scrubs_failed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the scrub missed the damage"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(store);
    // Reopened (no page check on open by default with a log): the record reads as corrupt.
    let store = wal_builder(&clock).scrub_interval(None).open(&path)?;
    assert!(matches!(
        store.get("s", "marked"),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(store.verify_pages(), Err(Error::Corrupt { .. })));
    drop(store);
    // Asked for, the page check on open refuses the file.
    assert!(matches!(
        wal_builder(&clock).verify_on_open(true).open(&path),
        Err(Error::Corrupt { .. })
    ));
    Ok(())
}

/// `verify_pages` on the other kinds of store: a format-1 file (at a relaxed durability too)
/// verifies; a store in memory has no file, which is a typed error.
#[test]
fn pages_of_a_format_1_store_verify_and_a_memory_store_has_none() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(idemstore::Durability::Relaxed {
            max_unsynced: Duration::from_secs(60),
        })
        .open(dir.path().join("plain.redb"))?;
    complete_keys(&store, 0, 200, 100)?;
    assert!(store.verify_pages()?.bytes > 0);
    complete_keys(&store, 200, 50, 100)?;
    assert!(store.verify_pages()?.bytes > 0);
    assert_replays(&store, 0, 250, 100)?;
    let memory = Store::builder().open_in_memory()?;
    match memory.verify_pages() {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported),
        other => panic!("{other:?}"),
    }
    Ok(())
}

/// A close that lands while a checkpoint runs still checkpoints what the writer added
/// meanwhile: the next open replays nothing. (The checkpointer used to stop once the layer it
/// was writing was done, leaving the newer one to the log; with a checkpoint after every
/// commit, some of these closes land in that window.)
#[test]
fn a_close_during_a_checkpoint_still_checkpoints_everything() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let builder = || {
        wal_builder(&clock)
            .checkpoint_interval(Duration::ZERO)
            .scrub_interval(None)
    };
    for round in 0..150u32 {
        let store = builder().open(&path)?;
        let wal = store.stats()?.wal.ok_or("a log")?;
        assert_eq!(
            (wal.checkpoint_lag_batches, wal.map_bytes),
            (0, 0),
            "round {round}: the open replayed what the last close left: {wal:?}"
        );
        complete_keys(&store, round * 2, 2, 50)?;
        store.close()?;
    }
    Ok(())
}

/// Tokens granted in batches that only the log held (the process died before a checkpoint)
/// stay below the next token after the checkpoint that moves those batches into the database
/// file, even when nothing grants a token in between.
#[test]
fn the_next_token_survives_a_replay_and_the_checkpoint_after_it() -> TestResult {
    let clock = clock();
    let disk = SimDisk::new();
    let log = SimDisk::new();
    let builder = || {
        wal_builder(&clock)
            .checkpoint_interval(Duration::from_secs(3600))
            .scrub_interval(None)
    };
    let store = builder().open_with_backends(disk.clone(), log.clone())?;
    let mut last = 0;
    for i in 0..5 {
        let lease = acquired(store.claim("s", format!("t{i}"), "fp", &opts(60_000))?);
        last = lease.token();
        store.complete(&lease, b"done", DAY)?;
    }
    let (mut d, mut l) = (Vec::new(), Vec::new());
    drop_without_checkpoint(store, &disk, &log, |dd, ll| (d, l) = (dd, ll));
    // The open replays the log; only a replay (no new token) happens before the close, whose
    // checkpoint moves the replayed batches into the database file.
    let (disk, log) = (SimDisk::from_image(d), SimDisk::from_image(l));
    let store = builder().open_with_backends(disk.clone(), log.clone())?;
    assert!(store.stats()?.next_token > last);
    replay(store.claim("s", "t0", "fp", &opts(60_000))?);
    store.close()?;
    let store = builder().open_with_backends(disk, log)?;
    assert_eq!(
        store.stats()?.wal.map(|w| w.checkpoint_lag_batches),
        Some(0)
    );
    assert!(
        store.stats()?.next_token > last,
        "next token {} is not above the last granted {last}",
        store.stats()?.next_token
    );
    Ok(())
}

/// The checkpointer never waits for the writer's lock: the writer holds it while it waits for
/// a checkpoint (back-pressure of a full map), and a checkpointer that had found nothing
/// frozen and then queued for that lock would wait forever. Many writers against the smallest
/// map budget and a checkpoint due every millisecond give that interleaving a chance (it hung
/// one run in three of a single round before the fix, and tests/power_loss.rs's checkpoint mode
/// hit it more often); the run must finish (a watchdog fails it instead of hanging).
#[test]
fn back_pressure_never_deadlocks_with_the_checkpointer() -> TestResult {
    for round in 0..10 {
        back_pressure_round(round)?;
    }
    Ok(())
}

fn back_pressure_round(round: u32) -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let store = std::sync::Arc::new(
        wal_builder(&clock)
            .checkpoint_interval(Duration::from_millis(1))
            .map_budget(idemstore::MAP_BUDGET_MIN)
            .scrub_interval(None)
            .open(dir.path().join("idem.redb"))?,
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for t in 0..8u32 {
        let (store, done_tx) = (std::sync::Arc::clone(&store), done_tx.clone());
        std::thread::spawn(move || {
            let result = (|| -> TestResult {
                for i in 0..150u32 {
                    let key = format!("t{t}-{i}");
                    let lease = acquired(store.claim("s", &key, "fp", &opts(60_000))?);
                    store.complete(&lease, &vec![t as u8; 4_000], DAY)?;
                }
                Ok(())
            })();
            let _ = done_tx.send(result.map_err(|e| e.to_string()));
        });
    }
    for _ in 0..8 {
        match done_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(result) => result?,
            Err(_) => panic!(
                "round {round}: writers stalled: the checkpointer and the writer wait for each other"
            ),
        }
    }
    let wal = store.stats()?.wal.ok_or("a log")?;
    assert!(wal.checkpoints > 10, "{wal:?}");
    Ok(())
}
