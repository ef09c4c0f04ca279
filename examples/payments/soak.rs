//! `--soak`: the service under load for a wall time rather than a payment count.
//!
//! The service runs as a child process (as in the chaos run) and `--connections` keep-alive
//! connections drive it with the chaos run's payments (dropped responses and retries,
//! duplicate storms, reused keys, invalid parameters) until `--minutes` have passed, while it is
//! killed with SIGKILL and restarted `--crashes` times spread over the run. A sampler reads the
//! service's resident memory and open file descriptors from `/proc` every second. At the end
//! the ledger is audited exactly as in the chaos run, and per-minute tables show throughput,
//! latency, memory and descriptors, which should stay flat.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemstore::Store;

use crate::chaos::{Chaos, add, load};
use crate::latency::Snapshot;
use crate::ledger::FileLedger;
use crate::probe::{self, Sample};
use crate::rng::Rng;
use crate::supervisor::Supervisor;
use crate::workload::{self, Payment};
use crate::{Args, BoxError, report};

/// Logical payments a soak starts at most (a bound on the client's memory; far above what a
/// machine sends in an hour).
const PAYMENTS_MAX: usize = 20_000_000;
/// The longest a soak may be asked to run.
pub const MINUTES_MAX: f64 = 24.0 * 60.0;
/// How long the payments in flight at the deadline may take to finish (each is bounded by the
/// client's attempts; this bounds them all).
const DRAIN_MAX: Duration = Duration::from_secs(120);
/// How often the sampler looks at the service.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The length of a row of the per-minute table.
const ROW: Duration = Duration::from_secs(60);

/// The payments started so far and what each ended with.
#[derive(Default)]
struct Book {
    payments: Vec<Arc<Payment>>,
    outcomes: Vec<Option<String>>,
}

/// Hands out the next payment of the workload to whichever connection is free.
struct Generator {
    rng: Rng,
    book: Mutex<Book>,
}

impl Generator {
    /// The next payment and its index, or `None` once [`PAYMENTS_MAX`] were started.
    fn next(&self) -> Option<(usize, Arc<Payment>)> {
        let mut book = self.book.lock().ok()?;
        let i = book.payments.len();
        if i >= PAYMENTS_MAX {
            return None;
        }
        let payment = Arc::new(workload::next_payment(
            i,
            book.payments.last().map(|p| &**p),
            &self.rng,
        ));
        book.payments.push(Arc::clone(&payment));
        book.outcomes.push(None);
        Some((i, payment))
    }

    /// Records the charge id payment `i` ended with.
    fn settle(&self, i: usize, outcome: Option<String>) {
        if let Ok(mut book) = self.book.lock()
            && let Some(slot) = book.outcomes.get_mut(i)
        {
            *slot = outcome;
        }
    }
}

/// One row of the per-minute table.
struct Row {
    /// The minute (1-based), or `None` for the drain after the deadline.
    minute: Option<usize>,
    seconds: f64,
    requests: u64,
    latencies: Snapshot,
    connection_errors: u64,
    restarts: u64,
    /// The service's incarnation (1 = the first process) at the end of the row.
    incarnation: usize,
    /// The last sample of the row, if the service could be sampled.
    last: Option<Sample>,
    /// The largest RSS and fd count sampled during the row.
    max_rss_kib: u64,
    max_fds: u64,
    data_bytes: u64,
    load_average: Option<f64>,
}

/// One service process, as the sampler saw it.
struct Incarnation {
    pid: u32,
    first_seen: Duration,
    last_seen: Duration,
    last: Sample,
    max_rss_kib: u64,
    min_fds: u64,
    max_fds: u64,
}

impl Incarnation {
    /// The most resident memory it had: its `VmHWM`, or more if a sample saw more.
    fn peak_rss_kib(&self) -> u64 {
        self.last.peak_rss_kib.max(self.max_rss_kib)
    }
}

/// Everything the sampler recorded.
#[derive(Default)]
struct Samples {
    rows: Vec<Row>,
    incarnations: Vec<Incarnation>,
}

/// The sampler thread's state between two samples.
struct Sampler {
    supervisor: Arc<Supervisor>,
    chaos: Arc<Chaos>,
    data: PathBuf,
    started: Instant,
    samples: Samples,
    /// Counters at the start of the current row.
    row_started: Duration,
    row_requests: u64,
    row_errors: u64,
    row_restarts: u64,
    row_latencies: Snapshot,
    row_max_rss_kib: u64,
    row_max_fds: u64,
}

