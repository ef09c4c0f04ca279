//! The sustained row: `CALLERS` callers running claim + complete cycles of fresh keys for a
//! minute or more, on an idemstore write-ahead-log store (`Immediate`) filled with `--records`
//! records first (a store of its own, so that the other measurements' stores do not grow by
//! the million records a minute of cycles writes), then for the same span on Redis with
//! `appendfsync always`, preloaded with as many keys. Short rounds are absorbed by the log and the record map; a long run shows what
//! the checkpoints into redb cost. Cycles are counted per window (10 s), so a drop over time
//! shows, and the store's counters are sampled at the end of each window.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use idemstore::{ManualClock, WalStats};

use crate::BoxError;
use crate::extra::{self, Files, Fill, Format, WalOptions};
use crate::peers::{Idemstore, Peer as _, RETENTION, Redis, Worker, redis_key};
use crate::rss;
use crate::servers::{Installer, RedisServer};
use crate::stats::Histogram;
use crate::workload::{OUTCOME_LEN, key, outcome, run_callers};

/// Concurrent callers of the sustained run.
pub const CALLERS: usize = 64;
/// Keys per pipeline when preloading Redis.
pub const PRELOAD_PIPELINE: u64 = 1000;
/// The longest wait for Redis's AOF rewrites (started by the preload) to finish.
const REWRITE_WAIT_MAX: Duration = Duration::from_secs(300);

/// What a sustained run measured; `S` is what was sampled at its start and at the end of each
/// window.
pub struct Sustained<S> {
    pub cycles: u64,
    pub elapsed: Duration,
    /// Each cycle's latency (claim + complete as the caller sees it).
    pub latency: Histogram,
    pub window: Duration,
    /// Cycles finished in each window (the last one may be shorter: see `window_secs`).
    pub windows: Vec<u64>,
    /// `windows.len() + 1` samples: at the start, then at the end of each window.
    pub samples: Vec<S>,
    /// Peak RSS of the harness process during the run.
    pub peak_rss: rss::Peak,
}

