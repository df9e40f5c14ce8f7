//! Where a disk's bytes go: the hub's NBD export (backups, replicas) or a local file or block
//! device (restores).
//!
//! Zeroes are never sent as data: an NBD target gets `WRITE_ZEROES` (metadata only in a qcow2
//! image) when it offers it, a file gets a punched hole, a block device gets zero buffers.
//!
//! A regular file is written beside its destination and takes its place only when whole
//! ([`crate::files::Replacement`], [`FileSink::commit`]); a block device is written in place. A
//! disk held in a qcow2 image is restored as one (`sink/image.rs`).
//!
//! A file's writes take turns (`FileSink::turn`): buffered writes into one file serialise on its
//! inode lock anyway, and the workers' blocking threads arriving together spun on it
//! (`rwsem_spin_on_owner` in a restore's profile); waiting for the turn in user space costs
//! nothing the kernel did not already impose (the NBD server's `gate` does the same). Restores
//! of 1 GiB on tmpfs, alternating with the binary without it: over direct TCP 1.02-1.05x the
//! throughput at 0.95x the CPU, through the tunnel the same throughput at 0.97x.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nbd_server::proto::consts::transmission_flags;
use nbd_server::CommandFlags;

use crate::blocks::{self, Blocks};
use crate::error::MoveError;
use crate::files::Replacement;
use crate::pool::NbdPool;

mod image;

pub use image::Qcow2Sink;

/// One write's payload: its only piece as it is (a plain connection's read, a worker's buffer),
/// or, when it came in several (read through the tunnel, written to an NBD target), joined.
fn one_payload(mut pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut joined = bytes::BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in &pieces {
        joined.extend_from_slice(piece);
    }
    joined.freeze()
}

/// Largest zero buffer written to a device that cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;

/// An open destination.
pub enum Sink {
    /// An NBD export (several connections).
    Nbd(NbdPool),
    /// A local file or block device.
    File(FileSink),
    /// A local qcow2 image.
    Qcow2(Qcow2Sink),
}

/// A local destination.
pub struct FileSink {
    file: Arc<File>,
    /// One write in the kernel at a time (module doc).
    turn: tokio::sync::Mutex<()>,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// For a regular file: the new file beside the destination, renamed over it by
    /// [`FileSink::commit`] (removed if that never happens).
    replacement: Option<Arc<Replacement>>,
}

impl FileSink {
    /// Open `path` to receive a disk of `size` bytes. For a regular file a new one is made
    /// beside it and sized, so it starts all zeroes and holes stay holes (it takes `path`'s place
    /// at [`Self::commit`]); a block device must be large enough. Returns the sink and whether it
    /// starts out zeroed.
    ///
    /// # Errors
    /// It cannot be opened, sized, or is too small.
    pub fn create(path: &Path, size: u64) -> Result<(Self, bool), MoveError> {
        let err = |what: &str, source| MoveError::Destination { what: format!("{}: {what}", path.display()), source };
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let (file, replacement) = if is_block {
            (OpenOptions::new().write(true).open(path).map_err(|e| err("open", e))?, None)
        } else {
            // A new file is the owner's alone (it holds a whole disk); a replaced one's mode and
            // owner carry over.
            let (r, f) = Replacement::begin(path).map_err(|e| err("create the file to replace it", e))?;
            f.set_len(size).map_err(|e| err("set size", e))?;
            (f, Some(Arc::new(r)))
        };
        if is_block {
            let dev_size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(|e| err("size", e.into()))?;
            if dev_size < size {
                return Err(MoveError::Mismatch(format!(
                    "{} holds {dev_size} bytes; the disk needs {size}",
                    path.display()
                )));
            }
        }
        Ok((
            Self {
                file: Arc::new(file),
                turn: tokio::sync::Mutex::new(()),
                path: path.to_path_buf(),
                size,
                block_device: is_block,
                replacement,
            },
            !is_block,
        ))
    }

