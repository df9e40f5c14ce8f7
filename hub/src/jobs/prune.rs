//! Retention applied to a VM's backups: those a policy does not keep ([`crate::retention`]) are
//! deleted oldest first, each merged into the incremental on top of it ([`Hub::delete_merging`]),
//! so every kept backup reads as before and the chain stays whole.
//!
//! Whose rules a backup is under is decided per backup, so that two retentions never fight over
//! one VM: a `[[schedule]]` with `keep_*` of its own keeps the backups it made (its name is in
//! their manifests) and prunes nothing else; the hub's rules (a request's, else the config's) keep
//! all the others. So the databases' nightly schedule keeping 30 days and an hourly one keeping a
//! day, or an operator's backup taken before an upgrade, do not remove each other's backups. A
//! backup is under its schedule's rules while the hub has that schedule with rules of its own (as
//! a reload leaves it): a schedule removed, or its `keep_*` taken out, hands its backups to the
//! hub's rules. A prune lists every backup of the VM, those under the other rules as kept by
//! `other-retention`, and counts only its own in its rules' periods.
//!
//! It runs after each completed backup (its schedule's rules, else the request's, else the
//! config's) and on demand:
//! `POST /api/v1/prune` applies a policy now, or only says what it would do (`dry_run`), so an
//! operator can try a new policy before it deletes anything. The verdicts are taken once, from
//! the catalog at that moment: a backup completed meanwhile only adds a newer point in time, which
//! never makes an older one worth keeping. A backup that cannot go now (a restore open on it, a
//! merge of the VM waiting for a retry, no space for the merge) is reported and left; the others
//! are still tried, and the next run tries it again.

use std::collections::HashSet;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;

use super::{valid_name, Hub, Job};
use crate::error::HubError;
use crate::repo::Manifest;
use crate::retention::{Point, Policy, Rule};

/// What a prune did (or, in a dry run, would do) with one backup.
#[derive(Debug, Clone, Serialize)]
pub struct PruneEntry {
    /// The backup.
    pub backup_id: String,
    /// When it was made.
    pub created_at: String,
    /// `keep` or `remove`.
    pub action: &'static str,
    /// The `[[schedule]]` whose run made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The rule that keeps it (`keep-last`, `keep-daily`, ..., `other-retention`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_by: Option<Rule>,
    /// Why it could not be removed now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `POST /api/v1/prune`.
#[derive(Debug, Clone, Serialize)]
pub struct PruneView {
    /// The VM.
    pub vm_name: String,
    /// The node whose backups of it these are.
    pub node: String,
    /// Nothing was deleted: the verdicts only.
    pub dry_run: bool,
    /// The schedule whose backups the rules were applied to (absent: the backups under the hub's
    /// rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The rules applied.
    pub policy: Policy,
    /// Backups removed (none in a dry run).
    pub removed: usize,
    /// Backups to remove that could not be (each with its `error`).
    pub failed: usize,
    /// Every backup of the VM from that node, newest first.
    pub backups: Vec<PruneEntry>,
}

/// The answer of `POST /api/v1/prune` without `vm_name`: every VM's backups (per node) pruned.
#[derive(Debug, Clone, Serialize)]
pub struct PruneAllView {
    /// Nothing was deleted: the verdicts only.
    pub dry_run: bool,
    /// As in [`PruneView::schedule`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The rules applied.
    pub policy: Policy,
    /// Backups removed, over every VM (none in a dry run).
    pub removed: usize,
    /// Backups to remove that could not be, over every VM.
    pub failed: usize,
    /// Each VM (and node) with backups, by name.
    pub vms: Vec<PruneView>,
}

impl Hub {
    /// Apply `policy` to the backups of every VM under the rules `schedule` names (none: the
    /// hub's; empty `policy`: that schedule's own, or the config's), each node's apart, one VM
    /// after another (`POST /api/v1/prune` without `vm_name`: a policy changed in the config
    /// applied now rather than after each VM's next backup), or with `dry_run` only say what it
    /// would remove.
    ///
    /// # Errors
    /// A rule of 0, or no rules here nor in the config (400); an unknown schedule (404) or one
    /// without `keep_*` of its own (400).
    pub async fn prune_all(
        &self,
        schedule: Option<&str>,
        policy: Policy,
        dry_run: bool,
    ) -> Result<PruneAllView, HubError> {
        let (scope, policy) = self.scope_and_policy(schedule, policy)?;
        let vms: Vec<(String, String)> = {
            let owned = self.schedules_with_rules();
            let st = self.state();
            let set: std::collections::BTreeSet<(String, String)> = st
                .catalog
                .values()
                .filter(|m| scope_of(m, &owned) == scope.as_deref())
                .map(|m| (m.vm_name.clone(), m.node.clone()))
                .collect();
            set.into_iter().collect()
        };
        let mut views = Vec::new();
        for (vm, node) in vms {
            views.push(self.apply(&vm, &node, scope.as_deref(), &policy, dry_run).await);
        }
        Ok(PruneAllView {
            dry_run,
            schedule: scope,
            policy,
            removed: views.iter().map(|v| v.removed).sum(),
            failed: views.iter().map(|v| v.failed).sum(),
            vms: views,
        })
    }

