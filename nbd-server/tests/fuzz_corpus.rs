//! Replays the fuzz inputs through the same entry points the fuzzers call: the hand-made seeds
//! of `fuzz/seeds/*` (with assertions on how far each gets) and the minimised corpus the fuzzers
//! grew in `fuzz/corpus/*` (which must simply never panic), so `cargo test` catches a regression
//! on any input a fuzzer ever kept.

#[path = "../../fuzz/replay.rs"]
mod replay;

use replay::inputs;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let seeds = inputs("seeds", target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    seeds
}

#[test]
fn handshake_seeds_replay_and_reach_transmission() {
    let seeds = corpus("nbd_handshake");
    let mut entered = 0;
    for (name, data) in &seeds {
        let o = nbd_server::fuzzing::session(data);
        if o.entered {
            entered += 1;
            assert!(o.requests > 0, "seed {name} entered transmission but decoded no request");
        }
    }
    assert!(entered >= 4, "only {entered} of {} seeds reached transmission", seeds.len());
    let go = seeds.iter().find(|(n, _)| n == "structured_meta_go").map(|(_, d)| d).unwrap();
    let o = nbd_server::fuzzing::session(go);
    assert_eq!(o.accepted, 2, "block status and DF read are accepted once base:allocation is selected: {o:?}");
    // A server that requires TLS: only the seed that starts it reaches transmission.
    for (name, data) in &seeds {
        let o = nbd_server::fuzzing::session_requiring_tls(data);
        assert_eq!(o.entered, name == "starttls_go", "seed {name} with TLS required: {o:?}");
    }
}

#[test]
fn request_seeds_replay() {
    for (name, data) in corpus("nbd_requests") {
        let o = nbd_server::fuzzing::request_stream(&data);
        assert!(o.requests > 0, "seed {name} decoded nothing");
    }
}

#[test]
fn reply_seeds_replay() {
    for (name, data) in corpus("nbd_replies") {
        assert!(nbd_server::fuzzing::reply_stream(&data) > 0, "seed {name} decoded nothing");
    }
}

#[test]
fn the_fuzzer_grown_corpus_replays_without_panics() {
    let mut total = 0;
    for target in ["nbd_handshake", "nbd_requests", "nbd_replies"] {
        for (_, data) in inputs("corpus", target) {
            match target {
                "nbd_handshake" => drop(nbd_server::fuzzing::session(&data)),
                "nbd_requests" => drop(nbd_server::fuzzing::request_stream(&data)),
                _ => drop(nbd_server::fuzzing::reply_stream(&data)),
            }
            total += 1;
        }
    }
    assert!(total > 100, "the committed corpus has only {total} inputs");
}

#[test]
fn truncations_of_every_seed_are_harmless() {
    for target in ["nbd_handshake", "nbd_requests", "nbd_replies"] {
        for (_, data) in corpus(target) {
            for cut in 0..data.len() {
                let part = &data[..cut];
                let _ = nbd_server::fuzzing::session(part);
                let _ = nbd_server::fuzzing::request_stream(part);
                let _ = nbd_server::fuzzing::reply_stream(part);
            }
        }
    }
}

#[test]
fn certificate_subject_seeds_read_as_gnutls_writes_them_and_cuts_are_harmless() {
    // Subjects as qemu-nbd 10 printed them for the same certificates (openssl-made seeds).
    for (name, subject) in [
        ("ca.der", "CN=test CA"),
        ("server.der", "CN=localhost"),
        ("client.der", "CN=a+CN=b+O=c"),
        (
            "rich.der",
            "C=GB,ST=London,L=London,O=Example\\, Org,OU=second,CN=\\ laptop \\\"x\\\" #1\\ ,EMAIL=me@x.org,DC=example,\
             UID=u1,title=Boss,1.2.840.113549.1.9.2=#0c02756e",
        ),
    ] {
        let (_, data) = corpus("tls_subject").into_iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(nbd_server::fuzzing::certificate_subject(&data).as_deref(), Some(subject), "{name}");
        for cut in 0..data.len() {
            assert_eq!(nbd_server::fuzzing::certificate_subject(&data[..cut]), None, "{name} cut at {cut}");
        }
    }
    for (_, data) in inputs("corpus", "tls_subject") {
        let _ = nbd_server::fuzzing::certificate_subject(&data);
    }
}
