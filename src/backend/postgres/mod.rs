//! The PostgreSQL backend (feature `postgres`): one store shared by every instance of a service,
//! on tokio-postgres with a deadpool connection pool.
//!
//! ```no_run
//! use idemstore::postgres::PostgresBackend;
//! use idemstore::{Claim, ClaimOptions, IdempotencyBackend};
//! use std::time::Duration;
//!
//! # async fn run() -> idemstore::Result<()> {
//! let backend = PostgresBackend::builder("postgres://app@db.internal/app")?
//!     .instance_name("payments-7f9c") // a restart under this name takes over at once
//!     .connect()
//!     .await?;
//! let options = ClaimOptions::default().lease(Duration::from_secs(30));
//! if let Claim::Acquired(lease) = backend.claim(b"acct_42", b"order-1", b"fp", &options).await? {
//!     backend.complete(&lease, b"201", Duration::from_secs(86_400)).await?;
//! }
//! backend.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## How it keeps the engine's semantics on a shared server
//!
//! - **Schema**: created and versioned by the backend on first connect (in one transaction,
//!   under an advisory lock), as written in [`SCHEMA_SQL`] (`src/backend/postgres/schema.sql`);
//!   a database at a newer version is refused with [`Error::UnsupportedFormat`].
//! - **Claim in one statement**: the statement decides from the committed row; replays,
//!   in-progress and mismatch answers write and lock nothing. Only an acquisition runs
//!   `INSERT … ON CONFLICT DO UPDATE … WHERE <acquirable>`, which re-checks the decision on the
//!   locked row and draws the fencing token from a sequence under that lock. If the re-check
//!   fails (a concurrent claim won), the statement is run again and answers from the new state.
//! - **Fenced lease writes**: `complete`, `fail`, `extend` and `checkpoint` are
//!   `UPDATE … WHERE token = $t AND state = in-flight AND not expired`; zero rows is
//!   [`Error::LeaseLost`].
//! - **Tokens**: a sequence value shifted left 16 bits, with a random 16-bit nonce in the low
//!   bits, so that a token stays unique even if a failover re-issues sequence values. Tokens
//!   increase per key; they do not increase strictly across the whole store in grant order.
//! - **Owners instead of process epochs**: each backend registers an owner row and beats a
//!   heartbeat ([`PostgresBuilder::heartbeat_interval`]). An in-flight record's owner is gone
//!   when its lease ended, when the owner was closed ([`PostgresBackend::close`], or a new
//!   instance registered under the same [`PostgresBuilder::instance_name`]), or when its
//!   heartbeat is older than [`PostgresBuilder::owner_timeout`]. Such records are taken over at
//!   once and listed by `orphans`.
//! - **Time** comes from the database server's clock (ms), never from the instances'.
//! - **Sweeps** delete a bounded batch of the oldest expired records found through the expiry
//!   index (`FOR UPDATE SKIP LOCKED`), at a cost proportional to the batch.
//! - **Waits** ([`ClaimOptions::wait`]) poll with backoff bounded by the original's remaining
//!   lease; nothing wakes them.
//! - **Errors**: a lost connection before the statement was sent, a pool timeout, or a
//!   statement the server aborted (serialization failure, deadlock, shutdown) is
//!   [`Error::Unavailable`] (nothing happened); a connection lost or a call timed out
//!   ([`PostgresBuilder::call_timeout`]) after a write was sent is [`Error::OutcomeUnknown`].
//!   Both are retryable and never fatal. A retried claim answers from whatever the first attempt
//!   left: at worst an in-progress answer until the first attempt's lease ends.
//! - **Durability**: an acknowledged write is as durable as the server's commit:
//!   `synchronous_commit = on` (PostgreSQL's default) makes it survive a server crash; with
//!   asynchronous replication a failover can still lose it.
//! - **Quota**: the per-scope quota counts the scope's rows (an index range) when a claim would
//!   create a row; concurrent claims of new keys in one scope can overshoot it
//!   ([`Capabilities::exact_quota`] is `false`).
//! - **No TLS**: connections are plain TCP (or a Unix socket: `host=/var/run/postgresql`).
//!   `sslmode=prefer`, libpq's default, connects without TLS; a URL that asks for TLS
//!   (`sslmode=require`) is refused by [`PostgresBackend::builder`] with [`Error::Backend`],
//!   a configuration error, not an outage to retry. Reach a server that demands TLS through a
//!   private network or a local TLS proxy.

