//! The linearizability checker, shared by `tests/linearizability.rs` (threads on the embedded
//! store) and the conformance suite's `linearizability` case (async tasks on every backend).
//!
//! - **Histories** ([`history`]): every call takes a [`ticket`] from one global counter just
//!   before it is invoked and just after it returns; call `a` precedes `b` in real time iff
//!   `a.returned < b.invoked`. The result (tokens, attempts, lease ends, replayed bytes, whole
//!   records read by `get`) is kept. [`plan_call`] draws the calls a round makes, the same for
//!   every runner.
//! - **Checking** ([`check`]): per key, a Wing & Gong search over the orders consistent with
//!   real time, memoised on (set of linearised calls, model state), runs the reference model
//!   (`idemstore::testkit::model`) of one record; a key's history is linearisable if some
//!   order reproduces every result. A round's [`Ctx`] fixes the model's time and the owners
//!   alive; on a server, whose clock runs during the round, timestamps are left out of the
//!   comparison ([`Ctx::timeless`]). Fencing is checked apart from the model: no lease write
//!   with token `a` takes effect after a claim of the same key returned a newer token `b > a`,
//!   and acquired tokens are unique.

pub mod check;
pub mod history;

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use check::{Checker, Ctx, KeyState, Report, fencing_violations, linearize};
#[allow(unused_imports)]
pub use history::{
    CALLS_PER_KEY, Call, Event, KEYS, MANUAL, Pool, Ret, SERVER, THREADS, Timing, acquired_token,
    pick_lease, plan_call, round_plans, ticket,
};
