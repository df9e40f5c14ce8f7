//! Backups, replications and driven restores handed over from a hub that stops to the hub that
//! starts next: a graceful stop (`SIGTERM`: `systemctl restart` to upgrade, or to take up a change
//! only a restart takes up) no longer cancels the runs under way, which for a multi-terabyte disk
//! meant copying it again from its first byte.
//!
//! Why that is safe. The node writes each block to a fixed offset (a write may be repeated) and
//! re-makes a broken NBD connection for its `retry_window_s` (120 s by default), repeating the
//! requests that had no answer. A stopping hub stops following its jobs without cancelling them
//! on their nodes, closes every export (each connection finishes the requests it has read, then
//! the image is flushed and closed clean), and only then writes `REPO/.jobs-handed-over.json`:
//! each job, its disks and its ports. So every write the node had an answer for is in an image
//! closed clean. The next start keeps those directories ([`crate::repo::Repo::scan`]), removes the
//! record before it serves anything (the record it keeps itself names the runs taken up within a
//! second), leases the same ports, opens the same
//! exports, and follows the node's job again: the node's retries land on the new hub and the run
//! goes on. The verification at the end (the node's checksum of every disk) still decides.
//! A restore the hub drives onto a node (`restore_run.rs`) is handed over the same way: its
//! read-only exports open again on their ports, the node's reads are repeated, and the checksum
//! of what it wrote is compared with the backup's as before. A schedule's run under way is
//! handed over with what it had done, and goes on (`scheduled.rs`).
//!
//! What is not taken up ends as an interrupted run does (its directory removed, its node job
//! cancelled): a job whose node left the configuration, whose port left the range or is taken,
//! whose image is missing or does not open, or whose parent backup is gone (for a restore: its
//! backup, node or a port is gone). A node that gave up meanwhile (the hub was away longer than its
//! retry window) answers that the job failed, and it ends so.
//!
//! A hub that is killed (no graceful stop) cannot close its exports: while it runs it keeps the same
//! record up to date instead ([`Hub::keep_record`]: written when a run starts, before its start is
//! answered, and when one ends; checked every second for the rest), and the next start takes up
//! what it names. That holds without a clean close because the hub answers a write only once its
//! data and the image's tables are in the file (`qcow2`'s write path): a killed process loses none
//! of them, and what a power cut took is caught by the verification. A run the hub was killed
//! while starting is not named yet, and is removed as an interrupted one.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::api::BackupType;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::files::{self, off_runtime};
use super::restore_run::{RestoreRun, RunState};
use super::restores::Restore;
use super::scheduled::ScheduleRun;
use super::view::{JobDisk, JobState};
use super::{valid_name, Hub, Job, Kind, Status};
use crate::exports::Access;
use crate::ports::bindable;
use crate::retention::Policy;

/// The record's name in the repository.
const RECORD: &str = ".jobs-handed-over.json";
/// The most disks a recorded job may name (a record is read before anything checks it).
const MAX_DISKS: usize = 256;
/// How long a run taken up after a restart waits for its node before the stall rule applies: the
/// node's default `retry_window_s`, for which it keeps retrying a hub that is away.
pub(super) const TAKEN_UP_PATIENCE: Duration = Duration::from_secs(120);

/// One run as a stopping hub hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandedOver {
    pub(super) id: String,
    kind: Kind,
    vm: String,
    node: String,
    backup_type: BackupType,
    parent: Option<String>,
    note: Option<String>,
    tags: Vec<String>,
    retention: Policy,
    /// Absent in a file written before runs named their schedule.
    #[serde(default)]
    schedule: Option<String>,
    created_at: String,
    targets: String,
    disks: Vec<HandedDisk>,
}

/// One disk of a handed-over run. Its export name and image path are derived again, never read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandedDisk {
    key: u32,
    size: u64,
    port: u16,
}

/// A restore the hub drives onto a node, as a stopping hub hands it over. Its export names and
/// image paths are derived again from the backup's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandedRestore {
    pub(super) id: String,
    backup_id: String,
    node: String,
    targets: String,
    /// Disk key -> destination on the node.
    destinations: BTreeMap<u32, String>,
    /// Disk key -> port of its export.
    ports: BTreeMap<u32, u16>,
}

