//! Persistent dirty bitmaps, read only (qemu `docs/interop/qcow2.txt`, "Bitmaps extension"):
//! which parts of the disk changed since a bitmap was started, so that a backup of a qcow2 disk
//! (libvirt's checkpoints keep them) reads only those instead of every block.
//!
//! The extension names a directory of entries (table offset and size, flags, granularity,
//! name); each bitmap's table has one entry per cluster of bitmap data (bit `i` of byte `j`
//! covering granule `8j + i`), an entry without a cluster meaning all zeroes or all ones (bit 0).
//! Everything is bounded before it is read: the directory by qemu's own limit and the file's
//! length, a table by its entries, and a query reads only the table entries and bytes of bitmap
//! data under the range asked for, so a hostile header cannot make this allocate or read what it
//! merely claims.
//!
//! A bitmap is trustworthy only if the image's autoclear bit 0 is still set (a program that
//! does not know bitmaps clears it when it writes) and its `in_use` flag is clear (set while
//! qemu has the image open for writing, and left set by a crash). [`Bitmap::consistent`] says so.

use crate::error::{Error, Result};
use crate::header::ext;
use crate::image::{length_of, read_or_zero, Image};

/// qemu's limit on the bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// qemu's limit on the number of bitmaps.
const MAX_BITMAPS: u32 = 65535;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_HEADER: usize = 24;
/// Entry flags.
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;
/// Table entry: where the cluster of bitmap data is (bits 9-55) and bit 0 "all ones".
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_RESERVED: u64 = !TABLE_OFFSET_MASK & !1;
/// The only bitmap type defined: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// One persistent bitmap, as its directory entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Bytes of disk per bit.
    pub granularity: u64,
    /// Set while qemu has the image open for writing; left set by a crash.
    pub in_use: bool,
    /// Enabled: qemu records writes into it.
    pub auto: bool,
    /// Whether the image's autoclear bit for bitmaps is still set.
    pub extension_valid: bool,
    table_offset: u64,
    table_entries: u64,
}

impl Bitmap {
    /// Whether its bits can be trusted: not in use, not invalidated.
    pub fn consistent(&self) -> bool {
        self.extension_valid && !self.in_use
    }
}

