//! # node: the node service
//!
//! Copies a VM's disks into the hub's NBD exports, through the tunnel or over direct TCP, and
//! serves the node API the hub drives it with. Replaces the old trio of node API,
//! `sendense-backup-client` and a tunnel shell script.
//!
//! - [`api`]: the API's wire types and [`api::NodeClient`], what the hub links.
//! - [`targets`]: `nbd_targets` parsing (pure).
//! - [`config`]: `node.toml` and flags, resolved and checked once.
//! - [`source`] / [`sink`] / [`pool`]: where bytes come from and go to; NBD connections that
//!   are re-made when the transport breaks.
//! - [`mover`]: the sparse, pipelined, change-aware copy of one disk.
//! - [`blockmap`]: per-block hashes (change tracking for sources without a dirty bitmap) and
//!   the disk checksum.
//! - [`files`]: records and restored disks replaced whole, private directories.
//! - [`inuse`]: whether a running VM's qemu holds a disk open for writing.
//! - [`jobs`]: one job per VM, hooks, commit, restores.
//! - [`http`] and [`metrics`]: the API (axum) and `/metrics`; [`api_server`]: how both
//!   services serve their APIs (bounded, graceful), [`https`]: over HTTPS (`api_tls`).
//! - [`progress`]: the terminal progress display of `sendense-node copy`.
//! - [`service`]: logging, runtime, errors and signals (stop, reload) of the service binaries.
//! - `fuzzing` (feature `fuzzing`): the entry points of the `node_inputs` and `node_api` fuzz
//!   targets, and the API harness the hub's `hub_api` target shares.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod api;
pub mod api_server;
pub mod blockmap;
pub mod blocks;
pub mod config;
pub mod error;
pub mod files;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod http;
pub mod https;
pub mod inuse;
pub mod jobs;
pub mod metrics;
pub mod mover;
pub mod pool;
pub mod progress;
pub mod sealed;
pub mod service;
pub mod sink;
pub mod source;
pub mod targets;
pub mod throttle;
