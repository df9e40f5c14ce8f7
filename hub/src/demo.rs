//! `sendense-hub demo`: the whole product on one machine, no setup, no root. A hub with its SSH
//! endpoint and a node with its tunnel (keys generated and the host key pinned for the run), the
//! real libraries over real sockets: a sample VM of two disks with random data, log text, zero
//! runs and holes; a full backup, a few blocks changed, an incremental (made by the hub's backup schedule,
//! run now through the API), a replica, a restore of the
//! incremental to new files through the tunnel, and a bit-for-bit check of everything against
//! the source; then the full backup merged into the incremental (retention dropping the oldest
//! point in time), which must verify again and stand alone; last, compression turned on by a
//! configuration reload, the backup rewritten compressed, smaller and verifying again. Progress is a line per disk while a
//! job runs; the end is a summary table and where the images are. It fails (exit 1) if any check
//! fails.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use node::api::NodeClient;
use serde_json::{json, Value};

use crate::client::HubClient;
use crate::config::{NodeSpec, Settings, SshFile};
use crate::jobs::Hub;

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the first disk (the second is half of it).
    pub disk_size: u64,
    /// Working directory (kept afterwards so the images can be looked at).
    pub dir: PathBuf,
}

/// A disk like a VM's: 1 MiB runs of random data, of log text, of zeroes, and holes, in a
/// repeating pattern.
fn make_disk(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let line = b"Nov 30 02:00:01 demo postgres[811]: LOG:  checkpoint complete: wrote 4711 buffers (3.6%)\n";
    let text: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let mut i = 0u64;
    while at < size {
        let len = (size - at).min(1 << 20) as usize;
        match i % 5 {
            0 => {
                for c in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all_at(buf.get(..len).unwrap_or_default(), at)?;
            }
            1 => f.write_all_at(text.get(..len).unwrap_or_default(), at)?,
            2 => f.write_all_at(&vec![0u8; len], at)?, // written zeroes
            _ => {}                                    // holes
        }
        at += len as u64;
        i += 1;
    }
    f.sync_all()?;
    Ok(())
}

fn human(bytes: u64) -> String {
    node::progress::human(bytes)
}

