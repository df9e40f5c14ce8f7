//! # tunnel: SSH port forwarding on russh
//!
//! The node's side of the data path's tunnel: one SSH connection to the hub carries a range of
//! local ports (NBD 10100-10200), single forwards (the hub API on 8082) and reverse forwards (the
//! hub's 9081 back to the node's API on 8081), with a pinned host key, keepalive and reconnect.
//!
//! - [`spec`]: the `A-B[:REMOTE_A]`, `LOCAL[:REMOTE]`, `REMOTE:LOCAL` forms (pure).
//! - [`hostkey`]: known_hosts or pinned-fingerprint checks; no "accept anything" mode.
//! - [`keyfile`]: private key files and authorized_keys, refused when others can read (keys) or
//!   write (authorized_keys) them, as OpenSSH does.
//! - [`client`]: [`Tunnel`], the supervised client with its [`Status`].
//! - [`dial`]: channels to the hub opened in process ([`TunnelDialer`]), no local socket.
//! - [`channel_io`]: a channel as a byte stream that also takes owned bytes without a copy.
//! - [`authorized`]: authorized_keys with `from=` and `permitopen=`.
//! - [`endpoint`]: the hub's SSH endpoint that allows nothing but the configured forwards.
//! - [`ciphers`]: the algorithm preferences (AES-GCM first where the CPU has AES instructions).
//! - [`limits`]: what a peer can make the other side hold in memory, and the bounds.
//! - `fuzzing` (feature `fuzzing`): the entry point of the `tunnel_inputs` fuzz target.
//!
//! The `sendense-tunnel` binary (feature `cli`, on by default) runs either side from the command
//! line; `benches/` measures it against OpenSSH.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod authorized;
pub mod channel_io;
pub mod ciphers;
pub mod client;
pub mod dial;
pub mod endpoint;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hostkey;
pub mod keyfile;
pub mod limits;
pub mod spec;

pub use client::{ClientConfig, State, Status, Tunnel, TunnelError};
pub use dial::{TunnelDialer, TunnelReader, TunnelStream, TunnelWriter};
pub use hostkey::HostKeyPolicy;
pub use keyfile::{load_private_key, read_authorized_keys, read_secret};
/// Key loading for embedders that build an [`endpoint::EndpointConfig`] (russh's own types).
pub use russh::keys::ssh_key::LineEnding;
pub use russh::keys::{Algorithm as KeyAlgorithm, PrivateKey, PublicKey};
