//! The hub or the node killed (SIGKILL) at a random moment of a backup or a replica run, round
//! after round: while the job makes its files, while data flows, while the hub verifies, writes
//! the manifest or tells the node to commit (and the node renames its maps), and (the hub, with
//! `keep_backups = 3`, `compress = "zstd"` and `max_chain = 2`) while it merges the oldest backup
//! away after each one, makes an incremental on a chain of two stand alone, and rewrites each new
//! one compressed (about one kill in five lands in a compression; its copy is removed at the
//! restart, `HUB_KILL_ROUNDS=60` counted 12). After each restart
//! the repository must hold only whole backups (each listed one completed, or a killed run
//! failed; no directory without a completed listing; the newest verifying), no port may stay
//! leased, the node's run must end, the next backup must equal the sources, and after a killed
//! replica run the next one must leave a replica equal to them. A killed node takes its runs up
//! from their last checkpoint (every second here), a killed hub from the record it keeps (the
//! copies are slowed so that kills land while data flows): such a run completes, equal to the
//! sources.
//!
//! `HUB_KILL_ROUNDS=N` soaks (the suite runs 3 of each); `HUB_KILL_SEED` replays the moments of a
//! run (printed at its start); `HUB_KILL_TRANSPORT=endpoint` puts the node's tunnel to the hub's
//! SSH endpoint in place of direct TCP (slower rounds: a tunnel that was up less than 10 s
//! reconnects with a doubled backoff, up to 30 s, as the node's flapping rule says).
//!
//! The same rounds with a graceful stop (SIGTERM) in place of the kill, of the hub or of the node:
//! every run is taken up by the restarted process and completes (`handover.rs` in the hub and in
//! the node's jobs).

use std::time::{Duration, Instant};

use serde_json::json;

use super::site::{assert_same, change, Options, Site, Transport, Vm, MIB};

/// xorshift64: moments to kill at, reproducible from the printed seed.
struct Moments(u64);

impl Moments {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// A soak's settings from the environment: `HUB_KILL_ROUNDS` (3), `HUB_KILL_SEED` (the clock;
/// printed under `label` so that a run can be replayed), `HUB_KILL_TRANSPORT`: direct TCP by
/// default (fast rounds), `endpoint` for the node's tunnel to the hub's SSH endpoint, which must
/// come back after every kill or stop.
struct Soak {
    rounds: u64,
    seed: u64,
    moments: Moments,
    transport: Transport,
}

impl Soak {
    fn from_env(label: &str) -> Self {
        let rounds = env_number("HUB_KILL_ROUNDS").unwrap_or(3);
        let seed = env_number("HUB_KILL_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
        });
        eprintln!("{label}: HUB_KILL_SEED={seed}");
        let transport = match std::env::var("HUB_KILL_TRANSPORT").as_deref() {
            Ok("endpoint") => Transport::Endpoint,
            Ok("direct") | Err(_) => Transport::Direct,
            Ok(other) => panic!("HUB_KILL_TRANSPORT={other}: endpoint or direct"),
        };
        Self { rounds, seed, moments: Moments(seed), transport }
    }
}

/// Start a `full` or `incremental` backup or a `replica` run of "vm": its id and API path.
async fn start_run(site: &Site, kind: &str) -> (String, String) {
    match kind {
        "replica" => {
            let id = site.start_replica("vm").await;
            (id.clone(), format!("/api/v1/replications/{id}"))
        }
        _ => {
            let id = site.start_backup("vm", kind).await;
            (id.clone(), format!("/api/v1/backups/{id}"))
        }
    }
}

/// A site with "vm" (two disks) backed up once, and how long that took plus 30%: the span the
/// rounds' moments are drawn from (they fall anywhere in a whole backup, and a little after).
async fn soak_site(transport: Transport, opts: Options<'_>) -> (Site, u64) {
    let site = Site::start(transport, &[Vm("vm", &[24, 16])], 4, opts).await;
    let started = Instant::now();
    site.backup("vm", "full").await;
    (site, (started.elapsed().as_millis() as u64 * 13 / 10).max(50))
}

