//! `flatten`: the hub's rewrite of a backup that ends a chain longer than `max_chain` into an image
//! that stands alone (`qcow2::flatten`, uncompressed, as with the default `compress = "none"`)
//! against `qemu-img convert` of the chain's top, the tool an operator would use for it, and the
//! whole step the hub takes (the copy also checked and compared with the chain).
//!
//! The chain: the VM-like disk of the `compress` section (text, program files, random bytes, a
//! quarter never written) as an uncompressed qcow2 base, then 16 overlays, each with 16 writes of
//! 256 KiB of new bytes at scattered offsets (a day's change each). Each repetition rewrites the
//! top with qemu-img (a waited-for child: its user+system time) and in this process (this thread's
//! CPU time), from opening to the file flushed; the results must be equal for `qemu-img compare`.
//! Throughput is of the data the chain reads (what some layer holds).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use qcow2::{BackingFormat, CreateOptions, Image, ImageOptions};

use crate::compress::{make_disk, measured};
use crate::floor::{children_cpu_seconds, thread_cpu_seconds};
use crate::merge::run;
use crate::report::Report;

/// Overlays on the base.
const LAYERS: u64 = 16;
/// Writes per overlay, and their length.
const WRITES: u64 = 16;
const WRITE_LEN: u64 = 256 << 10;

/// The chain's top (module doc), made in `dir` over the raw disk `raw`.
fn make_chain(dir: &Path, raw: &Path) -> anyhow::Result<PathBuf> {
    let base = dir.join("f-0.qcow2");
    let _ = std::fs::remove_file(&base);
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&base))?;
    let size = std::fs::metadata(raw)?.len();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut top = base;
    for layer in 1..=LAYERS {
        let path = dir.join(format!("f-{layer}.qcow2"));
        let _ = std::fs::remove_file(&path);
        let below = top.file_name().and_then(|n| n.to_str()).context("image name")?.to_string();
        Image::create(&path, &CreateOptions::overlay(below, BackingFormat::Qcow2))?.close()?;
        let image = Image::open_with(&path, &ImageOptions::read_write())?;
        let mut data = vec![0u8; WRITE_LEN as usize];
        for _ in 0..WRITES {
            for c in data.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes()[..c.len()]);
            }
            let at = next() % (size / WRITE_LEN) * WRITE_LEN;
            image.write_at(&data, at)?;
        }
        image.close()?;
        top = path;
    }
    Ok(top)
}

pub fn flatten_section(dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let section = "flatten";
    let raw = dir.join("vm-like.raw");
    make_disk(&raw, mib)?;
    let top = make_chain(dir, &raw)?;
    let src = Image::open(&top)?;
    let data: u64 =
        src.map(0, src.size())?.iter().filter(|e| e.kind == qcow2::ExtentKind::Data).map(|e| e.length).sum();
    drop(src);
    let (theirs, ours, checked) = (dir.join("f-qemu.qcow2"), dir.join("f-ours.qcow2"), dir.join("f-checked.qcow2"));
    for rep in 0..reps {
        eprintln!("flatten: rep {}/{reps}", rep + 1);
        for p in [&theirs, &ours, &checked] {
            let _ = std::fs::remove_file(p);
        }
        let _ = Command::new("sync").status();

        measured(report, (section, "qemu-img convert"), data, children_cpu_seconds, || {
            run(Command::new("qemu-img").args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"]).arg(&top).arg(&theirs))?;
            run(Command::new("sync").arg(&theirs))
        })?;

        let src = measured(report, (section, "qcow2::flatten"), data, thread_cpu_seconds, || {
            let src = Image::open(&top)?;
            qcow2::flatten(&src, &ours, 0o600, false)?;
            Ok(src)
        })?;

        // The hub's step: flattened, then checked and compared with the chain.
        measured(report, (section, "flatten+check+compare"), data, thread_cpu_seconds, || {
            qcow2::flatten(&src, &checked, 0o600, false)?;
            let copy = Image::open(&checked)?;
            anyhow::ensure!(copy.check()?.is_clean(), "the flattened copy does not check");
            anyhow::ensure!(qcow2::compare_disks(&src, &copy)?.is_none(), "the flattened copy differs");
            Ok(())
        })?;

        run(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"]).arg(&ours).arg(&theirs))
            .context("the two flattened images differ")?;
    }
    for metric in ["MB/s", "CPU s/GB"] {
        report.ratio(section, "qcow2::flatten", "qemu-img convert", metric);
    }
    report.note(format!(
        "flatten: a {mib} MiB VM-like disk under {LAYERS} overlays of {WRITES} scattered {} KiB writes each \
         ({:.0} MiB of data through the chain) rewritten to stand alone, uncompressed; qemu-img's CPU is the \
         waited-for child's, ours this thread's; results compared equal.",
        WRITE_LEN >> 10,
        data as f64 / 1048576.0
    ));
    for p in [&theirs, &ours, &checked, &raw] {
        let _ = std::fs::remove_file(p);
    }
    for layer in 0..=LAYERS {
        let _ = std::fs::remove_file(dir.join(format!("f-{layer}.qcow2")));
    }
    Ok(())
}
