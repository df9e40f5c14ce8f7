//! `verify`: what the hub's verification of a backup image holds in memory, and how fast it
//! reads (`hub::verify`, on the path of every backup: a job completes only verified). The image is
//! a full backup of a disk every block of which holds data, the case that reads the most and
//! holds the most; it is verified against the checksum a node would have sent, as after a
//! backup, once with the node's default block of 64 KiB and once with 4 KiB, the smallest its
//! checksums take, where every per-block structure is 16 times larger and its cost per block is
//! read off a small image. Each run is a fresh process (this binary again, told by
//! [`CHILD`]), so that no memory an earlier run freed and the allocator kept hides what this one
//! takes: its peak memory is its high-water mark (`VmHWM`) above its resident set just before
//! the verification; the report adds what that makes per block and for the node's largest map
//! (4 Mi blocks: its blocks grow with the disk from 256 GiB on). CPU is the whole child's (the
//! hashing threads'). The `incremental` case verifies a new backup on top of that image (an
//! overlay holding 1% of its blocks) as the hub verifies an incremental after a backup, from its
//! parent's block hashes: it reads only its own layer, and holds the disk's map once. No peer:
//! the old design verified nothing.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use qcow2::{CreateOptions, Image, ImageOptions};

use crate::peers::stat_seconds;
use crate::report::Report;

/// The environment variable that makes this binary one verification run:
/// `IMAGE\tCHECKSUM[\tnew]` (`new`: as a backup just made, on its parent's block hashes).
pub const CHILD: &str = "NBD_BENCH_VERIFY_RUN";

/// One verification run in this process (the child's side, [`CHILD`]): prints the peak bytes
/// above the resident set before, the seconds, and the CPU seconds.
pub fn run_child(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split('\t');
    let (Some(image), Some(expected)) = (parts.next(), parts.next()) else { anyhow::bail!("IMAGE\tCHECKSUM") };
    let new = parts.next() == Some("new");
    let (before, cpu0, t) = (status_bytes("VmRSS:")?, stat_seconds("/proc/self/stat", 11), Instant::now());
    let verdict = match new {
        true => hub::verify::verify_new_backup_disk(Path::new(image), 2000, Some(expected)),
        false => hub::verify::verify_disk(Path::new(image), 2000, Some(expected)),
    };
    let (secs, cpu) = (t.elapsed().as_secs_f64(), stat_seconds("/proc/self/stat", 11) - cpu0);
    anyhow::ensure!(verdict.ok(), "the image did not verify: {verdict:?}");
    println!("{} {secs} {cpu}", status_bytes("VmHWM:")?.saturating_sub(before));
    Ok(())
}

/// A fresh qcow2 image of `mib` MiB at `path`, every byte written (pseudo-random).
fn make_full_image(path: &Path, mib: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    Image::create(path, &CreateOptions::new(mib << 20))?.close()?;
    let image = Image::open_with(path, &ImageOptions::read_write())?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 4 << 20];
    for at in (0..mib << 20).step_by(chunk.len()) {
        for c in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        image.write_at(&chunk, at)?;
    }
    image.close()?;
    Ok(())
}

/// A `kB` line of `/proc/self/status`, in bytes.
pub fn status_bytes(key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in /proc/self/status"))?;
    let kib: u64 = line.split_whitespace().nth(1).context("a figure")?.parse()?;
    Ok(kib << 10)
}

/// This binary run again as a measuring child (`env` = `spec`, after a `sync`): the figures it
/// printed on stdout, `N` of them.
pub fn child_figures<const N: usize>(env: &str, spec: &str) -> anyhow::Result<[f64; N]> {
    let _ = std::process::Command::new("sync").status();
    let out = std::process::Command::new(std::env::current_exe()?).env(env, spec).output()?;
    anyhow::ensure!(out.status.success(), "the run failed: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<f64> = said.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    figures.try_into().map_err(|_| anyhow::anyhow!("the run said {said:?}"))
}

pub fn verify_section(dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let section = "verify";
    let image = dir.join("verify-full.qcow2");
    make_full_image(&image, mib)?;
    let bytes = mib << 20;
    for block in [64u64 << 10, 4 << 10] {
        // What a node would have sent, computed once: the reference every run must match.
        let expected = hub::verify::image_checksum(&Image::open(&image)?, block)?;
        let case = format!("{} KiB blocks", block >> 10);
        for rep in 0..reps {
            eprintln!("verify: {case}, rep {}/{reps}", rep + 1);
            let [peak, secs, cpu] = child_figures(CHILD, &format!("{}\t{expected}", image.display()))?;
            let peak = peak as u64;
            let per_block = peak as f64 / (bytes / block) as f64;
            report.add(section, &case, "MB/s", bytes as f64 / 1e6 / secs);
            report.add(section, &case, "CPU s/GB", cpu / (bytes as f64 / 1e9));
            report.add(section, &case, "peak MiB", peak as f64 / 1048576.0);
            report.add(section, &case, "peak B/block", per_block);
            report.add(section, &case, "MiB at 4Mi blocks", per_block * 4.0);
        }
    }
    incremental_case(dir, &image, mib, reps, report)?;
    report.note(format!(
        "verify: a {mib} MiB qcow2 image, every block data, verified against its node checksum with \
         64 KiB and 4 KiB blocks; peak = VmHWM above VmRSS before; `MiB at 4Mi blocks` = bytes per block \
         times the 4 Mi blocks of the node's largest map (read it off the 4 KiB case). `incremental`: an \
         overlay on it holding 1% of its 4 KiB blocks, verified as a new backup on the image's block hashes."
    ));
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(image.with_extension("blocks"));
    Ok(())
}

/// The `incremental` case (module doc): `base`'s block hashes kept as a full backup's are, an
/// overlay on it with every hundredth 4 KiB block written, verified `reps` times as a new backup.
fn incremental_case(dir: &Path, base: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let block = 4u64 << 10;
    let expected = hub::verify::image_checksum(&Image::open(base)?, block)?;
    anyhow::ensure!(hub::verify::verify_new_backup_disk(base, 2000, Some(&expected)).ok(), "the base does not verify");
    let top = dir.join("verify-incr.qcow2");
    let blocks = (mib << 20) / block;
    let case = "incremental, 4 KiB blocks";
    for rep in 0..reps {
        let _ = std::fs::remove_file(&top);
        let _ = std::fs::remove_file(top.with_extension("blocks"));
        let backing = base.file_name().context("a file name")?.to_string_lossy().into_owned();
        Image::create(&top, &CreateOptions::overlay(&backing, qcow2::BackingFormat::Qcow2))?.close()?;
        let image = Image::open_with(&top, &ImageOptions::read_write())?;
        for b in (0..blocks).step_by(100) {
            image.write_at(&[rep as u8 + 1; 4096], b * block)?;
        }
        image.close()?;
        let want = hub::verify::image_checksum(&Image::open(&top)?, block)?;
        eprintln!("verify: {case}, rep {}/{reps}", rep + 1);
        let [peak, secs, _cpu] = child_figures(CHILD, &format!("{}\t{want}\tnew", top.display()))?;
        anyhow::ensure!(top.with_extension("blocks").exists(), "the incremental kept no block hashes");
        let per_block = peak / blocks as f64;
        report.add("verify", case, "peak MiB", peak / 1048576.0);
        report.add("verify", case, "peak B/block", per_block);
        report.add("verify", case, "MiB at 4Mi blocks", per_block * 4.0);
        report.add("verify", case, "seconds", secs);
    }
    let _ = std::fs::remove_file(&top);
    let _ = std::fs::remove_file(top.with_extension("blocks"));
    Ok(())
}
