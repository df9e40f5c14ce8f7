//! The hub's SSH endpoint as its operators ask about it (`GET /api/v1/ssh`): its host key's
//! fingerprint (what nodes pin), the sessions logged in, and the logins it refused lately (also
//! under a node in `GET /api/v1/nodes[/NAME]` and `sendense-hub nodes`,
//! `sendense_hub_ssh_logins_refused_total{reason}`).
//!
//! The commonest reason a node that was just set up stays `DOWN` is its key: the line in the hub's
//! `[[node]] key` is not the node's (pasted from another host, the node's key made again), or its
//! `expiry-time=` passed, or its `from=` does not cover the node's address. The endpoint refused
//! those logins and said so in the hub's log only; the node said "refused the key" on its side.
//! Now the hub tells each node the refusals of its own key (expired, from an address not allowed,
//! too many connections) and its key's fingerprint, and every refusal of a key it does not know,
//! with where it came from: the operator compares that fingerprint with the node's own
//! (`ssh-keygen -lf` of its key) and the address with the node's, without reading logs on two
//! machines. The other common mistake, the node pinning another host key than the hub's (its
//! `[tunnel] fingerprint`), shows as connections from its address that ended before they logged
//! in, told beside the hub's host key fingerprint. What is told is the endpoint's record
//! (`tunnel::endpoint::Endpoint::refused_logins`: the last hour, bounded).

use serde::Serialize;

use super::{Hub, NodeEntry};
use crate::error::HubError;

/// The answer of `GET /api/v1/ssh`.
#[derive(Debug, Clone, Serialize)]
pub struct SshView {
    /// The fingerprint of the hub's host key (`SHA256:...`): what a node's `[tunnel] fingerprint`
    /// must be.
    pub host_key_fingerprint: String,
    /// The sessions logged in now, by node, oldest first.
    pub sessions: Vec<SshSession>,
    /// Logins refused in the last hour, the latest first.
    pub refused_logins: Vec<RefusedLoginView>,
}

/// A session logged in at the hub's SSH endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct SshSession {
    /// The node whose key it logged in with.
    pub node: String,
    /// Where it comes from (`IP:PORT`).
    pub peer: String,
    /// When it logged in (RFC 3339).
    pub since: String,
}

/// Logins refused for one reason, with one key, from one address.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedLoginView {
    /// `unknown-key`, `key-expired`, `address-not-allowed`, `too-many-connections`, `wrong-user`,
    /// or `ended-before-login` (the connection ended before it offered a key: the client did not
    /// accept the hub's host key, or it was not an SSH client).
    pub reason: &'static str,
    /// The key's fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints it); absent when none was
    /// offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The node whose key it is (absent: a key the hub does not know).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The address the logins came from.
    pub peer: String,
    /// How many were refused since `first`.
    pub count: u64,
    /// The first of them (RFC 3339), since when they come without an hour's pause.
    pub first: String,
    /// The latest (RFC 3339).
    pub last: String,
}

impl Hub {
    /// The SSH endpoint now: its host key, sessions and the logins it refused in the last hour.
    ///
    /// # Errors
    /// The hub serves no SSH endpoint (404).
    pub fn ssh_view(&self) -> Result<SshView, HubError> {
        let none = || HubError::NotFound("the hub serves no SSH endpoint (no [ssh] in its configuration)".into());
        let source = self.tunnels.get().and_then(std::sync::Weak::upgrade).ok_or_else(none)?;
        let mut sessions: Vec<(std::time::SystemTime, SshSession)> = source
            .by_node()
            .into_iter()
            .flat_map(|(node, sessions)| {
                sessions.into_iter().map(move |s| {
                    let view = SshSession {
                        node: node.clone(),
                        peer: s.peer.to_string(),
                        since: super::nodes::rfc3339(s.since),
                    };
                    (s.since, view)
                })
            })
            .collect();
        sessions.sort_by_key(|(since, _)| *since);
        let sessions = sessions.into_iter().map(|(_, view)| view).collect();
        Ok(SshView {
            host_key_fingerprint: source.host_key_fingerprint(),
            sessions,
            refused_logins: self.refused_views().ok_or_else(none)?,
        })
    }

    /// The refusals of `node`'s key in the last hour (`None`: no SSH endpoint).
    pub(super) fn refused_logins_of(&self, node: &str) -> Option<Vec<RefusedLoginView>> {
        let all = self.refused_views()?;
        Some(all.into_iter().filter(|r| r.node.as_deref() == Some(node)).collect())
    }

    /// For the metrics: refusals since the endpoint started, per reason (`None`: no endpoint).
    pub fn ssh_refusals_total(&self) -> Option<tunnel::endpoint::RefusalTotals> {
        Some(self.tunnels.get()?.upgrade()?.refusals_total())
    }

    fn refused_views(&self) -> Option<Vec<RefusedLoginView>> {
        let source = self.tunnels.get()?.upgrade()?;
        let views = source.refused().into_iter().map(|(node, r)| RefusedLoginView {
            reason: r.reason.as_str(),
            fingerprint: r.fingerprint,
            node,
            peer: r.peer.to_string(),
            count: r.count,
            first: super::nodes::rfc3339(r.first),
            last: super::nodes::rfc3339(r.last),
        });
        Some(views.collect())
    }
}

/// The fingerprint of `node`'s `[[node]] key` (absent: it has none, or it does not parse, which
/// the configuration's load refuses).
pub(super) fn key_fingerprint((spec, _): &NodeEntry) -> Option<String> {
    let keys = tunnel::authorized::parse(spec.key.as_deref()?).ok()?;
    keys.first().map(|k| tunnel::hostkey::fingerprint(&k.key))
}
