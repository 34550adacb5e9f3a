//! The crate's one error type.
//!
//! Every fallible function in qcow2kit returns [`Result`]. Errors that come from the bytes of an
//! image (as opposed to the operating system or the caller) are [`Error::Corrupt`] or
//! [`Error::Unsupported`], and name the field and the rule that was broken, so that a user can tell
//! a damaged or hostile image from an I/O failure.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A specialised `Result` for qcow2kit operations.
///
/// ```
/// fn size_of(path: &std::path::Path) -> qcow2kit::Result<u64> {
///     let img = qcow2kit::open(path, qcow2kit::Format::Qcow2, &Default::default())?;
///     Ok(qcow2kit::BlockDevice::size(img.device.as_ref()))
/// }
/// assert!(size_of("no/such/image".as_ref()).is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in qcow2kit.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::{Error, Qcow2Image, Qcow2Options};
/// use std::sync::Arc;
///
/// // Bytes that are not qcow2 are refused with the rule they break, not an I/O error.
/// let junk = Arc::new(MemoryStorage::from_bytes(vec![0xff; 4096]));
/// match Qcow2Image::open(junk, &Qcow2Options::default()) {
///     Err(Error::Corrupt(c)) => println!("refused: {c}"),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the storage under an image.
    #[error("I/O error{}: {source}", context_suffix(.context))]
    Io {
        /// What was being done when the error happened.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The image breaks a rule of the qcow2 format (or a limit qcow2kit shares with QEMU).
    #[error("image is corrupt or invalid: {0}")]
    Corrupt(#[from] Corruption),
    /// The image uses a feature qcow2kit does not (yet) implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The image is encrypted and no key was supplied.
    #[error("image is encrypted ({method}); a key is required to read it")]
    EncryptedNoKey {
        /// The encryption method named by the header.
        method: &'static str,
    },
    /// The encryption layer refused: a wrong passphrase, a LUKS header that breaks a rule of
    /// the format, a cipher qcow2kit does not offer (QEMU's message where it has one).
    #[error("{0}")]
    Crypto(#[from] crate::crypto::CryptoError),
    /// The image refers to a backing or data file that the open policy does not allow.
    #[error("{kind} file '{name}' is not allowed by the open policy")]
    ExternalFileDenied {
        /// `"backing"` or `"data"`.
        kind: &'static str,
        /// The name as stored in the image.
        name: String,
    },
    /// A backing chain refers back to an image already in the chain.
    #[error("backing chain loop: '{}' is already part of the chain", .0.display())]
    BackingLoop(PathBuf),
    /// A backing chain is deeper than the configured limit.
    #[error("backing chain is deeper than the limit of {0} images")]
    BackingTooDeep(usize),
    /// Another open of an image file (in this process or another, QEMU's included) holds a
    /// lock that conflicts with this open ([`crate::io::lock`]). Shown as QEMU shows it, with
    /// `Could not open backing file: ` once for each backing layer above the file.
    #[error("{}{source}", "Could not open backing file: ".repeat(*.backing_depth))]
    Locked {
        /// How many backing layers below the opened image the file is (0: the image itself or
        /// its data file).
        backing_depth: usize,
        /// The lock that could not be taken.
        #[source]
        source: crate::io::lock::LockError,
    },
    /// A backing file of the image could not be opened (QEMU's "Could not open backing file").
    #[error("Could not open backing file: {0}")]
    Backing(Box<Error>),
    /// A write was attempted on a read-only image.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A request lies (partly) outside the device.
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device (size {size})"
    )]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// An argument given by the caller is not valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named snapshot does not exist.
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// The caller's progress callback asked the operation to stop (see
    /// [`ops::convert::Progress`](crate::ops::convert::Progress)); the target is left as a
    /// failed operation leaves it.
    #[error("cancelled")]
    Cancelled,
    /// The image was closed ([`Qcow2Image::close`](crate::Qcow2Image::close)): it takes no
    /// more writes or flushes.
    #[error("the image is closed")]
    Closed,
    /// A read from the source or a write to the target of a copy (convert) failed; `offset` is
    /// the guest offset where the failing request of the copy starts.
    #[error("error while {} at byte {offset}: {source}", if *.write { "writing" } else { "reading" })]
    Request {
        /// Whether the write (to the target) failed, or the read (from the source).
        write: bool,
        /// Guest offset of the request.
        offset: u64,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
}

/// The text of the [`Error::Unsupported`] every request gets once a metadata write of the
/// image failed (the image must be reopened; see [`Error::is_after_failed_write`]).
///
/// ```
/// use qcow2kit::error::AFTER_FAILED_WRITE;
/// assert!(qcow2kit::Error::Unsupported(AFTER_FAILED_WRITE.into()).is_after_failed_write());
/// ```
pub const AFTER_FAILED_WRITE: &str = "an earlier metadata write failed; the image must be reopened";

impl Error {
    /// Whether this is the refusal of an image whose earlier metadata write failed: the
    /// failure itself was already returned to whoever made that write.
    ///
    /// ```
    /// assert!(!qcow2kit::Error::ReadOnly.is_after_failed_write());
    /// ```
    pub fn is_after_failed_write(&self) -> bool {
        matches!(self, Error::Unsupported(t) if t == AFTER_FAILED_WRITE)
    }
}

impl Error {
    /// This error as the failure of the copy request at `offset` (a read unless `write`); an
    /// error that already names its request is kept as it is.
    pub(crate) fn in_request(self, write: bool, offset: u64) -> Error {
        match self {
            e @ Error::Request { .. } => e,
            e => Error::Request {
                write,
                offset,
                source: Box::new(e),
            },
        }
    }
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" {context}")
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::Io {
            context: String::new(),
            source,
        }
    }
}

