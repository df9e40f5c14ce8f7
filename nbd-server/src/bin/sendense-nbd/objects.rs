//! qemu-nbd's `--object`, `--tls-creds` and `--tls-authz`: TLS credentials and who may use them,
//! named the way qemu-nbd users already name them, so a command line that served TLS with
//! qemu-nbd serves it here.
//!
//! `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]` defines
//! credentials (qemu's key=value syntax, where `,,` is a comma inside a value; `dir` defaults to
//! qemu's `/etc/pki/qemu`, `verify-peer` to on, as in qemu: clients then need a certificate the
//! CA signed); `--tls-creds ID` requires TLS of every client with them. `--object authz-simple`,
//! `authz-list` or `authz-listfile` with `--tls-authz ID` admit, of those clients, the ones the
//! object names by their certificate's subject (`authz.rs`). What qemu's objects can say beyond
//! that (PSK and anonymous credentials, secrets for an encrypted key, GnuTLS priority strings,
//! PAM) is refused with a line saying so: accepting it and doing something else would be a lie
//! about who may connect.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use nbd_server::TlsCredentials;

use crate::authz::{self, Authz};

/// qemu's default credentials directory.
const DEFAULT_DIR: &str = "/etc/pki/qemu";

/// A `tls-creds-x509` object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct X509Creds {
    id: String,
    dir: PathBuf,
    verify_peer: bool,
}

/// One `--object`, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Object {
    Creds(X509Creds),
    Authz { id: String, authz: Authz },
}

impl Object {
    fn id(&self) -> &str {
        match self {
            Self::Creds(c) => &c.id,
            Self::Authz { id, .. } => id,
        }
    }
}

/// The credentials `--tls-creds` names among the `--object`s, loaded, with the authorization
/// `--tls-authz` names; `None` without `--tls-creds`. Every object is checked, used or not, so a
/// typo is an error at start.
pub fn tls_credentials(
    objects: &[String],
    tls_creds: Option<&str>,
    tls_authz: Option<&str>,
) -> anyhow::Result<Option<TlsCredentials>> {
    let mut defined: Vec<Object> = Vec::new();
    for text in objects {
        let object = parse_object(text).map_err(|e| anyhow!("--object {text}: {e}"))?;
        if defined.iter().any(|d| d.id() == object.id()) {
            bail!("--object {text}: id '{}' is defined twice", object.id());
        }
        defined.push(object);
    }
    let authz = match tls_authz {
        None => None,
        Some(id) => Some(
            defined
                .iter()
                .find_map(|d| match d {
                    Object::Authz { id: have, authz } if have == id => Some(authz),
                    _ => None,
                })
                .ok_or_else(|| {
                    anyhow!("--tls-authz {id}: no --object authz-simple, authz-list or authz-listfile has id={id}")
                })?,
        ),
    };
    let Some(id) = tls_creds else {
        if let Some(id) = tls_authz {
            bail!("--tls-authz {id} needs --tls-creds: it decides among TLS clients");
        }
        return Ok(None);
    };
    let creds = defined
        .iter()
        .find_map(|d| match d {
            Object::Creds(c) if c.id == id => Some(c),
            _ => None,
        })
        .ok_or_else(|| anyhow!("--tls-creds {id}: no --object tls-creds-x509 has id={id}"))?;
    let loaded = match authz {
        None => TlsCredentials::from_x509_dir(&creds.dir, creds.verify_peer),
        Some(_) if !creds.verify_peer => bail!(
            "--tls-authz with --tls-creds {id}, whose verify-peer=off asks clients for no certificate: nothing to \
             authorize (qemu-nbd would admit every client); set verify-peer=on"
        ),
        Some(authz) => {
            let decide =
                authz::decision(authz).map_err(|e| anyhow!("--tls-authz {}: {e}", tls_authz.unwrap_or_default()))?;
            TlsCredentials::from_x509_dir_authorized(&creds.dir, decide)
        }
    };
    let loaded = loaded.with_context(|| format!("--tls-creds {id} (dir={})", creds.dir.display()))?;
    Ok(Some(loaded))
}

