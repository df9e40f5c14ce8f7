//! What an export is made of: the [`Backend`] trait and the backends this crate ships.
//!
//! The server owns the protocol; a backend only answers byte-range operations. Required are
//! size, read, write and flush; trim, write-zeroes, block status and cache default to
//! [`BackendErrorKind::Unsupported`], and [`Backend::capabilities`] says which ones a backend
//! really has, so the server can derive the transmission flags and never advertise a command it
//! would then refuse. One backend object is shared by every connection of an export: that is
//! what makes `NBD_FLAG_CAN_MULTI_CONN` honest, since a FLUSH on any connection reaches the
//! same file.

mod file;
mod gate;
mod memory;
mod piped;
mod qcow2_image;
mod tuned;
mod uring;

pub use file::FileBackend;
pub use memory::MemoryBackend;
pub(crate) use piped::PipePool;
pub use piped::PipedData;
pub use qcow2_image::Qcow2Backend;
pub use tuned::{Tuned, Tuning};
pub use uring::IoRing;

use std::sync::Arc;

use crate::proto::transmission::Extent;

/// Run `f`, which may wait for the device, on this thread, letting the runtime move its other
/// tasks off this worker meanwhile (`block_in_place`; plainly on a current-thread runtime).
/// Unlike `spawn_blocking` it can borrow the caller's buffer, so `O_DIRECT` needs no copy.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// What a backend can do beyond read/write/flush.
///
/// A backend builds its own with `Capabilities::default()` (nothing but reads and writes) and
/// the setters, e.g. `Capabilities::default().trim(true).block_status(true)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Writes are refused (the export is advertised read-only).
    pub read_only: bool,
    /// `trim` punches holes.
    pub trim: bool,
    /// `write_zeroes` works.
    pub write_zeroes: bool,
    /// `write_zeroes` without NO_HOLE is cheaper than writing zeroes (fast zero).
    pub fast_zero: bool,
    /// `block_status` reports real allocation.
    pub block_status: bool,
    /// `cache` prefetches.
    pub cache: bool,
    /// Writes wait for the device (`O_DIRECT`): the server runs each in its own task, so one
    /// connection keeps several in flight, instead of applying it on the connection's reader.
    pub writes_wait: bool,
    /// Large writes are best handed over in a pipe ([`Backend::write_piped`]): the backend
    /// `splice`s them into a file, one copy fewer than through a buffer.
    pub piped_writes: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZeroFlags {
    /// The range must stay allocated (no hole).
    pub no_hole: bool,
    /// Fail with `Unsupported` unless it is faster than writing zeroes.
    pub fast: bool,
    /// Durable before returning.
    pub fua: bool,
}

impl Capabilities {
    setters::setters! {
        read_only: bool,
        trim: bool,
        write_zeroes: bool,
        fast_zero: bool,
        block_status: bool,
        cache: bool,
        writes_wait: bool,
        piped_writes: bool,
    }
}

impl ZeroFlags {
    setters::setters! {
        no_hole: bool,
        fast: bool,
        fua: bool,
    }
}

/// Broad class of a backend failure, mapped one-to-one onto NBD error values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The operation is not available (`NBD_ENOTSUP` / `NBD_EINVAL`).
    Unsupported,
    /// Bad offset/length or arguments (`NBD_EINVAL`).
    InvalidInput,
    /// The backing store is full (`NBD_ENOSPC`).
    NoSpace,
    /// The backend refuses writes (`NBD_EPERM`).
    ReadOnly,
    /// Anything else (`NBD_EIO`).
    Io,
}

/// A failed backend operation: a kind the server maps to an NBD error, and a message for logs
/// and for the client's structured error chunk.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The class of failure.
    pub kind: BackendErrorKind,
    /// What failed, for humans.
    pub message: String,
    /// The underlying cause, if any.
    #[source]
    pub source: Option<std::io::Error>,
}

impl BackendError {
    /// A failure of `kind` with a message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// The default for optional operations.
    pub fn unsupported(op: &str) -> Self {
        Self::new(BackendErrorKind::Unsupported, format!("{op} is not supported by this export"))
    }

    /// Wrap an I/O error from `op`, classifying ENOSPC/EDQUOT/EFBIG as no-space.
    pub fn io(op: &str, offset: u64, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() => BackendErrorKind::NoSpace,
            Some(code) if code == rustix::io::Errno::DQUOT.raw_os_error() => BackendErrorKind::NoSpace,
            Some(code) if code == rustix::io::Errno::FBIG.raw_os_error() => BackendErrorKind::NoSpace,
            Some(code) if code == rustix::io::Errno::ROFS.raw_os_error() => BackendErrorKind::ReadOnly,
            _ => match err.kind() {
                std::io::ErrorKind::Unsupported => BackendErrorKind::Unsupported,
                std::io::ErrorKind::InvalidInput => BackendErrorKind::InvalidInput,
                _ => BackendErrorKind::Io,
            },
        };
        Self { kind, message: format!("{op} at {offset:#x}: {err}"), source: Some(err) }
    }
}

/// Result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;

