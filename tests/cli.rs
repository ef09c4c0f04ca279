//! The `idemstore` tool, run as a user runs it, on store files made by the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use idemstore::{Claim, ClaimOptions, ManualClock, ReadOnlyStore, RecordState, Store};
use redb::ReadableTable;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DAY: Duration = Duration::from_secs(86_400);
/// An outcome that is not UTF-8, to be carried byte for byte.
const OUTCOME: &[u8] = b"201 Created\r\n\xff\x00{\"id\":\"ch_1\"}";

/// Runs the tool with `args`, `stdin` as its input.
fn run_with(args: &[&str], stdin: &[u8]) -> Result<Output, std::io::Error> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemstore"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        // A command that refuses its file exits without reading its input.
        match input.write_all(stdin) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written?,
        }
    }
    child.wait_with_output()
}

fn run(args: &[&str]) -> Result<Output, std::io::Error> {
    run_with(args, b"")
}

fn code(output: &Output) -> Option<i32> {
    output.status.code()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Result<Value, serde_json::Error> {
    serde_json::from_slice(&output.stdout)
}

fn json_lines(output: &Output) -> Result<Vec<Value>, serde_json::Error> {
    stdout(output).lines().map(serde_json::from_str).collect()
}

fn b64(value: &Value) -> Vec<u8> {
    STANDARD
        .decode(value.as_str().unwrap_or_default())
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn acquired(claim: Claim) -> idemstore::Lease {
    match claim {
        Claim::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// A store at `dir/idem.redb` holding, in scope `s`: `done` (completed with [`OUTCOME`]),
/// `failed` (a retryable failure) and `old` (completed two days ago with a day's retention:
/// expired, not swept); in scope `t`: `running` (in flight, checkpoint `step-1`).
fn sample_store(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = dir.join("idem.redb");
    let options = ClaimOptions::default().retention(DAY);
    {
        let past = Store::builder()
            .clock(ManualClock::new(now_ms() - 2 * DAY.as_millis() as u64))
            .sweep_interval(None)
            .open(&path)?;
        let lease = acquired(past.claim("s", "old", "fp-old", &options)?);
        past.complete(&lease, b"old answer", DAY)?;
        past.close()?;
    }
    let store = Store::builder().sweep_interval(None).open(&path)?;
    let done = acquired(store.claim("s", "done", "fp-done", &options)?);
    store.complete(&done, OUTCOME, DAY)?;
    let failed = acquired(store.claim("s", "failed", "fp-failed", &options)?);
    store.fail(&failed)?;
    let running = acquired(store.claim("t", "running", "fp-running", &options)?);
    store.checkpoint(&running, b"step-1")?;
    store.close()?;
    Ok(path)
}

/// Overwrites one byte of the stored envelope of `(scope, key)` through redb, as a disk fault
/// inside a record would.
fn damage_envelope(path: &Path, scope: &[u8], key: &[u8]) -> TestResult {
    const RECORDS: redb::TableDefinition<&[u8], &[u8]> =
        redb::TableDefinition::new("idemstore.records");
    let db = redb::Database::open(path)?;
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(RECORDS)?;
        let mut sk = vec![u8::try_from(scope.len())?];
        sk.extend_from_slice(scope);
        sk.extend_from_slice(key);
        let mut bytes = table
            .get(sk.as_slice())?
            .ok_or("no record")?
            .value()
            .to_vec();
        if let Some(last) = bytes.last_mut() {
            *last ^= 0x40;
        }
        table.insert(sk.as_slice(), bytes.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

#[test]
fn stats_prints_the_figures_of_a_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let text = run(&["stats", p])?;
    assert_eq!(code(&text), Some(0), "{}", stderr(&text));
    let shown = stdout(&text);
    assert!(
        shown.contains("4 stored: 1 completed, 1 failed, 1 in flight, 1 expired"),
        "{shown}"
    );
    assert!(shown.contains("orphans       1"), "{shown}");

    let figures = json(&run(&["stats", p, "--json"])?)?;
    for (name, value) in [
        ("records", 4),
        ("completed", 1),
        ("failed", 1),
        ("in_flight", 1),
        ("expired", 1),
        ("damaged", 0),
        ("orphans", 1),
        ("scopes", 2),
        ("format_version", 1),
    ] {
        assert_eq!(figures[name], value, "{name}: {figures}");
    }
    assert!(figures["next_token"].as_u64() > Some(3));
    Ok(())
}

#[test]
fn get_shows_a_live_record_and_exits_6_for_none() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let text = run(&["get", p, "s", "done"])?;
    assert_eq!(code(&text), Some(0), "{}", stderr(&text));
    let shown = stdout(&text);
    assert!(shown.contains("state        completed"), "{shown}");
    assert!(
        shown.contains(r#"201 Created\r\n\xff\x00{\"id\":\"ch_1\"}"#),
        "{shown}"
    );

    let line = json(&run(&["get", p, "s", "done", "--json"])?)?;
    assert_eq!(line["state"], "completed");
    assert_eq!(b64(&line["outcome"]), OUTCOME);
    assert_eq!(b64(&line["fingerprint"]), b"fp-done");

    let running = json(&run(&["--json", "get", p, "t", "running"])?)?;
    assert_eq!(running["state"], "in-flight");
    assert_eq!(b64(&running["checkpoint"]), b"step-1");

    for key in ["absent", "old"] {
        let none = run(&["get", p, "s", key])?;
        assert_eq!(code(&none), Some(6), "{key}");
        assert!(
            stderr(&none).contains("no live record"),
            "{}",
            stderr(&none)
        );
        assert!(none.stdout.is_empty());
    }
    Ok(())
}

#[test]
fn list_filters_by_scope_state_and_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let all = run(&["list", p])?;
    assert_eq!(code(&all), Some(0), "{}", stderr(&all));
    let rows: Vec<String> = stdout(&all).lines().skip(1).map(String::from).collect();
    assert_eq!(rows.len(), 3, "live records only: {rows:?}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("completed") && r.ends_with(" done"))
    );

    let keys = |args: &[&str]| -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
        let output = run(args)?;
        assert_eq!(code(&output), Some(0), "{}", stderr(&output));
        Ok(json_lines(&output)?
            .iter()
            .map(|l| b64(&l["key"]))
            .collect())
    };
    assert_eq!(
        keys(&["list", p, "--json"])?,
        [&b"done"[..], b"failed", b"running"]
    );
    assert_eq!(keys(&["list", p, "--json", "--scope", "t"])?, [b"running"]);
    assert_eq!(
        keys(&["list", p, "--json", "--state", "failed"])?,
        [b"failed"]
    );
    assert_eq!(
        keys(&["list", p, "--json", "--state", "in-flight", "--scope", "s"])?,
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(keys(&["list", p, "--json", "--limit", "2"])?.len(), 2);
    assert_eq!(
        code(&run(&["list", p, "--state", "done"])?),
        Some(2),
        "usage error"
    );
    Ok(())
}

#[test]
fn orphans_lists_in_flight_records_with_their_checkpoints() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let text = run(&["orphans", p])?;
    assert_eq!(code(&text), Some(0), "{}", stderr(&text));
    assert!(stdout(&text).contains("1 orphans"), "{}", stdout(&text));
    let lines = json_lines(&run(&["orphans", p, "--json"])?)?;
    assert_eq!(lines.len(), 1);
    let orphan = lines.first().ok_or("one orphan")?;
    assert_eq!(b64(&orphan["key"]), b"running");
    assert_eq!(b64(&orphan["checkpoint"]), b"step-1");
    Ok(())
}

#[test]
fn sweep_removes_the_expired_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let swept = run(&["sweep", p, "--json"])?;
    assert_eq!(code(&swept), Some(0), "{}", stderr(&swept));
    assert_eq!(json(&swept)?["removed"], 1);
    let figures = json(&run(&["stats", p, "--json"])?)?;
    assert_eq!(
        (figures["records"].as_u64(), figures["expired"].as_u64()),
        (Some(3), Some(0))
    );
    let again = run(&["sweep", p])?;
    assert!(
        stdout(&again).contains("removed 0 expired records"),
        "{}",
        stdout(&again)
    );
    Ok(())
}

#[test]
fn forget_removes_a_record_so_that_the_key_runs_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let forgot = run(&["forget", p, "s", "done"])?;
    assert_eq!(code(&forgot), Some(0), "{}", stderr(&forgot));
    assert!(stdout(&forgot).starts_with("forgot"), "{}", stdout(&forgot));
    assert_eq!(code(&run(&["get", p, "s", "done"])?), Some(6));
    let again = run(&["forget", p, "s", "done", "--json"])?;
    assert_eq!(code(&again), Some(0));
    assert_eq!(json(&again)?["forgotten"], false);

    let store = Store::open(&path)?;
    acquired(store.claim("s", "done", "fp-done", &ClaimOptions::default())?);
    Ok(())
}

#[test]
fn export_then_import_round_trips_every_record_and_replays_byte_for_byte() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;
    let copy = dir.path().join("copy.redb");
    let c = copy.to_str().ok_or("path")?;

    let exported = run(&["export", p])?;
    assert_eq!(code(&exported), Some(0), "{}", stderr(&exported));
    assert_eq!(json_lines(&exported)?.len(), 3, "live records only");

    let imported = run_with(&["import", c, "--json"], &exported.stdout)?;
    assert_eq!(code(&imported), Some(0), "{}", stderr(&imported));
    let report = json(&imported)?;
    assert_eq!(
        (report["added"].as_u64(), report["in_flight"].as_u64()),
        (Some(3), Some(1))
    );

    // Every record is the same, but for the in-flight one's owner: a fresh token, epoch 0.
    let (from, to) = (ReadOnlyStore::open(&path)?, ReadOnlyStore::open(&copy)?);
    for (scope, key) in [("s", "done"), ("s", "failed"), ("t", "running")] {
        let (a, b) = (from.get(scope, key)?, to.get(scope, key)?);
        match (a.map(|r| r.state.clone()), b.as_ref().map(|r| &r.state)) {
            (
                Some(RecordState::InFlight {
                    token, checkpoint, ..
                }),
                Some(RecordState::InFlight {
                    token: new_token,
                    epoch: 0,
                    checkpoint: new_checkpoint,
                    ..
                }),
            ) => {
                assert!(*new_token > token);
                assert_eq!(&checkpoint, new_checkpoint);
            }
            _ => assert_eq!(from.get(scope, key)?, b, "{scope}/{key}"),
        }
    }
    drop((from, to));
    let again = run(&["export", c])?;
    let strip = |lines: Vec<Value>| -> Vec<Value> {
        lines
            .into_iter()
            .map(|mut l| {
                if let Some(o) = l.as_object_mut() {
                    o.remove("token");
                    o.remove("epoch");
                }
                l
            })
            .collect()
    };
    assert_eq!(strip(json_lines(&again)?), strip(json_lines(&exported)?));

    // A second import keeps what is stored.
    let twice = run_with(&["import", c, "--json"], &exported.stdout)?;
    assert_eq!(json(&twice)?["existing"], 3);

    let store = Store::open(&copy)?;
    match store.claim("s", "done", "fp-done", &ClaimOptions::default())? {
        Claim::Replay(replay) => assert_eq!(replay.outcome, OUTCOME),
        other => panic!("expected a replay, got {other:?}"),
    }
    let lease = acquired(store.claim("t", "running", "fp-running", &ClaimOptions::default())?);
    assert!(lease.is_takeover());
    assert_eq!(lease.checkpoint(), Some(&b"step-1"[..]));
    Ok(())
}

