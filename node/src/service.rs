//! What both service binaries (`sendense-node`, `sendense-hub`) do around their work: logging to
//! stderr (`RUST_LOG`, default `info`), a multi-threaded runtime, one line on stderr and exit
//! status 1 for an error, and the shutdown signal (Ctrl-C or SIGTERM, as systemd sends).

use std::fmt::Display;
use std::future::Future;

/// Run `work` on a fresh runtime; on error print `NAME: error` (with its causes) and exit 1.
pub fn run<E: Display>(name: &str, work: impl Future<Output = Result<(), E>>) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
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
