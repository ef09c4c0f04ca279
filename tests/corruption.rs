//! Corrupted database files: every open, `get` and `claim` on a damaged, closed idemstore file
//! returns correct data or a typed error — never a panic, never a hang, never a replay of bytes
//! other than the ones completed for that key.
//!
//! A fixture database (completed records with distinct outcomes of 100 B to 6 KiB, failed and
//! in-flight records, freed pages, everything under one fingerprint so that a record showing up
//! under another key would replay) is written once and closed. Each case damages a copy of its
//! bytes — 1 to 8 random bit flips at random offsets, a truncation at a random length, or 1 to 3
//! whole 4 KiB pages zeroed — then opens it twice:
//!
//! - **default** (`verify_on_open(true)`): redb verifies every page checksum on open. Every
//!   assertion applies: no panic, no hang, no wrong replay, no lost or altered record, no
//!   fencing token at or below one granted before.
//! - **`verify_on_open(false)`**: redb trusts a file that was closed cleanly and checks no page
//!   checksum on reads. Only record envelopes are CRC-checked (by idemstore, over the storage
//!   key and the record), so damage to redb's own pages may panic or hide a record; this mode is
//!   measured and printed, and asserted never to hang (a panic on the store's writer thread must
//!   reach the callers as an error, not leave them waiting) and never to replay wrong bytes.
//!
//! Every operation runs under `catch_unwind`, on a worker thread with a deadline. Answers are
//! classified: correct, typed error (by variant), or a violation: panic (on the caller's or on a
//! store thread), hang, wrong replay (a `Replay` whose bytes are not exactly those completed for
//! that key — keys found in the damaged file that the fixture never wrote are probed too), lost
//! or altered record (a completed record that reads back absent or different, so the request
//! would run twice), token regression.
//!
//! Also: record envelopes rewritten through redb (bit flips, truncations, garbage, a byte
//! appended) must be reported as `Error::Corrupt`.
//!
//! Not covered: a file truncated to 0 bytes, which `Store::open` documents as an empty file and
//! initialises as a new database.
//!
//! Default run: a few hundred images per family, a few seconds in debug builds.
//! `IDEMSTORE_LONG=1` runs 3000 bit-flip, 1000 truncation, 2000 zeroed-page and 3000 envelope
//! images (`IDEMSTORE_CORRUPTION_CASES=N` sets the count per family);
//! `IDEMSTORE_CORRUPTION_SEED=S` reruns one seed; `IDEMSTORE_CORRUPTION_BACKTRACE=1` prints the
//! idemstore and redb frames of every panic; `IDEMSTORE_CORRUPTION_TRACE=1` names each image
//! before it is opened (to find the image behind a process abort, which no `catch_unwind`
//! stops: see RELIABILITY.md on `verify_on_open(false)` in release builds).

mod common;
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use common::{DAY, Injected, InjectedFault, T0_MS, TestResult};
use idemstore::{Claim, ClaimOptions, Error, ManualClock, RecordState, Store};
use redb::{ReadableDatabase, ReadableTable};
use support::long_run;
use support::rng::Rng;

const SCOPE: &str = "tenant";
const FINGERPRINT: &[u8] = b"same-request";
const PAGE: usize = 4096;
/// How long one image may take before it counts as a hang.
const IMAGE_DEADLINE: Duration = Duration::from_secs(20);

const RECORDS: redb::TableDefinition<&[u8], &[u8]> =
    redb::TableDefinition::new("idemstore.records");

/// The PRNG stream of `seed`, as the seeds this file names were recorded with.
fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed ^ 0x9E37_79B9_7F4A_7C15)
}

// ----- configuration -----

/// Images per family: `IDEMSTORE_CORRUPTION_CASES`, else the default or long figure.
fn cases(default: usize, long: usize) -> usize {
    std::env::var("IDEMSTORE_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if long_run() { long } else { default })
}

/// The seeds to run: one if `IDEMSTORE_CORRUPTION_SEED` is set, else `0..n`.
fn seeds(n: usize) -> Vec<u64> {
    match std::env::var("IDEMSTORE_CORRUPTION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..n as u64).collect(),
    }
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs when there is one: thousands of small files, each fsynced on open.
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("a temporary directory")
}

// ----- panics: recorded, kept quiet on the threads that are expected to see them -----

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn quiet_thread(name: &str) -> bool {
    name.starts_with("corrupt-image") || name.starts_with("idemstore-")
}

fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            if quiet_thread(name) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let mut entry = format!("[{name}] {message} at {at}");
                if std::env::var_os("IDEMSTORE_CORRUPTION_BACKTRACE").is_some() {
                    let trace = std::backtrace::Backtrace::force_capture().to_string();
                    // The frames of idemstore and redb only, so the path to the panic is short.
                    for line in trace
                        .lines()
                        .filter(|l| l.contains("idemstore::") || l.contains("redb::"))
                    {
                        let _ = write!(entry, "\n        {}", line.trim());
                    }
                    eprintln!("{entry}");
                }
                if let Ok(mut p) = PANICS.lock() {
                    p.push(entry);
                }
            } else {
                default(info);
            }
        }));
    });
}

