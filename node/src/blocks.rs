//! A run of blocks' bytes on its way from a source to a sink, in the pieces it arrived in.
//!
//! A file source reads into the worker's buffer: one piece, the buffer shared so that a file
//! sink's blocking thread and an NBD connection (a tunnel channel takes `Bytes` as they are) use
//! it without a copy, and it comes back for the next read once they are done with it. An NBD
//! source answers with the pieces its connection received (`Client::read_bytes`): through the
//! tunnel, the channel's own messages. Joining those into one buffer was 13% of the node's CPU
//! in a restore through the tunnel; instead the hashes walk them block by block, a file sink
//! writes them with one `pwritev`, and an NBD sink sends them as they are when a write's worth
//! is one piece (it is, from a plain connection) and joins them otherwise.
//!
//! Holding a read's messages until the whole read has arrived pays only with an allocator that
//! keeps freed pages: on glibc's malloc the heap shrank and grew again under them and the
//! restore got slower than with the copy. The node runs on mimalloc (`sendense-node`); with it,
//! a restore through the tunnel takes 0.94-0.95x the node's CPU (`benches/RESULTS.md`).

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::Bytes;

use crate::blockmap::{self, Hash};

/// A worker's read buffer as the memory of `Bytes`.
struct SharedBuffer(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Consecutive bytes of a disk, in pieces (module doc).
pub struct Blocks {
    pieces: Vec<Bytes>,
    len: usize,
    /// The worker's buffer the pieces are slices of, to be given back ([`Blocks::into_buffer`]).
    buffer: Option<Arc<Vec<u8>>>,
}

impl Blocks {
    /// The bytes of a worker's buffer.
    pub fn from_buffer(buffer: Vec<u8>) -> Self {
        let buffer = Arc::new(buffer);
        let len = buffer.len();
        let piece = Bytes::from_owner(SharedBuffer(Arc::clone(&buffer)));
        Self { pieces: vec![piece], len, buffer: Some(buffer) }
    }

    /// Bytes received in pieces, in order.
    pub fn from_pieces(pieces: Vec<Bytes>) -> Self {
        let len = pieces.iter().map(Bytes::len).sum();
        Self { pieces, len, buffer: None }
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// BLAKE3 of each `block_size` bytes in turn (the last may be shorter), across pieces.
    pub fn hashes(&self, block_size: usize) -> Vec<Hash> {
        let block_size = block_size.max(1);
        let mut hashes = Vec::with_capacity(self.len.div_ceil(block_size));
        let mut pieces = self.pieces.iter().filter(|p| !p.is_empty());
        let mut current: &[u8] = &[];
        let mut left = self.len;
        while left > 0 {
            let mut want = block_size.min(left);
            left -= want;
            if current.is_empty() {
                current = pieces.next().map_or(&[], |p| p.as_ref());
            }
            if current.len() >= want {
                // The whole block in one piece: hashed in one call, as a contiguous buffer is.
                let (block, rest) = current.split_at(want);
                hashes.push(blockmap::hash_block(block));
                current = rest;
                continue;
            }
            let mut hasher = blake3::Hasher::new();
            while want > 0 {
                if current.is_empty() {
                    match pieces.next() {
                        Some(p) => current = p.as_ref(),
                        None => break,
                    }
                }
                let (part, rest) = current.split_at(want.min(current.len()));
                hasher.update(part);
                want -= part.len();
                current = rest;
            }
            hashes.push(*hasher.finalize().as_bytes());
        }
        hashes
    }

    /// Bytes `range` as slices of the pieces that hold them (no copy); `None` when `range` is
    /// not inside.
    pub fn slice(&self, range: Range<usize>) -> Option<Vec<Bytes>> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        let mut out = Vec::new();
        let mut start = 0usize;
        for piece in &self.pieces {
            let end = start + piece.len();
            let (from, to) = (range.start.max(start), range.end.min(end));
            if from < to {
                out.push(piece.slice(from - start..to - start));
            }
            if end >= range.end {
                break;
            }
            start = end;
        }
        Some(out)
    }

    /// The worker's buffer back, if these bytes were read into one and nothing else holds it
    /// any more.
    pub fn into_buffer(self) -> Option<Vec<u8>> {
        let buffer = self.buffer?;
        drop(self.pieces);
        Arc::try_unwrap(buffer).ok()
    }
}

/// Write `pieces`, in order, at `offset` of `file`: one `pwritev` for up to `IOV_MAX` of them,
/// again for what a short write left.
///
/// # Errors
/// The write failed, or wrote nothing.
pub fn write_all_at(file: impl AsFd, pieces: &[Bytes], offset: u64) -> std::io::Result<()> {
    /// Linux's `IOV_MAX`.
    const MAX_SLICES: usize = 1024;
    let mut at = offset;
    for group in pieces.chunks(MAX_SLICES) {
        let mut slices: Vec<std::io::IoSlice<'_>> = group.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut rest = slices.as_mut_slice();
        while !rest.is_empty() {
            let n = rustix::io::pwritev(&file, rest, at)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at += n as u64;
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// The same bytes cut into pieces of the given lengths.
    fn cut(data: &[u8], lengths: &[usize]) -> Blocks {
        let mut pieces = Vec::new();
        let mut at = 0;
        for &n in lengths {
            pieces.push(Bytes::copy_from_slice(&data[at..at + n]));
            at += n;
        }
        pieces.push(Bytes::copy_from_slice(&data[at..]));
        Blocks::from_pieces(pieces)
    }

    #[test]
    fn hashes_do_not_depend_on_how_the_bytes_were_cut() {
        let data = pattern(10 * 4096 + 1000);
        let whole: Vec<Hash> = data.chunks(4096).map(blockmap::hash_block).collect();
        assert_eq!(Blocks::from_buffer(data.clone()).hashes(4096), whole);
        for lengths in [&[1usize, 4095, 4096][..], &[3000, 3000, 3000, 0, 17], &[4096; 10], &[40_000]] {
            assert_eq!(cut(&data, lengths).hashes(4096), whole, "cut at {lengths:?}");
        }
    }

    #[test]
    fn slices_are_the_bytes_of_the_range() {
        let data = pattern(50_000);
        let blocks = cut(&data, &[1000, 7, 20_000, 3]);
        for range in [0..50_000, 999..1008, 1007..1007, 1500..30_000, 49_999..50_000] {
            let got: Vec<u8> = blocks.slice(range.clone()).expect("inside").concat();
            assert_eq!(got, data[range.clone()], "{range:?}");
        }
        assert!(blocks.slice(49_000..50_001).is_none());
    }

    #[test]
    fn the_buffer_comes_back_once_its_slices_are_gone() {
        let blocks = Blocks::from_buffer(pattern(8192));
        let held = blocks.slice(0..10).expect("inside");
        assert!(Blocks::from_buffer(pattern(10)).into_buffer().is_some());
        assert!(blocks.into_buffer().is_none(), "a slice still holds it");
        drop(held);
        assert!(Blocks::from_pieces(vec![Bytes::from_static(b"x")]).into_buffer().is_none());
    }

    #[test]
    fn pieces_are_written_in_order_at_the_offset() {
        let data = pattern(3 * 1024 * 1024 + 5);
        let file = tempfile::tempfile().expect("temp file");
        // More pieces than one pwritev takes.
        let lengths = vec![1500usize; 2000];
        let blocks = cut(&data, &lengths);
        let pieces = blocks.slice(0..data.len()).expect("inside");
        write_all_at(&file, &pieces, 4096).expect("written");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 4096).expect("read back");
        assert_eq!(back, data);
    }
}
