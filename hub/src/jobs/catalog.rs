//! The hub's catalog as the API reads and changes it: a job or backup by id, lists, cancel and
//! delete, verify on request, the pins that keep a backup from being deleted while something
//! reads it, and the counts the metrics report.

use std::collections::BTreeMap;

use super::files;
use super::merge::listed_view;
use super::scrub;
use super::view::{kind_name, manifest_view};
use super::{new_id, Hub, JobView, Kind};
use crate::error::HubError;
use crate::repo::Manifest;
use crate::verify::{forget_cached_chain, verify_disk, DiskVerdict};

/// A backup pinned by [`Hub::pin_backup`]; let go of when dropped (on every path, a dropped
/// future's too). Never dropped while the caller holds the state lock.
pub(super) struct Pinned<'a> {
    hub: &'a Hub,
    holder: String,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.hub.state().pins.remove(&self.holder);
    }
}

impl Hub {
    /// A backup or a replication run by id (running, failed, cancelled, or a completed backup
    /// from the catalog); the other kind's ids are not found.
    pub fn get(&self, kind: Kind, id: &str) -> Option<JobView> {
        let st = self.state();
        if let Some(j) = st.jobs.get(id).filter(|j| j.kind == kind) {
            return Some(j.view());
        }
        st.catalog.get(id).filter(|_| kind == Kind::Backup).map(|m| listed_view(m, &st.merges, &self.repo))
    }

    /// Backups (or replications), newest first: of VM `vm`, with tag `tag`, where given.
    pub fn list(&self, kind: Kind, vm: Option<&str>, tag: Option<&str>) -> Vec<JobView> {
        let st = self.state();
        let mut out: Vec<JobView> = st.jobs.values().filter(|j| j.kind == kind).map(|j| j.view()).collect();
        if kind == Kind::Backup {
            out.extend(st.catalog.values().map(|m| listed_view(m, &st.merges, &self.repo)));
        }
        out.retain(|v| vm.is_none_or(|vm| v.vm_name == vm) && tag.is_none_or(|t| v.tags.iter().any(|have| have == t)));
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        out
    }

    /// Cancel a running backup or replication run, or delete a finished backup (forget a
    /// finished run); the other kind's ids are not found.
    ///
    /// # Errors
    /// Unknown (404); a later backup, a restore or a verify depends on it, or it is being merged
    /// away (409).
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<JobView, HubError> {
        match self.forget(kind, id)? {
            Forgotten::Job(view) => Ok(view),
            Forgotten::Backup(m) => {
                if let Err(e) = files::remove_backup(self.repo.backup_dir(&m.vm_name, id)).await {
                    // Still whole on disk: it stays listed.
                    self.state().catalog.insert(m.backup_id.clone(), m);
                    return Err(e);
                }
                Ok(manifest_view(&m, None))
            }
        }
    }

    /// [`Hub::delete`] in memory: the job cancelled or dropped, or the backup out of the catalog
    /// (its files are the caller's to remove).
    fn forget(&self, kind: Kind, id: &str) -> Result<Forgotten, HubError> {
        let mut st = self.state();
        if let Some(j) = st.jobs.get(id).filter(|j| j.kind == kind).cloned() {
            if !j.status().is_final() {
                j.cancel.cancel();
                return Ok(Forgotten::Job(j.view()));
            }
            st.jobs.remove(id);
            return Ok(Forgotten::Job(j.view()));
        }
        if let Some(merge) = st.merge_of(id).filter(|_| kind == Kind::Backup) {
            // Being merged away: only the merge (or its retry) deletes it.
            return Err(HubError::Conflict(merge.blocks()));
        }
        let m = st
            .catalog
            .get(id)
            .filter(|_| kind == Kind::Backup)
            .cloned()
            .ok_or_else(|| HubError::NotFound(format!("unknown {} {id}", kind_name(kind))))?;
        if let Some(child) = st.catalog.values().find(|c| c.parent_id.as_deref() == Some(id)) {
            return Err(HubError::Conflict(format!(
                "backup {} is an incremental on top of {id} (DELETE ?merge=true merges it into {id} and deletes {id})",
                child.backup_id
            )));
        }
        if let Some(m) = st.merges.get(&m.vm_name) {
            return Err(HubError::Conflict(m.blocks()));
        }
        if let Some((_, why)) = st.pins.values().find(|(backup, _)| backup == id) {
            return Err(HubError::Conflict(format!("backup {id} is in use: {why}")));
        }
        if st.restores.values().any(|r| r.backup_id == id) {
            return Err(HubError::Conflict(format!("backup {id} has an open restore")));
        }
        st.catalog.remove(id);
        Ok(Forgotten::Backup(m))
    }

