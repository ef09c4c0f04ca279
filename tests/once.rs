//! `idemstore::once`: a function run once per key, its typed result replayed, retryable
//! failures released, final ones stored, and fencing kept.

mod common;

use std::cell::Cell;
use std::time::Duration;

use common::*;
use idemstore::once::{self, JobError, OnceError};
use idemstore::{Claim, ClaimOptions, Error, Limits, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    charge: String,
    amount: u64,
    tags: Vec<String>,
}

fn receipt(attempt: u32) -> Receipt {
    Receipt {
        charge: format!("ch_{attempt}"),
        amount: 4200,
        tags: vec!["card".into(), "eur".into()],
    }
}

/// The attempt after one that stored `checkpoint` and did not finish: it is attempt 2 and
/// gets that checkpoint, and then succeeds.
fn resumed(
    attempt: u32,
    previous: Option<&[u8]>,
    checkpoint: &[u8],
) -> Result<Receipt, JobError<String>> {
    assert_eq!(attempt, 2);
    assert_eq!(previous, Some(checkpoint));
    Ok(receipt(attempt))
}

#[test]
fn a_job_runs_once_and_every_call_gets_its_typed_result() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let runs = Cell::new(0);
    for _ in 0..5 {
        let got: Result<Receipt, OnceError<String>> =
            once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
                runs.set(runs.get() + 1);
                Ok(receipt(job.attempt()))
            });
        assert_eq!(got.map_err(|e| e.to_string())?, receipt(1));
    }
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[test]
fn a_retryable_failure_is_released_and_the_next_call_resumes_from_its_checkpoint() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let first: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
            job.checkpoint(b"step 1 done")?;
            Err(JobError::Retry("gateway timeout".into()))
        });
    assert!(matches!(first, Err(OnceError::Retry(ref e)) if e == "gateway timeout"));
    let second: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
            resumed(job.attempt(), job.previous_checkpoint(), b"step 1 done")
        });
    assert_eq!(second.map_err(|e| e.to_string())?, receipt(2));
    Ok(())
}

#[test]
fn a_final_failure_is_stored_and_replayed_without_running_again() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let runs = Cell::new(0);
    for _ in 0..3 {
        let got: Result<Receipt, OnceError<String>> =
            once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |_| {
                runs.set(runs.get() + 1);
                Err(JobError::Fatal("card declined".into()))
            });
        assert!(
            matches!(got, Err(OnceError::Fatal(ref e)) if e == "card declined"),
            "{got:?}"
        );
    }
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[test]
fn a_job_held_elsewhere_is_in_progress_and_another_fingerprint_is_a_mismatch() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    acquired(store.claim("q", "msg-1", "fp", &opts(1_000))?);
    let busy: Result<u8, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |_| Ok(1));
    assert!(
        matches!(busy, Err(OnceError::InProgress { .. })),
        "{busy:?}"
    );
    let other: Result<u8, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"other", &opts(1_000), |_| Ok(1));
    assert!(matches!(other, Err(OnceError::Mismatch)), "{other:?}");
    Ok(())
}

#[test]
fn a_result_over_the_outcome_limit_is_refused_and_the_claim_released() -> TestResult {
    let store = Store::builder()
        .clock(clock())
        .sweep_interval(None)
        .limits(Limits::default().max_outcome_len(64))
        .open_in_memory()?;
    let big: Result<Vec<u8>, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |_| {
            Ok(vec![7; 1_000])
        });
    assert!(
        matches!(big, Err(OnceError::Store(Error::TooLarge { .. }))),
        "{big:?}"
    );
    let small: Result<Vec<u8>, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
            assert_eq!(job.attempt(), 2, "released, so it runs again");
            Ok(vec![7; 8])
        });
    assert_eq!(small.map_err(|e| e.to_string())?, vec![7; 8]);
    Ok(())
}

#[test]
fn a_job_that_lost_its_lease_learns_it_and_does_not_overwrite_its_successor() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let got: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
            assert!(job.owns()?);
            // The job stalls past its lease; a redelivery takes the work over.
            clock.advance(Duration::from_secs(2));
            let successor = acquired(store.claim("q", "msg-1", "fp", &opts(1_000))?);
            assert!(!job.owns()?);
            assert!(matches!(job.checkpoint(b"x"), Err(Error::LeaseLost { .. })));
            store.complete(&successor, b"the successor's answer", DAY)?;
            Ok(receipt(job.attempt()))
        });
    assert!(
        matches!(got, Err(OnceError::Store(Error::LeaseLost { .. }))),
        "{got:?}"
    );
    assert_eq!(
        replay(store.claim("q", "msg-1", "fp", &opts(1_000))?).outcome,
        b"the successor's answer"
    );
    Ok(())
}

