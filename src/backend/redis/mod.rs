//! The Redis/Valkey backend (feature `redis`): a shared store in the memory of a Redis (or
//! Valkey) server, on redis-rs with its async `ConnectionManager` (one multiplexed connection
//! that reconnects by itself).
//!
//! ```no_run
//! use idemstore::redis::RedisBackend;
//! use idemstore::{Claim, ClaimOptions, IdempotencyBackend};
//! use std::time::Duration;
//!
//! # async fn run() -> idemstore::Result<()> {
//! let backend = RedisBackend::builder("redis://cache.internal:6379/")?
//!     .prefix("payments")
//!     .instance_name("payments-7f9c")
//!     .connect()
//!     .await?;
//! let options = ClaimOptions::default();
//! if let Claim::Acquired(lease) = backend.claim(b"acct_42", b"order-1", b"fp", &options).await? {
//!     backend.complete(&lease, b"201", Duration::from_secs(86_400)).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## What Redis cannot promise
//!
//! Read this before choosing Redis for requests with real side effects:
//!
//! - **A failover loses acknowledged writes.** Replication is asynchronous: a completion (or a
//!   claim) acknowledged by the primary and not yet copied to a replica is gone when that
//!   replica is promoted, so a retry may run the request again. `WAIT` narrows the window; it
//!   does not close it. Even on one server, an acknowledged write survives a crash only with
//!   `appendonly yes` and `appendfsync always` (with `everysec`, up to about a second of
//!   acknowledged writes can vanish).
//! - **`maxmemory-policy noeviction` is required.** Under any eviction policy Redis may delete a
//!   record to make room, and the request would run again. With `noeviction` a full server
//!   refuses writes instead: claims then fail with [`Error::Backend`] (an `OOM` error), they
//!   never silently forget. [`RedisBuilder::connect`] reads the server's settings
//!   (`CONFIG GET`, where allowed) and warns through `tracing` about an eviction policy or
//!   `appendonly no`.
//! - **Memory holds the whole retention window**: every record (fingerprint, outcome,
//!   checkpoint) stays in RAM until it expires. Size the server for
//!   `requests per second × retention × record size`.
//!
//! ## How it keeps the engine's semantics
//!
//! - **Layout**: a hash per record, `{prefix}:{s<scope in hex>}:r:<key in hex>`; the scope's
//!   token counter (`…:tok`) and expiry index (`…:exp`, a sorted set, for the quota) share the
//!   record's hash tag, so every script touches one cluster slot.
//! - **Scripts**: one Lua script for the claim and one for the fenced lease writes, so each
//!   decision and its write are atomic on the server. Replays, in-progress and mismatch
//!   answers write nothing.
//! - **Expiry**: logical, checked inside every script against the server's clock (`TIME`); a
//!   record past its expiry is absent whether or not Redis has removed it. `PEXPIREAT` at the
//!   same instant only frees the memory, so [`sweep`](IdempotencyBackend::sweep) has nothing
//!   to do ([`Capabilities::needs_sweep`] is `false`).
//! - **Tokens**: the scope's counter times 2^16 plus a random 16-bit nonce, so a counter
//!   re-issued after a failover still yields distinct tokens. Tokens increase per key and are
//!   unique within a scope (the counter lives in the scope's slot), which is what fencing
//!   compares; two scopes may grant equal tokens.
//! - **Owners**: each backend registers an owner id with a key that its heartbeat keeps alive
//!   ([`RedisBuilder::owner_timeout`]). An instance connecting under the name of an earlier one
//!   deletes the earlier owner's key. A claim that finds an in-flight record whose owner key is
//!   gone takes it over at once (the owner check is a second command; the script re-checks the
//!   record before taking it).
//! - **Errors**: a refused connection is [`Error::Unavailable`]; a timeout or a connection
//!   dropped after a script was sent is [`Error::OutcomeUnknown`] (never a silent success);
//!   both are retryable and never fatal. Reads that fail are [`Error::Unavailable`].
//! - **Waits** poll with backoff bounded by the original's remaining lease.
//! - `orphans` scans the keyspace (`SCAN`), so it costs O(records): run it rarely.
//! - **No TLS**: connections are plain TCP (`redis://`, or `redis+unix://` for a socket); a
//!   `rediss://` URL is refused by [`RedisBackend::builder`] with [`Error::Backend`], a
//!   configuration error. Reach a server that demands TLS through a private network or a
//!   local TLS proxy.

