//! Side-by-side benchmark of idemstore against the peers a user would pick instead, written to
//! `BENCHMARKS.md` in the repository root.
//!
//! ```text
//! cargo run --release --manifest-path compare/Cargo.toml -- [--quick] [--skip-big] [...]
//! ```
//!
//! One process runs the claim + complete cycle (36-byte UUID key, 32-byte fingerprint,
//! 512-byte outcome) at 1, 16 and 64 concurrent callers against every system, interleaved:
//! for each caller count, every system runs one round in turn (the order rotating each round),
//! several rounds, so drift of the machine hits all of them alike. idemstore's own PostgreSQL
//! and Redis backends run beside the raw upserts on the same servers, through the
//! `IdempotencyBackend` trait, to show what the semantics cost. Reported: the median round
//! throughput and the p50/p99 of all per-cycle latencies. Then idemstore alone, on a store of
//! each format (`--format`): replay throughput on 2 threads (random keys, and keys completed
//! just before), sweep throughput and claim p99 while a sweep runs, open time after a clean
//! close and after `kill -9` of the writing process, file sizes per record, peak RSS; a
//! sustained run of 64 callers on a write-ahead-log store filled with `--records` records beside
//! Redis (AOF always) holding as many keys; and the open time of a 10M-record store.
//!
//! Redis and PostgreSQL come from Debian's packages: installed with apt-get if missing (as
//! root), started on 127.0.0.1 on free ports with temporary directories, stopped at the end.
//! A peer that cannot be installed or started is reported as skipped, with the reason.

mod extra;
mod peers;
mod report;
mod rss;
// Shared with the conformance suite: install, start and watch the servers.
#[path = "../../tests/servers/mod.rs"]
mod servers;
mod stats;
mod sustained;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use idemstore::Durability;

use extra::{Format, WalOptions};

