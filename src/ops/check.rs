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

use crate::error::{Corruption, Error, Result};
use crate::format::entry::{
    classify, ClusterKind, CompressedDescriptor, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK,
    ZERO,
};
use crate::format::extension::{Extensions, EXT_CRYPTO};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::{CryptMethod, Header, SNAPSHOT_HEADER_SIZE};
use crate::format::parse_first_cluster;
use crate::format::snapshot::parse_table;
use crate::format::{
    be_u16, be_u32, be_u64, refcount, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
};
use crate::io::{Storage, StorageExt};
use std::collections::HashMap;
use std::fmt;

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Bits 0..=8 of a refcount table entry: reserved.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Reserved bits of a bitmap table entry.
const BME_TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Largest bitmap table QEMU accepts, in entries.
const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap QEMU accepts, in bytes of bitmap data.
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bitmap directory flags other than in_use and auto.
const BME_RESERVED_FLAGS: u32 = !3;
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

/// The outcome of a check, in qemu-img's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors (metadata that could not be read, e.g. an unaligned refcount block).
    pub check_errors: u64,
    /// Corruptions: references the refcounts do not cover, wrong COPIED flags, bad entries.
    pub corruptions: u64,
    /// Leaked clusters: refcounts higher than the references.
    pub leaks: u64,
    /// `(highest used cluster + 1) × cluster size`.
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Clusters the active L2 tables map (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one of their L2 table (every
    /// compressed cluster counts).
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// The check stopped early (qemu-img: "Check failed: …"); the counts are partial.
    pub failure: Option<CheckFailure>,
    /// The image is marked dirty (lazy refcounts not yet rebuilt).
    pub dirty: bool,
    /// The image is marked corrupt.
    pub marked_corrupt: bool,
    /// The first [`MAX_REPORTED_FINDINGS`] findings (filled by [`check`] only).
    pub findings: Vec<Finding>,
    /// Findings not kept in `findings`.
    pub findings_omitted: u64,
}

impl CheckReport {
    /// qemu-img's exit code: 1 check failed or internal errors, 2 corruptions, 3 leaks only,
    /// 0 clean.
    pub fn exit_code(&self) -> u8 {
        if self.failure.is_some() || self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// Why a check stopped before the end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckFailure {
    /// Metadata that cannot be interpreted (QEMU: `EINVAL`).
    Invalid(String),
    /// A table or the image is too large (QEMU: `EFBIG`).
    TooLarge(String),
    /// Checking would read more than [`work_limit`] bytes of metadata.
    WorkLimit {
        /// The limit, in bytes.
        limit: u64,
    },
}

impl CheckFailure {
    /// The text qemu-img prints after "Check failed: " (`strerror` of QEMU's errno; for the
    /// work limit, which QEMU does not have, the limit itself).
    pub fn qemu_message(&self) -> String {
        match self {
            CheckFailure::Invalid(_) => "Invalid argument".into(),
            CheckFailure::TooLarge(_) => "File too large".into(),
            CheckFailure::WorkLimit { .. } => self.to_string(),
        }
    }
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Invalid(s) | CheckFailure::TooLarge(s) => f.write_str(s),
            CheckFailure::WorkLimit { limit } => write!(
                f,
                "checking would read more than {limit} bytes of metadata (hostile image?)"
            ),
        }
    }
}

