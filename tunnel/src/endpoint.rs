//! The hub's SSH endpoint: authenticates keys from authorized_keys and allows nothing but the
//! configured forwards.
//!
//! Allowed: `direct-tcpip` to 127.0.0.1/localhost on allowed ports (and within the key's
//! `permitopen=`), `tcpip-forward` on allowed ports of the hub's loopback. Everything else —
//! sessions (shell, exec, subsystems), agent and X11 forwarding, other ports, unknown keys, keys
//! used from addresses outside their `from=` — is refused. Connections per key and channels per
//! connection are bounded. A forwarded destination is connected in a spawned task (a slow
//! connect must not stall the session), and reverse-forward listeners belong to their session:
//! they close with it or on `cancel-tcpip-forward`. A key that asks again for a reverse port its
//! own stale session still holds (a node reconnecting before the hub noticed the old connection
//! died) takes it over at once; another key is refused.
//!
//! Before authentication nothing is free: a connection must log in within the login deadline
//! (30 s) or is closed, at most 64 unauthenticated connections are open at once (8 per
//! address), and a client gets 3 authentication attempts. Those 64 places are anyone's, so
//! silent connections from a few dozen addresses could hold them all and keep every node out;
//! 16 more are kept for the addresses a key has logged in from (the last 1024 of them), taken
//! only when the 64 are full: such a flood no longer locks out a node that has connected before.
//!
//! On top of the static allow lists, an embedding service can decide per key and port with a
//! [`ForwardPolicy`]: the hub lets a node's key reach only the NBD ports leased to that node's
//! running jobs, and listen only on that node's reverse API port.
//!
//! A service that itself listens on an allowed port can also take such a channel in process
//! ([`LocalForward`]): once the forward is allowed, the channel's byte stream goes to the service
//! instead of through a loopback TCP connection to it. The hub serves its NBD exports this way:
//! every byte of a remote backup then crosses one socket on the hub (the node's SSH connection)
//! instead of three (SSH in, loopback out, loopback in), which is CPU the decryption needs.
//!
//! The keys that may connect can be replaced while the endpoint serves ([`Endpoint::authorize`]):
//! a key no longer among them is refused from then on, and the sessions it has open are
//! disconnected at once, so revoking a node's key cuts its tunnel without a restart (OpenSSH
//! reads authorized_keys again at each login, but leaves the sessions already open); a key whose
//! options changed (`from=` narrowed, say) is disconnected too and logs in again under them.
//! The sessions logged in are told by [`Endpoint::sessions`] (key, peer, since), for a service
//! that shows its operators which tunnels are up, and the logins refused lately by
//! [`Endpoint::refused_logins`] (which key, from where, why: [`refusals`]), for one that shows
//! them why a tunnel is not.

mod refusals;

pub use refusals::{Refusal, RefusalTotals, RefusedLogin};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};

use crate::authorized::AuthorizedKey;

/// Inclusive port ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(pub Vec<(u16, u16)>);

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u32) -> bool {
        self.0.iter().any(|(a, b)| (u32::from(*a)..=u32::from(*b)).contains(&port))
    }
}

/// A per-key decision on top of the allow lists, made by the embedding service at the moment
/// a channel or listener is asked for.
pub trait ForwardPolicy: Send + Sync {
    /// May `key` open a `direct-tcpip` channel to the hub's loopback `port`?
    fn allow_direct(&self, key: &AuthorizedKey, port: u16) -> bool;
    /// May `key` ask the hub to listen on its loopback `port`?
    fn allow_reverse(&self, key: &AuthorizedKey, port: u16) -> bool;
}

/// A forwarded channel's bytes, as a [`LocalForward`] receives them (`AsyncRead` + `AsyncWrite`;
/// dropping it closes the channel), and its path for owned bytes
/// ([`crate::channel_io::ChannelIo::sender`]): the hub's NBD server sends read replies that way.
pub type ForwardedStream = crate::channel_io::ChannelIo<Msg>;

/// A forwarded channel's path for owned bytes ([`ForwardedStream`]'s `sender()`).
pub type ForwardedSender = crate::channel_io::BytesSender<Msg>;