mod sql;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::backend::{Capabilities, IdempotencyBackend};
use crate::clock::duration_ms;
use crate::core::admin::{Orphan, Swept};
use crate::core::claim::{Claim, ClaimOptions, Lease, Replay};
use crate::core::record::{Record, RecordState};
use crate::error::{Error, Result};
use crate::limits::Limits;
use sql::Sql;

/// The schema the backend creates, with `{schema}` standing for the configured schema name.
pub const SCHEMA_SQL: &str = include_str!("schema.sql");

/// The schema version this build creates and uses.
pub const SCHEMA_VERSION: u64 = 1;

/// A key for `pg_advisory_xact_lock` that serialises schema creation between instances
/// ("idemstor" in ASCII).
const SCHEMA_LOCK: i64 = 0x6964_656d_7374_6f72;

/// How often a claim statement is re-run after losing a race before giving up.
const CLAIM_RACES_MAX: usize = 32;

/// Settings of a [`PostgresBackend`]; from [`PostgresBackend::builder`].
#[derive(Clone)]
pub struct PostgresBuilder {
    config: tokio_postgres::Config,
    schema: String,
    limits: Limits,
    instance: Option<String>,
    pool_size: usize,
    call_timeout: Duration,
    heartbeat: Duration,
    owner_timeout: Duration,
    create_schema: bool,
}

impl fmt::Debug for PostgresBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection settings may hold a password: leave them out.
        f.debug_struct("PostgresBuilder")
            .field("schema", &self.schema)
            .field("instance", &self.instance)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl PostgresBuilder {
    /// The PostgreSQL schema (namespace) holding the backend's tables; created if missing.
    /// Default `public`. Several stores can share a database under different schemas.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The limits every call is checked against before anything is sent.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A stable name for this instance (a host name, a pod name). Connecting under a name
    /// closes the earlier owners of that name, so the in-flight records a crashed instance left
    /// are taken over at once when it restarts. Default: a name unique to this process and
    /// moment, which closes nothing.
    #[must_use]
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// The most connections the pool opens. Default 16.
    #[must_use]
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections.max(1);
        self
    }

    /// How long one call may take (waiting for a connection included) before it fails:
    /// [`Error::Unavailable`] if no statement was sent yet, [`Error::OutcomeUnknown`] if a
    /// write was. Default 10 s.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How often the owner's heartbeat is written. Default 5 s.
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.max(Duration::from_millis(10));
        self
    }

    /// How long an owner may miss heartbeats before its in-flight records count as orphans
    /// (taken over at once, listed by `orphans`). Keep it several heartbeat intervals long.
    /// Default 60 s.
    #[must_use]
    pub fn owner_timeout(mut self, timeout: Duration) -> Self {
        self.owner_timeout = timeout;
        self
    }

    /// Whether `connect` creates the schema when it is missing (default `true`). When
    /// `false`, the tables must exist at [`SCHEMA_VERSION`] (created from [`SCHEMA_SQL`]).
    #[must_use]
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// Connects: checks the limits, builds the pool, creates or checks the schema, registers
    /// this instance's owner and starts its heartbeat (a task on the current tokio runtime).
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] for limits outside their caps;
    /// [`Error::Unavailable`] when the server cannot be reached; [`Error::UnsupportedFormat`]
    /// for a schema of a newer version; [`Error::Backend`] for other server errors.
    pub async fn connect(self) -> Result<PostgresBackend> {
        self.limits.validate()?;
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.call_timeout))
            .create_timeout(Some(self.call_timeout))
            .recycle_timeout(Some(self.call_timeout))
            .build()
            .map_err(|e| backend_error(e.to_string()))?;
        let schema = quote_ident(&self.schema);
        let sql = Arc::new(Sql::new(&schema));
        let inner = Arc::new(Inner {
            pool,
            sql,
            call_timeout: self.call_timeout,
            owner_timeout_ms: to_i64(duration_ms(self.owner_timeout)),
        });
        if self.create_schema {
            inner.create_schema(&schema).await?;
        }
        inner.check_version(&schema).await?;
        let name = self.instance.unwrap_or_else(unique_instance_name);
        let rows = inner
            .query(&inner.sql.register_owner, &[&name], true)
            .await?;
        let owner: i64 = match rows.first() {
            Some(row) => row.try_get(0).map_err(|e| statement_error(&e, false))?,
            None => {
                return Err(Error::Internal(
                    "registering the owner returned no id".into(),
                ));
            }
        };
        let heartbeat = tokio::spawn(heartbeat(Arc::clone(&inner), owner, self.heartbeat));
        Ok(PostgresBackend {
            inner,
            limits: self.limits,
            owner,
            heartbeat,
        })
    }
}