impl<S> Sustained<S> {
    pub fn per_sec(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The length of window `i` in seconds.
    pub fn window_secs(&self, i: usize, duration: Duration) -> f64 {
        let start = self.window.as_secs_f64() * i as f64;
        (duration.as_secs_f64() - start).clamp(0.0, self.window.as_secs_f64())
    }
}

/// Runs cycles of fresh keys on every worker (one thread each) for `duration`, all starting
/// together; `sample` is called at the start and at the end of each `window`.
pub fn run<S>(
    workers: &mut [Box<dyn Worker>],
    duration: Duration,
    window: Duration,
    mut sample: impl FnMut() -> S,
) -> Result<Sustained<S>, BoxError> {
    let n_windows = duration
        .as_nanos()
        .div_ceil(window.as_nanos().max(1))
        .max(1) as usize;
    let windows: Vec<AtomicU64> = (0..n_windows).map(|_| AtomicU64::new(0)).collect();
    let outcome = outcome(OUTCOME_LEN);
    let rss_phase = rss::Phase::start();
    let mut samples = vec![sample()];
    let count = |since_start: Duration| {
        let w = (since_start.as_nanos() / window.as_nanos().max(1)) as usize;
        windows[w.min(n_windows - 1)].fetch_add(1, Ordering::Relaxed);
    };
    let round = run_callers(workers, duration, &outcome, &count, |began| {
        for i in 1..=n_windows {
            let end = began + (window * i as u32).min(duration);
            if let Some(wait) = end.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            samples.push(sample());
        }
    })?;
    let (cycles, latency, elapsed) = (round.cycles, round.latency, round.elapsed);
    Ok(Sustained {
        cycles,
        elapsed,
        latency,
        window,
        windows: windows.into_iter().map(AtomicU64::into_inner).collect(),
        samples,
        peak_rss: rss_phase.end(),
    })
}

/// The store's counters at one moment of the run.
#[derive(Clone)]
pub struct StoreSample {
    /// Write transactions (WAL batches) committed since open.
    pub commits: u64,
    /// Operations applied since open.
    pub operations: u64,
    pub wal: Option<WalStats>,
    /// When `Store::stats` returned, and how long it took.
    pub taken: Instant,
    pub took: Duration,
}

/// The idemstore side of the sustained run.
pub struct Store {
    pub fill: Fill,
    pub run: Sustained<StoreSample>,
    /// The store's files when the run ended (before close).
    pub files_after: Files,
}

/// Fills a new format-2 store in `dir` with `records` records, reopens it at `Immediate` and
/// runs the sustained cycle on it for `duration`; the store is removed afterwards.
pub fn idemstore(
    dir: &Path,
    wal: &WalOptions,
    records: u64,
    duration: Duration,
    window: Duration,
) -> Result<Store, BoxError> {
    let path = dir.join("sustained.redb");
    let clock = ManualClock::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    eprintln!("[sustained] filling {records} records (format 2)");
    let fill = extra::fill(&path, Format::Wal, wal, records, &clock, "sustained")?;
    let store = Arc::new(extra::builder(Format::Wal, wal, Some(&clock)).open(&path)?);
    eprintln!(
        "[sustained] idemstore: {CALLERS} callers for {:.0} s",
        duration.as_secs_f64()
    );
    let run = sustained_store(&store, duration, window)?;
    let files_after = Files::of(&path)?;
    match Arc::try_unwrap(store) {
        Ok(store) => store.close()?,
        Err(_) => return Err("the store is still shared".into()),
    }
    extra::remove_store(&path)?;
    Ok(Store {
        fill,
        run,
        files_after,
    })
}

/// The sustained run on `store` (already open).
fn sustained_store(
    store: &Arc<idemstore::Store>,
    duration: Duration,
    window: Duration,
) -> Result<Sustained<StoreSample>, BoxError> {
    let peer = Idemstore::from_store(Arc::clone(store));
    let mut workers = (0..CALLERS)
        .map(|_| peer.worker())
        .collect::<Result<Vec<_>, _>>()?;
    let mut failed = None;
    let sustained = run(&mut workers, duration, window, || {
        let began = Instant::now();
        match store.stats() {
            Ok(s) => Some(StoreSample {
                commits: s.commits,
                operations: s.operations,
                wal: s.wal,
                taken: Instant::now(),
                took: began.elapsed(),
            }),
            Err(e) => {
                failed.get_or_insert_with(|| e.to_string());
                None
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(format!("Store::stats failed during the run: {e}").into());
    }
    Ok(Sustained {
        cycles: sustained.cycles,
        elapsed: sustained.elapsed,
        latency: sustained.latency,
        window: sustained.window,
        windows: sustained.windows,
        samples: sustained.samples.into_iter().flatten().collect(),
        peak_rss: sustained.peak_rss,
    })
}

/// Redis's persistence state at one moment (from `INFO persistence`).
#[derive(Clone)]
pub struct RedisSample {
    /// An AOF rewrite is running or scheduled.
    pub aof_rewrite_in_progress: bool,
}

fn redis_info(conn: &mut redis::Connection) -> Result<RedisSample, BoxError> {
    let info: String = redis::cmd("INFO").arg("persistence").query(conn)?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Ok(RedisSample {
        aof_rewrite_in_progress: field("aof_rewrite_in_progress") == Some("1")
            || field("aof_rewrite_scheduled") == Some("1"),
    })
}

/// The Redis side of the sustained run.
pub struct RedisRun {
    pub version: String,
    /// Keys preloaded (each `SET key outcome PX retention`, as a completed cycle leaves it) and
    /// how long it took; then how long the AOF rewrites it started took to finish.
    pub preloaded: u64,
    pub preload: Duration,
    /// `appendfsync` during the preload (`no` unless the server refused to change it).
    pub preload_fsync: &'static str,
    pub rewrite_wait: Duration,
    pub run: Sustained<Option<RedisSample>>,
    /// Peak RSS of redis-server (from its start, so including the preload).
    pub server_rss: Option<u64>,
}

/// Starts a Redis server with `appendfsync always`, preloads `records` keys through pipelines,
/// waits for the AOF rewrites they started, and runs `CALLERS` callers for `duration`.
pub fn redis(
    install: bool,
    records: u64,
    duration: Duration,
    window: Duration,
) -> Result<RedisRun, BoxError> {
    let mut installer = Installer::new(install);
    let server = RedisServer::start(&mut installer, "always")?;
    let client = redis::Client::open(server.url())?;
    let mut conn = client.get_connection()?;
    eprintln!("[sustained] preloading {records} keys into Redis");
    // The preload is set-up: without a sync per pipeline if the server lets us, then `always`
    // again (and checked) for the run.
    let preload_fsync = match redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("no")
        .query::<()>(&mut conn)
    {
        Ok(()) => "no",
        Err(_) => "always",
    };
    let outcome = outcome(OUTCOME_LEN);
    let began = Instant::now();
    let mut name = Vec::new();
    let mut first = 0;
    while first < records {
        let mut pipe = redis::pipe();
        for n in first..(first + PRELOAD_PIPELINE).min(records) {
            redis_key(&mut name, &key(n));
            pipe.cmd("SET")
                .arg(&name)
                .arg(&outcome)
                .arg("PX")
                .arg(RETENTION.as_millis() as u64)
                .ignore();
        }
        pipe.query::<()>(&mut conn)?;
        first += PRELOAD_PIPELINE;
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("always")
        .query::<()>(&mut conn)?;
    let fsync: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query(&mut conn)?;
    if fsync.get(1).map(String::as_str) != Some("always") {
        return Err(format!("Redis's appendfsync is {fsync:?} after the preload").into());
    }
    let preload = began.elapsed();
    let began = Instant::now();
    // Redis checks whether to start a rewrite in its cron (10 times a second by default).
    thread::sleep(Duration::from_millis(500));
    while redis_info(&mut conn)?.aof_rewrite_in_progress {
        if began.elapsed() > REWRITE_WAIT_MAX {
            return Err("Redis's AOF rewrite did not finish in 5 minutes".into());
        }
        thread::sleep(Duration::from_millis(100));
    }
    let rewrite_wait = began.elapsed();
    let keys: u64 = redis::cmd("DBSIZE").query(&mut conn)?;
    if keys != records {
        return Err(format!("Redis holds {keys} keys after preloading {records}").into());
    }
    eprintln!(
        "[sustained] Redis: {} callers for {:.0} s",
        CALLERS,
        duration.as_secs_f64()
    );
    let peer = Redis::connect(&server.url())?;
    let mut workers = (0..CALLERS)
        .map(|_| peer.worker())
        .collect::<Result<Vec<_>, _>>()?;
    let run = run(&mut workers, duration, window, || {
        redis_info(&mut conn).ok()
    })?;
    Ok(RedisRun {
        version: server.version.clone(),
        preloaded: records,
        preload,
        preload_fsync,
        rewrite_wait,
        run,
        server_rss: rss::peak_of(server.pid()),
    })
}