    /// The backups a prune is about and the rules it applies: those schedule `name` made, under
    /// the rules given or else its own; without a schedule, those under the hub's rules, under
    /// the rules given or else the config's.
    fn scope_and_policy(&self, schedule: Option<&str>, policy: Policy) -> Result<(Option<String>, Policy), HubError> {
        policy.validate("keep").map_err(HubError::BadRequest)?;
        let Some(name) = schedule else { return Ok((None, self.policy_or_config(policy)?)) };
        let live = self.live();
        let Some(s) = live.schedules.iter().find(|s| s.name == name) else {
            return Err(HubError::NotFound(format!("no schedule {name}")));
        };
        if s.retention.is_empty() {
            return Err(HubError::BadRequest(format!(
                "schedule {name} has no keep_* of its own: its backups are under the hub's retention (prune without a schedule)"
            )));
        }
        Ok((Some(s.name.clone()), if policy.is_empty() { s.retention } else { policy }))
    }

    /// The rules asked for, checked, or the config's when none were.
    fn policy_or_config(&self, policy: Policy) -> Result<Policy, HubError> {
        policy.validate("keep").map_err(HubError::BadRequest)?;
        let policy = if policy.is_empty() { self.live().retention } else { policy };
        if policy.is_empty() {
            return Err(HubError::BadRequest(
                "no retention rules: give keep, keep_hourly, keep_daily, keep_weekly, keep_monthly or keep_yearly \
                 (or set keep_backups, keep_daily, ... in the hub's config)"
                    .into(),
            ));
        }
        Ok(policy)
    }

    /// The schedules the hub has now with `keep_*` of their own: each keeps the backups it made.
    fn schedules_with_rules(&self) -> HashSet<String> {
        self.live().schedules.iter().filter(|s| !s.retention.is_empty()).map(|s| s.name.clone()).collect()
    }

    /// Apply `policy` to the backups of `vm` from `node` (needed when several nodes' VMs of that
    /// name have backups) under the rules `schedule` names (as in [`Hub::prune_all`]), or with
    /// `dry_run` only say what it would remove.
    ///
    /// # Errors
    /// Bad names, a rule of 0, or no rules here nor in the config (400); no backups of the VM
    /// (404); backups of it from several nodes and no `node` (409); a schedule as in
    /// [`Hub::prune_all`].
    pub async fn prune(
        &self,
        vm: &str,
        node: Option<&str>,
        schedule: Option<&str>,
        policy: Policy,
        dry_run: bool,
    ) -> Result<PruneView, HubError> {
        if !valid_name(vm) {
            return Err(HubError::BadRequest(format!("vm_name '{vm}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")));
        }
        let (scope, policy) = self.scope_and_policy(schedule, policy)?;
        let node = self.backups_node(vm, node)?;
        Ok(self.apply(vm, &node, scope.as_deref(), &policy, dry_run).await)
    }

