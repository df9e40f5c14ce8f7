//! The hub's embedded SSH endpoint for node tunnels ([`tunnel::endpoint`]): node keys may open
//! the NBD port range and the hub API port, and listen on the reverse ports of the configured
//! nodes' API URLs; nothing else (no shell, no other ports).
//!
//! Limitation: the allow list is the same for every node key; fencing each node to the ports
//! leased to its own running jobs needs a per-key allow list in the endpoint and is not built.

use tunnel::endpoint::{EndpointConfig, PortSet};

use crate::config::{NodeSpec, Settings, SshFile};

/// The port of an `http://HOST:PORT` URL on loopback (the reverse channel's hub side).
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then_some(())?;
    port.parse().ok()
}

/// Build the endpoint's configuration.
///
/// # Errors
/// The host key or authorized_keys cannot be read, or no key is authorized.
pub fn config(ssh: &SshFile, settings: &Settings, nodes: &[NodeSpec]) -> Result<EndpointConfig, String> {
    let key = tunnel::load_secret_key(&ssh.host_key, None)
        .map_err(|e| format!("cannot load host key {}: {e}", ssh.host_key.display()))?;
    let mut text = std::fs::read_to_string(&ssh.authorized_keys)
        .map_err(|e| format!("cannot read {}: {e}", ssh.authorized_keys.display()))?;
    for n in nodes {
        if let Some(k) = &n.key {
            text.push('\n');
            text.push_str(k);
        }
    }
    let authorized = tunnel::authorized::parse(&text).map_err(|e| format!("authorized keys: {e}"))?;
    if authorized.is_empty() {
        return Err(format!("{} holds no keys: no node could connect", ssh.authorized_keys.display()));
    }
    let direct = vec![settings.nbd_ports, (settings.listen.port(), settings.listen.port())];
    let reverse: Vec<(u16, u16)> = nodes.iter().filter_map(|n| loopback_port(&n.url)).map(|p| (p, p)).collect();
    Ok(EndpointConfig {
        host_key: key,
        authorized,
        user: None,
        allow_direct: PortSet(direct),
        allow_reverse: PortSet(reverse),
        max_connections_per_key: 4,
        max_channels_per_connection: 1024,
    })
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
