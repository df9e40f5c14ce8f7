//! Fuzz the hub's HTTP API with requests of any shape, to a hub over a repository with backups,
//! made again after each request that changed something (`hub::fuzzing`).
#![no_main]

static API: std::sync::LazyLock<hub::fuzzing::Api> =
    std::sync::LazyLock::new(|| hub::fuzzing::Api::new().unwrap_or_else(|e| panic!("the fuzzed hub: {e}")));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = API.request(data);
});
