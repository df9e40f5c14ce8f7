//! Starting the servers under test and running the external clients (nbdcopy, fio) on them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::report::Report;

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sendense,
    QemuNbd,
    NbdkitFile,
    /// `--cache=none --aio=io_uring`, the pair for disks.
    SendenseUring,
    /// qemu-nbd with the same `--cache=none --aio=io_uring`.
    QemuNbdUring,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Sendense => "sendense",
            Self::QemuNbd => "qemu-nbd",
            Self::NbdkitFile => "nbdkit-file",
            Self::SendenseUring => "sendense none+io_uring",
            Self::QemuNbdUring => "qemu-nbd none+io_uring",
        }
    }
}

pub struct Running {
    child: Child,
    pub port: u16,
}

impl Running {
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/exp", self.port)
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// Run `client` against this server, then stop it: the client's wall seconds and the
    /// server's CPU seconds over that time.
    pub fn measure(self, client: &mut Command) -> anyhow::Result<(f64, f64)> {
        let cpu0 = self.cpu_seconds();
        let secs = run_timed(client)?;
        let cpu = self.cpu_seconds() - cpu0;
        self.stop();
        Ok((secs, cpu))
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(&format!("/proc/{pid}/stat"), 11)
}

/// Two adjacent clock-tick fields of a `/proc/.../stat` file, in seconds: user + system time at
/// `first` = 11 (the process itself), that of its waited-for children at 13. Fields are counted
/// after the command name, which may contain spaces, so from the last ')'.
pub fn stat_seconds(path: &str, first: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return f64::NAN };
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(first) + ticks(first + 1)) / 100.0
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn start(kind: Kind, sendense: &Path, file: &Path, read_only: bool) -> anyhow::Result<Running> {
    let port = free_port()?;
    let p = port.to_string();
    let format = if file.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
    let uring = ["--cache=none", "--aio=io_uring"];
    let mut cmd = match kind {
        Kind::Sendense | Kind::SendenseUring => {
            let mut c = Command::new(sendense);
            c.args(["-f", format, "-x", "exp", "-p", &p, "-b", "127.0.0.1", "--shared=10", "-t"]);
            if kind == Kind::SendenseUring {
                c.args(uring);
            }
            c
        }
        Kind::QemuNbd | Kind::QemuNbdUring => {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", format, "-x", "exp", "-p", &p, "-b", "127.0.0.1", "--shared=10", "-t"]);
            if kind == Kind::QemuNbdUring {
                c.args(uring);
            }
            c
        }
        Kind::NbdkitFile => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-i", "127.0.0.1", "-p", &p, "-e", "exp"]);
            if read_only {
                c.arg("-r");
            }
            c.arg("file");
            c
        }
    };
    if read_only && kind != Kind::NbdkitFile {
        cmd.arg("-r");
    }
    cmd.arg(file).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", kind.label()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("{} exited before listening: {status}", kind.label());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen within 10 s", kind.label());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Running { child, port })
}

fn run_timed(cmd: &mut Command) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out =
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

pub fn make_source(path: &Path, mib: u64) -> anyhow::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).ok() == Some(mib << 20) {
        return Ok(());
    }
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

pub fn sparse(path: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(size)?;
    Ok(path.to_path_buf())
}

/// Flush dirty pages and, when allowed (root), drop the page cache, so that one case's
/// writeback and reclaim do not land in the next case's figures; then read `warm` back into the
/// cache so the client's source is not the bottleneck. Returns whether the cache was dropped.
pub fn settle(warm: &Path) -> bool {
    let _ = Command::new("sync").status();
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok();
    let _ = Command::new("cat").arg(warm).stdout(Stdio::null()).status();
    dropped
}

