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

use std::path::Path;

use node::blockmap::{block_count, block_len, checksum_of_blocks, hash_block, BlockMap, Hash};

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
        .and_then(|name| blockhashes::load(&qcow2::image::resolve_backing(path, &name)).map(|p| (name, p)));
    let (verdict, map) = verify_disk_on(path, disk_key, expected, parent.as_ref().map(|(_, p)| p));
    if let Some(map) = map {
        if let Err(e) = blockhashes::save(path, &map, parent.as_ref().map(|(name, p)| (name.as_str(), p))) {
            // Only speed is lost: the next incremental re-reads its whole chain.
            tracing::warn!(image = %path.display(), error = %e, "cannot keep the block hashes");
        }
    }
    verdict
}

/// The same, trusting `parent` (the block hashes of the image's backing file, verified when it
/// was made) for every block this image's own layer does not hold. Also returns this image's
/// block hashes when its content matched, for its own children.
pub fn verify_disk_on(
    path: &Path,
    disk_key: u32,
    expected: Option<&str>,
    parent: Option<&BlockMap>,
) -> (DiskVerdict, Option<BlockMap>) {
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
            Ok(map) => {
                let got = map.checksum();
                let matched = got == want;
                (Some(got), Some(matched), matched.then_some(map))
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
    Ok(image_block_map(image, block_size, None)?.checksum())
}

/// Block hashes of the image's content: blocks that read as zeroes get the zero hash unread;
/// with `parent` (hashes of the backing file's content, same geometry), blocks this layer does
/// not touch get the parent's; the rest are read and hashed on several threads.
///
/// # Errors
/// A read or the allocation map failed.
pub fn image_block_map(image: &Image, block_size: u64, parent: Option<&BlockMap>) -> Result<BlockMap, qcow2::Error> {
    let size = image.size();
    let parent =
        parent.filter(|p| p.disk_size == size && p.block_size == block_size && image.header().backing_file.is_some());
    let mut map = match parent {
        Some(p) => p.clone(),
        None => BlockMap::zeroed(size, block_size),
    };
    let n = block_count(size, block_size);
    let mut todo: Vec<u64> = Vec::new();
    for e in image.map(0, size)? {
        let must_read = match parent {
            Some(_) => e.depth == 0 && e.kind != ExtentKind::Unallocated,
            None => e.kind == ExtentKind::Data,
        };
        if must_read && e.length > 0 {
            let first = e.offset / block_size;
            let last = ((e.offset + e.length - 1) / block_size).min(n.saturating_sub(1));
            for b in first..=last {
                if todo.last() != Some(&b) {
                    todo.push(b);
                }
            }
        }
    }
    let hashed = hash_blocks(size, block_size, &todo, |buf, at| image.read_at(buf, at))?;
    for (b, h) in hashed {
        if let Some(slot) = map.hashes.get_mut(b as usize) {
            *slot = h;
        }
    }
    Ok(map)
}

/// Read and hash `blocks` (ascending) on several threads, each taking a contiguous share.
fn hash_blocks<E: Send>(
    size: u64,
    block_size: u64,
    blocks: &[u64],
    read: impl Fn(&mut [u8], u64) -> Result<(), E> + Sync,
) -> Result<Vec<(u64, Hash)>, E> {
    let threads = hash_threads().min(blocks.len()).max(1);
    let share = blocks.len().div_ceil(threads).max(1);
    let read = &read;
    std::thread::scope(|scope| {
        let workers: Vec<_> = blocks
            .chunks(share)
            .map(|part| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; block_size as usize];
                    let mut out = Vec::with_capacity(part.len());
                    for &b in part {
                        let len = block_len(size, block_size, b) as usize;
                        let chunk = buf.get_mut(..len).unwrap_or_default();
                        read(chunk, b * block_size)?;
                        out.push((b, hash_block(chunk)));
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(blocks.len());
        for w in workers {
            match w.join() {
                Ok(r) => all.extend(r?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(all)
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
    let blocks: Vec<u64> = (0..block_count(size, block_size)).collect();
    let mut hashed = hash_blocks(size, block_size, &blocks, |buf, at| f.read_exact_at(buf, at))?;
    hashed.sort_by_key(|(b, _)| *b);
    Ok(checksum_of_blocks(block_size, hashed.iter().map(|(_, h)| h)))
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
        let (v, map) = verify_disk_on(&top, 2000, Some(&want), Some(&parent));
        assert!(v.ok() && map.is_some(), "{v:?}");
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
        let (v, map) = verify_disk_on(&top, 2000, Some(&want), Some(&parent));
        assert_eq!((v.checksum_match, map.is_none()), (Some(false), true), "{v:?}");
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
