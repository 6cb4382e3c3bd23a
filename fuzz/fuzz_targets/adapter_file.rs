#![no_main]

#[path = "../entry_points/adapter_file.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::run(data));
