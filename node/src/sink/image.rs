//! A restore written as a qcow2 image, for a disk held in one: a VM whose disk is a qcow2 file
//! (`format = "qcow2"`, libvirt's usual disk) or a file in the restore directory named
//! `*.qcow2`. The restored disk is a whole image of its own (no backing file), holes and zero
//! blocks left unallocated, so the VM boots from it as from the disk it had.
//!
//! Written with the workspace's `qcow2` crate (concurrent writers are its normal case; its
//! calls wait for the disk, so they run on the blocking pool) into a new file beside the
//! destination, which takes the destination's place only once the image is closed and durable
//! ([`crate::files::Replacement`]): a failed restore leaves the VM its previous image.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{CreateOptions, Image, ImageOptions};

use crate::error::MoveError;
use crate::files::Replacement;

/// A qcow2 image being restored beside its destination.
pub struct Qcow2Sink {
    image: Arc<Image>,
    replacement: Arc<Replacement>,
    dest: PathBuf,
}

impl Qcow2Sink {
    /// A new image of `size` bytes beside `dest`, with an existing destination's owner and mode.
    ///
    /// # Errors
    /// The image cannot be made.
    pub fn create(dest: &Path, size: u64) -> Result<Self, MoveError> {
        let err = |what: &str, source| MoveError::Destination { what: format!("{}: {what}", dest.display()), source };
        let replacement = Replacement::prepare(dest).map_err(|e| err("prepare its replacement", e))?;
        let image = Image::create(replacement.path(), &CreateOptions::new(size).mode(0o600))
            .map_err(|e| err("create a qcow2 image", std::io::Error::other(e)))?;
        let file = File::open(replacement.path()).map_err(|e| err("open the new image", e))?;
        replacement.take_over(&file).map_err(|e| err("give the new image the old one's owner and mode", e))?;
        Ok(Self { image: Arc::new(image), replacement: Arc::new(replacement), dest: dest.to_path_buf() })
    }

    /// Go on with the image a paused restore left beside `dest` (`jobs/handover.rs`), closed
    /// clean then.
    ///
    /// # Errors
    /// The image is missing, not a regular file, or does not open.
    pub fn resume(dest: &Path) -> Result<Self, MoveError> {
        let err = |what: &str, source| MoveError::Destination { what: format!("{}: {what}", dest.display()), source };
        let replacement = Replacement::resume(dest).map_err(|e| err("the image a paused restore left beside it", e))?;
        // Made by this node without a backing file: none is looked for.
        let opts = ImageOptions::read_write().probe_backing_format(false);
        let image = Image::open_with(replacement.path(), &opts)
            .map_err(|e| err("open the image a paused restore left", std::io::Error::other(e)))?;
        Ok(Self { image: Arc::new(image), replacement: Arc::new(replacement), dest: dest.to_path_buf() })
    }

    /// Close the image clean and leave it beside the destination for the next start.
    ///
    /// # Errors
    /// Closing failed (the image is then removed, as for a failed restore).
    pub async fn keep(&self) -> Result<(), MoveError> {
        let image = Arc::clone(&self.image);
        self.blocking("close".into(), move || image.close()).await?;
        self.replacement.keep();
        Ok(())
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// Write `data` at `offset`.
    ///
    /// # Errors
    /// The image could not take it.
    pub async fn write(&self, offset: u64, data: bytes::Bytes) -> Result<(), MoveError> {
        let image = Arc::clone(&self.image);
        self.blocking(format!("write at {offset:#x}"), move || image.write_at(&data, offset)).await
    }

    /// Make `length` bytes at `offset` read as zeroes (metadata only).
    ///
    /// # Errors
    /// The image could not take it.
    pub async fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), MoveError> {
        let image = Arc::clone(&self.image);
        self.blocking(format!("zero at {offset:#x}"), move || image.write_zeroes(offset, length)).await
    }

    /// Make what was written durable.
    ///
    /// # Errors
    /// The flush failed.
    pub async fn flush(&self) -> Result<(), MoveError> {
        let image = Arc::clone(&self.image);
        self.blocking("flush".into(), move || image.flush()).await
    }

    /// Close the image (its unused reservations given back) and put it in the destination's place.
    ///
    /// # Errors
    /// Closing, syncing or the rename failed: the destination is then as it was.
    pub async fn commit(&self) -> Result<(), MoveError> {
        let image = Arc::clone(&self.image);
        self.blocking("close".into(), move || image.close()).await?;
        let replacement = Arc::clone(&self.replacement);
        let what = format!("{}: put in place", self.dest.display());
        tokio::task::spawn_blocking(move || {
            let file = File::open(replacement.path())?;
            replacement.commit(&file)
        })
        .await
        .map_err(|e| MoveError::Destination { what: what.clone(), source: e.into() })?
        .map_err(|source| MoveError::Destination { what, source })
    }

    async fn blocking(
        &self,
        what: String,
        work: impl FnOnce() -> qcow2::Result<()> + Send + 'static,
    ) -> Result<(), MoveError> {
        let what = format!("{}: {what}", self.dest.display());
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| MoveError::Destination { what: what.clone(), source: e.into() })?
            .map_err(|e| MoveError::Destination { what, source: std::io::Error::other(e) })
    }
}