mod scripts;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisError};

use crate::backend::{Capabilities, IdempotencyBackend};
use crate::clock::duration_ms;
use crate::core::admin::{Orphan, Swept};
use crate::core::claim::{Claim, ClaimOptions, Lease, Replay};
use crate::core::record::{Record, RecordState};
use crate::error::{Error, Result};
use crate::limits::Limits;
use scripts::Scripts;

/// Settings of a [`RedisBackend`]; from [`RedisBackend::builder`].
#[derive(Clone)]
pub struct RedisBuilder {
    client: redis::Client,
    prefix: String,
    limits: Limits,
    instance: Option<String>,
    call_timeout: Duration,
    heartbeat: Duration,
    owner_timeout: Duration,
}

impl fmt::Debug for RedisBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBuilder")
            .field("prefix", &self.prefix)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl RedisBuilder {
    /// The prefix of every key the backend writes (default `idem`). Several stores can share a
    /// server under different prefixes. Use letters, digits, `_` and `-` only (it appears in
    /// `SCAN` patterns).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The limits every call is checked against before anything is sent.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A stable name for this instance: connecting under it ends the earlier owner of that
    /// name, so its in-flight records are taken over at once. Default: unique per process.
    #[must_use]
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// How long one call may wait for its answer before it fails with
    /// [`Error::OutcomeUnknown`] (writes) or [`Error::Unavailable`] (reads). Default 5 s.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How often the owner's key is renewed. Default 5 s.
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.max(Duration::from_millis(10));
        self
    }

    /// How long the owner's key lives without a heartbeat; after that its in-flight records
    /// are taken over at once. Default 60 s.
    #[must_use]
    pub fn owner_timeout(mut self, timeout: Duration) -> Self {
        self.owner_timeout = timeout;
        self
    }

    /// Connects, registers this instance's owner and starts its heartbeat (a task on the
    /// current tokio runtime).
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] for limits outside their caps;
    /// [`Error::Unavailable`] when the server cannot be reached.
    pub async fn connect(self) -> Result<RedisBackend> {
        self.limits.validate()?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.call_timeout))
            .set_connection_timeout(Some(self.call_timeout))
            .set_number_of_retries(2);
        let conn = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| redis_error(e, false))?;
        let inner = Arc::new(Inner {
            conn,
            scripts: Scripts::new(),
            prefix: self.prefix,
            call_timeout: self.call_timeout,
            owner_timeout: self.owner_timeout,
        });
        inner.check_settings().await;
        let owner = inner.register_owner(self.instance.as_deref()).await?;
        let heartbeat = tokio::spawn(heartbeat(Arc::clone(&inner), owner, self.heartbeat));
        Ok(RedisBackend {
            inner,
            limits: self.limits,
            owner,
            heartbeat,
        })
    }
}

