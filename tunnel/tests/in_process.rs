//! Channels opened in process, at both ends: our client's [`tunnel::TunnelDialer`] through
//! OpenSSH's sshd and through our endpoint, and our endpoint handing allowed channels to a
//! [`LocalForward`] — data intact both ways, counted, refused where a forward would be, the
//! channel limit given back when an in-process channel ends, and no channel once the tunnel
//! stops.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunnel::endpoint::{EndpointConfig, LocalForward, LocalServe, PortSet};
use tunnel::{ClientConfig, HostKeyPolicy, Tunnel, TunnelError};

/// Send `len` bytes through `stream`, half-close, and check the echo comes back whole.
async fn echo_round_trip<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert!(back == data, "the echo came back different ({} of {} bytes)", back.len(), data.len());
}

/// The same, with every other piece handed to the channel as owned bytes
/// ([`tunnel::dial::ChannelSender`]) between pieces written to the stream, and the echo taken
/// back alternately as the channel's own pieces ([`tunnel::TunnelReader::poll_receive`]) and
/// through the stream: it must come back whole and in order.
async fn echo_round_trip_mixed(stream: tunnel::TunnelStream, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let sender = stream.sender();
    let (mut r, mut w) = stream.into_split();
    let sent = bytes::Bytes::from(data.clone());
    let writer = tokio::spawn(async move {
        for (i, at) in (0..sent.len()).step_by(100_003).enumerate() {
            let piece = sent.slice(at..(at + 100_003).min(sent.len()));
            if i % 2 == 0 {
                w.write_all(&piece).await.unwrap();
            } else {
                sender.send(piece).await.unwrap();
            }
        }
        w.shutdown().await.unwrap();
    });
    let read_back = async {
        let mut back = Vec::new();
        for turn in 0usize.. {
            if turn % 2 == 0 {
                let piece = std::future::poll_fn(|cx| r.poll_receive(cx, 70_001)).await.unwrap();
                assert!(piece.len() <= 70_001, "more than asked for: {}", piece.len());
                if piece.is_empty() {
                    break;
                }
                back.extend_from_slice(&piece);
            } else {
                let mut buf = vec![0u8; 50_000];
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
            }
        }
        back
    };
    let back = tokio::time::timeout(Duration::from_secs(20), read_back).await.unwrap();
    writer.await.unwrap();
    assert!(back == data, "the mixed echo came back different ({} of {} bytes)", back.len(), data.len());
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_opened_in_process_carry_data_through_openssh_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub) = setup(d);
    let ssh_port = free_port();
    let _sshd = Sshd::start(d, ssh_port);
    let kh = known_hosts(d, ssh_port, &host_pub);
    let echo = echo_servers(1);
    // No local forward at all: the dialer needs none.
    let mut config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.connections = 2;
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
    let dialer = tunnel.dialer();

    let mut streams = Vec::new();
    for i in 0..6u8 {
        streams.push((dialer.open("127.0.0.1", echo).await.unwrap(), i));
    }
    assert_eq!(tunnel.status().open_channels, 6, "an in-process channel counts as an open channel");
    let runs: Vec<_> = streams
        .into_iter()
        .map(|(s, i)| {
            let len = (1 << 20) + usize::from(i) * 4099;
            if i % 2 == 0 {
                tokio::spawn(echo_round_trip(s, len, i))
            } else {
                tokio::spawn(echo_round_trip_mixed(s, len, i))
            }
        })
        .collect();
    for r in runs {
        r.await.unwrap();
    }
    let status = tunnel.status();
    let sent: u64 = (0..6u64).map(|i| (1 << 20) + i * 4099).sum();
    assert_eq!((status.bytes_to_hub, status.bytes_from_hub), (sent, sent), "{status:?}");
    wait_for("channels still counted as open after they ended", || tunnel.status().open_channels == 0).await;

    // sshd cannot reach a closed port: the open fails, named, and nothing stays open.
    let closed = free_port();
    match dialer.open("127.0.0.1", closed).await {
        Err(TunnelError::ChannelRefused { target, .. }) => assert_eq!(target, format!("127.0.0.1:{closed}")),
        other => panic!("a channel to a closed port: {other:?}"),
    }
    assert_eq!(tunnel.status().open_channels, 0);

    // A stopped tunnel opens nothing, and a stream still open fails rather than hanging.
    let held = dialer.open("127.0.0.1", echo).await.unwrap();
    let sender = held.sender();
    let reader = tokio::spawn(async move {
        let (mut r, _w) = tokio::io::split(held);
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await
    });
    tunnel.shutdown().await;
    let read = reader.await.unwrap().expect("a read that hangs once the tunnel stopped");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let sent = tokio::time::timeout(Duration::from_secs(10), sender.send(bytes::Bytes::from_static(b"late")))
        .await
        .expect("a send that hangs once the tunnel stopped");
    assert!(sent.is_err(), "a send on a stopped tunnel must fail");
    assert!(matches!(dialer.open("127.0.0.1", echo).await, Err(TunnelError::NotUp { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_waits_for_the_tunnel_as_long_as_a_forward_would_then_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub) = setup(d);
    let nobody = free_port();
    let kh = known_hosts(d, nobody, &host_pub);
    let config = ClientConfig::new("127.0.0.1", nobody, "root", &identity, HostKeyPolicy::KnownHosts(kh))
        .connect_wait(Duration::from_millis(300));
    let tunnel = Tunnel::start(config).await.unwrap();
    let started = Instant::now();
    match tunnel.dialer().open("127.0.0.1", 22).await {
        Err(TunnelError::NotUp { waited }) => assert_eq!(waited, Duration::from_millis(300)),
        other => panic!("no hub, yet: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300), "it gave up before the wait");
}

/// Serves `port` in process as an echo, counting the channels it was handed.
struct InProcessEcho {
    port: u16,
    served: Arc<AtomicUsize>,
}

impl LocalForward for InProcessEcho {
    fn serve(&self, port: u16) -> Option<LocalServe> {
        if port != self.port {
            return None;
        }
        self.served.fetch_add(1, Ordering::SeqCst);
        Some(Box::new(|stream| {
            Box::pin(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            })
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_endpoint_serves_allowed_channels_in_process_and_gives_their_slots_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub) = setup(d);
    // `inside` is served in process (nothing listens there); `tcp` is an ordinary echo server
    // behind the next port; `outside` is not in the allow list.
    let tcp = echo_servers(2);
    let inside = tcp + 1;
    let outside = free_port();
    let served = Arc::new(AtomicUsize::new(0));
    let host_key = russh::keys::load_secret_key(d.join("host_key"), None).unwrap();
    let authorized = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let config = EndpointConfig::new(host_key, tunnel::authorized::parse(&authorized).unwrap())
        .allow_direct(PortSet(vec![(tcp, inside)]))
        .max_channels_per_connection(2)
        .local(Some(Arc::new(InProcessEcho { port: inside, served: Arc::clone(&served) })));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_port = listener.local_addr().unwrap().port();
    let hub = tokio::spawn(tunnel::endpoint::serve(listener, config));
    let kh = known_hosts(d, hub_port, &host_pub);
    let config =
        ClientConfig::new("127.0.0.1", hub_port, "root", &identity, HostKeyPolicy::KnownHosts(kh)).connections(1);
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
    let dialer = tunnel.dialer();

    // In process and over TCP, the same bytes.
    echo_round_trip(dialer.open("127.0.0.1", inside).await.unwrap(), 3 << 20, 1).await;
    echo_round_trip(dialer.open("127.0.0.1", tcp).await.unwrap(), 1 << 20, 2).await;
    assert_eq!(served.load(Ordering::SeqCst), 1, "only the in-process port reached the service");

    // A port outside the allow list is refused before the service is asked.
    assert!(matches!(dialer.open("127.0.0.1", outside).await, Err(TunnelError::ChannelRefused { .. })));
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // Two channels per connection: in-process channels hold their slots while they run...
    let first = dialer.open("127.0.0.1", inside).await.unwrap();
    let second = dialer.open("127.0.0.1", inside).await.unwrap();
    assert!(matches!(dialer.open("127.0.0.1", inside).await, Err(TunnelError::ChannelRefused { .. })));
    // ...and give them back when they end.
    echo_round_trip(first, 4096, 3).await;
    drop(second);
    let again = (open_when_free(&dialer, inside).await, open_when_free(&dialer, inside).await);
    echo_round_trip(again.0, 64 << 10, 4).await;
    echo_round_trip(again.1, 64 << 10, 5).await;
    hub.abort();
}

/// A channel to `port` once the connection has a free slot (an ended channel gives its slot back
/// when the endpoint's task for it finishes, a moment after the client saw it end).
async fn open_when_free(dialer: &tunnel::TunnelDialer, port: u16) -> tunnel::TunnelStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match dialer.open("127.0.0.1", port).await {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "the slots of ended channels never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