/// Sequential write and read with nbdcopy, 1 and 4 connections, three servers interleaved.
pub fn copy_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let src = dir.join("src.raw");
    make_source(&src, mib)?;
    let size = mib << 20;
    let kinds = [Kind::Sendense, Kind::QemuNbd, Kind::NbdkitFile];
    let mut dropped = true;
    for rep in 0..reps {
        eprintln!("copy: rep {}/{reps}", rep + 1);
        for conns in [1u32, 4] {
            for kind in kinds {
                let case = format!("{} c{conns}", kind.label());
                let target = sparse(&dir.join(format!("dst-{}.raw", kind.label())), size)?;
                dropped &= settle(&src);
                let server = start(kind, sendense, &target, false)?;
                let mut cmd = Command::new("nbdcopy");
                cmd.arg("--flush").arg(format!("--connections={conns}"));
                if conns > 1 {
                    cmd.arg(format!("--threads={conns}"));
                }
                cmd.arg(&src).arg(server.url());
                report.copy("write", &case, size, server.measure(&mut cmd)?);

                settle(&target);
                let server = start(kind, sendense, &target, true)?;
                let mut cmd = Command::new("nbdcopy");
                cmd.arg(format!("--connections={conns}"));
                if conns > 1 {
                    cmd.arg(format!("--threads={conns}"));
                }
                cmd.arg(server.url()).arg("null:");
                report.copy("read", &case, size, server.measure(&mut cmd)?);
                let _ = std::fs::remove_file(&target);
            }
        }
    }
    for section in ["write", "read"] {
        for conns in [1, 4] {
            for other in ["qemu-nbd", "nbdkit-file"] {
                for metric in ["MB/s", "srv CPU s/GB"] {
                    report.ratio(section, &format!("sendense c{conns}"), &format!("{other} c{conns}"), metric);
                }
            }
        }
    }
    if !dropped {
        report.note("copy: not root, so the page cache was not dropped between cases: expect more noise.");
    }
    report.note(format!(
        "copy: {mib} MiB of random data; write = `nbdcopy --flush --connections=N [--threads=N] src.raw nbd://...` \
         into a fresh sparse raw file, after `sync` and dropping the page cache; read = `nbdcopy --connections=N [--threads=N] nbd://... null:` of the written file; \
         servers: `sendense-nbd -f raw --shared=10 -t`, `qemu-nbd -f raw --shared=10 -t`, `nbdkit file`."
    ));
    Ok(())
}

