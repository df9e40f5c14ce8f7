//! `sendense-tunnel`: run the node's tunnel (`connect`) or the hub's endpoint (`serve`) on its own.
//!
//! `connect` replaces `ssh -N -o StrictHostKeyChecking=no -L ... -R ...` in a shell loop: the host
//! key is always checked, the connection is kept up, and the forwards default to production's
//! (`--forward-range 10100-10200 --forward 8082 --reverse 9081:8081`). `serve` is the hub side
//! that allows only those forwards (`--allow-range 10100-10200 --allow 8082 --allow-reverse
//! 9081` by default); `SIGHUP` reads its authorized_keys file again: a key gone is refused from
//! then on and its sessions cut at once (`tunnel::endpoint::Endpoint::authorize`), where sshd
//! would leave them open. Bad configuration is one line on stderr and exit status 1.

// clap turns the doc comments into `--help`, whose `A-B[:REMOTE]` notation is not a doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tunnel::endpoint::{EndpointConfig, PortSet};
use tunnel::{spec, ClientConfig, HostKeyPolicy, Tunnel};

/// mimalloc, not glibc's malloc, as in `sendense-node` and `sendense-hub`: the SSH messages
/// come and go by the megabyte.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// SSH port forwarding for the data path.
#[derive(Debug, Parser)]
#[command(name = "sendense-tunnel", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect to the hub and carry the forwards (the node side).
    Connect {
        /// Hub host, with an optional port (default 443).
        #[arg(long)]
        hub: String,
        /// User name on the hub.
        #[arg(long, default_value = "root")]
        user: String,
        /// Private key file.
        #[arg(long)]
        identity: PathBuf,
        /// known_hosts file with the hub's key.
        #[arg(long, conflicts_with = "fingerprint")]
        known_hosts: Option<PathBuf>,
        /// Pinned hub key fingerprint (SHA256:...), instead of a known_hosts file.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Local port range forwarded to the hub: A-B[:REMOTE_A].
        #[arg(long = "forward-range")]
        forward_range: Vec<String>,
        /// One local port forwarded to the hub: LOCAL[:REMOTE].
        #[arg(long = "forward")]
        forward: Vec<String>,
        /// A hub port forwarded back here: REMOTE:LOCAL.
        #[arg(long = "reverse")]
        reverse: Vec<String>,
        /// Seconds between keepalives.
        #[arg(long, default_value_t = 15)]
        keepalive_interval: u64,
        /// Unanswered keepalives before reconnecting.
        #[arg(long, default_value_t = 3)]
        keepalive_count: usize,
        /// SSH connections forwarded connections are spread over [default: cores, at most 4].
        #[arg(long)]
        connections: Option<usize>,
    },
    /// Accept node tunnels, allowing only the configured forwards (the hub side).
    Serve {
        /// Address to listen on (the default, every interface, is said on stderr at start).
        #[arg(long, default_value = "0.0.0.0:443")]
        listen: String,
        /// Host private key file.
        #[arg(long)]
        host_key: PathBuf,
        /// authorized_keys file.
        #[arg(long)]
        authorized_keys: PathBuf,
        /// Hub loopback port range nodes may reach: A-B.
        #[arg(long = "allow-range")]
        allow_range: Vec<String>,
        /// One hub loopback port nodes may reach.
        #[arg(long = "allow")]
        allow: Vec<u16>,
        /// A hub loopback port nodes may ask to listen on (reverse forward).
        #[arg(long = "allow-reverse")]
        allow_reverse: Vec<u16>,
        /// Accept only this user name.
        #[arg(long)]
        user: Option<String>,
        /// Connections one key may hold at once (a node opens up to 4, plus stale ones while it
        /// reconnects).
        #[arg(long, default_value_t = 8)]
        max_connections_per_key: usize,
        /// Channels one connection may hold at once.
        #[arg(long, default_value_t = 1024)]
        max_channels: usize,
    },
}

fn port_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let forwards = spec::parse_range(text)?;
    match (forwards.first(), forwards.last()) {
        (Some(a), Some(b)) => Ok((a.listen.port(), b.listen.port())),
        _ => bail!("empty range '{text}'"),
    }
}

