//! The systems compared, each running the same claim + complete cycle on a fresh key: claim
//! (insert if absent, durably) and, if acquired, complete (store the outcome, durably).
//!
//! Every peer is written the way a user would write it by hand with that tool, at its
//! strongest usual durability unless the name says otherwise.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::{Claim, ClaimOptions, Durability, Store};
use redb::{ReadableTable as _, TableDefinition};

use crate::BoxError;
use crate::extra::WalOptions;
use crate::workload::{FINGERPRINT_LEN, KEY_LEN, SCOPE, mix};

/// Lease of a claim, and retention of a completed record, for every peer.
pub const LEASE: Duration = Duration::from_secs(30);
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// One system under test. `worker` is called once per caller thread.
pub trait Peer: Send + Sync {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError>;
}

/// One caller's handle (its connection, for the servers).
pub trait Worker: Send {
    /// Claims `key` and completes it with `outcome`. For the disk bound: one 4 KiB overwrite
    /// and fdatasync.
    fn cycle(
        &mut self,
        key: &[u8; KEY_LEN],
        fp: &[u8; FINGERPRINT_LEN],
        outcome: &[u8],
    ) -> Result<(), BoxError>;
}

fn not_acquired(what: &str) -> BoxError {
    format!("{what}: a fresh key was not acquired").into()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ----- idemstore -----

pub struct Idemstore {
    store: Arc<Store>,
    options: ClaimOptions,
}

impl Idemstore {
    /// A store at `path` with `durability`, no background sweeper (nothing expires in a run);
    /// `wal`: with a write-ahead log (format 2) and these options.
    pub fn open(
        path: &Path,
        durability: Durability,
        wal: Option<&WalOptions>,
    ) -> Result<Idemstore, BoxError> {
        let builder = Store::builder().durability(durability).sweep_interval(None);
        let builder = match wal {
            Some(options) => options.apply(builder.write_ahead_log(true)),
            None => builder,
        };
        Ok(Idemstore::from_store(Arc::new(builder.open(path)?)))
    }

    /// The cycle on a store opened elsewhere (the sustained run uses the filled store).
    pub fn from_store(store: Arc<Store>) -> Idemstore {
        Idemstore {
            store,
            options: ClaimOptions::default().lease(LEASE).retention(RETENTION),
        }
    }
}

struct IdemstoreWorker {
    store: Arc<Store>,
    options: ClaimOptions,
}

impl Peer for Idemstore {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(IdemstoreWorker {
            store: Arc::clone(&self.store),
            options: self.options.clone(),
        }))
    }
}

impl Worker for IdemstoreWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        match self.store.claim(SCOPE, key, fp, &self.options)? {
            Claim::Acquired(lease) => Ok(self.store.complete(&lease, outcome, RETENTION)?),
            _ => Err(not_acquired("idemstore")),
        }
    }
}

// ----- idemstore's shared backends -----

/// One of idemstore's remote backends (PostgreSQL, Redis) through the `IdempotencyBackend`
/// trait, as a service uses it: the same claim + complete as the raw peer on the same server,
/// with the semantics the raw upsert leaves out (fingerprints, fencing tokens, owners and
/// takeover, expiry on the server's clock). The trait is async: the backend lives on a
/// multi-threaded Tokio runtime of its own, whose worker threads drive the connections, and
/// each caller thread runs its cycle with `block_on`.
pub struct Backend<B> {
    backend: Arc<B>,
    runtime: Arc<tokio::runtime::Runtime>,
    options: ClaimOptions,
    name: &'static str,
}

impl<B: idemstore::IdempotencyBackend> Backend<B> {
    /// Runs `connect` on a new runtime and keeps the backend it returns.
    pub fn connect<F>(name: &'static str, connect: F) -> Result<Backend<B>, BoxError>
    where
        F: Future<Output = idemstore::Result<B>>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let backend = runtime.block_on(connect)?;
        Ok(Backend {
            backend: Arc::new(backend),
            runtime: Arc::new(runtime),
            options: ClaimOptions::default().lease(LEASE).retention(RETENTION),
            name,
        })
    }
}

struct BackendWorker<B> {
    backend: Arc<B>,
    /// Kept alive while the worker exists.
    runtime: Arc<tokio::runtime::Runtime>,
    options: ClaimOptions,
    name: &'static str,
}

