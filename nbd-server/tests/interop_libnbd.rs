//! libnbd as the client (nbdinfo, nbdcopy, nbdsh/python3-libnbd) against sendense-nbd.

mod common;

use std::process::Command;

use common::*;

#[test]
fn nbdinfo_sees_structured_replies_allocation_block_sizes_and_multi_conn() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 16 << 20);
    let peer = start_sendense(&file, "disk0", &["--shared=4", "-D", "test disk"]);
    let out = run(Command::new("nbdinfo").args(["--json", &peer.url()]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["export-size"], 16 << 20);
    assert_eq!(e["description"], "test disk");
    assert_eq!(e["contexts"][0], "base:allocation");
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);

    // One connection allowed: no multi-conn; read-only shows.
    let ro = start_sendense(&file, "ro", &["-r"]);
    let out = run(Command::new("nbdinfo").args(["--json", &ro.url()]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["can_multi_conn"], false);
    assert_eq!(v["exports"][0]["is_read_only"], true);
    assert_eq!(v["exports"][0]["can_trim"], false);
}

#[test]
fn nbdcopy_round_trips_content_with_one_and_four_connections() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(24 << 20, 7);
    let src = write_file(dir.path(), "src.raw", &data);
    for conns in ["1", "4"] {
        let target = sparse_file(dir.path(), "dst.raw", data.len() as u64);
        let peer = start_sendense(&target, "dst", &["--shared=4"]);
        run(Command::new("nbdcopy")
            .args(["--flush", &format!("--connections={conns}"), "--threads=4"])
            .arg(&src)
            .arg(peer.url()));
        // And back out through the server.
        let back = dir.path().join("back.raw");
        run(Command::new("nbdcopy").args([&format!("--connections={conns}"), "--threads=4", &peer.url()]).arg(&back));
        assert!(peer.stop().success());
        assert_same_content(&src, &target);
        assert_same_content(&src, &back);
        std::fs::remove_file(&back).unwrap();
    }
}

#[test]
fn sparse_copies_stay_sparse_through_block_status() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB source with only 2 MiB of data.
    let src = sparse_file(dir.path(), "src.raw", 64 << 20);
    std::fs::write(dir.path().join("chunk"), pattern(2 << 20, 3)).unwrap();
    run(Command::new("dd")
        .arg(format!("if={}", dir.path().join("chunk").display()))
        .arg(format!("of={}", src.display()))
        .args(["bs=1M", "seek=10", "conv=notrunc", "status=none"]));
    let peer = start_sendense(&src, "sparse", &["--shared=4"]);
    let out = run(Command::new("nbdinfo").args(["--map", "--json", &peer.url()]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(0))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, 2 << 20, "block status reports exactly the written range as data: {map}");
    let dst = dir.path().join("dst.raw");
    run(Command::new("nbdcopy").args([&peer.url()]).arg(&dst));
    assert_same_content(&src, &dst);
    let allocated = std::fs::metadata(&dst).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(allocated <= 4 << 20, "copy allocated {allocated} bytes for 2 MiB of data");
}

