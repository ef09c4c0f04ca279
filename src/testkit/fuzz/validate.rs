//! The `validate` target: arbitrary limits and inputs against the store's input validation.

use std::time::Duration;

use super::T0_MS;
use super::reader::Reader;
use crate::{
    CHECKPOINT_LEN_MAX, Claim, ClaimOptions, Error, FINGERPRINT_LEN_MAX, Input, KEY_LEN_MAX, Lease,
    Limits, ManualClock, OUTCOME_LEN_MAX, RETENTION_MS_MAX, Record, RecordState, SCOPE_LEN_MAX,
    Store, WAIT_MS_MAX,
};

/// The limits a `validate_input` case runs with, as plain numbers (the oracle's copy).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    key: usize,
    scope: usize,
    fingerprint: usize,
    outcome: usize,
    checkpoint: usize,
    lease: u64,
    retention: u64,
    wait: u64,
}

impl Bounds {
    fn default_limits() -> Bounds {
        Bounds {
            key: KEY_LEN_MAX,
            scope: SCOPE_LEN_MAX,
            fingerprint: FINGERPRINT_LEN_MAX,
            outcome: 1024 * 1024,
            checkpoint: 64 * 1024,
            lease: 3_600_000,
            retention: 30 * 24 * 3_600_000,
            wait: 60_000,
        }
    }

    /// Whether `Limits` with these values is within the hard caps.
    fn within_caps(&self) -> bool {
        (1..=KEY_LEN_MAX).contains(&self.key)
            && self.scope <= SCOPE_LEN_MAX
            && self.fingerprint <= FINGERPRINT_LEN_MAX
            && self.outcome <= OUTCOME_LEN_MAX
            && self.checkpoint <= CHECKPOINT_LEN_MAX
            && (1..=RETENTION_MS_MAX).contains(&self.retention)
            && (1..=self.retention).contains(&self.lease)
            && self.wait <= WAIT_MS_MAX
    }

    fn limits(&self) -> Limits {
        Limits::default()
            .max_key_len(self.key)
            .max_scope_len(self.scope)
            .max_fingerprint_len(self.fingerprint)
            .max_outcome_len(self.outcome)
            .max_checkpoint_len(self.checkpoint)
            .max_retention(Duration::from_millis(self.retention))
            .max_lease(Duration::from_millis(self.lease))
            .max_wait(Duration::from_millis(self.wait))
    }
}

/// Whether `e` is an input rejection: raised before anything is queued or written.
fn is_input_error(e: &Error) -> bool {
    matches!(
        e,
        Error::TooLarge { .. } | Error::TooSmall { .. } | Error::LeaseExceedsRetention { .. }
    )
}

/// The observable state of a store: its records table (one key here), its write count and
/// its fencing counter. A rejected input must leave all three unchanged.
/// What a refused call must leave as it was: the key's record, the records held, the commits
/// made and the next fencing token.
type Footprint = (Option<Record>, u64, u64, u64);

fn footprint(store: &Store, scope: &[u8], key: &[u8]) -> Footprint {
    let stats = store.stats().expect("stats of an in-memory store");
    let record = store.get(scope, key).unwrap_or(None);
    (record, stats.records, stats.commits, stats.next_token)
}

/// Checks that an input error names an input that really is out of bounds, with its real
/// size and the configured limit.
fn check_named(e: &Error, sizes: &[(Input, u64, u64, u64)]) {
    match e {
        Error::TooLarge {
            what,
            actual,
            limit,
        } => assert!(
            sizes
                .iter()
                .any(|(w, a, _, max)| w == what && a == actual && max == limit && a > max),
            "{e:?} names no input above its limit ({sizes:?})"
        ),
        Error::TooSmall {
            what,
            actual,
            limit,
        } => assert!(
            sizes
                .iter()
                .any(|(w, a, min, _)| w == what && a == actual && min == limit && a < min),
            "{e:?} names no input below its minimum ({sizes:?})"
        ),
        Error::LeaseExceedsRetention {
            lease_ms,
            retention_ms,
        } => assert!(lease_ms > retention_ms, "{e:?}"),
        other => panic!("expected an input error, got {other:?}"),
    }
}

fn in_bounds(sizes: &[(Input, u64, u64, u64)]) -> bool {
    sizes.iter().all(|(_, a, min, max)| a >= min && a <= max)
}

