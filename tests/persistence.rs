//! A file store keeps what it acknowledged across reopen; each open is a new process epoch;
//! files that are not idemstore databases are refused untouched; corrupt bytes are reported.

mod common;

use std::time::Duration;

use common::*;
use idemstore::{Claim, Error, RecordState, Store};
use redb::{ReadableDatabase, ReadableTable};

#[test]
fn completed_records_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = file_store(&path, &clock);
        for i in 0..100u32 {
            let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(1_000))?);
            store.complete(&lease, &i.to_le_bytes(), DAY)?;
        }
        store.close()?;
    }
    let store = file_store(&path, &clock);
    for i in 0..100u32 {
        let r = replay(store.claim("s", format!("k{i}"), "fp", &opts(1_000))?);
        assert_eq!(r.outcome, i.to_le_bytes());
    }
    assert_eq!(store.stats()?.records, 100);
    Ok(())
}

#[test]
fn each_open_starts_a_new_epoch_and_tokens_keep_increasing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let mut last_token = 0;
    for expected_epoch in 1..=4u64 {
        let store = file_store(&path, &clock);
        assert_eq!(store.epoch(), expected_epoch);
        for i in 0..3 {
            let lease =
                acquired(store.claim("s", format!("{expected_epoch}-{i}"), "fp", &opts(1_000))?);
            assert!(
                lease.token() > last_token,
                "token {} after {last_token}",
                lease.token()
            );
            last_token = lease.token();
        }
    }
    Ok(())
}

#[test]
fn a_second_store_on_the_same_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let _first = file_store(&path, &clock);
    let second = Store::builder().clock(clock.clone()).open(&path);
    assert!(matches!(second, Err(Error::AlreadyOpen)), "{second:?}");
    Ok(())
}

#[test]
fn opening_a_file_that_is_not_a_database_is_refused_and_leaves_it_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    for contents in [&b"hello, world\n"[..], &[0u8; 5000][..], b"redb"] {
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, contents)?;
        let result = Store::open(&path);
        assert!(
            matches!(result, Err(Error::NotAnIdemstoreFile { .. })),
            "{result:?}"
        );
        assert!(std::fs::read(&path)? == contents, "the file was modified");
    }
    let result = Store::open(dir.path());
    assert!(
        matches!(result, Err(Error::NotAnIdemstoreFile { .. })),
        "{result:?}"
    );
    Ok(())
}

/// Writes a redb database with a table of its own at `path`; returns it still open.
fn foreign_database(path: &std::path::Path) -> Result<redb::Database, Box<dyn std::error::Error>> {
    const THEIRS: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("theirs");
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    txn.open_table(THEIRS)?.insert(1, 2)?;
    txn.commit()?;
    Ok(db)
}

/// Opens `path` as a store, which must be refused as not ours, and checks that the file is
/// byte for byte as it was.
fn assert_refused_untouched(path: &std::path::Path) -> TestResult {
    let before = std::fs::read(path)?;
    let result = Store::open(path);
    assert!(
        matches!(result, Err(Error::NotAnIdemstoreFile { .. })),
        "{result:?}"
    );
    assert!(std::fs::read(path)? == before, "the file was modified");
    Ok(())
}

/// Set by `a_foreign_redb_database_left_unclean_by_a_crash_is_refused_untouched` for its child.
const FOREIGN_CHILD_ENV: &str = "IDEMSTORE_FOREIGN_CHILD_DB";

/// The child process: writes a foreign redb database and dies without closing it, so that the
/// file needs redb's repair before it can be opened. A no-op test unless the parent set it up.
#[test]
fn foreign_crash_child() -> TestResult {
    let Ok(path) = std::env::var(FOREIGN_CHILD_ENV) else {
        return Ok(());
    };
    let _db = foreign_database(std::path::Path::new(&path))?;
    std::process::abort();
}

#[test]
fn a_foreign_redb_database_left_unclean_by_a_crash_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other.redb");
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "foreign_crash_child", "--nocapture"])
        .env(FOREIGN_CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    assert!(
        !status.success(),
        "the child dies without closing the database"
    );
    // The file really needs repair: redb refuses a read-only open of it.
    assert!(matches!(
        redb::ReadOnlyDatabase::open(&path),
        Err(redb::DatabaseError::RepairAborted)
    ));
    assert_refused_untouched(&path)
}

