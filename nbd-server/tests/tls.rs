//! TLS against real clients: libnbd (nbdinfo, nbdcopy) and qemu (qemu-img) through
//! `sendense-nbd --object tls-creds-x509,... --tls-creds ID`, with certificates made by the test
//! in qemu's directory layout (`testpki`); clients without TLS, without a certificate the CA signed, or that
//! do not trust the server get nothing; the library's own path with a rustls client, and
//! clients that break the upgrade.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd_server::proto::consts::{opt, rep, IHAVEOPT};
use nbd_server::proto::handshake::{encode_info_request, GREETING_LEN};
use nbd_server::{
    Backend, Client, ClientError, ClientOptions, ClientTls, MemoryBackend, Server, ServerConfig, TlsCredentials,
};
use testpki::Pki;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn nbds(peer: &Peer, certs: &Path) -> String {
    format!("nbds://127.0.0.1:{}/{}?tls-certificates={}", peer.port, peer.name, certs.display())
}

#[test]
fn libnbd_and_qemu_read_and_write_through_tls_and_the_image_is_the_same() {
    require("nbdinfo");
    require("nbdcopy");
    require("qemu-img");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(24 << 20, 11);
    let source = write_file(dir.path(), "source.raw", &data);
    let target = sparse_file(dir.path(), "target.raw", data.len() as u64);
    let mut flags = pki.server_flags("on");
    flags.push("--shared=4".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let peer = start_sendense(&target, "disk", &flags);

    // libnbd: the size over TLS, then a copy in with four connections.
    let info = run(Command::new("nbdinfo").arg("--size").arg(nbds(&peer, &pki.dir("client"))));
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), data.len().to_string());
    run(Command::new("nbdcopy").args(["--connections=4", "--flush"]).arg(&source).arg(nbds(&peer, &pki.dir("client"))));
    assert_same_content(&source, &target);

    // qemu as the client, with its own tls-creds object: it reads the export back equal.
    let client_object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.dir("client").display());
    let export = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{}"}},"export":"disk","tls-creds":"tls0"}}}}"#,
        peer.port
    );
    let compared = run(Command::new("qemu-img")
        .args(["compare", "--object", &client_object, "-f", "raw"])
        .arg(&source)
        .arg(&export));
    assert!(String::from_utf8_lossy(&compared.stdout).contains("Images are identical"));
    drop(peer);

    // The same over a Unix socket (-k), the client naming the host its certificate is for.
    let socket = dir.path().join("nbd.sock");
    let _server = start_sendense_on_socket(&target, "disk", &socket, &pki.server_flags("on"));
    let url = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}&tls-hostname=localhost",
        socket.display(),
        pki.dir("client").display()
    );
    let info = run(Command::new("nbdinfo").arg("--size").arg(&url));
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), data.len().to_string());
}

#[test]
fn clients_without_tls_or_a_certificate_the_ca_signed_get_nothing() {
    require("nbdinfo");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let image = write_file(dir.path(), "disk.raw", &pattern(1 << 20, 3));
    let flags = pki.server_flags("on");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let peer = start_sendense(&image, "disk", &flags);
    let refused = |url: String| {
        let out = Command::new("nbdinfo").arg("--size").arg(&url).output().unwrap();
        assert!(!out.status.success(), "{url} was served: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // In clear: refused with NBD_REP_ERR_TLS_REQD, which libnbd reports as such.
    let said = refused(peer.url());
    assert!(said.contains("requires TLS"), "{said}");
    // No client certificate, one another CA signed, or a client that cannot trust the server.
    for who in ["anon", "rogue", "stranger"] {
        refused(nbds(&peer, &pki.dir(who)));
    }
    // Still serving the client it should.
    run(Command::new("nbdinfo").arg("--size").arg(nbds(&peer, &pki.dir("client"))));
    drop(peer);

    // verify-peer=off: any client that trusts the server, with or without a certificate.
    let flags = pki.server_flags("off");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let peer = start_sendense(&image, "disk", &flags);
    let info = run(Command::new("nbdinfo").arg("--size").arg(nbds(&peer, &pki.dir("anon"))));
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), (1u64 << 20).to_string());
    refused(nbds(&peer, &pki.dir("stranger")));
}