/// A lease call refused with `e`: some input of `sizes` is out of bounds, `e` names one of them,
/// and nothing was written (the footprint is still `before`).
fn check_refused(
    store: &Store,
    (scope, key): (&[u8], &[u8]),
    before: &Footprint,
    e: &Error,
    sizes: &[(Input, u64, u64, u64)],
    call: &str,
) {
    assert!(!in_bounds(sizes), "{call} refused {sizes:?}: {e:?}");
    check_named(e, sizes);
    assert_eq!(
        &footprint(store, scope, key),
        before,
        "a rejected {call} wrote"
    );
}

/// Arbitrary limits, scope, key, fingerprint, durations, outcome and checkpoint against the
/// store's input validation, on an in-memory store. Asserts (panics on a violation):
///
/// - the builder accepts exactly the limits within the hard caps (else a `Config` error);
/// - `claim`, `checkpoint`, `extend`, `complete`, `get` and `forget` succeed exactly when
///   every input is within its limit, and otherwise return `TooLarge`/`TooSmall`/
///   `LeaseExceedsRetention` naming an input that really is out of bounds, with its size
///   and the limit;
/// - a rejected input writes nothing: the record, the record count, the commit count and
///   the fencing counter are unchanged;
/// - an accepted completion replays its exact bytes.
pub fn validate_input(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut b = Bounds::default_limits();
    let custom = r.u8();
    if custom & 0x01 != 0 {
        b.key = r.len_near(KEY_LEN_MAX, 300);
    }
    if custom & 0x02 != 0 {
        b.scope = r.len_near(SCOPE_LEN_MAX, 300);
    }
    if custom & 0x04 != 0 {
        b.fingerprint = r.len_near(FINGERPRINT_LEN_MAX, 80);
    }
    if custom & 0x08 != 0 {
        // Small enough that the outcome and checkpoint below can exceed them.
        b.outcome = r.below(64);
        b.checkpoint = r.below(64);
    }
    if custom & 0x10 != 0 {
        b.lease = r.millis();
    }
    if custom & 0x20 != 0 {
        b.retention = r.millis();
    }
    if custom & 0x40 != 0 {
        b.wait = r.millis();
    }
    let now = match r.u8() % 4 {
        0 => 0,
        1 => 1 << 62,
        _ => T0_MS + u64::from(r.u32()),
    };
    let opened = Store::builder()
        .clock(ManualClock::new(now))
        .sweep_interval(None)
        .limits(b.limits())
        .open_in_memory();
    let store = match opened {
        Ok(store) => {
            assert!(
                b.within_caps(),
                "limits beyond the hard caps accepted: {b:?}"
            );
            store
        }
        Err(e) => {
            assert!(
                !b.within_caps(),
                "limits within the hard caps refused: {b:?}: {e:?}"
            );
            assert!(
                matches!(
                    e,
                    Error::TooLarge {
                        what: Input::Config(_),
                        ..
                    } | Error::TooSmall {
                        what: Input::Config(_),
                        ..
                    }
                ),
                "a bad configuration is a Config error: {e:?}"
            );
            return;
        }
    };

    let scope = {
        let n = r.len_near(b.scope, 300);
        vec![b's'; n]
    };
    let key = {
        let n = r.len_near(b.key, 300);
        let mut k = r.bytes(n);
        k.resize(n, b'k');
        k
    };
    let fingerprint = {
        let n = r.len_near(b.fingerprint, 80);
        vec![b'f'; n]
    };
    let lease_ms = r.millis();
    let retention_ms = r.millis();
    let wait_ms = r.bool().then(|| r.millis());
    let mut options = ClaimOptions::default()
        .lease(Duration::from_millis(lease_ms))
        .retention(Duration::from_millis(retention_ms));
    if let Some(w) = wait_ms {
        options = options.wait(Duration::from_millis(w));
    }
    let len = |v: &[u8]| v.len() as u64;
    let identity = [
        (Input::Scope, len(&scope), 0, b.scope as u64),
        (Input::Key, len(&key), 1, b.key as u64),
    ];
    let mut sizes = identity.to_vec();
    sizes.extend([
        (
            Input::Fingerprint,
            len(&fingerprint),
            0,
            b.fingerprint as u64,
        ),
        (Input::Lease, lease_ms, 1, b.lease),
        (Input::Retention, retention_ms, 1, b.retention),
        (Input::Wait, wait_ms.unwrap_or(0), 0, b.wait),
    ]);
    let claim_valid = in_bounds(&sizes) && lease_ms <= retention_ms;

    let before = footprint(&store, &scope, &key);
    let claimed = store.claim(&scope, &key, &fingerprint, &options);
    let mut lease = match claimed {
        Ok(Claim::Acquired(lease)) => {
            assert!(claim_valid, "claim accepted out-of-bounds input {sizes:?}");
            lease
        }
        Ok(other) => panic!("the first claim of a key acquires it, got {other:?}"),
        Err(e) => {
            assert!(is_input_error(&e), "unexpected error {e:?}");
            assert!(!claim_valid, "claim refused valid input {sizes:?}: {e:?}");
            check_named(&e, &sizes);
            assert_eq!(
                footprint(&store, &scope, &key),
                before,
                "a rejected claim wrote"
            );
            // The identity alone decides get and forget.
            let id_valid = in_bounds(&identity);
            match store.get(&scope, &key) {
                Ok(found) => assert!(id_valid && found.is_none()),
                Err(e) => {
                    assert!(!id_valid, "get refused a valid identity: {e:?}");
                    check_named(&e, &identity);
                }
            }
            match store.forget(&scope, &key) {
                // A valid forget of nothing may commit an empty batch, and writes nothing.
                Ok(existed) => {
                    assert!(id_valid && !existed);
                    let (record, records, _, next_token) = footprint(&store, &scope, &key);
                    assert_eq!(
                        (record, records, next_token),
                        (before.0, before.1, before.3)
                    );
                }
                Err(e) => {
                    assert!(!id_valid, "forget refused a valid identity: {e:?}");
                    check_named(&e, &identity);
                    assert_eq!(footprint(&store, &scope, &key), before, "forget wrote");
                }
            }
            return;
        }
    };
    let record = store
        .get(&scope, &key)
        .expect("get")
        .expect("the claimed record");
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == lease.token()));

    // Lease operations with arbitrary inputs.
    let checkpoint = {
        let n = r.len_near(b.checkpoint, 80);
        vec![b'c'; n]
    };
    let before = footprint(&store, &scope, &key);
    let sizes = [(Input::Checkpoint, len(&checkpoint), 0, b.checkpoint as u64)];
    match store.checkpoint(&lease, &checkpoint) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "checkpoint accepted {sizes:?}");
            let r = store.get(&scope, &key).expect("get").expect("record");
            assert!(matches!(
                r.state,
                RecordState::InFlight { checkpoint: Some(ref c), .. } if *c == checkpoint
            ));
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "checkpoint"),
    }

    let by_ms = r.millis();
    let before = footprint(&store, &scope, &key);
    let sizes = [(Input::Lease, by_ms, 1, b.lease)];
    match store.extend(&mut lease, Duration::from_millis(by_ms)) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "extend accepted {sizes:?}");
            assert_eq!(lease.lease_until_ms(), now.saturating_add(by_ms));
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "extend"),
    }

    let outcome = {
        let n = r.len_near(b.outcome, 80);
        let mut o = r.bytes(n);
        o.resize(n, b'o');
        o
    };
    let retention2 = r.millis();
    let before = footprint(&store, &scope, &key);
    let sizes = [
        (Input::Outcome, len(&outcome), 0, b.outcome as u64),
        (Input::Retention, retention2, 1, b.retention),
    ];
    match store.complete(&lease, &outcome, Duration::from_millis(retention2)) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "complete accepted {sizes:?}");
            let again = ClaimOptions::default()
                .lease(Duration::from_millis(b.lease.min(b.retention)))
                .retention(Duration::from_millis(b.retention));
            match store.claim(&scope, &key, &fingerprint, &again) {
                Ok(Claim::Replay(replay)) => assert_eq!(replay.outcome, outcome),
                other => panic!("a completed request replays, got {other:?}"),
            }
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "complete"),
    }

    // A lease built from arbitrary parts is checked like any other.
    let token = r.u64();
    match Lease::from_parts(&scope, &key, token, 0, 1, None, false) {
        Ok(forged) => {
            assert!(scope.len() <= SCOPE_LEN_MAX);
            if forged.token() != lease.token() {
                assert!(matches!(store.fail(&forged), Err(Error::LeaseLost { .. })));
            }
        }
        Err(e) => assert!(scope.len() > SCOPE_LEN_MAX, "{e:?}"),
    }
    assert!(
        store
            .forget(&scope, &key)
            .expect("forget of a valid identity")
    );
    assert!(store.get(&scope, &key).expect("get").is_none());
}
