//! The node's HTTP API (axum): VMs, backup/replicate/restore jobs, commit, tunnel status,
//! `/healthz` and `/metrics`.
//!
//! Every answer is JSON; every error is `{"error", "code"}` with 400/401/404/405/409/503, including
//! malformed bodies (axum's own rejections are rewritten). With a token configured, every call
//! but `/healthz` needs `Authorization: Bearer TOKEN`; the comparison does not stop at the first
//! differing byte. Bodies are capped at 1 MiB.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::{DiskInfo, ErrorBody, JobStatus, RestoreRequest, StartRequest, StartResponse, TunnelView, VmInfo};
use crate::config::Vm;
use crate::jobs::{JobError, JobKind, Jobs};
use crate::source::probe_size;

/// What the handlers share.
pub struct AppState {
    /// Jobs and settings.
    pub jobs: Arc<Jobs>,
    /// The tunnel, when configured.
    pub tunnel: Option<tunnel::Tunnel>,
}

/// An API error.
#[derive(Debug)]
pub struct ApiErr(StatusCode, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let code = match self.0 {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "error",
        };
        (self.0, Json(ErrorBody { error: self.1, code: code.into() })).into_response()
    }
}

impl From<JobError> for ApiErr {
    fn from(e: JobError) -> Self {
        let status = match e {
            JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Conflict(_) => StatusCode::CONFLICT,
        };
        Self(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiErr {
    fn from(e: JsonRejection) -> Self {
        Self(StatusCode::BAD_REQUEST, bad_body(&e))
    }
}

/// Why a request's JSON body was refused, for its 400 (the hub's API too). A body sent without
/// its content type (`curl -d` sends a form's) is named with what fixes it.
pub fn bad_body(e: &JsonRejection) -> String {
    match e {
        JsonRejection::MissingJsonContentType(_) => {
            "bad request body: send it as JSON, with `Content-Type: application/json` (`curl --json BODY URL`)".into()
        }
        _ => format!("bad request body: {}", e.body_text()),
    }
}

type Answer<T> = Result<Json<T>, ApiErr>;

/// A path parameter (a VM name, a job id), refused as a JSON error like the API's others, not
/// as axum's plain text (an id whose `%`-escapes are not UTF-8).
struct Param(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Param {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiErr> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Self(p))
            .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, format!("bad path: {}", e.body_text())))
    }
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/vms", get(list_vms))
        .route("/api/v1/vms/{name}", get(get_vm))
        .route("/api/v1/backup/start", post(start_backup))
        .route("/api/v1/replicate", post(start_replicate))
        .route("/api/v1/restore/start", post(start_restore))
        .route("/api/v1/backup/{job_id}", get(get_job).delete(cancel_job))
        .route("/api/v1/backup/{job_id}/commit", post(commit_job))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/tunnel", get(tunnel_status))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .merge(api)
        .fallback(|| async { ApiErr(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiErr(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method (see Allow)".into())
        })
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.jobs.settings().token {
        if !bearer_matches(&headers, token) {
            return ApiErr(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".into()).into_response();
        }
    }
    next.run(request).await
}

/// Whether `headers` carry `Authorization: Bearer TOKEN` with `token`, compared in constant time
/// (no early exit that would tell a caller how much of a guess was right). The hub's API checks
/// its token with it too.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A VM's disks as they are now. A disk that cannot be looked at (its snapshot not there yet, a
/// format not stated) is 503 for the VM alone, which the hub asks before a backup and must not
/// size from a guess; in the whole list it carries its `error` instead (size 0), so one VM's
/// trouble hides no other VM and the operator sees every one at once.
async fn describe(vm: &Vm, tolerate: bool) -> Result<VmInfo, ApiErr> {
    let mut disks = Vec::with_capacity(vm.disks.len());
    for d in &vm.disks {
        let (size, error) = match probe_size(&d.source).await {
            Ok(size) => (size, None),
            Err(e) if tolerate => (0, Some(e.to_string())),
            Err(e) => {
                return Err(ApiErr(StatusCode::SERVICE_UNAVAILABLE, format!("VM {} disk {}: {e}", vm.name, d.key)))
            }
        };
        disks.push(DiskInfo { key: d.key, size, source_kind: d.source.kind_hint(), format: d.source.format(), error });
    }
    Ok(VmInfo { name: vm.name.clone(), disks })
}

async fn list_vms(State(s): State<Arc<AppState>>) -> Answer<Vec<VmInfo>> {
    let mut out = Vec::new();
    for vm in &s.jobs.settings().vms {
        out.push(describe(vm, true).await?);
    }
    Ok(Json(out))
}

async fn get_vm(State(s): State<Arc<AppState>>, Param(name): Param) -> Answer<VmInfo> {
    let settings = s.jobs.settings();
    let vm = settings.vm(&name).ok_or_else(|| ApiErr(StatusCode::NOT_FOUND, format!("unknown VM {name}")))?;
    Ok(Json(describe(vm, false).await?))
}

async fn start(
    s: &AppState,
    body: Result<Json<StartRequest>, JsonRejection>,
    kind: JobKind,
) -> Result<Response, ApiErr> {
    let Json(req) = body?;
    let job = s.jobs.start_copy(req, kind)?;
    Ok((StatusCode::ACCEPTED, Json(StartResponse { job_id: job.view().job_id, status: JobStatus::Running }))
        .into_response())
}

async fn start_backup(
    State(s): State<Arc<AppState>>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Result<Response, ApiErr> {
    start(&s, body, JobKind::Backup).await
}

async fn start_replicate(
    State(s): State<Arc<AppState>>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Result<Response, ApiErr> {
    start(&s, body, JobKind::Replicate).await
}

async fn start_restore(
    State(s): State<Arc<AppState>>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<Response, ApiErr> {
    let Json(req) = body?;
    let job = s.jobs.start_restore(req)?;
    Ok((StatusCode::ACCEPTED, Json(StartResponse { job_id: job.view().job_id, status: JobStatus::Running }))
        .into_response())
}

async fn get_job(State(s): State<Arc<AppState>>, Param(id): Param) -> Answer<crate::api::JobView> {
    let job = s.jobs.get(&id).ok_or_else(|| ApiErr(StatusCode::NOT_FOUND, format!("unknown job {id}")))?;
    Ok(Json(job.view()))
}

async fn list_jobs(State(s): State<Arc<AppState>>) -> Answer<Vec<crate::api::JobView>> {
    let mut jobs: Vec<_> = s.jobs.all().iter().map(|j| j.view()).collect();
    jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    Ok(Json(jobs))
}

async fn cancel_job(State(s): State<Arc<AppState>>, Param(id): Param) -> Answer<crate::api::JobView> {
    let job = s.jobs.cancel(&id)?;
    // Cancel is honoured within a second: wait that long for the job to settle.
    for _ in 0..20 {
        if job.status().is_final() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(Json(job.view()))
}

async fn commit_job(State(s): State<Arc<AppState>>, Param(id): Param) -> Answer<crate::api::JobView> {
    // Renames and directory `fsync`s: off the runtime's workers.
    let jobs = Arc::clone(&s.jobs);
    let committed = tokio::task::spawn_blocking(move || jobs.commit(&id))
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("commit: {e}")))?;
    Ok(Json(committed?.view()))
}

/// The tunnel's status as the API shows it.
pub fn tunnel_view(s: &AppState) -> TunnelView {
    let Some(t) = &s.tunnel else {
        return TunnelView {
            enabled: false,
            connected: false,
            hub: None,
            connected_for_s: None,
            reconnects: 0,
            last_error: None,
            open_channels: 0,
            bytes_to_hub: 0,
            bytes_from_hub: 0,
            ssh_connections: 0,
            state: "off".into(),
        };
    };
    let st = t.status();
    let hub = s.jobs.settings().tunnel.as_ref().map(|c| format!("{}:{}", c.hub_host, c.hub_port));
    TunnelView {
        enabled: true,
        connected: st.connected_since.is_some(),
        hub,
        connected_for_s: st.connected_since.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
        reconnects: st.reconnects,
        last_error: st.last_error,
        open_channels: st.open_channels,
        bytes_to_hub: st.bytes_to_hub,
        bytes_from_hub: st.bytes_from_hub,
        ssh_connections: st.connections_up,
        state: match st.state {
            tunnel::State::Connecting => "connecting",
            tunnel::State::Up => "up",
            tunnel::State::Retrying => "retrying",
            tunnel::State::Refused => "refused",
            _ => "stopped",
        }
        .into(),
    }
}

async fn tunnel_status(State(s): State<Arc<AppState>>) -> Answer<TunnelView> {
    Ok(Json(tunnel_view(&s)))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let body = crate::metrics::render(
        &s.jobs.all(),
        &tunnel_view(&s),
        &s.jobs.reload_status(),
        s.jobs.taken_up(),
        s.jobs.checkpoint_stats(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
