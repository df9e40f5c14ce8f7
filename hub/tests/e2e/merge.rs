//! Keeping the last N points in time of a VM backed up incrementally forever: the oldest backup
//! of a chain deleted by merging the incremental on top of it into it (`DELETE
//! /api/v1/backups/{id}?merge=true`). Every point in time that is kept must read as the VM's
//! disks did when it was taken (compared with copies made then), verify against the node's
//! checksums, and pass `qemu-img check`; a restore open on a later backup reads the same
//! through the merge; the hub killed in the middle of a merge finishes it when it starts again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::site::{assert_clean, assert_same, change, tool, Options, Site, Transport, Vm, MIB};

/// Copies of the VM's disks as they are now: what a backup taken now must read as, later.
fn keep_copies(site: &Site, vm: &str, disks: usize, tag: &str) -> Vec<PathBuf> {
    (0..disks)
        .map(|i| {
            let copy = site.path().join(format!("{vm}-{i}-{tag}.raw"));
            std::fs::copy(site.source(vm, i), &copy).unwrap();
            copy
        })
        .collect()
}

/// Backup `id` reads as `copies`, its images pass `qemu-img check`, and the hub's verify (a
/// re-read against the node's checksums) passes.
async fn assert_point_in_time(site: &Site, vm: &str, id: &str, copies: &[PathBuf]) {
    for (i, copy) in copies.iter().enumerate() {
        let img = site.image(vm, id, i);
        assert_clean(&img);
        assert_same(copy, &img);
    }
    let (status, v) = site.hub("POST", &format!("/api/v1/backups/{id}/verify"), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "backup {id} verifies: {v}");
}

fn backing_file(img: &Path) -> Option<String> {
    let out = tool("qemu-img").args(["info", "--output=json", "-U"]).arg(img).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
}

async fn listed(site: &Site, id: &str) -> Value {
    let (status, b) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(status, 200, "{b}");
    b
}

