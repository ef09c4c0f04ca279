//! The cases: each one an `async fn(Env)` that every backend runs unchanged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idemstore::{
    AnyBackend, Claim, ClaimOptions, Error, IdempotencyBackend, Input, Lease, Limits, RecordState,
};

use crate::env::{Env, Kind};
#[cfg(feature = "__testkit")]
pub use crate::linearizability::linearizability;
#[cfg(feature = "__testkit")]
pub use crate::reference_model::reference_model;

const DAY: Duration = Duration::from_secs(86_400);

fn opts(lease_ms: u64) -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_millis(lease_ms))
        .retention(DAY)
}

async fn acquire(b: &AnyBackend, scope: &[u8], key: &[u8], fp: &[u8], o: &ClaimOptions) -> Lease {
    match b.claim(scope, key, fp, o).await.expect("the claim answers") {
        Claim::Acquired(lease) => lease,
        other => panic!("expected an acquisition, got {other:?}"),
    }
}

async fn claim(b: &AnyBackend, key: &[u8], fp: &[u8], o: &ClaimOptions) -> Claim {
    b.claim(b"s", key, fp, o).await.expect("the claim answers")
}

fn is_lost(r: idemstore::Result<()>, token: u64) -> bool {
    matches!(r, Err(Error::LeaseLost { token: t }) if t == token)
}

/// DESIGN §2's table: acquire, in progress, mismatch, replay, failure and retry.
pub async fn claim_table(mut env: Env) {
    let b = env.open().await;
    let o = opts(30_000);
    let lease = acquire(&b, b"s", b"k", b"fp", &o).await;
    assert_eq!((lease.attempt(), lease.is_takeover()), (1, false));
    assert_eq!(lease.checkpoint(), None);
    assert_eq!((lease.scope(), lease.key()), (&b"s"[..], &b"k"[..]));
    match claim(&b, b"k", b"fp", &o).await {
        Claim::InProgress { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(30));
        }
        other => panic!("expected in progress, got {other:?}"),
    }
    assert_eq!(claim(&b, b"k", b"other", &o).await, Claim::Mismatch);
    b.complete(&lease, b"201 ch_1", DAY)
        .await
        .expect("complete");
    match claim(&b, b"k", b"fp", &o).await {
        Claim::Replay(replay) => {
            assert_eq!(replay.outcome, b"201 ch_1");
            assert_eq!(replay.attempt, 1);
            assert!(replay.completed_at_ms > 0);
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    // A retryable failure: the next claim with the same fingerprint runs it again.
    let first = acquire(&b, b"s", b"f", b"fp", &o).await;
    b.fail(&first).await.expect("fail");
    let second = acquire(&b, b"s", b"f", b"fp", &o).await;
    assert_eq!((second.attempt(), second.is_takeover()), (2, false));
    assert_ne!(second.token(), first.token());
    let record = b.get(b"s", b"f").await.expect("get").expect("a record");
    assert_eq!(record.attempt, 2);
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == second.token()));
    let done = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert_eq!(done.fingerprint, b"fp");
    assert!(matches!(done.state, RecordState::Completed { ref outcome } if outcome == b"201 ch_1"));
}

