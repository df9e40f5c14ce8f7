//! Change tracking for sources without a dirty bitmap: a strong hash (BLAKE3) per fixed-size
//! block of a disk, kept from the last committed run, and the disk checksum derived from it.
//!
//! A run hashes every block it reads; a block whose hash equals the base map's is unchanged and
//! does not travel. The new map is written next to the committed one as a pending file and only
//! replaces it on `commit` (the hub's word that the backup is safe), so a failed run never breaks
//! the chain. Blocks an uncommitted run wrote are marked [`UNKNOWN`] in the committed map, so a
//! target that is written in place (a replica) gets them again next time.
//!
//! The disk checksum is BLAKE3 over the concatenated block hashes (a two-level hash): the node
//! gets it for free from the map, and the hub recomputes it from its image with
//! [`checksum_of_blocks`] without knowing anything else. Its text names the block size:
//! `blake3-blocks/65536:HEX`.
//!
//! On disk: `SNDMAP01`, disk size, block size, block count (u64 little endian), the hashes, and
//! a BLAKE3 of all of that; a file that does not check out is "no state" (a full copy), never
//! trusted. Nothing is allocated from header values: the length of the file decides.
//!
//! A copy paused or checkpointed for the next start leaves a [`ResumeMap`]: the same hashes (what
//! the target holds as far as the copy knows) and a [`BlockSet`] of the blocks the run finished,
//! which a run going on from it need not read again (`mover`). Its file is `SNDRSM01` and the
//! same fields, the set's words (one bit per block) after the hashes, then the BLAKE3; a
//! `SNDMAP01` file in its place (left by a node of an earlier version, stopped to upgrade it)
//! loads as a map with no block finished.

use std::path::{Path, PathBuf};

/// A block hash.
pub type Hash = [u8; 32];

/// The hash of a block an uncommitted run wrote: never equal to a real hash, so it is resent.
pub const UNKNOWN: Hash = [0xff; 32];

const MAGIC: &[u8; 8] = b"SNDMAP01";
const RESUME_MAGIC: &[u8; 8] = b"SNDRSM01";
const HEADER_LEN: usize = 32;

/// Hash one block.
pub fn hash_block(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// Hashes of all-zero blocks, for the full block size and the last (short) block.
#[derive(Debug, Clone)]
pub struct ZeroHashes {
    block_size: u64,
    full: Hash,
    tail: Option<(u64, Hash)>,
}

impl ZeroHashes {
    /// For a disk of `disk_size` in blocks of `block_size`.
    pub fn new(disk_size: u64, block_size: u64) -> Self {
        let zeros = vec![0u8; block_size as usize];
        let full = hash_block(&zeros);
        let tail_len = disk_size % block_size;
        let tail = (tail_len != 0).then(|| (tail_len, hash_block(zeros.get(..tail_len as usize).unwrap_or_default())));
        Self { block_size, full, tail }
    }

    /// The hash of `len` zero bytes (`len` is the block size or the disk's tail).
    pub fn of_len(&self, len: u64) -> Hash {
        match self.tail {
            Some((tail_len, hash)) if len == tail_len && len != self.block_size => hash,
            _ if len == self.block_size => self.full,
            _ => hash_block(&vec![0u8; len as usize]),
        }
    }
}

/// Block sizes a map, a copy or a checksum may have: a power of two from 4 KiB to 64 MiB.
/// Anything read from outside (a map file, a checksum a node reports) is held to it before a
/// buffer of one block is made.
pub fn valid_block_size(block_size: u64) -> bool {
    block_size.is_power_of_two() && (4096..=64 << 20).contains(&block_size)
}

/// Number of blocks of a disk.
pub fn block_count(disk_size: u64, block_size: u64) -> u64 {
    disk_size.div_ceil(block_size)
}

/// The disk checksum from its block hashes in order.
pub fn checksum_of_blocks<'a>(block_size: u64, hashes: impl IntoIterator<Item = &'a Hash>) -> String {
    let mut h = blake3::Hasher::new();
    for hash in hashes {
        h.update(hash);
    }
    format!("blake3-blocks/{block_size}:{}", h.finalize().to_hex())
}

/// The block size a checksum was computed with.
pub fn checksum_block_size(checksum: &str) -> Option<u64> {
    let rest = checksum.strip_prefix("blake3-blocks/")?;
    let (size, _) = rest.split_once(':')?;
    size.parse().ok().filter(|s: &u64| valid_block_size(*s))
}

/// Why a map could not be saved.
#[derive(Debug, thiserror::Error)]
#[error("block map {path}: {source}")]
pub struct MapError {
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

impl MapError {
    /// As a mover error (the state is the node's own destination).
    pub fn into_move_error(self) -> crate::error::MoveError {
        crate::error::MoveError::Destination {
            what: format!("change-tracking state {}", self.path.display()),
            source: self.source,
        }
    }
}

/// A disk's block hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// One hash per block.
    pub hashes: Vec<Hash>,
}