/// What serves one forwarded channel in process.
pub type LocalServe =
    Box<dyn FnOnce(ForwardedStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// A destination the embedding service serves itself, in process.
///
/// Asked only after the allow lists and the [`ForwardPolicy`] have allowed the channel; the
/// channel's limits stay the endpoint's.
pub trait LocalForward: Send + Sync {
    /// Serve a `direct-tcpip` channel to loopback `port` in process, or `None` to connect to
    /// 127.0.0.1:`port` over TCP as usual.
    fn serve(&self, port: u16) -> Option<LocalServe>;
}

/// What the endpoint allows.
///
/// Built with [`EndpointConfig::new`] (nothing allowed yet) and the setters.
#[derive(Clone)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// The hub's host key.
    pub host_key: PrivateKey,
    /// Keys that may connect.
    pub authorized: Vec<AuthorizedKey>,
    /// Only this user name, if set.
    pub user: Option<String>,
    /// Ports `direct-tcpip` may reach on the hub's loopback.
    pub allow_direct: PortSet,
    /// Ports clients may ask the hub to listen on (reverse forwards), on its loopback.
    pub allow_reverse: PortSet,
    /// Connections one key may hold at once.
    pub max_connections_per_key: usize,
    /// Channels one connection may hold at once.
    pub max_channels_per_connection: usize,
    /// Per-key decisions on top of the allow lists (`None`: the lists decide alone).
    pub policy: Option<Arc<dyn ForwardPolicy>>,
    /// Destinations served in process (`None`: every forward is a TCP connection).
    pub local: Option<Arc<dyn LocalForward>>,
    /// Bounds on connections that have not logged in yet.
    pub login: LoginLimits,
}

/// Bounds on connections before authentication.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LoginLimits {
    /// A connection that has not authenticated by then is closed.
    pub deadline: Duration,
    /// Unauthenticated connections open at once.
    pub max_pending: usize,
    /// Unauthenticated connections open at once from one address.
    pub max_pending_per_address: usize,
    /// More unauthenticated connections open at once, taken only when `max_pending` are, and
    /// only by addresses a key has logged in from before.
    pub reserved_for_known: usize,
}

impl EndpointConfig {
    /// `host_key` and the keys that may connect; no forward allowed yet, 8 connections per key,
    /// 512 channels per connection, the default login limits.
    pub fn new(host_key: PrivateKey, authorized: Vec<AuthorizedKey>) -> Self {
        Self {
            host_key,
            authorized,
            user: None,
            allow_direct: PortSet::default(),
            allow_reverse: PortSet::default(),
            max_connections_per_key: 8,
            max_channels_per_connection: 512,
            policy: None,
            local: None,
            login: LoginLimits::default(),
        }
    }

    setters::setters! {
        user: Option<String>,
        allow_direct: PortSet,
        allow_reverse: PortSet,
        max_connections_per_key: usize,
        max_channels_per_connection: usize,
        policy: Option<Arc<dyn ForwardPolicy>>,
        local: Option<Arc<dyn LocalForward>>,
        login: LoginLimits,
    }
}

impl LoginLimits {
    setters::setters! {
        deadline: Duration,
        max_pending: usize,
        max_pending_per_address: usize,
        reserved_for_known: usize,
    }
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self { deadline: Duration::from_secs(30), max_pending: 64, max_pending_per_address: 8, reserved_for_known: 16 }
    }
}

/// Addresses a key logged in from that [`Shared::known`] remembers (the oldest forgotten first).
const KNOWN_ADDRESSES: usize = 1024;

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("authorized", &self.authorized.len())
            .field("user", &self.user)
            .field("allow_direct", &self.allow_direct)
            .field("allow_reverse", &self.allow_reverse)
            .field("policy", &self.policy.is_some())
            .field("local", &self.local.is_some())
            .finish()
    }
}

/// Counts and reverse listeners shared by all sessions.
#[derive(Default)]
struct Shared {
    /// The keys that may connect now ([`Endpoint::authorize`]).
    authorized: RwLock<Arc<Vec<AuthorizedKey>>>,
    /// Logged-in sessions by number.
    live: Mutex<HashMap<u64, LiveEntry>>,
    /// The next session's number.
    next_session: std::sync::atomic::AtomicU64,
    per_key: Mutex<HashMap<String, usize>>,
    /// Reverse port -> (key fingerprint, the listener task's abort handle).
    reverse: Mutex<HashMap<u32, (String, tokio::task::AbortHandle)>>,
    /// Unauthenticated connections per address.
    pending: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Addresses a key logged in from, with when it last did (at most [`KNOWN_ADDRESSES`]).
    known: Mutex<HashMap<std::net::IpAddr, std::time::Instant>>,
    /// Logins refused lately.
    refusals: refusals::Refusals,
}