/// Every lease write is fenced by its token: a taken-over lease changes nothing.
pub async fn fencing(mut env: Env) {
    let b = env.open().await;
    let old = acquire(&b, b"s", b"k", b"fp", &opts(100)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(new.is_takeover());
    assert_eq!(new.attempt(), 2);
    assert!(new.token() > old.token(), "tokens increase per key");
    let mut stale = old.clone();
    assert!(is_lost(b.complete(&old, b"stale", DAY).await, old.token()));
    assert!(is_lost(b.fail(&old).await, old.token()));
    assert!(is_lost(b.checkpoint(&old, b"x").await, old.token()));
    assert!(is_lost(
        b.extend(&mut stale, Duration::from_secs(5)).await,
        old.token()
    ));
    assert_eq!(
        stale.lease_until_ms(),
        old.lease_until_ms(),
        "a refused extend leaves the lease"
    );
    let mut live = new.clone();
    b.extend(&mut live, Duration::from_secs(60))
        .await
        .expect("extend");
    assert!(live.lease_until_ms() > new.lease_until_ms());
    b.complete(&live, b"fresh", DAY).await.expect("complete");
    // After completion, no lease writes at all.
    assert!(is_lost(
        b.complete(&live, b"again", DAY).await,
        live.token()
    ));
    assert!(is_lost(b.fail(&live).await, live.token()));
    match claim(&b, b"k", b"fp", &opts(1_000)).await {
        Claim::Replay(r) => assert_eq!(r.outcome, b"fresh"),
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// A lease that ended is an orphan (listed with its checkpoint) and is taken over.
pub async fn lease_expiry_takeover_and_orphans(mut env: Env) {
    let b = env.open().await;
    let lease = acquire(&b, b"s", b"k", b"fp", &opts(600)).await;
    b.checkpoint(&lease, b"step 1").await.expect("checkpoint");
    let _live = acquire(&b, b"s", b"live", b"fp", &opts(60_000)).await;
    assert!(
        b.orphans(10).await.expect("orphans").is_empty(),
        "live leases are no orphans"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let orphans = b.orphans(10).await.expect("orphans");
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    let orphan = &orphans[0];
    assert_eq!((&orphan.scope[..], &orphan.key[..]), (&b"s"[..], &b"k"[..]));
    assert!(matches!(
        &orphan.record.state,
        RecordState::InFlight { checkpoint: Some(c), token, .. } if c == b"step 1" && *token == lease.token()
    ));
    let next = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(next.is_takeover());
    assert_eq!(next.checkpoint(), Some(&b"step 1"[..]));
    assert!(b.orphans(10).await.expect("orphans").is_empty());
    assert!(is_lost(
        b.complete(&lease, b"late", DAY).await,
        lease.token()
    ));
}

/// The same key with another fingerprint never replays, in any state.
pub async fn mismatch(mut env: Env) {
    let b = env.open().await;
    let o = opts(30_000);
    let lease = acquire(&b, b"s", b"k", b"fp-a", &o).await;
    assert_eq!(claim(&b, b"k", b"fp-b", &o).await, Claim::Mismatch);
    b.fail(&lease).await.expect("fail");
    assert_eq!(claim(&b, b"k", b"fp-b", &o).await, Claim::Mismatch);
    let lease = acquire(&b, b"s", b"k", b"fp-a", &o).await;
    b.complete(&lease, b"out", DAY).await.expect("complete");
    assert_eq!(claim(&b, b"k", b"fp-b", &o).await, Claim::Mismatch);
    assert_eq!(claim(&b, b"k", b"", &o).await, Claim::Mismatch);
    // Mismatches write nothing: the record is as it was.
    let record = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert_eq!(
        (record.fingerprint.as_slice(), record.attempt),
        (&b"fp-a"[..], 2)
    );
}

/// A duplicate that asks to wait gets the original's outcome; a bounded wait ends in
/// InProgress.
pub async fn waits(mut env: Env) {
    let b = env.open().await;
    let lease = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    let finisher = {
        let b = b.clone();
        let lease = lease.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            b.complete(&lease, b"done", DAY).await
        })
    };
    let waited = opts(30_000).wait(Duration::from_secs(10));
    let started = Instant::now();
    match claim(&b, b"k", b"fp", &waited).await {
        Claim::Replay(r) => assert_eq!(r.outcome, b"done"),
        other => panic!("expected the original's replay, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the wait ended with the original"
    );
    finisher.await.expect("the task ran").expect("complete");

    // A wait bounded below the original's lease ends in InProgress after about the bound.
    let _held = acquire(&b, b"s", b"slow", b"fp", &opts(30_000)).await;
    let started = Instant::now();
    let short = opts(30_000).wait(Duration::from_millis(150));
    assert!(matches!(
        claim(&b, b"slow", b"fp", &short).await,
        Claim::InProgress { .. }
    ));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(140), "waited {took:?}");
    assert!(took < Duration::from_secs(5), "waited {took:?}");

    // A wait on a failed original acquires.
    let failing = acquire(&b, b"s", b"f", b"fp", &opts(30_000)).await;
    let failer = {
        let b = b.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.fail(&failing).await
        })
    };
    match claim(&b, b"f", b"fp", &waited).await {
        Claim::Acquired(l) => assert_eq!(l.attempt(), 2),
        other => panic!("expected an acquisition after the failure, got {other:?}"),
    }
    failer.await.expect("the task ran").expect("fail");
}

