//! Images made by qemu-img in every variant read bit-identical to `qemu-img convert -O raw`;
//! images we create pass `qemu-img check`; hostile images give typed errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2::{BackingFormat, CreateOptions, Error, ExtentKind, Image};

fn require(tool: &str) {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(ok.unwrap_or(false), "{tool} is required (install qemu-utils; scripts/test.sh does)");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 8 MiB of mixed content: random data, zero stretches, a repeating pattern that compresses.
fn source(dir: &Path) -> PathBuf {
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let mib = (i * 8) >> 20;
        let v = match mib % 4 {
            0 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
            1 => 0,
            2 => (i as u64 % 97) * 0x0101_0101_0101_0101,
            _ => {
                if i % 3 == 0 {
                    x
                } else {
                    0
                }
            }
        };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let p = dir.join("src.raw");
    std::fs::write(&p, &data).unwrap();
    p
}

fn expected_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("expected.raw");
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(img).arg(&out));
    std::fs::read(&out).unwrap()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    // Odd-sized reads across cluster and subcluster boundaries.
    let mut pos = 0usize;
    let mut step = 12_345usize;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        img.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = step * 7 % 300_001 + 511;
    }
    buf
}

fn assert_reads_like_qemu(img_path: &Path, dir: &Path) {
    let img = Image::open(img_path).unwrap_or_else(|e| panic!("open {}: {e}", img_path.display()));
    let want = expected_raw(img_path, dir);
    let got = read_all(&img);
    assert_eq!(got.len(), want.len());
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: first difference at {at:#x}", img_path.display());
    }
}

#[test]
fn qemu_made_images_in_every_variant_read_bit_identical() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let variants: &[(&str, &[&str])] = &[
        ("default", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("rc1", &["-o", "refcount_bits=1"]),
        ("rc64", &["-o", "refcount_bits=64"]),
        ("zlib", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("zlib-c4k", &["-c", "-o", "cluster_size=4096"]),
        ("extl2", &["-o", "extended_l2=on"]),
        ("extl2-c128k", &["-o", "extended_l2=on,cluster_size=128k"]),
    ];
    for (name, opts) in variants {
        let img = dir.path().join(format!("{name}.qcow2"));
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).args(*opts).arg(&src).arg(&img));
        assert_reads_like_qemu(&img, dir.path());
    }
}

#[test]
fn zero_clusters_subclusters_and_discards_written_by_qemu_io_read_correctly() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    for opts in ["cluster_size=65536", "extended_l2=on"] {
        let img = dir.path().join("z.qcow2");
        let _ = std::fs::remove_file(&img);
        run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-o", opts]).arg(&img).arg("16M"));
        run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 0 4M",
                "-c",
                "write -z 64k 128k",
                "-c",
                "write -z -u 1M 64k",
                "-c",
                "discard 2M 64k",
                "-c",
                "write -P 0x22 3000 5000",
                "-c",
                "write -P 0x33 9M 6k",
            ])
            .arg(&img));
        assert_reads_like_qemu(&img, dir.path());
        let image = Image::open(&img).unwrap();
        let map = image.map(0, image.size()).unwrap();
        let at = |off: u64| map.iter().find(|e| e.offset <= off && off < e.offset + e.length).unwrap().kind;
        assert_eq!(at(0), ExtentKind::Data);
        assert_eq!(at(64 << 10), ExtentKind::Zero);
        assert_eq!(at(12 << 20), ExtentKind::Unallocated);
    }
}