impl Sampler {
    fn new(supervisor: Arc<Supervisor>, chaos: Arc<Chaos>, data: PathBuf) -> Sampler {
        Sampler {
            supervisor,
            chaos,
            data,
            started: Instant::now(),
            samples: Samples::default(),
            row_started: Duration::ZERO,
            row_requests: 0,
            row_errors: 0,
            row_restarts: 0,
            row_latencies: Snapshot::empty(),
            row_max_rss_kib: 0,
            row_max_fds: 0,
        }
    }

    /// Samples the service once; returns the sample.
    fn look(&mut self) -> Option<Sample> {
        let pid = self.supervisor.pid()?;
        let sample = probe::sample(pid)?;
        let now = self.started.elapsed();
        match self.samples.incarnations.last_mut() {
            Some(current) if current.pid == pid => {
                current.last_seen = now;
                current.last = sample;
                current.max_rss_kib = current.max_rss_kib.max(sample.rss_kib);
                current.min_fds = current.min_fds.min(sample.fds);
                current.max_fds = current.max_fds.max(sample.fds);
            }
            _ => self.samples.incarnations.push(Incarnation {
                pid,
                first_seen: now,
                last_seen: now,
                last: sample,
                max_rss_kib: sample.rss_kib,
                min_fds: sample.fds,
                max_fds: sample.fds,
            }),
        }
        self.row_max_rss_kib = self.row_max_rss_kib.max(sample.rss_kib);
        self.row_max_fds = self.row_max_fds.max(sample.fds);
        Some(sample)
    }

    /// Closes the current row (`minute`, or the drain for `None`) with `last` as its last
    /// sample, and reports it on stderr.
    fn close_row(&mut self, minute: Option<usize>, last: Option<Sample>) {
        let tally = self.chaos.tally();
        let now = self.started.elapsed();
        let (requests, errors, restarts) = (
            load(&tally.requests),
            load(&tally.connection_errors),
            load(&tally.restarts),
        );
        let latencies = self.chaos.latencies().snapshot();
        let row = Row {
            minute,
            seconds: (now - self.row_started).as_secs_f64(),
            requests: requests - self.row_requests,
            latencies: latencies.since(&self.row_latencies),
            connection_errors: errors - self.row_errors,
            restarts: restarts - self.row_restarts,
            incarnation: self.samples.incarnations.len(),
            last,
            max_rss_kib: self.row_max_rss_kib,
            max_fds: self.row_max_fds,
            data_bytes: probe::dir_bytes(&self.data),
            load_average: probe::load_average(),
        };
        eprintln!("payments: {}", row_line(&row));
        self.samples.rows.push(row);
        self.row_started = now;
        self.row_requests = requests;
        self.row_errors = errors;
        self.row_restarts = restarts;
        self.row_latencies = latencies;
        self.row_max_rss_kib = 0;
        self.row_max_fds = 0;
    }
}

/// Runs the sampler until `done` (at most `bound`): a sample a second, a row a minute, and
/// the last row (the drain) when `done` is set.
fn sample_until(mut sampler: Sampler, done: &AtomicBool, bound: Duration) -> Samples {
    let ticks = bound.as_secs() / SAMPLE_EVERY.as_secs().max(1) + 1;
    let mut last = sampler.look();
    let mut minute = 0;
    for _ in 0..ticks {
        if done.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
        if let Some(sample) = sampler.look() {
            last = Some(sample);
        }
        if sampler.started.elapsed() >= ROW * (minute + 1) as u32 {
            minute += 1;
            sampler.close_row(Some(minute), last);
        }
    }
    last = sampler.look().or(last);
    // The drain's row, unless the load ended with the last minute.
    let drain = sampler
        .started
        .elapsed()
        .saturating_sub(sampler.row_started);
    let idle = load(&sampler.chaos.tally().requests) == sampler.row_requests;
    if drain >= SAMPLE_EVERY || !idle || sampler.samples.rows.is_empty() {
        sampler.close_row(None, last);
    }
    sampler.samples
}

/// What the load left behind.
struct Driven {
    /// Whether every payment started finished within [`DRAIN_MAX`] of the deadline.
    drained: bool,
    /// When the load stopped (all payments finished or the drain limit) since the start.
    ended: Duration,
    /// For each crash: when the service was killed, and how long until its successor listened
    /// (recovery of the files included).
    crashes: Vec<(Duration, Duration)>,
}

