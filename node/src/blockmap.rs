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
//! On disk: `SNDMAP02`, disk size, block size, block count (u64 little endian), the set of
//! blocks that read as zeroes (one bit per block, in u64 words), the hashes of the other blocks
//! in order, and a BLAKE3 of all of that; a file that does not check out is "no state" (a full
//! copy), never trusted. A zero block's hash is known ([`ZeroHashes`]), so it is not stored: a
//! thin 2 TiB disk holding 40 MiB keeps a map of half a MiB rather than 128 MiB, on the node
//! and beside every backup image on the hub (`disk-KEY.blocks`), while a full disk pays one bit
//! per block more. Nothing is allocated from header values: the file's own bits decide (each
//! block costs at least one, so a map never holds more than 256 times its file in hashes).
//! `SNDMAP01` files (every hash stored), left by the versions before, load as they did. The hub
//! keeps an incremental backup's hashes as what differs from its parent's ([`MapDiff`]).
//!
//! A copy paused or checkpointed for the next start leaves a [`ResumeMap`]: the same hashes (what
//! the target holds as far as the copy knows) and a [`BlockSet`] of the blocks the run finished,
//! which a run going on from it need not read again (`mover`). Its file is `SNDRSM02` and the
//! same fields, the set's words after the hashes, then the BLAKE3 (`SNDRSM01`, its hashes all
//! stored, loads too); a block map in its place (left by a node of an earlier version, stopped to
//! upgrade it) loads as one with no block finished.
//!
//! Every file is written and read as it goes (`sealed`): saving a map of the largest disk holds
//! nothing but the map (it held a second copy of its 128 MiB, at every checkpoint), loading one
//! holds the map it gives (it held the file's bytes beside it); `nbd-bench maps` measures both.
//! A running copy's checkpoint is written from its live hashes a chunk at a time
//! ([`ResumeMap::write_changing`]), so it holds no copy of them either.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::sealed::{SealedReader, SealedWriter};

/// A block hash.
pub type Hash = [u8; 32];

/// The hash of a block an uncommitted run wrote: never equal to a real hash, so it is resent.
pub const UNKNOWN: Hash = [0xff; 32];

const MAGIC: &[u8; 8] = b"SNDMAP02";
const RESUME_MAGIC: &[u8; 8] = b"SNDRSM02";
/// The formats of the versions before, every hash stored: read, never written.
const MAGIC_V1: &[u8; 8] = b"SNDMAP01";
const RESUME_MAGIC_V1: &[u8; 8] = b"SNDRSM01";
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
        let tail_len = disk_size % block_size;
        Self {
            block_size,
            full: hash_zeros(block_size),
            tail: (tail_len != 0).then(|| (tail_len, hash_zeros(tail_len))),
        }
    }

    /// The hash of `len` zero bytes (`len` is the block size or the disk's tail).
    pub fn of_len(&self, len: u64) -> Hash {
        match self.tail {
            Some((tail_len, hash)) if len == tail_len && len != self.block_size => hash,
            _ if len == self.block_size => self.full,
            _ => hash_zeros(len),
        }
    }
}

