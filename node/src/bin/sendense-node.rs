//! `sendense-node`: the node service (`serve`) and the one-shot copy (`copy`, the old backup
//! client). Bad configuration is one line on stderr and exit status 1.

// clap turns the doc comments into `--help`, whose `A-B[:REMOTE]` notation is not a doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use node::api::{BackupType, JobStatus, StartRequest};
use node::config::{self, NodeFile, Settings};
use node::http::{router, AppState};
use node::jobs::{JobKind, Jobs};
use tokio_util::sync::CancellationToken;

/// mimalloc, not glibc's malloc: a copy's buffers and a tunnel's messages come and go by the
/// megabyte, and glibc gives freed memory back to the kernel and faults it in again (`brk`,
/// page faults and page clearing in a restore's profile). A restore through the tunnel: 0.95x
/// the node's CPU, backups 0.95x (`benches/RESULTS.md`, "Restore data taken from the channel").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The node of the backup data path.
#[derive(Debug, Parser)]
#[command(name = "sendense-node", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the node API (and run the tunnel to the hub, when configured).
    Serve(ServeArgs),
    /// Copy disks into NBD targets once, with progress bars, then exit (0 = every disk copied).
    Copy(CopyArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// TOML configuration (node.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// API listen address [default: 127.0.0.1:8081].
    #[arg(long)]
    listen: Option<String>,
    /// Bearer token file (created with a random token if missing).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Change-tracking state directory [default: /var/lib/sendense-node].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory restores may write files into [default: STATE_DIR/restores].
    #[arg(long)]
    restore_dir: Option<PathBuf>,
    /// Hosts besides this machine that jobs may send disks to and restore from (the hub's
    /// address in direct mode), comma-separated; adds to the config's nbd_hosts.
    #[arg(long = "nbd-hosts")]
    nbd_hosts: Vec<String>,
    /// A VM: NAME=KEY:SOURCE[,KEY:SOURCE...] (SOURCE = file or block device, qcow2:PATH for a
    /// qcow2 image read as its disk, raw:PATH to copy an image file's bytes, or an nbd:// URL).
    #[arg(long = "vm")]
    vms: Vec<String>,
    /// Serve the API over HTTPS with DIR's server-cert.pem and server-key.pem (node.toml's
    /// api_tls; for direct mode across a network).
    #[arg(long = "api-tls", value_name = "DIR")]
    api_tls: Option<PathBuf>,
    /// With --api-tls: clients (the hub) must present a certificate DIR's ca-cert.pem signed
    /// (node.toml's api_client_certs).
    #[arg(long = "api-client-certs")]
    api_client_certs: bool,
    /// Hub SSH address HOST[:PORT] (enables the tunnel).
    #[arg(long)]
    hub: Option<String>,
    /// User on the hub.
    #[arg(long, default_value = "root")]
    user: String,
    /// Private key for the tunnel.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// known_hosts with the hub's key.
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Pinned hub key fingerprint (SHA256:...).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Port ranges forwarded to the hub: A-B[:REMOTE_A] [default: 10100-10200].
    #[arg(long = "forward-range")]
    forward_range: Vec<String>,
    /// Single forwards LOCAL[:REMOTE] [default: 8082].
    #[arg(long = "forward")]
    forward: Vec<String>,
    /// Reverse forwards REMOTE:LOCAL [default: 9081:8081].
    #[arg(long = "reverse")]
    reverse: Vec<String>,
    /// SSH connections the tunnel spreads forwarded connections over [default: cores, at most 4].
    #[arg(long = "tunnel-connections")]
    tunnel_connections: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct CopyArgs {
    /// Targets: KEY:nbd://HOST:PORT/EXPORT,... (KEY:nbds://... over TLS, with --nbd-tls).
    #[arg(long)]
    nbd_targets: String,
    /// TLS credentials for nbds:// targets: a directory with ca-cert.pem, client-cert.pem and
    /// client-key.pem (node.toml's nbd_tls).
    #[arg(long)]
    nbd_tls: Option<PathBuf>,
    /// Sources: KEY=PATH_OR_URL (repeat per disk); qcow2:PATH reads a qcow2 image as its disk,
    /// raw:PATH copies an image file's bytes as they are.
    #[arg(long = "source", required = true)]
    sources: Vec<String>,
    /// Dirty bitmaps of NBD sources: KEY=NAME.
    #[arg(long = "dirty-bitmap")]
    dirty_bitmaps: Vec<String>,
    /// Read sources another process holds open for writing (as qemu-img -U): by default a
    /// source a running VM's qemu writes is refused.
    #[arg(long)]
    force_share: bool,
    /// full or incremental (incremental needs --state-dir from an earlier run).
    #[arg(long, default_value = "full")]
    mode: String,
    /// Where change-tracking state is kept between runs (committed when the copy succeeds).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Name under which the state is kept.
    #[arg(long, default_value = "copy")]
    vm_name: String,
    /// NBD connections per disk [default: 4].
    #[arg(long)]
    connections: Option<usize>,
    /// Requests in flight per connection [default: 2].
    #[arg(long)]
    depth: Option<usize>,
    /// Request size [default: 4M].
    #[arg(long)]
    request_size: Option<String>,
    /// Bandwidth limit for the whole copy (e.g. 100M bytes/s).
    #[arg(long)]
    bwlimit: Option<String>,
    /// Disks copied at once.
    #[arg(long, default_value_t = 4)]
    parallel_disks: usize,
    /// Print the final job status as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    node::service::run("sendense-node", async move {
        match args.command {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Copy(a) => copy(a).await,
        }
    });
}

