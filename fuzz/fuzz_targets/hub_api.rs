//! Fuzz the hub's HTTP API with requests of any shape, one hub for the whole run
//! (`hub::fuzzing`).
#![no_main]

static API: std::sync::LazyLock<hub::fuzzing::Api> =
    std::sync::LazyLock::new(|| hub::fuzzing::Api::new().unwrap_or_else(|e| panic!("the fuzzed hub: {e}")));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = API.request(data);
});
