//! Fuzz the tunnel's configuration parsers: the endpoint's authorized_keys and the forward
//! specifications (`tunnel::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tunnel::fuzzing::input(data);
});