impl HandedRestore {
    fn of(r: &Restore) -> Option<Self> {
        let run = r.run.as_ref()?;
        Some(Self {
            id: r.id.clone(),
            backup_id: r.backup_id.clone(),
            node: r.node.clone(),
            targets: r.targets.clone(),
            destinations: run.destinations.clone(),
            ports: r.exports.iter().map(|(key, port, _)| (*key, *port)).collect(),
        })
    }

    fn well_formed(&self) -> bool {
        [&self.id, &self.backup_id, &self.node].into_iter().all(|n| valid_name(n))
            && !self.ports.is_empty()
            && self.ports.len() <= MAX_DISKS
            && self.ports.keys().eq(self.destinations.keys())
    }
}

/// The record's writer: whether [`Hub::keep_record`] runs (an embedder that does not run it
/// gets no record but its stop's) and what it wrote last.
#[derive(Debug, Default)]
pub(super) struct RecordFile {
    keeping: bool,
    last: Option<Vec<u8>>,
}

/// What a stopping hub hands over, or what a running hub keeps up to date for the start after
/// a kill.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    /// When it was written.
    stopped_at: String,
    /// Written while the hub ran (by [`Hub::keep_record`]): found at a start, the hub was killed.
    #[serde(default)]
    running: bool,
    pub(super) jobs: Vec<HandedOver>,
    #[serde(default)]
    pub(super) restores: Vec<HandedRestore>,
    /// Schedules' runs under way, by schedule name.
    #[serde(default)]
    pub(super) schedule_runs: BTreeMap<String, ScheduleRun>,
}

impl HandedOver {
    fn of(job: &Job) -> Self {
        Self {
            id: job.id.clone(),
            kind: job.kind,
            vm: job.vm.clone(),
            node: job.node.clone(),
            backup_type: job.backup_type,
            parent: job.parent.clone(),
            note: job.note.clone(),
            tags: job.tags.clone(),
            retention: job.retention,
            schedule: job.schedule.clone(),
            created_at: job.created_at.clone(),
            targets: job.targets.clone(),
            disks: job.disks.iter().map(|d| HandedDisk { key: d.key, size: d.size, port: d.port }).collect(),
        }
    }

    /// Names that become paths and export names are checked as a request's are.
    fn well_formed(&self) -> bool {
        let names =
            [&self.id, &self.vm, &self.node].into_iter().chain(&self.parent).chain(&self.tags).chain(&self.schedule);
        names.into_iter().all(|n| valid_name(n)) && !self.disks.is_empty() && self.disks.len() <= MAX_DISKS
    }
}

/// The runs the hub that stopped last handed over (none when there is no record, or it does not
/// read: its runs are then interrupted ones). Removed here, before anything is served.
pub(super) fn take_record(root: &Path) -> Record {
    let path = root.join(RECORD);
    let Ok(bytes) = std::fs::read(&path) else { return Record::default() };
    let record = serde_json::from_slice::<Record>(&bytes);
    if let Err(e) = std::fs::remove_file(&path).and_then(|()| std::fs::File::open(root)?.sync_all()) {
        // Kept, a later start would take up images this hub may have written without a clean close.
        tracing::error!(error = %e, "cannot remove {RECORD}: the runs it lists are not taken up");
        return Record::default();
    }
    match record {
        Ok(mut r) => {
            let before = r.jobs.len() + r.restores.len();
            r.jobs.retain(HandedOver::well_formed);
            r.restores.retain(HandedRestore::well_formed);
            if r.jobs.len() + r.restores.len() < before {
                tracing::warn!("{RECORD}: runs with malformed names are not taken up");
            }
            if r.running {
                tracing::warn!(written_at = %r.stopped_at, jobs = r.jobs.len(), restores = r.restores.len(), "the hub was killed: the runs its record names are taken up");
            } else {
                tracing::info!(stopped_at = %r.stopped_at, jobs = r.jobs.len(), restores = r.restores.len(), "runs handed over by the hub's last stop");
            }
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "{RECORD} does not read: its runs are removed as interrupted");
            Record::default()
        }
    }
}

