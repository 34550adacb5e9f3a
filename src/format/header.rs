//! The qcow2 header (cluster 0, bytes 0..header_length) and its validation.
//!
//! Field layout (all big-endian):
//!
//! | bytes   | field                    | notes                                        |
//! |---------|--------------------------|----------------------------------------------|
//! | 0..4    | magic                    | `QFI\xfb`                                    |
//! | 4..8    | version                  | 2 or 3                                       |
//! | 8..16   | backing_file_offset      | 0 = no backing file                          |
//! | 16..20  | backing_file_size        | ≤ 1023                                       |
//! | 20..24  | cluster_bits             | 9..=21                                       |
//! | 24..32  | size                     | virtual size in bytes                        |
//! | 32..36  | crypt_method             | 0 none, 1 AES-CBC, 2 LUKS                    |
//! | 36..40  | l1_size                  | entries                                      |
//! | 40..48  | l1_table_offset          | cluster-aligned                              |
//! | 48..56  | refcount_table_offset    | cluster-aligned                              |
//! | 56..60  | refcount_table_clusters  | ≠ 0                                          |
//! | 60..64  | nb_snapshots             | ≤ 65 536                                     |
//! | 64..72  | snapshots_offset         | cluster-aligned                              |
//! | 72..80  | incompatible_features    | v3 only (v2: 0)                              |
//! | 80..88  | compatible_features      | v3 only                                      |
//! | 88..96  | autoclear_features       | v3 only                                      |
//! | 96..100 | refcount_order           | v3 only (v2: 4); ≤ 6                         |
//! | 100..104| header_length            | v3: ≥ 104, multiple of 8, ≤ cluster size     |
//! | 104     | compression_type         | if header_length > 104: 0 zlib, 1 zstd       |
//! | 105..112| padding                  |                                              |
//!
//! ```
//! # use qcow2kit::io::MemoryStorage;
//! # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
//! # use std::sync::Arc;
//! # let file = Arc::new(MemoryStorage::new());
//! # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
//! # let bytes = file.to_bytes();
//! use qcow2kit::format::header::Header;
//! let h = Header::parse(&bytes)?;
//! assert_eq!(h.size, 1 << 30);
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use super::bytes::{put_u32, put_u64};
use super::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use super::{be_u32, be_u64};
use super::{
    MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS, QCOW2_MAGIC,
};
use crate::error::Corruption;

/// Length of a version 2 header.
pub(crate) const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a version 3 header.
pub(crate) const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Length of the header qcow2kit writes for version 3 (includes the compression type byte).
pub(crate) const V3_HEADER_LENGTH: u32 = 112;
/// Size of the fixed part of one snapshot table entry.
pub(crate) const SNAPSHOT_HEADER_SIZE: u64 = 40;

/// The compression algorithm of compressed clusters (header byte 104).
///
/// ```
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use std::sync::Arc;
/// # let file = Arc::new(MemoryStorage::new());
/// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
/// # let bytes = file.to_bytes();
/// use qcow2kit::format::header::Header;
/// let h = Header::parse(&bytes)?;
/// use qcow2kit::format::header::CompressionType;
/// assert_eq!(h.compression_type, CompressionType::Zlib);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), the default.
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Encryption method (header bytes 32..36).
///
/// ```
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use std::sync::Arc;
/// # let file = Arc::new(MemoryStorage::new());
/// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
/// # let bytes = file.to_bytes();
/// use qcow2kit::format::header::Header;
/// let h = Header::parse(&bytes)?;
/// use qcow2kit::format::header::CryptMethod;
/// assert_eq!(h.crypt_method, CryptMethod::None);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// Legacy AES-128-CBC (method 1).
    Aes,
    /// LUKS (method 2).
    Luks,
}

impl CryptMethod {
    /// The name qemu-img uses for `encrypt.format`.
    pub fn name(self) -> &'static str {
        match self {
            CryptMethod::None => "none",
            CryptMethod::Aes => "aes",
            CryptMethod::Luks => "luks",
        }
    }
}

