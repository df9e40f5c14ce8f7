//! A qcow2 image (with its backing chain) as an export, through the `qcow2` crate.
//!
//! Reads are positional and lock-free in the common case (the crate takes its metadata locks
//! only to look up L2 tables). What memory holds — data in the page cache, cached L2 tables,
//! zero and unallocated ranges, through the backing chain — is read on the calling task
//! (`Image::read_cached`, `RWF_NOWAIT`); the rest, which waits for the device (a cold restore,
//! `direct_io`), runs under `block_in_place`, so a cold repository never holds a worker that
//! other connections need.
//!
//! Block status comes from the image's allocation map resolved through the backing chain: data
//! in any layer is reported allocated, zero clusters and ranges allocated nowhere as holes that
//! read as zeroes, so sparse copies of a chain stay sparse.
//!
//! A read-only image whose files live in memory (tmpfs: a repository there, or a restore staged
//! in RAM) offers its ranges for replies sent straight from the files ([`Backend::file_range`]):
//! `Image::plan_read` places each byte in the image or its backing chain, zero and unallocated
//! ranges included, and the connection's writer sends the data with `sendfile`. Only read-only
//! images: in a writable one a trim could free a cluster and a write reuse it for other guest
//! data between the reply's planning and its sending.
//!
//! Buffered writes enter the kernel one at a time per image (`gate.rs` says why); reads and
//! `O_DIRECT` writes never wait for it.
//!
//! With `--aio=io_uring` ([`Qcow2Backend::with_io_uring`]) the data of a write goes through the
//! image's ring instead, between the crate's `Image::plan_write` (find or allocate the clusters)
//! and `WritePlan::commit` (point the L2 entries at them): no thread is held while the device
//! takes an `O_DIRECT` write, and buffered writes enter the file from the ring's one thread.
//! Writes the crate will not plan (copy-on-write, a new refcount reservation, a cluster another
//! writer is allocating) take the synchronous path below. Reads that the page cache cannot serve
//! go through the ring too, from where `Image::plan_read` says their bytes are (this image or its
//! backing chain); ranges it cannot place without waiting for metadata (an L2 table not in
//! memory) or without the crate's help (compressed clusters) are read as with threads. Zeroing
//! and discards are as with threads.
//!
//! Large writes from TCP clients arrive in a pipe ([`Backend::write_piped`], `piped.rs`): planned
//! like the ring's (`Image::plan_write`), `splice`d from the pipe into the clusters, committed;
//! writes the crate will not plan copy the payload out of the pipe and take `write_at`.
//!
//! Writes, zeroes and discards go to the crate's write path; FLUSH is `fdatasync`. Calls that may
//! wait on the disk (flush, zeroing, discard, FUA, and the writes the crate's
//! `Image::write_may_wait` names: copy-on-write, a new refcount reservation, a cluster another
//! writer is allocating) run under `block_in_place` on a multi-threaded runtime so other
//! connections keep their worker. Plain writes (owned clusters, allocations inside the current
//! reservation: a copy into the page cache) stay on the worker: handing the worker over costs a
//! thread wake-up per request, more than the copy it would move. Zeroing without NO_HOLE uses
//! zero clusters (metadata only); with NO_HOLE it writes real zeroes, since the client asked
//! for allocated storage.

use std::path::Path;
use std::sync::Arc;

use qcow2::{ErrorKind, ExtentKind, Image, ImageOptions, ReadSource};

use super::uring::{IoRing, Uring};
use super::{
    blocking, in_memory, Backend, BackendError, BackendErrorKind, BackendResult, Capabilities, FileExtent, PipedData,
    ZeroFlags,
};
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::transmission::Extent;

/// Most bytes one block status query walks (clients ask again for the rest).
const MAX_STATUS_SPAN: u64 = 4 << 30;