/// The ids a record keeps from [`crate::repo::Repo::scan`]'s removal.
pub(super) fn kept_ids(jobs: &[HandedOver]) -> HashSet<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

impl Hub {
    /// The runs under way, as a record (not yet stamped). `unclean` names exports whose close
    /// failed: a run with one is left out (the next start removes it as interrupted).
    fn runs_under_way(&self, unclean: &[String]) -> Record {
        let st = self.state();
        let mut live: Vec<&Arc<Job>> = st
            .jobs
            .values()
            .filter(|j| matches!(j.status(), Status::Running | Status::Verifying))
            .filter(|j| !j.disks.iter().any(|d| unclean.contains(&d.export)))
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        let jobs = live.into_iter().map(|j| HandedOver::of(j)).collect();
        let mut restores: Vec<HandedRestore> = st
            .restores
            .values()
            .filter(|r| r.run.as_ref().is_some_and(|run| !run.lock().status.is_final()))
            .filter(|r| !r.exports.iter().any(|(_, _, name)| unclean.contains(name)))
            .filter_map(|r| HandedRestore::of(r))
            .collect();
        restores.sort_by(|a, b| a.id.cmp(&b.id));
        let schedule_runs =
            st.schedules.iter().filter_map(|(name, s)| Some((name.clone(), s.run_under_way()?.clone()))).collect();
        Record { stopped_at: String::new(), running: false, jobs, restores, schedule_runs }
    }