    /// Go on with a restore a stopping node paused (`jobs/handover.rs`): the file it left beside
    /// `path` (which must be there, a regular file of `size` bytes), or a block device in place.
    ///
    /// # Errors
    /// The file beside is missing, not a regular file, or of another size.
    pub fn resume(path: &Path, size: u64) -> Result<Self, MoveError> {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
            return Self::create(path, size).map(|(sink, _)| sink);
        }
        let err = |what: &str, source| MoveError::Destination { what: format!("{}: {what}", path.display()), source };
        let r = Replacement::resume(path).map_err(|e| err("the file a paused restore left beside it", e))?;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(r.path())
            .map_err(|e| err("open the file a paused restore left", e))?;
        let len = file.metadata().map_err(|e| err("size", e))?.len();
        if len != size {
            return Err(MoveError::Mismatch(format!(
                "{} holds {len} bytes; the paused restore wrote a disk of {size}",
                r.path().display()
            )));
        }
        Ok(Self {
            file: Arc::new(file),
            turn: tokio::sync::Mutex::new(()),
            path: path.to_path_buf(),
            size,
            block_device: false,
            replacement: Some(Arc::new(r)),
        })
    }

    /// Put the restored disk in its destination's place (a regular file; a device was written
    /// in place and has nothing to do). Until this, the destination is as it was.
    ///
    /// # Errors
    /// The sync or the rename failed.
    pub async fn commit(&self) -> Result<(), MoveError> {
        let Some(r) = &self.replacement else { return Ok(()) };
        let what = format!("{}: put in place", self.path.display());
        let file = Arc::clone(&self.file);
        let r = Arc::clone(r);
        tokio::task::spawn_blocking(move || r.commit(&file))
            .await
            .map_err(|e| MoveError::Destination { what: what.clone(), source: e.into() })?
            .map_err(|source| MoveError::Destination { what, source })
    }
}

