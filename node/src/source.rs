//! Where a disk's bytes come from: a raw file or block device, or an NBD server (qemu-nbd,
//! qemu's built-in server, nbdkit in front of a hypervisor disk).
//!
//! A source answers three questions for the mover: its size, which ranges are allocated
//! (`SEEK_DATA`/`SEEK_HOLE` on files, `base:allocation` on NBD; ranges known to read as zeroes
//! count as holes), and, for an NBD source exporting a dirty bitmap, which ranges changed since
//! the bitmap was started. Reads of files run on the blocking pool with the caller's buffer
//! moved in and out, so the async workers never wait on the disk; reads of NBD exports come
//! back as the pieces the connection received ([`Blocks`]). A file or device may hold a qcow2
//! image (the format stated by the operator); it is then read as the disk it holds
//! (`source/image.rs`, which also refuses an image whose format was not stated).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::SeekFrom;
use tokio_util::sync::CancellationToken;

use crate::api::{DiskFormat, SourceKind};
use crate::blockmap::Hash;
use crate::blocks::Blocks;
use crate::error::MoveError;
use crate::pool::{Endpoint, NbdPool};
use crate::targets;

mod image;
mod stamp;

pub use image::{sniff, Qcow2Source};
pub use stamp::SourceStamp;

/// How a source was configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A file or a block device.
    Path {
        /// Its path.
        path: PathBuf,
        /// How it holds the disk; `None`: as raw bytes, unless it starts like a disk image,
        /// which is then refused (see `source/image.rs`).
        format: Option<DiskFormat>,
        /// A persistent bitmap of a qcow2 image to read changes from.
        dirty_bitmap: Option<String>,
    },
    /// `nbd://HOST:PORT/EXPORT`, or over TLS
    /// `nbds://HOST:PORT/EXPORT?tls-certificates=DIR[&tls-hostname=NAME]` (libnbd's names; a
    /// hypervisor's NBD server with TLS, such as libvirt's backup exports), with an optional
    /// dirty bitmap to read changes from.
    Nbd {
        /// The URL as given.
        url: String,
        /// Bitmap name (`qemu:dirty-bitmap:NAME`).
        dirty_bitmap: Option<String>,
        /// For `nbds://`: where its credentials are, and the name its certificate carries.
        tls: Option<NbdTls>,
    },
}

/// What an `nbds://` source says about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTls {
    /// `tls-certificates=DIR`: `ca-cert.pem`, and `client-cert.pem` with `client-key.pem` if the
    /// server asks for a client certificate (`nbd_server::ClientTls::from_x509_dir`).
    pub certificates: PathBuf,
    /// `tls-hostname=NAME`, where the certificate is not for the URL's host.
    pub hostname: Option<String>,
}

impl NbdTls {
    /// An `nbds://` source's plain URL and its TLS settings; `None` for any other text. libnbd
    /// would fall back to default directories without `tls-certificates`; a node reading a VM's
    /// disk names them, so it is required.
    fn parse(text: &str) -> Option<Result<(String, Self), String>> {
        let rest = text.strip_prefix("nbds://")?;
        let (place, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut certificates, mut hostname) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tls-certificates", d)) if certificates.is_none() && !d.is_empty() => {
                    certificates = Some(PathBuf::from(d));
                }
                Some(("tls-hostname", h)) if hostname.is_none() && !h.is_empty() => hostname = Some(h.to_string()),
                _ => return Some(Err(format!("source '{text}': unsupported query parameter '{pair}'"))),
            }
        }
        Some(match certificates {
            Some(certificates) => Ok((format!("nbd://{place}"), Self { certificates, hostname })),
            None => Err(format!("source '{text}': an nbds:// source needs ?tls-certificates=DIR")),
        })
    }

    /// The client's credentials.
    fn credentials(&self) -> Result<nbd_server::ClientTls, MoveError> {
        let creds = nbd_server::ClientTls::from_x509_dir(&self.certificates)
            .map_err(|e| MoveError::Mismatch(format!("TLS credentials of an nbds:// source: {e}")))?;
        Ok(match &self.hostname {
            Some(name) => creds.hostname(name.clone()),
            None => creds,
        })
    }
}

