//! `wan` section: NBD through the tunnel across a long round trip, against OpenSSH `ssh -L`
//! across the same one.
//!
//! netem is not in this kernel, so the round trip comes from [`DelayProxy`]: a TCP proxy between
//! the tunnel's two ends that holds every chunk it reads for a fixed one-way delay before writing
//! it on, in both directions, with no limit on the bytes in flight (a long fat pipe, not a slow
//! one). A round trip of R ms is R/2 each way. The case is `nbdcopy --connections=4 --flush` of a
//! random file into `sendense-nbd -f raw`, through `sendense-tunnel connect` -> proxy ->
//! `sendense-tunnel serve`, and the same through `ssh -L` -> proxy -> sshd (OpenSSH's default
//! cipher negotiation on both).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hub::{free_port, wait_port, Proc};
use crate::peers::make_source;
use crate::report::Report;
use crate::tunnel::Keys;

/// A TCP proxy adding a fixed one-way delay in each direction; it runs until dropped.
pub struct DelayProxy {
    pub port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DelayProxy {
    /// Listen on a free port and forward to `127.0.0.1:upstream`, `one_way` late each way.
    pub fn start(upstream: u16, one_way: Duration) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(delayed_pipe(cr, sw, one_way));
                    tokio::spawn(delayed_pipe(sr, cw, one_way));
                });
            }
        });
        Ok(Self { port, runtime: Some(runtime) })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Copy `from` to `to`, each chunk leaving `delay` after it arrived (order kept).
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                if tx.send((tokio::time::Instant::now() + delay, chunk)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// `nbdcopy --connections=4 --flush` of `src` into a fresh raw export reached at `port`.
fn copy_through(src: &Path, port: u16) -> anyhow::Result<f64> {
    let started = Instant::now();
    let ok = Command::new("nbdcopy")
        .args(["--flush", "--connections=4", "--threads=4"])
        .arg(src)
        .arg(format!("nbd://127.0.0.1:{port}/exp"))
        .stderr(Stdio::null())
        .status()?
        .success();
    anyhow::ensure!(ok, "nbdcopy failed");
    Ok(started.elapsed().as_secs_f64())
}

pub fn wan_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let tunnel = sendense.with_file_name("sendense-tunnel");
    anyhow::ensure!(tunnel.exists(), "{} not found; cargo build --release", tunnel.display());
    let keys = Keys::new(&dir.join("wan-keys"))?;
    let src = dir.join("wan-src.raw");
    make_source(&src, mib)?;
    let size = mib << 20;
    let (_sshd, sshd_port) = keys.sshd(
        "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr",
    )?;
    for rep in 0..reps {
        eprintln!("wan: rep {}/{reps}", rep + 1);
        for rtt_ms in [0u64, 10, 20, 50] {
            let one_way = Duration::from_millis(rtt_ms / 2);
            for ours in [true, false] {
                let target = dir.join("wan-dst.raw");
                let _ = std::fs::remove_file(&target);
                std::fs::File::create(&target)?.set_len(size)?;
                let nbd_port = free_port()?;
                let mut nbd = Command::new(sendense)
                    .args(["-f", "raw", "-x", "exp", "-p", &nbd_port.to_string(), "--shared=8", "-t"])
                    .arg(&target)
                    .stderr(Stdio::null())
                    .spawn()?;
                wait_port(nbd_port, &mut nbd)?;
                let _nbd = Proc(nbd);
                let local = free_port()?;
                let (_guards, _proxy) = if ours {
                    let hub = free_port()?;
                    let mut serve = Command::new(&tunnel)
                        .args(["serve", "--listen", &format!("127.0.0.1:{hub}"), "--allow", &nbd_port.to_string()])
                        .arg("--host-key")
                        .arg(keys.path("host_key"))
                        .arg("--authorized-keys")
                        .arg(keys.path("authorized_keys"))
                        .stderr(Stdio::null())
                        .spawn()?;
                    wait_port(hub, &mut serve)?;
                    let proxy = DelayProxy::start(hub, one_way)?;
                    let kh = keys.known_hosts_for(proxy.port)?;
                    let mut connect = Command::new(&tunnel)
                        .args([
                            "connect",
                            "--hub",
                            &format!("127.0.0.1:{}", proxy.port),
                            "--forward",
                            &format!("{local}:{nbd_port}"),
                        ])
                        .arg("--identity")
                        .arg(keys.path("client_key"))
                        .arg("--known-hosts")
                        .arg(&kh)
                        .stderr(Stdio::null())
                        .spawn()?;
                    wait_port(local, &mut connect)?;
                    (vec![Proc(serve), Proc(connect)], proxy)
                } else {
                    let proxy = DelayProxy::start(sshd_port, one_way)?;
                    let kh = keys.known_hosts_for(proxy.port)?;
                    let mut ssh = Command::new("ssh")
                        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
                        .arg("-o")
                        .arg(format!("UserKnownHostsFile={}", kh.display()))
                        .arg("-i")
                        .arg(keys.path("client_key"))
                        .args(["-p", &proxy.port.to_string(), "-N", "-L"])
                        .arg(format!("{local}:127.0.0.1:{nbd_port}"))
                        .arg("root@127.0.0.1")
                        .stdin(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()?;
                    wait_port(local, &mut ssh)?;
                    (vec![Proc(ssh)], proxy)
                };
                let secs = copy_through(&src, local)?;
                let case = format!("{} rtt {rtt_ms} ms", if ours { "sendense-tunnel" } else { "openssh ssh -L" });
                report.add("wan", &case, "MB/s", size as f64 / 1e6 / secs);
            }
        }
    }
    for rtt_ms in [0u64, 10, 20, 50] {
        report.ratio(
            "wan",
            &format!("sendense-tunnel rtt {rtt_ms} ms"),
            &format!("openssh ssh -L rtt {rtt_ms} ms"),
            "MB/s",
        );
    }
    report.note(format!(
        "wan: nbdcopy --connections=4 --flush of {mib} MiB into sendense-nbd (raw) through the tunnel or ssh -L, with a \
         delay proxy between the SSH client and server adding RTT/2 each way (unbounded bytes in flight)."
    ));
    Ok(())
}
