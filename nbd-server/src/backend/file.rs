//! A raw-file (or block-device) backend with positional I/O.
//!
//! Reads and writes are `pread`/`pwrite` at the request's offset; reads never wait on each
//! other, writes take turns per file (`gate.rs`: the kernel serialises them anyway). They run on
//! the calling runtime thread: for the request sizes NBD clients use (4 KiB to a few MiB against
//! the page cache) the copy is cheaper than a hop to the blocking pool and back. A read first
//! takes what the page cache holds without waiting (`preadv2` with `RWF_NOWAIT`); only the rest,
//! which must come from the device, waits — under `block_in_place`, so a cold disk never holds a
//! worker other connections need (cold 1 GiB reads on disk, 3 runs: 1.10-1.22x a plain `pread`
//! with one connection, 0.94-1.33x with four). The calls that wait on the device —
//! `fdatasync` for FLUSH and FUA, and `fallocate` for TRIM and WRITE_ZEROES — and the
//! zero-writing fallback (a client-chosen length) run on tokio's blocking pool.
//!
//! `--cache=none` ([`FileBackend::open_direct`]) sends aligned reads and writes through a second,
//! `O_DIRECT` descriptor (the `directio` crate); unaligned ones and everything else use this one.
//! The server's payload buffers start on a page boundary, so those go to the device in place
//! under `block_in_place`; an embedder's unaligned buffer is copied through a bounce buffer on
//! the blocking pool.
//!
//! `--aio=io_uring` ([`FileBackend::with_io_uring`], `uring.rs`) sends writes, flushes, the
//! reads that go to `O_DIRECT` and the uncached rest of buffered reads through one ring per
//! export instead. What the page cache answers stays a copy on the caller's worker: through the
//! ring such reads ran at 0.90-1.12x (tmpfs, 1 GiB,
//! `benches/scripts/aio.sh`), the hop to the ring thread and back costing about what the copy
//! does. Measured, same script: with `--cache=none` on disk, writes 1.32-1.57x the threads path
//! at 0.6x its CPU per GB (no worker handed over per request); writeback on tmpfs 1.04-1.15x;
//! writeback on disk 0.88-1.02x (so `threads` stays the default, as in qemu-nbd).
//!
//! Zero-copy reads: a file in memory (tmpfs, ramfs) offers its ranges to the server
//! ([`Backend::file_range`]), which sends them to TCP clients with `sendfile`, page cache to socket
//! with no copy through this process: reads of a 1 GiB file on tmpfs ran at 1.3x (4 connections)
//! and 1.7x (1 connection) nbdkit's throughput at half its CPU per GB. Files on a device keep the
//! copy path: `sendfile` of a range not in the page cache would wait for the disk on the
//! connection's writer, where a read through `RWF_NOWAIT` waits off the workers.
//!
//! Large writes from TCP clients arrive in a pipe ([`Backend::write_piped`], `piped.rs`) and are
//! `splice`d into the file at their offset: one copy into the page cache, none through this
//! process. Not with `O_DIRECT` or io_uring, which take the payload from memory.
//!
//! Holes: TRIM punches them (`FALLOC_FL_PUNCH_HOLE`), WRITE_ZEROES punches them too unless the
//! client sent NO_HOLE (then `FALLOC_FL_ZERO_RANGE`), and block status finds them with
//! `SEEK_DATA`/`SEEK_HOLE`, so sparse copies stay sparse. Where the filesystem cannot do an
//! `fallocate` mode, write-zeroes falls back to writing zeroes and reports itself not fast.
//!
//! Every structured read asks block status first (to send holes as hole chunks), which is two
//! `lseek`s, each under the inode lock on tmpfs and ext4 — for a sequential copy of a full disk,
//! two syscalls and two lock round trips per request that find the same data run again. So the
//! backend remembers the last data run it found ([`KnownData`]) and answers queries inside it
//! without a syscall. Only data is remembered, never holes: a write can fill a hole at any time,
//! but a stale "data" answer is still correct — the read sends what `pread` returns (zeroes, if
//! the range was punched since), and block status may always report allocated for a hole. TRIM
//! and WRITE_ZEROES forget it anyway, so answers stay as sparse as the file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};

