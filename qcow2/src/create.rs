//! Creating an image: qemu-img's layout (header cluster, a refcount table sized so it never has
//! to grow for the virtual size, one refcount block, then the L1 table), written and fsynced
//! before the image is opened, and removed again if it cannot be.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, Compression, Extension, Header};
use crate::image::{resolve_backing, BackingFormat, Image, ImageOptions};
use crate::layout::{self, Geometry};

/// How to create an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual size, rounded up to whole 512-byte sectors as qemu-img does; `None` takes the
    /// backing file's size.
    pub size: Option<u64>,
    /// log2 of the cluster size (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// log2 of the refcount width (default 4: 16 bits).
    pub refcount_order: u32,
    /// Backing file name exactly as stored (relative names are resolved against the new image's
    /// directory), and its format.
    pub backing: Option<(String, BackingFormat)>,
    /// Permission bits of the new file, before the process umask (default `0o644`, qemu-img's;
    /// a backup repository makes its images `0o600`: they hold whole VM disks).
    pub mode: u32,
    /// How its compressed clusters are compressed (default zlib, qemu-img's; zstd sets the
    /// compression-type incompatible bit, as `-o compression_type=zstd` does).
    pub compression: Compression,
}

impl CreateOptions {
    /// qemu-img's defaults for a fresh image of `size` bytes (rounded up to 512-byte sectors).
    pub fn new(size: u64) -> Self {
        Self {
            size: Some(size),
            cluster_bits: 16,
            refcount_order: 4,
            backing: None,
            mode: 0o644,
            compression: Compression::Zlib,
        }
    }

    /// An overlay on `backing` (stored as given), sized like it.
    pub fn overlay(backing: impl Into<String>, format: BackingFormat) -> Self {
        Self {
            size: None,
            cluster_bits: 16,
            refcount_order: 4,
            backing: Some((backing.into(), format)),
            mode: 0o644,
            compression: Compression::Zlib,
        }
    }

    setters::setters! {
        size: Option<u64>,
        cluster_bits: u32,
        refcount_order: u32,
        backing: Option<(String, BackingFormat)>,
        mode: u32,
        compression: Compression,
    }
}

