//! The configuration taken up while the node serves (`SIGHUP`, `systemctl reload`): a VM added
//! to node.toml (or a disk to one) is backed up by the hub's next run without a restart, which
//! would cancel the backups and restores under way.
//!
//! Taken up: `[[vm]]` (and `--vm`), `[copy]` and `nbd_hosts`; each job takes what it needs when
//! it starts, so jobs under way go on with what they started with (a VM removed keeps its
//! running job to the end). Not taken up: `listen`, `token_file`, `api_tls`, `api_client_certs`, `state_dir`,
//! `restore_dir` and `[tunnel]`, which the node's listener, API, change maps and tunnel were built from; a reload
//! that changes one applies the rest, names those in its log line and in
//! `sendense_node_config_restart_pending`, and keeps their values as they were. A file that does
//! not check is refused before it reaches this module (the caller's
//! [`Jobs::reload_refused`]), and the node runs on as it was.
//!
//! A bandwidth limit that a reload leaves as it was keeps its bucket: jobs started before and
//! after share one limit, as before.

use std::sync::Arc;

use super::Jobs;
use crate::config::Settings;
use crate::mover::CopyOptions;
use crate::service::ReloadStatus;

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys changed and now in force (VMs apart).
    pub applied: Vec<&'static str>,
    /// VMs new to the node.
    pub vms_added: Vec<String>,
    /// VMs whose disks, hooks or options changed (for jobs started from now on).
    pub vms_changed: Vec<String>,
    /// VMs gone (a job of one under way goes on to its end).
    pub vms_removed: Vec<String>,
    /// Keys changed that take a restart: not applied.
    pub restart_pending: Vec<&'static str>,
}

/// Whether two copy tunings are the same (a bandwidth limit compared by its rate).
fn same_copy(a: &CopyOptions, b: &CopyOptions) -> bool {
    let rate = |o: &CopyOptions| o.throttle.as_ref().map(|t| t.bytes_per_second());
    (a.connections, a.depth, a.request_size, a.block_size, a.retry_window, a.checkpoint_every, rate(a))
        == (b.connections, b.depth, b.request_size, b.block_size, b.retry_window, b.checkpoint_every, rate(b))
}

