//! Whole-image operations over [`BlockDevice`](crate::BlockDevice)s and paths.

pub mod convert;
