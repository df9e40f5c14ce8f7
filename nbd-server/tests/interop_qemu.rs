//! qemu as the client (qemu-img, qemu-io) against sendense-nbd, cross-checked against the same
//! operations applied by qemu-io to a plain raw file.

mod common;

use std::process::{Command, Stdio};

use common::*;

#[test]
fn qemu_img_convert_writes_and_compare_reads_back_identical() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(20 << 20, 11);
    let src = write_file(dir.path(), "src.raw", &data);
    let target = sparse_file(dir.path(), "dst.raw", data.len() as u64);
    let peer = start_sendense(&target, "conv", &["--shared=4"]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(peer.url()));
    let out = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(peer.url()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
    assert!(peer.stop().success());
    assert_same_content(&src, &target);
}

/// qemu-io command lists: writes, zeroes (with and without allocation), discards, then reads
/// that check the patterns.
const QEMU_IO_OPS: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 3M 64k",
    "write -P 0x33 5000 12345",
    "write -z 512k 256k",
    "write -z -u 3M 4k",
    "discard 6M 1M",
    "write -P 0x44 7M 1M",
    "aio_write -P 0x55 8M 64k",
    "aio_write -P 0x66 9M 64k",
    "aio_flush",
    "write -f -P 0x77 10M 4k",
    "flush",
];

const QEMU_IO_CHECKS: &[&str] = &[
    "read -P 0x11 0 5000",
    "read -P 0x33 5000 12345",
    "read -P 0 512k 256k",
    "read -P 0 3M 4k",
    "read -P 0x22 3149824 61440",
    "read -P 0x44 7M 1M",
    "read -P 0x55 8M 64k",
    "read -P 0x66 9M 64k",
    "read -P 0x77 10M 4k",
];

fn qemu_io(target: &str, format: &str, ops: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for op in ops {
        cmd.args(["-c", op]);
    }
    cmd.arg(target);
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("Pattern verification failed"), "qemu-io on {target}: {text}");
    assert!(!text.contains("failed"), "qemu-io on {target}: {text}");
    text
}

#[test]
fn qemu_io_patterns_through_the_server_equal_the_same_patterns_on_a_raw_file() {
    require("qemu-io");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let through_nbd = sparse_file(dir.path(), "nbd.raw", 16 << 20);
    let direct = sparse_file(dir.path(), "direct.raw", 16 << 20);
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let port = free_port();
    let mut child = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "io", "-p", &port.to_string(), "--shared=2", "-t"])
        .arg(&through_nbd)
        .env("RUST_LOG", "nbd_server=debug")
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    let peer = Peer { child: Reaped(child), port, name: "io".into() };
    qemu_io(&peer.url(), "raw", QEMU_IO_OPS);
    qemu_io(&peer.url(), "raw", QEMU_IO_CHECKS);
    qemu_io(direct.to_str().unwrap(), "raw", QEMU_IO_OPS);
    let out = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&direct).arg(peer.url()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
    // qemu's block-status view through NBD matches the file's own map.
    let map_nbd = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &peer.url()]));
    let map: serde_json::Value = serde_json::from_slice(&map_nbd.stdout).unwrap();
    let zero_at_6m = map.as_array().unwrap().iter().any(|e| {
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        start <= 6 << 20 && end >= 7 << 20 && e["zero"] == true
    });
    assert!(zero_at_6m, "discarded range should map as zero: {map}");
    assert!(peer.stop().success());
    assert_same_content(&direct, &through_nbd);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("Extended"), "qemu 10 should negotiate extended headers; server log:\n{log}");
}

#[test]
fn sendense_nbd_reports_bad_setups_in_one_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let missing =
        Command::new(sendense_nbd()).args(["-x", "a", "-p", "1"]).arg(dir.path().join("nope.raw")).output().unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("cannot open") && err.contains("nope.raw") && err.lines().count() == 1, "{err}");

    let file = sparse_file(dir.path(), "d.raw", 1 << 20);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let in_use = Command::new(sendense_nbd()).args(["-x", "a", "-p", &port]).arg(&file).output().unwrap();
    assert!(!in_use.status.success());
    let err = String::from_utf8_lossy(&in_use.stderr);
    assert!(err.contains("cannot listen") && err.contains("in use") && err.lines().count() == 1, "{err}");

    let bad_format = Command::new(sendense_nbd()).args(["-f", "vmdk", "-x", "a"]).arg(&file).output().unwrap();
    assert!(!bad_format.status.success());
}

#[test]
fn without_persistent_the_server_exits_when_the_last_client_leaves() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 1 << 20);
    let port = free_port();
    let pid_file = dir.path().join("pid");
    let child = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "once", "-p", &port.to_string(), "--pid-file"])
        .arg(&pid_file)
        .arg(&file)
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    // The pid file is the readiness signal: it appears, whole, once the server listens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pid_file.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited before it was ready");
        assert!(std::time::Instant::now() < deadline, "no pid file");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(pid, child.id());
    qemu_io(&format!("nbd://127.0.0.1:{port}/once"), "raw", &["write -P 0x9 0 4k"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "server still running after its only client left");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!pid_file.exists(), "pid file removed on exit");
    assert_eq!(&std::fs::read(&file).unwrap()[..4096], &[9u8; 4096][..]);
}

#[test]
fn a_unix_socket_export_serves_qemu_io() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 1 << 20);
    let sock = dir.path().join("nbd.sock");
    let child =
        Command::new(sendense_nbd()).args(["-f", "raw", "-x", "u", "-t", "-k"]).arg(&sock).arg(&file).spawn().unwrap();
    let mut child = Reaped(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Listening, not just bound: a probe connection goes through (the export is persistent).
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let uri = format!("nbd+unix:///u?socket={}", sock.display());
    qemu_io(&uri, "raw", &["write -P 0x3 0 64k", "read -P 0x3 0 64k"]);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_pid_file_and_the_socket_never_write_through_or_remove_what_is_not_theirs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = sparse_file(d, "d.raw", 1 << 20);
    // A symlink planted at the pid file's path: refused, its target untouched.
    std::fs::write(d.join("victim"), "keep").unwrap();
    std::os::unix::fs::symlink(d.join("victim"), d.join("pid")).unwrap();
    let out = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "e", "-p", &free_port().to_string(), "--pid-file"])
        .arg(d.join("pid"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"), "{out:?}");
    assert_eq!(std::fs::read_to_string(d.join("victim")).unwrap(), "keep");
    // A file at the socket's path is not a stale socket: refused, not deleted.
    std::fs::write(d.join("not-a-socket"), "data").unwrap();
    let out = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "e", "-k"])
        .arg(d.join("not-a-socket"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"), "{out:?}");
    assert_eq!(std::fs::read_to_string(d.join("not-a-socket")).unwrap(), "data");
    // A stale regular pid file is replaced (0644); the socket is its owner's only (0600).
    std::fs::remove_file(d.join("pid")).unwrap();
    std::fs::write(d.join("pid"), "99999\n").unwrap();
    let sock = d.join("nbd.sock");
    let child = Command::new(sendense_nbd())
        .args(["-f", "raw", "-x", "e", "-t", "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(d.join("pid"))
        .arg(&file)
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(d.join("pid")).unwrap_or_default().trim() != child.id().to_string() {
        assert!(std::time::Instant::now() < deadline, "pid file never written");
        assert!(child.try_wait().unwrap().is_none(), "exited");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(std::fs::metadata(d.join("pid")).unwrap().permissions().mode() & 0o777, 0o644);
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let _ = child.kill();
    let _ = child.wait();
}
