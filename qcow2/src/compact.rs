//! Rewriting an image with its data clusters compressed: [`compact`], what `qemu-img convert -c
//! -o compression_type=zstd` does for one layer, and [`compare_layers`], the proof that the copy
//! holds what the original held before it replaces it.
//!
//! A backup repository stores whole VM disks; most of their clusters (file systems, databases,
//! logs) compress two to four times. The hub writes an image as fast as the node sends it (no
//! compression on the data path, which stays as fast as the disk), then rewrites it here in the
//! background, and only once [`compare_layers`] found the copy equal puts it in place.
//!
//! Only the image's own layer is copied, cluster by cluster in guest order: a cluster it stores
//! zstd-compressed already as it is (a compressed image a merge wrote into costs only what the
//! merge added), a data cluster as a zstd-compressed cluster (qemu's `compression_type=zstd`, incompatible bit 3, read by qemu 5.1
//! and later), or as it is where compression saves less than a sector, or as a zero cluster
//! where it holds only zeroes; a zero cluster stays one; what the layer leaves unallocated stays
//! unallocated, so the copy keeps the original's backing file and its place in a chain. Zstd,
//! not deflate: it compresses several times faster at a like ratio, and qemu reads deflate
//! clusters only with a 4 KiB window that the `flate2` backend we build cannot write.
//!
//! The new file is laid out as it is written: the header, L1 table and refcount structures of a
//! fresh image ([`Image::create`]'s layout), then L2 tables and data appended in guest order,
//! compressed clusters packed back to back (one may span two host clusters, as qemu's do). Its
//! refcounts are then counted from what the tables reference and written after everything
//! (`repair::rebuild`, the refcount rebuild of a dirty image), and the header switched to them.
//! Nothing of the new file is trusted until then: the caller writes it beside the original under
//! another name and renames it over the original only after [`compare_layers`].
//!
//! Memory is bounded whatever the image: one L2 table, one read buffer and the L1 table.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::header::{Compression, Header};
use crate::image::{BackingFormat, ExtentKind, Image, MapExtent};
use crate::layout;

/// zstd level: qemu's (the library's default). Level 1 is a quarter faster here and stores a
/// tenth more.
const ZSTD_LEVEL: i32 = 3;
/// Guest bytes read at a time (a whole number of clusters, at least one).
const READ_CHUNK: u64 = 1 << 20;
/// L2 entry flag: the cluster reads as zeroes.
const ZERO_FLAG: u64 = 1;

/// What [`compact`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Data clusters stored compressed.
    pub compressed_clusters: u64,
    /// Data clusters stored as they were (not compressing, or compression would have saved less
    /// than a sector).
    pub stored_clusters: u64,
    /// Clusters the original stored zstd-compressed already, copied as they were.
    pub copied_clusters: u64,
    /// Clusters stored as zero clusters (zero clusters, and data clusters holding only zeroes).
    pub zero_clusters: u64,
    /// Guest bytes of the data clusters read.
    pub data_bytes: u64,
    /// Size of the original file.
    pub bytes_before: u64,
    /// Size of the new file.
    pub bytes_after: u64,
}

/// Write `src`'s own layer, compressed, into a new image at `dst` (which must not exist) with the
/// same size, cluster size and backing file, permission bits `mode`; flushed. Module doc.
///
/// # Errors
/// An image this does not rewrite (version 2, extended L2 entries, internal snapshots, bitmaps,
/// an external data file, a size not a whole number of sectors), or I/O. A partial `dst` is removed.
pub fn compact(src: &Image, dst: &Path, mode: u32) -> Result<CompactReport> {
    let h = src.header();
    rewritable(src)?;
    let backing = match (&h.backing_file, h.backing_format().as_deref()) {
        (None, _) => None,
        (Some(name), Some("qcow2")) => Some((name.clone(), BackingFormat::Qcow2)),
        (Some(name), Some("raw")) => Some((name.clone(), BackingFormat::Raw)),
        (Some(_), _) => {
            return Err(Error::Unsupported("compacting an image with a backing file of no recorded format".into()))
        }
    };
    let opts = new_image(src, mode, true).backing(backing);
    Image::create_file(dst, &opts)?;
    let written = write_layer(src, dst);
    if written.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    written
}

