//! Fuzz the transmission request decoder and validation in every negotiated mode.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_server::fuzzing::request_stream(data);
});
