//! `floor`: what the qcow2 write goal (2.0x qemu-nbd with 4 connections, image in memory) asks
//! of a server on this machine, measured rather than argued.
//!
//! Client and server share the machine's CPUs, and once the disk is out of the way both are
//! CPU-bound (`/proc/stat` shows no idle time in the middle of a copy). So the throughput the
//! goal names fixes a CPU budget per GB: `cpus / (2.0 x qemu-nbd's MB/s)`, of which the client
//! (`nbdcopy`, measured here as the bench's waited-for child) takes its share, and the server
//! gets the rest, if nothing is ever idle. Beside that budget this section puts the least any
//! server can spend: a bare receiver, one thread reading 256 KiB messages from a loopback TCP
//! socket into a buffer and `pwrite`-ing them into a file (no protocol, no qcow2, no runtime),
//! and the same with `splice` (socket -> pipe -> file, one copy fewer), fed by a bare sender.
//! The copies into sendense-nbd and qemu-nbd run in the same repetition, with their client's CPU
//! and the machine's idle share.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use crate::peers::{fresh_qcow2, make_source, settle, start, stat_seconds, Kind};
use crate::report::{median, Report};

/// Bytes per message, as nbdcopy sends them.
const MESSAGE: usize = 256 << 10;

/// CPU seconds of this thread so far.
pub fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// CPU seconds (user + system) of this process's children that were waited for.
pub fn children_cpu_seconds() -> f64 {
    stat_seconds("/proc/self/stat", 13)
}

/// (idle, total) jiffies of all CPUs.
fn cpu_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return (f64::NAN, f64::NAN) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (idle, v.iter().take(8).sum())
}

/// How the bare receiver moves bytes from the socket into the file.
#[derive(Clone, Copy)]
enum Receive {
    /// `recv` into a buffer, `pwrite` from it: two copies, as every NBD server here does.
    Copy,
    /// `splice` into a pipe and from the pipe into the file: one copy.
    Splice,
}

/// Send `src` over loopback to a bare receiver writing `dst`: (wall seconds, receiver CPU).
fn bare_copy(src: &Path, dst: &Path, how: Receive) -> anyhow::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let src_file = File::open(src)?;
    let size = src_file.metadata()?.len();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut socket = TcpStream::connect(("127.0.0.1", port))?;
        let mut buf = vec![0u8; MESSAGE];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(MESSAGE as u64) as usize;
            src_file.read_exact_at(&mut buf[..n], at)?;
            socket.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    });
    let (mut socket, _) = listener.accept()?;
    let out = File::options().read(true).write(true).create(true).truncate(true).open(dst)?;
    let cpu0 = thread_cpu_seconds();
    let started = Instant::now();
    let mut at = 0u64;
    match how {
        Receive::Copy => {
            let mut buf = vec![0u8; MESSAGE];
            while at < size {
                let n = (size - at).min(MESSAGE as u64) as usize;
                socket.read_exact(&mut buf[..n])?;
                out.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        Receive::Splice => {
            let (pipe_out, pipe_in) = rustix::pipe::pipe()?;
            rustix::pipe::fcntl_setpipe_size(&pipe_in, MESSAGE)?;
            let flags = rustix::pipe::SpliceFlags::MOVE;
            while at < size {
                let n = (size - at).min(MESSAGE as u64) as usize;
                let mut queued = 0;
                while queued < n {
                    let got = rustix::pipe::splice(&socket, None, &pipe_in, None, n - queued, flags)?;
                    anyhow::ensure!(got > 0, "the sender stopped early");
                    queued += got;
                }
                let mut file_at = at;
                let mut written = 0;
                while written < n {
                    written += rustix::pipe::splice(&pipe_out, None, &out, Some(&mut file_at), n - written, flags)?;
                }
                at += n as u64;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    Ok((secs, cpu))
}

pub fn floor_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let src = dir.join("src.raw");
    make_source(&src, mib)?;
    let size = mib << 20;
    let gb = size as f64 / 1e9;
    let section = "floor";
    let mut qemu_mbs = Vec::new();
    let mut client_cpu = Vec::new();
    for rep in 0..reps {
        eprintln!("floor: rep {}/{reps}", rep + 1);
        for (case, how) in [("bare recv+pwrite", Receive::Copy), ("bare splice", Receive::Splice)] {
            let dst = dir.join("floor.raw");
            settle(&src);
            let (secs, cpu) = bare_copy(&src, &dst, how).with_context(|| case.to_string())?;
            report.add(section, case, "MB/s", size as f64 / 1e6 / secs);
            report.add(section, case, "rcv CPU s/GB", cpu / gb);
            let _ = std::fs::remove_file(&dst);
        }
        for kind in [Kind::Sendense, Kind::QemuNbd] {
            let target = fresh_qcow2(&dir.join(format!("floor-{}.qcow2", kind.label())), size)?;
            let case = format!("{} qcow2 c4", kind.label());
            settle(&src);
            let server = start(kind, sendense, &target, false)?;
            let mut write = Command::new("nbdcopy");
            write.args(["--flush", "--connections=4", "--threads=4"]).arg(&src).arg(server.url());
            let children0 = children_cpu_seconds();
            let (idle0, total0) = cpu_jiffies();
            let measured = server.measure(&mut write)?;
            let (idle1, total1) = cpu_jiffies();
            // `measure` waited for nbdcopy before it stopped (and waited for) the server.
            let client = children_cpu_seconds() - children0 - measured.1;
            report.copy(section, &case, size, measured);
            report.add(section, &case, "client CPU s/GB", client / gb);
            report.add(section, &case, "idle %", 100.0 * (idle1 - idle0) / (total1 - total0));
            if kind == Kind::QemuNbd {
                qemu_mbs.push(size as f64 / 1e6 / measured.0);
            } else {
                client_cpu.push(client / gb);
            }
            let _ = std::fs::remove_file(&target);
        }
    }
    report.ratio(section, "sendense qcow2 c4", "qemu-nbd qcow2 c4", "MB/s");
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let goal_mbs = 2.0 * median(&qemu_mbs);
    let budget = cpus * 1e3 / goal_mbs;
    report.note(format!(
        "floor: at 2.0x qemu-nbd's median ({goal_mbs:.0} MB/s) {cpus} CPUs give {budget:.2} CPU-s per GB in all; the \
         client into sendense-nbd took {:.2} (median), which leaves the server {:.2} s/GB if no CPU is ever idle. \
         The bare receivers: one thread, 256 KiB messages from loopback TCP into a file in `--dir` (`recv` + \
         `pwrite`, or `splice` through a pipe), fed by a bare sender thread; receiver CPU from \
         CLOCK_THREAD_CPUTIME_ID. Client CPU: nbdcopy's user+system time as a waited-for child; idle: `/proc/stat` \
         over the copy, both CPUs.",
        median(&client_cpu),
        budget - median(&client_cpu)
    ));
    Ok(())
}