/// Expired records are absent at once; sweeps remove them in bounded batches.
pub async fn expiry_and_sweep(mut env: Env) {
    let b = env.open().await;
    let short = ClaimOptions::default()
        .lease(Duration::from_millis(100))
        .retention(Duration::from_millis(600));
    for key in [&b"a"[..], b"b", b"c"] {
        let lease = acquire(&b, b"s", key, b"fp", &short).await;
        b.complete(&lease, b"out", Duration::from_millis(600))
            .await
            .expect("complete");
    }
    let keep = acquire(&b, b"s", b"keep", b"fp", &opts(30_000)).await;
    assert!(b.get(b"s", b"a").await.expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        b.get(b"s", b"a").await.expect("get").is_none(),
        "expired means absent"
    );
    // An expired record's key starts afresh, even with another fingerprint.
    let fresh = acquire(&b, b"s", b"a", b"new-fp", &opts(30_000)).await;
    assert_eq!((fresh.attempt(), fresh.is_takeover()), (1, false));
    // A lease write on an expired record is refused.
    let expiring = acquire(&b, b"s", b"e", b"fp", &short).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(is_lost(
        b.complete(&expiring, b"late", DAY).await,
        expiring.token()
    ));
    if b.capabilities().needs_sweep {
        let first = b.sweep(1).await.expect("sweep");
        assert_eq!((first.removed, first.more), (1, true), "{first:?}");
        let rest = b.sweep(100).await.expect("sweep");
        assert_eq!((rest.removed, rest.more), (2, false), "{rest:?}");
        let none = b.sweep(100).await.expect("sweep");
        assert_eq!(none.removed, 0);
    }
    // Live records survive the sweep.
    assert!(b.get(b"s", b"a").await.expect("get").is_some());
    b.complete(&keep, b"kept", DAY).await.expect("complete");
}

/// Every backend refuses the same inputs, with the same errors, and writes nothing.
pub async fn limits(mut env: Env) {
    let b = env.open().await;
    let o = opts(30_000);
    let long_key = vec![b'k'; 256];
    assert!(matches!(
        b.claim(b"s", &long_key, b"fp", &o).await,
        Err(Error::TooLarge {
            what: Input::Key,
            actual: 256,
            limit: 255
        })
    ));
    assert!(matches!(
        b.claim(b"s", b"", b"fp", &o).await,
        Err(Error::TooSmall {
            what: Input::Key,
            ..
        })
    ));
    assert!(matches!(
        b.claim(&[b's'; 256], b"k", b"fp", &o).await,
        Err(Error::TooLarge {
            what: Input::Scope,
            ..
        })
    ));
    assert!(matches!(
        b.claim(b"s", b"k", &[0; 65], &o).await,
        Err(Error::TooLarge {
            what: Input::Fingerprint,
            ..
        })
    ));
    let backwards = ClaimOptions::default()
        .lease(Duration::from_secs(10))
        .retention(Duration::from_secs(5));
    assert!(matches!(
        b.claim(b"s", b"k", b"fp", &backwards).await,
        Err(Error::LeaseExceedsRetention {
            lease_ms: 10_000,
            retention_ms: 5_000
        })
    ));
    assert!(matches!(
        b.claim(b"s", b"k", b"fp", &opts(0)).await,
        Err(Error::TooSmall {
            what: Input::Lease,
            ..
        })
    ));
    let too_long_wait = o.clone().wait(Duration::from_secs(3_600));
    assert!(matches!(
        b.claim(b"s", b"k", b"fp", &too_long_wait).await,
        Err(Error::TooLarge {
            what: Input::Wait,
            ..
        })
    ));
    assert!(
        b.get(b"s", b"k").await.expect("get").is_none(),
        "refused claims wrote nothing"
    );
    let mut lease = acquire(&b, b"s", b"k", b"fp", &o).await;
    let outcome = vec![0u8; b.limits().outcome_len() + 1];
    assert!(matches!(
        b.complete(&lease, &outcome, DAY).await,
        Err(Error::TooLarge {
            what: Input::Outcome,
            ..
        })
    ));
    assert!(matches!(
        b.checkpoint(&lease, &vec![0u8; 64 * 1024 + 1]).await,
        Err(Error::TooLarge {
            what: Input::Checkpoint,
            ..
        })
    ));
    assert!(matches!(
        b.extend(&mut lease, Duration::ZERO).await,
        Err(Error::TooSmall {
            what: Input::Lease,
            ..
        })
    ));
    assert!(matches!(
        b.complete(&lease, b"ok", Duration::ZERO).await,
        Err(Error::TooSmall {
            what: Input::Retention,
            ..
        })
    ));
    assert!(matches!(
        b.get(b"s", &long_key).await,
        Err(Error::TooLarge {
            what: Input::Key,
            ..
        })
    ));
    // The refused writes changed nothing: the lease still owns its in-flight record.
    b.complete(&lease, b"ok", DAY).await.expect("complete");
    // Exactly at the limits is accepted.
    let max_key = vec![b'k'; 255];
    let edge = acquire(&b, &[b's'; 255], &max_key, &[7; 64], &o).await;
    b.complete(&edge, &vec![1u8; b.limits().outcome_len()], DAY)
        .await
        .expect("an outcome at the limit");
}

