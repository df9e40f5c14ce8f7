//! Jobs: one per VM at a time (backup, replicate) or per restore; each has an id, a state, live
//! per-disk progress, a cancel token and explicit cleanup.
//!
//! A backup or replicate job runs the VM's pre-snapshot hook once, copies every disk (several at
//! once, bounded), and runs the post-snapshot hook once, also when a copy failed. Each disk's new
//! block map is left pending; `commit` (the hub's word that the backup is safe) makes it the base
//! of the next incremental. When a copy fails, the blocks it wrote are marked unknown in the
//! committed map, so a target written in place (a replica) gets them again next time.
//!
//! One disk's copy, with the policy of which base it is copied against (the pure function
//! [`choose_base`]), is `copy`; restore jobs are `restore`, the snapshot hooks `hooks`; what a
//! stopping node hands over to its next start (copies paused, not cancelled), and the checkpoints
//! a killed node's next start takes up, is `handover`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::{BackupType, CopyMode, DiskStatus, JobStatus, JobView, StartRequest};
use crate::config::{valid_name, Settings, Vm};
use crate::mover::{CopyOptions, Progress};
use crate::pool::{Endpoint, ThroughTunnel};
use crate::targets::{self, Target};

mod copy;
mod handover;
mod hooks;
mod reload;
mod restore;

pub use handover::{CheckpointStats, TakenUp, PAUSE_WITHIN};
pub use reload::Reloaded;

pub use copy::{choose_base, BaseChoice};
use hooks::run_hook;

/// Finished jobs kept for status queries.
const KEEP_FINISHED: usize = 256;

/// A refused request, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Into a fresh backup image (or overlay).
    Backup,
    /// Into a persistent replica.
    Replicate,
    /// From the hub back to local files.
    Restore,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Replicate => "replicate",
            Self::Restore => "restore",
        }
    }
}

#[derive(Debug)]
struct DiskState {
    mode: CopyMode,
    mode_reason: Option<String>,
    change_source: &'static str,
    status: &'static str,
    checksum: Option<String>,
    error: Option<String>,
    reconnects: u64,
    pending_map: Option<PathBuf>,
    /// A copy paused by a stopping node: what the target holds (`mover`'s resume map), the base
    /// the next start's copy goes on from (shared with a checkpoint saving it, not copied).
    resume: Option<Arc<crate::blockmap::ResumeMap>>,
    /// The disk's resume file (`handover`) holds a map of this run that is still true: taken at
    /// a checkpoint, or the one this start took the disk up from.
    checkpointed: bool,
    /// The source's files as they were when the run first started copying this disk (kept
    /// across stops): a copy taken up reads again only what the run had not finished if they
    /// are still the same (`source/stamp.rs`).
    source_stamp: Option<crate::source::SourceStamp>,
}

/// One disk of a job.
#[derive(Debug)]
pub struct DiskJob {
    key: u32,
    progress: Arc<Progress>,
    /// The running copy's resume map, for checkpoints.
    resumable: Arc<crate::mover::Resumable>,
    state: Mutex<DiskState>,
}

#[derive(Debug)]
struct JobState {
    status: JobStatus,
    error: Option<String>,
    committed: bool,
    /// Paused for the next start (`handover`): still running as the hub sees it.
    handed_over: bool,
    /// When this process saw it end (not for a finished job taken up from the last stop).
    finished_at: Option<std::time::Instant>,
    /// Where it is between its snapshot hooks: what a node killed now does with it at its next
    /// start (`handover`).
    phase: Phase,
}

impl JobState {
    fn running(phase: Phase) -> Self {
        Self { status: JobStatus::Running, error: None, committed: false, handed_over: false, finished_at: None, phase }
    }
}

/// Where a job is between its snapshot hooks, for the checkpoints (`handover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The pre-snapshot hook runs: killed now, the next start runs the post hook (to undo
    /// whatever it had done) and forgets the job.
    Snapshotting,
    /// Copying from the snapshot: killed now, the next start takes it up from its checkpoint.
    Copying,
    /// The post hook runs, or the job ended: killed now, nothing is taken up.
    Releasing,
}