/// A qcow2 image served over NBD.
#[derive(Debug, Clone)]
pub struct Qcow2Backend {
    image: Arc<Image>,
    write_gate: super::gate::WriteGate,
    /// The ring of `--aio=io_uring` (`uring.rs`), shared by clones.
    uring: Option<Arc<Uring>>,
    /// The bitmaps block status was asked for, each found once (a read-only image's bitmaps do
    /// not change under it): the directory is not read again for every request. At most
    /// [`crate::MAX_BITMAPS`] kept (an export offers no more).
    bitmaps: Arc<std::sync::Mutex<Vec<qcow2::Bitmap>>>,
}

fn convert(e: qcow2::Error) -> BackendError {
    let kind = match e.kind() {
        ErrorKind::InvalidInput => BackendErrorKind::InvalidInput,
        ErrorKind::NoSpace => BackendErrorKind::NoSpace,
        ErrorKind::NotPermitted => BackendErrorKind::ReadOnly,
        _ => BackendErrorKind::Io,
    };
    BackendError::new(kind, e.to_string())
}

impl Qcow2Backend {
    /// The image's persistent bitmap `name`, if it can be trusted: one this server would keep
    /// writing into is not (the `qcow2` crate does not maintain bitmaps; a writable open
    /// invalidates them, as the format asks), nor one in use or invalidated.
    ///
    /// # Errors
    /// No such bitmap, or one that cannot be trusted, named in the message.
    pub fn trusted_bitmap(&self, name: &str) -> BackendResult<qcow2::Bitmap> {
        let refuse = |why: String| BackendError::new(BackendErrorKind::InvalidInput, why);
        if self.image.is_writable() {
            return Err(refuse(format!(
                "bitmap {name}: a writable export does not keep bitmaps (export it read-only)"
            )));
        }
        let bitmaps = self.image.bitmaps().map_err(convert)?;
        let Some(bitmap) = bitmaps.into_iter().find(|b| b.name == name) else {
            return Err(refuse(format!("the image has no bitmap named {name}")));
        };
        if !bitmap.consistent() {
            return Err(refuse(format!(
                "bitmap {name} is in use or was invalidated (qemu has the image open for writing, or did not close it)"
            )));
        }
        Ok(bitmap)
    }

