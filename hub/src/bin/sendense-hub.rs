//! `sendense-hub`: the hub service. `serve` runs the API, the NBD exports and (optionally) the
//! SSH endpoint for node tunnels. Bad configuration is one line on stderr and exit status 1.
//! `backup`, `backups`, `verify`, `delete`, `replicate`, `restore` and `close` drive a running hub from a shell (`hub::cli`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use hub::config::{self, NodeSpec, Settings, SshFile};
use hub::jobs::Hub;

/// mimalloc, not glibc's malloc, as in `sendense-node`: buffers and tunnel messages come and go
/// by the megabyte, and glibc hands freed heap back to the kernel and faults it in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The hub of the backup data path.
#[derive(Debug, Parser)]
#[command(name = "sendense-hub", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the hub API and NBD exports.
    Serve(Box<ServeArgs>),
    /// Run the whole product on this machine: hub, node, tunnel, a sample VM; back it up, change
    /// it, back it up again, replicate, restore, and check everything bit for bit.
    Demo(DemoArgs),
    /// Back a VM up through this machine's hub and follow it to its end (exit 0: completed).
    Backup(BackupArgs),
    /// List the hub's backups, newest first.
    Backups(BackupsArgs),
    /// Verify a backup again, read whole against its node's checksums (exit 0: verified).
    Verify(VerifyArgs),
    /// Delete a backup (--merge: merge the incremental on it into it first, keeping the chain).
    Delete(DeleteArgs),
    /// Bring a VM's replica up to date and follow it to its end (exit 0: completed).
    Replicate(ReplicateArgs),
    /// Restore a backup onto its node (--to KEY=PATH) and follow it, or serve it as read-only
    /// NBD exports until Ctrl-C.
    Restore(RestoreArgs),
    /// Close a restore's exports (or cancel its writing on the node).
    Close(CloseArgs),
    /// Apply retention now (the rules given, else the config's or --schedule's), or --dry-run: show
    /// what it keeps.
    Prune(PruneArgs),
    /// Show the schedules (or one, its last run VM by VM); --run: run one now and follow it.
    Schedules(SchedulesArgs),
    /// Show the nodes as the hub reaches them now (or one, its VMs and tunnel); exit 0: all answer.
    Nodes(NodesArgs),
    /// List every VM the nodes have or with backups: its newest backup, or that it never had one.
    Vms(VmsArgs),
}

/// How the commands reach the hub: its configuration, or a URL.
#[derive(Debug, Clone, clap::Args)]
struct HubArgs {
    /// The hub's configuration, for its address, token file and api_tls
    /// [default: /etc/sendense/hub.toml if it exists, else the built-in defaults].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The hub's API URL, in place of the configuration's listen address.
    #[arg(long)]
    url: Option<String>,
}

impl HubArgs {
    fn client(&self) -> anyhow::Result<hub::client::HubClient> {
        let installed = PathBuf::from("/etc/sendense/hub.toml");
        let config = self.config.clone().or_else(|| installed.exists().then_some(installed));
        hub::client::HubClient::from_config(config.as_deref(), self.url.as_deref())
    }
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The VM.
    vm: String,
    /// A full backup (default: incremental, which the hub makes full where there is no parent).
    #[arg(long)]
    full: bool,
    /// The node, where two have a VM of that name.
    #[arg(long)]
    node: Option<String>,
    /// A label (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Return once started.
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, clap::Args)]
struct BackupsArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// Of this VM only.
    #[arg(long)]
    vm: Option<String>,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The backup.
    backup_id: String,
}

#[derive(Debug, clap::Args)]
struct DeleteArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The backup.
    backup_id: String,
    /// Merge the incremental built on it into it first (the oldest point in time dropped, the
    /// chain kept).
    #[arg(long)]
    merge: bool,
}

#[derive(Debug, clap::Args)]
struct ReplicateArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The VM.
    vm: String,
    /// The node, where two have a VM of that name.
    #[arg(long)]
    node: Option<String>,
    /// Return once started.
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The backup.
    backup_id: String,
    /// Write disk KEY onto PATH on the node (repeatable; some disks or all).
    #[arg(long = "to", value_name = "KEY=PATH", value_parser = hub::cli::parse_destination)]
    to: Vec<(String, String)>,
    /// The node to write onto, where not the backup's.
    #[arg(long)]
    node: Option<String>,
    /// Return once started (exports: leave them open).
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, clap::Args)]
struct CloseArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The restore.
    restore_id: String,
}

