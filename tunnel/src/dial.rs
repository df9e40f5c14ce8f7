//! Channels to the hub opened in process: what a local forward does, without the local socket.
//!
//! A service that runs the tunnel in its own process (the node, whose NBD client copies disks
//! to the hub) would otherwise reach the hub by connecting to the tunnel's local listener: every
//! byte written into a loopback socket by one task and read back out of it by another before
//! it is encrypted. [`TunnelDialer::open`] opens the same `direct-tcpip` channel a forwarded
//! connection would (the next SSH connection in turn, waiting for the tunnel as a forwarded
//! connection waits) and hands over its byte stream, [`TunnelStream`]: counted in the tunnel's
//! [`crate::Status`] like a forwarded connection, and ended when the tunnel stops.
//!
//! The hub decides what the channel may reach, as for any forward; the local listeners stay for
//! everything outside the process.
//!
//! A stream also gives a [`ChannelSender`]: bulk data handed over as `Bytes` becomes the channel's
//! messages as it is ([`crate::channel_io`]). The node's NBD client sends its write payloads
//! that way. The other way, [`TunnelReader::poll_receive`] hands out the channel's messages as
//! they are, and the node's NBD client takes a restore's read replies that way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::channel_io::{BytesSender, ChannelIo, ChannelReader, ChannelWriter};

use crate::client::{open_channel, OpenError, Sessions, Shared};
use crate::TunnelError;

/// Opens channels through a running [`crate::Tunnel`] (cheap to clone; it does not keep the
/// tunnel running).
#[derive(Clone)]
pub struct TunnelDialer(Arc<Dialer>);

struct Dialer {
    session: Sessions,
    shared: Arc<Shared>,
    wait: Duration,
    turn: Arc<AtomicU64>,
}

impl std::fmt::Debug for TunnelDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelDialer").field("wait", &self.0.wait).finish()
    }
}

impl TunnelDialer {
    pub(crate) fn new(session: Sessions, shared: Arc<Shared>, wait: Duration, turn: Arc<AtomicU64>) -> Self {
        Self(Arc::new(Dialer { session, shared, wait, turn }))
    }

    /// A channel to the hub's `host:port` (as the hub sees it: its loopback), waiting up to the
    /// tunnel's `connect_wait` for an SSH connection.
    ///
    /// # Errors
    /// [`TunnelError::NotUp`] when no SSH connection came up in time (or the tunnel stopped),
    /// [`TunnelError::ChannelRefused`] when the hub refused the channel.
    pub async fn open(&self, host: &str, port: u16) -> Result<TunnelStream, TunnelError> {
        let d = &self.0;
        if *d.shared.stop.borrow() {
            return Err(TunnelError::NotUp { waited: Duration::ZERO });
        }
        let mut session = d.session.clone();
        let originator = ("127.0.0.1".to_string(), 0);
        match open_channel(&mut session, d.wait, &d.turn, host, port, originator).await {
            Ok(channel) => Ok(TunnelStream::new(channel, Arc::clone(&d.shared))),
            Err(OpenError::NotUp) => Err(TunnelError::NotUp { waited: d.wait }),
            Err(OpenError::Refused(e)) => {
                Err(TunnelError::ChannelRefused { target: format!("{host}:{port}"), reason: e.to_string() })
            }
        }
    }
}

/// One channel's bytes, both ways. Dropping it closes the channel.
pub struct TunnelStream {
    reader: TunnelReader,
    writer: TunnelWriter,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream").finish_non_exhaustive()
    }
}

impl TunnelStream {
    fn new(channel: russh::Channel<Msg>, shared: Arc<Shared>) -> Self {
        let open = Arc::new(OpenChannel::new(shared));
        let (rx, tx) = ChannelIo::new(channel).into_split();
        Self {
            reader: TunnelReader { rx, stopped: Stopped::new(&open), open: Arc::clone(&open) },
            writer: TunnelWriter { tx, stopped: Stopped::new(&open), open },
        }
    }