/// A logged-in session as the endpoint keeps it.
struct LiveEntry {
    /// The authorized_keys entry it logged in with.
    entry: AuthorizedKey,
    /// To disconnect it.
    handle: server::Handle,
    /// Where it comes from.
    peer: SocketAddr,
    /// When it logged in.
    since: std::time::SystemTime,
}

/// A logged-in session, as [`Endpoint::sessions`] tells it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The authorized_keys entry it logged in with.
    pub key: AuthorizedKey,
    /// Where it comes from.
    pub peer: SocketAddr,
    /// When it logged in.
    pub since: std::time::SystemTime,
}

/// One unauthenticated connection's place in the bounds; given back on drop.
struct Pending {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.pending.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// Serve the endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: EndpointConfig) {
    Endpoint::new(config).serve(listener).await;
}

/// An endpoint whose keys can be replaced while it serves (module doc).
pub struct Endpoint {
    config: Arc<EndpointConfig>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint of `config` (its `authorized` keys the first that may connect).
    pub fn new(config: EndpointConfig) -> Arc<Self> {
        let shared = Shared { authorized: RwLock::new(Arc::new(config.authorized.clone())), ..Shared::default() };
        Arc::new(Self { config: Arc::new(config), shared: Arc::new(shared) })
    }

    /// From now on only `keys` may connect; sessions logged in with a key not among them, or
    /// among them with other options (`from=`, `permitopen=`, `permitlisten=`, forwarding,
    /// `expiry-time=`: the grant changed, so the session logs in again under the new one), are
    /// disconnected. Returns how many were.
    pub fn authorize(&self, keys: Vec<AuthorizedKey>) -> usize {
        self.reauthorize(keys, |_| false)
    }

