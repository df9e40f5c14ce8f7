//! Opening an image: the header and the L1 table read and checked against the file's length
//! before anything is sized from them; the backing chain opened eagerly (in a loop, not recursion), with a depth limit,
//! loops found by device and inode, names resolved against the image's own directory as qemu
//! does (and, if asked, confined to a directory); and a writable open prepared: autoclear bits
//! cleared, a dirty image's refcounts rebuilt, the refcounts loaded.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use super::{read_or_zero, Backing, BackingFormat, Image, ImageOptions, MAX_BACKING_DEPTH};
use crate::error::{Error, Result};
use crate::header::{self, Header};
use crate::l2cache::L2Cache;
use crate::layout::{self, Geometry};
use crate::refcount::Refcounts;
use crate::write::WriteState;

impl Image {
    /// Open an image (and its backing chain) read-only.
    ///
    /// # Errors
    /// The file cannot be opened, is not a valid qcow2 image, or its chain is broken.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &ImageOptions::default())
    }

    /// Open an image with options.
    ///
    /// # Errors
    /// As [`Image::open`], plus [`Error::ReadOnly`] when writing is asked of an image this
    /// crate will not write (corrupt bit, internal snapshots, unknown autoclear... see docs).
    pub fn open_with(path: impl AsRef<Path>, opts: &ImageOptions) -> Result<Self> {
        // The chain is opened in a loop, top down, each image without its backing, then linked
        // bottom up: 255 layers opened recursively took more than 512 KiB of stack.
        let mut seen = Vec::new();
        let (mut top, mut next) = Self::open_layer(path.as_ref(), opts, 0, &mut seen)?;
        let below_opts = ImageOptions { writable: false, ..opts.clone() };
        let mut under: Vec<Self> = Vec::new();
        let mut bottom = None;
        while let Some((base, format)) = next.take() {
            match format {
                BackingFormat::Qcow2 => {
                    let (image, below) = Self::open_layer(&base, &below_opts, under.len() + 1, &mut seen)?;
                    under.push(image);
                    next = below;
                }
                BackingFormat::Raw => {
                    let f = File::open(&base).map_err(|source| Error::Open { path: base.clone(), source })?;
                    let size = super::length_of(&f).map_err(|source| Error::Open { path: base.clone(), source })?;
                    bottom = Some(Backing::Raw { file: Arc::new(f), size, plain_reads: AtomicBool::new(false) });
                }
            }
        }
        // The backing images share one budget as large as the top image's own: a chain's L2
        // tables in memory stay within twice `l2_cache_bytes` however deep it is (64 layers of a
        // disk whose every 512 MiB changed in each had held 64 times the top's share).
        let share = opts.l2_cache_bytes / under.len().max(1) as u64;
        for image in &mut under {
            image.l2_cache = Mutex::new(L2Cache::new(l2_cache_capacity(share, image.geo.cluster_size())));
        }
        let mut backing = bottom;
        while let Some(mut image) = under.pop() {
            image.backing = backing;
            backing = Some(Backing::Qcow2(Box::new(image)));
        }
        top.backing = backing;
        if opts.writable {
            top.check_writable()?;
            let file_len = top.grown_to.load(std::sync::atomic::Ordering::Acquire);
            top.prepare_for_writes(file_len, opts.reclaim_leaks)?;
        }
        Ok(top)
    }

    /// Open one image of a chain, `depth` backing files under the top, without its backing
    /// file; returns it and where its backing file is, if it has one.
    fn open_layer(
        path: &Path,
        opts: &ImageOptions,
        depth: usize,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<(Self, Option<(PathBuf, BackingFormat)>)> {
        if depth > MAX_BACKING_DEPTH {
            return Err(Error::BackingChainTooDeep { limit: MAX_BACKING_DEPTH, path: path.to_path_buf() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(opts.writable)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let meta = file.metadata().map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(Error::BackingLoop { path: path.to_path_buf() });
        }
        seen.push(id);
        let file_len = super::length_of(&file).map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let mut probe = vec![0u8; Header::PROBE_LEN.min(file_len as usize)];
        read_or_zero(&file, &mut probe, 0)?;
        let cluster = Header::probe_cluster_size(&probe)?;
        let mut first = vec![0u8; cluster.min(file_len as usize)];
        read_or_zero(&file, &mut first, 0)?;
        let header = Header::parse(&first)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            v3: header.version == 3,
            size: header.size,
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_table_offset.checked_add(l1_bytes).is_none_or(|end| end > file_len) && l1_bytes > 0 {
            return Err(Error::InvalidHeader {
                field: "l1_table_offset",
                value: header.l1_table_offset,
                reason: "L1 table lies past the end of the file",
            });
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        read_or_zero(&file, &mut raw, header.l1_table_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect();
        for (i, e) in l1.iter().enumerate() {
            let off = layout::l1_entry_offset(*e, i as u64, header.cluster_bits)?;
            if off != 0 && off + geo.cluster_size() > file_len {
                return Err(Error::InvalidEntry {
                    table: "L1",
                    index: i as u64,
                    value: *e,
                    reason: "L2 table past end of file",
                });
            }
        }
        let below = match &header.backing_file {
            None => None,
            Some(name) => {
                let base = resolve_backing(path, name);
                if let Some(dir) = &opts.confine_backing_to {
                    confine(&base, dir)?;
                }
                let format = match header.backing_format().as_deref() {
                    Some("qcow2") => BackingFormat::Qcow2,
                    Some("raw") => BackingFormat::Raw,
                    Some(other) => return Err(Error::Unsupported(format!("backing format '{other}'"))),
                    None if opts.probe_backing_format => probe_format(&base)?,
                    None => {
                        return Err(Error::Unsupported(format!(
                            "backing file '{name}' has no recorded format, and guessing it is turned off"
                        )))
                    }
                };
                Some((base, format))
            }
        };
        let capacity = l2_cache_capacity(opts.l2_cache_bytes, geo.cluster_size());
        let image = Self {
            file: Arc::new(file),
            path: path.to_path_buf(),
            header,
            geo,
            l1: RwLock::new(l1),
            l2_cache: Mutex::new(L2Cache::new(capacity)),
            backing: None,
            writable: opts.writable,
            direct: match opts.direct_io {
                true => Some(
                    directio::Direct::open(path, opts.writable)
                        .map_err(|source| Error::Open { path: path.to_path_buf(), source })?,
                ),
                false => None,
            },
            plain_reads: AtomicBool::new(false),
            grown_to: AtomicU64::new(file_len),
            write_state: None,
            last_compressed: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        Ok((image, below))
    }

    fn prepare_for_writes(&mut self, file_len: u64, reclaim_leaks: bool) -> Result<()> {
        if self.header.autoclear_features != 0 {
            // We do not maintain bitmaps (or anything else autoclear guards): clear the bits so
            // qemu treats such data as stale instead of trusting it.
            self.file.write_all_at(&0u64.to_be_bytes(), 88).map_err(Error::io("write header", 88))?;
            self.file.sync_data().map_err(Error::io("fdatasync", 0))?;
            self.header.autoclear_features = 0;
        }
        let mut file_len = file_len;
        if self.header.incompatible_features & header::incompatible::DIRTY != 0 {
            let l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
            crate::repair::rebuild(&self.file, &mut self.header, &l1, file_len)?;
            file_len = self.file_len()?;
            tracing::info!(image = %self.path.display(), "refcounts rebuilt; dirty bit cleared");
        } else if reclaim_leaks {
            let l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
            let report = crate::repair::check(&self.file, &self.header, &l1, file_len)?;
            if report.corruptions > 0 {
                return Err(Error::ReadOnly(
                    "refcounts below references: writing could overwrite data (qemu-img check -r all)",
                ));
            }
            if report.leaks > 0 {
                crate::repair::rebuild(&self.file, &mut self.header, &l1, file_len)?;
                file_len = self.file_len()?;
                tracing::info!(image = %self.path.display(), leaks = report.leaks, "leaked clusters reclaimed");
            }
        }
        let refcounts = Refcounts::load(&self.file, &self.header, file_len)?;
        self.write_state = Some(Mutex::new(WriteState::new(refcounts)));
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        let h = &self.header;
        if h.incompatible_features & header::incompatible::CORRUPT != 0 {
            return Err(Error::ReadOnly("the image is marked corrupt (run qemu-img check -r all)"));
        }
        if h.nb_snapshots > 0 {
            return Err(Error::ReadOnly("images with internal snapshots are opened read-only"));
        }
        Ok(())
    }
}

/// L2 tables (one cluster each) kept in `bytes`, at least four: a sequential read needs one per
/// image of a chain at a time, a copy-on-write two.
fn l2_cache_capacity(bytes: u64, cluster_size: u64) -> usize {
    usize::try_from(bytes / cluster_size.max(1)).unwrap_or(usize::MAX).max(4)
}

/// `base` (symlinks resolved) must lie inside `dir`.
fn confine(base: &Path, dir: &Path) -> Result<()> {
    let outside = || Error::Unsupported(format!("backing file {} lies outside {}", base.display(), dir.display()));
    let real = base.canonicalize().map_err(|source| Error::Open { path: base.to_path_buf(), source })?;
    let dir = dir.canonicalize().map_err(|source| Error::Open { path: dir.to_path_buf(), source })?;
    if real.starts_with(&dir) {
        Ok(())
    } else {
        Err(outside())
    }
}

/// Resolve a backing name against the directory of the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf())
}

fn probe_format(path: &Path) -> Result<BackingFormat> {
    let f = File::open(path).map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
    let mut magic = [0u8; 4];
    read_or_zero(&f, &mut magic, 0)?;
    Ok(if u32::from_be_bytes(magic) == header::MAGIC { BackingFormat::Qcow2 } else { BackingFormat::Raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Mapping};

    /// Each image's L2 cache capacity, top first.
    fn capacities(top: &Image) -> Vec<usize> {
        let mut out = vec![top.l2_cache().capacity()];
        let mut below = top.backing.as_ref();
        while let Some(Backing::Qcow2(image)) = below {
            out.push(image.l2_cache().capacity());
            below = image.backing.as_ref();
        }
        out
    }

    #[test]
    fn the_backing_images_share_one_budget_as_large_as_the_top_image_s() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: usize| dir.path().join(format!("c{i}.qcow2"));
        Image::create(name(0), &CreateOptions::new(1 << 30)).unwrap();
        for i in 1..=20 {
            let below = format!("c{}.qcow2", i - 1);
            Image::create(name(i), &CreateOptions::overlay(below, BackingFormat::Qcow2)).unwrap();
        }
        let cluster = 64 << 10;
        // 200 tables for the top; 200 shared by 20 backing images: 10 each.
        let top =
            Image::open_with(name(20), &ImageOptions { l2_cache_bytes: 200 * cluster, ..Default::default() }).unwrap();
        let got = capacities(&top);
        assert_eq!((got.len(), got[0]), (21, 200));
        assert!(got[1..].iter().all(|&c| c == 10), "{got:?}");
        // However small the share, each keeps four (a sequential reader needs one at a time).
        let small =
            Image::open_with(name(20), &ImageOptions { l2_cache_bytes: 8 * cluster, ..Default::default() }).unwrap();
        assert_eq!(capacities(&small), [8].into_iter().chain([4; 20]).collect::<Vec<_>>());
        // And the chain still reads through them all.
        assert_eq!(small.mapping_at(0).unwrap().0, Mapping::Unallocated);
        let mut buf = vec![1u8; 4096];
        small.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
