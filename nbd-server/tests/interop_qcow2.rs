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
        let peer = Peer { child: Reaped(child), port, name: name.clone() };
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
    let peer = Peer { child: Reaped(child), port, name: "t".into() };
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

/// Every context a block status request selects, as libnbd's Python binding receives them in one
/// request over the whole image: `context: [(length, flags), ...]` lines, sorted by context.
const BLOCK_STATUS_OF_EVERY_CONTEXT: &str = r#"
import nbd, sys
h = nbd.NBD()
for c in sys.argv[2:]:
    h.add_meta_context(c)
h.connect_uri(sys.argv[1])
seen = {}
def got(context, offset, entries, err):
    seen.setdefault(context, []).extend(zip(entries[0::2], entries[1::2]))
    return 0
offset, size = 0, h.get_size()
while offset < size:
    before = {c: sum(l for l, _ in e) for c, e in seen.items()}
    h.block_status(size - offset, offset, got)
    # Each context answered for at least one byte; go on from the shortest answer.
    offset += min(sum(l for l, _ in seen[c]) - before.get(c, 0) for c in sys.argv[2:])
for c in sorted(seen):
    print(c, seen[c])
"#;

/// `-B NAME`, repeated, as qemu-nbd takes it: each of the image's persistent bitmaps as its own
/// `qemu:dirty-bitmap:NAME`, which libnbd reads exactly as it reads qemu-nbd's on the same image,
/// one at a time (nbdinfo) and all in one request beside `base:allocation` (one reply chunk
/// per context); and every use it cannot serve is refused in one line.
#[test]
fn persistent_bitmaps_are_offered_as_qemu_nbd_offers_them() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("64M"));
    run(Command::new("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b0"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 5M 4k", "-c", "write -P 2 40M 130k"]).arg(&img));
    // A second bitmap from here on: it sees only what is written after it was added.
    run(Command::new("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b1"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 3 50M 64k"]).arg(&img));
    let map = |url: &str, context: &str| {
        let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg("--json").arg(url));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let dirty = |map: &serde_json::Value| -> Vec<(u64, u64)> {
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == 1)
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    let contexts = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"];
    let every_context = |url: &str| {
        let out =
            run(Command::new(debian_python()).arg("-c").arg(BLOCK_STATUS_OF_EVERY_CONTEXT).arg(url).args(contexts));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ours = start_sendense_as(&img, "qcow2", "e", &["-r", "-B", "b0", "-B", "b1", "--shared=4"]);
    let (b0, b1) = (map(&ours.url(), "qemu:dirty-bitmap:b0"), map(&ours.url(), "qemu:dirty-bitmap:b1"));
    assert_eq!(dirty(&b0), [(5 << 20, 64 << 10), (40 << 20, 192 << 10), (50 << 20, 64 << 10)], "{b0}");
    assert_eq!(dirty(&b1), [(50 << 20, 64 << 10)], "{b1}");
    let allocation = map(&ours.url(), "base:allocation");
    assert!(
        allocation.as_array().unwrap().iter().any(|e| e["type"] == 0),
        "base:allocation still answers: {allocation}"
    );
    let info = run(Command::new("nbdinfo").args(["--list", "--content"]).arg(ours.url().rsplit_once('/').unwrap().0));
    let listed = String::from_utf8_lossy(&info.stdout);
    assert!(listed.contains("qemu:dirty-bitmap:b0") && listed.contains("qemu:dirty-bitmap:b1"), "{listed}");
    let all_of_ours = every_context(&ours.url());
    assert_eq!(all_of_ours.lines().count(), 3, "{all_of_ours}");
    drop(ours);

    require("qemu-nbd");
    let port = free_port();
    let mut child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "qcow2",
            "-B",
            "b0",
            "-B",
            "b1",
            "-x",
            "e",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
        ])
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    let theirs = Peer { child: Reaped(child), port, name: "e".into() };
    assert_eq!(map(&theirs.url(), "qemu:dirty-bitmap:b0"), b0, "the same map as qemu-nbd's");
    assert_eq!(map(&theirs.url(), "qemu:dirty-bitmap:b1"), b1, "the same map as qemu-nbd's");
    // The bitmaps' chunks of one request equal; qemu-nbd reports allocation in its own
    // granularity, so base:allocation is compared by nbdinfo above, not here.
    let bitmaps_only = |text: &str| text.lines().filter(|l| l.contains("bitmap")).collect::<Vec<_>>().join("\n");
    assert_eq!(bitmaps_only(&every_context(&theirs.url())), bitmaps_only(&all_of_ours));
    drop(theirs);

    for (extra, why) in [
        (&["-B", "b0"][..], "export the image read-only"),
        (&["-r", "-B", "nope"][..], "no bitmap named nope"),
        (&["-r", "-B", "b0", "-B", "b0"][..], "dirty bitmap b0 is named twice"),
    ] {
        let out = Command::new(sendense_nbd())
            .args(["-f", "qcow2", "-x", "e", "-p", "1"])
            .args(extra)
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why) && err.lines().count() == 1, "{extra:?}: {err}");
    }
    // The refusals left the bitmaps as they were (the one without -r refused before the
    // writable open that would have invalidated them).
    let out = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&img));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps.as_array().map(Vec::len), Some(2), "{bitmaps}");
    for b in bitmaps.as_array().unwrap() {
        assert_eq!(b["flags"], serde_json::json!(["auto"]), "neither in use nor invalidated: {bitmaps}");
    }
    let raw = sparse_file(dir.path(), "d.raw", 1 << 20);
    let out = Command::new(sendense_nbd()).args(["-r", "-B", "b0", "-x", "e", "-p", "1"]).arg(&raw).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("a raw image has no bitmaps"));
}