/// Scopes never share keys; the per-scope quota refuses new keys beyond it.
pub async fn scopes_and_quota(env: Env) {
    let mut env = env.with_limits(Limits::default().max_records_per_scope(2));
    let b = env.open().await;
    let o = opts(30_000);
    let a = acquire(&b, b"tenant-a", b"k", b"fp", &o).await;
    let other = acquire(&b, b"tenant-b", b"k", b"other-fp", &o).await;
    b.complete(&a, b"a's", DAY).await.expect("complete");
    assert!(matches!(
        b.claim(b"tenant-b", b"k", b"other-fp", &o)
            .await
            .expect("claim"),
        Claim::InProgress { .. }
    ));
    b.complete(&other, b"b's", DAY).await.expect("complete");
    // The scope's length prefix keeps ("ab", "c") and ("a", "bc") apart.
    let ab = acquire(&b, b"ab", b"c", b"fp", &o).await;
    let a_bc = acquire(&b, b"a", b"bc", b"fp", &o).await;
    assert_ne!(ab.token(), a_bc.token());
    match b.claim(b"tenant-a", b"k", b"fp", &o).await.expect("claim") {
        Claim::Replay(r) => assert_eq!(r.outcome, b"a's"),
        other => panic!("expected a's replay, got {other:?}"),
    }
    // Quota: tenant-a holds one record; one more fits, the third is refused.
    let _second = acquire(&b, b"tenant-a", b"k2", b"fp", &o).await;
    assert!(matches!(
        b.claim(b"tenant-a", b"k3", b"fp", &o).await,
        Err(Error::QuotaExceeded { limit: 2 })
    ));
    assert!(b.get(b"tenant-a", b"k3").await.expect("get").is_none());
    // Claims of existing keys still answer; another scope is not affected.
    assert!(matches!(
        b.claim(b"tenant-a", b"k", b"fp", &o).await.expect("claim"),
        Claim::Replay(_)
    ));
    let _c = acquire(&b, b"tenant-c", b"k3", b"fp", &o).await;
    // Forgetting a record makes room.
    assert!(b.forget(b"tenant-a", b"k2").await.expect("forget"));
    let _third = acquire(&b, b"tenant-a", b"k3", b"fp", &o).await;
}

/// Tokens: distinct across keys and grants, increasing per key, and the record carries the
/// owning lease's token.
pub async fn tokens(mut env: Env) {
    let b = env.open().await;
    let mut seen = std::collections::HashSet::new();
    let mut last_per_key: HashMap<Vec<u8>, u64> = HashMap::new();
    for round in 0..3 {
        for i in 0..10u8 {
            let key = vec![b'k', i];
            let lease = acquire(&b, b"s", &key, b"fp", &opts(30_000)).await;
            assert!(
                seen.insert(lease.token()),
                "token {} granted twice",
                lease.token()
            );
            if let Some(prev) = last_per_key.insert(key.clone(), lease.token()) {
                assert!(lease.token() > prev, "tokens increase per key");
            }
            assert_eq!(lease.attempt(), round + 1);
            let record = b.get(b"s", &key).await.expect("get").expect("a record");
            assert!(
                matches!(record.state, RecordState::InFlight { token, .. } if token == lease.token())
            );
            b.fail(&lease).await.expect("fail");
        }
    }
}

