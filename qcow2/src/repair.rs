//! Counting every reference the mapping metadata makes, and the two things built on it:
//! checking the refcounts against the references (what `qemu-img check` does), and rebuilding
//! refcounts for images whose dirty bit says they may be stale (qemu's lazy refcounts after a
//! crash).
//!
//! Every cluster the image references is counted — header, L1 table, L2 tables, data and
//! compressed clusters — and a brand-new refcount table and blocks are written at the end of the
//! file. The counts are kept for one window of host clusters at a time ([`WINDOW_CLUSTERS`], 4 TiB
//! of 64 KiB clusters in 256 MiB), the metadata read again for each further window: a check or a
//! repair of an image of any size holds bounded memory, where one count per cluster of the whole
//! file refused images past 8 TiB (a backup of a large disk could not be verified). Only once they are durable does the header switch to them and drop the dirty bit; a
//! crash before that leaves the old (dirty) state, so the repair simply runs again. The old
//! table and blocks become unreferenced clusters with refcount 0.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::header::{incompatible, Header};
use crate::layout::{self, Geometry, Mapping};

/// Host clusters counted in one pass over the metadata: 4 bytes each, so at most 256 MiB of
/// counts, the references into 4 TiB of a file of 64 KiB clusters. A larger file is counted in
/// several passes, each reading the L2 tables again (from the page cache, after the first): the
/// memory a check or repair takes stays bounded whatever the image's size, where one count for
/// the whole file would need 4 bytes for every cluster of a 60 TiB disk at once.
pub(crate) const WINDOW_CLUSTERS: u64 = 1 << 26;

/// How far past the end of the file references may point: an L2 entry can reach the disk before
/// the data write that extends the file (a host crash loses the data, not the entry). A gigabyte
/// is far more than the writes in flight at once, and bounds what a hostile entry can make the
/// counts take (8 MiB for 512-byte clusters).
const PAST_END_BYTES: u64 = 1 << 30;

/// The references counted for one window of host clusters, `[first, first + window)`.
struct Counts {
    first: u64,
    window: u64,
    /// Counts of clusters from `first` on, grown as references reach further into the window.
    counts: Vec<u32>,
    cluster_bits: u32,
    /// References to clusters at or past this one are refused: further past the end of the file
    /// than writes cut by a crash leave them ([`PAST_END_BYTES`]), so a hostile entry can make
    /// neither the counts grow nor the passes run on.
    limit: u64,
    /// One past the furthest cluster referenced, in or out of the window.
    end: u64,
}

impl Counts {
    fn add_range(&mut self, offset: u64, length: u64, what: &'static str) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let Some(end) = offset.checked_add(length.max(1) - 1) else {
            return Err(Error::InvalidEntry { table: what, index: first, value: offset, reason: "range overflows" });
        };
        let last = end >> self.cluster_bits;
        if last >= self.limit {
            return Err(Error::InvalidEntry {
                table: what,
                index: first,
                value: offset,
                reason: "points too far beyond the end of the file",
            });
        }
        self.end = self.end.max(last + 1);
        let from = first.max(self.first);
        let to = last.min(self.first + self.window - 1);
        if from > to {
            return Ok(());
        }
        let needed = (to - self.first + 1) as usize;
        if needed > self.counts.len() {
            self.counts.resize(needed, 0);
        }
        for c in from..=to {
            if let Some(n) = self.counts.get_mut((c - self.first) as usize) {
                *n = n.saturating_add(1);
            }
        }
        Ok(())
    }

    /// The references to host cluster `index` (which must lie in the window).
    fn get(&self, index: u64) -> u64 {
        index.checked_sub(self.first).and_then(|i| self.counts.get(i as usize)).map_or(0, |&v| u64::from(v))
    }
}

fn read(file: &File, len: u64, offset: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).map_err(Error::io("read", offset))?;
    Ok(buf)
}

/// Count the references the header, L1 and L2 tables make to each host cluster of the window
/// `[first, first + window)`; [`Counts::end`] covers the whole file.
fn count_references(
    file: &File,
    header: &Header,
    l1: &[u64],
    file_len: u64,
    first: u64,
    window: u64,
) -> Result<Counts> {
    let bits = header.cluster_bits;
    let cs = 1u64 << bits;
    let n = file_len.div_ceil(cs);
    let len = n.saturating_sub(first).min(window) as usize;
    let limit = n.saturating_add((PAST_END_BYTES >> bits).max(1));
    let mut c = Counts { first, window, counts: vec![0; len], cluster_bits: bits, limit, end: n };
    let geo =
        Geometry { cluster_bits: bits, extended_l2: header.extended_l2(), v3: header.version == 3, size: header.size };
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
    check_in_windows(file, header, l1, file_len, WINDOW_CLUSTERS)
}

