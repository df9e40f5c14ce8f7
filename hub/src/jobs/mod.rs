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
//! This module holds the hub's state and what every part shares (nodes, the lock, runs a killed
//! hub left behind). Starting a job is in `start` (which backup an incremental builds on is its
//! pure function [`choose_parent`]); reading and changing the catalog (get, list, delete, verify,
//! pins, counts) in `catalog`. The job model and its API views are in `view`, the follower and a
//! job's end in `follow`, the files a job
//! makes and removes (off the runtime) in `files`, restores in `restores` (and those the hub
//! drives onto a node in `restore_run`), deleting a backup an incremental builds on in `merge`,
//! retention in `prune`, background re-verification in `scrub`, the background pass that
//! rewrites images in `rewrite` (backups past `max_chain` made to stand alone in `flatten`, images
//! compressed in `compress`), backup schedules at work in
//! `scheduled`, the configuration taken up while serving in `reload`, runs handed over from a
//! stopping hub to the next start in `handover`, the nodes checked and shown in `nodes`, and
//! which VMs are protected in `protection`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::api::NodeClient;
use tokio_util::sync::CancellationToken;

use crate::config::{NodeSpec, Settings};
use crate::error::HubError;
use crate::exports::Exports;
use crate::peers::{LocalUsers, Peers};
use crate::ports::Ports;
use crate::repo::{self, Manifest, Repo};

mod catalog;
mod compress;
mod files;
mod flatten;
mod follow;
mod handover;
mod merge;
mod nodes;
mod protection;
mod prune;
mod reload;
mod restore_run;
mod restores;
mod rewrite;
mod scheduled;
mod scrub;
mod ssh_view;
mod start;
mod view;

pub use catalog::VmSummary;
pub use nodes::{NodeView, TunnelSession, TunnelSessions};
pub use protection::VmView;
pub use prune::{PruneAllView, PruneEntry, PruneView};
pub use reload::{Live, Reloaded};
pub use restore_run::RestoreDisk;
pub use restores::{Restore, RestoreExport, RestoreView};
pub use scheduled::{Outcome, ScheduleRun, ScheduleView, ScheduledBackup, Trigger};
pub use ssh_view::{RefusedLoginView, SshSession, SshView};
pub use start::{checked_tags, choose_parent, Asked, DEFAULT_MAX_CHAIN, MAX_CHAIN, MAX_TAGS};
pub use view::{DiskProgress, DiskResult, Job, JobView, Kind, Status};

/// How often the node's job is polled.
const POLL: Duration = Duration::from_millis(100);
/// How long a run waits for a node it cannot reach (`unreachable_timeout_s`) unless configured:
/// a host that reboots (a kernel update, firmware included) comes back within it, and its node
/// takes the run up from its last checkpoint. A node that answers but makes no progress fails
/// the run after `stall_timeout_s`, as before.
pub const DEFAULT_UNREACHABLE_TIMEOUT_S: u64 = 900;
/// How often a job is polled once its node has done 90% of it: the end of a short job (an
/// incremental takes a fraction of a second) is noticed within tens of milliseconds.
const POLL_FINISHING: Duration = Duration::from_millis(20);
/// Finished (not completed) jobs kept in memory.
const KEEP_FINISHED: usize = 500;

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
    /// Settings as at start. The ones a reload replaces (retention, schedules, periods) are
    /// read through [`Hub::live`].
    pub settings: Settings,
    /// Repository paths.
    pub repo: Repo,
    /// Port leases.
    pub ports: Arc<Ports>,
    /// Exports.
    pub exports: Exports,
    /// The nodes and their API clients, replaced whole by a reload (`reload.rs`).
    nodes: std::sync::RwLock<Arc<Vec<NodeEntry>>>,
    /// The accounts on this machine whose TCP clients exports admit.
    local_users: LocalUsers,
    state: Mutex<State>,
    shutdown: CancellationToken,
    /// Taken while the list of restores in flight is written, so that writes never cross.
    in_flight_file: tokio::sync::Mutex<()>,
    /// Taken while the record of the runs under way is written (`handover.rs`).
    record_file: tokio::sync::Mutex<handover::RecordFile>,
    /// The settings a reload replaces (`reload.rs`); read through [`Hub::live`].
    live: tokio::sync::watch::Sender<Arc<Live>>,
    /// Per schedule name: held by its run under way (`scheduled.rs`), kept across reloads.
    schedule_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per schedule name: stops its loop (a reload that changes or removes it).
    schedule_stops: Mutex<HashMap<String, CancellationToken>>,
    /// Taken while the schedules' marks are written.
    marks_file: tokio::sync::Mutex<()>,
    /// Wakes the background pass that rewrites images (`rewrite.rs`).
    rewrite_wake: tokio::sync::Notify,
    /// Verifications at once (a run's images, a scrub, a verify asked for): each holds a disk's
    /// block hashes and its parent's (up to 256 MiB) and hashes on up to 4 threads, so runs that
    /// end together take turns instead of holding all of that at once ([`Hub::verify_turn`]).
    verify_turns: tokio::sync::Semaphore,
    /// The nodes' tunnel sessions, when the hub serves an SSH endpoint (`nodes.rs`).
    tunnels: std::sync::OnceLock<std::sync::Weak<dyn nodes::TunnelSessions>>,
}

