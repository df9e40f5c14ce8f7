//! The hub endpoint against OpenSSH's `ssh` client (and ours): allowed forwards work both ways;
//! a forward outside the allow list, a command, a reverse port not allowed, a key used from a
//! wrong address and an unknown key are all refused; a reconnecting key takes its reverse port
//! over from its own stale session, and no other key can.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tunnel::endpoint::{EndpointConfig, LoginLimits, PortSet};
use tunnel::spec::LocalForward;
use tunnel::{ClientConfig, HostKeyPolicy, Tunnel};

struct Hub {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_hub(dir: &Path, authorized: &str, direct: (u16, u16), reverse: u16) -> Hub {
    start_hub_with(dir, authorized, direct, reverse, Default::default()).await
}

async fn start_hub_with(
    dir: &Path,
    authorized: &str,
    direct: (u16, u16),
    reverse: u16,
    login: tunnel::endpoint::LoginLimits,
) -> Hub {
    let host_key = russh::keys::load_secret_key(dir.join("host_key"), None).unwrap();
    let config = EndpointConfig::new(host_key, tunnel::authorized::parse(authorized).unwrap())
        .allow_direct(PortSet(vec![direct]))
        .allow_reverse(PortSet(vec![(reverse, reverse)]))
        .max_connections_per_key(4)
        .max_channels_per_connection(64)
        .login(login);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    Hub { port, task: tokio::spawn(tunnel::endpoint::serve(listener, config)) }
}

/// `endpoint` serving on a loopback port of its own until the returned [`Hub`] is dropped.
async fn serve_endpoint(endpoint: &Arc<tunnel::endpoint::Endpoint>) -> Hub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Hub { port: listener.local_addr().unwrap().port(), task: tokio::spawn(Arc::clone(endpoint).serve(listener)) }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(local(port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn closed_at_once(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(local(port)) else { return true };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = std::io::Write::write_all(&mut s, b"ping");
    let mut b = [0u8; 4];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_gets_exactly_the_allowed_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (_, host_pub) = setup(&d);
    keygen(&d.join("stranger_key"));
    let echo = echo_servers(2); // echo and echo+1; only echo is allowed
    let reverse_ok = free_port();
    let authorized = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let hub = start_hub(&d, &authorized, (echo, echo), reverse_ok).await;
    known_hosts(&d, hub.port, &host_pub);
    let hub_port = hub.port;

    tokio::task::spawn_blocking(move || {
        let (l_ok, l_denied) = (free_port(), free_port());
        let mut forward = ssh(
            &d,
            hub_port,
            "client_key",
            &[
                "-N",
                "-L",
                &format!("{l_ok}:127.0.0.1:{echo}"),
                "-L",
                &format!("{l_denied}:127.0.0.1:{}", echo + 1),
                "-R",
                &format!("{reverse_ok}:127.0.0.1:{echo}"),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        wait_listening(l_ok);
        round_trip(local(l_ok), 1 << 20, 1);
        assert!(closed_at_once(l_denied), "a forward outside the allow list must be refused");
        wait_listening(reverse_ok);
        round_trip(local(reverse_ok), 256 << 10, 2);
        let _ = forward.kill();
        let _ = forward.wait();

        // A reverse port not allowed: ssh reports it and (ExitOnForwardFailure) exits.
        let bad = free_port();
        let out = ssh(&d, hub_port, "client_key", &["-N", "-R", &format!("{bad}:127.0.0.1:{echo}")]).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // A command is refused.
        let out = ssh(&d, hub_port, "client_key", &[]).arg("echo hi").output().unwrap();
        assert!(!out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).contains("hi"));

        // An unknown key is refused.
        let out = ssh(&d, hub_port, "stranger_key", &["-N"]).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_and_permitopen_restrict_a_key_and_our_client_works_through_our_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (identity, host_pub) = setup(&d);
    let echo = echo_servers(2);
    let key = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    // permitopen narrows the allowed range (echo..echo+1) to echo alone.
    let authorized = format!("from=\"127.0.0.*\",permitopen=\"127.0.0.1:{echo}\" {key}");
    let hub = start_hub(&d, &authorized, (echo, echo + 1), free_port()).await;
    let kh = known_hosts(&d, hub.port, &host_pub);
    let (a, b) = (free_port(), free_port());
    let mut config = ClientConfig::new("127.0.0.1", hub.port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.forwards =
        vec![LocalForward::new(local(a), "127.0.0.1", echo), LocalForward::new(local(b), "127.0.0.1", echo + 1)];
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
    tokio::task::spawn_blocking(move || {
        let threads: Vec<_> =
            (0..8u8).map(|i| std::thread::spawn(move || round_trip(local(a), 128 << 10, i))).collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(closed_at_once(b), "permitopen must refuse echo+1");
    })
    .await
    .unwrap();
    let err = tunnel.status().last_error.unwrap_or_default();
    assert!(err.contains("refused forward"), "the refusal is reported by name: {err}");

    // The same key from an address outside from= is refused (the hub sees 127.0.0.1 here, so
    // use a pattern that excludes it).
    let hub2 = start_hub(&d, &format!("from=\"10.*\" {key}"), (echo, echo), free_port()).await;
    let kh2 = known_hosts(&d, hub2.port, &host_pub);
    let config = ClientConfig::new("127.0.0.1", hub2.port, "root", &identity, HostKeyPolicy::KnownHosts(kh2));
    let refused = Tunnel::start(config).await.unwrap();
    assert!(!refused.wait_connected(Duration::from_secs(2)).await);
    assert!(refused.status().last_error.unwrap_or_default().contains("refused the key"), "{:?}", refused.status());
}

/// Connect to `port` and read the first bytes an echo-less server sends: here, the reverse
/// target writes its own tag, so the bytes say which client's forward answered.
fn tag_through(port: u16) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(local(port)) else { return Vec::new() };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; 3];
    match s.read_exact(&mut b) {
        Ok(()) => b,
        Err(_) => Vec::new(),
    }
}

/// A server that greets every connection with `tag`.
fn tag_server(tag: &'static [u8]) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, tag);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_key_takes_its_reverse_port_over_from_its_stale_session_and_no_other_key_can() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (_, host_pub) = setup(&d);
    keygen(&d.join("other_key"));
    let reverse = free_port();
    let authorized = format!(
        "{}\n{}",
        std::fs::read_to_string(d.join("client_key.pub")).unwrap(),
        std::fs::read_to_string(d.join("other_key.pub")).unwrap()
    );
    let hub = start_hub(&d, &authorized, (1, 1), reverse).await;
    known_hosts(&d, hub.port, &host_pub);
    let hub_port = hub.port;
    let (old_target, new_target, other_target) = (tag_server(b"old"), tag_server(b"new"), tag_server(b"oth"));
    tokio::task::spawn_blocking(move || {
        let mut old = ssh(&d, hub_port, "client_key", &["-N", "-R", &format!("{reverse}:127.0.0.1:{old_target}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(reverse);
        assert_eq!(tag_through(reverse), b"old");
        // The old client freezes: its TCP connection stays open, the hub cannot know it is dead.
        let _ = Command::new("kill").args(["-STOP", &old.id().to_string()]).status();

        // Another key may not take the port.
        let out = ssh(&d, hub_port, "other_key", &["-N", "-R", &format!("{reverse}:127.0.0.1:{other_target}")])
            .output()
            .unwrap();
        assert!(!out.status.success(), "another key took the reverse port");

        // The same key, reconnecting, gets it at once.
        let mut new = ssh(&d, hub_port, "client_key", &["-N", "-R", &format!("{reverse}:127.0.0.1:{new_target}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tag_through(reverse) != b"new" {
            assert!(new.try_wait().unwrap().is_none(), "the reconnecting client was refused");
            assert!(Instant::now() < deadline, "the stale session kept the port");
            std::thread::sleep(Duration::from_millis(50));
        }
        for c in [&mut old, &mut new] {
            let _ = c.kill();
            let _ = c.wait();
        }
    })
    .await
    .unwrap();
}

/// Everything the endpoint sends on a connection the client keeps silent, and whether the
/// endpoint closed it (rather than the 20 s read timeout ending the wait).
fn silent_connection(port: u16) -> (std::net::TcpStream, std::thread::JoinHandle<(Vec<u8>, bool)>) {
    let s = TcpStream::connect(local(port)).unwrap();
    let mut r = s.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let closed = r.read_to_end(&mut all).is_ok();
        (all, closed)
    });
    (s, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_log_in_are_bounded_and_closed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (identity, host_pub) = setup(&d);
    let authorized = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let login = LoginLimits::default().deadline(Duration::from_secs(1)).max_pending(16).max_pending_per_address(2);
    let hub = start_hub_with(&d, &authorized, (1, 1), free_port(), login).await;
    let kh = known_hosts(&d, hub.port, &host_pub);
    let port = hub.port;
    let (first, third) = tokio::task::spawn_blocking(move || {
        let a = silent_connection(port);
        let b = silent_connection(port);
        std::thread::sleep(Duration::from_millis(200));
        let c = silent_connection(port);
        let third = c.1.join().unwrap();
        let first = a.1.join().unwrap();
        let _ = b.1.join().unwrap();
        (first, third)
    })
    .await
    .unwrap();
    assert!(third.0.is_empty() && third.1, "a third silent connection from one address is refused at once");
    assert!(first.0.starts_with(b"SSH-2.0-") && first.1, "the first got the banner, then was closed: {first:?}");
    // Once they are gone, a real client logs in as usual.
    let config = ClientConfig::new("127.0.0.1", port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
}

/// A silent connection to `port` from `source` (another loopback address): what the endpoint
/// sends first (its banner, or nothing when it refuses the connection at once).
async fn first_from(source: [u8; 4], port: u16) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let mut s = socket.connect(local(port)).await.unwrap();
    let mut first = vec![0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut first)).await.unwrap().unwrap_or(0);
    first.truncate(n);
    (s, first)
}

/// Four silent connections from 127.0.0.2 (each given a place before login: the banner) hold
/// every place of an endpoint that has four, checked by a fifth from 127.0.0.3 refused at once.
async fn hold_every_place_before_login(port: u16) -> Vec<tokio::net::TcpStream> {
    let mut flood = Vec::new();
    for _ in 0..4 {
        let (s, said) = first_from([127, 0, 0, 2], port).await;
        assert!(said.starts_with(b"SSH-2.0-"), "a place before login: {said:?}");
        flood.push(s);
    }
    let (_, said) = first_from([127, 0, 0, 3], port).await;
    assert!(said.is_empty(), "every place taken: a new address is refused at once, got {said:?}");
    flood
}

/// Silent connections from other addresses fill every place before login: a new address is
/// refused at once, but an address a key has logged in from before still gets in (the places
/// kept for known addresses) and logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_does_not_lock_out_an_address_that_logged_in_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (identity, host_pub) = setup(&d);
    let authorized = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let login = LoginLimits::default()
        .deadline(Duration::from_secs(20))
        .max_pending(4)
        .max_pending_per_address(4)
        .reserved_for_known(2);
    let hub = start_hub_with(&d, &authorized, (1, 1), free_port(), login).await;
    let kh = known_hosts(&d, hub.port, &host_pub);
    let config = || {
        // One SSH connection: a second one still logging in at the shutdown below would hold a
        // place before login for a moment.
        let mut c = ClientConfig::new("127.0.0.1", hub.port, "root", &identity, HostKeyPolicy::KnownHosts(kh.clone()));
        c.connections = 1;
        c
    };
    // 127.0.0.1 logs in once: known from then on.
    let first = Tunnel::start(config()).await.unwrap();
    assert!(first.wait_connected(Duration::from_secs(10)).await, "{:?}", first.status());
    first.shutdown().await;

    let flood = hold_every_place_before_login(hub.port).await;
    let again = Tunnel::start(config()).await.unwrap();
    assert!(
        again.wait_connected(Duration::from_secs(10)).await,
        "the known address is locked out: {:?}",
        again.status()
    );
    drop(flood);
}

/// An endpoint told the addresses keys logged in from before it started (what its embedder kept
/// across a restart) keeps places before login for them at once: under the same flood, the
/// address remembered logs in, and it is told back first once it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_remembered_across_a_restart_keep_their_places_before_login() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (identity, host_pub) = setup(&d);
    let host_key = russh::keys::load_secret_key(d.join("host_key"), None).unwrap();
    let authorized = tunnel::authorized::parse(&std::fs::read_to_string(d.join("client_key.pub")).unwrap()).unwrap();
    let login = LoginLimits::default()
        .deadline(Duration::from_secs(20))
        .max_pending(4)
        .max_pending_per_address(4)
        .reserved_for_known(2);
    let endpoint = tunnel::endpoint::Endpoint::new(
        EndpointConfig::new(host_key, authorized).allow_direct(PortSet(vec![(1, 1)])).login(login),
    );
    assert!(endpoint.known_addresses().is_empty());
    let mapped: std::net::IpAddr = "::ffff:127.0.0.9".parse().unwrap();
    endpoint.remember_addresses(vec![std::net::IpAddr::from([127, 0, 0, 1]), mapped]);
    let hub = serve_endpoint(&endpoint).await;
    let kh = known_hosts(&d, hub.port, &host_pub);

    let flood = hold_every_place_before_login(hub.port).await;
    let mut config = ClientConfig::new("127.0.0.1", hub.port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.connections = 1;
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "the remembered address is locked out");
    tunnel.shutdown().await;
    drop(flood);
    let known = endpoint.known_addresses();
    assert_eq!(known.first(), Some(&std::net::IpAddr::from([127, 0, 0, 1])), "{known:?}");
    assert!(known.contains(&std::net::IpAddr::from([127, 0, 0, 9])) && known.len() == 2, "{known:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_channels_count_against_the_connections_channel_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (_, host_pub) = setup(&d);
    let reverse = free_port();
    let host_key = russh::keys::load_secret_key(d.join("host_key"), None).unwrap();
    let authorized = tunnel::authorized::parse(&std::fs::read_to_string(d.join("client_key.pub")).unwrap()).unwrap();
    let config = EndpointConfig::new(host_key, authorized)
        .allow_direct(PortSet(vec![(1, 1)]))
        .allow_reverse(PortSet(vec![(reverse, reverse)]))
        .max_connections_per_key(4)
        .max_channels_per_connection(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub = Hub {
        port: listener.local_addr().unwrap().port(),
        task: tokio::spawn(tunnel::endpoint::serve(listener, config)),
    };
    known_hosts(&d, hub.port, &host_pub);
    let hub_port = hub.port;
    // A target that greets and keeps each connection open until its client closes it.
    let target = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = std::io::Write::write_all(&mut s, b"abc");
                    let _ = std::io::copy(&mut s, &mut std::io::sink());
                });
            }
        });
        port
    };
    tokio::task::spawn_blocking(move || {
        let mut client = ssh(&d, hub_port, "client_key", &["-N", "-R", &format!("{reverse}:127.0.0.1:{target}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(reverse);
        let open = |port| {
            let mut s = TcpStream::connect(local(port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 3];
            let through = s.read_exact(&mut b).is_ok() && &b == b"abc";
            (s, through)
        };
        // wait_listening's probe may still hold a channel for a moment: retry until two are up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (first, second) = loop {
            let (a, ok_a) = open(reverse);
            let (b, ok_b) = open(reverse);
            if ok_a && ok_b {
                break (a, b);
            }
            assert!(Instant::now() < deadline, "two reverse channels never came up together");
            std::thread::sleep(Duration::from_millis(50));
        };
        let (_third, through) = open(reverse);
        assert!(!through, "a third reverse channel got past a limit of 2");
        // Give one back: a new one gets through again.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !open(reverse).1 {
            assert!(Instant::now() < deadline, "the released channel was never counted back");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(second);
        let _ = client.kill();
        let _ = client.wait();
    })
    .await
    .unwrap();
}

/// A server that reads every connection to its end, then answers with the byte count and a
/// digest of what it read, and closes: it can only answer once the client's half-close arrived.
fn counting_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut all = Vec::new();
                if s.read_to_end(&mut all).is_ok() {
                    let digest = all.iter().fold(0u64, |h, &b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
                    let _ = std::io::Write::write_all(&mut s, format!("{} {digest}", all.len()).as_bytes());
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_forward_still_carries_the_answer_back_through_our_client_and_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (identity, host_pub) = setup(&d);
    let target = counting_server();
    let key = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
    let hub = start_hub(&d, &key, (target, target), free_port()).await;
    let kh = known_hosts(&d, hub.port, &host_pub);
    let a = free_port();
    let mut config = ClientConfig::new("127.0.0.1", hub.port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.forwards = vec![LocalForward::new(local(a), "127.0.0.1", target)];
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
    tokio::task::spawn_blocking(move || {
        for (i, len) in [0usize, 1, 65_535, 65_536, 3 << 20].into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(7).wrapping_add(i as u8)).collect();
            let mut s = TcpStream::connect(local(a)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            std::io::Write::write_all(&mut s, &data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            let digest = data.iter().fold(0u64, |h, &b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
            assert_eq!(answer, format!("{len} {digest}"), "{len} bytes, then a half-close");
        }
    })
    .await
    .unwrap();
}

/// Keys replaced while the endpoint serves ([`tunnel::endpoint::Endpoint::authorize`]): OpenSSH
/// clients of two keys forward through it; the first key revoked, its `ssh` is disconnected at
/// once (it exits) and cannot log in again, while the other's forward goes on untouched; the key
/// authorized again logs in again; the same keys given again cut nothing, the key's options
/// changed cut its session, which logs in again under them; so does a key the service says it
/// grants something else now (`reauthorize`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_cut_off_at_once_and_refused_while_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (_, host_pub) = setup(&d);
    keygen(&d.join("other_key"));
    let echo = echo_servers(1);
    let line = |name: &str| std::fs::read_to_string(d.join(format!("{name}.pub"))).unwrap();
    let both = tunnel::authorized::parse(&format!("{}{}", line("client_key"), line("other_key"))).unwrap();
    let host_key = russh::keys::load_secret_key(d.join("host_key"), None).unwrap();
    let config = EndpointConfig::new(host_key, both.clone()).allow_direct(PortSet(vec![(echo, echo)]));
    let endpoint = tunnel::endpoint::Endpoint::new(config);
    let hub = serve_endpoint(&endpoint).await;
    known_hosts(&d, hub.port, &host_pub);
    let hub_port = hub.port;

    let (revoked_port, other_port) = (free_port(), free_port());
    let forward = |key: &str, port: u16| {
        ssh(&d, hub_port, key, &["-N", "-L", &format!("{port}:127.0.0.1:{echo}")])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut revoked, mut other) = (forward("client_key", revoked_port), forward("other_key", other_port));
    let (a, b) = (revoked_port, other_port);
    tokio::task::spawn_blocking(move || {
        wait_listening(a);
        wait_listening(b);
        round_trip(local(a), 64 << 10, 1);
        round_trip(local(b), 64 << 10, 2);
    })
    .await
    .unwrap();
    // The endpoint tells its sessions: each key's, from loopback, oldest first.
    let sessions = endpoint.sessions();
    let keys: Vec<_> = sessions.iter().map(|s| s.key.key.clone()).collect();
    assert!(keys.len() == 2 && both.iter().all(|k| keys.contains(&k.key)), "{sessions:?}");
    assert!(sessions.iter().all(|s| s.peer.ip().is_loopback()), "{sessions:?}");
    assert!(sessions.windows(2).all(|w| w[0].since <= w[1].since), "{sessions:?}");

    let only_other: Vec<_> = both.iter().filter(|k| k.key == both[1].key).cloned().collect();
    assert_eq!(endpoint.authorize(only_other), 1, "one session of the revoked key cut");
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = revoked.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the revoked key's ssh is still connected");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success());
        let mut said = String::new();
        revoked.stderr.take().unwrap().read_to_string(&mut said).unwrap();
        assert!(said.contains("key no longer authorized"), "{said}");
        // The other key's forward goes on; the revoked key cannot log in again.
        round_trip(local(b), 64 << 10, 3);
        let out = ssh(&d2, hub_port, "client_key", &["-N"]).output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
        assert!(other.try_wait().unwrap().is_none(), "the other key's ssh was cut too");
        let _ = other.kill();
        let _ = other.wait();
    })
    .await
    .unwrap();
    // Sessions cut or gone are no longer told.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !endpoint.sessions().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", endpoint.sessions());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Authorized again: it logs in and forwards; the same keys again (lines in another order)
    // cut nothing.
    assert_eq!(endpoint.authorize(both.clone()), 0);
    let mut again = forward("client_key", revoked_port);
    tokio::task::spawn_blocking(move || {
        wait_listening(a);
        round_trip(local(a), 64 << 10, 4);
    })
    .await
    .unwrap();
    assert_eq!(endpoint.authorize(both.iter().rev().cloned().collect()), 0);
    // Its options changed (a `from=` added): the session is cut and logs in again under them.
    let narrowed = format!("from=\"127.0.0.*\" {}{}", line("client_key"), line("other_key"));
    assert_eq!(endpoint.authorize(tunnel::authorized::parse(&narrowed).unwrap()), 1);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while again.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the session of the changed grant is still connected");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let mut under_new = forward("client_key", revoked_port);
    tokio::task::spawn_blocking(move || {
        wait_listening(a);
        round_trip(local(a), 64 << 10, 5);
    })
    .await
    .unwrap();
    // The same keys, but what the service grants one of them changed (`reauthorize`: the hub's
    // node of a key, say): that key's session is cut, told why, and may log in again.
    let narrowed = tunnel::authorized::parse(&narrowed).unwrap();
    let client_key = narrowed[0].key.clone();
    assert_eq!(endpoint.reauthorize(narrowed.clone(), |k| k.key == client_key), 1);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while under_new.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the session of the regranted key is still connected");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut said = String::new();
        under_new.stderr.take().unwrap().read_to_string(&mut said).unwrap();
        assert!(said.contains("key's grant changed"), "{said}");
    })
    .await
    .unwrap();
    assert_eq!(endpoint.reauthorize(narrowed, |_| false), 0, "nothing left to cut");
    let mut last = forward("client_key", revoked_port);
    tokio::task::spawn_blocking(move || {
        wait_listening(a);
        round_trip(local(a), 64 << 10, 6);
        let _ = last.kill();
        let _ = last.wait();
    })
    .await
    .unwrap();
}

/// `ssh-keygen -lf` of `path`: the fingerprint OpenSSH gives the key (`SHA256:...`).
fn openssh_fingerprint(path: &Path) -> String {
    let out = Command::new(require("ssh-keygen")).arg("-lf").arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

/// What the endpoint refused is told by reason, key and address: OpenSSH's `ssh` with a key the
/// endpoint does not know, one whose `from=` leaves loopback out and one whose `expiry-time=` has
/// passed, each refused, each told with the fingerprint `ssh-keygen -lf` gives it and counted;
/// and `ssh` pinning another host key, which gives up before it logs in, told as a connection
/// that ended before its login (no key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_are_told_by_reason_key_and_address() {
    use tunnel::endpoint::Refusal;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (_, host_pub) = setup(&d);
    keygen(&d.join("expired_key"));
    keygen(&d.join("stranger_key"));
    let line = |name: &str| std::fs::read_to_string(d.join(format!("{name}.pub"))).unwrap();
    let authorized = format!("from=\"10.*\" {}expiry-time=\"20200101\" {}", line("client_key"), line("expired_key"));
    let host_key = russh::keys::load_secret_key(d.join("host_key"), None).unwrap();
    let config = EndpointConfig::new(host_key, tunnel::authorized::parse(&authorized).unwrap());
    let endpoint = tunnel::endpoint::Endpoint::new(config);
    let hub = serve_endpoint(&endpoint).await;
    known_hosts(&d, hub.port, &host_pub);
    let (d2, port) = (d.clone(), hub.port);
    tokio::task::spawn_blocking(move || {
        for key in ["client_key", "expired_key", "stranger_key", "stranger_key"] {
            let out = ssh(&d2, port, key, &["-o", "IdentitiesOnly=yes", "-N"]).output().unwrap();
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && said.contains("Permission denied"), "{key}: {said}");
        }
        // The client does not accept this endpoint's host key (it pins another).
        keygen(&d2.join("other_host_key"));
        known_hosts(&d2, port, &d2.join("other_host_key.pub"));
        let out = ssh(&d2, port, "stranger_key", &["-o", "IdentitiesOnly=yes", "-N"]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("Host key verification failed"), "{said}");
    })
    .await
    .unwrap();
    // The last connection's end is seen by its task a moment after the client has gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoint.refused_logins().len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", endpoint.refused_logins());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = endpoint.refused_logins();
    let told: Vec<(Refusal, Option<String>, String, u64)> =
        refused.iter().map(|r| (r.reason, r.fingerprint.clone(), r.peer.to_string(), r.count)).collect();
    let fp = |name: &str| Some(openssh_fingerprint(&d.join(format!("{name}.pub"))));
    // The latest first.
    assert_eq!(
        told,
        [
            (Refusal::EndedBeforeLogin, None, "127.0.0.1".to_string(), 1),
            (Refusal::UnknownKey, fp("stranger_key"), "127.0.0.1".to_string(), 2),
            (Refusal::KeyExpired, fp("expired_key"), "127.0.0.1".to_string(), 1),
            (Refusal::AddressNotAllowed, fp("client_key"), "127.0.0.1".to_string(), 1),
        ],
        "{refused:?}"
    );
    assert!(refused[1].first < refused[1].last, "{refused:?}");
    let totals = endpoint.refusals_total();
    let count = |reason: Refusal| totals.iter().find(|(r, _)| *r == reason).map(|(_, n)| *n);
    assert_eq!(
        Refusal::ALL.map(count),
        [Some(2), Some(1), Some(1), Some(0), Some(0), Some(1)],
        "unknown, expired, address, too many, user, ended"
    );
    assert_eq!(endpoint.host_key_fingerprint(), openssh_fingerprint(&d.join("host_key.pub")));
    assert!(endpoint.sessions().is_empty());
}