/// The shared store on PostgreSQL: an [`IdempotencyBackend`] for services on several machines.
/// See the [module docs](self) for what it guarantees and how.
pub struct PostgresBackend {
    inner: Arc<Inner>,
    limits: Limits,
    owner: i64,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: Pool,
    sql: Arc<Sql>,
    call_timeout: Duration,
    owner_timeout_ms: i64,
}

impl PostgresBackend {
    /// A builder for the server at `url` (`postgres://user:password@host:port/dbname?…`, or a
    /// key=value string), with the defaults.
    ///
    /// # Errors
    /// [`Error::Backend`] for a URL tokio-postgres cannot parse, or one that asks for TLS
    /// (`sslmode=require`): this backend connects without it (module docs, "No TLS").
    pub fn builder(url: &str) -> Result<PostgresBuilder> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| backend_source(e))?;
        if !matches!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
        ) {
            return Err(Error::Backend {
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the URL asks for TLS (sslmode=require), which the PostgreSQL backend does \
                     not support: it connects over plain TCP or a Unix socket",
                )),
            });
        }
        Ok(PostgresBuilder {
            config,
            schema: "public".into(),
            limits: Limits::default(),
            instance: None,
            pool_size: 16,
            call_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            owner_timeout: Duration::from_secs(60),
            create_schema: true,
        })
    }

    /// Connects to `url` with the default settings.
    ///
    /// # Errors
    /// As [`PostgresBuilder::connect`].
    pub async fn connect(url: &str) -> Result<PostgresBackend> {
        Self::builder(url)?.connect().await
    }

    /// The id of this instance's owner row: the `epoch` field of the in-flight records it
    /// claims ([`RecordState::InFlight`]).
    #[must_use]
    pub fn owner_id(&self) -> u64 {
        to_u64(self.owner)
    }

    /// Closes this instance's owner (its in-flight records can be taken over at once by other
    /// instances), stops the heartbeat and the pool. Dropping the backend without `close`
    /// stops the heartbeat; its records then wait for their leases or the owner timeout.
    ///
    /// # Errors
    /// [`Error::Unavailable`]/[`Error::OutcomeUnknown`] if the owner could not be closed.
    pub async fn close(self) -> Result<()> {
        self.heartbeat.abort();
        let owner = self.owner;
        let result = self
            .inner
            .query(&self.inner.sql.close_owner, &[&owner], true)
            .await;
        self.inner.pool.close();
        result.map(|_| ())
    }

    async fn claim_once(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let lease_ms = to_i64(duration_ms(options.lease_duration()));
        let retention_ms = to_i64(duration_ms(options.retention_duration()));
        let quota = self.limits.records_per_scope().map(to_i64);
        let owner = self.owner;
        let owner_timeout = self.inner.owner_timeout_ms;
        for _ in 0..CLAIM_RACES_MAX {
            let params: [&(dyn ToSql + Sync); 8] = [
                &scope,
                &key,
                &fingerprint,
                &lease_ms,
                &retention_ms,
                &owner,
                &quota,
                &owner_timeout,
            ];
            let rows = self
                .inner
                .query(&self.inner.sql.claim, &params, true)
                .await?;
            let Some(row) = rows.first() else {
                return Err(Error::Internal(
                    "the claim statement returned no row".into(),
                ));
            };
            if let Some(claim) = claim_answer(scope, key, row, self.limits.records_per_scope())? {
                return Ok(claim);
            }
        }
        Err(Error::Internal(format!(
            "a claim lost {CLAIM_RACES_MAX} races in a row to concurrent claims of one key"
        )))
    }

    /// Runs a fenced lease write: the statement `pick(sql)` with the lease's scope, key and
    /// token, then `extra` parameters. `None` when it changed nothing (the lease is lost).
    async fn fenced(
        &self,
        lease: &Lease,
        pick: fn(&Sql) -> &str,
        extra: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let scope = lease.scope();
        let key = lease.key();
        let token = to_i64(lease.token());
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&scope, &key, &token];
        params.extend_from_slice(extra);
        let rows = self
            .inner
            .query(pick(&self.inner.sql), &params, true)
            .await?;
        Ok(rows.into_iter().next())
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Beats the owner's heartbeat every `interval` until aborted. A failed beat is retried at
/// the next interval; the owner times out only if beats fail for the whole owner timeout.
async fn heartbeat(inner: Arc<Inner>, owner: i64, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let beat = inner.query(&inner.sql.heartbeat, &[&owner], true).await;
        if let Err(e) = beat {
            tracing::warn!(error = %e, owner, "idemstore: PostgreSQL owner heartbeat failed");
        }
    }
}

