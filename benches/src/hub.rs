//! `hub` section: the hub against the old hub's way of doing the same work, in one run.
//!
//! - Start latency: from `POST /api/v1/backups` for a 4-disk VM to the hub's answer, which comes
//!   after the images exist, the four exports accept connections and the node has accepted
//!   the job, against the old way's part of that: `qemu-img create` and one `qemu-nbd` spawned
//!   per disk, until each accepts a connection (the node call not even counted).
//! - Idle memory: the hub serving 101 read-only exports (a restore of a 101-disk backup)
//!   against 101 `qemu-nbd` processes serving the same images; proportional set size (PSS,
//!   from `/proc/PID/smaps_rollup`), so shared libraries are not counted 101 times.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::report::Report;

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn free_ports(n: u16) -> anyhow::Result<u16> {
    for _ in 0..500 {
        let base = free_port()?;
        if base < 65000 - n && (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free ports")
}

pub fn wait_port(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = child.try_wait()? {
            bail!("process exited before listening on {port}: {s}");
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn pss_kib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pair {
    _node: Proc,
    hub: Proc,
    hub_cmd: Vec<String>,
    hub_port: u16,
    url: String,
    token: String,
    http: reqwest::Client,
}

/// A node serving `vm` with `disks` sparse disks of `mib` MiB, and a hub driving it directly.
fn start_pair(bin: &Path, dir: &Path, disks: usize, mib: u64, ports: u16) -> anyhow::Result<Pair> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut spec = String::from("vm=");
    for i in 0..disks {
        let p = dir.join(format!("src-{i}.raw"));
        let f = std::fs::File::create(&p)?;
        f.set_len(mib << 20)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 65536], 0)?;
        spec.push_str(&format!("{}{}:{}", if i == 0 { "" } else { "," }, 2000 + i, p.display()));
    }
    let node_port = free_port()?;
    let mut node = Command::new(bin.with_file_name("sendense-node"))
        .args(["serve", "--listen", &format!("127.0.0.1:{node_port}"), "--vm", &spec])
        .arg("--state-dir")
        .arg(dir.join("node-state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("sendense-node")?;
    wait_port(node_port, &mut node)?;
    let node = Proc(node);
    let hub_port = free_port()?;
    let base = free_ports(ports)?;
    let hub_cmd: Vec<String> = vec![
        bin.with_file_name("sendense-hub").display().to_string(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{hub_port}"),
        "--nbd-ports".into(),
        format!("{base}-{}", base + ports - 1),
        "--node-url".into(),
        format!("http://127.0.0.1:{node_port}"),
        "--repo".into(),
        dir.join("repo").display().to_string(),
        "--replicas".into(),
        dir.join("replicas").display().to_string(),
        "--token-file".into(),
        dir.join("token").display().to_string(),
    ];
    let hub = spawn_hub(&hub_cmd, hub_port)?;
    let token = std::fs::read_to_string(dir.join("token"))?.trim().to_string();
    Ok(Pair {
        _node: node,
        hub,
        hub_cmd,
        hub_port,
        url: format!("http://127.0.0.1:{hub_port}"),
        token,
        http: reqwest::Client::new(),
    })
}

fn spawn_hub(cmd: &[String], port: u16) -> anyhow::Result<Proc> {
    let (program, args) = cmd.split_first().context("empty command")?;
    let mut hub = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("sendense-hub")?;
    wait_port(port, &mut hub)?;
    Ok(Proc(hub))
}

impl Pair {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn wait_done(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, v) = self.call(reqwest::Method::GET, &format!("/api/v1/backups/{id}"), None).await?;
            match v["status"].as_str() {
                Some("completed") => return Ok(v),
                Some("failed" | "cancelled") => bail!("backup {id}: {v}"),
                _ => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "backup {id} did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The old hub's part: create the qcow2 images and spawn one qemu-nbd per disk until each
/// accepts connections.
fn old_way_start(dir: &Path, disks: usize, mib: u64) -> anyhow::Result<(f64, Vec<Proc>)> {
    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..disks {
        let img = dir.join(format!("old-{i}.qcow2"));
        let _ = std::fs::remove_file(&img);
        let ok =
            Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg(format!("{mib}M")).status()?;
        anyhow::ensure!(ok.success(), "qemu-img create");
        let port = free_port()?;
        let mut c = Command::new("qemu-nbd")
            .args([
                "-f",
                "qcow2",
                "-x",
                &format!("vm-disk{i}"),
                "-p",
                &port.to_string(),
                "-b",
                "127.0.0.1",
                "--shared=10",
                "-t",
            ])
            .arg(&img)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_port(port, &mut c)?;
        procs.push(Proc(c));
    }
    Ok((started.elapsed().as_secs_f64(), procs))
}

pub fn hub_section(bin: &Path, dir: &Path, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // Start latency, 4 disks.
        let base: PathBuf = dir.join("hub-start");
        let pair = start_pair(bin, &base, 4, 64, 8)?;
        for rep in 0..reps.max(5) {
            eprintln!("hub: start latency rep {}", rep + 1);
            let t = Instant::now();
            let (status, v) =
                pair.call(reqwest::Method::POST, "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "full"}))).await?;
            let secs = t.elapsed().as_secs_f64();
            anyhow::ensure!(status == 202, "POST /backups: {status} {v}");
            report.add("hub", "sendense-hub POST 4 disks", "ms", secs * 1e3);
            pair.wait_done(v["backup_id"].as_str().unwrap_or_default()).await?;
            let (secs, procs) = old_way_start(&base, 4, 64)?;
            report.add("hub", "qemu-img + 4 qemu-nbd", "ms", secs * 1e3);
            drop(procs);
        }
        report.ratio("hub", "qemu-img + 4 qemu-nbd", "sendense-hub POST 4 disks", "ms");
        drop(pair);

        // Idle memory, 101 exports.
        let base = dir.join("hub-idle");
        let pair = start_pair(bin, &base, 101, 16, 101)?;
        let (status, v) =
            pair.call(reqwest::Method::POST, "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "full"}))).await?;
        anyhow::ensure!(status == 202, "POST /backups (101 disks): {status} {v}");
        let id = v["backup_id"].as_str().unwrap_or_default().to_string();
        pair.wait_done(&id).await?;
        // A fresh hub process (the catalog comes back from the manifests), so that what the
        // backup's copy left in the allocator is not counted as idle-export memory.
        let mut pair = pair;
        pair.hub = Proc(Command::new("true").spawn()?);
        pair.hub = spawn_hub(&pair.hub_cmd, pair.hub_port)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let hub_pid = pair.hub.0.id();
        let before = pss_kib(hub_pid);
        let (status, r) = pair.call(reqwest::Method::POST, "/api/v1/restores", Some(json!({"backup_id": id}))).await?;
        anyhow::ensure!(status == 201, "POST /restores: {status} {r}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = pss_kib(hub_pid);
        report.add("hub", "sendense-hub 101 idle exports", "PSS MiB total", after / 1024.0);
        report.add("hub", "sendense-hub 101 idle exports", "PSS KiB per export", (after - before) / 101.0);
        report.add("hub", "sendense-hub no export", "PSS MiB total", before / 1024.0);
        let images: Vec<PathBuf> = (0..101).map(|i| base.join("repo/vm").join(&id).join(format!("disk-{}.qcow2", 2000 + i))).collect();
        let mut procs = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let port = free_port()?;
            let mut c = Command::new("qemu-nbd")
                .args(["-r", "-f", "qcow2", "-x", &format!("vm-disk{i}"), "-p", &port.to_string(), "-b", "127.0.0.1", "--shared=10", "-t"])
                .arg(img)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            wait_port(port, &mut c)?;
            procs.push(Proc(c));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let total: f64 = procs.iter().map(|p| pss_kib(p.0.id())).sum();
        report.add("hub", "101 qemu-nbd -r", "PSS MiB total", total / 1024.0);
        report.add("hub", "101 qemu-nbd -r", "PSS KiB per export", total / 101.0);
        report.ratio("hub", "101 qemu-nbd -r", "sendense-hub 101 idle exports", "PSS MiB total");
        report.note(
            "hub: start latency = POST /api/v1/backups answered (images created, 4 exports listening, node accepted the job) \
             against qemu-img create + spawning 4 qemu-nbd until each accepts (without any node call). Idle memory: PSS of the \
             whole hub process with a 101-disk restore open against the summed PSS of 101 qemu-nbd -r on the same images.",
        );
        anyhow::Ok(())
    })
}
