//! The configuration taken up while the hub serves (`SIGHUP`, `systemctl reload`): an operator
//! adds a schedule, moves a nightly to 03:00 or changes the retention without a restart, which
//! would cancel every backup under way.
//!
//! What is taken up is what the hub reads as it goes ([`Live`]): the schedules, the retention
//! (`keep_*`), `verify_every_days`, `compress`, `stall_timeout_s` and `max_chain` (for jobs started afterwards),
//! `unreachable_timeout_s`
//! and `restore_idle_s`; and the nodes (`[[node]]`): one added can be backed up at once, one
//! changed (its `url`, token or `nbd_peers`) is called at its new address with its new token from
//! the next call on, its runs under way included, and one removed is no longer called. What the
//! hub built at start (its listeners, the repository and replica directories, the SSH endpoint,
//! the export options) is not: a reload that changes one of those applies the rest, names them
//! in its log line and in `sendense_hub_config_restart_pending`, and the hub keeps running with
//! what it started with. (The nodes' SSH keys are the endpoint's to take up: `endpoint.rs`.)
//!
//! A configuration that does not check (the same checks as at start) is refused whole and the
//! hub goes on with the one it has: a typo must not stop the nightly backups. So is one that
//! removes a node with a backup, replication or restore under way on it (its end needs the
//! node: remove it once they are done), or one whose new node's client cannot be built.
//!
//! Schedules are compared by name. One removed or changed has its loop stopped (a run of it
//! under way goes on to its end: its backups are not cut); a new or changed one starts from its
//! next occurrence, as a schedule new to a starting hub does. Runs of one name, before and after
//! a change, share one lock: an occurrence of the new version that comes while the old version's
//! run goes on is passed over, not run beside it.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use node::service::ReloadStatus;

use super::{node_entry, Hub, NodeEntry};
use crate::config::{restart_only_changes, Settings};
use crate::retention::Policy;
use crate::schedule::Schedule;

/// The settings the hub reads as it goes, replaced whole by a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// What is kept of each VM's backups (`keep_*`).
    pub retention: Policy,
    /// Scrub period (`verify_every_days`).
    pub verify_every: Option<Duration>,
    /// A job without progress for this long fails (`stall_timeout_s`), read when a job starts.
    pub stall_timeout: Duration,
    /// A job whose node cannot be reached for this long fails (`unreachable_timeout_s`), read
    /// while it waits.
    pub unreachable_timeout: Duration,
    /// A restore without clients for this long is closed (`restore_idle_s`).
    pub restore_idle: Duration,
    /// Completed backups rewritten compressed (`compress`).
    pub compress: bool,
    /// Images one chain holds (`max_chain`), read when a backup starts and by the background pass
    /// that makes backups past it stand alone.
    pub max_chain: usize,
    /// Backup schedules (`[[schedule]]`).
    pub schedules: Vec<Arc<Schedule>>,
}

impl Live {
    /// The live part of `settings`.
    pub fn of(settings: &Settings) -> Self {
        Self {
            retention: settings.retention,
            verify_every: settings.verify_every,
            stall_timeout: settings.stall_timeout,
            unreachable_timeout: settings.unreachable_timeout,
            restore_idle: settings.restore_idle,
            compress: settings.compress,
            max_chain: settings.max_chain,
            schedules: settings.schedules.iter().cloned().map(Arc::new).collect(),
        }
    }

