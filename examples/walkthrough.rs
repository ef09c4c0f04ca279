//! A payment walked through claim, crash, takeover and replay, with a real process crash.
//!
//! ```text
//! cargo run --example walkthrough
//! ```
//!
//! The program runs itself as a child process that claims a payment, records a recovery point
//! after charging the card, and then aborts before `complete` — the window no engine can close.
//! The parent reopens the store (a new process epoch), finds the orphan with its checkpoint,
//! reconciles, takes the request over without charging again, completes it, and shows that a
//! client retry is replayed byte for byte while a reused key with another body is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Store};

const SCOPE: &str = "acct_42";
const KEY: &str = "7d0c6a4e-5e1b-4b8e-9f0a-2c3d4e5f6a7b";
const FINGERPRINT: &[u8] = b"sha256(POST /v1/charges amount=4200&currency=eur)";
const RETENTION: Duration = Duration::from_secs(24 * 3600);

fn options() -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_secs(30))
        .retention(RETENTION)
}

/// The child: claims, "charges the card", checkpoints, and crashes before completing.
fn child(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(path)?;
    let Claim::Acquired(lease) = store.claim(SCOPE, KEY, FINGERPRINT, &options())? else {
        return Err("the first claim of a fresh key must acquire it".into());
    };
    println!(
        "  [child pid {}] claim         -> Acquired (token {}, attempt {}, epoch {})",
        std::process::id(),
        lease.token(),
        lease.attempt(),
        store.epoch()
    );
    println!("  [child] charging card at the gateway ... charge ch_3PqR created");
    store.checkpoint(&lease, b"gateway-charge=ch_3PqR")?;
    println!("  [child] checkpoint    -> \"gateway-charge=ch_3PqR\" (durable)");
    println!("  [child] crashing (abort) before complete()");
    std::process::abort();
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path: PathBuf = dir.path().join("payments.idem");
    let mut charges_made = 0;

    println!("1. A client sends POST /v1/charges with Idempotency-Key {KEY}");
    let status = Command::new(std::env::current_exe()?)
        .arg("--child")
        .arg(&path)
        .status()?;
    charges_made += 1;
    println!("   the server process died: {status}\n");

    println!("2. The service restarts and reopens the store");
    let store = Store::open(&path)?;
    println!(
        "   epoch {} (the crashed process had epoch {})",
        store.epoch(),
        store.epoch() - 1
    );
    let orphans = store.orphans(100)?;
    println!("   orphans: {}", orphans.len());
    for orphan in &orphans {
        if let idemstore::RecordState::InFlight {
            token,
            epoch,
            checkpoint,
            ..
        } = &orphan.record.state
        {
            println!(
                "   - {}/{}: token {token}, epoch {epoch}, checkpoint {:?}",
                String::from_utf8_lossy(&orphan.scope),
                String::from_utf8_lossy(&orphan.key),
                checkpoint.as_deref().map(String::from_utf8_lossy),
            );
        }
    }
    println!();

    println!("3. The client retries; the retry takes the orphan over");
    let Claim::Acquired(lease) = store.claim(SCOPE, KEY, FINGERPRINT, &options())? else {
        return Err("an orphan of a dead epoch is taken over at once".into());
    };
    let checkpoint = lease.checkpoint().map(String::from_utf8_lossy);
    println!(
        "   claim         -> Acquired (token {}, attempt {}, takeover {}, checkpoint {:?})",
        lease.token(),
        lease.attempt(),
        lease.is_takeover(),
        checkpoint
    );
    let outcome: &[u8] = if lease.checkpoint().is_some() {
        println!("   reconcile: the gateway confirms ch_3PqR succeeded -> no second charge");
        b"201 {\"id\":\"ch_3PqR\",\"amount\":4200,\"currency\":\"eur\",\"status\":\"succeeded\"}"
    } else {
        charges_made += 1;
        b"201 {\"id\":\"ch_new\",\"status\":\"succeeded\"}"
    };
    store.complete(&lease, outcome, RETENTION)?;
    println!(
        "   complete      -> stored {} outcome bytes (durable)\n",
        outcome.len()
    );

    println!("4. The network drops that answer too; the client retries again");
    match store.claim(SCOPE, KEY, FINGERPRINT, &options())? {
        Claim::Replay(replay) => {
            assert_eq!(replay.outcome, outcome, "a replay returns the stored bytes");
            println!(
                "   claim         -> Replay: {}",
                String::from_utf8_lossy(&replay.outcome)
            );
        }
        other => return Err(format!("expected a replay, got {other:?}").into()),
    }
    println!();

    println!("5. A buggy client reuses the key for a different amount");
    let other = b"sha256(POST /v1/charges amount=9900&currency=eur)";
    let answer = store.claim(SCOPE, KEY, other, &options())?;
    println!("   claim         -> {answer:?} (HTTP 422, never a replay)\n");

    let stale = store.complete(&lease, b"late write", RETENTION);
    println!(
        "6. A second write with the finished lease is refused: {}",
        stale.map_or_else(|e| e.to_string(), |()| "accepted?!".into())
    );
    println!();

    let stats = store.stats()?;
    println!("Summary");
    println!("   requests sent by the client : 3 (+1 with a reused key)");
    println!("   card charges made           : {charges_made}");
    println!(
        "   records / commits this epoch: {} / {}",
        stats.records, stats.commits
    );
    store.close()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--child") => {
            let path = args.get(2).ok_or("--child needs a path")?;
            child(Path::new(path))
        }
        _ => parent(),
    }
}
