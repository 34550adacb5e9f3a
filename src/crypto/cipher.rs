//! Sector ciphers: encryption of runs of 512-byte sectors in place, each sector with its own IV
//! derived from its sector number, as QEMU's `qcrypto_block_{en,de}crypt_helper` does.
//!
//! Supported: AES, Twofish and Serpent (128/192/256-bit keys) in XTS, CBC, CTR and ECB, and
//! CAST5-128 (64-bit blocks) in CBC, CTR and ECB, with the `plain`, `plain64` and
//! `essiv:<hash>` IV generators; and the legacy qcow AES-CBC scheme.

use super::pbkdf::{HashAlg, MAX_DIGEST_LEN};
use super::CryptoError;
use aes::cipher::consts::{U16, U8};
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};

/// Size of the unit each IV covers: QEMU's LUKS and qcow sector size.
pub(crate) const SECTOR_SIZE: usize = 512;

/// The largest cipher block (and IV) size: 16 bytes (CAST5's are 8).
const BLOCK: usize = 16;

/// Sectors whose IVs (and XTS first tweaks) are computed in one batch.
const IV_BATCH: usize = 16;

/// A block cipher with its key size, by QEMU's name (`QCryptoCipherAlgo`), limited to those a
/// LUKS header can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// CAST5 with a 128-bit key (64-bit blocks: no XTS).
    Cast5_128,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
}

const ALL_CIPHERS: [CipherAlg; 10] = [
    CipherAlg::Aes128,
    CipherAlg::Aes192,
    CipherAlg::Aes256,
    CipherAlg::Cast5_128,
    CipherAlg::Serpent128,
    CipherAlg::Serpent192,
    CipherAlg::Serpent256,
    CipherAlg::Twofish128,
    CipherAlg::Twofish192,
    CipherAlg::Twofish256,
];

impl CipherAlg {
    /// QEMU's name (`encrypt.cipher-alg`, `info`): `aes-256`, `twofish-128`, ...
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Cast5_128 => "cast5-128",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
        }
    }

    /// The algorithm QEMU calls `name` (as in [`CipherAlg::name`]).
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        ALL_CIPHERS.into_iter().find(|c| c.name() == name)
    }

    /// The family name a LUKS header stores (`aes`, `cast5`, `serpent`, `twofish`).
    pub(crate) fn family(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Cast5_128 => "cast5",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
        }
    }

    /// The algorithm of `family` with a `key_len`-byte key, if QEMU's LUKS driver knows it.
    pub(crate) fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        ALL_CIPHERS
            .into_iter()
            .find(|c| c.family() == family && c.key_len() == key_len)
    }

    /// Key length in bytes (of one key; XTS takes two).
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Cast5_128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }
}

/// A block cipher mode, by QEMU's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// Electronic codebook: no IV.
    Ecb,
    /// Cipher block chaining, restarted at each sector with the sector's IV.
    Cbc,
    /// XEX-based tweaked codebook with ciphertext stealing (IEEE 1619), the sector's IV as tweak.
    Xts,
    /// Counter mode, the sector's IV as initial counter (big-endian increment).
    Ctr,
}

impl CipherMode {
    /// QEMU's name: `ecb`, `cbc`, `xts`, `ctr`.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// The mode QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// How a sector's IV derives from its sector number, by QEMU's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The 64-bit sector number, little-endian, zero-padded.
    Plain64,
    /// `plain64` encrypted with a key that is the hash of the master key.
    Essiv,
}

