//! End to end: the product as users run it. `sendense-hub` and `sendense-node` are two
//! processes started here with their own config files; the node reaches the hub through the
//! hub's SSH endpoint, through OpenSSH's sshd in its place, or over direct TCP. Every image is
//! judged by qemu-img, every restore compared with its source. Then the faults production
//! brings: SSH, the node and the hub killed mid-backup (the hub at random moments too: `crash`),
//! a source disk that disappears, a full repository, 20 VMs at once, 101 disks in flight, and bad
//! input at every door.

mod compress;
mod crash;
mod handover;
mod merge;
mod node_restart;
mod reload;
mod schedule;
mod site;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use site::{assert_clean, assert_same, change, tool, Options, Site, Transport, Vm, MIB};

/// Full, incremental, replica (twice) and restore of a two-disk VM; everything equals the
/// sources.
async fn lifecycle(transport: Transport, opts: Options<'_>) -> Site {
    let site = Site::start(transport, &[Vm("pgtest1", &[24, 16])], 4, opts).await;
    let full = site.backup("pgtest1", "full").await;
    site.ports_all_free().await;
    site.assert_backup_equals_sources("pgtest1", &full, 2);

    change(&site.source("pgtest1", 0), 5 * MIB, 0xaa);
    change(&site.source("pgtest1", 1), 9 * MIB + 4096, 0xbb);
    let incr = site.backup("pgtest1", "incremental").await;
    assert_eq!((&incr["backup_type"], &incr["parent_id"]), (&json!("incremental"), &full["backup_id"]), "{incr}");
    for d in incr["disks"].as_array().unwrap() {
        assert_eq!(d["bytes_sent"], 64 << 10, "only the changed 64 KiB block travels: {incr}");
    }
    // How the node found the change: qcow2 disks by their bitmap (reading only that block),
    // raw ones by comparing every block's hash.
    let (status, job) =
        site.node("GET", &format!("/api/v1/backup/{}", incr["backup_id"].as_str().unwrap()), None).await;
    assert_eq!(status, 200, "{job}");
    let qcow2 = site.source("pgtest1", 0).extension().is_some_and(|e| e == "qcow2");
    for d in job["disks"].as_array().unwrap() {
        assert_eq!(d["change_source"], if qcow2 { "bitmap" } else { "hashes" }, "{job}");
        if qcow2 {
            assert_eq!(d["bytes_read"], 64 << 10, "only the marked granule is read: {job}");
        }
    }
    site.assert_backup_equals_sources("pgtest1", &incr, 2);
    let (status, v) =
        site.hub("POST", &format!("/api/v1/backups/{}/verify", incr["backup_id"].as_str().unwrap()), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{v}");

    for round in 0..2u8 {
        if round == 1 {
            change(&site.source("pgtest1", 1), 3 * MIB, 0xcc);
        }
        let done = site.replicate("pgtest1").await;
        assert_eq!(done["backup_type"], if round == 0 { "full" } else { "incremental" }, "{done}");
        site.assert_replica_equals_sources("pgtest1", 2);
    }

    // The newest backup restored to new files on the node, through the same way in: one call to
    // the hub, which has the node write the disks, follows it, and closes the exports.
    let latest = site.backup("pgtest1", "incremental").await;
    let dest = |i: usize| site.path().join(format!("restores/pgtest1-{i}.raw"));
    let asked = json!({"backup_id": latest["backup_id"], "destinations": {"2000": dest(0), "2001": dest(1)}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!((status, &r["status"], &r["node"]), (201, &json!("running"), &json!("n1")), "{r}");
    let done = wait_restore(&site, r["restore_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    for (i, d) in done["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!((&d["status"], &d["checksum_match"]), (&json!("completed"), &json!(true)), "{done}");
        assert_eq!(d["destination"], json!(dest(i)), "{done}");
        assert_same(&site.source("pgtest1", i), &dest(i));
    }
    assert_eq!(done["exports"], json!([]), "its exports closed: {done}");
    site.ports_all_free().await;
    let (status, listed) = site.hub("GET", "/api/v1/restores", None).await;
    assert_eq!((status, listed), (200, json!([])), "an ended restore is not open");
    assert_eq!(site.backups("pgtest1").await.len(), 3);
    // Whole VM disks, all of them: backups, replicas and restored disks are their owner's alone.
    for dir in ["repo/pgtest1", "replicas/pgtest1", "restores"] {
        assert_private(&site.as_hub_sees(&site.path().join(dir)));
    }
    site
}

/// `dir` and every directory under it are 0700, every file in it 0600: disk images and restored
/// disks, and what describes them (manifests, block hashes, the replica's marker).
fn assert_private(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    let mut disks = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_private(&path);
        } else {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            disks += usize::from(path.extension().is_some_and(|e| e == "qcow2" || e == "raw"));
        }
    }
    assert!(disks > 0 || dir.read_dir().unwrap().flatten().any(|e| e.path().is_dir()), "{}: empty", dir.display());
}

/// 64 KiB of the qcow2 image at `image` rewritten at `offset` with qemu-io, as rot or tampering in
/// the repository would change it (a valid write: only the content differs from the backup).
fn change_behind_the_hubs_back(image: &std::path::Path, offset: &str) {
    let out = tool("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 0x55 {offset} 64k")])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Backup `id` once a verification has found it not whole.
async fn wait_failed_verification(site: &Site, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, b) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
        if b["verified"]["ok"] == json!(false) {
            return b;
        }
        assert!(Instant::now() < deadline, "backup {id} still counts as whole: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Node job `job` (a restore) once its first disk is under way: 2 MiB read (the node copies at
/// its bandwidth limit, so it is still running).
async fn wait_restore_under_way(site: &Site, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = site.node("GET", &format!("/api/v1/backup/{job}"), None).await;
        if v["disks"][0]["bytes_read"].as_u64().unwrap_or(0) >= 2 * MIB {
            return;
        }
        assert!(Instant::now() < deadline, "the restore made no progress: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Disk 2000 of `backup` restored by the hub onto `dest`, a file that held "the disk before",
/// once under way; returns the restore's id.
async fn restore_over_an_old_file(site: &Site, backup: &str, dest: &std::path::Path) -> String {
    if let Some(dir) = dest.parent().filter(|d| !d.exists()) {
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(dir).unwrap();
    }
    std::fs::write(dest, b"the disk before").unwrap();
    let asked = json!({"backup_id": backup, "destinations": {"2000": dest}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!(status, 201, "{r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    wait_restore_under_way(site, &rid).await;
    rid
}

/// A restore the hub drives, once it has ended.
async fn wait_restore(site: &Site, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, v) = site.hub("GET", &format!("/api/v1/restores/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
        if v["status"] != "running" {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "restore {id} still running: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn wait_node_job(site: &Site, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
        if v["status"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "node job {id} still running: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_through_the_hub_endpoint_then_bad_input_at_every_door() {
    let site = lifecycle(Transport::Endpoint, Options::default()).await;

    // Tokens, on both APIs.
    for to_hub in [true, false] {
        for token in [None, Some("wrong")] {
            let (status, body) = site.raw(to_hub, "GET", "/api/v1/vms", token, "").await;
            let (status2, _) = site.raw(to_hub, "GET", "/api/v1/backups", token, "").await;
            assert!(status == 401 || status2 == 401, "to_hub={to_hub} token={token:?}: {status} {body}");
            assert_eq!(status2.min(status), 401);
        }
    }
    // Malformed JSON, unknown VMs, hostile names, at the hub.
    let hub_token = site.hub_token.clone();
    for body in ["{", "[]", "{\"vm_name\": 7}", "{\"vm_name\": \"pgtest1\", \"backup_type\": \"hourly\"}"] {
        let (status, v) = site.raw(true, "POST", "/api/v1/backups", Some(&hub_token), body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].is_string() && v["code"] == "bad_request", "{body}: {v}");
    }
    for name in ["../etc", "a/b", "", ".x", "x\u{0}y", &"v".repeat(200)] {
        let (status, v) =
            site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": name, "backup_type": "full"}))).await;
        assert_eq!(status, 400, "{name:?}: {v}");
    }
    let (status, v) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "ghost", "backup_type": "full"}))).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": "../../x"}))).await;
    assert_eq!(status, 400, "{v}");
    // At the node: malformed JSON, hostile names, and targets the tunnel does not forward.
    let node_token = site.node_token.clone();
    let (status, v) = site.raw(false, "POST", "/api/v1/backup/start", Some(&node_token), "{\"vm_name\":").await;
    assert_eq!(status, 400, "{v}");
    let start = |targets: String, job: &str| json!({"vm_name": "pgtest1", "nbd_targets": targets, "job_id": job, "backup_type": "full"});
    let outside = site.nbd.1 + 1;
    for (targets, job) in [
        (format!("2000:nbd://127.0.0.1:{outside}/pgtest1-disk0,2001:nbd://127.0.0.1:{}/x", site.nbd.0), "j1"),
        (format!("2000:nbd://127.0.0.1:22/x,2001:nbd://127.0.0.1:{}/x", site.nbd.0), "j2"),
        ("2000:http://127.0.0.1/x".to_string(), "j3"),
        (format!("2000:nbd://127.0.0.1:{}/ok", site.nbd.0), "../j4"),
    ] {
        let (status, v) = site.node("POST", "/api/v1/backup/start", Some(start(targets.clone(), job))).await;
        assert_eq!(status, 400, "{targets} {job}: {v}");
        assert_eq!(v["code"], "bad_request", "{v}");
    }
    let (status, v) = site.node("POST", "/api/v1/backup/start", Some(json!({"vm_name": "ghost", "nbd_targets": format!("2000:nbd://127.0.0.1:{}/x", site.nbd.0), "job_id": "j5", "backup_type": "full"}))).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = site
        .node(
            "POST",
            "/api/v1/restore/start",
            Some(json!({"job_id": "r9", "nbd_targets": format!("2000:nbd://127.0.0.1:{}/x", site.nbd.0), "destinations": {"2000": "/etc/passwd"}})),
        )
        .await;
    assert_eq!(status, 400, "a restore outside restore_dir: {v}");
    // Nothing of all that reached the repository, the ports or the node's jobs.
    site.ports_all_free().await;
    assert_eq!(site.backups("pgtest1").await.len(), 3);
    let (status, _) = site.hub("GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_through_openssh_sshd() {
    lifecycle(Transport::OpenSsh, Options::default()).await;
}

/// A libvirt VM's disks are qcow2 files: backed up, replicated and restored as the disks they
/// hold (`format = "qcow2"`), the guest's writes made through qemu-io, which sets the images'
/// persistent bitmaps the node's incrementals read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_whose_disks_are_qcow2_images() {
    lifecycle(Transport::Direct, Options { qcow2_sources: true, ..Options::default() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_vm_over_direct_tcp_with_tls_and_https_and_the_hub_writing_through_o_direct_and_io_uring() {
    // cache = "none": every export (backups, replicas, restores) opens its image with O_DIRECT;
    // aio = "io_uring": their data goes through the hub's one ring (the pair to use on disks);
    // nbd_tls: every NBD connection across the "network" is TLS, client certificates required;
    // api_tls: both APIs are HTTPS, the hub calling the node at https:// with its CA, and both
    // require client certificates (api_client_certs): the hub presents its own to the node.
    let pki = testpki::Pki::new();
    let hub = format!("cache = \"none\"\naio = \"io_uring\"\nnbd_tls = \"{}\"", pki.dir("server").display());
    let node = format!("nbd_tls = \"{}\"", pki.dir("client").display());
    let api_tls = pki.dir("both");
    let opts = Options { hub: &hub, node: &node, on_build_disk: true, api_tls: Some(&api_tls), ..Options::default() };
    let site = lifecycle(Transport::Direct, opts).await;
    assert!(site.node_url.starts_with("https://"), "{}", site.node_url);
    // curl with the CA and a client certificate reads the hub's API; without the certificate it
    // cannot, token or not; a request in clear is told to use https://.
    let client = pki.dir("client");
    let curl = |with_certificate: bool| {
        let mut curl = std::process::Command::new("curl");
        curl.args(["--silent", "--show-error", "--max-time", "10", "--cacert"]).arg(api_tls.join("ca-cert.pem"));
        if with_certificate {
            curl.arg("--cert").arg(client.join("client-cert.pem")).arg("--key").arg(client.join("client-key.pem"));
        }
        curl.args(["-H", &format!("Authorization: Bearer {}", site.hub_token)])
            .arg(format!("https://localhost:{}/api/v1/ports", site.hub_api))
            .output()
            .expect("curl is required; scripts/test.sh installs it")
    };
    let out = curl(true);
    let ports: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success() && ports["range"].is_string(), "{ports} {}", String::from_utf8_lossy(&out.stderr));
    let out = curl(false);
    assert!(!out.status.success() && out.stdout.is_empty(), "{out:?}");
    // The hub's own commands reach it from its hub.toml alone: HTTPS checked against api_tls's
    // CA, the client certificate there presented.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .args(["backups", "--vm", "pgtest1", "--config"])
        .arg(site.hub_config())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(listed.lines().skip(1).any(|l| l.contains("pgtest1") && l.contains("completed")), "{listed}");
    let clear = reqwest::get(format!("http://127.0.0.1:{}/healthz", site.hub_api)).await.unwrap();
    assert_eq!(clear.status(), 400);
    assert_eq!(clear.json::<Value>().await.unwrap()["code"], "https_required");
    let rings = std::fs::read_dir(format!("/proc/{}/fd", site.hub_pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count();
    assert_eq!(rings, 1, "one ring for every export of the hub");
    // One more full backup, looked at before anything else reads it: written through O_DIRECT,
    // verified buffered and then dropped, each image keeps metadata and stray unaligned pieces in
    // the page cache, not its 16-24 MiB of data.
    let (status, started) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "pgtest1", "backup_type": "full"}))).await;
    assert_eq!(status, 202, "{started}");
    let targets = started["nbd_targets_string"].as_str().unwrap_or_default();
    assert!(targets.starts_with("2000:nbds://127.0.0.1:"), "the node is told to start TLS: {started}");
    let full = site.wait(&format!("/api/v1/backups/{}", started["backup_id"].as_str().unwrap())).await;
    assert_eq!(full["status"], "completed", "{full}");
    let images: Vec<_> = walk(&site.path().join("repo/pgtest1").join(full["backup_id"].as_str().unwrap()))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    assert_eq!(images.len(), 2, "{images:?}");
    for image in images {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "PAGES"])
            .arg(&image)
            .output()
            .expect("fincore (util-linux-extra) is required; scripts/test.sh installs it");
        let pages: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(pages < 512, "{} keeps {pages} pages in the page cache", image.display());
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A full backup, then an incremental started and left running (the node copies slowly).
async fn full_then_running_incremental(site: &Site) -> (Value, String) {
    let full = site.backup("vm", "full").await;
    // Enough new data that the incremental takes a few seconds at the node's bandwidth limit.
    site::make_source(&site.source("vm", 0), 24, 77);
    change(&site.source("vm", 1), 13 * MIB, 0x5b);
    let id = site.start_backup("vm", "incremental").await;
    site.wait_progress(&format!("/api/v1/backups/{id}"), 64 << 10).await;
    (full, id)
}

/// After a failed run: the only completed backups are the good ones (`good`); the failed run
/// is shown as failed (after a hub restart, not at all) and cannot be restored; its directory
/// is gone and every port is free.
async fn assert_nothing_half_made(site: &Site, vm: &str, good: &[&Value], failed: &str) {
    let list = site.backups(vm).await;
    let completed: Vec<&Value> = list.iter().filter(|b| b["status"] == "completed").collect();
    assert_eq!(completed.len(), good.len(), "{list:?}");
    for g in good {
        assert!(completed.iter().any(|b| b["backup_id"] == g["backup_id"]), "{list:?}");
    }
    for b in list.iter().filter(|b| b["status"] != "completed") {
        assert_eq!(b["status"], "failed", "{b}");
        assert_eq!(b["backup_id"], failed, "{b}");
    }
    let (status, body) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": failed}))).await;
    assert!(status == 404 || status == 409, "a failed run is not restorable: {status} {body}");
    assert!(!site.as_hub_sees(&site.path().join("repo").join(vm).join(failed)).exists(), "the half backup was removed");
    site.ports_all_free().await;
}

/// The next incremental after a fault is a correct incremental on the last good backup.
async fn next_incremental_is_correct(site: &Site, full: &Value) {
    let next = site.backup("vm", "incremental").await;
    assert_eq!((&next["backup_type"], &next["parent_id"]), (&json!("incremental"), &full["backup_id"]), "{next}");
    site.assert_backup_equals_sources("vm", &next, 2);
}

const SLOW: Options<'static> = Options {
    copy: "bandwidth_limit = \"6M\"",
    hub: "",
    node: "",
    repo_tmpfs_mib: None,
    on_build_disk: false,
    qcow2_sources: false,
    api_tls: None,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_connection_killed_mid_backup_the_job_resumes_and_completes() {
    let mut site = Site::start(Transport::OpenSsh, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let id = site.start_backup("vm", "full").await;
    let path = format!("/api/v1/backups/{id}");
    site.wait_progress(&path, 2 * MIB).await;
    site.sshd.as_mut().unwrap().stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, during) = site.hub("GET", &path, None).await;
    assert_eq!(during["status"], "running", "a dropped tunnel does not doom the job: {during}");
    site.sshd = Some(site::ssh::Sshd::start(site.path(), sshd_port(&site)));
    let done = site.wait(&path).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("vm", &done, 2);
    site.ports_all_free().await;
}

fn sshd_port(site: &Site) -> u16 {
    let cfg = std::fs::read_to_string(site.path().join("sshd_config")).unwrap();
    cfg.lines().find_map(|l| l.strip_prefix("Port ")).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_of_a_running_incremental_cannot_be_deleted_until_the_chain_no_longer_needs_it() {
    let site = Site::start(Transport::Direct, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let (full, id) = full_then_running_incremental(&site).await;
    let full_path = format!("/api/v1/backups/{}", full["backup_id"].as_str().unwrap());
    let (status, body) = site.hub("DELETE", &full_path, None).await;
    assert_eq!(status, 409, "the running incremental is laid over it: {body}");
    assert!(body["error"].as_str().unwrap().contains(&id), "the refusal names the job: {body}");
    let done = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!((&done["status"], &done["parent_id"]), (&json!("completed"), &full["backup_id"]), "{done}");
    site.assert_backup_equals_sources("vm", &done, 2);
    let (status, body) = site.hub("DELETE", &full_path, None).await;
    assert_eq!(status, 409, "now the completed incremental needs it: {body}");
    for path in [format!("/api/v1/backups/{id}"), full_path] {
        let (status, body) = site.hub("DELETE", &path, None).await;
        assert_eq!(status, 200, "newest first, each can go: {body}");
    }
    assert!(site.backups("vm").await.is_empty());
}

/// With checkpoints off (`checkpoint_every_s = 0`) a killed node takes nothing up: the run fails
/// cleanly. (With them, the default, it goes on: `node_restart.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_killed_mid_backup_without_checkpoints_fails_the_job_cleanly_and_the_next_incremental_is_correct() {
    let opts = Options { copy: "bandwidth_limit = \"6M\"\ncheckpoint_every_s = 0", ..SLOW };
    let mut site = Site::start(Transport::Endpoint, &[Vm("vm", &[24, 16])], 4, opts).await;
    let (full, id) = full_then_running_incremental(&site).await;
    site.kill_node();
    site.start_node();
    let failed = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("node"), "{failed}");
    assert_nothing_half_made(&site, "vm", &[&full], &id).await;
    site.wait_node_reachable().await;
    next_incremental_is_correct(&site, &full).await;
}

/// The record of the runs under way a running hub keeps for the start after a kill.
fn hub_record(site: &Site) -> std::path::PathBuf {
    site.path().join("repo/.jobs-handed-over.json")
}

/// Wait until the hub's record names `id` (written before the run's start is answered).
async fn wait_hub_record_names(site: &Site, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(hub_record(site)).is_ok_and(|r| r.contains(id)) {
        assert!(Instant::now() < deadline, "the hub's record does not name {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A run the hub's record does not name (the hub killed while starting it; here the record is
/// removed): the killed hub's successor removes it as
/// interrupted and cancels the node's job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_mid_backup_not_in_its_record_lists_no_half_backup_and_the_next_incremental_is_correct() {
    let mut site = Site::start(Transport::Endpoint, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let (full, id) = full_then_running_incremental(&site).await;
    site.kill_hub();
    let _ = std::fs::remove_file(hub_record(&site));
    site.start_hub();
    assert_nothing_half_made(&site, "vm", &[&full], &id).await;
    // The node's tunnel comes back to the new hub; the node's orphaned job is cancelled for it.
    site.wait_node_reachable().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
        if v["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "the orphaned node job was not cancelled: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    next_incremental_is_correct(&site, &full).await;
}

/// The hub killed (SIGKILL) in the middle of an incremental backup, then of a restore it drives:
/// its successor takes both up from the record it kept (the same ports and exports, the node's
/// retries landing on them), and they complete: the backup equal to the disks and verified, the
/// restore's checksums matching, the file equal to the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_mid_backup_and_mid_restore_takes_both_up_from_its_record() {
    let mut site = Site::start(Transport::Endpoint, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let (full, id) = full_then_running_incremental(&site).await;
    wait_hub_record_names(&site, &id).await;
    site.kill_hub();
    site.start_hub();
    let path = format!("/api/v1/backups/{id}");
    let (status, v) = site.hub("GET", &path, None).await;
    assert_eq!((status, &v["status"]), (200, &json!("running")), "taken up: {v}");
    let done = site.wait(&path).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["parent_id"], full["backup_id"], "{done}");
    site.assert_backup_equals_sources("vm", &done, 2);
    let (status, v) = site.hub("POST", &format!("{path}/verify"), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{v}");
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_hub_jobs_taken_up{result=\"resumed\"} 1"), "{metrics}");
    site.ports_all_free().await;

    let dest = site.path().join("restores/vm-0.raw");
    let rid = restore_over_an_old_file(&site, &id, &dest).await;
    wait_hub_record_names(&site, &rid).await;
    site.kill_hub();
    site.start_hub();
    let done = wait_restore(&site, &rid).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["disks"][0]["checksum_match"], json!(true), "{done}");
    assert_same(&site.source("vm", 0), &dest);
    site.ports_all_free().await;
    site.wait_node_reachable().await;
    let next = site.backup("vm", "incremental").await;
    assert_eq!(next["parent_id"], json!(id), "the chain goes on from the run taken up: {next}");
    site.assert_backup_equals_sources("vm", &next, 2);
}

/// Daily incrementals fill a chain: with `max_chain = 20` the 20th image (a full backup and 19
/// incrementals, deeper than the 17 images qcow2 used to open) is made, verified and read back
/// whole; the next incremental asked for is still one (only its change is sent), says why it
/// will stand alone, and once complete is made to stand alone on the hub (no backing file, no
/// parent, type full, equal to the sources, verified); the chain under it is kept whole, and the
/// next incremental builds on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_past_a_full_chain_is_sent_as_one_and_made_to_stand_alone_on_the_hub() {
    let options = Options { hub: "max_chain = 20", ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[4, 2])], 4, options).await;
    let mut newest = site.backup("vm", "full").await;
    for day in 1..20u8 {
        change(&site.source("vm", 0), u64::from(day) * (128 << 10), day);
        let next = site.backup("vm", "incremental").await;
        assert_eq!((&next["backup_type"], &next["parent_id"]), (&json!("incremental"), &newest["backup_id"]), "{next}");
        newest = next;
    }
    site.assert_backup_equals_sources("vm", &newest, 2);
    let verify = |id: &Value| format!("/api/v1/backups/{}/verify", id.as_str().unwrap());
    let (status, v) = site.hub("POST", &verify(&newest["backup_id"]), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "the 20th image verifies: {v}");
    // Every image of a chain an export serves holds a descriptor: the hub runs with the most the
    // system allows it, not a shell's 1024.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", site.hub_pid())).unwrap();
    let open_files: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(open_files[3], open_files[4], "soft limit raised to the hard one: {open_files:?}");
    change(&site.source("vm", 1), MIB, 0x17);
    let (status, started) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "incremental"}))).await;
    assert_eq!(
        (status, &started["backup_type"], &started["parent_id"]),
        (202, &json!("incremental"), &newest["backup_id"])
    );
    let note = started["note"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains("ends a chain of 20 images, the most one chain holds (max_chain = 20)")
            && note.contains("made to stand alone"),
        "{started}"
    );
    let id = started["backup_id"].as_str().unwrap().to_string();
    let done = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    let sent: u64 = done["disks"].as_array().unwrap().iter().map(|d| d["bytes_sent"].as_u64().unwrap()).sum();
    assert!(sent <= MIB, "only the change crossed the network, not 6 MiB: {sent} bytes: {done}");
    // The background pass makes it stand alone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let alone = loop {
        let (_, v) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
        if v["parent_id"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "still on its chain: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alone["backup_type"], "full", "{alone}");
    assert!(alone["note"].as_str().is_some_and(|n| n.contains("made to stand alone on the hub at")), "{alone}");
    for disk in 0..2 {
        let info = tool("qemu-img").arg("info").arg(site.image("vm", &id, disk)).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(!info.contains("backing file"), "{info}");
        // Block hashes: an incremental's are what differs from its parent's; the one made to
        // stand alone has them whole again, as a full backup.
        let magic =
            |id: &str| std::fs::read(site.image("vm", id, disk).with_extension("blocks")).unwrap()[..8].to_vec();
        assert_eq!(magic(newest["backup_id"].as_str().unwrap()), b"SNDBLD01");
        assert_eq!(magic(&id), b"SNDMAP02");
    }
    site.assert_backup_equals_sources("vm", &alone, 2);
    let (status, v) = site.hub("POST", &verify(&alone["backup_id"]), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "it verifies on its own: {v}");
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_hub_stand_alone_failed 0\n"), "{metrics}");
    let (status, v) = site.hub("POST", &verify(&newest["backup_id"]), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "the chain under it is whole: {v}");
    change(&site.source("vm", 0), 0, 0x18);
    let next = site.backup("vm", "incremental").await;
    assert_eq!(
        (&next["backup_type"], &next["parent_id"], &next["note"]),
        (&json!("incremental"), &alone["backup_id"], &Value::Null),
        "{next}"
    );
    site.assert_backup_equals_sources("vm", &next, 2);
}

/// A VM disk grown (and another shrunk) between runs: the next backup and the next replica run
/// (qcow2 and raw replicas) take the new sizes (a full copy of those disks) and equal the sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_resized_between_runs_are_backed_up_and_replicated_at_their_new_size() {
    for (hub, ext) in [("", "qcow2"), ("replica_format = \"raw\"", "raw")] {
        let opts = Options { hub, ..Options::default() };
        let site = Site::start(Transport::Direct, &[Vm("vm", &[8, 6])], 4, opts).await;
        let replicate = || async {
            site.replicate("vm").await;
            for i in 0..2 {
                let replica = site.path().join(format!("replicas/vm/disk-{}.{ext}", 2000 + i));
                let size = match ext {
                    "qcow2" => {
                        assert_clean(&replica);
                        qcow2::Image::open(&replica).unwrap().size()
                    }
                    _ => std::fs::metadata(&replica).unwrap().len(),
                };
                let source = site.source("vm", i);
                assert_eq!(size, std::fs::metadata(&source).unwrap().len(), "{}", replica.display());
                assert_same(&source, &replica);
            }
        };
        site.backup("vm", "full").await;
        replicate().await;
        let grown = std::fs::OpenOptions::new().write(true).open(site.source("vm", 0)).unwrap();
        grown.set_len(12 * MIB).unwrap();
        change(&site.source("vm", 0), 11 * MIB, 0x66);
        let shrunk = std::fs::OpenOptions::new().write(true).open(site.source("vm", 1)).unwrap();
        shrunk.set_len(4 * MIB).unwrap();
        let next = site.backup("vm", "incremental").await;
        site.assert_backup_equals_sources("vm", &next, 2);
        replicate().await;
        // And the run after keeps the resized replicas in place.
        change(&site.source("vm", 1), MIB, 0x67);
        replicate().await;
    }
}