impl<B: idemstore::IdempotencyBackend> Peer for Backend<B> {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(BackendWorker {
            backend: Arc::clone(&self.backend),
            runtime: Arc::clone(&self.runtime),
            options: self.options.clone(),
            name: self.name,
        }))
    }
}

impl<B: idemstore::IdempotencyBackend> Worker for BackendWorker<B> {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        let (backend, options) = (&*self.backend, &self.options);
        self.runtime.block_on(async {
            match backend.claim(SCOPE, key, fp, options).await? {
                Claim::Acquired(lease) => Ok(backend.complete(&lease, outcome, RETENTION).await?),
                _ => Err(not_acquired(self.name)),
            }
        })
    }
}

// ----- naive redb -----

const REDB_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idempotency");

/// What a user writes by hand on redb: one write transaction per operation, each committed
/// durably (redb's default `Durability::Immediate`): claim = read, insert if absent, commit;
/// complete = insert the finished record, commit. Concurrent callers queue for redb's single
/// writer.
pub struct NaiveRedb {
    db: Arc<redb::Database>,
}

impl NaiveRedb {
    pub fn open(path: &Path) -> Result<NaiveRedb, BoxError> {
        let db = redb::Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(REDB_TABLE)?;
        txn.commit()?;
        Ok(NaiveRedb { db: Arc::new(db) })
    }
}

struct NaiveRedbWorker {
    db: Arc<redb::Database>,
    buf: Vec<u8>,
}

impl Peer for NaiveRedb {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(NaiveRedbWorker {
            db: Arc::clone(&self.db),
            buf: Vec::new(),
        }))
    }
}

/// `[state, expires_at_ms (8), fingerprint (32), outcome...]`
fn encode_record(buf: &mut Vec<u8>, state: u8, expires_at_ms: u64, fp: &[u8], outcome: &[u8]) {
    buf.clear();
    buf.push(state);
    buf.extend_from_slice(&expires_at_ms.to_le_bytes());
    buf.extend_from_slice(fp);
    buf.extend_from_slice(outcome);
}

impl Worker for NaiveRedbWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        let mut scoped = Vec::with_capacity(SCOPE.len() + 1 + key.len());
        scoped.extend_from_slice(SCOPE);
        scoped.push(b'/');
        scoped.extend_from_slice(key);
        // Claim.
        let txn = self.db.begin_write()?;
        let acquired = {
            let mut table = txn.open_table(REDB_TABLE)?;
            let existing = table.get(scoped.as_slice())?.is_some();
            if !existing {
                encode_record(
                    &mut self.buf,
                    0,
                    now_ms() + LEASE.as_millis() as u64,
                    fp,
                    &[],
                );
                table.insert(scoped.as_slice(), self.buf.as_slice())?;
            }
            !existing
        };
        txn.commit()?;
        if !acquired {
            return Err(not_acquired("redb"));
        }
        // Complete.
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(REDB_TABLE)?;
            let expires = now_ms() + RETENTION.as_millis() as u64;
            encode_record(&mut self.buf, 1, expires, fp, outcome);
            table.insert(scoped.as_slice(), self.buf.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }
}

// ----- SQLite -----

/// SQLite through rusqlite: WAL, `synchronous=FULL` (every commit fsyncs the WAL), one
/// connection shared behind a mutex (SQLite has one writer; a mutex queues callers without
/// `SQLITE_BUSY` back-off sleeps), each statement its own transaction:
/// `INSERT ... ON CONFLICT DO NOTHING`, then `UPDATE`.
pub struct Sqlite {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

const SQLITE_INSERT: &str = "INSERT INTO idempotency (scope, key, fingerprint, state, expires_at) \
     VALUES (?1, ?2, ?3, 0, ?4) ON CONFLICT DO NOTHING";
const SQLITE_UPDATE: &str = "UPDATE idempotency SET state = 1, outcome = ?3, expires_at = ?4 \
     WHERE scope = ?1 AND key = ?2";

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, BoxError> {
        let conn = rusqlite::Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("SQLite refused WAL mode: {mode}").into());
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE idempotency (
                 scope TEXT NOT NULL,
                 key TEXT NOT NULL,
                 fingerprint BLOB NOT NULL,
                 state INTEGER NOT NULL,
                 outcome BLOB,
                 expires_at INTEGER NOT NULL,
                 PRIMARY KEY (scope, key)
             )",
        )?;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }
}

