//! `sendense-hub prune`: retention applied now (`POST /api/v1/prune`), or with `--dry-run` only
//! shown: every backup of the VM (or of every VM), newest first, with what the policy does with
//! it and the rule that keeps it (`other-retention` for a backup under other rules, with the
//! schedule that made it). The rules given on the command line, or the config's when none are;
//! with `--schedule`, the backups that schedule made, under its own rules unless given. Exit status 1 when a backup the policy drops could not be removed (the hub says why: one
//! a restore reads, or an incremental being made on it).

use anyhow::Context;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::HubClient;

/// What `sendense-hub prune` asks for.
#[derive(Debug, Clone, Default)]
pub struct PruneRequest {
    /// The VM; none: every VM with backups.
    pub vm: Option<String>,
    /// The node, where two have a VM of that name.
    pub node: Option<String>,
    /// The schedule whose backups to prune; none: those under the hub's rules.
    pub schedule: Option<String>,
    /// Rules by the API's names (`keep`, `keep_daily`, ...); none: the config's.
    pub rules: Vec<(&'static str, u32)>,
    /// Only say what would be removed.
    pub dry_run: bool,
}

/// Prune; `Ok(true)` unless a backup to remove could not be.
///
/// # Errors
/// The hub cannot be reached, or refused (no rules here nor in its config, a rule of 0, an
/// unknown VM).
pub async fn prune(client: &HubClient, req: &PruneRequest) -> anyhow::Result<bool> {
    let mut body = json!({"dry_run": req.dry_run});
    if let Some(vm) = &req.vm {
        body["vm_name"] = json!(vm);
    }
    if let Some(node) = &req.node {
        body["node"] = json!(node);
    }
    if let Some(schedule) = &req.schedule {
        body["schedule"] = json!(schedule);
    }
    for (rule, n) in &req.rules {
        body[*rule] = json!(n);
    }
    let answer = client.expect(Method::POST, "/api/v1/prune", Some(body), 200).await?;
    let vms = match answer["vms"].as_array() {
        Some(vms) => vms.clone(),
        None => vec![answer.clone()],
    };
    match answer["schedule"].as_str() {
        Some(s) => println!("policy: {} (the backups schedule {s} made)", policy_text(&answer["policy"])),
        None => println!("policy: {}", policy_text(&answer["policy"])),
    }
    for vm in &vms {
        print_vm(vm)?;
    }
    let (removed, failed) = (answer["removed"].as_u64().unwrap_or(0), answer["failed"].as_u64().unwrap_or(0));
    if req.dry_run {
        let would: usize = vms.iter().map(|v| entries(v).filter(|e| e["action"] == "remove").count()).sum();
        println!("dry run: {would} backup(s) would be removed, nothing was");
    } else {
        println!("{removed} backup(s) removed, {failed} could not be");
    }
    Ok(failed == 0)
}

/// One VM's backups, a line each.
fn print_vm(vm: &Value) -> anyhow::Result<()> {
    let name = vm["vm_name"].as_str().context("the hub's answer names no VM")?;
    println!("{name} (node {}):", vm["node"].as_str().unwrap_or("?"));
    for e in entries(vm) {
        let because = match (e["kept_by"].as_str(), e["error"].as_str()) {
            (_, Some(error)) => format!("NOT removed: {error}"),
            (Some("other-retention"), None) => match e["schedule"].as_str() {
                Some(s) => format!("(other-retention: schedule {s})"),
                None => "(other-retention: the hub's)".to_string(),
            },
            (Some(rule), None) => format!("({rule})"),
            (None, None) => String::new(),
        };
        let line = format!(
            "  {:<28} {:<24} {:<6} {because}",
            e["backup_id"].as_str().unwrap_or("?"),
            e["created_at"].as_str().unwrap_or(""),
            e["action"].as_str().unwrap_or("?"),
        );
        println!("{}", line.trim_end());
    }
    Ok(())
}

fn entries(vm: &Value) -> impl Iterator<Item = &Value> {
    vm["backups"].as_array().into_iter().flatten()
}

/// `keep=3 keep_daily=7`, as the hub applied it.
pub(super) fn policy_text(policy: &Value) -> String {
    let rules: Vec<String> = policy.as_object().into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    if rules.is_empty() {
        "none".to_string()
    } else {
        rules.join(" ")
    }
}
