//! The hub's HTTP API (axum): backups, restores, replications, retention, schedules, ports, exports, `/healthz`,
//! `/metrics` and `/api/v1/openapi.json`.
//!
//! Every call but `/healthz` needs `Authorization: Bearer TOKEN`; errors are
//! `{"error", "code"}` with 400/401/404/405/409/503 (malformed bodies included); bodies are capped
//! at 64 KiB. Handlers validate and delegate to [`crate::jobs::Hub`].

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use node::api::BackupType;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::HubError;
use crate::jobs::{Asked, Hub, JobView, Kind, ScheduleView};
use crate::retention::Policy;

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        (status, Json(json!({"error": self.to_string(), "code": code}))).into_response()
    }
}

/// Run `work` to its end even when the client goes away. hyper drops a request's future when its
/// connection closes (a killed `curl`, a script's timeout); dropped half-way, a start would leave
/// its VM held by a job nobody can see (every later backup of it 409) or a job the node runs and
/// nobody follows, a restore its backup pinned, a delete its catalog and files out of step. So
/// every call that changes state runs as a task of its own, and the request only waits for it.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, HubError>> + Send + 'static,
) -> Result<T, HubError> {
    tokio::spawn(work).await.map_err(|e| HubError::Internal(format!("request task: {e}")))?
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, HubError> {
    b.map(|Json(v)| v).map_err(|e| HubError::BadRequest(node::http::bad_body(&e)))
}

/// `POST /api/v1/backups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// VM.
    pub vm_name: String,
    /// Full or incremental.
    pub backup_type: BackupType,
    /// Node, when several have the VM.
    pub node: Option<String>,
    /// Repository (only `default`).
    pub repository_id: Option<String>,
    /// Labels kept with the backup (its manifest), shown in its views, and filtered on with
    /// `?tag=`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Backups of the VM to keep once this one completes: the newest N (with the rules below,
    /// `crate::retention`; the config's rules when none is given here).
    pub keep: Option<u32>,
    /// The newest backup of each of the last N hours.
    pub keep_hourly: Option<u32>,
    /// ... days.
    pub keep_daily: Option<u32>,
    /// ... ISO weeks.
    pub keep_weekly: Option<u32>,
    /// ... months.
    pub keep_monthly: Option<u32>,
    /// ... years.
    pub keep_yearly: Option<u32>,
}

/// `POST /api/v1/prune`: apply retention rules to a VM's backups now, or only say what they
/// would remove.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// VM; none: every VM with backups.
    pub vm_name: Option<String>,
    /// Node, when several nodes' VMs of that name have backups.
    pub node: Option<String>,
    /// The `[[schedule]]` (with `keep_*` of its own) whose backups to prune; none: the backups
    /// under the hub's rules (`jobs/prune.rs`).
    pub schedule: Option<String>,
    /// The rules, as in [`BackupRequest`]; none: the schedule's own, or the config's.
    pub keep: Option<u32>,
    /// See [`BackupRequest::keep_hourly`].
    pub keep_hourly: Option<u32>,
    /// See [`BackupRequest::keep_daily`].
    pub keep_daily: Option<u32>,
    /// See [`BackupRequest::keep_weekly`].
    pub keep_weekly: Option<u32>,
    /// See [`BackupRequest::keep_monthly`].
    pub keep_monthly: Option<u32>,
    /// See [`BackupRequest::keep_yearly`].
    pub keep_yearly: Option<u32>,
    /// Only say what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

/// The retention rules of a request body (`keep`, `keep_hourly`, ...).
macro_rules! policy_of {
    ($req:expr) => {
        Policy {
            last: $req.keep,
            hourly: $req.keep_hourly,
            daily: $req.keep_daily,
            weekly: $req.keep_weekly,
            monthly: $req.keep_monthly,
            yearly: $req.keep_yearly,
        }
    };
}

/// `POST /api/v1/replications`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationRequest {
    /// VM.
    pub vm_name: String,
    /// Node, when several have the VM.
    pub node: Option<String>,
}

/// `POST /api/v1/restores`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The backup to expose.
    pub backup_id: String,
    /// Disk key -> path on the node: the hub then has the node write those disks and follows
    /// it (`jobs/restore_run.rs`); absent, the restore is only exports.
    pub destinations: Option<std::collections::BTreeMap<String, String>>,
    /// The node to restore onto (with `destinations`; default: the backup's own).
    pub node: Option<String>,
}

/// `?vm_name=&tag=`; any other parameter is refused (400), not ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this VM.
    pub vm_name: Option<String>,
    /// Only backups with this tag.
    pub tag: Option<String>,
}

