//! # idemstore
//!
//! An embedded, crash-safe idempotency store: it turns at-least-once retries into exactly-once
//! side effects. A client sends a request with an idempotency key; the store lets exactly one
//! execution [`claim`](Store::claim) it, and every retry gets the first answer back, byte for
//! byte.
//!
//! ```
//! use idemstore::{Claim, ClaimOptions, Store};
//! use std::time::Duration;
//!
//! let store = Store::in_memory()?;
//! let options = ClaimOptions::default().lease(Duration::from_secs(10));
//!
//! match store.claim("acct_42", "9b2c…-uuid", b"sha256-of-request", &options)? {
//!     Claim::Acquired(lease) => {
//!         // Run the side effect exactly here, then record its answer.
//!         store.complete(&lease, b"201 Created: ch_1", Duration::from_secs(86_400))?;
//!     }
//!     Claim::Replay(replay) => println!("already done: {:?}", replay.outcome),
//!     Claim::InProgress { retry_after } => println!("retry in {retry_after:?}"),
//!     Claim::Mismatch => println!("key reused for another request"),
//!     _ => unreachable!("Claim has no other variants in this version"),
//! }
//! # Ok::<(), idemstore::Error>(())
//! ```
//!
//! ## Guarantees
//! - **Exactly one owner.** At any time at most one lease owns a record; every lease write
//!   (`complete`, `fail`, `extend`, `checkpoint`) is fenced by its token, so a slow or
//!   resurrected owner never overwrites its successor ([`Error::LeaseLost`]).
//! - **Durable acknowledgements.** At [`Durability::Immediate`] (the default) a transition is
//!   fsynced before it returns, and reads only see committed state. Concurrent callers share
//!   fsyncs through one group-committing writer thread.
//! - **Crash recovery.** Each open starts a new process epoch; in-flight records of a dead
//!   process are [`orphans`](Store::orphans) that can be taken over at once, with their last
//!   [`checkpoint`](Store::checkpoint).
//! - **Logical expiry.** A record past its expiry is absent to every operation; the sweeper
//!   only reclaims space, walking the expiry index in O(expired).
//! - **Untrusted bytes.** Each record carries a format version and a CRC-32; anything that
//!   fails its checks is a typed [`Error::Corrupt`], never a panic and never a wrong replay.
//!
//! The honest limit: if the process dies after the side effect but before `complete`, the
//! record is an orphan and the application must reconcile it (checkpoint + external check).
//! The engine makes that window visible and small; it cannot make it vanish.
//!
//! ## Metrics (feature `metrics`)
//! The engine reports through the [`metrics`](https://docs.rs/metrics) facade; install any
//! recorder (a Prometheus exporter, say) in the application, before it opens its stores: the
//! open sets `idemstore_poisoned` to 0, and a report made while no recorder is installed is
//! lost. Without the feature nothing is compiled in; with it and no recorder, each report
//! builds its labels and goes nowhere.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `idemstore_claims_total` | counter | `store`, `answer` = `acquired`, `replay`, `in_progress`, `mismatch` | claims answered |
//! | `idemstore_lease_lost_total` | counter | `store` | lease writes refused by fencing ([`Error::LeaseLost`]) |
//! | `idemstore_commits_total` | counter | `store`, `durable` = `true`, `false` | batches committed |
//! | `idemstore_commit_operations` | histogram | `store` | operations per committed batch (group commit at work) |
//! | `idemstore_commit_seconds` | histogram | `store`, `durable` | time to apply and commit one batch, its fsync included |
//! | `idemstore_commit_failures_total` | counter | `store` | batches whose commit failed (the store is then poisoned) |
//! | `idemstore_queue_depth` | gauge | `store` | operations left in the commit queue after the writer took a batch |
//! | `idemstore_queue_bytes` | gauge | `store` | bytes those operations hold |
//! | `idemstore_swept_total` | counter | `store` | expired records removed by sweeps |
//! | `idemstore_poisoned` | gauge | `store` | 1 once a fatal error stopped writes, else 0 |
//!
//! With the [write-ahead log](StoreBuilder::write_ahead_log), also:
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `idemstore_log_sync_seconds` | histogram | `store` | each `fdatasync` of the log (what a durable commit waits for) |
//! | `idemstore_checkpoints_total` | counter | `store` | checkpoints completed |
//! | `idemstore_checkpoint_seconds` | histogram | `store` | time to write the record map into the database file, per checkpoint |
//! | `idemstore_checkpoint_failures_total` | counter | `store` | failed checkpoints (the store is then poisoned) |
//! | `idemstore_checkpoint_lag_bytes` | gauge | `store` | log bytes appended since what the last checkpoint covers |
//! | `idemstore_checkpoint_lag_seconds` | gauge | `store` | [`WalStats::checkpoint_lag_ms`] in seconds: how long the oldest change not yet checkpointed has waited; set by the checkpointer after each turn, so a stuck checkpoint shows as a gauge that stops moving beside a flat `idemstore_checkpoints_total` |
//! | `idemstore_wal_map_bytes` | gauge | `store` | memory held by the record map ([`StoreBuilder::map_budget`]) |
//! | `idemstore_wal_read_cache_bytes` | gauge | `store` | memory held by the read cache |
//! | `idemstore_wal_log_bytes` | gauge | `store` | log segments holding batches no checkpoint covers |
//! | `idemstore_scrubs_total` | counter | `store`, `result` = `ok`, `damaged`, `unreadable` | background page verifications ([`StoreBuilder::scrub_interval`]) |
//!
//! The gauges are set by the checkpointer after each checkpoint and each idle
//! `checkpoint_interval`; [`Stats::wal`] reads the same figures on demand.
//!
//! Every metric carries a `store` label naming the store it comes from: the path it was opened
//! at, or the name given to [`StoreBuilder::metrics_label`]. The file stores of one process
//! report apart, each with its own gauges; in-memory stores are all `memory` unless each is
//! given a label. `durable` says whether a commit was asked to be durable (the store's
//! [`Durability`]); an in-memory store reports its commits as asked, though nothing it holds
//! outlives the process.
//!
//! These metrics are the embedded engine's ([`Store`], in a file or in memory). The PostgreSQL
//! and Redis backends report none of their own: their servers have their own metrics, and the
//! HTTP layer counts what it sees on any backend (`http::Metrics`, feature `http`).
//!
//! ## Tracing
//! The engine's slow paths are [`tracing`](https://docs.rs/tracing) spans: `idemstore.open`
//! (info, with the path), `idemstore.inspect_unclean_file` (info: a file left unclean by a crash
//! is inspected before redb repairs it), `idemstore.commit` (debug, one per group commit, with
//! its operation count and durability), `idemstore.sweep` and `idemstore.orphans` (debug).
//! Events: a store that stops accepting writes after a fatal error (error, once), a failed
//! background sweep or a swept record that failed its checks (warn).
//! The HTTP layer keeps its own counters (`http::Metrics`, feature `http`).
//!
//! ## Layout
//! `core/` holds what every backend shares: the record, the claim types and the pure state
//! machine (`core/transition.rs`). `engine/` is the embedded store: builder, queue, group-commit
//! writer, reads, sweeper and the storage seam (`engine/storage/`, with redb behind it).
//! `backend/` is the backend-neutral trait the HTTP layer (`http/`, feature `http`) and services
//! use, its boxed form ([`AnyBackend`]), and the shared stores for services on several machines:
//! PostgreSQL (feature `postgres`) and Redis/Valkey (feature `redis`).

