//! A layer of changes over the redb tables: what one batch wrote (the batch's own writes), or
//! what every batch since the last checkpoint wrote (the record map's active and frozen
//! layers). A layer holds each changed record's final envelope bytes (or its removal), each
//! changed expiry-index entry's presence, each changed scope count and the latest next token,
//! so that laying a newer layer over an older one, or writing a layer into redb, needs no
//! history.
//!
//! The same shape is what a log batch carries: [`Layer::encode`] and [`Layer::decode`] are the
//! payload format of the write-ahead log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Bytes a layer is charged per entry on top of its keys and values (the maps' own overhead,
/// approximately), so that the memory budget tracks what the process really holds.
const ENTRY_OVERHEAD: usize = 64;

/// Bytes of one slot of the record table (key, value and its control byte), charged for each
/// slot a pre-sized layer reserves until an entry fills it (then [`ENTRY_OVERHEAD`] covers it).
const RECORD_SLOT: usize = std::mem::size_of::<(Vec<u8>, Option<Arc<[u8]>>)>() + 1;

/// One layer of changes.
#[derive(Debug, Default, Clone)]
pub(crate) struct Layer {
    /// Scoped key → the record's envelope bytes, or `None` for a removed record.
    pub records: HashMap<Vec<u8>, Option<Arc<[u8]>>>,
    /// `(expires_at_ms, scoped key)` → whether the entry is present.
    pub expiry: BTreeMap<(u64, Vec<u8>), bool>,
    /// Scope → its record count (0: none).
    pub scopes: HashMap<Vec<u8>, u64>,
    /// The next fencing token, if a batch of this layer set it.
    pub next_token: Option<u64>,
    /// The log sequence number of the latest batch in this layer (0: none).
    pub last_lsn: u64,
    /// Approximate memory held, in bytes.
    pub bytes: usize,
    /// How many expiry-index entries the layer adds to what lies below it (negative: removes),
    /// for `Stats` without a lookup per entry. Counted by the writer's batches, which know an
    /// entry they index is new and one they unindex exists; a replayed layer counts each
    /// present entry as new and each absent one as removed, so until its checkpoint the
    /// figure may be off where one batch both indexed and unindexed an entry.
    pub expiry_delta: i64,
    /// Set when the layer is frozen for a checkpoint: every expiry-index entry at or below it
    /// is removed (the sweep's floor), so the checkpoint may clear that part of redb's index in
    /// one pass. Not part of the log's payload.
    pub swept_upto: Option<(u64, Vec<u8>)>,
    /// Record-table slots reserved ahead ([`Layer::sized_like`]) that no entry fills yet;
    /// [`RECORD_SLOT`] bytes each are part of [`Layer::bytes`].
    unused_slots: usize,
}

/// What a layer says about one key: nothing, a record, or that it was removed.
pub(crate) enum Lookup {
    /// The layer did not change the key: look below.
    Unknown,
    /// The record's envelope bytes.
    Found(Arc<[u8]>),
    /// Removed in this layer.
    Removed,
}

