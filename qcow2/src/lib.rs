//! # qcow2: images that qemu-img accepts as its own
//!
//! A runtime-agnostic (synchronous, positional I/O) qcow2 library: create v3 images, open v2
//! and v3 images with their backing chains, read every kind of cluster qemu writes (data, zero,
//! unallocated, zlib and zstd compressed, extended L2 subclusters; any cluster size 512 B..2 MiB
//! and refcount width 1..64 bits), and report an allocation map and what persistent dirty
//! bitmaps say changed.
//!
//! ## Layers
//! - [`header`]: the header and extensions, parsed and validated (pure).
//! - [`layout`]: L1/L2/refcount entry decoding into [`Mapping`]s (pure).
//! - [`compress`]: deflate and zstd clusters.
//! - [`Image`]: metadata lookup under short locks, data I/O outside them.
//! - [`Bitmap`]: persistent dirty bitmaps, read only (`Image::bitmaps`, `Image::bitmap_runs`).
//!
//! ## Hostile input
//! Every header field is checked before anything is sized from it (`l1_size`, cluster bits,
//! table offsets and sizes, extension lengths, backing name); tables past the end of the file,
//! unaligned entries and reserved bits are typed errors naming the field; backing chains are
//! limited to [`image::MAX_BACKING_DEPTH`] and loops are detected. The crate root denies
//! `unwrap`, `expect`, indexing and `panic`.
//!
//! ## Writing
//! [`Image::write_at`], [`Image::write_zeroes`], [`Image::discard`], [`Image::flush`] and
//! [`Image::close`]: allocation with copy-on-write from the backing chain, zero clusters, freeing
//! discards, refcount block and table growth. See `write.rs` and `refcount.rs` for the
//! concurrency and crash-safety rules. [`Image::plan_write`] and [`WritePlan::commit`] split a
//! write around its data for callers with their own I/O engine (io_uring; `plan.rs`). [`commit`]
//! folds an overlay into its backing file, as `qemu-img commit` does; [`compact`] rewrites one
//! layer compressed, as `qemu-img convert -c` does; [`flatten`] rewrites an overlay with its
//! chain's data copied in and no backing file, as `qemu-img convert` of the chain's top does.
//!
//! ## Limitations
//! Encrypted images and external data files are refused. Images with internal snapshots or the
//! corrupt bit open read-only. An image with the dirty bit (lazy refcounts, not cleanly closed)
//! has its refcounts rebuilt from the metadata when opened for writing (`repair.rs`).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

mod bitmaps;
mod commit;
mod compact;
pub mod compress;
mod create;
pub mod error;
mod flatten;
pub mod header;
pub mod image;
mod l2cache;
pub mod layout;
mod plan;
mod refcount;
mod repair;
mod write;

pub use bitmaps::Bitmap;
pub use commit::{commit, CommitReport};
pub use compact::{compact, compare_layers, CompactReport};
pub use create::CreateOptions;
pub use error::{Error, ErrorKind, Result};
pub use flatten::{compare_disks, flatten};
pub use header::{Compression, Header};
pub use image::{BackingFormat, ExtentKind, Image, ImageOptions, MapExtent};
pub use layout::Mapping;
pub use plan::{Piece, ReadPiece, ReadSource, WritePlan};
pub use repair::CheckReport;

/// Entry point for the `qcow2_image` fuzz target (feature `fuzzing`) and its corpus replay: open the bytes as an
/// image, read, map and read its bitmaps over samples of it, then open it writable and write, zero and discard. Returns
/// whether the image opened. Never panics on any input (that is what is being fuzzed).
#[cfg(feature = "fuzzing")]
pub fn fuzz_image_bytes(data: &[u8]) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("qcow2-fuzz-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    if std::fs::write(&path, data).is_err() {
        return false;
    }
    let opened = fuzz_one(&path);
    let _ = std::fs::remove_file(&path);
    opened
}

#[cfg(feature = "fuzzing")]
// A panic is how a fuzz target reports a finding: a compacted or flattened copy that differs is one.
#[allow(clippy::panic)]
fn fuzz_one(path: &std::path::Path) -> bool {
    let Ok(img) = Image::open(path) else { return false };
    let size = img.size();
    let mut buf = vec![0u8; 65536];
    for offset in [0, size / 2, size.saturating_sub(65536)] {
        let n = (size - offset.min(size)).min(65536) as usize;
        if let Some(b) = buf.get_mut(..n) {
            let _ = img.read_at(b, offset);
        }
    }
    // A read takes runs of clusters in one step: it must equal the same bytes read a sector at a
    // time (runs no longer than a cluster), wherever both succeed.
    let n = size.min(65536) as usize;
    let mut whole = vec![0u8; n];
    if img.read_at(&mut whole, 0).is_ok() {
        let mut sector = [0u8; 512];
        for (i, want) in whole.chunks(512).enumerate() {
            let Some(piece) = sector.get_mut(..want.len()) else { break };
            if img.read_at(piece, i as u64 * 512).is_ok() && piece != want {
                panic!("a read of {n} bytes differs from reading them by sectors at sector {i}");
            }
        }
    }
    let _ = img.map(0, size.min(16 << 20));
    for bitmap in img.bitmaps().unwrap_or_default().iter().take(4) {
        let _ = img.bitmap_runs(bitmap, 0, size.min(16 << 20));
    }
    // Twice: the first read_at above cached the tables the second plan may use.
    for _ in 0..2 {
        let _ = img.plan_read(0, size.min(1 << 20));
    }
    // Compacting fails cleanly, or gives a copy that reads as the image (small images only: a
    // large virtual size is data the fuzzer would spend its time compressing).
    if size <= 64 << 20 {
        let copy = path.with_extension("compact");
        if compact(&img, &copy, 0o600).is_ok() {
            if let Ok(c) = Image::open(&copy) {
                if let Ok(Some(diff)) = compare_layers(&img, &c) {
                    let _ = std::fs::remove_file(&copy);
                    panic!("a compacted copy differs from its image: {diff}");
                }
            }
        }
        let _ = std::fs::remove_file(&copy);
        // Likewise a copy that stands alone: it reads as the image through its chain.
        if flatten(&img, &copy, 0o600, false).is_ok() {
            if let Ok(c) = Image::open(&copy) {
                if let Ok(Some(diff)) = compare_disks(&img, &c) {
                    let _ = std::fs::remove_file(&copy);
                    panic!("a flattened copy differs from its image: {diff}");
                }
            }
        }
        let _ = std::fs::remove_file(&copy);
    }
    // Counting references never panics nor follows a hostile entry far (`repair.rs`).
    let _ = img.check();
    drop(img);
    // A writable open that reclaims leaks rebuilds the refcounts of an image the check finds
    // leaking, or refuses a corrupt one; the writes below go to what it left.
    drop(Image::open_with(path, &ImageOptions::read_write().reclaim_leaks(true)));
    if let Ok(w) = Image::open_with(path, &ImageOptions::read_write()) {
        let n = size.min(70_000) as usize;
        let data = vec![0x5a; n];
        let _ = w.write_at(&data, 0);
        if let Ok(Some(plan)) = w.plan_write(size / 2, n.min((size - size / 2) as usize) as u64) {
            for piece in plan.pieces() {
                let _ = plan.write_piece(piece, &data);
            }
            let _ = plan.commit();
        }
        let _ = w.write_zeroes(0, size.min(1 << 20));
        let _ = w.discard(0, size.min(1 << 20));
        let _ = w.close();
    }
    true
}
