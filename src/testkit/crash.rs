//! The image a power cut leaves on a [`SimDisk`](super::SimDisk) while one window of pending
//! operations is being synced: each operation applied in full, dropped, or torn at sector
//! granularity.
//!
//! The choices come from the caller (`below(n)`: a uniform draw in `0..n`), so a test keeps
//! its own seeded generator and its recorded seeds stay valid.

use super::disk::{DiskOp, to_usize, write_into};

/// The sector size of the simulated disk: the unit a torn write keeps or loses.
pub const SECTOR: u64 = 512;

/// What became of the pending operations in crash images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fates {
    /// Applied in full.
    pub applied: u64,
    /// Lost entirely.
    pub dropped: u64,
    /// Torn: only some sectors of a write kept (or a length change decided by a coin).
    pub torn: u64,
}

/// The image a power cut leaves while the window `pending` was being synced: `durable`, then
/// each pending operation, in order, applied in full, dropped, or (writes only) torn — only some
/// of its 512-byte sectors (a prefix or an arbitrary subset) reach the disk. `below(n)` draws
/// uniformly in `0..n`; `fates` counts what became of each operation.
pub fn crash_image(
    durable: &[u8],
    pending: &[DiskOp],
    below: &mut impl FnMut(u64) -> u64,
    fates: &mut Fates,
) -> Vec<u8> {
    let mut image = durable.to_vec();
    for op in pending {
        match below(3) {
            0 => {
                op.apply_to(&mut image);
                fates.applied += 1;
            }
            1 => fates.dropped += 1,
            _ => {
                fates.torn += 1;
                match op {
                    DiskOp::SetLen(_) => {
                        // A length change is all or nothing.
                        if coin(below) {
                            op.apply_to(&mut image);
                        }
                    }
                    DiskOp::Write { offset, data } => tear(&mut image, *offset, data, below),
                }
            }
        }
    }
    image
}

/// True one time in two (one draw in `0..100`, as the tests' generators make a 50% chance).
fn coin(below: &mut impl FnMut(u64) -> u64) -> bool {
    below(100) < 50
}

/// Writes only some sectors of `data`: a prefix of them or a random subset.
fn tear(image: &mut Vec<u8>, offset: u64, data: &[u8], below: &mut impl FnMut(u64) -> u64) {
    let end = offset + data.len() as u64;
    let mut sectors = Vec::new();
    let mut s = offset - offset % SECTOR;
    while s < end {
        let lo = s.max(offset);
        let hi = (s + SECTOR).min(end);
        sectors.push((lo, hi));
        s += SECTOR;
    }
    let prefix = coin(below);
    let keep_prefix = to_usize(below(sectors.len() as u64 + 1));
    for (i, (lo, hi)) in sectors.into_iter().enumerate() {
        let keep = if prefix { i < keep_prefix } else { coin(below) };
        if keep {
            let from = to_usize(lo - offset);
            let to = to_usize(hi - offset);
            if let Some(chunk) = data.get(from..to) {
                write_into(image, lo, chunk);
            }
        }
    }
}
