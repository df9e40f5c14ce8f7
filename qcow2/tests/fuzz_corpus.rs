//! Replays the `qcow2_image` fuzz inputs: the hand-made seeds (qemu-img images, which must
//! open) and the fuzzer-grown corpus (which must simply never panic).

use std::path::PathBuf;

fn inputs(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join("qcow2_image");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn qemu_made_seed_images_open_read_and_take_writes() {
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 5, "seeds missing: run fuzz/make_seeds.py");
    for (name, data) in seeds {
        // "backed" names a backing file that is not beside the copy: it must fail cleanly.
        let opened = qcow2::fuzz_image_bytes(&data);
        assert_eq!(opened, name != "backed", "seed {name}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_replays_without_panics() {
    let corpus = inputs("corpus");
    for (_, data) in &corpus {
        let _ = qcow2::fuzz_image_bytes(data);
    }
    let mut flipped = 0;
    // And every seed with each of its first 512 bytes corrupted.
    for (_, data) in inputs("seeds") {
        for at in 0..data.len().min(512) {
            let mut d = data.clone();
            d[at] ^= 0xa5;
            let _ = qcow2::fuzz_image_bytes(&d);
            flipped += 1;
        }
    }
    assert!(flipped > 1000);
}
