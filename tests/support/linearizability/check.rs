//! Checking histories: the sequential model of one key, the search for a linearisation, the
//! fencing check apart from the model, and the per-round bookkeeping of a run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use idemstore::testkit::model::{Expected, MRecord, Model};

use super::history::{Call, Event, Ret, acquired_token};

/// The name a key's history is checked under in the model: each history is one key's.
const MODEL_SCOPE: &[u8] = b"scope";
const MODEL_KEY: &[u8] = b"key";

/// The model state of one key: the shared reference model holding (at most) that key's record,
/// expired ones dropped, and the newest token granted on the key so far (tokens granted on a
/// key increase in linearisation order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyState {
    model: Model,
    last_token: u64,
}

impl KeyState {
    /// A key whose record is `record`, with tokens up to `last_token` granted.
    pub fn holding(record: Option<MRecord>, last_token: u64) -> KeyState {
        let mut model = Model::default();
        model.set(MODEL_SCOPE, MODEL_KEY, record);
        KeyState { model, last_token }
    }
}

/// What holds while a round runs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The model's time (ms), fixed for the round.
    pub now: u64,
    /// The owners alive during the round: the process epoch of an embedded store, the owner
    /// ids of a shared store's instances. An in-flight record of any of them is no orphan.
    pub owners: BTreeSet<u64>,
    /// Whether timestamps are left out of the comparison ([`Ret::timeless`]): a server's clock
    /// runs while the round runs, and the round's leases and retentions are long enough that
    /// nothing ends meanwhile, so the model's fixed time decides as the server does.
    pub timeless: bool,
    /// Whether the backend grants a key's tokens in increasing order (an embedded store's are
    /// strictly increasing store-wide, Redis's per scope). PostgreSQL promises unique tokens
    /// only: a claim draws its token before it can find the row it waits for deleted, so
    /// after a `forget` a later grant may carry a lower token. Fencing is then checked by the
    /// order of the grants (`fencing_violations`), not by the tokens' values.
    pub ordered_tokens: bool,
}

/// Applies `call` to `state` and returns the next state if `ret` is what the model answers.
/// The token of an acquisition is the store's choice: any token above the key's last one (any
/// token at all where the backend does not order them, `Ctx::ordered_tokens`).
pub fn step(state: &KeyState, call: &Call, ret: &Ret, ctx: &Ctx) -> Option<KeyState> {
    let (s, k) = (MODEL_SCOPE, MODEL_KEY);
    let mut next = state.clone();
    next.model.now = ctx.now;
    // Expired records are absent to every call: dropping them keeps the memo small.
    next.model.drop_expired();
    let m = &mut next.model;
    let lease = |took_effect: bool, done: Ret| if took_effect { done } else { Ret::LeaseLost };
    let want = match call {
        Call::Get => Ret::Got(m.live(s, k).cloned()),
        Call::Forget => Ret::Forgotten(m.forget(s, k)),
        Call::Claim {
            owner,
            fingerprint,
            lease_ms,
            retention_ms,
            wait: _,
        } => {
            m.epoch = *owner;
            m.peers.clone_from(&ctx.owners);
            let answer = m.claim(s, k, fingerprint, *lease_ms, *retention_ms);
            // Owners are the round's, not the key's: keep them out of the memoised state.
            m.epoch = 0;
            m.peers.clear();
            let mut token = 0;
            if let Expected::Acquired { .. } = answer {
                let granted = acquired_token(ret)?;
                if ctx.ordered_tokens && granted <= state.last_token {
                    return None;
                }
                m.grant(s, k, granted);
                next.last_token = granted.max(state.last_token);
                token = granted;
            }
            Ret::Claimed { answer, token }
        }
        Call::Complete {
            token,
            outcome,
            retention_ms,
        } => lease(m.complete(s, k, *token, outcome, *retention_ms), Ret::Done),
        Call::Fail { token } => lease(m.fail(s, k, *token), Ret::Done),
        Call::Extend { token, by_ms } => match m.extend(s, k, *token, *by_ms) {
            Some(until) => Ret::Extended { until },
            None => Ret::LeaseLost,
        },
        Call::Checkpoint { token, bytes } => lease(m.checkpoint(s, k, *token, bytes), Ret::Done),
    };
    let want = if ctx.timeless { want.timeless() } else { want };
    (*ret == want).then_some(next)
}

/// The outcome of checking one key's history.
#[derive(Debug)]
pub struct Verdict {
    /// The state after a full linearisation, if there is one.
    pub end: Option<KeyState>,
    /// Search nodes visited.
    pub explored: usize,
}