/// A round's guest writes: one random 4 KiB change on each disk.
fn change_both_disks(site: &Site, moments: &mut Moments, round: u64) {
    change(&site.source("vm", 0), (moments.next() % 24) * MIB, round as u8);
    change(&site.source("vm", 1), (moments.next() % 16) * MIB, round as u8 ^ 0x5a);
}

/// A round's run (a full or an incremental backup, or a replica run) and when it is stopped.
fn next_run(moments: &mut Moments, span_ms: u64) -> (&'static str, Duration) {
    let kind = ["full", "incremental", "incremental", "replica"][(moments.next() % 4) as usize];
    (kind, Duration::from_millis(moments.next() % span_ms))
}

/// What one round's kill left behind, for the summary.
#[derive(Debug, Default)]
struct Outcomes {
    /// A killed backup was listed as completed after the restart.
    completed: usize,
    /// It was gone, as a failed run is after a restart.
    gone: usize,
    /// The killed process's next start took the run up (from its last record or checkpoint).
    taken_up: usize,
    /// A replica run was killed.
    replica_runs: usize,
    /// A merge of the oldest backup into the next was killed (the hub only).
    merges: usize,
    /// Backups seen made to stand alone (`max_chain = 2`, the hub only), whatever the kills.
    stood_alone: usize,
}

/// Add the backups the hub lists as made to stand alone to `seen`.
async fn seen_standing_alone(site: &Site, seen: &mut std::collections::HashSet<String>) {
    for b in site.backups("vm").await {
        if b["note"].as_str().is_some_and(|n| n.contains("made to stand alone on the hub at")) {
            seen.insert(b["backup_id"].as_str().unwrap_or_default().to_string());
        }
    }
}