fn take_panics() -> Vec<String> {
    PANICS
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default()
}

/// Image checks run one at a time, so that a panic on a store's own thread is attributed to
/// the image that caused it.
static SERIAL: Mutex<()> = Mutex::new(());

// ----- the fixture -----

#[derive(Clone, PartialEq, Eq)]
enum Expect {
    Completed(Vec<u8>),
    Failed,
    InFlight,
    /// Never claimed (or a key found in a damaged file that the fixture never wrote).
    Absent,
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Completed(outcome) => write!(f, "Completed({} bytes)", outcome.len()),
            Expect::Failed => f.write_str("Failed"),
            Expect::InFlight => f.write_str("InFlight"),
            Expect::Absent => f.write_str("Absent"),
        }
    }
}

/// A short description of what a `get` read.
fn describe(found: Option<&idemstore::Record>) -> String {
    match found {
        None => "nothing".into(),
        Some(r) => match &r.state {
            RecordState::Completed { outcome } => format!(
                "Completed({} bytes, {:?}...)",
                outcome.len(),
                String::from_utf8_lossy(outcome.get(..24).unwrap_or(outcome))
            ),
            other => format!("{other:?}"),
        },
    }
}

struct Fixture {
    image: Vec<u8>,
    keys: BTreeMap<Vec<u8>, Expect>,
    /// The largest fencing token granted before the file was closed.
    max_token: u64,
}

fn outcome_of(i: usize) -> Vec<u8> {
    // Distinct per key and of varied size (up to 6 KiB: some values span pages).
    let len = 100 + (i * 977) % 6000;
    let mut out = format!("outcome of done-{i:02}|").into_bytes();
    let mut x = i as u64 + 1;
    while out.len() < len {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        out.push(b'a' + (x >> 59) as u8);
    }
    out
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build_fixture().expect("the fixture database is written"))
}

fn build_fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fixture.redb");
    let clock = ManualClock::new(T0_MS);
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open(&path)?;
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(3_600))
        .retention(DAY);
    let mut keys = BTreeMap::new();
    let claim = |key: &str| -> Result<idemstore::Lease, Box<dyn std::error::Error>> {
        match store.claim(SCOPE, key, FINGERPRINT, &options)? {
            Claim::Acquired(lease) => Ok(lease),
            other => Err(format!("fixture claim of {key}: {other:?}").into()),
        }
    };
    for i in 0..48 {
        let key = format!("done-{i:02}");
        let lease = claim(&key)?;
        store.checkpoint(&lease, format!("step {i}").as_bytes())?;
        store.complete(&lease, &outcome_of(i), DAY)?;
        keys.insert(key.into_bytes(), Expect::Completed(outcome_of(i)));
    }
    for i in 0..6 {
        let key = format!("fail-{i}");
        let lease = claim(&key)?;
        store.checkpoint(&lease, b"half way")?;
        store.fail(&lease)?;
        keys.insert(key.into_bytes(), Expect::Failed);
    }
    for i in 0..6 {
        let key = format!("busy-{i}");
        claim(&key)?;
        keys.insert(key.into_bytes(), Expect::InFlight);
    }
    // Some churn, so that the file has freed and reused pages too.
    for i in 0..16 {
        let key = format!("gone-{i:02}");
        let lease = claim(&key)?;
        store.complete(&lease, &vec![b'x'; 300 * i], DAY)?;
        store.forget(SCOPE, &key)?;
    }
    for i in 0..4 {
        keys.insert(format!("none-{i}").into_bytes(), Expect::Absent);
    }
    let max_token = store.stats()?.next_token - 1;
    store.close()?;
    Ok(Fixture {
        image: std::fs::read(&path)?,
        keys,
        max_token,
    })
}

// ----- damage -----

#[derive(Debug, Clone)]
enum Damage {
    /// Flip these bits (absolute bit offsets into the file).
    BitFlips(Vec<u64>),
    /// Cut the file to this length.
    Truncate(usize),
    /// Zero these 4 KiB pages (page indexes).
    ZeroPages(Vec<usize>),
}

