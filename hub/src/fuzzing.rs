//! Entry point of the `hub_api` fuzz target (`fuzz/`) and of its corpus replay in `cargo test`:
//! requests of any shape to the hub's HTTP API ([`crate::http::router`]), answered by a hub of
//! their own: a repository in a temporary directory holding one VM's chain of two backups (a full
//! one and an incremental on it, [`FULL`] and [`INCREMENTAL`], qcow2 images with data and the
//! checksums a node would have sent), one schedule ([`SCHEDULE`]), and one node at an address
//! nothing listens on, so what the hub would ask of a node fails as an unreachable node does.
//! With backups to name, a request gets past "unknown backup" to what the hub does with one:
//! restores (read-only exports on real ports), verification, merges, deletions, retention.
//!
//! The requests, what every answer must be and when the hub is made again are the harness the
//! node's `node_api` target uses too (`node::fuzzing::api_requests`): an input is one request or
//! several, and after an input that changed something the next one goes to a new hub over a new
//! copy of the repository.

use std::path::Path;
use std::sync::Arc;

use node::fuzzing::api_requests::{Api, Service};

use crate::config::{NodeSpec, Settings};
use crate::jobs::Hub;
use crate::repo::{Manifest, ManifestDisk, Repo};

/// The bearer token of the fuzzed hub.
pub const TOKEN: &str = "fuzz-token";
/// The VM whose backups the repository holds, on node `node1`.
pub const VM: &str = "vm1";
/// Its full backup.
pub const FULL: &str = "b-20261201T010000-f00001";
/// Its incremental backup, an overlay of [`FULL`].
pub const INCREMENTAL: &str = "b-20261201T020000-f00002";
/// The hub's one schedule: nightly incrementals of [`VM`].
pub const SCHEDULE: &str = "nightly";

/// The disk key and the virtual size of the VM's one disk.
const DISK_KEY: u32 = 2000;
const DISK_SIZE: u64 = 4 << 20;
/// The node's checksum block size.
const CHECKSUM_BLOCK: u64 = 64 << 10;

/// A hub over the repository of the module doc, made again after an input that changed
/// something.
///
/// # Errors
/// The first hub could not be made.
pub fn api() -> Result<Api, String> {
    Api::new(TOKEN, hub)
}

fn hub() -> Result<Service, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let repo = Repo { root: dir.path().join("repo"), replicas: dir.path().join("replicas"), replica_raw: false };
    write_chain(&repo).map_err(|e| format!("the repository: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    // Ports of its own: the corpus replay runs two such hubs at once, and one may run beside a hub
    // on 10100-10200.
    let ports = crate::ports::free_block(4).ok_or("no block of 4 free ports on 127.0.0.1")?;
    let schedule: crate::schedule::ScheduleFile = serde_json::from_value(serde_json::json!({
        "name": SCHEDULE, "vms": [VM], "at": ["03:00"], "days": ["sun"], "tags": ["nightly"],
    }))
    .map_err(|e| e.to_string())?;
    let settings = Settings {
        listen: (localhost, 0).into(),
        repo: repo.root,
        replicas: repo.replicas,
        nbd_ports: (ports, ports + 3),
        nbd_bind: localhost,
        nbd_host: "127.0.0.1".into(),
        nbd_tls: None,
        api_tls: None,
        nodes: vec![NodeSpec {
            name: "node1".into(),
            // The discard port: nothing listens on it here.
            url: "http://127.0.0.1:9".into(),
            token: None,
            key: None,
            nbd_peers: Vec::new(),
        }],
        token: TOKEN.into(),
        ssh: None,
        stall_timeout: std::time::Duration::from_secs(60),
        unreachable_timeout: std::time::Duration::from_secs(60),
        restore_idle: std::time::Duration::from_secs(600),
        replica_raw: false,
        direct_io: false,
        io_uring: false,
        nbd_local_users: Vec::new(),
        retention: crate::retention::Policy::default(),
        verify_every: None,
        compress: false,
        max_chain: crate::jobs::DEFAULT_MAX_CHAIN,
        schedules: vec![crate::schedule::Schedule::parse(schedule)?],
    };
    let hub = runtime.block_on(async { Hub::new(settings) })?;
    let router = crate::http::router(Arc::clone(&hub));
    Ok(Service { runtime, router, dir })
}

/// [`FULL`] and [`INCREMENTAL`] as a backup would have left them: an image with data in two
/// places, an overlay with data in a third and over one of the first, each with its manifest
/// (written last) and the node's checksum of the disk as it was.
fn write_chain(repo: &Repo) -> Result<(), Box<dyn std::error::Error>> {
    let full = write_image(repo, FULL, None, &[(0, 0xab), (1 << 20, 0xcd)])?;
    let incremental = write_image(repo, INCREMENTAL, Some(FULL), &[(1 << 20, 0x5a), (2 << 20, 0xef)])?;
    for (id, parent, disk, at) in [(FULL, None, full, "01"), (INCREMENTAL, Some(FULL), incremental, "02")] {
        let created = format!("2026-12-01T{at}:00:00Z");
        let manifest = Manifest {
            backup_id: id.into(),
            vm_name: VM.into(),
            node: "node1".into(),
            backup_type: if parent.is_some() { "incremental" } else { "full" }.into(),
            parent_id: parent.map(str::to_string),
            status: "completed".into(),
            created_at: created.clone(),
            completed_at: created,
            disks: vec![disk],
            note: None,
            tags: vec!["nightly".into()],
            schedule: None,
            merging_into: None,
            verified: None,
            compressed: None,
        };
        let (path, bytes) = repo.manifest_file(&manifest)?;
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// One backup's image of the disk, 64 KiB of `byte` at each offset, and its manifest entry.
fn write_image(
    repo: &Repo,
    id: &str,
    parent: Option<&str>,
    data: &[(u64, u8)],
) -> Result<ManifestDisk, Box<dyn std::error::Error>> {
    let file = crate::repo::disk_file(DISK_KEY);
    std::fs::create_dir_all(repo.backup_dir(VM, id))?;
    let options = match parent {
        Some(p) => qcow2::CreateOptions::overlay(format!("../{p}/{file}"), qcow2::BackingFormat::Qcow2),
        None => qcow2::CreateOptions::new(DISK_SIZE),
    };
    let path = repo.disk_path(VM, id, DISK_KEY);
    let image = qcow2::Image::create(&path, &options)?;
    for &(offset, byte) in data {
        image.write_at(&[byte; CHECKSUM_BLOCK as usize], offset)?;
    }
    image.close()?;
    drop(image);
    let image = qcow2::Image::open_with(&path, &crate::repo::image_options(Path::new(&path), false))?;
    let checksum = crate::verify::image_checksum(&image, CHECKSUM_BLOCK)?;
    Ok(ManifestDisk {
        disk_key: DISK_KEY,
        disk_id: 0,
        size: DISK_SIZE,
        allocated_bytes: data.len() as u64 * CHECKSUM_BLOCK,
        checksum: Some(checksum),
        file,
        bytes_sent: data.len() as u64 * CHECKSUM_BLOCK,
    })
}
