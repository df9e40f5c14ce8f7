//! Replays the `qcow2_image` fuzz inputs: the hand-made seeds (qemu-img images, which must
//! open) and the fuzzer-grown corpus (which must simply never panic).

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn qemu_made_seed_images_open_read_and_take_writes() {
    let seeds = replay::inputs("seeds", "qcow2_image");
    assert!(seeds.len() >= 5, "seeds missing: run fuzz/make_seeds.py");
    for (name, data) in seeds {
        // "backed" names a backing file that is not beside the copy: it must fail cleanly; the
        // hostile ones are checked below.
        if name.starts_with("hostile_") {
            continue;
        }
        let opened = qcow2::fuzz_image_bytes(&data);
        assert_eq!(opened, name != "backed", "seed {name}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_replays_without_panics() {
    let corpus = replay::inputs("corpus", "qcow2_image");
    for (_, data) in &corpus {
        let _ = qcow2::fuzz_image_bytes(data);
    }
    let mut flipped = 0;
    // And every seed with each of its first 512 bytes corrupted.
    for (_, data) in replay::inputs("seeds", "qcow2_image") {
        for at in 0..data.len().min(512) {
            let mut d = data.clone();
            d[at] ^= 0xa5;
            let _ = qcow2::fuzz_image_bytes(&d);
            flipped += 1;
        }
    }
    assert!(flipped > 1000);
}

/// Each hostile seed (a qemu-made image with one field made hostile, see fuzz/make_seeds.py) is
/// refused for writing with an error naming the field; for reading it is refused too unless the
/// field is one reading does not use (the refcount table), and then it reads exactly what the
/// unmodified image reads: no panic, no overflow, no data made up.
#[test]
fn hostile_seed_images_are_refused_with_an_error_naming_the_field() {
    let seeds = replay::inputs("seeds", "qcow2_image");
    let hostile: Vec<_> = seeds.iter().filter(|(n, _)| n.starts_with("hostile_")).collect();
    assert_eq!(hostile.len(), 3, "seeds missing: run fuzz/make_seeds.py");
    let dir = tempfile::tempdir().unwrap();
    let contents = |path: &std::path::Path| -> Result<Vec<u8>, qcow2::Error> {
        let img = qcow2::Image::open(path)?;
        let mut buf = vec![0u8; img.size() as usize];
        img.read_at(&mut buf, 0)?;
        Ok(buf)
    };
    let default = dir.path().join("default");
    std::fs::write(&default, &seeds.iter().find(|(n, _)| n == "default").unwrap().1).unwrap();
    let want = contents(&default).unwrap();
    for (name, data) in hostile {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        let field = match name.as_str() {
            "hostile_refcount_offset" => "refcount_table_offset",
            "hostile_l1_offset" => "l1_table_offset",
            _ => "L1 entry 0",
        };
        let err = qcow2::Image::open_with(&path, &qcow2::ImageOptions::read_write())
            .err()
            .unwrap_or_else(|| panic!("{name}: opened for writing"));
        assert!(err.to_string().contains(field), "{name}: {err}");
        match contents(&path) {
            Err(e) => assert!(e.to_string().contains(field), "{name}: {e}"),
            Ok(got) => {
                assert_eq!(field, "refcount_table_offset", "{name} read without an error");
                assert!(got == want, "{name}: reads differ from the unmodified image");
            }
        }
    }
}