    /// As [`Self::authorize`], and the sessions of the keys `regranted` names are disconnected
    /// too, authorized or not: what the embedding service's [`ForwardPolicy`] grants them changed
    /// (a key given to another tenant, say), and a session keeps what it was granted (its
    /// reverse listeners) until it logs in again. Returns how many sessions were cut.
    pub fn reauthorize(&self, keys: Vec<AuthorizedKey>, regranted: impl Fn(&AuthorizedKey) -> bool) -> usize {
        *self.shared.authorized.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        let cut_off: Vec<(AuthorizedKey, server::Handle, &'static str)> = self
            .shared
            .live
            .lock()
            .map(|live| {
                live.values()
                    .filter_map(|LiveEntry { entry, handle, .. }| {
                        let reason = match self.shared.authorizes(entry) {
                            _ if !self.shared.holds_key(entry) => "key no longer authorized",
                            false => "key's options changed: log in again",
                            true if regranted(entry) => "key's grant changed: log in again",
                            true => return None,
                        };
                        Some((entry.clone(), handle.clone(), reason))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let count = cut_off.len();
        for (entry, handle, reason) in cut_off {
            cut(&entry, handle, reason);
        }
        count
    }

    /// The sessions logged in now, oldest first: whose key, from where, since when (what an
    /// operator asks of a tunnel that should be up).
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let Ok(live) = self.shared.live.lock() else { return Vec::new() };
        let mut out: Vec<SessionInfo> =
            live.values().map(|l| SessionInfo { key: l.entry.clone(), peer: l.peer, since: l.since }).collect();
        out.sort_by_key(|s| s.since);
        out
    }

    /// The logins refused in the last hour ([`refusals::WINDOW`]), by reason, key and address
    /// (at most [`refusals::MAX_KINDS`] of them), the latest first, with the connections that
    /// ended before they logged in: what an operator asks of a tunnel that does not come up (its
    /// key unknown here, expired, from an address its `from=` does not allow; the client not
    /// accepting this host key).
    pub fn refused_logins(&self) -> Vec<RefusedLogin> {
        self.shared.refusals.recent(std::time::SystemTime::now())
    }

    /// The fingerprint of the endpoint's host key (`SHA256:...`): what its clients pin.
    pub fn host_key_fingerprint(&self) -> String {
        crate::hostkey::fingerprint(self.config.host_key.public_key())
    }

    /// Logins refused since the endpoint started, per reason (for a metric).
    pub fn refusals_total(&self) -> RefusalTotals {
        self.shared.refusals.totals()
    }

    /// The addresses keys have logged in from (seen here or given to
    /// [`Self::remember_addresses`]), the latest first, at most 1024: what an embedder keeps so
    /// that after its restart the places before login kept for known addresses
    /// ([`LoginLimits::reserved_for_known`]) serve its clients at once.
    pub fn known_addresses(&self) -> Vec<std::net::IpAddr> {
        let Ok(known) = self.shared.known.lock() else { return Vec::new() };
        let mut by_time: Vec<(std::time::Instant, std::net::IpAddr)> =
            known.iter().map(|(ip, at)| (*at, *ip)).collect();
        by_time.sort_unstable_by(|a, b| b.cmp(a));
        by_time.into_iter().map(|(_, ip)| ip).collect()
    }

    /// Take `addresses` as ones keys logged in from before (what [`Self::known_addresses`] gave
    /// before a restart); the logins seen here stay newer.
    pub fn remember_addresses(&self, addresses: Vec<std::net::IpAddr>) {
        self.shared.seed_known(addresses);
    }

    /// Serve on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        serve_shared(listener, Arc::clone(&self.config), Arc::clone(&self.shared)).await;
    }
}

impl Shared {
    /// Whether a session logged in with `entry` may stay: its key is authorized now with the
    /// same options.
    fn authorizes(&self, entry: &AuthorizedKey) -> bool {
        let keys = Arc::clone(&self.authorized.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        keys.iter().any(|k| same_grant(k, entry))
    }

    /// Whether `entry`'s key is authorized now, with whatever options.
    fn holds_key(&self, entry: &AuthorizedKey) -> bool {
        let keys = Arc::clone(&self.authorized.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        keys.iter().any(|k| k.key.key_data() == entry.key.key_data())
    }

    /// Remember that a key logged in from `ip`.
    fn logged_in_from(&self, ip: std::net::IpAddr) {
        let Ok(mut known) = self.known.lock() else { return };
        if known.len() >= KNOWN_ADDRESSES && !known.contains_key(&ip) {
            if let Some(oldest) = known.iter().min_by_key(|(_, at)| **at).map(|(a, _)| *a) {
                known.remove(&oldest);
            }
        }
        known.insert(ip, std::time::Instant::now());
    }

    /// Take `addresses` as ones a key logged in from (before this endpoint started: kept by its
    /// embedder across restarts), up to [`KNOWN_ADDRESSES`]; older than any login seen here.
    fn seed_known(&self, addresses: Vec<std::net::IpAddr>) {
        let Ok(mut known) = self.known.lock() else { return };
        let then = known.values().min().copied().unwrap_or_else(std::time::Instant::now);
        for ip in addresses.into_iter().map(|ip| ip.to_canonical()) {
            if known.len() >= KNOWN_ADDRESSES {
                break;
            }
            known.entry(ip).or_insert(then);
        }
    }

    /// Whether a key has logged in from `ip` (as far as the last [`KNOWN_ADDRESSES`] go).
    fn is_known(&self, ip: std::net::IpAddr) -> bool {
        self.known.lock().is_ok_and(|known| known.contains_key(&ip))
    }
}

/// Disconnect a session for `reason`, told to its client (in a task of its own: the session's
/// loop may be the caller's to poll).
fn cut(entry: &AuthorizedKey, handle: server::Handle, reason: &'static str) {
    let key = crate::hostkey::fingerprint(&entry.key);
    tracing::warn!(%key, reason, "disconnecting the key's session");
    tokio::spawn(async move {
        let _ = handle.disconnect(russh::Disconnect::ByApplication, reason.into(), "en".into()).await;
    });
}

/// Whether two entries grant the same: the same key with the same options (wherever their lines).
fn same_grant(a: &AuthorizedKey, b: &AuthorizedKey) -> bool {
    a.key.key_data() == b.key.key_data()
        && a.from == b.from
        && a.permitopen == b.permitopen
        && a.permitlisten == b.permitlisten
        && a.port_forwarding == b.port_forwarding
        && a.expires == b.expires
}

/// A logged-in session's place in [`Shared::live`]; taken out on drop.
struct LiveSession {
    shared: Arc<Shared>,
    number: u64,
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if let Ok(mut live) = self.shared.live.lock() {
            live.remove(&self.number);
        }
    }
}

async fn serve_shared(listener: TcpListener, config: Arc<EndpointConfig>, shared: Arc<Shared>) {
    let ssh = Arc::new(server::Config {
        keys: vec![config.host_key.clone()],
        methods: (&[russh::MethodKind::PublicKey][..]).into(),
        auth_rejection_time: Duration::from_millis(300),
        max_auth_attempts: 3,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(15)),
        nodelay: true,
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: crate::limits::ENDPOINT_MAX_PACKET,
        channel_buffer_size: crate::limits::CHANNEL_QUEUE,
        preferred: crate::ciphers::preferred(),
        ..server::Config::default()
    });
    let pending_slots = Arc::new(tokio::sync::Semaphore::new(config.login.max_pending));
    let reserved_slots = Arc::new(tokio::sync::Semaphore::new(config.login.reserved_for_known));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let permit = match Arc::clone(&pending_slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match shared.is_known(ip).then(|| Arc::clone(&reserved_slots).try_acquire_owned()) {
                Some(Ok(p)) => p,
                _ => {
                    tracing::warn!(%peer, "refused: too many connections waiting to log in");
                    continue;
                }
            },
        };
        let admitted = shared.pending.lock().is_ok_and(|mut m| {
            let n = m.entry(ip).or_insert(0);
            *n += 1;
            *n <= config.login.max_pending_per_address
        });
        let pending = Pending { shared: Arc::clone(&shared), ip, _permit: permit };
        if !admitted {
            tracing::warn!(%peer, "refused: too many connections from this address waiting to log in");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (authenticated, logged_in) = tokio::sync::oneshot::channel();
        let tried_a_key = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = EndpointSession {
            tried_a_key: Arc::clone(&tried_a_key),
            config: Arc::clone(&config),
            shared: Arc::clone(&shared),
            peer,
            key_id: None,
            channels: Arc::new(AtomicUsize::new(0)),
            forwards: HashMap::new(),
            key: None,
            authenticated: Some(authenticated),
        };
        let ssh = Arc::clone(&ssh);
        let deadline = config.login.deadline;
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let login = tokio::time::sleep(deadline);
            tokio::pin!(login);
            // The identification line and key exchange happen here: bounded by the deadline too.
            let session = tokio::select! {
                s = server::run_stream(ssh, tokio::io::BufReader::with_capacity(crate::limits::SSH_READ_BUFFER, stream), handler) => s,
                _ = &mut login => {
                    tracing::warn!(%peer, "closed: no login within the deadline");
                    return;
                }
            };
            // Told unless a key it tried was refused (that refusal says why already).
            let ended_before_login = || {
                if !tried_a_key.load(Ordering::Relaxed) {
                    let now = std::time::SystemTime::now();
                    shared.refusals.record(Refusal::EndedBeforeLogin, None, peer.ip().to_canonical(), now);
                }
            };
            let mut session = match session {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = ?e, "handshake failed");
                    ended_before_login();
                    return;
                }
            };
            // Logged in: the session is among the live ones (which a key's revocation cuts).
            let _live = tokio::select! {
                r = &mut session => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = ?e, "session ended before login");
                    }
                    ended_before_login();
                    return;
                }
                r = logged_in => {
                    // The sender goes with the handler: the session ended without a login.
                    let Ok(entry) = r else {
                        ended_before_login();
                        return;
                    };
                    drop(pending);
                    shared.logged_in_from(peer.ip().to_canonical());
                    let number = shared.next_session.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut live) = shared.live.lock() {
                        let since = std::time::SystemTime::now();
                        live.insert(number, LiveEntry { entry: entry.clone(), handle: session.handle(), peer, since });
                    }
                    // Revoked between its login and now (after `authorize` looked at the live
                    // sessions): cut here, as `authorize` would have.
                    if !shared.authorizes(&entry) {
                        cut(&entry, session.handle(), "key no longer authorized");
                    }
                    LiveSession { shared: Arc::clone(&shared), number }
                }
                _ = &mut login => {
                    tracing::warn!(%peer, "closed: no login within the deadline");
                    let _ = session
                        .handle()
                        .disconnect(russh::Disconnect::ByApplication, "login deadline passed".into(), "en".into())
                        .await;
                    return;
                }
            };
            if let Err(e) = session.await {
                tracing::debug!(%peer, error = ?e, "session ended");
            }
        });
    }
}

