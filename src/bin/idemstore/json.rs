//! The JSON Lines form of a record, shared by `export`, `import`, `get --json` and
//! `list --json`: one object per line, every byte string in standard base64 (RFC 4648 §4,
//! with padding).
//!
//! ```text
//! {"scope":"YWNjdF80Mg==","key":"b3JkZXItMQ==","fingerprint":"…","created_at_ms":1764572400000,
//!  "updated_at_ms":1764572400120,"expires_at_ms":1764658800120,"attempt":1,
//!  "state":"completed","outcome":"…"}
//! "state":"in-flight" carries "token", "epoch", "lease_until_ms", "checkpoint" (base64 or null);
//! "state":"failed" carries "checkpoint" (base64 or null).
//! ```

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use idemstore::{Record, RecordState};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte string, written as base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map(B64)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// One record, as one line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line {
    pub scope: B64,
    pub key: B64,
    pub fingerprint: B64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub expires_at_ms: u64,
    pub attempt: u32,
    #[serde(flatten)]
    pub state: State,
}

/// The state of a [`Line`], tagged by its `"state"` field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    InFlight {
        token: u64,
        epoch: u64,
        lease_until_ms: u64,
        checkpoint: Option<B64>,
    },
    Completed {
        outcome: B64,
    },
    Failed {
        checkpoint: Option<B64>,
    },
}

/// A record whose bytes fail their checks, as `list --json` reports it.
#[derive(Debug, Serialize)]
pub struct DamagedLine<'a> {
    pub scope: B64,
    pub key: B64,
    pub state: &'static str,
    pub reason: &'a str,
}

impl Line {
    /// The line of the record stored under `(scope, key)`; `Err` for a state this build does
    /// not know, which it could not write faithfully.
    pub fn new(scope: &[u8], key: &[u8], record: &Record) -> Result<Line, String> {
        let state = match &record.state {
            RecordState::InFlight {
                token,
                epoch,
                lease_until_ms,
                checkpoint,
            } => State::InFlight {
                token: *token,
                epoch: *epoch,
                lease_until_ms: *lease_until_ms,
                checkpoint: checkpoint.clone().map(B64),
            },
            RecordState::Completed { outcome } => State::Completed {
                outcome: B64(outcome.clone()),
            },
            RecordState::Failed { checkpoint } => State::Failed {
                checkpoint: checkpoint.clone().map(B64),
            },
            other => {
                return Err(format!(
                    "a record state this build does not know: {other:?}"
                ));
            }
        };
        Ok(Line {
            scope: B64(scope.to_vec()),
            key: B64(key.to_vec()),
            fingerprint: B64(record.fingerprint.clone()),
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            expires_at_ms: record.expires_at_ms,
            attempt: record.attempt,
            state,
        })
    }

    /// `(scope, key, record)`, as `Store::import` takes it.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, Record) {
        let state = match self.state {
            State::InFlight {
                token,
                epoch,
                lease_until_ms,
                checkpoint,
            } => RecordState::InFlight {
                token,
                epoch,
                lease_until_ms,
                checkpoint: checkpoint.map(|c| c.0),
            },
            State::Completed { outcome } => RecordState::Completed { outcome: outcome.0 },
            State::Failed { checkpoint } => RecordState::Failed {
                checkpoint: checkpoint.map(|c| c.0),
            },
        };
        let record = Record::from_parts(
            self.fingerprint.0,
            self.created_at_ms,
            self.updated_at_ms,
            self.expires_at_ms,
            self.attempt,
            state,
        );
        (self.scope.0, self.key.0, record)
    }
}
