//! `node` section: the node's data mover (`sendense-node copy`) against the old design's client
//! (`nbdcopy --connections=4 --flush`), both writing the same source into a fresh qcow2 image
//! served by `sendense-nbd -f qcow2` (the hub's engine), interleaved in each repetition.
//!
//! Cases: a random disk (every byte is data), a disk that is 90% holes (time should follow the
//! data), and an incremental after 1% of the 64 KiB clusters changed (bytes sent against bytes
//! changed, and time against the old design's only option, a full copy). Client CPU is the
//! child's user+system time from `/proc/self/stat` (cutime/cstime); server CPU as elsewhere.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::peers::{fresh_qcow2, make_source, settle, start, Kind};
use crate::report::Report;

/// CPU seconds of waited-for children of this process.
pub fn children_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(13) + ticks(14)) / 100.0
}

/// A disk with 1 MiB of random data every 10 MiB, holes elsewhere.
fn make_sparse(path: &Path, mib: u64) -> anyhow::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).ok() == Some(mib << 20) {
        return Ok(());
    }
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut block = vec![0u8; 1 << 20];
    for at in (0..mib).step_by(10) {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&block, at << 20)?;
    }
    Ok(())
}

/// Rewrite 1% of the 64 KiB clusters of `path` (spread evenly) with fresh bytes; returns the
/// bytes changed.
pub fn change_one_percent(path: &Path, mib: u64, seed: u64) -> anyhow::Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let clusters = (mib << 20) / 65536;
    let mut x = seed | 1;
    let mut data = vec![0u8; 65536];
    let mut changed = 0;
    for c in (0..clusters).step_by(100) {
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&data, c * 65536)?;
        changed += 65536;
    }
    f.sync_all()?;
    Ok(changed)
}

struct Run {
    secs: f64,
    client_cpu: f64,
    server_cpu: f64,
    sent: Option<u64>,
}

/// Copy `src` into a fresh (or overlay) image served by sendense-nbd with `client`, directly or
/// through `sendense-tunnel` (`via`: the tunnel binary and keys).
fn run_copy_via(
    sendense: &Path,
    image: &Path,
    via: Option<(&Path, &crate::tunnel::Keys)>,
    client: &mut dyn FnMut(&str) -> Command,
) -> anyhow::Result<Run> {
    let server = start(Kind::Sendense, sendense, image, false)?;
    let (_guards, url) = match via {
        Some((tunnel, keys)) => {
            let (g, lport) = crate::tunnel::tunnel_to(tunnel, keys, server.port)?;
            (g, format!("nbd://127.0.0.1:{lport}/exp"))
        }
        None => (Vec::new(), server.url()),
    };
    let cpu0 = server.cpu_seconds();
    let c0 = children_cpu();
    let mut cmd = client(&url);
    let json = cmd.get_args().any(|a| a == "--json");
    let started = std::time::Instant::now();
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let client_cpu = children_cpu() - c0;
    let server_cpu = server.cpu_seconds() - cpu0;
    server.stop();
    let sent = if json {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["disks"][0]["bytes_sent"].as_u64()
    } else {
        None
    };
    Ok(Run { secs, client_cpu, server_cpu, sent })
}

fn run_copy(sendense: &Path, image: &Path, client: &mut dyn FnMut(&str) -> Command) -> anyhow::Result<Run> {
    run_copy_via(sendense, image, None, client)
}