impl SourceSpec {
    /// `nbd://...` is an NBD source; anything else is a path, holding the disk in `format`.
    pub fn parse(text: &str, format: Option<DiskFormat>, dirty_bitmap: Option<String>) -> Result<Self, String> {
        let tls = NbdTls::parse(text).transpose()?;
        if text.starts_with("nbd://") || tls.is_some() {
            let plain = tls.as_ref().map_or(text, |(plain, _)| plain.as_str());
            targets::parse_url(0, plain).map_err(|e| format!("source '{text}': {e}"))?;
            if let Some(f) = format {
                return Err(format!(
                    "source '{text}': format \"{}\" is for a file or block device; an NBD server exports the disk itself",
                    f.name()
                ));
            }
            Ok(Self::Nbd { url: text.to_string(), dirty_bitmap, tls: tls.map(|(_, t)| t) })
        } else if text.is_empty() {
            Err("empty source".into())
        } else if dirty_bitmap.is_some() && format != Some(DiskFormat::Qcow2) {
            Err(format!("source '{text}': a dirty bitmap needs an nbd:// source or format = \"qcow2\""))
        } else {
            Ok(Self::Path { path: PathBuf::from(text), format, dirty_bitmap })
        }
    }

    /// The kind, without touching the source.
    pub fn kind_hint(&self) -> SourceKind {
        match self {
            Self::Nbd { .. } => SourceKind::Nbd,
            Self::Path { path, .. } if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) => {
                SourceKind::Block
            }
            Self::Path { .. } => SourceKind::File,
        }
    }

    /// How the source holds the disk (raw unless stated otherwise).
    pub fn format(&self) -> DiskFormat {
        match self {
            Self::Path { format: Some(f), .. } => *f,
            _ => DiskFormat::Raw,
        }
    }

    /// The file or device, for a path source.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Path { path, .. } => Some(path),
            Self::Nbd { .. } => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(s) => write!(f, "{}", s.path.display()),
            Self::Qcow2(q) => write!(f, "{}", q.path().display()),
            Self::Nbd(n) => write!(f, "{}", n.pool.endpoint()),
        }
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path { path, format: Some(DiskFormat::Qcow2), .. } => write!(f, "qcow2:{}", path.display()),
            Self::Path { path, .. } => write!(f, "{}", path.display()),
            Self::Nbd { url, .. } => f.write_str(url),
        }
    }
}

/// A range of the source and whether it holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Length in bytes.
    pub length: u64,
    /// True if it may hold data; false if it reads as zeroes.
    pub data: bool,
}

/// An open source.
pub enum Source {
    /// A file or block device holding the disk as raw bytes.
    File(FileSource),
    /// A file or block device holding a qcow2 image.
    Qcow2(Qcow2Source),
    /// An NBD export.
    Nbd(NbdSource),
}

/// A raw file or block device.
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    sparse: bool,
}

/// An NBD export read with several connections.
pub struct NbdSource {
    pool: NbdPool,
    bitmap: Option<String>,
}

impl Source {
    /// Open a source.
    ///
    /// # Errors
    /// The file cannot be opened, or the NBD server cannot be reached or lacks the bitmap.
    pub async fn open(spec: &SourceSpec, connections: usize, cancel: CancellationToken) -> Result<Self, MoveError> {
        match spec {
            SourceSpec::Path { path, format: Some(DiskFormat::Qcow2), dirty_bitmap } => {
                let (p, bitmap) = (path.clone(), dirty_bitmap.clone());
                Ok(Self::Qcow2(blocking(path, move || Qcow2Source::open(&p, bitmap.as_deref())).await?))
            }
            SourceSpec::Path { path, format, .. } => {
                let (p, stated) = (path.clone(), format.is_some());
                Ok(Self::File(blocking(path, move || FileSource::open(&p, stated)).await?))
            }
            SourceSpec::Nbd { url, dirty_bitmap, tls } => {
                let plain = match tls {
                    Some(_) => NbdTls::parse(url).and_then(Result::ok).map(|(plain, _)| plain),
                    None => Some(url.clone()),
                };
                let t = plain
                    .as_deref()
                    .ok_or("not an nbds:// URL")
                    .and_then(|p| targets::parse_url(0, p))
                    .map_err(|e| MoveError::Mismatch(format!("source {url}: {e}")))?;
                let tls = tls.as_ref().map(NbdTls::credentials).transpose()?;
                let endpoint = Endpoint {
                    host: t.host,
                    port: t.port,
                    export: t.export,
                    meta_contexts: Vec::new(),
                    via: None,
                    tls,
                };
                Self::open_nbd(endpoint, dirty_bitmap.clone(), connections, Duration::from_secs(60), cancel).await
            }
        }
    }

