//! The redb tables and the meta keys of an idemstore database, and how a file is adopted.

use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
};

use crate::error::{Error, Result};

/// `scoped key -> record envelope`.
pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idemstore.records");
/// `(expires_at_ms, scoped key) -> ()`: the TTL index, walked from the oldest by the sweeper.
pub(crate) const EXPIRY: TableDefinition<(u64, &[u8]), ()> =
    TableDefinition::new("idemstore.expiry");
/// `scope -> number of stored records`: enforces the per-scope quota without a scan.
pub(crate) const SCOPES: TableDefinition<&[u8], u64> = TableDefinition::new("idemstore.scopes");
/// `name -> value`: magic, format version, process epoch, next fencing token.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("idemstore.meta");

pub(crate) const META_MAGIC: &str = "magic";
pub(crate) const META_FORMAT: &str = "format_version";
pub(crate) const META_EPOCH: &str = "epoch";
pub(crate) const META_NEXT_TOKEN: &str = "next_token";
/// Format 2: the write-ahead log's store id (in every segment header), geometry, and the LSN of
/// the last batch a checkpoint wrote into these tables.
pub(crate) const META_WAL_STORE_ID: &str = "wal_store_id";
pub(crate) const META_WAL_SEGMENT_BYTES: &str = "wal_segment_bytes";
pub(crate) const META_WAL_SEGMENTS: &str = "wal_segments";
pub(crate) const META_WAL_CHECKPOINT_LSN: &str = "wal_checkpoint_lsn";

/// The value of the `magic` meta key.
pub(crate) const MAGIC: &[u8] = b"idemstore";
/// The newest database format this build reads and writes.
///
/// Format 1 is the redb file alone; format 2 (a store opened with
/// [`StoreBuilder::write_ahead_log`](crate::StoreBuilder::write_ahead_log)) is the redb file
/// plus a write-ahead log file beside it. This build opens both, keeps a format-1 store at
/// format 1 unless asked to add the log, and never turns a format-2 store back. Builds that
/// know only format 1 refuse a format-2 store with `UnsupportedFormat`.
pub const FORMAT_VERSION: u64 = 2;

/// The format of a store without a write-ahead log.
pub(crate) const FORMAT_REDB_ONLY: u64 = 1;

/// What an open store learned from, and wrote to, the meta table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Adopted {
    pub epoch: u64,
    pub next_token: u64,
    /// The database format (1 or 2).
    pub format: u64,
    /// Format 2: the write-ahead log's settings.
    pub wal: Option<WalMeta>,
}

/// The meta values of a format-2 store's write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalMeta {
    pub store_id: u64,
    pub segment_bytes: u64,
    pub segments: u64,
    pub checkpoint_lsn: u64,
}

pub(crate) fn meta_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<u64> {
    let guard = table
        .get(name)
        .map_err(Error::storage)?
        .ok_or_else(|| Error::corrupt(format!("meta/{name}"), "missing"))?;
    let bytes: [u8; 8] = guard
        .value()
        .try_into()
        .map_err(|_| Error::corrupt(format!("meta/{name}"), "not an 8-byte integer"))?;
    Ok(u64::from_le_bytes(bytes))
}

pub(crate) fn put_u64(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    name: &str,
    value: u64,
) -> Result<()> {
    table
        .insert(name, value.to_le_bytes().as_slice())
        .map_err(Error::storage)?;
    Ok(())
}