impl Damage {
    fn apply(&self, image: &[u8]) -> Vec<u8> {
        let mut out = image.to_vec();
        match self {
            Damage::BitFlips(bits) => {
                for bit in bits {
                    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
                    if let Some(b) = out.get_mut(byte) {
                        *b ^= 1 << (bit % 8);
                    }
                }
            }
            Damage::Truncate(len) => out.truncate(*len),
            Damage::ZeroPages(pages) => {
                for page in pages {
                    let start = page * PAGE;
                    let end = (start + PAGE).min(out.len());
                    if let Some(range) = out.get_mut(start..end) {
                        range.fill(0);
                    }
                }
            }
        }
        out
    }
}

fn bit_flips(seed: u64, len: usize) -> Damage {
    let mut rng = seeded(seed);
    let n = 1 + rng.index(8);
    // Half the cases aim at the first pages (redb's header and the pages written last often
    // live there), half anywhere in the file.
    let span = if rng.index(2) == 0 {
        len.min(4 * PAGE)
    } else {
        len
    };
    Damage::BitFlips(
        (0..n)
            .map(|_| (rng.index(span) * 8 + rng.index(8)) as u64)
            .collect(),
    )
}

fn truncation(seed: u64, len: usize) -> Damage {
    let mut rng = seeded(seed);
    // At least one byte: an empty file is a new database by definition (see the module docs).
    Damage::Truncate(match rng.index(4) {
        0 => 1 + rng.index(PAGE - 1),
        1 => (1 + rng.index(len / PAGE - 1)) * PAGE,
        _ => 1 + rng.index(len - 1),
    })
}

fn zeroed_pages(seed: u64, len: usize) -> Damage {
    let mut rng = seeded(seed);
    let pages = len.div_ceil(PAGE);
    let n = 1 + rng.index(3);
    Damage::ZeroPages((0..n).map(|_| rng.index(pages)).collect())
}

/// How the damaged file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `Store::builder()` as it comes: `verify_on_open(true)`.
    Default,
    /// `verify_on_open(false)`: redb trusts a file that was closed cleanly.
    NoVerify,
}

// ----- classification -----

/// What happened to one image in one open mode, by category.
#[derive(Debug, Default, Clone)]
struct Tally {
    images: usize,
    opened: usize,
    /// Open refused, by error variant.
    open_errors: BTreeMap<String, usize>,
    /// Operations on an opened store that answered correctly.
    correct: usize,
    /// Operations on an opened store that returned a typed error, by variant.
    op_errors: BTreeMap<String, usize>,
    panics: Vec<String>,
    /// Where the panics came from: `[thread] message at file:line`, with counts.
    panic_sites: BTreeMap<String, usize>,
    hangs: Vec<String>,
    wrong_replays: Vec<String>,
    lost: Vec<String>,
    token_regressions: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.images += other.images;
        self.opened += other.opened;
        for (k, v) in other.open_errors {
            *self.open_errors.entry(k).or_default() += v;
        }
        self.correct += other.correct;
        for (k, v) in other.op_errors {
            *self.op_errors.entry(k).or_default() += v;
        }
        self.panics.extend(other.panics);
        for (k, v) in other.panic_sites {
            *self.panic_sites.entry(k).or_default() += v;
        }
        self.hangs.extend(other.hangs);
        self.wrong_replays.extend(other.wrong_replays);
        self.lost.extend(other.lost);
        self.token_regressions.extend(other.token_regressions);
    }

    fn summary(&self, name: &str) -> String {
        let mut s = format!(
            "{name}: {} images, {} opened, open refused {:?}; operations: {} correct, typed errors {:?}; \
             panics {}, hangs {}, wrong replays {}, lost/altered {}, token regressions {}",
            self.images,
            self.opened,
            self.open_errors,
            self.correct,
            self.op_errors,
            self.panics.len(),
            self.hangs.len(),
            self.wrong_replays.len(),
            self.lost.len(),
            self.token_regressions.len(),
        );
        for (site, n) in &self.panic_sites {
            let _ = write!(s, "\n    {n} x panic site {site}");
        }
        for (what, list) in [
            ("panic", &self.panics),
            ("hang", &self.hangs),
            ("wrong replay", &self.wrong_replays),
            ("lost/altered", &self.lost),
            ("token regression", &self.token_regressions),
        ] {
            for item in list.iter().take(5) {
                let _ = write!(s, "\n    {what}: {item}");
            }
        }
        s
    }
}

fn variant(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_owned()
}

/// Runs `f` under `catch_unwind`; a panic is recorded against `what`.
fn guarded<T>(tally: &mut Tally, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tally.panics.push(format!("{what}: {message}"));
            None
        }
    }
}