fn settings(a: ServeArgs) -> anyhow::Result<Settings> {
    let file: NodeFile = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))?
        }
        None => NodeFile::default(),
    };
    let listen = a.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8081".into());
    let listen: SocketAddr = listen.parse().with_context(|| format!("bad listen address '{listen}'"))?;
    let state_dir = a.state_dir.or(file.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/sendense-node"));
    node::files::create_private_dir(&state_dir)
        .with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let restore_dir = a.restore_dir.or(file.restore_dir).unwrap_or_else(|| state_dir.join("restores"));
    let token = match a.token_file.or(file.token_file) {
        Some(p) => Some(config::load_or_create_token(&p).map_err(|e| anyhow!(e))?),
        None => {
            if !listen.ip().is_loopback() {
                bail!("the API listens on {listen} without a token: give --token-file (or listen on loopback)");
            }
            None
        }
    };
    let mut vm_files = file.vm;
    for v in &a.vms {
        vm_files.push(config::parse_vm_flag(v).map_err(|e| anyhow!(e))?);
    }
    let vms = config::resolve_vms(vm_files).map_err(|e| anyhow!(e))?;
    let (copy, parallel_disks) = config::resolve_copy(&file.copy).map_err(|e| anyhow!(e))?;
    let tunnel_file = match (a.hub, file.tunnel) {
        (Some(hub), _) => Some(config::TunnelFile {
            hub,
            user: a.user,
            identity: a.identity.ok_or_else(|| anyhow!("--hub needs --identity KEY"))?,
            known_hosts: a.known_hosts,
            fingerprint: a.fingerprint,
            forward_range: (!a.forward_range.is_empty()).then_some(config::OneOrMany::Many(a.forward_range)),
            forwards: (!a.forward.is_empty()).then_some(config::OneOrMany::Many(a.forward)),
            reverse: (!a.reverse.is_empty()).then_some(config::OneOrMany::Many(a.reverse)),
            connections: a.tunnel_connections,
        }),
        (None, t) => t,
    };
    let tunnel = tunnel_file.map(config::resolve_tunnel).transpose().map_err(|e| anyhow!(e))?;
    let mut nbd_hosts = file.nbd_hosts.unwrap_or_default();
    nbd_hosts.extend(a.nbd_hosts.iter().flat_map(|h| h.split(',')).filter(|h| !h.is_empty()).map(str::to_string));
    // Loaded now, so that a wrong directory stops the start (or a reload), not a connection.
    let api_tls =
        node::https::ApiTlsSetting::from_keys(a.api_tls.or(file.api_tls), a.api_client_certs || file.api_client_certs)
            .map_err(|e| anyhow!(e))?;
    node::https::ApiTls::from_setting(api_tls.as_ref()).map_err(|e| anyhow!(e))?;
    Ok(Settings {
        listen,
        token,
        state_dir,
        restore_dir: Some(restore_dir),
        nbd_hosts: config::NbdHosts::Only(nbd_hosts),
        nbd_tls: match file.nbd_tls {
            // Checked now, so that a wrong directory stops the start, not the first job.
            Some(dir) => {
                nbd_server::ClientTls::from_x509_dir(&dir).with_context(|| format!("nbd_tls = {}", dir.display()))?;
                Some(dir)
            }
            None => None,
        },
        api_tls,
        tunnel,
        vms,
        copy,
        parallel_disks,
    })
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let settings = Arc::new(settings(a.clone())?);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let api_tls = node::https::ApiTls::from_setting(settings.api_tls.as_ref()).map_err(|e| anyhow!(e))?;
    let tunnel = match &settings.tunnel {
        Some(t) => Some(tunnel::Tunnel::start(t.clone()).await.context("tunnel")?),
        None => None,
    };
    let mut jobs = Jobs::new(Arc::clone(&settings));
    if let Some(t) = &tunnel {
        jobs = jobs.through_tunnel(t.dialer());
    }
    let jobs = Arc::new(jobs);
    // Before the API serves: the hub polling the jobs the last stop handed over finds them running;
    // what restores the node died in left beside their destinations is removed.
    let taken = jobs.take_up_handed_over();
    if taken != node::jobs::TakenUp::default() {
        tracing::info!(
            resumed = taken.resumed,
            dropped = taken.dropped,
            "jobs taken up from the last stop or checkpoint"
        );
    }
    let state = Arc::new(AppState { jobs: Arc::clone(&jobs), tunnel });
    tracing::info!(
        listen = %settings.listen,
        https = settings.api_tls.is_some(),
        client_certs = settings.api_tls.as_ref().is_some_and(|t| t.client_certs),
        vms = settings.vms.len(),
        tunnel = settings.tunnel.as_ref().map(|t| format!("{}:{}", t.hub_host, t.hub_port)),
        "sendense-node serving"
    );
    let reloader = tokio::spawn(reload_on_hangup(Arc::clone(&jobs), a));
    // What a killed node's next start takes up; the stop below writes the last record.
    tokio::spawn(Arc::clone(&jobs).keep_checkpoints());
    let shutdown = async move {
        node::service::shutdown_signal().await;
        // The API answers meanwhile: the hub sees its jobs running until the node is gone.
        tracing::info!("shutting down: pausing backups, replications and restores for the next start");
        jobs.hand_over(node::jobs::PAUSE_WITHIN).await;
    };
    node::api_server::serve(listener, api_tls, router(state), Default::default(), shutdown).await.context("serve")?;
    reloader.abort();
    Ok(())
}