    /// Open the image at `path` and its backing chain.
    ///
    /// # Errors
    /// The `qcow2` crate's error: missing file, invalid image, broken chain, or a request to
    /// write an image that cannot be written.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, qcow2::Error> {
        Self::open_with(path, &ImageOptions::default().writable(!read_only))
    }

    /// Open the image at `path` and its backing chain with the crate's options (writable,
    /// `direct_io` for `--cache=none`, a confined chain...).
    ///
    /// # Errors
    /// As [`Qcow2Backend::open`], plus a filesystem that refuses `O_DIRECT`.
    pub fn open_with(path: &Path, options: &ImageOptions) -> Result<Self, qcow2::Error> {
        Ok(Self::from_image(Arc::new(Image::open_with(path, options)?)))
    }

    /// Serve an already open image.
    pub fn from_image(image: Arc<Image>) -> Self {
        Self { image, write_gate: Default::default(), uring: None, bitmaps: Arc::default() }
    }

    /// Send the data of writes, and the reads the page cache cannot serve, through one io_uring
    /// for this image (`--aio=io_uring`; see the module doc), shared by every clone of the backend.
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

    /// Whether data goes through io_uring (`--aio=io_uring`).
    pub fn is_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// A write whose data goes through the ring: the crate prepares the metadata
    /// (`Image::plan_write`), the ring moves the data, the crate commits the L2 entries. Writes
    /// the crate will not plan (they wait anyway: copy-on-write, a refcount reservation, a
    /// cluster another writer is allocating) take the synchronous path off the worker.
    async fn write_through_ring(&self, ring: &Uring, offset: u64, data: &[u8]) -> BackendResult<()> {
        let Some(plan) = self.image.plan_write(offset, data.len() as u64).map_err(convert)? else {
            return blocking(|| self.image.write_at(data, offset)).map_err(convert);
        };
        for piece in plan.pieces() {
            let Some(bytes) = data.get(piece.data.clone()) else {
                return Err(BackendError::new(BackendErrorKind::Io, "internal: planned piece outside the write"));
            };
            if piece.direct && !directio::is_memory_aligned(bytes) {
                // O_DIRECT needs aligned memory: the crate copies it through an aligned buffer.
                blocking(|| plan.write_piece(piece, data)).map_err(convert)?;
            } else {
                ring.write_all(plan.file(piece), bytes, piece.host).await?;
            }
        }
        plan.commit().map_err(convert)
    }

    /// Read `buf` at `offset` through the ring from where the crate says its bytes are
    /// (`Image::plan_read`, through the backing chain). `false` leaves the read to `read_at`:
    /// metadata not in memory yet, a compressed cluster, memory `O_DIRECT` cannot take, a file
    /// that ends early (`read_at` reads zeroes there).
    async fn read_through_ring(&self, ring: &Uring, buf: &mut [u8], offset: u64) -> BackendResult<bool> {
        let Some(pieces) = self.image.plan_read(offset, buf.len() as u64).map_err(convert)? else {
            return Ok(false);
        };
        for piece in &pieces {
            let Some(dst) = buf.get_mut(piece.data.clone()) else { return Ok(false) };
            match piece.source {
                ReadSource::Zero => dst.fill(0),
                ReadSource::File { direct, .. } if direct && !directio::is_memory_aligned(dst) => return Ok(false),
                ReadSource::File { file, host, .. } => match ring.read_exact(file, dst, host).await {
                    Ok(()) => {}
                    Err(e) if e.source.as_ref().is_some_and(|s| s.kind() == std::io::ErrorKind::UnexpectedEof) => {
                        return Ok(false)
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        Ok(true)
    }
}

#[async_trait::async_trait]
impl Backend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        let writable = self.image.is_writable();
        Capabilities {
            read_only: !writable,
            trim: writable,
            write_zeroes: writable,
            // Zeroing marks zero clusters (metadata only): fast, except when holes are forbidden.
            fast_zero: writable,
            block_status: true,
            cache: false,
            writes_wait: self.image.is_direct() || self.uring.is_some(),
            piped_writes: writable && !self.image.is_direct() && self.uring.is_none(),
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        // What memory holds (page cache, cached L2 tables, zeroes) is copied here at once; only
        // the rest, which waits for the device, leaves the worker.
        let cached = self.image.read_cached(buf, offset).map_err(convert)?;
        let Some(rest) = buf.get_mut(cached..).filter(|rest| !rest.is_empty()) else {
            return Ok(());
        };
        let at = offset + cached as u64;
        if let Some(ring) = &self.uring {
            if self.read_through_ring(ring, rest, at).await? {
                return Ok(());
            }
        }
        blocking(|| self.image.read_at(rest, at)).map_err(convert)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        if let Some(ring) = &self.uring {
            // One submission path per image: no write gate.
            self.write_through_ring(ring, offset, data).await?;
        } else if self.image.is_direct() {
            // O_DIRECT writes do not copy into the page cache under the inode lock: no turns,
            // or the device would see one write at a time.
            blocking(|| self.image.write_at(data, offset)).map_err(convert)?;
        } else {
            let _turn = self.write_gate.turn().await;
            if self.image.write_may_wait(offset, data.len() as u64) {
                blocking(|| self.image.write_at(data, offset)).map_err(convert)?;
            } else {
                self.image.write_at(data, offset).map_err(convert)?;
            }
        }
        if fua {
            blocking(|| self.image.flush()).map_err(convert)?;
        }
        Ok(())
    }

    async fn write_piped(&self, offset: u64, data: &mut PipedData, fua: bool) -> BackendResult<()> {
        if !self.capabilities().piped_writes {
            return super::write_copied(self, offset, data, fua).await;
        }
        {
            let _turn = self.write_gate.turn().await;
            match self.image.plan_write(offset, data.len() as u64).map_err(convert)? {
                Some(plan) => {
                    for piece in plan.pieces() {
                        let file = plan.file(piece);
                        data.write_to_file(file, piece.host, piece.data.len())
                            .map_err(|e| BackendError::io("write", piece.host, e))?;
                    }
                    plan.commit().map_err(convert)?;
                }
                None => {
                    // Copy-on-write, a new refcount reservation, a cluster being allocated: the
                    // crate's own path, which may wait, with the bytes out of the pipe.
                    let bytes = data.to_vec().map_err(|e| BackendError::io("write", offset, e))?;
                    blocking(|| self.image.write_at(&bytes, offset)).map_err(convert)?;
                }
            }
        }
        if fua {
            blocking(|| self.image.flush()).map_err(convert)?;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        blocking(|| self.image.flush()).map_err(convert)
    }

    /// The image's own close (unused reserved clusters given back, then `fsync`), so the drop of
    /// the last reference, wherever it happens, has nothing left to wait for.
    async fn close(&self) -> BackendResult<()> {
        blocking(|| self.image.close()).map_err(convert)
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        blocking(|| {
            self.image.discard(offset, length)?;
            if fua {
                self.image.flush()?;
            }
            Ok(())
        })
        .map_err(convert)
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> BackendResult<()> {
        if flags.fast && flags.no_hole {
            // NO_HOLE means writing real zeroes: no faster than a write, so a fast-zero request
            // must fail (ENOTSUP) and leave the choice to the client, as the spec says.
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                "zeroing without holes would not be faster than writing",
            ));
        }
        blocking(|| {
            if flags.no_hole {
                let zeroes = vec![0u8; (1u64 << 20).min(length) as usize];
                let mut pos = offset;
                while pos < offset + length {
                    let n = (offset + length - pos).min(zeroes.len() as u64) as usize;
                    self.image.write_at(zeroes.get(..n).unwrap_or_default(), pos)?;
                    pos += n as u64;
                }
            } else {
                self.image.write_zeroes(offset, length)?;
            }
            if flags.fua {
                self.image.flush()?;
            }
            Ok(())
        })
        .map_err(convert)
    }

    async fn block_status(&self, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        let length = length.min(MAX_STATUS_SPAN).min(self.image.size().saturating_sub(offset));
        let map = self.image.map(offset, length).map_err(convert)?;
        Ok(map
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: match e.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
                },
            })
            .collect())
    }

    async fn bitmap_status(&self, name: &str, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        let length = length.min(MAX_STATUS_SPAN).min(self.image.size().saturating_sub(offset));
        let bitmap = {
            let mut found = self.bitmaps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match found.iter().find(|b| b.name == name) {
                Some(b) => b.clone(),
                None => {
                    let b = self.trusted_bitmap(name)?;
                    if found.len() >= crate::MAX_BITMAPS {
                        found.clear();
                    }
                    found.push(b.clone());
                    b
                }
            }
        };
        let runs = self.image.bitmap_runs(&bitmap, offset, length).map_err(convert)?;
        Ok(runs.into_iter().map(|(length, dirty)| Extent { length, flags: u32::from(dirty) }).collect())
    }

    fn file_range(&self, offset: u64, length: u64) -> Option<Vec<FileExtent>> {
        // Read-only and buffered only (see the module doc); `None` sends the reply the usual way.
        if self.image.is_writable() || self.image.is_direct() {
            return None;
        }
        let pieces = self.image.plan_read(offset, length).ok()??;
        let mut extents = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let length = (piece.data.end - piece.data.start) as u64;
            match piece.source {
                ReadSource::Zero => extents.push(FileExtent::Zero { length }),
                ReadSource::File { file, host, direct } => {
                    if direct || !in_memory(file) {
                        return None;
                    }
                    // Clusters past the end of a (truncated) file read as zeroes, as the
                    // crate's own reads give them.
                    let inside = file.metadata().ok()?.len().saturating_sub(host).min(length);
                    if inside > 0 {
                        extents.push(FileExtent::File { file: Arc::clone(file), offset: host, length: inside });
                    }
                    if inside < length {
                        extents.push(FileExtent::Zero { length: length - inside });
                    }
                }
            }
        }
        Some(extents)
    }
}