impl Jobs {
    /// Take up `new` (the configuration file read again and checked as at start): module doc.
    pub fn reload(&self, new: Settings) -> Reloaded {
        let old = self.settings();
        let tunnel = |s: &Settings| s.tunnel.as_ref().map(|t| format!("{t:?}"));
        let restart_only = [
            ("listen", old.listen != new.listen),
            ("token_file", old.token != new.token),
            ("api_tls", old.api_tls.as_ref().map(|t| &t.dir) != new.api_tls.as_ref().map(|t| &t.dir)),
            (
                "api_client_certs",
                old.api_tls.as_ref().map(|t| t.client_certs) != new.api_tls.as_ref().map(|t| t.client_certs),
            ),
            ("state_dir", old.state_dir != new.state_dir),
            ("restore_dir", old.restore_dir != new.restore_dir),
            ("tunnel", tunnel(&old) != tunnel(&new)),
        ];
        let copy_same = same_copy(&old.copy, &new.copy);
        let live = [
            ("copy", !copy_same || old.parallel_disks != new.parallel_disks),
            ("nbd_hosts", old.nbd_hosts != new.nbd_hosts),
            ("nbd_tls", old.nbd_tls != new.nbd_tls),
        ];
        let changed = |keys: &[(&'static str, bool)]| keys.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
        let mut done =
            Reloaded { applied: changed(&live), restart_pending: changed(&restart_only), ..Reloaded::default() };
        for v in &old.vms {
            match new.vm(&v.name) {
                None => done.vms_removed.push(v.name.clone()),
                Some(n) if n != v => done.vms_changed.push(v.name.clone()),
                Some(_) => {}
            }
        }
        done.vms_added = new.vms.iter().filter(|n| old.vm(&n.name).is_none()).map(|n| n.name.clone()).collect();
        let copy = match copy_same {
            // The same limit: the same bucket, shared with the jobs under way.
            true => old.copy.clone(),
            false => new.copy,
        };
        let merged = Settings {
            listen: old.listen,
            token: old.token.clone(),
            api_tls: old.api_tls.clone(),
            state_dir: old.state_dir.clone(),
            restore_dir: old.restore_dir.clone(),
            tunnel: old.tunnel.clone(),
            nbd_hosts: new.nbd_hosts,
            nbd_tls: new.nbd_tls,
            vms: new.vms,
            copy,
            parallel_disks: new.parallel_disks,
        };
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(merged);
        *self.last_reload() = ReloadStatus::taken(done.restart_pending.clone());
        done
    }

    /// Record a reload that was refused (the file did not check): the settings stay as they were.
    pub fn reload_refused(&self) {
        self.last_reload().ok = false;
    }

    /// The last reload, for the metrics.
    pub fn reload_status(&self) -> ReloadStatus {
        self.last_reload().clone()
    }

    fn last_reload(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        self.last_reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve_vms, NbdHosts, VmFile};

    fn settings(vms: &[&str]) -> Settings {
        let files: Vec<VmFile> = vms.iter().map(|v| crate::config::parse_vm_flag(v).unwrap()).collect();
        Settings {
            listen: ([127, 0, 0, 1], 8081).into(),
            token: None,
            state_dir: "/tmp/state".into(),
            restore_dir: None,
            nbd_hosts: NbdHosts::Only(vec![]),
            nbd_tls: None,
            api_tls: None,
            tunnel: None,
            vms: resolve_vms(files).unwrap(),
            copy: CopyOptions::default(),
            parallel_disks: 4,
        }
    }

    #[test]
    fn a_reload_takes_up_vms_and_copy_tuning_and_keeps_what_needs_a_restart() {
        let jobs = Jobs::new(Arc::new(settings(&["a=2000:/dev/a", "b=2000:/dev/b"])));
        let mut new = settings(&["a=2000:/dev/a,2001:/dev/a1", "c=2000:/dev/c"]);
        new.parallel_disks = 2;
        new.listen = ([0, 0, 0, 0], 8081).into();
        let done = jobs.reload(new);
        assert_eq!(done.vms_added, ["c"]);
        assert_eq!(done.vms_changed, ["a"]);
        assert_eq!(done.vms_removed, ["b"]);
        assert_eq!(done.applied, ["copy"]);
        assert_eq!(done.restart_pending, ["listen"]);
        let now = jobs.settings();
        assert_eq!(now.vm("a").map(|v| v.disks.len()), Some(2));
        assert!(now.vm("b").is_none() && now.vm("c").is_some());
        assert_eq!(now.parallel_disks, 2);
        assert_eq!(now.listen, ([127, 0, 0, 1], 8081).into(), "the listener in use stays");
        assert_eq!(jobs.reload_status().restart_pending, ["listen"]);
        jobs.reload_refused();
        assert!(!jobs.reload_status().ok);
    }

    #[test]
    fn an_unchanged_bandwidth_limit_keeps_its_bucket() {
        let limited = || {
            let mut s = settings(&["a=2000:/dev/a"]);
            s.copy.throttle = Some(Arc::new(crate::throttle::Throttle::new(1 << 20)));
            s
        };
        let jobs = Jobs::new(Arc::new(limited()));
        let before = jobs.settings().copy.throttle.clone().unwrap();
        assert_eq!(jobs.reload(limited()).applied, Vec::<&str>::new());
        assert!(Arc::ptr_eq(&before, jobs.settings().copy.throttle.as_ref().unwrap()));
        let mut faster = limited();
        faster.copy.throttle = Some(Arc::new(crate::throttle::Throttle::new(2 << 20)));
        assert_eq!(jobs.reload(faster).applied, ["copy"]);
        assert!(!Arc::ptr_eq(&before, jobs.settings().copy.throttle.as_ref().unwrap()));
    }
}