#[test]
fn import_of_unreadable_input_adds_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;
    let copy = dir.path().join("copy.redb");
    let c = copy.to_str().ok_or("path")?;
    let mut input = run(&["export", p])?.stdout;
    input.extend_from_slice(b"{\"scope\": \"not base64!\"}\n");

    let imported = run_with(&["import", c], &input)?;
    assert_eq!(code(&imported), Some(1));
    assert!(
        stderr(&imported).contains("line 4"),
        "{}",
        stderr(&imported)
    );
    assert!(stderr(&imported).contains("nothing was imported"));
    // The store the import created for it is gone again.
    assert!(!copy.exists(), "{c} was left behind");

    // Into an existing store, the same input adds nothing and leaves its records.
    let records = json(&run(&["stats", p, "--json"])?)?["records"].clone();
    let imported = run_with(&["import", p], &input)?;
    assert_eq!(code(&imported), Some(1), "{}", stderr(&imported));
    assert_eq!(json(&run(&["stats", p, "--json"])?)?["records"], records);
    Ok(())
}

#[test]
fn verify_passes_a_clean_store_and_fails_a_damaged_envelope() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;

    let clean = run(&["verify", p])?;
    assert_eq!(
        code(&clean),
        Some(0),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );
    assert!(stdout(&clean).ends_with("clean\n"), "{}", stdout(&clean));
    assert_eq!(json(&run(&["verify", p, "--json"])?)?["clean"], true);

    damage_envelope(&path, b"s", b"done")?;
    let damaged = run(&["verify", p])?;
    assert_eq!(code(&damaged), Some(3), "{}", stdout(&damaged));
    assert!(
        stdout(&damaged).contains("records/s/done"),
        "{}",
        stdout(&damaged)
    );
    let report = json(&run(&["verify", p, "--json"])?)?;
    assert_eq!(
        (report["clean"].as_bool(), report["damage_count"].as_u64()),
        (Some(false), Some(1))
    );

    // The reading commands report the damaged record instead of skipping it silently.
    assert_eq!(code(&run(&["get", p, "s", "done"])?), Some(3));
    assert_eq!(code(&run(&["list", p])?), Some(3));
    let exported = run(&["export", p])?;
    assert_eq!(code(&exported), Some(3));
    assert_eq!(
        json_lines(&exported)?.len(),
        2,
        "the damaged record is not exported"
    );
    assert_eq!(json(&run(&["stats", p, "--json"])?)?["damaged"], 1);

    // `forget` is the way out.
    assert_eq!(code(&run(&["forget", p, "s", "done"])?), Some(0));
    assert_eq!(code(&run(&["verify", p])?), Some(0));
    Ok(())
}

