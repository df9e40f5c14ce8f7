//! The tunnel client against OpenSSH's sshd, started by the test as an ordinary process with
//! throwaway host and client keys: a port range, a single forward and a reverse forward carry
//! data intact (20 parallel connections through one port, spread over three SSH connections), a
//! dropped connection is re-made and
//! forwards work again, a wrong host key is refused and said so, and an identity file others can
//! read is refused as OpenSSH's ssh refuses it.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

use tunnel::spec::{LocalForward, ReverseForward};
use tunnel::{ClientConfig, HostKeyPolicy, Tunnel};

/// Keys in `d`, OpenSSH's sshd on a free port trusting them, and a known_hosts file pinning its
/// host key: (client identity, host public key, sshd port, sshd, known_hosts).
fn openssh(d: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, u16, Sshd, std::path::PathBuf) {
    let (identity, host_pub) = setup(d);
    let ssh_port = free_port();
    let sshd = Sshd::start(d, ssh_port);
    let kh = known_hosts(d, ssh_port, &host_pub);
    (identity, host_pub, ssh_port, sshd, kh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_through_openssh_carry_data_and_survive_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, _host_pub, ssh_port, mut sshd, kh) = openssh(d);

    let echo = echo_servers(3);
    let local_base = free_ports(3);
    let reverse_port = free_port();
    let reverse_target = echo_servers(1);
    let mut config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.forwards = (0..3).map(|i| LocalForward::new(local(local_base + i), "127.0.0.1", echo + i)).collect();
    config.reverse = vec![ReverseForward::new("127.0.0.1", reverse_port, local(reverse_target))];
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(500);
    // Three SSH connections: forwarded connections are spread over them, the reverse rides on one.
    config.connections = 3;
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "status: {:?}", tunnel.status());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel.status().connections_up < 3 {
        assert!(Instant::now() < deadline, "not all three connections came up: {:?}", tunnel.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let checks = tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            round_trip(local(local_base + i), 1 << 20, i as u8);
        }
        // 20 parallel connections through one forwarded port.
        let threads: Vec<_> =
            (0..20u8).map(|i| std::thread::spawn(move || round_trip(local(local_base), 256 << 10, i))).collect();
        for t in threads {
            t.join().unwrap();
        }
        // Reverse: sshd listens on reverse_port and the tunnel carries it back to our echo.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(local(reverse_port)).is_err() {
            assert!(Instant::now() < deadline, "reverse forward never appeared on the hub side");
            std::thread::sleep(Duration::from_millis(20));
        }
        round_trip(local(reverse_port), 512 << 10, 9);
    });
    checks.await.unwrap();
    let status = tunnel.status();
    assert!(status.bytes_to_hub >= (3 << 20) + (5 << 20), "{status:?}");
    assert_eq!(status.reconnects, 0);

    // Drop the SSH connection: the tunnel reconnects and forwards work again.
    sshd.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    while tunnel.status().connected_since.is_some() {
        assert!(Instant::now() < deadline, "the dropped connection was not noticed: {:?}", tunnel.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sshd = Sshd::start(d, ssh_port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while tunnel.status().reconnects < 1 {
        assert!(Instant::now() < deadline, "no reconnect: {:?}", tunnel.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Right away, while the other two SSH connections may still be dead or in their backoff:
    // every forwarded connection must find one that is up, in turn over all three.
    tokio::task::spawn_blocking(move || {
        for i in 0..6 {
            round_trip(local(local_base + i % 3), 64 << 10, 40 + i as u8);
        }
        round_trip(local(local_base + 1), 1 << 20, 42);
    })
    .await
    .unwrap();
    sshd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_key_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, _) = setup(d);
    keygen(&d.join("other_key"));
    let ssh_port = free_port();
    let _sshd = Sshd::start(d, ssh_port);
    let kh = known_hosts(d, ssh_port, &d.join("other_key.pub"));
    let listen = free_port();
    let mut config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.forwards = vec![LocalForward::new(local(listen), "127.0.0.1", 9)];
    config.connect_wait = Duration::from_millis(300);
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(!tunnel.wait_connected(Duration::from_secs(2)).await);
    let status = tunnel.status();
    assert_eq!(status.state, tunnel::State::Refused, "a host key mismatch is no transient failure: {status:?}");
    let err = status.last_error.unwrap_or_default();
    assert!(
        err.contains("host key mismatch")
            && err.contains(&format!("127.0.0.1:{ssh_port}"))
            && err.matches("SHA256:").count() == 2,
        "{err}"
    );
    // A local connection meanwhile is closed cleanly, not left hanging.
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(local(listen)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        matches!(s.read(&mut b), Ok(0) | Err(_))
    });
    assert!(closed.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_others_can_read_is_refused_as_openssh_refuses_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, _host_pub, ssh_port, _sshd, kh) = openssh(d);
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ssh = std::process::Command::new(require("ssh"))
        .arg("-i")
        .arg(&identity)
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-p", &ssh_port.to_string(), "root@127.0.0.1", "true"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&ssh.stderr);
    assert!(!ssh.status.success() && said.contains("UNPROTECTED PRIVATE KEY FILE"), "OpenSSH's ssh: {said}");
    let config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh.clone()));
    let err = Tunnel::start(config.clone()).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("permissions 0644") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fixed = Tunnel::start(config).await.unwrap();
    assert!(fixed.wait_connected(Duration::from_secs(10)).await, "{:?}", fixed.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_known_hosts_and_pinned_fingerprints_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub, ssh_port, _sshd, kh) = openssh(d);
    let out = std::process::Command::new(require("ssh-keygen")).args(["-H", "-f"]).arg(&kh).output().unwrap();
    assert!(out.status.success());
    assert!(std::fs::read_to_string(&kh).unwrap().starts_with("|1|"), "entry is hashed");
    let hashed =
        Tunnel::start(ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh)))
            .await
            .unwrap();
    assert!(hashed.wait_connected(Duration::from_secs(10)).await, "{:?}", hashed.status());
    let out = std::process::Command::new(require("ssh-keygen")).arg("-lf").arg(&host_pub).output().unwrap();
    let fp = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string();
    assert!(fp.starts_with("SHA256:"));
    let pinned =
        Tunnel::start(ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::Fingerprint(fp)))
            .await
            .unwrap();
    assert!(pinned.wait_connected(Duration::from_secs(10)).await, "{:?}", pinned.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_marked_revoked_is_refused_even_when_also_listed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub, ssh_port, _sshd, kh) = openssh(d);
    let key = std::fs::read_to_string(&host_pub).unwrap();
    let mut fields = key.split_whitespace();
    let revoked = format!("@revoked * {} {}\n", fields.next().unwrap(), fields.next().unwrap());
    let listed = std::fs::read_to_string(&kh).unwrap();
    std::fs::write(&kh, format!("{listed}{revoked}")).unwrap();
    let mut config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.connect_wait = Duration::from_millis(300);
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(!tunnel.wait_connected(Duration::from_secs(2)).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let err = tunnel.status().last_error.unwrap_or_default();
        if err.contains("@revoked") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not refused as revoked: {err}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_forwarded_connections_and_the_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, _host_pub, ssh_port, _sshd, kh) = openssh(d);
    let echo = echo_servers(1);
    let listen = free_port();
    let mut config = ClientConfig::new("127.0.0.1", ssh_port, "root", &identity, HostKeyPolicy::KnownHosts(kh));
    config.forwards = vec![LocalForward::new(local(listen), "127.0.0.1", echo)];
    let tunnel = Tunnel::start(config).await.unwrap();
    assert!(tunnel.wait_connected(Duration::from_secs(10)).await, "{:?}", tunnel.status());
    // A forwarded connection that stays open (an echo round trip proves it is through).
    let open = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = TcpStream::connect(local(listen)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        s
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel.status().open_channels == 0 {
        assert!(Instant::now() < deadline, "{:?}", tunnel.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tunnel.shutdown().await;
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = open;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        matches!(s.read(&mut b), Ok(0) | Err(_))
    });
    assert!(closed.await.unwrap(), "the forwarded connection was closed by shutdown");
    assert!(TcpStream::connect(local(listen)).is_err(), "the listener is gone");
}
