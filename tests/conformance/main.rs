//! One behavioural suite for every backend: the same named cases run on the in-memory store,
//! the file store, PostgreSQL (feature `postgres`) and Redis (feature `redis`), each case an ordinary `#[test]` named
//! `<backend>::<case>` (`cargo test --all-features --test conformance postgres::`).
//!
//! The PostgreSQL and Redis cases start their own servers (`tests/servers/`): installed with apt-get when
//! missing (as root), on 127.0.0.1 on a free port with a temporary data directory, stopped by
//! a watchdog when the test process exits. Without a server they are skipped with a message,
//! except under `CI=true`, where a missing or failing server fails them. Each case uses its
//! own PostgreSQL schema, so cases run in parallel on one server.
//!
//! Every backend is used through `AnyBackend`, so the suite also exercises the boxed adapter.
//!
//! Two cases are built on the reference model (`idemstore::testkit`, feature `__testkit`, on
//! in `--all-features` runs as in CI): `reference_model` runs random operation sequences
//! against the backend and the model, `linearizability` checks concurrent histories against
//! it (the checker of `tests/linearizability.rs`, in `tests/support/`).

// Some cases, and the helpers they use, run only on the servers (features `postgres` and `redis`).
#[cfg_attr(not(all(feature = "postgres", feature = "redis")), allow(dead_code))]
mod cases;
#[cfg_attr(not(all(feature = "postgres", feature = "redis")), allow(dead_code))]
mod env;
#[cfg(feature = "__testkit")]
mod linearizability;
#[cfg(feature = "__testkit")]
mod reference_model;
#[path = "../servers/mod.rs"]
mod servers;
#[cfg(feature = "__testkit")]
#[path = "../support/mod.rs"]
mod support;

/// Generates `mod $backend { #[test] fn case() ... }` for the cases every backend runs, plus
/// the extra cases given.
macro_rules! conformance {
    ($backend:ident $(, $extra:ident)* $(,)?) => {
        mod $backend {
            conformance!(@cases $backend:
                claim_table,
                fencing,
                lease_expiry_takeover_and_orphans,
                mismatch,
                waits,
                expiry_and_sweep,
                limits,
                scopes_and_quota,
                tokens,
                checkpoint_handover,
                forget,
                duplicate_storm_across_two_handles,
                capabilities,
                $($extra,)*
            );
            #[cfg(feature = "__testkit")]
            conformance!(@cases $backend: reference_model, linearizability,);
        }
    };
    (@cases $backend:ident: $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                crate::env::run(stringify!($backend), stringify!($case), crate::cases::$case);
            }
        )*
    };
}

conformance!(memory);
conformance!(file, restart_takes_over_at_once);
#[cfg(feature = "postgres")]
conformance!(
    postgres,
    open_from_url,
    restart_takes_over_at_once,
    silent_owner_times_out,
    server_crash_keeps_acknowledged_writes,
    connection_killed_mid_call,
);
#[cfg(feature = "redis")]
conformance!(
    redis,
    open_from_url,
    restart_takes_over_at_once,
    silent_owner_times_out,
    tokens_past_1e14,
    server_crash_keeps_acknowledged_writes,
    connection_killed_mid_call,
);