/// Refuse an image whose rewrite would lose or change something besides its clusters' layout:
/// version 2 metadata, extended L2 entries, internal snapshots, bitmaps, an external data file,
/// a size not a whole number of sectors.
pub(crate) fn rewritable(src: &Image) -> Result<()> {
    let h = src.header();
    let unsupported = |what: &str| Err(Error::Unsupported(format!("rewriting an image with {what}")));
    if h.version != 3 {
        return unsupported("version 2 metadata");
    }
    if h.extended_l2() {
        return unsupported("extended L2 entries");
    }
    if h.nb_snapshots > 0 {
        return unsupported("internal snapshots");
    }
    if src.size() % 512 != 0 {
        // A new image is a whole number of sectors (as qemu-img makes it): the copy would grow.
        return unsupported("a virtual size that is not a whole number of 512-byte sectors");
    }
    if h.autoclear_features != 0 || h.incompatible_features & crate::header::incompatible::EXTERNAL_DATA != 0 {
        return unsupported("bitmaps or an external data file");
    }
    Ok(())
}

/// The options of a rewritten copy of `src`: its size and cluster size, no backing file yet,
/// permission bits `mode`, zstd as its compression type when it will hold compressed clusters.
pub(crate) fn new_image(src: &Image, mode: u32, compressed: bool) -> CreateOptions {
    let h = src.header();
    let opts = CreateOptions::new(src.size())
        .cluster_bits(h.cluster_bits)
        // At least 16 bits: a host cluster holds the bytes of many compressed clusters.
        .refcount_order(h.refcount_order.max(4))
        .mode(mode);
    if compressed {
        opts.compression(Compression::Zstd)
    } else {
        opts
    }
}

/// Fill the fresh image at `dst` (made by the caller for `src`'s copy): `fill` stores clusters
/// through the image's [`Layer`], given a read buffer of whole clusters (at least one) and the
/// report; then its tables are written, its refcounts counted from them and the header switched
/// to them, and the report's `bytes_after` filled in.
pub(crate) fn fill_new(
    src: &Image,
    dst: &Path,
    compress: bool,
    fill: impl FnOnce(&mut Layer<'_>, &mut [u8], &mut CompactReport) -> Result<()>,
) -> Result<CompactReport> {
    let cs = src.cluster_size();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst)
        .map_err(|source| Error::Open { path: dst.to_path_buf(), source })?;
    let mut head = vec![0u8; usize::try_from(cs).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut head, 0).map_err(Error::io("read header", 0))?;
    let mut header = Header::parse(&head)?;
    let end = file.metadata().map_err(Error::io("stat", 0))?.len().div_ceil(cs) * cs;
    let mut out = Layer::new(&file, &header, end, compress);
    let mut report = CompactReport {
        bytes_before: std::fs::metadata(src.path()).map_err(Error::io("stat", 0))?.len(),
        ..CompactReport::default()
    };
    let mut chunk = vec![0u8; usize::try_from(READ_CHUNK.max(cs)).unwrap_or(usize::MAX)];
    fill(&mut out, &mut chunk, &mut report)?;
    let end = out.finish()?;
    crate::repair::rebuild(&file, &mut header, &out.l1, end)?;
    report.bytes_after = file.metadata().map_err(Error::io("stat", 0))?.len();
    Ok(report)
}

fn write_layer(src: &Image, dst: &Path) -> Result<CompactReport> {
    fill_new(src, dst, true, |out, chunk, report| {
        let cs = src.cluster_size();
        let chunk_len = chunk.len() as u64;
        let size = src.size();
        for extent in src.map(0, size)?.into_iter().filter(|e| e.depth == 0) {
            if extent.offset % cs != 0 {
                return Err(Error::Unsupported(format!("an extent at {:#x}, inside a cluster", extent.offset)));
            }
            let first = extent.offset / cs;
            let clusters = extent.length.div_ceil(cs);
            match extent.kind {
                ExtentKind::Unallocated => {}
                ExtentKind::Zero => {
                    for c in first..first + clusters {
                        out.set(c, ZERO_FLAG)?;
                    }
                    report.zero_clusters += clusters;
                }
                ExtentKind::Data => {
                    let end_guest = extent.offset + extent.length;
                    let mut at = extent.offset;
                    while at < end_guest {
                        // A cluster stored zstd-compressed already is copied as it is: compressing
                        // again an image a merge wrote into costs only what the merge added.
                        if let Some(frame) = src.zstd_frame_at(at)?.filter(|f| f.len() as u64 + 512 <= cs) {
                            report.data_bytes += cs.min(end_guest - at);
                            report.copied_clusters += 1;
                            out.compressed(at / cs, &frame)?;
                            at += cs;
                            continue;
                        }
                        // Else a run of clusters up to the next compressed one, read at once.
                        let mut n = cs.min(end_guest - at);
                        while n < chunk_len && at + n < end_guest && !stored_compressed(src, at + n)? {
                            n += cs.min(end_guest - at - n);
                        }
                        let buf = chunk.get_mut(..n as usize).ok_or_else(|| Error::Unsupported("read chunk".into()))?;
                        src.read_at(buf, at)?;
                        for (i, data) in buf.chunks(cs as usize).enumerate() {
                            let cluster = at / cs + i as u64;
                            report.data_bytes += data.len() as u64;
                            out.data(cluster, data, report)?;
                        }
                        at += n;
                    }
                }
            }
        }
        Ok(())
    })
}

