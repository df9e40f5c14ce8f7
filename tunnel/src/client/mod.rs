//! The node's tunnel: one SSH connection to the hub carrying every forward, kept up for good.
//!
//! [`Tunnel::start`] binds every local listener first (a port in use is an error right away),
//! then a supervisor task connects, checks the host key, authenticates with the key, asks for
//! the reverse forwards, and watches the connection. When it drops, the listeners stay bound and
//! the supervisor reconnects with capped exponential backoff and jitter. A connection accepted
//! while the tunnel is down waits for it up to `connect_wait`, then is closed cleanly. Each
//! accepted TCP connection is its own `direct-tcpip` channel, copied both ways with
//! `copy_bidirectional` (half-close propagates). A service in the same process can open such a
//! channel without the local TCP hop ([`Tunnel::dialer`], module [`crate::dial`]). Everything a
//! node's API wants to show is in [`Status`].
//! What russh asks of the client for each connection (host key, reverse-forwarded channels)
//! is `handler`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use russh::client::{self, Handle, Msg};
use russh::keys::PrivateKeyWithHashAlg;
use russh::Channel;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::hostkey::{self, HostKeyPolicy};
use crate::spec::{LocalForward, ReverseForward};

mod handler;

pub(crate) use handler::HubHandler;

/// Copy buffer per direction of a forwarded connection. tokio's default (8 KiB) turns every
/// read into a small SSH packet; 64 KiB fills the channel's maximum packet size.
pub const COPY_BUF: usize = 64 * 1024;

/// How to reach the hub and what to forward.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Hub host name or address.
    pub hub_host: String,
    /// Hub SSH port (443 in production).
    pub hub_port: u16,
    /// User name.
    pub user: String,
    /// Private key file (ed25519 or RSA, OpenSSH format, unencrypted).
    pub identity: std::path::PathBuf,
    /// How the hub's host key is trusted.
    pub host_key: HostKeyPolicy,
    /// Local ports forwarded to the hub.
    pub forwards: Vec<LocalForward>,
    /// Hub ports forwarded back here.
    pub reverse: Vec<ReverseForward>,
    /// Keepalive interval.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the connection is declared dead.
    pub keepalive_max: usize,
    /// How long a local connection waits for the tunnel to come up.
    pub connect_wait: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// SSH connections to the hub. Forwarded connections are spread over them round-robin, so
    /// that encryption runs on as many cores; reverse forwards ride on the first. Default: the
    /// number of cores, at most 4.
    pub connections: usize,
}

/// The default number of SSH connections: one per core, at most 4.
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

impl ClientConfig {
    setters::setters! {
        forwards: Vec<LocalForward>,
        reverse: Vec<ReverseForward>,
        keepalive_interval: Duration,
        keepalive_max: usize,
        connect_wait: Duration,
        backoff_initial: Duration,
        backoff_max: Duration,
        connections: usize,
    }

    /// Production defaults for `user@hub_host:hub_port` with `identity`, trusting `host_key`:
    /// no forwards yet.
    pub fn new(
        hub_host: impl Into<String>,
        hub_port: u16,
        user: impl Into<String>,
        identity: impl Into<std::path::PathBuf>,
        host_key: HostKeyPolicy,
    ) -> Self {
        Self {
            hub_host: hub_host.into(),
            hub_port,
            user: user.into(),
            identity: identity.into(),
            host_key,
            forwards: Vec::new(),
            reverse: Vec::new(),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            connect_wait: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connections: default_connections(),
        }
    }
}

