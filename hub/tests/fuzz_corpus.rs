//! Replays the `hub_api` fuzz inputs through the entry point the fuzzer calls
//! (`hub::fuzzing::Api`): the hand-made seeds of `fuzz/seeds/hub_api` get the answers their
//! names say, and whatever the fuzzer kept in `fuzz/corpus/hub_api` keeps every property (no
//! 500, errors as JSON), so `cargo test` catches a regression on any input a fuzzer ever found
//! interesting.

use std::path::PathBuf;

use hub::fuzzing::Api;

fn inputs(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join("hub_api");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// Each seed is named after the status it must get: `404_unknown_backup` gets a 404.
#[test]
fn every_seed_gets_the_answer_its_name_says() {
    let api = Api::new().unwrap();
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 10, "only {} seeds", seeds.len());
    for (name, data) in &seeds {
        let want: u16 = name.split('_').next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("seed {name}"));
        assert_eq!(api.request(data).status, Some(want), "seed {name}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    let api = Api::new().unwrap();
    for (_, data) in inputs("corpus") {
        api.request(&data);
    }
    for (_, data) in inputs("seeds") {
        for cut in (0..data.len()).step_by(3) {
            api.request(&data[..cut]);
        }
    }
}
