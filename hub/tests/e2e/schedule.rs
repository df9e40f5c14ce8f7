//! Backup schedules (`[[schedule]]`): the hub backing up VMs by itself, on time, incrementally
//! after the first; a run asked for through the API; a VM with a backup already under way
//! skipped, not backed up twice; a night the hub was down for caught up once at its start; a
//! replication schedule of every VM but one.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::site::{Options, Site, Transport, Vm};

/// Until the schedule's last run is not `previous` (its `started_at`) and has ended.
pub async fn wait_run(site: &Site, name: &str, previous: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, v) = site.hub("GET", &format!("/api/v1/schedules/{name}"), None).await;
        assert_eq!(status, 200, "{v}");
        let last = &v["last_run"];
        if last["ended_at"].is_string() && last["started_at"].as_str() != previous {
            return v;
        }
        assert!(Instant::now() < deadline, "no run of {name} ended: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every 5 s, every VM of the node, two at a time: all three VMs backed up by the first run
/// (full, tagged, equal to their disks), incrementals on them by the next, and the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_backs_up_every_vm_of_its_node_on_time_and_incrementally_after_the_first() {
    let hub = "\n[[schedule]]\nname = \"often\"\nvms = [\"*\"]\nevery = \"5s\"\nparallel = 2\ntags = [\"often\"]\n";
    let opts = Options { hub, ..Options::default() };
    let vms = [Vm("vm-a", &[8]), Vm("vm-b", &[4, 4]), Vm("vm-c", &[4])];
    let site = Site::start(Transport::Direct, &vms, 8, opts).await;

    let first = wait_run(&site, "often", None).await;
    assert_eq!((&first["when"], &first["vms"], &first["parallel"]), (&json!("every 5s"), &json!(["*"]), &json!(2)));
    let run = &first["last_run"];
    assert_eq!(run["trigger"], "schedule", "{first}");
    assert!(run["occurrence"].is_string(), "{first}");
    let backups = run["backups"].as_array().unwrap();
    let mut names: Vec<&str> = backups.iter().map(|b| b["vm_name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["vm-a", "vm-b", "vm-c"], "every VM the node lists: {first}");
    for b in backups {
        assert_eq!((&b["status"], &b["node"]), (&json!("completed"), &json!("n1")), "{first}");
        let id = b["backup_id"].as_str().unwrap();
        let (_, view) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(view["tags"], json!(["often"]), "{view}");
        let vm = b["vm_name"].as_str().unwrap();
        let disks = if vm == "vm-b" { 2 } else { 1 };
        site.assert_backup_equals_sources(vm, &view, disks);
    }
    let next = first["next_run"].as_str().unwrap();
    assert!(next > run["occurrence"].as_str().unwrap(), "{first}");

    // The next run, on its own: incrementals on the first run's backups.
    let second = wait_run(&site, "often", run["started_at"].as_str()).await;
    for b in second["last_run"]["backups"].as_array().unwrap() {
        assert_eq!(b["status"], "completed", "{second}");
        let (_, view) = site.hub("GET", &format!("/api/v1/backups/{}", b["backup_id"].as_str().unwrap()), None).await;
        assert_eq!(view["backup_type"], "incremental", "{view}");
    }
    let (_, tagged) = site.hub("GET", "/api/v1/backups?tag=often", None).await;
    assert!(tagged.as_array().unwrap().len() >= 6, "{tagged}");
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("sendense_hub_schedule_last_run_backups{schedule=\"often\",status=\"completed\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("sendense_hub_schedule_last_run_backups{schedule=\"often\",status=\"failed\"} 0"));
    assert!(!metrics.contains("sendense_hub_schedule_last_run_end_timestamp_seconds{schedule=\"often\"} NaN"));
}

/// A nightly schedule whose night does not come during the test: it does not run when the hub
/// starts (a new schedule starts from its next occurrence); run through the API it backs up its
/// VMs (full, as it asks) but skips the one whose backup is under way, and refuses a second run
/// meanwhile; and a hub that was down over its night (the mark it keeps in the repository set
/// back a week) runs it once when it starts again; a run that finds the node out of reach waits
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nightly_schedule_runs_through_the_api_skips_a_busy_vm_and_catches_up_a_missed_night() {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 86400;
    // 1970-01-01 was a Thursday (Monday = 0 is 3); three days ahead is never today or tomorrow.
    let day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][((days + 3 + 3) % 7) as usize];
    let hub = format!(
        "\n[[schedule]]\nname = \"nightly\"\nvms = [\"vm-a\", \"vm-b\"]\nat = [\"12:00\"]\ndays = [\"{day}\"]\n\
         backup_type = \"full\"\ntags = [\"nightly\"]\n\n[[schedule]]\nname = \"dr\"\nvms = [\"*\"]\nexclude = [\"vm-a\"]\n\
         kind = \"replication\"\nat = [\"12:00\"]\ndays = [\"{day}\"]\n"
    );
    // vm-a's backup takes seconds: the run finds it under way.
    let opts = Options { hub: &hub, copy: "bandwidth_limit = \"8M\"", ..Options::default() };
    let mut site = Site::start(Transport::Direct, &[Vm("vm-a", &[24]), Vm("vm-b", &[4])], 4, opts).await;
    let marks = site.path().join("repo/.schedules.json");

    // Started: the last night is recorded as handled, nothing is run.
    let deadline = Instant::now() + Duration::from_secs(10);
    let handled = loop {
        // Each schedule records its mark when it starts: "dr" may be in the file before "nightly".
        let data = std::fs::read(&marks).unwrap_or_default();
        let kept = serde_json::from_slice::<Value>(&data).ok();
        if let Some(mark) = kept.as_ref().and_then(|k| k["nightly"].as_str()) {
            break mark.to_string();
        }
        assert!(Instant::now() < deadline, "no mark kept: {kept:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, view) = site.hub("GET", "/api/v1/schedules/nightly", None).await;
    assert!(view["last_run"].is_null() && view["running"].is_null(), "{view}");
    assert!(view["next_run"].as_str().unwrap() > handled.as_str(), "{view}");
    assert_eq!(view["when"], format!("at 12:00 on {day}"), "{view}");
    assert_eq!(site.backups("vm-a").await.len() + site.backups("vm-b").await.len(), 0);

    // Through the API, while vm-a's backup is under way.
    let busy = site.start_backup("vm-a", "full").await;
    let (status, started) = site.hub("POST", "/api/v1/schedules/nightly/run", None).await;
    assert_eq!((status, &started["running"]["trigger"]), (202, &json!("api")), "{started}");
    let (status, again) = site.hub("POST", "/api/v1/schedules/nightly/run", None).await;
    assert_eq!((status, &again["code"]), (409, &json!("conflict")), "{again}");
    let done = wait_run(&site, "nightly", None).await;
    let backups = &done["last_run"]["backups"];
    assert_eq!((&backups[0]["vm_name"], &backups[0]["status"]), (&json!("vm-a"), &json!("skipped")), "{done}");
    assert!(backups[0]["error"].as_str().unwrap().contains(&busy), "names the job under way: {done}");
    assert_eq!((&backups[1]["vm_name"], &backups[1]["status"]), (&json!("vm-b"), &json!("completed")), "{done}");
    let (_, b) = site.hub("GET", &format!("/api/v1/backups/{}", backups[1]["backup_id"].as_str().unwrap()), None).await;
    assert_eq!((&b["backup_type"], &b["tags"]), (&json!("full"), &json!(["nightly"])), "{b}");
    assert_eq!(site.wait(&format!("/api/v1/backups/{busy}")).await["status"], "completed");
    for (path, code) in [("/api/v1/schedules/weekly/run", "POST"), ("/api/v1/schedules/weekly", "GET")] {
        let (status, v) = site.hub(code, path, None).await;
        assert_eq!(status, 404, "{v}");
    }
    let (status, list) = site.hub("GET", "/api/v1/schedules", None).await;
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(2)), "{list}");

    // A replication schedule of every VM but vm-a: vm-b's replica made, equal to its disk.
    let (status, v) = site.hub("POST", "/api/v1/schedules/dr/run", None).await;
    assert_eq!((status, &v["kind"], &v["exclude"]), (202, &json!("replication"), &json!(["vm-a"])), "{v}");
    let dr = wait_run(&site, "dr", None).await;
    let only = dr["last_run"]["backups"].as_array().unwrap();
    assert_eq!(only.len(), 1, "{dr}");
    assert_eq!((&only[0]["vm_name"], &only[0]["status"]), (&json!("vm-b"), &json!("completed")), "{dr}");
    let (_, rep) =
        site.hub("GET", &format!("/api/v1/replications/{}", only[0]["replication_id"].as_str().unwrap()), None).await;
    assert_eq!(rep["status"], "completed", "{rep}");
    site.assert_replica_equals_sources("vm-b", 1);
    let (_, doc) = site.hub("GET", "/api/v1/openapi.json", None).await;
    assert!(doc["paths"]["/api/v1/schedules/{name}/run"]["post"].is_object(), "described");

    // The hub down over a night: its mark a week older than the last occurrence.
    site.kill_hub();
    let week_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 8);
    std::fs::write(&marks, json!({"nightly": week_ago.to_string()}).to_string()).unwrap();
    site.start_hub();
    site.wait_node_reachable().await;
    let caught_up = wait_run(&site, "nightly", None).await;
    let run = &caught_up["last_run"];
    assert_eq!((&run["trigger"], &run["occurrence"]), (&json!("catch-up"), &json!(handled)), "{caught_up}");
    for b in run["backups"].as_array().unwrap() {
        assert_eq!(b["status"], "completed", "{caught_up}");
    }
    assert_eq!(site.backups("vm-a").await.len(), 2, "the busy one's and the catch-up's");
    let kept: Value = serde_json::from_slice(&std::fs::read(&marks).unwrap()).unwrap();
    assert_eq!(kept["nightly"], json!(handled), "the missed night is handled now");

    // The node out of reach when a run starts (a tunnel reconnecting): its VMs wait, and are
    // backed up once it is back.
    site.kill_node();
    let (status, started) = site.hub("POST", "/api/v1/schedules/nightly/run", None).await;
    assert_eq!(status, 202, "{started}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = site.hub("GET", "/api/v1/schedules/nightly", None).await;
        let first = &v["running"]["backups"][0];
        if first["status"] == "waiting" && first["error"].as_str().is_some_and(|e| e.contains("unreachable")) {
            break;
        }
        assert!(Instant::now() < deadline, "not waiting for the node: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    site.start_node();
    let later = wait_run(&site, "nightly", run["started_at"].as_str()).await;
    for b in later["last_run"]["backups"].as_array().unwrap() {
        assert_eq!((&b["status"], &b["error"]), (&json!("completed"), &Value::Null), "{later}");
    }
}