#[test]
fn a_stored_result_read_as_another_type_is_a_serialization_error() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let stored: Result<u64, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |_| Ok(u64::MAX));
    assert_eq!(stored.map_err(|e| e.to_string())?, u64::MAX);
    let as_receipt: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |_| {
            Ok(receipt(9))
        });
    assert!(
        matches!(as_receipt, Err(OnceError::Serialization(_))),
        "{as_receipt:?}"
    );
    Ok(())
}

#[test]
fn the_async_form_runs_once_over_the_backend_trait() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let runs = Cell::new(0);
    let options = ClaimOptions::default();
    for _ in 0..3 {
        let got: Result<Receipt, OnceError<String>> = runtime.block_on(once::run_async(
            &store,
            "q",
            "msg-1",
            b"fp",
            &options,
            async |job| {
                runs.set(runs.get() + 1);
                job.extend(Duration::from_secs(5)).await?;
                job.checkpoint(b"extended").await?;
                Ok(receipt(job.attempt()))
            },
        ));
        assert_eq!(got.map_err(|e| e.to_string())?, receipt(1));
    }
    assert_eq!(runs.get(), 1);
    let held = store.claim("q", "msg-2", "fp", &options)?;
    assert!(matches!(held, Claim::Acquired(_)));
    Ok(())
}

#[test]
fn a_job_stopped_by_its_lost_lease_reports_the_loss() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let got: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(1_000), |job| {
            clock.advance(Duration::from_secs(2));
            acquired(store.claim("q", "msg-1", "fp", &opts(1_000))?);
            job.checkpoint(b"step 2")?; // refused: `?` stops the job with the store's error
            Ok(receipt(job.attempt()))
        });
    assert!(
        matches!(got, Err(OnceError::Store(Error::LeaseLost { .. }))),
        "{got:?}"
    );
    // The successor still holds the work.
    assert!(matches!(
        store.claim("q", "msg-1", "fp", &opts(1_000))?,
        Claim::InProgress { .. }
    ));
    Ok(())
}

/// A panic in the function releases the claim and goes on unwinding: the next call runs it
/// again at once, as attempt 2 with the checkpoint the panicking attempt stored; the same for
/// the async form.
#[test]
fn a_panicking_job_releases_its_claim_and_the_panic_goes_on() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<Receipt, OnceError<String>> =
            once::run(&store, "q", "msg-1", b"fp", &opts(60_000), |job| {
                job.checkpoint(b"charged")?;
                panic!("the job panicked");
            });
    }));
    let message = panicked.err().ok_or("the panic was swallowed")?;
    assert_eq!(message.downcast_ref::<&str>(), Some(&"the job panicked"));
    let again: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &opts(60_000), |job| {
            resumed(job.attempt(), job.previous_checkpoint(), b"charged")
        });
    assert_eq!(again.map_err(|e| e.to_string())?, receipt(2));

    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let options = opts(60_000);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<Receipt, OnceError<String>> = runtime.block_on(once::run_async(
            &store,
            "q",
            "msg-2",
            b"fp",
            &options,
            async |job| {
                job.checkpoint(b"charged").await?;
                tokio::task::yield_now().await;
                panic!("the async job panicked");
            },
        ));
    }));
    assert!(panicked.is_err(), "the panic was swallowed");
    let again: Result<Receipt, OnceError<String>> = runtime.block_on(once::run_async(
        &store,
        "q",
        "msg-2",
        b"fp",
        &options,
        async |job| resumed(job.attempt(), job.previous_checkpoint(), b"charged"),
    ));
    assert_eq!(again.map_err(|e| e.to_string())?, receipt(2));
    Ok(())
}

/// A dropped `run_async` future (cancelled by a timeout) cannot release its claim: later
/// calls are told the job is in progress until the lease ends, and the first call after
/// that takes it over as attempt 2 with the checkpoint.
#[test]
fn a_cancelled_async_job_keeps_its_claim_until_the_lease_ends() -> TestResult {
    let clock = clock();
    let store = memory_store(&clock);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let options = opts(10_000);
    let cancelled = runtime.block_on(async {
        let job = once::run_async(&store, "q", "msg-1", b"fp", &options, async |job| {
            job.checkpoint(b"charged").await?;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<Receipt, JobError<String>>(receipt(job.attempt()))
        });
        tokio::time::timeout(Duration::from_millis(20), job).await
    });
    assert!(cancelled.is_err(), "the timeout cancelled the job");
    let during: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &options, |_| {
            Err(JobError::Fatal("must not run".into()))
        });
    assert!(
        matches!(during, Err(OnceError::InProgress { .. })),
        "{during:?}"
    );
    clock.advance(Duration::from_secs(11));
    let after: Result<Receipt, OnceError<String>> =
        once::run(&store, "q", "msg-1", b"fp", &options, |job| {
            resumed(job.attempt(), job.previous_checkpoint(), b"charged")
        });
    assert_eq!(after.map_err(|e| e.to_string())?, receipt(2));
    Ok(())
}