    /// The retention `job`, a completed backup, applies and to which backups (`None`: those under
    /// the hub's rules): its schedule's own `keep_*` as the hub has them now (a reload may have
    /// changed them since it started) to the backups that schedule made; else the request's rules,
    /// or the config's, to the VM's backups no schedule of its own keeps.
    pub(super) fn retention_after(&self, job: &Job) -> (Option<String>, Policy) {
        let live = self.live();
        let own = job.schedule.as_deref().and_then(|n| live.schedules.iter().find(|s| s.name == n));
        match own {
            Some(s) if !s.retention.is_empty() => (Some(s.name.clone()), s.retention),
            // A schedule's run carries its schedule's rules as they were at its start: no longer
            // its own, they are not the request's either.
            _ if job.retention.is_empty() || job.schedule.is_some() => (None, live.retention),
            _ => (None, job.retention),
        }
    }

    /// Retention after a backup of `vm` from `node` completed: what `policy` does not keep of the
    /// backups under `scope`'s rules is removed, each outcome logged.
    pub(super) async fn apply_retention(&self, vm: &str, node: &str, scope: Option<&str>, policy: &Policy) {
        let view = self.apply(vm, node, scope, policy, false).await;
        for entry in view.backups.iter().filter(|e| e.action == "remove") {
            match &entry.error {
                None => tracing::info!(vm, node, backup = %entry.backup_id, "retention: backup dropped"),
                Some(e) => {
                    tracing::warn!(vm, node, backup = %entry.backup_id, error = %e, "retention: backup stays for now")
                }
            }
        }
    }

