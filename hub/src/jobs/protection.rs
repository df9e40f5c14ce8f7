//! Which VMs are protected (`GET /api/v1/vms`, `sendense-hub vms`): every VM a node lists and
//! every VM with backups, side by side with its newest backup.
//!
//! The backups list answers "what do I have"; a backup service must also answer "what am I
//! missing": a VM added to a node that no schedule names is backed up by nobody, and nothing
//! else would say so; nor would anything say that a VM backed up once by hand, or whose schedule
//! a reload took out, is in no schedule now (each VM names the backup schedules that cover it). The nodes' lists come from a check made by the call (`nodes.rs`); a VM
//! whose node did not answer keeps the disks of the node's last answer and says it was not
//! listed now. The same VMs without backups reach the metrics as `sendense_hub_vm_backups 0`
//! ([`Hub::vm_summaries`]).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Hub;

/// A VM and how it is protected.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// The VM.
    pub vm_name: String,
    /// Its node.
    pub node: String,
    /// Whether its node listed it at the check this view comes from (false: the node did not
    /// answer, or no longer has it; its backups stay).
    pub listed: bool,
    /// Its disks' keys and sizes as its node last listed them (none: never listed since the hub
    /// started).
    pub disks: Vec<VmDisk>,
    /// Backups in the catalog.
    pub backups: usize,
    /// The newest of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newest_backup: Option<NewestBackup>,
    /// A backup or replication of it running now (its id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The backup schedules whose runs back it up (none: nothing backs it up from now on, even
    /// if it has backups).
    pub backup_schedules: Vec<String>,
    /// The backup schedules of `"*"` whose `exclude` leaves it out on purpose.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded_by: Vec<String>,
}

/// A disk of a [`VmView`].
#[derive(Debug, Clone, Serialize)]
pub struct VmDisk {
    /// Disk key.
    pub key: u32,
    /// Size in bytes.
    pub size: u64,
}

/// The newest backup of a [`VmView`].
#[derive(Debug, Clone, Serialize)]
pub struct NewestBackup {
    /// Its id.
    pub backup_id: String,
    /// `full` or `incremental`.
    pub backup_type: String,
    /// When it completed (RFC 3339).
    pub completed_at: String,
}

impl Hub {
    /// Every VM a node lists (checked now) or with backups, by name then node.
    pub async fn vm_views(&self) -> Vec<VmView> {
        self.check_nodes().await;
        let listed = self.listed_vms();
        let st = self.state();
        let mut views: BTreeMap<(String, String), VmView> = BTreeMap::new();
        let blank = |vm: &str, node: &str| VmView {
            vm_name: vm.to_string(),
            node: node.to_string(),
            listed: false,
            disks: Vec::new(),
            backups: 0,
            newest_backup: None,
            running: None,
            backup_schedules: Vec::new(),
            excluded_by: Vec::new(),
        };
        for (node, vm, now) in &listed {
            let view = views.entry((vm.name.clone(), node.clone())).or_insert_with(|| blank(&vm.name, node));
            view.listed = *now;
            view.disks = vm.disks.iter().map(|d| VmDisk { key: d.key, size: d.size }).collect();
        }
        for m in st.catalog.values() {
            let view = views.entry((m.vm_name.clone(), m.node.clone())).or_insert_with(|| blank(&m.vm_name, &m.node));
            view.backups += 1;
            if view.newest_backup.as_ref().is_none_or(|n| n.completed_at < m.completed_at) {
                view.newest_backup = Some(NewestBackup {
                    backup_id: m.backup_id.clone(),
                    backup_type: m.backup_type.clone(),
                    completed_at: m.completed_at.clone(),
                });
            }
        }
        for (vm, id) in &st.busy_vms {
            let node = st.jobs.get(id).map(|j| j.node.clone());
            if let Some(view) =
                views.values_mut().find(|v| v.vm_name == *vm && node.as_ref().is_none_or(|n| *n == v.node))
            {
                view.running = Some(id.clone());
            }
        }
        drop(st);
        for view in views.values_mut() {
            (view.backup_schedules, view.excluded_by) = self.backup_schedules_of(&view.vm_name, &view.node);
        }
        views.into_values().collect()
    }

    /// The backup schedules (as the hub has them now) whose runs back up `vm` of `node`, and
    /// those that exclude it.
    pub(super) fn backup_schedules_of(&self, vm: &str, node: &str) -> (Vec<String>, Vec<String>) {
        let live = self.live();
        let names = |keep: &dyn Fn(&crate::schedule::Schedule) -> bool| {
            live.schedules.iter().filter(|s| keep(s)).map(|s| s.name.clone()).collect()
        };
        (names(&|s| s.backs_up(vm, node)), names(&|s| s.excludes(vm, node)))
    }
}