fn id(b: &Value) -> &str {
    b["backup_id"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_backups_merged_away_leave_every_kept_point_in_time_whole() {
    let site = Site::start(Transport::Direct, &[Vm("vm", &[6, 3])], 6, Options::default()).await;
    let full = site.backup("vm", "full").await;
    change(&site.source("vm", 0), 0, 0x11);
    change(&site.source("vm", 1), 2 * MIB, 0x12);
    let first = site.backup("vm", "incremental").await;
    let first_copies = keep_copies(&site, "vm", 2, "first");
    change(&site.source("vm", 0), 5 * MIB, 0x21);
    change(&site.source("vm", 0), 4096, 0x22);
    let second = site.backup("vm", "incremental").await;
    let second_copies = keep_copies(&site, "vm", 2, "second");
    assert_eq!(second["parent_id"], first["backup_id"]);

    // A plain delete is refused and says how to merge; a merge of a backup with an open restore too.
    let full_path = format!("/api/v1/backups/{}", id(&full));
    let (status, body) = site.hub("DELETE", &full_path, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("?merge=true"), "{body}");
    let (status, opened) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": full["backup_id"]}))).await;
    assert_eq!(status, 201, "{opened}");
    let (status, body) = site.hub("DELETE", &format!("{full_path}?merge=true"), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("open restore"), "{body}");
    let restore_path = format!("/api/v1/restores/{}", opened["restore_id"].as_str().unwrap());
    assert_eq!(site.hub("DELETE", &restore_path, None).await.0, 200);
    let (status, body) = site.hub("DELETE", &format!("{full_path}?merge=yes"), None).await;
    assert_eq!(status, 400, "a parameter that is not understood is refused: {body}");

    // A restore of the newest backup stays open across the merge under it.
    let (status, open) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": second["backup_id"]}))).await;
    assert_eq!(status, 201, "{open}");
    let (status, deleted) = site.hub("DELETE", &format!("{full_path}?merge=true"), None).await;
    assert_eq!((status, id(&deleted)), (200, id(&full)), "{deleted}");
    assert_eq!(site.hub("GET", &full_path, None).await.0, 404);
    assert!(!site.as_hub_sees(&site.path().join("repo/vm").join(id(&full))).exists(), "its directory is gone");
    for export in open["exports"].as_array().unwrap() {
        let i = export["disk_key"].as_u64().unwrap() as usize - 2000;
        let url = format!(
            "nbd://127.0.0.1:{}/{}",
            export["nbd_port"].as_u64().unwrap(),
            export["nbd_export_name"].as_str().unwrap()
        );
        assert_same(&second_copies[i], Path::new(&url));
    }
    let open_path = format!("/api/v1/restores/{}", open["restore_id"].as_str().unwrap());
    assert_eq!(site.hub("DELETE", &open_path, None).await.0, 200);

    // The first incremental is now a full backup of its own; the second still builds on it.
    let merged = listed(&site, id(&first)).await;
    assert_eq!((&merged["backup_type"], &merged["parent_id"]), (&json!("full"), &Value::Null), "{merged}");
    assert!(merged["note"].as_str().unwrap().contains(&format!("merged with backup {}", id(&full))), "{merged}");
    for i in 0..2 {
        assert_eq!(backing_file(&site.image("vm", id(&first), i)), None, "disk {i} stands alone");
    }
    assert_eq!(listed(&site, id(&second)).await["parent_id"], first["backup_id"]);
    assert_point_in_time(&site, "vm", id(&first), &first_copies).await;
    assert_point_in_time(&site, "vm", id(&second), &second_copies).await;

    // Forever incremental: the next one still builds on the newest, and merging goes on.
    change(&site.source("vm", 1), 0, 0x31);
    let third = site.backup("vm", "incremental").await;
    assert_eq!((&third["backup_type"], &third["parent_id"]), (&json!("incremental"), &second["backup_id"]), "{third}");
    let (status, body) = site.hub("DELETE", &format!("/api/v1/backups/{}?merge=true", id(&first)), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&site, id(&second)).await["parent_id"], Value::Null);
    assert_point_in_time(&site, "vm", id(&second), &second_copies).await;
    site.assert_backup_equals_sources("vm", &third, 2);
    let (status, v) = site.hub("POST", &format!("/api/v1/backups/{}/verify", id(&third)), None).await;
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "{v}");
    // The newest, with nothing on top, goes as with a plain delete.
    let (status, body) = site.hub("DELETE", &format!("/api/v1/backups/{}?merge=true", id(&third)), None).await;
    assert_eq!(status, 200, "{body}");
    let left: Vec<String> = site.backups("vm").await.iter().map(|b| id(b).to_string()).collect();
    assert_eq!(left, vec![id(&second).to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_killed_in_the_middle_of_a_merge_finishes_it_when_it_starts_again() {
    let mut site = Site::start(Transport::Direct, &[Vm("vm", &[96, 3])], 4, Options::default()).await;
    let full = site.backup("vm", "full").await;
    // A change big enough that committing it takes a moment to kill the hub in.
    super::site::make_source(&site.source("vm", 0), 96, 7);
    change(&site.source("vm", 1), MIB, 0x44);
    let next = site.backup("vm", "incremental").await;
    let copies = keep_copies(&site, "vm", 2, "next");
    let request = site.hub_request("DELETE", &format!("/api/v1/backups/{}?merge=true", id(&full)));
    let merging = tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    // Killed as soon as the backup is marked as being merged: in the middle of the commit.
    let manifest = site.as_hub_sees(&site.path().join("repo/vm").join(id(&full)).join("manifest.json"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("merging_into")) {
        assert!(std::time::Instant::now() < deadline, "the merge never started");
        assert!(manifest.exists(), "the merge ended before the hub could be killed in it");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    site.kill_hub();
    // Killed before it answered, but for a race of a millisecond with the commit's end.
    eprintln!("the merge request, killed: {:?}", merging.await.unwrap().map_err(|e| e.to_string()));
    site.start_hub();
    site.wait_node_reachable().await;
    let list: Vec<String> = site.backups("vm").await.iter().map(|b| id(b).to_string()).collect();
    assert_eq!(list, vec![id(&next).to_string()], "the merge was finished at the start");
    assert!(!site.as_hub_sees(&site.path().join("repo/vm").join(id(&full))).exists());
    let merged = listed(&site, id(&next)).await;
    assert_eq!((&merged["backup_type"], &merged["parent_id"]), (&json!("full"), &Value::Null), "{merged}");
    // A kill in the middle of an allocation may leak clusters, which the merge done again at the
    // start reclaims: the image checks clean.
    assert_point_in_time(&site, "vm", id(&next), &copies).await;
}

/// New data where the full backup holds none: merging it in needs space in the full image.
fn write_where_the_full_backup_holds_nothing(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    // `make_source` leaves every third and fourth MiB zero or a hole.
    for mib in [2u64, 3, 6, 7] {
        f.write_all_at(&vec![mib as u8 | 0x80; MIB as usize], mib * MIB).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_runs_out_of_space_leaves_the_incremental_whole_and_is_retried() {
    let opts = Options { repo_tmpfs_mib: Some(24), ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[8, 2])], 4, opts).await;
    let full = site.backup("vm", "full").await;
    write_where_the_full_backup_holds_nothing(&site.source("vm", 0));
    change(&site.source("vm", 1), 0, 0x51);
    let next = site.backup("vm", "incremental").await;
    let copies = keep_copies(&site, "vm", 2, "next");

    // The repository full but for a little: the merge's new clusters do not fit.
    let filler = site.as_hub_sees(&site.path().join("repo/filler"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0x77; 1 << 16]).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(512 << 10)).unwrap();
    }
    let merge = format!("/api/v1/backups/{}?merge=true", id(&full));
    let (status, body) = site.hub("DELETE", &merge, None).await;
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("No space left") && error.contains("retries the merge"), "{body}");
    // The full backup is no point in time any more; the incremental reads and verifies as before.
    let (status, gone) = site.hub("GET", &format!("/api/v1/backups/{}", id(&full)), None).await;
    assert_eq!(status, 404, "{gone}");
    assert!(gone["error"].as_str().unwrap().contains("retry it with DELETE"), "{gone}");
    let (status, body) = site.hub("DELETE", &format!("/api/v1/backups/{}", id(&full)), None).await;
    assert_eq!(status, 409, "only the merge's retry deletes it: {body}");
    assert!(body["error"].as_str().unwrap().contains("retry it with DELETE"), "{body}");
    // And the incremental names no backup the API does not know: it shows what it will once merged.
    let waiting = listed(&site, id(&next)).await;
    assert_eq!((&waiting["backup_type"], &waiting["parent_id"]), (&json!("full"), &Value::Null), "{waiting}");
    assert!(waiting["note"].as_str().unwrap().contains("retry it with DELETE"), "{waiting}");
    assert_point_in_time(&site, "vm", id(&next), &copies).await;
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_hub_merges{state=\"failed\"} 1"), "{metrics}");
    let (status, body) = site.hub("DELETE", &format!("/api/v1/backups/{}", id(&next)), None).await;
    assert_eq!(status, 409, "the chain is not changed under a merge waiting for a retry: {body}");
    assert!(body["error"].as_str().unwrap().contains("failed"), "{body}");

    std::fs::remove_file(&filler).unwrap();
    let (status, body) = site.hub("DELETE", &merge, None).await;
    assert_eq!(status, 200, "the retry: {body}");
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("sendense_hub_merges{state=\"failed\"} 0"), "{metrics}");
    let merged = listed(&site, id(&next)).await;
    assert_eq!((&merged["backup_type"], &merged["parent_id"]), (&json!("full"), &Value::Null), "{merged}");
    // The clusters the failed attempt allocated and could not fill were reclaimed by the retry.
    assert_point_in_time(&site, "vm", id(&next), &copies).await;
}

