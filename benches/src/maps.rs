//! `maps`: what writing and reading the node's change-tracking maps holds in memory beyond the
//! map itself, and how long it takes (`node::blockmap`: a map is saved at the end of every copy
//! of a disk without a dirty bitmap, a resume map at every checkpoint and pause, and the hub
//! keeps one beside every backup image; each is loaded at the start of the next run). The map is
//! the node's largest (4 Mi blocks, a hash of 32 bytes each: 128 MiB) and every block holds data
//! (no hash is left out as a zero block's), the case that writes and reads the most. Each run is
//! a fresh process (this binary again, told by [`CHILD`]), so that no memory an earlier run freed
//! and the allocator kept hides what this one takes; its figure is the high-water mark
//! (`VmHWM`) above the resident set just before the save or load, the map itself already in
//! memory for a save (so a save that holds nothing more than the map shows about 0) and not yet
//! for a load (so a load that holds nothing more than the map it gives shows its 128 MiB).
//! `checkpoint` is a running copy's resume map saved as the node's checkpoints save it
//! (`Resumable::save`): a copy of a disk of that many blocks (sparse, on the bench's directory)
//! runs throttled, and the figure is the high-water mark (reset first) above the resident set,
//! the copy's own hashes already in it. No peer: the old design kept no maps.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use node::blockmap::{BlockMap, BlockSet, ResumeMap};

use crate::report::Report;
use crate::verify::{child_figures, status_bytes};

/// The environment variable that makes this binary one run: `OP\tPATH\tBLOCKS`, OP one of
/// `save-map`, `save-resume`, `load-map`, `load-resume`, `checkpoint`.
pub const CHILD: &str = "NBD_BENCH_MAPS_RUN";

/// The block size of the maps (what it is does not change their size).
const BLOCK: u64 = 256 << 10;

/// A map of `blocks` pseudo-random hashes (no zero block), and a resume map of it with every
/// other block done.
fn made(blocks: u64) -> ResumeMap {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let hashes = (0..blocks)
        .map(|_| {
            let mut h = [0u8; 32];
            for c in h.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            h
        })
        .collect();
    let mut done = BlockSet::default();
    for b in (0..blocks).step_by(2) {
        done.insert_run(b, 1);
    }
    ResumeMap { map: BlockMap { disk_size: blocks * BLOCK, block_size: BLOCK, hashes }, done }
}

/// One run in this process (the child's side, [`CHILD`]): prints the peak bytes above the
/// resident set before, and the seconds.
pub fn run_child(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split('\t');
    let (Some(op), Some(path), Some(blocks)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("OP\tPATH\tBLOCKS");
    };
    let (path, blocks): (&Path, u64) = (Path::new(path), blocks.parse()?);
    if op == "checkpoint" {
        let (peak, secs) = tokio::runtime::Runtime::new()?.block_on(checkpoint(path, blocks))?;
        println!("{peak} {secs}");
        return Ok(());
    }
    let prepared = op.starts_with("save").then(|| made(blocks));
    let (before, t) = (status_bytes("VmRSS:")?, Instant::now());
    let held = match (op, &prepared) {
        ("save-map", Some(r)) => {
            r.map.save(path)?;
            0
        }
        ("save-resume", Some(r)) => {
            r.save(path)?;
            0
        }
        ("load-map", None) => BlockMap::load(path).context("the map does not load")?.hashes.len(),
        ("load-resume", None) => ResumeMap::load(path).context("the resume map does not load")?.map.hashes.len(),
        _ => anyhow::bail!("unknown run {op}"),
    };
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(op.starts_with("save") || held as u64 == blocks, "{op}: {held} blocks, not {blocks}");
    println!("{} {secs}", status_bytes("VmHWM:")?.saturating_sub(before));
    Ok(())
}

/// A running copy's checkpoint saved to `path` (module doc): the peak bytes above the resident
/// set before, and the seconds.
async fn checkpoint(path: &Path, blocks: u64) -> anyhow::Result<(u64, f64)> {
    use std::sync::Arc;

    use node::mover::{copy_disk, Base, Changes, CopyOptions, Progress, Tokens};
    use node::sink::{FileSink, Sink};
    use node::source::{Source, SourceSpec};

    let (disk, copy_to) = (path.with_extension("disk"), path.with_extension("copy"));
    let size = blocks * BLOCK;
    {
        // Data in the first blocks (what the throttled copy is busy with), holes after.
        let f = std::fs::File::create(&disk)?;
        f.set_len(size)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; 64 * BLOCK as usize], 0)?;
    }
    let spec = SourceSpec::Path { path: disk.clone(), format: Some(node::api::DiskFormat::Raw), dirty_bitmap: None };
    let source = Arc::new(Source::open(&spec, 1, Default::default()).await?);
    let (sink, _zeroed) = FileSink::create(&copy_to, size)?;
    let sink = Arc::new(Sink::File(sink));
    let options = CopyOptions {
        block_size: Some(BLOCK),
        request_size: BLOCK,
        throttle: Some(Arc::new(node::throttle::Throttle::new(BLOCK))),
        ..CopyOptions::default()
    };
    let tokens = Tokens::default();
    let (resumable, cancel) = (Arc::clone(&tokens.resumable), tokens.cancel.clone());
    let copy = tokio::spawn(async move {
        let progress = Arc::new(Progress::default());
        copy_disk(source, sink, Base::Zero, Changes::ReadAll, &options, progress, Arc::default(), tokens).await
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // The peak from here on: the copy's start (its hashes made) is not the checkpoint's.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let (before, t) = (status_bytes("VmRSS:")?, Instant::now());
    let saved = resumable.save(path).await?;
    let secs = t.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM:")?.saturating_sub(before);
    cancel.cancel();
    let _ = copy.await;
    anyhow::ensure!(saved, "the copy ended before its checkpoint");
    let map = ResumeMap::load(path).context("the checkpoint does not load")?;
    anyhow::ensure!(map.map.hashes.len() as u64 == blocks, "the checkpoint holds {} blocks", map.map.hashes.len());
    for file in [&disk, &copy_to] {
        let _ = std::fs::remove_file(file);
    }
    Ok((peak, secs))
}

pub fn maps_section(dir: &Path, reps: usize, report: &mut Report) -> anyhow::Result<()> {
    let section = "maps";
    let blocks: u64 = 4 << 20;
    let (map, resume, checkpoint) =
        (dir.join("maps-bench.map"), dir.join("maps-bench.resume"), dir.join("maps-bench.checkpoint"));
    for rep in 0..reps {
        let ops = [
            ("save-map", &map),
            ("load-map", &map),
            ("save-resume", &resume),
            ("load-resume", &resume),
            ("checkpoint", &checkpoint),
        ];
        for (op, path) in ops {
            eprintln!("maps: {op}, rep {}/{reps}", rep + 1);
            let [peak, secs] = child_figures(CHILD, &format!("{op}\t{}\t{blocks}", path.display()))
                .with_context(|| format!("maps: {op}"))?;
            report.add(section, op, "MiB above", peak / 1048576.0);
            report.add(section, op, "seconds", secs);
        }
    }
    report.note(format!(
        "maps: {blocks} blocks (the node's largest map: 128 MiB of hashes), every block data; `MiB above` = \
         VmHWM above VmRSS before the save (the map already built) or the load (nothing yet); `checkpoint`: \
         a running copy's resume map saved (its disk sparse, 64 blocks of data), VmHWM reset first."
    ));
    for path in [&map, &resume, &checkpoint] {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
