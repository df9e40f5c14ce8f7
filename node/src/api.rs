//! The node API's wire types and a typed client for it: what the hub links to call the node
//! (through the reverse channel, `http://127.0.0.1:9081`), and what the node's handlers answer.
//!
//! Shapes follow `DESIGN.md` ("Hub and node contracts"); they are plain serde structs so the
//! server and the client cannot drift apart. Errors are `{"error", "code"}` with a fitting
//! status; the client turns them into [`ApiError::Status`] with both parts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What kind of thing a disk's source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A regular (raw) file.
    File,
    /// A block device.
    Block,
    /// An NBD server.
    Nbd,
}

/// How a disk is laid out in its file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The disk's bytes as they are (also what every NBD source exports).
    Raw,
    /// A qcow2 image (and its backing chain) holding the disk: libvirt's usual disk file, or
    /// the base an external snapshot leaves behind.
    Qcow2,
}

impl DiskFormat {
    /// The name in configs and answers.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk key (unit number + 2000).
    pub key: u32,
    /// Size in bytes (of the disk: a qcow2 image's virtual size).
    pub size: u64,
    /// Source kind.
    pub source_kind: SourceKind,
    /// How the source holds the disk (absent from older nodes: raw).
    #[serde(default = "raw")]
    pub format: DiskFormat,
    /// Why the disk could not be looked at (in the list of every VM only; `size` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn raw() -> DiskFormat {
    DiskFormat::Raw
}

/// A VM and its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Disks in key order.
    pub disks: Vec<DiskInfo>,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Every block into a fresh image.
    Full,
    /// Only what changed since the last committed run.
    Incremental,
}

/// `POST /api/v1/backup/start` and `POST /api/v1/replicate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// VM name.
    pub vm_name: String,
    /// Host to dial instead of the one in each target URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_host: Option<String>,
    /// `KEY:nbd://HOST:PORT/EXPORT,...`.
    pub nbd_targets: String,
    /// The caller's id for this job.
    pub job_id: String,
    /// Full or incremental.
    pub backup_type: BackupType,
}

/// `POST /api/v1/restore/start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The caller's id for this job.
    pub job_id: String,
    /// The hub's read-only exports.
    pub nbd_targets: String,
    /// Disk key -> file or block device to write.
    pub destinations: BTreeMap<String, String>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Copying.
    Running,
    /// Every disk copied and flushed.
    Completed,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by a cancel.
    Cancelled,
}

impl JobStatus {
    /// True once the job can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }

    /// As in the API (`running`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Answer to a start call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartResponse {
    /// Job id.
    pub job_id: String,
    /// Its state.
    pub status: JobStatus,
}

/// How a disk is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// Every block.
    Full,
    /// Only changed blocks.
    Incremental,
}

/// One disk of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Disk key.
    pub key: u32,
    /// Full or incremental.
    pub mode: CopyMode,
    /// Why a full copy was made where an incremental was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
    /// How changes were found: `bitmap`, `hashes`, or `none` for a full copy.
    #[serde(default)]
    pub change_source: String,
    /// Disk size.
    pub bytes_total: u64,
    /// Read from the source.
    pub bytes_read: u64,
    /// Sent as data.
    pub bytes_sent: u64,
    /// Holes, not read.
    pub bytes_skipped_holes: u64,
    /// All-zero blocks, not sent as data.
    pub bytes_skipped_zero: u64,
    /// Equal to the last committed run, not sent.
    pub bytes_unchanged: u64,
    /// Disk bytes dealt with per second.
    pub rate_bps: u64,
    /// Seconds left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// `pending`, `running`, `completed`, `failed`, `cancelled`; `paused` while a stopping node hands it over.
    pub status: String,
    /// Disk checksum (`blake3-blocks/BLOCK:HEX`) of the whole disk as the target now holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Connections re-made during the copy.
    #[serde(default)]
    pub reconnects: u64,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DiskStatus {
    /// The status of a disk whose state could not be read.
    pub fn lost(key: u32) -> Self {
        Self {
            key,
            mode: CopyMode::Full,
            mode_reason: None,
            change_source: String::new(),
            bytes_total: 0,
            bytes_read: 0,
            bytes_sent: 0,
            bytes_skipped_holes: 0,
            bytes_skipped_zero: 0,
            bytes_unchanged: 0,
            rate_bps: 0,
            eta_s: None,
            status: "failed".into(),
            checksum: None,
            reconnects: 0,
            error: Some("disk state lost".into()),
        }
    }

    /// Disk bytes settled: sent, skipped as holes or zeroes, or unchanged. Summed without
    /// overflowing: the counters come over the network, from a node the hub does not trust to
    /// count right.
    pub fn bytes_settled(&self) -> u64 {
        [self.bytes_sent, self.bytes_skipped_holes, self.bytes_skipped_zero, self.bytes_unchanged]
            .into_iter()
            .fold(0, u64::saturating_add)
    }

    /// Every counter that moves while the copy does: what was read and what was settled.
    pub fn bytes_moving(&self) -> u64 {
        self.bytes_read.saturating_add(self.bytes_settled())
    }
}

