//! A restore the hub drives on a node: `POST /api/v1/restores {backup_id, destinations, node?}`.
//!
//! Without `destinations` a restore is only read-only exports for whoever reads them (an operator's
//! `nbdcopy`, or a node told by hand). With them the hub does the rest of what restoring a VM takes:
//! it opens exports of the disks named, asks the node (the backup's own, or `node`: a VM restored
//! onto another machine) to write each into its destination (a VM disk path or a file in its
//! restore directory; the node decides what it allows), follows the node's job, and when it ends
//! closes the exports and compares the checksum the node computed of what it wrote with the one
//! in the backup's manifest. `completed` therefore means every disk was written, flushed, and
//! reproduces the backup bit for bit; a mismatch fails the restore, naming the disk.
//!
//! The record stays readable (`GET /api/v1/restores/{id}`) after the exports close, among the
//! last [`KEEP_FINISHED`] finished ones. `DELETE` cancels the node's job and closes the exports;
//! the node then leaves each destination as it was (a file is replaced only once whole). The
//! restores being driven are listed in the repository (`.restores-in-flight.json`): a hub killed
//! meanwhile loses their records, and cancels their node jobs when it starts again (they would
//! otherwise retry the exports that are gone for the node's retry window, holding the
//! destinations, and a VM restored onto, until then). A hub stopped gracefully hands them over
//! instead, and the next start takes them up on the same ports (`handover.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::api::{DiskStatus, JobStatus, JobView as NodeJobView, RestoreRequest};
use serde::Serialize;

use super::files::off_runtime;
use super::restores::{Restore, RestoreView};
use super::{new_id, valid_name, Hub, POLL};
use crate::error::HubError;

/// Finished restores whose records are kept.
pub(super) const KEEP_FINISHED: usize = 100;

/// The node's side of a restore the hub drives.
#[derive(Debug)]
pub struct RestoreRun {
    /// Disk key -> destination on the node.
    pub(super) destinations: BTreeMap<u32, String>,
    /// Disk key -> the backup's checksum of that disk.
    pub(super) expected: BTreeMap<u32, Option<String>>,
    pub(super) state: Mutex<RunState>,
}

#[derive(Debug, Clone)]
pub(super) struct RunState {
    pub(super) status: JobStatus,
    pub(super) disks: Vec<DiskStatus>,
    pub(super) error: Option<String>,
}

/// One disk of a restore the hub drives, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreDisk {
    /// Disk key.
    pub disk_key: u32,
    /// Where the node writes it.
    pub destination: String,
    /// `pending`, `running`, `completed`, `failed`, `cancelled` (the node's word).
    pub status: String,
    /// Disk size.
    pub bytes_total: u64,
    /// Read from the hub so far.
    pub bytes_read: u64,
    /// Disk bytes dealt with per second.
    pub rate_bps: u64,
    /// Seconds left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// The node's checksum of what it wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Whether that equals the backup's (once the disk is done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum_match: Option<bool>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RestoreRun {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `(status, disks, error)` for the restore's view.
    pub(super) fn view(&self) -> (String, Vec<RestoreDisk>, Option<String>) {
        let st = self.lock();
        let disks = self
            .destinations
            .iter()
            .map(|(key, destination)| {
                let node = st.disks.iter().find(|d| d.key == *key);
                let checksum = node.and_then(|d| d.checksum.clone());
                let done = node.is_some_and(|d| d.status == "completed");
                let expected = self.expected.get(key).cloned().flatten();
                RestoreDisk {
                    disk_key: *key,
                    destination: destination.clone(),
                    status: node.map_or_else(|| "pending".into(), |d| d.status.clone()),
                    bytes_total: node.map_or(0, |d| d.bytes_total),
                    bytes_read: node.map_or(0, |d| d.bytes_read),
                    rate_bps: node.map_or(0, |d| d.rate_bps),
                    eta_s: node.and_then(|d| d.eta_s),
                    checksum_match: (done && expected.is_some()).then(|| checksum.is_some() && checksum == expected),
                    checksum,
                    error: node.and_then(|d| d.error.clone()),
                }
            })
            .collect();
        (st.status.name().to_string(), disks, st.error.clone())
    }

    /// The node's job as last seen.
    fn update(&self, job: &NodeJobView) {
        let mut st = self.lock();
        st.disks.clone_from(&job.disks);
        st.status = job.status;
        st.error.clone_from(&job.error);
    }

    /// The end of the run: `status` unless a disk's checksum differs from the backup's.
    fn finish(&self, status: JobStatus, error: Option<String>) {
        let mut st = self.lock();
        st.status = status;
        st.error = error.or_else(|| st.error.take());
        if status == JobStatus::Completed {
            let differs: Vec<String> = self
                .expected
                .iter()
                .filter(|(key, expected)| {
                    let written = st.disks.iter().find(|d| d.key == **key).and_then(|d| d.checksum.as_ref());
                    expected.is_some() && written != expected.as_ref()
                })
                .map(|(key, _)| key.to_string())
                .collect();
            if !differs.is_empty() {
                st.status = JobStatus::Failed;
                st.error = Some(format!(
                    "disk {} as written differs from the backup (checksum): the restore did not reproduce it",
                    differs.join(", ")
                ));
            }
        }
    }
}