    /// Write `record` stamped now, or remove the file when it names nothing (the caller holds
    /// `record_file`).
    async fn write_record(&self, mut record: Record) -> std::io::Result<usize> {
        let count = record.jobs.len() + record.restores.len();
        let empty = count == 0 && record.schedule_runs.is_empty();
        record.stopped_at = crate::repo::now_rfc3339();
        let (path, root) = (self.repo.root.join(RECORD), self.repo.root.clone());
        off_runtime("writing the record of the runs under way", move || {
            if empty {
                return match std::fs::remove_file(&path) {
                    Ok(()) => std::fs::File::open(&root)?.sync_all(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                };
            }
            let data = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
            node::files::write_atomically(&path, &data)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(count)
    }

    /// At a graceful stop, after the followers let go and every export closed: record the runs
    /// under way for the next start. `unclean` names exports whose close failed (a run with one
    /// is not handed over: the next start removes it as interrupted). Replaces the record
    /// [`Hub::keep_record`] kept, which stops with the shutdown.
    pub(super) async fn hand_over(&self, unclean: &[String]) {
        let _file = self.record_file.lock().await;
        match self.write_record(self.runs_under_way(unclean)).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(jobs = count, "runs under way handed over to the next start"),
            Err(e) => tracing::error!(error = %e, "cannot hand the runs under way over: the next start removes them"),
        }
    }

    /// For a hub that is killed (a crash, the OOM killer, its host's power cut): the record of
    /// the runs under way kept up to date while the hub runs: written when a run starts (before
    /// its start is answered) and when one ends ([`Hub::record_runs_changed`]), and checked every
    /// second for the rest (a schedule's run moving on). The next start takes up what it names as
    /// it takes up a graceful stop's: every write the hub acknowledged is in the image's file
    /// (data and tables are written before the answer; what a power cut took is found by the
    /// verification, which compares the node's checksum of every disk with the image). A run the
    /// hub was killed while starting (its start not answered) is removed as an interrupted run,
    /// as before. Ends with the shutdown, whose [`Hub::hand_over`] writes the last record.
    pub async fn keep_record(self: Arc<Self>) {
        self.record_file.lock().await.keeping = true;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let mut file = self.record_file.lock().await;
            if self.shutdown.is_cancelled() {
                return;
            }
            self.refresh_record(&mut file).await;
        }
    }

    /// A run (or a driven restore, or a schedule's run) started or ended: the record says so now,
    /// not up to a second later, so that a hub killed meanwhile takes up every run it answered
    /// for and none that is over.
    pub(super) async fn record_runs_changed(&self) {
        let mut file = self.record_file.lock().await;
        if file.keeping && !self.shutdown.is_cancelled() {
            self.refresh_record(&mut file).await;
        }
    }

    /// Write the record of the runs under way if it changed since `file` wrote it last.
    async fn refresh_record(&self, file: &mut RecordFile) {
        let mut record = self.runs_under_way(&[]);
        record.running = true;
        let Ok(now) = serde_json::to_vec(&(&record.jobs, &record.restores, &record.schedule_runs)) else { return };
        if file.last.as_ref() == Some(&now) {
            return;
        }
        match self.write_record(record).await {
            Ok(_) => file.last = Some(now),
            Err(e) => tracing::warn!(error = %e, "cannot write the record of the runs under way"),
        }
    }

    /// Take up the runs the last stop handed over: each goes on where its node is, or ends as an
    /// interrupted run. Called once at start, before schedules run.
    pub async fn take_up_handed_over(self: &Arc<Self>) {
        let restores = std::mem::take(&mut self.state().handed_restores);
        for h in &restores {
            // Known as taken up before its follower starts (which waits longer for its node).
            self.state().taken_up.insert(h.id.clone());
            match self.take_up_restore(h).await {
                Ok(()) => {
                    tracing::info!(restore = %h.id, node = %h.node, "restore taken up after the restart");
                    self.state().handover_counts.0 += 1;
                }
                Err(why) => {
                    tracing::warn!(restore = %h.id, node = %h.node, reason = %why, "handed-over restore not taken up: cancelled on its node");
                    let mut st = self.state();
                    st.taken_up.remove(&h.id);
                    st.lost_restores.push((h.node.clone(), h.id.clone()));
                    st.handover_counts.1 += 1;
                }
            }
        }
        if !restores.is_empty() {
            self.save_in_flight().await;
        }
        let pending = std::mem::take(&mut self.state().handed_over);
        for h in pending {
            if self.state().catalog.contains_key(&h.id) {
                tracing::info!(job = %h.id, vm = %h.vm, "a handed-over backup had completed before the stop");
                continue;
            }
            self.state().taken_up.insert(h.id.clone());
            match self.take_up(&h).await {
                Ok(()) => {
                    tracing::info!(job = %h.id, vm = %h.vm, node = %h.node, "run taken up after the restart");
                    self.state().handover_counts.0 += 1;
                }
                Err(why) => {
                    tracing::warn!(job = %h.id, vm = %h.vm, reason = %why, "handed-over run not taken up: removed as interrupted");
                    if h.kind == Kind::Backup {
                        files::remove_dir(self.repo.backup_dir(&h.vm, &h.id)).await;
                    }
                    let mut st = self.state();
                    st.taken_up.remove(&h.id);
                    st.orphans.push((h.vm.clone(), h.id.clone()));
                    st.handover_counts.1 += 1;
                }
            }
        }
    }

    async fn take_up(self: &Arc<Self>, h: &HandedOver) -> Result<(), String> {
        if self.node(&h.node).is_none() {
            return Err(format!("node {} is no longer configured", h.node));
        }
        let disks: Vec<JobDisk> = h
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| JobDisk {
                key: d.key,
                id: i as u32,
                size: d.size,
                port: d.port,
                export: match h.kind {
                    Kind::Backup => format!("{}-disk{i}", h.vm),
                    Kind::Replication => format!("{}-replica-disk{i}", h.vm),
                },
                path: match h.kind {
                    Kind::Backup => self.repo.disk_path(&h.vm, &h.id, d.key),
                    Kind::Replication => self.repo.replica_path(&h.vm, d.key),
                },
            })
            .collect();
        if let Some(missing) = disks.iter().find(|d| !d.path.exists()) {
            return Err(format!("{} is missing", missing.path.display()));
        }
        {
            let mut st = self.state();
            if let Some(other) = st.busy_vms.get(&h.vm) {
                return Err(format!("VM {} has job {other} already", h.vm));
            }
            if let Some(parent) = &h.parent {
                if !st.catalog.contains_key(parent) {
                    return Err(format!("its parent backup {parent} is gone"));
                }
                let why = format!("backup {} is being made as an incremental on top of it", h.id);
                st.pins.insert(h.id.clone(), (parent.clone(), why));
            }
            st.busy_vms.insert(h.vm.clone(), h.id.clone());
        }
        let opened = self.reopen(h, &disks).await;
        let lease = match opened {
            Ok(lease) => lease,
            Err(e) => {
                let mut st = self.state();
                st.busy_vms.remove(&h.vm);
                st.pins.remove(&h.id);
                return Err(e);
            }
        };
        let job = Arc::new(Job {
            id: h.id.clone(),
            kind: h.kind,
            vm: h.vm.clone(),
            node: h.node.clone(),
            backup_type: h.backup_type,
            parent: h.parent.clone(),
            note: h.note.clone(),
            tags: h.tags.clone(),
            retention: h.retention,
            schedule: h.schedule.clone(),
            created_at: h.created_at.clone(),
            disks,
            targets: h.targets.clone(),
            cancel: CancellationToken::new(),
            state: Mutex::new(JobState { status: Status::Running, error: None, completed_at: None, node_view: None }),
        });
        self.state().jobs.insert(job.id.clone(), Arc::clone(&job));
        let hub = Arc::clone(self);
        tokio::spawn(async move { hub.follow(job, lease).await });
        Ok(())
    }

