//! Replays the `hub_api` fuzz inputs through the entry point the fuzzer calls
//! (`hub::fuzzing::api`): the hand-made seeds of `fuzz/seeds/hub_api` get the answers their
//! names say, and whatever the fuzzer kept in `fuzz/corpus/hub_api` keeps every property (no
//! 500, errors as JSON), so `cargo test` catches a regression on any input a fuzzer ever found
//! interesting.

#[path = "../../fuzz/replay.rs"]
mod replay;

/// Each seed gets the status its name says (`404_unknown_backup` a 404), and the verifications
/// of the repository's backups find them whole.
#[test]
fn every_seed_gets_the_answer_its_name_says() {
    let api = hub::fuzzing::api().unwrap();
    replay::seeds_get_the_status_their_names_say("hub_api", |name, data| {
        let outcome = api.request(data);
        if name.starts_with("200_verify") {
            // The images the hub was given are sound and hold what their checksums say.
            let ok = outcome.json.as_ref().map(|j| &j["ok"]);
            assert_eq!(ok, Some(&serde_json::json!(true)), "{name}: {:?}", outcome.json);
        }
        outcome.status
    });
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    let api = hub::fuzzing::api().unwrap();
    replay::corpus_and_cut_seeds("hub_api", 3, |data| {
        let _ = api.input(data);
    });
}