/// A parsed, validated qcow2 header.
///
/// ```
/// # use qcow2kit::io::MemoryStorage;
/// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// # use std::sync::Arc;
/// # let file = Arc::new(MemoryStorage::new());
/// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
/// # let bytes = file.to_bytes();
/// use qcow2kit::format::header::Header;
/// let h = Header::parse(&bytes)?;
/// assert_eq!((h.version, h.cluster_bits, h.refcount_order), (3, 16, 4));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method.
    pub crypt_method: CryptMethod,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (unknown bits retained).
    pub incompatible: IncompatibleFeatures,
    /// Compatible feature bits (unknown bits retained).
    pub compatible: CompatibleFeatures,
    /// Autoclear feature bits (unknown bits retained).
    pub autoclear: AutoclearFeatures,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the header in bytes.
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Header bytes 105..header_length beyond what this version knows, preserved on rewrite.
    pub extra_bytes: Vec<u8>,
}

fn bad(field: &'static str, value: u64, rule: &'static str) -> Corruption {
    Corruption::BadField { field, value, rule }
}

fn bad_table(table: &'static str, offset: u64, size: u64, rule: &'static str) -> Corruption {
    Corruption::BadTable {
        table,
        offset,
        size,
        rule,
    }
}

/// Rule of a version other than 2 and 3 (QEMU: "Unsupported qcow2 version N").
pub const UNSUPPORTED_VERSION: &str = "must be 2 or 3";
/// Rule of a cluster size outside 512 B..2 MiB (QEMU: "Unsupported cluster size: 2^N").
pub const UNSUPPORTED_CLUSTER_BITS: &str = "must be 9..=21";
/// Rule of a compression type other than zlib and zstd (QEMU: "qcow2: unknown compression
/// type: N").
pub const UNKNOWN_COMPRESSION_TYPE: &str = "must be 0 (zlib) or 1 (zstd)";
/// Rule of incompatible bit 3 set with zlib compression.
pub const COMPRESSION_BIT_MUST_NOT_BE_SET: &str =
    "incompatible bit 3 is set but the compression type is zlib";
/// Rule of a non-zlib compression type without incompatible bit 3.
pub const COMPRESSION_BIT_MUST_BE_SET: &str =
    "a non-zlib compression type needs incompatible bit 3";
/// Rule of a header whose `header_length` is under 104 bytes (QEMU: "qcow2 header too short").
pub const HEADER_TOO_SHORT: &str = "must be at least 104";
/// Rule of a header longer than a cluster (QEMU: "qcow2 header exceeds cluster size").
pub const HEADER_EXCEEDS_CLUSTER: &str = "must not exceed the cluster size";
/// Rule of a backing file name starting past cluster 0 (QEMU: "Invalid backing file offset").
pub const BACKING_OFFSET_INVALID: &str = "must lie in the first cluster";
/// Rule of a backing file name over 1023 bytes (QEMU: "Backing file name too long").
pub const BACKING_NAME_TOO_LONG: &str = "backing file name must be at most 1023 bytes";
/// Rule of a backing file name ending past cluster 0 (QEMU: "Backing file name too long").
pub const BACKING_NAME_PAST_CLUSTER: &str = "backing file name must lie inside the first cluster";
/// Rule of a `refcount_order` over 6 (QEMU: "Reference count entry width too large; …").
pub const REFCOUNT_ORDER_TOO_LARGE: &str = "must be at most 6";
/// Rule of extended L2 entries with clusters under 16 KiB.
pub(crate) const EXTENDED_L2_CLUSTER_TOO_SMALL: &str =
    "extended L2 entries need a cluster size of at least 16 KiB";