/// A method an endpoint does not take: 405 with the API's JSON error (axum's own has no body;
/// its `Allow` header is kept).
fn method_not_allowed() -> Response {
    let body = json!({"error": "this endpoint does not take that method (see Allow)", "code": "method_not_allowed"});
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// A path parameter (an id, a name), refused as a JSON error like the API's others; axum's own
/// rejection (an id whose `%`-escapes are not UTF-8) is plain text, which scripts cannot read
/// (found by fuzzing, `hub::fuzzing`).
struct Param(String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = HubError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, HubError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Self(p))
            .map_err(|e| HubError::BadRequest(format!("bad path: {}", e.body_text())))
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, HubError> {
    q.map(|Query(v)| v).map_err(|e| HubError::BadRequest(format!("bad query: {}", e.body_text())))
}

/// `DELETE /api/v1/backups/{id}?merge=true`: an incremental on top of the backup is merged into
/// it first, instead of the delete being refused (`jobs/merge.rs`). Any other parameter is
/// refused (400).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Merge the incremental on top, if any.
    #[serde(default)]
    pub merge: bool,
}

fn job_json(kind: Kind, v: &JobView) -> Value {
    let mut value = serde_json::to_value(v).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        let key = match kind {
            Kind::Backup => "backup_id",
            Kind::Replication => "replication_id",
        };
        map.insert(key.into(), Value::String(v.id.clone()));
    }
    value
}

