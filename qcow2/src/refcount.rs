//! Host cluster accounting: the refcount table, refcount blocks, and the allocator.
//!
//! Crash safety rests on two rules. (1) Clusters are only ever taken from the end of the file
//! (`next_cluster`), never reused within a session, so a stale pointer can only ever see old
//! data or zeroes, and a new L2 table never holds leftovers. (2) Refcounts are *reserved* ahead
//! in batches: set to 1 and `fdatasync`ed before any L2 or L1 entry may point at those clusters,
//! so whatever order the disk persists the rest in, no referenced cluster has refcount 0. A
//! crash leaks at most the unused part of the batch (what `qemu-img check` calls leaks, exit 3),
//! never corrupts. A clean [`Refcounts::release`] gives the unused reservation back.
//!
//! All updates are write-through: a refcount block is patched in memory and the changed bytes
//! written at once; the refcount table grows (copied to the end of the file, made durable, then
//! the header switched over) when a new block falls past its end.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::header::{Header, MAX_REFTABLE_BYTES};
use crate::layout;

/// Bytes reserved per batch at most (and the granularity of refcount durability barriers: one
/// `fdatasync` per batch, like qemu's one per new L2 table).
const MAX_BATCH_BYTES: u64 = 1 << 30;
/// Refcount blocks kept in memory at most.
const MAX_CACHED_BLOCKS: usize = 256;

pub(crate) struct Refcounts {
    order: u32,
    cluster_bits: u32,
    table_offset: u64,
    table: Vec<u64>,
    blocks: HashMap<u64, Vec<u8>>,
    /// First cluster index never handed out.
    pub next_cluster: u64,
    /// Clusters whose refcount is already 1 (durably) and that are not used yet.
    reserved: std::ops::Range<u64>,
    /// Bytes to reserve next time.
    batch_bytes: u64,
}

fn be64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect()
}

