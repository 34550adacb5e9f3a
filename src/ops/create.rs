//! Creating images: qcow2 with every qemu-img `-o` option that applies, and raw.
//!
//! A new qcow2 image starts as three clusters (header with its extensions and backing name,
//! refcount table, one refcount block) and is then grown to its size by the engine's own
//! resize, which allocates the L1 table through the allocator — so creation exercises the same
//! code (and the same write ordering) as every later change.
//!
//! ```
//! use qcow2kit::ops::create::{create_qcow2, Compat, CreateOptions};
//! # let dir = tempfile::tempdir()?;
//! // qemu-img create -f qcow2 -o compat=0.10,cluster_size=4096 old.qcow2 10M
//! let o = CreateOptions {
//!     size: Some(10 << 20),
//!     compat: Compat::V2,
//!     cluster_size: 4096,
//!     ..CreateOptions::default()
//! };
//! create_qcow2(&dir.path().join("old.qcow2"), &o)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::chain::{open, resolve_relative, OpenOptions};
use crate::crypto::luks::LuksCreateOptions;
use crate::crypto::{EncryptionFormat, Passphrase};
use crate::engine::{Qcow2Image, Qcow2Options};
use crate::error::{Error, Result};
use crate::format::extension::Extensions;
use crate::format::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use crate::format::header::{
    CompressionType, CryptMethod, Header, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::format::header_area::{encode_header_area, qemu_feature_table_for};
use crate::format::refcount;
use crate::format::{MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::io::{FileStorage, Storage};
use crate::Format;
use std::path::Path;
use std::sync::Arc;

/// Format version (`compat`).
///
/// ```
/// use qcow2kit::ops::create::{Compat, CreateOptions};
/// assert_eq!(CreateOptions::default().compat, Compat::V3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`compat=0.10`).
    V2,
    /// Version 3 (`compat=1.1`), the default.
    V3,
}

/// `preallocation`.
///
/// ```
/// use qcow2kit::ops::create::{create_raw, Preallocation};
/// # let dir = tempfile::tempdir()?;
/// create_raw(&dir.path().join("thick.raw"), 1 << 20, Preallocation::Full)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing allocated up front.
    Off,
    /// L2 tables and data clusters allocated; the file stays sparse.
    Metadata,
    /// As `Metadata`, with the file's blocks reserved by `fallocate` (the data file's, when
    /// there is one).
    Falloc,
    /// As `Metadata`, with zeros written over the data.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names.
    ///
    /// ```
    /// use qcow2kit::ops::create::Preallocation;
    /// assert_eq!(Preallocation::from_name("falloc")?, Preallocation::Falloc);
    /// assert!(Preallocation::from_name("thick").is_err());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "invalid preallocation '{s}'"
                )))
            }
        })
    }
}

/// Options of a new qcow2 image, with qemu-img's defaults.
///
/// ```
/// use qcow2kit::ops::create::CreateOptions;
/// // qemu-img create -f qcow2 -o extended_l2=on,cluster_size=128k,lazy_refcounts=on disk 1G
/// let o = CreateOptions {
///     size: Some(1 << 30),
///     extended_l2: true,
///     cluster_size: 128 << 10,
///     lazy_refcounts: true,
///     ..CreateOptions::default()
/// };
/// # let _ = o;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Cluster size (512 B..2 MiB, a power of two; default 64 KiB).
    pub cluster_size: u64,
    /// Version.
    pub compat: Compat,
    /// Refcount width in bits (1..64, a power of two; default 16).
    pub refcount_bits: u32,
    /// Set the lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format (always recorded in the backing-format extension).
    pub backing_format: Option<String>,
    /// External data file name, stored as given (resolved relative to the image's directory).
    pub data_file: Option<String>,
    /// The data file is a valid raw image (`data_file_raw`).
    pub data_file_raw: bool,
    /// Encrypt the image (qemu-img's `encrypt.*` options).
    pub encryption: Option<CreateEncryption>,
}