/// Failures of the tunnel client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// A local listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The private key could not be loaded.
    #[error("cannot load identity: {0}")]
    Identity(#[from] crate::keyfile::KeyFileError),
    /// The hub's host key was refused.
    #[error(transparent)]
    HostKey(#[from] hostkey::HostKeyError),
    /// The hub refused our key.
    #[error(
        "hub {hub} refused the key {fingerprint} for user {user} (is its public line among the keys the hub allows?)"
    )]
    AuthRefused {
        /// Hub.
        hub: String,
        /// Our key's fingerprint (`SHA256:...`), to compare with what the hub holds.
        fingerprint: String,
        /// User.
        user: String,
    },
    /// SSH-level failure (connect, protocol, disconnect).
    #[error("ssh: {0}")]
    Ssh(String),
    /// No SSH connection to the hub came up within the wait (or the tunnel stopped): an
    /// in-process channel ([`crate::dial`]) could not be opened.
    #[error("the tunnel to the hub is not up (waited {waited:?})")]
    NotUp {
        /// How long it waited.
        waited: Duration,
    },
    /// The hub refused an in-process channel: a port it does not allow this node now, or
    /// nothing behind it.
    #[error("the hub refused a channel to {target}: {reason}")]
    ChannelRefused {
        /// `host:port` on the hub.
        target: String,
        /// What the hub said.
        reason: String,
    },
    /// The hub refused a reverse forward: the connection is dropped and made again later (a
    /// stale session of ours may still hold the port), so `connected` never hides a node the hub
    /// cannot reach.
    #[error("hub refused reverse forward {bind}:{port} -> {local}: {reason}")]
    ReverseRefused {
        /// Address asked for on the hub.
        bind: String,
        /// Port asked for on the hub.
        port: u16,
        /// Where it would lead here.
        local: std::net::SocketAddr,
        /// What the hub said.
        reason: String,
    },
}

/// Where the tunnel's first SSH connection stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// The first attempt is under way.
    #[default]
    Connecting,
    /// Up.
    Up,
    /// Down after a transient failure (network, hub restarting); retried with backoff.
    Retrying,
    /// Refused for a reason that will not fix itself: the hub's host key does not match, or the
    /// hub refused our key. Still retried, at the longest backoff, until the operator fixes it.
    Refused,
    /// Shut down by [`Tunnel::shutdown`].
    Stopped,
}

/// What the tunnel is doing, for the node's API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Where the first connection stands.
    pub state: State,
    /// Since when the current connection is up (`None` while down).
    pub connected_since: Option<SystemTime>,
    /// Connections made after the first.
    pub reconnects: u64,
    /// The last error, if any (kept after recovery, for diagnosis).
    pub last_error: Option<String>,
    /// Forwarded connections open now.
    pub open_channels: u64,
    /// Bytes sent from the node towards the hub.
    pub bytes_to_hub: u64,
    /// Bytes received from the hub.
    pub bytes_from_hub: u64,
    /// SSH connections up now (of [`ClientConfig::connections`]).
    pub connections_up: usize,
}

