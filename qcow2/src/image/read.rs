//! Reading guest data: the mapping walked run by run, each piece filled from the image's file,
//! a decompressed cluster, zeroes or the backing chain. [`Image::read_at`] may wait for the
//! device; [`Image::read_cached`] fills only what the page cache and the cached tables give
//! without waiting (`RWF_NOWAIT`), so an async caller reads the rest off its runtime.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Backing, Image};
use crate::compress;
use crate::error::{Error, Result};
use crate::layout::Mapping;

impl Backing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            Self::Raw { file, .. } => read_or_zero(file, inside, offset),
            Self::Qcow2(img) => img.read_at(inside, offset),
        }
    }

    /// As [`Image::read_cached`]: the bytes of a prefix of `buf` filled without waiting.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let avail = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        let got = match self {
            _ if inside.is_empty() => 0,
            Self::Raw { file, plain_reads, .. } => read_cached_or_zero(file, plain_reads, inside, offset)?,
            Self::Qcow2(img) => img.read_cached(inside, offset)?,
        };
        if got < avail {
            return Ok(got);
        }
        past.fill(0);
        Ok(buf.len())
    }
}

impl Image {
    /// Read guest data at host offset `host` (zeroes past the end of the file): through
    /// `O_DIRECT` when asked for and aligned.
    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| directio::is_aligned(host, buf.len())) {
            match direct.read_at(buf, host) {
                Ok(()) => return Ok(()),
                // The file ends inside the range: the buffered read fills the rest with zeroes.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(Error::io("read", host)(e)),
            }
        }
        read_or_zero(&self.file, buf, host)
    }

    /// The decompressed contents of the compressed cluster at `host`. The last one is kept, so
    /// small reads walking through a compressed cluster decompress it once, not once per read.
    /// (Host clusters are never rewritten in place while referenced, so the host offset is a
    /// sound key.)
    fn read_compressed(&self, host: u64, length: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((at, data)) = self.last_compressed.lock().ok().and_then(|c| c.clone()) {
            if at == host {
                return Ok(data);
            }
        }
        let cluster = self.geo.cluster_size();
        // A compressed cluster is never longer than a cluster plus the sector it starts in.
        let length = length.min(cluster + 512);
        let mut input = vec![0u8; length as usize];
        read_or_zero(&self.file, &mut input, host)?;
        let mut out = vec![0u8; cluster as usize];
        compress::decompress(self.header.compression, &input, &mut out, host)?;
        let out = Arc::new(out);
        if let Ok(mut c) = self.last_compressed.lock() {
            *c = Some((host, Arc::clone(&out)));
        }
        Ok(out)
    }

    /// The zstd frame guest cluster `offset` is stored as, when this image (not a backing file)
    /// stores it compressed with zstd, checked to decompress alone into the whole cluster:
    /// what [`crate::compact`] copies as it is instead of compressing it again.
    pub(crate) fn zstd_frame_at(&self, offset: u64) -> Result<Option<Vec<u8>>> {
        if self.header.compression != crate::header::Compression::Zstd {
            return Ok(None);
        }
        let Mapping::Compressed { host, length } = self.mapping_at(offset)?.0 else { return Ok(None) };
        let cluster = self.geo.cluster_size();
        let mut input = vec![0u8; length.min(cluster + 512) as usize];
        read_or_zero(&self.file, &mut input, host)?;
        let Ok(n) = zstd::zstd_safe::find_frame_compressed_size(&input) else { return Ok(None) };
        input.truncate(n);
        let mut out = vec![0u8; cluster as usize];
        match compress::decompress(crate::header::Compression::Zstd, &input, &mut out, host) {
            Ok(()) => Ok(Some(input)),
            Err(_) => Ok(None),
        }
    }

    /// Read `buf.len()` bytes at guest `offset`.
    ///
    /// # Errors
    /// Out of range, malformed metadata, or I/O.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, run) = self.mapping_run(pos, (buf.len() - done) as u64)?;
            let n = run.min((buf.len() - done) as u64) as usize;
            // Never return with part of `buf` unfilled: the caller would send what was there.
            let Some(dst) = buf.get_mut(done..done + n).filter(|d| !d.is_empty()) else {
                return Err(Error::InvalidEntry { table: "L2", index: pos, value: run, reason: "empty mapping run" });
            };
            match mapping {
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_at(dst, pos)?,
                    None => dst.fill(0),
                },
                Mapping::Zero => dst.fill(0),
                Mapping::Data { host, .. } => self.read_data(dst, host)?,
                Mapping::Compressed { host, length } => {
                    let cluster = self.read_compressed(host, length)?;
                    let within = (pos & (self.geo.cluster_size() - 1)) as usize;
                    let src = cluster.get(within..within + n).ok_or_else(|| Error::CorruptCompressedCluster {
                        offset: host,
                        reason: "decompressed cluster shorter than the read".into(),
                    })?;
                    dst.copy_from_slice(src);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Fill as much of `buf` (a guest range, as [`Image::read_at`]) as can be had without
    /// waiting for a device: data the page cache holds, zero and unallocated ranges, clusters
    /// whose L2 table is cached, the backing chain alike. Returns how many bytes from the start
    /// of `buf` are filled (0 when the first piece would wait); the caller reads the rest with
    /// `read_at`, off any thread that must not block. `O_DIRECT` data always waits; a file on a
    /// filesystem that refuses `RWF_NOWAIT` (tmpfs, which never waits) is read plainly.
    ///
    /// # Errors
    /// As [`Image::read_at`].
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some((mapping, run)) = self.cached_mapping_run(pos, (buf.len() - done) as u64)? else { break };
            let n = run.min((buf.len() - done) as u64) as usize;
            let Some(dst) = buf.get_mut(done..done + n).filter(|d| !d.is_empty()) else {
                return Err(Error::InvalidEntry { table: "L2", index: pos, value: run, reason: "empty mapping run" });
            };
            let got = match mapping {
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_cached(dst, pos)?,
                    None => {
                        dst.fill(0);
                        n
                    }
                },
                Mapping::Zero => {
                    dst.fill(0);
                    n
                }
                Mapping::Data { host, .. } if self.direct.is_none() => {
                    read_cached_or_zero(&self.file, &self.plain_reads, dst, host)?
                }
                Mapping::Data { .. } => 0,
                Mapping::Compressed { host, .. } => {
                    let last = self.last_compressed.lock().ok().and_then(|c| c.clone());
                    let within = (pos & (self.geo.cluster_size() - 1)) as usize;
                    let cached = last.filter(|(at, _)| *at == host);
                    match cached.as_ref().and_then(|(_, c)| c.get(within..within + n)) {
                        Some(src) => {
                            dst.copy_from_slice(src);
                            n
                        }
                        None => 0,
                    }
                }
            };
            done += got;
            if got < n {
                break;
            }
        }
        Ok(done)
    }
}