    /// The node whose backups of `vm` a prune is about.
    fn backups_node(&self, vm: &str, wanted: Option<&str>) -> Result<String, HubError> {
        let st = self.state();
        let mut nodes: Vec<&str> = st.catalog.values().filter(|m| m.vm_name == vm).map(|m| m.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        match (wanted, nodes.as_slice()) {
            (Some(n), _) if nodes.contains(&n) => Ok(n.to_string()),
            (Some(n), _) => Err(HubError::NotFound(format!("no backups of VM {vm} from node {n}"))),
            (None, []) => Err(HubError::NotFound(format!("no backups of VM {vm}"))),
            (None, [one]) => Ok((*one).to_string()),
            (None, several) => Err(HubError::Conflict(format!(
                "VM {vm} has backups from nodes {}: say which with \"node\"",
                several.join(", ")
            ))),
        }
    }

    async fn apply(&self, vm: &str, node: &str, scope: Option<&str>, policy: &Policy, dry_run: bool) -> PruneView {
        let mut backups: Vec<PruneEntry> = {
            let owned = self.schedules_with_rules();
            let st = self.state();
            let (mine, others): (Vec<&Manifest>, Vec<&Manifest>) = st
                .catalog
                .values()
                .filter(|m| m.vm_name == vm && m.node == node)
                .partition(|m| scope_of(m, &owned) == scope);
            let points: Vec<Point<'_>> =
                mine.iter().map(|m| Point { backup_id: &m.backup_id, created_at: &m.created_at }).collect();
            let made_by = |id: &str| st.catalog.get(id).and_then(|m| m.schedule.clone());
            let judged = policy.select(&points, &TimeZone::system()).into_iter().map(|v| PruneEntry {
                schedule: made_by(&v.backup_id),
                action: if v.kept_by.is_some() { "keep" } else { "remove" },
                backup_id: v.backup_id,
                created_at: v.created_at,
                kept_by: v.kept_by,
                error: None,
            });
            let left_alone = others.iter().map(|m| PruneEntry {
                backup_id: m.backup_id.clone(),
                created_at: m.created_at.clone(),
                action: "keep",
                schedule: m.schedule.clone(),
                kept_by: Some(Rule::OtherRetention),
                error: None,
            });
            judged.chain(left_alone).collect()
        };
        // Newest first, as the verdicts are: undated ones last, equal times by id.
        backups
            .sort_by_cached_key(|e| std::cmp::Reverse((e.created_at.parse::<Timestamp>().ok(), e.backup_id.clone())));
        let (mut removed, mut failed) = (0, 0);
        if !dry_run {
            // Oldest first: each merge folds the next backup's layer into the one going away.
            for entry in backups.iter_mut().rev().filter(|e| e.kept_by.is_none()) {
                match self.delete_merging(&entry.backup_id).await {
                    Ok(_) => removed += 1,
                    Err(e) => {
                        failed += 1;
                        entry.error = Some(e.to_string());
                    }
                }
            }
        }
        PruneView {
            vm_name: vm.to_string(),
            node: node.to_string(),
            dry_run,
            schedule: scope.map(str::to_string),
            policy: *policy,
            removed,
            failed,
            backups,
        }
    }
}

/// Whose rules `m` is under: the schedule that made it, when it is one of `owned` (those with
/// `keep_*` of their own); else the hub's (`None`).
fn scope_of<'a>(m: &'a Manifest, owned: &HashSet<String>) -> Option<&'a str> {
    m.schedule.as_deref().filter(|s| owned.contains(*s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::merge::tests::{disk, read_all, SIZE};
    use crate::jobs::tests::{hub_in, manifest};
    use crate::repo::{self, Manifest};
    use qcow2::{BackingFormat, CreateOptions, Image};

    /// Backups `x` (full), `c` on `x` and `d` on `c`, one disk, each layer writing its own byte
    /// over its own MiB, on disk and in the catalog: `c` and `d` on one day (in every time zone),
    /// `x` days before. Returns what each reads as.
    fn chain(hub: &Hub) -> Vec<(String, Vec<u8>)> {
        chain_of(hub, "vm", "")
    }

    /// [`chain`] of VM `vm`, its backup ids prefixed with `prefix`.
    fn chain_of(hub: &Hub, vm: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let id = |name: &str| format!("{prefix}{name}");
        let layers = [
            (id("x"), "2026-01-01T12:00:00Z", None),
            (id("c"), "2026-01-05T12:00:00Z", Some(id("x"))),
            (id("d"), "2026-01-05T12:10:00Z", Some(id("c"))),
        ];
        let mut reads = Vec::new();
        for (i, (id, created, parent)) in layers.into_iter().enumerate() {
            let id = id.as_str();
            let m = Manifest {
                vm_name: vm.into(),
                backup_type: if parent.is_some() { "incremental" } else { "full" }.into(),
                parent_id: parent.clone(),
                disks: vec![disk(2000)],
                ..manifest(id, created)
            };
            std::fs::create_dir_all(hub.repo.backup_dir(vm, id)).unwrap();
            let path = hub.repo.disk_path(vm, id, 2000);
            let options = match &parent {
                None => CreateOptions::new(SIZE),
                Some(p) => CreateOptions::overlay(format!("../{p}/{}", repo::disk_file(2000)), BackingFormat::Qcow2),
            };
            Image::create(&path, &options).unwrap();
            let image = Image::open_with(&path, &repo::image_options(&path, true)).unwrap();
            image.write_at(&vec![0x10 * (i as u8 + 1); 1 << 20], (i as u64) << 20).unwrap();
            image.close().unwrap();
            drop(image);
            let (manifest_path, data) = hub.repo.manifest_file(&m).unwrap();
            std::fs::write(manifest_path, data).unwrap();
            hub.state().catalog.insert(id.into(), m);
            reads.push((id.to_string(), read_all(&path)));
        }
        reads
    }

    /// `keep_daily = 2` keeps the newest backup of each day: `d` and `x`. `c`, between them, goes
    /// by merging `d` into it; `d` then builds on `x`, and both read as before.
    #[tokio::test]
    async fn a_backup_between_two_kept_ones_is_merged_away_and_both_read_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let hub = hub_in(dir.path(), (first, first + 1));
        let reads = chain(&hub);
        let policy = Policy { daily: Some(2), ..Policy::default() };

        let preview = hub.prune("vm", None, None, policy, true).await.unwrap();
        let said: Vec<(&str, &str)> = preview.backups.iter().map(|e| (e.backup_id.as_str(), e.action)).collect();
        assert_eq!(said, [("d", "keep"), ("c", "remove"), ("x", "keep")]);
        assert_eq!((preview.removed, preview.failed), (0, 0));
        assert_eq!(hub.state().catalog.len(), 3, "a dry run deletes nothing");

        let done = hub.prune("vm", None, None, policy, false).await.unwrap();
        assert_eq!((done.removed, done.failed), (1, 0), "{done:?}");
        let st = hub.state();
        let ids: Vec<&String> = st.catalog.keys().collect();
        assert_eq!(ids, ["d", "x"]);
        assert_eq!(st.catalog.get("d").and_then(|m| m.parent_id.as_deref()), Some("x"));
        drop(st);
        assert!(!hub.repo.backup_dir("vm", "c").exists());
        for (id, expected) in reads.iter().filter(|(id, _)| id != "c") {
            let path = hub.repo.disk_path("vm", id, 2000);
            assert!(read_all(&path) == *expected, "backup {id} reads as before");
            let image = Image::open_with(&path, &repo::image_options(&path, false)).unwrap();
            assert!(image.check().unwrap().is_clean(), "{id}");
        }
    }

    #[tokio::test]
    async fn a_prune_without_rules_or_backups_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let hub = hub_in(dir.path(), (first, first + 1));
        chain(&hub);
        let no_rules = hub.prune("vm", None, None, Policy::default(), true).await.unwrap_err();
        assert!(matches!(&no_rules, HubError::BadRequest(e) if e.contains("no retention rules")), "{no_rules}");
        let zero = hub.prune("vm", None, None, Policy { last: Some(0), ..Policy::default() }, true).await.unwrap_err();
        assert!(matches!(&zero, HubError::BadRequest(e) if e.starts_with("keep ")), "{zero}");
        let one = Policy { last: Some(1), ..Policy::default() };
        assert!(matches!(hub.prune("other", None, None, one, true).await, Err(HubError::NotFound(_))));
        assert!(matches!(hub.prune("vm", Some("elsewhere"), None, one, true).await, Err(HubError::NotFound(_))));
        assert!(matches!(hub.prune("../vm", None, None, one, true).await, Err(HubError::BadRequest(_))));
    }