use peers::{
    Backend, DiskLimit, Idemstore, InMemory, NaiveRedb, Peer, Postgres, Redis, Sqlite, Worker,
};
use servers::{Installer, PostgresServer, RedisServer};
use workload::{OUTCOME_LEN, Round, outcome, run_round};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: cargo run --release --manifest-path compare/Cargo.toml -- [options]

  --quick            a short smoke run: 2 rounds of 0.5 s, a 100k-record store for the
                     sweep/replay/open measurements, no 10M-record store; written to
                     compare/target/BENCHMARKS.quick.md unless --out is given
  --skip-big         skip the 10M-record open-time measurement (its fill takes many minutes)
  --rounds N         rounds per system and caller count (default 5)
  --seconds S        length of one round in seconds (default 2)
  --callers LIST     caller counts, comma-separated (default 1,16,64)
  --records N        records of the store for the replay/sweep/open measurements (default 1000000)
  --big-records N    records of the open-time-only store (default 10000000)
  --sweep-batch N    records per sweep commit in the sweep-under-load measurement (default
                     1024, the engine's default `sweep_batch`)
  --format 1|2|both  the formats of the --records store (default both: 2 is the write-ahead
                     log, `write_ahead_log(true)`; 1 the redb file alone). The --big-records store
                     is filled once, in format 2 unless only format 1 is asked for
  --sustained-seconds S
                     length of the sustained run (64 callers on a format-2 store filled with
                     --records records, then on Redis AOF always preloaded with as many keys;
                     default 60, --quick 5; 0 skips it); cycles are counted per 10 s window
                     (1 s below 20 s)
  --no-install       do not apt-get install missing servers (report them as skipped)
  --only-compare     run only the side-by-side comparison
  --skip-compare     skip the side-by-side comparison (run only the idemstore measurements)
  --out PATH         where to write the report (default: BENCHMARKS.md in the repository)
";

/// The run's configuration, from the command line.
pub struct Args {
    pub quick: bool,
    pub skip_big: bool,
    pub rounds: usize,
    pub round: Duration,
    pub warmup: Duration,
    pub callers: Vec<usize>,
    pub records: u64,
    pub big_records: u64,
    pub sweep_batch: usize,
    pub formats: Vec<Format>,
    pub sustained: Duration,
    pub wal: WalOptions,
    pub install: bool,
    pub only_compare: bool,
    pub skip_compare: bool,
    pub out: PathBuf,
    pub argv: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut quick = argv.iter().any(|a| a == "--quick");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        quick,
        skip_big: quick,
        rounds: if quick { 2 } else { 5 },
        round: Duration::from_secs_f64(if quick { 0.5 } else { 2.0 }),
        warmup: Duration::from_secs_f64(if quick { 0.2 } else { 0.5 }),
        callers: vec![1, 16, 64],
        records: if quick { 100_000 } else { 1_000_000 },
        big_records: 10_000_000,
        sweep_batch: extra::DEFAULT_SWEEP_BATCH,
        formats: vec![Format::Redb, Format::Wal],
        sustained: Duration::from_secs(if quick { 5 } else { 60 }),
        wal: WalOptions::default(),
        install: true,
        only_compare: false,
        skip_compare: false,
        out: if quick {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/BENCHMARKS.quick.md")
        } else {
            repo.join("BENCHMARKS.md")
        },
        argv: argv.clone(),
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--skip-big" => args.skip_big = true,
            "--no-install" => args.install = false,
            "--only-compare" => args.only_compare = true,
            "--skip-compare" => args.skip_compare = true,
            "--rounds" => {
                args.rounds = value("--rounds")?
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or("--rounds wants a whole number >= 1")?;
            }
            "--seconds" => {
                let s: f64 = value("--seconds")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 600.0)
                    .ok_or("--seconds wants a number in (0, 600]")?;
                args.round = Duration::from_secs_f64(s);
            }
            "--callers" => {
                args.callers = value("--callers")?
                    .split(',')
                    .map(|c| {
                        c.trim()
                            .parse()
                            .ok()
                            .filter(|&n: &usize| (1..=1024).contains(&n))
                    })
                    .collect::<Option<Vec<usize>>>()
                    .ok_or("--callers wants a comma-separated list of numbers in 1..=1024")?;
            }
            "--records" => {
                args.records = value("--records")?
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1000)
                    .ok_or("--records wants a number >= 1000")?;
            }
            "--big-records" => {
                args.big_records = value("--big-records")?
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1000)
                    .ok_or("--big-records wants a number >= 1000")?;
            }
            "--sweep-batch" => {
                args.sweep_batch = value("--sweep-batch")?
                    .parse()
                    .ok()
                    .filter(|&n| (1..=idemstore::BATCH_OPS_MAX).contains(&n))
                    .ok_or("--sweep-batch wants a number in 1..=65536")?;
            }
            "--format" => {
                args.formats = match value("--format")?.as_str() {
                    "1" => vec![Format::Redb],
                    "2" => vec![Format::Wal],
                    "both" => vec![Format::Redb, Format::Wal],
                    _ => return Err("--format wants 1, 2 or both".into()),
                };
            }
            "--sustained-seconds" => {
                let s: f64 = value("--sustained-seconds")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                    .ok_or("--sustained-seconds wants a number in [0, 3600]")?;
                args.sustained = Duration::from_secs_f64(s);
            }
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--help" | "-h" => {
                println!("{USAGE}{}", WalOptions::USAGE);
                std::process::exit(0);
            }
            other => {
                if !args.wal.parse(other, &mut || value(other))? {
                    return Err(format!("unknown argument {other:?}"));
                }
            }
        }
    }
    args.quick = quick;
    Ok(args)
}

/// One system of the comparison and what it measured.
pub struct System {
    pub name: &'static str,
    pub setup: &'static str,
    /// Why it did not run (or stopped), if it did not.
    pub skipped: Option<String>,
    pub peer: Option<Box<dyn Peer>>,
    pub rounds: BTreeMap<usize, Vec<Round>>,
    /// Whether it is a bound rather than a peer.
    pub bound: bool,
}

impl System {
    fn new(
        name: &'static str,
        setup: &'static str,
        bound: bool,
        peer: Result<Box<dyn Peer>, String>,
    ) -> System {
        let (peer, skipped) = match peer {
            Ok(p) => (Some(p), None),
            Err(e) => {
                eprintln!("[compare] {name}: skipped: {e}");
                (None, Some(e))
            }
        };
        System {
            name,
            setup,
            skipped,
            peer,
            rounds: BTreeMap::new(),
            bound,
        }
    }

