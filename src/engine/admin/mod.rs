//! Operator access to a store file that no process has open: a [`ReadOnlyStore`] that reads
//! and verifies without writing a byte, and [`Store::import`](crate::Store::import), which
//! loads exported records into a store, and [`Store::compact`](crate::Store::compact), which
//! gives a store file's free space back. The `idemstore` command-line tool (feature `cli`) is
//! built on these.

mod compact;
mod import;
mod read_only;
mod verify;

pub use compact::Compaction;
pub use import::ImportReport;
pub use read_only::{Entry, ReadOnlyStore, Summary};
pub use verify::{Damage, PageCheck, Verification};