/// `GET /api/v1/backup/{job_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// Job id.
    pub job_id: String,
    /// `backup`, `replicate` or `restore`.
    pub kind: String,
    /// VM name (empty for restores).
    pub vm_name: String,
    /// State.
    pub status: JobStatus,
    /// Whether `commit` has been done.
    #[serde(default)]
    pub committed: bool,
    /// Disks in key order.
    pub disks: Vec<DiskStatus>,
    /// What stopped the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /api/v1/tunnel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    /// Whether a tunnel is configured.
    pub enabled: bool,
    /// Whether it is up now.
    pub connected: bool,
    /// Hub `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Seconds since the connection came up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_for_s: Option<u64>,
    /// Reconnects so far.
    pub reconnects: u64,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Forwarded connections open.
    pub open_channels: u64,
    /// Bytes towards the hub.
    pub bytes_to_hub: u64,
    /// Bytes from the hub.
    pub bytes_from_hub: u64,
    /// SSH connections up now (forwarded connections are spread over them).
    #[serde(default)]
    pub ssh_connections: usize,
    /// `off`, `connecting`, `up`, `retrying` (transient failure), `refused` (host key mismatch
    /// or our key refused: needs the operator), `stopped`.
    #[serde(default)]
    pub state: String,
}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable.
    pub error: String,
    /// Machine-readable (`bad_request`, `not_found`, `conflict`, `unauthorized`...).
    pub code: String,
}