/// The shared store on Redis or Valkey: an [`IdempotencyBackend`] for services on several
/// machines that accept what Redis cannot promise (see the [module docs](self)).
pub struct RedisBackend {
    inner: Arc<Inner>,
    limits: Limits,
    owner: u64,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

struct Inner {
    conn: ConnectionManager,
    scripts: Scripts,
    prefix: String,
    call_timeout: Duration,
    owner_timeout: Duration,
}

impl RedisBackend {
    /// A builder for the server at `url` (`redis://[user:password@]host:port/db`), with the
    /// defaults.
    ///
    /// # Errors
    /// [`Error::Backend`] for a URL redis-rs cannot parse.
    pub fn builder(url: &str) -> Result<RedisBuilder> {
        if url.starts_with("rediss://") || url.starts_with("valkeys://") {
            return Err(Error::Backend {
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "rediss:// asks for TLS, which the Redis backend does not support: it \
                     connects over plain TCP (redis://) or a Unix socket (redis+unix://)",
                )),
            });
        }
        let client = redis::Client::open(url).map_err(|e| Error::Backend {
            source: Arc::new(e),
        })?;
        Ok(RedisBuilder {
            client,
            prefix: "idem".into(),
            limits: Limits::default(),
            instance: None,
            call_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(5),
            owner_timeout: Duration::from_secs(60),
        })
    }

    /// Connects to `url` with the default settings.
    ///
    /// # Errors
    /// As [`RedisBuilder::connect`].
    pub async fn connect(url: &str) -> Result<RedisBackend> {
        Self::builder(url)?.connect().await
    }

    /// This instance's owner id: the `epoch` field of the in-flight records it claims.
    #[must_use]
    pub fn owner_id(&self) -> u64 {
        self.owner
    }

    /// Ends this instance's owner (its in-flight records can be taken over at once) and stops
    /// the heartbeat.
    ///
    /// # Errors
    /// [`Error::Unavailable`]/[`Error::OutcomeUnknown`] if the owner key could not be deleted.
    pub async fn close(self) -> Result<()> {
        self.heartbeat.abort();
        let key = self.inner.owner_key(self.owner);
        let mut conn = self.inner.conn.clone();
        self.inner
            .timed(true, async move { conn.del::<_, ()>(key).await })
            .await
    }

    async fn claim_once(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let lease_ms = duration_ms(options.lease_duration());
        let retention_ms = duration_ms(options.retention_duration());
        let quota = self
            .limits
            .records_per_scope()
            .map_or(String::new(), |q| q.to_string());
        let keys = self.inner.keys(scope, key);
        let mut gone_owner = String::new();
        // At most twice: a second run only after finding the original's owner gone.
        for _ in 0..2 {
            let nonce = nonce();
            let mut invocation = self.inner.scripts.claim.prepare_invoke();
            invocation
                .key(&keys.record)
                .key(&keys.tokens)
                .key(&keys.expiry)
                .arg(fingerprint)
                .arg(lease_ms)
                .arg(retention_ms)
                .arg(self.owner)
                .arg(&quota)
                .arg(nonce)
                .arg(&gone_owner)
                .arg(&keys.member);
            let mut conn = self.inner.conn.clone();
            let reply: Vec<Vec<u8>> = self
                .inner
                .timed(
                    true,
                    async move { invocation.invoke_async(&mut conn).await },
                )
                .await?;
            let field = |i: usize| reply.get(i).map_or(&[][..], Vec::as_slice);
            let now = parse_u64(field(1))?;
            match field(0) {
                b"acquire" => {
                    let checkpoint = (field(6) == b"1").then(|| field(7).to_vec());
                    let lease = Lease::from_parts(
                        scope,
                        key,
                        parse_u64(field(2))?,
                        parse_u64(field(3))?,
                        parse_u32(field(4))?,
                        checkpoint,
                        field(5) == b"1",
                    )?;
                    return Ok(Claim::Acquired(lease));
                }
                b"replay" => {
                    return Ok(Claim::Replay(Replay {
                        outcome: field(2).to_vec(),
                        completed_at_ms: parse_u64(field(3))?,
                        attempt: parse_u32(field(4))?,
                    }));
                }
                b"in_progress" => {
                    let owner = String::from_utf8_lossy(field(3)).into_owned();
                    if gone_owner.is_empty() && !self.inner.owner_alive(&owner).await? {
                        gone_owner = owner;
                        continue;
                    }
                    let left = parse_u64(field(2))?.saturating_sub(now).max(1);
                    return Ok(Claim::InProgress {
                        retry_after: Duration::from_millis(left),
                    });
                }
                b"mismatch" => return Ok(Claim::Mismatch),
                b"quota" => {
                    return Err(Error::QuotaExceeded {
                        limit: self.limits.records_per_scope().unwrap_or(0),
                    });
                }
                other => {
                    return Err(Error::Internal(format!(
                        "the claim script answered {:?}",
                        other.escape_ascii().to_string()
                    )));
                }
            }
        }
        Err(Error::Internal(
            "the claim script kept finding a gone owner".into(),
        ))
    }

    /// Runs the fenced lease-write script: `Ok(None)` when the lease is lost.
    async fn lease_write(
        &self,
        lease: &Lease,
        op: &str,
        arg: &[u8],
        arg2: u64,
    ) -> Result<Vec<Vec<u8>>> {
        let keys = self.inner.keys(lease.scope(), lease.key());
        let mut invocation = self.inner.scripts.lease.prepare_invoke();
        invocation
            .key(&keys.record)
            .key(&keys.expiry)
            .arg(op)
            .arg(lease.token())
            .arg(arg)
            .arg(arg2)
            .arg(&keys.member);
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Vec<u8>> = self
            .inner
            .timed(
                true,
                async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        if reply.first().map(Vec::as_slice) == Some(b"ok") {
            Ok(reply)
        } else {
            Err(Error::LeaseLost {
                token: lease.token(),
            })
        }
    }

    /// The live record under `record_key`, or `None`.
    async fn read(&self, record_key: &str) -> Result<Option<Record>> {
        let mut invocation = self.inner.scripts.get.prepare_invoke();
        invocation.key(record_key);
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Vec<u8>> = self
            .inner
            .timed(
                false,
                async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        let Some((now, fields)) = reply.split_first() else {
            return Ok(None);
        };
        let now = parse_u64(now)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let map: HashMap<&[u8], &[u8]> = fields
            .chunks_exact(2)
            .filter_map(|pair| Some((pair.first()?.as_slice(), pair.get(1)?.as_slice())))
            .collect();
        let record = record_from_fields(record_key, &map)?;
        Ok((!record.is_expired(now)).then_some(record))
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Renews the owner's key every `interval` until aborted.
async fn heartbeat(inner: Arc<Inner>, owner: u64, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = inner.beat(owner).await {
            tracing::warn!(error = %e, owner, "idemstore: Redis owner heartbeat failed");
        }
    }
}

/// The keys of one record.
struct Keys {
    record: String,
    tokens: String,
    expiry: String,
    member: String,
}

impl Inner {
    fn keys(&self, scope: &[u8], key: &[u8]) -> Keys {
        let tag = format!("{}:{{s{}}}", self.prefix, hex(scope));
        let member = hex(key);
        Keys {
            record: format!("{tag}:r:{member}"),
            tokens: format!("{tag}:tok"),
            expiry: format!("{tag}:exp"),
            member,
        }
    }

    fn owner_key(&self, owner: u64) -> String {
        format!("{}:owner:{owner}", self.prefix)
    }

    /// Runs one command within the call timeout, classifying its failure.
    async fn timed<T>(
        &self,
        writes: bool,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(redis_error(e, writes)),
            Err(_) => {
                let message = format!("no answer within {:?}", self.call_timeout);
                let source: crate::error::Source = Arc::new(Message(message));
                Err(if writes {
                    Error::OutcomeUnknown { source }
                } else {
                    Error::Unavailable { source }
                })
            }
        }
    }

    /// Warns (through `tracing`) when the server says it runs with settings that break what
    /// the module docs require: an eviction policy, or no append-only file. A server that
    /// refuses `CONFIG GET` (as managed services may) is not checked.
    async fn check_settings(&self) {
        let mut pairs = Vec::new();
        // One parameter per call: older servers take only one.
        for name in ["maxmemory-policy", "appendonly"] {
            let mut conn = self.conn.clone();
            let read: Result<Vec<String>> = self
                .timed(false, async move {
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg(name)
                        .query_async(&mut conn)
                        .await
                })
                .await;
            match read {
                Ok(pair) => pairs.extend(pair),
                Err(_) => return,
            }
        }
        for pair in pairs.chunks(2) {
            match pair {
                [name, value] if name == "maxmemory-policy" && value != "noeviction" => {
                    tracing::warn!(
                        policy = %value,
                        "idemstore: the Redis server may evict records to make room \
                         (maxmemory-policy is not noeviction): a retry of an evicted key runs \
                         the request again"
                    );
                }
                [name, value] if name == "appendonly" && value != "yes" => {
                    tracing::warn!(
                        "idemstore: the Redis server keeps no append-only file (appendonly \
                         no): a server restart loses every record, and retries run again"
                    );
                }
                _ => {}
            }
        }
    }

    /// Registers a new owner; ends the earlier owner of `instance`.
    async fn register_owner(&self, instance: Option<&str>) -> Result<u64> {
        let mut conn = self.conn.clone();
        let seq = format!("{}:owners", self.prefix);
        let owner: u64 = self
            .timed(true, async move { conn.incr(seq, 1u64).await })
            .await?;
        self.beat(owner).await?;
        if let Some(name) = instance {
            let mut conn = self.conn.clone();
            let name_key = format!("{}:instance:{name}", self.prefix);
            let earlier: Option<u64> = self
                .timed(true, async move {
                    redis::cmd("SET")
                        .arg(name_key)
                        .arg(owner)
                        .arg("GET")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if let Some(earlier) = earlier.filter(|&e| e != owner) {
                let mut conn = self.conn.clone();
                let key = self.owner_key(earlier);
                self.timed(true, async move { conn.del::<_, ()>(key).await })
                    .await?;
            }
        }
        Ok(owner)
    }

    /// Renews the owner's key.
    async fn beat(&self, owner: u64) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = self.owner_key(owner);
        let ttl = duration_ms(self.owner_timeout).max(1);
        self.timed(true, async move {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Whether the owner with this id still holds its key.
    async fn owner_alive(&self, owner: &str) -> Result<bool> {
        let Ok(id) = owner.parse::<u64>() else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let key = self.owner_key(id);
        self.timed(false, async move { conn.exists(key).await })
            .await
    }
}

impl IdempotencyBackend for RedisBackend {
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
        self.lease_write(lease, "complete", outcome, duration_ms(retention))
            .await
            .map(|_| ())
    }

    async fn fail(&self, lease: &Lease) -> Result<()> {
        self.lease_write(lease, "fail", b"", 0).await.map(|_| ())
    }

    async fn extend(&self, lease: &mut Lease, by: Duration) -> Result<()> {
        self.limits.check_extend(by)?;
        let by_ms = duration_ms(by).to_string();
        let reply = self
            .lease_write(lease, "extend", by_ms.as_bytes(), 0)
            .await?;
        let until = reply.get(1).map_or(&[][..], Vec::as_slice);
        lease.lease_until_ms = parse_u64(until)?;
        Ok(())
    }

    async fn checkpoint(&self, lease: &Lease, checkpoint: &[u8]) -> Result<()> {
        self.limits.check_checkpoint(checkpoint)?;
        self.lease_write(lease, "checkpoint", checkpoint, 0)
            .await
            .map(|_| ())
    }

    async fn get(&self, scope: &[u8], key: &[u8]) -> Result<Option<Record>> {
        self.limits.check_identity(scope, key)?;
        self.read(&self.inner.keys(scope, key).record).await
    }

    async fn forget(&self, scope: &[u8], key: &[u8]) -> Result<bool> {
        self.limits.check_identity(scope, key)?;
        let keys = self.inner.keys(scope, key);
        let mut invocation = self.inner.scripts.forget.prepare_invoke();
        invocation
            .key(&keys.record)
            .key(&keys.expiry)
            .arg(&keys.member);
        let mut conn = self.inner.conn.clone();
        let live: i64 = self
            .inner
            .timed(
                true,
                async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        Ok(live == 1)
    }

    async fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        let pattern = format!("{}:{{s*}}:r:*", self.inner.prefix);
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut conn = self.inner.conn.clone();
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .inner
                .timed(false, async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let now = self.server_now().await?;
            for record_key in keys {
                if out.len() >= limit {
                    return Ok(out);
                }
                let Some(record) = self.read(&record_key).await? else {
                    continue;
                };
                let RecordState::InFlight {
                    epoch,
                    lease_until_ms,
                    ..
                } = &record.state
                else {
                    continue;
                };
                let lease_over = *lease_until_ms <= now;
                if lease_over || !self.inner.owner_alive(&epoch.to_string()).await? {
                    let (scope, key) = split_record_key(&record_key)?;
                    out.push(Orphan { scope, key, record });
                }
            }
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    async fn sweep(&self, _limit: usize) -> Result<Swept> {
        // Redis frees expired records itself (PEXPIREAT); nothing is left to sweep.
        Ok(Swept::default())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "redis",
            shared: true,
            durable: false,
            needs_sweep: false,
            orphans_scan: true,
            wakes_waiters: false,
            exact_quota: true,
        }
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }
}

impl RedisBackend {
    /// The server's clock in ms.
    async fn server_now(&self) -> Result<u64> {
        let mut conn = self.inner.conn.clone();
        let (secs, micros): (u64, u64) = self
            .inner
            .timed(false, async move {
                redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
    }
}

// ----- decoding -----

fn record_from_fields(record_key: &str, map: &HashMap<&[u8], &[u8]>) -> Result<Record> {
    let num = |name: &str| -> Result<u64> {
        map.get(name.as_bytes())
            .ok_or_else(|| corrupt(record_key, &format!("field {name} missing")))
            .and_then(|v| parse_u64(v))
    };
    let checkpoint = map.get(&b"cp"[..]).map(|c| c.to_vec());
    let state = match map.get(&b"st"[..]).copied() {
        Some(b"0") => RecordState::InFlight {
            token: num("tok")?,
            epoch: num("own")?,
            lease_until_ms: num("lu")?,
            checkpoint,
        },
        Some(b"1") => RecordState::Completed {
            outcome: map.get(&b"out"[..]).map(|o| o.to_vec()).unwrap_or_default(),
        },
        Some(b"2") => RecordState::Failed { checkpoint },
        other => {
            return Err(corrupt(
                record_key,
                &format!("unknown state {:?}", other.map(<[u8]>::escape_ascii)),
            ));
        }
    };
    Ok(Record {
        fingerprint: map.get(&b"fp"[..]).map(|f| f.to_vec()).unwrap_or_default(),
        created_at_ms: num("cr")?,
        updated_at_ms: num("up")?,
        expires_at_ms: num("ex")?,
        attempt: u32::try_from(num("att")?).unwrap_or(u32::MAX),
        state,
    })
}

/// `(scope, key)` from a record key `{prefix}:{s<hex>}:r:<hex>`.
fn split_record_key(record_key: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let bad = || corrupt(record_key, "not a record key");
    let open = record_key.find(":{s").ok_or_else(bad)?;
    let rest = record_key.get(open + 3..).ok_or_else(bad)?;
    let (scope_hex, key_part) = rest.split_once("}:r:").ok_or_else(bad)?;
    Ok((
        unhex(scope_hex).ok_or_else(bad)?,
        unhex(key_part).ok_or_else(bad)?,
    ))
}

fn corrupt(record_key: &str, reason: &str) -> Error {
    Error::corrupt(format!("redis/{record_key}"), reason)
}

fn parse_u64(bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::Internal(format!(
                "a Redis script answered {:?} where a number belongs",
                bytes.escape_ascii().to_string()
            ))
        })
}

fn parse_u32(bytes: &[u8]) -> Result<u32> {
    Ok(u32::try_from(parse_u64(bytes)?).unwrap_or(u32::MAX))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A random 16-bit nonce for the low bits of a token, from the standard library's randomly
/// seeded hasher (no cryptographic strength is needed: it only separates re-issued counters).
fn nonce() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() & 0xffff) as u16
}

// ----- errors -----

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

/// Classifies a redis-rs error: a refused connection (nothing was sent) or a server that is
/// not ready
/// (`LOADING`, `BUSY`, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`, `READONLY`) is
/// [`Error::Unavailable`]; a timeout or a dropped connection is [`Error::OutcomeUnknown`] if
/// the command may have written, else [`Error::Unavailable`]; anything else is
/// [`Error::Backend`].
fn redis_error(e: RedisError, writes: bool) -> Error {
    let not_ready = e.code().is_some_and(|code| {
        matches!(
            code,
            "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY"
        )
    });
    let refused = e.is_connection_refusal();
    let lost = e.is_timeout() || e.is_connection_dropped() || e.is_io_error();
    let source: crate::error::Source = Arc::new(e);
    if not_ready || refused {
        return Error::Unavailable { source };
    }
    if lost {
        return if writes {
            Error::OutcomeUnknown { source }
        } else {
            Error::Unavailable { source }
        };
    }
    Error::Backend { source }
}
