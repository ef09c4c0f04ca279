//! [`SimDisk`]: one simulated disk, in memory, that models what survives a power cut and fails
//! calls as planned.
//!
//! - `write` and `set_len` change the *live* image (what reads see, like the page cache) and are
//!   appended to a *pending* list; only `sync_data` applies the pending list, in order, to the
//!   *durable* image. Writes and length changes are therefore durable only at a sync, as on a real
//!   disk where neither data nor a file-size change survives a power cut before `fdatasync`
//!   returns.
//! - When recording, every successful sync closes a *window* (the pending operations it made
//!   durable), so that a test can rebuild the image a power cut at any sync point leaves
//!   ([`crash_image`](super::crash_image)).
//! - Several disks written by concurrent threads (a database file and its write-ahead log) can
//!   share a [`Recorder`]: every successful write, `set_len` and sync of any of them is appended
//!   to one event list, in the order the calls took effect, so that a test can rebuild what
//!   every disk holds at a power cut during any sync of any of them.
//! - A [`Fault`] fails the n-th call of one kind (write, `set_len` or `sync_data`) or of any
//!   kind, once or from then on, with an I/O error or a full disk; a byte budget fails writes and
//!   length changes that reach past it with `io::ErrorKind::StorageFull`. A failed call changes
//!   nothing.
//!
//! The model is a plain file (`live_len`, `read_at`, `write_at`, `set_len`, `sync_data`); the
//! `redb::StorageBackend` implementation at the end is a thin adapter over it.

use std::io;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

/// One mutation of the disk, as issued by its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// `data` written at `offset`.
    Write {
        /// Where the write starts, in bytes.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// The file's length set to this many bytes.
    SetLen(u64),
}

impl DiskOp {
    /// Applies the operation to `image`, growing it (zero-filled) for a write past its end, as a
    /// file does.
    pub fn apply_to(&self, image: &mut Vec<u8>) {
        match self {
            DiskOp::Write { offset, data } => write_into(image, *offset, data),
            DiskOp::SetLen(len) => set_len_of(image, to_usize(*len)),
        }
    }
}

/// A position or length of the simulated disk as an index into its image.
pub(super) fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("the simulated disk fits in memory")
}

/// Truncates `image` to `len` bytes or grows it with zeros. Growth appends a zeroed
/// allocation rather than calling `Vec::resize`, which fills byte by byte in the unoptimised
/// builds the tests run in: redb grows its file by whole regions, and every image is grown
/// twice (live and durable).
fn set_len_of(image: &mut Vec<u8>, len: usize) {
    match len.checked_sub(image.len()) {
        Some(0) => {}
        Some(extra) => image.extend_from_slice(&vec![0; extra]),
        None => image.truncate(len),
    }
}

/// Copies `data` into `image` at `offset`, growing the image (zero-filled) if it is shorter.
pub(super) fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = to_usize(offset);
    let end = start
        .checked_add(data.len())
        .expect("the simulated disk fits in memory");
    if image.len() < end {
        set_len_of(image, end);
    }
    if let Some(dst) = image.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
}

/// The kinds of call a [`Fault`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    /// `write`.
    Write,
    /// `set_len`.
    SetLen,
    /// `sync_data`.
    Sync,
}

impl Call {
    /// Every kind, in a fixed order.
    pub const ALL: [Call; 3] = [Call::Write, Call::SetLen, Call::Sync];
}

/// The calls a [`Fault`] counts and fails: one kind, or all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Only calls of this kind.
    Only(Call),
    /// Every `write`, `set_len` and `sync_data`.
    Any,
}

impl Target {
    /// Whether a call of kind `call` is one this target counts.
    pub fn matches(self, call: Call) -> bool {
        match self {
            Target::Only(c) => c == call,
            Target::Any => true,
        }
    }
}

impl From<Call> for Target {
    fn from(call: Call) -> Target {
        Target::Only(call)
    }
}

