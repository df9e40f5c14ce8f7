//! `GET /metrics`: the hub's state as Prometheus text, for the alerts a backup service needs.
//!
//! Besides jobs, merges, ports and exports, per VM (and node) what an operator alerts on: when
//! its newest backup completed ("no backup of pgtest1 for 26 hours"), how many backups it has and
//! the bytes its images hold; and per directory, the repository's and the replicas' filesystem
//! size and the space left for backups ("the repository fills up in three days"). The
//! filesystem is asked off the runtime with a deadline: a hung repository mount (NFS) leaves
//! those two series out of the answer instead of holding a worker that carries NBD traffic.
//! Per backup schedule, when its last run ended and how its VMs fared; per node, whether it
//! answered the hub's last check (`jobs/nodes.rs`); whether the last configuration reload was
//! taken up, and what waits for a restart.
//! VM and node names are checked names (`[A-Za-z0-9._-]`), safe as label values as they are.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::jobs::{Hub, Outcome, VmSummary};

/// How long the filesystem may take to say its size.
const STATVFS_DEADLINE: Duration = Duration::from_secs(2);

/// The metrics text.
pub async fn render(hub: &Hub) -> String {
    let mut out = String::new();
    jobs(&mut out, hub);
    vms(&mut out, hub);
    schedules(&mut out, hub);
    nodes(&mut out, hub);
    out.push_str(&hub.reload_status().metrics("sendense_hub"));
    filesystems(&mut out, hub).await;
    ports_and_exports(&mut out, hub);
    out
}

fn nodes(out: &mut String, hub: &Hub) {
    let health = hub.node_health();
    help(
        out,
        "sendense_hub_node_up",
        "gauge",
        "1 when the node answered the hub's last check (every 30 s: its VMs listed, its token accepted), 0 when not \
         (alert on 0: its backups would fail).",
    );
    for (node, up, _) in &health {
        let _ = writeln!(out, "sendense_hub_node_up{{node=\"{node}\"}} {}", u8::from(*up));
    }
    help(
        out,
        "sendense_hub_node_last_seen_timestamp_seconds",
        "gauge",
        "When the node last answered the hub (Unix time); absent while it has not since the hub started.",
    );
    for (node, _, seen) in &health {
        if let Some(at) = seen {
            let _ = writeln!(out, "sendense_hub_node_last_seen_timestamp_seconds{{node=\"{node}\"}} {at:.3}");
        }
    }
    if let Some(sessions) = hub.node_tunnel_sessions() {
        help(
            out,
            "sendense_hub_node_tunnel_sessions",
            "gauge",
            "The node's SSH sessions logged in at the hub's endpoint now (0 with the node down: its tunnel does not \
             connect; more than 0: its service behind the tunnel does not answer).",
        );
        for (node, n) in sessions {
            let _ = writeln!(out, "sendense_hub_node_tunnel_sessions{{node=\"{node}\"}} {n}");
        }
    }
    if let Some(totals) = hub.ssh_refusals_total() {
        help(
            out,
            "sendense_hub_ssh_logins_refused_total",
            "counter",
            "Logins the hub's SSH endpoint refused since it started, by reason (GET /api/v1/ssh tells the keys and \
             addresses of the last hour).",
        );
        for (reason, n) in totals {
            let _ = writeln!(out, "sendense_hub_ssh_logins_refused_total{{reason=\"{reason}\"}} {n}");
        }
    }
}

