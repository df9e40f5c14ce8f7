//! Fuzz opening, reading, mapping and writing hostile qcow2 images.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qcow2::fuzz_image_bytes(data);
});