#[test]
fn opening_a_foreign_redb_database_is_refused_and_leaves_it_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other.redb");
    drop(foreign_database(&path)?);
    assert_refused_untouched(&path)
}

#[test]
fn an_open_that_fails_on_the_file_names_it_and_keeps_the_error_kind() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("no-such-dir").join("idem.redb");
    let Err(e) = Store::open(&path) else {
        panic!("a store cannot be created in a missing directory");
    };
    let Error::Io(io) = &e else {
        panic!("an I/O error, not {e:?}");
    };
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    assert!(!path.exists());
    Ok(())
}

#[test]
fn opening_a_database_of_an_unknown_format_version_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    drop(file_store(&path, &clock()));
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("idemstore.meta");
    {
        let db = redb::Database::open(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?
            .insert("format_version", 99u64.to_le_bytes().as_slice())?;
        txn.commit()?;
    }
    let result = Store::open(&path);
    assert!(
        matches!(
            result,
            Err(Error::UnsupportedFormat {
                found: 99,
                supported: idemstore::FORMAT_VERSION
            })
        ),
        "{result:?}"
    );
    Ok(())
}

const RECORDS: redb::TableDefinition<&[u8], &[u8]> =
    redb::TableDefinition::new("idemstore.records");

/// Overwrites the stored envelope of `(scope, key)` through redb, as a disk fault would.
fn overwrite_envelope(
    path: &std::path::Path,
    scope: &[u8],
    key: &[u8],
    f: impl Fn(&mut Vec<u8>),
) -> TestResult {
    let db = redb::Database::open(path)?;
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(RECORDS)?;
        let mut sk = vec![u8::try_from(scope.len())?];
        sk.extend_from_slice(scope);
        sk.extend_from_slice(key);
        let mut bytes = table
            .get(sk.as_slice())?
            .expect("record exists")
            .value()
            .to_vec();
        f(&mut bytes);
        table.insert(sk.as_slice(), bytes.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

#[test]
fn corrupt_envelope_is_reported_never_replayed_and_forget_clears_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = file_store(&path, &clock);
        for key in ["bad", "good"] {
            let lease = acquired(store.claim("s", key, "fp", &opts(1_000))?);
            store.complete(&lease, b"the real outcome", DAY)?;
        }
    }
    // Flip one bit in the outcome bytes: the CRC catches it.
    overwrite_envelope(&path, b"s", b"bad", |b| {
        let last = b.len() - 1;
        b[last] ^= 0x04;
    })?;
    let store = file_store(&path, &clock);
    assert!(matches!(store.get("s", "bad"), Err(Error::Corrupt { .. })));
    let claim = store.claim("s", "bad", "fp", &opts(1_000));
    assert!(matches!(claim, Err(Error::Corrupt { .. })), "{claim:?}");
    // The neighbour is unaffected.
    assert_eq!(
        replay(store.claim("s", "good", "fp", &opts(1_000))?).outcome,
        b"the real outcome"
    );
    // The corrupt record is not silently overwritten by a new claim, only by forget.
    assert!(store.forget("s", "bad")?);
    assert_eq!(
        acquired(store.claim("s", "bad", "fp", &opts(1_000))?).attempt(),
        1
    );
    Ok(())
}

#[test]
fn a_corrupt_record_past_its_retention_is_swept_and_frees_its_quota() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let builder = || {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .limits(idemstore::Limits::default().max_records_per_scope(1))
    };
    {
        let store = builder().open(&path)?;
        let lease = acquired(store.claim("s", "bad", "fp", &opts(1_000))?);
        store.complete(&lease, b"the real outcome", Duration::from_secs(60))?;
    }
    overwrite_envelope(&path, b"s", b"bad", |b| {
        let last = b.len() - 1;
        b[last] ^= 0x04;
    })?;
    let store = builder().open(&path)?;
    assert!(matches!(store.get("s", "bad"), Err(Error::Corrupt { .. })));
    // Before its retention ends the damaged record stays (reported, never replayed).
    assert_eq!(store.sweep(100)?.removed, 0);
    assert_eq!(store.scope_records("s")?, 1);
    clock.advance(Duration::from_secs(61));
    let swept = store.sweep(100)?;
    assert_eq!((swept.visited, swept.removed), (1, 1));
    assert_eq!(store.scope_records("s")?, 0);
    assert_eq!(store.stats()?.records, 0);
    // The quota it held is free again.
    acquired(store.claim("s", "new", "fp", &opts(1_000))?);
    Ok(())
}