impl Image {
    /// Create a new image at `path` (which must not exist) and return it open for writing.
    ///
    /// The layout is qemu-img's: header cluster, refcount table sized so it never has to grow
    /// for this virtual size, one refcount block, then the L1 table. Written, then fsynced; the
    /// image returned counts as closed until it is first written ([`Image::close`]).
    ///
    /// # Errors
    /// Invalid options, a missing backing file, or I/O.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Self> {
        let path = path.as_ref();
        Self::create_file(path, opts)?;
        // An image that cannot be opened (its chain too deep, say) is not left behind.
        let image = Self::open_with(path, &ImageOptions::read_write()).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        // Everything was written and synced above, and opening a new image writes nothing: it
        // is closed already, so neither `close` nor its drop syncs it again before a write.
        image.closed.store(true, std::sync::atomic::Ordering::Release);
        Ok(image)
    }

    pub(crate) fn create_file(path: &Path, opts: &CreateOptions) -> Result<()> {
        let bits = opts.cluster_bits;
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::InvalidOption { option: "cluster_bits", reason: format!("{bits} is outside 9..=21") });
        }
        if opts.refcount_order > 6 {
            return Err(Error::InvalidOption {
                option: "refcount_order",
                reason: format!("{} is outside 0..=6", opts.refcount_order),
            });
        }
        let mut extensions = Vec::new();
        let mut backing_file = None;
        let size = match (&opts.backing, opts.size) {
            (Some((name, format)), size) => {
                let resolved = resolve_backing(path, name);
                let backing_size = match format {
                    BackingFormat::Qcow2 => Image::open(&resolved)?.size(),
                    BackingFormat::Raw => std::fs::metadata(&resolved)
                        .map_err(|source| Error::Open { path: resolved.clone(), source })?
                        .len(),
                };
                extensions
                    .push(Extension { kind: header::ext::BACKING_FORMAT, data: format.name().as_bytes().to_vec() });
                backing_file = Some(name.clone());
                size.unwrap_or(backing_size)
            }
            (None, Some(size)) => size,
            (None, None) => {
                return Err(Error::InvalidOption { option: "size", reason: "needed without a backing file".into() })
            }
        };
        // As qemu-img does: qemu counts a disk in 512-byte sectors and would not see a tail
        // shorter than one (its data lost to every qemu tool).
        let size = size.div_ceil(512).saturating_mul(512);
        if size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidOption { option: "size", reason: format!("{size} is larger than 2^61") });
        }
        extensions.push(feature_table());
        let cluster = 1u64 << bits;
        let geo = Geometry { cluster_bits: bits, extended_l2: false, v3: true, size };
        let l1_size = size.div_ceil(geo.l2_coverage());
        if l1_size * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidOption {
                option: "size",
                reason: "needs an L1 table over 32 MiB; use larger clusters".into(),
            });
        }
        let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
        let per_block = cluster * 8 / (1u64 << opts.refcount_order);
        // Every cluster the image can ever need: data, L2 tables, L1, refcount blocks, header.
        let data_clusters = size.div_ceil(cluster);
        let l2_clusters = l1_size;
        let mut reftable_clusters = 1u64;
        loop {
            let meta = 1 + reftable_clusters + l1_clusters + l2_clusters;
            let blocks = (data_clusters + meta).div_ceil(per_block) + 1;
            let total = data_clusters + meta + blocks;
            let needed = total.div_ceil(per_block).saturating_mul(8).div_ceil(cluster).max(1);
            if needed <= reftable_clusters {
                break;
            }
            reftable_clusters = needed;
        }
        if reftable_clusters * cluster > header::MAX_REFTABLE_BYTES {
            return Err(Error::InvalidOption {
                option: "size",
                reason: "needs a refcount table over 8 MiB; use larger clusters".into(),
            });
        }
        let reftable_offset = cluster;
        let refblock_offset = reftable_offset + reftable_clusters * cluster;
        let l1_offset = refblock_offset + cluster;
        let end = l1_offset + l1_clusters * cluster;
        let used_clusters = end / cluster;
        if used_clusters > per_block {
            return Err(Error::InvalidOption {
                option: "refcount_order",
                reason: "initial metadata does not fit one refcount block".into(),
            });
        }
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: bits,
            size,
            l1_size: l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: reftable_offset,
            refcount_table_clusters: reftable_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: match opts.compression {
                Compression::Zlib => 0,
                Compression::Zstd => header::incompatible::COMPRESSION_TYPE,
            },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: opts.refcount_order,
            header_length: header::V3_HEADER_LEN,
            compression: opts.compression,
            backing_file,
            extensions,
        };
        let head = match h.encode() {
            Ok(head) => head,
            Err(_) => {
                // Small clusters: like qemu, leave out the feature name table (it only names the
                // bits for `qemu-img info`) rather than refuse the backing file.
                let mut h = h.clone();
                h.extensions.retain(|e| e.kind != header::ext::FEATURE_TABLE);
                h.encode()?
            }
        };
        let mut reftable = vec![0u8; (reftable_clusters * cluster) as usize];
        if let Some(e) = reftable.get_mut(..8) {
            e.copy_from_slice(&refblock_offset.to_be_bytes());
        }
        let mut refblock = vec![0u8; cluster as usize];
        for i in 0..used_clusters {
            layout::refcount_set(&mut refblock, opts.refcount_order, i, 1);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(opts.mode)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let write = |data: &[u8], at: u64| file.write_all_at(data, at).map_err(Error::io("write", at));
        write(&reftable, reftable_offset)?;
        write(&refblock, refblock_offset)?;
        file.set_len(end).map_err(Error::io("truncate", end))?;
        write(&head, 0)?;
        file.sync_all().map_err(Error::io("fsync", 0))?;
        Ok(())
    }
}

/// The feature name table qemu writes, so `qemu-img info` names our bits.
fn feature_table() -> Extension {
    let mut data = Vec::new();
    let mut entry = |kind: u8, bit: u8, name: &str| {
        data.push(kind);
        data.push(bit);
        let mut n = [0u8; 46];
        if let Some(dst) = n.get_mut(..name.len()) {
            dst.copy_from_slice(name.as_bytes());
        }
        data.extend_from_slice(&n);
    };
    entry(0, 0, "dirty bit");
    entry(0, 1, "corrupt bit");
    entry(0, 2, "external data file");
    entry(0, 3, "compression type");
    entry(0, 4, "extended L2 entries");
    entry(1, 0, "lazy refcounts");
    entry(2, 0, "bitmaps");
    entry(2, 1, "raw external data");
    Extension { kind: header::ext::FEATURE_TABLE, data }
}
