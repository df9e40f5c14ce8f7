//! Checking the hub's host key: a known_hosts file (OpenSSH format, hashed entries too) or a
//! pinned SHA-256 fingerprint. There is no "accept anything" mode.
//!
//! Keys are compared by algorithm and key data, never with `==` on `PublicKey`, which also
//! compares the comment (a key read from a file carries one, the key on the wire does not).

use std::path::PathBuf;

use russh::keys::{HashAlg, PublicKey};

/// How the hub's host key is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Entries of a known_hosts file for the hub's host and port.
    KnownHosts(PathBuf),
    /// A pinned fingerprint, `SHA256:...` as `ssh-keygen -lf` prints it.
    Fingerprint(String),
}

/// Why a host key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostKeyError {
    /// The host is known with other keys.
    #[error("host key mismatch for {host}: expected {expected}, got {got}")]
    Mismatch {
        /// `host:port`.
        host: String,
        /// Fingerprint(s) on record.
        expected: String,
        /// Fingerprint offered.
        got: String,
    },
    /// The known_hosts file has no entry for the host.
    #[error("host {host} is not in {file} (its key is {got}); add it, or pin the fingerprint")]
    Unknown {
        /// `host:port`.
        host: String,
        /// The file searched.
        file: String,
        /// Fingerprint offered.
        got: String,
    },
    /// The key is marked `@revoked` in the known_hosts file.
    #[error("host key {got} of {host} is marked @revoked in {file}")]
    Revoked {
        /// `host:port`.
        host: String,
        /// The file.
        file: String,
        /// Fingerprint offered.
        got: String,
    },
    /// The known_hosts file cannot be read.
    #[error("cannot read known_hosts {file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// Cause.
        reason: String,
    },
}

/// Whether `key` is on an `@revoked` line of the file. russh's parser skips marker lines, so a
/// revoked key listed again on a plain line would pass; the marker is honoured here for every
/// host pattern (stricter than OpenSSH, which matches the patterns: a revoked key is revoked).
fn revoked(path: &std::path::Path, key: &PublicKey) -> Result<bool, HostKeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(HostKeyError::File { file: path.display().to_string(), reason: e.to_string() }),
    };
    Ok(text.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.next() == Some("@revoked")
            && fields
                .nth(2)
                .and_then(|b64| russh::keys::parse_public_key_base64(b64).ok())
                .is_some_and(|k| k.algorithm() == key.algorithm() && k.key_data() == key.key_data())
    }))
}

/// The fingerprint of `key` as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Check the key a hub at `host:port` offered.
///
/// # Errors
/// [`HostKeyError`] naming the host and both fingerprints.
pub fn verify(policy: &HostKeyPolicy, host: &str, port: u16, key: &PublicKey) -> Result<(), HostKeyError> {
    let got = fingerprint(key);
    let name = format!("{host}:{port}");
    match policy {
        HostKeyPolicy::Fingerprint(pinned) => {
            if pinned.trim() == got {
                Ok(())
            } else {
                Err(HostKeyError::Mismatch { host: name, expected: pinned.trim().to_string(), got })
            }
        }
        HostKeyPolicy::KnownHosts(path) => {
            let file = path.display().to_string();
            if revoked(path, key)? {
                return Err(HostKeyError::Revoked { host: name, file, got });
            }
            let recorded = russh::keys::known_hosts::known_host_keys_path(host, port, path)
                .map_err(|e| HostKeyError::File { file: file.clone(), reason: e.to_string() })?;
            if recorded.iter().any(|(_, k)| k.algorithm() == key.algorithm() && k.key_data() == key.key_data()) {
                return Ok(());
            }
            if recorded.is_empty() {
                return Err(HostKeyError::Unknown { host: name, file, got });
            }
            let expected = recorded.iter().map(|(_, k)| fingerprint(k)).collect::<Vec<_>>().join(", ");
            Err(HostKeyError::Mismatch { host: name, expected, got })
        }
    }
}
