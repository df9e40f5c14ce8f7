//! The hub's view of its nodes (`GET /api/v1/nodes[/{name}]`, `sendense-hub nodes`,
//! `sendense_hub_node_up`): whether each answers, its VMs, and what runs on it now.
//!
//! Without it an operator learned that a node was out of reach (its tunnel refused, its token
//! wrong, its host down) from the nightly backup that failed; now a background check asks every
//! node for its VMs every [`CHECK_EVERY`] (the call a backup starts with, so a node that answers
//! it can be backed up: reached, token accepted), logs each node that goes out of reach or comes
//! back, and keeps the outcome for the metrics, where an alert on `sendense_hub_node_up == 0`
//! fires before the next backup would fail. The API and the CLI check afresh (every node at
//! once, each given [`ANSWER_WITHIN`]), so what they say is never older than the call.
//!
//! A hub that serves the SSH endpoint also tells each node's tunnel sessions as the endpoint sees
//! them (from where, since when: [`TunnelSessions`]), so that a node out of reach says which
//! side to look at: no session (the node's tunnel does not connect: its host, its key, the
//! network) or a session up (the node's service behind it does not answer); and the logins of
//! its key the endpoint refused (`super::ssh_view`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use node::api::{NodeClient, TunnelView, VmInfo};
use serde::Serialize;

use super::{Hub, NodeEntry};
use crate::error::HubError;

/// How often the background check asks every node.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// How long a node may take to answer a check (a node that takes longer is out of reach for
/// the check, not for the jobs, whose calls have their own timeouts).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What the last check of a node found.
#[derive(Debug, Clone)]
pub(super) struct Health {
    /// Whether it answered.
    up: bool,
    /// When it was checked.
    checked_at: SystemTime,
    /// When it last answered.
    last_seen: Option<SystemTime>,
    /// Why it did not answer.
    error: Option<String>,
    /// Its VMs as of `last_seen`.
    vms: Vec<VmInfo>,
}

/// What tells the nodes' tunnel sessions and the logins refused: the hub's SSH endpoint, when it
/// serves one (`crate::endpoint`), attached with [`Hub::attach_tunnels`].
pub trait TunnelSessions: Send + Sync {
    /// Node name -> its sessions logged in now, oldest first.
    fn by_node(&self) -> HashMap<String, Vec<tunnel::endpoint::SessionInfo>>;
    /// The logins refused in the last hour, the latest first, each with the node whose key it
    /// was (`None`: a key the hub does not know).
    fn refused(&self) -> Vec<(Option<String>, tunnel::endpoint::RefusedLogin)>;
    /// Logins refused since the endpoint started, per reason.
    fn refusals_total(&self) -> tunnel::endpoint::RefusalTotals;
    /// The fingerprint of the endpoint's host key.
    fn host_key_fingerprint(&self) -> String;
}

/// A tunnel session of a node at the hub's SSH endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelSession {
    /// Where it comes from (`IP:PORT`).
    pub peer: String,
    /// When it logged in (RFC 3339).
    pub since: String,
}

/// A node as the hub sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Its name (`[[node]] name`).
    pub name: String,
    /// Where the hub calls it.
    pub url: String,
    /// Whether it answered the check this view comes from.
    pub reachable: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was checked (RFC 3339).
    pub checked_at: String,
    /// When it last answered (RFC 3339); none since the hub started: absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Its VMs, as of `last_seen`.
    pub vms: Vec<VmInfo>,
    /// What runs on it now: `backup ID of VM web`, `restore ID`.
    pub running: Vec<String>,
    /// Its tunnel as it reports it (one node's view, when it answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelView>,
    /// Its tunnel sessions at the hub's SSH endpoint now, oldest first (absent: the hub serves
    /// no SSH endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_sessions: Option<Vec<TunnelSession>>,
    /// The fingerprint of its `key` (`SHA256:...`, as `ssh-keygen -lf` prints it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// Logins of its key the hub's SSH endpoint refused in the last hour, the latest first
    /// (absent: the hub serves no SSH endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_logins: Option<Vec<super::ssh_view::RefusedLoginView>>,
}

/// Ask `client` for its VMs, giving it [`ANSWER_WITHIN`].
async fn ask(client: &NodeClient) -> Result<Vec<VmInfo>, String> {
    match tokio::time::timeout(ANSWER_WITHIN, client.vms()).await {
        Ok(Ok(vms)) => Ok(vms),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())),
    }
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map(crate::repo::rfc3339_millis).unwrap_or_default()
}

impl Hub {
    /// Check every node now (all at once) and keep what was found; a node that went out of reach
    /// or came back is logged.
    pub async fn check_nodes(&self) {
        let nodes = self.nodes();
        let answers = futures_util::future::join_all(nodes.iter().map(|(_, client)| ask(client))).await;
        for ((spec, _), answer) in nodes.iter().zip(answers) {
            self.record_check(&spec.name, answer);
        }
        // Nodes a reload removed are forgotten.
        self.state().node_health.retain(|name, _| nodes.iter().any(|(n, _)| n.name == *name));
    }

    fn record_check(&self, name: &str, answer: Result<Vec<VmInfo>, String>) {
        let now = SystemTime::now();
        let mut st = self.state();
        let before = st.node_health.get(name).cloned();
        let was_up = before.as_ref().map(|h| h.up);
        let health = match answer {
            Ok(vms) => Health { up: true, checked_at: now, last_seen: Some(now), error: None, vms },
            Err(error) => Health {
                up: false,
                checked_at: now,
                last_seen: before.as_ref().and_then(|h| h.last_seen),
                error: Some(error),
                vms: before.map(|h| h.vms).unwrap_or_default(),
            },
        };
        match (was_up, health.up) {
            (Some(true), false) => {
                tracing::warn!(node = name, error = health.error.as_deref().unwrap_or(""), "node out of reach")
            }
            // At start a tunnelled node may not have connected yet: said once, not as a loss.
            (None, false) => {
                tracing::info!(node = name, error = health.error.as_deref().unwrap_or(""), "node not reachable yet")
            }
            (Some(false), true) => tracing::info!(node = name, "node reachable again"),
            _ => {}
        }
        st.node_health.insert(name.to_string(), health);
    }