#[test]
fn verify_fails_a_damaged_page() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let store = Store::open(&path)?;
    // Large outcomes fill pages of their own, far from the file's header.
    for i in 0..8u8 {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &ClaimOptions::default())?);
        store.complete(&lease, &vec![i; 64 * 1024], DAY)?;
    }
    store.close()?;
    let p = path.to_str().ok_or("path")?;
    assert_eq!(code(&run(&["verify", p])?), Some(0));

    let mut bytes = std::fs::read(&path)?;
    let needle = vec![3u8; 4096];
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .ok_or("an outcome page")?;
    if let Some(b) = bytes.get_mut(at + 100) {
        *b ^= 0xff;
    }
    std::fs::write(&path, &bytes)?;
    let damaged = run(&["verify", p])?;
    assert_eq!(
        code(&damaged),
        Some(3),
        "{}{}",
        stdout(&damaged),
        stderr(&damaged)
    );
    assert!(stdout(&damaged).contains("DAMAGED"), "{}", stdout(&damaged));
    Ok(())
}

/// A log damaged before batches synced after it: `verify` reports the damage, and its JSON
/// says the pages were checked and passed (the open checks them before it reads the log).
#[test]
fn verify_reports_a_damaged_log_with_the_pages_checked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live.redb");
    let store = Store::builder()
        .sweep_interval(None)
        .write_ahead_log(true)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&live)?;
    for i in 0..10u8 {
        let lease = acquired(store.claim("s", format!("k{i}"), "fp", &ClaimOptions::default())?);
        store.complete(&lease, OUTCOME, DAY)?;
    }
    let path = dir.path().join("idem.redb");
    std::fs::copy(&live, &path)?;
    let mut log = std::fs::read(dir.path().join("live.redb.wal"))?;
    drop(store);
    // The first batch's payload: after the segment's header sector and its chunk's header.
    let segment = log.iter().position(|b| *b != 0).ok_or("an empty log")?;
    let byte = log.get_mut(segment + 512 + 100).ok_or("a short log")?;
    *byte ^= 0x40;
    std::fs::write(dir.path().join("idem.redb.wal"), &log)?;
    let p = path.to_str().ok_or("path")?;
    let damaged = run(&["verify", p, "--json"])?;
    assert_eq!(code(&damaged), Some(3), "{}", stderr(&damaged));
    let report = json(&damaged)?;
    assert_eq!(report["clean"], false, "{report}");
    assert_eq!(report["pages"], "ok", "{report}");
    let location = report["damage"][0]["location"].as_str().unwrap_or_default();
    assert!(location.contains("log"), "{report}");
    Ok(())
}