    async fn take_up_restore(self: &Arc<Self>, h: &HandedRestore) -> Result<(), String> {
        let client = self.node(&h.node).map(|(_, c)| c).ok_or(format!("node {} is no longer configured", h.node))?;
        let why = format!("restore {} is opening its images again", h.id);
        let (m, pinned) = self.pin_backup(&h.id, &h.backup_id, why).map_err(|e| e.to_string())?;
        let mut exports = Vec::new();
        for (key, port) in &h.ports {
            let d = m
                .disks
                .iter()
                .find(|d| d.disk_key == *key)
                .ok_or(format!("backup {} has no disk {key}", m.backup_id))?;
            let name = format!("{}-{}-disk{}", m.vm_name, h.id, d.disk_id);
            exports.push((*key, *port, name, self.repo.backup_dir(&m.vm_name, &m.backup_id).join(&d.file)));
        }
        let bind = self.settings.nbd_bind;
        let ports: Vec<u16> = exports.iter().map(|e| e.1).collect();
        let lease = self.ports.lease_exact(&h.id, &ports, |p| bindable(bind, p))?;
        for (n, (_, port, name, path)) in exports.iter().enumerate() {
            if let Err(e) = self.exports.open(name, *port, path, Access::ReadOnly, self.peers_of_every_node()).await {
                for (_, _, opened, _) in exports.iter().take(n) {
                    self.exports.close(opened).await;
                }
                return Err(e);
            }
        }
        let run = RestoreRun {
            destinations: h.destinations.clone(),
            expected: m
                .disks
                .iter()
                .filter(|d| h.ports.contains_key(&d.disk_key))
                .map(|d| (d.disk_key, d.checksum.clone()))
                .collect(),
            state: Mutex::new(RunState { status: node::api::JobStatus::Running, disks: Vec::new(), error: None }),
        };
        let r = Arc::new(Restore {
            id: h.id.clone(),
            backup_id: m.backup_id.clone(),
            node: h.node.clone(),
            exports: exports.into_iter().map(|(key, port, name, _)| (key, port, name)).collect(),
            targets: h.targets.clone(),
            lease: Mutex::new(Some(lease)),
            idle_since: Mutex::new(Some(Instant::now())),
            run: Some(run),
        });
        {
            let mut st = self.state();
            st.restores.insert(h.id.clone(), Arc::clone(&r));
            st.driven.insert(h.id.clone(), h.node.clone());
        }
        drop(pinned);
        let hub = Arc::clone(self);
        tokio::spawn(async move { hub.follow_restore(r, client).await });
        Ok(())
    }