#[test]
fn python_libnbd_exercises_every_command() {
    require("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 8 << 20);
    let peer = start_sendense(&file, "py", &["--shared=2"]);
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
h.pwrite(b"\xab" * 65536, 1 << 20)
h.pwrite(b"\xcd" * 4096, 2 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20) == b"\xab" * 65536
h.zero(32768, 1 << 20)
assert h.pread(65536, 1 << 20) == b"\0" * 32768 + b"\xab" * 32768
h.zero(4096, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 4 << 20)
h.cache(65536, 0)
h.flush()
# DF: one content chunk, even over a hole and data
df = []
def dfcb(buf, offset, status, err):
    df.append((offset, bytes(buf), status))
    return 0
h.pread_structured(8192, (1 << 20) + 28672, dfcb, nbd.CMD_FLAG_DF)
assert len(df) == 1 and df[0][2] == nbd.READ_DATA, df
assert df[0][1] == b"\0" * 4096 + b"\xab" * 4096, df
# sparse structured read: a hole chunk and a data chunk reassembled
chunks = []
def cb(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
h.pread_structured(2 << 20, 0, cb)
assert any(s == nbd.READ_HOLE for (_, _, s) in chunks), chunks
assert any(s == nbd.READ_DATA for (_, _, s) in chunks), chunks
extents = []
def ecb(metacontext, offset, entries, err):
    extents.extend(entries)
    return 0
h.block_status(8 << 20, 0, ecb)
assert sum(extents[0::2]) == 8 << 20, extents
assert extents[1] == 3, extents   # first MiB is a hole
# errors: past the end
for f in (lambda: h.pread(512, 8 << 20), lambda: h.pwrite(b"x" * 512, (8 << 20) - 1)):
    try:
        f(); raise SystemExit("no error past the end")
    except nbd.Error as e:
        assert e.errno in ("EINVAL", "ENOSPC"), (e.errno, e.string)
h.shutdown()
print("ok")
"#;
    let out = run(Command::new(debian_python()).arg("-c").arg(script).arg(peer.url()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn an_over_limit_client_gets_a_clear_error_instead_of_a_hang() {
    require("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 1 << 20);
    let peer = start_sendense(&file, "one", &[]);
    let script = r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD()
try:
    b.connect_uri(sys.argv[1])
    raise SystemExit("second connection was accepted")
except nbd.Error as e:
    print(e.string)
"#;
    let started = std::time::Instant::now();
    let out = run(Command::new(debian_python()).arg("-c").arg(script).arg(peer.url()));
    let msg = String::from_utf8_lossy(&out.stdout);
    // libnbd 1.14 names the refusal but not our message text (the Rust client test checks that).
    assert!(msg.contains("policy"), "message was: {msg}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refusal must not wait for a timeout");
}

#[test]
fn fast_zero_on_qcow2_is_honoured_and_fails_with_enotsup_when_it_cannot_be_fast() {
    require("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    run(Command::new(require("qemu-img")).args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("4M"));
    let port = free_port();
    let child = Command::new(sendense_nbd())
        .args(["-f", "qcow2", "-x", "z", "-p", &port.to_string(), "-t"])
        .arg(&image)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    wait_for_port(port, &mut child);
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.can_fast_zero()
h.pwrite(b"\x5a" * 131072, 0)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)          # zero clusters: fast, done
assert h.pread(65536, 0) == b"\0" * 65536
try:
    h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("a fast zero that must write zeroes succeeded")
except nbd.Error as e:
    assert e.errno == "ENOTSUP", (e.errno, e.string)
assert h.pread(65536, 65536) == b"\x5a" * 65536, "the refused request changed nothing"
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)         # without FAST it is done the slow way
assert h.pread(65536, 65536) == b"\0" * 65536
h.shutdown()
print("ok")
"#;
    let out = run(Command::new(debian_python()).arg("-c").arg(script).arg(format!("nbd://127.0.0.1:{port}/z")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let _ = child.kill();
    let _ = child.wait();
    let check = run(Command::new(require("qemu-img")).arg("check").arg(&image));
    assert!(check.status.success());
}

#[test]
fn cache_aio_and_discard_modes_are_honoured_or_refused_never_ignored() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "d.raw", 4 << 20);
    // Not implemented: refused with a line that says so, before anything is served.
    for (format, flag) in [
        ("raw", "--cache=directsync"),
        ("raw", "--cache=writethrough"),
        ("raw", "--aio=native"),
        ("qcow2", "--aio=native"),
        ("raw", "--cache=bogus"),
        ("qcow2", "--cache=writethrough"),
    ] {
        let out = Command::new(sendense_nbd()).args(["-f", format, "-x", "e", flag]).arg(&file).output().unwrap();
        assert!(!out.status.success(), "{flag} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let refused = ["not implemented", "invalid value"];
        assert!(refused.iter().any(|r| err.contains(r)), "{flag}: {err}");
    }
    // discard=ignore: TRIM is not offered.
    let peer = start_sendense(&file, "noTrim", &["--discard=ignore"]);
    let out = run(Command::new("nbdinfo").args(["--json", &peer.url()]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["can_trim"], false, "{v}");
    // cache=unsafe serves (writes land, flush succeeds as a no-op).
    let peer = start_sendense(&file, "fast", &["--cache=unsafe", "--aio=threads"]);
    let src = write_file(dir.path(), "src.raw", &pattern(1 << 20, 5));
    run(Command::new("nbdcopy").args(["--flush"]).arg(&src).arg(peer.url()));
    drop(peer);
    assert_eq!(&std::fs::read(&file).unwrap()[..1 << 20], &std::fs::read(&src).unwrap()[..]);
}

#[test]
fn aio_io_uring_serves_raw_and_qcow2_images_through_a_ring_with_and_without_o_direct() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = write_file(dir.path(), "src.raw", &pattern(16 << 20, 21));
    let mut expected = std::fs::read(&src).unwrap();
    expected.resize(32 << 20, 0);
    // Unaligned writes (and one with FUA) among nbdcopy's: under --cache=none they take the
    // buffered descriptor through the same ring; into qcow2 they are partial clusters (over
    // zeroes, and over data nbdcopy wrote).
    let unaligned = [
        (1000u64, 3000usize, 0x5a_u8, ""),
        (20 << 20, 100, 0xa5, "-f "),
        ((20 << 20) + 70_000, 9000, 0x11, ""),
        ((8 << 20) + 65_536 + 512, 4096, 0x22, ""),
    ];
    for &(at, len, byte, _) in &unaligned {
        expected[at as usize..at as usize + len].fill(byte);
    }
    let want = write_file(dir.path(), "want.raw", &expected);
    for format in ["raw", "qcow2"] {
        for cache in ["--cache=writeback", "--cache=none"] {
            let image = dir.path().join(format!("u-{}.{format}", &cache[8..]));
            if format == "raw" {
                std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
            } else {
                run(Command::new(require("qemu-img")).args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("32M"));
            }
            let peer = start_sendense_as(&image, format, "u", &["--shared=4", "--aio=io_uring", cache]);
            // The server really holds a ring.
            let fds = std::fs::read_dir(format!("/proc/{}/fd", peer.child.id())).unwrap();
            let rings = fds
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().contains("io_uring"))
                .count();
            assert_eq!(rings, 1, "{format} {cache}: one io_uring per export");
            run(Command::new("nbdcopy").args(["--flush", "--connections=4"]).arg(&src).arg(peer.url()));
            for &(at, len, byte, fua) in &unaligned {
                let write = format!("write {fua}-P {byte} {at} {len}");
                run(Command::new(require("qemu-io")).args(["-f", "raw", "-c", &write, &peer.url()]));
            }
            let back = dir.path().join(format!("back-{}-{format}.raw", &cache[8..]));
            run(Command::new("nbdcopy").args(["--connections=4"]).arg(peer.url()).arg(&back));
            assert!(peer.stop().success(), "{format} {cache}: the server failed");
            if cache == "--cache=none" {
                // Before anything here reads the file. (qcow2 metadata, a few pages, is buffered.)
                let pages = resident_pages(&image);
                assert!(pages < 256, "--aio=io_uring --cache=none left {pages} pages in the page cache");
            }
            assert_same_bytes(&std::fs::read(&back).unwrap(), &expected, &format!("{format} {cache}: the read-back"));
            // Each fails the test unless it exits 0: equal, and (qcow2) consistent with no leaks.
            run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", format]).arg(&want).arg(&image));
            if format == "qcow2" {
                run(Command::new("qemu-img").arg("check").arg(&image));
            }
        }
    }
    // An overlay on that data: unaligned writes over backing data copy on write (the crate's
    // synchronous path, beside the ring), whole clusters go through the ring.
    let base = dir.path().join("u-writeback.qcow2");
    for cache in ["--cache=writeback", "--cache=none"] {
        let top = dir.path().join(format!("top-{}.qcow2", &cache[8..]));
        let qemu_img = require("qemu-img");
        run(Command::new(&qemu_img).args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&top));
        let peer = start_sendense_as(&top, "qcow2", "t", &["--aio=io_uring", cache]);
        let mut want = expected.clone();
        for (at, len, byte) in
            [(70_000u64, 5000usize, 0x31u8), (1 << 20, 256 << 10, 0x32), ((3 << 20) + 512, 512, 0x33)]
        {
            want[at as usize..at as usize + len].fill(byte);
            run(Command::new(require("qemu-io")).args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {at} {len}"),
                &peer.url(),
            ]));
        }
        let back = dir.path().join(format!("top-back-{}.raw", &cache[8..]));
        run(Command::new("nbdcopy").args(["--connections=4"]).arg(peer.url()).arg(&back));
        assert!(peer.stop().success(), "overlay {cache}: the server failed");
        assert_same_bytes(&std::fs::read(&back).unwrap(), &want, &format!("overlay {cache}: the read-back"));
        run(Command::new(&qemu_img).arg("check").arg(&top));
    }
}

/// Pages of `file` in the page cache, as `fincore` (util-linux) counts them.
fn resident_pages(file: &std::path::Path) -> u64 {
    let out = run(Command::new(require("fincore")).args(["--bytes", "--noheadings", "--output", "PAGES"]).arg(file));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn cache_none_copies_through_o_direct_and_leaves_the_image_out_of_the_page_cache() {
    // On the disk the build lives on: some filesystems (older tmpfs) refuse O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = write_file(dir.path(), "src.raw", &pattern(16 << 20, 9));
    let mut expected = std::fs::read(&src).unwrap();
    expected.resize(32 << 20, 0);
    // Unaligned writes take the buffered descriptor, beside and inside what O_DIRECT wrote.
    let unaligned = [(1000u64, 3000usize, 0x5a_u8), (20 << 20, 100, 0xa5), ((20 << 20) + 70_000, 9000, 0x11)];
    for &(at, len, byte) in &unaligned {
        expected[at as usize..at as usize + len].fill(byte);
    }
    for format in ["raw", "qcow2"] {
        let mut resident = Vec::new();
        for cache in ["--cache=none", "--cache=writeback"] {
            let what = format!("{format} {cache}");
            let image = dir.path().join(format!("{}.{format}", &cache[8..]));
            run(Command::new(require("qemu-img")).args(["create", "-q", "-f", format]).arg(&image).arg("32M"));
            let peer = start_sendense_as(&image, format, "d", &["--shared=4", cache]);
            run(Command::new("nbdcopy").args(["--flush", "--connections=4"]).arg(&src).arg(peer.url()));
            for &(at, len, byte) in &unaligned {
                let write = format!("write -P {byte} {at} {len}");
                run(Command::new(require("qemu-io")).args(["-f", "raw", "-c", &write, &peer.url()]));
            }
            // Read back through the server (O_DIRECT reads), before anything else touches it.
            let back = dir.path().join(format!("back-{}.{format}.raw", &cache[8..]));
            run(Command::new("nbdcopy").arg(peer.url()).arg(&back));
            assert!(peer.stop().success(), "{what}: the server failed");
            resident.push(resident_pages(&image));
            assert_same_bytes(&std::fs::read(&back).unwrap(), &expected, &format!("{what}: the read-back"));
            let raw_copy = dir.path().join("expected.raw");
            std::fs::write(&raw_copy, &expected).unwrap();
            let same = run(Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", format])
                .arg(&raw_copy)
                .arg(&image));
            assert!(same.status.success(), "{what}: the image differs from what was written");
            if format == "qcow2" {
                run(Command::new("qemu-img").args(["check", "-q"]).arg(&image));
            }
        }
        let (none, writeback) = (resident[0], resident[1]);
        // 16 MiB of data are 4096 pages: through O_DIRECT only the unaligned pieces and, for
        // qcow2, metadata stay (header, L1, refcount and L2 clusters: 16 pages each at most).
        assert!(none < 256, "{format} --cache=none left {none} pages in the page cache (writeback: {writeback})");
        assert!(
            writeback >= 2048,
            "{format}: the writeback copy should be cached ({writeback} pages); is fincore counting?"
        );
    }
}

#[test]
fn files_in_memory_are_sent_with_sendfile_and_read_back_equal_in_every_reply_shape() {
    let dir = memory_dir();
    let size = 16usize << 20;
    let file = sparse_file(dir.path(), "m.raw", size as u64);
    // Data with holes between: sparse reads answer with hole chunks and file data.
    let mut want = vec![0u8; size];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        for (at, len, seed) in [(0usize, 300_000usize, 1u64), (4 << 20, 1 << 20, 2), ((9 << 20) + 777, 70_000, 3)] {
            let data = pattern(len, seed);
            f.write_all_at(&data, at as u64).unwrap();
            want[at..at + len].copy_from_slice(&data);
        }
    }
    let raw = nbd_server::FileBackend::open(&file, true).unwrap();
    assert!(nbd_server::Backend::file_range(&raw, 0, size as u64).is_some(), "a raw file on tmpfs is sent from it");
    assert_sent_whole(dir.path(), &file, "raw", "raw", &want);
}

#[test]
fn a_read_only_qcow2_chain_in_memory_is_sent_from_its_files_and_reads_back_equal() {
    // A restore staged in memory: raw <- qcow2 <- qcow2 on tmpfs, with data in every layer,
    // clusters zeroed over backing data, unallocated ranges and unaligned writes.
    let dir = memory_dir();
    let size = 16u64 << 20;
    let base = sparse_file(dir.path(), "base.raw", size);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&pattern(6 << 20, 11), 1 << 20).unwrap();
    }
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    for (image, backing, format) in [(&mid, &base, "raw"), (&top, &mid, "qcow2")] {
        run(Command::new(require("qemu-img"))
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(backing)
            .arg(image));
    }
    for (image, command) in [
        (&mid, "write -P 0x5a 3M 2M"),
        (&mid, "write -P 0x33 12M 1M"),
        (&top, "write -P 0xc1 2M 1536K"),
        (&top, "write -z 4M 512K"),
        (&top, "write -P 0x77 12345 70000"),
        (&top, "write -P 0x9e 15M 1M"),
    ] {
        run(Command::new(require("qemu-io")).args(["-f", "qcow2", "-c", command]).arg(image));
    }
    let flat = dir.path().join("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&top).arg(&flat));
    let want = std::fs::read(&flat).unwrap();
    assert_eq!(want.len() as u64, size);

    // The backend places a read-only image's ranges in its files; a writable one is never sent
    // from them (a trim and a write could move a cluster under the reply).
    // (From cached metadata only: a first read brings in the L2 tables of every layer.)
    let ro = nbd_server::Qcow2Backend::open(&top, true).unwrap();
    let mut first = vec![0u8; 1 << 20];
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(nbd_server::Backend::read(&ro, 0, &mut first)).unwrap();
    assert!(first[..] == want[..1 << 20]);
    let extents = nbd_server::Backend::file_range(&ro, 0, size).expect("read-only chain on tmpfs");
    assert_eq!(extents.iter().map(nbd_server::FileExtent::length).sum::<u64>(), size);
    assert!(extents.iter().any(|e| matches!(e, nbd_server::FileExtent::Zero { .. })), "zeroes and holes");
    assert!(extents.iter().filter(|e| matches!(e, nbd_server::FileExtent::File { .. })).count() >= 3, "every layer");
    drop(ro);
    let rw = nbd_server::Qcow2Backend::open(&top, false).unwrap();
    assert!(nbd_server::Backend::file_range(&rw, 0, size).is_none(), "a writable image is read the usual way");
    drop(rw);

    assert_sent_whole(dir.path(), &top, "qcow2", "qcow2 chain", &want);
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&top));

    // A file cut short under its last data cluster: the part past the end reads as zeroes, the
    // same whether the reply is sent from the file or copied.
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(&top));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .max_by_key(|e| e["offset"].as_u64().unwrap())
        .unwrap()
        .clone();
    let (guest, host, len) =
        (last["start"].as_u64().unwrap(), last["offset"].as_u64().unwrap(), last["length"].as_u64().unwrap());
    assert_eq!(std::fs::metadata(&top).unwrap().len(), host + len, "the last data cluster ends the file");
    let cut = host + len - 40_000;
    std::fs::OpenOptions::new().write(true).open(&top).unwrap().set_len(cut).unwrap();
    let mut short = want.clone();
    short[(guest + len - 40_000) as usize..(guest + len) as usize].fill(0);
    assert_sent_whole(dir.path(), &top, "qcow2", "qcow2 cut short", &short);
}