fn not_ours(path: &Path, reason: impl Into<String>) -> Error {
    Error::NotAnIdemstoreFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the meta table through `read`: `Some` for an idemstore database, `None` for an empty
/// one, an error for anything else (foreign tables, a meta table of another shape, an unknown
/// format version).
pub(crate) fn inspect(read: &ReadTransaction, path: &Path) -> Result<Option<Adopted>> {
    let names: Vec<String> = read
        .list_tables()
        .map_err(Error::storage)?
        .map(|t| t.name().to_string())
        .collect();
    let foreign: Vec<&String> = names
        .iter()
        .filter(|n| {
            ![RECORDS.name(), EXPIRY.name(), SCOPES.name(), META.name()].contains(&n.as_str())
        })
        .collect();
    if !foreign.is_empty() {
        return Err(not_ours(
            path,
            format!("it holds foreign tables {foreign:?}"),
        ));
    }
    if !names.iter().any(|n| n == META.name()) {
        if names.is_empty() {
            return Ok(None);
        }
        return Err(not_ours(path, "it has idemstore tables but no meta table"));
    }
    let meta = read
        .open_table(META)
        .map_err(|e| not_ours(path, format!("its meta table is not ours: {e}")))?;
    match meta.get(META_MAGIC).map_err(Error::storage)? {
        Some(m) if m.value() == MAGIC => {}
        _ => return Err(not_ours(path, "its meta table lacks the idemstore magic")),
    }
    let format = meta_u64(&meta, META_FORMAT)?;
    if format != FORMAT_REDB_ONLY && format != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let wal = if format == FORMAT_VERSION {
        Some(WalMeta {
            store_id: meta_u64(&meta, META_WAL_STORE_ID)?,
            segment_bytes: meta_u64(&meta, META_WAL_SEGMENT_BYTES)?,
            segments: meta_u64(&meta, META_WAL_SEGMENTS)?,
            checkpoint_lsn: meta_u64(&meta, META_WAL_CHECKPOINT_LSN)?,
        })
    } else {
        None
    };
    Ok(Some(Adopted {
        epoch: meta_u64(&meta, META_EPOCH)?,
        next_token: meta_u64(&meta, META_NEXT_TOKEN)?,
        format,
        wal,
    }))
}

/// Reads the meta table of `db` (`None`: an empty database), refusing a foreign one.
pub(crate) fn existing(db: &Database, path: &Path) -> Result<Option<Adopted>> {
    inspect(&db.begin_read().map_err(Error::storage)?, path)
}

/// Checks (or, on an empty database, initialises) the meta table, bumps the process epoch and
/// commits that durably; with `upgrade`, also moves the store to format 2 with that log (whose
/// file the caller has made durable first). A database holding foreign tables, or a meta table
/// of another shape, is refused before anything is written.
pub(crate) fn adopt(db: &Database, path: &Path, upgrade: Option<WalMeta>) -> Result<Adopted> {
    let existing = existing(db, path)?;
    let mut adopted = match existing {
        Some(a) => Adopted {
            epoch: a
                .epoch
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("meta/epoch", "epoch overflow"))?,
            ..a
        },
        None => Adopted {
            epoch: 1,
            next_token: 1,
            format: FORMAT_REDB_ONLY,
            wal: None,
        },
    };
    let upgrade = upgrade.filter(|_| adopted.wal.is_none());
    if let Some(wal) = upgrade {
        adopted.format = FORMAT_VERSION;
        adopted.wal = Some(wal);
    }

    let mut txn = db.begin_write().map_err(Error::storage)?;
    // Once per open: recording redb's allocator state here means a process killed before its
    // first checkpoint (or, without a log, its first durable commit of its own) leaves a file
    // the next open loads instead of repairing by a walk of the whole file.
    txn.set_quick_repair(true);
    {
        let mut meta = txn.open_table(META).map_err(Error::storage)?;
        if existing.is_none() {
            meta.insert(META_MAGIC, MAGIC).map_err(Error::storage)?;
            put_u64(&mut meta, META_FORMAT, FORMAT_REDB_ONLY)?;
            put_u64(&mut meta, META_NEXT_TOKEN, adopted.next_token)?;
        }
        if let Some(wal) = upgrade {
            put_u64(&mut meta, META_FORMAT, FORMAT_VERSION)?;
            put_u64(&mut meta, META_WAL_STORE_ID, wal.store_id)?;
            put_u64(&mut meta, META_WAL_SEGMENT_BYTES, wal.segment_bytes)?;
            put_u64(&mut meta, META_WAL_SEGMENTS, wal.segments)?;
            put_u64(&mut meta, META_WAL_CHECKPOINT_LSN, wal.checkpoint_lsn)?;
        }
        put_u64(&mut meta, META_EPOCH, adopted.epoch)?;
        txn.open_table(RECORDS).map_err(Error::storage)?;
        txn.open_table(EXPIRY).map_err(Error::storage)?;
        txn.open_table(SCOPES).map_err(Error::storage)?;
    }
    txn.commit().map_err(Error::storage)?;
    Ok(adopted)
}
