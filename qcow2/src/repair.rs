//! Counting every reference the mapping metadata makes, and the two things built on it:
//! checking the refcounts against the references (what `qemu-img check` does), and rebuilding
//! refcounts for images whose dirty bit says they may be stale (qemu's lazy refcounts after a
//! crash).
//!
//! Every cluster the image references is counted — header, L1 table, L2 tables, data and
//! compressed clusters — and a brand-new refcount table and blocks are written at the end of the
//! file. Only once they are durable does the header switch to them and drop the dirty bit; a
//! crash before that leaves the old (dirty) state, so the repair simply runs again. The old
//! table and blocks become unreferenced clusters with refcount 0.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::header::{incompatible, Header};
use crate::layout::{self, Geometry, Mapping};

/// Largest image (in clusters) we rebuild in memory (counts take 4 bytes per cluster).
const MAX_REPAIR_CLUSTERS: u64 = 1 << 27;

struct Counts {
    counts: Vec<u32>,
    cluster_bits: u32,
}

impl Counts {
    fn add_range(&mut self, offset: u64, length: u64, what: &'static str) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let Some(end) = offset.checked_add(length.max(1) - 1) else {
            return Err(Error::InvalidEntry { table: what, index: first, value: offset, reason: "range overflows" });
        };
        let last = end >> self.cluster_bits;
        if last >= MAX_REPAIR_CLUSTERS {
            return Err(Error::InvalidEntry {
                table: what,
                index: first,
                value: offset,
                reason: "points beyond what can be repaired",
            });
        }
        if last as usize >= self.counts.len() {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            if let Some(n) = self.counts.get_mut(c as usize) {
                *n = n.saturating_add(1);
            }
        }
        Ok(())
    }
}

fn read(file: &File, len: u64, offset: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).map_err(Error::io("read", offset))?;
    Ok(buf)
}

/// Count the references the header, L1 and L2 tables make to each host cluster.
fn count_references(file: &File, header: &Header, l1: &[u64], file_len: u64) -> Result<Counts> {
    let bits = header.cluster_bits;
    let cs = 1u64 << bits;
    let n = file_len.div_ceil(cs);
    if n > MAX_REPAIR_CLUSTERS {
        return Err(Error::Unsupported(format!("repairing refcounts of a {n}-cluster image")));
    }
    let geo =
        Geometry { cluster_bits: bits, extended_l2: header.extended_l2(), v3: header.version == 3, size: header.size };
    let mut c = Counts { counts: vec![0; n as usize], cluster_bits: bits };
    c.add_range(0, cs, "header")?;
    c.add_range(header.l1_table_offset, u64::from(header.l1_size) * 8, "L1 table")?;
    let words = if geo.extended_l2 { 2 } else { 1 };
    for (i, &e) in l1.iter().enumerate() {
        let l2 = layout::l1_entry_offset(e, i as u64, bits)?;
        if l2 == 0 {
            continue;
        }
        c.add_range(l2, cs, "L1")?;
        let raw = read(file, cs, l2)?;
        let table: Vec<u64> =
            raw.chunks_exact(8).map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default())).collect();
        for (j, pair) in table.chunks_exact(words).enumerate() {
            let entry = pair.first().copied().unwrap_or(0);
            let bitmap = pair.get(1).copied().unwrap_or(0);
            let index = i as u64 * geo.l2_entries() + j as u64;
            match layout::map_l2_entry(&geo, entry, bitmap, index, 0)? {
                (Mapping::Compressed { host, length }, _) => c.add_range(host & !511, length + (host & 511), "L2")?,
                _ => {
                    let host = entry & layout::OFFSET_MASK;
                    if host != 0 && entry & layout::COMPRESSED == 0 {
                        c.add_range(host, cs, "L2")?;
                    }
                }
            }
        }
    }
    Ok(c)
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Host clusters examined (the file's length in clusters, or further if referenced).
    pub clusters: u64,
    /// Clusters whose refcount is higher than their references (space lost, data safe).
    pub leaks: u64,
    /// Clusters referenced more often than their refcount says (an allocation could reuse
    /// them: data at risk).
    pub corruptions: u64,
    /// The first few problems, for the log and the API.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// No corruption and no leak.
    pub fn is_clean(&self) -> bool {
        self.leaks == 0 && self.corruptions == 0
    }
}

