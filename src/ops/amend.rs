//! Changing the options of an existing qcow2 image in place (`qemu-img amend`).
//!
//! What can change, as in qemu-img 10: the version (`compat`, both ways), `lazy_refcounts`,
//! the external data file's name and its raw flag (the flag can only be cleared), and the
//! virtual size. `backing_file`/`backing_fmt` are accepted only when they name what the image
//! already records (a change is a rebase). Options only `create` takes (cluster size, extended
//! L2, compression type, preallocation, encryption) are the caller's to refuse: they are not
//! fields of [`AmendOptions`].
//!
//! Order, as QEMU's: upgrade first, then the header options, the size, and the downgrade last.
//! Every refusal is decided before anything is written, so a refused amend leaves the image as
//! it was (qemu-img may have upgraded the image, or rewritten its header, before it refuses
//! the backing file or a downgrade).
//!
//! Crash safety: each header change is one switch of cluster 0 that a crash or torn write
//! leaves old or new (see the engine's header rewrite); turning lazy refcounts off writes the
//! refcounts before the header drops the dirty bit. A downgrade first turns zero clusters into
//! unallocated or zero-filled data clusters through the ordinary write path (each step keeps
//! the guest content), then switches the version: a crash before the switch leaves a version 3
//! image with the same content.

use crate::device::{BlockDevice, ExtentKind};
use crate::engine::Qcow2Image;
use crate::error::{Error, Result};
use crate::format::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use crate::format::header::{CompressionType, V2_HEADER_LENGTH, V3_HEADER_LENGTH};
use crate::ops::convert::Progress;

/// A qcow2 version (`compat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`0.10` or `v2`).
    V2,
    /// Version 3 (`1.1` or `v3`).
    V3,
}

impl Compat {
    /// Parses qemu-img's names (`0.10`, `v2`, `1.1`, `v3`); the error is QEMU's message.
    pub fn parse(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" => Ok(Compat::V2),
            "1.1" | "v3" => Ok(Compat::V3),
            other => Err(Error::InvalidArgument(format!(
                "Unknown compatibility level {other}"
            ))),
        }
    }

    fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// The options to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// The version to convert the image to.
    pub compat: Option<Compat>,
    /// Postpone refcount updates (version 3 only). Turning it off on a dirty image writes the
    /// refcounts and clears the dirty bit.
    pub lazy_refcounts: Option<bool>,
    /// Width of a refcount entry in bits (a power of two up to 64). Only the current width is
    /// accepted for now: a change of width is refused.
    pub refcount_bits: Option<u64>,
    /// Must equal the recorded backing file name (with [`backing_fmt`](Self::backing_fmt)
    /// equal to the recorded format): a change is refused, as qemu-img refuses it.
    pub backing_file: Option<Vec<u8>>,
    /// See [`backing_file`](Self::backing_file).
    pub backing_fmt: Option<Vec<u8>>,
    /// New name of the external data file (empty: no name recorded); only for images that have
    /// one.
    pub data_file: Option<Vec<u8>>,
    /// Whether the external data file is a valid raw image; only clearing is allowed.
    pub data_file_raw: Option<bool>,
    /// New virtual size in bytes (shrinking allowed, as in qemu-img amend); 0 is ignored, as
    /// qemu-img ignores it.
    pub size: Option<u64>,
}

fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

fn unsupported(msg: &str) -> Error {
    Error::Unsupported(msg.to_string())
}

/// The error text (QEMU's) for a backing file option that differs from what is recorded.
pub const BACKING_CHANGE: &str = "Cannot amend the backing file";

/// Amends `image` (open writable) as `opts` say; see the module documentation. `progress`
/// gets (work done, work total) of the current step, as QEMU reports them: the two steps of an
/// upgrade, the L2 tables' worth of guest range visited by a downgrade. Errors
/// carry qemu-img's messages ([`Error::InvalidArgument`] where QEMU answers `EINVAL`,
/// [`Error::Unsupported`] where it answers `ENOTSUP`).
///
/// After a downgrade that drops the zstd compression type, the handle refuses further writes:
/// reopen the image.
pub fn amend(
    image: &Qcow2Image,
    opts: &AmendOptions,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    if !image.is_writable() {
        return Err(Error::ReadOnly);
    }
    let plan = Plan::new(image, opts)?;
    let report = |done: u64, total: u64| progress.is_none_or(|p| p(done, total));
    let step = |done: u64, total: u64| {
        if report(done, total) {
            Ok(())
        } else {
            Err(Error::Cancelled)
        }
    };
    if plan.upgrade {
        // QEMU's two steps: the snapshot table (entries given their version 3 extra data),
        // the header.
        step(0, 2)?;
        if image.snapshots().iter().any(|s| s.icount.is_none()) {
            image.complete_snapshot_extra_data()?;
        }
        step(1, 2)?;
    }
    image.rewrite_header(|h, ext, _| {
        if plan.upgrade {
            h.version = 3;
            h.header_length = V3_HEADER_LENGTH;
            h.extra_bytes = vec![0; (V3_HEADER_LENGTH - 105) as usize];
            h.compression_type = CompressionType::Zlib;
        }
        if let Some(name) = &opts.data_file {
            ext.data_file = (!name.is_empty()).then(|| name.clone());
        }
        if opts.data_file_raw == Some(false) {
            h.autoclear.remove(AutoclearFeatures::DATA_FILE_RAW);
        }
        match plan.lazy {
            Some(true) => h.compatible.insert(CompatibleFeatures::LAZY_REFCOUNTS),
            Some(false) => {
                h.compatible.remove(CompatibleFeatures::LAZY_REFCOUNTS);
                h.incompatible.remove(IncompatibleFeatures::DIRTY);
            }
            None => {}
        }
        Ok(())
    })?;
    if plan.upgrade {
        step(2, 2)?;
    }
    if let Some(bits) = plan.refcount_bits {
        image.change_refcount_width(bits)?;
    }
    if let Some(size) = opts.size.filter(|&s| s != 0) {
        image.resize(size, true)?;
    }
    if plan.downgrade {
        // QEMU's words when the tables stop the expansion (the corruption itself is reported
        // through the image's corruption reporter).
        image.expand_zero_clusters(&report).map_err(|e| match e {
            Error::Corrupt(_) => Error::io(
                "Failed to turn zero into data clusters",
                std::io::Error::from_raw_os_error(5),
            ),
            other => other,
        })?;
        image.expand_snapshot_zero_clusters()?;
        image.rewrite_header(|h, _, _| {
            h.version = 2;
            h.header_length = V2_HEADER_LENGTH;
            h.extra_bytes.clear();
            h.incompatible = IncompatibleFeatures::empty();
            h.compatible = CompatibleFeatures::empty();
            h.autoclear = AutoclearFeatures::empty();
            h.compression_type = CompressionType::Zlib;
            h.refcount_order = 4;
            Ok(())
        })?;
    }
    Ok(())
}

