//! A read-only view of a database file on which redb may still "write": every write and length
//! change stays in memory, the file is only ever read.
//!
//! A redb file left unclean by a crash cannot be opened read-only (redb must repair it first,
//! and repair writes). To find out whether such a file is an idemstore store before anything is
//! written to it, the store lets redb repair it on this view, inspects the tables, and only
//! then opens the real file for writing. A file that is not ours is left byte for byte as it
//! was.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use parking_lot::Mutex;

/// The unit in which writes are kept: a block is copied from the file on its first write.
const BLOCK: u64 = 4096;

/// A file read through, with redb's writes kept in memory.
#[derive(Debug)]
pub(super) struct Overlay {
    file: Mutex<File>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The length redb sees.
    len: u64,
    /// How much of the file still shows through: bytes past it read as zeros (a shrink
    /// followed by a growth must not bring old bytes back).
    file_len: u64,
    /// Blocks written since open, by block number, each `BLOCK` bytes.
    blocks: HashMap<u64, Vec<u8>>,
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the database",
    )
}

impl Overlay {
    /// A view of the file at `path`, opened for reading only.
    pub(super) fn open(path: &Path) -> io::Result<Overlay> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Overlay {
            file: Mutex::new(file),
            state: Mutex::new(State {
                len,
                file_len: len,
                blocks: HashMap::new(),
            }),
        })
    }

    /// Reads `out.len()` bytes at `offset` of the underlying file, zeros past `file_len`.
    fn read_file(&self, file_len: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        out.fill(0);
        let available = file_len.saturating_sub(offset);
        let n = usize::try_from(available).map_or(out.len(), |a| a.min(out.len()));
        if n == 0 {
            return Ok(());
        }
        let mut file = self.file.lock();
        file.seek(SeekFrom::Start(offset))?;
        let head = out.get_mut(..n).ok_or_else(out_of_range)?;
        file.read_exact(head)
    }

    /// The current contents of block `index`, from memory or the file.
    fn load_block(&self, state: &State, index: u64) -> io::Result<Vec<u8>> {
        if let Some(block) = state.blocks.get(&index) {
            return Ok(block.clone());
        }
        let mut block = vec![0; BLOCK as usize];
        self.read_file(state.file_len, index * BLOCK, &mut block)?;
        Ok(block)
    }
}

/// The block-aligned pieces of the byte range `offset..offset + len`: (block index, offset in
/// the block, offset in the range, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let index = at / BLOCK;
        let in_block = (at % BLOCK) as usize;
        let take = (BLOCK - at % BLOCK).min(end - at) as usize;
        let piece = (index, in_block, (at - offset) as usize, take);
        at += take as u64;
        Some(piece)
    })
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock();
        if offset.saturating_add(out.len() as u64) > state.len {
            return Err(out_of_range());
        }
        for (index, in_block, at, take) in pieces(offset, out.len()) {
            let dest = out.get_mut(at..at + take).ok_or_else(out_of_range)?;
            match state.blocks.get(&index) {
                Some(block) => {
                    let src = block
                        .get(in_block..in_block + take)
                        .ok_or_else(out_of_range)?;
                    dest.copy_from_slice(src);
                }
                None => self.read_file(state.file_len, offset + at as u64, dest)?,
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        if len < state.len {
            state.file_len = state.file_len.min(len);
            state.blocks.retain(|index, _| index * BLOCK < len);
            // The bytes of the last kept block past the new end read as zeros after a growth.
            if let Some(block) = state.blocks.get_mut(&(len / BLOCK)) {
                block
                    .iter_mut()
                    .skip((len % BLOCK) as usize)
                    .for_each(|b| *b = 0);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        for (index, in_block, at, take) in pieces(offset, data.len()) {
            let mut block = self.load_block(&state, index)?;
            let dest = block
                .get_mut(in_block..in_block + take)
                .ok_or_else(out_of_range)?;
            dest.copy_from_slice(data.get(at..at + take).ok_or_else(out_of_range)?);
            state.blocks.insert(index, block);
        }
        state.len = state.len.max(offset.saturating_add(data.len() as u64));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    #[test]
    fn writes_stay_in_memory_and_read_back() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original)?;
        let view = Overlay::open(&path)?;
        view.write(4000, &[9; 200])?;
        view.write(9_990, &[7; 20])?;
        let mut out = vec![0; 10_010];
        view.read(0, &mut out)?;
        let mut expected = original.clone();
        expected.splice(4000..4200, [9; 200]);
        expected.truncate(9_990);
        expected.extend_from_slice(&[7; 20]);
        assert_eq!(out, expected);
        // A shrink then a growth reads zeros where old bytes were.
        view.set_len(100)?;
        view.set_len(300)?;
        let mut tail = vec![1; 200];
        view.read(100, &mut tail)?;
        assert!(tail.iter().all(|b| *b == 0));
        assert!(view.read(250, &mut [0; 100]).is_err());
        assert_eq!(std::fs::read(&path)?, original, "the file is never written");
        Ok(())
    }
}
