//! Operator access to a store file: the read-only view opens beside no writer and writes
//! nothing; import keeps answers byte for byte and never lets a stale lease write.

mod common;

use std::time::Duration;

use common::{DAY, TestResult, acquired, replay};
use idemstore::{ClaimOptions, Error, ReadOnlyStore, Record, RecordState, Store};

fn options() -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_secs(30))
        .retention(DAY)
}

/// `(scope, key, record)`, as `Store::import` takes it.
type Exported = (Vec<u8>, Vec<u8>, Record);

/// Every live record of the file at `path`.
fn exported(path: &std::path::Path) -> Result<Vec<Exported>, Error> {
    let mut out = Vec::new();
    let mut failure = None;
    ReadOnlyStore::open(path)?.scan(None, |entry| match entry.record {
        Ok(record) => {
            out.push((entry.scope, entry.key, record));
            true
        }
        Err(e) => {
            failure = Some(e);
            false
        }
    })?;
    failure.map_or(Ok(out), Err)
}

#[test]
fn a_read_only_open_and_a_writer_exclude_each_other() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let store = Store::open(&path)?;
    assert!(matches!(
        ReadOnlyStore::open(&path),
        Err(Error::AlreadyOpen)
    ));
    store.close()?;

    let first = ReadOnlyStore::open(&path)?;
    let second = ReadOnlyStore::open(&path)?;
    assert!(matches!(Store::open(&path), Err(Error::AlreadyOpen)));
    drop((first, second));
    Store::open(&path)?.close()?;
    Ok(())
}

#[test]
fn a_read_only_open_writes_nothing_and_creates_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.redb");
    match ReadOnlyStore::open(&missing) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!missing.exists());
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "nothing created");

    let path = dir.path().join("idem.redb");
    let store = Store::open(&path)?;
    let lease = acquired(store.claim("s", "k", "fp", &options())?);
    store.checkpoint(&lease, b"step-1")?;
    store.close()?;
    let before = std::fs::read(&path)?;
    let file = ReadOnlyStore::open(&path)?;
    file.summary()?;
    file.verify()?;
    file.orphans(10)?;
    drop(file);
    assert_eq!(
        std::fs::read(&path)?,
        before,
        "the file is byte for byte as it was"
    );
    Ok(())
}

#[test]
fn a_foreign_database_is_refused_untouched() -> TestResult {
    const THEIRS: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("theirs");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("theirs.redb");
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(THEIRS)?.insert(1, 2)?;
        txn.commit()?;
    }
    let before = std::fs::read(&path)?;
    assert!(matches!(
        ReadOnlyStore::open(&path),
        Err(Error::NotAnIdemstoreFile { .. })
    ));
    assert_eq!(std::fs::read(&path)?, before);
    Ok(())
}

#[test]
fn summary_counts_records_by_state() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let store = Store::open(&path)?;
    let done = acquired(store.claim("s", "done", "fp", &options())?);
    store.complete(&done, b"ok", DAY)?;
    let failed = acquired(store.claim("s", "failed", "fp", &options())?);
    store.fail(&failed)?;
    acquired(store.claim("t", "running", "fp", &options())?);
    store.close()?;

    let file = ReadOnlyStore::open(&path)?;
    let summary = file.summary()?;
    assert_eq!(
        (
            summary.records,
            summary.scopes,
            summary.damaged,
            summary.expired
        ),
        (3, 2, 0, 0)
    );
    assert_eq!(
        (summary.completed, summary.failed, summary.in_flight),
        (1, 1, 1)
    );
    assert_eq!(file.get("s", "done")?.map(|r| r.state), {
        Some(RecordState::Completed {
            outcome: b"ok".to_vec(),
        })
    });
    let orphans = file.orphans(10)?;
    assert_eq!(orphans.len(), 1);
    assert_eq!(
        orphans.first().map(|o| o.key.as_slice()),
        Some(&b"running"[..])
    );
    Ok(())
}

#[test]
fn import_keeps_every_record_byte_for_byte_and_replays_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (from, to) = (dir.path().join("from.redb"), dir.path().join("to.redb"));
    let store = Store::open(&from)?;
    for i in 0..50u32 {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &options())?);
        store.complete(&lease, &i.to_le_bytes(), DAY)?;
    }
    store.close()?;
    let records = exported(&from)?;
    let report = Store::import(&to, records.clone().into_iter().map(Ok::<_, Error>))??;
    assert_eq!((report.added, report.existing, report.expired), (50, 0, 0));
    assert_eq!(exported(&to)?, records);
    assert!(ReadOnlyStore::open(&to)?.verify()?.is_clean());

    // A second import of the same records adds nothing and keeps what is stored.
    let again = Store::import(&to, records.into_iter().map(Ok::<_, Error>))??;
    assert_eq!((again.added, again.existing), (0, 50));
    let store = Store::open(&to)?;
    for i in 0..50u32 {
        let r = replay(store.claim("s", format!("k{i}"), "fp", &options())?);
        assert_eq!(r.outcome, i.to_le_bytes());
    }
    Ok(())
}