/// Which process a round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Hub,
    Node,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_at_any_moment_of_a_backup_leaves_only_whole_backups() {
    kill_rounds(Victim::Hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_killed_at_any_moment_of_a_backup_leaves_only_whole_backups() {
    kill_rounds(Victim::Node).await;
}

async fn kill_rounds(victim: Victim) {
    let Soak { rounds, seed, mut moments, transport } = Soak::from_env(&format!("{victim:?}"));
    // With the hub as the victim its retention runs too (`keep_backups`): the oldest backup is
    // merged away after each one, so kills also land in merges, which the restart must finish;
    // each backup is compressed after it completes, and every other incremental is made to stand
    // alone (`max_chain = 2`), so kills land in compressions and those rewrites too.
    let opts = match victim {
        Victim::Hub => Options {
            hub: "keep_backups = 3\ncompress = \"zstd\"\nmax_chain = 2",
            copy: "bandwidth_limit = \"16M\"",
            ..Options::default()
        },
        Victim::Node => Options { copy: "bandwidth_limit = \"16M\"\ncheckpoint_every_s = 1", ..Options::default() },
    };
    let (mut site, span_ms) = soak_site(transport, opts).await;
    let mut outcomes = Outcomes::default();
    let mut killed = Vec::new();
    let mut stood_alone = std::collections::HashSet::new();
    for round in 0..rounds {
        seen_standing_alone(&site, &mut stood_alone).await;
        change_both_disks(&site, &mut moments, round);
        // The hub is also killed in merges (`?merge=true`, as its retention runs them): those take
        // milliseconds here, so their moments are drawn from a shorter span.
        let kinds: &[&str] = match victim {
            Victim::Hub => &["full", "incremental", "incremental", "replica", "merge"],
            Victim::Node => &["full", "incremental", "incremental", "replica"],
        };
        let kind = kinds[(moments.next() % kinds.len() as u64) as usize];
        let at = Duration::from_millis(moments.next() % if kind == "merge" { 12 } else { span_ms });
        if kind == "merge" {
            // A merge needs an incremental on the oldest backup: in the first round there is
            // only the full one, which `?merge=true` would simply delete.
            if site.backups("vm").await.len() < 2 {
                site.backup("vm", "incremental").await;
            }
            let list = site.backups("vm").await;
            let oldest = list.last().unwrap()["backup_id"].as_str().unwrap().to_string();
            let request = site.hub_request("DELETE", &format!("/api/v1/backups/{oldest}?merge=true"));
            let merging = tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
            tokio::time::sleep(at).await;
            site.kill_hub();
            site.start_hub();
            let answered = merging.await.unwrap().ok();
            let context = format!(
                "Hub round {round} (HUB_KILL_SEED={seed}): merge of {oldest} killed after {at:?} ({answered:?})"
            );
            let completed = assert_only_whole_backups(&site, &killed, &context).await;
            // Every backup kept reads whole: the one merged into above all.
            for id in &completed {
                let (status, v) = site.hub("POST", &format!("/api/v1/backups/{id}/verify"), None).await;
                assert_eq!((status, &v["ok"]), (200, &json!(true)), "{context}: {id}: {v}");
            }
            outcomes.merges += 1;
            site.wait_node_reachable().await;
            let next = site.backup("vm", "incremental").await;
            site.assert_backup_equals_sources("vm", &next, 2);
            continue;
        }
        let (id, path) = start_run(&site, kind).await;
        killed.push(id.clone());
        tokio::time::sleep(at).await;
        match victim {
            Victim::Hub => {
                site.kill_hub();
                site.start_hub();
                // Named in the record the hub kept, the run is taken up and ends (runs not taken
                // up are not listed after a restart, but a completed backup is).
                let (status, v) = site.hub("GET", &path, None).await;
                if status == 200 && matches!(v["status"].as_str(), Some("running" | "verifying")) {
                    outcomes.taken_up += 1;
                    let done = site.wait(&path).await;
                    if done["status"] == "completed" && kind != "replica" {
                        site.assert_backup_equals_sources("vm", &done, 2);
                    }
                }
            }
            Victim::Node => {
                site.kill_node();
                site.start_node();
                // The hub's job ends: completed (before the kill, or taken up from a checkpoint by
                // the restarted node) or failed (killed before a checkpoint named it).
                let (_, metrics) = site.node("GET", "/metrics", None).await;
                let metrics = metrics.as_str().unwrap_or_default().to_string();
                outcomes.taken_up += usize::from(metrics.contains("sendense_node_jobs_taken_up{result=\"resumed\"} 1"));
                let done = site.wait(&path).await;
                if done["status"] == "completed" && kind != "replica" {
                    site.assert_backup_equals_sources("vm", &done, 2);
                }
            }
        }
        let context = format!("{victim:?} round {round} (HUB_KILL_SEED={seed}): {kind} {id} killed after {at:?}");
        let completed = assert_only_whole_backups(&site, &killed, &context).await;
        if kind == "replica" {
            outcomes.replica_runs += 1;
        } else if completed.iter().any(|b| b == &id) {
            outcomes.completed += 1;
        } else {
            outcomes.gone += 1;
        }
        site.ports_all_free().await;
        site.wait_node_reachable().await;
        // The node's run of the killed job ends: cancelled for the new hub, or already done.
        let (status, run) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
        if status == 200 && run["status"] == "running" {
            super::wait_node_job(&site, &id).await;
        }
        let next = site.backup("vm", "incremental").await;
        site.assert_backup_equals_sources("vm", &next, 2);
        if kind == "replica" {
            // The replica a killed run left half-written is made whole by the next run.
            site.replicate("vm").await;
            site.assert_replica_equals_sources("vm", 2);
        }
    }
    seen_standing_alone(&site, &mut stood_alone).await;
    outcomes.stood_alone = stood_alone.len();
    eprintln!("{victim:?}: {rounds} kills: {outcomes:?}");
}

/// The hub stopped gracefully (SIGTERM, as `systemctl restart` sends) at a random moment of a
/// backup or a replica run, round after round, and started again: the run is handed over and taken
/// up wherever it was (making its files, copying, verifying, writing the manifest, telling the node
/// to commit; with `keep_backups = 3`, `compress = "zstd"` and `max_chain = 2`, stops land in
/// merges, compressions and backups made to stand alone too). Every run must complete, equal to the sources, the repository must hold
/// only whole backups, no port may stay leased, and the next backup must build on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_stopped_at_any_moment_of_a_backup_takes_it_up_and_completes_it() {
    let Soak { rounds, seed, mut moments, transport } = Soak::from_env("graceful stops");
    let opts = Options { hub: "keep_backups = 3\ncompress = \"zstd\"\nmax_chain = 2", ..Options::default() };
    let (mut site, span_ms) = soak_site(transport, opts).await;
    let mut runs = Vec::new();
    let mut taken_up = 0;
    for round in 0..rounds {
        change_both_disks(&site, &mut moments, round);
        let (kind, at) = next_run(&mut moments, span_ms);
        let (id, path) = start_run(&site, kind).await;
        tokio::time::sleep(at).await;
        site.stop_hub();
        site.start_hub();
        let context = format!("stop round {round} (HUB_KILL_SEED={seed}): {kind} {id} stopped after {at:?}");
        let (status, _) = site.hub("GET", &path, None).await;
        if status == 404 && kind == "replica" {
            // It completed before the stop: its record says so (runs are not listed across restarts).
            let record = std::fs::read(site.as_hub_sees(&site.path().join("replicas/vm/replica.json"))).unwrap();
            let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
            assert_eq!(record["replication_id"], id.as_str(), "{context}: {record}");
        } else {
            let done = site.wait(&path).await;
            assert_eq!(done["status"], "completed", "{context}: {done}");
            if kind != "replica" {
                site.assert_backup_equals_sources("vm", &done, 2);
            }
        }
        if kind == "replica" {
            site.assert_replica_equals_sources("vm", 2);
        }
        let completed = assert_only_whole_backups(&site, &[], &context).await;
        assert!(kind == "replica" || completed.contains(&id) || completed.len() == 3, "{context}: {completed:?}");
        site.ports_all_free().await;
        let (_, metrics) = site.hub("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        assert!(metrics.contains("sendense_hub_jobs_taken_up{result=\"dropped\"} 0"), "{context}: {metrics}");
        let resumed = metrics.contains("sendense_hub_jobs_taken_up{result=\"resumed\"} 1");
        taken_up += usize::from(resumed);
        runs.push(format!("{kind} after {at:?}{}", if resumed { " (taken up)" } else { "" }));
        site.wait_node_reachable().await;
        let next = site.backup("vm", "incremental").await;
        site.assert_backup_equals_sources("vm", &next, 2);
    }
    eprintln!("graceful stops: {rounds} runs completed, {taken_up} of them taken up by the restarted hub: {runs:?}");
}

/// The node stopped gracefully (SIGTERM, as `systemctl restart sendense-node` sends) at a random
/// moment of a backup, a replica run or a restore the hub drives onto the node (the newest backup,
/// one disk raw and one as a qcow2 image, over the files of the last restore), round after round,
/// and started again: the run is paused and handed over, and the next start takes it up wherever
/// it was (before its first disk, while data flows, between disks, completed and waiting for the
/// hub's commit). Every run must complete, equal to the sources (a restore: to the backup, its
/// checksums matching), the repository must hold only whole backups, no port may stay leased, and
/// the next backup must build on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_stopped_at_any_moment_of_a_backup_takes_it_up_and_completes_it() {
    let Soak { rounds, seed, mut moments, transport } = Soak::from_env("node stops");
    // Slowed down so that most stops land while data flows.
    let opts = Options { copy: "bandwidth_limit = \"16M\"", ..Options::default() };
    let (mut site, span_ms) = soak_site(transport, opts).await;
    let dests = [site.path().join("restores/vm-0.raw"), site.path().join("restores/vm-1.qcow2")];
    let mut runs = Vec::new();
    for round in 0..rounds {
        change_both_disks(&site, &mut moments, round);
        let (kind, at) = match moments.next() % 5 {
            0 => ("restore", Duration::from_millis(moments.next() % span_ms)),
            _ => next_run(&mut moments, span_ms),
        };
        let newest = site.backups("vm").await[0]["backup_id"].as_str().unwrap().to_string();
        let (id, path) = match kind {
            "restore" => {
                let asked = json!({"backup_id": newest, "destinations": {"2000": dests[0], "2001": dests[1]}});
                let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
                assert_eq!(status, 201, "{r}");
                let id = r["restore_id"].as_str().unwrap().to_string();
                (id.clone(), format!("/api/v1/restores/{id}"))
            }
            _ => start_run(&site, kind).await,
        };
        tokio::time::sleep(at).await;
        site.stop_node();
        let record = std::fs::read_to_string(site.path().join("node-state/.jobs-handed-over.json"));
        let handed = record.is_ok_and(|r| r.contains(&id));
        site.start_node();
        let context = format!("node stop round {round} (HUB_KILL_SEED={seed}): {kind} {id} stopped after {at:?}");
        let done = site.wait(&path).await;
        assert_eq!(done["status"], "completed", "{context}: {done}");
        match kind {
            "replica" => site.assert_replica_equals_sources("vm", 2),
            "restore" => {
                for (i, dest) in dests.iter().enumerate() {
                    assert_eq!(done["disks"][i]["checksum_match"], json!(true), "{context}: {done}");
                    assert_same(&site.image("vm", &newest, i), dest);
                }
            }
            _ => site.assert_backup_equals_sources("vm", &done, 2),
        }
        let completed = assert_only_whole_backups(&site, &[], &context).await;
        assert!(matches!(kind, "replica" | "restore") || completed.contains(&id), "{context}: {completed:?}");
        site.ports_all_free().await;
        runs.push(format!("{kind} after {at:?}{}", if handed { " (handed over)" } else { "" }));
        site.wait_node_reachable().await;
        let next = site.backup("vm", "incremental").await;
        site.assert_backup_equals_sources("vm", &next, 2);
    }
    eprintln!("node stops: {rounds} runs completed: {runs:?}");
}

