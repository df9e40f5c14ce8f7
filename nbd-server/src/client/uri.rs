//! NBD URIs as the client takes them: `nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`, and their TLS forms `nbds://` and `nbds+unix://`, which
//! take libnbd's `tls-certificates=DIR` (qemu's and libnbd's file names, see `crate::tls`) and
//! `tls-hostname=NAME`. What the URI standard allows but this client cannot honour (other query
//! parameters, such as `tls-verify-peer=false` or `tls-psk-file`) is refused by name, never
//! ignored.

use std::path::PathBuf;

use super::{ClientError, Result};

/// Where an NBD URI points, and how.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) place: Place,
    pub(super) export: String,
    /// `Some` for the TLS schemes.
    pub(super) tls: Option<TlsQuery>,
}

/// The transport's address.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Place {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// What a TLS URI says about its credentials.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsQuery {
    /// `tls-certificates=DIR`.
    pub(super) certificates: Option<PathBuf>,
    /// `tls-hostname=NAME`.
    pub(super) hostname: Option<String>,
}

/// Parse `uri`; see the module doc for what is accepted.
pub(super) fn parse_uri(uri: &str) -> Result<Target> {
    let bad = |why: &str| ClientError::Invalid(format!("NBD URI '{uri}': {why}"));
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let (authority, export) = match rest.split_once('/') {
        Some((a, e)) => (a, e.to_string()),
        None => (rest, String::new()),
    };
    let (unix, tls) = match scheme {
        "nbd" => (false, None),
        "nbd+unix" => (true, None),
        "nbds" => (false, Some(TlsQuery::default())),
        "nbds+unix" => (true, Some(TlsQuery::default())),
        other => return Err(bad(&format!("unknown scheme '{other}'"))),
    };
    let mut tls = tls;
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match (pair.split_once('='), tls.as_mut()) {
            (Some(("socket", p)), _) if unix && socket.is_none() => socket = Some(PathBuf::from(p)),
            (Some(("tls-certificates", d)), Some(t)) if t.certificates.is_none() => {
                t.certificates = Some(PathBuf::from(d));
            }
            (Some(("tls-hostname", h)), Some(t)) if t.hostname.is_none() => t.hostname = Some(h.to_string()),
            _ => return Err(bad(&format!("unsupported query parameter '{pair}'"))),
        }
    }
    let place = if unix {
        if !authority.is_empty() {
            return Err(bad("a Unix socket URI has no host"));
        }
        Place::Unix { path: socket.ok_or_else(|| bad("needs ?socket=PATH"))? }
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') => {
                (h.trim_matches(['[', ']']).to_string(), p.parse().map_err(|_| bad("bad port"))?)
            }
            _ => (authority.trim_matches(['[', ']']).to_string(), 10809),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Place::Tcp { host, port }
    };
    Ok(Target { place, export, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_parse_and_what_cannot_be_honoured_is_refused() {
        let tcp = |h: &str, p: u16, e: &str| Target {
            place: Place::Tcp { host: h.into(), port: p },
            export: e.into(),
            tls: None,
        };
        assert_eq!(parse_uri("nbd://127.0.0.1:10100/vm-disk0").unwrap(), tcp("127.0.0.1", 10100, "vm-disk0"));
        assert_eq!(parse_uri("nbd://hub").unwrap(), tcp("hub", 10809, ""));
        assert_eq!(parse_uri("nbd://[::1]:99/e").unwrap(), tcp("::1", 99, "e"));
        assert_eq!(
            parse_uri("nbd+unix:///d?socket=/run/x.sock").unwrap(),
            Target { place: Place::Unix { path: "/run/x.sock".into() }, export: "d".into(), tls: None }
        );
        assert_eq!(
            parse_uri("nbds://h:1/e?tls-certificates=/etc/pki/x&tls-hostname=hub.lan").unwrap(),
            Target {
                place: Place::Tcp { host: "h".into(), port: 1 },
                export: "e".into(),
                tls: Some(TlsQuery { certificates: Some("/etc/pki/x".into()), hostname: Some("hub.lan".into()) }),
            }
        );
        assert_eq!(
            parse_uri("nbds+unix:///e?socket=/s").unwrap().tls,
            Some(TlsQuery::default()),
            "credentials may come from the options"
        );
        for bad in [
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/x",
            "nbd+unix:///e?socket=/x&tls=on",
            "nbd://h/e?tls-certificates=/x",
            "nbds://h/e?tls-verify-peer=false",
            "nbds://h/e?tls-psk-file=/k",
            "nbds://h/e?tls-certificates=/a&tls-certificates=/b",
            "nbd://h:port/e",
            "nbd://h/e?x=1",
            "http://h/e",
            "h:1/e",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
