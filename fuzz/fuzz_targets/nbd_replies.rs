//! Fuzz the client's reply parsing: reply headers, chunk judgement against the request
//! (`proto::reply`), data placement, holes, errors, block status, info items, META_CONTEXT.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_server::fuzzing::reply_stream(data);
});