/// Fail the `nth` call that `on` counts; with `persistent`, every later one too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The calls counted and failed.
    pub on: Target,
    /// The first call to fail, 1-based, counted over the disk's whole life (failed calls
    /// included): see [`SimDisk::counts`].
    pub nth: u64,
    /// Fail every matching call from the `nth` on, not just the `nth`.
    pub persistent: bool,
    /// Fail with `io::ErrorKind::StorageFull` (a full disk) rather than a plain I/O error.
    pub full: bool,
}

impl Fault {
    /// The error a failing call returns: `call` is its kind, `n` its count.
    fn error(&self, call: Call, n: u64) -> io::Error {
        if self.full {
            io::Error::new(
                io::ErrorKind::StorageFull,
                format!("injected {call:?} failure #{n}: disk full"),
            )
        } else {
            io::Error::other(format!("injected {call:?} failure #{n}"))
        }
    }
}

/// How many calls of each kind the disk has seen (failed ones included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// `write` calls.
    pub writes: u64,
    /// `set_len` calls.
    pub set_lens: u64,
    /// `sync_data` calls.
    pub syncs: u64,
}

impl Counts {
    /// The calls `calls` counts: one kind (`counts.of(Call::Sync)`) or all of them.
    pub fn of(&self, calls: impl Into<Target>) -> u64 {
        match calls.into() {
            Target::Only(Call::Write) => self.writes,
            Target::Only(Call::SetLen) => self.set_lens,
            Target::Only(Call::Sync) => self.syncs,
            Target::Any => self.writes + self.set_lens + self.syncs,
        }
    }

    fn bump(&mut self, call: Call) {
        let n = match call {
            Call::Write => &mut self.writes,
            Call::SetLen => &mut self.set_lens,
            Call::Sync => &mut self.syncs,
        };
        *n += 1;
    }
}

/// What a [`Recorder`] notes of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A write or a length change, pending on its disk until its next sync.
    Op(DiskOp),
    /// A sync that made every pending operation of its disk durable.
    Sync,
}

/// One successful call of a disk attached to a [`Recorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The number the disk was attached with ([`SimDisk::record_into`]).
    pub disk: usize,
    /// What the call did.
    pub call: Recorded,
}

#[derive(Debug, Default)]
struct Events {
    events: Vec<Event>,
    stopped: bool,
}

/// One event list shared by several disks: a global order of their successful writes, length
/// changes and syncs. Each disk appends while it holds its own lock, so the list orders every
/// disk's calls as they took effect, and calls of different disks as they happened in time.
/// Clones share the list.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    shared: Arc<Mutex<Events>>,
}

impl Recorder {
    /// An empty list.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Events recorded so far: the position the next one gets. A test notes it when an
    /// operation is acknowledged; a power cut during event `p` comes after every operation
    /// acknowledged at a position up to `p`.
    pub fn position(&self) -> usize {
        self.shared.lock().events.len()
    }

    /// Stops recording (the disks keep working) and returns the events, in order.
    pub fn finish(&self) -> Vec<Event> {
        let mut shared = self.shared.lock();
        shared.stopped = true;
        std::mem::take(&mut shared.events)
    }

    fn push(&self, disk: usize, call: Recorded) {
        let mut shared = self.shared.lock();
        if !shared.stopped {
            shared.events.push(Event { disk, call });
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
    recorder: Option<(Recorder, usize)>,
    counts: Counts,
    successful_syncs: u64,
    fault: Option<Fault>,
    budget: Option<u64>,
    injected: u64,
}

impl State {
    /// Counts the call and decides whether it fails; `reaches` is the length a write or a
    /// growing `set_len` needs, checked against the budget.
    fn enter(&mut self, call: Call, reaches: Option<u64>) -> io::Result<()> {
        self.counts.bump(call);
        if let Some(f) = self.fault
            && f.on.matches(call)
        {
            let n = self.counts.of(f.on);
            if n == f.nth || (f.persistent && n > f.nth) {
                self.injected += 1;
                return Err(f.error(call, n));
            }
        }
        if let (Some(budget), Some(reach)) = (self.budget, reaches)
            && reach > budget
        {
            self.injected += 1;
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("simulated disk full: {reach} bytes > budget {budget}"),
            ));
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(out.len())?))
            .and_then(|range| self.live.get(range));
        match src {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end ({})",
                    out.len(),
                    self.live.len()
                ),
            )),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        self.enter(Call::Write, Some(end))?;
        self.mutate(DiskOp::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let grows = len > self.live.len() as u64;
        self.enter(Call::SetLen, grows.then_some(len))?;
        self.mutate(DiskOp::SetLen(len));
        Ok(())
    }

    /// Applies `op` to the live image and leaves it pending until the next sync.
    fn mutate(&mut self, op: DiskOp) {
        op.apply_to(&mut self.live);
        if let Some((recorder, disk)) = &self.recorder {
            recorder.push(*disk, Recorded::Op(op.clone()));
        }
        self.pending.push(op);
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.enter(Call::Sync, None)?;
        let pending = std::mem::take(&mut self.pending);
        for op in &pending {
            op.apply_to(&mut self.durable);
        }
        if self.recording {
            self.windows.push(pending);
        }
        if let Some((recorder, disk)) = &self.recorder {
            recorder.push(*disk, Recorded::Sync);
        }
        self.successful_syncs += 1;
        Ok(())
    }
}

