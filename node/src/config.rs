//! The node's settings: `node.toml` (keys as in DESIGN.md) with command-line overrides, checked
//! once at start so that a bad setting is one clear line and exit status 1, never a surprise in
//! the middle of a backup.
//!
//! Beyond the contract's keys, `restore_dir` bounds where restores may write, and `[copy]`
//! tunes the data mover (`connections`, `depth`, `request_size`, `block_size`,
//! `parallel_disks`, `bandwidth_limit`, `retry_window_s`) and how often a running job is
//! checkpointed (`checkpoint_every_s`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::api::DiskFormat;
use crate::mover::CopyOptions;
use crate::source::SourceSpec;
use crate::throttle::{parse_rate, Throttle};

/// A string or a list of strings in TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `key = "a"`.
    One(String),
    /// `key = ["a", "b"]`.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `node.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// API listen address.
    pub listen: Option<String>,
    /// Bearer token file (generated if missing).
    pub token_file: Option<PathBuf>,
    /// Change-tracking state.
    pub state_dir: Option<PathBuf>,
    /// Where restores may write besides the VMs' own disks.
    pub restore_dir: Option<PathBuf>,
    /// Hosts besides this machine that jobs may send disks to or restore from (the hub's
    /// address in direct mode).
    pub nbd_hosts: Option<Vec<String>>,
    /// TLS credentials for the hub's NBD ports in direct mode (its `nbd_tls`): a directory with
    /// `ca-cert.pem`, `client-cert.pem` and `client-key.pem`, used for `nbds://` targets.
    pub nbd_tls: Option<PathBuf>,
    /// The API over HTTPS (direct mode across a network): a directory with `server-cert.pem`
    /// and `server-key.pem` (qemu's layout, as `nbd_tls`), read again when they change.
    pub api_tls: Option<PathBuf>,
    /// With `api_tls`: clients (the hub) must present a certificate its `ca-cert.pem` signed.
    #[serde(default)]
    pub api_client_certs: bool,
    /// The tunnel to the hub.
    pub tunnel: Option<TunnelFile>,
    /// Data mover tuning.
    #[serde(default)]
    pub copy: CopyFile,
    /// The VMs.
    #[serde(default)]
    pub vm: Vec<VmFile>,
}

/// `[tunnel]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    /// `HOST[:PORT]` (port 443 when omitted).
    pub hub: String,
    /// User on the hub.
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key.
    pub identity: PathBuf,
    /// known_hosts with the hub's key.
    pub known_hosts: Option<PathBuf>,
    /// Pinned fingerprint.
    pub fingerprint: Option<String>,
    /// `A-B[:REMOTE_A]` ranges.
    pub forward_range: Option<OneOrMany>,
    /// `LOCAL[:REMOTE]`.
    pub forwards: Option<OneOrMany>,
    /// `REMOTE:LOCAL`.
    pub reverse: Option<OneOrMany>,
    /// SSH connections the forwards are spread over (default: one per core, at most 4).
    pub connections: Option<usize>,
}

fn default_user() -> String {
    "root".into()
}

/// `[copy]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyFile {
    /// NBD connections per disk.
    pub connections: Option<usize>,
    /// Requests in flight per connection.
    pub depth: Option<usize>,
    /// Request size (`2M`).
    pub request_size: Option<String>,
    /// Change-tracking block size (`64K`; by default 64 KiB, larger for disks over 256 GiB).
    pub block_size: Option<String>,
    /// Disks of one job copied at once.
    pub parallel_disks: Option<usize>,
    /// Bytes per second for the node, every job together, shared fairly between the jobs
    /// sending (`100M`).
    pub bandwidth_limit: Option<String>,
    /// Seconds a broken connection may take to come back.
    pub retry_window_s: Option<u64>,
    /// Seconds between checkpoints of a running job (0: none), for a node that is killed.
    pub checkpoint_every_s: Option<u64>,
}

/// `[[vm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    /// Name.
    pub name: String,
    /// Run once before the disks are read (the snapshot).
    pub pre_snapshot: Option<String>,
    /// Run once after, also on failure.
    pub post_snapshot: Option<String>,
    /// Read the disks even while another process holds them open for writing (qemu-img's
    /// `--force-share`): for a VM its `pre_snapshot` pauses rather than snapshots.
    #[serde(default)]
    pub force_share: bool,
    /// Disks.
    #[serde(default)]
    pub disk: Vec<DiskFile>,
}

