//! Backups, replications and restores: leases, images, exports, the node's job, and cleanup on
//! every exit path.
//!
//! A backup or replication is one job per VM (the node takes one snapshot for all its disks):
//! `queued -> running -> verifying -> completed | failed | cancelled`. The hub leases a port per
//! disk, creates the images (an incremental's are overlays of the parent's, relative backing
//! path), opens the exports, and calls the node once; the answer to the API caller comes after
//! all of that succeeded, so a failure is in the answer, never a surprise for the node. A
//! follower task polls the node's job; a watchdog fails a job that makes no progress. On
//! success: exports flushed and closed, ports released, every image verified (refcounts and the
//! node's checksum), `manifest.json` written last and atomically, and only then the node told to
//! commit its change-tracking state. On failure or cancel: exports closed, ports released,
//! partial images removed, the reason kept.
//!
//! Which backup an incremental builds on is the pure function [`choose_parent`]. The job model
//! and its API views are in `view`, the follower and a job's end in `follow`, the files a job
//! makes and removes (off the runtime) in `files`, restores in `restores` (and those the hub
//! drives onto a node in `restore_run`), deleting a backup an incremental builds on in `merge`,
//! retention in `prune`, background re-verification in `scrub`, backup schedules at work in
//! `scheduled`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::api::{BackupType, NodeClient, StartRequest};
use qcow2::{BackingFormat, CreateOptions};
use tokio_util::sync::CancellationToken;

use crate::config::{NodeSpec, Settings};
use crate::error::HubError;
use crate::exports::Exports;
use crate::peers::{LocalUsers, Peers};
use crate::ports::{bindable, Ports};
use crate::repo::{self, Manifest, Repo};
use crate::retention::Policy;
use crate::verify::{forget_cached_chain, verify_disk, DiskVerdict};

mod files;
mod follow;
mod merge;
mod prune;
mod restore_run;
mod restores;
mod scheduled;
mod scrub;
mod view;

use files::{DiskFile, JobFiles};

pub use prune::{PruneEntry, PruneView};
pub use restore_run::RestoreDisk;
pub use restores::{Restore, RestoreExport, RestoreView};
pub use scheduled::{Outcome, ScheduleRun, ScheduleView, ScheduledBackup, Trigger};
use view::{kind_name, manifest_view, type_name, JobDisk, JobState};
pub use view::{DiskProgress, DiskResult, Job, JobView, Kind, Status};

/// How often the node's job is polled.
const POLL: Duration = Duration::from_millis(100);
/// How often a job is polled once its node has done 90% of it: the end of a short job (an
/// incremental takes a fraction of a second) is noticed within tens of milliseconds.
const POLL_FINISHING: Duration = Duration::from_millis(20);
/// Finished (not completed) jobs kept in memory.
const KEEP_FINISHED: usize = 500;

/// Which backup an incremental builds on: the newest completed backup of the VM, if the node's
/// change-tracking state was committed for exactly that backup and its chain (it and the
/// backups under it) has room for one more image ([`MAX_CHAIN`]); otherwise a full backup, and
/// why.
pub fn choose_parent<'a>(
    requested: BackupType,
    history: &'a [&'a Manifest],
    node_committed: Option<&str>,
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
    let images = chain_images(newest, history);
    if images >= MAX_CHAIN {
        return (
            BackupType::Full,
            None,
            Some(format!(
                "backup {} ends a chain of {images} images, the most one chain holds ({MAX_CHAIN}): a \
                 full backup was made and starts a new chain",
                newest.backup_id
            )),
        );
    }
    (BackupType::Incremental, Some(newest), None)
}

/// The most images one chain holds: a full backup and the incrementals on it. `qcow2` opens at
/// most [`qcow2::image::MAX_BACKING_DEPTH`] backing files under an image; an incremental on a
/// longer chain could be neither made nor restored, so the hub makes a full backup instead.
pub const MAX_CHAIN: usize = qcow2::image::MAX_BACKING_DEPTH + 1;

/// Images in `backup`'s chain: it and its parents, as far as `history` holds them.
fn chain_images(backup: &Manifest, history: &[&Manifest]) -> usize {
    let mut images = 1;
    let mut parent = backup.parent_id.as_deref();
    // Bounded by the history: a parent loop in hand-edited manifests cannot spin.
    while let Some(id) = parent.filter(|_| images <= history.len()) {
        let Some(up) = history.iter().find(|m| m.backup_id == id) else { break };
        images += 1;
        parent = up.parent_id.as_deref();
    }
    images
}