/// [`check`], counting `window` host clusters per pass.
fn check_in_windows(file: &File, header: &Header, l1: &[u64], file_len: u64, window: u64) -> Result<CheckReport> {
    if header.nb_snapshots > 0 {
        return Err(Error::Unsupported("checking images with internal snapshots".into()));
    }
    let cs = 1u64 << header.cluster_bits;
    let mut refcounts = crate::refcount::Refcounts::load(file, header, file_len)?;
    // The refcount structures reference themselves.
    let mut own = vec![(header.refcount_table_offset, u64::from(header.refcount_table_clusters) * cs)];
    own.extend(refcounts.block_offsets().into_iter().map(|block| (block, cs)));
    let mut report = CheckReport::default();
    let mut first = 0;
    loop {
        let mut refs = count_references(file, header, l1, file_len, first, window)?;
        for &(at, len) in &own {
            refs.add_range(at, len, "refcount table")?;
        }
        report.clusters = refs.end;
        let to = refs.end.min(first + window);
        for i in first..to {
            let references = refs.get(i);
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
                report.problems.push(format!(
                    "{kind} cluster {i} (host {:#x}): refcount={refcount} references={references}",
                    i * cs
                ));
            }
        }
        first = to;
        if first >= refs.end {
            return Ok(report);
        }
    }
}

/// Rebuild the refcounts of the image in `file`, updating `header` in memory and on disk.
pub(crate) fn rebuild(file: &File, header: &mut Header, l1: &[u64], file_len: u64) -> Result<()> {
    rebuild_in_windows(file, header, l1, file_len, WINDOW_CLUSTERS)
}