/// Keys that a damaged file holds beyond the fixture's (a flipped bit in a stored key), read
/// through redb directly: they are probed too, and must never replay.
fn extra_keys(path: &Path, known: &BTreeMap<Vec<u8>, Expect>) -> Vec<Vec<u8>> {
    let scan = || -> Option<Vec<Vec<u8>>> {
        let db = redb::ReadOnlyDatabase::open(path).ok()?;
        let read = db.begin_read().ok()?;
        let table = read.open_table(RECORDS).ok()?;
        let mut out = Vec::new();
        for entry in table.iter().ok()?.take(10_000) {
            let (k, _) = entry.ok()?;
            let k = k.value();
            if let Some((&len, rest)) = k.split_first()
                && usize::from(len) == SCOPE.len()
                && rest.starts_with(SCOPE.as_bytes())
            {
                let key = rest.get(SCOPE.len()..).unwrap_or_default();
                if !key.is_empty() && key.len() <= 255 && !known.contains_key(key) {
                    out.push(key.to_vec());
                }
            }
        }
        Some(out)
    };
    // Only an aid to the oracle: redb may panic on a damaged file here, which is not the
    // store's doing and is not counted.
    catch_unwind(AssertUnwindSafe(scan))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Opens the damaged file at `path` and checks every key of the fixture (and any extra key
/// found in the file) through `get` and `claim`, then a fresh write.
fn check_opened_image(path: &Path, mode: Mode, label: &str) -> Tally {
    let fixture = fixture();
    let mut tally = Tally {
        images: 1,
        ..Tally::default()
    };
    let mut keys = fixture.keys.clone();
    for key in extra_keys(path, &fixture.keys) {
        keys.insert(key, Expect::Absent);
    }
    // Panics of the oracle's own scan are redb's, not the store's.
    let _ = take_panics();
    let clock = ManualClock::new(T0_MS);
    let opened = guarded(&mut tally, &format!("{label}: open"), || {
        let builder = Store::builder().clock(clock.clone()).sweep_interval(None);
        match mode {
            Mode::Default => builder,
            Mode::NoVerify => builder.verify_on_open(false),
        }
        .open(path)
    });
    let store = match opened {
        None => return tally,
        Some(Err(e)) => {
            *tally.open_errors.entry(variant(&e)).or_default() += 1;
            return tally;
        }
        Some(Ok(store)) => store,
    };
    tally.opened = 1;
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(60))
        .retention(DAY);

    // Reads first, while the store has written nothing but its epoch.
    for (key, expect) in &keys {
        let shown = String::from_utf8_lossy(key).into_owned();
        let what = format!("{label}: get {shown}");
        let Some(result) = guarded(&mut tally, &what, || store.get(SCOPE, key)) else {
            continue;
        };
        match result {
            Err(e) => *tally.op_errors.entry(variant(&e)).or_default() += 1,
            Ok(found) => {
                let ok = match (expect, found.as_ref().map(|r| (&r.state, &r.fingerprint))) {
                    (Expect::Absent, None) => true,
                    (Expect::Absent, Some(_)) => {
                        // A record under a key the fixture never wrote: only a replay of it
                        // would do harm, which the claim below checks.
                        true
                    }
                    (_, Some((_, fp))) if fp.as_slice() != FINGERPRINT => false,
                    (Expect::Completed(want), Some((RecordState::Completed { outcome }, _))) => {
                        outcome == want
                    }
                    (Expect::Failed, Some((RecordState::Failed { .. }, _))) => true,
                    (Expect::InFlight, Some((RecordState::InFlight { .. }, _))) => true,
                    _ => false,
                };
                if ok {
                    tally.correct += 1;
                } else {
                    tally.lost.push(format!(
                        "{what}: expected {expect:?}, read {}",
                        describe(found.as_ref())
                    ));
                }
            }
        }
    }

    // Then claims: replays must be exact; acquisitions carry fresh tokens.
    for (key, expect) in &keys {
        let shown = String::from_utf8_lossy(key).into_owned();
        let what = format!("{label}: claim {shown}");
        let Some(result) = guarded(&mut tally, &what, || {
            store.claim(SCOPE, key, FINGERPRINT, &options)
        }) else {
            continue;
        };
        match result {
            Err(e) => *tally.op_errors.entry(variant(&e)).or_default() += 1,
            Ok(Claim::Replay(replay)) => match expect {
                Expect::Completed(want) if *want == replay.outcome => tally.correct += 1,
                _ => tally.wrong_replays.push(format!(
                    "{what}: expected {expect:?}, replayed {:?}",
                    String::from_utf8_lossy(replay.outcome.get(..40).unwrap_or(&replay.outcome))
                )),
            },
            Ok(Claim::Acquired(lease)) => {
                if lease.token() <= fixture.max_token {
                    tally.token_regressions.push(format!(
                        "{what}: token {} after {} granted",
                        lease.token(),
                        fixture.max_token
                    ));
                }
                match expect {
                    Expect::Completed(_) => tally
                        .lost
                        .push(format!("{what}: a completed request was acquired again")),
                    _ => tally.correct += 1,
                }
            }
            Ok(other) => match expect {
                // A live in-flight record of this epoch is impossible here (every lease of
                // the fixture is from an earlier epoch): the state was altered.
                Expect::Completed(_) | Expect::InFlight | Expect::Failed | Expect::Absent => {
                    tally.lost.push(format!("{what}: answered {other:?}"));
                }
            },
        }
    }

    // A fresh write, complete and replay on the damaged file.
    let what = format!("{label}: fresh write");
    let fresh = guarded(
        &mut tally,
        &what,
        || -> idemstore::Result<Option<String>> {
            let Claim::Acquired(lease) = store.claim(SCOPE, "fresh", FINGERPRINT, &options)? else {
                return Ok(Some("a fresh key did not acquire".into()));
            };
            store.complete(&lease, b"fresh outcome", DAY)?;
            match store.claim(SCOPE, "fresh", FINGERPRINT, &options)? {
                Claim::Replay(r) if r.outcome == b"fresh outcome" => Ok(None),
                other => Ok(Some(format!("fresh key answered {other:?} after complete"))),
            }
        },
    );
    match fresh {
        None => {}
        Some(Err(e)) => *tally.op_errors.entry(variant(&e)).or_default() += 1,
        Some(Ok(None)) => tally.correct += 1,
        Some(Ok(Some(problem))) => tally.wrong_replays.push(format!("{what}: {problem}")),
    }
    let _ = guarded(&mut tally, &format!("{label}: close"), || store.close());
    tally
}

/// Writes `bytes` to a fresh file and checks it in one open mode, on a worker thread with a
/// deadline. Store-thread panics seen meanwhile are attributed to this image.
fn check_image(dir: &Path, bytes: &[u8], mode: Mode, label: &str) -> Tally {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if std::env::var_os("IDEMSTORE_CORRUPTION_TRACE").is_some() {
        eprintln!("[trace] {label}");
    }
    let path: PathBuf = dir.join(format!("image-{mode:?}.redb"));
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).expect("writing the damaged image");
    let _ = take_panics();
    let (tx, rx) = mpsc::channel();
    let label_owned = label.to_owned();
    let worker_path = path.clone();
    std::thread::Builder::new()
        .name("corrupt-image".into())
        .spawn(move || {
            let tally = check_opened_image(&worker_path, mode, &label_owned);
            let _ = tx.send(tally);
        })
        .expect("spawning a worker");
    let mut tally = match rx.recv_timeout(IMAGE_DEADLINE) {
        Ok(t) => t,
        Err(_) => Tally {
            images: 1,
            hangs: vec![format!("{label}: no answer within {IMAGE_DEADLINE:?}")],
            ..Tally::default()
        },
    };
    // Panics on the store's own threads (writer, sweeper) that the caller never saw.
    for p in take_panics() {
        if !p.starts_with("[corrupt-image]") {
            tally.panics.push(format!("{label}: {p}"));
        }
        let site: String = p.chars().take(160).collect();
        *tally.panic_sites.entry(site).or_default() += 1;
    }
    let _ = std::fs::remove_file(&path);
    tally
}

