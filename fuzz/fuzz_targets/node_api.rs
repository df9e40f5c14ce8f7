//! Fuzz the node's HTTP API with requests of any shape, to a node with two VMs, made again after
//! each input that changed something (`node::fuzzing::api`).
#![no_main]

static API: std::sync::LazyLock<node::fuzzing::api_requests::Api> =
    std::sync::LazyLock::new(|| node::fuzzing::api::api().unwrap_or_else(|e| panic!("the fuzzed node: {e}")));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = API.input(data);
});
