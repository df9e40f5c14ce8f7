//! Replays the `tunnel_inputs` fuzz inputs through the entry point the fuzzer calls
//! (`tunnel::fuzzing::input`): the hand-made seeds of `fuzz/seeds/tunnel_inputs` must be
//! accepted (each is a well-formed input of its kind), and whatever the fuzzer kept in
//! `fuzz/corpus/tunnel_inputs` must keep every property, so `cargo test` catches a regression on
//! any input a fuzzer ever found interesting.

use std::path::PathBuf;

fn inputs(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join("tunnel_inputs");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_is_accepted_as_its_kind() {
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 8, "only {} seeds", seeds.len());
    for kind in 0..4u8 {
        assert!(seeds.iter().any(|(_, d)| d.first() == Some(&kind)), "no seed of kind {kind}");
    }
    for (name, data) in &seeds {
        let o = tunnel::fuzzing::input(data);
        assert_eq!((o.kind, o.accepted), (data.first().copied(), true), "seed {name}");
    }
}

#[test]
fn a_key_line_with_an_option_we_do_not_know_is_refused_whatever_else_it_says() {
    let seeds = inputs("seeds");
    let (_, fenced) = seeds.iter().find(|(n, _)| n == "keys_fenced").unwrap();
    for option in ["cert-authority,", "tunnel=\"0\",", "no-portforwarding,", "principals=\"x\","] {
        let line = [&[0u8][..], option.as_bytes(), &fenced[1..]].concat();
        assert!(!tunnel::fuzzing::input(&line).accepted, "{option}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    for (_, data) in inputs("corpus") {
        tunnel::fuzzing::input(&data);
    }
    for (_, data) in inputs("seeds") {
        for cut in 0..data.len() {
            tunnel::fuzzing::input(&data[..cut]);
        }
    }
}
