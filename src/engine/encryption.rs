//! Encrypted images: the payload cipher unlocked at open, and guest data passing through it on
//! its way to and from the host clusters.
//!
//! Invariants, as QEMU keeps them:
//! - Data clusters of an encrypted image hold ciphertext in whole 512-byte sectors. A sector's
//!   IV comes from its host sector number with LUKS, from its guest sector number with legacy
//!   AES (guest and host offsets share their place within the cluster, so both are
//!   sector-aligned together).
//! - Zero and unallocated clusters read as plaintext zeros (or backing data) without the
//!   cipher; compressed clusters are read as stored (QEMU never writes compressed clusters into
//!   an encrypted image, and qcow2kit refuses to).
//! - Every guest write reaches [`Qcow2Image::write_data`] sector-aligned: a write that is not
//!   is widened to whole sectors by `write_impl` with the current content, under the range
//!   lock.

use super::Qcow2Image;
use crate::crypto::keyslots::{KeySlotChange, KeySlotPlan};
use crate::crypto::luks::{LuksHeader, LuksLimits, ERASE_PASSES};
use crate::crypto::{os_random, EncryptionFormat, Passphrase, SectorCipher, SECTOR_SIZE};
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::extension::{CryptoHeaderExtension, Extensions};
use crate::format::header::{check_table, CryptMethod, Header};
use crate::io::{Storage, StorageExt};

/// The most bytes of a LUKS header area read at open. QEMU's own headers take about 2 MiB
/// (eight slots of 4000 stripes of a 64-byte key); key material past this bound is refused by
/// the unlock as lying outside the area.
const MAX_LUKS_AREA: u64 = 16 << 20;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// What the caller gives to open an encrypted image.
///
/// ```
/// use qcow2kit::crypto::Passphrase;
/// use qcow2kit::engine::EncryptionOptions;
/// use qcow2kit::Qcow2Options;
/// let opts = Qcow2Options {
///     encryption: EncryptionOptions { passphrase: Some(Passphrase::new("secret")), ..Default::default() },
///     ..Qcow2Options::default()
/// };
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct EncryptionOptions {
    /// The passphrase: the secret of a LUKS key slot, or the legacy AES key.
    pub passphrase: Option<Passphrase>,
    /// The format the caller expects (QEMU's `encrypt.format`): an image whose header names
    /// another is refused with QEMU's message.
    pub format: Option<EncryptionFormat>,
    /// Open an encrypted image without its passphrase for its metadata only (as `qemu-img
    /// info` does): guest reads and writes then fail with [`Error::EncryptedNoKey`].
    pub metadata_only: bool,
    /// Bounds on the PBKDF2 work of unlocking a LUKS key slot.
    pub luks_limits: LuksLimits,
}

/// What an open image says about its encryption (no key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionInfo {
    /// The method the header names.
    pub format: EncryptionFormat,
    /// The LUKS header, for LUKS images.
    pub luks: Option<LuksHeader>,
    /// Whether the payload key was unlocked (false for a metadata-only open).
    pub unlocked: bool,
}

/// The encryption state of an open image.
pub(crate) struct Encryption {
    format: EncryptionFormat,
    /// The LUKS header as on disk (replaced whole by a key-slot change).
    luks: std::sync::RwLock<Option<LuksHeader>>,
    cipher: Option<SectorCipher>,
    /// The passphrase the image was opened with (a key-slot change unlocks with it).
    passphrase: Option<Passphrase>,
    limits: LuksLimits,
}

impl Encryption {
    /// Parses the image's encryption (none for an unencrypted image) and unlocks its key with
    /// the caller's passphrase. `file_end` bounds the LUKS header area.
    pub(crate) fn open(
        storage: &dyn Storage,
        header: &Header,
        extensions: &Extensions,
        file_end: u64,
        opts: &EncryptionOptions,
    ) -> Result<Option<Encryption>> {
        let format = match header.crypt_method {
            CryptMethod::None => {
                if let Some(f) = opts.format {
                    return Err(Error::Crypto(crate::crypto::CryptoError::InvalidArgument(
                        format!(
                            "No encryption in image header, but options specified format '{}'",
                            f.name()
                        ),
                    )));
                }
                if extensions.crypto.is_some() {
                    return Err(inconsistent(
                        "CRYPTO header extension only expected with LUKS encryption method",
                    ));
                }
                return Ok(None);
            }
            CryptMethod::Aes => EncryptionFormat::Aes,
            CryptMethod::Luks => EncryptionFormat::Luks,
        };
        if let Some(want) = opts.format {
            if want != format {
                return Err(Error::Crypto(crate::crypto::CryptoError::InvalidArgument(
                    format!(
                        "Header reported '{}' encryption format but options specify '{}'",
                        format.name(),
                        want.name()
                    ),
                )));
            }
        }
        let luks = match format {
            EncryptionFormat::Aes => None,
            EncryptionFormat::Luks => {
                let ext = extensions.crypto.ok_or_else(|| {
                    inconsistent("LUKS encrypted image has no CRYPTO header extension")
                })?;
                let cs = header.cluster_size();
                check_table("encryption header", ext.offset, ext.length, cs, file_end)?;
                let area = storage
                    .read_vec(ext.offset, ext.length.min(MAX_LUKS_AREA) as usize)
                    .map_err(|e| Error::io("reading the encryption header", e))?;
                let parsed = LuksHeader::parse(&area)?;
                Some((parsed, area))
            }
        };
        let cipher = match &opts.passphrase {
            None if opts.metadata_only => None,
            None => {
                return Err(Error::EncryptedNoKey {
                    method: format.name(),
                })
            }
            Some(pw) => Some(match &luks {
                None => SectorCipher::legacy_qcow(pw.as_bytes()),
                Some((h, area)) => {
                    let key = h.unlock(area, pw.as_bytes(), &opts.luks_limits)?;
                    h.sector_cipher(&key)?
                }
            }),
        };
        Ok(Some(Encryption {
            format,
            luks: std::sync::RwLock::new(luks.map(|(h, _)| h)),
            cipher,
            passphrase: opts.passphrase.clone(),
            limits: opts.luks_limits,
        }))
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or(Error::EncryptedNoKey {
            method: self.format.name(),
        })
    }

