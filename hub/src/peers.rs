//! Who may reach an export over TCP: the node the export is for, and on this machine only the
//! local users that have a reason to.
//!
//! In direct mode the hub's exports listen on a LAN address, and NBD has no authentication of
//! its own: without this, anyone on the LAN who guessed a port and the export name (`VM-diskN`,
//! fixed by the contract) could write into a backup in flight or read a restore. Each node's
//! addresses are its `[[node]] nbd_peers`, or else the address its `url` names (resolved once, at
//! start). A backup or replica export admits its own node's; a restore, which any node may read
//! back, every node's. Tunnel channels are served in process and fenced by the endpoint, so this
//! applies to TCP clients only.
//!
//! A client over loopback is known by the account it runs as (`sockowner.rs`): root, the hub's
//! own user, and the `nbd_local_users` of the config (the login user of OpenSSH's sshd when it
//! forwards for the nodes in the endpoint's place) are admitted; any other account on the hub is
//! not, so a restore left open cannot be read, nor a backup in flight written, by every local
//! user. (One that connects to the hub's LAN address instead comes from that address, which is
//! admitted only if a node's `nbd_peers` names it.)
//!
//! A refused client is answered, not cut: every export it asks for gets `NBD_REP_ERR_POLICY`
//! naming its address (or account) and the setting that admits it, so a node whose traffic leaves
//! from another address fails at once with the fix in its job's error instead of retrying.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// The addresses an export admits, whose they are (for the refusal), and the local accounts it
/// admits.
#[derive(Debug, Clone)]
pub struct Peers {
    who: String,
    addresses: Arc<[IpAddr]>,
    local_users: LocalUsers,
}

/// The accounts on this machine whose TCP clients exports admit: root, the hub's own user, and
/// those the config names.
#[derive(Debug, Clone)]
pub struct LocalUsers(Arc<[u32]>);

impl LocalUsers {
    /// Root, this process's user, and `extra`.
    pub fn with(extra: &[u32]) -> Self {
        let me = rustix::process::geteuid().as_raw();
        let mut uids = vec![0, me];
        uids.extend_from_slice(extra);
        uids.sort_unstable();
        uids.dedup();
        Self(uids.into())
    }

    fn admits(&self, uid: u32) -> bool {
        self.0.contains(&uid)
    }
}

impl Peers {
    /// `addresses`, belonging to `who` ("node n1"), and clients on this machine of `local_users`.
    pub fn new(who: impl Into<String>, addresses: impl IntoIterator<Item = IpAddr>, local_users: LocalUsers) -> Self {
        let addresses: Vec<IpAddr> = addresses.into_iter().map(|a| a.to_canonical()).collect();
        Self { who: who.into(), addresses: addresses.into(), local_users }
    }

    /// Whether `peer`, connected to this machine's `port`, may use `export`. The refusal, which
    /// goes to the client, names its address (or its account) and the setting that admits it,
    /// not what is admitted (the hub's log has that).
    ///
    /// # Errors
    /// `peer` is an account on this machine that is not admitted, or a machine that is not one
    /// of the addresses.
    pub fn admit(&self, peer: SocketAddr, port: u16, export: &str) -> Result<(), String> {
        let ip = peer.ip().to_canonical();
        if ip.is_loopback() {
            let Some(uid) = crate::sockowner::local_client_uid(peer, port) else {
                tracing::warn!(export, %peer, "no entry in /proc/net/tcp for a loopback NBD client: refused");
                return Err(format!(
                    "export '{export}': the local user behind {peer} cannot be told (the hub reads it from \
                     /proc/net/tcp), so it is refused"
                ));
            };
            if self.local_users.admits(uid) {
                return Ok(());
            }
            let user = user_name(uid).unwrap_or_else(|| format!("uid {uid}"));
            tracing::warn!(export, %peer, uid, %user, "NBD client of a local user the exports do not admit");
            return Err(format!(
                "export '{export}' does not take NBD clients from local user {user}: if that user forwards the \
                 nodes' connections (OpenSSH's sshd), add it to nbd_local_users in the hub's config"
            ));
        }
        if self.addresses.contains(&ip) {
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

/// The uids of `names` (user names, looked up in `/etc/passwd`, or numeric uids).
///
/// # Errors
/// A name `/etc/passwd` does not have (give its uid then).
pub fn local_user_ids(names: &[String]) -> Result<Vec<u32>, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    names
        .iter()
        .map(|n| {
            n.parse::<u32>()
                .ok()
                .or_else(|| passwd_entries(&passwd).find(|(name, _)| name == n).map(|(_, uid)| uid))
                .ok_or_else(|| format!("nbd_local_users: no user '{n}' in /etc/passwd (give its numeric uid)"))
        })
        .collect()
}

/// The name of `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let name = passwd_entries(&passwd).find(|(_, u)| *u == uid).map(|(name, _)| name.to_string());
    name
}

/// (name, uid) of each well-formed `/etc/passwd` line.
fn passwd_entries(passwd: &str) -> impl Iterator<Item = (&str, u32)> {
    passwd.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid = fields.nth(1)?.parse().ok()?;
        Some((name, uid))
    })
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
    fn the_nodes_addresses_are_admitted_and_a_refusal_names_the_fix() {
        let users = LocalUsers::with(&[]);
        let p = Peers::new("node n1", ["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()], users.clone());
        for ok in ["10.0.0.5", "::ffff:10.0.0.5", "fd00::5"] {
            p.admit(at(ok), 10100, "vm-disk0").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let e = p.admit(at("10.0.0.9"), 10100, "vm-disk0").unwrap_err();
        assert!(e.contains("from 10.0.0.9") && e.contains("if node n1 connects") && e.contains("nbd_peers"), "{e}");
        assert!(!e.contains("10.0.0.5"), "the refusal does not tell a stranger which address would be let in: {e}");
        assert!(Peers::new("no node", [], users.clone()).admit(at("192.168.1.1"), 10100, "x").is_err());
        // A loopback address with no client socket behind it (gone already) is nobody known.
        let e = p.admit(at("127.0.0.1"), 1, "vm-disk0").unwrap_err();
        assert!(e.contains("cannot be told"), "{e}");
    }

    #[test]
    fn a_client_on_this_machine_is_admitted_by_its_account() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_served, peer) = listener.accept().unwrap();
        let p = Peers::new("node n1", [], LocalUsers::with(&[]));
        p.admit(peer, port, "vm-disk0").unwrap();
        // The same client, were its account not admitted: a LocalUsers without it.
        let me = rustix::process::geteuid().as_raw();
        let strict = Peers::new("node n1", [], LocalUsers(Arc::from(vec![u32::MAX - 1])));
        let e = strict.admit(peer, port, "vm-disk0").unwrap_err();
        let user = user_name(me).unwrap_or_else(|| format!("uid {me}"));
        assert!(e.contains(&format!("local user {user}:")) && e.contains("nbd_local_users"), "{e}");
    }

    #[test]
    fn local_users_are_named_or_numbered() {
        assert_eq!(local_user_ids(&["root".into(), "4242".into()]).unwrap(), vec![0, 4242]);
        assert!(local_user_ids(&["no-such-user-here".into()]).unwrap_err().contains("numeric uid"));
        let p = "root:x:0:0:root:/root:/bin/bash\nbroken\nsshd:x:101:65534::/run/sshd:/usr/sbin/nologin\n";
        assert_eq!(passwd_entries(p).collect::<Vec<_>>(), vec![("root", 0), ("sshd", 101)]);
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
