//! Rewriting an overlay as an image that stands alone: [`flatten`], what `qemu-img convert` of the
//! top of a chain (or `qemu-img rebase -b ""`) does, and [`compare_disks`], the proof that the
//! copy reads as the chain did before it replaces the top image.
//!
//! A backup hub keeps a VM's points in time as a chain of overlays, each incremental on the one
//! before. A chain is bounded (every layer costs each read a lookup, an export a descriptor, and
//! `qcow2` opens at most [`crate::image::MAX_BACKING_DEPTH`] backing files), and the way to start a
//! new one without a full backup crossing the network again is to copy, on the hub, what the
//! newest incremental reads through its chain into a copy of it that has no backing file.
//!
//! The copy is written as [`crate::compact`] writes one (header, L1 and refcount structures of a
//! fresh image, then L2 tables and data appended in guest order, refcounts counted last), from the
//! chain's map: every range some layer holds data for is read through the chain, whole clusters
//! of the new image at a time, and stored (compressed with zstd when asked, else as it is); a
//! cluster that reads as zeroes, and every range the chain leaves unallocated or zero, is left
//! unallocated (an image with no backing file reads zeroes there). The caller writes it beside
//! the original under another name and renames it over the original only after
//! [`compare_disks`] found it equal.
//!
//! Memory is bounded whatever the chain: one L2 table, one read buffer, the L1 table and the map.

use std::path::Path;

use crate::compact::{all_zero, differ_within, fill_new, new_image, rewritable, runs_of, CompactReport};
use crate::error::{Error, Result};
use crate::image::{ExtentKind, Image};

/// Write what `src` reads (through its backing chain) into a new image at `dst` (which must not
/// exist) with the same size and cluster size and no backing file, permission bits `mode`, its
/// data clusters zstd-compressed when `compress`; flushed. Module doc.
///
/// # Errors
/// An image this does not rewrite (as [`crate::compact`]), or I/O. A partial `dst` is removed.
pub fn flatten(src: &Image, dst: &Path, mode: u32, compress: bool) -> Result<CompactReport> {
    rewritable(src)?;
    Image::create_file(dst, &new_image(src, mode, compress))?;
    let written = write_chain(src, dst, compress);
    if written.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    written
}

fn write_chain(src: &Image, dst: &Path, compress: bool) -> Result<CompactReport> {
    fill_new(src, dst, compress, |out, chunk, report| {
        let cs = src.cluster_size();
        let size = src.size();
        // Guest bytes copied so far: ranges of two layers may share a cluster of the new image.
        let mut done = 0u64;
        for run in data_runs(src)? {
            let mut at = (run.0 / cs * cs).max(done);
            let stop = run.1.div_ceil(cs).saturating_mul(cs).min(size);
            while at < stop {
                let n = (stop - at).min(chunk.len() as u64);
                let buf = chunk.get_mut(..n as usize).ok_or_else(|| Error::Unsupported("read chunk".into()))?;
                src.read_at(buf, at)?;
                for (i, data) in buf.chunks(cs as usize).enumerate() {
                    if all_zero(data) {
                        report.zero_clusters += 1;
                        continue;
                    }
                    report.data_bytes += data.len() as u64;
                    out.data(at / cs + i as u64, data, report)?;
                }
                at += n;
            }
            done = done.max(stop);
        }
        Ok(())
    })
}

/// The guest ranges `image` holds data for in any layer of its chain, in order, adjacent ones
/// joined: outside them it reads zeroes.
fn data_runs(image: &Image) -> Result<Vec<(u64, u64)>> {
    runs_of(image, |e| e.kind == ExtentKind::Data)
}

/// Whether `a` and `b` read as the same disk, each through its own chain. `None` when they do,
/// else the first difference. Only ranges where either holds data are read: elsewhere both read
/// zeroes by their maps.
///
/// # Errors
/// Reading either failed.
pub fn compare_disks(a: &Image, b: &Image) -> Result<Option<String>> {
    if a.size() != b.size() {
        return Ok(Some(format!("sizes differ: {} and {}", a.size(), b.size())));
    }
    let mut runs = data_runs(a)?;
    runs.extend(data_runs(b)?);
    runs.sort_unstable();
    differ_within(a, b, runs)
}