/// The simulated disk: one file's live and durable images, its pending operations, and the
/// faults planned for it. Clones share the same disk, so a test keeps a handle while a store
/// owns another (and a store can be reopened over the same bytes).
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// An empty disk with no faults planned.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// A disk whose live and durable images are `image` (a machine booting after a crash).
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
        self.state.lock()
    }

    // ----- the file -----

    /// The live length in bytes (what a reader sees, synced or not).
    pub fn live_len(&self) -> u64 {
        self.lock().live.len() as u64
    }

    /// Fills `out` from the live image at `offset`; reading past the end is an
    /// `UnexpectedEof` error. Reads are never counted nor failed.
    ///
    /// # Errors
    /// The range is past the end of the live image.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.lock().read_at(offset, out)
    }

    /// Writes `data` at `offset` (growing the file if needed), durable at the next sync.
    ///
    /// # Errors
    /// A planned [`Fault`] fires, or the write reaches past the budget (`StorageFull`); the disk
    /// is then unchanged.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.lock().write_at(offset, data)
    }

    /// Sets the file's length (zero-filled when it grows), durable at the next sync.
    ///
    /// # Errors
    /// A planned [`Fault`] fires, or a growth reaches past the budget (`StorageFull`); the disk
    /// is then unchanged.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().set_len(len)
    }

    /// Makes every pending operation durable, in order.
    ///
    /// # Errors
    /// A planned [`Fault`] fires; nothing pending is made durable then.
    pub fn sync_data(&self) -> io::Result<()> {
        self.lock().sync_data()
    }

    // ----- what the disk holds -----

    /// The durable image: what a power cut now would leave.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The live image: everything written, synced or not.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// From now on every successful sync records the window it made durable.
    pub fn start_recording(&self) {
        let mut s = self.lock();
        s.recording = true;
        s.windows.clear();
    }

    /// Stops recording and returns the recorded windows, plus the operations still pending (a
    /// trailing window that no sync has closed yet).
    pub fn take_windows(&self) -> (Vec<Vec<DiskOp>>, Vec<DiskOp>) {
        let mut s = self.lock();
        s.recording = false;
        (std::mem::take(&mut s.windows), s.pending.clone())
    }

    /// From now on every successful write, `set_len` and sync is also appended to `recorder`
    /// as an [`Event`] of disk number `disk` (ops and syncs only: a failed call changes
    /// nothing and is not recorded).
    pub fn record_into(&self, recorder: &Recorder, disk: usize) {
        self.lock().recorder = Some((recorder.clone(), disk));
    }

    // ----- faults -----

    /// The calls seen so far, per kind.
    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Syncs that completed: what has been made durable is everything before the last one.
    pub fn successful_syncs(&self) -> u64 {
        self.lock().successful_syncs
    }

    /// Calls failed on purpose so far (planned faults and budget overruns).
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Plans `fault`, replacing any earlier plan; `None` disarms.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Writes and length changes reaching past `budget` bytes fail with `StorageFull`; `None`
    /// lifts the limit.
    pub fn set_budget(&self, budget: Option<u64>) {
        self.lock().budget = budget;
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live_len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.lock().read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.lock().sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.lock().write_at(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_on_any_call_counts_every_kind_and_a_failed_call_changes_nothing() {
        let disk = SimDisk::new();
        disk.set_len(1024).expect("set_len");
        disk.write_at(0, &[1; 8]).expect("write");
        // The 4th call of any kind, counted since the disk was created: the next write.
        disk.set_fault(Some(Fault {
            on: Target::Any,
            nth: disk.counts().of(Target::Any) + 2,
            persistent: false,
            full: false,
        }));
        disk.sync_data().expect("the 3rd call passes");
        let e = disk.write_at(0, &[2; 8]).expect_err("the 4th call fails");
        assert_eq!(e.kind(), io::ErrorKind::Other);
        let mut out = [0; 8];
        disk.read_at(0, &mut out).expect("read");
        assert_eq!(out, [1; 8], "the failed write changed nothing");
        disk.write_at(0, &[3; 8])
            .expect("a one-shot fault fires once");
        assert_eq!(disk.injected(), 1);
        let counts = disk.counts();
        assert_eq!((counts.writes, counts.set_lens, counts.syncs), (3, 1, 1));
    }

    #[test]
    fn a_persistent_full_disk_fault_fails_every_later_call_of_its_kind() {
        let disk = SimDisk::new();
        disk.set_fault(Some(Fault {
            on: Call::Sync.into(),
            nth: 2,
            persistent: true,
            full: true,
        }));
        disk.write_at(0, &[1; 4]).expect("writes are not targeted");
        disk.sync_data().expect("the first sync passes");
        disk.write_at(4, &[2; 4]).expect("write");
        for _ in 0..3 {
            let e = disk.sync_data().expect_err("every later sync fails");
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        }
        assert_eq!(disk.durable_image(), vec![1; 4], "nothing more is durable");
        assert_eq!(disk.live_image(), [[1; 4], [2; 4]].concat());
        assert_eq!(disk.injected(), 3);
        disk.set_fault(None);
        disk.sync_data().expect("disarmed");
        assert_eq!(disk.durable_image(), disk.live_image());
    }

    #[test]
    fn a_shared_recorder_orders_the_calls_of_two_disks() {
        let recorder = Recorder::new();
        let (a, b) = (SimDisk::new(), SimDisk::new());
        a.write_at(0, &[9; 4]).expect("before recording");
        a.record_into(&recorder, 0);
        b.record_into(&recorder, 1);
        b.set_len(8).expect("set_len");
        a.write_at(0, &[1; 4]).expect("write");
        assert_eq!(recorder.position(), 2);
        a.set_fault(Some(Fault {
            on: Call::Sync.into(),
            nth: 1,
            persistent: false,
            full: false,
        }));
        a.sync_data().expect_err("a failed call is not recorded");
        a.sync_data().expect("sync");
        let events = recorder.finish();
        b.sync_data().expect("after the recording stopped");
        let calls: Vec<(usize, Recorded)> = events.into_iter().map(|e| (e.disk, e.call)).collect();
        assert_eq!(
            calls,
            vec![
                (1, Recorded::Op(DiskOp::SetLen(8))),
                (
                    0,
                    Recorded::Op(DiskOp::Write {
                        offset: 0,
                        data: vec![1; 4]
                    })
                ),
                (0, Recorded::Sync),
            ]
        );
        assert_eq!(recorder.position(), 0);
    }

    #[test]
    fn the_budget_refuses_growth_past_it_but_not_rewrites() {
        let disk = SimDisk::new();
        disk.set_budget(Some(16));
        disk.set_len(16).expect("up to the budget");
        let e = disk.write_at(12, &[0; 8]).expect_err("past the budget");
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        disk.write_at(0, &[7; 16])
            .expect("a rewrite within the budget");
        disk.set_len(4).expect("shrinking is never refused");
        assert_eq!(disk.live_len(), 4);
        assert_eq!(disk.injected(), 1);
    }
}