/// Cancel `id` on the node and wait (up to 30 s) until it is over there; true when it is.
async fn release_node_job(client: &NodeClient, id: &str) -> bool {
    match client.cancel(id).await {
        Ok(_) => {}
        Err(node::api::ApiError::Status { status: 404, .. }) => return true,
        Err(_) => return false,
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match client.job(id).await {
            Ok(view) if view.status.is_final() => return true,
            Err(node::api::ApiError::Status { status: 404, .. }) => return true,
            _ => tokio::time::sleep(POLL).await,
        }
    }
    false
}

/// The hub: every job, restore, lease and export.
pub struct Hub {
    /// Settings.
    pub settings: Settings,
    /// Repository paths.
    pub repo: Repo,
    /// Port leases.
    pub ports: Arc<Ports>,
    /// Exports.
    pub exports: Exports,
    nodes: Vec<(NodeSpec, NodeClient)>,
    /// The accounts on this machine whose TCP clients exports admit.
    local_users: LocalUsers,
    state: Mutex<State>,
    shutdown: CancellationToken,
    /// Taken while the list of restores in flight is written, so that writes never cross.
    in_flight_file: tokio::sync::Mutex<()>,
    /// Per configured schedule (same order): held by its run under way (`scheduled.rs`).
    schedule_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Taken while the schedules' marks are written.
    marks_file: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    catalog: BTreeMap<String, Manifest>,
    jobs: HashMap<String, Arc<Job>>,
    finished: std::collections::VecDeque<String>,
    busy_vms: HashMap<String, String>,
    restores: HashMap<String, Arc<Restore>>,
    /// Restores the hub drove onto a node that have ended, the newest last (`restore_run.rs`).
    finished_restores: std::collections::VecDeque<RestoreView>,
    /// Restores the hub drives on a node now, by id: their node (kept in the repository).
    driven: BTreeMap<String, String>,
    /// Restores a killed hub left running on nodes, as (node, id): cancelled there when the
    /// node answers.
    lost_restores: Vec<(String, String)>,
    /// Runs a killed hub left behind, as (VM, job id): their node jobs are cancelled before
    /// the VM's next run, and in the background from the start.
    orphans: Vec<(String, String)>,
    /// Backups something in progress needs, by holder (a run's, restore's or verify's id): the
    /// backup and why. Such a backup is not deleted (409) until its holder is done with it: an
    /// incremental is laid over its parent until it completes (and is then in the catalog, which
    /// protects the parent in turn), a restore opens its images before it is listed, a verify
    /// reads them.
    pins: HashMap<String, (String, String)>,
    /// Merges of a backup into its incremental (`merge.rs`), by VM: running, or failed and
    /// waiting for a retry. Other deletes of the VM's backups wait for them.
    merges: HashMap<String, merge::Merge>,
    /// Schedules' next occurrences and runs, by name (`scheduled.rs`).
    schedules: BTreeMap<String, scheduled::ScheduleState>,
}

fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 3];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    let t = repo::now_rfc3339().replace(['-', ':', '.'], "");
    format!("{prefix}{}-{:02x}{:02x}{:02x}", t.trim_end_matches('Z'), bytes[0], bytes[1], bytes[2])
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

/// A backup pinned by [`Hub::pin_backup`]; let go of when dropped (on every path, a dropped
/// future's too). Never dropped while the caller holds the state lock.
struct Pinned<'a> {
    hub: &'a Hub,
    holder: String,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.hub.state().pins.remove(&self.holder);
    }
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
}

/// Names from requests: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    node::config::valid_name(name)
}