#[test]
fn a_foreign_file_is_refused_by_every_command_and_left_unchanged() -> TestResult {
    const THEIRS: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("theirs");
    let dir = tempfile::tempdir()?;
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database\n")?;
    let theirs = dir.path().join("theirs.redb");
    {
        let db = redb::Database::create(&theirs)?;
        let txn = db.begin_write()?;
        txn.open_table(THEIRS)?.insert(1, 2)?;
        txn.commit()?;
    }
    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"")?;
    for file in [&text, &theirs, &empty] {
        let before = std::fs::read(file)?;
        let f = file.to_str().ok_or("path")?;
        for args in [
            vec!["stats", f],
            vec!["get", f, "s", "k"],
            vec!["list", f],
            vec!["orphans", f],
            vec!["export", f],
            vec!["verify", f],
            vec!["sweep", f],
            vec!["compact", f],
            vec!["forget", f, "s", "k"],
        ] {
            let output = run(&args)?;
            assert_eq!(code(&output), Some(5), "{args:?}: {}", stderr(&output));
            assert!(
                stderr(&output).contains("left untouched"),
                "{}",
                stderr(&output)
            );
        }
        let imported = run_with(&["import", f], b"{}\n")?;
        assert_eq!(code(&imported), Some(5), "import into {f}");
        assert!(stderr(&imported).contains("left untouched"));
        assert_eq!(std::fs::read(file)?, before, "{f} is unchanged");
    }
    Ok(())
}