/// The storage behind an export. Implementations must be safe to call from many connections at
/// once; the server has already checked every range against [`Backend::size`].
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Size of the export in bytes. Constant for the export's lifetime.
    fn size(&self) -> u64;

    /// What this backend supports beyond read/write/flush.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Fill `buf` from `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()>;

    /// Write `data` at `offset`; with `fua`, durable before returning.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()>;

    /// Write the payload held in `data` (all of it) at `offset`; with `fua`, durable before
    /// returning. The server hands large writes over this way, straight from a TCP socket, when
    /// [`Capabilities::piped_writes`] says so. The default copies the payload out and calls
    /// [`Backend::write`].
    async fn write_piped(&self, offset: u64, data: &mut PipedData, fua: bool) -> BackendResult<()> {
        write_copied(self, offset, data, fua).await
    }

    /// Make every completed write durable.
    async fn flush(&self) -> BackendResult<()>;

    /// The export is withdrawn (or the server stops) and its last connection is gone: make every
    /// completed write durable and give back what the storage should not keep (a qcow2 image
    /// returns the clusters it reserved and never used). Waits for the device off the runtime's
    /// workers, like every call here. The default is [`Backend::flush`].
    async fn close(&self) -> BackendResult<()> {
        self.flush().await
    }

    /// Discard a range (it may read back as anything until rewritten; ours read zeroes).
    async fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> BackendResult<()> {
        Err(BackendError::unsupported("trim"))
    }

    /// Make a range read as zeroes.
    async fn write_zeroes(&self, _offset: u64, _length: u64, _flags: ZeroFlags) -> BackendResult<()> {
        Err(BackendError::unsupported("write zeroes"))
    }

    /// Allocation of the range starting at `offset`: consecutive extents from `offset`, at least
    /// one, in `base:allocation` flags. May cover less (or, in the last extent, more) than asked.
    async fn block_status(&self, _offset: u64, _length: u64) -> BackendResult<Vec<Extent>> {
        Err(BackendError::unsupported("block status"))
    }

    /// The dirty bitmap `name` over the range starting at `offset`: consecutive extents from
    /// `offset`, at least one, flag 1 where dirty (`qemu:dirty-bitmap:NAME`). Only for a bitmap
    /// the backend can vouch for; the export offers it when configured with
    /// [`crate::ExportConfig::bitmaps`].
    async fn bitmap_status(&self, _name: &str, _offset: u64, _length: u64) -> BackendResult<Vec<Extent>> {
        Err(BackendError::unsupported("dirty bitmaps"))
    }

    /// Prefetch a range.
    async fn cache(&self, _offset: u64, _length: u64) -> BackendResult<()> {
        Err(BackendError::unsupported("cache"))
    }

    /// Where the bytes of `[offset, offset + length)` lie, in order, when all of them are in
    /// files in memory or read as zeroes: the server may then send that range to a TCP client
    /// straight from the files (`sendfile`), with no copy through its own memory. The extents
    /// cover exactly `length` bytes. `None` (the default) reads through [`Backend::read`].
    ///
    /// Only for bytes whose place cannot change before the reply leaves: the server reads them
    /// when it sends, after the request is answered in its own order. A raw file qualifies (the
    /// export's offsets are the file's); a writable qcow2 image does not, since a concurrent
    /// trim can free a cluster and a write reuse it for other guest data.
    fn file_range(&self, _offset: u64, _length: u64) -> Option<Vec<FileExtent>> {
        None
    }
}

/// A piped payload copied out and written with [`Backend::write`]: the trait's default, and what
/// backends that splice do when their current mode cannot (`O_DIRECT`, io_uring, read-only).
async fn write_copied<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    data: &mut PipedData,
    fua: bool,
) -> BackendResult<()> {
    let bytes = data.to_vec().map_err(|e| BackendError::io("write", offset, e))?;
    backend.write(offset, &bytes, fua).await
}

/// A part of an export's range as [`Backend::file_range`] places it.
#[derive(Debug, Clone)]
pub enum FileExtent {
    /// `length` bytes of `file` from `offset` on, all inside the file (a file found shorter
    /// when the reply is sent cuts the connection).
    File {
        /// The file, shared so the reply can outlive the request.
        file: Arc<std::fs::File>,
        /// Where the bytes start in it.
        offset: u64,
        /// How many.
        length: u64,
    },
    /// `length` bytes that read as zeroes.
    Zero {
        /// How many.
        length: u64,
    },
}

impl FileExtent {
    /// Bytes of the export this extent covers.
    pub fn length(&self) -> u64 {
        match self {
            Self::File { length, .. } | Self::Zero { length } => *length,
        }
    }
}

/// `statfs` magic numbers of filesystems that keep files in memory (tmpfs, ramfs).
const MEMORY_FILESYSTEMS: [i64; 2] = [0x0102_1994, 0x8584_58f6];

/// Whether `file` lives on a filesystem with no device behind it, so reading it never waits:
/// the test for sending it with `sendfile` from the connection's writer ([`Backend::file_range`]).
#[allow(clippy::unnecessary_cast)] // `f_type` is i64 here, narrower on other architectures
pub(crate) fn in_memory(file: &std::fs::File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|st| MEMORY_FILESYSTEMS.contains(&(st.f_type as i64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_for_the_nbd_error_they_become() {
        let e =
            BackendError::io("write", 0, std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()));
        assert_eq!(e.kind, BackendErrorKind::NoSpace);
        let e =
            BackendError::io("write", 0x10, std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()));
        assert_eq!(e.kind, BackendErrorKind::Io);
        assert!(e.message.contains("0x10"));
    }
}
