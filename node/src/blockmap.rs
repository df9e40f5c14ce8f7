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

use std::path::{Path, PathBuf};

/// A block hash.
pub type Hash = [u8; 32];

/// The hash of a block an uncommitted run wrote: never equal to a real hash, so it is resent.
pub const UNKNOWN: Hash = [0xff; 32];

const MAGIC: &[u8; 8] = b"SNDMAP01";
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
        let body_len = bytes.len().checked_sub(32)?;
        let (body, trailer) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != trailer || body.len() < HEADER_LEN || body.get(..8)? != MAGIC {
            return None;
        }
        let word = |i: usize| body.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let (disk_size, block_size, count) = (word(8)?, word(16)?, word(24)?);
        let hashes_bytes = body.get(HEADER_LEN..)?;
        if !valid_block_size(block_size)
            || count != block_count(disk_size, block_size)
            || hashes_bytes.len() as u64 != count.checked_mul(32)?
        {
            return None;
        }
        let hashes = hashes_bytes.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
        Some(Self { disk_size, block_size, hashes })
    }

    /// The bytes of its file (module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(HEADER_LEN + self.hashes.len() * 32 + 32);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&self.disk_size.to_le_bytes());
        body.extend_from_slice(&self.block_size.to_le_bytes());
        body.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            body.extend_from_slice(h);
        }
        let trailer = blake3::hash(&body);
        body.extend_from_slice(trailer.as_bytes());
        body
    }

    /// Write the map atomically: temporary file, fsync, rename, fsync of the directory.
    ///
    /// # Errors
    /// The file could not be written.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        crate::files::write_atomically(path, &self.to_bytes())
            .map_err(|source| MapError { path: path.to_path_buf(), source })
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
