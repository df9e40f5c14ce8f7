//! A disk's NBD connections, re-made when the transport fails.
//!
//! A copy runs several connections to one export (the hub's exports advertise multi-conn, so a
//! flush on any of them covers every write). A request that fails because the connection broke
//! (the tunnel dropped, the hub's listener closed) is retried on a fresh connection once one can
//! be made, for up to `retry_window` after the first failure; writes are idempotent, so a retry
//! can never corrupt. A request the server answered with an error (ENOSPC, EIO, EINVAL) is not a
//! transport failure and is never retried. Concurrent workers that see the same broken
//! connection reconnect it once: each slot carries a generation number. Making the connections
//! in the first place is retried the same way when the transport breaks during the handshake
//! (a hub or tunnel too busy to finish it within the server's handshake timeout: seen once in CI
//! with twenty VMs backed up at once through one tunnel on a 2-vCPU host), and when it is refused:
//! the hub opens its exports before it hands out their targets, so a refusal means the hub (or
//! its tunnel endpoint) is restarting, and a restarted hub takes the job up on the same port
//! (`hub/src/jobs/handover.rs`). A target that is wrong therefore fails once the window has
//! passed, naming the refusal, not at once. An answer the server gave (an export it does not know,
//! a client it does not admit, a broken protocol) fails at once.
//!
//! A connection through the node's own tunnel hands its write payloads to the channel as they
//! are (`Client::write_bytes` with the stream's [`tunnel::dial::ChannelSender`]), without the
//! copy a byte stream makes, and takes read replies as the channel's own messages
//! (`Client::read_bytes` over [`tunnel::TunnelReader::poll_receive`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nbd_server::client::{ReceiveBytes, SendBytes};
use nbd_server::{Client, ClientError, ClientOptions, ExportInfo};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::error::MoveError;

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host to dial.
    pub host: String,
    /// Port to dial.
    pub port: u16,
    /// Export name.
    pub export: String,
    /// Extra metadata contexts (a dirty bitmap).
    pub meta_contexts: Vec<String>,
    /// Reach it through this process's tunnel instead of dialling `host:port` (the tunnel's
    /// local forward of it).
    pub via: Option<Box<ThroughTunnel>>,
    /// Dial `host:port` over TLS with these credentials (an `nbds://` source).
    pub tls: Option<nbd_server::ClientTls>,
}

/// A hub port reached through the node's own tunnel, in process: the channel the forward at
/// `host:port` would open, without the loopback socket in between.
#[derive(Debug, Clone)]
pub struct ThroughTunnel {
    /// The tunnel.
    pub dialer: tunnel::TunnelDialer,
    /// The host the forward reaches, as the hub sees it (its loopback).
    pub remote_host: String,
    /// The hub's port.
    pub remote_port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "nbds" } else { "nbd" };
        write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.export)?;
        if let Some(t) = &self.via {
            write!(f, " (through the tunnel to the hub's port {})", t.remote_port)?;
        }
        Ok(())
    }
}

/// How long one request may take before its connection is declared broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

struct Slot {
    generation: u64,
    client: Option<Client>,
}

/// Several connections to one export.
pub struct NbdPool {
    endpoint: Endpoint,
    info: ExportInfo,
    slots: Vec<Mutex<Slot>>,
    retry_window: Duration,
    cancel: CancellationToken,
    reconnects: std::sync::atomic::AtomicU64,
}

