//! The ledger: every charge executed, persisted beside the idempotency store (the downstream
//! system of record the handler reconciles against), and its audit.
//!
//! Two kinds: a redb file beside the embedded store ([`FileLedger`], the default), and, for
//! service processes that share a PostgreSQL or Redis store, tables in a PostgreSQL database
//! that every process writes and reads ([`postgres::PgLedger`]): a retry that lands on another
//! process must find the charge the first process executed, and the audit must count the
//! executions of every process.

#[cfg(feature = "postgres")]
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{Value, json};

use crate::BoxError;

/// Charge id -> ledger row (JSON).
const CHARGES: TableDefinition<&str, &[u8]> = TableDefinition::new("charges");
/// (account, sequence) -> charge id: listing, newest first.
const BY_ACCOUNT: TableDefinition<(&str, u64), &str> = TableDefinition::new("by_account");
/// (account, idempotency key) -> charge id: reconciliation.
const BY_KEY: TableDefinition<(&str, &str), &str> = TableDefinition::new("by_key");
/// Counters: "seq", "reconciled".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The ledger of the service: where its charges are recorded and looked up.
pub enum Ledger {
    /// A redb file of one process.
    File(FileLedger),
    /// Tables in a PostgreSQL database, shared by every process.
    #[cfg(feature = "postgres")]
    Postgres(postgres::PgLedger),
}

impl Ledger {
    /// Records an executed charge; returns once it is durable. Blocking; it must not be
    /// cancelled halfway (run it in `block_in_place`), so that a charge is either recorded or
    /// not started when the request ends.
    pub fn insert(
        &self,
        account: &str,
        key: Option<&str>,
        attempt: u32,
        charge: &Value,
    ) -> Result<(), BoxError> {
        match self {
            Ledger::File(ledger) => ledger.insert(account, key, attempt, charge),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(ledger) => ledger.insert(account, key, attempt, charge),
        }
    }

    /// The charge an earlier attempt of `(account, key)` executed, if any (counted). Blocking.
    pub fn reconcile(&self, account: &str, key: &str) -> Result<Option<Value>, BoxError> {
        match self {
            Ledger::File(ledger) => ledger.reconcile(account, key),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(ledger) => ledger.reconcile(account, key),
        }
    }

    /// The charge `id`, if the ledger has it. Blocking.
    pub fn get(&self, id: &str) -> Result<Option<Row>, BoxError> {
        match self {
            Ledger::File(ledger) => ledger.get(id),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(ledger) => ledger.get(id),
        }
    }

    /// Up to `limit` charges of `account`, newest first, after `starting_after`. Blocking.
    pub fn list(
        &self,
        account: &str,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), BoxError> {
        match self {
            Ledger::File(ledger) => ledger.list(account, limit, starting_after),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(ledger) => ledger.list(account, limit, starting_after),
        }
    }

    /// Counts the charges and the duplicates among them. Blocking.
    pub fn audit(&self) -> Result<Audit, BoxError> {
        match self {
            Ledger::File(ledger) => ledger.audit(),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(ledger) => ledger.audit(),
        }
    }
}

/// The system of record of one process: one row per charge executed, with the account, the
/// idempotency key and the attempt that executed it, so that exactly-once can be audited
/// afterwards.
///
/// Writes go through one writer thread that commits everything queued while the previous
/// commit was syncing in one durable transaction (group commit, as the engine does): the
/// disk here manages a few hundred fsyncs a second, and one commit per charge would cap the
/// service at that.
pub struct FileLedger {
    db: Arc<Database>,
    writer: Sender<LedgerJob>,
}

/// A request to the writer thread.
enum LedgerJob {
    Insert {
        account: String,
        key: Option<String>,
        attempt: u32,
        charge: Value,
        done: SyncSender<Result<(), String>>,
    },
    Reconciled,
}

/// A charge as the ledger holds it.
pub struct Row {
    /// The account that was charged ([`crate::api::Principal::account`]).
    pub account: String,
    /// The charge object, as the API returned it.
    pub charge: Value,
}

/// What the audit of a ledger found.
#[derive(Default)]
pub struct Audit {
    /// Charges executed.
    pub charges: u64,
    /// Charges beyond the first for one logical payment (`metadata[order_id]`).
    pub duplicates: u64,
    /// Retries answered from the ledger instead of charging again.
    pub reconciled: u64,
    /// (account, order id) -> charge ids.
    pub by_order: HashMap<(String, String), Vec<String>>,
    /// Charges executed by each service process (a shared ledger records the process; a file
    /// ledger has one process and leaves this empty).
    pub by_process: BTreeMap<String, u64>,
}

impl Audit {
    /// Counts charge `id` of `account` for the order in `charge`'s `metadata[order_id]`, a
    /// duplicate if the order was charged before.
    pub fn count(&mut self, id: &str, account: &str, charge: &Value) {
        self.charges += 1;
        let order = charge["metadata"]["order_id"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        let ids = self
            .by_order
            .entry((account.to_owned(), order))
            .or_default();
        ids.push(id.to_owned());
        if ids.len() > 1 {
            self.duplicates += 1;
        }
    }
}

/// The most jobs one ledger commit carries.
const LEDGER_BATCH_MAX: usize = 512;

impl FileLedger {
    /// Opens (or creates) the ledger at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<FileLedger, BoxError> {
        FileLedger::open_with_cache(path, None)
    }