impl Hub {
    /// Restore `backup_id` onto a node: exports of the disks named in `destinations` (disk key
    /// -> path on the node), the node's job, its end followed here (module doc).
    ///
    /// # Errors
    /// Bad names, no or unknown disks (400), unknown backup or node (404), the node refusing the
    /// destinations (400, 409) or unreachable (503), no free port (503).
    pub async fn restore_onto(
        self: &Arc<Self>,
        backup_id: &str,
        node: Option<&str>,
        destinations: &BTreeMap<String, String>,
    ) -> Result<RestoreView, HubError> {
        if !valid_name(backup_id) {
            return Err(HubError::BadRequest(format!("backup_id '{backup_id}' is not a valid name")));
        }
        if destinations.is_empty() {
            return Err(HubError::BadRequest("destinations names no disk".into()));
        }
        if let Some(n) = node.filter(|n| !valid_name(n)) {
            return Err(HubError::BadRequest(format!("node '{n}' is not a valid name")));
        }
        let id = new_id("x");
        let (m, pinned) = self.pin_backup(&id, backup_id, format!("restore {id} is opening its images"))?;
        let mut wanted = BTreeMap::new();
        for (key, path) in destinations {
            let disk = key.parse::<u32>().ok().and_then(|k| m.disks.iter().find(|d| d.disk_key == k));
            let Some(disk) = disk else {
                let keys: Vec<String> = m.disks.iter().map(|d| d.disk_key.to_string()).collect();
                return Err(HubError::BadRequest(format!(
                    "backup {backup_id} has no disk {key} (its disks: {})",
                    keys.join(", ")
                )));
            };
            wanted.insert(disk.disk_key, path.clone());
        }
        let node_name = node.unwrap_or(&m.node).to_string();
        let client = self
            .node(&node_name)
            .map(|(_, c)| c)
            .ok_or_else(|| HubError::NotFound(format!("unknown node {node_name}")))?;
        let only: BTreeSet<u32> = wanted.keys().copied().collect();
        let mut restore = self.open_restore(&id, &m, Some(&only)).await?;
        // The tunnel endpoint admits to these ports the node that reads them.
        restore.node.clone_from(&node_name);
        restore.run = Some(RestoreRun {
            expected: m
                .disks
                .iter()
                .filter(|d| only.contains(&d.disk_key))
                .map(|d| (d.disk_key, d.checksum.clone()))
                .collect(),
            destinations: wanted,
            state: Mutex::new(RunState { status: JobStatus::Running, disks: Vec::new(), error: None }),
        });
        let r = Arc::new(restore);
        {
            let mut st = self.state();
            st.restores.insert(id.clone(), Arc::clone(&r));
            st.driven.insert(id.clone(), node_name.clone());
        }
        drop(pinned);
        self.save_in_flight().await;
        let request =
            RestoreRequest { job_id: id.clone(), nbd_targets: r.targets.clone(), destinations: destinations.clone() };
        if let Err(e) = client.start_restore(&request).await {
            let e = HubError::from_node(&node_name, e);
            if let Some(run) = &r.run {
                run.finish(JobStatus::Failed, Some(e.to_string()));
            }
            self.end_restore(&id, None).await;
            return Err(e);
        }
        tracing::info!(restore = %id, backup = backup_id, node = %node_name, "restore started on the node");
        let hub = Arc::clone(self);
        let view = r.view();
        tokio::spawn(async move { hub.follow_restore(r, client).await });
        // Named in the record before the start is answered: a hub killed from now on takes it up.
        self.record_runs_changed().await;
        Ok(view)
    }