/// The last checkpoint passes to the next attempt, after a failure and after a takeover.
pub async fn checkpoint_handover(mut env: Env) {
    let b = env.open().await;
    let first = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    b.checkpoint(&first, b"one").await.expect("checkpoint");
    b.checkpoint(&first, b"two").await.expect("checkpoint");
    let record = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert!(
        matches!(record.state, RecordState::InFlight { checkpoint: Some(ref c), .. } if c == b"two")
    );
    b.fail(&first).await.expect("fail");
    let record = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert!(matches!(record.state, RecordState::Failed { checkpoint: Some(ref c) } if c == b"two"));
    let second = acquire(&b, b"s", b"k", b"fp", &opts(100)).await;
    assert_eq!(second.checkpoint(), Some(&b"two"[..]));
    b.checkpoint(&second, b"three").await.expect("checkpoint");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(third.is_takeover());
    assert_eq!(
        (third.attempt(), third.checkpoint()),
        (3, Some(&b"three"[..]))
    );
    b.complete(&third, b"done", DAY).await.expect("complete");
    let record = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert_eq!(record.attempt, 3);
}

/// `forget` removes a record in any state; its lease is lost; the key starts afresh.
pub async fn forget(mut env: Env) {
    let b = env.open().await;
    let lease = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(b.forget(b"s", b"k").await.expect("forget"));
    assert!(
        !b.forget(b"s", b"k").await.expect("forget"),
        "nothing left to forget"
    );
    assert!(is_lost(
        b.complete(&lease, b"late", DAY).await,
        lease.token()
    ));
    assert!(b.get(b"s", b"k").await.expect("get").is_none());
    let again = acquire(&b, b"s", b"k", b"other-fp", &opts(30_000)).await;
    assert_eq!(again.attempt(), 1);
    assert!(!b.forget(b"s", b"never").await.expect("forget"));
}

/// Many duplicates at once, through two handles: each key executes exactly once and every
/// caller ends with the same outcome.
pub async fn duplicate_storm_across_two_handles(mut env: Env) {
    let handles = [env.open().await, env.second().await];
    const KEYS: usize = 12;
    const CALLERS_PER_HANDLE: usize = 6;
    let executions: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for (h, handle) in handles.iter().enumerate() {
        for caller in 0..CALLERS_PER_HANDLE {
            let b = handle.clone();
            let executions = Arc::clone(&executions);
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..KEYS {
                    // Callers walk the keys in different orders, so they collide everywhere.
                    let k = (i + caller * 5 + h * 3) % KEYS;
                    let key = format!("key-{k}");
                    let o = opts(30_000).wait(Duration::from_secs(20));
                    let outcome = loop {
                        match b
                            .claim(b"storm", key.as_bytes(), b"fp", &o)
                            .await
                            .expect("claim")
                        {
                            Claim::Acquired(lease) => {
                                executions[k].fetch_add(1, Ordering::SeqCst);
                                let out = format!("ran {k}").into_bytes();
                                b.complete(&lease, &out, DAY).await.expect("complete");
                                break out;
                            }
                            Claim::Replay(r) => break r.outcome,
                            Claim::InProgress { .. } => continue,
                            other => panic!("unexpected {other:?}"),
                        }
                    };
                    outcomes.push((k, outcome));
                }
                outcomes
            }));
        }
    }
    for task in tasks {
        for (k, outcome) in task.await.expect("a caller finished") {
            assert_eq!(outcome, format!("ran {k}").into_bytes());
        }
    }
    for (k, n) in executions.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key {k} ran {n:?} times");
    }
}

