//! # nbd-server: an NBD server (and client) to embed in a tokio service
//!
//! One process serves many exports; each export accepts several connections that share one
//! [`Backend`], so `NBD_FLAG_CAN_MULTI_CONN` is honest. The protocol is fixed newstyle with
//! everything modern clients use: `NBD_OPT_GO`/`INFO` with block sizes, structured replies
//! (sparse reads as `OFFSET_HOLE` chunks), extended headers (qemu 8.2+ and libnbd 1.18+),
//! `base:allocation` block status, TRIM, WRITE_ZEROES with NO_HOLE and FAST_ZERO, FUA, CACHE.
//!
//! ## Layout
//! - [`proto`]: the wire format as pure functions over bytes (fuzzed, never panics).
//! - [`backend`]: the [`Backend`] trait, [`MemoryBackend`], [`FileBackend`] and [`Qcow2Backend`].
//! - [`server`]: [`Server`], exports, listeners, per-connection request pipeline.
//! - [`client`]: [`Client`], an async client with pipelining and block status.
//!
//! ## Concurrency
//! Per connection: one reader that stops reading when `max_in_flight` requests or
//! `max_buffered_bytes` of payload are outstanding (or all connections together hold
//! `max_buffered_bytes_total`), one task per request, one writer that serialises replies. Across connections nothing is locked by this crate; a backend decides
//! its own locking (the file backend takes none: positional I/O).
//!
//! ## Example: embed an export in a service
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{ExportConfig, MemoryBackend, Server, ServerConfig};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let server = Server::new(ServerConfig::default());
//! let disk = Arc::new(MemoryBackend::new(1 << 30));
//! server.add_export(ExportConfig::new("vm1-disk0", disk).max_connections(10))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let accept = tokio::spawn({ let s = server.clone(); async move { s.serve(listener).await } });
//! // ... `nbdinfo nbd://127.0.0.1:10809/vm1-disk0` now works ...
//! server.shutdown().await?; // drains in-flight requests, flushes every export
//! accept.await?;
//! # Ok(()) }
//! ```
//!
//! ## Your own storage
//! Implement [`Backend`] with the re-exported attribute: `#[nbd_server::async_trait] impl
//! nbd_server::Backend for MyDisk { ... }` (size, read, write and flush are required; what
//! [`Backend::capabilities`] does not claim is never advertised). [`Tuned`] adds qemu-nbd's
//! `cache=unsafe` and `discard=ignore` over any backend.
//!
//! ## TLS
//! [`ServerConfig::tls`] with [`TlsCredentials`] (qemu's `tls-creds-x509` directory, or an
//! embedder's rustls configuration) makes every TCP and Unix listener require TLS, as qemu-nbd
//! with `--tls-creds` does; without it `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
//! The client takes `nbds://` URIs (libnbd's `tls-certificates=DIR`) or [`ClientTls`] in its
//! options.
//!
//! ## Limitations
//! No oldstyle negotiation; the metadata contexts are `base:allocation` and one
//! `qemu:dirty-bitmap:NAME`; no TLS-PSK.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod backend;
pub mod client;
pub mod descriptors;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod proto;
pub mod server;
pub mod tls;
pub mod tls_authz;
pub mod zero_copy;

/// The attribute [`Backend`] implementations need (`#[nbd_server::async_trait]`), re-exported
/// so that embedders do not have to depend on the `async-trait` crate themselves.
pub use async_trait::async_trait;
pub use backend::{
    Backend, BackendError, BackendErrorKind, Capabilities, FileBackend, FileExtent, IoRing, MemoryBackend, PipedData,
    Qcow2Backend, Tuned, Tuning, ZeroFlags,
};
pub use client::{Client, ClientError, ClientOptions, CommandFlags, ExportInfo};
pub use proto::transmission::Extent;
pub use server::{ExportConfig, ExportStats, Scope, Server, ServerConfig, ServerError, MAX_BITMAPS};
pub use tls::{ClientTls, TlsCredentials, TlsError};
pub use tls_authz::ClientAuthz;
pub use zero_copy::{ReceiveBytes, SendBytes};
