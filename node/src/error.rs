//! What can stop a disk copy, as one typed error the job layer reports per disk.

use nbd_server::ClientError;

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The source could not be opened or read.
    #[error("source {what}: {source}")]
    Source {
        /// Which source and step.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A qcow2 source could not be opened or read.
    #[error("source {what}: {source}{hint}")]
    SourceImage {
        /// Which image and step.
        what: String,
        /// What the operator can do, or empty.
        hint: String,
        /// Cause.
        #[source]
        source: qcow2::Error,
    },
    /// An NBD source failed a request.
    #[error("source {what}: {source}")]
    SourceNbd {
        /// Which source and step.
        what: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// The target could not be reached, or stayed unreachable past the retry window.
    #[error("target {target} unreachable: {source}")]
    Unreachable {
        /// `host:port/export`.
        target: String,
        /// The last failure.
        #[source]
        source: ClientError,
    },
    /// The target server failed a request (ENOSPC, EIO...): not retried.
    #[error("target {target} failed {op} at {offset:#x}: {source}")]
    Target {
        /// `host:port/export`.
        target: String,
        /// The request.
        op: &'static str,
        /// Where.
        offset: u64,
        /// The server's answer.
        #[source]
        source: ClientError,
    },
    /// A local destination file failed (restores).
    #[error("destination {what}: {source}")]
    Destination {
        /// Which file and step.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Source and target do not fit.
    #[error("{0}")]
    Mismatch(String),
    /// Cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}
