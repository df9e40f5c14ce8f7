//! The write path judged by qemu-img: after our writes, zeroes and discards (single and
//! concurrent, fresh images, overlays, every cluster and refcount variant), `qemu-img check`
//! finds no errors and no leaks, and `qemu-img compare` finds the image equal to a raw file that
//! received the same operations.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow2::{BackingFormat, CreateOptions, Image, ImageOptions};

fn require(tool: &str) {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(ok.unwrap_or(false), "{tool} is required (install qemu-utils; scripts/test.sh does)");
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn check_clean(img: &Path) {
    let (code, text) = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img));
    assert_eq!(code, 0, "qemu-img check {}: {text}", img.display());
}

fn compare(raw: &Path, img: &Path) {
    let (code, text) = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(raw).arg(img));
    assert_eq!(code, 0, "qemu-img compare: {text}");
}

fn writable(path: &Path) -> Image {
    Image::open_with(path, &ImageOptions::read_write()).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// A mix of aligned, unaligned, cluster-crossing writes, zeroes and discards.
fn ops(size: u64, count: usize, seed: u64, cluster: u64) -> Vec<Op> {
    let mut r = Rng(seed | 1);
    (0..count)
        .map(|i| {
            let len = match r.next() % 4 {
                0 => 4096,
                1 => 65536,
                2 => (r.next() % 200_000 + 1) as usize,
                _ => 300_000,
            };
            let off = r.next() % (size - len as u64);
            match r.next() % 10 {
                0 => Op::Zero(off, len as u64),
                1 => Op::Discard(off & !(cluster - 1), (2 * cluster).min(size - (off & !(cluster - 1)))),
                _ => Op::Write(off, len, (i % 250) as u8 + 1),
            }
        })
        .collect()
}

fn apply(img: &Image, raw: &std::fs::File, op: Op) {
    match op {
        Op::Write(off, len, v) => {
            let data = vec![v; len];
            img.write_at(&data, off).unwrap();
            raw.write_all_at(&data, off).unwrap();
        }
        Op::Zero(off, len) => {
            img.write_zeroes(off, len).unwrap();
            raw.write_all_at(&vec![0u8; len as usize], off).unwrap();
        }
        Op::Discard(off, len) => {
            // Discard is advisory; a raw mirror cannot know which parts were dropped, so the
            // test only discards whole clusters and mirrors them as zeroes.
            img.discard(off, len).unwrap();
            raw.write_all_at(&vec![0u8; len as usize], off).unwrap();
        }
    }
}

/// `base.raw` in `dir`: `size` bytes, each 4 KiB block numbered (never zero), for overlays.
fn numbered_base(dir: &Path, size: u64) {
    std::fs::write(dir.join("base.raw"), (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect::<Vec<u8>>()).unwrap();
}

fn raw_copy_of(img: &Path, dir: &Path, name: &str) -> (std::path::PathBuf, std::fs::File) {
    let raw = dir.join(name);
    let (code, text) = run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(img).arg(&raw));
    assert_eq!(code, 0, "{text}");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&raw).unwrap();
    (raw, f)
}

#[test]
fn writes_zeroes_and_discards_on_fresh_images_match_a_raw_file_and_pass_check() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    for (bits, order) in [(16u32, 4u32), (9, 4), (12, 0), (21, 6), (16, 3)] {
        let size = 64u64 << 20;
        let p = dir.path().join(format!("f{bits}-{order}.qcow2"));
        Image::create(&p, &CreateOptions::new(size).cluster_bits(bits).refcount_order(order)).unwrap();
        let raw_path = dir.path().join("mirror.raw");
        let raw = std::fs::File::create(&raw_path).unwrap();
        raw.set_len(size).unwrap();
        {
            let img = writable(&p);
            for op in ops(size, 300, u64::from(bits * 100 + order), 1 << bits) {
                apply(&img, &raw, op);
            }
            img.close().unwrap();
        }
        check_clean(&p);
        compare(&raw_path, &p);
    }
}