/// Reads take a run of clusters in one step (and one walk down the chain) while the clusters go
/// on the same way: the run must stop where the data is not next in the file (clusters written in
/// reverse order), where the kind changes (data, zero, unallocated over a backing file with its
/// own data), and where an L2 table ends (512-byte clusters: a table covers 32 KiB), and the
/// reads must still equal qemu's at every odd offset and length.
#[test]
fn runs_of_clusters_stop_where_the_file_order_the_kind_or_the_table_changes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for opts in ["cluster_size=512", "cluster_size=65536", "extended_l2=on,cluster_size=65536"] {
        let unit: u64 = if opts == "cluster_size=512" { 512 } else { 64 << 10 };
        let (base, img) = (d.join("base.qcow2"), d.join("top.qcow2"));
        let _ = (std::fs::remove_file(&base), std::fs::remove_file(&img));
        let size = format!("{}", unit * 256);
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts]).arg(&base).arg(&size));
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {}", unit * 256)]).arg(&base));
        let backed = format!("{opts},backing_file=base.qcow2,backing_fmt=qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &backed]).arg(&img).arg(&size));
        let mut writes: Vec<String> = Vec::new();
        // Clusters 7 down to 0: each lands in the file before the one written earlier.
        writes.extend((0..8u64).rev().map(|c| format!("write -P {} {} {unit}", c + 1, c * unit)));
        // 8 to 79 in order, across table ends with small clusters; then zeroes, a hole, data.
        writes.push(format!("write -P 0x21 {} {}", 8 * unit, 72 * unit));
        writes.push(format!("write -z {} {}", 80 * unit, 40 * unit));
        writes.push(format!("write -P 0x31 {} {}", 150 * unit, 30 * unit));
        writes.push(format!("write -z {} {}", 180 * unit, 10 * unit));
        // A hole up to a table's end (cluster 192 starts the fourth table of 512-byte clusters),
        // data right after it.
        writes.push(format!("write -P 0x41 {} {}", 192 * unit, 8 * unit));
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for w in &writes {
            io.args(["-c", w]);
        }
        run(io.arg(&img));
        assert_reads_like_qemu(&img, d);
        let image = Image::open(&img).unwrap();
        let mut whole = vec![0u8; image.size() as usize];
        image.read_at(&mut whole, 0).unwrap();
        assert!(whole == expected_raw(&img, d), "{opts}: one read of the whole disk");
        let map = image.map(0, image.size()).unwrap();
        let at =
            |off: u64| map.iter().find(|e| e.offset <= off && off < e.offset + e.length).map(|e| (e.kind, e.depth));
        assert_eq!(at(0), Some((ExtentKind::Data, 0)), "{opts}");
        assert_eq!(at(100 * unit), Some((ExtentKind::Zero, 0)), "{opts}");
        assert_eq!(at(130 * unit), Some((ExtentKind::Data, 1)), "{opts}: the backing file's data under the hole");
        assert_eq!(at(185 * unit), Some((ExtentKind::Zero, 0)), "{opts}");
        assert_eq!(at(191 * unit), Some((ExtentKind::Data, 1)), "{opts}");
        assert_eq!(at(192 * unit), Some((ExtentKind::Data, 0)), "{opts}");
        assert_eq!(at(200 * unit), Some((ExtentKind::Data, 1)), "{opts}");
    }
}

#[test]
fn backing_chains_of_qcow2_and_raw_read_through_every_layer() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&src).arg(d.join("base.qcow2")));
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"])
        .arg(d.join("mid.qcow2")));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x44 1M 100k", "-c", "write -z 5M 64k"])
        .arg(d.join("mid.qcow2")));
    // Top is larger than its backing: the tail reads as zeroes.
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2"])
        .arg(d.join("top.qcow2"))
        .arg("12M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x55 4100k 8k", "-c", "write -P 0x66 10M 4k"])
        .arg(d.join("top.qcow2")));
    // Opened from another working directory: relative names resolve against the image.
    assert_reads_like_qemu(&d.join("top.qcow2"), d);
    let top = Image::open(d.join("top.qcow2")).unwrap();
    let map = top.map(0, top.size()).unwrap();
    assert!(map.iter().any(|e| e.depth == 2 && e.kind == ExtentKind::Data), "base data seen at depth 2: {map:?}");
    assert!(map.iter().any(|e| e.depth == 1 && e.kind == ExtentKind::Zero), "mid zero cluster at depth 1: {map:?}");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-b", "src.raw", "-F", "raw"])
        .arg(d.join("onraw.qcow2")));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 7M 64k"]).arg(d.join("onraw.qcow2")));
    assert_reads_like_qemu(&d.join("onraw.qcow2"), d);
}

#[test]
fn images_we_create_pass_qemu_img_check_and_show_their_backing() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (bits, order, size) in [(16u32, 4u32, 1u64 << 30), (9, 0, 64 << 20), (21, 6, 3 << 40), (12, 3, 100 << 30)] {
        let p = d.join(format!("new-{bits}-{order}.qcow2"));
        Image::create(&p, &CreateOptions::new(size).cluster_bits(bits).refcount_order(order)).unwrap();
        run(Command::new("qemu-img").arg("check").arg(&p));
        let info: serde_json::Value =
            serde_json::from_str(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&p))).unwrap();
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["cluster-size"], 1u64 << bits);
        assert_eq!(info["format-specific"]["data"]["refcount-bits"], 1u64 << order);
        let img = Image::open(&p).unwrap();
        let mut buf = vec![1u8; 4096];
        img.read_at(&mut buf, size - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    Image::create(d.join("base.qcow2"), &CreateOptions::new(32 << 20)).unwrap();
    Image::create(d.join("overlay.qcow2"), &CreateOptions::overlay("base.qcow2", BackingFormat::Qcow2)).unwrap();
    run(Command::new("qemu-img").arg("check").arg(d.join("overlay.qcow2")));
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(d.join("overlay.qcow2"))))
    .unwrap();
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 32 << 20);
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
}

