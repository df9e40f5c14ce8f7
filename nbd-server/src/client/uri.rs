//! NBD URIs (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) as the client takes
//! them: what the URI standard allows but this client cannot honour (TLS schemes, other query
//! parameters) is refused by name, never ignored.

use super::{ClientError, Result};

/// Where an NBD URI points.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    Tcp { host: String, port: u16, export: String },
    Unix { path: std::path::PathBuf, export: String },
}

/// Parse `uri`; see the module doc for what is accepted.
pub(super) fn parse_uri(uri: &str) -> Result<Target> {
    let bad = |why: &str| ClientError::Invalid(format!("NBD URI '{uri}': {why}"));
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, export) = match rest.split_once('/') {
        Some((a, e)) => (a, e.to_string()),
        None => (rest, String::new()),
    };
    match scheme {
        "nbd" => {
            if query.is_some() {
                return Err(bad("query parameters are not supported for TCP"));
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && !p.contains(']') => {
                    (h.trim_matches(['[', ']']).to_string(), p.parse().map_err(|_| bad("bad port"))?)
                }
                _ => (authority.trim_matches(['[', ']']).to_string(), 10809),
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            Ok(Target::Tcp { host, port, export })
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad("a Unix socket URI has no host"));
            }
            let mut path = None;
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("socket", p)) if path.is_none() => path = Some(std::path::PathBuf::from(p)),
                    _ => return Err(bad(&format!("unsupported query parameter '{pair}'"))),
                }
            }
            Ok(Target::Unix { path: path.ok_or_else(|| bad("needs ?socket=PATH"))?, export })
        }
        "nbds" | "nbds+unix" => Err(bad("TLS is not supported by this client")),
        other => Err(bad(&format!("unknown scheme '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_parse_and_what_cannot_be_honoured_is_refused() {
        let tcp = |h: &str, p: u16, e: &str| Target::Tcp { host: h.into(), port: p, export: e.into() };
        assert_eq!(parse_uri("nbd://127.0.0.1:10100/vm-disk0").unwrap(), tcp("127.0.0.1", 10100, "vm-disk0"));
        assert_eq!(parse_uri("nbd://hub").unwrap(), tcp("hub", 10809, ""));
        assert_eq!(parse_uri("nbd://[::1]:99/e").unwrap(), tcp("::1", 99, "e"));
        assert_eq!(
            parse_uri("nbd+unix:///d?socket=/run/x.sock").unwrap(),
            Target::Unix { path: "/run/x.sock".into(), export: "d".into() }
        );
        for bad in [
            "nbds://h/e",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/x",
            "nbd+unix:///e?socket=/x&tls=on",
            "nbd://h:port/e",
            "nbd://h/e?x=1",
            "http://h/e",
            "h:1/e",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
