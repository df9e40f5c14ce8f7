//! Sealed files, read and written as they go: a body, then the BLAKE3 of the body (the form of
//! every change-tracking file, `blockmap`). The largest body is a map of 4 Mi hashes (128 MiB):
//! built whole in memory before it was written, or read whole before it was parsed, it cost a
//! second map's memory on top of the map, at every checkpoint of every disk a node copies. Here
//! the body goes through a 64 KiB buffer that is hashed and written (or read and hashed) a chunk
//! at a time, so saving a map holds nothing more than the map, and loading one holds the map it
//! gives and a buffer.
//!
//! A reader knows the file's length before it reads: the body is everything but the last 32
//! bytes, and a field the body's header asks for is only read (or allocated for) when the bytes
//! left in the body hold it. The trailer is checked once the body is read; until then nothing
//! read is trusted, and a caller uses what it parsed only if [`SealedReader::finish`] says yes.

use std::io::{Read, Write};

/// The size of the chunks hashed and written or read at a time.
const CHUNK: usize = 1 << 16;

/// A sealed file's body being written: hashed as it is written, sealed by [`Self::finish`].
pub struct SealedWriter<'a> {
    out: &'a mut dyn Write,
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
}

impl<'a> SealedWriter<'a> {
    /// A body written to `out`.
    pub fn new(out: &'a mut dyn Write) -> Self {
        Self { out, hasher: blake3::Hasher::new(), buffer: Vec::with_capacity(CHUNK) }
    }

    /// Append `bytes` to the body.
    ///
    /// # Errors
    /// Writing failed.
    pub fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> std::io::Result<()> {
        self.hasher.update(&self.buffer);
        self.out.write_all(&self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    /// The rest of the body, then its BLAKE3.
    ///
    /// # Errors
    /// Writing failed.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.drain()?;
        self.out.write_all(self.hasher.finalize().as_bytes())
    }
}

/// A sealed file's body being read from `inner`, whose whole length (body and trailer) is known.
pub struct SealedReader<R> {
    inner: R,
    /// Body bytes not read yet.
    left: u64,
    hasher: blake3::Hasher,
}

impl<R: Read> SealedReader<R> {
    /// The body of a file of `len` bytes read from `inner`; `None` if it is too short for a
    /// trailer.
    pub fn new(inner: R, len: u64) -> Option<Self> {
        Some(Self { inner, left: len.checked_sub(32)?, hasher: blake3::Hasher::new() })
    }

    /// Body bytes not read yet.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The next `len` bytes of the body, in chunks given to `each`; `None` if the body holds
    /// fewer or they cannot be read.
    pub fn chunks(&mut self, len: u64, mut each: impl FnMut(&[u8])) -> Option<()> {
        if len > self.left {
            return None;
        }
        let mut buffer = vec![0u8; usize::try_from(len.min(CHUNK as u64)).ok()?];
        let mut rest = len;
        while rest > 0 {
            let part = buffer.get_mut(..usize::try_from(rest.min(CHUNK as u64)).ok()?)?;
            self.inner.read_exact(part).ok()?;
            self.hasher.update(part);
            each(part);
            rest -= part.len() as u64;
        }
        self.left -= len;
        Some(())
    }

    /// The next `len` bytes of the body; `None` if it holds fewer.
    pub fn bytes(&mut self, len: u64) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(len.min(self.left)).ok()?);
        self.chunks(len, |c| out.extend_from_slice(c))?;
        Some(out)
    }

    /// The next 8 bytes of the body as a little-endian number.
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }

    /// The body read to its end, and its trailer checked: `Some` only if every byte of the body
    /// was read and the trailer is its BLAKE3.
    pub fn finish(mut self) -> Option<()> {
        if self.left != 0 {
            return None;
        }
        let mut trailer = [0u8; 32];
        self.inner.read_exact(&mut trailer).ok()?;
        (self.hasher.finalize().as_bytes() == &trailer).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = SealedWriter::new(&mut out);
        for part in body.chunks(1000) {
            w.put(part).unwrap();
        }
        w.finish().unwrap();
        out
    }

    #[test]
    fn what_is_written_reads_back_and_checks_and_anything_else_does_not() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = sealed(&body);
        assert_eq!(file.len(), body.len() + 32);
        assert_eq!(&file[body.len()..], blake3::hash(&body).as_bytes());
        let mut r = SealedReader::new(&file[..], file.len() as u64).unwrap();
        assert_eq!(r.u64(), Some(u64::from_le_bytes(body[..8].try_into().unwrap())));
        let mut rest = Vec::new();
        r.chunks(r.left(), |c| rest.extend_from_slice(c)).unwrap();
        assert_eq!(rest, &body[8..]);
        assert_eq!(r.finish(), Some(()));
        // Body not read to its end, a flipped byte, a short file, a read past the body.
        let mut r = SealedReader::new(&file[..], file.len() as u64).unwrap();
        r.bytes(10).unwrap();
        assert_eq!(r.finish(), None);
        let mut flipped = file.clone();
        flipped[100_000] ^= 1;
        let mut r = SealedReader::new(&flipped[..], flipped.len() as u64).unwrap();
        r.chunks(r.left(), |_| {}).unwrap();
        assert_eq!(r.finish(), None);
        assert!(SealedReader::new(&file[..31], 31).is_none());
        let mut r = SealedReader::new(&file[..], file.len() as u64).unwrap();
        assert_eq!(r.bytes(body.len() as u64 + 1), None);
        assert_eq!(r.left(), body.len() as u64, "a refused read reads nothing");
    }
}