#![forbid(unsafe_code)]
// docs.rs builds with `--cfg docsrs` on nightly (Cargo.toml, [package.metadata.docs.rs]): each
// feature-gated item then shows the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, clippy::unwrap_used, clippy::indexing_slicing)]

mod backend;
mod clock;
mod core;
mod engine;
mod error;
mod limits;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;

pub mod once;

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use backend::postgres;

/// The Redis/Valkey backend (feature `redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use backend::redis;

pub use backend::{AnyBackend, BoxFuture, Capabilities, DynBackend, IdempotencyBackend};
pub use clock::{Clock, ManualClock, SystemClock};
pub use core::admin::{Orphan, Swept};
pub use core::claim::{Claim, ClaimOptions, Lease, Replay};
pub use core::record::{Record, RecordState};
pub use engine::{
    ASYNC_READ_THREADS_MAX, BATCH_OPS_MAX, Durability, FORMAT_VERSION, MAP_BUDGET_MIN,
    QUEUE_BYTES_MAX, QUEUE_CAPACITY_MAX, Stats, Store, StoreBuilder, WAL_SEGMENT_BYTES_MAX,
    WAL_SEGMENT_BYTES_MIN, WAL_SEGMENTS_MAX, WalStats,
};
pub use engine::{
    Compaction, Damage, Entry, ImportReport, PageCheck, ReadOnlyStore, Summary, Verification,
};
pub use error::{Error, Input, Result, Source};
pub use limits::{
    CHECKPOINT_LEN_MAX, FINGERPRINT_LEN_MAX, KEY_LEN_MAX, Limits, OUTCOME_LEN_MAX,
    RETENTION_MS_MAX, SCOPE_LEN_MAX, WAIT_MS_MAX,
};

// Test-only code (simulated disk, reference model, fuzz entry points) behind the internal
// feature `__testkit`; documented in the module itself.
#[cfg(feature = "__testkit")]
#[doc(hidden)]
pub mod testkit;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
