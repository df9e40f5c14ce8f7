//! Disks held inside image files: a qcow2 image read through its metadata (and its backing
//! chain) as the disk it holds, and the sniffing that keeps a file whose format nobody stated
//! from being copied byte for byte when it is an image.
//!
//! Why sniff: a libvirt VM's disk is usually a qcow2 file, and that file copied as it is makes
//! a backup of the container, not of the disk. It restores to a disk the guest cannot boot, and
//! nothing on the way notices (the checksums are of what was sent). Why not then read every file
//! that looks like qcow2 as qcow2: a raw disk's first sector is the guest's to write, and a guest
//! can write a qcow2 header there whose backing file names any file of the host (qemu's
//! format-probing hole, CVE-2008-2004). So the operator states the format (`format = "qcow2"` or
//! `"raw"`), and a file that starts like a disk image while its format was not stated is refused,
//! naming both ways out.
//!
//! qcow2 sources are read with the workspace's `qcow2` crate, read-only, with backing formats
//! never guessed (the same hole one level down: an image must record its backing file's
//! format, as qemu-img has insisted since 6.1). Its lookups and reads are synchronous; they run
//! on the blocking pool so the async workers never wait on the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{Bitmap, ExtentKind, Image, ImageOptions};

use super::Range;
use crate::error::MoveError;

/// Image formats told by their first bytes: (offset, magic, name qemu gives the format).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
];

/// Bytes read to tell an image by its signature.
const SNIFF_LEN: usize = 512;

