//! Every limit is enforced before anything is written, with a typed error naming the input,
//! its size and the limit.

mod common;

use std::time::Duration;

use common::*;
use idemstore::{ClaimOptions, Error, Input, Limits, Store};

fn too_large(r: idemstore::Result<impl std::fmt::Debug>, what: Input, actual: u64, limit: u64) {
    match r {
        Err(Error::TooLarge {
            what: w,
            actual: a,
            limit: l,
        }) => {
            assert_eq!((w, a, l), (what, actual, limit));
        }
        other => panic!("expected TooLarge for {what}, got {other:?}"),
    }
}

#[test]
fn keys_must_be_1_to_255_bytes() -> TestResult {
    let store = memory_store(&clock());
    let long = vec![b'k'; 256];
    too_large(
        store.claim("s", &long, "fp", &opts(1_000)),
        Input::Key,
        256,
        255,
    );
    assert!(matches!(
        store.claim("s", "", "fp", &opts(1_000)),
        Err(Error::TooSmall {
            what: Input::Key,
            actual: 0,
            limit: 1
        })
    ));
    acquired(store.claim("s", vec![b'k'; 255], "fp", &opts(1_000))?);
    assert_eq!(store.stats()?.records, 1, "rejected claims wrote nothing");
    Ok(())
}

#[test]
fn scopes_are_at_most_255_bytes() -> TestResult {
    let store = memory_store(&clock());
    too_large(
        store.claim(vec![b's'; 256], "k", "fp", &opts(1_000)),
        Input::Scope,
        256,
        255,
    );
    too_large(store.get(vec![b's'; 300], "k"), Input::Scope, 300, 255);
    too_large(store.forget(vec![b's'; 256], "k"), Input::Scope, 256, 255);
    acquired(store.claim(vec![b's'; 255], "k", "fp", &opts(1_000))?);
    acquired(store.claim("", "k", "fp", &opts(1_000))?);
    Ok(())
}

#[test]
fn fingerprints_are_at_most_64_bytes() -> TestResult {
    let store = memory_store(&clock());
    too_large(
        store.claim("s", "k", vec![0u8; 65], &opts(1_000)),
        Input::Fingerprint,
        65,
        64,
    );
    assert_eq!(store.stats()?.records, 0);
    Ok(())
}

#[test]
fn outcomes_are_at_most_1_mib_by_default_and_an_oversized_one_keeps_the_lease() -> TestResult {
    let store = memory_store(&clock());
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    too_large(
        store.complete(&lease, &vec![0u8; (1 << 20) + 1], DAY),
        Input::Outcome,
        (1 << 20) + 1,
        1 << 20,
    );
    // Nothing was written: the lease still owns the record and can complete within limits.
    store.complete(&lease, &vec![7u8; 1 << 20], DAY)?;
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?)
            .outcome
            .len(),
        1 << 20
    );
    Ok(())
}

#[test]
fn checkpoints_are_bounded() -> TestResult {
    let store = memory_store(&clock());
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    too_large(
        store.checkpoint(&lease, &vec![0u8; 64 * 1024 + 1]),
        Input::Checkpoint,
        64 * 1024 + 1,
        64 * 1024,
    );
    Ok(())
}

#[test]
fn lease_must_not_exceed_retention_or_its_cap() -> TestResult {
    let store = memory_store(&clock());
    let o = ClaimOptions::default()
        .lease(Duration::from_secs(10))
        .retention(Duration::from_secs(5));
    assert!(matches!(
        store.claim("s", "k", "fp", &o),
        Err(Error::LeaseExceedsRetention {
            lease_ms: 10_000,
            retention_ms: 5_000
        })
    ));
    let o = ClaimOptions::default().lease(Duration::from_secs(7_200));
    too_large(
        store.claim("s", "k", "fp", &o),
        Input::Lease,
        7_200_000,
        3_600_000,
    );
    let o = ClaimOptions::default().lease(Duration::ZERO);
    assert!(matches!(
        store.claim("s", "k", "fp", &o),
        Err(Error::TooSmall {
            what: Input::Lease,
            ..
        })
    ));
    let o = ClaimOptions::default().retention(Duration::from_secs(31 * 86_400));
    too_large(
        store.claim("s", "k", "fp", &o),
        Input::Retention,
        31 * 86_400_000,
        30 * 86_400_000,
    );
    let o = ClaimOptions::default().wait(Duration::from_secs(61));
    too_large(store.claim("s", "k", "fp", &o), Input::Wait, 61_000, 60_000);
    let mut lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    too_large(
        store.extend(&mut lease, Duration::from_secs(3_601)),
        Input::Lease,
        3_601_000,
        3_600_000,
    );
    too_large(
        store.complete(&lease, b"", Duration::from_secs(31 * 86_400)),
        Input::Retention,
        31 * 86_400_000,
        30 * 86_400_000,
    );
    assert_eq!(store.stats()?.records, 1);
    Ok(())
}

#[test]
fn limits_are_configurable_within_hard_caps() -> TestResult {
    let store = Store::builder()
        .limits(Limits::default().max_outcome_len(16).max_key_len(8))
        .sweep_interval(None)
        .open_in_memory()?;
    too_large(
        store.claim("s", "123456789", "fp", &opts(1_000)),
        Input::Key,
        9,
        8,
    );
    let lease = acquired(store.claim("s", "12345678", "fp", &opts(1_000))?);
    too_large(
        store.complete(&lease, &[0; 17], DAY),
        Input::Outcome,
        17,
        16,
    );

    let over_cap = Store::builder()
        .limits(Limits::default().max_key_len(256))
        .open_in_memory();
    assert!(matches!(
        over_cap,
        Err(Error::TooLarge {
            what: Input::Config("max_key_len"),
            ..
        })
    ));
    let over_cap = Store::builder()
        .limits(Limits::default().max_outcome_len(idemstore::OUTCOME_LEN_MAX + 1))
        .open_in_memory();
    assert!(matches!(
        over_cap,
        Err(Error::TooLarge {
            what: Input::Config("max_outcome_len"),
            ..
        })
    ));
    let zero_queue = Store::builder().queue_capacity(0).open_in_memory();
    assert!(matches!(
        zero_queue,
        Err(Error::TooSmall {
            what: Input::Config("queue_capacity"),
            ..
        })
    ));
    Ok(())
}

#[test]
fn errors_name_what_was_wrong() {
    let e = Error::TooLarge {
        what: Input::Key,
        actual: 300,
        limit: 255,
    };
    assert_eq!(e.to_string(), "key is 300, above the limit of 255");
    let e = Error::LeaseLost { token: 7 };
    assert!(e.to_string().contains("token 7"));
}

/// A retention cap out of range is named as such, not as the lease cap it bounds; a lease cap
/// above a lowered retention cap is the lease cap's error, bounded by that retention.
#[test]
fn a_bad_retention_cap_is_named_before_the_lease_cap_it_bounds() {
    let zero = Limits::default().max_retention(Duration::ZERO).validate();
    assert!(
        matches!(
            zero,
            Err(Error::TooSmall {
                what: Input::Config("max_retention"),
                actual: 0,
                ..
            })
        ),
        "{zero:?}"
    );
    let lowered = Limits::default()
        .max_retention(Duration::from_secs(60))
        .validate();
    assert!(
        matches!(
            lowered,
            Err(Error::TooLarge {
                what: Input::Config("max_lease"),
                limit: 60_000,
                ..
            })
        ),
        "{lowered:?}"
    );
    let both = Limits::default()
        .max_retention(Duration::from_secs(60))
        .max_lease(Duration::from_secs(30));
    assert!(both.validate().is_ok());
}
