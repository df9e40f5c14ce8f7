//! A node restarted (SIGTERM, as `systemctl restart sendense-node` sends) while a backup, a restore
//! the hub drives and a replication run through the tunnel: the stopping node pauses them and hands
//! them over, the next start goes on from what the hub's images (or the restored file) hold, not
//! from the first byte, and reads again only what the stopped run had not finished (all of a source
//! written while the node was stopped), the snapshot hooks run once each, and the results equal the
//! disks; the chain and the replica go on from them. A run the next start cannot take up (its disk
//! left the configuration) fails on the hub as a forgotten job does, and its snapshot is released.
//!
//! A node killed (SIGKILL) goes on the same way from its last checkpoint (`checkpoint_every_s`);
//! one killed while a pre-snapshot hook ran releases that snapshot at its next start.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::site::{assert_clean, assert_same, change, Options, Site, Transport, Vm, MIB};

/// The node's job as it tells it.
async fn node_job(site: &Site, id: &str) -> Value {
    let (status, job) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
    assert_eq!(status, 200, "{job}");
    job
}

/// The lines the hooks wrote for job `id`.
fn hook_runs(log: &Path, id: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.ends_with(&format!(" {id}"))).map(str::to_string).collect()
}

/// Stop the node while run `path` (a hub job) copies, check what it handed over, do
/// `while_stopped`, start it again.
async fn restart_node_under_way(site: &mut Site, path: &str, id: &str, while_stopped: impl FnOnce(&Site)) {
    site.wait_progress(path, 8 * MIB).await;
    site.stop_node();
    while_stopped(site);
    let record = site.path().join("node-state/.jobs-handed-over.json");
    let text = std::fs::read_to_string(&record).expect("the stopping node handed the run over");
    assert!(text.contains(id), "{text}");
    let (_, v) = site.hub("GET", path, None).await;
    assert_eq!(v["status"], "running", "the hub waits for the node: {v}");
    site.start_node();
    // The API answers only once the record is taken up.
    let (status, jobs) = site.node("GET", "/api/v1/jobs", None).await;
    assert_eq!(status, 200, "{jobs}");
    assert!(jobs.to_string().contains(id), "the same job, running again: {jobs}");
    // A record is taken up once: what is there now is the new process's checkpoint.
    let now = std::fs::read_to_string(&record).unwrap_or_default();
    assert!(!now.contains("\"stopped\": true"), "{now}");
}