    /// The hub.toml keys whose values differ from `other`'s (schedules apart).
    fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
        let keys = [
            ("keep_*", self.retention != other.retention),
            ("verify_every_days", self.verify_every != other.verify_every),
            ("stall_timeout_s", self.stall_timeout != other.stall_timeout),
            ("unreachable_timeout_s", self.unreachable_timeout != other.unreachable_timeout),
            ("restore_idle_s", self.restore_idle != other.restore_idle),
            ("compress", self.compress != other.compress),
            ("max_chain", self.max_chain != other.max_chain),
        ];
        keys.into_iter().filter(|(_, changed)| *changed).map(|(key, _)| key).collect()
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reloaded {
    /// Keys changed and now in force (schedules apart).
    pub applied: Vec<&'static str>,
    /// Schedules new to the hub.
    pub schedules_added: Vec<String>,
    /// Schedules changed (each restarted from its next occurrence).
    pub schedules_changed: Vec<String>,
    /// Schedules gone (a run under way ends first).
    pub schedules_removed: Vec<String>,
    /// Nodes new to the hub.
    pub nodes_added: Vec<String>,
    /// Nodes whose `url`, token or `nbd_peers` changed.
    pub nodes_changed: Vec<String>,
    /// Nodes gone.
    pub nodes_removed: Vec<String>,
    /// Keys changed that take a restart: not applied.
    pub restart_pending: Vec<&'static str>,
}

impl Hub {
    /// The settings in force now.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.borrow())
    }

    /// Take up `new` (the configuration file read again, checked as at start): module doc.
    ///
    /// # Errors
    /// A schedule names a node `new` does not have, a node removed has runs under way, or a
    /// node's client cannot be built; nothing is changed (the caller records the refusal with
    /// [`Hub::reload_refused`]).
    pub fn reload(self: &Arc<Self>, new: &Settings) -> Result<Reloaded, String> {
        if let Some(s) =
            new.schedules.iter().find(|s| s.node.as_ref().is_some_and(|n| !new.nodes.iter().any(|o| o.name == *n)))
        {
            let node = s.node.as_deref().unwrap_or_default();
            return Err(format!("schedule {}: node {node} is not a [[node]] of this hub", s.name));
        }
        let (nodes, mut done) = self.reloaded_nodes(new)?;
        let old = self.live();
        let fresh = Live::of(new);
        done.applied = fresh.changed_keys(&old);
        done.restart_pending = restart_only_changes(&self.settings, new);
        let mut stop = Vec::new();
        let mut start = Vec::new();
        for s in &old.schedules {
            match fresh.schedules.iter().find(|f| f.name == s.name) {
                None => {
                    done.schedules_removed.push(s.name.clone());
                    stop.push(s.name.clone());
                }
                Some(f) if f != s => {
                    done.schedules_changed.push(s.name.clone());
                    stop.push(s.name.clone());
                    start.push(Arc::clone(f));
                }
                Some(_) => {}
            }
        }
        for f in fresh.schedules.iter().filter(|f| !old.schedules.iter().any(|s| s.name == f.name)) {
            done.schedules_added.push(f.name.clone());
            start.push(Arc::clone(f));
        }
        for name in &stop {
            self.stop_schedule(name);
        }
        {
            let mut st = self.state();
            for name in &done.schedules_removed {
                // Its view goes now; a run of it under way keeps its own record to its end.
                if st.schedules.get(name).is_some_and(|x| x.is_idle()) {
                    st.schedules.remove(name);
                }
            }
            st.last_reload = ReloadStatus::taken(done.restart_pending.clone());
        }
        *self.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(nodes);
        if !(done.nodes_added.is_empty() && done.nodes_changed.is_empty() && done.nodes_removed.is_empty()) {
            // What the metrics say of the nodes follows at once, not at the next check.
            let hub = Arc::clone(self);
            tokio::spawn(async move { hub.check_nodes().await });
        }
        self.live.send_replace(Arc::new(fresh));
        for s in start {
            self.start_schedule(s, false);
        }
        Ok(done)
    }

