//! One disk's copy in a backup or replicate job: which base it is copied against (the pure
//! policy [`choose_base`]), the replica-run marker that says a target is being written in
//! place, the copy itself, and the change-tracking state it leaves: a pending map for `commit`
//! when it completes, the resume map when a stopping node paused it (the next start goes on
//! from it, with the choice made the first time, reading again what the stopped run finished
//! only if the source changed meanwhile: [`resume_base`]), or the blocks it wrote marked
//! unknown in the committed map when it fails (so a replica gets them again next time). Map
//! loads and saves wait for the disk: they run on the blocking pool.

use std::path::Path;
use std::sync::Arc;

use super::{off_runtime, set_disk, sync_dir, DiskJob, Job, JobKind, Jobs};
use crate::api::{BackupType, CopyMode};
use crate::blockmap::{BlockMap, ResumeMap, UNKNOWN};
use crate::error::MoveError;
use crate::mover::{self, Base, Ended, Tokens, WrittenSet};
use crate::pool::{Endpoint, NbdPool};
use crate::sink::Sink;
use crate::source::{Source, SourceStamp};

/// The base a disk is copied against, the mode reported, and why.
#[derive(Debug, Clone)]
pub struct BaseChoice {
    /// The base.
    pub base: Base,
    /// Mode shown in the status.
    pub mode: CopyMode,
    /// Why a full copy replaced an incremental, or why an incremental reads every block (its
    /// source's bitmap cannot be trusted).
    pub reason: Option<String>,
    /// `bitmap`, `hashes` or `none`.
    pub change_source: &'static str,
}

/// Decide how a disk is copied: pure, tested on its own.
///
/// - full: the target is a fresh image, so the base is all zeroes;
/// - incremental with a committed map of the same geometry and a dirty bitmap: only dirty
///   blocks are read;
/// - incremental with a committed map of the same geometry: hashes decide;
/// - otherwise a full copy that writes every block, zeroes included (the target may be an
///   overlay or a replica holding other data), with the reason. A bitmap alone is not enough:
///   without the committed state nothing says the target holds the blocks it leaves out (a
///   resized disk gets a fresh image from the hub, which a bitmap's clean blocks would have left
///   empty).
pub fn choose_base(
    backup_type: BackupType,
    committed: Option<BlockMap>,
    source_size: u64,
    block_size: u64,
    has_bitmap: bool,
) -> BaseChoice {
    let full = |base, reason: Option<&str>| BaseChoice {
        base,
        mode: CopyMode::Full,
        reason: reason.map(str::to_string),
        change_source: "none",
    };
    if backup_type == BackupType::Full {
        return full(Base::Zero, None);
    }
    let committed = committed.filter(|m| m.disk_size == source_size && m.block_size == block_size);
    match (has_bitmap, committed) {
        (true, Some(map)) => {
            BaseChoice { base: Base::Map(map), mode: CopyMode::Incremental, reason: None, change_source: "bitmap" }
        }
        (false, Some(map)) => {
            BaseChoice { base: Base::Map(map), mode: CopyMode::Incremental, reason: None, change_source: "hashes" }
        }
        (_, None) => full(
            Base::Unknown,
            Some("no committed change-tracking state for this disk (new disk, resized disk, or first run): full copy"),
        ),
    }
}