/// Rule of an image without a refcount table (QEMU: "Image does not contain a reference count
/// table").
pub const NO_REFCOUNT_TABLE: &str = "image has no refcount table";
/// Rule of a table with more entries than QEMU allows (QEMU: "TABLE too large").
pub const TABLE_TOO_LARGE: &str = "larger than QEMU's limit for it";
/// Rule of a table whose offset is not cluster-aligned or whose end lies past 2^63 (QEMU:
/// "TABLE offset invalid").
pub const TABLE_OFFSET_INVALID: &str = "offset is not cluster-aligned or the table ends past 2^63";
/// Rule of the table check for a table whose offset is not a multiple of the cluster size.
pub const TABLE_MISALIGNED: &str = "offset is not cluster-aligned";
/// Rule of the table check for a table whose end overflows 64 bits.
pub const TABLE_OVERFLOWS: &str = "offset + size overflows";
/// Rule of a snapshot's L1 table over QEMU's 32 MiB (QEMU: "Snapshot L1 table too large").
pub const SNAPSHOT_L1_TOO_LARGE: &str = "larger than 32 MiB";
/// Rule of a virtual size whose L1 table would need over 2^31 entries (QEMU: "Image is too
/// big").
pub const IMAGE_TOO_BIG: &str = "virtual size is too large for any L1 table";
/// Rule of an L1 table too small for the virtual size (QEMU: "L1 table is too small").
pub const L1_TOO_SMALL: &str = "L1 table is too small for the virtual size";

/// QEMU's check of a table named in the header (`qcow2_validate_table`): at most
/// `max_bytes / entry_len` entries, a cluster-aligned offset, and an end below 2^63. Holds for
/// an empty table too.
fn qemu_table(
    table: &'static str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), Corruption> {
    let size = entries.saturating_mul(entry_len);
    if entries > max_bytes / entry_len {
        return Err(bad_table(table, offset, size, TABLE_TOO_LARGE));
    }
    let ends_past = (i64::MAX as u64 - size) < offset;
    if ends_past || offset % cluster_size != 0 {
        return Err(bad_table(table, offset, size, TABLE_OFFSET_INVALID));
    }
    Ok(())
}

