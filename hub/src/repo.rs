//! The repository on disk: `REPO/VM/BACKUP_ID/disk-KEY.qcow2` and `manifest.json`, which is the
//! catalog. A backup exists when its manifest does: the manifest is written last, atomically
//! (temporary file, fsync, rename, fsync of the directory), and removed first when a backup is
//! deleted, so a crash at any point leaves either a complete backup or a directory without a
//! manifest, which the next start removes.
//! Replicas live apart: `REPLICAS/VM/disk-KEY.qcow2`, with an `INCONSISTENT` marker while a run
//! is writing them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One disk of a finished backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// Disk key.
    pub disk_key: u32,
    /// N of the export name `VM-diskN`.
    pub disk_id: u32,
    /// Virtual size.
    pub size: u64,
    /// Bytes allocated in this image (not its chain).
    pub allocated_bytes: u64,
    /// The node's checksum of the whole disk, verified against the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// File name inside the backup directory.
    pub file: String,
    /// Bytes that travelled from the node for this backup (data, not zeroes or unchanged).
    #[serde(default)]
    pub bytes_sent: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Backup id.
    pub backup_id: String,
    /// VM.
    pub vm_name: String,
    /// Node it came from.
    pub node: String,
    /// `full` or `incremental`.
    pub backup_type: String,
    /// The backup this one's images are overlays of.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Always `completed` (a backup without a manifest does not exist).
    pub status: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub completed_at: String,
    /// Disks in key order.
    pub disks: Vec<ManifestDisk>,
    /// Why the type differs from the one asked for (a full backup made for an incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The operator's labels, as the backup was asked for with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The `[[schedule]]` whose run made it (none: a request). A schedule with `keep_*` of its
    /// own prunes only the backups it made, by its name here (`jobs/prune.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Set while this backup is merged into this incremental on top of it (`DELETE
    /// ...?merge=true`, `jobs/merge.rs`): from then on no point in time of its own, not listed;
    /// a hub that stops before the merge is done finishes it when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merging_into: Option<String>,
    /// The last verification after the one that completed the backup (a scrub, `jobs/scrub.rs`,
    /// or `POST .../verify`); none yet: it was verified when it completed. Kept in its own file
    /// beside the manifest ([`Repo::verified_file`]), which only the verifications write: a merge
    /// rewriting the manifest meanwhile can neither lose it nor be undone by it.
    #[serde(skip)]
    pub verified: Option<Verified>,
    /// Its images rewritten compressed (`compress = "zstd"`, `jobs/compress.rs`); none: stored
    /// as the node sent them. Kept in its own file beside the manifest
    /// ([`Repo::compressed_file`]), removed by a merge that writes into its images.
    #[serde(skip)]
    pub compressed: Option<Compressed>,
}

/// What the compression of a backup's images did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compressed {
    /// When it ended (RFC 3339 UTC).
    pub at: String,
    /// Bytes of data the images hold for their own layers, uncompressed.
    pub data_bytes: u64,
    /// Bytes the image files take now.
    pub stored_bytes: u64,
}

/// The file beside a backup's manifest recording its compression.
pub const COMPRESSED_FILE: &str = "compressed.json";
/// The suffix of an image's copy being written beside it, compressed or standing alone (removed at
/// start).
pub const COMPACTING_SUFFIX: &str = ".compacting";

/// The outcome of a verification of a completed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// When it ended (RFC 3339 UTC).
    pub at: String,
    /// Every image sound and equal to its checksum.
    pub ok: bool,
    /// What failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Manifest {
    /// When the backup was last known whole: its last verification, else its completion.
    pub fn verified_at(&self) -> &str {
        self.verified.as_ref().map_or(&self.completed_at, |v| &v.at)
    }
}

/// The file under the repository's root listing the restores the hub drives on nodes.
const RESTORES_IN_FLIGHT: &str = ".restores-in-flight.json";
/// The last occurrence each backup schedule handled (`jobs/scheduled.rs`).
const SCHEDULE_MARKS: &str = ".schedules.json";

/// Paths of the repository.
#[derive(Debug, Clone)]
pub struct Repo {
    /// Backups.
    pub root: PathBuf,
    /// Replicas.
    pub replicas: PathBuf,
    /// Replicas are raw files (`disk-KEY.raw`) instead of qcow2.
    pub replica_raw: bool,
}

impl Repo {
    /// A backup's directory.
    pub fn backup_dir(&self, vm: &str, id: &str) -> PathBuf {
        self.root.join(vm).join(id)
    }

    /// A disk image of a backup.
    pub fn disk_path(&self, vm: &str, id: &str, key: u32) -> PathBuf {
        self.backup_dir(vm, id).join(disk_file(key))
    }

    /// A replica image.
    pub fn replica_path(&self, vm: &str, key: u32) -> PathBuf {
        let name = if self.replica_raw { format!("disk-{key}.raw") } else { disk_file(key) };
        self.replicas.join(vm).join(name)
    }

