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
//! finds the same job ids running again: a paused disk goes on from its resume map (the source
//! read again, what the target holds already not sent), a disk not started starts, the post hook
//! runs at the end as it would have. The node's checksum at the end, compared by the hub with
//! the image it holds, still decides. A job that cannot be taken up (its VM or a disk left the
//! configuration, a target is no longer reachable by its rules, a map is missing or damaged) is
//! dropped: the hub learns that its node no longer knows the job and fails the run; the VM's post
//! hook runs so its snapshot is released (a restore's file beside is removed, its destination as
//! it was). A killed node writes nothing and behaves as before.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::restore::remove_interrupted_restores;
use super::{off_runtime, sync_dir, DiskJob, Job, JobKind, JobRequest, Jobs};
use crate::api::{CopyMode, JobStatus, RestoreRequest, StartRequest};
use crate::blockmap::BlockMap;
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
    jobs: Vec<HandedJob>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HandedJob {
    run: HandedRun,
    /// Completed on this node (a copy waiting for the hub's commit, a restore for the hub's look).
    completed: bool,
    disks: Vec<HandedDisk>,
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
    /// were handed over.
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
        let mut record = Record::default();
        let mut maps = Vec::new();
        for j in &jobs {
            let run = match (&j.request, j.kind) {
                (JobRequest::Copy(r), JobKind::Replicate) => HandedRun::Replicate(r.clone()),
                (JobRequest::Copy(r), _) => HandedRun::Backup(r.clone()),
                (JobRequest::Restore(r), _) => HandedRun::Restore(r.clone()),
            };
            let Ok((completed, committed, finished_at)) =
                j.state.lock().map(|s| (s.status == JobStatus::Completed, s.committed, s.finished_at))
            else {
                continue;
            };
            // What a hub may still ask of a completed job: a copy's commit (until a newer run of
            // that VM starts: the hub is done with this one), a restore's checksums (for a while).
            let waited_for = match j.kind {
                JobKind::Restore => finished_at.is_some_and(|t| t.elapsed() < RESTORE_SEEN_WITHIN),
                JobKind::Backup | JobKind::Replicate => {
                    !committed
                        && !jobs.iter().any(|o| o.vm_name == j.vm_name && o.kind == j.kind && o.started > j.started)
                }
            };
            if !(j.is_handed_over() || completed && waited_for) {
                continue;
            }
            let mut disks = Vec::new();
            for d in &j.disks {
                let Ok(s) = d.state.lock() else { continue };
                let stage = match (s.status, &s.resume) {
                    ("completed", _) => Stage::Completed,
                    (_, Some(map)) => {
                        maps.push((self.resume_path(&run, d.key), map.clone()));
                        Stage::Paused
                    }
                    _ => Stage::Pending,
                };
                disks.push(HandedDisk {
                    key: d.key,
                    stage,
                    mode: s.mode,
                    mode_reason: s.mode_reason.clone(),
                    change_source: s.change_source.to_string(),
                    checksum: s.checksum.clone(),
                    reconnects: s.reconnects,
                });
            }
            record.jobs.push(HandedJob { run, completed, disks });
        }
        let count = record.jobs.len();
        if count == 0 {
            return 0;
        }
        let at = self.settings().state_dir.join(RECORD);
        let written = off_runtime(move || -> Result<(), String> {
            for (path, map) in &maps {
                map.save(path).map_err(|e| e.to_string())?;
            }
            let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
            crate::files::write_atomically(&at, &json).map_err(|e| format!("{}: {e}", at.display()))
        })
        .await;
        match written {
            Ok(Ok(())) => {
                tracing::info!(jobs = count, "jobs handed over to the next start");
                count
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not write the hand-over record: the jobs are lost");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the hand-over record: the jobs are lost");
                0
            }
        }
    }

    /// Take up what the last stop handed over, before the API serves anything: the record is
    /// removed first (a node killed later never trusts it again). Then what restores the node
    /// died in left beside their destinations is removed (not the files of restores taken up).
    pub fn take_up_handed_over(self: &Arc<Self>) -> TakenUp {
        let mut keep = Vec::new();
        let taken = self.take_up_record(&mut keep);
        remove_interrupted_restores(&self.settings(), &keep);
        if let Ok(mut t) = self.taken_up.lock() {
            *t = taken;
        }
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
        for handed in record.jobs {
            let id = handed.run.job_id().to_string();
            let taken_up = match &handed.run {
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
                let at = self.resume_path(run, h.key);
                let map = BlockMap::load(&at);
                let _ = std::fs::remove_file(&at);
                let map = map.ok_or_else(|| format!("disk {}: its resume map is missing or damaged", h.key))?;
                s.status = "paused";
                s.resume = Some(map);
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
