//! An open qcow2 image: metadata lookup under short locks, positional data I/O outside them.
//!
//! Reads walk L1 -> L2 (L2 tables come from a bounded cache, so a 4 TiB image does not pin its
//! whole L2 in memory) to a [`Mapping`], then `pread` the data, decompress a compressed cluster,
//! fill zeroes, or descend into the backing file. The backing chain is opened eagerly with a
//! depth limit and loop detection (by device and inode), relative names resolved against the
//! image's own directory, as qemu does.
//!
//! Here: the image's state, its tables and mappings, where guest data goes on the host
//! (`O_DIRECT`, the file grown ahead of direct writes) and the allocation map. Opening is
//! `image/open.rs`, reading guest data `image/read.rs`, writing `write.rs` and `plan.rs`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::header::Header;
use crate::l2cache::{L2Cache, L2Table};
use crate::layout::{self, Geometry, Mapping};
use crate::write::WriteState;

mod open;
mod read;

pub use open::resolve_backing;
pub(crate) use read::read_or_zero;

/// Deepest backing chain opened: backing files under an image. Deep enough for any retention a
/// backup user keeps as one incremental-forever chain (qemu sets no limit and reads a chain of
/// 300); bounded because every image of a chain holds a descriptor and its own L2 cache, and the
/// reads walk it recursively (opening and dropping it are loops), once per run of clusters
/// ([`Image::mapping_run`]). Reading through 64 layers that each hold data runs at 0.88x of
/// reading one, through 255 at 0.61x (1.7x and 8.6x qemu-nbd's speed there;
/// `benches/scripts/chain-depth.sh`).
pub const MAX_BACKING_DEPTH: usize = 255;
/// Default bytes of L2 tables kept in memory for an image (and as much for its backing chain):
/// covers 256 GiB of disk with 64 KiB clusters.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// How to open an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImageOptions {
    /// Open for writing (backing images are always read-only).
    pub writable: bool,
    /// Bytes of L2 tables to cache for the image; its backing images share as much again (each
    /// keeps at least four tables), so a chain holds at most twice this however deep it is.
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
    /// When opened for writing, check the refcounts first and, if clusters leaked (counted,
    /// referenced by nothing: what an interrupted writer leaves), rebuild them, as `qemu-img check
    /// -r leaks` does; an image whose refcounts are below its references is refused for writing.
    /// Costs a read of all the image's metadata: for a writer that knows an earlier one was cut.
    pub reclaim_leaks: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            writable: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            probe_backing_format: true,
            confine_backing_to: None,
            direct_io: false,
            reclaim_leaks: false,
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
        reclaim_leaks: bool,
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

/// One layer of a chain, as [`Image::layers`] walks it.
enum Layer<'a> {
    Qcow2(&'a Image),
    Raw { file: &'a File, size: u64 },
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
    /// [`Image::close`] succeeded (or [`Image::create`] made the image) and no write was asked
    /// for since: closing again, or dropping, has nothing to do.
    pub(crate) closed: AtomicBool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            if let Err(e) = self.close() {
                tracing::error!(path = %self.path.display(), error = %e, "closing the image failed");
            }
        }
        // The chain below is dropped in a loop: recursive drops of 255 layers could take a
        // stack's worth.
        let mut below = self.backing.take();
        while let Some(Backing::Qcow2(mut image)) = below {
            below = image.backing.take();
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("path", &self.path).field("size", &self.geo.size).finish()
    }
}

impl Image {
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

    pub(crate) fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// The lengths of this image's file and of every file of its backing chain, added up: no
    /// less than what [`crate::flatten`] stores of the disk it reads, uncompressed.
    ///
    /// # Errors
    /// A file's length could not be read.
    pub fn chain_file_bytes(&self) -> Result<u64> {
        self.layers().try_fold(0u64, |total, layer| {
            let len = match layer {
                Layer::Qcow2(image) => image.file_len()?,
                Layer::Raw { size, .. } => size,
            };
            Ok(total.saturating_add(len))
        })
    }

