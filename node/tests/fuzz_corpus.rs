//! Replays the `node_inputs` fuzz inputs through the entry point the fuzzer calls
//! (`node::fuzzing::input`): the hand-made seeds of `fuzz/seeds/node_inputs` must be accepted
//! (each is a well-formed input of its kind), and whatever the fuzzer kept in
//! `fuzz/corpus/node_inputs` must keep every property, so `cargo test` catches a regression on
//! any input a fuzzer ever found interesting.

use std::path::PathBuf;

#[path = "../../fuzz/replay.rs"]
mod replay;

use node::blockmap::{hash_block, BlockMap, BlockSet, MapDiff, ResumeMap, UNKNOWN};

/// Block and resume map files as the node writes them: a fresh disk with a short last block, one
/// with known, changed and unknown blocks, the smallest (an empty disk); a resume map whose run
/// finished blocks in both words of its set (70 blocks), and one that finished none.
fn maps() -> Vec<(&'static str, Vec<u8>)> {
    let mut changed = BlockMap::zeroed(10 << 20, 1 << 20);
    changed.hashes[2] = hash_block(b"changed");
    changed.hashes[7] = UNKNOWN;
    let mut done = BlockSet::default();
    done.insert_run(0, 3);
    done.insert_run(64, 5);
    let mut resumed = BlockMap::zeroed(70 * 4096 - 100, 4096);
    resumed.hashes[65] = hash_block(b"written");
    resumed.hashes[66] = UNKNOWN;
    vec![
        ("map_fresh_short_tail", BlockMap::zeroed(3 * 65536 + 4096, 65536).to_bytes()),
        ("map_changed_unknown", changed.to_bytes()),
        ("map_empty_disk", BlockMap::zeroed(0, 4096).to_bytes()),
        ("resume_map_two_words", ResumeMap { map: resumed, done }.to_bytes()),
        ("resume_map_none_done", ResumeMap { map: changed, done: BlockSet::default() }.to_bytes()),
    ]
}

/// The hub's block hashes of incrementals (kind 6 inputs, unsealed): two blocks changed, none.
fn diffs() -> Vec<(&'static str, Vec<u8>)> {
    let base = BlockMap::zeroed(10 << 20, 1 << 20);
    let mut changed = base.clone();
    changed.hashes[2] = hash_block(b"changed");
    changed.hashes[9] = hash_block(b"tail");
    let name = "../b-20261201T010000-f00001/disk-2000.blocks";
    [("diff_two_changed", &changed), ("diff_none_changed", &base)]
        .into_iter()
        .map(|(n, map)| {
            let file = MapDiff::between(map, &base, name).unwrap().to_bytes();
            (n, [&[6u8][..], &file[..file.len() - 32]].concat())
        })
        .collect()
}

fn as_input(file: &[u8]) -> Vec<u8> {
    [&[1u8][..], file].concat()
}

/// The same file as a kind 5 input: without its trailer, which the entry point appends.
fn as_unsealed_input(file: &[u8]) -> Vec<u8> {
    [&[5u8][..], &file[..file.len() - 32]].concat()
}

/// `NODE_WRITE_MAP_SEEDS=1` writes the block map seeds (fuzz/make_seeds.py cannot: no BLAKE3).
#[test]
fn block_maps_the_node_writes_are_accepted_and_their_seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/node_inputs");
    for (name, map) in maps() {
        let (input, unsealed) = (as_input(&map), as_unsealed_input(&map));
        let unsealed_name = format!("unsealed_{name}");
        if std::env::var_os("NODE_WRITE_MAP_SEEDS").is_some() {
            std::fs::write(dir.join(name), &input).unwrap();
            std::fs::write(dir.join(&unsealed_name), &unsealed).unwrap();
        }
        assert!(node::fuzzing::input(&input).accepted, "{name}");
        assert!(node::fuzzing::input(&unsealed).accepted, "{unsealed_name}");
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), input, "seed {name} is not what the node writes");
        assert_eq!(std::fs::read(dir.join(&unsealed_name)).unwrap(), unsealed, "seed {unsealed_name}");
        let mut damaged = input.clone();
        damaged[20] ^= 1;
        assert!(!node::fuzzing::input(&damaged).accepted, "{name} with a flipped bit");
        assert!(!node::fuzzing::input(&input[..input.len() - 1]).accepted, "{name} cut short");
        // Sealed by the entry point: a count that does not match the hashes, or a length that is
        // not the count's, is refused all the same.
        let mut miscounted = unsealed.clone();
        miscounted[25] ^= 1;
        assert!(!node::fuzzing::input(&miscounted).accepted, "{unsealed_name} with another block count");
        assert!(!node::fuzzing::input(&unsealed[..unsealed.len() - 1]).accepted, "{unsealed_name} cut short");
    }
}

#[test]
fn differences_the_hub_writes_are_accepted_and_their_seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/node_inputs");
    for (name, input) in diffs() {
        if std::env::var_os("NODE_WRITE_MAP_SEEDS").is_some() {
            std::fs::write(dir.join(name), &input).unwrap();
        }
        assert!(node::fuzzing::input(&input).accepted, "{name}");
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), input, "seed {name} is not what the hub writes");
        let mut miscounted = input.clone();
        miscounted[25] ^= 1;
        assert!(!node::fuzzing::input(&miscounted).accepted, "{name} with another block count");
        assert!(!node::fuzzing::input(&input[..input.len() - 1]).accepted, "{name} cut short");
    }
}

#[test]
fn every_seed_is_accepted_as_its_kind() {
    let seeds = replay::inputs("seeds", "node_inputs");
    assert!(seeds.len() >= 10, "only {} seeds", seeds.len());
    for kind in 0..7u8 {
        assert!(seeds.iter().any(|(_, d)| d.first() == Some(&kind)), "no seed of kind {kind}");
    }
    for (name, data) in &seeds {
        let o = node::fuzzing::input(data);
        assert_eq!((o.kind, o.accepted), (data.first().copied(), true), "seed {name}");
    }
}

#[test]
fn the_fuzzer_grown_corpus_and_cut_seeds_keep_every_property() {
    replay::corpus_and_cut_seeds("node_inputs", 1, |data| {
        let _ = node::fuzzing::input(data);
    });
}

/// The node's API (`node_api`): each seed gets the status its name says (`404_unknown_vm` a 404;
/// for a seed of several requests, its last).
#[test]
fn every_api_seed_gets_the_answer_its_name_says() {
    let api = node::fuzzing::api::api().unwrap();
    replay::seeds_get_the_status_their_names_say("node_api", |name, data| {
        let outcome = api.request(data);
        if name == "409_commit_before_the_end" {
            let error = outcome.json.as_ref().and_then(|j| j["error"].as_str()).unwrap_or_default();
            assert!(error.contains("is running, not completed"), "{name}: {error}");
        }
        outcome.status
    });
}

#[test]
fn the_api_corpus_and_cut_seeds_keep_every_property() {
    let api = node::fuzzing::api::api().unwrap();
    replay::corpus_and_cut_seeds("node_api", 3, |data| {
        let _ = api.input(data);
    });
}