#[derive(Default)]
pub(crate) struct Shared {
    status: Mutex<Status>,
    /// Forwarded connections (and in-process channels) open now.
    pub(crate) open: AtomicU64,
    /// Bytes sent towards the hub.
    pub(crate) up: AtomicU64,
    /// Bytes received from the hub.
    pub(crate) down: AtomicU64,
    /// Set when the tunnel stops: forwarded connections end and let go of their session.
    pub(crate) stop: watch::Sender<bool>,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

type HubHandle = Arc<Handle<HubHandler>>;
/// The session of each SSH connection (`None` while that one is down); index 0 carries the
/// reverse forwards and decides "connected".
pub(crate) type Sessions = watch::Receiver<Vec<Option<HubHandle>>>;

/// A running tunnel. Dropping it stops it.
pub struct Tunnel {
    shared: Arc<Shared>,
    session: Sessions,
    /// Round-robin position over the SSH connections, shared by every way a channel is opened.
    turn: Arc<AtomicU64>,
    connect_wait: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Forwarded connections hold the session: end them too, or the SSH connection would
        // outlive the tunnel.
        self.shared.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Tunnel {
    /// Bind the local listeners and start connecting.
    ///
    /// # Errors
    /// A listener cannot be bound, or the identity cannot be loaded.
    pub async fn start(config: ClientConfig) -> Result<Self, TunnelError> {
        let key = crate::keyfile::load_private_key(&config.identity)?;
        let mut listeners = Vec::new();
        for f in &config.forwards {
            let l =
                TcpListener::bind(f.listen).await.map_err(|source| TunnelError::Listen { addr: f.listen, source })?;
            listeners.push((l, f.clone()));
        }
        let shared = Arc::new(Shared::default());
        let connections = config.connections.max(1);
        let (tx, rx) = watch::channel(vec![None; connections]);
        let tx = Arc::new(tx);
        let config = Arc::new(config);
        let turn = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (listener, forward) in listeners {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                forward,
                rx.clone(),
                Arc::clone(&shared),
                config.connect_wait,
                Arc::clone(&turn),
            )));
        }
        let key = Arc::new(key);
        for index in 0..connections {
            tasks.push(tokio::spawn(supervise(
                Arc::clone(&config),
                Arc::clone(&key),
                index,
                Arc::clone(&tx),
                Arc::clone(&shared),
            )));
        }
        Ok(Self { shared, session: rx, turn, connect_wait: config.connect_wait, tasks })
    }

    /// Opens channels to the hub in process, with this tunnel's connections, limits and
    /// counters (see [`crate::dial`]).
    pub fn dialer(&self) -> crate::dial::TunnelDialer {
        crate::dial::TunnelDialer::new(
            self.session.clone(),
            Arc::clone(&self.shared),
            self.connect_wait,
            Arc::clone(&self.turn),
        )
    }

    /// A snapshot of the status.
    pub fn status(&self) -> Status {
        let mut s = self.shared.status.lock().map(|s| s.clone()).unwrap_or_default();
        s.open_channels = self.shared.open.load(Ordering::Relaxed);
        s.bytes_to_hub = self.shared.up.load(Ordering::Relaxed);
        s.bytes_from_hub = self.shared.down.load(Ordering::Relaxed);
        s.connections_up = self.session.borrow().iter().filter(|h| h.is_some()).count();
        s
    }

    /// Stop: no new forwarded connections, the open ones closed, every SSH connection ended with
    /// a disconnect message (not left to time out on the hub), within a few seconds.
    pub async fn shutdown(mut self) {
        self.shared.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
        // An aborted task is dropped (its listener closed) only when the runtime gets to it:
        // wait for that, so no listener outlives the call.
        let tasks = std::mem::take(&mut self.tasks);
        let _ = tokio::time::timeout(Duration::from_secs(5), join_tasks(tasks)).await;
        let sessions: Vec<HubHandle> = self.session.borrow().iter().flatten().cloned().collect();
        for h in sessions {
            let _ = h.disconnect(russh::Disconnect::ByApplication, "tunnel shutting down", "en").await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shared.set(|s| {
            s.state = State::Stopped;
            s.connected_since = None;
        });
    }

    /// Wait until the tunnel is up (or `timeout` passes); true if it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.session.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| v.first().is_some_and(Option::is_some)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Copy both ways between a TCP connection and a channel, counting bytes.
pub(crate) async fn pump(mut tcp: TcpStream, channel: Channel<Msg>, shared: &Shared) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let mut stop = shared.stop.subscribe();
    let mut stream = channel.into_stream();
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, COPY_BUF, COPY_BUF) => match r {
            // Whichever side opened it, what the local TCP side sends goes to the hub.
            Ok((to_hub, from_hub)) => {
                shared.up.fetch_add(to_hub, Ordering::Relaxed);
                shared.down.fetch_add(from_hub, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "forwarded connection ended with an error"),
        },
        _ = stop.wait_for(|stopping| *stopping) => tracing::debug!("tunnel stopping; forwarded connection closed"),
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

async fn accept_loop(
    listener: TcpListener,
    forward: LocalForward,
    session: Sessions,
    shared: Arc<Shared>,
    wait: Duration,
    turn: Arc<AtomicU64>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listen = %forward.listen, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut session = session.clone();
        let shared = Arc::clone(&shared);
        let forward = forward.clone();
        let turn = Arc::clone(&turn);
        tokio::spawn(async move {
            let originator = (peer.ip().to_string(), u32::from(peer.port()));
            match open_channel(&mut session, wait, &turn, &forward.remote_host, forward.remote_port, originator).await {
                Ok(channel) => pump(tcp, channel, &shared).await,
                Err(OpenError::NotUp) => {
                    tracing::warn!(listen = %forward.listen, "tunnel not up within {wait:?}; closing the connection");
                }
                Err(OpenError::Refused(e)) => {
                    let msg = format!(
                        "hub refused forward {} -> {}:{}: {e}",
                        forward.listen, forward.remote_host, forward.remote_port
                    );
                    tracing::warn!("{msg}");
                    shared.set(|s| s.last_error = Some(msg));
                }
            }
        });
    }
}

