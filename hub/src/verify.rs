//! Verifying a disk image: its refcounts against its metadata ([`qcow2::Image::check`]) and its
//! content against the checksum the node computed while sending (re-read through the backing
//! chain, hashed block by block exactly as the node did). Blocking: run it on the blocking pool.

use std::path::Path;

use qcow2::Image;

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
}

impl DiskVerdict {
    /// Clean and matching (or nothing to match).
    pub fn ok(&self) -> bool {
        self.check == "clean" && self.checksum_match != Some(false)
    }
}

/// Check `path` (a qcow2 image, or a raw replica by its `.raw` name) and compare its content
/// with `expected`.
pub fn verify_disk(path: &Path, disk_key: u32, expected: Option<&str>) -> DiskVerdict {
    if path.extension().is_some_and(|e| e == "raw") {
        let block = expected.and_then(node::blockmap::checksum_block_size).unwrap_or(64 << 10);
        return match file_checksum(path, block) {
            Ok(got) => DiskVerdict {
                disk_key,
                check: "clean".into(),
                checksum_match: expected.map(|want| want == got),
                checksum: Some(got),
            },
            Err(e) => DiskVerdict {
                disk_key,
                check: format!("cannot read: {e}"),
                checksum_match: Some(false),
                checksum: None,
            },
        };
    }
    let image = match Image::open(path) {
        Ok(i) => i,
        Err(e) => {
            return DiskVerdict {
                disk_key,
                check: format!("cannot open: {e}"),
                checksum_match: Some(false),
                checksum: None,
            }
        }
    };
    let check = match image.check() {
        Ok(r) if r.is_clean() => "clean".to_string(),
        Ok(r) => format!("{} leaked, {} corrupt clusters: {}", r.leaks, r.corruptions, r.problems.join("; ")),
        Err(e) => format!("check failed: {e}"),
    };
    let block = expected.and_then(node::blockmap::checksum_block_size);
    let (checksum, checksum_match) = match (expected, block) {
        (Some(want), Some(bs)) => match image_checksum(&image, bs) {
            Ok(got) => (Some(got.clone()), Some(got == want)),
            Err(e) => (Some(format!("read failed: {e}")), Some(false)),
        },
        (Some(_), None) => (None, Some(false)),
        (None, _) => (None, None),
    };
    DiskVerdict { disk_key, check, checksum_match, checksum }
}

/// The node's checksum format over the image's content.
///
/// # Errors
/// A read failed.
pub fn image_checksum(image: &Image, block_size: u64) -> Result<String, qcow2::Error> {
    checksum_by_blocks(image.size(), block_size, |buf, at| image.read_at(buf, at))
}

/// Hash `size` bytes in blocks of `block_size`, each read by `read(buf, offset)`.
fn checksum_by_blocks<E>(
    size: u64,
    block_size: u64,
    mut read: impl FnMut(&mut [u8], u64) -> Result<(), E>,
) -> Result<String, E> {
    let mut hashes = Vec::with_capacity(node::blockmap::block_count(size, block_size) as usize);
    let mut buf = vec![0u8; block_size as usize];
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(block_size) as usize;
        let chunk = buf.get_mut(..len).unwrap_or_default();
        read(chunk, at)?;
        hashes.push(node::blockmap::hash_block(chunk));
        at += len as u64;
    }
    Ok(node::blockmap::checksum_of_blocks(block_size, &hashes))
}

/// The node's checksum format over a raw file.
///
/// # Errors
/// A read failed.
pub fn file_checksum(path: &Path, block_size: u64) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    checksum_by_blocks(f.metadata()?.len(), block_size, |buf, at| f.read_exact_at(buf, at))
}
