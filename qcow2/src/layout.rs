//! Where guest bytes live: decoding L1/L2 entries into mappings, and refcount entries of any
//! width. Pure functions over integers; the image layer does the I/O.
//!
//! This is the "metadata decides" half of the crate: given a table entry, it says
//! unallocated / zero / data at a host offset / compressed, so the data path can do positional
//! I/O without holding any lock.

use crate::error::{Error, Result};

/// Host offset bits 9..=55 of standard L1/L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 "refcount is exactly one" flag.
pub const COPIED: u64 = 1 << 63;
/// L2 compressed flag.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 (v3, standard entries) "reads as zeroes" flag.
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries with subcluster bitmaps.
    pub extended_l2: bool,
    /// v3 (zero flag allowed in standard entries).
    pub v3: bool,
    /// Virtual size.
    pub size: u64,
}

impl Geometry {
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    /// Bytes of guest space one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// (L1 index, L2 index, offset within the cluster) of a guest offset.
    pub fn split(&self, offset: u64) -> (u64, u64, u64) {
        let cluster = offset >> self.cluster_bits;
        (cluster / self.l2_entries(), cluster % self.l2_entries(), offset & (self.cluster_size() - 1))
    }

    /// Subcluster size (extended L2 only).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(SUBCLUSTERS)
    }
}

/// How a run of guest bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this image: read from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes (maybe with a preallocated host cluster).
    Zero,
    /// Stored uncompressed at this host offset (of the first byte of the run).
    Data {
        /// Host offset.
        host: u64,
        /// The L2 entry says the cluster's refcount is exactly one (writable in place).
        copied: bool,
    },
    /// Stored compressed; the whole cluster must be decompressed.
    Compressed {
        /// Host offset of the compressed bytes.
        host: u64,
        /// Bytes to read (a bound: decompression stops at a full cluster).
        length: u64,
    },
}

/// Decode the L2 table offset from an L1 entry (0 = no L2 table).
///
/// # Errors
/// [`Error::InvalidEntry`] for an unaligned offset or reserved bits.
pub fn l1_entry_offset(entry: u64, index: u64, cluster_bits: u32) -> Result<u64> {
    let offset = entry & OFFSET_MASK;
    if entry & !(OFFSET_MASK | COPIED) != 0 {
        return Err(Error::InvalidEntry { table: "L1", index, value: entry, reason: "reserved bits set" });
    }
    if offset & ((1 << cluster_bits) - 1) != 0 {
        return Err(Error::InvalidEntry {
            table: "L1",
            index,
            value: entry,
            reason: "L2 table is not cluster aligned",
        });
    }
    Ok(offset)
}

/// Map the bytes of one guest cluster starting `within` bytes into it. Returns the mapping of
/// the run and the run's length (to the end of the cluster, or of the subcluster run with the
/// same status for extended L2).
///
/// # Errors
/// [`Error::InvalidEntry`] for entries the format forbids.
pub fn map_l2_entry(g: &Geometry, entry: u64, bitmap: u64, index: u64, within: u64) -> Result<(Mapping, u64)> {
    let cluster = g.cluster_size();
    let bad = |reason| Error::InvalidEntry { table: "L2", index, value: entry, reason };
    if entry & COMPRESSED != 0 {
        let x = 62 - (g.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry & !(COPIED | COMPRESSED)) >> x;
        let length = (sectors + 1) * 512 - (host & 511);
        return Ok((Mapping::Compressed { host, length }, cluster - within));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if host & (cluster - 1) != 0 {
        return Err(bad("data cluster is not cluster aligned"));
    }
    if !g.extended_l2 {
        if entry & ZERO != 0 {
            if !g.v3 {
                return Err(bad("zero flag in a version 2 image"));
            }
            return Ok((Mapping::Zero, cluster - within));
        }
        let m = if host == 0 { Mapping::Unallocated } else { Mapping::Data { host: host + within, copied } };
        return Ok((m, cluster - within));
    }
    if entry & ZERO != 0 {
        return Err(bad("bit 0 is reserved with extended L2 entries"));
    }
    let sc_size = g.subcluster_size();
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err(bad("a subcluster is both allocated and zero"));
    }
    if alloc != 0 && host == 0 {
        return Err(bad("allocated subclusters without a host cluster"));
    }
    let status = |sc: u32| (alloc >> sc & 1, zero >> sc & 1);
    let first = (within / sc_size) as u32;
    let mut end = first + 1;
    while end < SUBCLUSTERS && status(end) == status(first) {
        end += 1;
    }
    let run = u64::from(end) * sc_size - within;
    let m = match status(first) {
        (1, _) => Mapping::Data { host: host + within, copied },
        (_, 1) => Mapping::Zero,
        _ => Mapping::Unallocated,
    };
    Ok((m, run))
}

