//! The write-ahead log on disk: one preallocated file of fixed-size segments, written in order
//! and recycled once a checkpoint covers them.
//!
//! ```text
//! file     = segment 0 | segment 1 | ... | segment n-1       (each `segment_bytes`, zero-filled)
//! segment  = header sector | chunk | chunk | ...              (segment seq s lives in slot s % n)
//! header   = "IDEMWAL\x01" store_id seq first_lsn salt crc    (the first 512-byte sector)
//! chunk    = chunk header | payload | zero padding to 512     (a batch is 1..k chunks)
//! c.header = magic flags lsn durable_lsn next_token len part crc
//! ```
//!
//! - A batch (one commit of the writer) gets the next log sequence number (LSN); its payload is
//!   a [`Layer`](super::layer::Layer) encoding, split into chunks only when it does not fit in
//!   the space left in a segment. It counts only if every chunk is valid, up to the last one.
//! - Every CRC covers the segment's random salt, so the stale bytes of a recycled segment (and
//!   client bytes that happen to look like a header) never validate.
//! - `durable_lsn` in each chunk is the LSN up to which the log had been synced when the chunk
//!   was written. Recovery uses it to tell a torn unsynced tail (dropped: nothing in it was
//!   acknowledged as durable) from damage to synced batches that later ones prove were
//!   acknowledged (the open is refused with [`Error::Corrupt`]).
//! - One `write` per segment a batch touches and one `sync_data` per durable batch.
//! - After recovery the log continues in a new segment (new salt), so bytes of a dropped tail
//!   can never be read as a continuation of what is written next.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use redb::StorageBackend;

use crate::engine::storage::redb::WalMeta;
use crate::error::{Error, Result};

use super::sync_times::SyncTimes;
use crate::engine::telemetry::Telemetry;

/// The unit of alignment: chunks start on sector boundaries, and a torn write loses whole
/// sectors.
pub(crate) const SECTOR: u64 = 512;
const SEGMENT_MAGIC: &[u8; 8] = b"IDEMWAL\x01";
const SEGMENT_HEADER_LEN: usize = 44;
const CHUNK_MAGIC: u32 = 0x4257_4449; // "IDWB"
const CHUNK_HEADER_LEN: u64 = 48;
/// The bytes a segment header takes: one sector.
const SEGMENT_HEADER_SPAN: u64 = SECTOR;
const FLAG_LAST: u32 = 1;

/// The shape of a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Bytes per segment, a multiple of [`SECTOR`].
    pub segment_bytes: u64,
    /// Segments in the file.
    pub segments: u64,
}

impl Geometry {
    /// The geometry a format-2 database file records for its log.
    pub(crate) fn of(meta: &WalMeta) -> Geometry {
        Geometry {
            segment_bytes: meta.segment_bytes,
            segments: meta.segments,
        }
    }

    /// The largest batch payload an append always finds room for once a checkpoint has
    /// covered the whole log: every segment but the one being written, each less its header,
    /// a chunk header and the sector rounding of the chunks at either end.
    pub(crate) fn batch_bytes_max(&self) -> u64 {
        let per_segment = self
            .segment_bytes
            .saturating_sub(SEGMENT_HEADER_SPAN + CHUNK_HEADER_LEN + 2 * SECTOR);
        self.segments.saturating_sub(1) * per_segment
    }

    /// The file's length.
    pub(crate) fn file_len(&self) -> u64 {
        self.segment_bytes * self.segments
    }

    fn slot_offset(&self, seq: u64) -> u64 {
        (seq % self.segments) * self.segment_bytes
    }

    fn slot(&self, seq: u64) -> usize {
        usize::try_from(seq % self.segments).unwrap_or(0)
    }
}

/// Why [`Log::append`] did not write.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// The segments the batch needs still hold batches no checkpoint covers: checkpoint, then
    /// try again.
    Full,
    /// The write or the sync failed; the log accepts nothing more.
    Failed(Error),
}

/// A segment header as read from disk.
#[derive(Debug, Clone, Copy)]
struct SegmentHeader {
    seq: u64,
    first_lsn: u64,
    salt: u64,
}

/// A chunk header as read from disk (its CRC already checked).
#[derive(Debug, Clone, Copy)]
struct Chunk {
    last: bool,
    lsn: u64,
    durable_lsn: u64,
    next_token: u64,
    part: u32,
    /// Sector-rounded length of the whole chunk.
    span: u64,
}

