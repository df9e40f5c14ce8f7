//! What a client negotiates and may ask per request, what it learns about the export, and how
//! it fails: [`ClientOptions`], [`ExportInfo`], [`CommandFlags`], [`ClientError`]. The public
//! vocabulary of `client`, apart from the connection machinery that uses it.

use std::time::Duration;

use crate::proto::WireError;

/// Requests in flight per connection unless [`ClientOptions::max_in_flight`] says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// What to negotiate, and the connection's bounds. Built with [`ClientOptions::new`] and the
/// setters; new fields may be added.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Export name ("" = default export).
    pub export: String,
    /// Try extended (64-bit) headers first.
    pub extended_headers: bool,
    /// Negotiate structured replies (needed for block status and sparse reads).
    pub structured_replies: bool,
    /// Select `base:allocation`.
    pub block_status: bool,
    /// Further metadata contexts to select (for example `qemu:dirty-bitmap:backup`); each one the
    /// server grants can be queried with [`Client::block_status_of`](super::Client::block_status_of).
    pub meta_contexts: Vec<String>,
    /// A request not answered within this long fails with [`ClientError::TimedOut`] and closes
    /// the connection. `None` (the default) waits as long as the connection lives.
    pub request_timeout: Option<Duration>,
    /// Requests outstanding at once on this connection; more wait for a slot.
    pub max_in_flight: usize,
    /// Start TLS with these credentials before anything else, and never go on in clear
    /// ([`Client::connect_uri`](super::Client::connect_uri) with an `nbds://` URI, or
    /// [`Client::connect_unix`](super::Client::connect_unix)). `None` (the default): no TLS.
    pub tls: Option<crate::ClientTls>,
}

impl ClientOptions {
    /// Everything on, for `export`.
    pub fn new(export: impl Into<String>) -> Self {
        Self {
            export: export.into(),
            extended_headers: true,
            structured_replies: true,
            block_status: true,
            meta_contexts: Vec::new(),
            request_timeout: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            tls: None,
        }
    }

    /// Try extended headers (default on).
    pub fn extended_headers(mut self, on: bool) -> Self {
        self.extended_headers = on;
        self
    }

    /// Negotiate structured replies (default on; off also turns extended headers off).
    pub fn structured_replies(mut self, on: bool) -> Self {
        self.structured_replies = on;
        self
    }

    /// Select `base:allocation` (default on).
    pub fn block_status(mut self, on: bool) -> Self {
        self.block_status = on;
        self
    }

    /// Fail a request (and close the connection) when it is not answered within `timeout`.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// At most `n` requests in flight on the connection (at least 1).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Start TLS with `tls` (see [`ClientOptions::tls`]).
    pub fn tls(mut self, tls: crate::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The same options for another export.
    pub fn for_export(mut self, export: impl Into<String>) -> Self {
        self.export = export.into();
        self
    }

    /// Also select the metadata context `name`.
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Canonical name, if sent.
    pub name: Option<String>,
    /// Description, if sent.
    pub description: Option<String>,
    /// Minimum block size (1 if not sent).
    pub min_block: u32,
    /// Preferred block size (4096 if not sent).
    pub preferred_block: u32,
    /// Maximum payload (32 MiB if not sent).
    pub max_payload: u32,
}

/// Client failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("server refused option {option}: reply {reply:#x}: {message}")]
    OptionRefused {
        /// Option.
        option: u32,
        /// Error reply type.
        reply: u32,
        /// Server's message.
        message: String,
    },
    /// A request failed on the server.
    #[error("server error {error}: {message}")]
    Request {
        /// NBD error value.
        error: u32,
        /// Server's message (empty for simple replies).
        message: String,
    },
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// The export does not offer this.
    #[error("{0} is not supported by this export")]
    Unsupported(&'static str),
    /// Bad arguments.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The server did not answer within [`ClientOptions::request_timeout`]; the connection is
    /// closed.
    #[error("no reply within {0:?}: connection closed")]
    TimedOut(Duration),
}

/// Command flags a caller may set on a request. `Default` is none; combine with the setters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandFlags {
    /// `NBD_CMD_FLAG_FUA`: durable before the reply (export must advertise `SEND_FUA`).
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE` (write zeroes): keep the range allocated.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` (write zeroes): fail with `ENOTSUP` rather than write zeroes
    /// slowly (export must advertise `SEND_FAST_ZERO`).
    pub fast_zero: bool,
}

impl CommandFlags {
    /// With FUA.
    pub fn fua(mut self) -> Self {
        self.fua = true;
        self
    }

    /// With NO_HOLE.
    pub fn no_hole(mut self) -> Self {
        self.no_hole = true;
        self
    }

    /// With FAST_ZERO.
    pub fn fast_zero(mut self) -> Self {
        self.fast_zero = true;
        self
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        Self::Protocol(e.to_string())
    }
}