impl Error {
    /// The error itself when it is not [`Error::Backing`]; for a backing file that could not be
    /// opened, the error of the deepest one.
    ///
    /// ```
    /// use qcow2kit::Error;
    /// let e = Error::Backing(Box::new(Error::Backing(Box::new(Error::ReadOnly))));
    /// assert!(matches!(e.into_innermost(), Error::ReadOnly));
    /// ```
    pub fn into_innermost(self) -> Error {
        match self {
            Error::Backing(inner) => inner.into_innermost(),
            other => other,
        }
    }

    /// Wraps an I/O error with a description of what was being done.
    ///
    /// ```
    /// let e = qcow2kit::Error::io("reading header", std::io::Error::from_raw_os_error(5));
    /// assert!(e.to_string().starts_with("I/O error reading header: "));
    /// ```
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An error from opening or creating a file as [`Error::Locked`] when it is a lock conflict
    /// ([`crate::io::lock::LockError`]), else as [`Error::io`] with `context`.
    ///
    /// ```
    /// use qcow2kit::Error;
    /// let e = Error::storage("opening image", std::io::Error::from_raw_os_error(2));
    /// assert!(matches!(e, Error::Io { .. })); // not a lock conflict
    /// ```
    pub fn storage(context: impl Into<String>, source: io::Error) -> Self {
        match crate::io::lock::into_lock_error(source) {
            Ok(source) => Error::Locked {
                backing_depth: 0,
                source,
            },
            Err(source) => Error::io(context, source),
        }
    }

    /// Returns the corruption, if this error is one.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::{Qcow2Image, Qcow2Options};
    /// use std::sync::Arc;
    /// let e = Qcow2Image::open(Arc::new(MemoryStorage::new()), &Qcow2Options::default()).unwrap_err();
    /// assert!(e.corruption().is_some()); // an empty file is no qcow2 image
    /// ```
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            Error::Corrupt(c) => Some(c),
            _ => None,
        }
    }
}

