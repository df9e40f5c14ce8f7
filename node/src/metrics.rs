//! `/metrics` in the Prometheus text format.
//!
//! Every value is read from the job table and the tunnel at scrape time, so there is no registry
//! to keep in step with them; a dozen lines of formatting replace a metrics crate's collector
//! plumbing for the same output.

use std::fmt::Write;
use std::sync::Arc;

use crate::api::{JobStatus, TunnelView};
use crate::jobs::{CheckpointStats, Job, TakenUp};
use crate::service::ReloadStatus;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Render the node's metrics.
pub fn render(
    jobs: &[Arc<Job>],
    tunnel: &TunnelView,
    reload: &ReloadStatus,
    taken_up: TakenUp,
    checkpoints: CheckpointStats,
) -> String {
    let mut out = String::new();
    let views: Vec<_> = jobs.iter().map(|j| j.view()).collect();
    let _ =
        writeln!(out, "# HELP sendense_node_jobs Jobs known to the node, by status.\n# TYPE sendense_node_jobs gauge");
    for status in [JobStatus::Running, JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled] {
        let n = views.iter().filter(|v| v.status == status).count();
        let _ = writeln!(out, "sendense_node_jobs{{status=\"{}\"}} {n}", format!("{status:?}").to_lowercase());
    }
    type Field = fn(&crate::api::DiskStatus) -> u64;
    let disk_metrics: [(&str, &str, Field); 6] = [
        ("bytes_total", "Disk size.", |d| d.bytes_total),
        ("bytes_read", "Bytes read from the source.", |d| d.bytes_read),
        ("bytes_sent", "Bytes sent as data.", |d| d.bytes_sent),
        ("bytes_skipped_holes", "Hole bytes not read.", |d| d.bytes_skipped_holes),
        ("bytes_skipped_zero", "Zero bytes not sent as data.", |d| d.bytes_skipped_zero),
        ("bytes_unchanged", "Unchanged bytes not sent.", |d| d.bytes_unchanged),
    ];
    for (name, help, get) in disk_metrics {
        let _ = writeln!(out, "# HELP sendense_node_disk_{name} {help}\n# TYPE sendense_node_disk_{name} gauge");
        for v in &views {
            for d in &v.disks {
                let _ = writeln!(
                    out,
                    "sendense_node_disk_{name}{{job=\"{}\",vm=\"{}\",disk=\"{}\"}} {}",
                    escape(&v.job_id),
                    escape(&v.vm_name),
                    d.key,
                    get(d)
                );
            }
        }
    }
    let tunnel_metrics = [
        ("tunnel_enabled", "Whether a tunnel is configured.", u64::from(tunnel.enabled)),
        ("tunnel_connected", "Whether the tunnel is up.", u64::from(tunnel.connected)),
        ("tunnel_reconnects_total", "Tunnel reconnects.", tunnel.reconnects),
        ("tunnel_open_channels", "Forwarded connections open.", tunnel.open_channels),
        ("tunnel_bytes_to_hub_total", "Bytes sent to the hub.", tunnel.bytes_to_hub),
        ("tunnel_bytes_from_hub_total", "Bytes received from the hub.", tunnel.bytes_from_hub),
    ];
    for (name, help, value) in tunnel_metrics {
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        let _ = writeln!(
            out,
            "# HELP sendense_node_{name} {help}\n# TYPE sendense_node_{name} {kind}\nsendense_node_{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP sendense_node_jobs_taken_up Jobs the last stop handed over, taken up (resumed) or not (dropped) at this start.\n\
         # TYPE sendense_node_jobs_taken_up gauge\n\
         sendense_node_jobs_taken_up{{result=\"resumed\"}} {}\n\
         sendense_node_jobs_taken_up{{result=\"dropped\"}} {}",
        taken_up.resumed, taken_up.dropped
    );
    let _ = writeln!(
        out,
        "# HELP sendense_node_checkpoints_total Records of the running jobs written for a killed node's next start, or not (failed).\n\
         # TYPE sendense_node_checkpoints_total counter\n\
         sendense_node_checkpoints_total{{result=\"written\"}} {}\n\
         sendense_node_checkpoints_total{{result=\"failed\"}} {}\n\
         # HELP sendense_node_checkpoint_maps_timestamp_seconds When the running disks' resume maps were last saved (0: not yet).\n\
         # TYPE sendense_node_checkpoint_maps_timestamp_seconds gauge\n\
         sendense_node_checkpoint_maps_timestamp_seconds {}",
        checkpoints.written, checkpoints.failed, checkpoints.maps_at
    );
    out.push_str(&reload.metrics("sendense_node"));
    out
}
