//! `sendense-node serve` over real HTTP: backups of a two-disk VM into exports served by our NBD
//! library (as the hub serves them), hooks, commit, incrementals, restores, cancel, every kind
//! of bad request, and the API over HTTPS.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use node::api::{BackupType, JobStatus, NodeClient, RestoreRequest, StartRequest};

const MIB: u64 = 1 << 20;

fn vm_config(dir: &std::path::Path, extra: &str) -> String {
    let log = dir.join("hooks.log");
    format!(
        "state_dir = \"{state}\"\n{extra}\n[[vm]]\nname = \"pgtest1\"\n\
         pre_snapshot = \"echo pre $SENDENSE_JOB_ID >> {log}\"\npost_snapshot = \"echo post $SENDENSE_JOB_ID >> {log}\"\n\
         [[vm.disk]]\nkey = 2000\nsource = \"{d0}\"\n[[vm.disk]]\nkey = 2001\nsource = \"{d1}\"\n",
        state = dir.join("state").display(),
        log = log.display(),
        d0 = dir.join("disk0.raw").display(),
        d1 = dir.join("disk1.raw").display(),
    )
}

fn start(vm: &str, targets: String, job: &str, t: BackupType) -> StartRequest {
    StartRequest { vm_name: vm.into(), nbd_host: None, nbd_targets: targets, job_id: job.into(), backup_type: t }
}

/// A backup of `mib` MiB as the hub serves it to a restore: `backup.raw`, made into
/// `backup.qcow2`, exported as "backup".
async fn backup_export(d: &std::path::Path, mib: u64) -> HubExport {
    let image = d.join("backup.qcow2");
    make_qcow2_source(&d.join("backup.raw"), &image, mib, 9, &[]);
    HubExport::start(&image, "backup").await
}

