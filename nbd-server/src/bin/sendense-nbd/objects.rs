//! qemu-nbd's `--object` and `--tls-creds`: TLS credentials named the way qemu-nbd users
//! already name them, so a command line that served TLS with qemu-nbd serves it here.
//!
//! `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]` defines
//! credentials (qemu's key=value syntax, where `,,` is a comma inside a value; `dir` defaults to
//! qemu's `/etc/pki/qemu`, `verify-peer` to on, as in qemu: clients then need a certificate the
//! CA signed); `--tls-creds ID` requires TLS of every client with them. What qemu's objects can
//! say beyond that (PSK and anonymous credentials, secrets for an encrypted key, GnuTLS
//! priority strings, `--tls-authz` lists) is refused with a line saying so: accepting it and
//! doing something else would be a lie about who may connect.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use nbd_server::TlsCredentials;

/// qemu's default credentials directory.
const DEFAULT_DIR: &str = "/etc/pki/qemu";

/// A `tls-creds-x509` object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct X509Creds {
    id: String,
    dir: PathBuf,
    verify_peer: bool,
}

/// The credentials `--tls-creds` names among the `--object`s, loaded; `None` without
/// `--tls-creds`. Every object is checked, used or not, so a typo is an error at start.
pub fn tls_credentials(
    objects: &[String],
    tls_creds: Option<&str>,
    tls_authz: Option<&str>,
) -> anyhow::Result<Option<TlsCredentials>> {
    let mut defined: Vec<X509Creds> = Vec::new();
    for text in objects {
        let creds = parse_object(text).map_err(|e| anyhow!("--object {text}: {e}"))?;
        if defined.iter().any(|d| d.id == creds.id) {
            bail!("--object {text}: id '{}' is defined twice", creds.id);
        }
        defined.push(creds);
    }
    if let Some(authz) = tls_authz {
        bail!("--tls-authz {authz} is not implemented: with verify-peer=on any client certificate the CA signed is admitted");
    }
    let Some(id) = tls_creds else { return Ok(None) };
    let creds = defined
        .iter()
        .find(|d| d.id == id)
        .ok_or_else(|| anyhow!("--tls-creds {id}: no --object tls-creds-x509 has id={id}"))?;
    let loaded = TlsCredentials::from_x509_dir(&creds.dir, creds.verify_peer)
        .with_context(|| format!("--tls-creds {id} (dir={})", creds.dir.display()))?;
    Ok(Some(loaded))
}

/// One `--object` argument.
fn parse_object(text: &str) -> Result<X509Creds, String> {
    if text.trim_start().starts_with('{') {
        return Err("the JSON form is not supported; give TYPE,id=ID,key=value,...".into());
    }
    let mut fields = split_fields(text).into_iter();
    let first = fields.next().unwrap_or_default();
    let kind = first.strip_prefix("qom-type=").unwrap_or(&first).to_string();
    match kind.as_str() {
        "tls-creds-x509" => {}
        "tls-creds-psk" => {
            return Err("TLS-PSK is not supported (rustls has no PSK cipher suites); use tls-creds-x509".into())
        }
        "tls-creds-anon" => {
            return Err("anonymous TLS authenticates no one and is not supported; use tls-creds-x509".into())
        }
        other => return Err(format!("object type '{other}' is not supported; only tls-creds-x509 is")),
    }
    let (mut id, mut dir, mut endpoint, mut verify_peer) = (None, None, None, true);
    for field in fields {
        let (key, value) = field.split_once('=').ok_or_else(|| format!("'{field}' is not key=value"))?;
        match key {
            "id" => id = Some(value.to_string()),
            "dir" => dir = Some(PathBuf::from(value)),
            "endpoint" => endpoint = Some(value.to_string()),
            "verify-peer" => {
                verify_peer = parse_bool(value).ok_or_else(|| format!("verify-peer={value}: give on or off"))?
            }
            other => return Err(format!("'{other}' is not supported (id, dir, endpoint, verify-peer are)")),
        }
    }
    let id = id.filter(|i| !i.is_empty()).ok_or("id=ID is required")?;
    // qemu's default endpoint is the client's, which qemu-nbd refuses too.
    match endpoint.as_deref() {
        Some("server") => {}
        Some(other) => return Err(format!("endpoint={other}: a server's credentials need endpoint=server")),
        None => return Err("endpoint=server is required (qemu's default is client)".into()),
    }
    Ok(X509Creds { id, dir: dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)), verify_peer })
}

/// qemu's option syntax: fields separated by `,`, a doubled `,,` is one comma in a value.
fn split_fields(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                field.push(',');
            }
            ',' => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_s_x509_objects_parse_and_everything_else_is_refused_with_a_reason() {
        let ok = parse_object("tls-creds-x509,id=tls0,dir=/a,,b,endpoint=server,verify-peer=off").unwrap();
        assert_eq!(ok, X509Creds { id: "tls0".into(), dir: PathBuf::from("/a,b"), verify_peer: false });
        let defaults = parse_object("qom-type=tls-creds-x509,id=t,endpoint=server").unwrap();
        assert_eq!((defaults.dir, defaults.verify_peer), (PathBuf::from(DEFAULT_DIR), true));
        for (text, says) in [
            ("tls-creds-psk,id=t,dir=/d,endpoint=server", "PSK"),
            ("tls-creds-anon,id=t,endpoint=server", "anonymous"),
            ("secret,id=s,data=x", "'secret' is not supported"),
            ("tls-creds-x509,id=t,dir=/d", "endpoint=server is required"),
            ("tls-creds-x509,id=t,endpoint=client", "need endpoint=server"),
            ("tls-creds-x509,id=t,endpoint=server,priority=NORMAL", "'priority' is not supported"),
            ("tls-creds-x509,id=t,endpoint=server,passwordid=s", "'passwordid' is not supported"),
            ("tls-creds-x509,id=t,endpoint=server,verify-peer=maybe", "give on or off"),
            ("tls-creds-x509,dir=/d,endpoint=server", "id=ID is required"),
            (r#"{"qom-type":"tls-creds-x509"}"#, "JSON"),
        ] {
            let e = parse_object(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn tls_creds_must_name_a_defined_object_and_authz_is_refused() {
        let objects = ["tls-creds-x509,id=a,dir=/nonexistent,endpoint=server".to_string()];
        assert!(tls_credentials(&objects, None, None).unwrap().is_none(), "defined, not used: no TLS");
        let e = tls_credentials(&objects, Some("b"), None).unwrap_err().to_string();
        assert!(e.contains("no --object tls-creds-x509 has id=b"), "{e}");
        let e = tls_credentials(&objects, Some("a"), Some("authz0")).unwrap_err().to_string();
        assert!(e.contains("--tls-authz"), "{e}");
        let e = format!("{:#}", tls_credentials(&objects, Some("a"), None).unwrap_err());
        assert!(e.contains("/nonexistent/ca-cert.pem"), "{e}");
        let twice = [objects[0].clone(), objects[0].clone()];
        assert!(tls_credentials(&twice, None, None).unwrap_err().to_string().contains("defined twice"));
    }
}
