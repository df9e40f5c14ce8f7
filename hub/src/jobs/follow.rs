//! A job from the node's start to its end: the follower that polls the node's job (progress,
//! stalls, cancel, a node that forgot the job), then the one way every job ends — exports drained
//! and closed, ports released — and, for a completed copy, verification, the manifest (or replica
//! record) written last, and the node's commit. Kept apart from `mod.rs`, which starts jobs and
//! answers the API about them: this is the part that runs unattended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use node::api::JobStatus as NodeStatus;

use super::files;
use super::view::{type_name, Job, Kind, Status};
use super::{Hub, KEEP_FINISHED, POLL, POLL_FINISHING};
use crate::ports::Lease;
use crate::repo::{self, Manifest, ManifestDisk};
use crate::verify::{forget_cached_chain, verify_disk, verify_new_backup_disk, DiskVerdict};

impl Hub {
    /// Follow the node's job to the end, then finish ours.
    pub(super) async fn follow(self: Arc<Self>, job: Arc<Job>, lease: Lease) {
        let mut client = match self.node(&job.node) {
            Some((_, c)) => c,
            None => {
                self.finish(&job, lease, Err(String::from("node vanished from the configuration").into())).await;
                return;
            }
        };
        let stall = self.live().stall_timeout;
        // A run taken up after a restart waits for its node to come back (a tunnel reconnecting
        // with its backoff) longer than a running one may stall: as long as the node keeps
        // retrying, until the run moves again.
        let mut patience = match self.was_taken_up(&job.id) {
            true => stall.max(super::handover::TAKEN_UP_PATIENCE),
            false => stall,
        };
        let mut first_done: Option<u64> = None;
        let mut last_progress = (0u64, Instant::now());
        let mut unreachable_since: Option<Instant> = None;
        let mut poll = POLL;
        let outcome: Result<(), (Status, String)> = loop {
            tokio::select! {
                _ = job.cancel.cancelled() => {
                    let _ = client.cancel(&job.id).await;
                    break Err((Status::Cancelled, "cancelled by request".into()));
                }
                _ = self.shutdown.cancelled() => {
                    // Handed over to the next start (`handover.rs`): the node's job goes on and
                    // re-makes its connections to the exports the next start opens again.
                    tracing::info!(job = %job.id, vm = %job.vm, "the hub stops: the run is handed over, not cancelled");
                    return;
                }
                _ = tokio::time::sleep(poll) => {}
            }
            // A reload may have given the node another address or token: the next call uses it.
            if let Some((_, now)) = self.node(&job.node) {
                client = now;
            }
            match client.job(&job.id).await {
                Ok(view) => {
                    if unreachable_since.take().is_some() {
                        // Back (its host rebooted, its node took the run up): a stall counts
                        // from now, not from before it went away.
                        last_progress.1 = Instant::now();
                    }
                    let done = view.disks.iter().map(|d| d.bytes_moving()).fold(0, u64::saturating_add);
                    if done != last_progress.0 {
                        last_progress = (done, Instant::now());
                    }
                    if *first_done.get_or_insert(done) != done {
                        patience = stall;
                    }
                    let total = view.disks.iter().map(|d| d.bytes_total).fold(0, u64::saturating_add);
                    let settled = view.disks.iter().map(|d| d.bytes_settled()).fold(0, u64::saturating_add);
                    poll = if total > 0 && settled.saturating_mul(10) >= total.saturating_mul(9) {
                        POLL_FINISHING
                    } else {
                        POLL
                    };
                    let status = view.status;
                    let error = view.error.clone();
                    if let Ok(mut s) = job.state.lock() {
                        s.node_view = Some(view);
                    }
                    match status {
                        NodeStatus::Completed => break Ok(()),
                        NodeStatus::Failed => {
                            break Err((Status::Failed, format!("node: {}", error.unwrap_or_default())))
                        }
                        NodeStatus::Cancelled => break Err((Status::Cancelled, "cancelled on the node".into())),
                        NodeStatus::Running if last_progress.1.elapsed() > patience => {
                            let _ = client.cancel(&job.id).await;
                            break Err((Status::Failed, format!("no progress for {} s", patience.as_secs())));
                        }
                        NodeStatus::Running => {}
                    }
                }
                Err(node::api::ApiError::Status { status: 404, .. }) => {
                    break Err((
                        Status::Failed,
                        "the node no longer knows this job (it was restarted): nothing of this run is kept".into(),
                    ));
                }
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    let wait = patience.max(self.live().unreachable_timeout);
                    if since.elapsed() > wait {
                        // Its node may come back and take the job up, into exports closed now:
                        // cancelled then (the reaper), or the VM's next run would find it busy.
                        self.state().orphans.push((job.vm.clone(), job.id.clone()));
                        break Err((Status::Failed, format!("node unreachable for {} s: {e}", wait.as_secs())));
                    }
                }
            }
        };
        match outcome {
            Ok(()) => self.finish(&job, lease, Ok(())).await,
            Err((status, why)) => self.finish(&job, lease, Err((status, why).into())).await,
        }
        if job.kind == Kind::Backup && job.status() == Status::Completed {
            let (scope, policy) = self.retention_after(&job);
            if !policy.is_empty() {
                self.apply_retention(&job.vm, &job.node, scope.as_deref(), &policy).await;
            }
            // After the retention: a merge into the new backup goes before its compression.
            self.wake_rewrites();
        }
    }

    async fn finish(&self, job: &Arc<Job>, lease: Lease, outcome: Result<(), FailReason>) {
        // Exports closed (drained and flushed) and ports released on every path.
        for d in &job.disks {
            self.exports.close(&d.export).await;
        }
        drop(lease);
        let result = match outcome {
            Ok(()) => {
                job.set(Status::Verifying, None);
                self.complete(job).await
            }
            Err(r) => Err((r.0, r.1)),
        };
        let (status, why) = match result {
            Ok(()) => (Status::Completed, None),
            Err((status, why)) => {
                tracing::warn!(job = %job.id, vm = %job.vm, ?status, reason = %why, "job did not complete");
                if job.kind == Kind::Backup {
                    files::remove_dir(self.repo.backup_dir(&job.vm, &job.id)).await;
                }
                (status, Some(why))
            }
        };
        self.end_run(job, status, why);
        self.record_runs_changed().await;
    }

    /// A run reaches its final status and lets go of its VM and parent in one step, under the
    /// hub's lock: whoever sees it ended (a schedule waiting for the VM) finds the VM free. A
    /// completed backup leaves the jobs for the catalog, any other run stays among the recent ones.
    fn end_run(&self, job: &Arc<Job>, status: Status, why: Option<String>) {
        let mut st = self.state();
        job.set(status, why);
        if st.busy_vms.get(&job.vm) == Some(&job.id) {
            st.busy_vms.remove(&job.vm);
        }
        // Completed, the run is in the catalog, which keeps its parent; otherwise nothing of it
        // is left to need one.
        st.pins.remove(&job.id);
        if job.status() == Status::Completed && job.kind == Kind::Backup {
            st.jobs.remove(&job.id);
        } else {
            st.finished.push_back(job.id.clone());
            while st.finished.len() > KEEP_FINISHED {
                if let Some(old) = st.finished.pop_front() {
                    st.jobs.remove(&old);
                }
            }
        }
    }

    /// Verify, write the manifest (or the replica record), then tell the node to commit.
    async fn complete(&self, job: &Arc<Job>) -> Result<(), (Status, String)> {
        let node_view = job.state.lock().ok().and_then(|s| s.node_view.clone());
        let checksums: HashMap<u32, Option<String>> =
            node_view.iter().flat_map(|v| v.disks.iter().map(|d| (d.key, d.checksum.clone()))).collect();
        let sent: HashMap<u32, u64> =
            node_view.iter().flat_map(|v| v.disks.iter().map(|d| (d.key, d.bytes_sent))).collect();
        let mut verdicts = Vec::new();
        let _turn = self.verify_turn().await;
        let started = Instant::now();
        for d in &job.disks {
            let (path, key) = (d.path.clone(), d.key);
            let expected = checksums.get(&key).cloned().flatten();
            let (kind, uncached) = (job.kind, self.settings.direct_io);
            let verdict = tokio::task::spawn_blocking(move || {
                let verdict = match kind {
                    Kind::Backup => verify_new_backup_disk(&path, key, expected.as_deref()),
                    Kind::Replication => verify_disk(&path, key, expected.as_deref()),
                };
                if uncached {
                    forget_cached_chain(&path);
                }
                verdict
            })
            .await
            .map_err(|e| (Status::Failed, format!("verify: {e}")))?;
            if !verdict.ok() {
                return Err((Status::Failed, format!("verify of disk {key} failed: {}", describe(&verdict))));
            }
            verdicts.push(verdict);
        }
        tracing::info!(job = %job.id, secs = started.elapsed().as_secs_f64(), "images verified");
        match job.kind {
            Kind::Backup => {
                let manifest = Manifest {
                    backup_id: job.id.clone(),
                    vm_name: job.vm.clone(),
                    node: job.node.clone(),
                    backup_type: type_name(job.backup_type).into(),
                    parent_id: job.parent.clone(),
                    status: "completed".into(),
                    created_at: job.created_at.clone(),
                    completed_at: repo::now_rfc3339(),
                    disks: job
                        .disks
                        .iter()
                        .map(|d| ManifestDisk {
                            disk_key: d.key,
                            disk_id: d.id,
                            size: d.size,
                            allocated_bytes: allocated(&d.path),
                            checksum: checksums.get(&d.key).cloned().flatten(),
                            file: repo::disk_file(d.key),
                            bytes_sent: sent.get(&d.key).copied().unwrap_or(0),
                        })
                        .collect(),
                    note: job.note.clone(),
                    tags: job.tags.clone(),
                    schedule: job.schedule.clone(),
                    merging_into: None,
                    verified: None,
                    compressed: None,
                };
                let (path, data) =
                    self.repo.manifest_file(&manifest).map_err(|e| (Status::Failed, format!("manifest: {e}")))?;
                files::write_atomically(path, data).await.map_err(|e| (Status::Failed, format!("manifest: {e}")))?;
                self.state().catalog.insert(job.id.clone(), manifest);
            }
            Kind::Replication => {
                let record = serde_json::json!({
                    "replication_id": job.id,
                    "node": job.node,
                    "completed_at": repo::now_rfc3339(),
                    "disks": verdicts,
                });
                let path = self.repo.replicas.join(&job.vm).join("replica.json");
                files::write_atomically(path, record.to_string().into_bytes())
                    .await
                    .map_err(|e| (Status::Failed, format!("replica record: {e}")))?;
                let _ = std::fs::remove_file(self.repo.replica_marker(&job.vm));
            }
        }
        // Only now is the node's change tracking moved to this run.
        if let Some((_, client)) = self.node(&job.node) {
            match client.commit(&job.id).await {
                Ok(_) if job.kind == Kind::Backup => {
                    let marker = self.repo.root.join(&job.vm).join(format!(".node-committed-{}", job.node));
                    if let Err(e) = files::write_atomically(marker, job.id.clone().into_bytes()).await {
                        tracing::error!(error = %e, "could not record the node's commit");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "node commit failed: the next backup of this VM will be full")
                }
            }
        }
        Ok(())
    }
}

/// (status, reason) of a job that did not complete.
pub struct FailReason(Status, String);

impl From<(Status, String)> for FailReason {
    fn from(v: (Status, String)) -> Self {
        Self(v.0, v.1)
    }
}

impl From<String> for FailReason {
    fn from(v: String) -> Self {
        Self(Status::Failed, v)
    }
}

fn describe(v: &DiskVerdict) -> String {
    match v.checksum_match {
        Some(false) => format!("{}; content differs from what the node sent", v.check),
        _ => v.check.clone(),
    }
}

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0)
}