    /// A schedule with `keep_*` of its own: `c`, which it made, is its to keep; the hub's rules
    /// over `x` and `d` neither count nor remove it, and its own rules touch nothing else. Its
    /// rules taken out by a reload, `c` is the hub's again.
    #[tokio::test]
    async fn a_schedule_with_rules_of_its_own_keeps_the_backups_it_made_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let hub = hub_in(dir.path(), (first, first + 1));
        let reads = chain(&hub);
        let made = {
            let mut st = hub.state();
            let c = st.catalog.get_mut("c").unwrap();
            c.schedule = Some("db".into());
            c.clone()
        };
        let (path, data) = hub.repo.manifest_file(&made).unwrap();
        std::fs::write(path, data).unwrap();
        let with_rules = |keep: Option<u32>| {
            let mut new = hub.settings.clone();
            let mut text = "name = \"db\"\nvms = [\"vm\"]\nat = [\"02:00\"]\n".to_string();
            if let Some(n) = keep {
                text.push_str(&format!("keep_backups = {n}\n"));
            }
            new.schedules = vec![crate::schedule::Schedule::parse(toml::from_str(&text).unwrap()).unwrap()];
            hub.reload(&new).unwrap();
        };
        with_rules(Some(1));
        let one = Policy { last: Some(1), ..Policy::default() };

