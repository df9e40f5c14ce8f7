//! The VM's snapshot hooks: a shell command run before the disks are copied (to take the
//! snapshot) and after (to release it), with the VM, the job and the phase in its environment,
//! bounded in time, killed when the job is cancelled, and its stderr's tail in the error.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Vm;

/// Longest a hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(600);

/// Run a hook with `sh -c`; its environment says which VM, job and phase.
pub(super) async fn run_hook(
    cmd: &str,
    phase: &str,
    vm: &Vm,
    job_id: &str,
    cancel: &CancellationToken,
) -> Result<(), String> {
    tracing::info!(vm = %vm.name, job = job_id, phase, "running hook");
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("SENDENSE_VM", &vm.name)
        .env("SENDENSE_JOB_ID", job_id)
        .env("SENDENSE_PHASE", phase)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{phase}-snapshot hook could not start: {e}"))?;
    let out = tokio::select! {
        _ = cancel.cancelled() => return Err(format!("{phase}-snapshot hook cancelled")),
        r = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()) => r,
    };
    let out = out
        .map_err(|_| format!("{phase}-snapshot hook ran longer than {} s", HOOK_TIMEOUT.as_secs()))?
        .map_err(|e| format!("{phase}-snapshot hook: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.trim().chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
    Err(format!("{phase}-snapshot hook failed ({}): {tail}", out.status))
}