    fn fail(&mut self, callers: usize, e: &str) {
        eprintln!("[compare] {}: failed at {callers} callers: {e}", self.name);
        self.skipped = Some(format!("failed at {callers} callers: {e}"));
        self.peer = None;
    }
}

/// Servers started for the run; dropped (stopped) when the run ends, also on error.
#[derive(Default)]
pub struct Servers {
    pub redis_always: Option<RedisServer>,
    pub redis_everysec: Option<RedisServer>,
    pub postgres: Option<PostgresServer>,
}

fn boxed<P: Peer + 'static>(r: Result<P, BoxError>) -> Result<Box<dyn Peer>, String> {
    r.map(|p| Box::new(p) as Box<dyn Peer>)
        .map_err(|e| e.to_string())
}

fn systems(dir: &std::path::Path, args: &Args, servers: &mut Servers) -> Vec<System> {
    let mut installer = Installer::new(args.install);
    let redis_always = RedisServer::start(&mut installer, "always");
    let redis_everysec = match &redis_always {
        Ok(_) => RedisServer::start(&mut installer, "everysec"),
        Err(e) => Err(e.clone()),
    };
    let postgres = PostgresServer::start(&mut installer);
    let redis_peer = |server: &Result<RedisServer, String>| match server {
        Ok(s) => boxed(Redis::connect(&s.url())),
        Err(e) => Err(e.clone()),
    };
    let pg_peer = match &postgres {
        Ok(s) => boxed(Postgres::connect(&s.conn_str())),
        Err(e) => Err(e.clone()),
    };
    // idemstore's own backends on the same servers (the Redis one on the `always` server, the
    // durability its docs require), through the trait.
    let callers_max = args.callers.iter().copied().max().unwrap_or(1);
    let pg_backend = match &postgres {
        Ok(s) => {
            let url = s.url();
            boxed(Backend::connect("idemstore on PostgreSQL", async move {
                // Up to a connection per caller, as the raw peer has.
                idemstore::postgres::PostgresBackend::builder(&url)?
                    .pool_size(callers_max)
                    .connect()
                    .await
            }))
        }
        Err(e) => Err(e.clone()),
    };
    let redis_backend = match &redis_always {
        Ok(s) => {
            let url = s.url();
            boxed(Backend::connect("idemstore on Redis", async move {
                idemstore::redis::RedisBackend::connect(&url).await
            }))
        }
        Err(e) => Err(e.clone()),
    };
    let list = vec![
        System::new(
            "idemstore (Immediate)",
            "default durability: every commit fsynced before acknowledging; group commit",
            false,
            boxed(Idemstore::open(
                &dir.join("idemstore-immediate.redb"),
                Durability::Immediate,
                None,
            )),
        ),
        System::new(
            "idemstore WAL (Immediate)",
            "`write_ahead_log(true)`: each commit one append + one fdatasync of the log, acknowledged after it; checkpoints into redb every second",
            false,
            boxed(Idemstore::open(
                &dir.join("idemstore-wal-immediate.redb"),
                Durability::Immediate,
                Some(&args.wal),
            )),
        ),
        System::new(
            "idemstore WAL (Relaxed 1 s)",
            "`write_ahead_log(true)` with `Durability::Relaxed { max_unsynced: 1 s }`",
            false,
            boxed(Idemstore::open(
                &dir.join("idemstore-wal-relaxed.redb"),
                Durability::Relaxed {
                    max_unsynced: Duration::from_secs(1),
                },
                Some(&args.wal),
            )),
        ),
        System::new(
            "idemstore (Relaxed 1 s)",
            "`Durability::Relaxed { max_unsynced: 1 s }`: acknowledged before the fsync",
            false,
            boxed(Idemstore::open(
                &dir.join("idemstore-relaxed.redb"),
                Durability::Relaxed {
                    max_unsynced: Duration::from_secs(1),
                },
                None,
            )),
        ),
        System::new(
            "naive redb",
            "one durable write transaction per operation (claim, then complete)",
            false,
            boxed(NaiveRedb::open(&dir.join("naive.redb"))),
        ),
        System::new(
            "SQLite",
            "rusqlite, WAL, `synchronous=FULL`, one connection behind a mutex; `INSERT ... ON CONFLICT DO NOTHING`, then `UPDATE`",
            false,
            boxed(Sqlite::open(&dir.join("sqlite.db"))),
        ),
        System::new(
            "Redis (AOF always)",
            "`appendonly yes`, `appendfsync always`; `SET NX PX`, then `SET XX PX`; a connection per caller",
            false,
            redis_peer(&redis_always),
        ),
        System::new(
            "idemstore on Redis (AOF always)",
            "idemstore's Redis backend (`idemstore::redis`) through the `IdempotencyBackend` trait, on the AOF-always server above: `claim` and the fenced `complete` are one Lua script each (fingerprint, fencing token, owner, expiry on the server's clock); one multiplexed connection (`ConnectionManager`); each caller thread `block_on`s the backend's Tokio runtime",
            false,
            redis_backend,
        ),
        System::new(
            "Redis (AOF everysec)",
            "`appendonly yes`, `appendfsync everysec` (may lose the last second)",
            false,
            redis_peer(&redis_everysec),
        ),
        System::new(
            "PostgreSQL",
            "`synchronous_commit=on`; `INSERT ... ON CONFLICT DO NOTHING`, then `UPDATE`; a connection per caller",
            false,
            pg_peer,
        ),
        System::new(
            "idemstore on PostgreSQL",
            "idemstore's PostgreSQL backend (`idemstore::postgres`) through the `IdempotencyBackend` trait, on the server above: `claim` is one statement (decided on the committed row; an acquisition is an `INSERT ... ON CONFLICT DO UPDATE` that draws a fencing token from a sequence), `complete` a fenced `UPDATE ... WHERE token`; a pool of up to one connection per caller; each caller thread `block_on`s the backend's Tokio runtime",
            false,
            pg_backend,
        ),
        System::new(
            "HashMap + Mutex",
            "bound: in memory, not durable (the ceiling)",
            true,
            Ok(Box::new(InMemory::new())),
        ),
        System::new(
            "disk fdatasync limit",
            "bound: 4 KiB `pwrite` at a random offset of a preallocated file + `fdatasync`, per second",
            true,
            boxed(DiskLimit::open(&dir.join("disk-limit.bin"))),
        ),
    ];
    servers.redis_always = redis_always.ok();
    servers.redis_everysec = redis_everysec.ok();
    servers.postgres = postgres.ok();
    list
}