/// Why no channel could be opened.
pub(crate) enum OpenError {
    /// No SSH connection came up within the wait.
    NotUp,
    /// The hub refused the channel (its policy, or nothing listening behind it).
    Refused(russh::Error),
}

/// Open a `direct-tcpip` channel to the hub's `host:port` on the next SSH connection in turn that
/// is up (round-robin), waiting up to `wait` for one. One that died and is not yet replaced is
/// skipped, and a channel it fails to open is tried on the next: opening fails only when no SSH
/// connection can carry it.
pub(crate) async fn open_channel(
    session: &mut Sessions,
    wait: Duration,
    turn: &AtomicU64,
    host: &str,
    port: u16,
    originator: (String, u32),
) -> Result<Channel<Msg>, OpenError> {
    let up = |v: &Vec<Option<HubHandle>>| v.iter().flatten().any(|h| !h.is_closed());
    let sessions = match tokio::time::timeout(wait, session.wait_for(up)).await {
        Ok(Ok(v)) => v.iter().flatten().filter(|h| !h.is_closed()).cloned().collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    if sessions.is_empty() {
        return Err(OpenError::NotUp);
    }
    let start = turn.fetch_add(1, Ordering::Relaxed) as usize;
    let mut refused = OpenError::NotUp;
    for i in 0..sessions.len() {
        let Some(handle) = sessions.get((start + i) % sessions.len()) else { continue };
        match handle
            .channel_open_direct_tcpip(host.to_string(), u32::from(port), originator.0.clone(), originator.1)
            .await
        {
            Ok(channel) => return Ok(channel),
            // This SSH connection went down meanwhile: try the next one.
            Err(e) if handle.is_closed() => refused = OpenError::Refused(e),
            Err(e) => return Err(OpenError::Refused(e)),
        }
    }
    Err(refused)
}

async fn connect_once(
    config: &ClientConfig,
    key: &Arc<russh::keys::PrivateKey>,
    shared: &Arc<Shared>,
    with_reverse: bool,
) -> Result<Handle<HubHandler>, TunnelError> {
    let reverse = if with_reverse { config.reverse.clone() } else { Vec::new() };
    let ssh = Arc::new(client::Config {
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        inactivity_timeout: None,
        nodelay: true,
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: crate::limits::CLIENT_MAX_PACKET,
        channel_buffer_size: crate::limits::CHANNEL_QUEUE,
        preferred: crate::ciphers::preferred(),
        ..client::Config::default()
    });
    let key_error = Arc::new(Mutex::new(None));
    let handler = HubHandler {
        policy: config.host_key.clone(),
        host: config.hub_host.clone(),
        port: config.hub_port,
        reverse: Arc::new(reverse.clone()),
        key_error: Arc::clone(&key_error),
        shared: Arc::clone(shared),
    };
    let hub = format!("{}:{}", config.hub_host, config.hub_port);
    let tcp = tokio::net::TcpStream::connect((config.hub_host.as_str(), config.hub_port))
        .await
        .map_err(|e| TunnelError::Ssh(format!("connecting to {hub}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    // Reads through a buffer (writes pass straight through): see `limits::SSH_READ_BUFFER`.
    let stream = tokio::io::BufReader::with_capacity(crate::limits::SSH_READ_BUFFER, tcp);
    let connected = client::connect_stream(ssh, stream, handler).await;
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            if let Some(k) = key_error.lock().ok().and_then(|mut k| k.take()) {
                return Err(k.into());
            }
            return Err(TunnelError::Ssh(format!("connecting to {hub}: {e}")));
        }
    };
    let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
    let auth = handle
        .authenticate_publickey(config.user.clone(), PrivateKeyWithHashAlg::new(Arc::clone(key), hash))
        .await
        .map_err(|e| TunnelError::Ssh(e.to_string()))?;
    if !auth.success() {
        let fingerprint = crate::hostkey::fingerprint(key.public_key());
        return Err(TunnelError::AuthRefused { hub, fingerprint, user: config.user.clone() });
    }
    for r in &reverse {
        if let Err(e) = handle.tcpip_forward(r.remote_bind.clone(), u32::from(r.remote_port)).await {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "reverse forward refused", "").await;
            return Err(TunnelError::ReverseRefused {
                bind: r.remote_bind.clone(),
                port: r.remote_port,
                local: r.local,
                reason: e.to_string(),
            });
        }
    }
    Ok(handle)
}

/// Keep SSH connection `index` up: reconnect forever with capped exponential backoff and
/// jitter. Connection 0 carries the reverse forwards and is what the status reports; the others
/// only carry forwarded connections.
async fn supervise(
    config: Arc<ClientConfig>,
    key: Arc<russh::keys::PrivateKey>,
    index: usize,
    publish: Arc<watch::Sender<Vec<Option<HubHandle>>>>,
    shared: Arc<Shared>,
) {
    let primary = index == 0;
    let mut delay = config.backoff_initial;
    let mut connections = 0u64;
    let mut seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(1)
        | 1
        | (index as u32) << 20;
    let set_session = |h: Option<HubHandle>| {
        publish.send_modify(|v| {
            if let Some(slot) = v.get_mut(index) {
                *slot = h;
            }
        })
    };
    loop {
        match connect_once(&config, &key, &shared, primary).await {
            Ok(handle) => {
                let since = Instant::now();
                connections += 1;
                if primary {
                    shared.set(|s| {
                        s.state = State::Up;
                        s.connected_since = Some(SystemTime::now());
                        s.reconnects = connections - 1;
                    });
                    tracing::info!(hub = %config.hub_host, port = config.hub_port, "tunnel up");
                } else {
                    tracing::debug!(index, "extra SSH connection up");
                }
                let handle = Arc::new(handle);
                set_session(Some(Arc::clone(&handle)));
                while !handle.is_closed() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                set_session(None);
                if primary {
                    shared.set(|s| {
                        s.state = State::Retrying;
                        s.connected_since = None;
                        s.last_error = Some("connection to the hub closed".into());
                    });
                    tracing::warn!("tunnel down; reconnecting");
                } else {
                    tracing::debug!(index, "extra SSH connection down; reconnecting");
                }
                if since.elapsed() > Duration::from_secs(10) {
                    delay = config.backoff_initial;
                }
            }
            Err(e) => {
                let refused = matches!(e, TunnelError::HostKey(_) | TunnelError::AuthRefused { .. });
                if refused {
                    // Retrying soon cannot help; keep trying slowly so a fixed hub is found again.
                    tracing::error!(connection = index, error = %e, "tunnel refused; retrying at the longest backoff");
                    delay = config.backoff_max;
                } else {
                    tracing::warn!(connection = index, error = %e, "tunnel connection failed");
                }
                shared.set(|s| {
                    if primary {
                        s.state = if refused { State::Refused } else { State::Retrying };
                    }
                    s.last_error = Some(e.to_string());
                });
            }
        }
        // Jitter: between half and all of the delay.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let jittered = delay.mul_f64(0.5 + f64::from(seed % 1000) / 2000.0);
        tokio::time::sleep(jittered).await;
        delay = (delay * 2).min(config.backoff_max);
    }
}

/// Wait for every task (aborted ones end with a cancellation error, which is what is expected).
async fn join_tasks(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