/// A qcow2 disk with a persistent bitmap, grown between runs: the hub gives it a fresh image of
/// its new size, and the node copies it whole (the bitmap knows only what changed, and the
/// committed state is of the old size), equal to the source (before: only the bitmap's blocks,
/// into an empty image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_qcow2_disk_with_a_bitmap_is_backed_up_whole() {
    let opts = Options { qcow2_sources: true, ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[8, 6])], 4, opts).await;
    site.backup("vm", "full").await;
    let grown = site.source("vm", 0);
    let out = site::tool("qemu-img").args(["resize", "-q"]).arg(&grown).arg("12M").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    change(&grown, 11 * MIB, 0x66);
    change(&site.source("vm", 1), MIB, 0x67);
    let next = site.backup("vm", "incremental").await;
    site.assert_backup_equals_sources("vm", &next, 2);
}

/// A disk that is not a whole number of 512-byte sectors: a backup into qcow2 is refused before
/// anything is made (qemu would not see its tail), with the disk and its size named; a raw
/// replica takes it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_of_part_sectors_is_refused_for_qcow2_and_replicated_whole_as_raw() {
    for (hub, ext) in [("", "qcow2"), ("replica_format = \"raw\"", "raw")] {
        let opts = Options { hub, ..Options::default() };
        let site = Site::start(Transport::Direct, &[Vm("vm", &[8, 6])], 4, opts).await;
        let odd = (5 * MIB + 123).to_string();
        std::fs::OpenOptions::new().write(true).open(site.source("vm", 0)).unwrap().set_len(5 * MIB + 123).unwrap();
        let (status, v) =
            site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "full"}))).await;
        assert_eq!(status, 409, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("disk 2000") && e.contains(&odd)), "{v}");
        assert!(site.backups("vm").await.is_empty());
        assert!(walk(&site.path().join("repo")).is_empty(), "nothing made");
        site.ports_all_free().await;
        let (status, rep) = site.hub("POST", "/api/v1/replications", Some(json!({"vm_name": "vm"}))).await;
        if ext == "qcow2" {
            assert_eq!(status, 409, "{rep}");
            continue;
        }
        assert_eq!(status, 202, "{rep}");
        let done = site.wait(&format!("/api/v1/replications/{}", rep["replication_id"].as_str().unwrap())).await;
        assert_eq!(done["status"], "completed", "{done}");
        let replica = site.path().join("replicas/vm/disk-2000.raw");
        assert_eq!(std::fs::read(&replica).unwrap(), std::fs::read(site.source("vm", 0)).unwrap());
    }
}

