//! Helpers shared by the integration tests: real peers started on 127.0.0.1, never mocks.
//!
//! A test that needs an interop tool calls [`require`], which fails the test (it does not skip)
//! when the tool is missing: the README's test command installs them.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fail loudly if `tool` is not on PATH.
pub fn require(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(tool)).find(|p| p.is_file()));
    match found {
        Some(p) => p,
        None => panic!("{tool} is required for this test but is not installed; run the README's test command (scripts/test.sh), which installs it"),
    }
}

/// Debian's python3, where python3-libnbd's module lives.
pub fn debian_python() -> &'static str {
    let p = "/usr/bin/python3";
    assert!(Path::new(p).exists(), "/usr/bin/python3 (Debian's, for python3-libnbd) is required");
    p
}

pub use testports::free_port;

/// Wait until the NBD server on `port` answers: a connection that gets the greeting's first
/// bytes. A bare TCP connect proved less: the kernel completes it from the listen queue before
/// the server ever accepts, and a test's first connection made right after such a probe was
/// reset by qemu-nbd once in a CI run (and refused by ours in two, earlier).
pub fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if greets(port) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("nothing listens on port {port} after 10 s");
}

/// Whether a connection to `port` receives the start of an NBD greeting.
fn greets(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut probe) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = probe.set_read_timeout(Some(Duration::from_secs(2)));
    let mut magic = [0u8; 8];
    probe.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// A server process, killed on drop.
pub struct Peer {
    pub child: Reaped,
    pub port: u16,
    pub name: String,
}

impl Peer {
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.name)
    }

    /// Send SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        self.child.wait().expect("wait")
    }
}

/// A child process killed and reaped when the test ends, passed or failed: a failing test must
/// not leave a server behind (it would hold the test runner's output open).
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sendense_nbd() -> &'static str {
    env!("CARGO_BIN_EXE_sendense-nbd")
}

/// Start `sendense-nbd -f raw -x NAME -p PORT -t [extra] FILE`.
pub fn start_sendense(file: &Path, name: &str, extra: &[&str]) -> Peer {
    start_sendense_as(file, "raw", name, extra)
}

/// Start `sendense-nbd -f FORMAT -x NAME -p PORT -t [extra] FILE`.
pub fn start_sendense_as(file: &Path, format: &str, name: &str, extra: &[&str]) -> Peer {
    let port = free_port();
    let mut child = Command::new(sendense_nbd())
        .args(["-f", format, "-x", name, "-p", &port.to_string(), "-t"])
        .args(extra)
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sendense-nbd");
    wait_for_port(port, &mut child);
    Peer { child: Reaped(child), port, name: name.to_string() }
}

/// Start `qemu-nbd -f raw -x NAME -p PORT -b 127.0.0.1 --shared=4 -t FILE`.
pub fn start_qemu_nbd(file: &Path, name: &str) -> Peer {
    require("qemu-nbd");
    let port = free_port();
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", name, "-p", &port.to_string(), "-b", "127.0.0.1", "--shared=4", "-t"])
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    wait_for_port(port, &mut child);
    Peer { child: Reaped(child), port, name: name.to_string() }
}

/// Start `nbdkit file FILE` on a free port.
pub fn start_nbdkit(file: &Path) -> Peer {
    require("nbdkit");
    let port = free_port();
    let mut child = Command::new("nbdkit")
        .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nbdkit");
    wait_for_port(port, &mut child);
    Peer { child: Reaped(child), port, name: String::new() }
}

/// Run a command, fail the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift), with some all-zero stretches so that sparse
/// paths get exercised.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    // Zero every fourth MiB so images have holes to find.
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        if i % 4 == 3 {
            chunk.fill(0);
        }
    }
    out
}

/// Write `data` into a new file `name` in `dir`.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write file");
    p
}

/// A sparse file of `size` bytes.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(size).expect("set_len");
    p
}

/// Assert `got` equals `want`, naming where they differ: the first and last differing byte and
/// how many bytes differ, so a failure says which write or read went wrong.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {} bytes where {} were expected", got.len(), want.len());
    let mut differ = got.iter().zip(want).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i);
    if let Some(first) = differ.next() {
        let (count, last) = differ.fold((1usize, first), |(n, _), i| (n + 1, i));
        panic!(
            "{what}: {count} bytes differ, from byte {first} ({first:#x}) to {last} ({last:#x}); got {:#04x}, want {:#04x} at the first",
            got[first], want[first]
        );
    }
}

/// Assert two files have identical content.
pub fn assert_same_content(a: &Path, b: &Path) {
    let x = std::fs::read(a).expect("read a");
    let y = std::fs::read(b).expect("read b");
    assert_eq!(x.len(), y.len(), "{} and {} differ in size", a.display(), b.display());
    if let Some(pos) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {pos:#x}", a.display(), b.display());
    }
}

/// An option as a client sends it, on any transport.
pub async fn send_option<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::new();
    out.extend_from_slice(&nbd_server::proto::consts::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out).await.unwrap();
}

/// The next option reply, header and data, from any transport.
pub async fn option_reply<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> (nbd_server::proto::handshake::OptionReplyHeader, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    let h = nbd_server::proto::handshake::OptionReplyHeader::parse(&h).unwrap();
    let mut d = vec![0u8; h.length as usize];
    s.read_exact(&mut d).await.unwrap();
    (h, d)
}

/// `sendense-nbd -f raw -x NAME -t -k SOCKET [extra] FILE`, once it listens on its socket.
pub fn start_sendense_on_socket(file: &Path, name: &str, socket: &Path, extra: &[String]) -> Reaped {
    let mut child = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", name, "-t", "-k"])
        .arg(socket)
        .args(extra)
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sendense-nbd");
    let started = Instant::now();
    while !unix_listening(socket) {
        assert!(started.elapsed() < Duration::from_secs(10), "no socket at {} after 10 s", socket.display());
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sendense-nbd exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Reaped(child)
}

/// Whether a socket listens at `path` (`/proc/net/unix`: its file appears at `bind`, before
/// `listen`, when a client would be refused; a probing connection would take a client's place).
pub fn unix_listening(path: &Path) -> bool {
    const ACCEPTING: &str = "00010000";
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == ACCEPTING && fields[7] == path
    })
}

/// A server embedded in the test, serving export "e" (`size` bytes in memory, `limit`
/// connections) on a fresh loopback port: the server, the port and the export's backend.
pub async fn start_embedded(
    config: nbd_server::ServerConfig,
    size: u64,
    limit: usize,
) -> (nbd_server::Server, u16, std::sync::Arc<nbd_server::MemoryBackend>) {
    use std::sync::Arc;
    let server = nbd_server::Server::new(config);
    let backend = Arc::new(nbd_server::MemoryBackend::new(size));
    let export = nbd_server::ExportConfig::new("e", backend.clone() as Arc<dyn nbd_server::Backend>);
    server.add_export(export.max_connections(limit)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    (server, port, backend)
}