impl VmFile {
    /// A VM with no hooks and no disks yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), pre_snapshot: None, post_snapshot: None, force_share: false, disk: Vec::new() }
    }
}

/// `[[vm.disk]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    /// Key (2000 + unit).
    pub key: u32,
    /// Path or `nbd://` URL.
    pub source: String,
    /// How a file or block device holds the disk: `raw` or `qcow2`. Unstated, it is read as
    /// raw, and refused if it starts like a disk image.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// qemu dirty bitmap exported by the NBD source.
    pub dirty_bitmap: Option<String>,
}

/// A VM as the node runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// Pre-snapshot hook.
    pub pre_snapshot: Option<String>,
    /// Post-snapshot hook.
    pub post_snapshot: Option<String>,
    /// Read disks another process holds open for writing (see [`VmFile::force_share`]).
    pub force_share: bool,
    /// Disks in key order.
    pub disks: Vec<Disk>,
}

/// A disk as the node runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Key.
    pub key: u32,
    /// Where its bytes are.
    pub source: SourceSpec,
}

/// Everything resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// API address.
    pub listen: SocketAddr,
    /// Bearer token, if required.
    pub token: Option<String>,
    /// Change-tracking state.
    pub state_dir: PathBuf,
    /// Extra directory restores may write to.
    pub restore_dir: Option<PathBuf>,
    /// The hosts the API's jobs may connect to for their targets.
    pub nbd_hosts: NbdHosts,
    /// Credentials for `nbds://` targets dialled directly (`nbd_tls`): read at each connection,
    /// so certificates renewed in place are taken up without a restart.
    pub nbd_tls: Option<PathBuf>,
    /// The API served over HTTPS (`api_tls`, `api_client_certs`).
    pub api_tls: Option<crate::https::ApiTlsSetting>,
    /// The tunnel.
    pub tunnel: Option<tunnel::ClientConfig>,
    /// VMs by name order.
    pub vms: Vec<Vm>,
    /// Mover tuning.
    pub copy: CopyOptions,
    /// Disks copied at once per job.
    pub parallel_disks: usize,
}

/// Which hosts a job's `nbd_targets` may name. The node reads whole VM disks and writes restores
/// onto them; whoever holds its API token must not be able to point either at a server of
/// their choosing (a backup sent to it, a restore of its data over a VM's disk). So the API's
/// jobs connect only to this machine (where the tunnel's forwards listen, or a hub on the same
/// machine) and to the hosts the operator names (`nbd_hosts`: the hub in direct mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdHosts {
    /// Any host: `sendense-node copy`, whose operator names the targets on its command line.
    Any,
    /// This machine and these hosts (names or addresses).
    Only(Vec<String>),
}

impl NbdHosts {
    /// Whether a target on `host` may be used.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = host.parse::<std::net::IpAddr>().ok().map(|i| i.to_canonical());
        if host.eq_ignore_ascii_case("localhost") || ip.is_some_and(|i| i.is_loopback()) {
            return true;
        }
        match self {
            Self::Any => true,
            Self::Only(hosts) => hosts.iter().any(|h| {
                h.eq_ignore_ascii_case(host)
                    || ip.is_some_and(|i| h.parse::<std::net::IpAddr>().is_ok_and(|g| g.to_canonical() == i))
            }),
        }
    }
}

impl Settings {
    /// A VM by name.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }
}

/// Whether `name` is a valid VM, job or repository name.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parse `NAME=KEY:SOURCE[,KEY:SOURCE...]`.
///
/// # Errors
/// A malformed declaration, named.
pub fn parse_vm_flag(text: &str) -> Result<VmFile, String> {
    let (name, disks) = text.split_once('=').ok_or_else(|| format!("--vm '{text}': expected NAME=KEY:SOURCE[,...]"))?;
    let mut out = VmFile::new(name);
    for d in disks.split(',').filter(|d| !d.is_empty()) {
        let (key, source) = d.split_once(':').ok_or_else(|| format!("--vm '{text}': disk '{d}' is not KEY:SOURCE"))?;
        let key = key.parse().map_err(|_| format!("--vm '{text}': disk key '{key}' is not a number"))?;
        let (format, source) = split_format(source);
        out.disk.push(DiskFile { key, source: source.to_string(), format, dirty_bitmap: None });
    }
    Ok(out)
}