#[test]
fn qemu_made_images_of_every_variant_take_our_writes() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let variants: &[(&str, &[&str])] = &[
        ("default", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]), // 1-cluster refcount table: must grow
        ("rc1", &["-o", "refcount_bits=1"]),
        ("rc64", &["-o", "refcount_bits=64"]),
        ("extl2", &["-o", "extended_l2=on"]),
        ("compressed", &["-c"]),
    ];
    let size = 32u64 << 20;
    let seed_raw = d.join("seed.raw");
    let mut seed = vec![0u8; size as usize];
    let mut r = Rng(99);
    for chunk in seed.chunks_mut(1 << 20).step_by(2) {
        let v = (r.next() % 200) as u8 + 1;
        chunk.iter_mut().enumerate().for_each(|(i, b)| *b = v.wrapping_add((i % 13) as u8));
    }
    std::fs::write(&seed_raw, &seed).unwrap();
    for (name, opts) in variants {
        let p = d.join(format!("{name}.qcow2"));
        let (code, text) = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(*opts)
            .arg(&seed_raw)
            .arg(&p));
        assert_eq!(code, 0, "{text}");
        let (raw_path, raw) = raw_copy_of(&p, d, "mirror.raw");
        {
            let img = writable(&p);
            for op in ops(size, 200, name.len() as u64 * 7919, img.cluster_size()) {
                apply(&img, &raw, op);
            }
            img.close().unwrap();
        }
        check_clean(&p);
        compare(&raw_path, &p);
    }
}

#[test]
fn overlays_copy_on_write_from_qcow2_and_raw_backing_files() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 24u64 << 20;
    let base_raw = d.join("base.raw");
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    std::fs::write(&base_raw, &data).unwrap();
    let (code, text) = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&base_raw)
        .arg(d.join("base.qcow2")));
    assert_eq!(code, 0, "{text}");
    for (name, backing, format) in
        [("on-qcow2", "base.qcow2", BackingFormat::Qcow2), ("on-raw", "base.raw", BackingFormat::Raw)]
    {
        let p = d.join(format!("{name}.qcow2"));
        Image::create(&p, &CreateOptions::overlay(backing, format)).unwrap();
        let (raw_path, raw) = raw_copy_of(&p, d, "mirror.raw");
        {
            let img = writable(&p);
            for op in ops(size, 200, 4242, img.cluster_size()) {
                apply(&img, &raw, op);
            }
            img.close().unwrap();
        }
        check_clean(&p);
        compare(&raw_path, &p);
        let (_, info) = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&p));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], backing);
        // The backing file is untouched.
        assert_eq!(std::fs::read(&base_raw).unwrap(), data);
    }
}

#[test]
fn concurrent_writers_racing_for_the_same_clusters_keep_every_write() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16u64 << 20;
    Image::create(d.join("base.qcow2"), &CreateOptions::new(size)).unwrap();
    {
        let base = writable(&d.join("base.qcow2"));
        base.write_at(&vec![0xee; size as usize], 0).unwrap();
    }
    let p = d.join("race.qcow2");
    Image::create(&p, &CreateOptions::overlay("base.qcow2", BackingFormat::Qcow2)).unwrap();
    let img = Arc::new(writable(&p));
    // 8 threads; thread t writes 4 KiB block t of every 64 KiB cluster: all race for each
    // cluster's allocation, none may lose its block or the backing data around it.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                for c in 0..(size / 65536) {
                    img.write_at(&[t as u8 + 1; 4096], c * 65536 + t * 4096).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut expect = vec![0xeeu8; size as usize];
    for c in 0..(size / 65536) as usize {
        for t in 0..8usize {
            expect[c * 65536 + t * 4096..c * 65536 + (t + 1) * 4096].fill(t as u8 + 1);
        }
    }
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expect, "a racing write was lost");
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    let raw = d.join("expect.raw");
    std::fs::write(&raw, &expect).unwrap();
    compare(&raw, &p);
}

#[test]
fn a_4_tib_image_takes_scattered_writes_with_bounded_metadata_caches() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    let size = 4u64 << 40;
    Image::create(&p, &CreateOptions::new(size)).unwrap();
    {
        let img = Image::open_with(&p, &ImageOptions::read_write().l2_cache_bytes(1 << 20)).unwrap();
        let mut r = Rng(7);
        for i in 0..400u64 {
            let off = (r.next() % (size / 4096)) * 4096;
            img.write_at(&[(i % 200) as u8 + 1; 4096], off).unwrap();
            let mut back = [0u8; 4096];
            img.read_at(&mut back, off).unwrap();
            assert_eq!(back, [(i % 200) as u8 + 1; 4096]);
        }
        img.close().unwrap();
    }
    check_clean(&p);
}