    /// The marker of a replica set being written.
    pub fn replica_marker(&self, vm: &str) -> PathBuf {
        self.replicas.join(vm).join("INCONSISTENT")
    }

    /// Where a backup's manifest goes and what it holds (written last and atomically).
    ///
    /// # Errors
    /// The manifest cannot be serialised.
    pub fn manifest_file(&self, m: &Manifest) -> std::io::Result<(PathBuf, Vec<u8>)> {
        let data = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
        Ok((self.backup_dir(&m.vm_name, &m.backup_id).join("manifest.json"), data))
    }

    /// The restores the hub is driving on nodes, as (node, restore id), from
    /// `REPO/.restores-in-flight.json` (none when it is missing or unreadable): what a hub killed
    /// meanwhile left running on its nodes (`jobs/restore_run.rs`).
    pub fn restores_in_flight(&self) -> Vec<(String, String)> {
        std::fs::read(self.root.join(RESTORES_IN_FLIGHT))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Replace that list, atomically and durably.
    ///
    /// # Errors
    /// It cannot be written.
    pub fn save_restores_in_flight(&self, list: &[(String, String)]) -> std::io::Result<()> {
        let data = serde_json::to_vec(list).map_err(std::io::Error::other)?;
        node::files::write_atomically(&self.root.join(RESTORES_IN_FLIGHT), &data)
    }

    /// The last occurrence each schedule handled (`.schedules.json`; none when missing or
    /// unreadable: each schedule then starts from its next occurrence).
    pub fn schedule_marks(&self) -> BTreeMap<String, String> {
        std::fs::read(self.root.join(SCHEDULE_MARKS))
            .ok()
            .and_then(|data| serde_json::from_slice(&data).ok())
            .unwrap_or_default()
    }

    /// Keep the schedules' marks, atomically.
    ///
    /// # Errors
    /// They cannot be written.
    pub fn save_schedule_marks(&self, marks: &BTreeMap<String, String>) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(marks).map_err(std::io::Error::other)?;
        node::files::write_atomically(&self.root.join(SCHEDULE_MARKS), &data)
    }

    /// Where a backup's last verification is kept, and what it holds.
    ///
    /// # Errors
    /// It cannot be serialised.
    pub fn verified_file(&self, m: &Manifest, v: &Verified) -> std::io::Result<(PathBuf, Vec<u8>)> {
        let data = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
        Ok((self.backup_dir(&m.vm_name, &m.backup_id).join("verified.json"), data))
    }

    /// `compressed.json` of backup `m`, with its contents.
    ///
    /// # Errors
    /// Serialising failed.
    pub fn compressed_file(&self, m: &Manifest, c: &Compressed) -> std::io::Result<(PathBuf, Vec<u8>)> {
        let data = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
        Ok((self.backup_dir(&m.vm_name, &m.backup_id).join(COMPRESSED_FILE), data))
    }

    /// Every backup with a valid manifest, and the runs a killed hub left behind: directories
    /// without a manifest (removed here, and logged) and replica sets still marked inconsistent.
    /// The interrupted runs are returned as (VM, job id) so that their node jobs can be
    /// cancelled: the node may still be copying into ports nobody serves. Runs a stopping hub
    /// handed over to this start (`handed_over`, by id) are left as they are: they are taken up.
    pub fn scan(&self, handed_over: &std::collections::HashSet<String>) -> (Vec<Manifest>, Vec<(String, String)>) {
        let mut out = Vec::new();
        let mut interrupted = Vec::new();
        if let Ok(vms) = std::fs::read_dir(&self.root) {
            for vm in vms.flatten().filter(|e| e.path().is_dir()) {
                let Ok(backups) = std::fs::read_dir(vm.path()) else { continue };
                for b in backups.flatten().filter(|e| e.path().is_dir()) {
                    let path = b.path();
                    let manifest = std::fs::read(path.join("manifest.json"))
                        .ok()
                        .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok());
                    match manifest {
                        Some(mut m) if m.backup_id == b.file_name().to_string_lossy() => {
                            m.verified = std::fs::read(path.join("verified.json"))
                                .ok()
                                .and_then(|bytes| serde_json::from_slice::<Verified>(&bytes).ok());
                            m.compressed = std::fs::read(path.join(COMPRESSED_FILE))
                                .ok()
                                .and_then(|bytes| serde_json::from_slice::<Compressed>(&bytes).ok());
                            remove_compacting(&path);
                            out.push(m);
                        }
                        // A run a stopping hub handed over to this start (`jobs/handover.rs`).
                        None if handed_over.contains(b.file_name().to_string_lossy().as_ref()) => {}
                        _ => {
                            tracing::warn!(dir = %path.display(), "removing an interrupted backup (no valid manifest)");
                            interrupted.push((
                                vm.file_name().to_string_lossy().into_owned(),
                                b.file_name().to_string_lossy().into_owned(),
                            ));
                            remove_dir(&path);
                        }
                    }
                }
            }
        }
        if let Ok(vms) = std::fs::read_dir(&self.replicas) {
            for vm in vms.flatten() {
                let vm = vm.file_name().to_string_lossy().into_owned();
                if let Ok(id) = std::fs::read_to_string(self.replica_marker(&vm)) {
                    if handed_over.contains(id.trim()) {
                        continue;
                    }
                    interrupted.push((vm, id.trim().to_string()));
                }
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.backup_id.cmp(&b.backup_id)));
        (out, interrupted)
    }
}