/// One `--object` argument.
fn parse_object(text: &str) -> Result<Object, String> {
    if text.trim_start().starts_with('{') {
        return Err("the JSON form is not supported; give TYPE,id=ID,key=value,...".into());
    }
    let mut fields = split_fields(text).into_iter();
    let first = fields.next().unwrap_or_default();
    let kind = first.strip_prefix("qom-type=").unwrap_or(&first).to_string();
    match kind.as_str() {
        "tls-creds-x509" => {}
        "authz-simple" | "authz-list" | "authz-listfile" | "authz-pam" => {
            let (id, authz) = authz::parse(&kind, &fields.collect::<Vec<_>>())?;
            return Ok(Object::Authz { id, authz });
        }
        "tls-creds-psk" => {
            return Err("TLS-PSK is not supported (rustls has no PSK cipher suites); use tls-creds-x509".into())
        }
        "tls-creds-anon" => {
            return Err("anonymous TLS authenticates no one and is not supported; use tls-creds-x509".into())
        }
        other => {
            return Err(format!(
            "object type '{other}' is not supported; tls-creds-x509, authz-simple, authz-list and authz-listfile are"
        ))
        }
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
    Ok(Object::Creds(X509Creds { id, dir: dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)), verify_peer }))
}

/// qemu's option syntax: fields separated by `,`, a doubled `,,` is one comma in a value.
pub fn split_fields(text: &str) -> Vec<String> {
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

pub fn parse_bool(value: &str) -> Option<bool> {
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
        assert_eq!(ok, Object::Creds(X509Creds { id: "tls0".into(), dir: PathBuf::from("/a,b"), verify_peer: false }));
        let defaults = parse_object("qom-type=tls-creds-x509,id=t,endpoint=server").unwrap();
        assert_eq!(
            defaults,
            Object::Creds(X509Creds { id: "t".into(), dir: PathBuf::from(DEFAULT_DIR), verify_peer: true })
        );
        let authz = parse_object("authz-simple,id=a0,identity=CN=x,,O=y").unwrap();
        assert_eq!(authz, Object::Authz { id: "a0".into(), authz: Authz::Simple("CN=x,O=y".into()) });
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
    fn tls_creds_and_tls_authz_must_name_defined_objects_of_their_kind() {
        let creds = "tls-creds-x509,id=a,dir=/nonexistent,endpoint=server".to_string();
        let objects = [creds.clone()];
        assert!(tls_credentials(&objects, None, None).unwrap().is_none(), "defined, not used: no TLS");
        let e = tls_credentials(&objects, Some("b"), None).unwrap_err().to_string();
        assert!(e.contains("no --object tls-creds-x509 has id=b"), "{e}");
        let e = tls_credentials(&objects, Some("a"), Some("authz0")).unwrap_err().to_string();
        assert!(e.contains("--tls-authz authz0: no --object authz-simple"), "{e}");
        let e = format!("{:#}", tls_credentials(&objects, Some("a"), None).unwrap_err());
        assert!(e.contains("/nonexistent/ca-cert.pem"), "{e}");
        let twice = [objects[0].clone(), objects[0].clone()];
        assert!(tls_credentials(&twice, None, None).unwrap_err().to_string().contains("defined twice"));
        let with_authz = [creds.clone(), "authz-simple,id=z,identity=CN=x".to_string()];
        let e = tls_credentials(&with_authz, None, Some("z")).unwrap_err().to_string();
        assert!(e.contains("needs --tls-creds"), "{e}");
        let e = tls_credentials(&with_authz, Some("z"), None).unwrap_err().to_string();
        assert!(e.contains("no --object tls-creds-x509 has id=z"), "{e}");
        let unverified =
            ["tls-creds-x509,id=a,dir=/d,endpoint=server,verify-peer=off".to_string(), with_authz[1].clone()];
        let e = tls_credentials(&unverified, Some("a"), Some("z")).unwrap_err().to_string();
        assert!(e.contains("verify-peer=off"), "{e}");
    }
}
