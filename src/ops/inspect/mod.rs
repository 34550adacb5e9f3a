//! Examining an untrusted file before anything else touches it.
//!
//! [`inspect`] reads a file's first bytes and its tail and reports every format whose signature it
//! carries (more than one is a *polyglot*, a file that different tools would read differently),
//! and for each of them the facts that decide whether it is safe to hand to a reader, read from
//! the bytes OpenStack's `format_inspector` (oslo.utils) reads: the virtual size, files the image
//! names (qcow2/qcow/QED backing and data files, a VMDK's extents and parent, a differencing
//! VHD/VHDX/VDI), and per-format structure (qcow2 feature bits, encryption, snapshots and
//! dirty/corrupt bits; a VMDK's create type, descriptor and footer; a VHDX's region and metadata
//! tables; a LUKS version; an MBR's partition entries). Nothing the file names is opened, nothing
//! is sized by an unvalidated field, and a damaged header never makes inspection fail: its
//! problems are collected.
//!
//! [`Inspection::check`] then applies a [`Policy`] and returns the named [`Violation`]s:
//! [`Policy::strict`] for untrusted uploads, [`Policy::openstack`] mirroring the rules of
//! OpenStack's `format_inspector`, and [`Policy::trusted_local`] for images a user made
//! themselves.
//!
//! [`InspectReader`] does the same for an upload as it streams through a [`std::io::Read`], with
//! a fixed cap on the bytes it keeps (see [`stream`]).
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::ops::inspect::{inspect, Policy};
//! use qcow2kit::Format;
//!
//! // Eight sectors of zeros: raw, nothing detected, no violation.
//! let ins = inspect(&MemoryStorage::from_bytes(vec![0; 4096]))?;
//! assert_eq!(ins.format(), Format::Raw);
//! assert_eq!(ins.virtual_size(), Some(4096));
//! assert!(ins.check(&Policy::strict().declared(Format::Raw)).is_empty());
//! // Declared as qcow2, it is refused.
//! assert!(!ins.check(&Policy::strict().declared(Format::Qcow2)).is_empty());
//! # Ok::<(), qcow2kit::Error>(())
//! ```

mod disk;
mod microsoft;
mod others;
mod policy;
mod qcow2;
mod source;
pub mod stream;
mod vmdk;

pub use self::policy::{Policy, Violation};
pub use self::qcow2::{Encryption, FeatureField, Qcow2Facts};
pub use self::stream::InspectReader;
pub use crate::format::probe::{HEAD_BYTES, TAIL_BYTES};
use crate::Format;

use self::source::{Source, StorageSource};
use crate::error::{Error, Result};
use crate::format::probe::{detect, is_hybrid_iso};
use crate::format::{be_u32, MAX_CLUSTER_BITS, QCOW2_MAGIC};
use crate::io::{FileStorage, Storage};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Bytes of a file's head that facts are read from: the largest qcow2 header cluster (2 MiB),
/// which also covers a VMDK descriptor (< 1 MiB from byte 512), a VHDX region table (192 KiB)
/// and an ISO volume descriptor (32 KiB).
///
/// ```
/// assert_eq!(qcow2kit::ops::inspect::FACTS_HEAD_BYTES, 2 << 20);
/// ```
pub const FACTS_HEAD_BYTES: usize = 1 << MAX_CLUSTER_BITS;
/// Bytes of a file's tail that facts are read from: a VMDK stream-optimized footer (three
/// sectors), which covers a VHD footer and a DMG trailer (one).
///
/// ```
/// assert!(qcow2kit::ops::inspect::FACTS_TAIL_BYTES >= 512);
/// ```
pub const FACTS_TAIL_BYTES: usize = vmdk::FOOTER_BYTES;

/// What the bytes of one detected format say, whatever the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatFacts {
    /// The format.
    pub format: Format,
    /// Size of the virtual disk in bytes, as qemu-img reports it (for ISO: the primary volume
    /// descriptor's, as OpenStack reads it); `None` when the bytes do not tell.
    pub virtual_size: Option<u64>,
    /// The variant, where the format has several: a VMDK's create type (lower case), a VHD's
    /// disk type (`fixed`, `dynamic`, `differencing`), a VDI's image type, `luks1`/`luks2`.
    pub subformat: Option<String>,
    /// The rules of this format the file breaks, whatever the policy: [`Inspection::check`]
    /// keeps those its policy enforces.
    pub findings: Vec<Violation>,
}

impl FormatFacts {
    fn new(format: Format) -> Self {
        FormatFacts {
            format,
            virtual_size: None,
            subformat: None,
            findings: Vec::new(),
        }
    }
}

/// The result of [`inspect`] (or of a streaming [`InspectReader`]).
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::ops::inspect::{inspect, Policy};
/// use std::sync::Arc;
/// let upload = Arc::new(MemoryStorage::new());
/// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// let found = inspect(upload.as_ref())?;
/// assert_eq!(found.format(), qcow2kit::Format::Qcow2);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Length of the file in bytes.
    pub file_size: u64,
    /// Every format whose signature was found: head signatures first, then the tail's (a VHD
    /// footer, a DMG trailer). Empty for raw data.
    pub detected: Vec<Format>,
    /// qcow2 header facts, when the file starts with `QFI\xfb`.
    pub qcow2: Option<Qcow2Facts>,
    /// Facts of each detected format, in the order of [`detected`](Inspection::detected); for
    /// raw data (nothing detected), one entry for [`Format::Raw`].
    pub formats: Vec<FormatFacts>,
    /// Whether every byte a fact needs was available. Always true for [`inspect`]; false when a
    /// streaming inspector had to let bytes pass that a fact needed (see [`stream`]), in which
    /// case [`check`](Inspection::check) reports [`Violation::Incomplete`].
    pub complete: bool,
}

