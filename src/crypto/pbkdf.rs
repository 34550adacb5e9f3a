//! The hash algorithms QEMU's LUKS driver offers, plain digests of them, and PBKDF2-HMAC over
//! them (PKCS #5 v2.0, as LUKS1 uses it for key slots and the master-key digest).

use super::CryptoError;
use sha2::Digest;
use std::time::{Duration, Instant};

/// A hash algorithm, by QEMU's name (`QCryptoHashAlgo`): the LUKS `hash-spec`, the ESSIV hash
/// and the anti-forensic diffusion hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// MD5 (16-byte digest).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-224 (28 bytes).
    Sha224,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-384 (48 bytes).
    Sha384,
    /// SHA-512 (64 bytes).
    Sha512,
    /// RIPEMD-160 (20 bytes).
    Ripemd160,
    /// SM3 (32 bytes).
    Sm3,
}

/// Every [`HashAlg`], in QEMU's enumeration order.
pub const ALL_HASHES: [HashAlg; 8] = [
    HashAlg::Md5,
    HashAlg::Sha1,
    HashAlg::Sha224,
    HashAlg::Sha256,
    HashAlg::Sha384,
    HashAlg::Sha512,
    HashAlg::Ripemd160,
    HashAlg::Sm3,
];

/// The longest digest of any [`HashAlg`].
pub(crate) const MAX_DIGEST_LEN: usize = 64;

impl HashAlg {
    /// QEMU's name, as written in a LUKS header and accepted by `encrypt.hash-alg`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
            HashAlg::Sm3 => "sm3",
        }
    }

    /// The algorithm QEMU calls `name` (exact, case-sensitive match, as QEMU's enum lookup).
    pub fn from_name(name: &str) -> Option<HashAlg> {
        ALL_HASHES.into_iter().find(|h| h.name() == name)
    }

    /// Length of the digest in bytes.
    pub(crate) fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 | HashAlg::Sm3 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`, written to the start of `out`; returns the
    /// digest length.
    pub(crate) fn digest_into(self, parts: &[&[u8]], out: &mut [u8; MAX_DIGEST_LEN]) -> usize {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8; MAX_DIGEST_LEN]) -> usize {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let r = d.finalize();
            out[..r.len()].copy_from_slice(&r);
            r.len()
        }
        match self {
            HashAlg::Md5 => run::<md5::Md5>(parts, out),
            HashAlg::Sha1 => run::<sha1::Sha1>(parts, out),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts, out),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts, out),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts, out),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts, out),
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts, out),
            HashAlg::Sm3 => run::<sm3::Sm3>(parts, out),
        }
    }
}

/// PBKDF2-HMAC-`hash` of `password` with `salt` and `iterations` rounds, filling `out`.
///
/// Refuses 0 iterations (PKCS #5 requires at least one; QEMU's nettle backend aborts on it).
/// The caller bounds `iterations`: the work is linear in it.
pub fn pbkdf2(
    hash: HashAlg,
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    out: &mut [u8],
) -> Result<(), CryptoError> {
    if iterations == 0 {
        return Err(CryptoError::InvalidArgument(
            "PBKDF2 iteration count must be at least 1".into(),
        ));
    }
    use pbkdf2::pbkdf2_hmac;
    match hash {
        HashAlg::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, iterations, out),
        HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
        HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
        HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
        HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
        HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        HashAlg::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, iterations, out),
        HashAlg::Sm3 => pbkdf2_hmac::<sm3::Sm3>(password, salt, iterations, out),
    }
    Ok(())
}

/// How many PBKDF2 iterations of `hash` (deriving `out_len` bytes from a password of
/// `password_len` bytes and a 32-byte salt) this machine runs in one second, measured as QEMU's
/// `qcrypto_pbkdf2_count_iters` does: doubling a trial count until a trial takes at least 500 ms.
pub(crate) fn iterations_per_second(hash: HashAlg, password_len: usize, out_len: usize) -> u64 {
    let password = vec![0x55u8; password_len];
    let salt = [0xaau8; 32];
    let mut out = vec![0u8; out_len.clamp(1, MAX_DIGEST_LEN)];
    let mut trial: u32 = 1 << 10;
    loop {
        let start = Instant::now();
        // `trial` is at least 1, so this cannot fail.
        let _ = pbkdf2(hash, &password, &salt, trial, &mut out);
        let spent = start.elapsed();
        if spent >= Duration::from_millis(500) || trial >= 1 << 30 {
            let per_sec = u128::from(trial) * 1_000_000 / spent.as_micros().max(1);
            return u64::try_from(per_sec).unwrap_or(u64::MAX);
        }
        trial = trial.saturating_mul(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn rfc6070_pbkdf2_sha1_vectors() {
        let mut out = [0u8; 20];
        pbkdf2(HashAlg::Sha1, b"password", b"salt", 1, &mut out).unwrap();
        assert_eq!(hex(&out), "0c60c80f961f0e71f3a9b524af6012062fe037a6");
        pbkdf2(HashAlg::Sha1, b"password", b"salt", 4096, &mut out).unwrap();
        assert_eq!(hex(&out), "4b007901b765489abead49d926f721d065a429c1");
    }

    #[test]
    fn names_round_trip_and_digest_lengths_match() {
        let mut out = [0u8; MAX_DIGEST_LEN];
        for h in ALL_HASHES {
            assert_eq!(HashAlg::from_name(h.name()), Some(h));
            assert_eq!(h.digest_into(&[b"abc"], &mut out), h.digest_len());
        }
        assert_eq!(HashAlg::from_name("SHA256"), None);
        HashAlg::Sha256.digest_into(&[b"a", b"bc"], &mut out);
        assert_eq!(
            hex(&out[..32]),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn zero_iterations_are_refused() {
        let mut out = [0u8; 20];
        assert!(pbkdf2(HashAlg::Sha256, b"pw", b"salt", 0, &mut out).is_err());
    }
}
