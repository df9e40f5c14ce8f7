//! Fuzz the server's option negotiation and, when a seed gets through GO, request validation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_server::fuzzing::session(data);
});