/// Fill a prefix of `buf` at `offset` from the page cache without waiting for the device
/// (`RWF_NOWAIT`); bytes past the end of the file read as zeroes. Returns the bytes filled.
/// A filesystem that cannot read without waiting (tmpfs refuses the flag: it has no device to
/// wait for) is read plainly, and `plain` remembers it for the file.
fn read_cached_or_zero(file: &File, plain: &AtomicBool, buf: &mut [u8], offset: u64) -> Result<usize> {
    if plain.load(Ordering::Relaxed) {
        read_or_zero(file, buf, offset)?;
        return Ok(buf.len());
    }
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else { break };
        let at = offset + done as u64;
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(file, &mut [std::io::IoSliceMut::new(rest)], at, flags) {
            Ok(0) => {
                rest.fill(0);
                return Ok(buf.len());
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            // Not cached: the caller waits for the rest.
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                plain.store(true, Ordering::Relaxed);
                read_or_zero(file, rest, at)?;
                return Ok(buf.len());
            }
            Err(e) => return Err(Error::io("read", at)(e.into())),
        }
    }
    Ok(done)
}

/// Read `buf` at `offset`; bytes past the end of the file read as zeroes (as in qemu).
pub(crate) fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else { break };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", offset + done as u64)(e)),
        }
    }
    Ok(())
}