struct Api {
    client: HubClient,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        self.client.call(method, path, body).await
    }

    /// Start a job and follow it with a progress line per disk; returns the final view and time.
    async fn run(&self, label: &str, path: &str, body: Value) -> anyhow::Result<(Value, f64)> {
        let started = Instant::now();
        let (status, v) = self.call(reqwest::Method::POST, path, Some(body)).await?;
        ensure!(status == 202, "{label}: {status} {v}");
        let id = v["backup_id"].as_str().or(v["replication_id"].as_str()).unwrap_or_default().to_string();
        self.follow(label, path, &id, started).await
    }

    /// Run schedule `name` now and follow the backup it makes of the demo VM; returns the
    /// backup's final view, the time, and the schedule's view once its run ended.
    async fn run_schedule(&self, label: &str, name: &str) -> anyhow::Result<(Value, f64, Value)> {
        let started = Instant::now();
        let path = format!("/api/v1/schedules/{name}");
        let (status, v) = self.call(reqwest::Method::POST, &format!("{path}/run"), None).await?;
        ensure!(status == 202, "schedule {name}: {status} {v}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = loop {
            let (_, v) = self.call(reqwest::Method::GET, &path, None).await?;
            let run = if v["running"].is_object() { &v["running"] } else { &v["last_run"] };
            if let Some(id) = run["backups"][0]["backup_id"].as_str() {
                break id.to_string();
            }
            ensure!(v["last_run"]["ended_at"].is_null(), "schedule {name} made no backup: {v}");
            ensure!(Instant::now() < deadline, "schedule {name} did not start a backup: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (backup, secs) = self.follow(label, "/api/v1/backups", &id, started).await?;
        loop {
            let (_, v) = self.call(reqwest::Method::GET, &path, None).await?;
            if v["last_run"]["ended_at"].is_string() {
                return Ok((backup, secs, v));
            }
            ensure!(Instant::now() < deadline, "the run of schedule {name} did not end: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Follow job `id` under `path` to its end, a progress line per disk; it must complete.
    async fn follow(&self, label: &str, path: &str, id: &str, started: Instant) -> anyhow::Result<(Value, f64)> {
        let v = self.client.follow(label, path, id).await?;
        match v["status"].as_str() {
            Some("completed") => Ok((v, started.elapsed().as_secs_f64())),
            state => bail!("{label} {}: {}", state.unwrap_or("?"), v["error"]),
        }
    }
}

/// Run the demo; prints as it goes.
///
/// # Errors
/// A step or a check failed.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let dir = &opts.dir;
    node::files::create_private_dir(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    println!("sendense demo in {}", dir.display());

    // Keys for the run: the hub's host key (pinned by fingerprint on the node) and the node's.
    let host_key = russh_key()?;
    let node_key = russh_key()?;
    write_private(&dir.join("hub_host_ed25519"), &host_key)?;
    write_private(&dir.join("node_ed25519"), &node_key)?;
    let node_pub = node_key.public_key().to_openssh().context("encode the node key")?;
    // Empty (the node's key is in its [[node]] table) and ours alone, whatever the umask.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(dir.join("authorized_keys"));
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join("authorized_keys"))?;
    }
    let fingerprint = tunnel::hostkey::fingerprint(host_key.public_key());

    // The sample VM.
    let sources = [dir.join("vm-disk0.raw"), dir.join("vm-disk1.raw")];
    make_disk(&sources[0], opts.disk_size, 1)?;
    make_disk(&sources[1], (opts.disk_size / 2).max(1 << 20), 2)?;
    println!(
        "sample VM 'demo': disk 2000 {} and disk 2001 {} (random data, log text, zeroes, holes)",
        human(opts.disk_size),
        human((opts.disk_size / 2).max(1 << 20))
    );

    // Ports, one block so no two overlap: the hub's NBD range, the node's shifted forward of it,
    // SSH, both APIs, the reverse.
    let base = crate::ports::free_block(20).ok_or_else(|| anyhow::anyhow!("no block of 20 free ports on 127.0.0.1"))?;
    let (hub_nbd, node_nbd) = (base, base + 8);
    let (ssh_port, hub_api, node_api, reverse) = (base + 16, base + 17, base + 18, base + 19);

    // The hub, with a nightly schedule of every VM (at this time of day, twelve hours from now:
    // the demo runs it by hand).
    let at = jiff::Zoned::now().checked_add(jiff::SignedDuration::from_hours(12))?.strftime("%H:%M").to_string();
    let nightly = crate::schedule::Schedule::parse(crate::schedule::ScheduleFile {
        name: "nightly".into(),
        vms: vec!["*".into()],
        at: Some(vec![at]),
        tags: vec!["nightly".into()],
        ..crate::schedule::ScheduleFile::default()
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    let hub_token = "demo-token-".to_string() + &fingerprint.chars().rev().take(12).collect::<String>();
    let settings = Settings {
        listen: ([127, 0, 0, 1], hub_api).into(),
        repo: dir.join("hub/repo"),
        replicas: dir.join("hub/replicas"),
        nbd_ports: (hub_nbd, hub_nbd + 7),
        nbd_bind: [127, 0, 0, 1].into(),
        nbd_host: "127.0.0.1".into(),
        nbd_tls: None,
        api_tls: None,
        nodes: vec![NodeSpec {
            name: "demo-node".into(),
            url: format!("http://127.0.0.1:{reverse}"),
            token: None,
            key: Some(node_pub),
            nbd_peers: Vec::new(),
        }],
        token: hub_token.clone(),
        ssh: Some(SshFile {
            listen: format!("127.0.0.1:{ssh_port}"),
            host_key: dir.join("hub_host_ed25519"),
            authorized_keys: dir.join("authorized_keys"),
        }),
        stall_timeout: Duration::from_secs(60),
        unreachable_timeout: Duration::from_secs(crate::jobs::DEFAULT_UNREACHABLE_TIMEOUT_S),
        restore_idle: Duration::from_secs(600),
        replica_raw: false,
        direct_io: false,
        io_uring: false,
        nbd_local_users: vec![],
        retention: crate::retention::Policy::default(),
        verify_every: None,
        compress: false,
        max_chain: crate::jobs::DEFAULT_MAX_CHAIN,
        schedules: vec![nightly.clone()],
    };
    let hub = Hub::new(settings.clone()).map_err(|e| anyhow::anyhow!(e))?;
    let ssh = settings.ssh.as_ref().context("ssh settings")?;
    let endpoint = crate::endpoint::SshEndpoint::new(ssh, &settings, &settings.nodes, Arc::clone(&hub))
        .map_err(|e| anyhow::anyhow!(e))?;
    let ssh_listener = tokio::net::TcpListener::bind(("127.0.0.1", ssh_port)).await?;
    tokio::spawn(async move { endpoint.serve(ssh_listener).await });
    let api_listener = tokio::net::TcpListener::bind(("127.0.0.1", hub_api)).await?;
    hub.start_schedules();
    // Compression waits, off, until step 8 turns it on by a reload.
    tokio::spawn(Arc::clone(&hub).rewrite_loop());
    let demo_hub = Arc::clone(&hub);
    serve_api(api_listener, crate::http::router(hub));

    // The node, with its tunnel to the hub's endpoint.
    let mut tunnel = tunnel::ClientConfig::new(
        "127.0.0.1",
        ssh_port,
        "node",
        dir.join("node_ed25519"),
        tunnel::HostKeyPolicy::Fingerprint(fingerprint.clone()),
    );
    tunnel.forwards = tunnel::spec::parse_range(&format!("{node_nbd}-{}:{hub_nbd}", node_nbd + 7))?;
    tunnel.reverse = vec![tunnel::spec::parse_reverse(&format!("{reverse}:{node_api}"))?];
    tunnel.backoff_initial = Duration::from_millis(100);
    let vm = node::config::VmFile {
        disk: sources
            .iter()
            .enumerate()
            .map(|(i, p)| node::config::DiskFile {
                key: 2000 + i as u32,
                source: p.display().to_string(),
                format: None,
                dirty_bitmap: None,
            })
            .collect(),
        ..node::config::VmFile::new("demo")
    };
    let (copy, parallel_disks) =
        node::config::resolve_copy(&node::config::CopyFile::default()).map_err(|e| anyhow::anyhow!(e))?;
    let node_settings = node::config::Settings {
        listen: ([127, 0, 0, 1], node_api).into(),
        token: None,
        state_dir: dir.join("node/state"),
        restore_dir: Some(dir.join("node/restores")),
        nbd_hosts: node::config::NbdHosts::Only(Vec::new()),
        api_tls: None,
        nbd_tls: None,
        tunnel: Some(tunnel.clone()),
        vms: node::config::resolve_vms(vec![vm]).map_err(|e| anyhow::anyhow!(e))?,
        copy,
        parallel_disks,
    };
    let node_tunnel = tunnel::Tunnel::start(tunnel).await.context("node tunnel")?;
    ensure!(
        node_tunnel.wait_connected(Duration::from_secs(15)).await,
        "the node's tunnel did not come up: {:?}",
        node_tunnel.status()
    );
    let jobs = Arc::new(node::jobs::Jobs::new(Arc::new(node_settings)).through_tunnel(node_tunnel.dialer()));
    let state = Arc::new(node::http::AppState { jobs, tunnel: Some(node_tunnel) });
    let node_listener = tokio::net::TcpListener::bind(("127.0.0.1", node_api)).await?;
    serve_api(node_listener, node::http::router(state));
    println!("hub API 127.0.0.1:{hub_api}, SSH endpoint 127.0.0.1:{ssh_port} ({fingerprint}); node API 127.0.0.1:{node_api}, tunnel up, reverse 127.0.0.1:{reverse}");

    let api = Api { client: HubClient::new(&format!("http://127.0.0.1:{hub_api}"), hub_token, None)? };
    let deadline = Instant::now() + Duration::from_secs(15);
    while NodeClient::new(format!("http://127.0.0.1:{reverse}"), None)?.vms().await.is_err() {
        ensure!(Instant::now() < deadline, "the hub cannot reach the node through the reverse forward");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut rows: Vec<(String, u64, u64, f64)> = Vec::new();
    let record = |rows: &mut Vec<(String, u64, u64, f64)>, label: &str, v: &Value, secs: f64| {
        let disks = v["disks"].as_array().cloned().unwrap_or_default();
        let total = disks.iter().map(|d| d["bytes_total"].as_u64().unwrap_or(0)).sum();
        let sent = disks.iter().map(|d| d["bytes_sent"].as_u64().unwrap_or(0)).sum();
        rows.push((label.to_string(), total, sent, secs));
    };

    println!("\n1. full backup");
    let (full, secs) = api.run("full", "/api/v1/backups", json!({"vm_name": "demo", "backup_type": "full"})).await?;
    record(&mut rows, "full backup", &full, secs);
    let full_id = full["backup_id"].as_str().unwrap_or_default().to_string();

    println!("\n2. the guest writes: a few blocks change");
    for (i, off) in [(0usize, 4u64 << 20), (0, opts.disk_size / 2), (1, 1 << 20)] {
        let f = std::fs::OpenOptions::new().write(true).open(&sources[i])?;
        f.write_all_at(&[0xa5u8; 8192], off.min(std::fs::metadata(&sources[i])?.len().saturating_sub(8192)))?;
        f.sync_all()?;
    }

    println!(
        "\n3. incremental backup, by the hub's backup schedule 'nightly' ({}, every VM) run now (POST /api/v1/schedules/nightly/run)",
        nightly.describe()
    );
    let (incr, secs, schedule) = api.run_schedule("incremental", "nightly").await?;
    ensure!(
        incr["backup_type"] == "incremental" && incr["parent_id"] == full_id.as_str(),
        "not an incremental on the full: {incr}"
    );
    let last = &schedule["last_run"];
    ensure!(
        last["backups"].as_array().map(Vec::len) == Some(1) && last["backups"][0]["status"] == "completed",
        "the schedule's run: {schedule}"
    );
    println!(
        "  schedule nightly: run ended, the VM's backup completed; next run {}",
        schedule["next_run"].as_str().unwrap_or("?")
    );
    record(&mut rows, "incremental", &incr, secs);
    let incr_id = incr["backup_id"].as_str().unwrap_or_default().to_string();

    println!("\n4. replica");
    let (rep, secs) = api.run("replica", "/api/v1/replications", json!({"vm_name": "demo"})).await?;
    record(&mut rows, "replica", &rep, secs);

    println!("\n5. restore of the incremental to new files on the node, through the tunnel (one call to the hub)");
    let started = Instant::now();
    let restored: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("node/restores/restored-disk{i}.raw"))).collect();
    let destinations: serde_json::Map<String, Value> =
        (0..2).map(|i| ((2000 + i).to_string(), json!(restored[i].display().to_string()))).collect();
    let (status, restore) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/restores",
            Some(json!({"backup_id": incr_id, "destinations": destinations})),
        )
        .await?;
    ensure!(status == 201, "restore: {status} {restore}");
    let rid = restore["restore_id"].as_str().unwrap_or_default().to_string();
    let view = loop {
        let (_, v) = api.call(reqwest::Method::GET, &format!("/api/v1/restores/{rid}"), None).await?;
        if v["status"] != "running" {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(view["status"] == "completed", "restore failed: {view}");
    let disks = view["disks"].as_array().cloned().unwrap_or_default();
    let total = disks.iter().filter_map(|d| d["bytes_total"].as_u64()).sum();
    let sent = disks.iter().filter_map(|d| d["bytes_read"].as_u64()).sum();
    rows.push(("restore".into(), total, sent, started.elapsed().as_secs_f64()));

    println!("\n6. checks");
    let mut ok = true;
    // The node hashes what it restores as it writes it, and the hub compares that with the
    // backup's manifest: equal, or the restore did not reproduce the backup.
    for d in &disks {
        let matches = d["checksum_match"] == json!(true);
        ok &= matches;
        println!(
            "  disk {}: the node's checksum of the restore {} the backup's manifest",
            d["disk_key"],
            if matches { "matches" } else { "DOES NOT MATCH" }
        );
    }
    for (i, src) in sources.iter().enumerate() {
        let want = crate::verify::file_checksum(src, 64 << 10)?;
        let got = crate::verify::file_checksum(&restored[i], 64 << 10)?;
        let replica = dir.join(format!("hub/replicas/demo/disk-{}.qcow2", 2000 + i));
        let rep_sum = qcow2::Image::open(&replica)
            .map_err(anyhow::Error::from)
            .and_then(|img| Ok(crate::verify::image_checksum(&img, 64 << 10)?))?;
        let restore_ok = want == got;
        let replica_ok = want == rep_sum;
        ok &= restore_ok && replica_ok;
        println!(
            "  disk {}: restored copy {} the source; replica {} the source",
            2000 + i,
            if restore_ok { "equals" } else { "DIFFERS from" },
            if replica_ok { "equals" } else { "DIFFERS from" }
        );
    }
    for id in [&full_id, &incr_id] {
        let (_, v) = api.call(reqwest::Method::POST, &format!("/api/v1/backups/{id}/verify"), None).await?;
        ok &= v["ok"] == true;
        println!(
            "  backup {id}: verify {}",
            if v["ok"] == true { "ok (images clean, content matches the node's checksums)" } else { "FAILED" }
        );
    }

    // What an operator asks first: is every node in, is every VM backed up.
    let (_, nodes) = api.call(reqwest::Method::GET, "/api/v1/nodes", None).await?;
    let (_, vms) = api.call(reqwest::Method::GET, "/api/v1/vms", None).await?;
    let sessions = nodes[0]["tunnel_sessions"].as_array().map_or(0, Vec::len);
    let node_up = nodes[0]["reachable"] == true && nodes[0]["vms"][0]["name"] == "demo" && sessions > 0;
    let vm_protected = vms[0]["vm_name"] == "demo" && vms[0]["newest_backup"]["backup_id"] == json!(incr_id);
    let scheduled = vms[0]["backup_schedules"] == json!([nightly.name]);
    ok &= node_up && vm_protected && scheduled;
    println!(
        "  node {}: {} (GET /api/v1/nodes); VM demo: {} backups, the newest {}, {} (GET /api/v1/vms)",
        nodes[0]["name"].as_str().unwrap_or("?"),
        if node_up {
            format!("up, listing the VM through its tunnel ({sessions} SSH session(s) at the hub's endpoint)")
        } else {
            format!("NOT UP through its tunnel ({sessions} SSH session(s) at the hub's endpoint)")
        },
        vms[0]["backups"],
        if vm_protected { "the incremental" } else { "NOT THE INCREMENTAL" },
        if scheduled { format!("backed up by schedule {}", nightly.name) } else { "NOT IN ITS SCHEDULE".into() },
    );

    println!("\n7. retention: keep the newest backup (POST /api/v1/prune), the full one merged into the incremental");
    let started = Instant::now();
    let (status, v) = api
        .call(reqwest::Method::POST, "/api/v1/prune", Some(json!({"vm_name": "demo", "keep": 1, "dry_run": true})))
        .await?;
    ensure!(status == 200, "prune preview: {status} {v}");
    for b in v["backups"].as_array().cloned().unwrap_or_default() {
        let why = b["kept_by"].as_str().map_or_else(String::new, |r| format!(" ({r})"));
        println!("  would {} {}{why}", b["action"].as_str().unwrap_or("?"), b["backup_id"].as_str().unwrap_or("?"));
    }
    let (status, v) =
        api.call(reqwest::Method::POST, "/api/v1/prune", Some(json!({"vm_name": "demo", "keep": 1}))).await?;
    ensure!(status == 200 && v["removed"] == 1, "prune: {status} {v}");
    let gone = api.call(reqwest::Method::GET, &format!("/api/v1/backups/{full_id}"), None).await?.0 == 404;
    let (_, merged) = api.call(reqwest::Method::GET, &format!("/api/v1/backups/{incr_id}"), None).await?;
    let (_, v) = api.call(reqwest::Method::POST, &format!("/api/v1/backups/{incr_id}/verify"), None).await?;
    let stands_alone = (0..2).all(|i| {
        let image = dir.join("hub/repo/demo").join(&incr_id).join(format!("disk-{}.qcow2", 2000 + i));
        qcow2::Image::open(&image).is_ok_and(|img| img.header().backing_file.is_none())
    });
    let merge_ok = gone && v["ok"] == true && merged["parent_id"].is_null() && stands_alone;
    ok &= merge_ok;
    println!(
        "  backup {incr_id}: {} in {:.2}s",
        if merge_ok { "a full backup of its own now, verify ok" } else { "MERGE FAILED" },
        started.elapsed().as_secs_f64()
    );

    println!("\n8. compression: compress = \"zstd\" taken up by a configuration reload (SIGHUP in service)");
    let started = Instant::now();
    let reloaded = demo_hub.reload(&Settings { compress: true, ..settings.clone() }).map_err(|e| anyhow::anyhow!(e))?;
    ensure!(reloaded.applied == ["compress"], "reload: {reloaded:?}");
    let compressed = loop {
        let (_, v) = api.call(reqwest::Method::GET, &format!("/api/v1/backups/{incr_id}"), None).await?;
        if v["compressed"].is_object() {
            break v["compressed"].clone();
        }
        ensure!(started.elapsed() < Duration::from_secs(300), "backup {incr_id} not compressed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, v) = api.call(reqwest::Method::POST, &format!("/api/v1/backups/{incr_id}/verify"), None).await?;
    let (data, stored) =
        (compressed["data_bytes"].as_u64().unwrap_or(0), compressed["stored_bytes"].as_u64().unwrap_or(0));
    let compress_ok = v["ok"] == true && stored < data;
    ok &= compress_ok;
    println!(
        "  backup {incr_id}: {} of data stored in {} ({:.1}x) in {:.2}s; verify {}",
        human(data),
        human(stored),
        data as f64 / stored.max(1) as f64,
        started.elapsed().as_secs_f64(),
        if v["ok"] == true { "ok" } else { "FAILED" }
    );

    println!("\n{:<14} {:>12} {:>12} {:>9} {:>12}", "run", "disk bytes", "sent", "time", "throughput");
    for (label, total, sent, secs) in &rows {
        println!(
            "{label:<14} {:>12} {:>12} {:>8.2}s {:>10}/s",
            human(*total),
            human(*sent),
            secs,
            human((*total as f64 / secs.max(1e-6)) as u64)
        );
    }
    let incr_dir = dir.join("hub/repo/demo").join(&incr_id);
    println!(
        "\nimages: backups in {}, replicas in {}",
        dir.join("hub/repo/demo").display(),
        dir.join("hub/replicas/demo").display()
    );
    println!("look at an image: qemu-img info --backing-chain {}", incr_dir.join("disk-2000.qcow2").display());
    ensure!(ok, "a check failed");
    println!("every check passed");
    Ok(())
}

fn russh_key() -> anyhow::Result<tunnel::PrivateKey> {
    tunnel::PrivateKey::random(&mut rand::rng(), tunnel::KeyAlgorithm::Ed25519).context("generate a key")
}

fn write_private(path: &Path, key: &tunnel::PrivateKey) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = key.to_openssh(tunnel::LineEnding::LF).context("encode a key")?;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// An API served in plain HTTP on loopback, as the services serve theirs, for the demo's life.
fn serve_api(listener: tokio::net::TcpListener, router: axum::Router) {
    tokio::spawn(node::api_server::serve(listener, None, router, Default::default(), std::future::pending()));
}
