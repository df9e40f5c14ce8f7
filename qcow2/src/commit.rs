//! Folding an overlay into its backing file: [`commit`], what `qemu-img commit` does.
//!
//! Backups kept as a chain (a full image and overlays on it) cannot drop their oldest point in
//! time without it: the next overlay reads through it. Committing the overlay into it makes the
//! backing file hold the overlay's disk, after which the pair can be replaced by that one file.
//!
//! Only the overlay's own layer is copied: its data clusters as data, its zero clusters as zeroes
//! in the backing file (metadata only where nothing shows through from further down); ranges the
//! overlay leaves unallocated are the backing file's already. So the work is the size of the
//! overlay's change, not of the disk.
//!
//! Crash safety comes from the order, which the caller keeps: while the overlay exists, reading
//! through it gives its disk at every moment of the commit (only ranges the overlay holds are
//! written below it), so an interrupted commit is simply done again. What the backing file meant
//! on its own is lost from the first write: the caller must have stopped treating it as a point
//! in time of its own before calling.

use std::os::unix::fs::MetadataExt;

use crate::image::resolve_backing;
use crate::{Error, ExtentKind, Image, Result};

/// Bytes copied per read and write: bounds the buffer whatever the overlay's extents.
const STEP: usize = 1 << 20;

/// What [`commit`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Bytes of data copied into the backing file.
    pub data_bytes: u64,
    /// Bytes made to read as zeroes in the backing file.
    pub zero_bytes: u64,
}

/// Write everything `overlay`'s own layer holds into `base`, its backing file opened writable,
/// and flush `base`. Afterwards `base` reads as `overlay` does.
///
/// # Errors
/// `base` is not `overlay`'s backing file (checked by file identity) or is not writable, the two
/// differ in size, or reading, writing or flushing failed. On error `base` may hold part of the
/// overlay's change; committing again completes it.
pub fn commit(overlay: &Image, base: &Image) -> Result<CommitReport> {
    check_pair(overlay, base)?;
    let mut report = CommitReport::default();
    let mut buf = vec![0u8; STEP.min(usize::try_from(overlay.size()).unwrap_or(STEP)).max(1)];
    for extent in overlay.map(0, overlay.size())?.into_iter().filter(|e| e.depth == 0) {
        match extent.kind {
            ExtentKind::Data => {
                let mut at = extent.offset;
                let end = extent.offset + extent.length;
                while at < end {
                    let n = usize::try_from(end - at).map_or(buf.len(), |left| left.min(buf.len()));
                    let chunk = buf.get_mut(..n).ok_or_else(|| Error::Unsupported("commit buffer".into()))?;
                    overlay.read_at(chunk, at)?;
                    base.write_at(chunk, at)?;
                    at += n as u64;
                }
                report.data_bytes += extent.length;
            }
            ExtentKind::Zero => {
                base.write_zeroes(extent.offset, extent.length)?;
                report.zero_bytes += extent.length;
            }
            ExtentKind::Unallocated => {}
        }
    }
    base.flush()?;
    Ok(report)
}

/// `base` must be the very file `overlay` names as its backing file, writable, of its size.
fn check_pair(overlay: &Image, base: &Image) -> Result<()> {
    let invalid = |reason: String| Error::InvalidOption { option: "commit", reason };
    let Some(name) = overlay.header().backing_file.as_deref() else {
        return Err(invalid(format!("{} has no backing file", overlay.path().display())));
    };
    let named = resolve_backing(overlay.path(), name);
    let same_file = match (std::fs::metadata(&named), std::fs::metadata(base.path())) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if !same_file {
        return Err(invalid(format!(
            "{} is not the backing file of {} (which names {})",
            base.path().display(),
            overlay.path().display(),
            named.display()
        )));
    }
    if !base.is_writable() {
        return Err(Error::ReadOnly("the backing file to commit into was opened read-only"));
    }
    if base.size() != overlay.size() {
        return Err(invalid(format!(
            "{} is {} bytes, its overlay {}: resize it first",
            base.path().display(),
            base.size(),
            overlay.size()
        )));
    }
    Ok(())
}
