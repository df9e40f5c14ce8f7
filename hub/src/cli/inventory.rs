//! What the hub has to protect, as it sees it now. `sendense-hub nodes [NAME]` (`GET
//! /api/v1/nodes[/NAME]`, each node checked by the call): whether each answers and why not (with
//! its tunnel sessions at the hub's SSH endpoint, which say which side to look at), its VMs, what
//! runs on it; one node with its VMs' disks, its tunnel as it reports it and its sessions. Exits 0
//! only if every node shown answered, so a script or a monitoring check can run it as it is. A
//! node with no tunnel session is shown the logins the endpoint refused lately: its own key's
//! (expired, from an address not allowed) and those of keys the hub does not know, beside its
//! key's fingerprint, for the operator to compare with the node's; and connections that ended
//! before they logged in, beside the hub's host key (a node pinning another one).
//! `sendense-hub vms` (`GET /api/v1/vms`): every VM a node lists or with backups, and its newest
//! backup or that it never had one.

use reqwest::Method;
use serde_json::Value;

use crate::client::HubClient;

/// Every node, a line each; `Ok(true)` when all answered.
///
/// # Errors
/// The hub cannot be reached.
pub async fn nodes(client: &HubClient) -> anyhow::Result<bool> {
    let nodes = client.expect(Method::GET, "/api/v1/nodes", None, 200).await?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let strangers = strangers(client, &nodes).await?;
    println!("{:<16} {:<6} {:>4} {:>8}  {:<32} LAST SEEN", "NODE", "STATE", "VMS", "RUNNING", "URL");
    for n in &nodes {
        println!(
            "{:<16} {:<6} {:>4} {:>8}  {:<32} {}",
            n["name"].as_str().unwrap_or("?"),
            state(n),
            n["vms"].as_array().map_or(0, Vec::len),
            n["running"].as_array().map_or(0, Vec::len),
            n["url"].as_str().unwrap_or("?"),
            n["last_seen"].as_str().unwrap_or("never"),
        );
        if let Some(error) = n["error"].as_str() {
            println!("  {error}");
            if let Some(sessions) = n["tunnel_sessions"].as_array() {
                println!("  {}", sessions_text(sessions));
            }
            for line in refused_text(n, &strangers) {
                println!("  {line}");
            }
        }
    }
    if nodes.is_empty() {
        println!("no [[node]] in the hub's configuration");
    }
    Ok(nodes.iter().all(|n| n["reachable"] == true))
}

/// One node: its state, VMs with their disks, what runs on it, its tunnel; `Ok(true)` when it
/// answered.
///
/// # Errors
/// The hub cannot be reached or has no such node.
pub async fn node(client: &HubClient, name: &str) -> anyhow::Result<bool> {
    let n = client.expect(Method::GET, &format!("/api/v1/nodes/{name}"), None, 200).await?;
    let strangers = strangers(client, std::slice::from_ref(&n)).await?;
    println!("node {name} at {}: {}", n["url"].as_str().unwrap_or("?"), state(&n));
    if let Some(error) = n["error"].as_str() {
        println!("  {error}");
    }
    println!("  last seen: {}", n["last_seen"].as_str().unwrap_or("never since the hub started"));
    if let Some(key) = n["key_fingerprint"].as_str() {
        println!("  key: {key}");
    }
    if let Some(sessions) = n["tunnel_sessions"].as_array() {
        println!("  {}", sessions_text(sessions));
    }
    for line in refused_text(&n, &strangers) {
        println!("  {line}");
    }
    if let Some(t) = n["tunnel"].as_object().filter(|t| t.get("enabled") == Some(&Value::Bool(true))) {
        let field = |k: &str| t.get(k).cloned().unwrap_or(Value::Null);
        println!(
            "  tunnel: {} to {}, {} SSH connection(s), {} reconnect(s){}",
            field("state").as_str().unwrap_or("?"),
            field("hub").as_str().unwrap_or("?"),
            field("ssh_connections"),
            field("reconnects"),
            field("last_error").as_str().map(|e| format!(", last error: {e}")).unwrap_or_default(),
        );
    }
    for r in n["running"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        println!("  running: {r}");
    }
    for vm in n["vms"].as_array().into_iter().flatten() {
        let disks: Vec<String> = vm["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| match d["error"].as_str() {
                Some(e) => format!("{} ({e})", d["key"]),
                None => format!(
                    "{} {} {}",
                    d["key"],
                    node::progress::human(d["size"].as_u64().unwrap_or(0)),
                    d["format"].as_str().unwrap_or("")
                ),
            })
            .collect();
        println!("  vm {}: {}", vm["name"].as_str().unwrap_or("?"), disks.join(", "));
    }
    Ok(n["reachable"] == true)
}

/// `up`, or `DOWN` (capitals: it is what an operator looks for).
fn state(node: &Value) -> &'static str {
    match node["reachable"] == true {
        true => "up",
        false => "DOWN",
    }
}

