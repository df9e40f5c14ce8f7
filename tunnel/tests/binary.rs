//! `sendense-tunnel serve` and `connect` as processes: NBD through the tunnel (qemu-nbd behind
//! the forward, nbdcopy with 4 connections through it, content identical), bad configuration
//! reported in one line with a non-zero exit, and keys read again on `SIGHUP`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_sendense-tunnel");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Kill {
    Kill(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

fn tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{name} is required; scripts/test.sh installs it");
}

#[test]
fn nbd_with_four_connections_through_the_tunnel_binaries_is_bit_identical() {
    tool("qemu-nbd");
    tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (identity, host_pub) = setup(d);
    let (hub_ssh, nbd_port, local_nbd) = (free_port(), free_port(), free_port());
    let size = 32usize << 20;
    let src: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 ^ (i as u8)).collect();
    std::fs::write(d.join("src.raw"), &src).unwrap();
    std::fs::File::create(d.join("dst.raw")).unwrap().set_len(size as u64).unwrap();

    let _nbd = spawn(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "exp", "-p", &nbd_port.to_string(), "-b", "127.0.0.1", "--shared=8", "-t"])
            .arg(d.join("dst.raw")),
    );
    let _hub = serve(d, hub_ssh, nbd_port);
    let kh = known_hosts(d, hub_ssh, &host_pub);
    let _node = spawn(
        Command::new(BIN)
            .args([
                "connect",
                "--hub",
                &format!("127.0.0.1:{hub_ssh}"),
                "--forward",
                &format!("{local_nbd}:{nbd_port}"),
            ])
            .arg("--identity")
            .arg(&identity)
            .arg("--known-hosts")
            .arg(&kh),
    );
    wait_port(local_nbd);
    let out = Command::new("nbdcopy")
        .args(["--flush", "--connections=4", "--threads=4"])
        .arg(d.join("src.raw"))
        .arg(format!("nbd://127.0.0.1:{local_nbd}/exp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdcopy through the tunnel: {}", String::from_utf8_lossy(&out.stderr));
    let back = d.join("back.raw");
    let out = Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4", &format!("nbd://127.0.0.1:{local_nbd}/exp")])
        .arg(&back)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(d.join("dst.raw")).unwrap() == src, "written image differs");
    assert!(std::fs::read(&back).unwrap() == src, "read-back differs");
}

/// `sendense-tunnel serve` on `port` with `dir`'s host key and authorized_keys, allowing `allow`,
/// once it listens.
fn serve(dir: &Path, port: u16, allow: u16) -> Kill {
    let serving = spawn(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--allow", &allow.to_string()])
            .arg("--host-key")
            .arg(dir.join("host_key"))
            .arg("--authorized-keys")
            .arg(dir.join("authorized_keys")),
    );
    wait_port(port);
    serving
}

fn wait_port(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::net::TcpStream::connect(local(port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn one_line_failure(args: &[&str], dir: &Path, expect: &str) {
    let out = Command::new(BIN).args(args).current_dir(dir).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("sendense-tunnel:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(expect), "{err}");
}

#[test]
fn bad_configuration_is_one_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _) = setup(d);
    one_line_failure(&["connect", "--hub", "127.0.0.1:1", "--identity", "client_key"], d, "no accept-anything mode");
    one_line_failure(
        &[
            "connect",
            "--hub",
            "127.0.0.1:1",
            "--identity",
            "client_key",
            "--fingerprint",
            "SHA256:x",
            "--forward-range",
            "20-10",
        ],
        d,
        "range end is below its start",
    );
    one_line_failure(
        &[
            "connect",
            "--hub",
            "127.0.0.1:1",
            "--identity",
            "missing_key",
            "--fingerprint",
            "SHA256:x",
            "--forward",
            "1",
        ],
        d,
        "cannot load identity",
    );
    one_line_failure(
        &["serve", "--listen", "127.0.0.1:0", "--host-key", "nope", "--authorized-keys", "authorized_keys"],
        d,
        "cannot load host key",
    );
    // A key its owner lets others read is refused, as OpenSSH refuses it, with the fix named.
    use std::os::unix::fs::PermissionsExt;
    for key in ["host_key", "client_key"] {
        std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    one_line_failure(
        &["serve", "--listen", "127.0.0.1:0", "--host-key", "host_key", "--authorized-keys", "authorized_keys"],
        d,
        "permissions 0644 for private key host_key are too open",
    );
    one_line_failure(
        &["connect", "--hub", "127.0.0.1:1", "--identity", "client_key", "--fingerprint", "SHA256:x", "--forward", "1"],
        d,
        "chmod 600 client_key",
    );
    for key in ["host_key", "client_key"] {
        std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // So is an authorized_keys file others may write, as sshd's StrictModes refuses it.
    std::fs::set_permissions(d.join("authorized_keys"), std::fs::Permissions::from_mode(0o666)).unwrap();
    one_line_failure(
        &["serve", "--listen", "127.0.0.1:0", "--host-key", "host_key", "--authorized-keys", "authorized_keys"],
        d,
        "could be changed by others (mode 0666)",
    );
    std::fs::set_permissions(d.join("authorized_keys"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(d.join("empty_keys"), "# nobody\n").unwrap();
    one_line_failure(
        &["serve", "--listen", "127.0.0.1:0", "--host-key", "host_key", "--authorized-keys", "empty_keys"],
        d,
        "holds no keys",
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    one_line_failure(
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--host-key",
            "host_key",
            "--authorized-keys",
            "authorized_keys",
        ],
        d,
        "cannot listen",
    );
}

/// `SIGHUP` to `sendense-tunnel serve` reads its authorized_keys again: an OpenSSH client of a
/// key taken out is disconnected at once (it exits, told why) and refused from then on; a file
/// that does not parse changes nothing; the key put back logs in again.
#[test]
fn a_hangup_reads_the_authorized_keys_again_and_cuts_the_keys_taken_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, host_pub) = setup(d);
    let (hub_ssh, echo, local_port) = (free_port(), echo_servers(1), free_port());
    let serve = serve(d, hub_ssh, echo);
    known_hosts(d, hub_ssh, &host_pub);
    let hangup = || {
        let status = Command::new("kill").arg("-HUP").arg(serve.0.id().to_string()).status().unwrap();
        assert!(status.success());
    };
    let forward = || {
        ssh(d, hub_ssh, "client_key", &["-N", "-L", &format!("{local_port}:127.0.0.1:{echo}")])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = forward();
    wait_port(local_port);
    round_trip(local(local_port), 64 << 10, 1);

    // A line that does not parse: logged, the keys in force stay.
    let keys = std::fs::read_to_string(d.join("authorized_keys")).unwrap();
    std::fs::write(d.join("authorized_keys"), format!("{keys}this is not a key\n")).unwrap();
    hangup();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(first.try_wait().unwrap().is_none(), "a file that does not parse cut the session");
    round_trip(local(local_port), 64 << 10, 2);

    // The key taken out: cut at once and refused.
    std::fs::write(d.join("authorized_keys"), "").unwrap();
    hangup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the key taken out is still connected");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut first.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("key no longer authorized"), "{said}");
    // A command, not -N: were it let in, the refused command would end it (no hang).
    let out = ssh(d, hub_ssh, "client_key", &["-o", "RemoteCommand=true"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");

    // Put back: it logs in and forwards again.
    std::fs::write(d.join("authorized_keys"), keys).unwrap();
    hangup();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut again = forward();
    wait_port(local_port);
    round_trip(local(local_port), 64 << 10, 3);
    let _ = again.kill();
    let _ = again.wait();
}