#[test]
fn a_missing_path_is_reported_and_not_created() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.redb");
    let m = missing.to_str().ok_or("path")?;
    for args in [
        vec!["stats", m],
        vec!["get", m, "s", "k"],
        vec!["list", m],
        vec!["orphans", m],
        vec!["export", m],
        vec!["verify", m],
        vec!["sweep", m],
        vec!["compact", m],
        vec!["forget", m, "s", "k"],
    ] {
        let output = run(&args)?;
        assert_eq!(code(&output), Some(5), "{args:?}");
        assert!(
            stderr(&output).contains("there is no store at"),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        0,
        "nothing was created"
    );
    // `import` creates stores: it names the directory that is missing.
    let nowhere = dir.path().join("no-such-dir").join("x.redb");
    let output = run_with(&["import", nowhere.to_str().ok_or("path")?], b"")?;
    assert_eq!(code(&output), Some(5));
    assert!(
        stderr(&output).contains("there is no directory"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn a_store_open_in_another_process_is_named_as_such() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;
    let before = std::fs::read(&path)?;
    let store = Store::open(&path)?;
    for args in [
        vec!["stats", p],
        vec!["verify", p],
        vec!["sweep", p],
        vec!["compact", p],
    ] {
        let output = run(&args)?;
        assert_eq!(code(&output), Some(4), "{args:?}");
        let message = stderr(&output);
        assert!(message.contains("is open in another process"), "{message}");
        #[cfg(target_os = "linux")]
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
    }
    store.close()?;
    assert_eq!(code(&run(&["stats", p])?), Some(0));
    drop(before);
    Ok(())
}

#[test]
fn reading_commands_leave_the_file_byte_for_byte_as_it_was() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = sample_store(dir.path())?;
    let p = path.to_str().ok_or("path")?;
    let before = std::fs::read(&path)?;
    for args in [
        vec!["stats", p],
        vec!["get", p, "s", "done"],
        vec!["list", p],
        vec!["orphans", p],
        vec!["export", p],
        vec!["verify", p],
    ] {
        assert_eq!(code(&run(&args)?), Some(0), "{args:?}");
    }
    assert_eq!(std::fs::read(&path)?, before);
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 1, "no other file");
    Ok(())
}

