//! The data mover: one disk from a [`Source`] into a [`Sink`], sparse, pipelined, only what
//! changed.
//!
//! ## How a copy runs
//! A planner walks the disk in windows of 1 GiB, asks the source which ranges hold data (and,
//! with a dirty bitmap, which changed), and classifies each block (256 KiB by default):
//! - *clean* (the bitmap says unchanged): nothing is read; its hash is carried over;
//! - *hole* (reads as zeroes without reading): zeroed on the target only where the base had
//!   something else;
//! - *read*: read, hashed (BLAKE3), compared with the base's hash; equal blocks are skipped,
//!   all-zero blocks become `WRITE_ZEROES`, the rest are written.
//!
//! The planner feeds a bounded queue; `connections x depth` workers take items from it, each
//! with its own buffer (a request of up to `request_size`), so the source, the hashing (on the
//! blocking pool) and the network overlap. Every connection pipelines `depth` requests.
//!
//! "The base" is what the target is known to hold before the copy: all zeroes (a fresh image:
//! a full backup), unknown (write everything, zeroes as zeroes), or the block map of the last
//! committed run (an incremental into an overlay or an in-place replica).
//!
//! ## What comes out
//! The new block map (the base of the next incremental), the disk checksum when every block's
//! hash is known, and per-disk counters that the API reads while the copy runs. Blocks written
//! are recorded in a [`WrittenSet`] even when the copy fails, so the job layer can mark them
//! unknown in the committed map.
//!
//! ## Paused, to go on in another process
//! [`copy_disk`] also stops on a pause token (the node stopping gracefully): the
//! workers stop where they are, the target is flushed, and what comes out is the *resume map*:
//! for each block, what the target now holds as far as this copy knows it. A block whose
//! writes were all acknowledged has its new hash; one with an acknowledged write but not all
//! (the item was cut) is unknown; one nothing acknowledged was written to keeps the base's hash.
//! A copy started again with that map as its base skips exactly the blocks the target holds
//! already. That holds for the blocks whose write was in flight too: a block is only ever
//! written when the source differs from the base, so the resumed copy, reading the same
//! snapshot, finds it different from the base's hash again and writes it.
//!
//! The map also says which blocks the run *finished* (read, and written or found equal, every
//! write acknowledged): those whose new hash it had stored. Given as [`Base::Resume`], the next
//! run does not read them again: they count as unchanged, their hashes carried over, so a restore
//! that stopped at 90% reads the last 10% from the hub, not the whole disk again. That is only
//! right when the source still holds what it held: a backup does (it never changes), a VM's disk
//! only if its files are as they were when the run started (`source/stamp.rs`). The job layer
//! decides (`jobs/copy.rs`, `resume_base`), and otherwise gives the same map as [`Base::Map`],
//! which reads every block again and compares.
//!
//! ## Taken while it runs, for a node that is killed
//! The same map can be saved without stopping ([`Resumable::save`]): the hashes and the written
//! set read first (a chunk at a time, straight into the file: no copy of the map is held), the
//! target flushed after, and only then the file put in place, so every write the map counts is
//! on stable storage when the map is there to be used. A write acknowledged after the map was read is simply not in it:
//! its block keeps the base's hash (or unknown), and a copy resumed from the map writes it again.
//! The node saves such maps every `checkpoint_every_s` (`jobs/handover.rs`), so a node killed in
//! the middle of a disk goes on from its last checkpoint at its next start.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::blockmap::{self, BlockMap, BlockSet, Hash, MapError, ResumeMap, ZeroHashes, UNKNOWN};
use crate::blocks::Blocks;
use crate::error::MoveError;
use crate::files::Staged;
use crate::sink::Sink;
use crate::source::{Range, Source};
use crate::throttle::Throttle;

/// Planner window: how much allocation is asked for at once.
const WINDOW: u64 = 1 << 30;
/// Largest run of hole blocks handed to one worker.
const MAX_HOLE_ITEM: u64 = 1 << 30;

