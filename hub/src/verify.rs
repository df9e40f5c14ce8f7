//! Verifying a disk image: its refcounts against its metadata ([`qcow2::Image::check`]) and its
//! content against the checksum the node computed while sending (re-read through the backing
//! chain, hashed block by block exactly as the node did). Blocking: run it on the blocking pool.
//!
//! It is on the path of every backup (a job completes only verified), so it reads no more than
//! it must: blocks the allocation map says read as zeroes are not read (their hash is known),
//! the blocks that are read are hashed on several threads, and an incremental whose parent left
//! its block hashes (`disk-KEY.blocks`, written when the parent was verified) re-reads only the
//! blocks its own layer holds: the rest of its content is the parent's, already verified, in
//! files nothing writes again. `POST /backups/{id}/verify` still re-reads everything.

use std::ops::Range;
use std::path::Path;

use node::blockmap::{block_count, block_len, checksum_of_blocks, hash_block, BlockMap, BlockSet, Hash};

use crate::blockhashes;
use qcow2::{ExtentKind, Image};

/// Drop the page-cache pages of `path` and of its backing chain. With `cache = "none"` the hub
/// keeps backups out of the page cache; verifying re-reads them buffered (the kernel's read-ahead
/// makes that several times faster than `O_DIRECT` reads of one block at a time), and this gives
/// the pages back afterwards. Advisory: a file that cannot be opened is skipped.
pub fn forget_cached_chain(path: &Path) {
    let mut next = Some(path.to_path_buf());
    for _ in 0..=64 {
        let Some(at) = next.take() else { break };
        next = Image::open_with(&at, &crate::repo::image_options(&at, false))
            .ok()
            .and_then(|image| image.header().backing_file.clone())
            .map(|name| qcow2::image::resolve_backing(&at, &name));
        if let Ok(file) = std::fs::File::open(&at) {
            if let Err(e) = rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::DontNeed) {
                tracing::debug!(image = %at.display(), error = %e, "cannot drop cached pages");
            }
        }
    }
}

/// Threads hashing one disk.
fn hash_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(4)
}

/// What verify found for one disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskVerdict {
    /// Disk key.
    pub disk_key: u32,
    /// `clean`, or what `check` found.
    pub check: String,
    /// Whether the re-read content matches the node's checksum (`None`: no checksum known).
    pub checksum_match: Option<bool>,
    /// The checksum of the image as re-read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// The image's structure is sound: clean, or leaked clusters only.
    #[serde(skip)]
    pub sound: bool,
}

impl DiskVerdict {
    /// Sound and matching (or nothing to match). Leaked clusters (refcounted, referenced by
    /// nothing) are what a crash may leave (a qcow2 writer never corrupts, it may leak: the
    /// `qcow2` crate's refcount rules, and a killed `--cache=none` writer leaves the space it
    /// grew the file by): they cost space, never data, so they are reported in `check` and do
    /// not fail a verify, which would otherwise fail every later run of a replica kept in place.
    pub fn ok(&self) -> bool {
        self.sound && self.checksum_match != Some(false)
    }
}

/// Check `path` (a qcow2 image, or a raw replica by its `.raw` name) and compare its content
/// with `expected`, re-reading everything.
pub fn verify_disk(path: &Path, disk_key: u32, expected: Option<&str>) -> DiskVerdict {
    verify_disk_on(path, disk_key, expected, None).0
}

/// Verify a backup image just written, reusing the block hashes its backing file left
/// (`disk-KEY.blocks` beside it, `crate::blockhashes`) and leaving its own for its children.
pub fn verify_new_backup_disk(path: &Path, disk_key: u32, expected: Option<&str>) -> DiskVerdict {
    let parent = Image::open_with(path, &crate::repo::image_options(path, false))
        .ok()
        .and_then(|img| img.header().backing_file.clone())
        .and_then(|name| blockhashes::load_with_digest(&qcow2::image::resolve_backing(path, &name)).map(|p| (name, p)));
    let (name, parent, parent_digest) = match parent {
        Some((name, (map, digest))) => (Some(name), Some(map), Some(digest)),
        None => (None, None, None),
    };
    let (verdict, hashed) = verify_disk_on(path, disk_key, expected, parent);
    if let Some(Hashed { map, changed }) = hashed {
        let layer = match (name.as_deref(), parent_digest, changed) {
            (Some(name), Some(digest), Some(changed)) => Some((name, digest, changed)),
            _ => None,
        };
        if let Err(e) = blockhashes::save_layer(path, &map, layer) {
            // Only speed is lost: the next incremental re-reads its whole chain.
            tracing::warn!(image = %path.display(), error = %e, "cannot keep the block hashes");
        }
    }
    verdict
}

