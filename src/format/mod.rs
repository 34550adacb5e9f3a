//! On-disk structures of qcow2, as pure functions of bytes (no I/O).
//!
//! Everything is big-endian. Parsing returns validated values or a [`Corruption`](crate::Corruption)
//! naming the field and the rule broken; encoding is the exact inverse, so that round trips hold.
//!
//! The parsers and encoders here are a stable API of their own, tested by round trips and by the
//! hostile-image corpus, for tools that read qcow2 metadata without opening an image:
//!
//! ```
//! # use qcow2kit::io::MemoryStorage;
//! # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
//! # use std::sync::Arc;
//! # let file = Arc::new(MemoryStorage::new());
//! # create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
//! use qcow2kit::format::header::Header;
//! let bytes = file.to_bytes(); // an image's first cluster is enough
//! let h = Header::parse(&bytes)?;
//! h.validate(bytes.len() as u64)?;
//! assert_eq!((h.version, h.size, h.cluster_size()), (3, 1 << 20, 65536));
//! # Ok::<(), qcow2kit::Error>(())
//! ```

pub mod bitmap;
pub(crate) mod bytes;
pub mod entry;
pub mod extension;
pub mod features;
pub mod header;
pub(crate) mod header_area;
pub mod probe;
pub mod qemu_opts;
pub mod refcount;
pub mod snapshot;

pub(crate) use bytes::{be_u16, be_u32, be_u64};

/// `QFI\xfb`: the first four bytes of every qcow2 image.
pub(crate) const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size: 2 MiB.
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active or snapshot L1 table QEMU accepts, in bytes.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots an image may hold.
pub(crate) const MAX_SNAPSHOTS: u32 = 65_536;
/// Largest snapshot table, in bytes.
pub(crate) const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data of one snapshot table entry, in bytes.
pub(crate) const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Longest backing file name, in bytes.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets must lie below 2^56 (bits 56.. of an entry are flags or reserved).
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Parses the header and its extensions from the first bytes of an image (normally its first
/// cluster) in QEMU's order: the header's own fields, incompatible feature bits this
/// implementation does not know (named from the image's feature-name table where it has
/// them), the tables as a check's open sees them ([`Header::check_open_for_check`](header::Header::check_open_for_check)), the
/// extensions, then the backing file name's length.
///
/// Extensions end at the backing file name and never past cluster 0 (QEMU refuses a
/// `backing_file_offset` beyond it, and so does [`Header::parse`](header::Header::parse)).
pub(crate) fn parse_first_cluster(
    first: &[u8],
) -> Result<(header::Header, extension::Extensions), crate::error::Corruption> {
    let header = header::Header::parse(first)?;
    let cs = header.cluster_size();
    let ext_end = if header.backing_file_offset != 0 {
        header.backing_file_offset.min(cs)
    } else {
        cs
    };
    let ext_start = u64::from(header.header_length.max(header::V2_HEADER_LENGTH));
    let area = if ext_end > ext_start {
        let end = (ext_end as usize).min(first.len());
        first.get(ext_start as usize..end).unwrap_or(&[])
    } else {
        &[]
    };
    let unknown = header.unknown_incompatible();
    if unknown != 0 {
        // QEMU names the features from whatever feature table it can read; an extension area
        // it cannot parse names none.
        let extensions = extension::Extensions::parse(area).unwrap_or_default();
        let names = (0..64u32)
            .filter(|b| unknown >> b & 1 != 0)
            .map(|b| {
                extensions
                    .feature_name(features::FeatureKind::Incompatible, b as u8)
                    .map(str::to_string)
                    .or_else(|| features::known_incompatible_name(b).map(str::to_string))
                    .unwrap_or_else(|| format!("unknown incompatible feature bit {b}"))
            })
            .collect();
        return Err(crate::error::Corruption::UnknownIncompatibleFeatures {
            bits: unknown,
            names,
        });
    }
    // QEMU checks the header's tables before it reads the extensions.
    header.check_open_for_check()?;
    let extensions = extension::Extensions::parse(area)?;
    header.check_backing_name()?;
    Ok((header, extensions))
}
