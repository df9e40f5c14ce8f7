//! What both service binaries (`sendense-node`, `sendense-hub`) do around their work: logging to
//! stderr (`RUST_LOG`, default `info`), a multi-threaded runtime, one line on stderr and exit
//! status 1 for an error, the shutdown signal (Ctrl-C or SIGTERM, as systemd sends), and the
//! reload signal (SIGHUP, `systemctl reload`).

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;

/// Run `work` on a fresh runtime, the descriptor limit raised (`nbd_server::descriptors`); on
/// error print `NAME: error` (with its causes) and exit 1.
pub fn run<E: Display>(name: &str, work: impl Future<Output = Result<(), E>>) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match nbd_server::descriptors::raise_limit() {
        Ok(limit) => tracing::debug!(?limit, "open descriptors allowed"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the limit on open descriptors"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(work) {
        eprintln!("{name}: {e:#}");
        std::process::exit(1);
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
}

/// On every SIGHUP until the runtime ends: the configuration `config` read again by `read` (off
/// the runtime: it reads files) and handed to `apply`, which takes it up and logs what it did.
/// A configuration that does not read or check, or that `apply` refuses, is logged as refused
/// with its reason and `refused` is called (the service runs on as it was).
pub async fn reload_on_hangup<S: Send + 'static>(
    config: Option<PathBuf>,
    read: impl Fn() -> Result<S, String> + Clone + Send + 'static,
    mut apply: impl FnMut(S) -> Result<(), String>,
    mut refused: impl FnMut(),
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take SIGHUP: the configuration is reloaded by a restart only");
            return;
        }
    };
    let file = config.as_ref().map_or_else(|| "(none)".into(), |p| p.display().to_string());
    while hangups.recv().await.is_some() {
        tracing::info!(config = %file, "SIGHUP: reading the configuration again");
        let read = read.clone();
        let outcome = match tokio::task::spawn_blocking(read).await {
            Ok(Ok(new)) => apply(new),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = outcome {
            refused();
            tracing::error!(error = %e, "configuration reload refused: running on the configuration in force");
        }
    }
}

/// Where the configuration in force came from, for the metrics: whether the last reload was taken
/// up (a refused one leaves the configuration as it was), when the configuration in force was
/// loaded (start, or the last reload taken up), and the keys the file changed that wait for a
/// restart.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// The last reload was taken up (true before any).
    pub ok: bool,
    /// When the configuration in force was loaded.
    pub loaded_at: std::time::SystemTime,
    /// Keys waiting for a restart, by their names in the configuration file.
    pub restart_pending: Vec<&'static str>,
}

impl Default for ReloadStatus {
    fn default() -> Self {
        Self::taken(Vec::new())
    }
}

impl ReloadStatus {
    /// A configuration taken up now, with these keys waiting for a restart.
    pub fn taken(restart_pending: Vec<&'static str>) -> Self {
        Self { ok: true, loaded_at: std::time::SystemTime::now(), restart_pending }
    }

    /// The three series `PREFIX_config_*` in the Prometheus text format (`PREFIX`: `sendense_hub`,
    /// `sendense_node`).
    pub fn metrics(&self, prefix: &str) -> String {
        let at = self.loaded_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut out = format!(
            "# HELP {prefix}_config_last_reload_successful 0 when the last reload (SIGHUP) was refused: the file \
             does not check and the service runs on the configuration it had (alert on 0).\n\
             # TYPE {prefix}_config_last_reload_successful gauge\n{prefix}_config_last_reload_successful {}\n\
             # HELP {prefix}_config_last_reload_success_timestamp_seconds When the configuration in force was \
             loaded (Unix time): at start, or by the last reload taken up.\n\
             # TYPE {prefix}_config_last_reload_success_timestamp_seconds gauge\n\
             {prefix}_config_last_reload_success_timestamp_seconds {at:.3}\n\
             # HELP {prefix}_config_restart_pending 1 per configuration key the file changed that the running \
             service takes up only at its next start.\n# TYPE {prefix}_config_restart_pending gauge\n",
            u8::from(self.ok)
        );
        for key in &self.restart_pending {
            out.push_str(&format!("{prefix}_config_restart_pending{{key=\"{key}\"}} 1\n"));
        }
        out
    }
}
