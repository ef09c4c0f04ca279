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

/// The value of the `magic` meta key.
pub(crate) const MAGIC: &[u8] = b"idemstore";
/// The database format written and read by this build.
pub const FORMAT_VERSION: u64 = 1;

/// What an open store learned from, and wrote to, the meta table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Adopted {
    pub epoch: u64,
    pub next_token: u64,
}

fn meta_u64(table: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<u64> {
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
    if format != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Some(Adopted {
        epoch: meta_u64(&meta, META_EPOCH)?,
        next_token: meta_u64(&meta, META_NEXT_TOKEN)?,
    }))
}

/// Checks (or, on an empty database, initialises) the meta table, bumps the process epoch and
/// commits that durably. A database holding foreign tables, or a meta table of another shape,
/// is refused before anything is written.
pub(crate) fn adopt(db: &Database, path: &Path) -> Result<Adopted> {
    let existing = inspect(&db.begin_read().map_err(Error::storage)?, path)?;
    let adopted = match existing {
        Some(a) => Adopted {
            epoch: a
                .epoch
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("meta/epoch", "epoch overflow"))?,
            next_token: a.next_token,
        },
        None => Adopted {
            epoch: 1,
            next_token: 1,
        },
    };

    let txn = db.begin_write().map_err(Error::storage)?;
    {
        let mut meta = txn.open_table(META).map_err(Error::storage)?;
        if existing.is_none() {
            meta.insert(META_MAGIC, MAGIC).map_err(Error::storage)?;
            put_u64(&mut meta, META_FORMAT, FORMAT_VERSION)?;
            put_u64(&mut meta, META_NEXT_TOKEN, adopted.next_token)?;
        }
        put_u64(&mut meta, META_EPOCH, adopted.epoch)?;
        txn.open_table(RECORDS).map_err(Error::storage)?;
        txn.open_table(EXPIRY).map_err(Error::storage)?;
        txn.open_table(SCOPES).map_err(Error::storage)?;
    }
    txn.commit().map_err(Error::storage)?;
    Ok(adopted)
}
