//! The hub's embedded SSH endpoint for node tunnels ([`tunnel::endpoint`]), with every node
//! fenced to its own ports: a node's key may open the hub API port and the NBD ports leased
//! *right now* to that node's jobs (a backup, a replication, or a restore of one of its
//! backups), and may listen only on its own reverse API port (from its `url`); no shell, no
//! other port, and never another node's export, even while that one runs.
//!
//! Which node a key belongs to: the `key` of its `[[node]]` table; keys in the
//! `authorized_keys` file belong to the node named `default`.
//!
//! A reload (`SIGHUP`) takes up the nodes and keys again ([`SshEndpoint::read_keys`], then
//! [`SshEndpoint::take_up`]: the `[[node]]` tables and the `authorized_keys` file read again): a
//! key that is gone is refused from then on and its tunnels are cut at once
//! (`tunnel::endpoint::Endpoint::reauthorize`), so a node's access is revoked without a restart;
//! a key given to another node, or whose node's reverse port moved, has its tunnels cut too (they
//! log in again under their new grant: an open session keeps the reverse listener it was
//! granted); a new node's key lets it in at once.
//!
//! The addresses nodes log in from are kept in the repository and told to the endpoint at the
//! next start (`crate::known_addresses`), so the places before login it keeps for them hold
//! across restarts.
//!
//! It tells the hub each node's sessions (`crate::jobs::TunnelSessions`), by the node of the key
//! each logged in with, for `GET /api/v1/nodes`, and the logins it refused, each with the node
//! whose key it was, if any.
//!
//! A channel the fence allowed to an open export's port is served by the hub's NBD server in
//! process (`InProcessExports`), not through a loopback TCP connection to the export's
//! listener: the bytes of a remote backup are decrypted and written without crossing two more
//! sockets. Other allowed ports (the hub API) are connected over TCP.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tunnel::authorized::AuthorizedKey;
use tunnel::endpoint::{Endpoint, EndpointConfig, ForwardPolicy, LocalForward, LocalServe, PortSet};

use crate::config::{NodeSpec, Settings, SshFile};
use crate::jobs::{Hub, TunnelSessions};

/// What each key is granted: replaced whole by a reload.
#[derive(Debug, Default)]
struct Grants {
    /// Key fingerprint -> node name.
    key_nodes: HashMap<String, String>,
    /// Node name -> its reverse API port.
    reverse_ports: HashMap<String, u16>,
}

impl Grants {
    /// The keys of `ssh`'s file and of `nodes`, and the nodes' reverse ports.
    ///
    /// # Errors
    /// A key does not load or two nodes share one.
    fn of(ssh: &SshFile, nodes: &[NodeSpec]) -> Result<(Vec<AuthorizedKey>, Self), String> {
        let (authorized, key_nodes) = keys(ssh, nodes)?;
        let reverse_ports = nodes.iter().filter_map(|n| loopback_port(&n.url).map(|p| (n.name.clone(), p))).collect();
        Ok((authorized, Self { key_nodes, reverse_ports }))
    }

    /// The node of the key of fingerprint `fingerprint` and its reverse port.
    fn grant(&self, fingerprint: &str) -> (Option<&String>, Option<&u16>) {
        let node = self.key_nodes.get(fingerprint);
        (node, node.and_then(|n| self.reverse_ports.get(n)))
    }
}

/// The per-node fence.
struct NodeFence {
    hub: Arc<Hub>,
    grants: RwLock<Grants>,
    api_port: u16,
}

impl NodeFence {
    fn grants(&self) -> std::sync::RwLockReadGuard<'_, Grants> {
        self.grants.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn node_of(&self, key: &AuthorizedKey) -> Option<String> {
        self.grants().key_nodes.get(&tunnel::hostkey::fingerprint(&key.key)).cloned()
    }
}

impl ForwardPolicy for NodeFence {
    fn allow_direct(&self, key: &AuthorizedKey, port: u16) -> bool {
        if port == self.api_port {
            return true;
        }
        let Some(node) = self.node_of(key) else { return false };
        let owner = self.hub.port_owner_node(port);
        if owner.as_deref() != Some(node.as_str()) {
            tracing::warn!(node = %node, port, owner = ?owner, "refused: NBD port not leased to this node");
            return false;
        }
        true
    }

