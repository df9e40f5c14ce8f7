//! TLS credentials of both ends. A server's ([`TlsCredentials`]) make its TCP and Unix listeners
//! the spec's FORCEDTLS server (`server/negotiate.rs`), as qemu-nbd's `--tls-creds` and nbdkit's
//! `--tls=require` do; a client's ([`ClientTls`]) make it send `NBD_OPT_STARTTLS` first and
//! check the server's certificate (`client/starttls.rs`).
//!
//! Loaded from the directory layout qemu's `tls-creds-x509` objects and libnbd use
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem` for a server; `ca-cert.pem` and
//! optionally `client-cert.pem`, `client-key.pem` for a client), so one PKI serves qemu, libnbd
//! and us; with `verify_peer` a server asks every client for a certificate that CA signed
//! (qemu's `verify-peer=on`), and a client always checks the server's against its CA and name.
//!
//! A `ca-crl.pem` in the directory (qemu's name; one or more PEM CRLs) is honoured as qemu and
//! libnbd honour it, never ignored: a peer whose certificate, or any certificate of its chain, a
//! list names is refused. As GnuTLS does, a certificate whose issuer has no list here counts as
//! not revoked, and a list past its next update still counts. A `ca-crl.pem` that holds no list,
//! or one that does not parse, stops the credentials from loading, and a list whose signature
//! does not check refuses the peers of its issuer: revocation the operator asked for is never
//! silently off.
//! rustls rather than GnuTLS bindings: pure Rust on the crypto provider the SSH tunnel already
//! links (aws-lc-rs), TLS 1.2 and 1.3 only. No TLS-PSK (rustls has none) and no anonymous
//! credentials: those are refused by whoever asks for them (`sendense-nbd`), never ignored.
//!
//! Credentials loaded from a directory are looked at again at each connection ([`Reloading`]:
//! each file's length, time and inode) and read again when one changed, so a certificate renewed
//! in place, a CA replaced or a revocation list put there takes effect from the next connection
//! without a restart (qemu-nbd reads its directory once); files that no longer load are logged
//! and the last good credentials serve on. The services' HTTPS APIs use the same.
//! Connections an embedder hands over as streams ([`crate::Server::serve_stream`]: SSH channels)
//! are not asked for TLS: their transport is already encrypted and authenticated.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::tls_authz::{Authorizing, ClientAuthz};

/// The CA certificate(s) a client's certificate must chain to, in a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (and any intermediates after it), in a credentials directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1, unencrypted), in a credentials directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// A client's certificate, in a client's credentials directory (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// A client's private key, in a client's credentials directory (with its certificate).
pub const CLIENT_KEY: &str = "client-key.pem";
/// Certificate revocation lists the peers' certificates are checked against (optional).
pub const CA_CRL: &str = "ca-crl.pem";

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing, unreadable, or holds no PEM item of the kind needed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificate and key (a key that does not match, say).
    #[error("TLS credentials refused: {0}")]
    Refused(#[from] rustls::Error),
    /// A client's certificate without its key, or its key without the certificate.
    #[error("{dir}: {CLIENT_CERT} and {CLIENT_KEY} go together: one of them is missing")]
    HalfAPair {
        /// The directory.
        dir: PathBuf,
    },
    /// The CA certificates cannot verify peers.
    #[error("{path}: cannot verify peers with it: {reason}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// TLS credentials of a server (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct TlsCredentials {
    source: Source,
}

/// Where a server's acceptor comes from.
#[derive(Clone)]
enum Source {
    /// An embedder's own configuration, as it is.
    Fixed(tokio_rustls::TlsAcceptor),
    /// A directory, read again when its files change.
    Dir(Arc<Reloading>),
}

impl std::fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCredentials").finish_non_exhaustive()
    }
}

impl TlsCredentials {
    /// Credentials from a directory laid out as qemu's `tls-creds-x509,dir=DIR,endpoint=server`
    /// wants it: `server-cert.pem` and `server-key.pem`, and, when `verify_peer`, `ca-cert.pem`,
    /// which every client's certificate must chain to.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<Self, TlsError> {
        let reloading = Reloading::server(dir, verify_peer, Vec::new(), "NBD TLS credentials")?;
        Ok(Self { source: Source::Dir(Arc::new(reloading)) })
    }

    /// As [`Self::from_x509_dir`] with `verify_peer`, and of the clients the CA signed only those
    /// `authz` admits by their certificate's subject (qemu-nbd's `--tls-authz`; see
    /// [`crate::tls_authz`] for the string it is given).
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn from_x509_dir_authorized(dir: &Path, authz: ClientAuthz) -> Result<Self, TlsError> {
        let reloading = Reloading::load(dir, Peers::Authorized(authz), Vec::new(), "NBD TLS credentials")?;
        Ok(Self { source: Source::Dir(Arc::new(reloading)) })
    }

    /// Credentials from an embedder's own rustls configuration (its certificate resolver,
    /// client verifier and protocol versions), used as they are.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> Self {
        Self { source: Source::Fixed(config.into()) }
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        match &self.source {
            Source::Fixed(acceptor) => acceptor.clone(),
            Source::Dir(reloading) => reloading.acceptor(),
        }
    }
}

/// Length, time and inode of each of `N` files: what tells that one was replaced (renamed over,
/// rewritten, added or removed).
pub type FilesStamp<const N: usize> = [Option<(u64, Option<SystemTime>, u64)>; N];

/// The [`FilesStamp`] of `names` in `dir`.
pub fn files_stamp<const N: usize>(dir: &Path, names: [&str; N]) -> FilesStamp<N> {
    names.map(|name| std::fs::metadata(dir.join(name)).ok().map(|m| (m.len(), m.modified().ok(), m.ino())))
}

/// A server's credentials from a directory in qemu's layout, read again when one of its files
/// changed (module doc): what [`TlsCredentials::from_x509_dir`] serves NBD with, and the services
/// their HTTPS APIs.
pub struct Reloading {
    dir: PathBuf,
    peers: Peers,
    alpn: Vec<Vec<u8>>,
    what: &'static str,
    loaded: Mutex<(FilesStamp<4>, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("dir", &self.dir).field("what", &self.what).finish_non_exhaustive()
    }
}

impl Reloading {
    /// `dir`'s server credentials (`server-cert.pem`, `server-key.pem`, and when `verify_peer`
    /// the `ca-cert.pem` every client's certificate must chain to, with `ca-crl.pem` if there),
    /// loaded now so that a directory that does not load stops the start; `alpn` the protocols
    /// offered, `what` what the log calls them.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn server(dir: &Path, verify_peer: bool, alpn: Vec<Vec<u8>>, what: &'static str) -> Result<Self, TlsError> {
        Self::load(dir, if verify_peer { Peers::Signed } else { Peers::Anyone }, alpn, what)
    }

    fn load(dir: &Path, peers: Peers, alpn: Vec<Vec<u8>>, what: &'static str) -> Result<Self, TlsError> {
        let stamp = Self::stamp(dir);
        let acceptor = Self::build(dir, &peers, &alpn)?;
        Ok(Self { dir: dir.to_path_buf(), peers, alpn, what, loaded: Mutex::new((stamp, acceptor)) })
    }

    /// The acceptor for a new connection: the files read again if they changed since.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Self::stamp(&self.dir);
        if now != loaded.0 {
            match Self::build(&self.dir, &self.peers, &self.alpn) {
                Ok(fresh) => {
                    tracing::info!(dir = %self.dir.display(), "{} read again: their files changed", self.what);
                    loaded.1 = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, "{} changed but do not load: the last ones serve on", self.what);
                }
            }
            // Not tried again until the files change again.
            loaded.0 = now;
        }
        loaded.1.clone()
    }

    fn build(dir: &Path, peers: &Peers, alpn: &[Vec<u8>]) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let mut config = build_server_config(dir, peers.clone())?;
        config.alpn_protocols = alpn.to_vec();
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    fn stamp(dir: &Path) -> FilesStamp<4> {
        files_stamp(dir, [SERVER_CERT, SERVER_KEY, CA_CERT, CA_CRL])
    }
}

/// A client's TLS credentials (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    hostname: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("hostname", &self.hostname).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Credentials from a directory laid out as libnbd's `tls-certificates` and qemu's
    /// `tls-creds-x509,endpoint=client` want it: `ca-cert.pem` (the server's certificate must
    /// chain to it), and `client-cert.pem` with `client-key.pem` when the server asks for a
    /// client certificate.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn from_x509_dir(dir: &Path) -> Result<Self, TlsError> {
        Ok(Self::from_rustls(Arc::new(client_config(dir)?)))
    }

    /// Credentials from an embedder's own rustls configuration.
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> Self {
        Self { connector: config.into(), hostname: None }
    }

    /// The name the server's certificate must carry, where it is not the host connected to
    /// (libnbd's `tls-hostname`); a Unix socket has no host, so it needs one.
    #[must_use]
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = Some(name.into());
        self
    }

    pub(crate) fn connector(&self) -> &tokio_rustls::TlsConnector {
        &self.connector
    }

    /// The name to check the server's certificate against: the one set, else `host`.
    pub(crate) fn server_name(&self, host: Option<&str>) -> Option<String> {
        self.hostname.clone().or_else(|| host.map(str::to_string))
    }
}

/// A rustls server configuration from a directory in qemu's layout: `server-cert.pem` (with any
/// intermediates after it) and `server-key.pem`, and, when `verify_peer`, `ca-cert.pem`, which
/// every client's certificate must chain to. What [`TlsCredentials::from_x509_dir`] serves NBD
/// with, for other servers of the same machine to share the layout (the services' HTTPS APIs).
///
/// # Errors
/// [`TlsError`] naming the file at fault.
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<rustls::ServerConfig, TlsError> {
    build_server_config(dir, if verify_peer { Peers::Signed } else { Peers::Anyone })
}

/// A rustls client configuration from a directory in qemu's client layout: `ca-cert.pem` (the
/// server's certificate must chain to it), `ca-crl.pem` if there, and `client-cert.pem` with
/// `client-key.pem` if there. What [`ClientTls::from_x509_dir`] connects with, for other clients
/// of the same PKI (the services' HTTPS clients).
///
/// # Errors
/// [`TlsError`] naming the file at fault.
pub fn client_config(dir: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let path = dir.join(CA_CERT);
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&path)?), Arc::clone(&provider))
            .with_crls(crls(dir)?)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| verifier_error(dir, path, e))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier);
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(builder.with_client_auth_cert(certificates(&cert)?, private_key(&key)?)?),
        (false, false) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsError::HalfAPair { dir: dir.to_path_buf() }),
    }
}

/// The clients a server admits.
#[derive(Clone)]
enum Peers {
    /// Any client, with or without a certificate.
    Anyone,
    /// Clients with a certificate the CA signed.
    Signed,
    /// Of those, the ones the embedder's decision admits.
    Authorized(ClientAuthz),
}

fn build_server_config(dir: &Path, peers: Peers) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions()?;
    let ca_verifier = || {
        let path = dir.join(CA_CERT);
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&path)?), Arc::clone(&provider))
            .with_crls(crls(dir)?)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| verifier_error(dir, path, e))
    };
    let builder = match peers {
        Peers::Anyone => builder.with_no_client_auth(),
        Peers::Signed => builder.with_client_cert_verifier(ca_verifier()?),
        Peers::Authorized(authz) => {
            builder.with_client_cert_verifier(Arc::new(Authorizing { inner: ca_verifier()?, authz }))
        }
    };
    let chain = certificates(&dir.join(SERVER_CERT))?;
    Ok(builder.with_single_cert(chain, private_key(&dir.join(SERVER_KEY))?)?)
}

/// A store of the CA certificates in `path`.
fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Verifier { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// Why a verifier of `dir`'s CA at `ca` could not be built, naming the file at fault: the
/// revocation lists', when one of them does not parse.
fn verifier_error(dir: &Path, ca: PathBuf, e: rustls::client::VerifierBuilderError) -> TlsError {
    let path = match e {
        rustls::client::VerifierBuilderError::InvalidCrl(_) => dir.join(CA_CRL),
        _ => ca,
    };
    TlsError::Verifier { path, reason: e.to_string() }
}

/// The revocation lists of `dir`'s `ca-crl.pem`: none without the file; at least one with it.
fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join(CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    pem_items(&path, "certificate revocation list")
}

/// The private key in `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), reason: format!("no private key read: {e}") })
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_items(path, "certificate")
}

/// Every PEM item of one kind (`what`) in `path`; at least one.
fn pem_items<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, TlsError> {
    let file_error = |reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let items = T::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if items.is_empty() {
        return Err(file_error(format!("no {what} in it")));
    }
    Ok(items)
}
