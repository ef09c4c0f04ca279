//! The state machine of DESIGN §2, one behaviour per test: every row of the claim table,
//! fencing, takeover with recovery points, waiting for the original, logical expiry, and scope
//! isolation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use idemstore::{Claim, Error, RecordState, Store};

// ----- the claim table, same fingerprint -----

#[test]
fn claim_of_an_unknown_key_acquires_attempt_one() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert_eq!(lease.attempt(), 1);
    assert!(!lease.is_takeover());
    assert_eq!(lease.checkpoint(), None);
    assert_eq!(lease.lease_until_ms(), T0_MS + 1_000);
    assert_eq!((lease.scope(), lease.key()), (&b"s"[..], &b"k"[..]));
    let record = store.get("s", "k")?.expect("the claim created a record");
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == lease.token()));
    Ok(())
}

#[test]
fn claim_of_an_expired_record_acquires_a_fresh_attempt_one() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.complete(&lease, b"old", Duration::from_secs(60))?;
    clock.advance(Duration::from_secs(60));
    let again = acquired(store.claim("s", "k", "other-fp", &opts(1_000))?);
    assert_eq!(again.attempt(), 1);
    assert!(!again.is_takeover());
    Ok(())
}

#[test]
fn duplicate_while_original_holds_a_live_lease_is_in_progress() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let _lease = acquired(store.claim("s", "k", "fp", &opts(5_000))?);
    clock.advance(Duration::from_millis(1_000));
    match store.claim("s", "k", "fp", &opts(5_000))? {
        Claim::InProgress { retry_after } => assert_eq!(retry_after, Duration::from_millis(4_000)),
        other => panic!("expected InProgress, got {other:?}"),
    }
    Ok(())
}

#[test]
fn duplicate_after_the_lease_expired_takes_over_with_a_new_token() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let first = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    clock.advance(Duration::from_millis(1_000));
    let second = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert!(second.is_takeover());
    assert_eq!(second.attempt(), 2);
    assert!(second.token() > first.token());
    Ok(())
}

#[test]
fn in_flight_record_of_an_earlier_process_epoch_is_taken_over_at_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let first = {
        let store = file_store(&path, &clock);
        let lease = acquired(store.claim("s", "k", "fp", &opts(60_000))?);
        store.checkpoint(&lease, b"charged card")?;
        lease
    };
    let store = file_store(&path, &clock);
    // The lease is still live by the clock, but its owner's process is gone.
    let second = acquired(store.claim("s", "k", "fp", &opts(60_000))?);
    assert!(second.is_takeover());
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.checkpoint(), Some(&b"charged card"[..]));
    assert!(second.token() > first.token());
    Ok(())
}

#[test]
fn duplicate_of_a_completed_request_replays_its_outcome_byte_for_byte() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    let outcome: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    clock.advance(Duration::from_millis(7));
    store.complete(&lease, &outcome, DAY)?;
    let r = replay(store.claim("s", "k", "fp", &opts(1_000))?);
    assert_eq!(r.outcome, outcome);
    assert_eq!(r.attempt, 1);
    assert_eq!(r.completed_at_ms, T0_MS + 7);
    Ok(())
}

#[test]
fn duplicate_after_a_retryable_failure_acquires_the_next_attempt() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let first = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.checkpoint(&first, b"step 1 done")?;
    store.fail(&first)?;
    let second = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert_eq!(second.attempt(), 2);
    assert!(!second.is_takeover());
    assert_eq!(second.checkpoint(), Some(&b"step 1 done"[..]));
    assert!(second.token() > first.token());
    Ok(())
}

// ----- the claim table, other fingerprint -----

#[test]
fn duplicate_with_other_fingerprint_is_a_mismatch_in_every_state() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let other = "other-fp";

    // In flight, live lease.
    let live = acquired(store.claim("s", "live", "fp", &opts(1_000))?);
    assert_eq!(
        store.claim("s", "live", other, &opts(1_000))?,
        Claim::Mismatch
    );

    // In flight, lease expired.
    let _stale = acquired(store.claim("s", "stale", "fp", &opts(1_000))?);
    // Completed.
    store.complete(&live, b"done", DAY)?;
    // Failed.
    let failing = acquired(store.claim("s", "failed", "fp", &opts(1_000))?);
    store.fail(&failing)?;
    clock.advance(Duration::from_millis(1_000));

    for key in ["live", "stale", "failed"] {
        assert_eq!(
            store.claim("s", key, other, &opts(1_000))?,
            Claim::Mismatch,
            "{key}"
        );
    }
    // A mismatch changes nothing: the original fingerprint still replays.
    assert_eq!(
        replay(store.claim("s", "live", "fp", &opts(1_000))?).outcome,
        b"done"
    );
    Ok(())
}