/// A restore of `backup` the hub drives onto the node (disk 2000 as a qcow2 image over an old
/// file, 2001 raw), once 8 MiB of its first disk are written: its id and the two destinations.
async fn restore_under_way(site: &Site, backup: &Value) -> (String, PathBuf, PathBuf) {
    let restores = site.path().join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let (dest0, dest1) = (restores.join("vm-a-0.qcow2"), restores.join("vm-a-1.raw"));
    std::fs::write(&dest0, b"the disk before").unwrap();
    let asked = json!({"backup_id": backup["backup_id"], "destinations": {"2000": dest0, "2001": dest1}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!(status, 201, "{r}");
    let rid = r["restore_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node_job(site, &rid).await["disks"][0]["bytes_sent"].as_u64().unwrap_or(0) < 8 * MIB {
        assert!(std::time::Instant::now() < deadline, "the restore made no progress");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (rid, dest0, dest1)
}

/// The restore `rid` the node took up after its restart: running again, then completed with its
/// checksums matching, both files equal to the disks, the image clean, the file beside gone, and at
/// least `kept` bytes of the first disk (what the image held) neither read from the hub again nor
/// written into it again.
async fn assert_restore_taken_up_and_completed(site: &Site, rid: &str, dest0: &Path, dest1: &Path, kept: u64) {
    assert!(dest0.with_file_name(".vm-a-0.qcow2.restoring").exists(), "the image being restored is kept");
    assert_eq!(std::fs::read(dest0).unwrap(), b"the disk before", "the destination as it was until the end");
    assert_eq!(node_job(site, rid).await["status"], "running", "taken up");
    let done = crate::wait_restore(site, rid).await;
    assert_eq!(done["status"], "completed", "{done}");
    for disk in done["disks"].as_array().unwrap() {
        assert_eq!(disk["checksum_match"], json!(true), "{done}");
    }
    assert_clean(dest0);
    assert_same(&site.source("vm-a", 0), dest0);
    assert_same(&site.source("vm-a", 1), dest1);
    let job = node_job(site, rid).await;
    let sent = job["disks"][0]["bytes_sent"].as_u64().unwrap();
    assert!(sent + kept <= 32 * MIB, "what the image held already was not written into it again: {job}");
    let read = job["disks"][0]["bytes_read"].as_u64().unwrap();
    assert!(read + kept <= 32 * MIB, "what the stopped run finished was not read from the hub again: {job}");
    assert!(!dest0.with_file_name(".vm-a-0.qcow2.restoring").exists());
}

/// The backup `id` (hub path `path`) the node took up completed, equal to the disks, with at
/// least `kept` bytes of its first disk (what the image held) not sent again, nor read again (its
/// source file is as it was); the node's view.
async fn assert_backup_taken_up_and_completed(site: &Site, path: &str, id: &str, kept: u64) -> Value {
    let done = site.wait(path).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_backup_equals_sources("vm-a", &done, 2);
    let job = node_job(site, id).await;
    let first = &job["disks"][0];
    let (unchanged, sent) = (first["bytes_unchanged"].as_u64().unwrap(), first["bytes_sent"].as_u64().unwrap());
    assert!(unchanged >= kept, "what the image held already was not sent again: {job}");
    assert!(sent + kept <= 32 * MIB, "only the rest of its 32 MiB of data was sent: {job}");
    // Read whole, the disk would be read where it is not a hole.
    let (read, holes) = (first["bytes_read"].as_u64().unwrap(), first["bytes_skipped_holes"].as_u64().unwrap());
    assert!(read + holes + kept <= 64 * MIB, "what the stopped run finished was not read again: {job}");
    job
}

/// Snapshot hooks for `vm` that log their runs into the file returned.
fn log_hooks(site: &Site, vm: &str, pre_extra: &str) -> std::path::PathBuf {
    let log = site.path().join("hooks.log");
    let config = std::fs::read_to_string(site.node_config()).unwrap();
    let hooks = format!(
        "name = \"{vm}\"\npre_snapshot = \"echo pre $SENDENSE_JOB_ID >> {0}{pre_extra}\"\n\
         post_snapshot = \"echo post $SENDENSE_JOB_ID >> {0}\"\n",
        log.display()
    );
    std::fs::write(site.node_config(), config.replace(&format!("name = \"{vm}\"\n"), &hooks)).unwrap();
    log
}

/// Wait until a checkpoint saved `map` (a disk's resume map) after `after` and the record written
/// after it names the disk under way.
async fn wait_checkpoint(site: &Site, map: &Path, after: std::time::SystemTime) {
    let record = site.path().join("node-state/.jobs-handed-over.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let saved = std::fs::metadata(map).and_then(|m| m.modified()).is_ok_and(|t| t > after);
        let named = std::fs::read_to_string(&record).is_ok_and(|r| r.contains("\"stage\": \"paused\""));
        if saved && named {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint of {} in 30 s", map.display());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A full backup of `vm-a` started and under way until a checkpoint after 8 MiB names it: its id
/// and its hub path.
async fn backup_checkpointed(site: &Site) -> (String, String) {
    let id = site.start_backup("vm-a", "full").await;
    let path = format!("/api/v1/backups/{id}");
    site.wait_progress(&path, 8 * MIB).await;
    let map = site.path().join(format!("node-state/vm-a/backup/disk-2000.map.resume-{id}"));
    wait_checkpoint(site, &map, std::time::SystemTime::now()).await;
    (id, path)
}

/// Until the node's job `id` (which the hub failed) is no longer running there.
async fn wait_node_let_go(site: &Site, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node_job(site, id).await["status"] == "running" {
        assert!(std::time::Instant::now() < deadline, "the node still runs {id}, which the hub failed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_and_a_restore_go_on_from_their_checkpoint_after_the_node_is_killed() {
    let copy = "bandwidth_limit = \"8M\"\nparallel_disks = 1\ncheckpoint_every_s = 1";
    let mut site =
        Site::start(Transport::Endpoint, &[Vm("vm-a", &[64, 8])], 8, Options { copy, ..Options::default() }).await;
    let log = log_hooks(&site, "vm-a", "");
    site.stop_node();
    site.start_node();
    site.wait_node_reachable().await;
    let record = site.path().join("node-state/.jobs-handed-over.json");

    // A full backup, killed once a checkpoint was taken after 8 MiB had been sent.
    let (id, path) = backup_checkpointed(&site).await;
    let map = site.path().join(format!("node-state/vm-a/backup/disk-2000.map.resume-{id}"));
    // The metrics count a checkpoint once its files are written: a moment after the test sees them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let (_, metrics) = site.node("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap().to_string();
        if !metrics.contains("sendense_node_checkpoint_maps_timestamp_seconds 0\n") {
            break metrics;
        }
        assert!(std::time::Instant::now() < deadline, "no saved maps counted: {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(metrics.contains("sendense_node_checkpoints_total{result=\"failed\"} 0"), "{metrics}");
    assert!(!metrics.contains("sendense_node_checkpoints_total{result=\"written\"} 0\n"), "{metrics}");
    site.kill_node();
    assert!(std::fs::read_to_string(&record).unwrap().contains(&id));
    site.start_node();
    assert_eq!(node_job(&site, &id).await["status"], "running", "taken up");
    assert_backup_taken_up_and_completed(&site, &path, &id, 4 * MIB).await;
    assert_eq!(hook_runs(&log, &id), [format!("pre {id}"), format!("post {id}")], "one snapshot for the run");
    let (_, metrics) = site.node("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_node_jobs_taken_up{result=\"resumed\"} 1"), "{metrics}");
    assert!(!map.exists(), "the resume map of a run that ended is removed");
    change(&site.source("vm-a", 0), 5 * MIB, 7);
    let inc = site.backup("vm-a", "incremental").await;
    assert_eq!(inc["parent_id"], json!(id), "the resumed run was committed: {inc}");
    site.assert_backup_equals_sources("vm-a", &inc, 2);

    // A restore into a qcow2 image, killed the same way: the image left open is taken up.
    let (rid, dest0, dest1) = restore_under_way(&site, &inc).await;
    let map = site.path().join(format!("node-state/.restore-maps/{rid}-disk-2000.map"));
    wait_checkpoint(&site, &map, std::time::SystemTime::now()).await;
    site.kill_node();
    site.start_node();
    assert_restore_taken_up_and_completed(&site, &rid, &dest0, &dest1, 4 * MIB).await;
    assert!(!map.exists(), "the resume map of a restore that ended is removed");
    // The checkpoints now name the completed restore only (for the hub's look at it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&record).unwrap_or_default().contains("\"stage\": \"paused\"") {
        assert!(std::time::Instant::now() < deadline, "nothing under way: nothing paused in the record");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_its_pre_snapshot_hook_runs_releases_the_snapshot_at_its_next_start() {
    let copy = "checkpoint_every_s = 1";
    let mut site = Site::start(Transport::Direct, &[Vm("vm-a", &[8])], 8, Options { copy, ..Options::default() }).await;
    let log = log_hooks(&site, "vm-a", "; sleep 30");
    site.stop_node();
    site.start_node();
    site.wait_node_reachable().await;
    let id = site.start_backup("vm-a", "full").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while hook_runs(&log, &id).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the pre hook did not run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let record = site.path().join("node-state/.jobs-handed-over.json");
    while !std::fs::read_to_string(&record).is_ok_and(|r| r.contains(&id)) {
        assert!(std::time::Instant::now() < deadline, "no checkpoint names the job");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    site.kill_node();
    site.start_node();
    let failed = site.wait(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("no longer knows"), "{failed}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hook_runs(&log, &id).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the post hook did not run: {:?}", hook_runs(&log, &id));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(hook_runs(&log, &id), [format!("pre {id}"), format!("post {id}")], "the snapshot is released once");
    let (_, metrics) = site.node("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_node_jobs_taken_up{result=\"dropped\"} 1"), "{metrics}");
    // The VM is not left busy: the next backup runs (its pre hook sleeps, so it is cancelled).
    let next = site.start_backup("vm-a", "full").await;
    let (status, _) = site.hub("DELETE", &format!("/api/v1/backups/{next}"), None).await;
    assert!(status < 300, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_a_restore_and_a_replication_go_on_across_a_node_restart() {
    let opts = Options { copy: "bandwidth_limit = \"8M\"\nparallel_disks = 1", ..Options::default() };
    let mut site = Site::start(Transport::Endpoint, &[Vm("vm-a", &[64, 8])], 8, opts).await;
    // Snapshot hooks that log their runs; an idle node stops and starts without a record.
    let log = log_hooks(&site, "vm-a", "");
    site.stop_node();
    assert!(!site.path().join("node-state/.jobs-handed-over.json").exists(), "nothing to hand over");
    site.start_node();
    site.wait_node_reachable().await;

    // A full backup: disk 2000 paused half way, disk 2001 not started (one disk at a time).
    let id = site.start_backup("vm-a", "full").await;
    let path = format!("/api/v1/backups/{id}");
    restart_node_under_way(&mut site, &path, &id, |_| {}).await;
    let job = assert_backup_taken_up_and_completed(&site, &path, &id, 8 * MIB).await;
    assert_eq!(job["disks"][1]["bytes_sent"], json!(4 * MIB), "the disk not started was copied after: {job}");
    assert_eq!(hook_runs(&log, &id), [format!("pre {id}"), format!("post {id}")], "one snapshot for the run");
    let (_, metrics) = site.node("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_node_jobs_taken_up{result=\"resumed\"} 1"), "{metrics}");

    // The node's change tracking was committed to the resumed run: the chain goes on from it.
    change(&site.source("vm-a", 0), 5 * MIB, 7);
    let inc = site.backup("vm-a", "incremental").await;
    assert_eq!(inc["parent_id"], json!(id), "{inc}");
    site.assert_backup_equals_sources("vm-a", &inc, 2);

    // A restore of it the hub drives onto the node, disk 2000 as a qcow2 image over an old file.
    let (rid, dest0, dest1) = restore_under_way(&site, &inc).await;
    site.stop_node();
    let record = std::fs::read_to_string(site.path().join("node-state/.jobs-handed-over.json")).unwrap();
    assert!(record.contains(&rid), "{record}");
    site.start_node();
    assert_restore_taken_up_and_completed(&site, &rid, &dest0, &dest1, 8 * MIB).await;

    // A replica run written in place, the same way, its source written while the node was stopped
    // (the first block, which the stopped run had finished): the disk is read whole again, and the
    // replica equals it. Its next run sends only what changed.
    let rid = site.start_replica("vm-a").await;
    let rpath = format!("/api/v1/replications/{rid}");
    restart_node_under_way(&mut site, &rpath, &rid, |site| change(&site.source("vm-a", 0), 0, 9)).await;
    let done = site.wait(&rpath).await;
    assert_eq!(done["status"], "completed", "{done}");
    site.assert_replica_equals_sources("vm-a", 2);
    let job = node_job(&site, &rid).await;
    let first = &job["disks"][0];
    let (read, holes) = (first["bytes_read"].as_u64().unwrap(), first["bytes_skipped_holes"].as_u64().unwrap());
    assert_eq!(read + holes, 64 * MIB, "the changed source was read whole: {job}");
    let why = first["mode_reason"].as_str().unwrap_or_default();
    assert!(why.contains("the source's files changed while the node was stopped"), "{job}");
    change(&site.source("vm-a", 0), 40 * MIB, 8);
    let again = site.replicate("vm-a").await;
    let sent: u64 = again["disks"].as_array().unwrap().iter().map(|d| d["bytes_sent"].as_u64().unwrap()).sum();
    assert!(sent <= MIB, "the replica's map was committed by the resumed run: {again}");
    site.assert_replica_equals_sources("vm-a", 2);

    // A run whose disk left the configuration while the node was stopped is not taken up: the
    // hub fails it, the snapshot is released.
    let lost = site.start_backup("vm-a", "full").await;
    let lpath = format!("/api/v1/backups/{lost}");
    site.wait_progress(&lpath, 4 * MIB).await;
    site.stop_node();
    let config = std::fs::read_to_string(site.node_config()).unwrap();
    std::fs::write(site.node_config(), config.replace("key = 2001", "key = 2009")).unwrap();
    site.start_node();
    let failed = site.wait(&lpath).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("no longer knows"), "{failed}");
    assert_eq!(hook_runs(&log, &lost), [format!("pre {lost}"), format!("post {lost}")], "the snapshot is released");
    let (_, metrics) = site.node("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_node_jobs_taken_up{result=\"dropped\"} 1"), "{metrics}");
}

/// Replace `old` in the hub's configuration by `new` and wait until a reload took the file up.
async fn reload_hub(site: &Site, old: &str, new: &str) {
    let loaded = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("sendense_hub_config_last_reload_success_timestamp_seconds "))
            .map(str::to_string)
    };
    let (_, before) = site.hub("GET", "/metrics", None).await;
    let before = loaded(before.as_str().unwrap());
    let text = std::fs::read_to_string(site.hub_config()).unwrap();
    assert!(text.contains(old), "{text}");
    std::fs::write(site.hub_config(), text.replacen(old, new, 1)).unwrap();
    site.signal_hub("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, m) = site.hub("GET", "/metrics", None).await;
        let m = m.as_str().unwrap();
        if loaded(m) != before {
            assert!(m.contains("sendense_hub_config_last_reload_successful 1"), "{m}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no reload");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A node whose host is down for longer than the hub's `stall_timeout_s` (a reboot): the hub
/// waits up to `unreachable_timeout_s` for it, and the node, started again, takes the backup up
/// from its last checkpoint. With `unreachable_timeout_s` no longer than the stall the run fails
/// as before, and the job the node takes up into the closed exports is cancelled as soon as the
/// node answers: the VM's next backup is not refused as busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_longer_than_a_stall_is_waited_for_and_takes_its_backup_up() {
    let copy = "bandwidth_limit = \"8M\"\nparallel_disks = 1\ncheckpoint_every_s = 1";
    let mut site =
        Site::start(Transport::Direct, &[Vm("vm-a", &[64, 8])], 8, Options { copy, ..Options::default() }).await;
    reload_hub(&site, "stall_timeout_s = 20\n", "stall_timeout_s = 5\nunreachable_timeout_s = 60\n").await;

    let (id, path) = backup_checkpointed(&site).await;
    site.kill_node();
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let (_, v) = site.hub("GET", &path, None).await;
    assert_eq!(v["status"], "running", "down 8 s, past the 5 s stall: still waited for: {v}");
    site.start_node();
    assert_backup_taken_up_and_completed(&site, &path, &id, 4 * MIB).await;

    // The old behaviour, by configuration: out of reach for as long as a stall fails the run.
    reload_hub(&site, "unreachable_timeout_s = 60\n", "unreachable_timeout_s = 5\n").await;
    let (id, path) = backup_checkpointed(&site).await;
    site.kill_node();
    let failed = site.wait(&path).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap_or_default().contains("node unreachable for 5 s"), "{failed}");
    site.start_node();
    site.wait_node_reachable().await;
    // The node took the job up from its checkpoint; the hub cancels it (its exports are gone).
    wait_node_let_go(&site, &id).await;
    let next = site.backup("vm-a", "full").await;
    site.assert_backup_equals_sources("vm-a", &next, 2);

    // A restore the hub drives, its node killed the same way: failed, and the restore the started
    // node takes up is cancelled there too (its destination left as it was).
    let (rid, dest0, _) = restore_under_way(&site, &next).await;
    let map = site.path().join(format!("node-state/.restore-maps/{rid}-disk-2000.map"));
    wait_checkpoint(&site, &map, std::time::SystemTime::now()).await;
    site.kill_node();
    let failed = crate::wait_restore(&site, &rid).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    site.start_node();
    site.wait_node_reachable().await;
    wait_node_let_go(&site, &rid).await;
    assert_eq!(std::fs::read(&dest0).unwrap(), b"the disk before", "the destination as it was");
    let beside = dest0.with_file_name(".vm-a-0.qcow2.restoring");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while beside.exists() {
        assert!(std::time::Instant::now() < deadline, "left beside it: {:?}", node_job(&site, &rid).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