/// One client connection.
struct EndpointSession {
    config: Arc<EndpointConfig>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Fingerprint of the accepted key (counted in `per_key`).
    key_id: Option<String>,
    key: Option<AuthorizedKey>,
    channels: Arc<AtomicUsize>,
    /// Reverse-forward listeners of this session, by port.
    forwards: HashMap<u32, tokio::task::JoinHandle<()>>,
    /// Told the key's entry once it is accepted (frees the connection's pre-login place).
    authenticated: Option<tokio::sync::oneshot::Sender<AuthorizedKey>>,
    /// Set once a key it signed with was looked at (the connection's end before login is then
    /// not told as one: the key's refusal is).
    tried_a_key: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for EndpointSession {
    fn drop(&mut self) {
        for (port, t) in self.forwards.drain() {
            t.abort();
            if let Ok(mut m) = self.shared.reverse.lock() {
                if m.get(&port).is_some_and(|(_, h)| h.id() == t.id()) {
                    m.remove(&port);
                }
            }
        }
        if let Some(id) = &self.key_id {
            if let Ok(mut m) = self.shared.per_key.lock() {
                if let Some(n) = m.get_mut(id) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

fn loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

async fn pump(mut tcp: TcpStream, channel: Channel<Msg>) {
    let mut stream = channel.into_stream();
    let _ = tokio::io::copy_bidirectional_with_sizes(
        &mut tcp,
        &mut stream,
        crate::client::COPY_BUF,
        crate::client::COPY_BUF,
    )
    .await;
}

/// One of a connection's channels; gives its place back on drop (however its task ends).
struct ChannelSlot(Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Disconnect a peer that sent more channel data in one packet than we advertised (see
/// [`crate::limits`]).
fn oversized_packet(len: usize, max: u32, peer: &SocketAddr, channel: russh::ChannelId) -> Result<(), russh::Error> {
    if crate::limits::packet_within(len, max) {
        return Ok(());
    }
    tracing::warn!(%peer, ?channel, len, max, "disconnecting: channel data larger than the advertised maximum packet");
    Err(russh::Error::PacketSize(len))
}

impl server::Handler for EndpointSession {
    type Error = russh::Error;

    async fn data(&mut self, channel: russh::ChannelId, data: &[u8], _: &mut Session) -> Result<(), Self::Error> {
        oversized_packet(data.len(), crate::limits::ENDPOINT_MAX_PACKET, &self.peer, channel)
    }

    async fn extended_data(
        &mut self,
        channel: russh::ChannelId,
        _code: u32,
        data: &[u8],
        _: &mut Session,
    ) -> Result<(), Self::Error> {
        oversized_packet(data.len(), crate::limits::ENDPOINT_MAX_PACKET, &self.peer, channel)
    }

    async fn auth_publickey(&mut self, user: &str, key: server::VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let id = crate::hostkey::fingerprint(key.public_key);
        self.tried_a_key.store(true, Ordering::Relaxed);
        let refuse = |reason: Refusal| {
            self.shared.refusals.record(reason, Some(&id), self.peer.ip().to_canonical(), std::time::SystemTime::now());
            Ok(Auth::reject())
        };
        if self.config.user.as_deref().is_some_and(|u| u != user) {
            tracing::warn!(peer = %self.peer, user, "refused: wrong user");
            return refuse(Refusal::WrongUser);
        }
        let authorized = Arc::clone(&self.shared.authorized.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        let entry = authorized.iter().find(|a| a.key.key_data() == key.public_key.key_data()).cloned();
        let Some(entry) = entry else {
            tracing::warn!(peer = %self.peer, user, fingerprint = %id, "refused: unknown key");
            return refuse(Refusal::UnknownKey);
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if !entry.valid_at(now) {
            tracing::warn!(peer = %self.peer, line = entry.line, "refused: key expired (expiry-time)");
            return refuse(Refusal::KeyExpired);
        }
        if !entry.allows_from(&self.peer.ip().to_canonical().to_string()) {
            tracing::warn!(peer = %self.peer, line = entry.line, "refused: key not allowed from this address");
            return refuse(Refusal::AddressNotAllowed);
        }
        if let Ok(mut m) = self.shared.per_key.lock() {
            let n = m.entry(id.clone()).or_insert(0);
            if *n >= self.config.max_connections_per_key {
                tracing::warn!(peer = %self.peer, key = %id, "refused: too many connections for this key");
                drop(m);
                return refuse(Refusal::TooManyConnections);
            }
            *n += 1;
        }
        self.key_id = Some(id);
        if let Some(tx) = self.authenticated.take() {
            let _ = tx.send(entry.clone());
        }
        self.key = Some(entry);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = %self.peer, "refused: session channel (shell/exec/subsystem)");
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let permitted = self.key.as_ref().is_some_and(|k| {
            u16::try_from(port_to_connect).is_ok_and(|p| {
                k.allows_open(host_to_connect, p)
                    && self.config.policy.as_ref().is_none_or(|pol| pol.allow_direct(k, p))
            })
        });
        if !loopback(host_to_connect) || !self.config.allow_direct.contains(port_to_connect) || !permitted {
            tracing::warn!(peer = %self.peer, host_to_connect, port_to_connect, "refused: forward not allowed");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        if self.channels.fetch_add(1, Ordering::Relaxed) >= self.config.max_channels_per_connection {
            self.channels.fetch_sub(1, Ordering::Relaxed);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let slot = ChannelSlot(Arc::clone(&self.channels));
        let port = port_to_connect as u16;
        if let Some(serve) = self.config.local.as_ref().and_then(|l| l.serve(port)) {
            tokio::spawn(async move {
                reply.accept().await;
                serve(crate::channel_io::ChannelIo::new(channel)).await;
                drop(slot);
            });
            return Ok(());
        }
        tokio::spawn(async move {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    pump(tcp, channel).await;
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
            drop(slot);
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let by_policy = self.key.as_ref().is_some_and(|k| {
            u16::try_from(*port).is_ok_and(|p| {
                k.allows_listen(p) && self.config.policy.as_ref().is_none_or(|pol| pol.allow_reverse(k, p))
            })
        });
        if !loopback(address)
            || !self.config.allow_reverse.contains(*port)
            || self.forwards.contains_key(port)
            || !by_policy
        {
            tracing::warn!(peer = %self.peer, address, port = *port, "refused: reverse forward not allowed");
            return Ok(false);
        }
        // A stale session of the same key gives the port up at once; another key keeps it.
        let me = self.key_id.clone().unwrap_or_default();
        let stale = self.shared.reverse.lock().ok().and_then(|m| m.get(port).cloned());
        if let Some((owner, abort)) = stale {
            if owner != me {
                tracing::warn!(peer = %self.peer, port = *port, "refused: reverse port held by another key");
                return Ok(false);
            }
            tracing::info!(peer = %self.peer, port = *port, "taking the reverse port over from a stale session");
            abort.abort();
        }
        let mut bound_listener = None;
        for _ in 0..40 {
            match TcpListener::bind(("127.0.0.1", *port as u16)).await {
                Ok(l) => {
                    bound_listener = Some(l);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => {
                    tracing::warn!(port = *port, error = %e, "reverse forward cannot listen");
                    return Ok(false);
                }
            }
        }
        let Some(listener) = bound_listener else {
            tracing::warn!(port = *port, "reverse forward cannot listen: the port stays in use");
            return Ok(false);
        };
        let handle = session.handle();
        let bound = *port;
        let address = address.to_string();
        let counter = Arc::clone(&self.channels);
        let max_channels = self.config.max_channels_per_connection;
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                // Reverse channels count against the connection's channel limit like forward
                // ones (counted from the accept, so connections waiting for the open count too):
                // otherwise anyone reaching the hub's reverse port could pin the node's memory.
                if counter.fetch_add(1, Ordering::Relaxed) >= max_channels {
                    counter.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(port = bound, "reverse connection refused: channel limit reached");
                    continue;
                }
                let slot = ChannelSlot(Arc::clone(&counter));
                let handle = handle.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match handle
                        .channel_open_forwarded_tcpip(address, bound, peer.ip().to_string(), u32::from(peer.port()))
                        .await
                    {
                        Ok(channel) => pump(tcp, channel).await,
                        Err(e) => tracing::debug!(error = ?e, "reverse channel refused by the client"),
                    }
                    drop(slot);
                });
            }
        });
        if let Ok(mut m) = self.shared.reverse.lock() {
            m.insert(bound, (me, task.abort_handle()));
        }
        self.forwards.insert(bound, task);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.remove(&port).map(|t| t.abort()).is_some())
    }
}
