//! Persistent dirty bitmaps as qemu writes them: made by `qemu-img bitmap`, set by `qemu-io`
//! writes (qemu keeps enabled bitmaps up to date and stores them when it closes the image), read
//! back by `Image::bitmaps` and `Image::bitmap_runs`; a bitmap qemu holds open is `in_use`.

mod common;

use std::process::Stdio;

use common::{qemu_io, run, tool};
use qcow2::Image;

const MIB: u64 = 1 << 20;

/// The dirty byte ranges of `bitmap` over the whole disk.
fn dirty(img: &Image, bitmap: &qcow2::Bitmap) -> Vec<(u64, u64)> {
    let runs = img.bitmap_runs(bitmap, 0, img.size()).unwrap();
    assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), img.size(), "the runs cover the disk");
    let mut at = 0;
    let mut out = Vec::new();
    for (len, d) in runs {
        if d {
            out.push((at, len));
        }
        at += len;
    }
    out
}

#[test]
fn the_bits_qemu_sets_are_the_granules_its_writes_touched() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    // 512-byte clusters: one cluster of bitmap data covers 4096 granules, so 64 MiB at 4 KiB
    // granules spans four table entries, one of them never written (no data cluster).
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"]).arg(&img).arg("64M"));
    run(tool("qemu-img").args(["bitmap", "--add", "--granularity", "4096"]).arg(&img).arg("fine"));
    run(tool("qemu-img").args(["bitmap", "--add", "--granularity", "65536"]).arg(&img).arg("coarse"));
    run(tool("qemu-img").args(["bitmap", "--add", "--disable", "--granularity", "65536"]).arg(&img).arg("off"));
    qemu_io(&img, &["write -P 0x5a 5M 4k", "write -P 0x5b 40M 130k", "write -z 60M 4k", "write -P 1 0 512"]);

    let image = Image::open(&img).unwrap();
    let bitmaps = image.bitmaps().unwrap();
    let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["fine", "coarse", "off"]);
    assert!(bitmaps.iter().all(|b| b.consistent()), "{bitmaps:?}");
    assert_eq!(
        bitmaps.iter().map(|b| (b.granularity, b.auto)).collect::<Vec<_>>(),
        [(4096, true), (65536, true), (65536, false)]
    );

    let want_fine = vec![(0, 4096), (5 * MIB, 4096), (40 * MIB, 132 * 1024), (60 * MIB, 4096)];
    assert_eq!(dirty(&image, &bitmaps[0]), want_fine);
    let want_coarse = vec![(0, 65536), (5 * MIB, 65536), (40 * MIB, 192 * 1024), (60 * MIB, 65536)];
    assert_eq!(dirty(&image, &bitmaps[1]), want_coarse);
    assert_eq!(dirty(&image, &bitmaps[2]), vec![], "a disabled bitmap records nothing");

    // A window inside the disk: runs clipped to it, granules cut at its edges.
    let runs = image.bitmap_runs(&bitmaps[0], 40 * MIB + 1000, 10_000).unwrap();
    assert_eq!(runs, vec![(10_000, true)]);
    let runs = image.bitmap_runs(&bitmaps[1], 5 * MIB - 100, 200).unwrap();
    assert_eq!(runs, vec![(100, false), (100, true)]);
    assert_eq!(image.bitmap_runs(&bitmaps[1], 64 * MIB, 10).unwrap(), vec![], "past the end: nothing");
}

#[test]
fn a_bitmap_qemu_holds_open_for_writing_is_in_use_and_an_image_without_any_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("8M"));
    assert_eq!(Image::open(&img).unwrap().bitmaps().unwrap(), vec![]);
    run(tool("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b0"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut nbd = tool("qemu-nbd")
        .args(["-f", "qcow2", "-b", "127.0.0.1", "-p", &port.to_string(), "-t"])
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let in_use = Image::open(&img).unwrap().bitmaps().unwrap();
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(in_use[0].in_use && !in_use[0].consistent(), "{in_use:?}");
}
