//! Fuzz the client's reply parsing (reply headers, block status, info items).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_server::fuzzing::reply_stream(data);
});
