//! qcow2kit: a pure-Rust qcow2 library.
#![deny(clippy::unwrap_used)]
pub mod codec;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod io;
pub use device::{BlockDevice, Extent, ExtentKind, RawImage};
pub use engine::{Qcow2Image, Qcow2Options, SnapshotRef};
pub use error::{Corruption, Error, Result};
pub mod chain;
pub use chain::{open, BackingPolicy, ImageFormat, OpenOptions, Opened};
pub mod ops;