impl Refcounts {
    pub fn load(file: &File, header: &Header, file_len: u64) -> Result<Self> {
        let cluster = 1u64 << header.cluster_bits;
        let bytes = u64::from(header.refcount_table_clusters) * cluster;
        if header.refcount_table_offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(Error::InvalidHeader {
                field: "refcount_table_offset",
                value: header.refcount_table_offset,
                reason: "refcount table lies past the end of the file",
            });
        }
        let mut raw = vec![0u8; bytes as usize];
        crate::image::read_or_zero(file, &mut raw, header.refcount_table_offset)?;
        let table = be64s(&raw);
        for (i, e) in table.iter().enumerate() {
            if e & (cluster - 1) != 0 {
                return Err(Error::InvalidEntry {
                    table: "refcount table",
                    index: i as u64,
                    value: *e,
                    reason: "refcount block is not cluster aligned",
                });
            }
        }
        Ok(Self {
            order: header.refcount_order,
            cluster_bits: header.cluster_bits,
            table_offset: header.refcount_table_offset,
            table,
            blocks: HashMap::new(),
            next_cluster: file_len.div_ceil(cluster),
            reserved: 0..0,
            // The first reservation is taken before anything is dirty, so its fdatasync is cheap:
            // make it large (16 Ki clusters, at most 1 GiB) so a whole copy rarely needs another.
            batch_bytes: (16384u64 << header.cluster_bits).min(MAX_BATCH_BYTES),
        })
    }

    fn cluster(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        (self.cluster() * 8) >> self.order
    }

    fn block(&mut self, file: &File, offset: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&offset) {
            if self.blocks.len() >= MAX_CACHED_BLOCKS {
                // Write-through: every cached block is clean, any can go.
                if let Some(k) = self.blocks.keys().next().copied() {
                    self.blocks.remove(&k);
                }
            }
            let mut raw = vec![0u8; self.cluster() as usize];
            crate::image::read_or_zero(file, &mut raw, offset)?;
            self.blocks.insert(offset, raw);
        }
        self.blocks.get_mut(&offset).ok_or(Error::Unsupported("refcount block cache".into()))
    }

    /// Host offsets of the refcount blocks the table points to.
    pub fn block_offsets(&self) -> Vec<u64> {
        self.table.iter().copied().filter(|&o| o != 0).collect()
    }

    /// Refcount of host cluster `index`.
    pub fn get(&mut self, file: &File, index: u64) -> Result<u64> {
        let per = self.per_block();
        let Some(&block) = self.table.get((index / per) as usize) else { return Ok(0) };
        if block == 0 {
            return Ok(0);
        }
        let order = self.order;
        Ok(layout::refcount_get(self.block(file, block)?, order, index % per))
    }

    /// Set the refcounts of clusters `[start, start + count)` to `value`, allocating refcount
    /// blocks (and growing the table) as needed. Writes through.
    pub fn set_range(&mut self, file: &File, start: u64, count: u64, value: u64) -> Result<()> {
        if value > layout::refcount_max(self.order) {
            return Err(Error::Unsupported(format!("refcount {value} exceeds the {}-bit width", 1u64 << self.order)));
        }
        let per = self.per_block();
        let mut i = start;
        let end = start + count;
        while i < end {
            let table_index = i / per;
            let block_offset = self.ensure_block(file, table_index)?;
            let stop = end.min((table_index + 1) * per);
            let order = self.order;
            let block = self.block(file, block_offset)?;
            let mut lo = usize::MAX;
            let mut hi = 0;
            for c in i..stop {
                let r = layout::refcount_set(block, order, c % per, value);
                lo = lo.min(r.start);
                hi = hi.max(r.end);
            }
            if let Some(bytes) = block.get(lo..hi) {
                file.write_all_at(bytes, block_offset + lo as u64)
                    .map_err(Error::io("write refcount block", block_offset))?;
            }
            i = stop;
        }
        Ok(())
    }

    /// The offset of refcount block `table_index`, allocating it (and growing the table) first.
    fn ensure_block(&mut self, file: &File, table_index: u64) -> Result<u64> {
        if table_index >= self.table.len() as u64 {
            self.grow_table(file, table_index + 1)?;
        }
        let existing = self.table.get(table_index as usize).copied().unwrap_or(0);
        if existing != 0 {
            return Ok(existing);
        }
        let cluster_index = self.next_cluster;
        self.next_cluster += 1;
        let offset = cluster_index << self.cluster_bits;
        let zero = vec![0u8; self.cluster() as usize];
        file.write_all_at(&zero, offset).map_err(Error::io("write refcount block", offset))?;
        self.blocks.insert(offset, zero);
        if let Some(e) = self.table.get_mut(table_index as usize) {
            *e = offset;
        }
        let at = self.table_offset + table_index * 8;
        file.write_all_at(&offset.to_be_bytes(), at).map_err(Error::io("write refcount table", at))?;
        // The new block's own cluster needs a refcount (possibly in itself).
        self.set_range(file, cluster_index, 1, 1)?;
        Ok(offset)
    }

    fn grow_table(&mut self, file: &File, min_entries: u64) -> Result<()> {
        let cluster = self.cluster();
        let old_offset = self.table_offset;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(cluster);
        let entries = min_entries.max(self.table.len() as u64 * 2).max(cluster / 8);
        let clusters = (entries * 8).div_ceil(cluster);
        if clusters * cluster > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported("the refcount table would exceed qemu's 8 MiB limit".into()));
        }
        let first = self.next_cluster;
        self.next_cluster += clusters;
        self.table_offset = first << self.cluster_bits;
        self.table.resize((clusters * cluster / 8) as usize, 0);
        // Refcounts for the new table itself (may allocate blocks, recorded in the new table).
        self.set_range(file, first, clusters, 1)?;
        let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&raw, self.table_offset).map_err(Error::io("write refcount table", self.table_offset))?;
        file.sync_data().map_err(Error::io("fdatasync", 0))?;
        let mut head = Vec::with_capacity(12);
        head.extend_from_slice(&self.table_offset.to_be_bytes());
        head.extend_from_slice(&(clusters as u32).to_be_bytes());
        file.write_all_at(&head, 48).map_err(Error::io("write header", 48))?;
        file.sync_data().map_err(Error::io("fdatasync", 0))?;
        let old_first = old_offset >> self.cluster_bits;
        for c in old_first..old_first + old_clusters {
            let r = self.get(file, c)?;
            self.set_range(file, c, 1, r.saturating_sub(1))?;
        }
        tracing::debug!(clusters, "refcount table grown");
        Ok(())
    }

    /// Clusters that can be handed out before the next reservation (and its `fdatasync`).
    pub fn reserved_left(&self) -> u64 {
        self.reserved.end - self.reserved.start
    }

    /// Take one fresh cluster (refcount already 1 and durable); returns its host offset.
    pub fn alloc(&mut self, file: &File) -> Result<u64> {
        self.alloc_run(file, 1).map(|(offset, _)| offset)
    }

    /// Take up to `max` contiguous fresh clusters; returns the host offset and how many.
    pub fn alloc_run(&mut self, file: &File, max: u64) -> Result<(u64, u64)> {
        if self.reserved.is_empty() {
            let count = (self.batch_bytes >> self.cluster_bits).max(1);
            let start = self.next_cluster;
            self.next_cluster += count;
            self.set_range(file, start, count, 1)?;
            file.sync_data().map_err(Error::io("fdatasync", 0))?;
            self.reserved = start..start + count;
            self.batch_bytes = (self.batch_bytes * 2).min(MAX_BATCH_BYTES);
        }
        let c = self.reserved.start;
        let n = max.max(1).min(self.reserved.end - c);
        self.reserved.start += n;
        Ok((c << self.cluster_bits, n))
    }

    /// Drop one reference to each host cluster overlapping `[offset, offset + length)`;
    /// clusters that reach zero are punched out of the file.
    pub fn free(&mut self, file: &File, offset: u64, length: u64) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let last = (offset + length.max(1) - 1) >> self.cluster_bits;
        for c in first..=last {
            let r = self.get(file, c)?;
            if r == 0 {
                return Err(Error::InvalidEntry {
                    table: "refcount",
                    index: c,
                    value: 0,
                    reason: "freeing a cluster whose refcount is already 0",
                });
            }
            self.set_range(file, c, 1, r - 1)?;
            if r == 1 {
                let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                // Returning space is best effort: a filesystem without hole punching keeps it.
                let _ = rustix::fs::fallocate(file, flags, c << self.cluster_bits, self.cluster());
            }
        }
        Ok(())
    }

    /// Give back the reserved clusters that were never used, and the disk space the file may
    /// already hold for them (direct writes grow the file ahead: `Image::write_data`).
    pub fn release(&mut self, file: &File) -> Result<()> {
        let unused = std::mem::replace(&mut self.reserved, 0..0);
        if !unused.is_empty() {
            self.set_range(file, unused.start, unused.end - unused.start, 0)?;
            let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            let (at, len) = (unused.start << self.cluster_bits, (unused.end - unused.start) << self.cluster_bits);
            // Best effort, like freeing: a filesystem without hole punching keeps the space.
            let _ = rustix::fs::fallocate(file, flags, at, len);
            if unused.end == self.next_cluster {
                // Nothing was handed out past them: never referenced, they are free to take again.
                self.next_cluster = unused.start;
            }
        }
        Ok(())
    }

    /// Where the file may end: no cluster at or past it was ever handed out or reserved.
    pub fn end_of_clusters(&self) -> u64 {
        self.next_cluster << self.cluster_bits
    }
}
