//! Fuzz the reading of a TLS client certificate's subject into the string `--tls-authz`
//! decides on (`nbd_server::tls_authz`): any bytes, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_server::fuzzing::certificate_subject(data);
});