/// Tuning of a copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// NBD connections per disk (used when the export allows multi-conn).
    pub connections: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Largest request, in bytes (rounded down to whole blocks, at least one).
    pub request_size: u64,
    /// Change-tracking block size (a power of two from 4 KiB to 64 MiB); `None` picks
    /// [`auto_block_size`] for each disk.
    pub block_size: Option<u64>,
    /// How long a broken connection may take to come back before the copy fails.
    pub retry_window: Duration,
    /// Bandwidth limit: the job's flow of the node's bucket (`throttle.rs`), shared by its
    /// disks' workers.
    pub throttle: Option<Arc<Throttle>>,
    /// How often the job layer saves a running copy's resume map ([`Resumable`]); zero: never
    /// (a killed node then takes up nothing).
    pub checkpoint_every: Duration,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            // Measured on 2 cores against nbdcopy (benches/, node section): 4 MiB requests, two
            // per connection, beat 2 MiB x 4 and 8 MiB x 2.
            depth: 2,
            request_size: 4 << 20,
            block_size: None,
            retry_window: Duration::from_secs(120),
            throttle: None,
            // At most a minute of copying is done again after a kill; a checkpoint costs a flush
            // of the target and one write of the map (up to 128 MiB for the largest disks).
            checkpoint_every: Duration::from_secs(60),
        }
    }
}

/// The block size for a disk of `size` bytes: 64 KiB (a qcow2 cluster, qemu's dirty-bitmap
/// granularity) while the map stays within 4 Mi blocks (128 MiB of hashes, 256 GiB of disk),
/// then doubling, so that a changed cluster costs one cluster on the wire for ordinary disks
/// and the map stays bounded for huge ones.
pub fn auto_block_size(size: u64) -> u64 {
    (size / (4 << 20)).next_power_of_two().clamp(64 << 10, 64 << 20)
}

impl CopyOptions {
    /// The block size used for a disk of `size` bytes.
    pub fn block_size_for(&self, size: u64) -> u64 {
        self.block_size.unwrap_or_else(|| auto_block_size(size))
    }
}

/// What the target holds before the copy.
#[derive(Debug, Clone)]
pub enum Base {
    /// Zeroes everywhere (a fresh image or a new file).
    Zero,
    /// Unknown: every block is written (zero blocks as zeroes).
    Unknown,
    /// The last committed run's map.
    Map(BlockMap),
    /// A paused run's resume map, its finished blocks not read again (module doc).
    Resume(ResumeMap),
}

/// Live counters of one disk, read by the API while the copy runs.
#[derive(Debug)]
pub struct Progress {
    /// Disk size.
    pub bytes_total: AtomicU64,
    /// Read from the source.
    pub bytes_read: AtomicU64,
    /// Written to the target as data.
    pub bytes_sent: AtomicU64,
    /// Holes: not read, not sent.
    pub bytes_skipped_holes: AtomicU64,
    /// All-zero blocks: not sent as data.
    pub bytes_skipped_zero: AtomicU64,
    /// Equal to the base: not sent.
    pub bytes_unchanged: AtomicU64,
    /// Of `bytes_unchanged`, the blocks a run before finished ([`Base::Resume`]): not read, and
    /// left out of the rate, which would otherwise promise the rest at the speed of skipping.
    pub bytes_resumed: AtomicU64,
    started: Mutex<Option<Instant>>,
    finished: Mutex<Option<Instant>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            bytes_total: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_skipped_holes: AtomicU64::new(0),
            bytes_skipped_zero: AtomicU64::new(0),
            bytes_unchanged: AtomicU64::new(0),
            bytes_resumed: AtomicU64::new(0),
            started: Mutex::new(None),
            finished: Mutex::new(None),
        }
    }
}

/// A consistent-enough reading of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProgressSnapshot {
    /// Disk size.
    pub bytes_total: u64,
    /// Read from the source.
    pub bytes_read: u64,
    /// Sent as data.
    pub bytes_sent: u64,
    /// Holes.
    pub bytes_skipped_holes: u64,
    /// Zero blocks.
    pub bytes_skipped_zero: u64,
    /// Unchanged.
    pub bytes_unchanged: u64,
    /// Of the unchanged, finished by a run before this one.
    pub bytes_resumed: u64,
    /// Disk bytes dealt with (sent, skipped or unchanged).
    pub bytes_done: u64,
    /// Disk bytes per second since the start (those a run before finished left out).
    pub rate_bps: u64,
    /// Seconds left at that rate.
    pub eta_s: Option<u64>,
    /// Seconds since the start.
    pub elapsed_s: f64,
}