/// One problem found by the check. `Display` gives the line qemu-img prints for it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// A snapshot table entry of a v3 image without its 16 bytes of extra data (corruption).
    SnapshotIncomplete {
        /// Index in the table.
        index: u32,
    },
    /// The snapshot table cannot be read (internal error; the check stops).
    SnapshotTable {
        /// QEMU's message.
        message: String,
        /// QEMU's hint line, if any.
        hint: Option<String>,
    },
    /// A reference to bytes one cluster or more past the end of the file (corruption).
    RegionPastEof {
        /// Start of the region.
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// A cluster referenced more often than the refcount width can count (corruption).
    RefcountOverflow {
        /// The cluster's offset.
        offset: u64,
    },
    /// An L1 entry with reserved bits set (corruption).
    L1ReservedBits {
        /// The entry.
        entry: u64,
    },
    /// An L2 table offset that is not cluster-aligned (corruption).
    L2Unaligned {
        /// The offset.
        l2_offset: u64,
    },
    /// An L2 entry with reserved bits set (corruption).
    L2ReservedBits {
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry with the COPIED flag (corruption).
    CompressedCopied {
        /// Host offset of the compressed data.
        coffset: u64,
    },
    /// A compressed cluster in an image with an external data file (corruption).
    CompressedWithDataFile {
        /// Index in its L2 table.
        index: u32,
        /// The entry.
        entry: u64,
    },
    /// A compressed cluster with a non-zero subcluster bitmap (corruption).
    CompressedWithBitmap {
        /// Index in its L2 table.
        index: u32,
        /// The entry.
        entry: u64,
    },
    /// An allocated cluster whose subcluster is both allocated and zero (corruption).
    BadSubclusterBitmap {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// A cluster offset that is not cluster-aligned (corruption).
    UnalignedCluster {
        /// The offset.
        offset: u64,
        /// Whether it holds data (else it is a preallocated zero cluster).
        data: bool,
    },
    /// An unallocated cluster with allocated subclusters (corruption).
    UnallocatedWithBitmap,
    /// Snapshots in an image with an external data file (corruption).
    SnapshotsWithDataFile {
        /// How many.
        count: u32,
    },
    /// A snapshot whose L1 table is not cluster-aligned (corruption).
    SnapshotL1Unaligned {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// The offset.
        offset: u64,
    },
    /// A snapshot whose L1 table is over 32 MiB (corruption).
    SnapshotL1TooLarge {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// Its entries.
        l1_size: u32,
    },
    /// The bitmap directory is unusable (corruption; the check stops).
    BitmapDirectory {
        /// What is wrong.
        reason: String,
    },
    /// A bitmap table has an invalid entry (corruption; the check stops).
    BitmapTable {
        /// The bitmap's name.
        name: String,
    },
    /// A refcount table entry with reserved bits set (corruption).
    RefblockReservedBits {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount block that is not cluster-aligned (corruption).
    RefblockUnaligned {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount block past the end of the file (corruption).
    RefblockOutside {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount block also used as something else (corruption).
    RefblockShared {
        /// Index in the refcount table.
        index: u64,
        /// Its reference count.
        refcount: u64,
    },
    /// QEMU's one-time notice when a refcount block cannot be used.
    ImageCorrupt {
        /// The refcount block's offset.
        offset: u64,
        /// Its index in the refcount table.
        index: u64,
    },
    /// A cluster whose refcount cannot be read (internal error).
    RefcountUnreadable {
        /// Cluster index.
        cluster: u64,
    },
    /// A refcount lower than the references (corruption).
    RefcountTooLow {
        /// Cluster index.
        cluster: u64,
        /// Stored refcount.
        refcount: u64,
        /// References found.
        reference: u64,
    },
    /// A refcount higher than the references (leak).
    Leaked {
        /// Cluster index.
        cluster: u64,
        /// Stored refcount.
        refcount: u64,
        /// References found.
        reference: u64,
    },
    /// An L1 entry whose COPIED flag disagrees with its L2 table's refcount (corruption).
    CopiedL2 {
        /// Index in the active L1 table.
        l1_index: u64,
        /// The entry.
        l1_entry: u64,
        /// The L2 table's refcount.
        refcount: u64,
    },
    /// An L2 entry whose COPIED flag disagrees with its cluster's refcount (corruption).
    CopiedData {
        /// The entry.
        l2_entry: u64,
        /// The cluster's refcount.
        refcount: u64,
    },
    /// Emission stopped after [`MAX_EMITTED_FINDINGS`]; counts stay exact.
    Suppressed,
}

impl Finding {
    /// Whether qemu-img prints this line through `error_report` (prefixed with the program
    /// name) rather than a bare `fprintf`.
    pub fn is_error_report(&self) -> bool {
        matches!(self, Finding::SnapshotTable { .. })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::SnapshotIncomplete { index } => {
                write!(f, "ERROR snapshot table entry {index} is incomplete")
            }
            Finding::SnapshotTable { message, hint } => {
                write!(f, "{message}")?;
                if let Some(h) = hint {
                    write!(f, "\n{h}")?;
                }
                Ok(())
            }
            Finding::RegionPastEof { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset_h} size {size_h}",
                offset_h = CHex(*offset),
                size_h = CHex(*size)
            ),
            Finding::RefcountOverflow { offset } => write!(
                f,
                "ERROR: overflow cluster offset={offset_h}\nUse qemu-img amend to increase the \
                 refcount entry width or qemu-img convert to create a clean copy if the image \
                 cannot be opened for writing",
                offset_h = CHex(*offset)
            ),
            Finding::L1ReservedBits { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            Finding::L2Unaligned { l2_offset } => write!(
                f,
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Finding::L2ReservedBits { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            Finding::CompressedCopied { coffset } => write!(
                f,
                "ERROR: coffset={coffset_h}: copied flag must never be set for compressed \
                 clusters",
                coffset_h = CHex(*coffset)
            ),
            Finding::CompressedWithDataFile { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with data file, entry={entry_h}",
                entry_h = CHex(*entry)
            ),
            Finding::CompressedWithBitmap { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, \
                 entry={entry_h}",
                entry_h = CHex(*entry)
            ),
            Finding::BadSubclusterBitmap { offset } => write!(
                f,
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation \
                 bitmap"
            ),
            Finding::UnalignedCluster { offset, data } => write!(
                f,
                "ERROR offset={offset:x}: {} cluster is not properly aligned; L2 entry corrupted.",
                if *data { "Data" } else { "Preallocated" }
            ),
            Finding::UnallocatedWithBitmap => write!(
                f,
                "ERROR: Unallocated cluster has non-zero subcluster allocation map"
            ),
            Finding::SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            Finding::SnapshotL1Unaligned { id, name, offset } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_offset={offset_h}: L1 table is not cluster \
                 aligned; snapshot table entry corrupted",
                offset_h = CHex(*offset)
            ),
            Finding::SnapshotL1TooLarge { id, name, l1_size } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_size={l1_size_h}: L1 table is too large; \
                 snapshot table entry corrupted",
                l1_size_h = CHex(u64::from(*l1_size))
            ),
            Finding::BitmapDirectory { reason } => {
                write!(f, "ERROR bitmap directory: {reason}")
            }
            Finding::BitmapTable { name } => {
                write!(f, "ERROR bitmap '{name}': invalid bitmap table entry")
            }
            Finding::RefblockReservedBits { index } => write!(
                f,
                "ERROR refcount table entry {index} has reserved bits set"
            ),
            Finding::RefblockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                 corrupted"
            ),
            Finding::RefblockOutside { index } => {
                write!(f, "ERROR refcount block {index} is outside image")
            }
            Finding::RefblockShared { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            Finding::ImageCorrupt { offset, index } => write!(
                f,
                "qcow2: Image is corrupt: Refblock offset {offset_h} unaligned (reftable index: \
                 {index_h}); further non-fatal corruption events will be suppressed",
                offset_h = CHex(*offset),
                index_h = CHex(*index)
            ),
            Finding::RefcountUnreadable { cluster } => write!(
                f,
                "Can't get refcount for cluster {cluster}: Input/output error"
            ),
            Finding::RefcountTooLow {
                cluster,
                refcount,
                reference,
            } => write!(
                f,
                "ERROR cluster {cluster} refcount={refcount} reference={reference}"
            ),
            Finding::Leaked {
                cluster,
                refcount,
                reference,
            } => write!(
                f,
                "Leaked cluster {cluster} refcount={refcount} reference={reference}"
            ),
            Finding::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
            } => write!(
                f,
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} \
                 refcount={refcount}"
            ),
            Finding::CopiedData { l2_entry, refcount } => write!(
                f,
                "ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}"
            ),
            Finding::Suppressed => write!(
                f,
                "(further messages suppressed after {MAX_EMITTED_FINDINGS}; counts are exact)"
            ),
        }
    }
}

/// C's `%#x`: `0x` and lower-case hex digits, but a bare `0` for zero.
struct CHex(u64);

impl fmt::Display for CHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

/// Checks the qcow2 image on `storage`, keeping the first [`MAX_REPORTED_FINDINGS`] findings in
/// the report. Fails (with the rule broken) only when the header cannot be opened, as qemu-img
/// fails with "Could not open", or on I/O errors; everything else is in the report.
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
        let cs = h.cluster_size();
        let nb_clusters = self.file_len.div_ceil(cs);
        let mut report = CheckReport {
            dirty: h.incompatible.contains(IncompatibleFeatures::DIRTY),
            marked_corrupt: h.incompatible.contains(IncompatibleFeatures::CORRUPT),
            ..CheckReport::default()
        };
        let mut w = Walk {
            storage: self.storage,
            file_len: self.file_len,
            cb: h.cluster_bits,
            cs,
            order: h.refcount_order,
            extended: h.has_extended_l2(),
            data_file: h.has_data_file(),
            report: &mut report,
            sink,
            emitted: 0,
            budget: work_limit(self.file_len),
            limit: work_limit(self.file_len),
            expected: Expected::new(0, refcount::max_value(h.refcount_order)),
            nb_clusters,
            l2_cache: HashMap::new(),
            pending: Vec::new(),
            pending_index: HashMap::new(),
            copied_cache: HashMap::new(),
        };
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

/// Why a walk stopped.
enum Stop {
    Failed(CheckFailure),
    Io(Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(Error::io("reading metadata", e))
    }
}

type Step<T = ()> = std::result::Result<T, Stop>;

/// Expected refcounts: two bytes per cluster, the rare larger counts in a map.
struct Expected {
    counts: Vec<u16>,
    big: HashMap<u64, u64>,
    max: u64,
}

impl Expected {
    fn new(len: usize, max: u64) -> Self {
        Expected {
            counts: vec![0; len],
            big: HashMap::new(),
            max,
        }
    }

    fn get(&self, k: u64) -> u64 {
        match self.counts.get(k as usize) {
            None | Some(0) => 0,
            Some(&u16::MAX) => self.big.get(&k).copied().unwrap_or(0),
            Some(&c) => u64::from(c),
        }
    }

    /// Adds `n` references to cluster `k`; returns how many did not fit the refcount width.
    fn add(&mut self, k: u64, n: u64) -> u64 {
        let i = k as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        let cur = self.get(k);
        let room = self.max - cur;
        let added = n.min(room);
        let new = cur + added;
        if new >= u64::from(u16::MAX) {
            self.counts[i] = u16::MAX;
            self.big.insert(k, new);
        } else {
            self.counts[i] = new as u16;
        }
        n - added
    }
}

/// What one visit of an L2 table contributes, replayed on later visits.
#[derive(Default)]
struct L2Summary {
    corruptions: u64,
    findings: Vec<Finding>,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// What the COPIED check of one L2 table finds, replayed for every active L1 entry naming it.
#[derive(Default)]
struct CopiedSummary {
    corruptions: u64,
    findings: Vec<Finding>,
}

/// Stored refcounts, read block by block with a small cache.
struct RefcountReader {
    /// The in-file part of the refcount table (entries past the end of the file are zero).
    table: Vec<u64>,
    /// log2 of entries per refcount block.
    block_bits: u32,
    cache: Vec<(u64, Vec<u8>)>,
}

enum Lookup {
    Value(u64),
    Unaligned { offset: u64, index: u64 },
}

/// The state of one check.
struct Walk<'a, 'b> {
    storage: &'a dyn Storage,
    file_len: u64,
    cb: u32,
    cs: u64,
    order: u32,
    extended: bool,
    data_file: bool,
    report: &'b mut CheckReport,
    sink: &'b mut dyn FnMut(&Finding),
    emitted: u64,
    budget: u64,
    limit: u64,
    expected: Expected,
    nb_clusters: u64,
    l2_cache: HashMap<u64, L2Summary>,
    /// L2 tables visited more than once, with the visits whose references are not yet counted.
    pending: Vec<(u64, u64)>,
    pending_index: HashMap<u64, usize>,
    copied_cache: HashMap<u64, CopiedSummary>,
}

/// A snapshot as the check needs it.
struct SnapInfo {
    l1_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
}

impl Walk<'_, '_> {
    fn emit(&mut self, f: &Finding, times: u64) {
        for _ in 0..times {
            if self.emitted < MAX_EMITTED_FINDINGS {
                (self.sink)(f);
            } else if self.emitted == MAX_EMITTED_FINDINGS {
                (self.sink)(&Finding::Suppressed);
            } else {
                return;
            }
            self.emitted += 1;
        }
    }

    fn corrupt(&mut self, f: Finding, times: u64) {
        self.report.corruptions += times;
        self.emit(&f, times);
    }

    /// Reads `len` bytes at `offset` (zeros past the end of the file), charging the budget for
    /// the bytes that lie inside the file.
    fn read(&mut self, offset: u64, len: u64) -> Step<Vec<u8>> {
        let inside = self.file_len.saturating_sub(offset).min(len);
        if inside > self.budget {
            return Err(Stop::Failed(CheckFailure::WorkLimit { limit: self.limit }));
        }
        self.budget -= inside;
        let mut buf = vec![0u8; len as usize];
        if inside > 0 {
            self.storage.read_at(&mut buf[..inside as usize], offset)?;
        }
        Ok(buf)
    }

    /// Bytes of `[offset, offset + len)` that lie inside the file (the rest reads as zeros).
    fn in_file(&self, offset: u64, len: u64) -> u64 {
        self.file_len.saturating_sub(offset).min(len)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`, `mult` times: counts the clusters of a region, or
    /// reports it if it ends a cluster or more past the end of the file. Returns the finding
    /// and corruption count it produced (not yet emitted or counted) when `defer` is set.
    fn inc(&mut self, offset: u64, size: u64, mult: u64) {
        if let Some(f) = self.inc_region(offset, size, mult) {
            self.corrupt(f, mult);
        }
    }

    /// The counting part of [`inc`](Walk::inc); returns the past-the-end finding instead of
    /// reporting it.
    fn inc_region(&mut self, offset: u64, size: u64, mult: u64) -> Option<Finding> {
        if size == 0 || mult == 0 || size > i64::MAX as u64 {
            return None;
        }
        let past = match offset.checked_add(size) {
            Some(end) => offset > i64::MAX as u64 || end >= self.file_len.saturating_add(self.cs),
            None => true,
        };
        if past {
            return Some(Finding::RegionPastEof { offset, size });
        }
        let first = offset >> self.cb;
        let last = (offset + size - 1) >> self.cb;
        for k in first..=last {
            if k >= self.nb_clusters {
                self.nb_clusters = k + 1;
            }
            let over = self.expected.add(k, mult);
            if over > 0 {
                self.corrupt(
                    Finding::RefcountOverflow {
                        offset: k << self.cb,
                    },
                    over,
                );
            }
        }
        None
    }

    fn run(&mut self, c: &Checker<'_>) -> Step {
        let h = &c.header;
        // QEMU refuses more than INT_MAX clusters before allocating its table.
        if self.nb_clusters > i32::MAX as u64 {
            self.report.check_errors += 1;
            return Err(Stop::Failed(CheckFailure::TooLarge(
                "the image has more than 2^31 clusters".into(),
            )));
        }
        self.expected = Expected::new(
            self.nb_clusters as usize + 1,
            refcount::max_value(self.order),
        );
        let virtual_bytes = h.size.div_ceil(512).saturating_mul(512);
        self.report.total_clusters = virtual_bytes.div_ceil(self.cs);

        let (snapshots, snapshots_size) = self.read_snapshot_table(h)?;

        // calculate_refcounts(): header, active L1, snapshots, their table, refcount table,
        // encryption header, bitmaps, refcount blocks.
        self.inc(0, self.cs, 1);
        self.walk_l1(h.l1_table_offset, h.l1_size, 1, true)?;
        if self.data_file && h.nb_snapshots > 0 {
            self.corrupt(
                Finding::SnapshotsWithDataFile {
                    count: h.nb_snapshots,
                },
                1,
            );
        }
        let mut groups: Vec<((u64, u32), u64)> = Vec::new();
        let mut group_index: HashMap<(u64, u32), usize> = HashMap::new();
        for s in &snapshots {
            if s.l1_offset % self.cs != 0 {
                self.corrupt(
                    Finding::SnapshotL1Unaligned {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        offset: s.l1_offset,
                    },
                    1,
                );
                continue;
            }
            if u64::from(s.l1_size) > MAX_L1_BYTES / 8 {
                self.corrupt(
                    Finding::SnapshotL1TooLarge {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        l1_size: s.l1_size,
                    },
                    1,
                );
                continue;
            }
            let key = (s.l1_offset, s.l1_size);
            match group_index.get(&key) {
                Some(&g) => groups[g].1 += 1,
                None => {
                    group_index.insert(key, groups.len());
                    groups.push((key, 1));
                }
            }
        }
        for ((offset, size), mult) in groups {
            self.walk_l1(offset, size, mult, false)?;
        }
        for (l2, extra) in std::mem::take(&mut self.pending) {
            self.count_l2_again(l2, extra)?;
        }
        self.inc(h.snapshots_offset, snapshots_size, 1);
        let rt_bytes = u64::from(h.refcount_table_clusters) * self.cs;
        self.inc(h.refcount_table_offset, rt_bytes, 1);
        if let Some(cr) = &c.extensions.crypto {
            self.inc(cr.offset, cr.length, 1);
        }
        if h.autoclear.contains(AutoclearFeatures::BITMAPS) {
            if let Some(b) = c.extensions.bitmaps {
                self.check_bitmaps(h, b.directory_offset, b.directory_size, b.nb_bitmaps)?;
            }
        }
        let mut reader = self.read_refcount_table(h.refcount_table_offset, rt_bytes)?;
        self.check_refblocks(&reader);

        // compare_refcounts()
        let mut is_one = vec![0u64; (self.nb_clusters as usize).div_ceil(64)];
        let mut highest = 0u64;
        let mut signaled = false;
        for i in 0..self.nb_clusters {
            let stored = match self.stored(&mut reader, i)? {
                Lookup::Value(v) => v,
                Lookup::Unaligned { offset, index } => {
                    if !signaled {
                        signaled = true;
                        self.emit(&Finding::ImageCorrupt { offset, index }, 1);
                    }
                    self.report.check_errors += 1;
                    self.emit(&Finding::RefcountUnreadable { cluster: i }, 1);
                    continue;
                }
            };
            let reference = self.expected.get(i);
            if stored > 0 || reference > 0 {
                highest = i;
            }
            if stored == 1 {
                is_one[(i / 64) as usize] |= 1 << (i % 64);
            }
            if stored < reference {
                self.corrupt(
                    Finding::RefcountTooLow {
                        cluster: i,
                        refcount: stored,
                        reference,
                    },
                    1,
                );
            } else if stored > reference {
                self.report.leaks += 1;
                self.emit(
                    &Finding::Leaked {
                        cluster: i,
                        refcount: stored,
                        reference,
                    },
                    1,
                );
            }
        }
        // The refcount array is no longer needed.
        self.expected = Expected::new(0, 0);

        self.check_copied(h, &mut reader, &is_one)?;
        self.report.image_end_offset = (highest + 1) << self.cb;
        Ok(())
    }

    /// QEMU's `qcow2_check_read_snapshot_table`: returns the snapshots and the table's length.
    fn read_snapshot_table(&mut self, h: &Header) -> Step<(Vec<SnapInfo>, u64)> {
        let nb = h.nb_snapshots;
        let start = h.snapshots_offset;
        let fail = |w: &mut Self, message: String, hint: Option<String>, f: CheckFailure| {
            w.report.check_errors += 1;
            w.emit(&Finding::SnapshotTable { message, hint }, 1);
            Err(Stop::Failed(f))
        };
        if nb > MAX_SNAPSHOTS {
            return fail(
                self,
                "ERROR snapshot table too large".into(),
                Some(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    nb - MAX_SNAPSHOTS
                )),
                CheckFailure::TooLarge("snapshot table too large".into()),
            );
        }
        let table_min = u64::from(nb) * SNAPSHOT_HEADER_SIZE;
        if i64::MAX as u64 - table_min < start || start % self.cs != 0 {
            return fail(
                self,
                "ERROR snapshot table offset invalid".into(),
                None,
                CheckFailure::Invalid("snapshot table offset invalid".into()),
            );
        }
        let read_fail = |w: &mut Self, what: String, hint: String| {
            fail(
                w,
                format!("ERROR failed to read the snapshot table: {what}"),
                Some(hint),
                CheckFailure::TooLarge(what),
            )
        };
        let mut snaps = Vec::new();
        let mut incomplete = Vec::new();
        let mut offset = start;
        let mut table_len = 0u64;
        for i in 0..nb {
            table_len = table_len.next_multiple_of(8);
            offset = offset.next_multiple_of(8);
            let fixed = self.read(offset, SNAPSHOT_HEADER_SIZE)?;
            let id_len = u64::from(be_u16(&fixed, 12));
            let name_len = u64::from(be_u16(&fixed, 14));
            let extra_len = be_u32(&fixed, 36);
            if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
                return read_fail(
                    self,
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    "You can force-remove this extra metadata with qemu-img check -r all".into(),
                );
            }
            let extra_len = u64::from(extra_len);
            let total = SNAPSHOT_HEADER_SIZE + extra_len + id_len + name_len;
            let entry = self.read(offset, total)?;
            let (parsed, _) = parse_table(&entry, 1)
                .map_err(|c| Stop::Failed(CheckFailure::Invalid(format!("snapshot table: {c}"))))?;
            if h.version >= 3 && extra_len < 16 {
                incomplete.push(i);
            }
            offset += total;
            table_len += total;
            if table_len > MAX_SNAPSHOT_TABLE_BYTES || offset - start > i32::MAX as u64 {
                return read_fail(
                    self,
                    "Snapshot table is too big".into(),
                    format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check \
                         -r all",
                        nb - i
                    ),
                );
            }
            if let Some(s) = parsed.into_iter().next() {
                snaps.push(SnapInfo {
                    l1_offset: s.l1_table_offset,
                    l1_size: s.l1_size,
                    id: s.id,
                    name: s.name,
                });
            }
        }
        // v3 entries without their 16 bytes of extra data, reported once the table is read.
        for index in incomplete {
            self.corrupt(Finding::SnapshotIncomplete { index }, 1);
        }
        Ok((snaps, offset - start))
    }

    /// QEMU's `check_refcounts_l1` for a table seen `mult` times.
    fn walk_l1(&mut self, offset: u64, entries: u32, mult: u64, active: bool) -> Step {
        if entries == 0 {
            return Ok(());
        }
        let bytes = u64::from(entries) * 8;
        self.inc(offset, bytes, mult);
        let inside = self.in_file(offset, bytes) / 8 * 8;
        let mut pos = 0u64;
        while pos < inside {
            let n = (inside - pos).min(CHUNK);
            let chunk = self.read(offset + pos, n)?;
            for e in chunk.chunks_exact(8).map(|b| be_u64(b, 0)) {
                if e == 0 {
                    continue;
                }
                if e & L1_RESERVED != 0 {
                    self.corrupt(Finding::L1ReservedBits { entry: e }, mult);
                }
                let l2 = e & OFFSET_MASK;
                self.inc(l2, self.cs, mult);
                if l2 % self.cs != 0 {
                    self.corrupt(Finding::L2Unaligned { l2_offset: l2 }, mult);
                }
                self.visit_l2(l2, mult, if active { mult } else { 0 })?;
            }
            pos += n;
        }
        Ok(())
    }

    /// One L1 entry's visit of the L2 table at `l2`, `mult` times (`active` of them from the
    /// active L1 table, which count towards the allocation statistics).
    fn visit_l2(&mut self, l2: u64, mult: u64, active: u64) -> Step {
        let first = !self.l2_cache.contains_key(&l2);
        if first {
            let s = self.walk_l2(l2)?;
            self.l2_cache.insert(l2, s);
        }
        let Some(s) = self.l2_cache.remove(&l2) else {
            return Ok(());
        };
        // The first walk reported and counted one visit; the others are replayed here, and
        // their references counted later.
        let replays = if first { mult - 1 } else { mult };
        let mut k = 0;
        while k < replays && !s.findings.is_empty() && self.emitted <= MAX_EMITTED_FINDINGS {
            for f in &s.findings {
                self.emit(f, 1);
            }
            k += 1;
        }
        self.report.corruptions += s.corruptions * replays;
        self.report.allocated_clusters += s.allocated * active;
        self.report.fragmented_clusters += s.fragmented * active;
        self.report.compressed_clusters += s.compressed * active;
        self.l2_cache.insert(l2, s);
        let uncounted = replays;
        if uncounted > 0 {
            match self.pending_index.get(&l2) {
                Some(&p) => self.pending[p].1 += uncounted,
                None => {
                    self.pending_index.insert(l2, self.pending.len());
                    self.pending.push((l2, uncounted));
                }
            }
        }
        Ok(())
    }

    /// Reads the in-file part of the L2 table at `l2` (entries past the end are zero, which
    /// map nothing).
    fn read_l2(&mut self, l2: u64) -> Step<Vec<u8>> {
        let esz = if self.extended { 16 } else { 8 };
        let inside = self.in_file(l2, self.cs).next_multiple_of(esz).min(self.cs);
        self.read(l2, inside)
    }

    /// Reports one finding of an L2 table's first visit and remembers it for later visits.
    fn note(&mut self, s: &mut L2Summary, f: Finding) {
        self.report.corruptions += 1;
        self.emit(&f, 1);
        s.corruptions += 1;
        if s.findings.len() < MAX_CACHED_FINDINGS {
            s.findings.push(f);
        }
    }

    /// QEMU's `check_refcounts_l2`: counts and reports one visit, and returns what a later
    /// visit of the same table reports (refcount overflows aside: they depend on the count).
    fn walk_l2(&mut self, l2: u64) -> Step<L2Summary> {
        let table = self.read_l2(l2)?;
        let mut s = L2Summary::default();
        let esz = if self.extended { 16 } else { 8 };
        let mut next_contiguous = 0u64;
        for (i, e) in table.chunks_exact(esz).enumerate() {
            let entry = be_u64(e, 0);
            let bitmap = if self.extended { be_u64(e, 8) } else { 0 };
            let kind = classify(entry, self.cb, self.extended, self.data_file);
            if !matches!(kind, ClusterKind::Compressed(_)) && entry & L2_RESERVED != 0 {
                self.note(&mut s, Finding::L2ReservedBits { entry });
            }
            match kind {
                ClusterKind::Compressed(d) => {
                    if entry & COPIED != 0 {
                        self.note(
                            &mut s,
                            Finding::CompressedCopied {
                                coffset: d.host_offset,
                            },
                        );
                    }
                    let entry = entry & !COPIED;
                    if self.data_file {
                        self.note(
                            &mut s,
                            Finding::CompressedWithDataFile {
                                index: i as u32,
                                entry,
                            },
                        );
                        continue;
                    }
                    if bitmap != 0 {
                        self.note(
                            &mut s,
                            Finding::CompressedWithBitmap {
                                index: i as u32,
                                entry,
                            },
                        );
                        continue;
                    }
                    let d = CompressedDescriptor::decode(entry, self.cb);
                    if let Some(f) = self.inc_region(d.host_offset, d.stored_len(), 1) {
                        self.note(&mut s, f);
                    }
                    s.allocated += 1;
                    s.compressed += 1;
                    s.fragmented += 1;
                }
                ClusterKind::Zero { host: 0 } => {}
                ClusterKind::Normal { host } | ClusterKind::Zero { host } => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.note(&mut s, Finding::BadSubclusterBitmap { offset: host });
                    }
                    if host % self.cs != 0 {
                        let data = if self.extended {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            entry & ZERO == 0
                        };
                        self.note(&mut s, Finding::UnalignedCluster { offset: host, data });
                    }
                    s.allocated += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        s.fragmented += 1;
                    }
                    next_contiguous = host.wrapping_add(self.cs);
                    if !self.data_file {
                        if let Some(f) = self.inc_region(host, self.cs, 1) {
                            self.note(&mut s, f);
                        }
                    }
                }
                ClusterKind::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        self.note(&mut s, Finding::UnallocatedWithBitmap);
                    }
                }
            }
        }
        Ok(s)
    }

    /// Counts `times` more visits' references of the L2 table at `l2` (their findings were
    /// already reported).
    fn count_l2_again(&mut self, l2: u64, times: u64) -> Step {
        let table = self.read_l2(l2)?;
        let esz = if self.extended { 16 } else { 8 };
        for e in table.chunks_exact(esz) {
            let entry = be_u64(e, 0);
            let bitmap = if self.extended { be_u64(e, 8) } else { 0 };
            match classify(entry, self.cb, self.extended, self.data_file) {
                ClusterKind::Compressed(_) if !self.data_file && bitmap == 0 => {
                    let d = CompressedDescriptor::decode(entry & !COPIED, self.cb);
                    self.inc_region(d.host_offset, d.stored_len(), times);
                }
                ClusterKind::Normal { host } if !self.data_file => {
                    self.inc_region(host, self.cs, times);
                }
                ClusterKind::Zero { host } if host != 0 && !self.data_file => {
                    self.inc_region(host, self.cs, times);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    fn check_bitmaps(&mut self, h: &Header, offset: u64, size: u64, count: u32) -> Step {
        self.inc(offset, size, 1);
        let invalid = |w: &mut Self, reason: String| {
            w.corrupt(
                Finding::BitmapDirectory {
                    reason: reason.clone(),
                },
                1,
            );
            Err(Stop::Failed(CheckFailure::Invalid(reason)))
        };
        if size == 0 {
            return invalid(self, "Requested bitmap directory size is zero".into());
        }
        // Entries past the end of the file read as zeros, and an all-zero entry is invalid:
        // one zeroed entry's worth past the end is all the loop below can look at.
        let avail = self.in_file(offset, size).saturating_add(4096).min(size);
        let dir = self.read(offset, avail)?;
        let at = |p: u64, n: u64| dir.get(p as usize..(p + n) as usize);
        let disk_len = h.size.div_ceil(512).saturating_mul(512);
        let mut bitmaps = Vec::new();
        let mut p = 0u64;
        while p < size {
            if size - p < 24 {
                return invalid(self, "Broken bitmap directory".into());
            }
            if bitmaps.len() as u32 >= count {
                return invalid(
                    self,
                    "More bitmaps found than specified in header extension".into(),
                );
            }
            let Some(e) = at(p, 24) else {
                return invalid(self, "Broken bitmap directory".into());
            };
            let table_offset = be_u64(e, 0);
            let table_size = be_u32(e, 8);
            let flags = be_u32(e, 12);
            let (kind, gran) = (e[16], e[17]);
            let name_len = u64::from(be_u16(e, 18));
            let extra_len = u64::from(be_u32(e, 20));
            let next = p + (24 + name_len + extra_len).next_multiple_of(8);
            if next > size {
                return invalid(self, "Broken bitmap directory".into());
            }
            if extra_len != 0 {
                return invalid(self, "Bitmap extra data is not supported".into());
            }
            let name = at(p + 24, name_len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let phys = u64::from(table_size) * self.cs;
            let ok = table_size != 0
                && table_offset != 0
                && table_offset % self.cs == 0
                && u64::from(table_size) <= BME_MAX_TABLE_SIZE
                && (9..=31).contains(&gran)
                && flags & BME_RESERVED_FLAGS == 0
                && name_len <= 1023
                && kind == 1
                && phys <= BME_MAX_PHYS_SIZE
                && (flags & 1 != 0 || disk_len <= (phys * 8) << gran);
            if !ok {
                return invalid(
                    self,
                    format!("Bitmap '{name}' doesn't satisfy the constraints"),
                );
            }
            bitmaps.push((name, table_offset, table_size));
            p = next;
        }
        if (bitmaps.len() as u32) != count {
            return invalid(
                self,
                "Less bitmaps found than specified in header extension".into(),
            );
        }
        for (name, table_offset, table_size) in bitmaps {
            let bytes = u64::from(table_size) * 8;
            self.inc(table_offset, bytes, 1);
            // bitmap_table_load() refuses the whole table if any entry is invalid.
            let inside = self.in_file(table_offset, bytes) / 8 * 8;
            let cs = self.cs;
            let valid = |e: u64| {
                let off = e & OFFSET_MASK;
                e & BME_TABLE_RESERVED == 0 && (off == 0 || (e & 1 == 0 && off % cs == 0))
            };
            let mut pos = 0;
            while pos < inside {
                let n = (inside - pos).min(CHUNK);
                let chunk = self.read(table_offset + pos, n)?;
                if !chunk.chunks_exact(8).all(|b| valid(be_u64(b, 0))) {
                    self.corrupt(Finding::BitmapTable { name: name.clone() }, 1);
                    return Err(Stop::Failed(CheckFailure::Invalid(format!(
                        "bitmap '{name}' has an invalid table entry"
                    ))));
                }
                pos += n;
            }
            let mut pos = 0;
            while pos < inside {
                let n = (inside - pos).min(CHUNK);
                let chunk = self.read(table_offset + pos, n)?;
                for e in chunk.chunks_exact(8).map(|b| be_u64(b, 0)) {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        self.inc(off, self.cs, 1);
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// Reads the in-file part of the refcount table.
    fn read_refcount_table(&mut self, offset: u64, bytes: u64) -> Step<RefcountReader> {
        let inside = self.in_file(offset, bytes) / 8 * 8;
        let raw = self.read(offset, inside)?;
        Ok(RefcountReader {
            table: raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect(),
            block_bits: self.cb + 3 - self.order,
            cache: Vec::new(),
        })
    }

    /// QEMU's `check_refblocks`.
    fn check_refblocks(&mut self, reader: &RefcountReader) {
        for (i, &raw) in reader.table.iter().enumerate() {
            let index = i as u64;
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.cb;
            if raw & REFT_RESERVED_MASK != 0 {
                self.corrupt(Finding::RefblockReservedBits { index }, 1);
                continue;
            }
            if offset % self.cs != 0 {
                self.corrupt(Finding::RefblockUnaligned { index }, 1);
                continue;
            }
            if cluster >= self.nb_clusters {
                self.corrupt(Finding::RefblockOutside { index }, 1);
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs, 1);
                let refcount = self.expected.get(cluster);
                if refcount != 1 {
                    self.corrupt(Finding::RefblockShared { index, refcount }, 1);
                }
            }
        }
    }

    /// The stored refcount of `cluster` (QEMU's `qcow2_get_refcount`).
    fn stored(&mut self, r: &mut RefcountReader, cluster: u64) -> Step<Lookup> {
        let index = cluster >> r.block_bits;
        let Some(&raw) = r.table.get(index as usize) else {
            return Ok(Lookup::Value(0));
        };
        let offset = raw & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(Lookup::Value(0));
        }
        if offset % self.cs != 0 {
            return Ok(Lookup::Unaligned { offset, index });
        }
        if offset >= self.file_len {
            return Ok(Lookup::Value(0));
        }
        let slot = match r.cache.iter().position(|(o, _)| *o == offset) {
            Some(p) => p,
            None => {
                let block = self.read(offset, self.cs)?;
                if r.cache.len() >= 8 {
                    r.cache.remove(0);
                }
                r.cache.push((offset, block));
                r.cache.len() - 1
            }
        };
        let within = (cluster & ((1 << r.block_bits) - 1)) as usize;
        Ok(Lookup::Value(refcount::get(
            &r.cache[slot].1,
            self.order,
            within,
        )))
    }

    /// QEMU's `check_oflag_copied` over the active L1 table, with stored refcounts.
    fn check_copied(&mut self, h: &Header, r: &mut RefcountReader, is_one: &[u64]) -> Step {
        let bytes = u64::from(h.l1_size) * 8;
        let inside = self.in_file(h.l1_table_offset, bytes) / 8 * 8;
        let mut pos = 0u64;
        while pos < inside {
            let n = (inside - pos).min(CHUNK);
            let chunk = self.read(h.l1_table_offset + pos, n)?;
            for (j, e) in chunk.chunks_exact(8).map(|b| be_u64(b, 0)).enumerate() {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let rc = match self.stored(r, l2 >> self.cb)? {
                    Lookup::Value(v) => v,
                    Lookup::Unaligned { .. } => continue,
                };
                if (rc == 1) != (e & COPIED != 0) {
                    self.corrupt(
                        Finding::CopiedL2 {
                            l1_index: pos / 8 + j as u64,
                            l1_entry: e,
                            refcount: rc,
                        },
                        1,
                    );
                }
                if !self.copied_cache.contains_key(&l2) {
                    let s = self.copied_l2(l2, r, is_one)?;
                    self.copied_cache.insert(l2, s);
                }
                if let Some(s) = self.copied_cache.remove(&l2) {
                    self.report.corruptions += s.corruptions;
                    for f in &s.findings {
                        self.emit(f, 1);
                    }
                    self.copied_cache.insert(l2, s);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// The COPIED check of the data entries of one L2 table.
    fn copied_l2(
        &mut self,
        l2: u64,
        r: &mut RefcountReader,
        is_one: &[u64],
    ) -> Step<CopiedSummary> {
        let table = self.read_l2(l2)?;
        let esz = if self.extended { 16 } else { 8 };
        let mut s = CopiedSummary::default();
        for e in table.chunks_exact(esz) {
            let entry = be_u64(e, 0);
            let host = match classify(entry, self.cb, self.extended, self.data_file) {
                ClusterKind::Normal { host } => host,
                ClusterKind::Zero { host } if host != 0 => host,
                _ => continue,
            };
            let copied = entry & COPIED != 0;
            let cluster = host >> self.cb;
            // Data file clusters count as one reference each (QEMU does not look them up).
            let one = self.data_file
                || (cluster < self.nb_clusters
                    && (is_one[(cluster / 64) as usize] >> (cluster % 64)) & 1 != 0);
            let rc = if one {
                1
            } else if !copied && cluster < self.nb_clusters {
                // Not one and not flagged: consistent whatever the value is.
                continue;
            } else {
                match self.stored(r, cluster)? {
                    Lookup::Value(v) => v,
                    Lookup::Unaligned { .. } => continue,
                }
            };
            if (rc == 1) != copied {
                s.corruptions += 1;
                if s.findings.len() < MAX_CACHED_FINDINGS {
                    s.findings.push(Finding::CopiedData {
                        l2_entry: entry,
                        refcount: rc,
                    });
                }
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::features::CompatibleFeatures;
    use crate::format::header::CompressionType;
    use crate::io::MemoryStorage;
    use std::time::{Duration, Instant};

    fn put(b: &mut [u8], off: u64, v: u64) {
        b[off as usize..off as usize + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn header(cb: u32, size: u64, l1_size: u32, order: u32) -> Header {
        let cs = 1u64 << cb;
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cb,
            size,
            crypt_method: CryptMethod::None,
            l1_size,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: IncompatibleFeatures::empty(),
            compatible: CompatibleFeatures::empty(),
            autoclear: AutoclearFeatures::empty(),
            refcount_order: order,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            extra_bytes: vec![0; 7],
        }
    }

    /// A consistent image with 64 KiB clusters: 0 header, 1 refcount table, 2 refcount block,
    /// 3 L1, 4 L2, 5 data (guest cluster 0). Every cluster has refcount 1.
    fn image() -> Vec<u8> {
        let cs = 1u64 << 16;
        let mut b = vec![0u8; 6 * cs as usize];
        let h = header(16, 1 << 30, 2, 4).encode();
        b[..h.len()].copy_from_slice(&h);
        put(&mut b, cs, 2 * cs);
        for c in 0..6 {
            refcount::set(&mut b[2 * cs as usize..], 4, c, 1);
        }
        put(&mut b, 3 * cs, COPIED | (4 * cs));
        put(&mut b, 4 * cs, COPIED | (5 * cs));
        b
    }

    fn run(b: Vec<u8>) -> CheckReport {
        check(&MemoryStorage::from_bytes(b)).expect("check runs")
    }

    fn lines(r: &CheckReport) -> Vec<String> {
        r.findings.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn clean_image() {
        let r = run(image());
        assert_eq!(r.exit_code(), 0, "{:?}", lines(&r));
        assert_eq!(r.total_clusters, 16384);
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.image_end_offset, 6 << 16);
        assert!(r.findings.is_empty());
    }

    #[test]
    fn leaks_refcount_errors_and_copied_flags() {
        let cs = 1u64 << 16;
        let mut b = image();
        refcount::set(&mut b[2 * cs as usize..], 4, 0, 2);
        let r = run(b);
        assert_eq!((r.leaks, r.corruptions, r.exit_code()), (1, 0, 3));
        assert_eq!(lines(&r), ["Leaked cluster 0 refcount=2 reference=1"]);

        let mut b = image();
        refcount::set(&mut b[2 * cs as usize..], 4, 5, 0);
        let r = run(b);
        assert_eq!((r.corruptions, r.exit_code()), (2, 2));
        assert_eq!(
            lines(&r),
            [
                "ERROR cluster 5 refcount=0 reference=1",
                "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0"
            ]
        );

        // The L2 entry past the end of the file: reported, the data cluster leaks.
        let mut b = image();
        put(&mut b, 4 * cs, COPIED | 100 << 20);
        let r = run(b);
        assert_eq!((r.corruptions, r.leaks), (2, 1));
        assert_eq!(
            lines(&r)[0],
            "ERROR: counting reference for region exceeding the end of the file by one cluster \
             or more: offset 0x6400000 size 0x10000"
        );
    }

    #[test]
    fn l1_entries_sharing_one_l2_table_are_counted_without_rereading() {
        // 65536 L1 entries (8 clusters at 3..11), all naming the L2 table at 11 that maps
        // cluster 12: 65536 references each, one more than 16-bit refcounts hold.
        let cs = 1u64 << 16;
        let n = 65536u64;
        let mut b = vec![0u8; 13 * cs as usize];
        let h = header(16, 1 << 30, n as u32, 4).encode();
        b[..h.len()].copy_from_slice(&h);
        put(&mut b, cs, 2 * cs);
        for c in 0..13 {
            refcount::set(&mut b[2 * cs as usize..], 4, c, 1);
        }
        for i in 0..n {
            put(&mut b, 3 * cs + 8 * i, COPIED | (11 * cs));
        }
        put(&mut b, 11 * cs, COPIED | (12 * cs));
        let t = Instant::now();
        let r = run(b);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        // Two overflows, two refcounts too low (65535 references counted), and every L1
        // entry's COPIED flag is wrong for a table with refcount 1? No: stored refcounts are 1,
        // so the flags agree.
        assert_eq!(r.corruptions, 4, "{:?}", lines(&r));
        assert_eq!(r.allocated_clusters, n);
        assert!(lines(&r).contains(&"ERROR cluster 11 refcount=1 reference=65535".to_string()));
    }

    #[test]
    fn hostile_tables_stay_bounded() {
        let cs = 1u64 << 16;
        // A refcount block far past the end of the file.
        let mut b = image();
        put(&mut b, cs + 8, 1 << 50);
        let r = run(b);
        assert_eq!(r.corruptions, 1);
        assert_eq!(lines(&r), ["ERROR refcount block 1 is outside image"]);

        // An unaligned refcount block: every cluster's refcount is unreadable.
        let mut b = image();
        put(&mut b, cs, 2 * cs + 512);
        let r = run(b);
        assert_eq!((r.check_errors, r.exit_code()), (6, 1));
        assert!(lines(&r)[1].starts_with("qcow2: Image is corrupt: Refblock offset 0x20200"));

        // Too many snapshots: the check stops.
        let mut b = image();
        b[60..64].copy_from_slice(&70_000u32.to_be_bytes());
        let r = run(b);
        assert!(matches!(r.failure, Some(CheckFailure::TooLarge(_))));
        assert_eq!((r.check_errors, r.exit_code()), (1, 1));

        // Only the header cluster: every table lies past the end of the file.
        let mut b = image();
        b.truncate(cs as usize);
        let r = run(b);
        assert!(r.corruptions > 0);
    }

    #[test]
    fn work_limit_stops_overlapping_l2_tables() {
        // 2 MiB clusters, 4096 L1 entries naming L2 tables at every 512-byte offset of the
        // header cluster: 8 GiB of L2 tables in an 8 MiB file.
        let cb = 21;
        let cs = 1u64 << cb;
        let mut b = vec![0u8; 4 * cs as usize];
        let h = header(cb, 1 << 20, 4096, 4).encode();
        b[..h.len()].copy_from_slice(&h);
        put(&mut b, cs, 2 * cs);
        for c in 0..4 {
            refcount::set(&mut b[2 * cs as usize..], 4, c, 1);
        }
        for i in 0..4096 {
            put(&mut b, 3 * cs + 8 * i, 512 * (i + 1));
        }
        let t = Instant::now();
        let r = run(b);
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert_eq!(
            r.failure,
            Some(CheckFailure::WorkLimit {
                limit: work_limit(4 * cs)
            })
        );
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn damaged_bytes_never_panic() {
        let base = image();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let meta = [
            0u64..112,
            65536..65600,
            131072..131100,
            196608..196630,
            262144..262200,
        ];
        for _ in 0..400 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 4 {
                let r = &meta[(next() % meta.len() as u64) as usize];
                let off = r.start + next() % (r.end - r.start);
                b[off as usize] ^= 1 << (next() % 8);
            }
            let t = Instant::now();
            let _ = check(&MemoryStorage::from_bytes(b));
            assert!(t.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn c_hex_and_expected_counts() {
        assert_eq!(CHex(0).to_string(), "0");
        assert_eq!(CHex(0x20200).to_string(), "0x20200");
        let mut e = Expected::new(4, refcount::max_value(6));
        assert_eq!(e.add(1, 70_000), 0);
        assert_eq!(e.add(1, 5), 0);
        assert_eq!(e.get(1), 70_005);
        let mut e = Expected::new(4, refcount::max_value(0));
        assert_eq!(e.add(2, 3), 2);
        assert_eq!(e.get(2), 1);
    }
}