/// Damages the fixture per seed with `damage` and checks each image in both open modes:
/// returns the tallies of the default open and of `verify_on_open(false)`.
fn run_family(name: &str, n: usize, damage: impl Fn(u64, usize) -> Damage) -> (Tally, Tally) {
    install_panic_hook();
    let fixture = fixture();
    let dir = scratch_dir();
    let started = Instant::now();
    let (mut default, mut no_verify) = (Tally::default(), Tally::default());
    for seed in seeds(n) {
        let d = damage(seed, fixture.image.len());
        let bytes = d.apply(&fixture.image);
        let label = format!("{name} seed {seed} {d:?}");
        default.merge(check_image(dir.path(), &bytes, Mode::Default, &label));
        no_verify.merge(check_image(
            dir.path(),
            &bytes,
            Mode::NoVerify,
            &format!("{label} [verify_on_open(false)]"),
        ));
    }
    eprintln!(
        "{}\n{}\n({name}: fixture file of {} bytes, {:.1?})",
        default.summary(&format!("{name}, default open (verify_on_open(true))")),
        no_verify.summary(&format!("{name}, verify_on_open(false)")),
        fixture.image.len(),
        started.elapsed()
    );
    (default, no_verify)
}

/// The default open: no panic, hang, wrong replay, lost record or token regression at all.
fn assert_default_is_safe(name: &str, t: &Tally) {
    assert!(
        t.panics.is_empty()
            && t.hangs.is_empty()
            && t.wrong_replays.is_empty()
            && t.lost.is_empty()
            && t.token_regressions.is_empty(),
        "{}",
        t.summary(&format!("{name}, default open"))
    );
}