/// Failures of [`NodeClient`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The node could not be reached (the message carries every cause: a refused certificate
    /// says so, where reqwest's own says only that sending failed).
    #[error("node unreachable at {url}: {}", causes(.source))]
    Unreachable {
        /// URL called.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The node answered with an error.
    #[error("node answered {status} ({code}): {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// `code` of the body.
        code: String,
        /// `error` of the body.
        message: String,
    },
    /// The CA certificates to check an `https://` node with do not load.
    #[error("{path}: cannot check the node's certificate with it: {reason}")]
    Authority {
        /// The CA file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The client certificate to present to nodes does not load.
    #[error("{path}: cannot present it to nodes as the hub's certificate: {reason}")]
    Identity {
        /// The certificate (or key) file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The answer was not what the contract says.
    #[error("node answered something unexpected from {url}: {reason}")]
    Malformed {
        /// URL called.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// The most of an answer [`NodeClient`] takes in (16 MiB): a node's answers are a few KiB (a
/// job's view) to a few MiB (thousands of VMs); past this, one that sends without end (broken,
/// or not what it claims to be) fails the call instead of filling the hub's memory.
pub const MAX_ANSWER: usize = 16 << 20;
/// Characters of an error answer that is not the API's JSON kept in [`ApiError::Status`].
const MAX_ERROR_TEXT: usize = 1024;

/// `resp`'s body, at most [`MAX_ANSWER`] bytes of it.
async fn answer(mut resp: reqwest::Response, url: &str) -> Result<Vec<u8>, ApiError> {
    let too_long = |what: String| ApiError::Malformed { url: url.to_string(), reason: format!("{what}: refused") };
    if let Some(length) = resp.content_length().filter(|n| *n > MAX_ANSWER as u64) {
        return Err(too_long(format!("an answer of {length} bytes, more than the {MAX_ANSWER} taken")));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|source| ApiError::Unreachable { url: url.to_string(), source })?
    {
        if bytes.len() + chunk.len() > MAX_ANSWER {
            return Err(too_long(format!("an answer longer than the {MAX_ANSWER} bytes taken")));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// `error`, then each error under it, joined by `: `.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut under = error.source();
    while let Some(e) = under {
        text.push_str(": ");
        text.push_str(&e.to_string());
        under = e.source();
    }
    text
}

/// The CA certificates of `ca_file` (PEM), at least one.
fn ca_roots(ca_file: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ApiError> {
    let authority = |reason: String| ApiError::Authority { path: ca_file.to_path_buf(), reason };
    let pem = std::fs::read(ca_file).map_err(|e| authority(e.to_string()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| authority(e.to_string()))?;
    if roots.is_empty() {
        return Err(authority("no certificate in it".into()));
    }
    Ok(roots)
}

/// `dir`'s client certificate and key (qemu's layout), if it holds them.
fn client_identity(dir: &std::path::Path) -> Result<Option<reqwest::Identity>, ApiError> {
    use nbd_server::tls::{CLIENT_CERT, CLIENT_KEY};
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    let identity = |path: &std::path::Path, reason: String| ApiError::Identity { path: path.to_path_buf(), reason };
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, true) => {
            let mut pem = std::fs::read(&key).map_err(|e| identity(&key, e.to_string()))?;
            pem.push(b'\n');
            pem.extend(std::fs::read(&cert).map_err(|e| identity(&cert, e.to_string()))?);
            reqwest::Identity::from_pem(&pem).map(Some).map_err(|e| identity(&cert, causes(&e)))
        }
        (true, false) => Err(identity(&key, format!("missing: {CLIENT_CERT} and {CLIENT_KEY} go together"))),
        (false, true) => Err(identity(&cert, format!("missing: {CLIENT_CERT} and {CLIENT_KEY} go together"))),
    }
}

/// A typed client of the node API.
#[derive(Debug, Clone)]
pub struct NodeClient {
    base: String,
    token: Option<String>,
    http: Http,
}

/// A [`NodeClient`]'s HTTP client: built once, or, for [`NodeClient::with_tls_dir`], built again
/// when the directory's files change, so a renewed client certificate (or CA) is presented from
/// the next call on.
#[derive(Debug, Clone)]
enum Http {
    Fixed(reqwest::Client),
    Renewing(Arc<RenewingTls>),
}

/// The files a [`NodeClient::with_tls_dir`] client is built from, and the client of the moment.
#[derive(Debug)]
struct RenewingTls {
    dir: std::path::PathBuf,
    built: Mutex<(nbd_server::tls::FilesStamp<4>, reqwest::Client)>,
}

impl RenewingTls {
    const FILES: [&'static str; 4] =
        [nbd_server::tls::CA_CERT, nbd_server::tls::CA_CRL, nbd_server::tls::CLIENT_CERT, nbd_server::tls::CLIENT_KEY];

    /// The client for the next call: built again if the files changed; when the new files do
    /// not load, the last good client goes on (logged once per change).
    fn client(&self, base: &str) -> reqwest::Client {
        let mut built = self.built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = nbd_server::tls::files_stamp(&self.dir, Self::FILES);
        if now != built.0 {
            match tls_dir_client(base, &self.dir) {
                Ok(fresh) => {
                    tracing::info!(dir = %self.dir.display(), "client certificate read again: its files changed");
                    built.1 = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, "client certificate changed but does not load: the last one goes on")
                }
            }
            built.0 = now;
        }
        built.1.clone()
    }
}

/// An HTTP client for `base` checking its certificate against `dir`'s CA and presenting `dir`'s
/// client certificate if it holds one (qemu's layout: `ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`); also what `sendense-hub`'s commands reach a hub's HTTPS API with.
///
/// # Errors
/// The CA or the client certificate does not load, or the client cannot be built.
pub fn tls_dir_client(base: &str, dir: &std::path::Path) -> Result<reqwest::Client, ApiError> {
    let roots = ca_roots(&dir.join(nbd_server::tls::CA_CERT))?;
    http_client_with(base, Some(roots), client_identity(dir)?, revocation_lists(dir)?)
}

/// The lists of `dir`'s `ca-crl.pem`, none without one (`nbd_server::tls`: honoured wherever the
/// layout is read). reqwest's verifier also refuses a certificate whose issuer no list here
/// covers, which the NBD side (GnuTLS's rule) lets through: stricter, never looser.
fn revocation_lists(dir: &std::path::Path) -> Result<Vec<reqwest::tls::CertificateRevocationList>, ApiError> {
    let path = dir.join(nbd_server::tls::CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let authority = |reason: String| ApiError::Authority { path: path.clone(), reason };
    let pem = std::fs::read(&path).map_err(|e| authority(e.to_string()))?;
    let lists = reqwest::tls::CertificateRevocationList::from_pem_bundle(&pem).map_err(|e| authority(causes(&e)))?;
    if lists.is_empty() {
        return Err(authority("no certificate revocation list in it".into()));
    }
    Ok(lists)
}

/// The HTTP client of a [`NodeClient`]: timeouts, and the roots and identity given.
fn http_client(
    base: &str,
    roots: Option<Vec<reqwest::Certificate>>,
    identity: Option<reqwest::Identity>,
) -> Result<reqwest::Client, ApiError> {
    http_client_with(base, roots, identity, Vec::new())
}

/// As [`http_client`], certificates also checked against revocation `lists` (with `roots` only).
fn http_client_with(
    base: &str,
    roots: Option<Vec<reqwest::Certificate>>,
    identity: Option<reqwest::Identity>,
    lists: Vec<reqwest::tls::CertificateRevocationList>,
) -> Result<reqwest::Client, ApiError> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        // Below the 60 s an API gives an idle connection (`crate::api_server::Limits`).
        .pool_idle_timeout(Duration::from_secs(20));
    if let Some(roots) = roots {
        builder = builder.tls_certs_only(roots).tls_crls_only(lists);
    }
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder.build().map_err(|source| ApiError::Unreachable { url: base.to_string(), source })
}

impl NodeClient {
    /// For `base` (`http://127.0.0.1:9081`), with a bearer token if the node wants one; an
    /// `https://` base's certificate is checked against the system's roots.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Result<Self, ApiError> {
        Self::build(base.into(), token, None, None)
    }

    /// As [`NodeClient::new`], an `https://` base's certificate checked against the CA
    /// certificates in `ca_file` (PEM) instead of the system's roots: the hub's `api_tls`
    /// directory's `ca-cert.pem`.
    ///
    /// # Errors
    /// `ca_file` does not load, or the HTTP client could not be built.
    pub fn with_ca(
        base: impl Into<String>,
        token: Option<String>,
        ca_file: &std::path::Path,
    ) -> Result<Self, ApiError> {
        Self::build(base.into(), token, Some(ca_roots(ca_file)?), None)
    }

    /// As [`NodeClient::with_ca`] with `dir`'s `ca-cert.pem`, presenting `dir`'s
    /// `client-cert.pem` (with `client-key.pem`) to a node that asks for a client certificate
    /// (its `api_client_certs`) when the directory holds one: the hub's `api_tls` directory.
    /// The three files are looked at again at each call and read again when one changed, so a
    /// certificate renewed in place is presented from the next call on (one that does not load
    /// is logged, and the last good one goes on).
    ///
    /// # Errors
    /// The CA or the client certificate does not load (one of the pair alone is an error), or
    /// the HTTP client could not be built.
    pub fn with_tls_dir(
        base: impl Into<String>,
        token: Option<String>,
        dir: &std::path::Path,
    ) -> Result<Self, ApiError> {
        let base = base.into().trim_end_matches('/').to_string();
        let stamp = nbd_server::tls::files_stamp(dir, RenewingTls::FILES);
        let http = tls_dir_client(&base, dir)?;
        let renewing = RenewingTls { dir: dir.to_path_buf(), built: Mutex::new((stamp, http)) };
        Ok(Self { base, token, http: Http::Renewing(Arc::new(renewing)) })
    }

    fn build(
        base: String,
        token: Option<String>,
        roots: Option<Vec<reqwest::Certificate>>,
        identity: Option<reqwest::Identity>,
    ) -> Result<Self, ApiError> {
        let base = base.trim_end_matches('/').to_string();
        let http = http_client(&base, roots, identity)?;
        Ok(Self { base, token, http: Http::Fixed(http) })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let http = match &self.http {
            Http::Fixed(client) => client.clone(),
            Http::Renewing(renewing) => renewing.client(&self.base),
        };
        let mut req = http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| ApiError::Unreachable { url: url.clone(), source })?;
        let status = resp.status();
        let bytes = answer(resp, &url).await?;
        if !status.is_success() {
            let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            return Err(ApiError::Status {
                status: status.as_u16(),
                code: body.as_ref().map(|b| b.code.clone()).unwrap_or_default(),
                message: body.map(|b| b.error).unwrap_or_else(|| {
                    let text = String::from_utf8_lossy(&bytes);
                    text.chars().take(MAX_ERROR_TEXT).collect()
                }),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Malformed { url, reason: e.to_string() })
    }

    /// `GET /api/v1/vms`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn vms(&self) -> Result<Vec<VmInfo>, ApiError> {
        self.call(reqwest::Method::GET, "/api/v1/vms", None::<&()>).await
    }

    /// `GET /api/v1/vms/{name}`.
    ///
    /// # Errors
    /// See [`ApiError`] (404 for an unknown VM).
    pub async fn vm(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.call(reqwest::Method::GET, &format!("/api/v1/vms/{name}"), None::<&()>).await
    }

    /// `POST /api/v1/backup/start`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn start_backup(&self, req: &StartRequest) -> Result<StartResponse, ApiError> {
        self.call(reqwest::Method::POST, "/api/v1/backup/start", Some(req)).await
    }

    /// `POST /api/v1/replicate`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn replicate(&self, req: &StartRequest) -> Result<StartResponse, ApiError> {
        self.call(reqwest::Method::POST, "/api/v1/replicate", Some(req)).await
    }

    /// `POST /api/v1/restore/start`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn start_restore(&self, req: &RestoreRequest) -> Result<StartResponse, ApiError> {
        self.call(reqwest::Method::POST, "/api/v1/restore/start", Some(req)).await
    }

    /// `GET /api/v1/backup/{job_id}`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn job(&self, job_id: &str) -> Result<JobView, ApiError> {
        self.call(reqwest::Method::GET, &format!("/api/v1/backup/{job_id}"), None::<&()>).await
    }

    /// `DELETE /api/v1/backup/{job_id}`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn cancel(&self, job_id: &str) -> Result<JobView, ApiError> {
        self.call(reqwest::Method::DELETE, &format!("/api/v1/backup/{job_id}"), None::<&()>).await
    }

    /// `POST /api/v1/backup/{job_id}/commit`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn commit(&self, job_id: &str) -> Result<JobView, ApiError> {
        self.call(reqwest::Method::POST, &format!("/api/v1/backup/{job_id}/commit"), None::<&()>).await
    }

    /// `GET /api/v1/tunnel`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn tunnel(&self) -> Result<TunnelView, ApiError> {
        self.call(reqwest::Method::GET, "/api/v1/tunnel", None::<&()>).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every request on one connection with `head` and then `chunk`
    /// again and again until the client goes.
    async fn endless(head: &'static str, chunk: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = s.read(&mut request).await;
            let _ = s.write_all(head.as_bytes()).await;
            while s.write_all(&chunk).await.is_ok() {}
        });
        url
    }

    #[tokio::test]
    async fn an_answer_past_the_limit_fails_the_call_without_being_taken_in() {
        // Said to be too long: refused before its body.
        let url = endless("HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n", vec![b' '; 1 << 16]).await;
        let err = NodeClient::new(url, None).unwrap().vms().await.unwrap_err();
        assert!(err.to_string().contains("99999999999 bytes, more than the 16777216"), "{err}");
        // Chunked without end: refused once past it.
        let mut chunk = format!("{:x}\r\n", 1 << 16).into_bytes();
        chunk.extend(std::iter::repeat_n(b' ', 1 << 16));
        chunk.extend_from_slice(b"\r\n");
        let url = endless("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", chunk).await;
        let err = NodeClient::new(url, None).unwrap().vms().await.unwrap_err();
        assert!(
            matches!(err, ApiError::Malformed { .. }) && err.to_string().contains("longer than the 16777216 bytes"),
            "{err}"
        );
    }

    #[test]
    fn counters_a_node_reports_are_summed_without_overflowing() {
        let mut d = DiskStatus::lost(2000);
        (d.bytes_read, d.bytes_sent, d.bytes_skipped_holes, d.bytes_skipped_zero, d.bytes_unchanged) = (1, 2, 3, 4, 5);
        assert_eq!((d.bytes_settled(), d.bytes_moving()), (14, 15));
        d.bytes_unchanged = u64::MAX;
        assert_eq!((d.bytes_settled(), d.bytes_moving()), (u64::MAX, u64::MAX));
    }
}