    /// The sector number of the IV for data at `host` (guest offset `guest`).
    fn sector(&self, host: u64, guest: u64) -> u64 {
        match self.format {
            EncryptionFormat::Luks => host / SECTOR,
            EncryptionFormat::Aes => guest / SECTOR,
        }
    }
}

fn inconsistent(msg: &str) -> Error {
    Error::Corrupt(Corruption::Inconsistent(msg.into()))
}

impl Qcow2Image {
    /// The image's encryption, if it has any.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// assert!(img.encryption().is_none()); // not encrypted
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn encryption(&self) -> Option<EncryptionInfo> {
        self.encryption.as_ref().map(|e| EncryptionInfo {
            format: e.format,
            luks: e.luks.read().unwrap_or_else(|p| p.into_inner()).clone(),
            unlocked: e.cipher.is_some(),
        })
    }

    pub(crate) fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// Reads guest data stored at `host` (guest offset `guest`) from `source`, decrypted.
    pub(crate) fn read_data(
        &self,
        source: &dyn Storage,
        buf: &mut [u8],
        host: u64,
        guest: u64,
    ) -> Result<()> {
        let rio = |e| Error::io("reading data cluster", e);
        let Some(enc) = &self.encryption else {
            return source.read_at(buf, host).map_err(rio);
        };
        let cipher = enc.cipher()?;
        let lead = host % SECTOR;
        let start = host - lead;
        let end = (host + buf.len() as u64).next_multiple_of(SECTOR);
        let sector = enc.sector(start, guest - lead);
        if lead == 0 && end == host + buf.len() as u64 {
            source.read_at(buf, host).map_err(rio)?;
            return Ok(cipher.decrypt(sector, buf)?);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        source.read_at(&mut tmp, start).map_err(rio)?;
        cipher.decrypt(sector, &mut tmp)?;
        buf.copy_from_slice(&tmp[lead as usize..lead as usize + buf.len()]);
        Ok(())
    }

    /// Writes guest data `data` for guest offset `guest` to `host` in `target`, encrypted.
    /// With encryption, `host` is sector-aligned and `data` whole sectors but at the end of a
    /// device whose size is not (the last sector is then padded with zeros).
    pub(crate) fn write_data(
        &self,
        target: &dyn Storage,
        data: &[u8],
        host: u64,
        guest: u64,
    ) -> Result<()> {
        let wio = |e| Error::io("writing guest data", e);
        let Some(enc) = &self.encryption else {
            return target.write_at(data, host).map_err(wio);
        };
        let cipher = enc.cipher()?;
        if host % SECTOR != 0 {
            return Err(Error::InvalidArgument(format!(
                "encrypted write at host offset {host} is not sector-aligned"
            )));
        }
        let mut buf = vec![0u8; data.len().next_multiple_of(SECTOR_SIZE)];
        buf[..data.len()].copy_from_slice(data);
        cipher.encrypt(enc.sector(host, guest), &mut buf)?;
        target.write_at(&buf, host).map_err(wio)
    }

    /// For an encrypted image, `data` at guest `offset` widened to whole sectors with the
    /// current content (the caller holds the range lock); `None` when nothing needs widening.
    pub(crate) fn sector_aligned_write(
        &self,
        data: &[u8],
        offset: u64,
    ) -> Result<Option<(Vec<u8>, u64)>> {
        let end = offset + data.len() as u64;
        if self.encryption.is_none() || (offset % SECTOR == 0 && end % SECTOR == 0) {
            return Ok(None);
        }
        let start = offset - offset % SECTOR;
        let wide_end = end.next_multiple_of(SECTOR).min(self.size().max(end));
        let mut buf = vec![0u8; (wide_end - start) as usize];
        let head = (offset - start) as usize;
        if head > 0 {
            self.read_current(&mut buf[..head], start)?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        let tail = head + data.len();
        if tail < buf.len() {
            self.read_current(&mut buf[tail..], end)?;
        }
        Ok(Some((buf, start)))
    }
}

impl Qcow2Image {
    /// Makes a new image encrypted with `format`: for LUKS, `luks_area` (a header made by
    /// [`crate::crypto::luks::create`]) is written to new clusters, then the header names the
    /// method (and the area, in its extension). This handle stays unencrypted: the image must
    /// be reopened with its key before any guest data is written.
    pub(crate) fn install_encryption(
        &self,
        format: EncryptionFormat,
        luks_area: Option<&[u8]>,
    ) -> Result<()> {
        let crypto = match luks_area {
            None => None,
            Some(area) => {
                // Whole clusters are written, zeros after the area, as qemu-img writes them.
                let cs = self.geo.cluster_size as usize;
                let mut padded = area.to_vec();
                padded.resize(area.len().next_multiple_of(cs), 0);
                let mut m = self.lock_meta();
                let at =
                    self.write_new_clusters(&mut m, &padded, "writing the encryption header")?;
                let length = area.len() as u64;
                m.refs()?.map.set_encryption_header(at, length);
                Some(CryptoHeaderExtension { offset: at, length })
            }
        };
        self.rewrite_header(|h, ext, _| {
            h.crypt_method = match format {
                EncryptionFormat::Aes => CryptMethod::Aes,
                EncryptionFormat::Luks => CryptMethod::Luks,
            };
            ext.crypto = crypto;
            Ok(())
        })
    }
}

impl Qcow2Image {
    /// Activates or erases LUKS key slots as `qemu-img amend -o encrypt.state=…` does, with
    /// QEMU's checks and messages. A new slot's material is
    /// written and flushed before the header names it; an erased slot leaves the header first,
    /// then its material is overwritten [`ERASE_PASSES`] times.
    pub fn amend_key_slots(&self, change: &KeySlotChange) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.ensure_open()?;
        let enc = self.encryption.as_ref().ok_or_else(|| {
            Error::InvalidArgument("Can't amend encryption options - encryption not present".into())
        })?;
        if enc.format != EncryptionFormat::Luks {
            return Err(Error::InvalidArgument(
                "Only LUKS encryption options can be amended".into(),
            ));
        }
        let current = enc.passphrase.as_ref().ok_or(Error::EncryptedNoKey {
            method: enc.format.name(),
        })?;
        let ext =
            self.area().extensions.crypto.ok_or_else(|| {
                inconsistent("LUKS encrypted image has no CRYPTO header extension")
            })?;
        let _all = self.lock_everything()?;
        let s = self.storage.as_ref();
        let wio = |e| Error::io("writing the encryption header", e);
        let flush = || {
            s.flush()
                .map_err(|e| Error::io("flushing the encryption header", e))
        };
        let mut area = s
            .read_vec(ext.offset, ext.length.min(MAX_LUKS_AREA) as usize)
            .map_err(|e| Error::io("reading the encryption header", e))?;
        let mut header = LuksHeader::parse(&area)?;
        let write_material = |area: &[u8], h: &LuksHeader, slot: usize| -> Result<()> {
            let r = h
                .material_range(slot)
                .filter(|r| r.end <= area.len())
                .ok_or_else(|| {
                    inconsistent("LUKS key material lies outside the encryption header")
                })?;
            s.write_at(&area[r.clone()], ext.offset + r.start as u64)
                .map_err(wio)
        };
        match header.plan_key_slots(&area, change, current.as_bytes(), &enc.limits)? {
            KeySlotPlan::Store {
                slot,
                iterations,
                master_key,
                passphrase,
            } => {
                header.store_key(
                    &mut area,
                    slot,
                    passphrase.as_bytes(),
                    &master_key,
                    iterations,
                    &mut os_random,
                )?;
                write_material(&area, &header, slot)?;
                flush()?;
                s.write_at(&header.to_bytes(), ext.offset).map_err(wio)?;
                flush()?;
            }
            KeySlotPlan::Erase(slots) => {
                for &slot in &slots {
                    header.erase_key(&mut area, slot, &mut os_random)?;
                }
                s.write_at(&header.to_bytes(), ext.offset).map_err(wio)?;
                flush()?;
                for _ in 0..ERASE_PASSES {
                    for &slot in &slots {
                        header.erase_key(&mut area, slot, &mut os_random)?;
                        write_material(&area, &header, slot)?;
                    }
                    flush()?;
                }
            }
        }
        *enc.luks.write().unwrap_or_else(|p| p.into_inner()) = Some(header);
        Ok(())
    }
}