/// Drives the service with `connections` workers until `run_for` has passed (then lets the
/// payments in flight finish), crashing it `crashes` times at evenly spaced times.
async fn drive(
    chaos: Arc<Chaos>,
    generator: Arc<Generator>,
    connections: usize,
    supervisor: Arc<Supervisor>,
    crashes: usize,
    run_for: Duration,
) -> Driven {
    let started = tokio::time::Instant::now();
    let deadline = started + run_for;
    let monkey = {
        let chaos = Arc::clone(&chaos);
        tokio::spawn(async move {
            let mut done = Vec::new();
            for n in 1..=crashes {
                tokio::time::sleep_until(started + run_for * n as u32 / (crashes + 1) as u32).await;
                let supervisor = Arc::clone(&supervisor);
                let killed = started.elapsed();
                match tokio::task::spawn_blocking(move || supervisor.crash_and_restart()).await {
                    Ok(Ok(())) => {
                        add(&chaos.tally().restarts);
                        let back = started.elapsed() - killed;
                        eprintln!(
                            "payments: crash {n}: SIGKILL at {:.0} s, listening again {:.1} s later",
                            killed.as_secs_f64(),
                            back.as_secs_f64()
                        );
                        done.push((killed, back));
                    }
                    Ok(Err(error)) => eprintln!("payments: restart failed: {error}"),
                    Err(error) => eprintln!("payments: restart failed: {error}"),
                }
            }
            done
        })
    };
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (chaos, generator) = (Arc::clone(&chaos), Arc::clone(&generator));
            tokio::spawn(async move {
                // Bounded by the deadline and by PAYMENTS_MAX (`next` returns None).
                while tokio::time::Instant::now() < deadline {
                    let Some((i, payment)) = generator.next() else {
                        break;
                    };
                    let outcome = chaos.run(payment).await;
                    generator.settle(i, outcome);
                    chaos.tally().payments_done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let aborts: Vec<_> = workers.iter().map(|w| w.abort_handle()).collect();
    let all = async {
        for worker in workers {
            let _ = worker.await;
        }
    };
    let drained = tokio::time::timeout_at(deadline + DRAIN_MAX, all)
        .await
        .is_ok();
    if !drained {
        aborts.iter().for_each(|a| a.abort());
    }
    let ended = started.elapsed();
    let crashes = monkey.await.unwrap_or_default();
    Driven {
        drained,
        ended,
        crashes,
    }
}

/// `--soak`: the service as a child process under load for `--minutes`, crashed `--crashes`
/// times, its memory and descriptors sampled; then the chaos run's audit and the soak's tables.
pub fn soak_main(args: &Args) -> Result<ExitCode, BoxError> {
    let temp = tempfile::tempdir()?;
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&data)?;
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = probe::load_average();
    let started = Instant::now();
    let server_args = match args.cache_mib {
        Some(mib) => vec!["--cache-mib".to_owned(), mib.to_string()],
        None => Vec::new(),
    };
    let supervisor = Arc::new(Supervisor::start_with(data.clone(), server_args)?);
    eprintln!(
        "payments: soak for {} min at {} connections, {} crashes; service on http://{} \
         (child process, data in {}, page cache per database: {})",
        args.minutes,
        args.connections,
        args.crashes,
        supervisor.addr(),
        data.display(),
        cache_text(args.cache_mib)
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let chaos = Arc::new(Chaos::limited(
        supervisor.addr(),
        args.connections,
        Rng::new(args.seed ^ 0x5EED),
    ));
    let generator = Arc::new(Generator {
        rng: Rng::new(args.seed),
        book: Mutex::new(Book::default()),
    });
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let sampler = Sampler::new(Arc::clone(&supervisor), Arc::clone(&chaos), data.clone());
        let done = Arc::clone(&done);
        let bound = run_for + DRAIN_MAX + Duration::from_secs(60);
        std::thread::Builder::new()
            .name("soak-sampler".into())
            .spawn(move || sample_until(sampler, &done, bound))?
    };
    let driven = runtime.block_on(drive(
        Arc::clone(&chaos),
        Arc::clone(&generator),
        args.connections,
        Arc::clone(&supervisor),
        args.crashes,
        run_for,
    ));
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| "the sampler panicked")?;
    let elapsed = started.elapsed();
    let load_after = probe::load_average();

    supervisor.stop()?;
    let audit = FileLedger::open(&data.join("ledger.redb"))?.audit()?;
    let store = Store::open(data.join("idempotency.redb"))?;
    let orphans = store.orphans(100_000)?.len();
    drop(store);

    let book = std::mem::take(&mut *generator.book.lock().map_err(|_| "poisoned")?);
    let healthy = report::print(&report::Report {
        payments: &book.payments,
        outcomes: &book.outcomes,
        audit: &audit,
        tally: chaos.tally(),
        orphans,
        elapsed,
        store: "one service process on the embedded file store",
        processes: 1,
    });
    let restarts = load(&chaos.tally().restarts);
    print_soak(&Summary {
        args,
        chaos: &chaos,
        samples: &samples,
        driven: &driven,
        duplicates: audit.duplicates,
        cores,
        load_before,
        load_after,
    });
    if !driven.drained {
        println!(
            "  FAIL: payments still in flight {} s after the deadline",
            DRAIN_MAX.as_secs()
        );
    }
    if restarts != args.crashes as u64 {
        println!("  FAIL: {restarts} of {} restarts succeeded", args.crashes);
    }
    if !(healthy && driven.drained && restarts == args.crashes as u64) {
        eprintln!("server log: {}", data.join("server.log").display());
        let _ = temp.keep();
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the soak's own summary is made of.
struct Summary<'a> {
    args: &'a Args,
    chaos: &'a Chaos,
    samples: &'a Samples,
    driven: &'a Driven,
    duplicates: u64,
    cores: usize,
    load_before: Option<f64>,
    load_after: Option<f64>,
}

/// Prints the soak's figures: totals, the per-minute table and the service's incarnations.
fn print_soak(s: &Summary<'_>) {
    let tally = s.chaos.tally();
    let latencies = s.chaos.latencies().snapshot();
    let requests = load(&tally.requests);
    let seconds = s.driven.ended.as_secs_f64().max(f64::MIN_POSITIVE);
    let last = s.samples.incarnations.last();
    let peak = s
        .samples
        .incarnations
        .iter()
        .map(Incarnation::peak_rss_kib)
        .max();
    let (fds_min, fds_max) = s
        .samples
        .incarnations
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), i| {
            (lo.min(i.min_fds), hi.max(i.max_fds))
        });
    let rows: Vec<(&str, String)> = vec![
        (
            "wall time under load",
            format!(
                "{:.1} min (+ {:.1} s drain)",
                s.args.minutes,
                (s.driven.ended.as_secs_f64() - s.args.minutes * 60.0).max(0.0)
            ),
        ),
        (
            "service page cache per database",
            cache_text(s.args.cache_mib),
        ),
        (
            "connections (keep-alive, max in flight)",
            s.args.connections.to_string(),
        ),
        (
            "connections opened",
            load(&tally.connections_opened).to_string(),
        ),
        (
            "requests/s (all requests, whole run)",
            format!("{:.0}", requests as f64 / seconds),
        ),
        (
            "answered requests/s",
            format!("{:.0}", latencies.count() as f64 / seconds),
        ),
        ("latency p50 (answered)", ms(latencies.quantile(0.50))),
        ("latency p99 (answered)", ms(latencies.quantile(0.99))),
        (
            "connection errors",
            load(&tally.connection_errors).to_string(),
        ),
        (
            "requests a running service left hanging",
            load(&tally.unanswered).to_string(),
        ),
        (
            "service crashes (SIGKILL)",
            load(&tally.restarts).to_string(),
        ),
        (
            "SIGKILL at, then listening again after",
            s.driven
                .crashes
                .iter()
                .map(|(at, back)| format!("{:.0} s +{:.1} s", at.as_secs_f64(), back.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("server peak RSS (VmHWM, any process)", mib(peak)),
        ("server final RSS", mib(last.map(|i| i.last.rss_kib))),
        (
            "server open fds (final; min..max)",
            match last {
                Some(i) => format!("{} ({fds_min}..{fds_max})", i.last.fds),
                None => "-".to_owned(),
            },
        ),
        ("duplicates executed", s.duplicates.to_string()),
        (
            "machine",
            format!(
                "{} cores, load {} -> {}",
                s.cores,
                load_text(s.load_before),
                load_text(s.load_after)
            ),
        ),
    ];
    println!();
    println!(
        "soak: {} min, {} connections, {} crashes",
        s.args.minutes, s.args.connections, s.args.crashes
    );
    println!();
    for (name, value) in &rows {
        println!("  {name:<40} {value:>24}");
    }
    println!();
    println!("per minute (RSS and fds: the service's, sampled every second; MiB)");
    println!();
    println!("  {}", row_header());
    for row in &s.samples.rows {
        println!("  {}", row_table(row));
    }
    println!();
    println!("service processes (each crash starts a new one)");
    println!();
    println!(
        "  {:>3} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8}  ended",
        "#", "pid", "from s", "to s", "peak RSS", "last RSS", "fds", "max fds"
    );
    let count = s.samples.incarnations.len();
    for (n, i) in s.samples.incarnations.iter().enumerate() {
        println!(
            "  {:>3} {:>8} {:>9.0} {:>9.0} {:>9} {:>9} {:>6} {:>8}  {}",
            n + 1,
            i.pid,
            i.first_seen.as_secs_f64(),
            i.last_seen.as_secs_f64(),
            mib(Some(i.peak_rss_kib())),
            mib(Some(i.last.rss_kib)),
            i.last.fds,
            i.max_fds,
            if n + 1 < count {
                "SIGKILL"
            } else {
                "stopped cleanly"
            }
        );
    }
    println!();
}

fn row_header() -> String {
    format!(
        "{:>4} {:>7} {:>6} {:>8} {:>8} {:>6} {:>5} {:>4} {:>7} {:>7} {:>7} {:>5} {:>7} {:>7} {:>8} {:>5}",
        "min",
        "req/s",
        "ans/s",
        "p50 ms",
        "p99 ms",
        "conn e",
        "crash",
        "proc",
        "RSS",
        "max RSS",
        "VmHWM",
        "fds",
        "max fds",
        "threads",
        "data MiB",
        "load"
    )
}

fn row_table(row: &Row) -> String {
    let seconds = row.seconds.max(f64::MIN_POSITIVE);
    format!(
        "{:>4} {:>7.0} {:>6.0} {:>8} {:>8} {:>6} {:>5} {:>4} {:>7} {:>7} {:>7} {:>5} {:>7} {:>7} {:>8.1} {:>5}",
        row.minute
            .map_or_else(|| "end".to_owned(), |m| m.to_string()),
        row.requests as f64 / seconds,
        row.latencies.count() as f64 / seconds,
        ms(row.latencies.quantile(0.50)),
        ms(row.latencies.quantile(0.99)),
        row.connection_errors,
        row.restarts,
        row.incarnation,
        mib(row.last.map(|s| s.rss_kib)),
        mib(Some(row.max_rss_kib)),
        mib(row.last.map(|s| s.peak_rss_kib)),
        row.last
            .map_or_else(|| "-".to_owned(), |s| s.fds.to_string()),
        row.max_fds,
        row.last
            .map_or_else(|| "-".to_owned(), |s| s.threads.to_string()),
        row.data_bytes as f64 / (1024.0 * 1024.0),
        load_text(row.load_average),
    )
}

/// The row as one line of progress on stderr.
fn row_line(row: &Row) -> String {
    format!(
        "{} ({:.0} s): {:.0} requests/s, p50 {} ms, p99 {} ms, {} connection errors, \
         {} crashes; service RSS {} MiB (VmHWM {}), {} fds, {} threads; data {:.1} MiB; load {}",
        row.minute
            .map_or_else(|| "drain".to_owned(), |m| format!("minute {m}")),
        row.seconds,
        row.requests as f64 / row.seconds.max(f64::MIN_POSITIVE),
        ms(row.latencies.quantile(0.50)),
        ms(row.latencies.quantile(0.99)),
        row.connection_errors,
        row.restarts,
        mib(row.last.map(|s| s.rss_kib)),
        mib(row.last.map(|s| s.peak_rss_kib)),
        row.last
            .map_or_else(|| "-".to_owned(), |s| s.fds.to_string()),
        row.last
            .map_or_else(|| "-".to_owned(), |s| s.threads.to_string()),
        row.data_bytes as f64 / (1024.0 * 1024.0),
        load_text(row.load_average),
    )
}

fn ms(latency: Option<Duration>) -> String {
    latency.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1}", d.as_secs_f64() * 1000.0),
    )
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn cache_text(cache_mib: Option<usize>) -> String {
    cache_mib.map_or_else(
        || "1024 MiB (redb's default)".to_owned(),
        |m| format!("{m} MiB"),
    )
}

fn load_text(load: Option<f64>) -> String {
    load.map_or_else(|| "-".to_owned(), |l| format!("{l:.1}"))
}