/// The new image's tables as they are filled, and where its file ends.
pub(crate) struct Layer<'a> {
    file: &'a File,
    /// Whether data clusters are stored compressed (where that saves a sector or more).
    compress: bool,
    cluster_size: u64,
    /// Bit where a compressed descriptor's sector count starts.
    sector_shift: u32,
    l1_offset: u64,
    l1: Vec<u64>,
    /// The L2 table being filled: its L1 index, host offset and entries.
    l2: Option<(u64, u64, Vec<u64>)>,
    /// First byte after everything allocated (a cluster boundary).
    end: u64,
    /// Where the next compressed cluster may go in the last one's host cluster, and that
    /// cluster's end.
    tail: Option<(u64, u64)>,
}

impl<'a> Layer<'a> {
    fn new(file: &'a File, header: &Header, end: u64, compress: bool) -> Self {
        Self {
            file,
            compress,
            cluster_size: header.cluster_size(),
            sector_shift: 62 - (header.cluster_bits - 8),
            l1_offset: header.l1_table_offset,
            l1: vec![0; header.l1_size as usize],
            l2: None,
            end,
            tail: None,
        }
    }

    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        self.file.write_all_at(data, at).map_err(Error::io("write", at))
    }

    /// A whole new host cluster.
    fn allocate(&mut self) -> u64 {
        let at = self.end;
        self.end += self.cluster_size;
        at
    }

    /// Store guest cluster `cluster`'s bytes (`data`, the last one maybe short): as a zero cluster
    /// when they are all zeroes, else compressed or as they are.
    pub(crate) fn data(&mut self, cluster: u64, data: &[u8], report: &mut CompactReport) -> Result<()> {
        if all_zero(data) {
            report.zero_clusters += 1;
            return self.set(cluster, ZERO_FLAG);
        }
        let cs = self.cluster_size as usize;
        // The last cluster of a disk whose size is not a whole number of them is padded with
        // zeroes, as qemu pads it: a compressed cluster decompresses to a whole cluster.
        let padded;
        let whole = if data.len() < cs {
            let mut v = data.to_vec();
            v.resize(cs, 0);
            padded = v;
            &padded[..]
        } else {
            data
        };
        let packed = if self.compress {
            zstd::bulk::compress(whole, ZSTD_LEVEL).map_err(|e| Error::io("compress", 0)(e))?
        } else {
            Vec::new()
        };
        if !self.compress || packed.len() as u64 + 512 > self.cluster_size {
            report.stored_clusters += 1;
            let host = self.allocate();
            self.write(whole, host)?;
            return self.set(cluster, host | layout::COPIED);
        }
        report.compressed_clusters += 1;
        self.compressed(cluster, &packed)
    }

    /// Store guest cluster `cluster` as the compressed bytes `packed`, packed after the last
    /// compressed cluster when they fit in its host cluster or the file ends there.
    fn compressed(&mut self, cluster: u64, packed: &[u8]) -> Result<()> {
        let len = packed.len() as u64;
        let start = match self.tail {
            Some((pos, limit)) if pos + len <= limit => pos,
            // The last host cluster is the file's last: the bytes run on into new ones.
            Some((pos, limit)) if limit == self.end => pos,
            _ => self.end,
        };
        let stop = start + len;
        self.end = self.end.max(stop.div_ceil(self.cluster_size) * self.cluster_size);
        self.tail = Some((stop, stop.div_ceil(self.cluster_size) * self.cluster_size));
        self.write(packed, start)?;
        let sectors = ((stop - 1) >> 9) - (start >> 9);
        if sectors >> (62 - self.sector_shift) != 0 || start >> self.sector_shift != 0 {
            return Err(Error::Unsupported(format!("a compressed cluster of {len} bytes at {start:#x}")));
        }
        self.set(cluster, layout::COMPRESSED | (sectors << self.sector_shift) | start)
    }

    /// Set guest cluster `cluster`'s L2 entry, writing out the L2 table before when the cluster
    /// lies in another one.
    fn set(&mut self, cluster: u64, entry: u64) -> Result<()> {
        let per = self.cluster_size / 8;
        let (index, slot) = (cluster / per, (cluster % per) as usize);
        if self.l2.as_ref().is_none_or(|(i, _, _)| *i != index) {
            self.write_l2()?;
            let host = self.allocate();
            self.l2 = Some((index, host, vec![0; per as usize]));
        }
        if let Some(e) = self.l2.as_mut().and_then(|(_, _, t)| t.get_mut(slot)) {
            *e = entry;
        }
        Ok(())
    }

    fn write_l2(&mut self) -> Result<()> {
        let Some((index, host, table)) = self.l2.take() else { return Ok(()) };
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(&bytes, host)?;
        let slot = self
            .l1
            .get_mut(index as usize)
            .ok_or_else(|| Error::Unsupported(format!("L1 index {index} beyond the table")))?;
        *slot = host | layout::COPIED;
        Ok(())
    }

    /// Write the last L2 table and the L1 table; the file's length, a whole number of clusters.
    fn finish(&mut self) -> Result<u64> {
        self.write_l2()?;
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(&bytes, self.l1_offset)?;
        self.file.set_len(self.end).map_err(Error::io("truncate", self.end))?;
        Ok(self.end)
    }
}

