//! `Image::check` judged against `qemu-img check` on the same files: clean images, a leaked
//! cluster (exit 3 for qemu-img) and a refcount lower than its references (exit 2).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{qemu_io, run, tool};

use qcow2::{CreateOptions, Image, ImageOptions};

fn qemu_check(img: &Path) -> i32 {
    tool("qemu-img").arg("check").arg(img).output().unwrap().status.code().unwrap_or(-1)
}

/// A 64 MiB image made and written (2 MiB, then 64 KiB at 10 MiB) by qemu's tools.
fn qemu_made(path: &Path) -> std::path::PathBuf {
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg("64M"));
    qemu_io(path, &["write -P 7 0 2M", "write -P 9 10M 64k"]);
    path.to_path_buf()
}

/// Host offset of the first data cluster, from `qemu-img map`.
fn first_data_cluster(img: &Path) -> u64 {
    let out = tool("qemu-img").args(["map", "--output=json"]).arg(img).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().find(|e| e["data"] == true).and_then(|e| e["offset"].as_u64()).unwrap()
}

/// Overwrite the 16-bit refcount of host cluster `index` (first refcount block).
fn set_refcount(img: &Path, index: u64, value: u16) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, 48).unwrap();
    let table = u64::from_be_bytes(word);
    f.read_exact_at(&mut word, table).unwrap();
    let block = u64::from_be_bytes(word);
    f.write_all_at(&value.to_be_bytes(), block + 2 * index).unwrap();
}

#[test]
fn check_agrees_with_qemu_img_on_clean_leaking_and_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();

    // Ours, written through the crate.
    let ours = dir.path().join("ours.qcow2");
    Image::create(&ours, &CreateOptions::new(64 << 20)).unwrap();
    {
        let img = Image::open_with(&ours, &ImageOptions::read_write()).unwrap();
        img.write_at(&vec![0x5a; 3 << 20], 1 << 20).unwrap();
        img.write_zeroes(8 << 20, 1 << 20).unwrap();
        img.close().unwrap();
    }
    let report = Image::open(&ours).unwrap().check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(qemu_check(&ours), 0);

    // qemu's, written by qemu-io.
    let theirs = qemu_made(&dir.path().join("theirs.qcow2"));
    let report = Image::open(&theirs).unwrap().check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(qemu_check(&theirs), 0);

    // A leak: one more cluster at the end of the file, counted but referenced by nothing.
    let leak = dir.path().join("leak.qcow2");
    std::fs::copy(&theirs, &leak).unwrap();
    let len = std::fs::metadata(&leak).unwrap().len();
    let cluster = len.div_ceil(65536);
    std::fs::OpenOptions::new().write(true).open(&leak).unwrap().set_len((cluster + 1) * 65536).unwrap();
    set_refcount(&leak, cluster, 1);
    assert_eq!(qemu_check(&leak), 3, "qemu-img sees a leak");
    let report = Image::open(&leak).unwrap().check().unwrap();
    assert_eq!((report.leaks, report.corruptions), (1, 0), "{report:?}");
    assert!(report.problems[0].starts_with("Leaked cluster"), "{report:?}");

    // Corruption: a data cluster whose refcount says it is free.
    let corrupt = dir.path().join("corrupt.qcow2");
    std::fs::copy(&theirs, &corrupt).unwrap();
    set_refcount(&corrupt, first_data_cluster(&corrupt) / 65536, 0);
    assert_eq!(qemu_check(&corrupt), 2, "qemu-img sees corruption");
    let report = Image::open(&corrupt).unwrap().check().unwrap();
    assert_eq!((report.leaks, report.corruptions), (0, 1), "{report:?}");
    assert!(!report.is_clean());
}

/// `ImageOptions::reclaim_leaks`: a writable open of an image with a leaked cluster rebuilds its
/// refcounts (`qemu-img check` clean after, the disk unchanged for `qemu-img compare`); one with
/// a refcount below its references is refused for writing; a clean one is left as it is.
#[test]
fn a_writable_open_that_reclaims_leaks_leaves_the_image_clean_and_refuses_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = qemu_made(&dir.path().join("theirs.qcow2"));
    let reclaiming = ImageOptions::read_write().reclaim_leaks(true);

    let leak = dir.path().join("leak.qcow2");
    std::fs::copy(&theirs, &leak).unwrap();
    let cluster = std::fs::metadata(&leak).unwrap().len().div_ceil(65536);
    std::fs::OpenOptions::new().write(true).open(&leak).unwrap().set_len((cluster + 1) * 65536).unwrap();
    set_refcount(&leak, cluster, 1);
    assert_eq!(qemu_check(&leak), 3);
    let img = Image::open_with(&leak, &reclaiming).unwrap();
    img.write_at(&[0x42; 4096], 20 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    assert_eq!(qemu_check(&leak), 0, "the leak is reclaimed");
    assert!(Image::open(&leak).unwrap().check().unwrap().is_clean());
    let same = tool("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x42 20M 4k"]).arg(&theirs).output();
    assert!(same.unwrap().status.success());
    let compare = tool("qemu-img").arg("compare").arg(&theirs).arg(&leak).output().unwrap();
    assert!(compare.status.success(), "{}", String::from_utf8_lossy(&compare.stdout));

    let corrupt = dir.path().join("corrupt.qcow2");
    std::fs::copy(&theirs, &corrupt).unwrap();
    set_refcount(&corrupt, first_data_cluster(&corrupt) / 65536, 0);
    let err = Image::open_with(&corrupt, &reclaiming).unwrap_err();
    assert_eq!(err.kind(), qcow2::ErrorKind::NotPermitted, "{err}");
    assert_eq!(qemu_check(&corrupt), 2, "left as it was");

    let before = std::fs::read(&theirs).unwrap();
    Image::open_with(&theirs, &reclaiming).unwrap().close().unwrap();
    assert!(std::fs::read(&theirs).unwrap() == before, "a clean image is not rewritten");
}
