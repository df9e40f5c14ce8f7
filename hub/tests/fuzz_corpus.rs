//! Replays the `hub_api` fuzz inputs through the entry point the fuzzer calls
//! (`hub::fuzzing::Api`): the hand-made seeds of `fuzz/seeds/hub_api` get the answers their
//! names say, and whatever the fuzzer kept in `fuzz/corpus/hub_api` keeps every property (no
//! 500, errors as JSON), so `cargo test` catches a regression on any input a fuzzer ever found
//! interesting.

use hub::fuzzing::Api;

#[path = "../../fuzz/replay.rs"]
mod replay;

/// Each seed is named after the status it must get: `404_unknown_backup` gets a 404.
#[test]
fn every_seed_gets_the_answer_its_name_says() {
    let api = Api::new().unwrap();
    let seeds = replay::inputs("seeds", "hub_api");
    assert!(seeds.len() >= 10, "only {} seeds", seeds.len());
    for (name, data) in &seeds {
        let want: u16 = name.split('_').next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("seed {name}"));
        let outcome = api.request(data);
        assert_eq!(outcome.status, Some(want), "seed {name}: {:?}", outcome.json);
        if name.starts_with("200_verify") {
            // The images the hub was given are sound and hold what their checksums say.
            assert_eq!(
                outcome.json.as_ref().map(|j| &j["ok"]),
                Some(&serde_json::json!(true)),
                "{name}: {:?}",
                outcome.json
            );
        }
    }
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    let api = Api::new().unwrap();
    replay::corpus_and_cut_seeds("hub_api", 3, |data| {
        let _ = api.request(data);
    });
}
