//! Tunnel throughput: `sendense-tunnel connect` against OpenSSH's `ssh -N -L` through the same
//! sshd, which is restricted to one cipher so both clients negotiate it; bulk data through one
//! forwarded port with 1 and 4 connections, node-side client CPU per GB. Then NBD writes
//! through our tunnel (our endpoint, our client) against direct loopback and against OpenSSH at
//! both ends (`ssh -L` to sshd, same cipher): the seam the product replaces.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::peers::cpu_seconds;
use crate::report::Report;

pub struct Proc(Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let ok = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status()?.success();
    anyhow::ensure!(ok, "ssh-keygen failed");
    Ok(())
}

/// A discard server: reads each connection to EOF, then closes it.
fn sink() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 20];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    Ok(port)
}

/// Push `total` bytes through `port` over `conns` connections; seconds until all arrived.
fn push(port: u16, total: usize, conns: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                let chunk = vec![0x5au8; 1 << 20];
                let mut left = total / conns;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n])?;
                    left -= n;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                let mut b = [0u8; 1];
                let _ = s.read(&mut b); // EOF once the sink has read everything
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    Ok(started.elapsed().as_secs_f64())
}

pub struct Keys {
    dir: PathBuf,
}

impl Keys {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        keygen(&dir.join("host_key"))?;
        keygen(&dir.join("client_key"))?;
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        // Writable by nobody else whatever the umask: both sshd and our endpoint insist.
        std::fs::set_permissions(dir.join("authorized_keys"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// A file of the key directory (`host_key`, `client_key`, their `.pub`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A known_hosts file pinning the host key for 127.0.0.1:`port`.
    pub fn known_hosts_for(&self, port: u16) -> anyhow::Result<PathBuf> {
        self.known_hosts(port)
    }

    fn known_hosts(&self, port: u16) -> anyhow::Result<PathBuf> {
        let key = std::fs::read_to_string(self.dir.join("host_key.pub"))?;
        let mut f = key.split_whitespace();
        let line = format!("[127.0.0.1]:{port} {} {}\n", f.next().unwrap_or_default(), f.next().unwrap_or_default());
        let p = self.dir.join("known_hosts");
        std::fs::write(&p, line)?;
        Ok(p)
    }

    /// OpenSSH's client forwarding local port `lport` to `target` through the sshd on `ssh_port`
    /// with `cipher`, checking the host key against `known_hosts`.
    fn ssh_forward(
        &self,
        cipher: &str,
        known_hosts: &Path,
        ssh_port: u16,
        lport: u16,
        target: u16,
    ) -> anyhow::Result<Child> {
        Ok(Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-c", cipher])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(self.dir.join("client_key"))
            .args(["-p", &ssh_port.to_string(), "-N", "-L", &format!("{lport}:127.0.0.1:{target}"), "root@127.0.0.1"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// An sshd of our own accepting `client_key`, restricted to `cipher` (a list works too).
    pub fn sshd(&self, cipher: &str) -> anyhow::Result<(Proc, u16)> {
        std::fs::create_dir_all("/run/sshd").context("sshd needs /run/sshd (run as root)")?;
        let port = free_port()?;
        let cfg = self.dir.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nAllowTcpForwarding yes\n\
                 Ciphers {cipher}\nLogLevel ERROR\n",
                self.dir.join("host_key").display(),
                self.dir.join("authorized_keys").display()
            ),
        )?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let p = Proc(child);
        wait_port(port)?;
        Ok((p, port))
    }
}

fn tunnel_bin(sendense: &Path) -> PathBuf {
    sendense.with_file_name("sendense-tunnel")
}

pub fn tunnel_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let tunnel = tunnel_bin(sendense);
    anyhow::ensure!(tunnel.exists(), "{} not found; cargo build --release", tunnel.display());
    let keys = Keys::new(&dir.join("tunnel-keys"))?;
    let sink_port = sink()?;
    let total = (mib as usize) << 20;
    let gb = total as f64 / 1e9;
    for rep in 0..reps {
        eprintln!("tunnel: rep {}/{reps}", rep + 1);
        for (cipher, short) in [("aes256-gcm@openssh.com", "aes256-gcm"), ("chacha20-poly1305@openssh.com", "chacha20")]
        {
            let (_sshd, ssh_port) = keys.sshd(cipher)?;
            let kh = keys.known_hosts(ssh_port)?;
            for conns in [1usize, 4] {
                for ours in [true, false] {
                    let lport = free_port()?;
                    let child = if ours {
                        Command::new(&tunnel)
                            .args([
                                "connect",
                                "--hub",
                                &format!("127.0.0.1:{ssh_port}"),
                                "--forward",
                                &format!("{lport}:{sink_port}"),
                            ])
                            .arg("--identity")
                            .arg(keys.dir.join("client_key"))
                            .arg("--known-hosts")
                            .arg(&kh)
                            .stderr(Stdio::null())
                            .spawn()?
                    } else {
                        keys.ssh_forward(cipher, &kh, ssh_port, lport, sink_port)?
                    };
                    let client = Proc(child);
                    wait_port(lport)?;
                    // Warm the connection (and, for ours, wait for the tunnel to be up).
                    push(lport, 1 << 20, 1)?;
                    let cpu0 = cpu_seconds(client.0.id());
                    let secs = push(lport, total, conns)?;
                    let cpu = cpu_seconds(client.0.id()) - cpu0;
                    let case = format!("{} {short} c{conns}", if ours { "sendense" } else { "openssh" });
                    report.add("tunnel", &case, "MB/s", total as f64 / 1e6 / secs);
                    report.add("tunnel", &case, "client CPU s/GB", cpu / gb);
                }
            }
        }
    }
    for short in ["aes256-gcm", "chacha20"] {
        for conns in [1, 4] {
            for metric in ["MB/s", "client CPU s/GB"] {
                report.ratio(
                    "tunnel",
                    &format!("sendense {short} c{conns}"),
                    &format!("openssh {short} c{conns}"),
                    metric,
                );
            }
        }
    }
    report.note(format!(
        "tunnel: {mib} MiB pushed into a discard server through one forwarded port (1 or 4 connections), via \
         `sendense-tunnel connect --forward` or `ssh -N -L -c CIPHER`, both against one OpenSSH sshd limited to that cipher; \
         CPU is the node-side client process."
    ));
    nbd_through_tunnel(sendense, &tunnel, &keys, dir, mib, reps, report)
}

/// `sendense-tunnel serve` allowing `port`, and `sendense-tunnel connect` forwarding a fresh
/// local port to it; returns the processes and the local port.
pub fn tunnel_to(tunnel: &Path, keys: &Keys, port: u16) -> anyhow::Result<(Vec<Proc>, u16)> {
    let mut guards = Vec::new();
    let hub = free_port()?;
    guards.push(Proc(
        Command::new(tunnel)
            .args(["serve", "--listen", &format!("127.0.0.1:{hub}"), "--allow", &port.to_string()])
            .arg("--host-key")
            .arg(keys.dir.join("host_key"))
            .arg("--authorized-keys")
            .arg(keys.dir.join("authorized_keys"))
            .stderr(Stdio::null())
            .spawn()?,
    ));
    wait_port(hub)?;
    let kh = keys.known_hosts(hub)?;
    let lport = free_port()?;
    guards.push(Proc(
        Command::new(tunnel)
            .args(["connect", "--hub", &format!("127.0.0.1:{hub}"), "--forward", &format!("{lport}:{port}")])
            .arg("--identity")
            .arg(keys.dir.join("client_key"))
            .arg("--known-hosts")
            .arg(&kh)
            .stderr(Stdio::null())
            .spawn()?,
    ));
    wait_port(lport)?;
    Ok((guards, lport))
}

/// CPU seconds of `pid` and every process under it (an sshd's per-connection children).
fn tree_cpu(pid: u32) -> f64 {
    let mut pids = vec![pid];
    let mut i = 0;
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    while let Some(&p) = pids.get(i) {
        pids.extend(all.iter().filter(|(_, parent)| *parent == p).map(|(c, _)| *c));
        i += 1;
    }
    pids.into_iter().map(cpu_seconds).filter(|c| c.is_finite()).sum()
}

/// How NBD reaches the server in `nbd_through_tunnel`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seam {
    Direct,
    Ours,
    OpenSsh,
}

fn nbd_through_tunnel(
    sendense: &Path,
    tunnel: &Path,
    keys: &Keys,
    dir: &Path,
    mib: u64,
    reps: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let size = mib << 20;
    let gb = size as f64 / 1e9;
    let src = dir.join("tunnel-src.raw");
    if std::fs::metadata(&src).map(|m| m.len()).ok() != Some(size) {
        let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&src, data)?;
    }
    let cipher = "aes256-gcm@openssh.com";
    for rep in 0..reps {
        eprintln!("tunnel nbd: rep {}/{reps}", rep + 1);
        for seam in [Seam::Direct, Seam::Ours, Seam::OpenSsh] {
            let target = dir.join("tunnel-dst.raw");
            let _ = std::fs::remove_file(&target);
            std::fs::File::create(&target)?.set_len(size)?;
            let nbd_port = free_port()?;
            let _nbd = Proc(
                Command::new(sendense)
                    .args(["-f", "raw", "-x", "exp", "-p", &nbd_port.to_string(), "--shared=8", "-t"])
                    .arg(&target)
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            wait_port(nbd_port)?;
            let (guards, port) = match seam {
                Seam::Direct => (Vec::new(), nbd_port),
                Seam::Ours => tunnel_to(tunnel, keys, nbd_port)?,
                Seam::OpenSsh => {
                    let (sshd, ssh_port) = keys.sshd(cipher)?;
                    let kh = keys.known_hosts(ssh_port)?;
                    let lport = free_port()?;
                    let ssh = keys.ssh_forward(cipher, &kh, ssh_port, lport, nbd_port)?;
                    let guards = vec![sshd, Proc(ssh)];
                    wait_port(lport)?;
                    (guards, lport)
                }
            };
            let tunnel_cpu = || guards.iter().map(|g| tree_cpu(g.pid())).sum::<f64>();
            let cpu0 = tunnel_cpu();
            let started = Instant::now();
            let ok = Command::new("nbdcopy")
                .args(["--flush", "--connections=4", "--threads=4"])
                .arg(&src)
                .arg(format!("nbd://127.0.0.1:{port}/exp"))
                .stderr(Stdio::null())
                .status()?
                .success();
            anyhow::ensure!(ok, "nbdcopy failed");
            let secs = started.elapsed().as_secs_f64();
            let cpu = tunnel_cpu() - cpu0;
            let case = match seam {
                Seam::Direct => "direct loopback",
                Seam::Ours => "through tunnel",
                Seam::OpenSsh => "through ssh -L",
            };
            report.add("tunnel nbd", case, "MB/s", size as f64 / 1e6 / secs);
            if seam != Seam::Direct {
                report.add("tunnel nbd", case, "tunnel CPU s/GB", cpu / gb);
            }
        }
    }
    report.ratio("tunnel nbd", "through tunnel", "direct loopback", "MB/s");
    report.ratio("tunnel nbd", "through tunnel", "through ssh -L", "MB/s");
    report.ratio("tunnel nbd", "through tunnel", "through ssh -L", "tunnel CPU s/GB");
    report.note(format!(
        "tunnel nbd: `nbdcopy --flush --connections=4 --threads=4` of {mib} MiB into sendense-nbd (raw), directly, through \
         `sendense-tunnel connect` -> `sendense-tunnel serve` (both ends ours, default cipher negotiation: aes256-gcm on \
         a CPU with AES) or through `ssh -N -L -c aes256-gcm@openssh.com` -> sshd (both ends OpenSSH); tunnel CPU is \
         both ends' processes (sshd with its per-connection children) over the copy."
    ));
    Ok(())
}
