//! A hub restarted (SIGTERM, as `systemctl restart` sends) while backups and a restore it drives
//! run: they are handed over to the next start, which takes them up on the same ports; the node's
//! connections are made again and the backups complete equal to their disks, the restore equal
//! to the backup. A run that cannot be taken up (its port left the range) ends as an interrupted
//! one: removed, and cancelled on its node (replications taken up: `crash.rs`, the graceful-stop
//! rounds). A schedule's run the restart cut short goes on where it was: the VM it had backed up
//! is not backed up again, the one under way is followed.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::schedule::wait_run;
use crate::site::{change, Options, Site, Transport, Vm};

/// The node's job `id` as the node tells it.
async fn node_job(site: &Site, id: &str) -> Value {
    let (status, job) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
    assert_eq!(status, 200, "{job}");
    job
}

/// The hub's metrics, once it answers.
async fn metrics(site: &Site) -> String {
    let (_, m) = site.hub("GET", "/metrics", None).await;
    m.as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_way_goes_on_across_a_hub_restart_through_the_tunnel() {
    let opts = Options { copy: "bandwidth_limit = \"8M\"", ..Options::default() };
    let mut site = Site::start(Transport::Endpoint, &[Vm("vm-a", &[48, 8])], 8, opts).await;
    let id = site.start_backup("vm-a", "full").await;
    let path = format!("/api/v1/backups/{id}");
    site.wait_progress(&path, 2 << 20).await;

    site.stop_hub();
    let record = site.path().join("repo/.jobs-handed-over.json");
    let text = std::fs::read_to_string(&record).expect("the stopping hub handed the run over");
    assert!(text.contains(&id), "{text}");
    assert_eq!(node_job(&site, &id).await["status"], "running", "the stop did not cancel the node's job");

    site.start_hub();
    let (status, running) = site.hub("GET", &path, None).await;
    assert_eq!((status, &running["status"]), (200, &json!("running")), "{running}");
    assert!(!record.exists(), "a record is taken up once");
    assert!(metrics(&site).await.contains("sendense_hub_jobs_taken_up{result=\"resumed\"} 1"));
    let done = site.wait(&path).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("vm-a", &done, 2);
    let job = node_job(&site, &id).await;
    let reconnects: u64 = job["disks"].as_array().unwrap().iter().filter_map(|d| d["reconnects"].as_u64()).sum();
    assert!(reconnects >= 1, "the node made its connections again: {job}");
    site.ports_all_free().await;

    // The chain goes on from it: the node's change tracking was committed to the taken-up run.
    change(&site.source("vm-a", 0), 3 << 20, 9);
    let inc = site.backup("vm-a", "incremental").await;
    assert_eq!((&inc["backup_type"], &inc["parent_id"]), (&json!("incremental"), &json!(id)), "{inc}");
    site.assert_backup_equals_sources("vm-a", &inc, 2);

    // A restore the hub drives onto the node, stopped and taken up the same way.
    let dest = site.path().join("restores/vm-a-0.raw");
    let asked = json!({"backup_id": inc["backup_id"], "destinations": {"2000": dest}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!(status, 201, "{r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    crate::wait_restore_under_way(&site, &rid).await;
    site.stop_hub();
    assert!(std::fs::read_to_string(&record).unwrap().contains(&rid), "the restore was handed over");
    site.start_hub();
    let (status, running) = site.hub("GET", &format!("/api/v1/restores/{rid}"), None).await;
    assert_eq!((status, &running["status"]), (200, &json!("running")), "{running}");
    let done = crate::wait_restore(&site, &rid).await;
    let disk = &done["disks"][0];
    assert_eq!((&done["status"], &disk["checksum_match"]), (&json!("completed"), &json!(true)), "{done}");
    crate::site::assert_same(&site.source("vm-a", 0), &dest);
    site.ports_all_free().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_restarted_hub_cannot_take_up_is_removed_and_cancelled_on_its_node() {
    let opts = Options { copy: "bandwidth_limit = \"4M\"", ..Options::default() };
    let mut site = Site::start(Transport::Direct, &[Vm("vm-a", &[32])], 8, opts).await;
    let lost = site.start_backup("vm-a", "full").await;
    site.wait_progress(&format!("/api/v1/backups/{lost}"), 1 << 20).await;
    let (_, v) = site.hub("GET", &format!("/api/v1/backups/{lost}"), None).await;
    let lost_port = v["disk_results"][0]["nbd_port"].as_u64().unwrap();
    site.stop_hub();

    // The restarted hub's range leaves out the backup's port.
    let config = std::fs::read_to_string(site.hub_config()).unwrap();
    let line = config.lines().find(|l| l.starts_with("nbd_ports")).unwrap();
    let (first, last) = site.nbd;
    let range = match lost_port == u64::from(first) {
        true => format!("{}-{last}", first + 1),
        false => format!("{first}-{}", lost_port - 1),
    };
    std::fs::write(site.hub_config(), config.replace(line, &format!("nbd_ports = \"{range}\""))).unwrap();
    site.start_hub();

    let (status, gone) = site.hub("GET", &format!("/api/v1/backups/{lost}"), None).await;
    assert_eq!(status, 404, "{gone}");
    assert!(!site.path().join("repo/vm-a").join(&lost).exists(), "its directory is removed");
    assert!(metrics(&site).await.contains("sendense_hub_jobs_taken_up{result=\"dropped\"} 1"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_job(&site, &lost).await["status"] == "running" {
        assert!(Instant::now() < deadline, "the node still copies a run nobody serves");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(node_job(&site, &lost).await["status"], "cancelled");
    // vm-a is free again: backed up anew.
    let again = site.backup("vm-a", "full").await;
    site.assert_backup_equals_sources("vm-a", &again, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_run_cut_short_by_a_restart_goes_on_where_it_was() {
    // One VM at a time: vm-a is done when the hub stops during vm-b's backup.
    let hub = "\n[[schedule]]\nname = \"often\"\nvms = [\"vm-a\", \"vm-b\"]\nevery = \"5s\"\nparallel = 1\n";
    let opts = Options { hub, copy: "bandwidth_limit = \"8M\"", ..Options::default() };
    let mut site = Site::start(Transport::Direct, &[Vm("vm-a", &[4]), Vm("vm-b", &[48])], 8, opts).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (run, id) = loop {
        let (_, v) = site.hub("GET", "/api/v1/schedules/often", None).await;
        if let Some(id) = v["running"]["backups"][1]["backup_id"].as_str() {
            break (v["running"].clone(), id.to_string());
        }
        assert!(Instant::now() < deadline, "the schedule did not start vm-b's backup: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = run["backups"][0].clone();
    assert_eq!((&first["vm_name"], &first["status"]), (&json!("vm-a"), &json!("completed")), "{run}");
    site.wait_progress(&format!("/api/v1/backups/{id}"), 1 << 20).await;
    site.stop_hub();
    site.start_hub();

    // The same run goes on: vm-a keeps its backup, vm-b's taken up is followed to its end.
    let after = wait_run(&site, "often", None).await;
    let last = &after["last_run"];
    assert_eq!((&last["started_at"], &last["trigger"]), (&run["started_at"], &run["trigger"]), "{after}");
    assert_eq!(last["backups"][0], first, "vm-a was not backed up again: {after}");
    let b = &last["backups"][1];
    assert_eq!(
        (&b["vm_name"], &b["backup_id"], &b["status"]),
        (&json!("vm-b"), &json!(id), &json!("completed")),
        "{after}"
    );
    let done = site.wait(&format!("/api/v1/backups/{id}")).await;
    site.assert_backup_equals_sources("vm-b", &done, 1);
}
