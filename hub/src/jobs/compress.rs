//! Completed backups' images rewritten compressed in the background (`compress = "zstd"`): the
//! repository holds whole VM disks, and most of what they hold (file systems, logs, databases)
//! takes a half to a quarter of the space compressed.
//!
//! Why after the backup, not while it is written: the NBD write path stays as fast as the disk
//! (and as the engine's benchmarks say), and a backup is never slower or less sure for being
//! compressed. The price is writing each image a second time, once, in the background.
//!
//! One backup at a time, after each backup's retention has run (so that a merge of the backup
//! before it goes first), and at start and then every few minutes for any completed backup not
//! yet compressed. For each disk image: `qcow2::compact` writes its own layer compressed into
//! `disk-KEY.qcow2.compacting` beside it (same backing file, so the chain stays as it was);
//! that copy must check clean and read, range for range, as the original does
//! (`qcow2::compare_layers`), and only then is it renamed over the original (the directory
//! synced). A hub stopped or killed meanwhile leaves the original whole and a `.compacting` file
//! that the next start removes (`repo::scan`). `compressed.json` beside the manifest records
//! the outcome (shown in the backup's view and the metrics). A copy is made only while the
//! repository keeps a twentieth of its size free besides the copy (else the pass tries again
//! later): a background compression must never be why a backup fails for want of space. A
//! backup whose compression fails (no space after all, an image of a kind `compact` does not
//! rewrite, or a copy that does not compare equal; logged as an error and counted in
//! `sendense_hub_compression_failed`) is left as it was and tried again six hours later.
//!
//! A merge into a compressed backup writes uncompressed clusters into it and removes its
//! record; the next pass compresses it again, copying the clusters compressed already as they are
//! (`qcow2::compact`), so retention's daily merge costs what it added, not the disk.
//!
//! What may use the images meanwhile: a restore or a verify reading them, and an incremental
//! written over them, keep the file they opened, which holds the same disk (the copy is equal
//! by construction and by comparison); a delete waits (the backup is pinned, 409); a merge into
//! it is refused (409) and one of it waits for the pin, since those write into its images.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2::Image;

use super::files::off_runtime;
use super::{new_id, Hub};
use crate::error::HubError;
use crate::repo::{self, Compressed, Manifest};
use crate::verify::forget_cached_chain;

/// How often the pass looks for completed backups not compressed yet (besides being woken).
const TICK: Duration = Duration::from_secs(300);
/// How often a pass that is off looks again (a reload wakes it at once).
const IDLE_TICK: Duration = Duration::from_secs(3600);
/// How long a backup whose compression failed is left as it is before it is tried again (the
/// repository full, say).
const RETRY_FAILED: Duration = Duration::from_secs(6 * 3600);

/// Keeps a backup pinned and marked as being compressed until dropped.
struct Compressing<'a> {
    hub: &'a Hub,
    holder: String,
    backup: String,
}

impl Drop for Compressing<'_> {
    fn drop(&mut self) {
        let mut st = self.hub.state();
        st.pins.remove(&self.holder);
        st.compressing.remove(&self.backup);
    }
}

