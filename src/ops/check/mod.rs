//! Read-only consistency check of a qcow2 image: what `qemu-img check` does without `-r`.
//!
//! The check walks every piece of metadata straight from the storage with the codecs of
//! [`crate::format`] — never through the engine, which refuses damaged images — and builds the
//! reference count every host cluster should have: the header, the active and every snapshot's
//! L1 and L2 tables and the clusters they map (a compressed cluster counts every host cluster
//! its bytes touch), the snapshot table, the refcount table and blocks, the LUKS header area
//! and the bitmap directory, tables and data. It then compares that with the stored refcounts
//! and checks the COPIED flag (bit 63) of every active L1 and L2 entry against them.
//!
//! Results are reported in qemu-img's terms ([`CheckReport`]: corruptions, leaks, internal
//! errors, image end offset and allocation statistics), each problem as a [`Finding`] whose
//! `Display` is the line qemu-img prints for it, and the order of the walk is QEMU's
//! (`qcow2_check_refcounts`, qemu 10.0), so that counts match qemu-img's on damaged images too.
//!
//! # Bounds
//!
//! Memory is bounded by the file: the expected refcounts take two bytes per host cluster of the
//! file (plus one; more than `i32::MAX` clusters is refused like QEMU does); tables are read in
//! chunks and only where they lie inside the file (QEMU reads zeros past the end, and zeros
//! reference nothing). Work is bounded too: every L2 table is read once however many L1 entries
//! point to it (the effect of later visits is replayed), and the metadata bytes read may not
//! exceed [`work_limit`] of the file size; a hostile image that needs more stops the check with
//! [`CheckFailure::WorkLimit`] instead of grinding for hours.
//!
//! # Differences from qemu-img
//!
//! - The header is validated as QEMU's open does in check mode (tables are *not* required to lie
//!   inside the file); headers QEMU cannot open fail with an [`Error`] (qemu-img: "Could not
//!   open"), with qcow2kit's wording.
//! - Messages about an L2 table come after those of the L1 entries of the same L1 table when
//!   an L1 table is seen twice (never in images QEMU writes); counts are unaffected.
//! - A broken bitmap directory or table is reported with a [`Finding`] (QEMU prints nothing).
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::ops::check::check;
//! use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
//! use std::sync::Arc;
//! let file = Arc::new(MemoryStorage::new());
//! create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
//! let report = check(file.as_ref())?;
//! assert!(report.is_clean());
//! # Ok::<(), qcow2kit::Error>(())
//! ```

mod bitmap_walk;
mod l2_walk;
mod refcounts;
mod repair;
mod report;
mod snapshot_walk;
mod stored;
#[cfg(test)]
mod tests;
mod walk;

pub use repair::{repair, RepairMode, RepairReport};
pub use report::{CheckFailure, CheckReport, Finding};

use crate::error::{Corruption, Error, Result};
use crate::format::extension::{Extensions, EXT_CRYPTO};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::{CryptMethod, Header};
use crate::format::parse_first_cluster;
use crate::format::{MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::io::{Storage, StorageExt};
use walk::{Fix, Stop, Walk};

/// Bytes read at once from a large table.
const CHUNK: u64 = 64 << 10;
/// L2 table findings remembered for replay on later visits of the same table.
const MAX_CACHED_FINDINGS: usize = 256;
/// Findings [`check`] keeps in its report (the rest are counted).
pub const MAX_REPORTED_FINDINGS: usize = 10_000;
/// Findings passed to a sink before the rest are suppressed (counts stay exact).
pub const MAX_EMITTED_FINDINGS: u64 = 1_000_000;

/// Metadata bytes the check may read, for a file of `file_len` bytes: every table of an image
/// QEMU writes is read at most three times (walk, replay of shared L2 tables, COPIED check),
/// so four times the file plus 256 MiB is never reached by an honest image.
pub fn work_limit(file_len: u64) -> u64 {
    file_len.saturating_mul(4).saturating_add(256 << 20)
}

/// Checks the qcow2 image on `storage`, keeping the first [`MAX_REPORTED_FINDINGS`] findings in
/// the report. Fails (with the rule broken) only when the header cannot be opened, as qemu-img
/// fails with "Could not open", or on I/O errors; everything else is in the report.
///
/// ```
/// use qcow2kit::io::{MemoryStorage, Storage};
/// use qcow2kit::ops::check::check;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use std::sync::Arc;
/// let file = Arc::new(MemoryStorage::new());
/// create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// // A cluster nothing references, counted once: a leak, as qemu-img check reports it.
/// // (Header, refcount table, refcount block and L1 table are clusters 0 to 3.)
/// let mut bytes = file.to_bytes();
/// bytes.resize(5 * 65536, 0);
/// bytes[2 * 65536 + 8..2 * 65536 + 10].copy_from_slice(&1u16.to_be_bytes()); // cluster 4
/// let damaged = MemoryStorage::from_bytes(bytes);
/// let report = check(&damaged)?;
/// assert_eq!((report.leaks, report.corruptions), (1, 0));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    let mut kept = Vec::new();
    let mut omitted = 0u64;
    let mut report = Checker::new(storage)?.run(&mut |f: &Finding| {
        if kept.len() < MAX_REPORTED_FINDINGS {
            kept.push(f.clone());
        } else {
            omitted += 1;
        }
    })?;
    report.findings = kept;
    report.findings_omitted = omitted;
    Ok(report)
}