#[derive(Default)]
struct State {
    catalog: BTreeMap<String, Manifest>,
    jobs: HashMap<String, Arc<Job>>,
    finished: std::collections::VecDeque<String>,
    busy_vms: HashMap<String, String>,
    restores: HashMap<String, Arc<Restore>>,
    /// Restores taken out of `restores` whose exports are being closed: still answered by id
    /// until their record is kept (`restore_run.rs`), never "unknown" in between.
    ending_restores: HashMap<String, Arc<Restore>>,
    /// Restores the hub drove onto a node that have ended, the newest last (`restore_run.rs`).
    finished_restores: std::collections::VecDeque<RestoreView>,
    /// Restores the hub drives on a node now, by id: their node (kept in the repository).
    driven: BTreeMap<String, String>,
    /// Restores a killed hub left running on nodes, and restores failed while their node was out
    /// of reach, as (node, id): cancelled there when the node answers.
    lost_restores: Vec<(String, String)>,
    /// Runs a killed hub left behind, and runs failed while their node was out of reach, as
    /// (VM, job id): their node jobs are cancelled before the VM's next run, and in the
    /// background as soon as their node answers.
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
    /// The last configuration reload (`reload.rs`).
    last_reload: node::service::ReloadStatus,
    /// Backups whose images are being rewritten (`rewrite.rs`): no merge into them.
    rewriting: std::collections::HashSet<String>,
    /// Rewrites that failed, as (what, backup): why and when (tried again some hours later).
    rewrite_failed: HashMap<(String, String), (String, Instant)>,
    /// Runs the last stop handed over, until [`Hub::take_up_handed_over`] (`handover.rs`).
    handed_over: Vec<handover::HandedOver>,
    /// Driven restores the last stop handed over, likewise.
    handed_restores: Vec<handover::HandedRestore>,
    /// Schedules' runs the last stop cut short, by name, until their schedule goes on with them.
    handed_runs: BTreeMap<String, ScheduleRun>,
    /// The ids of the runs taken up at start.
    taken_up: std::collections::HashSet<String>,
    /// Runs taken up at start, and handed-over runs that could not be.
    handover_counts: (u64, u64),
    /// What the last check of each node found (`nodes.rs`).
    node_health: nodes::NodeHealth,
}

/// A node of the running hub: its `[[node]]` and the client of its API.
type NodeEntry = (NodeSpec, NodeClient);

/// `spec`'s entry: the client of its API, `https://` checked against `api_tls`'s CA (not the
/// system's roots) and presenting the hub's client certificate if it has one.
///
/// # Errors
/// The client cannot be built (its TLS files do not load), naming the node.
fn node_entry(spec: &NodeSpec, settings: &Settings) -> Result<NodeEntry, String> {
    let client = match &settings.api_tls {
        Some(tls) if spec.url.starts_with("https://") => {
            NodeClient::with_tls_dir(spec.url.clone(), spec.token.clone(), &tls.dir)
        }
        _ => NodeClient::new(spec.url.clone(), spec.token.clone()),
    }
    .map_err(|e| format!("node {}: {e}", spec.name))?;
    Ok((spec.clone(), client))
}

fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 3];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    let t = repo::now_rfc3339().replace(['-', ':', '.'], "");
    format!("{prefix}{}-{:02x}{:02x}{:02x}", t.trim_end_matches('Z'), bytes[0], bytes[1], bytes[2])
}

/// Names from requests: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    node::config::valid_name(name)
}