#[test]
fn an_imported_in_flight_record_is_an_orphan_no_earlier_lease_can_write() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (from, to) = (dir.path().join("from.redb"), dir.path().join("to.redb"));
    let source = Store::open(&from)?;
    let stale = acquired(source.claim("s", "k", "fp", &options())?);
    source.checkpoint(&stale, b"step-1")?;
    source.close()?;
    // The target has issued tokens of its own.
    let target = Store::open(&to)?;
    let mut target_leases = Vec::new();
    for i in 0..3 {
        target_leases.push(acquired(target.claim(
            "t",
            format!("k{i}"),
            "fp",
            &options(),
        )?));
    }
    target.close()?;

    let report = Store::import(&to, exported(&from)?.into_iter().map(Ok::<_, Error>))??;
    assert_eq!((report.added, report.in_flight), (1, 1));
    let file = ReadOnlyStore::open(&to)?;
    let imported = file.get("s", "k")?.expect("imported");
    let RecordState::InFlight { token, epoch, .. } = imported.state else {
        panic!("expected in flight, got {imported:?}");
    };
    assert_eq!(epoch, 0);
    assert!(token > stale.token());
    assert!(target_leases.iter().all(|l| token > l.token()));
    assert!(file.next_token() > token);
    drop(file);

    let store = Store::open(&to)?;
    // A lease of the source store, rebuilt with its token, is fenced off.
    let rebuilt =
        idemstore::Lease::from_parts(b"s", b"k", stale.token(), u64::MAX, 1, None, false)?;
    assert!(matches!(
        store.complete(&rebuilt, b"stale", DAY),
        Err(Error::LeaseLost { .. })
    ));
    // The first claim takes the orphan over, with its checkpoint.
    let lease = acquired(store.claim("s", "k", "fp", &options())?);
    assert!(lease.is_takeover());
    assert_eq!(lease.checkpoint(), Some(&b"step-1"[..]));
    Ok(())
}

#[test]
fn an_import_whose_input_fails_adds_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (from, to) = (dir.path().join("from.redb"), dir.path().join("to.redb"));
    let store = Store::open(&from)?;
    let lease = acquired(store.claim("s", "k", "fp", &options())?);
    store.complete(&lease, b"ok", DAY)?;
    store.close()?;
    let mut input: Vec<Result<_, &str>> = exported(&from)?.into_iter().map(Ok).collect();
    input.push(Err("line 2: not JSON"));
    assert_eq!(Store::import(&to, input)?, Err("line 2: not JSON"));
    assert_eq!(ReadOnlyStore::open(&to)?.summary()?.records, 0);
    Ok(())
}

#[test]
fn import_takes_records_up_to_the_hard_caps_not_the_defaults() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("to.redb");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    // Over the default outcome limit (1 MiB), as a store configured for larger outcomes keeps.
    let outcome = vec![7u8; 2 * 1024 * 1024];
    let state = RecordState::Completed {
        outcome: outcome.clone(),
    };
    let record = Record::from_parts(b"fp".to_vec(), now_ms, now_ms, now_ms + 60_000, 1, state);
    let input = [Ok::<_, Error>((b"s".to_vec(), b"k".to_vec(), record))];
    assert_eq!(Store::import(&path, input)??.added, 1);
    let stored = ReadOnlyStore::open(&path)?.get("s", "k")?.map(|r| r.state);
    assert_eq!(stored, Some(RecordState::Completed { outcome }));
    Ok(())
}

#[test]
fn import_refuses_an_expiry_beyond_the_retention_cap_and_adds_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("to.redb");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let record = |expires_at_ms: u64| {
        let state = RecordState::Completed {
            outcome: b"done".to_vec(),
        };
        Record::from_parts(b"fp".to_vec(), now_ms, now_ms, expires_at_ms, 1, state)
    };
    let input = [
        Ok::<_, Error>((b"s".to_vec(), b"ok".to_vec(), record(now_ms + 60_000))),
        Ok((b"s".to_vec(), b"far".to_vec(), record(u64::MAX))),
    ];
    let refused = Store::import(&path, input);
    assert!(
        matches!(
            refused,
            Err(Error::TooLarge {
                what: idemstore::Input::Retention,
                limit: idemstore::RETENTION_MS_MAX,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(ReadOnlyStore::open(&path)?.summary()?.records, 0);
    Ok(())
}

/// A store whose log holds batches its database file does not (copied while it ran, as after
/// a crash): an import sees the log's records as stored, issues tokens above the log's, and
/// leaves the counts exact.
#[test]
fn import_into_a_store_whose_log_holds_batches_sees_them_and_issues_later_tokens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live.redb");
    let store = Store::builder()
        .sweep_interval(None)
        .write_ahead_log(true)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&live)?;
    for i in 0..5 {
        let lease = acquired(store.claim("s", format!("done{i}"), "fp", &options())?);
        store.complete(&lease, b"answer", DAY)?;
    }
    let running = acquired(store.claim("s", "running", "fp", &options())?);
    let path = dir.path().join("idem.redb");
    std::fs::copy(&live, &path)?;
    std::fs::copy(
        dir.path().join("live.redb.wal"),
        dir.path().join("idem.redb.wal"),
    )?;
    drop(store);
    let own = exported(&path)?;
    assert_eq!(own.len(), 6);

    // Its own export adds nothing: every record is already stored.
    let report = Store::import(&path, own.into_iter().map(Ok::<_, Error>))??;
    assert_eq!((report.added, report.existing), (0, 6), "{report:?}");
    // An in-flight record of another store gets a token above every token this one issued.
    let other = dir.path().join("other.redb");
    {
        let store = Store::open(&other)?;
        acquired(store.claim("s", "elsewhere", "fp", &options())?);
        store.close()?;
    }
    let report = Store::import(&path, exported(&other)?.into_iter().map(Ok::<_, Error>))??;
    assert_eq!(report.added, 1, "{report:?}");
    let view = ReadOnlyStore::open(&path)?;
    match view.get("s", "elsewhere")?.ok_or("imported")?.state {
        RecordState::InFlight { token, .. } => assert!(token > running.token(), "{token}"),
        other => panic!("{other:?}"),
    }
    let verification = view.verify()?;
    assert!(verification.is_clean(), "{verification:?}");
    assert_eq!(view.summary()?.records, 7);
    Ok(())
}
