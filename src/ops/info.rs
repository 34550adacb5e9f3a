//! What `qemu-img info` reports about an image, gathered as plain data (no formatting).
//!
//! [`open_for_info`] opens one image the way qemu-img info does: its metadata only, without its
//! backing file or external data file, so that an image naming missing or untrusted files can
//! still be inspected. [`image_info`] gathers the facts; [`backing_chain_info`] walks the chain
//! by the names the images record (`--backing-chain`), top first.
//!
//! ```
//! # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.qcow2");
//! # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
//! use qcow2kit::chain::Locking;
//! use qcow2kit::ops::info::{image_info, open_for_info};
//! use qcow2kit::Format;
//! let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
//! assert_eq!((info.virtual_size, info.cluster_size), (1 << 30, Some(65536)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::chain::{open_storage, probe_file, FileRole, Locking, Opened, DEFAULT_MAX_DEPTH};
use crate::device::RawImage;
use crate::engine::EncryptionOptions;
use crate::engine::{Qcow2Image, Qcow2Options};
use crate::error::{Error, Result};
use crate::format::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use crate::format::header::CompressionType;
use crate::io::lock::{LockRequest, Permissions};
use crate::io::Storage;
use crate::Format;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most images [`backing_chain_info`] lists (far more than a chain that can be opened).
pub(crate) const MAX_INFO_CHAIN: usize = 16 * DEFAULT_MAX_DEPTH;

/// QEMU measures files in whole 512-byte sectors: a file's length, and a raw image's virtual
/// size, are rounded up.
fn round_to_sector(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

/// Facts about one image, as `qemu-img info` reports them.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert_eq!(info.format, Format::Qcow2);
/// assert!(info.backing_filename.is_none() && info.snapshots.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The name the image was opened by.
    pub filename: String,
    /// Its format.
    pub format: Format,
    /// Virtual disk size in bytes (for raw images, the file length rounded up to a multiple of
    /// 512, as QEMU sees it).
    pub virtual_size: u64,
    /// Bytes allocated on the host for the image file (not its backing or data file).
    pub actual_size: Option<u64>,
    /// Whether the image is marked dirty (qcow2 incompatible bit 0).
    pub dirty: bool,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// The backing file name as recorded.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's own name, as qemu-img prints it.
    pub full_backing_filename: Option<String>,
    /// The backing file format, if recorded.
    pub backing_format: Option<String>,
    /// Internal snapshots, in table order.
    pub snapshots: Vec<SnapshotInfo>,
    /// qcow2-specific facts.
    pub qcow2: Option<Qcow2Info>,
    /// The file under the image (qemu-img's `file` child node).
    pub file: FileInfo,
}

/// The host file under an image.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert_eq!(info.file.protocol, "file");
/// assert!(info.file.length > 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Its name.
    pub filename: String,
    /// Its length in bytes, rounded up to a multiple of 512 as QEMU reports it.
    pub length: u64,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// The protocol it is reached through: `file`, or `nbd` for an image behind an NBD server.
    pub protocol: &'static str,
}

/// One internal snapshot.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert!(info.snapshots.is_empty()); // `qemu-img snapshot -c` adds one
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation, when recorded.
    pub icount: Option<u64>,
}

impl From<&crate::format::snapshot::Snapshot> for SnapshotInfo {
    fn from(s: &crate::format::snapshot::Snapshot) -> Self {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            icount: s.icount.filter(|&i| i != u64::MAX),
        }
    }
}

/// qcow2-specific facts (qemu-img's `format-specific` data).
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// let q = info.qcow2.expect("a qcow2 image");
/// assert_eq!((q.compat, q.refcount_bits), ("1.1", 16));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `"0.10"` for version 2, `"1.1"` for version 3.
    pub compat: &'static str,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Lazy refcounts (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// The corrupt bit (version 3 only).
    pub corrupt: Option<bool>,
    /// Extended L2 entries (version 3 only).
    pub extended_l2: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// External data file name, as recorded (version 3 only).
    pub data_file: Option<String>,
    /// Whether the external data file is raw (only when the image has one).
    pub data_file_raw: Option<bool>,
    /// Persistent bitmaps (version 3; empty when there are none).
    pub bitmaps: Vec<BitmapInfo>,
    /// The encryption, for an encrypted image (known without its key).
    pub encrypt: Option<crate::engine::EncryptionInfo>,
}

/// One persistent bitmap.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert!(info.qcow2.map(|q| q.bitmaps.is_empty()).unwrap_or(false));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes covered by one bit.
    pub granularity: u64,
    /// Flags as qemu-img names them (`in-use`, `auto`).
    pub flags: Vec<&'static str>,
}