// ----- fencing -----

#[test]
fn stale_owner_cannot_complete_extend_checkpoint_or_fail_after_a_takeover() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let mut old = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    clock.advance(Duration::from_millis(1_500));
    let new = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.checkpoint(&new, b"new owner's progress")?;

    let lost = |r: idemstore::Result<()>| matches!(r, Err(Error::LeaseLost { token }) if token == old.token());
    assert!(lost(store.complete(&old, b"stale", DAY)));
    assert!(lost(store.checkpoint(&old, b"stale")));
    assert!(lost(store.fail(&old)));
    let token = old.token();
    assert!(
        matches!(store.extend(&mut old, Duration::from_secs(5)), Err(Error::LeaseLost { token: t }) if t == token)
    );

    // Nothing the stale owner did took effect.
    let record = store.get("s", "k")?.expect("record exists");
    match record.state {
        RecordState::InFlight {
            token, checkpoint, ..
        } => {
            assert_eq!(token, new.token());
            assert_eq!(checkpoint.as_deref(), Some(&b"new owner's progress"[..]));
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    store.complete(&new, b"fresh", DAY)?;
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?).outcome,
        b"fresh"
    );
    Ok(())
}

#[test]
fn completing_twice_with_the_same_lease_is_rejected_and_keeps_the_first_outcome() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.complete(&lease, b"first", DAY)?;
    assert!(matches!(
        store.complete(&lease, b"second", DAY),
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?).outcome,
        b"first"
    );
    Ok(())
}

#[test]
fn a_lease_whose_record_was_forgotten_is_lost() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert!(store.forget("s", "k")?);
    assert!(!store.forget("s", "k")?);
    assert!(matches!(
        store.complete(&lease, b"x", DAY),
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(store.get("s", "k")?, None);
    Ok(())
}

#[test]
fn extend_keeps_a_slow_owner_from_being_taken_over() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let mut lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    clock.advance(Duration::from_millis(900));
    store.extend(&mut lease, Duration::from_millis(1_000))?;
    assert_eq!(lease.lease_until_ms(), T0_MS + 1_900);
    clock.advance(Duration::from_millis(500));
    assert!(matches!(
        store.claim("s", "k", "fp", &opts(1_000))?,
        Claim::InProgress { .. }
    ));
    store.complete(&lease, b"ok", DAY)?;
    Ok(())
}

#[test]
fn extend_moves_the_expiry_out_when_the_lease_would_outlive_it() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let short = idemstore::ClaimOptions::default()
        .lease(Duration::from_secs(1))
        .retention(Duration::from_secs(2));
    let mut lease = acquired(store.claim("s", "k", "fp", &short)?);
    store.extend(&mut lease, Duration::from_secs(10))?;
    clock.advance(Duration::from_secs(5));
    let record = store
        .get("s", "k")?
        .expect("a leased record does not expire under its lease");
    assert_eq!(record.expires_at_ms, T0_MS + 10_000);
    Ok(())
}

// ----- takeover and recovery points -----

#[test]
fn takeover_hands_over_the_latest_checkpoint() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let first = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.checkpoint(&first, b"step 1")?;
    store.checkpoint(&first, b"step 2")?;
    clock.advance(Duration::from_secs(2));
    let second = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert_eq!(second.checkpoint(), Some(&b"step 2"[..]));
    assert!(second.is_takeover());
    Ok(())
}

#[test]
fn orphans_lists_in_flight_records_whose_owner_is_gone_with_checkpoints() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = file_store(&path, &clock);
        let a = acquired(store.claim("t1", "pay-1", "fp", &opts(60_000))?);
        store.checkpoint(&a, b"gateway ref 77")?;
        let b = acquired(store.claim("t1", "pay-2", "fp", &opts(60_000))?);
        store.complete(&b, b"done", DAY)?;
    }
    let store = file_store(&path, &clock);
    let live = acquired(store.claim("t2", "pay-3", "fp", &opts(60_000))?);
    let orphans = store.orphans(100)?;
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    let orphan = &orphans[0];
    assert_eq!(
        (orphan.scope.as_slice(), orphan.key.as_slice()),
        (&b"t1"[..], &b"pay-1"[..])
    );
    assert!(matches!(
        &orphan.record.state,
        RecordState::InFlight { checkpoint: Some(c), .. } if c == b"gateway ref 77"
    ));
    // Reconcile: take it over and complete it.
    let lease = acquired(store.claim("t1", "pay-1", &orphan.record.fingerprint, &opts(1_000))?);
    store.complete(&lease, b"reconciled", DAY)?;
    assert!(store.orphans(100)?.is_empty());
    store.complete(&live, b"ok", DAY)?;
    Ok(())
}

