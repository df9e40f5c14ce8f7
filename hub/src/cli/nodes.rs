//! `sendense-hub nodes [NAME]`: the hub's nodes as it sees them now (`GET /api/v1/nodes[/NAME]`,
//! each checked by the call): whether each answers and why not, its VMs, what runs on it; one
//! node with its VMs' disks and its tunnel as it reports it. Exits 0 only if every node shown
//! answered, so a script or a monitoring check can run it as it is.

use reqwest::Method;
use serde_json::Value;

use crate::client::HubClient;

/// Every node, a line each; `Ok(true)` when all answered.
///
/// # Errors
/// The hub cannot be reached.
pub async fn list(client: &HubClient) -> anyhow::Result<bool> {
    let nodes = client.expect(Method::GET, "/api/v1/nodes", None, 200).await?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
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
pub async fn show(client: &HubClient, name: &str) -> anyhow::Result<bool> {
    let n = client.expect(Method::GET, &format!("/api/v1/nodes/{name}"), None, 200).await?;
    println!("node {name} at {}: {}", n["url"].as_str().unwrap_or("?"), state(&n));
    if let Some(error) = n["error"].as_str() {
        println!("  {error}");
    }
    println!("  last seen: {}", n["last_seen"].as_str().unwrap_or("never since the hub started"));
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
                    size(d["size"].as_u64().unwrap_or(0)),
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

/// `24 MiB`, `1.5 GiB`.
fn size(bytes: u64) -> String {
    match bytes >> 30 {
        0 => format!("{} MiB", bytes >> 20),
        _ => format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)),
    }
}
