//! Deleting a backup that an incremental builds on, by merging that incremental into it
//! (`DELETE /api/v1/backups/{id}?merge=true`): what keeping the last N points in time of a VM
//! needs when its backups are one chain of overlays.
//!
//! Backup X with its one incremental C on top: C's own layer is committed into X's images
//! (`qcow2::commit`), each of X's images then takes the place of C's (a rename), and C's manifest
//! names X's parent as its own (`full` when X was one). C reads the same disk before, during and
//! after; X is gone. The work is the size of C's change, not of the disk, and nothing crosses the
//! network: the next incremental still builds on C, so a VM can be backed up incrementally
//! forever while its oldest point in time is dropped each day.
//!
//! Crash safety, step by step: X's manifest is first rewritten with `merging_into: C` (from then
//! on X is no point in time of its own, and is no longer listed); while C's overlay exists, reading
//! it gives C's disk whatever part of the commit was done (only ranges C holds are written below
//! it); the rename replaces C's overlay with the full image at once; C's manifest is rewritten
//! once every disk is renamed; X's directory goes last. A hub killed anywhere in that finishes the
//! merge when it starts again (every step is redone or skipped as already done). A merge that
//! fails (no space, an I/O error) leaves C whole and X unlisted; asking again retries it. A merge
//! done again first reclaims the clusters the cut attempt may have leaked in X's images
//! (`ImageOptions::reclaim_leaks`), so the image C is left with checks clean.
//!
//! Merges of one VM take turns with its deletes: while one runs or waits to be retried, other
//! deletes of that VM's backups are refused (409), since they would change the chain under it.
//! A merge into a backup whose images are being rewritten (`rewrite.rs`) is refused (409) until
//! that is done, and removes the backup's record of compression: its images hold uncompressed
//! clusters again, which the next compression pass rewrites.
//!
//! Retention (`prune.rs`) deletes the backups its policy does not keep this way, oldest first.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcow2::Image;

use super::files::off_runtime;
use super::view::manifest_view;
use super::{Hub, JobView};
use crate::error::HubError;
use crate::repo::{self, Manifest, Repo};

/// A merge of the VM's backup `from` into `into`, running or waiting for a retry.
#[derive(Debug, Clone)]
pub(super) struct Merge {
    /// The backup being merged away (its manifest as before the merge).
    pub from: Manifest,
    /// The incremental it is merged into.
    pub into: String,
    /// Why its last attempt failed; `None` while one runs (a request or the start is doing it).
    pub failed: Option<String>,
}

impl Merge {
    /// Why another delete of the VM's backups has to wait.
    pub fn blocks(&self) -> String {
        match &self.failed {
            None => format!("backup {} is being merged into {}", self.from.backup_id, self.into),
            Some(e) => format!(
                "the merge of backup {} into {} failed ({e}): retry it with DELETE /api/v1/backups/{}?merge=true",
                self.from.backup_id, self.into, self.from.backup_id
            ),
        }
    }
}

/// How the API shows `m`, a backup of the catalog: as [`manifest_view`] does, except while a merge
/// of its parent into it runs or waits for a retry. The parent is no point in time of its own from
/// the moment it is marked (no longer listed, a `GET` of it 404), so `m` already names the
/// parent's parent as its own (`full` when there is none), as its manifest will once the merge is
/// done, and its `note` says what is under way: a script walking a chain never meets an id the
/// API does not know. Its images read the same disk throughout (module doc).
pub(super) fn listed_view(m: &Manifest, merges: &HashMap<String, Merge>, repo: &Repo) -> JobView {
    let mut view = manifest_view(m, Some(&repo.backup_dir(&m.vm_name, &m.backup_id)));
    let merging_parent = merges
        .get(&m.vm_name)
        .filter(|merge| merge.into == m.backup_id && m.parent_id.as_deref() == Some(merge.from.backup_id.as_str()));
    if let Some(merge) = merging_parent {
        view.parent_id.clone_from(&merge.from.parent_id);
        if view.parent_id.is_none() {
            view.backup_type = "full".into();
        }
        let under_way = merge.blocks();
        view.note = Some(match view.note.take() {
            Some(n) => format!("{n}; {under_way}"),
            None => under_way,
        });
    }
    view
}

