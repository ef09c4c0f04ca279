//! The byte reader every fuzz entry point decodes its input with: front to back, and past the
//! end every read is zero, so every byte string is a valid input.

use crate::{RETENTION_MS_MAX, WAIT_MS_MAX};

/// Reads fuzzer bytes front to back; past the end every read is zero.
pub(super) struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(super) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(super) fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub(super) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(super) fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(super) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(super) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        usize::from(self.u16()) % n
    }

    /// A number in `lo..=hi`.
    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + u64::from(self.u16()) % (hi - lo + 1)
    }

    /// Up to `max` bytes: a length, then that many bytes (fewer if the input ends).
    pub(super) fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken.to_vec()
    }

    /// A size in bytes for an input of `max` bytes at most: mostly small, sometimes just
    /// around `limit`, so that both sides of each limit are reached.
    pub(super) fn len_near(&mut self, limit: usize, max: usize) -> usize {
        let len = match self.u8() % 4 {
            0 => limit.saturating_sub(1),
            1 => limit,
            2 => limit.saturating_add(1),
            _ => self.below(max + 1),
        };
        len.min(max)
    }

    /// A duration in milliseconds, biased to zero, small values and every boundary the
    /// limits have.
    pub(super) fn millis(&mut self) -> u64 {
        const BOUNDS: [u64; 10] = [
            0,
            1,
            60_000,
            3_600_000,
            3_600_001,
            30 * 24 * 3_600_000,
            RETENTION_MS_MAX,
            RETENTION_MS_MAX + 1,
            WAIT_MS_MAX + 1,
            u64::MAX,
        ];
        match self.u8() % 6 {
            0 => BOUNDS
                .get(self.below(BOUNDS.len()))
                .copied()
                .unwrap_or_default(),
            1 => u64::from(self.u8()),
            2 => u64::from(self.u16()),
            3 => u64::from(self.u32()),
            4 => self.u64(),
            _ => 1_000 * u64::from(self.u16()),
        }
    }
}