/// The hash of `len` zero bytes, fed from a small buffer (a block may be 64 MiB).
fn hash_zeros(len: u64) -> Hash {
    const ZEROS: [u8; 16384] = [0; 16384];
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        hasher.update(ZEROS.get(..n as usize).unwrap_or_default());
        left -= n;
    }
    *hasher.finalize().as_bytes()
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

    /// Load a map; `None` if the file is missing, damaged or of another geometry. Read as it
    /// goes (`sealed`): nothing but the map and a buffer is held.
    pub fn load(path: &Path) -> Option<Self> {
        let mut r = open_sealed(path)?;
        match parse(&mut r)? {
            (map, Format::Map) => r.finish().map(|()| map),
            (_, Format::Resume) => None,
        }
    }

    /// A map from the bytes of its file; `None` if they do not check out (module doc).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut r = SealedReader::new(bytes, bytes.len() as u64)?;
        match parse(&mut r)? {
            (map, Format::Map) => r.finish().map(|()| map),
            (_, Format::Resume) => None,
        }
    }

    /// The bytes of its file (module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        sealed_bytes(|w| self.write_body(MAGIC, w))
    }

    /// Magic, header, the zero blocks and the other blocks' hashes, into `w`.
    fn write_body(&self, magic: &[u8; 8], w: &mut SealedWriter<'_>) -> std::io::Result<()> {
        let count = self.hashes.len() as u64;
        let zero = ZeroHashes::new(self.disk_size, self.block_size);
        let is_zero = |i: u64, h: &Hash| *h == zero.of_len(block_len(self.disk_size, self.block_size, i));
        let mut zeros = BlockSet::default();
        for (i, h) in (0..count).zip(&self.hashes) {
            if is_zero(i, h) {
                zeros.insert_run(i, 1);
            }
        }
        w.put(magic)?;
        for field in [self.disk_size, self.block_size, count] {
            w.put(&field.to_le_bytes())?;
        }
        zeros.put_words(count, w)?;
        for (i, h) in (0..count).zip(&self.hashes) {
            if !is_zero(i, h) {
                w.put(h)?;
            }
        }
        Ok(())
    }

    /// Write the map atomically: temporary file, fsync, rename, fsync of the directory; written
    /// as it goes (`sealed`), so nothing but the map is held.
    ///
    /// # Errors
    /// The file could not be written.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        save_sealed(path, |w| self.write_body(MAGIC, w))
    }
}

/// Which of the two files a map was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Map,
    Resume,
}

/// The map a file's body holds (read up to the end of its hashes) and its kind; `None` if its
/// magic or geometry do not check out or the body is too short. The zero set and the stored
/// hashes are counted from the header and must fit in the body before anything is allocated for
/// them. The caller reads what follows and checks the trailer ([`SealedReader::finish`]).
fn parse<R: Read>(r: &mut SealedReader<R>) -> Option<(BlockMap, Format)> {
    if r.left() < HEADER_LEN as u64 {
        return None;
    }
    let magic = r.bytes(8)?;
    let (format, zeros_stored) = match magic.as_slice() {
        m if m == MAGIC => (Format::Map, true),
        m if m == RESUME_MAGIC => (Format::Resume, true),
        m if m == MAGIC_V1 => (Format::Map, false),
        m if m == RESUME_MAGIC_V1 => (Format::Resume, false),
        _ => return None,
    };
    let (disk_size, block_size, count) = (r.u64()?, r.u64()?, r.u64()?);
    if !valid_block_size(block_size) || count != block_count(disk_size, block_size) {
        return None;
    }
    let zeros = if zeros_stored {
        match BlockSet::take_words(&r.bytes(words_len(count)?)?, count)? {
            (zeros, []) => zeros,
            _ => return None,
        }
    } else {
        BlockSet::default()
    };
    let stored = count - zeros.len();
    if stored.checked_mul(32)? > r.left() {
        return None;
    }
    let zero = (!zeros.is_empty()).then(|| ZeroHashes::new(disk_size, block_size));
    // At most 8 blocks per byte of the zero set, or 32 bytes each stored: the body holds them.
    let mut hashes: Vec<Hash> = Vec::with_capacity(usize::try_from(count).ok()?);
    let mut next = 0u64;
    // The zero blocks from `next` on, up to the next stored hash.
    let fill_zeros = |hashes: &mut Vec<Hash>, next: &mut u64| {
        if let Some(z) = &zero {
            while *next < count && zeros.contains(*next) {
                hashes.push(z.of_len(block_len(disk_size, block_size, *next)));
                *next += 1;
            }
        }
    };
    fill_zeros(&mut hashes, &mut next);
    r.chunks(stored * 32, |chunk| {
        for h in chunk.chunks_exact(32).filter_map(|c| <Hash>::try_from(c).ok()) {
            hashes.push(h);
            next += 1;
            fill_zeros(&mut hashes, &mut next);
        }
    })?;
    (hashes.len() as u64 == count).then_some((BlockMap { disk_size, block_size, hashes }, format))
}

