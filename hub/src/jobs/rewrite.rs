//! The background pass that rewrites completed backups' images, one backup at a time: first the
//! backups that end a chain longer than `max_chain`, made to stand alone (`flatten.rs`), then,
//! with `compress = "zstd"`, the backups not compressed yet (`compress.rs`).
//!
//! Why one pass for both: each writes a copy of an image beside it, checks it and renames it over
//! the original, and two such copies of one image at a time would only race; one at a time also
//! keeps the repository's disk for the backups being written. The pass runs at start, when a
//! backup completed and its retention ran (merges first: they shorten chains and write into
//! images), after a merge, after a reload, and every few minutes.
//!
//! A backup being rewritten is pinned (a delete waits, 409) and marked (`rewriting`): a merge
//! into it is refused (409) until it is done, since a merge writes into its images; a merge of it
//! waits for the pin. A restore or a verify reading it, and an incremental written over it, keep
//! the file they opened, which holds the same disk (the copy is equal by construction and by
//! comparison). The copy, `disk-KEY.qcow2.compacting`, is written only while the repository keeps
//! a twentieth of its size free besides it (else the pass tries again later): a background
//! rewrite must never be why a backup fails for want of space. A hub stopped or killed meanwhile
//! leaves the original whole and a `.compacting` file that the next start removes (`repo::scan`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::compress::COMPRESSION;
use super::flatten::STANDING_ALONE;
use super::Hub;
use crate::error::HubError;
use crate::repo::{self, Manifest};
use crate::verify::forget_cached_chain;

/// How often the pass looks for work (besides being woken).
const TICK: Duration = Duration::from_secs(300);
/// How long a backup whose rewrite failed is left as it is before it is tried again (the
/// repository full, say).
const RETRY_FAILED: Duration = Duration::from_secs(6 * 3600);

/// Keeps a backup pinned and marked as being rewritten until dropped.
pub(super) struct Rewriting<'a> {
    hub: &'a Hub,
    holder: String,
    backup: String,
}

impl Drop for Rewriting<'_> {
    fn drop(&mut self) {
        let mut st = self.hub.state();
        st.pins.remove(&self.holder);
        st.rewriting.remove(&self.backup);
    }
}