impl Inner {
    /// Runs one statement on a pooled connection (prepared once per connection) and returns
    /// its rows. `writes` says whether the statement may change state: if it does and the
    /// connection is lost or the call times out after it was sent, the answer is
    /// [`Error::OutcomeUnknown`]; otherwise [`Error::Unavailable`].
    async fn query(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
        writes: bool,
    ) -> Result<Vec<Row>> {
        let sent = AtomicBool::new(false);
        let call = async {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let prepared = conn
                .prepare_cached(statement)
                .await
                .map_err(|e| statement_error(&e, false))?;
            sent.store(true, Ordering::Relaxed);
            conn.query(&prepared, params)
                .await
                .map_err(|e| statement_error(&e, writes))
        };
        let answer = tokio::time::timeout(self.call_timeout, call).await;
        match answer {
            Ok(result) => result,
            Err(_) => {
                let message = format!("no answer within {:?}", self.call_timeout);
                if writes && sent.load(Ordering::Relaxed) {
                    Err(outcome_unknown(message))
                } else {
                    Err(unavailable(message))
                }
            }
        }
    }

    /// Creates the schema if it is missing, under an advisory lock so that instances
    /// starting together do not race.
    async fn create_schema(&self, schema: &str) -> Result<()> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| statement_error(&e, false))?;
        let setup = async {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.idemstore_meta (
                     name text PRIMARY KEY, value bigint NOT NULL)"
            ))
            .await?;
            let version = tx
                .query_opt(
                    &format!(
                        "SELECT value FROM {schema}.idemstore_meta WHERE name = 'schema_version'"
                    ),
                    &[],
                )
                .await?;
            if version.is_none() {
                tx.batch_execute(&SCHEMA_SQL.replace("{schema}", schema))
                    .await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        let result = tokio::time::timeout(self.call_timeout, setup).await;
        match result {
            Ok(Ok(())) => tx.commit().await.map_err(|e| statement_error(&e, true)),
            Ok(Err(e)) => Err(statement_error(&e, false)),
            Err(_) => Err(unavailable("schema setup did not finish in time")),
        }
    }

    /// Refuses a schema of another version.
    async fn check_version(&self, schema: &str) -> Result<()> {
        let rows = self
            .query(
                &format!("SELECT value FROM {schema}.idemstore_meta WHERE name = 'schema_version'"),
                &[],
                false,
            )
            .await?;
        let found = match rows.first() {
            Some(row) => to_u64(
                row.try_get::<_, i64>(0)
                    .map_err(|e| statement_error(&e, false))?,
            ),
            None => 0,
        };
        if found == SCHEMA_VERSION {
            Ok(())
        } else {
            Err(Error::UnsupportedFormat {
                found,
                supported: SCHEMA_VERSION,
            })
        }
    }
}