impl Hub {
    /// Compress completed backups one after another until the hub shuts down; while
    /// compression is off, wait for a reload that turns it on.
    pub async fn compress_loop(self: Arc<Self>) {
        let mut reloads = self.live.subscribe();
        loop {
            let on = self.live().compress;
            if on {
                while let Some(id) = self.next_uncompressed() {
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                    match self.compress_backup(&id).await {
                        Ok(c) => tracing::info!(
                            backup = %id,
                            data_bytes = c.data_bytes,
                            stored_bytes = c.stored_bytes,
                            "backup compressed"
                        ),
                        Err(HubError::Conflict(why) | HubError::Unavailable(why)) => {
                            // In use (being deleted or merged), or no room for a copy now:
                            // tried again at the next pass.
                            tracing::info!(backup = %id, why, "compression: not now");
                            break;
                        }
                        Err(e) => {
                            tracing::error!(backup = %id, error = %e, "compression failed: the backup stays as it was");
                            self.state().compress_failed.insert(id, (e.to_string(), Instant::now()));
                        }
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(if on { TICK } else { IDLE_TICK }) => {}
                () = self.compress_wake.notified() => {}
                Ok(()) = reloads.changed() => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Wake the compression pass (a backup completed).
    pub(super) fn wake_compression(&self) {
        if self.live().compress {
            self.compress_wake.notify_one();
        }
    }

    /// The oldest completed backup not compressed yet (nor failed to be), of a VM without a merge.
    fn next_uncompressed(&self) -> Option<String> {
        let st = self.state();
        st.catalog
            .values()
            .filter(|m| m.compressed.is_none())
            .filter(|m| st.compress_failed.get(&m.backup_id).is_none_or(|(_, at)| at.elapsed() > RETRY_FAILED))
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
        let holder = new_id("z");
        let (m, _guard) = {
            let mut st = self.state();
            let m = st.catalog.get(id).cloned().ok_or_else(|| HubError::Conflict(format!("backup {id} is gone")))?;
            if let Some(merge) = st.merges.get(&m.vm_name) {
                return Err(HubError::Conflict(merge.blocks()));
            }
            st.pins.insert(holder.clone(), (id.to_string(), format!("compression {holder} is rewriting its images")));
            st.compressing.insert(id.to_string());
            (m, Compressing { hub: self, holder, backup: id.to_string() })
        };
        let (mut data, mut stored) = (0u64, 0u64);
        for d in &m.disks {
            let path = self.repo.backup_dir(&m.vm_name, id).join(&d.file);
            let uncached = self.settings.direct_io;
            let report = off_runtime("compressing an image", move || {
                let done = compress_image(&path);
                if uncached {
                    forget_cached_chain(&path);
                }
                done
            })
            .await??;
            data += report.data_bytes;
            stored += report.bytes_after;
        }
        let c = Compressed { at: repo::now_rfc3339(), data_bytes: data, stored_bytes: stored };
        self.record_compression(&m, &c).await?;
        Ok(c)
    }

    /// Keep `c` in `compressed.json` and the catalog (unless the backup went meanwhile).
    async fn record_compression(&self, m: &Manifest, c: &Compressed) -> Result<(), HubError> {
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
        let failed = st.compress_failed.keys().filter(|id| st.catalog.get(*id).is_some_and(|m| m.compressed.is_none()));
        (n, saved, failed.count())
    }
}

/// The copy an image is compressed into, beside it.
fn compacting_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(repo::COMPACTING_SUFFIX);
    PathBuf::from(name)
}

/// Whether a filesystem with `available` of `total` bytes free has room for the compressed copy of
/// an image of `image` bytes (at most as large) and still keeps a twentieth of itself for the
/// backups being written meanwhile: a background compression must never be why a backup fails
/// for want of space.
fn room_for_copy(image: u64, available: u64, total: u64) -> bool {
    available >= image.saturating_add(total / 20)
}

/// Rewrite the image at `path` compressed: the copy written, checked, compared, and renamed over
/// it (module doc). Blocking.
///
/// # Errors
/// No room for the copy now (503: the pass tries again later), or the copy could not be made,
/// checked or put in place (500).
fn compress_image(path: &Path) -> Result<qcow2::CompactReport, HubError> {
    let tmp = compacting_path(path);
    let _ = std::fs::remove_file(&tmp);
    let image = std::fs::metadata(path).map_err(|e| HubError::Internal(format!("{}: {e}", path.display())))?.len();
    let dir = path.parent().unwrap_or(Path::new("."));
    let fs = rustix::fs::statvfs(dir).map_err(|e| HubError::Internal(format!("{}: {e}", dir.display())))?;
    let (available, total) = (fs.f_bavail.saturating_mul(fs.f_frsize), fs.f_blocks.saturating_mul(fs.f_frsize));
    if !room_for_copy(image, available, total) {
        return Err(HubError::Unavailable(format!(
            "{available} bytes free on the repository: not enough for a copy of {} ({image} bytes) and 5% kept free",
            path.display()
        )));
    }
    let done = write_and_check(path, &tmp).map_err(HubError::Internal);
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let report = done?;
    std::fs::rename(&tmp, path)
        .map_err(|e| HubError::Internal(format!("cannot move {} to {}: {e}", tmp.display(), path.display())))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| HubError::Internal(format!("cannot sync {}: {e}", dir.display())))?;
    Ok(report)
}

fn write_and_check(path: &Path, tmp: &Path) -> Result<qcow2::CompactReport, String> {
    let src =
        Image::open_with(path, &repo::image_options(path, false)).map_err(|e| format!("{}: {e}", path.display()))?;
    let report = qcow2::compact(&src, tmp, 0o600).map_err(|e| format!("{}: {e}", path.display()))?;
    let copy =
        Image::open_with(tmp, &repo::image_options(tmp, false)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let check = copy.check().map_err(|e| format!("{}: {e}", tmp.display()))?;
    if !check.is_clean() {
        return Err(format!("the compressed copy of {} does not check: {:?}", path.display(), check.problems));
    }
    match qcow2::compare_layers(&src, &copy).map_err(|e| format!("{}: {e}", path.display()))? {
        None => Ok(report),
        Some(diff) => Err(format!("the compressed copy of {} does not read as it: {diff}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_made_only_with_room_for_it_and_a_twentieth_of_the_filesystem_to_spare() {
        let gib = 1u64 << 30;
        assert!(room_for_copy(10 * gib, 60 * gib, 1000 * gib));
        assert!(!room_for_copy(10 * gib, 59 * gib, 1000 * gib), "50 GiB kept for backups");
        assert!(!room_for_copy(u64::MAX, u64::MAX - 1, 1000 * gib), "no overflow");
        assert!(room_for_copy(0, 0, 0));
    }

    #[test]
    fn the_copy_is_named_beside_the_image() {
        assert_eq!(
            compacting_path(Path::new("/r/vm/b1/disk-2000.qcow2")),
            PathBuf::from("/r/vm/b1/disk-2000.qcow2.compacting")
        );
    }
}
