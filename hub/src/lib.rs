//! # hub: the hub service
//!
//! Receives VM disks from nodes into a repository of qcow2 images, through NBD exports served
//! in-process (no qemu-nbd, no PIDs), and drives the node's jobs through its API.
//!
//! - [`config`]: `hub.toml` and flags.
//! - [`ports`]: the NBD port lease table (pure).
//! - [`exports`]: one in-process NBD server, an export per leased port.
//! - [`peers`]: which TCP clients an export admits (this machine and its node).
//! - [`repo`]: the repository layout and manifests; the catalog is rebuilt from them.
//! - [`retention`]: which backups a retention policy keeps (pure).
//! - [`schedule`]: backup schedules, checked, and when they fire (pure; run by `jobs`).
//! - [`jobs`]: backups, replications, restores, and their cleanup.
//! - [`verify`]: image checks and checksum comparison.
//! - [`http`] and [`openapi`]: the API; [`metrics`]: `GET /metrics`.
//! - [`endpoint`]: the embedded SSH endpoint for node tunnels.
//! - [`demo`]: `sendense-hub demo`, the whole product on one machine.
//! - `fuzzing` (feature `fuzzing`): the entry point of the `hub_api` fuzz target.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod blockhashes;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod error;
pub mod exports;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod http;
pub mod jobs;
pub mod known_addresses;
pub mod metrics;
pub mod openapi;
pub mod peers;
pub mod ports;
pub mod repo;
pub mod retention;
pub mod schedule;
pub mod sockowner;
pub mod verify;
