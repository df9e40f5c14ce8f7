//! Writes (and reads) whose data the caller moves itself: plan, move the data, commit.
//!
//! An async server (nbd-server's `--aio=io_uring`) wants a write's data to reach the file through
//! its own I/O engine, with no thread blocked per write, while the metadata rules stay in this
//! crate. So [`Image::write_at`]'s three steps are offered apart: [`Image::plan_write`] does what
//! must come before the data (find the host clusters the write lands in; take fresh ones, marked
//! in flight, and the L2 tables they need; grow the file ahead of `O_DIRECT` writes) and says
//! where each byte goes; the caller writes the [`Piece`]s; [`WritePlan::commit`] does what comes
//! after (points the L2 entries at the new clusters, releases what they pointed at, lets waiting
//! writers in). It is the order `write_at` follows, so crash safety is the same (`write.rs`).
//!
//! Only writes that never wait are planned: into clusters the image owns, whole new clusters,
//! and partial new clusters whose old contents read as zeroes. Anything else answers `None` and
//! the caller uses `write_at` where blocking is fine: a copy-on-write (old bytes are copied and
//! made durable first), a new refcount reservation (it is `fdatasync`ed), a cluster another writer
//! is allocating (that means waiting for it). Deciding and allocating happen under one hold of
//! the metadata lock, so no other writer can change the answer in between.
//!
//! Reads have the same split without a commit: [`Image::plan_read`] resolves a guest range through
//! the backing chain to the files and offsets that hold it (or zeroes), from cached metadata
//! only, and answers `None` where this crate must read itself (a compressed cluster) or would
//! have to wait for metadata (an L2 table not in memory: `read_at` loads it, later plans find it).
//!
//! A plan dropped without a commit (its data write failed, or the caller gave up) lets waiting
//! writers in and leaves its fresh clusters unreferenced: leaked, as a crash would leave them,
//! never pointed at. They are not handed out again, since part of the data may have landed in
//! them and a fresh cluster must read as zeroes.

use std::collections::BTreeSet;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use crate::error::Result;
use crate::image::{Backing, Image};
use crate::layout::Mapping;
use crate::write::InFlight;

/// One contiguous part of a planned write: `data` (a range of the caller's buffer) goes to
/// `host` in the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Bytes of the caller's buffer.
    pub data: Range<usize>,
    /// Where they go in the image file.
    pub host: u64,
    /// Whether the piece goes through the `O_DIRECT` descriptor ([`WritePlan::file`] gives it):
    /// its memory must then be aligned to [`directio::DIRECT_ALIGN`] too, or the caller writes
    /// it with [`WritePlan::write_piece`], which copies it through an aligned buffer.
    pub direct: bool,
}

/// Guest clusters `guest..guest + count` (in one L2 table) newly at host clusters `host..`.
#[derive(Debug, Clone, Copy)]
struct NewRun {
    guest: u64,
    count: u64,
    host: u64,
}

/// A write whose metadata is prepared and whose data the caller writes; see the module doc.
#[must_use = "a plan's L2 entries are written only by commit"]
pub struct WritePlan<'a> {
    image: &'a Image,
    pieces: Vec<Piece>,
    runs: Vec<NewRun>,
    /// Guest clusters marked in flight under `marker`.
    claimed: Vec<u64>,
    marker: Arc<InFlight>,
}

impl std::fmt::Debug for WritePlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritePlan").field("pieces", &self.pieces).field("new_clusters", &self.claimed.len()).finish()
    }
}

/// Where one cluster's share of the write goes.
enum Target {
    /// Clusters this image owns: host offset of the write's first byte there.
    Owned(u64),
    /// A fresh cluster, taken at allocation.
    Fresh,
}

