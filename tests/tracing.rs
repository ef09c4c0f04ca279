//! The engine's tracing spans: what a subscriber installed by the application sees.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Keeps the name of every span created, from every thread.
#[derive(Default, Clone)]
struct Names {
    names: Arc<Mutex<Vec<String>>>,
    next: Arc<AtomicU64>,
}

impl Subscriber for Names {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.names
            .lock()
            .expect("names")
            .push(span.metadata().name().to_owned());
        Id::from_u64(self.next.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

// One test in this binary: the subscriber is global to the process (the writer thread
// reports too).
#[test]
fn opening_committing_sweeping_and_listing_orphans_are_spans() -> TestResult {
    let names = Names::default();
    tracing::subscriber::set_global_default(names.clone())?;
    let dir = tempfile::tempdir()?;
    let clock = clock();
    let store = file_store(&dir.path().join("idem.redb"), &clock);
    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    store.complete(&lease, b"done", DAY)?;
    store.sweep(10)?;
    store.orphans(10)?;
    let seen = names.names.lock().expect("names").clone();
    for span in [
        "idemstore.open",
        "idemstore.commit",
        "idemstore.sweep",
        "idemstore.orphans",
    ] {
        assert!(seen.iter().any(|n| n == span), "{span} in {seen:?}");
    }
    Ok(())
}
