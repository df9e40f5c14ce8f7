//! A qcow2 image (with its backing chain) as an export, through the `qcow2` crate.
//!
//! Reads are positional and lock-free in the common case (the crate takes its metadata locks
//! only to look up L2 tables), so they run on the calling task like the raw-file backend. Block
//! status comes from the image's allocation map resolved through the backing chain: data in any
//! layer is reported allocated, zero clusters and ranges allocated nowhere as holes that read as
//! zeroes, so sparse copies of a chain stay sparse.
//!
//! Writing is refused for now (the qcow2 write path is not implemented yet); the backend
//! advertises itself read-only so clients never try.

use std::path::Path;
use std::sync::Arc;

use qcow2::{ErrorKind, ExtentKind, Image, ImageOptions};

use super::{Backend, BackendError, BackendErrorKind, BackendResult, Capabilities};
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::transmission::Extent;

/// Most bytes one block status query walks (clients ask again for the rest).
const MAX_STATUS_SPAN: u64 = 4 << 30;

/// A qcow2 image served over NBD.
#[derive(Debug, Clone)]
pub struct Qcow2Backend {
    image: Arc<Image>,
}

fn convert(e: qcow2::Error) -> BackendError {
    let kind = match e.kind() {
        ErrorKind::InvalidInput => BackendErrorKind::InvalidInput,
        ErrorKind::NoSpace => BackendErrorKind::NoSpace,
        ErrorKind::NotPermitted => BackendErrorKind::ReadOnly,
        _ => BackendErrorKind::Io,
    };
    BackendError::new(kind, e.to_string())
}

impl Qcow2Backend {
    /// Open the image at `path` and its backing chain.
    ///
    /// # Errors
    /// The `qcow2` crate's error: missing file, invalid image, broken chain, or a request to
    /// write an image that cannot be written.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, qcow2::Error> {
        let image = Image::open_with(path, &ImageOptions { writable: !read_only, ..ImageOptions::default() })?;
        Ok(Self { image: Arc::new(image) })
    }

    /// Serve an already open image.
    pub fn from_image(image: Arc<Image>) -> Self {
        Self { image }
    }
}

#[async_trait::async_trait]
impl Backend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: !self.image.is_writable(), block_status: true, ..Capabilities::default() }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.image.read_at(buf, offset).map_err(convert)
    }

    async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> BackendResult<()> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "this qcow2 export is read-only"))
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        let length = length.min(MAX_STATUS_SPAN).min(self.image.size().saturating_sub(offset));
        let map = self.image.map(offset, length).map_err(convert)?;
        Ok(map
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: match e.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
                },
            })
            .collect())
    }
}