        let hubs = hub.prune("vm", None, None, one, false).await.unwrap();
        let said: Vec<(&str, &str, Option<Rule>)> =
            hubs.backups.iter().map(|e| (e.backup_id.as_str(), e.action, e.kept_by)).collect();
        assert_eq!(
            said,
            [("d", "keep", Some(Rule::Last)), ("c", "keep", Some(Rule::OtherRetention)), ("x", "remove", None)]
        );
        assert_eq!((hubs.removed, hubs.failed, hubs.schedule.as_deref()), (1, 0, None));
        assert_eq!(hubs.backups.get(1).and_then(|e| e.schedule.as_deref()), Some("db"));
        let schedules = hub.prune("vm", None, Some("db"), Policy::default(), true).await.unwrap();
        let said: Vec<(&str, &str, Option<Rule>)> =
            schedules.backups.iter().map(|e| (e.backup_id.as_str(), e.action, e.kept_by)).collect();
        assert_eq!(said, [("d", "keep", Some(Rule::OtherRetention)), ("c", "keep", Some(Rule::Last))]);
        assert_eq!((schedules.policy, schedules.schedule.as_deref()), (one, Some("db")), "its own rules");
        let all = hub.prune_all(Some("db"), Policy::default(), true).await.unwrap();
        assert_eq!(all.vms.len(), 1, "the VMs with backups it made");
        for (id, expected) in reads.iter().filter(|(id, _)| id != "x") {
            assert!(read_all(&hub.repo.disk_path("vm", id, 2000)) == *expected, "backup {id} reads as before");
        }

        let unknown = hub.prune("vm", None, Some("nope"), one, true).await.unwrap_err();
        assert!(matches!(&unknown, HubError::NotFound(e) if e.contains("no schedule nope")), "{unknown}");
        with_rules(None);
        let theirs = hub.prune("vm", None, Some("db"), one, true).await.unwrap_err();
        assert!(matches!(&theirs, HubError::BadRequest(e) if e.contains("no keep_* of its own")), "{theirs}");
        let hubs = hub.prune("vm", None, None, one, false).await.unwrap();
        assert_eq!((hubs.removed, hubs.failed), (1, 0), "c is the hub's again: {hubs:?}");
        let ids: Vec<String> = hub.state().catalog.keys().cloned().collect();
        assert_eq!(ids, ["d"]);
        let (id, expected) = reads.last().unwrap();
        assert!(read_all(&hub.repo.disk_path("vm", id, 2000)) == *expected, "the newest reads as before");
    }

    /// Without a VM: every VM's backups pruned by the config's policy, each VM's chain apart.
    #[tokio::test]
    async fn every_vm_is_pruned_when_none_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = testports::free_ports(2);
        let hub = hub_in(dir.path(), (first, first + 1));
        chain_of(&hub, "vm", "");
        chain_of(&hub, "web", "w");
        let policy = Policy { daily: Some(2), ..Policy::default() };
        let preview = hub.prune_all(None, policy, true).await.unwrap();
        let names: Vec<&str> = preview.vms.iter().map(|v| v.vm_name.as_str()).collect();
        assert_eq!((names, preview.removed), (vec!["vm", "web"], 0));
        let done = hub.prune_all(None, policy, false).await.unwrap();
        assert_eq!((done.removed, done.failed), (2, 0), "{done:?}");
        let ids: Vec<String> = hub.state().catalog.keys().cloned().collect();
        assert_eq!(ids, ["d", "wd", "wx", "x"]);
        assert!(matches!(hub.prune_all(None, Policy::default(), true).await, Err(HubError::BadRequest(_))));
    }
}