fn compare(systems: &mut [System], args: &Args) {
    let outcome = outcome(OUTCOME_LEN);
    for &callers in &args.callers {
        // Connections / handles for this caller count, kept across its rounds.
        let mut workers: Vec<Option<Vec<Box<dyn Worker>>>> = Vec::new();
        for system in systems.iter_mut() {
            let made = system.peer.as_ref().map(|peer| {
                (0..callers)
                    .map(|_| peer.worker())
                    .collect::<Result<Vec<_>, _>>()
            });
            workers.push(match made {
                Some(Ok(w)) => Some(w),
                Some(Err(e)) => {
                    system.fail(callers, &e.to_string());
                    None
                }
                None => None,
            });
        }
        // Warm-up round, discarded.
        for (system, w) in systems.iter_mut().zip(workers.iter_mut()) {
            if let Some(ws) = w
                && let Err(e) = run_round(ws, args.warmup, &outcome)
            {
                system.fail(callers, &e.to_string());
                *w = None;
            }
        }
        let n = systems.len();
        for round in 0..args.rounds {
            for i in 0..n {
                let idx = (i + round) % n;
                let (system, w) = (&mut systems[idx], &mut workers[idx]);
                let Some(ws) = w else { continue };
                match run_round(ws, args.round, &outcome) {
                    Ok(r) => {
                        eprintln!(
                            "[compare] {callers:>2} callers, round {}/{}: {:<31} {:>10.0}/s  p99 {}",
                            round + 1,
                            args.rounds,
                            system.name,
                            r.per_sec(),
                            stats::latency(r.latency.quantile(0.99)),
                        );
                        system.rounds.entry(callers).or_default().push(r);
                    }
                    Err(e) => {
                        system.fail(callers, &e.to_string());
                        *w = None;
                    }
                }
            }
        }
    }
}