#[test]
fn every_truncation_of_a_stored_envelope_is_a_typed_corruption_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let full_len = {
        let store = file_store(&path, &clock);
        let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
        store.complete(&lease, b"outcome", DAY)?;
        drop(store);
        let db = redb::Database::open(&path)?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        table
            .get(&b"\x01sk"[..])?
            .map(|g| g.value().len())
            .expect("record")
    };
    for len in 0..full_len {
        overwrite_envelope(&path, b"s", b"k", |b| {
            if b.len() > len {
                b.truncate(len);
            }
        })?;
        let store = file_store(&path, &clock);
        assert!(
            matches!(store.get("s", "k"), Err(Error::Corrupt { .. })),
            "len {len}"
        );
    }
    Ok(())
}

#[test]
fn committed_fixture_of_format_version_1_still_opens_and_replays() -> TestResult {
    // tests/fixtures/v1.redb was written by format version 1 (see `write_fixture` below) and
    // is never regenerated: every later version must open it.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v1.redb");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1.redb"),
        &path,
    )?;
    let clock = clock();
    let store = file_store(&path, &clock);
    assert_eq!(
        replay(store.claim("tenant", "completed", "fp-1", &opts(1_000))?).outcome,
        b"fixture outcome"
    );
    assert_eq!(
        store.claim("tenant", "completed", "other", &opts(1_000))?,
        Claim::Mismatch
    );
    let failed = acquired(store.claim("tenant", "failed", "fp-2", &opts(1_000))?);
    assert_eq!(
        (failed.attempt(), failed.checkpoint()),
        (2, Some(&b"fixture checkpoint"[..]))
    );
    let orphan = acquired(store.claim("tenant", "in-flight", "fp-3", &opts(1_000))?);
    assert!(
        orphan.is_takeover(),
        "an in-flight record of an earlier epoch is an orphan"
    );
    assert_eq!(store.scope_records("tenant")?, 3);
    let record = store.get("tenant", "completed")?.expect("fixture record");
    assert_eq!(record.created_at_ms, T0_MS);
    assert!(matches!(record.state, RecordState::Completed { .. }));
    Ok(())
}

/// Writes `tests/fixtures/v1.redb`. Run once per format version, by hand:
/// `cargo test --test persistence -- --ignored write_fixture`.
#[test]
#[ignore = "writes the committed fixture; run by hand for a new format version only"]
fn write_fixture() -> TestResult {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v1.redb"
    ));
    std::fs::create_dir_all(path.parent().expect("fixture dir"))?;
    let _ = std::fs::remove_file(path);
    let store = Store::builder()
        .clock(clock())
        .sweep_interval(None)
        .limits(idemstore::Limits::default().max_retention(Duration::from_secs(10 * 366 * 86_400)))
        .open(path)?;
    let ten_years = Duration::from_secs(10 * 365 * 86_400);
    let long = idemstore::ClaimOptions::default()
        .lease(Duration::from_secs(3_600))
        .retention(ten_years);
    let lease = acquired(store.claim("tenant", "completed", "fp-1", &long)?);
    store.complete(&lease, b"fixture outcome", ten_years)?;
    let lease = acquired(store.claim("tenant", "failed", "fp-2", &long)?);
    store.checkpoint(&lease, b"fixture checkpoint")?;
    store.fail(&lease)?;
    let _lease = acquired(store.claim("tenant", "in-flight", "fp-3", &long)?);
    store.close()?;
    Ok(())
}

#[test]
fn committed_fixture_of_format_version_2_still_opens_and_replays_its_log() -> TestResult {
    // tests/fixtures/v2.redb and v2.redb.wal were written by format version 2 with a write-ahead
    // log (see `write_fixture_v2` below): "checkpointed" is in the database file, "logged" and
    // "in-flight" only in the log. Never regenerated: every later version must open them.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v2.redb");
    for name in ["v2.redb", "v2.redb.wal"] {
        std::fs::copy(
            format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR")),
            dir.path().join(name),
        )?;
    }
    let clock = clock();
    let store = file_store(&path, &clock);
    for key in ["checkpointed", "logged"] {
        assert_eq!(
            replay(store.claim("tenant", key, "fp", &opts(1_000))?).outcome,
            format!("fixture outcome {key}").as_bytes()
        );
    }
    let orphan = acquired(store.claim("tenant", "in-flight", "fp", &opts(1_000))?);
    assert!(orphan.is_takeover());
    assert_eq!(store.scope_records("tenant")?, 3);
    assert!(store.stats()?.wal.is_some());
    Ok(())
}