/// A job.
#[derive(Debug)]
pub struct Job {
    id: String,
    kind: JobKind,
    vm_name: String,
    cancel: CancellationToken,
    /// A stopping node pauses copies instead of cancelling them (`handover`).
    pause: CancellationToken,
    /// What started the job, kept to start it again after a restart.
    request: JobRequest,
    state: Mutex<JobState>,
    disks: Vec<DiskJob>,
    /// When this process took it (a job taken up from the last stop: when it was taken up).
    started: std::time::Instant,
    /// Its flow of the node's bandwidth limit, shared by its disks (`throttle.rs`), made when
    /// its first disk starts.
    throttle: std::sync::OnceLock<Option<Arc<crate::throttle::Throttle>>>,
}

impl Job {
    /// The API view.
    pub fn view(&self) -> JobView {
        let (status, error, committed) = self
            .state
            .lock()
            .map(|s| (s.status, s.error.clone(), s.committed))
            .unwrap_or((JobStatus::Failed, Some("job state lost".into()), false));
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let p = d.progress.snapshot();
                let st = d.state.lock();
                let Ok(st) = st else {
                    return DiskStatus::lost(d.key);
                };
                let (dstatus, checksum, derror, reconnects) =
                    (st.status.to_string(), st.checksum.clone(), st.error.clone(), st.reconnects);
                DiskStatus {
                    key: d.key,
                    mode: st.mode,
                    mode_reason: st.mode_reason.clone(),
                    change_source: st.change_source.to_string(),
                    bytes_total: p.bytes_total,
                    bytes_read: p.bytes_read,
                    bytes_sent: p.bytes_sent,
                    bytes_skipped_holes: p.bytes_skipped_holes,
                    bytes_skipped_zero: p.bytes_skipped_zero,
                    bytes_unchanged: p.bytes_unchanged,
                    rate_bps: p.rate_bps,
                    eta_s: if dstatus == "running" { p.eta_s } else { None },
                    status: dstatus,
                    checksum,
                    reconnects,
                    error: derror,
                }
            })
            .collect();
        JobView {
            job_id: self.id.clone(),
            kind: self.kind.as_str().into(),
            vm_name: self.vm_name.clone(),
            status,
            committed,
            disks,
            error,
        }
    }

    /// Each disk's live counters.
    pub fn progress(&self) -> Vec<(u32, Arc<Progress>)> {
        self.disks.iter().map(|d| (d.key, Arc::clone(&d.progress))).collect()
    }

    /// Wait until the job has finished.
    pub async fn wait(&self) -> JobStatus {
        loop {
            let s = self.status();
            if s.is_final() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cancel it.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The job's state.
    pub fn status(&self) -> JobStatus {
        self.state.lock().map(|s| s.status).unwrap_or(JobStatus::Failed)
    }

    fn finish(&self, status: JobStatus, error: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.status = status;
            s.error = error;
            s.finished_at = Some(std::time::Instant::now());
        }
    }
}

/// The request a job was started with.
#[derive(Debug, Clone)]
enum JobRequest {
    /// A backup or a replication.
    Copy(StartRequest),
    /// A restore.
    Restore(crate::api::RestoreRequest),
}

/// The node's jobs and what they need.
pub struct Jobs {
    /// Replaced whole by a reload (`reload.rs`); a job takes what it needs when it starts.
    settings: std::sync::RwLock<Arc<Settings>>,
    /// The last reload, for the metrics.
    last_reload: Mutex<crate::service::ReloadStatus>,
    /// What this start took up from the last stop, for the metrics.
    taken_up: Mutex<TakenUp>,
    /// The node's running tunnel, through which hub ports are reached in process.
    tunnel: Option<tunnel::TunnelDialer>,
    table: Mutex<Table>,
    /// Writes of the record a killed or stopped node's next start takes up (`handover`), one at
    /// a time.
    record: tokio::sync::Mutex<handover::RecordWriter>,
    /// A job started, changed phase, completed a disk or ended: the record is written again.
    record_changed: tokio::sync::Notify,
    /// How the checkpoints went, for the metrics.
    checkpoints: Mutex<CheckpointStats>,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    /// VMs a running job reads (a backup or replica run) or writes (a restore onto its disks),
    /// with the job's id.
    busy_vms: HashMap<String, String>,
    /// Files a running restore writes, with its id: no second restore writes them meanwhile.
    busy_paths: HashMap<PathBuf, String>,
}

