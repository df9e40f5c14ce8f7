//! Helpers for the tunnel tests: throwaway keys, an sshd of our own, echo servers, round trips.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn require(tool: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} is required (Debian openssh-server/openssh-client); scripts/test.sh installs it");
}

pub fn keygen(path: &Path) {
    let out =
        Command::new(require("ssh-keygen")).args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[allow(unused_imports)]
pub use testports::{free_port, free_ports};

pub struct Sshd {
    child: Child,
}

impl Sshd {
    pub fn start(dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile none\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n\
                 AllowTcpForwarding yes\nGatewayPorts no\nLogLevel ERROR\n",
                hk = dir.join("host_key").display(),
                ak = dir.join("authorized_keys").display()
            ),
        )
        .unwrap();
        let mut child =
            Command::new(require("sshd")).args(["-D", "-e", "-f"]).arg(&config).stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "sshd exited");
            assert!(Instant::now() < deadline, "sshd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    /// Kill this sshd and the per-connection processes it forked (only ours: found by walking
    /// `/proc` for its descendants, before the parent dies and they are re-parented).
    pub fn stop(&mut self) {
        let mut tree = descendants(self.child.id());
        tree.reverse();
        for pid in tree {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// All processes below `root`, parents before children.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let ppid = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

pub fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    keygen(&dir.join("host_key"));
    keygen(&dir.join("client_key"));
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    // Writable by nobody else whatever the umask: both sshd and our endpoint insist.
    std::fs::set_permissions(dir.join("authorized_keys"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (dir.join("client_key"), dir.join("host_key.pub"))
}

pub fn known_hosts(dir: &Path, port: u16, pubkey: &Path) -> PathBuf {
    let key = std::fs::read_to_string(pubkey).unwrap();
    let mut fields = key.split_whitespace();
    let line = format!("[127.0.0.1]:{port} {} {}\n", fields.next().unwrap(), fields.next().unwrap());
    let p = dir.join("known_hosts");
    std::fs::write(&p, line).unwrap();
    p
}

/// OpenSSH's `ssh` to our endpoint on `hub` with `dir`'s `key` and known_hosts, and `args`.
pub fn ssh(dir: &Path, hub: u16, key: &str, args: &[&str]) -> Command {
    let mut c = Command::new(require("ssh"));
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ExitOnForwardFailure=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", dir.join("known_hosts").display()))
    .arg("-i")
    .arg(dir.join(key))
    .args(["-p", &hub.to_string()])
    .args(args)
    .arg("root@127.0.0.1")
    .stdin(Stdio::null());
    c
}

/// Echo servers on `n` consecutive ports; returns the first port.
pub fn echo_servers(n: u16) -> u16 {
    'search: for _ in 0..200 {
        let base = free_port();
        if base > 65000 {
            continue;
        }
        let mut listeners = Vec::new();
        for i in 0..n {
            match TcpListener::bind(("127.0.0.1", base + i)) {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'search,
            }
        }
        for l in listeners {
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut s = s;
                        let mut buf = [0u8; 65536];
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            });
        }
        return base;
    }
    panic!("no free port range");
}

pub fn round_trip(addr: SocketAddr, len: usize, seed: u8) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "data through {addr} came back different ({} of {} bytes)", back.len(), data.len());
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
