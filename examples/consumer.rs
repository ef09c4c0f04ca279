//! A message consumer that processes each message once, across redeliveries and restarts,
//! with `idemstore::once`.
//!
//! ```sh
//! cargo run --example consumer
//! ```
//!
//! A queue delivers at least once: every message arrives one to three times, in shuffled
//! order. The consumer "charges" each message's amount through `once::run`, keyed by the
//! message id. Midway the consumer crashes inside a job, right after its side effect (a panic
//! that skips completing it), and is restarted on the same store file: the in-flight record of
//! the dead process is taken over at once by the next delivery (attempt 2), which finds the
//! checkpoint the first attempt left after charging and does not charge again. At the end every
//! message has been charged exactly once and every delivery got the same receipt.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use idemstore::once::{self, JobError, OnceError};
use idemstore::{ClaimOptions, Store};
use serde::{Deserialize, Serialize};

/// What processing a message returns, stored and replayed to every redelivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    message: u32,
    amount: u64,
    attempt: u32,
}

/// The side effect: money moved, counted per message.
#[derive(Default)]
struct Bank {
    charges: BTreeMap<u32, u32>,
}

/// A small deterministic shuffle (xorshift), so every run tells the same story.
fn deliveries(messages: u32) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out: Vec<u32> = (0..messages)
        .flat_map(|m| std::iter::repeat_n(m, 1 + (next() % 3) as usize))
        .collect();
    for i in (1..out.len()).rev() {
        out.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("consumer.redb");
    let options = ClaimOptions::default();
    let mut queue: std::collections::VecDeque<u32> = deliveries(50).into();
    let total_deliveries = queue.len();
    let crash_at = queue.len() / 2;
    // The crash below is a panic; say it in one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("crash: {}", info.payload_as_str().unwrap_or("panic"))
    }));
    let mut bank = Bank::default();
    let mut receipts: BTreeMap<u32, Receipt> = BTreeMap::new();
    let mut store = Store::open(&path)?;
    let mut restarts = 0;

    let mut i = 0;
    while let Some(message) = queue.pop_front() {
        i += 1;
        let amount = 100 + u64::from(message);
        let process = |job: &mut once::Job<'_>| -> Result<Receipt, JobError<String>> {
            // A retry after a crash resumes: the checkpoint says the charge went through.
            if job.previous_checkpoint() != Some(b"charged") {
                *bank.charges.entry(message).or_default() += 1;
                job.checkpoint(b"charged")
                    .map_err(|e| JobError::Retry(e.to_string()))?;
            }
            if i == crash_at {
                panic!("the consumer process dies after charging message {message}");
            }
            Ok(Receipt {
                message,
                amount,
                attempt: job.attempt(),
            })
        };
        let key = format!("msg-{message}");
        let fingerprint = amount.to_le_bytes();
        let run = catch_unwind(AssertUnwindSafe(|| {
            once::run(&store, "payments", &key, fingerprint, &options, process)
        }));
        let receipt: Result<Receipt, OnceError<String>> = match run {
            Ok(result) => result,
            Err(_) => {
                // The process died before acknowledging the message, so the queue delivers it
                // again; the consumer restarts on the same file (a new process epoch).
                queue.push_back(message);
                drop(store);
                store = Store::open(&path)?;
                restarts += 1;
                continue;
            }
        };
        let receipt = receipt?;
        let first = receipts.entry(message).or_insert_with(|| receipt.clone());
        assert_eq!(*first, receipt, "every delivery gets the same receipt");
    }

    let charged_twice = bank.charges.values().filter(|n| **n > 1).count();
    println!("deliveries            {}", total_deliveries + restarts);
    println!("messages              {}", receipts.len());
    println!("consumer restarts     {restarts}");
    println!(
        "taken over after crash {}",
        receipts.values().filter(|r| r.attempt > 1).count()
    );
    println!(
        "charged exactly once  {}",
        bank.charges.len() - charged_twice
    );
    println!("charged twice         {charged_twice}");
    if charged_twice > 0 || receipts.len() != 50 {
        return Err("a message was charged twice or never".into());
    }
    Ok(())
}
