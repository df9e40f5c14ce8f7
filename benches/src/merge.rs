//! `merge`: the hub's retention merge (`qcow2::commit`, an incremental folded into the backup
//! below it) against `qemu-img commit`, the tool an operator would use on the same pair of images.
//!
//! The pair is made once by qemu: a full image of a random disk (`qemu-img convert`) and an
//! overlay on it in which a quarter of the disk was rewritten (`qemu-io`, one run) and 1% in 4 KiB
//! writes scattered over the rest. Each repetition copies the pair fresh, then commits one copy
//! with `qemu-img commit -d` (a waited-for child: its user+system time) and the other in this
//! process (this thread's CPU time), both from opening the images to their final flush; the
//! results must be equal for `qemu-img compare`. Throughput is of the overlay's own data.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use crate::floor::{children_cpu_seconds, thread_cpu_seconds};
use crate::peers::make_source;
use crate::report::Report;

/// Run `cmd`, which must succeed (its stderr in the error).
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The pair in `at`: `base.qcow2` (the disk) and `overlay.qcow2` on it; returns the overlay's
/// own data bytes.
fn make_pair(src: &Path, at: &Path, mib: u64) -> anyhow::Result<u64> {
    std::fs::create_dir_all(at)?;
    run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(src).arg(at.join("base.qcow2")))?;
    run(Command::new("qemu-img")
        .current_dir(at)
        .args("create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2".split(' ')))?;
    let quarter = mib / 4;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2", "-c", &format!("write -P 0x5a {}M {}M", quarter, quarter)]);
    // 1% of the disk in 4 KiB writes spread over the other three quarters.
    let scattered = (mib << 20) / 100 / 4096;
    let stride = ((mib - quarter) << 20) / scattered.max(1);
    for i in 0..scattered {
        let mut at = i * stride;
        if at >= quarter << 20 {
            at += quarter << 20;
        }
        let at = at.min((mib << 20) - 4096) / 4096 * 4096;
        io.args(["-c", &format!("write -P 0x{:02x} {at} 4k", (i % 251) as u8)]);
    }
    run(io.arg(at.join("overlay.qcow2")))?;
    let image = qcow2::Image::open(at.join("overlay.qcow2"))?;
    let own: u64 = image
        .map(0, image.size())?
        .iter()
        .filter(|e| e.depth == 0 && e.kind == qcow2::ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    Ok(own)
}

fn copy_pair(from: &Path, to: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    run(Command::new("cp").arg("-a").arg("--sparse=always").arg(from).arg(to))
}

pub fn merge_section(dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let section = "merge";
    let src = dir.join("src.raw");
    make_source(&src, mib)?;
    let template = dir.join("merge-pair");
    let _ = std::fs::remove_dir_all(&template);
    let own = make_pair(&src, &template, mib)?;
    let gb = own as f64 / 1e9;
    let (theirs, ours) = (dir.join("merge-qemu"), dir.join("merge-ours"));
    for rep in 0..reps {
        eprintln!("merge: rep {}/{reps}", rep + 1);
        copy_pair(&template, &theirs)?;
        copy_pair(&template, &ours)?;
        let _ = Command::new("sync").status();

        let cpu0 = children_cpu_seconds();
        let t = Instant::now();
        run(Command::new("qemu-img").args(["commit", "-q", "-d", "-f", "qcow2"]).arg(theirs.join("overlay.qcow2")))?;
        let (secs, cpu) = (t.elapsed().as_secs_f64(), children_cpu_seconds() - cpu0);
        report.add(section, "qemu-img commit", "MB/s", own as f64 / 1e6 / secs);
        report.add(section, "qemu-img commit", "CPU s/GB", cpu / gb);

        let cpu0 = thread_cpu_seconds();
        let t = Instant::now();
        let overlay = qcow2::Image::open(ours.join("overlay.qcow2"))?;
        let base = qcow2::Image::open_with(ours.join("base.qcow2"), &qcow2::ImageOptions::default().writable(true))?;
        qcow2::commit(&overlay, &base)?;
        base.close()?;
        drop((overlay, base));
        let (secs, cpu) = (t.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu0);
        report.add(section, "qcow2::commit", "MB/s", own as f64 / 1e6 / secs);
        report.add(section, "qcow2::commit", "CPU s/GB", cpu / gb);

        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(ours.join("base.qcow2"))
            .arg(theirs.join("base.qcow2")))
        .context("the two commits differ")?;
    }
    report.ratio(section, "qcow2::commit", "qemu-img commit", "MB/s");
    report.ratio(section, "qcow2::commit", "qemu-img commit", "CPU s/GB");
    report.note(format!(
        "merge: a {mib} MiB disk, its overlay holding {:.0} MiB of its own (a quarter in one run, 1% in scattered \
         4 KiB writes); qemu-img commit's CPU is the waited-for child's, ours this thread's; both from opening \
         the images to the final flush, results compared equal.",
        own as f64 / f64::from(1u32 << 20)
    ));
    for d in [&template, &theirs, &ours] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