#[test]
fn read_only_opens_refuse_writes_and_corrupt_images_refuse_write_opens() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ro.qcow2");
    Image::create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let ro = Image::open(&p).unwrap();
    assert!(matches!(ro.write_at(b"x", 0), Err(qcow2::Error::ReadOnly(_))));
    drop(ro);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all_at(&2u64.to_be_bytes(), 72).unwrap();
    assert!(matches!(Image::open_with(&p, &ImageOptions::read_write()), Err(qcow2::Error::ReadOnly(_))));
    assert!(Image::open(&p).is_ok(), "a corrupt-marked image still opens read-only");
}

#[test]
fn a_dirty_lazy_refcounts_image_left_by_a_crash_is_repaired_on_a_writable_open() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    let (code, text) =
        run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-o", "lazy_refcounts=on"]).arg(&p).arg("16M"));
    assert_eq!(code, 0, "{text}");
    // qemu-io's `abort` kills qemu mid-session: the dirty bit stays set, refcounts are stale.
    let _ = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x31 0 3M", "-c", "write -P 0x32 8M 1M", "-c", "abort"])
        .arg(&p));
    let header = std::fs::read(&p).unwrap();
    assert_eq!(header[79] & 1, 1, "qemu left the dirty bit set");
    {
        let img = writable(&p);
        let mut back = vec![0u8; 3 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x31));
        img.write_at(&[0x33; 65536], 12 << 20).unwrap();
        img.close().unwrap();
    }
    assert_eq!(std::fs::read(&p).unwrap()[79] & 1, 0, "dirty bit cleared");
    check_clean(&p);
    let mut expect = vec![0u8; 16 << 20];
    expect[..3 << 20].fill(0x31);
    expect[8 << 20..9 << 20].fill(0x32);
    expect[12 << 20..(12 << 20) + 65536].fill(0x33);
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, &expect).unwrap();
    compare(&raw, &p);
}

#[test]
fn a_size_that_is_not_whole_sectors_is_rounded_up_as_qemu_img_does() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let size = (5 << 20) + 123;
    let img = Image::create(&ours, &CreateOptions::new(size)).unwrap();
    assert_eq!(img.size(), (5 << 20) + 512);
    // The last byte of the tail is there for qemu too.
    img.write_at(&[0x7e], size - 1).unwrap();
    drop(img);
    check_clean(&ours);
    let theirs = dir.path().join("theirs.qcow2");
    let (code, text) =
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&theirs).arg(size.to_string()));
    assert_eq!(code, 0, "{text}");
    let virtual_size = |p: &Path| {
        // "virtual size: 5 MiB (5243392 bytes)", the first such line being the image's own.
        let (code, text) = run(Command::new("qemu-img").args(["info", "-f", "qcow2"]).arg(p));
        assert_eq!(code, 0, "{text}");
        let line = text.lines().find(|l| l.starts_with("virtual size:")).unwrap();
        line.split('(').nth(1).unwrap().split(' ').next().unwrap().parse::<u64>().unwrap()
    };
    assert_eq!(virtual_size(&ours), virtual_size(&theirs));
    let raw = dir.path().join("tail.raw");
    let (code, text) = run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&ours).arg(&raw));
    assert_eq!(code, 0, "{text}");
    let back = std::fs::read(&raw).unwrap();
    assert_eq!((back.len() as u64, back[size as usize - 1]), ((5 << 20) + 512, 0x7e));
}

