//! The job model and how the API shows it: a job's kind and status, its disks, its state as
//! the follower updates it, and the JSON views of a running job and of a completed backup's
//! manifest (the old hub's shapes, DESIGN.md's contracts).
//!
//! Kept apart from the engine in `jobs` so that what the API promises is read in one place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use node::api::{BackupType, JobView as NodeJob};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::repo::{self, Manifest};

/// A job's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Into the repository.
    Backup,
    /// Into the replica set, in place.
    Replication,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted, resources being prepared.
    Queued,
    /// The node is copying.
    Running,
    /// Images being checked.
    Verifying,
    /// Done and safe.
    Completed,
    /// Stopped by an error.
    Failed,
    /// Stopped by a request.
    Cancelled,
}

impl Status {
    pub(super) fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// One disk's target as the API shows it (the old hub's shape).
#[derive(Debug, Clone, Serialize)]
pub struct DiskResult {
    /// N of `VM-diskN`.
    pub disk_id: u32,
    /// Disk key.
    pub disk_key: u32,
    /// Leased port (0 once released after a restart).
    pub nbd_port: u16,
    /// Export name.
    pub nbd_export_name: String,
    /// Absolute image path.
    pub qcow2_path: String,
    /// Same vocabulary as the job.
    pub status: Status,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// One disk's progress.
#[derive(Debug, Clone, Serialize)]
pub struct DiskProgress {
    /// Disk key.
    pub disk_key: u32,
    /// Disk size.
    pub bytes_total: u64,
    /// Disk bytes dealt with.
    pub bytes_done: u64,
    /// Bytes that travelled.
    pub bytes_sent: u64,
    /// Disk bytes per second.
    pub rate_bps: u64,
    /// Seconds left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// The node's word for the disk.
    pub status: String,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A backup or replication as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// Id (`backup_id` for backups, `replication_id` for replications, by the serializer).
    #[serde(skip)]
    pub id: String,
    /// VM.
    pub vm_name: String,
    /// Node.
    pub node: String,
    /// What was done.
    pub backup_type: String,
    /// Parent backup.
    pub parent_id: Option<String>,
    /// State.
    pub status: Status,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// `KEY:nbd://HOST:PORT/EXPORT,...` as given to the node.
    pub nbd_targets_string: String,
    /// Targets.
    pub disk_results: Vec<DiskResult>,
    /// Progress.
    pub disks: Vec<DiskProgress>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the type differs from the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The operator's labels (backups asked for with `tags`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The `[[schedule]]` whose run made it (absent: a request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// A completed backup's last verification since it completed (a scrub's or a request's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<crate::repo::Verified>,
    /// A completed backup's images rewritten compressed (`compress = "zstd"`): when, the bytes
    /// of data they hold, and the bytes they take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<crate::repo::Compressed>,
}

/// A disk of a job.
#[derive(Debug, Clone)]
pub(super) struct JobDisk {
    /// Disk key (the node's).
    pub(super) key: u32,
    /// N of `VM-diskN`.
    pub(super) id: u32,
    /// Bytes.
    pub(super) size: u64,
    /// The leased port its export listens on.
    pub(super) port: u16,
    /// Export name.
    pub(super) export: String,
    /// The image written.
    pub(super) path: PathBuf,
}

#[derive(Debug)]
pub(super) struct JobState {
    pub(super) status: Status,
    pub(super) error: Option<String>,
    pub(super) completed_at: Option<String>,
    /// The node's last answer for the job (progress, per-disk checksums).
    pub(super) node_view: Option<NodeJob>,
}

/// A running or finished backup or replication.
#[derive(Debug)]
pub struct Job {
    pub(super) id: String,
    pub(super) kind: Kind,
    pub(super) vm: String,
    pub(super) node: String,
    pub(super) backup_type: BackupType,
    pub(super) parent: Option<String>,
    pub(super) note: Option<String>,
    pub(super) tags: Vec<String>,
    /// The retention applied to the VM's backups once this one completes (the request's `keep`
    /// rules; empty: the config's).
    pub(super) retention: crate::retention::Policy,
    /// The `[[schedule]]` whose run this is (none: a request).
    pub(super) schedule: Option<String>,
    pub(super) created_at: String,
    pub(super) disks: Vec<JobDisk>,
    pub(super) targets: String,
    pub(super) cancel: CancellationToken,
    pub(super) state: Mutex<JobState>,
}

impl Job {
    pub(super) fn set(&self, status: Status, error: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.status = status;
            if error.is_some() {
                s.error = error;
            }
            if status.is_final() {
                s.completed_at = Some(repo::now_rfc3339());
            }
        }
    }

