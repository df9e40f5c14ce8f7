//! The hub's settings: `hub.toml` (keys as in DESIGN.md) with command-line overrides, checked
//! once at start: a bad setting is one line and exit status 1.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `hub.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// API address.
    pub listen: Option<String>,
    /// Backup repository.
    pub repo: Option<PathBuf>,
    /// Replica directory.
    pub replicas: Option<PathBuf>,
    /// `A-B`.
    pub nbd_ports: Option<String>,
    /// Address the exports listen on.
    pub nbd_bind: Option<String>,
    /// Host written into `nbd_targets`.
    pub nbd_host: Option<String>,
    /// Single node's API (the reverse channel).
    pub node_url: Option<String>,
    /// Single node's token file.
    pub node_token_file: Option<PathBuf>,
    /// The hub's own token file.
    pub token_file: Option<PathBuf>,
    /// Seconds without progress before a job fails.
    pub stall_timeout_s: Option<u64>,
    /// Seconds a node that cannot be reached (its host rebooting) may take to come back before
    /// its runs fail.
    pub unreachable_timeout_s: Option<u64>,
    /// Seconds a restore export may stay without clients.
    pub restore_idle_s: Option<u64>,
    /// `qcow2` (default) or `raw` for replica images.
    pub replica_format: Option<String>,
    /// `writeback` (default) or `none`: how exports write images (`none` is `O_DIRECT`).
    pub cache: Option<String>,
    /// TLS on the NBD ports (direct mode across a network): a directory as qemu's
    /// `tls-creds-x509` reads it (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`); every
    /// client must start TLS and present a certificate that CA signed, and `nbd_targets` say
    /// `nbds://`. Channels of the SSH endpoint are not asked for it.
    pub nbd_tls: Option<PathBuf>,
    /// The API over HTTPS (direct mode across a network): a directory in qemu's layout whose
    /// `server-cert.pem` and `server-key.pem` it is served with (read again when they change),
    /// whose `ca-cert.pem` checks the certificates of `https://` node urls, and whose
    /// `client-cert.pem` and `client-key.pem`, if there, are presented to nodes that ask for a
    /// client certificate (their `api_client_certs`).
    pub api_tls: Option<PathBuf>,
    /// With `api_tls`: API clients must present a certificate its `ca-cert.pem` signed.
    #[serde(default)]
    pub api_client_certs: bool,
    /// `threads` (default) or `io_uring`: how exports submit their I/O (qemu-nbd's `--aio`).
    pub aio: Option<String>,
    /// Accounts on this machine whose TCP clients exports admit besides root and the hub's own
    /// (names or uids): the login user of OpenSSH's sshd when it forwards for the nodes.
    pub nbd_local_users: Option<Vec<String>>,
    /// Backups of each VM kept after each backup (the oldest merged away); all when unset.
    pub keep_backups: Option<u32>,
    /// The newest backup of each of the last N hours kept (`retention.rs`).
    pub keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    pub keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    pub keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    pub keep_yearly: Option<u32>,
    /// Verify each completed backup again once per this many days (`jobs/scrub.rs`); off when
    /// unset.
    pub verify_every_days: Option<f64>,
    /// `"zstd"`: completed backups' images rewritten compressed in the background
    /// (`jobs/compress.rs`); `"none"` (the default): stored as the node sent them.
    pub compress: Option<String>,
    /// Images one chain holds, a full backup and its incrementals (default
    /// [`crate::jobs::DEFAULT_MAX_CHAIN`]): an incremental past it is made to stand alone on the hub once complete (`jobs/flatten.rs`).
    pub max_chain: Option<u32>,
    /// The embedded SSH endpoint.
    pub ssh: Option<SshFile>,
    /// Nodes.
    #[serde(default)]
    pub node: Vec<NodeFile>,
    /// Backup schedules (`crate::schedule`).
    #[serde(default)]
    pub schedule: Vec<crate::schedule::ScheduleFile>,
}

/// `[ssh]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFile {
    /// `ADDR:PORT`.
    pub listen: String,
    /// Host private key.
    pub host_key: PathBuf,
    /// authorized_keys.
    pub authorized_keys: PathBuf,
}

/// `[[node]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Name.
    pub name: String,
    /// API base URL (through the reverse channel).
    pub url: String,
    /// Token file of that node's API.
    pub token_file: Option<PathBuf>,
    /// The node's SSH public key (authorized_keys form).
    pub key: Option<String>,
    /// Addresses the node's NBD connections come from in direct mode (default: its url's host).
    pub nbd_peers: Option<Vec<String>>,
}

/// A node the hub drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Name.
    pub name: String,
    /// API base URL.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// SSH public key line.
    pub key: Option<String>,
    /// Addresses its NBD connections may come from over TCP (besides loopback).
    pub nbd_peers: Vec<std::net::IpAddr>,
}