/// `backup` exported for restore by the hub, and node job `job` started to read it into
/// `destinations`.
async fn start_restore(site: &Site, backup: &Value, job: &str, destinations: &Value) {
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": backup["backup_id"]}))).await;
    assert_eq!(status, 201, "{r}");
    let body = json!({"job_id": job, "nbd_targets": r["nbd_targets_string"], "destinations": destinations});
    let (status, v) = site.node("POST", "/api/v1/restore/start", Some(body)).await;
    assert_eq!(status, 202, "{v}");
}

/// The hub killed in the middle of a restore: the node's restore fails with what went wrong
/// (nothing serves its export any more; a read cut mid-disk is retried for the node's retry
/// window first, as it would be through a dropped tunnel), the restarted hub lists no restore
/// and leases no port, and a new restore of the same backup completes, equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_mid_restore_fails_it_clearly_and_a_new_restore_completes() {
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let full = site.backup("vm", "full").await;
    let root = site.path().to_path_buf();
    let dest = |i: usize| root.join(format!("restores/vm-{i}.raw"));
    let destinations = json!({"2000": dest(0), "2001": dest(1)});
    start_restore(&site, &full, "restore-1", &destinations).await;
    // Killed once the first disk is under way (the node copies at its bandwidth limit).
    wait_restore_under_way(&site, "restore-1").await;
    site.kill_hub();
    site.start_hub();
    let failed = wait_node_job(&site, "restore-1").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("nbd://")), "the error names the export: {failed}");
    let (status, restores) = site.hub("GET", "/api/v1/restores", None).await;
    assert_eq!((status, restores), (200, json!([])));
    site.ports_all_free().await;
    start_restore(&site, &full, "restore-2", &destinations).await;
    let done = wait_node_job(&site, "restore-2").await;
    assert_eq!(done["status"], "completed", "{done}");
    for i in 0..2 {
        assert_same(&site.source("vm", i), &dest(i));
    }
}

