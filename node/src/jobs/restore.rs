//! Restore jobs: each disk of a backup read from the hub's read-only export and written into a
//! file on the node, one disk after another, checked by the same checksum the backup recorded.
//! A destination is a configured VM disk or a plain file name inside the restore directory,
//! nothing else: the API must not become a way to overwrite any file on the node. Two disks of
//! one restore never share a destination (the second would silently replace the first), no two
//! running restores write one file, and a restore onto a VM's disks holds that VM as a backup
//! does: its backups wait, instead of reading a disk that is being overwritten. A disk that a
//! running VM's qemu holds open for writing is never restored onto (409, and checked again when
//! its turn comes). A regular file takes the restored disk only once it is whole (`files.rs`);
//! what a restore the node died in left beside it is removed when the node starts, and what a
//! restore a stopping node paused left there is written on by the next start (`handover.rs`).
//! A disk held in a qcow2 image (stated in the VM's config, or a restore-directory file named
//! `*.qcow2`) is restored as a new qcow2 image of its own (`sink/image.rs`).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::{set_disk, DiskJob, Job, JobError, JobKind, JobRequest, JobState, Jobs, Phase};
use crate::api::{CopyMode, DiskFormat, JobStatus, RestoreRequest};
use crate::config::{valid_name, Disk, Settings};
use crate::error::MoveError;
use crate::files::Replacement;
use crate::mover::{self, Base};
use crate::pool::Endpoint;
use crate::sink::{FileSink, Qcow2Sink, Sink};
use crate::source::{Source, SourceSpec};
use crate::targets;

/// One disk of a restore: where it is read from, where it goes and how it is written there.
pub(super) struct PlannedDisk {
    pub(super) key: u32,
    endpoint: Endpoint,
    pub(super) dest: PathBuf,
    format: DiskFormat,
}

/// A restore's disks in their order, and the VMs whose disks it writes.
pub(super) struct RestorePlan {
    pub(super) disks: Vec<PlannedDisk>,
    vms: Vec<String>,
}

impl Jobs {
    /// Start a restore: the hub's exports back into files under the restore directory or onto
    /// the VMs' own disk paths.
    ///
    /// # Errors
    /// Bad input (400) or a job id in use (409).
    pub fn start_restore(self: &Arc<Self>, req: RestoreRequest) -> Result<Arc<Job>, JobError> {
        let plan = self.plan_restore(&req)?;
        let disks = plan.disks.iter().map(|p| DiskJob::new(p.key, CopyMode::Full)).collect();
        let job = Arc::new(Job::restore(req, disks));
        self.register_restore(&job, &plan)?;
        self.spawn_restore(&job, plan);
        self.record_changed.notify_one();
        Ok(job)
    }

    /// Add a restore to the table, holding its VMs and destinations.
    pub(super) fn register_restore(&self, job: &Arc<Job>, plan: &RestorePlan) -> Result<(), JobError> {
        let vms: Vec<&str> = plan.vms.iter().map(String::as_str).collect();
        let paths: Vec<&Path> = plan.disks.iter().map(|p| p.dest.as_path()).collect();
        self.register(Arc::clone(job), &vms, &paths)
    }

    /// Check a restore's request against the node's rules, and plan it.
    pub(super) fn plan_restore(&self, req: &RestoreRequest) -> Result<RestorePlan, JobError> {
        if !valid_name(&req.job_id) {
            return Err(JobError::BadRequest(format!("job_id '{}' is not a valid name", req.job_id)));
        }
        let targets = targets::parse(&req.nbd_targets).map_err(|e| JobError::BadRequest(e.to_string()))?;
        let mut plan: Vec<PlannedDisk> = Vec::new();
        let mut vms: Vec<String> = Vec::new();
        for t in &targets {
            let dest = req
                .destinations
                .get(&t.key.to_string())
                .ok_or_else(|| JobError::BadRequest(format!("no destination for disk {}", t.key)))?;
            let (dest, vm, format) = self.allowed_destination(dest)?;
            if let Some(why) = written_by_a_vm(&dest) {
                return Err(JobError::Conflict(why));
            }
            if let Some(other) = plan.iter().find(|p| p.dest == dest) {
                return Err(JobError::BadRequest(format!(
                    "disks {} and {} both restore to {}: one would replace the other",
                    other.key,
                    t.key,
                    dest.display()
                )));
            }
            vms.extend(vm.filter(|v| !vms.contains(v)));
            plan.push(PlannedDisk { key: t.key, endpoint: self.dial_endpoint(t, None)?, dest, format });
        }
        if let Some(extra) = req.destinations.keys().find(|k| !targets.iter().any(|t| t.key.to_string() == **k)) {
            return Err(JobError::BadRequest(format!("destination for disk {extra} has no target")));
        }
        Ok(RestorePlan { disks: plan, vms })
    }

