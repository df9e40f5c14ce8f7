//! `qcow2::compact` judged by qemu: the compressed copy of a full image and of an overlay (data
//! that compresses, data that does not, zeroes written as data, zero clusters, ranges left to
//! the backing file, a disk whose size is not a whole number of clusters) passes `qemu-img
//! check`, reads as the original for `qemu-img compare` and for `compare_layers`, is smaller, has
//! compressed clusters qemu sees as such, and takes writes (over compressed clusters) from both
//! qemu-io and our writer; `compare_layers` finds a one-byte difference. `qcow2::flatten` judged
//! the same way: the top of a chain of three (layers of different cluster sizes, zeroes over
//! data) copied into an image with no backing file, compressed or not, that qemu reads as the
//! chain; `compare_disks` finds a one-byte difference.

mod common;

use std::path::Path;

use common::{qemu_io, run, tool};
use qcow2::{compact, compare_disks, compare_layers, flatten, ExtentKind, Image, ImageOptions};

fn compare(a: &Path, b: &Path) -> bool {
    tool("qemu-img").arg("compare").arg(a).arg(b).output().unwrap().status.success()
}

fn check_clean(image: &Path) {
    run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(image));
}

/// A raw disk of 8 MiB and 1 KiB: text-like data, random data, zeroes as data, and a last
/// partial cluster with data; converted to qcow2 by qemu-img.
fn make_full(dir: &Path) -> std::path::PathBuf {
    let mut disk = vec![0u8; (8 << 20) + 1024];
    let text = b"Nov 30 17:45:19 hub sendense-hub[811]: backup vm1 disk 2000 completed, 4096 MiB\n";
    for (i, b) in disk.iter_mut().enumerate().take(3 << 20) {
        *b = text[i % text.len()];
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in disk.iter_mut().skip(3 << 20).take(2 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // 5-8 MiB stays zeroes (convert leaves them unallocated); the last, partial cluster has
    // data.
    for b in disk.iter_mut().skip((8 << 20) + 100).take(200) {
        *b = 0x77;
    }
    let raw = dir.join("full.raw");
    std::fs::write(&raw, &disk).unwrap();
    let img = dir.join("full.qcow2");
    run(tool("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&img));
    // Zeroes written as data (qemu-io writes them as a pattern), and a zero cluster.
    qemu_io(&img, &["write -P 0 5M 128k", "write -z 6M 64k"]);
    img
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn map_json(p: &Path) -> String {
    let out = tool("qemu-img").args(["map", "--output=json"]).arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_compacted_full_image_is_smaller_and_reads_as_the_original_for_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let src_path = make_full(tmp.path());
    let dst = tmp.path().join("full.compact");
    let src = Image::open(&src_path).unwrap();
    let report = compact(&src, &dst, 0o600).unwrap();
    eprintln!("{report:?}");
    assert!(report.compressed_clusters >= 48, "{report:?}");
    assert!(report.stored_clusters >= 30, "random data stays as it is: {report:?}");
    assert!(report.zero_clusters >= 3, "{report:?}");
    assert_eq!(report.bytes_after, file_len(&dst));
    assert!(report.bytes_after < report.bytes_before * 3 / 4, "{report:?}");
    check_clean(&dst);
    assert!(compare(&src_path, &dst), "qemu-img compare: the copy reads as the original");
    let info = tool("qemu-img").arg("info").arg(&dst).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("compression type: zstd"));
    assert!(map_json(&dst).contains("\"compressed\": true"), "{}", map_json(&dst));
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dst).unwrap().permissions()) & 0o777, 0o600);
    let copy = Image::open(&dst).unwrap();
    assert_eq!(compare_layers(&src, &copy).unwrap(), None);
    assert!(copy.check().unwrap().is_clean());

    // Writes over compressed clusters: qemu-io's into one copy, ours into another, the same.
    let ours = tmp.path().join("ours.qcow2");
    std::fs::copy(&dst, &ours).unwrap();
    qemu_io(&dst, &["write -P 0x5a 100k 8k", "write -P 0x6b 2M 1M"]);
    let w = Image::open_with(&ours, &ImageOptions::read_write()).unwrap();
    w.write_at(&[0x5a; 8192], 100 << 10).unwrap();
    w.write_at(&vec![0x6b; 1 << 20], 2 << 20).unwrap();
    w.close().unwrap();
    drop(w);
    check_clean(&ours);
    check_clean(&dst);
    assert!(compare(&dst, &ours));

    // Written into (as a merge writes): compacted again, the clusters written compressed anew,
    // the others copied as they are; still equal.
    let recompacted = tmp.path().join("ours.again");
    let third = compact(&Image::open(&ours).unwrap(), &recompacted, 0o600).unwrap();
    assert!(third.copied_clusters >= 30 && third.compressed_clusters >= 17, "{third:?}");
    check_clean(&recompacted);
    assert!(compare(&ours, &recompacted));

    // One byte changed: found.
    let w = Image::open_with(&ours, &ImageOptions::read_write()).unwrap();
    w.write_at(&[0x01], (1 << 20) + 7).unwrap();
    w.close().unwrap();
    drop(w);
    let changed = Image::open(&ours).unwrap();
    let diff = compare_layers(&Image::open(&dst).unwrap(), &changed).unwrap().unwrap();
    assert!(diff.contains("0x100007"), "{diff}");
}

#[test]
fn a_compacted_overlay_keeps_its_backing_file_and_only_its_own_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_full(dir);
    run(tool("qemu-img").current_dir(dir).args("create -q -f qcow2 -b full.qcow2 -F qcow2 top.qcow2".split(' ')));
    let top = dir.join("top.qcow2");
    // New data over the base's, a zero cluster over base data, and part of a cluster (the rest
    // copied from the base into the overlay).
    qemu_io(&top, &["write -P 0xcd 512k 192k", "write -z 3M 64k", "write -P 0xee 7340132 1000"]);
    let src = Image::open(&top).unwrap();
    let dst = dir.join("top.compact");
    let report = compact(&src, &dst, 0o600).unwrap();
    assert!(report.compressed_clusters >= 4, "{report:?}");
    check_clean(&dst);
    assert!(compare(&top, &dst));
    let info = String::from_utf8(tool("qemu-img").arg("info").arg(&dst).output().unwrap().stdout).unwrap();
    assert!(info.contains("backing file: full.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    let copy = Image::open(&dst).unwrap();
    assert_eq!(compare_layers(&src, &copy).unwrap(), None);
    // Only the overlay's own clusters: 3 data + 1 zero + 1 copied-on-write, no more.
    let own: u64 = copy.map(0, copy.size()).unwrap().iter().filter(|e| e.depth == 0).map(|e| e.length).sum();
    let theirs: u64 = src.map(0, src.size()).unwrap().iter().filter(|e| e.depth == 0).map(|e| e.length).sum();
    assert_eq!(own, theirs);

    // Compacting the compacted copy again copies its compressed clusters as they are.
    let again = dir.join("top.again");
    let second = compact(&copy, &again, 0o600).unwrap();
    assert_eq!((second.copied_clusters, second.compressed_clusters), (report.compressed_clusters, 0), "{second:?}");
    check_clean(&again);
    assert!(compare(&top, &again));
    assert_eq!(file_len(&again), file_len(&dst));
}

/// The kind of the extent of `image` (through its chain) that holds guest `offset`.
fn kind_at(image: &Image, offset: u64) -> ExtentKind {
    image.map(offset, 1).unwrap()[0].kind
}

#[test]
fn a_flattened_overlay_stands_alone_and_reads_as_its_chain_for_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_full(dir);
    // A middle layer of 4 KiB clusters (its ranges end inside the top's 64 KiB clusters): data
    // over the base's text, a zero range over it, data in the base's zero run.
    run(tool("qemu-img")
        .current_dir(dir)
        .args("create -q -f qcow2 -o cluster_size=4096 -b full.qcow2 -F qcow2 mid.qcow2".split(' ')));
    qemu_io(&dir.join("mid.qcow2"), &["write -P 0xab 1028k 8k", "write -z 3M 64k", "write -P 0x11 7340032 4k"]);
    run(tool("qemu-img").current_dir(dir).args("create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2".split(' ')));
    let top = dir.join("top.qcow2");
    // New data, a zero cluster over the base's random data, zeroes written as data over text.
    qemu_io(&top, &["write -P 0xcd 512k 192k", "write -z 4M 64k", "write -P 0 2M 64k"]);
    let src = Image::open(&top).unwrap();
    for compress in [false, true] {
        let dst = dir.join(format!("flat-{compress}.qcow2"));
        let report = flatten(&src, &dst, 0o600, compress).unwrap();
        eprintln!("{report:?}");
        assert_eq!(report.bytes_after, file_len(&dst));
        assert_eq!(report.compressed_clusters > 0, compress, "{report:?}");
        check_clean(&dst);
        assert!(compare(&top, &dst), "qemu-img compare: the copy reads as the chain");
        let info = String::from_utf8(tool("qemu-img").arg("info").arg(&dst).output().unwrap().stdout).unwrap();
        assert!(!info.contains("backing file"), "{info}");
        assert_eq!(info.contains("compression type: zstd"), compress, "{info}");
        let copy = Image::open(&dst).unwrap();
        assert_eq!(compare_disks(&src, &copy).unwrap(), None);
        assert!(copy.map(0, copy.size()).unwrap().iter().all(|e| e.depth == 0), "it stands alone");
        // What reads as zeroes is left unallocated; the middle layer's data in the base's zero
        // run, and the partial last cluster, are copied.
        for zero in [3 << 20, 4 << 20, 2 << 20, 6 << 20] {
            assert_eq!(kind_at(&copy, zero), ExtentKind::Unallocated, "at {zero:#x}");
        }
        for data in [1028 << 10, 7_340_032, (8 << 20) + 100, 512 << 10] {
            assert_eq!(kind_at(&copy, data), ExtentKind::Data, "at {data:#x}");
        }
    }
    // Uncompressed, the copy holds the chain's data and no more than whole clusters of it.
    let plain = dir.join("flat-false.qcow2");
    assert!(file_len(&plain) < (8 << 20) + (1 << 20), "{}", file_len(&plain));

    // One byte changed in the copy (by qemu-io, which takes the copy as its own): found.
    qemu_io(&plain, &["write -P 0x5a 6291459 1"]);
    check_clean(&plain);
    let diff = compare_disks(&src, &Image::open(&plain).unwrap()).unwrap().unwrap();
    assert!(diff.contains("0x600003"), "{diff}");
}
