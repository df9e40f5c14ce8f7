//! Fuzz the hub's HTTP API with requests of any shape, to a hub over a repository with backups,
//! made again after each request that changed something (`hub::fuzzing`).
#![no_main]

static API: std::sync::LazyLock<node::fuzzing::api_requests::Api> =
    std::sync::LazyLock::new(|| hub::fuzzing::api().unwrap_or_else(|e| panic!("the fuzzed hub: {e}")));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = API.input(data);
});
