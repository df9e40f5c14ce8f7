//! `sendense-hub` as a process, with a node served by the node library on a real socket (the
//! same router `sendense-node serve` runs), judged by qemu-img and nbdcopy.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()));
    Command::new(found.unwrap_or_else(|| panic!("{name} is required; scripts/test.sh installs it")))
}

use testports::{free_port, free_ports};

/// 1 MiB of data every 4 MiB, holes elsewhere.
fn make_source(path: &Path, mib: u64, seed: u8) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib * MIB).unwrap();
    for at in (0..mib).step_by(4) {
        let data: Vec<u8> = (0..MIB as usize).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(at as u8)).collect();
        f.write_all_at(&data, at * MIB).unwrap();
    }
}

fn change(path: &Path, offset: u64, seed: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[seed; 4096], offset).unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    let out = tool("qemu-img").arg("compare").arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "{} vs {}: {}", a.display(), b.display(), String::from_utf8_lossy(&out.stdout));
}

fn assert_clean(img: &Path) {
    let out = tool("qemu-img").arg("check").arg(img).output().unwrap();
    assert!(out.status.success(), "qemu-img check {}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
}

/// A node on a real socket: the node library's router and jobs, two raw disks per VM.
async fn start_node(dir: &Path, vms: &[(&str, usize)], bandwidth: Option<&str>) -> String {
    let mut files = Vec::new();
    for (vm, disks) in vms {
        let mut v = node::config::VmFile::new(*vm);
        for i in 0..*disks {
            let path = dir.join(format!("{vm}-{i}.raw"));
            // Wide VMs (many disks) get small disks; the others 24, 32, ... MiB.
            let mib = if *disks > 8 { 4 } else { 24 + 8 * i as u64 };
            make_source(&path, mib, 3 + i as u8);
            v.disk.push(node::config::DiskFile {
                key: 2000 + i as u32,
                source: path.display().to_string(),
                format: None,
                dirty_bitmap: None,
            });
        }
        files.push(v);
    }
    let copy_file = node::config::CopyFile {
        bandwidth_limit: bandwidth.map(str::to_string),
        retry_window_s: Some(3),
        ..Default::default()
    };
    let (copy, parallel_disks) = node::config::resolve_copy(&copy_file).unwrap();
    let settings = node::config::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
        state_dir: dir.join("node-state"),
        restore_dir: None,
        nbd_hosts: node::config::NbdHosts::Only(Vec::new()),
        api_tls: None,
        nbd_tls: None,
        tunnel: None,
        vms: node::config::resolve_vms(files).unwrap(),
        copy,
        parallel_disks,
    };
    let jobs = Arc::new(node::jobs::Jobs::new(Arc::new(settings)));
    let state = Arc::new(node::http::AppState { jobs, tunnel: None });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, node::http::router(state)).await });
    url
}

struct HubProcess {
    child: Child,
    url: String,
    token: String,
    config: PathBuf,
}

impl HubProcess {
    fn start(dir: &Path, node_url: &str, ports: (u16, u16)) -> Self {
        Self::start_with(dir, node_url, ports, "")
    }

