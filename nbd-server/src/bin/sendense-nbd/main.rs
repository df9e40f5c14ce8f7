//! `sendense-nbd`: serve a disk image over NBD with the command line of `qemu-nbd`.
//!
//! It takes the flags the old hub passed to qemu-nbd (`-f -x -p -b --shared -t -r -k
//! --pid-file FILE`), so it drops into the same command line, qemu's TLS credentials too
//! (`--object tls-creds-x509,... --tls-creds ID`, `objects.rs`), and adds `--demo` to serve a
//! fresh scratch image with no arguments at all. Failures (missing file, port in use, unsupported
//! format) are one line on stderr and exit status 1; the listener accepts as soon as it is bound,
//! and the pid file is written only then (whole, renamed into place), so "pid file exists" means
//! "ready" and whoever reads it reads the whole pid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

mod authz;
mod fnmatch;
mod objects;
use nbd_server::{Backend, ExportConfig, FileBackend, Qcow2Backend, Scope, Server, ServerConfig, Tuned, Tuning};
use qcow2::ImageOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Raw,
    Qcow2,
}

/// Serve a disk image over NBD (flags compatible with qemu-nbd).
#[derive(Debug, Parser)]
#[command(name = "sendense-nbd", version, about)]
struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
    format: Format,
    /// Export name clients ask for.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Offer the qcow2 image's persistent dirty bitmap NAME as the `qemu:dirty-bitmap:NAME`
    /// metadata context (qemu-nbd's -B; repeat for more, up to 64); needs -f qcow2 and -r (a
    /// writable export keeps no bitmap), and bitmaps qemu does not have open for writing.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// Export description shown by nbdinfo.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Address to bind (loopback by default: NBD reaches the hub through the tunnel).
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Clients allowed at once; more get a clear error (qemu-nbd's default is 1).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Write the process id here once listening.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Cache mode as qemu-nbd names it: writeback (the page cache, flushes honoured; the
    /// default), unsafe (flush and FUA do nothing) or none (O_DIRECT for guest data, raw and
    /// qcow2: nothing of the disk left in the page cache). directsync/writethrough are refused.
    #[arg(long = "cache", value_enum, default_value = "writeback")]
    cache: CacheMode,
    /// Asynchronous I/O as qemu-nbd names it: threads (the default: each connection's worker
    /// calls pread/pwrite) or io_uring (one ring per export: raw images' reads, writes and
    /// flushes; qcow2 images' write data and the reads the page cache cannot serve). native
    /// (Linux AIO) is refused.
    #[arg(long = "aio", value_enum, default_value = "threads")]
    aio: AioMode,
    /// TRIM: unmap (punch holes, the default here) or ignore/off (not offered).
    #[arg(long = "discard", value_enum, default_value = "unmap")]
    discard: DiscardMode,
    /// Define an object, as qemu-nbd does: TLS credentials,
    /// `tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]` (DIR holds
    /// ca-cert.pem, server-cert.pem, server-key.pem; verify-peer=on, the default, requires a
    /// client certificate the CA signed), or who of those clients may connect:
    /// `authz-simple,id=ID,identity=DN`, `authz-list,id=ID,policy=deny,rules.0.match=M,rules.0.policy=allow[,rules.0.format=glob]`,
    /// `authz-listfile,id=ID,filename=FILE.json[,refresh=on|off]`. Repeatable.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Require TLS of every client, with the credentials of the --object of this id.
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Admit only the TLS clients the authz object of this id allows, by their certificate's
    /// subject (as qemu-nbd's --tls-authz; needs --tls-creds with verify-peer=on).
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    /// Serve a fresh 1 GiB sparse scratch image (in a temporary directory) as export "demo".
    #[arg(long)]
    demo: bool,
    /// The image to serve.
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CacheMode {
    Writeback,
    Unsafe,
    None,
    Directsync,
    Writethrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AioMode {
    Threads,
    Native,
    #[value(name = "io_uring")]
    IoUring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiscardMode {
    Unmap,
    On,
    Ignore,
    Off,
}

/// What the cache/aio/discard flags ask for, or a clear refusal of what is not implemented:
/// accepting a mode and doing something else would be a lie about durability or memory.
fn tuning(args: &Args) -> anyhow::Result<Tuning> {
    match (args.cache, args.format) {
        (CacheMode::Writeback | CacheMode::Unsafe | CacheMode::None, _) => {}
        (other, _) => bail!(
            "--cache={} is not implemented (write-through); use writeback, none or unsafe",
            format!("{other:?}").to_lowercase()
        ),
    }
    match (args.aio, args.format) {
        (AioMode::Threads | AioMode::IoUring, _) => {}
        (AioMode::Native, _) => bail!("--aio=native (Linux AIO) is not implemented; use threads or io_uring"),
    }
    Ok(Tuning::default()
        .skip_flush(args.cache == CacheMode::Unsafe)
        .no_trim(matches!(args.discard, DiscardMode::Ignore | DiscardMode::Off)))
}

fn open_backend(args: &Args, path: &Path) -> anyhow::Result<Arc<dyn Backend>> {
    let tuning = tuning(args)?;
    match args.format {
        Format::Raw => {
            if let Some(name) = args.bitmaps.first() {
                bail!("-B {name}: a raw image has no bitmaps (-f qcow2)");
            }
            let mut b = if args.cache == CacheMode::None {
                FileBackend::open_direct(path, args.read_only)
            } else {
                FileBackend::open(path, args.read_only)
            }
            .with_context(|| format!("cannot open '{}'", path.display()))?;
            if args.aio == AioMode::IoUring {
                b = b.with_io_uring().context("--aio=io_uring")?;
            }
            Ok(Arc::new(Tuned::new(b, tuning)))
        }
        Format::Qcow2 => {
            // Before the image is opened: a writable open invalidates its bitmaps, and a refused
            // command line must leave them as they were.
            if let Some(name) = args.bitmaps.first().filter(|_| !args.read_only) {
                bail!("-B {name}: sendense-nbd keeps no bitmap up to date on writes; export the image read-only (-r)");
            }
            let options = ImageOptions::default().writable(!args.read_only).direct_io(args.cache == CacheMode::None);
            let mut b = Qcow2Backend::open_with(path, &options)
                .with_context(|| format!("cannot open '{}' as qcow2", path.display()))?;
            for name in &args.bitmaps {
                b.trusted_bitmap(name).map_err(|e| anyhow::anyhow!("-B {name}: {e}"))?;
            }
            if args.aio == AioMode::IoUring {
                b = b.with_io_uring().context("--aio=io_uring")?;
            }
            Ok(Arc::new(Tuned::new(b, tuning)))
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = UNITS[0];
    for u in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    let _demo_dir;
    let path = match (&args.file, args.demo) {
        (Some(p), false) => p.clone(),
        (None, true) => {
            let dir = tempfile_dir()?;
            let p = dir.path().join("demo.raw");
            FileBackend::create(&p, 1 << 30).with_context(|| format!("cannot create '{}'", p.display()))?;
            if args.export_name.is_empty() {
                args.export_name = "demo".into();
            }
            args.persistent = true;
            args.shared = args.shared.max(4);
            _demo_dir = dir;
            p
        }
        (Some(_), true) => bail!("--demo serves its own scratch image; drop the FILE argument"),
        (None, false) => {
            bail!("expected exactly one image FILE (or --demo to serve a scratch image)")
        }
    };
    let tls = objects::tls_credentials(&args.objects, args.tls_creds.as_deref(), args.tls_authz.as_deref())?;
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let backend = open_backend(&args, &path)?;
    let size = backend.size();
    let server = Server::new(ServerConfig::default().tls(tls));
    let name = args.export_name.clone();
    server.add_export(
        ExportConfig::new(name.clone(), backend)
            .description(args.description.clone())
            .read_only(args.read_only)
            .max_connections(args.shared)
            .bitmaps(args.bitmaps.clone()),
    )?;

    let serving = match &args.socket {
        Some(sock) => {
            remove_stale_socket(sock)?;
            let listener = tokio::net::UnixListener::bind(sock)
                .with_context(|| format!("cannot listen on '{}'", sock.display()))?;
            // Only this user may connect: the socket is the export, with write access.
            std::fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("cannot restrict '{}' to its owner", sock.display()))?;
            let s = server.clone();
            let scope = Scope::Only(name.clone());
            tracing::info!(export = %name, size, socket = %sock.display(), tls = (scheme == "nbds"), "listening");
            tokio::spawn(async move { s.serve_unix(listener, scope).await })
        }
        None => {
            let addr = format!("{}:{}", args.bind, args.port);
            let listener =
                tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let s = server.clone();
            let scope = Scope::Only(name.clone());
            let url = format!("{scheme}://{}:{}/{}", args.bind, args.port, name);
            tracing::info!(export = %name, size, %url, "listening");
            if args.demo {
                eprintln!(
                    "sendense-nbd: serving a fresh {} scratch image as {url}\n  try:  nbdinfo {url}\n        qemu-img info {url}\n  Ctrl-C stops it.",
                    human(size)
                );
            }
            tokio::spawn(async move { s.serve_tcp(listener, scope).await })
        }
    };
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file)?;
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let last_client_left = async {
        if args.persistent {
            return std::future::pending::<()>().await;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(s) = server.export_stats(&name) {
                if s.connections_total > 0 && s.connections_active == 0 {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = sigterm.recv() => tracing::info!("terminated; shutting down"),
        _ = last_client_left => tracing::info!("last client disconnected; exiting"),
    }
    let result = server.shutdown().await;
    let _ = serving.await;
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    if let Some(sock) = &args.socket {
        let _ = remove_stale_socket(sock);
    }
    result.context("final flush failed")?;
    Ok(())
}

/// A socket left by an earlier run is removed; anything else at that path (a file, a symlink
/// someone planted) is an error, never deleted.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("cannot remove the old socket '{}'", path.display()))
        }
        Ok(_) => bail!("'{}' exists and is not a socket; not removing it", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect '{}'", path.display())),
    }
}

/// Write the pid file 0644 without following a symlink: a regular file left by an earlier run is
/// replaced, a symlink or anything else at the path is refused.
fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            bail!("pid file '{}' exists and is not a regular file; refusing to write through it", path.display())
        }
        _ => {}
    }
    // Written whole beside it, then renamed into place: whoever finds the file reads the whole
    // pid, never an empty or half-written file, and a rename replaces a name, never writes
    // through whatever it pointed at.
    let cannot = || format!("cannot write pid file '{}'", path.display());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".sendense-nbd-pid").tempfile_in(dir).with_context(cannot)?;
    writeln!(tmp, "{}", std::process::id()).with_context(cannot)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).with_context(cannot)?;
    tmp.persist(path).map_err(|e| e.error).with_context(cannot)?;
    Ok(())
}

/// The demo's scratch directory: a fresh, unpredictable name (mode 0700), removed on exit.
fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("sendense-nbd-demo-").tempdir().context("cannot create a scratch directory")
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = nbd_server::descriptors::raise_limit() {
        tracing::warn!(error = %e, "cannot raise the limit on open descriptors");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sendense-nbd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("sendense-nbd: {e:#}");
        std::process::exit(1);
    }
}