    /// Verify a completed backup on demand.
    ///
    /// # Errors
    /// Unknown or not completed (404).
    pub async fn verify(&self, id: &str) -> Result<(bool, Vec<DiskVerdict>), HubError> {
        let holder = new_id("v");
        let (m, _pinned) = self.pin_backup(&holder, id, format!("verify {holder} is reading it"))?;
        let _turn = self.verify_turn().await;
        let mut out = Vec::new();
        for d in &m.disks {
            let path = self.repo.backup_dir(&m.vm_name, id).join(&d.file);
            let (key, sum) = (d.disk_key, d.checksum.clone());
            let uncached = self.settings.direct_io;
            let v = tokio::task::spawn_blocking(move || {
                let verdict = verify_disk(&path, key, sum.as_deref());
                if uncached {
                    forget_cached_chain(&path);
                }
                verdict
            })
            .await
            .map_err(|e| HubError::Internal(format!("verify: {e}")))?;
            out.push(v);
        }
        let ok = out.iter().all(DiskVerdict::ok);
        self.record_verification(&m, ok, (!ok).then(|| scrub::problems(&out))).await;
        Ok((ok, out))
    }

    /// The manifest of completed backup `id`, pinned for `holder` under the same lock (see `State::pins`),
    /// so that it is not deleted before the returned guard is dropped.
    ///
    /// # Errors
    /// No such completed backup (404).
    pub(super) fn pin_backup(&self, holder: &str, id: &str, why: String) -> Result<(Manifest, Pinned<'_>), HubError> {
        let mut st = self.state();
        let m = st.catalog.get(id).cloned().ok_or_else(|| HubError::NotFound(format!("no completed backup {id}")))?;
        st.pins.insert(holder.to_string(), (id.to_string(), why));
        Ok((m, Pinned { hub: self, holder: holder.to_string() }))
    }

    /// Jobs by status, for the metrics.
    pub fn counts(&self) -> (BTreeMap<String, usize>, usize) {
        let st = self.state();
        let mut by = BTreeMap::new();
        for j in st.jobs.values() {
            *by.entry(format!("{:?}", j.status()).to_lowercase()).or_insert(0) += 1;
        }
        (by, st.catalog.len())
    }

    /// Per VM and node, what the catalog holds of its backups (for the metrics), with the VMs the
    /// nodes list that have none.
    pub fn vm_summaries(&self) -> Vec<VmSummary> {
        let listed = self.listed_vms();
        let st = self.state();
        let mut by: BTreeMap<(&str, &str), VmSummary> = BTreeMap::new();
        let blank = |vm: &str, node: &str| VmSummary {
            vm: vm.to_string(),
            node: node.to_string(),
            backups: 0,
            stored_bytes: 0,
            last_completed: None,
            backup_schedules: 0,
            excluded: false,
        };
        // The VMs the nodes list count too, with no backups: a VM nobody backs up shows as 0.
        for (node, vm, _) in &listed {
            by.entry((&vm.name, node)).or_insert_with(|| blank(&vm.name, node));
        }
        for m in st.catalog.values() {
            let s = by.entry((&m.vm_name, &m.node)).or_insert_with(|| blank(&m.vm_name, &m.node));
            s.backups += 1;
            // Compressed since it completed: what the files take now.
            s.stored_bytes += m
                .compressed
                .as_ref()
                .map_or_else(|| m.disks.iter().map(|d| d.allocated_bytes).sum(), |c| c.stored_bytes);
            let completed = m.completed_at.parse::<jiff::Timestamp>().ok().map(|t| t.as_second());
            s.last_completed = s.last_completed.max(completed);
        }
        let mut out: Vec<VmSummary> = by.into_values().collect();
        drop(st);
        for s in &mut out {
            let (covering, excluding) = self.backup_schedules_of(&s.vm, &s.node);
            (s.backup_schedules, s.excluded) = (covering.len(), !excluding.is_empty());
        }
        out
    }
}

