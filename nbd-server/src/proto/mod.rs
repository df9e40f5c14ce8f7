//! The NBD wire protocol as pure functions over bytes: no sockets, no runtime.
//!
//! `handshake` covers the fixed-newstyle negotiation, `transmission` the request and reply
//! headers, `reply` the client's checks on reply chunks, `consts` the numbers of
//! the spec. The server and the client both build on these, and
//! the fuzz targets drive them directly, which is why nothing here can panic on input.

pub mod consts;
pub mod cursor;
pub mod handshake;
pub mod reply;
pub mod transmission;

/// A byte stream that does not follow the protocol and cannot be recovered from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number was wrong.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which frame.
        what: &'static str,
        /// What was found.
        found: u64,
    },
    /// A frame's fields disagree with each other.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}
