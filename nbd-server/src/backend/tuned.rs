//! The qemu-nbd policies that sit above any backend: `--cache=unsafe` (flush and FUA become no-ops:
//! fast, and nothing survives a crash until the file is closed) and `--discard=ignore` (TRIM not
//! offered). A wrapper rather than a flag in each backend, so embedders get the same switches
//! over their own backends. `--cache=none` (O_DIRECT) is not among them yet: the tools refuse it
//! rather than pretend.

use super::{Backend, BackendResult, Capabilities, ZeroFlags};
use crate::proto::transmission::Extent;

/// What [`Tuned`] changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tuning {
    /// Flush and FUA do nothing (qemu's `cache=unsafe`).
    pub skip_flush: bool,
    /// TRIM is not offered (qemu's `discard=ignore`).
    pub no_trim: bool,
}

impl Tuning {
    /// Flush and FUA do nothing.
    #[must_use]
    pub fn skip_flush(mut self, on: bool) -> Self {
        self.skip_flush = on;
        self
    }

    /// TRIM is not offered.
    #[must_use]
    pub fn no_trim(mut self, on: bool) -> Self {
        self.no_trim = on;
        self
    }
}

/// `inner` under a [`Tuning`].
pub struct Tuned<B> {
    inner: B,
    tuning: Tuning,
}

impl<B: Backend> Tuned<B> {
    /// Wrap `inner`.
    pub fn new(inner: B, tuning: Tuning) -> Self {
        Self { inner, tuning }
    }
}

#[async_trait::async_trait]
impl<B: Backend> Backend for Tuned<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        if self.tuning.no_trim {
            caps.trim = false;
        }
        caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        self.inner.write(offset, data, fua && !self.tuning.skip_flush).await
    }

    async fn write_piped(&self, offset: u64, data: &mut super::PipedData, fua: bool) -> BackendResult<()> {
        self.inner.write_piped(offset, data, fua && !self.tuning.skip_flush).await
    }

    async fn flush(&self) -> BackendResult<()> {
        if self.tuning.skip_flush {
            return Ok(());
        }
        self.inner.flush().await
    }

    async fn close(&self) -> BackendResult<()> {
        if self.tuning.skip_flush {
            return Ok(());
        }
        self.inner.close().await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        if self.tuning.no_trim {
            return Err(super::BackendError::unsupported("trim"));
        }
        self.inner.trim(offset, length, fua && !self.tuning.skip_flush).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> BackendResult<()> {
        let flags = ZeroFlags { fua: flags.fua && !self.tuning.skip_flush, ..flags };
        self.inner.write_zeroes(offset, length, flags).await
    }

    async fn block_status(&self, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        self.inner.block_status(offset, length).await
    }

    async fn bitmap_status(&self, name: &str, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        self.inner.bitmap_status(name, offset, length).await
    }

    async fn cache(&self, offset: u64, length: u64) -> BackendResult<()> {
        self.inner.cache(offset, length).await
    }

    fn file_range(&self, offset: u64, length: u64) -> Option<Vec<super::FileExtent>> {
        self.inner.file_range(offset, length)
    }
}