impl NbdPool {
    /// Open `connections` connections (at least one). A connection the transport breaks while
    /// it is being made (the server hung up during the handshake, a handshake that timed out:
    /// a hub or tunnel too busy to answer in time) is made again: the first one within the
    /// retry window, the others when first used (their slots start empty).
    ///
    /// # Errors
    /// The first connection cannot be made within the window, or is refused for good (a wrong
    /// port or export name is a configuration error, not something to wait out); or the copy
    /// was cancelled.
    pub async fn connect(
        endpoint: Endpoint,
        connections: usize,
        retry_window: Duration,
        cancel: CancellationToken,
    ) -> Result<Self, MoveError> {
        let first = dial_within(&endpoint, retry_window, &cancel).await?;
        let info = first.info().clone();
        // Only open more connections when the export says they are coherent.
        let multi = info.flags & nbd_server::proto::consts::transmission_flags::CAN_MULTI_CONN != 0;
        let wanted = if multi { connections.max(1) } else { 1 };
        let mut slots = vec![Mutex::new(Slot { generation: 0, client: Some(first) })];
        for _ in 1..wanted {
            let client = match dial(&endpoint).await {
                Ok(c) => Some(c),
                Err(e) if is_transient(&e) => {
                    tracing::warn!(target = %endpoint, error = %e, "connection not made; made again when first used");
                    None
                }
                Err(source) => return Err(MoveError::Unreachable { target: endpoint.to_string(), source }),
            };
            slots.push(Mutex::new(Slot { generation: 0, client }));
        }
        Ok(Self { endpoint, info, slots, retry_window, cancel, reconnects: Default::default() })
    }