/// [`rebuild`], counting about `window` host clusters per pass (whole refcount blocks).
fn rebuild_in_windows(file: &File, header: &mut Header, l1: &[u64], file_len: u64, window: u64) -> Result<()> {
    if header.nb_snapshots > 0 {
        return Err(Error::Unsupported("repairing refcounts of images with internal snapshots".into()));
    }
    let bits = header.cluster_bits;
    let cs = 1u64 << bits;
    let n = file_len.div_ceil(cs);
    let order = header.refcount_order;
    let per = (cs * 8) >> order;
    // Each window fills whole refcount blocks.
    let window = window.max(1).div_ceil(per) * per;
    let mut c = count_references(file, header, l1, file_len, 0, window)?;
    // A new refcount table and blocks after everything else.
    let start = c.end;
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
    let total = start + table_clusters + blocks;
    let max = layout::refcount_max(order);
    let first_block = start + table_clusters;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    let mut first = 0;
    loop {
        // The new structures are ours, wherever they lie.
        c.limit = u64::MAX;
        c.add_range(start << bits, (table_clusters + blocks) << bits, "refcount structures")?;
        if let Some(i) = c.counts.iter().position(|&v| u64::from(v) > max) {
            return Err(Error::Unsupported(format!(
                "cluster {} is referenced more often than {}-bit refcounts hold",
                first + i as u64,
                1u64 << order
            )));
        }
        let to = total.min(first + window);
        for b in first / per..to.div_ceil(per) {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per {
                let v = c.get(b * per + i);
                if v != 0 {
                    layout::refcount_set(&mut block, order, i, v);
                }
            }
            let at = (first_block + b) << bits;
            file.write_all_at(&block, at).map_err(Error::io("write refcount block", at))?;
            if let Some(e) = table.get_mut((b * 8) as usize..(b * 8 + 8) as usize) {
                e.copy_from_slice(&at.to_be_bytes());
            }
        }
        first = to;
        if first >= total {
            break;
        }
        // The last window's counts go before the next window's are made.
        c.counts = Vec::new();
        c = count_references(file, header, l1, file_len, first, window)?;
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

#[cfg(test)]
mod tests {
    //! The passes over windows of host clusters must find what one pass over the whole file
    //! finds, and a rebuild in windows must leave the image as one in a single pass would. Images
    //! of 512-byte clusters (256 refcounts per block) make many windows of a small file.

    use super::*;
    use crate::{CreateOptions, Image, ImageOptions};

    /// An image of 512-byte clusters with data scattered over 1 MiB, closed: some 16 000 host
    /// clusters (most of them the refcount reservation a close gives back), 64 refcount blocks.
    fn scattered(path: &std::path::Path) {
        let image = Image::create(path, &CreateOptions::new(4 << 20).cluster_bits(9)).unwrap();
        for i in 0..150u64 {
            image.write_at(&[i as u8 + 1; 3000], i * 7000).unwrap();
        }
        image.close().unwrap();
    }

    /// [`scattered`] as `a.qcow2` in `dir`, and its [`parts`].
    fn scattered_in(dir: &std::path::Path) -> (std::path::PathBuf, (File, Header, Vec<u64>, u64)) {
        let path = dir.join("a.qcow2");
        scattered(&path);
        let parts = parts(&path);
        (path, parts)
    }

    /// The file, header and L1 table of the image at `path`.
    fn parts(path: &std::path::Path) -> (File, Header, Vec<u64>, u64) {
        let header = Image::open(path).unwrap().header().clone();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut raw, header.l1_table_offset).unwrap();
        let l1 = raw.chunks_exact(8).map(|w| u64::from_be_bytes(w.try_into().unwrap())).collect();
        let len = file.metadata().unwrap().len();
        (file, header, l1, len)
    }

    /// Set host cluster `index`'s refcount to `value`, through the refcount table.
    fn set_refcount(path: &std::path::Path, index: u64, value: u64) {
        let (file, header, _, len) = parts(path);
        let mut refcounts = crate::refcount::Refcounts::load(&file, &header, len).unwrap();
        refcounts.set_range(&file, index, 1, value).unwrap();
    }

    fn content(path: &std::path::Path) -> Vec<u8> {
        let image = Image::open(path).unwrap();
        let mut all = vec![0u8; image.size() as usize];
        image.read_at(&mut all, 0).unwrap();
        all
    }

    #[test]
    fn a_check_in_windows_finds_what_one_pass_finds() {
        let dir = tempfile::tempdir().unwrap();
        let (path, (file, header, l1, len)) = scattered_in(dir.path());
        let whole = check_in_windows(&file, &header, &l1, len, WINDOW_CLUSTERS).unwrap();
        assert!(whole.is_clean() && whole.clusters > 1000, "{whole:?}");
        // Two data clusters made to leak and to be corrupt, and two clusters past the end of the
        // file counted but never used (what a cut reservation leaves).
        let data = l1.iter().find(|&&e| e != 0).map(|&e| {
            let mut entry = [0u8; 8];
            file.read_exact_at(&mut entry, (e & layout::OFFSET_MASK) + 8).unwrap();
            (u64::from_be_bytes(entry) & layout::OFFSET_MASK) >> 9
        });
        let data = data.unwrap();
        set_refcount(&path, data, 2);
        set_refcount(&path, data + 1, 0);
        file.set_len(len + 2 * 512).unwrap();
        set_refcount(&path, len / 512, 1);
        set_refcount(&path, len / 512 + 1, 1);
        let (file, header, l1, len) = parts(&path);
        let whole = check_in_windows(&file, &header, &l1, len, WINDOW_CLUSTERS).unwrap();
        assert_eq!((whole.leaks, whole.corruptions), (3, 1), "{whole:?}");
        for window in [1, 7, 255, 256, 1000] {
            let windowed = check_in_windows(&file, &header, &l1, len, window).unwrap();
            assert_eq!(windowed, whole, "window of {window} clusters");
        }
    }

    #[test]
    fn a_rebuild_in_windows_reclaims_leaks_and_keeps_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.qcow2");
        scattered(&first);
        let want = content(&first);
        let len = std::fs::metadata(&first).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(len + 3 * 512).unwrap();
        set_refcount(&first, len / 512 + 2, 1);
        for window in [1, 256, 300, 5000] {
            let path = dir.path().join(format!("w{window}.qcow2"));
            std::fs::copy(&first, &path).unwrap();
            let (file, mut header, l1, len) = parts(&path);
            assert_eq!(check_in_windows(&file, &header, &l1, len, WINDOW_CLUSTERS).unwrap().leaks, 1);
            rebuild_in_windows(&file, &mut header, &l1, len, window).unwrap();
            let (file, header, l1, len) = parts(&path);
            let report = check_in_windows(&file, &header, &l1, len, WINDOW_CLUSTERS).unwrap();
            assert!(report.is_clean(), "window of {window} clusters: {report:?}");
            let qemu = std::process::Command::new("qemu-img").arg("check").arg(&path).output();
            let qemu = qemu.expect("qemu-img is required; scripts/test.sh installs it");
            assert!(qemu.status.success(), "window of {window}: {}", String::from_utf8_lossy(&qemu.stdout));
            assert!(content(&path) == want, "window of {window} clusters: the content changed");
            // And the image takes writes after it, as a resumed run makes them.
            let image = Image::open_with(&path, &ImageOptions::read_write()).unwrap();
            image.write_at(&[0xee; 5000], 3 << 20).unwrap();
            image.close().unwrap();
            drop(image);
            assert!(Image::open(&path).unwrap().check().unwrap().is_clean(), "window of {window} clusters");
        }
    }

    #[test]
    fn a_reference_far_past_the_end_of_the_file_is_refused_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, (file, header, l1, len)) = scattered_in(dir.path());
        let l2 = l1.iter().find(|&&e| e != 0).map(|&e| e & layout::OFFSET_MASK).unwrap();
        // A data cluster at 512 TiB.
        file.write_all_at(&((1u64 << 49) | layout::COPIED).to_be_bytes(), l2).unwrap();
        let err = check_in_windows(&file, &header, &l1, len, WINDOW_CLUSTERS).unwrap_err();
        assert!(err.to_string().contains("too far beyond the end of the file"), "{err}");
    }
}
