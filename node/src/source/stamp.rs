//! What a source's files were when a copy started, so that a copy taken up after the node stopped
//! (`jobs/copy.rs`, `jobs/handover.rs`) can tell whether they are still the same: if they are,
//! the blocks the stopped run finished are not read again (`mover`, [`Base::Resume`]); if not
//! (a host restarted and its VM wrote the disk, a snapshot was made again at the same path), the
//! resumed copy reads the whole disk and compares, so that it is of one point in time.
//!
//! A file is known by its device and inode (the path may be given to another file) with its size
//! and change time: any write changes the change time, and no program can set it back (`utimes`
//! sets the modification time; setting the change time means setting the clock). The files are
//! stat'ed through the descriptors the copy reads, every file of a qcow2 chain included. A block
//! device has no stamp: a write through it changes no inode's times, so only reading it again
//! tells; an NBD export has none either.
//!
//! [`Base::Resume`]: crate::mover::Base::Resume

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use super::Source;

/// The files a source reads, as they were (module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStamp {
    files: Vec<FileStamp>,
}

/// One file of a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime_s: i64,
    ctime_ns: i64,
}

impl SourceStamp {
    /// The stamp of files stat'ed as open; `None` if one of them is not a regular file.
    fn of(metadata: &[std::fs::Metadata]) -> Option<Self> {
        let files = metadata
            .iter()
            .map(|m| {
                m.is_file().then(|| FileStamp {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: m.size(),
                    ctime_s: m.ctime(),
                    ctime_ns: m.ctime_nsec(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!files.is_empty()).then_some(Self { files })
    }
}

impl Source {
    /// The stamp of the files this source reads now; `None` for a block device, an NBD export,
    /// or files that cannot be stat'ed (module doc).
    pub async fn stamp(&self) -> Option<SourceStamp> {
        let metadata = match self {
            Self::File(f) => {
                let file = std::sync::Arc::clone(&f.file);
                tokio::task::spawn_blocking(move || file.metadata().map(|m| vec![m]).ok()).await.ok().flatten()
            }
            Self::Qcow2(q) => {
                let q = q.clone();
                tokio::task::spawn_blocking(move || q.chain_metadata()).await.ok().flatten()
            }
            Self::Nbd(_) => None,
        }?;
        SourceStamp::of(&metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DiskFormat;
    use crate::source::SourceSpec;

    async fn stamp_of(spec: &SourceSpec) -> Option<SourceStamp> {
        Source::open(spec, 1, Default::default()).await.unwrap().stamp().await
    }

    #[tokio::test]
    async fn a_file_written_or_replaced_has_another_stamp_and_one_left_alone_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let spec = SourceSpec::Path { path: path.clone(), format: Some(DiskFormat::Raw), dirty_bitmap: None };
        let first = stamp_of(&spec).await.expect("a regular file has a stamp");
        assert_eq!(stamp_of(&spec).await.as_ref(), Some(&first), "read again, left alone");
        // Written in place, its size and modification time put back as they were.
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"x", 100).unwrap();
        file.set_modified(before).unwrap();
        drop(file);
        let written = stamp_of(&spec).await.unwrap();
        assert_ne!(written, first, "a write changes the change time");
        // Another file put at the same path, with the same bytes.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_ne!(stamp_of(&spec).await.unwrap(), written, "another inode");
    }

    #[tokio::test]
    async fn every_file_of_a_qcow2_chain_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
        qcow2::Image::create(&base, &qcow2::CreateOptions::new(1 << 20)).unwrap().close().unwrap();
        let options = qcow2::CreateOptions::overlay("base.qcow2", qcow2::BackingFormat::Qcow2);
        qcow2::Image::create(&top, &options).unwrap().close().unwrap();
        let spec = SourceSpec::Path { path: top.clone(), format: Some(DiskFormat::Qcow2), dirty_bitmap: None };
        let first = stamp_of(&spec).await.unwrap();
        assert_eq!(first.files.len(), 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let image = qcow2::Image::open_with(&base, &qcow2::ImageOptions::read_write()).unwrap();
        image.write_at(&[1u8; 512], 0).unwrap();
        image.close().unwrap();
        assert_ne!(stamp_of(&spec).await.unwrap(), first, "the backing file was written");
    }
}