impl Jobs {
    /// An empty table.
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings: std::sync::RwLock::new(settings),
            last_reload: Mutex::default(),
            taken_up: Mutex::default(),
            tunnel: None,
            table: Mutex::new(Table::default()),
            record: tokio::sync::Mutex::default(),
            record_changed: tokio::sync::Notify::new(),
            checkpoints: Mutex::default(),
        }
    }

    /// Reach the hub's ports through `tunnel` in process (the tunnel started from
    /// `settings.tunnel`), instead of through its local listeners.
    pub fn through_tunnel(mut self, tunnel: tunnel::TunnelDialer) -> Self {
        self.tunnel = Some(tunnel);
        self
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.table.lock().ok()?.jobs.get(id).cloned()
    }

    /// Every job known (running and recent).
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.table.lock().map(|t| t.jobs.values().cloned().collect()).unwrap_or_default()
    }

    /// Where a disk's committed map lives. Backups and replicas of one VM are separate
    /// lineages (an overlay chain and an in-place copy): each has its own state, or a replica
    /// run would become the base of the next backup incremental.
    pub fn map_path(&self, vm: &str, kind: JobKind, key: u32) -> PathBuf {
        self.settings().state_dir.join(vm).join(kind.as_str()).join(format!("disk-{key}.map"))
    }

    /// Turn a target into where to dial: through the tunnel's forward of that port when a
    /// tunnel is configured and the target is on the hub's loopback — in process when the
    /// tunnel runs here ([`Self::through_tunnel`]), else through its local listener.
    ///
    /// # Errors
    /// The port is not forwarded by the tunnel.
    pub fn dial_endpoint(&self, t: &Target, nbd_host: Option<&str>) -> Result<Endpoint, JobError> {
        let host = nbd_host.unwrap_or(&t.host);
        if !self.settings().nbd_hosts.allows(host) {
            return Err(JobError::BadRequest(format!(
                "target {t}: host {host} is not one this node sends disks to or restores from (this machine and \
                 nbd_hosts in its config): add the hub's address to nbd_hosts"
            )));
        }
        let loopback = matches!(host, "127.0.0.1" | "localhost" | "::1");
        let (host, port, via) = match &self.settings().tunnel {
            Some(tun) if loopback => {
                let f = tun.forwards.iter().find(|f| f.remote_port == t.port).ok_or_else(|| {
                    JobError::BadRequest(format!(
                        "target {t}: port {} is not forwarded by the tunnel to the hub",
                        t.port
                    ))
                })?;
                let via = self.tunnel.as_ref().map(|dialer| {
                    Box::new(ThroughTunnel {
                        dialer: dialer.clone(),
                        remote_host: f.remote_host.clone(),
                        remote_port: f.remote_port,
                    })
                });
                (f.listen.ip().to_string(), f.listen.port(), via)
            }
            _ => (host.to_string(), t.port, None),
        };
        // TLS where the node dials the hub's listener itself; a tunnel's channel is encrypted and
        // authenticated by SSH, and the hub serves it without TLS.
        let tls = match (t.tls, &via, &self.settings().tunnel) {
            (true, None, tunnel) if tunnel.is_none() || !loopback => {
                let dir = self.settings().nbd_tls.clone().ok_or_else(|| {
                    JobError::BadRequest(format!(
                        "target {t}: the hub requires TLS on its NBD ports; set nbd_tls in node.toml (--nbd-tls for \
                         copy) to a directory with ca-cert.pem, client-cert.pem and client-key.pem"
                    ))
                })?;
                let creds = nbd_server::ClientTls::from_x509_dir(&dir)
                    .map_err(|e| JobError::BadRequest(format!("target {t}: nbd_tls: {e}")))?;
                Some(creds)
            }
            _ => None,
        };
        Ok(Endpoint { host, port, export: t.export.clone(), meta_contexts: Vec::new(), via, tls })
    }

    /// Add a running job that uses `vms` and writes `paths`, all or nothing.
    fn register(&self, job: Arc<Job>, vms: &[&str], paths: &[&Path]) -> Result<(), JobError> {
        let mut t = self.table.lock().map_err(|_| JobError::Conflict("job table poisoned".into()))?;
        if t.jobs.contains_key(&job.id) {
            return Err(JobError::Conflict(format!("job {} already exists", job.id)));
        }
        for vm in vms {
            if let Some(other) = t.busy_vms.get(*vm) {
                return Err(JobError::Conflict(format!("VM {vm} already has job {other} running")));
            }
        }
        for path in paths {
            if let Some(other) = t.busy_paths.get(*path) {
                return Err(JobError::Conflict(format!("restore {other} is writing {} now", path.display())));
            }
        }
        for vm in vms {
            t.busy_vms.insert(vm.to_string(), job.id.clone());
        }
        for path in paths {
            t.busy_paths.insert(path.to_path_buf(), job.id.clone());
        }
        t.jobs.insert(job.id.clone(), job);
        Ok(())
    }

    fn release(&self, job: &Job) {
        if let Ok(mut t) = self.table.lock() {
            t.busy_vms.retain(|_, id| *id != job.id);
            t.busy_paths.retain(|_, id| *id != job.id);
            t.finished.push_back(job.id.clone());
            while t.finished.len() > KEEP_FINISHED {
                if let Some(old) = t.finished.pop_front() {
                    t.jobs.remove(&old);
                }
            }
        }
    }

    /// Start a backup or replicate job.
    ///
    /// # Errors
    /// Bad input (400), unknown VM (404), a job already running for the VM or the id in use (409).
    pub fn start_copy(self: &Arc<Self>, req: StartRequest, kind: JobKind) -> Result<Arc<Job>, JobError> {
        let (vm, plan) = self.plan_copy(&req)?;
        // Bases are chosen when each disk starts (the source's size is known then); the mode
        // shown until then is the one asked for.
        let disks = plan
            .iter()
            .map(|(d, _)| {
                let mode = if req.backup_type == BackupType::Full { CopyMode::Full } else { CopyMode::Incremental };
                DiskJob::new(d.key, mode)
            })
            .collect();
        let job = Arc::new(Job::copy(req, kind, disks));
        self.register(Arc::clone(&job), &[&vm.name], &[])?;
        self.spawn_copy(&job, vm, plan, false);
        self.record_changed.notify_one();
        Ok(job)
    }

    /// The VM and, for each target, its disk and where to dial.
    fn plan_copy(&self, req: &StartRequest) -> Result<(Vm, Vec<(crate::config::Disk, Endpoint)>), JobError> {
        if !valid_name(&req.job_id) {
            return Err(JobError::BadRequest(format!(
                "job_id '{}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}",
                req.job_id
            )));
        }
        if !valid_name(&req.vm_name) {
            return Err(JobError::BadRequest(format!("vm_name '{}' is not a valid name", req.vm_name)));
        }
        let vm = self
            .settings()
            .vm(&req.vm_name)
            .cloned()
            .ok_or_else(|| JobError::NotFound(format!("unknown VM {}", req.vm_name)))?;
        let targets = targets::parse(&req.nbd_targets).map_err(|e| JobError::BadRequest(e.to_string()))?;
        let mut plan = Vec::new();
        for t in &targets {
            let disk = vm.disks.iter().find(|d| d.key == t.key).ok_or_else(|| {
                JobError::BadRequest(format!(
                    "VM {} has no disk with key {} (has {:?})",
                    vm.name,
                    t.key,
                    vm.disks.iter().map(|d| d.key).collect::<Vec<_>>()
                ))
            })?;
            plan.push((disk.clone(), self.dial_endpoint(t, req.nbd_host.as_deref())?));
        }
        Ok((vm, plan))
    }

    /// Run a registered copy job to its end; `resumed`: taken up from a stopped node, its
    /// snapshot hook already run and its paused disks going on from their resume maps.
    fn spawn_copy(self: &Arc<Self>, job: &Arc<Job>, vm: Vm, plan: Vec<(crate::config::Disk, Endpoint)>, resumed: bool) {
        let jobs = Arc::clone(self);
        let run_job = Arc::clone(job);
        tokio::spawn(async move {
            let result = jobs.run_copy(&run_job, &vm, plan, resumed).await;
            // A disk that failed stops the others through the job's cancel token too: the job
            // is failed then, with that disk's error; cancelled only when nothing failed.
            let (status, error) = match result {
                Err(RunError::Paused) => {
                    tracing::info!(job = %run_job.id, vm = %run_job.vm_name, "job paused: handed over to the next start");
                    if let Ok(mut s) = run_job.state.lock() {
                        s.handed_over = true;
                    }
                    return;
                }
                Err(RunError::Failed(e)) => (JobStatus::Failed, Some(e)),
                _ if run_job.cancel.is_cancelled() => (JobStatus::Cancelled, Some("cancelled".to_string())),
                Ok(()) => (JobStatus::Completed, None),
                Err(RunError::Cancelled) => (JobStatus::Cancelled, Some("cancelled".to_string())),
            };
            tracing::info!(job = %run_job.id, vm = %run_job.vm_name, ?status, error = ?error, "job finished");
            run_job.finish(status, error);
            jobs.release(&run_job);
            jobs.record_changed.notify_one();
        });
    }

    async fn run_copy(
        self: &Arc<Self>,
        job: &Arc<Job>,
        vm: &Vm,
        plan: Vec<(crate::config::Disk, Endpoint)>,
        resumed: bool,
    ) -> Result<(), RunError> {
        let backup_type = match &job.request {
            JobRequest::Copy(r) => r.backup_type,
            JobRequest::Restore(_) => BackupType::Full,
        };
        tracing::info!(job = %job.id, vm = %vm.name, disks = plan.len(), ?backup_type, resumed, "job started");
        // Old pending maps of this VM belong to runs that were never committed (a resumed run's
        // own are kept: its disks done before the stop).
        if !resumed {
            remove_pending_maps(&self.settings().state_dir.join(&vm.name).join(job.kind.as_str()));
        }
        let pre_snapshot = vm.pre_snapshot.as_ref().filter(|_| !resumed);
        if let Some(cmd) = pre_snapshot {
            if let Err(e) = run_hook(cmd, "pre", vm, &job.id, &job.cancel).await {
                // The post hook still runs: it undoes whatever the pre hook started.
                self.enter_phase(job, Phase::Releasing).await;
                let post = match &vm.post_snapshot {
                    Some(c) => run_hook(c, "post", vm, &job.id, &CancellationToken::new()).await.err(),
                    None => None,
                };
                for d in &job.disks {
                    set_disk(d, "failed", None, Some("pre-snapshot hook failed".into()));
                }
                return Err(RunError::Failed(match post {
                    Some(p) => format!("{e}; then {p}"),
                    None => e,
                }));
            }
        }
        self.enter_phase(job, Phase::Copying).await;
        let limit = Arc::new(tokio::sync::Semaphore::new(self.settings().parallel_disks));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (disk, endpoint)) in plan.into_iter().enumerate() {
            let (jobs, job) = (Arc::clone(self), Arc::clone(job));
            let vm_name = vm.name.clone();
            // Taken here, not in the task: the disks start in their order.
            let permit = Arc::clone(&limit).acquire_owned().await;
            tasks.spawn(async move {
                let _permit = permit;
                let done = job.disks.get(index).is_some_and(|d| d.status() == "completed");
                if job.pause.is_cancelled() || done {
                    // Paused before it started (it starts at the next start), or done before it.
                    return Ok(());
                }
                let result = jobs.copy_one(&job, index, &vm_name, &disk, endpoint, backup_type).await;
                if result.is_err() && !job.cancel.is_cancelled() {
                    // One disk failing dooms the job: stop the others now rather than later.
                    job.cancel.cancel();
                    return result.map_err(|e| (true, e));
                }
                result.map_err(|e| (false, e))
            });
        }
        // The first disk that failed on its own (not stopped by another's failure or a cancel).
        let mut failure: Option<String> = None;
        let mut cancelled = false;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err((true, e))) => {
                    failure.get_or_insert(e);
                }
                Ok(Err((false, _))) => cancelled = true,
                Err(e) => {
                    failure.get_or_insert(format!("disk task failed: {e}"));
                }
            }
        }
        // Paused with a disk not done: the snapshot stays for the next start, which runs the
        // post hook when the copy ends there.
        let unfinished = job.disks.iter().any(|d| d.status() != "completed");
        if job.pause.is_cancelled() && !job.cancel.is_cancelled() && failure.is_none() && unfinished {
            return Err(RunError::Paused);
        }
        self.enter_phase(job, Phase::Releasing).await;
        let post = match &vm.post_snapshot {
            Some(cmd) => run_hook(cmd, "post", vm, &job.id, &CancellationToken::new()).await.err(),
            None => None,
        };
        match (failure, post) {
            (Some(e), Some(p)) => Err(RunError::Failed(format!("{e}; then {p}"))),
            (Some(e), None) | (None, Some(e)) => Err(RunError::Failed(e)),
            (None, None) if cancelled => Err(RunError::Cancelled),
            (None, None) => Ok(()),
        }
    }

    /// Make a completed job's maps the base of the next incremental.
    ///
    /// # Errors
    /// Unknown job (404), not a completed copy job (409), or the rename failed (409).
    pub fn commit(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let job = self.get(id).ok_or_else(|| JobError::NotFound(format!("unknown job {id}")))?;
        if job.kind == JobKind::Restore {
            return Err(JobError::Conflict("a restore has nothing to commit".into()));
        }
        let mut state = job.state.lock().map_err(|_| JobError::Conflict("job state poisoned".into()))?;
        if state.committed {
            drop(state);
            return Ok(job);
        }
        if state.status != JobStatus::Completed {
            return Err(JobError::Conflict(format!(
                "job {id} is {}, not completed: nothing to commit",
                state.status.name()
            )));
        }
        for d in &job.disks {
            let pending = d.state.lock().ok().and_then(|s| s.pending_map.clone());
            if let Some(p) = pending {
                let committed = self.map_path(&job.vm_name, job.kind, d.key);
                std::fs::rename(&p, &committed)
                    .and_then(|()| sync_dir(&committed))
                    .map_err(|e| JobError::Conflict(format!("commit of disk {}: {e}", d.key)))?;
                let _ = std::fs::remove_file(committed.with_extension("map.inflight"));
            }
        }
        state.committed = true;
        drop(state);
        self.record_changed.notify_one();
        tracing::info!(job = %id, vm = %job.vm_name, "committed");
        Ok(job)
    }

    /// Cancel a running job (a finished one is left as it is).
    ///
    /// # Errors
    /// Unknown job (404).
    pub fn cancel(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let job = self.get(id).ok_or_else(|| JobError::NotFound(format!("unknown job {id}")))?;
        job.cancel.cancel();
        Ok(job)
    }
}