impl Hub {
    /// Rewrite completed backups one after another (module doc) until the hub shuts down.
    pub async fn rewrite_loop(self: Arc<Self>) {
        let mut reloads = self.live.subscribe();
        loop {
            let live = self.live();
            while let Some(id) = self.next_to_flatten(live.max_chain) {
                if self.shutdown.is_cancelled() {
                    return;
                }
                let done = self.flatten_backup(&id, live.max_chain).await;
                if !self.after_rewrite(STANDING_ALONE, &id, done) {
                    break;
                }
            }
            if live.compress {
                while let Some(id) = self.next_uncompressed() {
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                    let done = self.compress_backup(&id).await.map(|c| {
                        tracing::info!(backup = %id, data_bytes = c.data_bytes, stored_bytes = c.stored_bytes, "backup compressed");
                    });
                    if !self.after_rewrite(COMPRESSION, &id, done) {
                        break;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.rewrite_wake.notified() => {}
                Ok(()) = reloads.changed() => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Log a rewrite's outcome and keep a failure for [`RETRY_FAILED`]; whether the pass goes on
    /// with the next backup now (not after a backup in use or a repository without room).
    fn after_rewrite(&self, what: &str, id: &str, done: Result<(), HubError>) -> bool {
        match done {
            Ok(()) => true,
            Err(HubError::Conflict(why) | HubError::Unavailable(why)) => {
                tracing::info!(backup = %id, why, "{what}: not now");
                false
            }
            Err(e) => {
                tracing::error!(backup = %id, error = %e, "{what} failed: the backup stays as it was");
                self.state().rewrite_failed.insert((what.to_string(), id.to_string()), (e.to_string(), Instant::now()));
                true
            }
        }
    }

    /// Whether `what` failed for backup `id` less than [`RETRY_FAILED`] ago.
    pub(super) fn rewrite_failed_lately(st: &super::State, what: &str, id: &str) -> bool {
        st.rewrite_failed.get(&(what.to_string(), id.to_string())).is_some_and(|(_, at)| at.elapsed() <= RETRY_FAILED)
    }

    /// Wake the pass (a backup completed and its retention ran, or a merge is done).
    pub(super) fn wake_rewrites(&self) {
        self.rewrite_wake.notify_one();
    }

    /// Rewrite each of backup `m`'s images with `rewrite` (a path to its report) off the runtime,
    /// one after another (the page cache given back after each with `cache = "none"`): the data
    /// the images hold and the bytes their files take now, added up.
    ///
    /// # Errors
    /// The first image `rewrite` failed on; the images before it are rewritten.
    pub(super) async fn rewrite_images(
        &self,
        m: &Manifest,
        what: &'static str,
        rewrite: impl Fn(&Path) -> Result<qcow2::CompactReport, HubError> + Clone + Send + 'static,
    ) -> Result<(u64, u64), HubError> {
        let (mut data, mut stored) = (0u64, 0u64);
        for d in &m.disks {
            let path = self.repo.backup_dir(&m.vm_name, &m.backup_id).join(&d.file);
            let (uncached, rewrite) = (self.settings.direct_io, rewrite.clone());
            let report = super::files::off_runtime(what, move || {
                let done = rewrite(&path);
                if uncached {
                    forget_cached_chain(&path);
                }
                done
            })
            .await??;
            data += report.data_bytes;
            stored += report.bytes_after;
        }
        Ok((data, stored))
    }

    /// Pin backup `id` and mark it as being rewritten (`why`, for a delete that has to wait);
    /// its manifest as the catalog holds it now.
    ///
    /// # Errors
    /// Gone, or a merge of its VM or another rewrite of it in the way (409).
    pub(super) fn begin_rewrite(&self, id: &str, why: &str) -> Result<(Manifest, Rewriting<'_>), HubError> {
        let holder = super::new_id("z");
        let mut st = self.state();
        let m = st.catalog.get(id).cloned().ok_or_else(|| HubError::Conflict(format!("backup {id} is gone")))?;
        if let Some(merge) = st.merges.get(&m.vm_name) {
            return Err(HubError::Conflict(merge.blocks()));
        }
        if !st.rewriting.insert(id.to_string()) {
            return Err(HubError::Conflict(format!("backup {id} is being rewritten")));
        }
        st.pins.insert(holder.clone(), (id.to_string(), format!("{why} ({holder})")));
        Ok((m, Rewriting { hub: self, holder, backup: id.to_string() }))
    }
}

/// The copy an image is rewritten into, beside it.
fn compacting_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(repo::COMPACTING_SUFFIX);
    PathBuf::from(name)
}

/// Whether a filesystem with `available` of `total` bytes free has room for a copy of at most
/// `copy` bytes and still keeps a twentieth of itself for the backups being written meanwhile.
fn room_for_copy(copy: u64, available: u64, total: u64) -> bool {
    available >= copy.saturating_add(total / 20)
}

/// Replace the image at `path` with a copy that `write(path, copy)` writes (and checks) beside
/// it, at most `bound` bytes: the copy renamed over it and the directory synced (module doc).
/// Blocking.
///
/// # Errors
/// No room for the copy now (503: the pass tries again later), or the copy could not be made,
/// checked or put in place (500; the copy removed, the image as it was).
pub(super) fn replace_image(
    path: &Path,
    bound: u64,
    write: impl FnOnce(&Path, &Path) -> Result<qcow2::CompactReport, String>,
) -> Result<qcow2::CompactReport, HubError> {
    let tmp = compacting_path(path);
    let _ = std::fs::remove_file(&tmp);
    let dir = path.parent().unwrap_or(Path::new("."));
    let fs = rustix::fs::statvfs(dir).map_err(|e| HubError::Internal(format!("{}: {e}", dir.display())))?;
    let (available, total) = (fs.f_bavail.saturating_mul(fs.f_frsize), fs.f_blocks.saturating_mul(fs.f_frsize));
    if !room_for_copy(bound, available, total) {
        return Err(HubError::Unavailable(format!(
            "{available} bytes free on the repository: not enough for a copy of {} (up to {bound} bytes) and 5% kept free",
            path.display()
        )));
    }
    let done = write(path, &tmp).map_err(HubError::Internal);
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

/// Open the copy at `tmp` and check it: clean, and `same(copy)` (`None`, else the difference).
pub(super) fn check_copy(
    path: &Path,
    tmp: &Path,
    same: impl FnOnce(&qcow2::Image) -> qcow2::Result<Option<String>>,
) -> Result<(), String> {
    let copy = qcow2::Image::open_with(tmp, &repo::image_options(tmp, false))
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let check = copy.check().map_err(|e| format!("{}: {e}", tmp.display()))?;
    if !check.is_clean() {
        return Err(format!("the copy of {} does not check: {:?}", path.display(), check.problems));
    }
    match same(&copy).map_err(|e| format!("{}: {e}", path.display()))? {
        None => Ok(()),
        Some(diff) => Err(format!("the copy of {} does not read as it: {diff}", path.display())),
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
