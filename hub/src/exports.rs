//! The hub's NBD exports: one in-process [`nbd_server::Server`] serving every export, each on
//! its own leased port (the node's tunnel forwards port N to port N).
//!
//! Opening an export creates its listener before anything is promised to a caller, so a port
//! that cannot be bound is an error in the API's answer, never a "server disconnected" on the
//! node later. A node's tunnel channel to an export's port is served in process
//! ([`Exports::serve_channel`], through the endpoint's `LocalForward`) with the same scope as
//! the listener: the listener remains for nodes that connect over direct TCP. Closing stops its
//! listener, lets its clients finish for up to 30 s, cuts the ones that do not (a client that
//! stopped reading, in-process channels included), and flushes and closes the image. Opening and
//! closing wait for the disk on the blocking pool (reading an image's tables; `fsync`), never on a
//! runtime worker that NBD connections and SSH sessions share.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_server::{
    Backend, ExportConfig, ExportStats, FileBackend, IoRing, Qcow2Backend, Scope, SendBytes, Server, ServerConfig,
    TlsCredentials,
};
use qcow2::Image;

use crate::peers::Peers;

/// A forwarded channel's owned-bytes path, for the NBD server's read replies.
struct ChannelReplies(tunnel::endpoint::ForwardedSender);

impl SendBytes for ChannelReplies {
    fn send(&self, data: bytes::Bytes) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(self.0.send(data))
    }
}

/// How an export opens its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing written (restores).
    ReadOnly,
    /// Written by the node: a new image of a run.
    Write,
    /// Written again after a writer may have been cut: a run taken up after the hub was killed,
    /// a replica kept from earlier runs. A killed writer leaves clusters it had reserved and not
    /// used (leaked: space only, but `qemu-img check` reports them and exits 3); they are
    /// reclaimed first (`qcow2::ImageOptions::reclaim_leaks`, a read of the image's metadata),
    /// so what the run completes checks clean.
    Resume,
}

impl Access {
    fn read_only(self) -> bool {
        self == Self::ReadOnly
    }
}

/// How long closing waits for clients to drain.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

struct Open {
    port: u16,
    read_only: bool,
    /// Held to flush and close it directly when removing the export fails.
    backend: Arc<dyn Backend>,
    listener: tokio::task::JoinHandle<()>,
}

/// Every export of the hub.
pub struct Exports {
    server: Server,
    bind: IpAddr,
    /// Images opened with `O_DIRECT` (`cache = "none"`).
    direct_io: bool,
    /// The ring every export submits its I/O through (`aio = "io_uring"`).
    ring: Option<IoRing>,
    open: Mutex<HashMap<String, Open>>,
}

/// The backend of one export: a raw replica (`.raw`) as a plain file, everything else as a
/// qcow2 image (with its chain); `O_DIRECT` and the shared ring as configured.
fn open_backend(
    path: &std::path::Path,
    access: Access,
    direct_io: bool,
    ring: Option<&IoRing>,
) -> Result<Arc<dyn Backend>, String> {
    let read_only = access.read_only();
    if path.extension().is_some_and(|e| e == "raw") {
        let file = match direct_io {
            true => FileBackend::open_direct(path, read_only),
            false => FileBackend::open(path, read_only),
        };
        let file = file.map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        return Ok(Arc::new(match ring {
            Some(ring) => file.with_ring(ring),
            None => file,
        }));
    }
    let options =
        crate::repo::image_options(path, !read_only).direct_io(direct_io).reclaim_leaks(access == Access::Resume);
    let image = Image::open_with(path, &options).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let backend = Qcow2Backend::from_image(Arc::new(image));
    Ok(Arc::new(match ring {
        Some(ring) => backend.with_ring(ring),
        None => backend,
    }))
}

/// Let go of a backend that never served, on the blocking pool: the last drop of a writable
/// image closes it, which waits for the disk (`fsync`).
fn discard(backend: Arc<dyn Backend>) {
    drop(tokio::task::spawn_blocking(move || drop(backend)));
}

/// An export as `GET /api/v1/exports` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportView {
    /// Export name.
    pub name: String,
    /// TCP port.
    pub port: u16,
    /// Clients connected now.
    pub connections: usize,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// Read-only.
    pub read_only: bool,
}

