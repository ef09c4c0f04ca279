//! Sweeping: the expiry index is walked from the oldest entry in bounded batches, removes
//! exactly the expired records, and frees space that later writes reuse.

mod common;

use std::time::Duration;

use common::*;
use idemstore::Store;

fn fill(store: &Store, prefix: &str, n: usize, retention: Duration) -> TestResult {
    for i in 0..n {
        let lease = acquired(store.claim("s", format!("{prefix}{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, &[1u8; 512], retention)?;
    }
    Ok(())
}

/// `more` is exact at the limit: a sweep that takes the last due entries says none remain,
/// and one that leaves a single due entry says one does, with and without the write-ahead log
/// (whose due entries come from the record map and from redb).
#[test]
fn sweep_says_more_exactly_when_due_entries_remain_past_the_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    for wal in [false, true] {
        let clock = clock();
        let path = dir.path().join(format!("more-{wal}.redb"));
        let open = || {
            Store::builder()
                .clock(clock.clone())
                .sweep_interval(None)
                .write_ahead_log(wal)
                .checkpoint_interval(Duration::from_secs(3600))
                .open(&path)
        };
        // With the log, the first half of the due entries reaches redb when the store
        // closes; the second half stays in the record map.
        let store = open()?;
        fill(&store, "a-", 10, Duration::from_secs(10))?;
        store.close()?;
        let store = open()?;
        fill(&store, "b-", 10, Duration::from_secs(10))?;
        fill(&store, "long-", 5, Duration::from_secs(100))?;
        clock.advance(Duration::from_secs(10));

        let first = store.sweep(19)?;
        assert_eq!((first.visited, first.removed, first.more), (19, 19, true));
        let second = store.sweep(1)?;
        assert_eq!((second.visited, second.removed, second.more), (1, 1, false));
        assert_eq!(store.sweep(1)?, idemstore::Swept::default());

        fill(&store, "c-", 4, Duration::from_secs(10))?;
        clock.advance(Duration::from_secs(10));
        let exact = store.sweep(4)?;
        assert_eq!(
            (exact.visited, exact.removed, exact.more),
            (4, 4, false),
            "wal {wal}"
        );
        assert_eq!(store.stats()?.records, 5, "wal {wal}");
    }
    Ok(())
}

#[test]
fn sweep_removes_only_expired_records_oldest_first_in_bounded_batches() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    fill(&store, "short-", 30, Duration::from_secs(10))?;
    fill(&store, "long-", 20, Duration::from_secs(100))?;
    clock.advance(Duration::from_secs(10));

    let first = store.sweep(12)?;
    assert_eq!((first.visited, first.removed), (12, 12));
    assert!(first.more, "18 due entries remain");
    let second = store.sweep(100)?;
    assert_eq!(
        (second.visited, second.removed),
        (18, 18),
        "visits only what is due"
    );
    assert!(!second.more, "nothing due remains");
    assert_eq!(store.sweep(100)?.visited, 0);

    let stats = store.stats()?;
    assert_eq!(
        (stats.records, stats.expiry_entries, stats.swept),
        (20, 20, 30)
    );
    assert!(store.get("s", "long-0")?.is_some());
    Ok(())
}

#[test]
fn sweep_cost_depends_on_what_expired_not_on_store_size() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    fill(&store, "live-", 2_000, Duration::from_secs(1_000))?;
    fill(&store, "dead-", 5, Duration::from_secs(1))?;
    clock.advance(Duration::from_secs(1));
    // One bounded batch reaches every expired record and visits nothing else.
    let swept = store.sweep(1_000)?;
    assert_eq!((swept.visited, swept.removed), (5, 5));
    Ok(())
}

#[test]
fn completion_moves_a_record_in_the_expiry_index() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    // Claimed with a 10 s retention, completed with a 1 h one: the claim's entry is replaced.
    let o = idemstore::ClaimOptions::default()
        .lease(Duration::from_secs(1))
        .retention(Duration::from_secs(10));
    let lease = acquired(store.claim("s", "k", "fp", &o)?);
    store.complete(&lease, b"done", Duration::from_secs(3_600))?;
    assert_eq!(store.stats()?.expiry_entries, 1);
    clock.advance(Duration::from_secs(10));
    assert_eq!(store.sweep(10)?.removed, 0);
    assert!(store.get("s", "k")?.is_some());
    clock.advance(Duration::from_secs(3_600));
    assert_eq!(store.sweep(10)?.removed, 1);
    assert_eq!(store.stats()?.records, 0);
    Ok(())
}

