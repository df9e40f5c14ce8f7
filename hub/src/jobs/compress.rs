//! Completed backups' images rewritten compressed in the background (`compress = "zstd"`): the
//! repository holds whole VM disks, and most of what they hold (file systems, logs, databases)
//! takes a half to a quarter of the space compressed.
//!
//! Why after the backup, not while it is written: the NBD write path stays as fast as the disk
//! (and as the engine's benchmarks say), and a backup is never slower or less sure for being
//! compressed. The price is writing each image a second time, once, in the background.
//!
//! The background pass (`rewrite.rs`) takes one backup at a time, after each backup's retention
//! has run (so that a merge of the backup before it goes first), and at start and then every few
//! minutes any completed backup not yet compressed. For each disk image: `qcow2::compact` writes
//! its own layer compressed into `disk-KEY.qcow2.compacting` beside it (same backing file, so the
//! chain stays as it was); that copy must check clean and read, range for range, as the original
//! does (`qcow2::compare_layers`), and only then is it renamed over the original (the directory
//! synced; `rewrite::replace_image`). `compressed.json` beside the manifest records the outcome
//! (shown in the backup's view and the metrics). A backup whose compression fails (no space after
//! all, an image of a kind `compact` does not rewrite, or a copy that does not compare equal;
//! logged as an error and counted in `sendense_hub_compression_failed`) is left as it was and
//! tried again six hours later.
//!
//! A merge into a compressed backup writes uncompressed clusters into it and removes its
//! record; the next pass compresses it again, copying the clusters compressed already as they are
//! (`qcow2::compact`), so retention's daily merge costs what it added, not the disk.

use std::path::Path;

use qcow2::Image;

use super::files::off_runtime;
use super::rewrite::{check_copy, replace_image};
use super::Hub;
use crate::error::HubError;
use crate::repo::{self, Compressed, Manifest};

/// What a failed compression is kept as (`rewrite.rs`).
pub(super) const COMPRESSION: &str = "compression";

impl Hub {
    /// The oldest completed backup not compressed yet (nor failed to be), of a VM without a merge.
    pub(super) fn next_uncompressed(&self) -> Option<String> {
        let st = self.state();
        st.catalog
            .values()
            .filter(|m| m.compressed.is_none())
            .filter(|m| !Self::rewrite_failed_lately(&st, COMPRESSION, &m.backup_id))
            .filter(|m| !st.merges.contains_key(&m.vm_name))
            .min_by(|a, b| a.completed_at.cmp(&b.completed_at))
            .map(|m| m.backup_id.clone())
    }

    /// Compress backup `id`'s images (module doc) and record it.
    ///
    /// # Errors
    /// Gone or in use (409); an image could not be compressed, or its copy did not compare equal
    /// (500): the backup is as it was.
    pub(super) async fn compress_backup(&self, id: &str) -> Result<Compressed, HubError> {
        let (m, _guard) = self.begin_rewrite(id, "its images are being rewritten compressed")?;
        let (data, stored) = self.rewrite_images(&m, "compressing an image", compress_image).await?;
        let c = Compressed { at: repo::now_rfc3339(), data_bytes: data, stored_bytes: stored };
        self.record_compression(&m, &c).await?;
        Ok(c)
    }

    /// Keep `c` in `compressed.json` and the catalog (unless the backup went meanwhile).
    pub(super) async fn record_compression(&self, m: &Manifest, c: &Compressed) -> Result<(), HubError> {
        let repo = self.repo.clone();
        let (m2, c2) = (m.clone(), c.clone());
        off_runtime("recording a compression", move || {
            let (path, data) = repo.compressed_file(&m2, &c2).map_err(|e| e.to_string())?;
            node::files::write_atomically(&path, &data).map_err(|e| format!("{}: {e}", path.display()))
        })
        .await?
        .map_err(HubError::Internal)?;
        if let Some(current) = self.state().catalog.get_mut(&m.backup_id) {
            current.compressed = Some(c.clone());
        }
        Ok(())
    }

    /// Completed backups compressed, the bytes that saved, and backups whose compression
    /// failed (for the metrics).
    pub fn compression_totals(&self) -> (usize, u64, usize) {
        let st = self.state();
        let (n, saved) = st
            .catalog
            .values()
            .filter_map(|m| m.compressed.as_ref())
            .fold((0, 0), |(n, saved), c| (n + 1, saved + c.data_bytes.saturating_sub(c.stored_bytes)));
        let failed = st
            .rewrite_failed
            .keys()
            .filter(|(what, id)| what == COMPRESSION && st.catalog.get(id).is_some_and(|m| m.compressed.is_none()));
        (n, saved, failed.count())
    }
}

/// Rewrite the image at `path` compressed: the copy written, checked, compared, and renamed over
/// it (module doc). Blocking.
///
/// # Errors
/// As [`replace_image`].
fn compress_image(path: &Path) -> Result<qcow2::CompactReport, HubError> {
    let image = std::fs::metadata(path).map_err(|e| HubError::Internal(format!("{}: {e}", path.display())))?.len();
    replace_image(path, image, |path, tmp| {
        let src = Image::open_with(path, &repo::image_options(path, false))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let report = qcow2::compact(&src, tmp, 0o600).map_err(|e| format!("{}: {e}", path.display()))?;
        check_copy(path, tmp, |copy| qcow2::compare_layers(&src, copy))?;
        Ok(report)
    })
}