    fn allow_reverse(&self, key: &AuthorizedKey, port: u16) -> bool {
        self.grants().grant(&tunnel::hostkey::fingerprint(&key.key)).1 == Some(&port)
    }
}

/// Channels to export ports, handed to the hub's NBD server.
struct InProcessExports {
    hub: Arc<Hub>,
}

impl LocalForward for InProcessExports {
    fn serve(&self, port: u16) -> Option<LocalServe> {
        self.hub.exports.serve_channel(port, format!("tunnel to port {port}"))
    }
}

/// The port of an `http://HOST:PORT` URL on loopback (the reverse channel's hub side).
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then_some(())?;
    port.parse().ok()
}

/// The hub's SSH endpoint (module doc), its keys replaceable while it serves.
pub struct SshEndpoint {
    endpoint: Arc<Endpoint>,
    fence: Arc<NodeFence>,
    /// Where its keys come from: the authorized_keys file it started with.
    ssh: SshFile,
    /// Where the addresses nodes logged in from are kept across restarts
    /// (`crate::known_addresses`).
    known_file: std::path::PathBuf,
}

impl std::fmt::Debug for SshEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshEndpoint").field("grants", &*self.fence.grants()).finish_non_exhaustive()
    }
}

impl SshEndpoint {
    /// The endpoint of `ssh` for `nodes`, fenced as the module doc says, telling `hub` its
    /// nodes' sessions.
    ///
    /// # Errors
    /// The host key or a key does not load, two nodes share a key, or no key at all.
    pub fn new(ssh: &SshFile, settings: &Settings, nodes: &[NodeSpec], hub: Arc<Hub>) -> Result<Arc<Self>, String> {
        let key = tunnel::load_private_key(&ssh.host_key).map_err(|e| format!("cannot load host key: {e}"))?;
        let (authorized, grants) = Grants::of(ssh, nodes)?;
        if authorized.is_empty() {
            return Err(format!("{} holds no keys: no node could connect", ssh.authorized_keys.display()));
        }
        let direct = vec![settings.nbd_ports, (settings.listen.port(), settings.listen.port())];
        // Which reverse port a key may listen on is the fence's to say (its node's, and nodes
        // come and go with reloads); port 0 ("any port") stays refused.
        let reverse = vec![(1, u16::MAX)];
        let local = InProcessExports { hub: Arc::clone(&hub) };
        let fence = Arc::new(NodeFence {
            hub: Arc::clone(&hub),
            grants: RwLock::new(grants),
            api_port: settings.listen.port(),
        });
        // A node opens up to 4 SSH connections (one per core), plus stale ones while it
        // reconnects: the default of 8 per key. Channels: see tunnel::limits for what 512 of them
        // can hold.
        let config = EndpointConfig::new(key, authorized)
            .allow_direct(PortSet(direct))
            .allow_reverse(PortSet(reverse))
            .max_connections_per_key(8)
            .max_channels_per_connection(512)
            .policy(Some(Arc::clone(&fence) as Arc<dyn ForwardPolicy>))
            .local(Some(Arc::new(local)));
        let endpoint = Endpoint::new(config);
        let known_file = hub.repo.root.join(crate::known_addresses::FILE);
        endpoint.remember_addresses(crate::known_addresses::read(&known_file));
        let this = Arc::new(Self { endpoint, fence, ssh: ssh.clone(), known_file });
        let told: std::sync::Weak<dyn TunnelSessions> = Arc::downgrade(&this) as std::sync::Weak<SshEndpoint>;
        hub.attach_tunnels(told);
        Ok(this)
    }

    /// Serve node tunnels on `listener` until the task is dropped, keeping the addresses they log
    /// in from in the repository.
    pub async fn serve(&self, listener: tokio::net::TcpListener) {
        let keep = crate::known_addresses::keep(Arc::clone(&self.endpoint), self.known_file.clone());
        tokio::select! {
            () = Arc::clone(&self.endpoint).serve(listener) => {}
            () = keep => {}
        }
    }