/// A scratch directory on tmpfs, where reads go page cache -> socket with sendfile (CI machines
/// have a tmpfs /dev/shm; the 16 MiB files of these tests fit even a container's).
fn memory_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "/dev/shm (tmpfs) is required for this test");
    tempfile::tempdir_in(shm).unwrap()
}

/// Serve `image` read-only and read it whole with nbdcopy (structured replies, 1 and 4
/// connections) and python-libnbd (simple and structured replies, odd offsets and lengths):
/// every read must equal `want`.
fn assert_sent_whole(dir: &std::path::Path, image: &std::path::Path, format: &str, what: &str, want: &[u8]) {
    require("nbdsh");
    require("nbdcopy");
    let peer = start_sendense_as(image, format, "m", &["--shared=4", "-r"]);
    for conns in ["--connections=1", "--connections=4"] {
        let back = dir.join("back.raw");
        run(Command::new("nbdcopy").arg(conns).arg(peer.url()).arg(&back));
        assert_same_bytes(&std::fs::read(&back).unwrap(), want, &format!("{what} {conns}: the copy"));
        std::fs::remove_file(&back).unwrap();
    }
    let script = r#"
import nbd, sys, hashlib
for structured in (False, True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(sys.argv[1])
    assert h.get_structured_replies_negotiated() == structured
    whole = b"".join(h.pread(1 << 20, i << 20) for i in range(16))
    print(structured, hashlib.sha256(whole).hexdigest())
    for off, n in ((1, 4095), (299_999, 10), ((4 << 20) - 5, 10), ((9 << 20) + 700, 70_200), (12345, 3 << 20)):
        assert h.pread(n, off) == whole[off:off + n], (structured, off, n)
    h.shutdown()
"#;
    let out = run(Command::new(debian_python()).arg("-c").arg(script).arg(peer.url()));
    let digest = sha256_hex(want);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [format!("False {digest}"), format!("True {digest}")],
        "{format}: {text}"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    let out =
        Command::new("sha256sum").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn();
    let mut child = out.unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}