#[derive(Debug, clap::Args)]
struct PruneArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The VM (default: every VM with backups).
    vm: Option<String>,
    /// The node, where two have a VM of that name.
    #[arg(long, requires = "vm")]
    node: Option<String>,
    /// The backups this schedule (one with keep_* of its own) made, under its rules unless given
    /// here (default: the backups under the hub's rules).
    #[arg(long)]
    schedule: Option<String>,
    /// Keep the newest N backups.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have one.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep_yearly: Option<u32>,
    /// Only show what the policy keeps and removes.
    #[arg(long)]
    dry_run: bool,
}

impl PruneArgs {
    fn request(&self) -> hub::cli::prune::PruneRequest {
        let rules = [
            ("keep", self.keep),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
            ("keep_yearly", self.keep_yearly),
        ];
        hub::cli::prune::PruneRequest {
            vm: self.vm.clone(),
            node: self.node.clone(),
            schedule: self.schedule.clone(),
            rules: rules.into_iter().filter_map(|(rule, n)| Some((rule, n?))).collect(),
            dry_run: self.dry_run,
        }
    }
}

#[derive(Debug, clap::Args)]
struct SchedulesArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// One schedule, its run under way and its last VM by VM.
    name: Option<String>,
    /// Run it now and follow the run to its end (exit 0: every VM's backup completed).
    #[arg(long, requires = "name")]
    run: bool,
    /// With --run: return once started.
    #[arg(long, requires = "run")]
    detach: bool,
}

/// Exit status 1 when the job did not complete.
#[derive(Debug, clap::Args)]
struct NodesArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// One node: its VMs' disks and its tunnel.
    name: Option<String>,
}

#[derive(Debug, clap::Args)]
struct VmsArgs {
    #[command(flatten)]
    hub: HubArgs,
}

fn completed(done: bool) -> anyhow::Result<()> {
    if !done {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Size of the sample VM's first disk (the second is half): 256M, 1G...
    #[arg(long, default_value = "256M")]
    disk_size: String,
    /// Working directory, kept afterwards [default: a new directory under /tmp].
    #[arg(long)]
    dir: Option<PathBuf>,
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let disk_size = node::config::parse_size(&a.disk_size).map_err(|e| anyhow!(e))?;
    anyhow::ensure!(disk_size >= 16 << 20, "--disk-size must be at least 16M");
    let dir = match a.dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    hub::demo::run(hub::demo::DemoOptions { disk_size, dir }).await
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("sendense-demo-{}-{i}", std::process::id()));
        // Ours alone, like everything the hub makes: the demo's disks stand for VM disks.
        if std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&p).is_ok() {
            return Ok(p);
        }
    }
    bail!("cannot create a directory under {}", base.display())
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// TOML configuration (hub.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// API listen address [default: 127.0.0.1:8082].
    #[arg(long)]
    listen: Option<String>,
    /// Backup repository [default: /var/lib/sendense-hub/repo].
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Replica directory [default: /var/lib/sendense-hub/replicas].
    #[arg(long)]
    replicas: Option<PathBuf>,
    /// NBD port range [default: 10100-10200].
    #[arg(long)]
    nbd_ports: Option<String>,
    /// Address NBD exports listen on [default: 127.0.0.1].
    #[arg(long)]
    nbd_bind: Option<String>,
    /// Host written into nbd_targets [default: 127.0.0.1].
    #[arg(long)]
    nbd_host: Option<String>,
    /// TLS on the NBD ports: a directory with ca-cert.pem, server-cert.pem, server-key.pem
    /// (qemu's layout); clients need a certificate that CA signed; nbd_targets say nbds://.
    #[arg(long)]
    nbd_tls: Option<PathBuf>,
    /// Serve the API over HTTPS with DIR's server-cert.pem and server-key.pem; DIR's ca-cert.pem
    /// checks https:// nodes (hub.toml's api_tls; for direct mode across a network).
    #[arg(long = "api-tls", value_name = "DIR")]
    api_tls: Option<PathBuf>,
    /// With --api-tls: API clients must present a certificate DIR's ca-cert.pem signed
    /// (hub.toml's api_client_certs).
    #[arg(long = "api-client-certs")]
    api_client_certs: bool,
    /// The single node's API URL (node "default") [default: http://127.0.0.1:9081].
    #[arg(long)]
    node_url: Option<String>,
    /// The single node's API token file.
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// The hub's API token file (generated, 0600, if missing) [default: /var/lib/sendense-hub/token].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// SSH endpoint for node tunnels: ADDR:PORT.
    #[arg(long)]
    ssh_listen: Option<String>,
    /// SSH host key.
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// authorized_keys of node tunnels.
    #[arg(long)]
    authorized_keys: Option<PathBuf>,
}