    /// The nodes of `new`, each unchanged one with the client it has, and what changed; nothing
    /// is applied yet.
    ///
    /// # Errors
    /// A node removed has runs under way on it, or a node's client cannot be built.
    fn reloaded_nodes(&self, new: &Settings) -> Result<(Vec<NodeEntry>, Reloaded), String> {
        let old = self.nodes();
        let mut done = Reloaded::default();
        for (gone, _) in old.iter().filter(|(o, _)| !new.nodes.iter().any(|n| n.name == o.name)) {
            if let Some(what) = self.under_way_on(&gone.name) {
                return Err(format!("node {} has {what} under way: remove it once that has ended", gone.name));
            }
            done.nodes_removed.push(gone.name.clone());
        }
        let mut nodes = Vec::with_capacity(new.nodes.len());
        for spec in &new.nodes {
            let kept = old.iter().find(|(o, _)| o.name == spec.name);
            match kept {
                // The key is the SSH endpoint's: the client stays.
                Some((o, client)) if same_but_key(o, spec) => nodes.push((spec.clone(), client.clone())),
                _ => {
                    // Built with the TLS setting the hub started with (`api_tls` takes a restart).
                    nodes.push(node_entry(spec, &self.settings)?);
                    match kept {
                        Some(_) => done.nodes_changed.push(spec.name.clone()),
                        None => done.nodes_added.push(spec.name.clone()),
                    }
                }
            }
        }
        Ok((nodes, done))
    }

    /// What runs on `node` now, if anything: a backup or replication, or a restore the hub
    /// drives onto it.
    fn under_way_on(&self, node: &str) -> Option<String> {
        let st = self.state();
        if let Some(job) = st.jobs.values().find(|j| j.node == node && !j.status().is_final()) {
            return Some(format!("{} {} of VM {}", super::view::kind_name(job.kind), job.id, job.vm));
        }
        st.driven.iter().find(|(_, n)| *n == node).map(|(id, _)| format!("restore {id}"))
    }

    /// Record a reload that was refused (the file did not check): the configuration in force
    /// stays as it was.
    pub fn reload_refused(&self) {
        self.state().last_reload.ok = false;
    }

    /// The last reload, for the metrics.
    pub fn reload_status(&self) -> ReloadStatus {
        self.state().last_reload.clone()
    }
}