/// The router.
pub fn router(hub: Arc<Hub>) -> Router {
    let api = Router::new()
        .route("/api/v1/backups", post(start_backup).get(list_backups))
        .route("/api/v1/backups/{id}", get(get_backup).delete(delete_backup))
        .route("/api/v1/backups/{id}/verify", post(verify_backup))
        .route("/api/v1/restores", post(start_restore).get(list_restores))
        .route("/api/v1/restores/{id}", get(get_restore).delete(close_restore))
        .route("/api/v1/replications", post(start_replication).get(list_replications))
        .route("/api/v1/replications/{id}", get(get_replication).delete(delete_replication))
        .route("/api/v1/prune", post(prune))
        .route("/api/v1/schedules", get(|State(hub): State<Arc<Hub>>| async move { Json(hub.schedules()) }))
        .route("/api/v1/schedules/{name}", get(get_schedule))
        .route("/api/v1/schedules/{name}/run", post(run_schedule))
        .route("/api/v1/vms", get(|State(hub): State<Arc<Hub>>| async move { Json(hub.vm_views().await) }))
        .route("/api/v1/nodes", get(|State(hub): State<Arc<Hub>>| async move { Json(hub.node_views().await) }))
        .route("/api/v1/nodes/{name}", get(get_node))
        .route("/api/v1/ssh", get(|State(hub): State<Arc<Hub>>| async move { hub.ssh_view().map(Json) }))
        .route("/api/v1/ports", get(ports))
        .route("/api/v1/exports", get(exports))
        .route("/api/v1/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&hub), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(api)
        .fallback(|| async { HubError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(DefaultBodyLimit::max(64 << 10))
        .with_state(hub)
}

async fn require_token(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    if !node::http::bearer_matches(&headers, &hub.settings.token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token", "code": "unauthorized"})),
        )
            .into_response();
    }
    next.run(request).await
}

async fn start_backup(
    State(hub): State<Arc<Hub>>,
    b: Result<Json<BackupRequest>, JsonRejection>,
) -> Result<Response, HubError> {
    let req = body(b)?;
    if let Some(r) = req.repository_id.as_deref().filter(|r| *r != "default") {
        return Err(HubError::BadRequest(format!(
            "unknown repository_id '{r}' (this hub has one repository: default)"
        )));
    }
    let retention = policy_of!(req);
    let v = to_completion(async move {
        let asked = Asked { tags: &req.tags, retention, schedule: None };
        hub.start(Kind::Backup, &req.vm_name, req.backup_type, req.node.as_deref(), asked).await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(Kind::Backup, &v))).into_response())
}

async fn list_backups(
    State(hub): State<Arc<Hub>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Value>>, HubError> {
    let q = query(q)?;
    let list = hub.list(Kind::Backup, q.vm_name.as_deref(), q.tag.as_deref());
    Ok(Json(list.iter().map(|v| job_json(Kind::Backup, v)).collect()))
}

async fn get_backup(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    let v = hub
        .get(Kind::Backup, &id)
        .ok_or_else(|| HubError::NotFound(hub.merged_away(&id).unwrap_or_else(|| format!("unknown backup {id}"))))?;
    Ok(Json(job_json(Kind::Backup, &v)))
}

async fn delete_backup(
    State(hub): State<Arc<Hub>>,
    Param(id): Param,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<Value>, HubError> {
    let merge = query(q)?.merge;
    let v = to_completion(async move {
        match merge {
            true => hub.delete_merging(&id).await,
            false => hub.delete(Kind::Backup, &id).await,
        }
    })
    .await?;
    Ok(Json(job_json(Kind::Backup, &v)))
}

async fn prune(
    State(hub): State<Arc<Hub>>,
    b: Result<Json<PruneRequest>, JsonRejection>,
) -> Result<Json<Value>, HubError> {
    let req = body(b)?;
    let policy = policy_of!(req);
    let view = to_completion(async move {
        match (req.vm_name, req.node) {
            (Some(vm), node) => {
                Ok(json!(hub.prune(&vm, node.as_deref(), req.schedule.as_deref(), policy, req.dry_run).await?))
            }
            (None, None) => Ok(json!(hub.prune_all(req.schedule.as_deref(), policy, req.dry_run).await?)),
            (None, Some(_)) => Err(HubError::BadRequest("node goes with vm_name".into())),
        }
    })
    .await?;
    Ok(Json(view))
}

async fn get_schedule(State(hub): State<Arc<Hub>>, Param(name): Param) -> Result<Json<ScheduleView>, HubError> {
    hub.schedule_view(&name).map(Json).ok_or_else(|| HubError::NotFound(format!("no schedule named {name}")))
}

async fn get_node(State(hub): State<Arc<Hub>>, Param(name): Param) -> Result<Json<crate::jobs::NodeView>, HubError> {
    hub.node_view(&name).await.map(Json)
}

/// A run of the schedule now (202), going on in the background; 409 while one goes on.
async fn run_schedule(State(hub): State<Arc<Hub>>, Param(name): Param) -> Result<Response, HubError> {
    let view = hub.run_schedule_now(&name)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

async fn delete_replication(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    let v = to_completion(async move { hub.delete(Kind::Replication, &id).await }).await?;
    Ok(Json(job_json(Kind::Replication, &v)))
}

async fn verify_backup(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    let (ok, disks) = to_completion(async move { hub.verify(&id).await }).await?;
    Ok(Json(json!({"ok": ok, "disks": disks})))
}

async fn start_restore(
    State(hub): State<Arc<Hub>>,
    b: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<Response, HubError> {
    let req = body(b)?;
    let v = to_completion(async move {
        match (&req.destinations, &req.node) {
            (Some(to), node) => hub.restore_onto(&req.backup_id, node.as_deref(), to).await,
            (None, None) => hub.restore(&req.backup_id).await,
            (None, Some(_)) => {
                Err(HubError::BadRequest("node goes with destinations (where to write the disks)".into()))
            }
        }
    })
    .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_restores(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(json!(hub.restores()))
}

async fn get_restore(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    let v = hub.restore_view(&id).ok_or_else(|| HubError::NotFound(format!("unknown restore {id}")))?;
    Ok(Json(json!(v)))
}

async fn close_restore(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    Ok(Json(json!(to_completion(async move { hub.close_restore(&id).await }).await?)))
}

async fn start_replication(
    State(hub): State<Arc<Hub>>,
    b: Result<Json<ReplicationRequest>, JsonRejection>,
) -> Result<Response, HubError> {
    let req = body(b)?;
    let v = to_completion(async move {
        hub.start(Kind::Replication, &req.vm_name, BackupType::Incremental, req.node.as_deref(), Asked::default()).await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(Kind::Replication, &v))).into_response())
}

async fn list_replications(
    State(hub): State<Arc<Hub>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Value>>, HubError> {
    let q = query(q)?;
    let list = hub.list(Kind::Replication, q.vm_name.as_deref(), q.tag.as_deref());
    Ok(Json(list.iter().map(|v| job_json(Kind::Replication, v)).collect()))
}

async fn get_replication(State(hub): State<Arc<Hub>>, Param(id): Param) -> Result<Json<Value>, HubError> {
    let v = hub.get(Kind::Replication, &id).ok_or_else(|| HubError::NotFound(format!("unknown replication {id}")))?;
    Ok(Json(job_json(Kind::Replication, &v)))
}

async fn ports(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let leased: Vec<Value> = hub.ports.leased().into_iter().map(|(p, j)| json!({"port": p, "job_id": j})).collect();
    Json(json!({"range": hub.ports.range_text(), "leased": leased, "free": hub.ports.free()}))
}

async fn exports(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(json!(hub.exports.views()))
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    let text = crate::metrics::render(&hub).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
