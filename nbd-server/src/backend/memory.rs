//! An in-memory backend: a sparse map of fixed-size pages behind one lock.
//!
//! Meant for tests, demos and scratch exports. Pages are allocated on first write and freed by
//! trim and write-zeroes, so a 1 TiB memory export costs only what was written, and block status
//! reports untouched pages as holes. A single `RwLock` keeps it simple; it is not the fast path.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::{Backend, BackendError, BackendErrorKind, BackendResult, Capabilities, ZeroFlags};
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::transmission::Extent;

const PAGE: u64 = 64 * 1024;

/// A sparse in-memory disk.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    pages: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemoryBackend {
    /// An all-zero disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size, pages: RwLock::new(BTreeMap::new()) }
    }

    /// Bytes of memory held by written pages.
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.read().map(|p| p.len() as u64 * PAGE).unwrap_or(0)
    }

    fn poisoned() -> BackendError {
        BackendError::new(BackendErrorKind::Io, "memory backend lock poisoned by an earlier panic")
    }

    /// Visit `[offset, offset+len)` page by page: (page index, offset in page, byte count).
    fn spans(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let end = offset.saturating_add(len);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos / PAGE;
            let within = pos % PAGE;
            let n = (PAGE - within).min(end - pos);
            pos += n;
            Some((page, within as usize, n as usize))
        })
    }

    fn zero_range(&self, offset: u64, length: u64) -> BackendResult<()> {
        let mut pages = self.pages.write().map_err(|_| Self::poisoned())?;
        for (page, within, n) in Self::spans(offset, length) {
            if within == 0 && n as u64 == PAGE {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                if let Some(dst) = p.get_mut(within..within + n) {
                    dst.fill(0);
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
            cache: false,
            writes_wait: false,
            piped_writes: false,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        let pages = self.pages.read().map_err(|_| Self::poisoned())?;
        let mut done = 0usize;
        for (page, within, n) in Self::spans(offset, buf.len() as u64) {
            let dst =
                buf.get_mut(done..done + n).ok_or_else(|| BackendError::new(BackendErrorKind::InvalidInput, "span"))?;
            match pages.get(&page).and_then(|p| p.get(within..within + n)) {
                Some(src) => dst.copy_from_slice(src),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> BackendResult<()> {
        let mut pages = self.pages.write().map_err(|_| Self::poisoned())?;
        let mut done = 0usize;
        for (page, within, n) in Self::spans(offset, data.len() as u64) {
            let p = pages.entry(page).or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            if let (Some(dst), Some(src)) = (p.get_mut(within..within + n), data.get(done..done + n)) {
                dst.copy_from_slice(src);
            }
            done += n;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, _fua: bool) -> BackendResult<()> {
        self.zero_range(offset, length)
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _flags: ZeroFlags) -> BackendResult<()> {
        self.zero_range(offset, length)
    }

    async fn block_status(&self, offset: u64, length: u64) -> BackendResult<Vec<Extent>> {
        let pages = self.pages.read().map_err(|_| Self::poisoned())?;
        let mut extents: Vec<Extent> = Vec::new();
        for (page, _within, n) in Self::spans(offset, length) {
            let flags = if pages.contains_key(&page) { 0 } else { STATE_HOLE | STATE_ZERO };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += n as u64,
                _ => extents.push(Extent { length: n as u64, flags }),
            }
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_read_back_across_page_boundaries_and_untouched_bytes_are_zero() {
        let m = MemoryBackend::new(1 << 20);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write(PAGE - 10, &data, false).await.unwrap();
        let mut back = vec![0u8; data.len() + 20];
        m.read(PAGE - 20, &mut back).await.unwrap();
        assert_eq!(&back[..10], &[0u8; 10]);
        assert_eq!(&back[10..10 + data.len()], &data[..]);
        assert_eq!(&back[10 + data.len()..], &[0u8; 10]);
    }

    #[tokio::test]
    async fn trim_frees_whole_pages_and_block_status_reports_them_as_holes() {
        let m = MemoryBackend::new(4 * PAGE);
        m.write(0, &vec![1u8; (3 * PAGE) as usize], false).await.unwrap();
        m.trim(PAGE, PAGE, false).await.unwrap();
        assert_eq!(m.allocated_bytes(), 2 * PAGE);
        let ext = m.block_status(0, 4 * PAGE).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent { length: PAGE, flags: 0 },
                Extent { length: PAGE, flags: STATE_HOLE | STATE_ZERO },
                Extent { length: PAGE, flags: 0 },
                Extent { length: PAGE, flags: STATE_HOLE | STATE_ZERO },
            ]
        );
    }

    #[tokio::test]
    async fn partial_write_zeroes_zero_only_the_range() {
        let m = MemoryBackend::new(PAGE);
        m.write(0, &vec![7u8; PAGE as usize], false).await.unwrap();
        m.write_zeroes(100, 50, ZeroFlags::default()).await.unwrap();
        let mut b = vec![0u8; 200];
        m.read(0, &mut b).await.unwrap();
        assert!(b[..100].iter().all(|&x| x == 7));
        assert!(b[100..150].iter().all(|&x| x == 0));
        assert!(b[150..].iter().all(|&x| x == 7));
    }
}