/// An image's block hashes (its content's, as a node computes them), and when they were made
/// from its parent's in place, the blocks where they differ from the parent's (the blocks its own
/// layer holds whose hash changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// The hashes.
    pub map: BlockMap,
    /// Where they differ from the parent's, when made from them.
    pub changed: Option<BlockSet>,
}

/// The same, trusting `parent` (the block hashes of the image's backing file, verified when it
/// was made) for every block this image's own layer does not hold; the parent's map is made into
/// this image's in place (so a verification holds one map of the disk, not two). Also returns
/// this image's block hashes when its content matched, for its own children.
pub fn verify_disk_on(
    path: &Path,
    disk_key: u32,
    expected: Option<&str>,
    parent: Option<BlockMap>,
) -> (DiskVerdict, Option<Hashed>) {
    if path.extension().is_some_and(|e| e == "raw") {
        let block = expected.and_then(node::blockmap::checksum_block_size).unwrap_or(64 << 10);
        let verdict = match file_checksum(path, block) {
            Ok(got) => DiskVerdict {
                disk_key,
                check: "clean".into(),
                checksum_match: expected.map(|want| want == got),
                checksum: Some(got),
                sound: true,
            },
            Err(e) => DiskVerdict {
                disk_key,
                check: format!("cannot read: {e}"),
                checksum_match: Some(false),
                checksum: None,
                sound: false,
            },
        };
        return (verdict, None);
    }
    let image = match Image::open_with(path, &crate::repo::image_options(path, false)) {
        Ok(i) => i,
        Err(e) => {
            let verdict = DiskVerdict {
                disk_key,
                check: format!("cannot open: {e}"),
                checksum_match: Some(false),
                checksum: None,
                sound: false,
            };
            return (verdict, None);
        }
    };
    let (check, sound) = match image.check() {
        Ok(r) if r.is_clean() => ("clean".to_string(), true),
        Ok(r) if r.corruptions == 0 => (
            format!("clean but for {} leaked clusters (space only; `qemu-img check -r leaks` reclaims it)", r.leaks),
            true,
        ),
        Ok(r) => (format!("{} leaked, {} corrupt clusters: {}", r.leaks, r.corruptions, r.problems.join("; ")), false),
        Err(e) => (format!("check failed: {e}"), false),
    };
    let block = expected.and_then(node::blockmap::checksum_block_size);
    let (checksum, checksum_match, map) = match (expected, block) {
        (Some(want), Some(bs)) => match image_block_map(&image, bs, parent) {
            Ok(hashed) => {
                let got = hashed.map.checksum();
                let matched = got == want;
                (Some(got), Some(matched), matched.then_some(hashed))
            }
            Err(e) => (Some(format!("read failed: {e}")), Some(false), None),
        },
        (Some(_), None) => (None, Some(false), None),
        (None, _) => (None, None, None),
    };
    (DiskVerdict { disk_key, check, checksum_match, checksum, sound }, map)
}

/// The node's checksum format over the image's content.
///
/// # Errors
/// A read failed.
pub fn image_checksum(image: &Image, block_size: u64) -> Result<String, qcow2::Error> {
    Ok(image_block_map(image, block_size, None)?.map.checksum())
}

