//! Backups, replications and restores handed over from a node that stops to the node that starts
//! next: a graceful stop (`SIGTERM`: `systemctl restart sendense-node` to upgrade it, or to take
//! up a change only a restart takes up) no longer fails the runs under way, which for a
//! multi-terabyte disk meant copying it again, and the hub's run with it.
//!
//! How. A stopping node pauses its copies instead of cancelling them: each disk's workers stop
//! where they are, the target is flushed, and the copy leaves its resume map (`mover`: per block,
//! what the target holds as far as the copy knows). The post-snapshot hook does not run: the
//! snapshot stays for the next start. Then `STATE_DIR/.jobs-handed-over.json` is written: each job
//! (the hub's request, as it came), each disk's stage (not started, paused, completed) and the
//! choice its copy made (mode, change source); the resume maps beside the committed maps
//! (`disk-KEY.map.resume-JOB`, checked on load like every map). A job completed but not yet
//! committed by the hub (the hub verifies first) is handed over too, so its commit still finds it.
//! A restore pauses the same way: the file it writes beside its destination (`.NAME.restoring`,
//! flushed; a qcow2 image closed clean) is kept for the next start, which goes on writing it and
//! only then puts it in the destination's place; a restore completed in the last ten minutes is
//! handed over so the hub still reads its checksums. (A completed copy is handed over until the hub
//! commits it or starts the VM's next run of that kind.)
//!
//! The next start reads and removes the record before its API serves anything, so the hub, which
//! kept polling while the node was away (it waits `stall_timeout_s` for a node it cannot reach),
//! finds the same job ids running again: a paused disk goes on from its resume map (what the target
//! holds already not sent; the blocks the stopped run finished not read again, unless the source's
//! files changed meanwhile: `mover`, `source/stamp.rs`), a disk not started starts, the post hook
//! runs at the end as it would have. The node's checksum at the end, compared by the hub with the
//! image it holds, still decides. A job that cannot be taken up (its VM or a disk left the
//! configuration, a target is no longer reachable by its rules, a map is missing or damaged) is
//! dropped: the hub learns that its node no longer knows the job and fails the run; the VM's post
//! hook runs so its snapshot is released (a restore's file beside is removed, its destination as it
//! was).
//!
//! Checkpoints, for a node that is killed (a crash, the OOM killer, its host's power cut): while
//! jobs run the same record is kept up to date (`keep_checkpoints`): written again whenever a job
//! starts, changes phase, completes a disk or ends, and every `checkpoint_every_s` (60 s by
//! default) with each running disk's resume map taken without stopping the copy (`mover`,
//! "Taken while it runs": the map read, then the target flushed, so it counts only what is on
//! stable storage). A killed node's next start takes up what its last checkpoint names, as above:
//! at most one interval of copying is done again. The record says where each job stood between
//! its snapshot hooks (`Phase`): a job whose pre-snapshot hook was running is dropped and its
//! post hook run (to undo what the pre hook did); a job whose post hook had started is not named
//! (the record is written before that hook runs, not after: a snapshot being released must not
//! be read again). A map a checkpoint saved stays true for the rest of its run: a block the run
//! writes afterwards holds what the source holds, and a resumed copy that finds the map's older
//! hash there only sends it again. Maps of runs that ended are removed once a record that does
//! not name them is on disk. `checkpoint_every_s = 0` turns checkpoints off: a killed node then
//! takes nothing up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::restore::remove_interrupted_restores;
use super::{off_runtime, sync_dir, DiskJob, Job, JobKind, JobRequest, Jobs, Phase};
use crate::api::{CopyMode, JobStatus, RestoreRequest, StartRequest};
use crate::blockmap::ResumeMap;
use crate::files::Replacement;

/// The record, in the state directory.
const RECORD: &str = ".jobs-handed-over.json";

/// A completed restore is handed over for this long after it ended, for a hub that has not
/// looked at it yet (it polls every second or so while a restore runs).
const RESTORE_SEEN_WITHIN: Duration = Duration::from_secs(600);

/// How long a stop waits for its copies to pause (the requests in flight answered, the targets
/// flushed) and its cancelled jobs to end: within systemd's `TimeoutStopSec` (deploy unit).
pub const PAUSE_WITHIN: Duration = Duration::from_secs(60);