impl IvGenAlg {
    /// QEMU's name: `plain`, `plain64`, `essiv`.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// The generator QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// A complete sector-cipher choice, as a LUKS header states it (`aes` + `xts-plain64` ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    /// The block cipher and its key size (for XTS: the size of each of the two keys).
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
    /// The hash of the ESSIV generator (ignored by the others, as QEMU and dm-crypt ignore it).
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// Length of the master key this spec takes: the cipher's key length, doubled for XTS.
    pub fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => self.alg.key_len() * 2,
            _ => self.alg.key_len(),
        }
    }

    /// The cipher ESSIV runs with: `alg`'s family with a key as long as the hash's digest
    /// (dm-crypt's rule, which QEMU follows), or QEMU's error when that family has no such key.
    pub(crate) fn essiv_cipher(&self, hash: HashAlg) -> Result<CipherAlg, CryptoError> {
        let want = hash.digest_len();
        if self.alg.key_len() == want {
            return Ok(self.alg);
        }
        let label = match self.alg.family() {
            "aes" => "AES",
            "serpent" => "Serpent",
            "twofish" => "Twofish",
            _ => {
                return Err(CryptoError::Unsupported(format!(
                    "Cipher {} not supported with essiv",
                    self.alg.name()
                )))
            }
        };
        CipherAlg::from_family(self.alg.family(), want).ok_or_else(|| {
            CryptoError::Unsupported(format!("No {label} cipher with key size {want} available"))
        })
    }
}

/// One keyed block cipher.
#[derive(Clone)]
enum BlockKey {
    Cast5(cast5::Cast5),
    Aes128(aes::Aes128),
    Aes192(aes::Aes192),
    Aes256(aes::Aes256),
    Serpent(serpent::Serpent),
    Twofish(twofish::Twofish),
}

/// Evaluates `$wide` with `$c` bound to the keyed cipher inside `$key` when it has 16-byte
/// blocks, `$narrow` when it has 8-byte blocks.
macro_rules! with_cipher {
    ($key:expr, $c:ident => $wide:expr, $narrow:expr) => {
        match $key {
            BlockKey::Cast5($c) => $narrow,
            BlockKey::Aes128($c) => $wide,
            BlockKey::Aes192($c) => $wide,
            BlockKey::Aes256($c) => $wide,
            BlockKey::Serpent($c) => $wide,
            BlockKey::Twofish($c) => $wide,
        }
    };
}

impl BlockKey {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<BlockKey, CryptoError> {
        if key.len() != alg.key_len() {
            return Err(CryptoError::InvalidArgument(format!(
                "Cipher key length {} should be {}",
                key.len(),
                alg.key_len()
            )));
        }
        let bad = |_| CryptoError::InvalidArgument(format!("Invalid key for {}", alg.name()));
        Ok(match alg {
            CipherAlg::Aes128 => BlockKey::Aes128(aes::Aes128::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes192 => BlockKey::Aes192(aes::Aes192::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes256 => BlockKey::Aes256(aes::Aes256::new_from_slice(key).map_err(bad)?),
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
                BlockKey::Serpent(serpent::Serpent::new_from_slice(key).map_err(bad)?)
            }
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
                BlockKey::Twofish(twofish::Twofish::new_from_slice(key).map_err(bad)?)
            }
            CipherAlg::Cast5_128 => {
                BlockKey::Cast5(cast5::Cast5::new_from_slice(key).map_err(bad)?)
            }
        })
    }

    /// The block size in bytes: 16, or 8 for CAST5.
    fn block_size(&self) -> usize {
        with_cipher!(self, _c => 16, 8)
    }

    /// Encrypts every block of `data` independently (`data.len()` is a multiple of the block
    /// size; the cipher crates pipeline independent blocks).
    fn encrypt_blocks(&self, data: &mut [u8]) {
        let buf = InOutBuf::from(data);
        with_cipher!(
            self,
            c => c.encrypt_blocks_inout(buf.into_chunks::<U16>().0),
            c.encrypt_blocks_inout(buf.into_chunks::<U8>().0)
        );
    }

    /// Decrypts every block of `data` independently.
    fn decrypt_blocks(&self, data: &mut [u8]) {
        let buf = InOutBuf::from(data);
        with_cipher!(
            self,
            c => c.decrypt_blocks_inout(buf.into_chunks::<U16>().0),
            c.decrypt_blocks_inout(buf.into_chunks::<U8>().0)
        );
    }
}

/// The IV generator with its key.
#[derive(Clone)]
enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<BlockKey>),
}