fn settings(a: ServeArgs) -> anyhow::Result<Settings> {
    let file = config::read_hub_file(a.config.as_deref()).map_err(|e| anyhow!(e))?;
    let base = config::default_dir();
    let listen = a.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8082".into());
    let listen: SocketAddr = listen.parse().with_context(|| format!("bad listen address '{listen}'"))?;
    let nbd_ports = config::parse_range(&a.nbd_ports.or(file.nbd_ports).unwrap_or_else(|| "10100-10200".into()))
        .map_err(|e| anyhow!(e))?;
    let bind = a.nbd_bind.or(file.nbd_bind).unwrap_or_else(|| "127.0.0.1".into());
    let nbd_bind: IpAddr = bind.parse().with_context(|| format!("bad --nbd-bind '{bind}'"))?;
    let nbd_host = a.nbd_host.or(file.nbd_host).unwrap_or_else(|| "127.0.0.1".into());
    let token_file = a.token_file.or(file.token_file).unwrap_or_else(|| base.join("token"));
    let token = node::config::load_or_create_token(&token_file).map_err(|e| anyhow!(e))?;
    let mut nodes = Vec::new();
    for n in file.node {
        if !hub::jobs::valid_name(&n.name) {
            bail!("node name '{}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}", n.name);
        }
        if nodes.iter().any(|o: &NodeSpec| o.name == n.name) {
            bail!("node '{}' is declared twice", n.name);
        }
        config::check_node_url(&n.name, &n.url).map_err(|e| anyhow!(e))?;
        let token = n.token_file.as_deref().map(node::files::read_token).transpose().map_err(|e| anyhow!(e))?;
        let nbd_peers = hub::peers::node_addresses(&n.name, &n.url, n.nbd_peers.as_deref()).map_err(|e| anyhow!(e))?;
        nodes.push(NodeSpec { name: n.name, url: n.url, token, key: n.key, nbd_peers });
    }
    let single_url = a.node_url.or(file.node_url);
    let single_token = a.node_token_file.or(file.node_token_file);
    if single_url.is_some() || single_token.is_some() || nodes.is_empty() {
        if nodes.iter().any(|n| n.name == "default") {
            bail!("--node-url declares node 'default', which [[node]] also declares");
        }
        let token = single_token.as_deref().map(node::files::read_token).transpose().map_err(|e| anyhow!(e))?;
        let url = single_url.unwrap_or_else(|| "http://127.0.0.1:9081".into());
        config::check_node_url("default", &url).map_err(|e| anyhow!(e))?;
        let nbd_peers = hub::peers::node_addresses("default", &url, None).map_err(|e| anyhow!(e))?;
        nodes.push(NodeSpec { name: "default".into(), url, token, key: None, nbd_peers });
    }
    let ssh = match (a.ssh_listen, a.host_key, a.authorized_keys, file.ssh) {
        (Some(listen), Some(host_key), Some(authorized_keys), _) => Some(SshFile { listen, host_key, authorized_keys }),
        (None, None, None, f) => f,
        _ => bail!("--ssh-listen, --host-key and --authorized-keys go together"),
    };
    let keys =
        [file.keep_backups, file.keep_hourly, file.keep_daily, file.keep_weekly, file.keep_monthly, file.keep_yearly];
    let retention = hub::retention::Policy::from_keys(keys).map_err(|e| anyhow!(e))?;
    let schedules = config::check_schedules(file.schedule, &nodes).map_err(|e| anyhow!(e))?;
    // Loaded now, so that a wrong directory stops the start (or a reload), not a connection.
    let api_tls =
        node::https::ApiTlsSetting::from_keys(a.api_tls.or(file.api_tls), a.api_client_certs || file.api_client_certs)
            .map_err(|e| anyhow!(e))?;
    node::https::ApiTls::from_setting(api_tls.as_ref()).map_err(|e| anyhow!(e))?;
    Ok(Settings {
        listen,
        repo: a.repo.or(file.repo).unwrap_or_else(|| base.join("repo")),
        replicas: a.replicas.or(file.replicas).unwrap_or_else(|| base.join("replicas")),
        nbd_ports,
        nbd_bind,
        nbd_host,
        nbd_tls: a.nbd_tls.or(file.nbd_tls),
        api_tls,
        nodes,
        token,
        ssh,
        stall_timeout: Duration::from_secs(file.stall_timeout_s.unwrap_or(120).max(5)),
        unreachable_timeout: Duration::from_secs(
            file.unreachable_timeout_s.unwrap_or(hub::jobs::DEFAULT_UNREACHABLE_TIMEOUT_S).max(5),
        ),
        restore_idle: Duration::from_secs(file.restore_idle_s.unwrap_or(3600).max(10)),
        replica_raw: file
            .replica_format
            .as_deref()
            .map(config::parse_replica_format)
            .transpose()
            .map_err(|e| anyhow!(e))?
            .unwrap_or(false),
        direct_io: file.cache.as_deref().map(config::parse_cache).transpose().map_err(|e| anyhow!(e))?.unwrap_or(false),
        io_uring: file.aio.as_deref().map(config::parse_aio).transpose().map_err(|e| anyhow!(e))?.unwrap_or(false),
        nbd_local_users: hub::peers::local_user_ids(&file.nbd_local_users.unwrap_or_default())
            .map_err(|e| anyhow!(e))?,
        retention,
        verify_every: file.verify_every_days.map(config::parse_verify_every).transpose().map_err(|e| anyhow!(e))?,
        compress: file
            .compress
            .as_deref()
            .map(config::parse_compress)
            .transpose()
            .map_err(|e| anyhow!(e))?
            .unwrap_or(false),
        max_chain: file
            .max_chain
            .map(config::parse_max_chain)
            .transpose()
            .map_err(|e| anyhow!(e))?
            .unwrap_or(hub::jobs::DEFAULT_MAX_CHAIN),
        schedules,
    })
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let settings = settings(a.clone())?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let api_tls = node::https::ApiTls::from_setting(settings.api_tls.as_ref()).map_err(|e| anyhow!(e))?;
    let hub = Hub::new(settings.clone()).map_err(|e| anyhow!(e))?;
    let (endpoint, ssh_endpoint) = match &settings.ssh {
        Some(ssh) => {
            let ssh_endpoint = hub::endpoint::SshEndpoint::new(ssh, &settings, &settings.nodes, Arc::clone(&hub))
                .map_err(|e| anyhow!(e))?;
            let l = tokio::net::TcpListener::bind(&ssh.listen)
                .await
                .with_context(|| format!("cannot listen on {} for SSH", ssh.listen))?;
            tracing::info!(listen = %ssh.listen, "SSH endpoint for node tunnels listening");
            let serving = Arc::clone(&ssh_endpoint);
            (Some(tokio::spawn(async move { serving.serve(l).await })), Some(ssh_endpoint))
        }
        None => (None, None),
    };
    tracing::info!(
        listen = %settings.listen,
        https = settings.api_tls.is_some(),
        client_certs = settings.api_tls.as_ref().is_some_and(|t| t.client_certs),
        repo = %settings.repo.display(),
        nbd_ports = %format!("{}-{}", settings.nbd_ports.0, settings.nbd_ports.1),
        nodes = settings.nodes.len(),
        "sendense-hub serving"
    );
    // Runs the last stop handed over go on (before schedules, which would see their VMs busy).
    hub.take_up_handed_over().await;
    // The record a killed hub's next start takes up, kept while the hub runs.
    tokio::spawn(Arc::clone(&hub).keep_record());
    // Scrubbing (`verify_every_days`): ends at once when off, and with the hub.
    tokio::spawn(Arc::clone(&hub).scrub_loop());
    // Compression of completed backups (`compress = "zstd"`): waits while off.
    tokio::spawn(Arc::clone(&hub).rewrite_loop());
    // Whether each node answers (`sendense_hub_node_up`), checked every 30 s.
    tokio::spawn(Arc::clone(&hub).watch_nodes());
    // Backup schedules (`[[schedule]]`), one task each, ending with the hub.
    hub.start_schedules();
    let reloader = tokio::spawn(reload_on_hangup(Arc::clone(&hub), ssh_endpoint, a));
    let reaper = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            // Node jobs of runs a killed predecessor left behind, or that failed while their node
            // was out of reach: cancelled as soon as their node answers (a node behind a tunnel
            // comes back when its tunnel reconnects).
            let mut tick = 0u64;
            loop {
                if hub.has_orphans() {
                    hub.reap_orphans(None).await;
                }
                if hub.has_lost_restores() {
                    hub.reap_lost_restores().await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                tick += 1;
                if tick.is_multiple_of(5) {
                    hub.reap_idle_restores().await;
                }
            }
        })
    };
    let shutdown = node::service::shutdown_signal();
    node::api_server::serve(listener, api_tls, hub::http::router(Arc::clone(&hub)), Default::default(), shutdown)
        .await
        .context("serve")?;
    tracing::info!("shutting down: closing exports, handing the runs under way over to the next start");
    reaper.abort();
    reloader.abort();
    if let Some(e) = endpoint {
        e.abort();
    }
    hub.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// `SIGHUP` (`systemctl reload`): the configuration file read and checked again and taken up