/// The bytes of a set's words for a disk of `count` blocks.
fn words_len(count: u64) -> Option<u64> {
    count.div_ceil(64).checked_mul(8)
}

/// A sealed file opened to be read as it goes.
fn open_sealed(path: &Path) -> Option<SealedReader<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    SealedReader::new(std::io::BufReader::with_capacity(1 << 16, file), len)
}

/// Write a sealed file atomically (temporary file, fsync, rename, fsync of the directory), its
/// body written by `body` as it goes.
fn save_sealed(path: &Path, body: impl FnOnce(&mut SealedWriter<'_>) -> std::io::Result<()>) -> Result<(), MapError> {
    crate::files::write_atomically_with(path, |f| {
        let mut w = SealedWriter::new(f);
        body(&mut w)?;
        w.finish()
    })
    .map_err(|source| MapError { path: path.to_path_buf(), source })
}

/// A sealed file's bytes, its body written by `body`.
fn sealed_bytes(body: impl FnOnce(&mut SealedWriter<'_>) -> std::io::Result<()>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = SealedWriter::new(&mut out);
    // A vector takes every write: neither step can fail.
    let _written = body(&mut w).and_then(|()| w.finish());
    out
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

    /// Append the set's words for a disk of `count` blocks (little endian, one bit per block).
    fn put_words(&self, count: u64, w: &mut SealedWriter<'_>) -> std::io::Result<()> {
        for i in 0..count.div_ceil(64) as usize {
            w.put(&self.words.get(i).copied().unwrap_or(0).to_le_bytes())?;
        }
        Ok(())
    }

    /// A set of `count` blocks' words from the front of `bytes`, and the bytes after; `None` if
    /// they are too few or name a block past `count`.
    fn take_words(bytes: &[u8], count: u64) -> Option<(Self, &[u8])> {
        let len = usize::try_from(count.div_ceil(64).checked_mul(8)?).ok()?;
        let words_bytes = bytes.get(..len)?;
        let words: Vec<u64> =
            words_bytes.chunks_exact(8).filter_map(|c| c.try_into().ok()).map(u64::from_le_bytes).collect();
        let beyond = words.last().is_some_and(|&w| !count.is_multiple_of(64) && w >> (count % 64) != 0);
        (!beyond).then(|| (Self { words }, bytes.get(len..).unwrap_or_default()))
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
    /// Load one; `None` if the file is missing or does not check out (module doc). Read as it
    /// goes (`sealed`).
    pub fn load(path: &Path) -> Option<Self> {
        Self::read(open_sealed(path)?)
    }

    /// A resume map from the bytes of its file, or a block map's (no block finished); `None` if
    /// they do not check out, or the set names a block the disk does not have.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::read(SealedReader::new(bytes, bytes.len() as u64)?)
    }

    fn read<R: Read>(mut r: SealedReader<R>) -> Option<Self> {
        let (map, format) = parse(&mut r)?;
        let count = map.hashes.len() as u64;
        let done = match format {
            Format::Map => BlockSet::default(),
            Format::Resume => match BlockSet::take_words(&r.bytes(words_len(count)?)?, count)? {
                (done, []) => done,
                _ => return None,
            },
        };
        r.finish()?;
        Some(Self { map, done })
    }

    /// The bytes of its file (module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        sealed_bytes(|w| self.write_body(w))
    }

    fn write_body(&self, w: &mut SealedWriter<'_>) -> std::io::Result<()> {
        self.map.write_body(RESUME_MAGIC, w)?;
        self.done.put_words(self.map.hashes.len() as u64, w)
    }

    /// Write it atomically, as [`BlockMap::save`].
    ///
    /// # Errors
    /// The file could not be written.
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        save_sealed(path, |w| self.write_body(w))
    }

    /// Write the file of a resume map that is still changing (a running copy's: `mover`'s
    /// checkpoints) into `out`, read from `read` a chunk at a time, so that no copy of the map is
    /// made: `read(first, hashes, done)` fills blocks `first..` (as many as `hashes` holds) as the
    /// map has them now. The same bytes as [`ResumeMap::to_bytes`] of a map that did not change.
    ///
    /// The zero set comes before the hashes, so the blocks are read twice: first for which are
    /// zero and which done, then for the other blocks' hashes, which may have moved on meanwhile.
    /// The file says of each block what one of the two reads said: zero and done as the first,
    /// the hash of a block not zero then as the second (which may be the zero hash, stored). Each
    /// holds of the target once the caller flushes it after both; a block done at the first read
    /// has the same hash at the second, since a copy stores a block's hash once.
    ///
    /// # Errors
    /// `out` failed.
    pub fn write_changing(
        out: &mut dyn std::io::Write,
        disk_size: u64,
        block_size: u64,
        mut read: impl FnMut(u64, &mut [Hash], &mut [bool]),
    ) -> std::io::Result<()> {
        let count = block_count(disk_size, block_size);
        let zero = ZeroHashes::new(disk_size, block_size);
        let (mut hashes, mut flags) = (Vec::new(), Vec::new());
        let mut chunk = |first: u64, hashes: &mut Vec<Hash>, flags: &mut Vec<bool>| {
            let len = (count - first).min(CHANGING_CHUNK) as usize;
            hashes.clear();
            hashes.resize(len, UNKNOWN);
            flags.clear();
            flags.resize(len, false);
            read(first, hashes, flags);
        };
        let firsts = || (0..count).step_by(CHANGING_CHUNK as usize);
        let (mut zeros, mut done) = (BlockSet::default(), BlockSet::default());
        for first in firsts() {
            chunk(first, &mut hashes, &mut flags);
            for (b, (h, d)) in (first..).zip(hashes.iter().zip(&flags)) {
                if *h == zero.of_len(block_len(disk_size, block_size, b)) {
                    zeros.insert_run(b, 1);
                }
                if *d {
                    done.insert_run(b, 1);
                }
            }
        }
        let mut w = SealedWriter::new(out);
        w.put(RESUME_MAGIC)?;
        for field in [disk_size, block_size, count] {
            w.put(&field.to_le_bytes())?;
        }
        zeros.put_words(count, &mut w)?;
        for first in firsts() {
            chunk(first, &mut hashes, &mut flags);
            for (b, h) in (first..).zip(&hashes) {
                if !zeros.contains(b) {
                    w.put(h)?;
                }
            }
        }
        done.put_words(count, &mut w)?;
        w.finish()
    }
}