impl Progress {
    /// Snapshot with rate and ETA.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = ProgressSnapshot {
            bytes_total: get(&self.bytes_total),
            bytes_read: get(&self.bytes_read),
            bytes_sent: get(&self.bytes_sent),
            bytes_skipped_holes: get(&self.bytes_skipped_holes),
            bytes_skipped_zero: get(&self.bytes_skipped_zero),
            bytes_unchanged: get(&self.bytes_unchanged),
            bytes_resumed: get(&self.bytes_resumed),
            ..Default::default()
        };
        s.bytes_done = s.bytes_sent + s.bytes_skipped_holes + s.bytes_skipped_zero + s.bytes_unchanged;
        let started = self.started.lock().ok().and_then(|g| *g);
        let finished = self.finished.lock().ok().and_then(|g| *g);
        if let Some(start) = started {
            let elapsed = finished.unwrap_or_else(Instant::now).duration_since(start).as_secs_f64();
            s.elapsed_s = elapsed;
            if elapsed > 0.0 {
                s.rate_bps = (s.bytes_done.saturating_sub(s.bytes_resumed) as f64 / elapsed) as u64;
            }
            s.eta_s = s.bytes_total.saturating_sub(s.bytes_done).checked_div(s.rate_bps);
        }
        s
    }

    fn start(&self, total: u64) {
        self.bytes_total.store(total, Ordering::Relaxed);
        if let Ok(mut g) = self.started.lock() {
            *g = Some(Instant::now());
        }
    }

    fn finish(&self) {
        if let Ok(mut g) = self.finished.lock() {
            *g = Some(Instant::now());
        }
    }
}

/// Stops a copy's clock when dropped, on every way out of the copy.
struct ClockStop(Arc<Progress>);

impl Drop for ClockStop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// The blocks a copy has written, kept even when it fails.
#[derive(Debug, Default)]
pub struct WrittenSet {
    blocks: Mutex<BlockSet>,
}

impl WrittenSet {
    fn mark(&self, first: u64, count: u64) {
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.insert_run(first, count);
        }
    }

    /// `f` given the set, `None` if it is lost (a worker panicked holding it: every block may
    /// have been written).
    fn with<T>(&self, f: impl FnOnce(Option<&BlockSet>) -> T) -> T {
        match self.blocks.lock() {
            Ok(blocks) => f(Some(&blocks)),
            Err(_) => f(None),
        }
    }

    /// The written block indexes.
    pub fn blocks(&self) -> Vec<u64> {
        self.blocks.lock().map(|b| b.iter().collect()).unwrap_or_default()
    }
}

/// A finished copy.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The new map (hashes of blocks never seen are [`UNKNOWN`]).
    pub map: BlockMap,
    /// The disk checksum, when every block's hash is known.
    pub checksum: Option<String>,
    /// Connections re-made along the way (to the destination and from the source).
    pub reconnects: u64,
}

/// Everything one disk's workers share.
struct Shared {
    source: Arc<Source>,
    sink: Arc<Sink>,
    base: Arc<Base>,
    zero: ZeroHashes,
    size: u64,
    block_size: u64,
    hashes: Mutex<Vec<Hash>>,
    written: Arc<WrittenSet>,
    progress: Arc<Progress>,
    throttle: Option<Arc<Throttle>>,
}

impl Shared {
    fn block_len(&self, block: u64) -> u64 {
        blockmap::block_len(self.size, self.block_size, block)
    }

    fn base_hash(&self, block: u64) -> Option<Hash> {
        match &*self.base {
            Base::Zero => Some(self.zero.of_len(self.block_len(block))),
            Base::Unknown => None,
            Base::Map(m) | Base::Resume(ResumeMap { map: m, .. }) => m.hashes.get(block as usize).copied(),
        }
    }

    /// Whether a run before finished `block` ([`Base::Resume`]): it is not read again.
    fn finished_before(&self, block: u64) -> bool {
        matches!(&*self.base, Base::Resume(r) if r.done.contains(block))
    }

    /// Block `b` as a resume map has it ([`resume_map`]), given its stored hash `h` and whether
    /// a write to it began: whether it is done, and its hash there in `h`.
    fn resume_entry(&self, b: u64, h: &mut Hash, written: bool) -> bool {
        let done = *h != UNKNOWN || self.finished_before(b);
        if *h == UNKNOWN && !written {
            *h = self.base_hash(b).unwrap_or(UNKNOWN);
        }
        done
    }

    /// Blocks `first..` (as many as `hashes` holds) as a resume map has them now, for a
    /// checkpoint ([`Resumable::save`]): their stored hashes read first, the written set after,
    /// so a block whose write began in between is unknown, not the base's.
    fn resume_entries(&self, first: u64, hashes: &mut [Hash], done: &mut [bool]) {
        match self.hashes.lock() {
            Ok(all) => {
                let stored = usize::try_from(first).ok().and_then(|f| all.get(f..)).unwrap_or_default();
                for (h, s) in hashes.iter_mut().zip(stored.iter().chain(std::iter::repeat(&UNKNOWN))) {
                    *h = *s;
                }
            }
            Err(_) => hashes.fill(UNKNOWN),
        }
        self.written.with(|written| {
            for ((b, h), d) in (first..).zip(hashes.iter_mut()).zip(done.iter_mut()) {
                *d = self.resume_entry(b, h, written.is_none_or(|w| w.contains(b)));
            }
        });
    }

