//! The block hashes each verified backup keeps beside its image (`disk-KEY.blocks`), an
//! incremental's as what differs from its parent's.
//!
//! An incremental's verification takes every block its own layer does not hold from its
//! parent's hashes (`crate::verify`), and its own hashes are what its children take theirs from.
//! Kept whole, each backup carried a map of the whole disk (128 MiB for a 256 GiB disk) beside a
//! layer of a few MiB: a chain of daily incrementals held more hashes than data. So an
//! incremental keeps only the hashes of the blocks that differ from its parent's, naming the
//! parent's file and the BLAKE3 of its hashes (`node::blockmap::MapDiff`); a full backup's file
//! is a whole map (`node::blockmap::BlockMap`).
//!
//! Loading one walks down to a whole map and applies each difference on the way back, checking
//! at each step that the parent's hashes are the ones it was made against (by the digest the
//! parent's file says it yields, and the map at the top against its own file's, so that a chain
//! of 64 hashes two maps, not 64): whatever a file names, a map is only ever what that backup's
//! verification computed. The files are a cache:
//! one missing, damaged or made against other hashes loads as nothing, and the verification that
//! needed it re-reads the chain instead. A merge, which takes a backup's parent out from under
//! it, and making a backup stand alone, which takes its backing file away, keep its hashes again
//! against what it reads through now ([`keep_over`]).

use std::path::{Path, PathBuf};

use node::blockmap::{digest, BlockMap, BlockSet, Hash, MapDiff};

/// A chain is at most 256 images (`max_chain`); a longer walk is a loop.
const MAX_DEPTH: usize = 257;

/// The block hashes file beside the image at `image`.
pub fn file_of(image: &Path) -> PathBuf {
    image.with_extension("blocks")
}

/// The hashes of the image at `image`, from its file (module doc); `None` if it, or a file it
/// builds on, is missing, damaged or does not match.
pub fn load(image: &Path) -> Option<BlockMap> {
    load_with_digest(image).map(|(map, _)| map)
}

/// [`load`], and the map's [`digest`] (what a difference from it names it by).
pub fn load_with_digest(image: &Path) -> Option<(BlockMap, Hash)> {
    let (map, said) = load_file(&file_of(image), 0)?;
    // Each link was checked against the digest the file below says it yields; the last map is
    // hashed once, against what the top file says (a whole map's digest is its own).
    (digest(&map) == said).then_some((map, said))
}

/// The map a file yields and its digest: a whole map's, or what a difference says it yields.
fn load_file(path: &Path, depth: usize) -> Option<(BlockMap, Hash)> {
    if depth > MAX_DEPTH {
        return None;
    }
    // A whole map read as it goes (its magic tells at once when the file is a difference).
    if let Some(map) = BlockMap::load(path) {
        let own = digest(&map);
        return Some((map, own));
    }
    let diff = MapDiff::from_bytes(&std::fs::read(path).ok()?)?;
    let (parent, parent_digest) = load_file(&path.parent()?.join(diff.base_name()), depth + 1)?;
    Some((diff.apply_to(parent, &parent_digest)?, diff.yields()))
}

/// Keep `map`, the hashes of the image at `image`, beside it: as the difference from `parent`
/// (the hashes of the image's backing file, as [`load`] gives them, the file the image names
/// `backing_name`) when there is one of the same geometry, otherwise whole.
///
/// # Errors
/// The file could not be written.
pub fn save(image: &Path, map: &BlockMap, parent: Option<(&str, &BlockMap)>) -> std::io::Result<()> {
    let diff = parent.and_then(|(backing_name, p)| {
        MapDiff::between(map, p, &Path::new(backing_name).with_extension("blocks").to_string_lossy())
    });
    keep(image, map, diff)
}

/// Keep `map`, the hashes of the image at `image`, beside it: with `layer` (the name of the
/// backing file the image names, the [`digest`] of that file's hashes, and the blocks where `map`
/// differs from them) as that difference, otherwise whole: [`save`] for a caller that made `map`
/// from its parent's in place and no longer has the parent's (`crate::verify`).
///
/// # Errors
/// The file could not be written.
pub fn save_layer(image: &Path, map: &BlockMap, layer: Option<(&str, Hash, BlockSet)>) -> std::io::Result<()> {
    let diff = layer.and_then(|(backing_name, parent_digest, changed)| {
        let base_name = Path::new(backing_name).with_extension("blocks");
        MapDiff::of_changes(map, parent_digest, &base_name.to_string_lossy(), changed)
    });
    keep(image, map, diff)
}