impl BlockMap {
    /// The map of an all-zero disk.
    pub fn zeroed(disk_size: u64, block_size: u64) -> Self {
        let zero = ZeroHashes::new(disk_size, block_size);
        let n = block_count(disk_size, block_size);
        let hashes = (0..n).map(|i| zero.of_len(block_len(disk_size, block_size, i))).collect();
        Self { disk_size, block_size, hashes }
    }

    /// The disk checksum.
    pub fn checksum(&self) -> String {
        checksum_of_blocks(self.block_size, &self.hashes)
    }

    /// Load a map; `None` if the file is missing, damaged or of another geometry.
    pub fn load(path: &Path) -> Option<Self> {
        Self::from_bytes(&std::fs::read(path).ok()?)
    }

    /// A map from the bytes of its file; `None` if they do not check out (module doc).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match parse(bytes)? {
            (map, Format::Map, []) => Some(map),
            _ => None,
        }
    }

    /// The bytes of its file (module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = self.body(MAGIC, 0);
        seal(&mut body);
        body
    }

    /// Magic, header and hashes, with room for `more` bytes and the trailer.
    fn body(&self, magic: &[u8; 8], more: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(HEADER_LEN + self.hashes.len() * 32 + more + 32);
        body.extend_from_slice(magic);
        body.extend_from_slice(&self.disk_size.to_le_bytes());
        body.extend_from_slice(&self.block_size.to_le_bytes());
        body.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            body.extend_from_slice(h);
        }
        body
    }

    /// Write the map atomically: temporary file, fsync, rename, fsync of the directory.
    ///
    /// # Errors
    /// The file could not be written.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        write_file(path, &self.to_bytes())
    }
}

/// Which of the two files a map was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Map,
    Resume,
}

/// The map a file holds, its kind, and the bytes after the hashes; `None` if its trailer, magic
/// or geometry do not check out. The hashes are counted from the header and must fit in the
/// file before anything is allocated for them.
fn parse(bytes: &[u8]) -> Option<(BlockMap, Format, &[u8])> {
    let body_len = bytes.len().checked_sub(32)?;
    let (body, trailer) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != trailer || body.len() < HEADER_LEN {
        return None;
    }
    let format = match body.get(..8)? {
        m if m == MAGIC => Format::Map,
        m if m == RESUME_MAGIC => Format::Resume,
        _ => return None,
    };
    let word = |i: usize| body.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (disk_size, block_size, count) = (word(8)?, word(16)?, word(24)?);
    if !valid_block_size(block_size) || count != block_count(disk_size, block_size) {
        return None;
    }
    let hashes_len = usize::try_from(count.checked_mul(32)?).ok()?;
    let rest = body.get(HEADER_LEN..)?;
    if rest.len() < hashes_len {
        return None;
    }
    let (hashes_bytes, after) = rest.split_at(hashes_len);
    let hashes = hashes_bytes.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
    Some((BlockMap { disk_size, block_size, hashes }, format, after))
}

/// Write a map file atomically: temporary file, fsync, rename, fsync of the directory.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), MapError> {
    crate::files::write_atomically(path, bytes).map_err(|source| MapError { path: path.to_path_buf(), source })
}

/// Append the BLAKE3 of `body` to it.
fn seal(body: &mut Vec<u8>) {
    let trailer = blake3::hash(body);
    body.extend_from_slice(trailer.as_bytes());
}

/// A set of block indexes, one bit each: the blocks a copy wrote, or finished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
}

impl BlockSet {
    /// Add `count` blocks from `first`.
    pub fn insert_run(&mut self, first: u64, count: u64) {
        for b in first..first.saturating_add(count) {
            let word = (b / 64) as usize;
            if self.words.len() <= word {
                self.words.resize(word + 1, 0);
            }
            if let Some(w) = self.words.get_mut(word) {
                *w |= 1 << (b % 64);
            }
        }
    }

    /// Whether `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        self.words.get((block / 64) as usize).is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// The blocks in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| (0..64).filter(move |bit| w & (1 << bit) != 0).map(move |bit| i as u64 * 64 + bit))
    }

    /// How many blocks the set holds.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set holds no block.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }
}

/// What a paused or checkpointed copy leaves for the run that goes on from it (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeMap {
    /// What the target holds, as far as the copy knows (`mover`'s module doc).
    pub map: BlockMap,
    /// The blocks the run finished: read, and on the target (written and flushed, or equal to
    /// what it held). Their hashes in `map` are the source's.
    pub done: BlockSet,
}

impl ResumeMap {
    /// Load one; `None` if the file is missing or does not check out (module doc).
    pub fn load(path: &Path) -> Option<Self> {
        Self::from_bytes(&std::fs::read(path).ok()?)
    }

