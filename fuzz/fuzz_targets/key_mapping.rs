#![no_main]

#[path = "../entry_points/key_mapping.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::run(data));