/// Whether `buf` holds only zeroes: 64 bytes at a time OR-ed together, which the compiler turns
/// into vector instructions (a byte-by-byte test that stops at the first non-zero byte does not
/// vectorise and cost a third of a rewrite's CPU).
pub(crate) fn all_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.by_ref().all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0) && chunks.remainder().iter().all(|&b| b == 0)
}

/// Whether guest `offset` is a compressed cluster of `image` itself.
fn stored_compressed(image: &Image, offset: u64) -> Result<bool> {
    Ok(matches!(image.mapping_at(offset)?.0, crate::Mapping::Compressed { .. }))
}

/// Whether `a` and `b` hold the same layer: the same guest ranges allocated in each image itself
/// (data or zeroes), reading the same. `None` when they do, else the first difference.
///
/// # Errors
/// Reading either failed.
pub fn compare_layers(a: &Image, b: &Image) -> Result<Option<String>> {
    if a.size() != b.size() {
        return Ok(Some(format!("sizes differ: {} and {}", a.size(), b.size())));
    }
    let own = |e: &MapExtent| e.depth == 0 && e.kind != ExtentKind::Unallocated;
    let (runs, other) = (runs_of(a, own)?, runs_of(b, own)?);
    if runs != other {
        let at = runs.iter().zip(&other).find(|(x, y)| x != y).map_or(0, |(x, _)| x.0);
        return Ok(Some(format!("the images' own layers cover different ranges (from {at:#x})")));
    }
    differ_within(a, b, runs)
}

/// The guest ranges of `image`'s map (through its chain) whose extents `keep` takes, in order,
/// adjacent ones joined.
pub(crate) fn runs_of(image: &Image, keep: impl Fn(&MapExtent) -> bool) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in image.map(0, image.size())?.into_iter().filter(|e| keep(e)) {
        match runs.last_mut() {
            Some(last) if last.1 == e.offset => last.1 = e.offset + e.length,
            _ => runs.push((e.offset, e.offset + e.length)),
        }
    }
    Ok(runs)
}

/// The first guest offset inside `runs` (sorted by start; they may overlap) where `a` and `b`
/// read differently, said as a difference; `None` when they read the same there.
///
/// # Errors
/// Reading either failed.
pub(crate) fn differ_within(a: &Image, b: &Image, runs: Vec<(u64, u64)>) -> Result<Option<String>> {
    let mut x = vec![0u8; READ_CHUNK as usize];
    let mut y = vec![0u8; READ_CHUNK as usize];
    let mut done = 0u64;
    for (start, stop) in runs {
        let mut at = start.max(done);
        while at < stop {
            let n = (stop - at).min(READ_CHUNK) as usize;
            let (bx, by) = (
                x.get_mut(..n).ok_or_else(|| Error::Unsupported("compare buffer".into()))?,
                y.get_mut(..n).ok_or_else(|| Error::Unsupported("compare buffer".into()))?,
            );
            a.read_at(bx, at)?;
            b.read_at(by, at)?;
            if bx != by {
                let first = bx.iter().zip(by.iter()).position(|(p, q)| p != q).unwrap_or(0);
                return Ok(Some(format!("the images differ at guest offset {:#x}", at + first as u64)));
            }
            at += n as u64;
        }
        done = done.max(stop);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::all_zero;

    #[test]
    fn all_zero_finds_one_byte_anywhere() {
        assert!(all_zero(&[]));
        for len in [1, 63, 64, 65, 200, 65536] {
            let mut buf = vec![0u8; len];
            assert!(all_zero(&buf), "{len}");
            for at in [0, len / 2, len - 1] {
                buf[at] = 1;
                assert!(!all_zero(&buf), "{len} at {at}");
                buf[at] = 0;
            }
        }
    }
}