/// Searches for an order of `events` that respects real time and that the model accepts from
/// `start`. At most 64 events.
pub fn linearize(events: &[Event], start: &KeyState, ctx: &Ctx) -> Verdict {
    assert!(events.len() <= 64, "histories are kept small");
    let timeless: Vec<Event>;
    let events = if ctx.timeless {
        timeless = events
            .iter()
            .map(|e| Event {
                ret: e.ret.timeless(),
                ..e.clone()
            })
            .collect();
        &timeless
    } else {
        events
    };
    let all: u64 = if events.len() == 64 {
        u64::MAX
    } else {
        (1u64 << events.len()) - 1
    };
    let mut seen: HashSet<(u64, KeyState)> = HashSet::new();
    let mut explored = 0;
    // Depth-first, with an explicit stack of (done set, state).
    let mut stack = vec![(0u64, start.clone())];
    while let Some((done, state)) = stack.pop() {
        explored += 1;
        if done == all {
            return Verdict {
                end: Some(state),
                explored,
            };
        }
        if !seen.insert((done, state.clone())) {
            continue;
        }
        // The earliest return among the pending calls: a call invoked after it cannot be next.
        let horizon = events
            .iter()
            .enumerate()
            .filter(|(i, _)| done & (1 << i) == 0)
            .map(|(_, e)| e.returned)
            .min()
            .unwrap_or(u64::MAX);
        for (i, e) in events.iter().enumerate() {
            if done & (1 << i) != 0 || e.invoked > horizon {
                continue;
            }
            if let Some(next) = step(&state, &e.call, &e.ret, ctx) {
                stack.push((done | (1 << i), next));
            }
        }
    }
    Verdict {
        end: None,
        explored,
    }
}

/// Fencing, independent of the model: a lease write with token `a` that took effect must not
/// have been invoked after a claim of the same key returned a newer token (`ordered`: newer by
/// value), nor after a claim granted another token strictly after `a`'s grant had returned
/// (by the order of the grants, which holds whatever the tokens' values). Returns the
/// violations.
pub fn fencing_violations(events: &[Event], ordered: bool) -> Vec<String> {
    let mut out = Vec::new();
    for w in events {
        let (Some(token), true) = (
            w.call.lease_token(),
            matches!(w.ret, Ret::Done | Ret::Extended { .. }),
        ) else {
            continue;
        };
        let granted_at = events
            .iter()
            .find(|g| acquired_token(&g.ret) == Some(token))
            .map(|g| g.returned);
        for a in events {
            let Some(other) = acquired_token(&a.ret) else {
                continue;
            };
            let newer = if ordered {
                other > token
            } else {
                other != token && granted_at.is_some_and(|at| at < a.invoked)
            };
            if newer && a.returned < w.invoked {
                out.push(format!(
                    "{:?} with token {token} took effect after token {other} was granted ({a:?} then {w:?})",
                    w.call
                ));
            }
        }
    }
    out
}

/// Totals over every round of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub rounds: usize,
    pub histories: usize,
    pub calls: usize,
    pub max_calls_per_key: usize,
    pub explored: usize,
    /// Calls whose interval overlapped another call on the same key.
    pub overlapping: usize,
    pub acquired: usize,
    pub replays: usize,
    pub lease_lost: usize,
    pub non_linearizable: Vec<String>,
    pub fencing: Vec<String>,
    pub duplicate_tokens: usize,
}

impl Report {
    /// The totals in one line.
    pub fn summary(&self) -> String {
        format!(
            "{} rounds, {} key histories, {} calls (at most {} per key per round, {} \
             overlapping another on the same key), {} search nodes; {} acquired, {} replays, \
             {} lease-lost; non-linearizable {}, fencing violations (double winners) {}, \
             duplicate tokens {}",
            self.rounds,
            self.histories,
            self.calls,
            self.max_calls_per_key,
            self.overlapping,
            self.explored,
            self.acquired,
            self.replays,
            self.lease_lost,
            self.non_linearizable.len(),
            self.fencing.len(),
            self.duplicate_tokens,
        )
    }

    /// Panics unless every history was linearizable, no stale write took effect, every token
    /// was unique, no key had more calls than `calls_per_key`, and the run reached the
    /// interesting answers (acquisitions, replays and lost leases).
    pub fn assert_sound(&self, calls_per_key: usize) {
        assert!(
            self.non_linearizable.is_empty(),
            "{} non-linearizable histories; the first:\n{}",
            self.non_linearizable.len(),
            self.non_linearizable.first().map_or("", String::as_str)
        );
        assert!(self.fencing.is_empty(), "{:#?}", self.fencing);
        assert_eq!(self.duplicate_tokens, 0, "tokens are unique");
        assert!(self.max_calls_per_key <= calls_per_key);
        assert!(
            self.acquired > 0 && self.replays > 0 && self.lease_lost > 0,
            "the run reached every kind of answer: {}",
            self.summary()
        );
    }
}

