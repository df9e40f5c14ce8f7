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
