//! An open qcow2 image: metadata lookup under short locks, positional data I/O outside them.
//!
//! Reads walk L1 -> L2 (L2 tables come from a bounded cache, so a 4 TiB image does not pin its
//! whole L2 in memory) to a [`Mapping`], then `pread` the data, decompress a compressed cluster,
//! fill zeroes, or descend into the backing file. The backing chain is opened eagerly with a
//! depth limit and loop detection (by device and inode), relative names resolved against the
//! image's own directory, as qemu does.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::compress;
use crate::error::{Error, Result};
use crate::header::{self, Header};
use crate::l2cache::{L2Cache, L2Table};
use crate::layout::{self, Geometry, Mapping};
use crate::refcount::Refcounts;
use crate::write::WriteState;

/// Deepest backing chain opened.
pub const MAX_BACKING_DEPTH: usize = 16;
/// Default bytes of L2 tables kept in memory per image.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// How to open an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImageOptions {
    /// Open for writing (backing images are always read-only).
    pub writable: bool,
    /// Bytes of L2 tables to cache.
    pub l2_cache_bytes: u64,
    /// Guess a backing file's format from its first bytes when the image does not record it
    /// (qemu-img's old behaviour, the default). A service opening images it did not make itself
    /// turns this off: a raw backing file that starts like a qcow2 header would otherwise be read
    /// as one, with its "backing file" reaching anywhere.
    pub probe_backing_format: bool,
    /// Every backing file must resolve (symlinks followed) to a path inside this directory.
    pub confine_backing_to: Option<std::path::PathBuf>,
    /// Guest data goes through an `O_DIRECT` descriptor where it is 4 KiB aligned (qemu's
    /// `cache=none`): a copy of many terabytes leaves nothing in the page cache. Metadata and
    /// unaligned pieces stay buffered (coherent: see the `directio` crate); qcow2 backing files
    /// are read the same way, raw ones buffered. Every write then waits for the device.
    pub direct_io: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            writable: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            probe_backing_format: true,
            confine_backing_to: None,
            direct_io: false,
        }
    }
}

impl ImageOptions {
    /// Read-only, backing formats never guessed, the chain kept inside `dir`: how a service
    /// opens images in a repository it owns.
    pub fn confined(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { probe_backing_format: false, confine_backing_to: Some(dir.into()), ..Self::default() }
    }

    /// The defaults, opened for writing.
    pub fn read_write() -> Self {
        Self { writable: true, ..Self::default() }
    }

    setters::setters! {
        writable: bool,
        l2_cache_bytes: u64,
        probe_backing_format: bool,
        confine_backing_to: Option<std::path::PathBuf>,
        direct_io: bool,
    }
}

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// Another qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl BackingFormat {
    /// The name qemu stores in the backing-format extension.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// What lies under an image.
pub(crate) enum Backing {
    Raw { file: Arc<File>, size: u64, plain_reads: AtomicBool },
    Qcow2(Box<Image>),
}

impl Backing {
    pub(crate) fn size(&self) -> u64 {
        match self {
            Self::Raw { size, .. } => *size,
            Self::Qcow2(img) => img.size(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            Self::Raw { file, .. } => read_or_zero(file, inside, offset),
            Self::Qcow2(img) => img.read_at(inside, offset),
        }
    }

    /// As [`Image::read_cached`]: the bytes of a prefix of `buf` filled without waiting.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let avail = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        let got = match self {
            _ if inside.is_empty() => 0,
            Self::Raw { file, plain_reads, .. } => read_cached_or_zero(file, plain_reads, inside, offset)?,
            Self::Qcow2(img) => img.read_cached(inside, offset)?,
        };
        if got < avail {
            return Ok(got);
        }
        past.fill(0);
        Ok(buf.len())
    }
}

