//! Requests of any shape, made from fuzz bytes, to a service's axum router in process, and what
//! every answer of the node's and the hub's APIs must be: the harness the `node_api` and
//! `hub_api` fuzz targets share ([`super::api`], `hub::fuzzing`).
//!
//! An input is one request or several, separated by the byte [`SEPARATOR`] (0x1e, ASCII's record
//! separator). Each request is its first byte, the method (GET, POST, DELETE, PUT, PATCH by its
//! low bits) and, in its high bit, whether the bearer token is sent; then the path and query up to
//! the first newline; then the body, sent as JSON. `@DIR@` in a path or a body stands for the
//! service's directory, so an input can name the files the service was given (a VM's disk, the
//! restore directory) whatever temporary directory they are in.
//!
//! The requests of an input go, one after the other, to the same service, so an input can start
//! a job and then look at it, cancel or commit it. After an input in which a request changed
//! something (a method other than GET answered with success) the service is replaced by a new
//! one, made as the first was, on a runtime of its own (dropping the old one stops its tasks and
//! closes what it listened on): every input starts from the same state, and a replay of the
//! corpus in `cargo test` gets what the fuzzer got.
//!
//! What every answer must be, besides the service not panicking: one a script can act on. Never
//! a 500 (the service's own failure; a handler that panics is one), and every error a JSON object
//! with `error` and `code`, as both APIs document (a method an endpoint does not take included).
//! A broken property panics, which is what a fuzzer reports.

use std::sync::{Mutex, PoisonError};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use tower::ServiceExt;

/// Separates the requests of one input.
pub const SEPARATOR: u8 = 0x1e;
/// Requests of one input sent at most (the rest is ignored): a fuzzer spends its time on the
/// shape of requests, not on their number.
pub const MAX_REQUESTS: usize = 8;
/// What `@DIR@` is replaced with.
const DIR_PLACEHOLDER: &[u8] = b"@DIR@";

/// A service to send requests to. Fields drop in order: the runtime (and with it the service's
/// tasks and listeners) before the directory its files are in.
pub struct Service {
    /// Its runtime, one thread.
    pub runtime: tokio::runtime::Runtime,
    /// Its API.
    pub router: axum::Router,
    /// Its files.
    pub dir: tempfile::TempDir,
}

/// What a service answered one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The status (`None`: the piece is not a request, such as a path that is no URI).
    pub status: Option<u16>,
    /// The body, when it is JSON.
    pub json: Option<serde_json::Value>,
}

/// The service inputs go to, made again after an input that changed something (module doc).
pub struct Api {
    token: &'static str,
    make: fn() -> Result<Service, String>,
    service: Mutex<Option<Service>>,
}

impl Api {
    /// Requests with the token bit set carry `token`; `make` makes the service, now and after
    /// every input that changed something.
    ///
    /// # Errors
    /// The first service could not be made.
    pub fn new(token: &'static str, make: fn() -> Result<Service, String>) -> Result<Self, String> {
        Ok(Self { token, make, service: Mutex::new(Some(make()?)) })
    }

    /// Send one input's requests (module doc) and return what each got; the properties are
    /// asserted on every answer.
    ///
    /// # Panics
    /// An answer breaks a property, or a new service could not be made: a fuzz target reports
    /// by panicking.
    #[allow(clippy::panic)]
    pub fn input(&self, data: &[u8]) -> Vec<Outcome> {
        let mut slot = self.service.lock().unwrap_or_else(PoisonError::into_inner);
        let service = match slot.take() {
            Some(service) => service,
            None => (self.make)().unwrap_or_else(|e| panic!("a new service to fuzz: {e}")),
        };
        let dir = service.dir.path().to_string_lossy().into_owned();
        let mut changed = false;
        let mut outcomes = Vec::new();
        for piece in data.split(|b| *b == SEPARATOR).take(MAX_REQUESTS) {
            let Some(request) = decode(&replace(piece, dir.as_bytes()), self.token) else {
                outcomes.push(Outcome { status: None, json: None });
                continue;
            };
            let what = format!("{} {}", request.method(), request.uri());
            let changes = request.method() != Method::GET;
            let router = service.router.clone();
            let (status, body) = service.runtime.block_on(async move {
                let response = router.oneshot(request).await.unwrap_or_else(|never| match never {});
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap_or_default();
                (status, body)
            });
            changed |= changes && status.is_success();
            outcomes.push(judge(&what, status, &body));
        }
        if !changed {
            *slot = Some(service);
        }
        outcomes
    }

    /// [`Api::input`], for an input of one request: what it got.
    pub fn request(&self, data: &[u8]) -> Outcome {
        self.input(data).pop().unwrap_or(Outcome { status: None, json: None })
    }
}

/// The properties of every answer (module doc).
fn judge(what: &str, status: StatusCode, body: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(body);
    assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{what}: 500 {text}");
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if status.is_client_error() || status.is_server_error() {
        let shaped = json.as_ref().is_some_and(|e| e["error"].is_string() && e["code"].is_string());
        assert!(shaped, "{what}: {status} without a JSON error: {text}");
    }
    Outcome { status: Some(status.as_u16()), json }
}

/// `piece` with every `@DIR@` replaced by `dir`.
fn replace(piece: &[u8], dir: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    let mut rest = piece;
    while let Some(at) = rest.windows(DIR_PLACEHOLDER.len()).position(|w| w == DIR_PLACEHOLDER) {
        let (before, after) = rest.split_at(at);
        out.extend_from_slice(before);
        out.extend_from_slice(dir);
        rest = after.get(DIR_PLACEHOLDER.len()..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    out
}

fn decode(data: &[u8], token: &str) -> Option<Request<Body>> {
    let (&first, rest) = data.split_first()?;
    let method =
        [Method::GET, Method::POST, Method::DELETE, Method::PUT, Method::PATCH][usize::from(first & 7) % 5].clone();
    let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let (path, body) = rest.split_at(split);
    let path = std::str::from_utf8(path).ok()?;
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let mut builder = Request::builder().method(method).uri(path).header(header::CONTENT_TYPE, "application/json");
    if first & 0x80 != 0 {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::from(body.get(1..).unwrap_or_default().to_vec())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholder_stands_for_the_directory_wherever_it_is() {
        assert_eq!(replace(b"@DIR@/a,@DIR@", b"/t"), b"/t/a,/t");
        assert_eq!(replace(b"no dir @DIR", b"/t"), b"no dir @DIR");
    }
}