    /// Run a registered restore to its end, one disk after another (a disk completed before a
    /// stop is not restored again), or until a stopping node pauses it.
    pub(super) fn spawn_restore(self: &Arc<Self>, job: &Arc<Job>, plan: RestorePlan) {
        let jobs = Arc::clone(self);
        let run_job = Arc::clone(job);
        tokio::spawn(async move {
            let mut error = None;
            for (index, disk) in plan.disks.into_iter().enumerate() {
                if run_job.pause.is_cancelled() {
                    break;
                }
                if run_job.disks.get(index).is_some_and(|d| d.status() == "completed") {
                    continue;
                }
                if let Err(e) = jobs.restore_one(&run_job, index, disk).await {
                    error = Some(e);
                    break;
                }
            }
            let unfinished = run_job.disks.iter().any(|d| d.status() != "completed");
            if run_job.pause.is_cancelled() && !run_job.cancel.is_cancelled() && error.is_none() && unfinished {
                tracing::info!(job = %run_job.id, "restore paused: handed over to the next start");
                if let Ok(mut s) = run_job.state.lock() {
                    s.handed_over = true;
                }
                return;
            }
            let status = match &error {
                _ if run_job.cancel.is_cancelled() => JobStatus::Cancelled,
                None => JobStatus::Completed,
                Some(_) => JobStatus::Failed,
            };
            run_job.finish(status, error);
            jobs.release(&run_job);
            jobs.record_changed.notify_one();
        });
    }

