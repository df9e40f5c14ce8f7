//! Fuzz what reaches the node from outside: `nbd_targets` lists, block map files, `--vm`
//! declarations, sizes and rates (`node::fuzzing`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = node::fuzzing::input(data);
});