fn jobs(out: &mut String, hub: &Hub) {
    let (by_status, completed) = hub.counts();
    help(out, "sendense_hub_jobs", "gauge", "Backup and replication jobs in memory, by status.");
    for (status, n) in by_status {
        let _ = writeln!(out, "sendense_hub_jobs{{status=\"{status}\"}} {n}");
    }
    help(out, "sendense_hub_backups_completed", "gauge", "Backups in the catalog.");
    let _ = writeln!(out, "sendense_hub_backups_completed {completed}");
    help(
        out,
        "sendense_hub_backups_verify_failed",
        "gauge",
        "Backups whose last verification (a scrub's, verify_every_days, or a request's) failed: an image \
         not sound or not equal to its checksum.",
    );
    let _ = writeln!(out, "sendense_hub_backups_verify_failed {}", hub.verify_failures());
    let (compressed, saved, failed) = hub.compression_totals();
    help(
        out,
        "sendense_hub_backups_compressed",
        "gauge",
        "Backups whose images were rewritten compressed (compress = \"zstd\").",
    );
    let _ = writeln!(out, "sendense_hub_backups_compressed {compressed}");
    help(
        out,
        "sendense_hub_compression_saved_bytes",
        "gauge",
        "Bytes the compression of the backups in the catalog saves: the data their images hold, less the bytes the files take.",
    );
    let _ = writeln!(out, "sendense_hub_compression_saved_bytes {saved}");
    help(
        out,
        "sendense_hub_compression_failed",
        "gauge",
        "Backups whose compression failed (logged; tried again six hours later; alert on > 0).",
    );
    let _ = writeln!(out, "sendense_hub_compression_failed {failed}");
    help(
        out,
        "sendense_hub_stand_alone_failed",
        "gauge",
        "Backups ending a chain longer than max_chain whose rewrite to stand alone failed: still on their chain \
         (logged; tried again six hours later; alert on > 0).",
    );
    let _ = writeln!(out, "sendense_hub_stand_alone_failed {}", hub.stand_alone_failures());
    let (taken_up, not_taken_up) = hub.handover_counts();
    help(
        out,
        "sendense_hub_jobs_taken_up",
        "gauge",
        "Backups, replications and driven restores the hub's last stop handed over (systemctl restart) and this \
         start took up: result=\"resumed\" go on where their node is; result=\"dropped\" could not be (port, image, \
         node or backup gone) and were removed and cancelled on their node.",
    );
    let _ = writeln!(out, "sendense_hub_jobs_taken_up{{result=\"resumed\"}} {taken_up}");
    let _ = writeln!(out, "sendense_hub_jobs_taken_up{{result=\"dropped\"}} {not_taken_up}");
    let (merging, failed) = hub.merge_counts();
    help(
        out,
        "sendense_hub_merges",
        "gauge",
        "Merges of a backup into its incremental (retention): running, or failed and waiting for a retry \
         (DELETE ...?merge=true), which holds the VM's deletes.",
    );
    let _ = writeln!(out, "sendense_hub_merges{{state=\"running\"}} {merging}");
    let _ = writeln!(out, "sendense_hub_merges{{state=\"failed\"}} {failed}");
}

/// One per-VM series' value.
type VmValue = fn(&VmSummary) -> String;

fn vms(out: &mut String, hub: &Hub) {
    let vms = hub.vm_summaries();
    let series: [(&str, &str, VmValue); 4] = [
        (
            "sendense_hub_vm_backups",
            "Backups of the VM in the catalog; 0 for a VM its node lists that has none (alert on 0: nobody backs it up).",
            |v| v.backups.to_string(),
        ),
        ("sendense_hub_vm_backup_bytes", "Bytes the images of the VM's backups hold (each its own layer).", |v| {
            v.stored_bytes.to_string()
        }),
        ("sendense_hub_vm_last_backup_timestamp_seconds", "When the VM's newest backup completed (Unix time).", |v| {
            v.last_completed.map_or_else(|| "NaN".into(), |t| t.to_string())
        }),
        (
            "sendense_hub_vm_backup_schedules",
            "Backup schedules whose runs back the VM up (alert on 0: nothing backs it up from now on).",
            |v| v.backup_schedules.to_string(),
        ),
    ];
    for (name, what, value) in series {
        help(out, name, "gauge", what);
        for v in &vms {
            let _ = writeln!(out, "{name}{{vm=\"{}\",node=\"{}\"}} {}", v.vm, v.node, value(v));
        }
    }
    help(
        out,
        "sendense_hub_vm_excluded",
        "gauge",
        "1 for a VM a backup schedule's exclude leaves out on purpose (absent for the others): alert on \
         `sendense_hub_vm_backup_schedules == 0 unless on(vm, node) sendense_hub_vm_excluded`.",
    );
    for v in vms.iter().filter(|v| v.excluded) {
        let _ = writeln!(out, "sendense_hub_vm_excluded{{vm=\"{}\",node=\"{}\"}} 1", v.vm, v.node);
    }
}