    /// Open an NBD export as a source, optionally with a dirty bitmap (refused if the server
    /// does not export it: an incremental must never silently become "nothing changed").
    ///
    /// # Errors
    /// The server cannot be reached, or lacks the bitmap.
    pub async fn open_nbd(
        mut endpoint: Endpoint,
        bitmap: Option<String>,
        connections: usize,
        retry_window: Duration,
        cancel: CancellationToken,
    ) -> Result<Self, MoveError> {
        let context = bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
        endpoint.meta_contexts.extend(context.clone());
        let shown = endpoint.to_string();
        let pool = NbdPool::connect(endpoint, connections, retry_window, cancel).await.map_err(|e| match e {
            MoveError::Unreachable { source, .. } => MoveError::SourceNbd { what: format!("{shown}: connect"), source },
            other => other,
        })?;
        if let Some(context) = context {
            let granted = pool.run(0, "meta context", 0, |c| {
                let context = context.clone();
                async move { Ok(c.has_meta_context(&context)) }
            });
            if !granted.await? {
                return Err(MoveError::Mismatch(format!("{shown} does not export the dirty bitmap {context}")));
            }
        }
        Ok(Self::Nbd(NbdSource { pool, bitmap }))
    }

    /// Refuse a file or device another process holds open for writing, as a running VM's qemu
    /// does (`source/inuse.rs`). Where the locks cannot be read, the copy goes on with a warning.
    ///
    /// # Errors
    /// A writer holds it.
    pub async fn refuse_if_being_written(&self) -> Result<(), MoveError> {
        let path = match self {
            Self::File(f) => f.path.clone(),
            Self::Qcow2(q) => q.path().to_path_buf(),
            Self::Nbd(_) => return Ok(()),
        };
        let p = path.clone();
        match tokio::task::spawn_blocking(move || crate::inuse::held_for_writing(&p)).await {
            Ok(Ok(false)) => Ok(()),
            Ok(Ok(true)) => Err(MoveError::Mismatch(format!(
                "source {} is open for writing by another process (it holds qemu's write lock, as a running \
                 VM does): a copy now would read a disk changing under it. Back up a snapshot (pre_snapshot), \
                 or set force_share = true on the VM if its pre_snapshot pauses it",
                path.display()
            ))),
            Ok(Err(e)) => {
                tracing::warn!(source = %path.display(), error = %e, "cannot tell whether a VM writes this source");
                Ok(())
            }
            Err(e) => Err(MoveError::Source { what: format!("{}: locks", path.display()), source: e.into() }),
        }
    }

    /// Why the changes are not read from the dirty bitmap configured for this source, if they
    /// are not (a qcow2 bitmap in use or invalidated: every block is read and compared instead).
    pub fn bitmap_note(&self) -> Option<&str> {
        match self {
            Self::Qcow2(q) => q.bitmap_note(),
            _ => None,
        }
    }

    /// Close NBD connections politely.
    pub async fn close(&self) {
        if let Self::Nbd(n) = self {
            n.pool.close().await;
        }
    }

