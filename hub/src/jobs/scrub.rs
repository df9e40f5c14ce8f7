//! Scrubbing: every completed backup verified again in the background once per
//! `verify_every_days`, so that an image that rots on the repository's disk (or is changed behind
//! the hub's back) is found while the VM and its other backups still exist, not by the restore
//! that needed it.
//!
//! One backup at a time, the one verified longest ago first (a backup counts as verified when it
//! completed). Each of its images is checked (refcounts against references) and its own layer is
//! re-read and hashed; the blocks it takes from its backing file are taken from that file's block
//! hashes (`disk-KEY.blocks`, `crate::verify`), which the parent's own scrub checks in turn, so a
//! pass over the repository reads each image once rather than each chain once per backup. An
//! image whose parent left no hashes is re-read through its whole chain. The outcome is kept in
//! `verified.json` beside the backup's manifest (when, whether every disk was sound and equal to
//! its checksum, what was not; a file of its own, so that a merge rewriting the manifest never
//! races with it), shown in its API view and counted in the metrics
//! (`sendense_hub_backups_verify_failed`). A backup whose chain reads through one that failed
//! fails too, naming it: it cannot be restored whole either. `POST /api/v1/backups/{id}/verify`, which re-reads the
//! whole chain, records its outcome the same way.
//!
//! While a backup is read it is pinned like any verify (a delete or merge of it answers 409 and
//! retention tries it again after the next backup); a VM with a merge under way is passed over
//! until the merge is done.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use node::blockmap::BlockMap;

use super::files::off_runtime;
use super::{new_id, Hub};
use crate::error::HubError;
use crate::repo::{self, Manifest, Verified};
use crate::verify::{forget_cached_chain, verify_disk_on, DiskVerdict};

/// How often a scrub loop that is off looks again (a reload wakes it at once).
const IDLE_TICK: Duration = Duration::from_secs(3600);

