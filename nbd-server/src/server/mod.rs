//! The tokio NBD server: exports in a registry, listeners that accept into it, graceful shutdown.
//!
//! A [`Server`] is a cheap handle (an `Arc`) that a service keeps: it adds and removes exports
//! at run time, serves any number of listeners (one for all exports by name, or one per export
//! as the hub's port-per-disk layout needs), reads per-export counters, and shuts down by
//! draining in-flight requests and flushing every backend. Shaped after mini-redis's server: a
//! permit is taken before `accept`, every connection is its own task, and a cancellation token
//! (not a broadcast channel: a token is also what removing one export needs) stops everything.

mod connection;
pub(crate) mod dispatch;
pub(crate) mod export;
pub(crate) mod negotiate;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::tls::{TlsCredentials, TlsError};
pub use export::{ExportConfig, ExportStats, MAX_BITMAPS};
pub use negotiate::Scope;

use crate::zero_copy::SendBytes;
use export::{Export, Registry};
use negotiate::BlockSizes;

/// Tunables of a server. The defaults suit the hub: qemu-compatible payload limits and bounded
/// memory per connection.
///
/// Built with `ServerConfig::default()` and the setters, e.g.
/// `ServerConfig::default().max_clients(64).shutdown_grace(Duration::from_secs(5))`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest READ or WRITE payload accepted (advertised as the maximum block size).
    pub max_payload: u32,
    /// Requests one connection may have in flight before the server stops reading from it.
    pub max_in_flight: usize,
    /// Payload and read-buffer bytes one connection may hold at once (at least `max_payload`).
    pub max_buffered_bytes: usize,
    /// Payload and read-buffer bytes all connections together may hold at once (at least
    /// `max_payload`): the bound on what clients can make the server allocate, whatever their
    /// number. Connections over it stop reading until others' requests complete.
    pub max_buffered_bytes_total: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Connections (handshaking or transmitting) the whole server accepts at once.
    pub max_clients: usize,
    /// On shutdown, how long connections may take to drain before being cut.
    pub shutdown_grace: Duration,
    /// TLS required of every client of the server's TCP and Unix listeners (the spec's
    /// FORCEDTLS; streams given to [`Server::serve_stream`] are not asked); `None`: no TLS,
    /// `NBD_OPT_STARTTLS` refused.
    pub tls: Option<TlsCredentials>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 * 1024 * 1024,
            max_in_flight: 64,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_buffered_bytes_total: 1024 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_clients: 1024,
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl ServerConfig {
    setters::setters! {
        max_payload: u32,
        max_in_flight: usize,
        max_buffered_bytes: usize,
        max_buffered_bytes_total: usize,
        handshake_timeout: Duration,
        max_clients: usize,
        shutdown_grace: Duration,
        tls: Option<TlsCredentials>,
    }
}

/// Errors of the server API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// An export of that name exists already.
    #[error("export '{0}' already exists")]
    DuplicateExport(String),
    /// No export of that name.
    #[error("no export named '{0}'")]
    UnknownExport(String),
    /// The name is not a valid NBD string.
    #[error("invalid export name {0:?}: must be UTF-8 without NUL, at most 4096 bytes")]
    InvalidName(String),
    /// The export's dirty bitmaps cannot be offered as asked: more than
    /// [`crate::MAX_BITMAPS`], a name twice, or a name that is no NBD string.
    #[error("export '{export}': {reason}")]
    InvalidBitmaps {
        /// Export name.
        export: String,
        /// What is wrong.
        reason: String,
    },
    /// Flushing and closing a removed export's backend ([`crate::Backend::close`]) failed: its
    /// data may not be durable.
    #[error("flushing export '{name}' failed: {source}")]
    Flush {
        /// Export name.
        name: String,
        /// Cause.
        #[source]
        source: crate::backend::BackendError,
    },
}

