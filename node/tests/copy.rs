//! `sendense-node copy` against real peers: raw files and qemu-nbd as sources; our NBD server
//! library serving qcow2 (as the hub does) and qemu-nbd as targets; judged by `qemu-img compare`,
//! `check` and `map`. And the data mover's checkpoints taken while a copy runs, against the file
//! it writes.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn field(view: &serde_json::Value, disk: usize, name: &str) -> u64 {
    view["disks"][disk][name].as_u64().unwrap_or_else(|| panic!("no {name} in {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_copy_from_a_raw_file_is_identical_and_stays_sparse_in_both_targets() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = make_source(&src, 64, 1);

    // Into our server writing qcow2, as the hub runs it.
    let ours = dir.path().join("ours.qcow2");
    new_qcow2(&ours, 64 * MIB);
    let hub = HubExport::start(&ours, "vm-disk0").await;
    let (ok, view, err) =
        node_copy(&["--nbd-targets", &hub.target(2000), "--source", &format!("2000={}", src.display())]);
    assert!(ok, "{err}");
    hub.close().await;
    assert_same(&src, &ours);
    assert_clean(&ours);
    assert_eq!(field(&view, 0, "bytes_sent"), data, "only the data travels: {view}");
    assert_eq!(field(&view, 0, "bytes_skipped_zero"), MIB, "the written zero run is not sent: {view}");
    assert_eq!(field(&view, 0, "bytes_read"), data + MIB, "holes are not read: {view}");
    assert_eq!(top_layer_data(&ours), data, "holes and zeroes stay unallocated in the image");
    assert!(view["disks"][0]["checksum"].as_str().unwrap().starts_with("blake3-blocks/65536:"));

    // Into qemu-nbd.
    let theirs = dir.path().join("theirs.qcow2");
    new_qcow2(&theirs, 64 * MIB);
    let q = QemuNbd::start(&theirs, "qcow2", "d0", &[]);
    let (ok, view2, err) =
        node_copy(&["--nbd-targets", &format!("2000:{}", q.url()), "--source", &format!("2000={}", src.display())]);
    assert!(ok, "{err}");
    q.stop();
    assert_same(&src, &theirs);
    assert_clean(&theirs);
    assert_eq!(top_layer_data(&theirs), data);
    assert_eq!(view2["disks"][0]["checksum"], view["disks"][0]["checksum"], "same disk, same checksum");
}

/// A copy is done when it is durable: its time and rate count the final flush. Into qemu-nbd
/// whose every `fdatasync` is held 1.5 s (the slow-sync shim of `benches/scripts`, preloaded), an
/// 8 MiB copy reports a rate of at most 8 MiB per 1.5 s (before: the clock stopped before the
/// flush, and the rate was that of the writes alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_s_time_and_rate_count_its_final_flush() {
    let dir = tempfile::tempdir().unwrap();
    let shim = dir.path().join("slow-sync.so");
    let source_c = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/scripts/slow-sync.c");
    let built = std::process::Command::new(require("cc"))
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(&source_c)
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(built.success(), "cc {}", source_c.display());
    let src = dir.path().join("src.raw");
    make_source(&src, 8, 3);
    // Raw: its writes never sync (qcow2's metadata updates would), only its flush does.
    let target = dir.path().join("t.raw");
    std::fs::File::create(&target).unwrap().set_len(8 * MIB).unwrap();
    let env = [("LD_PRELOAD", shim.as_os_str()), ("SLOW_SYNC_US", std::ffi::OsStr::new("1500000"))];
    let q = QemuNbd::start_with_env(&target, "raw", "d0", &[], &env);
    let (ok, view, err) =
        node_copy(&["--nbd-targets", &format!("2000:{}", q.url()), "--source", &format!("2000={}", src.display())]);
    assert!(ok, "{err}");
    q.stop();
    assert_same(&src, &target);
    let (total, rate) = (field(&view, 0, "bytes_total"), field(&view, 0, "rate_bps"));
    assert!(rate > 0 && rate * 3 <= total * 2, "rate {rate} B/s for {total} bytes: the flush's 1.5 s left out: {view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_nbd_source_is_read_only_where_it_has_data() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = make_source(&src, 48, 7);
    let source = QemuNbd::start(&src, "raw", "src", &["-r"]);
    let target = dir.path().join("t.qcow2");
    new_qcow2(&target, 48 * MIB);
    let hub = HubExport::start(&target, "vm-disk0").await;
    let (ok, view, err) =
        node_copy(&["--nbd-targets", &hub.target(2000), "--source", &format!("2000={}", source.url())]);
    assert!(ok, "{err}");
    hub.close().await;
    assert_same(&src, &target);
    assert_clean(&target);
    assert_eq!(field(&view, 0, "bytes_sent"), data);
    assert!(field(&view, 0, "bytes_read") <= data + MIB, "base:allocation holes are not read: {view}");
    assert_eq!(top_layer_data(&target), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbds_sources_and_targets_are_read_and_written_through_tls_and_untrusted_ones_refused() {
    let pki = testpki::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = make_source(&src, 16, 9);
    // qemu-nbd requiring TLS, client certificates too (qemu's verify-peer default).
    let flags = pki.server_flags("on");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let source = QemuNbd::start(&src, "raw", "src", &[&["-r"], flags.as_slice()].concat());
    let url = |who: &str| format!("nbds://127.0.0.1:{}/src?tls-certificates={}", source.port, pki.dir(who).display());
    let target = dir.path().join("t.qcow2");
    new_qcow2(&target, 16 * MIB);
    let hub = HubExport::start(&target, "vm-disk0").await;
    let (ok, view, err) =
        node_copy(&["--nbd-targets", &hub.target(2000), "--source", &format!("2000={}", url("client"))]);
    assert!(ok, "{err}");
    assert_eq!(field(&view, 0, "bytes_sent"), data);
    // A server whose certificate the node's CA did not sign, and the same source in clear.
    // Each fails at once (not retried for a minute) and says why.
    for (bad, says) in [(url("stranger"), "invalid peer certificate"), (source.url(), "not permitted before TLS")] {
        let (ok, _, err) = node_copy(&["--nbd-targets", &hub.target(2000), "--source", &format!("2000={bad}")]);
        assert!(!ok, "{bad} was read");
        assert!(err.contains(says), "{bad}: {err}");
    }
    hub.close().await;
    assert_same(&src, &target);
    assert_clean(&target);

    // And an nbds:// target (qemu-nbd requiring TLS in the hub's place): with --nbd-tls the
    // copy lands there, without it the node says what is missing.
    let raw_target = dir.path().join("t.raw");
    std::fs::File::create(&raw_target).unwrap().set_len(16 * MIB).unwrap();
    let tls_target = QemuNbd::start(&raw_target, "raw", "vm-disk0", &flags);
    let target_flag = format!("2000:nbds://127.0.0.1:{}/vm-disk0", tls_target.port);
    let source_flag = format!("2000={}", src.display());
    let (ok, _, err) = node_copy(&["--nbd-targets", &target_flag, "--source", &source_flag]);
    assert!(!ok && err.contains("set nbd_tls"), "{err}");
    let certs = pki.dir("client");
    let (ok, _, err) =
        node_copy(&["--nbd-targets", &target_flag, "--source", &source_flag, "--nbd-tls", certs.to_str().unwrap()]);
    assert!(ok, "{err}");
    tls_target.stop();
    assert_same(&src, &raw_target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_sends_about_the_changed_blocks_into_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("src.raw");
    make_source(&src, 64, 3);
    let full = dir.path().join("full.qcow2");
    new_qcow2(&full, 64 * MIB);
    let hub = HubExport::start(&full, "vm-disk0").await;
    let state_flag = state.to_str().unwrap();
    let source_flag = format!("2000={}", src.display());
    let (ok, _, err) =
        node_copy(&["--nbd-targets", &hub.target(2000), "--source", &source_flag, "--state-dir", state_flag]);
    assert!(ok, "{err}");
    hub.close().await;

    // Three 4 KiB writes in three different 256 KiB blocks (one into a hole), and a data
    // block overwritten with zeroes.
    change_blocks(&src, &[5 * MIB, 33 * MIB + 8192, 61 * MIB], 99);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&vec![0u8; 64 << 10], 16 * MIB).unwrap();
    }
    let incr = dir.path().join("incr.qcow2");
    new_overlay(&incr, &full);
    let hub = HubExport::start(&incr, "vm-disk0").await;
    let (ok, view, err) = node_copy(&[
        "--nbd-targets",
        &hub.target(2000),
        "--source",
        &source_flag,
        "--state-dir",
        state_flag,
        "--mode",
        "incremental",
    ]);
    assert!(ok, "{err}");
    hub.close().await;
    assert_eq!(view["disks"][0]["mode"], "incremental", "{view}");
    assert_eq!(view["disks"][0]["change_source"], "hashes");
    assert_eq!(field(&view, 0, "bytes_sent"), 3 * (64 << 10), "three changed blocks travel: {view}");
    assert_same(&src, &incr);
    assert_clean(&incr);
    assert!(top_layer_data(&incr) <= 3 * (64 << 10), "the overlay holds only the changes");
    let chain = qemu_img(&["info", "--backing-chain", incr.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&chain.stdout).contains("full.qcow2"));

    // No state: the incremental becomes a full copy and says why.
    let other = dir.path().join("other.qcow2");
    new_overlay(&other, &full);
    let hub = HubExport::start(&other, "vm-disk0").await;
    let (ok, view, err) =
        node_copy(&["--nbd-targets", &hub.target(2000), "--source", &source_flag, "--mode", "incremental"]);
    assert!(ok, "{err}");
    hub.close().await;
    assert_eq!(view["disks"][0]["mode"], "full");
    assert!(view["disks"][0]["mode_reason"].as_str().unwrap().contains("no committed"), "{view}");
    assert_same(&src, &other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_from_a_qemu_dirty_bitmap_reads_only_dirty_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("seed.raw");
    let src = dir.path().join("vm.qcow2");
    make_qcow2_source(&raw, &src, 32, 11, &[]);
    let full = dir.path().join("full.qcow2");
    new_qcow2(&full, 32 * MIB);
    // The full copy's change-tracking state is the base the bitmap's clean blocks stand for.
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    {
        let source = QemuNbd::start(&src, "qcow2", "vm", &["-r"]);
        let hub = HubExport::start(&full, "vm-disk0").await;
        let (ok, _, err) = node_copy(&[
            "--nbd-targets",
            &hub.target(2000),
            "--source",
            &format!("2000={}", source.url()),
            "--state-dir",
            state,
        ]);
        assert!(ok, "{err}");
        hub.close().await;
    }
    // The hypervisor starts a bitmap at the backup, then the guest writes.
    qemu_img(&["bitmap", "--add", src.to_str().unwrap(), "since-full"]);
    run(std::process::Command::new(require("qemu-io")).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -P 0xcd 20M 4k",
        src.to_str().unwrap(),
    ]));
    let source = QemuNbd::start(&src, "qcow2", "vm", &["-r", "-B", "since-full"]);
    let incr = dir.path().join("incr.qcow2");
    new_overlay(&incr, &full);
    let hub = HubExport::start(&incr, "vm-disk0").await;
    let (ok, view, err) = node_copy(&[
        "--nbd-targets",
        &hub.target(2000),
        "--source",
        &format!("2000={}", source.url()),
        "--dirty-bitmap",
        "2000=since-full",
        "--mode",
        "incremental",
        "--state-dir",
        state,
    ]);
    assert!(ok, "{err}");
    hub.close().await;
    source.stop();
    assert_eq!(view["disks"][0]["change_source"], "bitmap", "{view}");
    assert!(field(&view, 0, "bytes_read") <= 2 * (64 << 10), "only dirty blocks are read: {view}");
    assert_eq!(field(&view, 0, "bytes_unchanged"), 32 * MIB - field(&view, 0, "bytes_read"));
    assert_same(&src, &incr);
    assert_clean(&incr);

    // A bitmap the source does not export is an error, never "nothing changed".
    let source = QemuNbd::start(&src, "qcow2", "vm", &["-r"]);
    let hub = HubExport::start(&incr, "vm-disk0").await;
    let (ok, _, err) = node_copy(&[
        "--nbd-targets",
        &hub.target(2000),
        "--source",
        &format!("2000={}", source.url()),
        "--dirty-bitmap",
        "2000=since-full",
        "--mode",
        "incremental",
    ]);
    hub.close().await;
    assert!(!ok && err.contains("dirty bitmap"), "{err}");
}

/// `sendense-node copy --source SOURCE` into `target` served by qemu-nbd as `format`.
fn copy_into_qemu_nbd(target: &std::path::Path, format: &str, source: &str) -> (bool, serde_json::Value, String) {
    let q = QemuNbd::start(target, format, "t", &[]);
    let out = node_copy(&["--nbd-targets", &format!("2000:{}", q.url()), "--source", source]);
    q.stop();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_given_as_qcow2_is_copied_as_its_disk_and_as_raw_as_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    // 4 KiB clusters: the image's runs do not line up with the mover's 64 KiB blocks.
    let image = dir.path().join("disk.qcow2");
    let data = make_qcow2_source(&raw, &image, 24, 21, &["-o", "cluster_size=4096"]);

    let target = dir.path().join("t.qcow2");
    new_qcow2(&target, 24 * MIB);
    let (ok, view, err) = copy_into_qemu_nbd(&target, "qcow2", &format!("2000=qcow2:{}", image.display()));
    assert!(ok, "{err}");
    assert_same(&raw, &target);
    assert_eq!(field(&view, 0, "bytes_sent"), data, "{view}");

    // Unstated, the same file is refused before anything is sent.
    let (ok, _, err) =
        node_copy(&["--nbd-targets", "2000:nbd://127.0.0.1:1/x", "--source", &format!("2000={}", image.display())]);
    assert!(!ok && err.contains("holds a qcow2 image") && err.contains("qcow2:"), "{err}");

    // Stated raw, its bytes are copied as they are (a raw disk whose guest wrote that header).
    let len = std::fs::metadata(&image).unwrap().len();
    let bytes = dir.path().join("bytes.raw");
    std::fs::File::create(&bytes).unwrap().set_len(len).unwrap();
    let (ok, _, err) = copy_into_qemu_nbd(&bytes, "raw", &format!("2000=raw:{}", image.display()));
    assert!(ok, "{err}");
    assert!(std::fs::read(&bytes).unwrap() == std::fs::read(&image).unwrap(), "the file's bytes, as they are");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_a_running_qemu_writes_is_refused_unless_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let image = dir.path().join("disk.qcow2");
    make_qcow2_source(&raw, &image, 8, 31, &[]);
    let copy = |source: String, extra: &'static [&'static str]| {
        let target = dir.path().join("t.qcow2");
        new_qcow2(&target, 8 * MIB);
        async move {
            let hub = HubExport::start(&target, "vm-disk0").await;
            let mut args = vec!["--nbd-targets".to_string(), hub.target(2000), "--source".into(), source];
            args.extend(extra.iter().map(|a| a.to_string()));
            let (ok, _, err) = node_copy(&args.iter().map(String::as_str).collect::<Vec<_>>());
            hub.close().await;
            (ok, err, target)
        }
    };
    for (file, format, source) in
        [(&image, "qcow2", format!("2000=qcow2:{}", image.display())), (&raw, "raw", format!("2000={}", raw.display()))]
    {
        // qemu with the disk open for writing, as a running VM has it.
        let live = QemuNbd::start(file, format, "live", &[]);
        let (ok, err, _) = copy(source.clone(), &[]).await;
        assert!(!ok && err.contains("open for writing by another process") && err.contains("force_share"), "{err}");
        let (ok, err, target) = copy(source.clone(), &["--force-share"]).await;
        assert!(ok, "{err}");
        live.stop();
        assert_same(file, &target); // qemu-img itself refuses while the writer is there
                                    // Read-only (as a snapshot's base is held), or not open at all: read as usual.
        let reader = QemuNbd::start(file, format, "reader", &["-r"]);
        let (ok, err, target) = copy(source.clone(), &[]).await;
        assert!(ok, "{err}");
        assert_same(file, &target);
        reader.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_of_a_qcow2_source_reads_only_what_its_persistent_bitmap_marks() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let image = dir.path().join("disk.qcow2");
    make_qcow2_source(&raw, &image, 48, 41, &[]);
    qemu_img(&["bitmap", "--add", image.to_str().unwrap(), "b0"]);
    let state = dir.path().join("state");
    let source = format!("2000=qcow2:{}", image.display());
    let copy = |target: &std::path::Path, extra: &[&str]| {
        let (target, extra) = (target.to_path_buf(), extra.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (state, source) = (state.clone(), source.clone());
        async move {
            let hub = HubExport::start(&target, "vm-disk0").await;
            let mut args = vec!["--nbd-targets".to_string(), hub.target(2000), "--source".into(), source];
            args.extend(["--state-dir".to_string(), state.display().to_string()]);
            args.extend(extra);
            let out = node_copy(&args.iter().map(String::as_str).collect::<Vec<_>>());
            hub.close().await;
            out
        }
    };
    let full = dir.path().join("full.qcow2");
    new_qcow2(&full, 48 * MIB);
    let (ok, _, err) = copy(&full, &[]).await;
    assert!(ok, "{err}");

    // The guest writes three 4 KiB pieces (one into a hole): qemu marks their 64 KiB granules.
    let io = require("qemu-io");
    for (at, seed) in [(5 * MIB, 1), (19 * MIB + 8192, 2), (47 * MIB, 3)] {
        run(std::process::Command::new(&io)
            .args(["-f", "qcow2", "-c", &format!("write -P {seed} {at} 4k")])
            .arg(&image));
    }
    let incr = dir.path().join("incr.qcow2");
    new_overlay(&incr, &full);
    let (ok, view, err) = copy(&incr, &["--mode", "incremental", "--dirty-bitmap", "2000=b0"]).await;
    assert!(ok, "{err}");
    assert_eq!(view["disks"][0]["change_source"], "bitmap", "{view}");
    assert_eq!(field(&view, 0, "bytes_read"), 3 * (64 << 10), "only the marked granules are read: {view}");
    assert_eq!(field(&view, 0, "bytes_sent"), 3 * (64 << 10), "{view}");
    assert_same(&image, &incr);

    // qemu holding the image open for writing leaves the bitmap in use: not trusted, every
    // block read and compared instead (nothing changed, nothing sent), and the job says why.
    let live = QemuNbd::start(&image, "qcow2", "live", &[]);
    let again = dir.path().join("again.qcow2");
    new_overlay(&again, &incr);
    let (ok, view, err) = copy(&again, &["--mode", "incremental", "--dirty-bitmap", "2000=b0", "--force-share"]).await;
    live.stop();
    assert!(ok, "{err}");
    assert_eq!(view["disks"][0]["change_source"], "hashes", "{view}");
    assert!(view["disks"][0]["mode_reason"].as_str().unwrap_or_default().contains("b0 of"), "{view}");
    assert!(view["disks"][0]["mode_reason"].as_str().unwrap_or_default().contains("is in use"), "{view}");
    assert_eq!(field(&view, 0, "bytes_sent"), 0, "{view}");
    assert_same(&image, &again);

    // A bitmap the image does not have: refused, naming the ones it has.
    new_overlay(&dir.path().join("none.qcow2"), &again);
    let (ok, _, err) =
        copy(&dir.path().join("none.qcow2"), &["--mode", "incremental", "--dirty-bitmap", "2000=nope"]).await;
    assert!(!ok && err.contains("has no bitmap named nope (it has: b0)"), "{err}");
}

#[test]
fn bad_targets_and_sources_are_one_clear_line() {
    for (targets, want) in [
        ("nbd://127.0.0.1:1/x", "no 'KEY:' prefix"),
        ("2000:nbd://127.0.0.1:0/x", "port 0"),
        ("2000:http://127.0.0.1:1/x", "nbd://"),
        ("2000:nbd://127.0.0.1:1/a,2000:nbd://127.0.0.1:2/b", "twice"),
        ("2001:nbd://127.0.0.1:1/x", "no disk with key 2001"),
    ] {
        let (ok, _, err) = node_copy(&["--nbd-targets", targets, "--source", "2000=/dev/null"]);
        assert!(!ok, "{targets} accepted");
        assert!(err.contains(want), "{targets}: {err}");
    }
}

/// Every block a resume map says holds what the source holds (the blocks a copy resumed from it
/// skips) holds it on the target. (A block whose write landed after the map was read keeps the
/// base's hash in it, which the source does not have: it is written again.)
fn assert_claims_hold(map: &node::blockmap::BlockMap, source: &[u8], target: &std::path::Path, when: &str) {
    let bytes = std::fs::read(target).unwrap();
    let bs = map.block_size as usize;
    for (b, h) in map.hashes.iter().enumerate() {
        let range = b * bs..((b + 1) * bs).min(source.len());
        if *h != node::blockmap::hash_block(&source[range.clone()]) {
            continue;
        }
        let block = bytes.get(range).unwrap_or_default();
        assert_eq!(node::blockmap::hash_block(block), *h, "{when}: block {b} is not what the map says");
    }
}

/// Every block a resume map says the run finished holds the source's block on the target, and
/// the map has its hash.
fn assert_finished_blocks_are_whole(
    map: &node::blockmap::ResumeMap,
    source: &[u8],
    target: &std::path::Path,
    when: &str,
) {
    let bytes = std::fs::read(target).unwrap();
    let bs = map.map.block_size as usize;
    for b in map.done.iter() {
        let range = b as usize * bs..((b as usize + 1) * bs).min(source.len());
        assert_eq!(map.map.hashes[b as usize], node::blockmap::hash_block(&source[range.clone()]), "{when}: block {b}");
        assert!(bytes.get(range.clone()) == source.get(range), "{when}: finished block {b} is not on the target");
    }
}

/// The node's checkpoints (`mover::Resumable`): maps saved while a copy runs (slowed to 8 MiB/s),
/// written from its live hashes, claim only what the target holds, also after the copy is stopped the way a kill stops it
/// (requests in flight left as they land), and the blocks they say the run finished are whole on
/// the target; a copy started again from the last map as a restore's next start does
/// (`Base::Resume`) reads only the blocks not finished, sends only what the map does not claim,
/// and the target equals the source, its map and checksum those of the whole disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_taken_while_a_copy_runs_claim_only_what_the_target_holds_and_resume_it() {
    use std::sync::Arc;

    use node::mover::{copy_disk, Base, Changes, CopyOptions, Ended, Tokens};
    use node::sink::{FileSink, Sink};
    use node::source::{Source, SourceSpec};

    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("disk.raw"), dir.path().join("restored.raw"));
    let mut data = pseudo_random(24 << 20, 11);
    data[8 << 20..12 << 20].fill(0); // zero blocks, written as zeroes
    std::fs::write(&src, &data).unwrap();
    let spec = SourceSpec::Path { path: src.clone(), format: Some(node::api::DiskFormat::Raw), dirty_bitmap: None };
    let options = CopyOptions {
        block_size: Some(64 << 10),
        request_size: MIB,
        throttle: Some(Arc::new(node::throttle::Throttle::new(8 * MIB))),
        ..CopyOptions::default()
    };
    let beside = dir.path().join(".restored.raw.restoring");

    let source = Arc::new(Source::open(&spec, 4, Default::default()).await.unwrap());
    let (sink, zeroed) = FileSink::create(&dest, source.size()).unwrap();
    let sink = Arc::new(Sink::File(sink));
    let base = if zeroed { Base::Zero } else { Base::Unknown };
    let tokens = Tokens::default();
    let (resumable, cancel) = (Arc::clone(&tokens.resumable), tokens.cancel.clone());
    let progress = Arc::new(node::mover::Progress::default());
    let copy = {
        let (source, sink, options, progress) =
            (Arc::clone(&source), Arc::clone(&sink), options.clone(), Arc::clone(&progress));
        tokio::spawn(async move {
            copy_disk(source, sink, base, Changes::ReadAll, &options, progress, Arc::default(), tokens).await
        })
    };
    let mut last = None;
    for round in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let at = dir.path().join(format!("checkpoint-{round}"));
        assert!(resumable.save(&at).await.unwrap(), "a running copy saves its map");
        let map = node::blockmap::ResumeMap::load(&at).expect("the saved map loads");
        assert_claims_hold(&map.map, &data, &beside, &format!("checkpoint {round}"));
        assert_finished_blocks_are_whole(&map, &data, &beside, &format!("checkpoint {round}"));
        last = Some(map);
    }
    cancel.cancel();
    assert!(copy.await.unwrap().is_err(), "stopped");
    let none = dir.path().join("checkpoint-after");
    assert!(!resumable.save(&none).await.unwrap(), "no copy runs: no map");
    assert!(!none.exists() && !dir.path().join(".checkpoint-after.tmp").exists(), "nothing left");
    let last = last.unwrap();
    assert_claims_hold(&last.map, &data, &beside, "after the stop");
    assert_finished_blocks_are_whole(&last, &data, &beside, "after the stop");
    let finished = last.done.len() * (64 << 10);
    assert!(finished >= 2 * MIB, "the maps counted the blocks finished before them: {finished}");
    let claimed_data = last
        .map
        .hashes
        .iter()
        .zip(data.chunks(64 << 10))
        .filter(|(h, block)| **h == node::blockmap::hash_block(block) && block.iter().any(|&x| x != 0))
        .count() as u64
        * (64 << 10);
    assert!(claimed_data >= 2 * MIB, "the maps counted what was written before them: {claimed_data}");
    sink.keep().await.unwrap();
    drop(sink);

    let sink = Arc::new(Sink::File(FileSink::resume(&dest, source.size()).unwrap()));
    let progress = Arc::new(node::mover::Progress::default());
    let options = CopyOptions { throttle: None, ..options };
    let ended = copy_disk(
        Arc::clone(&source),
        Arc::clone(&sink),
        Base::Resume(last),
        Changes::ReadAll,
        &options,
        Arc::clone(&progress),
        Arc::default(),
        Tokens::default(),
    )
    .await
    .unwrap();
    let Ended::Completed(outcome) = ended else { panic!("not completed") };
    sink.commit().await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == data, "the resumed copy made the target equal to the source");
    let whole: Vec<_> = data.chunks(64 << 10).map(node::blockmap::hash_block).collect();
    assert_eq!(outcome.map.hashes, whole, "the map carries the finished blocks' hashes over");
    assert!(outcome.checksum.is_some());
    let p = progress.snapshot();
    assert!(p.bytes_unchanged >= claimed_data, "what the map claimed was not sent again: {p:?}");
    assert!(p.bytes_sent + claimed_data <= 20 * MIB, "{p:?}");
    assert_eq!(p.bytes_resumed, finished, "{p:?}");
    assert!(p.bytes_read + finished <= 24 * MIB, "the finished blocks were not read again: {p:?}");
    assert_eq!(p.bytes_done, 24 * MIB, "{p:?}");
}

