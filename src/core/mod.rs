//! The backend-neutral core: the record and its scoped key, what a claim asks for and gets,
//! and the pure state machine that decides every transition (DESIGN §2). Nothing here does
//! I/O; the embedded engine (`crate::engine`) and any other backend build on it.

pub(crate) mod admin;
pub(crate) mod claim;
pub(crate) mod record;
pub(crate) mod transition;