#[test]
fn credentials_that_cannot_be_loaded_stop_sendense_nbd_with_one_line_naming_the_file() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_file(dir.path(), "disk.raw", 1 << 20);
    std::fs::remove_file(pki.dir("server").join("server-key.pem")).unwrap();
    let out = Command::new(sendense_nbd()).args(pki.server_flags("on")).arg(&image).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("server-key.pem"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for (args, says) in [
        (vec!["--object", "tls-creds-psk,id=p,dir=/x,endpoint=server", "--tls-creds", "p"], "TLS-PSK"),
        (vec!["--tls-creds", "tls0"], "no --object tls-creds-x509 has id=tls0"),
    ] {
        let out = Command::new(sendense_nbd()).args(&args).arg(&image).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The subject of a client directory's certificate, as `--tls-authz` sees it.
fn subject_of(client: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(client.join("client-cert.pem")).unwrap();
    nbd_server::tls_authz::subject_name(&der).unwrap()
}

/// qemu-nbd or sendense-nbd serving `image` as `disk` with TLS (`server/`, verify-peer=on) and
/// `--object AUTHZ --tls-authz auth0`.
fn start_authorizing(server: &str, image: &Path, pki: &Pki, authz: &str) -> Peer {
    let mut flags = pki.server_flags("on");
    flags.extend(["--object".to_string(), authz.to_string(), "--tls-authz".into(), "auth0".into()]);
    start_with_flags(server, image, &flags)
}

/// qemu-nbd or sendense-nbd serving `image` as `disk` with `flags`.
fn start_with_flags(server: &str, image: &Path, flags: &[String]) -> Peer {
    if server == "sendense-nbd" {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        return start_sendense(image, "disk", &flags);
    }
    let port = free_port();
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-p", &port.to_string(), "-b", "127.0.0.1", "-t"])
        .args(flags)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    Peer { child: Reaped(child), port, name: "disk".into() }
}

/// Whether nbdinfo with the client directory `client` is served by `peer`.
fn admitted(peer: &Peer, client: &Path) -> bool {
    Command::new("nbdinfo").arg("--size").arg(nbds(peer, client)).output().unwrap().status.success()
}

/// `ca-crl.pem` in the credentials directory, as qemu and libnbd read it: qemu-nbd and
/// sendense-nbd given the same directory refuse the client its list revokes and admit another;
/// a client whose directory's list revokes the server's certificate (libnbd's nbdinfo, our
/// client) refuses both servers; a list that does not parse stops sendense-nbd naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_lists_refuse_the_peers_they_revoke_as_qemu_nbd_and_libnbd_do() {
    require("nbdinfo");
    require("qemu-nbd");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_file(dir.path(), "disk.raw", 1 << 20);
    let other = pki.client_with_subject("other", &[(testpki::DnType::CommonName, "other".into())]);
    let flags = pki.server_flags("on");
    let (qemu, ours) = (start_with_flags("qemu-nbd", &image, &flags), start_with_flags("sendense-nbd", &image, &flags));
    for (server, peer) in [("qemu-nbd", &qemu), ("sendense-nbd", &ours)] {
        assert!(admitted(peer, &pki.dir("client")) && admitted(peer, &other), "{server}: before any list");
    }
    // The list put beside the CA: sendense-nbd reads it at its next connection; qemu-nbd reads
    // its directory once, so it is started again.
    pki.revoke("client", &["server"]);
    drop(qemu);
    let peers = [("qemu-nbd", start_with_flags("qemu-nbd", &image, &flags)), ("sendense-nbd", ours)];
    for (server, peer) in &peers {
        assert!(!admitted(peer, &pki.dir("client")), "{server} admitted the revoked client");
        assert!(admitted(peer, &other), "{server} refused a client no list names");
    }
    // A list that no longer loads, put there while sendense-nbd runs: the last good one goes on.
    let good = std::fs::read(pki.dir("server").join("ca-crl.pem")).unwrap();
    std::fs::write(pki.dir("server").join("ca-crl.pem"), "nothing here\n").unwrap();
    assert!(!admitted(&peers[1].1, &pki.dir("client")) && admitted(&peers[1].1, &other), "the last good list");
    std::fs::write(pki.dir("server").join("ca-crl.pem"), good).unwrap();

    // The server's certificate revoked in the client's list: libnbd and our client refuse it.
    pki.revoke("server", &["other"]);
    for (server, peer) in &peers {
        assert!(!admitted(peer, &other), "libnbd connected to {server}, whose certificate its list revokes");
        let uri = nbds(peer, &other);
        let e = Client::connect_uri(&uri, &ClientOptions::new("")).await.unwrap_err();
        assert!(matches!(e, ClientError::Io(_)), "{server}: {e}");
    }
    assert!(ClientTls::from_x509_dir(&other).is_ok());

    // A list that does not parse, or a file with none: sendense-nbd does not start.
    for text in ["-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n", "nothing here\n"] {
        std::fs::write(pki.dir("server").join("ca-crl.pem"), text).unwrap();
        let out = Command::new(sendense_nbd()).args(pki.server_flags("on")).arg(&image).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("ca-crl.pem"), "{err}");
        std::fs::write(other.join("ca-crl.pem"), text).unwrap();
        assert!(ClientTls::from_x509_dir(&other).is_err(), "{text}");
    }
}

