//! `sendense-hub schedules [NAME] [--run]`: the `[[schedule]]`s as the hub runs them (`GET
//! /api/v1/schedules[/NAME]`): when each runs next and how its last run went, per VM with its
//! backup or why not; `--run` starts one now (`POST /api/v1/schedules/NAME/run`) and follows it
//! to its end, a line each time one of its VMs moves on, and exits 0 only if every VM's backup
//! completed (a VM skipped because it had a job already is not backed up by this run).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use crate::client::HubClient;

/// How often a followed run is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Every schedule, a line each.
///
/// # Errors
/// The hub cannot be reached.
pub async fn list(client: &HubClient) -> anyhow::Result<()> {
    let schedules = client.expect(Method::GET, "/api/v1/schedules", None, 200).await?;
    println!("{:<16} {:<12} {:<28} {:<26} LAST RUN", "NAME", "KIND", "WHEN", "NEXT RUN");
    for s in schedules.as_array().into_iter().flatten() {
        let last = match (&s["running"], &s["last_run"]) {
            (Value::Object(_), _) => "running now".to_string(),
            (_, r @ Value::Object(_)) => run_summary(r),
            _ => "never".to_string(),
        };
        println!(
            "{:<16} {:<12} {:<28} {:<26} {last}",
            s["name"].as_str().unwrap_or("?"),
            s["kind"].as_str().unwrap_or("?"),
            s["when"].as_str().unwrap_or("?"),
            s["next_run"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

/// One schedule: what it backs up, when, and its run under way or its last, VM by VM.
///
/// # Errors
/// The hub cannot be reached or has no such schedule.
pub async fn show(client: &HubClient, name: &str) -> anyhow::Result<()> {
    let s = client.expect(Method::GET, &format!("/api/v1/schedules/{name}"), None, 200).await?;
    let vms: Vec<&str> = s["vms"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    println!(
        "schedule {name}: {} of {} ({}), {}, {} at once",
        s["kind"].as_str().unwrap_or("?"),
        vms.join(","),
        s["backup_type"].as_str().unwrap_or("?"),
        s["when"].as_str().unwrap_or("?"),
        s["parallel"],
    );
    match s["retention"].as_object() {
        Some(_) => println!("  retention: {}", super::prune::policy_text(&s["retention"])),
        None if s["kind"] == "backup" => println!("  retention: the hub's (keep_* in hub.toml)"),
        None => {}
    }
    println!("  next run: {}", s["next_run"].as_str().unwrap_or("none"));
    if s["skipped_occurrences"].as_u64().unwrap_or(0) > 0 {
        println!("  occurrences passed over (the run before still going): {}", s["skipped_occurrences"]);
    }
    for (label, run) in [("running", &s["running"]), ("last run", &s["last_run"])] {
        if run.is_object() {
            println!("  {label}: {}", run_summary(run));
            for b in backups(run) {
                println!("    {}", vm_line(b));
            }
        }
    }
    Ok(())
}

/// Run schedule `name` now and, unless `detach`, follow it to its end; `Ok(true)` when every
/// VM's backup completed (or, detached, the run started).
///
/// # Errors
/// The hub cannot be reached, has no such schedule, or runs it already (its 409).
pub async fn run(client: &HubClient, name: &str, detach: bool) -> anyhow::Result<bool> {
    let path = format!("/api/v1/schedules/{name}");
    let started = client.expect(Method::POST, &format!("{path}/run"), None, 202).await?;
    let ours = started["running"]["started_at"].as_str().context("the hub's answer has no run")?.to_string();
    println!("schedule {name}: run started at {ours}");
    if detach {
        return Ok(true);
    }
    let mut seen: HashMap<String, String> = HashMap::new();
    loop {
        let s = client.expect(Method::GET, &path, None, 200).await?;
        let (running, last) = (&s["running"], &s["last_run"]);
        let run = if running["started_at"] == ours.as_str() { running } else { last };
        if run["started_at"] != ours.as_str() {
            anyhow::bail!("schedule {name}: the hub no longer shows the run started at {ours}");
        }
        for b in backups(run) {
            let line = vm_line(b);
            let vm = format!("{}@{}", b["vm_name"].as_str().unwrap_or("?"), b["node"].as_str().unwrap_or(""));
            if seen.get(&vm) != Some(&line) {
                println!("  {line}");
                seen.insert(vm, line);
            }
        }
        if !std::ptr::eq(run, running) {
            println!("schedule {name}: {}", run_summary(run));
            return Ok(backups(run).all(|b| b["status"] == "completed") && errors(run).next().is_none());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

fn backups(run: &Value) -> impl Iterator<Item = &Value> {
    run["backups"].as_array().into_iter().flatten()
}

fn errors(run: &Value) -> impl Iterator<Item = &str> {
    run["errors"].as_array().into_iter().flatten().filter_map(Value::as_str)
}

/// `started ..., ended ...: 3 completed, 1 skipped`, and the nodes whose VMs could not be listed.
fn run_summary(run: &Value) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for b in backups(run) {
        let status = b["status"].as_str().unwrap_or("?").to_string();
        match counts.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => counts.push((status, 1)),
        }
    }
    let counts: Vec<String> = counts.into_iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut text = format!(
        "started {}{}: {}",
        run["started_at"].as_str().unwrap_or("?"),
        run["ended_at"].as_str().map(|e| format!(", ended {e}")).unwrap_or_default(),
        if counts.is_empty() { "no VM".to_string() } else { counts.join(", ") },
    );
    for e in errors(run) {
        text.push_str(&format!("; {e}"));
    }
    text
}

/// `web (node a): completed, backup b-...` or `failed: why`.
fn vm_line(b: &Value) -> String {
    let node = b["node"].as_str().map(|n| format!(" (node {n})")).unwrap_or_default();
    let job = b["backup_id"].as_str().or(b["replication_id"].as_str()).map(|id| format!(", {id}")).unwrap_or_default();
    let why = b["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
    format!("{}{node}: {}{job}{why}", b["vm_name"].as_str().unwrap_or("?"), b["status"].as_str().unwrap_or("?"))
}