async fn connect(cmd: Cmd) -> anyhow::Result<()> {
    let Cmd::Connect {
        hub,
        user,
        identity,
        known_hosts,
        fingerprint,
        mut forward_range,
        mut forward,
        mut reverse,
        keepalive_interval,
        keepalive_count,
        connections,
    } = cmd
    else {
        bail!("internal: not a connect command");
    };
    let (host, port) = match hub.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().with_context(|| format!("bad hub port in '{hub}'"))?),
        None => (hub.clone(), 443),
    };
    let policy = match (known_hosts, fingerprint) {
        (Some(f), None) => HostKeyPolicy::KnownHosts(f),
        (None, Some(fp)) => HostKeyPolicy::Fingerprint(fp),
        _ => bail!("give --known-hosts FILE or --fingerprint SHA256:...; there is no accept-anything mode"),
    };
    if forward_range.is_empty() && forward.is_empty() && reverse.is_empty() {
        forward_range.push("10100-10200".into());
        forward.push("8082".into());
        reverse.push("9081:8081".into());
    }
    let mut config = ClientConfig::new(host, port, user, identity, policy);
    for r in &forward_range {
        config.forwards.extend(spec::parse_range(r)?);
    }
    for f in &forward {
        config.forwards.push(spec::parse_forward(f)?);
    }
    for r in &reverse {
        config.reverse.push(spec::parse_reverse(r)?);
    }
    config.keepalive_interval = Duration::from_secs(keepalive_interval.max(1));
    config.keepalive_max = keepalive_count.max(1);
    if let Some(n) = connections {
        anyhow::ensure!((1..=8).contains(&n), "--connections must be 1 to 8, not {n}");
        config.connections = n;
    }
    let tunnel = Tunnel::start(config).await?;
    let mut last = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let s = tunnel.status();
        let now = (s.connected_since.is_some(), s.reconnects, s.last_error.clone());
        if last.as_ref() != Some(&now) {
            tracing::info!(connected = now.0, reconnects = now.1, last_error = ?now.2, open_channels = s.open_channels, "tunnel status");
            last = Some(now);
        }
    }
}

async fn serve(cmd: Cmd) -> anyhow::Result<()> {
    let Cmd::Serve {
        listen,
        host_key,
        authorized_keys,
        mut allow_range,
        mut allow,
        mut allow_reverse,
        user,
        max_connections_per_key,
        max_channels,
    } = cmd
    else {
        bail!("internal: not a serve command");
    };
    let key = tunnel::load_private_key(&host_key).context("cannot load host key")?;
    let text = tunnel::read_authorized_keys(&authorized_keys)?;
    let authorized = tunnel::authorized::parse(&text).with_context(|| format!("in {}", authorized_keys.display()))?;
    if authorized.is_empty() {
        bail!("{} holds no keys: nobody could connect", authorized_keys.display());
    }
    if allow_range.is_empty() && allow.is_empty() && allow_reverse.is_empty() {
        allow_range.push("10100-10200".into());
        allow.push(8082);
        allow_reverse.push(9081);
    }
    let mut direct = Vec::new();
    for r in &allow_range {
        direct.push(port_range(r)?);
    }
    direct.extend(allow.iter().map(|p| (*p, *p)));
    let config = EndpointConfig::new(key, authorized)
        .user(user)
        .allow_direct(PortSet(direct))
        .allow_reverse(PortSet(allow_reverse.iter().map(|p| (*p, *p)).collect()))
        .max_connections_per_key(max_connections_per_key)
        .max_channels_per_connection(max_channels);
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(%listen, "tunnel endpoint listening");
    if listener.local_addr().is_ok_and(|a| a.ip().is_unspecified()) {
        // Nodes come from other machines, so every interface is the useful default; it is
        // still a choice an operator should see, not find out about.
        eprintln!("sendense-tunnel: listening on every interface ({listen}); pass --listen ADDR:PORT to restrict");
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let endpoint = tunnel::endpoint::Endpoint::new(config);
    let serving = tokio::spawn(std::sync::Arc::clone(&endpoint).serve(listener));
    loop {
        tokio::select! {
            _ = hangups.recv() => reread_keys(&endpoint, &authorized_keys),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    serving.abort();
    Ok(())
}

/// `SIGHUP`: serve with the keys `path` holds now; a file that does not read or parse is logged
/// and the keys in force stay.
fn reread_keys(endpoint: &tunnel::endpoint::Endpoint, path: &std::path::Path) {
    let read = tunnel::read_authorized_keys(path)
        .map_err(|e| e.to_string())
        .and_then(|text| tunnel::authorized::parse(&text).map_err(|e| format!("in {}: {e}", path.display())));
    match read {
        Ok(keys) => {
            if keys.is_empty() {
                tracing::warn!(file = %path.display(), "no key is authorized any more: nobody can connect");
            }
            let count = keys.len();
            let cut = endpoint.authorize(keys);
            tracing::info!(file = %path.display(), keys = count, sessions_cut = cut, "authorized keys read again");
        }
        Err(e) => tracing::error!(error = %e, "authorized keys not read again: the keys in force stay"),
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sendense-tunnel: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            c @ Cmd::Connect { .. } => connect(c).await,
            c @ Cmd::Serve { .. } => serve(c).await,
        }
    });
    if let Err(e) = result {
        eprintln!("sendense-tunnel: {e:#}");
        std::process::exit(1);
    }
}