/// Write `diff` beside the image at `image`, or `map` whole without one.
fn keep(image: &Path, map: &BlockMap, diff: Option<MapDiff>) -> std::io::Result<()> {
    match diff {
        Some(d) => node::files::write_atomically(&file_of(image), &d.to_bytes()),
        // Written as it goes: a whole map of the largest disk is 128 MiB not held twice.
        None => map.save(&file_of(image)).map_err(|e| e.source),
    }
}

/// After the image at `image` was given another backing file (a merge put its parent's parent
/// under it) or none (it was made to stand alone): keep its hashes again against what it reads
/// through now, while the file they were kept against is still there. Best effort: a file that
/// cannot be loaded or written is removed, and the next verification that needs it re-reads the
/// chain.
pub fn keep_over(image: &Path, backing_name: Option<&str>) {
    if !file_of(image).exists() {
        return;
    }
    let kept = load(image).map(|map| {
        let parent = backing_name.and_then(|name| load(&qcow2::image::resolve_backing(image, name)).map(|p| (name, p)));
        save(image, &map, parent.as_ref().map(|(name, p)| (*name, p)))
    });
    if !matches!(kept, Some(Ok(()))) {
        tracing::warn!(image = %image.display(), "block hashes not kept: the next incremental's verification re-reads the chain");
        if let Err(e) = std::fs::remove_file(file_of(image)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(image = %image.display(), error = %e, "cannot remove stale block hashes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node::blockmap::hash_block;

    fn map_with(changes: &[(usize, &[u8])]) -> BlockMap {
        let mut map = BlockMap::zeroed(100 * 65536 + 512, 65536);
        for (i, data) in changes {
            map.hashes[*i] = hash_block(data);
        }
        map
    }

    #[test]
    fn an_incremental_keeps_what_differs_and_loads_back_whole_through_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let image = |id: &str| dir.path().join(id).join("disk-2000.qcow2");
        let full = map_with(&[(0, b"boot"), (7, b"data"), (100, b"tail")]);
        let incr = map_with(&[(0, b"boot"), (7, b"changed"), (50, b"new"), (100, b"tail")]);
        let next = map_with(&[(0, b"boot2"), (7, b"changed"), (50, b"new"), (100, b"tail")]);
        save(&image("full"), &full, None).unwrap();
        save(&image("incr"), &incr, Some(("../full/disk-2000.qcow2", &full))).unwrap();
        save(&image("next"), &next, Some(("../incr/disk-2000.qcow2", &incr))).unwrap();
        assert_eq!(load(&image("next")), Some(next.clone()));
        assert_eq!(load(&image("incr")), Some(incr.clone()));
        let size = |id: &str| std::fs::metadata(file_of(&image(id))).unwrap().len();
        // Header, parent, name, one bit per block, the changed blocks' hashes, trailer.
        let fixed = (32 + 66 + "../full/disk-2000.blocks".len() + 16 + 32) as u64;
        assert_eq!((size("incr"), size("next")), (fixed + 2 * 32, fixed + 32));

        // The parent changed behind its back (or is another backup's now): not trusted.
        save(&image("incr"), &map_with(&[(1, b"other")]), None).unwrap();
        assert_eq!(load(&image("next")), None);
        // A merge put `full` under `next` in `incr`'s place: kept over first, it loads through
        // `full` once `incr` is gone.
        save(&image("incr"), &incr, Some(("../full/disk-2000.qcow2", &full))).unwrap();
        keep_over(&image("next"), Some("../full/disk-2000.qcow2"));
        std::fs::remove_dir_all(dir.path().join("incr")).unwrap();
        assert_eq!(load(&image("next")), Some(next.clone()));
        // Made to stand alone: whole.
        keep_over(&image("next"), None);
        std::fs::remove_dir_all(dir.path().join("full")).unwrap();
        assert_eq!(load(&image("next")), Some(next));
        assert_eq!(std::fs::read(file_of(&image("next"))).unwrap().get(..8), Some(&b"SNDMAP02"[..]));
        // One that can no longer be loaded is removed, not left to mislead.
        save(&image("lost"), &map_with(&[]), Some(("../gone/disk-2000.qcow2", &full))).unwrap();
        keep_over(&image("lost"), None);
        assert!(!file_of(&image("lost")).exists());
    }
}
