//! `qcow2::commit` against `qemu-img commit` on the same pair of images made by qemu: the
//! backing files must come out equal for `qemu-img compare`, read as the overlay did, and pass
//! `qemu-img check`; a commit done twice (an interrupted one redone) changes nothing more; the
//! wrong file or a read-only one is refused.

mod common;

use std::path::Path;

use common::{qemu_io, run, tool};
use qcow2::{commit, ErrorKind, Image, ImageOptions};

const MIB: u64 = 1 << 20;

fn compare(a: &Path, b: &Path) -> bool {
    tool("qemu-img").arg("compare").arg(a).arg(b).output().unwrap().status.success()
}

fn check_clean(image: &Path) {
    run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(image));
}

/// A base with data, and an overlay that rewrites some of it, adds some, zeroes some (over base
/// data and over nothing) and writes part of a cluster (copy-on-write in the overlay).
fn make_pair(dir: &Path) {
    let base = dir.join("base.qcow2");
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("16M"));
    qemu_io(&base, &["write -P 0xaa 0 1M", "write -P 0xbb 4M 1M", "write -P 0x11 10M 64k"]);
    run(tool("qemu-img").current_dir(dir).args("create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2".split(' ')));
    qemu_io(
        &dir.join("overlay.qcow2"),
        &[
            "write -P 0xcc 512k 256k",
            "write -P 0xdd 8M 1M",
            "write -z 4160k 128k",
            "write -z 12M 64k",
            "write -P 0xee 10485860 1000",
        ],
    );
}

fn open_pair(dir: &Path) -> (Image, Image) {
    let overlay = Image::open(dir.join("overlay.qcow2")).unwrap();
    let base = Image::open_with(dir.join("base.qcow2"), &ImageOptions::default().writable(true)).unwrap();
    (overlay, base)
}

#[test]
fn a_commit_leaves_the_backing_file_as_qemu_img_commit_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    std::fs::create_dir(&ours).unwrap();
    make_pair(&ours);
    run(std::process::Command::new("cp").arg("-a").arg(&ours).arg(&theirs));
    run(tool("qemu-img").args(["commit", "-q", "-d", "-f", "qcow2"]).arg(theirs.join("overlay.qcow2")));

    let (overlay, base) = open_pair(&ours);
    let report = commit(&overlay, &base).unwrap();
    base.close().unwrap();
    drop((overlay, base));
    // The overlay's own data: 256 KiB + 1 MiB + the one partly written 64 KiB cluster; its zero
    // clusters: 128 KiB over base data and 64 KiB over nothing.
    assert_eq!(report.data_bytes, 256 * 1024 + MIB + 64 * 1024);
    assert_eq!(report.zero_bytes, 192 * 1024);
    check_clean(&ours.join("base.qcow2"));
    assert!(compare(&ours.join("base.qcow2"), &theirs.join("base.qcow2")), "our commit differs from qemu-img's");
    assert!(compare(&ours.join("base.qcow2"), &ours.join("overlay.qcow2")), "the base does not read as its overlay");

    // Redone, as after an interruption: nothing changes.
    let (overlay, base) = open_pair(&ours);
    commit(&overlay, &base).unwrap();
    base.close().unwrap();
    drop((overlay, base));
    check_clean(&ours.join("base.qcow2"));
    assert!(compare(&ours.join("base.qcow2"), &theirs.join("base.qcow2")));
}

#[test]
fn a_commit_into_anything_but_the_overlays_own_writable_backing_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    make_pair(tmp.path());
    let copy = tmp.path().join("copy.qcow2");
    std::fs::copy(tmp.path().join("base.qcow2"), &copy).unwrap();
    let overlay = Image::open(tmp.path().join("overlay.qcow2")).unwrap();

    let other = Image::open_with(&copy, &ImageOptions::default().writable(true)).unwrap();
    let err = commit(&overlay, &other).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("is not the backing file"), "{err}");

    let read_only = Image::open(tmp.path().join("base.qcow2")).unwrap();
    assert_eq!(commit(&overlay, &read_only).unwrap_err().kind(), ErrorKind::NotPermitted);

    let base = Image::open(tmp.path().join("base.qcow2")).unwrap();
    let err = commit(&base, &other).unwrap_err();
    assert!(err.to_string().contains("has no backing file"), "{err}");
    drop(other);
    // Nothing was written: the copy still equals the base.
    assert!(compare(&copy, &tmp.path().join("base.qcow2")));
}
