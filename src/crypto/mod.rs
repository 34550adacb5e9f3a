//! Encryption of qcow2 images as QEMU does it: the LUKS1 header with its key slots
//! ([`luks`]), the sector ciphers of LUKS payloads and of the legacy qcow AES scheme
//! ([`cipher`]), PBKDF2 over QEMU's hashes ([`pbkdf`]) and qemu-img's `--object secret`
//! ([`secret`]).
//!
//! Pure functions and small types over byte buffers: no I/O but for the operating system's
//! random numbers ([`os_random`]) and a secret's `file=`. Every error message is QEMU's where
//! QEMU has one, so a tool can print it after its program name.
//!
//! Unlocking a LUKS header and decrypting a sector:
//!
//! ```
//! use qcow2kit::crypto::luks::{self, KdfCost, LuksCreateOptions, LuksHeader, LuksLimits};
//!
//! let opts = LuksCreateOptions {
//!     kdf: KdfCost::Iterations { master: 1000, slot: 1000 },
//!     ..Default::default()
//! };
//! let (_, area, key) = luks::create(b"pw", &opts, &mut qcow2kit::crypto::os_random)?;
//! let header = LuksHeader::parse(&area)?;
//! let unlocked = header.unlock(&area, b"pw", &LuksLimits::default())?;
//! assert_eq!(unlocked.as_bytes(), key.as_bytes());
//! assert_eq!(
//!     header.unlock(&area, b"wrong", &LuksLimits::default()).unwrap_err().to_string(),
//!     "Invalid password, cannot unlock any keyslot"
//! );
//! let cipher = header.sector_cipher(&unlocked)?;
//! let mut sector = [0x5au8; 512];
//! cipher.encrypt(8, &mut sector)?;
//! cipher.decrypt(8, &mut sector)?;
//! assert_eq!(sector, [0x5au8; 512]);
//! # Ok::<(), qcow2kit::crypto::CryptoError>(())
//! ```

mod afsplit;
pub mod cipher;
#[doc(hidden)]
pub mod fuzz;
pub mod keyslots;
pub mod luks;
pub mod pbkdf;
pub mod secret;

pub(crate) use cipher::SECTOR_SIZE;
pub use cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher};
pub use luks::{LuksHeader, LuksLimits};
pub use pbkdf::HashAlg;

use std::io::Read;

/// What can go wrong in the encryption layer. The messages are QEMU's where it has one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A LUKS header breaks a rule of the format (QEMU's message).
    #[error("{0}")]
    Header(String),
    /// The header or the caller asks for an algorithm, mode or size qcow2kit does not offer.
    #[error("{0}")]
    Unsupported(String),
    /// No active key slot opens with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassphrase,
    /// A PBKDF2 iteration count above the caller's bound ([`LuksLimits`]).
    #[error("LUKS PBKDF2 iteration count of {what} is {iterations}, above the limit of {limit}")]
    IterationsAboveLimit {
        /// `"keyslot N"` or `"the master key digest"`.
        what: String,
        /// The count in the header.
        iterations: u32,
        /// The caller's bound.
        limit: u32,
    },
    /// A bad argument from the caller (a key of the wrong length, a buffer not a whole number
    /// of cipher blocks, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A `--object secret` that cannot be used (QEMU's message).
    #[error("{0}")]
    Secret(String),
    /// The operating system's random numbers could not be read.
    #[error("cannot read random numbers: {0}")]
    Random(#[source] std::io::Error),
}

/// A master (or slot) key: at most 64 bytes, kept on the stack, zeroed when dropped and never
/// shown by `Debug`.
#[derive(Clone)]
pub struct MasterKey {
    bytes: [u8; luks::MAX_MASTER_KEY_LEN],
    len: usize,
}

impl MasterKey {
    /// A key of `len` zero bytes (at most 64).
    pub fn zeroed(len: usize) -> Result<MasterKey, CryptoError> {
        if len == 0 || len > luks::MAX_MASTER_KEY_LEN {
            return Err(CryptoError::InvalidArgument(format!(
                "key length {len} is not within 1..={}",
                luks::MAX_MASTER_KEY_LEN
            )));
        }
        Ok(MasterKey {
            bytes: [0; luks::MAX_MASTER_KEY_LEN],
            len,
        })
    }

    /// A key holding a copy of `bytes` (1 to 64 of them).
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, CryptoError> {
        let mut k = MasterKey::zeroed(bytes.len())?;
        k.as_mut_bytes().copy_from_slice(bytes);
        Ok(k)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The key bytes, to fill.
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({} bytes)", self.len)
    }
}

/// Fills `buf` with random bytes from the operating system (`/dev/urandom`).
pub fn os_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(CryptoError::Random)
}

/// The passphrase of an encrypted image (a LUKS key slot's secret, or the legacy AES key):
/// zeroed when dropped and never shown by `Debug`. Always given explicitly by the caller: the
/// library never reads a secret from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    /// A passphrase holding `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Passphrase {
        Passphrase(bytes.into())
    }

    /// The passphrase bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// The two encryption methods of qcow2 (header field `crypt_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncryptionFormat {
    /// Legacy AES-128-CBC (`crypt_method` 1), IVs from guest sector numbers.
    Aes,
    /// LUKS1 (`crypt_method` 2): a LUKS header in the image's own clusters, IVs from host
    /// sector numbers.
    Luks,
}

impl EncryptionFormat {
    /// QEMU's name: `aes` or `luks`.
    pub fn name(self) -> &'static str {
        match self {
            EncryptionFormat::Aes => "aes",
            EncryptionFormat::Luks => "luks",
        }
    }

    /// The format QEMU names `name` (`aes`, `luks`).
    pub fn from_name(name: &str) -> Option<EncryptionFormat> {
        match name {
            "aes" => Some(EncryptionFormat::Aes),
            "luks" => Some(EncryptionFormat::Luks),
            _ => None,
        }
    }
}