    /// Poll the node's job until it ends, the restore is closed here, or the node stays
    /// unreachable for `unreachable_timeout`.
    pub(super) async fn follow_restore(&self, r: Arc<Restore>, mut client: node::api::NodeClient) {
        let Some(run) = r.run.as_ref() else { return };
        let mut unreachable_since: Option<Instant> = None;
        // Taken up after a restart: the node's tunnel may take its backoff to come back.
        let mut patience = self.was_taken_up(&r.id).then_some(super::handover::TAKEN_UP_PATIENCE);
        let outcome = loop {
            tokio::time::sleep(POLL).await;
            if !self.state().restores.contains_key(&r.id) {
                return;
            }
            // A reload may have given the node another address or token (`Hub::follow`).
            if let Some((_, now)) = self.node(&r.node) {
                client = now;
            }
            match client.job(&r.id).await {
                Ok(job) => {
                    unreachable_since = None;
                    patience = None;
                    run.update(&job);
                    if job.status.is_final() {
                        break (job.status, None);
                    }
                }
                Err(node::api::ApiError::Status { status: 404, .. }) => {
                    break (JobStatus::Failed, Some("the node no longer knows this restore (it was restarted)".into()));
                }
                Err(e) => {
                    let live = self.live();
                    let wait: Duration =
                        live.stall_timeout.max(live.unreachable_timeout).max(patience.unwrap_or_default());
                    if unreachable_since.get_or_insert_with(Instant::now).elapsed() > wait {
                        if client.cancel(&r.id).await.is_err() {
                            // Its node may come back and take the restore up, from exports closed
                            // now, holding its destination: cancelled then (the reaper).
                            self.state().lost_restores.push((r.node.clone(), r.id.clone()));
                        }
                        break (JobStatus::Failed, Some(format!("node unreachable for {} s: {e}", wait.as_secs())));
                    }
                }
            }
        };
        let (status, error) = outcome;
        run.finish(status, error);
        let (status, _, error) = run.view();
        tracing::info!(restore = %r.id, node = %r.node, status, error = error.as_deref().unwrap_or(""), "restore ended");
        self.end_restore(&r.id, None).await;
        self.record_runs_changed().await;
    }

    /// Take restore `id` out of the open ones, close its exports and free its ports; a driven
    /// one's record is kept, with `cancelled` when the node's job is still running (which it is
    /// then told to stop). `None` when it was not open (already ended).
    pub(super) async fn end_restore(&self, id: &str, cancel: Option<&node::api::NodeClient>) -> Option<RestoreView> {
        let r = {
            let mut st = self.state();
            let r = st.restores.remove(id)?;
            st.ending_restores.insert(id.to_string(), r.clone());
            r
        };
        if let (Some(run), Some(client)) = (r.run.as_ref(), cancel) {
            if !run.lock().status.is_final() {
                let last = client.cancel(id).await;
                if let Ok(job) = &last {
                    run.update(job);
                }
                run.finish(JobStatus::Cancelled, last.err().map(|e| format!("cancelling on the node: {e}")));
            }
        }
        for (_, _, n) in &r.exports {
            self.exports.close(n).await;
        }
        if let Ok(mut l) = r.lease.lock() {
            l.take();
        }
        let view = r.view();
        {
            let mut st = self.state();
            st.ending_restores.remove(id);
            if r.run.is_some() {
                st.driven.remove(id);
                st.finished_restores.push_back(view.clone());
                while st.finished_restores.len() > KEEP_FINISHED {
                    st.finished_restores.pop_front();
                }
            }
        }
        if r.run.is_some() {
            self.save_in_flight().await;
        }
        Some(view)
    }

    /// Write the restores driven now, and those a killed hub left not yet cancelled, into the
    /// repository: what this hub's successor cancels if it is killed. A write that fails is
    /// logged (the successor would then leave those node jobs to fail by themselves).
    pub(super) async fn save_in_flight(&self) {
        let _turn = self.in_flight_file.lock().await;
        let list: Vec<(String, String)> = {
            let st = self.state();
            let driven = st.driven.iter().map(|(id, node)| (node.clone(), id.clone()));
            driven.chain(st.lost_restores.iter().cloned()).collect()
        };
        let repo = self.repo.clone();
        let saved = off_runtime("listing restores in flight", move || repo.save_restores_in_flight(&list)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot keep the list of restores in flight"),
            Err(e) => tracing::warn!(error = %e, "cannot keep the list of restores in flight"),
        }
    }

    /// Cancel on their nodes the restores a killed hub left running there (they read exports
    /// that are gone, and hold their destinations, and a VM restored onto, until they give up).
    /// Forgotten once the node has let go of one, or when its node is no longer configured.
    pub async fn reap_lost_restores(&self) {
        let lost = self.state().lost_restores.clone();
        let mut released = Vec::new();
        for (node, id) in lost {
            let done = match self.node(&node) {
                Some((_, client)) => super::release_node_job(&client, &id).await,
                None => true,
            };
            if done {
                tracing::info!(node, restore = id, "the node let go of a restore the hub lost when it was stopped");
                released.push(id);
            }
        }
        if !released.is_empty() {
            self.state().lost_restores.retain(|(_, id)| !released.contains(id));
            self.save_in_flight().await;
        }
    }

    /// Whether restores a killed hub left behind still wait for their node to let go.
    pub fn has_lost_restores(&self) -> bool {
        !self.state().lost_restores.is_empty()
    }
}