/// A rule of the qcow2 format broken by an image, naming the field and the rule.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::{Corruption, Qcow2Image, Qcow2Options};
/// use std::sync::Arc;
/// let e = Qcow2Image::open(Arc::new(MemoryStorage::from_bytes(vec![0; 512])), &Qcow2Options::default())
///     .unwrap_err();
/// assert!(matches!(e.corruption(), Some(Corruption::BadMagic { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// The file is shorter than the structure that must be there.
    Truncated {
        /// The structure that is cut short.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The magic number is not `QFI\xfb`.
    BadMagic(u32),
    /// A header field has a value outside what the format (or QEMU's limits) allow.
    BadField {
        /// The field, by its spec name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Incompatible feature bits this implementation does not know.
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Names from the image's feature-name table, where it has them.
        names: Vec<String>,
    },
    /// A table (L1, refcount, snapshot, …) is too large, misaligned, overflows or lies past the
    /// end of the file.
    BadTable {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its size in bytes.
        size: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A header extension is malformed.
    BadExtension {
        /// The extension's type code.
        kind: u32,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// An L1 or L2 entry is malformed.
    BadEntry {
        /// `"L1"` or `"L2"`.
        table: &'static str,
        /// Guest offset the entry maps.
        guest_offset: u64,
        /// The raw entry.
        entry: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A compressed cluster could not be decompressed into exactly one cluster.
    BadCompressedCluster {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// What went wrong.
        rule: String,
    },
    /// A snapshot table entry is malformed.
    BadSnapshot {
        /// Index of the entry in the table.
        index: u32,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The image is marked corrupt (incompatible bit 1) and cannot be opened writable.
    MarkedCorrupt,
    /// Metadata found inconsistent while the image was in use for writing (a write would have
    /// landed on metadata, an entry points into metadata, a refcount block is misaligned, …):
    /// the request was refused and the image marked corrupt, as QEMU's corruption events do.
    /// The message is QEMU's wording where QEMU has one.
    Inconsistent(String),
    /// A shrink found a refcount table entry it cannot drop (QEMU: "Failed to discard unused
    /// refblocks"): unaligned, past every possible offset, or naming a block whose own
    /// refcount is wrong or not covered at all.
    RefblockDiscard {
        /// The refcount block's offset, as the table entry gives it.
        offset: u64,
        /// QEMU's corruption message, when the finding marked the image corrupt.
        corrupt: Option<String>,
        /// The block's refcount is wrong (QEMU fails with EINVAL), rather than the block
        /// unreadable (EIO).
        bad_count: bool,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Truncated {
                what,
                needed,
                available,
            } => {
                write!(
                    f,
                    "{what} is truncated: needs {needed} bytes, file has {available}"
                )
            }
            Corruption::BadMagic(m) => write!(f, "bad magic {m:#010x} (expected QFI\\xfb)"),
            Corruption::BadField { field, value, rule } => {
                write!(f, "header field {field} = {value}: {rule}")
            }
            Corruption::UnknownIncompatibleFeatures { bits, names } => {
                write!(f, "unsupported incompatible feature bits {bits:#x}")?;
                if !names.is_empty() {
                    write!(f, " ({})", names.join(", "))?;
                }
                Ok(())
            }
            Corruption::BadTable {
                table,
                offset,
                size,
                rule,
            } => {
                write!(f, "{table} at offset {offset:#x} (size {size}): {rule}")
            }
            Corruption::BadExtension { kind, rule } => {
                write!(f, "header extension {kind:#010x}: {rule}")
            }
            Corruption::BadEntry {
                table,
                guest_offset,
                entry,
                rule,
            } => write!(
                f,
                "{table} entry {entry:#018x} for guest offset {guest_offset:#x}: {rule}"
            ),
            Corruption::BadCompressedCluster { host_offset, rule } => {
                write!(
                    f,
                    "compressed cluster at host offset {host_offset:#x}: {rule}"
                )
            }
            Corruption::BadSnapshot { index, rule } => {
                write!(f, "snapshot table entry {index}: {rule}")
            }
            Corruption::RefblockDiscard {
                offset, corrupt, ..
            } => {
                write!(f, "refcount block at {offset:#x} cannot be discarded")?;
                match corrupt {
                    Some(m) => write!(f, ": {m}; image marked corrupt"),
                    None => write!(f, ": offset out of range"),
                }
            }
            Corruption::MarkedCorrupt => {
                write!(
                    f,
                    "image is marked corrupt and cannot be opened for writing"
                )
            }
            Corruption::Inconsistent(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Corruption {}

/// The message of an I/O error as C's `strerror` words it (without Rust's ` (os error N)`
/// suffix): how qemu-img prints the errors behind its messages.
///
/// ```
/// use qcow2kit::error::strerror;
/// assert_eq!(strerror(&std::io::Error::from_raw_os_error(2)), "No such file or directory");
/// ```
pub fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