    fn store_hashes(&self, first: u64, hashes: &[Hash]) {
        if let Ok(mut all) = self.hashes.lock() {
            for (i, h) in hashes.iter().enumerate() {
                if let Some(slot) = all.get_mut(first as usize + i) {
                    *slot = *h;
                }
            }
        }
    }
}

/// Blocks handed to a worker.
#[derive(Debug, Clone, Copy)]
enum Item {
    Read { first: u64, count: u64 },
    Holes { first: u64, count: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Read,
    Hole,
    Clean,
}

/// Where a copy learns which blocks may differ from its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changes {
    /// Every block the source holds is read, and compared with the base where it has hashes.
    ReadAll,
    /// The source's dirty bitmap: a block it does not mark is the base's, and is not read.
    Bitmap,
}

/// How a pausable copy ended without an error.
#[derive(Debug, Clone)]
pub enum Ended {
    /// Every block dealt with, the target flushed.
    Completed(Outcome),
    /// Stopped by the pause token, the target flushed: the resume map (module doc).
    Paused(ResumeMap),
}

/// What stops a copy: `cancel` ends it for good, `pause` ends it with a resume map; and where
/// its resume map is taken while it runs.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Stop, nothing to keep.
    pub cancel: CancellationToken,
    /// Stop, flush, and say what the target holds.
    pub pause: CancellationToken,
    /// The running copy's resume map, for checkpoints (module doc).
    pub resumable: Arc<Resumable>,
}

/// Where the job layer saves a running copy's resume map (module doc, "Taken while it runs").
#[derive(Default)]
pub struct Resumable {
    /// The running copy, and the token its end cancels.
    running: Mutex<Option<(Arc<Shared>, CancellationToken)>>,
}

impl std::fmt::Debug for Resumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = self.running.lock().is_ok_and(|r| r.is_some());
        f.debug_struct("Resumable").field("running", &running).finish()
    }
}

impl Resumable {
    /// Save what the target holds now as far as the copy knows to `path`, made durable: the map
    /// is written beside `path` from the live hashes (no copy of them is made:
    /// [`ResumeMap::write_changing`]), then the target flushed, then the file put in place.
    /// `Ok(false)`, nothing written, when no copy runs, the flush failed (the copy's own next
    /// request says why) or the copy ended meanwhile (its connections are being closed: the
    /// flush must not make them again).
    ///
    /// # Errors
    /// The file could not be written.
    pub async fn save(&self, path: &Path) -> Result<bool, MapError> {
        let Some((shared, ended)) = self.running.lock().ok().and_then(|r| r.clone()) else {
            return Ok(false);
        };
        let written = {
            let (shared, path) = (Arc::clone(&shared), path.to_path_buf());
            tokio::task::spawn_blocking(move || {
                Staged::write(&path, |out| {
                    ResumeMap::write_changing(out, shared.size, shared.block_size, |first, hashes, done| {
                        shared.resume_entries(first, hashes, done);
                    })
                })
                .map_err(|source| MapError { path, source })
            })
        };
        let staged = match written.await {
            Ok(staged) => staged?,
            Err(e) => return Err(MapError { path: path.to_path_buf(), source: std::io::Error::other(e) }),
        };
        tokio::select! {
            biased;
            _ = ended.cancelled() => return Ok(false),
            flushed = shared.sink.flush() => if let Err(e) = flushed {
                tracing::debug!(error = %e, "no checkpoint: the target's flush failed");
                return Ok(false);
            },
        }
        let into = path.to_path_buf();
        match tokio::task::spawn_blocking(move || staged.commit().map_err(|source| MapError { path: into, source }))
            .await
        {
            Ok(committed) => committed.map(|()| true),
            Err(e) => Err(MapError { path: path.to_path_buf(), source: std::io::Error::other(e) }),
        }
    }
}

/// Clears a [`Resumable`] when the copy ends, however it ends, before the caller closes the
/// source and the target.
struct RunningCopy<'a>(&'a Resumable);

impl Drop for RunningCopy<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.running.lock() {
            if let Some((_, ended)) = r.take() {
                ended.cancel();
            }
        }
    }
}