impl Exports {
    /// Exports bound on `bind`, writing with `O_DIRECT` if `direct_io`, through one io_uring
    /// shared by all if `io_uring` (one thread for every export, not one each).
    ///
    /// # Errors
    /// `io_uring` asked for and refused by the kernel: the hub does not start.
    pub fn new(bind: IpAddr, direct_io: bool, io_uring: bool, tls: Option<TlsCredentials>) -> Result<Self, String> {
        let ring = match io_uring {
            true => Some(IoRing::new().map_err(|e| format!("aio = \"io_uring\": {e}"))?),
            false => None,
        };
        Ok(Self {
            server: Server::new(ServerConfig::default().tls(tls)),
            bind,
            direct_io,
            ring,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Open `image` as `name` on `port`, for TCP clients on this machine or at `peers`.
    ///
    /// # Errors
    /// The image cannot be opened, the name is taken, or the port cannot be bound.
    pub async fn open(
        &self,
        name: &str,
        port: u16,
        image_path: &std::path::Path,
        access: Access,
        peers: Peers,
    ) -> Result<(), String> {
        let (path, direct_io, ring) = (image_path.to_path_buf(), self.direct_io, self.ring.clone());
        let read_only = access.read_only();
        // Opening reads the image's tables (from the disk when they are cold): off the runtime.
        let backend = tokio::task::spawn_blocking(move || open_backend(&path, access, direct_io, ring.as_ref()))
            .await
            .map_err(|e| format!("cannot open {}: {e}", image_path.display()))??;
        let listener = match listen(self.bind, port).await {
            Ok(listener) => listener,
            Err(e) => {
                discard(backend);
                return Err(format!("cannot listen on {}:{port}: {e}", self.bind));
            }
        };
        let config = ExportConfig::new(name, Arc::clone(&backend))
            .read_only(read_only)
            .max_connections(10)
            .description(image_path.display().to_string());
        if let Err(e) = self.server.add_export(config) {
            discard(backend);
            return Err(format!("export {name}: {e}"));
        }
        let server = self.server.clone();
        let export = name.to_string();
        let task = tokio::spawn(async move {
            let scope = Scope::Only(export.clone());
            server.serve_tcp_admitting(listener, scope, |peer| peers.admit(peer, port, &export)).await
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(name.to_string(), Open { port, read_only, backend, listener: task });
        }
        tracing::info!(export = name, port, read_only, "export open");
        Ok(())
    }

    /// Close `name`: stop accepting, drain clients (with a deadline), flush. Returns its final
    /// counters when the drain finished in time.
    pub async fn close(&self, name: &str) -> Option<ExportStats> {
        let open = self.open.lock().ok().and_then(|mut o| o.remove(name))?;
        open.listener.abort();
        // Clients get the deadline to finish; then they are cut and the image is flushed.
        let stats = match self.server.remove_export_within(name, DRAIN_DEADLINE).await {
            Ok(stats) => Some(stats),
            Err(e) => {
                tracing::error!(export = name, error = %e, "closing the export failed");
                if !open.read_only {
                    if let Err(e) = open.backend.close().await {
                        tracing::error!(export = name, error = %e, "final flush failed");
                    }
                }
                None
            }
        };
        tracing::info!(export = name, port = open.port, "export closed");
        stats
    }

    /// What serves a tunnel channel to `port` in process: the export open on it now, seen by
    /// the channel alone as its listener's clients see it; `None` when no export is on `port`.
    pub fn serve_channel(&self, port: u16, peer: String) -> Option<tunnel::endpoint::LocalServe> {
        let name = self.open.lock().ok()?.iter().find(|(_, e)| e.port == port).map(|(n, _)| n.clone())?;
        let server = self.server.clone();
        Some(Box::new(move |stream| {
            // Read replies go into the channel without a copy (`nbd_server::zero_copy`).
            let replies: Arc<dyn SendBytes> = Arc::new(ChannelReplies(stream.sender()));
            Box::pin(async move { server.serve_stream_with_payloads(stream, Scope::Only(name), peer, replies).await })
        }))
    }

    /// Every open export.
    pub fn views(&self) -> Vec<ExportView> {
        let open =
            self.open.lock().map(|o| o.iter().map(|(n, e)| (n.clone(), e.port, e.read_only)).collect::<Vec<_>>());
        let mut out: Vec<ExportView> = open
            .unwrap_or_default()
            .into_iter()
            .map(|(name, port, read_only)| {
                let s = self.server.export_stats(&name).unwrap_or_default();
                ExportView {
                    name,
                    port,
                    connections: s.connections_active,
                    bytes_read: s.bytes_read,
                    bytes_written: s.bytes_written,
                    read_only,
                }
            })
            .collect();
        out.sort_by_key(|e| e.port);
        out
    }

    /// Clients connected to `name` now.
    pub fn connections(&self, name: &str) -> usize {
        self.server.export_stats(name).map(|s| s.connections_active).unwrap_or(0)
    }

    /// Stop everything (shutdown), every export at once: a stop waits for the slowest drain, not
    /// their sum (systemd's stop timeout would otherwise kill the hub before it hands its runs
    /// over). Returns the exports that did not close clean (the drain or the final flush failed,
    /// or another task was closing them).
    pub async fn shutdown(&self) -> Vec<String> {
        let names: Vec<String> = self.open.lock().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        let closed = futures_util::future::join_all(names.iter().map(|n| self.close(n))).await;
        names.into_iter().zip(closed).filter(|(_, stats)| stats.is_none()).map(|(n, _)| n).collect()
    }
}

/// Listen on `addr:port`, trying again for a moment while it is busy: a port leased as free can
/// still be held for an instant by a listener this process just closed (an export closed, its
/// task not yet dropped) or by a copy of one in a child another thread forked and has not yet
/// exec'd. A port some other program listens on stays busy and fails after the last try.
async fn listen(addr: std::net::IpAddr, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    const TRIES: u32 = 5;
    let mut tries = 1;
    loop {
        match tokio::net::TcpListener::bind((addr, port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < TRIES => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
            }
            bound => return bound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anyone() -> Peers {
        Peers::new("the test", [], crate::peers::LocalUsers::with(&[]))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_that_cannot_listen_or_whose_name_is_taken_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.qcow2");
        Image::create(&image, &qcow2::CreateOptions::new(1 << 20)).unwrap();
        let exports = Exports::new(IpAddr::from([127, 0, 0, 1]), false, false, None).unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let err = exports.open("d", busy, &image, Access::Write, anyone()).await.unwrap_err();
        assert!(err.contains("cannot listen"), "{err}");
        assert!(exports.views().is_empty(), "nothing half-open is listed");
        // The name was never taken: the same export opens on a free port.
        let port = testports::free_port();
        exports.open("d", port, &image, Access::Write, anyone()).await.unwrap();
        let second = testports::free_port();
        let err = exports.open("d", second, &image, Access::ReadOnly, anyone()).await.unwrap_err();
        assert!(err.contains("export d"), "{err}");
        let views = exports.views();
        assert!(views.len() == 1 && views[0].port == port && !views[0].read_only, "{views:?}");
        // Free once the listener is gone (here at once, unless a fork elsewhere in the test
        // process holds a copy of it for an instant).
        assert!(listen(IpAddr::from([127, 0, 0, 1]), second).await.is_ok(), "the refused export's port is free");
        assert!(exports.close("d").await.is_some());
        assert!(exports.views().is_empty());
    }

    /// The image a killed hub's run was writing: clusters reserved and filled by writes whose
    /// L2 entries never made it (the file grown over them; the image forgotten, never closed).
    fn image_cut_by_a_kill(path: &std::path::Path) {
        let image = Image::create(path, &qcow2::CreateOptions::new(16 << 20)).unwrap();
        image.write_at(&[7u8; 65536], 1 << 20).unwrap();
        image.flush().unwrap();
        std::mem::forget(image);
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(file.metadata().unwrap().len() + 4 * 65536).unwrap();
    }

    fn qemu_img_check(path: &std::path::Path) -> Option<i32> {
        let out = std::process::Command::new("qemu-img").arg("check").arg(path).output();
        out.expect("qemu-img is required; scripts/test.sh installs it").status.code()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_image_written_again_after_a_kill_has_its_leaks_reclaimed_and_checks_clean() {
        let dir = tempfile::tempdir().unwrap();
        let exports = Exports::new(IpAddr::from([127, 0, 0, 1]), false, false, None).unwrap();
        for (access, code) in [(Access::Write, Some(3)), (Access::Resume, Some(0))] {
            let image = dir.path().join(format!("{access:?}.qcow2"));
            image_cut_by_a_kill(&image);
            assert_eq!(qemu_img_check(&image), Some(3), "the kill leaves leaks");
            exports.open("d", testports::free_port(), &image, access, anyone()).await.unwrap();
            assert!(exports.close("d").await.is_some());
            assert_eq!(qemu_img_check(&image), code, "{access:?}");
        }
    }
}