/// A restore the hub drives (`destinations`): bad requests refused before anything is left open;
/// one cancelled mid-disk (`DELETE`) stops on the node, leaves the file it was replacing as it was
/// and frees its ports; and a backup whose image changed in the repository after it was verified
/// (rot, tampering) restores to `failed`, naming the disk, because what the node wrote does not
/// reproduce the backup's checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_the_hub_drives_refuses_bad_input_cancels_cleanly_and_catches_a_changed_backup() {
    let site = Site::start(Transport::Direct, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let full = site.backup("vm", "full").await;
    let id = full["backup_id"].as_str().unwrap();
    let root = site.path().to_path_buf();
    let dest = |i: usize| root.join(format!("restores/vm-{i}.raw"));
    for (body, status, says) in [
        (json!({"backup_id": id, "destinations": {"2005": dest(0)}}), 400, "has no disk 2005"),
        (json!({"backup_id": id, "destinations": {}}), 400, "names no disk"),
        (json!({"backup_id": id, "node": "n1"}), 400, "node goes with destinations"),
        (
            json!({"backup_id": id, "destinations": {"2000": dest(0)}, "node": "elsewhere"}),
            404,
            "unknown node elsewhere",
        ),
        (json!({"backup_id": id, "destinations": {"2000": "/etc/passwd"}}), 400, "node n1: "),
    ] {
        let (got, v) = site.hub("POST", "/api/v1/restores", Some(body.clone())).await;
        assert_eq!(got, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    site.ports_all_free().await;

    // Cancelled mid-disk: the file it was to replace stays as it was.
    let rid = &restore_over_an_old_file(&site, id, &dest(0)).await;
    let (status, v) = site.hub("DELETE", &format!("/api/v1/restores/{rid}"), None).await;
    assert_eq!((status, &v["status"]), (200, &json!("cancelled")), "{v}");
    site.ports_all_free().await;
    let on_node = wait_node_job(&site, rid).await;
    assert_eq!(on_node["status"], "cancelled", "{on_node}");
    assert_eq!(std::fs::read(dest(0)).unwrap(), b"the disk before");
    let (status, v) = site.hub("GET", &format!("/api/v1/restores/{rid}"), None).await;
    assert_eq!((status, &v["status"]), (200, &json!("cancelled")), "the record stays: {v}");

    // The backup changed where it is kept: read back, it is not what was backed up.
    change_behind_the_hubs_back(&site.image("vm", id, 1), "1M");
    let asked = json!({"backup_id": id, "destinations": {"2001": dest(1)}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!(status, 201, "{r}");
    let failed = wait_restore(&site, r["restore_id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("disk 2001 as written differs from the backup"), "{failed}");
    assert_eq!(failed["disks"][0]["checksum_match"], json!(false), "{failed}");
    site.ports_all_free().await;
}

/// The hub killed while it drives a restore its record does not name (removed here; it started
/// after the record's last write): its successor finds the restore in the repository's list of
/// restores in flight and cancels it on the node at once (before: the node retried the exports
/// that were gone for its whole retry window, 30 s here, holding the destination); the file the
/// restore was to replace is as it was, and the list is empty again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_the_hub_drove_when_it_was_killed_is_cancelled_on_the_node_when_it_starts_again() {
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[24, 16])], 4, SLOW).await;
    let full = site.backup("vm", "full").await;
    let root = site.path().to_path_buf();
    let dest = root.join("restores/vm-0.raw");
    let rid = restore_over_an_old_file(&site, full["backup_id"].as_str().unwrap(), &dest).await;
    let listed = site.as_hub_sees(&root.join("repo/.restores-in-flight.json"));
    let in_flight = || -> Value { serde_json::from_slice(&std::fs::read(&listed).unwrap()).unwrap() };
    assert_eq!(in_flight(), json!([["n1", rid]]));
    site.kill_hub();
    let _ = std::fs::remove_file(hub_record(&site));
    site.start_hub();
    // Cancelled by the new hub: left to its retry window, it would have ended "failed".
    let ended = wait_node_job(&site, &rid).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"the disk before");
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight() != json!([]) {
        assert!(Instant::now() < deadline, "still listed: {}", in_flight());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    site.ports_all_free().await;
}

/// Scrubbing (`verify_every_days`, here about 2.6 s): every backup is verified again in the
/// background and the outcome kept beside its manifest; an image changed in the repository after its
/// backup (qemu-io writes 64 KiB into it) is found by the next pass, its backup marked failed with
/// the disk named, and counted in the metrics; the incremental on top, whose chain reads through
/// that image, fails too; `POST .../verify` records its outcome the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrubbing_verifies_every_backup_again_and_finds_an_image_changed_behind_the_hubs_back() {
    let opts = Options { hub: "verify_every_days = 0.00003", ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[4, 2])], 4, opts).await;
    let full = site.backup("vm", "full").await;
    change(&site.source("vm", 0), MIB, 0x31);
    let incr = site.backup("vm", "incremental").await;
    let ids = [full["backup_id"].as_str().unwrap(), incr["backup_id"].as_str().unwrap()];
    let verified = |b: &Value| b["verified"]["at"].as_str().map(str::to_string);
    // Both verified again by the scrub, and found whole.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first: Vec<String> = loop {
        let list = site.backups("vm").await;
        let seen: Vec<String> = list.iter().filter_map(verified).collect();
        if seen.len() == 2 {
            assert!(list.iter().all(|b| b["verified"]["ok"] == json!(true)), "{list:?}");
            break seen;
        }
        assert!(Instant::now() < deadline, "not scrubbed: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kept = std::fs::read(site.image("vm", ids[0], 0).with_file_name("verified.json")).unwrap();
    let kept: Value = serde_json::from_slice(&kept).unwrap();
    assert_eq!(kept["ok"], json!(true), "kept beside the manifest: {kept}");

    // The full backup's first image changed behind the hub's back.
    change_behind_the_hubs_back(&site.image("vm", ids[0], 0), "2M");
    let failed = wait_failed_verification(&site, ids[0]).await;
    let error = failed["verified"]["error"].as_str().unwrap();
    assert!(error.contains("disk 2000") && error.contains("differs from its checksum"), "{failed}");
    assert_ne!(verified(&failed).as_deref(), Some(first[0].as_str()), "a later verification: {failed}");
    // The incremental's own layer is whole, but it reads through that image: it fails too.
    let above = wait_failed_verification(&site, ids[1]).await;
    let error = above["verified"]["error"].as_str().unwrap();
    assert!(error.contains(&format!("reads through backup {}", ids[0])), "{above}");
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_hub_backups_verify_failed 2"), "{metrics}");

    // A request's verify re-reads the whole chain and finds the same, recorded as well.
    let (status, v) = site.hub("POST", &format!("/api/v1/backups/{}/verify", ids[1]), None).await;
    assert_eq!((status, &v["ok"], &v["disks"][0]["checksum_match"]), (200, &json!(false), &json!(false)), "{v}");
    let (_, b) = site.hub("GET", &format!("/api/v1/backups/{}", ids[1]), None).await;
    assert!(b["verified"]["error"].as_str().unwrap().contains("disk 2000"), "{b}");
}

