//! The LUKS1 anti-forensic splitter: a key is stored as `stripes` blocks of key length, all of
//! which are needed to recover it (LUKS1 on-disk format, section "AF-Splitter").

use super::pbkdf::{HashAlg, MAX_DIGEST_LEN};
use super::CryptoError;

/// The longest key the splitter handles: the longest master key a LUKS cipher takes (XTS with
/// two 256-bit keys).
pub(crate) const MAX_KEY_LEN: usize = 64;

/// Replaces `block` by its diffusion: each digest-sized piece `j` by `H(be32(j) || piece)`,
/// the last, shorter piece by the start of its hash.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let ds = hash.digest_len();
    let mut out = [0u8; MAX_DIGEST_LEN];
    for (j, piece) in block.chunks_mut(ds).enumerate() {
        let index = (j as u32).to_be_bytes();
        hash.digest_into(&[&index, piece], &mut out);
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
    out.fill(0);
}

/// Checks the shape of a split key: `material` holds `stripes` blocks of `key_len` bytes.
fn check_shape(key_len: usize, stripes: u32, material_len: usize) -> Result<(), CryptoError> {
    let want = (key_len as u64).checked_mul(u64::from(stripes));
    if key_len == 0 || key_len > MAX_KEY_LEN || stripes == 0 || want != Some(material_len as u64) {
        return Err(CryptoError::InvalidArgument(format!(
            "split key of {material_len} bytes is not {stripes} stripes of {key_len} bytes"
        )));
    }
    Ok(())
}

/// Recovers the key (written to `key`) from its split `material` of `stripes` blocks.
pub(super) fn merge(
    hash: HashAlg,
    stripes: u32,
    material: &[u8],
    key: &mut [u8],
) -> Result<(), CryptoError> {
    let n = key.len();
    check_shape(n, stripes, material.len())?;
    let mut d = [0u8; MAX_KEY_LEN];
    let d = &mut d[..n];
    let (head, last) = material.split_at(material.len() - n);
    for stripe in head.chunks_exact(n) {
        xor(d, stripe);
        diffuse(hash, d);
    }
    for ((k, a), b) in key.iter_mut().zip(d.iter()).zip(last) {
        *k = a ^ b;
    }
    d.fill(0);
    Ok(())
}

/// Splits `key` into `material` (`stripes` blocks of the key's length), the first
/// `stripes - 1` blocks drawn from `random`.
pub(super) fn split(
    hash: HashAlg,
    stripes: u32,
    key: &[u8],
    material: &mut [u8],
    random: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
) -> Result<(), CryptoError> {
    let n = key.len();
    check_shape(n, stripes, material.len())?;
    let split_at = material.len() - n;
    let (head, last) = material.split_at_mut(split_at);
    random(head)?;
    let mut d = [0u8; MAX_KEY_LEN];
    let d = &mut d[..n];
    for stripe in head.chunks_exact(n) {
        xor(d, stripe);
        diffuse(hash, d);
    }
    for ((out, a), b) in last.iter_mut().zip(d.iter()).zip(key) {
        *out = a ^ b;
    }
    d.fill(0);
    Ok(())
}

fn xor(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_random() -> impl FnMut(&mut [u8]) -> Result<(), CryptoError> {
        let mut n = 0u8;
        move |buf| {
            for b in buf {
                n = n.wrapping_mul(31).wrapping_add(17);
                *b = n;
            }
            Ok(())
        }
    }

    #[test]
    fn split_then_merge_gives_the_key_back_for_every_hash_and_length() {
        for hash in super::super::pbkdf::ALL_HASHES {
            for len in [16usize, 24, 32, 48, 64] {
                let key: Vec<u8> = (0..len as u8).map(|b| b ^ 0x5a).collect();
                let mut material = vec![0u8; len * 10];
                split(hash, 10, &key, &mut material, &mut counter_random()).unwrap();
                let mut back = vec![0u8; len];
                merge(hash, 10, &material, &mut back).unwrap();
                assert_eq!(back, key, "{hash:?} {len}");
                // Every stripe matters.
                material[len * 3] ^= 1;
                merge(hash, 10, &material, &mut back).unwrap();
                assert_ne!(back, key);
            }
        }
    }

    #[test]
    fn one_stripe_is_the_key_itself() {
        let key = [9u8; 32];
        let mut material = [0u8; 32];
        split(HashAlg::Sha1, 1, &key, &mut material, &mut counter_random()).unwrap();
        assert_eq!(material, key);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let mut key = [0u8; 32];
        assert!(merge(HashAlg::Sha256, 0, &[], &mut key).is_err());
        assert!(merge(HashAlg::Sha256, 2, &[0u8; 63], &mut key).is_err());
        let mut long = [0u8; 65];
        assert!(merge(HashAlg::Sha256, 1, &[0u8; 65], &mut long).is_err());
    }
}