impl Jobs {
    pub(super) async fn copy_one(
        &self,
        job: &Job,
        index: usize,
        vm: &str,
        disk: &crate::config::Disk,
        endpoint: Endpoint,
        backup_type: BackupType,
    ) -> Result<(), String> {
        let Some(dj) = job.disks.get(index) else { return Err("internal: disk index".into()) };
        // Paused by the node's last stop: what the target holds, the choice made then, and the
        // source's files when the run started (the base is decided once the source is open).
        let resumed = dj.state.lock().ok().and_then(|mut s| {
            let map = super::owned(s.resume.take()?);
            let choice = BaseChoice {
                base: Base::Unknown,
                mode: s.mode,
                reason: s.mode_reason.clone(),
                change_source: s.change_source,
            };
            Some((map, s.source_stamp.clone(), choice))
        });
        set_disk(dj, "running", None, None);
        let settings = self.settings();
        let opts = &job.copy_options(&settings.copy);
        let fail = |e: MoveError| {
            let status = if matches!(e, MoveError::Cancelled) { "cancelled" } else { "failed" };
            set_disk(dj, status, None, Some(e.to_string()));
            format!("disk {}: {e}", disk.key)
        };
        let source = tokio::select! {
            _ = job.cancel.cancelled() => Err(MoveError::Cancelled),
            s = Source::open(&disk.source, opts.connections, job.cancel.clone()) => s,
        }
        .map_err(fail)?;
        if !self.settings().vm(vm).is_some_and(|v| v.force_share) {
            source.refuse_if_being_written().await.map_err(fail)?;
        }
        let stamp = source.stamp().await;
        if resumed.is_none() {
            if let Ok(mut s) = dj.state.lock() {
                s.source_stamp.clone_from(&stamp);
            }
        }
        let source = Arc::new(source);
        let map_path = self.map_path(vm, job.kind, disk.key);
        // Read and checked (BLAKE3) off the runtime: a large disk's map is megabytes.
        let at = map_path.clone();
        let mut committed = off_runtime(move || BlockMap::load(&at)).await.ok().flatten();
        // A replica is written in place: a run that stopped without accounting for what it wrote
        // (the node was killed) or was never committed leaves the target ahead of the committed
        // map, so the map cannot be trusted. The marker lives from the start of a replica copy
        // until its commit (or until a failure has marked its blocks).
        let inflight = map_path.with_extension("map.inflight");
        let interrupted = job.kind == JobKind::Replicate && inflight.exists() && resumed.is_none();
        if interrupted {
            committed = None;
        }
        if job.kind == JobKind::Replicate {
            let (marker, id) = (inflight.clone(), job.id.clone());
            off_runtime(move || {
                crate::files::create_private_dir(marker.parent().unwrap_or(Path::new(".")))
                    .and_then(|()| std::fs::write(&marker, id.as_bytes()))
                    .and_then(|()| sync_dir(&marker))
            })
            .await
            .and_then(|made| made)
            .map_err(|e| fail(MoveError::Destination { what: "replica run marker".into(), source: e }))?;
        }
        let sink = tokio::select! {
            _ = job.cancel.cancelled() => Err(MoveError::Cancelled),
            p = NbdPool::connect(endpoint, opts.connections, opts.retry_window, job.cancel.clone()) => p,
        }
        .map_err(fail)?;
        let was_resumed = resumed.is_some();
        let choice = match resumed {
            Some((map, at_start, mut choice)) => {
                choice.base = resume_base(map, at_start.as_ref(), stamp.as_ref());
                if matches!(choice.base, Base::Map(_)) {
                    let why = match (at_start, stamp) {
                        (Some(_), Some(_)) => "the source's files changed while the node was stopped",
                        _ => "nothing tells whether the source was written while the node was stopped",
                    };
                    let note = format!("taken up after a stop: {why}, so every block is read again and compared");
                    tracing::info!(job = %job.id, disk = disk.key, "{note}");
                    choice.reason = Some(match choice.reason.take() {
                        Some(first) => format!("{first}; {note}"),
                        None => note,
                    });
                }
                choice
            }
            None => self.choose(&source, &sink, committed.clone(), backup_type, interrupted).await.map_err(fail)?,
        };
        set_choice(dj, &choice);
        tracing::info!(job = %job.id, disk = disk.key, mode = ?choice.mode, changes = choice.change_source, reason = ?choice.reason, "copying disk");
        let sink = Arc::new(Sink::Nbd(sink));
        let written = Arc::new(WrittenSet::default());
        let changes = match choice.change_source {
            "bitmap" => mover::Changes::Bitmap,
            _ => mover::Changes::ReadAll,
        };
        let tokens =
            Tokens { cancel: job.cancel.clone(), pause: job.pause.clone(), resumable: Arc::clone(&dj.resumable) };
        let result = mover::copy_disk(
            Arc::clone(&source),
            Arc::clone(&sink),
            choice.base,
            changes,
            opts,
            Arc::clone(&dj.progress),
            Arc::clone(&written),
            tokens,
        )
        .await;
        sink.close().await;
        source.close().await;
        match result {
            Ok(Ended::Paused(map)) => {
                // The replica marker stays: the run is not over.
                if let Ok(mut s) = dj.state.lock() {
                    s.status = "paused";
                    s.resume = Some(Arc::new(map));
                    s.checkpointed = false;
                }
                Ok(())
            }
            Ok(Ended::Completed(outcome)) => {
                let pending = map_path.with_extension(format!("map.pending-{}", job.id));
                let (map, at) = (outcome.map, pending.clone());
                off_runtime(move || map.save(&at))
                    .await
                    .map_err(|e| fail(MoveError::Destination { what: "change-tracking state".into(), source: e }))?
                    .map_err(|e| fail(e.into_move_error()))?;
                if let Ok(mut s) = dj.state.lock() {
                    s.status = "completed";
                    s.checksum = outcome.checksum;
                    s.reconnects = outcome.reconnects;
                    s.pending_map = Some(pending);
                }
                self.record_changed.notify_one();
                Ok(())
            }
            Err(e) if was_resumed => {
                // Blocks the run before the stop wrote are not in `written`: the marker stays,
                // and the next replica run writes every block.
                Err(fail(e))
            }
            Err(e) => {
                if let Some(mut map) = committed {
                    let blocks = written.blocks();
                    if !blocks.is_empty() {
                        for b in blocks {
                            if let Some(h) = map.hashes.get_mut(b as usize) {
                                *h = UNKNOWN;
                            }
                        }
                        let at = map_path.clone();
                        let saved = off_runtime(move || map.save(&at))
                            .await
                            .map_err(|e| MoveError::Destination { what: "change-tracking state".into(), source: e });
                        if let Err(e) = saved.and_then(|s| s.map_err(|e| e.into_move_error())) {
                            tracing::error!(error = %e, "could not mark written blocks in the committed map");
                            return Err(fail(e));
                        }
                    }
                }
                // What this run wrote is accounted for in the committed map now.
                let _ = std::fs::remove_file(&inflight);
                Err(fail(e))
            }
        }
    }
}

