//! `compress`: the hub's compression of a completed backup (`qcow2::compact`, what
//! `compress = "zstd"` runs on each image) against `qemu-img convert -c -o compression_type=zstd`,
//! the tool an operator would use to compress the same image, and the whole step the hub takes
//! (the copy also checked and compared with the original before it replaces it).
//!
//! The disk is made once to look like a VM's: a quarter log text, a quarter program files
//! (`/usr/bin`, `/usr/lib`), a quarter random bytes (media, encrypted or compressed files), a
//! quarter never written; qemu-img converts it to an uncompressed qcow2 image. Each repetition
//! compresses that image with qemu-img (a waited-for child: its user+system time; qemu
//! compresses on a pool of threads) and in this process (this thread's CPU time: one thread), from
//! opening to the file flushed; the two results must be equal for `qemu-img compare`.
//! Throughput is of the disk's data; size is the compressed file's.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use crate::floor::{children_cpu_seconds, thread_cpu_seconds};
use crate::merge::run;
use crate::report::Report;

/// Run `work`, timed, with `cpu` (a clock of CPU seconds: this thread's, or waited-for
/// children's) read before and after; add its throughput over `data` bytes and its CPU per GB to
/// `report` as `case` of `section`.
pub(crate) fn measured<T>(
    report: &mut Report,
    (section, case): (&str, &str),
    data: u64,
    cpu: fn() -> f64,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cpu0 = cpu();
    let t = Instant::now();
    let out = work()?;
    let (secs, spent) = (t.elapsed().as_secs_f64(), cpu() - cpu0);
    report.add(section, case, "MB/s", data as f64 / 1e6 / secs);
    report.add(section, case, "CPU s/GB", spent / (data as f64 / 1e9));
    Ok(out)
}

/// Program files from the system, concatenated, at least `len` bytes (repeated if need be).
fn program_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for dir in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if out.len() >= len {
                return out;
            }
            if e.file_type().is_ok_and(|t| t.is_file()) {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    out.extend_from_slice(&bytes);
                }
            }
        }
    }
    while !out.is_empty() && out.len() < len {
        out.extend_from_within(..out.len().min(len - out.len()));
    }
    out.resize(len, 0);
    out
}

/// The VM-like raw disk of `mib` MiB (module doc).
pub(crate) fn make_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let quarter = (mib << 20) / 4;
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let line = b"2026-11-30T18:01:07.311Z db1 postgres[2211]: LOG:  checkpoint complete: wrote 4711 buffers (3.6%); \
                 0 WAL file(s) added, 1 removed, 2 recycled; write=269.996 s\n";
    let mut text = Vec::with_capacity(quarter as usize);
    let mut n = 0u64;
    while (text.len() as u64) < quarter {
        text.extend_from_slice(format!("{n:08} ").as_bytes());
        text.extend_from_slice(line);
        n += 1;
    }
    text.truncate(quarter as usize);
    f.write_all_at(&text, 0)?;
    f.write_all_at(&program_bytes(quarter as usize), quarter)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = vec![0u8; quarter as usize];
    for c in random.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    f.write_all_at(&random, 2 * quarter)?;
    Ok(())
}

pub fn compress_section(dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let section = "compress";
    let raw = dir.join("vm-like.raw");
    make_disk(&raw, mib)?;
    let image = dir.join("vm-like.qcow2");
    let _ = std::fs::remove_file(&image);
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&image))?;
    let src = qcow2::Image::open(&image)?;
    let data: u64 = src
        .map(0, src.size())?
        .iter()
        .filter(|e| e.depth == 0 && e.kind == qcow2::ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    drop(src);
    let (theirs, ours, checked) = (dir.join("c-qemu.qcow2"), dir.join("c-ours.qcow2"), dir.join("c-checked.qcow2"));
    for rep in 0..reps {
        eprintln!("compress: rep {}/{reps}", rep + 1);
        for p in [&theirs, &ours, &checked] {
            let _ = std::fs::remove_file(p);
        }
        let _ = Command::new("sync").status();

        measured(report, (section, "qemu-img convert -c"), data, children_cpu_seconds, || {
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type=zstd"])
                .arg(&image)
                .arg(&theirs))?;
            run(Command::new("sync").arg(&theirs))
        })?;
        report.add(section, "qemu-img convert -c", "MiB stored", std::fs::metadata(&theirs)?.len() as f64 / 1048576.0);

        let src = measured(report, (section, "qcow2::compact"), data, thread_cpu_seconds, || {
            let src = qcow2::Image::open(&image)?;
            qcow2::compact(&src, &ours, 0o600)?;
            Ok(src)
        })?;
        report.add(section, "qcow2::compact", "MiB stored", std::fs::metadata(&ours)?.len() as f64 / 1048576.0);

        // The hub's step: compacted, then checked and compared with the original.
        measured(report, (section, "compact+check+compare"), data, thread_cpu_seconds, || {
            qcow2::compact(&src, &checked, 0o600)?;
            let copy = qcow2::Image::open(&checked)?;
            anyhow::ensure!(copy.check()?.is_clean(), "the compacted copy does not check");
            anyhow::ensure!(qcow2::compare_layers(&src, &copy)?.is_none(), "the compacted copy differs");
            Ok(())
        })?;

        run(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"]).arg(&ours).arg(&theirs))
            .context("the two compressed images differ")?;
    }
    for metric in ["MB/s", "CPU s/GB", "MiB stored"] {
        report.ratio(section, "qcow2::compact", "qemu-img convert -c", metric);
    }
    report.note(format!(
        "compress: a {mib} MiB VM-like disk ({:.0} MiB of data: text, program files, random bytes, a quarter \
         never written) in an uncompressed qcow2 image, compressed with zstd; qemu-img's CPU is the waited-for \
         child's (its threads), ours this thread's; results compared equal.",
        data as f64 / 1048576.0
    ));
    for p in [&theirs, &ours, &checked, &image, &raw] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
