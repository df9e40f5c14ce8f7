//! The node's own tunnel against OpenSSH's sshd (started here with throwaway keys): the hub's
//! NBD export reached through a forwarded port range (its channels opened in process), the
//! node's API reached back through the reverse forward, and the SSH connection killed in the
//! middle of a backup and again in the middle of its restore.

mod common;

#[path = "../../tunnel/tests/common/mod.rs"]
mod ssh;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use node::api::{BackupType, JobStatus, NodeClient, RestoreRequest, StartRequest};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_through_the_tunnel_finishes_correctly_after_the_ssh_connection_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub) = ssh::setup(d);
    let ssh_port = free_port();
    let mut sshd = ssh::Sshd::start(d, ssh_port);
    let known_hosts = ssh::known_hosts(d, ssh_port, &host_pub);

    let src = d.join("disk0.raw");
    make_source(&src, 64, 21);
    let image = d.join("full.qcow2");
    new_qcow2(&image, 64 * MIB);
    // The hub's NBD range (2 ports) and the node's local forward of it, shifted: both on this
    // machine, as in the demo.
    let hub_base = ssh::free_ports(2);
    let local_base = ssh::free_ports(2);
    let hub = HubExport::start_on(&image, "pgtest1-disk0", hub_base).await;
    let api_port = free_port();
    let reverse_port = free_port();
    let config = format!(
        "state_dir = \"{state}\"\n[copy]\nbandwidth_limit = \"8M\"\nretry_window_s = 60\n\
         [tunnel]\nhub = \"127.0.0.1:{ssh_port}\"\nuser = \"root\"\nidentity = \"{id}\"\nknown_hosts = \"{kh}\"\n\
         forward_range = \"{lb}-{le}:{hub_base}\"\nreverse = \"{reverse_port}:{api_port}\"\n\
         [[vm]]\nname = \"pgtest1\"\n[[vm.disk]]\nkey = 2000\nsource = \"{src}\"\n",
        state = d.join("state").display(),
        id = identity.display(),
        kh = known_hosts.display(),
        lb = local_base,
        le = local_base + 1,
        src = src.display(),
    );
    let node = NodeProcess::start_on(d, &config, &[], api_port);
    let direct = NodeClient::new(node.url(), None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !direct.tunnel().await.unwrap().connected {
        assert!(Instant::now() < deadline, "tunnel never came up: {:?}", direct.tunnel().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = direct.tunnel().await.unwrap();
    assert_eq!(view.state, "up", "{view:?}");
    // The hub calls the node through the reverse forward, as it does in production.
    let client = NodeClient::new(format!("http://127.0.0.1:{reverse_port}"), None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let vms = loop {
        match client.vms().await {
            Ok(v) => break v,
            Err(e) => assert!(Instant::now() < deadline, "node API not reachable through the reverse forward: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(vms[0].name, "pgtest1");

    // The target names the hub's port; the node dials its local forward of it.
    let req = StartRequest {
        vm_name: "pgtest1".into(),
        nbd_host: None,
        nbd_targets: format!("2000:nbd://127.0.0.1:{hub_base}/pgtest1-disk0"),
        job_id: "through-ssh".into(),
        backup_type: BackupType::Full,
    };
    direct.start_backup(&req).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while direct.job("through-ssh").await.unwrap().disks[0].bytes_sent < 4 * MIB {
        assert!(Instant::now() < deadline, "no progress through the tunnel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The node's NBD connections are channels it opened in process (a connection through the
    // local forward would count its bytes only once it closed): counted as they go.
    let view = direct.tunnel().await.unwrap();
    assert!(view.open_channels >= 1 && view.bytes_to_hub >= 4 * MIB, "{view:?}");
    sshd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = direct.job("through-ssh").await.unwrap();
    assert_eq!(during.status, JobStatus::Running, "a dropped tunnel does not doom the job: {during:?}");
    assert!(!direct.tunnel().await.unwrap().connected);
    let mut sshd = ssh::Sshd::start(d, ssh_port);

    let view = wait_job(&direct, "through-ssh").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert!(view.disks[0].reconnects >= 1, "{view:?}");
    // The job may finish over an extra SSH connection that came back first; the status reports
    // the primary one (it carries the reverse forward), which comes back on its own backoff.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tunnel = direct.tunnel().await.unwrap();
        if tunnel.connected && tunnel.reconnects >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the tunnel never reported its reconnect: {tunnel:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.close().await;
    assert_same(&src, &image);
    assert_clean(&image);

    // And back: a 48 MiB qcow2 of random data restored to a file on the node through the tunnel,
    // sshd killed again in the middle. The restore's writes are held to the bandwidth limit, so
    // its reads are still under way when the tunnel drops: they are made again on new channels.
    let disk = d.join("restore-src.raw");
    std::fs::write(&disk, pseudo_random(48 << 20, 77)).unwrap();
    let backup = d.join("restore-src.qcow2");
    run(Command::new(require("qemu-img")).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&disk).arg(&backup));
    let hub = HubExport::start_on(&backup, "pgtest1-disk0", hub_base).await;
    let restored = d.join("state/restores/restored.raw");
    let req = RestoreRequest {
        job_id: "restore-through-ssh".into(),
        nbd_targets: format!("2000:nbd://127.0.0.1:{hub_base}/pgtest1-disk0"),
        destinations: [("2000".to_string(), restored.display().to_string())].into(),
    };
    direct.start_restore(&req).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while direct.job("restore-through-ssh").await.unwrap().disks[0].bytes_sent < 4 * MIB {
        assert!(Instant::now() < deadline, "no restore progress through the tunnel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sshd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = direct.job("restore-through-ssh").await.unwrap();
    assert_eq!(during.status, JobStatus::Running, "a dropped tunnel does not doom the restore: {during:?}");
    let _sshd = ssh::Sshd::start(d, ssh_port);
    let view = wait_job(&direct, "restore-through-ssh").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert!(view.disks[0].reconnects >= 1, "{view:?}");
    assert_same(&disk, &restored);
    hub.close().await;
}
