//! API-facing errors of the hub: each maps to one HTTP status and a machine-readable code.

/// A refused or failed request.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such thing.
    #[error("{0}")]
    NotFound(String),
    /// 409: it conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 503: no free port, or the node cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// 500: something on the hub failed (disk, image).
    #[error("{0}")]
    Internal(String),
}

impl HubError {
    /// From a node API failure: the node's own 4xx pass through, anything else is 503.
    pub fn from_node(node: &str, e: node::api::ApiError) -> Self {
        match e {
            node::api::ApiError::Status { status: 400, message, .. } => {
                Self::BadRequest(format!("node {node}: {message}"))
            }
            node::api::ApiError::Status { status: 404, message, .. } => {
                Self::NotFound(format!("node {node}: {message}"))
            }
            node::api::ApiError::Status { status: 409, message, .. } => {
                Self::Conflict(format!("node {node}: {message}"))
            }
            other => Self::Unavailable(format!("node {node}: {other}")),
        }
    }
}
