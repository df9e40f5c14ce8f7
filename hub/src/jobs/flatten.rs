//! Backups that end a chain longer than `max_chain`, made to stand alone on the hub: incremental
//! forever, whatever the retention.
//!
//! A VM's backups are a chain of overlays, and a chain is bounded (`max_chain`: every image of it
//! costs reads a lookup and an export a descriptor). When an incremental would make the chain
//! longer, it is still made as one (`start::choose_parent`): only the blocks that changed cross
//! the network, where a new full backup would send the whole disk again, a multi-terabyte VM
//! across a WAN every `max_chain` runs. Once it has completed (verified), the background pass
//! (`rewrite.rs`) copies what each of its images reads through the chain into a copy of it with
//! no backing file (`qcow2::flatten`, compressed with `compress = "zstd"`), which must check clean
//! and read as the chain did (`qcow2::compare_disks`) before it is renamed over the image; then
//! the manifest says it stands alone (no parent, type `full`, a note why). The next incremental
//! builds on it, and the chain starts again at two images. The backups under it keep their
//! points in time and their chain, as before, until retention drops them.
//!
//! Which backups: a completed one that no incremental builds on yet and whose chain holds more
//! than `max_chain` images (a reload that lowers `max_chain` so makes the newest backup of each
//! longer chain stand alone, once; the chains under them stay as they are). An incremental that
//! started on it meanwhile is laid over the file it opened, which holds the same disk; once it
//! completes, the incremental is the newest backup, with a chain of two.
//!
//! Crash safety: each image is replaced at once (a rename; `rewrite::replace_image`), the manifest
//! last. A hub killed in between finds the backup still due (its manifest names its parent) and
//! copies it again, the images that stand alone already included (a copy of a copy), so the
//! manifest never says a backup stands alone before all its images do. Until then a merge of its
//! parent into it (retention) finds the images that stand alone no longer backed by the parent and
//! leaves them as they are (`merge.rs`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcow2::Image;

use super::files::off_runtime;
use super::rewrite::{check_copy, replace_image};
use super::start::chain_images;
use super::{Hub, State};
use crate::error::HubError;
use crate::repo::{self, Compressed, Manifest};

/// What a failed rewrite of a chain's newest backup is kept as (`rewrite.rs`).
pub(super) const STANDING_ALONE: &str = "making it stand alone";

/// Images in `m`'s chain, as the catalog holds it.
fn chain_in_catalog(st: &State, m: &Manifest) -> usize {
    chain_images(m, |id| st.catalog.get(id), st.catalog.len())
}

impl Hub {
    /// The oldest completed backup due to stand alone (module doc), of a VM without a merge,
    /// not being rewritten, nor failed to be lately.
    pub(super) fn next_to_flatten(&self, max_chain: usize) -> Option<String> {
        let st = self.state();
        let parents: std::collections::HashSet<&str> =
            st.catalog.values().filter_map(|m| m.parent_id.as_deref()).collect();
        st.catalog
            .values()
            .filter(|m| !parents.contains(m.backup_id.as_str()) && m.parent_id.is_some())
            .filter(|m| !st.merges.contains_key(&m.vm_name) && !st.rewriting.contains(&m.backup_id))
            .filter(|m| !Self::rewrite_failed_lately(&st, STANDING_ALONE, &m.backup_id))
            .filter(|m| chain_in_catalog(&st, m) > max_chain)
            .min_by(|a, b| a.completed_at.cmp(&b.completed_at))
            .map(|m| m.backup_id.clone())
    }

    /// Backups due to stand alone whose rewrite failed and that are still on their chain (for the
    /// metrics).
    pub fn stand_alone_failures(&self) -> usize {
        let st = self.state();
        st.rewrite_failed
            .keys()
            .filter(|(what, id)| what == STANDING_ALONE && st.catalog.get(id).is_some_and(|m| m.parent_id.is_some()))
            .count()
    }

