//! The library's errors in QEMU's words: what qemu-img and qemu-io print when they refuse an
//! image, so that qcow2kit's messages match theirs side by side.

use qcow2kit::format::{extension, header, snapshot};
use qcow2kit::Corruption;

/// A library error met while opening an image, in QEMU's words where they differ.
pub fn open_error_text(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::MarkedCorrupt) => {
            "qcow2: Image is corrupt; cannot be opened read/write".to_string()
        }
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::Inconsistent(m)) => m.clone(),
        qcow2kit::Error::BackingLoop(path) => {
            format!(
                "Backing file '{}' creates an infinite loop.",
                path.display()
            )
        }
        qcow2kit::Error::Backing(inner) => {
            format!("Could not open backing file: {}", open_error_text(inner))
        }
        // QEMU's NBD driver gives its reason alone.
        qcow2kit::Error::Io { context, source } if context == qcow2kit::nbd::OPEN_CONTEXT => {
            qcow2kit::error::strerror(source)
        }
        // QEMU's file driver: "Could not open 'NAME': REASON".
        qcow2kit::Error::Io { context, source } if context.starts_with("opening '") => {
            format!(
                "Could not open {}: {}",
                &context["opening ".len()..],
                qcow2kit::error::strerror(source)
            )
        }
        qcow2kit::Error::EncryptedNoKey { .. } => {
            "Parameter 'encrypt.key-secret' is required for cipher".to_string()
        }
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::BadMagic(_)) => {
            "Image is not in qcow2 format".to_string()
        }
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::UnknownIncompatibleFeatures {
            bits,
            names,
        }) => {
            // QEMU: the names the image's feature table gives, then the bits left unnamed.
            let set = (0..64).filter(|b| bits >> b & 1 != 0);
            let mut parts = Vec::new();
            let mut unnamed = 0u64;
            for (bit, name) in set.zip(names) {
                if name.starts_with("unknown incompatible feature bit") {
                    unnamed |= 1 << bit;
                } else {
                    parts.push(name.clone());
                }
            }
            if unnamed != 0 {
                parts.push(format!("Unknown incompatible feature: {unnamed:x}"));
            }
            format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
        }
        qcow2kit::Error::Corrupt(c) => corruption_text(c).unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

/// QEMU's words for a rule broken by an image, where QEMU refuses it with a message of its own
/// (`qcow2_do_open`, `qcow2_validate_table`, `qcow2_read_extensions`, `qcow2_read_snapshots`).
pub fn corruption_text(c: &Corruption) -> Option<String> {
    Some(match c {
        Corruption::BadField { field, value, rule } => field_text(field, *value, rule)?,
        Corruption::BadTable {
            table: "snapshot L1 table",
            rule,
            ..
        } => match *rule {
            header::SNAPSHOT_L1_TOO_LARGE => "Snapshot L1 table too large".to_string(),
            header::TABLE_MISALIGNED | header::TABLE_OVERFLOWS => {
                "Snapshot L1 table offset invalid".to_string()
            }
            _ => return None,
        },
        Corruption::BadTable { table, rule, .. } => {
            let name = match *table {
                "refcount table" => "Reference count table",
                "snapshot table" => "Snapshot table",
                "L1 table" => "Active L1 table",
                _ => return None,
            };
            match *rule {
                header::TABLE_TOO_LARGE => format!("{name} too large"),
                header::TABLE_OFFSET_INVALID => format!("{name} offset invalid"),
                _ => return None,
            }
        }
        Corruption::BadExtension {
            rule: extension::EXTENSION_HEADER_CROSSES_END | extension::EXTENSION_TOO_LARGE,
            ..
        } => "Header extension too large".to_string(),
        Corruption::BadSnapshot { index, rule } if *rule == snapshot::EXTRA_DATA_TOO_LARGE => {
            format!(
                "Too much extra metadata in snapshot table entry {index}\n\
                 You can force-remove this extra metadata with qemu-img check -r all"
            )
        }
        _ => return None,
    })
}

/// QEMU's message for header field `field` holding `value`, which breaks `rule`.
fn field_text(field: &str, value: u64, rule: &str) -> Option<String> {
    Some(match (field, rule) {
        (_, header::UNSUPPORTED_VERSION) => format!("Unsupported qcow2 version {value}"),
        (_, header::UNSUPPORTED_CLUSTER_BITS) => format!("Unsupported cluster size: 2^{value}"),
        (_, header::HEADER_TOO_SHORT) => "qcow2 header too short".into(),
        (_, header::HEADER_EXCEEDS_CLUSTER) => "qcow2 header exceeds cluster size".into(),
        (_, header::BACKING_OFFSET_INVALID) => "Invalid backing file offset".into(),
        (_, header::BACKING_NAME_TOO_LONG | header::BACKING_NAME_PAST_CLUSTER) => {
            "Backing file name too long".into()
        }
        (_, header::UNKNOWN_COMPRESSION_TYPE) => {
            format!("qcow2: unknown compression type: {value}")
        }
        (_, header::COMPRESSION_BIT_MUST_NOT_BE_SET) => {
            "qcow2: Compression type incompatible feature bit must not be set".into()
        }
        (_, header::COMPRESSION_BIT_MUST_BE_SET) => {
            "qcow2: Compression type incompatible feature bit must be set".into()
        }
        (_, header::REFCOUNT_ORDER_TOO_LARGE) => {
            "Reference count entry width too large; may not exceed 64 bits".into()
        }
        (_, header::NO_REFCOUNT_TABLE) => "Image does not contain a reference count table".into(),
        (_, header::IMAGE_TOO_BIG) => "Image is too big".into(),
        (_, header::L1_TOO_SMALL) => "L1 table is too small".into(),
        _ => return None,
    })
}

/// C's `strerror` of the errno QEMU's block layer would return for a failed request.
pub fn request_errno_text(e: &qcow2kit::Error) -> String {
    use qcow2kit::Error as E;
    let errno = match e {
        E::Io { source, .. } => return qcow2kit::error::strerror(source),
        E::Request { source, .. } => return request_errno_text(source),
        E::Unsupported(_) => 95,
        E::ReadOnly => 1,
        E::InvalidArgument(_) => 22,
        _ => 5,
    };
    qcow2kit::error::strerror(&std::io::Error::from_raw_os_error(errno))
}

/// qemu-img convert's words for a failed copy request ("error while writing at byte N: …"),
/// or `otherwise` for any other error.
pub fn convert_error_text(e: &qcow2kit::Error, otherwise: impl FnOnce() -> String) -> String {
    match e {
        qcow2kit::Error::Request {
            write,
            offset,
            source,
        } => format!(
            "error while {} at byte {offset}: {}",
            if *write { "writing" } else { "reading" },
            request_errno_text(source)
        ),
        _ => otherwise(),
    }
}