    /// Current state.
    pub fn status(&self) -> Status {
        self.state.lock().map(|s| s.status).unwrap_or(Status::Failed)
    }

    /// The API view.
    pub fn view(&self) -> JobView {
        let (status, error, completed_at, node_view) = self
            .state
            .lock()
            .map(|s| (s.status, s.error.clone(), s.completed_at.clone(), s.node_view.clone()))
            .unwrap_or((Status::Failed, Some("state lost".into()), None, None));
        let node_disks: HashMap<u32, node::api::DiskStatus> =
            node_view.map(|v| v.disks.into_iter().map(|d| (d.key, d)).collect()).unwrap_or_default();
        let disk_results = self
            .disks
            .iter()
            .map(|d| DiskResult {
                disk_id: d.id,
                disk_key: d.key,
                nbd_port: d.port,
                nbd_export_name: d.export.clone(),
                qcow2_path: d.path.display().to_string(),
                status: match node_disks.get(&d.key) {
                    Some(n) if n.status == "failed" => Status::Failed,
                    _ => status,
                },
                error_message: node_disks.get(&d.key).and_then(|n| n.error.clone()),
            })
            .collect();
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let n = node_disks.get(&d.key);
                let done = n.map(node::api::DiskStatus::bytes_settled);
                DiskProgress {
                    disk_key: d.key,
                    bytes_total: n.map(|n| n.bytes_total).unwrap_or(d.size),
                    bytes_done: done.unwrap_or(0),
                    bytes_sent: n.map(|n| n.bytes_sent).unwrap_or(0),
                    rate_bps: n.map(|n| n.rate_bps).unwrap_or(0),
                    eta_s: n.and_then(|n| n.eta_s),
                    status: n.map(|n| n.status.clone()).unwrap_or_else(|| "pending".into()),
                    error: n.and_then(|n| n.error.clone()),
                }
            })
            .collect();
        JobView {
            id: self.id.clone(),
            vm_name: self.vm.clone(),
            node: self.node.clone(),
            backup_type: type_name(self.backup_type).into(),
            parent_id: self.parent.clone(),
            status,
            created_at: self.created_at.clone(),
            completed_at,
            nbd_targets_string: self.targets.clone(),
            disk_results,
            disks,
            error,
            note: self.note.clone(),
            tags: self.tags.clone(),
            schedule: self.schedule.clone(),
            verified: None,
            compressed: None,
        }
    }
}

pub(super) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Backup => "backup",
        Kind::Replication => "replication",
    }
}

pub(super) fn type_name(t: BackupType) -> &'static str {
    match t {
        BackupType::Full => "full",
        BackupType::Incremental => "incremental",
    }
}

/// A completed backup (from its manifest) in the shape of a job; `dir`, the backup's directory
/// while it exists, names each image's absolute path as a running backup's view does.
pub(super) fn manifest_view(m: &Manifest, dir: Option<&Path>) -> JobView {
    JobView {
        id: m.backup_id.clone(),
        vm_name: m.vm_name.clone(),
        node: m.node.clone(),
        backup_type: m.backup_type.clone(),
        parent_id: m.parent_id.clone(),
        status: Status::Completed,
        created_at: m.created_at.clone(),
        completed_at: Some(m.completed_at.clone()),
        nbd_targets_string: String::new(),
        disk_results: m
            .disks
            .iter()
            .map(|d| DiskResult {
                disk_id: d.disk_id,
                disk_key: d.disk_key,
                nbd_port: 0,
                nbd_export_name: format!("{}-disk{}", m.vm_name, d.disk_id),
                qcow2_path: dir.map(|dir| dir.join(&d.file).display().to_string()).unwrap_or_default(),
                status: Status::Completed,
                error_message: None,
            })
            .collect(),
        disks: m
            .disks
            .iter()
            .map(|d| DiskProgress {
                disk_key: d.disk_key,
                bytes_total: d.size,
                bytes_done: d.size,
                bytes_sent: d.bytes_sent,
                rate_bps: 0,
                eta_s: None,
                status: "completed".into(),
                error: None,
            })
            .collect(),
        error: None,
        note: m.note.clone(),
        tags: m.tags.clone(),
        schedule: m.schedule.clone(),
        verified: m.verified.clone(),
        compressed: m.compressed.clone(),
    }
}
