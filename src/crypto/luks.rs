//! The LUKS1 header (the payload header a qcow2 full-disk-encryption extension points at): its
//! validation as QEMU's `crypto/block-luks.c` does it, key-slot unlocking, and creation with
//! the layout QEMU writes.
//!
//! Every function takes the header *area*: the bytes from the start of the LUKS header to the
//! end of the region its key material may use (in a qcow2 image, the clusters the extension
//! names). Nothing is read outside it, and the work of an unlock is bounded by the area and by
//! the caller's [`LuksLimits`].

use super::afsplit::{self, MAX_KEY_LEN};
use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher, SECTOR_SIZE};
use super::pbkdf::{self, HashAlg};
use super::{CryptoError, MasterKey};
use std::time::Duration;

/// The LUKS magic: `LUKS\xba\xbe`.
pub(crate) const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Length of the fixed header (fields and eight key-slot descriptors).
pub(crate) const HEADER_LEN: usize = 592;
/// Number of key slots.
pub(crate) const NUM_KEY_SLOTS: usize = 8;
/// Length of the PBKDF2 salts.
pub(crate) const SALT_LEN: usize = 32;
/// Length of the master-key digest.
pub(crate) const DIGEST_LEN: usize = 20;
/// Anti-forensic stripes QEMU (and cryptsetup) give each key slot.
pub(crate) const STRIPES: u32 = 4000;
/// Fewest PBKDF2 iterations QEMU writes for a key slot or the master-key digest.
pub(crate) const MIN_ITERATIONS: u32 = 1000;
/// Where QEMU puts the first key slot's material, in bytes.
const KEY_SLOT_OFFSET: u64 = 4096;
/// Sectors of the header region that key material is aligned to (4096 / 512).
const HEADER_SECTORS: u64 = KEY_SLOT_OFFSET / SECTOR_SIZE as u64;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const UUID_LEN: usize = 40;

/// One key-slot descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key (`0x00AC71F3`) or not (`0x0000DEAD`).
    pub active: bool,
    /// PBKDF2 iterations deriving the slot key from the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First 512-byte sector of the slot's key material, from the start of the header.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes of the key material.
    pub stripes: u32,
}

/// A parsed, validated LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// The payload cipher (and the key-material cipher).
    pub cipher: CipherSpec,
    /// The hash of PBKDF2 and of the anti-forensic splitter.
    pub hash: HashAlg,
    /// Where the payload starts, in 512-byte sectors (in qcow2: the size of the header area).
    pub payload_offset_sector: u32,
    /// Length of the master key in bytes.
    pub master_key_len: u32,
    /// PBKDF2 digest of the master key, to recognise it.
    pub master_key_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub master_key_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub master_key_iterations: u32,
    /// The volume UUID as stored (ASCII, NUL-padded).
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: [KeySlot; NUM_KEY_SLOTS],
}

/// Bounds a caller puts on the work an unlock may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksLimits {
    /// Most PBKDF2 iterations accepted for a key slot or the master-key digest; an unlock that
    /// would need more is refused before any work.
    pub max_iterations: u32,
}

/// Default for [`LuksLimits::max_iterations`]: 100 million, about ten times what `qemu-img
/// create` writes with its default `iter-time` of 2 s on a current x86-64 core (SHA-256).
pub(crate) const DEFAULT_MAX_ITERATIONS: u32 = 100_000_000;

impl Default for LuksLimits {
    fn default() -> Self {
        LuksLimits {
            max_iterations: DEFAULT_MAX_ITERATIONS,
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

/// The NUL-terminated name in a 32-byte field, or QEMU's error naming the field.
fn name_field<'a>(field: &'a [u8], what: &str) -> Result<&'a str, CryptoError> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| CryptoError::Header(format!("LUKS header {what} is not NUL terminated")))?;
    // A name that is not UTF-8 cannot match any algorithm; show it lossily in the error.
    Ok(std::str::from_utf8(&field[..end]).unwrap_or("\u{fffd}"))
}

/// Sectors of key material a slot with `stripes` stripes of `key_len` bytes occupies, aligned
/// as cryptsetup and QEMU align it (to 4096 bytes). Exact: no overflow for 32-bit inputs.
fn material_sectors(key_len: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_len) * u64::from(stripes);
    bytes.div_ceil(SECTOR_SIZE as u64).div_ceil(HEADER_SECTORS) * HEADER_SECTORS
}

