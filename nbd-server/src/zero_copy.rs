//! Payloads handed to the transport by ownership instead of copied into it, both ways.
//!
//! A byte stream (`AsyncWrite`) takes a borrowed slice, so a transport whose unit is an owned
//! message copies every payload byte into one: an SSH channel (russh's `ChannelTx` copies each
//! packet's worth into a new `Bytes`). That copy was 9% of the node's CPU during a backup through
//! the tunnel and 12% of the hub's during a restore. A transport that can take the sender's
//! buffer as it is implements [`SendBytes`]:
//!
//! - the client: [`Client::handshake_with_payloads`](crate::Client::handshake_with_payloads)
//!   gives it to a connection, and [`Client::write_bytes`](crate::Client::write_bytes) writes
//!   the request header to the stream and hands the payload (a `Bytes` sharing the caller's
//!   buffer) to `send`; on any other connection `write_bytes` is a plain write;
//! - the server: [`Server::serve_stream_with_payloads`](crate::Server::serve_stream_with_payloads)
//!   sends a large read reply's data that way, the reply's pooled buffer going back to the pool
//!   when the transport lets go of it.
//!
//! In both, header and data are one frame: the writer (the client's writer lock, the server's
//! single writer task) does both before anything else, and a frame abandoned between them ends
//! the connection as a half-written one does.
//!
//! The other way, a transport whose unit is an owned message would have every byte of a read
//! reply copied out of its messages into the caller's buffer (13% of the node's CPU in a restore
//! through the tunnel). One that can hand out what it received as it is implements
//! [`ReceiveBytes`]: a client made by
//! [`Client::handshake_zero_copy`](crate::Client::handshake_zero_copy) answers
//! [`Client::read_bytes`](crate::Client::read_bytes) with the transport's own pieces, in order,
//! for the caller to hash and write out with `pwritev` without ever joining them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncRead;

/// A transport that takes bytes without copying them. The contract: whatever was written to
/// the connection's byte stream before `send` is called reaches the peer before `data`, and
/// `data` reaches it whole and in order, or `send` fails.
pub trait SendBytes: Send + Sync {
    /// Queue `data` after everything written so far; done once it is handed to the transport.
    fn send(&self, data: Bytes) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>>;
}

/// A byte stream that can also hand out what it received as owned `Bytes`. The contract: reads
/// through `AsyncRead` and [`ReceiveBytes::poll_receive`] take from the same stream, in order.
pub trait ReceiveBytes: AsyncRead + Unpin + Send + 'static {
    /// The next bytes of the stream, at least one and at most `max` of them; empty at its end.
    ///
    /// # Errors
    /// The transport failed.
    fn poll_receive(self: Pin<&mut Self>, cx: &mut Context<'_>, max: usize) -> Poll<std::io::Result<Bytes>>;
}