    /// The same with more `hub.toml` lines.
    fn start_with(dir: &Path, node_url: &str, ports: (u16, u16), extra: &str) -> Self {
        let config = dir.join("hub.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nrepo = \"{r}\"\nreplicas = \"{rp}\"\nnbd_ports = \"{}-{}\"\nnode_url = \"{node_url}\"\ntoken_file = \"{t}\"\nstall_timeout_s = 20\n{extra}\n",
                ports.0,
                ports.1,
                r = dir.join("repo").display(),
                rp = dir.join("replicas").display(),
                t = dir.join("hub-token").display(),
            ),
        )
        .unwrap();
        Self::spawn(config, port)
    }

    fn spawn(config: PathBuf, port: u16) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "sendense-hub exited");
            assert!(Instant::now() < deadline, "sendense-hub did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let token_path = config.with_file_name("hub-token");
        let token = std::fs::read_to_string(token_path).unwrap().trim().to_string();
        Self { child, url: format!("http://127.0.0.1:{port}"), token, config }
    }

    /// SIGKILL, then `meanwhile` (with the hub gone), then the same hub started again.
    fn restart_after_kill(mut self, meanwhile: impl FnOnce()) -> Self {
        let _ = Command::new("kill").args(["-9", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        meanwhile();
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let config = self.config.clone();
        std::mem::forget(self);
        Self::spawn(config, port)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let http = reqwest::Client::new();
        let mut req = http.request(method.parse().unwrap(), format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn wait(&self, path: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, v) = self.call("GET", path, None).await;
            if matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{path} still {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ports_all_free(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, p) = self.call("GET", "/api/v1/ports", None).await;
            if p["leased"].as_array().unwrap().is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "ports still leased: {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_verify_restore_and_replica_of_a_two_disk_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 2)], None).await;
    let base = free_ports(8);
    let hub = HubProcess::start(d, &node_url, (base, base + 7));
    let src = [d.join("pgtest1-0.raw"), d.join("pgtest1-1.raw")];

    let (status, full) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "pgtest1", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{full}");
    let full_id = full["backup_id"].as_str().unwrap().to_string();
    assert_eq!(full["disk_results"].as_array().unwrap().len(), 2);
    assert_eq!(full["disk_results"][0]["nbd_export_name"], "pgtest1-disk0");
    assert!(full["nbd_targets_string"]
        .as_str()
        .unwrap()
        .starts_with(&format!("2000:nbd://127.0.0.1:{base}/pgtest1-disk0,")));
    let done = hub.wait(&format!("/api/v1/backups/{full_id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    hub.ports_all_free().await;
    let full_dir = d.join("repo/pgtest1").join(&full_id);
    assert!(full_dir.join("manifest.json").exists());
    for (i, s) in src.iter().enumerate() {
        let img = full_dir.join(format!("disk-{}.qcow2", 2000 + i));
        // A completed backup names its images as a running one does.
        assert_eq!(done["disk_results"][i]["qcow2_path"], img.display().to_string(), "{done}");
        assert_clean(&img);
        assert_same(s, &img);
    }

    change(&src[0], 5 * MIB, 0xaa);
    change(&src[1], 17 * MIB, 0xbb);
    // Tags: checked, kept in order without repeats, shown, kept in the manifest, filtered on.
    for tags in [json!(["../x"]), json!((0..17).map(|i| format!("t{i}")).collect::<Vec<_>>())] {
        let body = json!({"vm_name": "pgtest1", "backup_type": "incremental", "tags": tags});
        let (status, v) = hub.call("POST", "/api/v1/backups", Some(body)).await;
        assert_eq!((status, &v["code"]), (400, &json!("bad_request")), "{tags}: {v}");
    }
    let body = json!({"vm_name": "pgtest1", "backup_type": "incremental", "tags": ["weekly", "pre-upgrade", "weekly"]});
    let (status, incr) = hub.call("POST", "/api/v1/backups", Some(body)).await;
    assert_eq!(status, 202, "{incr}");
    let incr_id = incr["backup_id"].as_str().unwrap().to_string();
    assert_eq!(incr["parent_id"], full_id.as_str());
    assert_eq!(incr["tags"], json!(["weekly", "pre-upgrade"]), "{incr}");
    let done = hub.wait(&format!("/api/v1/backups/{incr_id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["backup_type"], "incremental");
    assert_eq!(done["tags"], json!(["weekly", "pre-upgrade"]), "{done}");
    let manifest = std::fs::read_to_string(d.join("repo/pgtest1").join(&incr_id).join("manifest.json")).unwrap();
    assert!(manifest.contains("pre-upgrade"), "{manifest}");
    let (_, tagged) = hub.call("GET", "/api/v1/backups?vm_name=pgtest1&tag=weekly", None).await;
    let ids: Vec<&Value> = tagged.as_array().unwrap().iter().map(|b| &b["backup_id"]).collect();
    assert_eq!(ids, [&json!(incr_id)], "{tagged}");
    assert_eq!(hub.call("GET", "/api/v1/backups?tag=monthly", None).await.1, json!([]));
    let (status, v) = hub.call("GET", "/api/v1/backups?vm=pgtest1", None).await;
    assert_eq!((status, &v["code"]), (400, &json!("bad_request")), "an unknown filter is refused, not ignored: {v}");
    let incr_dir = d.join("repo/pgtest1").join(&incr_id);
    for (i, s) in src.iter().enumerate() {
        let img = incr_dir.join(format!("disk-{}.qcow2", 2000 + i));
        assert_clean(&img);
        assert_same(s, &img);
        let chain = tool("qemu-img").args(["info", "--backing-chain"]).arg(&img).output().unwrap();
        let chain = String::from_utf8_lossy(&chain.stdout);
        assert!(chain.contains(&format!("../{full_id}/disk-{}.qcow2", 2000 + i)), "{chain}");
    }
    let (status, v) = hub.call("POST", &format!("/api/v1/backups/{incr_id}/verify"), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{v}");
    let (status, _) = hub.call("DELETE", &format!("/api/v1/backups/{full_id}"), None).await;
    assert_eq!(status, 409, "the incremental depends on the full backup");
    let (_, list) = hub.call("GET", "/api/v1/backups?vm_name=pgtest1", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["backup_id"], incr_id.as_str(), "newest first");

    // Restore: read-only exports of the incremental, read with nbdcopy.
    let (status, r) = hub.call("POST", "/api/v1/restores", Some(json!({"backup_id": incr_id}))).await;
    assert_eq!(status, 201, "{r}");
    let out = d.join("restored-0.raw");
    let e = &r["exports"][0];
    let url = format!("nbd://127.0.0.1:{}/{}", e["nbd_port"], e["nbd_export_name"].as_str().unwrap());
    let ok = tool("nbdcopy").arg(&url).arg(&out).status().unwrap();
    assert!(ok.success());
    assert_same(&src[0], &out);
    let (_, exports) = hub.call("GET", "/api/v1/exports", None).await;
    assert!(exports.as_array().unwrap().iter().all(|e| e["read_only"] == true), "{exports}");
    let rid = r["restore_id"].as_str().unwrap();
    assert_eq!(hub.call("DELETE", &format!("/api/v1/restores/{rid}"), None).await.0, 200);
    hub.ports_all_free().await;

    // A replica, twice, in place.
    for round in 0..2u8 {
        if round == 1 {
            change(&src[1], 9 * MIB, 0xcc);
        }
        let (status, rep) = hub.call("POST", "/api/v1/replications", Some(json!({"vm_name": "pgtest1"}))).await;
        assert_eq!(status, 202, "{rep}");
        let id = rep["replication_id"].as_str().unwrap();
        assert_eq!(rep["backup_type"], if round == 0 { "full" } else { "incremental" });
        let done = hub.wait(&format!("/api/v1/replications/{id}")).await;
        assert_eq!(done["status"], "completed", "{done}");
        for (i, s) in src.iter().enumerate() {
            let img = d.join(format!("replicas/pgtest1/disk-{}.qcow2", 2000 + i));
            assert_clean(&img);
            assert_same(s, &img);
        }
    }
    assert!(!d.join("replicas/pgtest1/INCONSISTENT").exists());

    let (status, metrics) = hub.call("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("sendense_hub_backups_completed 2"), "{metrics}");
    let value = |series: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series}: {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let vm = "{vm=\"pgtest1\",node=\"default\"}";
    assert_eq!(value(&format!("sendense_hub_vm_backups{vm}")), 2.0);
    let stored: u64 = std::fs::read_dir(d.join("repo/pgtest1"))
        .unwrap()
        .flatten()
        .filter(|b| b.path().is_dir())
        .flat_map(|b| std::fs::read_dir(b.path()).unwrap().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".qcow2"))
        .map(|f| std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap()) * 512)
        .sum();
    assert_eq!(value(&format!("sendense_hub_vm_backup_bytes{vm}")), stored as f64, "the images' allocated bytes");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let last = value(&format!("sendense_hub_vm_last_backup_timestamp_seconds{vm}"));
    assert!(last <= now && now - last < 600.0, "newest backup completed at {last}, now {now}");
    let (size, avail) = (
        value("sendense_hub_filesystem_size_bytes{dir=\"repo\"}"),
        value("sendense_hub_filesystem_avail_bytes{dir=\"repo\"}"),
    );
    assert!(avail > 0.0 && size >= avail, "repo filesystem {avail} of {size}");
    value("sendense_hub_filesystem_avail_bytes{dir=\"replicas\"}");
    let (_, doc) = hub.call("GET", "/api/v1/openapi.json", None).await;
    assert!(doc["paths"]["/api/v1/backups"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exhaustion_cancel_and_a_killed_hub_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("small", 2), ("wide", 4), ("fleet", 101), ("one", 1)], Some("2M")).await;
    let base = free_ports(3);
    let hub = HubProcess::start(d, &node_url, (base, base + 2));

    // Tokens.
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{}/healthz", hub.url)).send().await.unwrap().status(), 200);
    let r = http.get(format!("{}/api/v1/backups", hub.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{}/api/v1/backups", hub.url)).bearer_auth("nope").send().await.unwrap();
    assert_eq!(r.status(), 401);
    // A JSON body sent as a form (`curl -d`): refused, naming what fixes it, and nothing started.
    let r = http
        .post(format!("{}/api/v1/backups", hub.url))
        .bearer_auth(&hub.token)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(r#"{"vm_name":"small","backup_type":"full"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let said = r.text().await.unwrap();
    assert!(said.contains("Content-Type: application/json") && said.contains("curl --json"), "{said}");

    // Names that must never reach a path.
    for name in ["../x", "", &"a".repeat(300), "a/b", ".hidden"] {
        let (status, body) =
            hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": name, "backup_type": "full"}))).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["code"], "bad_request");
    }
    assert_eq!(std::fs::read_dir(d.join("repo")).unwrap().count(), 0, "nothing was created");
    let (status, _) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "ghost", "backup_type": "full"}))).await;
    assert_eq!(status, 404);
    let (status, _) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "small", "backup_type": "weekly"}))).await;
    assert_eq!(status, 400);
    let (status, _) = hub.call("POST", "/api/v1/restores", Some(json!({"backup_id": "../../etc"}))).await;
    assert_eq!(status, 400);

    // Four disks, three ports: 503 naming the range, and nothing leaks.
    let (status, body) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "wide", "backup_type": "full"}))).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("{base}-{}", base + 2)), "{body}");
    hub.ports_all_free().await;
    assert_eq!(std::fs::read_dir(d.join("repo")).unwrap().count(), 0);

    // 101 disks in flight on the production-sized range (101 ports): the 102nd is refused.
    drop(hub);
    let base101 = free_ports(101);
    let _ = std::fs::remove_file(d.join("hub.toml"));
    let hub = HubProcess::start(d, &node_url, (base101, base101 + 100));
    let (status, b) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "fleet", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{b}");
    let fleet = b["backup_id"].as_str().unwrap().to_string();
    let (_, p) = hub.call("GET", "/api/v1/ports", None).await;
    assert_eq!((p["free"].as_u64(), p["leased"].as_array().map(Vec::len)), (Some(0), Some(101)), "{p}");
    let (_, exports) = hub.call("GET", "/api/v1/exports", None).await;
    assert_eq!(exports.as_array().unwrap().len(), 101);
    let (status, body) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "one", "backup_type": "full"}))).await;
    assert_eq!(status, 503, "the 102nd disk: {body}");
    assert!(body["error"].as_str().unwrap().contains("101 leased"), "{body}");
    assert!(!d.join("repo/one").exists(), "nothing created for the refused backup");
    assert_eq!(hub.call("DELETE", &format!("/api/v1/backups/{fleet}"), None).await.0, 200);
    let v = hub.wait(&format!("/api/v1/backups/{fleet}")).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    hub.ports_all_free().await;
    let (_, exports) = hub.call("GET", "/api/v1/exports", None).await;
    assert!(exports.as_array().unwrap().is_empty(), "{exports}");

    // Cancel mid-copy: exports closed, ports released, partial images removed.
    let (status, b) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "small", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let (status, _) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "small", "backup_type": "full"}))).await;
    assert_eq!(status, 409, "one job per VM");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = hub.call("GET", &format!("/api/v1/backups/{id}"), None).await;
        if v["disks"][0]["bytes_sent"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hub.call("DELETE", &format!("/api/v1/backups/{id}"), None).await.0, 200);
    let v = hub.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    hub.ports_all_free().await;
    assert!(!d.join("repo/small").join(&id).exists(), "partial images removed");

    // A replica run is cancelled at its own path; a backup's path does not reach it, nor the
    // other way round.
    let (status, r) = hub.call("POST", "/api/v1/replications", Some(json!({"vm_name": "small"}))).await;
    assert_eq!(status, 202, "{r}");
    let rid = r["replication_id"].as_str().unwrap().to_string();
    for path in [format!("/api/v1/backups/{rid}"), format!("/api/v1/replications/{id}")] {
        assert_eq!(hub.call("GET", &path, None).await.0, 404, "{path}");
        assert_eq!(hub.call("DELETE", &path, None).await.0, 404, "{path}");
    }
    assert_eq!(hub.call("DELETE", &format!("/api/v1/replications/{rid}"), None).await.0, 200);
    let v = hub.wait(&format!("/api/v1/replications/{rid}")).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    hub.ports_all_free().await;
    assert_eq!(
        hub.call("DELETE", &format!("/api/v1/replications/{rid}"), None).await.0,
        200,
        "a finished run is forgotten"
    );
    assert_eq!(hub.call("GET", &format!("/api/v1/replications/{rid}"), None).await.0, 404);

    // Killed with SIGKILL mid-job as if while starting it, before its record named the run (the
    // record removed here): after the restart no half backup is listed and no port leased. (A run
    // the record names is taken up: `hub/tests/e2e`.)
    let (status, b) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "small", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(d.join("repo/small").join(&id).exists());
    let hub = hub.restart_after_kill(|| {
        let _ = std::fs::remove_file(d.join("repo/.jobs-handed-over.json"));
    });
    let (_, list) = hub.call("GET", "/api/v1/backups", None).await;
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    assert!(!d.join("repo/small").join(&id).exists(), "the interrupted backup was removed at start");
    let (_, p) = hub.call("GET", "/api/v1/ports", None).await;
    assert_eq!(p["free"], 101, "{p}");
}