    /// Make backup `id` stand alone (module doc) if its chain still holds more than `max_chain`
    /// images.
    ///
    /// # Errors
    /// Gone or in use (409); no room for a copy now (503); an image could not be copied, or its
    /// copy did not compare equal (500): the backup is as it was.
    pub(super) async fn flatten_backup(&self, id: &str, max_chain: usize) -> Result<(), HubError> {
        let (m, _guard) = self.begin_rewrite(id, "its chain's data is being copied into it")?;
        let images = chain_in_catalog(&self.state(), &m);
        if images <= max_chain {
            // A merge shortened it meanwhile.
            return Ok(());
        }
        let compress = self.live().compress;
        let (data, stored) =
            self.rewrite_images(&m, "making an image stand alone", move |path| flatten_image(path, compress)).await?;
        let dir = self.repo.backup_dir(&m.vm_name, id);
        // The record of compression first, the manifest last.
        let compressed =
            compress.then(|| Compressed { at: repo::now_rfc3339(), data_bytes: data, stored_bytes: stored });
        match &compressed {
            Some(c) => self.record_compression(&m, c).await?,
            None => {
                let record = dir.join(repo::COMPRESSED_FILE);
                off_runtime("removing a record of compression", move || match std::fs::remove_file(&record) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(HubError::Internal(format!("cannot remove {}: {e}", record.display())))
                    }
                    _ => Ok(()),
                })
                .await??;
            }
        }
        let repo = self.repo.clone();
        let alone = off_runtime("writing a manifest", move || {
            let alone = standing_alone(&m, &dir, images, max_chain);
            let (path, data) = repo.manifest_file(&alone).map_err(|e| format!("manifest: {e}"))?;
            node::files::write_atomically(&path, &data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok::<_, String>(alone)
        })
        .await?
        .map_err(HubError::Internal)?;
        if let Some(current) = self.state().catalog.get_mut(id) {
            *current = Manifest { verified: current.verified.clone(), compressed, ..alone };
        }
        tracing::info!(backup = %id, images, max_chain, data_bytes = data, stored_bytes = stored, "backup made to stand alone");
        Ok(())
    }
}

/// `m`'s manifest once its images stand alone in `dir`: no parent, type `full`, a note why, each
/// disk's allocated bytes as its file holds them now.
fn standing_alone(m: &Manifest, dir: &Path, images: usize, max_chain: usize) -> Manifest {
    let said = format!(
        "made to stand alone on the hub at {}: it ended a chain of {images} images, more than max_chain = {max_chain} \
         (its chain's data copied into it; only its own changes had crossed the network)",
        repo::now_rfc3339()
    );
    let mut alone = Manifest {
        parent_id: None,
        backup_type: "full".into(),
        note: Some(match &m.note {
            Some(n) => format!("{n}; {said}"),
            None => said,
        }),
        ..m.clone()
    };
    for d in &mut alone.disks {
        d.allocated_bytes = std::fs::metadata(dir.join(&d.file)).map_or(d.allocated_bytes, |f| f.blocks() * 512);
    }
    alone
}

/// Replace the image at `path` with a copy of the disk it reads that has no backing file,
/// compressed or not: written, checked, compared with the chain, renamed over it. Blocking.
///
/// # Errors
/// As [`replace_image`].
fn flatten_image(path: &Path, compress: bool) -> Result<qcow2::CompactReport, HubError> {
    let src = Image::open_with(path, &repo::image_options(path, false))
        .map_err(|e| HubError::Internal(format!("{}: {e}", path.display())))?;
    let bound = src.chain_file_bytes().map_err(|e| HubError::Internal(format!("{}: {e}", path.display())))?;
    let report = replace_image(path, bound, |path, tmp| {
        let report = qcow2::flatten(&src, tmp, 0o600, compress).map_err(|e| format!("{}: {e}", path.display()))?;
        check_copy(path, tmp, |copy| qcow2::compare_disks(&src, copy))?;
        Ok(report)
    })?;
    // Its block hashes were kept against its backing file's, which it no longer has.
    crate::blockhashes::keep_over(path, None);
    Ok(report)
}