fn run(args: &Args) -> Result<(), BoxError> {
    let started = Instant::now();
    let load_before = report::loadavg();
    let date = report::date();
    let dir = tempfile::Builder::new()
        .prefix("idemstore-compare-")
        .tempdir()?;
    rss::reset_peak();
    let mut servers = Servers::default();
    let mut systems = if args.skip_compare {
        Vec::new()
    } else {
        systems(dir.path(), args, &mut servers)
    };
    compare(&mut systems, args);
    let server_rss = report::ServerRss {
        redis_always: servers
            .redis_always
            .as_ref()
            .and_then(|s| rss::peak_of(s.pid())),
        redis_everysec: servers
            .redis_everysec
            .as_ref()
            .and_then(|s| rss::peak_of(s.pid())),
    };
    let compare_rss = rss::peak();
    let versions = report::Versions {
        redis: servers.redis_always.as_ref().map(|s| s.version.clone()),
        postgres: servers.postgres.as_ref().map(|s| s.version.clone()),
        sqlite: rusqlite::version().to_owned(),
    };
    // Stop the servers and drop the comparison's stores before the idemstore-only phases.
    drop(
        systems
            .iter_mut()
            .map(|s| s.peer.take())
            .collect::<Vec<_>>(),
    );
    drop(servers);

    let phase = if args.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let window = if args.sustained >= Duration::from_secs(20) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    let sustained = (!args.sustained.is_zero()).then_some((args.sustained, window));
    let mut measured = extra::Measured::default();
    if !args.only_compare {
        for &format in &args.formats {
            let plan = extra::LargePlan {
                dir: dir.path(),
                format,
                wal: &args.wal,
                records: args.records,
                phase,
                sweep_batch: args.sweep_batch,
            };
            measured
                .large
                .push((format, extra::large(&plan).map_err(|e| e.to_string())));
        }
        // idemstore's write-ahead log, then Redis over the same span.
        if let Some((duration, window)) = sustained {
            measured.sustained = Some(
                sustained::idemstore(dir.path(), &args.wal, args.records, duration, window)
                    .map_err(|e| e.to_string()),
            );
            measured.redis = Some(
                sustained::redis(args.install, args.records, duration, window)
                    .map_err(|e| e.to_string()),
            );
        }
    }
    let big = !(args.only_compare || args.skip_big);
    let machine = report::machine(dir.path());
    let mut ctx = report::Context {
        args,
        date,
        elapsed: started.elapsed(),
        load_before,
        load_after: report::loadavg(),
        machine,
        versions,
        compare_rss,
        server_rss,
        big_pending: big,
    };
    // Written now too, so that an interrupted run of the long 10M-record fill keeps the rest.
    let text = report::render(&ctx, &systems, &measured);
    report::write(&args.out, &text)?;
    eprintln!("[compare] wrote {}", args.out.display());
    if !big {
        println!("{text}");
        return Ok(());
    }
    // The shipped format, unless only format 1 is asked for.
    let format = if args.formats.contains(&Format::Wal) {
        Format::Wal
    } else {
        Format::Redb
    };
    measured.huge = Some(
        extra::huge(dir.path(), format, &args.wal, args.big_records).map_err(|e| e.to_string()),
    );
    ctx.elapsed = started.elapsed();
    ctx.load_after = report::loadavg();
    ctx.big_pending = false;
    let text = report::render(&ctx, &systems, &measured);
    report::write(&args.out, &text)?;
    println!("{text}");
    eprintln!("[compare] wrote {}", args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    // The writer that `extra::open_after_kill` starts and kills.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some(extra::CHILD_COMMAND) {
        return match extra::child_main(&argv[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}{}", WalOptions::USAGE);
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
