//! The configuration taken up by a running hub (`SIGHUP`, `systemctl reload`): a schedule and a
//! retention added without a restart and at work at once; a change only a restart takes up
//! named in the metrics; a file that does not check refused, the hub running on as it was; a
//! schedule removed; a node's SSH key revoked and given back.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::schedule::wait_run;
use crate::site::{Options, Site, Transport, Vm};

const SCHEDULE: &str = "\n[[schedule]]\nname = \"often\"\nvms = [\"vm-a\"]\nevery = \"5s\"\n";

/// The hub's configuration file with `keys` at its top level (after the site's own).
fn rewrite(site: &Site, original: &str, keys: &str) {
    let text = original.replacen("stall_timeout_s = 20\n", &format!("stall_timeout_s = 20\n{keys}\n"), 1);
    assert_ne!(text, original, "the site's hub.toml has its stall_timeout_s line");
    std::fs::write(site.hub_config(), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_up_schedules_and_retention_and_refuses_a_bad_file_without_stopping() {
    let vms = [Vm("vm-a", &[4]), Vm("vm-b", &[4])];
    let site = Site::start(Transport::Direct, &vms, 8, Options::default()).await;
    let original = std::fs::read_to_string(site.hub_config()).unwrap();
    let (_, none) = site.hub("GET", "/api/v1/schedules", None).await;
    assert_eq!(none, json!([]));
    // A backup under way when the reload comes goes on to its end.
    let busy = site.start_backup("vm-b", "full").await;

    // A schedule, a retention of one backup, and a port range only a restart takes up.
    let ports = original.lines().find(|l| l.starts_with("nbd_ports")).unwrap();
    let range = ports.trim_start_matches("nbd_ports = \"").trim_end_matches('"');
    let (first, _) = range.split_once('-').unwrap();
    let narrower = original.replace(ports, &format!("nbd_ports = \"{first}-{first}\""));
    rewrite(&site, &narrower, &format!("keep_backups = 1{SCHEDULE}"));
    site.signal_hub("HUP");
    let metrics = site.wait_hub_metric("sendense_hub_config_restart_pending{key=\"nbd_ports\"} 1").await;
    assert!(metrics.contains("sendense_hub_config_last_reload_successful 1"), "{metrics}");
    let run = wait_run(&site, "often", None).await;
    let b = &run["last_run"]["backups"][0];
    assert_eq!((&b["vm_name"], &b["status"]), (&json!("vm-a"), &json!("completed")), "{run}");
    assert_eq!(site.wait(&format!("/api/v1/backups/{busy}")).await["status"], "completed");
    // The port range in force is the one the hub started with.
    let (_, leases) = site.hub("GET", "/api/v1/ports", None).await;
    assert_eq!(leases["range"], json!(range), "{leases}");

    // The next run's incremental, then the retention of one backup: the full merged into it.
    let second = wait_run(&site, "often", run["last_run"]["started_at"].as_str()).await;
    assert_eq!(second["last_run"]["backups"][0]["status"], "completed", "{second}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.backups("vm-a").await.len() > 1 {
        assert!(Instant::now() < deadline, "keep_backups = 1 not applied: {:?}", site.backups("vm-a").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A file that does not check: refused, the schedule goes on as it was.
    rewrite(&site, &original, "keep_backups = 1\n\n[[schedule]]\nname = \"often\"\nvms = [\"vm-a\"]\nevery = \"4s\"\n");
    site.signal_hub("HUP");
    site.wait_hub_metric("sendense_hub_config_last_reload_successful 0").await;
    let (status, view) = site.hub("GET", "/api/v1/schedules/often", None).await;
    assert_eq!((status, &view["when"]), (200, &json!("every 5s")), "{view}");
    let third = wait_run(&site, "often", second["last_run"]["started_at"].as_str()).await;
    assert_eq!(third["last_run"]["backups"][0]["status"], "completed", "{third}");

    // The schedule removed (and the port range back): no more runs, nothing pending.
    std::fs::write(site.hub_config(), &original).unwrap();
    site.signal_hub("HUP");
    let metrics = site.wait_hub_metric("sendense_hub_config_last_reload_successful 1").await;
    assert!(!metrics.contains("sendense_hub_config_restart_pending{"), "{metrics}");
    let (status, gone) = site.hub("GET", "/api/v1/schedules/often", None).await;
    assert_eq!(status, 404, "{gone}");
    let (_, list) = site.hub("GET", "/api/v1/schedules", None).await;
    assert_eq!(list, json!([]));
    let count = |v: Vec<Value>| v.len();
    let settled = count(site.backups("vm-a").await);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (status, _) = site.hub("GET", "/healthz", None).await;
    assert_eq!(status, 200);
    assert!(count(site.backups("vm-a").await) <= settled, "a removed schedule ran again");
}

/// A VM added to node.toml and the node told to reload: listed at once and backed up through the
/// hub, while a backup that was under way on the node goes on to its end; a node.toml that does
/// not check is refused and the node runs on with its VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reload_adds_a_vm_the_hub_backs_up_while_a_running_backup_goes_on() {
    let opts = Options { copy: "bandwidth_limit = \"8M\"", ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm-a", &[32])], 8, opts).await;
    let busy = site.start_backup("vm-a", "full").await;
    site.wait_progress(&format!("/api/v1/backups/{busy}"), 1 << 20).await;

    crate::site::make_source(&site.source("vm-c", 0), 4, 77);
    let original = std::fs::read_to_string(site.node_config()).unwrap();
    let added = format!(
        "{original}[[vm]]\nname = \"vm-c\"\n[[vm.disk]]\nkey = 2000\nsource = \"{}\"\n",
        site.source("vm-c", 0).display()
    );
    std::fs::write(site.node_config(), &added).unwrap();
    site.signal_node("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = site.node("GET", "/api/v1/vms/vm-c", None).await;
        if status == 200 {
            assert_eq!(v["disks"][0]["size"], 4 << 20, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "vm-c not taken up: {status} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, running) = site.hub("GET", &format!("/api/v1/backups/{busy}"), None).await;
    assert_eq!(running["status"], "running", "the reload came while vm-a's backup went on: {running}");

    let backup = site.backup("vm-c", "full").await;
    assert_eq!(backup["status"], "completed", "{backup}");
    site.assert_backup_equals_sources("vm-c", &backup, 1);
    let done = site.wait(&format!("/api/v1/backups/{busy}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("vm-a", &done, 1);

    // A node.toml that does not check: refused, vm-c still there.
    std::fs::write(site.node_config(), format!("{added}[[vm.disk]]\nkey = 2000\nsource = \"/dev/null\"\n")).unwrap();
    site.signal_node("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = site.node("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap().to_string();
        if metrics.lines().any(|l| l == "sendense_node_config_last_reload_successful 0") {
            break;
        }
        assert!(Instant::now() < deadline, "the bad file was not refused:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = site.node("GET", "/api/v1/vms/vm-c", None).await;
    assert_eq!(status, 200, "{v}");
    let again = site.backup("vm-c", "incremental").await;
    assert_eq!(again["status"], "completed", "{again}");
}

/// `SIGHUP` to the hub, and wait until it has taken its file up (the time of the configuration in
/// force moved on).
async fn reloaded(site: &Site) {
    let loaded_at = || async {
        let (_, metrics) = site.hub("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        let at =
            metrics.lines().find_map(|l| l.strip_prefix("sendense_hub_config_last_reload_success_timestamp_seconds "));
        at.expect("the hub's metrics say when its configuration was loaded").to_string()
    };
    let before = loaded_at().await;
    site.signal_hub("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while loaded_at().await == before {
        assert!(Instant::now() < deadline, "the hub did not take its file up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's tunnel status (`GET /api/v1/tunnel` on the node) once `until` holds of it.
async fn wait_tunnel(site: &Site, within: Duration, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, t) = site.node("GET", "/api/v1/tunnel", None).await;
        if until(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "the node's tunnel: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node's SSH key revoked by a reload (its `[[node]] key` line replaced by another key's, as a
/// line pasted wrong would): its tunnel is cut at once and refused from then on, nothing waiting
/// for a restart, and the hub tells the operator why (the node's key refused as one it does not
/// know, beside the key it holds for the node); the key given back by another reload: the node is
/// back by itself (at its longest backoff) and backs up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_revokes_a_nodes_key_at_once_and_another_gives_it_back() {
    let vms = [Vm("vm-a", &[4])];
    let site = Site::start(Transport::Endpoint, &vms, 8, Options::default()).await;
    let original = std::fs::read_to_string(site.hub_config()).unwrap();
    assert_eq!(site.backup("vm-a", "full").await["status"], "completed");
    let up = wait_tunnel(&site, Duration::from_secs(10), |t| t["connected"] == true).await;
    let (_, n1) = site.hub("GET", "/api/v1/nodes/n1", None).await;
    let node_key = site.path().join("node_key.pub");
    assert_eq!(n1["key_fingerprint"], json!(crate::site::fingerprint(&node_key)), "{n1}");
    assert_eq!(n1["refused_logins"], json!([]), "{n1}");
    let (_, ssh) = site.hub("GET", "/api/v1/ssh", None).await;
    let hub_host_key = crate::site::fingerprint(&site.path().join("hub_host_key.pub"));
    assert_eq!(ssh["host_key_fingerprint"], json!(hub_host_key), "{ssh}");
    let sessions = ssh["sessions"].as_array().unwrap();
    assert!(!sessions.is_empty() && sessions.iter().all(|s| s["node"] == "n1"), "{ssh}");

    let wrong_key = site.path().join("wrong_key");
    crate::site::ssh::keygen(&wrong_key);
    let wrong_line = std::fs::read_to_string(wrong_key.with_extension("pub")).unwrap();
    let key_line = original.lines().find(|l| l.starts_with("key = ")).expect("the node's key line").to_string();
    let wrong = original.replace(&key_line, &format!("key = \"{}\"", wrong_line.trim()));
    assert_ne!(wrong, original);
    std::fs::write(site.hub_config(), wrong).unwrap();
    site.signal_hub("HUP");
    let cut = wait_tunnel(&site, Duration::from_secs(10), |t| t["connected"] == false).await;
    assert_eq!(cut["reconnects"], up["reconnects"], "{cut}");
    // Refused from then on: the node's next attempts are turned away (it says so), for good.
    let refused = wait_tunnel(&site, Duration::from_secs(20), |t| t["state"] == "refused").await;
    // ... naming its key, to compare with what the hub holds.
    let node_fingerprint = crate::site::fingerprint(&node_key);
    let said = refused["last_error"].as_str().unwrap_or("");
    assert!(said.contains(&format!("refused the key {node_fingerprint}")), "{refused}");
    let metrics = site.wait_hub_metric("sendense_hub_config_last_reload_successful 1").await;
    assert!(!metrics.contains("sendense_hub_config_restart_pending{key=\"node\"}"), "{metrics}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, still) = site.node("GET", "/api/v1/tunnel", None).await;
    assert_eq!(still["connected"], false, "{still}");
    // The hub says the node is out of reach and that no tunnel of it is logged in.
    let (_, nodes) = site.hub("GET", "/api/v1/nodes", None).await;
    assert_eq!((&nodes[0]["reachable"], &nodes[0]["tunnel_sessions"]), (&json!(false), &json!([])), "{nodes}");
    assert_eq!(nodes[0]["key_fingerprint"], json!(crate::site::fingerprint(&wrong_key.with_extension("pub"))));
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("sendense_hub_node_tunnel_sessions{node=\"n1\"} 0\n"), "{metrics}");
    // And which key was refused, from where: the node's own, a key it no longer knows.
    let (status, ssh) = site.hub("GET", "/api/v1/ssh", None).await;
    assert_eq!(status, 200, "{ssh}");
    assert_eq!(ssh["sessions"], json!([]), "{ssh}");
    let refusals = ssh["refused_logins"].as_array().unwrap();
    let theirs = refusals.iter().find(|r| r["fingerprint"] == json!(node_fingerprint));
    let theirs = theirs.unwrap_or_else(|| panic!("the node's key among the refused: {ssh}"));
    assert_eq!((&theirs["reason"], &theirs["peer"]), (&json!("unknown-key"), &json!("127.0.0.1")), "{theirs}");
    assert!(theirs.get("node").is_none() && theirs["count"].as_u64() >= Some(1), "{theirs}");
    let total =
        metrics.lines().find_map(|l| l.strip_prefix("sendense_hub_ssh_logins_refused_total{reason=\"unknown-key\"} "));
    assert!(total.and_then(|n| n.parse::<u64>().ok()) >= Some(1), "{metrics}");
    // A client pinning another host key than the hub's (OpenSSH's ssh here) gives up before it
    // logs in: told as such, beside the hub's host key.
    let ssh_port = original
        .lines()
        .filter_map(|l| l.strip_prefix("listen = \"127.0.0.1:").and_then(|p| p.strip_suffix('"')))
        .filter_map(|p| p.parse::<u16>().ok())
        .find(|p| *p != site.hub_api)
        .expect("the hub's [ssh] listen line");
    let dir = site.path().to_path_buf();
    crate::site::ssh::keygen(&dir.join("other_host_key"));
    crate::site::ssh::known_hosts(&dir, ssh_port, &dir.join("other_host_key.pub"));
    let out = crate::site::ssh::ssh(&dir, ssh_port, "wrong_key", &["-N"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let (_, ssh) = site.hub("GET", "/api/v1/ssh", None).await;
        let refused = ssh["refused_logins"].as_array().unwrap();
        if let Some(ended) = refused.iter().find(|r| r["reason"] == "ended-before-login") {
            break ended.clone();
        }
        assert!(Instant::now() < deadline, "a connection that ended before its login: {ssh}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ended.get("fingerprint").is_none() && ended["peer"] == "127.0.0.1", "{ended}");
    let (code, said) = nodes_command(&site, &[]).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("DOWN") && said.contains("no tunnel session (the node's tunnel does not connect)"), "{said}");
    let compare = format!("its key here is {}", crate::site::fingerprint(&wrong_key.with_extension("pub")));
    assert!(said.contains(&compare) && said.contains(&format!("{node_fingerprint} from 127.0.0.1 (")), "{said}");
    assert!(said.contains(&format!("must be the hub's host key, {hub_host_key}")), "{said}");

    // The key back: the node connects again by itself and backs up.
    std::fs::write(site.hub_config(), &original).unwrap();
    site.signal_hub("HUP");
    wait_tunnel(&site, Duration::from_secs(60), |t| t["connected"] == true).await;
    site.wait_node_reachable().await;
    let (code, said) = nodes_command(&site, &["n1"]).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("tunnel session(s), from 127.0.0.1:"), "{said}");
    // The address it logged in from is kept for the next start (places before login for it).
    let kept = site.as_hub_sees(&site.path().join("repo/.ssh-known-addresses"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&kept).unwrap_or_default() != "127.0.0.1\n" {
        assert!(Instant::now() < deadline, "{:?}", std::fs::read_to_string(&kept));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let incremental = site.backup("vm-a", "incremental").await;
    assert_eq!(incremental["status"], "completed", "{incremental}");
    site.assert_backup_equals_sources("vm-a", &incremental, 1);
}

/// `sendense-hub nodes ARGS` against the site's hub, found from its hub.toml: exit status and
/// stdout.
async fn nodes_command(site: &Site, args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .arg("nodes")
        .args(args)
        .arg("--config")
        .arg(site.hub_config())
        .output()
        .await
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node added by a reload: its tunnel admitted and its VM backed up at once, no restart. Removed
/// while its backup runs: the reload is refused whole (its end needs the node) and the backup
/// completes. Removed once it has ended: its tunnel cut and refused, its VM no longer found, its
/// backups kept; the first node backs up throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_node_backed_up_at_once_and_removes_it_once_its_runs_have_ended() {
    let site = Site::start(Transport::Endpoint, &[Vm("vm-a", &[4])], 8, Options::default()).await;
    let original = std::fs::read_to_string(site.hub_config()).unwrap();
    // Slow enough (8 MiB, half of it data, at 1 MiB/s) that the reload below comes while its
    // backup runs.
    let mut other = site.other_node("n2", Vm("vm-b", &[8]), "bandwidth_limit = \"1M\"");
    let (status, body) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm-b", "backup_type": "full"}))).await;
    assert_eq!(status, 404, "not a node of the hub yet: {body}");

    std::fs::write(site.hub_config(), format!("{original}{}", other.table)).unwrap();
    reloaded(&site).await;
    other.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = other.get("/api/v1/tunnel").await;
        if t["connected"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the added node's tunnel: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, nodes) = site.hub("GET", "/api/v1/nodes", None).await;
    let names: Vec<_> = nodes.as_array().unwrap().iter().map(|n| (n["name"].clone(), n["reachable"].clone())).collect();
    assert_eq!(names, [(json!("n1"), json!(true)), (json!("n2"), json!(true))], "{nodes}");
    assert_eq!(nodes[1]["vms"][0]["name"], "vm-b", "{nodes}");
    // Each node's tunnel sessions at the hub's endpoint, by the node of the key each logged in with.
    for n in nodes.as_array().unwrap() {
        let sessions = n["tunnel_sessions"].as_array().unwrap();
        assert!(!sessions.is_empty(), "{nodes}");
        assert!(sessions.iter().all(|s| s["peer"].as_str().unwrap().starts_with("127.0.0.1:")), "{nodes}");
    }
    let id = site.start_backup("vm-b", "full").await;
    let (_, job) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(job["node"], "n2", "{job}");

    // Removed while its backup runs: refused whole, the backup goes on.
    let metrics = site.wait_hub_metric("sendense_hub_config_last_reload_successful 1").await;
    assert!(!metrics.contains("sendense_hub_config_restart_pending{"), "{metrics}");
    std::fs::write(site.hub_config(), &original).unwrap();
    site.signal_hub("HUP");
    site.wait_hub_metric("sendense_hub_config_last_reload_successful 0").await;
    let done = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("vm-b", &done, 1);
    assert_eq!(other.get("/api/v1/tunnel").await["connected"], true);

    // Removed once it has ended: its tunnel cut and refused, its VM no longer found.
    reloaded(&site).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = other.get("/api/v1/tunnel").await;
        if t["state"] == "refused" {
            assert!(t["last_error"].as_str().unwrap_or("").contains("refused the key"), "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "the removed node's tunnel: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm-b", "backup_type": "full"}))).await;
    assert_eq!(status, 404, "{body}");
    let (_, nodes) = site.hub("GET", "/api/v1/nodes", None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(site.backups("vm-b").await.len(), 1, "its backups are kept");
    let incremental = site.backup("vm-a", "incremental").await;
    assert_eq!(incremental["status"], "completed", "{incremental}");
    site.assert_backup_equals_sources("vm-a", &incremental, 1);
}
