//! `sendense-hub backup`, `backups`, `verify`, `delete`, `replicate`, `restore` and `close`, and
//! in their own modules `prune`, `schedules`, and `nodes` and `vms` (`inventory`): the API's
//! everyday calls from a shell on the hub, without curl, a token on the command line or a loop
//! polling for the end. Each is one call (`client::HubClient`, found from hub.toml) and, unless
//! told to detach, follows the job to its end with a progress line per disk and exits 0 only if
//! it completed (a script can chain on it: `sendense-hub backup web1 && ...`); the hub's refusal
//! is printed as the hub said it, exit status 1. The API stays the contract: these print what it
//! answers, nothing is decided here that the hub does not decide.

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::HubClient;

pub mod inventory;
pub mod prune;
pub mod schedules;

/// What `sendense-hub backup` asks for.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    /// The VM.
    pub vm: String,
    /// A full backup rather than an incremental (the hub makes a full where no parent is).
    pub full: bool,
    /// The node, where two have a VM of that name.
    pub node: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Return once started.
    pub detach: bool,
}

/// Back a VM up; `Ok(true)` when it completed (or, detached, started).
///
/// # Errors
/// The hub cannot be reached or refused the backup.
pub async fn backup(client: &HubClient, req: &BackupRequest) -> anyhow::Result<bool> {
    let mut body = json!({"vm_name": req.vm, "backup_type": if req.full { "full" } else { "incremental" }});
    if let Some(node) = &req.node {
        body["node"] = json!(node);
    }
    if !req.tags.is_empty() {
        body["tags"] = json!(req.tags);
    }
    let started = client.expect(Method::POST, "/api/v1/backups", Some(body), 202).await?;
    let id = started["backup_id"].as_str().context("the hub's answer has no backup_id")?.to_string();
    let on = started["parent_id"].as_str().map(|p| format!(" on {p}")).unwrap_or_default();
    println!("backup {id} of {} ({}{on}) started", req.vm, started["backup_type"].as_str().unwrap_or("?"));
    if let Some(note) = started["note"].as_str() {
        println!("  note: {note}");
    }
    if req.detach {
        return Ok(true);
    }
    let end = client.follow("backup", "/api/v1/backups", &id).await?;
    Ok(report_end("backup", &id, &end))
}

/// Bring a VM's replica up to date; `Ok(true)` when it completed (or, detached, started).
///
/// # Errors
/// The hub cannot be reached or refused the run.
pub async fn replicate(client: &HubClient, vm: &str, node: Option<&str>, detach: bool) -> anyhow::Result<bool> {
    let mut body = json!({"vm_name": vm});
    if let Some(node) = node {
        body["node"] = json!(node);
    }
    let started = client.expect(Method::POST, "/api/v1/replications", Some(body), 202).await?;
    let id = started["replication_id"].as_str().context("the hub's answer has no replication_id")?.to_string();
    println!("replication {id} of {vm} started");
    if detach {
        return Ok(true);
    }
    let end = client.follow("replication", "/api/v1/replications", &id).await?;
    let completed = report_end("replication", &id, &end);
    if completed {
        for d in end["disk_results"].as_array().into_iter().flatten() {
            println!("  disk {}: {}", d["disk_key"], d["qcow2_path"].as_str().unwrap_or("?"));
        }
    }
    Ok(completed)
}

/// Verify a backup again (its images checked, then read whole against the checksums its node
/// sent); `Ok(true)` when every disk verified.
///
/// # Errors
/// The hub cannot be reached or does not know the backup.
pub async fn verify(client: &HubClient, id: &str) -> anyhow::Result<bool> {
    let v = client.expect(Method::POST, &format!("/api/v1/backups/{id}/verify"), None, 200).await?;
    for d in v["disks"].as_array().into_iter().flatten() {
        let matched = match d["checksum_match"].as_bool() {
            Some(true) => "equal to what its node read",
            Some(false) => "DIFFERS from what its node read",
            None => "no checksum to compare",
        };
        println!("  disk {}: image check {}, {matched}", d["disk_key"], d["check"].as_str().unwrap_or("?"));
    }
    let ok = v["ok"].as_bool() == Some(true);
    println!("backup {id} {}", if ok { "verified" } else { "did NOT verify" });
    Ok(ok)
}

/// Delete a backup; with `merge`, the incremental built on it merged into it first, so the chain
/// keeps every later point in time (the hub refuses a plain delete of a backup another builds on).
///
/// # Errors
/// The hub cannot be reached or refused (its reason).
pub async fn delete(client: &HubClient, id: &str, merge: bool) -> anyhow::Result<()> {
    let query = if merge { "?merge=true" } else { "" };
    client.expect(Method::DELETE, &format!("/api/v1/backups/{id}{query}"), None, 200).await?;
    println!("backup {id} deleted{}", if merge { " (the next backup now holds its data)" } else { "" });
    Ok(())
}

/// Print how a job ended; whether it completed.
fn report_end(what: &str, id: &str, end: &Value) -> bool {
    let status = end["status"].as_str().unwrap_or("?");
    let sent: u64 = end["disks"].as_array().into_iter().flatten().filter_map(|d| d["bytes_sent"].as_u64()).sum();
    match status {
        "completed" => {
            println!("{what} {id} completed: {} disk(s), {} sent", disks(end), node::progress::human(sent));
            true
        }
        _ => {
            println!("{what} {id} {status}: {}", end["error"].as_str().unwrap_or("no reason given"));
            false
        }
    }
}