/// This machine's address on its way out (no packet is sent): a client connecting to it is
/// not on loopback.
fn non_loopback_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect("192.0.2.1:9").expect("this test needs a network interface besides loopback");
    let ip = probe.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

/// A restore of `backup` opened, as the URL of its first disk's export.
async fn restore_url(site: &Site, backup: &Value) -> String {
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": backup["backup_id"]}))).await;
    assert_eq!(status, 201, "{r}");
    let export = &r["exports"][0];
    format!("nbd://127.0.0.1:{}/{}", export["nbd_port"].as_u64().unwrap(), export["nbd_export_name"].as_str().unwrap())
}

/// Over loopback an export admits root, the hub's own account and `nbd_local_users` (OpenSSH's
/// login user, when sshd forwards for the nodes): any other account on the hub is answered with
/// the reason and reads nothing of a restore left open. Runs as root (as `scripts/test.sh` does),
/// to connect as another account with `setpriv`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_refuses_local_users_the_hub_does_not_admit() {
    assert_eq!(rustix::process::geteuid().as_raw(), 0, "this test runs as root: it connects as `nobody` with setpriv");
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[4])], 4, Options::default()).await;
    let full = site.backup("vm", "full").await;
    let nbdinfo = |url: &str, as_nobody: bool| {
        let mut cmd = match as_nobody {
            true => {
                let mut c = site::tool("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(site::tool("nbdinfo").get_program());
                c
            }
            false => site::tool("nbdinfo"),
        };
        let out = cmd.arg("--size").arg(url).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let url = restore_url(&site, &full).await;
    let (ok, size, err) = nbdinfo(&url, false);
    assert!(ok && size == (4 * MIB).to_string(), "root reads it: {err}");
    let (ok, _, err) = nbdinfo(&url, true);
    assert!(!ok && err.contains("server policy prevents NBD_OPT_GO"), "nobody was let in: {err}");

    // Named in nbd_local_users (a top-level key, before the [[node]] tables), it is admitted.
    let config = site.path().join("hub.toml");
    let text = format!("nbd_local_users = [\"nobody\"]\n{}", std::fs::read_to_string(&config).unwrap());
    std::fs::write(&config, text).unwrap();
    site.kill_hub();
    site.start_hub();
    site.wait_node_reachable().await;
    let url = restore_url(&site, &full).await;
    let (ok, size, err) = nbdinfo(&url, true);
    assert!(ok && size == (4 * MIB).to_string(), "nobody, now admitted, reads it: {err}");
}

/// Exports listening on every address (direct mode on a LAN) admit only this machine's clients
/// over loopback (of the accounts they admit) and the node (its url's host here): a client from
/// elsewhere is answered with the reason, whatever it asks for, and never reads or writes a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_on_the_lan_refuses_clients_that_are_not_its_node_and_says_why() {
    let lan = non_loopback_address();
    // The node may reach the hub at that address (its nbd_hosts), so what refuses is the hub.
    let node_lines = format!("nbd_hosts = [\"{lan}\"]");
    let opts = Options { hub: "nbd_bind = \"0.0.0.0\"", node: &node_lines, ..Options::default() };
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[4])], 4, opts).await;
    let full = site.backup("vm", "full").await;
    site.assert_backup_equals_sources("vm", &full, 1);
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": full["backup_id"]}))).await;
    assert_eq!(status, 201, "{r}");
    let (port, name) =
        (r["exports"][0]["nbd_port"].as_u64().unwrap(), r["exports"][0]["nbd_export_name"].as_str().unwrap());
    let nbdinfo = |host: String| {
        let out = site::tool("nbdinfo").arg("--size").arg(format!("nbd://{host}:{port}/{name}")).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, size, err) = nbdinfo("127.0.0.1".into());
    assert!(ok, "{err}");
    assert_eq!(size, (4 * MIB).to_string());
    let (ok, _, err) = nbdinfo(lan.to_string());
    assert!(!ok && err.contains("server policy prevents NBD_OPT_GO"), "a client at {lan} was let in: {err}");
    // The node, were its connections to leave from that address, fails at once with the fix.
    let targets = r["nbd_targets_string"].as_str().unwrap().replace("127.0.0.1", &lan.to_string());
    let dest = site.path().join("restores/vm-0.raw");
    let body = json!({"job_id": "from-lan", "nbd_targets": targets, "destinations": {"2000": dest}});
    let (status, v) = site.node("POST", "/api/v1/restore/start", Some(body)).await;
    assert_eq!(status, 202, "{v}");
    let view = wait_node_job(&site, "from-lan").await;
    assert_eq!(view["status"], "failed", "{view}");
    let error = view["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not take NBD clients from")
            && error.contains(&lan.to_string())
            && error.contains("nbd_peers"),
        "{view}"
    );
    assert!(!dest.exists() || std::fs::metadata(&dest).unwrap().len() == 0, "nothing restored from a refused export");
    let (status, _) =
        site.hub("DELETE", &format!("/api/v1/restores/{}", r["restore_id"].as_str().unwrap()), None).await;
    assert_eq!(status, 200);

    // Given as the node's nbd_peers (the hub's [[node]] table ends its config), that address is
    // admitted: the restore from it completes, equal to the source.
    let config = site.path().join("hub.toml");
    let text = std::fs::read_to_string(&config).unwrap() + &format!("nbd_peers = [\"127.0.0.1\", \"{lan}\"]\n");
    std::fs::write(&config, text).unwrap();
    site.kill_hub();
    site.start_hub();
    site.wait_node_reachable().await;
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": full["backup_id"]}))).await;
    assert_eq!(status, 201, "{r}");
    let targets = r["nbd_targets_string"].as_str().unwrap().replace("127.0.0.1", &lan.to_string());
    let body = json!({"job_id": "from-peer", "nbd_targets": targets, "destinations": {"2000": dest}});
    let (status, v) = site.node("POST", "/api/v1/restore/start", Some(body)).await;
    assert_eq!(status, 202, "{v}");
    let view = wait_node_job(&site, "from-peer").await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_same(&site.source("vm", 0), &dest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_disk_that_disappears_fails_the_job_with_a_clear_error() {
    // Big enough that the node is still reading it when it goes (it reads ahead of the limit).
    let site = Site::start(Transport::Direct, &[Vm("vm", &[96, 8])], 4, SLOW).await;
    let id = site.start_backup("vm", "full").await;
    site.wait_progress(&format!("/api/v1/backups/{id}"), MIB).await;
    // The disk goes away under the job (an LV removed, a snapshot dropped): what the node
    // has open now ends at 0.
    std::fs::OpenOptions::new().write(true).open(site.source("vm", 0)).unwrap().set_len(0).unwrap();
    let v = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("shrank or disappeared"), "{v}");
    assert_nothing_half_made(&site, "vm", &[], &id).await;
    // A disk that is gone before the run: refused at the start, nothing created.
    std::fs::remove_file(site.source("vm", 0)).unwrap();
    let (status, v) = site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "full"}))).await;
    assert!(status >= 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("vm-0.raw"), "names the missing disk: {v}");
    assert_nothing_half_made(&site, "vm", &[], &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_repository_fails_the_job_with_enospc_and_corrupts_nothing() {
    let opts = Options { repo_tmpfs_mib: Some(20), ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[8, 4]), Vm("big", &[64, 8])], 4, opts).await;
    let small = site.backup("vm", "full").await;
    let id = site.start_backup("big", "full").await;
    let v = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap().to_lowercase();
    assert!(error.contains("no space") || error.contains("enospc"), "{v}");
    assert_nothing_half_made(&site, "big", &[], &id).await;
    // What was there before is intact, and the space came back: the next small run works.
    let (status, check) =
        site.hub("POST", &format!("/api/v1/backups/{}/verify", small["backup_id"].as_str().unwrap()), None).await;
    assert_eq!((status, &check["ok"]), (200, &json!(true)), "{check}");
    site.assert_backup_equals_sources("vm", &small, 2);
    change(&site.source("vm", 0), MIB, 1);
    let incr = site.backup("vm", "incremental").await;
    site.assert_backup_equals_sources("vm", &incr, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_at_once_through_the_endpoint() {
    let names: Vec<String> = (0..20).map(|i| format!("vm{i:02}")).collect();
    let vms: Vec<Vm> = names.iter().map(|n| Vm(n, &[8, 4])).collect();
    let site = Site::start(Transport::Endpoint, &vms, 40, Options::default()).await;
    let mut ids = Vec::new();
    for n in &names {
        ids.push(site.start_backup(n, "full").await);
    }
    for (n, id) in names.iter().zip(&ids) {
        let done = site.wait(&format!("/api/v1/backups/{id}")).await;
        assert_eq!(done["status"], "completed", "{n}: {done}");
        site.assert_backup_equals_sources(n, &done, 2);
    }
    site.ports_all_free().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_one_disks_in_flight_through_the_endpoint_and_one_more_refused() {
    let fleet = [4u64; 101];
    let opts = Options { copy: "bandwidth_limit = \"50M\"", ..Options::default() };
    let site = Site::start(Transport::Endpoint, &[Vm("fleet", &fleet), Vm("one", &[4])], 101, opts).await;
    let id = site.start_backup("fleet", "full").await;
    let (_, p) = site.hub("GET", "/api/v1/ports", None).await;
    assert_eq!((p["free"].as_u64(), p["leased"].as_array().map(Vec::len)), (Some(0), Some(101)), "{p}");
    let (status, body) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "one", "backup_type": "full"}))).await;
    assert_eq!(status, 503, "the 102nd disk: {body}");
    assert!(body["error"].as_str().unwrap().contains("101 leased"), "{body}");
    let done = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("fleet", &done, 101);
    site.ports_all_free().await;
    let one = site.backup("one", "full").await;
    site.assert_backup_equals_sources("one", &one, 1);
}