/// Capabilities name the backend and match what it does.
pub async fn capabilities(mut env: Env) {
    let b = env.open().await;
    let caps = b.capabilities();
    let expected = match env.kind {
        Kind::Memory => "memory",
        Kind::File => "file",
        Kind::Postgres => "postgres",
        Kind::Redis => "redis",
    };
    assert_eq!(caps.name, expected);
    assert_eq!(
        caps.shared,
        matches!(env.kind, Kind::Postgres | Kind::Redis)
    );
    // Redis makes no durability promise across a failover (its module docs say why).
    assert_eq!(
        caps.durable,
        matches!(env.kind, Kind::File | Kind::Postgres)
    );
    assert_eq!(caps.needs_sweep, env.kind != Kind::Redis);
    assert_eq!(
        format!("{b:?}"),
        format!("AnyBackend {{ backend: {expected:?} }}")
    );
}

/// A restarted owner's in-flight records are orphans at once (its lease still runs) and are
/// taken over with their checkpoints.
pub async fn restart_takes_over_at_once(mut env: Env) {
    let b = env.open().await;
    let lease = acquire(&b, b"s", b"k", b"fp", &opts(600_000)).await;
    b.checkpoint(&lease, b"charged").await.expect("checkpoint");
    let b = env.restart(b).await;
    let orphans = b.orphans(10).await.expect("orphans");
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0].key, b"k");
    let next = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(next.is_takeover());
    assert_eq!(
        (next.attempt(), next.checkpoint()),
        (2, Some(&b"charged"[..]))
    );
    assert!(is_lost(
        b.complete(&lease, b"late", DAY).await,
        lease.token()
    ));
    b.complete(&next, b"reconciled", DAY)
        .await
        .expect("complete");
}

/// Redis: tokens past 1e14 stay exact (Lua numbers are doubles that Redis would print with
/// `%.14g`), and the counter's value is the token's high bits.
pub async fn tokens_past_1e14(mut env: Env) {
    let b = env.open().await;
    // The counter of scope "s" (hex 73) set so that the next token is about 1.3e14.
    let counter = format!("{}:{{s73}}:tok", env.redis_prefix());
    assert_eq!(
        env.redis_command(&format!("SET {counter} 2000000000")),
        "+OK"
    );
    let lease = acquire(&b, b"s", b"k", b"fp", &opts(30_000)).await;
    assert!(
        lease.token() > 100_000_000_000_000,
        "token {}",
        lease.token()
    );
    assert_eq!(
        lease.token() >> 16,
        2_000_000_001,
        "token {}",
        lease.token()
    );
    let record = b.get(b"s", b"k").await.expect("get").expect("a record");
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == lease.token()));
    b.complete(&lease, b"exact", DAY)
        .await
        .expect("the exact token fences");
}

/// Retries `call` while it fails with a retryable error (a remote store that lost its
/// connection); at most for 30 s.
async fn retried<T, F, Fut>(mut call: F) -> idemstore::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = idemstore::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// A server killed (SIGKILL) and restarted between acknowledgement and reread keeps every
/// acknowledged write: completions replay, in-flight records keep their lease and
/// checkpoint, and the old handle's lease still fences.
pub async fn server_crash_keeps_acknowledged_writes(mut env: Env) {
    env.start_dedicated_server();
    let b = env.open().await;
    let o = opts(600_000);
    for i in 0..20u32 {
        let lease = acquire(&b, b"s", format!("done-{i}").as_bytes(), b"fp", &o).await;
        b.complete(&lease, format!("out-{i}").as_bytes(), DAY)
            .await
            .expect("complete");
    }
    let mut in_flight = Vec::new();
    for i in 0..5u32 {
        let lease = acquire(&b, b"s", format!("open-{i}").as_bytes(), b"fp", &o).await;
        b.checkpoint(&lease, format!("cp-{i}").as_bytes())
            .await
            .expect("checkpoint");
        in_flight.push(lease);
    }
    env.crash_and_restart_server();
    let reader = env.other_instance("reader").await;
    for i in 0..20u32 {
        let key = format!("done-{i}");
        match retried(|| reader.claim(b"s", key.as_bytes(), b"fp", &o)).await {
            Ok(Claim::Replay(r)) => assert_eq!(r.outcome, format!("out-{i}").into_bytes()),
            other => panic!("{key}: expected its replay after the crash, got {other:?}"),
        }
    }
    for (i, lease) in in_flight.iter().enumerate() {
        let key = format!("open-{i}");
        let record = retried(|| reader.get(b"s", key.as_bytes()))
            .await
            .expect("get")
            .expect("the in-flight record survived");
        assert!(matches!(
            &record.state,
            RecordState::InFlight { token, checkpoint: Some(c), .. }
                if *token == lease.token() && c == format!("cp-{i}").as_bytes()
        ));
        // Its owner (the first handle) is alive and its lease runs: still in progress.
        assert!(matches!(
            retried(|| reader.claim(b"s", key.as_bytes(), b"fp", &o)).await,
            Ok(Claim::InProgress { .. })
        ));
        // The first handle reconnects and finishes its lease.
        retried(|| b.complete(lease, b"after the crash", DAY))
            .await
            .expect("the surviving lease completes");
    }
    match retried(|| reader.claim(b"s", b"open-0", b"fp", &o)).await {
        Ok(Claim::Replay(r)) => assert_eq!(r.outcome, b"after the crash"),
        other => panic!("expected the replay, got {other:?}"),
    }
}