/// A source given on the command line as `qcow2:PATH` or `raw:PATH` states its format.
pub fn split_format(source: &str) -> (Option<DiskFormat>, &str) {
    if let Some(path) = source.strip_prefix("qcow2:") {
        (Some(DiskFormat::Qcow2), path)
    } else if let Some(path) = source.strip_prefix("raw:") {
        (Some(DiskFormat::Raw), path)
    } else {
        (None, source)
    }
}

/// Parse `2M`, `256K`, `1G` or a number of bytes.
///
/// # Errors
/// Not a size.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_rate(text).map_err(|_| format!("'{text}' is not a size such as 2M"))
}

/// Check and resolve the VMs.
///
/// # Errors
/// A bad name, a duplicate, a VM without disks, a bad source.
pub fn resolve_vms(files: Vec<VmFile>) -> Result<Vec<Vm>, String> {
    let mut vms: Vec<Vm> = Vec::new();
    for v in files {
        if !valid_name(&v.name) {
            return Err(format!("VM name '{}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}", v.name));
        }
        if vms.iter().any(|o| o.name == v.name) {
            return Err(format!("VM '{}' is declared twice", v.name));
        }
        if v.disk.is_empty() {
            return Err(format!("VM '{}' has no disks", v.name));
        }
        let mut disks: Vec<Disk> = Vec::new();
        for d in v.disk {
            if disks.iter().any(|o| o.key == d.key) {
                return Err(format!("VM '{}': disk key {} is declared twice", v.name, d.key));
            }
            let source = SourceSpec::parse(&d.source, d.format, d.dirty_bitmap)
                .map_err(|e| format!("VM '{}' disk {}: {e}", v.name, d.key))?;
            disks.push(Disk { key: d.key, source });
        }
        disks.sort_by_key(|d| d.key);
        vms.push(Vm {
            name: v.name,
            pre_snapshot: v.pre_snapshot,
            post_snapshot: v.post_snapshot,
            force_share: v.force_share,
            disks,
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

/// Resolve `[copy]`.
///
/// # Errors
/// A bad size or rate.
pub fn resolve_copy(c: &CopyFile) -> Result<(CopyOptions, usize), String> {
    let mut o = CopyOptions::default();
    if let Some(n) = c.connections {
        o.connections = n.clamp(1, 16);
    }
    if let Some(n) = c.depth {
        o.depth = n.clamp(1, 64);
    }
    if let Some(s) = &c.request_size {
        o.request_size = parse_size(s)?.clamp(4096, 32 << 20);
    }
    if let Some(s) = &c.block_size {
        let b = parse_size(s)?;
        if !crate::blockmap::valid_block_size(b) {
            return Err(format!("block_size '{s}' must be a power of two from 4K to 64M"));
        }
        o.block_size = Some(b);
    }
    if let Some(s) = &c.bandwidth_limit {
        o.throttle = Some(Arc::new(Throttle::new(parse_rate(s)?)));
    }
    if let Some(s) = c.retry_window_s {
        o.retry_window = Duration::from_secs(s);
    }
    if let Some(s) = c.checkpoint_every_s {
        o.checkpoint_every = Duration::from_secs(s);
    }
    Ok((o, c.parallel_disks.unwrap_or(4).clamp(1, 64)))
}

/// Build the tunnel's configuration (production forwards by default).
///
/// # Errors
/// A bad hub address, forward spec, or no way to check the host key.
pub fn resolve_tunnel(t: TunnelFile) -> Result<tunnel::ClientConfig, String> {
    let (host, port) = match t.hub.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse::<u16>().map_err(|_| format!("bad hub port in '{}'", t.hub))?,
        ),
        _ => (t.hub.clone(), 443),
    };
    let policy = match (t.known_hosts, t.fingerprint) {
        (Some(f), None) => tunnel::HostKeyPolicy::KnownHosts(f),
        (None, Some(fp)) => tunnel::HostKeyPolicy::Fingerprint(fp),
        (Some(_), Some(_)) => return Err("give known_hosts or fingerprint for the tunnel, not both".into()),
        (None, None) => {
            return Err("the tunnel needs known_hosts or fingerprint: the hub's host key is always checked".into())
        }
    };
    let given = t.forward_range.is_some() || t.forwards.is_some() || t.reverse.is_some();
    let ranges = t.forward_range.map(OneOrMany::into_vec).unwrap_or_default();
    let forwards = t.forwards.map(OneOrMany::into_vec).unwrap_or_default();
    let reverse = t.reverse.map(OneOrMany::into_vec).unwrap_or_default();
    let (ranges, forwards, reverse) = if given {
        (ranges, forwards, reverse)
    } else {
        (vec!["10100-10200".to_string()], vec!["8082".to_string()], vec!["9081:8081".to_string()])
    };
    let mut config = tunnel::ClientConfig::new(host, port, t.user, t.identity, policy);
    if let Some(n) = t.connections {
        if !(1..=8).contains(&n) {
            return Err(format!("tunnel connections must be 1 to 8, not {n}"));
        }
        config.connections = n;
    }
    for r in &ranges {
        config.forwards.extend(tunnel::spec::parse_range(r).map_err(|e| e.to_string())?);
    }
    for f in &forwards {
        config.forwards.push(tunnel::spec::parse_forward(f).map_err(|e| e.to_string())?);
    }
    for r in &reverse {
        config.reverse.push(tunnel::spec::parse_reverse(r).map_err(|e| e.to_string())?);
    }
    Ok(config)
}

/// Read the token from `path`, or create it (0600, 32 random bytes as hex) if it is missing.
///
/// # Errors
/// It cannot be read or written, or is empty.
pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => crate::files::read_token(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::{Read, Write};
            use std::os::unix::fs::OpenOptionsExt;
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::files::create_private_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create token file {}: {e}", path.display()))?;
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("cannot write token file {}: {e}", path.display()))?;
            Ok(token)
        }
        Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert!(valid_name("pgtest1"));
        assert!(valid_name("a.b_c-d"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(valid_name(&"a".repeat(64)));
    }

    #[test]
    fn vm_flags_keep_urls_whole() {
        let v = parse_vm_flag("db=2000:/dev/sdb,2001:nbd://127.0.0.1:10809/disk").unwrap();
        assert_eq!(v.name, "db");
        assert_eq!(v.disk[0].key, 2000);
        assert_eq!(v.disk[1].source, "nbd://127.0.0.1:10809/disk");
        assert!(parse_vm_flag("db").is_err());
        assert!(parse_vm_flag("db=x:/dev/sdb").is_err());
        let dup = resolve_vms(vec![parse_vm_flag("db=2000:/a,2000:/b").unwrap()]);
        assert!(dup.unwrap_err().contains("twice"));
        assert!(resolve_vms(vec![parse_vm_flag("../x=2000:/a").unwrap()]).is_err());
    }

    #[test]
    fn jobs_reach_this_machine_and_the_named_hosts_only() {
        let only = NbdHosts::Only(vec!["hub.example".into(), "10.0.0.1".into(), "fd00::1".into()]);
        for ok in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "[::1]",
            "localhost",
            "HUB.example",
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "[fd00::1]",
        ] {
            assert!(only.allows(ok), "{ok}");
        }
        for refused in ["10.0.0.2", "evil.example", "hub.example.evil", "0.0.0.0", ""] {
            assert!(!only.allows(refused), "{refused}");
        }
        assert!(NbdHosts::Only(Vec::new()).allows("127.0.0.1") && !NbdHosts::Only(Vec::new()).allows("10.0.0.1"));
        assert!(NbdHosts::Any.allows("anything.example"));
    }

    #[test]
    fn a_disk_states_its_format_in_the_file_or_as_a_prefix_and_an_nbd_source_cannot() {
        let vms = resolve_vms(vec![parse_vm_flag("db=2000:qcow2:/a.qcow2,2001:raw:/b,2002:/c").unwrap()]).unwrap();
        let formats: Vec<_> =
            vms[0].disks.iter().map(|d| (d.source.path().map(|p| p.to_owned()), d.source.format())).collect();
        assert_eq!(
            formats,
            vec![
                (Some("/a.qcow2".into()), DiskFormat::Qcow2),
                (Some("/b".into()), DiskFormat::Raw),
                (Some("/c".into()), DiskFormat::Raw)
            ]
        );
        let file: NodeFile =
            toml::from_str("[[vm]]\nname = \"db\"\n[[vm.disk]]\nkey = 2000\nsource = \"/a\"\nformat = \"qcow2\"\n")
                .unwrap();
        assert_eq!(resolve_vms(file.vm).unwrap()[0].disks[0].source.format(), DiskFormat::Qcow2);
        let bad: Result<NodeFile, _> =
            toml::from_str("[[vm]]\nname = \"db\"\n[[vm.disk]]\nkey = 2000\nsource = \"/a\"\nformat = \"vmdk\"\n");
        assert!(bad.is_err(), "only raw and qcow2 are read");
        let nbd = resolve_vms(vec![parse_vm_flag("db=2000:qcow2:nbd://127.0.0.1:1/x").unwrap()]).unwrap_err();
        assert!(nbd.contains("an NBD server exports the disk itself"), "{nbd}");
        // A dirty bitmap: an NBD server's, or a qcow2 image's persistent one; a raw file has none.
        let with_bitmap = |format: &str| {
            let text = format!(
                "[[vm]]\nname = \"db\"\n[[vm.disk]]\nkey = 2000\nsource = \"/a\"\n{format}dirty_bitmap = \"b0\"\n"
            );
            resolve_vms(toml::from_str::<NodeFile>(&text).unwrap().vm)
        };
        assert!(with_bitmap("format = \"qcow2\"\n").is_ok());
        for format in ["", "format = \"raw\"\n"] {
            assert!(with_bitmap(format).unwrap_err().contains("a dirty bitmap needs an nbd:// source or format"));
        }
    }

    #[test]
    fn an_nbds_source_names_its_credentials_and_nothing_else() {
        use crate::source::{NbdTls, SourceSpec};
        let spec =
            SourceSpec::parse("nbds://hv1:10809/vda?tls-certificates=/etc/pki/nbd&tls-hostname=hv1.lan", None, None);
        let tls = NbdTls { certificates: "/etc/pki/nbd".into(), hostname: Some("hv1.lan".into()) };
        assert!(matches!(spec, Ok(SourceSpec::Nbd { tls: Some(t), .. }) if t == tls));
        for (text, says) in [
            ("nbds://hv1:10809/vda", "needs ?tls-certificates=DIR"),
            ("nbds://hv1:10809/vda?tls-certificates=/d&tls-verify-peer=false", "unsupported query parameter"),
            ("nbds://hv1/vda?tls-certificates=/d", "needs a port"),
            ("nbd://hv1:10809/vda?tls-certificates=/d", "query strings"),
        ] {
            let e = SourceSpec::parse(text, None, None).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused() {
        let bad: Result<NodeFile, _> = toml::from_str("listen = \"127.0.0.1:1\"\nlisten_typo = 1\n");
        assert!(bad.is_err());
        let good: NodeFile = toml::from_str(
            "listen = \"127.0.0.1:8081\"\n[tunnel]\nhub = \"hub:443\"\nidentity = \"/k\"\nfingerprint = \"SHA256:x\"\nforward_range = \"10100-10200\"\n[[vm]]\nname = \"db\"\n[[vm.disk]]\nkey = 2000\nsource = \"/dev/sdb\"\n",
        )
        .unwrap();
        assert_eq!(good.vm[0].disk[0].key, 2000);
        let t = resolve_tunnel(good.tunnel.unwrap()).unwrap();
        assert_eq!(t.forwards.len(), 101);
        assert!(t.reverse.is_empty());
    }

    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let file: NodeFile = toml::from_str(include_str!("../../deploy/node.toml")).unwrap();
        let vms = resolve_vms(file.vm).unwrap();
        assert_eq!(vms[0].disks.len(), 2);
        assert_eq!(vms[1].disks[0].source.format(), DiskFormat::Qcow2, "the libvirt example");
        let tunnel = resolve_tunnel(file.tunnel.unwrap()).unwrap();
        assert_eq!((tunnel.forwards.len(), tunnel.reverse.len()), (102, 1), "production forwards by default");
        let (copy, _) = resolve_copy(&file.copy).unwrap();
        assert_eq!(copy.checkpoint_every, Duration::from_secs(60));
        let off = CopyFile { checkpoint_every_s: Some(0), ..CopyFile::default() };
        assert!(resolve_copy(&off).unwrap().0.checkpoint_every.is_zero(), "0 turns checkpoints off");
    }

    #[test]
    fn a_tunnel_without_a_host_key_check_is_refused() {
        let t = TunnelFile {
            hub: "hub".into(),
            user: "root".into(),
            identity: "/k".into(),
            known_hosts: None,
            fingerprint: None,
            forward_range: None,
            forwards: None,
            reverse: None,
            connections: None,
        };
        assert!(resolve_tunnel(t.clone()).unwrap_err().contains("always checked"));
        let t = TunnelFile { fingerprint: Some("SHA256:x".into()), connections: Some(0), ..t };
        assert!(resolve_tunnel(t).unwrap_err().contains("1 to 8"));
    }
}
