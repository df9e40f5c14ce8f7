//! `sendense-nbd -f qcow2` serving qemu-made images: what libnbd and qemu read through it is
//! bit-identical to `qemu-img convert -O raw` of the same image, and block status keeps sparse
//! copies sparse.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn qcow2_variants(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let src = write_file(dir, "src.raw", &pattern(12 << 20, 5));
    let mut out = Vec::new();
    for (name, opts) in [
        ("default", vec![]),
        ("compressed", vec!["-c"]),
        ("zstd", vec!["-c", "-o", "compression_type=zstd"]),
        ("extl2", vec!["-o", "extended_l2=on"]),
        ("c4k-rc1", vec!["-o", "cluster_size=4096,refcount_bits=1"]),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).args(&opts).arg(&src).arg(&img));
        out.push((name.to_string(), img));
    }
    // An overlay on that base with its own writes and zeroes.
    let top = dir.join("overlay.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-b", "default.qcow2", "-F", "qcow2"]).arg(&top));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 2M 300k", "-c", "write -z 6M 1M"]).arg(&top));
    out.push(("overlay".into(), top));
    out
}

#[test]
fn qemu_made_images_read_bit_identical_through_sendense_nbd() {
    require("qemu-img");
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    for (name, img) in qcow2_variants(dir.path()) {
        let want = dir.path().join(format!("{name}.want.raw"));
        run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&want));
        let port = free_port();
        let mut child = Command::new(sendense_nbd())
            .args(["-f", "qcow2", "-r", "-x", &name, "-p", &port.to_string(), "--shared=4", "-t"])
            .arg(&img)
            .spawn()
            .unwrap();
        wait_for_port(port, &mut child);
        let peer = Peer { child, port, name: name.clone() };
        let got = dir.path().join(format!("{name}.got.raw"));
        run(Command::new("nbdcopy").args(["--connections=4", "--threads=4", &peer.url()]).arg(&got));
        assert_same_content(&want, &got);
        let out = run(Command::new("qemu-img").args(["compare", "-f", "raw"]).arg(&want).arg(peer.url()));
        assert!(String::from_utf8_lossy(&out.stdout).contains("identical"), "{name}");
    }
}

#[test]
fn block_status_of_a_qcow2_chain_reports_only_allocated_data() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2"]).arg(&base).arg("64M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 1M"]).arg(&base));
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]).arg(&top));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 2 32M 2M", "-c", "write -z 0 64k"]).arg(&top));
    let port = free_port();
    let mut child = Command::new(sendense_nbd())
        .args(["-f", "qcow2", "-r", "-x", "t", "-p", &port.to_string(), "-t"])
        .arg(&top)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    let peer = Peer { child, port, name: "t".into() };
    let out = run(Command::new("nbdinfo").args(["--map", "--json", &peer.url()]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: u64 =
        map.as_array().unwrap().iter().filter(|e| e["type"] == 0).map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(
        data,
        (1 << 20) - (64 << 10) + (2 << 20),
        "data = base's 1 MiB minus the zeroed 64 KiB, plus 2 MiB: {map}"
    );
}

#[test]
fn writing_a_qcow2_export_is_refused_with_a_clear_line_until_writes_exist() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    qcow2::Image::create(&img, &qcow2::CreateOptions::new(1 << 20)).unwrap();
    let out = Command::new(sendense_nbd()).args(["-f", "qcow2", "-x", "w", "-p", "1"]).arg(&img).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read-only with -r") && err.lines().count() == 1, "{err}");
    let bad = dir.path().join("not.qcow2");
    std::fs::write(&bad, b"definitely not qcow2, just text that is long enough to look at it").unwrap();
    let out =
        Command::new(sendense_nbd()).args(["-f", "qcow2", "-r", "-x", "w", "-p", "1"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a qcow2 image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