/// State every connection shares.
pub(crate) struct Shared {
    pub registry: Registry,
    pub config: ServerConfig,
    /// Cancelled on shutdown: listeners stop, connections drain.
    pub shutdown: CancellationToken,
    /// Cancelled after the grace period: writers stop waiting on silent clients.
    pub hard_stop: CancellationToken,
    tracker: TaskTracker,
    clients: Arc<Semaphore>,
    /// The server-wide byte budget, in `BUDGET_UNIT`s.
    pub buffered: Arc<Semaphore>,
    /// Pipes that carry large write payloads from TCP sockets to backends (`backend/piped.rs`).
    pub pipes: Arc<crate::backend::PipePool>,
}

impl Shared {
    pub fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum: 1, preferred: 4096, maximum: self.config.max_payload }
    }
}

/// An NBD server embedded in a tokio service. Clone it freely; all clones are the same server.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("exports", &self.export_names()).finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new(ServerConfig::default())
    }
}

impl Server {
    /// A server with no exports yet.
    pub fn new(mut config: ServerConfig) -> Self {
        config.max_buffered_bytes = config.max_buffered_bytes.max(config.max_payload as usize);
        config.max_buffered_bytes_total = config.max_buffered_bytes_total.max(config.max_payload as usize);
        config.max_in_flight = config.max_in_flight.max(1);
        let clients = Arc::new(Semaphore::new(config.max_clients.max(1)));
        let total_units =
            (config.max_buffered_bytes_total as u64 / connection::BUDGET_UNIT).clamp(1, u64::from(u32::MAX));
        let buffered = Arc::new(Semaphore::new(total_units as usize));
        Self {
            shared: Arc::new(Shared {
                registry: Registry::default(),
                config,
                shutdown: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
                clients,
                buffered,
                pipes: crate::backend::PipePool::for_this_process(),
            }),
        }
    }

    /// Publish an export. It is reachable by the next handshake on any listener whose scope
    /// includes it: no process to spawn, nothing to wait for.
    ///
    /// # Errors
    /// [`ServerError::DuplicateExport`] or [`ServerError::InvalidName`].
    pub fn add_export(&self, config: ExportConfig) -> Result<(), ServerError> {
        let name = config.name.clone();
        if name.len() > crate::proto::consts::MAX_STRING_LEN || name.contains('\0') {
            return Err(ServerError::InvalidName(name));
        }
        if let Some(reason) = export::bitmaps_refused(&config.bitmaps) {
            return Err(ServerError::InvalidBitmaps { export: name, reason });
        }
        let export =
            Arc::new(Export::new(config, self.shared.shutdown.child_token(), self.shared.hard_stop.child_token()));
        self.shared.registry.insert(export).map_err(|_| ServerError::DuplicateExport(name.clone()))?;
        tracing::info!(export = %name, "export added");
        Ok(())
    }

    /// Withdraw an export: new handshakes no longer see it, its connections finish their
    /// in-flight requests and close, then its backend is flushed and closed
    /// ([`crate::Backend::close`]). Returns its final counters.
    /// Connections that have not finished within the server's `shutdown_grace` (a client that
    /// stopped reading its replies) are cut, as [`Server::remove_export_within`] does.
    ///
    /// # Errors
    /// [`ServerError::UnknownExport`], or [`ServerError::Flush`] if the final flush failed.
    pub async fn remove_export(&self, name: &str) -> Result<ExportStats, ServerError> {
        self.remove_export_within(name, self.shared.config.shutdown_grace).await
    }