/// A store with a write-ahead log, copied while it runs with no checkpoint since its open:
/// the copy of the database file holds no record, its log holds them all, as after a crash.
#[test]
fn reading_commands_read_a_crashed_format_2_store_with_its_log_and_write_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live.redb");
    let store = Store::builder()
        .sweep_interval(None)
        .write_ahead_log(true)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&live)?;
    let options = ClaimOptions::default().retention(DAY);
    let done = acquired(store.claim("s", "done", "fp-done", &options)?);
    store.complete(&done, OUTCOME, DAY)?;
    acquired(store.claim("t", "running", "fp-running", &options)?);
    let crashed = dir.path().join("crashed");
    std::fs::create_dir(&crashed)?;
    let path = crashed.join("idem.redb");
    std::fs::copy(&live, &path)?;
    std::fs::copy(
        dir.path().join("live.redb.wal"),
        crashed.join("idem.redb.wal"),
    )?;
    drop(store);
    let p = path.to_str().ok_or("path")?;
    let before = (
        std::fs::read(&path)?,
        std::fs::read(crashed.join("idem.redb.wal"))?,
    );

    let figures = json(&run(&["stats", p, "--json"])?)?;
    for (name, value) in [
        ("format_version", 2),
        ("records", 2),
        ("completed", 1),
        ("in_flight", 1),
        ("log_batches", 3),
    ] {
        assert_eq!(figures[name], value, "{name}: {figures}");
    }
    let text = stdout(&run(&["stats", p])?);
    assert!(text.contains("3 batches not yet checkpointed"), "{text}");
    let line = json(&run(&["get", p, "s", "done", "--json"])?)?;
    assert_eq!(b64(&line["outcome"]), OUTCOME);
    let orphans = json_lines(&run(&["orphans", p, "--json"])?)?;
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    for args in [vec!["list", p], vec!["export", p], vec!["verify", p]] {
        let output = run(&args)?;
        assert_eq!(code(&output), Some(0), "{args:?}: {}", stderr(&output));
    }
    let after = (
        std::fs::read(&path)?,
        std::fs::read(crashed.join("idem.redb.wal"))?,
    );
    assert!(after == before, "a reading command changed a file");
    assert_eq!(std::fs::read_dir(&crashed)?.count(), 2, "no other file");

    // A writing command opens the store with its log (replaying it), and closes it cleanly:
    // the log then holds nothing more to replay.
    let forgot = run(&["forget", p, "s", "done"])?;
    assert_eq!(code(&forgot), Some(0), "{}", stderr(&forgot));
    assert_eq!(code(&run(&["get", p, "s", "done"])?), Some(6));
    let figures = json(&run(&["stats", p, "--json"])?)?;
    for (name, value) in [("records", 1), ("in_flight", 1), ("log_batches", 0)] {
        assert_eq!(figures[name], value, "{name}: {figures}");
    }
    Ok(())
}

#[test]
fn a_binary_scope_is_printed_as_hex_and_taken_back_as_an_argument() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    // The HTTP layer's scopes are often digests, not text.
    let scope = [0xca, 0x3e, 0x00, 0x0a];
    let store = Store::open(&path)?;
    let lease = acquired(store.claim(scope, "k1", "fp", &ClaimOptions::default())?);
    store.complete(&lease, b"ok", DAY)?;
    store.close()?;
    let p = path.to_str().ok_or("path")?;

    let listed = stdout(&run(&["list", p])?);
    assert!(listed.contains("hex:ca3e000a"), "{listed}");
    for arg in ["hex:ca3e000a", "b64:yj4ACg=="] {
        let shown = run(&["get", p, arg, "k1"])?;
        assert_eq!(code(&shown), Some(0), "{arg}: {}", stderr(&shown));
        assert!(stdout(&shown).contains("scope        hex:ca3e000a"));
    }
    assert_eq!(
        code(&run(&["get", p, "hex:zz", "k1"])?),
        Some(2),
        "a usage error"
    );
    assert_eq!(code(&run(&["forget", p, "hex:ca3e000a", "k1"])?), Some(0));
    assert_eq!(code(&run(&["get", p, "hex:ca3e000a", "k1"])?), Some(6));
    Ok(())
}

/// A store at `dir/<name>` whose records mostly expired and were swept, so that much of its
/// file is free: `records` records of `outcome_len` bytes in scope `s`, one in `keep_every`
/// (`keep-N`) kept for a day, the others (`gone-N`) swept after their minute. With a log, a
/// checkpoint follows every commit, so that the sweep's removals reach the database file in
/// many commits, as in a long-running store. Returns the path and the kept keys.
fn swept_store(
    dir: &Path,
    name: &str,
    log: bool,
    (records, keep_every, outcome_len): (usize, usize, usize),
) -> Result<(PathBuf, Vec<String>), Box<dyn std::error::Error>> {
    let path = dir.join(name);
    let clock = ManualClock::new(now_ms());
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .write_ahead_log(log)
        .checkpoint_interval(Duration::ZERO)
        .durability(idemstore::Durability::Relaxed {
            max_unsynced: Duration::from_secs(1),
        })
        .open(&path)?;
    let options = ClaimOptions::default().retention(DAY);
    let mut kept = Vec::new();
    for i in 0..records {
        let keep = i % keep_every == 0;
        let key = if keep {
            format!("keep-{i}")
        } else {
            format!("gone-{i}")
        };
        let lease = acquired(store.claim("s", &key, key.as_bytes(), &options)?);
        let outcome = vec![(i % 251) as u8; outcome_len];
        let retention = if keep { DAY } else { Duration::from_secs(60) };
        store.complete(&lease, &outcome, retention)?;
        if keep {
            kept.push(key);
        }
    }
    clock.advance(Duration::from_secs(120));
    while store.sweep(1024)?.more {}
    store.close()?;
    Ok((path, kept))
}