impl Sink {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::Nbd(p) => p.info().size,
            Self::File(f) => f.size,
            Self::Qcow2(q) => q.size(),
        }
    }

    /// Write bytes `range` of `data` at `offset` (worker `worker` picks the connection), as
    /// slices of its pieces: a file's blocking write and a tunnel channel take them without a
    /// copy (`blocks`).
    ///
    /// # Errors
    /// The target failed the write, stayed unreachable, or `range` is not inside `data`.
    pub async fn write(
        &self,
        worker: usize,
        offset: u64,
        data: &Blocks,
        range: std::ops::Range<usize>,
    ) -> Result<(), MoveError> {
        let outside = || MoveError::Mismatch(format!("write of bytes {range:?} of {} bytes", data.len()));
        match self {
            Self::Nbd(pool) => {
                // In requests the server accepts (its maximum payload).
                let max = pool.info().max_payload.max(4096) as usize;
                let mut from = range.start;
                while from < range.end {
                    let to = range.end.min(from + max);
                    let payload = one_payload(data.slice(from..to).ok_or_else(outside)?);
                    let at = offset + (from - range.start) as u64;
                    pool.run(worker, "write", at, |c| {
                        let payload = payload.clone();
                        async move { c.write_bytes(at, payload, CommandFlags::default()).await }
                    })
                    .await?;
                    from = to;
                }
                Ok(())
            }
            Self::File(f) => {
                let pieces = data.slice(range.clone()).ok_or_else(outside)?;
                let file = Arc::clone(&f.file);
                let what = || format!("{}: write at {offset:#x}", f.path.display());
                let _turn = f.turn.lock().await;
                tokio::task::spawn_blocking(move || blocks::write_all_at(&*file, &pieces, offset))
                    .await
                    .map_err(|e| MoveError::Destination { what: what(), source: e.into() })?
                    .map_err(|source| MoveError::Destination { what: what(), source })
            }
            Self::Qcow2(q) => q.write(offset, one_payload(data.slice(range.clone()).ok_or_else(outside)?)).await,
        }
    }

    /// Make `length` bytes at `offset` read as zeroes without sending them.
    ///
    /// # Errors
    /// The target failed or stayed unreachable.
    pub async fn write_zeroes(&self, worker: usize, offset: u64, length: u64) -> Result<(), MoveError> {
        match self {
            Self::Nbd(pool) if pool.info().flags & transmission_flags::SEND_WRITE_ZEROES != 0 => {
                let max = 1u64 << 30;
                let mut at = offset;
                let end = offset + length;
                while at < end {
                    let n = (end - at).min(max);
                    pool.run(worker, "write zeroes", at, |c| async move { c.write_zeroes(at, n, false).await }).await?;
                    at += n;
                }
                Ok(())
            }
            Self::Nbd(pool) => {
                let zeros = vec![0u8; ZERO_CHUNK.min(pool.info().max_payload as usize)];
                let mut at = offset;
                let end = offset + length;
                while at < end {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    let chunk = zeros.get(..n).unwrap_or_default();
                    pool.run(worker, "write", at, |c| async move { c.write(at, chunk, false).await }).await?;
                    at += n as u64;
                }
                Ok(())
            }
            Self::File(f) => {
                let file = Arc::clone(&f.file);
                let block = f.block_device;
                let what = || format!("{}: zero at {offset:#x}", f.path.display());
                tokio::task::spawn_blocking(move || zero_file_range(&file, block, offset, length))
                    .await
                    .map_err(|e| MoveError::Destination { what: what(), source: e.into() })?
                    .map_err(|source| MoveError::Destination { what: what(), source })
            }
            Self::Qcow2(q) => q.write_zeroes(offset, length).await,
        }
    }

    /// Make everything written durable.
    ///
    /// # Errors
    /// The flush failed.
    pub async fn flush(&self) -> Result<(), MoveError> {
        match self {
            Self::Nbd(pool) => pool.run(0, "flush", 0, |c| async move { c.flush().await }).await,
            Self::File(f) => {
                let file = Arc::clone(&f.file);
                let what = format!("{}: fsync", f.path.display());
                tokio::task::spawn_blocking(move || file.sync_all())
                    .await
                    .map_err(|e| MoveError::Destination { what: what.clone(), source: e.into() })?
                    .map_err(|source| MoveError::Destination { what, source })
            }
            Self::Qcow2(q) => q.flush().await,
        }
    }

    /// Put a restored disk in its destination's place (nothing to do for an NBD target or a
    /// block device). Until this, a file destination is as it was.
    ///
    /// # Errors
    /// Closing, syncing or the rename failed.
    pub async fn commit(&self) -> Result<(), MoveError> {
        match self {
            Self::Nbd(_) => Ok(()),
            Self::File(f) => f.commit().await,
            Self::Qcow2(q) => q.commit().await,
        }
    }

    /// A paused restore's target left for the next start (`jobs/handover.rs`): the file beside
    /// its destination kept, a qcow2 image closed clean. The copy flushed it already.
    ///
    /// # Errors
    /// The image could not be closed.
    pub async fn keep(&self) -> Result<(), MoveError> {
        match self {
            Self::Nbd(_) => Ok(()),
            Self::File(f) => {
                if let Some(r) = &f.replacement {
                    r.keep();
                }
                Ok(())
            }
            Self::Qcow2(q) => q.keep().await,
        }
    }

    /// Close the connections (NBD) politely.
    pub async fn close(&self) {
        if let Self::Nbd(pool) = self {
            pool.close().await;
        }
    }

    /// Connections re-made during the copy.
    pub fn reconnects(&self) -> u64 {
        match self {
            Self::Nbd(pool) => pool.reconnects(),
            Self::File(_) | Self::Qcow2(_) => 0,
        }
    }
}

fn zero_file_range(file: &File, block_device: bool, offset: u64, length: u64) -> std::io::Result<()> {
    if !block_device {
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(file, flags, offset, length).is_ok() {
            return Ok(());
        }
    }
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = offset;
    let end = offset + length;
    while at < end {
        let n = (end - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(zeros.get(..n).unwrap_or_default(), at)?;
        at += n as u64;
    }
    Ok(())
}
