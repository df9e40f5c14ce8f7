//! Starting a backup or a replication run: the checks, the parent an incremental builds on (the
//! pure [`choose_parent`]), the port lease, the images, the exports, and the one call to the
//! node. The answer to the API caller comes after all of that worked; on any failure on the way,
//! what was made is taken back (ports, exports, a backup's directory) and the VM is free again.

use std::sync::{Arc, Mutex};

use node::api::{BackupType, StartRequest};
use qcow2::{BackingFormat, CreateOptions};
use tokio_util::sync::CancellationToken;

use super::files::{self, DiskFile, JobFiles};
use super::view::{type_name, JobDisk, JobState};
use super::{new_id, valid_name, Hub, Job, JobView, Kind, Status};
use crate::error::HubError;
use crate::exports::Access;
use crate::ports::bindable;
use crate::repo::{self, Manifest};
use crate::retention::Policy;

/// Which backup an incremental builds on: the newest completed backup of the VM, if the node's
/// change-tracking state was committed for exactly that backup; otherwise a full backup, and why.
/// An incremental on a chain (it and the backups under it) that holds `max_chain` images already
/// is still one (only its changes cross the network), with a note: once it completes, the hub
/// copies its chain's data into it and it stands alone, starting a new chain (`flatten.rs`). Only
/// a chain of [`MAX_CHAIN`] images, which `qcow2` could not open one more image on, gets a full.
pub fn choose_parent<'a>(
    requested: BackupType,
    history: &'a [&'a Manifest],
    node_committed: Option<&str>,
    max_chain: usize,
) -> (BackupType, Option<&'a Manifest>, Option<String>) {
    if requested == BackupType::Full {
        return (BackupType::Full, None, None);
    }
    let Some(newest) =
        history.iter().max_by(|a, b| a.created_at.cmp(&b.created_at).then(a.backup_id.cmp(&b.backup_id)))
    else {
        return (BackupType::Full, None, Some("no completed backup of this VM: a full backup was made".into()));
    };
    if node_committed != Some(newest.backup_id.as_str()) {
        return (
            BackupType::Full,
            None,
            Some(format!(
                "the node's change tracking is not at backup {} (newest): a full backup was made",
                newest.backup_id
            )),
        );
    }
    let max_chain = max_chain.clamp(1, MAX_CHAIN);
    let images = chain_images(newest, |id| history.iter().copied().find(|m| m.backup_id == id), history.len());
    if images >= MAX_CHAIN {
        return (
            BackupType::Full,
            None,
            Some(format!(
                "backup {} ends a chain of {images} images, the most an image can be opened on: a full backup was \
                 made and starts a new chain",
                newest.backup_id
            )),
        );
    }
    if images >= max_chain {
        return (
            BackupType::Incremental,
            Some(newest),
            Some(format!(
                "backup {} ends a chain of {images} images, the most one chain holds (max_chain = {max_chain}): \
                 once complete, this incremental is made to stand alone on the hub (its chain's data copied into \
                 it) and starts a new chain",
                newest.backup_id
            )),
        );
    }
    (BackupType::Incremental, Some(newest), None)
}

/// The most images one chain may be set to hold (`max_chain`): a full backup and the
/// incrementals on it. `qcow2` opens at most [`qcow2::image::MAX_BACKING_DEPTH`] backing files
/// under an image; an incremental on a longer chain could be neither made nor restored.
pub const MAX_CHAIN: usize = qcow2::image::MAX_BACKING_DEPTH + 1;

/// Images one chain holds unless `max_chain` says: a full backup and 63 incrementals, room for
/// any usual retention (`keep_daily = 14` with 8 weeks, 12 months and 3 years is 37) stored as
/// changes only (past it, a backup made to stand alone costs a full image of space). Not the most
/// there is room for: every image of a chain costs a restore
/// or a verification (read through 64 layers at 0.88x of one, through 255 at 0.61x:
/// `benches/scripts/chain-depth.sh`), an export a descriptor per image, and every backup of a
/// chain depends on its full one.
pub const DEFAULT_MAX_CHAIN: usize = 64;