/// `--tls-authz`: qemu-nbd and sendense-nbd given the same `authz-simple`, `authz-list` and
/// `authz-listfile` objects admit the same clients, among them one whose subject holds every
/// character a distinguished name escapes, names GnuTLS gives (EMAIL, DC, UID), UTF-8, a
/// BMPString and an attribute GnuTLS has no name for: an identity written for qemu-nbd is the
/// subject string sendense-nbd computes, character for character.
#[test]
fn tls_authz_admits_the_clients_qemu_nbd_admits_by_the_same_subjects() {
    use testpki::string::{BmpString, Ia5String, PrintableString};
    use testpki::{DnType, DnValue};
    require("nbdinfo");
    require("qemu-nbd");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let image = write_file(dir.path(), "disk.raw", &pattern(1 << 20, 9));
    let oid = |arcs: &[u64]| DnType::CustomDnType(arcs.to_vec());
    let odd = pki.client_with_subject(
        "odd",
        &[
            (DnType::CountryName, DnValue::PrintableString(PrintableString::try_from("GB").unwrap())),
            (DnType::StateOrProvinceName, "London".into()),
            (DnType::OrganizationName, "Example, Org".into()),
            (DnType::OrganizationalUnitName, "#hash;<>\\+=\"q".into()),
            (DnType::CommonName, " laptop \"x\" #1 ".into()),
            (DnType::LocalityName, "Ünïcode ☃".into()),
            (oid(&[1, 2, 840, 113549, 1, 9, 1]), DnValue::Ia5String(Ia5String::try_from("me@example.org").unwrap())),
            (oid(&[0, 9, 2342, 19200300, 100, 1, 25]), DnValue::Ia5String(Ia5String::try_from("example").unwrap())),
            (oid(&[0, 9, 2342, 19200300, 100, 1, 1]), "u1".into()),
            (oid(&[2, 5, 4, 12]), DnValue::BmpString(BmpString::try_from("Boss").unwrap())),
            (oid(&[1, 2, 3, 4]), "odd".into()),
        ],
    );
    let bob = pki.client_with_subject(
        "bob",
        &[(DnType::CommonName, "bob".into()), (DnType::OrganizationName, "Example Org".into())],
    );
    let carol = pki.client_with_subject(
        "carol",
        &[(DnType::CommonName, "carol".into()), (DnType::OrganizationName, "Example Org".into())],
    );
    let clients = [odd.clone(), bob.clone(), carol.clone(), pki.dir("client")];
    let odd_subject = subject_of(&odd);
    assert_eq!(subject_of(&bob), "CN=bob,O=Example Org");
    let list = dir.path().join("list.json");
    std::fs::write(
        &list,
        r#"{"policy": "deny", "rules": [{"match": "CN=bob,O=Example Org", "policy": "deny"},
            {"match": "*O=Example*", "policy": "allow", "format": "glob"}]}"#,
    )
    .unwrap();
    // qemu's key=value syntax: a comma inside a value is doubled.
    let cases = [
        (format!("authz-simple,id=auth0,identity={}", odd_subject.replace(',', ",,")), [true, false, false, false]),
        (
            "authz-list,id=auth0,policy=deny,rules.0.match=CN=bob,,O=Example Org,rules.0.policy=deny,\
             rules.1.match=*O=Example*,rules.1.policy=allow,rules.1.format=glob"
                .to_string(),
            [true, false, true, false],
        ),
        (format!("authz-listfile,id=auth0,filename={},refresh=off", list.display()), [true, false, true, false]),
        ("authz-list,id=auth0,policy=allow".to_string(), [true, true, true, true]),
    ];
    for (authz, expected) in &cases {
        // Debian's qemu-nbd is built without authz-listfile ("invalid object type"): that file's
        // format is qemu's documented one, checked against the same expectations.
        let servers: &[&str] =
            if authz.starts_with("authz-listfile") { &["sendense-nbd"] } else { &["qemu-nbd", "sendense-nbd"] };
        for &server in servers {
            let peer = start_authorizing(server, &image, &pki, authz);
            let got: Vec<bool> = clients.iter().map(|c| admitted(&peer, c)).collect();
            assert_eq!(got, expected, "{server} with {authz} ({odd_subject})");
        }
    }
    // Clients the CA did not sign are refused before any list is asked.
    let peer = start_authorizing("sendense-nbd", &image, &pki, "authz-list,id=auth0,policy=allow");
    assert!(!admitted(&peer, &pki.dir("rogue")) && !admitted(&peer, &pki.dir("anon")));
    drop(peer);

    // A list file read again as it changes (refresh=on, the default): the next client sees it.
    let write = |text: &str| {
        let tmp = dir.path().join("list.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &list).unwrap();
    };
    write(r#"{"rules": [{"match": "CN=bob,O=Example Org", "policy": "allow"}]}"#);
    let authz = format!("authz-listfile,id=auth0,filename={}", list.display());
    let peer = start_authorizing("sendense-nbd", &image, &pki, &authz);
    assert!(admitted(&peer, &bob) && !admitted(&peer, &carol));
    write(r#"{"rules": [{"match": "CN=carol,O=Example Org", "policy": "allow"}]}"#);
    assert!(!admitted(&peer, &bob) && admitted(&peer, &carol));
    write(r#"{"rules": [{"match": "CN=carol,O=Example Org", "policy": "allowed"}]}"#);
    assert!(!admitted(&peer, &bob) && !admitted(&peer, &carol), "a list that does not load admits no one");
}

/// A server embedded as a library, requiring TLS with `server/` (clients need a certificate).
async fn embedded(pki: &Pki) -> (Server, u16, Arc<MemoryBackend>) {
    let creds = TlsCredentials::from_x509_dir(&pki.dir("server"), true).unwrap();
    let config = ServerConfig::default().tls(Some(creds)).handshake_timeout(Duration::from_secs(2));
    start_embedded(config, 1 << 20, 4).await
}

/// Connected, greeted, client flags sent.
async fn greeted(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    s
}

/// Whether the server closes `s` within 5 s.
async fn closes<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

fn client_tls(pki: &Pki) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |name: &str| pki.dir("client").join(name);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(pem("ca-cert.pem")).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(pem("client-cert.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(pem("client-key.pem")).unwrap(),
        )
        .unwrap();
    Arc::new(config).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_serves_over_tls_and_clients_that_break_the_upgrade_are_closed() {
    let pki = Pki::new();
    let (server, port, backend) = embedded(&pki).await;

    // In clear, nothing but STARTTLS: GO is told TLS is required, and names no export.
    let mut s = greeted(port).await;
    send_option(&mut s, opt::GO, &encode_info_request("e", &[])).await;
    let (h, msg) = option_reply(&mut s).await;
    assert_eq!(h.reply, rep::ERR_TLS_REQD, "{}", String::from_utf8_lossy(&msg));
    send_option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut s).await.0.reply, rep::ACK);
    // Over TLS: structured replies, GO, a write and a read; STARTTLS again is invalid.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut t = client_tls(&pki).connect(name.clone(), s).await.unwrap();
    send_option(&mut t, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut t).await.0.reply, rep::ERR_INVALID);
    send_option(&mut t, opt::GO, &encode_info_request("e", &[])).await;
    let mut replies = Vec::new();
    loop {
        let (h, _) = option_reply(&mut t).await;
        replies.push(h.reply);
        if h.reply == rep::ACK || h.reply & (1 << 31) != 0 {
            break;
        }
    }
    assert_eq!(replies.last(), Some(&rep::ACK), "{replies:?}");
    let mut write = Vec::new();
    write.extend_from_slice(&nbd_server::proto::consts::REQUEST_MAGIC.to_be_bytes());
    write.extend_from_slice(&0u16.to_be_bytes()); // flags
    write.extend_from_slice(&nbd_server::proto::consts::cmd::WRITE.to_be_bytes());
    write.extend_from_slice(&7u64.to_be_bytes()); // cookie
    write.extend_from_slice(&4096u64.to_be_bytes());
    write.extend_from_slice(&6u32.to_be_bytes());
    write.extend_from_slice(b"sealed");
    t.write_all(&write).await.unwrap();
    let mut reply = [0u8; 16];
    t.read_exact(&mut reply).await.unwrap();
    assert_eq!((&reply[4..8], &reply[8..16]), (&[0u8; 4][..], &7u64.to_be_bytes()[..]), "the write succeeded");
    drop(t);

    // STARTTLS with bytes after it before the ACK, or garbage for a TLS hello: closed.
    let mut early = greeted(port).await;
    let mut both = Vec::new();
    both.extend_from_slice(&IHAVEOPT.to_be_bytes());
    both.extend_from_slice(&opt::STARTTLS.to_be_bytes());
    both.extend_from_slice(&0u32.to_be_bytes());
    both.extend_from_slice(b"\x16\x03\x01 not a hello");
    early.write_all(&both).await.unwrap();
    assert!(closes(&mut early).await, "bytes before the ACK");
    let mut garbage = greeted(port).await;
    send_option(&mut garbage, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut garbage).await.0.reply, rep::ACK);
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closes(&mut garbage).await, "garbage for a TLS hello");
    // One that stops after STARTTLS is cut by the handshake timeout (2 s here).
    let mut silent = greeted(port).await;
    send_option(&mut silent, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut silent).await.0.reply, rep::ACK);
    assert!(closes(&mut silent).await, "a silent TLS client");
    // Our client without TLS credentials is told why.
    let e = Client::connect_tcp(("127.0.0.1", port), "e").await.unwrap_err().to_string();
    assert!(e.contains("requires TLS"), "{e}");
    // Only the TLS client reached the export, and what it wrote is there.
    assert_eq!(server.export_stats("e").map(|s| s.connections_total), Some(1));
    let mut stored = [0u8; 6];
    backend.read(4096, &mut stored).await.unwrap();
    assert_eq!(&stored, b"sealed");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_speaks_tls_to_qemu_nbd_and_to_sendense_nbd_and_never_falls_back_to_clear() {
    require("qemu-nbd");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(4 << 20, 5);
    let image = write_file(dir.path(), "disk.raw", &data);

    // qemu-nbd with its own TLS flags and our certificates: read, write, flush.
    let port = free_port();
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", pki.dir("server").display());
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-p", &port.to_string(), "-b", "127.0.0.1", "-t", "--shared=4"])
        .args(["--object", &object, "--tls-creds", "tls0"])
        .arg(&image)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    let _qemu = Reaped(child);
    let uri = |who: &str| format!("nbds://127.0.0.1:{port}/disk?tls-certificates={}", pki.dir(who).display());
    let c = Client::connect_uri(&uri("client"), &ClientOptions::new("")).await.unwrap();
    assert_eq!(c.info().size, data.len() as u64);
    assert_eq!(c.read(1 << 20, 4096).await.unwrap(), &data[1 << 20..(1 << 20) + 4096]);
    c.write(8192, b"over tls", false).await.unwrap();
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    assert_eq!(&std::fs::read(&image).unwrap()[8192..8200], b"over tls");
    // No client certificate (qemu's verify-peer=on), or a server we do not trust: refused.
    for who in ["anon", "stranger"] {
        let e = Client::connect_uri(&uri(who), &ClientOptions::new("")).await.unwrap_err();
        assert!(matches!(e, ClientError::Io(_)), "{who}: {e}");
    }

    // sendense-nbd over a Unix socket: the host name comes from the URI.
    let socket = dir.path().join("nbd.sock");
    let _ours = start_sendense_on_socket(&image, "disk", &socket, &pki.server_flags("on"));
    let unix = |query: &str| {
        format!("nbds+unix:///disk?socket={}&tls-certificates={}{query}", socket.display(), pki.dir("client").display())
    };
    let c = Client::connect_uri(&unix("&tls-hostname=localhost"), &ClientOptions::new("")).await.unwrap();
    assert_eq!(c.read(8192, 8).await.unwrap(), b"over tls");
    c.disconnect().await.unwrap();
    let e = Client::connect_uri(&unix(""), &ClientOptions::new("")).await.unwrap_err().to_string();
    assert!(e.contains("no host name"), "{e}");

    // A server without TLS refuses STARTTLS, and the client stops there.
    let plain = start_sendense(&image, "disk", &[]);
    let url = format!("nbds://127.0.0.1:{}/disk?tls-certificates={}", plain.port, pki.dir("client").display());
    let e = Client::connect_uri(&url, &ClientOptions::new("")).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::OptionRefused { option: 5, message, .. } if message.contains("TLS is not enabled")),
        "{e}"
    );
    // Credentials with a plain URI, or with halves the client did not open: refused.
    let tls = ClientTls::from_x509_dir(&pki.dir("client")).unwrap();
    let e = Client::connect_uri(&plain.url(), &ClientOptions::new("").tls(tls.clone())).await.unwrap_err();
    assert!(e.to_string().contains("use nbds://"), "{e}");
    let (r, w) = TcpStream::connect(("127.0.0.1", plain.port)).await.unwrap().into_split();
    let e = Client::handshake(r, w, &ClientOptions::new("disk").tls(tls)).await.unwrap_err();
    assert!(e.to_string().contains("TLS needs a connection the client opens"), "{e}");
}