impl super::State {
    /// The merge of backup `id` into its incremental, running or waiting for a retry: `id` is
    /// being merged away.
    pub(super) fn merge_of(&self, id: &str) -> Option<&Merge> {
        self.merges.values().find(|m| m.from.backup_id == id)
    }
}

impl Hub {
    /// Delete backup `id`; if an incremental builds on it, merge that incremental into it first
    /// (module doc). A backup nothing builds on is deleted as by [`Hub::delete`].
    ///
    /// # Errors
    /// Unknown (404); in use by a restore or a verify, more than one incremental on it, or
    /// another merge of the VM in the way (409); the merge failed (500, retried by asking again).
    pub async fn delete_merging(&self, id: &str) -> Result<JobView, HubError> {
        let Some((from, into)) = self.start_merge(id)? else {
            return self.delete(super::Kind::Backup, id).await;
        };
        self.run_merge(from, into).await
    }

    /// Under the state lock: the backup to merge away and the incremental to merge it into, now
    /// registered as running; `None` when nothing builds on it (a plain delete).
    fn start_merge(&self, id: &str) -> Result<Option<(Manifest, Manifest)>, HubError> {
        let mut st = self.state();
        let retry = st.merge_of(id).cloned();
        let (from, into) = match retry {
            Some(m) if m.failed.is_none() => return Err(HubError::Conflict(m.blocks())),
            Some(m) => {
                let into = st.catalog.get(&m.into).cloned().ok_or_else(|| {
                    HubError::Internal(format!("backup {} to merge into is not in the catalog", m.into))
                })?;
                (m.from, into)
            }
            None => {
                let from =
                    st.catalog.get(id).cloned().ok_or_else(|| HubError::NotFound(format!("unknown backup {id}")))?;
                let children: Vec<&Manifest> =
                    st.catalog.values().filter(|c| c.parent_id.as_deref() == Some(id)).collect();
                let into = match children.as_slice() {
                    [] => return Ok(None),
                    [child] => (*child).clone(),
                    more => {
                        let ids: Vec<&str> = more.iter().map(|c| c.backup_id.as_str()).collect();
                        return Err(HubError::Conflict(format!(
                            "backups {} are incrementals on top of {id}: only a backup with one can be merged",
                            ids.join(", ")
                        )));
                    }
                };
                if let Some(m) = st.merges.get(&from.vm_name) {
                    return Err(HubError::Conflict(m.blocks()));
                }
                if let Some((_, why)) = st.pins.values().find(|(backup, _)| *backup == from.backup_id) {
                    return Err(HubError::Conflict(format!("backup {id} is in use: {why}")));
                }
                if st.rewriting.contains(&into.backup_id) {
                    return Err(HubError::Conflict(format!(
                        "backup {} (which {id} would be merged into) is being rewritten (compressed, or made to stand \
                         alone): try again when it is done",
                        into.backup_id
                    )));
                }
                if st.restores.values().any(|r| r.backup_id == id) {
                    return Err(HubError::Conflict(format!("backup {id} has an open restore")));
                }
                st.catalog.remove(id);
                (from, into)
            }
        };
        st.merges
            .insert(from.vm_name.clone(), Merge { from: from.clone(), into: into.backup_id.clone(), failed: None });
        Ok(Some((from, into)))
    }

    /// The merge itself, off the runtime; its outcome recorded in the catalog and `merges`.
    async fn run_merge(&self, from: Manifest, into: Manifest) -> Result<JobView, HubError> {
        tracing::info!(backup = %from.backup_id, into = %into.backup_id, "merging a backup into its incremental");
        let repo = self.repo.clone();
        let (f, i) = (from.clone(), into.clone());
        let merged = off_runtime("merging a backup", move || merge_files(&repo, &f, &i))
            .await
            .and_then(|r| r.map_err(HubError::Internal));
        let started = merged.is_ok() || self.marked(&from);
        let mut st = self.state();
        match merged {
            Ok(merged) => {
                st.merges.remove(&from.vm_name);
                st.catalog.insert(merged.backup_id.clone(), merged);
                tracing::info!(backup = %from.backup_id, into = %into.backup_id, "merged");
                drop(st);
                // Its images hold uncompressed clusters again.
                self.wake_rewrites();
                Ok(manifest_view(&from, None))
            }
            Err(e) if !started => {
                // It failed before the backup was marked: nothing changed, it is listed again.
                tracing::error!(backup = %from.backup_id, into = %into.backup_id, error = %e, "merge not started");
                st.merges.remove(&from.vm_name);
                st.catalog.insert(from.backup_id.clone(), from);
                Err(e)
            }
            Err(e) => {
                tracing::error!(backup = %from.backup_id, into = %into.backup_id, error = %e, "merge failed");
                if let Some(m) = st.merges.get_mut(&from.vm_name) {
                    m.failed = Some(e.to_string());
                }
                Err(HubError::Internal(format!(
                    "merging backup {} into {} failed: {e}; backup {} is whole, and asking again retries the merge",
                    from.backup_id, into.backup_id, into.backup_id
                )))
            }
        }
    }