/// The base of a disk's copy taken up from a stop, `map` what the stopped run left: the blocks it
/// finished are not read again ([`Base::Resume`]) only when the source's files are as they were
/// when the run started (`source/stamp.rs`). Otherwise (a block device or an NBD export, which
/// have no stamp, or files written or replaced meanwhile: a host restarted and its VM wrote the
/// disk, a snapshot made again at the same path) every block is read again and compared with the
/// map ([`Base::Map`]): read whole after the start, the copy is of one point in time.
pub fn resume_base(map: ResumeMap, at_start: Option<&SourceStamp>, now: Option<&SourceStamp>) -> Base {
    match (at_start, now) {
        (Some(then), Some(now)) if then == now => Base::Resume(map),
        _ => Base::Map(map.map),
    }
}

impl Jobs {
    /// The base of a disk's copy that is not taken up from a stop: [`choose_base`] with what the
    /// source and target tell.
    async fn choose(
        &self,
        source: &Source,
        sink: &NbdPool,
        committed: Option<BlockMap>,
        backup_type: BackupType,
        interrupted: bool,
    ) -> Result<BaseChoice, MoveError> {
        // A replica run that was cut left blocks nobody accounted for: not even the bitmap
        // knows them (the hooks may have started a new one), so every block is written.
        let mut choice = choose_base(
            backup_type,
            committed,
            source.size(),
            self.settings().copy.block_size_for(source.size()),
            source.has_dirty_bitmap() && !interrupted,
        );
        if let Some(note) = source.bitmap_note().filter(|_| choice.mode == CopyMode::Incremental) {
            choice.reason = Some(note.to_string());
        }
        if interrupted && choice.mode == CopyMode::Full && backup_type == BackupType::Incremental {
            choice.reason =
                Some("the previous replica run did not finish or was not committed: every block is written".into());
        }
        if matches!(choice.base, Base::Zero) && !sink.reads_as_zero().await? {
            // A "full" into a target that already holds data (an overlay, a reused replica):
            // zero blocks must be written too.
            choice.base = Base::Unknown;
            choice.reason = Some("the target is not empty: every block is written, zeroes included".into());
        }
        Ok(choice)
    }
}

