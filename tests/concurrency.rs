//! Many threads on overlapping keys: exactly one execution per key, every duplicate gets the
//! winner's outcome, and group commit shares commits between callers.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::*;
use idemstore::{Claim, ClaimOptions, Store};

const THREADS: usize = 16;
const KEYS: usize = 200;

fn hammer(store: Arc<Store>) -> TestResult {
    let executions: Arc<Vec<AtomicU32>> = Arc::new((0..KEYS).map(|_| AtomicU32::new(0)).collect());
    let outcomes: Arc<Mutex<HashMap<usize, Vec<u8>>>> = Arc::default();
    let tokens: Arc<Mutex<Vec<u64>>> = Arc::default();
    let start = Arc::new(Barrier::new(THREADS));
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(60))
        .retention(DAY)
        .wait(Duration::from_secs(30));

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, executions, outcomes, tokens, start, options) = (
                Arc::clone(&store),
                Arc::clone(&executions),
                Arc::clone(&outcomes),
                Arc::clone(&tokens),
                Arc::clone(&start),
                options.clone(),
            );
            std::thread::spawn(move || -> Result<(), String> {
                start.wait();
                // Every thread visits every key, each in its own order, so keys overlap.
                for i in 0..KEYS {
                    let k = (i * 7 + t * 13) % KEYS;
                    let key = format!("key-{k}");
                    let seen = match store
                        .claim("s", &key, "fp", &options)
                        .map_err(|e| e.to_string())?
                    {
                        Claim::Acquired(lease) => {
                            executions[k].fetch_add(1, Ordering::SeqCst);
                            tokens.lock().expect("tokens").push(lease.token());
                            let outcome = format!("{key} by thread {t}").into_bytes();
                            store
                                .complete(&lease, &outcome, DAY)
                                .map_err(|e| e.to_string())?;
                            outcome
                        }
                        Claim::Replay(r) => r.outcome,
                        other => return Err(format!("{key}: unexpected {other:?}")),
                    };
                    let mut outcomes = outcomes.lock().expect("outcomes");
                    let first = outcomes.entry(k).or_insert_with(|| seen.clone());
                    if *first != seen {
                        return Err(format!("{key}: two different outcomes observed"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread")?;
    }

    for (k, n) in executions.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key-{k} executed {n:?} times");
    }
    let total: u32 = executions.iter().map(|n| n.load(Ordering::SeqCst)).sum();
    assert_eq!(
        total as usize, KEYS,
        "executions equal the number of distinct keys"
    );
    let mut tokens = tokens.lock().expect("tokens").clone();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), KEYS, "every lease had its own fencing token");

    let stats = store.stats()?;
    assert_eq!(stats.records, KEYS as u64);
    assert!(
        stats.commits < stats.operations,
        "group commit shared no commit: {stats:?}"
    );
    assert!(stats.largest_batch > 1, "{stats:?}");
    Ok(())
}

#[test]
fn concurrent_callers_execute_each_key_exactly_once_on_a_durable_file_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(
        Store::builder()
            .sweep_interval(None)
            .open(dir.path().join("idem.redb"))?,
    );
    hammer(store)
}

#[test]
fn concurrent_callers_execute_each_key_exactly_once_in_memory() -> TestResult {
    let store = Arc::new(Store::builder().sweep_interval(None).open_in_memory()?);
    hammer(store)
}

#[test]
fn duplicate_storm_on_one_key_has_exactly_one_winner_and_every_waiter_replays_it() -> TestResult {
    const STORM: usize = 200;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(
        Store::builder()
            .sweep_interval(None)
            .open(dir.path().join("idem.redb"))?,
    );
    let start = Arc::new(Barrier::new(STORM));
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(60))
        .wait(Duration::from_secs(30));
    let handles: Vec<_> = (0..STORM)
        .map(|t| {
            let (store, start, options) = (Arc::clone(&store), Arc::clone(&start), options.clone());
            std::thread::spawn(move || -> Result<(bool, Vec<u8>), String> {
                start.wait();
                match store
                    .claim("s", "hot", "fp", &options)
                    .map_err(|e| e.to_string())?
                {
                    Claim::Acquired(lease) => {
                        // Hold the lease a moment so the storm piles up behind it.
                        std::thread::sleep(Duration::from_millis(20));
                        let outcome = format!("winner {t}").into_bytes();
                        store
                            .complete(&lease, &outcome, DAY)
                            .map_err(|e| e.to_string())?;
                        Ok((true, outcome))
                    }
                    Claim::Replay(r) => Ok((false, r.outcome)),
                    other => Err(format!("unexpected {other:?}")),
                }
            })
        })
        .collect();
    let results: Vec<(bool, Vec<u8>)> = handles
        .into_iter()
        .map(|h| h.join().expect("storm thread"))
        .collect::<Result<_, _>>()?;
    let winners: Vec<&Vec<u8>> = results
        .iter()
        .filter(|(won, _)| *won)
        .map(|(_, o)| o)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one caller runs the request");
    assert!(
        results.iter().all(|(_, o)| o == winners[0]),
        "every duplicate replays the winner"
    );
    assert_eq!(store.stats()?.waiting, 0, "no waiter is left registered");
    Ok(())
}

#[test]
fn a_full_queue_applies_back_pressure_without_losing_operations() -> TestResult {
    let store = Arc::new(
        Store::builder()
            .sweep_interval(None)
            .queue_capacity(2)
            .max_batch_ops(2)
            .open_in_memory()?,
    );
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || -> Result<(), String> {
                for i in 0..50 {
                    let claim = store
                        .claim("s", format!("{t}-{i}"), "fp", &opts(1_000))
                        .map_err(|e| e.to_string())?;
                    let Claim::Acquired(lease) = claim else {
                        return Err(format!("{t}-{i}: {claim:?}"));
                    };
                    store
                        .complete(&lease, b"ok", DAY)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker")?;
    }
    let stats = store.stats()?;
    assert_eq!(stats.records, 400);
    assert!(stats.largest_batch <= 2, "{stats:?}");
    Ok(())
}
