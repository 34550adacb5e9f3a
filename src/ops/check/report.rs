//! What a check reports: the counts in qemu-img's terms ([`CheckReport`]), why a check stopped
//! ([`CheckFailure`]) and each problem found ([`Finding`]), worded as qemu-img words it.

use super::MAX_EMITTED_FINDINGS;
use crate::format::MAX_SNAPSHOT_EXTRA_DATA;
use std::fmt;

/// The outcome of a check, in qemu-img's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors (metadata that could not be read, e.g. an unaligned refcount block).
    pub check_errors: u64,
    /// Corruptions: references the refcounts do not cover, wrong COPIED flags, bad entries.
    pub corruptions: u64,
    /// Leaked clusters: refcounts higher than the references.
    pub leaks: u64,
    /// Corruptions a repair fixed (always 0 for a read-only check).
    pub corruptions_fixed: u64,
    /// Leaked clusters a repair freed (always 0 for a read-only check).
    pub leaks_fixed: u64,
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
    /// The first [`MAX_REPORTED_FINDINGS`](super::MAX_REPORTED_FINDINGS) findings (filled by
    /// [`check`](super::check) only).
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
    /// A repair could not be done, e.g. the refcount structure needs a rebuild that the repair
    /// mode does not allow (QEMU: `EIO`).
    RepairFailed(String),
    /// Checking would read more than [`work_limit`](super::work_limit) bytes of metadata.
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
            CheckFailure::RepairFailed(_) => "Input/output error".into(),
            CheckFailure::WorkLimit { .. } => self.to_string(),
        }
    }
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Invalid(s)
            | CheckFailure::TooLarge(s)
            | CheckFailure::RepairFailed(s) => f.write_str(s),
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
        /// The image is open for a repair and was marked corrupt (QEMU marks it so when open
        /// for writing; a repair that ends clean clears the mark again).
        marked: bool,
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
    /// A repair fixes the problem described (the line reads "Repairing …" instead of
    /// "ERROR …" / "Leaked …"): refcounts, COPIED flags, a misaligned preallocated zero
    /// cluster, a refcount block past the end of the file.
    Repairing(Box<Finding>),
    /// The refcount table and blocks are rebuilt from the references.
    RebuildingRefcounts,
    /// The refcount structure needs a rebuild, which `-r leaks` does not allow (the repair
    /// stops).
    NeedRebuild,
    /// The rebuilt refcount structure still has zero refcounts for referenced clusters.
    RebuildStillBroken,
    /// A repair drops the snapshots past QEMU's limits: past the 65 536th, or (with
    /// `table_too_big`) from the first whose entry ends past 64 MiB of table.
    SnapshotsDiscarded {
        /// How many.
        count: u32,
        /// The limit is the table's size rather than the number of snapshots.
        table_too_big: bool,
    },
    /// A repair cuts a snapshot's extra data to QEMU's 1 KiB limit.
    SnapshotExtraDiscarded {
        /// Index of the entry in the table.
        index: u32,
        /// Its extra data size before.
        size: u32,
    },
    /// The header's snapshot count could not be lowered after snapshots were dropped.
    SnapshotCountUpdateFailed {
        /// Why (`strerror` wording).
        reason: String,
    },
    /// The repaired snapshot table could not be written.
    SnapshotTableUpdateFailed {
        /// Why (`strerror` wording).
        reason: String,
    },
    /// The file could not be grown to hold a refcount block past its end (a rebuild follows).
    ResizeFailed {
        /// Why (`strerror` wording).
        reason: String,
    },
    /// An L2 table to repair overlaps other metadata: it is not written (the repair stops).
    L2WriteRefused,
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
            Finding::ImageCorrupt {
                offset,
                index,
                marked,
            } => write!(
                f,
                "qcow2: {}: Refblock offset {offset_h} unaligned (reftable index: {index_h}); \
                 further {}corruption events will be suppressed",
                if *marked {
                    "Marking image as corrupt"
                } else {
                    "Image is corrupt"
                },
                if *marked { "" } else { "non-fatal " },
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
            Finding::Repairing(inner) => {
                let line = inner.to_string();
                let rest = line
                    .strip_prefix("ERROR ")
                    .or_else(|| line.strip_prefix("Leaked "))
                    .unwrap_or(&line);
                write!(f, "Repairing {rest}")
            }
            Finding::SnapshotsDiscarded {
                count,
                table_too_big,
            } => {
                write!(f, "Discarding {count} overhanging snapshots")?;
                if *table_too_big {
                    f.write_str(" (snapshot table is too big)")?;
                }
                Ok(())
            }
            Finding::SnapshotExtraDiscarded { index, size } => write!(
                f,
                "Discarding too much extra metadata in snapshot table entry {index} ({size} > \
                 {MAX_SNAPSHOT_EXTRA_DATA})"
            ),
            Finding::SnapshotCountUpdateFailed { reason } => write!(
                f,
                "ERROR failed to update the snapshot count in the image header: {reason}"
            ),
            Finding::SnapshotTableUpdateFailed { reason } => {
                write!(f, "ERROR failed to update snapshot table: {reason}")
            }
            Finding::RebuildingRefcounts => f.write_str("Rebuilding refcount structure"),
            Finding::NeedRebuild => f.write_str("ERROR need to rebuild refcount structures"),
            Finding::RebuildStillBroken => {
                f.write_str("ERROR rebuilt refcount structure is still broken")
            }
            Finding::ResizeFailed { reason } => {
                write!(f, "ERROR could not resize image: {reason}")
            }
            Finding::L2WriteRefused => f.write_str(
                "ERROR: Could not write L2 table; metadata overlap check failed: Input/output \
                 error",
            ),
            Finding::Suppressed => write!(
                f,
                "(further messages suppressed after {MAX_EMITTED_FINDINGS}; counts are exact)"
            ),
        }
    }
}

/// C's `%#x`: `0x` and lower-case hex digits, but a bare `0` for zero.
pub(super) struct CHex(pub(super) u64);

impl fmt::Display for CHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}