impl Image {
    /// Prepare writing `length` bytes at guest `offset` for a caller that moves the data itself,
    /// or `None` when this write may wait (see the module doc) and belongs to [`Image::write_at`].
    ///
    /// # Errors
    /// Read-only image, out of range, malformed metadata, or I/O on metadata.
    pub fn plan_write(&self, offset: u64, length: u64) -> Result<Option<WritePlan<'_>>> {
        self.check_write(offset, length)?;
        let cluster = self.geo.cluster_size();
        let end = offset + length;
        let mut st = self.state()?;
        // Decide for every cluster first: nothing is taken unless the whole write can be planned.
        let mut targets = Vec::new();
        let mut tables = BTreeSet::new();
        let mut pos = offset;
        while pos < end {
            let start = pos & !(cluster - 1);
            let next = (start + cluster).min(end);
            let guest = start >> self.geo.cluster_bits;
            if st.inflight.contains_key(&guest) {
                return Ok(None);
            }
            match self.mapping_at(pos)? {
                (Mapping::Data { host, copied: true }, run) if run >= next - pos => targets.push(Target::Owned(host)),
                _ => {
                    let whole = next - pos == cluster;
                    if !whole && !self.reads_as_zeroes(start)? {
                        return Ok(None); // copy-on-write
                    }
                    let l1_index = guest / self.geo.l2_entries();
                    if self.l1_entry(l1_index)? == 0 {
                        tables.insert(l1_index);
                    }
                    targets.push(Target::Fresh);
                }
            }
            pos = next;
        }
        let fresh = targets.iter().filter(|t| matches!(t, Target::Fresh)).count() as u64;
        if fresh + tables.len() as u64 > st.refcounts.reserved_left() {
            return Ok(None); // the next reservation is made durable with fdatasync
        }
        // Tables first, so that the data clusters taken next are contiguous.
        for &l1_index in &tables {
            self.ensure_l2(&mut st, l1_index * self.geo.l2_entries())?;
        }
        let mut plan = WritePlan {
            image: self,
            pieces: Vec::new(),
            runs: Vec::new(),
            claimed: Vec::new(),
            marker: Arc::new(InFlight::default()),
        };
        let mut pos = offset;
        for target in targets {
            let start = pos & !(cluster - 1);
            let next = (start + cluster).min(end);
            let guest = start >> self.geo.cluster_bits;
            let host = match target {
                Target::Owned(host) => host,
                Target::Fresh => {
                    let fresh = st.refcounts.alloc(self.file())?;
                    st.inflight.insert(guest, Arc::clone(&plan.marker));
                    plan.claimed.push(guest);
                    plan.add_run(guest, fresh);
                    fresh + (pos - start)
                }
            };
            plan.add_piece((pos - offset) as usize..(next - offset) as usize, host);
            pos = next;
        }
        drop(st);
        for piece in &plan.pieces {
            if piece.direct {
                self.grow_for_direct(piece.host, piece.data.len());
            }
        }
        Ok(Some(plan))
    }
}

impl WritePlan<'_> {
    /// Where the data goes, in the caller's buffer order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The descriptor to write `piece` through: the `O_DIRECT` one for direct pieces.
    pub fn file(&self, piece: &Piece) -> &File {
        self.image.data_file(piece.direct)
    }

    /// Write `piece` of `data` (the whole buffer the plan was made for) synchronously, through an
    /// aligned bounce buffer where a direct piece's memory is not aligned.
    ///
    /// # Errors
    /// I/O.
    pub fn write_piece(&self, piece: &Piece, data: &[u8]) -> Result<()> {
        let bytes = data.get(piece.data.clone()).unwrap_or_default();
        self.image.write_data(bytes, piece.host)
    }

    /// Point the L2 entries at the clusters the data was written to. Call once every piece has
    /// been written.
    ///
    /// # Errors
    /// I/O on metadata; the data stays unreferenced (leaked) then.
    pub fn commit(self) -> Result<()> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let mut st = self.image.state()?;
        for run in &self.runs {
            self.image.set_run(&mut st, run.guest, run.count, run.host)?;
        }
        Ok(())
    }

    fn add_run(&mut self, guest: u64, host: u64) {
        let cluster = self.image.geo.cluster_size();
        let table = |g: u64| g / self.image.geo.l2_entries();
        match self.runs.last_mut() {
            Some(run)
                if run.guest + run.count == guest
                    && run.host + run.count * cluster == host
                    && table(run.guest) == table(guest) =>
            {
                run.count += 1
            }
            _ => self.runs.push(NewRun { guest, count: 1, host }),
        }
    }

    fn add_piece(&mut self, data: Range<usize>, host: u64) {
        let direct_file = self.image.is_direct();
        if let Some(last) = self.pieces.last_mut() {
            if last.data.end == data.start && last.host + last.data.len() as u64 == host {
                last.data.end = data.end;
                last.direct = direct_file && directio::is_aligned(last.host, last.data.len());
                return;
            }
        }
        let direct = direct_file && directio::is_aligned(host, data.len());
        self.pieces.push(Piece { data, host, direct });
    }
}