/// Everything resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// API address.
    pub listen: SocketAddr,
    /// Backups.
    pub repo: PathBuf,
    /// Replicas.
    pub replicas: PathBuf,
    /// NBD port range.
    pub nbd_ports: (u16, u16),
    /// Bind address of exports.
    pub nbd_bind: IpAddr,
    /// Host in `nbd_targets`.
    pub nbd_host: String,
    /// TLS credentials of the NBD ports (`nbd_tls`).
    pub nbd_tls: Option<PathBuf>,
    /// The API served over HTTPS (`api_tls`, `api_client_certs`); the directory's CA checks
    /// `https://` nodes, and its client certificate, if it holds one, is presented to them.
    pub api_tls: Option<node::https::ApiTlsSetting>,
    /// Nodes.
    pub nodes: Vec<NodeSpec>,
    /// The hub's bearer token.
    pub token: String,
    /// SSH endpoint.
    pub ssh: Option<SshFile>,
    /// Fail a job after this long without progress.
    pub stall_timeout: Duration,
    /// Fail a job after its node was unreachable this long (at least `stall_timeout`).
    pub unreachable_timeout: Duration,
    /// Close a restore after this long without clients.
    pub restore_idle: Duration,
    /// Replica images as raw files instead of qcow2.
    pub replica_raw: bool,
    /// Exports write guest data with `O_DIRECT` (`cache = "none"`).
    pub direct_io: bool,
    /// Uids whose TCP clients on this machine exports admit, besides root and the hub's own.
    pub nbd_local_users: Vec<u32>,
    /// What is kept of each VM's backups (per node) after each backup completes, unless its
    /// request says (`keep_backups`, `keep_daily`, ...); empty: everything.
    pub retention: crate::retention::Policy,
    /// Scrub: each completed backup verified again this often (`verify_every_days`).
    pub verify_every: Option<Duration>,
    /// Exports submit their I/O through one io_uring shared by all (`aio = "io_uring"`).
    pub io_uring: bool,
    /// Completed backups' images rewritten compressed in the background (`compress = "zstd"`).
    pub compress: bool,
    /// Images one chain holds (`max_chain`): an incremental past it is made to stand alone on the hub once complete (`jobs/flatten.rs`).
    pub max_chain: usize,
    /// Backup schedules (`[[schedule]]`).
    pub schedules: Vec<crate::schedule::Schedule>,
}

impl Settings {
    /// The scheme of the URLs in `nbd_targets`: `nbds` when the NBD ports require TLS.
    pub fn nbd_scheme(&self) -> &'static str {
        if self.nbd_tls.is_some() {
            "nbds"
        } else {
            "nbd"
        }
    }
}

/// The keys of `new` that differ from `old` and that a running hub cannot take up (its
/// listeners, repository and SSH endpoint are built at start), by their names in
/// hub.toml. A reload applies the others and names these as waiting for a restart.
pub fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let keys: [(&'static str, bool); 15] = [
        ("listen", old.listen != new.listen),
        ("repo", old.repo != new.repo),
        ("replicas", old.replicas != new.replicas),
        ("nbd_ports", old.nbd_ports != new.nbd_ports),
        ("nbd_bind", old.nbd_bind != new.nbd_bind),
        ("nbd_host", old.nbd_host != new.nbd_host),
        ("nbd_tls", old.nbd_tls != new.nbd_tls),
        ("api_tls", old.api_tls.as_ref().map(|t| &t.dir) != new.api_tls.as_ref().map(|t| &t.dir)),
        (
            "api_client_certs",
            old.api_tls.as_ref().map(|t| t.client_certs) != new.api_tls.as_ref().map(|t| t.client_certs),
        ),
        ("token_file", old.token != new.token),
        ("ssh", old.ssh != new.ssh),
        ("replica_format", old.replica_raw != new.replica_raw),
        ("cache", old.direct_io != new.direct_io),
        ("aio", old.io_uring != new.io_uring),
        ("nbd_local_users", old.nbd_local_users != new.nbd_local_users),
    ];
    keys.into_iter().filter(|(_, changed)| *changed).map(|(key, _)| key).collect()
}

/// Check the `[[schedule]]`s against each other and the nodes: names unique, nodes known, tags
/// valid.
///
/// # Errors
/// The first thing wrong, naming its schedule.
pub fn check_schedules(
    files: Vec<crate::schedule::ScheduleFile>,
    nodes: &[NodeSpec],
) -> Result<Vec<crate::schedule::Schedule>, String> {
    let mut out: Vec<crate::schedule::Schedule> = Vec::new();
    for f in files {
        let s = crate::schedule::Schedule::parse(f)?;
        if out.iter().any(|o| o.name == s.name) {
            return Err(format!("schedule {} is declared twice", s.name));
        }
        if let Some(n) = s.node.as_ref().filter(|n| !nodes.iter().any(|o| o.name == **n)) {
            return Err(format!("schedule {}: node {n} is not a [[node]] of this hub", s.name));
        }
        crate::jobs::checked_tags(&s.tags).map_err(|e| format!("schedule {}: {e}", s.name))?;
        out.push(s);
    }
    Ok(out)
}