/// `verify_on_open(false)` trusts redb's pages (documented: on a damaged file opens and reads
/// may panic, and a record may be hidden), but a store thread must never die silently under its
/// callers, and the envelope check (which covers the key) never lets wrong bytes replay.
fn assert_no_verify_is_as_documented(name: &str, t: &Tally) {
    assert!(
        t.hangs.is_empty() && t.wrong_replays.is_empty(),
        "{}",
        t.summary(&format!("{name}, verify_on_open(false)"))
    );
}

// ----- the tests -----

#[test]
fn the_undamaged_fixture_reads_back_exactly() {
    install_panic_hook();
    let dir = scratch_dir();
    for mode in [Mode::Default, Mode::NoVerify] {
        let t = check_image(dir.path(), &fixture().image, mode, "undamaged");
        assert_eq!(t.opened, 1, "{}", t.summary("undamaged"));
        assert!(
            t.op_errors.is_empty()
                && t.panics.is_empty()
                && t.lost.is_empty()
                && t.wrong_replays.is_empty()
                && t.token_regressions.is_empty(),
            "{}",
            t.summary("undamaged")
        );
        // Every key: one get and one claim, plus the fresh write.
        assert_eq!(t.correct, 2 * fixture().keys.len() + 1);
    }
}

#[test]
fn random_bit_flips_never_panic_or_replay_wrong_bytes() {
    let (default, no_verify) = run_family("bit flips", cases(120, 3000), bit_flips);
    assert_default_is_safe("bit flips", &default);
    assert_no_verify_is_as_documented("bit flips", &no_verify);
}

#[test]
fn truncations_never_panic_or_replay_wrong_bytes() {
    let (default, no_verify) = run_family("truncation", cases(60, 1000), truncation);
    assert_default_is_safe("truncation", &default);
    assert_no_verify_is_as_documented("truncation", &no_verify);
}

#[test]
fn zeroed_pages_never_panic_or_replay_wrong_bytes() {
    let (default, no_verify) = run_family("zeroed pages", cases(80, 2000), zeroed_pages);
    assert_default_is_safe("zeroed pages", &default);
    assert_no_verify_is_as_documented("zeroed pages", &no_verify);
}

// ----- envelopes rewritten through redb -----