#[test]
fn create_returns_the_image_open_for_writing() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.qcow2");
    let img = Image::create(&path, &CreateOptions::new(1 << 20)).unwrap();
    assert!(img.is_writable());
    // A new image counts as closed (create synced it); its first write reserves clusters, and
    // the drop must still give the unused ones back. They lie past the end of the file, where
    // `qemu-img check` does not look: lengthen the file so it would find them leaked.
    img.close().unwrap();
    img.write_at(&[5u8; 4096], 8192).unwrap();
    drop(img);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(file.metadata().unwrap().len() + (16 << 20)).unwrap();
    check_clean(&path);
    let again = Image::open(&path).unwrap();
    let mut back = vec![0u8; 4096];
    again.read_at(&mut back, 8192).unwrap();
    assert_eq!(back, vec![5u8; 4096]);
    // The file's permissions: qemu-img's 0644 by default (less the umask), or as asked.
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&path) & !0o044, 0o600, "qemu-img's 0644, less the umask");
    let private = dir.path().join("private.qcow2");
    Image::create(&private, &CreateOptions::new(1 << 20).mode(0o600)).unwrap();
    assert_eq!(mode(&private), 0o600);
}

#[test]
fn an_image_written_after_close_is_closed_again_when_dropped() {
    require("qemu-img");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("reopened.qcow2");
    Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
    // Direct writes grow the file ahead of them; only a close gives that space back, so the
    // file's length shows whether the drop closed the image.
    let img = Image::open_with(&path, &ImageOptions::read_write().direct_io(true)).unwrap();
    let first: Vec<u8> = (0..2u32 << 20).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    let second: Vec<u8> = first.iter().map(|b| b.wrapping_add(7)).collect();
    img.write_at(&first, 0).unwrap();
    img.close().unwrap();
    img.write_at(&second, 32 << 20).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() >= 8 << 20, "grown ahead again after the close");
    drop(img);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len < 6 << 20, "the drop gave the space grown ahead back ({len} bytes)");
    check_clean(&path);
    let raw = dir.path().join("reopened.raw");
    let mut want = first.clone();
    want.resize(32 << 20, 0);
    want.extend_from_slice(&second);
    want.resize(64 << 20, 0);
    std::fs::write(&raw, &want).unwrap();
    compare(&raw, &path);
}

#[test]
fn write_may_wait_names_the_writes_that_sync_or_wait_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 512-byte clusters: the first refcount reservation (16 Ki clusters) is 8 MiB.
    let img = Image::create(d.join("fresh.qcow2"), &CreateOptions::new(32 << 20).cluster_bits(9)).unwrap();
    assert!(img.write_may_wait(0, 65536), "nothing reserved yet: the first allocation syncs a reservation");
    assert!(!img.write_may_wait(32 << 20, 1), "out of range fails at once");
    let (mut waits, mut plain) = (Vec::new(), 0);
    for chunk in 0..(24u64 << 20) / 65536 {
        let at = chunk * 65536;
        if img.write_may_wait(at, 65536) {
            waits.push(at);
        } else {
            plain += 1;
        }
        img.write_at(&[7u8; 65536], at).unwrap();
    }
    assert_eq!(waits.first(), Some(&0));
    assert!(waits.len() >= 2, "a reservation ran out within 24 MiB of 512-byte clusters: {waits:?}");
    assert!(plain > waits.len() * 10, "most writes fit a reservation: {plain} plain, {waits:?}");
    assert!(!img.write_may_wait(4096, 100), "rewriting an owned cluster is a plain pwrite");
    img.close().unwrap();
    drop(img);
    assert!(!Image::open(d.join("fresh.qcow2")).unwrap().write_may_wait(0, 512), "read-only fails at once");

    // An overlay on data: a partial cluster must copy the old bytes and sync them first.
    let base = d.join("base.qcow2");
    let base_img = Image::create(&base, &CreateOptions::new(4 << 20)).unwrap();
    base_img.write_at(&vec![9u8; 4 << 20], 0).unwrap();
    base_img.close().unwrap();
    drop(base_img);
    let top = Image::create(d.join("top.qcow2"), &CreateOptions::overlay("base.qcow2", BackingFormat::Qcow2)).unwrap();
    top.write_at(&[1u8; 65536], 0).unwrap(); // takes the reservation
    assert!(top.write_may_wait(65536 + 512, 4096), "copy-on-write of backing data syncs");
    assert!(!top.write_may_wait(2 * 65536, 65536), "a whole cluster replaces the backing data without copying");
    assert!(!top.write_may_wait(100, 4096), "the cluster is this image's own now");
    top.close().unwrap();
}

