//! Replays the `tunnel_inputs` fuzz inputs through the entry point the fuzzer calls
//! (`tunnel::fuzzing::input`): the hand-made seeds of `fuzz/seeds/tunnel_inputs` must be
//! accepted (each is a well-formed input of its kind), and whatever the fuzzer kept in
//! `fuzz/corpus/tunnel_inputs` must keep every property, so `cargo test` catches a regression on
//! any input a fuzzer ever found interesting.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn every_seed_is_accepted_as_its_kind() {
    let seeds = replay::inputs("seeds", "tunnel_inputs");
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
    let seeds = replay::inputs("seeds", "tunnel_inputs");
    let (_, fenced) = seeds.iter().find(|(n, _)| n == "keys_fenced").unwrap();
    for option in ["cert-authority,", "tunnel=\"0\",", "no-portforwarding,", "principals=\"x\","] {
        let line = [&[0u8][..], option.as_bytes(), &fenced[1..]].concat();
        assert!(!tunnel::fuzzing::input(&line).accepted, "{option}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    replay::corpus_and_cut_seeds("tunnel_inputs", 1, |data| {
        let _ = tunnel::fuzzing::input(data);
    });
}
