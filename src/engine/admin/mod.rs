//! Operator access to a store file that no process has open: a [`ReadOnlyStore`] that reads
//! and verifies without writing a byte, and [`Store::import`](crate::Store::import), which
//! loads exported records into a store. The `idemstore` command-line tool (feature `cli`) is
//! built on these.

mod import;
mod read_only;
mod verify;

pub use import::ImportReport;
pub use read_only::{Entry, ReadOnlyStore, Summary};
pub use verify::{Damage, PageCheck, Verification};