/// Every VM a node lists or with backups, a line each: its newest backup, or `NEVER BACKED UP`;
/// `IN NO BACKUP SCHEDULE` when no backup schedule covers it (unless one excludes it on purpose).
///
/// # Errors
/// The hub cannot be reached.
pub async fn vms(client: &HubClient) -> anyhow::Result<()> {
    let vms = client.expect(Method::GET, "/api/v1/vms", None, 200).await?;
    let vms = vms.as_array().cloned().unwrap_or_default();
    println!("{:<20} {:<12} {:>10} {:>7}  NEWEST BACKUP", "VM", "NODE", "SIZE", "BACKUPS");
    for v in &vms {
        let size: u64 = v["disks"].as_array().into_iter().flatten().filter_map(|d| d["size"].as_u64()).sum();
        let newest = match &v["newest_backup"] {
            Value::Object(b) => format!(
                "{} {} ({})",
                b.get("completed_at").and_then(Value::as_str).unwrap_or("?"),
                b.get("backup_id").and_then(Value::as_str).unwrap_or("?"),
                b.get("backup_type").and_then(Value::as_str).unwrap_or("?"),
            ),
            _ => "NEVER BACKED UP".to_string(),
        };
        let mut notes = String::new();
        if let Some(id) = v["running"].as_str() {
            notes += &format!("  running: {id}");
        }
        if v["listed"] != true {
            notes += "  (not listed by its node now)";
        }
        let excluded_by: Vec<&str> =
            v["excluded_by"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        match (v["backup_schedules"].as_array().is_some_and(Vec::is_empty), excluded_by.is_empty()) {
            (true, true) => notes += "  IN NO BACKUP SCHEDULE",
            (true, false) => notes += &format!("  (excluded by schedule {})", excluded_by.join(", ")),
            _ => {}
        }
        println!(
            "{:<20} {:<12} {:>10} {:>7}  {newest}{notes}",
            v["vm_name"].as_str().unwrap_or("?"),
            v["node"].as_str().unwrap_or("?"),
            if size > 0 { node::progress::human(size) } else { "-".into() },
            v["backups"].as_u64().unwrap_or(0),
        );
    }
    let never = vms.iter().filter(|v| v["backups"] == 0).count();
    let unscheduled = vms
        .iter()
        .filter(|v| v["backup_schedules"].as_array().is_some_and(Vec::is_empty) && v.get("excluded_by").is_none())
        .count();
    println!("{} VM(s), {never} never backed up, {unscheduled} in no backup schedule", vms.len());
    Ok(())
}

/// Whether `node` is down without a tunnel session at the hub's SSH endpoint (so its key may be
/// the reason).
fn down_without_tunnel(node: &Value) -> bool {
    node["reachable"] != true && node["tunnel_sessions"].as_array().is_some_and(Vec::is_empty)
}

/// What the hub's SSH endpoint can tell of nodes that do not log in: the logins of keys it does
/// not know and the connections that ended before they logged in, with its host key's
/// fingerprint; asked for only when a node shown is down without a tunnel session.
#[derive(Default)]
struct Strangers {
    host_key: String,
    unknown_keys: Vec<Value>,
    ended: Vec<Value>,
}

/// [`Strangers`], when a node of `nodes` is down without a tunnel session.
///
/// # Errors
/// The hub cannot be reached.
async fn strangers(client: &HubClient, nodes: &[Value]) -> anyhow::Result<Strangers> {
    if !nodes.iter().any(down_without_tunnel) {
        return Ok(Strangers::default());
    }
    let ssh = client.expect(Method::GET, "/api/v1/ssh", None, 200).await?;
    let refused: Vec<Value> = ssh["refused_logins"].as_array().cloned().unwrap_or_default();
    let of = |reason: &str| refused.iter().filter(|r| r["reason"] == reason).cloned().collect();
    Ok(Strangers {
        host_key: ssh["host_key_fingerprint"].as_str().unwrap_or("?").to_string(),
        unknown_keys: of("unknown-key"),
        ended: of("ended-before-login"),
    })
}

/// A node down without a tunnel session: the logins of its key the endpoint refused, those of
/// keys it does not know beside its key's fingerprint, and connections that ended before their
/// login beside the hub's host key, in words.
fn refused_text(node: &Value, strangers: &Strangers) -> Vec<String> {
    if !down_without_tunnel(node) {
        return Vec::new();
    }
    let times = |r: &Value| {
        format!(
            "from {} ({} time(s), last {})",
            r["peer"].as_str().unwrap_or("?"),
            r["count"].as_u64().unwrap_or(0),
            r["last"].as_str().unwrap_or("?")
        )
    };
    let mut lines: Vec<String> = node["refused_logins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("its key refused ({}) {}", r["reason"].as_str().unwrap_or("?"), times(r)))
        .collect();
    if let (Some(key), false) = (node["key_fingerprint"].as_str(), strangers.unknown_keys.is_empty()) {
        lines.push(format!("its key here is {key}; keys the hub does not know were refused in the last hour:"));
        lines.extend(
            strangers
                .unknown_keys
                .iter()
                .map(|r| format!("  {} {}", r["fingerprint"].as_str().unwrap_or("?"), times(r))),
        );
        lines.push(
            "is one of them the node's (ssh-keygen -lf of its key)? If so, put its public line in the node's key"
                .into(),
        );
    }
    if !strangers.ended.is_empty() {
        lines.push("connections that ended before they logged in, in the last hour:".into());
        lines.extend(strangers.ended.iter().map(|r| format!("  {}", times(r))));
        lines.push(format!(
            "is one of them the node's? Its [tunnel] fingerprint must be the hub's host key, {}",
            strangers.host_key
        ));
    }
    lines
}

/// A node's tunnel sessions at the hub's SSH endpoint, in words.
fn sessions_text(sessions: &[Value]) -> String {
    if sessions.is_empty() {
        return "at the hub's SSH endpoint: no tunnel session (the node's tunnel does not connect)".to_string();
    }
    let each: Vec<String> = sessions
        .iter()
        .map(|s| format!("from {} since {}", s["peer"].as_str().unwrap_or("?"), s["since"].as_str().unwrap_or("?")))
        .collect();
    format!("at the hub's SSH endpoint: {} tunnel session(s), {}", sessions.len(), each.join("; "))
}