#[test]
fn a_file_that_is_not_qcow2_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not.qcow2");
    std::fs::write(&bad, b"definitely not qcow2, just text that is long enough to look at it").unwrap();
    let out = Command::new(sendense_nbd()).args(["-f", "qcow2", "-x", "w", "-p", "1"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a qcow2 image") && err.lines().count() == 1, "{err}");
}

fn start_qcow2(img: &Path, name: &str) -> Peer {
    let port = free_port();
    let mut child = Command::new(sendense_nbd())
        .args(["-f", "qcow2", "-x", name, "-p", &port.to_string(), "--shared=8", "-t"])
        .arg(img)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    Peer { child: Reaped(child), port, name: name.to_string() }
}

fn check_exit(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn nbdcopy_with_four_connections_writes_a_qcow2_that_qemu_img_accepts() {
    require("nbdcopy");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = write_file(dir.path(), "src.raw", &pattern(40 << 20, 17));
    let img = dir.path().join("dst.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2"]).arg(&img).arg("64M"));
    let peer = start_qcow2(&img, "dst");
    run(Command::new("nbdcopy").args(["--flush", "--connections=4", "--threads=4"]).arg(&src).arg(peer.url()));
    assert!(peer.stop().success());
    let (code, text) = check_exit(&img);
    assert_eq!(code, 0, "qemu-img check after a clean shutdown: {text}");
    let out = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&img));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    // Sparse: the zero MiBs of the source did not become data clusters.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(&img));
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let data: u64 =
        map.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| e["length"].as_u64().unwrap()).sum();
    assert!(data <= 31 << 20, "zero stretches should stay unallocated; {data} bytes of data");
}

#[test]
fn qemu_io_patterns_on_a_qcow2_overlay_equal_the_same_patterns_on_raw() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_file(d, "base.raw", &pattern(16 << 20, 23));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&src).arg(d.join("base.qcow2")));
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"])
        .arg(d.join("top.qcow2")));
    let ops = [
        "write -P 0x11 0 1M",
        "write -P 0x22 3000 5000",
        "write -z 512k 256k",
        "write -z 70000 1000",
        "discard 6M 1M",
        "write -P 0x44 7M 100k",
        "aio_write -P 0x55 8M 64k",
        "aio_write -P 0x66 9M 64k",
        "aio_flush",
        "write -f -P 0x77 10M 4k",
        "flush",
    ];
    let peer = start_qcow2(&d.join("top.qcow2"), "top");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for op in ops {
        cmd.args(["-c", op]);
    }
    run(cmd.arg(peer.url()));
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for op in ops {
        cmd.args(["-c", op]);
    }
    run(cmd.arg(&src));
    assert!(peer.stop().success());
    let (code, text) = check_exit(&d.join("top.qcow2"));
    assert_eq!(code, 0, "{text}");
    let out =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(d.join("top.qcow2")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(d.join("top.qcow2")));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
}

#[test]
fn kill_9_during_a_four_connection_copy_never_corrupts_and_keeps_flushed_data() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2"]).arg(&img).arg("64M"));
    let flushed = pattern(16 << 20, 31);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for round in 0..6u64 {
        let mut peer = start_qcow2(&img, "c");
        let port = peer.port;
        // The first connection, retried for a while: in two of several fresh-clone CI runs it was
        // refused right after the server had accepted the readiness probe (never reproduced
        // otherwise); if it happens again, the message says whether the server was still alive.
        let first = runtime.block_on(async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match nbd_server::Client::connect_tcp(("127.0.0.1", port), "c").await {
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("round {round}: connecting to 127.0.0.1:{port}: {e}; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    done => break done,
                }
            }
        });
        let c = first.unwrap_or_else(|e| {
            panic!("round {round}: cannot connect to port {port}: {e}; server: {:?}", peer.child.try_wait())
        });
        let phase1 = flushed.clone();
        runtime.block_on(async move {
            // Phase 1: the first 16 MiB, acknowledged by FLUSH.
            for (i, chunk) in phase1.chunks(1 << 20).enumerate() {
                c.write(i as u64 * (1 << 20), chunk, false).await.unwrap();
            }
            c.flush().await.unwrap();
            // Phase 2: four connections writing the rest, with no flush, until the kill: it comes
            // once a round-dependent number of writes were acknowledged, while the writers are
            // provably still at it (none has finished its share).
            let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let finished = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            for k in 0..4u64 {
                let (acked, finished) = (acked.clone(), finished.clone());
                tokio::spawn(async move {
                    let Ok(c) = nbd_server::Client::connect_tcp(("127.0.0.1", port), "c").await else { return };
                    let mut off = (16 << 20) + k * (256 << 10);
                    while off + (256 << 10) <= 64 << 20 {
                        if c.write(off, &vec![(round + k) as u8 + 1; 256 << 10], false).await.is_err() {
                            return;
                        }
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        off += 4 * (256 << 10);
                    }
                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            let threshold = 1 + round * 7;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while acked.load(std::sync::atomic::Ordering::SeqCst) < threshold {
                assert!(std::time::Instant::now() < deadline, "round {round}: writes never got going");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(
                finished.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "round {round}: writers done before the kill"
            );
        });
        peer.child.kill().unwrap(); // SIGKILL
        peer.child.wait().unwrap();
        let (code, text) = check_exit(&img);
        assert!(code == 0 || code == 3, "round {round}: qemu-img check exit {code} (2 = corruption): {text}");
        let raw = dir.path().join("now.raw");
        let _ = std::fs::remove_file(&raw);
        run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&raw));
        let now = std::fs::read(&raw).unwrap();
        assert!(now[..16 << 20] == flushed[..], "round {round}: flushed data changed after kill -9");
    }
}