/// Copy one disk; a pause ends it with the resume map ([`Ended::Paused`], module doc).
///
/// # Errors
/// The source, the target or the cancel token stopped it; blocks written so far are in
/// `written`.
#[allow(clippy::too_many_arguments)]
pub async fn copy_disk(
    source: Arc<Source>,
    sink: Arc<Sink>,
    base: Base,
    changes: Changes,
    options: &CopyOptions,
    progress: Arc<Progress>,
    written: Arc<WrittenSet>,
    tokens: Tokens,
) -> Result<Ended, MoveError> {
    let Tokens { cancel, pause, resumable } = tokens;
    let size = source.size();
    if sink.size() < size {
        return Err(MoveError::Mismatch(format!("the target holds {} bytes; the source has {size}", sink.size())));
    }
    let block_size = options.block_size_for(size);
    if !blockmap::valid_block_size(block_size) {
        return Err(MoveError::Mismatch(format!("block size {block_size} is not a power of two from 4 KiB to 64 MiB")));
    }
    let fits = |m: &BlockMap| m.disk_size == size && m.block_size == block_size;
    let base = match base {
        Base::Map(m) | Base::Resume(ResumeMap { map: m, .. }) if !fits(&m) => Base::Unknown,
        other => other,
    };
    let nblocks = blockmap::block_count(size, block_size);
    // Decided by the caller (`jobs::copy::choose_base`): never for a full copy, whatever the
    // target holds, nor for a replica whose last run was cut.
    let use_bitmap = changes == Changes::Bitmap && source.has_dirty_bitmap();
    let shared = Arc::new(Shared {
        source,
        sink,
        base: Arc::new(base),
        zero: ZeroHashes::new(size, block_size),
        size,
        block_size,
        hashes: Mutex::new(vec![UNKNOWN; nblocks as usize]),
        written,
        progress,
        throttle: options.throttle.clone(),
    });
    shared.progress.start(size);
    if let Ok(mut r) = resumable.running.lock() {
        *r = Some((Arc::clone(&shared), CancellationToken::new()));
    }
    let running = RunningCopy(&resumable);

    let connections = match &*shared.sink {
        Sink::Nbd(pool) => pool.connections(),
        Sink::File(_) | Sink::Qcow2(_) => options.connections.max(1),
    };
    let workers = (connections * options.depth.max(1)).max(1);
    let per_item = (options.request_size / block_size).max(1);
    let stop = cancel.child_token();
    let pause_watch = {
        let (pause, stop) = (pause.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = pause.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(workers * 2);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let first_error: Arc<Mutex<Option<MoveError>>> = Arc::default();

    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (shared, rx, stop, first_error) =
            (Arc::clone(&shared), Arc::clone(&rx), stop.clone(), Arc::clone(&first_error));
        tasks.spawn(async move {
            let mut buf = Vec::new();
            loop {
                let item = {
                    let mut rx = rx.lock().await;
                    tokio::select! {
                        _ = stop.cancelled() => None,
                        item = rx.recv() => item,
                    }
                };
                let Some(item) = item else { return };
                let result = tokio::select! {
                    _ = stop.cancelled() => Err(MoveError::Cancelled),
                    r = process(&shared, w, item, &mut buf) => r,
                };
                if let Err(e) = result {
                    if let Ok(mut slot) = first_error.lock() {
                        if slot.is_none() && !matches!(e, MoveError::Cancelled) {
                            *slot = Some(e);
                        }
                    }
                    stop.cancel();
                    return;
                }
            }
        });
    }

    let planned = tokio::select! {
        _ = stop.cancelled() => Err(MoveError::Cancelled),
        r = plan(&shared, nblocks, per_item, use_bitmap, &tx) => r,
    };
    drop(tx);
    if planned.is_err() {
        stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
    pause_watch.abort();
    // The copy's time and rate count its final flush: the copy is not done until it is durable.
    let _clock = ClockStop(shared.progress.clone());

    let worker_error = first_error.lock().ok().and_then(|mut e| e.take());
    if cancel.is_cancelled() {
        return Err(MoveError::Cancelled);
    }
    if let Some(e) = worker_error {
        return Err(e);
    }
    let paused = pause.is_cancelled();
    if !paused {
        planned?;
    }
    // Every write acknowledged so far made durable: a pause hands them to the next run.
    tokio::select! {
        _ = cancel.cancelled() => return Err(MoveError::Cancelled),
        r = shared.sink.flush() => r?,
    }
    // No checkpoint reads the hashes from here on (one that did is told the copy ended), so they
    // are taken, not copied.
    drop(running);
    let hashes = shared.hashes.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
    if paused {
        return Ok(Ended::Paused(resume_map(&shared, hashes)));
    }
    let map = BlockMap { disk_size: size, block_size, hashes };
    let checksum = (!map.hashes.contains(&UNKNOWN)).then(|| map.checksum());
    Ok(Ended::Completed(Outcome { map, checksum, reconnects: shared.sink.reconnects() + shared.source.reconnects() }))
}

/// What the target holds after a pause (module doc): the new hash of a block done, unknown for
/// a block written in part, the base's hash for one nothing was acknowledged for; and the blocks
/// done: those whose new hash was stored (a block's hash is stored once all its writes are
/// acknowledged, or when it is clean), and those a run before finished, which this run never
/// writes, also where its planner has not come to them yet.
fn resume_map(shared: &Shared, mut hashes: Vec<Hash>) -> ResumeMap {
    let mut done = BlockSet::default();
    shared.written.with(|written| {
        for (b, h) in (0u64..).zip(hashes.iter_mut()) {
            if shared.resume_entry(b, h, written.is_none_or(|w| w.contains(b))) {
                done.insert_run(b, 1);
            }
        }
    });
    ResumeMap { map: BlockMap { disk_size: shared.size, block_size: shared.block_size, hashes }, done }
}

/// Walk the disk, classify blocks, and queue the work.
async fn plan(
    shared: &Shared,
    nblocks: u64,
    per_item: u64,
    use_bitmap: bool,
    tx: &tokio::sync::mpsc::Sender<Item>,
) -> Result<(), MoveError> {
    let bs = shared.block_size;
    let mut block = 0u64;
    let mut pending: Option<(Class, u64, u64)> = None; // class, first, count
    while block < nblocks {
        let start = block * bs;
        let want = WINDOW.min(shared.size - start);
        let window_end = nblocks.min(block + WINDOW / bs);
        if (block..window_end).all(|b| shared.finished_before(b)) {
            // Nothing to ask the source about (for a restore, a round trip to the hub).
            for b in block..window_end {
                pending = add(shared, pending, Class::Clean, b, per_item, tx).await?;
            }
            block = window_end;
            continue;
        }
        let alloc = shared.source.allocation(start, want).await?;
        let mut covered = alloc.iter().map(|r| r.length).sum::<u64>().min(want);
        let dirty = if use_bitmap {
            let d = shared.source.dirty(start, covered.max(1)).await?;
            covered = covered.min(d.iter().map(|r| r.length).sum());
            Some(d)
        } else {
            None
        };
        let end = start + covered;
        let end_block = if end >= shared.size { nblocks } else { end / bs };
        let classes: Vec<Class> = if end_block <= block {
            vec![Class::Read] // an answer shorter than a block: read it
        } else {
            classify(start, bs, end_block - block, &alloc, dirty.as_deref())
        };
        for class in classes {
            let class = if shared.finished_before(block) { Class::Clean } else { class };
            pending = add(shared, pending, class, block, per_item, tx).await?;
            block += 1;
        }
    }
    if let Some(run) = pending {
        emit(shared, run, tx).await?;
    }
    Ok(())
}

/// Add `block` of `class` to the run being gathered, or emit that run and start another.
async fn add(
    shared: &Shared,
    pending: Option<(Class, u64, u64)>,
    class: Class,
    block: u64,
    per_item: u64,
    tx: &tokio::sync::mpsc::Sender<Item>,
) -> Result<Option<(Class, u64, u64)>, MoveError> {
    Ok(match pending {
        Some((c, first, count))
            if c == class
                && (class != Class::Read || count < per_item)
                && count * shared.block_size < MAX_HOLE_ITEM =>
        {
            Some((c, first, count + 1))
        }
        Some(run) => {
            emit(shared, run, tx).await?;
            Some((class, block, 1))
        }
        None => Some((class, block, 1)),
    })
}

async fn emit(
    shared: &Shared,
    (class, first, count): (Class, u64, u64),
    tx: &tokio::sync::mpsc::Sender<Item>,
) -> Result<(), MoveError> {
    let item = match class {
        Class::Read => Item::Read { first, count },
        Class::Hole => Item::Holes { first, count },
        Class::Clean => {
            let (mut bytes, mut resumed) = (0, 0);
            let hashes: Vec<Hash> = (first..first + count)
                .map(|b| {
                    bytes += shared.block_len(b);
                    if shared.finished_before(b) {
                        resumed += shared.block_len(b);
                    }
                    shared.base_hash(b).unwrap_or(UNKNOWN)
                })
                .collect();
            shared.store_hashes(first, &hashes);
            shared.progress.bytes_unchanged.fetch_add(bytes, Ordering::Relaxed);
            shared.progress.bytes_resumed.fetch_add(resumed, Ordering::Relaxed);
            return Ok(());
        }
    };
    tx.send(item).await.map_err(|_| MoveError::Cancelled)
}

/// Classify `count` blocks from `start` given allocation (and dirty) ranges that begin there.
fn classify(start: u64, bs: u64, count: u64, alloc: &[Range], dirty: Option<&[Range]>) -> Vec<Class> {
    let data = intervals(start, alloc);
    let dirty = dirty.map(|d| intervals(start, d));
    (0..count)
        .map(|i| {
            let (s, e) = (start + i * bs, start + (i + 1) * bs);
            if let Some(d) = &dirty {
                if !overlaps(d, s, e) {
                    return Class::Clean;
                }
            }
            if overlaps(&data, s, e) {
                Class::Read
            } else {
                Class::Hole
            }
        })
        .collect()
}

/// Absolute `[s, e)` of the ranges marked `data`.
fn intervals(start: u64, ranges: &[Range]) -> Vec<(u64, u64)> {
    let mut at = start;
    let mut out = Vec::new();
    for r in ranges {
        if r.data {
            out.push((at, at + r.length));
        }
        at += r.length;
    }
    out
}

fn overlaps(intervals: &[(u64, u64)], s: u64, e: u64) -> bool {
    let i = intervals.partition_point(|&(_, end)| end <= s);
    intervals.get(i).is_some_and(|&(start, _)| start < e)
}

/// What to do with one block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    Skip,
    Zero,
    Data,
}

async fn process(shared: &Shared, worker: usize, item: Item, buf: &mut Vec<u8>) -> Result<(), MoveError> {
    let bs = shared.block_size;
    match item {
        Item::Holes { first, count } => {
            let mut acts = Vec::with_capacity(count as usize);
            let mut hashes = Vec::with_capacity(count as usize);
            for b in first..first + count {
                let zero = shared.zero.of_len(shared.block_len(b));
                hashes.push(zero);
                if shared.base_hash(b) == Some(zero) {
                    acts.push(Act::Skip);
                    shared.progress.bytes_skipped_holes.fetch_add(shared.block_len(b), Ordering::Relaxed);
                } else {
                    acts.push(Act::Zero);
                }
            }
            let none = Blocks::from_pieces(Vec::new());
            send_runs(shared, worker, first, &acts, &none, &shared.progress.bytes_skipped_holes).await?;
            shared.store_hashes(first, &hashes);
            Ok(())
        }
        Item::Read { first, count } => {
            let offset = first * bs;
            let len = (count * bs).min(shared.size - offset) as usize;
            let (data, hashes) = shared.source.read_hashed(worker, offset, len, buf, bs).await?;
            shared.progress.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            let mut acts = Vec::with_capacity(hashes.len());
            for (i, h) in hashes.iter().enumerate() {
                let b = first + i as u64;
                let blen = shared.block_len(b);
                let is_zero = *h == shared.zero.of_len(blen);
                if shared.base_hash(b) == Some(*h) {
                    acts.push(Act::Skip);
                    let counter = if matches!(*shared.base, Base::Zero) {
                        &shared.progress.bytes_skipped_zero
                    } else {
                        &shared.progress.bytes_unchanged
                    };
                    counter.fetch_add(blen, Ordering::Relaxed);
                } else if is_zero {
                    acts.push(Act::Zero);
                } else {
                    acts.push(Act::Data);
                }
            }
            // The sink takes slices of the pieces, not copies (`blocks`). A buffer read into comes
            // back for the next read once they are done with it (a fresh one is allocated in the
            // rare case one is still held).
            send_runs(shared, worker, first, &acts, &data, &shared.progress.bytes_skipped_zero).await?;
            shared.store_hashes(first, &hashes);
            if let Some(back) = data.into_buffer() {
                *buf = back;
            }
            Ok(())
        }
    }
}

/// Send consecutive runs of equal acts starting at block `first`; `data` holds the blocks' bytes
/// for data runs. Counters move only once the target has acknowledged a run: data runs count as
/// sent, zero runs into `zeroed`.
async fn send_runs(
    shared: &Shared,
    worker: usize,
    first: u64,
    acts: &[Act],
    data: &Blocks,
    zeroed: &AtomicU64,
) -> Result<(), MoveError> {
    let bs = shared.block_size;
    let mut i = 0usize;
    while i < acts.len() {
        let act = acts.get(i).copied().unwrap_or(Act::Skip);
        let mut j = i + 1;
        while acts.get(j) == Some(&act) {
            j += 1;
        }
        let (b0, n) = (first + i as u64, (j - i) as u64);
        let offset = b0 * bs;
        let len = (n * bs).min(shared.size - offset);
        match act {
            Act::Skip => {}
            Act::Zero => {
                shared.sink.write_zeroes(worker, offset, len).await?;
                shared.written.mark(b0, n);
                zeroed.fetch_add(len, Ordering::Relaxed);
            }
            Act::Data => {
                let from = i * bs as usize;
                if let Some(t) = &shared.throttle {
                    t.acquire(len).await;
                }
                shared.sink.write(worker, offset, data, from..from + len as usize).await?;
                shared.written.mark(b0, n);
                shared.progress.bytes_sent.fetch_add(len, Ordering::Relaxed);
            }
        }
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_classified_by_allocation_and_bitmap() {
        let bs = 4096;
        let alloc = [
            Range { length: 4096, data: true },
            Range { length: 8192, data: false },
            Range { length: 100, data: true },
            Range { length: 8092, data: false },
        ];
        let got = classify(0, bs, 5, &alloc, None);
        assert!(got == vec![Class::Read, Class::Hole, Class::Hole, Class::Read, Class::Hole]);
        let dirty = [Range { length: 4096 * 3, data: false }, Range { length: 8192, data: true }];
        let got = classify(0, bs, 5, &alloc, Some(&dirty));
        assert!(got == vec![Class::Clean, Class::Clean, Class::Clean, Class::Read, Class::Hole]);
    }

    #[test]
    fn the_automatic_block_size_keeps_the_map_bounded() {
        assert_eq!(auto_block_size(2 << 30), 64 << 10);
        assert_eq!(auto_block_size(256 << 30), 64 << 10);
        assert_eq!(auto_block_size(1 << 40), 256 << 10);
        assert_eq!(auto_block_size(1000), 64 << 10);
        assert!(blockmap::block_count(64 << 40, auto_block_size(64 << 40)) <= 4 << 20);
    }

    /// A map taken as a resumed copy starts, before its planner has walked anything, still names
    /// every block the run before finished, with the hashes it had for them.
    #[tokio::test]
    async fn a_resumed_copy_s_map_keeps_what_the_run_before_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("disk.raw"), dir.path().join("copy.raw"));
        std::fs::write(&src, vec![3u8; 8 * 4096]).unwrap();
        let spec = crate::source::SourceSpec::Path {
            path: src,
            format: Some(crate::api::DiskFormat::Raw),
            dirty_bitmap: None,
        };
        let source = Arc::new(Source::open(&spec, 1, CancellationToken::new()).await.unwrap());
        let (sink, _) = crate::sink::FileSink::create(&dest, source.size()).unwrap();
        let mut before = ResumeMap { map: BlockMap::zeroed(8 * 4096, 4096), done: BlockSet::default() };
        before.done.insert_run(0, 3);
        before.map.hashes[..3].fill(blockmap::hash_block(&[3u8; 4096]));
        let shared = Shared {
            source,
            sink: Arc::new(Sink::File(sink)),
            base: Arc::new(Base::Resume(before.clone())),
            zero: ZeroHashes::new(8 * 4096, 4096),
            size: 8 * 4096,
            block_size: 4096,
            hashes: Mutex::new(vec![UNKNOWN; 8]),
            written: Arc::default(),
            progress: Arc::default(),
            throttle: None,
        };
        let mut hashes = vec![UNKNOWN; 8];
        hashes[5] = blockmap::hash_block(&[3u8; 4096]); // finished by this run
        shared.written.mark(6, 1); // written in part
        let map = resume_map(&shared, hashes);
        assert_eq!(map.done.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5]);
        assert_eq!(map.map.hashes[..3], before.map.hashes[..3]);
        assert_eq!(map.map.hashes[6], UNKNOWN);
        assert_eq!(map.map.hashes[7], before.map.hashes[7], "nothing acknowledged: the base's hash");
    }

    #[test]
    fn written_blocks_are_remembered() {
        let w = WrittenSet::default();
        w.mark(3, 2);
        w.mark(130, 1);
        assert_eq!(w.blocks(), vec![3, 4, 130]);
    }
}