/// Whether two `[[node]]`s differ at most in their SSH key.
fn same_but_key(a: &crate::config::NodeSpec, b: &crate::config::NodeSpec) -> bool {
    let without_key = |n: &crate::config::NodeSpec| crate::config::NodeSpec { key: None, ..n.clone() };
    without_key(a) == without_key(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleFile;

    fn schedule(name: &str, at: &str) -> Schedule {
        let file: ScheduleFile =
            toml::from_str(&format!("name = \"{name}\"\nvms = [\"vm1\"]\nat = [\"{at}\"]\n")).unwrap();
        Schedule::parse(file).unwrap()
    }

    #[tokio::test]
    async fn a_reload_applies_what_the_hub_reads_as_it_goes_and_names_what_waits_for_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let hub = super::super::tests::hub_in(dir.path(), (41000, 41001));
        let mut new = hub.settings.clone();
        new.retention.last = Some(3);
        new.schedules = vec![schedule("nightly", "02:00"), schedule("noon", "12:00")];
        let done = hub.reload(&new).unwrap();
        assert_eq!(done.applied, ["keep_*"]);
        assert_eq!(done.schedules_added, ["nightly", "noon"]);
        assert!(done.restart_pending.is_empty());
        assert_eq!(hub.live().retention.last, Some(3));
        let names: Vec<String> = hub.schedules().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["nightly", "noon"]);
        // Its loop runs: the next occurrence is known.
        for _ in 0..200 {
            if hub.schedule_view("nightly").unwrap().next_run.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(hub.schedule_view("nightly").unwrap().next_run.is_some());

        // One moved, one gone, a port range changed: the range waits for a restart.
        new.schedules = vec![schedule("nightly", "03:00")];
        new.nbd_ports = (42000, 42001);
        new.stall_timeout = Duration::from_secs(30);
        new.max_chain = 7;
        let done = hub.reload(&new).unwrap();
        assert_eq!(done.applied, ["stall_timeout_s", "max_chain"]);
        assert_eq!(
            (done.schedules_changed, done.schedules_removed),
            (vec!["nightly".to_string()], vec!["noon".into()])
        );
        assert_eq!(done.restart_pending, ["nbd_ports"]);
        assert_eq!(hub.schedule_view("nightly").unwrap().when, "at 03:00");
        assert!(hub.schedule_view("noon").is_none());
        assert_eq!(hub.reload_status().restart_pending, ["nbd_ports"]);
        assert_eq!((hub.live().stall_timeout, hub.live().max_chain), (Duration::from_secs(30), 7));

        // The same file again: nothing to do.
        let again = hub.reload(&new).unwrap();
        assert_eq!((again.applied.len(), again.schedules_changed.len()), (0, 0));

        // A schedule for a node the hub does not have: refused whole.
        let mut bad = new.clone();
        bad.retention.last = Some(9);
        let mut s = schedule("elsewhere", "04:00");
        s.node = Some("n9".into());
        bad.schedules.push(s);
        let e = hub.reload(&bad).unwrap_err();
        assert!(e.contains("schedule elsewhere: node n9 is not a [[node]] of this hub"), "{e}");
        assert_eq!(hub.live().retention.last, Some(3));
        assert!(hub.schedule_view("elsewhere").is_none());
        hub.reload_refused();
        assert!(!hub.reload_status().ok);
        hub.reload(&new).unwrap();
        assert!(hub.reload_status().ok);
        hub.shutdown().await;
    }

    fn node(name: &str, url: &str) -> crate::config::NodeSpec {
        crate::config::NodeSpec { name: name.into(), url: url.into(), token: None, key: None, nbd_peers: vec![] }
    }

    #[tokio::test]
    async fn a_reload_adds_changes_and_removes_nodes_and_leaves_alone_what_only_changed_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let hub = super::super::tests::hub_in(dir.path(), (41100, 41101));
        let mut new = hub.settings.clone();
        new.nodes = vec![node("n1", "http://127.0.0.1:9081"), node("n2", "http://127.0.0.1:9082")];
        let done = hub.reload(&new).unwrap();
        assert_eq!(done.nodes_added, ["n1", "n2"]);
        assert!(done.restart_pending.is_empty(), "{:?}", done.restart_pending);
        assert_eq!(hub.node("n2").unwrap().0.url, "http://127.0.0.1:9082");

        // n1 moved and given a token, n2's key changed only (the SSH endpoint's), n3 new.
        new.nodes = vec![
            crate::config::NodeSpec { token: Some("t".into()), ..node("n1", "http://127.0.0.1:9091") },
            crate::config::NodeSpec { key: Some("ssh-ed25519 AAAA".into()), ..node("n2", "http://127.0.0.1:9082") },
            node("n3", "http://127.0.0.1:9083"),
        ];
        let done = hub.reload(&new).unwrap();
        assert_eq!((done.nodes_added, done.nodes_changed), (vec!["n3".to_string()], vec!["n1".to_string()]));
        let n1 = hub.node("n1").unwrap().0;
        assert_eq!((n1.url.as_str(), n1.token.as_deref()), ("http://127.0.0.1:9091", Some("t")));
        assert!(hub.node("n2").unwrap().0.key.is_some(), "the new table is kept, key and all");

        // A schedule of a node the file does not have is refused whole.
        let mut bad = new.clone();
        bad.nodes.truncate(1);
        let mut s = schedule("n3s", "04:00");
        s.node = Some("n3".into());
        bad.schedules.push(s);
        let e = hub.reload(&bad).unwrap_err();
        assert!(e.contains("schedule n3s: node n3 is not a [[node]]"), "{e}");
        assert!(hub.node("n3").is_some(), "nothing changed");

        // Two gone (nothing runs on them).
        new.nodes.truncate(1);
        let done = hub.reload(&new).unwrap();
        assert_eq!(done.nodes_removed, ["n2", "n3"]);
        assert!(hub.node("n2").is_none() && hub.node("n3").is_none());
        hub.shutdown().await;
    }
}
