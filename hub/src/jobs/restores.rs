//! Restores: read-only exports of one completed backup (reads fall through its backing chain),
//! their leases, and closing them on request or when nobody has read them for `restore_idle`.
//!
//! A restore asked for with `destinations` is also driven onto a node (`restore_run.rs`);
//! otherwise it is not a job: the hub only serves it, and the node (or any NBD client) reads it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::restore_run::{RestoreDisk, RestoreRun};
use super::{new_id, valid_name, Hub};
use crate::error::HubError;
use crate::exports::Access;
use crate::ports::{bindable, Lease};
use crate::repo::Manifest;

/// A restore: read-only exports of one backup.
#[derive(Debug)]
pub struct Restore {
    pub(super) id: String,
    pub(super) backup_id: String,
    /// The node that reads it: the backup's, or the one a driven restore writes onto (the
    /// tunnel endpoint admits that node to its ports).
    pub(super) node: String,
    pub(super) exports: Vec<(u32, u16, String)>,
    pub(super) targets: String,
    pub(super) lease: Mutex<Option<Lease>>,
    pub(super) idle_since: Mutex<Option<Instant>>,
    /// The node's job, when the hub drives the restore.
    pub(super) run: Option<RestoreRun>,
}

/// A restore as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreView {
    /// Id.
    pub restore_id: String,
    /// The backup.
    pub backup_id: String,
    /// Targets for the node.
    pub nbd_targets_string: String,
    /// Exports (while open).
    pub exports: Vec<RestoreExport>,
    /// The node writing the disks, when the hub drives the restore (`destinations`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its job: `running`, `completed` (every disk written and equal to the backup), `failed`,
    /// `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Its disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<RestoreDisk>,
    /// What stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One export of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreExport {
    /// Disk key.
    pub disk_key: u32,
    /// Port.
    pub nbd_port: u16,
    /// Name.
    pub nbd_export_name: String,
}

impl Restore {
    /// The API view.
    pub fn view(&self) -> RestoreView {
        let (status, disks, error) = match &self.run {
            Some(run) => {
                let (status, disks, error) = run.view();
                (Some(status), disks, error)
            }
            None => (None, Vec::new(), None),
        };
        let open = self.lease.lock().is_ok_and(|l| l.is_some());
        RestoreView {
            node: self.run.as_ref().map(|_| self.node.clone()),
            status,
            disks,
            error,
            restore_id: self.id.clone(),
            backup_id: self.backup_id.clone(),
            nbd_targets_string: self.targets.clone(),
            exports: self
                .exports
                .iter()
                .filter(|_| open)
                .map(|(k, p, n)| RestoreExport { disk_key: *k, nbd_port: *p, nbd_export_name: n.clone() })
                .collect(),
        }
    }
}

impl Hub {
    /// Open read-only exports of a backup (reads fall through its chain).
    ///
    /// # Errors
    /// Unknown backup (404), no free port (503).
    pub async fn restore(&self, backup_id: &str) -> Result<RestoreView, HubError> {
        if !valid_name(backup_id) {
            return Err(HubError::BadRequest(format!("backup_id '{backup_id}' is not a valid name")));
        }
        let id = new_id("x");
        let (m, pinned) = self.pin_backup(&id, backup_id, format!("restore {id} is opening its images"))?;
        let r = Arc::new(self.open_restore(&id, &m, None).await?);
        // Listed before the pin goes: the backup stays protected throughout.
        self.state().restores.insert(id, Arc::clone(&r));
        drop(pinned);
        Ok(r.view())
    }

    /// Lease ports for a backup's disks (`only` those keys, if given) and open a read-only
    /// export of each.
    pub(super) async fn open_restore(
        &self,
        id: &str,
        m: &Manifest,
        only: Option<&BTreeSet<u32>>,
    ) -> Result<Restore, HubError> {
        let disks: Vec<_> = m.disks.iter().filter(|d| only.is_none_or(|o| o.contains(&d.disk_key))).collect();
        let bind = self.settings.nbd_bind;
        let lease = self
            .ports
            .lease(id, disks.len(), |p| bindable(bind, p))
            .map_err(|e| HubError::Unavailable(e.to_string()))?;
        let mut exports: Vec<(u32, u16, String)> = Vec::new();
        for (d, port) in disks.into_iter().zip(&lease.ports) {
            let name = format!("{}-{id}-disk{}", m.vm_name, d.disk_id);
            let path = self.repo.backup_dir(&m.vm_name, &m.backup_id).join(&d.file);
            if let Err(e) = self.exports.open(&name, *port, &path, Access::ReadOnly, self.peers_of_every_node()).await {
                for (_, _, n) in &exports {
                    self.exports.close(n).await;
                }
                return Err(HubError::Internal(e));
            }
            exports.push((d.disk_key, *port, name));
        }
        let targets = exports
            .iter()
            .map(|(k, p, n)| format!("{k}:{}://{}:{p}/{n}", self.settings.nbd_scheme(), self.settings.nbd_host))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Restore {
            id: id.to_string(),
            backup_id: m.backup_id.clone(),
            node: m.node.clone(),
            exports,
            targets,
            lease: Mutex::new(Some(lease)),
            idle_since: Mutex::new(Some(Instant::now())),
            run: None,
        })
    }

    /// Close a restore's exports and free its ports; one the hub drives is cancelled on its
    /// node first. A driven restore that has ended answers its record.
    ///
    /// # Errors
    /// Unknown restore (404).
    pub async fn close_restore(&self, id: &str) -> Result<RestoreView, HubError> {
        let driven_by = self.state().restores.get(id).and_then(|r| r.run.as_ref().map(|_| r.node.clone()));
        let client = driven_by.and_then(|n| self.node(&n).map(|(_, c)| c));
        if let Some(view) = self.end_restore(id, client.as_ref()).await {
            return Ok(view);
        }
        self.ended_restore(id).ok_or_else(|| HubError::NotFound(format!("unknown restore {id}")))
    }

    /// Restores open now.
    pub fn restores(&self) -> Vec<RestoreView> {
        self.state().restores.values().map(|r| r.view()).collect()
    }

    /// One restore: open, or a driven one that has ended.
    pub fn restore_view(&self, id: &str) -> Option<RestoreView> {
        let open = self.state().restores.get(id).map(|r| r.view());
        open.or_else(|| self.ended_restore(id))
    }

    /// A restore being ended (its exports closing) or a driven one that has ended.
    fn ended_restore(&self, id: &str) -> Option<RestoreView> {
        let st = self.state();
        st.ending_restores
            .get(id)
            .map(|r| r.view())
            .or_else(|| st.finished_restores.iter().rev().find(|v| v.restore_id == id).cloned())
    }

    /// Close restores nobody has used for the idle time (called periodically).
    pub async fn reap_idle_restores(&self) {
        let idle = self.live().restore_idle;
        // A restore the hub drives ends with its node's job, not by idling.
        let candidates: Vec<Arc<Restore>> =
            self.state().restores.values().filter(|r| r.run.is_none()).cloned().collect();
        for r in candidates {
            let busy = r.exports.iter().any(|(_, _, n)| self.exports.connections(n) > 0);
            let expired = {
                let mut since = r.idle_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if busy {
                    *since = None;
                    false
                } else {
                    since.get_or_insert_with(Instant::now).elapsed() > idle
                }
            };
            if expired {
                tracing::info!(restore = %r.id, "closing an idle restore");
                let _ = self.close_restore(&r.id).await;
            }
        }
    }
}