/// The write-ahead log file and where the next batch goes.
pub(crate) struct Log {
    file: Box<dyn StorageBackend>,
    geometry: Geometry,
    store_id: u64,
    /// The segment being written (0: none yet; the next batch starts segment `seq + 1`).
    seq: u64,
    salt: u64,
    /// Where the next chunk goes in the current segment.
    offset: u64,
    /// Start a new segment before the next batch.
    must_advance: bool,
    /// The LSN the next batch gets.
    next_lsn: u64,
    /// The highest LSN written, and the highest known to be on stable storage.
    written_lsn: u64,
    synced_lsn: u64,
    /// Per slot, the highest LSN it holds (0: nothing a checkpoint has not covered).
    slot_max_lsn: Vec<u64>,
    salt_state: u64,
    failed: bool,
    /// Bytes appended since open (chunks with their headers and padding).
    appended_bytes: u64,
    /// How long the batches' syncs took.
    sync_times: Arc<SyncTimes>,
    /// Where each sync's duration is reported, once the store has said (`report_to`); the
    /// syncs of the recovery before it are not.
    telemetry: Option<Telemetry>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("geometry", &self.geometry)
            .field("seq", &self.seq)
            .field("offset", &self.offset)
            .field("next_lsn", &self.next_lsn)
            .field("synced_lsn", &self.synced_lsn)
            .finish_non_exhaustive()
    }
}

/// Where a recovery walk stands between segments.
struct Walk {
    /// The chunk the log continues with: (batch, part).
    expected: Option<(u64, u32)>,
    /// The parts read so far of the batch being reassembled.
    assembling: Vec<u8>,
    /// The last batch read whole.
    last_complete: u64,
}

/// What recovery found after the checkpoint.
pub(crate) struct Recovered {
    /// The payloads of the complete batches after the checkpoint, in LSN order.
    pub batches: Vec<(u64, Vec<u8>)>,
    /// The highest next token any replayed batch carried.
    pub next_token: Option<u64>,
}

fn io_error(e: std::io::Error) -> Error {
    Error::from_io(e)
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::corrupt("write-ahead log", reason)
}

fn crc(salt: u64, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// The `N` bytes at `at` (zeros past the end: callers read fixed fields of fixed-size headers).
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes_at(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes_at(b, at))
}