impl Hub {
    /// Wait for a turn to verify (`verify_turns`); held until dropped.
    pub(super) async fn verify_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // Never closed: `None` cannot happen, and would only mean verifying without a turn.
        self.verify_turns.acquire().await.ok()
    }

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
        let nodes = settings.nodes.iter().map(|n| node_entry(n, &settings)).collect::<Result<Vec<_>, _>>()?;
        node::files::create_private_dir(&repo.root)
            .map_err(|e| format!("cannot create repository {}: {e}", repo.root.display()))?;
        node::files::create_private_dir(&repo.replicas)
            .map_err(|e| format!("cannot create replica directory {}: {e}", repo.replicas.display()))?;
        let handed = handover::take_record(&repo.root);
        let (manifests, orphans) = repo.scan(&handover::kept_ids(&handed.jobs));
        // Restores handed over are taken up, not cancelled (unless taking one up fails).
        let lost_restores: Vec<(String, String)> = repo
            .restores_in_flight()
            .into_iter()
            .filter(|(_, id)| !handed.restores.iter().any(|r| r.id == *id))
            .collect();
        let (handed_over, handed_restores, handed_runs) = (handed.jobs, handed.restores, handed.schedule_runs);
        let (manifests, unmerged) = merge::finish_interrupted(&repo, manifests);
        let catalog = manifests.into_iter().map(|m| (m.backup_id.clone(), m)).collect();
        let merges = unmerged.into_iter().map(|m| (m.from.vm_name.clone(), m)).collect();
        let ports = Ports::new(settings.nbd_ports.0, settings.nbd_ports.1);
        let tls = match &settings.nbd_tls {
            Some(dir) => Some(
                nbd_server::TlsCredentials::from_x509_dir(dir, true)
                    .map_err(|e| format!("nbd_tls = {}: {e}", dir.display()))?,
            ),
            None => None,
        };
        let exports = Exports::new(settings.nbd_bind, settings.direct_io, settings.io_uring, tls)?;
        let local_users = LocalUsers::with(&settings.nbd_local_users);
        let live = tokio::sync::watch::Sender::new(Arc::new(Live::of(&settings)));
        Ok(Arc::new(Self {
            settings,
            live,
            repo,
            ports,
            exports,
            nodes: std::sync::RwLock::new(Arc::new(nodes)),
            local_users,
            state: Mutex::new(State {
                catalog,
                orphans,
                merges,
                lost_restores,
                handed_over,
                handed_restores,
                handed_runs,
                ..State::default()
            }),
            shutdown: CancellationToken::new(),
            in_flight_file: tokio::sync::Mutex::new(()),
            record_file: tokio::sync::Mutex::default(),
            schedule_locks: Mutex::default(),
            schedule_stops: Mutex::default(),
            marks_file: tokio::sync::Mutex::new(()),
            rewrite_wake: tokio::sync::Notify::new(),
            verify_turns: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            ),
            tunnels: std::sync::OnceLock::new(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The nodes now (a reload replaces the list, never changes one in place).
    fn nodes(&self) -> Arc<Vec<NodeEntry>> {
        Arc::clone(&self.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn node(&self, name: &str) -> Option<NodeEntry> {
        self.nodes().iter().find(|(n, _)| n.name == name).cloned()
    }

    /// The TCP clients a job's export admits besides this machine: its node's.
    fn peers_of(&self, node: &str) -> Peers {
        let addresses = self.node(node).map(|(n, _)| n.nbd_peers.clone()).unwrap_or_default();
        Peers::new(format!("node {node}"), addresses, self.local_users.clone())
    }

    /// The TCP clients a restore admits besides this machine: every node's (any may read it back).
    fn peers_of_every_node(&self) -> Peers {
        let nodes = self.nodes();
        Peers::new("a node", nodes.iter().flat_map(|(n, _)| n.nbd_peers.iter().copied()), self.local_users.clone())
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
        for (spec, client) in self.nodes().iter() {
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
                    Some((_, client)) => release_node_job(&client, &id).await,
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

    /// The node whose job (or restore) holds `port` now.
    pub fn port_owner_node(&self, port: u16) -> Option<String> {
        let job = self.ports.leased().into_iter().find(|(p, _)| *p == port).map(|(_, j)| j)?;
        let st = self.state();
        if let Some(j) = st.jobs.get(&job) {
            return (!j.status().is_final()).then(|| j.node.clone());
        }
        st.restores.get(&job).map(|r| r.node.clone())
    }

    /// Stop: the followers let go of their jobs (never cancelling them on their nodes), every
    /// export is drained, flushed and closed, and the runs under way are handed over to the next
    /// start (`handover.rs`).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let unclean = self.exports.shutdown().await;
        self.hand_over(&unclean).await;
    }
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
            schedule: None,
            merging_into: None,
            verified: None,
            compressed: None,
        }
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
            nbd_tls: None,
            api_tls: None,
            nodes: vec![],
            token: String::new(),
            ssh: None,
            stall_timeout: Duration::from_secs(60),
            unreachable_timeout: Duration::from_secs(DEFAULT_UNREACHABLE_TIMEOUT_S),
            restore_idle: Duration::from_secs(600),
            replica_raw: false,
            direct_io: false,
            io_uring: false,
            nbd_local_users: vec![],
            retention: crate::retention::Policy::default(),
            verify_every: None,
            compress: false,
            max_chain: crate::jobs::DEFAULT_MAX_CHAIN,
            schedules: Vec::new(),
        })
        .unwrap()
    }
}
