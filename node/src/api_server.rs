//! How both services serve their API (the hub's too): an accept loop that bounds what a peer can
//! hold, HTTP/1.1 by hyper on each connection, HTTPS when `api_tls` is set ([`crate::https`]),
//! and a graceful stop.
//!
//! Bounds, because the API shares its process with the NBD exports and the tunnel: every
//! connection takes a descriptor and a task, and `axum::serve` takes as many as peers open and
//! keeps an idle one for ever. Here at most [`Limits::connections`] are open at once (past them
//! new ones wait in the kernel's backlog, the process's descriptors left to the exports), and at
//! most [`Limits::per_peer`] of them from one address (past that a new one is closed at once,
//! so that one peer dripping requests cannot hold every slot and lock the hub out), a
//! TLS handshake gets [`crate::https::HANDSHAKE_TIMEOUT`], and a connection that does not send a
//! whole request head within [`Limits::idle`] (between requests too: a keep-alive connection
//! left idle, or one that drips its head) is closed. A request being answered is never cut:
//! a verification the hub answers after minutes holds its connection as long as it takes.
//!
//! The stop: once `shutdown` resolves, no connection is accepted, every open one is asked to
//! finish the request it is answering and close (idle ones close at once), and `serve` returns
//! when all have: what `axum::serve(..).with_graceful_shutdown` does, which cannot be told the
//! limits above (axum 0.8 gives no hold on its hyper builder).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::https::ApiTls;

/// What one API listener lets its peers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, handshakes included.
    pub connections: usize,
    /// Of those, from one IP address.
    pub per_peer: usize,
    /// How long a connection may take to send a request's head, counted from when it is
    /// ready for one (idle keep-alive time included).
    pub idle: Duration,
}

impl Default for Limits {
    /// 256 connections, half of them from one address, 60 s: far above what the hub opens to a
    /// node (a pooled connection per call in flight: at most one per job, and a node's port
    /// range holds 101 disks) and operators' scripts open (through the tunnel every call comes
    /// from loopback), while one address alone leaves the other half to everyone else; and
    /// above the 20 s the hub's client keeps an idle connection for
    /// ([`crate::api::NodeClient`]), so a pooled connection is not closed under the request
    /// that reuses it.
    fn default() -> Self {
        Self { connections: 256, per_peer: 128, idle: Duration::from_secs(60) }
    }
}

/// Serve `router` on `tcp` within `limits` (module doc), over HTTPS with `tls`, else over plain
/// HTTP (warned about when the address is not loopback), until `shutdown` resolves and the
/// connections open then have finished.
///
/// # Errors
/// Never today (accept errors are logged and waited out); `io::Result` for what may come.
pub async fn serve(
    mut tcp: TcpListener,
    tls: Option<Arc<ApiTls>>,
    router: axum::Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if tls.is_none() {
        if let Ok(addr) = tcp.local_addr().map(|a| a.ip()) {
            if !addr.is_loopback() {
                tracing::warn!(%addr, "the API is served in clear on a network address: set api_tls for HTTPS");
            }
        }
    }
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    let peers = Peers::new(limits.per_peer.max(1));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = axum::serve::Listener::accept(&mut tcp) => accepted,
        };
        let Some(held) = peers.admit(peer.ip()) else {
            // Closed at once: its slot goes back with it.
            continue;
        };
        let served =
            Served { router: router.clone(), idle: limits.idle, stopping: stopping.clone(), _slot: slot, _peer: held };
        connections.spawn(connection(stream, peer, tls.clone(), served));
    }
    drop(tcp);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// What a connection's task holds besides its stream: the router, the idle limit, the stop
/// signal, its slot among [`Limits::connections`] and its place among its peer's (both freed
/// when the task ends).
struct Served {
    router: axum::Router,
    idle: Duration,
    stopping: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
    _peer: PeerConnection,
}

/// How many connections each address holds, for [`Limits::per_peer`].
#[derive(Clone)]
struct Peers {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, PeerCount>>>,
}