/// How many blocks [`ResumeMap::write_changing`] reads at once (64 KiB of hashes): a running
/// copy's workers wait for no longer than that takes to copy.
const CHANGING_CHUNK: u64 = 2048;

/// A map kept as what differs from another, its base (the hub keeps each incremental backup's
/// block hashes so, against its parent's: `hub::blockhashes`). On disk: `SNDBLD01`, disk size,
/// block size, block count (u64 little endian), the BLAKE3 of the base's hashes ([`digest`]),
/// the BLAKE3 of the hashes it yields (so that a chain of them is checked link by link without
/// hashing every map on the way), the length (u16) and the bytes of the base's name (relative, as a qcow2 image names its
/// backing file), the set of blocks that differ (one bit each), their hashes, and a BLAKE3 of all
/// of that. Applied only to the base it was made against: the digest says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDiff {
    disk_size: u64,
    block_size: u64,
    count: u64,
    base_digest: Hash,
    /// The digest of the map it yields.
    yields: Hash,
    base_name: String,
    changed: BlockSet,
    hashes: Vec<Hash>,
}

const DIFF_MAGIC: &[u8; 8] = b"SNDBLD01";

/// The BLAKE3 of a map's hashes in order: what a [`MapDiff`] names its base by.
pub fn digest(map: &BlockMap) -> Hash {
    let mut h = blake3::Hasher::new();
    for hash in &map.hashes {
        h.update(hash);
    }
    *h.finalize().as_bytes()
}