    /// Why backup `id` is not listed when it is being merged away (a merge running, or failed and
    /// waiting for a retry): for the 404 of a `GET` of it, which would otherwise only say
    /// "unknown".
    pub fn merged_away(&self, id: &str) -> Option<String> {
        let st = self.state();
        let merge = st.merge_of(id)?;
        Some(format!("backup {id} is no point in time of its own any more: {}", merge.blocks()))
    }

    /// Merges (running, failed and waiting for a retry), for the metrics: a failed one holds the
    /// VM's deletes and its retention until someone retries it.
    pub fn merge_counts(&self) -> (usize, usize) {
        let st = self.state();
        let running = st.merges.values().filter(|m| m.failed.is_none()).count();
        (running, st.merges.len() - running)
    }

    /// Whether `backup`'s manifest on disk says it is being merged (or it is gone, merged).
    fn marked(&self, backup: &Manifest) -> bool {
        let path = self.repo.backup_dir(&backup.vm_name, &backup.backup_id).join("manifest.json");
        std::fs::read(path)
            .map_or(true, |bytes| serde_json::from_slice::<Manifest>(&bytes).map_or(true, |m| m.merging_into.is_some()))
    }
}

/// The merges a killed hub left (manifests marked `merging_into`), finished now: returns the
/// catalog (those backups out, their incrementals updated) and the merges that failed again,
/// kept for a retry. Blocking: the hub is not serving yet.
pub(super) fn finish_interrupted(repo: &Repo, manifests: Vec<Manifest>) -> (Vec<Manifest>, Vec<Merge>) {
    let (marked, mut catalog): (Vec<Manifest>, Vec<Manifest>) =
        manifests.into_iter().partition(|m| m.merging_into.is_some());
    let mut failed = Vec::new();
    for from in marked {
        let into_id = from.merging_into.clone().unwrap_or_default();
        let Some(at) = catalog.iter().position(|c| c.backup_id == into_id && c.vm_name == from.vm_name) else {
            // Nothing reads through it any more: what is left of it is no point in time.
            tracing::warn!(backup = %from.backup_id, into = %into_id, "removing a half-merged backup whose incremental is gone");
            if let Err(e) = repo::remove_backup(&repo.backup_dir(&from.vm_name, &from.backup_id)) {
                tracing::error!(backup = %from.backup_id, error = %e, "cannot remove it");
            }
            continue;
        };
        tracing::warn!(backup = %from.backup_id, into = %into_id, "finishing a merge a stopped hub left");
        let into = catalog.get(at).cloned().unwrap_or_else(|| from.clone());
        match merge_files(repo, &from, &into) {
            Ok(merged) => {
                if let Some(slot) = catalog.get_mut(at) {
                    *slot = merged;
                }
            }
            Err(e) => {
                tracing::error!(backup = %from.backup_id, into = %into_id, error = %e, "merge failed again");
                failed.push(Merge { from, into: into_id, failed: Some(e) });
            }
        }
    }
    (catalog, failed)
}