/// What the last start took up, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TakenUp {
    /// Jobs going on (or kept, completed, for their commit).
    pub resumed: u64,
    /// Jobs in the record that could not be taken up.
    pub dropped: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// Written by a graceful stop; otherwise a checkpoint, which a killed node left.
    #[serde(default)]
    stopped: bool,
    jobs: Vec<HandedJob>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HandedJob {
    run: HandedRun,
    /// Completed on this node (a copy waiting for the hub's commit, a restore for the hub's look).
    completed: bool,
    /// Its pre-snapshot hook was running: the next start runs the post hook and drops the job.
    #[serde(default)]
    snapshotting: bool,
    disks: Vec<HandedDisk>,
}

/// How the checkpoints went, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Records written by checkpoints.
    pub written: u64,
    /// Checkpoints that could not be written (the state directory's disk full or failing).
    pub failed: u64,
    /// When the running disks' resume maps were last saved (Unix seconds; 0: not yet).
    pub maps_at: u64,
}

/// Who writes the record now, and whether the node is stopping (no checkpoint after the stop's
/// record).
#[derive(Debug, Default)]
pub(super) struct RecordWriter {
    /// [`Jobs::keep_checkpoints`] runs (an embedder that does not run it gets no record).
    checkpoints: bool,
    stopped: bool,
}

/// Which record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// A graceful stop's: the jobs it paused.
    Stop,
    /// A checkpoint's: the jobs running; `maps`: each running disk's resume map taken now.
    Checkpoint { maps: bool },
}

/// What a job was asked, in the record's terms.
fn handed_run(j: &Job) -> HandedRun {
    match (&j.request, j.kind) {
        (JobRequest::Copy(r), JobKind::Replicate) => HandedRun::Replicate(r.clone()),
        (JobRequest::Copy(r), _) => HandedRun::Backup(r.clone()),
        (JobRequest::Restore(r), _) => HandedRun::Restore(r.clone()),
    }
}