/// 4 KiB random writes at queue depth 32 through fio's nbd engine.
pub fn fio_section(sendense: &Path, dir: &Path, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let size: u64 = 1 << 30;
    for rep in 0..reps {
        eprintln!("fio: rep {}/{reps}", rep + 1);
        for kind in [Kind::Sendense, Kind::QemuNbd] {
            let target = sparse(&dir.join(format!("fio-{}.raw", kind.label())), size)?;
            let server = start(kind, sendense, &target, false)?;
            let json = dir.join("fio.json");
            let mut cmd = Command::new("fio");
            cmd.args(["--name=randw", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=1"])
                .arg(format!("--uri={}", server.url()))
                .arg(format!("--size={}", size))
                .args(["--runtime=30", "--output-format=json"])
                .arg(format!("--output={}", json.display()));
            let (_, cpu) = server.measure(&mut cmd)?;
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
            let write = &v["jobs"][0]["write"];
            let iops = write["iops"].as_f64().unwrap_or(f64::NAN);
            let ios = write["total_ios"].as_f64().unwrap_or(f64::NAN);
            let p99 = write["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(f64::NAN) / 1e6;
            let label = kind.label();
            report.add("fio", label, "IOPS", iops);
            report.add("fio", label, "p99 ms", p99);
            report.add("fio", label, "srv CPU us/op", cpu * 1e6 / ios);
            let _ = std::fs::remove_file(&target);
        }
    }
    report.ratio("fio", "sendense", "qemu-nbd", "IOPS");
    report.ratio("fio", "sendense", "qemu-nbd", "srv CPU us/op");
    report.note(
        "fio: `fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 --size=1G --runtime=30` on a fresh sparse raw file.",
    );
    Ok(())
}

pub fn fresh_qcow2(path: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_file(path);
    let out =
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg(size.to_string()).output()?;
    anyhow::ensure!(out.status.success(), "qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(path.to_path_buf())
}

/// qcow2 through NBD: sequential write into a fresh image with 4 connections, read back, and
/// 4 KiB random writes; sendense-nbd against qemu-nbd, with nbdkit on a raw file for scale.
pub fn qcow2_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let src = dir.join("src.raw");
    make_source(&src, mib)?;
    let size = mib << 20;
    for rep in 0..reps {
        eprintln!("qcow2: rep {}/{reps}", rep + 1);
        for kind in [Kind::Sendense, Kind::QemuNbd, Kind::NbdkitFile] {
            let target = if kind == Kind::NbdkitFile {
                sparse(&dir.join("q-nbdkit.raw"), size)?
            } else {
                fresh_qcow2(&dir.join(format!("q-{}.qcow2", kind.label())), size)?
            };
            let case =
                if kind == Kind::NbdkitFile { "nbdkit-file (raw)".to_string() } else { kind.label().to_string() };
            settle(&src);
            let server = start(kind, sendense, &target, false)?;
            let url = server.url();
            let mut write = Command::new("nbdcopy");
            write.args(["--flush", "--connections=4", "--threads=4"]).arg(&src).arg(url);
            report.copy("qcow2 write c4", &case, size, server.measure(&mut write)?);
            settle(&target);
            let server = start(kind, sendense, &target, true)?;
            let url = server.url();
            let mut read = Command::new("nbdcopy");
            read.args(["--connections=4", "--threads=4"]).arg(url).arg("null:");
            report.copy("qcow2 read c4", &case, size, server.measure(&mut read)?);
            let _ = std::fs::remove_file(&target);
        }
        for kind in [Kind::Sendense, Kind::QemuNbd] {
            let target = fresh_qcow2(&dir.join(format!("qf-{}.qcow2", kind.label())), 1 << 30)?;
            let server = start(kind, sendense, &target, false)?;
            let json = dir.join("fio.json");
            let mut cmd = Command::new("fio");
            cmd.args(["--name=randw", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=1"])
                .arg(format!("--uri={}", server.url()))
                .args(["--size=1G", "--runtime=30", "--output-format=json"])
                .arg(format!("--output={}", json.display()));
            let (_, cpu) = server.measure(&mut cmd)?;
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
            let write = &v["jobs"][0]["write"];
            let ios = write["total_ios"].as_f64().unwrap_or(f64::NAN);
            report.add("qcow2 fio", kind.label(), "IOPS", write["iops"].as_f64().unwrap_or(f64::NAN));
            report.add("qcow2 fio", kind.label(), "srv CPU us/op", cpu * 1e6 / ios);
            let _ = std::fs::remove_file(&target);
        }
    }
    for section in ["qcow2 write c4", "qcow2 read c4"] {
        for metric in ["MB/s", "srv CPU s/GB"] {
            report.ratio(section, "sendense", "qemu-nbd", metric);
            report.ratio(section, "sendense", "nbdkit-file (raw)", metric);
        }
    }
    report.ratio("qcow2 fio", "sendense", "qemu-nbd", "IOPS");
    report.ratio("qcow2 fio", "sendense", "qemu-nbd", "srv CPU us/op");
    report.note(format!(
        "qcow2: {mib} MiB random data copied with `nbdcopy --flush --connections=4 --threads=4` into a fresh \
         `qemu-img create -f qcow2` image (nbdkit: a sparse raw file), page cache dropped first; read back with \
         `nbdcopy --connections=4 --threads=4 nbd://... null:`; fio 4 KiB randwrite QD32 on a fresh 1 GiB qcow2. \
         Servers: `sendense-nbd -f qcow2 --shared=10 -t`, `qemu-nbd -f qcow2 --shared=10 -t`."
    ));
    Ok(())
}