/// The VM's backups, newest first, once retention has had its turn (it runs right after a
/// backup completes): waits until there are `count`, then until no merge runs. (A backup being
/// merged away leaves the listing as its merge starts; the images of the one it goes into are
/// overlays on it until the merge is done.)
async fn backups_settled_at(site: &Site, count: usize) -> Vec<String> {
    let listed = || async { site.backups("vm").await.iter().map(|b| id(b).to_string()).collect::<Vec<String>>() };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = listed().await;
        if list.len() == count {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "retention left {list:?}, not {count}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    site.wait_hub_metric("sendense_hub_merges{state=\"running\"} 0").await;
    listed().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_backups_drops_the_oldest_after_each_backup_and_every_kept_one_stays_whole() {
    // keep_yearly keeps nothing more here (every backup is of this year, whose newest keep_backups
    // keeps): the config's rules by period are read and applied along with it.
    let opts = Options { hub: "keep_backups = 2\nkeep_yearly = 1", ..Options::default() };
    let site = Site::start(Transport::Direct, &[Vm("vm", &[4, 2])], 4, opts).await;
    let (status, body) =
        site.hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "full", "keep": 0}))).await;
    assert_eq!(status, 400, "{body}");
    let first = site.backup("vm", "full").await;
    change(&site.source("vm", 0), 0, 0x61);
    let second = site.backup("vm", "incremental").await;
    let second_copies = keep_copies(&site, "vm", 2, "second");
    assert_eq!(backups_settled_at(&site, 2).await, vec![id(&second).to_string(), id(&first).to_string()]);

    change(&site.source("vm", 1), MIB, 0x62);
    let third = site.backup("vm", "incremental").await;
    assert_eq!(third["parent_id"], second["backup_id"]);
    assert_eq!(backups_settled_at(&site, 2).await, vec![id(&third).to_string(), id(&second).to_string()]);
    let kept = listed(&site, id(&second)).await;
    assert_eq!((&kept["backup_type"], &kept["parent_id"]), (&json!("full"), &Value::Null), "{kept}");
    assert_point_in_time(&site, "vm", id(&second), &second_copies).await;
    site.assert_backup_equals_sources("vm", &third, 2);

    // A request's keep wins over the config's.
    change(&site.source("vm", 0), 2 * MIB, 0x63);
    let started = site
        .hub("POST", "/api/v1/backups", Some(json!({"vm_name": "vm", "backup_type": "incremental", "keep": 1})))
        .await;
    assert_eq!(started.0, 202, "{}", started.1);
    let fourth = site.wait(&format!("/api/v1/backups/{}", id(&started.1))).await;
    assert_eq!(backups_settled_at(&site, 1).await, vec![id(&fourth).to_string()]);
    let alone = listed(&site, id(&fourth)).await;
    assert_eq!((&alone["backup_type"], &alone["parent_id"]), (&json!("full"), &Value::Null), "{alone}");
    let copies = keep_copies(&site, "vm", 2, "fourth");
    assert_point_in_time(&site, "vm", id(&fourth), &copies).await;
    let dirs = std::fs::read_dir(site.as_hub_sees(&site.path().join("repo/vm"))).unwrap();
    let left: Vec<String> =
        dirs.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![id(&fourth).to_string()], "nothing else is left in the repository");
}

