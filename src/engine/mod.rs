//! The embedded engine: a [`Store`] on a redb file (or in memory).
//!
//! A call passes through these modules:
//!
//! - [`builder`]: [`StoreBuilder`] opens the storage and starts the writer and the sweeper;
//! - [`store`]: the [`Store`] API checks input against [`Limits`](crate::Limits), then
//!   either answers from committed state through [`reads`] (replay, mismatch, in progress,
//!   `get`, `orphans`, `stats`) or queues the operation ([`queue`]);
//! - [`writer`]: the group-commit thread drains the queue and, per batch, runs the pure state
//!   machine (`core::transition`) for each operation and applies its writes through [`apply`]
//!   (which keeps the expiry index and scope counts in step, and holds the sweep algorithm);
//! - [`storage`]: the seam; `storage::redb` stores records in redb tables, encoded by
//!   [`codec`];
//! - [`waits`] wakes duplicates that wait for their original; [`sweeper`] removes expired
//!   records in bounded batches through the queue; [`read_pool`] runs the reads of async calls
//!   on threads of its own, never on an executor's.
//!
//! [`admin`] serves operators: a read-only view of a store file, its verification, import, and
//! compaction.

pub(crate) mod admin;
pub(crate) mod apply;
pub(crate) mod builder;
pub(crate) mod codec;
pub(crate) mod durability;
pub(crate) mod lifecycle;
pub(crate) mod queue;
pub(crate) mod read_pool;
pub(crate) mod reads;
pub(crate) mod shared;
pub(crate) mod storage;
pub(crate) mod store;
pub(crate) mod sweeper;
pub(crate) mod telemetry;
pub(crate) mod waits;
pub(crate) mod writer;

pub use admin::{
    Compaction, Damage, Entry, ImportReport, PageCheck, ReadOnlyStore, Summary, Verification,
};
pub use builder::{
    ASYNC_READ_THREADS_MAX, BATCH_OPS_MAX, MAP_BUDGET_MIN, QUEUE_BYTES_MAX, QUEUE_CAPACITY_MAX,
    StoreBuilder, WAL_SEGMENT_BYTES_MAX, WAL_SEGMENT_BYTES_MIN, WAL_SEGMENTS_MAX,
};
pub use durability::Durability;
pub use reads::Stats;
pub use storage::redb::tables::FORMAT_VERSION;
pub use storage::wal::WalStats;
pub use store::Store;