/// How the hub opens an image of its repository: backing formats never guessed, and the
/// backing chain kept inside the VM's directory (`REPO/VM/`), where the hub put it.
pub fn image_options(image: &Path, writable: bool) -> qcow2::ImageOptions {
    let vm_dir = image.parent().and_then(Path::parent).map(Path::to_path_buf);
    qcow2::ImageOptions::default().writable(writable).probe_backing_format(false).confine_backing_to(vm_dir)
}

/// `disk-KEY.qcow2`.
pub fn disk_file(key: u32) -> String {
    format!("disk-{key}.qcow2")
}

/// Remove a completed backup so that a crash at any moment leaves the whole backup or a
/// directory without a manifest, which the next start removes as interrupted; never a listed
/// backup with an image gone (the directory's own order of removal is arbitrary). So the
/// manifest goes first and the directory is synced; then the rest, which cannot fail the call.
///
/// # Errors
/// The manifest could not be removed, or the removal not made durable: the backup is whole.
pub fn remove_backup(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join("manifest.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(dir)?.sync_all()?;
    remove_dir(dir);
    Ok(())
}

/// Remove what a rewrite cut short (a compression, or a backup made to stand alone; `rewrite.rs`)
/// left in a backup's directory (`*.compacting`): the original images are whole, these are never
/// put in place.
fn remove_compacting(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(COMPACTING_SUFFIX) {
            tracing::warn!(file = %e.path().display(), "removing the copy of an image whose rewrite was cut short");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Remove a directory, logging instead of failing.
pub fn remove_dir(path: &Path) {
    if path.exists() {
        if let Err(e) = std::fs::remove_dir_all(path) {
            tracing::error!(dir = %path.display(), error = %e, "could not remove");
        }
    }
}

/// Now as RFC 3339 UTC with milliseconds, always 24 characters (so that ids and times sort in
/// creation order as text).
pub fn now_rfc3339() -> String {
    rfc3339_millis(jiff::Timestamp::now())
}

/// `t` as the API writes times: RFC 3339, UTC, milliseconds.
pub fn rfc3339_millis(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanning_keeps_manifested_backups_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo { root: dir.path().join("repo"), replicas: dir.path().join("replicas"), replica_raw: false };
        let m = Manifest {
            backup_id: "b1".into(),
            vm_name: "vm".into(),
            node: "default".into(),
            backup_type: "full".into(),
            parent_id: None,
            status: "completed".into(),
            created_at: now_rfc3339(),
            completed_at: now_rfc3339(),
            disks: vec![ManifestDisk {
                disk_key: 2000,
                disk_id: 0,
                size: 1 << 20,
                allocated_bytes: 0,
                checksum: None,
                file: disk_file(2000),
                bytes_sent: 0,
            }],
            note: None,
            tags: vec![],
            schedule: None,
            merging_into: None,
            verified: None,
            compressed: None,
        };
        std::fs::create_dir_all(repo.backup_dir("vm", "b1")).unwrap();
        let (path, data) = repo.manifest_file(&m).unwrap();
        node::files::write_atomically(&path, &data).unwrap();
        std::fs::create_dir_all(repo.backup_dir("vm", "half")).unwrap();
        std::fs::write(repo.disk_path("vm", "half", 2000), b"partial").unwrap();
        let (kept, interrupted) = repo.scan(&Default::default());
        assert_eq!(kept, vec![m]);
        assert_eq!(interrupted, vec![("vm".to_string(), "half".to_string())], "its node job is to be cancelled");
        assert!(!repo.backup_dir("vm", "half").exists());
    }

    #[test]
    fn a_backup_is_removed_manifest_first_and_kept_whole_when_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let backup = dir.path().join("b1");
        std::fs::create_dir_all(&backup).unwrap();
        std::fs::write(backup.join("disk-2000.qcow2"), b"image").unwrap();
        // A manifest that cannot be unlinked (a directory in its place): nothing else goes.
        std::fs::create_dir(backup.join("manifest.json")).unwrap();
        assert!(remove_backup(&backup).is_err());
        assert!(backup.join("disk-2000.qcow2").exists(), "the images stay while the manifest does");
        std::fs::remove_dir(backup.join("manifest.json")).unwrap();
        std::fs::write(backup.join("manifest.json"), b"{}").unwrap();
        remove_backup(&backup).unwrap();
        assert!(!backup.exists());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24);
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
        let parsed: jiff::Timestamp = t.parse().unwrap();
        assert!(jiff::Timestamp::now().duration_since(parsed).as_secs() < 5, "{t}");
        let whole: jiff::Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        assert_eq!(rfc3339_millis(whole), "2026-03-01T00:00:00.000Z");
    }
}