#[test]
fn direct_io_images_take_the_same_mix_and_pass_check() {
    require("qemu-img");
    // On the disk the build lives on (some filesystems refuse O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let size = 24u64 << 20;
    numbered_base(d, size);
    let direct = ImageOptions::read_write().direct_io(true);
    for (name, opts) in [
        ("fresh-64k", CreateOptions::new(size)),
        ("fresh-4k", CreateOptions::new(size).cluster_bits(12)),
        ("fresh-512", CreateOptions::new(size).cluster_bits(9)),
        ("overlay", CreateOptions::overlay("base.raw", BackingFormat::Raw)),
    ] {
        let p = d.join(format!("{name}.qcow2"));
        Image::create(&p, &opts).unwrap();
        let (raw_path, raw) = raw_copy_of(&p, d, "mirror.raw");
        {
            let img = Image::open_with(&p, &direct).unwrap();
            assert!(img.is_direct());
            let cluster = img.cluster_size();
            for op in ops(size, 300, 77, cluster) {
                apply(&img, &raw, op);
            }
            // Reads through O_DIRECT (aligned) and the buffered descriptor (unaligned) agree.
            let mut via_image = vec![0u8; 1 << 20];
            img.read_at(&mut via_image, 4 << 20).unwrap();
            let mut via_mirror = vec![0u8; 1 << 20];
            raw.read_exact_at(&mut via_mirror, 4 << 20).unwrap();
            assert!(via_image == via_mirror, "{name}: aligned read differs");
            let mut odd = vec![0u8; 5000];
            img.read_at(&mut odd, (4 << 20) + 333).unwrap();
            assert!(odd[..] == via_mirror[333..5333], "{name}: unaligned read differs");
            img.close().unwrap();
        }
        check_clean(&p);
        compare(&raw_path, &p);
    }
}

#[test]
fn a_direct_read_of_a_cluster_the_file_ends_inside_gives_zeroes_past_the_end() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("short.qcow2");
    Image::create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let img = Image::open_with(&p, &ImageOptions::read_write().direct_io(true)).unwrap();
    // An unaligned write goes through the buffered descriptor and ends the file 100 bytes into
    // the new cluster; an aligned read of that cluster then goes through O_DIRECT, which stops
    // at the end of the file, off any alignment, and the rest is read buffered, as zeroes. (Had
    // another writer grown the file between the two, the direct read's unaligned continuation
    // failed with EINVAL: `concurrent_model.rs` caught it.)
    // (The first write allocates the L2 table too, after its data cluster; the second cluster
    // is then the last thing in the file.)
    img.write_at(&[7u8; 100], 0).unwrap();
    img.write_at(&[7u8; 100], 65536).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len() % 4096, 100, "the file ends inside the cluster");
    let mut got = vec![0xffu8; 8192];
    img.read_at(&mut got, 65536).unwrap();
    assert!(got[..100].iter().all(|&b| b == 7) && got[100..].iter().all(|&b| b == 0), "data, then zeroes");
    img.close().unwrap();
}

#[test]
fn direct_io_grows_the_file_ahead_and_gives_the_unused_space_back_on_close() {
    require("qemu-img");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let direct = ImageOptions::read_write().direct_io(true);
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096 % 249) as u8 + 1).collect();
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.blocks() * 512)
    };
    for closed in [true, false] {
        let p = dir.path().join(format!("seq-{closed}.qcow2"));
        Image::create(&p, &CreateOptions::new(64 << 20)).unwrap();
        let img = Image::open_with(&p, &direct).unwrap();
        // A fresh backup's pattern: 256 KiB writes one after another, each into new clusters
        // at the end of the file.
        for (i, chunk) in data.chunks(256 << 10).enumerate() {
            img.write_at(chunk, (i as u64) << 18).unwrap();
        }
        let (grown_len, _) = allocated(&p);
        assert!(grown_len >= 8 << 20, "the file was grown ahead of the writes ({grown_len} bytes)");
        if closed {
            img.close().unwrap();
            drop(img);
            let (len, blocks) = allocated(&p);
            assert!(len < 4 << 20 && blocks < 4 << 20, "space given back on close: {len} long, {blocks} allocated");
            check_clean(&p);
        } else {
            // A killed server: nothing is closed, the kernel keeps what was written.
            std::mem::forget(img);
            // qemu-img check: 0 consistent, 3 leaked clusters only, 2 corruption.
            let (code, text) = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&p));
            assert!(matches!(code, 0 | 3), "a crash may leak the space grown ahead, never corrupt: {text}");
        }
        let raw = dir.path().join(format!("seq-{closed}.raw"));
        let mut want = data.clone();
        want.resize(64 << 20, 0);
        std::fs::write(&raw, &want).unwrap();
        compare(&raw, &p);
    }
}

