//! `idemstore`: look inside, verify, clean and move an idemstore store file.
//!
//! Built with the `cli` feature: `cargo install idemstore --features cli`, or from a checkout
//! `cargo run --release --features cli --bin idemstore -- stats PATH`.
//!
//! The reading commands (`stats`, `get`, `list`, `orphans`, `export`, `verify`) open the file
//! read-only: they create nothing and write nothing. The writing ones (`sweep`, `compact`,
//! `forget`, `import`) open it as a store does. Either kind needs a file that no process has open for
//! writing (a store holds its file exclusively); both refuse a file that is not a store and
//! leave it untouched.

#![forbid(unsafe_code)]

// The tool's modules live beside it in `idemstore/`.
#[path = "idemstore/holder.rs"]
mod holder;
#[path = "idemstore/json.rs"]
mod json;
#[path = "idemstore/show.rs"]
mod show;

use std::io::{self, BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use idemstore::{Error, ReadOnlyStore, Record, RecordState, Store};
use serde_json::json;

/// Exit statuses, as `--help` lists them.
mod status {
    pub const OK: u8 = 0;
    /// An error not listed below (I/O, unreadable import input).
    pub const ERROR: u8 = 1;
    // 2: a usage error, reported by clap.
    /// Damage found: `verify`, or damaged records met by `list`/`export`/`get`.
    pub const DAMAGE: u8 = 3;
    /// The store is open in another process.
    pub const BUSY: u8 = 4;
    /// No store at the path: missing, or a file that is not an idemstore store.
    pub const NOT_A_STORE: u8 = 5;
    /// `get`: no live record under the key.
    pub const NOT_FOUND: u8 = 6;
}

const AFTER_HELP: &str = "\
Exit status: 0 success; 1 error; 2 usage error; 3 damage found (verify, or a damaged record
met by get/list/export); 4 the store is open in another process; 5 no store at PATH (missing,
or not an idemstore file: left untouched); 6 get found no live record.

SCOPE and KEY are taken as text; give bytes as hex:<hex digits> or b64:<base64>. Text output
prints a scope or key that is not printable text as hex:..., which these arguments take back.
Byte strings in JSON (scope, key, fingerprint, outcome, checkpoint) are standard base64.";

#[derive(Parser, Debug)]
#[command(name = "idemstore", version, about = "Inspect and maintain an idemstore store file", after_help = AFTER_HELP)]
struct Cli {
    /// Print JSON instead of text (one object, or JSON Lines for record lists).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Record counts by state, table sizes, epoch and next fencing token.
    Stats { path: PathBuf },
    /// The live record of SCOPE and KEY (exit 6 if there is none).
    Get {
        path: PathBuf,
        #[arg(value_parser = show::parse_ident)]
        scope: Ident,
        #[arg(value_parser = show::parse_ident)]
        key: Ident,
    },
    /// Live records in stored order (by scope length, then scope, then key), optionally of
    /// one scope or state.
    List {
        path: PathBuf,
        /// Only records of this scope.
        #[arg(long, value_parser = show::parse_ident)]
        scope: Option<Ident>,
        /// Only records in this state.
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// In-flight records whose owner is gone: requests that may have run without completing.
    Orphans {
        path: PathBuf,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Remove every expired record now (writes; the file must not be open elsewhere).
    Sweep { path: PathBuf },
    /// Give the file's free space back to the file system (writes; the file must not be open
    /// elsewhere).
    ///
    /// The file grows when commits rewrite much of it and never shrinks by itself: after a
    /// large sweep most of it can be free (`stats` shows how much). Records are unchanged; a
    /// kill at any moment leaves a store that opens with every record.
    Compact { path: PathBuf },
    /// Remove the record of SCOPE and KEY, so that the key runs again (writes).
    Forget {
        path: PathBuf,
        #[arg(value_parser = show::parse_ident)]
        scope: Ident,
        #[arg(value_parser = show::parse_ident)]
        key: Ident,
    },
    /// Every live record as JSON Lines on stdout (damaged records are reported on stderr).
    Export { path: PathBuf },
    /// Add records from `export`'s JSON Lines on stdin, in one commit (creates PATH if missing).
    ///
    /// Live keys already in the store keep their record; expired records are skipped;
    /// in-flight records come in as orphans (epoch 0, a fresh fencing token), so no earlier
    /// lease can write to them and the first claim with their fingerprint takes them over.
    Import { path: PathBuf },
    /// Check every page checksum, every record envelope and the tables' invariants (exit 3 on
    /// damage).
    Verify { path: PathBuf },
}

/// A scope or key given on the command line (see `AFTER_HELP`).
type Ident = Vec<u8>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StateFilter {
    InFlight,
    Completed,
    Failed,
}

impl StateFilter {
    fn admits(self, state: &RecordState) -> bool {
        matches!(
            (self, state),
            (StateFilter::InFlight, RecordState::InFlight { .. })
                | (StateFilter::Completed, RecordState::Completed { .. })
                | (StateFilter::Failed, RecordState::Failed { .. })
        )
    }
}

/// Why a command stopped: its message and exit status.
struct Failure {
    status: u8,
    message: String,
}

type Outcome = Result<u8, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("idemstore: {}", failure.message);
            }
            ExitCode::from(failure.status)
        }
    }
}