/// Opens `path` as `format` for inspection: read-only, metadata only. No backing file and no
/// external data file is opened (reads of the returned device fall back to zeros for backing
/// data and fail for data-file clusters).
///
/// The file is locked as qemu-img info locks it under `locking`: no read permission is taken
/// (nothing is read as guest data), but a qcow2 image is refused while another open writes it
/// ([`Error::Locked`]) unless `locking` is [`Locking::ForceShare`] or [`Locking::Off`].
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert!(!info.dirty);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_for_info(path: &Path, format: Format, locking: Locking) -> Result<Opened> {
    open_for_info_with_key(path, format, locking, &EncryptionOptions::default())
}

/// [`open_for_info`] with the caller's encryption options: as qemu-img info, the image opens
/// for its metadata only (a passphrase is not tried), but an expected format must match.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::engine::EncryptionOptions;
/// use qcow2kit::ops::info::open_for_info_with_key;
/// use qcow2kit::Format;
/// let opened = open_for_info_with_key(&path, Format::Qcow2, Locking::Qemu, &EncryptionOptions::default())?;
/// assert!(opened.qcow2.is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_for_info_with_key(
    path: &Path,
    format: Format,
    locking: Locking,
    key: &EncryptionOptions,
) -> Result<Opened> {
    format.ensure_openable()?;
    let lock = locking
        .request(FileRole::of(format), false)
        .map(|r| LockRequest {
            uses: Permissions::empty(),
            ..r
        });
    let storage = open_storage(path, false, lock, 0)?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    match format {
        Format::Raw => Ok(Opened {
            device: Arc::new(RawImage::open(storage, false)?),
            qcow2: None,
            format,
            path: path.to_path_buf(),
            layers: Vec::new(),
        }),
        _ => {
            // As qemu-img info (BDRV_O_NO_IO): an encrypted image shows without its key.
            let opts = Qcow2Options {
                encryption: EncryptionOptions {
                    passphrase: None,
                    metadata_only: true,
                    ..key.clone()
                },
                ..Default::default()
            };
            let img = Arc::new(Qcow2Image::open(storage, &opts)?);
            Ok(Opened {
                device: img.clone(),
                qcow2: Some(img),
                format,
                path: path.to_path_buf(),
                layers: Vec::new(),
            })
        }
    }
}

/// Gathers what qemu-img info reports about the top image of `opened`.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::{image_info, open_for_info};
/// use qcow2kit::Format;
/// let info = image_info(&open_for_info(&path, Format::Qcow2, Locking::Qemu)?)?;
/// assert!(info.actual_size.is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn image_info(opened: &Opened) -> Result<ImageInfo> {
    let path = opened.path.to_string_lossy().into_owned();
    // An image behind an NBD server is named as QEMU names it, and has no host file.
    let nbd = crate::nbd::NbdAddress::is_uri(path.as_bytes())
        .then(|| crate::nbd::NbdAddress::parse(&path))
        .transpose()?;
    let filename = nbd.as_ref().map_or(path, |a| a.qemu_filename());
    let protocol = if nbd.is_some() { "nbd" } else { "file" };
    let file = match &opened.qcow2 {
        Some(img) => {
            let s = img.storage();
            let length = s
                .len()
                .map_err(|e| Error::io("reading image file size", e))?;
            FileInfo {
                filename: filename.clone(),
                length: round_to_sector(length),
                actual_size: s.allocated_bytes(),
                protocol,
            }
        }
        None if nbd.is_some() => FileInfo {
            filename: filename.clone(),
            length: opened.device.size(),
            actual_size: None,
            protocol,
        },
        None => {
            let m = std::fs::metadata(&opened.path)
                .map_err(|e| Error::io(format!("reading '{}'", opened.path.display()), e))?;
            FileInfo {
                filename: filename.clone(),
                length: round_to_sector(m.len()),
                actual_size: Some(m.blocks() * 512),
                protocol,
            }
        }
    };
    let Some(img) = &opened.qcow2 else {
        return Ok(ImageInfo {
            filename,
            format: opened.format,
            virtual_size: file.length,
            actual_size: file.actual_size,
            dirty: false,
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_format: None,
            snapshots: Vec::new(),
            qcow2: None,
            file,
        });
    };
    let h = img.header();
    let lossy = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let backing_filename = img.backing_file_name().map(lossy);
    let full_backing_filename = backing_filename
        .as_deref()
        .map(|b| combine_path(&filename, b));
    let backing_format = backing_filename
        .as_ref()
        .and_then(|_| img.backing_format())
        .map(lossy);
    let snapshots = img.snapshots().iter().map(SnapshotInfo::from).collect();
    let v3 = h.version >= 3;
    let has_data_file = h
        .incompatible
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    let qcow2 = Qcow2Info {
        compat: if v3 { "1.1" } else { "0.10" },
        compression_type: h.compression_type,
        lazy_refcounts: v3.then(|| h.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS)),
        corrupt: v3.then(|| h.incompatible.contains(IncompatibleFeatures::CORRUPT)),
        extended_l2: v3.then(|| h.has_extended_l2()),
        refcount_bits: h.refcount_bits(),
        data_file: if v3 {
            img.data_file_name().map(lossy)
        } else {
            None
        },
        data_file_raw: (v3 && has_data_file)
            .then(|| h.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW)),
        bitmaps: if v3 {
            img.bitmaps()
                .iter()
                .map(|b| BitmapInfo {
                    name: b.name.clone(),
                    granularity: 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0),
                    flags: b.flag_names(),
                })
                .collect()
        } else {
            Vec::new()
        },
        encrypt: img.encryption(),
    };
    Ok(ImageInfo {
        filename,
        format: opened.format,
        virtual_size: h.size,
        actual_size: file.actual_size,
        dirty: h.incompatible.contains(IncompatibleFeatures::DIRTY),
        cluster_size: Some(img.cluster_size()),
        backing_filename,
        full_backing_filename,
        backing_format,
        snapshots,
        qcow2: Some(qcow2),
        file,
    })
}