/// Connections killed by the server in the middle of calls: every error is retryable
/// (unavailable or outcome unknown, never a silent success), and no request runs twice
/// unless the store says so (the first attempt runs at most once; any later run is a
/// takeover, after a lease whose claim or completion had an unknown outcome ended); every key
/// ends completed with one outcome for all callers.
pub async fn connection_killed_mid_call(mut env: Env) {
    env.start_dedicated_server();
    let handles = [env.open().await, env.other_instance("second").await];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = Arc::clone(&stop);
        let kind = env.kind;
        let url = env.url().to_owned();
        tokio::spawn(async move {
            let mut kills = 0u32;
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(25)).await;
                kill_client_connections(kind, &url).await;
                kills += 1;
            }
            kills
        })
    };
    const KEYS: usize = 8;
    let first_runs: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let acknowledged: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let unknown = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (h, handle) in handles.iter().enumerate() {
        for w in 0..3usize {
            let b = handle.clone();
            let (first_runs, acknowledged, unknown) = (
                Arc::clone(&first_runs),
                Arc::clone(&acknowledged),
                Arc::clone(&unknown),
            );
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..KEYS {
                    let k = (i + w * 3 + h) % KEYS;
                    let key = format!("key-{k}");
                    let o = opts(400);
                    let outcome = 'claim: loop {
                        let lease = match b.claim(b"s", key.as_bytes(), b"fp", &o).await {
                            Ok(Claim::Acquired(lease)) => lease,
                            Ok(Claim::Replay(r)) => break 'claim r.outcome,
                            Ok(Claim::InProgress { retry_after }) => {
                                tokio::time::sleep(retry_after.min(Duration::from_millis(50)))
                                    .await;
                                continue;
                            }
                            Err(e) if e.is_retryable() => {
                                if matches!(e, Error::OutcomeUnknown { .. }) {
                                    unknown.fetch_add(1, Ordering::SeqCst);
                                }
                                continue;
                            }
                            other => panic!("{key}: unexpected {other:?}"),
                        };
                        if lease.attempt() == 1 {
                            first_runs[k].fetch_add(1, Ordering::SeqCst);
                        } else {
                            assert!(
                                lease.is_takeover(),
                                "{key}: a second run that is no takeover: {lease:?}"
                            );
                        }
                        let out =
                            format!("{key} by {h}/{w} attempt {}", lease.attempt()).into_bytes();
                        loop {
                            match b.complete(&lease, &out, DAY).await {
                                Ok(()) => {
                                    acknowledged[k].fetch_add(1, Ordering::SeqCst);
                                    break 'claim out;
                                }
                                Err(e) if e.is_retryable() => {
                                    if matches!(e, Error::OutcomeUnknown { .. }) {
                                        unknown.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                // Completed by the unknown attempt, or taken over: ask again.
                                Err(Error::LeaseLost { .. }) => continue 'claim,
                                Err(e) => panic!("{key}: unexpected {e:?}"),
                            }
                        }
                    };
                    outcomes.push((k, outcome));
                }
                outcomes
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::SeqCst);
    let kills = killer.await.expect("the killer ran");
    assert!(kills > 10, "connections were killed {kills} times");
    let mut finals: HashMap<usize, Vec<u8>> = HashMap::new();
    for task in tasks {
        for (k, outcome) in task.await.expect("a caller finished") {
            let first = finals.entry(k).or_insert_with(|| outcome.clone());
            assert_eq!(*first, outcome, "key-{k}: callers saw different outcomes");
        }
    }
    for k in 0..KEYS {
        // The first attempt runs at most once; it runs in no caller only when the answer to
        // the claim that granted it was lost (outcome unknown), and then a takeover ran it.
        let first = first_runs[k].load(Ordering::SeqCst);
        assert!(first <= 1, "key-{k}: the first attempt ran {first} times");
        if first == 0 {
            assert!(
                unknown.load(Ordering::SeqCst) > 0,
                "key-{k}: never ran a first attempt"
            );
        }
        assert!(
            acknowledged[k].load(Ordering::SeqCst) <= 1,
            "key-{k}: two completions acknowledged"
        );
    }
    eprintln!(
        "connection kills: {kills}; outcome-unknown errors seen: {}",
        unknown.load(Ordering::SeqCst)
    );
}

/// Makes the server drop every client connection but the killer's own.
async fn kill_client_connections(kind: Kind, url: &str) {
    match kind {
        #[cfg(feature = "postgres")]
        Kind::Postgres => {
            let Ok((client, connection)) =
                tokio_postgres::connect(url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(connection);
            let _ = client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await;
        }
        Kind::Redis => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let addr = url
                .trim_start_matches("redis://")
                .trim_end_matches('/')
                .to_owned();
            if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                let _ = stream
                    .write_all(b"CLIENT KILL TYPE normal SKIPME yes\r\n")
                    .await;
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
            }
        }
        other => panic!("no server to disturb for {other:?}"),
    }
}