/// A node's API url: `http://` or `https://` (checked against `api_tls`'s CA, else the
/// system's roots), so that a typo stops the start rather than every call to the node.
///
/// # Errors
/// Any other scheme, or none.
pub fn check_node_url(node: &str, url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => Ok(()),
        _ => Err(format!("node {node}: url '{url}' must be http://HOST:PORT or https://HOST:PORT")),
    }
}

/// `compress`: `"zstd"` (completed backups rewritten compressed) or `"none"`.
///
/// # Errors
/// Anything else.
pub fn parse_compress(text: &str) -> Result<bool, String> {
    match text {
        "zstd" => Ok(true),
        "none" => Ok(false),
        other => Err(format!("compress = '{other}': give \"zstd\" or \"none\"")),
    }
}

/// `verify_every_days`: a period of more than zero and at most ten years.
///
/// # Errors
/// Zero, negative, not a number, or longer.
pub fn parse_verify_every(days: f64) -> Result<Duration, String> {
    if days.is_finite() && days > 0.0 && days <= 3650.0 {
        Ok(Duration::from_secs_f64(days * 86400.0))
    } else {
        Err(format!("verify_every_days = {days}: give a number of days above 0 (at most 3650), or leave it out"))
    }
}

/// `max_chain`: images one chain may hold, from 1 (every incremental made to stand alone) to
/// [`crate::jobs::MAX_CHAIN`] (as deep as `qcow2` opens a chain).
///
/// # Errors
/// Outside that range.
pub fn parse_max_chain(images: u32) -> Result<usize, String> {
    let most = crate::jobs::MAX_CHAIN;
    match usize::try_from(images) {
        Ok(n) if (1..=most).contains(&n) => Ok(n),
        _ => Err(format!(
            "max_chain = {images}: give the images one chain may hold, a full backup and its incrementals, \
             from 1 (every incremental made to stand alone) to {most}"
        )),
    }
}

/// `writeback` or `none`: whether exports use `O_DIRECT`.
///
/// # Errors
/// Anything else (`unsafe` and `writethrough` too: a hub does not trade durability away).
pub fn parse_cache(text: &str) -> Result<bool, String> {
    match text {
        "writeback" => Ok(false),
        "none" => Ok(true),
        other => Err(format!("cache '{other}' must be writeback or none")),
    }
}

/// `threads` or `io_uring`: whether exports submit their I/O through io_uring.
///
/// # Errors
/// Anything else (`native`, Linux AIO, is not implemented).
pub fn parse_aio(text: &str) -> Result<bool, String> {
    match text {
        "threads" => Ok(false),
        "io_uring" => Ok(true),
        other => Err(format!("aio '{other}' must be threads or io_uring")),
    }
}

/// `qcow2` or `raw`.
///
/// # Errors
/// Anything else.
pub fn parse_replica_format(text: &str) -> Result<bool, String> {
    match text {
        "qcow2" => Ok(false),
        "raw" => Ok(true),
        other => Err(format!("replica_format '{other}' must be qcow2 or raw")),
    }
}