    /// A resume map from the bytes of its file, or a block map's (no block finished); `None` if
    /// they do not check out, or the set names a block the disk does not have.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (map, format, after) = parse(bytes)?;
        let count = map.hashes.len() as u64;
        let done = match format {
            Format::Map if after.is_empty() => BlockSet::default(),
            Format::Resume if after.len() as u64 == count.div_ceil(64) * 8 => BlockSet {
                words: after.chunks_exact(8).filter_map(|c| c.try_into().ok()).map(u64::from_le_bytes).collect(),
            },
            _ => return None,
        };
        let beyond = done.words.last().is_some_and(|&w| !count.is_multiple_of(64) && w >> (count % 64) != 0);
        (!beyond).then_some(Self { map, done })
    }

    /// The bytes of its file (module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let words = self.map.hashes.len().div_ceil(64);
        let mut body = self.map.body(RESUME_MAGIC, words * 8);
        for i in 0..words {
            body.extend_from_slice(&self.done.words.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        seal(&mut body);
        body
    }

    /// Write it atomically, as [`BlockMap::save`].
    ///
    /// # Errors
    /// The file could not be written.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        write_file(path, &self.to_bytes())
    }
}

/// Length of block `index`.
pub fn block_len(disk_size: u64, block_size: u64, index: u64) -> u64 {
    let start = index * block_size;
    (disk_size - start.min(disk_size)).min(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_map_loads_back_and_a_damaged_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk-2000.map");
        let mut map = BlockMap::zeroed(1_000_000, 65536);
        map.hashes[3] = hash_block(b"x");
        map.save(&path).unwrap();
        assert_eq!(BlockMap::load(&path), Some(map.clone()));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(BlockMap::load(&path), None);
        std::fs::write(&path, b"SNDMAP01").unwrap();
        assert_eq!(BlockMap::load(&path), None);
        assert_eq!(BlockMap::load(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_resume_map_loads_back_and_a_block_map_loads_as_one_with_nothing_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk-2000.map.resume-j1");
        let mut map = BlockMap::zeroed(70 * 4096 - 100, 4096);
        map.hashes[65] = hash_block(b"x");
        let mut done = BlockSet::default();
        done.insert_run(0, 3);
        done.insert_run(64, 6);
        let resume = ResumeMap { map: map.clone(), done };
        resume.save(&path).unwrap();
        assert_eq!(ResumeMap::load(&path), Some(resume.clone()));
        assert_eq!(resume.done.iter().collect::<Vec<_>>(), vec![0, 1, 2, 64, 65, 66, 67, 68, 69]);
        assert_eq!(resume.done.len(), 9);
        assert_eq!(BlockMap::load(&path), None, "a resume map is no committed map");
        // A block beyond the disk, sealed as the node would: refused.
        let mut beyond = resume.clone();
        beyond.done.insert_run(70, 1);
        assert_eq!(ResumeMap::from_bytes(&beyond.to_bytes()), None);
        let mut bytes = resume.to_bytes();
        let last = bytes.len() - 33;
        bytes[last] ^= 1;
        assert_eq!(ResumeMap::from_bytes(&bytes), None, "damaged");
        map.save(&path).unwrap();
        let old = ResumeMap::load(&path).unwrap();
        assert!(old.map == map && old.done.is_empty(), "a map left by an earlier version");
    }

    #[test]
    fn zero_hashes_match_hashing_zeros_including_the_short_tail() {
        let z = ZeroHashes::new(65536 * 2 + 100, 65536);
        assert_eq!(z.of_len(65536), hash_block(&[0u8; 65536]));
        assert_eq!(z.of_len(100), hash_block(&[0u8; 100]));
        let map = BlockMap::zeroed(65536 * 2 + 100, 65536);
        assert_eq!(map.hashes.len(), 3);
        assert_eq!(map.hashes[2], hash_block(&[0u8; 100]));
    }

    #[test]
    fn the_checksum_names_its_block_size() {
        let map = BlockMap::zeroed(1 << 20, 1 << 18);
        let c = map.checksum();
        assert!(c.starts_with("blake3-blocks/262144:"));
        assert_eq!(checksum_block_size(&c), Some(1 << 18));
        assert_eq!(checksum_block_size("md5:abc"), None);
        // A checksum comes from the node: a block size no copy makes is not believed (a
        // verification would make a buffer of one block).
        assert_eq!(checksum_block_size("blake3-blocks/4611686018427387904:00"), None);
        assert_eq!(checksum_block_size("blake3-blocks/134217728:00"), None);
        assert_eq!(checksum_block_size("blake3-blocks/67108864:00"), Some(64 << 20));
        assert_eq!(checksum_block_size("blake3-blocks/2048:00"), None);
    }
}