/// Information about `path` and every image below it, top first, as
/// `qemu-img info --backing-chain` lists them.
///
/// Each image is opened with [`open_for_info`]. The top image is opened as `format` (probed when
/// `None`); each backing file by the name resolved as QEMU combines paths, in the format the
/// image records (probed when it records none). A name that comes back is a loop
/// ([`Error::BackingLoop`]), as in qemu-img.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # create_qcow2(&dir.path().join("base.qcow2"), &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
/// # let top = dir.path().join("top.qcow2");
/// # create_qcow2(&top, &CreateOptions { backing_file: Some("base.qcow2".into()), backing_format: Some("qcow2".into()), ..Default::default() })?;
/// use qcow2kit::chain::Locking;
/// use qcow2kit::ops::info::backing_chain_info;
/// // qemu-img info --backing-chain top.qcow2
/// let chain = backing_chain_info(&top, None, Locking::Qemu)?;
/// assert_eq!(chain.len(), 2);
/// assert_eq!(chain[0].backing_filename.as_deref(), Some("base.qcow2"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn backing_chain_info(
    path: &Path,
    format: Option<Format>,
    locking: Locking,
) -> Result<Vec<ImageInfo>> {
    let mut out: Vec<ImageInfo> = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, fmt)) = next.take() {
        if out.iter().any(|i| i.filename == p.to_string_lossy()) {
            return Err(Error::BackingLoop(p));
        }
        if out.len() >= MAX_INFO_CHAIN {
            return Err(Error::BackingTooDeep(MAX_INFO_CHAIN));
        }
        let fmt = match fmt {
            Some(f) => f,
            None => probe_file(&p)?,
        };
        let info = image_info(&open_for_info(&p, fmt, locking)?)?;
        if let Some(full) = &info.full_backing_filename {
            let bfmt = match &info.backing_format {
                Some(f) => Some(Format::openable(f.as_bytes())?),
                None => None,
            };
            next = Some((PathBuf::from(full), bfmt));
        }
        out.push(info);
    }
    Ok(out)
}

/// Resolves `name` (a file name recorded in an image) against `base` (the name the image was
/// opened by) as QEMU's `path_combine` does: an absolute name or one with a protocol prefix
/// (`proto:…`) is kept, anything else replaces the last component of `base`.
pub(crate) fn combine_path(base: &str, name: &str) -> String {
    if name.starts_with('/') || has_protocol(name) {
        return name.to_string();
    }
    let dir_len = match base.rfind('/') {
        Some(i) => i + 1,
        None => {
            // "proto:rest" without a slash: keep the protocol prefix.
            if has_protocol(base) {
                base.find(':').map_or(0, |i| i + 1)
            } else {
                0
            }
        }
    };
    format!("{}{}", &base[..dir_len], name)
}

/// Whether a file name starts with a protocol prefix (a colon before any slash).
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(c) => !name[..c].contains('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_like_qemu() {
        assert_eq!(combine_path("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(combine_path("sub/t.qcow2", "b.qcow2"), "sub/b.qcow2");
        assert_eq!(combine_path("./t", "b"), "./b");
        assert_eq!(combine_path("a//t", "b"), "a//b");
        assert_eq!(combine_path("/x/t", "/abs/b"), "/abs/b");
        assert_eq!(combine_path("/x/t", "nbd:host:1"), "nbd:host:1");
        assert_eq!(combine_path("/x/t", "dir/with:colon"), "/x/dir/with:colon");
    }
}
