//! The `wal` target: the write-ahead log's recovery scan over damaged log files.
//!
//! The input drives a log on a [`SimDisk`], in two rounds (the second continues the log the
//! first recovered, as a reopened store does): a few appends (payloads of arbitrary bytes and
//! sizes, so batches also span segments; durable or not; checkpoints that let segments be
//! recycled), then damage to the file (bit flips, zeroed sectors, sectors copied elsewhere —
//! stale bytes of the same segment —, arbitrary bytes written anywhere), then recovery. The
//! properties:
//!
//! - recovery never panics, and fails only with [`Error::Corrupt`];
//! - what it returns is a prefix of the batches appended after the checkpoint, byte for byte
//!   (a damaged log may lose its tail, never return a batch that was not written, or one out
//!   of order); without damage it returns all of them;
//! - every payload also goes through the batch decoder, which must not panic.

use super::reader::Reader;
use crate::engine::storage::wal::layer::Layer;
use crate::engine::storage::wal::log::{AppendError, Geometry, Log, SECTOR, preallocate};
use crate::error::Error;
use crate::testkit::SimDisk;

/// What one input did, for the stable replay's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalSummary {
    /// Batches appended.
    pub appended: u64,
    /// Batches recovered.
    pub recovered: u64,
    /// Recoveries refused as corrupt.
    pub refused: u64,
}

const GEOMETRY: Geometry = Geometry {
    segment_bytes: 8 * SECTOR,
    segments: 3,
};
const STORE_ID: u64 = 0x1DE5;

/// Runs one input; panics on a violated property.
#[must_use]
pub fn scan_log(bytes: &[u8]) -> WalSummary {
    let mut r = Reader::new(bytes);
    let disk = SimDisk::new();
    preallocate(&disk, GEOMETRY).expect("the simulated disk takes the log");
    let (log, found) =
        Log::recover(Box::new(disk.clone()), GEOMETRY, STORE_ID, 0).expect("an empty log opens");
    assert!(found.batches.is_empty(), "an empty log holds no batch");
    let mut summary = WalSummary::default();
    // Two rounds: the second continues the log the first recovered, as a reopened store does.
    let mut log = Some(log);
    let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut checkpoint = 0;
    for _round in 0..2 {
        let Some(mut current) = log.take() else {
            break;
        };
        let mut appended = kept.clone();
        for _ in 0..r.below(10) {
            let payload = r.bytes(3 * SECTOR as usize);
            let durable = !r.u8().is_multiple_of(4);
            if r.u8().is_multiple_of(4) {
                checkpoint = checkpoint.max(appended.last().map_or(0, |(lsn, _)| *lsn));
            }
            let mut result = current.append(&payload, 1, durable, checkpoint);
            if matches!(result, Err(AppendError::Full)) {
                // What the storage does: checkpoint everything, then try again.
                checkpoint = checkpoint.max(appended.last().map_or(0, |(lsn, _)| *lsn));
                result = current.append(&payload, 1, durable, checkpoint);
            }
            match result {
                Ok(lsn) => {
                    summary.appended += 1;
                    appended.push((lsn, payload));
                }
                // A batch larger than the whole log (the storage refuses those as Internal).
                Err(AppendError::Full) => break,
                Err(AppendError::Failed(e)) => panic!("the simulated disk failed: {e}"),
            }
        }
        drop(current);
        let damages = damage(&mut r, &disk);
        let expected: Vec<&(u64, Vec<u8>)> = appended
            .iter()
            .filter(|(lsn, _)| *lsn > checkpoint)
            .collect();
        match Log::recover(Box::new(disk.clone()), GEOMETRY, STORE_ID, checkpoint) {
            Err(Error::Corrupt { .. }) => {
                assert!(damages > 0, "an undamaged log is refused");
                summary.refused += 1;
            }
            Err(e) => panic!("recovery failed with {e:?}"),
            Ok((next, recovered)) => {
                assert!(
                    recovered.batches.len() <= expected.len(),
                    "recovered {} batches, {} were appended after the checkpoint",
                    recovered.batches.len(),
                    expected.len()
                );
                for (got, want) in recovered.batches.iter().zip(&expected) {
                    assert_eq!(
                        got, *want,
                        "a recovered batch differs from the one appended"
                    );
                }
                if damages == 0 {
                    assert_eq!(recovered.batches.len(), expected.len(), "an undamaged log");
                }
                summary.recovered += recovered.batches.len() as u64;
                for (_, payload) in &recovered.batches {
                    let _ = Layer::decode(payload);
                }
                kept = appended
                    .iter()
                    .filter(|(lsn, _)| *lsn <= checkpoint)
                    .cloned()
                    .chain(recovered.batches)
                    .collect();
                log = Some(next);
            }
        }
    }
    summary
}

/// Damages the log file as the input says; returns how many changes it made.
fn damage(r: &mut Reader<'_>, disk: &SimDisk) -> usize {
    let len = GEOMETRY.file_len();
    let damages = r.below(4);
    for _ in 0..damages {
        let at = u64::from(r.u32()) % len;
        match r.u8() % 4 {
            0 => {
                let mut b = [0u8; 1];
                disk.read_at(at, &mut b).expect("read");
                b[0] ^= 1 << (r.u8() % 8);
                disk.write_at(at, &b).expect("write");
            }
            1 => {
                let sector = at / SECTOR * SECTOR;
                disk.write_at(sector, &[0; SECTOR as usize]).expect("write");
            }
            2 => {
                let from = u64::from(r.u32()) % len / SECTOR * SECTOR;
                let mut b = vec![0u8; SECTOR as usize];
                disk.read_at(from, &mut b).expect("read");
                disk.write_at(at / SECTOR * SECTOR, &b).expect("write");
            }
            _ => {
                let junk = r.bytes(64);
                let at = at.min(len - junk.len() as u64);
                disk.write_at(at, &junk).expect("write");
            }
        }
    }
    damages
}