    /// The export as the server described it on the first connection.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// Connections re-made so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Run `op` on connection `index % connections`, re-making the connection and retrying
    /// while the transport fails, within the retry window.
    ///
    /// # Errors
    /// The server failed the request (`Target`), the window passed (`Unreachable`), or the copy
    /// was cancelled.
    pub async fn run<T, F, Fut>(&self, index: usize, what: &'static str, offset: u64, op: F) -> Result<T, MoveError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let slot = self.slots.get(index % self.slots.len().max(1)).ok_or(MoveError::Cancelled)?;
        let mut first_failure: Option<Instant> = None;
        loop {
            let (generation, client) = {
                let s = slot.lock().await;
                (s.generation, s.client.clone())
            };
            let result = match client {
                // A request that hangs (a tunnel that stopped moving without closing) fails with
                // `TimedOut` and closes its connection (`ClientOptions::request_timeout`): a
                // broken connection, re-made below.
                Some(c) => op(c).await,
                None => Err(ClientError::Closed),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e @ ClientError::Request { .. }) | Err(e @ ClientError::Invalid(_)) => {
                    return Err(MoveError::Target { target: self.endpoint.to_string(), op: what, offset, source: e });
                }
                Err(e) => {
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    tracing::warn!(target = %self.endpoint, error = %e, "connection failed; reconnecting");
                    self.reconnect(slot, generation, since, e).await?;
                }
            }
        }
    }

    async fn reconnect(
        &self,
        slot: &Mutex<Slot>,
        generation: u64,
        since: Instant,
        mut last: ClientError,
    ) -> Result<(), MoveError> {
        let mut s = slot.lock().await;
        if s.generation != generation {
            return Ok(()); // another worker already re-made it
        }
        s.client = None;
        let mut delay = Duration::from_millis(200);
        loop {
            if since.elapsed() > self.retry_window {
                return Err(MoveError::Unreachable { target: self.endpoint.to_string(), source: last });
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(MoveError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
            match dial(&self.endpoint).await {
                Ok(c) if c.info().size == self.info.size => {
                    s.client = Some(c);
                    s.generation += 1;
                    self.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(target = %self.endpoint, "reconnected");
                    return Ok(());
                }
                Ok(c) => {
                    return Err(MoveError::Mismatch(format!(
                        "{} changed size from {} to {} across a reconnect",
                        self.endpoint,
                        self.info.size,
                        c.info().size
                    )))
                }
                Err(e) => last = e,
            }
            delay = (delay * 2).min(Duration::from_secs(3));
        }
    }

    /// Whether the export reads as zeroes end to end by its own `base:allocation` answer (a
    /// fresh image): only then may a full copy skip zero blocks. A server that cannot say, or a
    /// very fragmented answer, counts as "not known to be zero".
    ///
    /// # Errors
    /// The query failed.
    pub async fn reads_as_zero(&self) -> Result<bool, MoveError> {
        let size = self.info.size;
        let mut at = 0u64;
        for _ in 0..4096 {
            if at >= size {
                return Ok(true);
            }
            let extents = self
                .run(0, "block status", at, |c| async move {
                    if !c.can_block_status() {
                        return Ok(Vec::new());
                    }
                    c.block_status(at, size - at).await
                })
                .await?;
            if extents.is_empty() {
                return Ok(false);
            }
            for e in extents {
                if e.flags & 0b10 == 0 {
                    return Ok(false);
                }
                at = at.saturating_add(e.length);
            }
        }
        Ok(at >= size)
    }

    /// Soft-disconnect every connection.
    pub async fn close(&self) {
        for slot in &self.slots {
            if let Some(c) = slot.lock().await.client.take() {
                let _ = c.disconnect().await;
            }
        }
    }
}

/// A failure of the transport while a connection was being made, which another attempt may not
/// meet: the peer hung up, reset or refused (nothing listens there yet, the hub's endpoint refused
/// the channel: a hub restarting), the handshake timed out, the server said its export is closing
/// (`NBD_REP_ERR_SHUTDOWN`). Any other answer the server gave (unknown export, a client not
/// admitted, a broken protocol), a path that does not exist and a TLS handshake that failed (a
/// certificate not trusted, on either side: rustls's errors come as `InvalidData`) are not.
fn is_transient(e: &ClientError) -> bool {
    use std::io::ErrorKind;
    match e {
        ClientError::Io(io) => !matches!(io.kind(), ErrorKind::NotFound | ErrorKind::InvalidData),
        ClientError::Closed | ClientError::TimedOut(_) => true,
        // The export the port serves is closing (a hub stopping) or not open yet.
        ClientError::OptionRefused { reply, .. } => *reply == nbd_server::proto::consts::rep::ERR_SHUTDOWN,
        _ => false,
    }
}

/// [`dial`], again after transient failures ([`is_transient`]) until `window` has passed.
async fn dial_within(endpoint: &Endpoint, window: Duration, cancel: &CancellationToken) -> Result<Client, MoveError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match dial(endpoint).await {
            Ok(client) => return Ok(client),
            Err(e) if is_transient(&e) && started.elapsed() < window => {
                tracing::warn!(target = %endpoint, error = %e, "connection not made; trying again");
            }
            Err(source) => return Err(MoveError::Unreachable { target: endpoint.to_string(), source }),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(MoveError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn dial(endpoint: &Endpoint) -> Result<Client, ClientError> {
    let mut options = ClientOptions::new(endpoint.export.clone()).request_timeout(REQUEST_TIMEOUT);
    options.meta_contexts = endpoint.meta_contexts.clone();
    if let Some(t) = &endpoint.via {
        let stream = tokio::time::timeout(Duration::from_secs(30), t.dialer.open(&t.remote_host, t.remote_port))
            .await
            .map_err(|_| timed_out("opening the tunnel channel timed out"))?
            .map_err(|e| ClientError::Io(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())))?;
        let payloads: Arc<dyn SendBytes> = Arc::new(ChannelPayloads(stream.sender()));
        let (r, w) = stream.into_split();
        return tokio::time::timeout(
            Duration::from_secs(30),
            Client::handshake_zero_copy(ChannelReplies(r), w, payloads, &options),
        )
        .await
        .map_err(|_| timed_out("handshake timed out"))?;
    }
    if let Some(tls) = &endpoint.tls {
        let options = options.tls(tls.clone());
        return tokio::time::timeout(
            Duration::from_secs(30),
            Client::connect_tcp_with(&endpoint.host, endpoint.port, &options),
        )
        .await
        .map_err(|_| timed_out("connect, TLS and handshake timed out"))?;
    }
    let stream = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    .map_err(|_| timed_out("connect timed out"))??;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    handshake(r, w, &options).await
}

async fn handshake<R, W>(r: R, w: W, options: &ClientOptions) -> Result<Client, ClientError>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(Duration::from_secs(30), Client::handshake(r, w, options))
        .await
        .map_err(|_| timed_out("handshake timed out"))?
}

/// Write payloads onto a tunnel channel without a copy.
struct ChannelPayloads(tunnel::dial::ChannelSender);

impl SendBytes for ChannelPayloads {
    fn send(&self, data: bytes::Bytes) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(self.0.send(data))
    }
}

