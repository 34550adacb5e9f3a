#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2kit::crypto::fuzz::luks_header(data));
