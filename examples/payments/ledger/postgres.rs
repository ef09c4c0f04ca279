//! The shared ledger: the charges of every service process in one PostgreSQL database (by
//! default the one that holds the idempotency store), so that a retry that lands on another
//! process reconciles against the charge the first one executed, and the audit counts every
//! execution of every process.
//!
//! Two tables, created on first connect under an advisory lock (several processes start at
//! once):
//!
//! - `payments_charges`: one row per charge executed (append-only), with the account, the
//!   idempotency key, the attempt and the process that executed it. There is deliberately no
//!   unique constraint on `(account, idempotency_key)`: a real system of record would add one
//!   as a second line of defence, but then a duplicate would be refused here instead of
//!   recorded, and the audit could not see whether the idempotency store let one through;
//! - `payments_reconciled`: one row per retry answered from the ledger instead of charging.
//!
//! Every write is one autocommit statement, acknowledged once PostgreSQL has committed it
//! (`synchronous_commit = on`, its default). The methods block (on the runtime the ledger was
//! connected on), as [`FileLedger`](super::FileLedger)'s do: call them from `block_in_place`
//! or `spawn_blocking`, or from outside the runtime.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio_postgres::NoTls;

use super::{Audit, Row};
use crate::BoxError;

/// The schema, created in one transaction under an advisory lock (`pg_advisory_xact_lock`, its
/// key "payments" in ASCII), so that processes starting together do not race to create it.
const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(8097887115748996211);
CREATE TABLE IF NOT EXISTS payments_charges (
    seq             bigserial PRIMARY KEY,
    id              text      NOT NULL UNIQUE,
    account         text      NOT NULL,
    idempotency_key text,
    attempt         integer   NOT NULL,
    process         text      NOT NULL,
    charge          text      NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_charges_by_key
    ON payments_charges (account, idempotency_key);
CREATE INDEX IF NOT EXISTS payments_charges_by_account ON payments_charges (account, seq);
CREATE TABLE IF NOT EXISTS payments_reconciled (
    seq             bigserial PRIMARY KEY,
    account         text      NOT NULL,
    idempotency_key text      NOT NULL,
    process         text      NOT NULL
);
COMMIT;
";

const INSERT: &str = "INSERT INTO payments_charges \
     (id, account, idempotency_key, attempt, process, charge) VALUES ($1, $2, $3, $4, $5, $6)";
const BY_KEY: &str = "SELECT charge FROM payments_charges \
     WHERE account = $1 AND idempotency_key = $2 ORDER BY seq LIMIT 1";
const RECONCILED: &str =
    "INSERT INTO payments_reconciled (account, idempotency_key, process) VALUES ($1, $2, $3)";
const GET: &str = "SELECT account, charge, seq FROM payments_charges WHERE id = $1";
const LIST: &str = "SELECT charge FROM payments_charges \
     WHERE account = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";

/// Connections a process opens at most: charges commit concurrently, so PostgreSQL can flush
/// several in one WAL sync.
const POOL_SIZE: usize = 16;

/// The ledger in PostgreSQL. See the [module docs](self).
pub struct PgLedger {
    pool: Pool,
    /// The runtime the blocking methods run their statements on.
    handle: Handle,
    /// The service process recorded with each charge (its instance name).
    process: String,
}

impl PgLedger {
    /// Connects to the database at `url`, creates the tables if missing, and records charges as
    /// executed by `process`. Must run on a Tokio runtime, which then runs every statement.
    pub async fn connect(url: &str, process: &str) -> Result<PgLedger, BoxError> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(std::time::Duration::from_secs(10));
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .build()?;
        pool.get().await?.batch_execute(SCHEMA).await?;
        Ok(PgLedger {
            pool,
            handle: Handle::current(),
            process: process.to_owned(),
        })
    }

    /// Records an executed charge; returns once PostgreSQL committed it. Blocking.
    pub fn insert(
        &self,
        account: &str,
        key: Option<&str>,
        attempt: u32,
        charge: &Value,
    ) -> Result<(), BoxError> {
        let id = charge["id"].as_str().ok_or("a charge has an id")?;
        let text = serde_json::to_string(charge)?;
        let attempt = i32::try_from(attempt)?;
        self.handle.block_on(async {
            let client = self.pool.get().await?;
            let insert = client.prepare_cached(INSERT).await?;
            client
                .execute(
                    &insert,
                    &[&id, &account, &key, &attempt, &self.process, &text],
                )
                .await?;
            Ok(())
        })
    }

    /// The charge an earlier attempt of `(account, key)` executed, in any process, if any
    /// (counted). Blocking.
    pub fn reconcile(&self, account: &str, key: &str) -> Result<Option<Value>, BoxError> {
        self.handle.block_on(async {
            let client = self.pool.get().await?;
            let by_key = client.prepare_cached(BY_KEY).await?;
            let Some(row) = client.query_opt(&by_key, &[&account, &key]).await? else {
                return Ok(None);
            };
            let charge: String = row.try_get(0)?;
            let reconciled = client.prepare_cached(RECONCILED).await?;
            client
                .execute(&reconciled, &[&account, &key, &self.process])
                .await?;
            Ok(Some(serde_json::from_str(&charge)?))
        })
    }

    /// The charge `id` with its account and sequence number, if the ledger has it.
    async fn row(&self, id: &str) -> Result<Option<(Row, i64)>, BoxError> {
        let client = self.pool.get().await?;
        let get = client.prepare_cached(GET).await?;
        let Some(row) = client.query_opt(&get, &[&id]).await? else {
            return Ok(None);
        };
        let charge: String = row.try_get(1)?;
        Ok(Some((
            Row {
                account: row.try_get(0)?,
                charge: serde_json::from_str(&charge)?,
            },
            row.try_get(2)?,
        )))
    }

    /// The charge `id`, if the ledger has it. Blocking.
    pub fn get(&self, id: &str) -> Result<Option<Row>, BoxError> {
        self.handle
            .block_on(self.row(id))
            .map(|found| found.map(|(row, _)| row))
    }

    /// Up to `limit` charges of `account`, newest first, after `starting_after`. Blocking.
    pub fn list(
        &self,
        account: &str,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), BoxError> {
        self.handle.block_on(async {
            let mut upper = i64::MAX;
            if let Some(after) = starting_after {
                match self.row(after).await? {
                    Some((row, seq)) if row.account == account => upper = seq,
                    _ => return Ok((Vec::new(), false)),
                }
            }
            let client = self.pool.get().await?;
            let list = client.prepare_cached(LIST).await?;
            // One more than asked: whether there are more.
            let fetch = i64::try_from(limit)?.saturating_add(1);
            let rows = client.query(&list, &[&account, &upper, &fetch]).await?;
            let has_more = rows.len() > limit;
            let mut data = Vec::with_capacity(limit);
            for row in rows.iter().take(limit) {
                let charge: String = row.try_get(0)?;
                data.push(serde_json::from_str(&charge)?);
            }
            Ok((data, has_more))
        })
    }

    /// Counts the charges of every process and the duplicates among them (one logical payment
    /// charged twice, by one process or by two). Blocking.
    pub fn audit(&self) -> Result<Audit, BoxError> {
        self.handle.block_on(async {
            let client = self.pool.get().await?;
            let reconciled = client
                .query_one("SELECT count(*) FROM payments_reconciled", &[])
                .await?;
            let mut audit = Audit {
                reconciled: u64::try_from(reconciled.try_get::<_, i64>(0)?)?,
                ..Audit::default()
            };
            let rows = client
                .query(
                    "SELECT id, account, process, charge FROM payments_charges ORDER BY seq",
                    &[],
                )
                .await?;
            for row in rows {
                let (id, account, process): (String, String, String) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                let charge: Value = serde_json::from_str(&row.try_get::<_, String>(3)?)?;
                audit.count(&id, &account, &charge);
                *audit.by_process.entry(process).or_default() += 1;
            }
            Ok(audit)
        })
    }
}
