//! Criterion micro-benchmarks of the hot paths: decoding an L2 entry, looking up a mapping
//! through the cached tables, in-place writes, and allocating writes (the cost qemu-nbd pays in
//! CPU). Run with `cargo bench -p qcow2`.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow2::layout::{self, Geometry};
use qcow2::{CreateOptions, Image, ImageOptions};

fn decode(c: &mut Criterion) {
    let g = Geometry { cluster_bits: 16, extended_l2: false, v3: true, size: 1 << 40 };
    let ge = Geometry { extended_l2: true, ..g };
    c.bench_function("map_l2_entry/standard", |b| {
        b.iter(|| layout::map_l2_entry(&g, black_box(0x8000_0000_0005_0000), 0, 7, black_box(4096)))
    });
    c.bench_function("map_l2_entry/extended", |b| {
        b.iter(|| {
            layout::map_l2_entry(&ge, black_box(0x8000_0000_0005_0000), black_box(0x0000_0004_0000_00ff), 7, 8192)
        })
    });
    let mut block = vec![0u8; 65536];
    c.bench_function("refcount_set+get/16-bit", |b| {
        b.iter(|| {
            layout::refcount_set(&mut block, 4, black_box(1234), 1);
            layout::refcount_get(&block, 4, black_box(1234))
        })
    });
}

fn image_paths(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.qcow2");
    Image::create(&path, &CreateOptions::new(8 << 30)).expect("create");
    let img = Image::open_with(&path, &ImageOptions::read_write()).expect("open");
    img.write_at(&vec![1u8; 64 << 20], 0).expect("prefill");
    c.bench_function("mapping_at/cached", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 65536 * 7) % (64 << 20);
            img.mapping_at(black_box(off))
        })
    });
    let data = vec![7u8; 65536];
    let mut g = c.benchmark_group("write");
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("in_place_64k", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 65536) % (64 << 20);
            img.write_at(&data, off).expect("write")
        })
    });
    // Allocation must hit clusters never written before: each batch gets a fresh image (made
    // outside the timed part, on tmpfs when there is one so the disk is not the subject).
    let scratch = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    };
    let allocating = |b: &mut criterion::Bencher<'_>, len: usize, within: u64| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut round = 0u64;
            while left > 0 {
                let n = left.min(2048);
                let p = scratch.path().join(format!("alloc-{round}.qcow2"));
                let _ = std::fs::remove_file(&p);
                Image::create(&p, &CreateOptions::new(1 << 30)).expect("create");
                let img = Image::open_with(&p, &ImageOptions::read_write()).expect("open");
                img.write_at(&data[..4096], (1 << 30) - 4096).expect("reserve refcounts outside the timing");
                let started = Instant::now();
                for i in 0..n {
                    img.write_at(&data[..len], i * 65536 + within).expect("write");
                }
                total += started.elapsed();
                drop(img);
                let _ = std::fs::remove_file(&p);
                left -= n;
                round += 1;
            }
            total
        })
    };
    g.bench_function("allocating_64k", |b| allocating(b, 65536, 0));
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("allocating_4k_cow", |b| allocating(b, 4096, 4096));
    g.finish();
}

criterion_group!(benches, decode, image_paths);
criterion_main!(benches);