/// Parse `A-B`.
///
/// # Errors
/// Not a range of ports.
pub fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let (a, b) = text.split_once('-').ok_or_else(|| format!("port range '{text}' is not A-B"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("port range '{text}': '{a}' is not a port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("port range '{text}': '{b}' is not a port"))?;
    if a == 0 || b < a {
        return Err(format!("port range '{text}' is empty or starts at 0"));
    }
    Ok((a, b))
}

/// `hub.toml` at `path` read and parsed (the defaults without one), for the service and for the
/// commands that reach it.
///
/// # Errors
/// The file does not read, or does not parse (the path and the parser's message).
pub fn read_hub_file(path: Option<&std::path::Path>) -> Result<HubFile, String> {
    let Some(path) = path else { return Ok(HubFile::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
}

/// Default state paths: under `/var/lib/sendense-hub`.
pub fn default_dir() -> PathBuf {
    PathBuf::from("/var/lib/sendense-hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(parse_range("10100-10200"), Ok((10100, 10200)));
        assert!(parse_range("10200-10100").is_err());
        assert!(parse_range("0-5").is_err());
        assert!(parse_range("10100").is_err());
        assert!(parse_range("a-b").is_err());
    }

    #[test]
    fn node_urls_are_http_or_https() {
        for good in ["http://127.0.0.1:9081", "https://node1.lan:8081", "https://[::1]:8081/"] {
            assert_eq!(check_node_url("n", good), Ok(()), "{good}");
        }
        for bad in ["ftp://n:1", "node1:8081", "https://", "HTTP://n:1", ""] {
            let err = check_node_url("n", bad).unwrap_err();
            assert!(err.contains("must be http://") && err.starts_with("node n:"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let file: HubFile = toml::from_str(include_str!("../../deploy/hub.toml")).unwrap();
        assert_eq!(parse_range(file.nbd_ports.as_deref().unwrap()), Ok((10100, 10200)));
        let key = file.node[0].key.as_deref().unwrap();
        assert_eq!(tunnel::authorized::parse(key).unwrap().len(), 1);
        assert!(file.ssh.is_some());
        let nodes: Vec<NodeSpec> = file
            .node
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                url: n.url.clone(),
                token: None,
                key: None,
                nbd_peers: Vec::new(),
            })
            .collect();
        let schedules = check_schedules(file.schedule, &nodes).unwrap();
        assert_eq!(schedules.len(), 3);
    }

    #[test]
    fn schedules_are_checked_against_each_other_and_the_nodes() {
        let nodes = [NodeSpec { name: "a".into(), url: String::new(), token: None, key: None, nbd_peers: Vec::new() }];
        let check = |text: &str| {
            let f: HubFile = toml::from_str(text).unwrap();
            check_schedules(f.schedule, &nodes)
        };
        let one = "[[schedule]]\nname = \"n\"\nvms = [\"vm\"]\nat = [\"02:00\"]\n";
        assert_eq!(check(one).unwrap().len(), 1);
        assert!(check(&format!("{one}{one}")).unwrap_err().contains("declared twice"));
        assert!(check(&format!("{one}node = \"b\"\n")).unwrap_err().contains("node b is not a [[node]]"));
        assert!(check(&format!("{one}tags = [\"a b\"]\n")).unwrap_err().contains("tag 'a b'"));
        assert!(toml::from_str::<HubFile>("[[schedule]]\nname = \"n\"\nvms = [\"vm\"]\nhour = 2\n").is_err());
    }

    #[test]
    fn cache_modes_are_writeback_or_none_and_nothing_that_gives_up_durability() {
        assert_eq!(parse_cache("writeback"), Ok(false));
        assert_eq!(parse_cache("none"), Ok(true));
        for refused in ["unsafe", "writethrough", "directsync", "None", ""] {
            assert!(parse_cache(refused).unwrap_err().contains("writeback or none"), "{refused}");
        }
        let file: HubFile = toml::from_str("cache = \"none\"\n").unwrap();
        assert_eq!(file.cache.as_deref(), Some("none"));
        assert_eq!(parse_aio("threads"), Ok(false));
        assert_eq!(parse_aio("io_uring"), Ok(true));
        assert!(parse_aio("native").unwrap_err().contains("threads or io_uring"));
    }

    #[test]
    fn max_chain_is_between_one_image_and_as_deep_as_qcow2_opens() {
        assert_eq!(parse_max_chain(1), Ok(1));
        assert_eq!(parse_max_chain(256), Ok(crate::jobs::MAX_CHAIN));
        for bad in [0, 257, u32::MAX] {
            assert!(
                parse_max_chain(bad).unwrap_err().contains("from 1 (every incremental made to stand alone) to 256"),
                "{bad}"
            );
        }
    }

    #[test]
    fn verify_every_days_is_a_positive_period() {
        assert_eq!(parse_verify_every(7.0), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_verify_every(0.5), Ok(Duration::from_secs(43200)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 4000.0] {
            assert!(parse_verify_every(bad).unwrap_err().contains("verify_every_days"), "{bad}");
        }
    }

    #[test]
    fn retention_rules_are_read_by_their_keys() {
        let f: HubFile = toml::from_str(
            "keep_backups = 3\nkeep_hourly = 24\nkeep_daily = 7\nkeep_weekly = 4\nkeep_monthly = 6\nkeep_yearly = 2\n",
        )
        .unwrap();
        let rules = [f.keep_backups, f.keep_hourly, f.keep_daily, f.keep_weekly, f.keep_monthly, f.keep_yearly];
        assert_eq!(rules, [Some(3), Some(24), Some(7), Some(4), Some(6), Some(2)]);
        assert!(toml::from_str::<HubFile>("keep_last = 3\n").is_err(), "keep_backups is the name of keep-last");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<HubFile>("listen = \"127.0.0.1:8082\"\nrepo_dir = \"/x\"\n").is_err());
        let f: HubFile = toml::from_str(
            "nbd_ports = \"10100-10200\"\n[[node]]\nname = \"a\"\nurl = \"http://127.0.0.1:9081\"\n[[node]]\nname = \"b\"\nurl = \"http://127.0.0.1:9082\"\n",
        )
        .unwrap();
        assert_eq!(f.node.len(), 2);
    }
}