/// A qcow2 image whose header has been validated for checking (QEMU's open in check mode), to
/// be [`run`](Checker::run). The two steps let a caller look at the header (backing and data
/// files, encryption) between them, as qemu-img opens those before it checks.
#[derive(Debug)]
pub struct Checker<'a> {
    storage: &'a dyn Storage,
    file_len: u64,
    header: Header,
    extensions: Extensions,
    backing_name: Option<Vec<u8>>,
}

impl<'a> Checker<'a> {
    /// Reads and validates the header and its extensions the way QEMU's open does for a check:
    /// table offsets aligned and without overflow, sizes within QEMU's limits, known
    /// incompatible features; tables are not required to lie inside the file.
    pub fn new(storage: &'a dyn Storage) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        let first = storage
            .read_vec(0, file_len.min(1 << MAX_CLUSTER_BITS) as usize)
            .map_err(|e| Error::io("reading header", e))?;
        let (header, extensions) = parse_first_cluster(&first)?;
        let cs = header.cluster_size();
        validate_for_check(&header)?;
        if let Some(c) = &extensions.crypto {
            if header.crypt_method != CryptMethod::Luks {
                return Err(Corruption::BadExtension {
                    kind: EXT_CRYPTO,
                    rule: "an encryption header extension needs LUKS encryption",
                }
                .into());
            }
            if c.offset % cs != 0 {
                return Err(Corruption::BadExtension {
                    kind: EXT_CRYPTO,
                    rule: "the encryption header offset is not cluster-aligned",
                }
                .into());
            }
        }
        if let Some(b) = &extensions.bitmaps {
            if header.autoclear.contains(AutoclearFeatures::BITMAPS) && b.directory_offset % cs != 0
            {
                return Err(Corruption::BadExtension {
                    kind: crate::format::extension::EXT_BITMAPS,
                    rule: "the bitmap directory offset is not cluster-aligned",
                }
                .into());
            }
        }
        let backing_name = if header.backing_file_offset != 0 {
            let name = storage
                .read_vec(
                    header.backing_file_offset,
                    header.backing_file_size as usize,
                )
                .map_err(|e| Error::io("reading backing file name", e))?;
            Some(name)
        } else {
            None
        };
        Ok(Checker {
            storage,
            file_len,
            header,
            extensions,
            backing_name,
        })
    }

    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image's header extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The backing file name as stored, if the image names one.
    pub fn backing_file_name(&self) -> Option<&[u8]> {
        self.backing_name.as_deref()
    }

    /// Runs the check, passing each finding to `sink` as it is found (at most
    /// [`MAX_EMITTED_FINDINGS`], then one [`Finding::Suppressed`]). Errors are I/O errors only.
    pub fn run(self, sink: &mut dyn FnMut(&Finding)) -> Result<CheckReport> {
        let h = &self.header;
        let mut report = CheckReport {
            dirty: h.incompatible.contains(IncompatibleFeatures::DIRTY),
            marked_corrupt: h.incompatible.contains(IncompatibleFeatures::CORRUPT),
            ..CheckReport::default()
        };
        let mut w = Walk::new(&self, &mut report, sink, Fix::NONE);
        match w.run(&self) {
            Ok(()) => {}
            Err(Stop::Failed(f)) => w.report.failure = Some(f),
            Err(Stop::Io(e)) => return Err(e),
        }
        Ok(report)
    }
}

/// QEMU's checks at open (`qcow2_do_open`, `qcow2_validate_table`) that a check depends on.
fn validate_for_check(h: &Header) -> Result<(), Corruption> {
    let cs = h.cluster_size();
    let bad = |field, value, rule| Corruption::BadField { field, value, rule };
    let bad_table = |table, offset, size, rule| Corruption::BadTable {
        table,
        offset,
        size,
        rule,
    };
    if h.refcount_order > 6 {
        return Err(bad(
            "refcount_order",
            h.refcount_order.into(),
            "must be at most 6",
        ));
    }
    if h.has_extended_l2() && h.cluster_bits < 14 {
        return Err(bad(
            "cluster_bits",
            h.cluster_bits.into(),
            "extended L2 entries need a cluster size of at least 16 KiB",
        ));
    }
    if h.backing_file_offset != 0 {
        if h.backing_file_offset > cs {
            return Err(bad(
                "backing_file_offset",
                h.backing_file_offset,
                "must lie in the first cluster",
            ));
        }
        if h.backing_file_size > MAX_BACKING_NAME
            || u64::from(h.backing_file_size) > cs - h.backing_file_offset
        {
            return Err(bad(
                "backing_file_size",
                h.backing_file_size.into(),
                "backing file name is too long",
            ));
        }
    }
    // Offsets QEMU passes on as int64_t.
    let fits = |offset: u64, size: u64| {
        size <= i64::MAX as u64 && offset <= i64::MAX as u64 - size && offset % cs == 0
    };
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(bad_table(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            "larger than 8 MiB",
        ));
    }
    if !fits(h.refcount_table_offset, rt_bytes) {
        return Err(bad_table(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            "offset is not cluster-aligned or overflows",
        ));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(bad_table(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            "larger than 32 MiB",
        ));
    }
    let needed = h
        .l1_entries_for(h.size)
        .filter(|&n| n <= i32::MAX as u64)
        .ok_or_else(|| bad("size", h.size, "virtual size is too large"))?;
    if u64::from(h.l1_size) < needed {
        return Err(bad(
            "l1_size",
            h.l1_size.into(),
            "L1 table is too small for the virtual size",
        ));
    }
    if !fits(h.l1_table_offset, l1_bytes) {
        return Err(bad_table(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            "offset is not cluster-aligned or overflows",
        ));
    }
    Ok(())
}