use super::uring::{IoRing, Uring};
use super::{
    blocking, in_memory, Backend, BackendError, BackendErrorKind, BackendResult, Capabilities, FileExtent, PipedData,
    ZeroFlags,
};
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::transmission::Extent;
use directio::{is_aligned, is_memory_aligned, Direct};

/// Most extents one block status answer walks before returning what it has.
const MAX_EXTENTS_PER_QUERY: usize = 1024;
/// Chunk used when zeroes must be written for real.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file served as an export.
#[derive(Debug, Clone)]
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    read_only: bool,
    known_data: Arc<KnownData>,
    write_gate: super::gate::WriteGate,
    /// The `O_DIRECT` descriptor of `--cache=none`, and its bounce buffers.
    direct: Option<Arc<Direct>>,
    /// The ring of `--aio=io_uring` (`uring.rs`), shared by clones.
    uring: Option<Arc<Uring>>,
    /// The file refused `RWF_NOWAIT` reads once: read it plainly.
    no_nowait: Arc<std::sync::atomic::AtomicBool>,
    /// The file lives in memory (tmpfs, ramfs): reading it never waits for a device.
    in_memory: bool,
}

/// The last run of data `SEEK_DATA`/`SEEK_HOLE` found, `[start, end)`; empty when unknown.
#[derive(Debug, Default)]
struct KnownData(std::sync::Mutex<(u64, u64)>);

impl KnownData {
    /// Whether all of `[offset, end)` lies in the remembered data run.
    fn covers(&self, offset: u64, end: u64) -> bool {
        self.0.lock().is_ok_and(|run| run.0 <= offset && end <= run.1 && offset < end)
    }

    fn remember(&self, start: u64, end: u64) {
        if let Ok(mut run) = self.0.lock() {
            *run = (start, end);
        }
    }

    fn forget(&self) {
        self.remember(0, 0);
    }
}

