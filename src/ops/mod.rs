//! Whole-image operations over [`BlockDevice`](crate::BlockDevice)s and paths.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod inspect;
pub mod map;
pub mod measure;
mod pool;
pub mod rebase;
pub mod resize;
pub mod stream;