// ----- answers -----

/// Reads the claim statement's row; `None` when the claim lost a race and must run again.
fn claim_answer(scope: &[u8], key: &[u8], row: &Row, quota: Option<u64>) -> Result<Option<Claim>> {
    let get_err = |e: tokio_postgres::Error| statement_error(&e, false);
    let verdict: &str = row.try_get(0).map_err(get_err)?;
    let now_ms: i64 = row.try_get(10).map_err(get_err)?;
    match verdict {
        "acquire" => {
            let Some(token) = row.try_get::<_, Option<i64>>(1).map_err(get_err)? else {
                return Ok(None);
            };
            let lease_until: i64 = row.try_get(2).map_err(get_err)?;
            let attempt: i32 = row.try_get(3).map_err(get_err)?;
            let takeover: bool = row.try_get(4).map_err(get_err)?;
            let checkpoint: Option<Vec<u8>> = row.try_get(5).map_err(get_err)?;
            let lease = Lease::from_parts(
                scope,
                key,
                to_u64(token),
                to_u64(lease_until),
                u32::try_from(attempt).unwrap_or(0),
                checkpoint,
                takeover,
            )?;
            Ok(Some(Claim::Acquired(lease)))
        }
        "replay" => {
            let outcome: Option<Vec<u8>> = row.try_get(6).map_err(get_err)?;
            let completed_at: i64 = row.try_get(7).map_err(get_err)?;
            let attempt: i32 = row.try_get(8).map_err(get_err)?;
            Ok(Some(Claim::Replay(Replay {
                outcome: outcome.unwrap_or_default(),
                completed_at_ms: to_u64(completed_at),
                attempt: u32::try_from(attempt).unwrap_or(0),
            })))
        }
        "in_progress" => {
            let until: i64 = row.try_get(9).map_err(get_err)?;
            let left = to_u64(until.saturating_sub(now_ms)).max(1);
            Ok(Some(Claim::InProgress {
                retry_after: Duration::from_millis(left),
            }))
        }
        "mismatch" => Ok(Some(Claim::Mismatch)),
        "quota" => Err(Error::QuotaExceeded {
            limit: quota.unwrap_or(0),
        }),
        other => Err(Error::Internal(format!(
            "the claim statement answered {other:?}"
        ))),
    }
}