impl Header {
    /// Parses the header from the first bytes of an image (at least the header; normally the
    /// whole first cluster). Checks the rules that the header alone decides; [`validate`]
    /// checks the rest against the file size.
    ///
    /// [`validate`]: Header::validate
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert!(Header::parse(&bytes[..50]).is_err()); // cut short
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn parse(buf: &[u8]) -> Result<Header, Corruption> {
        let truncated = |needed: u32| Corruption::Truncated {
            what: "header",
            needed: needed.into(),
            available: buf.len() as u64,
        };
        if buf.len() < 4 {
            return Err(truncated(V2_HEADER_LENGTH));
        }
        let magic = be_u32(buf, 0);
        if magic != QCOW2_MAGIC {
            return Err(Corruption::BadMagic(magic));
        }
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(truncated(V2_HEADER_LENGTH));
        }
        let version = be_u32(buf, 4);
        if version != 2 && version != 3 {
            return Err(bad("version", version.into(), UNSUPPORTED_VERSION));
        }
        let cluster_bits = be_u32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                "cluster_bits",
                cluster_bits.into(),
                UNSUPPORTED_CLUSTER_BITS,
            ));
        }
        let crypt_method = match be_u32(buf, 32) {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            m => return Err(bad("crypt_method", m.into(), "must be 0, 1 or 2")),
        };
        let mut h = Header {
            version,
            backing_file_offset: be_u64(buf, 8),
            backing_file_size: be_u32(buf, 16),
            cluster_bits,
            size: be_u64(buf, 24),
            crypt_method,
            l1_size: be_u32(buf, 36),
            l1_table_offset: be_u64(buf, 40),
            refcount_table_offset: be_u64(buf, 48),
            refcount_table_clusters: be_u32(buf, 56),
            nb_snapshots: be_u32(buf, 60),
            snapshots_offset: be_u64(buf, 64),
            incompatible: IncompatibleFeatures::empty(),
            compatible: CompatibleFeatures::empty(),
            autoclear: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            extra_bytes: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(truncated(V3_MIN_HEADER_LENGTH));
            }
            h.incompatible = IncompatibleFeatures::from_bits_retain(be_u64(buf, 72));
            h.compatible = CompatibleFeatures::from_bits_retain(be_u64(buf, 80));
            h.autoclear = AutoclearFeatures::from_bits_retain(be_u64(buf, 88));
            h.refcount_order = be_u32(buf, 96);
            h.header_length = be_u32(buf, 100);
            let hl = h.header_length;
            if hl < V3_MIN_HEADER_LENGTH {
                return Err(bad("header_length", hl.into(), HEADER_TOO_SHORT));
            }
            if u64::from(hl) > h.cluster_size() {
                return Err(bad("header_length", hl.into(), HEADER_EXCEEDS_CLUSTER));
            }
            if hl % 8 != 0 {
                return Err(bad("header_length", hl.into(), "must be a multiple of 8"));
            }
            h.check_backing_offset()?;
            if buf.len() < hl as usize {
                return Err(truncated(hl));
            }
            if hl > V3_MIN_HEADER_LENGTH {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(bad("compression_type", t.into(), UNKNOWN_COMPRESSION_TYPE)),
                };
                h.extra_bytes = buf[105..hl as usize].to_vec();
            }
            let bit_set = h
                .incompatible
                .contains(IncompatibleFeatures::COMPRESSION_TYPE);
            match (h.compression_type, bit_set) {
                (CompressionType::Zlib, true) => {
                    return Err(bad("compression_type", 0, COMPRESSION_BIT_MUST_NOT_BE_SET))
                }
                (CompressionType::Zstd, false) => {
                    return Err(bad("compression_type", 1, COMPRESSION_BIT_MUST_BE_SET))
                }
                _ => {}
            }
        } else {
            h.check_backing_offset()?;
        }
        Ok(h)
    }

    /// QEMU's "Invalid backing file offset": the name must start inside cluster 0.
    fn check_backing_offset(&self) -> Result<(), Corruption> {
        if self.backing_file_offset > self.cluster_size() {
            return Err(bad(
                "backing_file_offset",
                self.backing_file_offset,
                BACKING_OFFSET_INVALID,
            ));
        }
        Ok(())
    }

    /// The checks of the header's fields that QEMU makes when it opens an image, in QEMU's
    /// order (`qcow2_do_open`), before it reads the header extensions: refcount width, the
    /// refcount table, the snapshot table's count and offset, the active L1 table, and the
    /// L1 table's size against the virtual size. Needs no file length; [`validate`] adds the
    /// checks against the file.
    ///
    /// [`validate`]: Header::validate
    pub(crate) fn check_open(&self) -> Result<(), Corruption> {
        self.qemu_open_checks(false)
    }

    /// [`check_open`] as QEMU opens an image for `qemu-img check` (`BDRV_O_CHECK`): an image
    /// without a refcount table and the snapshot table's count and offset are left to the
    /// check.
    ///
    /// [`check_open`]: Header::check_open
    pub(crate) fn check_open_for_check(&self) -> Result<(), Corruption> {
        self.qemu_open_checks(true)
    }

    fn qemu_open_checks(&self, for_check: bool) -> Result<(), Corruption> {
        let cs = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(bad(
                "refcount_order",
                self.refcount_order.into(),
                REFCOUNT_ORDER_TOO_LARGE,
            ));
        }
        if self.has_extended_l2() && self.cluster_bits < 14 {
            return Err(bad(
                "cluster_bits",
                self.cluster_bits.into(),
                EXTENDED_L2_CLUSTER_TOO_SMALL,
            ));
        }
        if self.refcount_table_clusters == 0 && !for_check {
            return Err(bad("refcount_table_clusters", 0, NO_REFCOUNT_TABLE));
        }
        qemu_table(
            "refcount table",
            self.refcount_table_offset,
            self.refcount_table_clusters.into(),
            cs,
            MAX_REFTABLE_BYTES,
            cs,
        )?;
        if !for_check {
            qemu_table(
                "snapshot table",
                self.snapshots_offset,
                self.nb_snapshots.into(),
                SNAPSHOT_HEADER_SIZE,
                SNAPSHOT_HEADER_SIZE * u64::from(MAX_SNAPSHOTS),
                cs,
            )?;
        }
        qemu_table(
            "L1 table",
            self.l1_table_offset,
            self.l1_size.into(),
            8,
            MAX_L1_BYTES,
            cs,
        )?;
        // QEMU keeps the number of L1 entries the virtual size needs in an int.
        let l1_needed = self
            .l1_entries_for(self.size)
            .filter(|&n| n <= i32::MAX as u64)
            .ok_or_else(|| bad("size", self.size, IMAGE_TOO_BIG))?;
        if u64::from(self.l1_size) < l1_needed {
            return Err(bad("l1_size", self.l1_size.into(), L1_TOO_SMALL));
        }
        Ok(())
    }

    /// Checks every limit that involves sizes, offsets and the file length: QEMU's checks
    /// (those of its `qcow2_do_open`), the backing file name's place, plus qcow2kit's rule that
    /// tables lie inside the file (rounded up to a whole cluster, as QEMU may leave the last
    /// cluster short).
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// h.validate(bytes.len() as u64)?;
    /// assert!(h.validate(1000).is_err()); // tables past the end of a 1000-byte file
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn validate(&self, file_len: u64) -> Result<(), Corruption> {
        self.check_open()?;
        self.check_backing_name()?;
        let cs = self.cluster_size();
        let file_end = file_len.checked_next_multiple_of(cs).unwrap_or(u64::MAX);
        if self.l1_size > 0 {
            let l1_bytes = u64::from(self.l1_size) * 8;
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_end)?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_end,
        )?;
        if self.nb_snapshots > 0 {
            let min = u64::from(self.nb_snapshots) * SNAPSHOT_HEADER_SIZE;
            check_table("snapshot table", self.snapshots_offset, min, cs, file_end)?;
        }
        Ok(())
    }

    /// QEMU's "Backing file name too long": at most 1023 bytes, and inside cluster 0.
    pub(crate) fn check_backing_name(&self) -> Result<(), Corruption> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        self.check_backing_offset()?;
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(bad(
                "backing_file_size",
                self.backing_file_size.into(),
                BACKING_NAME_TOO_LONG,
            ));
        }
        // The name must also fit in cluster 0 (this keeps it inside the file, whose tables lie
        // past cluster 0).
        if u64::from(self.backing_file_size) > self.cluster_size() - self.backing_file_offset {
            return Err(bad(
                "backing_file_size",
                self.backing_file_size.into(),
                BACKING_NAME_PAST_CLUSTER,
            ));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert_eq!(h.cluster_size(), 65536);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits wide (incompatible bit 4).
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert!(!h.has_extended_l2());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn has_extended_l2(&self) -> bool {
        self.incompatible
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert!(!h.has_data_file());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn has_data_file(&self) -> bool {
        self.incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// Bytes per L2 entry (8 or 16).
    pub(crate) fn l2_entry_size(&self) -> u64 {
        if self.has_extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of L2 entries per L2 table.
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert_eq!(h.l2_bits(), 13); // 8192 entries of 8 bytes per 64 KiB table
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.has_extended_l2() { 4 } else { 3 }
    }

    /// Refcount width in bits.
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert_eq!(h.refcount_bits(), 16);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Number of L1 entries needed to map `size` bytes, or `None` on overflow.
    pub(crate) fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let shift = self.cluster_bits + self.l2_bits();
        Some(size.checked_add((1u64 << shift) - 1)? >> shift)
    }

    /// Incompatible bits this implementation does not know.
    pub(crate) fn unknown_incompatible(&self) -> u64 {
        self.incompatible.bits() & !IncompatibleFeatures::all().bits()
    }

    /// Encodes the header into `header_length` bytes (v2: 72).
    ///
    /// ```
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # create_qcow2_on(file.clone(), None, 1 << 30, &CreateOptions::default())?.close()?;
    /// # let bytes = file.to_bytes();
    /// use qcow2kit::format::header::Header;
    /// let h = Header::parse(&bytes)?;
    /// assert_eq!(Header::parse(&h.encode())?, h); // the exact inverse of parse
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_length as usize];
        put_u32(&mut b, 0, QCOW2_MAGIC);
        put_u32(&mut b, 4, self.version);
        put_u64(&mut b, 8, self.backing_file_offset);
        put_u32(&mut b, 16, self.backing_file_size);
        put_u32(&mut b, 20, self.cluster_bits);
        put_u64(&mut b, 24, self.size);
        let cm = match self.crypt_method {
            CryptMethod::None => 0,
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        };
        put_u32(&mut b, 32, cm);
        put_u32(&mut b, 36, self.l1_size);
        put_u64(&mut b, 40, self.l1_table_offset);
        put_u64(&mut b, 48, self.refcount_table_offset);
        put_u32(&mut b, 56, self.refcount_table_clusters);
        put_u32(&mut b, 60, self.nb_snapshots);
        put_u64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_u64(&mut b, 72, self.incompatible.bits());
            put_u64(&mut b, 80, self.compatible.bits());
            put_u64(&mut b, 88, self.autoclear.bits());
            put_u32(&mut b, 96, self.refcount_order);
            put_u32(&mut b, 100, self.header_length);
            if self.header_length > V3_MIN_HEADER_LENGTH {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
                let n = self.extra_bytes.len().min(b.len() - 105);
                b[105..105 + n].copy_from_slice(&self.extra_bytes[..n]);
            }
        }
        b
    }
}