fn disks(v: &Value) -> usize {
    v["disks"].as_array().map_or(0, Vec::len)
}

/// List backups, newest first (of `vm` only, where given): a line each, with the schedule that
/// made it.
///
/// # Errors
/// The hub cannot be reached or refused.
pub async fn list(client: &HubClient, vm: Option<&str>) -> anyhow::Result<()> {
    let path = match vm {
        Some(vm) => format!("/api/v1/backups?vm_name={vm}"),
        None => "/api/v1/backups".to_string(),
    };
    let backups = client.expect(Method::GET, &path, None, 200).await?;
    println!(
        "{:<28} {:<16} {:<10} {:<12} {:<10} {:<24} {:>10}",
        "ID", "VM", "NODE", "TYPE", "STATUS", "CREATED", "DISKS"
    );
    for b in backups.as_array().into_iter().flatten() {
        let size: u64 = b["disks"].as_array().into_iter().flatten().filter_map(|d| d["bytes_total"].as_u64()).sum();
        let verified = match b["verified"]["ok"].as_bool() {
            Some(true) => "",
            Some(false) => "  (verification failed)",
            None => "",
        };
        let made_by = b["schedule"].as_str().map(|s| format!("  (schedule {s})")).unwrap_or_default();
        println!(
            "{:<28} {:<16} {:<10} {:<12} {:<10} {:<24} {:>10}{made_by}{verified}",
            b["backup_id"].as_str().unwrap_or("?"),
            b["vm_name"].as_str().unwrap_or("?"),
            b["node"].as_str().unwrap_or(""),
            b["backup_type"].as_str().unwrap_or("?"),
            b["status"].as_str().unwrap_or("?"),
            b["created_at"].as_str().unwrap_or(""),
            node::progress::human(size),
        );
    }
    Ok(())
}

/// What `sendense-hub restore` asks for.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    /// The backup.
    pub backup_id: String,
    /// Disk key and path on the node for each disk to write; none: read-only exports.
    pub to: Vec<(String, String)>,
    /// The node to write onto, where not the backup's.
    pub node: Option<String>,
    /// Return once started (or, exports only, leave them open).
    pub detach: bool,
}

/// Restore a backup: onto the node (`to`), followed to its end and checked, or as read-only
/// exports printed for any NBD client, kept open until Ctrl-C (SIGINT) or SIGTERM and then
/// closed. `Ok(true)` when it completed (or the exports were served).
///
/// # Errors
/// The hub cannot be reached or refused the restore.
pub async fn restore(client: &HubClient, req: &RestoreRequest) -> anyhow::Result<bool> {
    let mut body = json!({"backup_id": req.backup_id});
    if !req.to.is_empty() {
        body["destinations"] =
            req.to.iter().map(|(k, p)| (k.clone(), json!(p))).collect::<serde_json::Map<_, _>>().into();
    }
    if let Some(node) = &req.node {
        body["node"] = json!(node);
    }
    let started = client.expect(Method::POST, "/api/v1/restores", Some(body), 201).await?;
    let id = started["restore_id"].as_str().context("the hub's answer has no restore_id")?.to_string();
    if req.to.is_empty() {
        println!("restore {id} of backup {}: read-only exports", req.backup_id);
        for target in started["nbd_targets_string"].as_str().unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            println!("  {target}");
        }
        if req.detach {
            println!("left open: sendense-hub close {id} (or DELETE /api/v1/restores/{id}) closes them");
            return Ok(true);
        }
        println!("serving until Ctrl-C");
        node::service::shutdown_signal().await;
        close(client, &id).await?;
        return Ok(true);
    }
    println!("restore {id} of backup {} onto node {} started", req.backup_id, started["node"].as_str().unwrap_or("?"));
    if req.detach {
        return Ok(true);
    }
    let end = client.follow("restore", "/api/v1/restores", &id).await?;
    let completed = report_end("restore", &id, &end);
    if completed {
        for d in end["disks"].as_array().into_iter().flatten() {
            let equal =
                if d["checksum_match"].as_bool() == Some(true) { "equal to the backup" } else { "NOT checked equal" };
            println!("  disk {}: {equal}", d["disk_key"]);
        }
    }
    Ok(completed)
}

/// Close a restore's exports (or cancel its node's writing).
///
/// # Errors
/// The hub cannot be reached or does not know it.
pub async fn close(client: &HubClient, id: &str) -> anyhow::Result<()> {
    client.expect(Method::DELETE, &format!("/api/v1/restores/{id}"), None, 200).await?;
    println!("restore {id} closed");
    Ok(())
}

/// `KEY=PATH` of `--to`.
///
/// # Errors
/// Not of that form, or the key is not a number.
pub fn parse_destination(text: &str) -> anyhow::Result<(String, String)> {
    let Some((key, path)) = text.split_once('=') else { bail!("--to {text}: give KEY=PATH (the disk key, 2000...)") };
    key.parse::<u32>().with_context(|| format!("--to {text}: the disk key '{key}' is not a number"))?;
    if path.is_empty() {
        bail!("--to {text}: no path");
    }
    Ok((key.to_string(), path.to_string()))
}
