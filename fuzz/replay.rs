//! The fuzz inputs a crate's `tests/fuzz_corpus.rs` replays, read one way for all of them: this
//! file is included by path (`#[path = "../../fuzz/replay.rs"] mod replay;`), since the tests of
//! five crates need it and none of those crates is the place for it.

use std::path::PathBuf;

/// The inputs of `fuzz/<kind>/<target>` (`kind`: `seeds`, hand-made; `corpus`, what the fuzzer
/// kept), by file name, sorted.
pub fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// Every input the fuzzer kept, then every seed cut at every `step`-th length, through `run`
/// (which asserts what it must).
#[allow(dead_code)]
pub fn corpus_and_cut_seeds(target: &str, step: usize, mut run: impl FnMut(&[u8])) {
    for (_, data) in inputs("corpus", target) {
        run(&data);
    }
    for (_, data) in inputs("seeds", target) {
        for cut in (0..data.len()).step_by(step) {
            run(&data[..cut]);
        }
    }
}

/// Each seed of an API target (`hub_api`, `node_api`) is named after the status its last request
/// must get (`404_unknown_backup` a 404): `send` sends a seed and returns that status, given the
/// seed's name to check more of the answer where the name says so.
#[allow(dead_code)]
pub fn seeds_get_the_status_their_names_say(target: &str, mut send: impl FnMut(&str, &[u8]) -> Option<u16>) {
    let seeds = inputs("seeds", target);
    assert!(seeds.len() >= 10, "only {} seeds", seeds.len());
    for (name, data) in &seeds {
        let want: u16 = name.split('_').next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("seed {name}"));
        assert_eq!(send(name, data), Some(want), "seed {name}");
    }
}