impl Job {
    /// A running backup or replicate job as `req` asks.
    fn copy(req: StartRequest, kind: JobKind, disks: Vec<DiskJob>) -> Self {
        Self {
            id: req.job_id.clone(),
            kind,
            vm_name: req.vm_name.clone(),
            cancel: CancellationToken::new(),
            pause: CancellationToken::new(),
            request: JobRequest::Copy(req),
            state: Mutex::new(JobState::running(Phase::Snapshotting)),
            disks,
            started: std::time::Instant::now(),
            throttle: std::sync::OnceLock::new(),
        }
    }

    /// The copy options for one of its disks: `copy` with the job's own flow of the bandwidth
    /// limit, so that jobs share the limit fairly however many disks each copies at once.
    fn copy_options(&self, copy: &CopyOptions) -> CopyOptions {
        let throttle = self.throttle.get_or_init(|| copy.throttle.as_ref().map(|node| Arc::new(node.flow())));
        CopyOptions { throttle: throttle.clone(), ..copy.clone() }
    }
}

fn set_disk(d: &DiskJob, status: &'static str, checksum: Option<String>, error: Option<String>) {
    if let Ok(mut s) = d.state.lock() {
        s.status = status;
        if checksum.is_some() {
            s.checksum = checksum;
        }
        if error.is_some() {
            s.error = error;
        }
    }
}