/// A VM's backups from one node, summed up ([`Hub::vm_summaries`]).
#[derive(Debug, Clone)]
pub struct VmSummary {
    /// The VM.
    pub vm: String,
    /// The node whose VM it is.
    pub node: String,
    /// Backups in the catalog.
    pub backups: usize,
    /// Bytes their images hold (each image its own layer).
    pub stored_bytes: u64,
    /// When the newest completed (Unix seconds).
    pub last_completed: Option<i64>,
    /// The backup schedules that back it up.
    pub backup_schedules: usize,
    /// A backup schedule's `exclude` leaves it out on purpose.
    pub excluded: bool,
}

/// What [`Hub::forget`] took out of memory.
enum Forgotten {
    /// A job: cancelled if it was running.
    Job(JobView),
    /// A completed backup: its directory is still to be removed.
    Backup(Manifest),
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use qcow2::CreateOptions;

    use super::*;
    use crate::jobs::tests::{hub_in, manifest};
    use crate::repo;

    /// A completed backup `id` of two disks on disk and in the catalog, the first holding 4 MiB
    /// of data (so that reading it takes a moment).
    fn add_backup(hub: &Hub, id: &str) {
        let disk = |key: u32| repo::ManifestDisk {
            disk_key: key,
            disk_id: key - 2000,
            size: 8 << 20,
            allocated_bytes: 0,
            checksum: None,
            file: repo::disk_file(key),
            bytes_sent: 0,
        };
        let m = Manifest { disks: vec![disk(2000), disk(2001)], ..manifest(id, "2026-01-01T00:00:00Z") };
        std::fs::create_dir_all(hub.repo.backup_dir("vm", id)).unwrap();
        for key in [2000, 2001] {
            let img = qcow2::Image::create(hub.repo.disk_path("vm", id, key), &CreateOptions::new(8 << 20)).unwrap();
            if key == 2000 {
                img.write_at(&vec![0x5a; 4 << 20], 0).unwrap();
            }
            img.close().unwrap();
        }
        let (path, data) = hub.repo.manifest_file(&m).unwrap();
        std::fs::write(path, data).unwrap();
        hub.state().catalog.insert(id.into(), m);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_is_never_deleted_under_a_restore_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(6);
        let hub = hub_in(dir.path(), (first, first + 5));
        for round in 0..40u64 {
            let id = format!("b{round}");
            add_backup(&hub, &id);
            let restoring = tokio::spawn({
                let (hub, id) = (Arc::clone(&hub), id.clone());
                async move { hub.restore(&id).await }
            });
            // The delete lands at a different moment of the restore's opening each round.
            tokio::time::sleep(Duration::from_micros(round * 40)).await;
            let deleted = hub.delete(Kind::Backup, &id).await;
            match (restoring.await.unwrap(), deleted) {
                (Ok(r), Err(HubError::Conflict(why))) => {
                    assert!(why.contains(&id), "{why}");
                    hub.close_restore(&r.restore_id).await.unwrap();
                    hub.delete(Kind::Backup, &id).await.unwrap();
                }
                (Err(HubError::NotFound(_)), Ok(_)) => {}
                (restored, deleted) => panic!("round {round}: restore {restored:?}, delete {deleted:?}"),
            }
            assert!(!hub.repo.backup_dir("vm", &id).exists(), "round {round}");
            assert!(hub.restores().is_empty() && hub.exports.views().is_empty(), "round {round}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pinned_backup_is_kept_until_its_holder_lets_go_even_a_dropped_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let hub = hub_in(dir.path(), (first, first + 1));
        add_backup(&hub, "b0");
        let (_, pinned) = hub.pin_backup("v1", "b0", "verify v1 is reading it".into()).unwrap();
        match hub.delete(Kind::Backup, "b0").await {
            Err(HubError::Conflict(why)) => assert!(why.contains("verify v1 is reading it"), "{why}"),
            other => panic!("{other:?}"),
        }
        drop(pinned);
        assert!(hub.state().pins.is_empty());
        // A verify whose caller went away lets go too.
        let verifying = tokio::spawn({
            let hub = Arc::clone(&hub);
            async move { hub.verify("b0").await }
        });
        tokio::task::yield_now().await;
        verifying.abort();
        let _ = verifying.await;
        assert!(hub.state().pins.is_empty());
        hub.delete(Kind::Backup, "b0").await.unwrap();
        assert!(!hub.repo.backup_dir("vm", "b0").exists());
    }
}