impl MapDiff {
    /// What differs in `map` from `base` (of the same geometry: else `None`), `base` named
    /// `base_name` (at most 4096 bytes, relative).
    pub fn between(map: &BlockMap, base: &BlockMap, base_name: &str) -> Option<Self> {
        let geometry = |m: &BlockMap| (m.disk_size, m.block_size, m.hashes.len());
        if geometry(map) != geometry(base) || !valid_base_name(base_name) {
            return None;
        }
        let mut changed = BlockSet::default();
        for (i, (mine, theirs)) in (0u64..).zip(map.hashes.iter().zip(&base.hashes)) {
            if mine != theirs {
                changed.insert_run(i, 1);
            }
        }
        Self::of_changes(map, digest(base), base_name, changed)
    }

    /// The same, told which blocks of `map` differ from its base's (a superset does no harm: a
    /// block named with its base's hash is stored again) and the base's [`digest`], for a caller
    /// that made `map` from the base in place and so no longer has it (`hub::verify`). `None` if
    /// the set names a block `map` does not have, or `base_name` is not one.
    pub fn of_changes(map: &BlockMap, base_digest: Hash, base_name: &str, changed: BlockSet) -> Option<Self> {
        let count = map.hashes.len() as u64;
        if !valid_base_name(base_name) || changed.iter().last().is_some_and(|b| b >= count) {
            return None;
        }
        let hashes = changed.iter().filter_map(|b| map.hashes.get(usize::try_from(b).ok()?).copied()).collect();
        Some(Self {
            disk_size: map.disk_size,
            block_size: map.block_size,
            count,
            base_digest,
            yields: digest(map),
            base_name: base_name.to_string(),
            changed,
            hashes,
        })
    }

    /// Disk size and block size.
    pub fn geometry(&self) -> (u64, u64) {
        (self.disk_size, self.block_size)
    }

    /// Whether `base` is the map this was made against.
    pub fn made_against(&self, base: &BlockMap) -> bool {
        self.fits(base) && digest(base) == self.base_digest
    }

    /// The [`digest`] of the map it yields (as written: [`MapDiff::apply`] checks it).
    pub fn yields(&self) -> Hash {
        self.yields
    }

    fn fits(&self, base: &BlockMap) -> bool {
        (base.disk_size, base.block_size, base.hashes.len() as u64) == (self.disk_size, self.block_size, self.count)
    }

    /// The base's name, as given to [`MapDiff::between`].
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// How many blocks differ from the base.
    pub fn changed(&self) -> u64 {
        self.changed.len()
    }

    /// The bytes of its file.
    pub fn to_bytes(&self) -> Vec<u8> {
        sealed_bytes(|w| {
            let name = self.base_name.as_bytes();
            w.put(DIFF_MAGIC)?;
            for field in [self.disk_size, self.block_size, self.count] {
                w.put(&field.to_le_bytes())?;
            }
            w.put(&self.base_digest)?;
            w.put(&self.yields)?;
            w.put(&(name.len() as u16).to_le_bytes())?;
            w.put(name)?;
            self.changed.put_words(self.count, w)?;
            self.hashes.iter().try_for_each(|h| w.put(h))
        })
    }