/// `POST /api/v1/prune` through the API: refused without rules or with bad ones, a dry run that
/// says what would go and deletes nothing (for the VM, and for every VM), then the real run, after which every kept point in
/// time reads as it did. (Rules by period are proven on dated backups in `retention.rs` and
/// `jobs/prune.rs`; here every backup is of the same hour, so `keep_yearly` keeps nothing more.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_previews_then_applies_a_policy_and_the_kept_backups_stay_whole() {
    let site = Site::start(Transport::Direct, &[Vm("vm", &[4, 2])], 4, Options::default()).await;
    let mut made = Vec::new();
    for (i, kind) in ["full", "incremental", "incremental", "incremental"].into_iter().enumerate() {
        change(&site.source("vm", i % 2), i as u64 * MIB, 0x70 + i as u8);
        let b = site.backup("vm", kind).await;
        made.push((id(&b).to_string(), keep_copies(&site, "vm", 2, &format!("p{i}"))));
    }
    let ids: Vec<&str> = made.iter().rev().map(|(id, _)| id.as_str()).collect();

    for (body, status, says) in [
        (json!({"vm_name": "vm"}), 400, "no retention rules"),
        (json!({"vm_name": "vm", "keep_daily": 0}), 400, "keep_daily must be at least 1"),
        (json!({"vm_name": "vm", "keep": 1, "keep_dayly": 2}), 400, "keep_dayly"),
        (json!({"vm_name": "other", "keep": 1}), 404, "no backups of VM other"),
        (json!({"node": "n1", "keep": 1}), 400, "node goes with vm_name"),
    ] {
        let (got, v) = site.hub("POST", "/api/v1/prune", Some(body.clone())).await;
        assert_eq!(got, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }

    let (status, preview) = site
        .hub("POST", "/api/v1/prune", Some(json!({"vm_name": "vm", "keep": 2, "keep_yearly": 3, "dry_run": true})))
        .await;
    assert_eq!(status, 200, "{preview}");
    let said: Vec<(&str, &str, &str)> = preview["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["backup_id"].as_str().unwrap(), e["action"].as_str().unwrap(), e["kept_by"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        said,
        [(ids[0], "keep", "keep-last"), (ids[1], "keep", "keep-last"), (ids[2], "remove", ""), (ids[3], "remove", "")]
    );
    assert_eq!((&preview["dry_run"], &preview["removed"], &preview["node"]), (&json!(true), &json!(0), &json!("n1")));
    assert_eq!(site.backups("vm").await.len(), 4, "a dry run deletes nothing");
    // Without a VM: every VM's, the same verdicts.
    let (status, all) = site.hub("POST", "/api/v1/prune", Some(json!({"keep": 2, "dry_run": true}))).await;
    assert_eq!((status, &all["removed"], &all["vms"][0]["vm_name"]), (200, &json!(0), &json!("vm")), "{all}");
    assert_eq!(all["vms"][0]["backups"], preview["backups"], "{all}");

    let (status, done) = site.hub("POST", "/api/v1/prune", Some(json!({"vm_name": "vm", "keep": 2}))).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((&done["removed"], &done["failed"]), (&json!(2), &json!(0)), "{done}");
    let left: Vec<String> = site.backups("vm").await.iter().map(|b| id(b).to_string()).collect();
    assert_eq!(left, [ids[0], ids[1]]);
    let oldest = listed(&site, ids[1]).await;
    assert_eq!((&oldest["backup_type"], &oldest["parent_id"]), (&json!("full"), &Value::Null), "{oldest}");
    for (backup, copies) in made.iter().rev().take(2) {
        assert_point_in_time(&site, "vm", backup, copies).await;
    }
}