#[test]
fn hostile_images_give_typed_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fresh = |name: &str| {
        let p = d.join(name);
        Image::create(&p, &CreateOptions::new(1 << 30)).unwrap();
        p
    };
    let p = fresh("l1.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(Image::open(&p), Err(Error::InvalidHeader { field: "l1_table_offset", .. })),
        "{:?}",
        Image::open(&p)
    );
    let p = fresh("l1size.qcow2");
    patch(&p, 36, &0x0fff_ffffu32.to_be_bytes());
    assert!(matches!(Image::open(&p), Err(Error::InvalidHeader { field: "l1_size", .. })));
    let p = fresh("bits.qcow2");
    patch(&p, 20, &40u32.to_be_bytes());
    assert!(matches!(Image::open(&p), Err(Error::InvalidHeader { field: "cluster_bits", .. })));
    // An L1 entry pointing past the end of the file.
    let p = fresh("l2.qcow2");
    let l1 = Image::open(&p).unwrap().header().l1_table_offset;
    patch(&p, l1, &(0x8000_0000_0000_0000u64 | 1 << 40).to_be_bytes());
    assert!(matches!(Image::open(&p), Err(Error::InvalidEntry { table: "L1", .. })));
    // A refcount table offset whose end overflows u64: an error, never a wrapped check.
    let p = fresh("refcount.qcow2");
    patch(&p, 48, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    let writable = qcow2::ImageOptions::read_write();
    assert!(Image::open_with(&p, &writable).is_err(), "opened for writing");
    if let Ok(img) = Image::open(&p) {
        assert!(img.check().is_err(), "checked");
    }
    // Truncated file.
    let p = fresh("trunc.qcow2");
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(50).unwrap();
    assert!(Image::open(&p).is_err());
    // A backing file that is the image itself, and a two-image loop.
    Image::create(d.join("self.qcow2"), &CreateOptions::overlay("self-base.qcow2", BackingFormat::Qcow2)).err();
    Image::create(d.join("a-base.qcow2"), &CreateOptions::new(1 << 20)).unwrap();
    Image::create(d.join("a.qcow2"), &CreateOptions::overlay("a-base.qcow2", BackingFormat::Qcow2)).unwrap();
    Image::create(d.join("b.qcow2"), &CreateOptions::overlay("a.qcow2", BackingFormat::Qcow2)).unwrap();
    std::fs::rename(d.join("a-base.qcow2"), d.join("a-base.old")).unwrap();
    std::fs::copy(d.join("b.qcow2"), d.join("a-base.qcow2")).unwrap();
    // Now a -> a-base (a copy of b) -> a -> ...
    assert!(
        matches!(Image::open(d.join("a.qcow2")), Err(Error::BackingLoop { .. })),
        "{:?}",
        Image::open(d.join("a.qcow2"))
    );
}

