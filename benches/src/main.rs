//! Benchmark harness (filled in below).
fn main() {}