    /// [`Server::remove_export`] with an explicit deadline for the graceful part; after it the
    /// export's connections are cut (like qemu's `block-export-del mode=hard`; a zero deadline
    /// cuts at once). Writes already applied stay applied, and the flush still runs.
    ///
    /// # Errors
    /// [`ServerError::UnknownExport`], or [`ServerError::Flush`] if the final flush failed.
    pub async fn remove_export_within(&self, name: &str, deadline: Duration) -> Result<ExportStats, ServerError> {
        let export = self.shared.registry.remove(name).ok_or_else(|| ServerError::UnknownExport(name.to_string()))?;
        export.closing.cancel();
        if tokio::time::timeout(deadline, export.drained()).await.is_err() {
            tracing::warn!(export = %name, "connections did not drain in time; cutting them");
            export.hard.cancel();
            export.drained().await;
        }
        if !export.read_only {
            export.backend.close().await.map_err(|source| ServerError::Flush { name: name.to_string(), source })?;
        }
        tracing::info!(export = %name, "export removed");
        Ok(export.stats())
    }

    /// Counters of an export.
    pub fn export_stats(&self, name: &str) -> Option<ExportStats> {
        self.shared.registry.get(name).map(|e| e.stats())
    }

    /// Names of all exports.
    pub fn export_names(&self) -> Vec<String> {
        self.shared.registry.all().iter().map(|e| e.name.clone()).collect()
    }

    /// Accept TCP connections for every export until shutdown.
    pub async fn serve(&self, listener: TcpListener) {
        self.serve_tcp(listener, Scope::All).await;
    }

    /// Accept TCP connections that see only export `name` (which may be added later).
    pub async fn serve_export(&self, listener: TcpListener, name: impl Into<String>) {
        self.serve_tcp(listener, Scope::Only(name.into())).await;
    }

    /// Accept TCP connections with the given scope until shutdown. [`Self::shutdown`] returns
    /// only once the listener is closed: the port refuses (and is free to bind) from then on.
    pub async fn serve_tcp(&self, listener: TcpListener, scope: Scope) {
        self.serve_tcp_admitting(listener, scope, |_| Ok(())).await;
    }

    /// [`Self::serve_tcp`], each client first asked of `admit` by its address: one it refuses
    /// (`Err(reason)`) is served with [`Scope::Refused`], seeing no export and told the reason
    /// for every one it asks for, so it fails at once and says why (as nbdkit's ip filter
    /// refuses, but with the reason on the wire).
    pub async fn serve_tcp_admitting<F>(&self, listener: TcpListener, scope: Scope, admit: F)
    where
        F: Fn(std::net::SocketAddr) -> Result<(), String>,
    {
        let serving = self.shared.tracker.token();
        self.accept_until_shutdown(scope, || async {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let refused = admit(peer).err();
            if let Some(reason) = &refused {
                tracing::warn!(%peer, %reason, "client refused");
            }
            Ok((stream, peer.to_string(), refused))
        })
        .await;
        drop(listener);
        drop(serving);
    }

    /// Accept Unix-socket connections with the given scope until shutdown (which, as for
    /// [`Self::serve_tcp`], waits for the listener to close).
    pub async fn serve_unix(&self, listener: UnixListener, scope: Scope) {
        let serving = self.shared.tracker.token();
        self.accept_until_shutdown(scope, || async {
            let (stream, _) = listener.accept().await?;
            Ok((stream, "unix".to_string(), None))
        })
        .await;
        drop(listener);
        drop(serving);
    }

    /// Take a client slot, then the next connection `accept` gives (its socket, its peer's
    /// name, and why it is refused if it is), and serve it; until shutdown.
    async fn accept_until_shutdown<S, F, A>(&self, scope: Scope, mut accept: F)
    where
        S: Socket,
        F: FnMut() -> A,
        A: std::future::Future<Output = std::io::Result<(S, String, Option<String>)>>,
    {
        let scope = Arc::new(scope);
        loop {
            let Some(permit) = self.client_permit().await else {
                return;
            };
            let accepted = tokio::select! {
                a = accept() => a,
                _ = self.shared.shutdown.cancelled() => return,
            };
            match accepted {
                Ok((socket, peer, None)) => self.spawn_connection(socket, peer, Arc::clone(&scope), permit),
                Ok((socket, peer, Some(reason))) => {
                    self.spawn_connection(socket, peer, Arc::new(Scope::Refused(reason)), permit)
                }
                Err(e) => self.accept_failed(e).await,
            }
        }
    }