    /// This image and every layer of its backing chain, top first.
    fn layers(&self) -> impl Iterator<Item = Layer<'_>> {
        std::iter::successors(Some(Layer::Qcow2(self)), |layer| match layer {
            Layer::Qcow2(image) => match image.backing.as_ref()? {
                Backing::Qcow2(below) => Some(Layer::Qcow2(below)),
                Backing::Raw { file, size, .. } => Some(Layer::Raw { file, size: *size }),
            },
            Layer::Raw { .. } => None,
        })
    }

    /// The metadata (`fstat`) of this image's file and of every file of its backing chain, top
    /// first, as open: what a reader compares later to tell whether any of them was written or
    /// replaced meanwhile (device, inode, change time).
    ///
    /// # Errors
    /// A file could not be stat'ed.
    pub fn chain_metadata(&self) -> Result<Vec<std::fs::Metadata>> {
        self.layers()
            .map(|layer| {
                let file = match layer {
                    Layer::Qcow2(image) => &*image.file,
                    Layer::Raw { file, .. } => file,
                };
                file.metadata().map_err(Error::io("stat", 0))
            })
            .collect()
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
        length_of(&self.file).map_err(Error::io("stat", 0))
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

    /// The mapping at guest `offset` and how many bytes it covers from there (at most the rest of
    /// its cluster, or of its run of subclusters).
    ///
    /// # Errors
    /// A malformed table entry, or an I/O error loading an L2 table.
    pub fn mapping_at(&self, offset: u64) -> Result<(Mapping, u64)> {
        self.mapping_run(offset, 0)
    }

    /// [`Image::mapping_at`], its run extended over the clusters after it in the same L2 table
    /// that go on with it (unallocated, zero, or data next in the file) until it covers `want`
    /// bytes: the read paths then take one step (and one walk down a backing chain) per run
    /// instead of per cluster. Through 255 layers, a 256 KiB read had been four walks of the
    /// whole chain.
    pub(crate) fn mapping_run(&self, offset: u64, want: u64) -> Result<(Mapping, u64)> {
        let (l1_index, l2_index, within) = self.geo.split(offset);
        let l1_entry = self.l1_entry(l1_index)?;
        let l2_offset = layout::l1_entry_offset(l1_entry, l1_index, self.geo.cluster_bits)?;
        if l2_offset == 0 {
            let coverage = self.geo.l2_coverage();
            return Ok((Mapping::Unallocated, coverage - offset % coverage));
        }
        let table = self.l2_table(l2_offset, l1_index)?;
        let first = self.entry_mapping(&table, l1_index, l2_index, within)?;
        Ok(self.extend_run(&table, l1_index, l2_index, within, first, want))
    }

    /// What entry `l2_index` of `table` (L1 entry `l1_index`) maps, from `within` its cluster.
    fn entry_mapping(&self, table: &L2Table, l1_index: u64, l2_index: u64, within: u64) -> Result<(Mapping, u64)> {
        let (entry, bitmap) = if self.geo.extended_l2 {
            let i = (l2_index * 2) as usize;
            (table.get(i), table.get(i + 1))
        } else {
            (table.get(l2_index as usize), 0)
        };
        layout::map_l2_entry(&self.geo, entry, bitmap, l1_index * self.geo.l2_entries() + l2_index, within)
    }

    /// `first` (entry `l2_index`'s mapping from `within`) extended over the whole clusters after
    /// it that map the same way, until it covers `want` bytes or the table ends. An entry that
    /// does not parse ends the run: reading it reports the error.
    fn extend_run(
        &self,
        table: &L2Table,
        l1_index: u64,
        l2_index: u64,
        within: u64,
        first: (Mapping, u64),
        want: u64,
    ) -> (Mapping, u64) {
        let cluster = self.geo.cluster_size();
        let (mapping, mut run) = first;
        if within + run != cluster || matches!(mapping, Mapping::Compressed { .. }) {
            return first;
        }
        let mut next = l2_index + 1;
        while run < want && next < self.geo.l2_entries() {
            let continues = match (mapping, self.entry_mapping(table, l1_index, next, 0)) {
                (_, Err(_)) => false,
                (_, Ok((_, n))) if n != cluster => false,
                (Mapping::Unallocated, Ok((Mapping::Unallocated, _))) | (Mapping::Zero, Ok((Mapping::Zero, _))) => true,
                (Mapping::Data { host, copied }, Ok((Mapping::Data { host: h, copied: c }, _))) => {
                    h == host + run && c == copied
                }
                _ => false,
            };
            if !continues {
                break;
            }
            run += cluster;
            next += 1;
        }
        (mapping, run)
    }

    pub(crate) fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, length, size: self.geo.size }),
        }
    }

    /// [`Image::mapping_run`] from memory only: `None` when the L2 table is not cached.
    pub(crate) fn cached_mapping_run(&self, offset: u64, want: u64) -> Result<Option<(Mapping, u64)>> {
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
        let first = self.entry_mapping(&table, l1_index, l2_index, within)?;
        Ok(Some(self.extend_run(&table, l1_index, l2_index, within, first, want)))
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
            let (mapping, run) = self.mapping_run(pos, end - pos)?;
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

/// Bytes in `file`: a regular file's length, or a block device's size (an image on a logical
/// volume, as oVirt keeps them), which its metadata gives as 0.
pub(crate) fn length_of(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Positional I/O only in this crate: moving the descriptor's offset disturbs nothing.
        std::io::Seek::seek(&mut &*file, std::io::SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// How far past a direct write at the end of the file [`Image::write_data`] grows it at once.
const GROW_AHEAD: u64 = 8 << 20;