/// The checksum the node must report for `path`, computed here independently.
fn checksum_of(path: &std::path::Path) -> String {
    let data = std::fs::read(path).unwrap();
    let hashes: Vec<[u8; 32]> = data.chunks(64 << 10).map(|c| *blake3::hash(c).as_bytes()).collect();
    node::blockmap::checksum_of_blocks(64 << 10, &hashes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_backup_then_an_incremental_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("disk0.raw"), dir.path().join("disk1.raw"));
    make_source(&d0, 40, 1);
    make_source(&d1, 24, 2);
    let node = NodeProcess::start(dir.path(), &vm_config(dir.path(), ""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();

    let vm = client.vm("pgtest1").await.unwrap();
    assert_eq!(vm.disks.iter().map(|d| (d.key, d.size)).collect::<Vec<_>>(), vec![(2000, 40 * MIB), (2001, 24 * MIB)]);

    let (f0, f1) = (dir.path().join("full-0.qcow2"), dir.path().join("full-1.qcow2"));
    new_qcow2(&f0, 40 * MIB);
    new_qcow2(&f1, 24 * MIB);
    let (h0, h1) = (HubExport::start(&f0, "pgtest1-disk0").await, HubExport::start(&f1, "pgtest1-disk1").await);
    let targets = format!("{},{}", h0.target(2000), h1.target(2001));
    let started = client.start_backup(&start("pgtest1", targets, "b1", BackupType::Full)).await.unwrap();
    assert_eq!(started.status, JobStatus::Running);
    let view = wait_job(&client, "b1").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    h0.close().await;
    h1.close().await;
    assert_same(&d0, &f0);
    assert_same(&d1, &f1);
    assert_eq!(view.disks[0].checksum.as_deref(), Some(checksum_of(&d0).as_str()));
    assert_eq!(view.disks[1].checksum.as_deref(), Some(checksum_of(&d1).as_str()));
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap();
    assert_eq!(hooks, "pre b1\npost b1\n", "each hook once, in order");

    // Commit makes the maps the base; an uncommitted run would leave the previous state.
    assert!(!view.committed);
    assert!(client.commit("b1").await.unwrap().committed);

    change_blocks(&d0, &[3 * MIB, 30 * MIB], 5);
    change_blocks(&d1, &[MIB + 4096], 6);
    let (i0, i1) = (dir.path().join("incr-0.qcow2"), dir.path().join("incr-1.qcow2"));
    new_overlay(&i0, &f0);
    new_overlay(&i1, &f1);
    let (h0, h1) = (HubExport::start(&i0, "pgtest1-disk0").await, HubExport::start(&i1, "pgtest1-disk1").await);
    let targets = format!("{},{}", h0.target(2000), h1.target(2001));
    client.start_backup(&start("pgtest1", targets, "b2", BackupType::Incremental)).await.unwrap();
    let view = wait_job(&client, "b2").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    h0.close().await;
    h1.close().await;
    assert!(view.disks.iter().all(|d| d.mode == node::api::CopyMode::Incremental), "{view:?}");
    assert_eq!(view.disks[0].bytes_sent, 2 * (64 << 10));
    assert_eq!(view.disks[1].bytes_sent, 64 << 10);
    assert_same(&d0, &i0);
    assert_same(&d1, &i1);
    assert_clean(&i0);
    assert_eq!(view.disks[0].checksum.as_deref(), Some(checksum_of(&d0).as_str()));
    client.commit("b2").await.unwrap();

    // Restore the incremental (read through its chain) into the restore directory.
    let server = nbd_server::Server::new(nbd_server::ServerConfig::default());
    let backend = std::sync::Arc::new(nbd_server::Qcow2Backend::open(&i0, true).unwrap());
    server.add_export(nbd_server::ExportConfig::new("r0", backend).read_only(true)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_export(listener, "r0").await });
    let dest = dir.path().join("state/restores/disk0-restored.raw");
    let req = RestoreRequest {
        job_id: "r1".into(),
        nbd_targets: format!("2000:nbd://127.0.0.1:{port}/r0"),
        destinations: [("2000".to_string(), dest.display().to_string())].into(),
    };
    client.start_restore(&req).await.unwrap();
    let view = wait_job(&client, "r1").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_same(&d0, &dest);
    let allocated = std::fs::metadata(&dest).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(allocated < 20 * MIB, "the restored file stays sparse ({allocated} bytes allocated)");

    // Anywhere else is refused before anything is written.
    let mut bad = req.clone();
    bad.job_id = "r2".into();
    bad.destinations = [("2000".to_string(), "/etc/passwd".to_string())].into();
    let err = client.start_restore(&bad).await.unwrap_err();
    assert!(matches!(err, node::api::ApiError::Status { status: 400, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_a_token_is_required() {
    let dir = tempfile::tempdir().unwrap();
    make_source(&dir.path().join("disk0.raw"), 8, 1);
    make_source(&dir.path().join("disk1.raw"), 8, 2);
    let token_file = dir.path().join("token");
    let config = vm_config(dir.path(), &format!("token_file = \"{}\"", token_file.display()));
    let node = NodeProcess::start(dir.path(), &config, &[]);
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the generated token is private");

    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", node.url());
    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200);
    let r = http.get(url("/api/v1/vms")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    let r = http.get(url("/api/v1/vms")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);

    let client = NodeClient::new(node.url(), Some(token.clone())).unwrap();
    assert_eq!(client.vms().await.unwrap().len(), 1);
    let expect = |r: Result<node::api::StartResponse, node::api::ApiError>, status: u16, text: &str| match r {
        Err(node::api::ApiError::Status { status: s, message, .. }) => {
            assert_eq!(s, status, "{message}");
            assert!(message.contains(text), "'{message}' lacks '{text}'");
        }
        other => panic!("expected {status}, got {other:?}"),
    };
    for (targets, text) in [
        ("nbd://127.0.0.1:10100/x", "KEY:"),
        ("2000:nbd://127.0.0.1/x", "port"),
        ("2000:nbd://127.0.0.1:0/x", "port 0"),
        ("2000:nbd://127.0.0.1:1/a,2000:nbd://127.0.0.1:2/b", "twice"),
        ("2000:ftp://127.0.0.1:1/a", "nbd://"),
        ("2009:nbd://127.0.0.1:1/a", "no disk with key 2009"),
        ("", "empty"),
        // Only this machine and nbd_hosts: a disk is never sent to a server the caller picked.
        ("2000:nbd://10.0.0.9:10100/x", "add the hub's address to nbd_hosts"),
        ("2000:nbd://evil.example:10100/x", "host evil.example is not one this node sends disks to"),
    ] {
        expect(client.start_backup(&start("pgtest1", targets.into(), "j", BackupType::Full)).await, 400, text);
    }
    let mut elsewhere = start("pgtest1", "2000:nbd://127.0.0.1:10100/x".into(), "j", BackupType::Full);
    elsewhere.nbd_host = Some("10.0.0.9".into());
    expect(client.start_backup(&elsewhere).await, 400, "host 10.0.0.9");
    let restore_elsewhere = RestoreRequest {
        job_id: "r".into(),
        nbd_targets: "2000:nbd://10.0.0.9:10100/x".into(),
        destinations: [("2000".to_string(), dir.path().join("disk0.raw").display().to_string())].into(),
    };
    match client.start_restore(&restore_elsewhere).await {
        Err(node::api::ApiError::Status { status: 400, message, .. }) => {
            assert!(message.contains("nbd_hosts"), "{message}")
        }
        other => panic!("a restore from elsewhere: {other:?}"),
    }
    expect(
        client.start_backup(&start("nosuchvm", "2000:nbd://h:1/e".into(), "j", BackupType::Full)).await,
        404,
        "unknown VM",
    );
    expect(client.start_backup(&start("../x", "2000:nbd://h:1/e".into(), "j", BackupType::Full)).await, 400, "vm_name");
    expect(
        client.start_backup(&start("pgtest1", "2000:nbd://h:1/e".into(), "../j", BackupType::Full)).await,
        400,
        "job_id",
    );

    for body in [
        "{",
        "{\"vm_name\": 3}",
        "{\"vm_name\":\"pgtest1\",\"nbd_targets\":\"\",\"job_id\":\"j\",\"backup_type\":\"weekly\"}",
    ] {
        let r = http
            .post(url("/api/v1/backup/start"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["code"], "bad_request", "{body}: {e}");
    }
    let r = http.get(url("/api/v1/backup/nosuch")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // A method an endpoint does not take: a JSON error too, with axum's Allow header kept.
    let r = http.delete(url("/api/v1/vms")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().get("allow").is_some_and(|a| a.to_str().unwrap().contains("GET")), "{:?}", r.headers());
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["code"], "method_not_allowed", "{e}");
    // An id whose escapes are not UTF-8: a JSON error too, not axum's plain text.
    let r = http.get(url("/api/v1/backup/j%e1%ff")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["code"], "bad_request", "{e}");
    let r = http.post(url("/api/v1/backup/nosuch/commit")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let metrics = http.get(url("/metrics")).bearer_auth(&token).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sendense_node_tunnel_enabled 0"), "{metrics}");
}

#[test]
fn a_token_file_others_can_read_stops_the_node_from_starting() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    make_source(&dir.path().join("disk0.raw"), 1, 1);
    make_source(&dir.path().join("disk1.raw"), 1, 2);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config_path = dir.path().join("node.toml");
    std::fs::write(&config_path, vm_config(dir.path(), &format!("token_file = \"{}\"", token_file.display()))).unwrap();
    let out = std::process::Command::new(sendense_node())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("permissions 0644 for token file") && said.contains("chmod 600"), "{said}");
}

/// `curl` over HTTPS, trusting `ca`: its exit status and what it printed.
fn curl(ca: &std::path::Path, token: &str, url: &str) -> (bool, String) {
    let out = std::process::Command::new(require("curl"))
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}"), url])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `dir`'s server certificate and key put in place of `api`'s as a renewal does: new files
/// renamed over the old ones.
fn renew(api: &std::path::Path, from: &std::path::Path) {
    for name in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(from.join(name), api.join("renewed.tmp")).unwrap();
        std::fs::rename(api.join("renewed.tmp"), api.join(name)).unwrap();
    }
}

/// A node serving its API over HTTPS with testpki's server certificate (copied into its own
/// `api_tls` directory, which tests renew in place), a token, and `more` in its node.toml.
struct HttpsNode {
    dir: tempfile::TempDir,
    pki: testpki::Pki,
    api: std::path::PathBuf,
    node: NodeProcess,
    token: String,
    https: String,
    ca: std::path::PathBuf,
}

fn https_node(more: &str) -> HttpsNode {
    let dir = tempfile::tempdir().unwrap();
    make_source(&dir.path().join("disk0.raw"), 1, 1);
    make_source(&dir.path().join("disk1.raw"), 1, 2);
    let pki = testpki::Pki::new();
    let api = dir.path().join("api-tls");
    std::fs::create_dir(&api).unwrap();
    for name in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.dir("server").join(name), api.join(name)).unwrap();
    }
    let token_file = dir.path().join("token");
    let extra = format!("token_file = \"{}\"\napi_tls = \"{}\"\n{more}", token_file.display(), api.display());
    let node = NodeProcess::start(dir.path(), &vm_config(dir.path(), &extra), &[]);
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let https = format!("https://127.0.0.1:{}", node.port);
    let ca = pki.dir("server").join("ca-cert.pem");
    HttpsNode { dir, pki, api, node, token, https, ca }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https_serves_curl_and_the_hubs_client_refuses_clear_text_and_takes_a_renewed_certificate() {
    let HttpsNode { dir, pki, api, node, token, https, ca } = https_node("");

    // curl, checking the certificate against our CA, by address and by name.
    let (ok, said) = curl(&ca, &token, &format!("{https}/api/v1/vms"));
    assert!(ok && said.contains("\"pgtest1\""), "{said}");
    let (ok, said) = curl(&ca, &token, &format!("https://localhost:{}/healthz", node.port));
    assert!(ok, "{said}");
    // The hub's client with the hub's CA; with the system's roots our CA is nobody's.
    let client = NodeClient::with_ca(https.clone(), Some(token.clone()), &ca).unwrap();
    assert_eq!(client.vms().await.unwrap().len(), 1);
    let err = NodeClient::new(https.clone(), Some(token.clone())).unwrap().vms().await.unwrap_err();
    assert!(
        matches!(err, node::api::ApiError::Unreachable { .. }) && err.to_string().contains("UnknownIssuer"),
        "{err}"
    );
    // A client of a plain-HTTP habit is told what to do, in the API's error shape.
    let r = reqwest::Client::new().get(format!("{}/api/v1/vms", node.url())).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "https_required", "{body}");
    assert!(body["error"].as_str().unwrap().contains("https://"), "{body}");
    // A client that connects and says nothing, and one that sends a broken hello, hold nobody up.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    let mut broken = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut broken, &[0x16, 3, 1, 0, 9, 1, 2, 3]).await.unwrap();
    let started = Instant::now();
    assert_eq!(NodeClient::with_ca(https.clone(), Some(token.clone()), &ca).unwrap().vms().await.unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop((silent, broken));

    // Renewed in place: the next connection is served with the new certificate (here another
    // CA's, which our clients then refuse and the other CA's accept).
    let impostor_ca = pki.dir("impostor").join("ca-cert.pem");
    renew(&api, &pki.dir("impostor"));
    let err = NodeClient::with_ca(https.clone(), Some(token.clone()), &ca).unwrap().vms().await.unwrap_err();
    assert!(matches!(err, node::api::ApiError::Unreachable { .. }), "{err}");
    let (ok, said) = curl(&impostor_ca, &token, &format!("{https}/api/v1/vms"));
    assert!(ok && said.contains("\"pgtest1\""), "{said}");
    // A key that does not load: the last good certificate serves on.
    std::fs::write(api.join("server-key.pem"), "not a key\n").unwrap();
    let (ok, said) = curl(&impostor_ca, &token, &format!("{https}/api/v1/vms"));
    assert!(ok && said.contains("\"pgtest1\""), "{said}");
    renew(&api, &pki.dir("server"));
    assert_eq!(NodeClient::with_ca(https.clone(), Some(token.clone()), &ca).unwrap().vms().await.unwrap().len(), 1);
    drop(node);

    // A directory without a server's certificate stops the start, naming the file.
    let out = std::process::Command::new(sendense_node())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--config"])
        .arg(dir.path().join("node.toml"))
        .arg("--api-tls")
        .arg(pki.dir("client"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("api_tls") && said.contains("server-cert.pem"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_certificates_the_api_serves_only_clients_its_ca_signed() {
    let HttpsNode { dir, pki, api, node, token, https, ca } = https_node("api_client_certs = true");

    // The hub's client with its api_tls directory (server and client credentials, qemu's
    // layout) presents its certificate and is served.
    let hub = NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &pki.dir("both")).unwrap();
    assert_eq!(hub.vms().await.unwrap().len(), 1);
    // The hub's certificate renewed in place (here with one another CA signed): presented from
    // the next call on, by the same client, which the node then refuses; renewed back, served.
    let own = dir.path().join("hub-tls");
    std::fs::create_dir(&own).unwrap();
    for name in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.dir("both").join(name), own.join(name)).unwrap();
    }
    let renewing = NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &own).unwrap();
    assert_eq!(renewing.vms().await.unwrap().len(), 1);
    let renew_client = |from: &std::path::Path| {
        for name in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(from.join(name), own.join("renewed.tmp")).unwrap();
            std::fs::rename(own.join("renewed.tmp"), own.join(name)).unwrap();
        }
    };
    renew_client(&pki.dir("rogue"));
    assert!(matches!(renewing.vms().await, Err(node::api::ApiError::Unreachable { .. })));
    // A key that does not load: the last good identity (the rogue's) goes on.
    std::fs::write(own.join("client-key.pem"), "not a key\n").unwrap();
    assert!(matches!(renewing.vms().await, Err(node::api::ApiError::Unreachable { .. })));
    renew_client(&pki.dir("both"));
    assert_eq!(renewing.vms().await.unwrap().len(), 1);
    // Without a certificate, or with one another CA signed, the handshake fails: the token alone
    // is not enough, and the client is told why.
    let err = NodeClient::with_ca(https.clone(), Some(token.clone()), &ca).unwrap().vms().await.unwrap_err();
    assert!(
        matches!(err, node::api::ApiError::Unreachable { .. }) && err.to_string().contains("CertificateRequired"),
        "{err}"
    );
    let rogue = NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &pki.dir("rogue")).unwrap();
    assert!(matches!(rogue.vms().await, Err(node::api::ApiError::Unreachable { .. })));
    // curl likewise: with the client's certificate and key it reads, without them it cannot.
    let (ok, said) = curl(&ca, &token, &format!("{https}/api/v1/vms"));
    assert!(!ok && !said.contains("pgtest1"), "{said}");
    let client = pki.dir("client");
    let curl_with_certificate = || {
        std::process::Command::new(require("curl"))
            .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .arg("--cert")
            .arg(client.join("client-cert.pem"))
            .arg("--key")
            .arg(client.join("client-key.pem"))
            .args(["-H", &format!("Authorization: Bearer {token}"), &format!("{https}/api/v1/vms")])
            .output()
            .unwrap()
    };
    let out = curl_with_certificate();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"pgtest1\""), "{out:?}");
    // A certificate is no token: a client the CA signed still needs the bearer token.
    let tokenless = NodeClient::with_tls_dir(https.clone(), None, &pki.dir("both")).unwrap();
    assert!(matches!(tokenless.vms().await, Err(node::api::ApiError::Status { status: 401, .. })));

    // A revocation list put beside the CA (`ca-crl.pem`, read as the NBD ports read it) refuses
    // the certificates it names from the next connection on: the hub's here, while curl's, which
    // it does not name, is served; removed, the hub is served again.
    let list = pki.revoke("both", &[]);
    std::fs::write(api.join("renewed.tmp"), &list).unwrap();
    std::fs::rename(api.join("renewed.tmp"), api.join("ca-crl.pem")).unwrap();
    let fresh = || NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &pki.dir("both")).unwrap();
    let err = fresh().vms().await.unwrap_err();
    assert!(matches!(err, node::api::ApiError::Unreachable { .. }) && err.to_string().contains("Revoked"), "{err}");
    assert!(curl_with_certificate().status.success(), "a client no list names");
    std::fs::remove_file(api.join("ca-crl.pem")).unwrap();
    assert_eq!(fresh().vms().await.unwrap().len(), 1);
    // The hub's side: a list in its own directory naming the node's certificate, taken up by the
    // same client at its next call: the node is refused; the list removed, it is served again.
    std::fs::write(own.join("ca-crl.pem"), pki.revoke("server", &[])).unwrap();
    let err = renewing.vms().await.unwrap_err();
    assert!(matches!(err, node::api::ApiError::Unreachable { .. }) && err.to_string().contains("Revoked"), "{err}");
    std::fs::remove_file(own.join("ca-crl.pem")).unwrap();
    assert_eq!(renewing.vms().await.unwrap().len(), 1);
    // One that does not parse: the client is not built, naming the file.
    std::fs::write(own.join("ca-crl.pem"), "nothing here\n").unwrap();
    let err = NodeClient::with_tls_dir(https.clone(), None, &own).unwrap_err();
    assert!(err.to_string().contains("ca-crl.pem"), "{err}");
    std::fs::remove_file(own.join("ca-crl.pem")).unwrap();

    // The CA renewed in place (here another CA): our hub's certificate is refused from the next
    // connection on, the other CA's client served.
    std::fs::copy(pki.dir("impostor").join("ca-cert.pem"), api.join("renewed.tmp")).unwrap();
    std::fs::rename(api.join("renewed.tmp"), api.join("ca-cert.pem")).unwrap();
    let hub = NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &pki.dir("both")).unwrap();
    assert!(matches!(hub.vms().await, Err(node::api::ApiError::Unreachable { .. })));
    let rogue = NodeClient::with_tls_dir(https.clone(), Some(token.clone()), &pki.dir("rogue")).unwrap();
    assert_eq!(rogue.vms().await.unwrap().len(), 1);
    drop(node);

    // A client directory with a certificate and no key is refused before any call, naming the
    // missing file.
    let half = dir.path().join("half");
    std::fs::create_dir(&half).unwrap();
    for name in ["ca-cert.pem", "client-cert.pem"] {
        std::fs::copy(pki.dir("client").join(name), half.join(name)).unwrap();
    }
    let err = NodeClient::with_tls_dir(https.clone(), None, &half).unwrap_err();
    assert!(matches!(err, node::api::ApiError::Identity { .. }) && err.to_string().contains("client-key.pem"), "{err}");
    // Client certificates without api_tls stop the start: there is no CA to check them with.
    std::fs::write(dir.path().join("plain.toml"), vm_config(dir.path(), "")).unwrap();
    let out = std::process::Command::new(sendense_node())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--api-client-certs", "--config"])
        .arg(dir.path().join("plain.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("api_client_certs needs api_tls"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_job_is_refused_cancel_stops_a_job_and_a_failed_hook_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    make_source(&dir.path().join("disk0.raw"), 64, 1);
    make_source(&dir.path().join("disk1.raw"), 8, 2);
    // 4 MiB/s: the 16 MiB of data would take seconds.
    let node = NodeProcess::start(dir.path(), &vm_config(dir.path(), "[copy]\nbandwidth_limit = \"4M\""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    let (t0, t1) = (dir.path().join("t0.qcow2"), dir.path().join("t1.qcow2"));
    new_qcow2(&t0, 64 * MIB);
    new_qcow2(&t1, 8 * MIB);
    let (h0, h1) = (HubExport::start(&t0, "pgtest1-disk0").await, HubExport::start(&t1, "pgtest1-disk1").await);
    let targets = format!("{},{}", h0.target(2000), h1.target(2001));
    client.start_backup(&start("pgtest1", targets.clone(), "slow", BackupType::Full)).await.unwrap();
    let second = client.start_backup(&start("pgtest1", targets.clone(), "again", BackupType::Full)).await;
    assert!(matches!(second, Err(node::api::ApiError::Status { status: 409, .. })), "{second:?}");
    let dup = client.start_backup(&start("pgtest1", targets.clone(), "slow", BackupType::Full)).await;
    assert!(matches!(dup, Err(node::api::ApiError::Status { status: 409, .. })), "{dup:?}");

    // Wait until data flows, then cancel (the DELETE answer waits up to a second for the job to
    // settle; the test polls instead of timing it).
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.job("slow").await.unwrap().disks[0].bytes_sent == 0 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.cancel("slow").await.unwrap();
    let view = wait_job(&client, "slow").await;
    assert_eq!(view.status, JobStatus::Cancelled, "{view:?}");
    assert!(view.disks[0].bytes_sent < 16 * MIB);
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap();
    assert_eq!(hooks, "pre slow\npost slow\n", "the post hook runs after a cancel too");
    assert!(client.commit("slow").await.is_err(), "a cancelled job cannot be committed");

    // The VM is free again; a pre hook that fails fails the job, and the post hook still runs.
    h0.close().await;
    h1.close().await;
    drop(node);
    let config = vm_config(dir.path(), "").replace("echo pre", "exit 3; echo pre");
    let node = NodeProcess::start(dir.path(), &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    let (h0, h1) = (HubExport::start(&t0, "pgtest1-disk0").await, HubExport::start(&t1, "pgtest1-disk1").await);
    let targets = format!("{},{}", h0.target(2000), h1.target(2001));
    client.start_backup(&start("pgtest1", targets, "hookfail", BackupType::Full)).await.unwrap();
    let view = wait_job(&client, "hookfail").await;
    assert_eq!(view.status, JobStatus::Failed);
    assert!(view.error.as_deref().unwrap_or("").contains("pre-snapshot hook failed"), "{view:?}");
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap();
    assert!(hooks.ends_with("post hookfail\n"), "{hooks}");
    h0.close().await;
    h1.close().await;
    // Nothing was written by a job that never started copying.
    let f = std::fs::File::open(dir.path().join("disk0.raw")).unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, 0).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_onto_a_vms_disk_holds_the_vm_and_no_two_restores_write_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_source(&d.join("disk0.raw"), 24, 1);
    make_source(&d.join("disk1.raw"), 8, 2);
    // 4 MiB/s: each restore below takes seconds. One NBD connection each: three run at once
    // against one export, which takes ten.
    let node = NodeProcess::start(d, &vm_config(d, "[copy]\nbandwidth_limit = \"4M\"\nconnections = 1"), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    let export = backup_export(d, 24).await;
    let restore = |job: &str, dests: &[(u32, std::path::PathBuf)]| RestoreRequest {
        job_id: job.into(),
        nbd_targets: dests.iter().map(|(k, _)| export.target(*k)).collect::<Vec<_>>().join(","),
        destinations: dests.iter().map(|(k, p)| (k.to_string(), p.display().to_string())).collect(),
    };
    let refused = |r: Result<node::api::StartResponse, node::api::ApiError>, status: u16, text: &str| match r {
        Err(node::api::ApiError::Status { status: s, message, .. }) => {
            assert_eq!(s, status, "{message}");
            assert!(message.contains(text), "'{message}' lacks '{text}'");
        }
        other => panic!("expected {status}, got {other:?}"),
    };
    let into_dir = |name: &str| d.join("state/restores").join(name);

    // Two disks of one restore into one file: the second would silently replace the first.
    refused(
        client.start_restore(&restore("dup", &[(2000, into_dir("x.raw")), (2001, into_dir("x.raw"))])).await,
        400,
        "both restore to",
    );

    // Onto the VM's own disk: the VM is held, as by a backup, until the restore ends.
    client.start_restore(&restore("onto-vm", &[(2000, d.join("disk0.raw"))])).await.unwrap();
    refused(client.start_backup(&start("pgtest1", export.target(2000), "b1", BackupType::Full)).await, 409, "onto-vm");
    refused(client.start_restore(&restore("again", &[(2000, d.join("disk0.raw"))])).await, 409, "onto-vm");

    // Into the restore directory: no second restore writes the same file meanwhile.
    client.start_restore(&restore("into-file", &[(2000, into_dir("y.raw"))])).await.unwrap();
    refused(
        client.start_restore(&restore("y-again", &[(2000, into_dir("y.raw"))])).await,
        409,
        "restore into-file is writing",
    );
    client.start_restore(&restore("other-file", &[(2000, into_dir("z.raw"))])).await.unwrap();

    for job in ["onto-vm", "into-file", "other-file"] {
        let view = client.job(job).await.unwrap();
        assert_eq!(view.status, JobStatus::Running, "{job} still runs (the refusals above were not late): {view:?}");
        client.cancel(job).await.unwrap();
        assert_eq!(wait_job(&client, job).await.status, JobStatus::Cancelled);
    }
    // Released: the same file and the VM are free again.
    client.start_restore(&restore("y-later", &[(2000, into_dir("y.raw"))])).await.unwrap();
    client.cancel("y-later").await.unwrap();
    wait_job(&client, "y-later").await;
    client.start_restore(&restore("vm-later", &[(2000, d.join("disk0.raw"))])).await.unwrap();
    client.cancel("vm-later").await.unwrap();
    wait_job(&client, "vm-later").await;
    export.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_run_cut_by_a_killed_node_makes_the_next_run_rewrite_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("disk0.raw"), dir.path().join("disk1.raw"));
    make_source(&d0, 32, 1);
    make_source(&d1, 8, 2);
    // Checkpoints off: the killed node takes the run up from nothing, and says so to the next.
    let config = vm_config(dir.path(), "[copy]\nbandwidth_limit = \"4M\"\ncheckpoint_every_s = 0");
    let (r0, r1) = (dir.path().join("replica-0.qcow2"), dir.path().join("replica-1.qcow2"));
    new_qcow2(&r0, 32 * MIB);
    new_qcow2(&r1, 8 * MIB);
    let replicate = |job: &str, t: BackupType, targets: String| StartRequest {
        vm_name: "pgtest1".into(),
        nbd_host: None,
        nbd_targets: targets,
        job_id: job.into(),
        backup_type: t,
    };

    // Run 1 completes and is committed.
    let node = NodeProcess::start(dir.path(), &config.replace("bandwidth_limit = \"4M\"", ""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    let (h0, h1) =
        (HubExport::start(&r0, "pgtest1-replica-disk0").await, HubExport::start(&r1, "pgtest1-replica-disk1").await);
    let targets = format!("{},{}", h0.target(2000), h1.target(2001));
    client.replicate(&replicate("rep1", BackupType::Full, targets.clone())).await.unwrap();
    assert_eq!(wait_job(&client, "rep1").await.status, JobStatus::Completed);
    client.commit("rep1").await.unwrap();
    drop(node);

    // Run 2 writes into the replica in place and the node is killed in the middle.
    change_blocks(&d0, &[MIB, 17 * MIB], 7);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&d0).unwrap();
        f.write_all_at(&vec![0x42; 8 << 20], 20 * MIB).unwrap();
    }
    let node = NodeProcess::start(dir.path(), &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    client.replicate(&replicate("rep2", BackupType::Incremental, targets.clone())).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.job("rep2").await.unwrap().disks[0].bytes_sent == 0 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(node); // SIGKILL: nothing is accounted for

    // Run 3 cannot trust the committed map: it rewrites every block, and the replica is right.
    let node = NodeProcess::start(dir.path(), &config.replace("bandwidth_limit = \"4M\"", ""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    client.replicate(&replicate("rep3", BackupType::Incremental, targets)).await.unwrap();
    let view = wait_job(&client, "rep3").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_eq!(view.disks[0].mode, node::api::CopyMode::Full, "{view:?}");
    assert!(view.disks[0].mode_reason.as_deref().unwrap_or("").contains("did not finish"), "{view:?}");
    client.commit("rep3").await.unwrap();
    h0.close().await;
    h1.close().await;
    assert_same(&d0, &r0);
    assert_same(&d1, &r1);
}

/// Bytes `qemu-img map` reports as data anywhere in `img`'s chain.
fn chain_data(img: &std::path::Path) -> u64 {
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| e["length"].as_u64().unwrap()).sum()
}

fn qemu_io(img: &std::path::Path, commands: &[&str]) {
    let mut cmd = std::process::Command::new(require("qemu-io"));
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(img));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_disk_is_backed_up_as_the_disk_it_holds_and_an_unstated_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A VM disk as libvirt leaves it after an external snapshot: a compressed base, and the
    // overlay the VM wrote (data, and a range zeroed) on top of it, the backing format recorded.
    let (base, disk) = (d.join("base.qcow2"), d.join("vm.qcow2"));
    make_qcow2_source(&d.join("src.raw"), &base, 48, 11, &["-c"]);
    new_overlay(&disk, &base);
    qemu_io(&disk, &["write -P 0x5a 8M 1M", "write -z 20M 1M"]);
    let loose = d.join("loose.qcow2");
    new_qcow2(&loose, 48 * MIB);
    let config = format!(
        "state_dir = \"{state}\"\nrestore_dir = \"{state}/restores\"\n\
         [[vm]]\nname = \"pgq\"\n[[vm.disk]]\nkey = 2000\nsource = \"{disk}\"\nformat = \"qcow2\"\n\
         [[vm]]\nname = \"unstated\"\n[[vm.disk]]\nkey = 2000\nsource = \"{loose}\"\n",
        state = d.join("state").display(),
        disk = disk.display(),
        loose = loose.display(),
    );
    let node = NodeProcess::start(d, &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();

    // The inventory gives the disk's size, not the file's, and says how it is held.
    let vm = client.vm("pgq").await.unwrap();
    assert_eq!(vm.disks.len(), 1);
    assert_eq!((vm.disks[0].size, vm.disks[0].format), (48 * MIB, node::api::DiskFormat::Qcow2), "{vm:?}");
    let err = client.vm("unstated").await.unwrap_err().to_string();
    assert!(err.contains("holds a qcow2 image") && err.contains("format = \"qcow2\""), "{err}");
    // The list of every VM shows both, the trouble on its disk: one VM's hides no other.
    let all = client.vms().await.unwrap();
    assert_eq!(all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["pgq", "unstated"]);
    assert_eq!((all[0].disks[0].size, &all[0].disks[0].error), (48 * MIB, &None));
    let trouble = all[1].disks[0].error.as_deref().unwrap_or_default();
    assert!(trouble.contains("holds a qcow2 image") && all[1].disks[0].size == 0, "{all:?}");

    // A full backup is the disk: equal to the chain for qemu-img, the checksum that of the
    // disk's bytes, and only what the chain holds as data read.
    let flat = d.join("flat.raw");
    qemu_img(&["convert", "-q", "-O", "raw", disk.to_str().unwrap(), flat.to_str().unwrap()]);
    let full = d.join("full.qcow2");
    new_qcow2(&full, 48 * MIB);
    let h = HubExport::start(&full, "pgq-disk0").await;
    client.start_backup(&start("pgq", h.target(2000), "b1", BackupType::Full)).await.unwrap();
    let view = wait_job(&client, "b1").await;
    h.close().await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_same(&disk, &full);
    assert_clean(&full);
    assert_eq!(view.disks[0].checksum.as_deref(), Some(checksum_of(&flat).as_str()));
    assert_eq!(view.disks[0].bytes_read, chain_data(&disk), "holes and zero clusters are not read: {view:?}");
    client.commit("b1").await.unwrap();

    // The VM writes on; the incremental sends the changed block only.
    qemu_io(&disk, &["write -P 0x33 30M 64k"]);
    let incr = d.join("incr.qcow2");
    new_overlay(&incr, &full);
    let h = HubExport::start(&incr, "pgq-disk0").await;
    client.start_backup(&start("pgq", h.target(2000), "b2", BackupType::Incremental)).await.unwrap();
    let view = wait_job(&client, "b2").await;
    h.close().await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_eq!(view.disks[0].bytes_sent, 64 << 10, "{view:?}");
    assert_same(&disk, &incr);

    // A qcow2 file with no format stated: the job fails naming the way out, nothing sent.
    let other = d.join("other.qcow2");
    new_qcow2(&other, 48 * MIB);
    let h = HubExport::start(&other, "unstated-disk0").await;
    match client.start_backup(&start("unstated", h.target(2000), "b3", BackupType::Full)).await {
        Ok(_) => {
            let view = wait_job(&client, "b3").await;
            assert_eq!(view.status, JobStatus::Failed, "{view:?}");
            let error = format!("{:?} {:?}", view.error, view.disks.first().and_then(|d| d.error.clone()));
            assert!(error.contains("holds a qcow2 image"), "{error}");
            assert!(view.disks.iter().all(|d| d.bytes_sent == 0), "{view:?}");
        }
        Err(e) => assert!(e.to_string().contains("holds a qcow2 image"), "{e}"),
    }
    h.close().await;
    assert_eq!(top_layer_data(&other), 0, "nothing written");

    // A restore of the full backup onto the qcow2 disk writes a qcow2 image of its own (the
    // overlay's chain gone), and into the restore directory as `*.qcow2` the same; onto the
    // image whose format is not stated, nothing.
    let backup = HubExport::start(&full, "backup").await;
    let restore = |job: &str, dest: &std::path::Path| RestoreRequest {
        job_id: job.into(),
        nbd_targets: backup.target(2000),
        destinations: [("2000".to_string(), dest.display().to_string())].into(),
    };
    let err = client.start_restore(&restore("r0", &loose)).await.unwrap_err();
    assert!(matches!(&err, node::api::ApiError::Status { status: 400, .. }), "{err}");
    assert!(err.to_string().contains("set format = \"qcow2\""), "{err}");
    assert_clean(&loose);
    let copy = d.join("state/restores/copy.qcow2");
    for (job, dest) in [("r1", &disk), ("r2", &copy)] {
        client.start_restore(&restore(job, dest)).await.unwrap();
        let view = wait_job(&client, job).await;
        assert_eq!(view.status, JobStatus::Completed, "{view:?}");
        assert_eq!(
            view.disks[0].checksum.as_deref(),
            Some(checksum_of(&flat).as_str()),
            "the backup's disk, end to end"
        );
        assert_same(&full, dest);
        assert_clean(dest);
        let info = qemu_img(&["info", "--output=json", dest.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!((info["format"].as_str(), info.get("backing-filename")), (Some("qcow2"), None), "{info}");
        assert!(top_layer_data(dest) <= chain_data(&full), "holes and zeroes stay unallocated");
    }
    backup.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_replaces_a_disk_whole_or_not_at_all_and_never_under_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The VM's disk is a symlink to its file, which its hypervisor's user may read (0640).
    make_source(&d.join("disk-file.raw"), 8, 1);
    std::os::unix::fs::symlink(d.join("disk-file.raw"), d.join("disk0.raw")).unwrap();
    make_source(&d.join("disk1.raw"), 4, 2);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.join("disk-file.raw"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = std::fs::read(d.join("disk-file.raw")).unwrap();
    // 4 MiB/s: the 8 MiB restore below takes two seconds, time to cancel it half-way. Checkpoints
    // off: the restore killed below is not taken up (`hub/tests/e2e/node_restart.rs` takes one up).
    let config = vm_config(d, "[copy]\nbandwidth_limit = \"4M\"\nconnections = 1\ncheckpoint_every_s = 0");
    let mut node = NodeProcess::start(d, &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    let export = backup_export(d, 8).await;
    let restore = |job: &str| RestoreRequest {
        job_id: job.into(),
        nbd_targets: export.target(2000),
        destinations: [("2000".to_string(), d.join("disk0.raw").display().to_string())].into(),
    };
    let beside = d.join(".disk-file.raw.restoring");

    // Cancelled half-way: the VM keeps its disk as it was, and nothing is left beside it.
    let under_way = |client: NodeClient, job: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.job(job).await.unwrap().disks[0].bytes_read < 2 * MIB {
            assert!(Instant::now() < deadline, "the restore made no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    client.start_restore(&restore("cut")).await.unwrap();
    under_way(client.clone(), "cut").await;
    assert!(beside.exists(), "the restore writes beside the disk");
    client.cancel("cut").await.unwrap();
    assert_eq!(wait_job(&client, "cut").await.status, JobStatus::Cancelled);
    assert!(std::fs::read(d.join("disk-file.raw")).unwrap() == before, "the disk is as it was");
    assert!(!beside.exists(), "{} left behind", beside.display());

    // Killed with the node: the disk as it was, and the next start removes what was beside it.
    client.start_restore(&restore("killed")).await.unwrap();
    under_way(client.clone(), "killed").await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    assert!(std::fs::read(d.join("disk-file.raw")).unwrap() == before, "the disk is as it was");
    assert!(beside.exists());
    let node = NodeProcess::start(d, &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    assert!(!beside.exists(), "{} left behind by the killed restore", beside.display());

    // A running VM (qemu holding the disk for writing) is never restored onto.
    let vm = QemuNbd::start(&d.join("disk-file.raw"), "raw", "running-vm", &[]);
    match client.start_restore(&restore("under-vm")).await {
        Err(node::api::ApiError::Status { status: 409, message, .. }) => {
            assert!(
                message.contains("open for writing by another process") && message.contains("stop the VM"),
                "{message}"
            )
        }
        other => panic!("expected 409, got {other:?}"),
    }
    vm.stop();

    // Completed: the restored disk in the file's place, the link and the mode kept.
    client.start_restore(&restore("whole")).await.unwrap();
    let view = wait_job(&client, "whole").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_same(&d.join("backup.raw"), &d.join("disk-file.raw"));
    assert!(std::fs::symlink_metadata(d.join("disk0.raw")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::metadata(d.join("disk-file.raw")).unwrap().permissions().mode() & 0o777, 0o640);
    assert!(!beside.exists());
    export.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_run_cut_by_a_killed_node_is_followed_by_every_block_even_with_a_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("vm.qcow2");
    make_qcow2_source(&d.join("src.raw"), &image, 16, 5, &[]);
    qemu_img(&["bitmap", "--add", image.to_str().unwrap(), "b0"]);
    let config = |limit: &str| {
        format!(
            "state_dir = \"{}\"\n[copy]\nconnections = 1\ncheckpoint_every_s = 0\n{limit}\n[[vm]]\nname = \"q\"\n[[vm.disk]]\nkey = 2000\n\
             source = \"{}\"\nformat = \"qcow2\"\ndirty_bitmap = \"b0\"\n",
            d.join("state").display(),
            image.display()
        )
    };
    let replica = d.join("replica.qcow2");
    new_qcow2(&replica, 16 * MIB);
    let export = HubExport::start(&replica, "q-replica-disk0").await;
    let replicate = |job: &str, t: BackupType| StartRequest {
        vm_name: "q".into(),
        nbd_host: None,
        nbd_targets: export.target(2000),
        job_id: job.into(),
        backup_type: t,
    };
    let node = NodeProcess::start(d, &config(""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    client.replicate(&replicate("rep1", BackupType::Full)).await.unwrap();
    assert_eq!(wait_job(&client, "rep1").await.status, JobStatus::Completed);
    client.commit("rep1").await.unwrap();
    drop(node);

    // The guest rewrites 8 MiB; the next run (at 2 MiB/s) is killed half-way, and the hooks
    // start the bitmap anew, as a snapshot hook does: it no longer knows those 8 MiB.
    let io = require("qemu-io");
    run(std::process::Command::new(&io).args(["-f", "qcow2", "-c", "write -P 0x42 4M 8M"]).arg(&image));
    let node = NodeProcess::start(d, &config("bandwidth_limit = \"2M\""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    client.replicate(&replicate("rep2", BackupType::Incremental)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.job("rep2").await.unwrap().disks[0].bytes_sent == 0 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(node);
    qemu_img(&["bitmap", "--clear", image.to_str().unwrap(), "b0"]);

    // The run after cannot trust the committed map, nor the bitmap: every block is written.
    let node = NodeProcess::start(d, &config(""), &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    client.replicate(&replicate("rep3", BackupType::Incremental)).await.unwrap();
    let view = wait_job(&client, "rep3").await;
    assert_eq!(view.status, JobStatus::Completed, "{view:?}");
    assert_eq!(
        (view.disks[0].mode, view.disks[0].change_source.as_str()),
        (node::api::CopyMode::Full, "none"),
        "{view:?}"
    );
    assert!(view.disks[0].mode_reason.as_deref().unwrap_or("").contains("did not finish"), "{view:?}");
    export.close().await;
    assert_same(&image, &replica);
}

/// Two VMs backed up at once under one `bandwidth_limit`: one copies four disks at once (16
/// requests in flight), the other one disk (4). The limit is the node's, shared by jobs, not by
/// workers: the one-disk VM's 8 MiB of data go at half the limit, and the four-disk VM has sent
/// about as much when it is done (by workers, as the bucket before shared it, the four-disk VM
/// would have sent its 32 MiB first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_under_one_bandwidth_limit_share_it_equally_whatever_their_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = |name: &str| d.join(format!("{name}.raw"));
    let mut config = format!(
        "state_dir = \"{}\"\n[copy]\nbandwidth_limit = \"8M\"\nconnections = 2\ndepth = 2\nparallel_disks = 4\n",
        d.join("state").display()
    );
    config += &format!("[[vm]]\nname = \"narrow\"\n[[vm.disk]]\nkey = 2000\nsource = \"{}\"\n", disk("n0").display());
    config += "[[vm]]\nname = \"wide\"\n";
    for i in 0..4 {
        config += &format!("[[vm.disk]]\nkey = {}\nsource = \"{}\"\n", 2000 + i, disk(&format!("w{i}")).display());
    }
    // 32 MiB disks holding 8 MiB of data each.
    make_source(&disk("n0"), 32, 1);
    for i in 0..4 {
        make_source(&disk(&format!("w{i}")), 32, 10 + i);
    }
    let node = NodeProcess::start(d, &config, &[]);
    let client = NodeClient::new(node.url(), None).unwrap();
    // (source, image, export name, disk key) of every disk of both VMs.
    let mut disks = vec![(disk("n0"), d.join("narrow-0.qcow2"), "narrow-disk0".to_string(), 2000u32)];
    for i in 0..4u32 {
        disks.push((disk(&format!("w{i}")), d.join(format!("wide-{i}.qcow2")), format!("wide-disk{i}"), 2000 + i));
    }
    let (mut served, mut open) = (Vec::new(), Vec::new());
    for (_, image, name, key) in &disks {
        new_qcow2(image, 32 * MIB);
        let export = HubExport::start(image, name).await;
        open.push((export.target(*key), name.clone()));
        served.push(export);
    }
    let joined =
        |vm: &str| open.iter().filter(|(_, n)| n.starts_with(vm)).map(|(t, _)| t.clone()).collect::<Vec<_>>().join(",");
    client.start_backup(&start("wide", joined("wide"), "w", BackupType::Full)).await.unwrap();
    client.start_backup(&start("narrow", joined("narrow"), "n", BackupType::Full)).await.unwrap();
    let sent = |v: &node::api::JobView| v.disks.iter().map(|d| d.bytes_sent).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(60);
    let wide_when_narrow_done = loop {
        let (n, w) = (client.job("n").await.unwrap(), client.job("w").await.unwrap());
        if n.status.is_final() {
            assert_eq!(n.status, JobStatus::Completed, "{n:?}");
            break sent(&w);
        }
        assert!(Instant::now() < deadline, "{n:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        wide_when_narrow_done <= 14 * MIB,
        "the four-disk VM had sent {} MiB when the one-disk VM's 8 MiB were through",
        wide_when_narrow_done / MIB
    );
    let w = wait_job(&client, "w").await;
    assert_eq!((w.status, sent(&w)), (JobStatus::Completed, 32 * MIB), "{w:?}");
    for export in served {
        export.close().await;
    }
    for (source, image, _, _) in &disks {
        assert_same(source, image);
    }
}