/// A restore paused twice (the node stopped twice) goes on each time from the blocks the runs
/// before finished: the second map holds every block the first did and more, the last run reads
/// only what neither finished, and the file ends equal to the source. A map of an earlier
/// version's node (no finished blocks) reads everything again and still ends right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_paused_twice_goes_on_from_the_blocks_finished_before() {
    use std::sync::Arc;

    use node::blockmap::{BlockSet, ResumeMap};
    use node::mover::{copy_disk, Base, Changes, CopyOptions, Ended, Progress, Tokens};
    use node::sink::{FileSink, Sink};
    use node::source::{Source, SourceSpec};

    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("disk.raw"), dir.path().join("restored.raw"));
    let mut data = pseudo_random(16 << 20, 5);
    data[4 << 20..6 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let spec = SourceSpec::Path { path: src.clone(), format: Some(node::api::DiskFormat::Raw), dirty_bitmap: None };
    let source = Arc::new(Source::open(&spec, 4, Default::default()).await.unwrap());
    let slow = CopyOptions {
        block_size: Some(64 << 10),
        request_size: MIB,
        throttle: Some(Arc::new(node::throttle::Throttle::new(8 * MIB))),
        ..CopyOptions::default()
    };
    // One run, paused (when `pause`) a moment after it has sent 2 MiB, which at 8 MiB/s is long
    // before its end: how it ended, and its counters.
    let run = |sink: Arc<Sink>, base: Base, options: CopyOptions, pause: bool| {
        let source = Arc::clone(&source);
        async move {
            let tokens = Tokens::default();
            let progress = Arc::new(Progress::default());
            if pause {
                let (pause, progress) = (tokens.pause.clone(), Arc::clone(&progress));
                tokio::spawn(async move {
                    while progress.snapshot().bytes_sent < 2 * MIB {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    pause.cancel();
                });
            }
            let ended = copy_disk(
                source,
                sink,
                base,
                Changes::ReadAll,
                &options,
                Arc::clone(&progress),
                Arc::default(),
                tokens,
            )
            .await
            .unwrap();
            (ended, progress.snapshot())
        }
    };
    let paused = |ended: Ended| match ended {
        Ended::Paused(map) => map,
        Ended::Completed(_) => panic!("completed before the pause"),
    };

    let (sink, zeroed) = FileSink::create(&dest, source.size()).unwrap();
    let sink = Arc::new(Sink::File(sink));
    let base = if zeroed { Base::Zero } else { Base::Unknown };
    let first = paused(run(Arc::clone(&sink), base, slow.clone(), true).await.0);
    sink.keep().await.unwrap();
    drop(sink);
    assert!(!first.done.is_empty() && first.done.len() < 256, "{} of 256 blocks finished", first.done.len());

    let sink = Arc::new(Sink::File(FileSink::resume(&dest, source.size()).unwrap()));
    let (ended, p) = run(Arc::clone(&sink), Base::Resume(first.clone()), slow.clone(), true).await;
    let second = paused(ended);
    sink.keep().await.unwrap();
    drop(sink);
    assert!(first.done.iter().all(|b| second.done.contains(b)), "the second map lost finished blocks");
    assert!(second.done.len() > first.done.len(), "the second run finished more");
    assert_eq!(p.bytes_resumed, first.done.len() * (64 << 10), "{p:?}");

    let sink = Arc::new(Sink::File(FileSink::resume(&dest, source.size()).unwrap()));
    let fast = CopyOptions { throttle: None, ..slow.clone() };
    let (ended, p) = run(Arc::clone(&sink), Base::Resume(second.clone()), fast.clone(), false).await;
    assert!(matches!(ended, Ended::Completed(_)));
    sink.commit().await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == data, "the target equals the source");
    let finished = second.done.len() * (64 << 10);
    assert!(p.bytes_read + finished <= 16 * MIB, "read again what was finished: {p:?}");
    assert_eq!((p.bytes_done, p.bytes_resumed), (16 * MIB, finished), "{p:?}");

    // The same stop, its map from a node of the version before (nothing finished): all read again.
    std::fs::remove_file(&dest).unwrap();
    let (sink, _) = FileSink::create(&dest, source.size()).unwrap();
    let sink = Arc::new(Sink::File(sink));
    let map = paused(run(Arc::clone(&sink), Base::Zero, slow, true).await.0);
    sink.keep().await.unwrap();
    drop(sink);
    let old = ResumeMap::from_bytes(&map.map.to_bytes()).unwrap();
    assert_eq!(old.done, BlockSet::default());
    let sink = Arc::new(Sink::File(FileSink::resume(&dest, source.size()).unwrap()));
    let (_, p) = run(Arc::clone(&sink), Base::Resume(old), fast, false).await;
    sink.commit().await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == data, "the target equals the source");
    assert_eq!((p.bytes_read, p.bytes_resumed), (16 * MIB, 0), "{p:?}");
}
