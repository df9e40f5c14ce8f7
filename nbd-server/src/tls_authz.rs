//! Which clients a TLS server admits beyond "the CA signed its certificate": qemu-nbd's
//! `--tls-authz`. A client's certificate is checked against the CA first (rustls's WebPKI
//! verifier, unchanged); its subject is then written out as a distinguished-name string and
//! handed to the embedder's [`ClientAuthz`], which says yes or no. A no fails the TLS handshake
//! (alert `access_denied`), so the client never reaches option haggling, as with qemu-nbd.
//!
//! The string is the one qemu checks its `authz-simple` identities and `authz-list` rules
//! against: GnuTLS's `gnutls_x509_crt_get_dn` output, so an identity written for qemu-nbd admits
//! the same clients here. That form was read off qemu-nbd 10 itself (its denial message prints
//! it), and `sendense-nbd`'s tests compare with it: relative names in certificate order joined by
//! `,` (several values of one joined by `+`), GnuTLS's attribute names (`CN`, `O`, `OU`, `C`, `ST`,
//! `L`, `EMAIL`, `DC`, `UID`, `title`, `givenName`...), values as UTF-8 with `,` `+` `"` `\` `<`
//! `>` `;` escaped by a backslash, and a leading `#` or space and a trailing space too.
//! An attribute GnuTLS has no name for is its dotted OID with the value's DER in hex
//! (`1.2.3.4=#0c02...`); so is a value of a string type decoded differently by GnuTLS than here
//! (T.61), which can only make a rule fail to match, never match another certificate.
//! x509-parser reads the certificate: a maintained DER parser for bytes a peer chose, rather
//! than one of our own.

use std::fmt::Write as _;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::der_parser::asn1_rs::{Any, Class, Tag};
use x509_parser::prelude::{FromDer, X509Certificate};

/// An embedder's decision on a client, from its certificate's subject in GnuTLS's string form
/// (module doc): `true` admits it. Called once per handshake, on the runtime: keep it quick.
pub type ClientAuthz = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// GnuTLS's names for the attributes it names (the others are written as dotted OIDs).
const NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "surName"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.13", "description"),
    ("2.5.4.15", "businessCategory"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "givenName"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// The subject of the certificate `der` in GnuTLS's string form (module doc).
///
/// # Errors
/// The certificate does not parse (its reason).
pub fn subject_name(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut out = String::new();
    for (i, rdn) in cert.subject().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            let named = NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n);
            match (named, text(atv.attr_value())) {
                (Some(name), Some(value)) => {
                    out.push_str(name);
                    out.push('=');
                    escape_into(&mut out, &value);
                }
                _ => {
                    out.push_str(&oid);
                    out.push_str("=#");
                    hex_tlv_into(&mut out, atv.attr_value());
                }
            }
        }
    }
    Ok(out)
}

/// A value of a string type as text; `None` for other types and for bytes that are not text.
fn text(value: &Any<'_>) -> Option<String> {
    if value.class() != Class::Universal {
        return None;
    }
    let data = value.data;
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString | Tag::VisibleString => {
            std::str::from_utf8(data).ok().map(str::to_string)
        }
        Tag::BmpString if data.len() % 2 == 0 => {
            let units: Option<Vec<u16>> =
                data.chunks_exact(2).map(|c| c.try_into().ok().map(u16::from_be_bytes)).collect();
            char::decode_utf16(units?).collect::<Result<_, _>>().ok()
        }
        Tag::UniversalString if data.len() % 4 == 0 => {
            data.chunks_exact(4).map(|c| c.try_into().ok().map(u32::from_be_bytes).and_then(char::from_u32)).collect()
        }
        _ => None,
    }
}

/// `value` with the characters a distinguished name's syntax gives a meaning escaped.
fn escape_into(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let edge = (i == 0 && (c == '#' || c == ' ')) || (i == last && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The value's whole DER encoding (identifier, length, contents) in lower-case hex.
fn hex_tlv_into(out: &mut String, value: &Any<'_>) {
    let mut der: Vec<u8> = match value.header.raw_tag() {
        Some(raw) => raw.to_vec(),
        None => {
            let class = (value.class() as u8) << 6;
            let constructed = if value.header.is_constructed() { 0x20 } else { 0 };
            // Tag numbers past 30 come with their raw bytes from the parser; a low one fits.
            vec![class | constructed | (value.tag().0 & 0x1f) as u8]
        }
    };
    let len = value.data.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let significant: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        der.push(0x80 | significant.len() as u8);
        der.extend_from_slice(&significant);
    }
    der.extend_from_slice(value.data);
    for b in der {
        let _ = write!(out, "{b:02x}");
    }
}

/// A client verifier that asks [`ClientAuthz`] after the CA's verifier accepted a certificate.
pub(crate) struct Authorizing {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) authz: ClientAuthz,
}

impl std::fmt::Debug for Authorizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizing").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for Authorizing {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let name = subject_name(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "TLS client refused: its certificate's subject cannot be read");
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
        })?;
        if (self.authz)(&name) {
            tracing::debug!(identity = %name, "TLS client admitted by the authorization");
            Ok(verified)
        } else {
            tracing::warn!(identity = %name, "TLS client refused: its certificate's subject is not authorized");
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_where_gnutls_escapes_them() {
        for (value, written) in [
            ("plain", "plain"),
            ("Example, Org", "Example\\, Org"),
            (" laptop \"x\" #1 ", "\\ laptop \\\"x\\\" #1\\ "),
            ("#hash", "\\#hash"),
            ("x;y<z>=w\\v+u", "x\\;y\\<z\\>=w\\\\v\\+u"),
            ("tab\tend", "tab\tend"),
            ("Ünïcode ☃", "Ünïcode ☃"),
            (" ", "\\ "),
            ("", ""),
        ] {
            let mut out = String::new();
            escape_into(&mut out, value);
            assert_eq!(out, written, "{value:?}");
        }
    }

    #[test]
    fn what_does_not_parse_is_an_error_not_a_panic() {
        for der in [&[][..], &[0x30], &[0x30, 0x82, 0xff, 0xff], &[0x30, 0x03, 0x02, 0x01, 0x00]] {
            assert!(subject_name(der).is_err(), "{der:?}");
        }
    }
}