impl IvGen {
    /// Writes the IVs of sectors `first`, `first + 1`, ... into the 16-byte blocks of `ivs`
    /// (ESSIV encrypts them all in one pipelined call).
    // The IV formats are little-endian by definition (dm-crypt's plain/plain64).
    #[allow(clippy::little_endian_bytes)]
    fn fill(&self, first: u64, ivs: &mut [u8]) {
        for (i, iv) in ivs.chunks_exact_mut(BLOCK).enumerate() {
            let sector = first.wrapping_add(i as u64);
            iv.fill(0);
            match self {
                IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
                IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            }
        }
        if let IvGen::Essiv(key) = self {
            key.encrypt_blocks(ivs);
        }
    }
}

#[derive(Clone)]
enum Mode {
    Ecb(BlockKey),
    Cbc(BlockKey),
    Ctr(BlockKey),
    // The tweak key is used once per sector: boxed, it keeps the variants of one size.
    Xts {
        data: BlockKey,
        tweak: Box<BlockKey>,
    },
}

/// A keyed sector cipher: encrypts and decrypts runs of sectors in place.
///
/// A buffer is cut into 512-byte sectors numbered from the first sector number given; the last
/// may be shorter, a multiple of 16 bytes (LUKS key material). No call allocates.
#[derive(Clone)]
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher { .. }")
    }
}