/// Fill a prefix of `buf` at `offset` from the page cache without waiting for the device
/// (`RWF_NOWAIT`); bytes past the end of the file read as zeroes. Returns the bytes filled.
/// A filesystem that cannot read without waiting (tmpfs refuses the flag: it has no device to
/// wait for) is read plainly, and `plain` remembers it for the file.
fn read_cached_or_zero(file: &File, plain: &AtomicBool, buf: &mut [u8], offset: u64) -> Result<usize> {
    if plain.load(Ordering::Relaxed) {
        read_or_zero(file, buf, offset)?;
        return Ok(buf.len());
    }
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else { break };
        let at = offset + done as u64;
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(file, &mut [std::io::IoSliceMut::new(rest)], at, flags) {
            Ok(0) => {
                rest.fill(0);
                return Ok(buf.len());
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            // Not cached: the caller waits for the rest.
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                plain.store(true, Ordering::Relaxed);
                read_or_zero(file, rest, at)?;
                return Ok(buf.len());
            }
            Err(e) => return Err(Error::io("read", at)(e.into())),
        }
    }
    Ok(done)
}

/// Read `buf` at `offset`; bytes past the end of the file read as zeroes (as in qemu).
pub(crate) fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else { break };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", offset + done as u64)(e)),
        }
    }
    Ok(())
}

/// What a range of the virtual disk holds, for block status and `qemu-img map`-like views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data (in this image or a backing layer).
    Data,
    /// Reads as zeroes because a layer says so (zero cluster).
    Zero,
    /// Allocated nowhere in the chain: reads as zeroes.
    Unallocated,
}

/// One run of the allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapExtent {
    /// Start in the virtual disk.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// What it holds.
    pub kind: ExtentKind,
    /// Chain depth of the layer that decided (0 = this image).
    pub depth: u32,
}

/// An open qcow2 image. `Send + Sync`: share it between threads with an `Arc`.
pub struct Image {
    file: Arc<File>,
    path: PathBuf,
    pub(crate) header: Header,
    pub(crate) geo: Geometry,
    pub(crate) l1: RwLock<Vec<u64>>,
    l2_cache: Mutex<L2Cache>,
    pub(crate) backing: Option<Backing>,
    writable: bool,
    /// The `O_DIRECT` descriptor for aligned guest data ([`ImageOptions::direct_io`]).
    direct: Option<directio::Direct>,
    /// The file refused `RWF_NOWAIT` reads ([`Image::read_cached`] reads it plainly).
    plain_reads: AtomicBool,
    /// How far the file is known to reach, so a direct write past it grows the file first
    /// ([`Image::write_data`]); it may lag the real length, never lead it.
    grown_to: AtomicU64,
    /// Present when writable: refcounts, allocator, in-flight allocations.
    pub(crate) write_state: Option<Mutex<WriteState>>,
    /// The last compressed cluster decompressed: (host offset, contents).
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// [`Image::close`] succeeded and no write was asked for since: dropping has nothing to do.
    pub(crate) closed: AtomicBool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.close() {
            tracing::error!(path = %self.path.display(), error = %e, "closing the image failed");
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("path", &self.path).field("size", &self.geo.size).finish()
    }
}

