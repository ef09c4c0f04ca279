//! The chaos run's summary: what the client saw, what the ledger holds, and whether they agree.

use std::sync::Arc;
use std::time::Duration;

use crate::api::Principal;
use crate::chaos::{Tally, load};
use crate::ledger::Audit;
use crate::workload::{Kind, Payment, TENANTS};

/// Client/ledger disagreements printed in full; the rest are only counted.
const DISAGREEMENTS_SHOWN_MAX: u64 = 10;

/// Everything the summary is made of.
pub struct Report<'a> {
    /// The workload, in order.
    pub payments: &'a [Arc<Payment>],
    /// The charge id the client ended up with for each payment.
    pub outcomes: &'a [Option<String>],
    /// The ledger's audit after the run.
    pub audit: &'a Audit,
    /// What the client counted.
    pub tally: &'a Tally,
    /// In-flight claims left in the idempotency store.
    pub orphans: usize,
    /// The run's wall time.
    pub elapsed: Duration,
    /// What served the run: the processes and the store.
    pub store: &'a str,
    /// Service processes.
    pub processes: usize,
}

/// Compares the client's outcomes with the ledger, prints the summary on stdout (the first ten
/// disagreements on stderr) and returns whether the run was healthy: every payment charged
/// exactly once, and the client got that charge.
pub fn print(report: &Report<'_>) -> bool {
    let Report {
        payments,
        outcomes,
        audit,
        tally: t,
        orphans,
        elapsed,
        store,
        processes,
    } = *report;
    let mut disagreements = 0u64;
    let mut expected = 0u64;
    for (payment, outcome) in payments.iter().zip(outcomes) {
        if payment.kind == Kind::Invalid {
            continue;
        }
        expected += 1;
        let account = Principal::of_key(TENANTS[payment.tenant]).account;
        let in_ledger = audit.by_order.get(&(account, payment.order_id.clone()));
        let agrees = matches!((outcome, in_ledger), (Some(id), Some(ids)) if ids.len() == 1 && ids.first() == Some(id));
        if !agrees {
            disagreements += 1;
            if disagreements <= DISAGREEMENTS_SHOWN_MAX {
                eprintln!(
                    "disagreement: {} ({}) client got {outcome:?}, ledger has {in_ledger:?}",
                    payment.order_id,
                    payment.kind.name()
                );
            }
        }
    }

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| rows.push((name.to_owned(), value));
    row("logical payments (4 tenants)", payments.len().to_string());
    row(
        "idempotency keys shared by two tenants",
        payments.iter().filter(|p| p.shares_key).count().to_string(),
    );
    row("requests sent", load(&t.requests).to_string());
    row(
        "  of which retries (same key)",
        load(&t.retries).to_string(),
    );
    row(
        "responses dropped by the client",
        load(&t.dropped).to_string(),
    );
    row(
        "connection errors (service down)",
        load(&t.connection_errors).to_string(),
    );
    row(
        "requests a running service left hanging",
        load(&t.unanswered).to_string(),
    );
    row(
        "service crashes (SIGKILL) + restarts",
        load(&t.restarts).to_string(),
    );
    if processes > 1 {
        row(
            "retries sent to another process",
            load(&t.switched).to_string(),
        );
    }
    row("", String::new());
    row("charges expected", expected.to_string());
    row("charges executed (ledger)", audit.charges.to_string());
    // A shared ledger records which process executed each charge.
    for (process, charges) in &audit.by_process {
        row(&format!("  executed by {process}"), charges.to_string());
    }
    row("200 answers", load(&t.ok).to_string());
    row(
        "replays (Idempotent-Replayed: true)",
        load(&t.replays).to_string(),
    );
    row("409 original in flight", load(&t.conflicts).to_string());
    row(
        "400 key reused with other params",
        load(&t.mismatches).to_string(),
    );
    row(
        "400 invalid params (stored, replayed)",
        load(&t.invalid).to_string(),
    );
    row("5xx (retried)", load(&t.server_errors).to_string());
    row(
        "retries reconciled from the ledger",
        audit.reconciled.to_string(),
    );
    row("orphaned claims left in the store", orphans.to_string());
    row(
        "client/ledger disagreements",
        (disagreements + load(&t.storm_disagreements) + load(&t.unexpected)).to_string(),
    );
    row("payments given up", load(&t.gave_up).to_string());
    row("duplicates executed", audit.duplicates.to_string());
    println!();
    println!("idemstore payments demo: chaos run against a Stripe-compatible API");
    println!("({store})");
    println!();
    for (name, value) in &rows {
        if name.is_empty() {
            println!("  {}", "-".repeat(48));
        } else {
            println!("  {name:<38} {value:>9}");
        }
    }
    println!();
    let healthy = audit.duplicates == 0
        && audit.charges == expected
        && disagreements == 0
        && load(&t.storm_disagreements) == 0
        && load(&t.unexpected) == 0
        && load(&t.unanswered) == 0
        && load(&t.gave_up) == 0;
    println!(
        "  {} in {:.1} s: {}",
        if healthy { "PASS" } else { "FAIL" },
        elapsed.as_secs_f64(),
        if healthy {
            "every payment charged exactly once"
        } else {
            "see the counts above"
        }
    );
    healthy
}