    /// The keys and reverse ports of a reloaded configuration's `nodes` (module doc), with the
    /// authorized_keys file read again; checked, not yet taken up ([`Self::take_up`]), so that
    /// a reload refused for another reason changes nothing.
    ///
    /// # Errors
    /// A key does not load or two nodes share one.
    pub fn read_keys(&self, nodes: &[NodeSpec]) -> Result<NodeKeys, String> {
        let (authorized, grants) = Grants::of(&self.ssh, nodes)?;
        Ok(NodeKeys { authorized, grants })
    }

    /// Serve with `keys` from now on: a key that is gone is refused and its tunnels cut, and so
    /// are the tunnels of a key now another node's or whose node's reverse port moved. Returns
    /// how many were cut.
    pub fn take_up(&self, keys: NodeKeys) -> usize {
        if keys.authorized.is_empty() {
            tracing::warn!("no key is authorized any more: no node can connect");
        }
        let old = std::mem::replace(
            &mut *self.fence.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            keys.grants,
        );
        let fence = Arc::clone(&self.fence);
        self.endpoint.reauthorize(keys.authorized, move |key| {
            let fingerprint = tunnel::hostkey::fingerprint(&key.key);
            old.grant(&fingerprint) != fence.grants().grant(&fingerprint)
        })
    }
}

impl TunnelSessions for SshEndpoint {
    fn by_node(&self) -> HashMap<String, Vec<tunnel::endpoint::SessionInfo>> {
        let mut out: HashMap<String, Vec<tunnel::endpoint::SessionInfo>> = HashMap::new();
        for session in self.endpoint.sessions() {
            if let Some(node) = self.fence.node_of(&session.key) {
                out.entry(node).or_default().push(session);
            }
        }
        out
    }

    fn refused(&self) -> Vec<(Option<String>, tunnel::endpoint::RefusedLogin)> {
        let grants = self.fence.grants();
        let refused = self.endpoint.refused_logins();
        let node_of = |r: &tunnel::endpoint::RefusedLogin| r.fingerprint.as_ref().and_then(|f| grants.key_nodes.get(f));
        refused.into_iter().map(|r| (node_of(&r).cloned(), r)).collect()
    }

    fn refusals_total(&self) -> tunnel::endpoint::RefusalTotals {
        self.endpoint.refusals_total()
    }

    fn host_key_fingerprint(&self) -> String {
        self.endpoint.host_key_fingerprint()
    }
}

/// The keys [`SshEndpoint::read_keys`] read, for [`SshEndpoint::take_up`].
#[derive(Debug)]
pub struct NodeKeys {
    authorized: Vec<AuthorizedKey>,
    grants: Grants,
}

/// The keys that may connect (the authorized_keys file's, then each node's `key`) and which
/// node each belongs to (by fingerprint).
fn keys(ssh: &SshFile, nodes: &[NodeSpec]) -> Result<(Vec<AuthorizedKey>, HashMap<String, String>), String> {
    let text = tunnel::read_authorized_keys(&ssh.authorized_keys).map_err(|e| e.to_string())?;
    let mut authorized =
        tunnel::authorized::parse(&text).map_err(|e| format!("{}: {e}", ssh.authorized_keys.display()))?;
    let mut key_nodes: HashMap<String, String> =
        authorized.iter().map(|k| (tunnel::hostkey::fingerprint(&k.key), "default".to_string())).collect();
    for n in nodes {
        if let Some(line) = &n.key {
            let keys = tunnel::authorized::parse(line).map_err(|e| format!("key of node {}: {e}", n.name))?;
            for k in keys {
                let fp = tunnel::hostkey::fingerprint(&k.key);
                if key_nodes.get(&fp).is_some_and(|other| *other != n.name) {
                    return Err(format!("node {}'s key is also another node's key", n.name));
                }
                key_nodes.insert(fp, n.name.clone());
                authorized.push(k);
            }
        }
    }
    Ok((authorized, key_nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_ports_come_from_loopback_node_urls() {
        assert_eq!(loopback_port("http://127.0.0.1:9081"), Some(9081));
        assert_eq!(loopback_port("http://localhost:9082/"), Some(9082));
        assert_eq!(loopback_port("http://10.0.0.5:8081"), None);
    }
}
