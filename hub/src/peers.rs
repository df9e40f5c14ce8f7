//! Who may reach an export over TCP: this machine, and the node the export is for.
//!
//! In direct mode the hub's exports listen on a LAN address, and NBD has no authentication of
//! its own: without this, anyone on the LAN who guessed a port and the export name (`VM-diskN`,
//! fixed by the contract) could write into a backup in flight or read a restore. Each node's
//! addresses are its `[[node]] nbd_peers`, or else the address its `url` names (resolved once, at
//! start). A backup or replica export admits its own node's; a restore, which any node may read
//! back, every node's. Loopback is always admitted: OpenSSH's sshd (in the endpoint's place)
//! forwards from it, and an operator on the hub reads a restore with `nbdcopy`. Tunnel channels
//! are served in process and fenced by the endpoint, so this applies to TCP clients only.
//!
//! A refused client is answered, not cut: every export it asks for gets `NBD_REP_ERR_POLICY`
//! naming its address and the setting that admits it, so a node whose traffic leaves from
//! another address fails at once with the fix in its job's error instead of retrying.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// The addresses an export admits besides loopback, and whose they are (for the refusal).
#[derive(Debug, Clone)]
pub struct Peers {
    who: String,
    addresses: Arc<[IpAddr]>,
}

impl Peers {
    /// `addresses`, belonging to `who` ("node n1").
    pub fn new(who: impl Into<String>, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        let addresses: Vec<IpAddr> = addresses.into_iter().map(|a| a.to_canonical()).collect();
        Self { who: who.into(), addresses: addresses.into() }
    }

    /// Whether `peer` may use `export`. The refusal, which goes to the client, names its
    /// address and the setting that admits it, not the addresses that are admitted (the hub's
    /// log has those).
    ///
    /// # Errors
    /// `peer` is neither this machine nor one of the addresses.
    pub fn admit(&self, peer: SocketAddr, export: &str) -> Result<(), String> {
        let ip = peer.ip().to_canonical();
        if ip.is_loopback() || self.addresses.contains(&ip) {
            return Ok(());
        }
        let known: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
        tracing::warn!(export, %ip, admitted = %known.join(", "), who = %self.who, "NBD client from an address the export does not admit");
        Err(format!(
            "export '{export}' does not take NBD clients from {ip}: if {} connects from that address, add it \
             to its nbd_peers in the hub's config",
            self.who
        ))
    }
}

/// A node's addresses: `given` (`nbd_peers`) if any, else the host of its API `url`, resolved.
///
/// # Errors
/// An address that does not parse, or a host that does not resolve.
pub fn node_addresses(node: &str, url: &str, given: Option<&[String]>) -> Result<Vec<IpAddr>, String> {
    if let Some(given) = given {
        return given
            .iter()
            .map(|a| a.parse().map_err(|_| format!("node {node}: nbd_peers entry '{a}' is not an IP address")))
            .collect();
    }
    let host = url_host(url).ok_or_else(|| format!("node {node}: url '{url}' names no host"))?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let resolved: Vec<IpAddr> = (host, 0)
        .to_socket_addrs()
        .map_err(|e| format!("node {node}: cannot resolve '{host}' of its url ({e}): give its nbd_peers"))?
        .map(|a| a.ip())
        .collect();
    Ok(resolved)
}

/// The host of `http://HOST[:PORT]/...` (brackets of an IPv6 literal removed).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn loopback_and_the_nodes_addresses_are_admitted_and_a_refusal_names_the_fix() {
        let p = Peers::new("node n1", ["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()]);
        for ok in ["127.0.0.1", "127.1.2.3", "::1", "10.0.0.5", "::ffff:10.0.0.5", "fd00::5"] {
            p.admit(at(ok), "vm-disk0").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let e = p.admit(at("10.0.0.9"), "vm-disk0").unwrap_err();
        assert!(e.contains("from 10.0.0.9") && e.contains("if node n1 connects") && e.contains("nbd_peers"), "{e}");
        assert!(!e.contains("10.0.0.5"), "the refusal does not tell a stranger which address would be let in: {e}");
        assert!(Peers::new("no node", []).admit(at("192.168.1.1"), "x").is_err());
    }

    #[test]
    fn a_nodes_addresses_come_from_nbd_peers_or_its_urls_host() {
        assert_eq!(
            node_addresses("n", "http://10.0.0.5:8081", None).unwrap(),
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            node_addresses("n", "http://[fd00::5]:8081/x", None).unwrap(),
            vec!["fd00::5".parse::<IpAddr>().unwrap()]
        );
        assert!(node_addresses("n", "http://localhost:9081", None).unwrap().iter().all(IpAddr::is_loopback));
        let given = ["10.0.0.7".to_string(), "10.0.0.8".to_string()];
        assert_eq!(node_addresses("n", "http://127.0.0.1:9081", Some(&given)).unwrap().len(), 2);
        assert!(node_addresses("n", "http://x", Some(&["nope".to_string()])).unwrap_err().contains("'nope'"));
        assert!(node_addresses("n", "http://no-such-host.invalid:1", None).unwrap_err().contains("nbd_peers"));
        assert_eq!(url_host("http://u:p@h.example:1/path"), Some("h.example"));
        assert_eq!(url_host("http://"), None);
    }
}