/// Read refcount `index` from a refcount block of `1 << order`-bit entries.
pub fn refcount_get(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block.get((index / per_byte) as usize).copied().unwrap_or(0);
        let shift = (index % per_byte) * bits;
        return u64::from(byte >> shift) & ((1 << bits) - 1);
    }
    let width = (bits / 8) as usize;
    let start = index as usize * width;
    block.get(start..start + width).map(|b| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))).unwrap_or(0)
}

/// Largest refcount an entry of `1 << order` bits holds.
pub fn refcount_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

/// Write refcount `index` into a refcount block; returns the byte range that changed.
pub fn refcount_set(block: &mut [u8], order: u32, index: u64, value: u64) -> std::ops::Range<usize> {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let at = (index / per_byte) as usize;
        let shift = (index % per_byte) * bits;
        let mask = (((1u16 << bits) - 1) << shift) as u8;
        if let Some(byte) = block.get_mut(at) {
            *byte = (*byte & !mask) | (((value << shift) as u8) & mask);
        }
        return at..at + 1;
    }
    let width = (bits / 8) as usize;
    let start = index as usize * width;
    if let Some(dst) = block.get_mut(start..start + width) {
        let bytes = value.to_be_bytes();
        dst.copy_from_slice(bytes.get(8 - width..).unwrap_or_default());
    }
    start..start + width
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(extended: bool) -> Geometry {
        Geometry { cluster_bits: 16, extended_l2: extended, v3: true, size: 1 << 30 }
    }

    #[test]
    fn standard_entries_map_to_data_zero_or_unallocated() {
        let g = geo(false);
        assert_eq!(map_l2_entry(&g, 0, 0, 0, 100).unwrap(), (Mapping::Unallocated, 65536 - 100));
        assert_eq!(map_l2_entry(&g, ZERO, 0, 0, 0).unwrap().0, Mapping::Zero);
        assert_eq!(
            map_l2_entry(&g, COPIED | 0x50000, 0, 0, 8).unwrap().0,
            Mapping::Data { host: 0x50008, copied: true }
        );
        assert!(map_l2_entry(&g, 0x50200, 0, 0, 0).is_err(), "unaligned host cluster");
        let v2 = Geometry { v3: false, ..g };
        assert!(map_l2_entry(&v2, ZERO, 0, 0, 0).is_err());
    }

    #[test]
    fn compressed_descriptors_split_offset_and_sector_count_by_cluster_size() {
        let g = geo(false);
        let x = 62 - (16 - 8);
        let entry = COMPRESSED | (3u64 << x) | 0x12345;
        let (m, _) = map_l2_entry(&g, entry, 0, 0, 0).unwrap();
        assert_eq!(m, Mapping::Compressed { host: 0x12345, length: 4 * 512 - 0x145 });
    }

    #[test]
    fn extended_entries_map_subcluster_runs() {
        let g = geo(true);
        let sc = g.subcluster_size();
        // subclusters 0-1 allocated, 2 zero, rest unallocated
        let bitmap = 0b11 | (0b100u64 << 32);
        let host = 0x70000;
        assert_eq!(map_l2_entry(&g, host, bitmap, 0, 0).unwrap(), (Mapping::Data { host, copied: false }, 2 * sc));
        assert_eq!(map_l2_entry(&g, host, bitmap, 0, 2 * sc).unwrap(), (Mapping::Zero, sc));
        assert_eq!(map_l2_entry(&g, host, bitmap, 0, 3 * sc + 5).unwrap(), (Mapping::Unallocated, 65536 - 3 * sc - 5));
        assert!(map_l2_entry(&g, host, 1 | 1 << 32, 0, 0).is_err(), "allocated and zero at once");
        assert!(map_l2_entry(&g, 0, 1, 0, 0).is_err(), "allocated without host");
    }

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 4096];
            let max = refcount_max(order);
            let entries = 4096 * 8 / (1u64 << order);
            for i in [0, 1, 2, 7, entries - 1] {
                let v = (i + 1).min(max);
                refcount_set(&mut block, order, i, v);
                assert_eq!(refcount_get(&block, order, i), v, "order {order} index {i}");
            }
            assert_eq!(refcount_get(&block, order, 3), 0);
        }
    }

    #[test]
    fn sub_byte_refcounts_start_at_the_least_significant_bit() {
        let mut block = vec![0u8; 1];
        refcount_set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        refcount_set(&mut block, 0, 3, 1);
        assert_eq!(block[0], 0b0000_1001);
    }
}