/// Images in `backup`'s chain: it and its parents, as far as `parent` (a backup by id) finds
/// them, at most `most` (a parent loop in hand-edited manifests cannot spin).
pub(super) fn chain_images<'a>(
    backup: &'a Manifest,
    parent: impl Fn(&str) -> Option<&'a Manifest>,
    most: usize,
) -> usize {
    let mut images = 1;
    let mut up = backup.parent_id.as_deref();
    while let Some(id) = up.filter(|_| images <= most) {
        let Some(m) = parent(id) else { break };
        images += 1;
        up = m.parent_id.as_deref();
    }
    images
}

/// The most tags one backup carries.
pub const MAX_TAGS: usize = 16;

/// A backup's tags as asked for: each a valid name, at most [`MAX_TAGS`], repeats dropped (the
/// first place kept).
///
/// # Errors
/// A tag that is not a valid name, or too many (400).
pub fn checked_tags(tags: &[String]) -> Result<Vec<String>, HubError> {
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        if !valid_name(t) {
            return Err(HubError::BadRequest(format!("tag '{t}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    if out.len() > MAX_TAGS {
        return Err(HubError::BadRequest(format!("{} tags: a backup carries at most {MAX_TAGS}", out.len())));
    }
    Ok(out)
}

/// What a run is asked to carry beyond its VM: none of it for a replication run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    /// The operator's labels, kept in the backup's manifest.
    pub tags: &'a [String],
    /// The rules applied to the VM's backups once it completes (`prune.rs`; empty: the config's).
    pub retention: Policy,
    /// The `[[schedule]]` whose run it is (none: a request), kept in the backup's manifest; one
    /// with `keep_*` of its own applies them to the backups it made only.
    pub schedule: Option<&'a str>,
}

/// What [`Hub::prepare`] makes a job of.
struct Run<'a> {
    kind: Kind,
    id: &'a str,
    vm: &'a str,
    node_name: &'a str,
    info: &'a node::api::VmInfo,
    requested: BackupType,
    tags: Vec<String>,
    retention: Policy,
    schedule: Option<String>,
}

impl Hub {
    /// The backup at which `node` committed its change tracking for `vm` (a file beside the VM's
    /// backups, one per node: two nodes may each have a VM of that name). A repository written
    /// before there was one per node has a single `.node-committed`, trusted only where it names
    /// that node's own newest backup ([`choose_parent`] checks).
    fn node_committed(&self, vm: &str, node: &str) -> Option<String> {
        let dir = self.repo.root.join(vm);
        std::fs::read_to_string(dir.join(format!(".node-committed-{node}")))
            .or_else(|_| std::fs::read_to_string(dir.join(".node-committed")))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// The node whose VM the replica set of `vm` holds (from its record; `None` before the
    /// first completed run, or for a record written before nodes were recorded).
    fn replica_owner(&self, vm: &str) -> Option<String> {
        let record = std::fs::read(self.repo.replicas.join(vm).join("replica.json")).ok()?;
        let record: serde_json::Value = serde_json::from_slice(&record).ok()?;
        record["node"].as_str().map(str::to_string)
    }

    /// Start a backup (`Kind::Backup`, carrying what it is [`Asked`]) or a replication run (no tags
    /// nor rules).
    ///
    /// # Errors
    /// Bad names, tags or retention (400), unknown VM or node (404), a job already running for the
    /// VM (409), no free port or node unreachable (503).
    pub async fn start(
        self: &Arc<Self>,
        kind: Kind,
        vm: &str,
        requested: BackupType,
        node: Option<&str>,
        asked: Asked<'_>,
    ) -> Result<JobView, HubError> {
        let Asked { tags, retention, schedule } = asked;
        let tags = checked_tags(tags)?;
        if kind == Kind::Replication && !tags.is_empty() {
            return Err(HubError::BadRequest("a replication run takes no tags".into()));
        }
        if kind == Kind::Replication && !retention.is_empty() {
            return Err(HubError::BadRequest("a replication run takes no keep rules: a VM has one replica".into()));
        }
        retention.validate("keep").map_err(HubError::BadRequest)?;
        if !valid_name(vm) {
            return Err(HubError::BadRequest(format!("vm_name '{vm}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")));
        }
        if let Some(n) = node.filter(|n| !valid_name(n)) {
            return Err(HubError::BadRequest(format!("node '{n}' is not a valid name")));
        }
        let (node_name, info) = self.locate(vm, node).await?;
        if info.disks.is_empty() {
            return Err(HubError::Conflict(format!("VM {vm} has no disks")));
        }
        let into_qcow2 = kind == Kind::Backup || !self.repo.replica_raw;
        if let Some(d) = info.disks.iter().find(|d| into_qcow2 && d.size % 512 != 0) {
            // qemu reads a qcow2 image in 512-byte sectors: such a disk's tail would be lost to
            // every qemu tool, and a rounded-up image would not verify against the node's checksum.
            return Err(HubError::Conflict(format!(
                "disk {} of VM {vm} is {} bytes, not a whole number of 512-byte sectors: a qcow2 image cannot \
                 hold it as qemu reads it",
                d.key, d.size
            )));
        }
        let id = new_id(match kind {
            Kind::Backup => "",
            Kind::Replication => "r",
        });
        // One job per VM at a time, reserved before anything is created.
        {
            let mut st = self.state();
            if let Some(other) = st.busy_vms.get(vm) {
                return Err(HubError::Conflict(format!("VM {vm} already has job {other} running")));
            }
            st.busy_vms.insert(vm.to_string(), id.clone());
        }
        self.reap_orphans(Some(vm)).await;
        let schedule = schedule.map(str::to_string);
        let run = Run { kind, id: &id, vm, node_name: &node_name, info: &info, requested, tags, retention, schedule };
        let result = self.prepare(run).await;
        match result {
            Ok(job) => Ok(job.view()),
            Err(e) => {
                let mut st = self.state();
                st.busy_vms.remove(vm);
                st.pins.remove(&id);
                Err(e)
            }
        }
    }

    async fn prepare(self: &Arc<Self>, run: Run<'_>) -> Result<Arc<Job>, HubError> {
        let Run { kind, id, vm, node_name, info, requested, tags, retention, schedule } = run;
        let (_, client) =
            self.node(node_name).ok_or_else(|| HubError::NotFound(format!("unknown node {node_name}")))?;
        let bind = self.settings.nbd_bind;
        let lease = self
            .ports
            .lease(id, info.disks.len(), |p| bindable(bind, p))
            .map_err(|e| HubError::Unavailable(e.to_string()))?;
        let (backup_type, parent, note) = match kind {
            Kind::Backup => {
                let mut st = self.state();
                // A node's backups chain only on its own: another node may have a VM of this name.
                // A backup being merged away still lies in its chain until the merge is done.
                let merging = st.merges.values().map(|m| &m.from);
                let history: Vec<&Manifest> =
                    st.catalog.values().chain(merging).filter(|m| m.vm_name == vm && m.node == node_name).collect();
                let (t, p, n) = choose_parent(
                    requested,
                    &history,
                    self.node_committed(vm, node_name).as_deref(),
                    self.live().max_chain,
                );
                let p = p.cloned();
                if let Some(p) = &p {
                    // Chosen and pinned under one lock: a delete cannot slip in between.
                    let why = format!("backup {id} is being made as an incremental on top of it");
                    st.pins.insert(id.to_string(), (p.backup_id.clone(), why));
                }
                (t, p, n)
            }
            Kind::Replication => {
                if let Some(owner) = self.replica_owner(vm).filter(|o| *o != node_name) {
                    return Err(HubError::Conflict(format!(
                        "the replica of VM {vm} is node {owner}'s: a VM of the same name on node {node_name} cannot \
                         share it"
                    )));
                }
                let complete = info.disks.iter().all(|d| self.repo.replica_path(vm, d.key).exists())
                    && !self.repo.replica_marker(vm).exists()
                    && self.repo.replicas.join(vm).join("replica.json").exists();
                if complete {
                    (BackupType::Incremental, None, None)
                } else {
                    (BackupType::Full, None, None)
                }
            }
        };
        let dir = match kind {
            Kind::Backup => self.repo.backup_dir(vm, id),
            Kind::Replication => self.repo.replicas.join(vm),
        };
        let owns_dir = kind == Kind::Backup;
        let marker = (kind == Kind::Replication).then(|| (self.repo.replica_marker(vm), id.to_string()));
        let mut disks = Vec::new();
        let mut files = Vec::new();
        let mut access = Vec::new();
        for (i, (d, port)) in info.disks.iter().zip(&lease.ports).enumerate() {
            let path = match kind {
                Kind::Backup => self.repo.disk_path(vm, id, d.key),
                Kind::Replication => self.repo.replica_path(vm, d.key),
            };
            let parent_disk =
                parent.as_ref().and_then(|p| p.disks.iter().find(|pd| pd.disk_key == d.key && pd.size == d.size));
            let file = match (kind, parent_disk) {
                (Kind::Backup, Some(pd)) => {
                    let backing =
                        format!("../{}/{}", parent.as_ref().map(|p| p.backup_id.as_str()).unwrap_or(""), pd.file);
                    DiskFile::Qcow2(CreateOptions::overlay(backing, BackingFormat::Qcow2))
                }
                (Kind::Backup, None) => DiskFile::Qcow2(CreateOptions::new(d.size)),
                (Kind::Replication, _) => {
                    let fresh = match self.repo.replica_raw {
                        true => DiskFile::Raw(d.size),
                        false => DiskFile::Qcow2(CreateOptions::new(d.size)),
                    };
                    match path.exists() && backup_type != BackupType::Full {
                        true => DiskFile::Keep { size: d.size, fresh: Box::new(fresh) },
                        false => fresh,
                    }
                }
            };
            access.push(match file {
                DiskFile::Keep { .. } => Access::Resume,
                _ => Access::Write,
            });
            files.push((path.clone(), file));
            let export = match kind {
                Kind::Backup => format!("{vm}-disk{i}"),
                Kind::Replication => format!("{vm}-replica-disk{i}"),
            };
            disks.push(JobDisk { key: d.key, id: i as u32, size: d.size, port: *port, export, path });
        }
        JobFiles { dir: dir.clone(), owns_dir, marker, disks: files }.make().await?;
        let discard = || async {
            if owns_dir {
                files::remove_dir(dir.clone()).await;
            }
        };
        for (n, (d, access)) in disks.iter().zip(access).enumerate() {
            if let Err(e) = self.exports.open(&d.export, d.port, &d.path, access, self.peers_of(node_name)).await {
                for opened in disks.iter().take(n) {
                    self.exports.close(&opened.export).await;
                }
                discard().await;
                return Err(HubError::Unavailable(e));
            }
        }
        let targets = disks
            .iter()
            .map(|d| {
                format!("{}:{}://{}:{}/{}", d.key, self.settings.nbd_scheme(), self.settings.nbd_host, d.port, d.export)
            })
            .collect::<Vec<_>>()
            .join(",");
        let job = Arc::new(Job {
            id: id.to_string(),
            kind,
            vm: vm.to_string(),
            node: node_name.to_string(),
            backup_type,
            parent: parent.map(|p| p.backup_id),
            note,
            tags,
            retention,
            schedule,
            created_at: repo::now_rfc3339(),
            disks,
            targets: targets.clone(),
            cancel: CancellationToken::new(),
            state: Mutex::new(JobState { status: Status::Queued, error: None, completed_at: None, node_view: None }),
        });
        // Registered before the node is called: the node connects at once, and the SSH fence
        // must already know whose ports these are.
        self.state().jobs.insert(id.to_string(), Arc::clone(&job));
        let req = StartRequest {
            vm_name: vm.to_string(),
            nbd_host: None,
            nbd_targets: targets,
            job_id: id.to_string(),
            backup_type,
        };
        let started = match kind {
            Kind::Backup => client.start_backup(&req).await,
            Kind::Replication => client.replicate(&req).await,
        };
        if let Err(e) = started {
            self.state().jobs.remove(id);
            for d in &job.disks {
                self.exports.close(&d.export).await;
            }
            discard().await;
            return Err(HubError::from_node(node_name, e));
        }
        job.set(Status::Running, None);
        tracing::info!(
            job = id,
            vm,
            node = node_name,
            ?kind,
            backup_type = type_name(backup_type),
            note = job.note.as_deref().unwrap_or(""),
            "job started"
        );
        let hub = Arc::clone(self);
        let follow_job = Arc::clone(&job);
        tokio::spawn(async move { hub.follow(follow_job, lease).await });
        // Named in the record before the start is answered: a hub killed from now on takes it up.
        self.record_runs_changed().await;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::manifest;

    #[test]
    fn an_incremental_builds_on_the_newest_backup_the_node_committed() {
        let (a, b) = (manifest("a", "2026-01-01T00:00:00Z"), manifest("b", "2026-01-02T00:00:00Z"));
        let history = vec![&a, &b];
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some("b"), DEFAULT_MAX_CHAIN);
        assert_eq!((t, p.map(|m| m.backup_id.as_str()), note), (BackupType::Incremental, Some("b"), None));
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some("a"), DEFAULT_MAX_CHAIN);
        assert!(t == BackupType::Full && p.is_none() && note.unwrap().contains("not at backup b"));
        let (t, _, note) = choose_parent(BackupType::Incremental, &[], None, DEFAULT_MAX_CHAIN);
        assert!(t == BackupType::Full && note.unwrap().contains("no completed backup"));
        let (t, p, note) = choose_parent(BackupType::Full, &history, Some("b"), DEFAULT_MAX_CHAIN);
        assert!(t == BackupType::Full && p.is_none() && note.is_none());
    }

    /// A chain of `len` backups: a full one, then incrementals each on the one before.
    fn chain(len: usize) -> Vec<Manifest> {
        (0..len)
            .map(|i| Manifest {
                parent_id: i.checked_sub(1).map(|p| format!("b{p:03}")),
                ..manifest(
                    &format!("b{i:03}"),
                    &format!("2026-01-01T{:02}:{:02}:{:02}Z", i / 3600, i / 60 % 60, i % 60),
                )
            })
            .collect()
    }

    #[test]
    fn an_incremental_on_a_full_chain_stays_one_and_is_to_stand_alone() {
        for max_chain in [1, 17, DEFAULT_MAX_CHAIN, MAX_CHAIN - 1] {
            if max_chain > 1 {
                let room = chain(max_chain - 1);
                let history: Vec<&Manifest> = room.iter().collect();
                let newest = format!("b{:03}", max_chain - 2);
                let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some(&newest), max_chain);
                assert_eq!((t, p.map(|m| m.backup_id.clone()), note), (BackupType::Incremental, Some(newest), None));
            }
            let full = chain(max_chain);
            let history: Vec<&Manifest> = full.iter().collect();
            let newest = format!("b{:03}", max_chain - 1);
            let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some(&newest), max_chain);
            assert_eq!((t, p.map(|m| m.backup_id.clone())), (BackupType::Incremental, Some(newest)));
            let note = note.unwrap();
            let want =
                format!("ends a chain of {max_chain} images, the most one chain holds (max_chain = {max_chain})");
            assert!(note.contains(&want) && note.contains("made to stand alone"), "{max_chain}: {note}");
        }
        // A chain as long as qcow2 opens takes no more image: a full backup.
        let full = chain(MAX_CHAIN);
        let history: Vec<&Manifest> = full.iter().collect();
        let newest = format!("b{:03}", MAX_CHAIN - 1);
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some(&newest), MAX_CHAIN);
        assert!(t == BackupType::Full && p.is_none(), "{note:?}");
        assert!(note.unwrap().contains("the most an image can be opened on"));
        // A setting past what qcow2 opens is held to it (the configuration refuses it first).
        let full = chain(MAX_CHAIN);
        let history: Vec<&Manifest> = full.iter().collect();
        let newest = format!("b{:03}", MAX_CHAIN - 1);
        let (t, _, _) = choose_parent(BackupType::Incremental, &history, Some(&newest), usize::MAX);
        assert_eq!(t, BackupType::Full);
        // Hand-edited manifests whose parents loop do not hang the hub.
        let mut looped = chain(3);
        looped[0].parent_id = Some("b002".into());
        let history: Vec<&Manifest> = looped.iter().collect();
        let (t, _, _) = choose_parent(BackupType::Incremental, &history, Some("b002"), DEFAULT_MAX_CHAIN);
        assert_eq!(t, BackupType::Incremental);
    }
}