/// Compare every cluster's refcount with the references to it.
pub(crate) fn check(file: &File, header: &Header, l1: &[u64], file_len: u64) -> Result<CheckReport> {
    if header.nb_snapshots > 0 {
        return Err(Error::Unsupported("checking images with internal snapshots".into()));
    }
    let mut refs = count_references(file, header, l1, file_len)?;
    let cs = 1u64 << header.cluster_bits;
    // The refcount structures reference themselves.
    refs.add_range(header.refcount_table_offset, u64::from(header.refcount_table_clusters) * cs, "refcount table")?;
    let mut refcounts = crate::refcount::Refcounts::load(file, header, file_len)?;
    for block in refcounts.block_offsets() {
        refs.add_range(block, cs, "refcount table")?;
    }
    let clusters = (refs.counts.len() as u64).max(file_len.div_ceil(cs));
    let mut report = CheckReport { clusters, ..CheckReport::default() };
    for i in 0..clusters {
        let references = u64::from(refs.counts.get(i as usize).copied().unwrap_or(0));
        let refcount = refcounts.get(file, i)?;
        if refcount == references {
            continue;
        }
        if refcount < references {
            report.corruptions += 1;
        } else {
            report.leaks += 1;
        }
        if report.problems.len() < 16 {
            let kind = if refcount < references { "ERROR" } else { "Leaked" };
            report
                .problems
                .push(format!("{kind} cluster {i} (host {:#x}): refcount={refcount} references={references}", i * cs));
        }
    }
    Ok(report)
}

/// Rebuild the refcounts of the image in `file`, updating `header` in memory and on disk.
pub(crate) fn rebuild(file: &File, header: &mut Header, l1: &[u64], file_len: u64) -> Result<()> {
    if header.nb_snapshots > 0 {
        return Err(Error::Unsupported("repairing refcounts of images with internal snapshots".into()));
    }
    let bits = header.cluster_bits;
    let cs = 1u64 << bits;
    let n = file_len.div_ceil(cs);
    let mut c = count_references(file, header, l1, file_len)?;
    // A new refcount table and blocks after everything else.
    let order = header.refcount_order;
    let per = (cs * 8) >> order;
    let start = c.counts.len() as u64;
    let (mut blocks, mut table_clusters) = (1u64, 1u64);
    loop {
        let total = start + table_clusters + blocks;
        let b = total.div_ceil(per);
        let t = (b * 8).div_ceil(cs);
        if b == blocks && t == table_clusters {
            break;
        }
        blocks = b;
        table_clusters = t;
    }
    if table_clusters * cs > crate::header::MAX_REFTABLE_BYTES {
        return Err(Error::Unsupported("repaired refcount table would exceed 8 MiB".into()));
    }
    c.add_range(start << bits, (table_clusters + blocks) << bits, "refcount structures")?;
    let max = layout::refcount_max(order);
    if let Some(i) = c.counts.iter().position(|&v| u64::from(v) > max) {
        return Err(Error::Unsupported(format!(
            "cluster {i} is referenced more often than {}-bit refcounts hold",
            1u64 << order
        )));
    }
    let first_block = start + table_clusters;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per {
            let cluster = b * per + i;
            let v = c.counts.get(cluster as usize).copied().unwrap_or(0);
            if v != 0 {
                layout::refcount_set(&mut block, order, i, u64::from(v));
            }
        }
        let at = (first_block + b) << bits;
        file.write_all_at(&block, at).map_err(Error::io("write refcount block", at))?;
        if let Some(e) = table.get_mut((b * 8) as usize..(b * 8 + 8) as usize) {
            e.copy_from_slice(&at.to_be_bytes());
        }
    }
    let table_offset = start << bits;
    file.write_all_at(&table, table_offset).map_err(Error::io("write refcount table", table_offset))?;
    file.sync_data().map_err(Error::io("fdatasync", 0))?;
    let mut head = Vec::with_capacity(12);
    head.extend_from_slice(&table_offset.to_be_bytes());
    head.extend_from_slice(&(table_clusters as u32).to_be_bytes());
    file.write_all_at(&head, 48).map_err(Error::io("write header", 48))?;
    let features = header.incompatible_features & !incompatible::DIRTY;
    file.write_all_at(&features.to_be_bytes(), 72).map_err(Error::io("write header", 72))?;
    file.sync_data().map_err(Error::io("fdatasync", 0))?;
    header.refcount_table_offset = table_offset;
    header.refcount_table_clusters = table_clusters as u32;
    header.incompatible_features = features;
    tracing::debug!(clusters = n, "refcounts rebuilt");
    Ok(())
}