    async fn restore_one(&self, job: &Job, index: usize, disk: PlannedDisk) -> Result<(), String> {
        let PlannedDisk { endpoint, dest, format, .. } = disk;
        let dest = dest.as_path();
        let Some(dj) = job.disks.get(index) else { return Err("internal: disk index".into()) };
        // Paused by the node's last stop: what the file beside the destination holds.
        let resume = dj.state.lock().ok().and_then(|mut s| s.resume.take()).map(super::owned);
        set_disk(dj, "running", None, None);
        let fail = |e: MoveError| {
            set_disk(
                dj,
                if matches!(e, MoveError::Cancelled) { "cancelled" } else { "failed" },
                None,
                Some(e.to_string()),
            );
            format!("disk {}: {e}", dj.key)
        };
        // A restore taken up that ends before its copy goes on (the hub's exports gone, the job
        // cancelled meanwhile, a VM started on the disk) removes the file it had begun beside the
        // destination: nothing will go on with it.
        let resuming = resume.is_some();
        let give_up = |e: MoveError| {
            if resuming {
                if let Some(beside) = Replacement::beside_of(dest) {
                    let _ = std::fs::remove_file(beside);
                }
            }
            fail(e)
        };
        let settings = self.settings();
        let opts = &job.copy_options(&settings.copy);
        let source =
            match Source::open_nbd(endpoint, None, opts.connections, opts.retry_window, job.cancel.clone()).await {
                Ok(source) => source,
                Err(e) => return Err(give_up(e)),
            };
        if let Some(why) = written_by_a_vm(dest) {
            source.close().await;
            return Err(give_up(MoveError::Mismatch(why)));
        }
        let made = match (format, resume) {
            (DiskFormat::Raw, None) => FileSink::create(dest, source.size()).map(|(s, zeroed)| {
                let base = if zeroed { Base::Zero } else { Base::Unknown };
                (Sink::File(s), base)
            }),
            (DiskFormat::Qcow2, None) => Qcow2Sink::create(dest, source.size()).map(|s| (Sink::Qcow2(s), Base::Zero)),
            // A backup never changes: what the run before finished is not read from the hub again.
            (DiskFormat::Raw, Some(map)) => {
                FileSink::resume(dest, source.size()).map(|s| (Sink::File(s), Base::Resume(map)))
            }
            (DiskFormat::Qcow2, Some(map)) => Qcow2Sink::resume(dest).map(|s| (Sink::Qcow2(s), Base::Resume(map))),
        };
        let (sink, base) = match made {
            Ok(made) => made,
            Err(e) => {
                source.close().await;
                return Err(give_up(e));
            }
        };
        let source = Arc::new(source);
        let sink = Arc::new(sink);
        let tokens = mover::Tokens {
            cancel: job.cancel.clone(),
            pause: job.pause.clone(),
            resumable: Arc::clone(&dj.resumable),
        };
        let result = mover::copy_disk(
            Arc::clone(&source),
            Arc::clone(&sink),
            base,
            mover::Changes::ReadAll,
            opts,
            Arc::clone(&dj.progress),
            Arc::default(),
            tokens,
        )
        .await;
        source.close().await;
        let outcome = match result.map_err(fail)? {
            mover::Ended::Completed(outcome) => outcome,
            mover::Ended::Paused(map) => {
                // The copy flushed the file; it stays beside the destination for the next start.
                sink.keep().await.map_err(fail)?;
                if let Ok(mut s) = dj.state.lock() {
                    s.status = "paused";
                    s.resume = Some(Arc::new(map));
                    s.checkpointed = false;
                }
                return Ok(());
            }
        };
        sink.commit().await.map_err(fail)?;
        set_disk(dj, "completed", outcome.checksum, None);
        if let Ok(mut s) = dj.state.lock() {
            s.reconnects = outcome.reconnects;
        }
        self.record_changed.notify_one();
        Ok(())
    }

    /// A restore may write a VM's own disk path or a file inside the restore directory, nothing
    /// else: the API must not become a way to overwrite any file on the node.
    /// Returns the path, for a VM's disk the VM's name, and how the disk is written there.
    fn allowed_destination(&self, dest: &str) -> Result<(PathBuf, Option<String>, DiskFormat), JobError> {
        let path = PathBuf::from(dest);
        let settings = self.settings();
        let owner = settings
            .vms
            .iter()
            .find_map(|v| v.disks.iter().find(|d| d.source.path() == Some(path.as_path())).map(|d| (v, d)));
        if let Some((vm, disk)) = owner {
            let format = destination_format(&vm.name, disk)?;
            return Ok((path, Some(vm.name.clone()), format));
        }
        let refuse = || {
            JobError::BadRequest(format!(
                "destination {dest} is neither a configured VM disk nor a plain file name inside the restore directory"
            ))
        };
        let dir = settings.restore_dir.as_ref().ok_or_else(refuse)?;
        let rel = path.strip_prefix(dir).map_err(|_| refuse())?;
        let mut parts = rel.components();
        match (parts.next(), parts.next()) {
            (Some(std::path::Component::Normal(name)), None) if valid_name(&name.to_string_lossy()) => {
                crate::files::create_private_dir(dir)
                    .map_err(|e| JobError::BadRequest(format!("restore directory {}: {e}", dir.display())))?;
                let path = dir.join(name);
                let format = match path.extension().is_some_and(|e| e == "qcow2") {
                    true => DiskFormat::Qcow2,
                    false => DiskFormat::Raw,
                };
                Ok((path, None, format))
            }
            _ => Err(refuse()),
        }
    }
}