struct SqliteWorker {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

impl Peer for Sqlite {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(SqliteWorker {
            conn: Arc::clone(&self.conn),
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Worker for SqliteWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        let scope = std::str::from_utf8(SCOPE)?;
        let key = std::str::from_utf8(key)?;
        let inserted = {
            let conn = lock(&self.conn);
            let mut stmt = conn.prepare_cached(SQLITE_INSERT)?;
            let lease_until = (now_ms() + LEASE.as_millis() as u64) as i64;
            stmt.execute(rusqlite::params![scope, key, &fp[..], lease_until])?
        };
        if inserted != 1 {
            return Err(not_acquired("sqlite"));
        }
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare_cached(SQLITE_UPDATE)?;
        let expires = (now_ms() + RETENTION.as_millis() as u64) as i64;
        stmt.execute(rusqlite::params![scope, key, outcome, expires])?;
        Ok(())
    }
}

// ----- Redis -----

/// Redis with AOF: `SET key fingerprint NX PX lease`, then `SET key outcome XX PX retention`,
/// one connection per caller.
pub struct Redis {
    client: redis::Client,
}

impl Redis {
    pub fn connect(url: &str) -> Result<Redis, BoxError> {
        Ok(Redis {
            client: redis::Client::open(url)?,
        })
    }
}

/// The Redis key of `key` (`scope:key`), into `buf`.
pub fn redis_key(buf: &mut Vec<u8>, key: &[u8; KEY_LEN]) {
    buf.clear();
    buf.extend_from_slice(SCOPE);
    buf.push(b':');
    buf.extend_from_slice(key);
}

struct RedisWorker {
    conn: redis::Connection,
    key: Vec<u8>,
}

impl Peer for Redis {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(RedisWorker {
            conn: self.client.get_connection()?,
            key: Vec::new(),
        }))
    }
}

impl Worker for RedisWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        redis_key(&mut self.key, key);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(&fp[..])
            .arg("NX")
            .arg("PX")
            .arg(LEASE.as_millis() as u64)
            .query(&mut self.conn)?;
        if claimed.is_none() {
            return Err(not_acquired("redis"));
        }
        let done: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(outcome)
            .arg("XX")
            .arg("PX")
            .arg(RETENTION.as_millis() as u64)
            .query(&mut self.conn)?;
        done.map(|_| ())
            .ok_or_else(|| "redis: the claimed key vanished before SET XX".into())
    }
}

// ----- PostgreSQL -----

/// PostgreSQL with `synchronous_commit = on`: `INSERT ... ON CONFLICT DO NOTHING`, then
/// `UPDATE`, each in its own (autocommit) transaction, one connection per caller with
/// prepared statements.
pub struct Postgres {
    conn_str: String,
}

const PG_INSERT: &str = "INSERT INTO idempotency (scope, key, fingerprint, state, expires_at) \
     VALUES ($1, $2, $3, 0, $4) ON CONFLICT DO NOTHING";
const PG_UPDATE: &str = "UPDATE idempotency SET state = 1, outcome = $3, expires_at = $4 \
     WHERE scope = $1 AND key = $2";

impl Postgres {
    pub fn connect(conn_str: &str) -> Result<Postgres, BoxError> {
        let mut client = postgres::Client::connect(conn_str, postgres::NoTls)?;
        client.batch_execute(
            "DROP TABLE IF EXISTS idempotency;
             CREATE TABLE idempotency (
                 scope text NOT NULL,
                 key text NOT NULL,
                 fingerprint bytea NOT NULL,
                 state smallint NOT NULL,
                 outcome bytea,
                 expires_at bigint NOT NULL,
                 PRIMARY KEY (scope, key)
             )",
        )?;
        Ok(Postgres {
            conn_str: conn_str.to_owned(),
        })
    }
}

struct PostgresWorker {
    client: postgres::Client,
    insert: postgres::Statement,
    update: postgres::Statement,
}

impl Peer for Postgres {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        let mut client = postgres::Client::connect(&self.conn_str, postgres::NoTls)?;
        let insert = client.prepare(PG_INSERT)?;
        let update = client.prepare(PG_UPDATE)?;
        Ok(Box::new(PostgresWorker {
            client,
            insert,
            update,
        }))
    }
}

