//! A failed commit is never acknowledged: every caller of the batch hears that the outcome is
//! unknown, and the store refuses writes until it is reopened, while reads keep working.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use idemstore::{Error, Store};

#[test]
fn failed_commit_reports_outcome_unknown_and_poisons_writes_but_not_reads() -> TestResult {
    let (backend, fail) = Injected::new(InjectedFault::FailSync);
    let store = Store::builder()
        .clock(clock())
        .sweep_interval(None)
        .open_with_backend(backend)?;
    let done = acquired(store.claim("s", "done", "fp", &opts(1_000))?);
    store.complete(&done, b"kept", DAY)?;
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);

    fail.store(true, Ordering::SeqCst);
    let result = store.complete(&lease, b"maybe", DAY);
    assert!(
        matches!(result, Err(Error::CommitOutcomeUnknown { .. })),
        "{result:?}"
    );
    assert!(result.as_ref().err().is_some_and(Error::is_fatal));

    // From now on writes are refused, even once the disk recovers, until reopen.
    fail.store(false, Ordering::SeqCst);
    let refused = store.claim("s", "other", "fp", &opts(1_000));
    assert!(
        matches!(refused, Err(Error::Poisoned { .. })),
        "{refused:?}"
    );
    assert!(matches!(store.fail(&lease), Err(Error::Poisoned { .. })));
    assert!(matches!(store.sweep(10), Err(Error::Poisoned { .. })));
    assert!(store.stats()?.poisoned);

    // Reads of committed state keep working, including the replay path of claim.
    assert_eq!(
        replay(store.claim("s", "done", "fp", &opts(1_000))?).outcome,
        b"kept"
    );
    assert!(store.get("s", "done")?.is_some());
    assert!(matches!(store.close(), Err(Error::Poisoned { .. })));
    Ok(())
}