impl LuksHeader {
    /// Parses and validates the header at the start of `area`, in QEMU's order and with its
    /// messages (`qcrypto_block_luks_check_header`, `..._parse_header`). Needs no key; bounds
    /// on unlocking work are checked by [`LuksHeader::unlock`].
    pub fn parse(area: &[u8]) -> Result<LuksHeader, CryptoError> {
        let b = area.get(..HEADER_LEN).ok_or_else(|| {
            CryptoError::Header(format!(
                "LUKS header needs {HEADER_LEN} bytes, the area has {}",
                area.len()
            ))
        })?;
        if b[..6] != MAGIC {
            return Err(CryptoError::Header("Volume is not in LUKS format".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(CryptoError::Header(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let cipher_name = name_field(&b[8..40], "cipher name")?;
        let cipher_mode = name_field(&b[40..72], "cipher mode")?;
        let hash_spec = name_field(&b[72..104], "hash spec")?;
        let payload_offset_sector = be32(b, 104);
        let master_key_len = be32(b, 108);
        let mut slots = [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset_sector: 0,
            stripes: 0,
        }; NUM_KEY_SLOTS];
        for (i, slot) in slots.iter_mut().enumerate() {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            slot.iterations = be32(s, 4);
            slot.salt.copy_from_slice(&s[8..40]);
            slot.key_offset_sector = be32(s, 40);
            slot.stripes = be32(s, 44);
            slot.active = be32(s, 0) == SLOT_ENABLED;
        }
        check_layout(b, payload_offset_sector, master_key_len, &slots)?;
        let (cipher, hash) = parse_names(cipher_name, cipher_mode, hash_spec, master_key_len)?;
        let mut h = LuksHeader {
            cipher,
            hash,
            payload_offset_sector,
            master_key_len,
            master_key_digest: [0; DIGEST_LEN],
            master_key_salt: [0; SALT_LEN],
            master_key_iterations: be32(b, 164),
            uuid: [0; UUID_LEN],
            slots,
        };
        h.master_key_digest.copy_from_slice(&b[112..132]);
        h.master_key_salt.copy_from_slice(&b[132..164]);
        h.uuid.copy_from_slice(&b[168..208]);
        Ok(h)
    }

    /// The header's 592 bytes as QEMU writes them (big-endian fields, NUL-padded names).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_name(&mut b[8..40], self.cipher.alg.family());
        put_name(&mut b[40..72], &mode_spec(&self.cipher));
        put_name(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.master_key_len.to_be_bytes());
        b[112..132].copy_from_slice(&self.master_key_digest);
        b[132..164].copy_from_slice(&self.master_key_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let s = &mut b[208 + i * 48..208 + (i + 1) * 48];
            let state = if slot.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            s[..4].copy_from_slice(&state.to_be_bytes());
            s[4..8].copy_from_slice(&slot.iterations.to_be_bytes());
            s[8..40].copy_from_slice(&slot.salt);
            s[40..44].copy_from_slice(&slot.key_offset_sector.to_be_bytes());
            s[44..48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        b
    }

    /// Where the payload starts, in bytes from the start of the header.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR_SIZE as u64
    }

    /// The UUID as text (the stored bytes up to the first NUL).
    pub fn uuid_str(&self) -> String {
        let end = self.uuid.iter().position(|&b| b == 0).unwrap_or(UUID_LEN);
        String::from_utf8_lossy(&self.uuid[..end]).into_owned()
    }

    /// Byte range of slot `index`'s key material inside the area.
    pub(crate) fn material_range(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let slot = self.slots.get(index)?;
        let start = u64::from(slot.key_offset_sector) * SECTOR_SIZE as u64;
        let len = u64::from(self.master_key_len) * u64::from(slot.stripes);
        let end = start.checked_add(len)?;
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// Unlocks the master key with `passphrase`, trying each active key slot in order as QEMU
    /// does; "Invalid password, cannot unlock any keyslot" when none opens.
    ///
    /// Refused before any PBKDF2 work: a master-key digest with more iterations than `limits`
    /// allows; before a slot's work: a slot with more, or key material outside `area`.
    pub fn unlock(
        &self,
        area: &[u8],
        passphrase: &[u8],
        limits: &LuksLimits,
    ) -> Result<MasterKey, CryptoError> {
        check_iterations("the master key digest", self.master_key_iterations, limits)?;
        for index in 0..NUM_KEY_SLOTS {
            if let Some(key) = self.unlock_slot(area, index, passphrase, limits)? {
                return Ok(key);
            }
        }
        Err(CryptoError::WrongPassphrase)
    }

    /// Tries key slot `index` alone: `None` when it is inactive or `passphrase` does not open
    /// it; an error when it breaks `limits` or its material lies outside `area`.
    pub(crate) fn unlock_slot(
        &self,
        area: &[u8],
        index: usize,
        passphrase: &[u8],
        limits: &LuksLimits,
    ) -> Result<Option<MasterKey>, CryptoError> {
        let slot = self
            .slots
            .get(index)
            .ok_or_else(|| CryptoError::InvalidArgument(format!("Invalid keyslot {index}")))?;
        if !slot.active {
            return Ok(None);
        }
        check_iterations("the master key digest", self.master_key_iterations, limits)?;
        check_iterations(&format!("keyslot {index}"), slot.iterations, limits)?;
        let range = self.material_range(index);
        let material = range.and_then(|r| area.get(r)).ok_or_else(|| {
            CryptoError::Header(format!(
                "Keyslot {index} key material lies outside the LUKS header area of {} bytes",
                area.len()
            ))
        })?;
        let n = self.master_key_len as usize;
        let mut slot_key = MasterKey::zeroed(n)?;
        pbkdf::pbkdf2(
            self.hash,
            passphrase,
            &slot.salt,
            slot.iterations,
            slot_key.as_mut_bytes(),
        )?;
        let mut split = material.to_vec();
        let result = self.open_split(&slot_key, slot.stripes, &mut split);
        split.fill(0);
        result
    }

    /// Decrypts key material `split` with `slot_key`, merges it and checks the master-key
    /// digest.
    fn open_split(
        &self,
        slot_key: &MasterKey,
        stripes: u32,
        split: &mut [u8],
    ) -> Result<Option<MasterKey>, CryptoError> {
        SectorCipher::new(&self.cipher, slot_key.as_bytes())?.decrypt(0, split)?;
        let mut candidate = MasterKey::zeroed(self.master_key_len as usize)?;
        afsplit::merge(self.hash, stripes, split, candidate.as_mut_bytes())?;
        if self.digest_matches(&candidate)? {
            Ok(Some(candidate))
        } else {
            Ok(None)
        }
    }

    /// Whether `key` has the header's master-key digest (compared without early exit).
    pub(crate) fn digest_matches(&self, key: &MasterKey) -> Result<bool, CryptoError> {
        let mut digest = [0u8; DIGEST_LEN];
        pbkdf::pbkdf2(
            self.hash,
            key.as_bytes(),
            &self.master_key_salt,
            self.master_key_iterations,
            &mut digest,
        )?;
        let diff = digest
            .iter()
            .zip(&self.master_key_digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        Ok(diff == 0)
    }

    /// The payload cipher keyed with the master key.
    pub fn sector_cipher(&self, key: &MasterKey) -> Result<SectorCipher, CryptoError> {
        SectorCipher::new(&self.cipher, key.as_bytes())
    }

    /// Stores `master_key` in slot `index` under `passphrase` with `iterations` PBKDF2 rounds:
    /// a fresh salt and split material from `random`, the material encrypted into `area`, the
    /// slot marked active (QEMU's `qcrypto_block_luks_store_key`). The caller writes the area
    /// and then the header ([`LuksHeader::to_bytes`]) back.
    pub fn store_key(
        &mut self,
        area: &mut [u8],
        index: usize,
        passphrase: &[u8],
        master_key: &MasterKey,
        iterations: u32,
        random: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        if master_key.as_bytes().len() != self.master_key_len as usize {
            return Err(CryptoError::InvalidArgument(format!(
                "master key of {} bytes, header wants {}",
                master_key.as_bytes().len(),
                self.master_key_len
            )));
        }
        let range = self.material_range(index).filter(|r| r.end <= area.len());
        let range = range.ok_or_else(|| {
            CryptoError::InvalidArgument(format!(
                "Keyslot {index} key material lies outside the LUKS header area"
            ))
        })?;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let mut slot_key = MasterKey::zeroed(master_key.as_bytes().len())?;
        pbkdf::pbkdf2(
            self.hash,
            passphrase,
            &salt,
            iterations,
            slot_key.as_mut_bytes(),
        )?;
        let stripes = self.slots[index].stripes;
        let material = &mut area[range];
        afsplit::split(self.hash, stripes, master_key.as_bytes(), material, random)?;
        SectorCipher::new(&self.cipher, slot_key.as_bytes())?.encrypt(0, material)?;
        let slot = &mut self.slots[index];
        slot.salt = salt;
        slot.iterations = iterations;
        slot.active = true;
        Ok(())
    }
}

impl LuksHeader {
    /// Deactivates slot `index` (QEMU's `qcrypto_block_luks_erase_key`): salt zeroed,
    /// iterations 0, state disabled, and its key material in `area` overwritten with bytes from
    /// `random`. QEMU writes the header first, then [`ERASE_PASSES`] random passes over the
    /// material, each to disk; a caller mirroring it calls this once per pass after the header.
    pub(crate) fn erase_key(
        &mut self,
        area: &mut [u8],
        index: usize,
        random: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        let range = self.material_range(index).filter(|r| r.end <= area.len());
        let range = range.ok_or_else(|| {
            CryptoError::InvalidArgument(format!(
                "Keyslot {index} key material lies outside the LUKS header area"
            ))
        })?;
        let slot = &mut self.slots[index];
        slot.salt = [0; SALT_LEN];
        slot.iterations = 0;
        slot.active = false;
        random(&mut area[range])
    }
}

/// Random passes QEMU writes over the key material of a slot it erases.
pub const ERASE_PASSES: usize = 40;

fn check_iterations(what: &str, iterations: u32, limits: &LuksLimits) -> Result<(), CryptoError> {
    if iterations == 0 {
        return Err(CryptoError::Header(format!(
            "LUKS PBKDF2 iteration count of {what} is 0"
        )));
    }
    if iterations > limits.max_iterations {
        return Err(CryptoError::IterationsAboveLimit {
            what: what.to_string(),
            iterations,
            limit: limits.max_iterations,
        });
    }
    Ok(())
}

/// The rest of QEMU's `qcrypto_block_luks_check_header`: the payload after the fixed header
/// region, a master-key iteration count, and for each slot (active or not) 4000 stripes, a
/// valid state, an iteration count when active, and material after the header, before the
/// payload and apart from every other slot's. In 64-bit arithmetic, so no hostile value wraps.
fn check_layout(
    b: &[u8],
    payload_offset_sector: u32,
    key_len: u32,
    slots: &[KeySlot; NUM_KEY_SLOTS],
) -> Result<(), CryptoError> {
    let payload = u64::from(payload_offset_sector);
    if payload < HEADER_SECTORS {
        return Err(CryptoError::Header(
            "LUKS payload is overlapping with the header".into(),
        ));
    }
    if be32(b, 164) == 0 {
        return Err(CryptoError::Header(
            "LUKS key iteration count is zero".into(),
        ));
    }
    for (i, s1) in slots.iter().enumerate() {
        let raw_state = be32(b, 208 + i * 48);
        let start1 = u64::from(s1.key_offset_sector);
        let len1 = material_sectors(key_len, s1.stripes);
        if s1.stripes != STRIPES {
            // QEMU prints the count as a signed int.
            return Err(CryptoError::Header(format!(
                "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                s1.stripes as i32
            )));
        }
        if raw_state != SLOT_ENABLED && raw_state != SLOT_DISABLED {
            return Err(CryptoError::Header(format!(
                "Keyslot {i} state (active/disable) is corrupted"
            )));
        }
        if s1.active && s1.iterations == 0 {
            return Err(CryptoError::Header(format!(
                "Keyslot {i} iteration count is zero"
            )));
        }
        if start1 < HEADER_SECTORS {
            return Err(CryptoError::Header(format!(
                "Keyslot {i} is overlapping with the LUKS header"
            )));
        }
        if start1 + len1 > payload {
            return Err(CryptoError::Header(format!(
                "Keyslot {i} is overlapping with the encrypted payload"
            )));
        }
        for (j, s2) in slots.iter().enumerate().skip(i + 1) {
            let start2 = u64::from(s2.key_offset_sector);
            let len2 = material_sectors(key_len, s2.stripes);
            if start1 + len1 > start2 && start2 + len2 > start1 {
                return Err(CryptoError::Header(format!(
                    "Keyslots {i} and {j} are overlapping in the header"
                )));
            }
        }
    }
    Ok(())
}

/// QEMU's `qcrypto_block_luks_parse_header`: the mode string `<mode>-<ivgen>[:<hash>]`, the
/// cipher family with the key length, the hash; in QEMU's order, with its messages.
fn parse_names(
    cipher_name: &str,
    cipher_mode: &str,
    hash_spec: &str,
    master_key_len: u32,
) -> Result<(CipherSpec, HashAlg), CryptoError> {
    let unsupported = |s: String| CryptoError::Unsupported(s);
    let (mode_name, ivgen_part) = cipher_mode.split_once('-').ok_or_else(|| {
        CryptoError::Header(format!(
            "Unexpected cipher mode string format '{cipher_mode}'"
        ))
    })?;
    let (ivgen_name, ivhash_name) = match ivgen_part.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (ivgen_part, None),
    };
    let ivgen_hash = match ivhash_name {
        Some(h) => Some(
            HashAlg::from_name(h)
                .ok_or_else(|| unsupported(format!("Hash algorithm '{h}' not supported")))?,
        ),
        None => None,
    };
    let mode = CipherMode::from_name(mode_name)
        .ok_or_else(|| unsupported(format!("Cipher mode '{mode_name}' not supported")))?;
    let mut key_bytes = master_key_len;
    if mode == CipherMode::Xts {
        key_bytes /= 2;
    }
    let alg = CipherAlg::from_family(cipher_name, key_bytes as usize).ok_or_else(|| {
        unsupported(format!(
            "Algorithm '{cipher_name}' with key size {key_bytes} bytes not supported"
        ))
    })?;
    let hash = HashAlg::from_name(hash_spec)
        .ok_or_else(|| unsupported(format!("Hash algorithm '{hash_spec}' not supported")))?;
    let ivgen = IvGenAlg::from_name(ivgen_name)
        .ok_or_else(|| unsupported(format!("IV generator '{ivgen_name}' not supported")))?;
    let spec = CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash,
    };
    if ivgen == IvGenAlg::Essiv {
        let h = ivgen_hash
            .ok_or_else(|| CryptoError::Header("Missing IV generator hash specification".into()))?;
        spec.essiv_cipher(h)?;
    }
    // An odd XTS key length passes QEMU's lookup (it halves it) but no cipher takes it.
    if spec.key_len() != master_key_len as usize {
        return Err(unsupported(format!(
            "Cipher key length {master_key_len} should be {}",
            spec.key_len()
        )));
    }
    Ok((spec, hash))
}

fn put_name(field: &mut [u8], name: &str) {
    // Names are short constants; one byte stays NUL.
    let n = name.len().min(field.len() - 1);
    field[..n].copy_from_slice(&name.as_bytes()[..n]);
}

/// The mode string QEMU writes: `<mode>-<ivgen>`, with `:<hash>` when an IV hash is set.
pub(crate) fn mode_spec(spec: &CipherSpec) -> String {
    match spec.ivgen_hash {
        Some(h) => format!("{}-{}:{}", spec.mode.name(), spec.ivgen.name(), h.name()),
        None => format!("{}-{}", spec.mode.name(), spec.ivgen.name()),
    }
}

/// How much PBKDF2 work a new header asks of an unlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfCost {
    /// As `qemu-img`'s `encrypt.iter-time`: iterations measured on this machine to take this
    /// long for the key slot, an eighth of that for the master-key digest (at least 1000 each).
    IterTime(Duration),
    /// Fixed counts (each at least 1).
    Iterations {
        /// For the master-key digest.
        master: u32,
        /// For the key slot.
        slot: u32,
    },
}

/// What a new LUKS header uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// The payload cipher; an `essiv` generator without a hash gets sha256, as in QEMU.
    pub cipher: CipherSpec,
    /// PBKDF2 and anti-forensic hash.
    pub hash: HashAlg,
    /// PBKDF2 work.
    pub kdf: KdfCost,
}

impl Default for LuksCreateOptions {
    /// QEMU's defaults: aes-256 xts-plain64, sha256, 2 s of PBKDF2.
    fn default() -> Self {
        LuksCreateOptions {
            cipher: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha256,
            kdf: KdfCost::IterTime(Duration::from_millis(2000)),
        }
    }
}

/// A new header area: the header, eight slots laid out as QEMU lays them (key material from
/// 4096 bytes on, 4000 stripes each, 4096-byte aligned), slot 0 holding a random master key
/// under `passphrase`; returned with that master key. The area is `payload_offset()` bytes
/// long, zero where no key material was written. `random` supplies every random byte (master
/// key, salts, UUID, anti-forensic stripes).
pub fn create(
    passphrase: &[u8],
    opts: &LuksCreateOptions,
    random: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
) -> Result<(LuksHeader, Vec<u8>, MasterKey), CryptoError> {
    let mut cipher = opts.cipher;
    if cipher.ivgen == IvGenAlg::Essiv && cipher.ivgen_hash.is_none() {
        cipher.ivgen_hash = Some(HashAlg::Sha256);
    }
    if let (IvGenAlg::Essiv, Some(h)) = (cipher.ivgen, cipher.ivgen_hash) {
        cipher.essiv_cipher(h)?;
    }
    let key_len = cipher.key_len();
    if (key_len * STRIPES as usize) % SECTOR_SIZE != 0 {
        // QEMU processes key material in whole sectors and aborts on such a header.
        return Err(CryptoError::Unsupported(format!(
            "Cipher {} in mode {} has a {key_len}-byte key, whose key material QEMU cannot use",
            cipher.alg.name(),
            cipher.mode.name()
        )));
    }
    let mut master = MasterKey::zeroed(key_len)?;
    random(master.as_mut_bytes())?;
    // Checks that the cipher exists and takes this key before any slow work.
    SectorCipher::new(&cipher, master.as_bytes())?;
    let (master_iters, slot_iters) = match opts.kdf {
        KdfCost::Iterations { master, slot } => (master, slot),
        KdfCost::IterTime(t) => {
            let ms = t.as_millis();
            let scaled = |out_len: usize, divisor: u128| {
                timed_iterations(opts.hash, passphrase.len(), out_len, ms, divisor)
            };
            // As QEMU: the digest gets an eighth of the time, measured for its 20 bytes; the
            // slot all of it, measured for a key-length output.
            (scaled(DIGEST_LEN, 8)?, scaled(key_len, 1)?)
        }
    };
    let key_len32 = key_len as u32;
    let per_slot = material_sectors(key_len32, STRIPES);
    let payload = HEADER_SECTORS + NUM_KEY_SLOTS as u64 * per_slot;
    let mut header = LuksHeader {
        cipher,
        hash: opts.hash,
        payload_offset_sector: payload as u32,
        master_key_len: key_len32,
        master_key_digest: [0; DIGEST_LEN],
        master_key_salt: [0; SALT_LEN],
        master_key_iterations: master_iters,
        uuid: [0; UUID_LEN],
        slots: [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset_sector: 0,
            stripes: STRIPES,
        }; NUM_KEY_SLOTS],
    };
    for (i, slot) in header.slots.iter_mut().enumerate() {
        slot.key_offset_sector = (HEADER_SECTORS + i as u64 * per_slot) as u32;
    }
    random(&mut header.master_key_salt)?;
    let mut uuid = [0u8; 16];
    random(&mut uuid)?;
    header.uuid[..36].copy_from_slice(format_uuid_v4(uuid).as_bytes());
    pbkdf::pbkdf2(
        opts.hash,
        master.as_bytes(),
        &header.master_key_salt,
        master_iters,
        &mut header.master_key_digest,
    )?;
    let mut area = vec![0u8; header.payload_offset() as usize];
    header.store_key(&mut area, 0, passphrase, &master, slot_iters, random)?;
    area[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok((header, area, master))
}

/// PBKDF2 iterations that take about `ms / divisor` milliseconds on this machine for a
/// passphrase of `password_len` bytes and an output of `out_len` bytes (at least
/// [`MIN_ITERATIONS`]), rounded as QEMU rounds them.
pub(crate) fn timed_iterations(
    hash: HashAlg,
    password_len: usize,
    out_len: usize,
    ms: u128,
    divisor: u128,
) -> Result<u32, CryptoError> {
    let per_sec = pbkdf::iterations_per_second(hash, password_len, out_len);
    let want = u128::from(per_sec) * ms / 1000 / divisor;
    u32::try_from(want)
        .map(|n| n.max(MIN_ITERATIONS))
        .map_err(|_| {
            CryptoError::InvalidArgument(format!(
                "PBKDF iterations {want} larger than {}",
                u32::MAX
            ))
        })
}

/// A random (version 4) UUID in the lower-case text form QEMU stores.
fn format_uuid_v4(mut u: [u8; 16]) -> String {
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

/// The longest master key a LUKS header can hold.
pub(crate) const MAX_MASTER_KEY_LEN: usize = MAX_KEY_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_random() -> impl FnMut(&mut [u8]) -> Result<(), CryptoError> {
        let mut n = 1u32;
        move |buf| {
            for b in buf {
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (n >> 16) as u8;
            }
            Ok(())
        }
    }

    fn opts(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> LuksCreateOptions {
        LuksCreateOptions {
            cipher: CipherSpec {
                alg,
                mode,
                ivgen,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha1,
            kdf: KdfCost::Iterations {
                master: 1000,
                slot: 1000,
            },
        }
    }

    #[test]
    fn created_headers_parse_back_and_unlock() {
        let o = opts(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv);
        let (h, area, key) = create(b"secret", &o, &mut fixed_random()).unwrap();
        assert_eq!(
            h.cipher.ivgen_hash,
            Some(HashAlg::Sha256),
            "essiv defaults to sha256"
        );
        // 16-byte key: 4000 stripes are 125 sectors, aligned to 128; payload after 8 slots.
        assert_eq!(h.payload_offset_sector, 8 + 8 * 128);
        assert_eq!(area.len() as u64, h.payload_offset());
        let parsed = LuksHeader::parse(&area).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.uuid_str().len(), 36);
        assert_eq!(&parsed.uuid_str()[14..15], "4");
        let lim = LuksLimits::default();
        let k = parsed.unlock(&area, b"secret", &lim).unwrap();
        assert_eq!(k.as_bytes(), key.as_bytes());
        assert!(matches!(
            parsed.unlock(&area, b"Secret", &lim),
            Err(CryptoError::WrongPassphrase)
        ));
        assert!(parsed.slots[1..].iter().all(|s| !s.active));
    }

    #[test]
    fn an_erased_slot_no_longer_unlocks() {
        let o = opts(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64);
        let (mut h, mut area, key) = create(b"a", &o, &mut fixed_random()).unwrap();
        h.store_key(&mut area, 3, b"b", &key, 1000, &mut fixed_random())
            .unwrap();
        let lim = LuksLimits::default();
        assert!(h.unlock(&area, b"b", &lim).is_ok());
        let before = area.clone();
        h.erase_key(&mut area, 3, &mut fixed_random()).unwrap();
        assert!(!h.slots[3].active && h.slots[3].iterations == 0);
        assert_ne!(area, before, "the material is overwritten");
        area[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        let h = LuksHeader::parse(&area).unwrap();
        assert!(matches!(
            h.unlock(&area, b"b", &lim),
            Err(CryptoError::WrongPassphrase)
        ));
        assert!(h.unlock(&area, b"a", &lim).is_ok());
    }

    #[test]
    fn key_material_qemu_cannot_process_is_not_created() {
        let o = opts(CipherAlg::Aes192, CipherMode::Cbc, IvGenAlg::Plain64);
        assert!(matches!(
            create(b"pw", &o, &mut fixed_random()),
            Err(CryptoError::Unsupported(_))
        ));
        // In XTS the key is 48 bytes: 4000 stripes fill whole sectors.
        let o = opts(CipherAlg::Aes192, CipherMode::Xts, IvGenAlg::Plain64);
        assert!(create(b"pw", &o, &mut fixed_random()).is_ok());
    }

    #[test]
    fn iter_time_is_calibrated_and_at_least_the_minimum() {
        let o = LuksCreateOptions {
            kdf: KdfCost::IterTime(Duration::from_millis(1)),
            ..opts(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64)
        };
        let (h, ..) = create(b"pw", &o, &mut fixed_random()).unwrap();
        assert!(h.master_key_iterations >= MIN_ITERATIONS);
        assert!(h.slots[0].iterations >= MIN_ITERATIONS);
    }
}
