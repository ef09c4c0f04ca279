//! Async calls never block the executor's thread: a read that waits on the disk runs on the
//! store's own threads, so a single-threaded runtime stays responsive while it waits.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use idemstore::{Claim, Store};
use redb::StorageBackend;

/// An in-memory disk whose reads, once armed, wait until the gate opens: a disk read that
/// takes as long as the test wants.
#[derive(Debug, Default)]
struct Gate {
    armed: AtomicBool,
    open: Mutex<bool>,
    opened: Condvar,
    blocked_reads: AtomicU64,
}

/// A disk in memory that outlives the stores opened on it, its reads behind a [`Gate`].
#[derive(Debug, Clone, Default)]
struct GatedDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    gate: Arc<Gate>,
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
}

impl StorageBackend for GatedDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes.lock().expect("disk lock").len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        if self.gate.armed.load(Ordering::SeqCst) {
            self.gate.blocked_reads.fetch_add(1, Ordering::SeqCst);
            let mut open = self.gate.open.lock().expect("gate lock");
            while !*open {
                open = self.gate.opened.wait(open).expect("gate lock");
            }
        }
        let bytes = self.bytes.lock().expect("disk lock");
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = bytes
            .get(start..start + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        self.bytes.lock().expect("disk lock").resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut bytes = self.bytes.lock().expect("disk lock");
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        if bytes.len() < start + data.len() {
            bytes.resize(start + data.len(), 0);
        }
        let dest = bytes
            .get_mut(start..start + data.len())
            .ok_or_else(out_of_range)?;
        dest.copy_from_slice(data);
        Ok(())
    }
}

/// Runs `call` as a task of a current-thread Tokio runtime with `gate` armed, so that its disk
/// reads wait; a second task, which runs only if those reads left the runtime's only thread
/// free, then opens the gate. The runtime runs on a thread of its own, so that a blocked
/// runtime fails the test (after 60 s) instead of hanging it.
fn on_a_current_thread_runtime<T, F, Fut>(
    gate: &Arc<Gate>,
    call: F,
) -> Result<T, Box<dyn std::error::Error>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = idemstore::Result<T>> + Send + 'static,
{
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let runtime_gate = Arc::clone(gate);
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .build()
            .map(|rt| {
                rt.block_on(async move {
                    runtime_gate.armed.store(true, Ordering::SeqCst);
                    let task = tokio::spawn(call());
                    while runtime_gate.blocked_reads.load(Ordering::SeqCst) == 0
                        && !task.is_finished()
                    {
                        tokio::task::yield_now().await;
                    }
                    runtime_gate.armed.store(false, Ordering::SeqCst);
                    *runtime_gate.open.lock().expect("gate lock") = true;
                    runtime_gate.opened.notify_all();
                    task.await
                })
            });
        let _ = done_tx.send(result);
    });
    let outcome = done_rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
        format!(
            "the runtime's only thread stayed blocked by a disk read (blocked reads {})",
            gate.blocked_reads.load(Ordering::SeqCst)
        )
    })?;
    Ok(outcome???)
}

#[test]
fn a_claim_whose_read_waits_on_the_disk_leaves_a_current_thread_runtime_free() -> TestResult {
    let disk = GatedDisk::default();
    let gate = Arc::clone(&disk.gate);
    let clock = clock();
    let builder = || {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .cache_size(0)
            .verify_on_open(false)
    };
    {
        // Enough records for a tree of many pages, so that a lookup reads pages it has not
        // read since the reopen below.
        let store = builder().open_with_backend(disk.clone())?;
        for i in 0..2_000 {
            let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(1_000))?);
            store.complete(&lease, format!("answer {i}").as_bytes(), DAY)?;
        }
    }
    let store = Arc::new(builder().open_with_backend(disk)?);

    let claim = on_a_current_thread_runtime(&gate, move || async move {
        store.claim_async("s", "k1234", "fp", &opts(1_000)).await
    })?;
    assert!(
        matches!(&claim, Claim::Replay(r) if r.outcome == b"answer 1234"),
        "{claim:?}"
    );
    assert!(
        gate.blocked_reads.load(Ordering::SeqCst) > 0,
        "the claim read no page from the disk: the test proved nothing"
    );
    Ok(())
}

#[test]
fn close_async_releases_the_file_with_everything_acknowledged() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let clock = clock();
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    runtime.block_on(async {
        let store = file_store(&path, &clock);
        let Claim::Acquired(lease) = store.claim_async("s", "k", "fp", &opts(1_000)).await? else {
            return Err("the first claim acquires".into());
        };
        store.complete_async(&lease, b"done", DAY).await?;
        store.close_async().await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    // The file is free again, and holds the completion.
    let store = file_store(&path, &clock);
    assert_eq!(
        replay(store.claim("s", "k", "fp", &opts(1_000))?).outcome,
        b"done"
    );
    Ok(())
}

/// With a write-ahead log, a sweep reads the index and removes the records itself (beside the
/// writer, in the database file):
/// `sweep_async` does that on the store's threads too. (Two disks of the test's own: the
/// database file behind the gate, and the log.)
#[cfg(feature = "__testkit")]
#[test]
fn a_sweep_whose_reads_wait_on_the_disk_leaves_a_current_thread_runtime_free() -> TestResult {
    let (disk, log) = (GatedDisk::default(), GatedDisk::default());
    let gate = Arc::clone(&disk.gate);
    let clock = clock();
    let builder = || {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .cache_size(0)
            .read_cache(0)
            .verify_on_open(false)
            .write_ahead_log(true)
            .wal_segment_bytes(1 << 20)
    };
    {
        // Closing checkpoints everything: the records are read from the database file.
        let store = builder().open_with_backends(disk.clone(), log.clone())?;
        for i in 0..2_000 {
            let lease = acquired(store.claim("s", format!("k{i}"), "fp", &opts(1_000))?);
            store.complete(&lease, b"answer", Duration::from_secs(10))?;
        }
        store.close()?;
    }
    let store = Arc::new(builder().open_with_backends(disk, log)?);
    clock.advance(Duration::from_secs(20));

    let sweeping = Arc::clone(&store);
    let swept =
        on_a_current_thread_runtime(
            &gate,
            move || async move { sweeping.sweep_async(100).await },
        )?;
    assert_eq!((swept.removed, swept.more), (100, true));
    assert!(
        gate.blocked_reads.load(Ordering::SeqCst) > 0,
        "the sweep read no page from the disk: the test proved nothing"
    );
    let wal = store.stats()?.wal.ok_or("a log")?;
    assert_eq!(wal.detached_sweeps, 1, "{wal:?}");
    Ok(())
}