/// Checks a run round by round, carrying each key's state from one round to the next.
#[derive(Debug)]
pub struct Checker {
    label: String,
    states: BTreeMap<usize, KeyState>,
    tokens: HashSet<u64>,
    /// The totals so far.
    pub report: Report,
}

impl Checker {
    /// A checker for the run named `label` (named in its failures).
    pub fn new(label: &str) -> Checker {
        Checker {
            label: label.to_owned(),
            states: BTreeMap::new(),
            tokens: HashSet::new(),
            report: Report::default(),
        }
    }

    /// Starts the keys afresh: the next round's keys are new names.
    pub fn new_keys(&mut self) {
        self.states.clear();
    }

    /// Checks round `round`: per key, its calls, the quiescent `get` that closes the round
    /// last. A history that is not linearizable is recorded in the report, and the key goes
    /// on from what that `get` saw.
    pub fn check_round(&mut self, round: usize, ctx: &Ctx, per_key: BTreeMap<usize, Vec<Event>>) {
        let report = &mut self.report;
        report.rounds += 1;
        for (key, events) in per_key {
            report.histories += 1;
            report.calls += events.len();
            report.max_calls_per_key = report.max_calls_per_key.max(events.len());
            report.overlapping += events
                .iter()
                .enumerate()
                .filter(|(i, a)| {
                    events
                        .iter()
                        .enumerate()
                        .any(|(j, b)| *i != j && a.invoked < b.returned && b.invoked < a.returned)
                })
                .count();
            for e in &events {
                if let Some(token) = acquired_token(&e.ret) {
                    report.acquired += 1;
                    if !self.tokens.insert(token) {
                        report.duplicate_tokens += 1;
                    }
                }
                match &e.ret {
                    Ret::Claimed {
                        answer: Expected::Replay { .. },
                        ..
                    } => report.replays += 1,
                    Ret::LeaseLost => report.lease_lost += 1,
                    _ => {}
                }
            }
            report
                .fencing
                .extend(fencing_violations(&events, ctx.ordered_tokens));
            let start = self.states.get(&key).cloned().unwrap_or_default();
            let verdict = linearize(&events, &start, ctx);
            report.explored += verdict.explored;
            if let Some(end) = verdict.end {
                self.states.insert(key, end);
                continue;
            }
            let mut sorted = events;
            sorted.sort_by_key(|e| e.invoked);
            let mut text = format!(
                "{} round {round} key {key}: not linearizable from {start:?} at {ctx:?}",
                self.label
            );
            for e in &sorted {
                let who = if e.thread == usize::MAX {
                    "quiescent".to_owned()
                } else {
                    format!("thread {}", e.thread)
                };
                // Byte strings shown as text: outcomes and checkpoints are ASCII here.
                let call = readable(&format!("{:?}", e.call));
                let ret = readable(&format!("{:?}", e.ret));
                let _ = write!(
                    text,
                    "\n    {who} [{}..{}] {call} -> {ret}",
                    e.invoked, e.returned
                );
            }
            report.non_linearizable.push(text);
            // Go on from what the store holds (the closing read, with its real timestamps).
            let observed = sorted.last().and_then(|e| match &e.ret {
                Ret::Got(m) => Some(m.clone()),
                _ => None,
            });
            let last_token = self.tokens.iter().copied().max().unwrap_or(0);
            self.states
                .insert(key, KeyState::holding(observed.flatten(), last_token));
        }
    }
}

/// Rewrites every `[b, y, t, e, s]` list of a debug string as the text it encodes.
pub fn readable(debug: &str) -> String {
    let mut out = String::new();
    let mut rest = debug;
    while let Some(open) = rest.find('[') {
        let (head, tail) = rest.split_at(open);
        out.push_str(head);
        let Some(close) = tail.find(']') else {
            out.push_str(tail);
            return out;
        };
        let inner = &tail[1..close];
        let bytes: Option<Vec<u8>> = inner
            .split(", ")
            .map(|b| b.trim().parse::<u8>().ok())
            .collect();
        match bytes {
            Some(b) if !inner.is_empty() => {
                out.push_str(&format!("{:?}", String::from_utf8_lossy(&b)));
            }
            _ => out.push_str(&tail[..=close]),
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    out
}
