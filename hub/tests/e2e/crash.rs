//! The hub killed (SIGKILL) at a random moment of a backup, round after round: while the job
//! makes its files, while data flows, while it verifies, writes the manifest or tells the node
//! to commit. After each restart the repository must hold only whole backups (each listed one
//! completed, no directory without its listing, the newest one verifying), no port may stay
//! leased, the node's orphaned run must end, and the next backup must equal the sources.
//!
//! `HUB_KILL_ROUNDS=N` soaks (the suite runs 3); `HUB_KILL_SEED` replays the moments of a run
//! (printed at its start).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::site::{change, Options, Site, Transport, Vm, MIB};

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

/// What one round's kill left behind, for the summary.
#[derive(Debug, Default)]
struct Outcomes {
    /// The killed backup was listed as completed after the restart.
    completed: usize,
    /// It was gone, as a failed run is after a restart.
    gone: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_at_any_moment_of_a_backup_leaves_only_whole_backups() {
    let rounds = env_number("HUB_KILL_ROUNDS").unwrap_or(3);
    let seed = env_number("HUB_KILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("HUB_KILL_SEED={seed}");
    let mut moments = Moments(seed);
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[24, 16])], 4, Options::default()).await;
    // How long a whole backup takes here: kills fall anywhere in it, and a little after.
    let started = Instant::now();
    site.backup("vm", "full").await;
    let span_ms = (started.elapsed().as_millis() as u64 * 13 / 10).max(50);
    let mut outcomes = Outcomes::default();
    for round in 0..rounds {
        change(&site.source("vm", 0), (moments.next() % 24) * MIB, round as u8);
        change(&site.source("vm", 1), (moments.next() % 16) * MIB, round as u8 ^ 0x5a);
        let kind = if moments.next().is_multiple_of(3) { "full" } else { "incremental" };
        let at = Duration::from_millis(moments.next() % span_ms);
        let id = site.start_backup("vm", kind).await;
        tokio::time::sleep(at).await;
        site.kill_hub();
        site.start_hub();
        let context = format!("round {round} (HUB_KILL_SEED={seed}): {kind} {id} killed after {at:?}");
        let listed = assert_only_whole_backups(&site, &context).await;
        if listed.iter().any(|b| b["backup_id"] == id.as_str()) {
            outcomes.completed += 1;
        } else {
            outcomes.gone += 1;
        }
        site.ports_all_free().await;
        // The node's run of the killed job ends: cancelled for the new hub, or already done.
        let (status, run) = site.node("GET", &format!("/api/v1/backup/{id}"), None).await;
        if status == 200 && run["status"] == "running" {
            super::wait_node_job(&site, &id).await;
        }
        let next = site.backup("vm", "incremental").await;
        site.assert_backup_equals_sources("vm", &next, 2);
    }
    eprintln!("{rounds} kills: {outcomes:?}");
}

/// Every backup listed is completed and has its directory, every directory is a listed backup,
/// and the newest verifies. Returns the listing.
async fn assert_only_whole_backups(site: &Site, context: &str) -> Vec<Value> {
    let list = site.backups("vm").await;
    for b in &list {
        assert_eq!(b["status"], "completed", "{context}: {b}");
    }
    let repo = site.as_hub_sees(&site.path().join("repo").join("vm"));
    let mut dirs: Vec<String> = std::fs::read_dir(&repo)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut ids: Vec<String> = list.iter().map(|b| b["backup_id"].as_str().unwrap().to_string()).collect();
    dirs.sort();
    ids.sort();
    assert_eq!(dirs, ids, "{context}: the repository holds exactly the listed backups");
    let newest = list.first().unwrap_or_else(|| panic!("{context}: the first full backup is gone"));
    let (status, v) =
        site.hub("POST", &format!("/api/v1/backups/{}/verify", newest["backup_id"].as_str().unwrap()), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{context}: {v}");
    list
}
