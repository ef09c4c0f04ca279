//! The `ops` target's backend: an in-memory redb backend whose writes, syncs and resizes fail
//! as an input plans.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

/// Which backend calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FaultOn {
    Write,
    Sync,
    SetLen,
    Any,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct FaultPlan {
    pub(super) on: FaultOn,
    /// Matching calls to let through before failing.
    pub(super) skip: u32,
    /// Fail every matching call from then on, not just one.
    pub(super) persistent: bool,
    /// Fail with `StorageFull` rather than a plain I/O error.
    pub(super) full: bool,
}

#[derive(Debug, Default)]
struct MemoryState {
    bytes: RwLock<Vec<u8>>,
    plan: Mutex<Option<FaultPlan>>,
    fired: AtomicU64,
}

/// An in-memory redb backend whose handle can be cloned (so a store can be reopened over
/// the same bytes) and whose writes, syncs and resizes fail as planned.
#[derive(Debug, Clone, Default)]
pub(super) struct FaultyMemory {
    state: Arc<MemoryState>,
}

impl FaultyMemory {
    pub(super) fn arm(&self, plan: FaultPlan) {
        *self.state.plan.lock() = Some(plan);
    }

    pub(super) fn disarm(&self) {
        *self.state.plan.lock() = None;
    }

    pub(super) fn fired(&self) -> u64 {
        self.state.fired.load(Ordering::SeqCst)
    }

    fn check(&self, call: FaultOn) -> std::io::Result<()> {
        let mut plan = self.state.plan.lock();
        let Some(p) = plan.as_mut() else {
            return Ok(());
        };
        if p.on != FaultOn::Any && p.on != call {
            return Ok(());
        }
        if p.skip > 0 {
            p.skip -= 1;
            return Ok(());
        }
        let full = p.full;
        if !p.persistent {
            *plan = None;
        }
        self.state.fired.fetch_add(1, Ordering::SeqCst);
        Err(if full {
            std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: disk full")
        } else {
            std::io::Error::other(format!("injected {call:?} failure"))
        })
    }

    fn out_of_range() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "out of range")
    }
}

impl redb::StorageBackend for FaultyMemory {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.bytes.read().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.state.bytes.read();
        let start = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        let end = start
            .checked_add(out.len())
            .ok_or_else(Self::out_of_range)?;
        out.copy_from_slice(bytes.get(start..end).ok_or_else(Self::out_of_range)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check(FaultOn::SetLen)?;
        let len = usize::try_from(len).map_err(|_| Self::out_of_range())?;
        self.state.bytes.write().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.check(FaultOn::Sync)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(FaultOn::Write)?;
        let mut bytes = self.state.bytes.write();
        let start = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        let end = start
            .checked_add(data.len())
            .ok_or_else(Self::out_of_range)?;
        bytes
            .get_mut(start..end)
            .ok_or_else(Self::out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}