/// How a new image is encrypted.
///
/// ```
/// use qcow2kit::crypto::{EncryptionFormat, Passphrase};
/// use qcow2kit::ops::create::{create_qcow2, CreateEncryption, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// let o = CreateOptions {
///     size: Some(1 << 20),
///     encryption: Some(CreateEncryption {
///         format: EncryptionFormat::Luks,
///         passphrase: Passphrase::new("secret"),
///         luks: Default::default(),
///     }),
///     ..CreateOptions::default()
/// };
/// # let o = CreateOptions { encryption: o.encryption.map(|mut e| { e.luks.kdf = qcow2kit::crypto::luks::KdfCost::Iterations { master: 1000, slot: 1000 }; e }), ..o };
/// create_qcow2(&dir.path().join("secret.qcow2"), &o)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateEncryption {
    /// LUKS (the default of qemu-img) or legacy AES.
    pub format: EncryptionFormat,
    /// The passphrase of LUKS key slot 0, or the legacy AES key.
    pub passphrase: Passphrase,
    /// The cipher, hash and PBKDF2 work of a LUKS header (unused for legacy AES).
    pub luks: LuksCreateOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad(format!("parameter '{k}' expects 'on' or 'off'"))),
    }
}

impl CreateOptions {
    /// Applies one `-o` argument (`key=value,key=value`, qemu-img's option names). `parse_size`
    /// converts sizes with suffixes.
    ///
    /// ```
    /// use qcow2kit::ops::create::CreateOptions;
    /// let mut o = CreateOptions::default();
    /// o.apply_qemu_options("cluster_size=4096,refcount_bits=1", |s| s.parse().ok())?;
    /// assert_eq!((o.cluster_size, o.refcount_bits), (4096, 1));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn apply_qemu_options(
        &mut self,
        arg: &str,
        parse_size: impl Fn(&str) -> Option<u64>,
    ) -> Result<()> {
        for kv in arg.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("invalid option '{kv}'")))?;
            match k {
                "size" => {
                    self.size =
                        Some(parse_size(v).ok_or_else(|| bad(format!("invalid size '{v}'")))?)
                }
                "cluster_size" => {
                    self.cluster_size =
                        parse_size(v).ok_or_else(|| bad(format!("invalid cluster size '{v}'")))?
                }
                "compat" => {
                    self.compat = match v {
                        "0.10" | "v2" => Compat::V2,
                        "1.1" | "v3" => Compat::V3,
                        _ => return Err(bad(format!("invalid compatibility level '{v}'"))),
                    }
                }
                "refcount_bits" => {
                    self.refcount_bits = v.parse().map_err(|_| bad("invalid refcount_bits"))?
                }
                "lazy_refcounts" => self.lazy_refcounts = parse_bool(k, v)?,
                "extended_l2" => self.extended_l2 = parse_bool(k, v)?,
                "compression_type" => {
                    self.compression_type = match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(bad(format!("invalid compression type '{v}'"))),
                    }
                }
                "preallocation" => self.preallocation = Preallocation::from_name(v)?,
                "backing_file" => self.backing_file = Some(v.to_string()),
                "backing_fmt" => self.backing_format = Some(v.to_string()),
                "data_file" => self.data_file = Some(v.to_string()),
                "data_file_raw" => self.data_file_raw = parse_bool(k, v)?,
                "encryption" | "encrypt.format" => {
                    return Err(bad(
                        "encryption needs a passphrase: set CreateOptions::encryption",
                    ))
                }
                _ => return Err(bad(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(())
    }

    /// Checks the combination the way qemu-img does.
    pub(crate) fn validate(&self, size: u64) -> Result<u32> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() {
            return Err(bad(
                "cluster size must be a power of two between 512 and 2048k",
            ));
        }
        let bits = cs.trailing_zeros();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(bad(
                "cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(bad(
                "refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if size % 512 != 0 {
            return Err(bad("image size must be a multiple of 512 bytes"));
        }
        if self.compat == Compat::V2 {
            if self.refcount_bits != 16 {
                return Err(bad("different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
            }
            if self.lazy_refcounts {
                return Err(bad("lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
            }
            if self.extended_l2 {
                return Err(bad("extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(bad("compression_type requires compatibility level 1.1 or above (use compat=1.1 or greater)"));
            }
            if self.data_file.is_some() {
                return Err(bad("data-file requires compat=1.1 or greater"));
            }
        }
        if self.extended_l2 && bits < 14 {
            return Err(bad(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(bad("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(bad(
                "backing file and data-file-raw cannot be used together",
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(bad("Backing file and preallocation can only be used at the same time if extended_l2 is on"));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(bad("backing format cannot be used without backing file"));
        }
        if let Some(b) = &self.backing_file {
            if b.is_empty() || b.len() > MAX_BACKING_NAME as usize {
                return Err(bad("backing file name must be 1..=1023 bytes"));
            }
        }
        Ok(bits)
    }
}

/// Cluster 0 of a new qcow2 image made with `o` (clusters of `1 << bits` bytes): header with
/// the extensions and backing name QEMU records, refcount table at cluster 1, no L1 table yet
/// (the caller sets `l1`: table offset and entries, and the refcount table's place and size when
/// they differ). Padded to the cluster size.
pub(crate) fn new_cluster0(
    o: &CreateOptions,
    bits: u32,
    refcount_table: (u64, u32),
    l1: (u64, u32),
    size: u64,
) -> Result<Vec<u8>> {
    let cs = 1u64 << bits;
    let v3 = o.compat == Compat::V3;
    let order = o.refcount_bits.trailing_zeros();
    let mut incompatible = IncompatibleFeatures::empty();
    let mut autoclear = AutoclearFeatures::empty();
    if o.data_file.is_some() {
        incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
    }
    if o.data_file_raw {
        autoclear |= AutoclearFeatures::DATA_FILE_RAW;
    }
    if o.compression_type == CompressionType::Zstd {
        incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
    }
    if o.extended_l2 {
        incompatible |= IncompatibleFeatures::EXTENDED_L2;
    }
    let ext = Extensions {
        backing_format: o.backing_format.as_ref().map(|f| f.as_bytes().to_vec()),
        feature_names: qemu_feature_table_for(if v3 { 3 } else { 2 }, cs),
        data_file: o.data_file.as_ref().map(|d| d.as_bytes().to_vec()),
        ..Extensions::default()
    };
    let header = Header {
        version: if v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: bits,
        size,
        crypt_method: CryptMethod::None,
        l1_size: l1.1,
        l1_table_offset: l1.0,
        refcount_table_offset: refcount_table.0,
        refcount_table_clusters: refcount_table.1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: if o.lazy_refcounts {
            CompatibleFeatures::LAZY_REFCOUNTS
        } else {
            CompatibleFeatures::empty()
        },
        autoclear,
        refcount_order: order,
        header_length: if v3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        },
        compression_type: o.compression_type,
        extra_bytes: if v3 { vec![0; 7] } else { Vec::new() },
    };
    // The (optional) feature-name table is left out, as qemu-img does, for clusters of 4 KiB
    // and below, and whenever cluster 0 is too small for it beside the header, the other
    // extensions and the backing file name.
    let (_, mut cluster0) = encode_header_area(
        &header,
        &ext,
        o.backing_file.as_deref().map(str::as_bytes),
        cs,
    )
    .ok_or_else(|| bad("header, extensions and backing name do not fit in one cluster"))?;
    cluster0.resize(cs as usize, 0);
    Ok(cluster0)
}

/// Writes a new qcow2 image of size 0 on `storage` (its three first clusters).
fn write_skeleton(storage: &dyn Storage, o: &CreateOptions, bits: u32) -> Result<()> {
    let cs = 1u64 << bits;
    let order = o.refcount_bits.trailing_zeros();
    let cluster0 = new_cluster0(o, bits, (cs, 1), (0, 0), 0)?;
    let mut reftable = vec![0u8; cs as usize];
    reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        refcount::set(&mut block, order, c, 1);
    }
    let mut all = cluster0;
    all.extend_from_slice(&reftable);
    all.extend_from_slice(&block);
    storage
        .set_len(0)
        .map_err(|e| Error::io("truncating new image", e))?;
    storage
        .write_at(&all, 0)
        .map_err(|e| Error::io("writing new image", e))?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing new image", e))
}

/// Creates a qcow2 image on `storage` (and its data file on `data`, when the options name one)
/// of `size` bytes and returns it opened writable. Backing files are only recorded.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::BlockDevice;
/// use std::sync::Arc;
/// let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
/// img.write_at(&[1; 512], 0)?; // open for writing already
/// img.close()?;
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn create_qcow2_on(
    storage: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    size: u64,
    o: &CreateOptions,
) -> Result<Qcow2Image> {
    let bits = o.validate(size)?;
    if o.data_file.is_some() != data.is_some() {
        return Err(bad("a data file storage goes with the data_file option"));
    }
    // The LUKS header first: its PBKDF2 work takes the time asked for, and nothing is on disk
    // if it fails.
    let luks_area = match &o.encryption {
        Some(e) if e.format == EncryptionFormat::Luks => {
            let (_, area, _) = crate::crypto::luks::create(
                e.passphrase.as_bytes(),
                &e.luks,
                &mut crate::crypto::os_random,
            )?;
            Some(area)
        }
        _ => None,
    };
    write_skeleton(storage.as_ref(), o, bits)?;
    let mut img = Qcow2Image::open_writable(storage.clone(), &Qcow2Options::default())?;
    if let Some(d) = data {
        d.set_len(0)
            .map_err(|e| Error::io("truncating data file", e))?;
        d.set_len(size)
            .map_err(|e| Error::io("sizing data file", e))?;
        img.set_data_file(d);
    }
    // With a raw data file, resize maps every cluster one to one (QEMU forces metadata
    // preallocation there).
    img.resize(size, false)?;
    if let Some(e) = &o.encryption {
        // As qemu-img: the encryption header is allocated after the L1 table; then the image
        // is opened again with its key, so that preallocated data is written encrypted.
        img.install_encryption(e.format, luks_area.as_deref())?;
        img.close()?;
        let opts = Qcow2Options {
            encryption: crate::engine::EncryptionOptions {
                passphrase: Some(e.passphrase.clone()),
                ..Default::default()
            },
            ..Qcow2Options::default()
        };
        img = Qcow2Image::open_writable(storage, &opts)?;
    }
    match o.preallocation {
        Preallocation::Off => {}
        Preallocation::Metadata | Preallocation::Falloc => img.preallocate(false)?,
        Preallocation::Full => img.preallocate(true)?,
    }
    // A clean image on disk, still open for the caller.
    img.checkpoint()?;
    Ok(img)
}

/// Creates a qcow2 image file at `path`. Without a size, the backing file is opened (as qemu-img
/// does: relative to the new image, its format given or probed) for its size.
///
/// ```
/// use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// create_qcow2(&dir.path().join("disk.qcow2"), &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create_qcow2(path: &Path, o: &CreateOptions) -> Result<()> {
    let size = match (o.size, &o.backing_file) {
        (Some(s), _) => s,
        (None, Some(b)) => {
            let bpath = resolve_relative(path, b.as_bytes())?;
            let fmt = match &o.backing_format {
                Some(f) => Format::openable(f.as_bytes())?,
                None => crate::chain::probe_file(&bpath)?,
            };
            open(&bpath, fmt, &OpenOptions::qemu_compatible())?
                .device
                .size()
        }
        (None, None) => return Err(bad("Image creation needs a size parameter")),
    };
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::create(path).map_err(|e| Error::storage("creating image file", e))?);
    let data: Option<Arc<dyn Storage>> = match &o.data_file {
        Some(d) => {
            let dpath = resolve_relative(path, d.as_bytes())?;
            Some(Arc::new(
                FileStorage::create(&dpath).map_err(|e| Error::storage("creating data file", e))?,
            ))
        }
        None => None,
    };
    create_qcow2_on(storage, data, size, o)?;
    if o.preallocation == Preallocation::Falloc {
        // As QEMU: the blocks under the guest's data are reserved in the file that holds it.
        let target = match &o.data_file {
            Some(d) => resolve_relative(path, d.as_bytes())?,
            None => path.to_path_buf(),
        };
        reserve_whole_file(&target)?;
    }
    Ok(())
}

/// Reserves the blocks of the whole file at `path` (`fallocate` without a mode: nothing is
/// written, nothing changes size). Where the file system has no `fallocate`, one zero byte is
/// written into each 4 KiB block that reads as zero (`posix_fallocate`'s emulation), so no
/// byte that holds data changes.
fn reserve_whole_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| Error::io("reserving image blocks", e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => {}
        Err(rustix::io::Errno::OPNOTSUPP) => {
            const BLOCK: u64 = 4096;
            let mut b = [0u8; 1];
            let mut p = 0;
            while p < len {
                f.read_exact_at(&mut b, p).map_err(io)?;
                if b[0] == 0 {
                    f.write_all_at(&b, p).map_err(io)?;
                }
                p += BLOCK;
            }
        }
        Err(e) => return Err(io(e.into())),
    }
    f.sync_all().map_err(io)
}

/// Creates a raw image file of `size` bytes: sparse, its blocks reserved (`Falloc`) or zeros
/// written (`Full`).
///
/// ```
/// use qcow2kit::ops::create::{create_raw, Preallocation};
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.raw");
/// create_raw(&path, 1 << 20, Preallocation::Off)?; // sparse
/// assert_eq!(std::fs::metadata(&path)?.len(), 1 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create_raw(path: &Path, size: u64, preallocation: Preallocation) -> Result<()> {
    let s = FileStorage::create(path).map_err(|e| Error::storage("creating image file", e))?;
    if preallocation == Preallocation::Full {
        let zeros = vec![0u8; 1 << 20];
        let mut p = 0;
        while p < size {
            let n = (size - p).min(zeros.len() as u64) as usize;
            s.write_at(&zeros[..n], p)
                .map_err(|e| Error::io("preallocating", e))?;
            p += n as u64;
        }
    }
    s.set_len(size)
        .map_err(|e| Error::io("sizing image file", e))?;
    s.flush().map_err(|e| Error::io("flushing image file", e))?;
    if preallocation == Preallocation::Falloc {
        reserve_whole_file(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::io::MemoryStorage;

    fn roundtrip(o: &CreateOptions, size: u64) {
        let mem = Arc::new(MemoryStorage::new());
        let img = create_qcow2_on(mem.clone(), None, size, o).unwrap();
        assert_eq!(img.size(), size);
        let mut buf = vec![1u8; 4096];
        img.read_at(&mut buf, size - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let pattern: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        img.write_at(&pattern, 3000).unwrap();
        img.flush().unwrap();
        drop(img);
        let img = Qcow2Image::open(mem, &Qcow2Options::default()).unwrap();
        let mut back = vec![0u8; pattern.len()];
        img.read_at(&mut back, 3000).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn create_write_reopen() {
        for (cs, bits, compat) in [
            (65536, 16, Compat::V3),
            (512, 1, Compat::V3),
            (4096, 64, Compat::V3),
            (65536, 16, Compat::V2),
        ] {
            let o = CreateOptions {
                cluster_size: cs,
                refcount_bits: bits,
                compat,
                ..Default::default()
            };
            roundtrip(&o, 64 << 20);
        }
        let o = CreateOptions {
            extended_l2: true,
            cluster_size: 65536,
            ..Default::default()
        };
        roundtrip(&o, 64 << 20);
    }

    #[test]
    fn invalid_options() {
        let o = CreateOptions {
            cluster_size: 1000,
            ..Default::default()
        };
        assert!(o.validate(1 << 20).is_err());
        let o = CreateOptions {
            compat: Compat::V2,
            lazy_refcounts: true,
            ..Default::default()
        };
        assert!(o.validate(1 << 20).is_err());
        assert!(CreateOptions::default().validate(1000).is_err());
    }
}
