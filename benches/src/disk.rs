//! `disk`: qcow2 backups where the disk is the limit, with the cache and aio modes a disk wants.
//!
//! On tmpfs (`qcow2` section) the engine is measured; on a real disk every buffered server ends
//! up waiting for the final flush of a gigabyte of dirty pages, so the same binary runs at the
//! disk's writeback speed whatever its engine. `--cache=none --aio=io_uring` keeps the device
//! busy with direct writes from the start instead, and skips the page-cache copy. This section
//! writes the same data into fresh qcow2 images on `--dir` (put it on the disk under test) with
//! sendense-nbd and qemu-nbd, each with its defaults and with `--cache=none --aio=io_uring`, 1
//! and 4 connections, and reads the image back cold (page cache dropped).

use std::path::Path;
use std::process::Command;

use crate::peers::{fresh_qcow2, make_source, settle, start, Kind};
use crate::report::Report;

pub fn disk_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    // The source lives in memory, so that only the target touches the disk.
    let src_dir = Path::new("/dev/shm/nbd-bench-disk-src");
    std::fs::create_dir_all(src_dir)?;
    let src = src_dir.join("src.raw");
    make_source(&src, mib)?;
    let size = mib << 20;
    let kinds = [Kind::SendenseUring, Kind::Sendense, Kind::QemuNbdUring, Kind::QemuNbd];
    for rep in 0..reps {
        eprintln!("disk: rep {}/{reps}", rep + 1);
        for conns in [1u32, 4] {
            for kind in kinds {
                let case = format!("{} c{conns}", kind.label());
                let target = fresh_qcow2(&dir.join("disk-target.qcow2"), 8 << 30)?;
                settle(&src);
                let server = start(kind, sendense, &target, false)?;
                let mut cmd = Command::new("nbdcopy");
                cmd.arg("--flush").arg(format!("--connections={conns}")).arg(format!("--threads={conns}"));
                cmd.arg(&src).arg(server.url());
                report.copy("disk qcow2 write", &case, size, server.measure(&mut cmd)?);
                if conns == 4 {
                    settle(&src);
                    let server = start(kind, sendense, &target, true)?;
                    let url = server.url();
                    let mut read = Command::new("nbdcopy");
                    read.args(["--connections=4", "--threads=4"]).arg(url).arg("null:");
                    report.copy("disk qcow2 cold read", &case, size, server.measure(&mut read)?);
                }
                let _ = std::fs::remove_file(&target);
            }
        }
    }
    let ours = Kind::SendenseUring.label();
    for conns in [1, 4] {
        for metric in ["MB/s", "srv CPU s/GB"] {
            let s = "disk qcow2 write";
            report.ratio(s, &format!("{ours} c{conns}"), &format!("{} c{conns}", Kind::QemuNbd.label()), metric);
            report.ratio(s, &format!("{ours} c{conns}"), &format!("{} c{conns}", Kind::QemuNbdUring.label()), metric);
            report.ratio(s, &format!("{ours} c{conns}"), &format!("{} c{conns}", Kind::Sendense.label()), metric);
            let (a, b) = (Kind::Sendense.label(), Kind::QemuNbd.label());
            report.ratio(s, &format!("{a} c{conns}"), &format!("{b} c{conns}"), metric);
        }
    }
    for metric in ["MB/s", "srv CPU s/GB"] {
        let s = "disk qcow2 cold read";
        report.ratio(s, &format!("{ours} c4"), &format!("{} c4", Kind::QemuNbdUring.label()), metric);
        report.ratio(s, &format!("{} c4", Kind::Sendense.label()), &format!("{} c4", Kind::QemuNbd.label()), metric);
    }
    report.note(format!(
        "disk: {mib} MiB of random data (source on /dev/shm) copied with `nbdcopy --flush --connections=N \
         --threads=N` into a fresh 8 GiB `qemu-img create -f qcow2` image in {} after `sync` and dropping the page \
         cache, then read back cold with 4 connections into `null:`. Servers: `sendense-nbd` and `qemu-nbd`, \
         `-f qcow2 --shared=10 -t`, as they are and with `--cache=none --aio=io_uring`.",
        dir.display()
    ));
    Ok(())
}
