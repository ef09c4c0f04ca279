//! Tenants are isolated: one scope cannot read, block, replay, pre-empt or crowd out another's
//! keys; size caps hold before any write.

mod common;

use std::time::Duration;

use common::*;
use idemstore::{Claim, Error, Limits, Store};

fn quota_store(clock: &idemstore::ManualClock, quota: u64) -> Store {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .limits(Limits::default().max_records_per_scope(quota))
        .open_in_memory()
        .expect("store opens")
}

#[test]
fn a_scope_at_its_quota_cannot_create_records_but_others_can() -> TestResult {
    let clock = clock();
    let store = quota_store(&clock, 3);
    for i in 0..3 {
        acquired(store.claim("greedy", format!("k{i}"), "fp", &opts(1_000))?);
    }
    let refused = store.claim("greedy", "k3", "fp", &opts(1_000));
    assert!(
        matches!(refused, Err(Error::QuotaExceeded { limit: 3 })),
        "{refused:?}"
    );
    assert_eq!(
        store.scope_records("greedy")?,
        3,
        "the refused claim wrote nothing"
    );
    // Another tenant is not crowded out.
    acquired(store.claim("modest", "k0", "fp", &opts(1_000))?);
    // Existing keys of the full scope keep working: duplicates, completion, retries.
    assert!(matches!(
        store.claim("greedy", "k0", "fp", &opts(1_000))?,
        Claim::InProgress { .. }
    ));
    Ok(())
}

#[test]
fn forgetting_and_sweeping_free_quota() -> TestResult {
    let clock = clock();
    let store = quota_store(&clock, 2);
    let a = acquired(store.claim("t", "a", "fp", &opts(1_000))?);
    store.complete(&a, b"x", Duration::from_secs(10))?;
    acquired(store.claim("t", "b", "fp", &opts(1_000))?);
    assert!(matches!(
        store.claim("t", "c", "fp", &opts(1_000)),
        Err(Error::QuotaExceeded { .. })
    ));

    assert!(store.forget("t", "b")?);
    acquired(store.claim("t", "c", "fp", &opts(1_000))?);

    // An expired record still counts until swept, but a claim of its own key reuses its slot.
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        store.claim("t", "d", "fp", &opts(1_000)),
        Err(Error::QuotaExceeded { .. })
    ));
    acquired(store.claim("t", "a", "fp", &opts(1_000))?);
    assert_eq!(store.scope_records("t")?, 2);
    clock.advance(DAY * 2);
    store.sweep(100)?;
    assert_eq!(store.scope_records("t")?, 0);
    acquired(store.claim("t", "d", "fp", &opts(1_000))?);
    Ok(())
}

#[test]
fn scope_counts_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = file_store(&path, &clock);
        for i in 0..5 {
            acquired(store.claim("t", format!("k{i}"), "fp", &opts(1_000))?);
        }
    }
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .limits(Limits::default().max_records_per_scope(5))
        .open(&path)?;
    assert_eq!(store.scope_records("t")?, 5);
    assert!(matches!(
        store.claim("t", "k5", "fp", &opts(1_000)),
        Err(Error::QuotaExceeded { limit: 5 })
    ));
    Ok(())
}

#[test]
fn one_tenant_cannot_read_replay_block_or_preempt_anothers_key() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    // The victim's request is in flight.
    let victim = acquired(store.claim("victim", "order-1", "victim-fp", &opts(10_000))?);
    // An attacker using the same key (and even the same fingerprint) in its own scope gets its
    // own record: it neither blocks nor observes the victim.
    let attacker = acquired(store.claim("attacker", "order-1", "victim-fp", &opts(10_000))?);
    assert_ne!(attacker.token(), victim.token());
    store.complete(&attacker, b"attacker's outcome", DAY)?;
    store.complete(&victim, b"victim's outcome", DAY)?;
    // Neither replays the other's outcome.
    assert_eq!(
        replay(store.claim("victim", "order-1", "victim-fp", &opts(1_000))?).outcome,
        b"victim's outcome"
    );
    assert_eq!(
        replay(store.claim("attacker", "order-1", "victim-fp", &opts(1_000))?).outcome,
        b"attacker's outcome"
    );
    // Forgetting in the attacker's scope leaves the victim's record.
    assert!(store.forget("attacker", "order-1")?);
    assert!(store.get("victim", "order-1")?.is_some());
    // A lease carries its scope: the attacker's lease cannot touch the victim's record.
    assert_eq!(attacker.scope(), b"attacker");
    Ok(())
}

#[test]
fn a_wrong_fingerprint_learns_nothing_about_the_stored_request() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let lease = acquired(store.claim("t", "k", "the-real-fingerprint", &opts(1_000))?);
    store.complete(&lease, b"secret outcome", DAY)?;
    // Guesses of every length and prefix get the same answer, with no outcome attached.
    for guess in [
        "",
        "t",
        "the-real-fingerprin",
        "the-real-fingerprinu",
        "the-real-fingerprint-",
    ] {
        assert_eq!(
            store.claim("t", "k", guess, &opts(1_000))?,
            Claim::Mismatch,
            "{guess:?}"
        );
    }
    Ok(())
}

#[test]
fn oversized_inputs_write_nothing() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let huge_key = vec![b'k'; 10_000];
    assert!(matches!(
        store.claim("t", &huge_key, "fp", &opts(1_000)),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        store.claim(vec![b's'; 10_000], "k", "fp", &opts(1_000)),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        store.claim("t", "k", vec![0u8; 10_000], &opts(1_000)),
        Err(Error::TooLarge { .. })
    ));
    let lease = acquired(store.claim("t", "k", "fp", &opts(1_000))?);
    assert!(matches!(
        store.complete(&lease, &vec![0u8; 20 << 20], DAY),
        Err(Error::TooLarge { .. })
    ));
    let stats = store.stats()?;
    assert_eq!(
        (stats.records, stats.operations),
        (1, 1),
        "only the valid claim was written"
    );
    Ok(())
}
