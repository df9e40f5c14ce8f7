//! The files a job makes and removes in the repository, always on tokio's blocking pool.
//!
//! A job creates its directory, the replica set's marker and one image per disk (each
//! `fsync`ed), writes its manifest or replica record atomically (two more `fsync`s), and
//! removes a failed run's directory (unlinking images of any size). On a busy repository each
//! of those can wait seconds for the disk. Called on a runtime worker, that wait also holds
//! every task queued behind it on that worker — NBD connections, the SSH endpoint's sessions,
//! the API — and with two workers a few jobs starting at once stall the whole hub. With `fsync`
//! slowed to 3 s (an `LD_PRELOAD` shim), twenty VMs backed up at once through the endpoint
//! timed out NBD handshakes and failed calls to the node until this work moved here. Small
//! reads (a marker, `exists`) stay where they are.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use qcow2::{CreateOptions, Image};

use crate::error::HubError;
use crate::repo;

/// Run `f` on the blocking pool and wait for it; `what` names it in the error if the task dies.
pub(super) async fn off_runtime<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HubError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| HubError::Internal(format!("{what}: {e}")))
}

/// What a job does with one disk's file before the node sends data.
pub(super) enum DiskFile {
    /// A new qcow2 image (or overlay), replacing any file there.
    Qcow2(CreateOptions),
    /// A new raw file of this size (a raw replica), replacing any file there.
    Raw(u64),
    /// The file there is written in place (a replica kept in sync) if it holds a disk of `size`
    /// bytes; otherwise (the VM's disk was resized, or the file cannot be read) `fresh` replaces
    /// it, and the node copies that disk in full.
    Keep { size: u64, fresh: Box<DiskFile> },
}

/// Everything a job makes before it opens its exports.
pub(super) struct JobFiles {
    /// The backup's directory, or the replica set's.
    pub dir: PathBuf,
    /// The directory is the job's own (a backup): removed again if anything here fails.
    pub owns_dir: bool,
    /// A marker written first (the replica set's "being written"), with its contents.
    pub marker: Option<(PathBuf, String)>,
    /// Each disk's file.
    pub disks: Vec<(PathBuf, DiskFile)>,
}

impl JobFiles {
    /// Make them all, off the runtime; on failure nothing of a backup's directory is left.
    ///
    /// # Errors
    /// The first file that could not be made (500).
    pub async fn make(self) -> Result<(), HubError> {
        off_runtime("creating the job's files", move || {
            let made = self.make_blocking();
            if made.is_err() && self.owns_dir {
                repo::remove_dir(&self.dir);
            }
            made
        })
        .await?
    }

    fn make_blocking(&self) -> Result<(), HubError> {
        let failed = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            HubError::Internal(format!("cannot {what} {}: {e}", path.display()))
        };
        node::files::create_private_dir(&self.dir).map_err(|e| failed("create", &self.dir, &e))?;
        if let Some((path, contents)) = &self.marker {
            std::fs::write(path, contents.as_bytes()).map_err(|e| failed("write", path, &e))?;
        }
        for (path, file) in &self.disks {
            make_disk_file(path, file)?;
        }
        Ok(())
    }
}

/// Backup and replica images hold whole VM disks: their owner's alone, in directories that are
/// too (`node::files::create_private_dir`).
const DISK_FILE_MODE: u32 = 0o600;

fn make_disk_file(path: &Path, file: &DiskFile) -> Result<(), HubError> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| HubError::Internal(format!("cannot {what} {}: {e}", path.display()));
    match file {
        DiskFile::Keep { size, fresh } => match disk_size(path) {
            Some(held) if held == *size => Ok(()),
            held => {
                tracing::info!(file = %path.display(), ?held, size, "the disk changed size: its file is made anew");
                make_disk_file(path, fresh)
            }
        },
        DiskFile::Qcow2(opts) => {
            remove_if_present(path).map_err(|e| failed("replace", &e))?;
            // Made and synced here (a new image counts as closed: its drop has nothing to do),
            // then reopened by its export.
            Image::create(path, &opts.clone().mode(DISK_FILE_MODE)).map_err(|e| failed("create", &e))?;
            Ok(())
        }
        DiskFile::Raw(size) => {
            remove_if_present(path).map_err(|e| failed("replace", &e))?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(DISK_FILE_MODE)
                .open(path)
                .and_then(|f| f.set_len(*size))
                .map_err(|e| failed("create", &e))
        }
    }
}

/// The size of the disk a file holds: a raw replica's length, a qcow2 image's virtual size.
fn disk_size(path: &Path) -> Option<u64> {
    if path.extension().is_some_and(|e| e == "raw") {
        return std::fs::metadata(path).ok().map(|m| m.len());
    }
    Image::open_with(path, &repo::image_options(path, false)).ok().map(|image| image.size())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Write `data` to `path` atomically and durably (`node::files::write_atomically`), off the
/// runtime.
///
/// # Errors
/// The write, its `fsync`s or the rename failed, as text for the job's reason.
pub(super) async fn write_atomically(path: PathBuf, data: Vec<u8>) -> Result<(), String> {
    off_runtime("writing a record", move || node::files::write_atomically(&path, &data).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// Remove a completed backup, manifest first (`repo::remove_backup`), off the runtime.
///
/// # Errors
/// Its manifest could not be removed: the backup is still whole on disk.
pub(super) async fn remove_backup(dir: PathBuf) -> Result<(), HubError> {
    let shown = dir.display().to_string();
    off_runtime("removing a backup", move || repo::remove_backup(&dir))
        .await?
        .map_err(|e| HubError::Internal(format!("cannot remove the manifest of {shown}: {e}")))
}

/// Remove a directory and everything in it (logged, never failing), off the runtime.
pub(super) async fn remove_dir(path: PathBuf) {
    if let Err(e) = off_runtime("removing a directory", move || repo::remove_dir(&path)).await {
        tracing::error!(error = %e, "could not remove a directory");
    }
}