impl Layer {
    /// Whether the layer holds no change at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.expiry.is_empty()
            && self.scopes.is_empty()
            && self.next_token.is_none()
    }

    /// An empty layer with room for as many records and scopes as `like` holds: the next
    /// active layer after a freeze, which under a steady load fills as far as the last one,
    /// so that its record table is not rehashed as it grows, with the writer's lock held.
    /// The reserved table counts against the memory budget from the start: each slot no entry
    /// fills yet is charged in [`Layer::bytes`].
    pub(crate) fn sized_like(like: &Layer) -> Layer {
        let records = HashMap::with_capacity(like.records.len());
        let unused_slots = records.capacity();
        Layer {
            records,
            scopes: HashMap::with_capacity(like.scopes.len()),
            bytes: unused_slots.saturating_mul(RECORD_SLOT),
            unused_slots,
            ..Layer::default()
        }
    }

    /// Charges a new record entry, less the reserved slot it fills, if any.
    fn charge_new_record(&mut self, bytes: usize) {
        self.bytes += bytes + ENTRY_OVERHEAD;
        if self.unused_slots > 0 {
            self.unused_slots -= 1;
            self.bytes = self.bytes.saturating_sub(RECORD_SLOT);
        }
    }

    /// What the layer says about the record under `key`.
    pub(crate) fn lookup(&self, key: &[u8]) -> Lookup {
        match self.records.get(key) {
            None => Lookup::Unknown,
            Some(Some(bytes)) => Lookup::Found(Arc::clone(bytes)),
            Some(None) => Lookup::Removed,
        }
    }

    /// Whether the layer changed the record under `key` (put or removed it).
    pub(crate) fn holds(&self, key: &[u8]) -> bool {
        self.records.contains_key(key)
    }

    /// Sets the record under `key` (`None`: removed).
    pub(crate) fn set_record(&mut self, key: &[u8], value: Option<Arc<[u8]>>) {
        let added = value.as_ref().map_or(0, |v| v.len());
        match self.records.get_mut(key) {
            Some(slot) => {
                let old = slot.as_ref().map_or(0, |v| v.len());
                self.bytes = self.bytes.saturating_sub(old) + added;
                *slot = value;
            }
            None => {
                self.charge_new_record(key.len() + added);
                self.records.insert(key.to_vec(), value);
            }
        }
    }

    /// [`Layer::set_record`] with a key the layer may keep (no copy of it).
    fn set_record_owned(&mut self, key: Vec<u8>, value: Option<Arc<[u8]>>) {
        use std::collections::hash_map::Entry;
        let added = value.as_ref().map_or(0, |v| v.len());
        match self.records.entry(key) {
            Entry::Occupied(mut slot) => {
                let old = slot.get().as_ref().map_or(0, |v| v.len());
                self.bytes = self.bytes.saturating_sub(old) + added;
                slot.insert(value);
            }
            Entry::Vacant(slot) => {
                let charged = slot.key().len() + added;
                slot.insert(value);
                self.charge_new_record(charged);
            }
        }
    }

    /// Sets whether the expiry entry `(at_ms, key)` is present; returns what the layer said
    /// before (`None`: nothing).
    pub(crate) fn set_expiry(&mut self, at_ms: u64, key: &[u8], present: bool) -> Option<bool> {
        self.set_expiry_owned((at_ms, key.to_vec()), present)
    }

    /// [`Layer::set_expiry`] with an entry the layer may keep (no copy of its key).
    fn set_expiry_owned(&mut self, entry: (u64, Vec<u8>), present: bool) -> Option<bool> {
        use std::collections::btree_map::Entry;
        match self.expiry.entry(entry) {
            Entry::Occupied(mut mark) => Some(mark.insert(present)),
            Entry::Vacant(mark) => {
                self.bytes += mark.key().1.len() + 8 + ENTRY_OVERHEAD;
                mark.insert(present);
                None
            }
        }
    }

    /// Sets the record count of `scope`.
    pub(crate) fn set_scope(&mut self, scope: &[u8], count: u64) {
        if self.scopes.insert(scope.to_vec(), count).is_none() {
            self.bytes += scope.len() + 8 + ENTRY_OVERHEAD;
        }
    }

    /// Lays `newer` over this layer: its changes replace this layer's for the same keys.
    pub(crate) fn absorb(&mut self, newer: Layer) {
        for (key, value) in newer.records {
            self.set_record_owned(key, value);
        }
        for (entry, present) in newer.expiry {
            self.set_expiry_owned(entry, present);
        }
        for (scope, count) in newer.scopes {
            self.set_scope(&scope, count);
        }
        if newer.next_token.is_some() {
            self.next_token = newer.next_token;
        }
        self.expiry_delta += newer.expiry_delta;
        self.last_lsn = self.last_lsn.max(newer.last_lsn);
    }

    /// The layer as a log batch's payload. Records are carried as their envelopes (each with
    /// its own key-covering CRC); the batch's CRC covers the whole payload.
    ///
    /// Entries: `1` put (key, envelope), `2` remove (key), `3` expiry entry present
    /// (`at_ms`, key), `4` expiry entry absent (`at_ms`, key), `5` scope count (scope, count).
    /// Keys and scopes carry a `u16` length, envelopes a `u32` length, integers are
    /// little-endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for (key, value) in &self.records {
            match value {
                Some(bytes) => {
                    out.push(1);
                    put_key(&mut out, key);
                    out.extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
                    out.extend_from_slice(bytes);
                }
                None => {
                    out.push(2);
                    put_key(&mut out, key);
                }
            }
        }
        for ((at, key), present) in &self.expiry {
            out.push(if *present { 3 } else { 4 });
            out.extend_from_slice(&at.to_le_bytes());
            put_key(&mut out, key);
        }
        for (scope, count) in &self.scopes {
            out.push(5);
            put_key(&mut out, scope);
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }

    /// Reads a payload written by [`Layer::encode`]; any malformed byte is an error, never a
    /// panic.
    pub(crate) fn decode(mut bytes: &[u8]) -> Result<Layer> {
        let mut layer = Layer::default();
        while let Some((&tag, rest)) = bytes.split_first() {
            bytes = rest;
            match tag {
                1 => {
                    let key = take_key(&mut bytes)?;
                    let len = take_u32(&mut bytes)? as usize;
                    let value = take(&mut bytes, len)?;
                    layer.set_record(key, Some(Arc::from(value)));
                }
                2 => {
                    let key = take_key(&mut bytes)?;
                    layer.set_record(key, None);
                }
                3 | 4 => {
                    layer.expiry_delta += if tag == 3 { 1 } else { -1 };
                    let at = take_u64(&mut bytes)?;
                    let key = take_key(&mut bytes)?;
                    layer.set_expiry(at, key, tag == 3);
                }
                5 => {
                    let scope = take_key(&mut bytes)?;
                    let count = take_u64(&mut bytes)?;
                    layer.set_scope(scope, count);
                }
                other => return Err(malformed(format!("unknown entry tag {other}"))),
            }
        }
        Ok(layer)
    }
}

