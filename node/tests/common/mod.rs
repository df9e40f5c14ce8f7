//! Helpers for the node's tests: real peers on 127.0.0.1 (qemu-nbd, qemu-img, our NBD server
//! library serving qcow2 as the hub does, the `sendense-node` binary), never mocks. A missing
//! tool fails the test; the README's test command installs them.
#![allow(dead_code)]

use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::{ExportConfig, Qcow2Backend, Server, ServerConfig};

pub fn require(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(tool)).find(|p| p.is_file()))
        .or_else(|| ["/usr/sbin", "/usr/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.is_file()));
    found.unwrap_or_else(|| panic!("{tool} is required for this test; run scripts/test.sh, which installs it"))
}

pub use testports::free_port;

pub fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited before listening on {port}: {status}");
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A deterministic pseudo-random byte stream (xorshift), so sources differ per seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw disk of `mib` MiB: 1 MiB of data every 4 MiB, a 1 MiB run of written zeroes
/// at 2 MiB, holes elsewhere. Returns the bytes of data written (not zeroes).
pub fn make_source(path: &Path, mib: u64, seed: u64) -> u64 {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    let mut data = 0;
    for (i, at) in (0..mib).step_by(4).enumerate() {
        f.write_all_at(&pseudo_random(1 << 20, seed + i as u64), at << 20).unwrap();
        data += 1 << 20;
    }
    if mib > 3 {
        f.write_all_at(&vec![0u8; 1 << 20], 2 << 20).unwrap();
    }
    f.sync_all().unwrap();
    data
}

/// Overwrite 4 KiB at each offset with fresh bytes.
pub fn change_blocks(path: &Path, offsets: &[u64], seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (i, &o) in offsets.iter().enumerate() {
        f.write_all_at(&pseudo_random(4096, seed + i as u64), o).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new(require("qemu-img")).args(args))
}

/// `qemu-img compare` says identical.
pub fn assert_same(a: &Path, b: &Path) {
    let out = Command::new(require("qemu-img")).arg("compare").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` exits 0.
pub fn assert_clean(img: &Path) {
    let out = Command::new(require("qemu-img")).arg("check").arg(img).output().unwrap();
    assert!(out.status.success(), "qemu-img check {}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
}

/// Bytes `qemu-img map` reports as data in the top layer of `img`.
pub fn top_layer_data(img: &Path) -> u64 {
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// A source disk of `mib` MiB at `raw` ([`make_source`]), made by qemu-img into the qcow2 image
/// `image` with `options` (`-c`, `-o cluster_size=4096`...). Returns the bytes of data.
pub fn make_qcow2_source(raw: &Path, image: &Path, mib: u64, seed: u64, options: &[&str]) -> u64 {
    let data = make_source(raw, mib, seed);
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(options);
    args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
    qemu_img(&args);
    data
}

pub fn new_qcow2(path: &Path, size: u64) {
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &size.to_string()]);
}

pub fn new_overlay(path: &Path, backing: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing.file_name().unwrap().to_str().unwrap(),
        "-F",
        "qcow2",
        path.to_str().unwrap(),
    ]);
}

/// The hub's side as the hub runs it: our NBD server library serving a qcow2 image in this
/// process, up to 10 connections sharing it.
pub struct HubExport {
    pub server: Server,
    pub port: u16,
    pub name: String,
}

impl HubExport {
    pub async fn start(image: &Path, name: &str) -> Self {
        Self::start_on(image, name, 0).await
    }

    pub async fn start_on(image: &Path, name: &str, port: u16) -> Self {
        let server = Server::new(ServerConfig::default());
        let backend = Arc::new(Qcow2Backend::open(image, false).unwrap());
        server.add_export(ExportConfig::new(name, backend).max_connections(10)).unwrap();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = server.clone();
        let export = name.to_string();
        tokio::spawn(async move { s.serve_export(listener, export).await });
        Self { server, port, name: name.to_string() }
    }

    pub fn target(&self, key: u32) -> String {
        format!("{key}:nbd://127.0.0.1:{}/{}", self.port, self.name)
    }

    /// Drain, flush and close the export (the image is then complete on disk).
    pub async fn close(self) {
        self.server.remove_export(&self.name).await.unwrap();
        self.server.shutdown().await.unwrap();
    }
}

/// A qemu-nbd process, killed on drop.
pub struct QemuNbd {
    pub child: Child,
    pub port: u16,
    pub name: String,
}

impl QemuNbd {
    /// `qemu-nbd -f FORMAT -x NAME -p PORT --shared=8 -t [extra] FILE`.
    pub fn start(file: &Path, format: &str, name: &str, extra: &[&str]) -> Self {
        Self::start_with_env(file, format, name, extra, &[])
    }

    /// The same, with `env` set in its environment.
    pub fn start_with_env(
        file: &Path,
        format: &str,
        name: &str,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let port = free_port();
        let mut child = Command::new(require("qemu-nbd"))
            .envs(env.iter().copied())
            .args(["-f", format, "-x", name, "-p", &port.to_string(), "-b", "127.0.0.1", "--shared=8", "-t"])
            .args(extra)
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, &mut child);
        Self { child, port, name: name.to_string() }
    }

    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.name)
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sendense_node() -> &'static str {
    env!("CARGO_BIN_EXE_sendense-node")
}

/// `sendense-node copy ... --json`: the exit status and the job's final view.
pub fn node_copy(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(sendense_node()).arg("copy").args(args).arg("--json").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let view = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), view, stderr)
}

/// A `sendense-node serve` process, killed on drop.
pub struct NodeProcess {
    pub child: Child,
    pub port: u16,
}

impl NodeProcess {
    /// Start with `config` (TOML text) plus flags; waits for `/healthz`.
    pub fn start(dir: &Path, config: &str, flags: &[&str]) -> Self {
        Self::start_on(dir, config, flags, free_port())
    }

    /// The same on a given API port.
    pub fn start_on(dir: &Path, config: &str, flags: &[&str], port: u16) -> Self {
        let config_path = dir.join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(sendense_node())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, &mut child);
        Self { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll a job until it is final (or 60 s pass).
pub async fn wait_job(client: &node::api::NodeClient, id: &str) -> node::api::JobView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = client.job(id).await.unwrap();
        if v.status.is_final() {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} still {:?} after 60 s: {v:?}", v.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