/// (`hub::jobs::reload`); one that does not check is refused with one line and the hub runs on.
async fn reload_on_hangup(hub: Arc<Hub>, ssh_endpoint: Option<Arc<hub::endpoint::SshEndpoint>>, args: ServeArgs) {
    let config = args.config.clone();
    let read = move || settings(args.clone()).map_err(|e| format!("{e:#}"));
    let apply = |new: Settings| {
        // The keys checked first, taken up last: a file refused for any reason changes nothing.
        let keys = ssh_endpoint.as_ref().map(|e| e.read_keys(&new.nodes)).transpose()?;
        let done = hub.reload(&new)?;
        let cut = match (&ssh_endpoint, keys) {
            (Some(e), Some(keys)) => e.take_up(keys),
            _ => 0,
        };
        tracing::info!(
            applied = ?done.applied,
            schedules_added = ?done.schedules_added,
            schedules_changed = ?done.schedules_changed,
            schedules_removed = ?done.schedules_removed,
            nodes_added = ?done.nodes_added,
            nodes_changed = ?done.nodes_changed,
            nodes_removed = ?done.nodes_removed,
            restart_pending = ?done.restart_pending,
            tunnels_cut = cut,
            "configuration reloaded"
        );
        Ok(())
    };
    node::service::reload_on_hangup(config, read, apply, || hub.reload_refused()).await;
}