impl FileBackend {
    /// Open `path`; `read_only` opens it without write access and makes the export read-only.
    ///
    /// # Errors
    /// The open or size query failed (missing file, permissions, not seekable).
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = rustix::fs::seek(&file, SeekFrom::End(0))?;
        Ok(Self::over(file, size, read_only))
    }

    /// A backend over `file` of `size` bytes, buffered, on the runtime's threads.
    fn over(file: File, size: u64, read_only: bool) -> Self {
        let in_memory = in_memory(&file);
        Self {
            file: Arc::new(file),
            size,
            read_only,
            known_data: Arc::default(),
            write_gate: Default::default(),
            direct: None,
            uring: None,
            no_nowait: Arc::default(),
            in_memory,
        }
    }

    /// Open `path` for `--cache=none`: as [`FileBackend::open`], plus an `O_DIRECT` descriptor
    /// for aligned I/O (see the module doc).
    ///
    /// # Errors
    /// The open failed, or the filesystem refuses `O_DIRECT` (`EINVAL`).
    pub fn open_direct(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let mut b = Self::open(path, read_only)?;
        b.direct = Some(Arc::new(Direct::open(path, !read_only)?));
        Ok(b)
    }

    /// Send reads, writes and flushes through one io_uring for this file (`--aio=io_uring`; see
    /// the module doc), shared by every clone of the backend.
    ///
    /// # Errors
    /// The kernel refuses io_uring (too old, `kernel.io_uring_disabled`, seccomp).
    pub fn with_io_uring(self) -> std::io::Result<Self> {
        Ok(self.with_ring(&IoRing::new()?))
    }

    /// As [`Self::with_io_uring`], through a ring other exports may share.
    pub fn with_ring(mut self, ring: &IoRing) -> Self {
        self.uring = Some(Arc::clone(&ring.0));
        self
    }

    /// Whether I/O goes through io_uring (`--aio=io_uring`).
    pub fn is_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// The descriptor for a request: the `O_DIRECT` one when `--cache=none` can take it as it
    /// is (aligned range and memory), the buffered one otherwise.
    fn descriptor_for(&self, offset: u64, buf: &[u8]) -> &File {
        match &self.direct {
            Some(direct) if self.goes_direct(offset, buf) => direct.file(),
            _ => &self.file,
        }
    }

    /// Read what the page cache holds of `[offset, offset + buf.len())` without waiting for the
    /// device: the bytes copied (a prefix, possibly none), or `None` where the kernel cannot
    /// read without waiting on this file (then it is not asked again).
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<std::io::Result<usize>> {
        if self.no_nowait.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(&*self.file, &mut [std::io::IoSliceMut::new(buf)], offset, flags) {
            Ok(n) => Some(Ok(n)),
            Err(rustix::io::Errno::AGAIN) => Some(Ok(0)),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                self.no_nowait.store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Whether a request goes to the `O_DIRECT` descriptor as it is.
    fn goes_direct(&self, offset: u64, buf: &[u8]) -> bool {
        self.direct.is_some() && is_aligned(offset, buf.len()) && is_memory_aligned(buf)
    }

    /// Whether reads and writes bypass the page cache (`--cache=none`).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Create (or truncate) a sparse file of `size` bytes and open it read-write.
    ///
    /// # Errors
    /// Creating or sizing the file failed.
    pub fn create(path: &Path, size: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Ok(Self::over(file, size, false))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        offset: u64,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> BackendResult<T> {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| BackendError::io(op, offset, e)),
            Err(join) => Err(BackendError::new(BackendErrorKind::Io, format!("{op} task failed: {join}"))),
        }
    }

    async fn sync(&self) -> BackendResult<()> {
        if let Some(ring) = &self.uring {
            return ring.sync_data(&self.file).await.map(drop).map_err(|e| BackendError::io("fdatasync", 0, e));
        }
        self.blocking("fdatasync", 0, |f| f.sync_data()).await
    }

    async fn fallocate(&self, op: &'static str, flags: FallocateFlags, offset: u64, length: u64) -> BackendResult<()> {
        self.blocking(op, offset, move |f| Ok(rustix::fs::fallocate(f, flags, offset, length)?)).await
    }

    /// Write real zeroes over a range whose length the client chose (up to 4 GiB, more with
    /// extended headers): on the blocking pool, never on a runtime thread other connections share.
    async fn write_zeroes_slowly(&self, offset: u64, length: u64) -> BackendResult<()> {
        self.blocking("write zeroes", offset, move |f| {
            let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(length).unwrap_or(ZERO_CHUNK))];
            let mut pos = offset;
            let end = offset + length;
            while pos < end {
                let n = (end - pos).min(zeroes.len() as u64) as usize;
                f.write_all_at(zeroes.get(..n).unwrap_or_default(), pos)?;
                pos += n as u64;
            }
            Ok(())
        })
        .await
    }

    fn seek(&self, whence: SeekFrom) -> Result<Option<u64>, BackendError> {
        match rustix::fs::seek(&*self.file, whence) {
            Ok(pos) => Ok(Some(pos)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(BackendError::io("seek data/hole", 0, e.into())),
        }
    }
}

fn is_unsupported(e: &BackendError) -> bool {
    e.kind == BackendErrorKind::Unsupported
        || e.source.as_ref().and_then(|s| s.raw_os_error()) == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
}