impl Inspection {
    /// The file's format: the one detected, [`Format::Raw`] if none; for a polyglot, the first
    /// detected (a probing reader may pick another: qemu-img takes a qcow2 image carrying a VDI
    /// signature for VDI).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert_eq!(found.format().name(), "qcow2");
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn format(&self) -> Format {
        self.detected.first().copied().unwrap_or(Format::Raw)
    }

    /// Whether more than one format was detected (a hybrid ISO, `iso` + `gpt`, excepted).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(!found.is_polyglot());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn is_polyglot(&self) -> bool {
        self.detected.len() > 1 && !is_hybrid_iso(&self.detected)
    }

    /// The facts of [`format`](Inspection::format).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(found.facts().is_some()); // the qcow2 header's fields
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn facts(&self) -> Option<&FormatFacts> {
        self.formats.iter().find(|f| f.format == self.format())
    }

    /// The virtual disk size of [`format`](Inspection::format), if its bytes tell.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert_eq!(found.virtual_size(), Some(1 << 20));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn virtual_size(&self) -> Option<u64> {
        self.facts().and_then(|f| f.virtual_size)
    }
}

/// Inspects the file at `path`, refusing anything but a regular file or a block device before
/// opening it (opening a FIFO would block).
///
/// ```
/// use qcow2kit::ops::inspect::inspect_path;
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("upload.iso");
/// std::fs::write(&path, vec![0u8; 4096])?;
/// assert_eq!(inspect_path(&path)?.format(), qcow2kit::Format::Raw);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn inspect_path(path: &Path) -> Result<Inspection> {
    let ctx = || format!("opening '{}'", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(ctx(), e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::Unsupported(format!(
            "'{}' is not a regular file or block device",
            path.display()
        )));
    }
    let storage = FileStorage::open_with(path, false, None).map_err(|e| Error::io(ctx(), e))?;
    inspect(&storage)
}

/// Inspects the bytes of `storage`: at most its first 2 MiB, its last 1536 bytes, and a few
/// small structures they point to (a backing file name, a VHDX metadata table and items). Fails
/// only on I/O errors.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::ops::inspect::{inspect, Policy};
/// use std::sync::Arc;
/// let upload = Arc::new(MemoryStorage::new());
/// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// let found = inspect(upload.as_ref())?;
/// assert!(found.check(&Policy::openstack()).is_empty());
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn inspect(storage: &dyn Storage) -> Result<Inspection> {
    let size = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    analyze(&mut StorageSource { storage, size })
}

/// Every fact, from whatever `src` holds. Shared by the random-access and streaming inspectors.
fn analyze(src: &mut dyn Source) -> Result<Inspection> {
    let file_size = src.file_size();
    let head = src.read(0, FACTS_HEAD_BYTES)?.unwrap_or_default();
    let probe_area = &head[..head.len().min(HEAD_BYTES as usize)];
    let tail = src.tail(TAIL_BYTES as usize)?;
    let tail = tail.as_deref().filter(|t| t.len() == TAIL_BYTES as usize);
    let detected = detect(probe_area, tail);
    let qcow2 = if head.len() >= 4 && be_u32(&head, 0) == QCOW2_MAGIC {
        Some(qcow2::qcow2_facts(src, &head)?)
    } else {
        None
    };
    let mut formats = Vec::new();
    for &f in &detected {
        formats.push(format_facts(src, f, &head, qcow2.as_ref())?);
    }
    if detected.is_empty() {
        let mut raw = FormatFacts::new(Format::Raw);
        raw.virtual_size = Some(file_size);
        formats.push(raw);
    }
    Ok(Inspection {
        file_size,
        detected,
        qcow2,
        formats,
        complete: true,
    })
}

fn format_facts(
    src: &mut dyn Source,
    format: Format,
    head: &[u8],
    qcow2: Option<&Qcow2Facts>,
) -> Result<FormatFacts> {
    Ok(match format {
        Format::Qcow2 | Format::Qcow => {
            // The qcow2 facts carry its rules; a version 1 header keeps its size at the same
            // offset.
            let mut f = FormatFacts::new(format);
            f.virtual_size = qcow2.map(|q| q.virtual_size);
            f
        }
        Format::Vmdk => vmdk::facts(src, head)?,
        Format::Vpc => microsoft::vhd_facts(src, head)?,
        Format::Vhdx => microsoft::vhdx_facts(src, head)?,
        Format::Vdi => others::vdi(head),
        Format::Qed => others::qed(src, head)?,
        Format::Luks => others::luks(src, head),
        Format::Parallels => others::parallels(head),
        Format::Bochs => others::bochs(head),
        Format::Cloop => others::cloop(head),
        Format::Dmg => others::dmg(src)?,
        Format::Iso => disk::iso(head),
        Format::Gpt => disk::partition_table(head, src.file_size()),
        Format::Raw => {
            let mut f = FormatFacts::new(Format::Raw);
            f.virtual_size = Some(src.file_size());
            f
        }
    })
}

#[cfg(test)]
mod tests;