impl Worker for PostgresWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        let scope = std::str::from_utf8(SCOPE)?;
        let key = std::str::from_utf8(key)?;
        let lease_until = (now_ms() + LEASE.as_millis() as u64) as i64;
        let fp = &fp[..];
        let inserted = self
            .client
            .execute(&self.insert, &[&scope, &key, &fp, &lease_until])?;
        if inserted != 1 {
            return Err(not_acquired("postgres"));
        }
        let expires = (now_ms() + RETENTION.as_millis() as u64) as i64;
        self.client
            .execute(&self.update, &[&scope, &key, &outcome, &expires])?;
        Ok(())
    }
}

// ----- the bounds -----

/// The non-durable ceiling: a `HashMap` behind a mutex, insert-if-absent then update, each
/// under its own lock. To keep memory bounded over a long run the map is cleared whenever it
/// reaches [`HASHMAP_CAP`] records (the clearing is timed too, amortised over a million
/// cycles).
pub struct InMemory {
    map: Arc<Mutex<HashMap<Vec<u8>, Entry>>>,
}

pub const HASHMAP_CAP: usize = 1 << 20;

struct Entry {
    _fingerprint: [u8; 32],
    state: u8,
    expires_at_ms: u64,
    outcome: Vec<u8>,
}

impl InMemory {
    pub fn new() -> InMemory {
        InMemory {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

struct InMemoryWorker {
    map: Arc<Mutex<HashMap<Vec<u8>, Entry>>>,
}

impl Peer for InMemory {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(InMemoryWorker {
            map: Arc::clone(&self.map),
        }))
    }
}

impl Worker for InMemoryWorker {
    fn cycle(&mut self, key: &[u8; 36], fp: &[u8; 32], outcome: &[u8]) -> Result<(), BoxError> {
        let mut scoped = Vec::with_capacity(SCOPE.len() + 1 + key.len());
        scoped.extend_from_slice(SCOPE);
        scoped.push(b'/');
        scoped.extend_from_slice(key);
        {
            let mut map = lock(&self.map);
            if map.len() >= HASHMAP_CAP {
                map.clear();
            }
            if map.contains_key(&scoped) {
                return Err(not_acquired("hashmap"));
            }
            map.insert(
                scoped.clone(),
                Entry {
                    _fingerprint: *fp,
                    state: 0,
                    expires_at_ms: now_ms() + LEASE.as_millis() as u64,
                    outcome: Vec::new(),
                },
            );
        }
        let mut map = lock(&self.map);
        if let Some(entry) = map.get_mut(&scoped) {
            entry.state = 1;
            entry.expires_at_ms = now_ms() + RETENTION.as_millis() as u64;
            entry.outcome = outcome.to_vec();
        }
        Ok(())
    }
}

/// The disk's limit: 4 KiB `pwrite`s at random 4 KiB-aligned offsets of a preallocated (fully
/// written, not sparse) file, each followed by `fdatasync`. One "cycle" is one overwrite + sync,
/// so the figure is fdatasyncs per second at that many concurrent callers.
pub struct DiskLimit {
    file: Arc<File>,
    blocks: u64,
}

const DISK_FILE: u64 = 64 << 20;
const BLOCK: usize = 4096;

impl DiskLimit {
    pub fn open(path: &Path) -> Result<DiskLimit, BoxError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)?;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..(DISK_FILE / chunk.len() as u64) {
            file.write_all_at(&chunk, i * chunk.len() as u64)?;
        }
        file.sync_all()?;
        Ok(DiskLimit {
            file: Arc::new(file),
            blocks: DISK_FILE / BLOCK as u64,
        })
    }
}

struct DiskWorker {
    file: Arc<File>,
    blocks: u64,
    block: Vec<u8>,
}

impl Peer for DiskLimit {
    fn worker(&self) -> Result<Box<dyn Worker>, BoxError> {
        Ok(Box::new(DiskWorker {
            file: Arc::clone(&self.file),
            blocks: self.blocks,
            block: vec![0xa5; BLOCK],
        }))
    }
}

impl Worker for DiskWorker {
    fn cycle(&mut self, key: &[u8; 36], _: &[u8; 32], _: &[u8]) -> Result<(), BoxError> {
        let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
        let offset = (seed % self.blocks) * BLOCK as u64;
        self.block[..KEY_LEN].copy_from_slice(key);
        self.file.write_all_at(&self.block, offset)?;
        self.file.sync_data()?;
        Ok(())
    }
}