/// The deepest chain allowed (255 backing files under an image, the chain of a full backup and
/// 255 incrementals), with data written in layers across it (some clusters partly, copied up from
/// the layers below): opened and read on a small stack (the chain is walked recursively) equal to
/// qemu's reading, its allocation map naming the layer of each piece; one image more is refused,
/// whether we would create it or qemu-img made it.
#[test]
fn the_deepest_chain_allowed_reads_like_qemu_on_a_small_stack_and_one_deeper_is_refused() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = |i: usize| format!("c{i}.qcow2");
    let writers = [0usize, 1, 17, 100, 254, 255];
    for i in 0..=qcow2::image::MAX_BACKING_DEPTH {
        let opts = match i {
            0 => CreateOptions::new(1 << 20),
            _ => CreateOptions::overlay(name(i - 1), BackingFormat::Qcow2),
        };
        Image::create(d.join(name(i)), &opts).unwrap();
        if writers.contains(&i) {
            let img = Image::open_with(d.join(name(i)), &qcow2::ImageOptions::read_write()).unwrap();
            // Layer 17 writes half of cluster 0, which layer 0 wrote whole: the rest is copied up.
            let (at, len) = if i == 17 { (0, 32 << 10) } else { ((i % 16) << 16, 64 << 10) };
            img.write_at(&vec![(i % 251) as u8 + 1; len], at as u64).unwrap();
            img.flush().unwrap();
        }
    }
    let top = d.join(name(qcow2::image::MAX_BACKING_DEPTH));
    let want = expected_raw(&top, d);
    let read = {
        let top = top.clone();
        std::thread::Builder::new().stack_size(256 << 10).spawn(move || {
            let img = Image::open(&top).unwrap();
            (read_all(&img), img.map(0, 1 << 20).unwrap())
        })
    };
    let (got, map) = read.unwrap().join().expect("read on a 256 KiB stack");
    assert!(got == want, "the deepest chain reads as qemu reads it");
    assert_eq!(&got[..32 << 10], &[18u8; 32 << 10][..], "layer 17's half cluster");
    assert_eq!(&got[32 << 10..64 << 10], &[1u8; 32 << 10][..], "layer 0's other half, copied up");
    let depth_at =
        |offset: u64| map.iter().find(|e| e.offset <= offset && offset < e.offset + e.length).map(|e| e.depth);
    let deepest = qcow2::image::MAX_BACKING_DEPTH;
    for (offset, layer) in [(0u64, 17usize), (1 << 16, 1), (4 << 16, 100), (14 << 16, 254), (15 << 16, 255)] {
        assert_eq!(depth_at(offset), Some((deepest - layer) as u32), "offset {offset:#x} from layer {layer}: {map:?}");
    }
    // One deeper: we refuse to create it (and leave no file), and refuse to open one qemu-img made.
    let too_deep = d.join(name(deepest + 1));
    assert!(matches!(
        Image::create(&too_deep, &CreateOptions::overlay(name(deepest), BackingFormat::Qcow2)),
        Err(Error::BackingChainTooDeep { .. })
    ));
    assert!(!too_deep.exists(), "a refused create leaves nothing behind");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", &name(deepest)])
        .arg(&too_deep)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(matches!(Image::open(&too_deep), Err(Error::BackingChainTooDeep { .. })));
}

#[test]
fn a_confined_open_refuses_a_chain_leaving_its_directory_and_a_format_it_would_have_to_guess() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = d.join("repo/vm");
    std::fs::create_dir_all(vm.join("b1")).unwrap();
    std::fs::create_dir_all(vm.join("b2")).unwrap();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    let outside = d.join("elsewhere/base.qcow2");
    Image::create(&outside, &CreateOptions::new(1 << 20)).unwrap();
    Image::create(vm.join("b1/disk.qcow2"), &CreateOptions::new(1 << 20)).unwrap();
    let confined = qcow2::ImageOptions::confined(&vm);

    // Inside, format recorded: fine.
    let good = vm.join("b2/good.qcow2");
    Image::create(&good, &CreateOptions::overlay("../b1/disk.qcow2", BackingFormat::Qcow2)).unwrap();
    Image::open_with(&good, &confined).unwrap();
    // An absolute path out of the directory, and a symlink inside it that leads out.
    let abs = vm.join("b2/abs.qcow2");
    Image::create(&abs, &CreateOptions::overlay(outside.display().to_string(), BackingFormat::Qcow2)).unwrap();
    Image::open(&abs).unwrap();
    let Err(err) = Image::open_with(&abs, &confined) else { panic!("left the directory") };
    assert!(err.to_string().contains("outside"), "{err}");
    std::os::unix::fs::symlink(&outside, vm.join("b1/link.qcow2")).unwrap();
    let linked = vm.join("b2/linked.qcow2");
    Image::create(&linked, &CreateOptions::overlay("../b1/link.qcow2", BackingFormat::Qcow2)).unwrap();
    assert!(Image::open_with(&linked, &confined).is_err(), "a symlink does not get out");
    // No backing format recorded (its extension renamed to one readers skip): guessed by
    // default, refused when guessing is off.
    let unrecorded = vm.join("b2/unrecorded.qcow2");
    Image::create(&unrecorded, &CreateOptions::overlay("../b1/disk.qcow2", BackingFormat::Qcow2)).unwrap();
    let mut bytes = std::fs::read(&unrecorded).unwrap();
    let at = bytes.windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&unrecorded, bytes).unwrap();
    Image::open(&unrecorded).unwrap();
    let Err(err) = Image::open_with(&unrecorded, &confined) else { panic!("guessed the backing format") };
    assert!(err.to_string().contains("no recorded format"), "{err}");
}