#[test]
fn cached_reads_fill_a_correct_prefix_and_never_wait_for_the_disk() {
    require("qemu-img");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let size = 8u64 << 20;
    // A chain: raw base <- qcow2 middle <- qcow2 top, with data in every layer, zero clusters
    // and unallocated ranges.
    std::fs::write(d.join("base.raw"), (0..size).map(|i| (i / 4096 % 13) as u8 + 1).collect::<Vec<u8>>()).unwrap();
    Image::create(d.join("mid.qcow2"), &CreateOptions::overlay("base.raw", BackingFormat::Raw)).unwrap();
    Image::create(d.join("top.qcow2"), &CreateOptions::overlay("mid.qcow2", BackingFormat::Qcow2)).unwrap();
    {
        let mid = writable(&d.join("mid.qcow2"));
        mid.write_at(&[0x22; 65536 * 3], 1 << 20).unwrap();
        mid.close().unwrap();
        let top = writable(&d.join("top.qcow2"));
        top.write_at(&[0x33; 65536 * 2], 3 << 20).unwrap();
        top.write_zeroes(5 << 20, 65536 * 4).unwrap();
        top.close().unwrap();
    }
    let cold = |name: &str| {
        let f = std::fs::File::open(d.join(name)).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::DontNeed).unwrap();
    };
    for name in ["base.raw", "mid.qcow2", "top.qcow2"] {
        cold(name);
    }
    let img = Image::open_with(d.join("top.qcow2"), &ImageOptions::default()).unwrap();
    let mut whole = vec![0u8; size as usize];
    let ranges = [(0u64, 1usize << 20), ((1 << 20) - 4096, 256 << 10), (3 << 20, 200_000), (5 << 20, 65536 * 4)];
    // Cold: every prefix handed back is right, and a data cluster of a cold layer stops it.
    let mut stopped = false;
    for &(at, len) in &ranges {
        let mut got = vec![0xEEu8; len];
        let n = img.read_cached(&mut got, at).unwrap();
        let mut want = vec![0u8; len];
        img.read_at(&mut want, at).unwrap();
        assert!(got[..n] == want[..n], "prefix of {n} bytes at {at}");
        stopped |= n < len;
    }
    assert!(stopped, "some read had to stop where the disk would be needed");
    // The zeroed range needs only the (now cached) L2 table: never the disk.
    let mut zeroes = vec![1u8; 65536 * 4];
    assert_eq!(img.read_cached(&mut zeroes, 5 << 20).unwrap(), zeroes.len());
    assert!(zeroes.iter().all(|&b| b == 0));
    // Warm: everything comes from memory, equal to the waiting read.
    img.read_at(&mut whole, 0).unwrap();
    for &(at, len) in &ranges {
        let mut got = vec![0u8; len];
        assert_eq!(img.read_cached(&mut got, at).unwrap(), len, "warm read at {at}");
        assert!(got[..] == whole[at as usize..at as usize + len]);
    }
    assert!(whole[(3 << 20) as usize] == 0x33 && whole[(1 << 20) as usize] == 0x22 && whole[0] == 1);
}

/// Write `data` at `off` the way an async caller does: plan, write the pieces itself, commit;
/// or through `write_at` when the write is not plannable. Returns whether it was planned.
fn planned_write(img: &Image, data: &[u8], off: u64) -> bool {
    let Some(plan) = img.plan_write(off, data.len() as u64).unwrap() else {
        img.write_at(data, off).unwrap();
        return false;
    };
    for piece in plan.pieces() {
        if piece.direct {
            plan.write_piece(piece, data).unwrap(); // aligned bounce where the memory is not
        } else {
            plan.file(piece).write_all_at(&data[piece.data.clone()], piece.host).unwrap();
        }
    }
    plan.commit().unwrap();
    true
}