    /// Connections re-made during the copy.
    pub fn reconnects(&self) -> u64 {
        match self {
            Self::File(_) | Self::Qcow2(_) => 0,
            Self::Nbd(n) => n.pool.reconnects(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::File(f) => f.size,
            Self::Qcow2(q) => q.size(),
            Self::Nbd(n) => n.pool.info().size,
        }
    }

    /// Whether this source can say which blocks changed (a dirty bitmap was granted).
    pub fn has_dirty_bitmap(&self) -> bool {
        match self {
            Self::File(_) => false,
            Self::Qcow2(q) => q.has_dirty_bitmap(),
            Self::Nbd(n) => n.bitmap.is_some(),
        }
    }

    /// Allocation from `offset` for up to `length` bytes: consecutive ranges covering at least
    /// one byte (possibly less than `length`).
    ///
    /// # Errors
    /// The query failed.
    pub async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Range>, MoveError> {
        match self {
            Self::File(f) => {
                let file = Arc::clone(&f.file);
                let (size, sparse) = (f.size, f.sparse);
                let path = f.path.clone();
                tokio::task::spawn_blocking(move || file_allocation(&file, size, sparse, offset, length))
                    .await
                    .map_err(|e| MoveError::Source { what: format!("{}: seek", path.display()), source: e.into() })?
                    .map_err(|source| MoveError::Source {
                        what: format!("{}: seek data/hole", f.path.display()),
                        source,
                    })
            }
            Self::Qcow2(q) => q.allocation(offset, length).await,
            Self::Nbd(n) => {
                let extents = n
                    .pool
                    .run(0, "block status", offset, |c| async move {
                        if !c.can_block_status() {
                            return Ok(vec![nbd_server::Extent { length, flags: 0 }]);
                        }
                        c.block_status(offset, length).await
                    })
                    .await
                    .map_err(|e| n.error("block status", e))?;
                // base:allocation: bit 0 hole, bit 1 reads as zeroes. Either way nothing to read.
                Ok(extents.into_iter().map(|e| Range { length: e.length, data: e.flags & 0b11 == 0 }).collect())
            }
        }
    }

    /// Dirty ranges from `offset` (for a source with a bitmap): `data` = dirty.
    ///
    /// # Errors
    /// No bitmap, or the query failed.
    pub async fn dirty(&self, offset: u64, length: u64) -> Result<Vec<Range>, MoveError> {
        if let Self::Qcow2(q) = self {
            return q.dirty(offset, length).await;
        }
        let Self::Nbd(NbdSource { pool, bitmap: Some(bitmap) }) = self else {
            return Err(MoveError::Mismatch("this source has no dirty bitmap".into()));
        };
        let context = format!("qemu:dirty-bitmap:{bitmap}");
        let extents = pool
            .run(0, "dirty bitmap", offset, |c| {
                let context = context.clone();
                async move { c.block_status_of(&context, offset, length).await }
            })
            .await
            .map_err(|e| self.nbd_error("dirty bitmap", e))?;
        Ok(extents.into_iter().map(|e| Range { length: e.length, data: e.flags & 1 != 0 }).collect())
    }

    /// Read `len` bytes at `offset` on behalf of worker `worker` and hash them in blocks of
    /// `block_size`. A file is read into the worker's `buffer` (taken; it comes back through
    /// [`Blocks::into_buffer`]), read and hashed in one trip to the blocking pool; an NBD source
    /// answers with the pieces its connections received (through the tunnel, the channel's own
    /// messages), hashed as they are.
    ///
    /// # Errors
    /// The read failed.
    pub async fn read_hashed(
        &self,
        worker: usize,
        offset: u64,
        len: usize,
        buffer: &mut Vec<u8>,
        block_size: u64,
    ) -> Result<(Blocks, Vec<Hash>), MoveError> {
        let what = || format!("{self}: read at {offset:#x}");
        let blocks = match self {
            Self::File(f) => {
                let file = Arc::clone(&f.file);
                let size = f.size;
                let mut buf = std::mem::take(buffer);
                buf.resize(len, 0);
                return tokio::task::spawn_blocking(move || {
                    read_full(&file, size, offset, &mut buf).map(|()| {
                        let blocks = Blocks::from_buffer(buf);
                        let hashes = blocks.hashes(block_size as usize);
                        (blocks, hashes)
                    })
                })
                .await
                .map_err(|e| MoveError::Source { what: what(), source: e.into() })?
                .map_err(|source| MoveError::Source { what: what(), source });
            }
            Self::Qcow2(q) => {
                let q = q.clone();
                let mut buf = std::mem::take(buffer);
                buf.resize(len, 0);
                return tokio::task::spawn_blocking(move || {
                    q.read_blocking(&mut buf, offset).map(|()| {
                        let blocks = Blocks::from_buffer(buf);
                        let hashes = blocks.hashes(block_size as usize);
                        (blocks, hashes)
                    })
                })
                .await
                .map_err(|e| MoveError::Source { what: what(), source: e.into() })?;
            }
            Self::Nbd(n) => n.read(worker, offset, len, buffer).await?,
        };
        tokio::task::spawn_blocking(move || {
            let hashes = blocks.hashes(block_size as usize);
            (blocks, hashes)
        })
        .await
        .map_err(|e| MoveError::Source { what: what(), source: e.into() })
    }

    fn nbd_error(&self, what: &str, e: MoveError) -> MoveError {
        match self {
            Self::Nbd(n) => n.error(what, e),
            Self::File(_) | Self::Qcow2(_) => e,
        }
    }
}

impl NbdSource {
    /// `len` bytes at `offset`. Over a plain connection (a copy out of the socket either way),
    /// a read of one request goes into the worker's `buffer`, reused from read to read: a fresh
    /// buffer per read costs more in page faults than the copy. Through the tunnel, and for a
    /// read larger than the server's maximum payload, as the pieces the connection received.
    async fn read(&self, worker: usize, offset: u64, len: usize, buffer: &mut Vec<u8>) -> Result<Blocks, MoveError> {
        let max = self.pool.info().max_payload.max(4096) as usize;
        if self.pool.endpoint().via.is_none() && len <= max {
            let mut buf = std::mem::take(buffer);
            buf.resize(len, 0);
            // An attempt that fails takes the buffer with it; a retry reads into a new one.
            let spare = std::sync::Mutex::new(Some(buf));
            return self
                .pool
                .run(worker, "read", offset, |c| {
                    let b = spare.lock().ok().and_then(|mut s| s.take()).unwrap_or_else(|| vec![0; len]);
                    async move { c.read_into(offset, b).await }
                })
                .await
                .map(Blocks::from_buffer)
                .map_err(|e| self.error("read", e));
        }
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(max);
            let at = offset + done as u64;
            let got = self
                .pool
                .run(worker, "read", at, |c| async move { c.read_bytes(at, n as u32).await })
                .await
                .map_err(|e| self.error("read", e))?;
            pieces.extend(got);
            done += n;
        }
        Ok(Blocks::from_pieces(pieces))
    }