impl Drop for WritePlan<'_> {
    fn drop(&mut self) {
        if self.claimed.is_empty() {
            return;
        }
        if let Ok(mut st) = self.image.state() {
            for guest in &self.claimed {
                st.inflight.remove(guest);
            }
        }
        self.marker.finish();
    }
}

/// Where one part of a planned read comes from.
#[derive(Debug, Clone, Copy)]
pub enum ReadSource<'a> {
    /// Reads as zeroes (zero or unallocated clusters, past the end of a backing file).
    Zero,
    /// Bytes in a file of this image or of one in its backing chain.
    File {
        /// The descriptor to read.
        file: &'a Arc<File>,
        /// Where the bytes start in it.
        host: u64,
        /// `file` is an `O_DIRECT` descriptor: the caller's memory must be aligned to
        /// [`directio::DIRECT_ALIGN`]. A short read (the file ends early) means the caller falls
        /// back to [`Image::read_at`], which reads zeroes there.
        direct: bool,
    },
}

/// One contiguous part of a planned read: `data` (a range of the caller's buffer) comes from
/// `source`.
#[derive(Debug, Clone)]
pub struct ReadPiece<'a> {
    /// Bytes of the caller's buffer.
    pub data: Range<usize>,
    /// Where they come from.
    pub source: ReadSource<'a>,
}

impl Image {
    /// Resolve a read of `length` bytes at guest `offset` to where its bytes are (see the module
    /// doc), or `None` where the caller should use [`Image::read_at`].
    ///
    /// # Errors
    /// Out of range or malformed metadata.
    pub fn plan_read(&self, offset: u64, length: u64) -> Result<Option<Vec<ReadPiece<'_>>>> {
        self.check_range(offset, length)?;
        let mut pieces = Vec::new();
        Ok(self.resolve(offset, length, 0, &mut pieces)?.then_some(pieces))
    }

    /// Append the pieces of `[offset, offset + length)`, which land at `at` in the caller's
    /// buffer; `false` where the range cannot be planned.
    fn resolve<'a>(&'a self, offset: u64, length: u64, at: usize, out: &mut Vec<ReadPiece<'a>>) -> Result<bool> {
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let Some((mapping, run)) = self.cached_mapping_run(pos, end - pos)? else { return Ok(false) };
            let n = run.min(end - pos);
            if n == 0 {
                return Ok(false);
            }
            let data = at + (pos - offset) as usize..at + (pos - offset + n) as usize;
            match mapping {
                Mapping::Zero => push(out, data, ReadSource::Zero),
                Mapping::Unallocated => match &self.backing {
                    None => push(out, data, ReadSource::Zero),
                    Some(backing) => {
                        // Past the end of a shorter backing file reads as zeroes.
                        let inside = backing.size().saturating_sub(pos).min(n);
                        let split = data.start + inside as usize;
                        if inside > 0 {
                            match backing {
                                Backing::Raw { file, .. } => {
                                    let source = ReadSource::File { file, host: pos, direct: false };
                                    push(out, data.start..split, source);
                                }
                                Backing::Qcow2(image) => {
                                    if !image.resolve(pos, inside, data.start, out)? {
                                        return Ok(false);
                                    }
                                }
                            }
                        }
                        if split < data.end {
                            push(out, split..data.end, ReadSource::Zero);
                        }
                    }
                },
                Mapping::Data { host, .. } => {
                    let direct = self.is_direct() && directio::is_aligned(host, n as usize);
                    push(out, data, ReadSource::File { file: self.data_file(direct), host, direct });
                }
                Mapping::Compressed { .. } => return Ok(false),
            }
            pos += n;
        }
        Ok(true)
    }
}

/// Append a piece, merged into the last one where it continues it.
fn push<'a>(out: &mut Vec<ReadPiece<'a>>, data: Range<usize>, source: ReadSource<'a>) {
    if let Some(last) = out.last_mut() {
        if last.data.end == data.start {
            let len = (last.data.end - last.data.start) as u64;
            match (&mut last.source, source) {
                (ReadSource::Zero, ReadSource::Zero) => {
                    last.data.end = data.end;
                    return;
                }
                (ReadSource::File { file: a, host: h, direct: da }, ReadSource::File { file: b, host, direct: db })
                    if std::ptr::eq(*a, b) && *h + len == host && *da == db =>
                {
                    last.data.end = data.end;
                    return;
                }
                _ => {}
            }
        }
    }
    out.push(ReadPiece { data, source });
}
