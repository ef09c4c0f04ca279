//! `SimDisk`: a `redb::StorageBackend` over an in-memory "disk" that models what survives a
//! power cut, and injects I/O faults.
//!
//! - `write` and `set_len` change the *live* view (what redb reads back, like the page cache)
//!   and are appended to a *pending* list; only `sync_data` applies the pending list, in order,
//!   to the *durable* image. Both writes and length changes are therefore durable only at a
//!   sync, as on a real disk where neither data nor a file-size change survives a power cut
//!   before `fdatasync` returns.
//! - When recording, every successful sync closes a *window* (the pending operations it made
//!   durable), so that a test can rebuild the crash image at any sync point afterwards:
//!   the windows before it applied in full, then each operation of the crashing window kept,
//!   dropped or torn at 512-byte sector granularity ([`crash_image`]).
//! - A [`Fault`] fails the n-th call of one kind (write, set_len or sync_data), once or from then
//!   on; a byte budget fails writes and length changes that reach past it with
//!   `io::ErrorKind::StorageFull`, like a full disk. A failed call changes nothing.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::rng::Rng;

/// The sector size of the simulated disk: the unit a torn write keeps or loses.
pub const SECTOR: u64 = 512;

/// One mutation of the disk, as issued by redb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// The kinds of backend call a [`Fault`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Write,
    SetLen,
    Sync,
}

impl Call {
    pub const ALL: [Call; 3] = [Call::Write, Call::SetLen, Call::Sync];

    fn index(self) -> usize {
        match self {
            Call::Write => 0,
            Call::SetLen => 1,
            Call::Sync => 2,
        }
    }
}

/// Fail the `nth` (1-based) call of kind `call`; with `persistent`, every later one too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub call: Call,
    pub nth: u64,
    pub persistent: bool,
}

/// How many calls of each kind the disk has seen (failed ones included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub writes: u64,
    pub set_lens: u64,
    pub syncs: u64,
}