/// `SIGHUP` (`systemctl reload`): the configuration file read and checked again and taken up
/// (`node::jobs::reload`); one that does not check is refused with one line and the node runs on.
async fn reload_on_hangup(jobs: Arc<Jobs>, args: ServeArgs) {
    let config = args.config.clone();
    let read = move || settings(args.clone()).map_err(|e| format!("{e:#}"));
    let apply = |new: Settings| {
        let done = jobs.reload(new);
        tracing::info!(
            applied = ?done.applied,
            vms_added = ?done.vms_added,
            vms_changed = ?done.vms_changed,
            vms_removed = ?done.vms_removed,
            restart_pending = ?done.restart_pending,
            "configuration reloaded"
        );
        Ok(())
    };
    node::service::reload_on_hangup(config, read, apply, || jobs.reload_refused()).await;
}

async fn copy(a: CopyArgs) -> anyhow::Result<()> {
    let backup_type = match a.mode.as_str() {
        "full" => BackupType::Full,
        "incremental" => BackupType::Incremental,
        other => bail!("--mode must be full or incremental, not '{other}'"),
    };
    if !config::valid_name(&a.vm_name) {
        bail!("--vm-name '{}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}", a.vm_name);
    }
    let mut bitmaps = std::collections::HashMap::new();
    for b in &a.dirty_bitmaps {
        let (k, name) = b.split_once('=').ok_or_else(|| anyhow!("--dirty-bitmap '{b}' is not KEY=NAME"))?;
        bitmaps.insert(k.to_string(), name.to_string());
    }
    let mut vm = config::VmFile { force_share: a.force_share, ..config::VmFile::new(a.vm_name.clone()) };
    for s in &a.sources {
        let (key, source) = s.split_once('=').ok_or_else(|| anyhow!("--source '{s}' is not KEY=PATH_OR_URL"))?;
        let key_num = key.parse().map_err(|_| anyhow!("--source '{s}': '{key}' is not a disk key"))?;
        let (format, source) = config::split_format(source);
        vm.disk.push(config::DiskFile {
            key: key_num,
            source: source.into(),
            format,
            dirty_bitmap: bitmaps.remove(key),
        });
    }
    if let Some(k) = bitmaps.keys().next() {
        bail!("--dirty-bitmap for disk {k}, which has no --source");
    }
    let vms = config::resolve_vms(vec![vm]).map_err(|e| anyhow!(e))?;
    let copy_file = config::CopyFile {
        connections: a.connections,
        depth: a.depth,
        request_size: a.request_size.clone(),
        block_size: None,
        parallel_disks: Some(a.parallel_disks),
        bandwidth_limit: a.bwlimit.clone(),
        retry_window_s: None,
        // One command, one process: nothing takes a killed `copy` up.
        checkpoint_every_s: Some(0),
    };
    let (copy, parallel_disks) = config::resolve_copy(&copy_file).map_err(|e| anyhow!(e))?;
    let scratch = tempfile::TempDir::new().context("temporary state directory")?;
    let state_dir = a.state_dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    let settings = Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: None,
        state_dir,
        restore_dir: None,
        nbd_hosts: config::NbdHosts::Any,
        api_tls: None,
        nbd_tls: a.nbd_tls.clone(),
        tunnel: None,
        vms,
        copy,
        parallel_disks,
    };
    let jobs = Arc::new(Jobs::new(Arc::new(settings)));
    let job_id = format!("copy-{}", std::process::id());
    let req = StartRequest {
        vm_name: a.vm_name.clone(),
        nbd_host: None,
        nbd_targets: a.nbd_targets,
        job_id: job_id.clone(),
        backup_type,
    };
    let job = jobs.start_copy(req, JobKind::Backup).map_err(|e| anyhow!(e))?;
    let done = CancellationToken::new();
    let display = node::progress::spawn_display(job.progress(), done.clone());
    let status = tokio::select! {
        s = job.wait() => s,
        _ = tokio::signal::ctrl_c() => { job.cancel(); job.wait().await }
    };
    done.cancel();
    let _ = display.await;
    if status == JobStatus::Completed && a.state_dir.is_some() {
        jobs.commit(&job_id).map_err(|e| anyhow!(e))?;
    }
    let view = job.view();
    let rows: Vec<_> = job
        .progress()
        .iter()
        .zip(&view.disks)
        .map(|((k, p), d)| {
            let mode = format!("{:?}", d.mode).to_lowercase();
            let result = d.error.clone().unwrap_or_else(|| d.status.clone());
            (*k, mode, p.snapshot(), result)
        })
        .collect();
    eprint!("{}", node::progress::summary(&rows));
    for d in &view.disks {
        if let Some(r) = &d.mode_reason {
            eprintln!("disk {}: {r}", d.key);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    }
    match status {
        JobStatus::Completed => Ok(()),
        _ => bail!("copy {}: {}", format!("{status:?}").to_lowercase(), view.error.unwrap_or_default()),
    }
}