fn schedules(out: &mut String, hub: &Hub) {
    let views = hub.schedules();
    help(
        out,
        "sendense_hub_schedule_last_run_end_timestamp_seconds",
        "gauge",
        "When the schedule's last run ended (Unix time; NaN before its first).",
    );
    for v in &views {
        let ended =
            v.last_run.as_ref().and_then(|r| r.ended_at.as_deref()).and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let value = ended.map_or_else(|| "NaN".into(), |t| t.as_second().to_string());
        let _ =
            writeln!(out, "sendense_hub_schedule_last_run_end_timestamp_seconds{{schedule=\"{}\"}} {value}", v.name);
    }
    help(
        out,
        "sendense_hub_schedule_last_run_backups",
        "gauge",
        "VMs of the schedule's last run by outcome (alert on failed > 0).",
    );
    for v in &views {
        for outcome in [Outcome::Completed, Outcome::Failed, Outcome::Cancelled, Outcome::Skipped] {
            let n = v.last_run.as_ref().map_or(0, |r| r.count(outcome));
            let _ = writeln!(
                out,
                "sendense_hub_schedule_last_run_backups{{schedule=\"{}\",status=\"{}\"}} {n}",
                v.name,
                outcome.name()
            );
        }
    }
    help(
        out,
        "sendense_hub_schedule_last_run_errors",
        "gauge",
        "Nodes whose VMs the schedule's last run could not list (vms = [\"*\"]; alert on > 0).",
    );
    for v in &views {
        let n = v.last_run.as_ref().map_or(0, |r| r.errors.len());
        let _ = writeln!(out, "sendense_hub_schedule_last_run_errors{{schedule=\"{}\"}} {n}", v.name);
    }
    help(out, "sendense_hub_schedule_running", "gauge", "1 while a run of the schedule goes on.");
    for v in &views {
        let _ =
            writeln!(out, "sendense_hub_schedule_running{{schedule=\"{}\"}} {}", v.name, u8::from(v.running.is_some()));
    }
    help(
        out,
        "sendense_hub_schedule_skipped_occurrences_total",
        "counter",
        "Occurrences of the schedule passed over because its previous run was still going.",
    );
    for v in &views {
        let _ = writeln!(
            out,
            "sendense_hub_schedule_skipped_occurrences_total{{schedule=\"{}\"}} {}",
            v.name, v.skipped_occurrences
        );
    }
}

async fn filesystems(out: &mut String, hub: &Hub) {
    let dirs: [(&str, PathBuf); 2] = [("repo", hub.settings.repo.clone()), ("replicas", hub.settings.replicas.clone())];
    let mut sizes = Vec::new();
    for (label, dir) in dirs {
        let asked = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&dir));
        match tokio::time::timeout(STATVFS_DEADLINE, asked).await {
            Ok(Ok(Ok(fs))) => sizes.push((label, fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)),
            Ok(Ok(Err(e))) => tracing::warn!(dir = label, error = %e, "metrics: cannot read the filesystem's size"),
            Ok(Err(e)) => tracing::warn!(dir = label, error = %e, "metrics: filesystem query task"),
            Err(_) => tracing::warn!(dir = label, "metrics: the filesystem did not answer within 2 s"),
        }
    }
    help(out, "sendense_hub_filesystem_size_bytes", "gauge", "Size of the filesystem holding the directory.");
    for (label, size, _) in &sizes {
        let _ = writeln!(out, "sendense_hub_filesystem_size_bytes{{dir=\"{label}\"}} {size}");
    }
    help(out, "sendense_hub_filesystem_avail_bytes", "gauge", "Bytes the hub may still write there.");
    for (label, _, avail) in &sizes {
        let _ = writeln!(out, "sendense_hub_filesystem_avail_bytes{{dir=\"{label}\"}} {avail}");
    }
}

fn ports_and_exports(out: &mut String, hub: &Hub) {
    help(out, "sendense_hub_ports_leased", "gauge", "NBD ports leased.");
    let _ = writeln!(out, "sendense_hub_ports_leased {}", hub.ports.leased().len());
    help(out, "sendense_hub_ports_free", "gauge", "NBD ports free.");
    let _ = writeln!(out, "sendense_hub_ports_free {}", hub.ports.free());
    let views = hub.exports.views();
    help(out, "sendense_hub_export_bytes_written_total", "counter", "Bytes written into an export.");
    for e in &views {
        let _ = writeln!(out, "sendense_hub_export_bytes_written_total{{export=\"{}\"}} {}", e.name, e.bytes_written);
    }
    help(out, "sendense_hub_export_connections", "gauge", "Clients connected to an export.");
    for e in &views {
        let _ = writeln!(out, "sendense_hub_export_connections{{export=\"{}\"}} {}", e.name, e.connections);
    }
}

fn help(out: &mut String, name: &str, kind: &str, what: &str) {
    let _ = writeln!(out, "# HELP {name} {what}\n# TYPE {name} {kind}");
}