fn main() {
    let args = Args::parse();
    node::service::run("sendense-hub", async move {
        match args.command {
            Cmd::Serve(a) => serve(*a).await,
            Cmd::Demo(a) => demo(a).await,
            Cmd::Backup(a) => {
                let req =
                    hub::cli::BackupRequest { vm: a.vm, full: a.full, node: a.node, tags: a.tags, detach: a.detach };
                completed(hub::cli::backup(&a.hub.client()?, &req).await?)
            }
            Cmd::Backups(a) => hub::cli::list(&a.hub.client()?, a.vm.as_deref()).await,
            Cmd::Verify(a) => completed(hub::cli::verify(&a.hub.client()?, &a.backup_id).await?),
            Cmd::Delete(a) => hub::cli::delete(&a.hub.client()?, &a.backup_id, a.merge).await,
            Cmd::Replicate(a) => {
                completed(hub::cli::replicate(&a.hub.client()?, &a.vm, a.node.as_deref(), a.detach).await?)
            }
            Cmd::Restore(a) => {
                let req = hub::cli::RestoreRequest { backup_id: a.backup_id, to: a.to, node: a.node, detach: a.detach };
                completed(hub::cli::restore(&a.hub.client()?, &req).await?)
            }
            Cmd::Close(a) => hub::cli::close(&a.hub.client()?, &a.restore_id).await,
            Cmd::Prune(a) => completed(hub::cli::prune::prune(&a.hub.client()?, &a.request()).await?),
            Cmd::Schedules(a) => match (&a.name, a.run) {
                (Some(name), true) => completed(hub::cli::schedules::run(&a.hub.client()?, name, a.detach).await?),
                (Some(name), false) => hub::cli::schedules::show(&a.hub.client()?, name).await,
                (None, _) => hub::cli::schedules::list(&a.hub.client()?).await,
            },
            Cmd::Vms(a) => hub::cli::inventory::vms(&a.hub.client()?).await,
            Cmd::Nodes(a) => completed(match &a.name {
                Some(name) => hub::cli::inventory::node(&a.hub.client()?, name).await?,
                None => hub::cli::inventory::nodes(&a.hub.client()?).await?,
            }),
        }
    });
}
