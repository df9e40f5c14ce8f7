//! Backups and replications handed over from a node that stops to the node that starts next: a
//! graceful stop (`SIGTERM`: `systemctl restart sendense-node` to upgrade it, or to take up a
//! change only a restart takes up) no longer fails the runs under way, which for a
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
//! Restores are cancelled, as before (a restored file is replaced whole or not at all).
//!
//! The next start reads and removes the record before its API serves anything, so the hub, which
//! kept polling while the node was away (it waits `stall_timeout_s` for a node it cannot reach),
//! finds the same job ids running again: a paused disk goes on from its resume map (the source
//! read again, what the target holds already not sent), a disk not started starts, the post hook
//! runs at the end as it would have. The node's checksum at the end, compared by the hub with
//! the image it holds, still decides. A job that cannot be taken up (its VM or a disk left the
//! configuration, a target is no longer reachable by its rules, a map is missing or damaged) is
//! dropped: the hub learns that its node no longer knows the job and fails the run; the VM's post
//! hook runs so its snapshot is released. A killed node writes nothing and behaves as before.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{off_runtime, sync_dir, DiskJob, Job, JobKind, Jobs};
use crate::api::{CopyMode, JobStatus, StartRequest};
use crate::blockmap::BlockMap;

/// The record, in the state directory.
const RECORD: &str = ".jobs-handed-over.json";

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
    replicate: bool,
    request: StartRequest,
    /// Completed on this node, waiting for the hub's commit.
    completed: bool,
    disks: Vec<HandedDisk>,
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
    /// Where a disk's resume map lives while the node is stopped.
    fn resume_path(&self, job: &Job, key: u32) -> PathBuf {
        self.map_path(&job.vm_name, job.kind, key).with_extension(format!("map.resume-{}", job.id))
    }

    /// Pause every backup and replication (cancel every restore), wait for them within `within`
    /// (what does not pause in time is cancelled), and write the record of what the next start
    /// takes up. Returns how many jobs were handed over.
    pub async fn hand_over(&self, within: Duration) -> usize {
        let jobs = self.all();
        for j in jobs.iter().filter(|j| j.status() == JobStatus::Running) {
            match j.kind {
                JobKind::Restore => j.cancel(),
                JobKind::Backup | JobKind::Replicate => j.pause.cancel(),
            }
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
            let Some(request) = j.request.clone() else { continue };
            let (completed, committed) =
                j.state.lock().map(|s| (s.status == JobStatus::Completed, s.committed)).unwrap_or((false, true));
            if !(j.is_handed_over() || completed && !committed) {
                continue;
            }
            let mut disks = Vec::new();
            for d in &j.disks {
                let Ok(s) = d.state.lock() else { continue };
                let stage = match (s.status, &s.resume) {
                    ("completed", _) => Stage::Completed,
                    (_, Some(map)) => {
                        maps.push((self.resume_path(j, d.key), map.clone()));
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
            record.jobs.push(HandedJob { replicate: j.kind == JobKind::Replicate, request, completed, disks });
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
    /// removed first (a node killed later never trusts it again).
    pub fn take_up_handed_over(self: &Arc<Self>) -> TakenUp {
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
            let (id, vm) = (handed.request.job_id.clone(), handed.request.vm_name.clone());
            match self.take_up(handed) {
                Ok(()) => {
                    tracing::info!(job = %id, vm = %vm, "job taken up from the last stop");
                    taken.resumed += 1;
                }
                Err(why) => {
                    tracing::warn!(job = %id, vm = %vm, "job not taken up: {why}");
                    taken.dropped += 1;
                }
            }
        }
        if let Ok(mut t) = self.taken_up.lock() {
            *t = taken;
        }
        taken
    }

    fn take_up(self: &Arc<Self>, handed: HandedJob) -> Result<(), String> {
        let kind = if handed.replicate { JobKind::Replicate } else { JobKind::Backup };
        let request = handed.request.clone();
        let (vm, plan) = match self.plan_copy(&request) {
            Ok(p) => p,
            Err(e) => {
                self.release_snapshot(&handed);
                return Err(e.to_string());
            }
        };
        let keys: Vec<u32> = plan.iter().map(|(d, _)| d.key).collect();
        let handed_keys: Vec<u32> = handed.disks.iter().map(|d| d.key).collect();
        if keys != handed_keys {
            self.release_snapshot(&handed);
            return Err(format!("its disks were {handed_keys:?}, the request names {keys:?} now"));
        }
        let job_id = request.job_id.clone();
        let mut disks = Vec::new();
        let mut failure = None;
        for h in &handed.disks {
            let d = DiskJob::new(h.key, h.mode);
            if let Err(e) = self.restore_disk(&d, h, &vm.name, kind, &job_id) {
                failure.get_or_insert(e);
            }
            disks.push(d);
        }
        if let Some(e) = failure {
            self.release_snapshot(&handed);
            return Err(e);
        }
        let job = Arc::new(Job::copy(request, kind, disks));
        self.register(Arc::clone(&job), &[&vm.name], &[]).map_err(|e| e.to_string())?;
        if handed.completed {
            job.finish(JobStatus::Completed, None);
            self.release(&job);
            return Ok(());
        }
        self.spawn_copy(&job, vm, plan, true);
        Ok(())
    }

    /// A disk's state as the stop left it; its resume map read (and removed) for a paused one.
    fn restore_disk(&self, d: &DiskJob, h: &HandedDisk, vm: &str, kind: JobKind, job_id: &str) -> Result<(), String> {
        let map_path = self.map_path(vm, kind, h.key);
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
                let pending = map_path.with_extension(format!("map.pending-{job_id}"));
                if !pending.exists() {
                    return Err(format!("disk {}: its change-tracking state is gone", h.key));
                }
                s.status = "completed";
                s.checksum.clone_from(&h.checksum);
                s.pending_map = Some(pending);
            }
            Stage::Paused => {
                let at = map_path.with_extension(format!("map.resume-{job_id}"));
                let map = BlockMap::load(&at);
                let _ = std::fs::remove_file(&at);
                let map = map.ok_or_else(|| format!("disk {}: its resume map is missing or damaged", h.key))?;
                s.status = "paused";
                s.resume = Some(map);
            }
        }
        Ok(())
    }

    /// A paused job that is not taken up releases the VM's snapshot: its post hook runs.
    fn release_snapshot(&self, handed: &HandedJob) {
        for d in handed.disks.iter().filter(|d| d.stage == Stage::Paused) {
            let kind = if handed.replicate { JobKind::Replicate } else { JobKind::Backup };
            let at = self
                .map_path(&handed.request.vm_name, kind, d.key)
                .with_extension(format!("map.resume-{}", handed.request.job_id));
            let _ = std::fs::remove_file(at);
        }
        let Some(vm) = self.settings().vm(&handed.request.vm_name).cloned() else { return };
        let (Some(cmd), false) = (vm.post_snapshot.clone(), handed.completed) else { return };
        let id = handed.request.job_id.clone();
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
    /// Paused by a stopping node, its state ready for the record.
    fn is_handed_over(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.handed_over)
    }
}