#[test]
fn background_sweeper_reclaims_expired_records_and_stops_on_close() -> TestResult {
    let clock = clock();
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(Some(Duration::from_millis(5)))
        .sweep_batch(7)
        .open_in_memory()?;
    fill(&store, "k", 50, Duration::from_secs(1))?;
    clock.advance(Duration::from_secs(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Counters trail the tables by a moment (they are bumped after the commit returns), so
    // wait for both.
    while store.stats()?.records > 0 || store.stats()?.swept < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "sweeper did not reclaim: {:?}",
            store.stats()?
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(store.stats()?.swept, 50);
    store.close()?;
    Ok(())
}

/// The background sweeper of an idle store commits nothing while nothing is due (no commit,
/// no sync), with and without the write-ahead log, and commits as soon as something is.
#[test]
fn an_idle_store_makes_no_commits_while_nothing_is_due() -> TestResult {
    let dir = tempfile::tempdir()?;
    for log in [false, true] {
        let clock = clock();
        let store = Store::builder()
            .clock(clock.clone())
            .write_ahead_log(log)
            .sweep_interval(Some(Duration::from_millis(5)))
            .open(dir.path().join(format!("idle-{log}.redb")))?;
        fill(&store, "k", 3, Duration::from_secs(60))?;
        let busy = store.stats()?;
        std::thread::sleep(Duration::from_millis(300));
        let idle = store.stats()?;
        assert_eq!(
            idle.commits, busy.commits,
            "log {log}: {busy:?} -> {idle:?}"
        );
        assert_eq!(idle.records, 3, "log {log}");

        clock.advance(Duration::from_secs(61));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.stats()?.records > 0 || store.stats()?.commits == idle.commits {
            assert!(
                std::time::Instant::now() < deadline,
                "log {log}: the sweeper did not commit: {:?}",
                store.stats()?
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        store.close()?;
    }
    Ok(())
}

#[test]
fn space_freed_by_sweeping_is_reused_by_later_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(idemstore::Durability::Relaxed {
            max_unsynced: Duration::from_secs(60),
        })
        .open(&path)?;
    let mut sizes = Vec::new();
    for round in 0..4 {
        fill(&store, &format!("r{round}-"), 600, Duration::from_secs(1))?;
        store.flush()?;
        sizes.push(std::fs::metadata(&path)?.len());
        clock.advance(Duration::from_secs(1));
        while store.sweep(1_000)?.visited > 0 {}
        store.flush()?;
    }
    // Copy-on-write keeps the swept pages until the sweep commits, so the second round grows
    // the file once; from then on every round fits in the pages that sweeping freed.
    let steady = sizes[1];
    let last = *sizes.last().expect("four rounds");
    assert!(last <= steady + steady / 10, "file kept growing: {sizes:?}");
    Ok(())
}

#[test]
fn sweeping_a_backlog_while_callers_run_removes_it_all_in_bounded_steps() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    fill(&store, "dead-", 3_000, Duration::from_secs(1))?;
    clock.advance(Duration::from_secs(1));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (removed, calls) = std::thread::scope(|s| -> Result<(usize, usize), String> {
        let callers: Vec<_> = (0..4)
            .map(|t| {
                let (store, stop) = (&store, &stop);
                s.spawn(move || -> Result<usize, String> {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("live-{t}-{n}");
                        let claim = store
                            .claim("s", &key, "fp", &opts(600_000))
                            .map_err(|e| e.to_string())?;
                        let idemstore::Claim::Acquired(lease) = claim else {
                            return Err(format!("{key} was not acquired"));
                        };
                        store
                            .complete(&lease, b"ok", Duration::from_secs(600))
                            .map_err(|e| e.to_string())?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let (mut removed, mut calls) = (0, 0);
        loop {
            let swept = store.sweep(1_000).map_err(|e| e.to_string())?;
            assert!(swept.visited <= 1_000);
            removed += swept.removed;
            calls += 1;
            if !swept.more {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in callers {
            c.join().map_err(|_| "a caller panicked")??;
        }
        Ok((removed, calls))
    })?;
    assert_eq!(removed, 3_000, "every expired record, in {calls} sweeps");
    let stats = store.stats()?;
    assert_eq!(stats.records, stats.expiry_entries);
    assert!(store.get("s", "dead-0")?.is_none());
    Ok(())
}