impl Hub {
    /// Verify due backups one after another until the hub shuts down; while scrubbing is off,
    /// wait for a reload that turns it on.
    pub async fn scrub_loop(self: Arc<Self>) {
        let mut reloads = self.live.subscribe();
        loop {
            let every = self.live().verify_every;
            let tick = every.map_or(IDLE_TICK, |e| (e / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                // The period may have changed: the next tick is counted from it.
                Ok(()) = reloads.changed() => continue,
                () = self.shutdown.cancelled() => return,
            }
            let Some(every) = every else { continue };
            while let Some(id) = self.next_due(every) {
                if self.shutdown.is_cancelled() {
                    return;
                }
                match self.scrub(&id).await {
                    Ok(true) => tracing::info!(backup = %id, "scrub: verified"),
                    Ok(false) => {}
                    Err(e) => {
                        // In use (pinned, deleted meanwhile): tried again at the next tick.
                        tracing::debug!(backup = %id, error = %e, "scrub: not now");
                        break;
                    }
                }
            }
        }
    }

    /// The completed backup verified longest ago, if that is more than `every` ago.
    fn next_due(&self, every: Duration) -> Option<String> {
        let now = Timestamp::now();
        let st = self.state();
        st.catalog
            .values()
            .filter(|m| !st.merges.contains_key(&m.vm_name))
            .filter_map(|m| Some((m.verified_at().parse::<Timestamp>().ok()?, m)))
            .filter(|(at, _)| now.duration_since(*at).unsigned_abs() > every)
            .min_by_key(|(at, _)| *at)
            .map(|(_, m)| m.backup_id.clone())
    }

    /// Scrub one backup: each image checked and its own layer re-read (module doc); the outcome
    /// recorded. `Ok(false)` when it failed verification (logged as an error).
    ///
    /// # Errors
    /// The backup is gone or in use.
    async fn scrub(&self, id: &str) -> Result<bool, HubError> {
        let holder = new_id("s");
        let (m, _pinned) = self.pin_backup(&holder, id, format!("scrub {holder} is reading it"))?;
        let _turn = self.verify_turn().await;
        let mut verdicts = Vec::new();
        for d in &m.disks {
            let path = self.repo.backup_dir(&m.vm_name, id).join(&d.file);
            let (key, sum, uncached) = (d.disk_key, d.checksum.clone(), self.settings.direct_io);
            let verdict = off_runtime("scrubbing a backup", move || {
                let parent = parent_block_hashes(&path);
                let (verdict, _) = verify_disk_on(&path, key, sum.as_deref(), parent);
                if uncached {
                    forget_cached_chain(&path);
                }
                verdict
            })
            .await?;
            verdicts.push(verdict);
        }
        let mut error = (!verdicts.iter().all(DiskVerdict::ok)).then(|| problems(&verdicts));
        if let Some(below) = self.failed_ancestor(&m) {
            let said = format!("its chain reads through backup {below}, which failed verification");
            error = Some(error.map_or_else(|| said.clone(), |e| format!("{e}; {said}")));
        }
        if let Some(e) = &error {
            tracing::error!(backup = id, vm = %m.vm_name, problems = %e, "scrub: the backup failed verification");
        }
        let ok = error.is_none();
        self.record_verification(&m, ok, error).await;
        Ok(ok)
    }

    /// The nearest backup under `m` (its parent, the parent's, ...) whose last verification
    /// failed: `m` reads through it, so it is not whole either, whatever its own layer holds.
    fn failed_ancestor(&self, m: &Manifest) -> Option<String> {
        let st = self.state();
        let mut next = m.parent_id.clone();
        for _ in 0..st.catalog.len() {
            let parent = st.catalog.get(next.as_deref()?)?;
            if parent.verified.as_ref().is_some_and(|v| !v.ok) {
                return Some(parent.backup_id.clone());
            }
            next.clone_from(&parent.parent_id);
        }
        None
    }

    /// Record a verification's outcome in the catalog and in `verified.json` beside the backup's
    /// manifest. A backup deleted meanwhile keeps nothing; one being merged away (no longer in the
    /// catalog) neither. A file that cannot be written (no space) is logged; the catalog keeps the
    /// outcome until the hub restarts, so the scrub still moves on to the next backup.
    pub(super) async fn record_verification(&self, m: &Manifest, ok: bool, error: Option<String>) {
        let verified = Verified { at: repo::now_rfc3339(), ok, error };
        {
            let mut st = self.state();
            let Some(current) = st.catalog.get_mut(&m.backup_id) else { return };
            current.verified = Some(verified.clone());
        }
        let repo = self.repo.clone();
        let m = m.clone();
        let written = off_runtime("recording a verification", move || {
            let (path, data) = repo.verified_file(&m, &verified).map_err(|e| e.to_string())?;
            node::files::write_atomically(&path, &data).map_err(|e| format!("{}: {e}", path.display()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot keep the verification's outcome");
        }
    }

    /// Completed backups whose last verification failed (for the metrics).
    pub fn verify_failures(&self) -> usize {
        self.state().catalog.values().filter(|m| m.verified.as_ref().is_some_and(|v| !v.ok)).count()
    }
}

/// The block hashes the backing file of the image at `path` left, if it has one that left them.
fn parent_block_hashes(path: &std::path::Path) -> Option<BlockMap> {
    let image = qcow2::Image::open_with(path, &repo::image_options(path, false)).ok()?;
    let name = image.header().backing_file.clone()?;
    crate::blockhashes::load(&qcow2::image::resolve_backing(path, &name))
}

/// What failed, disk by disk.
pub(super) fn problems(verdicts: &[DiskVerdict]) -> String {
    verdicts
        .iter()
        .filter(|v| !v.ok())
        .map(|v| {
            let content = match v.checksum_match {
                Some(false) => "content differs from its checksum",
                _ => "content not compared",
            };
            format!("disk {}: {}; {content}", v.disk_key, v.check)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