    /// Serve one already-established byte stream (an SSH channel, a test pipe...), under the
    /// same rules as an accepted socket: it takes a client slot (refused, the stream dropped, when
    /// none is free or shutdown has begun) and shutdown waits for it. Returns when it ends.
    pub async fn serve_stream<S>(&self, stream: S, scope: Scope)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.serve_stream_from(stream, scope, "stream").await;
    }

    /// [`Self::serve_stream`], naming the client `peer` in logs (an SSH channel's node, say).
    pub async fn serve_stream_from<S>(&self, stream: S, scope: Scope, peer: impl Into<String>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.serve_halves(r, w, scope, peer.into()).await;
    }

    /// [`Self::serve_stream_from`] over a transport that can also take bytes by ownership: large
    /// read replies hand their data to `payloads` instead of copying it into the stream
    /// ([`crate::zero_copy`]).
    pub async fn serve_stream_with_payloads<S>(
        &self,
        stream: S,
        scope: Scope,
        peer: impl Into<String>,
        payloads: Arc<dyn SendBytes>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.serve_halves(r, writer::WithPayloads::new(w, payloads), scope, peer.into()).await;
    }

    /// A stream's two halves as one client: a client slot (refused, the halves dropped, when
    /// none is free or shutdown has begun), tracked for shutdown; returns when it ends.
    async fn serve_halves<R, W>(&self, r: R, w: W, scope: Scope, peer: String)
    where
        R: connection::RequestReader,
        W: writer::ReplyWriter,
    {
        if self.is_shutting_down() {
            return;
        }
        let Ok(permit) = Arc::clone(&self.shared.clients).try_acquire_owned() else {
            tracing::warn!("stream refused: the server's client limit is reached");
            return;
        };
        let shared = Arc::clone(&self.shared);
        let task = self.shared.tracker.spawn(async move {
            connection::serve(r, w, peer, Arc::new(scope), shared).await;
            drop(permit);
        });
        let _ = task.await;
    }

    async fn client_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            p = Arc::clone(&self.shared.clients).acquire_owned() => p.ok(),
            _ = self.shared.shutdown.cancelled() => None,
        }
    }

    async fn accept_failed(&self, e: std::io::Error) {
        // EMFILE and friends: back off instead of spinning, keep the listener.
        tracing::warn!(error = %e, "accept failed; retrying");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Serve an accepted socket in its own task: over TLS when the server has credentials.
    fn spawn_connection<S: Socket>(
        &self,
        socket: S,
        peer: String,
        scope: Arc<Scope>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let shared = Arc::clone(&self.shared);
        self.shared.tracker.spawn(async move {
            match shared.config.tls.as_ref().map(TlsCredentials::acceptor) {
                Some(acceptor) => connection::serve_tls(socket, acceptor, peer, scope, shared).await,
                None => {
                    let (r, w) = socket.into_halves();
                    connection::serve(r, w, peer, scope, shared).await;
                }
            }
            drop(permit);
        });
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Stop accepting, let connections finish their in-flight requests (up to the grace
    /// period), then flush every writable export.
    ///
    /// # Errors
    /// The first export whose final flush failed.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(self.shared.config.shutdown_grace, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!("connections did not drain within the grace period; cutting them");
            self.shared.hard_stop.cancel();
            self.shared.tracker.wait().await;
        }
        let mut first_error = None;
        for export in self.shared.registry.all() {
            if export.read_only {
                continue;
            }
            if let Err(source) = export.backend.close().await {
                tracing::error!(export = %export.name, error = %source, "final flush failed");
                first_error.get_or_insert(ServerError::Flush { name: export.name.clone(), source });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A socket a listener accepted: served whole (TLS wraps it) or as its two halves.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: connection::RequestReader;
    type Writer: writer::ReplyWriter;
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

impl Socket for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Socket for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}
