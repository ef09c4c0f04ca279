//! Durability levels: when an acknowledged write is on disk.

use std::time::Duration;

/// When an acknowledged write is on disk.
///
/// The level is fixed per store, so a reader never mistakes a relaxed write for a durable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged means fsynced: a completion survives `kill -9` and power loss. Concurrent
    /// callers share each fsync (group commit). The default.
    #[default]
    Immediate,
    /// Acknowledged before the fsync: a power loss or kernel crash may lose what was
    /// acknowledged in the last `max_unsynced` before it (a process crash loses it too, since
    /// unsynced commits live in the store's memory). Reads see acknowledged writes at once,
    /// including ones that a crash may take away. The writer makes a durable commit at least
    /// every `max_unsynced` while writes arrive, and [`Store::flush`](crate::Store::flush)
    /// forces one.
    Relaxed {
        /// The longest time an acknowledged write may stay unsynced.
        max_unsynced: Duration,
    },
}
