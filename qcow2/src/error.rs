//! Errors of the qcow2 crate: one variant per failure site, with the offending field and value,
//! plus a coarse [`ErrorKind`] that callers (the NBD backend) branch on.

use std::path::PathBuf;

/// Broad class of an error, for callers that map it onto another protocol's codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image is malformed, hostile, or uses a feature this crate refuses.
    InvalidImage,
    /// A caller's argument is wrong (offset past the end, ...).
    InvalidInput,
    /// The operation is not possible on this image (read-only, corrupt bit, snapshots).
    NotPermitted,
    /// The file system is full.
    NoSpace,
    /// Any other I/O failure.
    Io,
}

/// A qcow2 failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backing chain deeper than the limit.
    #[error("backing chain deeper than {limit} images at '{path}'")]
    BackingChainTooDeep {
        /// Limit.
        limit: usize,
        /// Image where the limit was hit.
        path: PathBuf,
    },
    /// A backing chain that refers back to an image already in it.
    #[error("backing chain loops: '{path}' is already in the chain")]
    BackingLoop {
        /// Image seen twice.
        path: PathBuf,
    },
    /// A compressed cluster did not decompress into a whole cluster.
    #[error("compressed cluster at host offset {offset:#x} is corrupt: {reason}")]
    CorruptCompressedCluster {
        /// Host offset.
        offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// A header field is out of range or inconsistent.
    #[error("invalid qcow2 header field {field} = {value:#x}: {reason}")]
    InvalidHeader {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A metadata table entry is malformed.
    #[error("invalid {table} entry {index} = {value:#x}: {reason}")]
    InvalidEntry {
        /// Which table.
        table: &'static str,
        /// Index in the table.
        index: u64,
        /// Raw entry.
        value: u64,
        /// Why.
        reason: &'static str,
    },
    /// An I/O error, with what was being done.
    #[error("{op} at {offset:#x}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Offset in the file.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening a file failed.
    #[error("cannot open '{path}': {source}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request outside the virtual disk.
    #[error("range {offset:#x}+{length:#x} is outside the {size:#x}-byte disk")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Virtual size.
        size: u64,
    },
    /// Writing is not allowed.
    #[error("cannot write: {0}")]
    ReadOnly(&'static str),
    /// Not a qcow2 file.
    #[error("not a qcow2 image (magic {0:#x})")]
    NotQcow2(u32),
    /// A feature this crate does not implement.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// Bad creation parameters.
    #[error("invalid creation option {option}: {reason}")]
    InvalidOption {
        /// Option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { source, .. } | Self::Open { source, .. } => {
                if source.raw_os_error() == Some(28) || source.raw_os_error() == Some(122) {
                    ErrorKind::NoSpace
                } else {
                    ErrorKind::Io
                }
            }
            Self::OutOfRange { .. } | Self::InvalidOption { .. } => ErrorKind::InvalidInput,
            Self::ReadOnly(_) => ErrorKind::NotPermitted,
            _ => ErrorKind::InvalidImage,
        }
    }

    pub(crate) fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, offset, source }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
