//! One site for the end-to-end tests: `sendense-hub serve` and `sendense-node serve` as two
//! processes, with their configuration files written here, joined one of three ways (the hub's
//! own SSH endpoint, OpenSSH's sshd in its place, or direct TCP), and the calls a backup
//! operator makes. Sources are raw files with random data, zero runs and holes; qemu-img
//! judges every image.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../../../tunnel/tests/common/mod.rs"]
pub mod ssh;

pub const MIB: u64 = 1 << 20;

/// How the node reaches the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The node's tunnel to the hub's own SSH endpoint (production).
    Endpoint,
    /// The node's tunnel to OpenSSH's sshd (the endpoint replaced by the tool it replaces).
    OpenSsh,
    /// No tunnel: NBD and the API over TCP.
    Direct,
}

/// A VM of the node: name and disk sizes in MiB.
pub struct Vm<'a>(pub &'a str, pub &'a [u64]);

pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()));
    Command::new(found.unwrap_or_else(|| panic!("{name} is required; scripts/test.sh installs it")))
}

/// The `sendense-node` binary of this build. Cargo hands a test only its own package's
/// binaries, so it is found beside them; `cargo test --workspace` (the README's test command)
/// builds it. A missing or stale one fails with the command that builds it.
pub fn sendense_node() -> PathBuf {
    let hub = PathBuf::from(env!("CARGO_BIN_EXE_sendense-hub"));
    let node = hub.with_file_name("sendense-node");
    let built = std::fs::metadata(&node).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: run `cargo test --workspace` or `cargo build --bin sendense-node`", node.display())
    });
    let library = std::fs::read_dir(hub.with_file_name("deps"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("libnode-") && name.ends_with(".rlib")
        })
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    if let Some(library) = library {
        assert!(
            built >= library,
            "{} is older than the node library: run `cargo build --bin sendense-node` (or `cargo test --workspace`)",
            node.display()
        );
    }
    node
}

/// Random 1 MiB runs, written zeroes and holes in a repeating pattern; `seed` varies the data.
pub fn make_source(path: &Path, mib: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib * MIB).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for at in 0..mib {
        match at % 4 {
            0 | 1 => {
                let mut data = vec![0u8; MIB as usize];
                for c in data.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all_at(&data, at * MIB).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; MIB as usize], at * MIB).unwrap(),
            _ => {}
        }
    }
}

/// The guest writes 4 KiB at `offset` (through qemu-io into a qcow2 image).
pub fn change(path: &Path, offset: u64, seed: u8) {
    if path.extension().is_some_and(|e| e == "qcow2") {
        let out = tool("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {seed} {offset} 4k")])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[seed; 4096], offset).unwrap();
}

pub fn assert_same(a: &Path, b: &Path) {
    let out = tool("qemu-img").arg("compare").arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "{} vs {}: {}", a.display(), b.display(), String::from_utf8_lossy(&out.stdout));
}

