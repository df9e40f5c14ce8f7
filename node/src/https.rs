//! The services' APIs over HTTPS (`api_tls = DIR` in node.toml and hub.toml, `--api-tls DIR`):
//! in direct mode an API crosses a network, and its bearer tokens and job requests must not
//! travel in clear. [`crate::api_server`] runs [`handshake`] on each connection it accepts when
//! the API has an [`ApiTls`].
//!
//! A plain-HTTP request (its first byte does not open a TLS record) is answered with the API's
//! JSON error, a 400 saying to use `https://`, rather than a reset: that mistake is the usual one.
//! A handshake gets [`HANDSHAKE_TIMEOUT`], so that a client that connects and stays silent holds
//! its connection slot only that long.
//!
//! The directory is in qemu's layout, as the NBD ports' `nbd_tls` is (`server-cert.pem` with
//! any intermediates, `server-key.pem`), so one PKI serves both. The two files are looked at
//! again at each connection and read again when either changed (length, time, inode), so a
//! certificate renewed in place needs no restart; one that does not load is logged and the last
//! good one goes on serving. The bearer token authenticates clients, as over the tunnel; with
//! `api_client_certs` they must also present a certificate the directory's `ca-cert.pem`
//! signed (the NBD ports' `verify-peer`), so that a peer without one never reaches the HTTP
//! parser, and a stolen token alone is not enough; the CA file is then watched as the others
//! are, and so is a `ca-crl.pem` beside it (revocation lists, as the NBD ports read them): a
//! list renewed in place refuses the certificates it revokes from the next connection on. rustls (`tokio-rustls`) on the crypto provider the tunnel and the NBD ports already use;
//! HTTP/1.1 is the protocol offered (ALPN).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nbd_server::tls::{Reloading, TlsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish its handshake (or send its plain-HTTP request).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record that carries a handshake (RFC 8446 5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The body of the answer to a request in clear, in the APIs' error shape.
const PLAIN_HTTP_REFUSAL: &str =
    r#"{"error":"this API is served over HTTPS (api_tls): use https://","code":"https_required"}"#;

/// What node.toml and hub.toml say of their API's TLS: `api_tls = DIR` and
/// `api_client_certs = true|false` (`--api-tls DIR`, `--api-client-certs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTlsSetting {
    /// The credentials' directory, in qemu's layout.
    pub dir: PathBuf,
    /// Clients must present a certificate `DIR/ca-cert.pem` signed.
    pub client_certs: bool,
}

impl ApiTlsSetting {
    /// The setting of the two keys: none without `api_tls`.
    ///
    /// # Errors
    /// `api_client_certs` without `api_tls`: there is no CA to check clients against.
    pub fn from_keys(dir: Option<PathBuf>, client_certs: bool) -> Result<Option<Self>, String> {
        match dir {
            Some(dir) => Ok(Some(Self { dir, client_certs })),
            None if client_certs => Err("api_client_certs needs api_tls (its ca-cert.pem checks the clients)".into()),
            None => Ok(None),
        }
    }
}

/// The server certificate of an API, read again when its files change (module doc):
/// `nbd_server::tls::Reloading`, offering HTTP/1.1.
#[derive(Debug)]
pub struct ApiTls {
    reloading: Reloading,
}

impl ApiTls {
    /// The credentials in `dir` (`server-cert.pem`, `server-key.pem`, and with `client_certs`
    /// the `ca-cert.pem` that must have signed every client's certificate, with `ca-crl.pem` if
    /// there), loaded now so that a directory that does not load stops the start.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn load(dir: &Path, client_certs: bool) -> Result<Self, TlsError> {
        // HTTP/1.1: what the routers serve.
        let reloading = Reloading::server(dir, client_certs, vec![b"http/1.1".to_vec()], "API certificates")?;
        Ok(Self { reloading })
    }

    /// [`ApiTls::load`] of the setting, if there is one: what the services check their
    /// configuration with (at start and on reload) and serve with.
    ///
    /// # Errors
    /// The directory does not load: the message names the setting and the file.
    pub fn from_setting(setting: Option<&ApiTlsSetting>) -> Result<Option<Arc<Self>>, String> {
        setting
            .map(|s| {
                Self::load(&s.dir, s.client_certs)
                    .map(Arc::new)
                    .map_err(|e| format!("api_tls = {}: {e}", s.dir.display()))
            })
            .transpose()
    }

    /// The acceptor for a new connection: the files read again if they changed since.
    fn acceptor(&self) -> TlsAcceptor {
        self.reloading.acceptor()
    }
}

/// TLS on one connection with `tls`'s certificate of the moment, within [`HANDSHAKE_TIMEOUT`];
/// `None` when it did not come about (the reason logged), a request in clear answered first.
pub(crate) async fn handshake(tls: &ApiTls, stream: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    let acceptor = tls.acceptor();
    let work = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            tracing::debug!(%peer, "plain HTTP to the HTTPS API: refused");
            refuse_plain_http(stream).await;
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                None
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
        Ok(connection) => connection,
        Err(_) => {
            tracing::debug!(%peer, "API TLS handshake not finished in time");
            None
        }
    }
}

/// The 400 of a request in clear, after taking in what the client sent (so that closing does
/// not reset the connection under its reading).
async fn refuse_plain_http(mut stream: TcpStream) {
    let mut request = [0u8; 4096];
    let _ = stream.read(&mut request).await;
    let _ = stream.write_all(plain_http_refusal().as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn plain_http_refusal() -> String {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PLAIN_HTTP_REFUSAL}",
        PLAIN_HTTP_REFUSAL.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_an_api_error() {
        let text = plain_http_refusal();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 ") && head.contains(&format!("content-length: {}\r\n", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "https_required");
    }
}