/// Every backup listed is completed (or is a killed run, failed), every completed one has its
/// directory and every directory is a completed backup, and the newest verifies. Returns the
/// completed backups' ids. A run that completed just now may have started a retention merge,
/// whose backup is out of the listing until its directory is gone: the repository is given a few
/// seconds to hold exactly the backups listed (a half backup never goes away by itself).
async fn assert_only_whole_backups(site: &Site, killed: &[String], context: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let completed = loop {
        let list = site.backups("vm").await;
        let mut completed = Vec::new();
        for b in &list {
            match b["status"].as_str() {
                Some("completed") => completed.push(b["backup_id"].as_str().unwrap().to_string()),
                Some("failed") if killed.iter().any(|k| b["backup_id"] == k.as_str()) => {}
                _ => panic!("{context}: {b}"),
            }
        }
        let repo = site.as_hub_sees(&site.path().join("repo").join("vm"));
        let mut dirs: Vec<String> = std::fs::read_dir(&repo)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        let mut ids = completed.clone();
        ids.sort();
        if dirs == ids {
            break completed;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the repository holds exactly the completed backups: {dirs:?} against {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let newest = completed.first().unwrap_or_else(|| panic!("{context}: the first full backup is gone"));
    let (status, v) = site.hub("POST", &format!("/api/v1/backups/{newest}/verify"), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{context}: {v}");
    completed
}
