//! `nbd_targets`: the hub's `KEY:nbd://HOST:PORT/EXPORT,...` list, parsed strictly.
//!
//! The string crosses the API from the hub (or an operator's command line), so every fault is a
//! typed error that names the entry: a missing or non-numeric key, a scheme other than `nbd://`,
//! a missing or zero port, a duplicate key. Pure: no I/O, tested on its own.

use std::fmt;

/// One disk's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Disk key (VMware-style unit number + 2000).
    pub key: u32,
    /// Host from the URL.
    pub host: String,
    /// TCP port (never 0).
    pub port: u16,
    /// Export name (may be empty: the server's default export).
    pub export: String,
    /// `nbds://`: the hub's NBD listener requires TLS (its `nbd_tls`); dialled directly, the
    /// node starts TLS with its own `nbd_tls` credentials.
    pub tls: bool,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "nbds" } else { "nbd" };
        if self.host.contains(':') {
            write!(f, "{}:{scheme}://[{}]:{}/{}", self.key, self.host, self.port, self.export)
        } else {
            write!(f, "{}:{scheme}://{}:{}/{}", self.key, self.host, self.port, self.export)
        }
    }
}

/// Why an `nbd_targets` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetsError {
    /// Nothing to do.
    #[error("nbd_targets is empty")]
    Empty,
    /// `KEY:` missing.
    #[error("target '{0}' has no 'KEY:' prefix")]
    MissingKey(String),
    /// The key is not a number.
    #[error("target '{0}': the disk key must be a number such as 2000")]
    BadKey(String),
    /// Not `nbd://HOST:PORT/EXPORT`.
    #[error("target '{entry}': {reason}")]
    BadUrl {
        /// The entry.
        entry: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The same key twice.
    #[error("disk key {0} appears twice in nbd_targets")]
    DuplicateKey(u32),
}

/// Parse `KEY:nbd://HOST:PORT/EXPORT[,...]` (spaces around entries are ignored).
///
/// # Errors
/// The first malformed entry, named.
pub fn parse(text: &str) -> Result<Vec<Target>, TargetsError> {
    let mut out: Vec<Target> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (key, url) = entry.split_once(':').ok_or_else(|| TargetsError::MissingKey(entry.to_string()))?;
        if key.is_empty() || url.starts_with("//") {
            return Err(TargetsError::MissingKey(entry.to_string()));
        }
        let key: u32 = key.parse().map_err(|_| TargetsError::BadKey(entry.to_string()))?;
        let target = parse_url(key, url).map_err(|reason| TargetsError::BadUrl { entry: entry.to_string(), reason })?;
        if !keys.insert(key) {
            return Err(TargetsError::DuplicateKey(key));
        }
        out.push(target);
    }
    if out.is_empty() {
        return Err(TargetsError::Empty);
    }
    Ok(out)
}

/// `nbd://HOST:PORT/EXPORT` or `nbds://HOST:PORT/EXPORT` (IPv6 hosts in brackets).
pub fn parse_url(key: u32, url: &str) -> Result<Target, &'static str> {
    let (rest, tls) = match (url.strip_prefix("nbd://"), url.strip_prefix("nbds://")) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => return Err("the URL must start with nbd:// (or nbds://)"),
    };
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
        (host, after.strip_prefix(':').ok_or("the URL needs a port: nbd://HOST:PORT/EXPORT")?)
    } else {
        authority.rsplit_once(':').ok_or("the URL needs a port: nbd://HOST:PORT/EXPORT")?
    };
    if host.is_empty() {
        return Err("the URL has no host");
    }
    // A name or an address, nothing a resolver or a later print could read otherwise (a host
    // of "[1" once printed back as an unclosed bracket: found by fuzzing, `node::fuzzing`).
    if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')) {
        return Err("the host may hold letters, digits, '.', '-' and '_' (an IPv6 address in brackets)");
    }
    let port: u16 = port.parse().map_err(|_| "the port is not a number from 1 to 65535")?;
    if port == 0 {
        return Err("port 0 is not a port");
    }
    if export.contains(['?', '#']) {
        return Err("query strings and fragments are not supported in export names");
    }
    Ok(Target { key, host: host.to_string(), port, export: export.to_string(), tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_disks_parse_in_order() {
        let t = parse("2000:nbd://127.0.0.1:10100/pgtest1-disk0, 2001:nbd://127.0.0.1:10101/pgtest1-disk1").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            Target { key: 2000, host: "127.0.0.1".into(), port: 10100, export: "pgtest1-disk0".into(), tls: false }
        );
        let tls = parse("2000:nbds://10.0.0.1:10100/vm-disk0").unwrap();
        assert!(tls[0].tls);
        assert_eq!(tls[0].to_string(), "2000:nbds://10.0.0.1:10100/vm-disk0", "printed back as given");
        assert_eq!(t[1].key, 2001);
        assert_eq!(t[1].to_string(), "2001:nbd://127.0.0.1:10101/pgtest1-disk1");
    }

    #[test]
    fn ipv6_hosts_and_default_exports_are_accepted() {
        let t = parse("2000:nbd://[::1]:10809").unwrap();
        assert_eq!((t[0].host.as_str(), t[0].port, t[0].export.as_str()), ("::1", 10809, ""));
        assert_eq!(t[0].to_string(), "2000:nbd://[::1]:10809/", "printed back in brackets");
        assert_eq!(parse("2000:nbd://::1:10809").unwrap(), t, "the last colon is the port's");
    }

    #[test]
    fn every_malformed_entry_is_named() {
        assert_eq!(parse(""), Err(TargetsError::Empty));
        assert_eq!(parse(" , "), Err(TargetsError::Empty));
        assert!(matches!(parse("nbd://h:1/e"), Err(TargetsError::MissingKey(_))));
        assert!(matches!(parse(":nbd://h:1/e"), Err(TargetsError::MissingKey(_))));
        assert!(matches!(parse("disk:nbd://h:1/e"), Err(TargetsError::BadKey(_))));
        assert!(matches!(parse("2000:http://h:1/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://h/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://h:0/e"), Err(TargetsError::BadUrl { reason: "port 0 is not a port", .. })));
        assert!(matches!(parse("2000:nbd://h:99999/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://:1/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://[[1]:1809"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://a b:1/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://h@evil:1/e"), Err(TargetsError::BadUrl { .. })));
        assert!(matches!(parse("2000:nbd://h:1/e?x=1"), Err(TargetsError::BadUrl { .. })));
        assert_eq!(parse("2000:nbd://h:1/a,2000:nbd://h:2/b"), Err(TargetsError::DuplicateKey(2000)));
    }
}