    /// A handle that sends owned bytes on this channel without copying them, after whatever
    /// was written to the stream before (module doc).
    pub fn sender(&self) -> ChannelSender {
        self.writer.sender()
    }

    /// The two directions, for two owners (a connection's reader task and its writer); the
    /// channel closes once both are dropped.
    pub fn into_split(self) -> (TunnelReader, TunnelWriter) {
        (self.reader, self.writer)
    }
}

/// A channel counted open in the tunnel's status while either direction of it lives.
struct OpenChannel(Arc<Shared>);

impl OpenChannel {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ready once the tunnel stops: a stream fails from then on, so it lets go of its SSH
/// connection as a forwarded connection does.
struct Stopped(Pin<Box<dyn Future<Output = ()> + Send + Sync>>);

impl Stopped {
    fn new(open: &OpenChannel) -> Self {
        let mut stop = open.0.stop.subscribe();
        Self(Box::pin(async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        }))
    }

    /// `Err` once the tunnel has stopped.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.0.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the tunnel stopped")),
            Poll::Pending => Ok(()),
        }
    }
}

/// A [`TunnelStream`]'s receiving direction.
pub struct TunnelReader {
    rx: ChannelReader,
    stopped: Stopped,
    open: Arc<OpenChannel>,
}

impl std::fmt::Debug for TunnelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelReader").finish_non_exhaustive()
    }
}

impl TunnelReader {
    /// The next received bytes as they are, without a copy: at least one and at most `max`, a
    /// slice of one channel message; empty at the channel's end. Counted like stream reads.
    ///
    /// # Errors
    /// The tunnel stopped.
    pub fn poll_receive(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<std::io::Result<Bytes>> {
        self.stopped.check(cx)?;
        let polled = self.rx.poll_receive(cx, max);
        if let Poll::Ready(Ok(data)) = &polled {
            self.open.0.down.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// A [`TunnelStream`]'s sending direction.
pub struct TunnelWriter {
    tx: ChannelWriter<Msg>,
    stopped: Stopped,
    open: Arc<OpenChannel>,
}

impl std::fmt::Debug for TunnelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelWriter").finish_non_exhaustive()
    }
}

impl TunnelWriter {
    /// As [`TunnelStream::sender`].
    pub fn sender(&self) -> ChannelSender {
        ChannelSender { channel: self.tx.sender(), shared: Arc::clone(&self.open.0) }
    }
}

/// Sends owned bytes on a [`TunnelStream`]'s channel, as they are (no copy): each becomes one or
/// more channel messages sharing its memory. Counted in the tunnel's status like stream writes.
#[derive(Clone)]
pub struct ChannelSender {
    channel: BytesSender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender").finish_non_exhaustive()
    }
}

impl ChannelSender {
    /// Queue `data` on the channel after everything written or sent before; done once the
    /// session has taken all of it (within the channel's window).
    ///
    /// # Errors
    /// The tunnel stopped or the channel is closed.
    pub async fn send(&self, data: Bytes) -> std::io::Result<()> {
        let stopped = || std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the tunnel stopped");
        let mut stop = self.shared.stop.subscribe();
        if *stop.borrow_and_update() {
            return Err(stopped());
        }
        let len = data.len() as u64;
        // A send waiting for window once the tunnel stopped would wait forever: it fails, as
        // the stream's writes do.
        tokio::select! {
            sent = self.channel.send(data) => sent?,
            _ = stop.wait_for(|stopping| *stopping) => return Err(stopped()),
        }
        self.shared.up.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl AsyncRead for TunnelReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.stopped.check(cx)?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.rx).poll_read(cx, buf);
        let got = buf.filled().len().saturating_sub(before);
        self.open.0.down.fetch_add(got as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for TunnelWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.stopped.check(cx)?;
        let polled = Pin::new(&mut self.tx).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.open.0.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
