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
//! - [`io`]: [`Storage`](io::Storage), the bytes under an image (files, memory, NBD).
//! - [`format`](mod@format): the on-disk structures as pure functions of bytes.
//! - [`engine`]: [`Qcow2Image`], opened and validated, with its L2 cache and mapping.
//! - [`device`]: [`BlockDevice`], the guest's view, implemented by raw and qcow2 images.
//! - [`chain`]: opening images with backing and data files under an [`OpenOptions`] policy.
//! - [`ops`]: whole-image operations (create, convert, check, rebase, commit, amend, map, …).
//! - [`nbd`]: an NBD server over any [`BlockDevice`], and an NBD client [`Storage`](io::Storage).
//!
//! # The five common jobs
//!
//! Each example builds its images in a temporary directory and runs as a doctest.
//!
//! ## Create an overlay
//!
//! What `qemu-img create -f qcow2 -b base.raw -F raw disk.qcow2` does: the new image records
//! its backing file (relative names are read against the image's directory).
//!
//! ```
//! use qcow2kit::ops::create::{create_qcow2, create_raw, CreateOptions, Preallocation};
//!
//! let dir = tempfile::tempdir()?;
//! create_raw(&dir.path().join("base.raw"), 1 << 20, Preallocation::Off)?;
//! create_qcow2(
//!     &dir.path().join("disk.qcow2"),
//!     &CreateOptions {
//!         backing_file: Some("base.raw".into()),
//!         backing_format: Some("raw".into()),
//!         ..CreateOptions::default()
//!     },
//! )?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Write, flush and close
//!
//! The image is opened under QEMU's image locks; the device may be shared by threads (see the
//! contract of [`BlockDevice`]). [`Opened::close`] reports what a drop cannot.
//!
//! ```
//! # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
//! use qcow2kit::{open, BlockDevice, Format, OpenOptions};
//!
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.qcow2");
//! # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
//! let opts = OpenOptions { writable: true, ..OpenOptions::qemu_compatible() };
//! let disk = open(&path, Format::Qcow2, &opts)?;
//! disk.device.write_at(&[0xab; 4096], 65536)?;
//! disk.device.flush()?; // durable from here on
//! disk.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Read a chain
//!
//! [`OpenOptions::default`] opens no file an image names (the safe policy for untrusted
//! images); [`OpenOptions::qemu_compatible`] follows backing chains as qemu-img does, with a
//! depth limit and loops refused.
//!
//! ```
//! # use qcow2kit::ops::create::{create_qcow2, create_raw, CreateOptions, Preallocation};
//! use qcow2kit::{open, BlockDevice, Error, Format, OpenOptions};
//!
//! # let dir = tempfile::tempdir()?;
//! # create_raw(&dir.path().join("base.raw"), 1 << 20, Preallocation::Off)?;
//! # std::fs::write(dir.path().join("base.raw"), vec![7u8; 1 << 20])?;
//! # let path = dir.path().join("disk.qcow2");
//! # create_qcow2(&path, &CreateOptions {
//! #     backing_file: Some("base.raw".into()),
//! #     backing_format: Some("raw".into()),
//! #     ..CreateOptions::default()
//! # })?;
//! let disk = open(&path, Format::Qcow2, &OpenOptions::qemu_compatible())?;
//! let mut buf = vec![0u8; 4096];
//! disk.device.read_at(&mut buf, 0)?; // from base.raw: the overlay holds nothing there
//! assert_eq!(buf, vec![7u8; 4096]);
//! assert_eq!(disk.layers.len(), 2);
//!
//! // The same image under the default policy is refused: it names a backing file.
//! assert!(matches!(
//!     open(&path, Format::Qcow2, &OpenOptions::default()),
//!     Err(Error::ExternalFileDenied { .. })
//! ));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Convert with progress
//!
//! What `qemu-img convert -p -c -O qcow2 disk.qcow2 flat.qcow2` does: the whole chain flattened
//! into one compressed image, built beside the target and renamed into place, so a failed or
//! cancelled convert leaves nothing under the target's name. The progress callback returns
//! whether to go on.
//!
//! ```
//! # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
//! use qcow2kit::ops::convert::{convert, ConvertOptions, Target, TargetFormat};
//! use qcow2kit::{open, Format, OpenOptions};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.qcow2");
//! # create_qcow2(&path, &CreateOptions { size: Some(8 << 20), ..CreateOptions::default() })?;
//! # {
//! #     let rw = OpenOptions { writable: true, ..OpenOptions::default() };
//! #     let d = open(&path, Format::Qcow2, &rw)?;
//! #     qcow2kit::BlockDevice::write_at(d.device.as_ref(), &vec![9u8; 1 << 20], 0)?;
//! #     d.close()?;
//! # }
//! let src = open(&path, Format::Qcow2, &OpenOptions::qemu_compatible())?;
//! let percent = AtomicU64::new(0);
//! let report = |done: u64, total: u64| {
//!     percent.store(done * 100 / total.max(1), Ordering::Relaxed);
//!     true // go on
//! };
//! let opts = ConvertOptions {
//!     format: TargetFormat::Qcow2(Default::default()),
//!     compress: true,
//!     progress: Some(&report),
//!     ..ConvertOptions::default()
//! };
//! let flat = dir.path().join("flat.qcow2");
//! convert(src.device.as_ref(), Target::NewFile(&flat), &opts)?;
//! assert_eq!(percent.load(Ordering::Relaxed), 100);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Inspect an upload
//!
//! What an image service does before it lets any reader near an upload (OpenStack's
//! `format_inspector`, CVE-2024-32498): detect the format from the bytes, and refuse backing
//! files, data files, polyglots and a format other than the one declared.
//!
//! ```
//! use qcow2kit::ops::create::{create_qcow2, CreateOptions};
//! use qcow2kit::ops::inspect::{inspect_path, Policy};
//! use qcow2kit::Format;
//!
//! let dir = tempfile::tempdir()?;
//! let upload = dir.path().join("upload");
//! create_qcow2(
//!     &upload,
//!     &CreateOptions {
//!         size: Some(1 << 20),
//!         backing_file: Some("/etc/shadow".into()),
//!         backing_format: Some("raw".into()),
//!         ..CreateOptions::default()
//!     },
//! )?;
//! let found = inspect_path(&upload)?;
//! assert_eq!(found.format(), Format::Qcow2);
//! let violations = found.check(&Policy::openstack().declared(Format::Qcow2));
//! assert!(!violations.is_empty(), "an upload naming a backing file is refused");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