impl Job {
    /// A running restore as `req` asks.
    pub(super) fn restore(req: RestoreRequest, disks: Vec<DiskJob>) -> Self {
        Self {
            id: req.job_id.clone(),
            kind: JobKind::Restore,
            vm_name: String::new(),
            cancel: CancellationToken::new(),
            pause: CancellationToken::new(),
            request: JobRequest::Restore(req),
            state: Mutex::new(JobState::running(Phase::Copying)),
            disks,
            started: std::time::Instant::now(),
            throttle: std::sync::OnceLock::new(),
        }
    }
}

/// Remove what restores the node was killed in the middle of left beside their destinations
/// (`.NAME.restoring` next to a VM's disk or in the restore directory), before any restore can
/// run: each holds up to a whole disk, and none of them will ever be put in place. `keep`: the
/// files of restores a stop paused and this start takes up.
pub(super) fn remove_interrupted_restores(settings: &Settings, keep: &[PathBuf]) {
    let mut leftovers: Vec<PathBuf> = settings
        .vms
        .iter()
        .flat_map(|v| &v.disks)
        .filter_map(|d| d.source.path())
        .filter_map(Replacement::beside_of)
        .collect();
    if let Some(entries) = settings.restore_dir.as_deref().and_then(|dir| std::fs::read_dir(dir).ok()) {
        leftovers.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| n.starts_with('.') && n.ends_with(".restoring"))
        }));
    }
    let canonical = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    let keep: Vec<PathBuf> = keep.iter().map(canonical).collect();
    for path in leftovers.into_iter().filter(|p| !keep.contains(&canonical(p))) {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "removed what an interrupted restore left"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove what an interrupted restore left")
            }
        }
    }
}

/// How a VM's disk is restored: as the format its config states (a qcow2 disk as a new qcow2
/// image; a block device only raw, it has no beside to build an image in). A disk whose format
/// is not stated but whose file holds an image is refused, as its backups are: raw bytes over it
/// would leave the VM an image it cannot open.
fn destination_format(vm: &str, disk: &Disk) -> Result<DiskFormat, JobError> {
    let refuse = |why: String| Err(JobError::BadRequest(format!("disk {} of VM {vm}: {why}", disk.key)));
    match &disk.source {
        SourceSpec::Path { path, format: Some(DiskFormat::Qcow2), .. } => {
            if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
                return refuse(format!(
                    "{} is a block device holding a qcow2 image, which a restore does not write: restore to a \
                     file and `qemu-img convert -O qcow2 FILE {}`",
                    path.display(),
                    path.display()
                ));
            }
            Ok(DiskFormat::Qcow2)
        }
        SourceSpec::Path { path, format: None, .. } => {
            let found = std::fs::File::open(path).ok().and_then(|f| crate::source::sniff(&f).ok().flatten());
            match found {
                None => Ok(DiskFormat::Raw),
                Some("qcow2") => refuse(format!(
                    "{} holds a qcow2 image and its format is not stated: set format = \"qcow2\" on the disk to \
                     restore it as one (a restore writes raw bytes otherwise)",
                    path.display()
                )),
                Some(other) => refuse(format!(
                    "{} is a {other} image, and a restore writes the disk's raw bytes: restore it to a file in the \
                     restore directory, then (the VM stopped) `qemu-img convert -f raw -O {other} FILE {}`",
                    path.display(),
                    path.display()
                )),
            }
        }
        SourceSpec::Path { format: Some(DiskFormat::Raw), .. } | SourceSpec::Nbd { .. } => Ok(DiskFormat::Raw),
    }
}

/// Why `dest` must not be restored onto now: a process (a running VM's qemu) holds it open for
/// writing. Where that cannot be told, nothing is said (`inuse.rs`).
fn written_by_a_vm(dest: &Path) -> Option<String> {
    match crate::inuse::held_for_writing(dest) {
        Ok(true) => Some(format!(
            "{} is open for writing by another process (it holds qemu's write lock, as a running VM does): \
             stop the VM before restoring onto its disk",
            dest.display()
        )),
        Ok(false) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(destination = %dest.display(), error = %e, "cannot tell whether a VM writes this disk");
            None
        }
    }
}
