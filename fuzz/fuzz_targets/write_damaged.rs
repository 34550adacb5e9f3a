#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2kit::fuzzing::write_damaged(data));
