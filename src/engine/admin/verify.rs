//! [`ReadOnlyStore::verify`]: every record envelope and the invariants between the tables.

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata};

use super::read_only::ReadOnlyStore;
use crate::core::record::{RecordState, display_key, split_scoped_key};
use crate::engine::codec;
use crate::engine::storage::redb::tables::{EXPIRY, RECORDS, SCOPES};
use crate::error::{Error, Result};

/// What [`Store::verify_pages`](crate::Store::verify_pages) verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageCheck {
    /// Bytes of the database file whose page checksums were verified.
    pub bytes: u64,
    /// How long the verification took (commits waited that long).
    pub elapsed: std::time::Duration,
}

/// The most damage a [`Verification`] lists; [`Verification::damage_count`] counts it all.
const DAMAGE_LISTED_MAX: usize = 1024;

/// One thing [`ReadOnlyStore::verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// Where: the table and, when known, the `scope/key` (escaped).
    pub location: String,
    /// What failed.
    pub reason: String,
}

/// What [`ReadOnlyStore::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Verification {
    /// Records checked (every stored record, expired ones included).
    pub records: u64,
    /// Entries of the expiry index checked.
    pub expiry_entries: u64,
    /// Expiry-index entries whose record is gone or has another expiry: harmless by design
    /// (the sweep drops them), so not damage.
    pub stale_expiry_entries: u64,
    /// The damage found, at most the first 1024.
    pub damage: Vec<Damage>,
    /// How much damage was found in all.
    pub damage_count: u64,
}

impl Verification {
    /// Whether nothing is damaged.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.damage_count == 0
    }

    fn found(&mut self, location: impl Into<String>, reason: impl Into<String>) {
        self.damage_count += 1;
        if self.damage.len() < DAMAGE_LISTED_MAX {
            self.damage.push(Damage {
                location: location.into(),
                reason: reason.into(),
            });
        }
    }
}

impl ReadOnlyStore {
    /// Checks every record envelope (magic, version, CRC-32 over key and payload, exact
    /// length) and the invariants between the tables: each record has its expiry-index entry,
    /// each scope's count equals its records, and every in-flight record carries a fencing
    /// token below the next one and an epoch no later than the last open's. Every page
    /// checksum was verified when the store was opened. This reads every table in full.
    ///
    /// ```
    /// use idemstore::{ClaimOptions, ReadOnlyStore, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("idem.redb");
    /// let store = Store::open(&path)?;
    /// store.claim("s", "k", b"fp", &ClaimOptions::default())?;
    /// store.close()?;
    ///
    /// let verification = ReadOnlyStore::open(&path)?.verify()?;
    /// assert!(verification.is_clean());
    /// assert_eq!(verification.records, 1);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// Storage errors while reading (damage is reported in the [`Verification`], not as an
    /// error).
    pub fn verify(&self) -> Result<Verification> {
        let read = self.read()?;
        let records = read.open_table(RECORDS).map_err(Error::storage)?;
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        let scopes = read.open_table(SCOPES).map_err(Error::storage)?;
        let mut out = Verification::default();
        let mut per_scope: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for entry in records.iter().map_err(Error::storage)? {
            let (k, v) = entry.map_err(Error::storage)?;
            let sk = k.value();
            out.records += 1;
            let location = format!("records/{}", display_key(sk));
            let Some((scope, _)) = split_scoped_key(sk) else {
                out.found(location, "the storage key is malformed");
                continue;
            };
            *per_scope.entry(scope.to_vec()).or_default() += 1;
            let record = match codec::decode(sk, v.value()) {
                Ok(record) => record,
                Err(e) => {
                    out.found(location, e.to_string());
                    continue;
                }
            };
            if expiry
                .get((record.expires_at_ms, sk))
                .map_err(Error::storage)?
                .is_none()
            {
                out.found(
                    &location,
                    format!(
                        "no expiry-index entry for its expiry {} ms: no sweep would remove it",
                        record.expires_at_ms
                    ),
                );
            }
            if let RecordState::InFlight { token, epoch, .. } = record.state {
                if token >= self.next_token() {
                    out.found(
                        &location,
                        format!(
                            "fencing token {token} not below the next token {}",
                            self.next_token()
                        ),
                    );
                }
                if epoch > self.epoch() {
                    out.found(
                        &location,
                        format!("epoch {epoch} later than the last open's {}", self.epoch()),
                    );
                }
            }
        }
        for entry in expiry.iter().map_err(Error::storage)? {
            let (k, _) = entry.map_err(Error::storage)?;
            let (at_ms, sk) = k.value();
            out.expiry_entries += 1;
            let current = match records.get(sk).map_err(Error::storage)? {
                Some(v) => codec::decode(sk, v.value()).map(|r| r.expires_at_ms == at_ms),
                None => Ok(false),
            };
            // A damaged record's own entry cannot be told from a stale one; it is reported above.
            if current == Ok(false) {
                out.stale_expiry_entries += 1;
            }
        }
        let mut counted: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for entry in scopes.iter().map_err(Error::storage)? {
            let (k, v) = entry.map_err(Error::storage)?;
            counted.insert(k.value().to_vec(), v.value());
        }
        let names: std::collections::BTreeSet<&Vec<u8>> =
            per_scope.keys().chain(counted.keys()).collect();
        for scope in names {
            let stored = per_scope.get(scope).copied().unwrap_or(0);
            let count = counted.get(scope).copied().unwrap_or(0);
            if stored != count {
                out.found(
                    format!("scopes/{}", scope.escape_ascii()),
                    format!("counts {count} records, the scope holds {stored}"),
                );
            }
        }
        if out.expiry_entries != expiry.len().map_err(Error::storage)? {
            out.found("expiry", "its length disagrees with its entries");
        }
        Ok(out)
    }
}