impl Image {
    /// Open an image (and its backing chain) read-only.
    ///
    /// # Errors
    /// The file cannot be opened, is not a valid qcow2 image, or its chain is broken.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &ImageOptions::default())
    }

    /// Open an image with options.
    ///
    /// # Errors
    /// As [`Image::open`], plus [`Error::ReadOnly`] when writing is asked of an image this
    /// crate will not write (corrupt bit, internal snapshots, unknown autoclear... see docs).
    pub fn open_with(path: impl AsRef<Path>, opts: &ImageOptions) -> Result<Self> {
        let mut seen = Vec::new();
        Self::open_in_chain(path.as_ref(), opts, 0, &mut seen)
    }

    fn open_in_chain(path: &Path, opts: &ImageOptions, depth: usize, seen: &mut Vec<(u64, u64)>) -> Result<Self> {
        if depth > MAX_BACKING_DEPTH {
            return Err(Error::BackingChainTooDeep { limit: MAX_BACKING_DEPTH, path: path.to_path_buf() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(opts.writable)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let meta = file.metadata().map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(Error::BackingLoop { path: path.to_path_buf() });
        }
        seen.push(id);
        let file_len = meta.len();
        let mut probe = vec![0u8; Header::PROBE_LEN.min(file_len as usize)];
        read_or_zero(&file, &mut probe, 0)?;
        let cluster = Header::probe_cluster_size(&probe)?;
        let mut first = vec![0u8; cluster.min(file_len as usize)];
        read_or_zero(&file, &mut first, 0)?;
        let header = Header::parse(&first)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            v3: header.version == 3,
            size: header.size,
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_table_offset.checked_add(l1_bytes).is_none_or(|end| end > file_len) && l1_bytes > 0 {
            return Err(Error::InvalidHeader {
                field: "l1_table_offset",
                value: header.l1_table_offset,
                reason: "L1 table lies past the end of the file",
            });
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        read_or_zero(&file, &mut raw, header.l1_table_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect();
        for (i, e) in l1.iter().enumerate() {
            let off = layout::l1_entry_offset(*e, i as u64, header.cluster_bits)?;
            if off != 0 && off + geo.cluster_size() > file_len {
                return Err(Error::InvalidEntry {
                    table: "L1",
                    index: i as u64,
                    value: *e,
                    reason: "L2 table past end of file",
                });
            }
        }
        let backing = match &header.backing_file {
            None => None,
            Some(name) => {
                let base = resolve_backing(path, name);
                if let Some(dir) = &opts.confine_backing_to {
                    confine(&base, dir)?;
                }
                let format = match header.backing_format().as_deref() {
                    Some("qcow2") => BackingFormat::Qcow2,
                    Some("raw") => BackingFormat::Raw,
                    Some(other) => return Err(Error::Unsupported(format!("backing format '{other}'"))),
                    None if opts.probe_backing_format => probe_format(&base)?,
                    None => {
                        return Err(Error::Unsupported(format!(
                            "backing file '{name}' has no recorded format, and guessing it is turned off"
                        )))
                    }
                };
                Some(match format {
                    BackingFormat::Qcow2 => {
                        let ro = ImageOptions { writable: false, ..opts.clone() };
                        Backing::Qcow2(Box::new(Self::open_in_chain(&base, &ro, depth + 1, seen)?))
                    }
                    BackingFormat::Raw => {
                        let f = File::open(&base).map_err(|source| Error::Open { path: base.clone(), source })?;
                        let size = f.metadata().map_err(|source| Error::Open { path: base.clone(), source })?.len();
                        Backing::Raw { file: Arc::new(f), size, plain_reads: AtomicBool::new(false) }
                    }
                })
            }
        };
        let capacity = (opts.l2_cache_bytes / geo.cluster_size()).max(4) as usize;
        let mut image = Self {
            file: Arc::new(file),
            path: path.to_path_buf(),
            header,
            geo,
            l1: RwLock::new(l1),
            l2_cache: Mutex::new(L2Cache::new(capacity)),
            backing,
            writable: opts.writable,
            direct: match opts.direct_io {
                true => Some(
                    directio::Direct::open(path, opts.writable)
                        .map_err(|source| Error::Open { path: path.to_path_buf(), source })?,
                ),
                false => None,
            },
            plain_reads: AtomicBool::new(false),
            grown_to: AtomicU64::new(file_len),
            write_state: None,
            last_compressed: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        if opts.writable {
            image.check_writable()?;
            image.prepare_for_writes(file_len)?;
        }
        Ok(image)
    }

    fn prepare_for_writes(&mut self, file_len: u64) -> Result<()> {
        if self.header.autoclear_features != 0 {
            // We do not maintain bitmaps (or anything else autoclear guards): clear the bits so
            // qemu treats such data as stale instead of trusting it.
            self.file.write_all_at(&0u64.to_be_bytes(), 88).map_err(Error::io("write header", 88))?;
            self.file.sync_data().map_err(Error::io("fdatasync", 0))?;
            self.header.autoclear_features = 0;
        }
        let mut file_len = file_len;
        if self.header.incompatible_features & header::incompatible::DIRTY != 0 {
            let l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
            crate::repair::rebuild(&self.file, &mut self.header, &l1, file_len)?;
            file_len = self.file_len()?;
        }
        let refcounts = Refcounts::load(&self.file, &self.header, file_len)?;
        self.write_state = Some(Mutex::new(WriteState::new(refcounts)));
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        let h = &self.header;
        if h.incompatible_features & header::incompatible::CORRUPT != 0 {
            return Err(Error::ReadOnly("the image is marked corrupt (run qemu-img check -r all)"));
        }
        if h.nb_snapshots > 0 {
            return Err(Error::ReadOnly("images with internal snapshots are opened read-only"));
        }
        Ok(())
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Whether aligned guest data goes through `O_DIRECT` ([`ImageOptions::direct_io`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Write guest data at host offset `host`: through `O_DIRECT` when asked for and aligned.
    ///
    /// A direct write past the end of the file is one that ext4 (and xfs) run synchronously under
    /// the inode's exclusive lock, so that newly allocated clusters at the end — every write of
    /// a fresh backup — would reach the device one at a time: fio on this machine's disk wrote
    /// 64 KiB `O_DIRECT` at QD16 at 501 MiB/s into a growing file against 1067 MiB/s into one
    /// already long enough. So the file is first grown with `fallocate` (mode 0: it extends the
    /// file, never shrinks it, and is a no-op where blocks exist), [`GROW_AHEAD`] at a time, since
    /// each call takes the same exclusive lock (one call per 256 KiB write: 0.84x writeback
    /// throughput; per 8 MiB: 0.96x). A clean close gives the unused part back (the reservation
    /// is punched, the tail past every handed-out cluster cut). After a crash the file may hold
    /// up to [`GROW_AHEAD`] of reserved, unreferenced clusters, which `qemu-img check` counts as
    /// leaks: the outcome the refcount rules already allow for a crash (`refcount.rs`), never
    /// corruption.
    pub(crate) fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        match &self.direct {
            Some(direct) if directio::is_aligned(host, data.len()) => {
                self.grow_for_direct(host, data.len());
                direct.write_at(data, host)
            }
            _ => self.file.write_all_at(data, host),
        }
        .map_err(Error::io("write", host))
    }

    /// Grow the file ahead of a direct write that reaches past it (see [`Image::write_data`]).
    pub(crate) fn grow_for_direct(&self, host: u64, len: usize) {
        let end = host + len as u64;
        let grown = self.grown_to.load(Ordering::Relaxed);
        if end > grown {
            let to = end.max(grown + GROW_AHEAD);
            // Best effort: where the filesystem cannot, the write extends the file itself.
            if rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), host, to - host).is_ok() {
                self.grown_to.fetch_max(to, Ordering::Relaxed);
            }
        }
    }

    /// The descriptor guest data goes through: the `O_DIRECT` one when `direct` and the image
    /// has one ([`ImageOptions::direct_io`]).
    pub(crate) fn data_file(&self, direct: bool) -> &Arc<File> {
        match self.direct.as_ref().filter(|_| direct) {
            Some(d) => d.file(),
            None => &self.file,
        }
    }

    /// Cut the space that [`Image::write_data`] allocated ahead and no cluster came to use: the
    /// file ends at `end` (past every cluster ever handed out) if it had grown beyond.
    pub(crate) fn trim_grown_tail(&self, end: u64) -> Result<()> {
        if self.grown_to.load(Ordering::Relaxed) > end && self.file_len()? > end {
            self.file.set_len(end).map_err(Error::io("truncate", end))?;
            self.grown_to.store(end, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Read guest data at host offset `host` (zeroes past the end of the file): through
    /// `O_DIRECT` when asked for and aligned.
    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| directio::is_aligned(host, buf.len())) {
            match direct.read_at(buf, host) {
                Ok(()) => return Ok(()),
                // The file ends inside the range: the buffered read fills the rest with zeroes.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(Error::io("read", host)(e)),
            }
        }
        read_or_zero(&self.file, buf, host)
    }

    pub(crate) fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Check the refcounts against the metadata, as `qemu-img check` does: clusters referenced
    /// more often than their refcount says are corruption (an allocation could hand them out
    /// again); clusters with a higher refcount than references are leaks (lost space, no harm).
    /// Meant for a closed-for-writing image: a writable one holds reserved clusters that count as
    /// leaks until used.
    ///
    /// # Errors
    /// The metadata cannot be read, or the image has internal snapshots.
    pub fn check(&self) -> Result<crate::CheckReport> {
        let l1 = self.l1.read().map(|l| l.clone()).map_err(|_| Error::Unsupported("L1 table lock poisoned".into()))?;
        crate::repair::check(&self.file, &self.header, &l1, self.file_len()?)
    }

    fn file_len(&self) -> Result<u64> {
        self.file.metadata().map(|m| m.len()).map_err(Error::io("stat", 0))
    }

    pub(crate) fn l2_table(&self, offset: u64, l1_index: u64) -> Result<Arc<L2Table>> {
        let miss = match self.l2_cache().lookup(offset) {
            Ok(table) => return Ok(table),
            Err(miss) => miss,
        };
        let cluster = self.geo.cluster_size();
        if offset + cluster > self.file_len()? {
            return Err(Error::InvalidEntry {
                table: "L1",
                index: l1_index,
                value: offset,
                reason: "L2 table past end of file",
            });
        }
        let mut raw = vec![0u8; cluster as usize];
        read_or_zero(&self.file, &mut raw, offset)?;
        // Read without the write state's lock: `l2cache.rs` says when this copy may be cached.
        Ok(self.l2_cache().loaded(offset, Arc::new(L2Table::from_bytes(&raw)), miss))
    }

    /// After a writer changed `table` (at `offset`, under the write state's lock): make it the
    /// cached one (`l2cache.rs`).
    pub(crate) fn l2_table_changed(&self, offset: u64, table: &Arc<L2Table>) {
        self.l2_cache().changed(offset, table);
    }

    fn l2_cache(&self) -> std::sync::MutexGuard<'_, L2Cache> {
        // The cache holds no invariant a panic could break halfway: a poisoned lock is usable.
        self.l2_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// L1 entry `index` (0 past the table's end: unallocated). A poisoned lock is an error,
    /// never an entry read as 0 (which would read as unallocated, or be allocated over).
    pub(crate) fn l1_entry(&self, index: u64) -> Result<u64> {
        let l1 = self.l1.read().map_err(|_| Error::Unsupported("L1 table lock poisoned".into()))?;
        Ok(l1.get(index as usize).copied().unwrap_or(0))
    }

    /// The mapping at guest `offset` and how many bytes it covers from there.
    ///
    /// # Errors
    /// A malformed table entry, or an I/O error loading an L2 table.
    pub fn mapping_at(&self, offset: u64) -> Result<(Mapping, u64)> {
        let (l1_index, l2_index, within) = self.geo.split(offset);
        let l1_entry = self.l1_entry(l1_index)?;
        let l2_offset = layout::l1_entry_offset(l1_entry, l1_index, self.geo.cluster_bits)?;
        if l2_offset == 0 {
            let coverage = self.geo.l2_coverage();
            return Ok((Mapping::Unallocated, coverage - offset % coverage));
        }
        let table = self.l2_table(l2_offset, l1_index)?;
        let (entry, bitmap) = if self.geo.extended_l2 {
            let i = (l2_index * 2) as usize;
            (table.get(i), table.get(i + 1))
        } else {
            (table.get(l2_index as usize), 0)
        };
        layout::map_l2_entry(&self.geo, entry, bitmap, l1_index * self.geo.l2_entries() + l2_index, within)
    }

    pub(crate) fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, length, size: self.geo.size }),
        }
    }

    /// The decompressed contents of the compressed cluster at `host`. The last one is kept, so
    /// small reads walking through a compressed cluster decompress it once, not once per read.
    /// (Host clusters are never rewritten in place while referenced, so the host offset is a
    /// sound key.)
    fn read_compressed(&self, host: u64, length: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((at, data)) = self.last_compressed.lock().ok().and_then(|c| c.clone()) {
            if at == host {
                return Ok(data);
            }
        }
        let cluster = self.geo.cluster_size();
        // A compressed cluster is never longer than a cluster plus the sector it starts in.
        let length = length.min(cluster + 512);
        let mut input = vec![0u8; length as usize];
        read_or_zero(&self.file, &mut input, host)?;
        let mut out = vec![0u8; cluster as usize];
        compress::decompress(self.header.compression, &input, &mut out, host)?;
        let out = Arc::new(out);
        if let Ok(mut c) = self.last_compressed.lock() {
            *c = Some((host, Arc::clone(&out)));
        }
        Ok(out)
    }

    /// Read `buf.len()` bytes at guest `offset`.
    ///
    /// # Errors
    /// Out of range, malformed metadata, or I/O.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, run) = self.mapping_at(pos)?;
            let n = run.min((buf.len() - done) as u64) as usize;
            // Never return with part of `buf` unfilled: the caller would send what was there.
            let Some(dst) = buf.get_mut(done..done + n).filter(|d| !d.is_empty()) else {
                return Err(Error::InvalidEntry { table: "L2", index: pos, value: run, reason: "empty mapping run" });
            };
            match mapping {
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_at(dst, pos)?,
                    None => dst.fill(0),
                },
                Mapping::Zero => dst.fill(0),
                Mapping::Data { host, .. } => self.read_data(dst, host)?,
                Mapping::Compressed { host, length } => {
                    let cluster = self.read_compressed(host, length)?;
                    let within = (pos & (self.geo.cluster_size() - 1)) as usize;
                    let src = cluster.get(within..within + n).ok_or_else(|| Error::CorruptCompressedCluster {
                        offset: host,
                        reason: "decompressed cluster shorter than the read".into(),
                    })?;
                    dst.copy_from_slice(src);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Fill as much of `buf` (a guest range, as [`Image::read_at`]) as can be had without
    /// waiting for a device: data the page cache holds, zero and unallocated ranges, clusters
    /// whose L2 table is cached, the backing chain alike. Returns how many bytes from the start
    /// of `buf` are filled (0 when the first piece would wait); the caller reads the rest with
    /// `read_at`, off any thread that must not block. `O_DIRECT` data always waits; a file on a
    /// filesystem that refuses `RWF_NOWAIT` (tmpfs, which never waits) is read plainly.
    ///
    /// # Errors
    /// As [`Image::read_at`].
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some((mapping, run)) = self.cached_mapping_at(pos)? else { break };
            let n = run.min((buf.len() - done) as u64) as usize;
            let Some(dst) = buf.get_mut(done..done + n).filter(|d| !d.is_empty()) else {
                return Err(Error::InvalidEntry { table: "L2", index: pos, value: run, reason: "empty mapping run" });
            };
            let got = match mapping {
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_cached(dst, pos)?,
                    None => {
                        dst.fill(0);
                        n
                    }
                },
                Mapping::Zero => {
                    dst.fill(0);
                    n
                }
                Mapping::Data { host, .. } if self.direct.is_none() => {
                    read_cached_or_zero(&self.file, &self.plain_reads, dst, host)?
                }
                Mapping::Data { .. } => 0,
                Mapping::Compressed { host, .. } => {
                    let last = self.last_compressed.lock().ok().and_then(|c| c.clone());
                    let within = (pos & (self.geo.cluster_size() - 1)) as usize;
                    let cached = last.filter(|(at, _)| *at == host);
                    match cached.as_ref().and_then(|(_, c)| c.get(within..within + n)) {
                        Some(src) => {
                            dst.copy_from_slice(src);
                            n
                        }
                        None => 0,
                    }
                }
            };
            done += got;
            if got < n {
                break;
            }
        }
        Ok(done)
    }

    /// [`Image::mapping_at`] from memory only: `None` when the L2 table is not cached.
    pub(crate) fn cached_mapping_at(&self, offset: u64) -> Result<Option<(Mapping, u64)>> {
        let (l1_index, l2_index, within) = self.geo.split(offset);
        let l1_entry = self.l1_entry(l1_index)?;
        let l2_offset = layout::l1_entry_offset(l1_entry, l1_index, self.geo.cluster_bits)?;
        if l2_offset == 0 {
            let coverage = self.geo.l2_coverage();
            return Ok(Some((Mapping::Unallocated, coverage - offset % coverage)));
        }
        let Some(table) = self.l2_cache().get(l2_offset) else {
            return Ok(None);
        };
        let (entry, bitmap) = if self.geo.extended_l2 {
            let i = (l2_index * 2) as usize;
            (table.get(i), table.get(i + 1))
        } else {
            (table.get(l2_index as usize), 0)
        };
        layout::map_l2_entry(&self.geo, entry, bitmap, l1_index * self.geo.l2_entries() + l2_index, within).map(Some)
    }

    /// The allocation map of `[offset, offset + length)`, resolved through the backing chain,
    /// with adjacent runs of the same kind and depth merged.
    ///
    /// # Errors
    /// Out of range or malformed metadata.
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<MapExtent>> {
        self.check_range(offset, length)?;
        let mut out: Vec<MapExtent> = Vec::new();
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let (mapping, run) = self.mapping_at(pos)?;
            let n = run.min(end - pos);
            let mut pieces = Vec::new();
            match mapping {
                Mapping::Data { .. } | Mapping::Compressed { .. } => {
                    pieces.push(MapExtent { offset: pos, length: n, kind: ExtentKind::Data, depth: 0 })
                }
                Mapping::Zero => pieces.push(MapExtent { offset: pos, length: n, kind: ExtentKind::Zero, depth: 0 }),
                Mapping::Unallocated => match &self.backing {
                    None => pieces.push(MapExtent { offset: pos, length: n, kind: ExtentKind::Unallocated, depth: 0 }),
                    Some(b) => {
                        let bsize = b.size();
                        let inside = bsize.saturating_sub(pos).min(n);
                        if inside > 0 {
                            match b {
                                Backing::Raw { .. } => pieces.push(MapExtent {
                                    offset: pos,
                                    length: inside,
                                    kind: ExtentKind::Data,
                                    depth: 1,
                                }),
                                Backing::Qcow2(img) => {
                                    for e in img.map(pos, inside)? {
                                        pieces.push(MapExtent { depth: e.depth + 1, ..e });
                                    }
                                }
                            }
                        }
                        if inside < n {
                            pieces.push(MapExtent {
                                offset: pos + inside,
                                length: n - inside,
                                kind: ExtentKind::Unallocated,
                                depth: 0,
                            });
                        }
                    }
                },
            }
            for p in pieces {
                match out.last_mut() {
                    Some(last)
                        if last.kind == p.kind && last.depth == p.depth && last.offset + last.length == p.offset =>
                    {
                        last.length += p.length
                    }
                    _ => out.push(p),
                }
            }
            pos += n;
        }
        Ok(out)
    }
}

/// `base` (symlinks resolved) must lie inside `dir`.
fn confine(base: &Path, dir: &Path) -> Result<()> {
    let outside = || Error::Unsupported(format!("backing file {} lies outside {}", base.display(), dir.display()));
    let real = base.canonicalize().map_err(|source| Error::Open { path: base.to_path_buf(), source })?;
    let dir = dir.canonicalize().map_err(|source| Error::Open { path: dir.to_path_buf(), source })?;
    if real.starts_with(&dir) {
        Ok(())
    } else {
        Err(outside())
    }
}

/// How far past a direct write at the end of the file [`Image::write_data`] grows it at once.
const GROW_AHEAD: u64 = 8 << 20;

/// Resolve a backing name against the directory of the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf())
}

fn probe_format(path: &Path) -> Result<BackingFormat> {
    let f = File::open(path).map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
    let mut magic = [0u8; 4];
    read_or_zero(&f, &mut magic, 0)?;
    Ok(if u32::from_be_bytes(magic) == header::MAGIC { BackingFormat::Qcow2 } else { BackingFormat::Raw })
}