#[test]
fn planned_writes_land_where_write_at_would_and_pass_check() {
    require("qemu-img");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let size = 24u64 << 20;
    numbered_base(d, size);
    for (name, opts, direct) in [
        ("fresh-64k", CreateOptions::new(size), false),
        ("fresh-512", CreateOptions::new(size).cluster_bits(9), false),
        ("direct-64k", CreateOptions::new(size), true),
        ("overlay", CreateOptions::overlay("base.raw", BackingFormat::Raw), false),
        ("overlay-direct", CreateOptions::overlay("base.raw", BackingFormat::Raw), true),
    ] {
        let p = d.join(format!("{name}.qcow2"));
        Image::create(&p, &opts).unwrap();
        let (raw_path, raw) = raw_copy_of(&p, d, "mirror.raw");
        let (mut planned, mut fallback) = (0, 0);
        {
            let img = Image::open_with(&p, &ImageOptions::read_write().direct_io(direct)).unwrap();
            for op in ops(size, 300, 91, img.cluster_size()) {
                match op {
                    Op::Write(off, len, v) => {
                        let data = vec![v; len];
                        if planned_write(&img, &data, off) {
                            planned += 1;
                        } else {
                            fallback += 1;
                        }
                        raw.write_all_at(&data, off).unwrap();
                    }
                    other => apply(&img, &raw, other),
                }
            }
            img.close().unwrap();
        }
        check_clean(&p);
        compare(&raw_path, &p);
        if name.starts_with("overlay") {
            // Most of the mix is unaligned: partial clusters over backing data copy on write.
            assert!(planned > 0 && fallback > 0, "{name}: {planned} planned, {fallback} copied on write");
        } else {
            assert!(planned > fallback, "{name}: most writes are plannable ({planned} planned, {fallback} not)");
        }
    }
}