/// A record row (the columns of [`sql::RECORD_COLUMNS`]) as `(scope, key, record)`.
fn row_to_record(row: &Row) -> Result<(Vec<u8>, Vec<u8>, Record)> {
    let get_err = |e: tokio_postgres::Error| statement_error(&e, false);
    let scope: Vec<u8> = row.try_get(0).map_err(get_err)?;
    let key: Vec<u8> = row.try_get(1).map_err(get_err)?;
    let fingerprint: Vec<u8> = row.try_get(2).map_err(get_err)?;
    let state: i16 = row.try_get(3).map_err(get_err)?;
    let token: i64 = row.try_get(4).map_err(get_err)?;
    let owner: i64 = row.try_get(5).map_err(get_err)?;
    let lease_until: i64 = row.try_get(6).map_err(get_err)?;
    let attempt: i32 = row.try_get(7).map_err(get_err)?;
    let checkpoint: Option<Vec<u8>> = row.try_get(8).map_err(get_err)?;
    let outcome: Option<Vec<u8>> = row.try_get(9).map_err(get_err)?;
    let created: i64 = row.try_get(10).map_err(get_err)?;
    let updated: i64 = row.try_get(11).map_err(get_err)?;
    let expires: i64 = row.try_get(12).map_err(get_err)?;
    let state = match state {
        0 => RecordState::InFlight {
            token: to_u64(token),
            epoch: to_u64(owner),
            lease_until_ms: to_u64(lease_until),
            checkpoint,
        },
        1 => RecordState::Completed {
            outcome: outcome.unwrap_or_default(),
        },
        2 => RecordState::Failed { checkpoint },
        other => {
            return Err(Error::corrupt(
                format!(
                    "idemstore_records/{}/{}",
                    scope.escape_ascii(),
                    key.escape_ascii()
                ),
                format!("unknown state {other}"),
            ));
        }
    };
    let record = Record {
        fingerprint,
        created_at_ms: to_u64(created),
        updated_at_ms: to_u64(updated),
        expires_at_ms: to_u64(expires),
        attempt: u32::try_from(attempt).unwrap_or(0),
        state,
    };
    Ok((scope, key, record))
}

// ----- the trait -----

impl IdempotencyBackend for PostgresBackend {
    async fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        self.limits.check_claim(scope, key, fingerprint, options)?;
        crate::backend::poll::claim_with_wait(options, || {
            self.claim_once(scope, key, fingerprint, options)
        })
        .await
    }

    async fn complete(&self, lease: &Lease, outcome: &[u8], retention: Duration) -> Result<()> {
        self.limits.check_complete(outcome, retention)?;
        let retention_ms = to_i64(duration_ms(retention));
        let row = self
            .fenced(lease, |s| &s.complete, &[&outcome, &retention_ms])
            .await?;
        lost_if_none(row, lease).map(|_| ())
    }

    async fn fail(&self, lease: &Lease) -> Result<()> {
        let row = self.fenced(lease, |s| &s.fail, &[]).await?;
        lost_if_none(row, lease).map(|_| ())
    }

    async fn extend(&self, lease: &mut Lease, by: Duration) -> Result<()> {
        self.limits.check_extend(by)?;
        let by_ms = to_i64(duration_ms(by));
        let row = self.fenced(lease, |s| &s.extend, &[&by_ms]).await?;
        let row = lost_if_none(row, lease)?;
        let until: i64 = row.try_get(0).map_err(|e| statement_error(&e, false))?;
        lease.lease_until_ms = to_u64(until);
        Ok(())
    }

    async fn checkpoint(&self, lease: &Lease, checkpoint: &[u8]) -> Result<()> {
        self.limits.check_checkpoint(checkpoint)?;
        let row = self
            .fenced(lease, |s| &s.checkpoint, &[&checkpoint])
            .await?;
        lost_if_none(row, lease).map(|_| ())
    }

    async fn get(&self, scope: &[u8], key: &[u8]) -> Result<Option<Record>> {
        self.limits.check_identity(scope, key)?;
        let rows = self
            .inner
            .query(&self.inner.sql.get, &[&scope, &key], false)
            .await?;
        match rows.first() {
            Some(row) => Ok(Some(row_to_record(row)?.2)),
            None => Ok(None),
        }
    }

    async fn forget(&self, scope: &[u8], key: &[u8]) -> Result<bool> {
        self.limits.check_identity(scope, key)?;
        let rows = self
            .inner
            .query(&self.inner.sql.forget, &[&scope, &key], true)
            .await?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(|e| statement_error(&e, false)),
            None => Ok(false),
        }
    }

    async fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        let limit = to_i64(limit as u64);
        let timeout = self.inner.owner_timeout_ms;
        let rows = self
            .inner
            .query(&self.inner.sql.orphans, &[&limit, &timeout], false)
            .await?;
        rows.iter()
            .map(|row| {
                let (scope, key, record) = row_to_record(row)?;
                Ok(Orphan { scope, key, record })
            })
            .collect()
    }

    async fn sweep(&self, limit: usize) -> Result<Swept> {
        let timeout = self.inner.owner_timeout_ms;
        self.inner
            .query(&self.inner.sql.close_stale_owners, &[&timeout], true)
            .await?;
        let limit_i = to_i64(limit.min(crate::BATCH_OPS_MAX) as u64);
        let rows = self
            .inner
            .query(&self.inner.sql.sweep, &[&limit_i], true)
            .await?;
        let get_err = |e: tokio_postgres::Error| statement_error(&e, false);
        let (visited, removed) = match rows.first() {
            Some(row) => (
                row.try_get::<_, i64>(0).map_err(get_err)?,
                row.try_get::<_, i64>(1).map_err(get_err)?,
            ),
            None => (0, 0),
        };
        let more_rows = self
            .inner
            .query(&self.inner.sql.sweep_more, &[], false)
            .await?;
        let more = match more_rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(get_err)?,
            None => false,
        };
        Ok(Swept {
            visited: usize::try_from(visited).unwrap_or(0),
            removed: usize::try_from(removed).unwrap_or(0),
            more,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "postgres",
            shared: true,
            durable: true,
            needs_sweep: true,
            orphans_scan: false,
            wakes_waiters: false,
            exact_quota: false,
        }
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// The row of a fenced write, or [`Error::LeaseLost`] if it changed nothing.
fn lost_if_none(row: Option<Row>, lease: &Lease) -> Result<Row> {
    row.ok_or(Error::LeaseLost {
        token: lease.token(),
    })
}

// ----- errors -----

/// A message as an error source.
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

fn unavailable(message: impl Into<String>) -> Error {
    Error::Unavailable {
        source: Arc::new(Message(message.into())),
    }
}

fn outcome_unknown(message: impl Into<String>) -> Error {
    Error::OutcomeUnknown {
        source: Arc::new(Message(message.into())),
    }
}

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        source: Arc::new(Message(message.into())),
    }
}

