//! Entry point of the `node_api` fuzz target (`fuzz/`) and of its corpus replay in `cargo test`:
//! requests of any shape ([`super::api_requests`]) to the node's HTTP API
//! ([`crate::http::router`]), answered by a node of their own. Its directory holds two VMs,
//! `vm1` with a raw disk and `vm2` with a qcow2 disk (key 2000, 4 MiB with data in three places),
//! its state directory and its restore directory (`@DIR@/restores`); its jobs may dial this
//! machine only, where nothing answers on the ports the seeds name (the discard port, 9): a
//! backup, replication or restore a request starts fails as a job whose hub went away does.
//! With jobs to name, an input's later requests get to what the node does with one: its view,
//! a cancel, a commit (after which the node is made again, module doc of `api_requests`).

use std::sync::Arc;

use crate::config::{self, NbdHosts, Settings};
use crate::http::{router, AppState};
use crate::jobs::Jobs;
use crate::mover::CopyOptions;

use super::api_requests::{Api, Service};

/// The node's bearer token.
pub const TOKEN: &str = "fuzz-token";
/// Virtual size of each VM's disk.
const DISK_SIZE: u64 = 4 << 20;
/// Where each disk holds data, and which byte.
const DATA: [(u64, u8); 3] = [(0, 0xab), (1 << 20, 0xcd), (3 << 20, 0xef)];

/// A node over the directory of the module doc, made again after an input that changed
/// something.
///
/// # Errors
/// The first node could not be made.
pub fn api() -> Result<Api, String> {
    Api::new(TOKEN, node)
}

fn node() -> Result<Service, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let raw = dir.path().join("vm1-disk0.raw");
    let image = dir.path().join("vm2-disk0.qcow2");
    write_disks(&raw, &image).map_err(|e| format!("the disks: {e}"))?;
    let vms = [format!("vm1=2000:raw:{}", raw.display()), format!("vm2=2000:qcow2:{}", image.display())]
        .iter()
        .map(|flag| config::parse_vm_flag(flag))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = Settings {
        listen: (std::net::IpAddr::from([127, 0, 0, 1]), 0).into(),
        token: Some(TOKEN.into()),
        state_dir: dir.path().join("state"),
        restore_dir: Some(dir.path().join("restores")),
        nbd_hosts: NbdHosts::Only(Vec::new()),
        api_tls: None,
        nbd_tls: None,
        tunnel: None,
        vms: config::resolve_vms(vms)?,
        copy: CopyOptions::default(),
        parallel_disks: 2,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let jobs = Arc::new(Jobs::new(Arc::new(settings)));
    let router = runtime.block_on(async { router(Arc::new(AppState { jobs, tunnel: None })) });
    Ok(Service { runtime, router, dir })
}

/// The two disks, holding the same bytes.
fn write_disks(raw: &std::path::Path, image: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let file = std::fs::File::create(raw)?;
    file.set_len(DISK_SIZE)?;
    let qcow2 = qcow2::Image::create(image, &qcow2::CreateOptions::new(DISK_SIZE))?;
    for (offset, byte) in DATA {
        let block = [byte; 64 << 10];
        std::os::unix::fs::FileExt::write_all_at(&file, &block, offset)?;
        qcow2.write_at(&block, offset)?;
    }
    qcow2.close()?;
    Ok(())
}