fn keygen(path: &Path) {
    let out = tool("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Read what a freshly accepted connection through `port` says first (up to 8 bytes).
async fn first_bytes(port: u16) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 8];
    let mut got = 0;
    while got < 8 {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_through_the_hub_endpoint_each_reach_only_their_own_ports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in ["host", "a", "b"] {
        keygen(&d.join(format!("{k}_key")));
    }
    std::fs::write(d.join("authorized_keys"), "").unwrap();
    std::fs::set_permissions(d.join("authorized_keys"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Node A reaches the hub's API through the tunnel's reverse forward, as in production.
    let a_api = start_node(&d.join("a-files").tap_mkdir(), &[("vma", 1)], Some("2M")).await;
    let b_api = start_node(&d.join("b-files").tap_mkdir(), &[("vmb", 1)], None).await;
    let a_reverse = free_port();
    let ssh_port = free_port();
    let api_port = free_port();
    let base = free_ports(4);
    let key = |k: &str| std::fs::read_to_string(d.join(format!("{k}_key.pub"))).unwrap().trim().to_string();
    let config = d.join("hub.toml");
    // The exports listen on another address than the endpoint's loopback (as on a hub whose
    // direct-TCP nodes reach it on its LAN address): tunnelled nodes still reach them, because
    // the endpoint hands their channels to the NBD server in process.
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{api_port}\"\nrepo = \"{r}\"\nreplicas = \"{rp}\"\nnbd_ports = \"{base}-{}\"\ntoken_file = \"{t}\"\n\
             nbd_bind = \"127.0.0.2\"\nnbd_host = \"127.0.0.2\"\n\
             [ssh]\nlisten = \"127.0.0.1:{ssh_port}\"\nhost_key = \"{hk}\"\nauthorized_keys = \"{ak}\"\n\
             [[node]]\nname = \"a\"\nurl = \"http://127.0.0.1:{a_reverse}\"\nkey = \"{ka}\"\n\
             [[node]]\nname = \"b\"\nurl = \"{b_api}\"\nkey = \"{kb}\"\n",
            base + 3,
            r = d.join("repo").display(),
            rp = d.join("replicas").display(),
            t = d.join("hub-token").display(),
            hk = d.join("host_key").display(),
            ak = d.join("authorized_keys").display(),
            ka = key("a"),
            kb = key("b"),
        ),
    )
    .unwrap();
    let hub = HubProcess::spawn(config, api_port);
    let fingerprint = {
        let out = tool("ssh-keygen").arg("-lf").arg(d.join("host_key.pub")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
    };
    let a_local: std::net::SocketAddr = a_api.trim_start_matches("http://").parse().unwrap();
    let tunnel_for = |who: &str, forward: Vec<(u16, u16)>, reverse: Option<(u16, std::net::SocketAddr)>| {
        let mut c = tunnel::ClientConfig::new(
            "127.0.0.1",
            ssh_port,
            "node",
            d.join(format!("{who}_key")),
            tunnel::HostKeyPolicy::Fingerprint(fingerprint.clone()),
        );
        c.forwards = forward
            .into_iter()
            .map(|(local, remote)| {
                tunnel::spec::LocalForward::new(
                    std::net::SocketAddr::from(([127, 0, 0, 1], local)),
                    "127.0.0.1",
                    remote,
                )
            })
            .collect();
        c.reverse = reverse
            .into_iter()
            .map(|(remote, local)| tunnel::spec::ReverseForward::new("127.0.0.1", remote, local))
            .collect();
        c
    };
    // A's tunnel: the reverse channel to its API (nothing else yet).
    let ta = tunnel::Tunnel::start(tunnel_for("a", vec![], Some((a_reverse, a_local)))).await.unwrap();
    assert!(ta.wait_connected(Duration::from_secs(10)).await, "{:?}", ta.status());
    // B may not take A's reverse port.
    let b_api_addr: std::net::SocketAddr = b_api.trim_start_matches("http://").parse().unwrap();
    let tb_rev = tunnel::Tunnel::start(tunnel_for("b", vec![], Some((a_reverse, b_api_addr)))).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tb_rev.status().last_error.unwrap_or_default().contains("refused reverse forward") {
        assert!(Instant::now() < deadline, "B's reverse forward of A's port was not refused: {:?}", tb_rev.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A refused reverse forward is a failed connection (retried later), never "connected".
    assert!(tb_rev.status().connected_since.is_none(), "{:?}", tb_rev.status());
    drop(tb_rev);

    // A backup of A's VM: the hub reaches node A only through A's reverse forward.
    let (status, b) = hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "vma", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{b}");
    let port = b["disk_results"][0]["nbd_port"].as_u64().unwrap() as u16;
    let (la, lb) = (free_port(), free_port());
    let ta2 = tunnel::Tunnel::start(tunnel_for("a", vec![(la, port)], None)).await.unwrap();
    let tb = tunnel::Tunnel::start(tunnel_for("b", vec![(lb, port)], None)).await.unwrap();
    assert!(ta2.wait_connected(Duration::from_secs(10)).await && tb.wait_connected(Duration::from_secs(10)).await);
    assert_eq!(first_bytes(la).await, b"NBDMAGIC", "node A reaches its own export through the endpoint");
    assert!(first_bytes(lb).await.is_empty(), "node B is refused on node A's leased port");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let (status, _) = hub.call("DELETE", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(status, 200);
    hub.wait(&format!("/api/v1/backups/{id}")).await;
    hub.ports_all_free().await;
    assert!(first_bytes(la).await.is_empty(), "a released port is closed to its former node too");
}

/// `sendense-hub serve` with a hub.toml of `extra` (beside listen, repo and token_file) in `d`,
/// which must refuse to start: exit status 1, nothing made. Its stderr.
fn refused_at_start(d: &std::path::Path, extra: &str) -> String {
    let config = d.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\nrepo = \"{}\"\ntoken_file = \"{}\"\n{extra}\n",
            d.join("repo").display(),
            d.join("token").display()
        ),
    )
    .unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_sendense-hub")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!d.join("repo").exists(), "nothing made before the config is whole");
    stderr
}

/// An `api_tls` directory that does not load (or holds half a client certificate to present to
/// nodes), client certificates asked for without it, or a node url that is not HTTP(S), is
/// refused at start the same way: exit status 1 and one line naming it.
#[test]
fn a_bad_api_tls_or_node_url_stops_the_hub_at_start_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-certificates").tap_mkdir();
    let pki = testpki::Pki::new();
    let half = dir.path().join("half-a-client").tap_mkdir();
    for name in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.dir("server").join(name), half.join(name)).unwrap();
    }
    std::fs::copy(pki.dir("client").join("client-cert.pem"), half.join("client-cert.pem")).unwrap();
    for (extra, expected) in [
        (format!("api_tls = \"{}\"", empty.display()), "server-cert.pem".to_string()),
        ("api_client_certs = true".into(), "api_client_certs needs api_tls".into()),
        (
            format!("api_tls = \"{}\"\n[[node]]\nname = \"n1\"\nurl = \"https://127.0.0.1:8081\"", half.display()),
            "node n1: ".to_string() + &half.join("client-key.pem").display().to_string(),
        ),
        (
            "[[node]]\nname = \"n1\"\nurl = \"ftp://node1:8081\"".into(),
            "node n1: url 'ftp://node1:8081' must be".into(),
        ),
        ("node_url = \"node1:8081\"".into(), "node default: url 'node1:8081' must be".into()),
    ] {
        let stderr = refused_at_start(dir.path(), &extra);
        assert!(stderr.contains(&expected) && stderr.lines().count() == 1, "{extra}: {stderr}");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn the_demo_runs_the_whole_product_and_every_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .args(["demo", "--disk-size", "24M", "--dir"])
        .arg(dir.path().join("demo"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every check passed"), "{stdout}");
    assert!(stdout.contains("restored copy equals the source; replica equals the source"), "{stdout}");
    assert_eq!(
        stdout.matches("the node's checksum of the restore matches the backup's manifest").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("a full backup of its own now, verify ok"), "{stdout}");
    assert!(stdout.contains("up, listing the VM through its tunnel ("), "{stdout}");
    assert!(
        stdout.contains(
            "at the hub's endpoint) (GET /api/v1/nodes); VM demo: 2 backups, the newest the incremental, \
             backed up by schedule nightly (GET /api/v1/vms)"
        ),
        "{stdout}"
    );
    // The images it leaves behind are qemu's to judge too: the full backup merged away, the
    // incremental standing alone and equal to the disks.
    let repo = dir.path().join("demo/hub/repo/demo");
    let backups: Vec<_> =
        std::fs::read_dir(&repo).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    for i in 0..2 {
        let image = backups[0].join(format!("disk-{}.qcow2", 2000 + i));
        assert_clean(&image);
        assert_same(&dir.path().join(format!("demo/vm-disk{i}.raw")), &image);
    }
}

/// Two nodes each with a VM named `web` (different machines, different disks): each node's
/// backups chain only on its own, every backup equals its own node's disks, and the replica set
/// of `web` (one directory per VM name) is refused to the node that did not make it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_a_vm_of_the_same_name_keep_their_backups_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a_files, b_files) = (d.join("a-files").tap_mkdir(), d.join("b-files").tap_mkdir());
    let a_api = start_node(&a_files, &[("web", 1)], None).await;
    let b_api = start_node(&b_files, &[("web", 1)], None).await;
    // Different machines: B's disk holds other data than A's.
    for at in 0..6u64 {
        change(&b_files.join("web-0.raw"), at * 4 * MIB, 0x0b);
    }
    let api_port = free_port();
    let base = free_ports(4);
    let config = d.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{api_port}\"\nrepo = \"{r}\"\nreplicas = \"{rp}\"\nnbd_ports = \"{base}-{}\"\ntoken_file = \"{t}\"\n\
             [[node]]\nname = \"a\"\nurl = \"{a_api}\"\n[[node]]\nname = \"b\"\nurl = \"{b_api}\"\n\
             [[schedule]]\nname = \"both\"\nvms = [\"*\"]\nat = [\"03:00\"]\nparallel = 2\n",
            base + 3,
            r = d.join("repo").display(),
            rp = d.join("replicas").display(),
            t = d.join("hub-token").display(),
        ),
    )
    .unwrap();
    let hub = HubProcess::spawn(config, api_port);
    let backup = |node: &'static str, kind: &'static str| {
        let hub = &hub;
        async move {
            let body = json!({"vm_name": "web", "backup_type": kind, "node": node});
            let (status, b) = hub.call("POST", "/api/v1/backups", Some(body)).await;
            assert_eq!(status, 202, "{b}");
            let done = hub.wait(&format!("/api/v1/backups/{}", b["backup_id"].as_str().unwrap())).await;
            assert_eq!(done["status"], "completed", "{done}");
            done
        }
    };
    let image = |b: &Value| d.join("repo/web").join(b["backup_id"].as_str().unwrap()).join("disk-2000.qcow2");
    let a_full = backup("a", "full").await;
    let b_full = backup("b", "full").await;
    change(&a_files.join("web-0.raw"), 5 * MIB, 0xa1);
    let a_incr = backup("a", "incremental").await;
    assert_eq!(
        (&a_incr["backup_type"], &a_incr["parent_id"]),
        (&json!("incremental"), &a_full["backup_id"]),
        "{a_incr}"
    );
    change(&b_files.join("web-0.raw"), 9 * MIB, 0xb1);
    let b_incr = backup("b", "incremental").await;
    assert_eq!(
        (&b_incr["backup_type"], &b_incr["parent_id"]),
        (&json!("incremental"), &b_full["backup_id"]),
        "{b_incr}"
    );
    for (b, files) in [(&a_full, &a_files), (&b_full, &b_files), (&a_incr, &a_files), (&b_incr, &b_files)] {
        assert_clean(&image(b));
        if b["backup_id"] == a_incr["backup_id"] || b["backup_id"] == b_incr["backup_id"] {
            assert_same(&files.join("web-0.raw"), &image(b));
        }
    }
    let (status, rep) = hub.call("POST", "/api/v1/replications", Some(json!({"vm_name": "web", "node": "a"}))).await;
    assert_eq!(status, 202, "{rep}");
    let done = hub.wait(&format!("/api/v1/replications/{}", rep["replication_id"].as_str().unwrap())).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, rep) = hub.call("POST", "/api/v1/replications", Some(json!({"vm_name": "web", "node": "b"}))).await;
    assert_eq!(status, 409, "{rep}");
    assert!(rep["error"].as_str().is_some_and(|e| e.contains("node a")), "{rep}");
    assert_same(&a_files.join("web-0.raw"), &d.join("replicas/web/disk-2000.qcow2"));

    // A schedule of every VM, two at a time: both nodes' `web` backed up in the one run, one
    // after the other (one job per VM name), neither skipped; each on its own node's chain.
    change(&a_files.join("web-0.raw"), 2 * MIB, 0xa2);
    change(&b_files.join("web-0.raw"), 3 * MIB, 0xb2);
    let (status, v) = hub.call("POST", "/api/v1/schedules/both/run", None).await;
    assert_eq!(status, 202, "{v}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let run = loop {
        let (_, v) = hub.call("GET", "/api/v1/schedules/both", None).await;
        if v["last_run"]["ended_at"].is_string() {
            break v["last_run"].clone();
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ran = run["backups"].as_array().unwrap();
    assert_eq!(ran.len(), 2, "{run}");
    for (node, files, parent) in [("a", &a_files, &a_incr), ("b", &b_files, &b_incr)] {
        let b = ran.iter().find(|b| b["node"] == node).unwrap_or_else(|| panic!("{run}"));
        assert_eq!((&b["vm_name"], &b["status"]), (&json!("web"), &json!("completed")), "{run}");
        let (_, done) = hub.call("GET", &format!("/api/v1/backups/{}", b["backup_id"].as_str().unwrap()), None).await;
        assert_eq!(done["parent_id"], parent["backup_id"], "{done}");
        assert_clean(&image(&done));
        assert_same(&files.join("web-0.raw"), &image(&done));
    }

    // A's VM brought back on B's machine: A's newest backup restored onto B's disk of it, in one
    // call to the hub.
    let onto = b_files.join("web-0.raw");
    let body = json!({"backup_id": a_incr["backup_id"], "node": "b", "destinations": {"2000": onto}});
    let (status, r) = hub.call("POST", "/api/v1/restores", Some(body)).await;
    assert_eq!((status, &r["node"]), (201, &json!("b")), "{r}");
    let path = format!("/api/v1/restores/{}", r["restore_id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let (_, v) = hub.call("GET", &path, None).await;
        if v["status"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((&done["status"], &done["disks"][0]["checksum_match"]), (&json!("completed"), &json!(true)), "{done}");
    assert_same(&onto, &image(&a_incr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_replicas_are_kept_in_place_and_stay_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 2)], None).await;
    let base = free_ports(4);
    let hub = HubProcess::start_with(d, &node_url, (base, base + 3), "replica_format = \"raw\"");
    let src = [d.join("pgtest1-0.raw"), d.join("pgtest1-1.raw")];
    for round in 0..2u8 {
        if round == 1 {
            change(&src[0], 3 * MIB, 0x11);
            change(&src[1], 20 * MIB, 0x22);
        }
        let (status, rep) = hub.call("POST", "/api/v1/replications", Some(json!({"vm_name": "pgtest1"}))).await;
        assert_eq!(status, 202, "{rep}");
        assert!(rep["disk_results"][0]["qcow2_path"].as_str().unwrap().ends_with("disk-2000.raw"), "{rep}");
        let id = rep["replication_id"].as_str().unwrap();
        let done = hub.wait(&format!("/api/v1/replications/{id}")).await;
        assert_eq!(done["status"], "completed", "{done}");
        for (i, s) in src.iter().enumerate() {
            let replica = d.join(format!("replicas/pgtest1/disk-{}.raw", 2000 + i));
            assert_same(s, &replica);
            let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&replica).unwrap()) * 512;
            assert!(allocated < std::fs::metadata(s).unwrap().len(), "holes stay holes in the raw replica");
        }
        if round == 1 {
            assert_eq!(done["disks"][0]["bytes_sent"], 64 << 10, "only the changed block travels: {done}");
        }
    }
}

/// Send `method path` with `body` on a raw connection and hang up `after` later, without reading
/// the answer (a killed `curl`, a script's timeout): hyper drops a request whose client is gone.
async fn hang_up(hub: &HubProcess, method: &str, path: &str, body: &Value, after: Duration) {
    use tokio::io::AsyncWriteExt;
    let addr = hub.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        hub.token,
        body.len()
    );
    s.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    tokio::time::sleep(after).await;
    let _ = s.shutdown().await;
}