/// Writes `tests/fixtures/v2.redb` and its log. Run once per format version, by hand:
/// `cargo test --test persistence -- --ignored write_fixture_v2`. The process ends without
/// closing the store, so that the last batches stay in the log only.
#[test]
#[ignore = "writes the committed fixture; run by hand for a new format version only"]
fn write_fixture_v2() -> TestResult {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let path = dir.join("v2.redb");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(dir.join("v2.redb.wal"));
    let ten_years = Duration::from_secs(10 * 365 * 86_400);
    let long = idemstore::ClaimOptions::default()
        .lease(Duration::from_secs(3_600))
        .retention(ten_years);
    let builder = || {
        Store::builder()
            .clock(clock())
            .sweep_interval(None)
            .limits(
                idemstore::Limits::default().max_retention(Duration::from_secs(10 * 366 * 86_400)),
            )
            .write_ahead_log(true)
            .wal_segment_bytes(idemstore::WAL_SEGMENT_BYTES_MIN)
            .wal_segments(2)
            .checkpoint_interval(Duration::from_secs(3_600))
    };
    let store = builder().open(&path)?;
    let lease = acquired(store.claim("tenant", "checkpointed", "fp", &long)?);
    store.complete(&lease, b"fixture outcome checkpointed", ten_years)?;
    store.close()?;
    let store = builder().open(&path)?;
    let lease = acquired(store.claim("tenant", "logged", "fp", &long)?);
    store.complete(&lease, b"fixture outcome logged", ten_years)?;
    let _lease = acquired(store.claim("tenant", "in-flight", "fp", &long)?);
    assert!(
        store
            .stats()?
            .wal
            .is_some_and(|w| w.checkpoint_lag_batches == 3)
    );
    // Acknowledged at `Immediate`: in the log, synced. No close, no last checkpoint.
    std::mem::forget(store);
    Ok(())
}

#[test]
fn relaxed_durability_acknowledges_and_flush_makes_it_durable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .durability(idemstore::Durability::Relaxed {
                max_unsynced: Duration::from_secs(3_600),
            })
            .open(&path)?;
        let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
        store.complete(&lease, b"relaxed", DAY)?;
        // Readers see the acknowledged write at once.
        assert!(store.get("s", "k")?.is_some());
        store.flush()?;
        let commits = store.stats()?.commits;
        assert!(commits >= 3, "claim, complete, flush: {commits} commits");
    }
    let store = file_store(&path, &clock);
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?).outcome,
        b"relaxed"
    );
    Ok(())
}

/// A lone blocking caller commits its own operation (no commit was running), unsynced at
/// `Relaxed`: the sync still follows within `max_unsynced`, without another write or a flush.
#[test]
fn a_relaxed_write_of_a_lone_caller_is_synced_within_its_window() -> TestResult {
    for log in [false, true] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("idem.redb");
        let store = Store::builder()
            .clock(clock())
            .sweep_interval(None)
            .write_ahead_log(log)
            .durability(idemstore::Durability::Relaxed {
                max_unsynced: Duration::from_millis(50),
            })
            .open(&path)?;
        // Whatever the open synced is behind us once the first window has passed.
        std::thread::sleep(Duration::from_millis(200));
        let synced = |s: &idemstore::Stats| s.wal.as_ref().map_or(s.commits, |w| w.log_syncs);
        let before = store.stats()?;
        let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
        store.complete(&lease, b"relaxed", DAY)?;
        let written = store.stats()?;
        assert_eq!(written.commits, before.commits + 2, "log {log}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now = store.stats()?;
            if synced(&now) > synced(&written) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "log {log}: no sync followed the relaxed writes ({now:?})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[test]
fn two_phase_commit_stores_the_same_data() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    {
        let store = Store::builder()
            .clock(clock.clone())
            .two_phase_commit(true)
            .open(&path)?;
        let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
        store.complete(&lease, b"2pc", DAY)?;
    }
    let store = Store::builder()
        .clock(clock.clone())
        .verify_on_open(true)
        .open(&path)?;
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?).outcome,
        b"2pc"
    );
    Ok(())
}

#[test]
fn closed_store_releases_the_file_for_the_next_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    file_store(&path, &clock).close()?;
    file_store(&path, &clock).close()?;
    Ok(())
}
