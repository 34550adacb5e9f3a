//! qcow2kit: a pure-Rust qcow2 disk-image library.
//!
//! It reads every image QEMU writes (versions 2 and 3, cluster sizes 512 B–2 MiB, refcount
//! widths 1–64, zero clusters, zlib and zstd compressed clusters, extended L2 entries, external
//! data files, images with bitmaps, snapshots or left dirty with lazy refcounts), follows backing
//! chains of qcow2 and raw images under a policy the caller chooses, and refuses hostile images
//! with a typed error that names the broken rule, quickly and with memory bounded by the file.
//!
//! # Layers
//!
//! - [`io`]: [`Storage`](io::Storage), the bytes under an image (files, memory).
//! - [`format`](mod@format): the on-disk structures as pure functions of bytes.
//! - [`engine`]: [`Qcow2Image`], opened and validated, with its L2 cache and mapping.
//! - [`device`]: [`BlockDevice`], the guest's view, implemented by raw and qcow2 images.
//! - [`chain`]: opening images with backing and data files under an [`OpenOptions`] policy.
//! - [`ops`]: whole-image operations (convert, info, map, compare).
//!
//! # Example
//!
//! Any [`BlockDevice`] reads the same way; here a raw image held in memory:
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::{BlockDevice, RawImage};
//! use std::sync::Arc;
//!
//! let disk = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![7u8; 4096])), false)?;
//! let mut buf = [0u8; 512];
//! disk.read_at(&mut buf, 1024)?;
//! assert_eq!(buf, [7u8; 512]);
//! // Reads past the end are refused, writes to a read-only image too.
//! assert!(disk.read_at(&mut buf, 4000).is_err());
//! assert!(matches!(disk.write_at(&buf, 0), Err(qcow2kit::Error::ReadOnly)));
//! # Ok::<(), qcow2kit::Error>(())
//! ```
//!
//! A qcow2 image with its backing chain, opened as qemu-img would (the default
//! [`OpenOptions`] opens no file an image names):
//!
//! ```no_run
//! use qcow2kit::chain::{open, OpenOptions};
//! use qcow2kit::Format;
//! use qcow2kit::BlockDevice;
//!
//! let img = open("overlay.qcow2".as_ref(), Format::Qcow2, &OpenOptions::qemu_compatible())?;
//! let mut buf = vec![0u8; 65536];
//! img.device.read_at(&mut buf, 0)?;
//! # Ok::<(), qcow2kit::Error>(())
//! ```
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![deny(missing_docs)]

pub mod chain;
pub(crate) mod codec;
pub mod crypto;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod nbd;
pub mod ops;

pub use chain::{open, BackingPolicy, Locking, OpenOptions, Opened};
pub use device::{BlockDevice, DiscardMode, Extent, ExtentKind, RawImage};
pub use engine::{NewSnapshot, Qcow2Image, Qcow2Options, SnapshotRef};
pub use error::{Corruption, Error, Result};
pub use format::probe::Format;