pub fn assert_clean(img: &Path) {
    let out = tool("qemu-img").arg("check").arg(img).output().unwrap();
    assert!(out.status.success(), "qemu-img check {}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
}

/// `ssh-keygen -lf` of `public_key`: its fingerprint (`SHA256:...`).
pub fn fingerprint(public_key: &Path) -> String {
    let out = tool("ssh-keygen").arg("-lf").arg(public_key).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

fn wait_listening(child: &mut Child, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Process(Child);

/// `sendense-node serve --config config`, once it listens on `api`.
fn serve_node(config: &Path, api: u16, what: &str) -> Process {
    let mut child = Command::new(sendense_node())
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, api, what);
    Process(child)
}

impl Process {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM, and wait for a clean exit within 60 s.
fn stop_gracefully(process: Option<Process>, what: &str) {
    let Some(mut p) = process else { return };
    signal_process(p.0.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            assert!(status.success(), "the {what}'s graceful stop ended with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "the {what} did not stop within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_process(pid: u32, signal: &str) {
    assert_ne!(pid, 0, "no such process");
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Options of a site beyond the transport.
#[derive(Default)]
pub struct Options<'a> {
    /// `[copy]` lines of node.toml.
    pub copy: &'a str,
    /// More hub.toml lines (top level).
    pub hub: &'a str,
    /// More node.toml lines (top level).
    pub node: &'a str,
    /// Run the hub with its repository on a tmpfs of this many MiB (in a mount namespace of
    /// its own: `unshare`, no root needed).
    pub repo_tmpfs_mib: Option<u64>,
    /// Keep the site under the build's target directory instead of the system's temporary one
    /// (`O_DIRECT` needs a filesystem that takes it; older tmpfs does not).
    pub on_build_disk: bool,
    /// The VMs' disks are qcow2 images (`format = "qcow2"`) with a persistent dirty bitmap the
    /// node reads changes from, as libvirt keeps them.
    pub qcow2_sources: bool,
    /// Both APIs over HTTPS (`api_tls`) with this directory's certificate, the hub calling
    /// the node at `https://` (direct mode only) and the site's client trusting its CA. With a
    /// client certificate there too (testpki's `both/`), both APIs require client certificates
    /// (`api_client_certs`): the hub presents it to the node, the site's client to both.
    pub api_tls: Option<&'a Path>,
}

/// The hub and the node of one test, and where everything is.
pub struct Site {
    pub dir: tempfile::TempDir,
    hub: Option<Process>,
    node: Option<Process>,
    pub sshd: Option<ssh::Sshd>,
    hub_config: PathBuf,
    node_config: PathBuf,
    wrap: Vec<String>,
    source_ext: &'static str,
    pub hub_api: u16,
    pub node_api: u16,
    pub hub_token: String,
    pub node_token: String,
    /// The hub's NBD range (first, last).
    pub nbd: (u16, u16),
    /// Where the hub calls the node.
    pub node_url: String,
    /// `http` or `https` (`Options::api_tls`), for both APIs.
    pub scheme: &'static str,
    http: reqwest::Client,
}

impl Site {
    /// Write the configurations, start the node, then the hub, and wait until the hub reaches
    /// the node's API (through the tunnel's reverse forward where there is one).
    pub async fn start(transport: Transport, vms: &[Vm<'_>], ports: u16, opts: Options<'_>) -> Self {
        let dir = match opts.on_build_disk {
            true => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
            false => tempfile::tempdir().unwrap(),
        };
        let d = dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("src")).unwrap();
        let mut vm_toml = String::new();
        let mut seed = 1;
        let source_ext = if opts.qcow2_sources { "qcow2" } else { "raw" };
        for Vm(name, disks) in vms {
            vm_toml += &format!("[[vm]]\nname = \"{name}\"\n");
            for (i, mib) in disks.iter().enumerate() {
                let path = d.join("src").join(format!("{name}-{i}.raw"));
                make_source(&path, *mib, seed);
                seed += 1;
                let (path, format) = match opts.qcow2_sources {
                    false => (path, ""),
                    true => {
                        let image = path.with_extension("qcow2");
                        let out = tool("qemu-img")
                            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                            .arg(&path)
                            .arg(&image)
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                        std::fs::remove_file(&path).unwrap();
                        // A persistent bitmap, as a libvirt checkpoint keeps: incrementals read
                        // only what it marks.
                        let out =
                            tool("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("sendense").output().unwrap();
                        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                        (image, "format = \"qcow2\"\ndirty_bitmap = \"sendense\"\n")
                    }
                };
                vm_toml += &format!("[[vm.disk]]\nkey = {}\nsource = \"{}\"\n{format}", 2000 + i, path.display());
            }
        }
        let hub_base = ssh::free_ports(ports);
        let node_base = ssh::free_ports(ports);
        let (scheme, api_tls, http) = match opts.api_tls {
            Some(dir) => {
                let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca-cert.pem")).unwrap()).unwrap();
                let mut toml = format!("api_tls = \"{}\"\n", dir.display());
                let mut client = reqwest::Client::builder().tls_certs_only([ca]);
                if let Ok(cert) = std::fs::read(dir.join("client-cert.pem")) {
                    toml += "api_client_certs = true\n";
                    let mut pem = std::fs::read(dir.join("client-key.pem")).unwrap();
                    pem.extend(cert);
                    client = client.identity(reqwest::Identity::from_pem(&pem).unwrap());
                }
                ("https", toml, client)
            }
            None => ("http", String::new(), reqwest::Client::builder()),
        };
        let (hub_api, node_api, reverse, ssh_port) =
            (ssh::free_port(), ssh::free_port(), ssh::free_port(), ssh::free_port());
        let (node_url, tunnel_toml, hub_ssh_toml, node_key_line);
        let mut sshd = None;
        match transport {
            Transport::Endpoint => {
                ssh::keygen(&d.join("hub_host_key"));
                ssh::keygen(&d.join("node_key"));
                std::fs::write(d.join("authorized_keys"), "").unwrap();
                std::fs::set_permissions(
                    d.join("authorized_keys"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                node_url = format!("http://127.0.0.1:{reverse}");
                tunnel_toml = format!(
                    "[tunnel]\nhub = \"127.0.0.1:{ssh_port}\"\nuser = \"node\"\nidentity = \"{}\"\nfingerprint = \"{}\"\n",
                    d.join("node_key").display(),
                    fingerprint(&d.join("hub_host_key.pub"))
                );
                hub_ssh_toml = format!(
                    "[ssh]\nlisten = \"127.0.0.1:{ssh_port}\"\nhost_key = \"{}\"\nauthorized_keys = \"{}\"\n",
                    d.join("hub_host_key").display(),
                    d.join("authorized_keys").display()
                );
                node_key_line =
                    format!("key = \"{}\"\n", std::fs::read_to_string(d.join("node_key.pub")).unwrap().trim());
            }
            Transport::OpenSsh => {
                let (identity, host_pub) = ssh::setup(&d);
                sshd = Some(ssh::Sshd::start(&d, ssh_port));
                let known_hosts = ssh::known_hosts(&d, ssh_port, &host_pub);
                let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
                node_url = format!("http://127.0.0.1:{reverse}");
                tunnel_toml = format!(
                    "[tunnel]\nhub = \"127.0.0.1:{ssh_port}\"\nuser = \"{}\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\n",
                    user.trim(),
                    identity.display(),
                    known_hosts.display()
                );
                hub_ssh_toml = String::new();
                node_key_line = String::new();
            }
            Transport::Direct => {
                node_url = format!("{scheme}://127.0.0.1:{node_api}");
                tunnel_toml = String::new();
                hub_ssh_toml = String::new();
                node_key_line = String::new();
            }
        }
        let tunnel_toml = if tunnel_toml.is_empty() {
            tunnel_toml
        } else {
            // The hub's range forwarded from a shifted local range (both on this machine), and
            // the hub's way back to the node's API.
            format!(
                "{tunnel_toml}forward_range = \"{node_base}-{}:{hub_base}\"\nreverse = \"{reverse}:{node_api}\"\n",
                node_base + ports - 1
            )
        };
        let node_config = d.join("node.toml");
        std::fs::write(
            &node_config,
            format!(
                "listen = \"127.0.0.1:{node_api}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\nrestore_dir = \"{}\"\n{api_tls}{}\n\
                 [copy]\nretry_window_s = 30\n{}\n{tunnel_toml}{vm_toml}",
                d.join("node-token").display(),
                d.join("node-state").display(),
                d.join("restores").display(),
                opts.node,
                opts.copy,
            ),
        )
        .unwrap();
        let hub_config = d.join("hub.toml");
        std::fs::write(
            &hub_config,
            format!(
                "listen = \"127.0.0.1:{hub_api}\"\nrepo = \"{}\"\nreplicas = \"{}\"\nnbd_ports = \"{hub_base}-{}\"\n\
                 nbd_host = \"127.0.0.1\"\ntoken_file = \"{}\"\nstall_timeout_s = 20\n{api_tls}{}\n{hub_ssh_toml}\
                 [[node]]\nname = \"n1\"\nurl = \"{node_url}\"\ntoken_file = \"{}\"\n{node_key_line}",
                d.join("repo").display(),
                d.join("replicas").display(),
                hub_base + ports - 1,
                d.join("hub-token").display(),
                opts.hub,
                d.join("node-token").display(),
            ),
        )
        .unwrap();
        let wrap = match opts.repo_tmpfs_mib {
            Some(mib) => {
                std::fs::create_dir_all(d.join("repo")).unwrap();
                vec![
                    "unshare".into(),
                    "-rm".into(),
                    "sh".into(),
                    "-c".into(),
                    format!("mount -t tmpfs -o size={mib}m tmpfs '{}' && exec \"$0\" \"$@\"", d.join("repo").display()),
                ]
            }
            None => Vec::new(),
        };
        let mut site = Self {
            dir,
            hub: None,
            node: None,
            sshd,
            hub_config,
            node_config,
            wrap,
            source_ext,
            hub_api,
            node_api,
            hub_token: String::new(),
            node_token: String::new(),
            nbd: (hub_base, hub_base + ports - 1),
            node_url,
            scheme,
            http: http.build().unwrap(),
        };
        site.start_node();
        site.node_token = std::fs::read_to_string(d.join("node-token")).unwrap().trim().to_string();
        site.start_hub();
        site.hub_token = std::fs::read_to_string(d.join("hub-token")).unwrap().trim().to_string();
        site.wait_node_reachable().await;
        site
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn source(&self, vm: &str, disk: usize) -> PathBuf {
        self.path().join("src").join(format!("{vm}-{disk}.{}", self.source_ext))
    }

    pub fn start_node(&mut self) {
        self.node = Some(serve_node(&self.node_config, self.node_api, "sendense-node"));
    }

    pub fn start_hub(&mut self) {
        let hub = env!("CARGO_BIN_EXE_sendense-hub");
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(hub);
                c
            }
            None => Command::new(hub),
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(&self.hub_config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(&mut child, self.hub_api, "sendense-hub");
        self.hub = Some(Process(child));
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill_node(&mut self) {
        if let Some(mut p) = self.node.take() {
            p.kill();
        }
    }

    pub fn kill_hub(&mut self) {
        if let Some(mut p) = self.hub.take() {
            p.kill();
        }
    }

    /// SIGTERM, as `systemctl stop` or `restart` sends, and wait for the hub to exit (successfully).
    pub fn stop_hub(&mut self) {
        stop_gracefully(self.hub.take(), "hub");
    }

    /// SIGTERM to the node, and wait for it to exit (successfully).
    pub fn stop_node(&mut self) {
        stop_gracefully(self.node.take(), "node");
    }

    /// The hub's pid (to look into its mount namespace).
    pub fn hub_pid(&self) -> u32 {
        self.hub.as_ref().map(|p| p.0.id()).unwrap_or(0)
    }

    /// The hub's configuration file (rewritten by tests of reloads).
    pub fn hub_config(&self) -> &Path {
        &self.hub_config
    }

    /// Send the hub a signal (`HUP`, ...), as `systemctl reload` does.
    pub fn signal_hub(&self, signal: &str) {
        signal_process(self.hub_pid(), signal);
    }

    /// The node's configuration file (rewritten by tests of reloads).
    pub fn node_config(&self) -> &Path {
        &self.node_config
    }

    /// Send the node a signal.
    pub fn signal_node(&self, signal: &str) {
        signal_process(self.node.as_ref().map_or(0, |p| p.0.id()), signal);
    }

    /// Where the hub sees `path` (inside its own mount namespace when it has one).
    pub fn as_hub_sees(&self, path: &Path) -> PathBuf {
        if self.wrap.is_empty() {
            return path.to_path_buf();
        }
        // unshare execs sh, which execs the hub: the same pid, the hub's namespace.
        PathBuf::from(format!("/proc/{}/root", self.hub_pid())).join(path.strip_prefix("/").unwrap())
    }

    pub async fn wait_node_reachable(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.hub("GET", "/api/v1/ports", None).await;
            assert_eq!(status, 200, "{body}");
            let url = &self.node_url;
            let r = self.http.get(format!("{url}/api/v1/vms")).bearer_auth(&self.node_token).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "the hub's way to the node ({url}) never opened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&self, base: u16, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}://127.0.0.1:{base}{path}", self.scheme))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A request to the hub's API with its token, to send later (and to outlive the site's borrow:
    /// one the hub may be killed under).
    pub fn hub_request(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method.parse().unwrap(), format!("{}://127.0.0.1:{}{path}", self.scheme, self.hub_api))
            .bearer_auth(&self.hub_token)
    }

    /// A call to the hub's API with its token.
    pub async fn hub(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(self.hub_api, &self.hub_token, method, path, body).await
    }

    /// A call to the node's API with its token.
    pub async fn node(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(self.node_api, &self.node_token, method, path, body).await
    }

    /// A raw request with any token and body (bad input).
    pub async fn raw(&self, to_hub: bool, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let port = if to_hub { self.hub_api } else { self.node_api };
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}://127.0.0.1:{port}{path}", self.scheme))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Until a hub job (`/api/v1/backups/ID` or `/api/v1/replications/ID`) is final.
    pub async fn wait(&self, path: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, v) = self.hub("GET", path, None).await;
            if matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{path} still {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Start a backup and return its id.
    pub async fn start_backup(&self, vm: &str, kind: &str) -> String {
        let (status, b) = self.hub("POST", "/api/v1/backups", Some(json!({"vm_name": vm, "backup_type": kind}))).await;
        assert_eq!(status, 202, "{b}");
        b["backup_id"].as_str().unwrap().to_string()
    }

    /// A backup to the end; the final view, which must say completed.
    pub async fn backup(&self, vm: &str, kind: &str) -> Value {
        let id = self.start_backup(vm, kind).await;
        let done = self.wait(&format!("/api/v1/backups/{id}")).await;
        assert_eq!(done["status"], "completed", "{done}");
        done
    }

    /// Start a replica run and return its id.
    pub async fn start_replica(&self, vm: &str) -> String {
        let (status, rep) = self.hub("POST", "/api/v1/replications", Some(json!({"vm_name": vm}))).await;
        assert_eq!(status, 202, "{rep}");
        rep["replication_id"].as_str().unwrap().to_string()
    }

    /// A replica run to the end; the final view, which must say completed.
    pub async fn replicate(&self, vm: &str) -> Value {
        let id = self.start_replica(vm).await;
        let done = self.wait(&format!("/api/v1/replications/{id}")).await;
        assert_eq!(done["status"], "completed", "{done}");
        done
    }

    /// Every qcow2 replica disk of `vm` is clean and equals its source.
    pub fn assert_replica_equals_sources(&self, vm: &str, disks: usize) {
        for i in 0..disks {
            let replica = self.path().join(format!("replicas/{vm}/disk-{}.qcow2", 2000 + i));
            assert_clean(&replica);
            assert_same(&self.source(vm, i), &replica);
        }
    }

    /// Until the hub's metrics hold `line`: all of them then.
    pub async fn wait_hub_metric(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, metrics) = self.hub("GET", "/metrics", None).await;
            let metrics = metrics.as_str().unwrap().to_string();
            if metrics.lines().any(|l| l == line) {
                return metrics;
            }
            assert!(Instant::now() < deadline, "no '{line}' in the metrics:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Until a disk of a running hub job has sent at least `bytes`.
    pub async fn wait_progress(&self, path: &str, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.hub("GET", path, None).await;
            let sent: u64 = v["disks"].as_array().into_iter().flatten().filter_map(|d| d["bytes_sent"].as_u64()).sum();
            if sent >= bytes {
                return;
            }
            assert_eq!(v["status"], "running", "{v}");
            assert!(Instant::now() < deadline, "no progress: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn ports_all_free(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, p) = self.hub("GET", "/api/v1/ports", None).await;
            if p["leased"].as_array().is_some_and(Vec::is_empty) {
                let (_, e) = self.hub("GET", "/api/v1/exports", None).await;
                assert_eq!(e, json!([]), "no export left open");
                return;
            }
            assert!(Instant::now() < deadline, "ports still leased: {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A backup's image of a disk.
    pub fn image(&self, vm: &str, backup_id: &str, disk: usize) -> PathBuf {
        self.as_hub_sees(&self.path().join("repo").join(vm).join(backup_id).join(format!("disk-{}.qcow2", 2000 + disk)))
    }

    /// Every disk of `vm` in `backup` equals its source, and qemu-img finds the image clean.
    pub fn assert_backup_equals_sources(&self, vm: &str, backup: &Value, disks: usize) {
        let id = backup["backup_id"].as_str().unwrap();
        for i in 0..disks {
            let img = self.image(vm, id, i);
            assert_clean(&img);
            assert_same(&self.source(vm, i), &img);
        }
    }

    /// Another `sendense-node` of this site (`Transport::Endpoint` only), `name` with `vm`
    /// (its disks beside the first node's, so [`Self::source`] finds them), its own key, API,
    /// reverse port and local forwards, `copy` its `[copy]` lines, started and tunnelling to the
    /// hub's endpoint once [`OtherNode::start`]ed. Not in hub.toml: [`OtherNode::table`] is its
    /// `[[node]]` table to add.
    pub fn other_node(&self, name: &str, vm: Vm<'_>, copy: &str) -> OtherNode {
        let d = self.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let key = d.join("key");
        ssh::keygen(&key);
        let first = std::fs::read_to_string(&self.node_config).unwrap();
        let from_first = |k: &str| -> String {
            first
                .lines()
                .find(|l| l.starts_with(&format!("{k} = ")))
                .unwrap_or_else(|| panic!("node.toml's {k}"))
                .to_string()
        };
        let (api, reverse) = (ssh::free_port(), ssh::free_port());
        let count = self.nbd.1 - self.nbd.0 + 1;
        let local = ssh::free_ports(count);
        let mut vm_toml = format!("[[vm]]\nname = \"{}\"\n", vm.0);
        for (i, mib) in vm.1.iter().enumerate() {
            let path = self.path().join("src").join(format!("{}-{i}.raw", vm.0));
            make_source(&path, *mib, 100 + i as u64);
            vm_toml += &format!("[[vm.disk]]\nkey = {}\nsource = \"{}\"\n", 2000 + i, path.display());
        }
        let config = d.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{api}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\nrestore_dir = \"{}\"\n\
                 [copy]\nretry_window_s = 30\n{copy}\n[tunnel]\n{}\nuser = \"node\"\nidentity = \"{}\"\n{}\n\
                 forward_range = \"{local}-{}:{}\"\nreverse = \"{reverse}:{api}\"\n{vm_toml}",
                d.join("token").display(),
                d.join("state").display(),
                d.join("restores").display(),
                from_first("hub"),
                key.display(),
                from_first("fingerprint"),
                local + count - 1,
                self.nbd.0,
            ),
        )
        .unwrap();
        // The token file the node makes at its first start, made here first for the table.
        let token = "other-node-token-0123456789abcdef".to_string();
        std::fs::write(d.join("token"), &token).unwrap();
        std::fs::set_permissions(d.join("token"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let table = format!(
            "\n[[node]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{reverse}\"\ntoken_file = \"{}\"\nkey = \"{}\"\n",
            d.join("token").display(),
            std::fs::read_to_string(key.with_extension("pub")).unwrap().trim()
        );
        OtherNode { process: None, config, api, token, table, http: reqwest::Client::new() }
    }

    /// Backups the hub lists for `vm`, newest first.
    pub async fn backups(&self, vm: &str) -> Vec<Value> {
        let (status, list) = self.hub("GET", &format!("/api/v1/backups?vm_name={vm}"), None).await;
        assert_eq!(status, 200, "{list}");
        list.as_array().unwrap().clone()
    }
}

/// A second node of a site ([`Site::start_other_node`]).
pub struct OtherNode {
    process: Option<Process>,
    config: PathBuf,
    api: u16,
    token: String,
    /// Its `[[node]]` table for hub.toml.
    pub table: String,
    http: reqwest::Client,
}

impl OtherNode {
    /// Start it: it serves its API and tunnels to the hub.
    pub fn start(&mut self) {
        self.process = Some(serve_node(&self.config, self.api, "the other sendense-node"));
    }

    /// `GET path` on its API with its token.
    pub async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("http://127.0.0.1:{}{path}", self.api)).bearer_auth(&self.token).send().await;
        let text = r.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}