impl Counts {
    pub fn of(&self, call: Call) -> u64 {
        match call {
            Call::Write => self.writes,
            Call::SetLen => self.set_lens,
            Call::Sync => self.syncs,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<DiskOp>,
    recording: bool,
    windows: Vec<Vec<DiskOp>>,
    calls: [u64; 3],
    successful_syncs: u64,
    fault: Option<Fault>,
    budget: Option<u64>,
    injected: u64,
}

/// The simulated disk. Clones share the same disk, so a test keeps a handle while redb owns
/// another.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// Applies one operation to an image, growing it (zero-filled) for writes past its end, as a
/// file does.
pub fn apply(image: &mut Vec<u8>, op: &DiskOp) {
    match op {
        DiskOp::Write { offset, data } => write_at(image, *offset, data),
        DiskOp::SetLen(len) => image.resize(to_usize(*len), 0),
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("the simulated disk fits in memory")
}

fn write_at(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = to_usize(offset);
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    if let Some(dst) = image.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
}

/// What became of one pending operation in a crash image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fates {
    pub applied: u64,
    pub dropped: u64,
    pub torn: u64,
}

/// The image a power cut leaves while the window `pending` was being synced: `durable`, then
/// each pending operation, in order, applied in full, dropped, or (writes only) torn — only some
/// of its 512-byte sectors (a prefix or an arbitrary subset) reach the disk.
pub fn crash_image(
    durable: &[u8],
    pending: &[DiskOp],
    rng: &mut Rng,
    fates: &mut Fates,
) -> Vec<u8> {
    let mut image = durable.to_vec();
    for op in pending {
        match rng.below(3) {
            0 => {
                apply(&mut image, op);
                fates.applied += 1;
            }
            1 => fates.dropped += 1,
            _ => {
                fates.torn += 1;
                match op {
                    DiskOp::SetLen(_) => {
                        // A length change is all or nothing.
                        if rng.chance(50) {
                            apply(&mut image, op);
                        }
                    }
                    DiskOp::Write { offset, data } => tear(&mut image, *offset, data, rng),
                }
            }
        }
    }
    image
}

/// Writes only some sectors of `data`: a prefix of them or a random subset.
fn tear(image: &mut Vec<u8>, offset: u64, data: &[u8], rng: &mut Rng) {
    let end = offset + data.len() as u64;
    let mut sectors = Vec::new();
    let mut s = offset - offset % SECTOR;
    while s < end {
        let lo = s.max(offset);
        let hi = (s + SECTOR).min(end);
        sectors.push((lo, hi));
        s += SECTOR;
    }
    let prefix = rng.chance(50);
    let keep_prefix = rng.below(sectors.len() as u64 + 1) as usize;
    for (i, (lo, hi)) in sectors.into_iter().enumerate() {
        let keep = if prefix {
            i < keep_prefix
        } else {
            rng.chance(50)
        };
        if keep {
            let from = to_usize(lo - offset);
            let to = to_usize(hi - offset);
            if let Some(chunk) = data.get(from..to) {
                write_at(image, lo, chunk);
            }
        }
    }
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// A disk whose live and durable contents are `image` (a machine booting after a crash).
    pub fn from_image(image: Vec<u8>) -> SimDisk {
        let disk = SimDisk::default();
        {
            let mut s = disk.lock();
            s.live = image.clone();
            s.durable = image;
        }
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on every successful sync records the window it made durable.
    pub fn start_recording(&self) {
        let mut s = self.lock();
        s.recording = true;
        s.windows.clear();
    }

    /// The recorded windows, plus the operations still pending (a trailing window that no sync
    /// has closed yet).
    pub fn take_windows(&self) -> (Vec<Vec<DiskOp>>, Vec<DiskOp>) {
        let mut s = self.lock();
        s.recording = false;
        (std::mem::take(&mut s.windows), s.pending.clone())
    }

    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    pub fn live_len(&self) -> u64 {
        self.lock().live.len() as u64
    }

    pub fn counts(&self) -> Counts {
        let s = self.lock();
        Counts {
            writes: s.calls[0],
            set_lens: s.calls[1],
            syncs: s.calls[2],
        }
    }

    /// Syncs that completed: what has been made durable is everything before the last one.
    pub fn successful_syncs(&self) -> u64 {
        self.lock().successful_syncs
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Writes and length changes reaching past `budget` bytes fail with `StorageFull`.
    pub fn set_budget(&self, budget: Option<u64>) {
        self.lock().budget = budget;
    }

    /// Counts the call and decides whether it fails.
    fn enter(s: &mut State, call: Call, reaches: Option<u64>) -> io::Result<()> {
        s.calls[call.index()] += 1;
        let n = s.calls[call.index()];
        if let Some(f) = s.fault
            && f.call == call
            && (n == f.nth || (f.persistent && n > f.nth))
        {
            s.injected += 1;
            return Err(io::Error::other(format!("injected {call:?} failure #{n}")));
        }
        if let (Some(budget), Some(reach)) = (s.budget, reaches)
            && reach > budget
        {
            s.injected += 1;
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("simulated disk full: {reach} bytes > budget {budget}"),
            ));
        }
        Ok(())
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.lock().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match s.live.get(start..start + out.len()) {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end ({})",
                    out.len(),
                    s.live.len()
                ),
            )),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.lock();
        let grows = len > s.live.len() as u64;
        SimDisk::enter(&mut s, Call::SetLen, grows.then_some(len))?;
        let op = DiskOp::SetLen(len);
        apply(&mut s.live, &op);
        s.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.lock();
        SimDisk::enter(&mut s, Call::Sync, None)?;
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            apply(&mut s.durable, op);
        }
        if s.recording {
            s.windows.push(pending);
        }
        s.successful_syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.lock();
        SimDisk::enter(&mut s, Call::Write, Some(offset + data.len() as u64))?;
        let op = DiskOp::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut s.live, &op);
        s.pending.push(op);
        Ok(())
    }
}