/// Block hashes of the image's content: blocks that read as zeroes get the zero hash unread;
/// with `parent` (hashes of the backing file's content, same geometry), blocks this layer does
/// not touch keep the parent's, in the parent's map made into this one in place; the rest are
/// read and hashed on several threads, each hash written into the map in place. What this holds
/// besides the map (32 bytes a block: 128 MiB for the node's largest, 4 Mi blocks) is a range per
/// run of blocks to read, not an entry per block, and with a parent the parent's hashes of the
/// blocks this layer holds (to say which changed): a verification of a full disk once held three
/// times the map (the blocks to read, 8 bytes each, and their hashes with their index, 40 bytes
/// each, in vectors grown by doubling), one of an incremental twice (its parent's map beside).
///
/// # Errors
/// A read or the allocation map failed.
pub fn image_block_map(image: &Image, block_size: u64, parent: Option<BlockMap>) -> Result<Hashed, qcow2::Error> {
    let size = image.size();
    let parent =
        parent.filter(|p| p.disk_size == size && p.block_size == block_size && image.header().backing_file.is_some());
    let on_parent = parent.is_some();
    let mut map = parent.unwrap_or_else(|| BlockMap::zeroed(size, block_size));
    let n = block_count(size, block_size);
    let mut runs: Vec<Range<u64>> = Vec::new();
    for e in image.map(0, size)? {
        let must_read = match on_parent {
            true => e.depth == 0 && e.kind != ExtentKind::Unallocated,
            false => e.kind == ExtentKind::Data,
        };
        if must_read && e.length > 0 {
            let first = e.offset / block_size;
            let end = ((e.offset + e.length).div_ceil(block_size)).min(n);
            add_run(&mut runs, first..end);
        }
    }
    // The parent's hashes of the blocks about to be hashed again, in run order: which changed.
    let before: Vec<Hash> = match on_parent {
        true => runs.iter().flat_map(|r| blocks_of(&map.hashes, r)).copied().collect(),
        false => Vec::new(),
    };
    hash_runs(size, block_size, &runs, &mut map.hashes, |buf, at| image.read_at(buf, at))?;
    let changed = on_parent.then(|| {
        let mut changed = BlockSet::default();
        let now = runs.iter().flat_map(|r| r.clone().zip(blocks_of(&map.hashes, r)));
        for ((block, hash), was) in now.zip(&before) {
            if hash != was {
                changed.insert_run(block, 1);
            }
        }
        changed
    });
    Ok(Hashed { map, changed })
}

/// The hashes of the blocks of `run` (those `hashes` has).
fn blocks_of<'a>(hashes: &'a [Hash], run: &Range<u64>) -> &'a [Hash] {
    let len = hashes.len() as u64;
    let (start, end) = (run.start.min(len) as usize, run.end.min(len) as usize);
    hashes.get(start..end).unwrap_or_default()
}

/// Append `run` to ascending `runs`, joined to the last one when they touch or share a block
/// (two extents may end and begin in one block).
fn add_run(runs: &mut Vec<Range<u64>>, run: Range<u64>) {
    match runs.last_mut() {
        Some(last) if last.end >= run.start => last.end = last.end.max(run.end),
        _ if run.start < run.end => runs.push(run),
        _ => {}
    }
}

