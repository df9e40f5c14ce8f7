//! Write payloads handed to the transport by ownership instead of copied into it.
//!
//! A byte stream (`AsyncWrite`) takes a borrowed slice, so a transport whose unit is an owned
//! message copies every payload byte into one: an SSH channel (russh's `ChannelTx` copies each
//! packet's worth into a new `Bytes`), where that copy was 9% of the node's CPU during a backup
//! through the tunnel. A transport that can take the caller's buffer as it is implements
//! [`SendBytes`]; [`Client::handshake_with_payloads`](super::Client::handshake_with_payloads)
//! gives it to the connection, and [`Client::write_bytes`](super::Client::write_bytes) then
//! writes the request header to the stream and hands the payload (a `Bytes` sharing the
//! caller's buffer) to `send`. On any other connection `write_bytes` writes the payload to the
//! stream like [`Client::write`](super::Client::write).
//!
//! The two paths are one frame: the connection's writer lock is held across both, and a frame
//! dropped between them poisons the connection exactly as a half-written one does.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A transport that takes a payload without copying it. The contract: whatever was written to
/// the connection's byte stream before `send` is called reaches the peer before `data`, and
/// `data` reaches it whole and in order, or `send` fails.
pub trait SendBytes: Send + Sync {
    /// Queue `data` after everything written so far; done once it is handed to the transport.
    fn send(&self, data: Bytes) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>>;
}
