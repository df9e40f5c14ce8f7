//! `nbd-bench`: measure sendense-nbd against the tools it replaces, in the same run.
//!
//! Every case starts each server fresh on 127.0.0.1 with the same client and the same file, and
//! the servers are interleaved inside each repetition so that host noise hits them alike. It
//! reports medians over repetitions and, for comparisons, the median of per-repetition ratios
//! (never a single absolute figure). Server CPU comes from `/proc/PID/stat` before and after.
//!
//! Sections:
//! - `copy`: sequential write (`nbdcopy --flush`) and read (`nbdcopy ... null:`) of a random
//!   file, 1 and 4 connections, against `qemu-nbd -f raw` and `nbdkit file`.
//! - `fio`: 4 KiB random writes at queue depth 32 with fio's nbd engine, against qemu-nbd.
//! - `qcow2`: the same copy and fio work into fresh qcow2 images, against `qemu-nbd -f qcow2`.
//! - `disk`: qcow2 writes and cold reads on the disk under `--dir`, sendense-nbd and qemu-nbd each
//!   with its defaults and with `--cache=none --aio=io_uring`, 1 and 4 connections.
//! - `tunnel`: `sendense-tunnel` against OpenSSH `ssh -L` with the same cipher, and NBD through
//!   the tunnel against direct loopback.
//! - `node`: the node's data mover (`sendense-node copy`) against `nbdcopy --connections=4`
//!   into the same qcow2 target: random, 90% holes, and a 1% incremental.
//! - `hub`: `sendense-hub` start latency for a 4-disk backup against qemu-img + 4 qemu-nbd,
//!   and its memory with 101 idle exports against 101 qemu-nbd processes.
//! - `e2e`: a full backup end to end (sendense-hub + sendense-node through the hub's SSH
//!   endpoint, and over direct TCP) against the old design (qemu-nbd + OpenSSH `ssh -L` +
//!   nbdcopy): random, realistic, and a 1% incremental; and the random backup restored to the
//!   node (the read path).
//! - `checkpoint`: what the node's checkpoints cost: the product's full backup over direct TCP
//!   with a checkpoint every second against none.
//! - `wan`: NBD through the tunnel and through `ssh -L` across a delay proxy (round trips of
//!   0, 10, 20 and 50 ms).
//! - `floor`: the CPU budget the qcow2 write goal leaves a server on this machine, beside what a
//!   bare receiver (`recv` + `pwrite`, and `splice`) spends at least.
//! - `merge`: the hub's retention merge (`qcow2::commit`) against `qemu-img commit` on the same
//!   pair of images (a quarter of the disk rewritten in the overlay, 1% scattered).
//! - `compress`: the hub's compression of a backup image (`qcow2::compact`) against `qemu-img
//!   convert -c -o compression_type=zstd` on the same VM-like image.
//! - `flatten`: the hub's rewrite of a backup past `max_chain` to stand alone (`qcow2::flatten`)
//!   against `qemu-img convert` of the same chain's top (a VM-like base under 16 overlays).
//! - `verify`: the hub's verification of a full backup image (`hub::verify`): its peak memory per
//!   block and its read speed, with 64 KiB and 4 KiB blocks.
//! - `maps`: what saving and loading the node's largest change-tracking map (and resume map),
//!   and a running copy's checkpoint, hold in memory beyond the map, and how long they take.
//! - `fleet`: memory per idle export and time from "add export" to a finished handshake,
//!   in-process, against spawning one qemu-nbd per export.

mod compress;
mod disk;
mod e2e;
mod flatten;
mod fleet;
mod floor;
mod hub;
mod maps;
mod merge;
mod mover;
mod peers;
mod report;
mod tunnel;
mod verify;
mod wan;

use std::path::PathBuf;

use clap::Parser;

/// Benchmarks of sendense-nbd against qemu-nbd and nbdkit.
#[derive(Debug, Parser)]
struct Args {
    /// Sections to run: copy, fio, qcow2, disk, tunnel, node, hub, e2e, checkpoint, wan, fleet, floor, merge, compress, flatten, verify, maps
    /// (default: all).
    sections: Vec<String>,
    /// Size of the copied file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Repetitions per case.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/nbd-bench")]
    dir: PathBuf,
    /// Path of the sendense-nbd binary (default: next to this one).
    #[arg(long)]
    sendense: Option<PathBuf>,
    /// Append the markdown report to this file too.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(verify::CHILD) {
        return verify::run_child(&spec);
    }
    if let Ok(spec) = std::env::var(maps::CHILD) {
        return maps::run_child(&spec);
    }
    let args = Args::parse();
    let sendense = match &args.sendense {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("sendense-nbd"),
    };
    anyhow::ensure!(sendense.exists(), "{} not found; build it with `cargo build --release`", sendense.display());
    std::fs::create_dir_all(&args.dir)?;
    let all = args.sections.is_empty();
    let wants = |s: &str| all || args.sections.iter().any(|x| x == s);
    let mut report = report::Report::default();
    if wants("copy") {
        peers::copy_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("fio") {
        peers::fio_section(&sendense, &args.dir, args.reps, &mut report)?;
    }
    if wants("qcow2") {
        peers::qcow2_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("disk") {
        disk::disk_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("tunnel") {
        tunnel::tunnel_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("node") {
        mover::node_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("hub") {
        hub::hub_section(&sendense, &args.dir, args.reps, &mut report)?;
    }
    if wants("checkpoint") {
        e2e::checkpoint_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("e2e") {
        e2e::e2e_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("wan") {
        wan::wan_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("floor") {
        floor::floor_section(&sendense, &args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("merge") {
        merge::merge_section(&args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("compress") {
        compress::compress_section(&args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("flatten") {
        flatten::flatten_section(&args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("maps") {
        maps::maps_section(&args.dir, args.reps, &mut report)?;
    }
    if wants("verify") {
        verify::verify_section(&args.dir, args.size_mib, args.reps, &mut report)?;
    }
    if wants("fleet") {
        fleet::fleet_section(&args.dir, &mut report)?;
    }
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &args.report {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{text}")?;
    }
    Ok(())
}