fn set_choice(d: &DiskJob, c: &BaseChoice) {
    if let Ok(mut s) = d.state.lock() {
        s.mode = c.mode;
        s.mode_reason.clone_from(&c.reason);
        s.change_source = c.change_source;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_follows_the_request_and_the_state() {
        let map = BlockMap::zeroed(1 << 20, 1 << 18);
        let c = choose_base(BackupType::Full, Some(map.clone()), 1 << 20, 1 << 18, true);
        assert!(matches!(c.base, Base::Zero) && c.mode == CopyMode::Full && c.reason.is_none());
        let c = choose_base(BackupType::Incremental, Some(map.clone()), 1 << 20, 1 << 18, false);
        assert!(matches!(c.base, Base::Map(_)) && c.mode == CopyMode::Incremental && c.change_source == "hashes");
        let c = choose_base(BackupType::Incremental, None, 1 << 20, 1 << 18, false);
        assert!(matches!(c.base, Base::Unknown) && c.mode == CopyMode::Full && c.reason.is_some());
        let c = choose_base(BackupType::Incremental, Some(map.clone()), 2 << 20, 1 << 18, false);
        assert!(matches!(c.base, Base::Unknown) && c.mode == CopyMode::Full, "a resized disk is copied in full");
        let c = choose_base(BackupType::Incremental, Some(map.clone()), 1 << 20, 1 << 18, true);
        assert!(matches!(c.base, Base::Map(_)) && c.mode == CopyMode::Incremental && c.change_source == "bitmap");
        // A bitmap without the committed state, or with the state of another size: every block.
        let c = choose_base(BackupType::Incremental, None, 1 << 20, 1 << 18, true);
        assert!(matches!(c.base, Base::Unknown) && c.mode == CopyMode::Full && c.change_source == "none");
        let c = choose_base(BackupType::Incremental, Some(map), 2 << 20, 1 << 18, true);
        assert!(matches!(c.base, Base::Unknown) && c.mode == CopyMode::Full, "a resized disk is copied in full: {c:?}");
    }

    #[test]
    fn a_resumed_copy_skips_what_was_finished_only_from_files_as_they_were() {
        let stamp = |ctime_ns: i64| -> SourceStamp {
            let file = serde_json::json!({"dev": 2049, "ino": 12, "size": 1 << 20, "ctime_s": 1_764_600_000, "ctime_ns": ctime_ns});
            serde_json::from_value(serde_json::json!({ "files": [file] })).unwrap()
        };
        let mut done = crate::blockmap::BlockSet::default();
        done.insert_run(0, 2);
        let map = ResumeMap { map: BlockMap::zeroed(1 << 20, 1 << 18), done };
        let base = resume_base(map.clone(), Some(&stamp(5)), Some(&stamp(5)));
        assert!(matches!(base, Base::Resume(r) if r == map), "the same files");
        for (then, now) in
            [(Some(stamp(5)), Some(stamp(6))), (None, Some(stamp(5))), (Some(stamp(5)), None), (None, None)]
        {
            let base = resume_base(map.clone(), then.as_ref(), now.as_ref());
            assert!(matches!(&base, Base::Map(m) if *m == map.map), "{then:?} -> {now:?}: read whole");
        }
    }
}