/// Every kept record of [`swept_store`] is there with its outcome, and nothing else.
fn check_kept(path: &Path, kept: &[String], outcome_len: usize) -> TestResult {
    let view = ReadOnlyStore::open(path)?;
    let summary = view.summary()?;
    assert_eq!(summary.records, kept.len() as u64, "{summary:?}");
    assert_eq!((summary.damaged, summary.expired), (0, 0), "{summary:?}");
    for key in kept {
        let i: usize = key.trim_start_matches("keep-").parse()?;
        let record = view
            .get("s", key)?
            .ok_or_else(|| format!("{key} is missing"))?;
        match record.state {
            RecordState::Completed { outcome } => {
                assert_eq!(outcome, vec![(i % 251) as u8; outcome_len], "{key}");
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn compact_gives_back_the_free_space_of_a_swept_store_and_keeps_every_record() -> TestResult {
    const OUTCOME_LEN: usize = 2048;
    let dir = tempfile::tempdir()?;
    for (name, log) in [("f1.redb", false), ("f2.redb", true)] {
        let (path, kept) = swept_store(dir.path(), name, log, (3_000, 10, OUTCOME_LEN))?;
        let p = path.to_str().ok_or("path")?;
        let stats = json(&run(&["stats", p, "--json"])?)?;
        let (file, free) = (
            stats["file_bytes"].as_u64().ok_or("file_bytes")?,
            stats["free_bytes"].as_u64().ok_or("free_bytes")?,
        );
        assert!(free * 2 > file, "{name}: mostly free before: {stats}");

        let output = run(&["compact", p, "--json"])?;
        assert_eq!(code(&output), Some(0), "{name}: {}", stderr(&output));
        let done = json(&output)?;
        let (before, after) = (
            done["bytes_before"].as_u64().ok_or("bytes_before")?,
            done["bytes_after"].as_u64().ok_or("bytes_after")?,
        );
        assert_eq!(std::fs::metadata(&path)?.len(), after, "{name}");
        assert_eq!(done["compacted"], true, "{name}: {done}");
        assert!(after * 2 < before, "{name}: {before} -> {after}");
        let stats = json(&run(&["stats", p, "--json"])?)?;
        assert!(
            stats["free_bytes"].as_u64().ok_or("free_bytes")? * 4 < after,
            "{name}: little free after: {stats}"
        );
        assert_eq!(stats["format_version"], if log { 2 } else { 1 }, "{name}");
        check_kept(&path, &kept, OUTCOME_LEN)?;
        let verify = run(&["verify", p])?;
        assert_eq!(code(&verify), Some(0), "{name}: {}", stdout(&verify));

        // The store goes on working: a kept key replays, a swept one runs again.
        let store = Store::open(&path)?;
        let options = ClaimOptions::default().retention(DAY);
        assert!(matches!(
            store.claim("s", "keep-0", "keep-0", &options)?,
            Claim::Replay(_)
        ));
        assert!(matches!(
            store.claim("s", "gone-1", "gone-1", &options)?,
            Claim::Acquired(_)
        ));
        store.close()?;
        // The file grew back at that open (nothing was free), but stays shorter than it was.
        let reopened = std::fs::metadata(&path)?.len();
        assert!(
            reopened < before,
            "{name}: {before} -> {after} -> {reopened}"
        );

        // Compacted again right away, it is left as it is: it would only grow back.
        let records = json(&run(&["stats", p, "--json"])?)?["records"].clone();
        let output = run(&["compact", p, "--json"])?;
        assert_eq!(code(&output), Some(0), "{name}: {}", stderr(&output));
        let again = json(&output)?;
        assert_eq!(again["compacted"], false, "{name}: {again}");
        assert_eq!(
            again["bytes_after"], again["bytes_before"],
            "{name}: {again}"
        );
        assert_eq!(
            Some(std::fs::metadata(&path)?.len()),
            again["bytes_after"].as_u64(),
            "{name}"
        );
        assert!(std::fs::metadata(&path)?.len() <= reopened, "{name}");
        let output = run(&["compact", p])?;
        assert_eq!(code(&output), Some(0), "{name}: {}", stderr(&output));
        assert!(
            stdout(&output).contains("did not compact"),
            "{}",
            stdout(&output)
        );
        let stats = json(&run(&["stats", p, "--json"])?)?;
        assert_eq!(stats["records"], records, "{name}: {stats}");
    }
    Ok(())
}

/// `idemstore compact` killed (SIGKILL) at moments spread over its run, each time on a fresh
/// copy of a swept store: every copy opens, passes its page checks and holds exactly the kept
/// records, with no swept record back and the next token never lower.
#[test]
fn a_compaction_killed_at_any_moment_leaves_every_record() -> TestResult {
    const OUTCOME_LEN: usize = 4096;
    const KILLS: u32 = 12;
    let dir = tempfile::tempdir()?;
    for (name, log) in [("f1.redb", false), ("f2.redb", true)] {
        let (path, kept) = swept_store(dir.path(), name, log, (6_000, 3, OUTCOME_LEN))?;
        let next_token = ReadOnlyStore::open(&path)?.next_token();
        let copy = |to: &Path| -> Result<(), std::io::Error> {
            std::fs::copy(&path, to)?;
            if log {
                let mut from_log = path.clone().into_os_string();
                from_log.push(".wal");
                let mut to_log = to.to_path_buf().into_os_string();
                to_log.push(".wal");
                std::fs::copy(from_log, to_log)?;
            }
            Ok(())
        };
        // How long a whole run takes here, to spread the kills over it.
        let timed = dir.path().join(format!("timed-{name}"));
        copy(&timed)?;
        let began = std::time::Instant::now();
        let output = run(&["compact", timed.to_str().ok_or("path")?])?;
        assert_eq!(code(&output), Some(0), "{}", stderr(&output));
        let whole = began.elapsed();
        let (mut changed, mut shrunk) = (0, 0);
        for k in 0..KILLS {
            let target = dir.path().join(format!("kill-{k}-{name}"));
            copy(&target)?;
            let before = std::fs::read(&target)?;
            let mut child = Command::new(env!("CARGO_BIN_EXE_idemstore"))
                .args(["compact", target.to_str().ok_or("path")?])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            std::thread::sleep(whole * k / KILLS);
            child.kill()?;
            child.wait()?;
            check_kept(&target, &kept, OUTCOME_LEN)?;
            assert!(
                ReadOnlyStore::open(&target)?.next_token() >= next_token,
                "{name}, kill {k}: the next token went back"
            );
            let after = std::fs::read(&target)?;
            changed += u32::from(after != before);
            shrunk += u32::from(after.len() < before.len());
            // A compaction after the kill finishes the job.
            let output = run(&["compact", target.to_str().ok_or("path")?])?;
            assert_eq!(code(&output), Some(0), "{}", stderr(&output));
            check_kept(&target, &kept, OUTCOME_LEN)?;
            std::fs::remove_file(&target)?;
        }
        eprintln!(
            "{name}: a whole run {whole:?}; of {KILLS} kills, {changed} came after the file \
             changed, {shrunk} after it shrank"
        );
    }
    Ok(())
}

/// A reader that stops early (`idemstore export F | head`) ends the command quietly, with
/// status 0, as it ends other command-line tools.
#[test]
fn output_to_a_reader_that_went_away_ends_quietly() -> TestResult {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let (path, _) = swept_store(dir.path(), "big.redb", false, (2_000, 1, 2048))?;
    let p = path.to_str().ok_or("path")?;
    for args in [
        vec!["export", p],
        vec!["list", p],
        vec!["--json", "list", p],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idemstore"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().ok_or("stdout")?).read_line(&mut first)?;
        assert!(!first.is_empty(), "{args:?}");
        // The pipe's reading end is closed here, long before the output ends.
        let output = child.wait_with_output()?;
        assert_eq!(code(&output), Some(0), "{args:?}: {}", stderr(&output));
        assert_eq!(stderr(&output), "", "{args:?}");
    }
    Ok(())
}