    /// One from the bytes of its file; `None` unless the trailer, magic and geometry check out
    /// and every part is in the file (nothing is allocated that the file does not hold).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (body, trailer) = bytes.split_at(bytes.len().checked_sub(32)?);
        if blake3::hash(body).as_bytes() != trailer || body.get(..8)? != DIFF_MAGIC {
            return None;
        }
        let word = |i: usize| body.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let (disk_size, block_size, count) = (word(8)?, word(16)?, word(24)?);
        if !valid_block_size(block_size) || count != block_count(disk_size, block_size) {
            return None;
        }
        let base_digest: Hash = body.get(HEADER_LEN..HEADER_LEN + 32)?.try_into().ok()?;
        let yields: Hash = body.get(HEADER_LEN + 32..HEADER_LEN + 64)?.try_into().ok()?;
        let name_len = usize::from(u16::from_le_bytes(body.get(HEADER_LEN + 64..HEADER_LEN + 66)?.try_into().ok()?));
        let name = body.get(HEADER_LEN + 66..HEADER_LEN + 66 + name_len)?;
        let base_name = String::from_utf8(name.to_vec()).ok().filter(|n| valid_base_name(n))?;
        let (changed, rest) = BlockSet::take_words(body.get(HEADER_LEN + 66 + name_len..)?, count)?;
        if rest.len() as u64 != changed.len().checked_mul(32)? {
            return None;
        }
        let hashes = rest.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
        Some(Self { disk_size, block_size, count, base_digest, yields, base_name, changed, hashes })
    }

    /// The map: `base`'s hashes with the changed blocks' replaced; `None` if `base` is not the
    /// map this was made against.
    pub fn apply(&self, base: BlockMap) -> Option<BlockMap> {
        let base_digest = digest(&base);
        let map = self.apply_to(base, &base_digest)?;
        (digest(&map) == self.yields).then_some(map)
    }

    /// The same along a chain: `base` is known by `base_digest` (its file's [`MapDiff::yields`],
    /// or the [`digest`] of a whole map), so no map on the way is hashed again; whoever walks a
    /// chain so checks the digest of the last map against the last [`MapDiff::yields`].
    pub fn apply_to(&self, mut base: BlockMap, base_digest: &Hash) -> Option<BlockMap> {
        if !self.fits(&base) || *base_digest != self.base_digest {
            return None;
        }
        for (block, hash) in self.changed.iter().zip(&self.hashes) {
            *base.hashes.get_mut(usize::try_from(block).ok()?)? = *hash;
        }
        Some(base)
    }
}

/// A base's name: not empty, relative, at most 4096 bytes.
fn valid_base_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('/') && name.len() <= 4096
}