impl Hub {
    /// Build the hub: scan the repository (removing interrupted backups), all ports free.
    ///
    /// # Errors
    /// A node client cannot be built, or the repository cannot be created.
    pub fn new(settings: Settings) -> Result<Arc<Self>, String> {
        let repo = Repo {
            root: settings.repo.clone(),
            replicas: settings.replicas.clone(),
            replica_raw: settings.replica_raw,
        };
        node::files::create_private_dir(&repo.root)
            .map_err(|e| format!("cannot create repository {}: {e}", repo.root.display()))?;
        node::files::create_private_dir(&repo.replicas)
            .map_err(|e| format!("cannot create replica directory {}: {e}", repo.replicas.display()))?;
        let mut nodes = Vec::new();
        for n in &settings.nodes {
            let client = NodeClient::new(n.url.clone(), n.token.clone()).map_err(|e| e.to_string())?;
            nodes.push((n.clone(), client));
        }
        let (manifests, orphans) = repo.scan();
        let lost_restores = repo.restores_in_flight();
        let (manifests, unmerged) = merge::finish_interrupted(&repo, manifests);
        let catalog = manifests.into_iter().map(|m| (m.backup_id.clone(), m)).collect();
        let merges = unmerged.into_iter().map(|m| (m.from.vm_name.clone(), m)).collect();
        let ports = Ports::new(settings.nbd_ports.0, settings.nbd_ports.1);
        let exports = Exports::new(settings.nbd_bind, settings.direct_io, settings.io_uring)?;
        let local_users = LocalUsers::with(&settings.nbd_local_users);
        let schedules = settings.schedules.len();
        Ok(Arc::new(Self {
            settings,
            repo,
            ports,
            exports,
            nodes,
            local_users,
            state: Mutex::new(State { catalog, orphans, merges, lost_restores, ..State::default() }),
            shutdown: CancellationToken::new(),
            in_flight_file: tokio::sync::Mutex::new(()),
            schedule_locks: (0..schedules).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            marks_file: tokio::sync::Mutex::new(()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn node(&self, name: &str) -> Option<&(NodeSpec, NodeClient)> {
        self.nodes.iter().find(|(n, _)| n.name == name)
    }

    /// The TCP clients a job's export admits besides this machine: its node's.
    fn peers_of(&self, node: &str) -> Peers {
        let addresses = self.node(node).map(|(n, _)| n.nbd_peers.clone()).unwrap_or_default();
        Peers::new(format!("node {node}"), addresses, self.local_users.clone())
    }

    /// The TCP clients a restore admits besides this machine: every node's (any may read it back).
    fn peers_of_every_node(&self) -> Peers {
        Peers::new("a node", self.nodes.iter().flat_map(|(n, _)| n.nbd_peers.iter().copied()), self.local_users.clone())
    }

    /// Find the node that has `vm` (or use `wanted`).
    async fn locate(&self, vm: &str, wanted: Option<&str>) -> Result<(String, node::api::VmInfo), HubError> {
        if let Some(w) = wanted {
            let (spec, client) = self.node(w).ok_or_else(|| HubError::NotFound(format!("unknown node {w}")))?;
            let info = client.vm(vm).await.map_err(|e| HubError::from_node(&spec.name, e))?;
            return Ok((spec.name.clone(), info));
        }
        let mut found = Vec::new();
        let mut unreachable = Vec::new();
        for (spec, client) in &self.nodes {
            match client.vm(vm).await {
                Ok(info) => found.push((spec.name.clone(), info)),
                Err(node::api::ApiError::Status { status: 404, .. }) => {}
                Err(e) => unreachable.push(format!("{}: {e}", spec.name)),
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 if !unreachable.is_empty() => {
                Err(HubError::Unavailable(format!("VM {vm} not found; unreachable nodes: {}", unreachable.join("; "))))
            }
            0 => Err(HubError::NotFound(format!("no node has a VM named {vm}"))),
            _ => Err(HubError::Conflict(format!(
                "VM {vm} exists on several nodes ({}): say which with \"node\"",
                found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

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

    /// Start a backup (`Kind::Backup`, with the operator's `tags`, and the `retention` applied to
    /// the VM's backups once it completes, `prune.rs`; empty: the config's) or a replication run
    /// (neither).
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
        tags: &[String],
        retention: Policy,
    ) -> Result<JobView, HubError> {
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
        let run = Run { kind, id: &id, vm, node_name: &node_name, info: &info, requested, tags, retention };
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
        let Run { kind, id, vm, node_name, info, requested, tags, retention } = run;
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
                let (t, p, n) = choose_parent(requested, &history, self.node_committed(vm, node_name).as_deref());
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
        for (n, d) in disks.iter().enumerate() {
            if let Err(e) = self.exports.open(&d.export, d.port, &d.path, false, self.peers_of(node_name)).await {
                for opened in disks.iter().take(n) {
                    self.exports.close(&opened.export).await;
                }
                discard().await;
                return Err(HubError::Unavailable(e));
            }
        }
        let targets = disks
            .iter()
            .map(|d| format!("{}:nbd://{}:{}/{}", d.key, self.settings.nbd_host, d.port, d.export))
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
        Ok(job)
    }

    /// Cancel on their node the jobs of runs a killed hub left behind (of `vm`, or of every
    /// VM), and wait for the node to let go of them: until then the node would refuse the VM's
    /// next run as busy, and keep copying into ports nobody serves. Forgotten once the node
    /// confirms, or when no node has the VM any more; kept for a later try otherwise.
    pub async fn reap_orphans(&self, vm: Option<&str>) {
        let pending: Vec<(String, String)> =
            self.state().orphans.iter().filter(|(v, _)| vm.is_none_or(|w| w == v)).cloned().collect();
        for (vm, id) in pending {
            let released = match self.locate(&vm, None).await {
                Ok((node_name, _)) => match self.node(&node_name) {
                    Some((_, client)) => release_node_job(client, &id).await,
                    None => true,
                },
                Err(HubError::NotFound(_)) => true,
                Err(_) => false,
            };
            if released {
                tracing::info!(vm, job = id, "the node let go of a job the hub lost when it was killed");
                self.state().orphans.retain(|(_, o)| *o != id);
            }
        }
    }

    /// Whether runs a killed hub left behind still wait for their node to let go.
    pub fn has_orphans(&self) -> bool {
        !self.state().orphans.is_empty()
    }

    /// A backup or a replication run by id (running, failed, cancelled, or a completed backup
    /// from the catalog); the other kind's ids are not found.
    pub fn get(&self, kind: Kind, id: &str) -> Option<JobView> {
        let st = self.state();
        if let Some(j) = st.jobs.get(id).filter(|j| j.kind == kind) {
            return Some(j.view());
        }
        st.catalog.get(id).filter(|_| kind == Kind::Backup).map(manifest_view)
    }

    /// Backups (or replications), newest first: of VM `vm`, with tag `tag`, where given.
    pub fn list(&self, kind: Kind, vm: Option<&str>, tag: Option<&str>) -> Vec<JobView> {
        let st = self.state();
        let mut out: Vec<JobView> = st.jobs.values().filter(|j| j.kind == kind).map(|j| j.view()).collect();
        if kind == Kind::Backup {
            out.extend(st.catalog.values().map(manifest_view));
        }
        out.retain(|v| vm.is_none_or(|vm| v.vm_name == vm) && tag.is_none_or(|t| v.tags.iter().any(|have| have == t)));
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        out
    }

    /// Cancel a running backup or replication run, or delete a finished backup (forget a
    /// finished run); the other kind's ids are not found.
    ///
    /// # Errors
    /// Unknown (404); a later backup, a restore or a verify depends on it (409).
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<JobView, HubError> {
        match self.forget(kind, id)? {
            Forgotten::Job(view) => Ok(view),
            Forgotten::Backup(m) => {
                if let Err(e) = files::remove_backup(self.repo.backup_dir(&m.vm_name, id)).await {
                    // Still whole on disk: it stays listed.
                    self.state().catalog.insert(m.backup_id.clone(), m);
                    return Err(e);
                }
                Ok(manifest_view(&m))
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
    fn pin_backup(&self, holder: &str, id: &str, why: String) -> Result<(Manifest, Pinned<'_>), HubError> {
        let mut st = self.state();
        let m = st.catalog.get(id).cloned().ok_or_else(|| HubError::NotFound(format!("no completed backup {id}")))?;
        st.pins.insert(holder.to_string(), (id.to_string(), why));
        Ok((m, Pinned { hub: self, holder: holder.to_string() }))
    }

    /// The node whose job (or restore) holds `port` now.
    pub fn port_owner_node(&self, port: u16) -> Option<String> {
        let job = self.ports.leased().into_iter().find(|(p, _)| *p == port).map(|(_, j)| j)?;
        let st = self.state();
        if let Some(j) = st.jobs.get(&job) {
            return (!j.status().is_final()).then(|| j.node.clone());
        }
        st.restores.get(&job).map(|r| r.node.clone())
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

    /// Per VM and node, what the catalog holds of its backups (for the metrics).
    pub fn vm_summaries(&self) -> Vec<VmSummary> {
        let st = self.state();
        let mut by: BTreeMap<(&str, &str), VmSummary> = BTreeMap::new();
        for m in st.catalog.values() {
            let s = by.entry((&m.vm_name, &m.node)).or_insert_with(|| VmSummary {
                vm: m.vm_name.clone(),
                node: m.node.clone(),
                backups: 0,
                stored_bytes: 0,
                last_completed: None,
            });
            s.backups += 1;
            s.stored_bytes += m.disks.iter().map(|d| d.allocated_bytes).sum::<u64>();
            let completed = m.completed_at.parse::<jiff::Timestamp>().ok().map(|t| t.as_second());
            s.last_completed = s.last_completed.max(completed);
        }
        by.into_values().collect()
    }

    /// Stop: cancel running jobs' followers, close every export.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.exports.shutdown().await;
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
    use super::*;

    pub(super) fn manifest(id: &str, created: &str) -> Manifest {
        Manifest {
            backup_id: id.into(),
            vm_name: "vm".into(),
            node: "default".into(),
            backup_type: "full".into(),
            parent_id: None,
            status: "completed".into(),
            created_at: created.into(),
            completed_at: created.into(),
            disks: vec![],
            note: None,
            tags: vec![],
            merging_into: None,
            verified: None,
        }
    }

    #[test]
    fn an_incremental_builds_on_the_newest_backup_the_node_committed() {
        let (a, b) = (manifest("a", "2026-01-01T00:00:00Z"), manifest("b", "2026-01-02T00:00:00Z"));
        let history = vec![&a, &b];
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some("b"));
        assert_eq!((t, p.map(|m| m.backup_id.as_str()), note), (BackupType::Incremental, Some("b"), None));
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some("a"));
        assert!(t == BackupType::Full && p.is_none() && note.unwrap().contains("not at backup b"));
        let (t, _, note) = choose_parent(BackupType::Incremental, &[], None);
        assert!(t == BackupType::Full && note.unwrap().contains("no completed backup"));
        let (t, p, note) = choose_parent(BackupType::Full, &history, Some("b"));
        assert!(t == BackupType::Full && p.is_none() && note.is_none());
    }

    /// A chain of `len` backups: a full one, then incrementals each on the one before.
    fn chain(len: usize) -> Vec<Manifest> {
        (0..len)
            .map(|i| Manifest {
                parent_id: i.checked_sub(1).map(|p| format!("b{p:02}")),
                ..manifest(&format!("b{i:02}"), &format!("2026-01-01T00:00:{i:02}Z"))
            })
            .collect()
    }

    #[test]
    fn an_incremental_on_a_full_chain_becomes_a_full_backup_that_starts_a_new_one() {
        let room = chain(MAX_CHAIN - 1);
        let history: Vec<&Manifest> = room.iter().collect();
        let newest = format!("b{:02}", MAX_CHAIN - 2);
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some(&newest));
        assert_eq!((t, p.map(|m| m.backup_id.clone()), note), (BackupType::Incremental, Some(newest), None));
        let full = chain(MAX_CHAIN);
        let history: Vec<&Manifest> = full.iter().collect();
        let newest = format!("b{:02}", MAX_CHAIN - 1);
        let (t, p, note) = choose_parent(BackupType::Incremental, &history, Some(&newest));
        assert!(t == BackupType::Full && p.is_none(), "{note:?}");
        assert!(note.unwrap().contains(&format!("ends a chain of {MAX_CHAIN} images")));
        // Hand-edited manifests whose parents loop do not hang the hub.
        let mut looped = chain(3);
        looped[0].parent_id = Some("b02".into());
        let history: Vec<&Manifest> = looped.iter().collect();
        let (t, _, _) = choose_parent(BackupType::Incremental, &history, Some("b02"));
        assert_eq!(t, BackupType::Incremental);
    }

    /// A hub without nodes over a new repository in `dir`, serving on `ports`.
    pub(super) fn hub_in(dir: &std::path::Path, ports: (u16, u16)) -> Arc<Hub> {
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        Hub::new(Settings {
            listen: (localhost, 0).into(),
            repo: dir.join("repo"),
            replicas: dir.join("replicas"),
            nbd_ports: ports,
            nbd_bind: localhost,
            nbd_host: "127.0.0.1".into(),
            nodes: vec![],
            token: String::new(),
            ssh: None,
            stall_timeout: Duration::from_secs(60),
            restore_idle: Duration::from_secs(600),
            replica_raw: false,
            direct_io: false,
            io_uring: false,
            nbd_local_users: vec![],
            retention: crate::retention::Policy::default(),
            verify_every: None,
            schedules: Vec::new(),
        })
        .unwrap()
    }

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