pub fn node_section(sendense: &Path, dir: &Path, mib: u64, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let node = sendense.with_file_name("sendense-node");
    anyhow::ensure!(node.exists(), "{} not found; build it with `cargo build --release`", node.display());
    let random = dir.join("node-random.raw");
    let sparse = dir.join("node-sparse.raw");
    make_source(&random, mib)?;
    make_sparse(&sparse, mib)?;
    let size = mib << 20;
    let gb = size as f64 / 1e9;
    let nbdcopy = |src: &Path| {
        let src = src.to_path_buf();
        move |url: &str| {
            let mut c = Command::new("nbdcopy");
            c.args(["--connections=4", "--threads=4", "--flush"]).arg(&src).arg(url);
            c
        }
    };
    let ours = |src: &Path, extra: Vec<String>| {
        let (node, src) = (node.clone(), src.to_path_buf());
        move |url: &str| {
            let mut c = Command::new(&node);
            c.arg("copy")
                .arg("--nbd-targets")
                .arg(format!("2000:{url}"))
                .arg("--source")
                .arg(format!("2000={}", src.display()))
                .arg("--json")
                .args(&extra)
                .env("RUST_LOG", "warn");
            c
        }
    };
    let record = |report: &mut Report, case: &str, r: &Run, disk_gb: f64| {
        report.add("node", case, "s", r.secs);
        report.add("node", case, "disk MB/s", disk_gb * 1e3 / r.secs);
        report.add("node", case, "client CPU s/GB", r.client_cpu / disk_gb);
        report.add("node", case, "srv CPU s/GB", r.server_cpu / disk_gb);
    };
    for rep in 0..reps {
        eprintln!("node: rep {}/{reps}", rep + 1);
        for (label, src) in [("random", &random), ("sparse90", &sparse)] {
            let image = fresh_qcow2(&dir.join("node-dst.qcow2"), size)?;
            settle(src);
            let r = run_copy(sendense, &image, &mut nbdcopy(src))?;
            record(report, &format!("nbdcopy c4 {label}"), &r, gb);
            let image = fresh_qcow2(&dir.join("node-dst.qcow2"), size)?;
            settle(src);
            let r = run_copy(sendense, &image, &mut ours(src, Vec::new()))?;
            record(report, &format!("sendense-node {label}"), &r, gb);
        }

        // The same random copy through sendense-tunnel (connect -> serve), both clients.
        let keys = crate::tunnel::Keys::new(&dir.join("node-keys"))?;
        let tunnel = sendense.with_file_name("sendense-tunnel");
        let image = fresh_qcow2(&dir.join("node-dst.qcow2"), size)?;
        settle(&random);
        let r = run_copy_via(sendense, &image, Some((&tunnel, &keys)), &mut nbdcopy(&random))?;
        record(report, "nbdcopy c4 random tunnel", &r, gb);
        let image = fresh_qcow2(&dir.join("node-dst.qcow2"), size)?;
        settle(&random);
        let r = run_copy_via(sendense, &image, Some((&tunnel, &keys)), &mut ours(&random, Vec::new()))?;
        record(report, "sendense-node random tunnel", &r, gb);

        // Incremental: a full copy with state, 1% of clusters changed, then the overlay.
        let work = dir.join("node-incr.raw");
        std::fs::copy(&random, &work)?;
        let state = dir.join("node-state");
        let _ = std::fs::remove_dir_all(&state);
        let base = fresh_qcow2(&dir.join("node-base.qcow2"), size)?;
        let state_args = vec!["--state-dir".to_string(), state.display().to_string()];
        run_copy(sendense, &base, &mut ours(&work, state_args.clone()))?;
        let changed = change_one_percent(&work, mib, 0x1234 + rep as u64)?;
        let overlay = dir.join("node-incr.qcow2");
        let _ = std::fs::remove_file(&overlay);
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "node-base.qcow2"])
            .arg(&overlay)
            .status()?;
        anyhow::ensure!(status.success(), "qemu-img create overlay failed");
        settle(&work);
        let mut incr_args = state_args.clone();
        incr_args.extend(["--mode".to_string(), "incremental".to_string()]);
        let r = run_copy(sendense, &overlay, &mut ours(&work, incr_args))?;
        record(report, "sendense-node incr 1%", &r, gb);
        report.add("node", "sendense-node incr 1%", "sent/changed", r.sent.unwrap_or(0) as f64 / changed as f64);
        let same = Command::new("qemu-img").arg("compare").arg(&work).arg(&overlay).status()?;
        anyhow::ensure!(same.success(), "the incremental overlay differs from the source");
        // The old design's only way: copy the whole disk again.
        let image = fresh_qcow2(&dir.join("node-dst.qcow2"), size)?;
        settle(&work);
        let r = run_copy(sendense, &image, &mut nbdcopy(&work))?;
        record(report, "nbdcopy c4 full again", &r, gb);
    }
    report.ratio("node", "sendense-node random", "nbdcopy c4 random", "disk MB/s");
    report.ratio("node", "sendense-node random", "nbdcopy c4 random", "client CPU s/GB");
    report.ratio("node", "sendense-node random tunnel", "nbdcopy c4 random tunnel", "disk MB/s");
    report.ratio("node", "sendense-node sparse90", "nbdcopy c4 sparse90", "disk MB/s");
    report.ratio("node", "sendense-node sparse90", "sendense-node random", "disk MB/s");
    report.ratio("node", "sendense-node incr 1%", "nbdcopy c4 full again", "disk MB/s");
    report.note(format!(
        "node: {mib} MiB disks into fresh qcow2 images served by sendense-nbd -f qcow2; \"sparse90\" = 1 MiB of data every 10 MiB; \
         \"incr 1%\" = 1% of 64 KiB clusters rewritten after a committed full copy, judged equal by qemu-img compare. \
         Ratios are medians of same-repetition ratios; sparse90 / random shows time following the data."
    ));
    Ok(())
}