impl DiskJob {
    fn new(key: u32, mode: CopyMode) -> Self {
        Self {
            key,
            progress: Arc::default(),
            resumable: Arc::default(),
            state: Mutex::new(DiskState {
                mode,
                mode_reason: None,
                change_source: "none",
                status: "pending",
                checksum: None,
                error: None,
                reconnects: 0,
                pending_map: None,
                resume: None,
                checkpointed: false,
                source_stamp: None,
            }),
        }
    }

    fn status(&self) -> &'static str {
        self.state.lock().map(|s| s.status).unwrap_or("failed")
    }
}

fn remove_pending_maps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".map.pending-") || name.contains(".map.resume-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Run file work that `fsync`s on the blocking pool: on a runtime worker it would hold the
/// copies and tunnel channels that worker runs for as long as the disk takes.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)
}

/// A paused disk's resume map to go on from: the one kept, copied only if a checkpoint still
/// holds it.
fn owned(map: Arc<crate::blockmap::ResumeMap>) -> crate::blockmap::ResumeMap {
    Arc::try_unwrap(map).unwrap_or_else(|shared| (*shared).clone())
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    std::fs::File::open(file.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// How a copy job's run ended when it did not complete.
#[derive(Debug)]
enum RunError {
    /// A disk or a hook failed: the message says which and why.
    Failed(String),
    /// Stopped by a cancel, nothing failed.
    Cancelled,
    /// Paused by a stopping node, to go on at its next start (`handover`).
    Paused,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::Throttle;

    fn job(id: &str) -> Job {
        let req = StartRequest {
            vm_name: "vm".into(),
            nbd_host: None,
            nbd_targets: String::new(),
            job_id: id.into(),
            backup_type: BackupType::Full,
        };
        Job::copy(req, JobKind::Backup, Vec::new())
    }

    #[test]
    fn a_job_draws_on_the_node_limit_through_one_flow_for_all_its_disks() {
        let node = CopyOptions { throttle: Some(Arc::new(Throttle::new(1 << 20))), ..CopyOptions::default() };
        let (a, b) = (job("a"), job("b"));
        let flow = |o: CopyOptions| o.throttle.expect("a limit");
        let (a1, a2, b1) = (flow(a.copy_options(&node)), flow(a.copy_options(&node)), flow(b.copy_options(&node)));
        assert!(Arc::ptr_eq(&a1, &a2), "the disks of one job share its flow");
        let bucket = node.throttle.as_ref().expect("a limit");
        assert!(a1.same_bucket(bucket) && b1.same_bucket(bucket), "every job draws on the node's bucket");
        assert!(!a1.same_flow(&b1) && !a1.same_flow(bucket), "each job is a flow of its own");
        assert!(job("c").copy_options(&CopyOptions::default()).throttle.is_none(), "no limit, no flow");
    }
}