/// The merge on disk, every step redone or skipped as already done (module doc). Returns `into`'s
/// new manifest.
///
/// # Errors
/// A step failed, as text; `into` is whole whatever the step.
pub(super) fn merge_files(repo: &Repo, from: &Manifest, into: &Manifest) -> Result<Manifest, String> {
    let vm = &from.vm_name;
    let from_dir = repo.backup_dir(vm, &from.backup_id);
    let into_dir = repo.backup_dir(vm, &into.backup_id);
    // An attempt before this one (cut, or failed) may have left clusters allocated and unused.
    let again = std::fs::read(from_dir.join("manifest.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok())
        .is_some_and(|m| m.merging_into.is_some());
    if from.merging_into.as_deref() != Some(into.backup_id.as_str()) {
        let marked = Manifest { merging_into: Some(into.backup_id.clone()), ..from.clone() };
        let (path, data) = repo.manifest_file(&marked).map_err(|e| format!("manifest: {e}"))?;
        node::files::write_atomically(&path, &data).map_err(|e| format!("cannot mark {}: {e}", path.display()))?;
    }
    // `into`'s images are about to be `from`'s with `into`'s layer written in, uncompressed: no
    // longer what its record of compression says (the next pass compresses them again).
    match std::fs::remove_file(into_dir.join(repo::COMPRESSED_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot remove {}: {e}", into_dir.join(repo::COMPRESSED_FILE).display()))
        }
        _ => {}
    }
    for disk in &into.disks {
        let top = into_dir.join(&disk.file);
        let below = from_dir.join(&disk.file);
        if !backed_by(&top, &below)? {
            // A disk new in `into` (a full image of its own), or one already merged.
            continue;
        }
        commit_disk(&top, &below, again)?;
        std::fs::rename(&below, &top)
            .map_err(|e| format!("cannot move {} to {}: {e}", below.display(), top.display()))?;
        sync_dir(&into_dir)?;
    }
    // `into`'s block hashes were kept against `from`'s, whose file goes below: kept again against
    // what each image reads through now, while `from`'s is still there.
    for disk in &into.disks {
        let top = into_dir.join(&disk.file);
        if let Ok(image) = Image::open_with(&top, &repo::image_options(&top, false)) {
            crate::blockhashes::keep_over(&top, image.header().backing_file.as_deref());
        }
    }
    let mut merged = Manifest { compressed: None, ..into.clone() };
    if merged.parent_id.as_deref() == Some(from.backup_id.as_str()) {
        merged.parent_id = from.parent_id.clone();
        if merged.parent_id.is_none() {
            merged.backup_type = "full".into();
        }
        let said = format!("merged with backup {} (its parent, deleted) at {}", from.backup_id, repo::now_rfc3339());
        merged.note = Some(match merged.note.take() {
            Some(n) => format!("{n}; {said}"),
            None => said,
        });
        for d in &mut merged.disks {
            d.allocated_bytes = std::fs::metadata(into_dir.join(&d.file)).map(|m| m.blocks() * 512).unwrap_or(0);
        }
        let (path, data) = repo.manifest_file(&merged).map_err(|e| format!("manifest: {e}"))?;
        node::files::write_atomically(&path, &data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    repo::remove_backup(&from_dir).map_err(|e| format!("cannot remove {}: {e}", from_dir.display()))?;
    Ok(merged)
}

/// Whether the image at `top` is an overlay whose backing file is the file at `below`.
fn backed_by(top: &Path, below: &Path) -> Result<bool, String> {
    let Ok(below_meta) = std::fs::metadata(below) else { return Ok(false) };
    let image = Image::open_with(top, &repo::image_options(top, false))
        .map_err(|e| format!("cannot open {}: {e}", top.display()))?;
    let Some(name) = image.header().backing_file.clone() else { return Ok(false) };
    let named = qcow2::image::resolve_backing(top, &name);
    Ok(std::fs::metadata(named).is_ok_and(|m| m.dev() == below_meta.dev() && m.ino() == below_meta.ino()))
}

/// Commit the overlay at `top` into its backing file `below`, durably; `again` (an earlier
/// attempt was cut or failed) reclaims the clusters it may have leaked in `below` first.
fn commit_disk(top: &Path, below: &Path, again: bool) -> Result<(), String> {
    let overlay = Image::open_with(top, &repo::image_options(top, false))
        .map_err(|e| format!("cannot open {}: {e}", top.display()))?;
    let base = Image::open_with(below, &repo::image_options(below, true).reclaim_leaks(again))
        .map_err(|e| format!("cannot open {} for writing: {e}", below.display()))?;
    let report = qcow2::commit(&overlay, &base).map_err(|e| format!("cannot merge {}: {e}", top.display()))?;
    base.close().map_err(|e| format!("cannot close {}: {e}", below.display()))?;
    tracing::debug!(image = %top.display(), data = report.data_bytes, zero = report.zero_bytes, "committed");
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::jobs::tests::{hub_in, manifest};
    use crate::jobs::Kind;
    use crate::repo::ManifestDisk;
    use qcow2::{BackingFormat, CreateOptions};

    pub(in crate::jobs) const SIZE: u64 = 4 << 20;

    pub(in crate::jobs) fn disk(key: u32) -> ManifestDisk {
        ManifestDisk {
            disk_key: key,
            disk_id: key - 2000,
            size: SIZE,
            allocated_bytes: 0,
            checksum: None,
            file: repo::disk_file(key),
            bytes_sent: 0,
        }
    }

    pub(in crate::jobs) fn read_all(path: &Path) -> Vec<u8> {
        let image = Image::open_with(path, &repo::image_options(path, false)).unwrap();
        let mut out = vec![0u8; SIZE as usize];
        image.read_at(&mut out, 0).unwrap();
        out
    }

    /// Backup `x` (full, two disks of data) and `c` on top (each disk partly rewritten, partly
    /// zeroed), on disk; returns what `c`'s disks read as.
    fn make_chain(repo: &Repo) -> (Manifest, Manifest, Vec<Vec<u8>>) {
        let x = Manifest { disks: vec![disk(2000), disk(2001)], ..manifest("x", "2026-01-01T00:00:00Z") };
        let c = Manifest {
            backup_type: "incremental".into(),
            parent_id: Some("x".into()),
            disks: vec![disk(2000), disk(2001)],
            ..manifest("c", "2026-01-02T00:00:00Z")
        };
        for m in [&x, &c] {
            std::fs::create_dir_all(repo.backup_dir("vm", &m.backup_id)).unwrap();
        }
        let mut expected = Vec::new();
        for key in [2000u32, 2001] {
            let below = repo.disk_path("vm", "x", key);
            let image = Image::create(&below, &CreateOptions::new(SIZE)).unwrap();
            image.write_at(&vec![key as u8; 3 << 20], 0).unwrap();
            image.close().unwrap();
            let top = repo.disk_path("vm", "c", key);
            let backing = format!("../x/{}", repo::disk_file(key));
            Image::create(&top, &CreateOptions::overlay(backing, BackingFormat::Qcow2)).unwrap();
            let image = Image::open_with(&top, &repo::image_options(&top, true)).unwrap();
            image.write_at(&vec![0xc0 | (key as u8 & 0xf); 640 << 10], 512 << 10).unwrap();
            image.write_zeroes(2 << 20, 256 << 10).unwrap();
            image.close().unwrap();
            drop(image);
            expected.push(read_all(&top));
        }
        for m in [&x, &c] {
            let (path, data) = repo.manifest_file(m).unwrap();
            std::fs::write(path, data).unwrap();
            // Verified as a run's images are: each keeps its block hashes (c's as a difference).
            for key in [2000u32, 2001] {
                let path = repo.disk_path("vm", &m.backup_id, key);
                let sum = checksum_of(&path);
                assert!(crate::verify::verify_new_backup_disk(&path, key, Some(&sum)).ok());
            }
        }
        (x, c, expected)
    }

    fn checksum_of(path: &Path) -> String {
        let image = Image::open_with(path, &repo::image_options(path, false)).unwrap();
        crate::verify::image_checksum(&image, 65536).unwrap()
    }

    /// While a merge of `x` into `c` runs, and while it waits for a retry after failing, `x` is not
    /// listed and `c` names no backup the API does not know: it shows `x`'s parent (none: a full
    /// backup) and says in its note what is under way; a `GET` of `x` says why it is gone. Its
    /// manifest is not changed until the merge is done, and a merge of another VM, or into another
    /// backup, changes nothing of what `c` shows.
    #[test]
    fn an_incremental_whose_parent_is_being_merged_away_names_the_parent_s_parent() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let repo = hub_in(dir.path(), (first, first + 1)).repo.clone();
        let (x, c, _) = make_chain(&repo);
        let hub = hub_in(dir.path(), (first, first + 1));
        hub.state().catalog.remove("x");
        for failed in [None, Some("No space left on device".to_string())] {
            let merge = Merge { from: x.clone(), into: "c".into(), failed: failed.clone() };
            hub.state().merges.insert("vm".into(), merge.clone());
            let got = hub.get(Kind::Backup, "c").unwrap();
            let listed = hub.list(Kind::Backup, Some("vm"), None);
            assert_eq!(listed.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["c"], "{failed:?}");
            for view in [&got, &listed[0]] {
                assert_eq!((view.parent_id.as_deref(), view.backup_type.as_str()), (None, "full"), "{failed:?}");
                assert_eq!(view.note.as_deref(), Some(merge.blocks().as_str()), "{failed:?}");
            }
            assert_eq!(hub.state().catalog.get("c").unwrap().parent_id.as_deref(), Some("x"));
            assert!(hub.get(Kind::Backup, "x").is_none());
            let why = hub.merged_away("x").unwrap();
            assert!(why.contains(&merge.blocks()), "{why}");
            assert_eq!(hub.merged_away("c"), None);
        }
        // x on top of a backup w of its own: c names w, and stays an incremental.
        let on_w =
            Merge { from: Manifest { parent_id: Some("w".into()), ..x.clone() }, into: "c".into(), failed: None };
        hub.state().merges.insert("vm".into(), on_w);
        let got = hub.get(Kind::Backup, "c").unwrap();
        assert_eq!((got.parent_id.as_deref(), got.backup_type.as_str()), (Some("w"), "incremental"));
        // A merge of another VM, or into another backup, changes nothing of c.
        for (vm, into) in [("other", "c"), ("vm", "d")] {
            hub.state().merges.clear();
            hub.state().merges.insert(vm.into(), Merge { from: x.clone(), into: into.into(), failed: None });
            let got = hub.get(Kind::Backup, "c").unwrap();
            assert_eq!((got.parent_id.as_deref(), got.note.as_deref()), (Some("x"), c.note.as_deref()), "{vm} {into}");
        }
    }

    /// A hub killed after each step of a merge finishes it when it starts: `c` reads as before,
    /// stands alone (a full backup), its images check clean, and `x` is gone.
    #[test]
    fn a_merge_cut_after_any_step_is_finished_by_the_next_start() {
        for steps in 0..=3 {
            let dir = tempfile::tempdir().unwrap();
            let first = testports::free_ports(2);
            let repo = hub_in(dir.path(), (first, first + 1)).repo.clone();
            let (x, c, expected) = make_chain(&repo);
            let marked = Manifest { merging_into: Some("c".into()), ..x.clone() };
            let (path, data) = repo.manifest_file(&marked).unwrap();
            std::fs::write(path, data).unwrap();
            for key in [2000u32, 2001].into_iter().take(steps.min(2)) {
                let (top, below) = (repo.disk_path("vm", "c", key), repo.disk_path("vm", "x", key));
                commit_disk(&top, &below, false).unwrap();
                std::fs::rename(&below, &top).unwrap();
            }
            if steps == 3 {
                let done = Manifest { parent_id: None, backup_type: "full".into(), ..c.clone() };
                let (path, data) = repo.manifest_file(&done).unwrap();
                std::fs::write(path, data).unwrap();
            }

            let hub = hub_in(dir.path(), (first, first + 1));
            let st = hub.state();
            let ids: Vec<&String> = st.catalog.keys().collect();
            assert_eq!(ids, ["c"], "after {steps} steps");
            let merged = st.catalog.get("c").unwrap();
            assert_eq!((merged.parent_id.as_deref(), merged.backup_type.as_str()), (None, "full"), "{steps}");
            assert!(st.merges.is_empty(), "{steps}");
            assert!(!repo.backup_dir("vm", "x").exists(), "after {steps} steps");
            for (i, key) in [2000u32, 2001].into_iter().enumerate() {
                let path = repo.disk_path("vm", "c", key);
                let image = Image::open_with(&path, &repo::image_options(&path, false)).unwrap();
                assert!(image.header().backing_file.is_none(), "after {steps} steps");
                assert!(image.check().unwrap().is_clean(), "after {steps} steps");
                assert!(read_all(&path) == expected[i], "disk {key} after {steps} steps");
                // Its block hashes were kept against x's: kept again, whole, before x went.
                let kept = crate::blockhashes::load(&path).map(|m| m.checksum());
                assert_eq!(kept, Some(checksum_of(&path)), "disk {key} after {steps} steps");
                let file = std::fs::read(crate::blockhashes::file_of(&path)).unwrap();
                assert_eq!(file.get(..8), Some(&b"SNDMAP02"[..]), "disk {key} after {steps} steps");
            }
        }
    }
}