fn run(cli: &Cli) -> Outcome {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let status = match &cli.command {
        Command::Stats { path } => stats(&mut out, path, cli.json),
        Command::Get { path, scope, key } => get(&mut out, path, scope, key, cli.json),
        Command::List {
            path,
            scope,
            state,
            limit,
        } => list(&mut out, path, scope.as_deref(), *state, *limit, cli.json),
        Command::Orphans { path, limit } => orphans(&mut out, path, *limit, cli.json),
        Command::Sweep { path } => sweep(&mut out, path, cli.json),
        Command::Compact { path } => compact(&mut out, path, cli.json),
        Command::Forget { path, scope, key } => forget(&mut out, path, scope, key, cli.json),
        Command::Export { path } => export(&mut out, path),
        Command::Import { path } => import(&mut out, path, cli.json),
        Command::Verify { path } => verify(&mut out, path, cli.json),
    }?;
    out.flush().map_err(|e| io_failure(&e))?;
    Ok(status)
}

fn io_failure(e: &io::Error) -> Failure {
    output_failure(Some(e.kind()), e)
}

/// A failure to write the output. A reader that went away (`idemstore export F | head`) is
/// no error: the command stops there, quietly, with status 0.
fn output_failure(kind: Option<io::ErrorKind>, e: &dyn std::fmt::Display) -> Failure {
    if kind == Some(io::ErrorKind::BrokenPipe) {
        return Failure {
            status: status::OK,
            message: String::new(),
        };
    }
    Failure {
        status: status::ERROR,
        message: format!("cannot write the output: {e}"),
    }
}

/// The message and status of a store error met on the file at `path`.
fn failure(path: &Path, e: Error) -> Failure {
    let shown = path.display();
    let (status, message) = match e {
        Error::AlreadyOpen => (
            status::BUSY,
            format!(
                "the store {shown} is open in another process ({}); stop that process first: a \
                 process with a store open holds its file exclusively, readers included",
                holder::describe(path)
            ),
        ),
        Error::NotAnIdemstoreFile { reason, .. } => (
            status::NOT_A_STORE,
            format!("{shown} is not an idemstore store ({reason}); it was left untouched"),
        ),
        Error::UnsupportedFormat { found, supported } => (
            status::NOT_A_STORE,
            format!(
                "{shown} is a store of format {found}; this build reads format {supported}; it \
                 was left untouched"
            ),
        ),
        Error::Io(io) if io.kind() == io::ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let message = match parent {
                // (`import`, which creates stores, meets this when the directory is missing.)
                Some(dir) if !dir.is_dir() => format!(
                    "there is no directory {} for the store {shown} (nothing was created)",
                    dir.display()
                ),
                _ => format!("there is no store at {shown} (nothing was created)"),
            };
            (status::NOT_A_STORE, message)
        }
        Error::Corrupt { location, reason } => (
            status::DAMAGE,
            format!("{shown} is damaged: {location}: {reason}"),
        ),
        other => (status::ERROR, format!("{shown}: {other}")),
    };
    Failure { status, message }
}