// ----- waiting for the original -----

#[test]
fn duplicate_that_waits_receives_the_originals_outcome() -> TestResult {
    let clock = clock();
    let store = Arc::new(memory_store(&clock));
    let lease = acquired(store.claim("s", "k", "fp", &opts(30_000))?);
    let waiter = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            store.claim("s", "k", "fp", &opts(30_000).wait(Duration::from_secs(20)))
        })
    };
    wait_for_waiters(&store, 1);
    store.complete(&lease, b"the original's answer", DAY)?;
    let r = replay(waiter.join().expect("waiter thread")?);
    assert_eq!(r.outcome, b"the original's answer");
    Ok(())
}

#[test]
fn duplicate_that_waits_acquires_when_the_original_fails() -> TestResult {
    let clock = clock();
    let store = Arc::new(memory_store(&clock));
    let lease = acquired(store.claim("s", "k", "fp", &opts(30_000))?);
    let waiter = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            store.claim("s", "k", "fp", &opts(30_000).wait(Duration::from_secs(20)))
        })
    };
    wait_for_waiters(&store, 1);
    store.fail(&lease)?;
    let retry = acquired(waiter.join().expect("waiter thread")?);
    assert_eq!(retry.attempt(), 2);
    Ok(())
}

#[test]
fn wait_is_bounded_and_then_reports_in_progress() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let _lease = acquired(store.claim("s", "k", "fp", &opts(30_000))?);
    let started = std::time::Instant::now();
    let answer = store.claim(
        "s",
        "k",
        "fp",
        &opts(30_000).wait(Duration::from_millis(100)),
    )?;
    assert!(matches!(answer, Claim::InProgress { .. }), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    Ok(())
}

#[test]
fn async_duplicate_that_waits_receives_the_originals_outcome() -> TestResult {
    let clock = clock();
    let store = Arc::new(memory_store(&clock));
    let lease = acquired(store.claim("s", "k", "fp", &opts(30_000))?);
    let waiter = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            block_on(store.claim_async("s", "k", "fp", &opts(30_000).wait(Duration::from_secs(20))))
        })
    };
    wait_for_waiters(&store, 1);
    block_on(store.complete_async(&lease, b"async answer", DAY))?;
    let r = replay(waiter.join().expect("waiter thread")?);
    assert_eq!(r.outcome, b"async answer");
    Ok(())
}

#[test]
fn async_operations_run_the_whole_lifecycle() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    block_on(async {
        let mut lease = acquired(store.claim_async("s", "k", "fp", &opts(1_000)).await?);
        store.checkpoint_async(&lease, b"cp").await?;
        store
            .extend_async(&mut lease, Duration::from_secs(2))
            .await?;
        store.fail_async(&lease).await?;
        let lease = acquired(store.claim_async("s", "k", "fp", &opts(1_000)).await?);
        assert_eq!(lease.checkpoint(), Some(&b"cp"[..]));
        store.complete_async(&lease, b"done", DAY).await?;
        assert_eq!(
            replay(store.claim_async("s", "k", "fp", &opts(1_000)).await?).outcome,
            b"done"
        );
        assert!(store.forget_async("s", "k").await?);
        clock.advance(DAY);
        assert_eq!(store.sweep_async(10).await?.removed, 0);
        Ok::<(), Error>(())
    })?;
    Ok(())
}

/// Blocks until `n` duplicates are waiting, so the test exercises the wait path rather than a
/// claim that happened to arrive after the completion.
fn wait_for_waiters(store: &Store, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stats().expect("stats").waiting < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no duplicate started waiting"
        );
        std::thread::yield_now();
    }
}

/// A minimal executor: parks the thread until the future's waker fires. Enough to show the
/// async API needs no particular runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}

// ----- expiry -----

#[test]
fn expired_record_is_absent_before_any_sweep() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.complete(&lease, b"done", Duration::from_secs(10))?;
    clock.advance(Duration::from_millis(9_999));
    assert!(store.get("s", "k")?.is_some());
    clock.advance(Duration::from_millis(1));
    assert_eq!(store.get("s", "k")?, None);
    assert_eq!(
        store.stats()?.records,
        1,
        "not swept, only logically absent"
    );
    // A claim with another fingerprint is not a mismatch any more: the key is free.
    assert_eq!(
        acquired(store.claim("s", "k", "new-fp", &opts(1_000))?).attempt(),
        1
    );
    Ok(())
}

