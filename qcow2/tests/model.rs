//! Property test of the write path against the simplest possible model, a byte array: random
//! geometries (cluster sizes, refcount widths, sizes that end mid-cluster or mid-sector, with and
//! without a backing file) take random writes, zeroes and discards, and after every step every byte reads
//! back as the model says. Runs without qemu; `write.rs` has qemu-img as the judge.

use proptest::prelude::*;
use qcow2::{BackingFormat, CreateOptions, Image, ImageOptions};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let len = 1u64..20_000;
    prop_oneof![
        4 => (0..size, len.clone(), 1u8..=255).prop_map(move |(o, l, b)| Op::Write { offset: o, len: l.min(size - o) as usize, byte: b }),
        1 => (0..size, len.clone()).prop_map(move |(o, l)| Op::Zero { offset: o, len: l.min(size - o) }),
        1 => (0..size, len).prop_map(move |(o, l)| Op::Discard { offset: o, len: l.min(size - o) }),
    ]
}

fn case() -> impl Strategy<Value = (u32, u32, u64, bool, Vec<Op>)> {
    (prop_oneof![Just(9u32), Just(12), Just(16)], 0u32..=6, 1u64..300_000, any::<bool>()).prop_flat_map(
        |(bits, order, size, backed)| {
            (Just(bits), Just(order), Just(size), Just(backed), prop::collection::vec(op(size), 1..25))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn every_byte_reads_back_as_the_model_says((bits, order, size, backed, ops) in case()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qcow2");
        let mut model = vec![0u8; size as usize];
        if backed {
            let base = dir.path().join("base.raw");
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
            std::fs::write(&base, &data).unwrap();
            model = data;
            Image::create(&path, &CreateOptions::overlay("base.raw", BackingFormat::Raw).cluster_bits(bits).refcount_order(order)).unwrap();
        } else {
            Image::create(&path, &CreateOptions::new(size).cluster_bits(bits).refcount_order(order)).unwrap();
        }
        let img = Image::open_with(&path, &ImageOptions::read_write()).unwrap();
        // The image holds whole 512-byte sectors, as qemu-img makes it; past a shorter backing
        // file it reads as zeroes.
        let size = img.size();
        prop_assert_eq!(size, model.len().div_ceil(512) as u64 * 512);
        model.resize(size as usize, 0);
        let cluster = 1u64 << bits;
        for op in &ops {
            match *op {
                Op::Write { offset, len, byte } => {
                    img.write_at(&vec![byte; len], offset).unwrap();
                    model[offset as usize..offset as usize + len].fill(byte);
                }
                Op::Zero { offset, len } => {
                    img.write_zeroes(offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Discard { offset, len } => {
                    img.discard(offset, len).unwrap();
                    // Whole clusters (the last one may end at the disk's end) read as zeroes;
                    // partial ones keep their data.
                    let end = offset + len;
                    let mut c = offset.div_ceil(cluster) * cluster;
                    while c < end {
                        let stop = (c + cluster).min(size);
                        if stop <= end {
                            model[c as usize..stop as usize].fill(0);
                        }
                        c += cluster;
                    }
                }
            }
            let mut got = vec![0u8; size as usize];
            img.read_at(&mut got, 0).unwrap();
            prop_assert!(got == model, "after {:?}: first difference at {:?}", op, got.iter().zip(&model).position(|(a, b)| a != b));
        }
        img.close().unwrap();
        drop(img);
        let reopened = Image::open(&path).unwrap();
        let mut got = vec![0u8; size as usize];
        reopened.read_at(&mut got, 0).unwrap();
        prop_assert!(got == model, "after reopening");
    }
}