impl Image {
    /// The image's persistent bitmaps (none without the extension).
    ///
    /// # Errors
    /// A malformed extension or directory.
    pub fn bitmaps(&self) -> Result<Vec<Bitmap>> {
        let Some(extension) = self.header.extensions.iter().find(|e| e.kind == ext::BITMAPS) else {
            return Ok(Vec::new());
        };
        let data = &extension.data;
        let count = be32(data, 0).ok_or_else(|| bad("nb_bitmaps", 0, "extension shorter than 24 bytes"))?;
        let size = be64(data, 8).ok_or_else(|| bad("bitmap_directory_size", 0, "extension shorter than 24 bytes"))?;
        let offset =
            be64(data, 16).ok_or_else(|| bad("bitmap_directory_offset", 0, "extension shorter than 24 bytes"))?;
        if count > MAX_BITMAPS {
            return Err(bad("nb_bitmaps", u64::from(count), "more bitmaps than qemu allows"));
        }
        let file_len = length_of(self.file()).map_err(Error::io("stat", 0))?;
        if size > MAX_DIRECTORY_BYTES || offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(bad("bitmap_directory_size", size, "directory too large or past the end of the file"));
        }
        let mut directory = vec![0u8; size as usize];
        read_or_zero(self.file(), &mut directory, offset)?;
        let extension_valid = self.header.autoclear_features & 1 != 0;
        let mut bitmaps = Vec::with_capacity(count.min(1024) as usize);
        let mut at = 0usize;
        for index in 0..u64::from(count) {
            let entry = directory.get(at..).unwrap_or_default();
            let field = |what: &'static str| bad_entry(index, what);
            let table_offset = be64(entry, 0).ok_or_else(|| field("directory ends inside an entry"))?;
            let table_entries = u64::from(be32(entry, 8).ok_or_else(|| field("directory ends inside an entry"))?);
            let flags = be32(entry, 12).ok_or_else(|| field("directory ends inside an entry"))?;
            let (kind, granularity_bits) = (entry.get(16).copied(), entry.get(17).copied());
            let name_len = usize::from(be16(entry, 18).ok_or_else(|| field("directory ends inside an entry"))?);
            let extra_len = be32(entry, 20).ok_or_else(|| field("directory ends inside an entry"))? as usize;
            if kind != Some(TYPE_DIRTY_TRACKING) {
                return Err(field("not a dirty-tracking bitmap"));
            }
            let granularity_bits = granularity_bits
                .filter(|b| (9..=31).contains(b))
                .ok_or_else(|| field("granularity outside 2^9..2^31"))?;
            let name_at = ENTRY_HEADER.checked_add(extra_len).ok_or_else(|| field("extra data too large"))?;
            let name = entry
                .get(name_at..name_at.saturating_add(name_len))
                .ok_or_else(|| field("name past the end of the directory"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            let cluster = self.cluster_size();
            let bits_per_cluster = cluster * 8;
            let needed = self.size().div_ceil(1u64 << granularity_bits).div_ceil(bits_per_cluster);
            if table_entries < needed || table_offset % cluster != 0 {
                return Err(field("bitmap table too small for the disk, or unaligned"));
            }
            if table_offset.checked_add(table_entries * 8).is_none_or(|end| end > file_len) {
                return Err(field("bitmap table past the end of the file"));
            }
            bitmaps.push(Bitmap {
                name,
                granularity: 1 << granularity_bits,
                in_use: flags & FLAG_IN_USE != 0,
                auto: flags & FLAG_AUTO != 0,
                extension_valid,
                table_offset,
                table_entries,
            });
            at = at.saturating_add((name_at + name_len).div_ceil(8) * 8);
        }
        Ok(bitmaps)
    }

    /// `[offset, offset + length)` (clipped to the disk) as consecutive runs `(length, dirty)`
    /// by `bitmap`: a granule with its bit set is dirty as a whole.
    ///
    /// # Errors
    /// A table entry or data cluster that is malformed or lies outside the file; I/O.
    pub fn bitmap_runs(&self, bitmap: &Bitmap, offset: u64, length: u64) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(length).min(self.size());
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if offset >= end {
            return Ok(runs);
        }
        let mut push = |from: u64, to: u64, dirty: bool| {
            let (from, to) = (from.max(offset), to.min(end));
            if to <= from {
                return;
            }
            match runs.last_mut() {
                Some((n, d)) if *d == dirty => *n += to - from,
                _ => runs.push((to - from, dirty)),
            }
        };
        let gran = bitmap.granularity;
        let file_len = length_of(self.file()).map_err(Error::io("stat", 0))?;
        let cluster = self.cluster_size();
        let bits_per_cluster = cluster * 8;
        let (first, last) = (offset / gran, (end - 1) / gran);
        let mut bit = first;
        while bit <= last {
            let index = bit / bits_per_cluster;
            if index >= bitmap.table_entries {
                return Err(Error::InvalidEntry { table: "bitmap", index, value: 0, reason: "past the bitmap table" });
            }
            let mut raw = [0u8; 8];
            read_or_zero(self.file(), &mut raw, bitmap.table_offset + index * 8)?;
            let entry = u64::from_be_bytes(raw);
            let data_at = entry & TABLE_OFFSET_MASK;
            if entry & TABLE_RESERVED != 0 || data_at % cluster != 0 || data_at.saturating_add(cluster) > file_len {
                return Err(Error::InvalidEntry {
                    table: "bitmap",
                    index,
                    value: entry,
                    reason: "reserved bits set, or data cluster unaligned or past the end of the file",
                });
            }
            let stop = last.min((index + 1) * bits_per_cluster - 1);
            if data_at == 0 {
                push(bit * gran, (stop + 1).saturating_mul(gran), entry & 1 == 1);
            } else {
                let (from_byte, to_byte) = ((bit % bits_per_cluster) / 8, (stop % bits_per_cluster) / 8);
                let mut bytes = vec![0u8; (to_byte - from_byte + 1) as usize];
                read_or_zero(self.file(), &mut bytes, data_at + from_byte)?;
                for b in bit..=stop {
                    let within = b % bits_per_cluster;
                    let byte = bytes.get((within / 8 - from_byte) as usize).copied().unwrap_or(0);
                    push(b * gran, (b + 1).saturating_mul(gran), byte >> (within % 8) & 1 == 1);
                }
            }
            bit = stop + 1;
        }
        Ok(runs)
    }
}

fn bad(field: &'static str, value: u64, reason: &'static str) -> Error {
    Error::InvalidHeader { field, value, reason }
}

fn bad_entry(index: u64, reason: &'static str) -> Error {
    Error::InvalidEntry { table: "bitmap directory", index, value: 0, reason }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes)
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes)
}