    /// Check the nodes every [`CHECK_EVERY`] until the hub stops.
    pub async fn watch_nodes(self: std::sync::Arc<Self>) {
        loop {
            self.check_nodes().await;
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Every node, checked now.
    pub async fn node_views(&self) -> Vec<NodeView> {
        self.check_nodes().await;
        let mut sessions = self.tunnel_sessions();
        self.nodes().iter().map(|entry| self.view_of(entry, None, &mut sessions)).collect()
    }

    /// Tell the nodes' tunnel sessions from `source` (the hub's SSH endpoint) from now on. Held
    /// weakly: the endpoint holds the hub.
    pub fn attach_tunnels(&self, source: std::sync::Weak<dyn TunnelSessions>) {
        if self.tunnels.set(source).is_err() {
            tracing::warn!("a second SSH endpoint attached: the first one's sessions are told");
        }
    }

    /// Node name -> its tunnel sessions now; `None`: the hub serves no SSH endpoint.
    fn tunnel_sessions(&self) -> Option<HashMap<String, Vec<TunnelSession>>> {
        let source = self.tunnels.get()?.upgrade()?;
        let told = source.by_node().into_iter().map(|(node, sessions)| {
            let views =
                sessions.iter().map(|s| TunnelSession { peer: s.peer.to_string(), since: rfc3339(s.since) }).collect();
            (node, views)
        });
        Some(told.collect())
    }

    /// For the metrics: each node with its tunnel sessions now; `None`: no SSH endpoint.
    pub fn node_tunnel_sessions(&self) -> Option<Vec<(String, usize)>> {
        let sessions = self.tunnel_sessions()?;
        let nodes = self.nodes();
        Some(nodes.iter().map(|(spec, _)| (spec.name.clone(), sessions.get(&spec.name).map_or(0, Vec::len))).collect())
    }

    /// One node, checked now, with its tunnel as it reports it.
    ///
    /// # Errors
    /// No node has that name (404).
    pub async fn node_view(&self, name: &str) -> Result<NodeView, HubError> {
        let entry = self.node(name).ok_or_else(|| HubError::NotFound(format!("unknown node {name}")))?;
        let answer = ask(&entry.1).await;
        let tunnel = match answer.is_ok() {
            true => tokio::time::timeout(ANSWER_WITHIN, entry.1.tunnel()).await.ok().and_then(Result::ok),
            false => None,
        };
        self.record_check(name, answer);
        Ok(self.view_of(&entry, tunnel, &mut self.tunnel_sessions()))
    }

    /// `spec`'s view, its tunnel sessions taken out of `sessions`.
    fn view_of(
        &self,
        entry @ (spec, _): &NodeEntry,
        tunnel: Option<TunnelView>,
        sessions: &mut Option<HashMap<String, Vec<TunnelSession>>>,
    ) -> NodeView {
        let tunnel_sessions = sessions.as_mut().map(|s| s.remove(&spec.name).unwrap_or_default());
        // Asked of the endpoint before the state is locked (its locks are never taken under it).
        let refused_logins = self.refused_logins_of(&spec.name);
        let st = self.state();
        let health = st.node_health.get(&spec.name);
        let mut running: Vec<String> = st
            .jobs
            .values()
            .filter(|j| j.node == spec.name && !j.status().is_final())
            .map(|j| format!("{} {} of VM {}", super::view::kind_name(j.kind), j.id, j.vm))
            .collect();
        running.sort();
        running.extend(st.driven.iter().filter(|(_, n)| **n == spec.name).map(|(id, _)| format!("restore {id}")));
        NodeView {
            name: spec.name.clone(),
            url: spec.url.clone(),
            reachable: health.is_some_and(|h| h.up),
            error: health.and_then(|h| h.error.clone()),
            checked_at: health.map(|h| rfc3339(h.checked_at)).unwrap_or_default(),
            last_seen: health.and_then(|h| h.last_seen).map(rfc3339),
            vms: health.map(|h| h.vms.clone()).unwrap_or_default(),
            running,
            tunnel,
            tunnel_sessions,
            key_fingerprint: super::ssh_view::key_fingerprint(entry),
            refused_logins,
        }
    }

    /// The VMs each node listed at its last answer, as (node, VM, whether that answer was its
    /// last check's).
    pub(super) fn listed_vms(&self) -> Vec<(String, VmInfo, bool)> {
        let st = self.state();
        let mut out: Vec<(String, VmInfo, bool)> = st
            .node_health
            .iter()
            .flat_map(|(node, h)| h.vms.iter().map(move |vm| (node.clone(), vm.clone(), h.up)))
            .collect();
        out.sort_by(|a, b| (&a.1.name, &a.0).cmp(&(&b.1.name, &b.0)));
        out
    }

    /// For the metrics: each node checked so far, whether it answered the last check and when
    /// it last answered (Unix seconds).
    pub fn node_health(&self) -> Vec<(String, bool, Option<f64>)> {
        let st = self.state();
        let mut out: Vec<(String, bool, Option<f64>)> = st
            .node_health
            .iter()
            .map(|(name, h)| {
                let seen = h.last_seen.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
                (name.clone(), h.up, seen.map(|d| d.as_secs_f64()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Node name -> what its last check found (in the hub's state).
pub(super) type NodeHealth = HashMap<String, Health>;
