//! `compress = "zstd"`: the hub rewrites each completed backup's images compressed in the
//! background; they stay equal to the disks they hold for qemu-img (full and incremental, the
//! chain as it was), pass `qemu-img check`, take less space, and say so in the backup's view and
//! the metrics; a merge into a compressed backup leaves it equal and compressed again; what a
//! compression cut short leaves behind is removed when the hub starts again.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::site::{tool, Options, Site, Transport, Vm};

/// Until backup `id`'s view says its images are compressed.
async fn wait_compressed(site: &Site, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = site.hub("GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
        if v["compressed"].is_object() {
            return v;
        }
        assert!(Instant::now() < deadline, "backup {id} not compressed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Log-like text over the first `mib` MiB of a source (the rest stays as `make_source` made it:
/// random runs, zeroes, holes).
fn write_text(path: &std::path::Path, mib: u64) {
    let line = b"2026-11-30T18:01:07Z pgtest1 postgres[2211]: checkpoint complete: wrote 4711 buffers\n";
    let text: Vec<u8> = line.iter().copied().cycle().take((mib << 20) as usize).collect();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(&text, 0).unwrap();
}

fn zstd_clusters(image: &std::path::Path) -> bool {
    let info = tool("qemu-img").arg("info").arg(image).output().unwrap();
    let map = tool("qemu-img").args(["map", "--output=json"]).arg(image).output().unwrap();
    String::from_utf8_lossy(&info.stdout).contains("compression type: zstd")
        && String::from_utf8_lossy(&map.stdout).contains("\"compressed\": true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_backups_are_compressed_and_stay_equal_to_their_disks() {
    let opts = Options { hub: "compress = \"zstd\"", ..Options::default() };
    let mut site = Site::start(Transport::Direct, &[Vm("vm-a", &[12])], 8, opts).await;
    write_text(&site.source("vm-a", 0), 4);

    let full = site.backup("vm-a", "full").await;
    let full_id = full["backup_id"].as_str().unwrap().to_string();
    let view = wait_compressed(&site, &full_id).await;
    let c = &view["compressed"];
    let (data, stored) = (c["data_bytes"].as_u64().unwrap(), c["stored_bytes"].as_u64().unwrap());
    assert!(data >= 8 << 20 && stored < data - (3 << 20), "4 MiB of text take a fraction: {c}");
    site.assert_backup_equals_sources("vm-a", &full, 1);
    let image = site.image("vm-a", &full_id, 0);
    assert!(zstd_clusters(&image));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), stored);

    // An incremental over the compressed full: compressed in turn, the chain reads as the disk.
    crate::site::change(&site.source("vm-a", 0), 1 << 20, 7);
    crate::site::change(&site.source("vm-a", 0), 9 << 20, 8);
    let inc = site.backup("vm-a", "incremental").await;
    assert_eq!(inc["backup_type"], "incremental", "{inc}");
    let inc_id = inc["backup_id"].as_str().unwrap().to_string();
    wait_compressed(&site, &inc_id).await;
    site.assert_backup_equals_sources("vm-a", &inc, 1);

    // Restores of the compressed chain: read-only exports read by qemu-img, and one the hub
    // drives onto the node, checked against the backup's checksum.
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(json!({"backup_id": inc_id}))).await;
    assert_eq!(status, 201, "{r}");
    let export = &r["exports"][0];
    let url = format!("nbd://127.0.0.1:{}/{}", export["nbd_port"], export["nbd_export_name"].as_str().unwrap());
    let out = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(site.source("vm-a", 0))
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success(), "the export reads as the disk: {}", String::from_utf8_lossy(&out.stdout));
    let (status, _) =
        site.hub("DELETE", &format!("/api/v1/restores/{}", r["restore_id"].as_str().unwrap()), None).await;
    assert_eq!(status, 200);
    let dest = site.path().join("restores").join("vm-a-0.raw");
    let asked = json!({"backup_id": inc_id, "destinations": {"2000": dest}});
    let (status, r) = site.hub("POST", "/api/v1/restores", Some(asked)).await;
    assert_eq!(status, 201, "{r}");
    let done = crate::wait_restore(&site, r["restore_id"].as_str().unwrap()).await;
    assert_eq!((&done["status"], &done["disks"][0]["checksum_match"]), (&json!("completed"), &json!(true)), "{done}");
    crate::site::assert_same(&site.source("vm-a", 0), &dest);

    // The full merged into the incremental: the incremental is whole, then compressed again.
    let (status, v) = site.hub("DELETE", &format!("/api/v1/backups/{full_id}?merge=true"), None).await;
    assert_eq!(status, 200, "{v}");
    let merged = wait_compressed(&site, &inc_id).await;
    assert_eq!(merged["backup_type"], "full", "{merged}");
    site.assert_backup_equals_sources("vm-a", &merged, 1);
    assert!(zstd_clusters(&site.image("vm-a", &inc_id, 0)));
    let (_, metrics) = site.hub("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("sendense_hub_backups_compressed 1\n"), "{metrics}");
    assert!(metrics.contains("sendense_hub_compression_failed 0\n"), "{metrics}");
    let held = format!(
        "sendense_hub_vm_backup_bytes{{vm=\"vm-a\",node=\"n1\"}} {}",
        std::fs::metadata(site.image("vm-a", &inc_id, 0)).unwrap().len()
    );
    assert!(metrics.contains(&held), "the VM's bytes are the compressed file's: {held}\n{metrics}");
    let saved = metrics.lines().find_map(|l| l.strip_prefix("sendense_hub_compression_saved_bytes ")).unwrap();
    assert!(saved.parse::<u64>().unwrap() > 3 << 20, "{metrics}");

    // A compression cut short (the hub killed) leaves a copy beside the image: removed at start,
    // the image as it was.
    site.kill_hub();
    let leftover = site.image("vm-a", &inc_id, 0).with_extension("qcow2.compacting");
    std::fs::write(&leftover, b"half a copy").unwrap();
    site.start_hub();
    // Answered once the hub has scanned its repository (it listens before).
    let (_, again) = site.hub("GET", &format!("/api/v1/backups/{inc_id}"), None).await;
    assert!(!leftover.exists(), "{} left behind", leftover.display());
    assert!(again["compressed"].is_object(), "the record survives a restart: {again}");
    site.assert_backup_equals_sources("vm-a", &again, 1);
}