/// Until no backup of `vm` is unfinished, no port leased and no export open.
async fn settled(hub: &HubProcess, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = hub.call("GET", &format!("/api/v1/backups?vm_name={vm}"), None).await;
        let (_, ports) = hub.call("GET", "/api/v1/ports", None).await;
        let (_, exports) = hub.call("GET", "/api/v1/exports", None).await;
        let (_, restores) = hub.call("GET", "/api/v1/restores", None).await;
        let unfinished = list
            .as_array()
            .unwrap()
            .iter()
            .any(|b| !matches!(b["status"].as_str(), Some("completed" | "failed" | "cancelled")));
        let idle = ports["leased"].as_array().unwrap().is_empty() && exports.as_array().unwrap().is_empty();
        if !unfinished && idle && restores.as_array().unwrap().is_empty() {
            return;
        }
        for r in restores.as_array().unwrap() {
            hub.call("DELETE", &format!("/api/v1/restores/{}", r["restore_id"].as_str().unwrap()), None).await;
        }
        assert!(Instant::now() < deadline, "left half done: {list} {ports} {exports} {restores}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_request_leaves_nothing_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 2)], None).await;
    let base = free_ports(4);
    let hub = HubProcess::start(d, &node_url, (base, base + 3));
    let full = json!({"vm_name": "pgtest1", "backup_type": "full"});
    let mut kept = None;
    // The hang-up lands at a different step of each start: finding the VM, making the files,
    // opening the exports, calling the node.
    for round in 0..24u64 {
        hang_up(&hub, "POST", "/api/v1/backups", &full, Duration::from_micros(round * 750)).await;
        // Whatever the hung-up start got to, the VM is free for the next one: at once, or once
        // the hung-up start's own backup, which runs to its end, has finished.
        let done = loop {
            settled(&hub, "pgtest1").await;
            let (status, b) = hub.call("POST", "/api/v1/backups", Some(full.clone())).await;
            if status == 202 {
                break hub.wait(&format!("/api/v1/backups/{}", b["backup_id"].as_str().unwrap())).await;
            }
            assert_eq!(status, 409, "round {round}: {b}");
            let holder = b["error"].as_str().unwrap().split_whitespace().nth(5).unwrap().to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, v) = hub.call("GET", &format!("/api/v1/backups/{holder}"), None).await;
                if matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                    break;
                }
                assert!(Instant::now() < deadline, "round {round}: the VM is held by {holder}, a job nobody sees: {v}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert_eq!(done["status"], "completed", "round {round}: {done}");
        kept = Some(done);
    }
    // A restore hung up at any step pins nothing for good: the backup can be deleted after.
    let backup = kept.unwrap()["backup_id"].as_str().unwrap().to_string();
    for round in 0..8u64 {
        let body = json!({"backup_id": backup});
        hang_up(&hub, "POST", "/api/v1/restores", &body, Duration::from_micros(round * 500)).await;
        settled(&hub, "pgtest1").await;
    }
    let (status, v) = hub.call("DELETE", &format!("/api/v1/backups/{backup}"), None).await;
    assert_eq!(status, 200, "{v}");
}

/// A schedule the hub could not keep is refused at start: exit status 1 and one line naming the
/// schedule and what is wrong, before anything listens.
#[test]
fn a_bad_schedule_stops_the_hub_at_start_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (schedule, expected) in [
        ("at = [\"2:00\"]", "schedule nightly: at: '2:00' is not a time of day"),
        ("every = \"4s\"", "schedule nightly: every = '4s'"),
        ("at = [\"02:00\"]\nnode = \"elsewhere\"", "schedule nightly: node elsewhere is not a [[node]]"),
        ("at = [\"02:00\"]\ncron = \"0 2 * * *\"", "unknown field `cron`"),
    ] {
        let stderr =
            refused_at_start(dir.path(), &format!("[[schedule]]\nname = \"nightly\"\nvms = [\"vm\"]\n{schedule}"));
        assert!(stderr.contains(expected), "{schedule}: {stderr}");
    }
}