#[test]
fn a_plan_claims_its_clusters_until_committed_and_a_dropped_plan_only_leaks() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plans.qcow2");
    let img = Image::create(&p, &CreateOptions::new(8 << 20)).unwrap();
    assert!(img.plan_write(0, 65536).unwrap().is_none(), "nothing reserved yet: the reservation syncs, unplanned");
    img.write_at(&[1u8; 4096], 0).unwrap();

    // Partial new cluster over zeroes, then the same cluster again while the first is in flight.
    let plan = img.plan_write(65536 + 512, 1024).unwrap().expect("a partial cluster over zeroes is plannable");
    let [piece] = plan.pieces() else { panic!("one piece: {plan:?}") };
    assert_eq!(piece.data, 0..1024);
    assert_eq!(piece.host % 65536, 512, "the write's offset within its fresh cluster");
    assert!(img.plan_write(65536, 4096).unwrap().is_none(), "a cluster in flight belongs to its allocator");
    plan.file(piece).write_all_at(&[2u8; 1024], piece.host).unwrap();
    let mut got = vec![9u8; 2048];
    img.read_at(&mut got, 65536).unwrap();
    assert!(got.iter().all(|&b| b == 0), "not visible before commit");
    plan.commit().unwrap();
    img.read_at(&mut got, 65536).unwrap();
    assert!(got[..512].iter().all(|&b| b == 0) && got[512..1536].iter().all(|&b| b == 2));
    assert!(got[1536..].iter().all(|&b| b == 0));

    // In place now: the piece goes to the cluster the image owns.
    let plan = img.plan_write(65536, 4096).unwrap().unwrap();
    let (qcow2::Mapping::Data { host, .. }, _) = img.mapping_at(65536).unwrap() else { panic!("mapped") };
    assert_eq!(plan.pieces()[0].host, host);
    drop(plan);

    // A plan abandoned after its data landed: nothing points at it, the next plan takes another
    // cluster, and qemu-img finds at most leaks.
    let plan = img.plan_write(3 << 16, 65536).unwrap().unwrap();
    let abandoned = plan.pieces()[0].host;
    plan.file(&plan.pieces()[0]).write_all_at(&[3u8; 65536], abandoned).unwrap();
    drop(plan);
    img.read_at(&mut got, 3 << 16).unwrap();
    assert!(got.iter().all(|&b| b == 0), "an uncommitted write is not visible");
    assert!(planned_write(&img, &[4u8; 65536], 3 << 16));
    let (qcow2::Mapping::Data { host, .. }, _) = img.mapping_at(3 << 16).unwrap() else { panic!("mapped") };
    assert_ne!(host, abandoned, "a cluster that may hold abandoned bytes is never handed out again");
    img.close().unwrap();
    drop(img);
    let (code, text) = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&p));
    assert!(matches!(code, 0 | 3), "an abandoned plan leaks, never corrupts: {text}");
    let (code, text) = run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 4 196608 65536"]).arg(&p));
    assert!(code == 0 && !text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn planned_reads_resolve_a_chain_to_the_bytes_read_at_returns() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let size = 8u64 << 20;
    // raw base (shorter than the image: past it reads zeroes) <- qcow2 middle <- qcow2 top.
    std::fs::write(d.join("base.raw"), (0..6u64 << 20).map(|i| (i / 4096 % 13) as u8 + 1).collect::<Vec<u8>>())
        .unwrap();
    Image::create(d.join("mid.qcow2"), &CreateOptions::overlay("base.raw", BackingFormat::Raw).size(Some(size)))
        .unwrap();
    Image::create(d.join("top.qcow2"), &CreateOptions::overlay("mid.qcow2", BackingFormat::Qcow2)).unwrap();
    {
        let mid = writable(&d.join("mid.qcow2"));
        mid.write_at(&[0x22; 65536 * 3], 1 << 20).unwrap();
        mid.close().unwrap();
        let top = writable(&d.join("top.qcow2"));
        top.write_at(&[0x33; 65536 * 2], 3 << 20).unwrap();
        top.write_at(&[0x44; 5000], (1 << 20) + 70_000).unwrap(); // copy-on-write over the middle
        top.write_zeroes(5 << 20, 65536 * 4).unwrap();
        top.close().unwrap();
    }
    for direct in [false, true] {
        let img = Image::open_with(d.join("top.qcow2"), &ImageOptions::default().direct_io(direct)).unwrap();
        let mut whole = vec![0u8; size as usize];
        // Before any L2 table is in memory, an allocated range is not plannable...
        assert!(img.plan_read(3 << 20, 65536).unwrap().is_none(), "metadata would be read from the disk");
        img.read_at(&mut whole, 0).unwrap();
        // ...after, every range is, and the pieces hold exactly what read_at returns.
        let mut r = Rng(5);
        let mut in_place = 0;
        for i in 0..200 {
            let at = if i < 4 { [0, 1 << 20, (6 << 20) - 4096, 5 << 20][i] } else { r.next() % (size - 1) };
            let len = ((r.next() % (600 << 10)) + 1).min(size - at) as usize;
            let pieces = img.plan_read(at, len as u64).unwrap().expect("plannable once the tables are cached");
            // Page-aligned, as a server's buffers are: direct pieces are read in place.
            let mut got = directio::AlignedBuf::new(len);
            got.fill(0xEE);
            let mut covered = 0;
            for piece in &pieces {
                assert_eq!(piece.data.start, covered, "pieces cover the buffer in order");
                covered = piece.data.end;
                match piece.source {
                    qcow2::ReadSource::Zero => got[piece.data.clone()].fill(0),
                    qcow2::ReadSource::File { file, host, direct } => {
                        let dst = &mut got[piece.data.clone()];
                        if direct && !directio::is_memory_aligned(dst) {
                            // What a caller does with memory O_DIRECT cannot take.
                            img.read_at(dst, at + piece.data.start as u64).unwrap();
                        } else {
                            file.read_exact_at(dst, host).unwrap();
                            in_place += usize::from(direct);
                        }
                    }
                }
            }
            assert_eq!(covered, len);
            assert!(got[..] == whole[at as usize..at as usize + len], "{direct}: {len} bytes at {at}");
        }
        assert_eq!(in_place > 0, direct, "aligned pieces of a direct image come from its O_DIRECT descriptor");
        let pieces = img.plan_read(0, size).unwrap().unwrap();
        assert!(pieces.len() < 16, "adjacent runs are merged: {}", pieces.len());
    }
}