#[async_trait::async_trait]
impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            trim: !self.read_only,
            write_zeroes: !self.read_only,
            fast_zero: !self.read_only,
            block_status: true,
            cache: true,
            writes_wait: self.direct.is_some() || self.uring.is_some(),
            piped_writes: !self.read_only && self.direct.is_none() && self.uring.is_none(),
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        if let Some(ring) = self.uring.as_ref().filter(|_| self.goes_direct(offset, buf)) {
            return ring.read_exact(self.descriptor_for(offset, buf), buf, offset).await;
        }
        if let Some(direct) = self.direct.as_ref().filter(|_| is_aligned(offset, buf.len())) {
            if is_memory_aligned(buf) {
                // The server's own buffers: the device fills them in place.
                return blocking(|| direct.read_at(buf, offset)).map_err(|e| BackendError::io("read", offset, e));
            }
            let (direct, len) = (Arc::clone(direct), buf.len());
            let got = tokio::task::spawn_blocking(move || {
                let mut bounce = direct.take(len);
                let read = direct.read_buf(&mut bounce, offset);
                (direct, bounce, read)
            })
            .await;
            return match got {
                Ok((direct, bounce, Ok(()))) => {
                    buf.copy_from_slice(bounce.as_slice());
                    direct.give_back(bounce);
                    Ok(())
                }
                Ok((_, _, Err(e))) => Err(BackendError::io("read", offset, e)),
                Err(join) => Err(BackendError::new(BackendErrorKind::Io, format!("read task failed: {join}"))),
            };
        }
        // Buffered: what the page cache holds is copied on this worker at once (`RWF_NOWAIT`);
        // only what must come from the device waits, off the workers (see the module doc).
        let cached = match self.read_cached(buf, offset) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(BackendError::io("read", offset, e)),
            None => return self.file.read_exact_at(buf, offset).map_err(|e| BackendError::io("read", offset, e)),
        };
        let Some(rest) = buf.get_mut(cached..).filter(|rest| !rest.is_empty()) else {
            return Ok(());
        };
        let at = offset + cached as u64;
        if let Some(ring) = &self.uring {
            return ring.read_exact(&self.file, rest, at).await;
        }
        blocking(|| self.file.read_exact_at(rest, at)).map_err(|e| BackendError::io("read", at, e))
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        if self.read_only {
            return Err(BackendError::new(BackendErrorKind::ReadOnly, "export is read-only"));
        }
        if let Some(ring) = &self.uring {
            // One submission path per file: no write gate (io_uring runs buffered writes to one
            // file one at a time itself).
            ring.write_all(self.descriptor_for(offset, data), data, offset).await?;
            if fua {
                self.sync().await?;
            }
            return Ok(());
        }
        if let Some(direct) = self.direct.as_ref().filter(|_| is_aligned(offset, data.len())) {
            if is_memory_aligned(data) {
                blocking(|| direct.write_at(data, offset)).map_err(|e| BackendError::io("write", offset, e))?;
                if fua {
                    self.sync().await?;
                }
                return Ok(());
            }
            let mut bounce = direct.take(data.len());
            bounce.as_mut_slice().copy_from_slice(data);
            let direct = Arc::clone(direct);
            let written = tokio::task::spawn_blocking(move || {
                let r = direct.write_buf(&bounce, offset);
                direct.give_back(bounce);
                r
            });
            match written.await {
                Ok(r) => r.map_err(|e| BackendError::io("write", offset, e))?,
                Err(join) => return Err(BackendError::new(BackendErrorKind::Io, format!("write task failed: {join}"))),
            }
        } else {
            let _turn = self.write_gate.turn().await;
            self.file.write_all_at(data, offset).map_err(|e| BackendError::io("write", offset, e))?;
        }
        if fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn write_piped(&self, offset: u64, data: &mut PipedData, fua: bool) -> BackendResult<()> {
        if !self.capabilities().piped_writes {
            return super::write_copied(self, offset, data, fua).await;
        }
        {
            let _turn = self.write_gate.turn().await;
            let n = data.len();
            data.write_to_file(&self.file, offset, n).map_err(|e| BackendError::io("write", offset, e))?;
        }
        if fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync().await
    }

    fn file_range(&self, offset: u64, length: u64) -> Option<Vec<FileExtent>> {
        // Only a file in memory: `sendfile` cannot decline to wait for a device the way
        // `RWF_NOWAIT` reads do, and it runs on the connection's writer (see the module doc).
        // Not with `O_DIRECT`, which keeps data out of the page cache `sendfile` reads through.
        let inside = offset.checked_add(length).is_some_and(|end| end <= self.size);
        (self.in_memory && self.direct.is_none() && inside)
            .then(|| vec![FileExtent::File { file: Arc::clone(&self.file), offset, length }])
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        self.known_data.forget();
        match self.fallocate("trim", flags, offset, length).await {
            // Trim is advisory: a filesystem without hole punching simply keeps the data.
            Err(e) if is_unsupported(&e) => return Ok(()),
            other => other?,
        }
        if fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> BackendResult<()> {
        let mode = if flags.no_hole {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        };
        self.known_data.forget();
        match self.fallocate("write zeroes", mode, offset, length).await {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                if flags.fast {
                    return Err(BackendError::new(
                        BackendErrorKind::Unsupported,
                        "zeroing would not be faster than writing",
                    ));
                }
                self.write_zeroes_slowly(offset, length).await?;
            }
            Err(e) => return Err(e),
        }
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        if self.known_data.covers(offset, end) {
            return Ok(vec![Extent { length: end - offset, flags: 0 }]);
        }
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < MAX_EXTENTS_PER_QUERY {
            let data_at = self.seek(SeekFrom::Data(pos as i64))?.unwrap_or(self.size).min(self.size);
            if data_at > pos {
                extents.push(Extent { length: data_at - pos, flags: STATE_HOLE | STATE_ZERO });
                pos = data_at;
                continue;
            }
            let hole_at = self.seek(SeekFrom::Hole(pos as i64))?.unwrap_or(self.size).min(self.size);
            // A filesystem without hole support reports the hole at EOF: all data.
            let data_end = hole_at.max(pos + 1);
            self.known_data.remember(pos, data_end);
            extents.push(Extent { length: data_end - pos, flags: 0 });
            pos = data_end;
        }
        if extents.is_empty() {
            extents.push(Extent { length: length.max(1), flags: 0 });
        }
        Ok(extents)
    }

    async fn cache(&self, offset: u64, length: u64) -> BackendResult<()> {
        rustix::fs::fadvise(&*self.file, offset, length, rustix::fs::Advice::WillNeed)
            .map_err(|e| BackendError::io("cache", offset, e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the first page of `path` is in the page cache: a read that may not wait gets it.
    fn first_page_cached(path: &Path) -> bool {
        let f = File::open(path).unwrap();
        let mut page = [0u8; 4096];
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        matches!(rustix::io::preadv2(&f, &mut [std::io::IoSliceMut::new(&mut page)], 0, flags), Ok(4096))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_are_whole_whether_the_page_cache_holds_all_part_or_none_of_them() {
        // Beside the sources, on a disk: a tmpfs /tmp never evicts, nothing would come from a device.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("cold.raw");
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i / 4096 % 241) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        for uring in [false, true] {
            let file = File::open(&path).unwrap();
            // The advice is taken when the pages are idle: on a busy machine (writeback under
            // way, a page being read) some may stay a moment, so it is given until it held.
            let mut tries = 0;
            loop {
                file.sync_all().unwrap();
                rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::DontNeed).unwrap();
                if !first_page_cached(&path) {
                    break;
                }
                tries += 1;
                assert!(tries < 50, "the file was not dropped from the page cache");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let mut b = FileBackend::open(&path, true).unwrap();
            if uring {
                b = b.with_io_uring().unwrap();
            }
            // Warm one piece, so a later read is part cached, part not.
            let mut warm = vec![0u8; 65536];
            b.read(1 << 20, &mut warm).await.unwrap();
            assert!(warm[..] == data[1 << 20..(1 << 20) + 65536]);
            for (at, len) in [(0usize, 256usize << 10), ((1 << 20) - 4096, 256 << 10), (5 << 20, 3 << 20)] {
                let mut got = vec![0u8; len];
                b.read(at as u64, &mut got).await.unwrap();
                assert!(got[..] == data[at..at + len], "uring={uring}: read of {len} at {at}");
            }
            let mut past = vec![0u8; 8192];
            let err = b.read((8 << 20) - 4096, &mut past).await.unwrap_err();
            assert_eq!(err.source.map(|e| e.kind()), Some(std::io::ErrorKind::UnexpectedEof), "uring={uring}");
        }
    }

    #[tokio::test]
    async fn punched_ranges_read_as_zero_and_show_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let b = FileBackend::create(&path, 4 << 20).unwrap();
        b.write(0, &vec![0xabu8; 2 << 20], false).await.unwrap();
        let ext = b.block_status(0, 4 << 20).await.unwrap();
        assert_eq!(ext.first(), Some(&Extent { length: 2 << 20, flags: 0 }));
        assert_eq!(ext.last().map(|e| e.flags), Some(STATE_HOLE | STATE_ZERO));
        b.trim(1 << 20, 1 << 20, false).await.unwrap();
        let mut back = vec![1u8; 4096];
        b.read(1 << 20, &mut back).await.unwrap();
        assert!(back.iter().all(|&x| x == 0));
        let ext = b.block_status(0, 4 << 20).await.unwrap();
        assert_eq!(
            ext,
            vec![Extent { length: 1 << 20, flags: 0 }, Extent { length: 3 << 20, flags: STATE_HOLE | STATE_ZERO }]
        );
    }

    #[tokio::test]
    async fn the_remembered_data_run_answers_inside_it_and_is_forgotten_by_trim_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(&dir.path().join("d"), 4 << 20).unwrap();
        b.write(0, &vec![7u8; 4 << 20], false).await.unwrap();
        let data = |n| vec![Extent { length: n, flags: 0 }];
        assert_eq!(b.block_status(0, 65536).await.unwrap(), data(4 << 20), "the whole run, found by lseek");
        assert_eq!(b.block_status(1 << 20, 65536).await.unwrap(), data(65536), "inside the run: remembered");
        b.trim(1 << 20, 1 << 20, false).await.unwrap();
        let hole = |n| vec![Extent { length: n, flags: STATE_HOLE | STATE_ZERO }];
        assert_eq!(b.block_status(1 << 20, 65536).await.unwrap(), hole(1 << 20), "a trimmed range is a hole again");
        assert_eq!(b.block_status(0, 65536).await.unwrap(), data(1 << 20));
        b.write_zeroes(0, 65536, ZeroFlags::default()).await.unwrap();
        assert_eq!(b.block_status(0, 65536).await.unwrap(), hole(65536), "punched by write zeroes");
    }

    #[tokio::test]
    async fn write_zeroes_with_no_hole_keeps_the_range_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(&dir.path().join("d"), 1 << 20).unwrap();
        b.write(0, &vec![5u8; 1 << 20], false).await.unwrap();
        b.write_zeroes(0, 1 << 19, ZeroFlags { no_hole: true, ..Default::default() }).await.unwrap();
        let mut back = vec![1u8; 1 << 19];
        b.read(0, &mut back).await.unwrap();
        assert!(back.iter().all(|&x| x == 0));
        assert_eq!(b.block_status(0, 1 << 20).await.unwrap(), vec![Extent { length: 1 << 20, flags: 0 }]);
    }

    #[tokio::test]
    async fn a_read_only_backend_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        FileBackend::create(&path, 4096).unwrap();
        let b = FileBackend::open(&path, true).unwrap();
        assert!(b.capabilities().read_only);
        let e = b.write(0, b"x", false).await.unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::ReadOnly);
    }

    #[test]
    fn only_files_in_memory_offer_their_ranges_for_sendfile() {
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is required");
        let path = shm.path().join("f.raw");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let b = FileBackend::open(&path, true).unwrap();
        assert!(b.file_range(0, 8192).is_some(), "a tmpfs file is sent from the page cache");
        assert!(b.file_range(4096, 8192).is_none(), "never past the end");
        assert!(in_memory(&File::open(&path).unwrap()));
        // /proc is no memory filesystem of files; a file on a device is not either.
        assert!(!in_memory(&File::open("/proc/self/stat").unwrap()));
        let d = FileBackend::open_direct(&path, true);
        if let Ok(d) = d {
            assert!(d.file_range(0, 8192).is_none(), "O_DIRECT keeps data out of the page cache");
        }
    }
}
