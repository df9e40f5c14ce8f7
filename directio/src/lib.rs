//! `O_DIRECT` file I/O for `--cache=none`, shared by the raw-file export (`nbd-server`) and the
//! qcow2 writer (`qcow2`): a backup of many terabytes must not push the rest of the host out of
//! the page cache.
//!
//! A [`Direct`] is a second descriptor on a file, opened with `O_DIRECT`, that carries every read
//! and write whose offset and length are multiples of [`DIRECT_ALIGN`]; everything else stays on
//! the caller's buffered descriptor, and Linux keeps the two coherent (a direct read writes back
//! dirty pages in its range first, a direct write drops cached ones). `O_DIRECT` also needs
//! aligned memory: a caller whose buffer starts on a [`DIRECT_ALIGN`] boundary (an [`AlignedBuf`],
//! which the NBD server's connections use for every payload) is written and read in place; any
//! other buffer goes through a bounce buffer, aligned by over-allocating and slicing (no
//! `unsafe`), kept for reuse in an [`AlignedPool`] (bounded in bytes; the NBD server's
//! connections take their payload buffers from one too): allocating and faulting in 256 KiB per
//! request had cost more than the copy (0.60x of writeback throughput on disk, against 1.32x
//! with reuse). Every call here
//! waits for the device: async callers run them off their runtime's workers. `O_DIRECT` is not
//! durability: flushes are still `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Offset, length and memory alignment `O_DIRECT` is given (the largest logical block size in
/// common use; a 512-byte device accepts it too).
pub const DIRECT_ALIGN: usize = 4096;

/// Bytes of bounce buffers kept for reuse per file.
const SPARE_BOUNCE_BYTES: usize = 16 << 20;

/// Whether a request at `offset` of `len` bytes can go through `O_DIRECT`.
pub fn is_aligned(offset: u64, len: usize) -> bool {
    offset % DIRECT_ALIGN as u64 == 0 && len % DIRECT_ALIGN == 0 && len > 0
}

/// Whether `buf` starts in memory where `O_DIRECT` takes it as it is (no bounce copy).
pub fn is_memory_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
}

/// The `O_DIRECT` descriptor of one file and the aligned bounce buffers its requests reuse.
#[derive(Debug)]
pub struct Direct {
    file: Arc<File>,
    spare: AlignedPool,
}

impl Direct {
    /// Open `path` with `O_DIRECT`, for reading and, if `writable`, writing.
    ///
    /// # Errors
    /// The open failed, or the filesystem refuses `O_DIRECT` (`EINVAL`); the message says so.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("O_DIRECT (--cache=none) refused: {e}")))?;
        Ok(Self { file: Arc::new(file), spare: AlignedPool::new(SPARE_BOUNCE_BYTES) })
    }

    /// The `O_DIRECT` descriptor itself, for callers that submit their own I/O (io_uring) with
    /// aligned offsets, lengths and memory; shared, so such I/O may outlive a borrow of `self`.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A bounce buffer of `len` usable bytes (contents unspecified), reused when one is spare.
    pub fn take(&self, len: usize) -> AlignedBuf {
        self.spare.take(len)
    }

    /// Keep `buf` for a later request.
    pub fn give_back(&self, buf: AlignedBuf) {
        self.spare.put(buf);
    }

    /// Write a bounce buffer's bytes at `offset` (aligned: see [`is_aligned`]).
    ///
    /// # Errors
    /// The write failed.
    pub fn write_buf(&self, buf: &AlignedBuf, offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf.as_slice(), offset)
    }

    /// Fill a bounce buffer from `offset` (aligned: see [`is_aligned`]).
    ///
    /// # Errors
    /// The read failed, or the file ends first (`UnexpectedEof`).
    pub fn read_buf(&self, buf: &mut AlignedBuf, offset: u64) -> io::Result<()> {
        read_exact_direct(&self.file, buf.as_mut_slice(), offset)
    }

    /// Write `data` at `offset` (aligned: see [`is_aligned`]): in place when `data` starts on an
    /// aligned address, through a bounce buffer otherwise.
    ///
    /// # Errors
    /// The write failed.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if is_memory_aligned(data) {
            return self.file.write_all_at(data, offset);
        }
        let mut bounce = self.take(data.len());
        bounce.as_mut_slice().copy_from_slice(data);
        let result = self.write_buf(&bounce, offset);
        self.give_back(bounce);
        result
    }

    /// Fill `buf` from `offset` (aligned: see [`is_aligned`]): in place when `buf` starts on an
    /// aligned address, through a bounce buffer otherwise.
    ///
    /// # Errors
    /// The read failed, or the file ends first (`UnexpectedEof`).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_memory_aligned(buf) {
            return read_exact_direct(&self.file, buf, offset);
        }
        let mut bounce = self.take(buf.len());
        let result = self.read_buf(&mut bounce, offset);
        if result.is_ok() {
            buf.copy_from_slice(bounce.as_slice());
        }
        self.give_back(bounce);
        result
    }
}