/// Rewrites the stored envelope of `key` through redb (a valid redb file whose record bytes
/// are damaged, as a bad sector under a page that redb does not re-verify would leave them).
fn rewrite_envelope(path: &Path, key: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> TestResult {
    let db = redb::Database::open(path)?;
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(RECORDS)?;
        let mut sk = vec![u8::try_from(SCOPE.len())?];
        sk.extend_from_slice(SCOPE.as_bytes());
        sk.extend_from_slice(key);
        let mut bytes = table
            .get(sk.as_slice())?
            .map(|g| g.value().to_vec())
            .ok_or("record exists")?;
        f(&mut bytes);
        table.insert(sk.as_slice(), bytes.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

#[test]
fn damaged_envelopes_are_typed_corruption_never_a_wrong_replay() -> TestResult {
    install_panic_hook();
    let fixture = fixture();
    let dir = scratch_dir();
    let keys: Vec<&Vec<u8>> = fixture
        .keys
        .iter()
        .filter(|(_, e)| **e != Expect::Absent)
        .map(|(k, _)| k)
        .collect();
    let n = cases(150, 3000);
    let mut total = Tally::default();
    let mut corrupt_reports = 0usize;
    for seed in seeds(n) {
        let mut rng = seeded(seed);
        let key = keys.get(rng.index(keys.len())).ok_or("a key")?.to_vec();
        let path = dir.path().join("envelope.redb");
        std::fs::write(&path, &fixture.image)?;
        let how = rng.index(4);
        let r = rng.next_u64();
        rewrite_envelope(&path, &key, |b| match how {
            // 1 to 4 flipped bits anywhere in the envelope.
            0 => {
                for _ in 0..=(r % 4) {
                    let bit = rng.index(b.len() * 8);
                    if let Some(byte) = b.get_mut(bit / 8) {
                        *byte ^= 1 << (bit % 8);
                    }
                }
            }
            1 => b.truncate(rng.index(b.len())),
            // Random bytes, sometimes behind a valid header.
            2 => {
                let len = rng.index(64);
                let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                if r.is_multiple_of(2) {
                    junk.splice(0..0, [0xD1, 1, 0, 0, 0, 0]);
                }
                *b = junk;
            }
            // A byte appended.
            _ => b.push(r as u8),
        })?;
        let bytes = std::fs::read(&path)?;
        let label = format!("envelope seed {seed} key {}", String::from_utf8_lossy(&key));
        let t = check_image(dir.path(), &bytes, Mode::Default, &label);
        corrupt_reports += t.op_errors.get("Corrupt").copied().unwrap_or(0);
        total.merge(t);
    }
    eprintln!(
        "{}\n(envelopes: {corrupt_reports} operations reported Error::Corrupt)",
        total.summary("damaged envelopes")
    );
    assert!(
        total.panics.is_empty()
            && total.hangs.is_empty()
            && total.wrong_replays.is_empty()
            && total.lost.is_empty()
            && total.token_regressions.is_empty(),
        "{}",
        total.summary("damaged envelopes")
    );
    assert!(corrupt_reports >= n, "each damaged record is reported");
    Ok(())
}

/// Bit-flip images that the long run (`IDEMSTORE_LONG=1`) found to misbehave with
/// `verify_on_open(false)`, rerun in that mode on every run:
///
/// - seeds 219, 919, 1220, 1399, 1830: redb panicked on the store's writer thread, and every
///   caller of the batch, and every later writer, waited forever (fixed: the writer catches
///   the panic, answers `CommitOutcomeUnknown` and poisons the store; since readers share a
///   snapshot of the latest commit, these images no longer make the writer panic at all);
/// - seed 1836: a flipped bit renamed the stored key "done-44" to "done-45", which then
///   replayed done-44's outcome (fixed by the envelope CRC covering the storage key).
#[test]
fn bit_flips_that_once_hung_or_replayed_wrong_bytes_are_safe_now() {
    install_panic_hook();
    let fixture = fixture();
    let dir = scratch_dir();
    let mut total = Tally::default();
    for seed in [219, 919, 1220, 1399, 1830, 1836] {
        let d = bit_flips(seed, fixture.image.len());
        let label = format!("bit flips seed {seed} {d:?} [verify_on_open(false)]");
        total.merge(check_image(
            dir.path(),
            &d.apply(&fixture.image),
            Mode::NoVerify,
            &label,
        ));
    }
    eprintln!("{}", total.summary("regressions"));
    assert_no_verify_is_as_documented("regressions", &total);
    // Whether redb panics on these images depends on which pages a commit touches; when it
    // panics on the writer, the batch hears so. (An unconditional check of the writer's panic
    // guard is `a_panic_on_the_writer_thread_fails_its_batch_and_poisons_the_store`.)
    let writer_panicked = total
        .panic_sites
        .keys()
        .any(|site| site.starts_with("[idemstore-writer]"));
    assert!(
        !writer_panicked || total.op_errors.contains_key("CommitOutcomeUnknown"),
        "the writer panics surface as errors: {}",
        total.summary("regressions")
    );
}

#[test]
fn a_panic_on_the_writer_thread_fails_its_batch_and_poisons_the_store() {
    install_panic_hook();
    let (backend, armed) = Injected::new(InjectedFault::PanicOnWrite);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("corrupt-image-writer-panic".into())
        .spawn(move || {
            let run = || -> Result<(), String> {
                let store = Store::builder()
                    .clock(ManualClock::new(T0_MS))
                    .sweep_interval(None)
                    .open_with_backend(backend)
                    .map_err(|e| e.to_string())?;
                let options = ClaimOptions::default().retention(DAY);
                let Ok(Claim::Acquired(lease)) =
                    store.claim(SCOPE, "before", FINGERPRINT, &options)
                else {
                    return Err("the first claim acquires".into());
                };
                store
                    .complete(&lease, b"kept", DAY)
                    .map_err(|e| e.to_string())?;
                armed.store(true, std::sync::atomic::Ordering::SeqCst);
                let failed = store.claim(SCOPE, "during", FINGERPRINT, &options);
                if !matches!(failed, Err(Error::CommitOutcomeUnknown { .. })) {
                    return Err(format!("the panicking batch: {failed:?}"));
                }
                armed.store(false, std::sync::atomic::Ordering::SeqCst);
                let refused = store.claim(SCOPE, "after", FINGERPRINT, &options);
                if !matches!(refused, Err(Error::Poisoned { .. })) {
                    return Err(format!("a later write: {refused:?}"));
                }
                match store.claim(SCOPE, "before", FINGERPRINT, &options) {
                    Ok(Claim::Replay(r)) if r.outcome == b"kept" => {}
                    other => return Err(format!("a read after the panic: {other:?}")),
                }
                if !store.stats().map_err(|e| e.to_string())?.poisoned {
                    return Err("stats report the store poisoned".into());
                }
                // redb's own lock is poisoned by the panic, and its `Database::drop` may panic
                // on it (a redb limit, reported): not asserted either way.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(store)));
                Ok(())
            };
            let _ = tx.send(catch_unwind(AssertUnwindSafe(run)).map_err(|_| "panicked".to_owned()));
        })
        .expect("spawn");
    let result = rx
        .recv_timeout(IMAGE_DEADLINE)
        .expect("the callers hear back instead of waiting forever");
    let panics = take_panics();
    assert_eq!(result, Ok(Ok(())), "{panics:#?}");
    assert!(
        panics.iter().any(|p| p.contains("injected panic")),
        "{panics:?}"
    );
}

/// A valid envelope that ends up under another key — a redb page damaged while
/// `verify_on_open(false)` (the long bit-flip run found "done-44" flipped to "done-45", which
/// then replayed done-44's outcome), or a write through redb by another program — fails its
/// check there: the envelope's CRC covers the storage key.
#[test]
fn an_envelope_moved_under_another_key_is_not_replayed_there() -> TestResult {
    install_panic_hook();
    let fixture = fixture();
    let dir = scratch_dir();
    let path = dir.path().join("moved.redb");
    std::fs::write(&path, &fixture.image)?;
    let mut theirs = Vec::new();
    {
        let db = redb::Database::open(&path)?;
        let read = db.begin_read()?;
        let table = read.open_table(RECORDS)?;
        let mut sk = vec![u8::try_from(SCOPE.len())?];
        sk.extend_from_slice(SCOPE.as_bytes());
        sk.extend_from_slice(b"done-44");
        theirs.extend_from_slice(table.get(sk.as_slice())?.ok_or("done-44")?.value());
    }
    rewrite_envelope(&path, b"done-45", |b| *b = theirs.clone())?;
    let store = Store::builder()
        .clock(ManualClock::new(T0_MS))
        .sweep_interval(None)
        .open(&path)?;
    let options = ClaimOptions::default().retention(DAY);
    let claim = store.claim(SCOPE, "done-45", FINGERPRINT, &options);
    assert!(
        matches!(claim, Err(Error::Corrupt { .. })),
        "done-45 must not replay done-44's outcome: {:?}",
        claim.map(|c| match c {
            Claim::Replay(r) => format!(
                "Replay({:?})",
                String::from_utf8_lossy(r.outcome.get(..20).unwrap_or(&r.outcome))
            ),
            other => format!("{other:?}"),
        })
    );
    Ok(())
}

/// A stray file named like a log beside a format-1 store (an empty one, say) does not turn
/// off that store's default page verification: the damaged store is refused either way.
#[test]
fn a_stray_log_file_does_not_turn_off_verification_of_a_plain_store() -> TestResult {
    const MARKER: &[u8] = b"a-record-outcome-to-find-in-the-file";
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("plain.redb");
    {
        let store = Store::open(&path)?;
        let Claim::Acquired(lease) = store.claim("s", "k", "fp", &ClaimOptions::default())? else {
            return Err("a new key is acquired".into());
        };
        store.complete(&lease, MARKER, DAY)?;
        store.close()?;
    }
    let mut bytes = std::fs::read(&path)?;
    let mut flipped = 0;
    for at in 0..bytes.len().saturating_sub(MARKER.len()) {
        if bytes.get(at..at + MARKER.len()) == Some(MARKER) {
            bytes[at + 5] ^= 0x01;
            flipped += 1;
        }
    }
    assert!(flipped > 0, "the outcome is in the file");
    std::fs::write(&path, &bytes)?;
    let refused = |label: &str| match Store::open(&path) {
        Err(Error::Corrupt { .. }) => Ok(()),
        other => Err(format!("{label}: expected Corrupt, got {other:?}")),
    };
    refused("no log file")?;
    let mut stray = path.clone().into_os_string();
    stray.push(".wal");
    std::fs::write(&stray, b"")?;
    refused("an empty stray log file")?;
    Ok(())
}