/// Keys and scopes are at most 255 + 1 + 255 bytes (limits.rs), far below `u16::MAX`; a longer
/// one would be cut, and then fail its envelope's key-covering CRC when read.
fn put_key(out: &mut Vec<u8>, key: &[u8]) {
    let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(key.get(..usize::from(len)).unwrap_or(key));
}

/// Envelopes are at most a few MiB (the outcome cap plus the record's fields).
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::corrupt("write-ahead log batch", reason)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if bytes.len() < n {
        return Err(malformed("an entry runs past the end of its batch"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_array<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N]> {
    take(bytes, N)?
        .try_into()
        .map_err(|_| malformed("a short integer"))
}

fn take_key<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8]> {
    let len = u16::from_le_bytes(take_array(bytes)?);
    take(bytes, usize::from(len))
}

fn take_u32(bytes: &mut &[u8]) -> Result<u32> {
    Ok(u32::from_le_bytes(take_array(bytes)?))
}

fn take_u64(bytes: &mut &[u8]) -> Result<u64> {
    Ok(u64::from_le_bytes(take_array(bytes)?))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_round_trips_through_its_payload_and_absorbs_newer_changes() {
        let mut older = Layer::default();
        older.set_record(b"a", Some(Arc::from(&b"one"[..])));
        older.set_record(b"b", Some(Arc::from(&b"two"[..])));
        older.set_expiry(7, b"a", true);
        older.set_scope(b"s", 2);
        let mut newer = Layer::default();
        newer.set_record(b"a", None);
        newer.set_expiry(7, b"a", false);
        newer.set_scope(b"s", 1);
        newer.next_token = Some(9);
        newer.last_lsn = 4;

        let decoded = Layer::decode(&newer.encode()).expect("decodes");
        assert!(matches!(decoded.lookup(b"a"), Lookup::Removed));
        assert_eq!(decoded.expiry.get(&(7, b"a".to_vec())), Some(&false));
        assert_eq!(decoded.scopes.get(b"s".as_slice()), Some(&1));

        older.absorb(newer);
        assert!(matches!(older.lookup(b"a"), Lookup::Removed));
        assert!(matches!(older.lookup(b"b"), Lookup::Found(v) if &*v == b"two"));
        assert!(matches!(older.lookup(b"c"), Lookup::Unknown));
        assert_eq!(older.expiry.get(&(7, b"a".to_vec())), Some(&false));
        assert_eq!((older.next_token, older.last_lsn), (Some(9), 4));
    }

    #[test]
    fn a_pre_sized_layer_is_charged_for_its_reserved_slots_until_entries_fill_them() {
        let mut full = Layer::default();
        for i in 0..1000u32 {
            full.set_record(&i.to_le_bytes(), Some(Arc::from(&b"value"[..])));
        }
        let mut next = Layer::sized_like(&full);
        let reserved = next.records.capacity();
        assert!(reserved >= 1000);
        assert_eq!(
            next.bytes,
            reserved * RECORD_SLOT,
            "reserved, not yet filled"
        );
        assert!(next.is_empty());

        // Filled through both paths (a batch's own writes, and a batch absorbed), each new
        // entry takes one reserved slot's charge off.
        let mut batch = Layer::default();
        for i in 0..500u32 {
            next.set_record(&i.to_le_bytes(), Some(Arc::from(&b"value"[..])));
            batch.set_record(&(i + 500).to_le_bytes(), Some(Arc::from(&b"value"[..])));
        }
        next.absorb(batch);
        assert_eq!(next.records.capacity(), reserved, "filled without growing");
        assert_eq!(next.bytes, full.bytes + (reserved - 1000) * RECORD_SLOT);

        // Once its reserve is used up, a layer is charged as any other.
        let mut plain = full.clone();
        for i in 1000..(reserved as u32 + 10) {
            next.set_record(&i.to_le_bytes(), None);
            plain.set_record(&i.to_le_bytes(), None);
        }
        assert_eq!(next.bytes, plain.bytes);
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let mut layer = Layer::default();
        layer.set_record(b"key", Some(Arc::from(&b"value"[..])));
        let bytes = layer.encode();
        for cut in 0..bytes.len() {
            let r = Layer::decode(&bytes[..cut]);
            assert!(cut == 0 || r.is_err(), "a payload cut at {cut} must fail");
        }
        assert!(Layer::decode(&[9]).is_err());
    }
}
