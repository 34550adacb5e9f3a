//! Entry point of the `luks_header` cargo-fuzz target (not a stable API).

use super::luks::{LuksHeader, LuksLimits};

/// Most PBKDF2 iterations one fuzz input may ask for, per key derivation.
const FUZZ_ITERATIONS: u32 = 1000;

/// Treats `data` as a LUKS header area: parses it; when it parses, its canonical bytes parse
/// back to the same header, and an unlock runs twice: under a limit of 1000 iterations (most
/// headers stop at the limit), then on a copy whose counts are cut to that limit, slot by slot,
/// so that key derivation, key-material decryption, the anti-forensic merge and the digest
/// check all run on hostile values with bounded work. Nothing may panic.
pub fn luks_header(data: &[u8]) {
    let Ok(header) = LuksHeader::parse(data) else {
        return;
    };
    let canonical = header.to_bytes();
    let again = LuksHeader::parse(&canonical).expect("canonical bytes of a header parse");
    assert_eq!(
        again, header,
        "a header changes through its canonical bytes"
    );

    let limits = LuksLimits {
        max_iterations: FUZZ_ITERATIONS,
    };
    let _ = header.unlock(data, b"pw", &limits);
    let mut cut = header.clone();
    cut.master_key_iterations = cut.master_key_iterations.min(FUZZ_ITERATIONS);
    for slot in cut.slots.iter_mut() {
        slot.iterations = slot.iterations.min(FUZZ_ITERATIONS);
    }
    for index in 0..cut.slots.len() {
        if let Ok(Some(key)) = cut.unlock_slot(data, index, b"pw", &limits) {
            let mut sector = [0u8; 512];
            if let Ok(cipher) = cut.sector_cipher(&key) {
                cipher.decrypt(1, &mut sector).expect("one sector decrypts");
            }
        }
    }
}