/// Remove every resume map in `state_dir` (copies' beside their change-tracking state,
/// restores' in `.restore-maps`) that `keep` does not name: those of runs that ended.
fn remove_resume_maps_but(state_dir: &std::path::Path, keep: &[PathBuf]) {
    let mut dirs = vec![state_dir.join(".restore-maps")];
    for vm in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        dirs.extend([JobKind::Backup, JobKind::Replicate].map(|k| vm.path().join(k.as_str())));
    }
    for dir in dirs {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let resume = name.contains(".map.resume-") || dir.ends_with(".restore-maps");
            if resume && !name.starts_with('.') && !keep.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// What a job was asked, as the API took it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "request", rename_all = "lowercase")]
enum HandedRun {
    Backup(StartRequest),
    Replicate(StartRequest),
    Restore(RestoreRequest),
}

impl HandedRun {
    fn job_id(&self) -> &str {
        match self {
            Self::Backup(r) | Self::Replicate(r) => &r.job_id,
            Self::Restore(r) => &r.job_id,
        }
    }

    fn kind(&self) -> JobKind {
        match self {
            Self::Backup(_) => JobKind::Backup,
            Self::Replicate(_) => JobKind::Replicate,
            Self::Restore(_) => JobKind::Restore,
        }
    }

    /// The VM whose change-tracking state a copy keeps (none for a restore).
    fn vm(&self) -> Option<&str> {
        match self {
            Self::Backup(r) | Self::Replicate(r) => Some(&r.vm_name),
            Self::Restore(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stage {
    Pending,
    Paused,
    Completed,
}

#[derive(Debug, Serialize, Deserialize)]
struct HandedDisk {
    key: u32,
    stage: Stage,
    mode: CopyMode,
    mode_reason: Option<String>,
    change_source: String,
    checksum: Option<String>,
    reconnects: u64,
    /// The source's files when the run started (`source/stamp.rs`); absent in records of the
    /// version before, whose copies then read their sources whole.
    #[serde(default)]
    source_stamp: Option<crate::source::SourceStamp>,
}

impl Jobs {
    /// Where a disk's resume map lives while the node is stopped: beside its change-tracking
    /// state for a copy, in the state directory's `.restore-maps` for a restore (not in the
    /// restore directory, which by default is the state directory's `restores`, and holds only
    /// restored disks; no VM is named with a leading dot).
    fn resume_path(&self, run: &HandedRun, key: u32) -> PathBuf {
        let id = run.job_id();
        match run.vm() {
            Some(vm) => self.map_path(vm, run.kind(), key).with_extension(format!("map.resume-{id}")),
            None => self.settings().state_dir.join(".restore-maps").join(format!("{id}-disk-{key}.map")),
        }
    }

    /// Pause every job, wait for them within `within` (what does not pause in time is
    /// cancelled), and write the record of what the next start takes up. Returns how many jobs
    /// were handed over. No checkpoint is written after this.
    pub async fn hand_over(&self, within: Duration) -> usize {
        let jobs = self.all();
        for j in jobs.iter().filter(|j| j.status() == JobStatus::Running) {
            j.pause.cancel();
        }
        let deadline = Instant::now() + within;
        let settled = |j: &Arc<Job>| j.status().is_final() || j.is_handed_over();
        while !jobs.iter().all(settled) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for j in jobs.iter().filter(|j| !settled(j)) {
            tracing::warn!(job = %j.id, vm = %j.vm_name, "did not pause within {} s: cancelled", within.as_secs());
            j.cancel();
        }
        let mut writer = self.record.lock().await;
        writer.stopped = true;
        match self.write_record(Writing::Stop).await {
            Ok(0) => 0,
            Ok(count) => {
                tracing::info!(jobs = count, "jobs handed over to the next start");
                count
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the hand-over record: the jobs are lost");
                0
            }
        }
    }

    /// Checkpoints, for a node that is killed (module doc): the record written again whenever a
    /// job starts, changes phase, completes a disk or ends, and every `checkpoint_every_s` with
    /// each running disk's resume map taken and saved. Runs until the node stops ([`Self::hand_over`]).
    pub async fn keep_checkpoints(self: Arc<Self>) {
        self.record.lock().await.checkpoints = true;
        let mut last_maps = Instant::now();
        loop {
            let every = self.settings().copy.checkpoint_every;
            let maps_due = last_maps + every;
            tokio::select! {
                () = self.record_changed.notified() => {}
                () = tokio::time::sleep_until(maps_due.into()), if !every.is_zero() => {}
                // Checkpoints switched on again by a reload.
                () = tokio::time::sleep(Duration::from_secs(5)), if every.is_zero() => {}
            }
            if every.is_zero() {
                // Switched off by a reload: a record left would name runs long over.
                let at = self.settings().state_dir.join(RECORD);
                if at.exists() && !self.record.lock().await.stopped {
                    let _ = std::fs::remove_file(&at);
                }
                continue;
            }
            let maps = Instant::now() >= maps_due;
            let writer = self.record.lock().await;
            if writer.stopped {
                return;
            }
            let written = self.write_record(Writing::Checkpoint { maps }).await;
            drop(writer);
            let Ok(mut stats) = self.checkpoints.lock() else { continue };
            match written {
                Ok(_) => {
                    stats.written += 1;
                    if maps {
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                        stats.maps_at = now.map_or(0, |d| d.as_secs());
                    }
                }
                Err(e) => {
                    stats.failed += 1;
                    tracing::warn!(error = %e, "could not write a checkpoint: a node killed now takes up the last one");
                }
            }
            if maps {
                last_maps = Instant::now();
            }
        }
    }

    /// A job enters `phase`. Before a post hook runs (releasing) the record is written at once:
    /// a node killed while it runs must not take the job up on a snapshot being released.
    pub(super) async fn enter_phase(&self, job: &Job, phase: Phase) {
        if let Ok(mut s) = job.state.lock() {
            s.phase = phase;
        }
        if phase != Phase::Releasing {
            self.record_changed.notify_one();
            return;
        }
        let writer = self.record.lock().await;
        if !writer.checkpoints || writer.stopped || self.settings().copy.checkpoint_every.is_zero() {
            return;
        }
        if let Err(e) = self.write_record(Writing::Checkpoint { maps: false }).await {
            tracing::warn!(job = %job.id, error = %e, "could not write the record before the post hook");
        }
    }

    /// Write the record (the caller holds [`Jobs::record`]): a stop's (the paused jobs) or a
    /// checkpoint's (the running jobs, with fresh resume maps when `maps`); then remove the resume
    /// maps it no longer names. Returns how many jobs it names (none: no record).
    async fn write_record(&self, writing: Writing) -> Result<usize, String> {
        let jobs = self.all();
        let mut record = Record { stopped: writing == Writing::Stop, jobs: Vec::new() };
        let (mut saves, mut saved_live) = (Vec::new(), Vec::new());
        for j in &jobs {
            let run = handed_run(j);
            let Ok((status, committed, finished_at, phase)) =
                j.state.lock().map(|s| (s.status, s.committed, s.finished_at, s.phase))
            else {
                continue;
            };
            let completed = status == JobStatus::Completed;
            // What a hub may still ask of a completed job: a copy's commit (until a newer run of
            // that VM starts: the hub is done with this one), a restore's checksums (for a while).
            let waited_for = match j.kind {
                JobKind::Restore => finished_at.is_some_and(|t| t.elapsed() < RESTORE_SEEN_WITHIN),
                JobKind::Backup | JobKind::Replicate => {
                    !committed
                        && !jobs.iter().any(|o| o.vm_name == j.vm_name && o.kind == j.kind && o.started > j.started)
                }
            };
            let going_on = match writing {
                Writing::Stop => j.is_handed_over(),
                Writing::Checkpoint { .. } => status == JobStatus::Running && phase != Phase::Releasing,
            };
            if !(going_on || completed && waited_for) {
                continue;
            }
            let mut disks = Vec::new();
            for d in &j.disks {
                let path = self.resume_path(&run, d.key);
                let stage = self.disk_stage(d, &path, writing, &mut saves, &mut saved_live).await?;
                let Ok(s) = d.state.lock() else { continue };
                disks.push(HandedDisk {
                    key: d.key,
                    stage,
                    mode: s.mode,
                    mode_reason: s.mode_reason.clone(),
                    change_source: s.change_source.to_string(),
                    checksum: s.checksum.clone(),
                    reconnects: s.reconnects,
                    source_stamp: s.source_stamp.clone(),
                });
            }
            let snapshotting = writing != Writing::Stop && phase == Phase::Snapshotting;
            record.jobs.push(HandedJob { run, completed, snapshotting, disks });
        }
        let count = record.jobs.len();
        let named: Vec<PathBuf> = record
            .jobs
            .iter()
            .flat_map(|j| j.disks.iter().filter(|d| d.stage == Stage::Paused).map(|d| self.resume_path(&j.run, d.key)))
            .collect();
        let (at, state_dir) = (self.settings().state_dir.join(RECORD), self.settings().state_dir.clone());
        let saved = off_runtime(move || -> Result<Vec<PathBuf>, String> {
            let mut saved = saved_live;
            for (path, map) in &saves {
                map.save(path).map_err(|e| e.to_string())?;
                saved.push(path.clone());
            }
            if count == 0 {
                match std::fs::remove_file(&at) {
                    Ok(()) => sync_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", at.display())),
                }
            } else {
                let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
                crate::files::write_atomically(&at, &json).map_err(|e| format!("{}: {e}", at.display()))?;
            }
            remove_resume_maps_but(&state_dir, &named);
            Ok(saved)
        })
        .await
        .map_err(|e| e.to_string())??;
        for j in &jobs {
            let run = handed_run(j);
            for d in &j.disks {
                if saved.contains(&self.resume_path(&run, d.key)) {
                    if let Ok(mut s) = d.state.lock() {
                        s.checkpointed = true;
                    }
                }
            }
        }
        Ok(count)
    }

    /// What the record says of one disk; a resume map to save is pushed to `saves`. A checkpoint
    /// with `maps` saves a running disk's map now (into `saved_live`); a disk paused in this process has its map in
    /// memory; otherwise the map saved last (at a checkpoint, or the one the disk was taken up
    /// from) still holds: a stale map only makes the resumed copy send blocks again.
    async fn disk_stage(
        &self,
        d: &DiskJob,
        path: &std::path::Path,
        writing: Writing,
        saves: &mut Vec<(PathBuf, Arc<ResumeMap>)>,
        saved_live: &mut Vec<PathBuf>,
    ) -> Result<Stage, String> {
        let Ok((status, checkpointed, paused)) =
            d.state.lock().map(|s| (s.status, s.checkpointed, if s.checkpointed { None } else { s.resume.clone() }))
        else {
            return Ok(Stage::Pending);
        };
        if status == "completed" {
            return Ok(Stage::Completed);
        }
        match (paused, writing) {
            (Some(map), _) => {
                saves.push((path.to_path_buf(), map));
                Ok(Stage::Paused)
            }
            (None, Writing::Checkpoint { maps: true }) if status == "running" => {
                match d.resumable.save(path).await.map_err(|e| e.to_string())? {
                    true => {
                        saved_live.push(path.to_path_buf());
                        Ok(Stage::Paused)
                    }
                    false if checkpointed => Ok(Stage::Paused),
                    false => Ok(Stage::Pending),
                }
            }
            _ if checkpointed => Ok(Stage::Paused),
            _ => Ok(Stage::Pending),
        }
    }

    /// Take up what the last stop handed over (or the last checkpoint named), before the API
    /// serves anything: the record is removed first (a start that fails half way does not take
    /// a job up twice; the first checkpoint of this start names the jobs taken up). Then what
    /// restores the node died in left beside their destinations is removed (not the files of
    /// restores taken up).
    pub fn take_up_handed_over(self: &Arc<Self>) -> TakenUp {
        let mut keep = Vec::new();
        let taken = self.take_up_record(&mut keep);
        remove_interrupted_restores(&self.settings(), &keep);
        if let Ok(mut t) = self.taken_up.lock() {
            *t = taken;
        }
        // The first checkpoint names the jobs taken up (the record was removed).
        self.record_changed.notify_one();
        taken
    }

    fn take_up_record(self: &Arc<Self>, keep: &mut Vec<PathBuf>) -> TakenUp {
        let path = self.settings().state_dir.join(RECORD);
        let Ok(text) = std::fs::read_to_string(&path) else { return TakenUp::default() };
        if let Err(e) = std::fs::remove_file(&path).and_then(|()| sync_dir(&path)) {
            tracing::error!(error = %e, "cannot remove the hand-over record: nothing is taken up");
            return TakenUp::default();
        }
        let record: Record = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the hand-over record does not parse: nothing is taken up");
                return TakenUp::default();
            }
        };
        let mut taken = TakenUp::default();
        if !record.stopped {
            tracing::warn!(
                jobs = record.jobs.len(),
                "the node was killed: its jobs are taken up from the last checkpoint"
            );
        }
        for handed in record.jobs {
            let id = handed.run.job_id().to_string();
            let taken_up = match &handed.run {
                _ if handed.snapshotting => {
                    self.release_snapshot(&handed);
                    Err("the node was killed while its pre-snapshot hook ran: the post hook undoes it".to_string())
                }
                HandedRun::Restore(req) => self.take_up_restore(req.clone(), &handed, keep),
                HandedRun::Backup(req) | HandedRun::Replicate(req) => self.take_up_copy(req.clone(), &handed),
            };
            match taken_up {
                Ok(()) => {
                    tracing::info!(job = %id, "job taken up from the last stop");
                    taken.resumed += 1;
                }
                Err(why) => {
                    tracing::warn!(job = %id, "job not taken up: {why}");
                    self.remove_resume_maps(&handed);
                    taken.dropped += 1;
                }
            }
        }
        taken
    }

    fn take_up_restore(
        self: &Arc<Self>,
        request: RestoreRequest,
        handed: &HandedJob,
        keep: &mut Vec<PathBuf>,
    ) -> Result<(), String> {
        let plan = self.plan_restore(&request).map_err(|e| e.to_string())?;
        let keys: Vec<u32> = plan.disks.iter().map(|d| d.key).collect();
        let handed_keys: Vec<u32> = handed.disks.iter().map(|d| d.key).collect();
        if keys != handed_keys {
            return Err(format!("its disks were {handed_keys:?}, the request names {keys:?} now"));
        }
        let disks = self.restore_disks(handed)?;
        for (d, planned) in handed.disks.iter().zip(&plan.disks) {
            if d.stage == Stage::Paused {
                keep.extend(Replacement::beside_of(&planned.dest));
            }
        }
        let job = Arc::new(Job::restore(request, disks));
        self.register_restore(&job, &plan).map_err(|e| e.to_string())?;
        if handed.completed {
            job.finish_taken_up();
            self.release(&job);
            return Ok(());
        }
        self.spawn_restore(&job, plan);
        Ok(())
    }

    fn take_up_copy(self: &Arc<Self>, request: StartRequest, handed: &HandedJob) -> Result<(), String> {
        let kind = handed.run.kind();
        let (vm, plan) = match self.plan_copy(&request) {
            Ok(p) => p,
            Err(e) => {
                self.release_snapshot(handed);
                return Err(e.to_string());
            }
        };
        let keys: Vec<u32> = plan.iter().map(|(d, _)| d.key).collect();
        let handed_keys: Vec<u32> = handed.disks.iter().map(|d| d.key).collect();
        if keys != handed_keys {
            self.release_snapshot(handed);
            return Err(format!("its disks were {handed_keys:?}, the request names {keys:?} now"));
        }
        let disks = match self.restore_disks(handed) {
            Ok(d) => d,
            Err(e) => {
                self.release_snapshot(handed);
                return Err(e);
            }
        };
        let job = Arc::new(Job::copy(request, kind, disks));
        if let Ok(mut s) = job.state.lock() {
            // Its snapshot was taken before the stop.
            s.phase = Phase::Copying;
        }
        self.register(Arc::clone(&job), &[&vm.name], &[]).map_err(|e| e.to_string())?;
        if handed.completed {
            job.finish_taken_up();
            self.release(&job);
            return Ok(());
        }
        self.spawn_copy(&job, vm, plan, true);
        Ok(())
    }

    /// The disks' states as the stop left them.
    fn restore_disks(&self, handed: &HandedJob) -> Result<Vec<DiskJob>, String> {
        let mut disks = Vec::new();
        for h in &handed.disks {
            let d = DiskJob::new(h.key, h.mode);
            self.restore_disk(&d, h, &handed.run)?;
            disks.push(d);
        }
        Ok(disks)
    }

    /// A disk's state as the stop left it; its resume map read (and removed) for a paused one.
    fn restore_disk(&self, d: &DiskJob, h: &HandedDisk, run: &HandedRun) -> Result<(), String> {
        let Ok(mut s) = d.state.lock() else { return Err("disk state poisoned".into()) };
        s.mode_reason.clone_from(&h.mode_reason);
        s.change_source = match h.change_source.as_str() {
            "bitmap" => "bitmap",
            "hashes" => "hashes",
            _ => "none",
        };
        s.reconnects = h.reconnects;
        s.source_stamp.clone_from(&h.source_stamp);
        match h.stage {
            Stage::Pending => {}
            Stage::Completed => {
                if let Some(vm) = run.vm() {
                    let map_path = self.map_path(vm, run.kind(), h.key);
                    let pending = map_path.with_extension(format!("map.pending-{}", run.job_id()));
                    if !pending.exists() {
                        return Err(format!("disk {}: its change-tracking state is gone", h.key));
                    }
                    s.pending_map = Some(pending);
                }
                s.status = "completed";
                s.checksum.clone_from(&h.checksum);
            }
            Stage::Paused => {
                // Left in place: the next checkpoint names it until the disk has a newer one.
                let at = self.resume_path(run, h.key);
                let map = ResumeMap::load(&at)
                    .ok_or_else(|| format!("disk {}: its resume map is missing or damaged", h.key))?;
                s.status = "paused";
                s.resume = Some(Arc::new(map));
                s.checkpointed = true;
            }
        }
        Ok(())
    }

    /// The resume maps of a job not taken up.
    fn remove_resume_maps(&self, handed: &HandedJob) {
        for d in handed.disks.iter().filter(|d| d.stage == Stage::Paused) {
            let _ = std::fs::remove_file(self.resume_path(&handed.run, d.key));
        }
    }

    /// A paused copy that is not taken up releases the VM's snapshot: its post hook runs.
    fn release_snapshot(&self, handed: &HandedJob) {
        let Some(vm) = handed.run.vm().and_then(|vm| self.settings().vm(vm).cloned()) else { return };
        let (Some(cmd), false) = (vm.post_snapshot.clone(), handed.completed) else { return };
        let id = handed.run.job_id().to_string();
        tokio::spawn(async move {
            let never = tokio_util::sync::CancellationToken::new();
            if let Err(e) = super::hooks::run_hook(&cmd, "post", &vm, &id, &never).await {
                tracing::warn!(job = %id, vm = %vm.name, error = %e, "post-snapshot hook of a job not taken up");
            }
        });
    }

    /// How the checkpoints went.
    pub fn checkpoint_stats(&self) -> CheckpointStats {
        self.checkpoints.lock().map(|s| *s).unwrap_or_default()
    }

    /// What the last start took up.
    pub fn taken_up(&self) -> TakenUp {
        self.taken_up.lock().map(|t| *t).unwrap_or_default()
    }
}

impl Job {
    /// Completed before the last stop: not handed over again for having ended in this process.
    fn finish_taken_up(&self) {
        self.finish(JobStatus::Completed, None);
        if let Ok(mut s) = self.state.lock() {
            s.finished_at = None;
        }
    }

    /// Paused by a stopping node, its state ready for the record.
    fn is_handed_over(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.handed_over)
    }
}