#[test]
fn a_lease_on_an_expired_record_is_lost() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let short = idemstore::ClaimOptions::default()
        .lease(Duration::from_secs(1))
        .retention(Duration::from_secs(1));
    let lease = acquired(store.claim("s", "k", "fp", &short)?);
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        store.complete(&lease, b"late", DAY),
        Err(Error::LeaseLost { .. })
    ));
    Ok(())
}

// ----- scope isolation -----

#[test]
fn same_key_in_two_scopes_never_interferes() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let a = acquired(store.claim("tenant-a", "k", "fp-a", &opts(1_000))?);
    // Another tenant's identical key is a different record: acquired, not in progress/mismatch.
    let b = acquired(store.claim("tenant-b", "k", "fp-b", &opts(1_000))?);
    store.complete(&a, b"a's answer", DAY)?;
    assert_eq!(
        store.get("tenant-b", "k")?.map(|r| r.fingerprint),
        Some(b"fp-b".to_vec())
    );
    assert!(matches!(
        store.claim("tenant-b", "k", "fp-b", &opts(1_000))?,
        Claim::InProgress { .. }
    ));
    store.complete(&b, b"b's answer", DAY)?;
    assert_eq!(
        replay(store.claim("tenant-a", "k", "fp-a", &opts(1_000))?).outcome,
        b"a's answer"
    );
    assert_eq!(
        replay(store.claim("tenant-b", "k", "fp-b", &opts(1_000))?).outcome,
        b"b's answer"
    );
    // Forgetting in one scope leaves the other.
    assert!(store.forget("tenant-a", "k")?);
    assert!(store.get("tenant-b", "k")?.is_some());
    Ok(())
}

#[test]
fn scope_and_key_boundaries_cannot_be_shifted_to_reach_another_record() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("ab", "c", "fp", &opts(1_000))?);
    store.complete(&lease, b"secret", DAY)?;
    assert_eq!(store.get("a", "bc")?, None);
    assert_eq!(
        acquired(store.claim("a", "bc", "fp", &opts(1_000))?).attempt(),
        1
    );
    Ok(())
}

#[test]
fn tokens_strictly_increase_across_claims() -> TestResult {
    let clock = clock();
    let store: Store = memory_store(&clock);
    let mut last = 0;
    for i in 0..50 {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(1_000))?);
        assert!(lease.token() > last);
        last = lease.token();
    }
    Ok(())
}

#[test]
fn store_and_its_async_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let store = memory_store(&clock());
    send_sync(&store);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000)).expect("claim"));
    send(store.claim_async("s", "k2", "fp", &opts(1_000)));
    send(store.complete_async(&lease, b"x", DAY));
    send(store.sweep_async(1));
}

#[test]
fn a_clock_set_back_does_not_lengthen_a_lease_for_duplicates() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    // The first lease runs out; a duplicate takes the request over, with a lease of 1 s.
    clock.advance(Duration::from_secs(2));
    acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    // The wall clock jumps back 2 s. Lease decisions keep the time they already reached, on
    // the read path as in the writer: the new lease has 1 s left, not 3.
    clock.set(T0_MS);
    match store.claim("s", "k", "fp", &opts(1_000))? {
        Claim::InProgress { retry_after } => assert_eq!(retry_after, Duration::from_secs(1)),
        other => panic!("expected in progress, got {other:?}"),
    }
    Ok(())
}

/// Intervals too long to add to the clock (`Duration::MAX`) mean "never by time": the writer
/// and the sweeper keep working, concurrent writers finish, `flush` syncs and `close` returns.
#[test]
fn intervals_too_long_for_the_clock_never_fire_and_break_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    for log in [false, true] {
        let store = std::sync::Arc::new(
            Store::builder()
                .durability(idemstore::Durability::Relaxed {
                    max_unsynced: Duration::MAX,
                })
                .sweep_interval(Some(Duration::MAX))
                .write_ahead_log(log)
                .open(dir.path().join(format!("max-{log}.redb")))?,
        );
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || -> Result<(), idemstore::Error> {
                    for i in 0..50 {
                        let lease =
                            acquired(store.claim("s", format!("{t}-{i}"), "fp", &opts(1_000))?);
                        store.complete(&lease, b"done", DAY)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        store.flush()?;
        let stats = store.stats()?;
        assert_eq!(stats.records, 200, "log {log}");
        assert!(!stats.poisoned, "log {log}");
        std::sync::Arc::try_unwrap(store)
            .map_err(|_| "still shared")?
            .close()?;
    }
    Ok(())
}