#[derive(Default)]
struct PeerCount {
    open: usize,
    /// A refusal was logged since the peer last went under the limit (one line per episode,
    /// not one per refused connection).
    warned: bool,
}

impl Peers {
    fn new(limit: usize) -> Self {
        Self { limit, open: Arc::default() }
    }

    /// A place for one more connection from `ip`, or `None` when it holds its limit already.
    fn admit(&self, ip: IpAddr) -> Option<PeerConnection> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        if count.open >= self.limit {
            if !count.warned {
                count.warned = true;
                tracing::warn!(peer = %ip, limit = self.limit, "API connections from one address at the limit: more are closed");
            }
            return None;
        }
        count.open += 1;
        Some(PeerConnection { peers: self.clone(), ip })
    }
}

/// One connection's place among its peer's; given back on drop.
struct PeerConnection {
    peers: Peers,
    ip: IpAddr,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            count.open = count.open.saturating_sub(1);
            count.warned &= count.open >= self.peers.limit;
            if count.open == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One connection, TLS first when the API has it.
async fn connection(stream: TcpStream, peer: SocketAddr, tls: Option<Arc<ApiTls>>, served: Served) {
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) => {
            if let Some(stream) = crate::https::handshake(&tls, stream, peer).await {
                http(stream, peer, served).await;
            }
        }
        None => http(stream, peer, served).await,
    }
}

/// HTTP/1.1 on `io` until the peer closes, the idle limit passes, or the stop comes (then the
/// request being answered is finished first).
async fn http<S>(io: S, peer: SocketAddr, mut served: Served)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(served.router.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(served.idle);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut asked_to_stop = false;
    loop {
        tokio::select! {
            done = connection.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "API connection ended");
                }
                return;
            }
            _ = served.stopping.wait_for(|stop| *stop), if !asked_to_stop => {
                asked_to_stop = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "done"
            }),
        );
        let router = router.route("/", axum::routing::get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(tcp, None, router, limits, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        (addr, stop, server)
    }

    /// A GET on a new connection: the answer's text, or `None` when the connection closed first.
    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.ok()?;
        (!answer.is_empty()).then_some(answer)
    }

    #[tokio::test]
    async fn silent_connections_are_closed_after_the_idle_limit_and_the_next_client_waits_for_a_slot() {
        let limits = Limits { connections: 3, per_peer: 3, idle: Duration::from_millis(700) };
        let (addr, _stop, _server) = started(limits).await;
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every slot is held: the next request waits (in the backlog) until the idle limit
        // frees one, then is answered.
        let waiting = tokio::spawn(get(addr, "/"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "a fourth connection was served while three held every slot");
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        // The silent ones were closed by the server.
        for mut s in silent {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await.unwrap();
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
    }

    /// A connection to `addr` from the local address `from` (any of 127.0.0.0/8 is this machine).
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_and_others_are_served_meanwhile() {
        let limits = Limits { connections: 8, per_peer: 2, idle: Duration::from_secs(30) };
        let (addr, _stop, _server) = started(limits).await;
        let held = [connect_from([127, 0, 0, 1], addr).await, connect_from([127, 0, 0, 1], addr).await];
        // A third from the same address is closed at once, long before the idle limit.
        let mut third = connect_from([127, 0, 0, 1], addr).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        // Another address is served while the first holds its two.
        let mut other = connect_from([127, 0, 0, 2], addr).await;
        other.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), other.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        // One of the two gone, the address gets its place back.
        drop(held);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = connect_from([127, 0, 0, 1], addr).await;
            again.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            let _ = again.read_to_string(&mut answer).await;
            if answer.ends_with("hello") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the address never got its places back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_long_answer_outlives_the_idle_limit_and_the_stop_waits_for_it() {
        let limits = Limits { connections: 8, per_peer: 8, idle: Duration::from_millis(300) };
        let (addr, stop, server) = started(limits).await;
        let slow = tokio::spawn(get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(()).unwrap();
        // Stopped: no new connection is taken, and the one being answered is finished.
        let answer = slow.await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed once serve returns");
    }
}