    /// The same ports and exports as before the stop; all or none.
    async fn reopen(&self, h: &HandedOver, disks: &[JobDisk]) -> Result<crate::ports::Lease, String> {
        let bind = self.settings.nbd_bind;
        let ports: Vec<u16> = disks.iter().map(|d| d.port).collect();
        let lease = self.ports.lease_exact(&h.id, &ports, |p| bindable(bind, p))?;
        for (n, d) in disks.iter().enumerate() {
            if let Err(e) = self.exports.open(&d.export, d.port, &d.path, Access::Resume, self.peers_of(&h.node)).await
            {
                for opened in disks.iter().take(n) {
                    self.exports.close(&opened.export).await;
                }
                return Err(e);
            }
        }
        Ok(lease)
    }

    /// Whether `id` is a run this start took up from the last stop (a schedule's run that the
    /// stop cut short follows it instead of skipping its VM).
    pub(super) fn was_taken_up(&self, id: &str) -> bool {
        self.state().taken_up.contains(id)
    }

    /// Runs taken up at start, and runs handed over that could not be.
    pub fn handover_counts(&self) -> (u64, u64) {
        self.state().handover_counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(id: &str) -> HandedOver {
        HandedOver {
            id: id.into(),
            kind: Kind::Backup,
            vm: "vm".into(),
            node: "default".into(),
            backup_type: BackupType::Incremental,
            parent: Some("p".into()),
            note: None,
            tags: vec!["nightly".into()],
            retention: Policy { last: Some(3), ..Policy::default() },
            schedule: Some("nightly".into()),
            created_at: "2026-11-30T01:00:00Z".into(),
            targets: "2000:nbd://h:10100/vm-disk0".into(),
            disks: vec![HandedDisk { key: 2000, size: 1 << 20, port: 10100 }],
        }
    }

    #[test]
    fn a_record_is_read_once_and_malformed_runs_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = handed("b2");
        bad.vm = "../etc".into();
        let restore = HandedRestore {
            id: "x1".into(),
            backup_id: "b0".into(),
            node: "default".into(),
            targets: "2000:nbd://h:10101/vm-x1-disk0".into(),
            destinations: BTreeMap::from([(2000, "/var/lib/vm/d0".into())]),
            ports: BTreeMap::from([(2000, 10101)]),
        };
        // Fields the API leaves out when empty read back as empty.
        let run = ScheduleRun {
            occurrence: Some("2026-11-30T02:00:00Z".into()),
            trigger: super::super::Trigger::Schedule,
            started_at: "2026-11-30T02:00:00.01Z".into(),
            ended_at: None,
            backups: vec![super::super::ScheduledBackup {
                vm_name: "vm".into(),
                node: None,
                backup_id: Some("b1".into()),
                replication_id: None,
                status: super::super::Outcome::Running,
                error: None,
            }],
            errors: vec![],
        };
        let mut unmatched = restore.clone();
        unmatched.ports.insert(2001, 10102);
        let record = Record {
            stopped_at: "now".into(),
            running: false,
            jobs: vec![handed("b1"), bad],
            restores: vec![restore.clone(), unmatched],
            schedule_runs: BTreeMap::from([("nightly".to_string(), run.clone())]),
        };
        std::fs::write(dir.path().join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        let taken = take_record(dir.path());
        assert_eq!((taken.jobs.clone(), taken.restores), (vec![handed("b1")], vec![restore]));
        assert_eq!(taken.schedule_runs.get("nightly"), Some(&run));
        assert!(!dir.path().join(RECORD).exists(), "a record is taken up once");
        assert!(take_record(dir.path()).jobs.is_empty());
        // A record that does not read hands nothing over, and is gone too.
        std::fs::write(dir.path().join(RECORD), b"{\"jobs\": 3}").unwrap();
        assert!(take_record(dir.path()).jobs.is_empty());
        assert!(!dir.path().join(RECORD).exists());
        assert_eq!(kept_ids(&taken.jobs), HashSet::from(["b1".to_string()]));
    }
}