/// Heartbeats keep a live owner's records from being taken over past its owner timeout; an
/// owner that stops beating (its process hung or died without closing) loses its in-flight
/// records to takeover once the timeout passes, long before their leases end.
pub async fn silent_owner_times_out(env: Env) {
    let mut env = env.with_owner_timing(Duration::from_millis(100), Duration::from_millis(800));
    let first = env.open().await;
    let other = env.other_instance("other").await;
    let o = opts(600_000);
    let lease = acquire(&first, b"s", b"k", b"fp", &o).await;
    first
        .checkpoint(&lease, b"half done")
        .await
        .expect("checkpoint");
    // Beating: well past the owner timeout, the record is still in progress.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert!(matches!(
        other.claim(b"s", b"k", b"fp", &o).await.expect("claim"),
        Claim::InProgress { .. }
    ));
    assert!(other.orphans(10).await.expect("orphans").is_empty());
    // Silent: the first handle is dropped without closing; its heartbeat stops.
    drop(first);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(other.orphans(10).await.expect("orphans").len(), 1);
    let next = acquire(&other, b"s", b"k", b"fp", &o).await;
    assert!(next.is_takeover());
    assert_eq!(next.checkpoint(), Some(&b"half done"[..]));
}

/// `AnyBackend::open` picks the backend from its URL, with default settings.
pub async fn open_from_url(env: Env) {
    let b = AnyBackend::open(env.url()).await.expect("the URL opens");
    let expected = if env.kind == Kind::Postgres {
        "postgres"
    } else {
        "redis"
    };
    assert_eq!(b.capabilities().name, expected);
    let lease = acquire(&b, b"url", b"k", b"fp", &opts(30_000)).await;
    b.complete(&lease, b"via url", DAY).await.expect("complete");
    let again = AnyBackend::open(env.url()).await.expect("a second open");
    match again
        .claim(b"url", b"k", b"fp", &opts(1_000))
        .await
        .expect("claim")
    {
        Claim::Replay(r) => assert_eq!(r.outcome, b"via url"),
        other => panic!("expected the replay through a second handle, got {other:?}"),
    }
}