/// Length of block `index`.
pub fn block_len(disk_size: u64, block_size: u64, index: u64) -> u64 {
    let start = index * block_size;
    (disk_size - start.min(disk_size)).min(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Append the BLAKE3 of `body` to it.
    fn seal(body: &mut Vec<u8>) {
        let trailer = blake3::hash(body);
        body.extend_from_slice(trailer.as_bytes());
    }

    /// A resume map of `count` 4 KiB blocks: every third zero, every fifth unknown, the rest
    /// data; the even ones done.
    fn sample_resume(count: u64) -> ResumeMap {
        let mut map = BlockMap::zeroed(count * 4096 - 100, 4096);
        for (b, h) in (0u64..).zip(map.hashes.iter_mut()) {
            match (b % 3, b % 5) {
                (0, _) => {}
                (_, 0) => *h = UNKNOWN,
                _ => *h = hash_block(&b.to_le_bytes()),
            }
        }
        let mut done = BlockSet::default();
        (0..count).step_by(2).for_each(|b| done.insert_run(b, 1));
        ResumeMap { map, done }
    }

    /// What `write_changing` reads from a map that does not change: blocks `first..`.
    fn read_from(map: &ResumeMap) -> impl FnMut(u64, &mut [Hash], &mut [bool]) + '_ {
        move |first, hashes, done| {
            for ((b, h), d) in (first..).zip(hashes.iter_mut()).zip(done.iter_mut()) {
                *h = map.map.hashes[b as usize];
                *d = map.done.contains(b);
            }
        }
    }

    #[test]
    fn a_changing_resume_map_is_written_as_a_still_one_and_each_block_as_one_of_its_two_reads() {
        // More blocks than one chunk, and a last chunk cut short.
        let count = CHANGING_CHUNK * 2 + 77;
        let still = sample_resume(count);
        let mut out = Vec::new();
        ResumeMap::write_changing(&mut out, still.map.disk_size, 4096, read_from(&still)).unwrap();
        assert!(out == still.to_bytes(), "the same bytes as the map saved whole");
        assert_eq!(ResumeMap::from_bytes(&out), Some(still.clone()));

        // Between the two reads the copy moved on: blocks unknown got their hashes (some of them
        // the zero hash), blocks the base's became unknown (a write began), more were done.
        let mut later = still.clone();
        let zero = ZeroHashes::new(later.map.disk_size, 4096);
        for (b, h) in (0u64..).zip(later.map.hashes.iter_mut()) {
            if *h == UNKNOWN {
                *h = if b % 7 == 0 { zero.of_len(4096) } else { hash_block(&[b as u8; 3]) };
                later.done.insert_run(b, 1);
            } else if b % 3 != 0 && b % 11 == 0 && !still.done.contains(b) {
                *h = UNKNOWN;
            }
        }
        let mut reads = 0u64;
        let (mut first_read, mut second_read) = (read_from(&still), read_from(&later));
        let mut out = Vec::new();
        ResumeMap::write_changing(&mut out, still.map.disk_size, 4096, |first, hashes, done| {
            reads += 1;
            if reads <= count.div_ceil(CHANGING_CHUNK) {
                first_read(first, hashes, done);
            } else {
                second_read(first, hashes, done);
            }
        })
        .unwrap();
        assert_eq!(reads, 2 * count.div_ceil(CHANGING_CHUNK), "every block read twice");
        let got = ResumeMap::from_bytes(&out).expect("the file checks out");
        assert_eq!(got.done, still.done, "done as at the first read");
        for b in 0..count as usize {
            let (before, after) = (still.map.hashes[b], later.map.hashes[b]);
            let expected = if before == zero.of_len(4096) { before } else { after };
            assert_eq!(got.map.hashes[b], expected, "block {b}");
        }
    }

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
        std::fs::write(&path, b"SNDMAP02").unwrap();
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

    /// A file as the versions before wrote it: every hash stored.
    fn v1_file(magic: &[u8; 8], map: &BlockMap, after: &[u8]) -> Vec<u8> {
        let mut body = magic.to_vec();
        for w in [map.disk_size, map.block_size, map.hashes.len() as u64] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        map.hashes.iter().for_each(|h| body.extend_from_slice(h));
        body.extend_from_slice(after);
        seal(&mut body);
        body
    }

    #[test]
    fn zero_blocks_are_not_stored_and_maps_of_the_version_before_still_load() {
        // A thin disk: 2 TiB in 512 KiB blocks, three of them holding data, one never read.
        let (size, block) = (2u64 << 40, 512u64 << 10);
        let mut map = BlockMap::zeroed(size, block);
        let count = map.hashes.len();
        for (i, h) in [(0, hash_block(b"boot")), (4000, UNKNOWN), (count - 1, hash_block(b"end"))] {
            map.hashes[i] = h;
        }
        let bytes = map.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + count / 8 + 3 * 32 + 32, "one bit per zero block");
        assert_eq!(BlockMap::from_bytes(&bytes), Some(map.clone()));
        assert_eq!(BlockMap::from_bytes(&v1_file(MAGIC_V1, &map, &[])), Some(map.clone()));
        // A short last block: its zero hash is of its own length.
        let tail = BlockMap::zeroed(3 * 65536 + 100, 65536);
        assert_eq!(tail.to_bytes().len(), HEADER_LEN + 8 + 32);
        assert_eq!(BlockMap::from_bytes(&tail.to_bytes()), Some(tail.clone()));
        // A full disk pays a bit per block.
        let mut full = BlockMap::zeroed(130 * 4096, 4096);
        full.hashes.iter_mut().enumerate().for_each(|(i, h)| *h = hash_block(&i.to_le_bytes()));
        assert_eq!(full.to_bytes().len(), HEADER_LEN + 3 * 8 + 130 * 32 + 32);
        assert_eq!(BlockMap::from_bytes(&full.to_bytes()), Some(full.clone()));
        // Resume maps likewise, and one of the version before.
        let mut done = BlockSet::default();
        done.insert_run(1, 129);
        let resume = ResumeMap { map: full.clone(), done: done.clone() };
        assert_eq!(ResumeMap::from_bytes(&resume.to_bytes()), Some(resume.clone()));
        let words: Vec<u8> = (0..130u64)
            .step_by(64)
            .flat_map(|first| {
                (first..(first + 64).min(130))
                    .filter(|b| done.contains(*b))
                    .fold(0u64, |w, b| w | 1 << (b % 64))
                    .to_le_bytes()
            })
            .collect();
        assert_eq!(ResumeMap::from_bytes(&v1_file(RESUME_MAGIC_V1, &full, &words)), Some(resume));
        let old = ResumeMap::from_bytes(&v1_file(MAGIC_V1, &map, &[])).unwrap();
        assert!(old.map == map && old.done.is_empty());
        // A zero set naming a block past the disk, sealed as the node would: refused.
        let mut bytes = tail.to_bytes();
        bytes.truncate(bytes.len() - 32);
        bytes[HEADER_LEN] |= 0x10;
        seal(&mut bytes);
        assert_eq!(BlockMap::from_bytes(&bytes), None);
    }

    #[test]
    fn a_difference_applies_to_its_base_only_and_a_damaged_or_cut_one_not_at_all() {
        let mut base = BlockMap::zeroed(100 * 65536 + 512, 65536);
        base.hashes[3] = hash_block(b"x");
        let mut map = base.clone();
        map.hashes[3] = hash_block(b"y");
        map.hashes[100] = hash_block(b"tail");
        let diff = MapDiff::between(&map, &base, "../full/disk-2000.blocks").unwrap();
        assert_eq!(diff.changed(), 2);
        let bytes = diff.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + 66 + 24 + 2 * 8 + 2 * 32 + 32, "one bit per block, the changed hashes");
        let loaded = MapDiff::from_bytes(&bytes).unwrap();
        assert_eq!((loaded.base_name(), loaded.apply(base.clone())), ("../full/disk-2000.blocks", Some(map.clone())));
        assert_eq!(loaded.apply(map.clone()), None, "another base");
        assert_eq!(MapDiff::between(&map, &BlockMap::zeroed(1 << 20, 65536), "b"), None, "another geometry");
        assert_eq!(MapDiff::between(&map, &base, "/etc/passwd"), None);
        for cut in [1, 32, bytes.len() - 40] {
            assert_eq!(MapDiff::from_bytes(&bytes[..bytes.len() - cut]), None, "cut {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[70] ^= 1;
        assert_eq!(MapDiff::from_bytes(&flipped), None);
        // Sealed again: a block past the disk, or a base by an absolute path.
        let resealed = |at: usize, f: fn(&mut u8)| {
            let mut body = bytes[..bytes.len() - 32].to_vec();
            f(&mut body[at]);
            seal(&mut body);
            MapDiff::from_bytes(&body)
        };
        assert_eq!(resealed(HEADER_LEN + 66, |b| *b = b'/'), None);
        assert_eq!(resealed(HEADER_LEN + 66 + 24 + 8, |b| *b |= 0x80), None);
        assert!(resealed(HEADER_LEN + 66, |b| *b = b'.').is_some(), "the same resealed: accepted");
        // What it says it yields is checked: another digest, and the map it gives is refused.
        let lying = MapDiff::from_bytes(&{
            let mut body = bytes[..bytes.len() - 32].to_vec();
            body[HEADER_LEN + 40] ^= 1;
            seal(&mut body);
            body
        })
        .unwrap();
        assert_eq!(lying.apply(base.clone()), None);
        assert_eq!(lying.apply_to(base.clone(), &digest(&base)), Some(map.clone()), "a chain checks its last link");
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