fn open(path: &Path) -> Result<ReadOnlyStore, Failure> {
    ReadOnlyStore::open(path).map_err(|e| failure(path, e))
}

/// Opens the store at `path` for writing, refusing (without creating anything) a path where
/// there is no store yet: a missing or empty file would otherwise become a new store.
fn open_for_writing(path: &Path) -> Result<Store, Failure> {
    match std::fs::metadata(path) {
        Err(e) => return Err(failure(path, Error::from(e))),
        Ok(m) if m.is_file() && m.len() == 0 => return Err(empty_file(path)),
        Ok(_) => {}
    }
    Store::builder()
        .sweep_interval(None)
        .open(path)
        .map_err(|e| failure(path, e))
}

/// The refusal of an empty file at `path`, which opening as a store would initialise.
fn empty_file(path: &Path) -> Failure {
    failure(
        path,
        Error::NotAnIdemstoreFile {
            path: path.to_path_buf(),
            reason: "it is empty".into(),
        },
    )
}

fn write_line(out: &mut impl Write, line: &impl serde::Serialize) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, line).map_err(|e| output_failure(e.io_error_kind(), &e))?;
    writeln!(out).map_err(|e| io_failure(&e))
}

fn record_line(scope: &[u8], key: &[u8], record: &Record) -> Result<json::Line, Failure> {
    json::Line::new(scope, key, record).map_err(|message| Failure {
        status: status::ERROR,
        message,
    })
}

fn stats(out: &mut impl Write, path: &Path, as_json: bool) -> Outcome {
    let store = open(path)?;
    let s = store.summary().map_err(|e| failure(path, e))?;
    if as_json {
        let value = json!({
            "path": path.display().to_string(),
            "file_bytes": s.file_bytes,
            "free_bytes": s.free_bytes,
            "format_version": s.format_version,
            "log_file_bytes": s.log_file_bytes,
            "log_batches": s.log_batches,
            "epoch": s.epoch,
            "next_token": s.next_token,
            "records": s.records,
            "expiry_entries": s.expiry_entries,
            "scopes": s.scopes,
            "in_flight": s.in_flight,
            "completed": s.completed,
            "failed": s.failed,
            "expired": s.expired,
            "damaged": s.damaged,
            "orphans": s.in_flight,
        });
        write_line(out, &value)?;
        return Ok(status::OK);
    }
    let log = if s.format_version >= 2 {
        format!(
            "log           {} ({} batches not yet checkpointed, read with the file)\n",
            show::size(s.log_file_bytes),
            s.log_batches
        )
    } else {
        String::new()
    };
    let text = format!(
        "store         {} ({}, format {}; {} of it free, see `compact`)\n\
         {log}\
         records       {} stored: {} completed, {} failed, {} in flight, {} expired awaiting a sweep, {} damaged\n\
         orphans       {} (no process has the file open: every in-flight record has lost its owner)\n\
         scopes        {}\n\
         expiry index  {} entries\n\
         epoch         {} (of the last open for writing)\n\
         next token    {}\n",
        path.display(),
        show::size(s.file_bytes),
        s.format_version,
        show::size(s.free_bytes),
        s.records,
        s.completed,
        s.failed,
        s.in_flight,
        s.expired,
        s.damaged,
        s.in_flight,
        s.scopes,
        s.expiry_entries,
        s.epoch,
        s.next_token,
    );
    out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    Ok(status::OK)
}

