//! What to forward, parsed from the command-line forms the old `ssh -L/-R` flags used.
//!
//! `A-B[:REMOTE_A]` forwards local ports A..=B to the hub's loopback ports REMOTE_A.. (same
//! numbers by default); `LOCAL[:REMOTE]` one port; `REMOTE:LOCAL` a reverse forward from the hub's
//! loopback port REMOTE to the node's LOCAL. Local listeners and hub targets are always
//! 127.0.0.1. Pure parsing, no I/O.

use std::net::{Ipv4Addr, SocketAddr};

/// A local port forwarded to a port on the hub's loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalForward {
    /// Where the node listens.
    pub listen: SocketAddr,
    /// Host the hub connects to (its loopback).
    pub remote_host: String,
    /// Port the hub connects to.
    pub remote_port: u16,
}

/// A port on the hub's loopback forwarded back to a local address.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReverseForward {
    /// Address the hub binds.
    pub remote_bind: String,
    /// Port the hub binds.
    pub remote_port: u16,
    /// Where the node connects for each forwarded connection.
    pub local: SocketAddr,
}

impl LocalForward {
    /// Listen on `listen` and forward each connection to `remote_host:remote_port` as the hub
    /// sees it.
    pub fn new(listen: SocketAddr, remote_host: impl Into<String>, remote_port: u16) -> Self {
        Self { listen, remote_host: remote_host.into(), remote_port }
    }
}

impl ReverseForward {
    /// Ask the hub to listen on `remote_bind:remote_port` and connect each connection to `local`.
    pub fn new(remote_bind: impl Into<String>, remote_port: u16, local: SocketAddr) -> Self {
        Self { remote_bind: remote_bind.into(), remote_port, local }
    }
}

/// A forward specification that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid forward '{spec}': {reason}")]
pub struct SpecError {
    /// The text given.
    pub spec: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn port(spec: &str, text: &str) -> Result<u16, SpecError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(SpecError { spec: spec.into(), reason: "ports are numbers from 1 to 65535" }),
    }
}

fn loopback(p: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, p))
}

/// Parse `A-B[:REMOTE_A]`.
///
/// # Errors
/// [`SpecError`] for a malformed or backwards range, or one that runs past port 65535.
pub fn parse_range(spec: &str) -> Result<Vec<LocalForward>, SpecError> {
    let (range, remote) = match spec.split_once(':') {
        Some((r, remote)) => (r, Some(remote)),
        None => (spec, None),
    };
    let (a, b) = range.split_once('-').ok_or(SpecError { spec: spec.into(), reason: "expected A-B[:REMOTE_A]" })?;
    let (a, b) = (port(spec, a)?, port(spec, b)?);
    if b < a {
        return Err(SpecError { spec: spec.into(), reason: "range end is below its start" });
    }
    let remote_a = match remote {
        Some(r) => port(spec, r)?,
        None => a,
    };
    if u32::from(remote_a) + u32::from(b - a) > 65535 {
        return Err(SpecError { spec: spec.into(), reason: "remote range runs past port 65535" });
    }
    Ok((0..=b - a)
        .map(|i| LocalForward { listen: loopback(a + i), remote_host: "127.0.0.1".into(), remote_port: remote_a + i })
        .collect())
}

/// Parse `LOCAL[:REMOTE]`.
///
/// # Errors
/// [`SpecError`] for a malformed port.
pub fn parse_forward(spec: &str) -> Result<LocalForward, SpecError> {
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (port(spec, l)?, port(spec, r)?),
        None => {
            let p = port(spec, spec)?;
            (p, p)
        }
    };
    Ok(LocalForward { listen: loopback(local), remote_host: "127.0.0.1".into(), remote_port: remote })
}

/// Parse `REMOTE:LOCAL`.
///
/// # Errors
/// [`SpecError`] for a malformed port or a missing part.
pub fn parse_reverse(spec: &str) -> Result<ReverseForward, SpecError> {
    let (remote, local) =
        spec.split_once(':').ok_or(SpecError { spec: spec.into(), reason: "expected REMOTE:LOCAL" })?;
    Ok(ReverseForward {
        remote_bind: "127.0.0.1".into(),
        remote_port: port(spec, remote)?,
        local: loopback(port(spec, local)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_defaults_parse() {
        let range = parse_range("10100-10200").unwrap();
        assert_eq!(range.len(), 101);
        assert_eq!(range[0].listen.port(), 10100);
        assert_eq!(range[100].remote_port, 10200);
        assert_eq!(parse_forward("8082").unwrap().remote_port, 8082);
        let r = parse_reverse("9081:8081").unwrap();
        assert_eq!((r.remote_port, r.local.port()), (9081, 8081));
    }

    #[test]
    fn a_remote_offset_lets_both_ends_share_one_machine() {
        let range = parse_range("20100-20102:10100").unwrap();
        assert_eq!(
            range.iter().map(|f| (f.listen.port(), f.remote_port)).collect::<Vec<_>>(),
            vec![(20100, 10100), (20101, 10101), (20102, 10102)]
        );
        assert_eq!(parse_forward("18082:8082").unwrap().listen.port(), 18082);
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        for bad in ["", "10200-10100", "1-2-3", "0-5", "a-b", "65535-65535:65535x", "65530-65535:65533"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
        assert!(parse_forward("70000").is_err());
        assert!(parse_reverse("9081").is_err());
    }
}
