//! Sending a request: the whole frame or nothing.
//!
//! A request takes an in-flight slot, registers under a fresh cookie, and writes its header and
//! payload under the connection's write lock, so frames of concurrent requests never interleave.
//! Cancel safety lives here: a request future dropped before its frame is out takes its pending
//! entry with it ([`Unsent`]), and one dropped in the middle of its frame closes the write half
//! ([`PoisonOnDrop`]), so the server sees a truncated frame and EOF, never a frame finished with
//! another request's bytes. An owned payload goes through the transport's own path when it has
//! one ([`SendBytes`]: an SSH channel takes the bytes as they are).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::replies::{Expect, Pending};
use super::{Client, ClientError, Inner, Result, SendBytes, Writer};
use crate::proto::transmission::{self as tx, Command, Request};

/// A connection's sending side: the byte stream, and the transport's own path for owned
/// payloads when it has one ([`SendBytes`]).
pub(super) struct WriteSide {
    pub(super) stream: Writer,
    pub(super) payloads: Option<Arc<dyn SendBytes>>,
}

/// A request's payload: borrowed from the caller, or owned and shared with it (`Bytes`).
pub(super) enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

impl Payload<'_> {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Borrowed(b) => b,
            Self::Owned(b) => b,
        }
    }
}

impl Client {
    /// Send one request and wait for its reply, within the request timeout if there is one
    /// (the whole of it: waiting for a slot, writing, and the reply).
    pub(super) async fn submit(&self, request: Request, payload: Payload<'_>, expect: Expect) -> Result<Expect> {
        let Some(limit) = self.inner.request_timeout else {
            return self.exchange(request, payload, expect).await;
        };
        match tokio::time::timeout(limit, self.exchange(request, payload, expect)).await {
            Ok(result) => result,
            Err(_) => {
                let Request { command, offset, length, .. } = request;
                tracing::warn!(?command, offset, length, timeout = ?limit, "NBD request timed out; closing the connection");
                self.inner.close();
                Err(ClientError::TimedOut(limit))
            }
        }
    }

    /// Take an in-flight slot, register the request under a fresh cookie, write it whole, and
    /// wait for the reader to hand back its reply.
    async fn exchange(&self, request: Request, payload: Payload<'_>, expect: Expect) -> Result<Expect> {
        let slot = self.inner.slots.clone().acquire_owned().await.map_err(|_| ClientError::Closed)?;
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut p = self.inner.pending.lock().map_err(|_| ClientError::Closed)?;
            if p.closed {
                return Err(ClientError::Closed);
            }
            p.map.insert(cookie, Pending { expect, error: None, reply: reply_tx, _slot: slot });
        }
        // Until the whole frame is out, no reply can come for this cookie: if this future is
        // dropped (or fails) before then, the entry and its in-flight slot go with it.
        let mut unsent = Unsent { inner: &self.inner, cookie, armed: true };
        let mut head = Vec::with_capacity(32);
        tx::encode_request(&mut head, self.inner.mode, &Request { cookie, ..request })?;
        let sent: Result<()> = async {
            let mut slot = self.inner.writer.lock().await;
            if slot.is_none() {
                return Err(ClientError::Closed);
            }
            // Dropped before `complete` is set (the caller's future cancelled mid-frame), the
            // guard closes the write half: a half-written frame must never be continued.
            let mut guard = PoisonOnDrop { slot: &mut slot, complete: false };
            let frame: std::io::Result<()> = async {
                let w = guard.slot.as_mut().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))?;
                w.stream.write_all(&head).await?;
                match (payload, &w.payloads) {
                    (Payload::Owned(data), Some(transport)) if !data.is_empty() => {
                        w.stream.flush().await?;
                        transport.send(data).await
                    }
                    (payload, _) => {
                        if !payload.as_slice().is_empty() {
                            w.stream.write_all(payload.as_slice()).await?;
                        }
                        w.stream.flush().await
                    }
                }
            }
            .await;
            guard.complete = frame.is_ok();
            frame.map_err(ClientError::from)
        }
        .await;
        sent?;
        unsent.disarm();
        reply_rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Soft-disconnect: send NBD_CMD_DISC and close the write half.
    ///
    /// A server closes its side once it has read NBD_CMD_DISC, so closing ours after it may find
    /// the connection gone (`EPIPE`, `ECONNRESET`: over TLS the close_notify is a write): the
    /// request was sent whole, and that is the disconnect done, not an error.
    ///
    /// # Errors
    /// The socket failed before the request was sent.
    pub async fn disconnect(&self) -> Result<()> {
        let mut head = Vec::with_capacity(32);
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        tx::encode_request(
            &mut head,
            self.inner.mode,
            &Request { flags: 0, command: Command::Disconnect, cookie, offset: 0, length: 0 },
        )?;
        let mut slot = self.inner.writer.lock().await;
        if slot.is_none() {
            return Ok(());
        }
        let mut guard = PoisonOnDrop { slot: &mut slot, complete: false };
        if let Some(w) = guard.slot.as_mut() {
            w.stream.write_all(&head).await?;
            w.stream.flush().await?;
            match w.stream.shutdown().await {
                Err(e) if !server_hung_up(&e) => return Err(e.into()),
                _ => {}
            }
        }
        guard.complete = true;
        Ok(())
    }
}

/// Whether `e` says the peer closed the connection already (after our NBD_CMD_DISC, as it must).
fn server_hung_up(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected};
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected)
}

/// A registered request whose frame has not been written whole: dropped armed, it takes its
/// pending entry (and so its in-flight slot) out of the table.
struct Unsent<'a> {
    inner: &'a Inner,
    cookie: u64,
    armed: bool,
}

impl Unsent<'_> {
    /// The frame is out: from now on the reader owns the entry.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut p) = self.inner.pending.lock() {
                p.map.remove(&self.cookie);
            }
        }
    }
}

/// Closes the write half unless the frame it guards was written whole.
struct PoisonOnDrop<'a, 'b> {
    slot: &'a mut tokio::sync::MutexGuard<'b, Option<WriteSide>>,
    complete: bool,
}

impl Drop for PoisonOnDrop<'_, '_> {
    fn drop(&mut self) {
        if !self.complete {
            // Dropping the write half shuts the socket's sending side: the server sees EOF in
            // the middle of a frame and discards it.
            if self.slot.take().is_some() {
                tracing::debug!("request dropped mid-frame: connection closed");
            }
        }
    }
}