fn get(out: &mut impl Write, path: &Path, scope: &[u8], key: &[u8], as_json: bool) -> Outcome {
    let store = open(path)?;
    let Some(record) = store.get(scope, key).map_err(|e| failure(path, e))? else {
        return Err(Failure {
            status: status::NOT_FOUND,
            message: format!(
                "no live record under scope {}, key {} in {}",
                show::ident(scope),
                show::ident(key),
                path.display()
            ),
        });
    };
    if as_json {
        write_line(out, &record_line(scope, key, &record)?)?;
    } else {
        let text = show::record(scope, key, &record);
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(status::OK)
}

fn list(
    out: &mut impl Write,
    path: &Path,
    scope: Option<&[u8]>,
    state: Option<StateFilter>,
    limit: Option<usize>,
    as_json: bool,
) -> Outcome {
    let store = open(path)?;
    let limit = limit.unwrap_or(usize::MAX);
    let mut shown = 0usize;
    let mut damaged = 0u64;
    let mut failed: Option<Failure> = None;
    if !as_json {
        let header = format!(
            "{:<10} {:>7} {:<24} {:<24} {:<16} {}\n",
            "STATE", "ATTEMPT", "UPDATED", "EXPIRES", "SCOPE", "KEY"
        );
        out.write_all(header.as_bytes())
            .map_err(|e| io_failure(&e))?;
    }
    store
        .scan(scope, |entry| {
            if shown >= limit {
                return false;
            }
            let written = match &entry.record {
                Err(e) => {
                    damaged += 1;
                    if as_json {
                        let reason = e.to_string();
                        write_line(
                            out,
                            &json::DamagedLine {
                                scope: json::B64(entry.scope.clone()),
                                key: json::B64(entry.key.clone()),
                                state: "damaged",
                                reason: &reason,
                            },
                        )
                    } else {
                        let row = format!(
                            "{:<10} {:>7} {:<24} {:<24} {:<16} {}  ({e})\n",
                            "damaged",
                            "-",
                            "-",
                            "-",
                            show::ident(&entry.scope),
                            show::ident(&entry.key)
                        );
                        out.write_all(row.as_bytes()).map_err(|e| io_failure(&e))
                    }
                }
                Ok(record) if state.is_some_and(|s| !s.admits(&record.state)) => return true,
                Ok(record) if as_json => record_line(&entry.scope, &entry.key, record)
                    .and_then(|line| write_line(out, &line)),
                Ok(record) => {
                    let row = format!(
                        "{:<10} {:>7} {:<24} {:<24} {:<16} {}\n",
                        show::state_name(&record.state),
                        record.attempt,
                        show::time(record.updated_at_ms),
                        show::time(record.expires_at_ms),
                        show::ident(&entry.scope),
                        show::ident(&entry.key)
                    );
                    out.write_all(row.as_bytes()).map_err(|e| io_failure(&e))
                }
            };
            shown += 1;
            match written {
                Ok(()) => shown < limit,
                Err(f) => {
                    failed = Some(f);
                    false
                }
            }
        })
        .map_err(|e| failure(path, e))?;
    if let Some(f) = failed {
        return Err(f);
    }
    if damaged > 0 {
        eprintln!("idemstore: {damaged} damaged records listed; run `idemstore verify`");
        return Ok(status::DAMAGE);
    }
    Ok(status::OK)
}

fn orphans(out: &mut impl Write, path: &Path, limit: Option<usize>, as_json: bool) -> Outcome {
    let store = open(path)?;
    let orphans = store
        .orphans(limit.unwrap_or(usize::MAX))
        .map_err(|e| failure(path, e))?;
    if as_json {
        for orphan in &orphans {
            write_line(
                out,
                &record_line(&orphan.scope, &orphan.key, &orphan.record)?,
            )?;
        }
        return Ok(status::OK);
    }
    let mut text = format!(
        "{:>7} {:<24} {:<11} {:<16} {}\n",
        "ATTEMPT", "LEASE UNTIL", "CHECKPOINT", "SCOPE", "KEY"
    );
    for orphan in &orphans {
        let RecordState::InFlight {
            lease_until_ms,
            checkpoint,
            ..
        } = &orphan.record.state
        else {
            continue;
        };
        let checkpoint = checkpoint
            .as_ref()
            .map_or_else(|| "none".to_owned(), |c| format!("{} B", c.len()));
        text.push_str(&format!(
            "{:>7} {:<24} {:<11} {:<16} {}\n",
            orphan.record.attempt,
            show::time(*lease_until_ms),
            checkpoint,
            show::ident(&orphan.scope),
            show::ident(&orphan.key)
        ));
    }
    text.push_str(&format!(
        "{} orphans: each may have run in part or in full. Reconcile it with the system it \
         acted on; the first claim with its fingerprint takes it over, with its checkpoint.\n",
        orphans.len()
    ));
    out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    Ok(status::OK)
}

fn sweep(out: &mut impl Write, path: &Path, as_json: bool) -> Outcome {
    const SWEEP_BATCH: usize = 1024;
    let store = open_for_writing(path)?;
    let (mut removed, mut visited) = (0usize, 0usize);
    loop {
        let swept = store.sweep(SWEEP_BATCH).map_err(|e| failure(path, e))?;
        removed += swept.removed;
        visited += swept.visited;
        if !swept.more {
            break;
        }
    }
    store.close().map_err(|e| failure(path, e))?;
    if as_json {
        write_line(out, &json!({ "removed": removed, "visited": visited }))?;
    } else {
        let text = format!(
            "swept {}: removed {removed} expired records ({visited} expiry-index entries visited)\n",
            path.display()
        );
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(status::OK)
}

fn compact(out: &mut impl Write, path: &Path, as_json: bool) -> Outcome {
    let done = Store::compact(path).map_err(|e| failure(path, e))?;
    if as_json {
        let value = json!({
            "compacted": done.compacted,
            "bytes_before": done.bytes_before,
            "bytes_after": done.bytes_after,
            "elapsed_ms": done.elapsed.as_millis() as u64,
        });
        write_line(out, &value)?;
    } else {
        let text = if done.compacted {
            format!(
                "compacted {}: {} -> {} ({} given back) in {:.1} s\n",
                path.display(),
                show::size(done.bytes_before),
                show::size(done.bytes_after),
                show::size(done.bytes_freed()),
                done.elapsed.as_secs_f64()
            )
        } else {
            format!(
                "did not compact {} ({} now): compacted, it would grow back to its length or \
                 beyond at the store's next write (the file grows by doubling below 4 GiB); \
                 compaction pays once more than half of it is free (`idemstore stats` shows how \
                 much)\n",
                path.display(),
                show::size(done.bytes_after),
            )
        };
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(status::OK)
}

fn forget(out: &mut impl Write, path: &Path, scope: &[u8], key: &[u8], as_json: bool) -> Outcome {
    let store = open_for_writing(path)?;
    let forgotten = store.forget(scope, key).map_err(|e| failure(path, e))?;
    store.close().map_err(|e| failure(path, e))?;
    if as_json {
        write_line(out, &json!({ "forgotten": forgotten }))?;
    } else {
        let (scope, key) = (show::ident(scope), show::ident(key));
        let text = if forgotten {
            format!("forgot scope {scope}, key {key}: the next claim of it runs the request\n")
        } else {
            format!("no live record under scope {scope}, key {key}: nothing to forget\n")
        };
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(status::OK)
}

fn export(out: &mut impl Write, path: &Path) -> Outcome {
    let store = open(path)?;
    let (mut exported, mut damaged) = (0u64, 0u64);
    let mut failed: Option<Failure> = None;
    store
        .scan(None, |entry| {
            let written = match &entry.record {
                Ok(record) => record_line(&entry.scope, &entry.key, record)
                    .and_then(|line| write_line(out, &line))
                    .map(|()| exported += 1),
                Err(e) => {
                    damaged += 1;
                    eprintln!("idemstore: not exported: {e}");
                    Ok(())
                }
            };
            written.map_err(|f| failed = Some(f)).is_ok()
        })
        .map_err(|e| failure(path, e))?;
    if let Some(f) = failed {
        return Err(f);
    }
    eprintln!(
        "idemstore: exported {exported} records from {}",
        path.display()
    );
    if damaged > 0 {
        eprintln!("idemstore: {damaged} damaged records were not exported");
        return Ok(status::DAMAGE);
    }
    Ok(status::OK)
}

fn import(out: &mut impl Write, path: &Path, as_json: bool) -> Outcome {
    // An existing file must be a store (an empty one is refused, as by every command); a
    // missing one is created, and removed again if the import fails.
    let created = match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(failure(path, Error::from(e))),
        Ok(m) if m.is_file() && m.len() == 0 => return Err(empty_file(path)),
        Ok(_) => false,
    };
    let imported = import_stdin(path);
    // Removed only if this import created it: not if another process has it open.
    if created && !matches!(imported, Ok(Ok(_)) | Err(Error::AlreadyOpen)) {
        let _ = std::fs::remove_file(path);
    }
    let report = imported
        .map_err(|e| failure(path, e))?
        .map_err(|message| Failure {
            status: status::ERROR,
            message: format!("{message}; nothing was imported"),
        })?;
    if as_json {
        let value = json!({
            "added": report.added,
            "in_flight": report.in_flight,
            "existing": report.existing,
            "damaged": report.damaged,
            "expired": report.expired,
        });
        write_line(out, &value)?;
    } else {
        let text = format!(
            "imported {} records into {} ({} in flight, now orphans); kept {} live records \
             already stored{}; skipped {} expired\n",
            report.added,
            path.display(),
            report.in_flight,
            report.existing,
            if report.damaged > 0 {
                format!(" and {} damaged ones", report.damaged)
            } else {
                String::new()
            },
            report.expired,
        );
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(status::OK)
}

/// Imports the JSON Lines on stdin into the store at `path` ([`Store::import`]); the inner
/// error is the input's.
fn import_stdin(path: &Path) -> Result<Result<idemstore::ImportReport, String>, Error> {
    let stdin = io::stdin();
    let lines = stdin.lock().lines().enumerate().filter_map(|(n, line)| {
        let number = n + 1;
        let parsed = match line {
            Err(e) => Err(format!("line {number}: cannot read it: {e}")),
            Ok(text) if text.trim().is_empty() => return None,
            Ok(text) => serde_json::from_str::<json::Line>(&text)
                .map(json::Line::into_parts)
                .map_err(|e| format!("line {number}: {e}")),
        };
        Some(parsed)
    });
    Store::import(path, lines)
}

fn verify(out: &mut impl Write, path: &Path, as_json: bool) -> Outcome {
    let report = match ReadOnlyStore::open(path) {
        Ok(store) => store.verify().map_err(|e| failure(path, e))?,
        // A page that fails its checksum is damage found, not a failure to verify.
        Err(Error::Corrupt { location, reason }) => {
            if as_json {
                let damage = json!([{ "location": location, "reason": reason }]);
                // The open checks every page before it reads anything else: damage found
                // anywhere else (the log, the meta table) was found after the pages passed.
                let pages = if location == "database file" {
                    "damaged"
                } else {
                    "ok"
                };
                write_line(
                    out,
                    &json!({ "clean": false, "pages": pages, "damage": damage }),
                )?;
            } else {
                let text = format!("{}: DAMAGED\n  {location}: {reason}\n", path.display());
                out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
            }
            return Ok(status::DAMAGE);
        }
        Err(e) => return Err(failure(path, e)),
    };
    if as_json {
        let damage: Vec<_> = report
            .damage
            .iter()
            .map(|d| json!({ "location": d.location, "reason": d.reason }))
            .collect();
        let value = json!({
            "clean": report.is_clean(),
            "pages": "ok",
            "records": report.records,
            "expiry_entries": report.expiry_entries,
            "stale_expiry_entries": report.stale_expiry_entries,
            "damage_count": report.damage_count,
            "damage": damage,
        });
        write_line(out, &value)?;
    } else {
        let mut text = format!(
            "{}: page checksums ok; {} records, {} expiry-index entries ({} stale, dropped by the \
             next sweep)\n",
            path.display(),
            report.records,
            report.expiry_entries,
            report.stale_expiry_entries
        );
        for d in &report.damage {
            text.push_str(&format!("  {}: {}\n", d.location, d.reason));
        }
        if report.is_clean() {
            text.push_str("clean\n");
        } else {
            text.push_str(&format!(
                "DAMAGED: {} problems found{}\n",
                report.damage_count,
                if report.damage_count > report.damage.len() as u64 {
                    " (the first ones listed)"
                } else {
                    ""
                }
            ));
        }
        out.write_all(text.as_bytes()).map_err(|e| io_failure(&e))?;
    }
    Ok(if report.is_clean() {
        status::OK
    } else {
        status::DAMAGE
    })
}