/// What an amend will do, every refusal decided.
struct Plan {
    upgrade: bool,
    /// A new refcount width.
    refcount_bits: Option<u64>,
    downgrade: bool,
    /// A change of the lazy refcounts bit.
    lazy: Option<bool>,
}

impl Plan {
    /// QEMU's checks, in QEMU's order: the options as parsed, then the operations.
    fn new(image: &Qcow2Image, opts: &AmendOptions) -> Result<Plan> {
        let h = image.header();
        let raw_now = h.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW);
        if opts.data_file.is_some() && !image.has_data_file() {
            return Err(invalid(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if opts.data_file_raw == Some(true) && !raw_now {
            return Err(invalid("data-file-raw cannot be set on existing images"));
        }
        let bits_now = 1u64 << h.refcount_order;
        if let Some(b) = opts.refcount_bits {
            if b == 0 || b > 64 || !b.is_power_of_two() {
                return Err(invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
        }
        if opts.size.is_some_and(|s| s % 512 != 0) {
            return Err(invalid("The new size must be a multiple of 512"));
        }
        let new_version = opts.compat.map_or(h.version, Compat::version);
        let bits = opts.refcount_bits.unwrap_or(bits_now);
        if bits != bits_now {
            if new_version < 3 && bits != 16 {
                return Err(invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            if image.has_data_file() {
                return Err(unsupported(
                    "changing the refcount width of an image with an external data file",
                ));
            }
        }
        if opts.backing_file.is_some() || opts.backing_fmt.is_some() {
            let same = opts.backing_file == image.backing_file_name()
                && opts.backing_fmt == image.backing_format();
            if !same {
                return Err(invalid(BACKING_CHANGE));
            }
        }
        let lazy_now = h.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS);
        let lazy = opts.lazy_refcounts.filter(|&l| l != lazy_now);
        if lazy == Some(true) && new_version < 3 {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            ));
        }
        let downgrade = new_version < h.version;
        if downgrade {
            let size = opts.size.filter(|&s| s != 0).unwrap_or(image.size());
            check_downgrade(image, bits, size)?;
        }
        Ok(Plan {
            upgrade: new_version > h.version,
            refcount_bits: (bits != bits_now).then_some(bits),
            downgrade,
            lazy,
        })
    }
}

/// QEMU's refusals of a downgrade to version 2 (`qcow2_downgrade`), in its order, and
/// qcow2kit's own: bitmaps (QEMU drops them, leaving them inconsistent and their clusters
/// leaked).
fn check_downgrade(image: &Qcow2Image, refcount_bits: u64, size: u64) -> Result<()> {
    let h = image.header();
    if refcount_bits != 16 {
        return Err(unsupported("compat=0.10 requires refcount_bits=16"));
    }
    if image.has_data_file() {
        return Err(unsupported("Cannot downgrade an image with a data file"));
    }
    let snapshot_blocks = image
        .snapshots()
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size.is_some_and(|d| d != size));
    if snapshot_blocks {
        return Err(unsupported("Internal snapshots prevent downgrade of image"));
    }
    let others =
        h.incompatible - IncompatibleFeatures::DIRTY - IncompatibleFeatures::COMPRESSION_TYPE;
    if !others.is_empty() {
        return Err(unsupported(&format!(
            "Cannot downgrade an image with incompatible features 0x{:x} set",
            others.bits()
        )));
    }
    if !image.bitmaps().is_empty() {
        return Err(unsupported(
            "Cannot downgrade an image with persistent bitmaps: version 2 cannot keep them \
             (remove them first)",
        ));
    }
    if h.compression_type == CompressionType::Zstd && has_compressed_clusters(image)? {
        return Err(unsupported(
            "Cannot downgrade an image with zstd compression type and existing compressed \
             clusters",
        ));
    }
    Ok(())
}

fn has_compressed_clusters(image: &Qcow2Image) -> Result<bool> {
    let size = image.size();
    let mut pos = 0;
    while pos < size {
        let e = image.block_status(pos, size - pos)?;
        if e.compressed && e.kind == ExtentKind::Data {
            return Ok(true);
        }
        pos += e.len;
    }
    Ok(false)
}