    /// [`FileLedger::open`] with a page cache of `cache_bytes` (`None`: redb's default).
    pub fn open_with_cache(
        path: &Path,
        cache_bytes: Option<usize>,
    ) -> Result<FileLedger, BoxError> {
        let db = match cache_bytes {
            Some(bytes) => Database::builder().set_cache_size(bytes).create(path)?,
            None => Database::create(path)?,
        };
        let db = Arc::new(db);
        let tx = db.begin_write()?;
        tx.open_table(CHARGES)?;
        tx.open_table(BY_ACCOUNT)?;
        tx.open_table(BY_KEY)?;
        tx.open_table(META)?;
        tx.commit()?;
        let (writer, jobs) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || ledger_writer(&writer_db, &jobs))?;
        Ok(FileLedger { db, writer })
    }

    /// Records an executed charge; returns once it is durable. Blocking.
    pub fn insert(
        &self,
        account: &str,
        key: Option<&str>,
        attempt: u32,
        charge: &Value,
    ) -> Result<(), BoxError> {
        let (done, ack) = mpsc::sync_channel(1);
        self.writer
            .send(LedgerJob::Insert {
                account: account.to_owned(),
                key: key.map(str::to_owned),
                attempt,
                charge: charge.clone(),
                done,
            })
            .map_err(|_| "the ledger writer stopped")?;
        ack.recv().map_err(|_| "the ledger writer stopped")??;
        Ok(())
    }

    /// The charge an earlier attempt of `(account, key)` executed, if any (counted).
    pub fn reconcile(&self, account: &str, key: &str) -> Result<Option<Value>, BoxError> {
        let id = {
            let read = self.db.begin_read()?;
            let by_key = read.open_table(BY_KEY)?;
            let Some(id) = by_key.get((account, key))? else {
                return Ok(None);
            };
            id.value().to_owned()
        };
        let _ = self.writer.send(LedgerJob::Reconciled);
        Ok(self.get(&id)?.map(|row| row.charge))
    }

    /// The charge `id`, if the ledger has it.
    pub fn get(&self, id: &str) -> Result<Option<Row>, BoxError> {
        let read = self.db.begin_read()?;
        let charges = read.open_table(CHARGES)?;
        let Some(bytes) = charges.get(id)? else {
            return Ok(None);
        };
        let mut row: Value = serde_json::from_slice(bytes.value())?;
        Ok(Some(Row {
            account: row["account"].as_str().unwrap_or_default().to_owned(),
            charge: row["charge"].take(),
        }))
    }

    /// Up to `limit` charges of `account`, newest first, after `starting_after`.
    pub fn list(
        &self,
        account: &str,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), BoxError> {
        let read = self.db.begin_read()?;
        let by_account = read.open_table(BY_ACCOUNT)?;
        let charges = read.open_table(CHARGES)?;
        let mut upper = u64::MAX;
        if let Some(after) = starting_after {
            let Some(bytes) = charges.get(after)? else {
                return Ok((Vec::new(), false));
            };
            let row: Value = serde_json::from_slice(bytes.value())?;
            if row["account"] != account {
                return Ok((Vec::new(), false));
            }
            upper = row["seq"].as_u64().unwrap_or(0);
        }
        let mut data = Vec::new();
        let mut has_more = false;
        for entry in by_account.range((account, 0)..(account, upper))?.rev() {
            let (_, id) = entry?;
            if data.len() == limit {
                has_more = true;
                break;
            }
            if let Some(bytes) = charges.get(id.value())? {
                let mut row: Value = serde_json::from_slice(bytes.value())?;
                data.push(row["charge"].take());
            }
        }
        Ok((data, has_more))
    }

    /// Counts the charges and the duplicates among them (one logical payment charged twice).
    pub fn audit(&self) -> Result<Audit, BoxError> {
        let read = self.db.begin_read()?;
        let mut audit = Audit {
            reconciled: read
                .open_table(META)?
                .get("reconciled")?
                .map_or(0, |v| v.value()),
            ..Audit::default()
        };
        for entry in read.open_table(CHARGES)?.iter()? {
            let (id, bytes) = entry?;
            let row: Value = serde_json::from_slice(bytes.value())?;
            let account = row["account"].as_str().unwrap_or_default();
            audit.count(id.value(), account, &row["charge"]);
        }
        Ok(audit)
    }
}

/// The ledger's writer thread: drains the queue, applies it in one transaction, commits once
/// (durably) and acknowledges every insert of the batch.
fn ledger_writer(db: &Database, jobs: &Receiver<LedgerJob>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < LEDGER_BATCH_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = commit_batch(db, &batch).map_err(|e| e.to_string());
        for job in batch {
            if let LedgerJob::Insert { done, .. } = job {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn commit_batch(db: &Database, batch: &[LedgerJob]) -> Result<(), BoxError> {
    let tx = db.begin_write()?;
    {
        let mut meta = tx.open_table(META)?;
        let mut charges = tx.open_table(CHARGES)?;
        let mut by_account = tx.open_table(BY_ACCOUNT)?;
        let mut by_key = tx.open_table(BY_KEY)?;
        let mut seq = meta.get("seq")?.map_or(0, |v| v.value());
        let mut reconciled = meta.get("reconciled")?.map_or(0, |v| v.value());
        for job in batch {
            match job {
                LedgerJob::Insert {
                    account,
                    key,
                    attempt,
                    charge,
                    ..
                } => {
                    let id = charge["id"].as_str().ok_or("a charge has an id")?;
                    seq += 1;
                    let row = json!({
                        "account": account,
                        "idempotency_key": key,
                        "attempt": attempt,
                        "seq": seq,
                        "charge": charge,
                    });
                    charges.insert(id, serde_json::to_vec(&row)?.as_slice())?;
                    by_account.insert((account.as_str(), seq), id)?;
                    if let Some(key) = key {
                        by_key.insert((account.as_str(), key.as_str()), id)?;
                    }
                }
                LedgerJob::Reconciled => reconciled += 1,
            }
        }
        meta.insert("seq", seq)?;
        meta.insert("reconciled", reconciled)?;
    }
    tx.commit()?;
    Ok(())
}