/// Read replies taken from a tunnel channel as its own messages.
struct ChannelReplies(tunnel::TunnelReader);

impl tokio::io::AsyncRead for ChannelReplies {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl ReceiveBytes for ChannelReplies {
    fn poll_receive(mut self: Pin<&mut Self>, cx: &mut Context<'_>, max: usize) -> Poll<std::io::Result<bytes::Bytes>> {
        self.0.poll_receive(cx, max)
    }
}

fn timed_out(what: &'static str) -> ClientError {
    ClientError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// An NBD server in process behind a gate that hangs up on the connections it accepts `n`th
    /// for each `n` in `drops` (counting from 0) as soon as it accepts them (a server gone in the
    /// middle of the handshake) and passes the others through. Counts what it accepted.
    async fn gated_server(drops: &'static [usize]) -> (nbd_server::Server, u16, Arc<AtomicUsize>) {
        let server = nbd_server::Server::new(nbd_server::ServerConfig::default());
        let disk = Arc::new(nbd_server::MemoryBackend::new(1 << 20));
        server.add_export(nbd_server::ExportConfig::new("d", disk).max_connections(8)).unwrap();
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner_port = inner.local_addr().unwrap().port();
        let s = server.clone();
        tokio::spawn(async move { s.serve(inner).await });
        let gate = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = gate.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = gate.accept().await {
                if drops.contains(&count.fetch_add(1, SeqCst)) {
                    continue;
                }
                tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", inner_port)).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (server, port, accepted)
    }

    fn endpoint(port: u16, export: &str) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            export: export.into(),
            meta_contexts: Vec::new(),
            via: None,
            tls: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_the_server_hangs_up_on_while_they_are_made_are_made_again() {
        // The first connection is hung up on once and made again; so is the second of the other
        // three, which starts empty and is made when first used.
        let (_server, port, accepted) = gated_server(&[0, 2]).await;
        let window = Duration::from_secs(60);
        let pool = NbdPool::connect(endpoint(port, "d"), 4, window, CancellationToken::new()).await.unwrap();
        assert_eq!(pool.connections(), 4);
        for i in 0..8usize {
            let data = vec![i as u8 + 1; 4096];
            let at = i as u64 * 4096;
            pool.run(i, "write", at, |c| {
                let data = data.clone();
                async move { c.write(at, &data, false).await }
            })
            .await
            .unwrap();
            let back = pool.run(i, "read", at, |c| async move { c.read(at, 4096).await }).await.unwrap();
            assert_eq!(back, data, "through connection {}", i % 4);
        }
        assert_eq!(accepted.load(SeqCst), 6, "two hung up on, four made");
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_export_is_not_waited_out_and_a_refused_connection_is() {
        let (server, port, _) = gated_server(&[]).await;
        let window = Duration::from_secs(120);
        // Well inside the window: not tried again.
        let quickly = Duration::from_secs(20);
        let unknown = NbdPool::connect(endpoint(port, "nope"), 4, window, CancellationToken::new());
        let unknown = tokio::time::timeout(quickly, unknown).await.expect("not waited out");
        assert!(matches!(unknown, Err(MoveError::Unreachable { .. })), "unknown export");
        // Nothing listens yet (a hub restarting): the first connection waits until it does.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = closed.local_addr().unwrap().port();
        drop(closed);
        let pool = tokio::spawn(NbdPool::connect(endpoint(later, "d"), 2, window, CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!pool.is_finished(), "a refused connection is tried again");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", later)).await.unwrap();
        tokio::spawn(async move { server.serve(listener).await });
        let pool = tokio::time::timeout(quickly, pool).await.expect("connected once listened").unwrap().unwrap();
        assert_eq!(pool.info().size, 1 << 20);
        // And one that stays refused fails with the refusal once the window has passed.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nothing = closed.local_addr().unwrap().port();
        drop(closed);
        let refused = NbdPool::connect(endpoint(nothing, "d"), 4, Duration::from_millis(300), CancellationToken::new());
        match tokio::time::timeout(quickly, refused).await.expect("the window ends") {
            Err(MoveError::Unreachable { source: ClientError::Io(e), .. }) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
