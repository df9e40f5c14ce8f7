//! Entry point of the `hub_api` fuzz target (`fuzz/`) and of its corpus replay in `cargo test`:
//! requests of any shape to the hub's HTTP API ([`crate::http::router`]), answered by a hub of
//! their own: a new repository in a temporary directory and one node at an address nothing
//! listens on, so what the hub would ask of a node fails as an unreachable node does.
//!
//! An input is a request: its first byte the method (GET, POST, DELETE, PUT, PATCH by its low
//! bits) and, in its high bit, whether the bearer token is sent; then the path and query up to
//! the first newline; then the body, sent as JSON. The requests go through the router in process
//! (`tower::ServiceExt::oneshot`), as hyper would hand them over, one after the other on the same
//! hub, so one input can build on what an earlier one did.
//!
//! What every answer must be, besides the hub not panicking: one a script can act on. Never a
//! 500 (the hub's own failure; a handler that panics is one, through `to_completion`), and every
//! error a JSON object with `error` and `code`, as the API documents (a method an endpoint does
//! not take included).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use tower::ServiceExt;

use crate::config::{NodeSpec, Settings};
use crate::jobs::Hub;

/// The bearer token of the fuzzed hub.
pub const TOKEN: &str = "fuzz-token";

/// What the hub answered (`None`: the input is not a request, such as a path that is no URI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status.
    pub status: Option<u16>,
}

/// A hub, its runtime and its directory, for as many requests as are sent to it.
pub struct Api {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

impl Api {
    /// A hub over a new repository (module doc).
    ///
    /// # Errors
    /// The directory, the runtime or the hub could not be made.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        let settings = Settings {
            listen: (localhost, 0).into(),
            repo: dir.path().join("repo"),
            replicas: dir.path().join("replicas"),
            nbd_ports: (10100, 10103),
            nbd_bind: localhost,
            nbd_host: "127.0.0.1".into(),
            nodes: vec![NodeSpec {
                name: "node1".into(),
                // The discard port: nothing listens on it here.
                url: "http://127.0.0.1:9".into(),
                token: None,
                key: None,
                nbd_peers: Vec::new(),
            }],
            token: TOKEN.into(),
            ssh: None,
            stall_timeout: std::time::Duration::from_secs(60),
            unreachable_timeout: std::time::Duration::from_secs(60),
            restore_idle: std::time::Duration::from_secs(600),
            replica_raw: false,
            direct_io: false,
            io_uring: false,
            nbd_local_users: Vec::new(),
            retention: crate::retention::Policy::default(),
            verify_every: None,
            compress: false,
            max_chain: crate::jobs::DEFAULT_MAX_CHAIN,
            schedules: Vec::new(),
        };
        let hub = runtime.block_on(async { Hub::new(settings) })?;
        let router = crate::http::router(Arc::clone(&hub));
        Ok(Self { runtime, router, _dir: dir })
    }

    /// Send one input as a request (module doc); the properties are asserted here.
    pub fn request(&self, data: &[u8]) -> Outcome {
        let Some(request) = decode(data) else { return Outcome { status: None } };
        let what = format!("{} {}", request.method(), request.uri());
        let router = self.router.clone();
        let (status, body) = self.runtime.block_on(async move {
            let response = router.oneshot(request).await.unwrap_or_else(|never| match never {});
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap_or_default();
            (status, body)
        });
        let text = String::from_utf8_lossy(&body);
        assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{what}: 500 {text}");
        if status.is_client_error() || status.is_server_error() {
            let error: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            let shaped = error.as_ref().is_some_and(|e| e["error"].is_string() && e["code"].is_string());
            assert!(shaped, "{what}: {status} without a JSON error: {text}");
        }
        Outcome { status: Some(status.as_u16()) }
    }
}

fn decode(data: &[u8]) -> Option<Request<Body>> {
    let (&first, rest) = data.split_first()?;
    let method =
        [Method::GET, Method::POST, Method::DELETE, Method::PUT, Method::PATCH][usize::from(first & 7) % 5].clone();
    let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let (path, body) = rest.split_at(split);
    let path = std::str::from_utf8(path).ok()?;
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let mut builder = Request::builder().method(method).uri(path).header(header::CONTENT_TYPE, "application/json");
    if first & 0x80 != 0 {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    builder.body(Body::from(body.get(1..).unwrap_or_default().to_vec())).ok()
}