    fn error(&self, what: &str, e: MoveError) -> MoveError {
        match e {
            MoveError::Target { source, offset, .. } => {
                MoveError::SourceNbd { what: format!("{} {what} at {offset:#x}", self.pool.endpoint()), source }
            }
            MoveError::Unreachable { source, .. } => {
                MoveError::SourceNbd { what: format!("{} {what}", self.pool.endpoint()), source }
            }
            other => other,
        }
    }
}

impl FileSource {
    /// Open a file or block device read-only; unless its format was `stated` (raw), one that
    /// starts like a disk image is refused.
    ///
    /// # Errors
    /// It cannot be opened or sized, or it looks like an image and nobody said it is raw.
    pub fn open(path: &Path, stated: bool) -> Result<Self, MoveError> {
        let err = |what: &str, source| MoveError::Source { what: format!("{}: {what}", path.display()), source };
        let file = File::open(path).map_err(|e| err("open", e))?;
        let meta = file.metadata().map_err(|e| err("stat", e))?;
        let block = meta.file_type().is_block_device();
        if !block && !meta.is_file() {
            return Err(err("open", std::io::Error::other("not a regular file or block device")));
        }
        let size = if block {
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| err("size", e.into()))?
        } else {
            meta.len()
        };
        if !stated {
            image::refuse_unstated_image(&file, path)?;
        }
        Ok(Self { file: Arc::new(file), path: path.to_path_buf(), size, sparse: !block })
    }
}

/// Size of a source without opening a copy (for the inventory).
///
/// # Errors
/// It cannot be reached.
pub async fn probe_size(spec: &SourceSpec) -> Result<u64, MoveError> {
    match spec {
        SourceSpec::Path { .. } => Ok(Source::open(spec, 1, CancellationToken::new()).await?.size()),
        SourceSpec::Nbd { .. } => {
            let s = Source::open(spec, 1, CancellationToken::new()).await?;
            let size = s.size();
            s.close().await;
            Ok(size)
        }
    }
}

/// Run `open` (which reads the disk) on the blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    open: impl FnOnce() -> Result<T, MoveError> + Send + 'static,
) -> Result<T, MoveError> {
    tokio::task::spawn_blocking(open)
        .await
        .map_err(|e| MoveError::Source { what: format!("{}: open", path.display()), source: e.into() })?
}

fn file_allocation(file: &File, size: u64, sparse: bool, offset: u64, length: u64) -> std::io::Result<Vec<Range>> {
    let end = offset.saturating_add(length).min(size);
    if !sparse || offset >= end {
        return Ok(vec![Range { length: length.max(1), data: true }]);
    }
    let seek = |whence| match rustix::fs::seek(file, whence) {
        Ok(pos) => Ok(Some(pos)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(std::io::Error::from(e)),
    };
    // SEEK_DATA past the end says "no data": a source truncated or removed under the job
    // would be copied as holes. Its length now must still be its length at the start.
    let now = file.metadata()?.len();
    if now < size {
        return Err(shrank(now, size));
    }
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < 4096 {
        let data_at = seek(SeekFrom::Data(pos as i64))?.unwrap_or(size).min(end);
        if data_at > pos {
            out.push(Range { length: data_at - pos, data: false });
            pos = data_at;
            continue;
        }
        let hole_at = seek(SeekFrom::Hole(pos as i64))?.unwrap_or(size).min(end);
        let data_end = hole_at.max(pos + 1);
        out.push(Range { length: data_end - pos, data: true });
        pos = data_end;
    }
    Ok(out)
}

fn shrank(now: u64, size: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("the source disk shrank or disappeared: {now} bytes now, {size} when the job started"),
    )
}

/// `pread` until `buf` is full; past the size the job started with reads as zeroes (the tail
/// of the last block), but a source that ends before that size is an error, never zeroes.
fn read_full(file: &File, size: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        if at >= size {
            break;
        }
        let Some(dst) = buf.get_mut(done..) else { break };
        match file.read_at(dst, at) {
            Ok(0) => return Err(shrank(at, size)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(rest) = buf.get_mut(done..) {
        rest.fill(0);
    }
    Ok(())
}