/// Fill `buf` from `offset` of an `O_DIRECT` file. A read the end of the file cuts short may
/// stop at any byte (the file's size need not be aligned: a buffered write may have just grown
/// it), and the rest of the range, at an unaligned offset, `O_DIRECT` refuses with `EINVAL`; so
/// a short read ends it with `UnexpectedEof`, which callers answer with a buffered read that
/// gives the bytes past the end as zeroes.
fn read_exact_direct(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if done % DIRECT_ALIGN != 0 {
            break;
        }
    }
    if done < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the file ends {done} bytes into a direct read at {offset}"),
        ));
    }
    Ok(())
}

/// Aligned buffers kept for reuse, at most `max_bytes` of them (an idle user holds a bounded
/// amount of memory): allocating and faulting in a fresh buffer per request costs more than the
/// request's own copy.
#[derive(Debug)]
pub struct AlignedPool {
    free: Mutex<Vec<AlignedBuf>>,
    max_bytes: usize,
}

impl AlignedPool {
    /// A pool that keeps at most `max_bytes` of spare buffers.
    pub fn new(max_bytes: usize) -> Self {
        Self { free: Mutex::default(), max_bytes }
    }

    /// A buffer of `len` bytes (contents unspecified: stale data of an earlier user, or zeroes),
    /// a spare one when one is large enough.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let at = free.iter().position(|b| b.capacity() >= len)?;
            Some(free.swap_remove(at))
        });
        let mut buf = reused.unwrap_or_default();
        if !buf.set_len(len) {
            buf = AlignedBuf::new(len);
        }
        buf
    }

    /// Keep `buf` for reuse (dropped if the pool is full).
    pub fn put(&self, buf: AlignedBuf) {
        if buf.capacity() == 0 || buf.capacity() > self.max_bytes {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            let held: usize = free.iter().map(AlignedBuf::capacity).sum();
            if held + buf.capacity() <= self.max_bytes {
                free.push(buf);
            }
        }
    }

    /// Bytes held for reuse.
    pub fn held(&self) -> usize {
        self.free.lock().map(|free| free.iter().map(AlignedBuf::capacity).sum()).unwrap_or(0)
    }
}

/// A buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary: over-allocated by one
/// alignment and sliced, which needs no `unsafe`. It derefs to its usable bytes.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeroed bytes starting on an aligned address.
    pub fn new(len: usize) -> Self {
        if len == 0 {
            return Self::default();
        }
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { bytes, start, len }
    }

    /// Bytes usable from the aligned start: the most [`AlignedBuf::set_len`] accepts.
    pub fn capacity(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// Use `len` bytes (contents unspecified: whatever the buffer held). Returns `false`, and
    /// changes nothing, when `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        self.len = len;
        true
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.get(self.start..self.start + self.len).unwrap_or_default()
    }

    /// The usable bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.get_mut(self.start..self.start + self.len).unwrap_or_default()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}