/// `sendense-hub backup`, `backups`, `restore`, `close` and `replicate` against a running hub,
/// found from its hub.toml alone: a full backup and an incremental followed to their end (exit 0,
/// each image equal to the disk), the list naming both, a restore onto the node's disk checked
/// equal to the backup, read-only exports left open then closed, or served in the foreground
/// until SIGTERM and then closed, a replica equal to the disk, and the hub's refusals as exit
/// status 1 with the hub's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_back_up_list_and_restore_through_a_running_hub() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 2)], None).await;
    let base = free_ports(4);
    let hub = HubProcess::start(d, &node_url, (base, base + 3));
    let cli = |args: &[&str]| run_cli(&hub.config, args);
    let id_of = |said: &str| said.split_whitespace().nth(1).unwrap().to_string();
    let src = d.join("pgtest1-0.raw");

    let (code, full_said, err) = cli(&["backup", "pgtest1", "--full", "--tag", "cli"]).await;
    assert_eq!(code, Some(0), "{full_said}{err}");
    assert!(full_said.contains("(full) started") && full_said.contains("completed: 2 disk(s)"), "{full_said}");
    assert!(full_said.contains("disk 2000 100%"), "progress lines: {full_said}");
    let full = id_of(&full_said);
    change(&src, 5 * MIB, 0x5a);
    let (code, incr_said, err) = cli(&["backup", "pgtest1"]).await;
    assert_eq!(code, Some(0), "{incr_said}{err}");
    let incr = id_of(&incr_said);
    assert!(incr_said.contains(&format!("(incremental on {full}) started")), "{incr_said}");
    let image = |id: &str| d.join("repo/pgtest1").join(id).join("disk-2000.qcow2");
    assert_same(&src, &image(&incr));

    let (code, listed, _) = cli(&["backups", "--vm", "pgtest1"]).await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].starts_with("ID ") && lines.len() == 3, "{listed}");
    assert!(
        lines[1].starts_with(&incr) && lines[1].contains("incremental") && lines[1].contains("completed"),
        "{listed}"
    );
    assert!(lines[2].starts_with(&full) && lines[2].contains("full"), "{listed}");

    // Verified again on demand; an image changed behind the hub's back does not verify.
    let (code, said, err) = cli(&["verify", &incr]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(
        said.contains("disk 2000: image check clean, equal to what its node read") && said.contains("verified"),
        "{said}"
    );
    let rotted = d.join("rotted.qcow2");
    std::fs::copy(image(&incr), &rotted).unwrap();
    let out = tool("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x33 5M 4k"]).arg(image(&incr)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, said, _) = cli(&["verify", &incr]).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("disk 2000: image check clean, DIFFERS from what its node read"), "{said}");
    assert!(said.contains("did NOT verify"), "{said}");
    std::fs::rename(&rotted, image(&incr)).unwrap();

    // The full backup written back onto the node's disk, and checked equal by the hub.
    let (code, said, err) = cli(&["restore", &full, "--to", &format!("2000={}", src.display())]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains("completed") && said.contains("disk 2000: equal to the backup"), "{said}");
    assert_same(&src, &image(&full));

    // Read-only exports left open: any NBD client reads them; closed by id, the ports free.
    let (code, said, err) = cli(&["restore", &incr, "--detach"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    let export =
        said.lines().find_map(|l| l.trim().strip_prefix("2000:")).unwrap_or_else(|| panic!("{said}")).to_string();
    let out = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(d.join("pgtest1-1.raw"))
        .arg(said.lines().find_map(|l| l.trim().strip_prefix("2001:")).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(export.starts_with("nbd://127.0.0.1:"), "{said}");
    let (code, said, err) = cli(&["close", &id_of(&said)]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    hub.ports_all_free().await;

    // Served in the foreground until SIGTERM (as Ctrl-C): then closed, the ports free again.
    let mut serving = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .args(["restore", &full, "--config"])
        .arg(&hub.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(serving.stdout.take().unwrap()).lines();
    let mut said = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        said.push_str(&line);
        said.push('\n');
        if line.starts_with("serving until Ctrl-C") {
            break;
        }
    }
    assert!(said.contains("2000:nbd://127.0.0.1:"), "{said}");
    let (_, listed) = hub.call("GET", "/api/v1/ports", None).await;
    assert!(listed["leased"].as_array().is_some_and(|l| !l.is_empty()), "{listed}");
    let _ = Command::new("kill").arg(serving.id().unwrap().to_string()).status();
    assert_eq!(serving.wait().await.unwrap().code(), Some(0));
    assert!(lines.next_line().await.unwrap().is_some_and(|l| l.contains("closed")));
    hub.ports_all_free().await;

    // A replica brought up to date, equal to the disk.
    let (code, said, err) = cli(&["replicate", "pgtest1"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains("completed") && said.contains("replicas/pgtest1/disk-2000.qcow2"), "{said}");
    assert_same(&src, &d.join("replicas/pgtest1/disk-2000.qcow2"));

    // The oldest point in time dropped: refused while the incremental builds on it, done with
    // --merge (the incremental now stands alone and verifies).
    let (code, _, err) = cli(&["delete", &full]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the hub answered 409"), "{err}");
    let (code, said, err) = cli(&["delete", &full, "--merge"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    let (_, listed, _) = cli(&["backups"]).await;
    assert!(!listed.contains(&full) && listed.contains(&incr), "{listed}");
    let (code, said, _) = cli(&["verify", &incr]).await;
    assert_eq!(code, Some(0), "{said}");

    // Refusals: the hub's words, exit status 1, nothing started.
    let (code, said, err) = cli(&["backup", "nosuchvm"]).await;
    assert_eq!(code, Some(1), "{said}{err}");
    assert!(err.contains("no node has a VM named nosuchvm"), "{err}");
    let (code, _, err) = cli(&["restore", &full, "--to", "disk0=/x"]).await;
    assert_eq!(code, Some(2), "clap refuses the argument: {err}");
    assert!(err.contains("is not a number"), "{err}");
    let (code, _, err) = cli(&["close", "nosuchrestore"]).await;
    assert_eq!(code, Some(1), "{err}");
}

/// `sendense-hub ARGS --config CONFIG` run to its end: exit status, stdout, stderr.
fn run_cli(config: &Path, args: &[&str]) -> impl std::future::Future<Output = (Option<i32>, String, String)> + 'static {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub"));
    cmd.args(args).arg("--config").arg(config);
    async move {
        let out = cmd.output().await.unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `sendense-hub schedules` and `prune` against a running hub: a schedule listed with its next
/// run, run now and followed to its end three times (a full, then incrementals), shown VM by
/// VM; a retention policy previewed (nothing removed) and applied (the dropped backups merged
/// into the one kept, which still holds the disk); a schedule's own `keep_backups` applied after
/// its runs; the hub's refusals as exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_run_schedules_and_apply_retention_through_a_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 1), ("db1", 1), ("scratch", 1)], None).await;
    let base = free_ports(4);
    let schedule = "[[schedule]]\nname = \"nightly\"\nvms = [\"pgtest1\"]\nat = [\"03:00\"]\n\
                    [[schedule]]\nname = \"kept\"\nvms = [\"db1\"]\nat = [\"04:00\"]\nkeep_backups = 1\n\
                    [[schedule]]\nname = \"sundays\"\nvms = [\"*\"]\nexclude = [\"scratch\"]\nat = [\"05:00\"]\ndays = [\"sun\"]\n";
    let hub = HubProcess::start_with(d, &node_url, (base, base + 3), schedule);
    let cli = |args: &[&str]| run_cli(&hub.config, args);
    let src = d.join("pgtest1-0.raw");

    let (code, listed, err) = cli(&["schedules"]).await;
    assert_eq!(code, Some(0), "{listed}{err}");
    let line = listed.lines().find(|l| l.starts_with("nightly ")).unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("backup") && line.contains("at 03:00") && line.contains("never"), "{listed}");
    assert!(line.contains("T03:00:00"), "its next run: {listed}");

    let mut ids = Vec::new();
    for round in 0..3u8 {
        change(&src, u64::from(round) * MIB, 0x40 + round);
        let (code, said, err) = cli(&["schedules", "nightly", "--run"]).await;
        assert_eq!(code, Some(0), "round {round}: {said}{err}");
        assert!(said.contains("run started at"), "{said}");
        let done = said
            .lines()
            .find(|l| l.trim_start().starts_with("pgtest1: completed, "))
            .unwrap_or_else(|| panic!("{said}"));
        ids.push(done.rsplit(", ").next().unwrap().to_string());
        assert!(said.contains(": 1 completed"), "{said}");
    }
    let image = |id: &str| d.join("repo/pgtest1").join(id).join("disk-2000.qcow2");
    assert_same(&src, &image(&ids[2]));
    let (_, v) = hub.call("GET", &format!("/api/v1/backups/{}", ids[2]), None).await;
    assert_eq!(v["parent_id"], ids[1].as_str(), "incremental on the run before: {v}");
    let (code, shown, _) = cli(&["schedules", "nightly"]).await;
    assert_eq!(code, Some(0));
    assert!(
        shown.contains("last run: started") && shown.contains(&format!("pgtest1: completed, {}", ids[2])),
        "{shown}"
    );

    // Previewed: each backup's verdict and the rule keeping it, nothing removed.
    let (code, said, err) = cli(&["prune", "pgtest1", "--keep", "1", "--dry-run"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains("policy: keep=1") && said.contains("2 backup(s) would be removed"), "{said}");
    let verdict = |said: &str, id: &str| {
        said.lines().find(|l| l.trim_start().starts_with(id)).unwrap_or_else(|| panic!("{said}")).to_string()
    };
    assert!(verdict(&said, &ids[2]).contains("keep") && verdict(&said, &ids[2]).contains("(keep-last)"), "{said}");
    assert!(verdict(&said, &ids[0]).contains("remove") && verdict(&said, &ids[1]).contains("remove"), "{said}");
    let (_, listed, _) = cli(&["backups"]).await;
    assert!(ids.iter().all(|id| listed.contains(id.as_str())), "{listed}");

    // Applied: the two older merged away, the newest still the disk, and it verifies.
    let (code, said, err) = cli(&["prune", "pgtest1", "--keep", "1"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains("2 backup(s) removed, 0 could not be"), "{said}");
    let (_, listed, _) = cli(&["backups"]).await;
    assert!(!listed.contains(&ids[0]) && !listed.contains(&ids[1]) && listed.contains(&ids[2]), "{listed}");
    assert_same(&src, &image(&ids[2]));
    let (code, said, _) = cli(&["verify", &ids[2]]).await;
    assert_eq!(code, Some(0), "{said}");

    // A schedule's own retention (keep_backups = 1) applied after each of its backups, to the
    // backups it made only: the second run leaves its backup and the operator's, taken before.
    let (code, said, err) = cli(&["backup", "db1", "--full"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    let by_hand = said.split_whitespace().nth(1).unwrap().to_string();
    let (_, shown, _) = cli(&["schedules", "kept"]).await;
    assert!(shown.contains("retention: keep=1"), "{shown}");
    // Each VM names the backup schedules that cover it, and those that leave it out on purpose.
    let (_, vms) = hub.call("GET", "/api/v1/vms", None).await;
    let covering: Vec<(&str, &Value, &Value)> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["vm_name"].as_str().unwrap(), &v["backup_schedules"], &v["excluded_by"]))
        .collect();
    assert_eq!(
        covering,
        [
            ("db1", &json!(["kept", "sundays"]), &Value::Null),
            ("pgtest1", &json!(["nightly", "sundays"]), &Value::Null),
            ("scratch", &json!([]), &json!(["sundays"]))
        ],
        "{vms}"
    );
    let (_, said, _) = cli(&["vms"]).await;
    assert!(said.contains("(excluded by schedule sundays)") && !said.contains("IN NO BACKUP SCHEDULE"), "{said}");
    assert!(said.contains("3 VM(s), 1 never backed up, 0 in no backup schedule"), "{said}");
    let (_, metrics) = hub.call("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("sendense_hub_vm_excluded{vm=\"scratch\",node=\"default\"} 1\n"), "{metrics}");
    assert!(!metrics.contains("sendense_hub_vm_excluded{vm=\"db1\""), "{metrics}");
    assert!(metrics.contains("sendense_hub_vm_backup_schedules{vm=\"db1\",node=\"default\"} 2\n"), "{metrics}");
    assert!(cli(&["schedules", "nightly"]).await.1.contains("retention: the hub's"));
    let mut kept = Vec::new();
    for round in 0..2u8 {
        change(&d.join("db1-0.raw"), u64::from(round) * MIB, 0x50 + round);
        let (code, said, err) = cli(&["schedules", "kept", "--run"]).await;
        assert_eq!(code, Some(0), "{said}{err}");
        let done =
            said.lines().find(|l| l.trim_start().starts_with("db1: completed, ")).unwrap_or_else(|| panic!("{said}"));
        kept.push(done.rsplit(", ").next().unwrap().to_string());
    }
    // Applied once the backup has completed (the run's end is told first).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let db1 = hub.call("GET", "/api/v1/backups?vm_name=db1", None).await.1;
        let ids: Vec<&str> = db1.as_array().unwrap().iter().filter_map(|b| b["backup_id"].as_str()).collect();
        if ids == [kept[1].as_str(), by_hand.as_str()] {
            break;
        }
        assert!(Instant::now() < deadline, "{db1}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_same(&d.join("db1-0.raw"), &d.join("repo/db1").join(&kept[1]).join("disk-2000.qcow2"));
    let (code, said, _) = cli(&["verify", &by_hand]).await;
    assert_eq!(code, Some(0), "the operator's backup reads as it did: {said}");
    let (_, listed, _) = cli(&["backups", "--vm", "db1"]).await;
    let line = |said: &str, id: &str| {
        said.lines().find(|l| l.trim_start().starts_with(id)).unwrap_or_else(|| panic!("{said}")).to_string()
    };
    assert!(line(&listed, &kept[1]).contains("(schedule kept)"), "{listed}");
    assert!(!line(&listed, &by_hand).contains("schedule"), "{listed}");
    // A prune by the hub's rules leaves the schedule's backups to it, and one of the schedule's
    // backups applies its rules to them alone.
    let (code, said, err) = cli(&["prune", "db1", "--keep", "1", "--dry-run"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(line(&said, &kept[1]).contains("keep") && said.contains("(other-retention: schedule kept)"), "{said}");
    assert!(line(&said, &by_hand).contains("(keep-last)") && said.contains("0 backup(s) would be"), "{said}");
    let (code, said, err) = cli(&["prune", "--schedule", "kept", "--dry-run"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.contains("policy: keep=1 (the backups schedule kept made)"), "{said}");
    assert!(
        line(&said, &kept[1]).contains("(keep-last)") && line(&said, &by_hand).contains("(other-retention: the hub's)"),
        "{said}"
    );
    assert!(!said.contains("pgtest1"), "only the VMs with backups it made: {said}");
    let (code, _, err) = cli(&["prune", "--schedule", "nightly"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("schedule nightly has no keep_* of its own"), "{err}");

    // Refusals: no rules here nor in the config, an unknown schedule (the hub's words, exit 1);
    // a rule of 0 and --run without a name (clap's, exit 2).
    let (code, _, err) = cli(&["prune"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("400"), "{err}");
    let (code, _, err) = cli(&["schedules", "weekly", "--run"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no schedule named weekly"), "{err}");
    let (code, _, _) = cli(&["prune", "--keep", "0"]).await;
    assert_eq!(code, Some(2));
    let (code, _, _) = cli(&["schedules", "--run"]).await;
    assert_eq!(code, Some(2));
}

/// `sendense-hub nodes` and `GET /api/v1/nodes` against a running hub with a node that answers
/// and one that does not: each checked by the call, up with its VMs or DOWN with why, what runs
/// on it, the exit status 0 only when every node shown answered; `sendense_hub_node_up` says the
/// same. `sendense-hub vms`: the node's VM never backed up, then with its backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_command_shows_each_node_up_or_down_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node_url = start_node(d, &[("pgtest1", 1)], Some("2M")).await;
    let base = free_ports(4);
    let gone = format!("[[node]]\nname = \"gone\"\nurl = \"http://127.0.0.1:{}\"\n", free_port());
    let hub = HubProcess::start_with(d, &node_url, (base, base + 3), &gone);
    let cli = |args: &[&str]| run_cli(&hub.config, args);

    let (code, listed, err) = cli(&["nodes"]).await;
    assert_eq!(code, Some(1), "a node does not answer: {listed}{err}");
    let line = |said: &str, name: &str| {
        said.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{said}")).to_string()
    };
    let default = line(&listed, "default");
    assert!(default.contains(" up ") && default.contains(&node_url), "{listed}");
    assert!(line(&listed, "gone").contains("DOWN") && listed.contains("never"), "{listed}");
    assert!(listed.contains("Connection refused") || listed.contains("error sending request"), "why: {listed}");

    let (code, shown, _) = cli(&["nodes", "default"]).await;
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains(": up") && shown.contains("vm pgtest1: 2000 24.0 MiB raw"), "{shown}");
    let (code, shown, _) = cli(&["nodes", "gone"]).await;
    assert_eq!((code, shown.contains(": DOWN")), (Some(1), true), "{shown}");
    let (code, _, err) = cli(&["nodes", "nope"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown node nope"), "{err}");

    // Its VM, never backed up, says so (and to the metrics: 0 backups).
    let (code, said, err) = cli(&["vms"]).await;
    assert_eq!(code, Some(0), "{said}{err}");
    let pgtest1 = line(&said, "pgtest1");
    assert!(
        pgtest1.contains("default") && pgtest1.contains("24.0 MiB") && pgtest1.contains("NEVER BACKED UP"),
        "{said}"
    );
    assert!(pgtest1.contains("IN NO BACKUP SCHEDULE"), "{said}");
    assert!(said.contains("1 VM(s), 1 never backed up, 1 in no backup schedule"), "{said}");
    let (_, metrics) = hub.call("GET", "/metrics", None).await;
    assert!(
        metrics.as_str().unwrap().contains("sendense_hub_vm_backups{vm=\"pgtest1\",node=\"default\"} 0\n"),
        "{metrics}"
    );

    // What runs on a node is shown with it, and with its VM.
    let (status, b) =
        hub.call("POST", "/api/v1/backups", Some(json!({"vm_name": "pgtest1", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let (status, nodes) = hub.call("GET", "/api/v1/nodes", None).await;
    assert_eq!(status, 200, "{nodes}");
    let of = |name: &str| nodes.as_array().unwrap().iter().find(|n| n["name"] == name).cloned().unwrap();
    let (default, gone) = (of("default"), of("gone"));
    assert_eq!((default["reachable"].as_bool(), gone["reachable"].as_bool()), (Some(true), Some(false)), "{nodes}");
    assert_eq!(default["vms"][0]["name"], "pgtest1", "{nodes}");
    assert_eq!(default["running"], json!([format!("backup {id} of VM pgtest1")]), "{nodes}");
    assert!(default["last_seen"].is_string() && gone["last_seen"].is_null() && gone["error"].is_string(), "{nodes}");
    assert!(default.get("tunnel_sessions").is_none(), "no SSH endpoint, no sessions told: {nodes}");
    assert!(default.get("refused_logins").is_none(), "nor refused logins: {nodes}");
    let (status, ssh) = hub.call("GET", "/api/v1/ssh", None).await;
    assert_eq!(status, 404, "{ssh}");
    assert!(ssh["error"].as_str().unwrap_or("").contains("serves no SSH endpoint"), "{ssh}");
    let (_, vms) = hub.call("GET", "/api/v1/vms", None).await;
    assert_eq!(vms[0]["running"], id.as_str(), "{vms}");
    assert_eq!((vms[0]["listed"].as_bool(), vms[0]["backups"].as_u64()), (Some(true), Some(0)), "{vms}");
    assert_eq!(hub.wait(&format!("/api/v1/backups/{id}")).await["status"], "completed");
    let (_, said, _) = cli(&["vms"]).await;
    let pgtest1 = line(&said, "pgtest1");
    assert!(pgtest1.contains(" 1  20") && pgtest1.contains(&format!("{id} (full)")), "{said}");
    // Backed up by hand, it is still in no schedule: nothing backs it up from now on.
    assert!(said.contains("1 VM(s), 0 never backed up, 1 in no backup schedule"), "{said}");
    let (_, vms) = hub.call("GET", "/api/v1/vms", None).await;
    assert_eq!(vms[0]["backup_schedules"], json!([]), "{vms}");

    let (_, metrics) = hub.call("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("sendense_hub_node_up{node=\"default\"} 1\n"), "{metrics}");
    assert!(metrics.contains("sendense_hub_node_up{node=\"gone\"} 0\n"), "{metrics}");
    assert!(metrics.contains("sendense_hub_node_last_seen_timestamp_seconds{node=\"default\"} "), "{metrics}");
    assert!(!metrics.contains("sendense_hub_node_last_seen_timestamp_seconds{node=\"gone\"}"), "{metrics}");
    assert!(metrics.contains("sendense_hub_vm_backup_schedules{vm=\"pgtest1\",node=\"default\"} 0\n"), "{metrics}");
}