/// `b[..n]` (all of `b` if shorter).
fn head(b: &[u8], n: usize) -> &[u8] {
    b.get(..n).unwrap_or(b)
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Log {
    /// Scans `file` for the batches after `checkpoint_lsn` and returns the log, ready to append
    /// after them, with what it found. Refuses (typed [`Error::Corrupt`]) when damage is
    /// followed by a batch proving the damaged one had been synced.
    pub(crate) fn recover(
        file: Box<dyn StorageBackend>,
        geometry: Geometry,
        store_id: u64,
        checkpoint_lsn: u64,
    ) -> Result<(Log, Recovered)> {
        let len = file.len().map_err(io_error)?;
        if len < geometry.file_len() {
            return Err(corrupt(format!(
                "the log file holds {len} bytes, its geometry needs {}",
                geometry.file_len()
            )));
        }
        let mut log = Log {
            file,
            geometry,
            store_id,
            seq: 0,
            salt: 0,
            offset: 0,
            must_advance: true,
            next_lsn: checkpoint_lsn + 1,
            written_lsn: checkpoint_lsn,
            synced_lsn: checkpoint_lsn,
            slot_max_lsn: vec![0; to_usize(geometry.segments)],
            salt_state: seed(),
            failed: false,
            appended_bytes: 0,
            sync_times: Arc::default(),
            telemetry: None,
        };
        let mut headers = Vec::new();
        // Slots whose header sector holds bytes but no valid header (torn, or damaged): the
        // segment cannot be read, and is erased below so that it never reads differently,
        // unless its chunks show that it held batches acknowledged as durable.
        let mut unreadable = Vec::new();
        for slot in 0..geometry.segments {
            match log.read_segment_header(slot)? {
                Some(h) => headers.push(h),
                None => {
                    let mut sector = [0u8; SECTOR as usize];
                    log.file
                        .read(slot * geometry.segment_bytes, &mut sector)
                        .map_err(io_error)?;
                    if sector.iter().any(|b| *b != 0) {
                        unreadable.push(slot);
                    }
                }
            }
        }
        headers.sort_by_key(|h| h.seq);
        let cp = checkpoint_lsn;
        // The newest segment that starts at or before the first batch to replay (cp + 1):
        // the newest, because after a recovery that dropped a torn tail the log continues in a
        // new segment that may start at the same LSN as the one holding the dropped batch. A
        // segment starting at cp + 1 with a continuation chunk holds the rest of a batch begun
        // in the segment before it, where the walk must start.
        let mut start = None;
        for (i, h) in headers.iter().enumerate().rev() {
            if h.first_lsn < cp + 1
                || (h.first_lsn == cp + 1 && log.first_chunk(*h)?.is_some_and(|c| c.part == 0))
            {
                start = Some(i);
                break;
            }
        }
        let mut recovered = Recovered {
            batches: Vec::new(),
            next_token: None,
        };
        let mut last_seq = headers.iter().map(|h| h.seq).max().unwrap_or(0);
        let mut end_seq = None;
        let mut end_at = None;
        if let Some(start) = start {
            let mut walk = Walk {
                expected: None,
                assembling: Vec::new(),
                last_complete: cp,
            };
            let mut index = start;
            while let Some(&header) = headers.get(index) {
                // Where the successor segment starts bounds what this one may still hold: the
                // log went on there, so a later batch here is one an earlier recovery dropped
                // (a torn tail, or the first part of a batch whose rest was torn).
                let successor = headers
                    .get(index + 1)
                    .copied()
                    .filter(|n| n.seq == header.seq + 1);
                let bound = match successor {
                    Some(n) => Some(match log.first_chunk(n)? {
                        Some(c) if c.lsn == n.first_lsn => (c.lsn, c.part),
                        _ => (n.first_lsn, 0),
                    }),
                    None => None,
                };
                let (end, max_lsn) =
                    log.walk_segment(header, cp, bound, &mut walk, &mut recovered)?;
                log.set_slot_max(header.seq, max_lsn);
                end_seq = Some(header.seq);
                let next = headers.get(index + 1).copied();
                let continues = match (next, walk.expected) {
                    (Some(n), Some((lsn, part))) if n.seq == header.seq + 1 => log
                        .first_chunk(n)?
                        .is_some_and(|c| c.lsn == lsn && c.part == part),
                    _ => false,
                };
                if continues {
                    index += 1;
                    continue;
                }
                // The end of the log: nothing after it may prove that a synced batch is lost.
                let missing = walk.expected.map_or(walk.last_complete + 1, |(lsn, _)| lsn);
                log.check_no_synced_after(header, end, missing)?;
                for later in headers.get(index + 1..).unwrap_or_default() {
                    log.check_no_synced_after(*later, SECTOR, missing)?;
                }
                log.check_unreadable(&unreadable, missing)?;
                end_at = Some((header, end));
                break;
            }
            log.next_lsn = walk.last_complete.max(cp) + 1;
        } else {
            for h in &headers {
                log.check_no_synced_after(*h, SECTOR, cp + 1)?;
            }
            log.check_unreadable(&unreadable, cp + 1)?;
        }
        // Segments past the end of the log hold nothing to keep: erase their headers, so that
        // none is ever read as a continuation of what is written next.
        let orphans: Vec<u64> = headers
            .iter()
            .filter(|h| end_seq.is_none_or(|e| h.seq > e))
            .map(|h| h.seq)
            .collect();
        let mut erase: Vec<u64> = unreadable
            .iter()
            .map(|slot| slot * geometry.segment_bytes)
            .collect();
        for seq in &orphans {
            erase.push(geometry.slot_offset(*seq));
            log.set_slot_max(*seq, 0);
        }
        // Whatever follows the end of the log in its last segment (a torn or dropped chunk)
        // is erased too: the decision to end the log there is then final, even if those bytes
        // would read back intact later. The log goes on in a new segment either way.
        if let Some((segment, end)) = end_at
            && end + SECTOR <= geometry.segment_bytes
        {
            let at = geometry.slot_offset(segment.seq) + end;
            let mut sector = [0u8; SECTOR as usize];
            log.file.read(at, &mut sector).map_err(io_error)?;
            if sector.iter().any(|b| *b != 0) {
                erase.push(at);
            }
        }
        if !erase.is_empty() {
            for at in erase {
                log.file
                    .write(at, &[0u8; SECTOR as usize])
                    .map_err(io_error)?;
            }
            log.file.sync_data().map_err(io_error)?;
        }
        if let Some(e) = end_seq {
            last_seq = e;
        }
        log.seq = last_seq;
        log.written_lsn = log.next_lsn - 1;
        log.synced_lsn = log.written_lsn;
        Ok((log, recovered))
    }

    /// Refuses the log if a segment whose header cannot be read (`unreadable` slots) holds a
    /// valid chunk saying the log had been synced through `missing`. Its chunks are read with
    /// the salt as the damaged header still holds it: damage elsewhere in the header (its
    /// magic, sequence, first LSN or checksum) leaves them readable, and then they tell
    /// whether the segment held acknowledged batches, which must not be dropped as a torn
    /// tail. (A damaged salt leaves no chunk readable: that segment reads as never written.)
    fn check_unreadable(&self, unreadable: &[u64], missing: u64) -> Result<()> {
        for &slot in unreadable {
            let mut b = [0u8; SEGMENT_HEADER_LEN];
            self.file
                .read(slot * self.geometry.segment_bytes, &mut b)
                .map_err(io_error)?;
            let as_read = SegmentHeader {
                // Only its slot matters to the reads below.
                seq: slot,
                first_lsn: 0,
                salt: u64_at(&b, 32),
            };
            self.check_no_synced_after(as_read, SECTOR, missing)
                .map_err(|e| match e {
                    Error::Corrupt { location, reason } => Error::Corrupt {
                        location,
                        reason: format!(
                            "the header of log segment slot {slot} is damaged, and {reason}"
                        ),
                    },
                    other => other,
                })?;
        }
        Ok(())
    }

    fn read_segment_header(&self, slot: u64) -> Result<Option<SegmentHeader>> {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        self.file
            .read(slot * self.geometry.segment_bytes, &mut b)
            .map_err(io_error)?;
        if bytes_at::<8>(&b, 0) != *SEGMENT_MAGIC {
            return Ok(None);
        }
        let stored = u32_at(&b, 40);
        if crc(0, &[head(&b, 40)]) != stored {
            return Ok(None);
        }
        if u64_at(&b, 8) != self.store_id {
            return Err(corrupt(format!(
                "segment {slot} of the log belongs to another store (id {:#x}, this store's \
                 is {:#x}): the log file is not this database's",
                u64_at(&b, 8),
                self.store_id
            )));
        }
        let header = SegmentHeader {
            seq: u64_at(&b, 16),
            first_lsn: u64_at(&b, 24),
            salt: u64_at(&b, 32),
        };
        if header.seq == 0 || header.seq % self.geometry.segments != slot {
            return Ok(None);
        }
        Ok(Some(header))
    }

    /// The valid chunk at `offset` of `segment`, with its payload, if there is one.
    fn read_chunk(
        &self,
        segment: SegmentHeader,
        offset: u64,
        payload: &mut Vec<u8>,
    ) -> Result<Option<Chunk>> {
        let seg_end = self.geometry.segment_bytes;
        if offset + CHUNK_HEADER_LEN > seg_end {
            return Ok(None);
        }
        let base = self.geometry.slot_offset(segment.seq);
        let mut h = [0u8; CHUNK_HEADER_LEN as usize];
        self.file.read(base + offset, &mut h).map_err(io_error)?;
        if u32_at(&h, 0) != CHUNK_MAGIC {
            return Ok(None);
        }
        let len = u64::from(u32_at(&h, 36));
        if offset + CHUNK_HEADER_LEN + len > seg_end {
            return Ok(None);
        }
        payload.clear();
        payload.resize(to_usize(len), 0);
        self.file
            .read(base + offset + CHUNK_HEADER_LEN, payload)
            .map_err(io_error)?;
        if crc(segment.salt, &[head(&h, 44), payload]) != u32_at(&h, 44) {
            return Ok(None);
        }
        Ok(Some(Chunk {
            last: u32_at(&h, 4) & FLAG_LAST != 0,
            lsn: u64_at(&h, 8),
            durable_lsn: u64_at(&h, 16),
            next_token: u64_at(&h, 24),
            part: u32_at(&h, 40),
            span: round_up(CHUNK_HEADER_LEN + len),
        }))
    }

    fn first_chunk(&self, segment: SegmentHeader) -> Result<Option<Chunk>> {
        let mut payload = Vec::new();
        self.read_chunk(segment, SECTOR, &mut payload)
    }

    /// Reads the chunks of one segment that continue the log, up to `bound` (where the
    /// successor segment starts: batch, part). Returns where they end and the highest LSN among
    /// them.
    fn walk_segment(
        &self,
        segment: SegmentHeader,
        checkpoint_lsn: u64,
        bound: Option<(u64, u32)>,
        walk: &mut Walk,
        recovered: &mut Recovered,
    ) -> Result<(u64, u64)> {
        let Walk {
            expected,
            assembling,
            last_complete,
        } = walk;
        let mut offset = SECTOR;
        let mut max_lsn = 0;
        let mut payload = Vec::new();
        while let Some(chunk) = self.read_chunk(segment, offset, &mut payload)? {
            let fits = match *expected {
                Some((lsn, part)) => chunk.lsn == lsn && chunk.part == part,
                // The first chunk read: a batch the checkpoint covers, or the one after it.
                None => {
                    chunk.lsn <= checkpoint_lsn
                        || (chunk.lsn == checkpoint_lsn + 1 && chunk.part == 0)
                }
            };
            // With a successor starting at batch `f` part `p`: batches before `f`, and the parts
            // of `f` before `p`.
            let within =
                bound.is_none_or(|(f, p)| chunk.lsn < f || (chunk.lsn == f && chunk.part < p));
            if !fits || !within {
                break;
            }
            if chunk.lsn > checkpoint_lsn {
                if chunk.part == 0 {
                    assembling.clear();
                }
                assembling.extend_from_slice(&payload);
            }
            if chunk.last {
                if chunk.lsn > checkpoint_lsn {
                    recovered
                        .batches
                        .push((chunk.lsn, std::mem::take(assembling)));
                    recovered.next_token = recovered.next_token.max(Some(chunk.next_token));
                }
                *last_complete = (*last_complete).max(chunk.lsn);
                *expected = Some((chunk.lsn + 1, 0));
            } else {
                *expected = Some((chunk.lsn, chunk.part + 1));
            }
            max_lsn = max_lsn.max(chunk.lsn);
            offset += chunk.span;
        }
        Ok((offset, max_lsn))
    }

    /// Refuses the log if any valid chunk of `segment` at or after `from` says the log had
    /// been synced through `missing`: that batch was acknowledged and cannot be read back.
    fn check_no_synced_after(&self, segment: SegmentHeader, from: u64, missing: u64) -> Result<()> {
        // Read in blocks (a sector at a time made an open of a default 128 MiB log cost a
        // quarter of a million reads); only a sector that starts with the chunk magic is read
        // as a chunk.
        const BLOCK: u64 = 1 << 20;
        let base = self.geometry.slot_offset(segment.seq);
        let end = self.geometry.segment_bytes;
        let mut offset = from.max(SECTOR);
        let mut block = Vec::new();
        let mut payload = Vec::new();
        while offset + CHUNK_HEADER_LEN <= end {
            let n = BLOCK.min(end - offset);
            block.resize(to_usize(n), 0);
            self.file
                .read(base + offset, &mut block)
                .map_err(io_error)?;
            let mut at = 0;
            while at + CHUNK_HEADER_LEN <= n {
                if u32_at(block.get(to_usize(at)..).unwrap_or_default(), 0) == CHUNK_MAGIC
                    && let Some(chunk) = self.read_chunk(segment, offset + at, &mut payload)?
                    && chunk.durable_lsn >= missing
                {
                    return Err(corrupt(format!(
                        "batch {missing} is damaged or missing, but batch {} after it shows it \
                         had been synced: acknowledged writes would be lost, so the store is not \
                         opened (restore the files from a backup, or inspect them)",
                        chunk.lsn
                    )));
                }
                at += SECTOR;
            }
            offset += n;
        }
        Ok(())
    }

    /// The highest LSN the slot of segment `seq` holds.
    fn slot_max(&self, seq: u64) -> u64 {
        self.slot_max_lsn
            .get(self.geometry.slot(seq))
            .copied()
            .unwrap_or(0)
    }

    fn set_slot_max(&mut self, seq: u64, lsn: u64) {
        let slot = self.geometry.slot(seq);
        if let Some(max) = self.slot_max_lsn.get_mut(slot) {
            *max = lsn;
        }
    }

    /// Bytes appended since open.
    pub(crate) fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// The LSN the next batch gets.
    pub(crate) fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Appends one batch; with `durable`, returns only after the sync that covers it. Returns
    /// the batch's LSN.
    pub(crate) fn append(
        &mut self,
        payload: &[u8],
        next_token: u64,
        durable: bool,
        checkpoint_lsn: u64,
    ) -> std::result::Result<u64, AppendError> {
        if self.failed {
            return Err(AppendError::Failed(Error::Internal(
                "the write-ahead log failed earlier and accepts no more writes".into(),
            )));
        }
        let lsn = self.next_lsn;
        let g = self.geometry;
        // Plan every write first; nothing changes unless all of it can go ahead.
        let mut seq = self.seq;
        let mut salt = self.salt;
        let mut offset = self.offset;
        let mut advance = self.must_advance || seq == 0;
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut new_slots = Vec::new();
        // Every segment a chunk of this batch goes to: none may be recycled before a
        // checkpoint covers the batch, the one it starts in included.
        let mut touched: Vec<u64> = Vec::new();
        let mut rest = payload;
        let mut part = 0u32;
        loop {
            if !advance && offset + CHUNK_HEADER_LEN + SECTOR > g.segment_bytes {
                advance = true;
            }
            if advance {
                seq += 1;
                let slot = g.slot(seq);
                // The slot must hold nothing a checkpoint has not covered, and no earlier
                // chunk of this batch: one that started in the current segment, with the
                // rest of the log free, would otherwise come round onto its own start.
                if self.slot_max(seq) > checkpoint_lsn
                    || new_slots.contains(&slot)
                    || touched.iter().any(|t| g.slot(*t) == slot)
                {
                    return Err(AppendError::Full);
                }
                new_slots.push(slot);
                salt = self.next_salt();
                let mut header = Vec::with_capacity(SECTOR as usize);
                header.extend_from_slice(SEGMENT_MAGIC);
                header.extend_from_slice(&self.store_id.to_le_bytes());
                header.extend_from_slice(&seq.to_le_bytes());
                header.extend_from_slice(&lsn.to_le_bytes());
                header.extend_from_slice(&salt.to_le_bytes());
                let c = crc(0, &[&header]);
                header.extend_from_slice(&c.to_le_bytes());
                header.resize(SECTOR as usize, 0);
                writes.push((g.slot_offset(seq), header));
                offset = SECTOR;
            }
            let room = g.segment_bytes - offset - CHUNK_HEADER_LEN;
            let take = rest.len().min(to_usize(room));
            let (now, later) = rest.split_at(take);
            let last = later.is_empty();
            let len32 = u32::try_from(now.len()).unwrap_or(u32::MAX);
            let mut h = Vec::with_capacity(CHUNK_HEADER_LEN as usize);
            h.extend_from_slice(&CHUNK_MAGIC.to_le_bytes());
            h.extend_from_slice(&(if last { FLAG_LAST } else { 0 }).to_le_bytes());
            h.extend_from_slice(&lsn.to_le_bytes());
            h.extend_from_slice(&self.synced_lsn.to_le_bytes());
            h.extend_from_slice(&next_token.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&len32.to_le_bytes());
            h.extend_from_slice(&part.to_le_bytes());
            let c = crc(salt, &[&h, now]);
            h.extend_from_slice(&c.to_le_bytes());
            let span = round_up(CHUNK_HEADER_LEN + now.len() as u64);
            if touched.last() != Some(&seq) {
                touched.push(seq);
            }
            // Append to this segment's write (it follows the header or the previous chunk).
            let base = g.slot_offset(seq);
            let buf = match writes.last_mut() {
                Some((at, buf)) if *at + buf.len() as u64 == base + offset => buf,
                _ => {
                    writes.push((base + offset, Vec::new()));
                    &mut writes.last_mut().expect("just pushed").1
                }
            };
            let start = buf.len();
            buf.extend_from_slice(&h);
            buf.extend_from_slice(now);
            buf.resize(start + to_usize(span), 0);
            offset += span;
            rest = later;
            if last {
                break;
            }
            part += 1;
            advance = true;
        }
        let mut bytes = 0;
        for (at, buf) in &writes {
            bytes += buf.len() as u64;
            if let Err(e) = self.file.write(*at, buf) {
                self.failed = true;
                return Err(AppendError::Failed(io_error(e)));
            }
        }
        if durable && let Err(e) = self.sync_data() {
            self.failed = true;
            return Err(AppendError::Failed(io_error(e)));
        }
        for slot in new_slots {
            if let Some(max) = self.slot_max_lsn.get_mut(slot) {
                *max = lsn;
            }
        }
        for touched in touched {
            self.set_slot_max(touched, self.slot_max(touched).max(lsn));
        }
        self.seq = seq;
        self.salt = salt;
        self.offset = offset;
        self.must_advance = false;
        self.next_lsn = lsn + 1;
        self.written_lsn = lsn;
        self.appended_bytes += bytes;
        if durable {
            self.synced_lsn = lsn;
        }
        Ok(lsn)
    }

    /// Makes every written batch durable (one `sync_data`, if any is unsynced).
    pub(crate) fn sync(&mut self) -> Result<()> {
        if self.failed {
            return Err(Error::Internal(
                "the write-ahead log failed earlier and accepts no more writes".into(),
            ));
        }
        if self.written_lsn > self.synced_lsn {
            if let Err(e) = self.sync_data() {
                self.failed = true;
                return Err(io_error(e));
            }
            self.synced_lsn = self.written_lsn;
        }
        Ok(())
    }

    /// One `sync_data` of the file, timed.
    fn sync_data(&self) -> std::io::Result<()> {
        let started = Instant::now();
        let synced = self.file.sync_data();
        let took = started.elapsed();
        self.sync_times.record(took);
        if let Some(telemetry) = &self.telemetry {
            telemetry.log_synced(took);
        }
        synced
    }

    /// Reports each sync's duration to `telemetry` from now on.
    pub(crate) fn report_to(&mut self, telemetry: Telemetry) {
        self.telemetry = Some(telemetry);
    }

    /// How long the batches' syncs took, since open (shared: `Stats` reads it without the log).
    pub(crate) fn sync_times(&self) -> Arc<SyncTimes> {
        Arc::clone(&self.sync_times)
    }

    /// For `Stats`: the live segments as of `checkpoint_lsn`, the next LSN and the bytes
    /// appended since open.
    pub(crate) fn figures(&self, checkpoint_lsn: u64) -> (u64, u64, u64) {
        (
            self.live_segments(checkpoint_lsn),
            self.next_lsn(),
            self.appended_bytes(),
        )
    }

    /// Bytes of the log holding batches no checkpoint covers (whole segments, approximately).
    pub(crate) fn live_segments(&self, checkpoint_lsn: u64) -> u64 {
        self.slot_max_lsn
            .iter()
            .filter(|&&max| max > checkpoint_lsn)
            .count() as u64
    }

    fn next_salt(&mut self) -> u64 {
        // splitmix64 over a seed taken from the clock and the process at open.
        self.salt_state = self.salt_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.salt_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A seed for segment salts that differs between opens: the time, the process, and the
/// randomly keyed std hasher.
pub(crate) fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Writes a new log file's full length in zeros and syncs it: later batches overwrite
/// preallocated blocks, which is cheaper to sync than growing the file.
pub(crate) fn preallocate(file: &dyn StorageBackend, geometry: Geometry) -> Result<()> {
    const STEP: u64 = 1 << 20;
    file.set_len(geometry.file_len()).map_err(io_error)?;
    let zeros = vec![0u8; to_usize(STEP)];
    let mut at = 0;
    while at < geometry.file_len() {
        let n = STEP.min(geometry.file_len() - at);
        file.write(at, head(&zeros, to_usize(n)))
            .map_err(io_error)?;
        at += n;
    }
    file.sync_data().map_err(io_error)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::backends::InMemoryBackend;

    use super::*;

    /// One in-memory file shared by the logs of successive "opens".
    #[derive(Debug, Clone)]
    struct File(Arc<InMemoryBackend>);

    impl StorageBackend for File {
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.write(offset, data)
        }
    }

    const G: Geometry = Geometry {
        segment_bytes: 8 * SECTOR,
        segments: 3,
    };

    fn recover(file: &File, cp: u64) -> Result<(Log, Recovered)> {
        Log::recover(Box::new(file.clone()), G, 7, cp)
    }

    fn payloads(r: &Recovered) -> Vec<(u64, Vec<u8>)> {
        r.batches.clone()
    }

    #[test]
    fn a_torn_first_batch_of_a_segment_does_not_hide_the_log_written_after_recovery() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        assert_eq!(log.append(b"lost", 1, true, 0).expect("append"), 1);
        // Tear it: the first chunk of segment 1 (slot 1) is zeroed.
        file.write(G.segment_bytes + SECTOR, &[0; SECTOR as usize])
            .expect("tear");
        let (mut log, found) = recover(&file, 0).expect("a torn tail is dropped");
        assert!(found.batches.is_empty());
        // The log continues in a new segment starting at the same LSN.
        assert_eq!(log.append(b"one", 1, true, 0).expect("append"), 1);
        assert_eq!(log.append(b"two", 2, true, 0).expect("append"), 2);
        let (_, found) = recover(&file, 0).expect("the continued log opens");
        assert_eq!(
            payloads(&found),
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(found.next_token, Some(2));
    }

    #[test]
    fn a_batch_spanning_segments_is_replayed_whole_from_where_it_begins() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        let big = vec![7u8; 5 * SECTOR as usize];
        assert_eq!(log.append(b"small", 1, true, 0).expect("append"), 1);
        assert_eq!(log.append(&big, 2, true, 0).expect("append"), 2);
        assert_eq!(log.append(b"after", 3, true, 0).expect("append"), 3);
        // Checkpoint 1: batch 2 begins in the segment that also holds batch 1.
        let (_, found) = recover(&file, 1).expect("opens");
        assert_eq!(
            payloads(&found),
            vec![(2, big.clone()), (3, b"after".to_vec())]
        );
        let (_, found) = recover(&file, 2).expect("opens");
        assert_eq!(payloads(&found), vec![(3, b"after".to_vec())]);
    }

    #[test]
    fn a_batch_torn_where_it_crosses_segments_does_not_hide_the_log_written_after_it() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        assert_eq!(log.append(b"small", 1, true, 0).expect("append"), 1);
        let big = vec![7u8; 8 * SECTOR as usize];
        assert_eq!(log.append(&big, 2, true, 0).expect("append"), 2);
        // A power cut tore the part in the second segment (seq 2, slot 2); the first part
        // stays in segment 1.
        file.write(2 * G.segment_bytes + SECTOR, &[0; SECTOR as usize])
            .expect("tear");
        let (mut log, found) = recover(&file, 0).expect("a torn tail is dropped");
        assert_eq!(payloads(&found), vec![(1, b"small".to_vec())]);
        // The log goes on with another batch 2, synced: it must be read back, and the first
        // part of the old batch 2 must not make it look lost.
        assert_eq!(log.append(b"new", 3, true, 0).expect("append"), 2);
        let (_, found) = recover(&file, 0).expect("the continued log opens");
        assert_eq!(
            payloads(&found),
            vec![(1, b"small".to_vec()), (2, b"new".to_vec())]
        );
    }

    #[test]
    fn a_dropped_tail_stays_dropped_even_if_its_bytes_read_back_intact_later() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        log.append(b"first", 1, true, 0).expect("append");
        log.append(b"second", 2, false, 0).expect("append");
        // The second batch reads back damaged once (unsynced, so it is dropped)...
        let at = G.segment_bytes + 2 * SECTOR + CHUNK_HEADER_LEN;
        let mut b = [0u8; 1];
        file.read(at, &mut b).expect("read");
        file.write(at, &[b[0] ^ 1]).expect("write");
        let (log, found) = recover(&file, 0).expect("a torn tail is dropped");
        assert_eq!(payloads(&found), vec![(1, b"first".to_vec())]);
        drop(log);
        // ...and intact the next time: the store went on without it, so it must not return.
        file.read(at, &mut b).expect("read");
        file.write(at, &[b[0] ^ 1]).expect("write");
        let (_, found) = recover(&file, 0).expect("opens");
        assert_eq!(payloads(&found), vec![(1, b"first".to_vec())]);
    }

    #[test]
    fn the_segment_a_batch_begins_in_is_not_recycled_before_the_batch_is_checkpointed() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        assert_eq!(log.append(b"small", 1, true, 0).expect("append"), 1);
        // Begins in segment 1 (slot 1), ends in segment 2.
        let big = vec![9u8; 8 * SECTOR as usize];
        assert_eq!(log.append(&big, 2, true, 0).expect("append"), 2);
        // A checkpoint covers batch 1 only; the log fills up. Segment 1's slot must not be
        // reused while batch 2 is not checkpointed: the log reports itself full instead.
        let mut full = false;
        for _ in 0..40 {
            match log.append(b"more", 3, true, 1) {
                Ok(_) => {}
                Err(AppendError::Full) => {
                    full = true;
                    break;
                }
                Err(AppendError::Failed(e)) => panic!("{e}"),
            }
        }
        assert!(full, "the log never filled up");
        let (_, found) = recover(&file, 1).expect("the log opens");
        assert_eq!(found.batches.first(), Some(&(2, big)));
    }

    #[test]
    fn a_batch_that_would_come_round_onto_its_own_start_is_refused_and_nothing_is_lost() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        assert_eq!(log.append(b"small", 1, true, 0).expect("append"), 1);
        // A checkpoint covers everything; the batch begins in segment 1 after "small" and
        // needs more than the rest of it and the other two segments hold.
        let room = |first: bool| {
            G.segment_bytes - SECTOR * u64::from(first) - SEGMENT_HEADER_SPAN - CHUNK_HEADER_LEN
        };
        let more = room(true) + 2 * room(false) + 1_000;
        let big = vec![7u8; usize::try_from(more).expect("small")];
        assert!(matches!(
            log.append(&big, 2, true, 1),
            Err(AppendError::Full)
        ));
        // What fits goes on, and everything acknowledged is found again.
        assert_eq!(log.append(b"after", 2, true, 1).expect("append"), 2);
        let (_, found) = recover(&file, 1).expect("the log opens");
        assert_eq!(found.batches, vec![(2, b"after".to_vec())]);
    }

    #[test]
    fn damage_followed_by_a_synced_batch_is_refused() {
        let file = File(Arc::new(InMemoryBackend::new()));
        preallocate(&file, G).expect("preallocate");
        let (mut log, _) = recover(&file, 0).expect("empty");
        log.append(b"first", 1, true, 0).expect("append");
        log.append(b"second", 2, true, 0).expect("append");
        // Flip a payload byte of the first batch.
        let at = G.segment_bytes + SECTOR + CHUNK_HEADER_LEN;
        let mut b = [0u8; 1];
        file.read(at, &mut b).expect("read");
        file.write(at, &[b[0] ^ 1]).expect("write");
        assert!(matches!(recover(&file, 0), Err(Error::Corrupt { .. })));
    }
}