fn backend_source(e: tokio_postgres::Error) -> Error {
    Error::Backend {
        source: Arc::new(e),
    }
}

/// A connection could not be had from the pool: nothing was sent.
fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => Error::Unavailable {
            source: Arc::new(e),
        },
        other => unavailable(format!("no database connection: {other}")),
    }
}

/// Classifies a failed statement. An error the server reported means the statement did not
/// take effect (it runs in its own transaction): retryable ones (serialization failure,
/// deadlock, shutdown, connection errors, a standby after failover) are
/// [`Error::Unavailable`], the rest [`Error::Backend`]. A connection lost without an answer is
/// [`Error::OutcomeUnknown`] when `may_have_written`, else [`Error::Unavailable`].
fn statement_error(e: &tokio_postgres::Error, may_have_written: bool) -> Error {
    let source: crate::error::Source = Arc::new(Message(e.to_string()));
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let retryable = [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::LOCK_NOT_AVAILABLE,
        ]
        .contains(code)
            || code.code().starts_with("08");
        return if retryable {
            Error::Unavailable { source }
        } else {
            Error::Backend { source }
        };
    }
    let lost =
        e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if !lost {
        return Error::Backend { source };
    }
    if may_have_written {
        Error::OutcomeUnknown { source }
    } else {
        Error::Unavailable { source }
    }
}

// ----- small conversions -----

/// Quotes a PostgreSQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A u64 as PostgreSQL's bigint, saturating (limits keep real values far below).
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint as u64 (negative values, which the backend never writes, read as 0).
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A name unique to this process and moment, for an instance that was given none.
fn unique_instance_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("pid-{}-{nanos}", std::process::id())
}
