//! TLS certificates for the workspace's tests, made on the spot (rcgen) in the directory layout
//! qemu's `tls-creds-x509` objects and libnbd's `tls-certificates` read, so one set serves
//! qemu-nbd, qemu-img, nbdinfo and our own server and client.
//!
//! A [`Pki`] is a temporary directory of credential directories: `server/` (a server's, for
//! `localhost` and `127.0.0.1`), `client/` (a client the CA signed), `anon/` (the CA only: no
//! client certificate), `rogue/` (a client another CA signed), `stranger/` (a client that
//! trusts another CA, not ours), `impostor/` (a server for the same names, another CA's) and
//! `both/` (a server's and a client's of our CA in one directory, as a service that serves an
//! API and calls others' holds them). The certificates carry the key usages qemu's sanity checks
//! want (a CA that signs, leaves that sign and encipher, each with its TLS purpose).

use std::path::PathBuf;

pub use rcgen::{string, DnType, DnValue};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Credential directories for TLS tests (module doc); removed on drop.
pub struct Pki {
    root: tempfile::TempDir,
    /// Our CA, kept to sign the clients [`Pki::client_with_subject`] makes.
    ca: (CertificateParams, KeyPair, String),
    /// Serial numbers [`Pki::revoke`] revoked so far.
    revoked: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Pki {
    /// A fresh CA, another CA, and the directories of the module doc.
    ///
    /// # Panics
    /// If the temporary directory or the keys cannot be made (a test's environment is broken).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("a temporary directory");
        let (ca_params, ca_key, ca_pem) = authority("sendense test CA");
        let ca = Issuer::from_params(&ca_params, &ca_key);
        let (other_params, other_key, other_pem) = authority("another CA");
        let other = Issuer::from_params(&other_params, &other_key);
        let put = |dir: &str, files: &[(&str, &str)]| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).expect("a credentials directory");
            for (name, text) in files {
                std::fs::write(d.join(name), text).expect("a credentials file");
            }
        };
        let (cert, key) = leaf(&ca, "server", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        put("server", &[("ca-cert.pem", &ca_pem), ("server-cert.pem", &cert), ("server-key.pem", &key)]);
        let (hub_cert, hub_key) = leaf(&ca, "hub", &[], ExtendedKeyUsagePurpose::ClientAuth);
        put(
            "both",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &cert),
                ("server-key.pem", &key),
                ("client-cert.pem", &hub_cert),
                ("client-key.pem", &hub_key),
            ],
        );
        let (cert, key) = leaf(&ca, "node", &[], ExtendedKeyUsagePurpose::ClientAuth);
        put("client", &[("ca-cert.pem", &ca_pem), ("client-cert.pem", &cert), ("client-key.pem", &key)]);
        put("stranger", &[("ca-cert.pem", &other_pem), ("client-cert.pem", &cert), ("client-key.pem", &key)]);
        put("anon", &[("ca-cert.pem", &ca_pem)]);
        let (cert, key) = leaf(&other, "intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);
        put("rogue", &[("ca-cert.pem", &ca_pem), ("client-cert.pem", &cert), ("client-key.pem", &key)]);
        let (cert, key) = leaf(&other, "impostor", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        put("impostor", &[("ca-cert.pem", &other_pem), ("server-cert.pem", &cert), ("server-key.pem", &key)]);
        Self { root, ca: (ca_params, ca_key, ca_pem), revoked: std::sync::Mutex::default() }
    }

    /// A client directory `name` (as `client/`) whose certificate, our CA's, has the subject
    /// `subject`: attributes in this order, each its own relative name.
    ///
    /// # Panics
    /// If the certificate cannot be made or written.
    #[allow(clippy::expect_used)]
    pub fn client_with_subject(&self, name: &str, subject: &[(DnType, DnValue)]) -> PathBuf {
        let (params, key, pem) = &self.ca;
        let ca = Issuer::from_params(params, key);
        let mut dn = DistinguishedName::new();
        for (kind, value) in subject {
            dn.push(kind.clone(), value.clone());
        }
        let (cert, key) = signed(&ca, dn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let d = self.dir(name);
        std::fs::create_dir_all(&d).expect("a credentials directory");
        for (file, text) in [("ca-cert.pem", pem), ("client-cert.pem", &cert), ("client-key.pem", &key)] {
            std::fs::write(d.join(file), text).expect("a credentials file");
        }
        d
    }

    /// Revoke the certificate of directory `revoked` (its `client-cert.pem`, else its
    /// `server-cert.pem`): a revocation list our CA signed naming it (and any revoked before) is
    /// written as `ca-crl.pem` into each directory of `into`, and returned (PEM).
    ///
    /// # Panics
    /// If the certificate cannot be read or the list made or written.
    #[allow(clippy::expect_used)]
    pub fn revoke(&self, revoked: &str, into: &[&str]) -> String {
        let dir = self.dir(revoked);
        let cert = [dir.join("client-cert.pem"), dir.join("server-cert.pem")]
            .into_iter()
            .find(|p| p.exists())
            .expect("a certificate to revoke");
        let pem = std::fs::read(cert).expect("the certificate");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("a PEM certificate");
        let serial = pem.parse_x509().expect("a certificate").tbs_certificate.raw_serial().to_vec();
        let mut serials = self.revoked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        serials.push(serial);
        let (params, key, _) = &self.ca;
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let list = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: rcgen::SerialNumber::from(serials.len() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let pem = list.signed_by(&Issuer::from_params(params, key)).expect("a revocation list").pem().expect("PEM");
        for d in into {
            std::fs::write(self.dir(d).join("ca-crl.pem"), &pem).expect("a credentials file");
        }
        pem
    }

    /// One of the credential directories (`server`, `client`, `anon`, `rogue`, `stranger`,
    /// `impostor`, `both`).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// qemu-nbd's (and sendense-nbd's) flags that require TLS with `server/`, the object's id
    /// `tls0`, and `verify-peer` as given (`on` or `off`).
    pub fn server_flags(&self, verify_peer: &str) -> Vec<String> {
        let object = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={verify_peer}",
            self.dir("server").display()
        );
        vec!["--object".into(), object, "--tls-creds".into(), "tls0".into()]
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A CA: its parameters and key (to sign with) and its certificate's PEM.
#[allow(clippy::expect_used)]
fn authority(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).expect("a CA certificate").pem();
    (params, key, pem)
}

/// A certificate the issuer signed, and its key, as PEM.
#[allow(clippy::expect_used)]
fn leaf(
    issuer: &Issuer<'_, &KeyPair>,
    name: &str,
    sans: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    signed(issuer, dn, sans, purpose)
}

/// A certificate of subject `dn` the issuer signed, and its key, as PEM.
#[allow(clippy::expect_used)]
fn signed(
    issuer: &Issuer<'_, &KeyPair>,
    dn: DistinguishedName,
    sans: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("a key");
    let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("certificate parameters");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![purpose];
    (params.signed_by(&key, issuer).expect("a certificate").pem(), key.serialize_pem())
}