/// `runs` (ascending, disjoint) cut into pieces of `share` blocks each (the last one less),
/// each piece a list of ranges in the same order.
fn split_runs(runs: &[Range<u64>], share: u64) -> Vec<Vec<Range<u64>>> {
    let share = share.max(1);
    let mut pieces = Vec::new();
    let mut piece = Vec::new();
    let mut taken = 0;
    for run in runs {
        let mut start = run.start;
        while start < run.end {
            let take = (run.end - start).min(share - taken);
            piece.push(start..start + take);
            taken += take;
            start += take;
            if taken == share {
                pieces.push(std::mem::take(&mut piece));
                taken = 0;
            }
        }
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// Read and hash the blocks of `runs` (ascending, disjoint block ranges) into `hashes` (one per
/// block of the disk) on several threads, each taking a contiguous share of the blocks and the
/// part of `hashes` they fall in. Blocks past `hashes` are not read.
fn hash_runs<E: Send>(
    size: u64,
    block_size: u64,
    runs: &[Range<u64>],
    hashes: &mut [Hash],
    read: impl Fn(&mut [u8], u64) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let total: u64 = runs.iter().map(|r| r.end.saturating_sub(r.start)).sum();
    let threads = (hash_threads() as u64).min(total).max(1);
    let pieces = split_runs(runs, total.div_ceil(threads));
    let read = &read;
    std::thread::scope(|scope| {
        let mut rest = hashes;
        let mut rest_from = 0u64;
        let mut workers = Vec::new();
        for piece in pieces {
            let (Some(first), Some(last)) = (piece.first(), piece.last()) else { continue };
            let (from, to) = (first.start, last.end);
            // This piece's part of the hashes: blocks `from..to`, cut off the front of the rest.
            let skip = usize::try_from(from.saturating_sub(rest_from)).unwrap_or(usize::MAX).min(rest.len());
            let len = usize::try_from(to - from).unwrap_or(usize::MAX).min(rest.len() - skip);
            let (mine, after) = std::mem::take(&mut rest)[skip..].split_at_mut(len);
            (rest, rest_from) = (after, to);
            workers.push(scope.spawn(move || {
                let mut buf = vec![0u8; block_size as usize];
                for b in piece.iter().flat_map(Clone::clone) {
                    let Some(slot) = usize::try_from(b - from).ok().and_then(|i| mine.get_mut(i)) else { break };
                    let len = block_len(size, block_size, b) as usize;
                    let chunk = buf.get_mut(..len).unwrap_or_default();
                    read(chunk, b * block_size)?;
                    *slot = hash_block(chunk);
                }
                Ok(())
            }));
        }
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })
}

/// The node's checksum format over a raw file (every block read, on several threads).
///
/// # Errors
/// A read failed.
pub fn file_checksum(path: &Path, block_size: u64) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let n = block_count(size, block_size);
    let mut hashes = vec![Hash::default(); usize::try_from(n).map_err(std::io::Error::other)?];
    let every_block = 0..n;
    hash_runs(size, block_size, std::slice::from_ref(&every_block), &mut hashes, |buf, at| f.read_exact_at(buf, at))?;
    Ok(checksum_of_blocks(block_size, &hashes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2::{BackingFormat, CreateOptions, ImageOptions};

    const BS: u64 = 64 << 10;

    fn writable(path: &Path) -> Image {
        Image::open_with(path, &ImageOptions::read_write()).unwrap()
    }

    /// What the node computes: every block read and hashed.
    fn reread(path: &Path) -> String {
        let image = Image::open(path).unwrap();
        let size = image.size();
        let hashes: Vec<Hash> = (0..block_count(size, BS))
            .map(|b| {
                let mut buf = vec![0u8; block_len(size, BS, b) as usize];
                image.read_at(&mut buf, b * BS).unwrap();
                hash_block(&buf)
            })
            .collect();
        checksum_of_blocks(BS, &hashes)
    }

    #[test]
    fn an_incremental_verified_on_its_parents_hashes_equals_a_full_reread_and_catches_a_wrong_block() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("full/disk-2000.qcow2");
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        Image::create(&base, &CreateOptions::new(4 << 20)).unwrap();
        {
            let img = writable(&base);
            img.write_at(&[7u8; 100_000], 3 * BS + 5).unwrap();
            img.write_at(&[9u8; 4096], (4 << 20) - 4096).unwrap();
            img.close().unwrap();
        }
        let want = reread(&base);
        let v = verify_new_backup_disk(&base, 2000, Some(&want));
        assert!(v.ok(), "{v:?}");
        assert!(base.with_extension("blocks").exists(), "the full backup keeps its block hashes");

        let top = dir.path().join("incr/disk-2000.qcow2");
        std::fs::create_dir_all(top.parent().unwrap()).unwrap();
        Image::create(&top, &CreateOptions::overlay("../full/disk-2000.qcow2", BackingFormat::Qcow2)).unwrap();
        {
            let img = writable(&top);
            img.write_at(&[1u8; 10], 3 * BS + 70_000).unwrap();
            img.write_zeroes(40 * BS, BS).unwrap();
            img.close().unwrap();
        }
        let want = reread(&top);
        let parent = BlockMap::load(&base.with_extension("blocks")).unwrap();
        let (v, hashed) = verify_disk_on(&top, 2000, Some(&want), Some(parent.clone()));
        assert!(v.ok(), "{v:?}");
        let Hashed { map, changed } = hashed.unwrap();
        // The blocks where it differs from its parent's, as comparing the two maps finds them:
        // the one written into (block 4: 70 000 bytes into block 3 is past its end).
        let changed: Vec<u64> = changed.unwrap().iter().collect();
        let differs: Vec<u64> =
            (0u64..).zip(map.hashes.iter().zip(&parent.hashes)).filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
        assert_eq!(changed, differs, "the same as comparing the two maps");
        assert_eq!(changed, [4]);
        let map = Some(map);
        assert_eq!(verify_new_backup_disk(&top, 2000, Some(&want)), v);
        assert!(verify_disk(&top, 2000, Some(&want)).ok(), "a full re-read agrees");
        // Kept as what differs from the parent's, and loaded back whole through it.
        assert_eq!(std::fs::read(top.with_extension("blocks")).unwrap().get(..8), Some(&b"SNDBLD01"[..]));
        assert_eq!(blockhashes::load(&top), map);

        // A block of the overlay that is not what the node sent is caught.
        {
            let img = writable(&top);
            img.write_at(&[2u8; 1], 3 * BS + 70_000).unwrap();
            img.close().unwrap();
        }
        let (v, map) = verify_disk_on(&top, 2000, Some(&want), Some(parent));
        assert_eq!((v.checksum_match, map.is_none()), (Some(false), true), "{v:?}");
    }

    #[test]
    fn runs_join_where_extents_touch_and_split_into_even_pieces() {
        let mut runs = Vec::new();
        for r in [0..3, 2..5, 5..6, 9..9, 10..12, 11..11, 20..24] {
            add_run(&mut runs, r);
        }
        assert_eq!(runs, vec![0..6, 10..12, 20..24]);
        assert_eq!(split_runs(&runs, 5), vec![vec![0..5], vec![5..6, 10..12, 20..22], vec![22..24]]);
        assert_eq!(split_runs(&runs, 100), vec![runs.clone()]);
        assert!(split_runs(&[], 3).is_empty());
    }

    #[test]
    fn hashes_read_on_threads_land_on_their_blocks() {
        // Blocks of 4 KiB, each its index's bytes; runs scattered and with a last short block.
        let size = 50 * 4096 + 100;
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ (i % 251) as u8).collect();
        let runs = [1..4, 7..8, 10..30, 45..51];
        let mut hashes = vec![Hash::default(); block_count(size, 4096) as usize];
        hash_runs(size, 4096, &runs, &mut hashes, |buf: &mut [u8], at| -> Result<(), ()> {
            buf.copy_from_slice(&data[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        for (b, got) in hashes.iter().enumerate() {
            let b = b as u64;
            let want = if runs.iter().any(|r| r.contains(&b)) {
                let at = (b * 4096) as usize;
                hash_block(&data[at..at + block_len(size, 4096, b) as usize])
            } else {
                Hash::default()
            };
            assert_eq!(*got, want, "block {b}");
        }
        // A read that fails fails the whole.
        let failed = hash_runs(
            size,
            4096,
            &runs,
            &mut hashes,
            |_: &mut [u8], at| if at == 20 * 4096 { Err(at) } else { Ok(()) },
        );
        assert_eq!(failed, Err(20 * 4096));
    }

    /// Set the 16-bit refcount of host cluster `index` in an image with one refcount block.
    fn set_refcount(path: &Path, index: u64, value: u16) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut be = [0u8; 8];
        f.read_exact_at(&mut be, 48).unwrap(); // refcount_table_offset
        let table = u64::from_be_bytes(be);
        f.read_exact_at(&mut be, table).unwrap(); // its first block
        f.write_all_at(&value.to_be_bytes(), u64::from_be_bytes(be) + 2 * index).unwrap();
    }

    #[test]
    fn leaked_clusters_pass_verify_with_a_note_and_corruption_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk-2000.qcow2");
        Image::create(&path, &CreateOptions::new(4 << 20)).unwrap();
        {
            let img = writable(&path);
            img.write_at(&[5u8; 70_000], 0).unwrap();
            img.close().unwrap();
        }
        let want = reread(&path);
        assert_eq!(verify_disk(&path, 2000, Some(&want)).check, "clean");
        // What a crash leaves: a refcounted cluster past the end of what the image uses.
        let len = std::fs::metadata(&path).unwrap().len();
        let spare = len.div_ceil(BS) + 1;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len((spare + 1) * BS).unwrap();
        set_refcount(&path, spare, 1);
        let v = verify_disk(&path, 2000, Some(&want));
        assert!(v.ok() && v.check.contains("leaked"), "leaks cost space, not data: {v:?}");
        // A referenced cluster with refcount 0 could be handed out again: data at risk.
        set_refcount(&path, 0, 0);
        let v = verify_disk(&path, 2000, Some(&want));
        assert!(!v.ok() && v.check.contains("corrupt"), "{v:?}");
    }
}