/// The image format `file` starts with, if any: `None` for a file that could be a raw disk.
///
/// # Errors
/// The file cannot be read.
pub fn sniff(file: &File) -> std::io::Result<Option<&'static str>> {
    let mut head = [0u8; SNIFF_LEN];
    let mut got = 0;
    while got < head.len() {
        let Some(rest) = head.get_mut(got..) else { break };
        match file.read_at(rest, got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = head.get(..got).unwrap_or_default();
    Ok(SIGNATURES
        .iter()
        .find(|(at, magic, _)| head.get(*at..at + magic.len()) == Some(*magic))
        .map(|(_, _, name)| *name))
}

/// Refuse a file whose format was not stated but which starts like a disk image.
///
/// # Errors
/// It is (or looks like) an image; it cannot be read.
pub fn refuse_unstated_image(file: &File, path: &Path) -> Result<(), MoveError> {
    let format = sniff(file)
        .map_err(|source| MoveError::Source { what: format!("{}: read its first sector", path.display()), source })?;
    match format {
        None => Ok(()),
        Some("qcow2") => Err(MoveError::Mismatch(format!(
            "source {} holds a qcow2 image (it starts with qcow2's signature), and its format is not stated: \
             set format = \"qcow2\" on the disk to back up the disk inside it (or give it as qcow2:{0} to --vm \
             and --source), or format = \"raw\" if it is a raw disk whose guest wrote those bytes",
            path.display()
        ))),
        Some(other) => Err(MoveError::Mismatch(format!(
            "source {} starts like a {other} image, which the node does not read: serve it with \
             `qemu-nbd -r -f {other}` and give its nbd:// URL as the source, or set format = \"raw\" if it is \
             a raw disk whose guest wrote those bytes",
            path.display()
        ))),
    }
}

/// A qcow2 image read as the disk it holds (clones share the open image), with the persistent
/// bitmap its changes are read from, if one was configured and can be trusted.
#[derive(Clone)]
pub struct Qcow2Source {
    image: Arc<Image>,
    path: PathBuf,
    bitmap: Option<Bitmap>,
    bitmap_note: Option<String>,
}

impl Qcow2Source {
    /// Open `path` read-only with its backing chain, and find `bitmap` in it. A bitmap that is
    /// in use (qemu has the image open for writing, or did not close it) or was invalidated is
    /// not trusted: the copy then reads every block and compares, and [`Self::bitmap_note`]
    /// says why.
    ///
    /// # Errors
    /// Not a qcow2 image, a broken chain, a backing file whose format is not recorded, or no
    /// bitmap of that name (an incremental must never quietly become "nothing changed").
    pub fn open(path: &Path, bitmap: Option<&str>) -> Result<Self, MoveError> {
        let options = ImageOptions::default().probe_backing_format(false);
        let image = Image::open_with(path, &options).map_err(|source| MoveError::SourceImage {
            what: format!("{} (format qcow2)", path.display()),
            hint: hint(&source),
            source,
        })?;
        let mut source = Self { image: Arc::new(image), path: path.to_path_buf(), bitmap: None, bitmap_note: None };
        let Some(name) = bitmap else { return Ok(source) };
        let bitmaps = source.image.bitmaps().map_err(|e| source.error("bitmaps", e))?;
        let Some(found) = bitmaps.iter().find(|b| b.name == name) else {
            let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
            return Err(MoveError::Mismatch(format!(
                "source {} has no bitmap named {name} (it has: {})",
                path.display(),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        };
        if found.consistent() {
            source.bitmap = Some(found.clone());
        } else {
            let why = match found.in_use {
                true => "is in use (qemu has the image open for writing, or did not close it cleanly)",
                false => "was invalidated (a program that does not keep bitmaps wrote the image)",
            };
            source.bitmap_note =
                Some(format!("bitmap {name} of {} {why}: every block is read and compared instead", path.display()));
        }
        Ok(source)
    }

    /// Whether changes are read from a bitmap.
    pub fn has_dirty_bitmap(&self) -> bool {
        self.bitmap.is_some()
    }

    /// Why the configured bitmap is not used, if it is not.
    pub fn bitmap_note(&self) -> Option<&str> {
        self.bitmap_note.as_deref()
    }

    /// Runs from `offset` for up to `length` bytes by the bitmap: `data` = changed.
    ///
    /// # Errors
    /// No bitmap, or a malformed one.
    pub async fn dirty(&self, offset: u64, length: u64) -> Result<Vec<Range>, MoveError> {
        let Some(bitmap) = self.bitmap.clone() else {
            return Err(MoveError::Mismatch("this source has no dirty bitmap".into()));
        };
        let image = Arc::clone(&self.image);
        let runs = tokio::task::spawn_blocking(move || image.bitmap_runs(&bitmap, offset, length))
            .await
            .map_err(|e| MoveError::Source { what: format!("{}: bitmap", self.path.display()), source: e.into() })?
            .map_err(|e| self.error(&format!("bitmap at {offset:#x}"), e))?;
        Ok(runs.into_iter().map(|(length, dirty)| Range { length, data: dirty }).collect())
    }

    /// The disk's size (the image's virtual size).
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The image's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata of the image's file and of its backing chain's, as open (`source/stamp.rs`).
    pub fn chain_metadata(&self) -> Option<Vec<std::fs::Metadata>> {
        self.image.chain_metadata().ok()
    }

    /// Allocation from `offset` for up to `length` bytes, through the backing chain: data
    /// clusters (in any layer) are read, zero and unallocated ones are not.
    ///
    /// # Errors
    /// Malformed metadata or I/O.
    pub async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Range>, MoveError> {
        let end = offset.saturating_add(length).min(self.size());
        if offset >= end {
            return Ok(vec![Range { length: length.max(1), data: true }]);
        }
        let image = Arc::clone(&self.image);
        let extents = tokio::task::spawn_blocking(move || image.map(offset, end - offset))
            .await
            .map_err(|e| MoveError::Source { what: format!("{}: map", self.path.display()), source: e.into() })?
            .map_err(|source| self.error(&format!("map at {offset:#x}"), source))?;
        Ok(extents.into_iter().map(|e| Range { length: e.length, data: e.kind == ExtentKind::Data }).collect())
    }

    /// Fill `buf` from the disk at `offset`; past the disk's end it reads as zeroes (the tail of
    /// the last block).
    ///
    /// # Errors
    /// Malformed metadata or I/O.
    pub fn read_blocking(&self, buf: &mut [u8], offset: u64) -> Result<(), MoveError> {
        let inside = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            self.image.read_at(head, offset).map_err(|source| self.error(&format!("read at {offset:#x}"), source))?;
        }
        tail.fill(0);
        Ok(())
    }

    fn error(&self, what: &str, source: qcow2::Error) -> MoveError {
        MoveError::SourceImage { what: format!("{}: {what}", self.path.display()), hint: hint(&source), source }
    }
}

/// What the operator can do about an image the node cannot read, where there is something.
fn hint(error: &qcow2::Error) -> String {
    match error {
        qcow2::Error::Unsupported(what) if what.contains("no recorded format") => {
            " (record it: qemu-img rebase -u -F FORMAT -b BACKING IMAGE)".into()
        }
        qcow2::Error::NotQcow2(_) => " (the file is not a qcow2 image: is its format raw?)".into(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(bytes, 0).unwrap();
        f
    }

    #[test]
    fn image_signatures_are_told_and_raw_disks_are_not() {
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..].copy_from_slice(b"\x7f\x10\xda\xbe");
        for (bytes, want) in [
            (&b"QFI\xfb\0\0\0\x03"[..], Some("qcow2")),
            (b"QED\0", Some("qed")),
            (b"KDMV\x01", Some("vmdk")),
            (b"# Disk DescriptorFile\nversion=1", Some("vmdk")),
            (b"vhdxfile", Some("vhdx")),
            (b"conectix", Some("vpc")),
            (&vdi, Some("vdi")),
            (b"\xeb\x63\x90 a boot sector", None),
            (b"QFI", None),
            (b"", None),
        ] {
            assert_eq!(sniff(file_with(bytes).as_file()).unwrap(), want, "{bytes:?}");
        }
    }

    #[test]
    fn an_unstated_image_is_refused_naming_the_ways_out() {
        let f = file_with(b"QFI\xfb\0\0\0\x03");
        let e = refuse_unstated_image(f.as_file(), f.path()).unwrap_err().to_string();
        assert!(
            e.contains("holds a qcow2 image") && e.contains("format = \"qcow2\"") && e.contains("format = \"raw\""),
            "{e}"
        );
        let f = file_with(b"KDMV");
        let e = refuse_unstated_image(f.as_file(), f.path()).unwrap_err().to_string();
        assert!(e.contains("vmdk") && e.contains("qemu-nbd -r -f vmdk"), "{e}");
        let f = file_with(&[0u8; 4096]);
        refuse_unstated_image(f.as_file(), f.path()).unwrap();
    }
}