/// Checks a table's offset and size: cluster-aligned, no overflow, inside the file.
pub(crate) fn check_table(
    table: &'static str,
    offset: u64,
    size: u64,
    cluster_size: u64,
    file_end: u64,
) -> Result<(), Corruption> {
    if offset % cluster_size != 0 {
        return Err(bad_table(table, offset, size, TABLE_MISALIGNED));
    }
    if offset == 0 && size > 0 {
        return Err(bad_table(table, offset, size, "overlaps the image header"));
    }
    let end = offset
        .checked_add(size)
        .ok_or_else(|| bad_table(table, offset, size, TABLE_OVERFLOWS))?;
    if end > file_end {
        return Err(bad_table(
            table,
            offset,
            size,
            "lies past the end of the file",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: CryptMethod::None,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: IncompatibleFeatures::empty(),
            compatible: CompatibleFeatures::LAZY_REFCOUNTS,
            autoclear: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            extra_bytes: vec![0; 7],
        }
    }

    #[test]
    fn v3_round_trip() {
        let h = sample_v3();
        let b = h.encode();
        assert_eq!(b.len(), 112);
        assert_eq!(Header::parse(&b).expect("valid test input"), h);
        h.validate(4 << 16).expect("valid test input");
    }

    #[test]
    fn v2_round_trip() {
        let mut h = sample_v3();
        h.version = 2;
        h.header_length = V2_HEADER_LENGTH;
        h.compatible = CompatibleFeatures::empty();
        h.extra_bytes.clear();
        let b = h.encode();
        assert_eq!(b.len(), 72);
        assert_eq!(Header::parse(&b).expect("valid test input"), h);
    }

    #[test]
    fn rejects_bad_fields() {
        let h = sample_v3();
        let mut b = h.encode();
        b[23] = 22; // cluster_bits
        assert!(matches!(
            Header::parse(&b),
            Err(Corruption::BadField {
                field: "cluster_bits",
                ..
            })
        ));
        let mut b = h.encode();
        b[103] = 106; // header_length not a multiple of 8
        assert!(matches!(
            Header::parse(&b),
            Err(Corruption::BadField {
                field: "header_length",
                ..
            })
        ));
        let mut b = h.encode();
        b[104] = 1; // zstd without bit 3
        assert!(matches!(
            Header::parse(&b),
            Err(Corruption::BadField {
                field: "compression_type",
                ..
            })
        ));
        assert!(matches!(
            Header::parse(&b[..50]),
            Err(Corruption::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(b"QFI"),
            Err(Corruption::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(&[0u8; 112]),
            Err(Corruption::BadMagic(0))
        ));
    }

    #[test]
    fn validate_limits() {
        let mut h = sample_v3();
        h.l1_size = 1;
        assert!(matches!(
            h.validate(1 << 20),
            Err(Corruption::BadField {
                field: "l1_size",
                ..
            })
        ));
        let mut h = sample_v3();
        h.l1_table_offset = 12345;
        assert!(matches!(
            h.validate(1 << 20),
            Err(Corruption::BadTable { .. })
        ));
        let mut h = sample_v3();
        h.l1_table_offset = 100 << 16;
        assert!(matches!(
            h.validate(1 << 20),
            Err(Corruption::BadTable { .. })
        ));
        let mut h = sample_v3();
        h.refcount_table_clusters = 1000;
        assert!(matches!(
            h.validate(1 << 40),
            Err(Corruption::BadTable { .. })
        ));
        let mut h = sample_v3();
        h.size = u64::MAX;
        assert!(h.validate(1 << 20).is_err());
        // The backing file name must end inside cluster 0 (QEMU: "Backing file name too long").
        let mut h = sample_v3();
        h.backing_file_offset = (1 << 16) - 10;
        h.backing_file_size = 10;
        h.validate(1 << 20).expect("valid test input");
        h.backing_file_size = 11;
        assert!(matches!(
            h.validate(1 << 20),
            Err(Corruption::BadField {
                field: "backing_file_size",
                value: 11,
                ..
            })
        ));
        let mut h = sample_v3();
        h.nb_snapshots = 70_000;
        assert!(h.validate(1 << 20).is_err());
        let mut h = sample_v3();
        h.refcount_order = 7;
        assert!(h.validate(1 << 20).is_err());
    }

    #[test]
    fn qemu_check_order() {
        let rule_of = |r: Result<(), Corruption>| match r {
            Err(Corruption::BadField { rule, .. } | Corruption::BadTable { rule, .. }) => rule,
            other => panic!("unexpected {other:?}"),
        };
        // A header length past the cluster that is also not a multiple of 8.
        let mut b = sample_v3().encode();
        b[100..104].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert_eq!(
            rule_of(Header::parse(&b).map(|_| ())),
            HEADER_EXCEEDS_CLUSTER
        );
        // The backing file offset is checked with the header, before any table.
        let mut h = sample_v3();
        h.backing_file_offset = u64::MAX;
        h.l1_table_offset = 1;
        assert_eq!(
            rule_of(Header::parse(&h.encode()).map(|_| ())),
            BACKING_OFFSET_INVALID
        );
        // An empty snapshot table must still be cluster-aligned.
        let mut h = sample_v3();
        h.snapshots_offset = 0x1234;
        assert_eq!(rule_of(h.check_open()), TABLE_OFFSET_INVALID);
        h.check_open_for_check()
            .expect("a check does not look at snapshots");
        // A table ending past 2^63 is an invalid offset before it is past the file end.
        let mut h = sample_v3();
        h.l1_table_offset = 0x7fff_ffff_ffff_0000;
        h.l1_size = 0xffff;
        assert_eq!(rule_of(h.validate(1 << 20)), TABLE_OFFSET_INVALID);
        // The refcount table is checked before the L1 table.
        h.refcount_table_clusters = u32::MAX;
        assert_eq!(rule_of(h.validate(1 << 20)), TABLE_TOO_LARGE);
        // A virtual size needing more than i32::MAX L1 entries.
        let mut h = sample_v3();
        h.size = 1 << 62;
        assert_eq!(rule_of(h.check_open()), IMAGE_TOO_BIG);
    }
}
