//! qcow2kit: a pure-Rust qcow2 library.
#![deny(clippy::unwrap_used)]
pub mod error;
pub mod format;
pub mod io;
pub use error::{Corruption, Error, Result};
