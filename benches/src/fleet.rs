//! Cost of an export: memory per idle export and time from "add export" to a client's finished
//! handshake, in-process, next to what one qemu-nbd process per export costs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::{ExportConfig, FileBackend, Server, ServerConfig};

use crate::report::{median, Report};

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Connect and finish a minimal handshake (greeting, flags, GO for `name`), like a client would.
fn handshake(port: u16, name: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    let mut out = 3u32.to_be_bytes().to_vec();
    let data = nbd_server::proto::handshake::encode_info_request(name, &[]);
    nbd_server::proto::handshake::OptionHeader::encode(&mut out, nbd_server::proto::consts::opt::GO, &data);
    s.write_all(&out)?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let h = nbd_server::proto::handshake::OptionReplyHeader::parse(&h)?;
        let mut d = vec![0u8; h.length as usize];
        s.read_exact(&mut d)?;
        if h.reply == nbd_server::proto::consts::rep::ACK {
            return Ok(());
        }
        anyhow::ensure!(h.reply & 0x8000_0000 == 0, "GO refused: {:#x}", h.reply);
    }
}

pub fn fleet_section(dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let fleet_dir = dir.join("fleet");
    std::fs::create_dir_all(&fleet_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pid = std::process::id();
    let count = 1000usize;
    let files: Vec<_> = (0..count)
        .map(|i| {
            let p = fleet_dir.join(format!("d{i}.raw"));
            std::fs::File::create(&p).and_then(|f| f.set_len(1 << 30)).map(|_| p)
        })
        .collect::<Result<_, _>>()?;

    let server = Server::new(ServerConfig::default());
    // Warm up the allocator and runtime so the baseline is not the first-use cost.
    runtime.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        server.add_export(ExportConfig::new("warm", Arc::new(FileBackend::open(&files[0], false)?)))?;
        let port = l.local_addr()?.port();
        let s = server.clone();
        let t = tokio::spawn(async move { s.serve_export(l, "warm").await });
        tokio::task::spawn_blocking(move || handshake(port, "warm")).await??;
        t.abort();
        anyhow::Ok(())
    })?;
    let before = rss_kib(pid);
    let mut add_to_ready = Vec::new();
    let mut tasks = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let name = format!("vm{i}-disk0");
        let (port, ms, task) = runtime.block_on(async {
            let started = Instant::now();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = listener.local_addr()?.port();
            server.add_export(
                ExportConfig::new(name.clone(), Arc::new(FileBackend::open(file, false)?)).max_connections(10),
            )?;
            let s = server.clone();
            let n = name.clone();
            let task = tokio::spawn(async move { s.serve_export(listener, n).await });
            let n = name.clone();
            if i % 10 == 0 {
                tokio::task::spawn_blocking(move || handshake(port, &n)).await??;
                Ok::<_, anyhow::Error>((port, Some(started.elapsed().as_secs_f64() * 1e3), task))
            } else {
                Ok((port, None, task))
            }
        })?;
        let _ = port;
        if let Some(ms) = ms {
            add_to_ready.push(ms);
        }
        tasks.push(task);
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = rss_kib(pid);
    let per_export = (after - before) / count as f64;
    report.add("fleet", "sendense (in-process)", "KiB/export", per_export);
    report.add("fleet", "sendense (in-process)", "add->GO ms", median(&add_to_ready));
    for t in tasks {
        t.abort();
    }
    let _ = runtime.block_on(server.shutdown());

    // qemu-nbd: one process per export, spawn until a client finishes GO.
    let mut spawn_ms = Vec::new();
    let mut anon_kib = Vec::new();
    for file in files.iter().take(10) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let started = Instant::now();
        let mut child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "exp", "-p", &port.to_string(), "-b", "127.0.0.1", "--shared=10", "-t"])
            .arg(file)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while handshake(port, "exp").is_err() {
            anyhow::ensure!(Instant::now() < deadline, "qemu-nbd did not come up");
            std::thread::sleep(Duration::from_micros(200));
        }
        spawn_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(100));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let anon: f64 = status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        anon_kib.push(anon);
        let _ = child.kill();
        let _ = child.wait();
    }
    report.add("fleet", "qemu-nbd (process each)", "KiB/export", median(&anon_kib));
    report.add("fleet", "qemu-nbd (process each)", "add->GO ms", median(&spawn_ms));
    report.ratio("fleet", "sendense (in-process)", "qemu-nbd (process each)", "KiB/export");
    report.ratio("fleet", "sendense (in-process)", "qemu-nbd (process each)", "add->GO ms");
    report.note(format!(
        "fleet: {count} exports of sparse 1 GiB raw files added to one in-process server, each on its own listener \
         (VmRSS growth / {count}); add->GO = add_export + bind + serve until a client's NBD_OPT_GO is acknowledged \
         (every 10th export). qemu-nbd: RssAnon of one idle process, spawn until GO acknowledged."
    ));
    let _ = std::fs::remove_dir_all(&fleet_dir);
    Ok(())
}