impl SectorCipher {
    /// The cipher `spec` keyed with `key` (of [`CipherSpec::key_len`] bytes; for XTS the data
    /// key followed by the tweak key). ESSIV's key is the hash of the whole of `key`.
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<SectorCipher, CryptoError> {
        if key.len() != spec.key_len() {
            return Err(CryptoError::InvalidArgument(format!(
                "Cipher key length {} should be {}",
                key.len(),
                spec.key_len()
            )));
        }
        let mode = match spec.mode {
            CipherMode::Ecb => Mode::Ecb(BlockKey::new(spec.alg, key)?),
            CipherMode::Cbc => Mode::Cbc(BlockKey::new(spec.alg, key)?),
            CipherMode::Ctr => Mode::Ctr(BlockKey::new(spec.alg, key)?),
            CipherMode::Xts if spec.alg == CipherAlg::Cast5_128 => {
                return Err(CryptoError::Unsupported(
                    "Unsupported cipher mode xts".into(),
                ))
            }
            CipherMode::Xts => {
                let (data, tweak) = key.split_at(key.len() / 2);
                Mode::Xts {
                    data: BlockKey::new(spec.alg, data)?,
                    tweak: Box::new(BlockKey::new(spec.alg, tweak)?),
                }
            }
        };
        let ivgen = match spec.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = spec.ivgen_hash.ok_or_else(|| {
                    CryptoError::Header("Missing IV generator hash specification".into())
                })?;
                let alg = spec.essiv_cipher(hash)?;
                let mut salt = [0u8; MAX_DIGEST_LEN];
                let n = hash.digest_into(&[key], &mut salt);
                let essiv = BlockKey::new(alg, &salt[..n]);
                salt.fill(0);
                IvGen::Essiv(Box::new(essiv?))
            }
        };
        Ok(SectorCipher { mode, ivgen })
    }

    /// The legacy qcow/qcow2 scheme (`crypt_method` 1): AES-128-CBC, `plain64` IVs, the key the
    /// first 16 bytes of the passphrase, zero-padded when shorter (QEMU's `block-qcow.c`).
    pub fn legacy_qcow(passphrase: &[u8]) -> SectorCipher {
        let mut key = [0u8; 16];
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        let cipher = aes::Aes128::new(&key.into());
        key.fill(0);
        SectorCipher {
            mode: Mode::Cbc(BlockKey::Aes128(cipher)),
            ivgen: IvGen::Plain64,
        }
    }

    /// Encrypts `buf` in place, its first sector numbered `first_sector`.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.run(first_sector, buf, true)
    }

    /// Decrypts `buf` in place, its first sector numbered `first_sector`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.run(first_sector, buf, false)
    }

    fn run(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) -> Result<(), CryptoError> {
        let bs = match &self.mode {
            Mode::Ecb(k) | Mode::Cbc(k) | Mode::Ctr(k) | Mode::Xts { data: k, .. } => {
                k.block_size()
            }
        };
        if buf.len() % bs != 0 {
            return Err(CryptoError::InvalidArgument(format!(
                "Length {} must be a multiple of block size {bs}",
                buf.len()
            )));
        }
        let sectors = buf.len().div_ceil(SECTOR_SIZE) as u64;
        if first_sector.checked_add(sectors).is_none() {
            return Err(CryptoError::InvalidArgument(format!(
                "sector number {first_sector} + {sectors} overflows"
            )));
        }
        if let Mode::Ecb(key) = &self.mode {
            // No IV: the sectors need no separate treatment.
            if encrypt {
                key.encrypt_blocks(buf);
            } else {
                key.decrypt_blocks(buf);
            }
            return Ok(());
        }
        let mut scratch = [0u8; SECTOR_SIZE];
        let mut ivs = [0u8; IV_BATCH * BLOCK];
        for (g, group) in buf.chunks_mut(IV_BATCH * SECTOR_SIZE).enumerate() {
            let ivs = &mut ivs[..group.len().div_ceil(SECTOR_SIZE) * BLOCK];
            self.ivgen.fill(first_sector + (g * IV_BATCH) as u64, ivs);
            if let Mode::Xts { tweak, .. } = &self.mode {
                // The first tweak of each sector, for all sectors of the group at once.
                tweak.encrypt_blocks(ivs);
            }
            // Each IV takes a 16-byte slot; an 8-byte cipher uses the start of it.
            for (sector, slot) in group.chunks_mut(SECTOR_SIZE).zip(ivs.chunks_exact(BLOCK)) {
                let iv = &slot[..bs];
                let scratch = &mut scratch[..sector.len()];
                match (&self.mode, encrypt) {
                    (Mode::Ecb(_), _) => {}
                    (Mode::Cbc(key), true) => cbc_encrypt(key, iv, sector),
                    (Mode::Cbc(key), false) => cbc_decrypt(key, iv, sector, scratch),
                    (Mode::Ctr(key), _) => ctr_apply(key, iv, sector, scratch),
                    (Mode::Xts { data, .. }, _) => xts_apply(data, slot, sector, scratch, encrypt),
                }
            }
        }
        scratch.fill(0);
        Ok(())
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// CBC encryption of one sector with `iv` (one block long): serial by nature.
fn cbc_encrypt(key: &BlockKey, iv: &[u8], sector: &mut [u8]) {
    let bs = iv.len();
    let mut prev = [0u8; BLOCK];
    prev[..bs].copy_from_slice(iv);
    for block in sector.chunks_exact_mut(bs) {
        xor_into(block, &prev[..bs]);
        key.encrypt_blocks(block);
        prev[..bs].copy_from_slice(block);
    }
}

/// CBC decryption of one sector: all blocks at once, then each XORed with the ciphertext block
/// before it (kept in `saved`, as long as the sector).
fn cbc_decrypt(key: &BlockKey, iv: &[u8], sector: &mut [u8], saved: &mut [u8]) {
    let bs = iv.len();
    saved.copy_from_slice(sector);
    key.decrypt_blocks(sector);
    xor_into(&mut sector[..bs], iv);
    xor_into(&mut sector[bs..], &saved[..saved.len() - bs]);
}

/// CTR over one sector (its own inverse): the keystream is the encryption of the counters
/// `iv`, `iv + 1`, ... (big-endian, wrapping within the block), built in `stream`.
fn ctr_apply(key: &BlockKey, iv: &[u8], sector: &mut [u8], stream: &mut [u8]) {
    let bs = iv.len();
    let mask = u128::MAX >> (128 - 8 * bs);
    let mut counter = iv.iter().fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    for block in stream.chunks_exact_mut(bs) {
        block.copy_from_slice(&counter.to_be_bytes()[BLOCK - bs..]);
        counter = counter.wrapping_add(1) & mask;
    }
    key.encrypt_blocks(stream);
    xor_into(sector, stream);
}

/// XTS over one sector (a whole number of blocks: no ciphertext stealing is needed), given its
/// first tweak `E_tweak(iv)`: the tweaks `t * alpha^j` are built in `tweaks`, XORed in before
/// and after the block cipher runs over all blocks at once.
#[allow(clippy::little_endian_bytes)] // IEEE 1619 multiplies the tweak as a little-endian number
fn xts_apply(
    data: &BlockKey,
    first_tweak: &[u8],
    sector: &mut [u8],
    tweaks: &mut [u8],
    encrypt: bool,
) {
    let mut first = [0u8; BLOCK];
    first.copy_from_slice(first_tweak);
    let mut t = u128::from_le_bytes(first);
    for block in tweaks.chunks_exact_mut(BLOCK) {
        block.copy_from_slice(&t.to_le_bytes());
        let carry = (t >> 127) as u8;
        t = (t << 1) ^ (u128::from(carry) * 0x87);
    }
    xor_into(sector, tweaks);
    if encrypt {
        data.encrypt_blocks(sector);
    } else {
        data.decrypt_blocks(sector);
    }
    xor_into(sector, tweaks);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: Some(HashAlg::Sha256),
        }
    }

    /// IEEE 1619-2007 XTS-AES-128 vector 2 (data unit sequence number 0x3333333333) and
    /// vector 1 (all zero), sector-sized units of 32 bytes.
    #[test]
    fn ieee1619_xts_aes128_vectors() {
        let s = spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64);
        let c = SectorCipher::new(&s, &[0u8; 32]).unwrap();
        let mut buf = [0u8; 32];
        c.encrypt(0, &mut buf).unwrap();
        assert_eq!(
            buf.to_vec(),
            unhex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")
        );
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let c = SectorCipher::new(&s, &key).unwrap();
        let mut buf = [0x44u8; 32];
        c.encrypt(0x33_3333_3333, &mut buf).unwrap();
        assert_eq!(
            buf.to_vec(),
            unhex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")
        );
        c.decrypt(0x33_3333_3333, &mut buf).unwrap();
        assert_eq!(buf, [0x44u8; 32]);
    }

    /// NIST SP 800-38A F.2.1 (CBC-AES128) and F.5.1 (CTR-AES128), IV given as the sector's IV
    /// through a plain64 sector number whose little-endian bytes are the IV's first 8 bytes.
    #[test]
    fn nist_cbc_and_ctr_vectors() {
        let key = unhex("2b7e151628aed2a6abf7158809cf4f3c");
        let pt = unhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51");
        // IV 000102030405060708090a0b0c0d0e0f is not plain64-shaped, so drive the modes directly.
        let k = BlockKey::new(CipherAlg::Aes128, &key).unwrap();
        let iv: [u8; 16] = unhex("000102030405060708090a0b0c0d0e0f")
            .try_into()
            .unwrap();
        let mut buf = pt.clone();
        cbc_encrypt(&k, &iv, &mut buf);
        assert_eq!(
            buf,
            unhex("7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2")
        );
        let mut saved = [0u8; 32];
        cbc_decrypt(&k, &iv, &mut buf, &mut saved);
        assert_eq!(buf, pt);
        let ctr: [u8; 16] = unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
            .try_into()
            .unwrap();
        let mut stream = [0u8; 32];
        ctr_apply(&k, &ctr, &mut buf, &mut stream);
        assert_eq!(
            buf,
            unhex("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff")
        );
    }

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector_number() {
        for alg in [
            CipherAlg::Aes256,
            CipherAlg::Twofish128,
            CipherAlg::Serpent192,
            CipherAlg::Cast5_128,
        ] {
            for mode in [
                CipherMode::Ecb,
                CipherMode::Cbc,
                CipherMode::Xts,
                CipherMode::Ctr,
            ] {
                for ivgen in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
                    let cast5 = alg == CipherAlg::Cast5_128;
                    if cast5 && (mode == CipherMode::Xts || ivgen == IvGenAlg::Essiv) {
                        continue; // QEMU refuses these (tested below)
                    }
                    let s = spec(alg, mode, ivgen);
                    let key: Vec<u8> = (0..s.key_len() as u8).collect();
                    let c = SectorCipher::new(&s, &key).unwrap();
                    // Every sector holds the same bytes: only the IV tells them apart.
                    let plain: Vec<u8> = (0..1536u32).map(|i| ((i % 512) * 7) as u8).collect();
                    let mut buf = plain.clone();
                    c.encrypt(9, &mut buf).unwrap();
                    assert_ne!(buf, plain);
                    let mut other = plain.clone();
                    c.encrypt(10, &mut other).unwrap();
                    assert_eq!(mode == CipherMode::Ecb, other == buf, "{s:?}");
                    // Sector 10 of the first run is sector 10 of the second.
                    assert_eq!(buf[512..1024], other[..512], "{s:?}");
                    c.decrypt(9, &mut buf).unwrap();
                    assert_eq!(buf, plain, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn plain_truncates_the_sector_number_and_plain64_does_not() {
        let key = [7u8; 16];
        let plain = IvGenAlg::Plain;
        let c = SectorCipher::new(&spec(CipherAlg::Aes128, CipherMode::Cbc, plain), &key).unwrap();
        let (mut a, mut b) = ([1u8; 512], [1u8; 512]);
        c.encrypt(5, &mut a).unwrap();
        c.encrypt(5 + (1 << 32), &mut b).unwrap();
        assert_eq!(a, b);
        let p64 = IvGenAlg::Plain64;
        let c = SectorCipher::new(&spec(CipherAlg::Aes128, CipherMode::Cbc, p64), &key).unwrap();
        let (mut a, mut b) = ([1u8; 512], [1u8; 512]);
        c.encrypt(5, &mut a).unwrap();
        c.encrypt(5 + (1 << 32), &mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn bad_lengths_and_keys_are_refused() {
        let s = spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64);
        assert!(SectorCipher::new(&s, &[0u8; 16]).is_err());
        let c = SectorCipher::new(&s, &[0u8; 32]).unwrap();
        assert!(c.decrypt(0, &mut [0u8; 17]).is_err());
        assert!(c.decrypt(u64::MAX, &mut [0u8; 512]).is_err());
        let cast = spec(CipherAlg::Cast5_128, CipherMode::Xts, IvGenAlg::Plain64);
        assert_eq!(
            SectorCipher::new(&cast, &[0u8; 32])
                .unwrap_err()
                .to_string(),
            "Unsupported cipher mode xts"
        );
        let cast = spec(CipherAlg::Cast5_128, CipherMode::Cbc, IvGenAlg::Essiv);
        assert_eq!(
            SectorCipher::new(&cast, &[0u8; 16])
                .unwrap_err()
                .to_string(),
            "Cipher cast5-128 not supported with essiv"
        );
        let cast = spec(CipherAlg::Cast5_128, CipherMode::Cbc, IvGenAlg::Plain64);
        let c = SectorCipher::new(&cast, &[0u8; 16]).unwrap();
        assert!(c.decrypt(0, &mut [0u8; 24]).is_ok());
        assert!(c.decrypt(0, &mut [0u8; 20]).is_err());
    }

    #[test]
    fn essiv_picks_the_cipher_by_digest_length() {
        let s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv);
        assert_eq!(s.essiv_cipher(HashAlg::Sha256).unwrap(), CipherAlg::Aes256);
        assert_eq!(s.essiv_cipher(HashAlg::Md5).unwrap(), CipherAlg::Aes128);
        assert_eq!(
            s.essiv_cipher(HashAlg::Sha1).unwrap_err().to_string(),
            "No AES cipher with key size 20 available"
        );
    }
}
